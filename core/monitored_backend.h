// An IoBackend layer that counts every request in a Monitor before passing
// it on. READ counts as a read; WRITE, TRIM and WRITE_ZEROES as writes (they
// change the segment); FLUSH and CACHE touch no data and are not counted.
#pragma once

#include <memory>

#include "core/io_backend.h"
#include "core/monitor.h"

namespace shadowd {

class MonitoredBackend final : public LayeredBackend {
 public:
  // REQUIRES: monitor covers inner's size; both outlive this.
  MonitoredBackend(std::shared_ptr<IoBackend> inner, Monitor& monitor)
      : LayeredBackend(std::move(inner)), monitor_(monitor) {}

  void submit(EventLoop& loop, BlockOp* op) override;

 private:
  Monitor& monitor_;
};

}  // namespace shadowd
