// The replica shipper; see replica.h and docs/REPLICA.md.
#include "core/replica.h"

#include <spdlog/spdlog.h>
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <cstring>
#include <map>

#include "core/clock.h"

namespace shadowd {
namespace {

constexpr uint64_t kChunk = 1ull << 20;  // dirty-chunk granularity, and copy size
constexpr uint64_t kBlock = 4096;        // the header block
constexpr size_t kLagSamples = 4096;
constexpr uint64_t kEntryOverhead = 64;  // backlog accounting of an entry without data
constexpr uint64_t kMaxBatchBytes = 32ull << 20;
// The largest request write_batch() makes of entries that touch end to end.
constexpr uint64_t kMaxMergeBytes = 4ull << 20;

uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

void put(std::vector<uint8_t>& out, uint64_t v, size_t n) {
  for (size_t i = 0; i < n; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

uint64_t get(const uint8_t* p, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

int64_t wall_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int64_t mono_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A request of the shipper's own, on its private loop.
using ShipOp = SyncOp;

}  // namespace

const char* replica_state_name(ReplicaState s) {
  switch (s) {
    case ReplicaState::kSyncing:
      return "syncing";
    case ReplicaState::kInSync:
      return "in-sync";
    case ReplicaState::kBehind:
      return "behind";
  }
  return "?";
}

uint64_t ReplicaHeader::pool_offset(size_t i) const {
  uint64_t off = kHeaderArea;
  for (size_t k = 0; k < i; ++k) off += align_up(pool_bytes[k], kChunk);
  return off;
}

uint64_t ReplicaHeader::primary_offset() const { return pool_offset(pool_bytes.size()); }

uint64_t ReplicaHeader::total_bytes() const {
  return primary_offset() + align_up(primary_bytes, kChunk);
}

std::vector<uint8_t> encode_replica_header(const ReplicaHeader& h) {
  std::vector<uint8_t> out;
  out.reserve(kBlock);
  put(out, ReplicaHeader::kMagic, 8);
  put(out, ReplicaHeader::kVersion, 4);
  put(out, static_cast<uint8_t>(h.state), 1);
  put(out, h.primary_bytes, 8);
  put(out, h.epoch, 8);
  put(out, static_cast<uint64_t>(h.updated_ns), 8);
  put(out, static_cast<uint64_t>(h.in_sync_since_ns), 8);
  put(out, h.pool_bytes.size(), 1);
  for (uint64_t b : h.pool_bytes) put(out, b, 8);
  const size_t id_len = std::min<size_t>(h.primary_id.size(), 2048);
  put(out, id_len, 2);
  out.insert(out.end(), h.primary_id.begin(), h.primary_id.begin() + static_cast<ptrdiff_t>(id_len));
  out.resize(kBlock - 8, 0);
  put(out, XXH64(out.data(), out.size(), 0), 8);
  return out;
}

Result<ReplicaHeader> decode_replica_header(std::span<const uint8_t> block) {
  if (block.size() < kBlock) return Status::invalid("replica header: short block");
  const uint8_t* p = block.data();
  if (get(p, 8) != ReplicaHeader::kMagic) {
    return Status::error(Status::Code::kNotFound, "no replica header (not a shadowd replica)");
  }
  if (get(p + kBlock - 8, 8) != XXH64(p, kBlock - 8, 0)) {
    return Status::error(Status::Code::kCorruption, "replica header: checksum mismatch");
  }
  if (get(p + 8, 4) != ReplicaHeader::kVersion) {
    return Status::error(Status::Code::kNotSupported,
                         "replica header version " + std::to_string(get(p + 8, 4)));
  }
  ReplicaHeader h;
  size_t at = 12;
  const uint64_t st = get(p + at, 1);
  if (st > 2) return Status::error(Status::Code::kCorruption, "replica header: bad state");
  h.state = static_cast<ReplicaState>(st);
  at += 1;
  h.primary_bytes = get(p + at, 8);
  at += 8;
  h.epoch = get(p + at, 8);
  at += 8;
  h.updated_ns = static_cast<int64_t>(get(p + at, 8));
  at += 8;
  h.in_sync_since_ns = static_cast<int64_t>(get(p + at, 8));
  at += 8;
  const size_t n = get(p + at, 1);
  at += 1;
  if (n > 8) return Status::error(Status::Code::kCorruption, "replica header: bad area count");
  for (size_t i = 0; i < n; ++i, at += 8) h.pool_bytes.push_back(get(p + at, 8));
  const size_t id_len = get(p + at, 2);
  at += 2;
  if (at + id_len > kBlock - 8) {
    return Status::error(Status::Code::kCorruption, "replica header: bad id length");
  }
  h.primary_id.assign(reinterpret_cast<const char*>(p + at), id_len);
  return h;
}

Result<ReplicaHeader> read_replica_header(IoBackend& target) {
  std::vector<uint8_t> block(kBlock);
  if (target.size_bytes() < kBlock) return Status::invalid("the replica target is too small");
  if (Status st = run_sync(target, BlockOpKind::kRead, 0, kBlock, block.data()); !st) return st;
  return decode_replica_header(block);
}

// ------------------------------------------------------------------ Impl

class Replica::Impl {
 public:
  struct Entry {
    enum class Kind : uint8_t { kData, kZero, kTrim };
    Kind kind = Kind::kData;
    size_t area = 0;
    uint64_t off = 0;  // within the area
    uint64_t len = 0;
    uint64_t epoch = 0;
    int64_t enq_ns = 0;  // monotonic
    std::vector<uint8_t> data;
  };
  struct Waiter {
    uint64_t epoch;
    EventLoop* loop;
    BlockOp* op;
    int64_t since_ns;  // monotonic
  };

  Impl(std::shared_ptr<IoBackend> target, ReplicaHeader layout,
       std::vector<std::shared_ptr<IoBackend>> areas, ReplicaOptions opts, std::string name)
      : target_(std::move(target)),
        layout_(std::move(layout)),
        areas_(std::move(areas)),
        opts_(opts),
        name_(std::move(name)) {
    dirty_.resize(areas_.size());
    for (size_t a = 0; a < areas_.size(); ++a) {
      const uint64_t chunks = (area_bytes(a) + kChunk - 1) / kChunk;
      dirty_[a].assign((chunks + 63) / 64, 0);
    }
  }

  uint64_t area_bytes(size_t a) const {
    return a < layout_.pool_bytes.size() ? layout_.pool_bytes[a] : layout_.primary_bytes;
  }
  uint64_t area_offset(size_t a) const {
    return a < layout_.pool_bytes.size() ? layout_.pool_offset(a) : layout_.primary_offset();
  }

  // ---- the taps' side (loop threads) ----
  // A mutating op (or flush) of area `a` completed with `st` on `loop`;
  // returns true if the caller may complete it now, false if it waits for
  // the replica (sync mode; completed later through a post to `loop`).
  bool completed(size_t a, BlockOp& orig, EventLoop* loop, const Status& st) {
    if (!st) {
      // The local device refused it, but may have written part of it (a
      // torn write): what the range holds now is known only to the device.
      // Its chunks are copied from there, the replica behind meanwhile.
      if (orig.kind != BlockOpKind::kFlush && orig.length > 0) {
        std::lock_guard<std::mutex> lock(mu_);
        ++local_failures_;
        mark_dirty_locked(a, orig.offset, orig.length);
        if (state_ == ReplicaState::kInSync) fall_behind_locked("a write to a local device failed: " + st.message());
        work_cv_.notify_one();
      }
      return true;
    }
    const bool closes = orig.kind == BlockOpKind::kFlush || (orig.flags & kFua) != 0;
    std::lock_guard<std::mutex> lock(mu_);
    if (orig.kind != BlockOpKind::kFlush && orig.length > 0) {
      if (state_ == ReplicaState::kInSync) {
        Entry e;
        e.kind = orig.kind == BlockOpKind::kWrite  ? Entry::Kind::kData
                 : orig.kind == BlockOpKind::kTrim ? Entry::Kind::kTrim
                                                   : Entry::Kind::kZero;
        e.area = a;
        e.off = orig.offset;
        e.len = orig.length;
        e.epoch = open_epoch_;
        e.enq_ns = mono_ns();
        if (e.kind == Entry::Kind::kData) e.data.assign(orig.buf, orig.buf + orig.length);
        backlog_bytes_ += e.kind == Entry::Kind::kData ? e.len : kEntryOverhead;
        queue_.push_back(std::move(e));
        if (backlog_bytes_ > opts_.max_backlog_bytes) overflow_locked("the backlog passed its limit");
      } else {
        mark_dirty_locked(a, orig.offset, orig.length);
      }
    }
    bool now = true;
    if (closes && state_ == ReplicaState::kInSync) {
      const uint64_t e = open_epoch_++;
      if (opts_.sync && e > shipped_epoch_ && !stopping_) {
        waiters_.push_back(Waiter{e, loop, &orig, mono_ns()});
        now = false;
      }
    }
    work_cv_.notify_one();
    return now;
  }

  void mark_dirty_locked(size_t a, uint64_t off, uint64_t len) {
    if (len == 0) return;
    const uint64_t first = off / kChunk, last = (off + len - 1) / kChunk;
    for (uint64_t c = first; c <= last; ++c) {
      uint64_t& w = dirty_[a][c / 64];
      const uint64_t bit = 1ull << (c % 64);
      if ((w & bit) == 0) {
        w |= bit;
        ++dirty_chunks_;
      }
    }
  }

  // The queue is dropped: its ranges become dirty chunks, the replica is
  // behind, and sync waiters are released.
  void overflow_locked(const std::string& why) {
    if (state_ == ReplicaState::kInSync) ++overflows_;
    fall_behind_locked(why);
  }
  void fall_behind_locked(const std::string& why) {
    for (const Entry& e : queue_) mark_dirty_locked(e.area, e.off, e.len);
    queue_.clear();
    backlog_bytes_ = 0;
    if (state_ == ReplicaState::kInSync) {
      behind_since_ns_ = mono_ns();
      spdlog::warn("replica {}: behind ({}); {} of chunks to copy once it takes writes again",
                   name_, why, dirty_chunks_ * kChunk);
    }
    state_ = ReplicaState::kBehind;
    header_dirty_ = true;
    release_waiters_locked(UINT64_MAX, /*lapse=*/true);  // completed without the replica
  }

  void release_waiters_locked(uint64_t upto, bool lapse) {
    auto it = waiters_.begin();
    while (it != waiters_.end()) {
      if (it->epoch <= upto) {
        BlockOp* op = it->op;
        if (lapse) ++sync_lapses_;
        it->loop->post([op] { op->on_done(Status::ok()); });
        it = waiters_.erase(it);
      } else {
        ++it;
      }
    }
  }

  // ---- the shipper (its own thread) ----
  void run() {
    auto loop = EventLoop::create(256);
    if (!loop) {
      spdlog::error("replica {}: no event loop: {}", name_, loop.status().message());
      return;
    }
    loop_ = std::move(*loop);
    for (;;) {
      ReplicaState st;
      bool header = false;
      {
        std::unique_lock<std::mutex> lock(mu_);
        lapse_waiters_locked();
        if (stopping_ && ((queue_.empty() && !flush_due_locked()) || mono_ns() > stop_deadline_ns_)) {
          break;
        }
        st = state_;
        header = header_dirty_;
        if (st == ReplicaState::kInSync && queue_.empty() && !header && !flush_due_locked()) {
          drained_cv_.notify_all();
          work_cv_.wait_for(lock, std::chrono::milliseconds(100));
          continue;
        }
      }
      if (header) write_header();
      if (st == ReplicaState::kInSync) {
        ship_queue();
        continue;
      }
      // Copying changes the target out of flush order: only once its header
      // durably says it is not in sync (a restore then refuses it).
      bool marked;
      {
        std::lock_guard<std::mutex> lock(mu_);
        marked = !target_says_in_sync_;
      }
      if (!marked && !write_header()) {
        backoff();
        continue;
      }
      copy_dirty();
    }
    write_header();
    std::lock_guard<std::mutex> lock(mu_);
    release_waiters_locked(UINT64_MAX, false);
    drained_cv_.notify_all();
  }

  // Every epoch before the queue's first entry is written to the target;
  // those not flushed there yet wait for a flush (also empty ones: a flush
  // with no writes before it may have a sync waiter).
  uint64_t written_through_locked() const {
    return (queue_.empty() ? open_epoch_ : queue_.front().epoch) - 1;
  }
  bool flush_due_locked() const { return written_through_locked() > shipped_epoch_; }

  // Sync mode: flushes are released after max_lag_s by this thread too,
  // since the shipper checks only between target requests, and one may
  // hang (for the op timeout of an RBD target, for ever on a hung mount).
  void watch_lapses() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!lapse_stop_) {
      lapse_cv_.wait_for(lock, std::chrono::milliseconds(100), [this] { return lapse_stop_; });
      lapse_waiters_locked();
    }
  }

  void lapse_waiters_locked() {
    if (waiters_.empty()) return;
    const int64_t limit = static_cast<int64_t>(opts_.max_lag_s) * 1'000'000'000;
    const int64_t now = mono_ns();
    auto it = waiters_.begin();
    while (it != waiters_.end()) {
      if (now - it->since_ns > limit) {
        BlockOp* op = it->op;
        ++sync_lapses_;
        if (sync_lapses_ == 1 || sync_lapses_ % 1000 == 0) {
          spdlog::warn("replica {}: a flush waited {} s for the replica and completes without it "
                       "({} times so far)", name_, opts_.max_lag_s, sync_lapses_);
        }
        it->loop->post([op] { op->on_done(Status::ok()); });
        it = waiters_.erase(it);
      } else {
        ++it;
      }
    }
  }

  // Runs ops against the target, at most max_inflight at a time; true if
  // all succeeded.
  bool submit_all(const std::vector<ShipOp*>& ops) {
    size_t next = 0, done = 0;
    std::vector<bool> seen(ops.size(), false);
    bool ok = true;
    for (ShipOp* op : ops) {
      op->done = false;
      op->status = Status::ok();
    }
    while (done < ops.size()) {
      while (next < ops.size() && next - done < opts_.max_inflight) {
        target_->submit(*loop_, ops[next]);
        ++next;
      }
      loop_->run_once(true);
      for (size_t i = 0; i < next; ++i) {
        if (ops[i]->done && !seen[i]) {
          seen[i] = true;
          ++done;
          if (!ops[i]->status) {
            ok = false;
            note_error(ops[i]->status);
          }
        }
      }
    }
    return ok;
  }

  // One request on the shipper's loop (a local device or the target).
  Status io(IoBackend& dev, BlockOpKind kind, uint64_t off, uint64_t len, uint8_t* buf,
            uint32_t flags = 0) {
    return run_on(*loop_, dev, kind, off, len, buf, flags);
  }

  void note_error(const Status& st) {
    std::lock_guard<std::mutex> lock(mu_);
    ++target_errors_;
    last_error_ = st.message();
    if (target_errors_ == 1 || target_errors_ % 100 == 0) {
      spdlog::warn("replica {}: target write failed: {} ({} errors so far; retrying)", name_,
                   st.message(), target_errors_);
    }
  }

  Status flush_target() {
    Status st = io(*target_, BlockOpKind::kFlush, 0, 0, nullptr);
    if (!st) note_error(st);
    return st;
  }

  void backoff() {
    std::unique_lock<std::mutex> lock(mu_);
    work_cv_.wait_for(lock, std::chrono::milliseconds(200), [this] { return stopping_; });
  }

  // One step of shipping: flush the target if an epoch is complete on it,
  // else write the oldest epoch's entries (as many as fit in a batch). An
  // epoch's entries are written only after every earlier epoch is flushed
  // on the target, so that the target passes through flush points only.
  void ship_queue() {
    uint64_t flush_to = 0;
    std::vector<Entry> batch;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (state_ != ReplicaState::kInSync) return;
      if (flush_due_locked()) {
        flush_to = written_through_locked();
      } else if (!queue_.empty()) {
        const uint64_t epoch = queue_.front().epoch;
        uint64_t bytes = 0;
        while (!queue_.empty() && queue_.front().epoch == epoch && bytes < kMaxBatchBytes) {
          bytes += queue_.front().len;
          batch.push_back(std::move(queue_.front()));
          queue_.pop_front();
        }
        in_batch_ = true;
      }
    }
    if (flush_to != 0) {
      if (!flush_target()) {
        backoff();
        return;
      }
      std::lock_guard<std::mutex> lock(mu_);
      shipped_epoch_ = std::max(shipped_epoch_, flush_to);
      ++epochs_;
      if (oldest_unflushed_ns_ != 0) {
        lag_samples_[lag_next_++ % kLagSamples] = mono_ns() - oldest_unflushed_ns_;
        oldest_unflushed_ns_ = 0;
      }
      release_waiters_locked(shipped_epoch_, false);
      if (mono_ns() - last_header_ns_ > 1'000'000'000) header_dirty_ = true;
      return;
    }
    if (batch.empty()) return;
    bool ok = write_batch(batch);
    while (!ok) {
      // Keep the batch and retry; the queue behind it may overflow, and
      // then the batch's ranges join the dirty chunks instead.
      backoff();
      {
        std::lock_guard<std::mutex> lock(mu_);
        lapse_waiters_locked();  // a flush waits at most max_lag_s, failing target or not
        if (state_ != ReplicaState::kInSync || (stopping_ && mono_ns() > stop_deadline_ns_)) {
          for (const Entry& e : batch) mark_dirty_locked(e.area, e.off, e.len);
          in_batch_ = false;
          if (state_ == ReplicaState::kInSync) overflow_locked("stopping while the target fails");
          return;
        }
      }
      ok = write_batch(batch);
    }
    std::lock_guard<std::mutex> lock(mu_);
    in_batch_ = false;
    for (const Entry& e : batch) {
      const uint64_t b = e.kind == Entry::Kind::kData ? e.len : kEntryOverhead;
      backlog_bytes_ -= std::min(backlog_bytes_, b);
      if (e.kind == Entry::Kind::kData) shipped_bytes_ += e.len;
      if (oldest_unflushed_ns_ == 0 || e.enq_ns < oldest_unflushed_ns_) oldest_unflushed_ns_ = e.enq_ns;
    }
  }

  // Writes one epoch's entries to the target: many in flight, but an entry
  // that overlaps an earlier one waits for it (the later one must land
  // last). Within a wave (no overlaps) entries that touch end to end, of
  // the same kind, go as one request of at most kMaxMergeBytes: the pool's
  // journal appends and a client's sequential writes then cost the target
  // one request per few MiB, not one per append (inside an epoch the order
  // of writes does not matter: a crash may keep any subset of them).
  bool write_batch(const std::vector<Entry>& batch) {
    std::deque<ShipOp> ops;                    // stable addresses
    std::deque<std::vector<uint8_t>> merged;   // the buffers of merged writes
    std::vector<size_t> wave;
    std::map<uint64_t, uint64_t> ranges;  // target begin -> end of the current wave
    bool ok = true;
    auto flush_wave = [&] {
      if (wave.empty()) return;
      std::sort(wave.begin(), wave.end(), [&](size_t a, size_t b) {
        return target_offset(batch[a]) < target_offset(batch[b]);
      });
      std::vector<ShipOp*> w;
      for (size_t i = 0; i < wave.size();) {
        const Entry& e = batch[wave[i]];
        const uint64_t begin = target_offset(e);
        uint64_t end = begin + e.len;
        size_t j = i + 1;
        while (j < wave.size() && batch[wave[j]].kind == e.kind &&
               target_offset(batch[wave[j]]) == end && end + batch[wave[j]].len - begin <= kMaxMergeBytes) {
          end += batch[wave[j]].len;
          ++j;
        }
        ShipOp& op = ops.emplace_back();
        op.kind = e.kind == Entry::Kind::kData   ? BlockOpKind::kWrite
                  : e.kind == Entry::Kind::kZero ? BlockOpKind::kWriteZeroes
                                                 : BlockOpKind::kTrim;
        op.offset = begin;
        op.length = end - begin;
        op.buf = e.data.empty() ? nullptr : const_cast<uint8_t*>(e.data.data());
        if (j > i + 1 && e.kind == Entry::Kind::kData) {
          std::vector<uint8_t>& buf = merged.emplace_back();
          buf.reserve(end - begin);
          for (size_t k = i; k < j; ++k) {
            buf.insert(buf.end(), batch[wave[k]].data.begin(), batch[wave[k]].data.end());
          }
          op.buf = buf.data();
        }
        w.push_back(&op);
        i = j;
      }
      ok = submit_all(w) && ok;
      wave.clear();
      ranges.clear();
    };
    for (size_t i = 0; i < batch.size(); ++i) {
      const Entry& e = batch[i];
      const uint64_t b = target_offset(e), end = b + e.len;
      auto it = ranges.upper_bound(b);
      bool overlap = it != ranges.end() && it->first < end;
      if (!overlap && it != ranges.begin()) overlap = std::prev(it)->second > b;
      if (overlap) flush_wave();
      ranges[b] = std::max(ranges[b], end);
      wave.push_back(i);
    }
    flush_wave();
    return ok;
  }

  uint64_t target_offset(const Entry& e) const { return area_offset(e.area) + e.off; }

  // One dirty chunk copied (or, with none left, the switch to in sync).
  void copy_dirty() {
    size_t area = 0;
    uint64_t chunk = 0;
    bool found = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      found = take_dirty_locked(area, chunk);
      if (!found) {
        // Nothing left to copy: from here on writes are queued. They join a
        // new epoch, so the target is flushed (the copies made durable)
        // before any of them is shipped; the header says "in sync" only
        // after that flush (write_header flushes first), and run() writes it
        // before it ships anything.
        state_ = ReplicaState::kInSync;
        ++open_epoch_;
        in_sync_since_ns_ = wall_ns();
        header_dirty_ = true;
        spdlog::info("replica {}: in sync ({} copied since it fell behind or started)", name_,
                     copied_bytes_);
        return;
      }
    }
    const uint64_t off = chunk * kChunk;
    const uint64_t len = std::min<uint64_t>(kChunk, area_bytes(area) - off);
    local_.resize(len);
    remote_.resize(len);
    Status st = io(*areas_[area], BlockOpKind::kRead, off, len, local_.data());
    if (!st) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        mark_dirty_locked(area, off, len);
        // The chunk may stay unreadable (a bad sector): the scan goes on
        // past it and tries it again after the others.
        if (scan_area_ == area) scan_chunk_ = std::max(scan_chunk_, chunk + 1);
        ++local_failures_;
        if (local_failures_ == 1 || local_failures_ % 1000 == 0) {
          spdlog::warn("replica {}: reading the local device at {} failed: {} ({} local failures so far)",
                       name_, off, st.message(), local_failures_);
        }
        last_error_ = "reading the local device: " + st.message();
      }
      backoff();
      return;
    }
    bool write = true;
    if (compare_) {
      Status rs = io(*target_, BlockOpKind::kRead, area_offset(area) + off, len, remote_.data());
      write = !rs || std::memcmp(local_.data(), remote_.data(), len) != 0;
    }
    if (write) {
      const bool zero = std::all_of(local_.begin(), local_.end(), [](uint8_t b) { return b == 0; });
      Status ws = zero ? io(*target_, BlockOpKind::kWriteZeroes, area_offset(area) + off, len, nullptr)
                       : io(*target_, BlockOpKind::kWrite, area_offset(area) + off, len, local_.data());
      if (!ws) {
        note_error(ws);
        {
          std::lock_guard<std::mutex> lock(mu_);
          mark_dirty_locked(area, off, len);
        }
        backoff();
        return;
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      copied_bytes_ += len;
      if (write) shipped_bytes_ += len;
    }
    throttle(len);
  }

  // The next dirty chunk: the hot order first (primary), then in order.
  bool take_dirty_locked(size_t& area, uint64_t& chunk) {
    if (dirty_chunks_ == 0) return false;
    const size_t prim = areas_.size() - 1;
    while (hot_next_ < hot_.size()) {
      const uint64_t c = hot_[hot_next_++] / kChunk;
      if (c / 64 < dirty_[prim].size() && (dirty_[prim][c / 64] >> (c % 64) & 1) != 0) {
        dirty_[prim][c / 64] &= ~(1ull << (c % 64));
        --dirty_chunks_;
        area = prim;
        chunk = c;
        return true;
      }
    }
    for (size_t n = 0; n < areas_.size(); ++n) {
      const size_t a = (scan_area_ + n) % areas_.size();
      auto& bits = dirty_[a];
      const uint64_t from = n == 0 ? scan_chunk_ : 0;
      for (size_t w = from / 64; w < bits.size(); ++w) {
        const uint64_t word = w == from / 64 ? bits[w] & (~0ull << (from % 64)) : bits[w];
        if (word == 0) continue;
        const int b = __builtin_ctzll(word);
        bits[w] &= ~(1ull << b);
        --dirty_chunks_;
        area = a;
        chunk = w * 64 + static_cast<uint64_t>(b);
        scan_area_ = a;
        scan_chunk_ = chunk;
        return true;
      }
      scan_chunk_ = 0;
    }
    // Bits left behind the scan position: start over.
    scan_area_ = 0;
    scan_chunk_ = 0;
    return take_dirty_locked(area, chunk);
  }

  void throttle(uint64_t bytes) {
    if (opts_.resync_bytes_per_s == 0) return;
    const int64_t now = mono_ns();
    if (budget_start_ns_ == 0 || now - budget_start_ns_ > 1'000'000'000) {
      budget_start_ns_ = now;
      budget_used_ = 0;
    }
    budget_used_ += bytes;
    if (budget_used_ >= opts_.resync_bytes_per_s) {
      const int64_t wait = 1'000'000'000 - (now - budget_start_ns_);
      std::unique_lock<std::mutex> lock(mu_);
      if (wait > 0) {
        work_cv_.wait_for(lock, std::chrono::nanoseconds(wait), [this] { return stopping_; });
      }
      budget_start_ns_ = mono_ns();
      budget_used_ = 0;
    }
  }

  // Writes the header (after a flush of the target); false if it failed.
  bool write_header() {
    ReplicaHeader h = layout_;
    {
      std::lock_guard<std::mutex> lock(mu_);
      h.state = state_;
      h.epoch = shipped_epoch_;
      h.in_sync_since_ns = state_ == ReplicaState::kInSync ? in_sync_since_ns_ : 0;
      header_dirty_ = false;
    }
    h.updated_ns = wall_ns();
    std::vector<uint8_t> block = encode_replica_header(h);
    // The areas' writes before the header's claim: flushed first.
    Status st = flush_target();
    if (st) st = io(*target_, BlockOpKind::kWrite, 0, kBlock, block.data(), kFua);
    if (!st) {
      note_error(st);
      std::lock_guard<std::mutex> lock(mu_);
      header_dirty_ = true;
      return false;
    }
    last_header_ns_ = mono_ns();
    std::lock_guard<std::mutex> lock(mu_);
    target_says_in_sync_ = h.state == ReplicaState::kInSync;
    return true;
  }

  ReplicaStats stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    ReplicaStats s;
    s.state = state_;
    s.sync = opts_.sync;
    s.backlog_bytes = backlog_bytes_;
    s.backlog_entries = queue_.size();
    s.dirty_bytes = dirty_chunks_ * kChunk;
    const int64_t now = mono_ns();
    if (state_ == ReplicaState::kInSync) {
      if (!queue_.empty()) s.lag_seconds = static_cast<double>(now - queue_.front().enq_ns) / 1e9;
    } else if (behind_since_ns_ != 0) {
      s.lag_seconds = static_cast<double>(now - behind_since_ns_) / 1e9;
    }
    const size_t n = std::min<size_t>(lag_next_, kLagSamples);
    if (n > 0) {
      std::vector<int64_t> v(lag_samples_.begin(), lag_samples_.begin() + static_cast<ptrdiff_t>(n));
      std::sort(v.begin(), v.end());
      s.lag_p50_seconds = static_cast<double>(v[n / 2]) / 1e9;
      s.lag_p99_seconds = static_cast<double>(v[std::min(n - 1, n * 99 / 100)]) / 1e9;
    }
    s.shipped_bytes = shipped_bytes_;
    s.copied_bytes = copied_bytes_;
    s.epochs = epochs_;
    s.overflows = overflows_;
    s.local_failures = local_failures_;
    s.target_errors = target_errors_;
    s.sync_lapses = sync_lapses_;
    s.last_error = last_error_;
    s.in_sync_since_ns = state_ == ReplicaState::kInSync ? in_sync_since_ns_ : 0;
    return s;
  }

  std::shared_ptr<IoBackend> target_;
  ReplicaHeader layout_;
  std::vector<std::shared_ptr<IoBackend>> areas_;
  ReplicaOptions opts_;
  std::string name_;
  std::unique_ptr<EventLoop> loop_;  // the shipper's
  std::thread thread_;

  mutable std::mutex mu_;
  std::condition_variable work_cv_;
  bool finished_ = false;  // run() returned (under mu_)
  std::condition_variable finished_cv_;
  std::thread lapse_thread_;  // sync mode: watch_lapses()
  std::condition_variable lapse_cv_;
  bool lapse_stop_ = false;
  std::condition_variable drained_cv_;
  ReplicaState state_ = ReplicaState::kSyncing;
  bool compare_ = false;  // resync compares with the target before writing
  std::deque<Entry> queue_;
  bool in_batch_ = false;
  uint64_t backlog_bytes_ = 0;
  uint64_t open_epoch_ = 1;     // entries now join this epoch
  uint64_t shipped_epoch_ = 0;  // ... and flushed on the target
  std::vector<Waiter> waiters_;
  std::vector<std::vector<uint64_t>> dirty_;
  uint64_t dirty_chunks_ = 0;
  std::vector<uint64_t> hot_;
  size_t hot_next_ = 0;
  size_t scan_area_ = 0;
  uint64_t scan_chunk_ = 0;  // the scan's position in scan_area_
  bool stopping_ = false;
  int64_t stop_deadline_ns_ = 0;
  bool header_dirty_ = true;
  int64_t last_header_ns_ = 0;
  // What the target's header durably says; until a header is written the
  // target may hold an earlier run's "in sync".
  bool target_says_in_sync_ = true;
  int64_t in_sync_since_ns_ = 0;
  int64_t behind_since_ns_ = 0;
  int64_t oldest_unflushed_ns_ = 0;  // the oldest entry written since the target's last flush
  std::vector<int64_t> lag_samples_ = std::vector<int64_t>(kLagSamples, 0);
  uint64_t lag_next_ = 0;
  uint64_t shipped_bytes_ = 0, copied_bytes_ = 0, epochs_ = 0, overflows_ = 0;
  uint64_t target_errors_ = 0, sync_lapses_ = 0, local_failures_ = 0;
  std::string last_error_;
  int64_t budget_start_ns_ = 0;
  uint64_t budget_used_ = 0;
  std::vector<uint8_t> local_, remote_;  // copy buffers (shipper thread)
};

// ------------------------------------------------------------------ taps

namespace {

class ReplicaTap final : public LayeredBackend {
 public:
  ReplicaTap(Replica::Impl* r, size_t area, std::shared_ptr<IoBackend> inner)
      : LayeredBackend(std::move(inner)), r_(r), area_(area) {}

  void submit(EventLoop& loop, BlockOp* op) override {
    if (op->kind == BlockOpKind::kRead || op->kind == BlockOpKind::kCache) {
      inner_->submit(loop, op);
      return;
    }
    auto* t = new TapOp(r_, area_, op, &loop);
    t->kind = op->kind;
    t->flags = op->flags;
    t->buf = op->buf;
    t->offset = op->offset;
    t->length = op->length;
    inner_->submit(loop, t);
  }

 private:
  class TapOp final : public BlockOp {
   public:
    TapOp(Replica::Impl* r, size_t area, BlockOp* orig, EventLoop* loop)
        : r_(r), area_(area), orig_(orig), orig_loop_(loop) {}
    void on_done(Status st) override {
      BlockOp* orig = orig_;
      const bool now = r_->completed(area_, *orig, orig_loop_, st);
      delete this;
      if (now) orig->on_done(std::move(st));
    }

   private:
    Replica::Impl* r_;
    size_t area_;
    BlockOp* orig_;
    EventLoop* orig_loop_;
  };

  Replica::Impl* r_;
  size_t area_;
};

}  // namespace

// ------------------------------------------------------------------ Replica

Result<std::unique_ptr<Replica>> Replica::open(std::shared_ptr<IoBackend> target,
                                               ReplicaHeader layout,
                                               std::vector<std::shared_ptr<IoBackend>> areas,
                                               ReplicaOptions opts, std::string target_name) {
  if (areas.size() != layout.pool_bytes.size() + 1) {
    return Status::invalid("replica: one local device per pool device, and the primary");
  }
  if (target->info().read_only) return Status::invalid("replica target " + target_name + " is read-only");
  const uint64_t need = layout.total_bytes();
  if (target->size_bytes() < need) {
    return Status::invalid("replica target " + target_name + " has " +
                           std::to_string(target->size_bytes()) + " bytes; it needs " +
                           std::to_string(need) + " (a 1 MiB header, the pool devices and the primary)");
  }
  auto impl = std::make_unique<Impl>(std::move(target), layout, std::move(areas), opts, target_name);
  // What the target holds: the same replica (compare while resyncing) or
  // anything else (copy everything).
  Result<ReplicaHeader> old = read_replica_header(*impl->target_);
  const bool same = old && old->primary_id == layout.primary_id &&
                    old->primary_bytes == layout.primary_bytes && old->pool_bytes == layout.pool_bytes;
  if (old && !same) {
    spdlog::warn("replica {}: holds the replica of another backing ({}); it is overwritten",
                 target_name, old->primary_id);
  } else if (!old && old.status().code() != Status::Code::kNotFound) {
    spdlog::warn("replica {}: {}; it is overwritten", target_name, old.status().message());
  }
  impl->compare_ = same;
  for (size_t a = 0; a < impl->areas_.size(); ++a) {
    impl->mark_dirty_locked(a, 0, impl->area_bytes(a));
  }
  spdlog::info("replica {}: {} ({} bytes to check)", target_name,
               same ? "resynchronising with an earlier replica of this backing"
                    : "initial copy",
               impl->dirty_chunks_ * kChunk);
  return std::unique_ptr<Replica>(new Replica(std::move(impl), std::move(target_name)));
}

Replica::Replica(std::unique_ptr<Impl> impl, std::string target_name)
    : impl_(std::move(impl)), target_name_(std::move(target_name)) {}

namespace {
// The state of shippers stop() left behind: never freed (they may still use
// it), and reachable, so that leak checkers do not count it.
std::mutex g_abandoned_mu;
std::vector<Replica::Impl*>* g_abandoned = new std::vector<Replica::Impl*>;
}  // namespace

Replica::~Replica() {
  stop();
  if (abandoned_) {
    std::lock_guard<std::mutex> lock(g_abandoned_mu);
    g_abandoned->push_back(impl_.release());
  }
}

std::shared_ptr<IoBackend> Replica::tap(size_t area) {
  return std::make_shared<ReplicaTap>(impl_.get(), area, impl_->areas_.at(area));
}

void Replica::set_hot_order(std::vector<uint64_t> offsets) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  impl_->hot_ = std::move(offsets);
  impl_->hot_next_ = 0;
}

void Replica::start() {
  if (impl_->thread_.joinable() || abandoned_) return;
  // The threads hold the Impl, not this: a shipper left behind by stop()
  // outlives the Replica.
  Impl* impl = impl_.get();
  impl_->thread_ = std::thread([impl] {
    impl->run();
    std::lock_guard<std::mutex> lock(impl->mu_);
    impl->finished_ = true;
    impl->finished_cv_.notify_all();
  });
  if (impl_->opts_.sync) impl_->lapse_thread_ = std::thread([impl] { impl->watch_lapses(); });
}

bool Replica::stop() {
  if (!impl_->thread_.joinable()) return !abandoned_;
  const uint64_t limit_ms = uint64_t{impl_->opts_.stop_timeout_ms} + impl_->opts_.stop_grace_ms;
  bool ended;
  {
    std::unique_lock<std::mutex> lock(impl_->mu_);
    impl_->stopping_ = true;
    impl_->stop_deadline_ns_ = mono_ns() + int64_t{impl_->opts_.stop_timeout_ms} * 1'000'000;
    impl_->work_cv_.notify_all();
    ended = impl_->finished_cv_.wait_for(lock, std::chrono::milliseconds(limit_ms), [this] { return impl_->finished_; });
    if (!ended) impl_->release_waiters_locked(UINT64_MAX, /*lapse=*/true);
  }
  if (ended) {
    impl_->thread_.join();
  } else {
    impl_->thread_.detach();
    abandoned_ = true;
    spdlog::error("replica {}: a request to the target has not completed {} ms after the stop; "
                  "stopping without it (the target holds the state at an earlier flush; the next "
                  "start resynchronises)",
                  target_name_, limit_ms);
  }
  if (impl_->lapse_thread_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(impl_->mu_);
      impl_->lapse_stop_ = true;
      impl_->lapse_cv_.notify_all();
    }
    impl_->lapse_thread_.join();
  }
  return ended;
}

ReplicaStats Replica::stats() const { return impl_->stats(); }

bool Replica::drain(uint32_t timeout_ms, bool whole) {
  std::unique_lock<std::mutex> lock(impl_->mu_);
  return impl_->drained_cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] {
    const bool queue_done =
        impl_->queue_.empty() && !impl_->in_batch_ && !impl_->flush_due_locked();
    if (!whole) return queue_done || impl_->state_ != ReplicaState::kInSync;
    return impl_->state_ == ReplicaState::kInSync && queue_done && !impl_->header_dirty_;
  });
}

}  // namespace shadowd
