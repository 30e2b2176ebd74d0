#include "daemon/control.h"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pwd.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

#include <spdlog/spdlog.h>

#include "ctl/protocol.h"
#include "daemon/commands.h"

namespace shadowd {
namespace {

using SteadyClock = std::chrono::steady_clock;

constexpr size_t kReadChunkBytes = 64 * 1024;
// Requests of a client are not run while this much of its output is unsent,
// so its queue holds at most this plus one reply (<= ctl::kMaxReplyBytes).
constexpr size_t kOutputHighWaterBytes = 1 << 20;
constexpr int kAcceptsPerWake = 16;
constexpr int kListenBacklog = 64;
constexpr int kAcceptPauseMs = 100;

// A buffer for the reentrant passwd/group lookups, grown on ERANGE.
std::vector<char> lookup_buffer() {
  long n = sysconf(_SC_GETPW_R_SIZE_MAX);
  return std::vector<char>(n > 0 ? static_cast<size_t>(n) : 16384);
}

// Is `uid` (by its passwd entry) a member of group `gid`?
bool user_in_group(uid_t uid, gid_t gid) {
  passwd pw;
  passwd* found = nullptr;
  std::vector<char> buf = lookup_buffer();
  int rc;
  while ((rc = getpwuid_r(uid, &pw, buf.data(), buf.size(), &found)) == ERANGE) {
    buf.resize(buf.size() * 2);
  }
  if (rc != 0 || found == nullptr) return false;
  if (pw.pw_gid == gid) return true;
  std::vector<gid_t> groups(64);
  int n = static_cast<int>(groups.size());
  while (getgrouplist(pw.pw_name, pw.pw_gid, groups.data(), &n) < 0) {
    groups.resize(std::max<size_t>(static_cast<size_t>(n), groups.size() * 2));
    n = static_cast<int>(groups.size());
  }
  return std::find(groups.begin(), groups.begin() + n, gid) != groups.begin() + n;
}

// Is a process listening on the Unix socket at `path`?
bool socket_is_live(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  const bool live = ::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0;
  ::close(fd);
  return live;
}

// Create the parent directory of `path` if it is missing (one level, as
// /run/shadowd without systemd's RuntimeDirectory=).
void ensure_parent_dir(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos || slash == 0) return;
  ::mkdir(path.substr(0, slash).c_str(), 0755);  // EEXIST is the usual case
}

}  // namespace

struct ControlServer::Client {
  int fd = -1;
  uid_t uid = static_cast<uid_t>(-1);
  pid_t pid = 0;
  bool may_write = false;
  std::string in;      // received bytes not yet consumed
  size_t scanned = 0;  // in[0, scanned) has no '\n'
  std::string out;     // reply bytes; out[0, sent) already sent
  size_t sent = 0;
  bool read_done = false;  // EOF, or cut off: close once the output is sent
  bool dead = false;       // close now
  SteadyClock::time_point last_activity;

  size_t pending() const { return out.size() - sent; }
  bool may_read() const { return !read_done && !dead && pending() < kOutputHighWaterBytes; }
};

ControlServer::ControlServer(DaemonContext& ctx, std::string path, std::string group)
    : ctx_(ctx), path_(std::move(path)), group_(std::move(group)) {}

ControlServer::~ControlServer() { stop(); }

Status ControlServer::resolve_group() {
  if (group_.empty()) return Status::ok();
  group g;
  group* found = nullptr;
  std::vector<char> buf = lookup_buffer();
  int rc;
  while ((rc = getgrnam_r(group_.c_str(), &g, buf.data(), buf.size(), &found)) == ERANGE) {
    buf.resize(buf.size() * 2);
  }
  if (rc != 0) return Status::from_errno(rc, "cannot look up control group '" + group_ + "'");
  if (found == nullptr) return Status::invalid("control group '" + group_ + "' does not exist");
  gid_ = g.gr_gid;
  has_group_ = true;
  return Status::ok();
}

Status ControlServer::listen_socket() {
  sockaddr_un sa{};
  if (path_.empty() || path_.size() >= sizeof sa.sun_path) {
    return Status::invalid("control socket path empty or too long: '" + path_ + "'");
  }
  ensure_parent_dir(path_);
  struct stat st;
  if (::lstat(path_.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Status::invalid("control socket path " + path_ + " exists and is not a socket");
    }
    if (socket_is_live(path_)) {
      return Status::error(Status::Code::kBusy,
                           "control socket " + path_ + " is in use by another process", EADDRINUSE);
    }
    ::unlink(path_.c_str());  // stale, from an earlier run
  }
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::from_errno(errno, "control socket");
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, path_.c_str(), path_.size() + 1);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    Status e = Status::from_errno(errno, "bind " + path_);
    ::close(fd);
    return e;
  }
  // Not listening yet, so nobody connects before the mode and group are
  // right, whatever the umask was.
  Status err;
  if (::chmod(path_.c_str(), 0660) != 0) {
    err = Status::from_errno(errno, "chmod " + path_);
  } else if (has_group_ && ::chown(path_.c_str(), static_cast<uid_t>(-1), gid_) != 0) {
    err = Status::from_errno(errno, "chown " + path_ + " to group " + group_);
  } else if (::lstat(path_.c_str(), &st) != 0) {
    err = Status::from_errno(errno, "stat " + path_);
  } else if (::listen(fd, kListenBacklog) != 0) {
    err = Status::from_errno(errno, "listen " + path_);
  }
  if (!err.is_ok()) {
    ::close(fd);
    ::unlink(path_.c_str());
    return err;
  }
  socket_ino_ = st.st_ino;
  listen_fd_ = fd;
  return Status::ok();
}

Status ControlServer::start() {
  if (started_) return Status::invalid("control server already started");
  Status st = resolve_group();
  if (!st) return st;
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) return Status::from_errno(errno, "eventfd");
  st = listen_socket();
  if (!st) {
    ::close(wake_fd_);
    wake_fd_ = -1;
    return st;
  }
  started_ = true;
  thread_ = std::thread([this] { run(); });
  spdlog::debug("control socket {} (mode 0660{}{})", path_, has_group_ ? ", group " : "",
                has_group_ ? group_ : "");
  return Status::ok();
}

void ControlServer::stop() {
  if (!started_ || stopping_.exchange(true)) return;
  const uint64_t one = 1;
  ssize_t n = ::write(wake_fd_, &one, sizeof one);
  (void)n;
  thread_.join();
  ::close(listen_fd_);
  listen_fd_ = -1;
  ::close(wake_fd_);
  wake_fd_ = -1;
  // Remove the socket file unless someone replaced it since.
  struct stat st;
  if (::lstat(path_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) && st.st_ino == socket_ino_) {
    ::unlink(path_.c_str());
  }
}

bool ControlServer::peer_may_write(int fd, uid_t& uid, pid_t& pid) const {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return false;
  uid = cred.uid;
  pid = cred.pid;
  if (cred.uid == 0) return true;
  if (!has_group_) return false;
  return cred.gid == gid_ || user_in_group(cred.uid, gid_);
}

void ControlServer::accept_clients() {
  for (int i = 0; i < kAcceptsPerWake; ++i) {
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        spdlog::warn("control socket: accept: {}; pausing for {} ms", std::strerror(errno),
                     kAcceptPauseMs);
        accept_paused_until_ = SteadyClock::now() + std::chrono::milliseconds(kAcceptPauseMs);
      } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
                 errno != ECONNABORTED) {
        spdlog::warn("control socket: accept: {}", std::strerror(errno));
      }
      return;
    }
    if (clients_.size() >= kMaxClients) {
      const std::string busy = ctl::encode_line(ctl::error_reply(
          ctl::errc::kUnavailable,
          "too many control connections (" + std::to_string(kMaxClients) + "); try again"));
      ssize_t n = ::send(fd, busy.data(), busy.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      (void)n;
      ::close(fd);
      continue;
    }
    auto c = std::make_unique<Client>();
    c->fd = fd;
    c->may_write = peer_may_write(fd, c->uid, c->pid);
    c->last_activity = SteadyClock::now();
    spdlog::debug("control: connection from uid {} pid {} ({})", c->uid, c->pid,
                  c->may_write ? "read-write" : "read-only");
    clients_.push_back(std::move(c));
  }
}

void ControlServer::queue_reply(Client& c, const std::string& line) {
  if (c.sent > 0) {
    c.out.erase(0, c.sent);
    c.sent = 0;
  }
  c.out += line;
}

// Run the complete lines in c.in while the client's output has room. A line
// longer than the limit (complete or not) ends the connection.
void ControlServer::process_lines(Client& c) {
  size_t start = 0;
  while (!c.dead && c.pending() < kOutputHighWaterBytes) {
    const size_t nl = c.in.find('\n', std::max(start, c.scanned));
    if (nl == std::string::npos) {
      c.scanned = c.in.size();
      break;
    }
    std::string_view line(c.in.data() + start, nl - start);
    if (line.size() > ctl::kMaxRequestLineBytes) break;  // answered below
    start = nl + 1;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.find_first_not_of(" \t") == std::string_view::npos) continue;
    std::string cmd;
    const nlohmann::json reply = run_command_line(ctx_, line, c.may_write, &cmd);
    std::string out = ctl::encode_line(reply);
    if (out.size() > ctl::kMaxReplyBytes) {
      out = ctl::encode_line(
          ctl::error_reply(ctl::errc::kInternal, "the reply (" + std::to_string(out.size()) +
                                                     " bytes) is larger "
                                                     "than the protocol allows"));
    }
    if (is_mutating_command(cmd)) {
      spdlog::info("control: uid {} pid {}: {} -> {}", c.uid, c.pid, line.substr(0, 200),
                   reply.value("ok", false) ? "ok" : reply.value("code", ""));
    }
    queue_reply(c, out);
  }
  // The line in progress: the bytes after `start` up to the next '\n' (if any).
  const size_t nl = c.in.find('\n', start);
  const size_t line_bytes = (nl == std::string::npos ? c.in.size() : nl) - start;
  if (line_bytes > ctl::kMaxRequestLineBytes) {
    spdlog::warn("control: uid {} pid {}: request line over {} bytes; closing", c.uid, c.pid,
                 ctl::kMaxRequestLineBytes);
    queue_reply(c, ctl::encode_line(ctl::error_reply(ctl::errc::kLineTooLong,
                                                     "request line longer than " +
                                                         std::to_string(ctl::kMaxRequestLineBytes) +
                                                         " bytes; closing the connection")));
    c.read_done = true;
    c.in.clear();
    c.scanned = 0;
    return;
  }
  c.in.erase(0, start);
  c.scanned = c.scanned > start ? c.scanned - start : 0;
}

void ControlServer::on_readable(Client& c) {
  char buf[kReadChunkBytes];
  const ssize_t n = ::recv(c.fd, buf, sizeof buf, MSG_DONTWAIT);
  if (n > 0) {
    c.in.append(buf, static_cast<size_t>(n));
    c.last_activity = SteadyClock::now();
  } else if (n == 0) {
    c.read_done = true;  // a partial last line is dropped; complete ones are answered
  } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
    c.dead = true;
  }
}

// Send what can be sent now, run waiting lines when there is room, and
// decide whether the connection is finished.
void ControlServer::service(Client& c) {
  for (;;) {
    if (!c.read_done || !c.in.empty()) process_lines(c);
    while (!c.dead && c.pending() > 0) {
      const ssize_t n =
          ::send(c.fd, c.out.data() + c.sent, c.pending(), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        c.sent += static_cast<size_t>(n);
        c.last_activity = SteadyClock::now();
      } else if (n < 0 && errno == EINTR) {
        continue;
      } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        return;  // POLLOUT brings us back
      } else {
        c.dead = true;  // the peer went away; nothing to clean up but the fd
      }
    }
    if (c.dead) return;
    c.out.clear();
    c.sent = 0;
    // Lines may be left when the output filled up; run them now.
    if (c.in.find('\n', c.scanned) == std::string::npos) break;
  }
  if (c.read_done) c.dead = true;
}

// Until the nearest idle deadline or the end of an accept pause; -1: none.
int ControlServer::poll_timeout_ms() const {
  const auto now = SteadyClock::now();
  auto until = [&](SteadyClock::time_point t) {
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(t - now).count();
    return static_cast<int>(std::clamp<int64_t>(ms + 1, 0, 60'000));
  };
  int timeout_ms = accept_paused_until_ > now ? until(accept_paused_until_) : -1;
  for (const auto& c : clients_) {
    const int left = until(c->last_activity + std::chrono::seconds(kIdleTimeoutSeconds));
    timeout_ms = timeout_ms < 0 ? left : std::min(timeout_ms, left);
  }
  return timeout_ms;
}

void ControlServer::run() {
  std::vector<pollfd> pfds;
  while (!stopping_.load()) {
    pfds.clear();
    pfds.push_back({wake_fd_, POLLIN, 0});
    const bool accepting = SteadyClock::now() >= accept_paused_until_;
    pfds.push_back({listen_fd_, static_cast<short>(accepting ? POLLIN : 0), 0});
    for (const auto& c : clients_) {
      short events = c->may_read() ? POLLIN : 0;
      if (c->pending() > 0) events |= POLLOUT;
      pfds.push_back({c->fd, events, 0});
    }
    if (::poll(pfds.data(), pfds.size(), poll_timeout_ms()) < 0 && errno != EINTR) {
      spdlog::error("control socket: poll: {}", std::strerror(errno));
      break;
    }
    if (pfds[0].revents != 0) {
      uint64_t v;
      ssize_t n = ::read(wake_fd_, &v, sizeof v);
      (void)n;
      continue;  // stopping
    }
    for (size_t i = 0; i < clients_.size(); ++i) {
      Client& c = *clients_[i];
      const short rev = pfds[i + 2].revents;
      if (rev == 0) continue;
      if ((rev & (POLLIN | POLLHUP | POLLERR)) != 0 && c.may_read()) on_readable(c);
      if (!c.dead) service(c);
    }
    const auto idle_limit = SteadyClock::now() - std::chrono::seconds(kIdleTimeoutSeconds);
    for (auto& c : clients_) {
      if (c->last_activity < idle_limit) c->dead = true;
    }
    // Before accepting: the slots of clients that left are free again.
    std::erase_if(clients_, [](const std::unique_ptr<Client>& c) {
      if (c->dead) ::close(c->fd);
      return c->dead;
    });
    if ((pfds[1].revents & POLLIN) != 0) accept_clients();
  }
  for (auto& c : clients_) ::close(c->fd);
  clients_.clear();
}

}  // namespace shadowd
