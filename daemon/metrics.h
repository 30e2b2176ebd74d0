// Prometheus metrics over HTTP (text exposition format 0.0.4), served by
// prometheus-cpp's Exposer on GET /metrics.
//
// Nothing is counted on the I/O path for this: at every scrape a Collectable
// reads fresh snapshots (Server::stats(), Monitor::totals()) and turns them
// into metric families, so the figures are exactly those of `shadowctl
// status`. Names are prefixed shadowd_, in base units (bytes, seconds),
// counters end in _total:
//
//   shadowd_requests_total{op}            counter  requests by NBD command
//   shadowd_request_bytes_total{op}       counter  payload bytes moved by command
//   shadowd_request_errors_total{op}      counter  requests answered with an error
//   shadowd_request_duration_seconds      histogram  request parsed -> reply queued
//   shadowd_connections_active            gauge    open client connections
//   shadowd_connections_total             counter  connections accepted
//   shadowd_export_size_bytes             gauge    size of the export
//   shadowd_uptime_seconds                gauge    since the daemon started (monitor clock)
//   shadowd_build_info{version}           gauge    always 1
// and, when the monitor is enabled:
//   shadowd_segment_size_bytes            gauge
//   shadowd_segments                      gauge    segments tracked
//   shadowd_segments_active               gauge    with accesses in the longest window
//   shadowd_monitor_memory_bytes          gauge    resident dense state + access history
//   shadowd_history_records               gauge    access history records kept
//   shadowd_history_dropped_records_total counter  dropped by the history bound
// and, when a shadow pool is configured (--pool):
//   shadowd_cow_stalls_total              counter  writes that waited for a copy-on-first-write
//   shadowd_history_degraded              gauge    1 while history is degraded, else 0
//   shadowd_retention_start_seconds       gauge    oldest restorable time, Unix seconds
//   shadowd_retention_shrinks_total       counter  window cut short for pool space
//   shadowd_journal_records               gauge    journal records in the window
//   shadowd_journal_bytes                 gauge    their stored (compressed) bytes
//   shadowd_versions                      gauge    shadow versions kept
//   shadowd_version_bytes                 gauge    their stored (compressed) bytes
//   shadowd_pool_bytes_written_total      counter  bytes appended to the pool
//   shadowd_client_bytes_journaled_total  counter  client WRITE payload bytes journaled
//   shadowd_pool_zones{tier,state}        gauge    zones, state "free" or "used"
//   shadowd_shadow_queue                  gauge    segments waiting for a version
//   shadowd_shadow_budget_bytes_per_second gauge   background shadowing budget (0: none)
//   shadowd_shadow_busy_budget_bytes_per_second gauge  that budget while clients do I/O
//   shadowd_foreground_busy               gauge   1 while clients are doing I/O
//   shadowd_checkpoints_total             counter  index checkpoints written
//   shadowd_pool_errors_total             counter  pool I/O errors
//
// op is one of read, write, flush, trim, write_zeroes, cache, block_status,
// other. prometheus-cpp adds its own exposer_* families (scrape count, bytes
// sent, scrape latency) to the same page.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <prometheus/metric_family.h>

#include "core/status.h"
#include "daemon/context.h"

namespace prometheus {
class Exposer;
}

namespace shadowd {

// The metric families for the daemon's current state. Reads ctx.server
// (skipped if null), ctx.export_, ctx.monitor and ctx.store (each skipped
// if null), ctx.clock.
// Thread-safe as long as those pointers do not change meanwhile.
std::vector<prometheus::MetricFamily> collect_metrics(const DaemonContext& ctx);

class MetricsEndpoint {
 public:
  // `ctx` must outlive this object (or at least stop()).
  explicit MetricsEndpoint(DaemonContext& ctx);
  ~MetricsEndpoint();  // stop()
  MetricsEndpoint(const MetricsEndpoint&) = delete;
  MetricsEndpoint& operator=(const MetricsEndpoint&) = delete;

  // Serve http://LISTEN/metrics. `listen` is ADDR:PORT or [ADDR6]:PORT
  // (an empty ADDR means 127.0.0.1; a host name is resolved to its first
  // address; port 0 picks a free port, see ports()). Binds exactly that one
  // address, nothing else. Never throws: a bind failure or a bad address is
  // an error Status and leaves nothing running.
  Status start(const std::string& listen);
  // Stop serving; waits for a scrape in progress. Idempotent.
  void stop();
  bool running() const { return exposer_ != nullptr; }
  // The TCP ports actually bound (after start()).
  std::vector<int> ports() const;
  // "http://ADDR:PORT/metrics" with the bound port (after start()).
  const std::string& url() const { return url_; }

 private:
  class Collector;
  DaemonContext& ctx_;
  std::shared_ptr<Collector> collector_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::string url_;
};

}  // namespace shadowd
