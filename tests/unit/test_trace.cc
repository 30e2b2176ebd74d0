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
      // Found by the fuzz targets (tests/fuzz/regressions/trace_*): times
      // whose nanoseconds do not fit in 64 bits, offsets past 2^64.
      {Format::kMsr, "0,h,0,Write,0,512,0\n", 1, "Timestamp is out of range"},
      {Format::kBlkparse, "  8,0 1 1 nan 7 Q W 10 + 8 [p]\n", 1, "time is not seconds"},
      {Format::kBlkparse, "  8,0 1 1 1e10 7 Q W 10 + 8 [p]\n", 1, "time is not seconds"},
      {Format::kBlkparse, "  8,0 1 1 0.1 7 Q W 36028797018963968 + 8 [p]\n", 1, "past 2^64"},
      {Format::kBlkparse, "  8,0 1 1 0.1 7 Q W 36028797018963960 + 8 [p]\n", 1, "past 2^64"},
      {Format::kHistory, "9223372036,2,write,1,10\n", 1, "timestamp is out of range"},
      {Format::kHistory, "1,70368744177664,write,1,10\n", 1, "segment is past 2^64"},
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

TEST_CASE("trace: a history row spread over a long bucket keeps exact times", "[trace]") {
  // 200000 requests over a day: span * k no longer fits in 64 bits.
  const std::string text = "1796000000,3,write,200000,819200000\n";
  ReadOptions o;
  o.format = Format::kHistory;
  o.history_bucket_s = 86400;
  const int64_t t0 = 1'796'000'000LL * 1'000'000'000LL;
  const __int128 span = __int128{86400} * 1'000'000'000;
  uint64_t k = 0;
  bool exact = true;
  Status st = read_text(text, "t", o, [&](const Request& r) {
    exact = exact && r.time_ns == t0 + static_cast<int64_t>(span * k / 200000);
    ++k;
  });
  REQUIRE(st);
  CHECK(k == 200000);
  CHECK(exact);
}

TEST_CASE("trace: read_text reads as read_file does", "[trace]") {
  const std::vector<std::string> texts = {
      std::to_string(kTicks) + ",pg,0,Write,8192,4096,0\r\n\n" + std::to_string(kTicks) + ",pg,0,Read,0,1,0",
      "  8,0 1 1 0.25 7 Q R 100 + 16 [p]\n  8,0 1 2 0.5 7 C R 100 + 16 [0]\nCPU0 (8,0):\n",
      "\n\ntimestamp,segment,op,count,bytes\n60,1,write,3,12288\n",
      "timestamp,segment,op,count,bytes\n60,1,write,3,12288\n61,x,read,1,1\n",
      "hello\n",
      "",
  };
  for (const std::string& text : texts) {
    INFO(text);
    TempFile f(text);
    Status file_st, text_st;
    ReadStats file_stats, text_stats;
    const auto from_file = read_all(f.path, {}, &file_st, &file_stats);
    std::vector<Request> from_text;
    text_st = read_text(text, f.path, {}, [&](const Request& r) { from_text.push_back(r); }, &text_stats);
    CHECK(text_st.code() == file_st.code());
    CHECK(text_st.message() == file_st.message());
    REQUIRE(from_text.size() == from_file.size());
    for (size_t i = 0; i < from_text.size(); ++i) {
      CHECK(from_text[i].time_ns == from_file[i].time_ns);
      CHECK(from_text[i].offset == from_file[i].offset);
      CHECK(from_text[i].length == from_file[i].length);
      CHECK(from_text[i].op == from_file[i].op);
    }
    CHECK(text_stats.format == file_stats.format);
    CHECK(text_stats.lines == file_stats.lines);
    CHECK(text_stats.requests == file_stats.requests);
    CHECK(text_stats.skipped == file_stats.skipped);
    CHECK(text_stats.file_bytes == file_stats.file_bytes);
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
