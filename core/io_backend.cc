#include "core/io_backend.h"

namespace shadowd {

const char* op_name(BlockOpKind kind) {
  switch (kind) {
    case BlockOpKind::kRead: return "read";
    case BlockOpKind::kWrite: return "write";
    case BlockOpKind::kFlush: return "flush";
    case BlockOpKind::kTrim: return "trim";
    case BlockOpKind::kWriteZeroes: return "write_zeroes";
    case BlockOpKind::kCache: return "cache";
  }
  return "unknown";
}

void BlockOp::on_complete(int res, uint32_t) {
  // A deferred completion (backend_ finished the op) has stage_ == ~0u.
  if (stage_ == kStageDone) {
    on_done(res < 0 ? Status::from_errno(-res, op_name(kind)) : Status::ok());
    return;
  }
  backend_->on_cqe(*this, res);
}

Status run_on(EventLoop& loop, IoBackend& backend, BlockOpKind kind, uint64_t offset,
              uint64_t length, uint8_t* buf, uint32_t flags) {
  SyncOp op;
  op.kind = kind;
  op.offset = offset;
  op.length = length;
  op.buf = buf;
  op.flags = flags;
  backend.submit(loop, &op);
  while (!op.done) loop.run_once(true);
  return op.status;
}

Status run_sync(IoBackend& backend, BlockOpKind kind, uint64_t offset, uint64_t length,
                uint8_t* buf, uint32_t flags) {
  auto loop = EventLoop::create(8);
  if (!loop) return loop.status();
  return run_on(**loop, backend, kind, offset, length, buf, flags);
}

}  // namespace shadowd
