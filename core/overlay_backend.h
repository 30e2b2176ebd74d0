// A writable view of a read-only range of another backend: reads come from
// the base (at `offset`), writes go to memory (4 KiB blocks) and shadow it.
// Restoring from a replica opens the replica's pool areas and mirror through
// it, so that recovery may write (its checkpoint, records redone onto the
// mirror) while the replica itself is never written.
#pragma once

#include <array>
#include <map>
#include <memory>
#include <mutex>

#include "core/io_backend.h"

namespace shadowd {

class OverlayBackend final : public IoBackend {
 public:
  // REQUIRES: offset + size <= base->size_bytes().
  OverlayBackend(std::shared_ptr<IoBackend> base, uint64_t offset, uint64_t size);
  const BackendInfo& info() const override { return info_; }
  void submit(EventLoop& loop, BlockOp* op) override;
  uint64_t overlay_bytes() const;  // memory held by written blocks

 protected:
  void on_cqe(BlockOp& op, int res) override;

 private:
  static constexpr uint64_t kBlock = 4096;
  class ReadOp;
  void patch(uint8_t* buf, uint64_t off, uint64_t len) const;  // overlay over a read
  Status write(uint64_t off, uint64_t len, const uint8_t* data);  // null: zeroes

  std::shared_ptr<IoBackend> base_;
  uint64_t offset_;
  BackendInfo info_;
  mutable std::mutex mu_;
  std::map<uint64_t, std::array<uint8_t, kBlock>> blocks_;
};

}  // namespace shadowd
