// shadowd's configuration: one struct whose fields mirror the command-line
// options and the keys of the JSON config file (config/shadowd.example.json).
// The file is read first; options given on the command line override it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace shadowd {

struct Config {
  std::string backing;
  std::vector<std::string> unix_sockets;  // key "unix": a string or an array
  std::vector<std::string> listen;        // "ADDR:PORT"
  std::string export_name = "disk";
  std::string description;
  bool read_only = false;
  bool foreground = false;
  std::string pidfile;
  std::string log_level = "info";
  std::string direct_io = "auto";  // auto | on | off
  uint32_t io_threads = 2;
  uint32_t max_payload_bytes = 32u << 20;
  uint32_t max_inflight_per_connection = 128;
  uint32_t max_connections = 256;
  uint32_t busy_poll_us = 100;  // I/O threads spin this long before sleeping

  // NBD over TLS (NBD_OPT_STARTTLS). tls: off | on | require; empty means
  // require when credentials are given, else off (as qemu-nbd --tls-creds).
  std::string tls;
  std::string tls_certificates;  // directory: ca-cert.pem, server-cert.pem, server-key.pem
  bool tls_verify_peer = false;  // clients need a certificate signed by ca-cert.pem
  std::string tls_psk;           // psktool key file
  std::string tls_mode() const {
    if (!tls.empty()) return tls;
    return tls_certificates.empty() && tls_psk.empty() ? "off" : "require";
  }

  // Monitoring and priority (seed §1–§3).
  bool monitor = true;
  uint32_t segment_size_bytes = 256 * 1024;  // power of two, 64 KiB – 1 MiB
  uint32_t bucket_seconds = 60;
  std::vector<uint32_t> windows_seconds = {3600, 86400, 604800};
  uint64_t history_max_records = 1u << 20;
  double baseline = 0.0;
  double alpha = 1.0;
  double beta = 1.0;
  double gamma = 0.001;
  uint32_t scoring_window_seconds = 3600;

  // Control plane.
  std::string control;        // Unix socket; default /run/shadowd/<export>.sock
  std::string control_group;  // members may change settings (besides root)
  std::string metrics_listen; // "127.0.0.1:9810"; empty = no metrics endpoint
  bool test_clock = false;    // a manual clock moved by `shadowctl debug advance`

  // Shadow pool (the history: journal, versions; DESIGN.md §2, §4). Without
  // a pool the daemon keeps no history. Only retention_seconds and
  // shadow_budget_bytes_per_s change at run time; the rest apply at start.
  std::vector<std::string> pool;          // "pool": 1..2 paths; [0] tier 0 (fast), [1] tier 1
  bool init = false;                      // format blank pool devices at start
  uint32_t zone_size_bytes = 16u << 20;   // when formatting: a power of two, 4 MiB – 1 GiB
  uint64_t retention_seconds = 7 * 86400; // the key takes seconds or a duration ("7d")
  uint64_t pool_max_bytes = 0;            // 0: the whole devices
  uint32_t max_versions_per_segment = 8;  // 2..64
  uint64_t shadow_budget_bytes_per_s = 64ull << 20;  // 0: no background shadowing
  uint64_t shadow_budget_busy_bytes_per_s = 4ull << 20;  // while clients do I/O (not urgent work)
  uint32_t checkpoint_interval_s = 60;    // 1..86400
  uint32_t pool_full_wait_ms = 5000;      // 0..600000
  std::string shadow_policy = "auto";     // core/policy.h names, but not "oracle"
  uint32_t tune_interval_s = 3600;        // auto-tuning period; 0 = off
  // A replica of the history (core/replica.h, docs/REPLICA.md): the pool's
  // devices and a mirror of the primary, shipped in flush order to an RBD
  // image ("rbd:POOL/IMAGE[:conf=...]") or a file/block device.
  std::string replica;
  bool replica_sync = false;               // a flush waits for the replica
  uint32_t replica_max_lag_seconds = 5;    // 1..3600: sync waits at most this
  uint64_t replica_max_backlog_bytes = 256ull << 20;  // queued before it falls behind
  // An RBD image (backing, pool device or replica) locked by another client:
  // break the lock (blocklisting that client) instead of refusing to start.
  bool rbd_break_lock = false;
  // Serve the device at `restore_at` from a replica alone (no backing, no
  // pool): read-only, the replica never written.
  std::string restore_from;
  std::string restore_at;
  // Where a degraded history is recorded outside the pool (a file per
  // export and pool, core/degraded_state.h); created if missing.
  std::string state_dir = "/var/lib/shadowd";

  // Check ranges and enumerations; the message names the offending key.
  Status validate() const;
};

// A duration: a number of seconds ("90") or one or more number-unit pairs
// ("90s", "15min", "2h", "7d", "1w", "1d12h"); units s|sec, m|min, h, d, w.
// kInvalid with a message for anything else, or above 2^64-1 seconds.
Result<uint64_t> parse_duration(std::string_view text);

// Merge the JSON object in `text` into `cfg`. Unknown keys, wrong types and
// out-of-range values are errors naming the key; `cfg` is unchanged on error.
Status merge_config_json(const std::string& text, Config& cfg);
// Read `path` and merge it.
Status load_config_file(const std::string& path, Config& cfg);

}  // namespace shadowd
