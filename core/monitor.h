// Per-segment access monitoring and priority (specification §1–§3).
//
// The primary is cut into segments of segment_bytes (a power of two,
// 64 KiB – 1 MiB). On the I/O path, record() adds to the segment's counters
// for the current time bucket with relaxed atomics: no lock, no allocation.
// The dense state is exactly 32 bytes per segment (SegmentCell), in an
// anonymous mapping, so segments never touched cost no resident memory.
//
// Once per bucket (default 60 s) roll() moves the current counters into the
// sparse access history (bucket start, segment, reads, writes, bytes) and
// into per-window aggregates (default windows 1 h, 1 d, 1 w). Queries add the
// still-open bucket, so counts are exact at any moment.
//
// Priority (units: rates per second, time in seconds), over the scoring
// window W:
//   AccessRate  = (reads + writes in W) / W
//   ChangeRate  = writes in W / W
//   TimeSinceLastAccess = now - last access (or - monitor start if never)
//   Priority = baseline + alpha*AccessRate + beta*ChangeRate - gamma*TimeSinceLastAccess
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/clock.h"
#include "core/status.h"

namespace shadowd {

enum class AccessOp : uint8_t { kRead, kWrite };

struct MonitorConfig {
  uint64_t device_bytes = 0;
  uint32_t segment_bytes = 256 * 1024;
  uint32_t bucket_seconds = 60;
  std::vector<uint32_t> window_seconds = {3600, 86400, 604800};
  uint64_t history_max_records = 1u << 20;  // sparse history entries kept in RAM

  Status validate() const;
};

struct PriorityParams {
  double baseline = 0.0;
  double alpha = 1.0;   // per (access per second)
  double beta = 1.0;    // per (write per second)
  double gamma = 0.001; // per second since last access
  uint32_t scoring_window_seconds = 3600;  // must be one of the windows
};

// One closed bucket of one segment.
struct HistoryRecord {
  int64_t bucket_start_s;  // Unix seconds
  uint64_t segment;
  uint32_t reads;
  uint32_t writes;
  uint64_t bytes_read;
  uint64_t bytes_written;
};

struct WindowStats {
  uint32_t window_seconds = 0;
  uint64_t reads = 0;
  uint64_t writes = 0;
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  double access_rate = 0;  // (reads + writes) per second
  double change_rate = 0;  // writes per second
};

struct SegmentReport {
  uint64_t id = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  int64_t last_access_s = -1;  // Unix seconds, -1 if never (since start)
  int64_t last_write_s = -1;
  std::vector<WindowStats> windows;  // one per configured window, in order
  double priority = 0;
};

struct MonitorTotals {
  uint64_t segments = 0;
  uint32_t segment_bytes = 0;
  uint64_t segments_active = 0;       // with accesses in the longest window
  uint64_t dense_bytes_virtual = 0;   // 32 * segments
  uint64_t dense_bytes_resident = 0;  // pages of the dense array in RAM + page map
  bool windows_truncated = false;     // history bound dropped buckets still in a window
  uint64_t history_records = 0;
  uint64_t history_bytes = 0;
  uint64_t history_dropped_records = 0;
  int64_t started_s = 0;
  int64_t oldest_history_s = -1;
};

enum class TopBy { kPriority, kReads, kWrites };

class Monitor {
 public:
  // REQUIRES: cfg.validate() is ok.
  Monitor(const MonitorConfig& cfg, const Clock& clock);
  ~Monitor();
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;

  // ---- the I/O path: lock-free, allocation-free, thread-safe ----
  // Counts one request against every segment it touches. Ranges past the
  // end are clipped (the NBD layer has already refused them).
  void record(AccessOp op, uint64_t offset, uint64_t length);

  // ---- background (roller thread) ----
  // Close the current bucket if its time is over. Returns true if it rolled.
  bool roll();
  // Rebuild the priority ranking (outside the I/O path; readers keep the
  // previous ranking until the new one is swapped in).
  void rescore();
  // The priority of one segment now (the formula above). REQUIRES: id < segment_count().
  double priority(uint64_t id) const;
  // The k highest-priority segment ids of the last rescore, best first.
  std::vector<uint64_t> top_k(size_t k) const;

  // ---- queries (control socket) ----
  uint64_t segment_count() const { return nsegments_; }
  uint32_t segment_bytes() const { return cfg_.segment_bytes; }
  const MonitorConfig& config() const { return cfg_; }
  // REQUIRES: id < segment_count().
  SegmentReport segment(uint64_t id) const;
  // The n best segments by `by`, counted over `window_seconds` (one of the
  // configured windows); ties by lower id. Segments with no access in that
  // window are not listed.
  Result<std::vector<SegmentReport>> top(size_t n, TopBy by, uint32_t window_seconds) const;
  // Closed buckets in time order, then the open bucket (as if closed now).
  std::vector<HistoryRecord> history() const;
  MonitorTotals totals() const;

  PriorityParams priority() const;
  Status set_priority(const PriorityParams& p);
  // Replace the window list; aggregates are rebuilt from the history.
  Status set_windows(std::vector<uint32_t> window_seconds);

  // The history writer (kept in RAM today; later persisted in the pool).
  class HistorySink {
   public:
    virtual ~HistorySink() = default;
    virtual void append(const HistoryRecord& r) = 0;
  };
  // Called for every record of every closed bucket, under the monitor lock.
  void set_history_sink(HistorySink* sink);
  // Put back closed buckets read from the pool at start-up (records older
  // than the oldest bucket held; newer ones are ignored). Windows are rebuilt.
  void restore_history(const std::vector<HistoryRecord>& records);

 private:
  // 32 bytes per segment; counters of the open bucket plus last-access times.
  struct SegmentCell {
    std::atomic<uint32_t> reads;
    std::atomic<uint32_t> writes;
    std::atomic<uint64_t> bytes_read;
    std::atomic<uint64_t> bytes_written;
    std::atomic<uint32_t> last_access;  // seconds since epoch_s_ + 1; 0 = never
    std::atomic<uint32_t> last_write;
  };
  static_assert(sizeof(SegmentCell) == 32, "monitor state must stay 32 bytes per segment");

  struct Agg {
    uint64_t reads = 0, writes = 0, bytes_read = 0, bytes_written = 0;
    bool empty() const { return reads == 0 && writes == 0; }
    template <typename T>
    void add(const T& r) {
      reads += r.reads;
      writes += r.writes;
      bytes_read += r.bytes_read;
      bytes_written += r.bytes_written;
    }
  };
  struct Window {
    uint32_t seconds;
    std::unordered_map<uint64_t, Agg> agg;
    size_t first_bucket = 0;  // index (absolute) of the oldest bucket included
    void subtract(const HistoryRecord& r) {
      auto it = agg.find(r.segment);
      if (it == agg.end()) return;
      Agg& a = it->second;
      a.reads -= r.reads;
      a.writes -= r.writes;
      a.bytes_read -= r.bytes_read;
      a.bytes_written -= r.bytes_written;
      if (a.empty()) agg.erase(it);
    }
  };
  struct Bucket {
    int64_t start_s;
    std::vector<HistoryRecord> records;
  };

  int64_t now_s() const { return clock_.now_s(); }
  int64_t bucket_start(int64_t t) const { return t - t % cfg_.bucket_seconds; }
  uint32_t rel(int64_t t) const { return static_cast<uint32_t>(t - epoch_s_ + 1); }
  int64_t abs_time(uint32_t r) const { return r == 0 ? -1 : epoch_s_ + r - 1; }
  // The open bucket's counters (not reset). Thread-safe.
  Agg current(uint64_t id) const;
  bool has_current(uint64_t id) const;
  // Drop closed buckets that left each window. Queries call it too (windows_
  // is mutable): time moves on between rolls.
  void expire_windows(int64_t now) const;  // REQUIRES: mu_ held
  std::vector<uint64_t> candidates(const Window& w) const;  // REQUIRES: mu_ held
  uint64_t resident_bytes() const;
  void drop_oldest_bucket();         // REQUIRES: mu_ held
  const Window* find_window(uint32_t seconds) const;  // REQUIRES: mu_ held
  WindowStats window_stats(const Window& w, uint64_t id) const;  // REQUIRES: mu_ held
  double priority_of(uint64_t id, const WindowStats& ws, int64_t now) const;
  SegmentReport report(uint64_t id, int64_t now) const;  // REQUIRES: mu_ held

  MonitorConfig cfg_;
  const Clock& clock_;
  uint64_t nsegments_;
  uint32_t shift_;
  int64_t epoch_s_;
  SegmentCell* cells_ = nullptr;  // mmap'ed, nsegments_ entries
  size_t cells_bytes_ = 0;
  // One bit per page of cells_ (128 segments) ever written: scans visit only
  // those pages, so a sparse device keeps its untouched pages unbacked.
  static constexpr uint64_t kCellsPerPage = 4096 / sizeof(SegmentCell);
  std::unique_ptr<std::atomic<uint64_t>[]> touched_;
  size_t touched_words_ = 0;
  // Calls fn(id) for every segment on a touched page.
  template <typename Fn>
  void for_each_touched(Fn fn) const;

  mutable std::mutex mu_;  // everything below
  int64_t open_bucket_s_;
  std::deque<Bucket> buckets_;
  size_t buckets_dropped_ = 0;  // absolute index of buckets_.front()
  uint64_t history_records_ = 0;
  uint64_t history_dropped_ = 0;
  mutable std::vector<Window> windows_;
  PriorityParams prio_;
  HistorySink* sink_ = nullptr;

  mutable std::mutex rank_mu_;
  std::vector<uint64_t> ranking_;
};

}  // namespace shadowd
