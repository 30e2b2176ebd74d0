// Auto-tuning (specification, "Monitoring and Tuning"): the daemon's own
// access history replayed through the simulator with candidate settings,
// keeping the one with the fewest copy-on-write stalls (then the fewest
// bytes copied in the background) at the configured budget, pool capacity
// and retention.
//
// What is tuned: the priority formula's alpha, beta, gamma and baseline,
// the policy's min_value (how sure a forecast must be to copy) and horizon,
// and the sequential model's reach (seq_ahead, frontier_ahead): coordinate
// search, each halved or doubled (the baseline moved by one) while that
// helps, up to four steps. The forecasting models fit their own
// parameters as they go (ARIMA refits its coefficients, Holt-Winters finds
// its period). max_versions_per_segment follows the pool capacity: the
// versions the pool can hold beside the journal, spread over the segments
// with history, within 2..64.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "core/monitor.h"
#include "core/policy.h"
#include "core/simulator.h"
#include "core/status.h"

namespace shadowd::tune {

struct Input {
  std::vector<HistoryRecord> history;  // the monitor's, oldest first
  uint32_t bucket_seconds = 60;
  sim::Options sim;                    // device, segment, capacity, budget, retention, policy
  PriorityParams priority;             // in use now
  PolicyParams policy;                 // in use now
  uint64_t max_requests = 200000;      // replay at most the newest this many requests
  // For max_versions: the pool's capacity, the mean stored bytes of a
  // version (0: the segment size) and the segments with history now.
  uint64_t pool_bytes = 0;
  uint64_t journal_bytes = 0;
  uint64_t mean_version_bytes = 0;
  uint64_t segments_with_history = 0;
  // Checked between trials: set, the run stops with kShutdown.
  const std::atomic<bool>* cancel = nullptr;
};

struct Trial {
  std::string what;  // "alpha=2", "current", ...
  uint64_t stalls = 0;
  uint64_t copied_bytes = 0;
};

struct Output {
  PriorityParams priority;  // the best found (the current if nothing helps)
  PolicyParams policy;
  uint32_t max_versions_per_segment = 8;
  uint64_t stalls_before = 0, stalls_after = 0;
  uint64_t copied_before = 0, copied_after = 0;
  uint64_t requests = 0;  // replayed
  std::vector<Trial> trials;
  double seconds = 0;
  bool changed = false;
};

// History records as requests: `writes` writes and `reads` reads per record,
// spread evenly over its bucket, at the segment's start.
std::vector<trace::Request> requests_of(const std::vector<HistoryRecord>& history, uint32_t bucket_seconds,
                                        uint32_t segment_bytes, uint64_t max_requests);

uint32_t fit_max_versions(const Input& in);

Result<Output> run(const Input& in);

}  // namespace shadowd::tune
