// The transmission-phase codec against doc/proto.md of the NBD project:
// request parsing, the checks every request goes through before it reaches
// the backend, the exact bytes of each reply encoder, and the one mapping
// from engine errors to NBD errors.
#include "nbd/codec.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "core/memory_backend.h"
#include "nbd/export.h"

namespace shadowd::nbd {
namespace {

using Bytes = std::vector<uint8_t>;

constexpr uint64_t kExportBytes = 1u << 20;
constexpr uint32_t kMaxPayload = 32u << 20;
constexpr uint64_t kMaxSkipBytes = 64u << 20;  // mirrors codec.cc: refused writes read and dropped

const uint16_t kAllCommands[] = {kCmdRead,  kCmdWrite,       kCmdFlush,      kCmdTrim,
                                 kCmdCache, kCmdWriteZeroes, kCmdBlockStatus};
const uint16_t kRangeCommands[] = {kCmdRead,  kCmdWrite,       kCmdTrim,
                                   kCmdCache, kCmdWriteZeroes, kCmdBlockStatus};

// A request header written out byte by byte, independently of encode_request.
Bytes wire_request(uint16_t flags, uint16_t type, uint64_t cookie, uint64_t offset,
                   uint32_t length) {
  Bytes b{0x25, 0x60, 0x95, 0x13};
  b.push_back(static_cast<uint8_t>(flags >> 8));
  b.push_back(static_cast<uint8_t>(flags));
  b.push_back(static_cast<uint8_t>(type >> 8));
  b.push_back(static_cast<uint8_t>(type));
  for (int s = 56; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(cookie >> s));
  for (int s = 56; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(offset >> s));
  for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(length >> s));
  return b;
}

// A connection with structured replies and base:allocation negotiated.
RequestContext full_ctx() {
  RequestContext ctx;
  ctx.export_size = kExportBytes;
  ctx.read_only = false;
  ctx.structured = true;
  ctx.base_allocation = true;
  ctx.max_payload_bytes = kMaxPayload;
  return ctx;
}

Verdict check(uint16_t type, uint16_t flags, uint64_t offset, uint32_t length,
              const RequestContext& ctx = full_ctx()) {
  Request r;
  r.type = type;
  r.flags = flags;
  r.cookie = 0x1122334455667788ull;
  r.offset = offset;
  r.length = length;
  return check_request(r, ctx);
}

// A request that passes every check for `type` except what the test changes.
Verdict check_valid_range(uint16_t type, uint16_t flags, const RequestContext& ctx = full_ctx()) {
  if (type == kCmdFlush) return check(type, flags, 0, 0, ctx);
  return check(type, flags, 4096, 4096, ctx);
}

// ---- parse_request / encode_request ----

TEST_CASE("codec: encode_request writes the proto.md request layout", "[codec]") {
  Request r;
  r.flags = 0x0102;
  r.type = 0x0304;
  r.cookie = 0x0a0b0c0d0e0f1011ull;
  r.offset = 0x2122232425262728ull;
  r.length = 0x31323334;
  Bytes out(kRequestSize);
  encode_request(r, out.data());
  REQUIRE(out == wire_request(0x0102, 0x0304, 0x0a0b0c0d0e0f1011ull, 0x2122232425262728ull,
                              0x31323334));
}

TEST_CASE("codec: parse_request reads every field big-endian", "[codec]") {
  const Bytes in = wire_request(kCmdFlagFua, kCmdWrite, 0xdeadbeefcafef00dull,
                                0xfffffffffffff000ull, 0x80000001u);
  Request r;
  REQUIRE(parse_request(in, r) == ParseStatus::kOk);
  CHECK(r.flags == kCmdFlagFua);
  CHECK(r.type == kCmdWrite);
  CHECK(r.cookie == 0xdeadbeefcafef00dull);
  CHECK(r.offset == 0xfffffffffffff000ull);
  CHECK(r.length == 0x80000001u);
}

TEST_CASE("codec: parse_request round-trips encode_request", "[codec]") {
  Request r;
  r.flags = kCmdFlagReqOne;
  r.type = kCmdBlockStatus;
  r.cookie = UINT64_MAX;
  r.offset = 12345;
  r.length = UINT32_MAX;
  Bytes buf(kRequestSize);
  encode_request(r, buf.data());
  Request back;
  REQUIRE(parse_request(buf, back) == ParseStatus::kOk);
  CHECK(back.flags == r.flags);
  CHECK(back.type == r.type);
  CHECK(back.cookie == r.cookie);
  CHECK(back.offset == r.offset);
  CHECK(back.length == r.length);
}

TEST_CASE("codec: parse_request needs all 28 bytes", "[codec]") {
  const Bytes full = wire_request(0, kCmdRead, 7, 512, 512);
  for (size_t n = 0; n < kRequestSize; ++n) {
    CAPTURE(n);
    Request r;
    r.cookie = 99;
    REQUIRE(parse_request(std::span<const uint8_t>(full.data(), n), r) == ParseStatus::kNeedMore);
    CHECK(r.cookie == 99);  // untouched
  }
  Request r;
  REQUIRE(parse_request(full, r) == ParseStatus::kOk);
}

TEST_CASE("codec: parse_request reads only the first of several requests", "[codec]") {
  Bytes in = wire_request(0, kCmdRead, 1, 0, 512);
  const Bytes second = wire_request(0, kCmdWrite, 2, 512, 512);
  in.insert(in.end(), second.begin(), second.end());
  Request r;
  REQUIRE(parse_request(in, r) == ParseStatus::kOk);
  CHECK(r.cookie == 1);
  CHECK(r.type == kCmdRead);
}

TEST_CASE("codec: parse_request rejects a bad magic", "[codec]") {
  const Bytes good = wire_request(0, kCmdRead, 1, 0, 512);
  SECTION("each magic byte corrupted") {
    for (size_t i = 0; i < 4; ++i) {
      for (uint8_t bit = 1; bit != 0; bit = static_cast<uint8_t>(bit << 1)) {
        Bytes bad = good;
        bad[i] ^= bit;
        CAPTURE(i, int{bit});
        Request r;
        CHECK(parse_request(bad, r) == ParseStatus::kBadMagic);
      }
    }
  }
  SECTION("other magics of the protocol are not requests") {
    for (uint32_t magic : {kSimpleReplyMagic, kStructuredReplyMagic, 0u, 0xffffffffu}) {
      Bytes bad = good;
      put32(bad.data(), magic);
      Request r;
      CHECK(parse_request(bad, r) == ParseStatus::kBadMagic);
    }
  }
  SECTION("little-endian magic") {
    Bytes bad = good;
    bad[0] = 0x13;
    bad[1] = 0x95;
    bad[2] = 0x60;
    bad[3] = 0x25;
    Request r;
    CHECK(parse_request(bad, r) == ParseStatus::kBadMagic);
  }
}

// ---- check_request: commands ----

TEST_CASE("codec: valid requests of every command pass", "[codec][check]") {
  for (uint16_t type : kAllCommands) {
    CAPTURE(type);
    Verdict v = check_valid_range(type, 0);
    CHECK(v.error == 0);
    CHECK(v.has_payload == (type == kCmdWrite));
    CHECK_FALSE(v.disconnect);
    CHECK_FALSE(v.close);
  }
}

TEST_CASE("codec: unknown command types are EINVAL", "[codec][check]") {
  for (uint32_t type : {8u, 9u, 12u, 0x100u, 0x7fffu, 0x8000u, 0xffffu}) {
    CAPTURE(type);
    Verdict v = check(static_cast<uint16_t>(type), 0, 0, 512);
    CHECK(v.error == kEinval);
    CHECK_FALSE(v.has_payload);
    CHECK_FALSE(v.disconnect);
    CHECK_FALSE(v.close);
  }
}

TEST_CASE("codec: DISC disconnects", "[codec][check]") {
  Verdict v = check(kCmdDisc, 0, 0, 0);
  CHECK(v.disconnect);
  CHECK(v.error == 0);
  CHECK_FALSE(v.has_payload);
  CHECK_FALSE(v.close);
  // Nothing is replied to DISC, so its other fields cannot matter.
  Verdict odd = check(kCmdDisc, 0xffff, UINT64_MAX, UINT32_MAX);
  CHECK(odd.disconnect);
  CHECK_FALSE(odd.has_payload);
  RequestContext ro = full_ctx();
  ro.read_only = true;
  CHECK(check(kCmdDisc, 0, 0, 0, ro).disconnect);
}

// ---- check_request: flags ----

// Whether shadowd's exports advertise transmission flag `flag`.
bool advertised(uint16_t flag) {
  Export e;
  e.backend = std::make_shared<MemoryBackend>(4096, /*seed=*/1);
  return (e.transmission_flags() & flag) != 0;
}

// Flags proto.md documents for each command. DF and FAST_ZERO are valid only
// when their transmission flag (SEND_DF, SEND_FAST_ZERO) is advertised: a
// client "MUST NOT" set them otherwise, and the server SHOULD then answer
// EINVAL. FUA is handled separately.
uint16_t documented_flags(uint16_t type) {
  switch (type) {
    case kCmdRead: return advertised(kSendDf) ? kCmdFlagDf : 0;
    case kCmdWrite: return kCmdFlagFua;
    case kCmdTrim: return kCmdFlagFua;
    case kCmdWriteZeroes:
      return kCmdFlagFua | kCmdFlagNoHole | (advertised(kSendFastZero) ? kCmdFlagFastZero : 0);
    case kCmdBlockStatus: return kCmdFlagReqOne;
    default: return 0;
  }
}

TEST_CASE("codec: each flag bit is accepted exactly where documented", "[codec][check]") {
  for (uint16_t type : kAllCommands) {
    for (int bit = 1; bit < 16; ++bit) {  // bit 0 (FUA): see the next test
      const uint16_t flag = static_cast<uint16_t>(1u << bit);
      CAPTURE(type, bit);
      Verdict v = check_valid_range(type, flag);
      CHECK(v.error == ((documented_flags(type) & flag) ? 0 : kEinval));
      CHECK(v.has_payload == (type == kCmdWrite));  // a refused WRITE still has its payload
      CHECK_FALSE(v.close);
    }
  }
}

TEST_CASE("codec: FUA is accepted on the writing commands", "[codec][check]") {
  for (uint16_t type : {kCmdWrite, kCmdTrim, kCmdWriteZeroes}) {
    CAPTURE(type);
    CHECK(check_valid_range(type, kCmdFlagFua).error == 0);
  }
}

// proto.md, "Command flags": FUA "is valid for all commands, provided
// NBD_FLAG_SEND_FUA has been negotiated, in which case the server MUST accept
// all commands with this bit set (even by ignoring the bit)". shadowd
// advertises NBD_FLAG_SEND_FUA on every export.
TEST_CASE("codec: FUA is accepted on commands that do not write", "[codec][check]") {
  REQUIRE(advertised(kSendFua));
  for (uint16_t type : {kCmdRead, kCmdFlush, kCmdCache, kCmdBlockStatus}) {
    CAPTURE(type);
    CHECK(check_valid_range(type, kCmdFlagFua).error == 0);
  }
}

TEST_CASE("codec: named flag cases from proto.md", "[codec][check]") {
  CHECK(check_valid_range(kCmdRead, kCmdFlagDf).error == (advertised(kSendDf) ? 0 : kEinval));
  CHECK(check_valid_range(kCmdWrite, kCmdFlagNoHole).error == kEinval);
  CHECK(check_valid_range(kCmdWrite, kCmdFlagDf).error == kEinval);
  CHECK(check_valid_range(kCmdWriteZeroes, kCmdFlagNoHole).error == 0);
  CHECK(check_valid_range(kCmdWriteZeroes, kCmdFlagFua | kCmdFlagNoHole).error == 0);
  // FAST_ZERO without NBD_FLAG_SEND_FAST_ZERO advertised: SHOULD be EINVAL.
  CHECK(check_valid_range(kCmdWriteZeroes, kCmdFlagFastZero).error ==
        (advertised(kSendFastZero) ? 0 : kEinval));
  CHECK(check_valid_range(kCmdBlockStatus, kCmdFlagReqOne).error == 0);
  for (uint16_t type : {kCmdRead, kCmdWrite, kCmdFlush, kCmdTrim, kCmdCache, kCmdWriteZeroes}) {
    CAPTURE(type);
    CHECK(check_valid_range(type, kCmdFlagReqOne).error == kEinval);
  }
  // An unknown bit next to a valid one still fails the request.
  CHECK(check_valid_range(kCmdWrite, kCmdFlagFua | 0x8000).error == kEinval);
  CHECK(check_valid_range(kCmdRead, kCmdFlagDf | kCmdFlagReqOne).error == kEinval);
}

// ---- check_request: ranges ----

TEST_CASE("codec: zero-length requests are EINVAL", "[codec][check]") {
  for (uint16_t type : kRangeCommands) {
    CAPTURE(type);
    Verdict v = check(type, 0, 0, 0);
    CHECK(v.error == kEinval);
    CHECK(v.has_payload == (type == kCmdWrite));
    CHECK_FALSE(v.close);
  }
}

TEST_CASE("codec: requests that end exactly at the export end pass", "[codec][check]") {
  for (uint16_t type : kRangeCommands) {
    CAPTURE(type);
    CHECK(check(type, 0, kExportBytes - 1, 1).error == 0);
    CHECK(check(type, 0, kExportBytes - 4096, 4096).error == 0);
    CHECK(check(type, 0, 0, static_cast<uint32_t>(kExportBytes)).error == 0);
  }
}

// proto.md, "Error values": ENOSPC for a write past the end, EINVAL for a read
// or trim past the end; WRITE_ZEROES SHOULD be ENOSPC; BLOCK_STATUS SHOULD
// be EINVAL. CACHE is not named; EINVAL like a read.
uint32_t past_end_error(uint16_t type) {
  return (type == kCmdWrite || type == kCmdWriteZeroes) ? kEnospc : kEinval;
}

TEST_CASE("codec: requests past the end of the export", "[codec][check]") {
  for (uint16_t type : kRangeCommands) {
    CAPTURE(type);
    const uint32_t want = past_end_error(type);
    CHECK(check(type, 0, kExportBytes - 4096, 4097).error == want);  // one byte too far
    CHECK(check(type, 0, kExportBytes, 1).error == want);            // starts at the end
    CHECK(check(type, 0, kExportBytes + 4096, 4096).error == want);  // starts past it
    CHECK(check(type, 0, 0, static_cast<uint32_t>(kExportBytes) + 1).error == want);
    Verdict v = check(type, 0, kExportBytes, 512);
    CHECK(v.has_payload == (type == kCmdWrite));
    CHECK_FALSE(v.close);
  }
}

TEST_CASE("codec: offset + length overflowing 64 bits is caught", "[codec][check]") {
  for (uint16_t type : kRangeCommands) {
    CAPTURE(type);
    const uint32_t want = past_end_error(type);
    CHECK(check(type, 0, UINT64_MAX, 1).error == want);
    CHECK(check(type, 0, UINT64_MAX, kMaxPayload).error == want);
    CHECK(check(type, 0, UINT64_MAX - 511, 512).error == want);  // ends exactly at 2^64
    // Wraps around to a small end offset that a naive sum would accept.
    CHECK(check(type, 0, UINT64_MAX - 511, 1024).error == want);
    CHECK(check(type, 0, uint64_t{1} << 63, 4096).error == want);
  }
  // An export as large as the offset space.
  RequestContext huge = full_ctx();
  huge.export_size = UINT64_MAX;
  CHECK(check(kCmdRead, 0, UINT64_MAX - 512, 512, huge).error == 0);
  CHECK(check(kCmdRead, 0, UINT64_MAX - 511, 512, huge).error == kEinval);
  CHECK(check(kCmdWrite, 0, UINT64_MAX - 511, 512, huge).error == kEnospc);
  CHECK(check(kCmdTrim, 0, UINT64_MAX - 512, 512, huge).error == 0);
}

TEST_CASE("codec: an empty export refuses every range", "[codec][check]") {
  RequestContext empty = full_ctx();
  empty.export_size = 0;
  for (uint16_t type : kRangeCommands) {
    CAPTURE(type);
    CHECK(check(type, 0, 0, 1, empty).error == past_end_error(type));
  }
  CHECK(check(kCmdFlush, 0, 0, 0, empty).error == 0);
}

// ---- check_request: read-only, FLUSH, BLOCK_STATUS ----

TEST_CASE("codec: writes to a read-only export are EPERM", "[codec][check]") {
  RequestContext ro = full_ctx();
  ro.read_only = true;
  for (uint16_t type : {kCmdWrite, kCmdTrim, kCmdWriteZeroes}) {
    CAPTURE(type);
    Verdict v = check(type, 0, 0, 4096, ro);
    CHECK(v.error == kEperm);
    CHECK(v.has_payload == (type == kCmdWrite));  // the payload still follows
    CHECK_FALSE(v.close);
  }
  for (uint16_t type : {kCmdRead, kCmdCache, kCmdBlockStatus}) {
    CAPTURE(type);
    CHECK(check(type, 0, 0, 4096, ro).error == 0);
  }
  CHECK(check(kCmdFlush, 0, 0, 0, ro).error == 0);
}

TEST_CASE("codec: FLUSH offset and length are reserved and must be zero", "[codec][check]") {
  CHECK(check(kCmdFlush, 0, 0, 0).error == 0);
  CHECK(check(kCmdFlush, 0, 1, 0).error == kEinval);
  CHECK(check(kCmdFlush, 0, 0, 1).error == kEinval);
  CHECK(check(kCmdFlush, 0, 4096, 4096).error == kEinval);
  CHECK(check(kCmdFlush, 0, UINT64_MAX, UINT32_MAX).error == kEinval);
  CHECK_FALSE(check(kCmdFlush, 0, 0, 1).has_payload);
}

TEST_CASE("codec: BLOCK_STATUS needs a negotiated meta context", "[codec][check]") {
  RequestContext none = full_ctx();
  none.base_allocation = false;
  CHECK(check(kCmdBlockStatus, 0, 0, 4096, none).error == kEinval);
  CHECK(check(kCmdBlockStatus, kCmdFlagReqOne, 0, 4096, none).error == kEinval);
  RequestContext simple = none;
  simple.structured = false;
  CHECK(check(kCmdBlockStatus, 0, 0, 4096, simple).error == kEinval);
  CHECK(check(kCmdBlockStatus, 0, 0, 4096).error == 0);
}

// ---- check_request: payload limits ----

TEST_CASE("codec: READ larger than the maximum payload", "[codec][check]") {
  RequestContext ctx = full_ctx();
  ctx.export_size = uint64_t{1} << 40;
  ctx.max_payload_bytes = 64 * 1024;
  CHECK(check(kCmdRead, 0, 0, 64 * 1024, ctx).error == 0);
  SECTION("simple replies: EINVAL") {
    ctx.structured = false;
    CHECK(check(kCmdRead, 0, 0, 64 * 1024 + 1, ctx).error == kEinval);
    CHECK(check(kCmdRead, 0, 0, UINT32_MAX, ctx).error == kEinval);
  }
  SECTION("structured replies: EOVERFLOW") {
    CHECK(check(kCmdRead, 0, 0, 64 * 1024 + 1, ctx).error == kEoverflow);
    CHECK(check(kCmdRead, 0, 0, UINT32_MAX, ctx).error == kEoverflow);
  }
  CHECK_FALSE(check(kCmdRead, 0, 0, UINT32_MAX, ctx).close);
}

TEST_CASE("codec: WRITE larger than the maximum payload", "[codec][check]") {
  RequestContext ctx = full_ctx();
  ctx.export_size = uint64_t{1} << 40;
  SECTION("up to the maximum passes") {
    Verdict v = check(kCmdWrite, 0, 0, kMaxPayload, ctx);
    CHECK(v.error == 0);
    CHECK(v.has_payload);
  }
  SECTION("over the maximum but small enough to skip: EINVAL, payload read and dropped") {
    Verdict v = check(kCmdWrite, 0, 0, kMaxPayload + 1, ctx);
    CHECK(v.error == kEinval);
    CHECK(v.has_payload);
    CHECK_FALSE(v.close);
  }
  SECTION("proto.md: a payload up to 2^25 SHOULD NOT be taken for denial of service") {
    ctx.max_payload_bytes = 4096;
    Verdict v = check(kCmdWrite, 0, 0, 1u << 25, ctx);
    CHECK(v.error == kEinval);
    CHECK(v.has_payload);
    CHECK_FALSE(v.close);
  }
  SECTION("huge payloads close the connection") {
    for (uint32_t len : {static_cast<uint32_t>(kMaxSkipBytes) + 1, 0x80000000u, UINT32_MAX}) {
      CAPTURE(len);
      Verdict v = check(kCmdWrite, 0, 0, len, ctx);
      CHECK(v.close);
      CHECK(v.has_payload);
      CHECK(v.error != 0);
    }
  }
  SECTION("a huge payload closes even when the request is wrong in other ways") {
    RequestContext ro = ctx;
    ro.read_only = true;
    CHECK(check(kCmdWrite, 0, 0, UINT32_MAX, ro).close);
    CHECK(check(kCmdWrite, kCmdFlagNoHole, 0, UINT32_MAX, ctx).close);
    CHECK(check(kCmdWrite, 0, UINT64_MAX, UINT32_MAX, ctx).close);
  }
  SECTION("an advertised maximum above the skip limit is honoured") {
    ctx.max_payload_bytes = UINT32_MAX;
    Verdict v = check(kCmdWrite, 0, 0, 0x80000000u, ctx);
    CHECK(v.error == 0);
    CHECK_FALSE(v.close);
  }
}

TEST_CASE("codec: commands without payload may exceed the maximum payload", "[codec][check]") {
  RequestContext ctx = full_ctx();
  ctx.export_size = uint64_t{1} << 40;
  ctx.max_payload_bytes = 4096;
  for (uint16_t type : {kCmdTrim, kCmdWriteZeroes, kCmdCache, kCmdBlockStatus}) {
    CAPTURE(type);
    Verdict v = check(type, 0, 0, UINT32_MAX, ctx);
    CHECK(v.error == 0);  // proto.md: the server SHOULD NOT disconnect
    CHECK_FALSE(v.close);
    CHECK_FALSE(v.has_payload);
  }
}

// ---- reply encoders ----

TEST_CASE("codec: simple reply bytes", "[codec][encode]") {
  Bytes out(kSimpleReplySize);
  encode_simple_reply(0x0102030405060708ull, kEnospc, out.data());
  const Bytes want = {0x67, 0x44, 0x66, 0x98,  // NBD_SIMPLE_REPLY_MAGIC
                      0x00, 0x00, 0x00, 0x1c,  // error 28
                      0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08};
  CHECK(out == want);
  encode_simple_reply(UINT64_MAX, 0, out.data());
  CHECK(out == Bytes{0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                     0xff, 0xff});
}

TEST_CASE("codec: structured chunk header bytes", "[codec][encode]") {
  Bytes out(kChunkHeaderSize);
  encode_chunk_header(0x1112131415161718ull, kReplyFlagDone, kReplyTypeNone, 0, out.data());
  CHECK(out == Bytes{0x66, 0x8e, 0x33, 0xef,  // NBD_STRUCTURED_REPLY_MAGIC
                     0x00, 0x01,              // flags: DONE
                     0x00, 0x00,              // type: NONE
                     0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18,
                     0x00, 0x00, 0x00, 0x00});
  encode_chunk_header(1, 0, kReplyTypeErrorOffset, 0x01020304, out.data());
  CHECK(out == Bytes{0x66, 0x8e, 0x33, 0xef, 0x00, 0x00, 0x80, 0x02, 0, 0, 0, 0, 0, 0, 0, 1,
                     0x01, 0x02, 0x03, 0x04});
}

TEST_CASE("codec: OFFSET_DATA chunk header bytes", "[codec][encode]") {
  Bytes out(kOffsetDataHeaderSize);
  REQUIRE(kOffsetDataHeaderSize == 28);
  encode_read_chunk(0x2122232425262728ull, 0x0000000100000200ull, 4096, out.data());
  CHECK(out == Bytes{0x66, 0x8e, 0x33, 0xef,
                     0x00, 0x01,  // DONE
                     0x00, 0x01,  // OFFSET_DATA
                     0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28,
                     0x00, 0x00, 0x10, 0x08,  // 8 + 4096: the offset counts in the length
                     0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x02, 0x00});
}

TEST_CASE("codec: ERROR chunk bytes, with and without a message", "[codec][encode]") {
  SECTION("with a message") {
    const Bytes out = encode_error_chunk(0x0a, kEio, "disk on fire");
    Bytes want = {0x66, 0x8e, 0x33, 0xef,
                  0x00, 0x01,  // DONE
                  0x80, 0x01,  // NBD_REPLY_TYPE_ERROR
                  0, 0, 0, 0, 0, 0, 0, 0x0a,
                  0x00, 0x00, 0x00, 0x12,  // 4 + 2 + 12
                  0x00, 0x00, 0x00, 0x05,  // EIO
                  0x00, 0x0c};             // message length
    const std::string msg = "disk on fire";
    for (char ch : msg) want.push_back(static_cast<uint8_t>(ch));
    CHECK(out == want);
  }
  SECTION("an empty message") {
    const Bytes out = encode_error_chunk(0x0b, kEinval, "");
    CHECK(out == Bytes{0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x80, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x0b,
                       0, 0, 0, 6, 0, 0, 0, 22, 0, 0});
  }
  SECTION("a message over the string limit is cut, and the lengths agree") {
    const std::string msg(kMaxStringBytes + 100, 'x');
    const Bytes out = encode_error_chunk(1, kEio, msg);
    REQUIRE(out.size() == kChunkHeaderSize + 6 + kMaxStringBytes);
    CHECK(get32(out.data() + 16) == 6 + kMaxStringBytes);
    CHECK(get16(out.data() + kChunkHeaderSize + 4) == kMaxStringBytes);
    CHECK(out.back() == 'x');
  }
}

TEST_CASE("codec: BLOCK_STATUS chunk bytes", "[codec][encode]") {
  SECTION("two extents") {
    const Extent ext[] = {{0x1000, kStateHole | kStateZero}, {0x00020000, 0}};
    const Bytes out = encode_block_status(0x33, kBaseAllocationId, ext);
    CHECK(out == Bytes{0x66, 0x8e, 0x33, 0xef,
                       0x00, 0x01,  // DONE
                       0x00, 0x05,  // NBD_REPLY_TYPE_BLOCK_STATUS
                       0, 0, 0, 0, 0, 0, 0, 0x33,
                       0x00, 0x00, 0x00, 0x14,  // 4 + 2 * 8
                       0x00, 0x00, 0x00, 0x01,  // context id
                       0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x03,
                       0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00});
  }
  SECTION("one extent") {
    const Extent ext[] = {{UINT32_MAX, kStateZero}};
    const Bytes out = encode_block_status(UINT64_MAX, 0x01020304, ext);
    CHECK(out == Bytes{0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x00, 0x05, 0xff, 0xff, 0xff, 0xff,
                       0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x0c, 0x01, 0x02, 0x03, 0x04,
                       0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x02});
  }
  SECTION("length field always matches the extents") {
    std::vector<Extent> ext;
    for (uint32_t i = 0; i < 100; ++i) ext.push_back({512 * (i + 1), i & 3});
    const Bytes out = encode_block_status(5, 1, ext);
    REQUIRE(out.size() == kChunkHeaderSize + 4 + 8 * ext.size());
    CHECK(get32(out.data() + 16) == 4 + 8 * ext.size());
    for (size_t i = 0; i < ext.size(); ++i) {
      CHECK(get32(out.data() + kChunkHeaderSize + 4 + 8 * i) == ext[i].length);
      CHECK(get32(out.data() + kChunkHeaderSize + 8 + 8 * i) == ext[i].flags);
    }
  }
}

// ---- to_nbd_error ----

TEST_CASE("codec: engine errors map onto NBD errors", "[codec][errors]") {
  using Code = Status::Code;
  auto err = [](Code c) { return to_nbd_error(Status::error(c, "x")); };
  CHECK(to_nbd_error(Status::ok()) == 0);
  CHECK(err(Code::kIoError) == kEio);
  CHECK(err(Code::kNoSpace) == kEnospc);
  CHECK(err(Code::kInvalid) == kEinval);
  CHECK(err(Code::kOutOfRange) == kEinval);
  CHECK(err(Code::kReadOnly) == kEperm);
  CHECK(err(Code::kNotSupported) == kEnotsup);
  CHECK(err(Code::kNotFound) == kEio);
  CHECK(err(Code::kCorruption) == kEio);
  CHECK(err(Code::kShutdown) == kEshutdown);
  CHECK(err(Code::kBusy) == kEio);
  // proto.md: EDQUOT and EFBIG SHOULD map to ENOSPC.
  CHECK(to_nbd_error(Status::from_errno(ENOSPC, "w")) == kEnospc);
  CHECK(to_nbd_error(Status::from_errno(EDQUOT, "w")) == kEnospc);
  CHECK(to_nbd_error(Status::from_errno(EFBIG, "w")) == kEnospc);
  CHECK(to_nbd_error(Status::from_errno(EIO, "w")) == kEio);
  // Every value on the wire is one proto.md defines.
  const uint32_t defined[] = {0,      kEperm,     kEio,     kEnomem,   kEinval,
                              kEnospc, kEoverflow, kEnotsup, kEshutdown};
  for (int c = 0; c <= static_cast<int>(Code::kBusy); ++c) {
    const uint32_t e = err(static_cast<Code>(c));
    CAPTURE(c, e);
    CHECK(std::find(std::begin(defined), std::end(defined), e) != std::end(defined));
  }
}

}  // namespace
}  // namespace shadowd::nbd
