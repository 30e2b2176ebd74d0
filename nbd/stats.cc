#include "nbd/stats.h"

namespace shadowd::nbd {

const char* stat_op_name(StatOp op) {
  switch (op) {
    case kStatRead: return "read";
    case kStatWrite: return "write";
    case kStatFlush: return "flush";
    case kStatTrim: return "trim";
    case kStatWriteZeroes: return "write_zeroes";
    case kStatCache: return "cache";
    case kStatBlockStatus: return "block_status";
    default: return "other";
  }
}

void StatsShard::add(StatOp op, uint64_t bytes_moved, bool error, uint64_t latency_ns) {
  constexpr auto r = std::memory_order_relaxed;
  requests[op].fetch_add(1, r);
  if (bytes_moved != 0) bytes[op].fetch_add(bytes_moved, r);
  if (error) errors[op].fetch_add(1, r);
  const uint64_t us = latency_ns / 1000;
  size_t b = 0;
  while (b < kLatencyBuckets - 1 && us > (uint64_t{1} << b)) ++b;
  latency[b].fetch_add(1, r);
  latency_sum_ns.fetch_add(latency_ns, r);
}

StatsSnapshot ServerStats::snapshot() const {
  constexpr auto r = std::memory_order_relaxed;
  StatsSnapshot s;
  for (size_t i = 0; i < n_; ++i) {
    const StatsShard& sh = shards_[i];
    for (size_t op = 0; op < kStatOpCount; ++op) {
      s.requests[op] += sh.requests[op].load(r);
      s.bytes[op] += sh.bytes[op].load(r);
      s.errors[op] += sh.errors[op].load(r);
    }
    for (size_t b = 0; b < kLatencyBuckets; ++b) {
      const uint64_t c = sh.latency[b].load(r);
      s.latency[b] += c;
      s.latency_count += c;
    }
    s.latency_sum_ns += sh.latency_sum_ns.load(r);
    s.tls_handshakes += sh.tls_handshakes.load(r);
    s.tls_handshake_failures += sh.tls_handshake_failures.load(r);
  }
  return s;
}

}  // namespace shadowd::nbd
