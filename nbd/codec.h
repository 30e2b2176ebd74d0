// The transmission-phase codec: pure functions from bytes to requests and
// from results to reply bytes. No I/O, no allocation beyond the output
// vectors, so it can be unit-tested and fuzzed on its own.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "nbd/protocol.h"

namespace shadowd::nbd {

struct Request {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};

enum class ParseStatus {
  kNeedMore,  // fewer than kRequestSize bytes available
  kOk,        // one request header parsed; kRequestSize bytes consumed
  kBadMagic,  // not a request: the stream is out of sync, close it
};

// Parse one request header from the front of `in`.
ParseStatus parse_request(std::span<const uint8_t> in, Request& out);
void encode_request(const Request& r, uint8_t out[kRequestSize]);

// What the connection knows when it checks a request.
struct RequestContext {
  uint64_t export_size = 0;
  bool read_only = false;
  bool structured = false;      // structured replies negotiated
  bool base_allocation = false; // base:allocation selected
  bool shadowd_source = false;  // shadowd:source selected
  uint32_t max_payload_bytes = 32u << 20;
};

struct Verdict {
  uint32_t error = 0;       // 0, or the NBD error to reply with
  bool has_payload = false; // a WRITE: `length` bytes follow, even when refused
  bool disconnect = false;  // NBD_CMD_DISC
  bool close = false;       // a payload too large to skip safely: close now
};

// Check a parsed request against the protocol and the export. Pure.
Verdict check_request(const Request& r, const RequestContext& ctx);

// ---- replies ----
void encode_simple_reply(uint64_t cookie, uint32_t error, uint8_t out[kSimpleReplySize]);
void encode_chunk_header(uint64_t cookie, uint16_t flags, uint16_t type, uint32_t length,
                         uint8_t out[kChunkHeaderSize]);
// A structured OFFSET_DATA chunk header (DONE set), with its 8-byte offset:
// 28 bytes; `length` bytes of data follow.
constexpr size_t kOffsetDataHeaderSize = kChunkHeaderSize + 8;
void encode_read_chunk(uint64_t cookie, uint64_t offset, uint32_t length,
                       uint8_t out[kOffsetDataHeaderSize]);
// A complete structured ERROR chunk (DONE set) with a message.
std::vector<uint8_t> encode_error_chunk(uint64_t cookie, uint32_t error, std::string_view msg);

struct Extent {
  uint32_t length;
  uint32_t flags;  // as the context defines them (base:allocation: kStateHole | kStateZero)
};
// A complete structured BLOCK_STATUS chunk for one context; DONE set when
// `done` (a reply has one chunk per selected context, DONE on the last).
std::vector<uint8_t> encode_block_status(uint64_t cookie, uint32_t context_id,
                                         std::span<const Extent> extents, bool done = true);

// The one place where engine errors become NBD errors.
uint32_t to_nbd_error(const Status& st);

}  // namespace shadowd::nbd
