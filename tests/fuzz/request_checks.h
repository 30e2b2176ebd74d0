// What nbd::check_request() must answer, stated independently of it (from
// doc/proto.md and what the connection relies on), for the fuzz targets that
// reach the transmission phase.
#pragma once

#include "nbd/codec.h"
#include "tests/fuzz/fuzz_util.h"

namespace shadowd::fuzz {

inline bool known_command(uint16_t type) { return type <= nbd::kCmdBlockStatus; }

inline bool writes_data(uint16_t type) {
  return type == nbd::kCmdWrite || type == nbd::kCmdTrim || type == nbd::kCmdWriteZeroes;
}

// Largest refused WRITE payload the connection reads and discards rather
// than closing (codec.cc: kMaxSkipBytes).
constexpr uint64_t kMaxSkippedPayloadBytes = 64u << 20;

inline void check_verdict(const nbd::Request& r, const nbd::RequestContext& c, const nbd::Verdict& v) {
  using namespace nbd;
  FUZZ_CHECK(v.has_payload == (r.type == kCmdWrite));
  FUZZ_CHECK(v.disconnect == (r.type == kCmdDisc));
  if (v.disconnect) FUZZ_CHECK(v.error == 0 && !v.close);
  // A refused payload is skipped only if it is small enough; else close.
  if (v.close) FUZZ_CHECK(v.has_payload && v.error != 0 && r.length > c.max_payload_bytes);
  if (v.has_payload && v.error != 0 && !v.close) {
    FUZZ_CHECK(r.length <= c.max_payload_bytes || r.length <= kMaxSkippedPayloadBytes);
  }
  if (v.error != 0) {
    FUZZ_CHECK(v.error == kEinval || v.error == kEperm || v.error == kEnospc || v.error == kEoverflow);
    if (v.error == kEoverflow && !v.close) FUZZ_CHECK(r.type == kCmdRead && c.structured);
    if (v.error == kEperm) FUZZ_CHECK(c.read_only && writes_data(r.type));
    if (v.error == kEnospc) FUZZ_CHECK(r.type == kCmdWrite || r.type == kCmdWriteZeroes);
    return;
  }
  if (v.disconnect) return;
  // Accepted: the connection will act on it as it stands.
  FUZZ_CHECK(known_command(r.type));
  uint16_t allowed = kCmdFlagFua;
  if (r.type == kCmdWriteZeroes) allowed |= kCmdFlagNoHole;
  if (r.type == kCmdBlockStatus) allowed |= kCmdFlagReqOne;
  FUZZ_CHECK((r.flags & ~allowed) == 0);
  if (r.type == kCmdFlush) {
    FUZZ_CHECK(r.offset == 0 && r.length == 0);
    return;
  }
  FUZZ_CHECK(r.length > 0);
  FUZZ_CHECK(r.offset <= c.export_size && r.length <= c.export_size - r.offset);
  if (r.type == kCmdRead || r.type == kCmdWrite) FUZZ_CHECK(r.length <= c.max_payload_bytes);
  if (writes_data(r.type)) FUZZ_CHECK(!c.read_only);
  if (r.type == kCmdBlockStatus) FUZZ_CHECK(c.base_allocation || c.shadowd_source);
}

}  // namespace shadowd::fuzz
