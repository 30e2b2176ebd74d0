#include "core/reconstructor.h"

#include <algorithm>
#include <cstring>

namespace shadowd {

Reconstructor::Reconstructor(ShadowStore& store, uint64_t device_bytes, uint32_t segment_bytes,
                             unsigned threads, uint64_t cache_bytes)
    : store_(store), dev_bytes_(device_bytes), seg_bytes_(segment_bytes), cache_limit_(cache_bytes) {
  threads = std::max(1u, threads);
  for (unsigned i = 0; i < threads; ++i) threads_.emplace_back([this] { worker(); });
}

Reconstructor::~Reconstructor() {
  {
    std::lock_guard<std::mutex> lock(q_mu_);
    stop_ = true;
  }
  q_cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void Reconstructor::post(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> lock(q_mu_);
    queue_.push_back(std::move(job));
  }
  q_cv_.notify_one();
}

void Reconstructor::worker() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(q_mu_);
      q_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and nothing left to do
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    job();
  }
}

Reconstructor::Segment Reconstructor::cached(const Key& k) {
  std::lock_guard<std::mutex> lock(cache_mu_);
  auto f = index_.find(k);
  if (f == index_.end()) return nullptr;
  lru_.splice(lru_.begin(), lru_, f->second);
  return f->second->second;
}

void Reconstructor::remember(const Key& k, Segment v) {
  if (cache_limit_ == 0 || v->size() > cache_limit_) return;
  std::lock_guard<std::mutex> lock(cache_mu_);
  if (index_.count(k) != 0) return;
  cache_bytes_ += v->size();
  lru_.emplace_front(k, std::move(v));
  index_[k] = lru_.begin();
  while (cache_bytes_ > cache_limit_ && !lru_.empty()) {
    cache_bytes_ -= lru_.back().second->size();
    index_.erase(lru_.back().first);
    lru_.pop_back();
  }
}

void Reconstructor::drop(uint64_t seq) {
  std::lock_guard<std::mutex> lock(cache_mu_);
  for (auto it = lru_.begin(); it != lru_.end();) {
    if (it->first.seq == seq) {
      cache_bytes_ -= it->second->size();
      index_.erase(it->first);
      it = lru_.erase(it);
    } else {
      ++it;
    }
  }
}

Result<Reconstructor::Segment> Reconstructor::segment(uint64_t seq, uint64_t seg, ReplayCost* cost,
                                                     bool use_cache) {
  ReplayCost c;
  c.segments = 1;
  const Key k{seq, seg};
  if (use_cache) {
    if (Segment hit = cached(k)) {
      c.cache_hits = 1;
      if (cost != nullptr) cost->add(c);
      return hit;
    }
  }
  auto r = store_.reconstruct_at(seg, seq);
  if (!r) return r.status();
  auto data = std::make_shared<const std::vector<uint8_t>>(std::move(r->data));
  if (r->source == ShadowStore::kFromPrimary) {
    // The primary's current content: valid only until the next write, so
    // it is not cached.
    c.from_primary = 1;
  } else {
    c.versions_decoded = r->versions_decoded;
    c.records_applied = r->records_applied;
    if (use_cache) remember(k, data);
  }
  if (cost != nullptr) cost->add(c);
  return data;
}

namespace {

// One request cut into segment pieces; the last piece to finish reports.
struct Fanout {
  std::mutex mu;
  Status status;
  ReplayCost cost;
  size_t left = 0;
  std::function<void(Status, const ReplayCost&)> done;
};

}  // namespace

void Reconstructor::read_async(uint64_t seq, uint64_t offset, uint64_t length, uint8_t* out,
                               std::function<void(Status, const ReplayCost&)> done) {
  if (length == 0 || offset + length > dev_bytes_ || offset + length < offset) {
    Status st = length == 0 ? Status::ok() : Status::out_of_range("read beyond the end of the device");
    post([done = std::move(done), st] { done(st, ReplayCost{}); });
    return;
  }
  // Pieces: a run of consecutive segments that come from the primary at
  // `seq` is read in one request (one large read of the primary, not one
  // per segment: on a remote primary such as RBD that is what keeps a
  // restore near the device's sequential speed); every other segment on
  // its own. A run the store cannot serve whole (a write raced) falls back
  // to segment by segment.
  struct Piece {
    uint64_t first, last;  // segments
    bool primary;
  };
  const uint64_t first = offset / seg_bytes_;
  const uint64_t last = (offset + length - 1) / seg_bytes_;
  std::vector<Piece> pieces;
  for (uint64_t s = first; s <= last; ++s) {
    const bool primary = store_.source_of(s, seq) == ShadowStore::kFromPrimary;
    if (primary && !pieces.empty() && pieces.back().primary && pieces.back().last + 1 == s &&
        (s - pieces.back().first + 1) * seg_bytes_ <= kMaxPrimaryRunBytes) {
      pieces.back().last = s;
    } else {
      pieces.push_back({s, s, primary});
    }
  }
  auto f = std::make_shared<Fanout>();
  f->left = pieces.size();
  f->done = std::move(done);
  for (const Piece& p : pieces) {
    post([this, f, p, seq, offset, length, out] {
      // The bytes of the request inside segments [s0, s1].
      auto span_of = [&](uint64_t s0, uint64_t s1) {
        return std::pair{std::max(offset, s0 * seg_bytes_),
                         std::min(offset + length, (s1 + 1) * seg_bytes_)};
      };
      ReplayCost c;
      Status st;
      bool served = false;
      if (p.primary) {
        const auto [from, to] = span_of(p.first, p.last);
        auto r = store_.read_primary_at(from, to - from, seq, out + (from - offset));
        if (!r) {
          st = r.status();
        } else if (*r) {
          served = true;
          c.segments = c.from_primary = p.last - p.first + 1;
        }
      }
      for (uint64_t s = p.first; st && !served && s <= p.last; ++s) {
        const uint64_t seg_start = s * seg_bytes_;
        const auto [from, to] = span_of(s, s);
        auto data = segment(seq, s, &c);
        if (!data) {
          st = data.status();
        } else if ((*data)->size() < to - seg_start) {
          st = Status::error(Status::Code::kCorruption, "reconstructed segment is short", EIO);
        } else {
          std::memcpy(out + (from - offset), (*data)->data() + (from - seg_start), to - from);
        }
      }
      bool last_one;
      {
        std::lock_guard<std::mutex> lock(f->mu);
        if (!st && f->status) f->status = st;
        f->cost.add(c);
        last_one = --f->left == 0;
      }
      if (last_one) f->done(f->status, f->cost);
    });
  }
}

Status Reconstructor::read(uint64_t seq, uint64_t offset, uint64_t length, uint8_t* out, ReplayCost* cost) {
  std::mutex mu;
  std::condition_variable cv;
  bool finished = false;
  Status result;
  read_async(seq, offset, length, out, [&](Status st, const ReplayCost& c) {
    std::lock_guard<std::mutex> lock(mu);
    result = st;
    if (cost != nullptr) cost->add(c);
    finished = true;
    cv.notify_all();
  });
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return finished; });
  return result;
}

// ---------------------------------------------------------------------------

PointInTimeBackend::PointInTimeBackend(std::shared_ptr<Reconstructor> rec, uint64_t seq)
    : rec_(std::move(rec)), seq_(seq), pending_(std::make_shared<std::atomic<uint64_t>>(0)) {
  info_.size_bytes = rec_->device_bytes();
  info_.read_only = true;
  info_.can_trim = false;
  info_.can_zero = false;
  info_.can_sources = true;
}

PointInTimeBackend::~PointInTimeBackend() {
  // Reads still on workers would write into buffers of requests that are
  // gone; connections finish their requests before dropping the export, so
  // this only waits in the rare case of a race with shutdown.
  while (pending_->load() != 0) std::this_thread::yield();
  rec_->drop(seq_);
}

void PointInTimeBackend::submit(EventLoop& loop, BlockOp* op) {
  EventLoop* l = &loop;
  switch (op->kind) {
    case BlockOpKind::kRead: {
      pending_->fetch_add(1);
      auto pending = pending_;
      rec_->read_async(seq_, op->offset, op->length, op->buf,
                       [this, l, op, pending](Status st, const ReplayCost& c) {
                         {
                           std::lock_guard<std::mutex> lock(mu_);
                           ++counters_.reads;
                           if (st) {
                             counters_.bytes_read += op->length;
                           } else {
                             ++counters_.errors;
                           }
                           counters_.cost.add(c);
                         }
                         l->post([op, st] { op->on_done(st); });
                         pending->fetch_sub(1);
                       });
      return;
    }
    case BlockOpKind::kFlush:
    case BlockOpKind::kCache:
      l->post([op] { op->on_done(Status::ok()); });
      return;
    default:
      l->post([op] { op->on_done(Status::error(Status::Code::kReadOnly, "point-in-time exports are read-only", EPERM)); });
      return;
  }
}

Result<IoBackend::Extent> PointInTimeBackend::extent_at(uint64_t offset, uint64_t max_len) {
  (void)offset;
  return Extent{max_len, false};
}

Result<IoBackend::SourceExtent> PointInTimeBackend::source_at(uint64_t offset, uint64_t max_len) {
  const uint64_t seg_bytes = rec_->segment_bytes();
  const uint64_t end = std::min(offset + max_len, info_.size_bytes);
  if (offset >= end) return SourceExtent{max_len, kSourcePrimary};
  uint64_t s = offset / seg_bytes;
  const uint32_t flags = rec_->store().source_of(s, seq_);
  uint64_t pos = (s + 1) * seg_bytes;
  // Bounded: a run is cut after 64 Ki segments; the client asks again.
  for (int n = 0; pos < end && n < 65536; ++n, pos += seg_bytes) {
    if (rec_->store().source_of(pos / seg_bytes, seq_) != flags) break;
  }
  return SourceExtent{std::min(pos, end) - offset, flags};
}

PointInTimeBackend::Counters PointInTimeBackend::counters() const {
  std::lock_guard<std::mutex> lock(mu_);
  return counters_;
}

}  // namespace shadowd
