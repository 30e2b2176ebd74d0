// The control socket: a Unix stream socket that speaks ctl/protocol.h to
// shadowctl (and anything else that writes JSON lines).
//
// One thread runs a poll() loop over the listening socket and its clients,
// all non-blocking; commands run on that thread (daemon/commands.h).
// Limits: kMaxClients connections (more get an "unavailable" reply and are
// closed), a request line of ctl::kMaxRequestLineBytes (longer: a
// line_too_long reply, then the connection is closed, without the line ever
// being buffered whole), a client whose replies pile up is not read until
// they drain, and an idle client is closed after kIdleTimeoutSeconds.
//
// Who may do what: the socket file has mode 0660 (and the control group as
// its group, when one is configured), so only its owner (root), the group
// and root can connect at all. Each connection's peer is identified with
// SO_PEERCRED when accepted: uid 0 and members of the control group may run
// mutating commands; everyone else may only read.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/status.h"
#include "daemon/context.h"

namespace shadowd {

class ControlServer {
 public:
  static constexpr size_t kMaxClients = 64;
  static constexpr int kIdleTimeoutSeconds = 600;

  // `group` empty: only root may change things.
  // REQUIRES: ctx outlives this object.
  ControlServer(DaemonContext& ctx, std::string path, std::string group);
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // Create the socket (replacing a stale one; a live one or a file that is
  // not a socket is an error) and start the thread. On error nothing is left.
  Status start();
  // Close every connection, remove the socket file, join the thread.
  // Idempotent.
  void stop();

  const std::string& path() const { return path_; }

 private:
  struct Client;
  Status resolve_group();
  Status listen_socket();
  void run();
  int poll_timeout_ms() const;
  void accept_clients();
  bool peer_may_write(int fd, uid_t& uid, pid_t& pid) const;
  void on_readable(Client& c);
  void process_lines(Client& c);
  void queue_reply(Client& c, const std::string& line);
  void service(Client& c);

  DaemonContext& ctx_;
  std::string path_;
  std::string group_;
  bool has_group_ = false;
  gid_t gid_ = 0;
  int listen_fd_ = -1;
  int wake_fd_ = -1;      // eventfd: stop() wakes the loop
  ino_t socket_ino_ = 0;  // the socket file we created (unlinked only if still ours)
  std::vector<std::unique_ptr<Client>> clients_;
  // Out of file descriptors: accepting pauses until then instead of spinning.
  std::chrono::steady_clock::time_point accept_paused_until_{};
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  bool started_ = false;
};

}  // namespace shadowd
