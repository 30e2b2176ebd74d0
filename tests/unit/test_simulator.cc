// The shadowing simulator (core/simulator.h) against brute-force counting on
// generated traces, and the limits it must keep.
#include "core/simulator.h"
#include "core/tune.h"

#include <catch2/catch.hpp>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include <unistd.h>
#include <random>

namespace shadowd::sim {
namespace {

constexpr uint32_t kSeg = 64 * 1024;
constexpr int64_t kSec = 1'000'000'000;

// A mix of what block traces hold: a hot set rewritten often, sequential
// streams into fresh areas, random cold writes, reads, and idle gaps longer
// than the retention.
std::vector<trace::Request> generate(uint64_t seed, uint64_t nsegs, size_t n, int64_t retention_s) {
  std::mt19937_64 rng(seed);
  std::vector<trace::Request> out;
  int64_t t = 1'700'000'000 * kSec;
  uint64_t stream = rng() % nsegs;
  for (size_t i = 0; i < n; ++i) {
    const uint64_t pick = rng() % 100;
    t += static_cast<int64_t>(rng() % (kSec / 5));
    if (rng() % 500 == 0) t += (retention_s + static_cast<int64_t>(rng() % 3)) * kSec;
    if (rng() % 50 == 0) continue;  // same time as the previous request
    trace::Request q;
    q.time_ns = t;
    q.op = trace::Op::kWrite;
    if (pick < 40) {
      q.offset = (rng() % 8) * kSeg + (rng() % 16) * 4096;
      q.length = 4096;
    } else if (pick < 70) {
      q.offset = stream * kSeg;
      q.length = kSeg * (1 + rng() % 2);
      stream = (stream + q.length / kSeg) % (nsegs - 2);
    } else if (pick < 85) {
      q.offset = (rng() % nsegs) * kSeg + kSeg - 4096;
      q.length = 8192;  // may span two segments
      if (q.offset + q.length > nsegs * kSeg) q.length = 4096;
    } else {
      q.op = trace::Op::kRead;
      q.offset = (rng() % nsegs) * kSeg;
      q.length = 65536;
    }
    out.push_back(q);
  }
  return out;
}

// A segment-write stalls exactly when no earlier segment-write to that
// segment has a time in [t - R, t] (docs/SIMULATION.md).
uint64_t brute_force_none(const std::vector<trace::Request>& reqs, int64_t retention_s) {
  std::map<uint64_t, int64_t> last;
  uint64_t stalls = 0;
  for (const auto& q : reqs) {
    if (q.op != trace::Op::kWrite) continue;
    for (uint64_t s = q.offset / kSeg; s <= (q.offset + q.length - 1) / kSeg; ++s) {
      auto f = last.find(s);
      if (f == last.end() || f->second < q.time_ns - retention_s * kSec) ++stalls;
      last[s] = q.time_ns;
    }
  }
  return stalls;
}

Options base_options(int64_t retention_s) {
  Options o;
  o.segment_bytes = kSeg;
  o.retention_s = static_cast<uint64_t>(retention_s);
  o.budget_bytes_per_s = 4 * kSeg;
  o.restore_samples = 20;
  return o;
}

TEST_CASE("simulate none: stalls are exactly the writes with no write to their segment in the window",
          "[simulator]") {
  for (uint64_t seed = 1; seed <= 6; ++seed) {
    const int64_t retention = 2 + static_cast<int64_t>(seed % 4) * 3;
    auto reqs = generate(seed, 200, 4000, retention);
    Options o = base_options(retention);
    o.policy = PolicyKind::kNone;
    o.pool_capacity_pct = 1000;  // enough: no shrink
    auto r = run(reqs, o);
    INFO("seed " << seed);
    REQUIRE(r);
    CHECK(r->history_shrinks == 0);
    CHECK(r->stalls == brute_force_none(reqs, retention));
    CHECK(r->copied_bytes == r->versions_made * kSeg);
    CHECK(r->copies == 0);
    CHECK(r->stall_bytes == r->stalls * kSeg);
  }
}

TEST_CASE("simulate: the oracle stalls no more than none, lru and heat; capacity and budget are kept",
          "[simulator]") {
  for (uint64_t seed = 11; seed <= 16; ++seed) {
    const int64_t retention = 3 + static_cast<int64_t>(seed % 3) * 4;
    auto reqs = generate(seed, 300, 5000, retention);
    for (double pct : {5.0, 20.0, 200.0}) {
      for (uint64_t budget : {uint64_t{2} * kSeg, uint64_t{20} * kSeg}) {
        std::map<PolicyKind, Result> res;
        for (PolicyKind k : {PolicyKind::kNone, PolicyKind::kLru, PolicyKind::kHeat, PolicyKind::kOracle,
                             PolicyKind::kAuto, PolicyKind::kSequential, PolicyKind::kEwma,
                             PolicyKind::kPriority}) {
          Options o = base_options(retention);
          o.policy = k;
          o.pool_capacity_pct = pct;
          o.budget_bytes_per_s = budget;
          auto r = run(reqs, o);
          INFO("seed " << seed << " capacity " << pct << "% budget " << budget << " policy "
                       << policy_name(k));
          REQUIRE(r);
          CHECK(r->pool_peak_bytes <= r->pool_capacity_bytes);
          // The budget: a token bucket of at most max(B, 2 segments).
          const double allowed = static_cast<double>(budget) * r->trace_seconds +
                                 std::max<double>(static_cast<double>(budget), 2.0 * kSeg) + 1;
          CHECK(static_cast<double>(r->copied_bytes) <= allowed);
          CHECK(r->segment_writes == r->stalls + (r->segment_writes - r->stalls));
          res[k] = *r;
        }
        INFO("seed " << seed << " capacity " << pct << "% budget " << budget);
        const uint64_t oracle = res[PolicyKind::kOracle].stalls;
        CHECK(oracle <= res[PolicyKind::kNone].stalls);
        CHECK(oracle <= res[PolicyKind::kLru].stalls);
        CHECK(oracle <= res[PolicyKind::kHeat].stalls);
        // Keeping bases never costs stalls against freeing them.
        CHECK(res[PolicyKind::kLru].stalls <= res[PolicyKind::kNone].stalls);
      }
    }
  }
}

TEST_CASE("simulate: a sequential stream into fresh areas stalls on every segment without copies ahead, "
          "and hardly at all with the sequential model",
          "[simulator]") {
  std::vector<trace::Request> reqs;
  int64_t t = 1000 * kSec;
  for (uint64_t s = 0; s < 2000; ++s) {
    for (int k = 0; k < 4; ++k) {
      trace::Request q;
      q.time_ns = t;
      q.op = trace::Op::kWrite;
      q.offset = s * kSeg + static_cast<uint64_t>(k) * (kSeg / 4);
      q.length = kSeg / 4;
      reqs.push_back(q);
      t += kSec / 100;  // 25 segments per second
    }
  }
  Options o = base_options(3600);
  o.budget_bytes_per_s = 64 * kSeg;
  o.pool_capacity_pct = 400;  // the whole stream's journal and bases fit
  o.policy = PolicyKind::kLru;
  auto lru = run(reqs, o);
  REQUIRE(lru);
  CHECK(lru->stalls == 2000);
  o.policy = PolicyKind::kSequential;
  auto seq = run(reqs, o);
  REQUIRE(seq);
  CHECK(seq->stalls < 20);
  CHECK(seq->copies_used >= 1980);
  o.policy = PolicyKind::kAuto;
  auto au = run(reqs, o);
  REQUIRE(au);
  CHECK(au->stalls < 20);
  o.policy = PolicyKind::kOracle;
  auto orc = run(reqs, o);
  REQUIRE(orc);
  CHECK(orc->stalls <= 5);  // the bucket starts empty
}

// A write of segment s, whole, at t.
trace::Request segment_write(uint64_t s, int64_t t) {
  trace::Request q;
  q.time_ns = t;
  q.op = trace::Op::kWrite;
  q.offset = s * kSeg;
  q.length = kSeg;
  return q;
}

TEST_CASE("simulate: first writes into holes, run after run, are copied ahead by the hole cursors", "[simulator]") {
  std::vector<trace::Request> reqs;
  int64_t t = 1000 * kSec;
  auto write = [&](uint64_t s, int64_t dt) { reqs.push_back(segment_write(s, t += dt)); };
  // A used device: segments 0..12099 written, but for 40 holes of 10
  // segments 300 apart (free space).
  auto hole = [](uint64_t s) { return s >= 100 && s < 12100 && (s - 100) % 300 < 10; };
  for (uint64_t s = 0; s < 12100; ++s) {
    if (!hole(s)) write(s, kSec / 1000);
  }
  const std::vector<trace::Request> prefill = reqs;
  t += 1000 * kSec;  // the streams that wrote it are long over
  // Then new files fill the holes upwards, one a minute: each run is a
  // stream, but the next hole is beyond any stream's reach (290 written
  // segments further); a cursor skips them.
  for (uint64_t h = 100; h < 12100; h += 300) {
    t += 60 * kSec;
    for (uint64_t s = h; s < h + 10; ++s) write(s, kSec / 100);
  }
  Options o = base_options(7 * 86400);
  o.budget_bytes_per_s = 16 * kSeg;
  o.pool_capacity_pct = 400;
  o.policy = PolicyKind::kLru;
  auto lru = run(reqs, o);
  REQUIRE(lru);
  o.policy = PolicyKind::kAuto;
  const std::string log =
      (std::filesystem::temp_directory_path() / ("sim-copy-log-" + std::to_string(getpid()) + ".txt")).string();
  REQUIRE(setenv("SHADOWD_SIM_COPY_LOG", log.c_str(), 1) == 0);
  auto au = run(reqs, o);
  unsetenv("SHADOWD_SIM_COPY_LOG");
  REQUIRE(au);
  auto au_prefill = run(prefill, o);
  REQUIRE(au_prefill);
  // lru stalls on every first write, 400 of them into holes; the cursors
  // have each run copied during the minute before it (once the share of
  // first writes that continue a cursor is learnt: the first two runs stall).
  CHECK(lru->stalls == 12100);
  CHECK(au->stalls <= au_prefill->stalls + 40);
  // The copy log lists every copy ahead.
  std::ifstream in(log);
  uint64_t lines = 0;
  for (std::string line; std::getline(in, line);) ++lines;
  CHECK(lines == au->copies);
  std::remove(log.c_str());
}

TEST_CASE("simulate: without free room a copy ahead replaces a speculative base worth less", "[simulator]") {
  std::vector<trace::Request> reqs;
  int64_t t = 1000 * kSec;
  auto write = [&](uint64_t s, int64_t dt) { reqs.push_back(segment_write(s, t += dt)); };
  // A short stream whose next segments are copied into the free room...
  for (uint64_t s = 100; s < 103; ++s) write(s, kSec / 10);
  // ...then, long after, a writer going on segment by segment: the pool
  // (32 segments) has no free room left by then, only those old copies.
  t += 1000 * kSec;
  for (uint64_t s = 400; s < 440; ++s) write(s, kSec / 5);
  Options o = base_options(7 * 86400);
  o.device_bytes = 1024 * kSeg;
  o.pool_capacity_bytes = 32 * kSeg;
  o.budget_bytes_per_s = 1024 * kSeg;
  o.policy = PolicyKind::kSequential;
  auto r = run(reqs, o);
  REQUIRE(r);
  CHECK(r->speculative_replaced > 0);
  // Copies into the old copies' places save the writer a third of its
  // stalls (41 in all without them: every write but two of the writer's).
  CHECK(r->stalls <= 32);
  CHECK(r->pool_peak_bytes <= o.pool_capacity_bytes);
}

TEST_CASE("simulate: bad options are refused", "[simulator]") {
  std::vector<trace::Request> reqs(1);
  reqs[0].op = trace::Op::kWrite;
  reqs[0].offset = 10 * kSeg;
  reqs[0].length = 4096;
  Options o = base_options(60);
  o.device_bytes = 4 * kSeg;
  auto r = run(reqs, o);
  REQUIRE_FALSE(r);
  CHECK(r.status().message().find("past the device size") != std::string::npos);
  o.device_bytes = 0;
  o.segment_bytes = 3000;
  CHECK_FALSE(run(reqs, o));
  o.segment_bytes = kSeg;
  o.pool_capacity_bytes = kSeg;
  r = run(reqs, o);
  REQUIRE_FALSE(r);
  CHECK(r.status().message().find("four segments") != std::string::npos);
}

TEST_CASE("tune: history records become requests spread over their bucket", "[tune]") {
  std::vector<HistoryRecord> h = {{600, 3, 2, 4, 8192, 16384}, {660, 5, 0, 1, 0, 100}};
  auto reqs = tune::requests_of(h, 60, kSeg, 1000);
  REQUIRE(reqs.size() == 7);
  for (size_t i = 1; i < reqs.size(); ++i) CHECK(reqs[i - 1].time_ns <= reqs[i].time_ns);
  size_t writes = 0;
  for (const auto& q : reqs) {
    if (q.op == trace::Op::kWrite) ++writes;
    CHECK(q.time_ns >= 600 * kSec);
    CHECK(q.time_ns < 720 * kSec);
  }
  CHECK(writes == 5);
  CHECK(reqs.back().offset == 5 * kSeg);
  CHECK(reqs.back().length == 100);
  // The newest records first when there are too many.
  auto newest = tune::requests_of(h, 60, kSeg, 1);
  REQUIRE(newest.size() == 1);
  CHECK(newest[0].offset == 5 * kSeg);
}

TEST_CASE("tune: max versions follow the pool's room; a run never ends worse and drops wasted copies",
          "[tune]") {
  tune::Input in;
  in.sim.segment_bytes = kSeg;
  in.pool_bytes = 1000ull * kSeg;
  in.journal_bytes = 200ull * kSeg;
  in.segments_with_history = 10;
  in.mean_version_bytes = kSeg;
  CHECK(tune::fit_max_versions(in) == 40);  // (1000 - 200) / 2 / 10
  in.segments_with_history = 1000;
  CHECK(tune::fit_max_versions(in) == 2);
  // A stream of 40 segments every 10 minutes into the same area: copying far
  // ahead of it only wastes bytes.
  for (int period = 0; period < 6; ++period) {
    for (uint64_t s = 0; s < 40; ++s) {
      in.history.push_back({period * 600 + static_cast<int64_t>(s / 10) * 60, 100 + s, 0, 4, 0, 4 * kSeg / 4});
    }
  }
  std::sort(in.history.begin(), in.history.end(),
            [](const auto& a, const auto& b) { return a.bucket_start_s < b.bucket_start_s; });
  in.sim.device_bytes = 1024ull * kSeg;
  in.sim.pool_capacity_bytes = 4096ull * kSeg;
  in.sim.budget_bytes_per_s = 64 * kSeg;
  in.sim.retention_s = 300;
  in.sim.policy = PolicyKind::kAuto;
  // A run cancelled (the daemon stopping) ends at once, applying nothing.
  std::atomic<bool> cancel{true};
  in.cancel = &cancel;
  auto cancelled = tune::run(in);
  REQUIRE_FALSE(cancelled);
  CHECK(cancelled.status().code() == Status::Code::kShutdown);
  in.cancel = nullptr;
  auto out = tune::run(in);
  REQUIRE(out);
  CHECK(out->requests == 6 * 40 * 4);
  CHECK(out->trials.size() > 8);
  CHECK(out->stalls_after <= out->stalls_before);
  CHECK(out->changed);
  CHECK(out->copied_after < out->copied_before);
}

}  // namespace
}  // namespace shadowd::sim
