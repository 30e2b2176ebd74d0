#include "core/zstd_codec.h"

#include <zstd.h>

#include <string>

namespace shadowd {
namespace {

// One context of each kind per thread: creating them costs more than a
// small compression.
struct Contexts {
  ZSTD_CCtx* c = ZSTD_createCCtx();
  ZSTD_DCtx* d = ZSTD_createDCtx();
  ~Contexts() {
    ZSTD_freeCCtx(c);
    ZSTD_freeDCtx(d);
  }
};
Contexts& contexts() {
  thread_local Contexts ctx;
  return ctx;
}

}  // namespace

std::vector<uint8_t> zstd_compress(std::span<const uint8_t> src, int level,
                                   std::span<const uint8_t> prefix) {
  ZSTD_CCtx* c = contexts().c;
  ZSTD_CCtx_reset(c, ZSTD_reset_session_and_parameters);
  ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, level);
  ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 0);  // the record has its own checksum
  if (!prefix.empty()) ZSTD_CCtx_refPrefix(c, prefix.data(), prefix.size());
  std::vector<uint8_t> out(ZSTD_compressBound(src.size()));
  size_t n = ZSTD_compress2(c, out.data(), out.size(), src.data(), src.size());
  // With a bound-sized output buffer compression cannot fail short of a bug.
  if (ZSTD_isError(n)) std::abort();
  out.resize(n);
  return out;
}

bool zstd_compress_smaller(std::span<const uint8_t> src, int level, std::vector<uint8_t>& out) {
  thread_local std::vector<uint8_t> scratch;
  // Room for a frame just smaller than the input: a bigger one is not used.
  const size_t room = src.size() == 0 ? 0 : src.size() - 1;
  if (room == 0) return false;
  if (scratch.size() < room) scratch.resize(room);
  ZSTD_CCtx* c = contexts().c;
  ZSTD_CCtx_reset(c, ZSTD_reset_session_and_parameters);
  ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, level);
  ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 0);
  size_t n = ZSTD_compress2(c, scratch.data(), room, src.data(), src.size());
  // dstSize_tooSmall: the frame would not be smaller than the input.
  if (ZSTD_isError(n)) return false;
  out.assign(scratch.begin(), scratch.begin() + static_cast<std::ptrdiff_t>(n));
  return true;
}

Status zstd_decompress(std::span<const uint8_t> frame, std::span<uint8_t> out,
                       std::span<const uint8_t> prefix) {
  ZSTD_DCtx* d = contexts().d;
  ZSTD_DCtx_reset(d, ZSTD_reset_session_and_parameters);
  if (!prefix.empty()) ZSTD_DCtx_refPrefix(d, prefix.data(), prefix.size());
  size_t n = ZSTD_decompressDCtx(d, out.data(), out.size(), frame.data(), frame.size());
  if (ZSTD_isError(n)) {
    return Status::error(Status::Code::kCorruption,
                         std::string("zstd: ") + ZSTD_getErrorName(n), EIO);
  }
  if (n != out.size()) {
    return Status::error(Status::Code::kCorruption,
                         "zstd: frame holds " + std::to_string(n) + " bytes, expected " +
                             std::to_string(out.size()),
                         EIO);
  }
  return Status::ok();
}

}  // namespace shadowd
