#include "core/monitor.h"

#include <map>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cmath>

namespace shadowd {
namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;

bool is_pow2(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

}  // namespace

Status MonitorConfig::validate() const {
  if (!is_pow2(segment_bytes) || segment_bytes < (64u << 10) || segment_bytes > (1u << 20)) {
    return Status::invalid("segment size must be a power of two, 64 KiB..1 MiB");
  }
  if (bucket_seconds < 1 || bucket_seconds > 3600) return Status::invalid("bucket must be 1..3600 s");
  if (window_seconds.empty() || window_seconds.size() > 8) {
    return Status::invalid("between 1 and 8 windows");
  }
  for (size_t i = 0; i < window_seconds.size(); ++i) {
    const uint32_t w = window_seconds[i];
    if (w < bucket_seconds || w % bucket_seconds != 0) {
      return Status::invalid("each window must be a multiple of the bucket length");
    }
    for (size_t j = 0; j < i; ++j) {
      if (window_seconds[j] == w) return Status::invalid("window listed twice");
    }
  }
  if (history_max_records < 1) return Status::invalid("history_max_records must be >= 1");
  return Status::ok();
}

Monitor::Monitor(const MonitorConfig& cfg, const Clock& clock)
    : cfg_(cfg), clock_(clock) {
  assert(cfg_.validate().is_ok());
  shift_ = static_cast<uint32_t>(__builtin_ctz(cfg_.segment_bytes));
  nsegments_ = (cfg_.device_bytes + cfg_.segment_bytes - 1) >> shift_;
  epoch_s_ = now_s();
  open_bucket_s_ = bucket_start(epoch_s_);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  cells_bytes_ = (nsegments_ * sizeof(SegmentCell) + page - 1) / page * page;
  if (cells_bytes_ > 0) {
    // Untouched pages stay unbacked: a sparse device costs only what is used.
    void* p = mmap(nullptr, cells_bytes_, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    assert(p != MAP_FAILED);
    cells_ = static_cast<SegmentCell*>(p);  // zero-filled = all counters 0
    const uint64_t pages = (nsegments_ + kCellsPerPage - 1) / kCellsPerPage;
    touched_words_ = (pages + 63) / 64;
    touched_ = std::make_unique<std::atomic<uint64_t>[]>(touched_words_);
  }
  for (uint32_t w : cfg_.window_seconds) windows_.push_back(Window{w, {}, 0});
  const auto& ws = cfg_.window_seconds;
  prio_.scoring_window_seconds =
      std::find(ws.begin(), ws.end(), 3600u) != ws.end() ? 3600u : ws.front();
}

Monitor::~Monitor() {
  if (cells_ != nullptr) munmap(cells_, cells_bytes_);
}

void Monitor::record(AccessOp op, uint64_t offset, uint64_t length) {
  if (length == 0 || offset >= cfg_.device_bytes) return;
  const uint64_t end = std::min(cfg_.device_bytes, offset + std::min(length, cfg_.device_bytes));
  const uint32_t now = rel(now_s());
  for (uint64_t id = offset >> shift_; id <= (end - 1) >> shift_; ++id) {
    SegmentCell& c = cells_[id];
    const uint64_t seg_begin = id << shift_;
    const uint64_t seg_end = seg_begin + cfg_.segment_bytes;
    const uint64_t bytes = std::min(end, seg_end) - std::max(offset, seg_begin);
    if (op == AccessOp::kRead) {
      c.reads.fetch_add(1, kRelaxed);
      c.bytes_read.fetch_add(bytes, kRelaxed);
    } else {
      c.writes.fetch_add(1, kRelaxed);
      c.bytes_written.fetch_add(bytes, kRelaxed);
      if (c.last_write.load(kRelaxed) != now) c.last_write.store(now, kRelaxed);
    }
    if (c.last_access.load(kRelaxed) != now) c.last_access.store(now, kRelaxed);
    const uint64_t page = id / kCellsPerPage;
    std::atomic<uint64_t>& word = touched_[page / 64];
    const uint64_t bit = uint64_t{1} << (page % 64);
    if ((word.load(kRelaxed) & bit) == 0) word.fetch_or(bit, kRelaxed);
  }
}

template <typename Fn>
void Monitor::for_each_touched(Fn fn) const {
  for (size_t w = 0; w < touched_words_; ++w) {
    uint64_t bits = touched_[w].load(kRelaxed);
    while (bits != 0) {
      const uint64_t page = w * 64 + static_cast<uint64_t>(__builtin_ctzll(bits));
      bits &= bits - 1;
      const uint64_t end = std::min(nsegments_, (page + 1) * kCellsPerPage);
      for (uint64_t id = page * kCellsPerPage; id < end; ++id) fn(id);
    }
  }
}

bool Monitor::has_current(uint64_t id) const {
  const SegmentCell& c = cells_[id];
  // Bytes too: a roll racing with record() may leave bytes whose counts
  // already moved; they go into the next bucket.
  return (c.reads.load(kRelaxed) | c.writes.load(kRelaxed)) != 0 ||
         (c.bytes_read.load(kRelaxed) | c.bytes_written.load(kRelaxed)) != 0;
}

Monitor::Agg Monitor::current(uint64_t id) const {
  const SegmentCell& c = cells_[id];
  Agg a;
  a.reads = c.reads.load(kRelaxed);
  a.writes = c.writes.load(kRelaxed);
  a.bytes_read = c.bytes_read.load(kRelaxed);
  a.bytes_written = c.bytes_written.load(kRelaxed);
  return a;
}

bool Monitor::roll() {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now = now_s();
  if (now < open_bucket_s_ + cfg_.bucket_seconds) return false;
  Bucket b{open_bucket_s_, {}};
  for_each_touched([&](uint64_t id) {
    if (!has_current(id)) return;
    SegmentCell& c = cells_[id];
    HistoryRecord r{open_bucket_s_, id, c.reads.exchange(0, kRelaxed),
                    c.writes.exchange(0, kRelaxed), c.bytes_read.exchange(0, kRelaxed),
                    c.bytes_written.exchange(0, kRelaxed)};
    b.records.push_back(r);
  });
  for (const HistoryRecord& r : b.records) {
    for (Window& w : windows_) {
      w.agg[r.segment].add(r);
    }
    if (sink_ != nullptr) sink_->append(r);
  }
  history_records_ += b.records.size();
  buckets_.push_back(std::move(b));
  open_bucket_s_ = bucket_start(now);
  expire_windows(now);
  // The newest bucket always stays: the bound trims the past, never the present.
  while (history_records_ > cfg_.history_max_records && buckets_.size() > 1) drop_oldest_bucket();
  return true;
}

void Monitor::expire_windows(int64_t now) const {
  for (Window& w : windows_) {
    while (w.first_bucket < buckets_dropped_ + buckets_.size()) {
      const Bucket& b = buckets_[w.first_bucket - buckets_dropped_];
      // A bucket counts while any part of it is inside [now - w, now].
      if (b.start_s + cfg_.bucket_seconds > now - static_cast<int64_t>(w.seconds)) break;
      for (const HistoryRecord& r : b.records) {
        w.subtract(r);
      }
      ++w.first_bucket;
    }
  }
}

void Monitor::drop_oldest_bucket() {
  const Bucket& b = buckets_.front();
  for (Window& w : windows_) {
    if (w.first_bucket != buckets_dropped_) continue;  // already outside w
    for (const HistoryRecord& r : b.records) {
      w.subtract(r);
    }
    ++w.first_bucket;
  }
  history_records_ -= b.records.size();
  history_dropped_ += b.records.size();
  buckets_.pop_front();
  ++buckets_dropped_;
}

const Monitor::Window* Monitor::find_window(uint32_t seconds) const {
  for (const Window& w : windows_) {
    if (w.seconds == seconds) return &w;
  }
  return nullptr;
}

WindowStats Monitor::window_stats(const Window& w, uint64_t id) const {
  Agg a = current(id);
  auto it = w.agg.find(id);
  if (it != w.agg.end()) a.add(it->second);
  WindowStats s;
  s.window_seconds = w.seconds;
  s.reads = a.reads;
  s.writes = a.writes;
  s.bytes_read = a.bytes_read;
  s.bytes_written = a.bytes_written;
  s.access_rate = static_cast<double>(a.reads + a.writes) / w.seconds;
  s.change_rate = static_cast<double>(a.writes) / w.seconds;
  return s;
}

double Monitor::priority_of(uint64_t id, const WindowStats& ws, int64_t now) const {
  const int64_t last = abs_time(cells_[id].last_access.load(kRelaxed));
  const double since = static_cast<double>(now - (last < 0 ? epoch_s_ : last));
  return prio_.baseline + prio_.alpha * ws.access_rate + prio_.beta * ws.change_rate -
         prio_.gamma * since;
}

SegmentReport Monitor::report(uint64_t id, int64_t now) const {
  SegmentReport r;
  r.id = id;
  r.offset = id << shift_;
  r.length = std::min<uint64_t>(cfg_.segment_bytes, cfg_.device_bytes - r.offset);
  r.last_access_s = abs_time(cells_[id].last_access.load(kRelaxed));
  r.last_write_s = abs_time(cells_[id].last_write.load(kRelaxed));
  for (const Window& w : windows_) r.windows.push_back(window_stats(w, id));
  const Window* sw = find_window(prio_.scoring_window_seconds);
  r.priority = priority_of(id, window_stats(*sw, id), now);
  return r;
}

SegmentReport Monitor::segment(uint64_t id) const {
  assert(id < nsegments_);
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now = now_s();
  expire_windows(now);
  return report(id, now);
}

double Monitor::priority(uint64_t id) const {
  assert(id < nsegments_);
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now = now_s();
  expire_windows(now);
  return priority_of(id, window_stats(*find_window(prio_.scoring_window_seconds), id), now);
}

// Segments with accesses in window `w`: its aggregates plus the open bucket.
std::vector<uint64_t> Monitor::candidates(const Window& w) const {
  std::vector<uint64_t> ids;
  ids.reserve(w.agg.size());
  for (const auto& [id, a] : w.agg) ids.push_back(id);
  for_each_touched([&](uint64_t id) {
    if (has_current(id) && w.agg.count(id) == 0) ids.push_back(id);
  });
  return ids;
}

Result<std::vector<SegmentReport>> Monitor::top(size_t n, TopBy by,
                                                uint32_t window_seconds) const {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now = now_s();
  expire_windows(now);
  const Window* w = find_window(window_seconds);
  if (w == nullptr) return Status::invalid("window " + std::to_string(window_seconds) + " s is not configured");
  const Window* sw = find_window(prio_.scoring_window_seconds);
  std::vector<std::pair<double, uint64_t>> keyed;
  for (uint64_t id : candidates(*w)) {
    const WindowStats ws = window_stats(*w, id);
    if (ws.reads + ws.writes == 0) continue;
    double key = 0;
    switch (by) {
      case TopBy::kReads: key = static_cast<double>(ws.reads); break;
      case TopBy::kWrites: key = static_cast<double>(ws.writes); break;
      case TopBy::kPriority: key = priority_of(id, window_stats(*sw, id), now); break;
    }
    keyed.emplace_back(key, id);
  }
  auto better = [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  };
  const size_t k = std::min(n, keyed.size());
  std::partial_sort(keyed.begin(), keyed.begin() + static_cast<ptrdiff_t>(k), keyed.end(), better);
  std::vector<SegmentReport> out;
  for (size_t i = 0; i < k; ++i) out.push_back(report(keyed[i].second, now));
  return out;
}

void Monitor::rescore() {
  std::vector<std::pair<double, uint64_t>> keyed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t now = now_s();
    expire_windows(now);
    const Window* sw = find_window(prio_.scoring_window_seconds);
    for (uint64_t id : candidates(*sw)) {
      keyed.emplace_back(priority_of(id, window_stats(*sw, id), now), id);
    }
  }
  // Sorting may take a while on millions of segments: no lock held.
  std::sort(keyed.begin(), keyed.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  std::vector<uint64_t> ranking;
  ranking.reserve(keyed.size());
  for (const auto& [p, id] : keyed) ranking.push_back(id);
  std::lock_guard<std::mutex> lock(rank_mu_);
  ranking_.swap(ranking);
}

std::vector<uint64_t> Monitor::top_k(size_t k) const {
  std::lock_guard<std::mutex> lock(rank_mu_);
  return std::vector<uint64_t>(ranking_.begin(),
                               ranking_.begin() + static_cast<ptrdiff_t>(std::min(k, ranking_.size())));
}

std::vector<HistoryRecord> Monitor::history() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<HistoryRecord> out;
  out.reserve(history_records_);
  for (const Bucket& b : buckets_) out.insert(out.end(), b.records.begin(), b.records.end());
  for_each_touched([&](uint64_t id) {
    const Agg a = current(id);
    if (a.reads + a.writes == 0) return;
    out.push_back(HistoryRecord{open_bucket_s_, id, static_cast<uint32_t>(a.reads),
                                static_cast<uint32_t>(a.writes), a.bytes_read, a.bytes_written});
  });
  return out;
}

uint64_t Monitor::resident_bytes() const {
  if (cells_ == nullptr) return 0;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> vec(cells_bytes_ / page);
  if (mincore(cells_, cells_bytes_, vec.data()) != 0) return cells_bytes_;
  uint64_t pages = 0;
  for (unsigned char v : vec) pages += v & 1;
  return pages * page + touched_words_ * sizeof(uint64_t);
}

MonitorTotals Monitor::totals() const {
  MonitorTotals t;
  t.segments = nsegments_;
  t.segment_bytes = cfg_.segment_bytes;
  t.dense_bytes_virtual = nsegments_ * sizeof(SegmentCell);
  t.dense_bytes_resident = resident_bytes();
  std::lock_guard<std::mutex> lock(mu_);
  expire_windows(now_s());
  const Window* longest = &windows_.front();
  for (const Window& w : windows_) {
    if (w.seconds > longest->seconds) longest = &w;
  }
  t.segments_active = candidates(*longest).size();
  t.history_records = history_records_;
  t.history_bytes = history_records_ * sizeof(HistoryRecord) + buckets_.size() * sizeof(Bucket);
  t.history_dropped_records = history_dropped_;
  t.windows_truncated = buckets_dropped_ > 0 && !buckets_.empty() &&
                        buckets_.front().start_s > now_s() - static_cast<int64_t>(longest->seconds);
  t.started_s = epoch_s_;
  t.oldest_history_s = buckets_.empty() ? -1 : buckets_.front().start_s;
  return t;
}

PriorityParams Monitor::priority() const {
  std::lock_guard<std::mutex> lock(mu_);
  return prio_;
}

Status Monitor::set_priority(const PriorityParams& p) {
  for (double v : {p.baseline, p.alpha, p.beta, p.gamma}) {
    if (!std::isfinite(v)) return Status::invalid("baseline, alpha, beta, gamma must be finite");
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (find_window(p.scoring_window_seconds) == nullptr) {
    return Status::invalid("scoring window must be one of the configured windows");
  }
  prio_ = p;
  return Status::ok();
}

Status Monitor::set_windows(std::vector<uint32_t> window_seconds) {
  MonitorConfig next = cfg_;
  next.window_seconds = window_seconds;
  Status st = next.validate();
  if (!st) return st;
  std::lock_guard<std::mutex> lock(mu_);
  if (std::find(window_seconds.begin(), window_seconds.end(), prio_.scoring_window_seconds) ==
      window_seconds.end()) {
    return Status::invalid("the windows must include the scoring window (" +
                           std::to_string(prio_.scoring_window_seconds) + " s)");
  }
  std::vector<Window> rebuilt;
  for (uint32_t s : window_seconds) {
    Window w{s, {}, buckets_dropped_};
    for (const Bucket& b : buckets_) {
      for (const HistoryRecord& r : b.records) {
        w.agg[r.segment].add(r);
      }
    }
    rebuilt.push_back(std::move(w));
  }
  windows_.swap(rebuilt);
  cfg_.window_seconds = std::move(window_seconds);
  expire_windows(now_s());
  return Status::ok();
}

void Monitor::restore_history(const std::vector<HistoryRecord>& records) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t limit = buckets_.empty() ? open_bucket_s_ : buckets_.front().start_s;
  std::map<int64_t, std::vector<HistoryRecord>> by_bucket;
  for (const HistoryRecord& r : records) {
    if (r.bucket_start_s < limit && r.segment < nsegments_) by_bucket[r.bucket_start_s].push_back(r);
  }
  if (by_bucket.empty()) return;
  std::deque<Bucket> merged;
  for (auto& [start, recs] : by_bucket) {
    history_records_ += recs.size();
    merged.push_back(Bucket{start, std::move(recs)});
  }
  for (Bucket& b : buckets_) merged.push_back(std::move(b));
  buckets_.swap(merged);
  buckets_dropped_ = 0;
  for (Window& w : windows_) {
    w.agg.clear();
    w.first_bucket = 0;
    for (const Bucket& b : buckets_) {
      for (const HistoryRecord& r : b.records) w.agg[r.segment].add(r);
    }
  }
  while (history_records_ > cfg_.history_max_records && buckets_.size() > 1) drop_oldest_bucket();
  expire_windows(now_s());
}

void Monitor::set_history_sink(HistorySink* sink) {
  std::lock_guard<std::mutex> lock(mu_);
  sink_ = sink;
}

}  // namespace shadowd
