// Encoding and decoding of the pool's on-disk structures (pool_format.h,
// docs/FORMAT.md). Every multi-byte field is little-endian and written byte
// by byte, so the code is the same on any host and never reads unaligned.
#include "core/pool_format.h"

#include <sys/random.h>
#include <xxhash.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstring>
#include <random>

namespace shadowd::pool {
namespace {

// ---- little-endian field access ----

void put_le(uint8_t* p, uint64_t v, size_t n) {
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

uint64_t get_le(const uint8_t* p, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

uint16_t get16(const uint8_t* p) { return static_cast<uint16_t>(get_le(p, 2)); }
uint32_t get32(const uint8_t* p) { return static_cast<uint32_t>(get_le(p, 4)); }
uint64_t get64(const uint8_t* p) { return get_le(p, 8); }

// Appends fields at a cursor. The buffer is sized by the caller, so a field
// past its end is a programmer error.
class Writer {
 public:
  explicit Writer(uint8_t* p, size_t size) : p_(p), end_(p + size) {}
  void u8(uint8_t v) { le(v, 1); }
  void u16(uint16_t v) { le(v, 2); }
  void u32(uint32_t v) { le(v, 4); }
  void u64(uint64_t v) { le(v, 8); }
  void i64(int64_t v) { le(static_cast<uint64_t>(v), 8); }
  void bytes(const uint8_t* src, size_t n) {
    assert(p_ + n <= end_);
    std::memcpy(p_, src, n);
    p_ += n;
  }
  void zeros(size_t n) {
    assert(p_ + n <= end_);
    std::memset(p_, 0, n);
    p_ += n;
  }
  uint8_t* pos() const { return p_; }

 private:
  void le(uint64_t v, size_t n) {
    assert(p_ + n <= end_);
    put_le(p_, v, n);
    p_ += n;
  }
  uint8_t* p_;
  uint8_t* end_;
};

// Reads fields at a cursor within a span whose size the caller has checked.
class Reader {
 public:
  explicit Reader(const uint8_t* p) : p_(p) {}
  uint8_t u8() { return static_cast<uint8_t>(le(1)); }
  uint16_t u16() { return static_cast<uint16_t>(le(2)); }
  uint32_t u32() { return static_cast<uint32_t>(le(4)); }
  uint64_t u64() { return le(8); }
  int64_t i64() { return static_cast<int64_t>(le(8)); }
  void bytes(uint8_t* dst, size_t n) {
    std::memcpy(dst, p_, n);
    p_ += n;
  }
  void skip(size_t n) { p_ += n; }

 private:
  uint64_t le(size_t n) {
    const uint64_t v = get_le(p_, n);
    p_ += n;
    return v;
  }
  const uint8_t* p_;
};

// ---- records ----

// Header field offsets (see the layout in pool_format.h).
constexpr size_t kOffChecksum = 0;
constexpr size_t kOffLength = 8;
constexpr size_t kOffType = 12;
constexpr size_t kOffCodec = 13;
constexpr size_t kOffReserved = 14;
constexpr size_t kOffZoneGen = 16;
constexpr size_t kChecksummedFrom = kOffLength;  // the checksum covers [8, end of payload)

// Fixed body sizes, per type (docs/FORMAT.md gives the byte offsets).
constexpr size_t kZoneHeaderBody = 32;
constexpr size_t kJournalBody = 32;
constexpr size_t kVersionBody = 48;
constexpr size_t kCheckpointBody = 16;
constexpr size_t kHistoryBody = 8;
constexpr size_t kPaddingBody = 0;
constexpr size_t kMarkerBody = 24;

constexpr size_t kHistoryEntryBytes = 40;

// Nothing longer fits in a zone; a larger length field is garbage, not a
// record that a longer read would complete.
constexpr size_t kMaxRecordLength = kMaxZoneBytes - kRecordHeaderBytes;

// Appends a header with a zero checksum plus room for the body, and returns
// the record's start in `out`. finish_record() then adds the payload and seals it.
size_t begin_record(std::vector<uint8_t>& out, RecordType type, Codec codec, uint64_t zone_gen,
                    size_t body_bytes, size_t payload_bytes) {
  assert(body_bytes + payload_bytes <= kMaxRecordLength);
  const size_t start = out.size();
  out.resize(start + kRecordHeaderBytes + body_bytes);
  Writer w(out.data() + start, kRecordHeaderBytes);
  w.u64(0);  // checksum, set by finish_record
  w.u32(static_cast<uint32_t>(body_bytes + payload_bytes));
  w.u8(static_cast<uint8_t>(type));
  w.u8(static_cast<uint8_t>(codec));
  w.u16(0);
  w.u64(zone_gen);
  return start;
}

void finish_record(std::vector<uint8_t>& out, size_t start, std::span<const uint8_t> payload) {
  out.insert(out.end(), payload.begin(), payload.end());
  assert(out.size() - start == kRecordHeaderBytes + get32(out.data() + start + kOffLength));
  const uint64_t sum = XXH64(out.data() + start + kChecksummedFrom,
                             out.size() - start - kChecksummedFrom, 0);
  put_le(out.data() + start + kOffChecksum, sum, 8);
}

// A Writer over the body of the record that begin_record() just started.
Writer body_writer(std::vector<uint8_t>& out, size_t start, size_t body_bytes) {
  return Writer(out.data() + start + kRecordHeaderBytes, body_bytes);
}

size_t body_bytes_of(RecordType t) {
  switch (t) {
    case RecordType::kZoneHeader: return kZoneHeaderBody;
    case RecordType::kJournal: return kJournalBody;
    case RecordType::kVersion: return kVersionBody;
    case RecordType::kCheckpoint: return kCheckpointBody;
    case RecordType::kHistory: return kHistoryBody;
    case RecordType::kPadding: return kPaddingBody;
    case RecordType::kMarker: return kMarkerBody;
  }
  return SIZE_MAX;  // unknown type
}

bool has_payload(RecordType t) {
  return t != RecordType::kZoneHeader && t != RecordType::kMarker;
}

// The codec a type is written with: a journal record's says how its data is
// stored; a version is always a zstd frame; the other types are raw.
bool codec_fits(RecordType t, uint8_t codec) {
  if (t == RecordType::kJournal) return codec <= static_cast<uint8_t>(Codec::kZstd);
  return codec == static_cast<uint8_t>(t == RecordType::kVersion ? Codec::kZstd : Codec::kNone);
}

// Decodes the body of a record whose checksum, generation and length have
// been checked; false when a field holds a value no encoder writes.
bool decode_body(const uint8_t* body, Record& rec) {
  Reader r(body);
  switch (rec.type) {
    case RecordType::kZoneHeader: {
      const uint8_t kind = r.u8();
      if (kind > static_cast<uint8_t>(ZoneKind::kHistory)) return false;
      rec.zone.kind = static_cast<ZoneKind>(kind);
      rec.zone.tier = r.u8();
      r.skip(2);
      rec.zone.zone_index = r.u32();
      r.bytes(rec.zone.pool_uuid.data(), rec.zone.pool_uuid.size());
      rec.zone.opened_ns = r.i64();
      return true;
    }
    case RecordType::kJournal: {
      JournalRecord& j = rec.journal;
      j.seq = r.u64();
      j.time_ns = r.i64();
      j.offset = r.u64();
      j.length = r.u32();
      const uint8_t op = r.u8();
      if (op < static_cast<uint8_t>(JournalOp::kWrite) ||
          op > static_cast<uint8_t>(JournalOp::kTrim)) {
        return false;
      }
      j.op = static_cast<JournalOp>(op);
      j.flags = r.u8();
      if ((j.flags & ~kJournalCorrection) != 0 || r.u16() != 0) return false;
      if ((j.flags & kJournalCorrection) != 0 && j.op != JournalOp::kWrite) return false;
      if (j.op != JournalOp::kWrite) return rec.payload.empty();
      return rec.codec != Codec::kNone || rec.payload.size() == j.length;
    }
    case RecordType::kVersion: {
      VersionRecord& v = rec.version;
      v.segment = r.u64();
      v.seq = r.u64();
      v.time_ns = r.i64();
      v.base_seq = r.u64();
      v.content_xxh = r.u64();
      v.segment_bytes = r.u32();
      v.depth = r.u16();
      v.tier = r.u8();
      return true;
    }
    case RecordType::kCheckpoint: {
      rec.checkpoint.checkpoint_id = r.u64();
      rec.checkpoint.index = r.u32();
      rec.checkpoint.count = r.u32();
      return rec.checkpoint.index < rec.checkpoint.count;
    }
    case RecordType::kHistory: {
      rec.history.count = r.u32();
      return rec.payload.size() == uint64_t{rec.history.count} * kHistoryEntryBytes;
    }
    case RecordType::kPadding:
      return true;
    case RecordType::kMarker: {
      rec.marker.seq = r.u64();
      rec.marker.time_ns = r.i64();
      const uint8_t kind = r.u8();
      if (kind < static_cast<uint8_t>(MarkerKind::kRetention) ||
          kind > static_cast<uint8_t>(MarkerKind::kRestart)) {
        return false;
      }
      rec.marker.kind = static_cast<MarkerKind>(kind);
      return true;
    }
  }
  return false;
}

// ---- superblock ----

// Field offsets in the 4 KiB superblock; docs/FORMAT.md has the same table.
constexpr size_t kSbMagic = 0;
constexpr size_t kSbFormatVersion = 8;
constexpr size_t kSbPrimaryIdLen = 88;
constexpr size_t kSbCheckpointZoneCount = 92;
constexpr size_t kSbCheckpointZones = 96;                                   // u32 x 64
constexpr size_t kSbCheckpointGens = kSbCheckpointZones + 4 * kMaxCheckpointZones;  // u64 x 64
constexpr size_t kSbPrimaryId = kSbCheckpointGens + 8 * kMaxCheckpointZones;        // 1024 bytes
constexpr size_t kSbFieldsEnd = kSbPrimaryId + kMaxPrimaryId;
constexpr size_t kSbChecksum = kBlockBytes - 8;  // xxh64 of bytes [0, kSbChecksum)
static_assert(kSbFieldsEnd <= kSbChecksum);

constexpr uint32_t kMinSegmentBytes = 64u << 10;
constexpr uint32_t kMaxSegmentBytes = 1u << 20;

bool is_pow2(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

// The fields a superblock must satisfy to be used; empty when it does.
std::string superblock_problem(const Superblock& sb) {
  if (sb.tier_count == 0 || sb.tier >= sb.tier_count) {
    return "tier " + std::to_string(sb.tier) + " of " + std::to_string(sb.tier_count);
  }
  if (!is_pow2(sb.segment_bytes) || sb.segment_bytes < kMinSegmentBytes ||
      sb.segment_bytes > kMaxSegmentBytes) {
    return "segment size " + std::to_string(sb.segment_bytes) +
           " is not a power of two in 64 KiB..1 MiB";
  }
  if (sb.zone_bytes < kMinZoneBytes || sb.zone_bytes > kMaxZoneBytes ||
      sb.zone_bytes % kBlockBytes != 0) {
    return "zone size " + std::to_string(sb.zone_bytes) +
           " is not a 4 KiB multiple in 4 MiB..1 GiB";
  }
  if (sb.zone_count > UINT32_MAX) return "zone count " + std::to_string(sb.zone_count);
  if (sb.checkpoint_id == 0 && !sb.checkpoint_zones.empty()) {
    return "checkpoint zones without a checkpoint";
  }
  for (uint32_t z : sb.checkpoint_zones) {
    if (z >= sb.zone_count) return "checkpoint zone " + std::to_string(z) + " past the last zone";
  }
  return {};
}

}  // namespace

// ---- superblock ----

std::vector<uint8_t> encode_superblock(const Superblock& sb) {
  assert(sb.primary_id.size() <= kMaxPrimaryId);
  assert(sb.checkpoint_zones.size() <= kMaxCheckpointZones);
  assert(sb.checkpoint_zones.size() == sb.checkpoint_zone_gens.size());
  // Clamped as well, so that a release build cannot write past the block.
  const size_t id_len = std::min(sb.primary_id.size(), kMaxPrimaryId);
  const size_t zones = std::min({sb.checkpoint_zones.size(), sb.checkpoint_zone_gens.size(),
                                 kMaxCheckpointZones});

  std::vector<uint8_t> block(kBlockBytes, 0);
  Writer w(block.data(), block.size());
  w.u64(kSuperMagic);
  w.u32(sb.format_version);
  w.u32(sb.tier);
  w.bytes(sb.pool_uuid.data(), sb.pool_uuid.size());
  w.u32(sb.tier_count);
  w.u32(sb.segment_bytes);
  w.u64(sb.primary_bytes);
  w.u32(sb.zone_bytes);
  w.u32(0);  // reserved
  w.u64(sb.zone_count);
  w.i64(sb.epoch_ns);
  w.u64(sb.generation);
  w.u64(sb.checkpoint_id);
  assert(w.pos() == block.data() + kSbPrimaryIdLen);
  w.u32(static_cast<uint32_t>(id_len));
  w.u32(static_cast<uint32_t>(zones));
  for (size_t i = 0; i < kMaxCheckpointZones; ++i) w.u32(i < zones ? sb.checkpoint_zones[i] : 0);
  for (size_t i = 0; i < kMaxCheckpointZones; ++i) {
    w.u64(i < zones ? sb.checkpoint_zone_gens[i] : 0);
  }
  assert(w.pos() == block.data() + kSbPrimaryId);
  w.bytes(reinterpret_cast<const uint8_t*>(sb.primary_id.data()), id_len);
  put_le(block.data() + kSbChecksum, XXH64(block.data(), kSbChecksum, 0), 8);
  return block;
}

Result<Superblock> decode_superblock(std::span<const uint8_t> block) {
  using Code = Status::Code;
  if (block.size() < kBlockBytes) {
    return Status::error(Code::kCorruption, "superblock: " + std::to_string(block.size()) +
                                                " bytes, want " + std::to_string(kBlockBytes));
  }
  const uint8_t* p = block.data();
  if (get64(p + kSbMagic) != kSuperMagic) {
    return Status::error(Code::kCorruption, "superblock: bad magic (not a shadowd pool)");
  }
  // The version before the checksum: another version may place the checksum elsewhere.
  const uint32_t version = get32(p + kSbFormatVersion);
  if (version != kFormatVersion) {
    return Status::error(Code::kCorruption,
                         "superblock: unsupported pool format version " + std::to_string(version) +
                             " (this build reads version " + std::to_string(kFormatVersion) + ")");
  }
  if (get64(p + kSbChecksum) != XXH64(p, kSbChecksum, 0)) {
    return Status::error(Code::kCorruption, "superblock: checksum mismatch");
  }

  Superblock sb;
  Reader r(p + kSbFormatVersion);
  sb.format_version = r.u32();
  sb.tier = r.u32();
  r.bytes(sb.pool_uuid.data(), sb.pool_uuid.size());
  sb.tier_count = r.u32();
  sb.segment_bytes = r.u32();
  sb.primary_bytes = r.u64();
  sb.zone_bytes = r.u32();
  r.skip(4);
  sb.zone_count = r.u64();
  sb.epoch_ns = r.i64();
  sb.generation = r.u64();
  sb.checkpoint_id = r.u64();
  const uint32_t id_len = get32(p + kSbPrimaryIdLen);
  const uint32_t zones = get32(p + kSbCheckpointZoneCount);
  if (id_len > kMaxPrimaryId || zones > kMaxCheckpointZones) {
    return Status::invalid("superblock: primary id of " + std::to_string(id_len) + " bytes, " +
                           std::to_string(zones) + " checkpoint zones");
  }
  for (uint32_t i = 0; i < zones; ++i) {
    sb.checkpoint_zones.push_back(get32(p + kSbCheckpointZones + 4 * i));
    sb.checkpoint_zone_gens.push_back(get64(p + kSbCheckpointGens + 8 * i));
  }
  sb.primary_id.assign(reinterpret_cast<const char*>(p + kSbPrimaryId), id_len);
  if (std::string problem = superblock_problem(sb); !problem.empty()) {
    return Status::invalid("superblock: " + problem);
  }
  return sb;
}

// ---- records ----

void encode_zone_header(std::vector<uint8_t>& out, uint64_t zone_gen, const ZoneHeader& h) {
  const size_t start =
      begin_record(out, RecordType::kZoneHeader, Codec::kNone, zone_gen, kZoneHeaderBody, 0);
  Writer w = body_writer(out, start, kZoneHeaderBody);
  w.u8(static_cast<uint8_t>(h.kind));
  w.u8(h.tier);
  w.u16(0);
  w.u32(h.zone_index);
  w.bytes(h.pool_uuid.data(), h.pool_uuid.size());
  w.i64(h.opened_ns);
  finish_record(out, start, {});
}

void encode_journal(std::vector<uint8_t>& out, uint64_t zone_gen, const JournalRecord& r,
                    Codec codec, std::span<const uint8_t> payload) {
  assert(r.op == JournalOp::kWrite || payload.empty());
  assert(r.op != JournalOp::kWrite || codec != Codec::kNone || payload.size() == r.length);
  const size_t start =
      begin_record(out, RecordType::kJournal, codec, zone_gen, kJournalBody, payload.size());
  Writer w = body_writer(out, start, kJournalBody);
  w.u64(r.seq);
  w.i64(r.time_ns);
  w.u64(r.offset);
  w.u32(r.length);
  w.u8(static_cast<uint8_t>(r.op));
  w.u8(r.flags);
  w.zeros(2);
  finish_record(out, start, payload);
}

void encode_version(std::vector<uint8_t>& out, uint64_t zone_gen, const VersionRecord& r,
                    std::span<const uint8_t> payload) {
  const size_t start =
      begin_record(out, RecordType::kVersion, Codec::kZstd, zone_gen, kVersionBody, payload.size());
  Writer w = body_writer(out, start, kVersionBody);
  w.u64(r.segment);
  w.u64(r.seq);
  w.i64(r.time_ns);
  w.u64(r.base_seq);
  w.u64(r.content_xxh);
  w.u32(r.segment_bytes);
  w.u16(r.depth);
  w.u8(r.tier);
  w.u8(0);
  finish_record(out, start, payload);
}

void encode_checkpoint(std::vector<uint8_t>& out, uint64_t zone_gen, const CheckpointRecord& r,
                       std::span<const uint8_t> payload) {
  assert(r.index < r.count);
  const size_t start = begin_record(out, RecordType::kCheckpoint, Codec::kNone, zone_gen,
                                    kCheckpointBody, payload.size());
  Writer w = body_writer(out, start, kCheckpointBody);
  w.u64(r.checkpoint_id);
  w.u32(r.index);
  w.u32(r.count);
  finish_record(out, start, payload);
}

void encode_history(std::vector<uint8_t>& out, uint64_t zone_gen, const HistoryChunk& h,
                    std::span<const uint8_t> payload) {
  assert(payload.size() == uint64_t{h.count} * kHistoryEntryBytes);
  const size_t start =
      begin_record(out, RecordType::kHistory, Codec::kNone, zone_gen, kHistoryBody, payload.size());
  Writer w = body_writer(out, start, kHistoryBody);
  w.u32(h.count);
  w.u32(0);
  finish_record(out, start, payload);
}

void encode_marker(std::vector<uint8_t>& out, uint64_t zone_gen, const MarkerRecord& m) {
  const size_t start =
      begin_record(out, RecordType::kMarker, Codec::kNone, zone_gen, kMarkerBody, 0);
  Writer w = body_writer(out, start, kMarkerBody);
  w.u64(m.seq);
  w.i64(m.time_ns);
  w.u8(static_cast<uint8_t>(m.kind));
  w.zeros(7);
  finish_record(out, start, {});
}

void pad_to_block(std::vector<uint8_t>& out, uint64_t zone_gen) {
  size_t gap = (kBlockBytes - out.size() % kBlockBytes) % kBlockBytes;
  if (gap == 0) return;
  if (gap < kRecordHeaderBytes) gap += kBlockBytes;  // no room for a header: one more block
  const size_t fill = gap - kRecordHeaderBytes;
  const size_t start =
      begin_record(out, RecordType::kPadding, Codec::kNone, zone_gen, kPaddingBody, fill);
  out.resize(out.size() + fill, 0);  // the payload: zeros
  finish_record(out, start, {});
  assert(out.size() % kBlockBytes == 0);
}

size_t journal_record_bytes(size_t payload_bytes) {
  return kRecordHeaderBytes + kJournalBody + payload_bytes;
}

size_t version_record_bytes(size_t payload_bytes) {
  return kRecordHeaderBytes + kVersionBody + payload_bytes;
}

DecodeError decode_record(std::span<const uint8_t> buf, uint64_t zone_gen, Record& rec) {
  if (buf.size() < kRecordHeaderBytes) return DecodeError::kTruncated;
  const uint8_t* p = buf.data();
  const uint32_t length = get32(p + kOffLength);
  if (length > kMaxRecordLength) return DecodeError::kBadType;
  if (length > buf.size() - kRecordHeaderBytes) return DecodeError::kTruncated;
  const size_t total = kRecordHeaderBytes + length;
  if (get64(p + kOffChecksum) != XXH64(p + kChecksummedFrom, total - kChecksummedFrom, 0)) {
    return DecodeError::kBadChecksum;
  }
  // Intact. A stale record is stale whatever it holds, so the generation first.
  const uint64_t gen = get64(p + kOffZoneGen);
  if (zone_gen != 0 && gen != zone_gen) return DecodeError::kBadGen;

  const auto type = static_cast<RecordType>(p[kOffType]);
  const uint8_t codec = p[kOffCodec];
  const size_t body = body_bytes_of(type);
  if (body == SIZE_MAX || !codec_fits(type, codec) || get16(p + kOffReserved) != 0 ||
      length < body || (!has_payload(type) && length != body)) {
    return DecodeError::kBadType;
  }
  Record out;
  out.type = type;
  out.codec = static_cast<Codec>(codec);
  out.zone_gen = gen;
  out.payload = buf.subspan(kRecordHeaderBytes + body, length - body);
  out.total_bytes = static_cast<uint32_t>(total);
  if (!decode_body(p + kRecordHeaderBytes, out)) return DecodeError::kBadType;
  rec = out;
  return DecodeError::kOk;
}

const char* decode_error_name(DecodeError e) {
  switch (e) {
    case DecodeError::kOk: return "ok";
    case DecodeError::kTruncated: return "truncated";
    case DecodeError::kBadChecksum: return "bad_checksum";
    case DecodeError::kBadGen: return "bad_gen";
    case DecodeError::kBadType: return "bad_type";
  }
  return "unknown";
}

// ---- helpers ----

std::string uuid_to_string(const Uuid& u) {
  static const char kHex[] = "0123456789abcdef";
  std::string s;
  s.reserve(36);
  for (size_t i = 0; i < u.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s.push_back('-');
    s.push_back(kHex[u[i] >> 4]);
    s.push_back(kHex[u[i] & 0xf]);
  }
  return s;
}

Uuid new_uuid() {
  Uuid u{};
  size_t got = 0;
  while (got < u.size()) {
    const ssize_t n = getrandom(u.data() + got, u.size() - got, 0);
    if (n > 0) {
      got += static_cast<size_t>(n);
    } else if (n < 0 && errno != EINTR) {
      // No getrandom (very old kernel, seccomp): the C++ library's source.
      std::random_device rd;
      for (auto& b : u) b = static_cast<uint8_t>(rd());
      break;
    }
  }
  u[6] = static_cast<uint8_t>((u[6] & 0x0f) | 0x40);  // RFC 4122 version 4 (random)
  u[8] = static_cast<uint8_t>((u[8] & 0x3f) | 0x80);  // RFC 4122 variant
  return u;
}

uint64_t xxh64(std::span<const uint8_t> data) { return XXH64(data.data(), data.size(), 0); }

}  // namespace shadowd::pool
