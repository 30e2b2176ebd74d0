// The NBD wire format: every constant and fixed layout shadowd uses, in one
// place (the NBD project's doc/proto.md). All integers on the wire are big
// endian; the helpers at the end read and write them.
#pragma once

#include <cstdint>
#include <cstring>

namespace shadowd::nbd {

// ---- handshake ----
constexpr uint64_t kNbdMagic = 0x4e42444d41474943ull;        // "NBDMAGIC"
constexpr uint64_t kIHaveOpt = 0x49484156454F5054ull;        // "IHAVEOPT"
constexpr uint64_t kOptReplyMagic = 0x0003e889045565a9ull;

// Handshake flags (server) and client flags.
constexpr uint16_t kFlagFixedNewstyle = 1u << 0;
constexpr uint16_t kFlagNoZeroes = 1u << 1;
constexpr uint32_t kClientFixedNewstyle = 1u << 0;
constexpr uint32_t kClientNoZeroes = 1u << 1;

// Transmission flags.
constexpr uint16_t kHasFlags = 1u << 0;
constexpr uint16_t kReadOnly = 1u << 1;
constexpr uint16_t kSendFlush = 1u << 2;
constexpr uint16_t kSendFua = 1u << 3;
constexpr uint16_t kRotational = 1u << 4;
constexpr uint16_t kSendTrim = 1u << 5;
constexpr uint16_t kSendWriteZeroes = 1u << 6;
constexpr uint16_t kSendDf = 1u << 7;
constexpr uint16_t kCanMultiConn = 1u << 8;
constexpr uint16_t kSendResize = 1u << 9;
constexpr uint16_t kSendCache = 1u << 10;
constexpr uint16_t kSendFastZero = 1u << 11;

// Options.
enum Option : uint32_t {
  kOptExportName = 1,
  kOptAbort = 2,
  kOptList = 3,
  kOptPeekExport = 4,
  kOptStartTls = 5,
  kOptInfo = 6,
  kOptGo = 7,
  kOptStructuredReply = 8,
  kOptListMetaContext = 9,
  kOptSetMetaContext = 10,
  kOptExtendedHeaders = 11,
};

// Option reply types.
constexpr uint32_t kRepAck = 1;
constexpr uint32_t kRepServer = 2;
constexpr uint32_t kRepInfo = 3;
constexpr uint32_t kRepMetaContext = 4;
constexpr uint32_t kRepErrBit = 1u << 31;
constexpr uint32_t kRepErrUnsup = kRepErrBit | 1;
constexpr uint32_t kRepErrPolicy = kRepErrBit | 2;
constexpr uint32_t kRepErrInvalid = kRepErrBit | 3;
constexpr uint32_t kRepErrPlatform = kRepErrBit | 4;
constexpr uint32_t kRepErrTlsReqd = kRepErrBit | 5;
constexpr uint32_t kRepErrUnknown = kRepErrBit | 6;
constexpr uint32_t kRepErrShutdown = kRepErrBit | 7;
constexpr uint32_t kRepErrBlockSizeReqd = kRepErrBit | 8;
constexpr uint32_t kRepErrTooBig = kRepErrBit | 9;

// NBD_INFO_* types.
constexpr uint16_t kInfoExport = 0;
constexpr uint16_t kInfoName = 1;
constexpr uint16_t kInfoDescription = 2;
constexpr uint16_t kInfoBlockSize = 3;

// ---- transmission ----
constexpr uint32_t kRequestMagic = 0x25609513;
constexpr uint32_t kSimpleReplyMagic = 0x67446698;
constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;

enum Command : uint16_t {
  kCmdRead = 0,
  kCmdWrite = 1,
  kCmdDisc = 2,
  kCmdFlush = 3,
  kCmdTrim = 4,
  kCmdCache = 5,
  kCmdWriteZeroes = 6,
  kCmdBlockStatus = 7,
};

constexpr uint16_t kCmdFlagFua = 1u << 0;
constexpr uint16_t kCmdFlagNoHole = 1u << 1;
constexpr uint16_t kCmdFlagDf = 1u << 2;
constexpr uint16_t kCmdFlagReqOne = 1u << 3;
constexpr uint16_t kCmdFlagFastZero = 1u << 4;

constexpr uint16_t kReplyFlagDone = 1u << 0;
constexpr uint16_t kReplyTypeNone = 0;
constexpr uint16_t kReplyTypeOffsetData = 1;
constexpr uint16_t kReplyTypeOffsetHole = 2;
constexpr uint16_t kReplyTypeBlockStatus = 5;
constexpr uint16_t kReplyTypeError = (1u << 15) | 1;
constexpr uint16_t kReplyTypeErrorOffset = (1u << 15) | 2;

// base:allocation flags.
constexpr uint32_t kStateHole = 1u << 0;
constexpr uint32_t kStateZero = 1u << 1;

// Error values on the wire.
constexpr uint32_t kEperm = 1;
constexpr uint32_t kEio = 5;
constexpr uint32_t kEnomem = 12;
constexpr uint32_t kEinval = 22;
constexpr uint32_t kEnospc = 28;
constexpr uint32_t kEoverflow = 75;
constexpr uint32_t kEnotsup = 95;
constexpr uint32_t kEshutdown = 108;

// Fixed sizes.
constexpr size_t kRequestSize = 28;        // magic, flags, type, cookie, offset, length
constexpr size_t kSimpleReplySize = 16;    // magic, error, cookie
constexpr size_t kChunkHeaderSize = 20;    // magic, flags, type, cookie, length
constexpr size_t kOptionHeaderSize = 16;   // IHAVEOPT, option, length
constexpr size_t kOptReplyHeaderSize = 20; // magic, option, type, length
constexpr size_t kExportNameZeroes = 124;
constexpr size_t kMaxStringBytes = 4096;   // names, descriptions, queries

// The meta contexts this server offers, with the fixed ids SET_META_CONTEXT
// gives them (distinct and nonzero; LIST replies carry id 0).
constexpr const char* kBaseAllocation = "base:allocation";
constexpr uint32_t kBaseAllocationId = 1;
// Point-in-time exports only (a backend with can_sources): where the content
// of each range at the export's time comes from. Flags: 0 = the live
// primary; kSourceStateVersion = a shadow version; kSourceStateJournal =
// journal records replayed on top (so 3 = a version plus journal records).
// The same values as IoBackend::SourceFlags (static_assert in connection.cc).
constexpr const char* kShadowdSource = "shadowd:source";
constexpr uint32_t kShadowdSourceId = 2;
constexpr uint32_t kSourceStateVersion = 1u << 0;
constexpr uint32_t kSourceStateJournal = 1u << 1;

// ---- big-endian helpers ----
inline uint16_t get16(const uint8_t* p) { return static_cast<uint16_t>(p[0] << 8 | p[1]); }
inline uint32_t get32(const uint8_t* p) {
  return uint32_t{p[0]} << 24 | uint32_t{p[1]} << 16 | uint32_t{p[2]} << 8 | p[3];
}
inline uint64_t get64(const uint8_t* p) { return uint64_t{get32(p)} << 32 | get32(p + 4); }
inline void put16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v >> 8);
  p[1] = static_cast<uint8_t>(v);
}
inline void put32(uint8_t* p, uint32_t v) {
  put16(p, static_cast<uint16_t>(v >> 16));
  put16(p + 2, static_cast<uint16_t>(v));
}
inline void put64(uint8_t* p, uint64_t v) {
  put32(p, static_cast<uint32_t>(v >> 32));
  put32(p + 4, static_cast<uint32_t>(v));
}

}  // namespace shadowd::nbd
