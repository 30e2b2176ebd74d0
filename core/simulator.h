// The shadowing simulator behind `shadowctl simulate` and auto-tuning: a
// block trace replayed on a virtual clock through the daemon's monitor,
// predictors and shadowing policy, over a model of the pool (bases and
// journal bytes, no data). The model is exact and written down in
// docs/SIMULATION.md; the counts it gives can be reproduced from there.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/monitor.h"
#include "core/policy.h"
#include "core/status.h"
#include "core/trace.h"

namespace shadowd::sim {

struct Options {
  uint64_t device_bytes = 0;            // 0: the highest offset the trace reaches
  uint32_t segment_bytes = 256 * 1024;
  uint64_t pool_capacity_bytes = 0;     // 0: pool_capacity_pct of the device
  double pool_capacity_pct = 100;
  uint64_t budget_bytes_per_s = 16ull << 20;  // background copies
  uint64_t retention_s = 7 * 86400;
  PolicyKind policy = PolicyKind::kAuto;
  PolicyParams params;
  PriorityParams priority;
  double round_s = 0.1;                 // the shadow thread's round
  uint32_t stale_records = 16;          // records since the newest version that make it stale
  uint32_t restore_samples = 200;       // restore times sampled for the replay figures
  uint64_t seed = 1;
  uint32_t monitor_bucket_s = 60;
};

struct Result {
  std::string policy;
  uint64_t requests = 0, reads = 0, writes = 0;
  uint64_t segment_writes = 0;          // a write spanning k segments counts k
  uint64_t segment_reads = 0;
  uint64_t stalls = 0;                  // segment-writes that found no base
  uint64_t stall_bytes = 0;             // bytes copied on the write path
  double stalls_per_1k_writes = 0;      // per 1000 segment-writes
  uint64_t copies = 0;                  // bases copied ahead of need (background)
  uint64_t copied_bytes = 0;            // background copies: ahead of need and versions
  uint64_t copies_used = 0;             // copied-ahead bases later written
  uint64_t versions_made = 0;           // background versions of stale segments
  uint64_t speculative_hits = 0;        // writes that found a speculative base
  uint64_t speculative_evicted = 0;     // speculative bases given up for room
  uint64_t speculative_replaced = 0;    // of which for a copy ahead worth more
  uint64_t bases_freed = 0;             // freed as their segment left the window (none)
  uint64_t pool_capacity_bytes = 0;
  uint64_t pool_peak_bytes = 0;
  uint64_t history_shrinks = 0;         // times the window start was moved for room
  double replay_records_mean = 0;
  double replay_records_p99 = 0;
  uint64_t device_bytes = 0;
  uint32_t segment_bytes = 0;
  uint64_t budget_bytes_per_s = 0;
  uint64_t retention_s = 0;
  double trace_seconds = 0;             // span of the trace
  double sim_seconds = 0;               // wall time of the simulation
  uint64_t policy_memory_bytes = 0;     // the policy's state at the end
  uint64_t rounds = 0;
};

using Progress = std::function<void(uint64_t done, uint64_t total)>;

// Replays `reqs` (in time order; out-of-order times are clamped forward).
// Invalid options or requests beyond device_bytes: an error, nothing run.
shadowd::Result<Result> run(const std::vector<trace::Request>& reqs, const Options& opts,
                            const Progress& progress = nullptr);

}  // namespace shadowd::sim
