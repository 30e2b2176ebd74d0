// Fuzz target: the transmission-phase codec (nbd/codec.h). A stream of
// request headers is parsed and checked against a request context taken
// from the input; every parsed header is re-encoded, and the replies the
// connection would build for it are encoded and read back.
//
// Input: byte 0: context flags (bit 0 read-only, 1 structured replies,
// 2 base:allocation, 3 shadowd:source); 8 bytes: the export size; 4 bytes:
// the largest payload, brought into the range the configuration allows
// (4096..32 MiB); then request headers, a WRITE's payload after it as on
// the wire.
//
// Invariants: parse_request() and encode_request() are inverse; verdicts
// are what request_checks.h states; every reply encoder writes the
// framing proto.md gives, with the lengths it announces.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <vector>

#include "nbd/codec.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/fuzz/request_checks.h"

namespace shadowd::nbd {
namespace {

constexpr uint32_t kMinPayloadBytes = 4096;  // config.cc's bounds
constexpr uint32_t kMaxPayloadBytes = 32u << 20;

RequestContext context(fuzz::Input& in) {
  const uint8_t flags = in.u8();
  RequestContext c;
  c.read_only = flags & 1;
  c.structured = flags & 2;
  c.base_allocation = flags & 4;
  c.shadowd_source = flags & 8;
  c.export_size = in.u64();
  c.max_payload_bytes = kMinPayloadBytes + in.u32() % (kMaxPayloadBytes - kMinPayloadBytes + 1);
  return c;
}

void check_chunk_header(const uint8_t* p, uint64_t cookie, uint16_t flags, uint16_t type, uint64_t length) {
  FUZZ_CHECK(get32(p) == kStructuredReplyMagic);
  FUZZ_CHECK(get16(p + 4) == flags && get16(p + 6) == type);
  FUZZ_CHECK(get64(p + 8) == cookie && get32(p + 16) == length);
}

// The replies the connection may send for `r`, encoded and read back.
// `tail` supplies an error message and block-status extents.
void check_replies(const Request& r, const Verdict& v, std::span<const uint8_t> tail) {
  uint8_t simple[kSimpleReplySize];
  encode_simple_reply(r.cookie, v.error, simple);
  FUZZ_CHECK(get32(simple) == kSimpleReplyMagic && get32(simple + 4) == v.error);
  FUZZ_CHECK(get64(simple + 8) == r.cookie);

  if (v.error == 0 && r.type == kCmdRead) {
    uint8_t head[kOffsetDataHeaderSize];
    encode_read_chunk(r.cookie, r.offset, r.length, head);
    check_chunk_header(head, r.cookie, kReplyFlagDone, kReplyTypeOffsetData, uint64_t{r.length} + 8);
    FUZZ_CHECK(get64(head + kChunkHeaderSize) == r.offset);
  }

  const std::string_view msg(reinterpret_cast<const char*>(tail.data()), tail.size());
  const std::vector<uint8_t> err = encode_error_chunk(r.cookie, v.error, msg);
  const size_t msg_len = std::min(msg.size(), kMaxStringBytes);
  FUZZ_CHECK(err.size() == kChunkHeaderSize + 6 + msg_len);
  check_chunk_header(err.data(), r.cookie, kReplyFlagDone, kReplyTypeError, 6 + msg_len);
  FUZZ_CHECK(get32(err.data() + kChunkHeaderSize) == v.error);
  FUZZ_CHECK(get16(err.data() + kChunkHeaderSize + 4) == msg_len);
  FUZZ_CHECK(std::memcmp(err.data() + kChunkHeaderSize + 6, msg.data(), msg_len) == 0);

  std::vector<Extent> extents;
  for (size_t i = 0; i + 8 <= tail.size() && extents.size() < 64; i += 8) {
    extents.push_back({get32(tail.data() + i), get32(tail.data() + i + 4)});
  }
  const bool done = r.flags & kCmdFlagReqOne;
  const uint32_t id = r.offset & 1 ? kShadowdSourceId : kBaseAllocationId;
  const std::vector<uint8_t> bs = encode_block_status(r.cookie, id, extents, done);
  FUZZ_CHECK(bs.size() == kChunkHeaderSize + 4 + 8 * extents.size());
  check_chunk_header(bs.data(), r.cookie, done ? kReplyFlagDone : 0, kReplyTypeBlockStatus,
                     4 + 8 * extents.size());
  FUZZ_CHECK(get32(bs.data() + kChunkHeaderSize) == id);
  for (size_t i = 0; i < extents.size(); ++i) {
    const uint8_t* p = bs.data() + kChunkHeaderSize + 4 + 8 * i;
    FUZZ_CHECK(get32(p) == extents[i].length && get32(p + 4) == extents[i].flags);
  }
}

}  // namespace
}  // namespace shadowd::nbd

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace shadowd::nbd;
  shadowd::fuzz::Input in(data, size);
  const RequestContext ctx = context(in);
  std::span<const uint8_t> s = in.rest();
  for (;;) {
    Request r;
    const ParseStatus ps = parse_request(s, r);
    if (ps == ParseStatus::kNeedMore) {
      FUZZ_CHECK(s.size() < kRequestSize);
      return 0;
    }
    if (ps == ParseStatus::kBadMagic) {
      FUZZ_CHECK(get32(s.data()) != kRequestMagic);
      return 0;
    }
    uint8_t again[kRequestSize];
    encode_request(r, again);
    FUZZ_CHECK(std::memcmp(again, s.data(), kRequestSize) == 0);
    s = s.subspan(kRequestSize);

    const Verdict v = check_request(r, ctx);
    shadowd::fuzz::check_verdict(r, ctx, v);
    check_replies(r, v, s.first(std::min<size_t>(s.size(), 512)));
    if (v.close || v.disconnect) return 0;
    if (v.has_payload) s = s.subspan(std::min<size_t>(r.length, s.size()));
  }
}
