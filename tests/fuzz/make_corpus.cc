// Writes the seed corpora of the fuzz targets: tests/fuzz/corpus/<target>/
// <name>, each a small, meaningful input in the layout its target reads
// (see the comment at the top of each target). Protocol messages and pool
// records come from the real encoders where there is one, so a seed is
// what the daemon, shadowctl or a client would produce. The output is the
// same on every run (fixed UUIDs, times and data).
//
// Regenerate (files of the same name are overwritten; inputs that
// `scripts/fuzz.sh --merge` added stay):
//   cmake --build build --target fuzz_make_corpus
//   build/tests/fuzz/fuzz_make_corpus tests/fuzz/corpus
#include <zlib.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include "core/pool_format.h"
#include "core/zstd_codec.h"
#include "ctl/protocol.h"
#include "nbd/codec.h"
#include "nbd/protocol.h"
#include "tests/unit/nbd_wire.h"

namespace shadowd::fuzz {
namespace {

namespace fs = std::filesystem;
using test::Bytes;
using test::info_data;
using test::meta_data;
using test::option;
using test::Wire;

// The corpus root, given on the command line.
struct Out {
  fs::path root;
};

void write(const Out& out, const std::string& target, const std::string& name, const Bytes& data) {
  const fs::path dir = out.root / target;
  fs::create_directories(dir);
  std::ofstream f(dir / name, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  if (!f) {
    std::fprintf(stderr, "make_corpus: error: cannot write %s\n", (dir / name).c_str());
    std::exit(1);
  }
}

void write(const Out& out, const std::string& target, const std::string& name, std::string_view text) {
  write(out, target, name, Bytes(text.begin(), text.end()));
}

// A request header, as a client sends it.
Bytes request(uint16_t type, uint16_t flags, uint64_t offset, uint32_t length, uint64_t cookie) {
  uint8_t r[nbd::kRequestSize];
  nbd::encode_request({flags, type, cookie, offset, length}, r);
  return Bytes(r, r + sizeof r);
}

// Every command once, as a client with structured replies sends them.
Wire& all_commands(Wire& w) {
  using namespace nbd;
  w.raw(request(kCmdRead, 0, 0, 4096, 1));
  w.raw(request(kCmdWrite, kCmdFlagFua, 4096, 512, 2)).raw(Bytes(512, 0x5a));
  w.raw(request(kCmdWriteZeroes, kCmdFlagNoHole, 8192, 4096, 3));
  w.raw(request(kCmdTrim, 0, 65536, 65536, 4));
  w.raw(request(kCmdCache, 0, 0, 65536, 5));
  w.raw(request(kCmdBlockStatus, kCmdFlagReqOne, 0, 1u << 20, 6));
  w.raw(request(kCmdFlush, 0, 0, 0, 7));
  return w.raw(request(kCmdDisc, 0, 0, 0, 8));
}

void nbd_handshake(const Out& out) {
  using namespace nbd;
  const std::string t = "nbd_handshake";
  const uint32_t both = kClientFixedNewstyle | kClientNoZeroes;
  {  // what qemu and libnbd send: structured replies, base:allocation, GO
    Wire w;
    w.u8(0).u32(both).raw(option(kOptStructuredReply));
    w.raw(option(kOptListMetaContext, meta_data("disk", {"base:"})));
    w.raw(option(kOptSetMetaContext, meta_data("disk", {"base:allocation"})));
    w.raw(option(kOptInfo, info_data("disk", {kInfoName, kInfoDescription, kInfoBlockSize})));
    w.raw(option(kOptGo, info_data("disk", {kInfoBlockSize})));
    write(out, t, "go_structured_base_allocation", all_commands(w).b);
  }
  {  // the same, arriving in pieces of 1..32 bytes
    Wire w;
    w.u8(5).u32(both).raw(option(kOptStructuredReply));
    w.raw(option(kOptSetMetaContext, meta_data("", {"base:allocation"})));
    w.raw(option(kOptGo, info_data("", {})));
    write(out, t, "go_default_chunked", all_commands(w).b);
  }
  {  // the Linux kernel client (nbd-client): EXPORT_NAME, simple replies
    Wire w;
    w.u8(0).u32(kClientFixedNewstyle).raw(option(kOptExportName, Wire().str("disk").b));
    w.raw(request(kCmdWrite, 0, 0, 1024, 1)).raw(Bytes(1024, 0x11));
    w.raw(request(kCmdRead, 0, 0, 1024, 2));
    write(out, t, "export_name_zeroes", w.raw(request(kCmdDisc, 0, 0, 0, 3)).b);
  }
  {  // an old plain-newstyle client: anything but EXPORT_NAME closes
    Wire w;
    w.u8(0).u32(0).raw(option(kOptList));
    write(out, t, "plain_newstyle_list", w.b);
  }
  {  // nbdinfo --list, byte by byte
    Wire w;
    w.u8(1).u32(both).raw(option(kOptList));
    w.raw(option(kOptInfo, info_data("ro", {kInfoDescription}))).raw(option(kOptAbort));
    write(out, t, "list_info_abort_bytewise", w.b);
  }
  {  // a point-in-time export with shadowd:source
    Wire w;
    w.u8(0).u32(both).raw(option(kOptStructuredReply));
    w.raw(option(kOptListMetaContext, meta_data("pit", {})));
    w.raw(option(kOptSetMetaContext, meta_data("pit", {"shadowd:source", "base:allocation"})));
    w.raw(option(kOptGo, info_data("pit", {kInfoName})));
    w.raw(request(kCmdBlockStatus, 0, 0, 256u << 10, 1));
    w.raw(request(kCmdWrite, 0, 0, 512, 2)).raw(Bytes(512, 0));
    write(out, t, "pit_shadowd_source", w.raw(request(kCmdDisc, 0, 0, 0, 3)).b);
  }
  {  // options the server refuses, then a read-only export without structured replies
    Wire w;
    w.u8(0).u32(both).raw(option(kOptStartTls)).raw(option(kOptPeekExport));
    w.raw(option(kOptExtendedHeaders))
        .raw(option(99, Bytes(8, 1)))
        .raw(option(kOptStructuredReply, Bytes(1, 0)));
    w.raw(option(kOptSetMetaContext, meta_data("ro", {"base:allocation"})));
    w.raw(option(kOptGo, info_data("nope", {}))).raw(option(kOptGo, info_data("ro", {kInfoExport})));
    w.raw(request(kCmdWrite, 0, 0, 512, 1)).raw(Bytes(512, 0)).raw(request(kCmdBlockStatus, 0, 0, 512, 2));
    write(out, t, "refusals_then_read_only", w.raw(request(kCmdRead, 0, 65024, 1024, 3)).b);
  }
}

void nbd_request(const Out& out) {
  using namespace nbd;
  const std::string t = "nbd_request";
  // Context header: flags, export size, largest payload (32 MiB after the
  // target's mapping into 4096..32 MiB).
  auto header = [](uint8_t flags, uint64_t size) {
    return Wire().u8(flags).u64(size).u32((32u << 20) - 4096);
  };
  {
    Wire w = header(2 | 4, 1u << 20);
    write(out, t, "structured_all_commands", all_commands(w).b);
  }
  {
    Wire w = header(1, 1u << 20);
    write(out, t, "read_only_simple", all_commands(w).b);
  }
  {  // refusals: past the end, unknown command and flags, a payload too large to skip
    Wire w = header(2, 65536);
    w.raw(request(kCmdRead, 0, 65536 - 512, 1024, 1))
        .raw(request(kCmdWrite, 0, 65536, 512, 2))
        .raw(Bytes(512, 1));
    w.raw(request(kCmdRead, kCmdFlagDf, 0, 512, 3))
        .raw(request(42, 0, 0, 512, 4))
        .raw(request(kCmdFlush, 0, 1, 0, 5));
    w.raw(request(kCmdBlockStatus, 0, 0, 512, 6)).raw(request(kCmdRead, 0, 0, 64u << 20, 7));
    write(out, t, "refusals", w.raw(request(kCmdWrite, 0, 0, 100u << 20, 8)).b);
  }
  write(out, t, "bad_magic", header(0, 4096).u32(0x12345678).raw(Bytes(24, 0)).b);
}

void control_protocol(const Out& out) {
  using ctl::encode_line;
  using ctl::json;
  using ctl::make_request;
  const std::string t = "control_protocol";
  // What shadowctl sends, one file per command.
  const std::vector<std::pair<std::string, json>> requests = {
      {"version", json::object()},
      {"status", json::object()},
      {"top", {{"n", 5}, {"by", "reads"}, {"window", "1h"}}},
      {"segment", {{"target", "3M"}}},
      {"config.get", {{"key", "alpha"}}},
      {"config.set", {{"key", "shadow_budget_bytes_per_s"}, {"value", "64M"}}},
      {"history.export", {{"format", "csv"}}},
      {"history", json::object()},
      {"versions", {{"segment", "#12"}, {"limit", 100}}},
      {"pool", {{"zones", true}}},
      {"export", {{"at", "-5m"}, {"name", "disk@t1"}}},
      {"unexport", {{"name", "disk@t1"}}},
      {"rollback", {{"seq", 1234}, {"dry_run", true}}},
      {"tune.run", json::object()},
      {"debug.advance", {{"seconds", 3600}}},
  };
  for (const auto& [cmd, args] : requests) {
    write(out, t, "request_" + cmd, encode_line(make_request(cmd, args)));
  }
  // What the daemon answers.
  write(out, t, "reply_ok",
        encode_line(
            ctl::ok_reply({{"segments", json::array({{{"id", 3}, {"reads", 10}}})}, {"window_s", 3600}})));
  write(out, t, "reply_error", encode_line(ctl::error_reply(ctl::errc::kOutOfRange, "n must be 1..10000")));
  // Several lines on one connection, CRLF, blank lines, and lines that are refused.
  write(out, t, "session",
        "{\"version\":1,\"cmd\":\"status\"}\r\n\n  \n{\"cmd\":\"top\",\"n\":3}\n[1,2]\n\"status\"\n"
        "{\"version\":2,\"cmd\":\"status\"}\n{\"version\":\"1\",\"cmd\":\"x\"}\nnot json\n{\"cmd\":7}\n");
  write(out, t, "durations", "3600\n3600s\n90m\n90min\n1h\n1d\n1w\n4294967295\n4294967296s\n1x\n");
  write(out, t, "unicode", "{\"cmd\":\"st\\u00e4tus\",\"note\":\"\\ud83d\\ude00\",\"n\":-1.5e3}\n");
}

// Pool records, from the real encoders.
void pool_record(const Out& out) {
  using namespace pool;
  const std::string t = "pool_record";
  // Target header: mode, then the zone generation (big-endian).
  auto header = [](uint8_t mode, uint64_t gen) {
    Bytes h{mode};
    for (int i = 7; i >= 0; --i) h.push_back(static_cast<uint8_t>(gen >> (8 * i)));
    return h;
  };
  auto cat = [](Bytes a, const Bytes& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  const Uuid uuid = {0x5d, 0x1e, 0x9c, 0x3a, 0x77, 0x10, 0x4b, 0x2e,
                     0x8f, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd};
  const uint64_t gen = 7;
  const int64_t t0 = 1'796'000'000'000'000'000;
  Bytes data(4096);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 7 / 512);

  Bytes journal;
  encode_zone_header(journal, gen, {ZoneKind::kJournal, 0, 3, uuid, t0});
  encode_journal(journal, gen, {1, t0, JournalOp::kWrite, 4096, 512}, Codec::kNone,
                 std::span<const uint8_t>(data).first(512));
  encode_journal(journal, gen, {2, t0 + 1, JournalOp::kWrite, 8192, 4096}, Codec::kZstd,
                 zstd_compress(data, 3));
  encode_journal(journal, gen, {3, t0 + 2, JournalOp::kWriteZeroes, 0, 65536}, Codec::kNone, {});
  encode_journal(journal, gen, {4, t0 + 3, JournalOp::kTrim, 65536, 65536}, Codec::kNone, {});
  encode_marker(journal, gen, {MarkerKind::kRetention, 2, t0 + 1});
  pad_to_block(journal, gen);
  write(out, t, "zone_journal", cat(header(0, gen), journal));
  write(out, t, "zone_journal_sealed", cat(header(2, gen), journal));
  write(out, t, "zone_journal_any_gen", cat(header(0, 0), journal));
  write(out, t, "zone_journal_torn", cat(header(0, gen), Bytes(journal.begin(), journal.begin() + 700)));

  Bytes versions;
  const Bytes segment = [&] {
    Bytes s(65536);
    for (size_t i = 0; i < s.size(); ++i) s[i] = static_cast<uint8_t>(i / 1024);
    return s;
  }();
  Bytes changed = segment;
  std::fill(changed.begin() + 1000, changed.begin() + 1100, 0xee);
  encode_zone_header(versions, gen, {ZoneKind::kVersions, 1, 9, uuid, t0});
  encode_version(versions, gen, {5, 10, t0, 65536, 1, 0, 0, xxh64(segment)}, zstd_compress(segment, 3));
  encode_version(versions, gen, {5, 20, t0 + 5, 65536, 1, 1, 10, xxh64(changed)},
                 zstd_compress(changed, 3, segment));
  encode_marker(versions, gen, {MarkerKind::kRestart, 21, t0 + 6});
  pad_to_block(versions, gen);
  write(out, t, "zone_versions", cat(header(0, gen), versions));

  Bytes other;
  encode_zone_header(other, gen, {ZoneKind::kCheckpoint, 0, 1, uuid, t0});
  encode_checkpoint(other, gen, {3, 0, 2}, Bytes(40, 0xc1));
  encode_checkpoint(other, gen, {3, 1, 2}, Bytes(24, 0xc2));
  Bytes entries(2 * 40);
  for (size_t i = 0; i < entries.size(); ++i) entries[i] = static_cast<uint8_t>(i);
  encode_history(other, gen, {2}, entries);
  pad_to_block(other, gen);
  write(out, t, "zone_checkpoint_history", cat(header(0, gen), other));

  Superblock sb;
  sb.pool_uuid = uuid;
  sb.tier = 0;
  sb.tier_count = 2;
  sb.primary_id = "/var/lib/shadowd/disk.img";
  sb.primary_bytes = 1ull << 30;
  sb.segment_bytes = 256u << 10;
  sb.zone_bytes = kDefaultZoneBytes;
  sb.zone_count = 60;
  sb.epoch_ns = t0;
  sb.generation = 41;
  write(out, t, "superblock", cat(header(1, 0), encode_superblock(sb)));
  sb.checkpoint_id = 3;
  sb.checkpoint_zones = {1, 4};
  sb.checkpoint_zone_gens = {6, 7};
  sb.generation = 42;
  write(out, t, "superblock_checkpoint", cat(header(3, 0), encode_superblock(sb)));
}

// A gzip file of `text`, as gzip(1) writes one.
Bytes gzip(std::string_view text) {
  z_stream z{};
  if (deflateInit2(&z, 9, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK) std::exit(1);
  Bytes out(deflateBound(&z, text.size()) + 32);
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(text.data()));
  z.avail_in = static_cast<uInt>(text.size());
  z.next_out = out.data();
  z.avail_out = static_cast<uInt>(out.size());
  if (deflate(&z, Z_FINISH) != Z_STREAM_END) std::exit(1);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

void traces(const Out& out) {
  // 2026-11-30T00:00:00Z in Windows filetime ticks, as in test_trace.cc.
  const std::string ticks = "134404736000000000";
  const std::string msr = ticks + ",pg,0,Write,8192,4096,0\n" + ticks.substr(0, 16) +
                          "15,pg,0,Read,0,65536,12\n" + ticks + ",pg,0,write,4096,0,0\n";
  write(out, "trace_msr", "msr", msr);
  write(out, "trace_msr", "msr_crlf_no_final_newline",
        ticks + ",web,1,Read,512,512,3\r\n" + ticks + ",web,1,READ,0,1,3");
  // Only this target starts with a gzip input: reading through a file costs
  // ten times what reading text does (trace_fuzz.h), and one target covers it.
  write(out, "trace_msr", "msr.gz", gzip(msr));

  // fio and fstrim on an NVMe namespace: every event type, then the summary.
  const std::string blk =
      "259,0    0        1     0.000000000  4162  Q  WS 1050624 + 1024 [fio]\n"
      "259,0    0        2     0.000003515  4162  G  WS 1050624 + 1024 [fio]\n"
      "259,0    0        3     0.000012873  4162  I  WS 1050624 + 1024 [fio]\n"
      "259,0    0        4     0.000016054  4162  D  WS 1050624 + 1024 [fio]\n"
      "259,0    1        5     0.000812340     0  C  WS 1050624 + 1024 [0]\n"
      "259,0    1        6     0.013007662  4163  Q  RA 2097152 + 256 [fio]\n"
      "259,0    1        7     0.013010019  4163  M  RA 2097408 + 8 [fio]\n"
      "259,0    0        8     0.020441123  1201  Q FWFS [kworker/0:1H]\n"
      "259,0    0        9     1.500000000   881  Q  DS 0 + 8388608 [fstrim]\n"
      "259,0    0       10     1.500100000   881  Q   N [fio]\n"
      "CPU0 (259,0):\n"
      " Reads Queued:           1,      128KiB\t Writes Queued:           2,        4GiB\n"
      "Total (259,0):\n"
      "Throughput (R/W): 85KiB/s / 341KiB/s\n"
      "Events (259,0): 10 entries\n";
  write(out, "trace_blkparse", "blkparse", blk);

  const std::string hist =
      "timestamp,segment,op,count,bytes\n"
      "1796000000,3,write,4,16384\n"
      "1796000060,0,read,1,262144\n"
      "1796000120,4095,read,1000,4096000\n";
  write(out, "trace_history", "history", hist);
  write(out, "trace_history", "history_no_header", "60,1,write,2,8192\r\n120,2,read,1,1\n");
}

}  // namespace
}  // namespace shadowd::fuzz

int main(int argc, char** argv) {
  using namespace shadowd::fuzz;
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR   (e.g. tests/fuzz/corpus)\n", argv[0]);
    return 2;
  }
  const Out out{argv[1]};
  nbd_handshake(out);
  nbd_request(out);
  control_protocol(out);
  pool_record(out);
  traces(out);
  std::printf("make_corpus: wrote the seeds under %s\n", argv[1]);
  return 0;
}
