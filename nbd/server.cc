#include "nbd/server.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <malloc.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <unordered_set>

#include <spdlog/spdlog.h>

namespace shadowd::nbd {

struct Server::Worker {
  std::unique_ptr<EventLoop> loop;
  StatsShard* stats = nullptr;
  std::thread thread;
  std::unordered_set<Connection*> conns;  // touched only on the loop thread
  bool stopping = false;

  void finish_if_idle() {
    if (stopping && conns.empty()) loop->stop();
  }
};

// Keeps one accept armed on a listening socket (on worker 0's loop).
class Server::Acceptor final : public IoCompletion {
 public:
  Acceptor(Server* s, EventLoop* loop, int fd) : s_(s), loop_(loop), fd_(fd), timer_(this) {}
  void arm() {
    if (closed_ || pending_ || paused_) return;
    io_uring_prep_accept(loop_->sqe_for(this), fd_, nullptr, nullptr, SOCK_CLOEXEC);
    pending_ = true;
  }
  void cancel() {
    closed_ = true;
    if (pending_) io_uring_prep_cancel(loop_->sqe_for(nullptr), this, 0);
    if (paused_) io_uring_prep_cancel(loop_->sqe_for(nullptr), &timer_, 0);
  }
  void on_complete(int res, uint32_t) override {
    pending_ = false;
    if (closed_) {
      if (res >= 0) ::close(res);
      return;
    }
    if (res >= 0) {
      s_->on_accept(fd_, res);
    } else if (res == -EMFILE || res == -ENFILE) {
      // Out of descriptors: the waiting clients stay queued in the kernel;
      // accepting again a second later (connections close meanwhile) rather
      // than spinning, or giving up on the listener.
      spdlog::error("accept: {}: new connections wait until descriptors are free (open: {}; "
                    "raise LimitNOFILE or lower max_connections)",
                    std::strerror(-res), s_->open_.load());
      paused_ = true;
      io_uring_prep_timeout(loop_->sqe_for(&timer_), &kRetry, 0, 0);
      return;
    } else if (res != -EAGAIN && res != -EINTR && res != -ECONNABORTED) {
      spdlog::warn("accept: {}", std::strerror(-res));
    }
    arm();
  }

 private:
  struct Timer final : public IoCompletion {
    explicit Timer(Acceptor* a) : a(a) {}
    void on_complete(int, uint32_t) override {
      a->paused_ = false;
      if (!a->closed_) a->arm();
    }
    Acceptor* a;
  };
  static inline __kernel_timespec kRetry{1, 0};
  Server* s_;
  EventLoop* loop_;
  int fd_;
  bool pending_ = false;
  bool closed_ = false;
  bool paused_ = false;  // out of descriptors: the timer re-arms
  Timer timer_;
};

Status parse_host_port(const std::string& s, std::string& host, uint16_t& port) {
  std::string p;
  if (!s.empty() && s[0] == '[') {
    const size_t close = s.find(']');
    if (close == std::string::npos || close + 1 >= s.size() || s[close + 1] != ':') {
      return Status::invalid("bad address '" + s + "': expected [ADDR]:PORT");
    }
    host = s.substr(1, close - 1);
    p = s.substr(close + 2);
  } else {
    const size_t colon = s.rfind(':');
    if (colon == std::string::npos) return Status::invalid("bad address '" + s + "': expected ADDR:PORT");
    host = s.substr(0, colon);
    p = s.substr(colon + 1);
  }
  if (p.empty() || p.size() > 5 || p.find_first_not_of("0123456789") != std::string::npos ||
      std::stoul(p) > 65535) {
    return Status::invalid("bad port in '" + s + "'");
  }
  port = static_cast<uint16_t>(std::stoul(p));
  if (host.empty()) host = "127.0.0.1";
  return Status::ok();
}

Server::Server(ExportRegistry& registry, ServerOptions opts)
    : registry_(registry), opts_(std::move(opts)) {}

Server::~Server() {
  stop();
  for (int fd : listen_fds_) ::close(fd);
  for (const auto& p : unix_created_) ::unlink(p.c_str());
}

namespace {

Result<int> listen_unix(const std::string& path, int backlog) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (path.size() >= sizeof sa.sun_path) return Status::invalid("unix socket path too long: " + path);
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::from_errno(errno, "socket");
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      ::close(fd);
      return Status::invalid(path + " exists and is not a socket; not replacing it");
    }
    ::unlink(path.c_str());  // a stale socket from an earlier run
  }
  if (::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) < 0 || ::listen(fd, backlog) < 0) {
    int e = errno;
    ::close(fd);
    return Status::from_errno(e, "listen on " + path);
  }
  return fd;
}

Result<int> listen_tcp(const std::string& spec, std::string& bound, int backlog) {
  std::string host;
  uint16_t port = 0;
  Status st = parse_host_port(spec, host, port);
  if (!st) return st;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string ports = std::to_string(port);
  int rc = ::getaddrinfo(host.c_str(), ports.c_str(), &hints, &res);
  if (rc != 0) return Status::invalid("cannot resolve '" + host + "': " + gai_strerror(rc));
  std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> guard(res, freeaddrinfo);
  int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::from_errno(errno, "socket");
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(fd, res->ai_addr, res->ai_addrlen) < 0 || ::listen(fd, backlog) < 0) {
    int e = errno;
    ::close(fd);
    return Status::from_errno(e, "listen on " + spec);
  }
  sockaddr_storage ss{};
  socklen_t sl = sizeof ss;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &sl);
  char buf[INET6_ADDRSTRLEN] = {};
  uint16_t actual = 0;
  if (ss.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof buf);
    actual = ntohs(a->sin6_port);
    bound = "tcp:[" + std::string(buf) + "]:" + std::to_string(actual);
  } else {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, buf, sizeof buf);
    actual = ntohs(a->sin_port);
    bound = "tcp:" + std::string(buf) + ":" + std::to_string(actual);
  }
  return fd;
}

std::string describe_peer(int fd) {
  sockaddr_storage ss{};
  socklen_t sl = sizeof ss;
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &sl) < 0) return "peer?";
  char buf[INET6_ADDRSTRLEN] = {};
  if (ss.ss_family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, buf, sizeof buf);
    return std::string(buf) + ":" + std::to_string(ntohs(a->sin_port));
  }
  if (ss.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof buf);
    return "[" + std::string(buf) + "]:" + std::to_string(ntohs(a->sin6_port));
  }
  return "unix:fd" + std::to_string(fd);
}

}  // namespace

Status Server::listen_all() {
  // Room for a burst of as many connects as may be open at once (the kernel
  // caps it at net.core.somaxconn).
  const int backlog = static_cast<int>(std::max<uint32_t>(SOMAXCONN, opts_.max_connections));
  for (const auto& path : opts_.unix_paths) {
    auto fd = listen_unix(path, backlog);
    if (!fd) return fd.status();
    listen_fds_.push_back(*fd);
    unix_created_.push_back(path);
    endpoints_.push_back("unix:" + path);
  }
  for (const auto& spec : opts_.tcp) {
    std::string bound;
    auto fd = listen_tcp(spec, bound, backlog);
    if (!fd) return fd.status();
    listen_fds_.push_back(*fd);
    endpoints_.push_back(bound);
  }
  for (int fd : opts_.inherited_fds) {
    listen_fds_.push_back(fd);
    endpoints_.push_back("fd:" + std::to_string(fd) + " (socket activation)");
  }
  if (listen_fds_.empty()) return Status::invalid("nothing to listen on");
  return Status::ok();
}

Status Server::start() {
  // Every connection holds a descriptor: use the hard limit, and say so
  // when even that is short of max_connections (plus the daemon's own).
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    if (rl.rlim_cur < rl.rlim_max) {
      rl.rlim_cur = rl.rlim_max;
      ::setrlimit(RLIMIT_NOFILE, &rl);
    }
    constexpr rlim_t kOwn = 64;
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < opts_.max_connections + kOwn) {
      spdlog::warn("the descriptor limit ({}) is below max_connections ({}) + {}: connections "
                   "beyond it wait (raise LimitNOFILE / ulimit -n)",
                   rl.rlim_cur, opts_.max_connections, kOwn);
    }
  }
  Status st = listen_all();
  if (!st) return st;
  const unsigned n = std::max(1u, opts_.io_threads);
  stats_ = std::make_unique<ServerStats>(n);
  for (unsigned i = 0; i < n; ++i) {
    auto loop = EventLoop::create(512);
    if (!loop) return loop.status();
    auto w = std::make_unique<Worker>();
    w->loop = std::move(*loop);
    w->loop->set_busy_poll_ns(opts_.busy_poll_ns);
    w->stats = &stats_->shard(i);
    workers_.push_back(std::move(w));
  }
  EventLoop* acceptor_loop = workers_[0]->loop.get();
  for (int fd : listen_fds_) {
    acceptors_.push_back(std::make_unique<Acceptor>(this, acceptor_loop, fd));
  }
  for (auto& a : acceptors_) a->arm();  // before run(): this thread owns the loop until then
  for (auto& w : workers_) {
    Worker* wp = w.get();
    w->thread = std::thread([wp] { wp->loop->run(); });
  }
  started_ = true;
  return Status::ok();
}

void Server::on_accept(int /*listen_fd*/, int fd) {
  ++accepted_total_;
  if (open_.load() >= opts_.max_connections) {
    ::close(fd);
    // One line a second at most, however fast they come.
    ++refused_since_log_;
    const int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
                            std::chrono::steady_clock::now().time_since_epoch())
                            .count();
    if (now != last_refusal_log_s_) {
      last_refusal_log_s_ = now;
      spdlog::warn("refusing connection: {} connections open (max_connections); {} refused "
                   "since the last such line",
                   open_.load(), refused_since_log_);
      refused_since_log_ = 0;
    }
    return;
  }
  ++open_;
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // fails harmlessly on unix
  // Room for several large read replies in the kernel: with the default
  // (about 200 KiB) a 1 MiB reply takes several partial sends.
  int sndbuf = 4 << 20;
  if (::setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf) != 0) {
    ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
  }
  Worker* w = workers_[next_worker_++ % workers_.size()].get();
  std::string peer = describe_peer(fd);
  w->loop->post([this, w, fd, peer = std::move(peer)]() mutable {
    if (w->stopping) {
      ::close(fd);
      --open_;
      w->finish_if_idle();
      return;
    }
    auto* c = new Connection(*w->loop, fd, std::move(peer), registry_, opts_.limits, w->stats,
                             [this, w](Connection* done) {
                               w->conns.erase(done);
                               // The slot is free before the socket closes
                               // (in the destructor): a client that saw EOF
                               // may connect again at once.
                               const bool last = --open_ == 0;
                               delete done;
                               // The last client gone: give the heap's free
                               // memory back (buffers of large requests).
                               if (last) ::malloc_trim(0);
                               w->finish_if_idle();
                             },
                             opts_.tls);
    w->conns.insert(c);
    c->start();
  });
}

StatsSnapshot Server::stats() const {
  StatsSnapshot s = stats_ ? stats_->snapshot() : StatsSnapshot{};
  s.connections_open = open_.load();
  s.connections_total = accepted_total_.load();
  return s;
}

void Server::stop() {
  if (!started_ || stopped_) return;
  stopped_ = true;
  EventLoop* acceptor_loop = workers_[0]->loop.get();
  acceptor_loop->post([this] {
    for (auto& a : acceptors_) a->cancel();
  });
  for (auto& w : workers_) {
    Worker* wp = w.get();
    // Queued after the accept cancellation on worker 0, so no connection is
    // handed to a worker after it has begun stopping... except from the
    // acceptor's loop itself, which the `stopping` check in on_accept covers.
    wp->loop->post([wp] {
      wp->stopping = true;
      std::vector<Connection*> cs(wp->conns.begin(), wp->conns.end());
      for (Connection* c : cs) c->shutdown();
      wp->finish_if_idle();
    });
  }
  for (auto& w : workers_) {
    if (w->thread.joinable()) w->thread.join();
  }
  spdlog::info("server stopped; {} connections served", accepted_total_.load());
}

}  // namespace shadowd::nbd
