#include "core/policy.h"

#include <algorithm>
#include <array>
#include <cmath>

namespace shadowd {
namespace {

constexpr std::array<std::string_view, 10> kNames = {
    "none", "lru", "heat", "priority", "ewma", "holt-winters", "arima", "sequential", "auto", "oracle"};

// none: bases live exactly as long as the window pins them.
class NonePolicy final : public ShadowPolicy {
 public:
  PolicyKind kind() const override { return PolicyKind::kNone; }
  bool keeps_bases() const override { return false; }
  bool copies_ahead() const override { return false; }
  void observe(predict::Op, uint64_t, int64_t) override {}
  void tick(int64_t) override {}
  double value(uint64_t, int64_t) const override { return 0; }
  void candidates(int64_t, size_t, const predict::Skip&, std::vector<std::pair<double, uint64_t>>&) const override {}
  uint64_t memory_bytes() const override { return 0; }
};

// lru and heat: the reactive baselines. One small entry per segment ever
// accessed (they are baselines for the simulator; the daemon does not need
// their memory bound).
class ReactivePolicy final : public ShadowPolicy {
 public:
  explicit ReactivePolicy(PolicyKind k) : kind_(k) {}
  PolicyKind kind() const override { return kind_; }
  bool keeps_bases() const override { return true; }
  bool copies_ahead() const override { return false; }
  void observe(predict::Op op, uint64_t seg, int64_t t) override {
    Entry& e = seen_[seg];
    e.last_ns = t;
    if (op == predict::Op::kWrite) ++e.writes;
  }
  void tick(int64_t) override {}
  double value(uint64_t seg, int64_t) const override {
    auto f = seen_.find(seg);
    if (f == seen_.end()) return -1;
    return kind_ == PolicyKind::kLru ? static_cast<double>(f->second.last_ns) / 1e9
                                     : static_cast<double>(f->second.writes);
  }
  void candidates(int64_t, size_t, const predict::Skip&, std::vector<std::pair<double, uint64_t>>&) const override {}
  uint64_t memory_bytes() const override { return seen_.size() * (sizeof(Entry) + 8 + 3 * sizeof(void*)); }

 private:
  struct Entry {
    int64_t last_ns = 0;
    uint64_t writes = 0;
  };
  PolicyKind kind_;
  std::unordered_map<uint64_t, Entry> seen_;
};

// priority: the seed's formula from the monitor; copies ahead the top of its
// ranking (which the daemon's roller thread rescoring keeps fresh).
class PriorityPolicy final : public ShadowPolicy {
 public:
  PriorityPolicy(const PolicyParams& p, const Monitor* m) : p_(p), monitor_(m) {}
  PolicyKind kind() const override { return PolicyKind::kPriority; }
  bool keeps_bases() const override { return true; }
  bool copies_ahead() const override { return true; }
  void observe(predict::Op, uint64_t, int64_t) override {}
  void tick(int64_t) override {}
  double value(uint64_t seg, int64_t) const override {
    return seg < monitor_->segment_count() ? monitor_->priority(seg) : -1e300;
  }
  void candidates(int64_t, size_t max, const predict::Skip& covered,
                  std::vector<std::pair<double, uint64_t>>& out) const override {
    // The ranking holds every active segment; most hold a base already.
    size_t n = 0;
    for (uint64_t s : monitor_->top_k(16 * std::min(max, p_.max_candidates))) {
      if (covered && covered(s)) continue;
      out.emplace_back(monitor_->priority(s), s);
      if (++n >= std::min(max, p_.max_candidates)) break;
    }
  }
  uint64_t memory_bytes() const override { return 0; }  // the monitor's, counted there
  void set_params(const PolicyParams& p) override { p_ = p; }

 private:
  PolicyParams p_;
  const Monitor* monitor_;
};

// The forecasting policies: value = forecast writes within the horizon, plus
// the priority formula (weighted) when a monitor is there, so that segments
// no model expects to be written are ranked by recency and rate.
class PredictivePolicy final : public ShadowPolicy {
 public:
  PredictivePolicy(PolicyKind k, const PolicyParams& p, std::unique_ptr<predict::Predictor> pred,
                   const Monitor* m)
      : kind_(k), p_(p), pred_(std::move(pred)), monitor_(m) {}
  PolicyKind kind() const override { return kind_; }
  bool keeps_bases() const override { return true; }
  bool copies_ahead() const override { return true; }
  void observe(predict::Op op, uint64_t seg, int64_t t) override {
    pred_->observe(seg, op, t);
    if (op == predict::Op::kWrite) {
      if (auto f = checks_.find(seg); f != checks_.end()) ++f->second.actual;
      last_written_[next_written_++ % last_written_.size()] = seg;
    }
  }
  void tick(int64_t now) override {
    pred_->tick(now);
    check_forecasts(now);
  }
  std::vector<ForecastError> forecast_errors() const override { return errors_; }
  double value(uint64_t seg, int64_t now) const override {
    double v = pred_->rank(seg, now, p_.horizon_s);
    // The formula bounded to (-1, 1): it orders what no model expects, and
    // its time-since-last-access term must not sink a segment a model does
    // expect (one never accessed ages from the daemon's start).
    if (monitor_ && p_.priority_weight != 0 && seg < monitor_->segment_count()) {
      v += p_.priority_weight * std::tanh(monitor_->priority(seg));
    }
    return v;
  }
  void candidates(int64_t now, size_t max, const predict::Skip& covered,
                  std::vector<std::pair<double, uint64_t>>& out) const override {
    std::vector<std::pair<double, uint64_t>> v;
    const size_t limit = std::min(max, p_.max_candidates);
    pred_->nominate(now, p_.horizon_s, limit, covered, v);
    size_t n = 0;
    for (const auto& [f, s] : v) {
      if (f >= p_.min_value) {
        out.emplace_back(f, s);
        ++n;
      }
    }
    // auto: then the top of the priority formula's ranking (segments read or
    // written much and lately), as the seed's shadowing loop does.
    if (monitor_ && n < limit) {
      for (uint64_t s : monitor_->top_k(16 * limit)) {
        if (n >= limit) break;
        if ((covered && covered(s)) ||
            std::any_of(v.begin(), v.end(), [&](const auto& e) { return e.second == s; })) {
          continue;
        }
        out.emplace_back(0, s);  // after every forecast
        ++n;
      }
    }
  }
  const predict::Predictor* predictor() const override { return pred_.get(); }
  uint64_t memory_bytes() const override { return pred_->memory_bytes(); }
  void set_params(const PolicyParams& p) override {
    p_ = p;
    pred_->set_params(p.predict);
  }

 private:
  // Every minute: score the forecasts made a minute ago against the writes
  // that came, then forecast again for a sample (the top nominations and
  // recently written segments).
  void check_forecasts(int64_t now) {
    constexpr int64_t kMinute = 60'000'000'000;
    if (check_start_ns_ != 0 && now - check_start_ns_ < kMinute) return;
    if (check_start_ns_ != 0 && !checks_.empty()) {
      const auto parts = pred_->parts();
      if (errors_.size() != parts.size()) {
        errors_.assign(parts.size(), ForecastError{});
        for (size_t i = 0; i < parts.size(); ++i) errors_[i].predictor = std::string(parts[i]->name());
      }
      for (const auto& [seg, c] : checks_) {
        for (size_t i = 0; i < parts.size() && i < c.forecast.size(); ++i) {
          ForecastError& e = errors_[i];
          const double err = std::abs(c.forecast[i] - static_cast<double>(c.actual));
          e.mae = (e.mae * static_cast<double>(e.samples) + err) / static_cast<double>(e.samples + 1);
          e.samples = std::min<uint64_t>(e.samples + 1, 10000);  // a long, slowly moving mean
        }
      }
    }
    checks_.clear();
    check_start_ns_ = now;
    std::vector<std::pair<double, uint64_t>> v;
    pred_->nominate(now, 60, 32, {}, v);
    for (const auto& [f, seg] : v) checks_[seg];
    for (uint64_t seg : last_written_) {
      if (checks_.size() >= 64) break;
      if (seg != kNoSeg) checks_[seg];
    }
    const auto parts = pred_->parts();
    for (auto& [seg, c] : checks_) {
      for (const auto* part : parts) c.forecast.push_back(part->forecast(seg, now, 60));
    }
  }

  struct Check {
    std::vector<double> forecast;  // per part
    uint64_t actual = 0;
  };
  static constexpr uint64_t kNoSeg = ~0ull;
  PolicyKind kind_;
  PolicyParams p_;
  std::unique_ptr<predict::Predictor> pred_;
  const Monitor* monitor_;
  std::unordered_map<uint64_t, Check> checks_;
  int64_t check_start_ns_ = 0;
  std::array<uint64_t, 32> last_written_ = [] {
    std::array<uint64_t, 32> a;
    a.fill(kNoSeg);
    return a;
  }();
  size_t next_written_ = 0;
  std::vector<ForecastError> errors_;
};

}  // namespace

Result<PolicyKind> parse_policy(std::string_view name) {
  for (size_t i = 0; i < kNames.size(); ++i) {
    if (kNames[i] == name) return static_cast<PolicyKind>(i);
  }
  std::string all;
  for (auto n : kNames) all += (all.empty() ? "" : ", ") + std::string(n);
  return Status::invalid("unknown policy '" + std::string(name) + "' (one of: " + all + ")");
}

std::string_view policy_name(PolicyKind k) { return kNames[static_cast<size_t>(k)]; }

std::vector<std::string_view> policy_names() { return {kNames.begin(), kNames.end()}; }

Result<std::unique_ptr<ShadowPolicy>> make_policy(PolicyKind kind, const PolicyParams& params,
                                                  const Monitor* monitor) {
  switch (kind) {
    case PolicyKind::kNone:
      return std::unique_ptr<ShadowPolicy>(new NonePolicy());
    case PolicyKind::kLru:
    case PolicyKind::kHeat:
      return std::unique_ptr<ShadowPolicy>(new ReactivePolicy(kind));
    case PolicyKind::kPriority:
      if (!monitor) return Status::invalid("the priority policy needs the access monitor");
      return std::unique_ptr<ShadowPolicy>(new PriorityPolicy(params, monitor));
    case PolicyKind::kOracle:
      return Status::invalid("the oracle policy knows the future: only `shadowctl simulate` has it");
    default:
      break;
  }
  auto pred = predict::make(policy_name(kind), params.predict);
  if (!pred) return pred.status();
  const Monitor* m = kind == PolicyKind::kAuto ? monitor : nullptr;
  return std::unique_ptr<ShadowPolicy>(new PredictivePolicy(kind, params, std::move(*pred), m));
}

}  // namespace shadowd
