// See overlay_backend.h.
#include "core/overlay_backend.h"

#include <algorithm>
#include <cstring>

namespace shadowd {

// A read of the base on behalf of a read of the overlay: on completion the
// written blocks are laid over the buffer, then the caller's op completes.
class OverlayBackend::ReadOp final : public BlockOp {
 public:
  ReadOp(OverlayBackend* o, BlockOp* orig) : o_(o), orig_(orig) {}
  void on_done(Status st) override {
    BlockOp* orig = orig_;
    if (st) o_->patch(orig->buf, orig->offset, orig->length);
    delete this;
    orig->on_done(std::move(st));
  }

 private:
  OverlayBackend* o_;
  BlockOp* orig_;
};

OverlayBackend::OverlayBackend(std::shared_ptr<IoBackend> base, uint64_t offset, uint64_t size)
    : base_(std::move(base)), offset_(offset) {
  info_.size_bytes = size;
  info_.read_only = false;
  info_.alignment_bytes = 1;
  info_.can_trim = true;
  info_.can_zero = true;
}

uint64_t OverlayBackend::overlay_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return blocks_.size() * kBlock;
}

void OverlayBackend::patch(uint8_t* buf, uint64_t off, uint64_t len) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = blocks_.lower_bound(off / kBlock); it != blocks_.end() && it->first * kBlock < off + len;
       ++it) {
    const uint64_t b = it->first * kBlock;
    const uint64_t from = std::max(b, off), to = std::min(b + kBlock, off + len);
    std::memcpy(buf + (from - off), it->second.data() + (from - b), to - from);
  }
}

Status OverlayBackend::write(uint64_t off, uint64_t len, const uint8_t* data) {
  for (uint64_t pos = off; pos < off + len;) {
    const uint64_t blk = pos / kBlock, b = blk * kBlock;
    const uint64_t to = std::min(b + kBlock, off + len);
    std::array<uint8_t, kBlock>* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = blocks_.find(blk);
      if (it != blocks_.end()) block = &it->second;
    }
    if (block == nullptr) {
      // First write to this block: start from the base's content.
      std::array<uint8_t, kBlock> fresh{};
      const uint64_t n = std::min<uint64_t>(kBlock, info_.size_bytes - b);
      if (pos != b || to != b + kBlock) {
        Status st = run_sync(*base_, BlockOpKind::kRead, offset_ + b, n, fresh.data());
        if (!st) return st;
      }
      std::lock_guard<std::mutex> lock(mu_);
      block = &blocks_.emplace(blk, fresh).first->second;
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (data != nullptr) {
      std::memcpy(block->data() + (pos - b), data + (pos - off), to - pos);
    } else {
      std::memset(block->data() + (pos - b), 0, to - pos);
    }
    pos = to;
  }
  return Status::ok();
}

void OverlayBackend::submit(EventLoop& loop, BlockOp* op) {
  op->loop_ = &loop;
  op->backend_ = this;
  op->stage_ = BlockOp::kStageDone;
  Status st;
  switch (op->kind) {
    case BlockOpKind::kRead: {
      if (op->length == 0) break;
      auto* r = new ReadOp(this, op);
      r->kind = BlockOpKind::kRead;
      r->buf = op->buf;
      r->offset = offset_ + op->offset;
      r->length = op->length;
      base_->submit(loop, r);
      return;
    }
    case BlockOpKind::kWrite:
      st = write(op->offset, op->length, op->buf);
      break;
    case BlockOpKind::kTrim:
    case BlockOpKind::kWriteZeroes:
      st = write(op->offset, op->length, nullptr);
      break;
    default:  // flush, cache: nothing to do in memory
      break;
  }
  loop.defer(op, st ? 0 : -(st.err() != 0 ? st.err() : EIO));
}

void OverlayBackend::on_cqe(BlockOp&, int) {}  // every op is deferred done

}  // namespace shadowd
