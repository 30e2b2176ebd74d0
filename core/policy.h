// The shadowing policy (specification §6, issue "predictive shadowing"):
// which segments hold a base version when no journal record pins them.
//
// A segment holds a base while it has journal records inside the retention
// window (it is pinned). When its last record leaves the window its base can
// be kept as a *speculative* base, so that its next write does not stall on
// copy-on-first-write, or freed. The policy decides
//   - whether speculative bases are kept at all (keeps_bases),
//   - which to give up first when the pool needs room (lowest value first),
//   - which segments without a base to copy ahead of need (candidates), each
//     worth its value; copies go into free room or, short of it, in the
//     place of a speculative base whose value() is lower than the copy's
//     (candidates listed below min_value never take a base's place).
// The daemon's shadow thread and the simulator run the same objects; see
// docs/SIMULATION.md for the exact rules around them.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/monitor.h"
#include "core/predict.h"
#include "core/status.h"

namespace shadowd {

enum class PolicyKind : uint8_t {
  kNone,         // no speculative bases, no copies ahead
  kLru,          // keep speculative bases by recency of access
  kHeat,         // keep them by number of writes
  kPriority,     // the seed's priority formula (monitor), copies the top segments ahead
  kEwma,         // forecast by predictor, copies ahead what it forecasts
  kHoltWinters,
  kArima,
  kSequential,
  kAuto,         // sequential + ewma forecasts plus the priority formula: the default
  kOracle,       // knows the future (simulator only)
};

Result<PolicyKind> parse_policy(std::string_view name);
std::string_view policy_name(PolicyKind k);
// Every policy name, in the order above (for help texts and benchmarks).
std::vector<std::string_view> policy_names();

struct PolicyParams {
  predict::Params predict;
  double horizon_s = 60;         // forecasts look this far ahead
  double min_value = 0.01;       // copy ahead only what is forecast at least this
  size_t max_candidates = 256;   // per round
  double priority_weight = 1.0;  // weight of the priority formula in predictive values
};

class ShadowPolicy {
 public:
  virtual ~ShadowPolicy() = default;
  virtual PolicyKind kind() const = 0;
  std::string_view name() const { return policy_name(kind()); }
  // Keep a base when its segment leaves the window (else it is freed).
  virtual bool keeps_bases() const = 0;
  // Copy segments ahead of need.
  virtual bool copies_ahead() const = 0;
  // Every access, in time order (t: Unix ns, virtual in the simulator).
  virtual void observe(predict::Op op, uint64_t segment, int64_t t_ns) = 0;
  // Periodic work (refits, expiry).
  virtual void tick(int64_t now_ns) = 0;
  // The worth of holding a base for `segment` now: higher is kept longer and
  // copied sooner. Comparable between segments of one policy only.
  virtual double value(uint64_t segment, int64_t now_ns) const = 0;
  // Segments to copy ahead, best first, with their value (at most `max`),
  // leaving out those `covered` says hold a base already.
  virtual void candidates(int64_t now_ns, size_t max, const predict::Skip& covered,
                          std::vector<std::pair<double, uint64_t>>& out) const = 0;
  // New tunables (horizon, min_value, priority weight, max_candidates); the
  // models' own structure and what they learnt stay.
  virtual void set_params(const PolicyParams& p) { (void)p; }
  // The forecaster behind the values (null for the reactive policies).
  virtual const predict::Predictor* predictor() const { return nullptr; }
  virtual uint64_t memory_bytes() const = 0;
  // Mean absolute error of each model's forecast of writes per segment over
  // one minute, checked on a sample of segments every minute (empty for the
  // reactive policies or before the first check).
  struct ForecastError {
    std::string predictor;
    double mae = 0;         // writes per segment-minute
    uint64_t samples = 0;   // forecasts checked
  };
  virtual std::vector<ForecastError> forecast_errors() const { return {}; }
};

// Every policy but kOracle (the simulator builds that one from the trace).
// `monitor` gives the priority formula to kPriority and kAuto (required for
// kPriority; kAuto goes without it if null).
Result<std::unique_ptr<ShadowPolicy>> make_policy(PolicyKind kind, const PolicyParams& params,
                                                  const Monitor* monitor);

}  // namespace shadowd
