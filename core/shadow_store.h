// The shadow pool engine (specification §4, DESIGN.md §2 and §4): the write
// journal, versioned differential shadow copies, copy-on-first-write,
// background shadowing within an I/O budget, the index with checkpoints and
// crash recovery, retention with folding, and the persisted access history.
//
// Data path. backend() returns the IoBackend the export serves. A mutating
// request (WRITE, WRITE_ZEROES, TRIM) is cut into one journal record per
// segment, compressed on the calling I/O thread and queued to the pool
// thread, which appends every queued record in one pool write (group
// commit). Only then is the request applied to the primary (write-ahead:
// the journal is never behind the primary), and only then acknowledged.
// FLUSH and FUA make the journal durable, then the primary. TRIM is applied
// as a zeroing (it may punch a hole) so that what it leaves is known.
//
// Copy-on-first-write. A segment without a base version (one equal to its
// current content) gets one before its first journaled write: the pool
// thread reads the segment from the primary and writes the before-image into
// the journal stream ahead of the record (counted in cow_stalls).
//
// Never fail the primary because of the pool: when the pool is full or
// fails, history is marked degraded, writes go straight to the primary, and
// history restarts (a kRestart marker) once the pool works again. Such a
// write never reaches the journal, so recovery must not re-apply older
// records over it: the episode is recorded outside the pool first (a state
// file, core/degraded_state.h), and no write or flush completing in the
// episode is acknowledged before that record is durable (or could not be
// written: see StoreOptions::state_timeout_ms).
//
// Threads: the I/O threads call wrap()'s backend; one pool thread does every
// pool append; one shadow thread makes versions, prunes, checkpoints.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/clock.h"
#include "core/degraded_state.h"
#include "core/io_backend.h"
#include "core/monitor.h"
#include "core/policy.h"
#include "core/pool_format.h"
#include "core/status.h"

namespace shadowd {

struct PoolDevice {
  std::string path;                  // for messages
  std::shared_ptr<IoBackend> backend;
};

struct FormatOptions {
  std::string primary_id;            // canonical path of the primary
  uint64_t primary_bytes = 0;
  uint32_t segment_bytes = 256 * 1024;
  uint32_t zone_bytes = pool::kDefaultZoneBytes;
  bool force = false;                // overwrite a device that holds a pool
};

struct StoreOptions {
  std::string primary_id;                   // must match the pool's
  uint32_t segment_bytes = 0;               // must match the pool's (0: take the pool's)
  uint64_t retention_seconds = 7 * 86400;
  uint64_t pool_max_bytes = 0;              // 0: the devices' size
  uint32_t max_versions_per_segment = 8;
  uint32_t full_every = 4;                  // a full image at least every N versions
  uint64_t shadow_budget_bytes_per_s = 64ull << 20;
  // While clients are doing I/O (a request within the last 200 ms), segments
  // that are merely stale or forecast are shadowed at no more than this, so
  // that background reads and pool writes leave the devices to the clients
  // (as md's resync speed_limit_min/max); urgent segments (too many records)
  // still go at the full budget.
  uint64_t shadow_busy_budget_bytes_per_s = 4ull << 20;
  uint32_t checkpoint_interval_s = 60;
  // When tier 0 is down to the zones kept for reclaiming space, new journal
  // batches wait up to this long for retention to be cut (writes slow down
  // to the rate at which the pool is reclaimed) before history gives up
  // and degrades; 0: degrade at once.
  uint32_t pool_full_wait_ms = 5000;
  int journal_zstd_level = 1;
  int version_zstd_level = 3;
  uint32_t max_records_per_segment = 4096;  // more: a version is made at once
  uint32_t stale_records = 16;              // records since the newest version that make it stale
  uint32_t history_zones = 4;               // zones kept for the access history
  bool shadow_thread = true;                // false in tests that drive shadowing by hand
  // Where a degraded episode is recorded (docs/FORMAT.md "Start-up"): the
  // state file of export_name and the pool's UUID in state_dir (the
  // daemon's --state-dir; created if missing, and open() fails if no file
  // can be created there), or, for tests, state_store itself. Neither: not
  // recorded, and a restart after a stop or crash while degraded may re-apply
  // older journal records over writes acknowledged meanwhile.
  std::string state_dir;
  std::string export_name = "disk";
  std::shared_ptr<DegradedStateStore> state_store;
  // How long completions wait for the state file before they are
  // acknowledged without it (logged as critical; the file is retried every
  // second): the export never blocks on it for longer.
  uint32_t state_timeout_ms = 5000;
  // Which bases are kept when their segment leaves the window, and what is
  // copied ahead of need (core/policy.h). kOracle is refused.
  PolicyKind policy = PolicyKind::kAuto;
  PolicyParams policy_params;
};

// Figures for `shadowctl history`, `pool`, `status` and the metrics.
struct TierUse {
  uint32_t tier = 0;
  std::string path;
  uint64_t zones = 0;
  uint64_t zones_free = 0;
  uint64_t zone_bytes = 0;
  uint64_t bytes_used = 0;        // appended bytes in zones in use
  uint64_t version_bytes = 0;     // stored (compressed) bytes of live versions on this tier
  uint64_t versions = 0;
};

struct StoreStats {
  // window
  int64_t epoch_ns = 0;
  int64_t retention_start_ns = 0;   // the oldest restorable time
  int64_t newest_ns = 0;            // the newest journal record's time (or epoch)
  uint64_t first_seq = 0;           // oldest seq still restorable
  uint64_t last_seq = 0;
  // journal
  uint64_t journal_records = 0;     // in the index
  uint64_t journal_bytes = 0;       // stored bytes of those records
  uint64_t journal_raw_bytes = 0;   // client bytes they cover (writes)
  // versions
  uint64_t versions = 0;
  uint64_t version_bytes = 0;
  uint64_t version_raw_bytes = 0;
  uint64_t segments_with_history = 0;
  // counters since start
  uint64_t client_bytes_written = 0;   // WRITE payload bytes journaled
  uint64_t pool_bytes_written = 0;     // everything appended to the pool
  uint64_t cow_stalls = 0;
  uint64_t versions_made = 0;          // by the shadow thread
  uint64_t versions_folded = 0;        // by pruning
  uint64_t versions_dropped = 0;
  uint64_t records_pruned = 0;
  uint64_t zones_reclaimed = 0;
  uint64_t retention_shrinks = 0;      // the window was cut short for space
  uint64_t checkpoints = 0;
  uint64_t group_commits = 0;          // pool appends of the journal
  uint64_t group_commits_overlapped = 0;  // of which started while another was in flight
  uint64_t pool_errors = 0;
  uint64_t primary_write_errors = 0;
  uint64_t journal_corrections = 0;
  uint64_t pool_full_waits = 0;    // times journal writes waited for retention to be cut
  uint64_t pool_full_wait_ns = 0;  // time they waited, summed (episodes that ended)
  bool pool_full_waiting = false;  // journal writes wait for room now  // refused writes whose records now hold what the primary read back
  // shadowing
  uint64_t shadow_budget_bytes_per_s = 0;
  uint64_t shadow_busy_budget_bytes_per_s = 0;
  bool foreground_busy = false;        // clients did I/O in the last 200 ms
  uint64_t shadow_queue = 0;           // segments waiting for a version
  uint64_t shadow_bytes_read = 0;
  // the shadowing policy
  std::string policy;
  uint64_t copies_ahead = 0;           // segments given a base ahead of need
  uint64_t copies_ahead_bytes = 0;
  uint64_t copies_ahead_used = 0;      // of which later written (the copy saved a stall)
  uint64_t speculative_hits = 0;       // writes that found a speculative base
  uint64_t speculative_dropped = 0;    // speculative bases given up for room
  uint64_t speculative_replaced = 0;   // of those, in the place of a copy ahead worth more
  uint64_t bases_freed = 0;            // bases freed as their segment left the window
  uint64_t versions_promoted = 0;      // moved to the fast tier (segment ranked hot)
  uint64_t versions_demoted = 0;       // moved to the slow tier (fast tier low, segment not hot)
  uint64_t bases_pinned = 0;           // segments with a base and journal records
  uint64_t bases_speculative = 0;      // segments with a base and no journal record
  uint64_t access_events_dropped = 0;  // accesses the policy did not see (queue full)
  uint64_t policy_memory_bytes = 0;
  std::vector<ShadowPolicy::ForecastError> forecast_errors;  // per predictor
  // state
  bool degraded = false;
  std::string degraded_reason;
  bool retention_shrunk = false;       // the window is shorter than retention_seconds
  int64_t last_checkpoint_ns = 0;
  uint32_t segment_bytes = 0;
  uint64_t recovered_records = 0;      // journal records found past the checkpoint at start
  uint64_t redo_records = 0;           // of which re-applied to the primary
  uint64_t redo_skipped = 0;           // not re-applied: history was degraded after them (state file)
  std::string state_file;              // where a degraded episode is recorded ("" none)
  std::string state_error;             // the last failure to write or remove it ("" none)
  std::vector<TierUse> tiers;
};

struct VersionInfo {
  uint64_t segment = 0;
  uint64_t seq = 0;
  int64_t time_ns = 0;
  uint32_t tier = 0;
  uint32_t zone = 0;
  uint32_t offset = 0;       // in the zone
  uint32_t stored_bytes = 0; // the record
  uint16_t depth = 0;        // 0 full, else delta
  uint64_t base_seq = 0;
  uint64_t content_xxh = 0;
  bool cow = false;          // captured on the write path
};

struct SegmentHistory {
  uint64_t segment = 0;
  std::vector<VersionInfo> versions;  // oldest first
  uint64_t records = 0;               // journal records in the window
  uint64_t first_record_seq = 0, last_record_seq = 0;
  int64_t first_record_ns = 0, last_record_ns = 0;
};

struct ZoneInfo {
  uint32_t tier = 0;
  uint32_t index = 0;
  pool::ZoneKind kind = pool::ZoneKind::kFree;
  uint64_t gen = 0;
  uint64_t used_bytes = 0;
  uint64_t live_entries = 0;
  bool open = false;
};

class ShadowStore {
 public:
  // Write fresh superblocks on every device (device i = tier i) and mark all
  // zones free. Refuses a device that already holds a pool unless
  // opts.force. At most two devices.
  static Status format(const std::vector<PoolDevice>& devices, const FormatOptions& opts,
                       const Clock& clock);

  // Open a formatted pool over `primary`: check that it belongs to this
  // primary (id, size) and segment size, load the last checkpoint, scan the
  // journal tail (a torn last record is discarded) and re-apply the records
  // the primary may not hold, none of those a state file says history
  // degraded after (then history restarts). `monitor` (optional) gives priorities and gets
  // its history persisted and restored.
  static Result<std::unique_ptr<ShadowStore>> open(std::vector<PoolDevice> devices,
                                                   std::shared_ptr<IoBackend> primary,
                                                   const StoreOptions& opts, const Clock& clock,
                                                   Monitor* monitor);
  // Read only the superblock of a device (for messages and `--init` checks):
  // kNotFound for a blank device, kCorruption for a damaged superblock.
  static Result<pool::Superblock> read_superblock(IoBackend& device);

  virtual ~ShadowStore() = default;

  // The backend to serve: journals every mutating request.
  virtual std::shared_ptr<IoBackend> backend() = 0;
  // Start the pool thread (and the shadow thread if opts.shadow_thread).
  virtual void start() = 0;
  // Drain, write a final checkpoint, stop the threads. While history is
  // degraded it first tries to restart it (the pool may work again); if it
  // cannot, the state file stays and stop() fails if that file could not be
  // written.
  virtual Status stop() = 0;
  // For crash tests: stop the threads at once, writing nothing more.
  virtual void abandon() = 0;

  virtual uint32_t segment_bytes() const = 0;
  virtual StoreStats stats() const = 0;
  virtual std::vector<ZoneInfo> zones() const = 0;
  // Segments with history, ascending; `limit` 0 = all.
  virtual std::vector<SegmentHistory> segments(uint64_t first = 0, size_t limit = 0) const = 0;
  virtual std::optional<SegmentHistory> segment(uint64_t id) const = 0;

  // Tunables that may change at run time.
  virtual void set_budget(uint64_t bytes_per_s) = 0;
  virtual void set_retention(uint64_t seconds) = 0;
  // Auto-tuning's results (the policy keeps what it has learnt).
  virtual void set_policy_params(const PolicyParams& p) = 0;
  virtual PolicyParams policy_params() const = 0;
  virtual void set_max_versions(uint32_t n) = 0;

  // ---- engine operations (the shadow thread runs them; tests call them) ----
  // Make a version of `segment` now (blocking; retries while writes race).
  virtual Status shadow_segment(uint64_t segment) = 0;
  // Move the window start to `start_ns` (folding), then reclaim what is free.
  virtual Status prune(int64_t start_ns) = 0;
  virtual Status checkpoint() = 0;
  // One round of the shadow thread's work: persist access history, restart
  // degraded history, apply retention, relieve a full pool, checkpoint when
  // due, make versions within the budget.
  virtual void shadow_round() = 0;

  // ---- reconstruction (the next issue builds restore on it) ----
  // The content of `segment` after every journal record with seq <= `seq`
  // (time_ns: with time <= T), byte-exact. kOutOfRange before the window.
  virtual Result<std::vector<uint8_t>> reconstruct_seq(uint64_t segment, uint64_t seq) = 0;
  virtual Result<std::vector<uint8_t>> reconstruct_time(uint64_t segment, int64_t time_ns) = 0;
  // The last seq with time <= time_ns (0 if none).
  virtual uint64_t seq_at(int64_t time_ns) const = 0;

  // Where a segment's content at a past seq comes from (the flags of the
  // shadowd:source NBD metadata context).
  enum SourceFlags : uint32_t { kFromPrimary = 0, kFromVersion = 1, kFromJournal = 2 };
  // Keep retention from moving the window start past `time_ns` while a
  // point-in-time export shows it (a full pool still shrinks the window).
  // Pins count: every pin() needs its unpin().
  virtual void pin(int64_t time_ns) = 0;
  virtual void unpin(int64_t time_ns) = 0;
  // The time of the newest journal record with seq <= `seq` (the window
  // start when there is none in the window).
  virtual int64_t time_of(uint64_t seq) const = 0;
  // For restore: a segment at `seq` with where it came from and what it cost.
  struct SegmentAt {
    std::vector<uint8_t> data;
    uint32_t source = 0;            // SourceFlags: 0 primary, 1 version, 3 version + journal
    uint32_t versions_decoded = 0;  // version records read and decompressed (chain length)
    uint32_t records_applied = 0;   // journal records replayed on top
  };
  virtual Result<SegmentAt> reconstruct_at(uint64_t segment, uint64_t seq) = 0;
  // Where reconstruct_at(segment, seq) would take the content from, without
  // reading anything (SourceFlags).
  virtual uint32_t source_of(uint64_t segment, uint64_t seq) const = 0;
  // Bytes [offset, offset + length) at `seq` in one read of the primary, when
  // every segment they touch would come from the primary (reconstruct_at's
  // rule) before and after the read: true if `out` holds them; false if
  // not (a segment has a later record, a write is in flight or raced with
  // the read, the history is degraded, or `seq` is before the window), and
  // then the caller reconstructs segment by segment.
  virtual Result<bool> read_primary_at(uint64_t offset, uint64_t length, uint64_t seq,
                                       uint8_t* out) = 0;
  // Segments with a journal record after `seq` (ascending): what a rollback
  // to `seq` rewrites.
  virtual std::vector<uint64_t> segments_changed_after(uint64_t seq) const = 0;
  // The newest seq whose write, and every earlier one, is in the index (no
  // write at or below it is still on its way to the pool).
  virtual uint64_t stable_seq() const = 0;
  // Read every zone of the pool and check every record's checksum and the
  // index against what is on disk.
  struct VerifyReport {
    uint64_t zones_scanned = 0;
    uint64_t records_checked = 0;
    uint64_t versions_checked = 0;
    uint64_t bytes_checked = 0;
    std::vector<std::string> errors;
  };
  virtual VerifyReport verify_pool() = 0;
  // Check the in-memory index: order, delta bases present, every segment's
  // records preceded by a version. Does not read the pool.
  virtual Status check_index() const = 0;
};

}  // namespace shadowd
