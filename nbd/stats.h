// Request statistics of the NBD server: per command, requests, bytes and
// errors, and a latency histogram (request parsed -> reply queued). One shard
// per worker thread, written only by that thread with relaxed atomics and
// summed when read, so the I/O path shares no cache line between threads.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace shadowd::nbd {

// Commands as counted (indexes into the arrays below).
enum StatOp : uint8_t {
  kStatRead,
  kStatWrite,
  kStatFlush,
  kStatTrim,
  kStatWriteZeroes,
  kStatCache,
  kStatBlockStatus,
  kStatOther,  // unknown commands and refused requests of unknown type
  kStatOpCount,
};
const char* stat_op_name(StatOp op);  // "read", "write", "flush", ...

// Latency histogram upper bounds in microseconds: 1, 2, 4, ... 2^(n-2), +Inf.
constexpr size_t kLatencyBuckets = 26;
inline double latency_bound_seconds(size_t i) {
  return static_cast<double>(uint64_t{1} << i) * 1e-6;  // i < kLatencyBuckets - 1
}

struct alignas(64) StatsShard {
  std::array<std::atomic<uint64_t>, kStatOpCount> requests{};
  std::array<std::atomic<uint64_t>, kStatOpCount> bytes{};
  std::array<std::atomic<uint64_t>, kStatOpCount> errors{};
  std::array<std::atomic<uint64_t>, kLatencyBuckets> latency{};  // not cumulative
  std::atomic<uint64_t> latency_sum_ns{0};
  std::atomic<uint64_t> tls_handshakes{0};          // completed
  std::atomic<uint64_t> tls_handshake_failures{0};  // bad certificate, wrong key, ...

  void add(StatOp op, uint64_t bytes_moved, bool error, uint64_t latency_ns);
};

struct StatsSnapshot {
  std::array<uint64_t, kStatOpCount> requests{};
  std::array<uint64_t, kStatOpCount> bytes{};
  std::array<uint64_t, kStatOpCount> errors{};
  std::array<uint64_t, kLatencyBuckets> latency{};  // per bucket, not cumulative
  uint64_t latency_sum_ns = 0;
  uint64_t latency_count = 0;
  uint64_t tls_handshakes = 0;
  uint64_t tls_handshake_failures = 0;
  uint32_t connections_open = 0;
  uint64_t connections_total = 0;
};

class ServerStats {
 public:
  explicit ServerStats(size_t shards) : shards_(std::make_unique<StatsShard[]>(shards)), n_(shards) {}
  StatsShard& shard(size_t i) { return shards_[i]; }
  StatsSnapshot snapshot() const;

 private:
  std::unique_ptr<StatsShard[]> shards_;
  size_t n_;
};

}  // namespace shadowd::nbd
