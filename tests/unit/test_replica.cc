// The replica shipper (core/replica.h) over in-memory devices: the initial
// copy, writes shipped in flush order, crash consistency of the target,
// falling behind and catching up, sync mode, and the header.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <map>
#include <random>
#include <mutex>
#include <thread>

#include "core/gate_backend.h"
#include "core/memory_backend.h"
#include "core/replica.h"
#include "tests/unit/test_util.h"

namespace shadowd {
namespace {

constexpr uint64_t kMiB = 1ull << 20;

ReplicaOptions sync_options(uint32_t max_lag_s) {
  ReplicaOptions o;
  o.sync = true;
  o.max_lag_s = max_lag_s;
  return o;
}

struct Rig {
  explicit Rig(uint64_t seed, ReplicaOptions o = {}, uint64_t pool_bytes = 4 * kMiB,
               uint64_t primary_bytes = 8 * kMiB)
      : rng(seed) {
    pool = std::make_shared<MemoryBackend>(pool_bytes, seed + 1);
    primary = std::make_shared<MemoryBackend>(primary_bytes, seed + 2);
    layout.primary_id = "/test/primary.img";
    layout.primary_bytes = primary_bytes;
    layout.pool_bytes = {pool_bytes};
    target = std::make_shared<MemoryBackend>(layout.total_bytes(), seed + 3);
    // Some content before the replica starts: the initial copy's job.
    fill(*primary, 0, primary_bytes * 3 / 8);
    fill(*pool, pool_bytes / 4, pool_bytes / 4);
    opts = o;
    if (opts.resync_bytes_per_s == 64ull << 20) opts.resync_bytes_per_s = 0;
  }

  // The replica over `through` (a layer over `target`), or the target itself.
  // `primary_reads`: what the shipper reads the primary's chunks through
  // (the primary itself by default).
  void open(std::shared_ptr<IoBackend> through = nullptr, const char* name = "memory",
            std::shared_ptr<IoBackend> primary_reads = nullptr) {
    auto r = Replica::open(through ? through : target, layout,
                           {pool, primary_reads ? primary_reads : primary}, opts, name);
    REQUIRE(r);
    replica = std::move(*r);
    pool_tap = replica->tap(0);
    primary_tap = replica->tap(1);
  }

  // Opened, started, and the initial copy done.
  void open_in_sync(std::shared_ptr<IoBackend> primary_reads = nullptr) {
    open(nullptr, "memory", std::move(primary_reads));
    replica->start();
    REQUIRE(replica->drain(20000, true));
  }

  void fill(IoBackend& dev, uint64_t off, uint64_t len) {
    std::vector<uint8_t> d(len);
    for (auto& b : d) b = static_cast<uint8_t>(rng());
    REQUIRE(run_sync(dev, BlockOpKind::kWrite, off, len, d.data()));
  }

  // The target's bytes of an area.
  std::vector<uint8_t> target_area(const std::vector<uint8_t>& img, size_t area) const {
    const uint64_t off = area == 0 ? layout.pool_offset(0) : layout.primary_offset();
    const uint64_t len = area == 0 ? layout.pool_bytes[0] : layout.primary_bytes;
    return {img.begin() + static_cast<ptrdiff_t>(off), img.begin() + static_cast<ptrdiff_t>(off + len)};
  }

  void expect_equal() {
    const auto img = target->contents();
    expect_same(target_area(img, 0), pool->contents(), "the pool's area");
    expect_same(target_area(img, 1), primary->contents(), "the primary's mirror");
  }
  // Where two images first differ (not their megabytes of bytes on failure).
  static void expect_same(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want, const char* what) {
    INFO(what);
    REQUIRE(got.size() == want.size());
    const auto d = std::mismatch(got.begin(), got.end(), want.begin());
    CHECK(d.first - got.begin() == static_cast<ptrdiff_t>(got.size()));
  }

  std::mt19937_64 rng;
  std::shared_ptr<MemoryBackend> pool, primary, target;
  ReplicaHeader layout;
  ReplicaOptions opts;
  std::unique_ptr<Replica> replica;
  std::shared_ptr<IoBackend> pool_tap, primary_tap;
};

TEST_CASE("replica: the initial copy, then writes in flush order, equal after draining",
          "[replica]") {
  const uint64_t seed = test::test_seed();
  Rig rig(seed);
  rig.open();
  rig.replica->start();
  REQUIRE(rig.replica->drain(20000, /*whole=*/true));
  ReplicaStats s = rig.replica->stats();
  CHECK(s.state == ReplicaState::kInSync);
  CHECK(s.copied_bytes == rig.layout.pool_bytes[0] + rig.layout.primary_bytes);
  rig.expect_equal();
  auto h = read_replica_header(*rig.target);
  REQUIRE(h);
  CHECK(h->state == ReplicaState::kInSync);
  CHECK(h->primary_id == rig.layout.primary_id);

  // Writes, zeroes and trims through the taps, flushed now and then.
  for (int i = 0; i < 300; ++i) {
    const bool to_pool = rig.rng() % 2 == 0;
    IoBackend& tap = to_pool ? *rig.pool_tap : *rig.primary_tap;
    const uint64_t size = tap.size_bytes();
    const uint64_t len = 512 * (1 + rig.rng() % 256);
    const uint64_t off = (rig.rng() % ((size - len) / 512)) * 512;
    switch (rig.rng() % 8) {
      case 0:
        REQUIRE(run_sync(tap, BlockOpKind::kWriteZeroes, off, len));
        break;
      case 1:
        REQUIRE(run_sync(tap, BlockOpKind::kFlush, 0, 0));
        break;
      default: {
        std::vector<uint8_t> d(len);
        for (auto& b : d) b = static_cast<uint8_t>(rig.rng());
        REQUIRE(run_sync(tap, BlockOpKind::kWrite, off, len, d.data(),
                         rig.rng() % 10 == 0 ? uint32_t{kFua} : 0u));
      }
    }
  }
  REQUIRE(run_sync(*rig.primary_tap, BlockOpKind::kFlush, 0, 0));
  REQUIRE(rig.replica->drain(20000, true));
  rig.expect_equal();
  s = rig.replica->stats();
  CHECK(s.epochs > 0);
  CHECK(s.shipped_bytes > s.copied_bytes);
  CHECK(s.backlog_bytes == 0);
  // What was flushed on the target survives its crash.
  rig.target->crash(false);
  rig.expect_equal();
}

// Records the offsets of the writes (and write-zeroes) sent to the target.
class RecordingTarget final : public LayeredBackend {
 public:
  explicit RecordingTarget(std::shared_ptr<IoBackend> t) : LayeredBackend(std::move(t)) {}
  void submit(EventLoop& loop, BlockOp* op) override {
    if (op->kind == BlockOpKind::kWrite || op->kind == BlockOpKind::kWriteZeroes) {
      std::lock_guard<std::mutex> lock(mu);
      offsets.push_back(op->offset);
    }
    inner_->submit(loop, op);
  }
  std::mutex mu;
  std::vector<uint64_t> offsets;
};

TEST_CASE("replica: the initial copy takes the hot order's chunks first", "[replica]") {
  const uint64_t seed = test::test_seed();
  Rig rig(seed);
  auto recording = std::make_shared<RecordingTarget>(rig.target);
  rig.open(recording, "recording");
  // Segment offsets (not chunk-aligned; one repeated, one past the end):
  // chunks 6, 1 and 4 go first, each once, then the rest by offset.
  rig.replica->set_hot_order({6 * kMiB + 4096, 1 * kMiB, 6 * kMiB, 4 * kMiB + 65536, 64 * kMiB});
  rig.replica->start();
  REQUIRE(rig.replica->drain(20000, /*whole=*/true));
  rig.expect_equal();
  std::vector<uint64_t> primary_chunks;
  {
    std::lock_guard<std::mutex> lock(recording->mu);
    for (uint64_t off : recording->offsets) {
      const uint64_t c = (off - rig.layout.primary_offset()) / kMiB;
      if (off >= rig.layout.primary_offset() &&
          std::find(primary_chunks.begin(), primary_chunks.end(), c) == primary_chunks.end()) {
        primary_chunks.push_back(c);
      }
    }
  }
  INFO("seed " << seed);
  REQUIRE(primary_chunks.size() >= 8);
  CHECK(std::vector<uint64_t>(primary_chunks.begin(), primary_chunks.begin() + 8) ==
        std::vector<uint64_t>{6, 1, 4, 0, 2, 3, 5, 7});
}

TEST_CASE("replica: writes that touch end to end in an epoch go as one request", "[replica]") {
  const uint64_t seed = test::test_seed();
  Rig rig(seed);
  auto gate = std::make_shared<GateBackend>(rig.target);
  auto recording = std::make_shared<RecordingTarget>(gate);
  rig.open(recording, "recording");
  rig.replica->start();
  REQUIRE(rig.replica->drain(20000, /*whole=*/true));
  const size_t before = [&] {
    std::lock_guard<std::mutex> lock(recording->mu);
    return recording->offsets.size();
  }();
  // 64 writes of 4 KiB that touch end to end, in reverse order, then a
  // flush: one epoch. The gate holds the shipper's first request, so the
  // other 63 wait in the queue and go in the next batch.
  gate->pause();
  std::vector<uint8_t> d(4096);
  for (int i = 63; i >= 0; --i) {
    for (auto& b : d) b = static_cast<uint8_t>(rig.rng());
    REQUIRE(run_sync(*rig.primary_tap, BlockOpKind::kWrite, 2 * kMiB + uint64_t(i) * 4096, 4096, d.data()));
    if (i == 63) {  // the shipper has taken it and waits at the gate
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (gate->held() == 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
      REQUIRE(gate->held() == 1);
    }
  }
  REQUIRE(run_sync(*rig.primary_tap, BlockOpKind::kFlush, 0, 0));
  gate->resume();
  REQUIRE(rig.replica->drain(20000, true));
  rig.expect_equal();
  std::lock_guard<std::mutex> lock(recording->mu);
  INFO("seed " << seed);
  std::vector<uint64_t> data_writes;
  for (size_t i = before; i < recording->offsets.size(); ++i) {
    if (recording->offsets[i] >= rig.layout.primary_offset()) data_writes.push_back(recording->offsets[i]);
  }
  // The first write alone (held at the gate), then the other 63 as one.
  CHECK(data_writes.size() == 2);
}

// Checks, before every request the shipper sends to the target, what a
// crash of the target would leave then (unflushed writes surviving whole,
// in part or not at all): with blocks written once each, epoch by epoch, an
// image that holds a block of epoch k holds every block of epochs < k.
class CheckingTarget final : public LayeredBackend {
 public:
  CheckingTarget(std::shared_ptr<MemoryBackend> t, uint64_t primary_offset)
      : LayeredBackend(t), mem_(std::move(t)), poff_(primary_offset) {}
  void submit(EventLoop& loop, BlockOp* op) override {
    check(mem_->crash_image(/*torn=*/true));
    inner_->submit(loop, op);
  }
  void written(uint64_t block, int epoch, std::vector<uint8_t> data) {
    std::lock_guard<std::mutex> lock(mu_);
    epoch_of_[block] = epoch;
    data_of_[block] = std::move(data);
  }
  void check(const std::vector<uint8_t>& img) {
    std::lock_guard<std::mutex> lock(mu_);
    ++checks_;
    int newest = -1;
    for (const auto& [b, e] : epoch_of_) {
      if (has(img, b)) newest = std::max(newest, e);
    }
    for (const auto& [b, e] : epoch_of_) {
      if (e < newest && !has(img, b) && violation_.empty()) {
        violation_ = "block " + std::to_string(b) + " of epoch " + std::to_string(e) +
                     " is missing while epoch " + std::to_string(newest) + " is there";
      }
    }
  }
  std::string violation() {
    std::lock_guard<std::mutex> lock(mu_);
    return violation_;
  }
  uint64_t checks() {
    std::lock_guard<std::mutex> lock(mu_);
    return checks_;
  }
  static constexpr uint64_t kBlock = 4096;

 private:
  bool has(const std::vector<uint8_t>& img, uint64_t b) {
    return std::memcmp(img.data() + poff_ + b * kBlock, data_of_[b].data(), kBlock) == 0;
  }
  std::shared_ptr<MemoryBackend> mem_;
  uint64_t poff_;
  std::mutex mu_;
  std::map<uint64_t, int> epoch_of_;
  std::map<uint64_t, std::vector<uint8_t>> data_of_;
  std::string violation_;
  uint64_t checks_ = 0;
};

TEST_CASE("replica: the target only ever holds the devices' state at a flush", "[replica]") {
  const uint64_t seed = test::test_seed();
  INFO("seed " << seed);
  Rig rig(seed, {}, kMiB, kMiB);
  rig.target->delay_completions(3);
  auto checking = std::make_shared<CheckingTarget>(rig.target, rig.layout.primary_offset());
  rig.open(checking, "checked");
  rig.replica->start();
  REQUIRE(rig.replica->drain(20000, true));
  // Several epochs queue up while the target holds its completions, then
  // ship in one go.
  rig.target->hold_completions();
  const uint64_t blk = CheckingTarget::kBlock;
  std::vector<uint64_t> order(rig.layout.primary_bytes / blk);
  for (uint64_t i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rig.rng);
  size_t next = 0;
  for (int epoch = 0; epoch < 40 && next < order.size(); ++epoch) {
    const int n = 1 + static_cast<int>(rig.rng() % 6);
    for (int i = 0; i < n && next < order.size(); ++i) {
      const uint64_t b = order[next++];
      std::vector<uint8_t> d(blk);
      for (auto& x : d) x = static_cast<uint8_t>(rig.rng() | 1);  // never a zero byte
      checking->written(b, epoch, d);
      REQUIRE(run_sync(*rig.primary_tap, BlockOpKind::kWrite, b * blk, blk, d.data()));
    }
    REQUIRE(run_sync(*rig.primary_tap, BlockOpKind::kFlush, 0, 0));
  }
  CHECK(rig.replica->stats().backlog_entries > 40);
  rig.target->release_completions();
  REQUIRE(rig.replica->drain(20000, true));
  checking->check(rig.target->crash_image(true));
  INFO(checking->checks() << " images checked");
  CHECK(checking->checks() > 100);
  CHECK(checking->violation() == "");
  rig.expect_equal();
}

TEST_CASE("replica: a failing target falls behind, then catches up by copying", "[replica]") {
  const uint64_t seed = test::test_seed();
  ReplicaOptions o;
  o.max_backlog_bytes = 256 * 1024;
  Rig rig(seed, o);
  rig.open_in_sync();
  rig.target->fail_randomly(BlockOpKind::kWrite, 1.0, EIO);
  rig.target->fail_randomly(BlockOpKind::kFlush, 1.0, EIO);
  // More than the backlog limit: writes complete at once, whatever the target does.
  for (int i = 0; i < 64; ++i) {
    std::vector<uint8_t> d(64 * 1024);
    for (auto& b : d) b = static_cast<uint8_t>(rig.rng());
    const uint64_t off = (rig.rng() % (rig.layout.primary_bytes / d.size())) * d.size();
    REQUIRE(run_sync(*rig.primary_tap, BlockOpKind::kWrite, off, d.size(), d.data()));
  }
  REQUIRE(run_sync(*rig.primary_tap, BlockOpKind::kFlush, 0, 0));
  ReplicaStats s = rig.replica->stats();
  CHECK(s.state == ReplicaState::kBehind);
  CHECK(s.overflows == 1);
  CHECK(s.backlog_bytes == 0);
  CHECK(s.dirty_bytes > 0);
  rig.target->clear_faults();
  REQUIRE(rig.replica->drain(20000, true));
  s = rig.replica->stats();
  CHECK(s.state == ReplicaState::kInSync);
  CHECK(s.target_errors > 0);
  rig.expect_equal();
}

TEST_CASE("replica: a write the local device fails, torn, is copied from the device", "[replica]") {
  const uint64_t seed = test::test_seed();
  Rig rig(seed);
  rig.open_in_sync();
  // Each failed write leaves a prefix of itself on the primary (none, all,
  // or cut at a sector): 16 of them leave some with near certainty.
  rig.primary->failed_writes_torn(true);
  for (int i = 0; i < 16; ++i) {
    rig.primary->fail_nth(BlockOpKind::kWrite, 1, EIO);
    std::vector<uint8_t> d(64 * 1024);
    for (auto& b : d) b = static_cast<uint8_t>(rig.rng());
    const uint64_t off = (rig.rng() % (rig.layout.primary_bytes / d.size())) * d.size();
    CHECK_FALSE(run_sync(*rig.primary_tap, BlockOpKind::kWrite, off, d.size(), d.data()));
  }
  rig.primary->clear_faults();
  REQUIRE(run_sync(*rig.primary_tap, BlockOpKind::kFlush, 0, 0));
  CHECK(rig.replica->stats().local_failures == 16);
  REQUIRE(rig.replica->drain(20000, true));
  const ReplicaStats s = rig.replica->stats();
  CHECK(s.state == ReplicaState::kInSync);
  CHECK(s.overflows == 0);
  rig.expect_equal();
}

// A device whose ops of one kind starting below `below` fail with EIO
// while `fail` is set: a target whose header block refuses writes, a
// local device with a bad sector.
class FailsBelow final : public LayeredBackend {
 public:
  FailsBelow(std::shared_ptr<IoBackend> d, BlockOpKind kind, uint64_t below, bool fail_now)
      : LayeredBackend(std::move(d)), kind_(kind), below_(below), fail(fail_now) {}
  void submit(EventLoop& loop, BlockOp* op) override {
    if (fail.load() && op->kind == kind_ && op->offset < below_) {
      op->stage_ = BlockOp::kStageDone;
      op->loop_ = &loop;
      op->backend_ = this;
      loop.defer(op, -EIO);
      return;
    }
    inner_->submit(loop, op);
  }

 private:
  BlockOpKind kind_;
  uint64_t below_;

 public:
  std::atomic<bool> fail;
};

TEST_CASE("replica: a chunk the local device cannot read does not hold up the others",
          "[replica]") {
  const uint64_t seed = test::test_seed();
  Rig rig(seed);
  auto reads = std::make_shared<FailsBelow>(rig.primary, BlockOpKind::kRead, kMiB, false);
  rig.open_in_sync(reads);
  reads->fail = true;
  // A failed write in chunk 0 (unreadable from now on): the replica falls
  // behind; then a write in chunk 5, in the same word of the dirty bitmap.
  std::vector<uint8_t> d(64 * 1024);
  for (auto& b : d) b = static_cast<uint8_t>(rig.rng());
  rig.primary->fail_nth(BlockOpKind::kWrite, 1, EIO);
  CHECK_FALSE(run_sync(*rig.primary_tap, BlockOpKind::kWrite, 0, d.size(), d.data()));
  REQUIRE(run_sync(*rig.primary_tap, BlockOpKind::kWrite, 5 * kMiB, d.size(), d.data()));
  REQUIRE(run_sync(*rig.primary_tap, BlockOpKind::kFlush, 0, 0));
  // Chunk 5 reaches the target while chunk 0 keeps failing (a deadline,
  // not a timing: it stayed behind chunk 0 for ever before).
  const uint64_t at = rig.layout.primary_offset() + 5 * kMiB;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  bool copied = false;
  while (!copied && std::chrono::steady_clock::now() < deadline) {
    const auto img = rig.target->contents();
    copied = std::memcmp(img.data() + at, d.data(), d.size()) == 0;
    if (!copied) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK(copied);
  ReplicaStats s = rig.replica->stats();
  CHECK(s.state == ReplicaState::kBehind);
  CHECK(s.local_failures >= 2);  // the write, and at least one read
  reads->fail = false;
  REQUIRE(rig.replica->drain(20000, true));
  s = rig.replica->stats();
  CHECK(s.state == ReplicaState::kInSync);
  rig.expect_equal();
}

TEST_CASE("replica: nothing is copied out of order before the header says so", "[replica]") {
  // A target still marked in sync by an earlier run must not take copies
  // (which are not in flush order) until its header says "syncing".
  const uint64_t seed = test::test_seed();
  Rig rig(seed);
  rig.open_in_sync();
  rig.replica.reset();
  auto failing = std::make_shared<FailsBelow>(rig.target, BlockOpKind::kWrite, 4096, true);
  rig.fill(*rig.primary, 6 * kMiB, 4096);  // something to copy on the next start
  rig.open(failing, "failing");
  rig.replica->start();
  // Two refused header writes (one per shipper round): a copy between them
  // would have happened by now.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (rig.replica->stats().target_errors < 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
  }
  REQUIRE(rig.replica->stats().target_errors >= 2);
  CHECK(rig.replica->stats().copied_bytes == 0);
  auto h = read_replica_header(*rig.target);
  REQUIRE(h);
  CHECK(h->state == ReplicaState::kInSync);  // the old header, untouched
  failing->fail = false;
  REQUIRE(rig.replica->drain(20000, true));
  CHECK(rig.replica->stats().copied_bytes > 0);
  rig.expect_equal();
}

TEST_CASE("replica: sync mode holds a flush until its epoch is on the target", "[replica]") {
  const uint64_t seed = test::test_seed();
  ReplicaOptions o = sync_options(600);
  Rig rig(seed, o);
  rig.open_in_sync();
  rig.target->hold_completions();
  auto loop = EventLoop::create(8);
  REQUIRE(loop);
  struct Op final : BlockOp {
    void on_done(Status s) override {
      st = s;
      done = true;
    }
    Status st;
    bool done = false;
  };
  std::vector<uint8_t> d(8192, 0x5a);
  Op w;
  w.kind = BlockOpKind::kWrite;
  w.offset = 0;
  w.length = d.size();
  w.buf = d.data();
  rig.primary_tap->submit(**loop, &w);
  while (!w.done) (*loop)->run_once(true);  // a write alone is not held
  Op f;
  f.kind = BlockOpKind::kFlush;
  rig.primary_tap->submit(**loop, &f);
  // The flush reached the local device, but the target holds everything:
  // wait until the shipper's write is held there, then some more loop turns.
  for (int i = 0; i < 100000 && rig.target->held_completions() == 0; ++i) std::this_thread::yield();
  REQUIRE(rig.target->held_completions() > 0);
  for (int i = 0; i < 20; ++i) (*loop)->run_once(false);
  CHECK_FALSE(f.done);
  rig.target->release_completions();  // and stop holding: the shipper goes on
  while (!f.done) (*loop)->run_once(true);
  CHECK(f.st.is_ok());
  // The flushed write is durable on the target.
  const auto img = rig.target->durable_contents();
  CHECK(std::memcmp(img.data() + rig.layout.primary_offset(), d.data(), d.size()) == 0);
}

TEST_CASE("replica: sync mode releases a flush after max_lag_s when the target fails",
          "[replica]") {
  const uint64_t seed = test::test_seed();
  ReplicaOptions o = sync_options(1);
  Rig rig(seed, o);
  rig.open_in_sync();
  rig.target->fail_randomly(BlockOpKind::kWrite, 1.0, EIO);
  rig.target->fail_randomly(BlockOpKind::kFlush, 1.0, EIO);
  std::vector<uint8_t> d(8192, 0x33);
  REQUIRE(run_sync(*rig.primary_tap, BlockOpKind::kWrite, 0, d.size(), d.data()));
  // Without the release this flush would wait for as long as the target
  // fails (run_sync would not return).
  REQUIRE(run_sync(*rig.primary_tap, BlockOpKind::kFlush, 0, 0));
  const ReplicaStats s = rig.replica->stats();
  CHECK(s.sync_lapses == 1);
  CHECK(s.target_errors > 0);
  rig.target->clear_faults();
  REQUIRE(rig.replica->drain(20000, true));
  rig.expect_equal();
}

TEST_CASE("replica: sync mode releases a flush after max_lag_s while a target request hangs",
          "[replica]") {
  const uint64_t seed = test::test_seed();
  ReplicaOptions o = sync_options(1);
  Rig rig(seed, o);
  rig.open_in_sync();
  // The target takes requests and never answers (until released): the
  // shipper waits inside a request.
  rig.target->hold_completions();
  std::vector<uint8_t> d(8192, 0x44);
  REQUIRE(run_sync(*rig.primary_tap, BlockOpKind::kWrite, 0, d.size(), d.data()));
  auto flush = std::async(std::launch::async, [&] {
    return run_sync(*rig.primary_tap, BlockOpKind::kFlush, 0, 0);
  });
  // A deadline, not a timing: without the release the flush waits as long
  // as the target holds its answers.
  const bool released = flush.wait_for(std::chrono::seconds(60)) == std::future_status::ready;
  rig.target->release_completions();
  REQUIRE(released);
  CHECK(flush.get());
  CHECK(rig.replica->stats().sync_lapses == 1);
  REQUIRE(rig.replica->drain(20000, true));
  rig.expect_equal();
}

TEST_CASE("replica: stop() is bounded while a target request hangs", "[replica]") {
  const uint64_t seed = test::test_seed();
  ReplicaOptions o = sync_options(1);
  o.stop_timeout_ms = 200;
  o.stop_grace_ms = 200;
  Rig rig(seed, o);
  rig.open_in_sync();
  rig.target->hold_completions();
  std::vector<uint8_t> d(8192, 0x55);
  REQUIRE(run_sync(*rig.primary_tap, BlockOpKind::kWrite, 0, d.size(), d.data()));
  REQUIRE(run_sync(*rig.primary_tap, BlockOpKind::kFlush, 0, 0));  // released after max_lag_s
  // The shipper is inside a target request that does not complete. A
  // deadline, not a timing: without the bound stop() waits for the target.
  auto stopped = std::async(std::launch::async, [&] { return rig.replica->stop(); });
  const bool returned = stopped.wait_for(std::chrono::seconds(60)) == std::future_status::ready;
  if (!returned) rig.target->release_completions();
  REQUIRE(returned);
  CHECK_FALSE(stopped.get());  // the shipper was left behind
  CHECK_FALSE(rig.replica->stop());
  const ReplicaStats s = rig.replica->stats();  // still answers
  CHECK(s.sync_lapses == 1);
  // The target answers at last: the shipper left behind ends on its own;
  // destroying the Replica leaves it its state.
  rig.target->release_completions();
  rig.replica.reset();
}

TEST_CASE("replica: a restart compares with its earlier copy; another backing's is overwritten",
          "[replica]") {
  const uint64_t seed = test::test_seed();
  Rig rig(seed);
  rig.open_in_sync();
  rig.replica.reset();
  // Same layout: nothing changed, nothing written but the header.
  rig.open_in_sync();
  CHECK(rig.replica->stats().shipped_bytes == 0);
  rig.replica.reset();
  // A changed primary while no replica ran: only what differs is written.
  rig.fill(*rig.primary, 5 * kMiB, 100000);
  rig.open_in_sync();
  CHECK(rig.replica->stats().shipped_bytes == kMiB);  // the one chunk it touches
  rig.expect_equal();
  rig.replica.reset();
  // Another backing: everything is copied again.
  rig.layout.primary_id = "/another/primary.img";
  rig.open_in_sync();
  CHECK(rig.replica->stats().copied_bytes == rig.layout.pool_bytes[0] + rig.layout.primary_bytes);
  auto h = read_replica_header(*rig.target);
  REQUIRE(h);
  CHECK(h->primary_id == "/another/primary.img");
}

TEST_CASE("replica: a target too small or read-only is refused", "[replica]") {
  Rig rig(test::test_seed());
  auto small = std::make_shared<MemoryBackend>(rig.layout.total_bytes() - 4096, 9);
  auto r = Replica::open(small, rig.layout, {rig.pool, rig.primary}, {}, "small");
  REQUIRE_FALSE(r);
  CHECK(r.status().message().find("needs") != std::string::npos);
  auto ro = std::make_shared<MemoryBackend>(rig.layout.total_bytes(), 9, /*read_only=*/true);
  CHECK_FALSE(Replica::open(ro, rig.layout, {rig.pool, rig.primary}, {}, "ro"));
  CHECK_FALSE(Replica::open(rig.target, rig.layout, {rig.pool}, {}, "one area"));
}

TEST_CASE("replica: header round trip and damage", "[replica]") {
  ReplicaHeader h;
  h.state = ReplicaState::kBehind;
  h.primary_id = "rbd:pool/img";
  h.primary_bytes = 123456789;
  h.pool_bytes = {1ull << 30, 4ull << 30};
  h.epoch = 77;
  h.updated_ns = 1795000000123456789;
  auto block = encode_replica_header(h);
  REQUIRE(block.size() == 4096);
  auto d = decode_replica_header(block);
  REQUIRE(d);
  CHECK(d->state == h.state);
  CHECK(d->primary_id == h.primary_id);
  CHECK(d->primary_bytes == h.primary_bytes);
  CHECK(d->pool_bytes == h.pool_bytes);
  CHECK(d->epoch == 77);
  CHECK(d->updated_ns == h.updated_ns);
  CHECK(h.primary_offset() == (1ull << 20) + (5ull << 30));
  block[100] ^= 1;
  CHECK(decode_replica_header(block).status().code() == Status::Code::kCorruption);
  std::vector<uint8_t> zero(4096, 0);
  CHECK(decode_replica_header(zero).status().code() == Status::Code::kNotFound);
}

}  // namespace
}  // namespace shadowd
