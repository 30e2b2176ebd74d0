// Unit tests for the per-segment monitor (core/monitor.h), its clock and the
// MonitoredBackend layer. Time only moves through a ManualClock: no sleeps.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <thread>
#include <vector>

#include "core/clock.h"
#include "core/memory_backend.h"
#include "core/monitor.h"
#include "core/monitored_backend.h"
#include "tests/unit/test_util.h"

namespace shadowd {
namespace {

constexpr uint32_t kSeg = 64 * 1024;
constexpr int64_t kNsPerS = 1'000'000'000;
// A start time aligned to the hour (and so to every bucket length used here).
constexpr int64_t kStart = 1'699'999'200;
static_assert(kStart % 3600 == 0);
constexpr uint32_t kHour = 3600, kDay = 86400, kWeek = 604800;

MonitorConfig config(uint64_t device_bytes, uint32_t segment_bytes = kSeg) {
  MonitorConfig c;
  c.device_bytes = device_bytes;
  c.segment_bytes = segment_bytes;
  return c;
}

MonitorConfig with_history_max(MonitorConfig c, uint64_t records) {
  c.history_max_records = records;
  return c;
}

// The stats of window `seconds` in a report (which must carry it).
WindowStats in_window(const SegmentReport& r, uint32_t seconds) {
  for (const WindowStats& w : r.windows) {
    if (w.window_seconds == seconds) return w;
  }
  FAIL("window " << seconds << " s not in the report");
  return {};
}

uint64_t reads_in(const Monitor& m, uint64_t id, uint32_t window = kHour) {
  return in_window(m.segment(id), window).reads;
}

std::vector<uint64_t> ids_of(const std::vector<SegmentReport>& v) {
  std::vector<uint64_t> ids;
  for (const auto& r : v) ids.push_back(r.id);
  return ids;
}

std::vector<uint64_t> top_ids(const Monitor& m, size_t n, TopBy by, uint32_t window = kHour) {
  auto top = m.top(n, by, window);
  REQUIRE(top.is_ok());
  return ids_of(*top);
}

void advance_s(ManualClock& clock, int64_t s) { clock.advance_ns(s * kNsPerS); }

// Per-segment expectations computed independently of the monitor: every
// segment is checked for overlap with the (clipped) request.
struct Expected {
  uint64_t reads = 0, writes = 0, bytes_read = 0, bytes_written = 0;
};

struct Model {
  uint64_t device_bytes;
  uint64_t segment_bytes;
  std::vector<Expected> seg;

  Model(uint64_t dev, uint64_t sb) : device_bytes(dev), segment_bytes(sb),
                                     seg((dev + sb - 1) / sb) {}

  void record(AccessOp op, uint64_t offset, uint64_t length) {
    const uint64_t end = offset + std::min(length, device_bytes);  // no overflow here
    for (uint64_t s = 0; s < seg.size(); ++s) {
      const uint64_t lo = std::max(offset, s * segment_bytes);
      const uint64_t hi = std::min({end, (s + 1) * segment_bytes, device_bytes});
      if (length == 0 || lo >= hi) continue;
      if (op == AccessOp::kRead) {
        ++seg[s].reads;
        seg[s].bytes_read += hi - lo;
      } else {
        ++seg[s].writes;
        seg[s].bytes_written += hi - lo;
      }
    }
  }
};

void require_matches(const Monitor& m, const Model& model, uint64_t times = 1) {
  REQUIRE(m.segment_count() == model.seg.size());
  for (uint64_t id = 0; id < model.seg.size(); ++id) {
    CAPTURE(id);
    const WindowStats w = in_window(m.segment(id), kHour);
    REQUIRE(w.reads == model.seg[id].reads * times);
    REQUIRE(w.writes == model.seg[id].writes * times);
    REQUIRE(w.bytes_read == model.seg[id].bytes_read * times);
    REQUIRE(w.bytes_written == model.seg[id].bytes_written * times);
  }
}

// A fixed workload of `n` requests over a device of `dev` bytes: mixed
// sizes, some crossing segment boundaries, some running past the end.
template <typename Fn>
void workload(uint64_t seed, int n, uint64_t dev, Fn&& fn) {
  std::mt19937_64 rng(seed);
  for (int i = 0; i < n; ++i) {
    const AccessOp op = rng() % 3 == 0 ? AccessOp::kWrite : AccessOp::kRead;
    const uint64_t offset = rng() % dev;
    const uint64_t length = rng() % 8 == 0 ? rng() % (3 * kSeg) : 512 * (1 + rng() % 16);
    fn(op, offset, length);
  }
}

TEST_CASE("monitor: config validation", "[monitor]") {
  MonitorConfig c = config(1 << 20);
  REQUIRE(c.validate().is_ok());
  for (uint32_t bad : {0u, 32u << 10, 96u << 10, 2u << 20}) {
    c.segment_bytes = bad;
    CAPTURE(bad);
    REQUIRE_FALSE(c.validate().is_ok());
  }
  c.segment_bytes = 1u << 20;
  REQUIRE(c.validate().is_ok());
  c.window_seconds = {90};  // not a multiple of the 60 s bucket
  REQUIRE_FALSE(c.validate().is_ok());
  c.window_seconds = {};
  REQUIRE_FALSE(c.validate().is_ok());
}

TEST_CASE("monitor: a request counts once for each segment it spans, bytes split by overlap",
          "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  Monitor m(config(10 * kSeg), clock);
  REQUIRE(m.segment_count() == 10);

  // 100 bytes of segment 0, all of segment 1, 50 bytes of segment 2.
  m.record(AccessOp::kRead, kSeg - 100, 100 + kSeg + 50);
  const auto s0 = in_window(m.segment(0), kHour);
  const auto s1 = in_window(m.segment(1), kHour);
  const auto s2 = in_window(m.segment(2), kHour);
  REQUIRE(s0.reads == 1);
  REQUIRE(s1.reads == 1);
  REQUIRE(s2.reads == 1);
  REQUIRE(s0.bytes_read == 100);
  REQUIRE(s1.bytes_read == kSeg);
  REQUIRE(s2.bytes_read == 50);
  REQUIRE(in_window(m.segment(3), kHour).reads == 0);
  REQUIRE(s0.writes == 0);

  advance_s(clock, 7);
  m.record(AccessOp::kWrite, 2 * kSeg + kSeg / 2, kSeg);  // half of 2, half of 3
  const auto w2 = in_window(m.segment(2), kHour);
  const auto w3 = in_window(m.segment(3), kHour);
  REQUIRE(w2.writes == 1);
  REQUIRE(w3.writes == 1);
  REQUIRE(w2.bytes_written == kSeg / 2);
  REQUIRE(w3.bytes_written == kSeg / 2);
  REQUIRE(w2.reads == 1);  // the earlier read is still there

  const SegmentReport r2 = m.segment(2);
  REQUIRE(r2.id == 2);
  REQUIRE(r2.offset == 2 * kSeg);
  REQUIRE(r2.length == kSeg);
  REQUIRE(r2.last_access_s == kStart + 7);
  REQUIRE(r2.last_write_s == kStart + 7);
  REQUIRE(m.segment(0).last_access_s == kStart);
  REQUIRE(m.segment(0).last_write_s == -1);
  REQUIRE(m.segment(9).last_access_s == -1);
  REQUIRE(m.segment(2).windows.size() == 3);
}

TEST_CASE("monitor: 1 MiB segments split a request the same way", "[monitor]") {
  constexpr uint32_t kMiB = 1u << 20;
  ManualClock clock(kStart * kNsPerS);
  Monitor m(config(4ull * kMiB, kMiB), clock);
  REQUIRE(m.segment_count() == 4);
  REQUIRE(m.segment_bytes() == kMiB);
  m.record(AccessOp::kWrite, kMiB - 4096, 3 * 4096);
  REQUIRE(in_window(m.segment(0), kHour).bytes_written == 4096);
  REQUIRE(in_window(m.segment(1), kHour).bytes_written == 2 * 4096);
  REQUIRE(in_window(m.segment(2), kHour).writes == 0);
}

TEST_CASE("monitor: last partial segment, clipping and zero length", "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  const uint64_t dev = 3 * kSeg + 1000;
  Monitor m(config(dev), clock);
  REQUIRE(m.segment_count() == 4);
  REQUIRE(m.segment(3).offset == 3 * kSeg);
  REQUIRE(m.segment(3).length == 1000);
  REQUIRE(m.segment(2).length == kSeg);

  SECTION("the partial segment counts what lies inside the device") {
    m.record(AccessOp::kRead, 3 * kSeg, 1000);
    REQUIRE(in_window(m.segment(3), kHour).bytes_read == 1000);
  }
  SECTION("a range past the end is clipped") {
    m.record(AccessOp::kRead, 3 * kSeg + 500, 1 << 20);
    const auto s3 = in_window(m.segment(3), kHour);
    REQUIRE(s3.reads == 1);
    REQUIRE(s3.bytes_read == 500);
  }
  SECTION("a huge length neither overflows nor reaches past the end") {
    m.record(AccessOp::kWrite, 0, std::numeric_limits<uint64_t>::max());
    for (uint64_t id = 0; id < 4; ++id) {
      const auto s = in_window(m.segment(id), kHour);
      REQUIRE(s.writes == 1);
      REQUIRE(s.bytes_written == m.segment(id).length);
    }
    m.record(AccessOp::kWrite, 2 * kSeg + 1, std::numeric_limits<uint64_t>::max() - 5);
    REQUIRE(in_window(m.segment(2), kHour).bytes_written == kSeg + kSeg - 1);
    REQUIRE(in_window(m.segment(3), kHour).bytes_written == 2000);
  }
  SECTION("zero length and offsets at or past the end are ignored") {
    m.record(AccessOp::kRead, 0, 0);
    m.record(AccessOp::kWrite, kSeg, 0);
    m.record(AccessOp::kRead, dev, 4096);
    m.record(AccessOp::kWrite, dev + kSeg, 4096);
    m.record(AccessOp::kRead, std::numeric_limits<uint64_t>::max(), 1);
    for (uint64_t id = 0; id < 4; ++id) {
      const auto s = in_window(m.segment(id), kHour);
      REQUIRE(s.reads + s.writes == 0);
      REQUIRE(m.segment(id).last_access_s == -1);
    }
    REQUIRE(m.history().empty());
    auto top = m.top(10, TopBy::kReads, kHour);
    REQUIRE(top.is_ok());
    REQUIRE(top->empty());
  }
}

TEST_CASE("monitor: exact counts per segment for a known workload", "[monitor]") {
  const uint64_t dev = 37 * kSeg + 12345;
  ManualClock clock(kStart * kNsPerS);
  Monitor m(config(dev), clock);
  Model model(dev, kSeg);
  workload(42, 2000, dev + kSeg, [&](AccessOp op, uint64_t off, uint64_t len) {
    m.record(op, off, len);
    model.record(op, off, len);
  });
  require_matches(m, model);

  // Rolling moves the counts into the windows without changing them.
  advance_s(clock, 60);
  REQUIRE(m.roll());
  require_matches(m, model);

  // top() by reads lists every read segment, most reads first, ties by id.
  std::vector<std::pair<uint64_t, uint64_t>> by_reads;  // (-reads, id)
  for (uint64_t id = 0; id < model.seg.size(); ++id) {
    const Expected& e = model.seg[id];
    if (e.reads + e.writes > 0) by_reads.emplace_back(e.reads, id);
  }
  std::sort(by_reads.begin(), by_reads.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  std::vector<uint64_t> want;
  for (const auto& [reads, id] : by_reads) want.push_back(id);
  REQUIRE(top_ids(m, 1000, TopBy::kReads) == want);
}

TEST_CASE("monitor: exact totals from 4 threads recording concurrently", "[monitor]") {
  const uint64_t dev = 64 * kSeg + 777;
  ManualClock clock(kStart * kNsPerS);
  Monitor m(config(dev), clock);
  Model model(dev, kSeg);
  constexpr int kThreads = 4, kOps = 5000;
  workload(7, kOps, dev, [&](AccessOp op, uint64_t off, uint64_t len) {
    model.record(op, off, len);
  });
  // Every thread replays the same workload.
  auto record_from_threads = [&] {
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&] {
        workload(7, kOps, dev, [&](AccessOp op, uint64_t off, uint64_t len) {
          m.record(op, off, len);
        });
      });
    }
    for (auto& th : threads) th.join();
  };

  SECTION("no roll in between: every counter is exact") {
    record_from_threads();
    require_matches(m, model, kThreads);
  }

  SECTION("with a roller moving time: counts over history and window stay exact") {
    std::atomic<bool> stop{false};
    std::thread roller([&] {
      // 40 buckets at most: everything stays inside the 1 h window.
      for (int i = 0; i < 40 && !stop.load(); ++i) {
        advance_s(clock, 60);
        m.roll();
        std::this_thread::yield();
      }
    });
    record_from_threads();
    stop = true;
    roller.join();

    std::map<uint64_t, std::pair<uint64_t, uint64_t>> from_history;  // id -> (reads, writes)
    for (const HistoryRecord& r : m.history()) {
      from_history[r.segment].first += r.reads;
      from_history[r.segment].second += r.writes;
    }
    for (uint64_t id = 0; id < model.seg.size(); ++id) {
      CAPTURE(id);
      const WindowStats w = in_window(m.segment(id), kHour);
      REQUIRE(w.reads == kThreads * model.seg[id].reads);
      REQUIRE(w.writes == kThreads * model.seg[id].writes);
      REQUIRE(from_history[id].first == kThreads * model.seg[id].reads);
      REQUIRE(from_history[id].second == kThreads * model.seg[id].writes);
    }
  }
}

TEST_CASE("monitor: the open bucket is included in queries before any roll", "[monitor]") {
  // Started 25 s into a bucket: the open bucket starts at kStart.
  ManualClock clock((kStart + 25) * kNsPerS);
  Monitor m(config(8 * kSeg), clock);
  m.record(AccessOp::kRead, 3 * kSeg, 4096);
  m.record(AccessOp::kRead, 3 * kSeg, 4096);
  m.record(AccessOp::kWrite, 5 * kSeg, 512);

  REQUIRE(reads_in(m, 3) == 2);
  REQUIRE(in_window(m.segment(5), kWeek).writes == 1);
  REQUIRE(top_ids(m, 10, TopBy::kReads) == std::vector<uint64_t>{3, 5});
  REQUIRE(top_ids(m, 10, TopBy::kWrites, kDay) == std::vector<uint64_t>{5, 3});

  const auto h = m.history();
  REQUIRE(h.size() == 2);
  REQUIRE(h[0].bucket_start_s == kStart);
  REQUIRE(h[0].segment == 3);
  REQUIRE(h[0].reads == 2);
  REQUIRE(h[0].writes == 0);
  REQUIRE(h[0].bytes_read == 8192);
  REQUIRE(h[1].segment == 5);
  REQUIRE(h[1].writes == 1);
  REQUIRE(h[1].bytes_written == 512);
  // Nothing is closed yet.
  REQUIRE(m.totals().history_records == 0);
  REQUIRE(m.totals().oldest_history_s == -1);
  REQUIRE(m.totals().started_s == kStart + 25);
}

// Collects what the monitor hands to its history writer.
class CollectingSink final : public Monitor::HistorySink {
 public:
  void append(const HistoryRecord& r) override { records.push_back(r); }
  std::vector<HistoryRecord> records;
};

bool same(const HistoryRecord& a, const HistoryRecord& b) {
  return a.bucket_start_s == b.bucket_start_s && a.segment == b.segment && a.reads == b.reads &&
         a.writes == b.writes && a.bytes_read == b.bytes_read && a.bytes_written == b.bytes_written;
}

TEST_CASE("monitor: roll() closes a bucket only when its time is over", "[monitor]") {
  ManualClock clock((kStart + 25) * kNsPerS);
  Monitor m(config(8 * kSeg), clock);
  CollectingSink sink;
  m.set_history_sink(&sink);

  m.record(AccessOp::kRead, 0, 4096);
  REQUIRE_FALSE(m.roll());
  clock.set_ns((kStart + 59) * kNsPerS + kNsPerS - 1);  // 59.999999999 s
  REQUIRE_FALSE(m.roll());
  REQUIRE(sink.records.empty());
  clock.set_ns((kStart + 60) * kNsPerS);
  REQUIRE(m.roll());
  REQUIRE_FALSE(m.roll());  // the new bucket has just opened

  REQUIRE(sink.records.size() == 1);
  REQUIRE(sink.records[0].bucket_start_s == kStart);
  REQUIRE(sink.records[0].segment == 0);
  REQUIRE(sink.records[0].reads == 1);
  REQUIRE(reads_in(m, 0) == 1);  // moved to the windows, not lost
  REQUIRE(m.totals().history_records == 1);
  REQUIRE(m.totals().oldest_history_s == kStart);

  // A late roll closes the open bucket under its own start, and the next
  // bucket opens at the start of the current one.
  m.record(AccessOp::kWrite, 2 * kSeg, 100);
  m.record(AccessOp::kWrite, 7 * kSeg, 100);
  advance_s(clock, 150);  // now kStart + 210
  REQUIRE(m.roll());
  m.record(AccessOp::kRead, kSeg, 1);
  const auto h = m.history();
  REQUIRE(h.size() == 4);
  REQUIRE(h[0].bucket_start_s == kStart);
  REQUIRE(h[1].bucket_start_s == kStart + 60);
  REQUIRE(h[1].segment == 2);
  REQUIRE(h[2].bucket_start_s == kStart + 60);
  REQUIRE(h[2].segment == 7);
  REQUIRE(h[3].bucket_start_s == kStart + 180);  // the open bucket
  REQUIRE(h[3].segment == 1);
  REQUIRE_FALSE(m.roll());
  advance_s(clock, 29);  // kStart + 239
  REQUIRE_FALSE(m.roll());
  advance_s(clock, 1);
  REQUIRE(m.roll());

  // The sink received every closed record, exactly as history() keeps it.
  const auto closed = m.history();
  REQUIRE(sink.records.size() == closed.size());
  for (size_t i = 0; i < closed.size(); ++i) REQUIRE(same(sink.records[i], closed[i]));

  // No sink, no calls; an empty bucket rolls without records.
  m.set_history_sink(nullptr);
  m.record(AccessOp::kRead, 0, 1);
  advance_s(clock, 60);
  REQUIRE(m.roll());
  REQUIRE(sink.records.size() == 4);
  advance_s(clock, 60);
  REQUIRE(m.roll());
  REQUIRE(m.totals().history_records == 5);
}

TEST_CASE("monitor: counts leave the 1 h window after an hour and stay in 1 d", "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  Monitor m(config(4 * kSeg), clock);
  m.record(AccessOp::kRead, 0, 4096);
  m.record(AccessOp::kWrite, 0, 4096);
  advance_s(clock, 60);
  REQUIRE(m.roll());

  clock.set_ns((kStart + 59 * 60) * kNsPerS);  // +59 min
  REQUIRE(reads_in(m, 0, kHour) == 1);
  REQUIRE(top_ids(m, 5, TopBy::kReads, kHour) == std::vector<uint64_t>{0});

  // The boundary: the bucket [kStart, kStart + 60) counts while any part of
  // it is inside [now - 1 h, now], i.e. until now - 3600 reaches its end.
  clock.set_ns((kStart + 3659) * kNsPerS);
  REQUIRE(reads_in(m, 0, kHour) == 1);
  clock.set_ns((kStart + 3660) * kNsPerS);
  REQUIRE(reads_in(m, 0, kHour) == 0);
  REQUIRE(in_window(m.segment(0), kHour).writes == 0);
  REQUIRE(top_ids(m, 5, TopBy::kReads, kHour).empty());

  // Still in the day and the week, and still in the history.
  REQUIRE(reads_in(m, 0, kDay) == 1);
  REQUIRE(in_window(m.segment(0), kDay).writes == 1);
  REQUIRE(reads_in(m, 0, kWeek) == 1);
  REQUIRE(top_ids(m, 5, TopBy::kReads, kDay) == std::vector<uint64_t>{0});
  REQUIRE(m.history().size() == 1);
  REQUIRE(m.totals().segments_active == 1);

  clock.set_ns((kStart + kDay + 59) * kNsPerS);
  REQUIRE(reads_in(m, 0, kDay) == 1);
  clock.set_ns((kStart + kDay + 60) * kNsPerS);
  REQUIRE(reads_in(m, 0, kDay) == 0);
  REQUIRE(reads_in(m, 0, kWeek) == 1);
  clock.set_ns((kStart + kWeek + 60) * kNsPerS);
  REQUIRE(reads_in(m, 0, kWeek) == 0);
  REQUIRE(m.totals().segments_active == 0);
}

TEST_CASE("monitor: a bucket closed late still leaves the window on time", "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  Monitor m(config(4 * kSeg), clock);
  m.record(AccessOp::kRead, kSeg, 1);
  clock.set_ns((kStart + 2 * kHour) * kNsPerS);  // the roller was away for 2 h
  REQUIRE(m.roll());
  REQUIRE(reads_in(m, 1, kHour) == 0);
  REQUIRE(reads_in(m, 1, kDay) == 1);
}

TEST_CASE("monitor: rates are count / window seconds", "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  Monitor m(config(4 * kSeg), clock);
  for (int i = 0; i < 36; ++i) m.record(AccessOp::kRead, 0, 512);
  for (int i = 0; i < 18; ++i) m.record(AccessOp::kWrite, 0, 512);
  advance_s(clock, 60);
  REQUIRE(m.roll());
  m.record(AccessOp::kWrite, 0, 512);  // open bucket counts too: 36 reads, 19 writes

  const SegmentReport r = m.segment(0);
  for (uint32_t w : {kHour, kDay, kWeek}) {
    CAPTURE(w);
    const WindowStats s = in_window(r, w);
    REQUIRE(s.window_seconds == w);
    REQUIRE(s.access_rate == Approx(55.0 / w).epsilon(1e-12));
    REQUIRE(s.change_rate == Approx(19.0 / w).epsilon(1e-12));
  }
  REQUIRE(in_window(m.segment(1), kHour).access_rate == 0.0);
}

TEST_CASE("monitor: priority follows the documented formula", "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  Monitor m(config(4 * kSeg), clock);
  const PriorityParams defaults = m.priority();
  REQUIRE(defaults.scoring_window_seconds == kHour);

  PriorityParams p;
  p.baseline = 5;
  p.alpha = 100;
  p.beta = 200;
  p.gamma = 0.5;
  p.scoring_window_seconds = kHour;
  REQUIRE(m.set_priority(p).is_ok());

  advance_s(clock, 100);  // segment 0 accessed at kStart + 100
  for (int i = 0; i < 10; ++i) m.record(AccessOp::kRead, 0, 512);
  for (int i = 0; i < 5; ++i) m.record(AccessOp::kWrite, 0, 512);
  advance_s(clock, 300);  // now kStart + 400

  const double seg0 = 5 + 100 * (15.0 / 3600) + 200 * (5.0 / 3600) - 0.5 * 300;
  REQUIRE(m.segment(0).priority == Approx(seg0).epsilon(1e-12));
  // Never accessed: time since the monitor started.
  const double never = 5 - 0.5 * 400;
  REQUIRE(m.segment(1).priority == Approx(never).epsilon(1e-12));

  // The same after a roll (counts now come from the window aggregates).
  REQUIRE(m.roll());
  REQUIRE(m.segment(0).priority == Approx(seg0).epsilon(1e-12));

  // Another scoring window divides by its own length.
  p.scoring_window_seconds = kDay;
  REQUIRE(m.set_priority(p).is_ok());
  const double seg0_day = 5 + 100 * (15.0 / 86400) + 200 * (5.0 / 86400) - 0.5 * 300;
  REQUIRE(m.segment(0).priority == Approx(seg0_day).epsilon(1e-12));
  auto top = m.top(1, TopBy::kPriority, kHour);
  REQUIRE(top.is_ok());
  REQUIRE(top->size() == 1);
  REQUIRE((*top)[0].priority == Approx(seg0_day).epsilon(1e-12));
}

TEST_CASE("monitor: set_priority changes the priority ranking", "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  Monitor m(config(8 * kSeg), clock);
  for (int i = 0; i < 100; ++i) m.record(AccessOp::kRead, 1 * kSeg, 512);
  for (int i = 0; i < 10; ++i) m.record(AccessOp::kWrite, 2 * kSeg, 512);
  m.record(AccessOp::kRead, 3 * kSeg, 512);

  // Defaults (alpha = beta = 1): the most accessed first.
  REQUIRE(top_ids(m, 10, TopBy::kPriority) == std::vector<uint64_t>{1, 2, 3});
  m.rescore();
  REQUIRE(m.top_k(10) == std::vector<uint64_t>{1, 2, 3});

  PriorityParams p = m.priority();
  p.alpha = 0;
  p.beta = 1e6;
  REQUIRE(m.set_priority(p).is_ok());
  REQUIRE(top_ids(m, 10, TopBy::kPriority) == std::vector<uint64_t>{2, 1, 3});
  // top_k() keeps the last ranking until the next rescore.
  REQUIRE(m.top_k(10) == std::vector<uint64_t>{1, 2, 3});
  m.rescore();
  REQUIRE(m.top_k(10) == std::vector<uint64_t>{2, 1, 3});
  REQUIRE(m.top_k(1) == std::vector<uint64_t>{2});

  // A large gamma favours what was touched last.
  advance_s(clock, 500);
  m.record(AccessOp::kRead, 3 * kSeg, 512);
  p.alpha = 1;
  p.beta = 1;
  p.gamma = 10;
  REQUIRE(m.set_priority(p).is_ok());
  REQUIRE(top_ids(m, 1, TopBy::kPriority) == std::vector<uint64_t>{3});
}

TEST_CASE("monitor: set_priority rejects bad values and changes nothing", "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  Monitor m(config(4 * kSeg), clock);
  m.record(AccessOp::kRead, 0, 512);
  advance_s(clock, 10);
  const PriorityParams before = m.priority();
  const double prio_before = m.segment(0).priority;

  auto unchanged = [&] {
    const PriorityParams now = m.priority();
    REQUIRE(now.baseline == before.baseline);
    REQUIRE(now.alpha == before.alpha);
    REQUIRE(now.beta == before.beta);
    REQUIRE(now.gamma == before.gamma);
    REQUIRE(now.scoring_window_seconds == before.scoring_window_seconds);
    REQUIRE(m.segment(0).priority == prio_before);
  };
  const double bad_values[] = {std::numeric_limits<double>::quiet_NaN(),
                               std::numeric_limits<double>::infinity(),
                               -std::numeric_limits<double>::infinity()};
  for (int field = 0; field < 4; ++field) {
    for (double bad : bad_values) {
      CAPTURE(field, bad);
      PriorityParams p = before;
      p.baseline = 7;  // a valid change that must not be applied either
      double* f[] = {&p.baseline, &p.alpha, &p.beta, &p.gamma};
      *f[field] = bad;
      const Status st = m.set_priority(p);
      REQUIRE_FALSE(st.is_ok());
      REQUIRE(st.code() == Status::Code::kInvalid);
      unchanged();
    }
  }
  PriorityParams p = before;
  p.alpha = 3;
  p.scoring_window_seconds = 7200;  // not configured
  REQUIRE(m.set_priority(p).code() == Status::Code::kInvalid);
  unchanged();
  p.scoring_window_seconds = 0;
  REQUIRE_FALSE(m.set_priority(p).is_ok());
  unchanged();
}

TEST_CASE("monitor: the scoring window defaults to 1 h, else the first window", "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  MonitorConfig c = config(4 * kSeg);
  c.window_seconds = {600, 7200};
  Monitor m(c, clock);
  REQUIRE(m.priority().scoring_window_seconds == 600);
}

TEST_CASE("monitor: set_windows rebuilds the aggregates from the history", "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  Monitor m(config(4 * kSeg), clock);
  m.record(AccessOp::kRead, 0, 512);  // bucket kStart
  advance_s(clock, 1800);
  REQUIRE(m.roll());
  m.record(AccessOp::kRead, 0, 512);  // bucket kStart + 1800
  m.record(AccessOp::kRead, 0, 512);
  advance_s(clock, 60);
  REQUIRE(m.roll());
  clock.set_ns((kStart + 3700) * kNsPerS);
  REQUIRE(m.roll());  // an empty bucket; the next one opens at kStart + 3660
  REQUIRE(reads_in(m, 0, kHour) == 2);
  REQUIRE(reads_in(m, 0, kDay) == 3);

  REQUIRE(m.set_windows({1800, kHour, 7200}).is_ok());
  REQUIRE(m.config().window_seconds == std::vector<uint32_t>{1800, kHour, 7200});
  const SegmentReport r = m.segment(0);
  REQUIRE(r.windows.size() == 3);
  REQUIRE(r.windows[0].window_seconds == 1800);
  REQUIRE(r.windows[0].reads == 0);  // [1800, 1860) ended before now - 1800 = 1900
  REQUIRE(r.windows[1].reads == 2);
  REQUIRE(r.windows[2].reads == 3);
  REQUIRE(r.windows[2].access_rate == Approx(3.0 / 7200).epsilon(1e-12));
  REQUIRE(top_ids(m, 5, TopBy::kReads, 7200) == std::vector<uint64_t>{0});
  REQUIRE(m.top(5, TopBy::kReads, kDay).status().code() == Status::Code::kInvalid);

  // New buckets land in the new windows.
  m.record(AccessOp::kRead, 0, 512);
  advance_s(clock, 60);
  REQUIRE(m.roll());
  REQUIRE(reads_in(m, 0, 1800) == 1);
  REQUIRE(reads_in(m, 0, 7200) == 4);

  SECTION("invalid lists are rejected and change nothing") {
    const std::vector<std::vector<uint32_t>> bad = {
        {},                                     // empty
        {60, 120, 180, 240, 300, 360, 420, 480, kHour},  // more than 8
        {90, kHour},                            // not a multiple of the bucket
        {30, kHour},                            // shorter than a bucket
        {kDay, kWeek},                          // drops the scoring window
    };
    for (const auto& list : bad) {
      CAPTURE(list);
      REQUIRE_FALSE(m.set_windows(list).is_ok());
      REQUIRE(m.config().window_seconds == std::vector<uint32_t>{1800, kHour, 7200});
      const SegmentReport again = m.segment(0);
      REQUIRE(again.windows.size() == 3);
      REQUIRE(again.windows[0].reads == 1);
      REQUIRE(again.windows[2].reads == 4);
    }
  }
  SECTION("the scoring window must be among the new windows") {
    PriorityParams p = m.priority();
    p.scoring_window_seconds = 7200;
    REQUIRE(m.set_priority(p).is_ok());
    REQUIRE_FALSE(m.set_windows({kHour}).is_ok());
    REQUIRE(m.set_windows({7200}).is_ok());
    REQUIRE(m.segment(0).windows.size() == 1);
  }
}

TEST_CASE("monitor: top() by reads and writes, ties by lower id, n and window checks",
          "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  Monitor m(config(16 * kSeg), clock);
  auto reads = [&](uint64_t id, int n) {
    for (int i = 0; i < n; ++i) m.record(AccessOp::kRead, id * kSeg, 512);
  };
  auto writes = [&](uint64_t id, int n) {
    for (int i = 0; i < n; ++i) m.record(AccessOp::kWrite, id * kSeg, 512);
  };
  reads(5, 3);
  reads(2, 3);
  reads(7, 4);
  reads(1, 1);
  writes(9, 2);
  writes(3, 2);
  writes(12, 5);
  advance_s(clock, 60);
  REQUIRE(m.roll());
  reads(1, 3);  // open bucket: segment 1 now has 4 reads, tying with 7

  REQUIRE(top_ids(m, 100, TopBy::kReads) == std::vector<uint64_t>{1, 7, 2, 5, 3, 9, 12});
  REQUIRE(top_ids(m, 3, TopBy::kReads) == std::vector<uint64_t>{1, 7, 2});
  REQUIRE(top_ids(m, 0, TopBy::kReads).empty());
  REQUIRE(top_ids(m, 100, TopBy::kWrites) == std::vector<uint64_t>{12, 3, 9, 1, 2, 5, 7});
  REQUIRE(top_ids(m, 2, TopBy::kWrites, kWeek) == std::vector<uint64_t>{12, 3});

  auto top = m.top(2, TopBy::kReads, kHour);
  REQUIRE(top.is_ok());
  REQUIRE((*top)[0].offset == 1 * kSeg);
  REQUIRE(in_window((*top)[0], kHour).reads == 4);

  for (uint32_t bad : {0u, 60u, 7200u}) {
    auto r = m.top(5, TopBy::kReads, bad);
    REQUIRE_FALSE(r.is_ok());
    REQUIRE(r.status().code() == Status::Code::kInvalid);
  }
}

TEST_CASE("monitor: rescore() and top_k()", "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  Monitor m(config(32 * kSeg), clock);
  REQUIRE(m.top_k(10).empty());
  m.rescore();
  REQUIRE(m.top_k(10).empty());  // nothing accessed, nothing ranked

  for (uint64_t id : {4, 9, 30, 17}) {
    for (uint64_t i = 0; i <= id; ++i) m.record(AccessOp::kRead, id * kSeg, 512);
  }
  m.record(AccessOp::kWrite, 20 * kSeg, 512);
  m.record(AccessOp::kWrite, 21 * kSeg, 512);  // ties with 20
  REQUIRE(m.top_k(10).empty());  // not rescored yet
  m.rescore();
  const std::vector<uint64_t> want{30, 17, 9, 4, 20, 21};
  REQUIRE(m.top_k(100) == want);
  REQUIRE(m.top_k(3) == std::vector<uint64_t>{30, 17, 9});
  REQUIRE(m.top_k(0).empty());
  REQUIRE(top_ids(m, 100, TopBy::kPriority) == want);

  // After the window has passed the ranking empties on the next rescore.
  advance_s(clock, 60);
  REQUIRE(m.roll());
  clock.set_ns((kStart + kHour + 60) * kNsPerS);
  REQUIRE(m.top_k(100) == want);
  m.rescore();
  REQUIRE(m.top_k(100).empty());
}

TEST_CASE("monitor: history_max_records drops the oldest buckets and counts them",
          "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  Monitor m(with_history_max(config(16 * kSeg), 5), clock);
  CollectingSink sink;
  m.set_history_sink(&sink);

  for (uint64_t id : {0, 1, 2}) m.record(AccessOp::kRead, id * kSeg, 1);  // bucket 1: 3
  advance_s(clock, 60);
  REQUIRE(m.roll());
  for (uint64_t id : {3, 4}) m.record(AccessOp::kRead, id * kSeg, 1);  // bucket 2: 2
  advance_s(clock, 60);
  REQUIRE(m.roll());
  REQUIRE(m.totals().history_records == 5);
  REQUIRE(m.totals().history_dropped_records == 0);

  for (uint64_t id : {5, 6}) m.record(AccessOp::kWrite, id * kSeg, 1);  // bucket 3: 2
  advance_s(clock, 60);
  REQUIRE(m.roll());
  const MonitorTotals t = m.totals();
  REQUIRE(t.history_records == 4);
  REQUIRE(t.history_dropped_records == 3);
  REQUIRE(t.oldest_history_s == kStart + 60);
  REQUIRE(t.history_bytes >= 4 * sizeof(HistoryRecord));

  const auto h = m.history();
  REQUIRE(h.size() == 4);
  REQUIRE(h.front().bucket_start_s == kStart + 60);
  REQUIRE(h.front().segment == 3);
  REQUIRE(h.back().segment == 6);
  REQUIRE(sink.records.size() == 7);  // the writer saw everything before the drop
  REQUIRE(reads_in(m, 3) == 1);
  REQUIRE(in_window(m.segment(6), kHour).writes == 1);
}

// The history bound limits what is kept for analysis; the windows still
// count every access of the buckets inside them (monitor.h: roll() moves the
// counters into the history *and* into the window aggregates).
TEST_CASE("monitor: a bucket larger than history_max_records still counts in the windows",
          "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  Monitor m(with_history_max(config(16 * kSeg), 2), clock);
  for (uint64_t id : {0, 1, 2}) m.record(AccessOp::kRead, id * kSeg, 1);
  advance_s(clock, 60);
  REQUIRE(m.roll());
  // The newest bucket is never dropped: the bound trims the past only.
  CHECK(m.totals().history_dropped_records == 0);
  CHECK(m.totals().history_records == 3);
  // One minute ago: inside every window.
  CHECK(reads_in(m, 0, kHour) == 1);
  CHECK(reads_in(m, 2, kWeek) == 1);
  CHECK(m.totals().segments_active == 3);
}

TEST_CASE("monitor: an empty device has no segments and ignores requests", "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  Monitor m(config(0), clock);
  REQUIRE(m.segment_count() == 0);
  m.record(AccessOp::kWrite, 0, 4096);
  advance_s(clock, 60);
  REQUIRE(m.roll());
  REQUIRE(m.history().empty());
  REQUIRE(top_ids(m, 5, TopBy::kPriority).empty());
  const MonitorTotals t = m.totals();
  REQUIRE(t.segments == 0);
  REQUIRE(t.dense_bytes_virtual == 0);
  REQUIRE(t.dense_bytes_resident == 0);
}

TEST_CASE("monitor: totals() segments and dense bytes", "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  const uint64_t dev = 1000 * kSeg + 1;
  Monitor m(config(dev), clock);
  const MonitorTotals before = m.totals();
  REQUIRE(before.segments == 1001);
  REQUIRE(before.segment_bytes == kSeg);
  REQUIRE(before.dense_bytes_virtual == 32 * 1001);
  REQUIRE(before.segments_active == 0);
  REQUIRE(before.started_s == kStart);
  REQUIRE(before.history_records == 0);

  m.record(AccessOp::kWrite, 0, 1);
  m.record(AccessOp::kWrite, 999 * kSeg, 1);
  const MonitorTotals after = m.totals();
  REQUIRE(after.dense_bytes_resident > before.dense_bytes_resident);
  REQUIRE(after.dense_bytes_resident >= 2 * 4096);
  REQUIRE(after.segments_active == 2);
}

constexpr uint64_t kTiB = 1ull << 40;

// Writes 4 KiB to 100 segments spread evenly over the device; returns the
// distance between them in segments.
uint64_t touch_100_spread(Monitor& m) {
  const uint64_t stride = m.segment_count() / 100;
  for (uint64_t i = 0; i < 100; ++i) m.record(AccessOp::kWrite, i * stride * kSeg, 4096);
  return stride;
}

// The "≤ 32 bytes resident per segment" requirement, measured on a sparse
// 1 TiB device at 64 KiB segments (16 Mi segments, 512 MiB virtual):
// touching 100 segments spread over the device costs about a page each.
// This is the first query, so nothing has scanned the dense array yet.
TEST_CASE("monitor: 1 TiB sparse device: 100 touched segments stay far below 1 MiB resident",
          "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  Monitor m(config(kTiB), clock);
  REQUIRE(m.segment_count() == 16ull << 20);
  touch_100_spread(m);
  const MonitorTotals t = m.totals();
  INFO("resident after touching 100 segments: " << t.dense_bytes_resident << " bytes");
  REQUIRE(t.dense_bytes_virtual == 32ull * (16ull << 20));  // 512 MiB
  REQUIRE(t.dense_bytes_resident > 0);
  REQUIRE(t.dense_bytes_resident <= 100 * 2 * 4096);
  REQUIRE(t.dense_bytes_resident < (1u << 20));
  REQUIRE(t.segments_active == 100);
}

// roll(), history(), top(), rescore() and totals() scan every cell. Reading
// an untouched page maps the shared zero page: it costs no memory, so the
// reported resident bytes must not grow to the whole array either.
TEST_CASE("monitor: 1 TiB sparse device: resident stays small after roll() and queries",
          "[monitor]") {
  ManualClock clock(kStart * kNsPerS);
  Monitor m(config(kTiB), clock);
  // Only the touched-page map (1 bit per 128 segments: 16 KiB here) is resident.
  const uint64_t fresh = m.totals().dense_bytes_resident;
  CHECK(fresh <= 16 * 1024);
  CHECK(m.totals().dense_bytes_resident == fresh);  // a query touches nothing

  const uint64_t stride = touch_100_spread(m);
  advance_s(clock, 60);
  REQUIRE(m.roll());
  REQUIRE(m.history().size() == 100);
  REQUIRE(top_ids(m, 3, TopBy::kWrites) == std::vector<uint64_t>{0, stride, 2 * stride});
  m.rescore();
  REQUIRE(m.top_k(2) == std::vector<uint64_t>{0, stride});
  const MonitorTotals t = m.totals();
  INFO("resident after roll() and queries: " << t.dense_bytes_resident << " bytes");
  CHECK(t.dense_bytes_resident < (1u << 20));
}

// ---- MonitoredBackend ----

struct MonitoredDisk {
  static constexpr uint64_t kSize = 4 * kSeg;
  MonitoredDisk()
      : clock(kStart * kNsPerS),
        monitor(config(kSize), clock),
        loop(test::make_loop()),
        mem(std::make_shared<MemoryBackend>(kSize, 1)),
        backend(mem, monitor) {}

  Status op(BlockOpKind kind, uint64_t offset, uint64_t length, uint8_t* buf = nullptr) {
    test::RecordingOp o(kind, offset, length, buf);
    return test::run_on(*loop, backend, o);
  }

  ManualClock clock;
  Monitor monitor;
  std::unique_ptr<EventLoop> loop;
  std::shared_ptr<MemoryBackend> mem;
  MonitoredBackend backend;
};

TEST_CASE("monitored backend: counts data ops, not flush or cache, and forwards them",
          "[monitor]") {
  MonitoredDisk d;
  REQUIRE(d.backend.info().size_bytes == MonitoredDisk::kSize);
  REQUIRE(d.backend.size_bytes() == d.mem->size_bytes());

  std::mt19937_64 rng(3);
  std::vector<uint8_t> data = test::random_bytes(rng, 8192);
  const uint64_t off = kSeg - 4096;  // half in segment 0, half in 1
  REQUIRE(d.op(BlockOpKind::kWrite, off, data.size(), data.data()).is_ok());
  std::vector<uint8_t> back(data.size());
  REQUIRE(d.op(BlockOpKind::kRead, off, back.size(), back.data()).is_ok());
  REQUIRE(test::first_difference(back, data) == -1);
  const auto image = d.mem->contents();
  REQUIRE(std::equal(data.begin(), data.end(), image.begin() + static_cast<ptrdiff_t>(off)));

  REQUIRE(d.op(BlockOpKind::kFlush, 0, 0).is_ok());
  REQUIRE(d.op(BlockOpKind::kCache, 2 * kSeg, kSeg).is_ok());
  REQUIRE(d.op(BlockOpKind::kTrim, 2 * kSeg, 100).is_ok());
  REQUIRE(d.op(BlockOpKind::kWriteZeroes, off, 4096).is_ok());
  std::vector<uint8_t> zeroed(4096, 0xff);
  REQUIRE(d.op(BlockOpKind::kRead, off, zeroed.size(), zeroed.data()).is_ok());
  REQUIRE(std::all_of(zeroed.begin(), zeroed.end(), [](uint8_t b) { return b == 0; }));

  // The inner backend saw every op.
  for (BlockOpKind k : {BlockOpKind::kWrite, BlockOpKind::kFlush, BlockOpKind::kCache,
                        BlockOpKind::kTrim, BlockOpKind::kWriteZeroes}) {
    CAPTURE(op_name(k));
    REQUIRE(d.mem->ops_completed(k) == 1);
  }
  REQUIRE(d.mem->ops_completed(BlockOpKind::kRead) == 2);

  const auto s0 = in_window(d.monitor.segment(0), kHour);
  const auto s1 = in_window(d.monitor.segment(1), kHour);
  const auto s2 = in_window(d.monitor.segment(2), kHour);
  const auto s3 = in_window(d.monitor.segment(3), kHour);
  REQUIRE(s0.reads == 2);
  REQUIRE(s0.writes == 2);  // write + write-zeroes
  REQUIRE(s0.bytes_read == 4096 + 4096);
  REQUIRE(s0.bytes_written == 4096 + 4096);
  REQUIRE(s1.reads == 1);
  REQUIRE(s1.writes == 1);
  REQUIRE(s1.bytes_read == 4096);
  REQUIRE(s2.reads == 0);  // the cache hint is not a read
  REQUIRE(s2.writes == 1);  // the trim
  REQUIRE(s2.bytes_written == 100);
  REQUIRE(s3.reads + s3.writes == 0);
}

TEST_CASE("monitored backend: failed ops are still counted as requests", "[monitor]") {
  MonitoredDisk d;
  d.mem->fail_nth(BlockOpKind::kRead, 1, EIO);
  std::vector<uint8_t> buf(512);
  REQUIRE_FALSE(d.op(BlockOpKind::kRead, 0, buf.size(), buf.data()).is_ok());
  REQUIRE(in_window(d.monitor.segment(0), kHour).reads == 1);
}

}  // namespace
}  // namespace shadowd
