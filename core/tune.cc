#include "core/tune.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <functional>
#include <tuple>

namespace shadowd::tune {

std::vector<trace::Request> requests_of(const std::vector<HistoryRecord>& history, uint32_t bucket_seconds,
                                        uint32_t segment_bytes, uint64_t max_requests) {
  // The newest records first, until the limit; then put back in time order.
  std::vector<trace::Request> out;
  uint64_t total = 0;
  size_t first = history.size();
  while (first > 0) {
    const HistoryRecord& r = history[first - 1];
    const uint64_t n = uint64_t{r.reads} + r.writes;
    if (total + n > max_requests && total > 0) break;
    total += n;
    --first;
  }
  const int64_t bucket_ns = int64_t{bucket_seconds} * 1'000'000'000;
  for (size_t i = first; i < history.size(); ++i) {
    const HistoryRecord& r = history[i];
    for (int op = 0; op < 2; ++op) {
      const uint32_t count = op == 0 ? r.writes : r.reads;
      const uint64_t bytes = op == 0 ? r.bytes_written : r.bytes_read;
      if (count == 0) continue;
      const uint64_t len = std::clamp<uint64_t>(bytes / count, 1, segment_bytes);
      for (uint32_t k = 0; k < count; ++k) {
        trace::Request q;
        q.time_ns = r.bucket_start_s * 1'000'000'000 + bucket_ns * (2 * int64_t{k} + 1) / (2 * int64_t{count});
        q.op = op == 0 ? trace::Op::kWrite : trace::Op::kRead;
        q.offset = r.segment * segment_bytes;
        q.length = len;
        out.push_back(q);
      }
    }
  }
  std::stable_sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.time_ns < b.time_ns; });
  return out;
}

uint32_t fit_max_versions(const Input& in) {
  if (in.pool_bytes == 0 || in.segments_with_history == 0) return 8;
  const uint64_t per = in.mean_version_bytes ? in.mean_version_bytes : in.sim.segment_bytes;
  // Half of what the journal leaves, for versions beyond each segment's base.
  const uint64_t room = in.pool_bytes > in.journal_bytes ? (in.pool_bytes - in.journal_bytes) / 2 : 0;
  const uint64_t n = room / (per * in.segments_with_history);
  return static_cast<uint32_t>(std::clamp<uint64_t>(n, 2, 64));
}

Result<Output> run(const Input& in) {
  const auto t0 = std::chrono::steady_clock::now();
  Output out;
  out.priority = in.priority;
  out.policy = in.policy;
  out.max_versions_per_segment = fit_max_versions(in);
  const auto reqs = requests_of(in.history, in.bucket_seconds, in.sim.segment_bytes, in.max_requests);
  out.requests = reqs.size();
  if (reqs.empty()) {
    out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return out;
  }
  auto eval = [&](const PriorityParams& pp, const PolicyParams& pol, const std::string& what)
      -> shadowd::Result<std::pair<uint64_t, uint64_t>> {
    if (in.cancel && in.cancel->load(std::memory_order_relaxed)) {
      return Status::error(Status::Code::kShutdown, "tuning cancelled");
    }
    sim::Options o = in.sim;
    o.priority = pp;
    o.params = pol;
    o.restore_samples = 0;
    auto r = sim::run(reqs, o);
    if (!r) return r.status();
    out.trials.push_back(Trial{what, r->stalls, r->copied_bytes});
    return std::make_pair(r->stalls, r->copied_bytes);
  };
  auto cur = eval(out.priority, out.policy, "current");
  if (!cur) return cur.status();
  out.stalls_before = cur->first;
  out.copied_before = cur->second;
  auto best = *cur;
  // Coordinate search, one pass: each knob down and up, kept when better
  // (fewer stalls, or as many for fewer bytes copied).
  // Coordinate search: each knob halved or doubled (the baseline moved by
  // one) for as long as that helps — fewer stalls, or as many for fewer
  // bytes copied — up to a few steps.
  struct Knob {
    std::string name;
    std::function<double(const PriorityParams&, const PolicyParams&)> get;
    std::function<void(PriorityParams&, PolicyParams&, double)> set;
    bool additive;
    double lo, hi;
  };
  const std::vector<Knob> knobs = {
      {"alpha", [](const PriorityParams& p, const PolicyParams&) { return p.alpha; },
       [](PriorityParams& p, PolicyParams&, double v) { p.alpha = v; }, false, 1e-6, 1e6},
      {"beta", [](const PriorityParams& p, const PolicyParams&) { return p.beta; },
       [](PriorityParams& p, PolicyParams&, double v) { p.beta = v; }, false, 1e-6, 1e6},
      {"gamma", [](const PriorityParams& p, const PolicyParams&) { return p.gamma; },
       [](PriorityParams& p, PolicyParams&, double v) { p.gamma = v; }, false, 1e-9, 1e3},
      {"baseline", [](const PriorityParams& p, const PolicyParams&) { return p.baseline; },
       [](PriorityParams& p, PolicyParams&, double v) { p.baseline = v; }, true, -1e6, 1e6},
      {"min_value", [](const PriorityParams&, const PolicyParams& q) { return q.min_value; },
       [](PriorityParams&, PolicyParams& q, double v) { q.min_value = v; }, false, 1e-4, 10},
      {"horizon_s", [](const PriorityParams&, const PolicyParams& q) { return q.horizon_s; },
       [](PriorityParams&, PolicyParams& q, double v) { q.horizon_s = v; }, false, 1, 86400},
      {"seq_ahead", [](const PriorityParams&, const PolicyParams& q) { return double(q.predict.seq_ahead); },
       [](PriorityParams&, PolicyParams& q, double v) { q.predict.seq_ahead = static_cast<uint32_t>(v); }, false,
       1, 4096},
      {"frontier_ahead",
       [](const PriorityParams&, const PolicyParams& q) { return double(q.predict.frontier_ahead); },
       [](PriorityParams&, PolicyParams& q, double v) { q.predict.frontier_ahead = static_cast<uint32_t>(v); },
       false, 0, 65536},
  };
  constexpr int kMaxSteps = 5;
  for (const Knob& k : knobs) {
    for (double f : {0.5, 2.0}) {
      // Walk this way while it is not worse (across plateaus), keeping the
      // last point that was strictly better.
      bool moved = false;
      PriorityParams pp = out.priority;
      PolicyParams pol = out.policy;
      for (int step = 0; step < kMaxSteps; ++step) {
        const double v0 = k.get(pp, pol);
        if (!k.additive && v0 == 0) break;
        const double v = std::clamp(k.additive ? v0 + (f < 1 ? -1.0 : 1.0) : v0 * f, k.lo, k.hi);
        k.set(pp, pol, v);
        if (k.get(pp, pol) == v0) break;  // at a bound, or an integer knob that did not move
        char what[64];
        std::snprintf(what, sizeof what, "%s=%g", k.name.c_str(), k.get(pp, pol));
        auto r = eval(pp, pol, what);
        if (!r) return r.status();
        if (std::tie(r->first, r->second) < std::tie(best.first, best.second)) {
          best = *r;
          out.priority = pp;
          out.policy = pol;
          out.changed = true;
          moved = true;
        } else if (r->first > best.first || (r->first == best.first && r->second > best.second)) {
          break;  // worse: not this way
        }
      }
      if (moved) break;  // this knob went down (or up): not the other way
    }
  }
  out.stalls_after = best.first;
  out.copied_after = best.second;
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

}  // namespace shadowd::tune
