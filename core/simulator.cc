#include "core/simulator.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <random>
#include <set>
#include <string_view>

#include "core/clock.h"

namespace shadowd::sim {
namespace {

constexpr int64_t kNs = 1'000'000'000;
// With no request since the last round, rounds run only this often (the
// forecasts still move with time; copies have nothing new to chase).
constexpr int64_t kIdleRoundNs = 10 * kNs;
// The eviction order is recomputed at most this often (values move slowly).
constexpr int64_t kReorderNs = kNs;

// Knows every segment's next write (Belady): a base is worth more the sooner
// its segment is written next; copies go to the soonest-written segments
// without a base.
class Oracle final : public ShadowPolicy {
 public:
  Oracle(std::vector<std::vector<int64_t>> writes, const std::vector<uint8_t>& base)
      : writes_(std::move(writes)), pos_(writes_.size(), 0), base_(base) {
    for (uint64_t s = 0; s < writes_.size(); ++s) {
      if (!writes_[s].empty()) future_.emplace(writes_[s][0], s);
    }
  }
  PolicyKind kind() const override { return PolicyKind::kOracle; }
  bool keeps_bases() const override { return true; }
  bool copies_ahead() const override { return true; }
  // Called once per segment-write, in trace order: consumes that write.
  void observe(predict::Op op, uint64_t seg, int64_t) override {
    if (op != predict::Op::kWrite || seg >= writes_.size()) return;
    uint32_t& p = pos_[seg];
    if (p >= writes_[seg].size()) return;
    future_.erase({writes_[seg][p], seg});
    if (++p < writes_[seg].size()) future_.emplace(writes_[seg][p], seg);
  }
  void tick(int64_t) override {}
  double value(uint64_t seg, int64_t now) const override {
    if (seg >= writes_.size() || pos_[seg] >= writes_[seg].size()) return 0;
    return worth(writes_[seg][pos_[seg]], now);
  }
  void candidates(int64_t now, size_t max, const predict::Skip&,
                  std::vector<std::pair<double, uint64_t>>& out) const override {
    size_t n = 0;
    for (auto it = future_.begin(); it != future_.end() && n < max; ++it) {
      if (base_[it->second]) continue;
      out.emplace_back(worth(it->first, now), it->second);
      ++n;
    }
  }
  // The sooner the next write, the more: 1e6 / (1 + seconds to it), 0 for
  // none (positive, like the policies' values, and far above min_value).
  static double worth(int64_t next, int64_t now) {
    return 1e6 / (1.0 + static_cast<double>(std::max<int64_t>(0, next - now)) / 1e9);
  }
  uint64_t memory_bytes() const override {
    uint64_t n = future_.size() * 48 + pos_.size() * 4;
    for (const auto& w : writes_) n += w.capacity() * 8 + sizeof(w);
    return n;
  }

 private:
  std::vector<std::vector<int64_t>> writes_;
  std::vector<uint32_t> pos_;
  const std::vector<uint8_t>& base_;
  std::set<std::pair<int64_t, uint64_t>> future_;  // (next write, segment)
};

class Sim {
 public:
  Sim(const Options& o, uint64_t device_bytes, int64_t t0)
      : o_(o),
        S_(o.segment_bytes),
        shift_(static_cast<uint32_t>(std::countr_zero(o.segment_bytes))),
        nsegs_((device_bytes + o.segment_bytes - 1) / o.segment_bytes),
        R_(static_cast<int64_t>(std::min<uint64_t>(o.retention_s, 1ull << 32)) * kNs),
        base_(nsegs_, 0),
        spec_(nsegs_, 0),
        ahead_(nsegs_, 0),
        recs_(nsegs_, 0),
        since_(nsegs_, 0),
        clock_(t0),
        W_(std::numeric_limits<int64_t>::min()) {
    r_.device_bytes = device_bytes;
    r_.segment_bytes = o.segment_bytes;
    r_.budget_bytes_per_s = o.budget_bytes_per_s;
    r_.retention_s = o.retention_s;
    C_ = o.pool_capacity_bytes ? o.pool_capacity_bytes
                               : static_cast<uint64_t>(static_cast<double>(device_bytes) * o.pool_capacity_pct / 100.0);
    r_.pool_capacity_bytes = C_;
    MonitorConfig mc;
    mc.device_bytes = device_bytes;
    mc.segment_bytes = o.segment_bytes;
    mc.bucket_seconds = o.monitor_bucket_s;
    monitor_ = std::make_unique<Monitor>(mc, clock_);
    PriorityParams pp = o.priority;
    pp.scoring_window_seconds = 3600;
    (void)monitor_->set_priority(pp);
  }

  Status init(const std::vector<trace::Request>& reqs) {
    if (C_ < 4ull * S_) {
      return Status::invalid("pool capacity " + std::to_string(C_) + " bytes is less than four segments (" +
                             std::to_string(4ull * S_) + ")");
    }
    if (o_.policy == PolicyKind::kOracle || oracle_order_) {
      std::vector<std::vector<int64_t>> writes(nsegs_);
      int64_t prev = std::numeric_limits<int64_t>::min();
      for (const auto& q : reqs) {
        const int64_t t = std::max(q.time_ns, prev);
        prev = t;
        if (q.op != trace::Op::kWrite || q.length == 0) continue;
        for (uint64_t s = q.offset >> shift_; s <= (q.offset + q.length - 1) >> shift_; ++s) writes[s].push_back(t);
      }
      policy_ = std::make_unique<Oracle>(std::move(writes), base_);
    }
    if (oracle_order_ && o_.policy != PolicyKind::kOracle) oracle_ = std::move(policy_);
    if (o_.policy != PolicyKind::kOracle) {
      auto p = make_policy(o_.policy, o_.params, monitor_.get());
      if (!p) return p.status();
      policy_ = std::move(*p);
    }
    rescore_ = o_.policy == PolicyKind::kPriority || o_.policy == PolicyKind::kAuto;
    return Status::ok();
  }

  Result run(const std::vector<trace::Request>& reqs, const Progress& progress) {
    const auto wall0 = std::chrono::steady_clock::now();
    r_.policy = std::string(policy_name(o_.policy));
    const int64_t t0 = reqs.empty() ? 0 : reqs.front().time_ns;
    int64_t tprev = t0;
    const int64_t round_ns = std::max<int64_t>(1, static_cast<int64_t>(o_.round_s * 1e9));
    int64_t next_round = t0 + round_ns;
    int64_t last_round = t0;
    last_refill_ = t0;
    bool active = false;
    // Restore times, uniform over the trace.
    int64_t tend = t0;
    for (const auto& q : reqs) tend = std::max(tend, q.time_ns);
    {
      std::mt19937_64 rng(o_.seed);
      std::uniform_int_distribution<int64_t> d(t0, std::max(t0, tend));
      for (uint32_t i = 0; i < o_.restore_samples; ++i) samples_at_.push_back(d(rng));
      std::sort(samples_at_.begin(), samples_at_.end());
    }
    size_t done = 0;
    for (const auto& q : reqs) {
      const int64_t t = std::max(q.time_ns, tprev);
      tprev = t;
      while (next_round <= t) {
        if (active || next_round - last_round >= kIdleRoundNs) {
          round(next_round);
          last_round = next_round;
          active = false;
        }
        next_round += round_ns;
      }
      request(q, t);
      active = true;
      if (progress && (++done & 4095) == 0) progress(done, reqs.size());
    }
    while (next_sample_ < samples_at_.size()) sample();
    if (progress) progress(reqs.size(), reqs.size());
    r_.trace_seconds = static_cast<double>(tprev - t0) / 1e9;
    r_.stalls_per_1k_writes =
        r_.segment_writes ? 1000.0 * static_cast<double>(r_.stalls) / static_cast<double>(r_.segment_writes) : 0;
    if (!replay_.empty()) {
      double sum = 0;
      for (uint32_t v : replay_) sum += v;
      r_.replay_records_mean = sum / static_cast<double>(replay_.size());
      const size_t k = std::min(replay_.size() - 1, static_cast<size_t>(0.99 * static_cast<double>(replay_.size())));
      std::nth_element(replay_.begin(), replay_.begin() + static_cast<std::ptrdiff_t>(k), replay_.end());
      r_.replay_records_p99 = replay_[k];
    }
    r_.policy_memory_bytes = policy_->memory_bytes();
    r_.sim_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
    return r_;
  }

 private:
  void request(const trace::Request& q, int64_t t) {
    ++r_.requests;
    const bool write = q.op == trace::Op::kWrite;
    (write ? r_.writes : r_.reads) += 1;
    if (q.length == 0) return;
    clock_.set_ns(t);
    advance(t);
    monitor_->record(write ? AccessOp::kWrite : AccessOp::kRead, q.offset, q.length);
    const uint64_t end = q.offset + q.length;
    for (uint64_t s = q.offset >> shift_; s <= (end - 1) >> shift_; ++s) {
      const uint64_t lo = std::max(q.offset, s << shift_);
      const uint64_t hi = std::min(end, (s + 1) << shift_);
      if (write) {
        segment_write(s, hi - lo, t);
      } else {
        ++r_.segment_reads;
      }
      policy_->observe(write ? predict::Op::kWrite : predict::Op::kRead, s, t);
      if (oracle_) oracle_->observe(write ? predict::Op::kWrite : predict::Op::kRead, s, t);
    }
    make_room(t);
  }

  void segment_write(uint64_t s, uint64_t bytes, int64_t t) {
    ++r_.segment_writes;
    if (!base_[s]) {
      if (stall_log_) std::fprintf(stall_log_, "%lld %llu\n", static_cast<long long>(t), static_cast<unsigned long long>(s));
      ++r_.stalls;
      r_.stall_bytes += S_;
      base_[s] = 1;
      used_ += S_;
    } else if (spec_[s]) {
      spec_[s] = 0;
      --spec_count_;
      ++r_.speculative_hits;
      if (ahead_[s]) ++r_.copies_used;
    }
    ahead_[s] = 0;
    ++recs_[s];
    if (++since_[s] == o_.stale_records) stale_.push_back(s);
    journal_.push_back(J{t, s, bytes});
    used_ += bytes;
  }

  // The window start follows the clock: records older than now - retention
  // leave it.
  void advance(int64_t t) {
    if (t - R_ > W_) W_ = t - R_;
    while (!journal_.empty() && journal_.front().t < W_) pop();
  }

  void pop() {
    const J e = journal_.front();
    journal_.pop_front();
    used_ -= e.bytes;
    if (--recs_[e.seg] == 0) {
      if (policy_->keeps_bases()) {
        spec_[e.seg] = 1;
        ++spec_count_;
      } else {
        base_[e.seg] = 0;
        used_ -= S_;
        ++r_.bases_freed;
      }
    }
    since_[e.seg] = std::min(since_[e.seg], recs_[e.seg]);
  }

  // Speculative bases go first, lowest value first; then the window shrinks,
  // oldest records first.
  void make_room(int64_t t) {
    bool shrank = false;
    while (used_ > C_) {
      if (evict_one(t)) continue;
      if (journal_.empty()) break;
      W_ = journal_.front().t + 1;
      while (!journal_.empty() && journal_.front().t < W_) pop();
      shrank = true;
    }
    if (shrank) ++r_.history_shrinks;
    r_.pool_peak_bytes = std::max(r_.pool_peak_bytes, used_);
  }

  void reorder(int64_t t) {
    std::vector<std::pair<double, uint64_t>> v;
    v.reserve(spec_count_);
    for (uint64_t s = 0; s < nsegs_; ++s) {
      if (spec_[s]) v.emplace_back(policy_->value(s, t), s);
    }
    std::sort(v.begin(), v.end());
    order_.clear();
    for (const auto& [val, s] : v) order_.push_back(s);
    order_pos_ = 0;
    order_ns_ = t;
  }

  // The speculative base that would go first (nsegs_ if none).
  uint64_t lowest(int64_t t) {
    if (spec_count_ == 0) return nsegs_;
    for (int pass = 0; pass < 2; ++pass) {
      if (pass == 1 || t - order_ns_ >= kReorderNs) reorder(t);
      while (order_pos_ < order_.size() && !spec_[order_[order_pos_]]) ++order_pos_;
      if (order_pos_ < order_.size()) return order_[order_pos_];
    }
    return nsegs_;
  }

  bool evict_one(int64_t t) {
    const uint64_t s = lowest(t);
    if (s >= nsegs_) return false;
    spec_[s] = 0;
    base_[s] = 0;
    ahead_[s] = 0;
    --spec_count_;
    used_ -= S_;
    ++r_.speculative_evicted;
    return true;
  }

  void round(int64_t t) {
    ++r_.rounds;
    clock_.set_ns(t);
    advance(t);
    policy_->tick(t);
    monitor_->roll();
    if (rescore_ && t - last_rescore_ >= kNs) {
      monitor_->rescore();
      last_rescore_ = t;
    }
    const double B = static_cast<double>(o_.budget_bytes_per_s);
    tokens_ += B * static_cast<double>(t - last_refill_) / 1e9;
    tokens_ = std::min(tokens_, std::max(B, 2.0 * S_));
    last_refill_ = t;
    while (next_sample_ < samples_at_.size() && samples_at_[next_sample_] <= t) sample();
    if (tokens_ < S_) return;
    // Copies ahead of need first: they are what keeps writes from stalling.
    if (policy_->copies_ahead()) {
      cand_.clear();
      policy_->candidates(t, o_.params.max_candidates, covered_, cand_);
      if (oracle_) {
        // The measuring aid: the policy's candidates (with their values) in
        // the oracle's order.
        std::vector<std::pair<double, size_t>> key;
        for (size_t i = 0; i < cand_.size(); ++i) key.emplace_back(oracle_->value(cand_[i].second, t), i);
        std::stable_sort(key.begin(), key.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
        std::vector<std::pair<double, uint64_t>> sorted;
        for (const auto& [k, i] : key) sorted.push_back(cand_[i]);
        cand_.swap(sorted);
      }
      for (const auto& [value, s] : cand_) {
        if (tokens_ < S_) break;
        if (s >= nsegs_ || base_[s]) continue;
        if (used_ + S_ > C_) {
          // As in the daemon: without free room, a copy takes the place of
          // the speculative base the policy values least, if it is worth
          // more; else the copies stop.
          const uint64_t low = lowest(t);
          if (value < o_.params.min_value || low >= nsegs_ || !(policy_->value(low, t) < policy_->value(s, t))) break;
          evict_one(t);
          ++r_.speculative_replaced;
        }
        base_[s] = 1;
        spec_[s] = 1;
        ahead_[s] = 1;
        ++spec_count_;
        used_ += S_;
        ++r_.copies;
        if (copy_log_) std::fprintf(copy_log_, "%lld %llu\n", static_cast<long long>(t), static_cast<unsigned long long>(s));
        r_.copied_bytes += S_;
        tokens_ -= S_;
      }
      r_.pool_peak_bytes = std::max(r_.pool_peak_bytes, used_);
    }
    // Then versions of stale segments (they shorten restore replays).
    while (tokens_ >= S_ && !stale_.empty()) {
      const uint64_t s = stale_.front();
      stale_.pop_front();
      if (recs_[s] == 0 || since_[s] < o_.stale_records) continue;
      since_[s] = 0;
      ++r_.versions_made;
      r_.copied_bytes += S_;
      tokens_ -= S_;
    }
  }

  // Records a restore at this moment would replay, per segment with history.
  void sample() {
    ++next_sample_;
    for (uint64_t s = 0; s < nsegs_; ++s) {
      if (recs_[s]) replay_.push_back(std::min(since_[s], recs_[s]));
    }
  }

  struct J {
    int64_t t;
    uint64_t seg;
    uint64_t bytes;
  };

  Options o_;
  uint64_t S_;
  uint32_t shift_;
  uint64_t nsegs_;
  int64_t R_;
  uint64_t C_ = 0;
  std::vector<uint8_t> base_, spec_, ahead_;
  std::vector<uint32_t> recs_, since_;
  std::deque<J> journal_;
  std::deque<uint64_t> stale_;
  uint64_t used_ = 0;
  uint64_t spec_count_ = 0;
  std::vector<uint64_t> order_;
  size_t order_pos_ = 0;
  int64_t order_ns_ = std::numeric_limits<int64_t>::min() / 2;
  ManualClock clock_;
  std::unique_ptr<Monitor> monitor_;
  std::unique_ptr<ShadowPolicy> policy_;
  std::unique_ptr<ShadowPolicy> oracle_;  // oracle_order_ only
  bool rescore_ = false;
  int64_t last_rescore_ = std::numeric_limits<int64_t>::min() / 2;
  int64_t W_;
  double tokens_ = 0;
  int64_t last_refill_ = 0;
  std::vector<std::pair<double, uint64_t>> cand_;
  const predict::Skip covered_ = [this](uint64_t s) { return s >= nsegs_ || base_[s] != 0; };
  std::vector<int64_t> samples_at_;
  size_t next_sample_ = 0;
  std::vector<uint32_t> replay_;
  Result r_;
 public:
  FILE* stall_log_ = nullptr;  // debugging aid: SHADOWD_SIM_STALL_LOG=PATH lists every stall
  FILE* copy_log_ = nullptr;   // and SHADOWD_SIM_COPY_LOG=PATH every copy ahead (time, segment)
  // Measuring aid (SHADOWD_SIM_ORACLE_ORDER=1): copies ahead take the
  // policy's candidates in the order of their next write (the future), so
  // that a policy's candidates can be told apart from its ordering of them.
  bool oracle_order_ = false;
};

}  // namespace

shadowd::Result<Result> run(const std::vector<trace::Request>& reqs, const Options& opts, const Progress& progress) {
  if (opts.segment_bytes < 64 * 1024 || opts.segment_bytes > 1024 * 1024 ||
      (opts.segment_bytes & (opts.segment_bytes - 1)) != 0) {
    return Status::invalid("segment size must be a power of two from 64K to 1M");
  }
  if (opts.round_s <= 0) return Status::invalid("the round must be positive");
  if (opts.retention_s == 0) return Status::invalid("retention must be at least one second");
  if (opts.pool_capacity_bytes == 0 && !(opts.pool_capacity_pct > 0)) {
    return Status::invalid("pool capacity must be positive");
  }
  uint64_t highest = 0;
  for (const auto& q : reqs) highest = std::max(highest, q.offset + q.length);
  uint64_t device = opts.device_bytes;
  if (device == 0) {
    device = (highest + opts.segment_bytes - 1) / opts.segment_bytes * opts.segment_bytes;
    if (device == 0) device = opts.segment_bytes;
  } else if (highest > device) {
    return Status::invalid("the trace reaches offset " + std::to_string(highest) + ", past the device size " +
                           std::to_string(device));
  }
  Sim sim(opts, device, reqs.empty() ? 0 : reqs.front().time_ns);
  const char* order = std::getenv("SHADOWD_SIM_ORACLE_ORDER");
  sim.oracle_order_ = order && *order && std::string_view(order) != "0";
  Status st = sim.init(reqs);
  if (!st) return st;
  auto open_log = [](const char* var) -> FILE* {
    const char* path = std::getenv(var);
    if (!path) return nullptr;
    FILE* f = std::fopen(path, "w");
    if (!f) std::fprintf(stderr, "warning: %s=%s: %s (no log written)\n", var, path, std::strerror(errno));
    return f;
  };
  sim.stall_log_ = open_log("SHADOWD_SIM_STALL_LOG");
  sim.copy_log_ = open_log("SHADOWD_SIM_COPY_LOG");
  auto r = sim.run(reqs, progress);
  if (sim.stall_log_) std::fclose(sim.stall_log_);
  if (sim.copy_log_) std::fclose(sim.copy_log_);
  return r;
}

}  // namespace shadowd::sim
