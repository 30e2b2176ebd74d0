#include "config/config.h"

#include "core/policy.h"

#include <cctype>
#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

namespace shadowd {
namespace {

using json = nlohmann::json;
using Setter = std::function<Status(const json&, Config&)>;

Setter str(std::string Config::*field) {
  return [field](const json& v, Config& c) -> Status {
    if (!v.is_string()) return Status::invalid("a string expected");
    c.*field = v.get<std::string>();
    return Status::ok();
  };
}

Setter boolean(bool Config::*field) {
  return [field](const json& v, Config& c) -> Status {
    if (!v.is_boolean()) return Status::invalid("true or false expected");
    c.*field = v.get<bool>();
    return Status::ok();
  };
}

Setter u32(uint32_t Config::*field) {
  return [field](const json& v, Config& c) -> Status {
    if (!v.is_number_unsigned() || v.get<uint64_t>() > UINT32_MAX) {
      return Status::invalid("an unsigned 32-bit integer expected");
    }
    c.*field = v.get<uint32_t>();
    return Status::ok();
  };
}

Setter u64(uint64_t Config::*field) {
  return [field](const json& v, Config& c) -> Status {
    if (!v.is_number_unsigned()) return Status::invalid("an unsigned integer expected");
    c.*field = v.get<uint64_t>();
    return Status::ok();
  };
}

Setter number(double Config::*field) {
  return [field](const json& v, Config& c) -> Status {
    if (!v.is_number()) return Status::invalid("a number expected");
    c.*field = v.get<double>();
    return Status::ok();
  };
}

Setter u32_list(std::vector<uint32_t> Config::*field) {
  return [field](const json& v, Config& c) -> Status {
    if (!v.is_array()) return Status::invalid("an array of unsigned integers expected");
    std::vector<uint32_t> out;
    for (const auto& e : v) {
      if (!e.is_number_unsigned() || e.get<uint64_t>() > UINT32_MAX) {
        return Status::invalid("an array of unsigned 32-bit integers expected");
      }
      out.push_back(e.get<uint32_t>());
    }
    c.*field = std::move(out);
    return Status::ok();
  };
}

Setter str_list(std::vector<std::string> Config::*field) {
  return [field](const json& v, Config& c) -> Status {
    std::vector<std::string> out;
    if (v.is_string()) {
      out.push_back(v.get<std::string>());
    } else if (v.is_array()) {
      for (const auto& e : v) {
        if (!e.is_string()) return Status::invalid("a string or an array of strings expected");
        out.push_back(e.get<std::string>());
      }
    } else if (!v.is_null()) {
      return Status::invalid("a string or an array of strings expected");
    }
    c.*field = std::move(out);
    return Status::ok();
  };
}

// Seconds: an unsigned integer, or a string parse_duration() reads.
Setter duration(uint64_t Config::*field) {
  return [field](const json& v, Config& c) -> Status {
    if (v.is_number_unsigned()) {
      c.*field = v.get<uint64_t>();
      return Status::ok();
    }
    if (!v.is_string()) {
      return Status::invalid(
          "seconds or a duration such as \"90s\", \"15min\", \"2h\", \"7d\" expected");
    }
    Result<uint64_t> d = parse_duration(v.get<std::string>());
    if (!d) return d.status();
    c.*field = *d;
    return Status::ok();
  };
}

// The pool devices: one path, or an array of one or two. An empty array
// (or null) is no pool, as `config get` shows it.
Setter pool_list(std::vector<std::string> Config::*field) {
  return [field](const json& v, Config& c) -> Status {
    static const char* kExpected = "a path or an array of 1 or 2 paths expected";
    std::vector<std::string> out;
    if (v.is_string()) {
      out.push_back(v.get<std::string>());
    } else if (v.is_array() && v.size() <= 2) {
      for (const auto& e : v) {
        if (!e.is_string()) return Status::invalid(kExpected);
        out.push_back(e.get<std::string>());
      }
    } else if (!v.is_null()) {
      return Status::invalid(kExpected);
    }
    for (const std::string& p : out) {
      if (p.empty()) return Status::invalid("an empty path");
    }
    c.*field = std::move(out);
    return Status::ok();
  };
}

const std::map<std::string, Setter>& setters() {
  static const std::map<std::string, Setter> m = {
      {"backing", str(&Config::backing)},
      {"unix", str_list(&Config::unix_sockets)},
      {"listen", str_list(&Config::listen)},
      {"export_name", str(&Config::export_name)},
      {"description", str(&Config::description)},
      {"read_only", boolean(&Config::read_only)},
      {"foreground", boolean(&Config::foreground)},
      {"pidfile", str(&Config::pidfile)},
      {"log_level", str(&Config::log_level)},
      {"direct_io", str(&Config::direct_io)},
      {"io_threads", u32(&Config::io_threads)},
      {"max_payload_bytes", u32(&Config::max_payload_bytes)},
      {"max_inflight_per_connection", u32(&Config::max_inflight_per_connection)},
      {"max_connections", u32(&Config::max_connections)},
      {"busy_poll_us", u32(&Config::busy_poll_us)},
      {"tls", str(&Config::tls)},
      {"tls_certificates", str(&Config::tls_certificates)},
      {"tls_verify_peer", boolean(&Config::tls_verify_peer)},
      {"tls_psk", str(&Config::tls_psk)},
      {"monitor", boolean(&Config::monitor)},
      {"segment_size_bytes", u32(&Config::segment_size_bytes)},
      {"bucket_seconds", u32(&Config::bucket_seconds)},
      {"windows_seconds", u32_list(&Config::windows_seconds)},
      {"history_max_records", u64(&Config::history_max_records)},
      {"baseline", number(&Config::baseline)},
      {"alpha", number(&Config::alpha)},
      {"beta", number(&Config::beta)},
      {"gamma", number(&Config::gamma)},
      {"scoring_window_seconds", u32(&Config::scoring_window_seconds)},
      {"control", str(&Config::control)},
      {"control_group", str(&Config::control_group)},
      {"metrics_listen", str(&Config::metrics_listen)},
      {"pool", pool_list(&Config::pool)},
      {"init", boolean(&Config::init)},
      {"zone_size_bytes", u32(&Config::zone_size_bytes)},
      {"retention_seconds", duration(&Config::retention_seconds)},
      {"pool_max_bytes", u64(&Config::pool_max_bytes)},
      {"max_versions_per_segment", u32(&Config::max_versions_per_segment)},
      {"shadow_budget_bytes_per_s", u64(&Config::shadow_budget_bytes_per_s)},
      {"shadow_budget_busy_bytes_per_s", u64(&Config::shadow_budget_busy_bytes_per_s)},
      {"checkpoint_interval_s", u32(&Config::checkpoint_interval_s)},
      {"pool_full_wait_ms", u32(&Config::pool_full_wait_ms)},
      {"shadow_policy", str(&Config::shadow_policy)},
      {"tune_interval_s", u32(&Config::tune_interval_s)},
      {"state_dir", str(&Config::state_dir)},
      {"replica", str(&Config::replica)},
      {"replica_sync", boolean(&Config::replica_sync)},
      {"replica_max_lag_seconds", u32(&Config::replica_max_lag_seconds)},
      {"replica_max_backlog_bytes", u64(&Config::replica_max_backlog_bytes)},
      {"rbd_break_lock", boolean(&Config::rbd_break_lock)},
      {"restore_from", str(&Config::restore_from)},
      {"restore_at", str(&Config::restore_at)},
  };
  return m;
}

}  // namespace

Result<uint64_t> parse_duration(std::string_view text) {
  auto bad = [&](const std::string& why) {
    return Status::invalid("bad duration \"" + std::string(text) + "\": " + why +
                           " (e.g. 90, 90s, 15min, 2h, 7d, 1w, 1d12h)");
  };
  if (text.empty()) return bad("empty");
  static const struct {
    std::string_view name;
    uint64_t seconds;
  } kUnits[] = {{"s", 1},    {"sec", 1},   {"m", 60},    {"min", 60},
                {"h", 3600}, {"d", 86400}, {"w", 604800}};
  uint64_t total = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t digits = pos;
    uint64_t n = 0;
    while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') {
      const uint64_t d = static_cast<uint64_t>(text[digits] - '0');
      if (n > (UINT64_MAX - d) / 10) return bad("too large");
      n = n * 10 + d;
      ++digits;
    }
    if (digits == pos) return bad("a number expected at \"" + std::string(text.substr(pos)) + "\"");
    size_t end = digits;
    while (end < text.size() && std::isalpha(static_cast<unsigned char>(text[end]))) ++end;
    const std::string_view unit = text.substr(digits, end - digits);
    uint64_t scale = 0;
    if (unit.empty()) {
      // A bare number is seconds, but only on its own ("90", not "1h30").
      if (pos != 0 || end != text.size()) return bad("a unit is missing");
      scale = 1;
    } else {
      for (const auto& u : kUnits) {
        if (unit == u.name) scale = u.seconds;
      }
      if (scale == 0) return bad("unknown unit \"" + std::string(unit) + "\"");
    }
    if (n > UINT64_MAX / scale || total > UINT64_MAX - n * scale) return bad("too large");
    total += n * scale;
    pos = end;
  }
  return total;
}

Status Config::validate() const {
  static const char* levels[] = {"trace", "debug", "info", "warn", "error", "critical", "off"};
  bool level_ok = false;
  for (const char* l : levels) level_ok |= log_level == l;
  if (!level_ok) return Status::invalid("log_level must be trace|debug|info|warn|error|critical|off");
  if (direct_io != "auto" && direct_io != "on" && direct_io != "off") {
    return Status::invalid("direct_io must be auto|on|off");
  }
  if (io_threads < 1 || io_threads > 64) return Status::invalid("io_threads must be 1..64");
  if (auto p = parse_policy(shadow_policy); !p || *p == PolicyKind::kOracle) {
    return Status::invalid("shadow_policy must be none|lru|heat|priority|ewma|holt-winters|arima|sequential|auto");
  }
  if (max_payload_bytes < 4096 || max_payload_bytes > (32u << 20)) {
    return Status::invalid("max_payload_bytes must be 4096..33554432");
  }
  if (max_inflight_per_connection < 1 || max_inflight_per_connection > 4096) {
    return Status::invalid("max_inflight_per_connection must be 1..4096");
  }
  if (busy_poll_us > 1000) return Status::invalid("busy_poll_us must be 0..1000");
  if (!tls.empty() && tls != "off" && tls != "on" && tls != "require") {
    return Status::invalid("tls must be off|on|require");
  }
  if (tls_mode() != "off" && tls_certificates.empty() && tls_psk.empty()) {
    return Status::invalid("tls " + tls_mode() +
                           " needs tls_certificates (a directory with server-cert.pem and "
                           "server-key.pem) or tls_psk (a psktool key file)");
  }
  if (tls_verify_peer && tls_certificates.empty()) {
    return Status::invalid("tls_verify_peer needs tls_certificates (its ca-cert.pem checks the clients)");
  }
  if (max_connections < 1 || max_connections > 65536) {
    return Status::invalid("max_connections must be 1..65536");
  }
  if (segment_size_bytes < (64u << 10) || segment_size_bytes > (1u << 20) ||
      (segment_size_bytes & (segment_size_bytes - 1)) != 0) {
    return Status::invalid("segment_size_bytes must be a power of two, 65536..1048576");
  }
  if (bucket_seconds < 1 || bucket_seconds > 3600) return Status::invalid("bucket_seconds must be 1..3600");
  if (windows_seconds.empty() || windows_seconds.size() > 8) {
    return Status::invalid("windows_seconds must list 1..8 windows");
  }
  bool scoring_found = false;
  for (uint32_t w : windows_seconds) {
    if (w < bucket_seconds || w % bucket_seconds != 0 || w > 366u * 86400) {
      return Status::invalid("each of windows_seconds must be a multiple of bucket_seconds, at most a year");
    }
    scoring_found |= w == scoring_window_seconds;
  }
  if (!scoring_found) return Status::invalid("scoring_window_seconds must be one of windows_seconds");
  if (history_max_records < 1024 || history_max_records > (1ull << 32)) {
    return Status::invalid("history_max_records must be 1024..4294967296");
  }
  for (double v : {baseline, alpha, beta, gamma}) {
    if (!std::isfinite(v)) return Status::invalid("baseline, alpha, beta and gamma must be finite numbers");
  }
  if (export_name.size() > 4096) return Status::invalid("export_name longer than 4096 bytes");
  if (description.size() > 4096) return Status::invalid("description longer than 4096 bytes");

  if (pool.size() > 2) {
    return Status::invalid("pool lists at most 2 devices (tier 0 fast, tier 1 slow), got " +
                           std::to_string(pool.size()));
  }
  for (const std::string& p : pool) {
    if (p.empty()) return Status::invalid("pool: a device path is empty");
    if (p == backing) return Status::invalid("pool: " + p + " is the backing device itself");
  }
  if (pool.size() == 2 && pool[0] == pool[1]) {
    return Status::invalid("pool: " + pool[0] + " is listed twice");
  }
  if (!pool.empty() && read_only) {
    return Status::invalid(
        "pool needs a writable export: a shadow pool journals writes, and read_only refuses them "
        "(drop --read-only or --pool)");
  }
  if (zone_size_bytes < (4u << 20) || zone_size_bytes > (1u << 30) ||
      (zone_size_bytes & (zone_size_bytes - 1)) != 0) {
    return Status::invalid(
        "zone_size_bytes must be a power of two, 4194304..1073741824 (4 MiB..1 GiB)");
  }
  if (retention_seconds < 1 || retention_seconds > 100ull * 366 * 86400) {
    return Status::invalid("retention_seconds must be 1 s..100 years");
  }
  if (max_versions_per_segment < 2 || max_versions_per_segment > 64) {
    return Status::invalid("max_versions_per_segment must be 2..64");
  }
  if (pool_full_wait_ms > 600000) return Status::invalid("pool_full_wait_ms must be 0..600000");
  if (checkpoint_interval_s < 1 || checkpoint_interval_s > 86400) {
    return Status::invalid("checkpoint_interval_s must be 1..86400");
  }
  if (state_dir.empty()) return Status::invalid("state_dir must not be empty");
  if (!replica.empty() && pool.empty()) {
    return Status::invalid("replica needs a pool: it replicates the pool's history (add --pool)");
  }
  if (!restore_from.empty()) {
    if (restore_at.empty()) return Status::invalid("restore_from needs restore_at (--at T): the time to serve");
    if (!backing.empty() || !pool.empty() || !replica.empty()) {
      return Status::invalid("restore_from serves from the replica alone: leave out backing, pool and replica");
    }
  } else if (!restore_at.empty()) {
    return Status::invalid("restore_at (--at) goes with restore_from (--restore-from)");
  }
  if (replica_max_lag_seconds < 1 || replica_max_lag_seconds > 3600) {
    return Status::invalid("replica_max_lag_seconds must be 1..3600");
  }
  if (replica_max_backlog_bytes < (1ull << 20)) {
    return Status::invalid("replica_max_backlog_bytes must be at least 1048576 (1 MiB)");
  }
  return Status::ok();
}

Status merge_config_json(const std::string& text, Config& cfg) {
  json doc = json::parse(text, nullptr, /*allow_exceptions=*/false, /*ignore_comments=*/true);
  if (doc.is_discarded()) return Status::invalid("config is not valid JSON");
  if (!doc.is_object()) return Status::invalid("config must be a JSON object");
  Config next = cfg;
  for (auto it = doc.begin(); it != doc.end(); ++it) {
    auto s = setters().find(it.key());
    if (s == setters().end()) return Status::invalid("unknown config key '" + it.key() + "'");
    Status st = s->second(it.value(), next);
    if (!st) return Status::invalid("config key '" + it.key() + "': " + st.message());
  }
  cfg = std::move(next);
  return Status::ok();
}

Status load_config_file(const std::string& path, Config& cfg) {
  std::ifstream in(path);
  if (!in) return Status::from_errno(errno ? errno : ENOENT, "cannot read config " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  Status st = merge_config_json(ss.str(), cfg);
  if (!st) return Status::invalid(path + ": " + st.message());
  return Status::ok();
}

}  // namespace shadowd
