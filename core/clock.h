// Wall-clock time behind an interface, so that tests (and `shadowd
// --test-clock`) can move time without sleeping.
#pragma once

#include <atomic>
#include <cstdint>
#include <ctime>

namespace shadowd {

// Nanoseconds of CLOCK_MONOTONIC, for durations (latency, polling).
inline uint64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1'000'000'000 + uint64_t(ts.tv_nsec);
}

class Clock {
 public:
  virtual ~Clock() = default;
  // Nanoseconds since the Unix epoch.
  virtual int64_t now_ns() const = 0;
  int64_t now_s() const { return now_ns() / 1'000'000'000; }
};

class SystemClock final : public Clock {
 public:
  int64_t now_ns() const override {
    timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
  }
};

// A clock that moves only when told to. Thread-safe.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(int64_t start_ns) : t_(start_ns) {}
  int64_t now_ns() const override { return t_.load(std::memory_order_acquire); }
  void set_ns(int64_t t) { t_.store(t, std::memory_order_release); }
  void advance_ns(int64_t d) { t_.fetch_add(d, std::memory_order_acq_rel); }

 private:
  std::atomic<int64_t> t_;
};

}  // namespace shadowd
