// Unit tests for the pure parts of `shadowctl restore` and `export`
// (ctl/restore.h): range bookkeeping, the copy plan, zero detection, the
// state file, the checks on the output, progress figures and NBD URIs.
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "ctl/restore.h"
#include "test_util.h"

namespace shadowd::ctl {
namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;

std::vector<ByteRange> ranges(std::initializer_list<ByteRange> r) { return r; }

TEST_CASE("restore: RangeSet merges, removes and finds gaps", "[restore]") {
  RangeSet s;
  s.add(10, 20);
  s.add(30, 40);
  CHECK(s.ranges() == ranges({{10, 20}, {30, 40}}));
  s.add(20, 30);  // touching ranges join
  CHECK(s.ranges() == ranges({{10, 40}}));
  s.add(5, 5);  // empty: ignored
  s.add(50, 60);
  s.add(0, 2);
  CHECK(s.ranges() == ranges({{0, 2}, {10, 40}, {50, 60}}));
  s.add(1, 55);  // swallows several
  CHECK(s.ranges() == ranges({{0, 60}}));
  CHECK(s.bytes() == 60);

  s.remove(10, 20);
  s.remove(58, 100);
  CHECK(s.ranges() == ranges({{0, 10}, {20, 58}}));
  CHECK(s.contains(0, 10));
  CHECK(s.contains(25, 58));
  CHECK_FALSE(s.contains(5, 15));
  CHECK_FALSE(s.contains(58, 59));
  CHECK(s.contains(70, 70));

  CHECK(s.gaps(0, 100) == ranges({{10, 20}, {58, 100}}));
  CHECK(s.gaps(5, 25) == ranges({{10, 20}}));
  CHECK(s.gaps(0, 10).empty());
  CHECK(RangeSet().gaps(3, 7) == ranges({{3, 7}}));
}

TEST_CASE("restore: RangeSet against a bitmap model", "[restore]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  constexpr uint64_t kSize = 200;
  std::vector<bool> model(kSize, false);
  RangeSet s;
  for (int step = 0; step < 2000; ++step) {
    uint64_t b = rng() % kSize;
    uint64_t e = b + rng() % 20;
    if (e > kSize) e = kSize;
    const bool add = rng() % 3 != 0;
    if (add) {
      s.add(b, e);
    } else {
      s.remove(b, e);
    }
    for (uint64_t i = b; i < e; ++i) model[i] = add;
    uint64_t bytes = 0;
    for (bool m : model) bytes += m;
    REQUIRE(s.bytes() == bytes);
    for (size_t i = 1; i < s.ranges().size(); ++i) {
      REQUIRE(s.ranges()[i - 1].end < s.ranges()[i].begin);  // merged, sorted
    }
    for (uint64_t i = 0; i < kSize; ++i) REQUIRE(s.contains(i, i + 1) == model[i]);
  }
}

TEST_CASE("restore: the plan copies hot segments first, then the rest in order", "[restore]") {
  const uint64_t size = 10 * kMiB + 4096;  // a partial last segment
  const uint64_t seg = kMiB;
  const uint64_t chunk = 4 * kMiB;
  RangeSet done;
  done.add(0, kMiB);  // segment 0 is already there
  const auto plan = plan_copy(size, seg, chunk, {7, 0, 7, 10, 99, 3}, done);
  CHECK(plan == ranges({{7 * kMiB, 8 * kMiB},
                        {10 * kMiB, size},  // the short last segment
                        {3 * kMiB, 4 * kMiB},
                        {kMiB, 3 * kMiB},  // the rest, cut at multiples of 4 MiB
                        {4 * kMiB, 7 * kMiB},
                        {8 * kMiB, 10 * kMiB}}));
  // Every byte not done exactly once.
  RangeSet all = done;
  uint64_t planned = 0;
  for (const ByteRange& r : plan) {
    CHECK(r.bytes() <= chunk);
    CHECK(all.gaps(r.begin, r.end) == ranges({{r.begin, r.end}}));
    all.add(r.begin, r.end);
    planned += r.bytes();
  }
  CHECK(planned + done.bytes() == size);
  CHECK(all.ranges() == ranges({{0, size}}));

  CHECK(plan_copy(size, seg, chunk, {}, RangeSet()).size() == 3);
  RangeSet everything;
  everything.add(0, size);
  CHECK(plan_copy(size, seg, chunk, {1, 2}, everything).empty());
  // A hot segment larger than a chunk is split.
  CHECK(plan_copy(16 * kMiB, 16 * kMiB, chunk, {0}, RangeSet()).size() == 4);
}

TEST_CASE("restore: zero detection", "[restore]") {
  std::vector<unsigned char> buf(kMiB, 0);
  CHECK(is_all_zero(buf.data(), buf.size()));
  CHECK(is_all_zero(buf.data(), 0));
  CHECK(is_all_zero(buf.data(), 3));
  for (size_t at : {size_t{0}, size_t{15}, size_t{16}, size_t{17}, buf.size() - 1}) {
    buf[at] = 1;
    CHECK_FALSE(is_all_zero(buf.data(), buf.size()));
    buf[at] = 0;
  }
  buf[5] = 9;
  CHECK_FALSE(is_all_zero(buf.data(), 6));
  CHECK(is_all_zero(buf.data(), 5));
}

TEST_CASE("restore: zero runs within a chunk", "[restore]") {
  constexpr uint64_t g = 4096;
  std::vector<unsigned char> buf(10 * g + 100, 0);
  using R = ZeroRun;
  CHECK(zero_runs(buf.data(), buf.size(), g) == std::vector<R>{{0, buf.size(), true}});
  buf[g + 5] = 1;        // granule 1
  buf[2 * g] = 1;        // granule 2: joins granule 1
  buf[7 * g + 1] = 1;    // granule 7
  buf[10 * g + 99] = 1;  // the short last one
  CHECK(zero_runs(buf.data(), buf.size(), g) == std::vector<R>{{0, g, true},
                                                               {g, 2 * g, false},
                                                               {3 * g, 4 * g, true},
                                                               {7 * g, g, false},
                                                               {8 * g, 2 * g, true},
                                                               {10 * g, 100, false}});
  CHECK(zero_runs(buf.data(), 0, g).empty());
  uint64_t total = 0;
  for (const R& r : zero_runs(buf.data(), buf.size())) total += r.bytes;  // default granule
  CHECK(total == buf.size());
}

RestoreState sample_state() {
  RestoreState s;
  s.at = "-1h";
  s.at_ns = 1'795'000'000'000'000'000;
  s.seq = 48213;
  s.time_ns = 1'795'000'000'123'000'000;
  s.size_bytes = 64 * kMiB;
  s.segment_bytes = 256 * 1024;
  s.chunk_bytes = kRestoreChunkBytes;
  s.done.add(0, 8 * kMiB);
  s.done.add(16 * kMiB, 20 * kMiB);
  s.zero_bytes = 4 * kMiB;
  s.started_ns = 1;
  s.updated_ns = 2;
  return s;
}

TEST_CASE("restore: the state file round-trips and rejects what it cannot use", "[restore]") {
  const RestoreState s = sample_state();
  const json j = encode_state(s);
  CHECK(j["format"] == "shadowd-restore");
  CHECK(j["done"] == json::parse("[[0,8388608],[16777216,20971520]]"));
  CHECK(j["done_bytes"] == 12 * kMiB);
  CHECK(j["time"] == "2026-11-18T11:06:40.123Z");
  CHECK_FALSE(j.contains("at_seq"));
  auto back = decode_state(j);
  REQUIRE(std::holds_alternative<RestoreState>(back));
  const RestoreState& r = std::get<RestoreState>(back);
  CHECK(r.at == "-1h");
  CHECK(r.at_ns == s.at_ns);
  CHECK_FALSE(r.at_seq);
  CHECK(r.seq == s.seq);
  CHECK(r.time_ns == s.time_ns);
  CHECK(r.size_bytes == s.size_bytes);
  CHECK(r.segment_bytes == s.segment_bytes);
  CHECK(r.done == s.done);
  CHECK(r.zero_bytes == s.zero_bytes);

  auto bad = [](json x) {
    auto d = decode_state(x);
    REQUIRE(std::holds_alternative<std::string>(d));
    return std::get<std::string>(d);
  };
  CHECK(bad(json::array()) == "not a shadowctl restore state file");
  json v = j;
  v["version"] = 2;
  CHECK(bad(v).find("version 2") != std::string::npos);
  json m = j;
  m.erase("size_bytes");
  CHECK(bad(m).find("size_bytes") != std::string::npos);
  json o = j;
  o["done"].push_back({60 * kMiB, 65 * kMiB});
  CHECK(bad(o).find("outside the device") != std::string::npos);
  json w = j;
  w["done"].push_back({uint64_t{5}, uint64_t{3}});
  CHECK(bad(w).find("outside") != std::string::npos);
  json n = j;
  n["done"].push_back("x");
  CHECK(bad(n).find("[begin, end]") != std::string::npos);
}

// A fresh directory under TMPDIR, removed with its files afterwards.
struct TempDir {
  std::string path;
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl =
        std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/shadowctl-restore-XXXXXX";
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~TempDir() { std::system(("rm -rf '" + path + "'").c_str()); }
};

TEST_CASE("restore: save_state replaces the file atomically, load_state reads it", "[restore]") {
  TempDir dir;
  const std::string out = dir.path + "/disk.img";
  const std::string path = restore_state_path(out);
  CHECK(path == out + ".shadowd-restore");

  LoadedState none = load_state(path);
  CHECK_FALSE(none.exists);
  CHECK(none.error.empty());

  RestoreState s = sample_state();
  REQUIRE_FALSE(save_state(path, s));
  s.done.add(8 * kMiB, 12 * kMiB);
  REQUIRE_FALSE(save_state(path, s));  // over the old one
  LoadedState got = load_state(path);
  CHECK(got.exists);
  REQUIRE(got.state);
  CHECK(got.state->done == s.done);
  CHECK(::access((path + ".tmp").c_str(), F_OK) != 0);  // no leftovers

  std::ofstream(path) << "{not json";
  LoadedState broken = load_state(path);
  CHECK(broken.exists);
  CHECK_FALSE(broken.state);
  CHECK(broken.error.find("not valid JSON") != std::string::npos);

  // A directory that is not there: an error, and nothing is left behind.
  auto e = save_state(dir.path + "/nope/x" + kRestoreStateSuffix, s);
  REQUIRE(e);
  CHECK(e->find("cannot create") != std::string::npos);
}

TEST_CASE("restore: the output is checked before anything is written", "[restore]") {
  using K = TargetKind;
  using A = TargetAction;
  auto action = [](TargetFacts f, bool resume, bool force) {
    auto d = decide_target("/x/out.img", "/x/out.img.shadowd-restore", f, resume, force);
    return std::holds_alternative<A>(d) ? std::get<A>(d) : static_cast<A>(-1);
  };
  auto error = [](TargetFacts f, bool resume, bool force) {
    auto d = decide_target("/x/out.img", "/x/out.img.shadowd-restore", f, resume, force);
    return std::holds_alternative<std::string>(d) ? std::get<std::string>(d) : std::string();
  };
  CHECK(action({K::kMissing, 0, false}, false, false) == A::kCreate);
  CHECK(action({K::kRegular, 0, false}, false, false) == A::kTruncate);
  CHECK(error({K::kRegular, 4096, false}, false, false).find("--force") != std::string::npos);
  CHECK(action({K::kRegular, 4096, false}, false, true) == A::kTruncate);
  CHECK(error({K::kBlockDevice, kMiB, false}, false, false).find("block device") !=
        std::string::npos);
  CHECK(action({K::kBlockDevice, kMiB, false}, false, true) == A::kOverwrite);
  CHECK(error({K::kOther, 0, false}, false, true).find("neither") != std::string::npos);

  // A state file: an incomplete restore.
  const std::string incomplete = error({K::kRegular, kMiB, true}, false, false);
  CHECK(incomplete.find("incomplete restore") != std::string::npos);
  CHECK(incomplete.find("--resume") != std::string::npos);
  CHECK(action({K::kRegular, kMiB, true}, false, true) == A::kTruncate);
  CHECK(action({K::kRegular, kMiB, true}, true, false) == A::kResume);
  CHECK(action({K::kBlockDevice, kMiB, true}, true, false) == A::kResume);
  CHECK(error({K::kRegular, kMiB, false}, true, false).find("nothing to resume") !=
        std::string::npos);
  CHECK(error({K::kMissing, 0, true}, true, false).find("is gone") != std::string::npos);

  // Sizes, once the export's is known.
  CHECK_FALSE(
      check_target_size("/dev/x", {K::kBlockDevice, 8 * kMiB, false}, A::kOverwrite, 8 * kMiB));
  auto small =
      check_target_size("/dev/x", {K::kBlockDevice, 4 * kMiB, false}, A::kOverwrite, 8 * kMiB);
  REQUIRE(small);
  CHECK(*small ==
        "/dev/x is too small: 4194304 bytes (4 MiB), the restore needs 8388608 bytes (8 MiB); "
        "nothing was written");
  CHECK_FALSE(check_target_size("/f", {K::kRegular, 4 * kMiB, false}, A::kTruncate, 8 * kMiB));
  CHECK(check_target_size("/f", {K::kRegular, 4 * kMiB, true}, A::kResume, 8 * kMiB));
  CHECK_FALSE(check_target_size("/f", {K::kRegular, 8 * kMiB, true}, A::kResume, 8 * kMiB));

  const RestoreState s = sample_state();
  CHECK_FALSE(check_resume(s, s.seq, s.size_bytes));
  CHECK(check_resume(s, s.seq + 1, s.size_bytes)->find("seq 48213") != std::string::npos);
  CHECK(check_resume(s, s.seq, s.size_bytes * 2)->find("resized") != std::string::npos);
}

TEST_CASE("restore: progress, rate and ETA", "[restore]") {
  Progress p = measure_progress(512 * kMiB, 1024 * kMiB, 256 * kMiB, 2.0);
  CHECK(p.percent == Approx(50.0));
  CHECK(p.rate_bytes_per_s == Approx(128.0 * kMiB));
  REQUIRE(p.eta_s);
  CHECK(*p.eta_s == Approx(4.0));
  CHECK(format_progress_line("restoring", p) ==
        "restoring   50.0 %  512 MiB of 1 GiB  128.0 MiB/s  ETA 4s");
  const json j = progress_json("copy", p);
  CHECK(j["phase"] == "copy");
  CHECK(j["progress"]["done_bytes"] == 512 * kMiB);
  CHECK(j["progress"]["total_bytes"] == 1024 * kMiB);
  CHECK(j["progress"]["eta_s"] == Approx(4.0));

  Progress start = measure_progress(0, kMiB, 0, 0.0);
  CHECK(start.rate_bytes_per_s == 0);
  CHECK_FALSE(start.eta_s);
  CHECK(progress_json("copy", start)["progress"]["eta_s"].is_null());
  CHECK(format_progress_line("x", start) == "x    0.0 %  0 B of 1 MiB  0.0 MiB/s  ETA --");
  Progress done = measure_progress(kMiB, kMiB, 0, 1.0);
  CHECK(done.percent == 100.0);
  CHECK(done.eta_s == 0.0);
  CHECK(measure_progress(0, 0, 0, 1.0).percent == 100.0);
  CHECK(format_mib_per_s(3.5 * kMiB) == "3.5 MiB/s");
  // Long ETAs in two units.
  CHECK(format_progress_line("x", measure_progress(0, 3725 * kMiB, kMiB, 1.0))
            .ends_with("ETA 1h 2m"));
}

TEST_CASE("restore: NBD URIs and how to reach an export", "[restore]") {
  auto u = parse_nbd_uri("nbd+unix:///restore-12-ab?socket=/run/shadowd/disk.nbd");
  REQUIRE(u);
  CHECK(u->is_unix);
  CHECK(u->name == "restore-12-ab");
  CHECK(u->socket == "/run/shadowd/disk.nbd");
  auto t = parse_nbd_uri("nbd://127.0.0.1:10809/pit%2D1");
  REQUIRE(t);
  CHECK_FALSE(t->is_unix);
  CHECK(t->host == "127.0.0.1");
  CHECK(t->port == "10809");
  CHECK(t->name == "pit-1");
  auto v6 = parse_nbd_uri("nbd://[::1]:10810/x");
  REQUIRE(v6);
  CHECK(v6->host == "::1");
  CHECK(v6->port == "10810");
  CHECK_FALSE(parse_nbd_uri("http://x/y"));
  CHECK_FALSE(parse_nbd_uri("nbd+unix:///x"));
  CHECK_FALSE(parse_nbd_uri("nbd:///x"));

  const auto hints = access_hints("nbd+unix:///pit?socket=/run/shadowd/disk.nbd");
  REQUIRE(hints.size() == 4);
  CHECK(hints[0] == "nbdinfo 'nbd+unix:///pit?socket=/run/shadowd/disk.nbd'");
  CHECK(hints[1] == "nbd-client -unix /run/shadowd/disk.nbd -N pit -readonly /dev/nbd1");
  CHECK(
      hints[2] ==
      "mkdir -p /tmp/pit && nbdfuse -r /tmp/pit 'nbd+unix:///pit?socket=/run/shadowd/disk.nbd' &");
  CHECK(hints[3] == "mkdir -p /mnt/pit && mount -o ro,loop /tmp/pit/nbd /mnt/pit");
  const auto tcp = access_hints("nbd://host.example:10809/pit");
  CHECK(tcp[1] == "nbd-client host.example 10809 -N pit -readonly /dev/nbd1");
}

}  // namespace
}  // namespace shadowd::ctl
