// A single-threaded reactor over one io_uring. Socket and disk I/O of the
// connections a loop owns are submitted to its ring; completions call back
// into intrusive IoCompletion objects, so the hot path allocates nothing.
//
// Threading: everything but post() and stop() must be called from the thread
// that runs run(). post() and stop() may be called from any thread.
#pragma once

#include <liburing.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "core/status.h"

namespace shadowd {

// Something waiting for one io_uring completion (or a deferred result).
class IoCompletion {
 public:
  virtual ~IoCompletion() = default;
  // res: bytes transferred (>= 0) or -errno. flags: the CQE flags.
  virtual void on_complete(int res, uint32_t flags) = 0;
};

class EventLoop {
 public:
  // REQUIRES: entries is a power of two, 8..4096.
  static Result<std::unique_ptr<EventLoop>> create(unsigned entries = 256);
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // A free submission queue entry whose user_data is set to `c`. When the
  // queue is full the pending entries are submitted first; never null.
  io_uring_sqe* sqe_for(IoCompletion* c);

  // Complete `c` with `res` on the next loop iteration, without the kernel
  // (used by backends that do not touch the ring, and to avoid re-entrancy).
  void defer(IoCompletion* c, int res);

  // Run `fn` on the loop thread soon. Thread-safe.
  void post(std::function<void()> fn);

  // Process completions until stop(). Returns when stopped.
  void run();
  // Run one iteration: submit, wait for at least one completion unless
  // `wait` is false, dispatch. Returns the number of completions handled.
  unsigned run_once(bool wait = true);
  // Ask run() to return. Thread-safe.
  void stop();
  bool stopping() const { return stop_.load(std::memory_order_acquire); }
  // Spin up to `ns` for completions before sleeping in the kernel (0: never).
  void set_busy_poll_ns(uint64_t ns) { poll_ns_ = ns; }

  // Number of operations submitted to the ring whose completion has not
  // been dispatched yet (plus deferred ones), including the loop's own
  // wake-up read: an idle loop reports 1.
  uint64_t in_flight() const { return in_flight_; }

 private:
  EventLoop() = default;
  void arm_wakeup();
  void drain_posted();
  void dispatch_deferred();

  class Wakeup;
  io_uring ring_{};
  bool ring_ok_ = false;
  int event_fd_ = -1;
  uint64_t event_buf_ = 0;
  std::unique_ptr<Wakeup> wakeup_;
  std::atomic<bool> stop_{false};
  uint64_t in_flight_ = 0;
  uint64_t poll_ns_ = 0;

  std::vector<std::pair<IoCompletion*, int>> deferred_;
  std::vector<std::pair<IoCompletion*, int>> deferred_run_;

  std::mutex posted_mu_;
  std::vector<std::function<void()>> posted_;
};

// Adapts a callable to IoCompletion; deletes itself after the call. For the
// paths that are not per-request (accept, timers, control).
class OneShot final : public IoCompletion {
 public:
  explicit OneShot(std::function<void(int)> fn) : fn_(std::move(fn)) {}
  void on_complete(int res, uint32_t) override {
    auto fn = std::move(fn_);
    delete this;
    fn(res);
  }

 private:
  std::function<void(int)> fn_;
};

}  // namespace shadowd
