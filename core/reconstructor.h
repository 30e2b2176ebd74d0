// Reconstruction of the device at a past journal sequence number, for the
// restore commands: point-in-time exports, full restores, rollback, verify.
//
// The content of a range at seq S is, per segment, what ShadowStore::
// reconstruct_at(segment, S) returns: the newest version at or before S plus
// the segment's journal records up to S, or the primary where the segment
// was not written after S (a run of such segments is read from the primary
// in one request). Segments are reconstructed in parallel on a small
// pool of worker threads, and segments built from versions are kept in a
// bounded LRU cache (a past state never changes, so a cached segment stays
// valid for as long as S is inside the retention window).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "core/event_loop.h"
#include "core/io_backend.h"
#include "core/shadow_store.h"

namespace shadowd {

// What reconstruction cost, summed over the segments of a request.
struct ReplayCost {
  uint64_t segments = 0;          // segments reconstructed (cache hits included)
  uint64_t from_primary = 0;      // taken from the primary (not written after S)
  uint64_t versions_decoded = 0;  // version records decompressed
  uint64_t records_applied = 0;   // journal records replayed
  uint64_t cache_hits = 0;
  void add(const ReplayCost& o) {
    segments += o.segments;
    from_primary += o.from_primary;
    versions_decoded += o.versions_decoded;
    records_applied += o.records_applied;
    cache_hits += o.cache_hits;
  }
};

class Reconstructor {
 public:
  // `threads` workers (at least 1); `cache_bytes` bounds the segment cache.
  Reconstructor(ShadowStore& store, uint64_t device_bytes, uint32_t segment_bytes, unsigned threads,
                uint64_t cache_bytes);
  ~Reconstructor();
  Reconstructor(const Reconstructor&) = delete;
  Reconstructor& operator=(const Reconstructor&) = delete;

  // Bytes [offset, offset + length) at `seq` into `out`, segments in
  // parallel; blocks the calling thread (not a worker).
  Status read(uint64_t seq, uint64_t offset, uint64_t length, uint8_t* out, ReplayCost* cost = nullptr);
  // The same without blocking: `done` runs on a worker thread.
  void read_async(uint64_t seq, uint64_t offset, uint64_t length, uint8_t* out,
                  std::function<void(Status, const ReplayCost&)> done);
  // One whole segment at `seq` (the last segment may be short). Shared with
  // the cache, so neither a hit nor an insertion copies it.
  using Segment = std::shared_ptr<const std::vector<uint8_t>>;
  Result<Segment> segment(uint64_t seq, uint64_t segment, ReplayCost* cost = nullptr, bool use_cache = true);
  // Forget cached segments of `seq` (an export of it went away).
  void drop(uint64_t seq);

  uint32_t segment_bytes() const { return seg_bytes_; }
  uint64_t device_bytes() const { return dev_bytes_; }
  ShadowStore& store() { return store_; }

 private:
  struct Key {
    uint64_t seq, segment;
    bool operator==(const Key& o) const { return seq == o.seq && segment == o.segment; }
  };
  struct KeyHash {
    size_t operator()(const Key& k) const { return std::hash<uint64_t>()(k.seq * 0x9E3779B97F4A7C15ull ^ k.segment); }
  };
  using Lru = std::list<std::pair<Key, Segment>>;

  Segment cached(const Key& k);
  void remember(const Key& k, Segment v);
  void post(std::function<void()> job);
  // The longest run of from-primary segments read in one request.
  static constexpr uint64_t kMaxPrimaryRunBytes = uint64_t{8} << 20;
  void worker();

  ShadowStore& store_;
  const uint64_t dev_bytes_;
  const uint32_t seg_bytes_;
  const uint64_t cache_limit_;

  std::mutex cache_mu_;
  Lru lru_;
  std::unordered_map<Key, Lru::iterator, KeyHash> index_;
  uint64_t cache_bytes_ = 0;

  std::mutex q_mu_;
  std::condition_variable q_cv_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

// A read-only export of the device at one journal sequence number, served by
// reconstructing on demand. Reads run on the reconstructor's workers and
// complete on the loop that submitted them; FLUSH and CACHE succeed; writes
// are refused (the NBD layer never sends them to a read-only export).
class PointInTimeBackend final : public IoBackend {
 public:
  PointInTimeBackend(std::shared_ptr<Reconstructor> rec, uint64_t seq);
  ~PointInTimeBackend() override;
  const BackendInfo& info() const override { return info_; }
  void submit(EventLoop& loop, BlockOp* op) override;
  Result<Extent> extent_at(uint64_t offset, uint64_t max_len) override;
  Result<SourceExtent> source_at(uint64_t offset, uint64_t max_len) override;

  uint64_t seq() const { return seq_; }
  struct Counters {
    uint64_t reads = 0, bytes_read = 0, errors = 0;
    ReplayCost cost;
  };
  Counters counters() const;

 protected:
  void on_cqe(BlockOp&, int) override {}

 private:
  std::shared_ptr<Reconstructor> rec_;
  const uint64_t seq_;
  BackendInfo info_;
  mutable std::mutex mu_;
  Counters counters_;
  // Reads still running on workers: the destructor waits for them.
  std::shared_ptr<std::atomic<uint64_t>> pending_;
};

}  // namespace shadowd
