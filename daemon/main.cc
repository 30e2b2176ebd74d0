// shadowd: serve an NBD export over a backing file or block device.
//
// The daemon's wiring: options and config, logging, daemonizing, signals,
// systemd notification and socket activation. The engine lives in core/ and
// the protocol in nbd/.
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <list>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/sinks/systemd_sink.h>
#include <spdlog/spdlog.h>
#include <systemd/sd-daemon.h>

#include "config/config.h"
#include "ctl/format.h"
#include "core/io_backend.h"
#include "core/monitored_backend.h"
#include "core/nbd_backend.h"
#include "core/rbd_backend.h"
#include "core/replica.h"
#include "core/overlay_backend.h"
#include "ctl/timespec.h"
#include "core/shadow_store.h"
#include "daemon/commands.h"
#include "daemon/context.h"
#include "daemon/control.h"
#include "daemon/metrics.h"
#include "nbd/server.h"
#include "version.h"

namespace shadowd {
namespace {

constexpr int kExitUsage = 2;
constexpr int kExitFailure = 1;

struct Cli {
  Config values;  // options as given on the command line
  std::string config_path;
  bool no_monitor = false;
  bool force = false;  // --force: with --init, reformat a device holding another pool
  // The text of options parsed after CLI11 (sizes, durations); a list so
  // that the options' pointers into it stay valid.
  std::list<std::string> texts;
  // Apply the options the user actually gave, over the config file.
  std::vector<std::function<void(Config&)>> overrides;
};

template <typename T>
CLI::Option* opt(CLI::App& app, Cli& cli, const std::string& name, T Config::*field,
                 const std::string& help) {
  CLI::Option* o = app.add_option(name, cli.values.*field, help);
  cli.overrides.push_back([o, field, &cli](Config& c) {
    if (o->count() > 0) c.*field = cli.values.*field;
  });
  return o;
}

// Bytes with an optional binary suffix: 4096, 64K, 16M, 1.5G.
std::optional<uint64_t> parse_bytes(const std::string& text) { return ctl::parse_size(text); }

// Seconds or a duration: 90, 90s, 15min, 2h, 7d.
std::optional<uint64_t> parse_seconds(const std::string& text) {
  Result<uint64_t> r = parse_duration(text);
  if (!r) return std::nullopt;
  return *r;
}

// An option taken as text and converted by `parse` (which the option's
// validator has already run, so a value that reaches the override parses).
template <typename T>
CLI::Option* parsed_opt(CLI::App& app, Cli& cli, const std::string& name, T Config::*field,
                        std::optional<uint64_t> (*parse)(const std::string&),
                        const std::string& type_name, const std::string& help) {
  std::string& text = cli.texts.emplace_back();
  CLI::Option* o = app.add_option(name, text, help)->type_name(type_name);
  o->check(CLI::Validator(
      [parse, type_name](std::string& s) -> std::string {
        const std::optional<uint64_t> v = parse(s);
        if (!v) return "'" + s + "' is not a valid " + type_name;
        if (*v > std::numeric_limits<T>::max()) return "'" + s + "' is too large";
        return std::string();
      },
      "", type_name));
  cli.overrides.push_back([o, field, parse, &text](Config& c) {
    if (o->count() > 0) c.*field = static_cast<T>(parse(text).value_or(0));
  });
  return o;
}

CLI::Option* flag(CLI::App& app, Cli& cli, const std::string& name, bool Config::*field,
                  const std::string& help) {
  CLI::Option* o = app.add_flag(name, cli.values.*field, help);
  cli.overrides.push_back([o, field, &cli](Config& c) {
    if (o->count() > 0) c.*field = cli.values.*field;
  });
  return o;
}

void build_cli(CLI::App& app, Cli& cli) {
  app.description(
      "shadowd serves an NBD export over a backing file, block device or NBD URI (fixed newstyle,\n"
      "structured replies, base:allocation; every command incl. TRIM, WRITE_ZEROES, CACHE,\n"
      "BLOCK_STATUS, FUA). Socket and disk I/O run on io_uring.\n\n"
      "Options override the keys of the same name (dashes become underscores) in the JSON\n"
      "config file. Without --unix, --listen or systemd socket activation it listens on\n"
      "127.0.0.1:10809. SIGTERM/SIGINT finish in-flight requests and exit 0.\n\n"
      "Examples:\n"
      "  shadowd --backing disk.img --unix /run/shadowd/disk.sock --foreground\n"
      "  nbdinfo 'nbd+unix:///disk?socket=/run/shadowd/disk.sock'\n"
      "  nbd-client -unix /run/shadowd/disk.sock -N disk /dev/nbd0\n"
      "  shadowd --backing 'nbd+unix:///vol?socket=/run/qemu-nbd.sock' --unix /run/shadowd/vol.sock\n\n"
      "History: with --pool, every write is journaled into a shadow pool (a separate block\n"
      "device or preallocated file) and segments are shadowed into compressed versions in\n"
      "the background, so that the device can be restored to any moment of the retention\n"
      "window. Format the pool once with --init:\n"
      "  fallocate -l 20G /var/lib/shadowd/pool.img\n"
      "  shadowd --backing disk.img --pool /var/lib/shadowd/pool.img --init --retention 7d");
  app.footer("Exit status: 0 on clean shutdown, 1 on a runtime failure, 2 on bad usage.");
  app.set_version_flag("--version", std::string("shadowd ") + SHADOWD_VERSION);
  opt(app, cli, "--backing", &Config::backing,
      "Backing file or block device to export (required), or an NBD URI served through "
      "libnbd: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, and with TLS "
      "nbds://... and nbds+unix://...?socket=PATH&tls-psk-file=FILE (or tls-certificates=DIR). "
      "A pool records the URI as the backing's name: use the same URI to find it again")
      ->type_name("PATH|URI");
  opt(app, cli, "--unix", &Config::unix_sockets,
      "Listen on this Unix socket (repeatable; a stale socket file is replaced)");
  opt(app, cli, "--listen", &Config::listen,
      "Listen on TCP ADDR:PORT or [ADDR6]:PORT (repeatable; port 0 picks a free port)");
  opt(app, cli, "--export-name", &Config::export_name,
      "Export name (default \"disk\"; the empty name also selects it)");
  opt(app, cli, "--description", &Config::description, "Export description sent to clients");
  flag(app, cli, "--read-only", &Config::read_only, "Export read-only");
  app.add_option("--config", cli.config_path, "JSON config file (see config/shadowd.example.json)")
      ->check(CLI::ExistingFile);
  flag(app, cli, "--foreground", &Config::foreground,
       "Stay in the foreground (needed under systemd Type=notify)");
  opt(app, cli, "--pidfile", &Config::pidfile, "Write the daemon's PID to this file");
  opt(app, cli, "--log-level", &Config::log_level,
      "trace|debug|info|warn|error|critical|off (default info)");
  opt(app, cli, "--direct-io", &Config::direct_io,
      "auto|on|off: O_DIRECT for aligned requests (auto: when the file system allows it)");
  opt(app, cli, "--io-threads", &Config::io_threads,
      "Worker threads, each with its own io_uring (default 2)");
  opt(app, cli, "--max-payload-bytes", &Config::max_payload_bytes,
      "Largest READ/WRITE payload accepted (default 33554432)");
  opt(app, cli, "--max-inflight-per-connection", &Config::max_inflight_per_connection,
      "Requests one connection may have in flight (default 128)");
  opt(app, cli, "--max-connections", &Config::max_connections,
      "Open connections at most; more are closed at once (default 256)");
  opt(app, cli, "--busy-poll-us", &Config::busy_poll_us,
      "I/O threads spin up to this many microseconds for completions before sleeping "
      "(0..1000, default 100; trades CPU for latency, like qemu's poll-max-ns). Not with an "
      "rbd: or nbd: backing, or a --pool, --replica or --restore-from on RBD: there the completions "
      "come from threads of shadowd (librbd, libnbd) that need the CPU a spin would take");
  const std::string tls_group = "TLS (NBD_OPT_STARTTLS)";
  opt(app, cli, "--tls", &Config::tls,
      "off|on|require. require: every NBD option but STARTTLS is refused until TLS is up "
      "(NBD_REP_ERR_TLS_REQD), so no export name or data leaks; on: offered, plain clients "
      "served too. Default: require when --tls-certificates or --tls-psk is given, else off")
      ->type_name("MODE")
      ->group(tls_group);
  opt(app, cli, "--tls-certificates", &Config::tls_certificates,
      "Directory with server-cert.pem, server-key.pem and ca-cert.pem (and optionally "
      "ca-crl.pem), as for nbdkit --tls-certificates and qemu's tls-creds-x509; e.g. made "
      "with certtool")
      ->type_name("DIR")
      ->group(tls_group);
  flag(app, cli, "--tls-verify-peer", &Config::tls_verify_peer,
       "Clients must present a certificate signed by ca-cert.pem")
      ->group(tls_group);
  opt(app, cli, "--tls-psk", &Config::tls_psk,
      "Pre-shared keys file in psktool's format (username:hexkey per line)")
      ->type_name("FILE")
      ->group(tls_group);
  opt(app, cli, "--segment-size", &Config::segment_size_bytes,
      "Segment size in bytes for access monitoring: a power of two, 65536..1048576 "
      "(default 262144)");
  opt(app, cli, "--control", &Config::control,
      "Control socket for shadowctl (default /run/shadowd/<export>.sock)");
  opt(app, cli, "--control-group", &Config::control_group,
      "Group whose members may change settings over the control socket (root always may)");
  opt(app, cli, "--metrics-listen", &Config::metrics_listen,
      "Serve Prometheus metrics on http://ADDR:PORT/metrics (off unless given)");
  CLI::Option* no_mon = app.add_flag("--no-monitor", cli.no_monitor,
                                     "Do not count accesses per segment (config: monitor=false)");
  cli.overrides.push_back([no_mon](Config& c) {
    if (no_mon->count() > 0) c.monitor = false;
  });
  flag(app, cli, "--test-clock", &Config::test_clock,
       "For tests: the monitor's clock stands still until `shadowctl debug advance`");

  // The shadow pool.
  const std::string pool_group = "Shadow pool (history)";
  opt(app, cli, "--pool", &Config::pool,
      "Shadow pool devices that keep the restorable history: block devices or preallocated "
      "files, one or two, comma-separated or repeated. The first is the fast tier 0 (journal "
      "and hot versions), the second, if any, the slow tier 1 (cold versions). Without --pool "
      "no history is kept. Needs a writable export")
      ->type_name("PATH[,PATH]")
      ->delimiter(',')
      ->group(pool_group);
  flag(app, cli, "--init", &Config::init,
       "Format blank pool devices before serving. Devices that already hold this backing's "
       "pool (same canonical path, size and segment size) are used as they are, so --init "
       "is safe to leave on (config: init=true); a device holding another pool is refused")
      ->group(pool_group);
  app.add_flag("--force", cli.force,
               "With --init: reformat pool devices that hold another backing's pool or another "
               "segment size, discarding that history. Command line only")
      ->group(pool_group);
  parsed_opt(app, cli, "--zone-size", &Config::zone_size_bytes, parse_bytes, "BYTES",
             "Pool zone size, used only when --init formats: a power of two, 4M..1G "
             "(default 16M). An existing pool keeps its own")
      ->group(pool_group);
  parsed_opt(app, cli, "--retention", &Config::retention_seconds, parse_seconds, "DURATION",
             "How far back the history reaches: seconds or 90s, 15min, 2h, 7d, 1w (default "
             "7d). Older history is folded away; when the pool runs full the window is cut "
             "shorter, logged and reported. Changeable at run time")
      ->group(pool_group);
  parsed_opt(app, cli, "--pool-max-bytes", &Config::pool_max_bytes, parse_bytes, "BYTES",
             "Use at most this much of the pool devices (K/M/G/T suffixes; default 0 = all "
             "of them)")
      ->group(pool_group);
  opt(app, cli, "--max-versions-per-segment", &Config::max_versions_per_segment,
      "Shadow versions kept per segment, 2..64 (default 8); beyond that older versions are "
      "folded or dropped")
      ->type_name("N")
      ->group(pool_group);
  parsed_opt(app, cli, "--shadow-budget", &Config::shadow_budget_bytes_per_s, parse_bytes,
             "BYTES_PER_S",
             "I/O budget of background shadowing in bytes per second (K/M/G suffixes; default "
             "64M). 0 shadows nothing in the background: every first write to a segment then "
             "copies it on the write path. Changeable at run time")
      ->group(pool_group);
  parsed_opt(app, cli, "--shadow-budget-busy", &Config::shadow_budget_busy_bytes_per_s,
             parse_bytes, "BYTES_PER_S",
             "Background shadowing budget while clients are doing I/O (a request in the last "
             "200 ms), at most --shadow-budget (default 4M): stale and forecast segments wait "
             "for quieter moments, so that shadowing leaves the devices to the clients; "
             "segments with too many journal records are still shadowed at the full budget")
      ->group(pool_group);
  opt(app, cli, "--shadow-policy", &Config::shadow_policy,
      "Which segments hold a base version ahead of need (docs/SIMULATION.md): auto "
      "(default: sequential streams, the allocation frontier, write rates and the priority "
      "formula), sequential, ewma, holt-winters, arima, priority, lru, heat (keep bases of "
      "segments leaving the window, copy nothing ahead) or none (free them). Compare them "
      "on your own trace with `shadowctl simulate`")
      ->type_name("POLICY")
      ->group(pool_group);
  opt(app, cli, "--tune-interval", &Config::tune_interval_s,
      "Seconds between auto-tuning runs (default 3600; 0 = off): the access history is "
      "replayed through the simulator to refit alpha, beta, gamma, the baseline and the "
      "policy's knobs for the fewest stalls at the configured budget, and "
      "max_versions_per_segment follows the pool's capacity. `shadowctl tune` shows and "
      "controls it")
      ->type_name("SECONDS")
      ->group(pool_group);
  opt(app, cli, "--pool-full-wait", &Config::pool_full_wait_ms,
      "Milliseconds that journal writes may wait, when the pool is down to its last free zones, "
      "for retention to be cut and zones reclaimed (writes slow down to that rate) before "
      "history gives up and is marked degraded, 0..600000 (default 5000; 0: degrade at once)")
      ->type_name("MS")
      ->group(pool_group);
  opt(app, cli, "--checkpoint-interval", &Config::checkpoint_interval_s,
      "Seconds between checkpoints of the pool's index, 1..86400 (default 60): shorter "
      "means less journal to scan after a crash, more pool writes")
      ->type_name("SECONDS")
      ->group(pool_group);
  opt(app, cli, "--state-dir", &Config::state_dir,
      "Directory where shadowd records, outside the pool, that the pool's history is "
      "degraded, so that a restart never replays the pool's journal over writes acknowledged "
      "meanwhile (default /var/lib/shadowd; created if missing; with --pool a file must be "
      "creatable there)")
      ->type_name("DIR")
      ->group(pool_group);
  const std::string replica_group = "Replica (history beyond this host)";
  opt(app, cli, "--replica", &Config::replica,
      "Keep a complete copy of the history on another device: the pool's devices and a mirror "
      "of the backing, shipped in flush order (docs/REPLICA.md). An RBD image "
      "rbd:POOL/IMAGE[:conf=PATH][:id=USER][:keyring=PATH] or a file or block device; it "
      "must hold 1 MiB + the pool devices + the backing. Needs --pool")
      ->type_name("URI|PATH")
      ->group(replica_group);
  flag(app, cli, "--replica-sync", &Config::replica_sync,
       "A flush (and so every write a client made durable) completes only once it is on the "
       "replica too (RPO 0), waiting at most --replica-max-lag")
      ->group(replica_group);
  opt(app, cli, "--replica-max-lag", &Config::replica_max_lag_seconds,
      "Seconds a flush waits for the replica with --replica-sync before it completes without "
      "it (counted and logged), 1..3600 (default 5)")
      ->type_name("SECONDS")
      ->group(replica_group);
  parsed_opt(app, cli, "--replica-max-backlog", &Config::replica_max_backlog_bytes, parse_bytes,
             "BYTES",
             "Writes queued for the replica before it is marked behind and copies what changed "
             "from the local devices instead (default 256M)")
      ->group(replica_group);
  opt(app, cli, "--restore-from", &Config::restore_from,
      "Serve, read-only, the device as it was at --at T, reconstructed from a replica alone "
      "(an RBD image or a file written by --replica): no backing, no pool, and the replica is "
      "never written. It must be in sync (its header says so; a replica still being written "
      "is best restored from a snapshot, rbd:POOL/IMAGE@SNAP). `shadowctl history`, "
      "`export --at` and `restore` work against it as against any shadowd")
      ->type_name("URI|PATH")
      ->group(replica_group);
  opt(app, cli, "--at", &Config::restore_at,
      "With --restore-from: the time to serve, in any form `shadowctl ... --at` takes "
      "(ISO 8601, @EPOCH, -15min, '2h ago', now, seq:N)")
      ->type_name("T")
      ->group(replica_group);
  flag(app, cli, "--rbd-break-lock", &Config::rbd_break_lock,
       "An RBD image (--backing, --pool or --replica) whose exclusive lock another client "
       "holds: break the lock and blocklist that client (fencing a dead or hung shadowd at "
       "once) instead of refusing to start")
      ->group(replica_group);
}

void setup_logging(const std::string& level) {
  std::shared_ptr<spdlog::logger> logger;
  if (std::getenv("JOURNAL_STREAM") != nullptr) {
    // Under systemd: structured entries straight to journald.
    logger = std::make_shared<spdlog::logger>(
        "shadowd", std::make_shared<spdlog::sinks::systemd_sink_mt>("shadowd"));
  } else {
    logger = std::make_shared<spdlog::logger>(
        "shadowd", std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
    logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v");
  }
  logger->set_level(spdlog::level::from_str(level));
  spdlog::set_default_logger(logger);
}

// Fork into the background. Returns in the child; the parent exits with the
// status the child reports through `ready_fd` (0 once it serves).
int daemonize() {
  int p[2];
  if (pipe2(p, O_CLOEXEC) < 0) return -1;
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid > 0) {
    close(p[1]);
    char status = 1;
    ssize_t n = read(p[0], &status, 1);
    _exit(n == 1 ? status : kExitFailure);
  }
  close(p[0]);
  setsid();
  int null = open("/dev/null", O_RDWR);
  if (null >= 0) {
    dup2(null, STDIN_FILENO);
    if (null > STDERR_FILENO) close(null);
  }
  return p[1];
}

void report_ready(int ready_fd, char status) {
  if (ready_fd < 0) return;
  ssize_t n = write(ready_fd, &status, 1);
  (void)n;
  close(ready_fd);
}

// Rolls the monitor's buckets once a second and rescores after each roll.
class Roller {
 public:
  // `periodic` runs on this thread too, once a second (auto-tuning).
  Roller(Monitor& m, std::function<void()> periodic)
      : m_(m), periodic_(std::move(periodic)), t_([this] { run(); }) {}
  ~Roller() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    t_.join();
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      cv_.wait_for(lock, std::chrono::seconds(1));
      if (stop_) break;
      lock.unlock();
      if (m_.roll()) m_.rescore();
      if (periodic_) periodic_();
      lock.lock();
    }
  }
  Monitor& m_;
  std::function<void()> periodic_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread t_;
};

// A replica's RBD requests fail after this long instead of hanging while the
// cluster is down (the replica then falls behind; see RbdBackendOptions).
constexpr unsigned kReplicaOpTimeoutS = 30;
// The replica's initial copy takes at most this many segments in the
// monitor's priority order before the rest in offset order.
constexpr size_t kReplicaHotSegments = 65536;

// A device named by an rbd: spec (librbd; `rbd_op_timeout_s` as in
// RbdBackendOptions) or by a path (a file or block device on io_uring).
// `rbd_holes`: the image reports holes (the backing; see RbdBackendOptions).
Result<std::unique_ptr<IoBackend>> open_device(
    const std::string& spec, bool read_only, bool break_lock, unsigned rbd_op_timeout_s = 0,
    FileBackendOptions::Direct direct = FileBackendOptions::Direct::kAuto, bool rbd_holes = false) {
  if (is_rbd_spec(spec)) {
    RbdBackendOptions ro;
    ro.read_only = read_only;
    ro.break_lock = break_lock;
    ro.op_timeout_s = rbd_op_timeout_s;
    ro.report_holes = rbd_holes;
    return open_rbd_backend(spec, ro);
  }
  FileBackendOptions fo;
  fo.read_only = read_only;
  fo.direct = direct;
  return open_uring_backend(spec, fo);
}

// An RBD image's name without its options (pool, namespace, image, snapshot).
std::string rbd_name(const std::string& spec) {
  auto p = parse_rbd_spec(spec);
  return p ? rbd_spec_name(*p) : spec;
}

std::shared_ptr<IoBackend> open_primary(const Config& cfg) {
  Result<std::unique_ptr<IoBackend>> backend = Status::invalid("no backing");
  if (is_nbd_uri(cfg.backing)) {
    if (cfg.direct_io != "auto") spdlog::warn("--direct-io applies to a file backing, not to an NBD URI");
    NbdBackendOptions no;
    no.read_only = cfg.read_only;
    backend = open_nbd_backend(cfg.backing, no);
  } else {
    backend = open_device(cfg.backing, cfg.read_only, cfg.rbd_break_lock, 0,
                          cfg.direct_io == "on"    ? FileBackendOptions::Direct::kOn
                          : cfg.direct_io == "off" ? FileBackendOptions::Direct::kOff
                                                   : FileBackendOptions::Direct::kAuto,
                          /*rbd_holes=*/true);
  }
  if (!backend) {
    spdlog::error("{}", backend.status().message());
    return nullptr;
  }
  return std::shared_ptr<IoBackend>(std::move(*backend));
}

MonitorConfig monitor_config(const Config& cfg, uint64_t device_bytes) {
  MonitorConfig mc;
  mc.device_bytes = device_bytes;
  mc.segment_bytes = cfg.segment_size_bytes;
  mc.bucket_seconds = cfg.bucket_seconds;
  mc.window_seconds = cfg.windows_seconds;
  mc.history_max_records = cfg.history_max_records;
  return mc;
}

// Whether the I/O threads' busy-poll pays. It does when completions come
// from the kernel (io_uring on a local file or device). It does not when
// threads of this process produce them (librbd's and libnbd's callbacks),
// or when a replica on RBD keeps the Ceph client busy: a spin takes the CPU
// those threads need, and on a small host that costs more than a wake-up.
// Measured on 2 cores (fio 4k randwrite QD32, OSD on the same host): with
// --replica on RBD, 4,700-5,700 IOPS spinning against 7,200-8,800 without;
// with a replica file on tmpfs, 12,700-13,100 spinning against 10,300
// without; a local backing without replica, 14,900 against 14,600.
bool spin_helps(const Config& cfg) {
  return !is_rbd_spec(cfg.backing) && !is_nbd_uri(cfg.backing) && !is_rbd_spec(cfg.replica) &&
         !is_rbd_spec(cfg.restore_from) &&
         std::none_of(cfg.pool.begin(), cfg.pool.end(), [](const std::string& p) { return is_rbd_spec(p); });
}

nbd::ServerOptions server_options(const Config& cfg) {
  nbd::ServerOptions so;
  so.unix_paths = cfg.unix_sockets;
  so.tcp = cfg.listen;
  const int n_fds = sd_listen_fds(1);
  for (int i = 0; i < n_fds; ++i) so.inherited_fds.push_back(SD_LISTEN_FDS_START + i);
  if (so.unix_paths.empty() && so.tcp.empty() && so.inherited_fds.empty()) {
    so.tcp.push_back("127.0.0.1:10809");
  }
  so.io_threads = cfg.io_threads;
  so.busy_poll_ns = spin_helps(cfg) ? uint64_t{cfg.busy_poll_us} * 1000 : 0;
  so.max_connections = cfg.max_connections;
  so.limits.max_payload_bytes = cfg.max_payload_bytes;
  so.limits.max_inflight = cfg.max_inflight_per_connection;
  return so;
}

// ------------------------------------------------------------ shadow pool

std::string join(const std::vector<std::string>& parts, const char* sep = ", ") {
  std::string out;
  for (const std::string& p : parts) out += (out.empty() ? "" : sep) + p;
  return out;
}

std::optional<std::string> canonical_path(const std::string& path) {
  char* real = ::realpath(path.c_str(), nullptr);
  if (real == nullptr) return std::nullopt;
  std::string out(real);
  std::free(real);
  return out;
}

// Exclusive advisory locks (flock) on the pool devices, held while the
// daemon runs: a second shadowd on the same pool would corrupt it.
class PoolLocks {
 public:
  PoolLocks() = default;
  PoolLocks(const PoolLocks&) = delete;
  PoolLocks& operator=(const PoolLocks&) = delete;
  ~PoolLocks() {
    for (int fd : fds_) ::close(fd);  // releases the lock
  }
  Status lock(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Status::from_errno(errno, "pool device " + path);
    if (::flock(fd, LOCK_EX | LOCK_NB) < 0) {
      const int err = errno;
      ::close(fd);
      if (err == EWOULDBLOCK) {
        return Status::error(Status::Code::kBusy,
                             "pool device " + path +
                                 " is in use by another process (is another shadowd running "
                                 "on this pool?)",
                             err);
      }
      return Status::from_errno(err, "cannot lock pool device " + path);
    }
    fds_.push_back(fd);
    return Status::ok();
  }

 private:
  std::vector<int> fds_;
};

// What a pool device holds, as far as --init is concerned.
struct DeviceState {
  enum class Kind { kBlank, kOurs, kForeign, kUnreadable } kind = Kind::kBlank;
  pool::Superblock sb;  // kOurs, kForeign
  Status error;         // kUnreadable
};

std::string describe_pool(const pool::Superblock& sb) {
  return "the shadow pool of " + sb.primary_id + " (" + std::to_string(sb.primary_bytes) +
         " bytes, segments of " + ctl::format_bytes(sb.segment_bytes) + ", tier " +
         std::to_string(sb.tier) + " of " + std::to_string(sb.tier_count) + ", formatted " +
         ctl::format_utc(sb.epoch_ns / 1'000'000'000) + ")";
}

// Why the pool could not be opened, and the exit status that goes with it.
struct PoolError {
  int rc = kExitFailure;
  std::string message;
};

// Open the pool devices, format them as --init/--force say, and open the
// store over `primary`. The store is not started. With --replica, `replica`
// is opened and started, and its taps stand between the store and the devices.
std::variant<std::unique_ptr<ShadowStore>, PoolError> open_pool(
    const Config& cfg, bool force, const std::shared_ptr<IoBackend>& primary, const Clock& clock,
    Monitor* monitor, PoolLocks& locks, std::unique_ptr<Replica>& replica) {
  auto fail = [](int rc, std::string message) { return PoolError{rc, std::move(message)}; };
  // The primary's identity in the pool: a file's canonical path, or an NBD
  // URI as given (without a password), so the same URI finds its pool again.
  // An RBD image is named by pool/namespace/image, without its options.
  const std::optional<std::string> primary_id =
      is_nbd_uri(cfg.backing)    ? std::optional(redact_nbd_uri(cfg.backing))
      : is_rbd_spec(cfg.backing) ? std::optional(rbd_name(cfg.backing))
                                 : canonical_path(cfg.backing);
  if (!primary_id) {
    return fail(kExitFailure, "cannot resolve " + cfg.backing + ": " + std::strerror(errno));
  }
  if (primary_id->size() > pool::kMaxPrimaryId) {
    return fail(kExitUsage, "the backing's name is " + std::to_string(primary_id->size()) +
                                " bytes long; a shadow pool records at most " +
                                std::to_string(pool::kMaxPrimaryId));
  }
  const uint64_t primary_bytes = primary->info().size_bytes;

  std::vector<PoolDevice> devices;
  std::vector<std::string> canonical;
  for (const std::string& path : cfg.pool) {
    const bool rbd = is_rbd_spec(path);
    auto dev = open_device(path, /*read_only=*/false, cfg.rbd_break_lock);
    if (!dev) return fail(kExitFailure, "pool device " + path + ": " + dev.status().message());
    const std::string real = rbd ? rbd_name(path) : canonical_path(path).value_or(path);
    if (real == *primary_id) {
      return fail(kExitUsage, "pool device " + path + " is the backing " + cfg.backing +
                                  " itself: the pool must be a separate device or file");
    }
    for (size_t i = 0; i < canonical.size(); ++i) {
      if (canonical[i] == real) {
        return fail(kExitUsage, "pool devices " + cfg.pool[i] + " and " + path +
                                    " are the same file (" + real + ")");
      }
    }
    canonical.push_back(real);
    Status locked = rbd ? Status::ok() : locks.lock(path);  // an RBD image has its exclusive lock
    if (!locked) return fail(kExitFailure, locked.message());
    devices.push_back(PoolDevice{path, std::shared_ptr<IoBackend>(std::move(*dev))});
  }

  // What each device holds.
  std::vector<DeviceState> states;
  for (const PoolDevice& d : devices) {
    DeviceState st;
    Result<pool::Superblock> sb = ShadowStore::read_superblock(*d.backend);
    if (sb) {
      st.sb = *sb;
      const bool ours = sb->primary_id == *primary_id && sb->primary_bytes == primary_bytes &&
                        sb->segment_bytes == cfg.segment_size_bytes;
      st.kind = ours ? DeviceState::Kind::kOurs : DeviceState::Kind::kForeign;
    } else if (sb.status().code() == Status::Code::kNotFound) {
      st.kind = DeviceState::Kind::kBlank;  // no superblock at all: not a pool (a damaged one is unreadable)
    } else {
      st.kind = DeviceState::Kind::kUnreadable;
      st.error = sb.status();
    }
    states.push_back(std::move(st));
  }
  const std::string this_primary = "this shadowd serves " + *primary_id + " (" +
                                   std::to_string(primary_bytes) + " bytes, segments of " +
                                   ctl::format_bytes(cfg.segment_size_bytes) + ")";

  bool reformat = false;  // format over what the devices hold
  bool format = false;
  if (!cfg.init) {
    for (size_t i = 0; i < devices.size(); ++i) {
      const DeviceState& st = states[i];
      const std::string& path = devices[i].path;
      if (st.kind == DeviceState::Kind::kBlank) {
        return fail(kExitUsage,
                    path + " is not a shadow pool; start once with --init to format it");
      }
      if (st.kind == DeviceState::Kind::kUnreadable) {
        return fail(kExitFailure, "cannot read the pool superblock of " + path + ": " +
                                      st.error.message() +
                                      (st.error.code() == Status::Code::kCorruption
                                           ? " (--init --force reformats it, discarding its history)"
                                           : ""));
      }
      // open() refuses this too; say here which option to change.
      if (st.kind == DeviceState::Kind::kForeign && st.sb.primary_id == *primary_id &&
          st.sb.primary_bytes == primary_bytes) {
        return fail(kExitUsage,
                    path + " holds a pool with segments of " +
                        ctl::format_bytes(st.sb.segment_bytes) + " (" +
                        std::to_string(st.sb.segment_bytes) + ") but shadowd runs with " +
                        "--segment-size " + std::to_string(cfg.segment_size_bytes) +
                        "; a pool's segment size is fixed when it is formatted: start with "
                        "--segment-size " + std::to_string(st.sb.segment_bytes));
      }
    }
    // A pool of another primary is refused by open() below.
  } else {
    size_t blank = 0, ours = 0;
    std::vector<std::string> problems;
    for (size_t i = 0; i < devices.size(); ++i) {
      const DeviceState& st = states[i];
      const std::string& path = devices[i].path;
      switch (st.kind) {
        case DeviceState::Kind::kBlank: ++blank; break;
        case DeviceState::Kind::kOurs: ++ours; break;
        case DeviceState::Kind::kForeign:
          problems.push_back(path + " holds " + describe_pool(st.sb) + ", but " + this_primary);
          break;
        case DeviceState::Kind::kUnreadable:
          problems.push_back("cannot read the pool superblock of " + path + ": " +
                             st.error.message());
          break;
      }
    }
    if (problems.empty() && ours == devices.size()) {
      // Already this primary's pool: the devices must form it as given.
      const pool::Superblock& first = states[0].sb;
      bool one_pool = true;
      for (size_t i = 0; i < devices.size(); ++i) {
        const pool::Superblock& sb = states[i].sb;
        one_pool &= sb.pool_uuid == first.pool_uuid && sb.tier_count == devices.size();
        if (sb.pool_uuid != first.pool_uuid || sb.tier != i || sb.tier_count != devices.size()) {
          problems.push_back(
              devices[i].path + " holds " + describe_pool(sb) + ", but --pool gives it as tier " +
              std::to_string(i) + " of " + std::to_string(devices.size()) +
              (sb.pool_uuid != first.pool_uuid ? " of a pool with another UUID" : ""));
        }
      }
      if (!problems.empty() && one_pool && devices.size() == 2 && states[0].sb.tier == 1 &&
          states[1].sb.tier == 0) {
        problems = {"the pool's devices are given in the wrong order: tier 0 is " +
                    devices[1].path + ", tier 1 is " + devices[0].path + " (use --pool " +
                    devices[1].path + "," + devices[0].path + ")"};
      }
    } else if (problems.empty() && ours > 0) {
      for (size_t i = 0; i < devices.size(); ++i) {
        if (states[i].kind != DeviceState::Kind::kBlank) continue;
        problems.push_back(devices[i].path + " is blank but the other pool device holds " +
                           describe_pool(states[1 - i].sb) +
                           "; the devices of one pool are formatted together");
      }
    }
    if (!problems.empty()) {
      if (!force) {
        return fail(kExitUsage, join(problems, "; ") +
                                    ". Refusing to format over it: choose other devices, or "
                                    "add --force to discard that history and reformat");
      }
      spdlog::warn("--init --force: reformatting the pool, discarding what it held: {}",
                   join(problems, "; "));
      format = reformat = true;
    } else if (blank == devices.size()) {
      format = true;
    } else {
      for (size_t i = 0; i < devices.size(); ++i) {
        const pool::Superblock& sb = states[i].sb;
        spdlog::info("--init: {} already holds {} with zones of {}: using it as it is",
                     devices[i].path, describe_pool(sb), ctl::format_bytes(sb.zone_bytes));
      }
    }
  }

  if (format) {
    FormatOptions fo;
    fo.primary_id = *primary_id;
    fo.primary_bytes = primary_bytes;
    fo.segment_bytes = cfg.segment_size_bytes;
    fo.zone_bytes = cfg.zone_size_bytes;
    fo.force = reformat;
    Status st = ShadowStore::format(devices, fo, clock);
    if (!st) return fail(kExitFailure, "cannot format the shadow pool: " + st.message());
    std::vector<std::string> what;
    for (size_t i = 0; i < devices.size(); ++i) {
      what.push_back(devices[i].path + " (tier " + std::to_string(i) + ")");
    }
    spdlog::info("formatted the shadow pool {} for {}: segments of {}, zones of {}",
                 join(what), *primary_id, ctl::format_bytes(fo.segment_bytes),
                 ctl::format_bytes(fo.zone_bytes));
  }

  StoreOptions so;
  so.primary_id = *primary_id;
  so.segment_bytes = cfg.segment_size_bytes;  // the monitor's: the pool's must match
  so.retention_seconds = cfg.retention_seconds;
  so.pool_max_bytes = cfg.pool_max_bytes;
  so.max_versions_per_segment = cfg.max_versions_per_segment;
  so.shadow_budget_bytes_per_s = cfg.shadow_budget_bytes_per_s;
  so.shadow_busy_budget_bytes_per_s = cfg.shadow_budget_busy_bytes_per_s;
  so.checkpoint_interval_s = cfg.checkpoint_interval_s;
  so.pool_full_wait_ms = cfg.pool_full_wait_ms;
  so.policy = *parse_policy(cfg.shadow_policy);  // validated with the config
  so.state_dir = cfg.state_dir;
  so.export_name = cfg.export_name;
  std::shared_ptr<IoBackend> store_primary = primary;
  if (!cfg.replica.empty()) {
    // The replica's taps sit right above the devices: every write the
    // store makes to a pool device or the primary is shipped.
    const bool rbd = is_rbd_spec(cfg.replica);
    const std::string real = rbd ? rbd_name(cfg.replica) : canonical_path(cfg.replica).value_or(cfg.replica);
    if (real == *primary_id || std::find(canonical.begin(), canonical.end(), real) != canonical.end()) {
      return fail(kExitUsage, "the replica " + cfg.replica +
                                  " is the backing or a pool device: it must be a device of its own");
    }
    auto t = open_device(cfg.replica, /*read_only=*/false, cfg.rbd_break_lock, kReplicaOpTimeoutS);
    if (!t) return fail(kExitFailure, "replica " + cfg.replica + ": " + t.status().message());
    std::shared_ptr<IoBackend> target = std::move(*t);
    if (!rbd) {  // an RBD image has its exclusive lock
      Status locked = locks.lock(cfg.replica);
      if (!locked) return fail(kExitFailure, locked.message());
    }
    ReplicaHeader layout;
    layout.primary_id = *primary_id;
    layout.primary_bytes = primary_bytes;
    std::vector<std::shared_ptr<IoBackend>> areas;
    for (const PoolDevice& d : devices) {
      layout.pool_bytes.push_back(d.backend->size_bytes());
      areas.push_back(d.backend);
    }
    areas.push_back(primary);
    ReplicaOptions ropts;
    ropts.sync = cfg.replica_sync;
    ropts.max_lag_s = cfg.replica_max_lag_seconds;
    ropts.max_backlog_bytes = cfg.replica_max_backlog_bytes;
    ropts.resync_bytes_per_s = cfg.shadow_budget_bytes_per_s;
    // An RBD request fails after its op timeout: wait that long (and a
    // little) at the stop rather than leave the image open and locked.
    if (rbd) ropts.stop_grace_ms = (kReplicaOpTimeoutS + 5) * 1000;
    auto r = Replica::open(target, layout, std::move(areas), ropts,
                           rbd ? rbd_name(cfg.replica) : cfg.replica);
    if (!r) return fail(kExitUsage, r.status().message());
    replica = std::move(*r);
    for (size_t i = 0; i < devices.size(); ++i) devices[i].backend = replica->tap(i);
    store_primary = replica->tap(devices.size());
    replica->start();
  }
  auto store = ShadowStore::open(std::move(devices), store_primary, so, clock, monitor);
  if (!store) {
    const Status::Code code = store.status().code();
    // A pool that does not belong here is the operator's to fix (exit 2);
    // an I/O failure is a runtime failure (exit 1).
    const bool usage = code == Status::Code::kInvalid || code == Status::Code::kCorruption ||
                       code == Status::Code::kNotFound;
    return fail(usage ? kExitUsage : kExitFailure,
                "cannot open the shadow pool: " + store.status().message());
  }
  if ((*store)->segment_bytes() != cfg.segment_size_bytes) {
    return fail(kExitUsage, "the shadow pool has segments of " +
                                std::to_string((*store)->segment_bytes()) +
                                " bytes but shadowd runs with --segment-size " +
                                std::to_string(cfg.segment_size_bytes));
  }
  if (replica && monitor != nullptr) {
    // The store gave the monitor its persisted access history: the initial
    // copy takes the primary's hottest segments first.
    monitor->rescore();
    std::vector<uint64_t> hot;
    for (uint64_t id : monitor->top_k(kReplicaHotSegments)) hot.push_back(id * monitor->segment_bytes());
    if (!hot.empty()) {
      spdlog::info("replica: the initial copy takes the {} hottest segments first", hot.size());
    }
    replica->set_hot_order(std::move(hot));
  }
  return std::move(*store);
}

// One line about the opened pool.
void log_pool(const ShadowStore& store) {
  const StoreStats st = store.stats();
  std::vector<std::string> tiers;
  for (const TierUse& t : st.tiers) {
    tiers.push_back(t.path + " (tier " + std::to_string(t.tier) + ", " + std::to_string(t.zones) +
                    " zones of " + ctl::format_bytes(t.zone_bytes) + ", " +
                    std::to_string(t.zones_free) + " free)");
  }
  constexpr int64_t kNs = 1'000'000'000;
  spdlog::info(
      "shadow pool {}: window {} .. {} (seq {}..{}), {} versions, {} journal records; "
      "recovered {} records past the checkpoint, {} re-applied to the primary{}{}",
      join(tiers), ctl::format_utc(st.retention_start_ns / kNs),
      ctl::format_utc(st.newest_ns / kNs), st.first_seq, st.last_seq, st.versions,
      st.journal_records, st.recovered_records, st.redo_records,
      st.redo_skipped ? " (" + std::to_string(st.redo_skipped) + " not: history was degraded after them)"
                      : std::string(),
      st.degraded ? "; DEGRADED: " + st.degraded_reason : std::string());
}

// SIGHUP: re-read the config file and apply what may change at run time.
void reload(DaemonContext& ctx) {
  if (ctx.config_path.empty()) {
    spdlog::info("SIGHUP: no config file to reload");
    return;
  }
  // Held throughout, as `config.set` does, so the two never interleave.
  std::lock_guard<std::mutex> lock(ctx.config_mu);
  Config next = ctx.config;
  Status st = load_config_file(ctx.config_path, next);
  if (st) st = next.validate();
  std::vector<std::string> start_time;
  if (st) start_time = start_time_changes(ctx.config, next);
  if (st) st = apply_runtime_config(ctx, next);
  if (!st) {
    spdlog::error("SIGHUP: config not reloaded: {}", st.message());
    return;
  }
  spdlog::info("SIGHUP: reloaded tunables from {}", ctx.config_path);
  if (!start_time.empty()) {
    spdlog::warn("SIGHUP: start-time settings in {} differ from the running daemon's and "
                 "apply only when shadowd restarts: {}",
                 ctx.config_path, join(start_time));
  }
}

// --restore-from: the replica's pool areas and mirror, each through an
// overlay that takes recovery's writes in memory (the replica is opened
// read-only and never written).
struct ReplicaView {
  std::string name;
  ReplicaHeader header;
  std::vector<PoolDevice> devices;
  std::shared_ptr<IoBackend> primary;
  std::string state_dir;  // a temporary one, removed at the end
};

std::variant<ReplicaView, std::string> open_replica_view(const Config& cfg) {
  ReplicaView v;
  auto t = open_device(cfg.restore_from, /*read_only=*/true, /*break_lock=*/false, kReplicaOpTimeoutS);
  if (!t) return "replica " + cfg.restore_from + ": " + t.status().message();
  std::shared_ptr<IoBackend> target = std::move(*t);
  v.name = is_rbd_spec(cfg.restore_from) ? rbd_name(cfg.restore_from) : cfg.restore_from;
  auto h = read_replica_header(*target);
  if (!h) return "replica " + v.name + ": " + h.status().message();
  v.header = *h;
  if (h->state != ReplicaState::kInSync) {
    return "replica " + v.name + " is " + replica_state_name(h->state) +
           " (its writer was copying changed chunks to it, so it is not a state a crash could "
           "leave, last updated " + ctl::format_at_utc(h->updated_ns) +
           "): nothing can be restored from it until it is in sync again";
  }
  if (target->size_bytes() < h->total_bytes()) {
    return "replica " + v.name + " has " + std::to_string(target->size_bytes()) +
           " bytes, less than its header's layout (" + std::to_string(h->total_bytes()) + ")";
  }
  for (size_t i = 0; i < h->pool_bytes.size(); ++i) {
    v.devices.push_back(PoolDevice{v.name + " (pool tier " + std::to_string(i) + ")",
                                   std::make_shared<OverlayBackend>(target, h->pool_offset(i),
                                                                    h->pool_bytes[i])});
  }
  v.primary = std::make_shared<OverlayBackend>(target, h->primary_offset(), h->primary_bytes);
  return v;
}

void stop_store_now(DaemonContext& ctx, std::unique_ptr<ShadowStore>& store) {
  ctx.reconstructor.reset();
  ctx.store = nullptr;
  if (store) (void)store->stop();
}

// The store over a replica view: nothing pruned, nothing shadowed.
Result<std::unique_ptr<ShadowStore>> open_replica_store(const Config& cfg, ReplicaView& v,
                                                        const Clock& clock) {
  StoreOptions so;
  so.primary_id = v.header.primary_id;
  so.segment_bytes = 0;  // the pool's
  so.retention_seconds = 100ull * 366 * 86400;
  so.shadow_budget_bytes_per_s = 0;
  so.shadow_busy_budget_bytes_per_s = 0;
  so.checkpoint_interval_s = 86400;
  so.pool_full_wait_ms = 0;
  so.policy = PolicyKind::kNone;
  so.shadow_thread = false;
  so.export_name = cfg.export_name;
  // Recovery's degraded-state record goes to a directory of its own: the
  // state of the host that wrote the replica is not here.
  char tmpl[] = "/tmp/shadowd-restore-from.XXXXXX";
  const char* dir = mkdtemp(tmpl);
  if (dir == nullptr) return Status::from_errno(errno, "mkdtemp");
  so.state_dir = dir;
  v.state_dir = dir;
  return ShadowStore::open(std::move(v.devices), v.primary, so, clock, nullptr);
}

int serve(DaemonContext& ctx, bool force_format, int ready_fd) {
  const Config& cfg = ctx.config;
  std::optional<ReplicaView> view;
  struct RemoveStateDir {  // declared before the store: runs after it is gone
    std::optional<ReplicaView>& v;
    ~RemoveStateDir() {
      std::error_code ec;
      if (v && !v->state_dir.empty()) std::filesystem::remove_all(v->state_dir, ec);
    }
  } remove_state_dir{view};
  std::shared_ptr<IoBackend> primary;
  if (!cfg.restore_from.empty()) {
    auto v = open_replica_view(cfg);
    if (auto* e = std::get_if<std::string>(&v)) {
      spdlog::error("{}", *e);
      return kExitFailure;
    }
    view = std::move(std::get<ReplicaView>(v));
    primary = view->primary;
  } else {
    primary = open_primary(cfg);
  }
  if (!primary) return kExitFailure;
  const BackendInfo info = primary->info();

  SystemClock system_clock;
  std::unique_ptr<ManualClock> manual_clock;
  if (cfg.test_clock) {
    manual_clock = std::make_unique<ManualClock>(system_clock.now_ns());
    ctx.test_clock = manual_clock.get();
  }
  ctx.clock = manual_clock ? static_cast<const Clock*>(manual_clock.get()) : &system_clock;
  ctx.started_s = ctx.clock->now_s();

  std::unique_ptr<Monitor> monitor;
  std::shared_ptr<IoBackend> served = primary;
  if (cfg.monitor) {
    monitor = std::make_unique<Monitor>(monitor_config(cfg, info.size_bytes), *ctx.clock);
    Status st = monitor->set_priority(priority_params(cfg));
    if (!st) {
      spdlog::error("{}", st.message());
      return kExitFailure;
    }
    ctx.monitor = monitor.get();
  }

  // The shadow pool journals every write before the primary sees it; the
  // monitor stays outermost so that it counts what clients asked for.
  PoolLocks pool_locks;  // released after the store is gone
  std::unique_ptr<Replica> replica;  // stopped after the store (its last checkpoint is shipped)
  std::unique_ptr<ShadowStore> store;
  // Leaving serve(), the context lets go of what ends here: the export's
  // backend may refer to the store and the monitor. (Declared after them,
  // so it runs before they are destroyed.)
  struct Release {
    DaemonContext& ctx;
    ~Release() {
      {
        std::lock_guard<std::mutex> lock(ctx.pit_mu);
        ctx.pit_exports.clear();
      }
      ctx.registry = nullptr;
      ctx.gate = nullptr;
      ctx.journal.reset();
      ctx.reconstructor.reset();
      ctx.export_.reset();
      ctx.store = nullptr;
      ctx.replica = nullptr;
      ctx.monitor = nullptr;
    }
  } release{ctx};
  if (!cfg.pool.empty()) {
    auto opened = open_pool(cfg, force_format, primary, *ctx.clock, monitor.get(), pool_locks, replica);
    if (auto* e = std::get_if<PoolError>(&opened)) {
      spdlog::error("{}", e->message);
      return e->rc;
    }
    store = std::move(std::get<std::unique_ptr<ShadowStore>>(opened));
    store->start();
    ctx.store = store.get();
    ctx.replica = replica.get();
    served = store->backend();
    log_pool(*store);
    // Restore: point-in-time exports and commands reconstruct through one
    // Reconstructor (2 workers, 64 MiB of reconstructed segments cached);
    // a rollback pauses the export at the gate and writes below it.
    ctx.journal = served;
    ctx.reconstructor = std::make_shared<Reconstructor>(*store, served->size_bytes(), store->segment_bytes(), 2,
                                                        uint64_t{64} << 20);
    auto gate = std::make_shared<GateBackend>(served);
    ctx.gate = gate.get();
    served = gate;
  } else if (view) {
    auto opened = open_replica_store(cfg, *view, *ctx.clock);
    if (!opened) {
      spdlog::error("cannot open the history in the replica {}: {}", view->name,
                    opened.status().message());
      return kExitFailure;
    }
    store = std::move(*opened);
    store->start();
    ctx.store = store.get();
    ctx.reconstructor = std::make_shared<Reconstructor>(*store, primary->size_bytes(), store->segment_bytes(), 2,
                                                        uint64_t{64} << 20);
    auto at = ctl::parse_at(cfg.restore_at, ctx.clock->now_ns());
    if (auto* e = std::get_if<std::string>(&at)) {
      spdlog::error("--at: {}", *e);
      stop_store_now(ctx, store);
      return kExitUsage;
    }
    const ctl::AtSpec& spec = std::get<ctl::AtSpec>(at);
    const nlohmann::json args = spec.kind == ctl::AtSpec::Kind::kSeq ? nlohmann::json{{"seq", spec.seq}}
                                                                     : nlohmann::json{{"at_ns", spec.time_ns}};
    auto point = resolve_restore_point(ctx, args);
    if (auto* e = std::get_if<std::string>(&point)) {
      spdlog::error("--at {}: {}", cfg.restore_at, *e);
      stop_store_now(ctx, store);
      return kExitUsage;
    }
    const RestorePoint rp = std::get<RestorePoint>(point);
    served = std::make_shared<PointInTimeBackend>(ctx.reconstructor, rp.seq);
    spdlog::info("serving {} at {} (seq {}) from the replica {} (written for {})", cfg.export_name,
                 ctl::format_at_utc(rp.time_ns), rp.seq, view->name, view->header.primary_id);
  } else {
    // Without the pool nothing is replayed; its state file must stay for
    // when it is used again (the writes made now bypass its journal too).
    for (const std::string& f : find_state_files(cfg.state_dir, cfg.export_name)) {
      spdlog::warn("{}: the history of a shadow pool of export '{}' was degraded when shadowd last ran "
                   "with it; serving without --pool, the file is kept (it stops that pool's journal "
                   "from being replayed over the writes made since)",
                   f, cfg.export_name);
    }
  }
  // Stop the pool's threads (final checkpoint) once nothing can reach it.
  bool replica_left = false;  // its shipper was left inside a target request
  auto stop_store = [&] {
    if (!store) return;
    ctx.store = nullptr;
    Status ss = store->stop();
    if (!ss) spdlog::error("shadow pool: stop: {}", ss.message());
    if (replica) {
      ctx.replica = nullptr;
      // Ships what is queued if the target takes it within 5 s; bounded.
      replica_left = !replica->stop();
      const ReplicaStats rs = replica->stats();
      spdlog::info("replica {}: stopped {} ({} queued bytes not shipped)", replica->target_name(),
                   replica_state_name(rs.state), rs.backlog_bytes);
    }
  };
  if (monitor) served = std::make_shared<MonitoredBackend>(served, *monitor);

  auto exp = std::make_shared<nbd::Export>();
  exp->name = cfg.export_name;
  exp->description = cfg.description;
  exp->backend = served;
  exp->read_only = cfg.read_only;
  exp->max_payload_bytes = cfg.max_payload_bytes;
  ctx.export_ = exp;
  nbd::ExportRegistry registry;
  registry.add(exp);
  if (store) ctx.registry = &registry;

  nbd::ServerOptions so = server_options(cfg);
  if (cfg.busy_poll_us > 0 && so.busy_poll_ns == 0) {
    spdlog::info("I/O threads do not busy-poll (busy_poll_us {} ignored): with this backing, "
                 "replica or restore, completions come from shadowd's own threads",
                 cfg.busy_poll_us);
  }
  so.tls = ctx.tls;
  nbd::Server server(registry, std::move(so));
  Status st = server.start();
  if (!st) {
    spdlog::error("cannot start: {}", st.message());
    stop_store();
    return kExitFailure;
  }
  ctx.server = &server;
  std::unique_ptr<Roller> roller;
  {
    std::lock_guard<std::mutex> lock(ctx.tune.mu);
    ctx.tune.enabled = cfg.tune_interval_s > 0;
    ctx.tune.interval_s = cfg.tune_interval_s > 0 ? cfg.tune_interval_s : 3600;
  }
  if (monitor) roller = std::make_unique<Roller>(*monitor, [&ctx] { maybe_tune(ctx); });

  const std::string control_path =
      cfg.control.empty() ? "/run/shadowd/" + cfg.export_name + ".sock" : cfg.control;
  ControlServer control(ctx, control_path, cfg.control_group);
  st = control.start();
  if (!st) {
    spdlog::error("control socket: {}", st.message());
    server.stop();
    stop_store();
    return kExitFailure;
  }
  MetricsEndpoint metrics(ctx);
  if (!cfg.metrics_listen.empty()) {
    st = metrics.start(cfg.metrics_listen);
    if (!st) {
      spdlog::error("metrics endpoint: {}", st.message());
      control.stop();
      server.stop();
      stop_store();
      return kExitFailure;
    }
  }

  std::string where;
  for (const auto& e : server.endpoints()) where += (where.empty() ? "" : ", ") + e;
  const char* access = is_nbd_uri(cfg.backing) ? "over NBD" : info.direct_io ? "O_DIRECT" : "buffered";
  spdlog::info("serving export '{}' ({}{}, {}) on {}", exp->name, ctl::format_bytes(info.size_bytes),
               cfg.read_only ? ", read-only" : "", access, where);
  if (ctx.tls) {
    spdlog::info("TLS {}: {}", nbd::tls_mode_name(ctx.tls->mode()), ctx.tls->describe());
  }
  if (monitor) {
    spdlog::info("monitoring {} segments of {}", monitor->segment_count(),
                 ctl::format_bytes(monitor->segment_bytes()));
  }
  spdlog::info("control socket {}{}", control_path,
               cfg.metrics_listen.empty() ? "" : "; metrics on http://" + cfg.metrics_listen + "/metrics");
  if (!cfg.pidfile.empty()) {
    std::ofstream(cfg.pidfile) << getpid() << "\n";
  }
  sd_notifyf(0, "READY=1\nSTATUS=serving %s on %s\nMAINPID=%d", exp->name.c_str(), where.c_str(),
             static_cast<int>(getpid()));
  report_ready(ready_fd, 0);

  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  int sig = 0;
  while (sigwait(&set, &sig) == 0 && sig == SIGHUP) {
    sd_notify(0, "RELOADING=1\nSTATUS=reloading");
    reload(ctx);
    sd_notifyf(0, "READY=1\nSTATUS=serving %s on %s", exp->name.c_str(), where.c_str());
  }
  spdlog::info("{} received: finishing in-flight requests", strsignal(sig));
  sd_notify(0, "STOPPING=1\nSTATUS=stopping");
  ctx.tune.cancel = true;  // a tuning run in progress stops at its next trial
  metrics.stop();
  control.stop();
  server.stop();
  roller.reset();
  ctx.server = nullptr;
  {
    // Point-in-time exports hold the reconstructor, which reads the store.
    std::lock_guard<std::mutex> lock(ctx.pit_mu);
    for (const auto& [name, x] : ctx.pit_exports) registry.remove(name);
    ctx.pit_exports.clear();
  }
  ctx.registry = nullptr;
  ctx.reconstructor.reset();
  stop_store();  // after the server: no request is in flight any more
  if (!cfg.read_only) {
    Status fs = run_sync(*primary, BlockOpKind::kFlush, 0, 0);
    if (!fs) spdlog::error("final flush: {}", fs.message());
  }
  if (!cfg.pidfile.empty()) unlink(cfg.pidfile.c_str());
  if (replica_left) {
    // The replica's shipper still runs, inside a request to the target: the
    // process ends now, before static destructors it might race with.
    spdlog::info("stopped (without the replica's last request)");
    spdlog::shutdown();
    std::fflush(nullptr);
    ::_exit(0);
  }
  spdlog::info("stopped");
  return 0;
}

}  // namespace
}  // namespace shadowd

int main(int argc, char** argv) {
  using namespace shadowd;
  CLI::App app{"shadowd"};
  Cli cli;
  build_cli(app, cli);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : kExitUsage;  // --help/--version exit 0
  }
  DaemonContext ctx;
  Config& cfg = ctx.config;
  ctx.config_path = cli.config_path;
  if (!cli.config_path.empty()) {
    Status st = load_config_file(cli.config_path, cfg);
    if (!st) {
      std::fprintf(stderr, "shadowd: %s\n", st.message().c_str());
      return kExitUsage;
    }
  }
  for (auto& apply : cli.overrides) apply(cfg);
  Status st = cfg.validate();
  if (st && cfg.backing.empty() && cfg.restore_from.empty()) {
    st = Status::invalid("--backing (or config key 'backing') is required");
  }
  if (!cfg.restore_from.empty()) {
    cfg.read_only = true;  // a restored state is served read-only
    cfg.monitor = false;
  }
  if (st && cfg.init && cfg.pool.empty()) {
    st = Status::invalid("--init (config key 'init') formats the shadow pool: it needs --pool");
  }
  if (st && cli.force && !cfg.init) {
    st = Status::invalid("--force only applies together with --init (it lets --init reformat a "
                         "device that holds another pool)");
  }
  if (st && cfg.tls_mode() != "off") {
    // Credentials are loaded and checked before anything starts.
    nbd::TlsOptions to;
    to.mode = *nbd::parse_tls_mode(cfg.tls_mode());
    to.certificates_dir = cfg.tls_certificates;
    to.verify_peer = cfg.tls_verify_peer;
    to.psk_file = cfg.tls_psk;
    auto tls = nbd::TlsContext::create(to);
    if (tls) {
      ctx.tls = std::move(*tls);
    } else {
      st = Status::invalid("TLS: " + tls.status().message());
    }
  }
  if (!st) {
    std::fprintf(stderr, "shadowd: %s\nRun with --help for more information.\n",
                 st.message().c_str());
    return kExitUsage;
  }
  setup_logging(cfg.log_level);

  // Signals: block them in every thread; the main thread waits for them.
  signal(SIGPIPE, SIG_IGN);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  int ready_fd = -1;
  if (!cfg.foreground) {
    ready_fd = daemonize();
    if (ready_fd < 0) {
      spdlog::error("cannot daemonize: {}", std::strerror(errno));
      return kExitFailure;
    }
  }
  int rc = serve(ctx, cli.force, ready_fd);
  report_ready(ready_fd, static_cast<char>(rc));
  return rc;
}
