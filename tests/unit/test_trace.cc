// Trace readers (core/trace.h): each format line by line, detection,
// gzip, and malformed lines reported with their line number.
#include "core/trace.h"

#include <unistd.h>
#include <zlib.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <string>
#include <vector>

namespace shadowd::trace {
namespace {

struct TempFile {
  explicit TempFile(const std::string& text, bool gzip = false) {
    char tmpl[] = "/tmp/shadowd-trace-XXXXXX";
    const int fd = ::mkstemp(tmpl);
    REQUIRE(fd >= 0);
    ::close(fd);
    path = tmpl;
    if (gzip) {
      gzFile g = gzopen(path.c_str(), "wb");
      REQUIRE(g != nullptr);
      REQUIRE(gzwrite(g, text.data(), static_cast<unsigned>(text.size())) == static_cast<int>(text.size()));
      REQUIRE(gzclose(g) == Z_OK);
    } else {
      FILE* f = std::fopen(path.c_str(), "wb");
      REQUIRE(f != nullptr);
      REQUIRE(std::fwrite(text.data(), 1, text.size(), f) == text.size());
      std::fclose(f);
    }
  }
  ~TempFile() { ::unlink(path.c_str()); }
  std::string path;
};

std::vector<Request> read_all(const std::string& path, ReadOptions o, Status* st, ReadStats* stats = nullptr) {
  std::vector<Request> out;
  *st = read_file(path, o, [&](const Request& r) { out.push_back(r); }, stats);
  return out;
}

// 2026-11-30T00:00:00Z in Windows filetime ticks.
constexpr int64_t kUnix = 1'796'000'000;
constexpr int64_t kTicks = kUnix * 10'000'000LL + 116444736000000000LL;

TEST_CASE("trace: MSR Cambridge CSV, plain and gzip", "[trace]") {
  const std::string text = std::to_string(kTicks) + ",pg,0,Write,8192,4096,0\n" +
                           std::to_string(kTicks + 15) + ",pg,0,Read,0,65536,0\n" +
                           std::to_string(kTicks + 20) + ",pg,0,write,4096,0,0\n";  // empty: skipped
  for (bool gz : {false, true}) {
    TempFile f(text, gz);
    Status st;
    ReadStats stats;
    const auto reqs = read_all(f.path, {}, &st, &stats);
    REQUIRE(st);
    CHECK(stats.format == Format::kMsr);
    CHECK(stats.lines == 3);
    CHECK(stats.skipped == 1);
    REQUIRE(reqs.size() == 2);
    CHECK(reqs[0].op == Op::kWrite);
    CHECK(reqs[0].offset == 8192);
    CHECK(reqs[0].length == 4096);
    CHECK(reqs[0].time_ns == kUnix * 1'000'000'000LL);
    CHECK(reqs[1].op == Op::kRead);
    CHECK(reqs[1].length == 65536);
    CHECK(reqs[1].time_ns == kUnix * 1'000'000'000LL + 1500);
  }
}

TEST_CASE("trace: blkparse text, only queued events, summary ignored", "[trace]") {
  const std::string text =
      "  8,0    3        1     0.000000000   697  Q  WS 3868440 + 8 [jbd2/sda1-8]\n"
      "  8,0    3        2     0.000004000   697  G  WS 3868440 + 8 [jbd2/sda1-8]\n"
      "  8,0    1        3     0.250000000   700  Q   R 100 + 16 [postgres]\n"
      "  8,0    1        4     0.300000000   700  Q  DS 2048 + 2048 [fstrim]\n"
      "  8,0    1        5     0.400000000   700  Q FWS [kworker/1:1]\n"
      "  8,0    1        6     0.500000000   700  C   R 100 + 16 [0]\n"
      "\n"
      "CPU0 (8,0):\n"
      " Reads Queued:           1,        8KiB\t Writes Queued:           2,        4KiB\n"
      "Total (8,0):\n"
      "Throughput (R/W): 0KiB/s / 0KiB/s\n";
  TempFile f(text);
  Status st;
  ReadStats stats;
  const auto reqs = read_all(f.path, {}, &st, &stats);
  REQUIRE(st);
  CHECK(stats.format == Format::kBlkparse);
  REQUIRE(reqs.size() == 3);
  CHECK(reqs[0].op == Op::kWrite);
  CHECK(reqs[0].offset == 3868440ull * 512);
  CHECK(reqs[0].length == 8 * 512);
  CHECK(reqs[0].time_ns == 0);
  CHECK(reqs[1].op == Op::kRead);
  CHECK(reqs[1].time_ns == 250'000'000);
  CHECK(reqs[2].op == Op::kWrite);  // a discard counts as a write
  CHECK(reqs[2].length == 2048 * 512);
}

TEST_CASE("trace: shadowd history export, rows spread over their bucket", "[trace]") {
  const std::string text =
      "timestamp,segment,op,count,bytes\n"
      "1796000000,3,write,4,16384\n"
      "1796000060,0,read,1,262144\n";
  TempFile f(text);
  ReadOptions o;
  o.history_segment_bytes = 1 << 20;
  o.history_bucket_s = 60;
  Status st;
  const auto reqs = read_all(f.path, o, &st);
  REQUIRE(st);
  REQUIRE(reqs.size() == 5);
  for (int k = 0; k < 4; ++k) {
    CHECK(reqs[k].op == Op::kWrite);
    CHECK(reqs[k].offset == 3ull << 20);
    CHECK(reqs[k].length == 4096);
    CHECK(reqs[k].time_ns == 1'796'000'000LL * 1'000'000'000LL + k * 15'000'000'000LL);
  }
  CHECK(reqs[4].op == Op::kRead);
  CHECK(reqs[4].length == 262144);
}

TEST_CASE("trace: malformed lines name the file and line, in every format", "[trace]") {
  struct Case {
    Format format;
    std::string text;
    int line;
    std::string says;
  };
  const std::vector<Case> cases = {
      {Format::kMsr, std::to_string(kTicks) + ",h,0,Write,0,512,0\n" + std::to_string(kTicks) + ",h,0,Erase,0,512,0\n",
       2, "Type must be Read or Write"},
      {Format::kMsr, std::to_string(kTicks) + ",h,0,Write,0,512\n", 1, "expected 7"},
      {Format::kMsr, std::to_string(kTicks) + ",h,0,Write,-5,512,0\n", 1, "Offset"},
      {Format::kBlkparse, "  8,0 1 1 0.1 7 Q W 10 + x [p]\n", 1, "sector count"},
      {Format::kBlkparse, "  8,0 1 1 0.1 7 Q W 10 - 8 [p]\n", 1, "SECTOR + COUNT"},
      {Format::kHistory, "timestamp,segment,op,count,bytes\n1,2,write,0,10\n", 2, "count"},
      {Format::kHistory, "timestamp,segment,op,count,bytes\n1,2,trim,1,10\n", 2, "op must be"},
  };
  for (const Case& c : cases) {
    INFO(c.text);
    TempFile f(c.text);
    ReadOptions o;
    o.format = c.format;
    Status st;
    read_all(f.path, o, &st);
    REQUIRE_FALSE(st);
    const std::string where = f.path + ":" + std::to_string(c.line) + ":";
    CHECK(st.message().find(where) == 0);
    CHECK(st.message().find(c.says) != std::string::npos);
  }
}

TEST_CASE("trace: format detection and names", "[trace]") {
  CHECK(detect(std::to_string(kTicks) + ",h,0,Read,0,512,0") == Format::kMsr);
  CHECK(detect("  8,0    3        1     0.000000000   697  Q  WS 3868440 + 8 [jbd2]") == Format::kBlkparse);
  CHECK(detect("timestamp,segment,op,count,bytes") == Format::kHistory);
  CHECK(detect("hello world") == Format::kAuto);
  TempFile f("hello world\n");
  Status st;
  read_all(f.path, {}, &st);
  REQUIRE_FALSE(st);
  CHECK(st.message().find(":1: cannot tell the trace format") != std::string::npos);
  for (Format fm : {Format::kAuto, Format::kMsr, Format::kBlkparse, Format::kHistory}) {
    auto p = parse_format(format_name(fm));
    REQUIRE(p);
    CHECK(*p == fm);
  }
  CHECK_FALSE(parse_format("csv"));
  Status missing;
  read_all("/nonexistent/trace.csv", {}, &missing);
  CHECK_FALSE(missing);
}

}  // namespace
}  // namespace shadowd::trace
