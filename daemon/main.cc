// shadowd: serve an NBD export over a backing file or block device.
//
// The daemon's wiring: options and config, logging, daemonizing, signals,
// systemd notification and socket activation. The engine lives in core/ and
// the protocol in nbd/.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/sinks/systemd_sink.h>
#include <spdlog/spdlog.h>
#include <systemd/sd-daemon.h>

#include "config/config.h"
#include "core/io_backend.h"
#include "nbd/server.h"
#include "version.h"

namespace shadowd {
namespace {

constexpr int kExitUsage = 2;
constexpr int kExitFailure = 1;

struct Cli {
  Config values;  // options as given on the command line
  std::string config_path;
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

std::string human_size(uint64_t b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024 && u < 5) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", v, units[u]);
  return buf;
}

int serve(const Config& cfg, int ready_fd) {
  FileBackendOptions fo;
  fo.read_only = cfg.read_only;
  fo.direct = cfg.direct_io == "on"    ? FileBackendOptions::Direct::kOn
              : cfg.direct_io == "off" ? FileBackendOptions::Direct::kOff
                                       : FileBackendOptions::Direct::kAuto;
  auto backend = open_uring_backend(cfg.backing, fo);
  if (!backend) {
    spdlog::error("{}", backend.status().message());
    return kExitFailure;
  }
  auto exp = std::make_shared<nbd::Export>();
  exp->name = cfg.export_name;
  exp->description = cfg.description;
  exp->backend = std::shared_ptr<IoBackend>(std::move(*backend));
  exp->read_only = cfg.read_only;
  exp->max_payload_bytes = cfg.max_payload_bytes;
  const BackendInfo info = exp->backend->info();
  nbd::ExportRegistry registry;
  registry.add(exp);

  nbd::ServerOptions so;
  so.unix_paths = cfg.unix_sockets;
  so.tcp = cfg.listen;
  const int n_fds = sd_listen_fds(1);
  for (int i = 0; i < n_fds; ++i) so.inherited_fds.push_back(SD_LISTEN_FDS_START + i);
  if (so.unix_paths.empty() && so.tcp.empty() && so.inherited_fds.empty()) {
    so.tcp.push_back("127.0.0.1:10809");
  }
  so.io_threads = cfg.io_threads;
  so.max_connections = cfg.max_connections;
  so.limits.max_payload_bytes = cfg.max_payload_bytes;
  so.limits.max_inflight = cfg.max_inflight_per_connection;

  nbd::Server server(registry, so);
  Status st = server.start();
  if (!st) {
    spdlog::error("cannot start: {}", st.message());
    return kExitFailure;
  }
  std::string where;
  for (const auto& e : server.endpoints()) where += (where.empty() ? "" : ", ") + e;
  spdlog::info("serving export '{}' ({}{}, {}) on {}", exp->name, human_size(info.size_bytes),
               cfg.read_only ? ", read-only" : "", info.direct_io ? "O_DIRECT" : "buffered", where);
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
  int sig = 0;
  sigwait(&set, &sig);
  spdlog::info("{} received: finishing in-flight requests", strsignal(sig));
  sd_notify(0, "STOPPING=1\nSTATUS=stopping");
  server.stop();
  if (!cfg.read_only) {
    Status fs = run_sync(*exp->backend, BlockOpKind::kFlush, 0, 0);
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
    return app.exit(e);
  }
  Config cfg;
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
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  int ready_fd = -1;
  if (!cfg.foreground) {
    ready_fd = daemonize();
    if (ready_fd < 0) {
      spdlog::error("cannot daemonize: {}", std::strerror(errno));
      return kExitFailure;
    }
  }
  int rc = serve(cfg, ready_fd);
  report_ready(ready_fd, static_cast<char>(rc));
  return rc;
}
