// io_uring backend over a file or block device.
//
// Two descriptors: one opened with O_DIRECT (when the file system allows it)
// for requests whose buffer, offset and length are aligned, and a buffered one
// for the rest. Linux keeps the two coherent (direct I/O writes back and
// invalidates the page cache over its range first), and fsync on either
// covers the inode. Short transfers and -EAGAIN are resubmitted.
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "core/io_backend.h"

namespace shadowd {
namespace {

constexpr uint32_t kMaxRetries = 10000;
constexpr size_t kZeroChunk = 1 << 20;
constexpr uint64_t kMaxTransfer = 1u << 30;  // one SQE moves at most this much

const uint8_t* zero_chunk() {
  static const auto* zeros = new uint8_t[kZeroChunk]();
  return zeros;
}

enum Stage : uint32_t {
  kStageMain = 0,      // the operation itself
  kStageZeroWrite = 1, // WRITE_ZEROES fallback: writing zero buffers
  kStageFuaSync = 2,   // fdatasync after a zeroing op with FUA
};

class UringBackend final : public IoBackend {
 public:
  UringBackend(int fd_buf, int fd_direct, BackendInfo info)
      : fd_buf_(fd_buf), fd_direct_(fd_direct), info_(info) {}
  ~UringBackend() override {
    if (fd_direct_ >= 0) close(fd_direct_);
    close(fd_buf_);
  }

  const BackendInfo& info() const override { return info_; }

  void submit(EventLoop& loop, BlockOp* op) override {
    op->backend_ = this;
    op->progress_ = 0;
    op->retries_ = 0;
    op->stage_ = kStageMain;
    op->loop_ = &loop;
    const bool mutating = op->kind == BlockOpKind::kWrite || op->kind == BlockOpKind::kTrim ||
                          op->kind == BlockOpKind::kWriteZeroes;
    if (mutating && info_.read_only) return finish(*op, Status::from_errno(EROFS, op_name(op->kind)));
    const bool data = op->kind == BlockOpKind::kRead || op->kind == BlockOpKind::kWrite;
    if (data && op->length == 0) return finish(*op, Status::ok());
    start(*op);
  }

  Result<Extent> extent_at(uint64_t offset, uint64_t max_len) override {
    if (!info_.can_extents) return Extent{max_len, false};
    off_t data = lseek(fd_buf_, static_cast<off_t>(offset), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) return Extent{max_len, true};  // hole up to EOF
      return Extent{max_len, false};
    }
    if (static_cast<uint64_t>(data) > offset) {
      return Extent{std::min<uint64_t>(data - offset, max_len), true};
    }
    off_t hole = lseek(fd_buf_, static_cast<off_t>(offset), SEEK_HOLE);
    if (hole < 0 || static_cast<uint64_t>(hole) <= offset) return Extent{max_len, false};
    return Extent{std::min<uint64_t>(hole - offset, max_len), false};
  }

 protected:
  void on_cqe(BlockOp& op, int res) override;

 private:
  bool aligned(const BlockOp& op) const {
    const uint64_t a = info_.alignment_bytes;
    const uint64_t pos = op.offset + op.progress_;
    const uint64_t len = op.length - op.progress_;
    return fd_direct_ >= 0 && pos % a == 0 && len % a == 0 &&
           reinterpret_cast<uintptr_t>(op.buf + op.progress_) % a == 0;
  }
  void start(BlockOp& op);
  void start_zero_write(BlockOp& op);
  static void finish(BlockOp& op, const Status& st) {
    op.stage_ = BlockOp::kStageDone;
    op.loop_->defer(&op, st.is_ok() ? 0 : -(st.err() != 0 ? st.err() : EIO));
  }

  int fd_buf_;
  int fd_direct_;
  BackendInfo info_;
};

void UringBackend::start(BlockOp& op) {
  EventLoop& loop = *op.loop_;
  const uint64_t pos = op.offset + op.progress_;
  const uint64_t left = std::min(op.length - op.progress_, kMaxTransfer);
  switch (op.kind) {
    case BlockOpKind::kRead: {
      io_uring_sqe* sqe = loop.sqe_for(&op);
      io_uring_prep_read(sqe, aligned(op) ? fd_direct_ : fd_buf_, op.buf + op.progress_,
                         static_cast<unsigned>(left), pos);
      return;
    }
    case BlockOpKind::kWrite: {
      io_uring_sqe* sqe = loop.sqe_for(&op);
      io_uring_prep_write(sqe, aligned(op) ? fd_direct_ : fd_buf_, op.buf + op.progress_,
                          static_cast<unsigned>(left), pos);
      if (op.flags & kFua) sqe->rw_flags = RWF_DSYNC;
      return;
    }
    case BlockOpKind::kFlush: {
      io_uring_sqe* sqe = loop.sqe_for(&op);
      io_uring_prep_fsync(sqe, fd_buf_, IORING_FSYNC_DATASYNC);
      return;
    }
    case BlockOpKind::kTrim: {
      io_uring_sqe* sqe = loop.sqe_for(&op);
      io_uring_prep_fallocate(sqe, fd_buf_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                              op.offset, op.length);
      return;
    }
    case BlockOpKind::kWriteZeroes: {
      if (op.stage_ == kStageZeroWrite) return start_zero_write(op);
      io_uring_sqe* sqe = loop.sqe_for(&op);
      int mode = (op.flags & kNoHole) ? FALLOC_FL_ZERO_RANGE
                                      : (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
      io_uring_prep_fallocate(sqe, fd_buf_, mode, op.offset, op.length);
      return;
    }
    case BlockOpKind::kCache: {
      io_uring_sqe* sqe = loop.sqe_for(&op);
      io_uring_prep_fadvise(sqe, fd_buf_, op.offset, static_cast<off_t>(op.length),
                            POSIX_FADV_WILLNEED);
      return;
    }
  }
}

void UringBackend::start_zero_write(BlockOp& op) {
  const uint64_t left = op.length - op.progress_;
  io_uring_sqe* sqe = op.loop_->sqe_for(&op);
  io_uring_prep_write(sqe, fd_buf_, zero_chunk(),
                      static_cast<unsigned>(std::min<uint64_t>(left, kZeroChunk)),
                      op.offset + op.progress_);
}

void UringBackend::on_cqe(BlockOp& op, int res) {
  if ((res == -EAGAIN || res == -EINTR) && op.retries_++ < kMaxRetries) {
    if (op.stage_ == kStageFuaSync) {
      io_uring_prep_fsync(op.loop_->sqe_for(&op), fd_buf_, IORING_FSYNC_DATASYNC);
      return;
    }
    return start(op);
  }
  if (op.stage_ == kStageFuaSync) {
    return finish(op, res < 0 ? Status::from_errno(-res, "fdatasync") : Status::ok());
  }
  const bool data_op = op.kind == BlockOpKind::kRead || op.kind == BlockOpKind::kWrite ||
                       op.stage_ == kStageZeroWrite;
  if (res < 0) {
    if (op.kind == BlockOpKind::kCache) return finish(op, Status::ok());  // only a hint
    if (res == -EOPNOTSUPP || res == -EINVAL || res == -ENODEV) {
      if (op.kind == BlockOpKind::kTrim) return finish(op, Status::ok());  // advisory (NBD)
      if (op.kind == BlockOpKind::kWriteZeroes && op.stage_ == kStageMain) {
        op.stage_ = kStageZeroWrite;
        op.progress_ = 0;
        return start_zero_write(op);
      }
    }
    return finish(op, Status::from_errno(-res, op_name(op.kind)));
  }
  if (data_op) {
    if (res == 0) return finish(op, Status::io_error("unexpected end of file"));
    op.progress_ += static_cast<uint64_t>(res);
    if (op.progress_ < op.length) {
      if (op.stage_ == kStageZeroWrite) return start_zero_write(op);
      return start(op);
    }
  }
  const bool zeroing = op.kind == BlockOpKind::kWriteZeroes || op.kind == BlockOpKind::kTrim;
  if (zeroing && (op.flags & kFua)) {
    op.stage_ = kStageFuaSync;
    io_uring_prep_fsync(op.loop_->sqe_for(&op), fd_buf_, IORING_FSYNC_DATASYNC);
    return;
  }
  finish(op, Status::ok());
}

}  // namespace

Result<std::unique_ptr<IoBackend>> open_uring_backend(const std::string& path,
                                                      const FileBackendOptions& opts) {
  const int mode = opts.read_only ? O_RDONLY : O_RDWR;
  int fd = open(path.c_str(), mode | O_CLOEXEC);
  if (fd < 0) return Status::from_errno(errno, "open " + path);
  struct stat st;
  if (fstat(fd, &st) < 0) {
    int e = errno;
    close(fd);
    return Status::from_errno(e, "fstat " + path);
  }
  BackendInfo info;
  info.read_only = opts.read_only;
  info.alignment_bytes = 4096;
  if (S_ISBLK(st.st_mode)) {
    info.is_block_device = true;
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0) {
      int e = errno;
      close(fd);
      return Status::from_errno(e, "BLKGETSIZE64 " + path);
    }
    info.size_bytes = size;
    int lbs = 0;
    if (ioctl(fd, BLKSSZGET, &lbs) == 0 && lbs > 0) info.alignment_bytes = lbs;
  } else if (S_ISREG(st.st_mode)) {
    info.size_bytes = static_cast<uint64_t>(st.st_size);
    info.can_extents = true;
  } else {
    close(fd);
    return Status::invalid(path + ": not a regular file or block device");
  }
  int fd_direct = -1;
  if (opts.direct != FileBackendOptions::Direct::kOff) {
    fd_direct = open(path.c_str(), mode | O_CLOEXEC | O_DIRECT);
    if (fd_direct < 0 && opts.direct == FileBackendOptions::Direct::kOn) {
      int e = errno;
      close(fd);
      return Status::from_errno(e, "open O_DIRECT " + path);
    }
  }
  info.direct_io = fd_direct >= 0;
  return std::unique_ptr<IoBackend>(new UringBackend(fd, fd_direct, info));
}

}  // namespace shadowd
