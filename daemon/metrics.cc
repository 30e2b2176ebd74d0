#include "daemon/metrics.h"

#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <utility>

#include <prometheus/client_metric.h>
#include <prometheus/collectable.h>
#include <prometheus/exposer.h>
#include <spdlog/spdlog.h>

#include "nbd/server.h"
#include "nbd/stats.h"
#include "version.h"

namespace shadowd {

namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

MetricFamily family(std::string name, std::string help, MetricType type) {
  MetricFamily f;
  f.name = std::move(name);
  f.help = std::move(help);
  f.type = type;
  return f;
}

ClientMetric sample(MetricType type, double value, std::vector<ClientMetric::Label> labels = {}) {
  ClientMetric m;
  m.label = std::move(labels);
  switch (type) {
    case MetricType::Counter: m.counter.value = value; break;
    case MetricType::Gauge: m.gauge.value = value; break;
    default: m.untyped.value = value; break;
  }
  return m;
}

// One family with a single unlabelled sample.
MetricFamily scalar(std::string name, std::string help, MetricType type, double value) {
  MetricFamily f = family(std::move(name), std::move(help), type);
  f.metric.push_back(sample(type, value));
  return f;
}

// One counter family with a sample per NBD command.
MetricFamily per_op(std::string name, std::string help,
                    const std::array<uint64_t, nbd::kStatOpCount>& values) {
  MetricFamily f = family(std::move(name), std::move(help), MetricType::Counter);
  for (size_t op = 0; op < nbd::kStatOpCount; ++op) {
    f.metric.push_back(sample(MetricType::Counter, static_cast<double>(values[op]),
                              {{"op", nbd::stat_op_name(static_cast<nbd::StatOp>(op))}}));
  }
  return f;
}

// The snapshot's histogram is per bucket; Prometheus wants cumulative counts.
// The count is the +Inf bucket, so _count and the buckets always agree even
// if the shards moved while the snapshot was taken.
MetricFamily latency_histogram(const nbd::StatsSnapshot& s) {
  MetricFamily f = family("shadowd_request_duration_seconds",
                          "Time from a request being parsed to its reply being queued",
                          MetricType::Histogram);
  ClientMetric m;
  uint64_t cumulative = 0;
  for (size_t i = 0; i < nbd::kLatencyBuckets; ++i) {
    cumulative += s.latency[i];
    ClientMetric::Bucket b;
    b.cumulative_count = cumulative;
    b.upper_bound = i + 1 < nbd::kLatencyBuckets ? nbd::latency_bound_seconds(i)
                                                 : std::numeric_limits<double>::infinity();
    m.histogram.bucket.push_back(b);
  }
  m.histogram.sample_count = cumulative;
  m.histogram.sample_sum = static_cast<double>(s.latency_sum_ns) * 1e-9;
  f.metric.push_back(std::move(m));
  return f;
}

}  // namespace

std::vector<MetricFamily> collect_metrics(const DaemonContext& ctx) {
  std::vector<MetricFamily> out;
  const auto G = MetricType::Gauge;
  const auto C = MetricType::Counter;

  {
    MetricFamily f = family("shadowd_build_info", "shadowd version (always 1)", G);
    f.metric.push_back(sample(G, 1, {{"version", SHADOWD_VERSION}}));
    out.push_back(std::move(f));
  }
  if (ctx.clock != nullptr) {
    const int64_t up = std::max<int64_t>(0, ctx.clock->now_s() - ctx.started_s);
    out.push_back(scalar("shadowd_uptime_seconds",
                         "Seconds since the daemon started (on the monitor's clock)", G,
                         static_cast<double>(up)));
  }
  if (ctx.export_ && ctx.export_->backend) {
    out.push_back(scalar("shadowd_export_size_bytes", "Size of the export in bytes", G,
                         static_cast<double>(ctx.export_->size_bytes())));
  }

  if (ctx.server != nullptr) {
    const nbd::StatsSnapshot s = ctx.server->stats();
    out.push_back(per_op("shadowd_requests_total", "NBD requests handled, by command",
                         s.requests));
    out.push_back(per_op("shadowd_request_bytes_total",
                         "Payload bytes moved by successful requests, by command", s.bytes));
    out.push_back(per_op("shadowd_request_errors_total",
                         "NBD requests answered with an error, by command", s.errors));
    out.push_back(latency_histogram(s));
    out.push_back(scalar("shadowd_connections_active", "Open client connections", G,
                         s.connections_open));
    out.push_back(scalar("shadowd_connections_total", "Client connections accepted", C,
                         static_cast<double>(s.connections_total)));
    MetricFamily tls = family("shadowd_tls_handshakes_total", "TLS handshakes, by result", C);
    tls.metric.push_back(sample(C, static_cast<double>(s.tls_handshakes), {{"result", "ok"}}));
    tls.metric.push_back(sample(C, static_cast<double>(s.tls_handshake_failures), {{"result", "failed"}}));
    out.push_back(std::move(tls));
  }

  if (ctx.monitor != nullptr) {
    const MonitorTotals t = ctx.monitor->totals();
    out.push_back(scalar("shadowd_segment_size_bytes", "Size of a monitored segment in bytes", G,
                         t.segment_bytes));
    out.push_back(scalar("shadowd_segments", "Segments tracked by the access monitor", G,
                         static_cast<double>(t.segments)));
    out.push_back(scalar("shadowd_segments_active",
                         "Segments with accesses in the longest rolling window", G,
                         static_cast<double>(t.segments_active)));
    out.push_back(scalar("shadowd_monitor_memory_bytes",
                         "Resident memory of the access monitor: per-segment state and history",
                         G, static_cast<double>(t.dense_bytes_resident + t.history_bytes)));
    out.push_back(scalar("shadowd_history_records", "Access history records kept in memory", G,
                         static_cast<double>(t.history_records)));
    out.push_back(scalar("shadowd_history_dropped_records_total",
                         "Access history records dropped by the memory bound", C,
                         static_cast<double>(t.history_dropped_records)));
  }

  if (ctx.store != nullptr) {
    const StoreStats st = ctx.store->stats();
    auto d = [](uint64_t v) { return static_cast<double>(v); };
    out.push_back(scalar("shadowd_cow_stalls_total",
                         "Writes that waited for a copy-on-first-write of their segment", C,
                         d(st.cow_stalls)));
    out.push_back(scalar("shadowd_history_degraded",
                         "1 while history is degraded (pool full or failing), else 0", G,
                         st.degraded ? 1 : 0));
    out.push_back(scalar("shadowd_retention_start_seconds",
                         "Oldest restorable time (Unix seconds)", G,
                         static_cast<double>(st.retention_start_ns) * 1e-9));
    out.push_back(scalar("shadowd_retention_shrinks_total",
                         "Times the restorable window was cut short for pool space", C,
                         d(st.retention_shrinks)));
    out.push_back(scalar("shadowd_journal_records", "Journal records in the restorable window",
                         G, d(st.journal_records)));
    out.push_back(scalar("shadowd_journal_bytes", "Stored (compressed) bytes of those records", G,
                         d(st.journal_bytes)));
    out.push_back(scalar("shadowd_versions", "Shadow versions kept", G, d(st.versions)));
    out.push_back(scalar("shadowd_version_bytes", "Stored (compressed) bytes of the versions", G,
                         d(st.version_bytes)));
    out.push_back(scalar("shadowd_pool_bytes_written_total",
                         "Bytes appended to the shadow pool since start", C,
                         d(st.pool_bytes_written)));
    out.push_back(scalar("shadowd_client_bytes_journaled_total",
                         "Client WRITE payload bytes journaled since start", C,
                         d(st.client_bytes_written)));
    MetricFamily zones = family("shadowd_pool_zones", "Pool zones by tier and state", G);
    for (const TierUse& t : st.tiers) {
      const std::string tier = std::to_string(t.tier);
      zones.metric.push_back(sample(G, d(t.zones_free), {{"tier", tier}, {"state", "free"}}));
      zones.metric.push_back(sample(G, d(t.zones - std::min(t.zones, t.zones_free)),
                                    {{"tier", tier}, {"state", "used"}}));
    }
    out.push_back(std::move(zones));
    out.push_back(scalar("shadowd_copies_ahead_total", "Segments given a base ahead of need", C,
                         d(st.copies_ahead)));
    out.push_back(scalar("shadowd_copies_ahead_bytes_total", "Bytes copied ahead of need", C,
                         d(st.copies_ahead_bytes)));
    out.push_back(scalar("shadowd_copies_ahead_used_total",
                         "Copies ahead of need later written (each saved a stall)", C,
                         d(st.copies_ahead_used)));
    out.push_back(scalar("shadowd_speculative_hits_total",
                         "Writes that found a speculative base (no copy on the write path)", C,
                         d(st.speculative_hits)));
    out.push_back(scalar("shadowd_speculative_misses_total",
                         "Writes that found no base and copied on the write path (= COW stalls)", C,
                         d(st.cow_stalls)));
    {
      MetricFamily bases = family("shadowd_bases", "Segments holding a base version, by kind", G);
      bases.metric.push_back(sample(G, d(st.bases_pinned), {{"kind", "pinned"}}));
      bases.metric.push_back(sample(G, d(st.bases_speculative), {{"kind", "speculative"}}));
      out.push_back(std::move(bases));
    }
    out.push_back(scalar("shadowd_bases_freed_total", "Bases freed as their segment left the window", C,
                         d(st.bases_freed)));
    {
      MetricFamily f = family("shadowd_tier_migrations_total", "Versions moved between pool tiers", C);
      f.metric.push_back(sample(C, d(st.versions_promoted), {{"to", "fast"}}));
      f.metric.push_back(sample(C, d(st.versions_demoted), {{"to", "slow"}}));
      out.push_back(std::move(f));
    }
    out.push_back(scalar("shadowd_speculative_dropped_total",
                         "Speculative bases given up for pool room or for a copy ahead worth more", C,
                         d(st.speculative_dropped)));
    out.push_back(scalar("shadowd_speculative_replaced_total",
                         "Speculative bases given up for a copy ahead worth more", C, d(st.speculative_replaced)));
    out.push_back(scalar("shadowd_policy_memory_bytes", "State held by the shadowing policy", G,
                         d(st.policy_memory_bytes)));
    {
      MetricFamily f = family("shadowd_forecast_error",
                              "Mean absolute error of each predictor's writes-per-minute forecast", G);
      for (const auto& e : st.forecast_errors) f.metric.push_back(sample(G, e.mae, {{"predictor", e.predictor}}));
      out.push_back(std::move(f));
    }
    {
      const Config c = [&] {
        std::lock_guard<std::mutex> lock(ctx.config_mu);
        return ctx.config;
      }();
      MetricFamily f = family("shadowd_tuned_value", "Values auto-tuning adjusts, as in use", G);
      const PolicyParams pp = ctx.store->policy_params();
      for (const auto& [k, v] : std::vector<std::pair<std::string, double>>{
               {"alpha", c.alpha}, {"beta", c.beta}, {"gamma", c.gamma}, {"baseline", c.baseline},
               {"min_value", pp.min_value}, {"horizon_s", pp.horizon_s},
               {"seq_ahead", static_cast<double>(pp.predict.seq_ahead)},
               {"frontier_ahead", static_cast<double>(pp.predict.frontier_ahead)},
               {"max_versions_per_segment", static_cast<double>(c.max_versions_per_segment)}}) {
        f.metric.push_back(sample(G, v, {{"name", k}}));
      }
      out.push_back(std::move(f));
      auto& t = const_cast<DaemonContext&>(ctx).tune;
      std::lock_guard<std::mutex> lock(t.mu);
      out.push_back(scalar("shadowd_tune_runs_total", "Auto-tuning runs since start", C, d(t.runs)));
    }
    out.push_back(scalar("shadowd_shadow_queue", "Segments waiting for a shadow version", G,
                         d(st.shadow_queue)));
    out.push_back(scalar("shadowd_shadow_budget_bytes_per_second",
                         "I/O budget of background shadowing (0: none)", G,
                         d(st.shadow_budget_bytes_per_s)));
    out.push_back(scalar("shadowd_shadow_busy_budget_bytes_per_second",
                         "Background shadowing budget while clients are doing I/O", G,
                         d(st.shadow_busy_budget_bytes_per_s)));
    out.push_back(scalar("shadowd_foreground_busy",
                         "1 while clients are doing I/O (shadowing at the busy budget)", G,
                         st.foreground_busy ? 1.0 : 0.0));
    out.push_back(scalar("shadowd_checkpoints_total", "Index checkpoints written since start", C,
                         d(st.checkpoints)));
    out.push_back(scalar("shadowd_pool_errors_total", "Shadow pool I/O errors since start", C,
                         d(st.pool_errors)));
    out.push_back(scalar("shadowd_primary_write_errors_total",
                         "Writes the backing refused (answered with its error) since start", C,
                         d(st.primary_write_errors)));
    out.push_back(scalar("shadowd_journal_corrections_total",
                         "Refused writes whose journal records were replaced by what the backing "
                         "read back",
                         C, d(st.journal_corrections)));
    out.push_back(scalar("shadowd_pool_full_waits_total",
                         "Times journal writes waited for retention to be cut (pool tier 0 full)", C,
                         d(st.pool_full_waits)));
    out.push_back(scalar("shadowd_pool_full_wait_seconds_total",
                         "Time journal writes spent waiting for room in the pool", C,
                         static_cast<double>(st.pool_full_wait_ns) / 1e9));
  }
  if (ctx.replica != nullptr) {
    const ReplicaStats r = ctx.replica->stats();
    auto d = [](uint64_t v) { return static_cast<double>(v); };
    out.push_back(scalar("shadowd_replica_in_sync",
                         "1 while the replica is the pool's and the primary's state at a flush", G,
                         r.state == ReplicaState::kInSync ? 1.0 : 0.0));
    out.push_back(scalar("shadowd_replica_lag_seconds",
                         "Age of the oldest write not yet on the replica (or time behind)", G,
                         r.lag_seconds));
    out.push_back(scalar("shadowd_replica_backlog_bytes", "Bytes queued for the replica", G,
                         d(r.backlog_bytes)));
    out.push_back(scalar("shadowd_replica_dirty_bytes",
                         "Bytes of 1 MiB chunks still to copy to the replica (syncing or behind)", G,
                         d(r.dirty_bytes)));
    out.push_back(scalar("shadowd_replica_shipped_bytes_total", "Bytes written to the replica", C,
                         d(r.shipped_bytes)));
    out.push_back(scalar("shadowd_replica_overflows_total",
                         "Times the replica's backlog overflowed and it fell behind", C,
                         d(r.overflows)));
    out.push_back(scalar("shadowd_replica_local_failures_total",
                         "Local device failures the replica saw: writes (their chunks are then copied) and reads of chunks to copy", C,
                         d(r.local_failures)));
    out.push_back(scalar("shadowd_replica_target_errors_total",
                         "Failed requests to the replica target (retried)", C, d(r.target_errors)));
    out.push_back(scalar("shadowd_replica_sync_lapses_total",
                         "Flushes completed without the replica after replica_max_lag_seconds", C,
                         d(r.sync_lapses)));
  }
  return out;
}

class MetricsEndpoint::Collector final : public prometheus::Collectable {
 public:
  explicit Collector(const DaemonContext& ctx) : ctx_(ctx) {}
  std::vector<MetricFamily> Collect() const override {
    // Runs on a civetweb thread: an exception must not escape into it.
    try {
      return collect_metrics(ctx_);
    } catch (const std::exception& e) {
      spdlog::warn("metrics: scrape failed: {}", e.what());
    } catch (...) {
      spdlog::warn("metrics: scrape failed");
    }
    return {};
  }

 private:
  const DaemonContext& ctx_;
};

namespace {

struct ListenAddr {
  std::string civet;  // civetweb listening_ports: "1.2.3.4:P" or "[v6]:P"
  std::string host;   // "1.2.3.4" or "[v6]"
  sockaddr_storage sa{};
  socklen_t sa_len = 0;
};

// "ADDR:PORT" -> the numeric form civetweb binds to exactly. civetweb's own
// syntax would also take a bare port (all interfaces), lists and suffixes;
// none of those get through here.
Result<ListenAddr> parse_listen(const std::string& listen) {
  std::string host;
  uint16_t port = 0;
  Status st = nbd::parse_host_port(listen, host, port);
  if (!st) return Status::invalid("metrics listen address: " + st.message());
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string port_s = std::to_string(port);
  const int rc = ::getaddrinfo(host.c_str(), port_s.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) {
    return Status::invalid("metrics listen address: cannot resolve '" + host +
                           "': " + ::gai_strerror(rc));
  }
  ListenAddr a;
  char buf[NI_MAXHOST];
  const int nrc = ::getnameinfo(res->ai_addr, res->ai_addrlen, buf, sizeof buf, nullptr, 0,
                                NI_NUMERICHOST);
  const bool v6 = res->ai_family == AF_INET6;
  std::memcpy(&a.sa, res->ai_addr, res->ai_addrlen);
  a.sa_len = res->ai_addrlen;
  ::freeaddrinfo(res);
  if (nrc != 0) {
    return Status::invalid("metrics listen address: '" + host + "': " + ::gai_strerror(nrc));
  }
  const std::string addr = buf;
  if (addr.find_first_of(",%") != std::string::npos) {
    return Status::invalid("metrics listen address: unsupported address '" + addr + "'");
  }
  a.host = v6 ? "[" + addr + "]" : addr;
  a.civet = a.host + ":" + port_s;
  return a;
}

// civetweb only says that it could not start; find out why binding fails.
std::string bind_error(const ListenAddr& a) {
  const int fd = ::socket(a.sa.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return std::strerror(errno);
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  std::string err;
  if (::bind(fd, reinterpret_cast<const sockaddr*>(&a.sa), a.sa_len) < 0) {
    err = std::strerror(errno);
  }
  ::close(fd);
  return err;
}

}  // namespace

MetricsEndpoint::MetricsEndpoint(DaemonContext& ctx) : ctx_(ctx) {}

MetricsEndpoint::~MetricsEndpoint() { stop(); }

Status MetricsEndpoint::start(const std::string& listen) {
  if (exposer_) return Status::invalid("metrics endpoint already running");
  Result<ListenAddr> addr = parse_listen(listen);
  if (!addr) return addr.status();
  try {
    // Two threads serve scrapes; a client that stalls is dropped after 10 s.
    auto exposer = std::make_unique<prometheus::Exposer>(std::vector<std::string>{
        "listening_ports", addr->civet, "num_threads", "2", "request_timeout_ms", "10000"});
    auto collector = std::make_shared<Collector>(ctx_);
    exposer->RegisterCollectable(collector, "/metrics");
    const std::vector<int> bound = exposer->GetListeningPorts();
    collector_ = std::move(collector);
    exposer_ = std::move(exposer);
    const std::string port = bound.empty() ? std::string("?") : std::to_string(bound[0]);
    url_ = "http://" + addr->host + ":" + port + "/metrics";
  } catch (const std::exception& e) {
    std::string why = bind_error(*addr);
    if (why.empty()) {
      why = e.what();
      // Debian 12's civetweb is built without IPv6.
      if (addr->sa.ss_family == AF_INET6) why += " (IPv6 needs a civetweb built with IPv6)";
    }
    return Status::io_error("cannot serve metrics on " + listen + ": " + why);
  } catch (...) {
    return Status::io_error("cannot serve metrics on " + listen);
  }
  return Status::ok();
}

void MetricsEndpoint::stop() {
  // Destroying the Exposer stops civetweb and joins its threads, so no
  // Collect() runs after this; the collector can go then.
  exposer_.reset();
  collector_.reset();
}

std::vector<int> MetricsEndpoint::ports() const {
  if (!exposer_) return {};
  try {
    return exposer_->GetListeningPorts();
  } catch (...) {
    return {};
  }
}

}  // namespace shadowd
