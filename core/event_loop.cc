#include "core/event_loop.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cassert>
#include <cstring>

#include "core/clock.h"

namespace shadowd {

// Keeps one read armed on the eventfd so that post()/stop() wake the loop.
class EventLoop::Wakeup final : public IoCompletion {
 public:
  explicit Wakeup(EventLoop* loop) : loop_(loop) {}
  void on_complete(int, uint32_t) override {
    loop_->drain_posted();
    if (!loop_->stopping()) loop_->arm_wakeup();
  }

 private:
  EventLoop* loop_;
};

Result<std::unique_ptr<EventLoop>> EventLoop::create(unsigned entries) {
  assert(entries >= 8 && entries <= 4096 && (entries & (entries - 1)) == 0);
  std::unique_ptr<EventLoop> loop(new EventLoop());
  io_uring_params params;
  std::memset(&params, 0, sizeof params);
  // COOP_TASKRUN: completions are posted when the loop next enters the
  // kernel (it always does, to wait) instead of interrupting it.
  params.flags = IORING_SETUP_CQSIZE | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL;
  params.cq_entries = entries * 4;
  int rc = io_uring_queue_init_params(entries, &loop->ring_, &params);
  if (rc == -EINVAL) {  // kernels before 5.19
    std::memset(&params, 0, sizeof params);
    params.flags = IORING_SETUP_CQSIZE;
    params.cq_entries = entries * 4;
    rc = io_uring_queue_init_params(entries, &loop->ring_, &params);
  }
  if (rc < 0) {
    // Older kernels: retry without a larger completion queue.
    rc = io_uring_queue_init(entries, &loop->ring_, 0);
  }
  if (rc < 0) return Status::from_errno(-rc, "io_uring_queue_init");
  loop->ring_ok_ = true;
  loop->event_fd_ = eventfd(0, EFD_CLOEXEC);
  if (loop->event_fd_ < 0) return Status::from_errno(errno, "eventfd");
  loop->wakeup_ = std::make_unique<Wakeup>(loop.get());
  loop->arm_wakeup();
  return loop;
}

EventLoop::~EventLoop() {
  if (ring_ok_) io_uring_queue_exit(&ring_);
  std::lock_guard<std::mutex> lock(posted_mu_);  // a post() still writing its wake-up
  if (event_fd_ >= 0) close(event_fd_);
}

io_uring_sqe* EventLoop::sqe_for(IoCompletion* c) {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  while (sqe == nullptr) {
    io_uring_submit(&ring_);
    sqe = io_uring_get_sqe(&ring_);
  }
  io_uring_sqe_set_data(sqe, c);
  ++in_flight_;
  return sqe;
}

void EventLoop::defer(IoCompletion* c, int res) {
  deferred_.emplace_back(c, res);
  ++in_flight_;
}

void EventLoop::post(std::function<void()> fn) {
  // The wake-up is written under the lock: once the loop has run `fn` its
  // thread may return and destroy the loop, and the destructor takes the
  // lock before it closes the eventfd (found by TSan: a loop of a thread
  // that ended right after a completion posted to it).
  std::lock_guard<std::mutex> lock(posted_mu_);
  posted_.push_back(std::move(fn));
  uint64_t one = 1;
  ssize_t n = write(event_fd_, &one, sizeof one);
  (void)n;  // a full counter still wakes the loop
}

void EventLoop::stop() {
  stop_.store(true, std::memory_order_release);
  uint64_t one = 1;
  ssize_t n = write(event_fd_, &one, sizeof one);
  (void)n;
}

void EventLoop::arm_wakeup() {
  io_uring_sqe* sqe = sqe_for(wakeup_.get());
  io_uring_prep_read(sqe, event_fd_, &event_buf_, sizeof event_buf_, 0);
}

void EventLoop::drain_posted() {
  std::vector<std::function<void()>> fns;
  {
    std::lock_guard<std::mutex> lock(posted_mu_);
    fns.swap(posted_);
  }
  for (auto& fn : fns) fn();
}

void EventLoop::dispatch_deferred() {
  // Callbacks may defer more work; take the current batch only.
  deferred_run_.clear();
  deferred_run_.swap(deferred_);
  for (auto& [c, res] : deferred_run_) {
    --in_flight_;
    c->on_complete(res, 0);
  }
}

unsigned EventLoop::run_once(bool wait) {
  unsigned handled = 0;
  if (!deferred_.empty()) {
    handled += deferred_.size();
    dispatch_deferred();
    wait = false;  // the callbacks may have queued work; do not block on it
  }
  int rc = io_uring_submit(&ring_);
  if (wait && io_uring_cq_ready(&ring_) == 0 && poll_ns_ > 0) {
    // Busy-poll briefly before sleeping: in a VM a wake-up costs tens of
    // microseconds, more than a completion usually takes to arrive under load.
    const uint64_t until = monotonic_ns() + poll_ns_;
    while (io_uring_cq_ready(&ring_) == 0 && monotonic_ns() < until) {
    }
  }
  if (wait && io_uring_cq_ready(&ring_) == 0) rc = io_uring_submit_and_wait(&ring_, 1);
  if (rc < 0 && rc != -EINTR && rc != -EBUSY && rc != -EAGAIN) {
    // The ring itself failed: nothing we can recover here.
    assert(false && "io_uring_submit failed");
  }
  io_uring_cqe* cqe;
  unsigned head;
  unsigned count = 0;
  // Copy out first so callbacks may submit (and reap) freely.
  struct Done {
    IoCompletion* c;
    int res;
    uint32_t flags;
  };
  Done batch[256];
  io_uring_for_each_cqe(&ring_, head, cqe) {
    batch[count++] = {static_cast<IoCompletion*>(io_uring_cqe_get_data(cqe)), cqe->res,
                      cqe->flags};
    if (count == 256) break;
  }
  io_uring_cq_advance(&ring_, count);
  for (unsigned i = 0; i < count; ++i) {
    --in_flight_;
    if (batch[i].c != nullptr) batch[i].c->on_complete(batch[i].res, batch[i].flags);
  }
  return handled + count;
}

void EventLoop::run() {
  while (!stopping()) run_once(true);
  drain_posted();
}

}  // namespace shadowd
