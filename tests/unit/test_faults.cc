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
// A degraded episode is recorded in a state file outside the pool (the
// daemon's --state-dir; here a private directory per rig) before any write
// answered in it is acknowledged; the tests at the end check that a stop or
// a crash in the episode never lets the next start replay the journal over
// such a write, and what happens when that file is slow, cannot be written
// or cannot be read. A write the primary refuses is corrected in the
// journal (what the primary holds replaces the request's record), whole or
// partly landed.
#include <catch2/catch.hpp>

#include <stdlib.h>

#include <cerrno>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <atomic>
#include <thread>
#include <vector>

#include "core/degraded_state.h"
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
constexpr const char* kExport = "faults";

// A private state directory (the daemon's --state-dir), removed at the end.
struct StateDir {
  StateDir() {
    char tmpl[] = "/tmp/shadowd-faults-XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    path = tmpl;
  }
  ~StateDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string path;
};

// The state file, with a gate in front: saves and removals can be held
// (they block until released) or made to fail.
class GatedStateStore final : public DegradedStateStore {
 public:
  explicit GatedStateStore(std::unique_ptr<DegradedStateStore> inner) : inner_(std::move(inner)) {}
  const std::string& where() const override { return inner_->where(); }
  Result<std::optional<DegradedState>> load() override { return inner_->load(); }
  Status save(const DegradedState& s) override {
    if (Status st = pass(); !st) return st;
    Status st = inner_->save(s);
    std::lock_guard<std::mutex> l(mu_);
    saves_ += st.is_ok();
    return st;
  }
  Status clear() override {
    if (Status st = pass(); !st) return st;
    Status st = inner_->clear();
    std::lock_guard<std::mutex> l(mu_);
    clears_ += st.is_ok();
    return st;
  }
  void hold() {
    std::lock_guard<std::mutex> l(mu_);
    held_ = true;
  }
  void release() {
    std::lock_guard<std::mutex> l(mu_);
    held_ = false;
    cv_.notify_all();
  }
  void fail(bool on) {
    std::lock_guard<std::mutex> l(mu_);
    fail_ = on;
  }
  // Block until a save or removal waits at the gate.
  void wait_for_waiter() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return waiting_ > 0; });
  }
  int saves() const {
    std::lock_guard<std::mutex> l(mu_);
    return saves_;
  }
  int clears() const {
    std::lock_guard<std::mutex> l(mu_);
    return clears_;
  }
  int failures() const {
    std::lock_guard<std::mutex> l(mu_);
    return failures_;
  }

 private:
  Status pass() {
    std::unique_lock<std::mutex> l(mu_);
    ++waiting_;
    cv_.notify_all();
    cv_.wait(l, [&] { return !held_; });
    --waiting_;
    if (fail_) {
      ++failures_;
      return Status::error(Status::Code::kIoError, "injected state file error", EIO);
    }
    return Status::ok();
  }
  std::unique_ptr<DegradedStateStore> inner_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool held_ = false, fail_ = false;
  int waiting_ = 0, saves_ = 0, clears_ = 0, failures_ = 0;
};

struct FaultRig {
  explicit FaultRig(uint64_t seed, bool two_tiers = false, bool gated = false)
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
    opts.state_dir = state.path;
    opts.export_name = kExport;
    if (gated) {
      auto file = open_state_file(state.path, kExport, pool_uuid());
      REQUIRE(file);
      gate = std::make_shared<GatedStateStore>(std::move(*file));
      opts.state_store = gate;
    }
    open();
  }
  ~FaultRig() {
    if (gate) gate->release();  // a test that failed while it held the state file
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
  // The host crashes: the store stops dead, the devices drop what was not
  // made durable (the pool's last writes may survive torn). open() starts
  // the daemon again.
  void crash(bool pool_torn = false) {
    store->abandon();
    store.reset();
    pool->crash(pool_torn);
    primary->crash();
  }
  // Let the history restart (it is tried at most once a second).
  void restart_history() {
    clock.advance_ns(2 * kSec);
    store->shadow_round();
  }
  pool::Uuid pool_uuid() const {
    auto sb = ShadowStore::read_superblock(*pool);
    REQUIRE(sb);
    return sb->pool_uuid;
  }
  std::string state_file() const { return state.path + "/" + state_file_name(kExport, pool_uuid()); }
  // The state file's record, if there is one (a FAIL if it does not parse).
  std::optional<DegradedState> state_record() const {
    std::ifstream in(state_file());
    if (!in) return std::nullopt;
    std::stringstream ss;
    ss << in.rdbuf();
    auto d = parse_degraded_state(ss.str());
    if (!d) FAIL("state file: " << d.status().to_string());
    return *d;
  }

  uint64_t seed;
  std::mt19937_64 rng;
  ManualClock clock;
  StateDir state;
  std::shared_ptr<GatedStateStore> gate;
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

// Redo at start-up re-applies journal records the last checkpoint does not
// cover; writes acknowledged while history was degraded never reached the
// journal, so the state file must keep redo off them.
TEST_CASE("faults: a write acknowledged while history is degraded survives a stop and a restart",
          "[faults]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed);
  REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));  // journaled after the last checkpoint
  REQUIRE_FALSE(rig.state_record());
  rig.pool->fail_randomly(BlockOpKind::kWrite, 1.0, EIO);
  REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));  // degrades history, goes to the primary
  // Acknowledged: the episode is on record, covering every seq handed out.
  auto rec = rig.state_record();
  REQUIRE(rec);
  StoreStats s = rig.store->stats();
  REQUIRE(s.degraded);
  CHECK(rec->seq == s.last_seq);
  CHECK(rec->seq >= 2);
  CHECK(rec->pool_uuid == rig.pool_uuid());
  CHECK(rec->primary_id == "/test/primary");
  CHECK(rec->primary_flushed);
  CHECK(rec->reason == s.degraded_reason);
  CHECK(s.state_file == rig.state_file());
  REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));  // bypasses the journal
  REQUIRE(test::first_difference(rig.primary->durable_contents(), rig.model) == -1);
  REQUIRE(rig.store->stop());  // the pool still fails: history cannot restart, the file stays
  rig.store.reset();
  REQUIRE(rig.state_record());
  rig.pool->clear_faults();
  rig.open();
  REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);
  s = rig.store->stats();
  CHECK(s.redo_skipped >= 1);
  CHECK(s.redo_records == 0);
  REQUIRE_FALSE(s.degraded);
  CHECK_FALSE(rig.state_record());  // history restarted with a durable checkpoint: removed
  // History restarted "from now" and is exact from there.
  const int64_t t0 = rig.clock.now_ns();
  const auto seg2_t0 = rig.model_segment(2);
  CHECK(s.retention_start_ns <= t0);
  REQUIRE(rig.write(2 * kSeg + 4096, rig.bytes(4096)));
  auto got = rig.store->reconstruct_time(2, t0);
  REQUIRE(got);
  REQUIRE(test::first_difference(*got, seg2_t0) == -1);
  // A clean stop and start now re-applies nothing and changes nothing.
  REQUIRE(rig.store->stop());
  rig.store.reset();
  rig.open();
  REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);
  CHECK(rig.store->stats().redo_skipped == 0);
}

TEST_CASE("faults: a write acknowledged while history is degraded survives a crash and a restart",
          "[faults]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed);
  REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));
  rig.pool->fail_randomly(BlockOpKind::kWrite, 1.0, EIO);
  REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));
  REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));
  REQUIRE(rig.store->stats().degraded);
  rig.crash();  // the process dies: nothing more is written
  REQUIRE(test::first_difference(rig.primary->durable_contents(), rig.model) == -1);
  REQUIRE(rig.state_record());
  rig.pool->clear_faults();
  rig.open();
  REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);
  CHECK(rig.store->stats().redo_skipped >= 1);
  CHECK_FALSE(rig.store->stats().degraded);
  CHECK_FALSE(rig.state_record());
}

// Per 4 KiB block: what a crash that drops every write not yet flushed
// (or FUA) leaves, if the store keeps every durability promise it made.
struct DurableModel {
  std::vector<uint8_t> live, durable;
  void write(uint64_t off, const std::vector<uint8_t>& d, bool fua) {
    std::copy(d.begin(), d.end(), live.begin() + static_cast<std::ptrdiff_t>(off));
    if (fua) std::copy(d.begin(), d.end(), durable.begin() + static_cast<std::ptrdiff_t>(off));
  }
  void flush() { durable = live; }
};

TEST_CASE("faults: a crash in a degraded episode keeps every FUA and flushed write (seeded)",
          "[faults][crash]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  std::printf("faults crash-in-degraded-episode seed %llu\n", static_cast<unsigned long long>(seed));
  FaultRig rig(seed);
  DurableModel m{rig.model, rig.model};
  // Writes land in 4 segments, so that the episode's writes overwrite
  // journaled ones often.
  auto target = [&](uint64_t blocks) {
    const uint64_t span = 4 * kSeg / 4096;
    return (1 * kSeg) + (rig.rng() % (span - blocks + 1)) * 4096;
  };
  auto one = [&](bool fua) {
    const uint64_t blocks = 1 + rig.rng() % 4;
    const uint64_t off = target(blocks);
    const auto d = rig.bytes(blocks * 4096);
    INFO("write at " << off << " +" << d.size() << (fua ? " FUA" : ""));
    REQUIRE(rig.write(off, d, fua ? kFua : 0u));
    m.write(off, d, fua);
  };
  // Journaled, past the last checkpoint: FUA and not, some flushed.
  const int journaled = 20 + static_cast<int>(rig.rng() % 30);
  for (int i = 0; i < journaled; ++i) {
    one(rig.rng() % 2 == 0);
    if (rig.rng() % 8 == 0) {
      REQUIRE(rig.io(BlockOpKind::kFlush, 0, 0));
      m.flush();
    }
  }
  if (rig.rng() % 2 == 0) REQUIRE(rig.store->checkpoint());  // sometimes a checkpoint in between
  for (int i = 0; i < 10; ++i) one(rig.rng() % 2 == 0);
  // The pool fails under a FUA write: every pool write, or only the flush
  // (the batch is on the device, unflushed; the pool's crash drops or tears it).
  const bool flush_fails = rig.rng() % 2 == 0;
  CAPTURE(flush_fails);
  if (flush_fails) {
    rig.pool->fail_nth(BlockOpKind::kFlush, 1, EIO);
  } else {
    rig.pool->fail_randomly(BlockOpKind::kWrite, 1.0, EIO);
  }
  one(true);
  REQUIRE(rig.store->stats().degraded);
  REQUIRE(rig.state_record());
  // Every write acknowledged so far was flushed to the primary before the
  // state file was written (and before that write was acknowledged).
  CHECK(rig.state_record()->primary_flushed);
  m.flush();
  // The episode: mostly FUA, some plain writes and flushes, some in flight together.
  const int degraded = 20 + static_cast<int>(rig.rng() % 30);
  for (int i = 0; i < degraded; ++i) {
    if (rig.rng() % 5 == 0) {
      std::vector<std::unique_ptr<test::RecordingOp>> ops;
      std::vector<std::vector<uint8_t>> data;
      std::vector<bool> fua;
      for (uint64_t k = 0; k < 4; ++k) {  // distinct blocks of 4 segments
        data.push_back(rig.bytes(4096));
        fua.push_back(rig.rng() % 4 != 0);
        const uint64_t off = (1 + k) * kSeg + (rig.rng() % (kSeg / 4096)) * 4096;
        ops.push_back(std::make_unique<test::RecordingOp>(BlockOpKind::kWrite, off, 4096, data.back().data(),
                                                          fua.back() ? uint32_t{kFua} : 0u));
      }
      rig.clock.advance_ns(kMs);
      for (auto& op : ops) rig.store->backend()->submit(*rig.loop, op.get());
      test::run_until_done(*rig.loop, ops);
      for (size_t k = 0; k < ops.size(); ++k) {
        REQUIRE(ops[k]->status);
        m.write(ops[k]->offset, data[k], fua[k]);
      }
    } else {
      one(rig.rng() % 4 != 0);
    }
    if (rig.rng() % 10 == 0) {
      REQUIRE(rig.io(BlockOpKind::kFlush, 0, 0));
      m.flush();
    }
  }
  REQUIRE(rig.store->stats().degraded);
  REQUIRE(test::first_difference(rig.read_all(), m.live) == -1);
  // The host crashes: the process is gone, the devices drop what was not
  // made durable (the pool's last writes may survive torn).
  rig.crash(/*pool_torn=*/rig.rng() % 2 == 0);
  REQUIRE(test::first_difference(rig.primary->durable_contents(), m.durable) == -1);
  rig.pool->clear_faults();
  rig.open();
  // Recovery re-applied none of the journal's older records over them.
  const StoreStats s = rig.store->stats();
  CHECK(s.redo_records == 0);
  CHECK_FALSE(s.degraded);
  INFO("redo skipped " << s.redo_skipped << " of " << s.recovered_records << " recovered records");
  REQUIRE(test::first_difference(rig.read_all(), m.durable) == -1);
  CHECK_FALSE(rig.state_record());
}

TEST_CASE("faults: no write or flush of a degraded episode is acknowledged before the state file is durable",
          "[faults]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed, /*two_tiers=*/false, /*gated=*/true);
  for (uint64_t s = 0; s < kSegs; ++s) REQUIRE(rig.store->shadow_segment(s));
  REQUIRE(rig.write(3 * kSeg, rig.bytes(8192)));
  rig.gate->hold();
  rig.pool->fail_randomly(BlockOpKind::kWrite, 1.0, EIO);
  const uint64_t primary_writes = rig.primary->ops_completed(BlockOpKind::kWrite);
  const uint64_t primary_flushes = rig.primary->ops_completed(BlockOpKind::kFlush);
  auto d1 = rig.bytes(8192);  // degrades history
  auto d2 = rig.bytes(4096);  // bypasses the journal
  test::RecordingOp w1(BlockOpKind::kWrite, 3 * kSeg, d1.size(), d1.data(), kFua);
  test::RecordingOp w2(BlockOpKind::kWrite, 5 * kSeg, d2.size(), d2.data(), kFua);
  test::RecordingOp fl(BlockOpKind::kFlush, 0, 0);
  rig.store->backend()->submit(*rig.loop, &w1);
  // Both writes and the flush reach the primary; none is answered while
  // the file waits (the state thread flushed the primary, then waits at the
  // gate to write it).
  while (rig.primary->ops_completed(BlockOpKind::kWrite) < primary_writes + 1) rig.loop->run_once(true);
  REQUIRE(rig.store->stats().degraded);
  rig.gate->wait_for_waiter();
  REQUIRE(rig.primary->ops_completed(BlockOpKind::kFlush) == primary_flushes + 1);
  rig.store->backend()->submit(*rig.loop, &w2);
  rig.store->backend()->submit(*rig.loop, &fl);
  while (rig.primary->ops_completed(BlockOpKind::kWrite) < primary_writes + 2 ||
         rig.primary->ops_completed(BlockOpKind::kFlush) < primary_flushes + 2) {
    rig.loop->run_once(true);
  }
  for (int i = 0; i < 8; ++i) rig.loop->run_once(false);  // deliver the completions
  CHECK(w1.done_count == 0);
  CHECK(w2.done_count == 0);
  CHECK(fl.done_count == 0);
  CHECK_FALSE(rig.state_record());
  rig.gate->release();
  while (w1.done_count == 0 || w2.done_count == 0 || fl.done_count == 0) rig.loop->run_once(true);
  REQUIRE(w1.status);
  REQUIRE(w2.status);
  REQUIRE(fl.status);
  REQUIRE(rig.state_record());
  CHECK(rig.gate->saves() == 1);
  // Later writes of the episode wait for nothing more.
  REQUIRE(rig.write(6 * kSeg, rig.bytes(4096), kFua));
  CHECK(rig.gate->saves() == 1);
  // History restarts once the pool works: the file is removed (by the
  // state thread, which stop() lets finish).
  rig.pool->clear_faults();
  rig.restart_history();
  REQUIRE_FALSE(rig.store->stats().degraded);
  REQUIRE(rig.store->stop());
  CHECK(rig.gate->clears() == 1);
  CHECK_FALSE(rig.state_record());
}

TEST_CASE("faults: a state file that cannot be written does not stop the export", "[faults]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed, /*two_tiers=*/false, /*gated=*/true);
  REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));

  SECTION("it fails: writes are acknowledged, stop() says what is at risk") {
    rig.gate->fail(true);
    rig.pool->fail_randomly(BlockOpKind::kWrite, 1.0, EIO);
    REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));
    REQUIRE(rig.write(4 * kSeg, rig.bytes(4096), kFua));
    REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);
    const StoreStats s = rig.store->stats();
    REQUIRE(s.degraded);
    CHECK(s.state_error.find("injected state file error") != std::string::npos);
    CHECK(rig.gate->failures() >= 1);
    CHECK_FALSE(rig.state_record());
    const Status st = rig.store->stop();
    REQUIRE_FALSE(st);
    CHECK(st.message().find("state file") != std::string::npos);
    rig.store.reset();
    // Written by hand, as the log says, before the next start: that start
    // keeps redo off the writes.
    rig.gate->fail(false);
    DegradedState d;
    d.pool_uuid = rig.pool_uuid();
    d.seq = s.last_seq;
    REQUIRE(rig.gate->save(d));
    rig.pool->clear_faults();
    rig.open();
    REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);
  }
  SECTION("it is slow: after the timeout writes are acknowledged without it") {
    rig.store->stop();
    rig.store.reset();
    rig.opts.state_timeout_ms = 50;
    rig.open();
    rig.gate->hold();
    rig.pool->fail_randomly(BlockOpKind::kWrite, 1.0, EIO);
    REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));  // waits for the timeout, not for the file
    REQUIRE(rig.write(3 * kSeg, rig.bytes(4096), kFua));
    CHECK_FALSE(rig.state_record());
    rig.gate->release();  // the file gets written after all
    REQUIRE(rig.store->stop());
    rig.store.reset();
    REQUIRE(rig.state_record());
    rig.pool->clear_faults();
    rig.open();
    REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);
  }
  SECTION("it fails for a while: written on a later try") {
    rig.gate->fail(true);
    rig.pool->fail_randomly(BlockOpKind::kWrite, 1.0, EIO);
    REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg), kFua));
    CHECK_FALSE(rig.store->stats().state_error.empty());
    rig.gate->fail(false);
    REQUIRE(rig.store->stop());  // its last try writes it
    rig.store.reset();
    REQUIRE(rig.state_record());
    rig.pool->clear_faults();
    rig.open();
    REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);
    CHECK(rig.store->stats().state_error.empty());
  }
}

TEST_CASE("faults: a state file that cannot be read, or names another pool, re-applies nothing",
          "[faults]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed);
  REQUIRE(rig.write(1 * kSeg, rig.bytes(kSeg)));
  REQUIRE(rig.write(2 * kSeg, rig.bytes(kSeg)));
  rig.store->abandon();  // records past the checkpoint
  rig.store.reset();
  // Something outside the store changed the primary after them (as a write
  // answered while history was degraded would have).
  const auto other = rig.bytes(kSeg);
  REQUIRE(run_sync(*rig.primary, BlockOpKind::kWrite, 2 * kSeg, kSeg, const_cast<uint8_t*>(other.data())));
  std::copy(other.begin(), other.end(), rig.model.begin() + 2 * kSeg);
  SECTION("unreadable") {
    std::ofstream(rig.state_file()) << "format=1\nseq=12";  // cut short
  }
  SECTION("another pool's") {
    DegradedState d;
    d.pool_uuid = pool::new_uuid();
    d.seq = 0;
    std::ofstream(rig.state_file()) << encode_degraded_state(d);
  }
  rig.open();
  const StoreStats s = rig.store->stats();
  CHECK(s.redo_records == 0);
  CHECK(s.redo_skipped >= 2);
  CHECK_FALSE(s.degraded);
  REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);
  CHECK_FALSE(std::filesystem::exists(rig.state_file()));
}

TEST_CASE("faults: the state file's text", "[faults]") {
  DegradedState d;
  d.pool_uuid = pool::new_uuid();
  d.primary_id = "/srv/disk\nimg";
  d.seq = 18446744073709551615ull;
  d.since_ns = 1'790'000'000'123'456'789LL;
  d.primary_flushed = true;
  d.reason = "journal append failed: Input/output error";
  const std::string text = encode_degraded_state(d);
  CHECK(text.find("since=2026-") != std::string::npos);
  auto back = parse_degraded_state(text);
  REQUIRE(back);
  CHECK(back->pool_uuid == d.pool_uuid);
  CHECK(back->primary_id == "/srv/disk img");  // one line
  CHECK(back->seq == d.seq);
  CHECK(back->since_ns == d.since_ns);
  CHECK(back->primary_flushed);
  CHECK(back->reason == d.reason);
  // Anything cut short or not of this format is refused.
  for (size_t n : {size_t{0}, text.size() / 2, text.size() - 1}) {
    CAPTURE(n);
    CHECK_FALSE(parse_degraded_state(text.substr(0, n)));
  }
  CHECK_FALSE(parse_degraded_state("format=2\npool_uuid=" + pool::uuid_to_string(d.pool_uuid) + "\nseq=1\nend\n"));
  CHECK_FALSE(parse_degraded_state("format=1\npool_uuid=nope\nseq=1\nend\n"));
  CHECK_FALSE(parse_degraded_state("format=1\npool_uuid=" + pool::uuid_to_string(d.pool_uuid) + "\nseq=-1\nend\n"));
  CHECK(parse_degraded_state("format=1\npool_uuid=" + pool::uuid_to_string(d.pool_uuid) + "\nseq=7\nend\n"));
  // The file name: export name made safe, the pool's UUID.
  CHECK(state_file_name("disk", d.pool_uuid) == "disk." + pool::uuid_to_string(d.pool_uuid) + ".degraded");
  CHECK(state_file_name("../a b", d.pool_uuid).rfind("_.._a_b.", 0) == 0);
  CHECK(state_file_name("", d.pool_uuid).rfind("_.", 0) == 0);
}

TEST_CASE("faults: the state directory is created, and one that cannot hold a file is refused", "[faults]") {
  StateDir dir;
  const pool::Uuid u = pool::new_uuid();
  const std::string nested = dir.path + "/a/b/state";
  auto f = open_state_file(nested, "disk", u);
  REQUIRE(f);
  CHECK(std::filesystem::is_directory(nested));
  CHECK((*f)->where() == nested + "/" + state_file_name("disk", u));
  auto none = (*f)->load();
  REQUIRE(none);
  CHECK_FALSE(*none);
  DegradedState d;
  d.pool_uuid = u;
  d.seq = 42;
  REQUIRE((*f)->save(d));
  auto one = (*f)->load();
  REQUIRE(one);
  REQUIRE(*one);
  CHECK((*one)->seq == 42);
  CHECK(find_state_files(nested, "disk") == std::vector<std::string>{(*f)->where()});
  CHECK(find_state_files(nested, "other").empty());
  CHECK(find_state_files(dir.path + "/missing", "disk").empty());
  REQUIRE((*f)->clear());
  REQUIRE((*f)->clear());  // nothing there: fine
  CHECK_FALSE(std::filesystem::exists((*f)->where()));
  // A file where the directory should be.
  std::ofstream(dir.path + "/file") << "x";
  auto bad = open_state_file(dir.path + "/file", "disk", u);
  REQUIRE_FALSE(bad);
  CHECK(bad.status().message().find("--state-dir") != std::string::npos);
  if (::geteuid() != 0) {  // root writes anywhere; others not into a 0555 directory
    std::filesystem::create_directory(dir.path + "/ro");
    std::filesystem::permissions(dir.path + "/ro", std::filesystem::perms::owner_read |
                                                       std::filesystem::perms::owner_exec);
    CHECK_FALSE(open_state_file(dir.path + "/ro", "disk", u));
  }
}

// The journal record of a write goes in before the write reaches the
// primary; when the primary refuses it, the record is replaced by what the
// primary holds in the range (a correction), so history never shows bytes
// the client was told were not written, also after a restart.
TEST_CASE("faults: history never shows a write that the primary refused", "[faults]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed);
  REQUIRE(rig.store->shadow_segment(4));
  rig.primary->fail_nth(BlockOpKind::kWrite, 1, EIO);
  REQUIRE_FALSE(rig.write(4 * kSeg, rig.bytes(4096)));
  const int64_t t = rig.clock.now_ns();
  const auto seg4_t = rig.model_segment(4);
  REQUIRE(rig.write(4 * kSeg + 8192, rig.bytes(4096)));  // the segment changes after t
  const StoreStats st = rig.store->stats();
  REQUIRE(st.primary_write_errors == 1);
  REQUIRE(st.journal_corrections == 1);
  REQUIRE_FALSE(st.degraded);
  auto got = rig.store->reconstruct_time(4, t);
  REQUIRE(got);
  REQUIRE(test::first_difference(*got, seg4_t) == -1);
  // A restart finds the record and its correction in the journal and keeps
  // the correction; the primary is flushed first so that the redo of
  // records past the checkpoint changes nothing.
  REQUIRE(rig.io(BlockOpKind::kFlush, 0, 0));
  rig.crash();
  rig.open();
  REQUIRE(test::first_difference(rig.read_all(), rig.model) == -1);
  got = rig.store->reconstruct_time(4, t);
  REQUIRE(got);
  REQUIRE(test::first_difference(*got, seg4_t) == -1);
}

// Writes, zeroes and trims fail at random and leave a random prefix of
// themselves on the primary (a device failing mid-request); overlapping
// requests are in flight together. After every round the live export and
// history at every earlier round's time equal what the primary held then,
// before and after a crash.
TEST_CASE("faults: refused writes that land in part: history follows the primary (seeded)", "[faults]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  FaultRig rig(seed);
  for (uint64_t seg = 0; seg < kSegs; seg += 2) REQUIRE(rig.store->shadow_segment(seg));  // half with a base
  rig.primary->failed_writes_torn(true);
  std::vector<std::pair<int64_t, std::vector<uint8_t>>> states;  // (time, device) after each round
  uint64_t refused = 0;
  for (int round = 0; round < 40; ++round) {
    INFO("round " << round);
    rig.primary->fail_randomly(BlockOpKind::kWrite, 0.3, EIO);
    rig.primary->fail_randomly(BlockOpKind::kWriteZeroes, 0.3, EIO);
    rig.clock.advance_ns(kMs);
    std::vector<std::unique_ptr<RecordingOp>> ops;
    std::vector<std::vector<uint8_t>> data;
    const int n = 1 + static_cast<int>(rig.rng() % 4);
    for (int k = 0; k < n; ++k) {
      const uint64_t len = 512 * (1 + rig.rng() % 64);
      const uint64_t off = 512 * (rig.rng() % ((kSegs * kSeg - len) / 512 + 1));
      const unsigned r = rig.rng() % 4;
      const BlockOpKind kind = r == 0 ? BlockOpKind::kWriteZeroes : r == 1 ? BlockOpKind::kTrim : BlockOpKind::kWrite;
      data.push_back(kind == BlockOpKind::kWrite ? rig.bytes(len) : std::vector<uint8_t>{});
      ops.push_back(std::make_unique<RecordingOp>(kind, off, len, data.back().empty() ? nullptr : data.back().data(),
                                                  rig.rng() % 3 == 0 ? uint32_t{kFua} : 0u));
    }
    for (auto& op : ops) rig.store->backend()->submit(*rig.loop, op.get());
    test::run_until_done(*rig.loop, ops);
    for (auto& op : ops) refused += !op->status;
    rig.primary->clear_faults();
    rig.primary->failed_writes_torn(true);
    REQUIRE_FALSE(rig.store->stats().degraded);
    // What the device holds is the truth for this round (a refused request
    // left whatever it left).
    states.emplace_back(rig.clock.now_ns(), rig.read_all());
  }
  INFO(refused << " requests refused");
  REQUIRE(refused > 0);
  REQUIRE(rig.store->stats().journal_corrections == refused);
  auto check = [&](const char* when) {
    INFO(when);
    for (size_t i = 0; i < states.size(); ++i) {
      for (uint64_t seg = 0; seg < kSegs; ++seg) {
        INFO("state " << i << " segment " << seg);
        auto got = rig.store->reconstruct_time(seg, states[i].first);
        REQUIRE(got);
        const std::vector<uint8_t> want(states[i].second.begin() + static_cast<std::ptrdiff_t>(seg * kSeg),
                                        states[i].second.begin() + static_cast<std::ptrdiff_t>((seg + 1) * kSeg));
        REQUIRE(test::first_difference(*got, want) == -1);
      }
    }
  };
  check("running");
  REQUIRE(rig.io(BlockOpKind::kFlush, 0, 0));
  rig.crash();
  rig.open();
  REQUIRE(test::first_difference(rig.read_all(), states.back().second) == -1);
  check("after a restart");
}

}  // namespace
}  // namespace shadowd
