// An IoBackend layer that counts every request in a Monitor before passing
// it on. READ counts as a read; WRITE, TRIM and WRITE_ZEROES as writes (they
// change the segment); FLUSH and CACHE touch no data and are not counted.
#pragma once

#include <memory>

#include "core/io_backend.h"
#include "core/monitor.h"

namespace shadowd {

class MonitoredBackend final : public IoBackend {
 public:
  // REQUIRES: monitor covers inner's size; both outlive this.
  MonitoredBackend(std::shared_ptr<IoBackend> inner, Monitor& monitor)
      : inner_(std::move(inner)), monitor_(monitor) {}

  const BackendInfo& info() const override { return inner_->info(); }
  void submit(EventLoop& loop, BlockOp* op) override;
  Result<Extent> extent_at(uint64_t offset, uint64_t max_len) override {
    return inner_->extent_at(offset, max_len);
  }
  Result<SourceExtent> source_at(uint64_t offset, uint64_t max_len) override {
    return inner_->source_at(offset, max_len);
  }

 protected:
  // Completions go to the inner backend, which set itself as op->backend_.
  void on_cqe(BlockOp&, int) override {}

 private:
  std::shared_ptr<IoBackend> inner_;
  Monitor& monitor_;
};

}  // namespace shadowd
