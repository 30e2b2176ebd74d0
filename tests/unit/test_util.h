// Helpers shared by the unit tests: seeds, loops, buffers, a recording op.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/event_loop.h"
#include "core/io_backend.h"

namespace shadowd::test {

// SHADOWD_TEST_SEED replays a failing run; otherwise a fresh seed. Tests
// CAPTURE() it so that a failure prints it.
inline uint64_t test_seed() {
  if (const char* env = std::getenv("SHADOWD_TEST_SEED")) return std::strtoull(env, nullptr, 0);
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

// Exit code CTest reports as "skipped" (SKIP_RETURN_CODE in CMakeLists.txt).
constexpr int kSkipExitCode = 77;

[[noreturn]] inline void skip(const std::string& why) {
  std::fprintf(stderr, "SKIP: %s\n", why.c_str());
  std::exit(kSkipExitCode);
}

// A loop, or a skip when the kernel has no (or a disabled) io_uring.
inline std::unique_ptr<EventLoop> make_loop(unsigned entries = 64) {
  auto loop = EventLoop::create(entries);
  if (!loop) {
    const auto code = loop.status().code();
    if (code == Status::Code::kNotSupported || code == Status::Code::kReadOnly) {
      skip("io_uring unavailable: " + loop.status().to_string());
    }
    std::fprintf(stderr, "EventLoop::create: %s\n", loop.status().to_string().c_str());
    std::abort();
  }
  return std::move(loop.value());
}

inline std::vector<uint8_t> random_bytes(std::mt19937_64& rng, size_t n) {
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

// Index of the first byte where `a` and `b` differ (or where the shorter one
// ends), -1 when equal. Keeps a failing REQUIRE short instead of printing
// whole images.
inline int64_t first_difference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  const size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  }
  return a.size() == b.size() ? -1 : static_cast<int64_t>(n);
}

// A BlockOp that remembers how it finished.
class RecordingOp final : public BlockOp {
 public:
  RecordingOp() = default;
  RecordingOp(BlockOpKind k, uint64_t off, uint64_t len, uint8_t* b = nullptr, uint32_t f = 0) {
    kind = k;
    offset = off;
    length = len;
    buf = b;
    flags = f;
  }
  void on_done(Status st) override {
    status = std::move(st);
    ++done_count;
  }
  Status status;
  int done_count = 0;
};

// Run `loop` until every op in `ops` has finished.
template <typename Ops>
void run_until_done(EventLoop& loop, const Ops& ops) {
  auto all_done = [&] {
    for (const auto& op : ops) {
      if (op->done_count == 0) return false;
    }
    return true;
  };
  while (!all_done()) loop.run_once(true);
}

// Submit one op on `loop` and run it to completion.
inline Status run_on(EventLoop& loop, IoBackend& backend, RecordingOp& op) {
  backend.submit(loop, &op);
  while (op.done_count == 0) loop.run_once(true);
  return op.status;
}

}  // namespace shadowd::test
