// The parts of `shadowctl restore` (and `export`) that need neither the
// daemon nor NBD: which byte ranges are done and which to copy next, the
// state file that makes an interrupted restore resumable, zero detection,
// the checks on the output before anything is written, progress figures, and
// the hints printed for a point-in-time export's NBD URI.
//
// The state file PATH + kRestoreStateSuffix (JSON, replaced atomically by
// rename) exists exactly while PATH is an incomplete restore:
//   {"format":"shadowd-restore","version":1,
//    "at":"-1h","at_ns":1795000000000000000,   (or "at_seq":N: the spec sent)
//    "seq":48213,"time_ns":...,"time":"2026-...Z",  (what the export shows)
//    "size_bytes":...,"segment_bytes":...,"chunk_bytes":...,
//    "done":[[begin,end],...],   byte ranges durably written to PATH, merged
//    "done_bytes":...,"zero_bytes":...,"started_ns":...,"updated_ns":...}
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "ctl/protocol.h"

namespace shadowd::ctl {

inline constexpr const char* kRestoreStateSuffix = ".shadowd-restore";
inline constexpr const char* kRestoreStateFormat = "shadowd-restore";
inline constexpr int kRestoreStateVersion = 1;
// One NBD read; also the unit the rest of the device (after the hot
// segments) is cut into.
inline constexpr uint64_t kRestoreChunkBytes = uint64_t{4} << 20;

struct ByteRange {
  uint64_t begin = 0;
  uint64_t end = 0;  // exclusive
  uint64_t bytes() const { return end - begin; }
  bool operator==(const ByteRange&) const = default;
};

// Byte ranges, kept sorted, disjoint and merged (touching ranges join).
class RangeSet {
 public:
  // REQUIRES: begin <= end (an empty range is ignored).
  void add(uint64_t begin, uint64_t end);
  void remove(uint64_t begin, uint64_t end);
  // True when all of [begin, end) is in the set (an empty range always is).
  bool contains(uint64_t begin, uint64_t end) const;
  // The parts of [begin, end) not in the set, in order.
  std::vector<ByteRange> gaps(uint64_t begin, uint64_t end) const;
  uint64_t bytes() const;
  bool empty() const { return ranges_.empty(); }
  const std::vector<ByteRange>& ranges() const { return ranges_; }
  bool operator==(const RangeSet&) const = default;

 private:
  std::vector<ByteRange> ranges_;
};

// The order to copy [0, size_bytes) in: the hot segments first, in the order
// given (ids past the end and repeats are skipped), then everything else in
// offset order, cut at multiples of chunk_bytes. Nothing in `done` is
// planned, nothing twice, and no range is longer than chunk_bytes.
// REQUIRES: segment_bytes > 0, chunk_bytes > 0.
std::vector<ByteRange> plan_copy(uint64_t size_bytes, uint64_t segment_bytes, uint64_t chunk_bytes,
                                 const std::vector<uint64_t>& hot_segments, const RangeSet& done);

// True when all `n` bytes at `p` are zero.
bool is_all_zero(const void* p, size_t n);

// Zero detection within a chunk, per kZeroGranuleBytes: small enough that
// scattered data still leaves most of a sparse device as holes.
inline constexpr uint64_t kZeroGranuleBytes = uint64_t{64} << 10;
struct ZeroRun {
  uint64_t offset = 0;  // from the start of the buffer
  uint64_t bytes = 0;
  bool zero = false;
  bool operator==(const ZeroRun&) const = default;
};
// `n` bytes at `p` as alternating runs of data and zeroes, each a whole
// number of granules (but the last), neighbours joined. REQUIRES: granule > 0.
std::vector<ZeroRun> zero_runs(const void* p, uint64_t n, uint64_t granule = kZeroGranuleBytes);

// ---- the state file ----

struct RestoreState {
  std::string at;                  // the --at text as the user gave it
  std::optional<int64_t> at_ns;    // the spec sent to the daemon: a time ...
  std::optional<uint64_t> at_seq;  // ... or a sequence number
  uint64_t seq = 0;                // the journal sequence number restored
  int64_t time_ns = 0;             // and its time
  uint64_t size_bytes = 0;
  uint64_t segment_bytes = 0;
  uint64_t chunk_bytes = 0;
  RangeSet done;            // written to the output and synced
  uint64_t zero_bytes = 0;  // of `done`, bytes that were zeroes
  int64_t started_ns = 0;
  int64_t updated_ns = 0;
};

std::string restore_state_path(const std::string& output);
json encode_state(const RestoreState& s);
// The state, or why `j` is not a usable state (wrong format or version,
// missing fields, ranges outside the size).
std::variant<RestoreState, std::string> decode_state(const json& j);

// Writes `s` to `path` atomically: a temporary file beside it, fsync,
// rename, fsync of the directory. Returns an error message on failure (the
// old file, if any, is then unchanged).
std::optional<std::string> save_state(const std::string& path, const RestoreState& s);

struct LoadedState {
  bool exists = false;
  std::optional<RestoreState> state;  // when it exists and is readable
  std::string error;                  // when it exists and is not
};
LoadedState load_state(const std::string& path);

// ---- the output, before anything is written ----

enum class TargetKind { kMissing, kRegular, kBlockDevice, kOther };
enum class TargetAction {
  kCreate,     // a new regular file
  kTruncate,   // an existing regular file, emptied first (--force or empty)
  kResume,     // continue the restore the state file describes
  kOverwrite,  // a block device
};
struct TargetFacts {
  TargetKind kind = TargetKind::kMissing;
  uint64_t size_bytes = 0;  // file size, or block device size
  bool state_exists = false;
};
// What to do with the output `path` (whose state file is `state_path`), or
// why not (a message naming the way on: --resume or --force). Needs no
// export yet.
std::variant<TargetAction, std::string> decide_target(const std::string& path,
                                                      const std::string& state_path,
                                                      const TargetFacts& facts, bool resume,
                                                      bool force);
// With the export's size known: nullopt, or why the output cannot take it
// (a block device that is too small; a resumed file of another size).
std::optional<std::string> check_target_size(const std::string& path, const TargetFacts& facts,
                                             TargetAction action, uint64_t need_bytes);
// A state file read for --resume against the new export: nullopt, or why
// the two do not belong together.
std::optional<std::string> check_resume(const RestoreState& s, uint64_t seq, uint64_t size_bytes);

// ---- progress ----

struct Progress {
  uint64_t done_bytes = 0;  // of the whole device, including earlier runs
  uint64_t total_bytes = 0;
  double percent = 0;
  double rate_bytes_per_s = 0;  // this run's bytes over this run's time
  std::optional<double> eta_s;  // none until there is a rate
};
// REQUIRES: run_bytes <= done_bytes.
Progress measure_progress(uint64_t done_bytes, uint64_t total_bytes, uint64_t run_bytes,
                          double elapsed_s);
// "restoring   42.0 %  1.50 GiB of 4 GiB  118.3 MiB/s  ETA 23s"
std::string format_progress_line(std::string_view label, const Progress& p);
// {"progress":{"done_bytes","total_bytes","percent","rate_bytes_per_s","eta_s"}}
// (eta_s null while unknown); `phase` ("copy", "verify") is added beside.
json progress_json(std::string_view phase, const Progress& p);
// 123456789.0 -> "117.7 MiB/s"
std::string format_mib_per_s(double bytes_per_s);

// ---- reaching an export ----

struct NbdUri {
  bool is_unix = false;
  std::string socket;  // nbd+unix: the socket path
  std::string host;    // nbd: host (without [] for IPv6) and port
  std::string port;
  std::string name;  // the export name (percent-decoded)
};
// nbd+unix:///NAME?socket=PATH or nbd://HOST[:PORT]/NAME; nullopt otherwise.
std::optional<NbdUri> parse_nbd_uri(std::string_view uri);
// Shell lines that reach a read-only export at `uri` (nbdinfo, nbd-client,
// nbdfuse + mount -o ro), in that order.
std::vector<std::string> access_hints(const std::string& uri);
// `s` as one shell word: as it is when safe, else in single quotes.
std::string shell_quote(const std::string& s);

}  // namespace shadowd::ctl
