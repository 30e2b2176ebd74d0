#include "core/memory_backend.h"

#include <algorithm>
#include <cassert>
#include <cstdlib>
#include <cstring>

namespace shadowd {
namespace {

// The unit a torn write is cut on: disks persist whole sectors.
constexpr uint64_t kSectorBytes = 512;

size_t kind_index(BlockOpKind kind) { return static_cast<size_t>(kind); }

bool is_mutation(BlockOpKind kind) {
  return kind == BlockOpKind::kWrite || kind == BlockOpKind::kTrim ||
         kind == BlockOpKind::kWriteZeroes;
}

// A uniform double in [0, 1) from the top 53 bits; unlike the standard
// distributions its sequence is the same with every C++ library, so a seed
// replays anywhere.
double unit_interval(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

}  // namespace

MemoryBackend::MemoryBackend(uint64_t size_bytes, uint64_t seed, bool read_only)
    : seed_(seed), rng_(seed), data_(size_bytes), durable_(size_bytes) {
  info_.size_bytes = size_bytes;
  info_.read_only = read_only;
  info_.can_extents = false;  // extent_at() reports everything as data
}

namespace {

// A completion passed along the loop's deferred list `left` more times.
class Delayed final : public IoCompletion {
 public:
  Delayed(EventLoop& loop, BlockOp* op, unsigned left) : loop_(loop), op_(op), left_(left) {}
  void on_complete(int res, uint32_t flags) override {
    if (--left_ > 0) {
      loop_.defer(this, res);
      return;
    }
    IoCompletion* op = op_;
    delete this;
    op->on_complete(res, flags);
  }

 private:
  EventLoop& loop_;
  BlockOp* op_;
  unsigned left_;
};

}  // namespace

void MemoryBackend::submit(EventLoop& loop, BlockOp* op) {
  int res;
  unsigned extra = 0;
  op->backend_ = this;
  op->loop_ = &loop;
  op->progress_ = 0;
  op->retries_ = 0;
  op->stage_ = BlockOp::kStageDone;
  {
    std::lock_guard<std::mutex> lock(mu_);
    res = apply(*op);
    if (hold_) {
      held_.push_back({&loop, op, res});
      return;
    }
    if (delay_max_ > 0) extra = static_cast<unsigned>(rng_() % (delay_max_ + 1));
  }
  if (extra == 0) {
    loop.defer(op, res);
  } else {
    loop.defer(new Delayed(loop, op, extra + 1), res);
  }
}

void MemoryBackend::hold_completions() {
  std::lock_guard<std::mutex> lock(mu_);
  hold_ = true;
}

void MemoryBackend::release_completions() {
  std::vector<Held> held;
  {
    std::lock_guard<std::mutex> lock(mu_);
    hold_ = false;
    held.swap(held_);
  }
  for (const Held& h : held) {
    BlockOp* op = h.op;
    const int res = h.res;
    h.loop->post([op, res] { static_cast<IoCompletion*>(op)->on_complete(res, 0); });
  }
}

size_t MemoryBackend::held_completions() const {
  std::lock_guard<std::mutex> lock(mu_);
  return held_.size();
}

void MemoryBackend::delay_completions(unsigned max_iterations) {
  std::lock_guard<std::mutex> lock(mu_);
  delay_max_ = max_iterations;
}

void MemoryBackend::on_cqe(BlockOp& op, int res) {
  // Every op is deferred with kStageDone, so BlockOp never routes here.
  (void)op;
  (void)res;
  assert(false && "MemoryBackend never submits to the ring");
  std::abort();
}

Result<IoBackend::Extent> MemoryBackend::extent_at(uint64_t offset, uint64_t max_len) {
  if (offset >= info_.size_bytes) return Status::out_of_range("extent_at past the end");
  return Extent{std::min(max_len, info_.size_bytes - offset), false};
}

int MemoryBackend::apply(BlockOp& op) {
  const uint64_t size = info_.size_bytes;
  if (op.kind != BlockOpKind::kFlush && (op.offset > size || op.length > size - op.offset)) {
    return -EINVAL;  // a real device rejects it too; the caller should have checked
  }
  if (info_.read_only && is_mutation(op.kind)) return -EROFS;
  if (int err = draw_fault(op.kind, op.length)) {
    if (failed_torn_ && is_mutation(op.kind) && op.kind != BlockOpKind::kFlush && op.length > 0) {
      Pending part{op.offset, op.length, {}, false};
      if (op.kind == BlockOpKind::kWrite) part.data.assign(op.buf, op.buf + op.length);
      part.length = surviving_prefix(part);
      if (!part.data.empty()) part.data.resize(part.length);
      if (part.length > 0) record(std::move(part));
    }
    return err;
  }
  switch (op.kind) {
    case BlockOpKind::kRead:
      if (op.length > 0) std::memcpy(op.buf, data_.data() + op.offset, op.length);
      break;
    case BlockOpKind::kWrite:
      record({op.offset, op.length, std::vector<uint8_t>(op.buf, op.buf + op.length),
              (op.flags & kFua) != 0});
      break;
    case BlockOpKind::kTrim:
    case BlockOpKind::kWriteZeroes:
      record({op.offset, op.length, {}, (op.flags & kFua) != 0});
      break;
    case BlockOpKind::kFlush:
      for (const Pending& p : pending_) apply_prefix(durable_, p, p.length);
      pending_.clear();
      break;
    case BlockOpKind::kCache: break;
  }
  ++faults_[kind_index(op.kind)].completed;
  return 0;
}

int MemoryBackend::draw_fault(BlockOpKind kind, uint64_t length) {
  KindFaults& f = faults_[kind_index(kind)];
  ++f.seen;
  for (auto it = f.nth.begin(); it != f.nth.end(); ++it) {
    if (it->first == f.seen) {
      const int err = it->second;
      f.nth.erase(it);
      return -err;
    }
  }
  // Draw only when armed so that adding a fault elsewhere keeps the sequence.
  if (f.p > 0 && unit_interval(rng_) < f.p) return -f.p_err;
  if (enospc_armed_ && (kind == BlockOpKind::kWrite || kind == BlockOpKind::kWriteZeroes)) {
    if (length > enospc_left_) return -ENOSPC;
    enospc_left_ -= length;
  }
  return 0;
}

void MemoryBackend::record(Pending write) {
  apply_prefix(data_, write, write.length);
  // With nothing older pending, a FUA write is simply durable: fold it now so
  // pending_ does not grow under a FUA-only workload.
  if (write.fua && pending_.empty()) {
    apply_prefix(durable_, write, write.length);
    return;
  }
  pending_.push_back(std::move(write));
}

void MemoryBackend::apply_prefix(std::vector<uint8_t>& image, const Pending& write, uint64_t keep) {
  uint8_t* dst = image.data() + write.offset;
  if (write.data.empty()) {
    std::memset(dst, 0, keep);
  } else {
    std::memcpy(dst, write.data.data(), keep);
  }
}

uint64_t MemoryBackend::surviving_prefix(const Pending& write) {
  switch (rng_() % 3) {
    case 0: return write.length;
    case 1: return 0;
    default: break;
  }
  // Torn: cut at a sector boundary strictly inside the write.
  const uint64_t end = write.offset + write.length;
  const uint64_t first = (write.offset / kSectorBytes + 1) * kSectorBytes;
  if (first >= end) return (rng_() & 1) ? write.length : 0;  // one sector cannot tear
  const uint64_t boundaries = (end - 1 - first) / kSectorBytes + 1;
  return first + (rng_() % boundaries) * kSectorBytes - write.offset;
}

void MemoryBackend::fail_nth(BlockOpKind kind, uint64_t n, int err) {
  assert(n >= 1 && err > 0);
  std::lock_guard<std::mutex> lock(mu_);
  KindFaults& f = faults_[kind_index(kind)];
  f.nth.emplace_back(f.seen + n, err);
}

void MemoryBackend::fail_randomly(BlockOpKind kind, double p, int err) {
  assert(p >= 0 && p <= 1 && err > 0);
  std::lock_guard<std::mutex> lock(mu_);
  KindFaults& f = faults_[kind_index(kind)];
  f.p = p;
  f.p_err = err;
}

void MemoryBackend::enospc_after(uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  enospc_armed_ = true;
  enospc_left_ = bytes;
}

void MemoryBackend::failed_writes_torn(bool torn) {
  std::lock_guard<std::mutex> lock(mu_);
  failed_torn_ = torn;
}

void MemoryBackend::clear_faults() {
  std::lock_guard<std::mutex> lock(mu_);
  for (KindFaults& f : faults_) {
    f.nth.clear();
    f.p = 0;
    f.p_err = 0;
  }
  enospc_armed_ = false;
  enospc_left_ = 0;
  failed_torn_ = false;
}

void MemoryBackend::crash(bool torn) {
  std::lock_guard<std::mutex> lock(mu_);
  // Survivors land in completion order, as a disk's cache would write them.
  for (const Pending& p : pending_) {
    const uint64_t keep = p.fua ? p.length : torn ? surviving_prefix(p) : 0;
    apply_prefix(durable_, p, keep);
  }
  pending_.clear();
  data_ = durable_;
}

std::vector<uint8_t> MemoryBackend::crash_image(bool torn) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<uint8_t> image = durable_;
  for (const Pending& p : pending_) {
    const uint64_t keep = p.fua ? p.length : torn ? surviving_prefix(p) : 0;
    apply_prefix(image, p, keep);
  }
  return image;
}

std::vector<uint8_t> MemoryBackend::contents() const {
  std::lock_guard<std::mutex> lock(mu_);
  return data_;
}

std::vector<uint8_t> MemoryBackend::durable_contents() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<uint8_t> image = durable_;
  for (const Pending& p : pending_) {
    if (p.fua) apply_prefix(image, p, p.length);
  }
  return image;
}

uint64_t MemoryBackend::ops_completed(BlockOpKind kind) const {
  std::lock_guard<std::mutex> lock(mu_);
  return faults_[kind_index(kind)].completed;
}

uint64_t MemoryBackend::unflushed_writes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<uint64_t>(
      std::count_if(pending_.begin(), pending_.end(), [](const Pending& p) { return !p.fua; }));
}

}  // namespace shadowd
