#include "nbd/codec.h"

namespace shadowd::nbd {

ParseStatus parse_request(std::span<const uint8_t> in, Request& out) {
  if (in.size() < kRequestSize) return ParseStatus::kNeedMore;
  const uint8_t* p = in.data();
  if (get32(p) != kRequestMagic) return ParseStatus::kBadMagic;
  out.flags = get16(p + 4);
  out.type = get16(p + 6);
  out.cookie = get64(p + 8);
  out.offset = get64(p + 16);
  out.length = get32(p + 24);
  return ParseStatus::kOk;
}

void encode_request(const Request& r, uint8_t out[kRequestSize]) {
  put32(out, kRequestMagic);
  put16(out + 4, r.flags);
  put16(out + 6, r.type);
  put64(out + 8, r.cookie);
  put64(out + 16, r.offset);
  put32(out + 24, r.length);
}

namespace {

// Flags each command accepts (anything else is EINVAL).
uint16_t allowed_flags(uint16_t type) {
  switch (type) {
    case kCmdRead: return 0;  // DF is not advertised (every read is one chunk anyway)
    case kCmdWrite: return kCmdFlagFua;
    case kCmdWriteZeroes: return kCmdFlagFua | kCmdFlagNoHole;
    case kCmdTrim: return kCmdFlagFua;
    case kCmdBlockStatus: return kCmdFlagReqOne;
    default: return 0;
  }
}

// Largest write payload we read and discard to keep a connection in sync
// when refusing it; beyond this the connection is closed (proto.md allows a
// hard disconnect for payloads it deems a denial of service).
constexpr uint64_t kMaxSkipBytes = 64u << 20;

bool range_ok(const Request& r, uint64_t size) {
  return r.offset <= size && r.length <= size - r.offset;
}

}  // namespace

Verdict check_request(const Request& r, const RequestContext& ctx) {
  Verdict v;
  v.has_payload = r.type == kCmdWrite;
  if (v.has_payload && r.length > ctx.max_payload_bytes && r.length > kMaxSkipBytes) {
    v.close = true;
    v.error = kEoverflow;
    return v;
  }
  switch (r.type) {
    case kCmdDisc:
      v.disconnect = true;
      return v;
    case kCmdRead:
    case kCmdWrite:
    case kCmdFlush:
    case kCmdTrim:
    case kCmdCache:
    case kCmdWriteZeroes:
    case kCmdBlockStatus:
      break;
    default:
      v.error = kEinval;
      return v;
  }
  // FUA is valid on every command once SEND_FUA is advertised (it always
  // is); on commands that write nothing it is a no-op.
  if (r.flags & ~(allowed_flags(r.type) | kCmdFlagFua)) {
    v.error = kEinval;
    return v;
  }
  if (r.type == kCmdFlush) {
    if (r.offset != 0 || r.length != 0) v.error = kEinval;
    return v;
  }
  const bool mutating = r.type == kCmdWrite || r.type == kCmdTrim || r.type == kCmdWriteZeroes;
  if (mutating && ctx.read_only) {
    v.error = kEperm;
    return v;
  }
  if (r.type == kCmdBlockStatus && !ctx.base_allocation && !ctx.shadowd_source) {
    v.error = kEinval;  // no meta context was negotiated
    return v;
  }
  if (r.length == 0) {
    v.error = kEinval;
    return v;
  }
  if ((r.type == kCmdRead || r.type == kCmdWrite) && r.length > ctx.max_payload_bytes) {
    v.error = r.type == kCmdRead && ctx.structured ? kEoverflow : kEinval;
    return v;
  }
  if (!range_ok(r, ctx.export_size)) {
    v.error = (r.type == kCmdWrite || r.type == kCmdWriteZeroes) ? kEnospc : kEinval;
    // BLOCK_STATUS may not start past the end either.
    return v;
  }
  return v;
}

void encode_simple_reply(uint64_t cookie, uint32_t error, uint8_t out[kSimpleReplySize]) {
  put32(out, kSimpleReplyMagic);
  put32(out + 4, error);
  put64(out + 8, cookie);
}

void encode_chunk_header(uint64_t cookie, uint16_t flags, uint16_t type, uint32_t length,
                         uint8_t out[kChunkHeaderSize]) {
  put32(out, kStructuredReplyMagic);
  put16(out + 4, flags);
  put16(out + 6, type);
  put64(out + 8, cookie);
  put32(out + 16, length);
}

void encode_read_chunk(uint64_t cookie, uint64_t offset, uint32_t length,
                       uint8_t out[kOffsetDataHeaderSize]) {
  encode_chunk_header(cookie, kReplyFlagDone, kReplyTypeOffsetData, 8 + length, out);
  put64(out + kChunkHeaderSize, offset);
}

std::vector<uint8_t> encode_error_chunk(uint64_t cookie, uint32_t error, std::string_view msg) {
  if (msg.size() > kMaxStringBytes) msg = msg.substr(0, kMaxStringBytes);
  std::vector<uint8_t> out(kChunkHeaderSize + 6 + msg.size());
  encode_chunk_header(cookie, kReplyFlagDone, kReplyTypeError,
                      static_cast<uint32_t>(6 + msg.size()), out.data());
  put32(out.data() + kChunkHeaderSize, error);
  put16(out.data() + kChunkHeaderSize + 4, static_cast<uint16_t>(msg.size()));
  std::memcpy(out.data() + kChunkHeaderSize + 6, msg.data(), msg.size());
  return out;
}

std::vector<uint8_t> encode_block_status(uint64_t cookie, uint32_t context_id,
                                         std::span<const Extent> extents, bool done) {
  const size_t len = 4 + 8 * extents.size();
  std::vector<uint8_t> out(kChunkHeaderSize + len);
  encode_chunk_header(cookie, done ? kReplyFlagDone : 0, kReplyTypeBlockStatus,
                      static_cast<uint32_t>(len), out.data());
  uint8_t* p = out.data() + kChunkHeaderSize;
  put32(p, context_id);
  p += 4;
  for (const Extent& e : extents) {
    put32(p, e.length);
    put32(p + 4, e.flags);
    p += 8;
  }
  return out;
}

uint32_t to_nbd_error(const Status& st) {
  switch (st.code()) {
    case Status::Code::kOk: return 0;
    case Status::Code::kNoSpace: return kEnospc;
    case Status::Code::kInvalid:
    case Status::Code::kOutOfRange: return kEinval;
    case Status::Code::kReadOnly: return kEperm;
    case Status::Code::kNotSupported: return kEnotsup;
    case Status::Code::kShutdown: return kEshutdown;
    case Status::Code::kIoError:
    case Status::Code::kNotFound:
    case Status::Code::kCorruption:
    case Status::Code::kBusy: return kEio;
  }
  return kEio;
}

}  // namespace shadowd::nbd
