#include "core/monitored_backend.h"

namespace shadowd {

void MonitoredBackend::submit(EventLoop& loop, BlockOp* op) {
  switch (op->kind) {
    case BlockOpKind::kRead:
      monitor_.record(AccessOp::kRead, op->offset, op->length);
      break;
    case BlockOpKind::kWrite:
    case BlockOpKind::kTrim:
    case BlockOpKind::kWriteZeroes:
      monitor_.record(AccessOp::kWrite, op->offset, op->length);
      break;
    case BlockOpKind::kFlush:
    case BlockOpKind::kCache:
      break;
  }
  inner_->submit(loop, op);
}

}  // namespace shadowd
