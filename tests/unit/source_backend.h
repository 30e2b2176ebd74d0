// A stand-in for the coming point-in-time backend in tests of the
// shadowd:source meta context: MemoryBackend data, info().can_sources set,
// and source_at() answered from a script of runs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "core/memory_backend.h"

namespace shadowd::test {

class SourceBackend final : public IoBackend {
 public:
  // [previous run's end, end) has source flags `flags`. Runs with equal flags
  // may follow each other: source_at() reports them apart, as a backend that
  // walks its maps piece by piece would.
  struct Run {
    uint64_t end;
    uint32_t flags;
  };

  // REQUIRES: runs ascending, the last ending at size_bytes.
  SourceBackend(uint64_t size_bytes, std::vector<Run> runs)
      : mem_(size_bytes, /*seed=*/1, /*read_only=*/true), runs_(std::move(runs)) {
    info_ = mem_.info();
    info_.can_sources = true;
  }

  const BackendInfo& info() const override { return info_; }
  void submit(EventLoop& loop, BlockOp* op) override { mem_.submit(loop, op); }
  Result<Extent> extent_at(uint64_t offset, uint64_t max_len) override {
    return mem_.extent_at(offset, max_len);
  }
  Result<SourceExtent> source_at(uint64_t offset, uint64_t max_len) override {
    ++source_calls;
    if (offset >= fail_from) return Status::io_error("source map unreadable");
    for (const Run& r : runs_) {
      if (offset < r.end) return SourceExtent{std::min(r.end - offset, max_len), r.flags};
    }
    return Status::out_of_range("source_at past the end");
  }

  // source_at() at or past this offset fails with an I/O error.
  uint64_t fail_from = UINT64_MAX;
  uint64_t source_calls = 0;

 protected:
  void on_cqe(BlockOp&, int) override {}  // mem_ completes every op itself

 private:
  MemoryBackend mem_;
  BackendInfo info_;
  std::vector<Run> runs_;
};

}  // namespace shadowd::test
