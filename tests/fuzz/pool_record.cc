// Fuzz target: the pool's on-disk decoders (core/pool_format.h) as
// recovery uses them on what it reads from a pool device: superblocks,
// zone images scanned record by record, and the zstd payloads of journal
// records and versions (core/zstd_codec.h).
//
// Input: byte 0 selects the mode: bit 0 zone scan (0) or superblock (1);
// bit 1 seals every record (or the superblock) with a valid checksum
// first, so that the decoding behind the checksum is reached too. Then
// 8 bytes (big-endian): the zone's generation for a scan (0 accepts any);
// the rest is the zone image or the superblock block.
//
// Invariants: a scan stops at the first record that does not decode, at a
// record boundary, and says why; a decoded record lies inside the buffer,
// its payload at its end, with the right checksum and generation;
// re-encoding a decoded record decodes to the same record; a decoded
// superblock satisfies the checks decode promises and re-encodes to itself;
// payloads are decompressed within the sizes their records give, and no
// decode reads or allocates beyond them.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/pool_format.h"
#include "core/zstd_codec.h"
#include "tests/fuzz/fuzz_util.h"

namespace shadowd::pool {
namespace {

constexpr size_t kChecksumBytes = 8;           // the header's u64 checksum comes first
constexpr size_t kMaxSegmentBytes = 1u << 20;  // the largest segment (and so journal piece)
constexpr size_t kSbChecksumAt = kBlockBytes - 8;

uint32_t le32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}

void put_le64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

// Give every record whose length fits a valid checksum, walking the image
// as a scan would.
void seal_records(std::vector<uint8_t>& img) {
  size_t pos = 0;
  while (img.size() - pos >= kRecordHeaderBytes) {
    const uint64_t total = kRecordHeaderBytes + uint64_t{le32(img.data() + pos + 8)};
    if (total > img.size() - pos) return;
    const std::span<const uint8_t> covered(img.data() + pos + kChecksumBytes, total - kChecksumBytes);
    put_le64(img.data() + pos, xxh64(covered));
    pos += total;
  }
}

bool same_record(const Record& a, const Record& b) {
  if (a.type != b.type || a.codec != b.codec || a.zone_gen != b.zone_gen || a.total_bytes != b.total_bytes ||
      !std::equal(a.payload.begin(), a.payload.end(), b.payload.begin(), b.payload.end())) {
    return false;
  }
  switch (a.type) {
    case RecordType::kZoneHeader:
      return a.zone.kind == b.zone.kind && a.zone.tier == b.zone.tier &&
             a.zone.zone_index == b.zone.zone_index && a.zone.pool_uuid == b.zone.pool_uuid &&
             a.zone.opened_ns == b.zone.opened_ns;
    case RecordType::kJournal:
      return a.journal.seq == b.journal.seq && a.journal.time_ns == b.journal.time_ns &&
             a.journal.op == b.journal.op && a.journal.offset == b.journal.offset &&
             a.journal.length == b.journal.length;
    case RecordType::kVersion:
      return a.version.segment == b.version.segment && a.version.seq == b.version.seq &&
             a.version.time_ns == b.version.time_ns && a.version.segment_bytes == b.version.segment_bytes &&
             a.version.tier == b.version.tier && a.version.depth == b.version.depth &&
             a.version.base_seq == b.version.base_seq && a.version.content_xxh == b.version.content_xxh;
    case RecordType::kCheckpoint:
      return a.checkpoint.checkpoint_id == b.checkpoint.checkpoint_id &&
             a.checkpoint.index == b.checkpoint.index && a.checkpoint.count == b.checkpoint.count;
    case RecordType::kHistory: return a.history.count == b.history.count;
    case RecordType::kPadding: return true;
    case RecordType::kMarker:
      return a.marker.kind == b.marker.kind && a.marker.seq == b.marker.seq &&
             a.marker.time_ns == b.marker.time_ns;
  }
  return false;
}

// Encode `rec` again with the encoder of its type; false for padding,
// which only pad_to_block() writes (its size is its position's).
bool reencode(const Record& rec, std::vector<uint8_t>& out) {
  const uint64_t gen = rec.zone_gen;
  switch (rec.type) {
    case RecordType::kZoneHeader: encode_zone_header(out, gen, rec.zone); break;
    case RecordType::kJournal: encode_journal(out, gen, rec.journal, rec.codec, rec.payload); break;
    case RecordType::kVersion: encode_version(out, gen, rec.version, rec.payload); break;
    case RecordType::kCheckpoint: encode_checkpoint(out, gen, rec.checkpoint, rec.payload); break;
    case RecordType::kHistory: encode_history(out, gen, rec.history, rec.payload); break;
    case RecordType::kMarker: encode_marker(out, gen, rec.marker); break;
    case RecordType::kPadding: return false;
  }
  return true;
}

// What recovery and reads do with a payload: decompress it into the size
// the record gives (a journal piece and a version are at most a segment).
void decompress(const Record& rec) {
  if (rec.type == RecordType::kJournal && rec.journal.op == JournalOp::kWrite && rec.codec == Codec::kZstd &&
      rec.journal.length <= kMaxSegmentBytes) {
    std::vector<uint8_t> out(rec.journal.length);
    (void)zstd_decompress(rec.payload, out);
  }
  if (rec.type == RecordType::kVersion && rec.version.segment_bytes <= kMaxSegmentBytes) {
    std::vector<uint8_t> out(rec.version.segment_bytes);
    // A delta needs its base as the prefix; any content of the right size will do here.
    const std::vector<uint8_t> base(rec.version.depth > 0 ? out.size() : 0, 0xa5);
    if (zstd_decompress(rec.payload, out, base)) (void)xxh64(out);
  }
}

void check_record(std::span<const uint8_t> img, uint64_t zone_gen, const Record& rec, uint64_t off) {
  FUZZ_CHECK(rec.total_bytes >= kRecordHeaderBytes && rec.total_bytes <= img.size() - off);
  FUZZ_CHECK(rec.total_bytes == kRecordHeaderBytes + le32(img.data() + off + 8));
  FUZZ_CHECK(rec.payload.data() + rec.payload.size() == img.data() + off + rec.total_bytes);
  FUZZ_CHECK(rec.payload.data() >= img.data() + off + kRecordHeaderBytes);
  if (zone_gen != 0) FUZZ_CHECK(rec.zone_gen == zone_gen);
  // Only an intact record decodes: its checksum covers everything after it.
  uint64_t sum = 0;
  for (int i = 7; i >= 0; --i) sum = sum << 8 | img[off + i];
  FUZZ_CHECK(sum == xxh64(img.subspan(off + kChecksumBytes, rec.total_bytes - kChecksumBytes)));
  std::vector<uint8_t> again;
  if (reencode(rec, again)) {
    Record back;
    FUZZ_CHECK(again.size() == rec.total_bytes);
    FUZZ_CHECK(decode_record(again, zone_gen, back) == DecodeError::kOk);
    FUZZ_CHECK(same_record(rec, back));
  }
  decompress(rec);
}

void scan(std::vector<uint8_t> img, uint64_t zone_gen, bool seal) {
  if (seal) seal_records(img);
  const std::span<const uint8_t> zone(img);
  uint64_t expect = 0;  // where the next record must start
  const ScanEnd end = scan_records(zone, zone_gen, 0, [&](const Record& rec, uint64_t off) {
    FUZZ_CHECK(off == expect);
    check_record(zone, zone_gen, rec, off);
    expect = off + rec.total_bytes;
  });
  FUZZ_CHECK(end.next_offset == expect && end.next_offset <= zone.size());
  FUZZ_CHECK((end.stop == DecodeError::kOk) == (end.next_offset == zone.size()));
  if (end.stop != DecodeError::kOk) {
    Record rec;
    FUZZ_CHECK(decode_record(zone.subspan(end.next_offset), zone_gen, rec) == end.stop);
    FUZZ_CHECK(decode_error_name(end.stop) != std::string_view("unknown"));
  }
}

void superblock(std::vector<uint8_t> block, bool seal) {
  if (seal && block.size() >= kBlockBytes)
    put_le64(block.data() + kSbChecksumAt, xxh64({block.data(), kSbChecksumAt}));
  Result<Superblock> sb = decode_superblock(block);
  if (!sb) {
    const Status::Code c = sb.status().code();
    FUZZ_CHECK(c == Status::Code::kCorruption || c == Status::Code::kInvalid);
    return;
  }
  // What decode promises about a superblock it returns.
  FUZZ_CHECK(sb->format_version == kFormatVersion && sb->tier < sb->tier_count);
  FUZZ_CHECK(sb->primary_id.size() <= kMaxPrimaryId && sb->checkpoint_zones.size() <= kMaxCheckpointZones);
  FUZZ_CHECK(sb->checkpoint_zones.size() == sb->checkpoint_zone_gens.size());
  FUZZ_CHECK(sb->zone_bytes >= kMinZoneBytes && sb->zone_bytes <= kMaxZoneBytes &&
             sb->zone_bytes % kBlockBytes == 0);
  FUZZ_CHECK(sb->segment_bytes >= 64u << 10 && sb->segment_bytes <= kMaxSegmentBytes &&
             (sb->segment_bytes & (sb->segment_bytes - 1)) == 0);
  for (uint32_t z : sb->checkpoint_zones) FUZZ_CHECK(z < sb->zone_count);
  // Encoding it again gives a block that decodes to the same fields.
  const std::vector<uint8_t> again = encode_superblock(*sb);
  FUZZ_CHECK(again.size() == kBlockBytes);
  Result<Superblock> back = decode_superblock(again);
  FUZZ_CHECK(back.is_ok());
  FUZZ_CHECK(back->pool_uuid == sb->pool_uuid && back->tier == sb->tier &&
             back->tier_count == sb->tier_count);
  FUZZ_CHECK(back->primary_id == sb->primary_id && back->primary_bytes == sb->primary_bytes);
  FUZZ_CHECK(back->segment_bytes == sb->segment_bytes && back->zone_bytes == sb->zone_bytes);
  FUZZ_CHECK(back->zone_count == sb->zone_count && back->epoch_ns == sb->epoch_ns);
  FUZZ_CHECK(back->generation == sb->generation && back->checkpoint_id == sb->checkpoint_id);
  FUZZ_CHECK(back->checkpoint_zones == sb->checkpoint_zones &&
             back->checkpoint_zone_gens == sb->checkpoint_zone_gens);
  // Only the bytes no field covers (reserved, past the primary id) may differ.
  FUZZ_CHECK(encode_superblock(*back) == again);
}

}  // namespace
}  // namespace shadowd::pool

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace shadowd::pool;
  shadowd::fuzz::Input in(data, size);
  const uint8_t mode = in.u8();
  const uint64_t zone_gen = in.u64();
  const std::span<const uint8_t> rest = in.rest();
  std::vector<uint8_t> bytes(rest.begin(), rest.end());
  if (mode & 1) {
    superblock(std::move(bytes), mode & 2);
  } else {
    scan(std::move(bytes), zone_gen, mode & 2);
  }
  return 0;
}
