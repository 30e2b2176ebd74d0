// A seeded in-memory IoBackend with fault injection, for tests.
//
// It models a disk with a volatile write cache: a completed write is visible
// to reads at once but survives crash() only after a flush (or if it carried
// kFua). Faults are either scheduled (fail the n-th op of a kind) or random
// (a probability per op, drawn from the seeded generator), so a failing
// randomized test reproduces from its printed seed.
//
// Completions are delivered through EventLoop::defer(), never from inside
// submit(), like a real asynchronous device.
#pragma once

#include <cstdint>
#include <mutex>
#include <random>
#include <vector>

#include "core/io_backend.h"

namespace shadowd {

class MemoryBackend final : public IoBackend {
 public:
  // REQUIRES: size_bytes fits in memory.
  MemoryBackend(uint64_t size_bytes, uint64_t seed, bool read_only = false);

  const BackendInfo& info() const override { return info_; }
  void submit(EventLoop& loop, BlockOp* op) override;
  Result<Extent> extent_at(uint64_t offset, uint64_t max_len) override;

  uint64_t seed() const { return seed_; }

  // ---- fault injection (thread-safe) ----
  // Fail the n-th (1-based, counted from now) op of `kind` with -err.
  void fail_nth(BlockOpKind kind, uint64_t n, int err);
  // Fail each op of `kind` with probability p (0..1) with -err.
  void fail_randomly(BlockOpKind kind, double p, int err);
  // After `bytes` more bytes written (kWrite and kWriteZeroes lengths), writes
  // fail with ENOSPC. A write that does not fit in what is left fails whole
  // and uses nothing up, so a smaller later write may still succeed.
  void enospc_after(uint64_t bytes);
  // When `torn`, a write, write-zeroes or trim that fails with an injected
  // fault first writes a prefix of itself (none, all, or cut at a sector
  // boundary, drawn from the seeded generator), as a device that fails in
  // the middle of a request may.
  void failed_writes_torn(bool torn);
  // Remove every fault.
  void clear_faults();
  // Deliver each completion after 0..max_iterations extra loop iterations,
  // drawn from the seeded generator: ops submitted together then complete
  // out of order, as on a real device (0, the default: next iteration).
  void delay_completions(unsigned max_iterations);
  // While held, ops are applied at once but their completions are kept
  // until release_completions(), which delivers each on its loop (posted):
  // a test can keep writes in flight as long as it needs to.
  void hold_completions();
  void release_completions();
  size_t held_completions() const;

  // ---- crash model ----
  // Drop every write not yet made durable (by a flush or kFua). With
  // torn=true, each dropped write may instead survive whole or in part (a
  // prefix of 512-byte sectors), chosen by the seeded generator.
  void crash(bool torn = false);
  // The image crash(torn) would leave now, without crashing (the torn
  // survivors drawn afresh on each call).
  std::vector<uint8_t> crash_image(bool torn);

  // ---- inspection ----
  // The bytes a read would return now / what survives crash(false) now.
  std::vector<uint8_t> contents() const;
  std::vector<uint8_t> durable_contents() const;
  // Successful ops of `kind` since construction.
  uint64_t ops_completed(BlockOpKind kind) const;
  // Completed writes (kWrite, kTrim, kWriteZeroes) without kFua that a crash
  // would drop now.
  uint64_t unflushed_writes() const;

 protected:
  void on_cqe(BlockOp& op, int res) override;  // never called: see submit()

 private:
  // A write since the last flush, in completion order. A kFua write is kept
  // here too while an older non-durable write precedes it, so that a crash
  // replays survivors in order and an old write never lands over a newer one.
  struct Pending {
    uint64_t offset;
    uint64_t length;
    std::vector<uint8_t> data;  // empty: zeroes (kTrim, kWriteZeroes)
    bool fua;
  };
  int draw_fault(BlockOpKind kind, uint64_t length);  // 0 or -errno
  int apply(BlockOp& op);                             // 0 or -errno
  void record(Pending write);
  uint64_t surviving_prefix(const Pending& write);  // bytes kept by a torn crash
  static void apply_prefix(std::vector<uint8_t>& image, const Pending& write, uint64_t keep);

  BackendInfo info_;
  uint64_t seed_;
  mutable std::mutex mu_;
  std::mt19937_64 rng_;
  std::vector<uint8_t> data_;     // what reads see
  std::vector<uint8_t> durable_;  // survives any crash; pending_ applies on top
  std::vector<Pending> pending_;
  struct KindFaults {
    std::vector<std::pair<uint64_t, int>> nth;  // (absolute op index, err)
    double p = 0;
    int p_err = 0;
    uint64_t seen = 0;
    uint64_t completed = 0;
  };
  KindFaults faults_[6];
  bool failed_torn_ = false;
  unsigned delay_max_ = 0;
  bool hold_ = false;
  struct Held {
    EventLoop* loop;
    BlockOp* op;
    int res;
  };
  std::vector<Held> held_;
  bool enospc_armed_ = false;
  uint64_t enospc_left_ = 0;
};

}  // namespace shadowd
