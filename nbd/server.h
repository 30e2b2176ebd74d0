// The NBD server: listening sockets (Unix, TCP, or inherited through systemd
// socket activation) and a fixed set of worker threads, each running one
// EventLoop. Accepted connections are spread over the workers round-robin;
// a connection stays on its worker for life, so it needs no locks.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/status.h"
#include "nbd/connection.h"
#include "nbd/export.h"
#include "nbd/stats.h"

namespace shadowd::nbd {

struct ServerOptions {
  std::vector<std::string> unix_paths;  // created (a stale socket file is replaced)
  std::vector<std::string> tcp;         // "ADDR:PORT", "[v6]:PORT"
  std::vector<int> inherited_fds;       // already listening (LISTEN_FDS)
  unsigned io_threads = 2;
  uint64_t busy_poll_ns = 0;  // workers spin this long for completions before sleeping
  uint32_t max_connections = 256;
  ConnectionLimits limits;
  std::shared_ptr<const TlsContext> tls;  // null: TLS off (STARTTLS refused)
};

class Server {
 public:
  Server(ExportRegistry& registry, ServerOptions opts);
  ~Server();

  // Bind the listeners and start the workers. On error nothing is left open.
  Status start();
  // Stop accepting, let every connection finish the requests it has started
  // (their replies are sent), close them, and join the workers. Idempotent.
  void stop();

  // Human-readable listening endpoints ("unix:/run/x.sock", "tcp:127.0.0.1:10809").
  const std::vector<std::string>& endpoints() const { return endpoints_; }
  uint64_t connections_total() const { return accepted_total_.load(); }
  uint32_t connections_open() const { return open_.load(); }
  // Requests, bytes, errors and latency so far (valid after start()).
  StatsSnapshot stats() const;

 private:
  struct Worker;
  class Acceptor;
  Status listen_all();
  void on_accept(int listen_fd, int fd);

  ExportRegistry& registry_;
  ServerOptions opts_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::unique_ptr<ServerStats> stats_;
  std::vector<std::unique_ptr<Acceptor>> acceptors_;
  std::vector<int> listen_fds_;
  std::vector<std::string> unix_created_;
  std::vector<std::string> endpoints_;
  std::atomic<uint32_t> open_{0};
  std::atomic<uint64_t> accepted_total_{0};
  unsigned next_worker_ = 0;
  uint64_t refused_since_log_ = 0;  // acceptor thread only
  int64_t last_refusal_log_s_ = -1;
  bool started_ = false;
  bool stopped_ = false;
};

// Parse "ADDR:PORT" / "[ADDR]:PORT" into host and port. Pure.
Status parse_host_port(const std::string& s, std::string& host, uint16_t& port);

}  // namespace shadowd::nbd
