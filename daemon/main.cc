// shadowd: serve an NBD export over a backing file or block device.
//
// The daemon's wiring: options and config, logging, daemonizing, signals,
// systemd notification and socket activation. The engine lives in core/ and
// the protocol in nbd/.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <thread>
#include <functional>
#include <string>
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
  // Apply the options the user actually gave, over the config file.
  std::vector<std::function<void(Config&)>> overrides;
};

template <typename T>
void opt(CLI::App& app, Cli& cli, const std::string& name, T Config::*field,
         const std::string& help) {
  CLI::Option* o = app.add_option(name, cli.values.*field, help);
  cli.overrides.push_back([o, field, &cli](Config& c) {
    if (o->count() > 0) c.*field = cli.values.*field;
  });
}

void flag(CLI::App& app, Cli& cli, const std::string& name, bool Config::*field,
          const std::string& help) {
  CLI::Option* o = app.add_flag(name, cli.values.*field, help);
  cli.overrides.push_back([o, field, &cli](Config& c) {
    if (o->count() > 0) c.*field = cli.values.*field;
  });
}

void build_cli(CLI::App& app, Cli& cli) {
  app.description(
      "shadowd serves an NBD export over a backing file or block device (fixed newstyle,\n"
      "structured replies, base:allocation; every command incl. TRIM, WRITE_ZEROES, CACHE,\n"
      "BLOCK_STATUS, FUA). Socket and disk I/O run on io_uring.\n\n"
      "Options override the keys of the same name (dashes become underscores) in the JSON\n"
      "config file. Without --unix, --listen or systemd socket activation it listens on\n"
      "127.0.0.1:10809. SIGTERM/SIGINT finish in-flight requests and exit 0.\n\n"
      "Examples:\n"
      "  shadowd --backing disk.img --unix /run/shadowd/disk.sock --foreground\n"
      "  nbdinfo 'nbd+unix:///disk?socket=/run/shadowd/disk.sock'\n"
      "  nbd-client -unix /run/shadowd/disk.sock -N disk /dev/nbd0");
  app.footer("Exit status: 0 on clean shutdown, 1 on a runtime failure, 2 on bad usage.");
  app.set_version_flag("--version", std::string("shadowd ") + SHADOWD_VERSION);
  opt(app, cli, "--backing", &Config::backing,
      "Backing file or block device to export (required)");
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
      "(0..1000, default 100; trades CPU for latency, like qemu's poll-max-ns)");
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
  explicit Roller(Monitor& m) : m_(m), t_([this] { run(); }) {}
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
      lock.lock();
    }
  }
  Monitor& m_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread t_;
};

std::shared_ptr<IoBackend> open_primary(const Config& cfg) {
  FileBackendOptions fo;
  fo.read_only = cfg.read_only;
  fo.direct = cfg.direct_io == "on"    ? FileBackendOptions::Direct::kOn
              : cfg.direct_io == "off" ? FileBackendOptions::Direct::kOff
                                       : FileBackendOptions::Direct::kAuto;
  auto backend = open_uring_backend(cfg.backing, fo);
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
  so.busy_poll_ns = uint64_t{cfg.busy_poll_us} * 1000;
  so.max_connections = cfg.max_connections;
  so.limits.max_payload_bytes = cfg.max_payload_bytes;
  so.limits.max_inflight = cfg.max_inflight_per_connection;
  return so;
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
  if (st) st = apply_runtime_config(ctx, next);
  if (!st) {
    spdlog::error("SIGHUP: config not reloaded: {}", st.message());
    return;
  }
  spdlog::info("SIGHUP: reloaded tunables from {}", ctx.config_path);
}

int serve(DaemonContext& ctx, int ready_fd) {
  const Config& cfg = ctx.config;
  auto primary = open_primary(cfg);
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
    served = std::make_shared<MonitoredBackend>(primary, *monitor);
    ctx.monitor = monitor.get();
  }

  auto exp = std::make_shared<nbd::Export>();
  exp->name = cfg.export_name;
  exp->description = cfg.description;
  exp->backend = served;
  exp->read_only = cfg.read_only;
  exp->max_payload_bytes = cfg.max_payload_bytes;
  ctx.export_ = exp;
  nbd::ExportRegistry registry;
  registry.add(exp);

  nbd::Server server(registry, server_options(cfg));
  Status st = server.start();
  if (!st) {
    spdlog::error("cannot start: {}", st.message());
    return kExitFailure;
  }
  ctx.server = &server;
  std::unique_ptr<Roller> roller;
  if (monitor) roller = std::make_unique<Roller>(*monitor);

  const std::string control_path =
      cfg.control.empty() ? "/run/shadowd/" + cfg.export_name + ".sock" : cfg.control;
  ControlServer control(ctx, control_path, cfg.control_group);
  st = control.start();
  if (!st) {
    spdlog::error("control socket: {}", st.message());
    server.stop();
    return kExitFailure;
  }
  MetricsEndpoint metrics(ctx);
  if (!cfg.metrics_listen.empty()) {
    st = metrics.start(cfg.metrics_listen);
    if (!st) {
      spdlog::error("metrics endpoint: {}", st.message());
      control.stop();
      server.stop();
      return kExitFailure;
    }
  }

  std::string where;
  for (const auto& e : server.endpoints()) where += (where.empty() ? "" : ", ") + e;
  spdlog::info("serving export '{}' ({}{}, {}) on {}", exp->name, ctl::format_bytes(info.size_bytes),
               cfg.read_only ? ", read-only" : "", info.direct_io ? "O_DIRECT" : "buffered", where);
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
  metrics.stop();
  control.stop();
  server.stop();
  roller.reset();
  ctx.server = nullptr;
  if (!cfg.read_only) {
    Status fs = run_sync(*primary, BlockOpKind::kFlush, 0, 0);
    if (!fs) spdlog::error("final flush: {}", fs.message());
  }
  if (!cfg.pidfile.empty()) unlink(cfg.pidfile.c_str());
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
  if (st && cfg.backing.empty()) st = Status::invalid("--backing (or config key 'backing') is required");
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
  int rc = serve(ctx, ready_fd);
  report_ready(ready_fd, static_cast<char>(rc));
  return rc;
}
