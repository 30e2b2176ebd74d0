// Faults below the shadow store, at the engine level, over the in-memory
// fault-injecting backend: the primary failing (EIO on reads, on writes, on
// the read of a copy-on-first-write), the pool failing once in a pipeline of
// journal batches, the pool's flush failing under a FUA write, the pool's
// reads failing under reconstruction, and a stop while the pool fails. In
// every case a model of what was acknowledged is checked: the export never
// returns bytes that were not acknowledged, and never loses one that was.
// test_shadow_store.cc already covers a pool failing every write (EIO), a
// pool running out of space (ENOSPC) and crashes that drop or tear the
// pool's unflushed writes (the seeded simulation).
//
// Tests marked [!shouldfail] show known bugs: they pass while the bug is
// there and fail once it is fixed (then drop the tag).
#include <catch2/catch.hpp>

#include <cerrno>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "core/memory_backend.h"
#include "core/monitor.h"
#include "core/shadow_store.h"
#include "test_util.h"

namespace shadowd {
namespace {

using test::RecordingOp;

constexpr uint32_t kSeg = 64 * 1024;
constexpr int64_t kMs = 1'000'000;
constexpr int64_t kSec = 1'000'000'000;
constexpr uint64_t kSegs = 8;
constexpr uint64_t kPoolBytes = (1u << 20) + 12 * (4u << 20);

struct FaultRig {
  explicit FaultRig(uint64_t seed, bool two_tiers = false)
      : seed(seed), rng(seed), clock(1'790'000'000LL * kSec) {
    loop = test::make_loop();
    primary = std::make_shared<MemoryBackend>(kSegs * kSeg, seed);
    pool = std::make_shared<MemoryBackend>(kPoolBytes, seed ^ 0x5eed);
    if (two_tiers) {
      pool2 = std::make_shared<MemoryBackend>(kPoolBytes, seed ^ 0x7ee2);
      // A monitor that has seen no access ranks no segment hot, so versions
      // made by shadow_segment() go to tier 1.
      MonitorConfig mc;
      mc.device_bytes = kSegs * kSeg;
      mc.segment_bytes = kSeg;
      monitor = std::make_unique<Monitor>(mc, clock);
    }
    model.resize(kSegs * kSeg);
    for (size_t i = 0; i < model.size(); i += 512) model[i] = static_cast<uint8_t>(rng());
    REQUIRE(run_sync(*primary, BlockOpKind::kWrite, 0, model.size(), model.data()));
    REQUIRE(run_sync(*primary, BlockOpKind::kFlush, 0, 0));
    FormatOptions fo;
    fo.primary_id = "/test/primary";
    fo.primary_bytes = model.size();
    fo.segment_bytes = kSeg;
    fo.zone_bytes = 4u << 20;
    REQUIRE(ShadowStore::format(devices(), fo, clock));
    clock.advance_ns(kSec);
    opts.primary_id = "/test/primary";
    opts.segment_bytes = kSeg;
    opts.shadow_thread = false;
    opts.retention_seconds = 1'000'000;
    opts.checkpoint_interval_s = 1'000'000;
    opts.shadow_budget_bytes_per_s = 0;  // versions only when a test asks
    opts.policy = PolicyKind::kLru;      // and no copies ahead of need
    open();
  }
  ~FaultRig() {
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
    clock.advance_ns(kMs);
    RecordingOp op(kind, off, len, buf, flags);
    return test::run_on(*loop, *store->backend(), op);
  }
  // A write the model takes only if it is acknowledged.
  Status write(uint64_t off, const std::vector<uint8_t>& d, uint32_t flags = 0) {
    std::vector<uint8_t> buf = d;
    Status st = io(BlockOpKind::kWrite, off, buf.size(), buf.data(), flags);
    if (st) std::copy(d.begin(), d.end(), model.begin() + static_cast<std::ptrdiff_t>(off));
    return st;
  }
  std::vector<uint8_t> read_all() {
    std::vector<uint8_t> out(model.size());
    REQUIRE(io(BlockOpKind::kRead, 0, out.size(), out.data()));
    return out;
  }
  std::vector<uint8_t> bytes(size_t n) { return test::random_bytes(rng, n); }
  std::vector<uint8_t> model_segment(uint64_t seg) const {
    return std::vector<uint8_t>(model.begin() + static_cast<std::ptrdiff_t>(seg * kSeg),
                                model.begin() + static_cast<std::ptrdiff_t>((seg + 1) * kSeg));
  }
  // Let the history restart (it is tried at most once a second).
  void restart_history() {
    clock.advance_ns(2 * kSec);
    store->shadow_round();
  }

  uint64_t seed;
  std::mt19937_64 rng;
  ManualClock clock;
  std::unique_ptr<EventLoop> loop;
  std::shared_ptr<MemoryBackend> primary, pool, pool2;
  std::unique_ptr<Monitor> monitor;
  StoreOptions opts;
  std::unique_ptr<ShadowStore> store;
  std::vector<uint8_t> model;
};

TEST_CASE("faults: primary read and write errors reach the client, other requests go on", "[faults]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed);
  // Every segment gets a base first, so that no write below reads the primary.
  for (uint64_t s = 0; s < kSegs; ++s) REQUIRE(rig.store->shadow_segment(s));

  SECTION("a failed read: EIO, the buffer is not passed off as data, the next read works") {
    rig.primary->fail_nth(BlockOpKind::kRead, 1, EIO);
    std::vector<uint8_t> buf(kSeg, 0xEE);
    const Status st = rig.io(BlockOpKind::kRead, 2 * kSeg, kSeg, buf.data());
    REQUIRE_FALSE(st);
    REQUIRE(st.err() == EIO);
    REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);
  }
  SECTION("a failed write: EIO, the primary keeps what it had, later writes land") {
    const auto before = rig.primary->contents();
    rig.primary->fail_nth(BlockOpKind::kWrite, 1, EIO);
    const Status st = rig.write(3 * kSeg + 4096, rig.bytes(8192), kFua);
    REQUIRE_FALSE(st);
    REQUIRE(st.err() == EIO);
    REQUIRE(test::first_difference(rig.primary->contents(), before) == -1);
    for (int i = 0; i < 20; ++i) {
      const uint64_t off = (rig.rng() % (kSegs * kSeg / 4096 - 4)) * 4096;
      REQUIRE(rig.write(off, rig.bytes(4096 * (1 + rig.rng() % 4)), i % 2 ? uint32_t{kFua} : 0u));
    }
    REQUIRE(rig.io(BlockOpKind::kFlush, 0, 0));
    REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);
    rig.primary->crash();
    REQUIRE(test::first_difference(rig.primary->durable_contents(), rig.model) == -1);
    const StoreStats s = rig.store->stats();
    REQUIRE(s.primary_write_errors == 1);
    REQUIRE_FALSE(s.degraded);  // a primary error is not a pool error
  }
  SECTION("errors on writes in flight together fail those writes only") {
    rig.primary->fail_randomly(BlockOpKind::kWrite, 0.5, EIO);
    std::vector<std::unique_ptr<RecordingOp>> ops;
    std::vector<std::vector<uint8_t>> data;
    for (uint64_t i = 0; i < 16; ++i) {  // 16 distinct 16 KiB blocks over all segments
      data.push_back(rig.bytes(16384));
      ops.push_back(std::make_unique<RecordingOp>(BlockOpKind::kWrite, i * 32768, 16384, data.back().data()));
    }
    for (auto& op : ops) rig.store->backend()->submit(*rig.loop, op.get());
    test::run_until_done(*rig.loop, ops);
    rig.primary->clear_faults();
    int failed = 0;
    for (size_t i = 0; i < ops.size(); ++i) {
      if (ops[i]->status) {
        std::copy(data[i].begin(), data[i].end(), rig.model.begin() + static_cast<std::ptrdiff_t>(i * 32768));
      } else {
        REQUIRE(ops[i]->status.err() == EIO);
        ++failed;
      }
    }
    INFO(failed << " of 16 writes failed");
    REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);  // a failed write left its block as it was
    REQUIRE(rig.store->stats().primary_write_errors == static_cast<uint64_t>(failed));
  }
}

TEST_CASE("faults: a primary read error under copy-on-first-write degrades history, not the export",
          "[faults]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed);
  // Segment 5 has no base: its first write reads it from the primary first.
  rig.primary->fail_nth(BlockOpKind::kRead, 1, EIO);
  REQUIRE(rig.write(5 * kSeg + 512, rig.bytes(4096)));
  StoreStats s = rig.store->stats();
  REQUIRE(s.degraded);
  REQUIRE(s.degraded_reason.find("Input/output error") != std::string::npos);
  REQUIRE(s.cow_stalls == 0);
  REQUIRE(rig.write(6 * kSeg, rig.bytes(kSeg), kFua));
  REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);
  // The primary reads again: history restarts, and holds what follows.
  rig.restart_history();
  s = rig.store->stats();
  REQUIRE_FALSE(s.degraded);
  const int64_t t0 = rig.clock.now_ns();
  const auto seg5_t0 = rig.model_segment(5);
  REQUIRE(rig.write(5 * kSeg, rig.bytes(kSeg / 2)));
  auto got = rig.store->reconstruct_time(5, t0);
  REQUIRE(got);
  REQUIRE(test::first_difference(*got, seg5_t0) == -1);
}

TEST_CASE("faults: a background copy that cannot read the primary leaves history alone", "[faults]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed);
  // Segments 5 and 6 get a base and then many records each, 5 more than 6:
  // both are stale, 5 first in line for a newer version.
  const int64_t t0 = rig.clock.now_ns();
  const auto seg5_t0 = rig.model_segment(5);
  for (int i = 0; i < 24; ++i) REQUIRE(rig.write(5 * kSeg + (i % 16) * 4096, rig.bytes(4096)));
  for (int i = 0; i < 18; ++i) REQUIRE(rig.write(6 * kSeg + (i % 16) * 4096, rig.bytes(4096)));
  StoreStats s = rig.store->stats();
  const int64_t window = s.retention_start_ns;
  const uint64_t made = s.versions_made;

  SECTION("shadow_segment") {
    rig.primary->fail_nth(BlockOpKind::kRead, 1, EIO);
    const Status st = rig.store->shadow_segment(3);  // a segment without history
    REQUIRE_FALSE(st);
    REQUIRE(st.err() == EIO);
    REQUIRE(rig.store->shadow_segment(3));  // the primary reads again
  }
  SECTION("the shadow thread's round skips the segment and goes on with the next") {
    rig.store->set_budget(1ull << 30);
    rig.store->shadow_round();  // starts the budget's clock
    rig.primary->fail_nth(BlockOpKind::kRead, 1, EIO);  // segment 5's read
    rig.clock.advance_ns(kSec);
    rig.store->shadow_round();
    auto h6 = rig.store->segment(6);
    REQUIRE(h6);
    REQUIRE(h6->versions.size() == 2);  // its base and the new version
    auto h5 = rig.store->segment(5);
    REQUIRE(h5);
    REQUIRE(h5->versions.size() == 1);  // left alone for now
    REQUIRE(rig.store->stats().versions_made == made + 1);
  }
  s = rig.store->stats();
  REQUIRE_FALSE(s.degraded);
  REQUIRE(s.retention_start_ns == window);  // history was not restarted
  auto got = rig.store->reconstruct_time(5, t0);
  REQUIRE(got);
  REQUIRE(test::first_difference(*got, seg5_t0) == -1);
  REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);
}

TEST_CASE("faults: one failed journal batch among several in flight loses no acknowledged write",
          "[faults]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed);
  for (uint64_t s = 0; s < kSegs; ++s) REQUIRE(rig.store->shadow_segment(s));
  rig.pool->delay_completions(3);  // batches complete out of order
  const uint64_t nth = 1 + rig.rng() % 4;
  CAPTURE(nth);
  rig.pool->fail_nth(BlockOpKind::kWrite, nth, EIO);
  for (int round = 0; round < 6; ++round) {
    std::vector<std::unique_ptr<RecordingOp>> ops;
    std::vector<std::vector<uint8_t>> data;
    for (uint64_t i = 0; i < 8; ++i) {
      data.push_back(rig.bytes(8192));
      const uint64_t off = (i * kSegs / 8) * kSeg + (rig.rng() % 7) * 8192;
      ops.push_back(std::make_unique<RecordingOp>(BlockOpKind::kWrite, off, 8192, data.back().data(),
                                                  i % 3 == 0 ? uint32_t{kFua} : 0u));
    }
    rig.clock.advance_ns(kMs);
    for (auto& op : ops) rig.store->backend()->submit(*rig.loop, op.get());
    test::run_until_done(*rig.loop, ops);
    for (size_t i = 0; i < ops.size(); ++i) {
      INFO("round " << round << " write " << i << ": " << ops[i]->status.to_string());
      REQUIRE(ops[i]->status);  // the pool never fails the export
      std::copy(data[i].begin(), data[i].end(), rig.model.begin() + static_cast<std::ptrdiff_t>(ops[i]->offset));
    }
  }
  REQUIRE(rig.io(BlockOpKind::kFlush, 0, 0));
  REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);
  rig.primary->crash();  // every write was FUA or flushed since
  REQUIRE(test::first_difference(rig.primary->durable_contents(), rig.model) == -1);
  REQUIRE(rig.store->stats().degraded);
  rig.pool->clear_faults();
  rig.restart_history();
  REQUIRE_FALSE(rig.store->stats().degraded);
  // History after the restart is exact.
  const int64_t t0 = rig.clock.now_ns();
  const auto image_t0 = rig.model;
  for (int i = 0; i < 10; ++i) {
    const uint64_t off = (rig.rng() % (kSegs * kSeg / 4096 - 2)) * 4096;
    REQUIRE(rig.write(off, rig.bytes(8192)));
  }
  for (uint64_t seg = 0; seg < kSegs; ++seg) {
    auto got = rig.store->reconstruct_time(seg, t0);
    REQUIRE(got);
    REQUIRE(test::first_difference(*got, std::vector<uint8_t>(image_t0.begin() + static_cast<std::ptrdiff_t>(seg * kSeg),
                                                               image_t0.begin() + static_cast<std::ptrdiff_t>((seg + 1) * kSeg))) == -1);
  }
}

TEST_CASE("faults: a failed pool flush under a FUA write still leaves the write durable", "[faults]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed);
  for (uint64_t s = 0; s < kSegs; ++s) REQUIRE(rig.store->shadow_segment(s));
  rig.pool->fail_nth(BlockOpKind::kFlush, 1, EIO);
  REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));
  REQUIRE(rig.store->stats().degraded);
  REQUIRE(rig.write(4 * kSeg + 4096, rig.bytes(4096), kFua));  // while degraded
  rig.primary->crash();
  REQUIRE(test::first_difference(rig.primary->durable_contents(), rig.model) == -1);
}

TEST_CASE("faults: pool read errors fail a reconstruction, never give other bytes", "[faults]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed);
  const int64_t t0 = rig.clock.now_ns();
  const auto seg1_t0 = rig.model_segment(1);
  REQUIRE(rig.write(1 * kSeg + 100, rig.bytes(3000)));  // a copy-on-first-write version, a record
  REQUIRE(rig.write(1 * kSeg + 9000, rig.bytes(5000)));
  const int64_t t1 = rig.clock.now_ns();
  const auto seg1_t1 = rig.model_segment(1);
  REQUIRE(rig.write(1 * kSeg, rig.bytes(kSeg)));
  rig.pool->fail_randomly(BlockOpKind::kRead, 1.0, EIO);
  for (int64_t t : {t0, t1}) {
    auto got = rig.store->reconstruct_time(1, t);
    REQUIRE_FALSE(got);
  }
  REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);  // the live export reads the primary
  REQUIRE_FALSE(rig.store->stats().degraded);  // reads do not change the pool
  rig.pool->clear_faults();
  auto got0 = rig.store->reconstruct_time(1, t0);
  REQUIRE(got0);
  REQUIRE(test::first_difference(*got0, seg1_t0) == -1);
  auto got1 = rig.store->reconstruct_time(1, t1);
  REQUIRE(got1);
  REQUIRE(test::first_difference(*got1, seg1_t1) == -1);
}

TEST_CASE("faults: verify does not report records appended while it scans", "[faults][verify]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed, /*two_tiers=*/true);
  REQUIRE(rig.write(0, rig.bytes(4096)));    // the journal zone on tier 0
  REQUIRE(rig.store->shadow_segment(3));     // a version on tier 1
  REQUIRE(rig.store->verify_pool().errors.empty());
  // verify reads tier 0, then blocks on its read of tier 1 while a write is
  // journaled on tier 0 behind the part it has read.
  rig.pool2->hold_completions();
  ShadowStore::VerifyReport rep;
  std::thread verifier([&] { rep = rig.store->verify_pool(); });
  while (rig.pool2->held_completions() == 0) std::this_thread::yield();
  REQUIRE(rig.write(4096, rig.bytes(4096)));
  rig.pool2->release_completions();
  verifier.join();
  INFO((rep.errors.empty() ? std::string() : rep.errors.front()));
  REQUIRE(rep.errors.empty());
  REQUIRE(rep.zones_scanned >= 2);
  REQUIRE(rig.store->verify_pool().errors.empty());
}

// Known bug: redo at start-up re-applies journal records the last checkpoint
// does not cover, over writes acknowledged while history was degraded (those
// never reached the journal).
TEST_CASE("faults: a write acknowledged while history is degraded survives a stop and a restart",
          "[faults][!shouldfail]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed);
  REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));  // journaled after the last checkpoint
  rig.pool->fail_randomly(BlockOpKind::kWrite, 1.0, EIO);
  REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));  // degrades history, goes to the primary
  REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));  // bypasses the journal
  REQUIRE(rig.store->stats().degraded);
  REQUIRE(test::first_difference(rig.primary->durable_contents(), rig.model) == -1);
  REQUIRE(rig.store->stop());
  rig.store.reset();
  rig.pool->clear_faults();
  rig.open();
  REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);
}

TEST_CASE("faults: a write acknowledged while history is degraded survives a crash and a restart",
          "[faults][!shouldfail]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed);
  REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));
  rig.pool->fail_randomly(BlockOpKind::kWrite, 1.0, EIO);
  REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));
  REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));
  REQUIRE(rig.store->stats().degraded);
  rig.store->abandon();  // the process dies: nothing more is written
  rig.store.reset();
  rig.pool->crash();
  rig.primary->crash();
  REQUIRE(test::first_difference(rig.primary->durable_contents(), rig.model) == -1);
  rig.pool->clear_faults();
  rig.open();
  REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);
}

// Known bug: a write whose primary write failed keeps its journal record, so
// history shows it from then on.
TEST_CASE("faults: history never shows a write that the primary refused", "[faults][!shouldfail]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed);
  REQUIRE(rig.store->shadow_segment(4));
  rig.primary->fail_nth(BlockOpKind::kWrite, 1, EIO);
  REQUIRE_FALSE(rig.write(4 * kSeg, rig.bytes(4096)));
  const int64_t t = rig.clock.now_ns();
  const auto seg4_t = rig.model_segment(4);
  REQUIRE(rig.write(4 * kSeg + 8192, rig.bytes(4096)));  // the segment changes after t
  auto got = rig.store->reconstruct_time(4, t);
  REQUIRE(got);
  REQUIRE(test::first_difference(*got, seg4_t) == -1);
}

}  // namespace
}  // namespace shadowd
