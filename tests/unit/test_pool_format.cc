// The pool's on-disk format (core/pool_format.h, docs/FORMAT.md): every
// record type and the superblock round-trip; the documented header layout is
// checked byte by byte; and, in the manner of LevelDB's log_test, every
// corruption a disk can produce (a flipped bit, a torn write, zeros, garbage,
// a record left over from an earlier use of the zone) is detected and stops a
// zone scan exactly where the valid records end.
#include "core/pool_format.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "tests/unit/test_util.h"

namespace shadowd::pool {
namespace {

using Bytes = std::vector<uint8_t>;
using shadowd::test::random_bytes;
using shadowd::test::test_seed;

constexpr uint64_t kGen = 0x0102030405060708ull;

uint64_t get_le(const Bytes& b, size_t at, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(b[at + i]) << (8 * i);
  return v;
}

void put_le(Bytes& b, size_t at, uint64_t v, size_t n) {
  for (size_t i = 0; i < n; ++i) b[at + i] = static_cast<uint8_t>(v >> (8 * i));
}

// Recompute the checksum of the record at the start of `rec`, so that a test
// can forge an intact record holding values no encoder writes.
void reseal(Bytes& rec) {
  put_le(rec, 0, xxh64(std::span<const uint8_t>(rec).subspan(8)), 8);
}

DecodeError decode(const Bytes& b, uint64_t gen, Record& rec) { return decode_record(b, gen, rec); }

DecodeError decode(const Bytes& b, uint64_t gen = kGen) {
  Record rec;
  return decode_record(b, gen, rec);
}

Bytes payload_of(const Record& r) { return Bytes(r.payload.begin(), r.payload.end()); }

Uuid sample_uuid() {
  Uuid u;
  for (size_t i = 0; i < u.size(); ++i) u[i] = static_cast<uint8_t>(0xa0 + i);
  return u;
}

// One small record of each kind, for the corruption loops.
struct Sample {
  std::string name;
  Bytes bytes;
};

Bytes small_padding(uint64_t gen) {
  // A batch 30 bytes short of its block ends in a padding record of 30 bytes.
  Bytes b(kBlockBytes - 30, 0xee);
  pad_to_block(b, gen);
  return Bytes(b.end() - 30, b.end());
}

std::vector<Sample> samples(std::mt19937_64& rng, uint64_t gen = kGen) {
  std::vector<Sample> s;
  auto add = [&](std::string name, auto encode) {
    Bytes b;
    encode(b);
    s.push_back({std::move(name), std::move(b)});
  };
  add("zone header", [&](Bytes& b) {
    encode_zone_header(b, gen, {ZoneKind::kJournal, 0, 3, sample_uuid(), 1700000000000000000});
  });
  add("journal write", [&](Bytes& b) {
    const Bytes data = random_bytes(rng, 20);
    encode_journal(b, gen, {11, 22, JournalOp::kWrite, 4096, 20}, Codec::kNone, data);
  });
  add("journal zstd write", [&](Bytes& b) {
    const Bytes data = random_bytes(rng, 13);
    encode_journal(b, gen, {12, 23, JournalOp::kWrite, 8192, 4096}, Codec::kZstd, data);
  });
  add("journal write zeroes", [&](Bytes& b) {
    encode_journal(b, gen, {13, 24, JournalOp::kWriteZeroes, 0, 65536}, Codec::kNone, {});
  });
  add("journal trim", [&](Bytes& b) {
    encode_journal(b, gen, {14, 25, JournalOp::kTrim, 512, 512}, Codec::kNone, {});
  });
  add("version", [&](Bytes& b) {
    const Bytes data = random_bytes(rng, 17);
    encode_version(b, gen, {5, 14, 26, 65536, 1, 2, 9, 0xfeedull}, data);
  });
  add("checkpoint", [&](Bytes& b) {
    const Bytes data = random_bytes(rng, 9);
    encode_checkpoint(b, gen, {77, 1, 3}, data);
  });
  add("history", [&](Bytes& b) {
    const Bytes data = random_bytes(rng, 40);
    encode_history(b, gen, {1}, data);
  });
  add("marker", [&](Bytes& b) {
    encode_marker(b, gen, {MarkerKind::kRestart, 15, 27});
  });
  s.push_back({"padding", small_padding(gen)});
  return s;
}

// ---- layout and round trips ----

TEST_CASE("pool_format: the record header has the documented layout", "[pool_format]") {
  Bytes b;
  const Bytes data = {1, 2, 3, 4, 5};
  encode_journal(b, kGen, {1, 2, JournalOp::kWrite, 0, 5}, Codec::kNone, data);
  REQUIRE(b.size() == kRecordHeaderBytes + 32 + data.size());
  CHECK(get_le(b, 8, 4) == b.size() - kRecordHeaderBytes);    // length
  CHECK(b[12] == static_cast<uint8_t>(RecordType::kJournal));  // type
  CHECK(b[13] == static_cast<uint8_t>(Codec::kNone));          // codec
  CHECK(get_le(b, 14, 2) == 0);                                // reserved
  CHECK(get_le(b, 16, 8) == kGen);                             // zone_gen
  // The checksum covers every byte after it, up to the end of the payload.
  CHECK(get_le(b, 0, 8) == xxh64(std::span<const uint8_t>(b).subspan(8)));
  CHECK(Bytes(b.end() - 5, b.end()) == data);
}

TEST_CASE("pool_format: xxh64 is XXH64 with seed 0", "[pool_format]") {
  CHECK(xxh64({}) == 0xef46db3751d8e999ull);
  const Bytes abc = {'a', 'b', 'c'};
  CHECK(xxh64(abc) == 0x44bc2cf5ad770999ull);
}

TEST_CASE("pool_format: a zone header round-trips", "[pool_format]") {
  ZoneHeader h;
  h.kind = ZoneKind::kCheckpoint;
  h.tier = 1;
  h.zone_index = 0xfffffffe;
  h.pool_uuid = sample_uuid();
  h.opened_ns = -5;
  Bytes b;
  encode_zone_header(b, kGen, h);
  Record r;
  // Read as at zone open: the generation is not known yet.
  REQUIRE(decode(b, 0, r) == DecodeError::kOk);
  CHECK(r.type == RecordType::kZoneHeader);
  CHECK(r.zone_gen == kGen);
  CHECK(r.zone.kind == h.kind);
  CHECK(r.zone.tier == h.tier);
  CHECK(r.zone.zone_index == h.zone_index);
  CHECK(r.zone.pool_uuid == h.pool_uuid);
  CHECK(r.zone.opened_ns == h.opened_ns);
  CHECK(r.payload.empty());
  CHECK(r.total_bytes == b.size());
}

TEST_CASE("pool_format: journal records round-trip", "[pool_format]") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (size_t n : {size_t{0}, size_t{1}, size_t{4096}, size_t{1} << 20}) {
    for (Codec codec : {Codec::kNone, Codec::kZstd}) {
      CAPTURE(n, static_cast<int>(codec));
      JournalRecord j;
      j.seq = UINT64_MAX - 1;
      j.time_ns = INT64_MIN + 3;
      j.op = JournalOp::kWrite;
      j.offset = 0x123456789abcdef0ull;
      j.length = static_cast<uint32_t>(n);
      j.flags = n % 2 == 0 ? kJournalCorrection : 0;
      const Bytes data = random_bytes(rng, n);
      Bytes b = {0x55};  // records go at any alignment
      encode_journal(b, kGen, j, codec, data);
      REQUIRE(b.size() == 1 + journal_record_bytes(n));
      const Bytes rec_bytes(b.begin() + 1, b.end());
      Record r;
      REQUIRE(decode(rec_bytes, kGen, r) == DecodeError::kOk);
      CHECK(r.type == RecordType::kJournal);
      CHECK(r.codec == codec);
      CHECK(r.zone_gen == kGen);
      CHECK(r.journal.seq == j.seq);
      CHECK(r.journal.time_ns == j.time_ns);
      CHECK(r.journal.op == j.op);
      CHECK(r.journal.offset == j.offset);
      CHECK(r.journal.length == j.length);
      CHECK(r.journal.flags == j.flags);
      CHECK(payload_of(r) == data);
      CHECK(r.payload.data() == rec_bytes.data() + rec_bytes.size() - n);  // not a copy
      CHECK(r.total_bytes == rec_bytes.size());
    }
  }
  for (JournalOp op : {JournalOp::kWriteZeroes, JournalOp::kTrim}) {
    Bytes b;
    encode_journal(b, kGen, {9, 10, op, 1u << 20, 1u << 20}, Codec::kNone, {});
    REQUIRE(b.size() == journal_record_bytes(0));
    Record r;
    REQUIRE(decode(b, kGen, r) == DecodeError::kOk);
    CHECK(r.journal.op == op);
    CHECK(r.journal.length == 1u << 20);
    CHECK(r.payload.empty());
  }
}

TEST_CASE("pool_format: version records round-trip", "[pool_format]") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (size_t n : {size_t{0}, size_t{7}, size_t{100000}}) {
    CAPTURE(n);
    VersionRecord v;
    v.segment = 0xabcdef;
    v.seq = 1234567890123ull;
    v.time_ns = 1790000000123456789;
    v.segment_bytes = 1u << 20;
    v.tier = 1;
    v.depth = 0xfffe;
    v.base_seq = 1234567890000ull;
    v.content_xxh = 0x8899aabbccddeeffull;
    const Bytes data = random_bytes(rng, n);
    Bytes b;
    encode_version(b, kGen, v, data);
    REQUIRE(b.size() == version_record_bytes(n));
    Record r;
    REQUIRE(decode(b, kGen, r) == DecodeError::kOk);
    CHECK(r.type == RecordType::kVersion);
    CHECK(r.codec == Codec::kZstd);
    CHECK(r.version.segment == v.segment);
    CHECK(r.version.seq == v.seq);
    CHECK(r.version.time_ns == v.time_ns);
    CHECK(r.version.segment_bytes == v.segment_bytes);
    CHECK(r.version.tier == v.tier);
    CHECK(r.version.depth == v.depth);
    CHECK(r.version.base_seq == v.base_seq);
    CHECK(r.version.content_xxh == v.content_xxh);
    CHECK(payload_of(r) == data);
    CHECK(r.total_bytes == b.size());
  }
}

TEST_CASE("pool_format: checkpoint, history and marker records round-trip", "[pool_format]") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  SECTION("checkpoint") {
    const Bytes data = random_bytes(rng, 3000);
    Bytes b;
    encode_checkpoint(b, kGen, {UINT64_MAX, 41, 42}, data);
    Record r;
    REQUIRE(decode(b, kGen, r) == DecodeError::kOk);
    CHECK(r.type == RecordType::kCheckpoint);
    CHECK(r.checkpoint.checkpoint_id == UINT64_MAX);
    CHECK(r.checkpoint.index == 41);
    CHECK(r.checkpoint.count == 42);
    CHECK(payload_of(r) == data);
    CHECK(r.total_bytes == b.size());
  }
  SECTION("history") {
    for (uint32_t count : {0u, 1u, 100u}) {
      CAPTURE(count);
      const Bytes data = random_bytes(rng, size_t{count} * 40);
      Bytes b;
      encode_history(b, kGen, {count}, data);
      Record r;
      REQUIRE(decode(b, kGen, r) == DecodeError::kOk);
      CHECK(r.type == RecordType::kHistory);
      CHECK(r.history.count == count);
      CHECK(payload_of(r) == data);
      CHECK(r.total_bytes == b.size());
    }
  }
  SECTION("marker") {
    for (MarkerKind kind : {MarkerKind::kRetention, MarkerKind::kRestart}) {
      Bytes b;
      encode_marker(b, kGen, {kind, 0x0f0e0d0c0b0a0908ull, -1});
      Record r;
      REQUIRE(decode(b, kGen, r) == DecodeError::kOk);
      CHECK(r.type == RecordType::kMarker);
      CHECK(r.marker.kind == kind);
      CHECK(r.marker.seq == 0x0f0e0d0c0b0a0908ull);
      CHECK(r.marker.time_ns == -1);
      CHECK(r.payload.empty());
      CHECK(r.total_bytes == b.size());
    }
  }
}

TEST_CASE("pool_format: encoded sizes match the size functions", "[pool_format]") {
  const Bytes data(5000, 0x5a);
  for (size_t n : {size_t{0}, size_t{1}, size_t{23}, size_t{24}, size_t{4096}, size_t{5000}}) {
    CAPTURE(n);
    const std::span<const uint8_t> p(data.data(), n);
    Bytes j, v;
    encode_journal(j, kGen, {1, 1, JournalOp::kWrite, 0, 0}, Codec::kZstd, p);
    encode_version(v, kGen, {}, p);
    CHECK(j.size() == journal_record_bytes(n));
    CHECK(v.size() == version_record_bytes(n));
  }
}

// ---- pad_to_block ----

TEST_CASE("pool_format: pad_to_block fills to the next 4 KiB boundary", "[pool_format]") {
  for (size_t used : {size_t{0}, size_t{kBlockBytes}, size_t{2 * kBlockBytes}}) {
    CAPTURE(used);
    Bytes b(used, 0x11);
    pad_to_block(b, kGen);
    CHECK(b.size() == used);  // already aligned: nothing added
  }
  // Gaps of 1..23 bytes cannot hold a header, 24 holds exactly one, then larger.
  std::vector<size_t> gaps;
  for (size_t g = 1; g <= 64; ++g) gaps.push_back(g);
  for (size_t g : {size_t{1000}, size_t{4000}, size_t{4095}}) gaps.push_back(g);
  for (size_t gap : gaps) {
    for (size_t blocks : {size_t{0}, size_t{2}}) {
      CAPTURE(gap, blocks);
      const size_t used = (blocks + 1) * kBlockBytes - gap;
      Bytes b(used, 0x11);
      pad_to_block(b, kGen);
      const size_t want = gap < kRecordHeaderBytes ? gap + kBlockBytes : gap;
      REQUIRE(b.size() == used + want);
      CHECK(b.size() % kBlockBytes == 0);
      CHECK(std::all_of(b.begin(), b.begin() + used, [](uint8_t c) { return c == 0x11; }));
      Record r;
      const Bytes tail(b.begin() + used, b.end());
      REQUIRE(decode(tail, kGen, r) == DecodeError::kOk);
      CHECK(r.type == RecordType::kPadding);
      CHECK(r.zone_gen == kGen);
      CHECK(r.total_bytes == want);
      CHECK(r.payload.size() == want - kRecordHeaderBytes);
    }
  }
}

// ---- corruption ----

TEST_CASE("pool_format: every flipped bit of a record is detected", "[pool_format][corruption]") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (const Sample& s : samples(rng)) {
    CAPTURE(s.name);
    REQUIRE(decode(s.bytes) == DecodeError::kOk);
    for (size_t i = 0; i < s.bytes.size(); ++i) {
      for (int bit = 0; bit < 8; ++bit) {
        Bytes bad = s.bytes;
        bad[i] ^= static_cast<uint8_t>(1u << bit);
        CAPTURE(i, bit);
        CHECK(decode(bad) != DecodeError::kOk);
        CHECK(decode(bad, 0) != DecodeError::kOk);  // also when any generation is accepted
      }
      Bytes bad = s.bytes;
      bad[i] ^= 0xff;
      CAPTURE(i);
      CHECK(decode(bad) != DecodeError::kOk);
    }
  }
}

TEST_CASE("pool_format: a cut record is never accepted", "[pool_format][corruption]") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (const Sample& s : samples(rng)) {
    CAPTURE(s.name);
    for (size_t n = 0; n < s.bytes.size(); ++n) {
      CAPTURE(n);
      // The buffer ends inside the record.
      const Bytes prefix(s.bytes.begin(), s.bytes.begin() + n);
      CHECK(decode(prefix) == DecodeError::kTruncated);
      // A torn write: the rest of the record reads as what was there before.
      Bytes zeros = prefix;
      zeros.resize(s.bytes.size() + 64, 0);
      if (!std::all_of(s.bytes.begin() + n, s.bytes.end(), [](uint8_t c) { return c == 0; })) {
        const DecodeError ez = decode(zeros);
        CHECK((ez == DecodeError::kBadChecksum || ez == DecodeError::kTruncated));
      }  // else the missing bytes were zeros: the record is whole after all
      Bytes garbage = prefix;
      const Bytes junk = random_bytes(rng, s.bytes.size() + 64 - n);
      garbage.insert(garbage.end(), junk.begin(), junk.end());
      if (!std::equal(s.bytes.begin() + n, s.bytes.end(), junk.begin())) {
        CHECK(decode(garbage) != DecodeError::kOk);
      }
    }
  }
}

TEST_CASE("pool_format: a record from another use of the zone is kBadGen", "[pool_format]") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (const Sample& s : samples(rng, kGen - 1)) {
    CAPTURE(s.name);
    CHECK(decode(s.bytes, kGen) == DecodeError::kBadGen);
    CHECK(decode(s.bytes, kGen - 1) == DecodeError::kOk);
    CHECK(decode(s.bytes, 0) == DecodeError::kOk);
    CHECK(decode(s.bytes, kGen + 1) == DecodeError::kBadGen);
  }
}

TEST_CASE("pool_format: intact records with impossible contents are kBadType",
          "[pool_format][corruption]") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const std::vector<Sample> all = samples(rng);
  auto sample = [&](const std::string& name) {
    for (const Sample& s : all) {
      if (s.name == name) return s.bytes;
    }
    FAIL("no sample " << name);
    return Bytes{};
  };
  // Change the bytes at `at`, fix up the checksum, decode.
  auto forged = [&](const std::string& name, size_t at, uint64_t value, size_t n) {
    Bytes b = sample(name);
    put_le(b, at, value, n);
    reseal(b);
    return decode(b);
  };
  constexpr size_t kBody = kRecordHeaderBytes;

  SECTION("unknown record types") {
    for (unsigned t : {0u, 8u, 100u, 255u}) {
      CAPTURE(t);
      CHECK(forged("marker", 12, t, 1) == DecodeError::kBadType);
    }
  }
  SECTION("unknown codec, nonzero reserved field") {
    CHECK(forged("journal write", 13, 2, 1) == DecodeError::kBadType);
    CHECK(forged("journal write", 14, 1, 2) == DecodeError::kBadType);
  }
  SECTION("a codec the type is not written with") {
    // Found by tests/fuzz/pool_record (regressions/pool_record/checkpoint_with_zstd_codec).
    CHECK(forged("version", 13, 0, 1) == DecodeError::kBadType);
    for (const char* raw : {"zone header", "checkpoint", "history", "marker", "padding"}) {
      CAPTURE(raw);
      CHECK(forged(raw, 13, 1, 1) == DecodeError::kBadType);
    }
    CHECK(forged("journal trim", 13, 1, 1) == DecodeError::kOk);  // a journal record says which
  }
  SECTION("a type with another type's body size") {
    // A journal record body is 32 bytes: call it a version (48) or a marker (24).
    CHECK(forged("journal trim", 12, static_cast<uint8_t>(RecordType::kVersion), 1) ==
          DecodeError::kBadType);
    CHECK(forged("journal trim", 12, static_cast<uint8_t>(RecordType::kMarker), 1) ==
          DecodeError::kBadType);
    CHECK(forged("zone header", 12, static_cast<uint8_t>(RecordType::kMarker), 1) ==
          DecodeError::kBadType);
  }
  SECTION("a length shorter than the body") {
    for (const Sample& s : all) {
      CAPTURE(s.name);
      const uint64_t length = get_le(s.bytes, 8, 4);
      for (uint64_t shorter = 0; shorter < length; ++shorter) {
        Bytes b = s.bytes;
        b.resize(kRecordHeaderBytes + shorter);
        put_le(b, 8, shorter, 4);
        reseal(b);
        CAPTURE(shorter);
        const bool fits = s.name == "padding" || (s.name.rfind("journal", 0) == 0 && shorter >= 32) ||
                          (s.name == "version" && shorter >= 48) ||
                          (s.name == "checkpoint" && shorter >= 16);
        if (!fits) CHECK(decode(b) == DecodeError::kBadType);
      }
    }
  }
  SECTION("a length no zone can hold") {
    for (uint64_t length : {uint64_t{kMaxZoneBytes}, uint64_t{UINT32_MAX}}) {
      Bytes b = sample("marker");
      put_le(b, 8, length, 4);
      reseal(b);
      CHECK(decode(b) != DecodeError::kOk);
    }
  }
  SECTION("a payload where the type has none") {
    for (const char* name : {"marker", "zone header"}) {
      CAPTURE(name);
      Bytes b = sample(name);
      b.push_back(0);
      put_le(b, 8, get_le(b, 8, 4) + 1, 4);
      reseal(b);
      CHECK(decode(b) == DecodeError::kBadType);
    }
  }
  SECTION("enum values out of range") {
    CHECK(forged("zone header", kBody + 0, 5, 1) == DecodeError::kBadType);   // ZoneKind
    CHECK(forged("journal trim", kBody + 28, 0, 1) == DecodeError::kBadType);  // JournalOp
    CHECK(forged("journal trim", kBody + 28, 4, 1) == DecodeError::kBadType);
    CHECK(forged("marker", kBody + 16, 0, 1) == DecodeError::kBadType);  // MarkerKind
    CHECK(forged("marker", kBody + 16, 3, 1) == DecodeError::kBadType);
    // Journal flags: bit 0 (a correction) on a write only; no other bit.
    CHECK(forged("journal write", kBody + 29, kJournalCorrection, 1) == DecodeError::kOk);
    CHECK(forged("journal trim", kBody + 29, kJournalCorrection, 1) == DecodeError::kBadType);
    CHECK(forged("journal write", kBody + 29, 2, 1) == DecodeError::kBadType);
    CHECK(forged("journal write", kBody + 29, 0x80, 1) == DecodeError::kBadType);
    CHECK(forged("journal write", kBody + 30, 1, 2) == DecodeError::kBadType);  // reserved
  }
  SECTION("lengths that disagree with the body") {
    // A raw write's payload is its length; zeroes and trims carry none.
    CHECK(forged("journal write", kBody + 24, 21, 4) == DecodeError::kBadType);
    CHECK(forged("journal write", kBody + 24, 20, 4) == DecodeError::kOk);
    CHECK(forged("journal zstd write", kBody + 24, 999, 4) == DecodeError::kOk);
    CHECK(forged("journal write", kBody + 28, static_cast<uint8_t>(JournalOp::kTrim), 1) ==
          DecodeError::kBadType);
    CHECK(forged("history", kBody + 0, 2, 4) == DecodeError::kBadType);  // 40 bytes a bucket
    CHECK(forged("history", kBody + 0, 0, 4) == DecodeError::kBadType);
    CHECK(forged("checkpoint", kBody + 8, 3, 4) == DecodeError::kBadType);  // index < count
  }
}

// ---- zone scans ----

struct Placed {
  uint64_t offset;
  uint32_t bytes;
  RecordType type;
};

// What a zone holds after some appends: its bytes, every record written (in
// order) and where each batch starts.
struct ZoneImage {
  Bytes bytes;
  std::vector<Placed> placed;
  std::vector<uint64_t> batch_starts;
};

// A zone header, then `batches` batches of 1..6 random records with payloads
// below `max_payload` bytes, each batch padded to 4 KiB.
ZoneImage build_zone(std::mt19937_64& rng, uint64_t gen, size_t batches,
                     size_t max_payload = 3000) {
  ZoneImage image;
  Bytes& z = image.bytes;
  auto note = [&](size_t before, RecordType t) {
    image.placed.push_back({before, static_cast<uint32_t>(z.size() - before), t});
  };
  encode_zone_header(z, gen, {ZoneKind::kJournal, 0, 7, sample_uuid(), 1});
  note(0, RecordType::kZoneHeader);
  uint64_t seq = 1;
  for (size_t b = 0; b < batches; ++b) {
    const size_t batch_start = z.size();
    image.batch_starts.push_back(batch_start);
    const size_t records = 1 + rng() % 6;
    for (size_t i = 0; i < records; ++i) {
      const size_t before = z.size();
      const size_t n = rng() % 2 == 0 ? rng() % 64 : rng() % max_payload;
      const Bytes data = random_bytes(rng, n);
      switch (rng() % 3) {
        case 0:
          encode_journal(z, gen, {seq++, 0, JournalOp::kWrite, 0, static_cast<uint32_t>(n)},
                         Codec::kNone, data);
          note(before, RecordType::kJournal);
          break;
        case 1:
          encode_version(z, gen, {seq, seq, 0, 65536, 0, 0, 0, 0}, data);
          note(before, RecordType::kVersion);
          break;
        default:
          encode_marker(z, gen, {MarkerKind::kRetention, seq, 0});
          note(before, RecordType::kMarker);
          break;
      }
    }
    const size_t before = z.size();
    pad_to_block(z, gen);
    if (z.size() != before) note(before, RecordType::kPadding);
    REQUIRE(z.size() % kBlockBytes == 0);
    REQUIRE(z.size() - batch_start <= 6 * (max_payload + 100) + 2 * kBlockBytes);
  }
  return image;
}

struct ScanResult {
  ScanEnd end;
  std::vector<uint64_t> offsets;
};

ScanResult scan(const Bytes& zone, uint64_t gen, uint64_t start = 0) {
  ScanResult r;
  r.end = scan_records(zone, gen, start, [&](const Record& rec, uint64_t off) {
    CHECK(rec.total_bytes > 0);
    r.offsets.push_back(off);
  });
  return r;
}

TEST_CASE("pool_format: a scan visits every record of a clean zone", "[pool_format][scan]") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const ZoneImage image = build_zone(rng, kGen, 8);
  const Bytes& written = image.bytes;
  const std::vector<Placed>& placed = image.placed;
  const std::vector<uint64_t>& batches = image.batch_starts;

  SECTION("the rest of the zone is zeros") {
    Bytes zone = written;
    zone.resize(256 * 1024, 0);
    const ScanResult r = scan(zone, kGen);
    CHECK(r.end.next_offset == written.size());
    CHECK(r.end.stop == DecodeError::kBadChecksum);
    REQUIRE(r.offsets.size() == placed.size());
    for (size_t i = 0; i < placed.size(); ++i) CHECK(r.offsets[i] == placed[i].offset);
  }
  SECTION("the zone is full") {
    const ScanResult r = scan(written, kGen);
    CHECK(r.end.next_offset == written.size());
    CHECK(r.end.stop == DecodeError::kOk);
    CHECK(r.offsets.size() == placed.size());
  }
  SECTION("from a batch boundary") {
    const ScanResult r = scan(written, kGen, batches[3]);
    CHECK(r.end.next_offset == written.size());
    REQUIRE_FALSE(r.offsets.empty());
    CHECK(r.offsets.front() == batches[3]);
  }
  SECTION("less than a header left at the end") {
    Bytes zone = written;
    zone.resize(zone.size() + 10, 0);
    const ScanResult r = scan(zone, kGen);
    CHECK(r.end.next_offset == written.size());
    CHECK(r.end.stop == DecodeError::kTruncated);
  }
}

// Where a scan of `zone` must stop: after the last record of `placed` that
// is intact in `zone` with all the records before it.
uint64_t expected_end(const Bytes& zone, const Bytes& written, const std::vector<Placed>& placed) {
  uint64_t end = 0;
  for (const Placed& p : placed) {
    if (p.offset + p.bytes > zone.size() ||
        !std::equal(written.begin() + p.offset, written.begin() + p.offset + p.bytes,
                    zone.begin() + p.offset)) {
      break;
    }
    end = p.offset + p.bytes;
  }
  return end;
}

TEST_CASE("pool_format: a scan stops exactly at a torn last batch", "[pool_format][scan]") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  // Small records, so that the last batch is a block or two and every cut can be tried.
  const ZoneImage image = build_zone(rng, kGen, 5, 400);
  const Bytes& written = image.bytes;
  const std::vector<Placed>& placed = image.placed;
  const uint64_t last = image.batch_starts.back();
  const size_t image_bytes = written.size() + 2 * kBlockBytes;

  // What the torn write left behind after the cut: zeros, garbage, or the
  // records of the zone's previous use.
  Bytes stale = build_zone(rng, kGen - 1, 40, 400).bytes;
  stale.resize(std::max(stale.size(), image_bytes), 0);
  stale.resize(image_bytes);
  Bytes garbage = random_bytes(rng, image_bytes);
  for (size_t i = 0; i < written.size(); ++i) {
    if (garbage[i] == written[i]) garbage[i] ^= 0x5a;  // garbage: never the byte that belongs there
  }
  const Bytes backgrounds[] = {Bytes(image_bytes, 0), garbage, stale};

  for (size_t k = 0; k < 3; ++k) {
    CAPTURE(k);
    Bytes zone = backgrounds[k];
    std::copy(written.begin(), written.begin() + last, zone.begin());
    // The last batch's write reached the disk up to byte `cut` only.
    for (uint64_t cut = last; cut <= written.size(); ++cut) {
      CAPTURE(cut);
      std::copy(backgrounds[k].begin() + cut, backgrounds[k].begin() + written.size(),
                zone.begin() + cut);
      std::copy(written.begin() + last, written.begin() + cut, zone.begin() + last);
      const uint64_t want = expected_end(zone, written, placed);
      REQUIRE(want >= last);
      if (cut == written.size()) REQUIRE(want == written.size());
      if (k == 1 && cut < written.size()) REQUIRE(want <= cut);
      const ScanResult r = scan(zone, kGen);
      REQUIRE(r.end.next_offset == want);
      REQUIRE(r.end.stop != DecodeError::kOk);
      REQUIRE(r.offsets.size() ==
              static_cast<size_t>(std::count_if(placed.begin(), placed.end(), [&](const Placed& p) {
                return p.offset + p.bytes <= want;
              })));
    }
  }
}

TEST_CASE("pool_format: records of the zone's previous use end the scan with kBadGen",
          "[pool_format][scan]") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const ZoneImage old = build_zone(rng, kGen - 1, 40);
  const ZoneImage now = build_zone(rng, kGen, 3);
  const Bytes& written = now.bytes;
  Bytes zone = old.bytes;
  REQUIRE(zone.size() > written.size() + kBlockBytes);
  // The zone was reclaimed and reopened: the new records overwrite the start.
  std::copy(written.begin(), written.end(), zone.begin());
  const ScanResult r = scan(zone, kGen);
  CHECK(r.end.next_offset == written.size());
  CHECK(r.offsets.size() == now.placed.size());
  // Every batch starts at a block boundary, so the old record found there is whole.
  const bool old_record_at_end =
      std::any_of(old.placed.begin(), old.placed.end(),
                  [&](const Placed& p) { return p.offset == written.size(); });
  if (old_record_at_end) {
    CHECK(r.end.stop == DecodeError::kBadGen);
  } else {
    CHECK(r.end.stop != DecodeError::kOk);
  }
  // Read without a generation, the zone header tells which use is current.
  Record head;
  REQUIRE(decode_record(zone, 0, head) == DecodeError::kOk);
  CHECK(head.zone_gen == kGen);
}

// ---- superblock ----

Superblock full_superblock() {
  Superblock sb;
  sb.pool_uuid = sample_uuid();
  sb.tier = 1;
  sb.tier_count = 2;
  sb.primary_id = std::string(kMaxPrimaryId, 'p');
  sb.primary_id[0] = '/';
  sb.primary_bytes = 0x0000123456789000ull;
  sb.segment_bytes = 256 * 1024;
  sb.zone_bytes = kDefaultZoneBytes;
  sb.zone_count = 100000;
  sb.epoch_ns = -123456789;
  sb.generation = 0xfedcba9876543210ull;
  sb.checkpoint_id = 99;
  for (uint32_t i = 0; i < kMaxCheckpointZones; ++i) {
    sb.checkpoint_zones.push_back(1000 + 3 * i);
    sb.checkpoint_zone_gens.push_back(0x1000000000ull + i);
  }
  return sb;
}

void check_same(const Superblock& a, const Superblock& b) {
  CHECK(a.format_version == b.format_version);
  CHECK(a.pool_uuid == b.pool_uuid);
  CHECK(a.tier == b.tier);
  CHECK(a.tier_count == b.tier_count);
  CHECK(a.primary_id == b.primary_id);
  CHECK(a.primary_bytes == b.primary_bytes);
  CHECK(a.segment_bytes == b.segment_bytes);
  CHECK(a.zone_bytes == b.zone_bytes);
  CHECK(a.zone_count == b.zone_count);
  CHECK(a.epoch_ns == b.epoch_ns);
  CHECK(a.generation == b.generation);
  CHECK(a.checkpoint_id == b.checkpoint_id);
  CHECK(a.checkpoint_zones == b.checkpoint_zones);
  CHECK(a.checkpoint_zone_gens == b.checkpoint_zone_gens);
}

Superblock minimal_superblock() {
  Superblock sb;
  sb.pool_uuid = new_uuid();
  sb.primary_id = "/dev/vdb";
  sb.primary_bytes = 1ull << 30;
  sb.segment_bytes = 64 * 1024;
  sb.zone_bytes = kMinZoneBytes;
  sb.zone_count = 10;
  return sb;
}

TEST_CASE("pool_format: superblocks round-trip", "[pool_format][superblock]") {
  for (const Superblock& sb : {full_superblock(), minimal_superblock()}) {
    const Bytes block = encode_superblock(sb);
    REQUIRE(block.size() == kBlockBytes);
    CHECK(get_le(block, 0, 8) == kSuperMagic);
    CHECK(std::string(block.begin(), block.begin() + 8) == "SHDWPOOL");
    auto back = decode_superblock(block);
    REQUIRE(back.is_ok());
    check_same(*back, sb);
  }
}

TEST_CASE("pool_format: every flipped bit of a superblock is detected",
          "[pool_format][superblock][corruption]") {
  const Bytes good = encode_superblock(full_superblock());
  size_t missed = 0;
  for (size_t i = 0; i < good.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      Bytes bad = good;
      bad[i] ^= static_cast<uint8_t>(1u << bit);
      auto sb = decode_superblock(bad);
      if (sb.is_ok() || sb.status().code() != Status::Code::kCorruption) {
        ++missed;
        CAPTURE(i, bit);
        CHECK_FALSE(sb.is_ok());
      }
    }
  }
  CHECK(missed == 0);
}

TEST_CASE("pool_format: superblock errors say what is wrong", "[pool_format][superblock]") {
  const Superblock sb = minimal_superblock();
  SECTION("not a pool") {
    for (const Bytes& b : {Bytes(kBlockBytes, 0), Bytes(kBlockBytes, 0xff)}) {
      auto r = decode_superblock(b);
      REQUIRE_FALSE(r.is_ok());
      CHECK(r.status().code() == Status::Code::kCorruption);
      CHECK(r.status().message().find("magic") != std::string::npos);
    }
  }
  SECTION("too short") {
    const Bytes block = encode_superblock(sb);
    auto r = decode_superblock(std::span<const uint8_t>(block.data(), kBlockBytes - 1));
    REQUIRE_FALSE(r.is_ok());
    CHECK(r.status().code() == Status::Code::kCorruption);
  }
  SECTION("a checksum mismatch") {
    Bytes block = encode_superblock(sb);
    block[kBlockBytes - 100] ^= 1;  // in the reserved area: still covered
    auto r = decode_superblock(block);
    REQUIRE_FALSE(r.is_ok());
    CHECK(r.status().code() == Status::Code::kCorruption);
    CHECK(r.status().message().find("checksum") != std::string::npos);
  }
  SECTION("another format version") {
    Superblock v2 = sb;
    v2.format_version = 2;
    auto r = decode_superblock(encode_superblock(v2));
    REQUIRE_FALSE(r.is_ok());
    CHECK(r.status().code() == Status::Code::kCorruption);
    CHECK(r.status().message().find("unsupported pool format version 2") != std::string::npos);
  }
}

TEST_CASE("pool_format: a superblock with nonsense fields is kInvalid",
          "[pool_format][superblock]") {
  auto rejected = [](const Superblock& sb) {
    auto r = decode_superblock(encode_superblock(sb));
    return !r.is_ok() && r.status().code() == Status::Code::kInvalid;
  };
  const Superblock good = minimal_superblock();
  REQUIRE_FALSE(rejected(good));
  Superblock sb = good;
  sb.tier_count = 0;
  CHECK(rejected(sb));
  sb = good;
  sb.tier = 1;  // of one tier
  CHECK(rejected(sb));
  for (uint32_t seg : {0u, 4096u, 96u << 10, 2u << 20}) {
    CAPTURE(seg);
    sb = good;
    sb.segment_bytes = seg;
    CHECK(rejected(sb));
  }
  for (uint32_t zb : {0u, kMinZoneBytes - kBlockBytes, kMinZoneBytes + 1, kMaxZoneBytes + kBlockBytes}) {
    CAPTURE(zb);
    sb = good;
    sb.zone_bytes = zb;
    CHECK(rejected(sb));
  }
  sb = good;
  sb.checkpoint_zones = {3};
  sb.checkpoint_zone_gens = {5};
  CHECK(rejected(sb));  // zones without a checkpoint id
  sb.checkpoint_id = 1;
  CHECK_FALSE(rejected(sb));
  sb.checkpoint_zones = {10};  // of 10 zones: past the end
  CHECK(rejected(sb));

  // Counts beyond the encodable limits can only be forged.
  auto forged = [&](size_t at, uint32_t value) {
    Bytes b = encode_superblock(good);
    put_le(b, at, value, 4);
    put_le(b, kBlockBytes - 8, xxh64(std::span<const uint8_t>(b.data(), kBlockBytes - 8)), 8);
    auto r = decode_superblock(b);
    return !r.is_ok() && r.status().code() == Status::Code::kInvalid;
  };
  CHECK(forged(88, kMaxPrimaryId + 1));                  // primary id length
  CHECK(forged(88, UINT32_MAX));
  CHECK(forged(92, kMaxCheckpointZones + 1));            // checkpoint zone count
  CHECK(forged(92, UINT32_MAX));
  CHECK_FALSE(forged(88, static_cast<uint32_t>(good.primary_id.size())));
}

// ---- helpers ----

TEST_CASE("pool_format: uuids", "[pool_format]") {
  Uuid u;
  for (size_t i = 0; i < u.size(); ++i) u[i] = static_cast<uint8_t>(i * 0x11);
  CHECK(uuid_to_string(u) == "00112233-4455-6677-8899-aabbccddeeff");
  CHECK(uuid_to_string(Uuid{}) == "00000000-0000-0000-0000-000000000000");
  const Uuid a = new_uuid(), b = new_uuid();
  CHECK(a != b);
  CHECK((a[6] >> 4) == 4);        // random (version 4)
  CHECK((a[8] & 0xc0) == 0x80);   // RFC 4122 variant
  CHECK(uuid_to_string(a).size() == 36);
}

TEST_CASE("pool_format: decode errors have names", "[pool_format]") {
  const DecodeError all[] = {DecodeError::kOk, DecodeError::kTruncated, DecodeError::kBadChecksum,
                             DecodeError::kBadGen, DecodeError::kBadType};
  std::vector<std::string> names;
  for (DecodeError e : all) names.emplace_back(decode_error_name(e));
  CHECK(names == std::vector<std::string>{"ok", "truncated", "bad_checksum", "bad_gen", "bad_type"});
}

}  // namespace
}  // namespace shadowd::pool
