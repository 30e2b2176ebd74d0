// NBD backend: libnbd's asynchronous API, one driver thread per connection.
//
// Threads. submit() and extent_at() call nbd_aio_* on the caller's thread
// (libnbd handles are thread-safe), which usually sends the request at once.
// Each connection's driver thread polls the socket and an eventfd and feeds
// libnbd's state machine (nbd_aio_notify_read/write); libnbd runs the
// completion callbacks there, with its handle lock held, so they only count
// and queue. Whoever called into libnbd last (driver or submitter) then
// drains the queue: a follow-up command where one is needed (the flush after
// a write the server cannot FUA), else a post() of the finished op to the
// loop it came from. A submitter wakes the driver through the eventfd when
// libnbd is left wanting to write (the socket buffer filled), so that the
// driver polls for POLLOUT too.
//
// Per-op state lives in BlockOp's backend fields: retries_ counts the op's
// commands not yet completed (plus one while submit() issues them, so that
// the op cannot finish half-issued), progress_ holds the first error (errno)
// and stage_ the stage (main, then the flush after a FUA write).
#include "core/nbd_backend.h"

#include <libnbd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>

namespace shadowd {
namespace {

constexpr uint64_t kMaxPayloadBytes = 32u << 20;  // read/write per command: 2^25 never counts as DoS (proto.md)
constexpr uint64_t kMaxEffectBytes = 1u << 30;    // trim/zero/cache per command: fits the 32-bit length
constexpr size_t kZeroChunkBytes = 1u << 20;      // WRITE_ZEROES emulated with writes of this
constexpr unsigned kMaxConnections = 16;
constexpr int kDisconnectWaitMs = 2000;           // a clean NBD_CMD_DISC at close, at most this long
// Over TCP, a server that vanishes without a reset (host down, partition)
// counts as lost once unacknowledged data is this old, or once an idle
// connection's keepalive probes go unanswered (30 s + 3 x 10 s).
constexpr int kTcpUserTimeoutMs = 60000;
constexpr int kKeepIdleS = 30, kKeepIntervalS = 10, kKeepCount = 3;

enum Stage : uint32_t {
  kStageMain = 0,
  kStageFlushAfter = 1,  // the op is done; a flush makes it durable (kFua without server FUA)
};

std::atomic_ref<uint32_t> pending(BlockOp& op) { return std::atomic_ref<uint32_t>(op.retries_); }
std::atomic_ref<uint64_t> first_error(BlockOp& op) { return std::atomic_ref<uint64_t>(op.progress_); }

const uint8_t* zero_chunk() {
  static const auto* zeros = new uint8_t[kZeroChunkBytes]();
  return zeros;
}

bool is_mutation(BlockOpKind kind) {
  return kind == BlockOpKind::kWrite || kind == BlockOpKind::kTrim ||
         kind == BlockOpKind::kWriteZeroes;
}

// Errors that mean the connection is gone, whatever libnbd's state says.
bool is_connection_error(int err) {
  return err == ENOTCONN || err == ECONNRESET || err == EPIPE || err == ECONNABORTED ||
         err == ESHUTDOWN;
}

// The status an op finishes with, built on its loop thread.
Status op_status(BlockOpKind kind, int err) {
  if (err == 0) return Status::ok();
  if (is_connection_error(err)) {
    return Status::io_error(std::string("nbd ") + op_name(kind) +
                            ": the connection to the NBD server is lost");
  }
  return Status::from_errno(err, std::string("nbd ") + op_name(kind));
}

std::string libnbd_error(const char* fallback) {
  const char* e = nbd_get_error();
  return e != nullptr && *e != '\0' ? e : fallback;
}

int libnbd_errno() {
  const int e = nbd_get_errno();
  return e > 0 ? e : EIO;
}

// What the server offers, as far as requests are concerned.
struct Caps {
  bool can_flush = false;
  bool can_fua = false;
  bool can_trim = false;
  bool can_zero = false;
  bool can_cache = false;
  uint64_t max_payload = kMaxPayloadBytes;  // per read/write command
  uint64_t max_effect = kMaxEffectBytes;    // per trim/zero/cache command
};

struct HandleCloser {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};
using Handle = std::unique_ptr<nbd_handle, HandleCloser>;

// Best effort: on failure the connection only takes longer to be found dead.
void detect_dead_peers(nbd_handle* h) {
  const int fd = nbd_aio_get_fd(h);
  int domain = 0;
  socklen_t len = sizeof domain;
  if (fd < 0 || getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0) return;
  if (domain != AF_INET && domain != AF_INET6) return;
  const int on = 1;
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &kKeepIdleS, sizeof kKeepIdleS);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &kKeepIntervalS, sizeof kKeepIntervalS);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &kKeepCount, sizeof kKeepCount);
  setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &kTcpUserTimeoutMs, sizeof kTcpUserTimeoutMs);
}

// Connect one handle to `uri`, the handshake included, within the timeout.
Result<Handle> connect_handle(const std::string& uri, const std::string& shown,
                              const NbdBackendOptions& opts) {
  Handle h(nbd_create());
  auto fail = [&](const std::string& what) {
    return Status::io_error("cannot connect to NBD server " + shown + ": " + what);
  };
  if (!h) return fail(libnbd_error("nbd_create failed"));
  nbd_set_handle_name(h.get(), "shadowd-backing");
  // tls-psk-file and tls-certificates in the URI name local files: allowed,
  // the URI is the operator's.
  nbd_set_uri_allow_local_file(h.get(), true);
  nbd_add_meta_context(h.get(), LIBNBD_CONTEXT_BASE_ALLOCATION);
  // Unaligned requests go to the server as they are; it may serve or refuse them.
  const int strict = nbd_get_strict_mode(h.get());
  if (strict >= 0) nbd_set_strict_mode(h.get(), static_cast<uint32_t>(strict) & ~LIBNBD_STRICT_ALIGN);
  if (nbd_aio_connect_uri(h.get(), uri.c_str()) == -1) return fail(libnbd_error("invalid URI"));
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(opts.connect_timeout_ms);
  while (nbd_aio_is_ready(h.get()) != 1) {
    if (nbd_aio_is_dead(h.get()) == 1 || nbd_aio_is_closed(h.get()) == 1) {
      return fail(libnbd_error("the connection closed during the handshake"));
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      return fail("no answer within " + std::to_string(opts.connect_timeout_ms) + " ms");
    }
    if (nbd_poll(h.get(), static_cast<int>(left.count())) == -1) return fail(libnbd_error("poll"));
  }
  detect_dead_peers(h.get());
  return h;
}

class NbdBackend final : public IoBackend {
 public:
  NbdBackend(std::string shown_uri, BackendInfo info, Caps caps)
      : uri_(std::move(shown_uri)), info_(info), caps_(caps) {}
  ~NbdBackend() override;

  Status add_connection(Handle h);
  void start();

  const BackendInfo& info() const override { return info_; }
  void submit(EventLoop& loop, BlockOp* op) override;
  Result<Extent> extent_at(uint64_t offset, uint64_t max_len) override;

 protected:
  void on_cqe(BlockOp&, int) override {
    // Ops finish through post() or EventLoop::defer with kStageDone.
    assert(false && "NbdBackend never submits to the ring");
    std::abort();
  }

 private:
  struct Conn {
    Handle h;
    int wake_fd = -1;
    std::thread driver;
    std::atomic<bool> dead{false};
  };

  static int on_command_done(void* user_data, int* error);
  Conn& pick();
  void issue(Conn& c, BlockOp& op);
  bool issue_one(Conn& c, BlockOp& op, BlockOpKind kind, uint64_t offset, uint64_t length,
                 const uint8_t* buf, uint32_t flags);
  void command_done(BlockOp& op, int err);
  void drain_done();
  bool needs_flush_after(BlockOp& op) const;
  void kick(Conn& c);
  void wake(Conn& c);
  void drive(Conn& c);
  void lost(Conn& c, const std::string& why);
  void log_loss(const std::string& why);
  static void finish_now(BlockOp& op, int err);

  const std::string uri_;  // redacted: for messages
  BackendInfo info_;
  const Caps caps_;
  std::vector<std::unique_ptr<Conn>> conns_;
  std::atomic<uint32_t> next_conn_{0};
  std::atomic<bool> stopping_{false};
  std::atomic<bool> lost_logged_{false};
  std::mutex done_mu_;  // taken inside libnbd callbacks: never call libnbd under it
  std::vector<BlockOp*> done_;
};

NbdBackend::~NbdBackend() {
  stopping_.store(true, std::memory_order_release);
  for (auto& c : conns_) {
    if (c->driver.joinable()) {
      wake(*c);
      c->driver.join();
    }
  }
  // Nothing is in flight (the owner's contract); say goodbye properly so
  // that the server does not log a dropped client, but never wait long.
  for (auto& c : conns_) {
    nbd_handle* h = c->h.get();
    if (nbd_aio_is_ready(h) == 1 && nbd_aio_disconnect(h, 0) == 0) {
      const auto deadline =
          std::chrono::steady_clock::now() + std::chrono::milliseconds(kDisconnectWaitMs);
      while (nbd_aio_is_closed(h) != 1 && nbd_aio_is_dead(h) != 1) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0 || nbd_poll(h, static_cast<int>(left.count())) == -1) break;
      }
    }
    if (c->wake_fd >= 0) close(c->wake_fd);
  }
}

Status NbdBackend::add_connection(Handle h) {
  auto c = std::make_unique<Conn>();
  c->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (c->wake_fd < 0) return Status::from_errno(errno, "eventfd");
  c->h = std::move(h);
  conns_.push_back(std::move(c));
  return Status::ok();
}

void NbdBackend::start() {
  for (auto& c : conns_) {
    Conn* conn = c.get();
    c->driver = std::thread([this, conn] { drive(*conn); });
    pthread_setname_np(c->driver.native_handle(), "nbd-backing");
  }
}

NbdBackend::Conn& NbdBackend::pick() {
  const size_t n = conns_.size();
  if (n == 1) return *conns_[0];
  const uint32_t first = next_conn_.fetch_add(1, std::memory_order_relaxed);
  for (size_t i = 0; i < n; ++i) {
    Conn& c = *conns_[(first + i) % n];
    if (!c.dead.load(std::memory_order_relaxed)) return c;
  }
  return *conns_[first % n];
}

void NbdBackend::finish_now(BlockOp& op, int err) {
  op.stage_ = BlockOp::kStageDone;
  op.loop_->defer(&op, -err);
}

void NbdBackend::submit(EventLoop& loop, BlockOp* op) {
  op->backend_ = this;
  op->loop_ = &loop;
  op->progress_ = 0;
  op->retries_ = 0;
  op->stage_ = kStageMain;
  if (is_mutation(op->kind) && info_.read_only) return finish_now(*op, EROFS);
  const bool has_range = op->kind != BlockOpKind::kFlush;
  if (has_range && op->length == 0) return finish_now(*op, 0);  // NBD forbids empty commands
  // What the server lacks: a flush with nothing to flush (no write cache
  // advertised), an advisory trim, a prefetch hint.
  if ((op->kind == BlockOpKind::kFlush && !caps_.can_flush) ||
      (op->kind == BlockOpKind::kTrim && !caps_.can_trim) ||
      (op->kind == BlockOpKind::kCache && !caps_.can_cache)) {
    return finish_now(*op, 0);
  }
  issue(pick(), *op);
  drain_done();  // what failed at once (a dead connection) is posted from here
}

// Issue every command of `op`'s current stage on `c`.
void NbdBackend::issue(Conn& c, BlockOp& op) {
  pending(op).store(1, std::memory_order_relaxed);  // held until all are issued
  if (op.stage_ == kStageFlushAfter) {
    issue_one(c, op, BlockOpKind::kFlush, 0, 0, nullptr, 0);
    command_done(op, 0);
    kick(c);
    return;
  }
  const bool fua = (op.flags & kFua) != 0 && caps_.can_fua;
  uint32_t flags = fua ? LIBNBD_CMD_FLAG_FUA : 0;
  BlockOpKind kind = op.kind;
  uint64_t chunk = caps_.max_effect;
  const uint8_t* zeros = nullptr;
  switch (op.kind) {
    case BlockOpKind::kRead:
    case BlockOpKind::kCache:
      flags = 0;
      chunk = caps_.max_payload;
      break;
    case BlockOpKind::kWrite: chunk = caps_.max_payload; break;
    case BlockOpKind::kTrim: break;
    case BlockOpKind::kWriteZeroes:
      if (caps_.can_zero) {
        if (op.flags & kNoHole) flags |= LIBNBD_CMD_FLAG_NO_HOLE;
      } else {  // the server cannot zero: write zeroes
        kind = BlockOpKind::kWrite;
        zeros = zero_chunk();
        chunk = std::min<uint64_t>(kZeroChunkBytes, caps_.max_payload);
      }
      break;
    case BlockOpKind::kFlush: flags = 0; break;
  }
  if (op.kind == BlockOpKind::kFlush) {
    issue_one(c, op, kind, 0, 0, nullptr, 0);
  } else {
    for (uint64_t pos = 0; pos < op.length; pos += chunk) {
      const uint64_t n = std::min(chunk, op.length - pos);
      const uint8_t* buf = zeros != nullptr ? zeros : op.buf != nullptr ? op.buf + pos : nullptr;
      if (!issue_one(c, op, kind, op.offset + pos, n, buf, flags)) break;
    }
  }
  command_done(op, 0);  // release the hold
  kick(c);
}

// One libnbd command for `op`. False when it could not be issued (the
// error is recorded in the op; no callback will come for it).
bool NbdBackend::issue_one(Conn& c, BlockOp& op, BlockOpKind kind, uint64_t offset,
                           uint64_t length, const uint8_t* buf, uint32_t flags) {
  nbd_handle* h = c.h.get();
  const nbd_completion_callback cb = {.callback = on_command_done, .user_data = &op, .free = nullptr};
  pending(op).fetch_add(1, std::memory_order_relaxed);
  int64_t cookie = -1;
  switch (kind) {
    case BlockOpKind::kRead:
      cookie = nbd_aio_pread(h, const_cast<uint8_t*>(buf), length, offset, cb, 0);
      break;
    case BlockOpKind::kWrite: cookie = nbd_aio_pwrite(h, buf, length, offset, cb, flags); break;
    case BlockOpKind::kFlush: cookie = nbd_aio_flush(h, cb, 0); break;
    case BlockOpKind::kTrim: cookie = nbd_aio_trim(h, length, offset, cb, flags); break;
    case BlockOpKind::kWriteZeroes: cookie = nbd_aio_zero(h, length, offset, cb, flags); break;
    case BlockOpKind::kCache: cookie = nbd_aio_cache(h, length, offset, cb, 0); break;
  }
  if (cookie != -1) return true;
  const int err = libnbd_errno();
  const std::string why = libnbd_error("request refused");
  if (nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1) lost(c, why);
  command_done(op, c.dead.load() ? ENOTCONN : err);
  return false;
}

int NbdBackend::on_command_done(void* user_data, int* error) {
  auto& op = *static_cast<BlockOp*>(user_data);
  static_cast<NbdBackend*>(op.backend_)->command_done(op, *error);
  return 1;  // retire the command: nobody asks for it by cookie
}

void NbdBackend::command_done(BlockOp& op, int err) {
  if (err != 0) {
    uint64_t none = 0;
    first_error(op).compare_exchange_strong(none, static_cast<uint64_t>(err));
  }
  if (pending(op).fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  std::lock_guard<std::mutex> lock(done_mu_);
  done_.push_back(&op);
}

bool NbdBackend::needs_flush_after(BlockOp& op) const {
  return op.stage_ == kStageMain && (op.flags & kFua) != 0 && is_mutation(op.kind) &&
         !caps_.can_fua && caps_.can_flush;
}

// Post finished ops to their loops, one post per loop; start the follow-up
// flush of ops that need one.
void NbdBackend::drain_done() {
  for (;;) {
    std::vector<BlockOp*> batch;
    {
      std::lock_guard<std::mutex> lock(done_mu_);
      if (done_.empty()) return;
      batch.swap(done_);
    }
    std::vector<std::pair<EventLoop*, std::vector<std::pair<BlockOp*, int>>>> by_loop;
    for (BlockOp* op : batch) {
      const int err = static_cast<int>(first_error(*op).load(std::memory_order_relaxed));
      if (is_connection_error(err)) {
        // The server said it is going away, or libnbd failed the request
        // with the connection before the driver saw it go.
        log_loss(err == ESHUTDOWN ? "the server is shutting down" : std::strerror(err));
      }
      if (err == 0 && needs_flush_after(*op)) {
        op->stage_ = kStageFlushAfter;
        issue(pick(), *op);
        continue;
      }
      auto it = std::find_if(by_loop.begin(), by_loop.end(),
                             [op](const auto& b) { return b.first == op->loop_; });
      if (it == by_loop.end()) it = by_loop.insert(by_loop.end(), {op->loop_, {}});
      it->second.emplace_back(op, err);
    }
    for (auto& [loop, ops] : by_loop) {
      loop->post([ops = std::move(ops)] {
        for (const auto& [op, err] : ops) {
          op->stage_ = BlockOp::kStageDone;
          op->on_done(op_status(op->kind, err));
        }
      });
    }
  }
}

void NbdBackend::wake(Conn& c) {
  const uint64_t one = 1;
  ssize_t n = write(c.wake_fd, &one, sizeof one);
  (void)n;  // a full counter still wakes the driver
}

// After a libnbd call from outside the driver: if libnbd could not send all
// of it, the driver must poll for POLLOUT, which it does not know yet; if
// the connection died in the call (no direction left), it must stop polling
// a socket libnbd has closed.
void NbdBackend::kick(Conn& c) {
  const unsigned dir = nbd_aio_get_direction(c.h.get());
  if ((dir & LIBNBD_AIO_DIRECTION_WRITE) || (dir == 0 && !c.dead.load())) wake(c);
}

void NbdBackend::lost(Conn& c, const std::string& why) {
  if (!c.dead.exchange(true)) log_loss(why);
}

void NbdBackend::log_loss(const std::string& why) {
  if (lost_logged_.load(std::memory_order_relaxed) || lost_logged_.exchange(true)) return;
  spdlog::error("NBD backing {}: lost the connection to the server ({}); every request to it "
                "fails with EIO until shadowd is restarted",
                uri_, why);
}

void NbdBackend::drive(Conn& c) {
  nbd_handle* h = c.h.get();
  while (!stopping_.load(std::memory_order_acquire)) {
    pollfd fds[2] = {{c.wake_fd, POLLIN, 0}, {-1, 0, 0}};
    if (!c.dead.load() && (nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1)) {
      lost(c, "a request failed with the connection");
    }
    if (!c.dead.load()) {
      const unsigned dir = nbd_aio_get_direction(h);
      const int fd = nbd_aio_get_fd(h);
      if (fd >= 0 && dir != 0) {
        fds[1].fd = fd;
        fds[1].events = static_cast<short>(((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                                           ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0));
      }
    }
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      lost(c, std::string("poll: ") + std::strerror(errno));
      break;
    }
    if (fds[0].revents != 0) {
      uint64_t count;
      ssize_t n = read(c.wake_fd, &count, sizeof count);
      (void)n;
    }
    if (fds[1].revents != 0) {
      // The direction may have changed since the poll began (libnbd's rule).
      const unsigned dir = nbd_aio_get_direction(h);
      const short ev = fds[1].revents;
      int r = 0;
      if ((dir & LIBNBD_AIO_DIRECTION_READ) && (ev & (POLLIN | POLLHUP | POLLERR))) {
        r = nbd_aio_notify_read(h);
      } else if ((dir & LIBNBD_AIO_DIRECTION_WRITE) && (ev & (POLLOUT | POLLHUP | POLLERR))) {
        r = nbd_aio_notify_write(h);
      }
      if (r == -1 || nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1) {
        lost(c, libnbd_error("the server closed the connection"));
      }
    }
    drain_done();
  }
  drain_done();
}

// base:allocation of [offset, offset + max_len), first extent only.
struct ExtentQuery {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  int err = 0;
  bool got = false;
  uint64_t length = 0;
  uint32_t flags = 0;

  static int on_extents(void* user_data, const char* context, uint64_t, uint32_t* entries,
                        size_t n, int*) {
    auto& q = *static_cast<ExtentQuery*>(user_data);
    if (std::strcmp(context, LIBNBD_CONTEXT_BASE_ALLOCATION) == 0 && !q.got && n >= 2) {
      q.got = true;  // read by the waiter after `done`, under mu
      q.length = entries[0];
      q.flags = entries[1];
    }
    return 0;
  }
  static int on_done(void* user_data, int* error) {
    auto& q = *static_cast<ExtentQuery*>(user_data);
    std::lock_guard<std::mutex> lock(q.mu);
    q.err = *error;
    q.done = true;
    q.cv.notify_one();
    return 1;
  }
};

Result<IoBackend::Extent> NbdBackend::extent_at(uint64_t offset, uint64_t max_len) {
  if (!info_.can_extents || max_len == 0) return Extent{max_len, false};
  Conn& c = pick();
  ExtentQuery q;
  const uint64_t count = std::min(max_len, caps_.max_effect);
  const int64_t cookie = nbd_aio_block_status(
      c.h.get(), count, offset, {.callback = ExtentQuery::on_extents, .user_data = &q, .free = nullptr},
      {.callback = ExtentQuery::on_done, .user_data = &q, .free = nullptr}, 0);
  if (cookie == -1) {
    const int err = libnbd_errno();
    const std::string why = libnbd_error("block status refused");
    if (nbd_aio_is_dead(c.h.get()) == 1 || nbd_aio_is_closed(c.h.get()) == 1) lost(c, why);
    return c.dead.load() ? op_status(BlockOpKind::kRead, ENOTCONN)
                         : Status::from_errno(err, "nbd block status: " + why);
  }
  kick(c);
  // Synchronous like the lseek of the file backend: one round trip. The
  // completion comes from the driver (also when the connection dies).
  std::unique_lock<std::mutex> lock(q.mu);
  q.cv.wait(lock, [&q] { return q.done; });
  if (q.err != 0) {
    if (is_connection_error(q.err)) return op_status(BlockOpKind::kRead, q.err);
    return Status::from_errno(q.err, "nbd block status");
  }
  if (!q.got || q.length == 0) return Extent{count, false};
  // A hole reads as zeroes only with both flags; a hole that is not known to
  // read as zeroes is data to our clients.
  const uint32_t zero_hole = LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO;
  return Extent{std::min(q.length, max_len), (q.flags & zero_hole) == zero_hole};
}

std::string describe(const std::string& uri, const BackendInfo& info, const Caps& caps,
                     bool multi_conn, size_t connections, uint64_t min_block, uint64_t pref_block,
                     uint64_t max_block) {
  std::string what;
  auto add = [&what](bool on, const char* name) {
    if (on) what += std::string(what.empty() ? "" : ", ") + name;
  };
  add(info.read_only, "read-only");
  add(caps.can_flush, "flush");
  add(caps.can_fua, "fua");
  add(caps.can_trim, "trim");
  add(caps.can_zero, "zero");
  add(caps.can_cache, "cache");
  add(info.can_extents, "base:allocation");
  add(multi_conn, "multi-conn");
  const std::string sizes =
      max_block == 0 && pref_block == 0
          ? "no block sizes advertised"
          : "block sizes min " + std::to_string(min_block) + ", preferred " +
                std::to_string(pref_block) + ", max " + std::to_string(max_block);
  return "NBD backing " + uri + ": " + std::to_string(info.size_bytes) + " bytes (" + what +
         "), " + sizes + ", " + std::to_string(connections) +
         (connections == 1 ? " connection" : " connections");
}

}  // namespace

bool is_nbd_uri(const std::string& text) {
  static constexpr const char* kSchemes[] = {"nbd://",      "nbds://",      "nbd+unix://",
                                             "nbds+unix://", "nbd+vsock://", "nbds+vsock://"};
  for (const char* s : kSchemes) {
    if (text.rfind(s, 0) == 0) return true;
  }
  return false;
}

std::string redact_nbd_uri(const std::string& uri) {
  // scheme://[user[:password]@]host... : drop ":password".
  const size_t start = uri.find("://");
  if (start == std::string::npos) return uri;
  const size_t auth = start + 3;
  const size_t auth_end = uri.find_first_of("/?#", auth);
  const size_t at = uri.rfind('@', auth_end == std::string::npos ? uri.size() : auth_end);
  if (at == std::string::npos || at < auth) return uri;
  const size_t colon = uri.find(':', auth);
  if (colon == std::string::npos || colon > at) return uri;
  return uri.substr(0, colon) + uri.substr(at);
}

Result<std::unique_ptr<IoBackend>> open_nbd_backend(const std::string& uri,
                                                    const NbdBackendOptions& opts) {
  const std::string shown = redact_nbd_uri(uri);
  if (!is_nbd_uri(uri)) return Status::invalid(shown + " is not an NBD URI");
  auto first = connect_handle(uri, shown, opts);
  if (!first) return first.status();
  nbd_handle* h = first->get();
  const int64_t size = nbd_get_size(h);
  if (size < 0) return Status::io_error("NBD server " + shown + ": " + libnbd_error("no size"));
  BackendInfo info;
  info.size_bytes = static_cast<uint64_t>(size);
  info.read_only = nbd_is_read_only(h) == 1;
  if (info.read_only && !opts.read_only) {
    return Status::error(Status::Code::kReadOnly,
                         "NBD server " + shown + " exports it read-only (serve it with --read-only)",
                         EROFS);
  }
  info.read_only = info.read_only || opts.read_only;
  Caps caps;
  caps.can_flush = nbd_can_flush(h) == 1;
  caps.can_fua = nbd_can_fua(h) == 1;
  caps.can_trim = nbd_can_trim(h) == 1;
  caps.can_zero = nbd_can_zero(h) == 1;
  caps.can_cache = nbd_can_cache(h) == 1;
  info.can_trim = caps.can_trim;
  info.can_zero = caps.can_zero;
  info.can_extents = nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
  const uint64_t min_block = std::max<int64_t>(nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM), 1);
  const int64_t pref_block = std::max<int64_t>(nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED), 0);
  const int64_t max_block = std::max<int64_t>(nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM), 0);
  info.alignment_bytes = static_cast<uint32_t>(min_block);
  if (max_block > 0) caps.max_payload = std::min<uint64_t>(caps.max_payload, max_block);
  caps.max_payload = std::max(caps.max_payload / min_block * min_block, min_block);
  caps.max_effect = std::max(caps.max_effect / min_block * min_block, min_block);

  const bool multi_conn = nbd_can_multi_conn(h) == 1;
  const unsigned want = multi_conn ? std::clamp(opts.connections, 1u, kMaxConnections) : 1;
  auto backend = std::make_unique<NbdBackend>(shown, info, caps);
  Status st = backend->add_connection(std::move(*first));
  for (unsigned i = 1; st && i < want; ++i) {
    auto more = connect_handle(uri, shown, opts);
    if (!more) return more.status();
    if (nbd_get_size(more->get()) != size) {
      return Status::io_error("NBD server " + shown + " reports another size on a second connection");
    }
    st = backend->add_connection(std::move(*more));
  }
  if (!st) return st;
  spdlog::info("{}", describe(shown, info, caps, multi_conn, want, min_block, pref_block, max_block));
  if (opts.connections > 1 && !multi_conn) {
    spdlog::info("NBD backing {}: the server does not advertise multi-conn: one connection", shown);
  }
  backend->start();
  return std::unique_ptr<IoBackend>(std::move(backend));
}

}  // namespace shadowd
