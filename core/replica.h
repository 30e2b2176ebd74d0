// A replica of the history on another device: every write that reaches the
// shadow pool's devices or the primary is shipped, in flush order, to a
// target (an RBD image in production; any IoBackend in tests), so that the
// target holds a complete, self-sufficient copy: the pool's bytes (journal,
// versions, checkpoints) and a mirror of the primary. See docs/REPLICA.md.
//
// Target layout: a 1 MiB header area (the replica header at offset 0, see
// ReplicaHeader), then one area per pool device, then the primary's mirror,
// each at an offset aligned to 1 MiB.
//
// How writes travel. Each device the store uses is wrapped in a tap
// (tap()). A write, write-zeroes or trim that the device completed is put
// on the replica's queue (writes with a copy of their data) before the
// caller sees its completion; a flush (or a FUA write) closes the current
// epoch. One the device failed may have left part of itself there: its
// range is copied from the device (the replica falls behind, see below).
// A shipper thread writes the queue to the target epoch by epoch and
// flushes the target between epochs, so the target is always the devices'
// state at some flush: crash-consistent, as the pool's recovery expects.
// Asynchronous by default (the queue's age is the lag); with `sync`, a
// flush's completion waits until its epoch is flushed on the target (at
// most max_lag_s; then it completes anyway and the replica is marked
// lapsed), so an acknowledged flush is on the replica too.
//
// Falling behind. The queue holds at most max_backlog_bytes. Past that (the
// target is down or slow) the queued data is dropped and the replica is
// *behind*: writes only mark 1 MiB chunks dirty (a bitmap per area, so
// memory stays bounded however long the outage), and the shipper copies the
// dirty chunks from the local devices when the target takes writes again;
// the target is not crash-consistent until that resynchronisation is done
// (the header says so). A fresh target, or one whose header does not match,
// starts with every chunk dirty (the initial sync); the primary's chunks go
// hottest first when an order is given.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "core/io_backend.h"

namespace shadowd {

enum class ReplicaState : uint8_t {
  kSyncing = 0,  // the initial copy, or a resynchronisation, is under way
  kInSync = 1,   // the target is the devices' state at a flush
  kBehind = 2,   // the queue overflowed or the target failed: chunks to copy
};
const char* replica_state_name(ReplicaState s);

// What the target's header records (4 KiB at offset 0, checksummed).
struct ReplicaHeader {
  static constexpr uint64_t kMagic = 0x315043494c504552ull;  // "REPLICP1"
  static constexpr uint32_t kVersion = 1;
  static constexpr uint64_t kHeaderArea = 1ull << 20;
  ReplicaState state = ReplicaState::kSyncing;
  std::string primary_id;
  uint64_t primary_bytes = 0;
  std::vector<uint64_t> pool_bytes;  // per pool device (tier)
  uint64_t epoch = 0;                // the last epoch flushed to the target
  int64_t updated_ns = 0;            // wall clock of the header write
  int64_t in_sync_since_ns = 0;      // 0 unless kInSync

  // Offsets of the areas on the target, and the bytes it needs.
  uint64_t pool_offset(size_t i) const;
  uint64_t primary_offset() const;
  uint64_t total_bytes() const;
};
std::vector<uint8_t> encode_replica_header(const ReplicaHeader& h);
Result<ReplicaHeader> decode_replica_header(std::span<const uint8_t> block);
Result<ReplicaHeader> read_replica_header(IoBackend& target);

struct ReplicaOptions {
  bool sync = false;
  uint32_t max_lag_s = 5;
  uint64_t max_backlog_bytes = 256ull << 20;
  uint64_t resync_bytes_per_s = 64ull << 20;  // the initial sync's budget (0: unlimited)
  uint32_t max_inflight = 32;                 // target writes in flight
  // stop(): what is queued is shipped for at most stop_timeout_ms; a
  // shipper still inside a target request stop_grace_ms after that is left
  // behind (see stop()).
  uint32_t stop_timeout_ms = 5000;
  uint32_t stop_grace_ms = 5000;
};

struct ReplicaStats {
  ReplicaState state = ReplicaState::kSyncing;
  bool sync = false;
  uint64_t backlog_bytes = 0;     // queued, not yet on the target
  uint64_t backlog_entries = 0;
  uint64_t dirty_bytes = 0;       // chunks still to copy (syncing / behind)
  double lag_seconds = 0;         // age of the oldest write not on the target
  double lag_p50_seconds = 0;     // over the last 4096 epochs shipped
  double lag_p99_seconds = 0;
  uint64_t shipped_bytes = 0;     // written to the target, queued and copied
  uint64_t copied_bytes = 0;      // of which copied from the local devices
  uint64_t epochs = 0;            // flushed to the target
  uint64_t overflows = 0;         // times the backlog limit was hit
  uint64_t target_errors = 0;
  uint64_t local_failures = 0;    // writes (then copied) and reads a local device failed
  uint64_t sync_lapses = 0;       // sync flushes released after max_lag_s
  std::string last_error;
  int64_t in_sync_since_ns = 0;
};

class Replica {
 public:
  // `target` must hold at least header.total_bytes(). `areas` are the local
  // devices, in the header's order (pool devices, then the primary): the
  // shipper reads dirty chunks from them. With a target whose header
  // matches (same primary, sizes) and says in sync, only what the local
  // side wrote since is shipped... which a restart cannot know: every start
  // resynchronises (comparing before writing).
  static Result<std::unique_ptr<Replica>> open(std::shared_ptr<IoBackend> target,
                                               ReplicaHeader layout,
                                               std::vector<std::shared_ptr<IoBackend>> areas,
                                               ReplicaOptions opts, std::string target_name);
  ~Replica();

  // A layer over areas[i] that reports its writes to the replica. Use it in
  // place of the device everywhere (the store, readers): writes that do not
  // go through it are not shipped.
  std::shared_ptr<IoBackend> tap(size_t area);

  // The primary's chunks in this order first (segment byte offsets), for
  // the initial sync: hot segments first. May be called while running: the
  // chunks still to copy then go in this order before the others.
  void set_hot_order(std::vector<uint64_t> offsets);

  void start();
  // Ships what is queued if the target takes it within stop_timeout_ms, and
  // ends the threads. Bounded even when a target request hangs (a file on a
  // hung mount): a shipper that has not ended stop_grace_ms later is left
  // running, detached, with its state (never freed), and stop() returns
  // false. The target then holds the devices' state at an earlier flush, as
  // after a crash; the next start resynchronises.
  bool stop();

  ReplicaStats stats() const;
  const std::string& target_name() const { return target_name_; }

  // For tests: block until the queue is empty and the target flushed, or
  // `timeout_ms` passed; true if drained. Does not wait for the initial sync
  // unless `whole` (every dirty chunk copied, state in sync).
  bool drain(uint32_t timeout_ms, bool whole = false);

  class Impl;

 private:
  explicit Replica(std::unique_ptr<Impl> impl, std::string target_name);
  std::unique_ptr<Impl> impl_;
  std::string target_name_;
  bool abandoned_ = false;  // stop() left the shipper running: impl_ is never freed
};

}  // namespace shadowd
