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
// Decompress one frame into exactly `out.size()` bytes (kCorruption otherwise).
Status zstd_decompress(std::span<const uint8_t> frame, std::span<uint8_t> out,
                       std::span<const uint8_t> prefix = {});

}  // namespace shadowd
