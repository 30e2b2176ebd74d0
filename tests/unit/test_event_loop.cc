#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>
#include <future>
#include <thread>
#include <vector>

#include "core/event_loop.h"
#include "tests/unit/test_util.h"

namespace shadowd {
namespace {

using test::make_loop;

// Records the results it is completed with, in order.
class Recorder final : public IoCompletion {
 public:
  explicit Recorder(std::vector<int>* log) : log_(log) {}
  void on_complete(int res, uint32_t) override { log_->push_back(res); }

 private:
  std::vector<int>* log_;
};

TEST_CASE("event_loop: post() from another thread runs fn on the loop thread", "[event_loop]") {
  auto loop = make_loop();
  std::thread::id ran_on;
  int calls = 0;
  std::thread poster([&] {
    loop->post([&] {
      ran_on = std::this_thread::get_id();
      ++calls;
      loop->stop();
    });
  });
  loop->run();
  poster.join();
  REQUIRE(calls == 1);
  REQUIRE(ran_on == std::this_thread::get_id());
}

TEST_CASE("event_loop: post() from many threads runs every fn once, in each poster's order",
          "[event_loop]") {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 2000;
  auto loop = make_loop();
  std::vector<int> next(kThreads, 0);  // touched on the loop thread only
  int total = 0;
  bool in_order = true;
  std::vector<std::thread> posters;
  for (int t = 0; t < kThreads; ++t) {
    posters.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        loop->post([&, t, i] {
          in_order = in_order && next[t] == i;
          next[t] = i + 1;
          if (++total == kThreads * kPerThread) loop->stop();
        });
      }
    });
  }
  loop->run();
  for (auto& p : posters) p.join();
  REQUIRE(total == kThreads * kPerThread);
  REQUIRE(in_order);
}

TEST_CASE("event_loop: stop() from another thread wakes a blocked run()", "[event_loop]") {
  auto loop = make_loop();
  std::promise<void> running;
  auto running_future = running.get_future();
  std::atomic<bool> late_post_ran{false};
  std::thread stopper([&] {
    running_future.wait();
    // Posted before stop(): run() must not return without running it.
    loop->post([&] { late_post_ran = true; });
    loop->stop();
  });
  loop->post([&] { running.set_value(); });
  loop->run();  // hangs here if stop() does not wake the ring
  stopper.join();
  REQUIRE(loop->stopping());
  REQUIRE(late_post_ran);
}

TEST_CASE("event_loop: defer() completes in order, on a later iteration, and counts as in flight",
          "[event_loop]") {
  auto loop = make_loop();
  const uint64_t base = loop->in_flight();  // the loop's own wakeup read
  std::vector<int> log;
  Recorder a(&log), b(&log), c(&log), d(&log);
  // `b` defers `d` from its callback: that must wait for the next iteration.
  struct Chain final : IoCompletion {
    EventLoop* loop;
    IoCompletion* next;
    std::vector<int>* log;
    void on_complete(int res, uint32_t) override {
      log->push_back(res);
      loop->defer(next, 4);
    }
  } chain;
  chain.loop = loop.get();
  chain.next = &d;
  chain.log = &log;

  loop->defer(&a, 1);
  loop->defer(&chain, 2);
  loop->defer(&c, -3);
  REQUIRE(loop->in_flight() == base + 3);
  REQUIRE(log.empty());  // nothing runs inside defer()

  loop->run_once(true);  // must not block: work is deferred
  REQUIRE(log == std::vector<int>{1, 2, -3});
  REQUIRE(loop->in_flight() == base + 1);

  loop->run_once(true);
  REQUIRE(log == std::vector<int>{1, 2, -3, 4});
  REQUIRE(loop->in_flight() == base);
}

TEST_CASE("event_loop: OneShot passes the result and deletes itself", "[event_loop]") {
  auto loop = make_loop();
  std::vector<int> got;
  loop->defer(new OneShot([&](int res) { got.push_back(res); }), -5);
  // A OneShot on a real ring completion as well (ASan reports a leak if the
  // object is not deleted).
  io_uring_prep_nop(loop->sqe_for(new OneShot([&](int res) { got.push_back(res + 100); })));
  while (got.size() < 2) loop->run_once(true);
  REQUIRE(got == std::vector<int>{-5, 100});
}

TEST_CASE("event_loop: io_uring nops beyond the ring size all complete", "[event_loop]") {
  // 8 entries: sqe_for() must submit when the queue is full.
  auto loop = make_loop(8);
  const uint64_t base = loop->in_flight();
  constexpr int kOps = 1000;
  int ok = 0;
  int done = 0;
  for (int i = 0; i < kOps; ++i) {
    io_uring_prep_nop(loop->sqe_for(new OneShot([&](int res) {
      ++done;
      ok += res == 0;
    })));
  }
  while (done < kOps) loop->run_once(true);
  REQUIRE(ok == kOps);
  REQUIRE(loop->in_flight() == base);
}

TEST_CASE("event_loop: a completion callback can submit the next operation", "[event_loop]") {
  auto loop = make_loop();
  int remaining = 10;
  std::function<void(int)> step = [&](int res) {
    REQUIRE(res == 0);
    if (--remaining > 0) io_uring_prep_nop(loop->sqe_for(new OneShot(step)));
  };
  io_uring_prep_nop(loop->sqe_for(new OneShot(step)));
  while (remaining > 0) loop->run_once(true);
  REQUIRE(remaining == 0);
}

TEST_CASE("event_loop: an io_uring read from a pipe delivers the bytes", "[event_loop]") {
  auto loop = make_loop();
  int fds[2];
  REQUIRE(pipe(fds) == 0);
  char buf[16] = {};
  int res = -1;
  bool done = false;
  auto* on_read = new OneShot([&](int r) {
    res = r;
    done = true;
  });
  io_uring_prep_read(loop->sqe_for(on_read), fds[0], buf, sizeof buf, 0);
  loop->run_once(false);  // the read is now parked in the kernel, waiting for data
  ssize_t written = 0;    // Catch assertions are not thread-safe: check it here
  std::thread writer([&] { written = write(fds[1], "hello", 5); });
  while (!done) loop->run_once(true);
  writer.join();
  REQUIRE(written == 5);
  close(fds[0]);
  close(fds[1]);
  REQUIRE(res == 5);
  REQUIRE(std::memcmp(buf, "hello", 5) == 0);
}

}  // namespace
}  // namespace shadowd
