// zstd compression of journal payloads and segment versions, optionally with
// a reference prefix (the previous version of the segment) for deltas.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "core/status.h"

namespace shadowd {

// Compress `src`; with a non-empty `prefix`, as a delta against it.
std::vector<uint8_t> zstd_compress(std::span<const uint8_t> src, int level,
                                   std::span<const uint8_t> prefix = {});
// Compress `src` into `out` only if the frame is smaller than `src`; returns
// false (and leaves `out` alone) for incompressible data, which the caller
// then stores raw. Compresses into a per-thread scratch buffer, so neither a
// bound-sized allocation nor its zeroing is paid per call.
bool zstd_compress_smaller(std::span<const uint8_t> src, int level, std::vector<uint8_t>& out);
// Decompress one frame into exactly `out.size()` bytes (kCorruption otherwise).
Status zstd_decompress(std::span<const uint8_t> frame, std::span<uint8_t> out,
                       std::span<const uint8_t> prefix = {});

}  // namespace shadowd
