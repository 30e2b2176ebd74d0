#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/io_backend.h"
#include "tests/unit/test_util.h"

namespace shadowd {
namespace {

using test::first_difference;
using test::random_bytes;
using test::RecordingOp;
using Bytes = std::vector<uint8_t>;
using Code = Status::Code;

constexpr uint64_t kPage = 4096;
constexpr uint64_t kFileSize = 16 << 20;

std::string temp_dir() {
  const char* dir = std::getenv("TMPDIR");
  return dir != nullptr && *dir != '\0' ? dir : "/tmp";
}

// A sparse temporary file of a given size, removed again by the destructor.
// The test reads and writes it through its own descriptor to check the
// backend independently.
class TempFile {
 public:
  explicit TempFile(uint64_t size) {
    std::string tmpl = temp_dir() + "/shadowd-unit-XXXXXX";
    fd_ = mkstemp(tmpl.data());
    REQUIRE(fd_ >= 0);
    path_ = tmpl;
    REQUIRE(ftruncate(fd_, static_cast<off_t>(size)) == 0);
  }
  ~TempFile() {
    close(fd_);
    unlink(path_.c_str());
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;

  const std::string& path() const { return path_; }
  Bytes pread_bytes(uint64_t offset, uint64_t length) const {
    Bytes out(length);
    REQUIRE(pread(fd_, out.data(), length, static_cast<off_t>(offset)) ==
            static_cast<ssize_t>(length));
    return out;
  }
  void pwrite_bytes(uint64_t offset, const Bytes& data) const {
    REQUIRE(pwrite(fd_, data.data(), data.size(), static_cast<off_t>(offset)) ==
            static_cast<ssize_t>(data.size()));
  }
  uint64_t allocated_bytes() const {
    struct stat st;
    REQUIRE(fstat(fd_, &st) == 0);
    return static_cast<uint64_t>(st.st_blocks) * 512;
  }

 private:
  int fd_ = -1;
  std::string path_;
};

// A page-aligned buffer, as O_DIRECT needs.
struct AlignedBuf {
  explicit AlignedBuf(uint64_t n)
      : size(n),
        ptr(static_cast<uint8_t*>(std::aligned_alloc(kPage, (n + kPage - 1) / kPage * kPage)),
            &std::free) {
    REQUIRE(ptr != nullptr);
  }
  uint8_t* data() const { return ptr.get(); }
  Bytes bytes() const { return Bytes(data(), data() + size); }
  void fill(const Bytes& b) const { std::memcpy(data(), b.data(), b.size()); }
  uint64_t size;
  std::unique_ptr<uint8_t, decltype(&std::free)> ptr;
};

std::unique_ptr<IoBackend> open_backend(const std::string& path, FileBackendOptions opts = {}) {
  test::make_loop();  // skips the test when io_uring is unavailable
  auto backend = open_uring_backend(path, opts);
  INFO(backend.status().to_string());
  REQUIRE(backend.is_ok());
  return std::move(backend.value());
}

TEST_CASE("uring: open reports size and capabilities of a regular file", "[uring]") {
  TempFile f(kFileSize);
  auto b = open_backend(f.path());
  REQUIRE(b->size_bytes() == kFileSize);
  REQUIRE_FALSE(b->info().read_only);
  REQUIRE_FALSE(b->info().is_block_device);
  REQUIRE(b->info().can_extents);
  REQUIRE(b->info().alignment_bytes == kPage);
  if (!b->info().direct_io) WARN("O_DIRECT unavailable in " << temp_dir());
}

TEST_CASE("uring: open errors are Status values", "[uring]") {
  auto missing = open_uring_backend(temp_dir() + "/shadowd-unit-no-such-file", {});
  REQUIRE(missing.status().code() == Code::kNotFound);

  FileBackendOptions ro;
  ro.read_only = true;
  auto dir_ro = open_uring_backend(temp_dir(), ro);
  REQUIRE(dir_ro.status().code() == Code::kInvalid);
  // Read-write, open() itself refuses a directory (EISDIR).
  auto dir_rw = open_uring_backend(temp_dir(), {});
  REQUIRE_FALSE(dir_rw.is_ok());
}

// Write `data` at `offset` from an aligned or a deliberately misaligned
// buffer, then read it back both through the backend and around it.
void round_trip(IoBackend& b, const TempFile& f, uint64_t offset, const Bytes& data,
                bool aligned_buf) {
  const uint64_t skew = aligned_buf ? 0 : 1;
  AlignedBuf out(data.size() + skew);
  std::memcpy(out.data() + skew, data.data(), data.size());
  REQUIRE(run_sync(b, BlockOpKind::kWrite, offset, data.size(), out.data() + skew).is_ok());
  REQUIRE(first_difference(f.pread_bytes(offset, data.size()), data) == -1);

  AlignedBuf in(data.size() + skew);
  REQUIRE(run_sync(b, BlockOpKind::kRead, offset, data.size(), in.data() + skew).is_ok());
  REQUIRE(std::memcmp(in.data() + skew, data.data(), data.size()) == 0);
}

TEST_CASE("uring: aligned (direct) and unaligned (buffered) round trips", "[uring]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  TempFile f(kFileSize);
  const auto direct = GENERATE(FileBackendOptions::Direct::kAuto, FileBackendOptions::Direct::kOff);
  FileBackendOptions opts;
  opts.direct = direct;
  auto b = open_backend(f.path(), opts);
  if (direct == FileBackendOptions::Direct::kOff) REQUIRE_FALSE(b->info().direct_io);

  SECTION("aligned") { round_trip(*b, f, 3 * kPage, random_bytes(rng, 16 * kPage), true); }
  SECTION("unaligned offset") { round_trip(*b, f, 1000, random_bytes(rng, 3000), true); }
  SECTION("unaligned length") { round_trip(*b, f, kPage, random_bytes(rng, kPage + 7), true); }
  SECTION("unaligned buffer") { round_trip(*b, f, kPage, random_bytes(rng, kPage), false); }
  SECTION("8 MiB aligned") { round_trip(*b, f, kPage, random_bytes(rng, 8 << 20), true); }
  SECTION("8 MiB unaligned") { round_trip(*b, f, 12345, random_bytes(rng, (8 << 20) + 3), false); }
}

TEST_CASE("uring: the direct and buffered paths see each other's writes", "[uring]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  TempFile f(kFileSize);
  auto b = open_backend(f.path());
  // Buffered write (odd offset) of a range that a direct read then covers.
  Bytes small = random_bytes(rng, 100);
  REQUIRE(run_sync(*b, BlockOpKind::kWrite, kPage + 10, small.size(), small.data()).is_ok());
  AlignedBuf page(kPage);
  REQUIRE(run_sync(*b, BlockOpKind::kRead, kPage, kPage, page.data()).is_ok());
  REQUIRE(std::memcmp(page.data() + 10, small.data(), small.size()) == 0);
  // Direct write of the page, then a buffered read of part of it.
  const Bytes full = random_bytes(rng, kPage);
  page.fill(full);
  REQUIRE(run_sync(*b, BlockOpKind::kWrite, kPage, kPage, page.data()).is_ok());
  Bytes part(50);
  REQUIRE(run_sync(*b, BlockOpKind::kRead, kPage + 10, part.size(), part.data()).is_ok());
  REQUIRE(part == Bytes(full.begin() + 10, full.begin() + 60));
}

TEST_CASE("uring: FUA writes, flush and cache succeed", "[uring]") {
  TempFile f(kFileSize);
  auto b = open_backend(f.path());
  AlignedBuf buf(kPage);
  std::memset(buf.data(), 0x5a, kPage);
  REQUIRE(run_sync(*b, BlockOpKind::kWrite, 0, kPage, buf.data(), kFua).is_ok());
  REQUIRE(run_sync(*b, BlockOpKind::kWrite, 7, 100, buf.data(), kFua).is_ok());  // buffered
  REQUIRE(f.pread_bytes(0, kPage) == Bytes(kPage, 0x5a));
  REQUIRE(run_sync(*b, BlockOpKind::kFlush, 0, 0).is_ok());
  REQUIRE(run_sync(*b, BlockOpKind::kCache, 0, kFileSize).is_ok());
  REQUIRE(f.pread_bytes(0, kPage) == Bytes(kPage, 0x5a));  // cache changes nothing
}

// The file with its first 1 MiB written with 0xff and flushed to disk.
void fill_first_mib(IoBackend& b) {
  AlignedBuf ones(1 << 20);
  std::memset(ones.data(), 0xff, ones.size);
  REQUIRE(run_sync(b, BlockOpKind::kWrite, 0, ones.size, ones.data()).is_ok());
  REQUIRE(run_sync(b, BlockOpKind::kFlush, 0, 0).is_ok());
}

TEST_CASE("uring: trim punches a hole that reads as zeroes", "[uring]") {
  TempFile f(kFileSize);
  auto b = open_backend(f.path());
  fill_first_mib(*b);
  const uint64_t allocated = f.allocated_bytes();
  REQUIRE(run_sync(*b, BlockOpKind::kTrim, 64 * 1024, 64 * 1024).is_ok());
  REQUIRE(f.pread_bytes(64 * 1024, 64 * 1024) == Bytes(64 * 1024));
  REQUIRE(f.pread_bytes(0, 64 * 1024) == Bytes(64 * 1024, 0xff));
  REQUIRE(f.allocated_bytes() == allocated - 64 * 1024);
  auto hole = b->extent_at(64 * 1024, 1 << 20);
  REQUIRE(hole.is_ok());
  REQUIRE(hole->is_hole);
  REQUIRE(hole->length == 64 * 1024);
}

TEST_CASE("uring: write_zeroes zeroes, punching a hole unless kNoHole", "[uring]") {
  TempFile f(kFileSize);
  auto b = open_backend(f.path());
  fill_first_mib(*b);
  const uint64_t allocated = f.allocated_bytes();

  REQUIRE(run_sync(*b, BlockOpKind::kWriteZeroes, 0, 128 * 1024).is_ok());
  REQUIRE(f.pread_bytes(0, 128 * 1024) == Bytes(128 * 1024));
  REQUIRE(f.allocated_bytes() == allocated - 128 * 1024);

  // kNoHole on a written range keeps it allocated; on a hole it allocates.
  REQUIRE(run_sync(*b, BlockOpKind::kWriteZeroes, 256 * 1024, 64 * 1024, nullptr, kNoHole | kFua)
              .is_ok());
  REQUIRE(f.pread_bytes(256 * 1024, 64 * 1024) == Bytes(64 * 1024));
  REQUIRE(f.allocated_bytes() == allocated - 128 * 1024);
  REQUIRE(run_sync(*b, BlockOpKind::kWriteZeroes, 2 << 20, 64 * 1024, nullptr, kNoHole).is_ok());
  REQUIRE(f.allocated_bytes() == allocated - 64 * 1024);
  REQUIRE(f.pread_bytes(2 << 20, 64 * 1024) == Bytes(64 * 1024));

  // Unaligned ranges zero exactly their bytes.
  REQUIRE(run_sync(*b, BlockOpKind::kWriteZeroes, 512 * 1024 + 3, 1000).is_ok());
  REQUIRE(f.pread_bytes(512 * 1024, 3) == Bytes(3, 0xff));
  REQUIRE(f.pread_bytes(512 * 1024 + 3, 1000) == Bytes(1000));
  REQUIRE(f.pread_bytes(512 * 1024 + 1003, 1) == Bytes(1, 0xff));
}

TEST_CASE("uring: extent_at walks a sparse file", "[uring]") {
  TempFile f(kFileSize);
  f.pwrite_bytes(256 * 1024, Bytes(64 * 1024, 1));
  auto b = open_backend(f.path());

  auto e = b->extent_at(0, kFileSize);
  REQUIRE(e.is_ok());
  REQUIRE(e->is_hole);
  REQUIRE(e->length == 256 * 1024);

  e = b->extent_at(256 * 1024, kFileSize);
  REQUIRE(e.is_ok());
  REQUIRE_FALSE(e->is_hole);
  REQUIRE(e->length == 64 * 1024);

  e = b->extent_at(260 * 1024, 4096);  // capped at max_len
  REQUIRE(e.is_ok());
  REQUIRE_FALSE(e->is_hole);
  REQUIRE(e->length == 4096);

  e = b->extent_at(320 * 1024, kFileSize - 320 * 1024);  // no data after: hole to the end
  REQUIRE(e.is_ok());
  REQUIRE(e->is_hole);
  REQUIRE(e->length == kFileSize - 320 * 1024);
}

TEST_CASE("uring: a read-only backend reads but rejects writes", "[uring]") {
  TempFile f(kFileSize);
  f.pwrite_bytes(0, Bytes(kPage, 3));
  FileBackendOptions opts;
  opts.read_only = true;
  auto b = open_backend(f.path(), opts);
  REQUIRE(b->info().read_only);
  AlignedBuf buf(kPage);
  std::memset(buf.data(), 9, kPage);
  REQUIRE_FALSE(run_sync(*b, BlockOpKind::kWrite, 0, kPage, buf.data()).is_ok());
  REQUIRE_FALSE(run_sync(*b, BlockOpKind::kWrite, 1, 10, buf.data()).is_ok());
  REQUIRE_FALSE(run_sync(*b, BlockOpKind::kTrim, 0, kPage).is_ok());
  REQUIRE_FALSE(run_sync(*b, BlockOpKind::kWriteZeroes, 0, kPage).is_ok());
  REQUIRE(f.pread_bytes(0, kPage) == Bytes(kPage, 3));
  REQUIRE(run_sync(*b, BlockOpKind::kRead, 0, kPage, buf.data()).is_ok());
  REQUIRE(buf.bytes() == Bytes(kPage, 3));
}

TEST_CASE("uring: many concurrent ops on one loop", "[uring]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  TempFile f(kFileSize);
  auto b = open_backend(f.path());
  auto loop = test::make_loop(64);  // fewer entries than ops: sqe_for must submit
  const uint64_t base = loop->in_flight();
  constexpr int kOps = 512;
  constexpr uint64_t kLen = 8192;
  const Bytes data = random_bytes(rng, kOps * kLen);
  // Odd ops use a buffer one byte off alignment, so both paths run at once;
  // each op owns a stride of the buffers, with room for that byte.
  constexpr uint64_t kStride = kLen + kPage;
  AlignedBuf src(kOps * kStride);
  AlignedBuf dst(kOps * kStride);
  std::vector<std::unique_ptr<RecordingOp>> writes, reads;
  for (int i = 0; i < kOps; ++i) {
    const uint64_t skew = i % 2;
    uint8_t* p = src.data() + i * kStride + skew;
    std::memcpy(p, data.data() + i * kLen, kLen);
    writes.push_back(std::make_unique<RecordingOp>(BlockOpKind::kWrite, i * kLen, kLen, p));
    b->submit(*loop, writes.back().get());
  }
  test::run_until_done(*loop, writes);
  for (int i = 0; i < kOps; ++i) {
    uint8_t* p = dst.data() + i * kStride + i % 2;
    reads.push_back(std::make_unique<RecordingOp>(BlockOpKind::kRead, i * kLen, kLen, p));
    b->submit(*loop, reads.back().get());
  }
  test::run_until_done(*loop, reads);
  REQUIRE(loop->in_flight() == base);
  for (int i = 0; i < kOps; ++i) {
    CAPTURE(i);
    REQUIRE(writes[i]->status.is_ok());
    REQUIRE(reads[i]->status.is_ok());
    REQUIRE(writes[i]->done_count == 1);
    REQUIRE(std::memcmp(dst.data() + i * kStride + i % 2, data.data() + i * kLen, kLen) == 0);
  }
  REQUIRE(first_difference(f.pread_bytes(0, data.size()), data) == -1);
}

}  // namespace
}  // namespace shadowd
