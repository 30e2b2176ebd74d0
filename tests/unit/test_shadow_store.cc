// The shadow pool engine over the fault-injecting in-memory backend: the
// journal, copy-on-first-write, versions, pruning, checkpoints and recovery
// are checked against a model that keeps the device's content after every
// acknowledged write.
#include <catch2/catch.hpp>

#include <algorithm>

#include <chrono>
#include <map>
#include <memory>
#include <random>
#include <atomic>
#include <deque>
#include <thread>

#include "core/memory_backend.h"
#include "core/monitor.h"
#include "core/shadow_store.h"
#include "core/gate_backend.h"
#include "core/reconstructor.h"
#include "test_util.h"

namespace shadowd {
namespace {

using test::RecordingOp;

constexpr uint32_t kSeg = 64 * 1024;
constexpr int64_t kMs = 1'000'000;
constexpr int64_t kSec = 1'000'000'000;

// The device's content after each acknowledged write, per segment (shared
// between states where unchanged).
struct Model {
  using SegImage = std::shared_ptr<const std::vector<uint8_t>>;
  struct State {
    uint64_t seq;
    int64_t time_ns;
    std::vector<SegImage> segs;
    std::vector<uint64_t> touched;
  };
  uint64_t nsegs = 0;
  std::vector<State> states;  // states[0]: the initial content (seq 0)

  void init(const std::vector<uint8_t>& image, int64_t t) {
    nsegs = image.size() / kSeg;
    State s{0, t, {}, {}};
    for (uint64_t i = 0; i < nsegs; ++i) {
      s.segs.push_back(std::make_shared<std::vector<uint8_t>>(image.begin() + i * kSeg, image.begin() + (i + 1) * kSeg));
    }
    states = {s};
  }
  // `data` empty: zeroes.
  void apply(uint64_t seq, int64_t t, uint64_t off, uint64_t len, const std::vector<uint8_t>& data) {
    State s = states.back();
    s.seq = seq;
    s.time_ns = t;
    s.touched.clear();
    for (uint64_t seg = off / kSeg; seg <= (off + len - 1) / kSeg; ++seg) {
      auto img = std::make_shared<std::vector<uint8_t>>(*s.segs[seg]);
      const uint64_t a = std::max(off, seg * kSeg), b = std::min(off + len, (seg + 1) * kSeg);
      for (uint64_t x = a; x < b; ++x) (*img)[x - seg * kSeg] = data.empty() ? 0 : data[x - off];
      s.segs[seg] = img;
      s.touched.push_back(seg);
    }
    states.push_back(std::move(s));
  }
  const State& at_time(int64_t t) const {
    const State* best = &states.front();
    for (const State& s : states) {
      if (s.time_ns <= t) best = &s;
    }
    return *best;
  }
};

struct Rig {
  // tiers == 2: a second (slow) pool device and a monitor that ranks no
  // segment hot, so background versions go to tier 1 while the journal and
  // the copy-on-first-write versions stay on tier 0.
  explicit Rig(uint64_t seed, uint64_t primary_bytes = 8 * kSeg, uint64_t pool_bytes = (1u << 20) + 12 * (4u << 20),
               int tiers = 1)
      : seed(seed), rng(seed), clock(1'790'000'000LL * kSec) {
    loop = test::make_loop();
    primary = std::make_shared<MemoryBackend>(primary_bytes, seed);
    pool = std::make_shared<MemoryBackend>(pool_bytes, seed ^ 0x5eed);
    if (tiers == 2) {
      pool2 = std::make_shared<MemoryBackend>(pool_bytes, seed ^ 0x7ee2);
      MonitorConfig mc;
      mc.device_bytes = primary_bytes;
      mc.segment_bytes = kSeg;
      monitor = std::make_unique<Monitor>(mc, clock);
    }
    // Some initial content, durable.
    std::vector<uint8_t> init(primary_bytes);
    for (size_t i = 0; i < init.size(); i += 512) init[i] = static_cast<uint8_t>(rng());
    REQUIRE(run_sync(*primary, BlockOpKind::kWrite, 0, init.size(), init.data()));
    REQUIRE(run_sync(*primary, BlockOpKind::kFlush, 0, 0));
    FormatOptions fo;
    fo.primary_id = "/test/primary";
    fo.primary_bytes = primary_bytes;
    fo.segment_bytes = kSeg;
    fo.zone_bytes = 4u << 20;
    REQUIRE(ShadowStore::format(devices(), fo, clock));
    clock.advance_ns(kSec);
    model.init(init, clock.now_ns() - 1);
    opts.primary_id = "/test/primary";
    opts.segment_bytes = kSeg;
    opts.shadow_thread = false;
    opts.retention_seconds = 1'000'000;
    opts.max_versions_per_segment = 4;
    opts.full_every = 3;
    opts.checkpoint_interval_s = 1'000'000;
    opts.shadow_budget_bytes_per_s = 0;  // versions only when a test asks: deterministic
    open();
  }
  ~Rig() {
    if (store) store->abandon();
  }
  std::vector<PoolDevice> devices() const {
    std::vector<PoolDevice> d{PoolDevice{"pool", pool}};
    if (pool2) d.push_back(PoolDevice{"pool2", pool2});
    return d;
  }
  void open() {
    auto s = ShadowStore::open(devices(), primary, opts, clock, monitor.get());
    if (!s) FAIL("open: " << s.status().to_string());
    store = std::move(*s);
    store->start();
  }
  Status io(BlockOpKind kind, uint64_t off, uint64_t len, uint8_t* buf = nullptr, uint32_t flags = 0) {
    RecordingOp op(kind, off, len, buf, flags);
    return test::run_on(*loop, *store->backend(), op);
  }
  std::vector<uint8_t> read_all() {
    std::vector<uint8_t> out(primary->size_bytes());
    REQUIRE(io(BlockOpKind::kRead, 0, out.size(), out.data()));
    return out;
  }
  // A write of random or compressible bytes; returns its data.
  std::vector<uint8_t> data(uint64_t len) {
    std::vector<uint8_t> d(len);
    if (rng() % 2) {
      for (auto& b : d) b = static_cast<uint8_t>(rng());
    } else {
      const uint8_t v = static_cast<uint8_t>(rng());
      for (size_t i = 0; i < len; ++i) d[i] = static_cast<uint8_t>(v + i / 97);
    }
    return d;
  }
  // Check reconstruct(T) against the model for `n` random times in the window.
  void check_history(int n) {
    const StoreStats st = store->stats();
    if (st.degraded) return;  // nothing to check until history restarts
    const int64_t lo = st.retention_start_ns, hi = clock.now_ns();
    for (int i = 0; i < n; ++i) {
      const int64_t t = lo + static_cast<int64_t>(rng() % static_cast<uint64_t>(hi - lo + 1));
      const Model::State& want = model.at_time(t);
      for (uint64_t seg = 0; seg < model.nsegs; ++seg) {
        auto got = store->reconstruct_time(seg, t);
        INFO("seed " << seed << " segment " << seg << " time " << t - lo << " ns after the window start, model seq "
                     << want.seq);
        INFO("reconstruct: " << got.status().to_string());
        if (!got) {
          for (const SegmentHistory& h : store->segments()) {
            if (h.segment != seg) continue;
            UNSCOPED_INFO("segment " << seg << ": records " << h.records << " seq " << h.first_record_seq << ".."
                                     << h.last_record_seq << " ts " << h.first_record_ns - lo << ".."
                                     << h.last_record_ns - lo);
            for (const VersionInfo& v : h.versions) {
              UNSCOPED_INFO("  version seq " << v.seq << " ts " << v.time_ns - lo << " cow " << v.cow << " depth "
                                             << v.depth);
            }
          }
          UNSCOPED_INFO("window seq " << st.first_seq << ".." << st.last_seq << " t-seq " << store->seq_at(t));
        }
        REQUIRE(got);
        REQUIRE(test::first_difference(*got, *want.segs[seg]) == -1);
      }
    }
  }

  // Check the restore path (Reconstructor and a point-in-time export) at
  // `n` random sequence numbers of the window, whole device, every byte.
  void check_restore(int n) {
    const StoreStats st = store->stats();
    if (st.degraded) return;
    const uint64_t dev = primary->size_bytes();
    Reconstructor rec(*store, dev, kSeg, 2, 3 * kSeg);
    for (int i = 0; i < n; ++i) {
      std::vector<const Model::State*> in;
      for (const Model::State& m : model.states) {
        if (m.seq >= st.first_seq && m.seq <= st.last_seq) in.push_back(&m);
      }
      REQUIRE_FALSE(in.empty());
      const Model::State& want = *in[rng() % in.size()];
      std::vector<uint8_t> expect;
      for (const auto& sg : want.segs) expect.insert(expect.end(), sg->begin(), sg->end());
      INFO("seed " << seed << " restore at seq " << want.seq << " (window " << st.first_seq << ".." << st.last_seq
                   << ")");
      std::vector<uint8_t> got(dev);
      ReplayCost cost;
      const Status rs = rec.read(want.seq, 0, dev, got.data(), &cost);
      INFO("read: " << rs.to_string());
      REQUIRE(rs);
      REQUIRE(test::first_difference(got, expect) == -1);
      REQUIRE(cost.segments == model.nsegs);
      // Where the sources say "primary", nothing was written after seq.
      for (uint64_t seg = 0; seg < model.nsegs; ++seg) {
        if (store->source_of(seg, want.seq) == ShadowStore::kFromPrimary) {
          REQUIRE(test::first_difference(*want.segs[seg], *model.states.back().segs[seg]) == -1);
        }
      }
      // An unaligned piece, served by the point-in-time backend on a loop;
      // segments built from versions come from the cache the second time.
      auto pit = std::make_shared<PointInTimeBackend>(
          std::shared_ptr<Reconstructor>(&rec, [](Reconstructor*) {}), want.seq);
      const uint64_t off = rng() % dev, len = 1 + rng() % (dev - off);
      for (int pass = 0; pass < 2; ++pass) {
        std::vector<uint8_t> piece(len);
        RecordingOp op(BlockOpKind::kRead, off, len, piece.data());
        REQUIRE(test::run_on(*loop, *pit, op));
        REQUIRE(test::first_difference(piece, std::vector<uint8_t>(expect.begin() + off, expect.begin() + off + len)) ==
                -1);
      }
      const auto c = pit->counters();
      REQUIRE(c.reads == 2);
      REQUIRE(c.bytes_read == 2 * len);
      REQUIRE(c.cost.records_applied + c.cost.versions_decoded + c.cost.from_primary + c.cost.cache_hits > 0);
    }
  }

  uint64_t seed;
  std::mt19937_64 rng;
  ManualClock clock;
  std::unique_ptr<EventLoop> loop;
  std::shared_ptr<MemoryBackend> primary, pool, pool2;
  std::unique_ptr<Monitor> monitor;
  StoreOptions opts;
  std::unique_ptr<ShadowStore> store;
  Model model;
  uint64_t seq = 0;
};

TEST_CASE("store: format refuses a pool for another primary, open names both", "[store]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  Rig rig(seed);
  rig.store->abandon();
  rig.store.reset();
  FormatOptions fo;
  fo.primary_id = "/other";
  fo.primary_bytes = rig.primary->size_bytes();
  fo.segment_bytes = kSeg;
  fo.zone_bytes = 4u << 20;
  Status st = ShadowStore::format({PoolDevice{"pool", rig.pool}}, fo, rig.clock);
  REQUIRE_FALSE(st);
  REQUIRE(st.message().find("already holds a shadow pool") != std::string::npos);
  StoreOptions o = rig.opts;
  o.primary_id = "/other";
  auto s = ShadowStore::open({PoolDevice{"pool", rig.pool}}, rig.primary, o, rig.clock, nullptr);
  REQUIRE_FALSE(s);
  REQUIRE(s.status().message().find("/test/primary") != std::string::npos);
  REQUIRE(s.status().message().find("/other") != std::string::npos);
  o = rig.opts;
  o.segment_bytes = 2 * kSeg;
  s = ShadowStore::open({PoolDevice{"pool", rig.pool}}, rig.primary, o, rig.clock, nullptr);
  REQUIRE_FALSE(s);
  // A blank device is not a pool.
  auto blank = std::make_shared<MemoryBackend>(64u << 20, 1);
  s = ShadowStore::open({PoolDevice{"blank", blank}}, rig.primary, rig.opts, rig.clock, nullptr);
  REQUIRE_FALSE(s);
  REQUIRE(s.status().message().find("--init") != std::string::npos);
  // --force overwrites.
  fo.force = true;
  REQUIRE(ShadowStore::format({PoolDevice{"pool", rig.pool}}, fo, rig.clock));
}

TEST_CASE("store: every write is journaled, first writes capture the before-image", "[store]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  Rig rig(seed);
  auto d = rig.data(3 * kSeg + 100);
  rig.clock.advance_ns(kMs);
  const int64_t t1 = rig.clock.now_ns();
  REQUIRE(rig.io(BlockOpKind::kWrite, kSeg / 2, d.size(), d.data()));
  rig.model.apply(1, t1, kSeg / 2, d.size(), d);
  StoreStats st = rig.store->stats();
  REQUIRE(st.cow_stalls == 4);  // segments 0..3 were touched for the first time
  REQUIRE(st.journal_records == 4);
  REQUIRE(st.last_seq == 1);
  rig.clock.advance_ns(kMs);
  REQUIRE(rig.io(BlockOpKind::kWriteZeroes, 100, 5000));
  rig.model.apply(2, rig.clock.now_ns(), 100, 5000, {});
  rig.clock.advance_ns(kMs);
  REQUIRE(rig.io(BlockOpKind::kTrim, 6 * kSeg, kSeg));
  rig.model.apply(3, rig.clock.now_ns(), 6 * kSeg, kSeg, {});
  st = rig.store->stats();
  REQUIRE(st.cow_stalls == 5);  // segment 6 is new; 0 already has a base
  REQUIRE(st.journal_records == 6);
  REQUIRE(rig.read_all() == [&] {
    std::vector<uint8_t> all;
    for (auto& s : rig.model.states.back().segs) all.insert(all.end(), s->begin(), s->end());
    return all;
  }());
  rig.clock.advance_ns(kMs);
  rig.check_history(20);
  // Before the first write: the initial content.
  for (uint64_t seg = 0; seg < 8; ++seg) {
    auto got = rig.store->reconstruct_time(seg, t1 - 1);
    REQUIRE(got);
    REQUIRE(*got == *rig.model.states[0].segs[seg]);
  }
  // Before the epoch: refused.
  REQUIRE_FALSE(rig.store->reconstruct_time(0, rig.store->stats().epoch_ns - 1));
}

TEST_CASE("store: journal batches written several at a time land and retire in order",
          "[store]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  Rig rig(seed);
  rig.pool->delay_completions(4);  // batch writes complete out of order
  rig.primary->delay_completions(2);
  for (int round = 0; round < 6; ++round) {
    rig.clock.advance_ns(kMs);
    const int64_t t = rig.clock.now_ns();
    // 48 concurrent 4 KiB writes, some to the same place (journal order
    // must be the device's order), the last one FUA.
    std::vector<std::unique_ptr<RecordingOp>> ops;
    std::vector<std::vector<uint8_t>> datas;
    for (int k = 0; k < 48; ++k) {
      datas.push_back(rig.data(4096));
      const uint64_t off = (rig.rng() % (8 * kSeg / 4096)) * 4096;
      ops.push_back(std::make_unique<RecordingOp>(BlockOpKind::kWrite, off, 4096, datas.back().data(),
                                                  k == 47 ? uint32_t{kFua} : 0u));
    }
    if (round == 0) {
      // The first batch's pool write stays in flight while the rest are
      // sent: they must go out as further batches meanwhile.
      rig.pool->hold_completions();
      rig.store->backend()->submit(*rig.loop, ops[0].get());
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
      while (rig.pool->held_completions() < 1) {
        REQUIRE(std::chrono::steady_clock::now() < deadline);
        std::this_thread::yield();
      }
      for (size_t k = 1; k < ops.size(); ++k) rig.store->backend()->submit(*rig.loop, ops[k].get());
      while (rig.pool->held_completions() < 2) {
        REQUIRE(std::chrono::steady_clock::now() < deadline);
        std::this_thread::yield();
      }
      rig.pool->release_completions();
    } else {
      for (auto& op : ops) rig.store->backend()->submit(*rig.loop, op.get());
    }
    test::run_until_done(*rig.loop, ops);
    for (int k = 0; k < 48; ++k) {
      REQUIRE(ops[k]->status);
      rig.model.apply(++rig.seq, t + k, ops[k]->offset, 4096, datas[k]);
    }
  }
  const uint64_t overlapped = rig.store->stats().group_commits_overlapped;
  INFO("group commits overlapping another: " << overlapped);
  REQUIRE(overlapped > 0);
  REQUIRE(rig.store->stats().last_seq == rig.seq);
  REQUIRE(rig.store->check_index());
  rig.clock.advance_ns(kMs);
  rig.check_history(20);
  // The last write was FUA: after a crash that tears whatever was not
  // flushed, every write is still in the journal and on the device.
  rig.store->abandon();
  rig.store.reset();
  rig.pool->crash(true);
  rig.primary->crash(false);
  rig.open();
  REQUIRE(rig.store->stats().last_seq == rig.seq);
  rig.clock.advance_ns(kMs);
  rig.check_history(20);
  REQUIRE(rig.read_all() == [&] {
    std::vector<uint8_t> all;
    for (auto& s : rig.model.states.back().segs) all.insert(all.end(), s->begin(), s->end());
    return all;
  }());
}

// While clients are busy (a request since the last round makes it so,
// whatever the clock), stale segments wait for the busy budget; urgent ones
// (too many records) are shadowed at the full budget all the same.
TEST_CASE("store: the busy budget holds back stale segments, not urgent ones", "[store]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  for (const bool busy_budget_zero : {true, false}) {
    INFO("busy budget " << (busy_budget_zero ? "0" : "= budget"));
    Rig rig(seed);
    rig.store->abandon();
    rig.store.reset();
    rig.opts.shadow_budget_bytes_per_s = 10'000'000'000'000ull;  // tokens for any segment at once
    rig.opts.shadow_busy_budget_bytes_per_s = busy_budget_zero ? 0 : rig.opts.shadow_budget_bytes_per_s;
    rig.opts.stale_records = 4;
    rig.opts.max_records_per_segment = 12;
    rig.open();
    auto versions_of = [&](uint64_t seg) {
      for (const SegmentHistory& h : rig.store->segments()) {
        if (h.segment == seg) return h.versions.size();
      }
      return size_t{0};
    };
    // Segment 1 stale (6 records after its first version), segment 2 urgent
    // (a write finds 12 records there already).
    for (int i = 0; i < 6; ++i) {
      auto d = rig.data(512);
      REQUIRE(rig.io(BlockOpKind::kWrite, kSeg + i * 512, d.size(), d.data()));
    }
    for (int i = 0; i < 13; ++i) {
      auto d = rig.data(512);
      REQUIRE(rig.io(BlockOpKind::kWrite, 2 * kSeg + i * 512, d.size(), d.data()));
    }
    REQUIRE(versions_of(1) == 1);  // the copy-on-first-write
    REQUIRE(versions_of(2) == 1);
    rig.store->shadow_round();  // starts the token clock
    std::vector<uint8_t> buf(4096);
    REQUIRE(rig.io(BlockOpKind::kRead, 0, buf.size(), buf.data()));  // a client is busy
    rig.store->shadow_round();
    CHECK(rig.store->stats().foreground_busy);
    CHECK(versions_of(2) == 2);  // urgent: shadowed although clients are busy
    CHECK(versions_of(1) == (busy_budget_zero ? 1u : 2u));
  }
}

// The shadowing policy decides what happens to a base when its segment's
// last record leaves the window: `none` frees it (the next write copies the
// segment again, and the window still restores it, from the primary), the
// others keep it as a speculative base (the next write finds it).
TEST_CASE("store: a base leaving the window is freed under none, kept under lru", "[store]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  for (const PolicyKind kind : {PolicyKind::kNone, PolicyKind::kLru}) {
    INFO("policy " << policy_name(kind));
    Rig rig(seed);
    rig.store->abandon();
    rig.store.reset();
    rig.opts.policy = kind;
    rig.opts.retention_seconds = 10;
    rig.open();
    auto d1 = rig.data(4096);
    REQUIRE(rig.io(BlockOpKind::kWrite, kSeg + 4096, d1.size(), d1.data()));
    const std::vector<uint8_t> seg1 = [&] {
      std::vector<uint8_t> b(kSeg);
      REQUIRE(rig.io(BlockOpKind::kRead, kSeg, kSeg, b.data()));
      return b;
    }();
    CHECK(rig.store->stats().cow_stalls == 1);
    // 20 s later another segment is written; the window moves past segment 1's record.
    rig.clock.advance_ns(20 * kSec);
    auto d2 = rig.data(4096);
    REQUIRE(rig.io(BlockOpKind::kWrite, 3 * kSeg, d2.size(), d2.data()));
    rig.clock.advance_ns(kSec);
    rig.store->shadow_round();
    const StoreStats st = rig.store->stats();
    CHECK(st.records_pruned >= 1);
    if (kind == PolicyKind::kNone) {
      CHECK(st.bases_freed == 1);
      CHECK_FALSE(rig.store->segment(1).has_value());
      CHECK(st.bases_speculative == 0);
    } else {
      CHECK(st.bases_freed == 0);
      REQUIRE(rig.store->segment(1).has_value());
      CHECK(st.bases_speculative == 1);
    }
    // Inside the window segment 1 is what it was, wherever it comes from.
    auto at = rig.store->reconstruct_time(1, rig.clock.now_ns() - kSec / 2);
    REQUIRE(at);
    CHECK(*at == seg1);
    // Its next write: a copy on the write path under none, a speculative hit under lru.
    auto d3 = rig.data(4096);
    REQUIRE(rig.io(BlockOpKind::kWrite, kSeg, d3.size(), d3.data()));
    const StoreStats after = rig.store->stats();
    CHECK(after.cow_stalls == (kind == PolicyKind::kNone ? 3u : 2u));
    CHECK(after.speculative_hits == (kind == PolicyKind::kNone ? 0u : 1u));
    REQUIRE(rig.store->check_index());
  }
}

// The store again with the sequential policy and no limit on the copy
// budget (the busy one is judged in real time).
void reopen_sequential_unbudgeted(Rig& rig) {
  rig.store->abandon();
  rig.store.reset();
  rig.opts.policy = PolicyKind::kSequential;
  rig.opts.shadow_budget_bytes_per_s = 1ull << 40;
  rig.opts.shadow_busy_budget_bytes_per_s = 1ull << 40;
  rig.open();
}

// A sequential stream makes the policy copy the segments after it ahead of
// need, so that the stream's next write finds a base.
TEST_CASE("store: the sequential policy copies a stream's next segments ahead of need", "[store]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  Rig rig(seed);
  reopen_sequential_unbudgeted(rig);
  for (uint64_t s = 0; s < 3; ++s) {
    auto d = rig.data(kSeg);
    REQUIRE(rig.io(BlockOpKind::kWrite, s * kSeg, d.size(), d.data()));
    rig.clock.advance_ns(kSec / 10);
  }
  CHECK(rig.store->stats().cow_stalls == 3);
  rig.store->shadow_round();  // the policy sees the stream; the bucket starts
  rig.clock.advance_ns(kSec);
  rig.store->shadow_round();  // copies ahead
  StoreStats st = rig.store->stats();
  CHECK(st.copies_ahead >= 1);
  REQUIRE(rig.store->segment(3).has_value());
  CHECK(rig.store->segment(3)->versions.size() == 1);
  auto d = rig.data(kSeg);
  REQUIRE(rig.io(BlockOpKind::kWrite, 3 * kSeg, d.size(), d.data()));
  st = rig.store->stats();
  CHECK(st.cow_stalls == 3);  // no copy on the write path
  CHECK(st.copies_ahead_used == 1);
  CHECK(st.speculative_hits == 1);
  // What the copy holds is the segment before the write.
  auto before = rig.store->reconstruct_time(3, rig.clock.now_ns() - kSec / 2);
  REQUIRE(before);
  REQUIRE(rig.store->check_index());
}

// Two tiers: a segment the monitor comes to rank hot has its versions moved
// to the fast tier by the shadowing round; every time still restores.
TEST_CASE("store: versions of segments ranked hot move to the fast tier", "[store]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  Rig rig(seed, 8 * kSeg, (1u << 20) + 12 * (4u << 20), 2);
  auto d = rig.data(4096);
  REQUIRE(rig.io(BlockOpKind::kWrite, 2 * kSeg + 8192, d.size(), d.data()));
  rig.model.apply(++rig.seq, rig.clock.now_ns(), 2 * kSeg + 8192, d.size(), d);
  rig.clock.advance_ns(kMs);
  REQUIRE(rig.store->shadow_segment(2));
  auto tiers_of = [&] {
    std::vector<uint32_t> t;
    const auto h = rig.store->segment(2);
    if (h) {
      for (const VersionInfo& v : h->versions) t.push_back(v.tier);
    }
    return t;
  };
  REQUIRE(tiers_of() == std::vector<uint32_t>{0, 1});  // the copy-on-write, then a background version
  rig.store->shadow_round();
  CHECK(tiers_of() == std::vector<uint32_t>{0, 1});  // not hot: stays
  for (int i = 0; i < 8; ++i) rig.monitor->record(AccessOp::kRead, 2 * kSeg, 4096);
  rig.monitor->rescore();
  rig.store->shadow_round();
  CHECK(tiers_of() == std::vector<uint32_t>{0, 0});
  CHECK(rig.store->stats().versions_promoted == 1);
  REQUIRE(rig.store->check_index());
  rig.clock.advance_ns(kMs);
  rig.check_history(8);
  rig.check_restore(4);
  // After a restart the index finds the moved version.
  rig.store->stop();
  rig.store.reset();
  rig.open();
  CHECK(tiers_of() == std::vector<uint32_t>{0, 0});
  rig.check_restore(4);
}

// A restart finds again the versions dropped since the last checkpoint, so
// a segment can hold versions older than its window's base version. Keeping
// max_versions_per_segment must then drop those, never the base: the records
// before the base are gone, and every time of the window replays from it.
TEST_CASE("store: versions brought back by a restart never cost the window its base", "[store]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  Rig rig(seed);  // max_versions_per_segment 4, a full image every 3
  auto write = [&](uint64_t off) {
    rig.clock.advance_ns(kMs);
    auto d = rig.data(4096);
    REQUIRE(rig.io(BlockOpKind::kWrite, off, d.size(), d.data()));
    rig.model.apply(++rig.seq, rig.clock.now_ns(), off, d.size(), d);
    return rig.clock.now_ns();
  };
  auto shadow = [&] {
    rig.clock.advance_ns(kMs);
    REQUIRE(rig.store->shadow_segment(0));
  };
  write(0);  // seq 1; the copy-on-first-write version (seq 0)
  REQUIRE(rig.store->checkpoint());
  const int64_t t2 = write(4096);  // seq 2
  write(8192);                     // seq 3
  shadow();                        // v3, a delta on v0
  write(12288);
  shadow();  // v4, a delta on v3
  write(16384);
  shadow();  // v5, full
  write(20480);
  shadow();  // v6: five versions, so v3 goes (v4 rewritten in full)
  REQUIRE(rig.store->prune(t2));  // folds record 2: the window's base is v2
  // A restart with no checkpoint since the first one: v0 and v3 are in the
  // index again, v0 older than the base v2 and kept as v3's base.
  rig.store->abandon();
  rig.store.reset();
  rig.open();
  {
    std::vector<uint64_t> seqs;
    for (const SegmentHistory& h : rig.store->segments()) {
      if (h.segment != 0) continue;
      for (const VersionInfo& v : h.versions) seqs.push_back(v.seq);
    }
    REQUIRE(seqs == std::vector<uint64_t>{0, 2, 3, 4, 5, 6});
  }
  write(24576);
  shadow();  // past 4 versions again: v0 must go, not the base v2
  rig.clock.advance_ns(kMs);
  REQUIRE(rig.store->check_index());
  rig.check_history(40);
  rig.check_restore(10);
}

TEST_CASE("store: versions are consistent, differential and bounded", "[store]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  Rig rig(seed);
  for (int i = 0; i < 30; ++i) {
    rig.clock.advance_ns(kMs);
    const uint64_t off = rig.rng() % (kSeg - 4096);
    std::vector<uint8_t> d(4096, static_cast<uint8_t>(i));
    d[0] = static_cast<uint8_t>(rig.rng());
    REQUIRE(rig.io(BlockOpKind::kWrite, off, d.size(), d.data()));
    rig.model.apply(++rig.seq, rig.clock.now_ns(), off, d.size(), d);
    rig.clock.advance_ns(kMs);
    REQUIRE(rig.store->shadow_segment(0));
  }
  auto h = rig.store->segment(0);
  REQUIRE(h);
  REQUIRE(h->versions.size() == 4);  // max_versions_per_segment
  bool delta = false;
  for (const auto& v : h->versions) {
    delta = delta || v.depth > 0;
    REQUIRE(v.depth < 3);  // full_every
  }
  REQUIRE(delta);
  const StoreStats st = rig.store->stats();
  REQUIRE(st.versions_dropped > 0);
  REQUIRE(st.version_raw_bytes > st.version_bytes);  // compressed
  rig.clock.advance_ns(kMs);
  rig.check_history(30);
}

TEST_CASE("store: pruning folds old records and keeps every time in the window", "[store]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  Rig rig(seed);
  for (int i = 0; i < 60; ++i) {
    rig.clock.advance_ns(100 * kMs);
    const uint64_t off = rig.rng() % (rig.primary->size_bytes() - 8192);
    auto d = rig.data(1 + rig.rng() % 8192);
    REQUIRE(rig.io(BlockOpKind::kWrite, off, d.size(), d.data()));
    rig.model.apply(++rig.seq, rig.clock.now_ns(), off, d.size(), d);
    if (i % 10 == 9) {
      rig.clock.advance_ns(kMs);
      REQUIRE(rig.store->shadow_segment(rig.rng() % 8));
    }
  }
  rig.clock.advance_ns(kMs);
  const int64_t start = rig.model.states[30].time_ns + 50 * kMs;
  REQUIRE(rig.store->prune(start));
  StoreStats st = rig.store->stats();
  REQUIRE(st.retention_start_ns == start);
  REQUIRE(st.records_pruned > 0);
  REQUIRE(st.versions_folded > 0);
  REQUIRE_FALSE(rig.store->reconstruct_time(0, start - 1));
  rig.check_history(40);
  // Zones freed by a checkpoint can be reused; history stays right.
  REQUIRE(rig.store->checkpoint());
  rig.check_history(10);
}

TEST_CASE("store: restart recovers the index from checkpoint and journal tail", "[store]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  Rig rig(seed);
  for (int i = 0; i < 40; ++i) {
    rig.clock.advance_ns(10 * kMs);
    const uint64_t off = rig.rng() % (rig.primary->size_bytes() - 20000);
    auto d = rig.data(1 + rig.rng() % 20000);
    REQUIRE(rig.io(BlockOpKind::kWrite, off, d.size(), d.data(), i % 7 == 0 ? uint32_t{kFua} : 0u));
    rig.model.apply(++rig.seq, rig.clock.now_ns(), off, d.size(), d);
    if (i == 20) REQUIRE(rig.store->checkpoint());
    if (i == 25) REQUIRE(rig.store->shadow_segment(off / kSeg));
  }
  REQUIRE(rig.io(BlockOpKind::kFlush, 0, 0));
  const StoreStats before = rig.store->stats();
  // Like kill -9: no final checkpoint.
  rig.store->abandon();
  rig.store.reset();
  rig.open();
  const StoreStats after = rig.store->stats();
  REQUIRE(after.last_seq == before.last_seq);
  REQUIRE(after.journal_records == before.journal_records);
  REQUIRE(after.versions == before.versions);
  REQUIRE(after.recovered_records > 0);
  rig.clock.advance_ns(kMs);
  rig.check_history(30);
  // A clean stop writes a checkpoint; the next start needs no tail scan.
  REQUIRE(rig.store->stop());
  rig.store.reset();
  rig.open();
  REQUIRE(rig.store->stats().recovered_records == 0);
  REQUIRE(rig.store->stats().journal_records == before.journal_records);
  rig.check_history(10);
}

TEST_CASE("store: a full pool or a failing pool never fails the export", "[store]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  Rig rig(seed);
  SECTION("pool EIO") {
    rig.pool->fail_randomly(BlockOpKind::kWrite, 1.0, EIO);
  }
  SECTION("pool ENOSPC") {
    rig.pool->enospc_after(64 * 1024);
  }
  std::vector<uint8_t> want = rig.read_all();
  for (int i = 0; i < 50; ++i) {
    rig.clock.advance_ns(kMs);
    const uint64_t off = rig.rng() % (rig.primary->size_bytes() - 30000);
    auto d = rig.data(1 + rig.rng() % 30000);
    REQUIRE(rig.io(BlockOpKind::kWrite, off, d.size(), d.data()));
    std::copy(d.begin(), d.end(), want.begin() + off);
  }
  REQUIRE(rig.io(BlockOpKind::kFlush, 0, 0));
  REQUIRE(rig.read_all() == want);
  StoreStats st = rig.store->stats();
  REQUIRE(st.degraded);
  REQUIRE_FALSE(st.degraded_reason.empty());
  REQUIRE_FALSE(rig.store->reconstruct_time(0, rig.clock.now_ns()));
  // The pool recovers: history restarts from now and works.
  rig.pool->clear_faults();
  rig.clock.advance_ns(2 * kSec);
  rig.store->shadow_round();
  st = rig.store->stats();
  REQUIRE_FALSE(st.degraded);
  const int64_t restart = st.retention_start_ns;
  rig.model.init(rig.read_all(), restart);
  for (int i = 0; i < 10; ++i) {
    rig.clock.advance_ns(kMs);
    const uint64_t off = rig.rng() % (rig.primary->size_bytes() - 30000);
    auto d = rig.data(1 + rig.rng() % 30000);
    REQUIRE(rig.io(BlockOpKind::kWrite, off, d.size(), d.data()));
    rig.model.apply(i + 1, rig.clock.now_ns(), off, d.size(), d);
  }
  rig.clock.advance_ns(kMs);
  rig.check_history(10);
  // ... and survives a restart.
  rig.store->abandon();
  rig.store.reset();
  rig.open();
  REQUIRE(rig.store->stats().retention_start_ns == restart);
  rig.check_history(10);
}

TEST_CASE("store: retention shrinks when the pool fills, serving goes on", "[store]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  // 10 zones of 4 MiB; 1 MiB of primary rewritten over and over.
  Rig rig(seed, 16 * kSeg, (1u << 20) + 10 * (4u << 20));
  std::vector<uint8_t> want = rig.read_all();
  for (int i = 0; i < 400; ++i) {
    rig.clock.advance_ns(10 * kMs);
    const uint64_t off = rig.rng() % (rig.primary->size_bytes() - 128 * 1024);
    std::vector<uint8_t> d(128 * 1024);
    for (auto& b : d) b = static_cast<uint8_t>(rig.rng());  // incompressible
    REQUIRE(rig.io(BlockOpKind::kWrite, off, d.size(), d.data()));
    std::copy(d.begin(), d.end(), want.begin() + off);
    if (i % 20 == 19) rig.store->shadow_round();
  }
  REQUIRE(rig.read_all() == want);
  rig.store->shadow_round();
  const StoreStats st = rig.store->stats();
  REQUIRE(st.retention_shrinks > 0);
  REQUIRE(st.retention_shrunk);
  REQUIRE(st.zones_reclaimed > 0);
  // What is left of the window still reconstructs to the device's content.
  rig.clock.advance_ns(kMs);
  for (uint64_t seg = 0; seg < 16; ++seg) {
    auto got = rig.store->reconstruct_time(seg, rig.clock.now_ns());
    REQUIRE(got);
    REQUIRE(std::equal(got->begin(), got->end(), want.begin() + seg * kSeg));
  }
}

// The seeded simulation: random writes, zeroes, trims, flushes, FUA,
// shadowing, pruning, checkpoints and crashes (unflushed pool writes
// dropped or torn, unflushed primary writes dropped), recovery, and the
// history checked against the model throughout.
struct SimPolicy {
  PolicyKind policy = PolicyKind::kAuto;
  uint64_t budget = 0;          // bytes per second of background copies
  uint64_t retention_s = 0;     // 0: the Rig's (long)
};

void run_sim(int tiers, SimPolicy sp = {}) {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  // 24 zones of 4 MiB: small enough that retention shrinks for space now
  // and then, large enough that history never has to restart (a restart
  // is tested above; here it would make the model's sequence numbers wrong).
  // The policy variants use a larger device: segments go unwritten long
  // enough to leave the window, and there is ground to copy ahead.
  const bool policy_sim = sp.policy != PolicyKind::kAuto || sp.budget || sp.retention_s;
  Rig rig(seed, (policy_sim ? 64 : 8) * kSeg, (1u << 20) + 24 * (4u << 20), tiers);
  if (sp.policy != PolicyKind::kAuto || sp.budget || sp.retention_s) {
    rig.store->abandon();
    rig.store.reset();
    rig.opts.policy = sp.policy;
    rig.opts.shadow_budget_bytes_per_s = sp.budget;
    rig.opts.shadow_busy_budget_bytes_per_s = sp.budget;
    if (sp.retention_s) rig.opts.retention_seconds = sp.retention_s;
    rig.open();
  }
  auto& rng = rig.rng;
  // Completions out of order, as on a real device: journal batches are
  // written several at a time and must still be retired in order.
  rig.pool->delay_completions(3);
  if (rig.pool2) rig.pool2->delay_completions(3);
  rig.primary->delay_completions(2);
  const uint64_t dev = rig.primary->size_bytes();
  uint64_t flushed_seq = 0;
  int crashes = 0;
  uint64_t last_freed = 0, total_freed = 0, last_ahead = 0, total_ahead = 0;
  const int steps = 1500;
  for (int step = 0; step < steps; ++step) {
    INFO("step " << step);
    rig.clock.advance_ns(1 + static_cast<int64_t>(rng() % (50 * kMs)));
    const unsigned r = rng() % 100;
    if (r < 55) {
      // One write, or several concurrent ones to disjoint segments.
      const int n = rng() % 4 == 0 ? 3 : 1;
      std::vector<std::unique_ptr<RecordingOp>> ops;
      std::vector<std::vector<uint8_t>> datas(n);
      std::vector<std::pair<uint64_t, uint64_t>> ranges;
      // Concurrent writes may overlap: they must reach the device in
      // journal order, which is the order they were submitted in here.
      const bool disjoint = rng() % 2 == 0;
      for (int k = 0; k < n; ++k) {
        const uint64_t base = n == 1 || !disjoint ? 0 : (dev / n) * k;
        const uint64_t span = n == 1 || !disjoint ? dev : dev / n;
        const uint64_t len = 1 + rng() % std::min<uint64_t>(span, 3 * kSeg);
        const uint64_t off = base + rng() % (span - len + 1);
        datas[k] = rig.data(len);
        const uint32_t flags = rng() % 10 == 0 ? uint32_t{kFua} : 0u;
        ops.push_back(std::make_unique<RecordingOp>(BlockOpKind::kWrite, off, len, datas[k].data(), flags));
        ranges.emplace_back(off, len);
      }
      const int64_t t = rig.clock.now_ns();
      for (auto& op : ops) rig.store->backend()->submit(*rig.loop, op.get());
      test::run_until_done(*rig.loop, ops);
      for (int k = 0; k < n; ++k) {
        REQUIRE(ops[k]->status);
        rig.model.apply(++rig.seq, t + k, ranges[k].first, ranges[k].second, datas[k]);
        if (ops[k]->flags & kFua) flushed_seq = rig.seq;  // and everything journaled before it
      }
    } else if (r < 65) {
      const uint64_t len = 1 + rng() % (2 * kSeg);
      const uint64_t off = rng() % (dev - len + 1);
      const BlockOpKind k = rng() % 2 ? BlockOpKind::kTrim : BlockOpKind::kWriteZeroes;
      REQUIRE(rig.io(k, off, len));
      rig.model.apply(++rig.seq, rig.clock.now_ns(), off, len, {});
    } else if (r < 72) {
      REQUIRE(rig.io(BlockOpKind::kFlush, 0, 0));
      flushed_seq = rig.seq;
    } else if (r < 82) {
      // Fails only while history is degraded (the tiny pool ran full).
      const Status st = rig.store->shadow_segment(rng() % rig.model.nsegs);
      if (!st) REQUIRE(rig.store->stats().degraded);
      rig.clock.advance_ns(kMs);
    } else if (r < 86) {
      const int64_t lo = rig.store->stats().retention_start_ns, hi = rig.clock.now_ns();
      const Status st = rig.store->prune(lo + static_cast<int64_t>(rng() % static_cast<uint64_t>((hi - lo) / 4 + 1)));
      INFO("prune: " << st.to_string());
      if (!st) REQUIRE(rig.store->stats().degraded);
      rig.clock.advance_ns(kMs);
    } else if (r < 89) {
      if (rig.store->checkpoint()) {
        flushed_seq = rig.seq;  // a checkpoint flushes the journal and the primary
      } else {
        REQUIRE(rig.store->stats().degraded);
      }
      rig.clock.advance_ns(kMs);
    } else if (r < 92) {
      // Crash: the threads stop dead, unflushed writes are dropped (the
      // pool's possibly torn), and the daemon starts again.
      ++crashes;
      rig.store->abandon();
      rig.store.reset();
      rig.pool->crash(rng() % 2 == 0);
      if (rig.pool2) rig.pool2->crash(rng() % 2 == 0);
      rig.primary->crash(false);
      rig.open();
      const StoreStats st = rig.store->stats();
      const uint64_t s = st.last_seq;
      INFO("recovered seq " << s << ", flushed " << flushed_seq << ", acknowledged " << rig.seq);
      REQUIRE(s >= flushed_seq);
      REQUIRE(s <= rig.seq);
      // The device holds the model's state at s (request s may be partly there).
      const std::vector<uint8_t> now = rig.read_all();
      auto it = std::find_if(rig.model.states.begin(), rig.model.states.end(),
                             [&](const Model::State& m) { return m.seq == s; });
      REQUIRE(it != rig.model.states.end());
      Model::State fixed = *it;
      for (uint64_t seg = 0; seg < rig.model.nsegs; ++seg) {
        std::vector<uint8_t> got(now.begin() + seg * kSeg, now.begin() + (seg + 1) * kSeg);
        if (got == *it->segs[seg]) continue;
        INFO("segment " << seg);
        for (const auto& m : rig.model.states) if (*m.segs[seg] == got) { UNSCOPED_INFO("matches state seq " << m.seq); }
        REQUIRE(it != rig.model.states.begin());
        REQUIRE(std::find(it->touched.begin(), it->touched.end(), seg) != it->touched.end());
        REQUIRE(got == *std::prev(it)->segs[seg]);
        fixed.segs[seg] = std::make_shared<std::vector<uint8_t>>(got);
      }
      rig.model.states.erase(it, rig.model.states.end());
      rig.model.states.push_back(fixed);
      rig.seq = s;
      flushed_seq = s;
      rig.clock.advance_ns(kMs);
    }
    // The daemon's shadow thread is woken when a tier runs low on free
    // zones (below max(4, zones / 8)) and shrinks retention then; here a
    // round runs every 10 steps and whenever a tier is that low.
    bool low = false;
    for (uint32_t t = 0; t < static_cast<uint32_t>(tiers); ++t) {
      const auto zs = rig.store->zones();
      const auto n = std::count_if(zs.begin(), zs.end(), [&](const ZoneInfo& z) { return z.tier == t; });
      const auto free = std::count_if(zs.begin(), zs.end(), [&](const ZoneInfo& z) {
        return z.tier == t && z.kind == pool::ZoneKind::kFree;
      });
      low = low || free < std::max<decltype(n)>(4, n / 8);
    }
    if (step % 10 == 9 || low) {
      rig.store->shadow_round();  // relieves the pool when it runs full
      rig.clock.advance_ns(kMs);
      // The policy's work, summed over restarts (counters start at 0 again).
      const StoreStats ps = rig.store->stats();
      auto add = [](uint64_t now, uint64_t& last, uint64_t& total) {
        total += now >= last ? now - last : now;
        last = now;
      };
      add(ps.bases_freed, last_freed, total_freed);
      add(ps.copies_ahead, last_ahead, total_ahead);
    }
    {
      const StoreStats sst = rig.store->stats();
      std::string zones;
      for (const auto& z : rig.store->zones()) zones += std::to_string(int(z.kind)) + (z.open ? "o" : "") + "/" + std::to_string(z.live_entries) + " ";
      INFO("degraded: " << sst.degraded_reason << "; zones " << zones);
      REQUIRE_FALSE(sst.degraded);
    }
    {
      const Status ci = rig.store->check_index();
      INFO("index: " << ci.to_string() << " after op " << r);
      REQUIRE(ci);
    }
    if (step % 50 == 49) {
      rig.clock.advance_ns(kMs);
      rig.check_history(3);
      rig.check_restore(2);
    }
  }
  INFO("crashes " << crashes);
  REQUIRE(crashes > 0);
  INFO("bases freed " << total_freed << ", copies ahead " << total_ahead);
  if (sp.policy == PolicyKind::kNone) REQUIRE(total_freed > 0);
  if (sp.budget > 0) REQUIRE(total_ahead > 0);
  uint64_t overlapped = 0;  // since the last restart: the pipeline was exercised
  overlapped = rig.store->stats().group_commits_overlapped;
  INFO("group commits overlapping another since the last restart: " << overlapped);
  rig.clock.advance_ns(kMs);
  rig.check_history(20);
  rig.check_restore(10);
  if (tiers == 2) {
    uint64_t on_slow = 0;
    for (const SegmentHistory& h : rig.store->segments()) {
      for (const VersionInfo& v : h.versions) on_slow += v.tier == 1;
    }
    INFO("versions on tier 1");
    REQUIRE(on_slow > 0);
  }
}

TEST_CASE("store: seeded simulation with crashes matches the model", "[store][sim]") { run_sim(1); }

TEST_CASE("store: seeded simulation over two tiers matches the model", "[store][sim]") { run_sim(2); }
// Bases freed as segments leave a short window, and bases copied ahead of
// need by the policy, crashes included: every time still restores exactly.
TEST_CASE("store: seeded simulation with policy none and a short window matches the model", "[store][sim]") {
  run_sim(1, SimPolicy{PolicyKind::kNone, 0, 1});
}
TEST_CASE("store: seeded simulation with copies ahead of need matches the model", "[store][sim]") {
  run_sim(1, SimPolicy{PolicyKind::kSequential, 64 * kSeg, 1});
}

// Short of free room (but above low water), a copy ahead takes the place
// of a speculative base the policy values less, instead of not being made.
TEST_CASE("store: without free room a copy ahead replaces a speculative base worth less", "[store]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  Rig rig(seed, 1024 * kSeg);
  reopen_sequential_unbudgeted(rig);
  std::mt19937_64 rng(seed);
  auto noise = [&] {
    std::vector<uint8_t> d(kSeg);
    for (auto& b : d) b = static_cast<uint8_t>(rng());
    return d;
  };
  auto free_zones = [&] {
    const auto zs = rig.store->zones();
    return std::count_if(zs.begin(), zs.end(), [](const ZoneInfo& z) { return z.kind == pool::ZoneKind::kFree; });
  };
  // A stream over segments 100..102 has the segments after it copied ahead.
  for (uint64_t s = 100; s < 103; ++s) {
    auto d = noise();
    REQUIRE(rig.io(BlockOpKind::kWrite, s * kSeg, d.size(), d.data()));
    rig.clock.advance_ns(kSec / 10);
  }
  rig.store->shadow_round();
  rig.clock.advance_ns(kSec);
  rig.store->shadow_round();
  StoreStats st = rig.store->stats();
  REQUIRE(st.copies_ahead >= 1);
  REQUIRE(rig.store->segment(103).has_value());
  // The stream is long over (its copies are worth nothing now); another
  // writer fills the pool until it is short of free room but above low
  // water (4 of 12 zones; room for copies is 6).
  rig.clock.advance_ns(1000 * kSec);
  uint64_t next = 400;
  while (free_zones() > 5) {
    REQUIRE(next < 1024);
    auto d = noise();
    REQUIRE(rig.io(BlockOpKind::kWrite, next++ * kSeg, d.size(), d.data()));
    rig.clock.advance_ns(kSec / 1000);
  }
  REQUIRE(free_zones() >= 4);
  const StoreStats before = rig.store->stats();
  rig.store->shadow_round();
  const StoreStats after = rig.store->stats();
  // The writer's next segment is copied, in the place of an old copy.
  CHECK(after.copies_ahead > before.copies_ahead);
  CHECK(after.speculative_dropped > before.speculative_dropped);
  CHECK(after.speculative_replaced > before.speculative_replaced);
  CHECK(after.speculative_replaced - before.speculative_replaced <= after.copies_ahead - before.copies_ahead);
  REQUIRE(rig.store->segment(next).has_value());
  CHECK(rig.store->segment(next)->versions.size() == 1);
  REQUIRE(rig.store->check_index());
}

// Incompressible writes much faster than any retention: the pool (12 zones)
// takes eight times its size in journal. Journal writes wait at the last
// free zones while retention is cut to the present; history never
// degrades, nothing acknowledged is lost, and the window that is left
// restores exactly. Reclaimed by the shadow thread as in the daemon, or by
// a thread that reclaims only while journal writes wait (the pool then
// fills to its last zones every time).
TEST_CASE("faults: a pool filled faster than retention frees it slows writes, never degrades", "[store][pool_full]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  // 64 segments: the few that writes in flight pin leave most of the pool
  // to reclaim (with a handful, no prune could free anything).
  constexpr uint64_t kSegs = 64, kPool = (1u << 20) + 12 * (4u << 20);
  Rig rig(seed, kSegs * kSeg, kPool);
  std::vector<uint8_t> model = rig.read_all();
  rig.store->abandon();
  rig.store.reset();
  rig.opts.pool_full_wait_ms = 60000;  // only a store that stops reclaiming gives up (and degrades)
  bool late = false;
  SECTION("the shadow thread") { rig.opts.shadow_thread = true; }
  SECTION("reclaimed only while journal writes wait") { late = true; }
  rig.open();
  std::atomic<bool> done{false};
  std::thread reclaimer;
  if (late) {
    reclaimer = std::thread([&] {
      while (!done) {
        if (rig.store->stats().pool_full_waiting) {
          rig.store->shadow_round();
        } else {
          std::this_thread::yield();
        }
      }
    });
  }
  struct Join {
    std::atomic<bool>& done;
    std::thread& t;
    ~Join() {
      done = true;
      if (t.joinable()) t.join();
    }
  } join{done, reclaimer};
  std::deque<std::pair<int64_t, std::vector<uint8_t>>> states;
  uint64_t written = 0;
  while (written < 8 * kPool) {
    rig.clock.advance_ns(kMs);
    std::vector<std::unique_ptr<RecordingOp>> ops;
    std::vector<std::vector<uint8_t>> data;
    std::vector<uint64_t> offs;
    for (int k = 0; k < 4; ++k) {  // four in flight, in disjoint quarters of the device
      const uint64_t quarter = kSegs * kSeg / 4;
      const uint64_t len = 4096 * (1 + rig.rng() % 32);
      const uint64_t off = k * quarter + 4096 * (rig.rng() % ((quarter - len) / 4096 + 1));
      data.push_back(test::random_bytes(rig.rng, len));
      offs.push_back(off);
      ops.push_back(std::make_unique<RecordingOp>(BlockOpKind::kWrite, off, len, data.back().data(),
                                                  rig.rng() % 8 == 0 ? uint32_t{kFua} : 0u));
      written += len;
    }
    for (auto& op : ops) rig.store->backend()->submit(*rig.loop, op.get());
    test::run_until_done(*rig.loop, ops);
    for (size_t k = 0; k < ops.size(); ++k) {
      REQUIRE(ops[k]->status);
      std::copy(data[k].begin(), data[k].end(), model.begin() + static_cast<std::ptrdiff_t>(offs[k]));
    }
    const StoreStats st = rig.store->stats();
    INFO("degraded: " << st.degraded_reason);
    REQUIRE_FALSE(st.degraded);
    // Requests in the same nanosecond get the next ones as their times:
    // the state is the one after this round's four.
    states.emplace_back(rig.clock.now_ns() + 1000, model);
    if (states.size() > 32) states.pop_front();  // the window is short here
  }
  const StoreStats st = rig.store->stats();
  INFO("shrinks " << st.retention_shrinks << ", waits " << st.pool_full_waits);
  REQUIRE(st.retention_shrinks > 0);
  if (late) REQUIRE(st.pool_full_waits > 0);
  REQUIRE(test::first_difference(rig.read_all(), model) == -1);
  // Every state still in the window restores exactly.
  size_t checked = 0;
  for (const auto& [t, image] : states) {
    if (t < rig.store->stats().retention_start_ns) continue;
    ++checked;
    for (uint64_t seg = 0; seg < kSegs; ++seg) {
      auto got = rig.store->reconstruct_time(seg, t);
      if (!got && got.status().code() == Status::Code::kOutOfRange &&
          t < rig.store->stats().retention_start_ns) {
        break;  // the window moved on meanwhile
      }
      INFO("segment " << seg << ": " << got.status().to_string());
      REQUIRE(got);
      const std::vector<uint8_t> want(image.begin() + static_cast<std::ptrdiff_t>(seg * kSeg),
                                      image.begin() + static_cast<std::ptrdiff_t>((seg + 1) * kSeg));
      REQUIRE(test::first_difference(*got, want) == -1);
    }
  }
  REQUIRE(checked > 0);
}

// Nothing reclaims (no shadow thread): with --pool-full-wait 0 the first
// journal write that finds no zone degrades history at once; with a wait,
// it waits that long first, then degrades. Either way every write is
// acknowledged and lands on the primary.
TEST_CASE("store: journal writes wait at most pool_full_wait_ms for room, then history degrades",
          "[store][pool_full]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  constexpr uint64_t kSegs = 64, kPool = (1u << 20) + 12 * (4u << 20);
  Rig rig(seed, kSegs * kSeg, kPool);
  std::vector<uint8_t> model = rig.read_all();
  rig.store->abandon();
  rig.store.reset();
  uint32_t wait_ms = 0;
  SECTION("no wait") { wait_ms = 0; }
  SECTION("a short wait") { wait_ms = 20; }
  rig.opts.pool_full_wait_ms = wait_ms;
  rig.open();
  uint64_t written = 0;
  while (!rig.store->stats().degraded) {
    INFO("written " << written);
    REQUIRE(written < 4 * kPool);  // the pool holds far less
    const uint64_t off = kSeg * (rig.rng() % kSegs);
    std::vector<uint8_t> d = test::random_bytes(rig.rng, kSeg);
    REQUIRE(rig.io(BlockOpKind::kWrite, off, d.size(), d.data()));
    std::copy(d.begin(), d.end(), model.begin() + static_cast<std::ptrdiff_t>(off));
    written += d.size();
  }
  const StoreStats st = rig.store->stats();
  INFO(st.degraded_reason);
  REQUIRE(st.degraded_reason.find("no free zone") != std::string::npos);
  REQUIRE(st.pool_full_waits == (wait_ms == 0 ? 0u : 1u));
  if (wait_ms > 0) REQUIRE(st.pool_full_wait_ns >= uint64_t{wait_ms} * 1'000'000);
  REQUIRE(test::first_difference(rig.read_all(), model) == -1);
}

TEST_CASE("restore: the gate holds new requests and waits for those in flight", "[restore]") {
  auto loop = test::make_loop();
  auto mem = std::make_shared<MemoryBackend>(16 * kSeg, 7);
  GateBackend gate(mem);
  std::vector<uint8_t> a(4096, 0xaa), b(4096, 0xbb);
  RecordingOp first(BlockOpKind::kWrite, 0, 4096, a.data());
  gate.submit(*loop, &first);  // in flight below the gate
  std::atomic<bool> paused{false};
  std::thread t([&] {
    gate.pause();
    paused = true;
  });
  // pause() cannot return before `first` completes, which needs this loop.
  while (first.done_count == 0) loop->run_once(true);
  t.join();
  REQUIRE(paused);
  REQUIRE(first.status);
  RecordingOp second(BlockOpKind::kWrite, 0, 4096, b.data());
  gate.submit(*loop, &second);
  REQUIRE(gate.held() == 1);
  for (int i = 0; i < 10; ++i) loop->run_once(false);
  REQUIRE(second.done_count == 0);  // held, not failed
  // Below the gate the device still holds what `first` wrote.
  std::vector<uint8_t> got(4096);
  REQUIRE(run_sync(*mem, BlockOpKind::kRead, 0, 4096, got.data()));
  REQUIRE(got == a);
  gate.resume();
  while (second.done_count == 0) loop->run_once(true);
  REQUIRE(second.status);
  REQUIRE(run_sync(*mem, BlockOpKind::kRead, 0, 4096, got.data()));
  REQUIRE(got == b);
  REQUIRE(gate.held() == 0);
}

TEST_CASE("restore: segments changed after a seq, sources and stable seq", "[restore]") {
  Rig rig(test::test_seed());
  std::vector<uint8_t> d(kSeg / 2, 0x42);
  REQUIRE(rig.io(BlockOpKind::kWrite, 1 * kSeg, d.size(), d.data()));  // seq 1: segment 1
  rig.clock.advance_ns(kMs);
  REQUIRE(rig.io(BlockOpKind::kWrite, 3 * kSeg + 10, 100, d.data()));  // seq 2: segment 3
  rig.clock.advance_ns(kMs);
  REQUIRE(rig.io(BlockOpKind::kWriteZeroes, 1 * kSeg, 4096));  // seq 3: segment 1
  REQUIRE(rig.store->stable_seq() == 3);
  REQUIRE(rig.store->segments_changed_after(0) == std::vector<uint64_t>{1, 3});
  REQUIRE(rig.store->segments_changed_after(2) == std::vector<uint64_t>{1});
  REQUIRE(rig.store->segments_changed_after(3).empty());
  REQUIRE(rig.store->source_of(0, 0) == ShadowStore::kFromPrimary);
  REQUIRE(rig.store->source_of(1, 0) == ShadowStore::kFromVersion);  // the copy-on-first-write
  REQUIRE(rig.store->source_of(1, 1) == (ShadowStore::kFromVersion | ShadowStore::kFromJournal));
  REQUIRE(rig.store->source_of(1, 3) == ShadowStore::kFromPrimary);
  REQUIRE(rig.store->time_of(2) < rig.store->time_of(3));
  REQUIRE(rig.store->seq_at(rig.store->time_of(2)) == 2);
  auto at = rig.store->reconstruct_at(1, 1);
  REQUIRE(at);
  REQUIRE(at->source == (ShadowStore::kFromVersion | ShadowStore::kFromJournal));
  REQUIRE(at->versions_decoded == 1);
  REQUIRE(at->records_applied == 1);
  const ShadowStore::VerifyReport rep = rig.store->verify_pool();
  INFO(rep.errors.size());
  REQUIRE(rep.errors.empty());
  REQUIRE(rep.zones_scanned >= 1);
  REQUIRE(rep.versions_checked == 2);  // the two copy-on-first-write versions
  REQUIRE(rep.records_checked > 3);
}

TEST_CASE("restore: read_primary_at serves a run only when every segment is the primary's",
          "[restore]") {
  Rig rig(test::test_seed());
  std::vector<uint8_t> d(kSeg / 2, 0x42);
  REQUIRE(rig.io(BlockOpKind::kWrite, 2 * kSeg + 100, 1000, d.data()));  // seq 1: segment 2
  rig.clock.advance_ns(kMs);
  REQUIRE(rig.io(BlockOpKind::kWrite, 5 * kSeg, 4096, d.data()));  // seq 2: segment 5
  std::vector<uint8_t> want(8 * kSeg), got(3 * kSeg + 123, 0xEE);
  REQUIRE(run_sync(*rig.primary, BlockOpKind::kRead, 0, want.size(), want.data()));
  // Segments 0..2 at seq 1: all from the primary (segment 2's record is at
  // seq 1); an unaligned range across them comes back whole.
  auto r = rig.store->read_primary_at(77, 2 * kSeg + 500, 1, got.data());
  REQUIRE(r);
  REQUIRE(*r);
  REQUIRE(std::equal(got.begin(), got.begin() + 2 * kSeg + 500, want.begin() + 77));
  // At seq 0 segment 2 has a later record: not served, `out` untouched.
  std::fill(got.begin(), got.end(), 0xEE);
  r = rig.store->read_primary_at(0, 3 * kSeg, 0, got.data());
  REQUIRE(r);
  REQUIRE_FALSE(*r);
  REQUIRE(std::all_of(got.begin(), got.end(), [](uint8_t b) { return b == 0xEE; }));
  // Segments 3..4 never written: served at seq 0; 4..5 at seq 1 is not (5).
  r = rig.store->read_primary_at(3 * kSeg, 2 * kSeg, 0, got.data());
  REQUIRE((r && *r));
  r = rig.store->read_primary_at(4 * kSeg, 2 * kSeg, 1, got.data());
  REQUIRE((r && !*r));
  // Past the end: an error, not a fallback.
  REQUIRE_FALSE(rig.store->read_primary_at(7 * kSeg, 2 * kSeg, 2, got.data()));
}

TEST_CASE("restore: verify finds a damaged record", "[restore]") {
  Rig rig(test::test_seed());
  std::vector<uint8_t> d(kSeg, 0x17);
  REQUIRE(rig.io(BlockOpKind::kWrite, 2 * kSeg, d.size(), d.data(), kFua));
  REQUIRE(rig.store->verify_pool().errors.empty());
  // Flip one byte in every 4 KiB block of the first zone's journal data.
  const uint64_t zone0 = 1u << 20;
  std::vector<uint8_t> blk(4096);
  for (uint64_t off = zone0; off < zone0 + 16 * 4096; off += 4096) {
    REQUIRE(run_sync(*rig.pool, BlockOpKind::kRead, off, 4096, blk.data()));
    blk[100] ^= 0xff;
    REQUIRE(run_sync(*rig.pool, BlockOpKind::kWrite, off, 4096, blk.data()));
  }
  const ShadowStore::VerifyReport rep = rig.store->verify_pool();
  REQUIRE_FALSE(rep.errors.empty());
}

}  // namespace
}  // namespace shadowd
