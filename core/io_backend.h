// The block store under an export. Every access to a primary (and, later,
// to a pool device) goes through this interface, so the same engine runs
// over io_uring in production and over a seeded, fault-injecting in-memory
// store in tests (see memory_backend.h). Layers (monitor, journal, error
// injection) stack by wrapping one IoBackend in another.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "core/event_loop.h"
#include "core/status.h"

namespace shadowd {

enum class BlockOpKind : uint8_t {
  kRead,
  kWrite,
  kFlush,        // make every completed write durable
  kTrim,         // discard (advisory, as in NBD: where the file system cannot punch
                 // holes it succeeds and the range keeps its content)
  kWriteZeroes,  // zero the range; may punch a hole unless kNoHole
  kCache,        // prefetch hint
};

const char* op_name(BlockOpKind kind);

enum BlockOpFlags : uint32_t {
  kFua = 1u << 0,     // the write is durable when it completes
  kNoHole = 1u << 1,  // kWriteZeroes must allocate (no hole punching)
};

// One request to a backend. Owned by the caller and kept alive until
// on_done() has been called (exactly once, on the loop thread the request
// was submitted from, never from inside submit()).
class BlockOp : public IoCompletion {
 public:
  BlockOpKind kind = BlockOpKind::kRead;
  uint32_t flags = 0;
  uint8_t* buf = nullptr;  // kRead: filled; kWrite: source. Others: unused.
  uint64_t offset = 0;
  uint64_t length = 0;

  virtual void on_done(Status status) = 0;

  // Backend bookkeeping (short transfers, retries). Not for callers.
  // stage_ == kStageDone marks a completion the backend deferred with its
  // final result.
  static constexpr uint32_t kStageDone = ~0u;
  class IoBackend* backend_ = nullptr;
  EventLoop* loop_ = nullptr;
  uint64_t progress_ = 0;
  uint32_t retries_ = 0;
  uint32_t stage_ = 0;
  void on_complete(int res, uint32_t cqe_flags) final;
};

struct BackendInfo {
  uint64_t size_bytes = 0;
  bool read_only = false;
  bool direct_io = false;       // O_DIRECT in use for aligned requests
  uint32_t alignment_bytes = 1; // O_DIRECT alignment (buffers, offsets, lengths)
  bool is_block_device = false;
  bool can_trim = true;
  bool can_zero = true;
  bool can_extents = false;     // extents() reports holes
  bool can_sources = false;     // source_at() answers (point-in-time exports)
};

class IoBackend {
 public:
  virtual ~IoBackend() = default;
  virtual const BackendInfo& info() const = 0;
  uint64_t size_bytes() const { return info().size_bytes; }

  // Start `op` on `loop`. Ranges are checked by the caller (the NBD layer);
  // REQUIRES: offset + length <= size_bytes() for data ops.
  virtual void submit(EventLoop& loop, BlockOp* op) = 0;

  // Extent query for base:allocation: starting at `offset`, the length of the
  // run that is all data (is_hole=false) or all hole (is_hole=true), capped at
  // `max_len`. Synchronous (an lseek); backends that cannot tell report data.
  struct Extent {
    uint64_t length;
    bool is_hole;
  };
  virtual Result<Extent> extent_at(uint64_t offset, uint64_t max_len) {
    (void)offset;
    return Extent{max_len, false};
  }

  // Where the content of a range comes from, for the shadowd:source metadata
  // context of point-in-time exports. Flags of NBD's block-status descriptors.
  enum SourceFlags : uint32_t { kSourcePrimary = 0, kSourceVersion = 1, kSourceJournal = 2 };
  struct SourceExtent {
    uint64_t length;
    uint32_t flags;  // kSourcePrimary, or kSourceVersion and/or kSourceJournal
  };
  // Starting at `offset`, the run (capped at `max_len`) whose source flags are
  // all the same. Synchronous. Only backends with info().can_sources answer it;
  // layers that wrap a backend must forward it along with info().
  virtual Result<SourceExtent> source_at(uint64_t offset, uint64_t max_len) {
    (void)offset;
    return SourceExtent{max_len, kSourcePrimary};
  }

 protected:
  friend class BlockOp;
  // A completion of an io_uring operation started for `op`.
  virtual void on_cqe(BlockOp& op, int res) = 0;
};

// A layer over another backend that sees every request on its way down:
// everything but submit() is the inner backend's (info, extents, sources),
// and completions go to the inner backend, which sets itself as
// op->backend_.
class LayeredBackend : public IoBackend {
 public:
  explicit LayeredBackend(std::shared_ptr<IoBackend> inner) : inner_(std::move(inner)) {}
  const BackendInfo& info() const override { return inner_->info(); }
  Result<Extent> extent_at(uint64_t offset, uint64_t max_len) override {
    return inner_->extent_at(offset, max_len);
  }
  Result<SourceExtent> source_at(uint64_t offset, uint64_t max_len) override {
    return inner_->source_at(offset, max_len);
  }

 protected:
  void on_cqe(BlockOp&, int) override {}
  std::shared_ptr<IoBackend> inner_;
};

// An op its caller waits for by driving the loop it was submitted on.
class SyncOp final : public BlockOp {
 public:
  void on_done(Status st) override {
    status = std::move(st);
    done = true;
  }
  Status status;
  bool done = false;
};

// Runs one op on `loop`, which the calling thread drives, until it is done.
Status run_on(EventLoop& loop, IoBackend& backend, BlockOpKind kind, uint64_t offset,
              uint64_t length, uint8_t* buf = nullptr, uint32_t flags = 0);

// Synchronous helpers for tools and tests: run one op on a private loop.
Status run_sync(IoBackend& backend, BlockOpKind kind, uint64_t offset, uint64_t length,
                uint8_t* buf = nullptr, uint32_t flags = 0);

// Options for opening a file or block device.
struct FileBackendOptions {
  bool read_only = false;
  enum class Direct { kAuto, kOn, kOff } direct = Direct::kAuto;
};

// The production backend: a file or block device driven by io_uring.
Result<std::unique_ptr<IoBackend>> open_uring_backend(const std::string& path,
                                                      const FileBackendOptions& opts);

}  // namespace shadowd
