// Block I/O traces for the shadowing simulator (`shadowctl simulate`):
// readers for the formats operators have, each turned into one stream of
// requests in file order.
//
//   msr       SNIA MSR Cambridge CSV, no header:
//             Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime
//             Timestamp in Windows filetime (100 ns ticks since 1601-01-01
//             UTC), Type Read or Write, Offset and Size in bytes.
//   blkparse  the default text output of blkparse: one event per line,
//             "MAJ,MIN CPU SEQ SECONDS PID ACTION RWBS SECTOR + COUNT [PROC]";
//             only queued (Q) events are requests; D (discard) counts as a
//             write, events without sectors (a bare flush) are skipped, and
//             the summary blkparse prints at the end is ignored.
//   history   shadowd's own `shadowctl history export --format csv`
//             ("timestamp,segment,op,count,bytes", one row per time bucket,
//             segment and op): each row becomes `count` requests of
//             bytes/count spread evenly over the bucket, at the segment's
//             start (the history keeps no finer offsets).
//
// Any file may be gzip-compressed (recognised by its magic, not its name).
// A malformed line stops the read with "FILE:LINE: what is wrong"; the sink
// has then seen the requests before it, so callers that must change nothing
// on bad input read the whole trace first.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "core/status.h"

namespace shadowd::trace {

enum class Op : uint8_t { kRead, kWrite };

struct Request {
  int64_t time_ns = 0;  // Unix time for msr; seconds since the trace's clock origin otherwise
  Op op = Op::kRead;
  uint64_t offset = 0;
  uint64_t length = 0;
};

enum class Format : uint8_t { kAuto, kMsr, kBlkparse, kHistory };

// "msr", "blkparse", "history", "auto".
Result<Format> parse_format(std::string_view name);
std::string_view format_name(Format f);

// The format of a trace from its first non-blank line (kAuto: not known).
Format detect(std::string_view first_line);

struct ReadOptions {
  Format format = Format::kAuto;
  uint64_t history_segment_bytes = 256 * 1024;  // segment size of a history export
  uint32_t history_bucket_s = 60;               // its time bucket
};

struct ReadStats {
  Format format = Format::kAuto;  // as detected
  uint64_t lines = 0;
  uint64_t requests = 0;
  uint64_t skipped = 0;      // lines that are not requests (other blkparse events, summary, header)
  uint64_t file_bytes = 0;   // bytes of the file (compressed size for gzip)
};

using Sink = std::function<void(const Request&)>;
// Called every so often with bytes read from the file so far (compressed
// bytes for gzip) and the file's size, for a progress bar.
using Progress = std::function<void(uint64_t done, uint64_t total)>;

Status read_file(const std::string& path, const ReadOptions& opts, const Sink& sink,
                 ReadStats* stats = nullptr, const Progress& progress = nullptr);
// The same for a trace already in memory (plain text; gzip is not
// recognised here): lines, detection, stats and errors as read_file() gives
// them, with `name` in place of the path (file_bytes = text.size()).
Status read_text(std::string_view text, const std::string& name, const ReadOptions& opts, const Sink& sink,
                 ReadStats* stats = nullptr);

// Parse one line of a known format (no trailing newline). Returns true with
// *req set for a request, false for a line that is not one (skipped);
// an error for a malformed line (the message has no file or line number).
Result<bool> parse_line(Format f, std::string_view line, const ReadOptions& opts, Request* req,
                        uint32_t* repeat);

}  // namespace shadowd::trace
