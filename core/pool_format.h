// The on-disk layout of a shadow pool device (docs/FORMAT.md says the same
// in prose; keep the two in step). Everything is little-endian.
//
//   offset 0          superblock copy A (4 KiB)
//   offset 4 KiB      superblock copy B (4 KiB)
//   offset 1 MiB      zone 0, zone 1, ... each zone_bytes long
//
// Superblock writes alternate between A and B with a rising generation, so a
// torn superblock write leaves the other copy valid; the valid copy with the
// higher generation wins.
//
// A zone is appended to and reclaimed whole. It starts with a kZoneHeader
// record and holds self-describing records, each with an xxHash64 checksum
// and the generation of the zone's current use, so a scan of any zone stops
// at the first record that is torn, corrupt, or left over from an earlier use
// of the zone. Appends are 4 KiB-aligned batches; a batch ends in a kPadding
// record that fills it to the next 4 KiB boundary.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/status.h"

namespace shadowd::pool {

constexpr uint64_t kSuperMagic = 0x4c4f4f5057444853ull;  // "SHDWPOOL" as LE bytes
constexpr uint32_t kFormatVersion = 1;
constexpr uint32_t kBlockBytes = 4096;
constexpr uint64_t kSuperblockOffsets[2] = {0, 4096};
constexpr uint64_t kZonesStart = 1u << 20;
constexpr uint32_t kMinZoneBytes = 4u << 20;    // > the largest record (a 1 MiB segment)
constexpr uint32_t kMaxZoneBytes = 1u << 30;    // offsets in a zone fit in 32 bits
constexpr uint32_t kDefaultZoneBytes = 16u << 20;
constexpr size_t kMaxPrimaryId = 1024;
constexpr size_t kMaxCheckpointZones = 64;

using Uuid = std::array<uint8_t, 16>;

// One per device, two copies. Encoded into exactly kBlockBytes.
struct Superblock {
  uint32_t format_version = kFormatVersion;
  Uuid pool_uuid{};              // the same on every device of one pool
  uint32_t tier = 0;             // 0 = fast (holds the journal), 1 = slow
  uint32_t tier_count = 1;
  std::string primary_id;        // what the pool shadows (canonical path of the primary)
  uint64_t primary_bytes = 0;
  uint32_t segment_bytes = 0;
  uint32_t zone_bytes = 0;
  uint64_t zone_count = 0;       // zones on this device
  int64_t epoch_ns = 0;          // when the pool was formatted: history starts here
  uint64_t generation = 0;       // bumped on every superblock write
  // The newest complete checkpoint (tier 0 only; id 0 = none yet). Its
  // records lie in these zones of tier 0, in order.
  uint64_t checkpoint_id = 0;
  std::vector<uint32_t> checkpoint_zones;
  std::vector<uint64_t> checkpoint_zone_gens;  // the zones' generations then
};

// Encode into a kBlockBytes buffer (checksummed).
std::vector<uint8_t> encode_superblock(const Superblock& sb);
// kCorruption for bad magic / checksum / version, kInvalid for nonsense fields.
Result<Superblock> decode_superblock(std::span<const uint8_t> block);

enum class RecordType : uint8_t {
  kZoneHeader = 1,
  kJournal = 2,     // one mutating request's piece within one segment
  kVersion = 3,     // one segment's content at one sequence number
  kCheckpoint = 4,  // one chunk of a serialised index
  kHistory = 5,     // closed buckets of the access monitor
  kPadding = 6,     // fills a batch to the next 4 KiB boundary
  kMarker = 7,      // retention moved / history restarted (see MarkerKind)
};

enum class Codec : uint8_t { kNone = 0, kZstd = 1 };

enum class ZoneKind : uint8_t { kFree = 0, kJournal = 1, kVersions = 2, kCheckpoint = 3, kHistory = 4 };

enum class JournalOp : uint8_t { kWrite = 1, kWriteZeroes = 2, kTrim = 3 };

enum class MarkerKind : uint8_t {
  kRetention = 1,  // the window now starts at `time_ns`; older history is gone
  kRestart = 2,    // history was interrupted (pool full / pool error) and restarts
                   // here: nothing before `time_ns` can be restored
};

// The fixed record header (kRecordHeaderBytes), then a type-specific body
// (the struct fields below), then the payload.
//   u64 checksum   xxHash64 (seed 0) of every byte after this field, up to the
//                  end of the payload
//   u32 length     bytes after the header (body + payload)
//   u8  type       RecordType
//   u8  codec      Codec of the payload: kZstd for kVersion, either for kJournal,
//                  kNone for the other types
//   u16 reserved   0
//   u64 zone_gen   the generation of the zone this record was written into
constexpr size_t kRecordHeaderBytes = 24;

struct ZoneHeader {
  ZoneKind kind = ZoneKind::kFree;
  uint8_t tier = 0;
  uint32_t zone_index = 0;
  Uuid pool_uuid{};
  int64_t opened_ns = 0;
};

struct JournalRecord {
  uint64_t seq = 0;         // the request's sequence number (pieces of one request share it)
  int64_t time_ns = 0;      // never decreases along seq
  JournalOp op = JournalOp::kWrite;
  uint64_t offset = 0;      // byte offset on the primary; the piece lies in one segment
  uint32_t length = 0;      // bytes of the primary covered
  uint8_t flags = 0;        // kJournalCorrection
  // payload: for kWrite the data (length bytes), compressed per the codec;
  // empty for kWriteZeroes and kTrim (both read back as zeroes).
};
// JournalRecord::flags: the primary refused the request with this seq; this
// kWrite record holds what the primary read back in the piece's range
// afterwards, and replaces the request's record with the same seq and offset.
constexpr uint8_t kJournalCorrection = 1;

struct VersionRecord {
  uint64_t segment = 0;
  uint64_t seq = 0;            // equal to the segment after every record with seq <= this
  int64_t time_ns = 0;
  uint32_t segment_bytes = 0;  // uncompressed content length
  uint8_t tier = 0;
  uint16_t depth = 0;          // 0 = full image; n = delta on a version of depth n-1
  uint64_t base_seq = 0;       // delta: the base version's seq (same segment)
  uint64_t content_xxh = 0;    // xxHash64 of the uncompressed content
  // payload: zstd frame of the content; for a delta, compressed with the base
  // version's content as the reference prefix (ZSTD_CCtx_refPrefix).
};

struct CheckpointRecord {
  uint64_t checkpoint_id = 0;
  uint32_t index = 0;   // chunk number, 0-based
  uint32_t count = 0;   // chunks in this checkpoint
  // payload: the chunk of the serialised index
};

struct HistoryChunk {
  uint32_t count = 0;   // HistoryRecords in the payload, 40 bytes each:
                        // i64 bucket_start_s, u64 segment, u32 reads, u32 writes,
                        // u64 bytes_read, u64 bytes_written
};

struct MarkerRecord {
  MarkerKind kind = MarkerKind::kRetention;
  uint64_t seq = 0;
  int64_t time_ns = 0;
};

// A decoded record: which body is valid is given by `type`.
struct Record {
  RecordType type = RecordType::kPadding;
  Codec codec = Codec::kNone;
  uint64_t zone_gen = 0;
  ZoneHeader zone;
  JournalRecord journal;
  VersionRecord version;
  CheckpointRecord checkpoint;
  HistoryChunk history;
  MarkerRecord marker;
  std::span<const uint8_t> payload;  // points into the scanned buffer
  uint32_t total_bytes = 0;          // header + body + payload
};

// Append one record to `out` (any alignment).
void encode_zone_header(std::vector<uint8_t>& out, uint64_t zone_gen, const ZoneHeader& h);
void encode_journal(std::vector<uint8_t>& out, uint64_t zone_gen, const JournalRecord& r, Codec codec,
                    std::span<const uint8_t> payload);
void encode_version(std::vector<uint8_t>& out, uint64_t zone_gen, const VersionRecord& r,
                    std::span<const uint8_t> payload);
void encode_checkpoint(std::vector<uint8_t>& out, uint64_t zone_gen, const CheckpointRecord& r,
                       std::span<const uint8_t> payload);
void encode_history(std::vector<uint8_t>& out, uint64_t zone_gen, const HistoryChunk& h,
                    std::span<const uint8_t> payload);
void encode_marker(std::vector<uint8_t>& out, uint64_t zone_gen, const MarkerRecord& m);
// Pad `out` (whose first byte sits at a 4 KiB boundary of the zone) to the
// next 4 KiB multiple with one kPadding record. A gap shorter than a record
// header is widened by one more block. Nothing is added when already aligned.
void pad_to_block(std::vector<uint8_t>& out, uint64_t zone_gen);

// The size encode_* will produce for a payload of `payload_bytes`.
size_t journal_record_bytes(size_t payload_bytes);
size_t version_record_bytes(size_t payload_bytes);

enum class DecodeError : uint8_t {
  kOk,
  kTruncated,    // the buffer ends inside the record
  kBadChecksum,  // torn or corrupt
  kBadGen,       // valid, but from an earlier use of the zone
  kBadType,      // unknown type or inconsistent length
};

// Decode the record at the start of `buf`, which must belong to a zone whose
// current generation is `zone_gen` (0: accept any generation, used to read a
// zone header). On kOk fills `rec`.
DecodeError decode_record(std::span<const uint8_t> buf, uint64_t zone_gen, Record& rec);

// Scan a zone image from `start` (a record boundary): call fn(rec, offset)
// for every valid record until the first invalid one or the end. Returns the
// offset after the last valid record (where the next append goes) and why
// the scan stopped.
struct ScanEnd {
  uint64_t next_offset = 0;
  DecodeError stop = DecodeError::kOk;  // kOk: reached the end of the buffer
};
template <typename Fn>
ScanEnd scan_records(std::span<const uint8_t> zone, uint64_t zone_gen, uint64_t start, Fn fn) {
  uint64_t pos = start;
  while (pos < zone.size()) {
    Record rec;
    DecodeError e = decode_record(zone.subspan(pos), zone_gen, rec);
    if (e != DecodeError::kOk) return {pos, e};
    fn(rec, pos);
    pos += rec.total_bytes;
  }
  return {pos, DecodeError::kOk};
}

const char* decode_error_name(DecodeError e);
std::string uuid_to_string(const Uuid& u);
Uuid new_uuid();  // random (getrandom)

uint64_t xxh64(std::span<const uint8_t> data);

}  // namespace shadowd::pool
