#include "daemon/commands.h"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <exception>
#include <initializer_list>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>

#include "core/clock.h"
#include "ctl/protocol.h"
#include "nbd/stats.h"
#include "version.h"

namespace shadowd {
namespace {

using json = nlohmann::json;
using ctl::ControlError;
namespace errc = ctl::errc;

constexpr uint64_t kTopMax = 10000;
constexpr uint64_t kHistoryPageMax = 50000;  // history records per reply
constexpr uint64_t kAdvanceMaxSeconds = 10ull * 366 * 86400;

constexpr uint64_t kVersionsPageMax = 10000;  // segments per `versions` reply
constexpr uint64_t kVersionsPageDefault = 1000;
constexpr int64_t kNsPerS = 1'000'000'000;

// The tunables config.set may change while the daemon runs: the monitor's,
// and with a shadow pool, the pool's.
constexpr const char* kMonitorRuntimeKeys[] = {
    "baseline", "alpha", "beta", "gamma", "scoring_window_seconds", "windows_seconds"};
constexpr const char* kPoolRuntimeKeys[] = {"retention_seconds", "shadow_budget_bytes_per_s"};

bool is_pool_runtime_key(std::string_view key) {
  for (const char* k : kPoolRuntimeKeys) {
    if (key == k) return true;
  }
  return false;
}

bool is_monitor_runtime_key(std::string_view key) {
  for (const char* k : kMonitorRuntimeKeys) {
    if (key == k) return true;
  }
  return false;
}

// Whether `key` may change at run time in this daemon (the pool's tunables
// only when there is a pool).
bool is_runtime_key(const DaemonContext& ctx, std::string_view key) {
  return is_monitor_runtime_key(key) || (ctx.store != nullptr && is_pool_runtime_key(key));
}

// Reads a request's arguments. The first problem is kept (later reads then
// return defaults), so a command reads everything and checks failed() once.
class Args {
 public:
  Args(const json& req, std::initializer_list<const char*> allowed) : req_(req) {
    for (auto it = req.begin(); it != req.end(); ++it) {
      const std::string& k = it.key();
      if (k == "version" || k == "cmd") continue;
      bool known = false;
      for (const char* a : allowed) known |= k == a;
      if (!known) {
        fail(errc::kInvalidArgument, "unknown argument '" + k + "' for '" + cmd() + "'");
        return;
      }
    }
  }

  bool failed() const { return err_.has_value(); }
  json error() const { return ctl::error_reply(*err_); }
  void fail(const char* code, std::string message) {
    if (!err_) err_ = ControlError{code, std::move(message)};
  }
  std::string cmd() const { return req_.value("cmd", std::string()); }
  const json* find(const char* key) const {
    auto it = req_.find(key);
    return it == req_.end() ? nullptr : &*it;
  }
  bool has(const char* key) const { return find(key) != nullptr; }

  // An unsigned integer in [lo, hi]; `def` when absent (required without).
  uint64_t uint(const char* key, uint64_t lo, uint64_t hi, std::optional<uint64_t> def) {
    const json* v = find(key);
    if (v == nullptr) {
      if (!def) fail(errc::kInvalidArgument, "'" + cmd() + "' needs argument '" + key + "'");
      return def.value_or(lo);
    }
    if (!v->is_number_integer()) {
      fail(errc::kInvalidArgument, std::string("'") + key + "' must be an integer");
      return def.value_or(lo);
    }
    const bool negative = v->is_number_unsigned() ? false : v->get<int64_t>() < 0;
    const uint64_t x = negative ? 0 : v->get<uint64_t>();
    if (negative || x < lo || x > hi) {
      fail(errc::kOutOfRange, std::string("'") + key + "' must be " + std::to_string(lo) + ".." +
                                  std::to_string(hi) + " (got " + v->dump() + ")");
      return def.value_or(lo);
    }
    return x;
  }

  // A string out of `options`; `def` when absent.
  std::string choice(const char* key, std::initializer_list<const char*> options, const char* def) {
    std::string list;
    for (const char* o : options) list += (list.empty() ? "" : "|") + std::string(o);
    const json* v = find(key);
    if (v == nullptr) return def;
    if (!v->is_string()) {
      fail(errc::kInvalidArgument, std::string("'") + key + "' must be a string: " + list);
      return def;
    }
    const std::string s = v->get<std::string>();
    for (const char* o : options) {
      if (s == o) return s;
    }
    fail(errc::kOutOfRange, std::string("'") + key + "' must be " + list + " (got \"" + s + "\")");
    return def;
  }

  // true or false; `def` when absent.
  bool flag(const char* key, bool def) {
    const json* v = find(key);
    if (v == nullptr) return def;
    if (!v->is_boolean()) {
      fail(errc::kInvalidArgument, std::string("'") + key + "' must be true or false");
      return def;
    }
    return v->get<bool>();
  }

  // Seconds, as an integer or a string such as "1h"; nullopt when absent.
  std::optional<uint32_t> duration(const char* key) {
    const json* v = find(key);
    if (v == nullptr) return std::nullopt;
    if (v->is_string()) {
      auto s = ctl::parse_duration_seconds(v->get<std::string>());
      if (!s) fail(errc::kInvalidArgument, std::string("'") + key + "': bad duration " + v->dump());
      return s;
    }
    const uint64_t x = uint(key, 1, UINT32_MAX, 1);
    return static_cast<uint32_t>(x);
  }

 private:
  const json& req_;
  std::optional<ControlError> err_;
};

int64_t now_s(const DaemonContext& ctx) {
  if (ctx.clock != nullptr) return ctx.clock->now_s();
  return static_cast<int64_t>(std::time(nullptr));
}

Config config_snapshot(const DaemonContext& ctx) {
  std::lock_guard<std::mutex> lock(ctx.config_mu);
  return ctx.config;
}

// The configuration with the key names of the config file.
json config_json(const Config& c) {
  return json{
      {"backing", c.backing},
      {"unix", c.unix_sockets},
      {"listen", c.listen},
      {"export_name", c.export_name},
      {"description", c.description},
      {"read_only", c.read_only},
      {"foreground", c.foreground},
      {"pidfile", c.pidfile},
      {"log_level", c.log_level},
      {"direct_io", c.direct_io},
      {"io_threads", c.io_threads},
      {"max_payload_bytes", c.max_payload_bytes},
      {"max_inflight_per_connection", c.max_inflight_per_connection},
      {"max_connections", c.max_connections},
      {"tls", c.tls_mode()},
      {"tls_certificates", c.tls_certificates},
      {"tls_verify_peer", c.tls_verify_peer},
      {"tls_psk", c.tls_psk},
      {"state_dir", c.state_dir},
      {"monitor", c.monitor},
      {"segment_size_bytes", c.segment_size_bytes},
      {"bucket_seconds", c.bucket_seconds},
      {"windows_seconds", c.windows_seconds},
      {"history_max_records", c.history_max_records},
      {"baseline", c.baseline},
      {"alpha", c.alpha},
      {"beta", c.beta},
      {"gamma", c.gamma},
      {"scoring_window_seconds", c.scoring_window_seconds},
      {"control", c.control},
      {"control_group", c.control_group},
      {"metrics_listen", c.metrics_listen},
      {"pool", c.pool},
      {"init", c.init},
      {"zone_size_bytes", c.zone_size_bytes},
      {"retention_seconds", c.retention_seconds},
      {"pool_max_bytes", c.pool_max_bytes},
      {"max_versions_per_segment", c.max_versions_per_segment},
      {"shadow_budget_bytes_per_s", c.shadow_budget_bytes_per_s},
      {"shadow_budget_busy_bytes_per_s", c.shadow_budget_busy_bytes_per_s},
      {"checkpoint_interval_s", c.checkpoint_interval_s},
      {"pool_full_wait_ms", c.pool_full_wait_ms},
      {"shadow_policy", c.shadow_policy},
      {"tune_interval_s", c.tune_interval_s},
  };
}

json window_json(const WindowStats& w) {
  return json{{"window_seconds", w.window_seconds},
              {"reads", w.reads},
              {"writes", w.writes},
              {"bytes_read", w.bytes_read},
              {"bytes_written", w.bytes_written},
              {"access_rate", w.access_rate},
              {"change_rate", w.change_rate}};
}

json segment_json(const SegmentReport& r) {
  json windows = json::array();
  for (const WindowStats& w : r.windows) windows.push_back(window_json(w));
  return json{{"id", r.id},
              {"offset", r.offset},
              {"length", r.length},
              {"last_access_s", r.last_access_s},
              {"last_write_s", r.last_write_s},
              {"priority", r.priority},
              {"windows", std::move(windows)}};
}

json priority_json(const PriorityParams& p) {
  return json{{"baseline", p.baseline},
              {"alpha", p.alpha},
              {"beta", p.beta},
              {"gamma", p.gamma},
              {"scoring_window_seconds", p.scoring_window_seconds}};
}

json unavailable_monitor() {
  return ctl::error_reply(errc::kUnavailable,
                          "access monitoring is off (shadowd runs with --no-monitor)");
}

json unavailable_pool() {
  return ctl::error_reply(errc::kUnavailable,
                          "no shadow pool configured (start shadowd with --pool)");
}

// ------------------------------------------------------------ shadow pool

// Nanoseconds since the Unix epoch as ISO 8601 UTC, exact: the fraction of
// a second has as many digits as it needs ("2026-11-25T10:00:00.25Z").
std::string iso_utc_ns(int64_t ns) {
  int64_t s = ns / kNsPerS;
  int64_t frac = ns % kNsPerS;
  if (frac < 0) {
    frac += kNsPerS;
    --s;
  }
  const time_t t = static_cast<time_t>(s);
  tm utc;
  gmtime_r(&t, &utc);
  char buf[64];
  size_t n = std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &utc);
  std::string out(buf, n);
  if (frac != 0) {
    std::snprintf(buf, sizeof buf, ".%09lld", static_cast<long long>(frac));
    std::string f = buf;
    while (f.back() == '0') f.pop_back();
    out += f;
  }
  return out + "Z";
}

// A time for a reply: ISO string, or null for "never" (0).
json iso_or_null(int64_t ns) { return ns == 0 ? json(nullptr) : json(iso_utc_ns(ns)); }

std::string hex64(uint64_t v) {
  char buf[20];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// a / b, or null when b is 0 (no data yet).
json ratio(uint64_t a, uint64_t b) {
  return b == 0 ? json(nullptr) : json(static_cast<double>(a) / static_cast<double>(b));
}

const char* zone_kind_name(pool::ZoneKind k) {
  switch (k) {
    case pool::ZoneKind::kFree: return "free";
    case pool::ZoneKind::kJournal: return "journal";
    case pool::ZoneKind::kVersions: return "versions";
    case pool::ZoneKind::kCheckpoint: return "checkpoint";
    case pool::ZoneKind::kHistory: return "history";
  }
  return "unknown";
}

json tier_json(const TierUse& t) {
  const uint64_t capacity = t.zones * t.zone_bytes;
  const double util =
      capacity == 0 ? 0.0
                    : 100.0 * static_cast<double>(t.bytes_used) / static_cast<double>(capacity);
  return json{{"tier", t.tier},
              {"path", t.path},
              {"zones", t.zones},
              {"zones_free", t.zones_free},
              {"zones_used", t.zones - std::min(t.zones, t.zones_free)},
              {"zone_bytes", t.zone_bytes},
              {"capacity_bytes", capacity},
              {"bytes_used", t.bytes_used},
              {"utilisation_percent", util},
              {"versions", t.versions},
              {"version_bytes", t.version_bytes}};
}

// The restorable window and what holds it (`history`).
json history_json(const StoreStats& st, const Config& cfg, int64_t now_ns) {
  json tiers = json::array();
  for (const TierUse& t : st.tiers) tiers.push_back(tier_json(t));
  const int64_t span_ns = std::max<int64_t>(0, st.newest_ns - st.retention_start_ns);
  return json{{"from_ns", st.retention_start_ns},
              {"to_ns", st.newest_ns},
              {"from", iso_utc_ns(st.retention_start_ns)},
              {"to", iso_utc_ns(st.newest_ns)},
              {"span_seconds", span_ns / kNsPerS},
              {"first_seq", st.first_seq},
              {"last_seq", st.last_seq},
              {"epoch_ns", st.epoch_ns},
              {"epoch", iso_utc_ns(st.epoch_ns)},
              {"now_ns", now_ns},
              {"retention_seconds", cfg.retention_seconds},
              {"retention_shrunk", st.retention_shrunk},
              {"retention_shrinks", st.retention_shrinks},
              {"journal_records", st.journal_records},
              {"journal_bytes", st.journal_bytes},
              {"journal_raw_bytes", st.journal_raw_bytes},
              {"versions", st.versions},
              {"version_bytes", st.version_bytes},
              {"version_raw_bytes", st.version_raw_bytes},
              {"segments_with_history", st.segments_with_history},
              {"segment_bytes", st.segment_bytes},
              {"tiers", std::move(tiers)},
              {"degraded", st.degraded},
              {"degraded_reason", st.degraded_reason}};
}

// The "shadow" object of `status`.
json shadow_status(const DaemonContext& ctx, const Config& cfg) {
  if (ctx.store == nullptr) return json{{"enabled", false}};
  const StoreStats st = ctx.store->stats();
  json pool = json::array();
  for (const TierUse& t : st.tiers) pool.push_back(t.path);
  return json{{"enabled", true},
              {"pool", std::move(pool)},
              {"budget_bytes_per_s", st.shadow_budget_bytes_per_s},
              {"busy_budget_bytes_per_s", st.shadow_busy_budget_bytes_per_s},
              {"foreground_busy", st.foreground_busy},
              {"queue", st.shadow_queue},
              {"bytes_read", st.shadow_bytes_read},
              {"versions_made", st.versions_made},
              {"cow_stalls", st.cow_stalls},
              {"policy", st.policy},
              {"copies_ahead", st.copies_ahead},
              {"copies_ahead_bytes", st.copies_ahead_bytes},
              {"copies_ahead_used", st.copies_ahead_used},
              {"speculative_hits", st.speculative_hits},
              {"speculative_dropped", st.speculative_dropped},
              {"speculative_replaced", st.speculative_replaced},
              {"bases_freed", st.bases_freed},
              {"versions_promoted", st.versions_promoted},
              {"versions_demoted", st.versions_demoted},
              {"bases_pinned", st.bases_pinned},
              {"bases_speculative", st.bases_speculative},
              {"access_events_dropped", st.access_events_dropped},
              {"policy_memory_bytes", st.policy_memory_bytes},
              {"forecast_error", [&] {
                 json e = json::object();
                 for (const auto& f : st.forecast_errors) {
                   e[f.predictor] = {{"mae_writes_per_minute", f.mae}, {"samples", f.samples}};
                 }
                 return e;
               }()},
              {"degraded", st.degraded},
              {"degraded_reason", st.degraded_reason},
              {"from_ns", st.retention_start_ns},
              {"to_ns", st.newest_ns},
              {"from", iso_utc_ns(st.retention_start_ns)},
              {"to", iso_utc_ns(st.newest_ns)},
              {"retention_seconds", cfg.retention_seconds},
              {"retention_shrunk", st.retention_shrunk},
              {"checkpoints", st.checkpoints},
              {"last_checkpoint_ns", st.last_checkpoint_ns},
              {"last_checkpoint", iso_or_null(st.last_checkpoint_ns)}};
}

json version_json(const VersionInfo& v) {
  return json{{"seq", v.seq},
              {"time_ns", v.time_ns},
              {"time", iso_utc_ns(v.time_ns)},
              {"tier", v.tier},
              {"zone", v.zone},
              {"offset", v.offset},
              {"stored_bytes", v.stored_bytes},
              {"depth", v.depth},
              {"kind", v.depth == 0 ? "full" : "delta"},
              {"base_seq", v.base_seq},
              {"checksum", hex64(v.content_xxh)},
              {"cow", v.cow}};
}

// One segment's history in full (`versions segment=...`).
json segment_history_json(const SegmentHistory& h, uint32_t segment_bytes) {
  json versions = json::array();
  for (const VersionInfo& v : h.versions) versions.push_back(version_json(v));
  return json{{"id", h.segment},
              {"offset", h.segment * segment_bytes},
              {"length", segment_bytes},
              {"records", h.records},
              {"first_record_seq", h.first_record_seq},
              {"last_record_seq", h.last_record_seq},
              {"first_record_ns", h.first_record_ns},
              {"last_record_ns", h.last_record_ns},
              {"first_record", iso_or_null(h.first_record_ns)},
              {"last_record", iso_or_null(h.last_record_ns)},
              {"versions", std::move(versions)}};
}

// One row of the segment list (`versions` without a segment).
json segment_summary_json(const SegmentHistory& h, uint32_t segment_bytes) {
  uint64_t stored = 0;
  for (const VersionInfo& v : h.versions) stored += v.stored_bytes;
  const int64_t oldest = h.versions.empty() ? 0 : h.versions.front().time_ns;
  const int64_t newest = h.versions.empty() ? 0 : h.versions.back().time_ns;
  return json{{"id", h.segment},
              {"offset", h.segment * segment_bytes},
              {"versions", h.versions.size()},
              {"version_bytes", stored},
              {"oldest_version_ns", oldest},
              {"newest_version_ns", newest},
              {"oldest_version", iso_or_null(oldest)},
              {"newest_version", iso_or_null(newest)},
              {"records", h.records},
              {"last_record_ns", h.last_record_ns},
              {"last_record", iso_or_null(h.last_record_ns)}};
}

// "#ID", or an offset with an optional binary suffix ("3M", "4KiB"; whole
// numbers only). Sets exactly one of id/offset; false if malformed.
bool parse_segment_target(const std::string& s, std::optional<uint64_t>& id,
                          std::optional<uint64_t>& offset) {
  const bool is_id = !s.empty() && s[0] == '#';
  size_t pos = is_id ? 1 : 0;
  const size_t digits_start = pos;
  uint64_t n = 0;
  while (pos < s.size() && s[pos] >= '0' && s[pos] <= '9') {
    const uint64_t d = static_cast<uint64_t>(s[pos] - '0');
    if (n > (UINT64_MAX - d) / 10) return false;
    n = n * 10 + d;
    ++pos;
  }
  if (pos == digits_start) return false;
  if (is_id) {
    if (pos != s.size()) return false;
    id = n;
    return true;
  }
  std::string_view suffix(s.data() + pos, s.size() - pos);
  int shift = 0;
  if (!suffix.empty()) {
    static const char kUnits[] = "KMGTPE";
    const char c = static_cast<char>(std::toupper(static_cast<unsigned char>(suffix[0])));
    const char* u = c == '\0' ? nullptr : std::strchr(kUnits, c);
    if (u == nullptr) return false;
    shift = 10 * static_cast<int>(u - kUnits + 1);
    suffix.remove_prefix(1);
    if (!suffix.empty() && suffix != "iB" && suffix != "B") return false;
  }
  if (shift > 0 && n > (UINT64_MAX >> shift)) return false;
  offset = n << shift;
  return true;
}

// ---------------------------------------------------------------- commands

json cmd_version(DaemonContext&, const json& req) {
  Args a(req, {});
  if (a.failed()) return a.error();
  return ctl::ok_reply(
      {{"daemon_version", SHADOWD_VERSION}, {"protocol_version", ctl::kControlProtocolVersion}});
}

json ops_json(const nbd::StatsSnapshot& s) {
  json ops = json::object();
  for (size_t i = 0; i < nbd::kStatOpCount; ++i) {
    ops[nbd::stat_op_name(static_cast<nbd::StatOp>(i))] = {
        {"requests", s.requests[i]}, {"bytes", s.bytes[i]}, {"errors", s.errors[i]}};
  }
  return ops;
}

json monitor_status(const DaemonContext& ctx, const Config& cfg) {
  if (ctx.monitor == nullptr) return json{{"enabled", false}};
  const MonitorTotals t = ctx.monitor->totals();
  const double per_segment =
      t.segments == 0 ? 0.0 : static_cast<double>(t.dense_bytes_resident) / t.segments;
  return json{{"enabled", true},
              {"segments", t.segments},
              {"segments_active", t.segments_active},
              {"dense_bytes_virtual", t.dense_bytes_virtual},
              {"dense_bytes_resident", t.dense_bytes_resident},
              {"bytes_per_segment_resident", per_segment},
              {"history_records", t.history_records},
              {"history_bytes", t.history_bytes},
              {"history_dropped_records", t.history_dropped_records},
              {"oldest_history_s", t.oldest_history_s},
              {"windows_truncated", t.windows_truncated},
              {"started_s", t.started_s},
              {"bucket_seconds", cfg.bucket_seconds},
              {"windows_seconds", cfg.windows_seconds},
              {"priority", priority_json(ctx.monitor->priority())}};
}

// The "replica" object of `status`: null without --replica.
json replica_status(const DaemonContext& ctx) {
  if (ctx.replica == nullptr) return nullptr;
  const ReplicaStats st = ctx.replica->stats();
  return {{"target", ctx.replica->target_name()},
          {"state", replica_state_name(st.state)},
          {"sync", st.sync},
          {"lag_seconds", st.lag_seconds},
          {"lag_p50_seconds", st.lag_p50_seconds},
          {"lag_p99_seconds", st.lag_p99_seconds},
          {"backlog_bytes", st.backlog_bytes},
          {"backlog_entries", st.backlog_entries},
          {"dirty_bytes", st.dirty_bytes},
          {"shipped_bytes", st.shipped_bytes},
          {"copied_bytes", st.copied_bytes},
          {"epochs", st.epochs},
          {"overflows", st.overflows},
          {"local_failures", st.local_failures},
          {"target_errors", st.target_errors},
          {"sync_lapses", st.sync_lapses},
          {"last_error", st.last_error},
          {"in_sync_since_ns", st.in_sync_since_ns},
          {"in_sync_since", st.in_sync_since_ns != 0 ? iso_utc_ns(st.in_sync_since_ns) : ""}};
}

json cmd_status(DaemonContext& ctx, const json& req) {
  Args a(req, {});
  if (a.failed()) return a.error();
  const Config cfg = config_snapshot(ctx);
  const int64_t now = now_s(ctx);
  const nbd::Export* exp = ctx.export_.get();
  const uint64_t size = exp != nullptr ? exp->size_bytes() : 0;
  const uint32_t seg = ctx.monitor ? ctx.monitor->segment_bytes() : cfg.segment_size_bytes;
  json r;
  r["export"] = {{"name", exp ? exp->name : cfg.export_name},
                 {"description", exp ? exp->description : cfg.description},
                 {"size_bytes", size},
                 {"read_only", exp ? exp->read_only : cfg.read_only},
                 {"backing", cfg.backing}};
  r["segment_bytes"] = seg;
  r["segments"] = ctx.monitor ? ctx.monitor->segment_count() : (size + seg - 1) / seg;
  nbd::StatsSnapshot stats;
  json endpoints = json::array();
  if (ctx.server != nullptr) {
    stats = ctx.server->stats();
    stats.connections_open = ctx.server->connections_open();
    stats.connections_total = ctx.server->connections_total();
    for (const auto& e : ctx.server->endpoints()) endpoints.push_back(e);
  }
  r["endpoints"] = std::move(endpoints);
  r["connections"] = {{"open", stats.connections_open}, {"total", stats.connections_total}};
  r["tls"] = {{"mode", ctx.tls ? std::string(nbd::tls_mode_name(ctx.tls->mode())) : "off"},
              {"credentials", ctx.tls ? ctx.tls->describe() : ""},
              {"handshakes", stats.tls_handshakes},
              {"handshake_failures", stats.tls_handshake_failures}};
  r["ops"] = ops_json(stats);
  r["latency"] = {{"count", stats.latency_count},
                  {"sum_seconds", static_cast<double>(stats.latency_sum_ns) * 1e-9}};
  r["started_s"] = ctx.started_s;
  r["now_s"] = now;
  r["uptime_seconds"] = std::max<int64_t>(0, now - ctx.started_s);
  r["monitor"] = monitor_status(ctx, cfg);
  r["shadow"] = shadow_status(ctx, cfg);
  r["replica"] = replica_status(ctx);
  return ctl::ok_reply(std::move(r));
}

// The window argument of `top`: one of the configured windows.
std::optional<uint32_t> window_arg(Args& a, const DaemonContext& ctx, uint32_t def) {
  const std::optional<uint32_t> w = a.duration("window");
  if (a.failed() || !w) return def;
  const Config cfg = config_snapshot(ctx);
  const auto& ws = cfg.windows_seconds;
  if (std::find(ws.begin(), ws.end(), *w) != ws.end()) return *w;
  std::string list;
  for (uint32_t s : ws) list += (list.empty() ? "" : ", ") + std::to_string(s);
  a.fail(errc::kOutOfRange,
         "window " + std::to_string(*w) + " s is not configured (windows: " + list + ")");
  return def;
}

json cmd_top(DaemonContext& ctx, const json& req) {
  if (ctx.monitor == nullptr) return unavailable_monitor();
  Args a(req, {"n", "by", "window"});
  const uint64_t n = a.uint("n", 1, kTopMax, 10);
  const std::string by = a.choice("by", {"priority", "reads", "writes"}, "priority");
  const uint32_t window = *window_arg(a, ctx, ctx.monitor->priority().scoring_window_seconds);
  if (a.failed()) return a.error();
  const TopBy key = by == "reads"    ? TopBy::kReads
                    : by == "writes" ? TopBy::kWrites
                                     : TopBy::kPriority;
  auto top = ctx.monitor->top(n, key, window);
  if (!top) return ctl::error_reply(errc::kOutOfRange, top.status().message());
  json segments = json::array();
  for (const SegmentReport& r : *top) {
    json s = segment_json(r);
    for (const WindowStats& w : r.windows) {
      if (w.window_seconds != window) continue;
      json flat = window_json(w);
      for (auto it = flat.begin(); it != flat.end(); ++it) s[it.key()] = it.value();
    }
    segments.push_back(std::move(s));
  }
  return ctl::ok_reply({{"by", by},
                        {"n", n},
                        {"window_seconds", window},
                        {"segment_bytes", ctx.monitor->segment_bytes()},
                        {"now_s", now_s(ctx)},
                        {"segments", std::move(segments)}});
}

json cmd_segment(DaemonContext& ctx, const json& req) {
  if (ctx.monitor == nullptr) return unavailable_monitor();
  Args a(req, {"offset", "id"});
  const Monitor& m = *ctx.monitor;
  const uint64_t count = m.segment_count();
  uint64_t id = 0;
  if (a.has("offset") == a.has("id")) {
    a.fail(errc::kInvalidArgument, "'segment' needs exactly one of 'offset' (bytes) or 'id'");
  } else if (a.has("id")) {
    id = a.uint("id", 0, count == 0 ? 0 : count - 1, std::nullopt);
    if (count == 0) a.fail(errc::kOutOfRange, "the export has no segments");
  } else {
    const uint64_t size = m.config().device_bytes;
    const uint64_t offset = a.uint("offset", 0, UINT64_MAX, std::nullopt);
    if (!a.failed() && offset >= size) {
      a.fail(errc::kOutOfRange, "offset " + std::to_string(offset) +
                                    " is past the end of the export (" + std::to_string(size) +
                                    " bytes)");
    }
    id = offset / m.segment_bytes();
  }
  if (a.failed()) return a.error();
  return ctl::ok_reply({{"segment_bytes", m.segment_bytes()},
                        {"now_s", now_s(ctx)},
                        {"segment", segment_json(m.segment(id))}});
}

json cmd_config_get(DaemonContext& ctx, const json& req) {
  Args a(req, {"key"});
  const json* key = a.find("key");
  if (key != nullptr && !key->is_string()) a.fail(errc::kInvalidArgument, "'key' must be a string");
  if (a.failed()) return a.error();
  const json all = config_json(config_snapshot(ctx));
  json runtime = json::array();
  for (const char* k : kMonitorRuntimeKeys) runtime.push_back(k);
  if (ctx.store != nullptr) {
    for (const char* k : kPoolRuntimeKeys) runtime.push_back(k);
  }
  if (key == nullptr) return ctl::ok_reply({{"config", all}, {"runtime_keys", runtime}});
  const std::string k = key->get<std::string>();
  auto it = all.find(k);
  if (it == all.end())
    return ctl::error_reply(errc::kInvalidArgument, "unknown config key '" + k + "'");
  return ctl::ok_reply({{"key", k}, {"value", *it}, {"runtime", is_runtime_key(ctx, k)}});
}

// ------------------------------------------------------------ shadow pool

json cmd_history(DaemonContext& ctx, const json& req) {
  if (ctx.store == nullptr) return unavailable_pool();
  Args a(req, {});
  if (a.failed()) return a.error();
  const Config cfg = config_snapshot(ctx);
  const int64_t now = ctx.clock != nullptr ? ctx.clock->now_ns() : 0;
  return ctl::ok_reply(history_json(ctx.store->stats(), cfg, now));
}

json cmd_versions(DaemonContext& ctx, const json& req) {
  if (ctx.store == nullptr) return unavailable_pool();
  Args a(req, {"segment", "first", "limit"});
  const uint32_t seg_bytes = ctx.store->segment_bytes();
  if (seg_bytes == 0) return ctl::error_reply(errc::kInternal, "the pool reports no segment size");
  const uint64_t size = ctx.export_ ? ctx.export_->size_bytes() : 0;
  const uint64_t count = seg_bytes == 0 ? 0 : (size + seg_bytes - 1) / seg_bytes;
  const json* target = a.find("segment");
  if (target != nullptr) {
    if (a.has("first") || a.has("limit")) {
      a.fail(errc::kInvalidArgument,
             "'first' and 'limit' page the list of segments: not with 'segment'");
    }
    std::optional<uint64_t> id, offset;
    if (target->is_number_unsigned()) {
      offset = target->get<uint64_t>();
    } else if (target->is_number_integer()) {
      a.fail(errc::kOutOfRange, "'segment' must not be negative (got " + target->dump() + ")");
    } else if (!target->is_string() ||
               !parse_segment_target(target->get<std::string>(), id, offset)) {
      a.fail(errc::kInvalidArgument,
             "'segment' must be \"#ID\" or an offset in bytes (e.g. 3145728, \"3M\"), got " +
                 target->dump());
    }
    if (!a.failed() && offset && *offset >= size) {
      a.fail(errc::kOutOfRange, "offset " + std::to_string(*offset) +
                                    " is past the end of the export (" + std::to_string(size) +
                                    " bytes)");
    }
    if (!a.failed() && id && *id >= count) {
      a.fail(errc::kOutOfRange, "segment #" + std::to_string(*id) +
                                    " does not exist (the export has " + std::to_string(count) +
                                    " segments, #0..#" +
                                    std::to_string(count == 0 ? 0 : count - 1) + ")");
    }
    if (a.failed()) return a.error();
    const uint64_t sid = id ? *id : *offset / seg_bytes;
    std::optional<SegmentHistory> h = ctx.store->segment(sid);
    SegmentHistory empty;
    empty.segment = sid;
    return ctl::ok_reply({{"segment_bytes", seg_bytes},
                          {"segment", segment_history_json(h ? *h : empty, seg_bytes)}});
  }
  const uint64_t first = a.uint("first", 0, UINT64_MAX, 0);
  const uint64_t limit = a.uint("limit", 1, kVersionsPageMax, kVersionsPageDefault);
  if (a.failed()) return a.error();
  std::vector<SegmentHistory> page = ctx.store->segments(first, static_cast<size_t>(limit) + 1);
  const bool more = page.size() > limit;
  if (more) page.resize(limit);
  json segments = json::array();
  for (const SegmentHistory& h : page) segments.push_back(segment_summary_json(h, seg_bytes));
  json r = {{"segment_bytes", seg_bytes},
            {"segments_with_history", ctx.store->stats().segments_with_history},
            {"first", first},
            {"segments", std::move(segments)},
            {"more", more}};
  if (more) r["next"] = {{"first", page.back().segment + 1}};
  return ctl::ok_reply(std::move(r));
}

json cmd_pool(DaemonContext& ctx, const json& req) {
  if (ctx.store == nullptr) return unavailable_pool();
  Args a(req, {"zones"});
  const bool list_zones = a.flag("zones", false);
  if (a.failed()) return a.error();
  const StoreStats st = ctx.store->stats();
  const std::vector<ZoneInfo> zones = ctx.store->zones();

  json tiers = json::array();
  uint64_t capacity = 0, used = 0;
  for (const TierUse& t : st.tiers) {
    json tj = tier_json(t);
    json by_kind = json::object();
    for (const char* k : {"free", "journal", "versions", "checkpoint", "history"}) by_kind[k] = 0;
    uint64_t open = 0;
    for (const ZoneInfo& z : zones) {
      if (z.tier != t.tier) continue;
      by_kind[zone_kind_name(z.kind)] = by_kind[zone_kind_name(z.kind)].get<uint64_t>() + 1;
      open += z.open ? 1 : 0;
    }
    tj["zones_by_kind"] = std::move(by_kind);
    tj["zones_open"] = open;
    capacity += t.zones * t.zone_bytes;
    used += t.bytes_used;
    tiers.push_back(std::move(tj));
  }
  json r = {
      {"tiers", std::move(tiers)},
      {"capacity_bytes", capacity},
      {"bytes_used", used},
      {"utilisation_percent",
       capacity == 0 ? 0.0 : 100.0 * static_cast<double>(used) / static_cast<double>(capacity)},
      {"version_bytes", st.version_bytes},
      {"version_raw_bytes", st.version_raw_bytes},
      {"version_compression", ratio(st.version_raw_bytes, st.version_bytes)},
      {"journal_bytes", st.journal_bytes},
      {"journal_raw_bytes", st.journal_raw_bytes},
      {"journal_compression", ratio(st.journal_raw_bytes, st.journal_bytes)},
      {"pool_bytes_written", st.pool_bytes_written},
      {"client_bytes_written", st.client_bytes_written},
      {"pool_bytes_per_client_byte", ratio(st.pool_bytes_written, st.client_bytes_written)},
      {"group_commits", st.group_commits},
      {"group_commits_overlapped", st.group_commits_overlapped},
      {"zones_reclaimed", st.zones_reclaimed},
      {"records_pruned", st.records_pruned},
      {"versions_dropped", st.versions_dropped},
      {"versions_folded", st.versions_folded},
      {"retention_shrinks", st.retention_shrinks},
      {"checkpoints", st.checkpoints},
      {"last_checkpoint_ns", st.last_checkpoint_ns},
      {"last_checkpoint", iso_or_null(st.last_checkpoint_ns)},
      {"pool_errors", st.pool_errors},
      {"primary_write_errors", st.primary_write_errors},
      {"journal_corrections", st.journal_corrections},
      {"pool_full_waits", st.pool_full_waits},
      {"pool_full_wait_seconds", static_cast<double>(st.pool_full_wait_ns) / 1e9},
      {"degraded", st.degraded},
      {"degraded_reason", st.degraded_reason},
      {"now_ns", ctx.clock != nullptr ? ctx.clock->now_ns() : 0},
  };
  if (list_zones) {
    json list = json::array();
    for (const ZoneInfo& z : zones) {
      list.push_back({{"tier", z.tier},
                      {"index", z.index},
                      {"kind", zone_kind_name(z.kind)},
                      {"gen", z.gen},
                      {"used_bytes", z.used_bytes},
                      {"live_entries", z.live_entries},
                      {"open", z.open}});
    }
    r["zones"] = std::move(list);
  }
  return ctl::ok_reply(std::move(r));
}

}  // namespace

Status apply_runtime_config(DaemonContext& ctx, const Config& next) {
  if (ctx.monitor != nullptr) {
    Status st = Status::ok();
    if (next.windows_seconds != ctx.config.windows_seconds) {
      st = ctx.monitor->set_windows(next.windows_seconds);  // rebuilds from history
    }
    if (st) st = ctx.monitor->set_priority(priority_params(next));
    if (!st) return st;
  }
  // The pool's setters cannot fail: applied last, so an error above leaves
  // them untouched.
  if (ctx.store != nullptr) {
    if (next.shadow_budget_bytes_per_s != ctx.config.shadow_budget_bytes_per_s) {
      ctx.store->set_budget(next.shadow_budget_bytes_per_s);
    }
    if (next.retention_seconds != ctx.config.retention_seconds) {
      ctx.store->set_retention(next.retention_seconds);
    }
  }
  ctx.config.baseline = next.baseline;
  ctx.config.alpha = next.alpha;
  ctx.config.beta = next.beta;
  ctx.config.gamma = next.gamma;
  ctx.config.scoring_window_seconds = next.scoring_window_seconds;
  ctx.config.windows_seconds = next.windows_seconds;
  ctx.config.shadow_budget_bytes_per_s = next.shadow_budget_bytes_per_s;
  ctx.config.retention_seconds = next.retention_seconds;
  return Status::ok();
}

std::vector<std::string> start_time_changes(const Config& running, const Config& next) {
  const json a = config_json(running);
  const json b = config_json(next);
  std::vector<std::string> keys;
  for (auto it = a.begin(); it != a.end(); ++it) {
    if (is_monitor_runtime_key(it.key()) || is_pool_runtime_key(it.key())) continue;
    auto other = b.find(it.key());
    if (other == b.end() || *other != it.value()) keys.push_back(it.key());
  }
  return keys;
}

namespace {

json cmd_config_set(DaemonContext& ctx, const json& req) {
  Args a(req, {"key", "value"});
  const json* key = a.find("key");
  const json* value = a.find("value");
  if (key == nullptr || value == nullptr) {
    a.fail(errc::kInvalidArgument, "'config.set' needs 'key' and 'value'");
  } else if (!key->is_string()) {
    a.fail(errc::kInvalidArgument, "'key' must be a string");
  }
  if (a.failed()) return a.error();
  const std::string k = key->get<std::string>();
  if (is_pool_runtime_key(k) && ctx.store == nullptr) return unavailable_pool();
  if (!is_runtime_key(ctx, k)) {
    const json all = config_json(config_snapshot(ctx));
    if (all.contains(k)) {
      return ctl::error_reply(errc::kInvalidArgument,
                              "'" + k +
                                  "' cannot be changed at run time (edit the config file "
                                  "and restart shadowd)");
    }
    return ctl::error_reply(errc::kInvalidArgument, "unknown config key '" + k + "'");
  }
  if (is_monitor_runtime_key(k) && ctx.monitor == nullptr) return unavailable_monitor();
  std::lock_guard<std::mutex> lock(ctx.config_mu);
  Config next = ctx.config;
  Status st = merge_config_json(json{{k, *value}}.dump(), next);
  if (!st) return ctl::error_reply(errc::kInvalidArgument, st.message());
  st = next.validate();
  const json previous = config_json(ctx.config)[k];
  if (st) st = apply_runtime_config(ctx, next);
  if (!st) return ctl::error_reply(errc::kOutOfRange, st.message());
  // The ranking the shadowing thread reads follows at once.
  if (ctx.monitor != nullptr && is_monitor_runtime_key(k)) ctx.monitor->rescore();
  return ctl::ok_reply({{"key", k}, {"value", config_json(ctx.config)[k]}, {"previous", previous}});
}

// One row per operation with a nonzero count.
template <typename Fn>
void for_each_row(const HistoryRecord& r, Fn fn) {
  if (r.reads != 0) fn("read", r.reads, r.bytes_read);
  if (r.writes != 0) fn("write", r.writes, r.bytes_written);
}

json cmd_history_export(DaemonContext& ctx, const json& req) {
  if (ctx.monitor == nullptr) return unavailable_monitor();
  Args a(req, {"format", "limit", "after_t", "after_segment"});
  const std::string format = a.choice("format", {"json", "csv"}, "json");
  const uint64_t limit = a.uint("limit", 1, kHistoryPageMax, kHistoryPageMax);
  const bool resume = a.has("after_t") || a.has("after_segment");
  const uint64_t after_t =
      a.uint("after_t", 0, INT64_MAX, resume ? std::nullopt : std::optional<uint64_t>(0));
  const uint64_t after_seg =
      a.uint("after_segment", 0, UINT64_MAX, resume ? std::nullopt : std::optional<uint64_t>(0));
  if (a.failed()) return a.error();

  const std::vector<HistoryRecord> all = ctx.monitor->history();
  // Records come in (bucket, segment) order; a page starts after the cursor.
  auto begin = all.begin();
  if (resume) {
    begin = std::find_if(all.begin(), all.end(), [&](const HistoryRecord& r) {
      const uint64_t t = static_cast<uint64_t>(r.bucket_start_s);
      return t > after_t || (t == after_t && r.segment > after_seg);
    });
  }
  const size_t left = static_cast<size_t>(all.end() - begin);
  const auto end = begin + static_cast<ptrdiff_t>(std::min<size_t>(left, limit));
  json result = {{"format", format}, {"bucket_seconds", config_snapshot(ctx).bucket_seconds}};
  if (format == "csv") {
    std::string csv = resume ? "" : "timestamp,segment,op,count,bytes\n";
    for (auto it = begin; it != end; ++it) {
      for_each_row(*it, [&](const char* op, uint64_t count, uint64_t bytes) {
        csv += std::to_string(it->bucket_start_s) + ',' + std::to_string(it->segment) + ',' + op +
               ',' + std::to_string(count) + ',' + std::to_string(bytes) + '\n';
      });
    }
    result["csv"] = std::move(csv);
  } else {
    json records = json::array();
    for (auto it = begin; it != end; ++it) {
      for_each_row(*it, [&](const char* op, uint64_t count, uint64_t bytes) {
        records.push_back({{"t", it->bucket_start_s},
                           {"segment", it->segment},
                           {"op", op},
                           {"count", count},
                           {"bytes", bytes}});
      });
    }
    result["records"] = std::move(records);
  }
  result["more"] = end != all.end();
  if (end != all.end() && end != begin) {
    const HistoryRecord& last = *(end - 1);
    result["next"] = {{"after_t", last.bucket_start_s}, {"after_segment", last.segment}};
  }
  return ctl::ok_reply(std::move(result));
}


// ------------------------------------------------------------ auto-tuning

json tune_values(const DaemonContext& ctx) {
  const Config c = config_snapshot(ctx);
  json v = {{"baseline", c.baseline},
            {"alpha", c.alpha},
            {"beta", c.beta},
            {"gamma", c.gamma},
            {"max_versions_per_segment", c.max_versions_per_segment}};
  if (ctx.store != nullptr) {
    const PolicyParams p = ctx.store->policy_params();
    v["min_value"] = p.min_value;
    v["horizon_s"] = p.horizon_s;
    v["seq_ahead"] = p.predict.seq_ahead;
    v["frontier_ahead"] = p.predict.frontier_ahead;
  }
  return v;
}

json tune_json(DaemonContext& ctx) {
  std::lock_guard<std::mutex> lock(ctx.tune.mu);
  const auto& t = ctx.tune;
  json j = {{"enabled", t.enabled},
            {"interval_s", t.interval_s},
            {"runs", t.runs},
            {"last_run_ns", t.last_run_ns},
            {"last_run", t.last_run_ns ? json(iso_utc_ns(t.last_run_ns)) : json()},
            {"last_error", t.last_error},
            {"in_use", tune_values(ctx)}};
  if (t.have_last) {
    json trials = json::array();
    for (const auto& tr : t.last.trials) {
      trials.push_back({{"what", tr.what}, {"stalls", tr.stalls}, {"copied_bytes", tr.copied_bytes}});
    }
    j["last"] = {{"changed", t.last.changed},
                 {"requests", t.last.requests},
                 {"stalls_before", t.last.stalls_before},
                 {"stalls_after", t.last.stalls_after},
                 {"copied_bytes_before", t.last.copied_before},
                 {"copied_bytes_after", t.last.copied_after},
                 {"seconds", t.last.seconds},
                 {"trials", std::move(trials)}};
  }
  return j;
}

}  // namespace

Status run_tune(DaemonContext& ctx) {
  if (ctx.store == nullptr || ctx.monitor == nullptr) {
    return Status::error(Status::Code::kBusy, "auto-tuning needs a shadow pool and the access monitor");
  }
  // One run at a time: a second asks again later instead of waiting (the
  // control socket and the roller must not stall behind a run).
  std::unique_lock<std::mutex> run(ctx.tune.run_mu, std::try_to_lock);
  if (!run.owns_lock()) return Status::error(Status::Code::kBusy, "a tuning run is in progress; try again");
  const Config cfg = config_snapshot(ctx);
  const StoreStats st = ctx.store->stats();
  tune::Input in;
  in.history = ctx.monitor->history();
  in.bucket_seconds = ctx.monitor->config().bucket_seconds;
  in.sim.device_bytes = ctx.monitor->config().device_bytes;
  in.sim.segment_bytes = ctx.monitor->segment_bytes();
  for (const TierUse& t : st.tiers) in.pool_bytes += t.zones * t.zone_bytes;
  in.sim.pool_capacity_bytes = std::max<uint64_t>(in.pool_bytes, 4ull * in.sim.segment_bytes);
  in.sim.budget_bytes_per_s = st.shadow_budget_bytes_per_s;
  in.sim.retention_s = std::max<uint64_t>(1, cfg.retention_seconds);
  auto pol = parse_policy(cfg.shadow_policy);
  in.sim.policy = pol ? *pol : PolicyKind::kAuto;
  in.sim.monitor_bucket_s = in.bucket_seconds;
  in.priority = ctx.monitor->priority();
  in.policy = ctx.store->policy_params();
  in.journal_bytes = st.journal_bytes;
  in.mean_version_bytes = st.versions ? st.version_bytes / st.versions : 0;
  in.segments_with_history = st.segments_with_history;
  in.cancel = &ctx.tune.cancel;
  auto out = tune::run(in);
  std::lock_guard<std::mutex> lock(ctx.tune.mu);
  ctx.tune.last_run_ns = ctx.clock != nullptr ? ctx.clock->now_ns() : 0;
  ++ctx.tune.runs;
  if (!out) {
    ctx.tune.last_error = out.status().message();
    return out.status();
  }
  ctx.tune.last_error.clear();
  // Apply: the monitor's formula, the policy's knobs, the versions kept.
  PriorityParams pp = out->priority;
  pp.scoring_window_seconds = in.priority.scoring_window_seconds;
  Status set = ctx.monitor->set_priority(pp);
  if (set) {
    std::lock_guard<std::mutex> cl(ctx.config_mu);
    ctx.config.baseline = pp.baseline;
    ctx.config.alpha = pp.alpha;
    ctx.config.beta = pp.beta;
    ctx.config.gamma = pp.gamma;
    ctx.config.max_versions_per_segment = out->max_versions_per_segment;
  }
  ctx.store->set_policy_params(out->policy);
  ctx.store->set_max_versions(out->max_versions_per_segment);
  ctx.tune.last = std::move(*out);
  ctx.tune.have_last = true;
  spdlog::info("auto-tuning: {} requests replayed, stalls {} -> {}, alpha {} beta {} gamma {} baseline {}, "
               "max versions {}",
               ctx.tune.last.requests, ctx.tune.last.stalls_before, ctx.tune.last.stalls_after, pp.alpha, pp.beta,
               pp.gamma, pp.baseline, ctx.tune.last.max_versions_per_segment);
  return Status::ok();
}

void maybe_tune(DaemonContext& ctx) {
  {
    std::lock_guard<std::mutex> lock(ctx.tune.mu);
    if (!ctx.tune.enabled || ctx.clock == nullptr) return;
    const int64_t now = ctx.clock->now_ns();
    if (ctx.tune.last_run_ns == 0) {
      ctx.tune.last_run_ns = now;  // the first run one interval after start
      return;
    }
    if (now - ctx.tune.last_run_ns < int64_t{ctx.tune.interval_s} * 1'000'000'000) return;
  }
  Status st = run_tune(ctx);
  if (!st) spdlog::warn("auto-tuning: {}", st.message());
}

namespace {

json cmd_tune_status(DaemonContext& ctx, const json& req) {
  Args a(req, {});
  if (a.failed()) return a.error();
  return ctl::ok_reply(tune_json(ctx));
}

json cmd_tune_run(DaemonContext& ctx, const json& req) {
  Args a(req, {});
  if (a.failed()) return a.error();
  if (ctx.store == nullptr) return unavailable_pool();
  Status st = run_tune(ctx);
  if (!st) return ctl::error_reply(errc::kUnavailable, st.message());  // also: a run in progress
  return ctl::ok_reply(tune_json(ctx));
}

json cmd_tune_switch(DaemonContext& ctx, const json& req, bool on) {
  Args a(req, {});
  if (a.failed()) return a.error();
  {
    std::lock_guard<std::mutex> lock(ctx.tune.mu);
    ctx.tune.enabled = on;
  }
  return ctl::ok_reply(tune_json(ctx));
}
json cmd_tune_on(DaemonContext& ctx, const json& req) { return cmd_tune_switch(ctx, req, true); }
json cmd_tune_off(DaemonContext& ctx, const json& req) { return cmd_tune_switch(ctx, req, false); }

json cmd_debug_advance(DaemonContext& ctx, const json& req) {
  Args a(req, {"seconds"});
  const uint64_t seconds = a.uint("seconds", 0, kAdvanceMaxSeconds, std::nullopt);
  if (a.failed()) return a.error();
  ctx.test_clock->advance_ns(static_cast<int64_t>(seconds) * 1'000'000'000);
  uint64_t rolled = 0;
  if (ctx.monitor != nullptr) {
    while (ctx.monitor->roll()) ++rolled;
    ctx.monitor->rescore();
  }
  // One shadowing round at the new time before the reply (retention, the
  // policy's copies), so that a test's next request sees them done.
  if (ctx.store != nullptr) ctx.store->shadow_round();
  return ctl::ok_reply({{"now_s", now_s(ctx)}, {"buckets_rolled", rolled}, {"shadow_round", ctx.store != nullptr}});
}

// ------------------------------------------------------------ restore

// A point in the history from the request ("at_ns" or "seq"), checked
// against the window. `required`: one of them must be there.
struct Point {
  uint64_t seq = 0;
  int64_t time_ns = 0;
};

std::string window_text(const StoreStats& st) {
  return iso_utc_ns(st.retention_start_ns) + " .. " + iso_utc_ns(st.newest_ns) + " (seq " +
         std::to_string(st.first_seq) + ".." + std::to_string(st.last_seq) + ")";
}

std::optional<Point> resolve_point(DaemonContext& ctx, Args& a, bool required) {
  const bool has_t = a.has("at_ns"), has_s = a.has("seq");
  if (has_t && has_s) {
    a.fail(errc::kInvalidArgument, "give 'at_ns' or 'seq', not both");
    return std::nullopt;
  }
  if (!has_t && !has_s) {
    if (required) a.fail(errc::kInvalidArgument, "'" + a.cmd() + "' needs 'at_ns' or 'seq'");
    return std::nullopt;
  }
  ShadowStore& store = *ctx.store;
  const StoreStats st = store.stats();
  if (st.degraded) {
    a.fail(errc::kUnavailable, "history is degraded (" + st.degraded_reason +
                                   "): nothing can be restored until it restarts");
    return std::nullopt;
  }
  Point p;
  if (has_t) {
    const json* v = a.find("at_ns");
    if (!v->is_number_integer()) {
      a.fail(errc::kInvalidArgument, "'at_ns' must be an integer (ns since the epoch)");
      return std::nullopt;
    }
    const int64_t t = v->get<int64_t>();
    const int64_t now = ctx.clock != nullptr ? ctx.clock->now_ns() : st.newest_ns;
    if (t < st.retention_start_ns || t > std::max(now, st.newest_ns)) {
      a.fail(errc::kOutOfRange, iso_utc_ns(t) + " is outside the restorable window " + window_text(st) +
                                    (t > now ? ": it is in the future" : ""));
      return std::nullopt;
    }
    p.seq = std::min(store.seq_at(t), store.stable_seq());
    p.time_ns = t;
  } else {
    const uint64_t s = a.uint("seq", 0, UINT64_MAX, std::nullopt);
    if (a.failed()) return std::nullopt;
    if (s < st.first_seq || s > st.last_seq) {
      a.fail(errc::kOutOfRange, "seq " + std::to_string(s) + " is outside the restorable window " +
                                    window_text(st));
      return std::nullopt;
    }
    p.seq = std::min(s, store.stable_seq());
    p.time_ns = store.time_of(p.seq);
  }
  return p;
}

json unavailable_restore(DaemonContext& ctx) {
  if (ctx.store == nullptr) return unavailable_pool();
  return ctl::error_reply(errc::kUnavailable, "restore is not set up in this daemon");
}

bool restore_ready(const DaemonContext& ctx) {
  return ctx.store != nullptr && ctx.reconstructor && ctx.registry != nullptr;
}

// "at-20261124T140530Z" (then -2, -3 ... while taken).
std::string default_export_name(DaemonContext& ctx, int64_t t) {
  std::string iso = iso_utc_ns(t - t % kNsPerS);  // whole seconds
  std::string base = "at-";
  for (char c : iso) {
    if (c != '-' && c != ':') base += c;
  }
  std::string name = base;
  for (int i = 2; ctx.registry->find(name) != nullptr; ++i) name = base + "-" + std::to_string(i);
  return name;
}

json export_uris(const DaemonContext& ctx, const std::string& name) {
  json out = json::object();
  const Config cfg = [&] {
    std::lock_guard<std::mutex> lock(ctx.config_mu);
    return ctx.config;
  }();
  if (!cfg.unix_sockets.empty()) {
    out["uri_unix"] = "nbd+unix:///" + name + "?socket=" + cfg.unix_sockets.front();
  }
  if (!cfg.listen.empty()) out["uri_tcp"] = "nbd://" + cfg.listen.front() + "/" + name;
  return out;
}

json cmd_export(DaemonContext& ctx, const json& req) {
  if (!restore_ready(ctx)) return unavailable_restore(ctx);
  Args a(req, {"at_ns", "seq", "name"});
  auto p = resolve_point(ctx, a, true);
  std::string name;
  if (const json* n = a.find("name")) {
    if (!n->is_string() || n->get<std::string>().empty() || n->get<std::string>().size() > 255) {
      a.fail(errc::kInvalidArgument, "'name' must be a string of 1..255 bytes");
    } else {
      name = n->get<std::string>();
      for (unsigned char c : name) {
        if (c < 0x21 || c == 0x7f || c == '/' || c == '?' || c == '#' || c == '%') {
          a.fail(errc::kInvalidArgument, "'name' may not hold spaces, control characters or / ? # %");
          break;
        }
      }
    }
  }
  if (a.failed()) return a.error();
  if (name.empty()) name = default_export_name(ctx, p->time_ns);
  auto backend = std::make_shared<PointInTimeBackend>(ctx.reconstructor, p->seq);
  auto e = std::make_shared<nbd::Export>();
  e->name = name;
  e->description = "the device at " + iso_utc_ns(p->time_ns) + " (seq " + std::to_string(p->seq) + ")";
  e->backend = backend;
  e->read_only = true;
  if (ctx.export_) e->max_payload_bytes = ctx.export_->max_payload_bytes;
  {
    std::lock_guard<std::mutex> lock(ctx.pit_mu);
    Status st = ctx.registry->add(e);
    if (!st) return ctl::error_reply("exists", "an export named '" + name + "' exists already");
    const int64_t pinned = ctx.store->time_of(p->seq);
    ctx.store->pin(pinned);
    ctx.pit_exports[name] =
        DaemonContext::PitExport{p->seq, p->time_ns, ctx.clock ? ctx.clock->now_ns() : 0, pinned, backend};
  }
  spdlog::info("export '{}': the device at {} (seq {})", name, iso_utc_ns(p->time_ns), p->seq);
  json r = {{"name", name},
            {"seq", p->seq},
            {"time_ns", p->time_ns},
            {"time", iso_utc_ns(p->time_ns)},
            {"size_bytes", backend->size_bytes()},
            {"read_only", true}};
  r.update(export_uris(ctx, name));
  return ctl::ok_reply(std::move(r));
}

json cmd_unexport(DaemonContext& ctx, const json& req) {
  if (!restore_ready(ctx)) return unavailable_restore(ctx);
  Args a(req, {"name"});
  const json* n = a.find("name");
  if (n == nullptr || !n->is_string()) a.fail(errc::kInvalidArgument, "'unexport' needs 'name' (a string)");
  if (a.failed()) return a.error();
  const std::string name = n->get<std::string>();
  std::lock_guard<std::mutex> lock(ctx.pit_mu);
  if (ctx.pit_exports.count(name) == 0) {
    if (ctx.export_ && name == ctx.export_->name) {
      return ctl::error_reply(errc::kInvalidArgument, "'" + name + "' is the live export: it cannot be removed");
    }
    return ctl::error_reply("not_found", "no point-in-time export named '" + name + "'");
  }
  ctx.registry->remove(name);
  ctx.store->unpin(ctx.pit_exports[name].pinned_ns);
  ctx.pit_exports.erase(name);
  spdlog::info("export '{}' removed (connected clients keep it until they disconnect)", name);
  return ctl::ok_reply({{"name", name}});
}

json cmd_exports(DaemonContext& ctx, const json& req) {
  Args a(req, {});
  if (a.failed()) return a.error();
  json list = json::array();
  if (ctx.export_) {
    list.push_back({{"name", ctx.export_->name},
                    {"live", true},
                    {"read_only", ctx.export_->read_only},
                    {"size_bytes", ctx.export_->size_bytes()}});
  }
  std::lock_guard<std::mutex> lock(ctx.pit_mu);
  for (const auto& [name, x] : ctx.pit_exports) {
    const auto c = x.backend->counters();
    json e = {{"name", name},
              {"live", false},
              {"read_only", true},
              {"size_bytes", x.backend->size_bytes()},
              {"seq", x.seq},
              {"time_ns", x.time_ns},
              {"time", iso_utc_ns(x.time_ns)},
              {"created_ns", x.created_ns},
              {"reads", c.reads},
              {"bytes_read", c.bytes_read},
              {"read_errors", c.errors},
              {"segments_reconstructed", c.cost.segments},
              {"segments_from_primary", c.cost.from_primary},
              {"records_applied", c.cost.records_applied},
              {"versions_decoded", c.cost.versions_decoded},
              {"cache_hits", c.cost.cache_hits}};
    e.update(export_uris(ctx, name));
    list.push_back(std::move(e));
  }
  return ctl::ok_reply({{"exports", std::move(list)}});
}

json cmd_rollback(DaemonContext& ctx, const json& req) {
  if (!restore_ready(ctx) || ctx.gate == nullptr || !ctx.journal) return unavailable_restore(ctx);
  Args a(req, {"at_ns", "seq", "dry_run"});
  bool dry_run = false;
  if (const json* d = a.find("dry_run")) {
    if (!d->is_boolean()) {
      a.fail(errc::kInvalidArgument, "'dry_run' must be true or false");
    } else {
      dry_run = d->get<bool>();
    }
  }
  auto p = resolve_point(ctx, a, true);
  if (a.failed()) return a.error();
  std::unique_lock<std::mutex> one(ctx.rollback_mu, std::try_to_lock);
  if (!one.owns_lock()) return ctl::error_reply(errc::kUnavailable, "another rollback is running");
  ShadowStore& store = *ctx.store;
  const uint32_t seg_bytes = store.segment_bytes();
  const uint64_t size = ctx.journal->size_bytes();
  std::vector<uint64_t> segs = store.segments_changed_after(p->seq);
  json r = {{"seq", p->seq},
            {"time_ns", p->time_ns},
            {"time", iso_utc_ns(p->time_ns)},
            {"dry_run", dry_run},
            {"segments_total", segs.size()}};
  json first = json::array();
  uint64_t bytes = 0;
  for (uint64_t s : segs) {
    if (first.size() < 100) first.push_back(s);
    bytes += std::min<uint64_t>(seg_bytes, size - s * seg_bytes);
  }
  r["segments"] = std::move(first);
  r["bytes"] = bytes;
  if (dry_run) {
    r["rewritten"] = 0;
    return ctl::ok_reply(std::move(r));
  }
  // Pause the export, then rewrite through the journal: the rollback is
  // itself history, and a rollback to a time before it undoes it.
  const int64_t t0 = static_cast<int64_t>(monotonic_ns());
  ctx.gate->pause();
  spdlog::warn("rollback to {} (seq {}): {} segments, export paused", iso_utc_ns(p->time_ns), p->seq, segs.size());
  const uint64_t before = store.stats().last_seq;
  Status st;
  uint64_t rewritten = 0;
  void* mem = nullptr;
  if (posix_memalign(&mem, 4096, seg_bytes) != 0) st = Status::error(Status::Code::kNoSpace, "out of memory");
  std::unique_ptr<uint8_t, decltype(&std::free)> buf(static_cast<uint8_t*>(mem), &std::free);
  for (uint64_t s : segs) {
    if (!st) break;
    auto data = ctx.reconstructor->segment(p->seq, s, nullptr, false);
    if (!data) {
      st = data.status();
      break;
    }
    const uint64_t len = std::min<uint64_t>(seg_bytes, size - s * seg_bytes);
    const std::vector<uint8_t>& content = **data;
    const bool zero = std::all_of(content.begin(), content.begin() + static_cast<ptrdiff_t>(len),
                                  [](uint8_t b) { return b == 0; });
    std::memcpy(buf.get(), content.data(), len);
    st = run_sync(*ctx.journal, zero ? BlockOpKind::kWriteZeroes : BlockOpKind::kWrite, s * seg_bytes, len,
                  zero ? nullptr : buf.get(), zero ? uint32_t{kNoHole} : 0u);
    if (st) ++rewritten;
  }
  if (st) st = run_sync(*ctx.journal, BlockOpKind::kFlush, 0, 0);
  const uint64_t after = store.stats().last_seq;
  ctx.gate->resume();
  const int64_t paused = static_cast<int64_t>(monotonic_ns()) - t0;
  r["rewritten"] = rewritten;
  r["journal_first_seq"] = before + 1;
  r["journal_last_seq"] = after;
  r["paused_ns"] = paused;
  if (!st) {
    spdlog::error("rollback to seq {} failed after {} of {} segments: {}", p->seq, rewritten, segs.size(),
                  st.message());
    return ctl::error_reply(errc::kInternal, "rollback failed after " + std::to_string(rewritten) + " of " +
                                                 std::to_string(segs.size()) + " segments: " + st.message() +
                                                 " (undo what was rewritten: rollback to seq " +
                                                 std::to_string(before) + ")");
  }
  spdlog::warn("rollback to {} (seq {}) done: {} segments rewritten as seq {}..{}, export paused {} ms",
               iso_utc_ns(p->time_ns), p->seq, rewritten, before + 1, after, paused / 1'000'000);
  return ctl::ok_reply(std::move(r));
}

json cmd_verify(DaemonContext& ctx, const json& req) {
  if (!restore_ready(ctx)) return unavailable_restore(ctx);
  Args a(req, {"at_ns", "seq", "sample"});
  const uint64_t sample = a.uint("sample", 0, UINT64_MAX, 64);
  auto p = resolve_point(ctx, a, false);
  if (a.failed()) return a.error();
  ShadowStore& store = *ctx.store;
  Point at = p ? *p : Point{};
  if (!p) {
    // No time given: a random second of the window.
    const StoreStats st = store.stats();
    const int64_t span = std::max<int64_t>(0, st.newest_ns - st.retention_start_ns);
    std::random_device rd;
    std::mt19937_64 rng(rd());
    at.time_ns = st.retention_start_ns + (span > 0 ? static_cast<int64_t>(rng() % static_cast<uint64_t>(span)) : 0);
    at.seq = std::min(store.seq_at(at.time_ns), store.stable_seq());
  }
  ShadowStore::VerifyReport rep = store.verify_pool();
  // Reconstruct the segments with history (a sample of them) at that point.
  std::vector<uint64_t> segs;
  for (const SegmentHistory& h : store.segments()) segs.push_back(h.segment);
  if (sample != 0 && segs.size() > sample) {
    std::random_device rd;
    std::mt19937_64 rng(rd());
    std::shuffle(segs.begin(), segs.end(), rng);
    segs.resize(sample);
    std::sort(segs.begin(), segs.end());
  }
  uint64_t done = 0;
  for (uint64_t s : segs) {
    auto c = ctx.reconstructor->segment(at.seq, s, nullptr, false);
    if (!c) {
      if (c.status().code() == Status::Code::kOutOfRange) continue;  // pruned meanwhile
      rep.errors.push_back("segment " + std::to_string(s) + " at seq " + std::to_string(at.seq) + ": " +
                           c.status().message());
    } else {
      ++done;
    }
  }
  json errors = json::array();
  for (const std::string& e : rep.errors) errors.push_back({{"message", e}});
  if (!rep.errors.empty()) spdlog::error("verify: {} problems in the pool, first: {}", rep.errors.size(), rep.errors.front());
  return ctl::ok_reply({{"clean", rep.errors.empty()},
                        {"zones_scanned", rep.zones_scanned},
                        {"records_checked", rep.records_checked},
                        {"versions_checked", rep.versions_checked},
                        {"bytes_checked", rep.bytes_checked},
                        {"segments_reconstructed", done},
                        {"seq", at.seq},
                        {"time_ns", at.time_ns},
                        {"time", iso_utc_ns(at.time_ns)},
                        {"errors", std::move(errors)}});
}

struct Command {
  const char* name;
  bool mutating;
  json (*run)(DaemonContext&, const json&);
};

constexpr Command kCommands[] = {
    {"version", false, cmd_version},
    {"status", false, cmd_status},
    {"top", false, cmd_top},
    {"segment", false, cmd_segment},
    {"config.get", false, cmd_config_get},
    {"config.set", true, cmd_config_set},
    {"history.export", false, cmd_history_export},
    {"history", false, cmd_history},
    {"versions", false, cmd_versions},
    {"pool", false, cmd_pool},
    {"export", true, cmd_export},
    {"unexport", true, cmd_unexport},
    {"exports", false, cmd_exports},
    {"rollback", true, cmd_rollback},
    {"verify", false, cmd_verify},
    {"tune.status", false, cmd_tune_status},
    {"tune.run", true, cmd_tune_run},
    {"tune.on", true, cmd_tune_on},
    {"tune.off", true, cmd_tune_off},
    {"debug.advance", true, cmd_debug_advance},
};

const Command* find_command(const DaemonContext& ctx, std::string_view name) {
  // debug.advance exists only with a test clock; elsewhere it is unknown.
  if (name == "debug.advance" && ctx.test_clock == nullptr) return nullptr;
  for (const Command& c : kCommands) {
    if (name == c.name) return &c;
  }
  return nullptr;
}

}  // namespace

PriorityParams priority_params(const Config& cfg) {
  PriorityParams p;
  p.baseline = cfg.baseline;
  p.alpha = cfg.alpha;
  p.beta = cfg.beta;
  p.gamma = cfg.gamma;
  p.scoring_window_seconds = cfg.scoring_window_seconds;
  return p;
}

bool is_mutating_command(std::string_view cmd) {
  for (const Command& c : kCommands) {
    if (cmd == c.name) return c.mutating;
  }
  return false;
}

std::variant<RestorePoint, std::string> resolve_restore_point(DaemonContext& ctx, const json& at) {
  json req = at;
  req["cmd"] = "restore-from";
  Args a(req, {"at_ns", "seq"});
  auto p = resolve_point(ctx, a, true);
  if (a.failed() || !p) return a.error().value("message", std::string("bad time"));
  return RestorePoint{p->seq, p->time_ns};
}

json run_command(DaemonContext& ctx, const json& request, bool may_write) {
  ctl::Request req;
  if (auto err = ctl::check_request(request, req)) return ctl::error_reply(*err);
  const Command* c = find_command(ctx, req.cmd);
  if (c == nullptr) {
    return ctl::error_reply(errc::kUnknownCommand, "unknown command '" + req.cmd + "'");
  }
  if (c->mutating && !may_write) {
    return ctl::error_reply(errc::kPermissionDenied,
                            "'" + req.cmd +
                                "' changes the daemon: only root or members of the "
                                "control group may run it");
  }
  try {
    return c->run(ctx, request);
  } catch (const std::exception& e) {
    return ctl::error_reply(errc::kInternal, std::string("'") + req.cmd + "' failed: " + e.what());
  }
}

json run_command_line(DaemonContext& ctx, std::string_view line, bool may_write, std::string* cmd) {
  json request = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (request.is_discarded()) {
    return ctl::error_reply(errc::kInvalidJson, "the request line is not valid JSON");
  }
  if (cmd != nullptr && request.is_object()) {
    auto c = request.find("cmd");
    if (c != request.end() && c->is_string()) *cmd = c->get<std::string>();
  }
  return run_command(ctx, request, may_write);
}

}  // namespace shadowd
