// The body of the trace fuzz targets (trace_msr.cc, trace_blkparse.cc,
// trace_history.cc): one input is one trace file, read by core/trace.h as
// `shadowctl simulate` reads it, in the target's format and detected.
//
// An input is read from memory (read_text), or, if it starts with the gzip
// magic, from a file (read_file through a memfd: zlib inflates it). Opening
// a file costs ten times what reading the text does, so plain inputs take
// the quick way (read_lines() is the same for both; test_trace.cc checks
// that they agree) and only trace_msr has a gzip seed. History traces are read with two option sets:
// the default (256 KiB segments, 1-minute buckets) and 1 MiB segments with
// 1-day buckets.
//
// Invariants: a request covers at least one byte and does not wrap past
// 2^64; a blkparse or history request's time is not negative; a history
// request lies at the start of its segment and is at most a segment long;
// the stats count what the sink saw.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "core/trace.h"
#include "tests/fuzz/fuzz_util.h"

namespace shadowd::trace::fuzz {

// A history row asks for up to a billion requests; past this many the
// sink stops the read (by throwing, which read_* let pass), so that one
// input cannot take minutes.
constexpr uint64_t kMaxRequests = 1u << 17;
struct Enough {};

// What the format promises of each request (kAuto: what every format does).
inline void check_request(const Request& r, Format f, const ReadOptions& o) {
  FUZZ_CHECK(r.length > 0 && r.offset + r.length >= r.offset);
  if (f == Format::kBlkparse || f == Format::kHistory) FUZZ_CHECK(r.time_ns >= 0);
  if (f == Format::kHistory) {
    FUZZ_CHECK(r.offset % o.history_segment_bytes == 0 && r.length <= o.history_segment_bytes);
  }
}

// Runs one read; checks each request as it arrives (the forced-format read
// of the same input checks what a detected format promises), and the stats.
template <typename ReadFn>
void read_with(const ReadOptions& o, ReadFn read) {
  uint64_t requests = 0;
  const Sink sink = [&](const Request& r) {
    check_request(r, o.format, o);
    if (++requests > kMaxRequests) throw Enough{};
  };
  ReadStats st;
  Status status;
  try {
    status = read(sink, &st);
  } catch (const Enough&) {
    return;
  }
  if (!status) return;
  FUZZ_CHECK(o.format == Format::kAuto || st.format == o.format);
  FUZZ_CHECK(st.format != Format::kAuto || st.requests == 0);
  FUZZ_CHECK(st.requests == requests && st.skipped <= st.lines);
  // Every line is skipped or gives requests: one, or a history row's count.
  if (st.format == Format::kHistory) {
    FUZZ_CHECK(st.requests >= st.lines - st.skipped);
  } else {
    FUZZ_CHECK(st.requests == st.lines - st.skipped);
  }
}

// An input as a file: an anonymous memfd, named by its /proc path.
class MemFile {
 public:
  explicit MemFile(std::string_view bytes) : fd_(::memfd_create("trace", MFD_CLOEXEC)) {
    FUZZ_CHECK(fd_ >= 0);
    FUZZ_CHECK(::write(fd_, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  ~MemFile() { ::close(fd_); }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  int fd_;
  std::string path_;
};

inline void read_one(std::string_view text, const ReadOptions& o) {
  if (text.starts_with("\x1f\x8b")) {
    MemFile file(text);
    read_with(o, [&](const Sink& s, ReadStats* st) { return read_file(file.path(), o, s, st); });
  } else {
    read_with(o, [&](const Sink& s, ReadStats* st) { return read_text(text, "trace", o, s, st); });
  }
}

inline int run(Format f, const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  for (Format as : {f, Format::kAuto}) {
    ReadOptions o;
    o.format = as;
    read_one(text, o);
    if (f == Format::kHistory) {
      o.history_segment_bytes = 1u << 20;
      o.history_bucket_s = 86400;
      read_one(text, o);
    }
  }
  return 0;
}

}  // namespace shadowd::trace::fuzz
