// The ewma and sequential predictors, the ensemble and the policies on
// synthetic series with known answers.
#include "core/policy.h"
#include "core/predict.h"

#include <catch2/catch.hpp>

namespace shadowd::predict {
namespace {

constexpr int64_t kSec = 1'000'000'000;

TEST_CASE("ewma: a steady writer is forecast at its rate; a silent one fades", "[predict]") {
  Params p;
  auto m = make_ewma(p);
  int64_t t = 1000 * kSec;
  // Segment 7: 2 writes per second for 20 minutes.
  for (int i = 0; i < 2400; ++i, t += kSec / 2) m->observe(7, Op::kWrite, t);
  const double f = m->forecast(7, t, 60);
  // 120 expected in a minute: the largest of the rates, all near 2/s now.
  CHECK(f == Approx(120).epsilon(0.1));
  CHECK(m->forecast(8, t, 60) == 0);
  // An hour of silence: the short rates are gone, the day-long one remains small.
  const double later = m->forecast(7, t + 3600 * kSec, 60);
  CHECK(later < 5);
  CHECK(later > 0);
  std::vector<std::pair<double, uint64_t>> out;
  m->nominate(t, 60, 10, {}, out);
  REQUIRE(out.size() == 1);
  CHECK(out[0].second == 7);
}

TEST_CASE("ewma: a step from 1/s to 10/s is followed within a minute", "[predict]") {
  Params p;
  auto m = make_ewma(p);
  int64_t t = 0;
  for (int i = 0; i < 600; ++i, t += kSec) m->observe(3, Op::kWrite, t);
  for (int i = 0; i < 600; ++i, t += kSec / 10) m->observe(3, Op::kWrite, t);
  // The 10 s rate has caught up: 10/s.
  CHECK(m->forecast(3, t, 1) == Approx(10).epsilon(0.1));
}

// A sequential model (no frontier) that saw segments 100..109 written in
// order, one every 0.1 s from t (advanced past the last). Ten writes are too
// few (< 64) to weigh fresh writes: the stream alone nominates.
std::unique_ptr<Predictor> stream_100_to_109(uint32_t seq_ahead, int64_t& t) {
  Params p;
  p.seq_ahead = seq_ahead;
  p.frontier_ahead = 0;
  auto m = make_sequential(p);
  for (uint64_t s = 100; s < 110; ++s, t += kSec / 10) m->observe(s, Op::kWrite, t);
  return m;
}

TEST_CASE("sequential: a stream nominates the segments after its head, nearest first", "[predict]") {
  int64_t t = 50 * kSec;
  auto m = stream_100_to_109(4, t);
  std::vector<std::pair<double, uint64_t>> out;
  m->nominate(t, 60, 16, {}, out);
  REQUIRE(out.size() == 4);
  CHECK(out[0].second == 110);
  CHECK(out[1].second == 111);
  CHECK(out[3].second == 113);
  CHECK(out[0].first > out[1].first);
  CHECK(m->forecast(110, t, 60) > 0.8);
  CHECK(m->forecast(120, t, 60) == 0);
  // A stream silent for longer than the gap is dormant: still nominated,
  // with less confidence; after its dormant time it is over.
  const double live = out[0].first;
  out.clear();
  m->tick(t + 60 * kSec);
  m->nominate(t + 60 * kSec, 60, 16, {}, out);
  REQUIRE(out.size() == 4);
  CHECK(out[0].second == 110);
  CHECK(out[0].first < live / 2);
  // Covered segments are left out: the next uncovered ones come instead.
  out.clear();
  m->nominate(t + 60 * kSec, 60, 16, [](uint64_t s) { return s == 110 || s == 111; }, out);
  REQUIRE(out.size() == 2);
  CHECK(out[0].second == 112);
  out.clear();
  m->tick(t + 700 * kSec);
  m->nominate(t + 700 * kSec, 60, 16, {}, out);
  CHECK(out.empty());
}

TEST_CASE("sequential: when the head moves on, covered ground is not skipped past", "[predict]") {
  int64_t t = 50 * kSec;
  auto m = stream_100_to_109(8, t);
  const auto covered = [](uint64_t s) { return s >= 110 && s <= 114; };
  std::vector<std::pair<double, uint64_t>> out;
  m->nominate(t, 60, 1, covered, out);  // remembers that 110..114 are covered
  REQUIRE(out.size() == 1);
  CHECK(out[0].second == 115);
  // The stream writes 110; 111..114 are still covered: the first one it
  // offers is 115 (the memo follows the head; kept as it was, it hid 115
  // until its rescan 10 s later).
  m->observe(110, Op::kWrite, t += kSec / 10);
  out.clear();
  m->nominate(t, 60, 1, covered, out);
  REQUIRE(out.size() == 1);
  CHECK(out[0].second == 115);
  // The head runs past the covered ground: the next segment is offered.
  for (uint64_t s = 111; s <= 115; ++s) m->observe(s, Op::kWrite, t += kSec / 10);
  out.clear();
  m->nominate(t, 60, 1, covered, out);
  REQUIRE(out.size() == 1);
  CHECK(out[0].second == 116);
}

TEST_CASE("sequential: first writes past the highest written segment teach it the frontier", "[predict]") {
  Params p;
  p.frontier_ahead = 64;
  auto m = make_sequential(p);
  int64_t t = kSec;
  // A file system filling a device from the start, one new segment a second
  // (no stream: each write is far from the one before in time).
  for (uint64_t s = 0; s < 100; ++s, t += 10 * kSec) m->observe(s, Op::kWrite, t);
  std::vector<std::pair<double, uint64_t>> out;
  m->nominate(t, 60, 8, {}, out);
  REQUIRE(out.size() == 8);
  CHECK(out[0].second == 100);
  CHECK(out[7].second == 107);
  CHECK(m->forecast(100, t, 60) > m->forecast(150, t, 60));
  CHECK(m->forecast(500, t, 60) == 0);
  // Random rewrites of old segments teach it nothing about the frontier...
  auto r = make_sequential(p);
  for (uint64_t i = 0; i < 100; ++i, t += 10 * kSec) r->observe((i * 7919 + 50000) % 100003, Op::kWrite, t);
  CHECK(r->forecast(100003, t, 60) < 0.1);
}

TEST_CASE("sequential: first writes into holes go on from where the last ones stopped", "[predict]") {
  Params p;
  p.frontier_ahead = 0;
  p.seq_ahead = 1;
  auto m = make_sequential(p);
  int64_t t = kSec;
  // A file system's device: segments 0..999 written, except the odd ones
  // from 100 to 399 (free space left by deleted files).
  for (uint64_t s = 0; s < 1000; ++s) {
    if (s < 100 || s >= 400 || s % 2 == 0) m->observe(s, Op::kWrite, t += kSec / 1000);
  }
  // New files fill the holes upwards, one run of three a minute: no stream
  // (each run starts two segments past the last), but a cursor.
  uint64_t next = 101;
  for (int run = 0; run < 20; ++run) {
    t += 60 * kSec;
    for (int i = 0; i < 3; ++i, next += 2) m->observe(next, Op::kWrite, t += kSec / 100);
  }
  m->tick(t + 30 * kSec);
  t += 30 * kSec;
  // next = 221: the never-written segments after the last first write,
  // nearest first, the written ones between them skipped.
  std::vector<std::pair<double, uint64_t>> out;
  m->nominate(t, 60, 4, {}, out);
  REQUIRE(out.size() == 4);
  CHECK(out[0].second == next);
  CHECK(out[1].second == next + 2);
  CHECK(out[3].second == next + 6);
  CHECK(out[0].first > out[3].first);
  CHECK(m->forecast(next, t, 60) > 0.01);
  CHECK(m->forecast(next + 1, t, 60) == 0);  // written: not a first write
  CHECK(m->forecast(next + 2 * 40, t, 60) == 0);  // beyond the cursor's 16 ahead
  // Covered ones are left out.
  out.clear();
  m->nominate(t, 60, 2, [&](uint64_t s) { return s == next; }, out);
  REQUIRE(out.size() == 2);
  CHECK(out[0].second == next + 2);
  // A cursor quiet for longer than seq_dormant_s nominates nothing.
  out.clear();
  m->nominate(t + 700 * kSec, 60, 4, {}, out);
  CHECK(out.empty());
}

TEST_CASE("sequential: the segments after the freshest writes come first, for a few seconds", "[predict]") {
  Params p;
  p.frontier_ahead = 0;
  auto m = make_sequential(p);
  auto random_only = make_sequential(p);
  int64_t t = 100 * kSec;
  // A writer that goes on from where it wrote (the share of writes just
  // after a young one is learnt from it), then scattered single writes a
  // second apart, the last one to segment 5000.
  for (uint64_t s = 0; s < 200; ++s) m->observe(10000 + s, Op::kWrite, t += kSec / 100);
  for (uint64_t i = 0; i < 40; ++i) {
    t += kSec;
    m->observe((i * 7919) % 4000, Op::kWrite, t);
    random_only->observe((i * 7919) % 4000 + 100 * i, Op::kWrite, t);
  }
  t += kSec;
  m->observe(5000, Op::kWrite, t);
  std::vector<std::pair<double, uint64_t>> out;
  m->nominate(t, 60, 4, {}, out);
  REQUIRE(out.size() == 4);
  CHECK(out[0].second == 5001);
  CHECK(out[1].second == 5002);
  // Covered segments are left out.
  out.clear();
  m->nominate(t, 60, 1, [](uint64_t s) { return s == 5001; }, out);
  REQUIRE(out.size() == 1);
  CHECK(out[0].second == 5002);
  // Ranked above the other sources, forecast as at most one write; the
  // weight falls with the age of the write, and is gone after the gap.
  const double now = m->rank(5001, t, 60);
  CHECK(now > 1);
  CHECK(m->forecast(5001, t, 60) <= 1);
  CHECK(m->rank(5001, t + 2 * kSec, 60) < now / 5);
  CHECK(m->rank(5001, t + 6 * kSec, 60) == 0);
  CHECK(m->rank(5009, t, 60) < 1);  // beyond the 8 after it: the stream's guess only
  // Writes that never land just after a young one teach it nothing.
  for (uint64_t i = 0; i < 100; ++i) random_only->observe((i * 7919) % 100003 + 200000, Op::kWrite, t += kSec / 100);
  CHECK(random_only->rank((99 * 7919) % 100003 + 200001, t, 60) < 1);
}

TEST_CASE("sequential: segments read then written are learned; reads then nominate", "[predict]") {
  Params p;
  auto m = make_sequential(p);
  int64_t t = kSec;
  // Read-modify-write on scattered segments, 200 times.
  for (uint64_t i = 0; i < 200; ++i, t += kSec / 10) {
    const uint64_t s = (i * 7919) % 10000;
    m->observe(s, Op::kRead, t);
    m->observe(s, Op::kWrite, t + kSec / 20);
  }
  m->observe(4242, Op::kRead, t);
  CHECK(m->forecast(4242, t, 60) > 0.9);
  std::vector<std::pair<double, uint64_t>> out;
  m->nominate(t, 60, 1024, {}, out);  // after the segments next to the last writes
  bool found = false;
  for (auto& [f, s] : out) found = found || s == 4242;
  CHECK(found);
}

TEST_CASE("predictors keep state for at most max_segments", "[predict]") {
  Params p;
  p.max_segments = 100;
  for (const char* name : {"ewma", "sequential", "auto"}) {
    auto m = make(name, p);
    REQUIRE(m);
    int64_t t = 0;
    for (uint64_t s = 0; s < 1000; ++s, t += kSec / 100) {
      (*m)->observe(s * 3, Op::kWrite, t);
      (*m)->observe(s * 3 + 1, Op::kRead, t);
      if (s % 50 == 0) (*m)->tick(t);
    }
    (*m)->tick(t);
    INFO(name);
    // Sequential keeps recent reads (bounded by max_segments) and streams.
    CHECK((*m)->active_segments() <= p.max_segments + p.seq_max_streams);
    CHECK((*m)->memory_bytes() < 100 * 1024);
  }
  CHECK_FALSE(make("nope", p));
}

TEST_CASE("policies: names round-trip; the oracle is not for the daemon", "[predict]") {
  for (auto n : policy_names()) {
    auto k = parse_policy(n);
    REQUIRE(k);
    CHECK(policy_name(*k) == n);
  }
  CHECK_FALSE(parse_policy("belady"));
  PolicyParams pp;
  CHECK_FALSE(make_policy(PolicyKind::kOracle, pp, nullptr));
  CHECK_FALSE(make_policy(PolicyKind::kPriority, pp, nullptr));
  auto none = make_policy(PolicyKind::kNone, pp, nullptr);
  REQUIRE(none);
  CHECK_FALSE((*none)->keeps_bases());
  auto lru = make_policy(PolicyKind::kLru, pp, nullptr);
  REQUIRE(lru);
  (*lru)->observe(Op::kWrite, 1, 5 * kSec);
  (*lru)->observe(Op::kRead, 2, 9 * kSec);
  CHECK((*lru)->value(2, 10 * kSec) > (*lru)->value(1, 10 * kSec));
  auto heat = make_policy(PolicyKind::kHeat, pp, nullptr);
  REQUIRE(heat);
  for (int i = 0; i < 3; ++i) (*heat)->observe(Op::kWrite, 1, i * kSec);
  (*heat)->observe(Op::kWrite, 2, 9 * kSec);
  CHECK((*heat)->value(1, 10 * kSec) > (*heat)->value(2, 10 * kSec));
}

TEST_CASE("policies measure each predictor's forecast error", "[predict]") {
  PolicyParams pp;
  auto pol = make_policy(PolicyKind::kAuto, pp, nullptr);
  REQUIRE(pol);
  CHECK((*pol)->forecast_errors().empty());
  int64_t t = 1000 * kSec;
  // Segment 5 written once a second for five minutes: ewma learns the rate
  // and forecasts the next minute's 60 writes closely; the sequential model
  // forecasts none.
  for (int i = 0; i < 300; ++i, t += kSec) {
    (*pol)->observe(Op::kWrite, 5, t);
    (*pol)->tick(t);
  }
  const auto errs = (*pol)->forecast_errors();
  REQUIRE(errs.size() == 2);
  CHECK(errs[0].predictor == "sequential");
  CHECK(errs[1].predictor == "ewma");
  CHECK(errs[1].samples >= 3);
  CHECK(errs[1].mae < 1);  // over the sample: segment 5 and the stream's idle neighbours
  CHECK(errs[0].mae > 3 * errs[1].mae);  // it misses segment 5's 60 writes a minute
  auto lru = make_policy(PolicyKind::kLru, pp, nullptr);
  REQUIRE(lru);
  CHECK((*lru)->forecast_errors().empty());
}

}  // namespace
}  // namespace shadowd::predict
