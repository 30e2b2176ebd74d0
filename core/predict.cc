// The ewma and sequential predictors, the ensemble, and the factory (see
// predict.h; Holt-Winters and AR are in predict_models.cc).
#include "core/predict.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <limits>
#include <map>
#include <unordered_map>

namespace shadowd::predict {
namespace {

constexpr double kNs = 1e9;

double seconds(int64_t ns) { return static_cast<double>(ns) / kNs; }

// Keep the `max` best of `v` (by score, then lower id), best first.
void keep_best(std::vector<std::pair<double, uint64_t>>& v, size_t max) {
  auto better = [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  };
  if (v.size() > max) {
    std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(max), v.end(), better);
    v.resize(max);
  }
  std::sort(v.begin(), v.end(), better);
}

// Appends to `out` the `max` best of `v` (best first), each segment once
// with its best score.
void append_best_unique(std::vector<std::pair<double, uint64_t>>& v, size_t max,
                        std::vector<std::pair<double, uint64_t>>& out) {
  std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) {
    return a.second != b.second ? a.second < b.second : a.first > b.first;
  });
  v.erase(std::unique(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.second == b.second; }),
          v.end());
  keep_best(v, max);
  out.insert(out.end(), v.begin(), v.end());
}

// Drop the least recently seen entries of `m` beyond `max`, and those not
// seen since `cutoff_ns`. T has an int64_t `last_ns`.
template <typename Map>
void expire(Map& m, int64_t cutoff_ns, uint64_t max) {
  for (auto it = m.begin(); it != m.end();) {
    it = it->second.last_ns < cutoff_ns ? m.erase(it) : std::next(it);
  }
  if (m.size() <= max) return;
  std::vector<int64_t> times;
  times.reserve(m.size());
  for (const auto& [id, s] : m) times.push_back(s.last_ns);
  const size_t drop = m.size() - max;
  std::nth_element(times.begin(), times.begin() + static_cast<std::ptrdiff_t>(drop - 1), times.end());
  const int64_t limit = times[drop - 1];
  size_t dropped = 0;
  for (auto it = m.begin(); it != m.end() && dropped < drop;) {
    if (it->second.last_ns <= limit) {
      it = m.erase(it);
      ++dropped;
    } else {
      ++it;
    }
  }
}

// ---------------------------------------------------------------------------
// ewma: per segment, write rates decayed with several time constants. The
// forecast rate is the largest of them, so that a burst counts at once and a
// steady writer is remembered for long.

class Ewma final : public Predictor {
 public:
  explicit Ewma(const Params& p) : p_(p), ntau_(std::min<size_t>(p.ewma_tau_s.size(), kMaxTau)) {}
  std::string_view name() const override { return "ewma"; }

  void observe(uint64_t seg, Op op, int64_t t) override {
    State& s = state_[seg];
    if (op == Op::kWrite) {
      const double dt = s.last_write_ns ? seconds(t - s.last_write_ns) : 0;
      for (size_t i = 0; i < ntau_; ++i) {
        const double tau = p_.ewma_tau_s[i];
        s.rate[i] = static_cast<float>(s.rate[i] * std::exp(-dt / tau) + 1.0 / tau);
      }
      s.last_write_ns = t;
    }
    s.last_ns = t;
  }

  void tick(int64_t now) override {
    if (now - last_expire_ns_ < static_cast<int64_t>(10 * kNs) && state_.size() <= p_.max_segments) return;
    last_expire_ns_ = now;
    expire(state_, now - static_cast<int64_t>(p_.memory_seconds) * 1'000'000'000, p_.max_segments);
  }

  double forecast(uint64_t seg, int64_t now, double horizon_s) const override {
    auto f = state_.find(seg);
    if (f == state_.end()) return 0;
    return rate(f->second, now) * horizon_s;
  }

  void nominate(int64_t now, double horizon_s, size_t max, const Skip& skip,
                std::vector<std::pair<double, uint64_t>>& out) const override {
    // Rates move slowly: the ranking is recomputed once a second.
    if (now - ranked_ns_ >= 1'000'000'000 || now < ranked_ns_ || horizon_s != ranked_h_) {
      ranked_.clear();
      for (const auto& [id, s] : state_) {
        const double f = rate(s, now) * horizon_s;
        if (f > 0.01) ranked_.emplace_back(f, id);
      }
      keep_best(ranked_, std::max<size_t>(4 * max, 1024));
      ranked_ns_ = now;
      ranked_h_ = horizon_s;
    }
    size_t n = 0;
    for (const auto& e : ranked_) {
      if (n >= max) break;
      if (skip && skip(e.second)) continue;
      out.push_back(e);
      ++n;
    }
  }

  uint64_t active_segments() const override { return state_.size(); }
  uint64_t memory_bytes() const override {
    // Entry plus the hash table's node and bucket overhead.
    return state_.size() * (sizeof(State) + sizeof(uint64_t) + 3 * sizeof(void*));
  }

 private:
  static constexpr size_t kMaxTau = 4;
  struct State {
    int64_t last_ns = 0;
    int64_t last_write_ns = 0;
    float rate[kMaxTau] = {};
  };
  double rate(const State& s, int64_t now) const {
    if (!s.last_write_ns) return 0;
    const double dt = std::max(0.0, seconds(now - s.last_write_ns));
    double r = 0;
    for (size_t i = 0; i < ntau_; ++i) r = std::max(r, s.rate[i] * std::exp(-dt / p_.ewma_tau_s[i]));
    return r;
  }

  Params p_;
  size_t ntau_;
  std::unordered_map<uint64_t, State> state_;
  int64_t last_expire_ns_ = 0;
  mutable std::vector<std::pair<double, uint64_t>> ranked_;
  mutable int64_t ranked_ns_ = std::numeric_limits<int64_t>::min() / 2;
  mutable double ranked_h_ = 0;
};

// ---------------------------------------------------------------------------
// sequential / spatial: streams that write segment after segment, segments
// read shortly before they are written (read-modify-write), and the
// allocation frontier.
//
// A write to segment s continues a stream whose head is s - 1 (or s) if that
// head was written within seq_gap_s; a live stream nominates s + 1 ..
// s + seq_ahead with a confidence that grows with its length and falls with
// the distance; a stream of two segments or more that went quiet stays
// dormant for seq_dormant_s and nominates the same with a third of it. A
// read nominates its segment with the learned probability that a read is
// followed by a write within the gap. The frontier is one past the highest
// segment ever written (a bitmap of written segments: one bit per segment
// of the device); segments past it are nominated with the learned share of
// first writes that land within frontier_ahead of it. First writes below the
// frontier (into holes: a file system filling free space) go on from where
// earlier ones stopped, skipping what is written: up to kHoleCursors recent
// runs of them each nominate the next kHoleAhead never-written segments
// after their last one (dormant after seq_dormant_s), with the learned share
// of first writes below the frontier that continue a cursor. And the
// kFreshAhead segments just after each of the last kFreshWrites segments
// written are nominated ahead of the other sources while the write is young
// (the weight falls with its age, kFreshTau; none after seq_gap_s): what a
// writer touched a moment ago is the best guess of what it touches next,
// and where a copy survives for less than a second (a pool kept full by the
// journal) nothing else pays. Weighted by the learned share of writes that
// land just after a young one (near none for random writes); their
// forecast is at most one write.

class Sequential final : public Predictor {
 public:
  explicit Sequential(const Params& p)
      : p_(p),
        gap_ns_(static_cast<int64_t>(p.seq_gap_s * kNs)),
        dormant_ns_(static_cast<int64_t>(std::max(p.seq_gap_s, p.seq_dormant_s) * kNs)) {}
  std::string_view name() const override { return "sequential"; }

  void observe(uint64_t seg, Op op, int64_t t) override {
    now_ = t;
    if (op == Op::kRead) {
      reads_[seg].last_ns = t;
      ++reads_seen_;
      return;
    }
    // Read-then-write statistics.
    if (auto r = reads_.find(seg); r != reads_.end()) {
      if (t - r->second.last_ns <= gap_ns_) ++reads_written_;
      reads_.erase(r);
    }
    // First writes: how many land just past the frontier.
    if (!written(seg)) {
      ++first_writes_;
      if (seg >= frontier_ && seg < frontier_ + p_.frontier_ahead) ++frontier_hits_;
      if (seg < frontier_) hole_first_write(seg, t);
      mark_written(seg);
      ++written_version_;
      frontier_ = std::max(frontier_, seg + 1);
      if (first_writes_ > 8192) {
        first_writes_ /= 2;
        frontier_hits_ /= 2;
      }
      if (hole_writes_ > 8192) {
        hole_writes_ /= 2;
        hole_hits_ /= 2;
      }
    }
    // How often a write lands just after a young one: the weight of the
    // fresh nominations (near none for random writes).
    ++fresh_writes_;
    for (const Fresh& w : fresh_) {
      if (w.t != kEmpty && t - w.t <= gap_ns_ && w.seg < seg && seg - w.seg <= kFreshAhead) {
        ++fresh_hits_;
        break;
      }
    }
    if (fresh_writes_ > 8192) {
      fresh_writes_ /= 2;
      fresh_hits_ /= 2;
    }
    newest_write_ns_ = t;
    // The ring of fresh writes: a segment written again and again (a log's
    // head) takes one slot.
    if (Fresh& last = fresh_[(fresh_next_ + fresh_.size() - 1) % fresh_.size()]; fresh_next_ > 0 && last.seg == seg) {
      last.t = t;
    } else {
      fresh_[fresh_next_++ % fresh_.size()] = Fresh{seg, t};
    }
    // Continue a stream whose head is seg - 1 or seg, or start one.
    auto it = streams_.find(seg);
    if (it == streams_.end() && seg > 0) it = streams_.find(seg - 1);
    if (it != streams_.end() && t - it->second.last_ns <= gap_ns_) {
      Stream s = it->second;
      streams_.erase(it);
      if (s.head != seg) ++s.length;
      s.moved_to(seg);
      s.last_ns = t;
      streams_[seg] = s;
    } else if (it != streams_.end() && it->second.length >= 2 && it->second.head + 1 == seg) {
      // A dormant stream taken up again.
      Stream s = it->second;
      streams_.erase(it);
      ++s.length;
      s.moved_to(seg);
      s.last_ns = t;
      streams_[seg] = s;
    } else {
      if (it != streams_.end() && it->second.head == seg) streams_.erase(it);
      streams_[seg] = Stream{seg, 1, t};
    }
  }

  void tick(int64_t now) override {
    now_ = std::max(now_, now);
    if (now - last_expire_ns_ < static_cast<int64_t>(kNs) && streams_.size() <= p_.seq_max_streams) return;
    last_expire_ns_ = now;
    // Single writes are not streams once the gap has passed; streams go
    // after their dormant time, and the oldest first beyond the bound.
    const int64_t single_ns = std::min<int64_t>(gap_ns_, 1'000'000'000);
    for (auto i = streams_.begin(); i != streams_.end();) {
      const int64_t age = now - i->second.last_ns;
      i = (age > dormant_ns_ || (i->second.length < 2 && age > single_ns)) ? streams_.erase(i) : std::next(i);
    }
    // Beyond the bound, single writes go before streams.
    if (streams_.size() > p_.seq_max_streams) {
      std::vector<std::pair<int64_t, uint64_t>> singles;
      for (const auto& [h, st] : streams_) {
        if (st.length < 2) singles.emplace_back(st.last_ns, h);
      }
      std::sort(singles.begin(), singles.end());
      for (size_t i = 0; i < singles.size() && streams_.size() > p_.seq_max_streams; ++i) streams_.erase(singles[i].second);
    }
    expire(streams_, now - dormant_ns_, p_.seq_max_streams);
    expire(reads_, now - gap_ns_, p_.max_segments);
    // Forget old evidence slowly, so the read-then-write ratio follows the workload.
    if (reads_seen_ > 100000) {
      reads_seen_ /= 2;
      reads_written_ /= 2;
    }
  }

  double forecast(uint64_t seg, int64_t now, double horizon_s) const override {
    return score(seg, now, horizon_s, false);
  }
  double rank(uint64_t seg, int64_t now, double horizon_s) const override { return score(seg, now, horizon_s, true); }
  // forecast() and rank(): they differ for a young write's neighbours only.
  double score(uint64_t seg, int64_t now, double horizon_s, bool as_rank) const {
    double f = 0;
    // The streams whose next segments include seg (heads in order).
    for (auto it = streams_.lower_bound(seg - std::min<uint64_t>(seg, p_.seq_ahead));
         it != streams_.end() && it->first < seg; ++it) {
      f = std::max(f, stream_score(it->second, static_cast<uint32_t>(seg - it->first), now, horizon_s));
    }
    if (auto r = reads_.find(seg); r != reads_.end() && now - r->second.last_ns <= gap_ns_) {
      f = std::max(f, read_write_ratio());
    }
    if (seg >= frontier_ && seg < frontier_ + p_.frontier_ahead) f = std::max(f, frontier_score(seg - frontier_));
    // A fresh write's neighbours: at most one write expected, but ranked
    // as nominated (above the other sources while young).
    if (now - newest_write_ns_ <= gap_ns_) {
      for (const Fresh& w : fresh_) {
        if (w.t != kEmpty && now - w.t <= gap_ns_ && w.seg < seg && seg - w.seg <= kFreshAhead) {
          const double r = fresh_score(w, static_cast<uint32_t>(seg - w.seg), now);
          f = std::max(f, as_rank ? r : std::min(1.0, r));
        }
      }
    }
    if (seg < frontier_) {
      const auto& ht = hole_targets();
      for (auto it = std::lower_bound(ht.begin(), ht.end(), HoleTarget{seg, 0, 0});
           it != ht.end() && it->seg == seg; ++it) {
        f = std::max(f, hole_score(cursors_[it->cursor], it->rank, now));
      }
    }
    return f;
  }

  void nominate(int64_t now, double horizon_s, size_t max, const Skip& skip,
                std::vector<std::pair<double, uint64_t>>& out) const override {
    std::vector<std::pair<double, uint64_t>> v;
    // Live streams, and the longest dormant ones (a few big sequential jobs
    // matter; the many short runs of a checkpoint do not).
    std::vector<const Stream*> dormant;
    for (const auto& [head, s] : streams_) {
      if (s.length >= 2 && now - s.last_ns > gap_ns_) dormant.push_back(&s);
    }
    if (dormant.size() > kDormantOffered) {
      std::nth_element(dormant.begin(), dormant.begin() + kDormantOffered, dormant.end(),
                       [](const Stream* a, const Stream* b) { return a->length > b->length; });
      dormant.resize(kDormantOffered);
    }
    std::sort(dormant.begin(), dormant.end());
    const size_t per_stream = std::min<size_t>(max, kOfferedPerStream);
    for (const auto& [head, s] : streams_) {
      if (s.length >= 2 && now - s.last_ns > gap_ns_ && !std::binary_search(dormant.begin(), dormant.end(), &s)) continue;
      // Each stream offers its first segments not covered yet. Where
      // the covered ones end is remembered for kRescanNs, so a stream
      // running through covered ground costs one look a round.
      if (now - s.scan_ns > kRescanNs) {
        s.scan_from = 1;
        s.scan_ns = now;
      }
      size_t n = 0;
      bool gapless = true;
      for (uint32_t d = s.scan_from; d <= p_.seq_ahead && n < per_stream; ++d) {
        const double f = stream_score(s, d, now, horizon_s);
        if (f <= 0) break;
        if (skip && skip(head + d)) {
          if (gapless) s.scan_from = d + 1;
          continue;
        }
        gapless = false;
        v.emplace_back(f, head + d);
        ++n;
      }
    }
    for (const Fresh& w : fresh_) {
      if (w.t == kEmpty || now - w.t > gap_ns_) continue;
      for (uint32_t d = 1; d <= kFreshAhead; ++d) {
        const double f = fresh_score(w, d, now);
        if (f <= 0.01) break;
        if (!(skip && skip(w.seg + d))) v.emplace_back(f, w.seg + d);
      }
    }
    const double rw = read_write_ratio();
    if (rw > 0.01) {
      for (const auto& [id, r] : reads_) {
        if (now - r.last_ns <= gap_ns_ && !(skip && skip(id))) v.emplace_back(rw, id);
      }
    }
    for (const HoleTarget& h : hole_targets()) {
      const double f = hole_score(cursors_[h.cursor], h.rank, now);
      if (f > 0 && !(skip && skip(h.seg))) v.emplace_back(f, h.seg);
    }
    if (frontier_ > 0 && frontier_score(0) > 0.01) {
      if (frontier_ != frontier_scan_base_ || now - frontier_scan_ns_ > kRescanNs) {
        frontier_scan_base_ = frontier_;
        frontier_scan_from_ = 0;
        frontier_scan_ns_ = now;
      }
      size_t n = 0;
      bool gapless = true;
      for (uint32_t d = frontier_scan_from_; d < p_.frontier_ahead && n < max; ++d) {
        if (skip && skip(frontier_ + d)) {
          if (gapless) frontier_scan_from_ = d + 1;
          continue;
        }
        gapless = false;
        v.emplace_back(frontier_score(d), frontier_ + d);
        ++n;
      }
    }
    // The same segment may come from two sources: keep its best score.
    append_best_unique(v, max, out);
  }

  void set_params(const Params& p) override {
    p_.seq_ahead = p.seq_ahead;
    p_.frontier_ahead = p.frontier_ahead;
  }
  uint64_t active_segments() const override { return streams_.size() + reads_.size() + cursors_.size(); }
  uint64_t memory_bytes() const override {
    return streams_.size() * (sizeof(Stream) + sizeof(uint64_t) + 3 * sizeof(void*)) +
           reads_.size() * (sizeof(Read) + sizeof(uint64_t) + 3 * sizeof(void*)) +
           written_.capacity() * sizeof(uint64_t) + cursors_.capacity() * sizeof(Cursor) +
           hole_targets_.capacity() * sizeof(HoleTarget) + sizeof(fresh_);
  }

 private:
  // How long nominate() trusts its memo of covered ground.
  static constexpr int64_t kRescanNs = 10'000'000'000;
  static constexpr size_t kDormantOffered = 16;
  static constexpr size_t kOfferedPerStream = 64;
  static constexpr size_t kFreshWrites = 64;
  static constexpr uint32_t kFreshAhead = 8;
  static constexpr double kFreshTau = 0.2;  // seconds
  // The rank of a young write's neighbours among nominations: above the
  // other sources (their scores are at most 1) for the first second or two;
  // on pgbench-15min at 10 % capacity, 3 and 10 avoided fewer stalls.
  static constexpr double kFreshWeight = 30;
  static constexpr int64_t kEmpty = std::numeric_limits<int64_t>::min();
  struct Fresh {
    uint64_t seg = 0;
    int64_t t = kEmpty;
  };
  static constexpr size_t kHoleCursors = 8;
  static constexpr uint32_t kHoleAhead = 16;
  // Below a live stream's confidence: where the next run of first writes
  // starts is a guess (on pgbench-15min, 1.0 took copy slots from streams
  // at 10 % capacity; 0.5 lost most of the gain at 100 % and 300 %).
  static constexpr double kHoleConfidence = 0.7;
  // A hole cursor looks this far (segments) for its next never-written ones.
  static constexpr uint64_t kHoleReach = 4096;
  struct Cursor {
    uint64_t pos;     // its last first write
    int64_t last_ns;
  };
  struct HoleTarget {
    uint64_t seg;
    uint32_t cursor;  // index in cursors_
    uint32_t rank;    // 0 for the cursor's first never-written segment
    bool operator<(const HoleTarget& o) const { return seg != o.seg ? seg < o.seg : cursor < o.cursor; }
  };
  struct Stream {
    uint64_t head;
    uint32_t length;  // segments written in order
    int64_t last_ns;
    // nominate()'s memo: the segments head + 1 .. head + scan_from - 1 were
    // covered when it looked at scan_ns.
    mutable uint32_t scan_from = 1;
    mutable int64_t scan_ns = 0;
    // The head moves on (to seg >= head): the memo stays about the same
    // segments.
    void moved_to(uint64_t seg) {
      const uint64_t step = seg - head;
      scan_from = step < scan_from ? static_cast<uint32_t>(scan_from - step) : 1;
      head = seg;
    }
  };
  struct Read {
    int64_t last_ns = 0;
  };
  double stream_score(const Stream& s, uint32_t d, int64_t now, double horizon_s) const {
    (void)horizon_s;
    const int64_t age = now - s.last_ns;
    double conf;
    if (age <= gap_ns_) {
      conf = 1.0 - 0.5 / s.length;  // 0.5 for a single write, towards 1 as it grows
    } else if (s.length >= 2 && age <= dormant_ns_) {
      conf = 0.3 * (1.0 - 1.0 / s.length);
    } else {
      return 0;
    }
    return conf / (1.0 + (d - 1) / 16.0);
  }
  // A first write into a hole moves the cursor it continues (the one
  // nearest below whose next never-written segments include it), or starts
  // one in place of the least recently moved.
  void hole_first_write(uint64_t seg, int64_t t) {
    ++hole_writes_;
    int best = -1;
    for (const HoleTarget& h : hole_targets()) {
      if (h.seg == seg && (best < 0 || cursors_[h.cursor].pos > cursors_[static_cast<size_t>(best)].pos)) {
        best = static_cast<int>(h.cursor);
      }
    }
    if (best >= 0) {
      ++hole_hits_;
      cursors_[static_cast<size_t>(best)] = Cursor{seg, t};
    } else if (cursors_.size() < kHoleCursors) {
      cursors_.push_back(Cursor{seg, t});
    } else {
      *std::min_element(cursors_.begin(), cursors_.end(),
                        [](const Cursor& a, const Cursor& b) { return a.last_ns < b.last_ns; }) = Cursor{seg, t};
    }
    ++written_version_;
  }
  // Each cursor's next kHoleAhead never-written segments below the frontier,
  // sorted by segment; recomputed when a first write changed them.
  const std::vector<HoleTarget>& hole_targets() const {
    if (targets_version_ == written_version_) return hole_targets_;
    targets_version_ = written_version_;
    hole_targets_.clear();
    for (uint32_t i = 0; i < cursors_.size(); ++i) {
      uint32_t rank = 0;
      const uint64_t end = std::min(frontier_, cursors_[i].pos + 1 + kHoleReach);
      for (uint64_t x = next_unwritten(cursors_[i].pos + 1, end); x < end && rank < kHoleAhead;
           x = next_unwritten(x + 1, end)) {
        hole_targets_.push_back(HoleTarget{x, i, rank++});
      }
    }
    std::sort(hole_targets_.begin(), hole_targets_.end());
    return hole_targets_;
  }
  // The first never-written segment in [from, end), or end.
  uint64_t next_unwritten(uint64_t from, uint64_t end) const {
    while (from < end) {
      const uint64_t w = from / 64;
      if (w >= written_.size()) return from;
      const uint64_t free = ~written_[w] & (~uint64_t{0} << (from % 64));
      if (free) return std::min(end, w * 64 + static_cast<uint64_t>(std::countr_zero(free)));
      from = (w + 1) * 64;
    }
    return end;
  }
  double hole_score(const Cursor& c, uint32_t rank, int64_t now) const {
    if (hole_writes_ < 16 || now - c.last_ns > dormant_ns_) return 0;
    const double share = static_cast<double>(hole_hits_) / static_cast<double>(hole_writes_);
    return kHoleConfidence * share / (1.0 + rank / 16.0);
  }
  double fresh_score(const Fresh& w, uint32_t d, int64_t now) const {
    if (fresh_writes_ < 64) return 0;
    const double share = static_cast<double>(fresh_hits_) / static_cast<double>(fresh_writes_);
    const double age = seconds(std::max<int64_t>(0, now - w.t));
    return kFreshWeight * share * kFreshTau / (kFreshTau + age) / (1.0 + (d - 1) / 4.0);
  }
  double frontier_score(uint64_t d) const {
    if (first_writes_ < 16) return 0;
    const double share = static_cast<double>(frontier_hits_) / static_cast<double>(first_writes_);
    return share / (1.0 + static_cast<double>(d) / 256.0);
  }
  double read_write_ratio() const {
    return reads_seen_ < 64 ? 0 : static_cast<double>(reads_written_) / static_cast<double>(reads_seen_);
  }
  bool written(uint64_t seg) const {
    return seg / 64 < written_.size() && (written_[seg / 64] >> (seg % 64)) & 1;
  }
  void mark_written(uint64_t seg) {
    if (seg / 64 >= written_.size()) written_.resize(seg / 64 + 1 + written_.size() / 2, 0);
    written_[seg / 64] |= uint64_t{1} << (seg % 64);
  }

  Params p_;
  int64_t gap_ns_;
  int64_t dormant_ns_;
  int64_t now_ = 0;
  int64_t last_expire_ns_ = 0;
  std::map<uint64_t, Stream> streams_;  // by head segment, in order
  std::unordered_map<uint64_t, Read> reads_;
  uint64_t reads_seen_ = 0, reads_written_ = 0;
  std::vector<uint64_t> written_;  // one bit per segment ever written
  uint64_t frontier_ = 0;
  uint64_t first_writes_ = 0, frontier_hits_ = 0;
  uint64_t hole_writes_ = 0;        // first writes below the frontier
  uint64_t hole_hits_ = 0;          // those that continued a hole cursor
  std::vector<Cursor> cursors_;
  std::array<Fresh, kFreshWrites> fresh_{};  // the last segments written
  size_t fresh_next_ = 0;
  int64_t newest_write_ns_ = kEmpty;
  uint64_t fresh_writes_ = 0, fresh_hits_ = 0;
  uint64_t written_version_ = 0;    // bumped by every first write
  mutable uint64_t targets_version_ = ~uint64_t{0};
  mutable std::vector<HoleTarget> hole_targets_;
  mutable uint64_t frontier_scan_base_ = 0;
  mutable uint32_t frontier_scan_from_ = 0;
  mutable int64_t frontier_scan_ns_ = 0;
};

// ---------------------------------------------------------------------------

// The larger forecast of its parts; nominations come from the first
// `nominators` parts only (the others rank what is kept).
class Ensemble final : public Predictor {
 public:
  Ensemble(std::vector<std::unique_ptr<Predictor>> parts, size_t nominators)
      : parts_(std::move(parts)), nominators_(std::min(nominators, parts_.size())) {}
  std::string_view name() const override { return "auto"; }
  void observe(uint64_t seg, Op op, int64_t t) override {
    for (auto& p : parts_) p->observe(seg, op, t);
  }
  void tick(int64_t now) override {
    for (auto& p : parts_) p->tick(now);
  }
  double forecast(uint64_t seg, int64_t now, double horizon_s) const override {
    double f = 0;
    for (const auto& p : parts_) f = std::max(f, p->forecast(seg, now, horizon_s));
    return f;
  }
  double rank(uint64_t seg, int64_t now, double horizon_s) const override {
    double f = 0;
    for (const auto& p : parts_) f = std::max(f, p->rank(seg, now, horizon_s));
    return f;
  }
  void nominate(int64_t now, double horizon_s, size_t max, const Skip& skip,
                std::vector<std::pair<double, uint64_t>>& out) const override {
    std::vector<std::pair<double, uint64_t>> v;
    for (size_t i = 0; i < nominators_; ++i) parts_[i]->nominate(now, horizon_s, max, skip, v);
    append_best_unique(v, max, out);
  }
  uint64_t active_segments() const override {
    uint64_t n = 0;
    for (const auto& p : parts_) n = std::max(n, p->active_segments());
    return n;
  }
  uint64_t memory_bytes() const override {
    uint64_t n = 0;
    for (const auto& p : parts_) n += p->memory_bytes();
    return n;
  }
  void set_params(const Params& p) override {
    for (auto& part : parts_) part->set_params(p);
  }
  std::vector<const Predictor*> parts() const override {
    std::vector<const Predictor*> v;
    for (const auto& p : parts_) v.push_back(p.get());
    return v;
  }

 private:
  std::vector<std::unique_ptr<Predictor>> parts_;
  size_t nominators_;
};

}  // namespace

std::unique_ptr<Predictor> make_ewma(const Params& p) { return std::make_unique<Ewma>(p); }
std::unique_ptr<Predictor> make_sequential(const Params& p) { return std::make_unique<Sequential>(p); }
std::unique_ptr<Predictor> make_ensemble(std::vector<std::unique_ptr<Predictor>> parts, size_t nominators) {
  return std::make_unique<Ensemble>(std::move(parts), nominators);
}

Result<std::unique_ptr<Predictor>> make(std::string_view name, const Params& p) {
  if (name == "ewma") return make_ewma(p);
  if (name == "holt-winters") return make_holt_winters(p);
  if (name == "arima") return make_arima(p);
  if (name == "sequential") return make_sequential(p);
  if (name == "auto") {
    std::vector<std::unique_ptr<Predictor>> parts;
    parts.push_back(make_sequential(p));
    parts.push_back(make_ewma(p));
    // Copies ahead come from the sequential model: on the traces we have,
    // copies of what ewma ranks high (segments written recently) are evicted
    // again before their next write; its rates order what is kept.
    return make_ensemble(std::move(parts), 1);
  }
  return Status::invalid("unknown predictor '" + std::string(name) +
                         "' (ewma, holt-winters, arima, sequential, auto)");
}

}  // namespace shadowd::predict
