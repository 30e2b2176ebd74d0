// Holt-Winters and autoregressive predictors (see predict.h).
#include "core/predict.h"

#include <Eigen/Dense>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <unordered_map>

namespace shadowd::predict {
namespace {

constexpr int64_t kNsPerS = 1'000'000'000;
constexpr double kNominateMin = 0.05;
constexpr double kMinAcf = 0.3;
// A forecast over more buckets than this extrapolates from the first ones:
// nominate() runs every tick over all active segments and must not cost
// O(active * horizon) for a long horizon.
constexpr int64_t kMaxForecastSteps = 2048;

int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

// Autocorrelation at `lag` of x with mean m, normalised by `ss` (the sum of
// squared deviations): the usual biased estimator.
double acf_at(const std::vector<double>& x, double m, double ss, size_t lag) {
  double s = 0;
  for (size_t t = lag; t < x.size(); ++t) s += (x[t] - m) * (x[t - lag] - m);
  return s / ss;
}

// Normal equations of a pooled AR(p) regression with intercept. The model
// accumulates straight from its per-segment rings, without copying them out.
class ArAccumulator {
 public:
  explicit ArAccumulator(uint32_t p)
      : p_(p), xtx_(Eigen::MatrixXd::Zero(p + 1, p + 1)),
        xty_(Eigen::VectorXd::Zero(p + 1)), x_(p + 1) {
    x_[0] = 1;
  }

  // `at(i)` is y[i] of a series of `n` values; adds the rows t = p..n-1.
  template <typename At>
  void add_series(size_t n, const At& at) {
    for (size_t t = p_; t < n; ++t) {
      for (uint32_t j = 1; j <= p_; ++j) x_[j] = at(t - j);
      xtx_.selfadjointView<Eigen::Lower>().rankUpdate(x_);
      xty_.noalias() += at(t) * x_;
      ++rows_;
    }
  }

  std::vector<double> solve() const {
    if (rows_ < p_ + 2) return {};
    Eigen::MatrixXd a = xtx_.selfadjointView<Eigen::Lower>();
    // A tiny ridge keeps collinear lags (a constant series) solvable; it
    // then picks the minimum-norm coefficients.
    const double ridge = 1e-9 * std::max(1.0, a.trace() / static_cast<double>(p_ + 1));
    a.diagonal().array() += ridge;
    const Eigen::LDLT<Eigen::MatrixXd> ldlt(a);
    if (ldlt.info() != Eigen::Success) return {};
    const Eigen::VectorXd b = ldlt.solve(xty_);
    if (!b.allFinite()) return {};
    return std::vector<double>(b.data(), b.data() + b.size());
  }

 private:
  uint32_t p_;
  uint64_t rows_ = 0;
  Eigen::MatrixXd xtx_;  // lower triangle only
  Eigen::VectorXd xty_;
  Eigen::VectorXd x_;
};

// The buckets of a forecast window (now, now + horizon]: `n` buckets from
// `first`, the first and last possibly partial.
struct Span {
  int64_t first = 0;
  int64_t n = 0;
  double w_first = 0, w_last = 0;
  double scale = 1;  // > 1 when the window was cut at kMaxForecastSteps
  double w(int64_t i) const { return i == 0 ? w_first : (i == n - 1 ? w_last : 1.0); }
};

// Per-segment bookkeeping shared by the models: writes are counted in the
// open bucket; the buckets before it are folded into the model state.
template <typename State>
struct Entry {
  int64_t open_bucket = 0;
  int64_t last_ns = 0;
  float open_count = 0;
  State st;
};

// Rough heap cost of one node of an unordered_map holding `Value`:
// next pointer, value, allocator header, 16-byte rounding.
template <typename Value>
constexpr uint64_t node_bytes() {
  return (sizeof(void*) + sizeof(Value) + 8 + 15) / 16 * 16;
}

// Bucketing, expiry, LRU bound, forecast windows and nomination; `Derived`
// supplies the model (CRTP, so the per-bucket calls are not virtual).
template <typename Derived, typename State>
class BucketModel : public Predictor {
 public:
  using E = Entry<State>;

  explicit BucketModel(const Params& p)
      : p_(p),
        bucket_ns_(static_cast<int64_t>(std::max<uint32_t>(1, p.bucket_seconds)) * kNsPerS),
        memory_ns_(static_cast<int64_t>(p.memory_seconds) * kNsPerS),
        max_segments_(std::max<uint64_t>(1, p.max_segments)) {}

  void observe(uint64_t segment, Op op, int64_t t_ns) override {
    advance(t_ns);
    if (op == Op::kWrite) global_count_ += 1;
    auto it = segs_.find(segment);
    if (it == segs_.end()) {
      if (segs_.size() >= max_segments_) evict_lru();
      it = segs_.try_emplace(segment).first;
      it->second.open_bucket = global_bucket_;
      fresh_.push_back(segment);
    } else {
      catch_up(it->second, global_bucket_);
    }
    E& e = it->second;
    e.last_ns = std::max(e.last_ns, t_ns);
    if (op == Op::kWrite) e.open_count += 1;
  }

  void tick(int64_t now_ns) override { advance(now_ns); }

  double forecast(uint64_t segment, int64_t now_ns, double horizon_s) const override {
    const auto it = segs_.find(segment);
    if (it == segs_.end()) return 0;
    Span s;
    if (!span(now_ns, horizon_s, s)) return 0;
    return forecast_entry(it->second, s);
  }

  void nominate(int64_t now_ns, double horizon_s, size_t max, const Skip& skip,
                std::vector<std::pair<double, uint64_t>>& result) const override {
    std::vector<std::pair<double, uint64_t>> out;
    Span s;
    if (max == 0 || !span(now_ns, horizon_s, s)) return;
    if (started_ && s.first == global_bucket_ && s.n <= kCacheSteps && s.scale == 1) {
      nominate_cached(s, out);
    } else {
      for (const auto& [seg, e] : segs_) {
        const double f = forecast_entry(e, s);
        if (f > kNominateMin) out.emplace_back(f, seg);
      }
    }
    if (skip) std::erase_if(out, [&](const auto& v) { return skip(v.second); });
    const auto better = std::greater<std::pair<double, uint64_t>>();
    if (out.size() > max) {
      std::nth_element(out.begin(), out.begin() + static_cast<ptrdiff_t>(max), out.end(), better);
      out.resize(max);
    }
    std::sort(out.begin(), out.end(), better);
    result.insert(result.end(), out.begin(), out.end());
  }

  uint64_t active_segments() const override { return segs_.size(); }

  uint64_t memory_bytes() const override {
    uint64_t b = sizeof(Derived) + segs_.bucket_count() * sizeof(void*) +
                 segs_.size() * node_bytes<std::pair<const uint64_t, E>>() +
                 fresh_.capacity() * sizeof(uint64_t) + cache_seg_.capacity() * sizeof(uint64_t) +
                 cache_v_.capacity() * sizeof(float);
    for (const auto& kv : segs_) b += self().state_heap_bytes(kv.second.st);
    return b + self().model_heap_bytes();
  }

 protected:
  const Params& params() const { return p_; }
  const std::unordered_map<uint64_t, E>& segments() const { return segs_; }

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }
  Derived& self() { return static_cast<Derived&>(*this); }

  int64_t bucket_of(int64_t t_ns) const { return floor_div(t_ns, bucket_ns_); }

  bool span(int64_t now_ns, double horizon_s, Span& s) const {
    if (!(horizon_s > 0)) return false;
    const int64_t h_ns = std::max<int64_t>(1, std::llround(std::min(horizon_s, 1e9) * kNsPerS));
    const int64_t end = now_ns + h_ns;
    const double b = static_cast<double>(bucket_ns_);
    s.first = bucket_of(now_ns);
    const int64_t last = bucket_of(end - 1);
    const int64_t total = last - s.first + 1;
    s.w_first = static_cast<double>(std::min(end, (s.first + 1) * bucket_ns_) - now_ns) / b;
    s.w_last = static_cast<double>(end - last * bucket_ns_) / b;
    if (total == 1) s.w_last = s.w_first;
    s.n = std::min(total, kMaxForecastSteps);
    s.scale = 1;
    if (s.n < total) {
      const double covered = s.w_first + static_cast<double>(s.n - 1);
      s.w_last = 1;
      s.scale = static_cast<double>(h_ns) / b / covered;
    }
    return true;
  }

  double forecast_entry(const E& e, const Span& s) const {
    // Step k is bucket open_bucket - 1 + k, the open bucket being step 1.
    const int64_t k0 = std::max<int64_t>(1, s.first - e.open_bucket + 1);
    double sum = 0;
    self().steps(e, k0, s.n, [&](int64_t i, double v) { sum += s.w(i) * v; });
    return sum * s.scale;
  }

  // Between two bucket closes the state of every segment that has closed a
  // bucket is fixed, so its next few per-bucket forecasts are computed once
  // into a dense array; nominate() (each tick) then only weighs them. The
  // segments created since the last close are evaluated directly.
  void nominate_cached(const Span& s, std::vector<std::pair<double, uint64_t>>& out) const {
    if (!cache_valid_ || cache_bucket_ != global_bucket_) {
      cache_seg_.clear();
      cache_v_.clear();
      for (const auto& [seg, e] : segs_) {
        if (!self().ready(e.st) || e.open_bucket != global_bucket_) continue;
        cache_seg_.push_back(seg);
        const size_t at = cache_v_.size();
        cache_v_.resize(at + kCacheSteps);
        self().steps(e, 1, kCacheSteps,
                     [&](int64_t i, double v) { cache_v_[at + static_cast<size_t>(i)] = static_cast<float>(v); });
      }
      cache_bucket_ = global_bucket_;
      cache_valid_ = true;
    }
    for (size_t j = 0; j < cache_seg_.size(); ++j) {
      const float* v = &cache_v_[j * kCacheSteps];
      double f = 0;
      for (int64_t i = 0; i < s.n; ++i) f += s.w(i) * v[i];
      if (f > kNominateMin) out.emplace_back(f, cache_seg_[j]);
    }
    for (uint64_t seg : fresh_) {
      const auto it = segs_.find(seg);
      if (it == segs_.end()) continue;
      const double f = forecast_entry(it->second, s);
      if (f > kNominateMin) out.emplace_back(f, seg);
    }
  }

  // Closes the global buckets before now's (and, once per bucket, every
  // segment's), expires idle segments, then lets the model refit.
  void advance(int64_t now_ns) {
    const int64_t b = bucket_of(now_ns);
    if (!started_) {
      started_ = true;
      global_bucket_ = b;
      return;
    }
    if (b <= global_bucket_) return;
    const int64_t closed = b - global_bucket_;
    self().on_aggregate(global_count_, closed - 1);
    global_count_ = 0;
    global_bucket_ = b;
    fresh_.clear();
    cache_valid_ = false;
    for (auto it = segs_.begin(); it != segs_.end();) {
      if (now_ns - it->second.last_ns > memory_ns_) {
        it = segs_.erase(it);
      } else {
        catch_up(it->second, b);
        ++it;
      }
    }
    self().after_advance(closed);
  }

  void catch_up(E& e, int64_t b) {
    if (e.open_bucket >= b) return;
    self().close_bucket(e.st, e.open_bucket, e.open_count);
    // Empty buckets in between: beyond the model's cap the oldest are skipped
    // (their effect is forgotten anyway), so a long gap costs O(cap).
    const int64_t gap = std::min(b - e.open_bucket - 1, self().max_catch_up());
    for (int64_t k = b - gap; k < b; ++k) self().close_bucket(e.st, k, 0.0);
    e.open_bucket = b;
    e.open_count = 0;
  }

  // Drops the least recently used 1/16 of the segments at once, so the
  // O(active) selection is amortised over many insertions.
  void evict_lru() {
    const size_t drop = std::max<size_t>(1, segs_.size() / 16);
    std::vector<std::pair<int64_t, uint64_t>> by_age;
    by_age.reserve(segs_.size());
    for (const auto& [seg, e] : segs_) by_age.emplace_back(e.last_ns, seg);
    std::nth_element(by_age.begin(), by_age.begin() + static_cast<ptrdiff_t>(drop - 1), by_age.end());
    for (size_t i = 0; i < drop; ++i) segs_.erase(by_age[i].second);
    cache_valid_ = false;
    // A segment evicted and created again must not be listed twice.
    std::erase_if(fresh_, [this](uint64_t seg) { return !segs_.contains(seg); });
  }

  Params p_;
  int64_t bucket_ns_;
  int64_t memory_ns_;
  uint64_t max_segments_;
  bool started_ = false;
  int64_t global_bucket_ = 0;
  double global_count_ = 0;  // writes, all segments, in the open global bucket
  std::unordered_map<uint64_t, E> segs_;
  std::vector<uint64_t> fresh_;  // created since the last bucket close
  // nominate()'s cache: for each segment, forecasts of the next buckets.
  static constexpr int64_t kCacheSteps = 8;
  mutable bool cache_valid_ = false;
  mutable int64_t cache_bucket_ = 0;
  mutable std::vector<uint64_t> cache_seg_;
  mutable std::vector<float> cache_v_;
};

// ---------------------------------------------------------------- Holt-Winters

struct HwState {
  float level = 0, trend = 0;
  uint32_t period = 0;  // the global period `season` was learnt for
  bool init = false;
  std::vector<float> season;
};

class HoltWinters : public BucketModel<HoltWinters, HwState> {
 public:
  explicit HoltWinters(const Params& p) : BucketModel(p) {
    const uint32_t bs = std::max<uint32_t>(1, p.bucket_seconds);
    if (p.hw_period_seconds != 0) {
      period_ = std::max<uint32_t>(1, (p.hw_period_seconds + bs / 2) / bs);
    } else {
      for (uint32_t s : {604800u, 86400u, 3600u, 1800u, 600u, 300u}) {
        if (s % bs == 0 && s / bs >= 2) candidates_.push_back(s / bs);
      }
      const uint64_t two_weeks = (2 * 604800ull + 86400) / bs + 1;
      agg_.assign(static_cast<size_t>(std::min<uint64_t>(two_weeks, kAggMaxBuckets)), 0.0);
    }
    slots_ = std::max<uint32_t>(1, std::min(period_ == 0 ? 1 : period_, p.hw_season_slots));
  }

  std::string_view name() const override { return "holt-winters"; }

  void close_bucket(HwState& s, int64_t bucket, double y) {
    const Params& p = params();
    if (!s.init) {
      s.init = true;
      s.level = static_cast<float>(y);
      s.trend = 0;
      return;
    }
    float* slot = nullptr;
    if (period_ != 0 && p.hw_season_slots != 0) {
      if (s.period != period_) {
        s.season.assign(slots_, 0.0f);
        s.period = period_;
      }
      slot = &s.season[slot_of(bucket)];
    }
    const double sea = slot != nullptr ? *slot : 0.0;
    const double level = p.hw_alpha * (y - sea) + (1 - p.hw_alpha) * (s.level + s.trend);
    s.trend = static_cast<float>(p.hw_beta * (level - s.level) + (1 - p.hw_beta) * s.trend);
    s.level = static_cast<float>(level);
    if (slot != nullptr) *slot = static_cast<float>(p.hw_gamma * (y - level) + (1 - p.hw_gamma) * sea);
  }

  bool ready(const HwState& s) const { return s.init; }

  // Calls f(i, expected writes in bucket step k0 + i) for i < n.
  template <typename F>
  void steps(const Entry<HwState>& e, int64_t k0, int64_t n, const F& f) const {
    const HwState& s = e.st;
    if (!s.init) {
      for (int64_t i = 0; i < n; ++i) f(i, e.open_count);
      return;
    }
    const bool seasonal = period_ != 0 && s.period == period_ && !s.season.empty();
    const int64_t last_closed = e.open_bucket - 1;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k = k0 + i;
      double v = s.level + static_cast<double>(k) * s.trend;
      if (seasonal) v += s.season[slot_of(last_closed + k)];
      f(i, std::max(0.0, v));
    }
  }

  void on_aggregate(double count, int64_t empty_after) {
    if (agg_.empty()) return;
    push_agg(count);
    const int64_t zeros = std::min<int64_t>(empty_after, static_cast<int64_t>(agg_.size()));
    for (int64_t i = 0; i < zeros; ++i) push_agg(0.0);
    since_detect_ += 1 + empty_after;
    if (since_detect_ >= kDetectEvery) {
      since_detect_ = 0;
      detect();
    }
  }

  void after_advance(int64_t) {}

  int64_t max_catch_up() const { return period_ != 0 ? period_ : 64; }

  uint64_t state_heap_bytes(const HwState& s) const {
    return s.season.capacity() == 0 ? 0 : s.season.capacity() * sizeof(float) + 16;
  }
  uint64_t model_heap_bytes() const {
    return agg_.capacity() * sizeof(double) + candidates_.capacity() * sizeof(uint32_t);
  }

 private:
  static constexpr uint64_t kAggMaxBuckets = 1u << 17;
  static constexpr uint32_t kDetectEvery = 64;

  uint32_t slot_of(int64_t bucket) const {
    const int64_t m = bucket % period_;
    const uint64_t pos = static_cast<uint64_t>(m < 0 ? m + period_ : m);
    return static_cast<uint32_t>(pos * slots_ / period_);
  }

  void push_agg(double v) {
    agg_[agg_head_] = v;
    agg_head_ = (agg_head_ + 1) % agg_.size();
    agg_n_ = std::min(agg_n_ + 1, agg_.size());
  }

  void detect() {
    std::vector<double> x(agg_n_);
    const size_t start = (agg_head_ + agg_.size() - agg_n_) % agg_.size();
    for (size_t i = 0; i < agg_n_; ++i) x[i] = agg_[(start + i) % agg_.size()];
    if (x.size() < 4) return;
    double m = 0;
    for (double v : x) m += v;
    m /= static_cast<double>(x.size());
    double ss = 0;
    for (double v : x) ss += (v - m) * (v - m);
    if (!(ss > 0)) return;
    // A trend or a smooth pattern correlates at every short lag; a true
    // period must beat half of itself, so only such local peaks compete.
    std::vector<uint32_t> peaks;
    for (uint32_t c : candidates_) {
      if (c >= x.size() / 2) continue;
      if (acf_at(x, m, ss, c) > acf_at(x, m, ss, c / 2) + 0.1) peaks.push_back(c);
    }
    const uint32_t found = find_period(x, peaks);
    // A quiet stretch (no clear period) keeps what was learnt.
    if (found != 0 && found != period_) {
      period_ = found;
      slots_ = std::max<uint32_t>(1, std::min(period_, params().hw_season_slots));
    }
  }

  uint32_t period_ = 0;  // buckets; 0 = not known yet (plain Holt)
  uint32_t slots_ = 1;
  std::vector<uint32_t> candidates_;
  std::vector<double> agg_;  // ring of the aggregate bucket series
  size_t agg_head_ = 0, agg_n_ = 0;
  int64_t since_detect_ = 0;
};

// ----------------------------------------------------------------------- ARIMA

constexpr uint32_t kArRing = 64;
constexpr uint32_t kArMaxOrder = 16;
// The pooled refit reads at most this many segments' rings (in hash order,
// i.e. an arbitrary sample), so it stays bounded with 1 Mi segments.
constexpr size_t kArFitMaxSegments = 16384;

struct ArState {
  std::array<float, kArRing> ring{};  // recent closed buckets, oldest overwritten
  uint8_t head = 0;                   // next write position
  uint8_t n = 0;
  // Of the ring, kept at each close: forecasts run per tick, closes per bucket.
  float mean = 0, hi = 0;
  float at_back(uint32_t i) const {  // i = 0: most recent
    return ring[(head + kArRing - 1 - i) % kArRing];
  }
};

class Arima : public BucketModel<Arima, ArState> {
 public:
  explicit Arima(const Params& p)
      : BucketModel(p),
        order_(std::min(p.ar_order, kArMaxOrder)),
        refit_every_(std::max<uint32_t>(1, p.ar_refit_buckets)) {}

  std::string_view name() const override { return "arima"; }

  void close_bucket(ArState& s, int64_t, double y) {
    s.ring[s.head] = static_cast<float>(y);
    s.head = static_cast<uint8_t>((s.head + 1) % kArRing);
    if (s.n < kArRing) ++s.n;
    float sum = 0, hi = 0;
    for (uint32_t i = 0; i < s.n; ++i) {
      sum += s.ring[i];
      hi = std::max(hi, s.ring[i]);
    }
    s.mean = sum / s.n;
    s.hi = hi;
  }

  bool ready(const ArState& s) const { return s.n != 0; }

  // Calls f(i, expected writes in bucket step k0 + i) for i < n.
  template <typename F>
  void steps(const Entry<ArState>& e, int64_t k0, int64_t n, const F& f) const {
    const ArState& s = e.st;
    if (s.n == 0 || coef_.empty()) {
      const double v = s.n == 0 ? e.open_count : s.mean;
      for (int64_t i = 0; i < n; ++i) f(i, v);
      return;
    }
    const double mean = s.mean;
    // An explosive pooled fit must not run away over a long horizon.
    const double cap = 2.0 * s.hi + 1;
    std::array<double, kArMaxOrder> lag{};  // lag[0] = most recent
    for (uint32_t j = 0; j < order_; ++j) lag[j] = j < s.n ? s.at_back(j) : mean;
    const int64_t last = k0 + n - 1;
    for (int64_t k = 1; k <= last; ++k) {
      double y = coef_[0];
      for (uint32_t j = 0; j < order_; ++j) y += coef_[j + 1] * lag[j];
      y = std::clamp(y, 0.0, cap);
      if (order_ > 0) {
        std::copy_backward(lag.begin(), lag.begin() + order_ - 1, lag.begin() + order_);
        lag[0] = y;
      }
      if (k >= k0) f(k - k0, y);
    }
  }

  void on_aggregate(double, int64_t) {}

  void after_advance(int64_t closed) {
    since_fit_ += closed;
    if (since_fit_ < refit_every_) return;
    since_fit_ = 0;
    ArAccumulator acc(order_);
    size_t used = 0;
    for (const auto& kv : segments()) {
      if (used++ == kArFitMaxSegments) break;
      const ArState& s = kv.second.st;
      acc.add_series(s.n, [&s](size_t i) { return static_cast<double>(s.at_back(s.n - 1 - i)); });
    }
    std::vector<double> c = acc.solve();
    if (!c.empty()) coef_ = std::move(c);
  }

  int64_t max_catch_up() const { return kArRing; }

  uint64_t state_heap_bytes(const ArState&) const { return 0; }
  uint64_t model_heap_bytes() const { return coef_.capacity() * sizeof(double); }

 private:
  uint32_t order_;
  int64_t refit_every_;
  int64_t since_fit_ = 0;
  std::vector<double> coef_;  // {c, phi_1..phi_p}; empty before the first fit
};

}  // namespace

uint32_t find_period(const std::vector<double>& series, const std::vector<uint32_t>& candidates) {
  const size_t n = series.size();
  if (n < 4) return 0;
  double m = 0;
  for (double v : series) m += v;
  m /= static_cast<double>(n);
  double ss = 0;
  for (double v : series) ss += (v - m) * (v - m);
  if (!(ss > 0)) return 0;
  uint32_t best = 0;
  double best_acf = kMinAcf;
  for (uint32_t c : candidates) {
    if (c == 0 || c >= n / 2) continue;
    const double r = acf_at(series, m, ss, c);
    if (r > best_acf || (best == 0 && r >= best_acf)) {
      best = c;
      best_acf = r;
    }
  }
  return best;
}

std::vector<double> fit_ar(const std::vector<std::vector<double>>& series, uint32_t p) {
  ArAccumulator acc(p);
  for (const auto& s : series) acc.add_series(s.size(), [&s](size_t i) { return s[i]; });
  return acc.solve();
}

std::unique_ptr<Predictor> make_holt_winters(const Params& p) {
  return std::make_unique<HoltWinters>(p);
}

std::unique_ptr<Predictor> make_arima(const Params& p) { return std::make_unique<Arima>(p); }

}  // namespace shadowd::predict
