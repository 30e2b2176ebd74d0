#include "core/trace.h"

#include <sys/stat.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace shadowd::trace {
namespace {

// Windows filetime of the Unix epoch (100 ns ticks since 1601-01-01).
constexpr int64_t kFiletimeUnixEpoch = 116444736000000000LL;
// Times become int64 nanoseconds: at most this many seconds (year 2262 for
// Unix time), and for msr as many 100 ns ticks either side of 1970.
constexpr int64_t kMaxSeconds = INT64_MAX / 1'000'000'000;
constexpr int64_t kMaxTicksFromUnixEpoch = INT64_MAX / 100;

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i]))) {
      return false;
    }
  }
  return true;
}

template <typename T>
bool to_num(std::string_view s, T& v) {
  s = trim(s);
  if (s.empty()) return false;
  const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

// Split on `sep` (at most `max` fields; the last takes the rest).
std::vector<std::string_view> split(std::string_view s, char sep, size_t max = 64) {
  std::vector<std::string_view> out;
  while (out.size() + 1 < max) {
    const size_t p = s.find(sep);
    if (p == std::string_view::npos) break;
    out.push_back(s.substr(0, p));
    s.remove_prefix(p + 1);
  }
  out.push_back(s);
  return out;
}

std::vector<std::string_view> words(std::string_view s) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r')) ++i;
    const size_t b = i;
    while (i < s.size() && s[i] != ' ' && s[i] != '\t' && s[i] != '\r') ++i;
    if (i > b) out.push_back(s.substr(b, i - b));
  }
  return out;
}

bool is_device(std::string_view w) {  // "8,0"
  const size_t c = w.find(',');
  if (c == std::string_view::npos || c == 0 || c + 1 == w.size()) return false;
  uint32_t a, b;
  return to_num(w.substr(0, c), a) && to_num(w.substr(c + 1), b);
}

Result<bool> parse_msr(std::string_view line, Request* req) {
  const auto f = split(line, ',');
  if (f.size() != 7) {
    return Status::invalid("expected 7 comma-separated fields (Timestamp,Hostname,DiskNumber,Type,Offset,Size,"
                           "ResponseTime), found " + std::to_string(f.size()));
  }
  int64_t ticks;
  if (!to_num(f[0], ticks) || ticks < 0) return Status::invalid("Timestamp is not a filetime: '" + std::string(f[0]) + "'");
  // ticks >= 0, so the difference cannot overflow.
  if (ticks - kFiletimeUnixEpoch > kMaxTicksFromUnixEpoch || ticks - kFiletimeUnixEpoch < -kMaxTicksFromUnixEpoch) {
    return Status::invalid("Timestamp is out of range (years 1677..2262): '" + std::string(f[0]) + "'");
  }
  const std::string_view type = trim(f[3]);
  if (iequals(type, "Read")) {
    req->op = Op::kRead;
  } else if (iequals(type, "Write")) {
    req->op = Op::kWrite;
  } else {
    return Status::invalid("Type must be Read or Write, not '" + std::string(type) + "'");
  }
  if (!to_num(f[4], req->offset)) return Status::invalid("Offset is not a byte count: '" + std::string(f[4]) + "'");
  if (!to_num(f[5], req->length)) return Status::invalid("Size is not a byte count: '" + std::string(f[5]) + "'");
  if (req->offset + req->length < req->offset) return Status::invalid("Offset + Size overflows");
  req->time_ns = (ticks - kFiletimeUnixEpoch) * 100;
  return req->length > 0;
}

Result<bool> parse_blkparse(std::string_view line, Request* req) {
  const auto w = words(line);
  if (w.empty() || !is_device(w[0])) return false;  // summary, headers, blank
  if (w.size() < 7) return Status::invalid("an event line needs at least 7 fields, found " + std::to_string(w.size()));
  if (w[5] != "Q") return false;  // only queued requests count
  double secs;
  // from_chars reads "nan" and "inf" too: both fail this test.
  if (!to_num(w[3], secs) || !(secs >= 0 && secs <= static_cast<double>(kMaxSeconds))) {
    return Status::invalid("time is not seconds (0.." + std::to_string(kMaxSeconds) + "): '" + std::string(w[3]) + "'");
  }
  const std::string_view rwbs = w[6];
  const bool discard = rwbs.find('D') != std::string_view::npos;
  const bool write = rwbs.find('W') != std::string_view::npos;
  const bool read = rwbs.find('R') != std::string_view::npos;
  if (!discard && !write && !read) {
    if (rwbs.find('F') != std::string_view::npos || rwbs.find('N') != std::string_view::npos) return false;
    return Status::invalid("RWBS '" + std::string(rwbs) + "' is neither a read, a write nor a discard");
  }
  if (w.size() < 10 || w[8] != "+") {
    // A flush or barrier queued without sectors.
    if (w.size() == 7 || (w.size() >= 8 && w[7].front() == '[')) return false;
    return Status::invalid("expected 'SECTOR + COUNT' after RWBS");
  }
  uint64_t sector, count;
  if (!to_num(w[7], sector)) return Status::invalid("sector is not a number: '" + std::string(w[7]) + "'");
  if (!to_num(w[9], count)) return Status::invalid("sector count is not a number: '" + std::string(w[9]) + "'");
  req->op = (write || discard) ? Op::kWrite : Op::kRead;
  if (__builtin_mul_overflow(sector, 512, &req->offset) || __builtin_mul_overflow(count, 512, &req->length) ||
      req->offset + req->length < req->offset) {
    return Status::invalid("SECTOR + COUNT is past 2^64 bytes");
  }
  req->time_ns = static_cast<int64_t>(secs * 1e9 + 0.5);
  return req->length > 0;
}

Result<bool> parse_history(std::string_view line, const ReadOptions& o, Request* req, uint32_t* repeat) {
  if (trim(line).starts_with("timestamp,")) return false;  // the header
  const auto f = split(line, ',');
  if (f.size() != 5) {
    return Status::invalid("expected 5 comma-separated fields (timestamp,segment,op,count,bytes), found " +
                           std::to_string(f.size()));
  }
  int64_t t;
  uint64_t seg, count, bytes;
  if (!to_num(f[0], t) || t < 0) return Status::invalid("timestamp is not seconds: '" + std::string(f[0]) + "'");
  // Its requests are spread over the bucket that starts at t.
  if (t > kMaxSeconds - int64_t{o.history_bucket_s}) {
    return Status::invalid("timestamp is out of range (past the year 2262): '" + std::string(f[0]) + "'");
  }
  if (!to_num(f[1], seg)) return Status::invalid("segment is not a number: '" + std::string(f[1]) + "'");
  const std::string_view op = trim(f[2]);
  if (op == "read") {
    req->op = Op::kRead;
  } else if (op == "write") {
    req->op = Op::kWrite;
  } else {
    return Status::invalid("op must be read or write, not '" + std::string(op) + "'");
  }
  if (!to_num(f[3], count) || count == 0 || count > 1'000'000'000) {
    return Status::invalid("count is not a positive number: '" + std::string(f[3]) + "'");
  }
  if (!to_num(f[4], bytes)) return Status::invalid("bytes is not a number: '" + std::string(f[4]) + "'");
  req->time_ns = t * 1'000'000'000LL;
  req->length = std::max<uint64_t>(1, std::min<uint64_t>(bytes / count, o.history_segment_bytes));
  if (__builtin_mul_overflow(seg, o.history_segment_bytes, &req->offset) || req->offset + req->length < req->offset) {
    return Status::invalid("segment is past 2^64 bytes: '" + std::string(f[1]) + "'");
  }
  *repeat = static_cast<uint32_t>(count);
  return true;
}

// Where read_lines() gets its lines from.
class LineSource {
 public:
  virtual ~LineSource() = default;
  // The next line without its '\n': false at the end; an error status if
  // the source failed. A last line without '\n' counts; nothing after a
  // final '\n' does.
  virtual Result<bool> next(std::string& line) = 0;
  // Bytes of the source consumed so far (compressed bytes for gzip).
  virtual uint64_t offset() const = 0;
};

// Lines of a file, gzip or not (zlib reads both).
class LineReader final : public LineSource {
 public:
  explicit LineReader(gzFile f) : f_(f) {}
  ~LineReader() override {
    if (f_ != nullptr) gzclose(f_);
  }
  Result<bool> next(std::string& line) override {
    line.clear();
    for (;;) {
      if (pos_ == end_) {
        const int n = gzread(f_, buf_.data(), static_cast<unsigned>(buf_.size()));
        if (n < 0) {
          int err;
          const char* msg = gzerror(f_, &err);
          return Status::io_error(std::string("decompressing: ") + (msg ? msg : "zlib error"));
        }
        if (n == 0) return !line.empty();
        pos_ = 0;
        end_ = static_cast<size_t>(n);
      }
      const char* b = buf_.data() + pos_;
      const void* nl = std::memchr(b, '\n', end_ - pos_);
      if (nl == nullptr) {
        line.append(b, end_ - pos_);
        pos_ = end_;
        continue;
      }
      const size_t n = static_cast<const char*>(nl) - b;
      line.append(b, n);
      pos_ += n + 1;
      return true;
    }
  }
  uint64_t offset() const override { return static_cast<uint64_t>(gzoffset(f_)); }

 private:
  gzFile f_;
  std::array<char, 1 << 16> buf_{};
  size_t pos_ = 0, end_ = 0;
};

// Lines of a trace held in memory, split as LineReader splits a file.
class TextLines final : public LineSource {
 public:
  explicit TextLines(std::string_view text) : text_(text) {}
  Result<bool> next(std::string& line) override {
    if (pos_ == text_.size()) {
      line.clear();
      return false;
    }
    const size_t nl = text_.find('\n', pos_);
    const size_t end = nl == std::string_view::npos ? text_.size() : nl;
    line.assign(text_.substr(pos_, end - pos_));
    pos_ = nl == std::string_view::npos ? end : end + 1;
    return true;
  }
  uint64_t offset() const override { return pos_; }

 private:
  std::string_view text_;
  size_t pos_ = 0;
};

// The reading loop shared by read_file() and read_text(): detection, parsing,
// history rows spread over their bucket, errors as "NAME:LINE: what".
Status read_lines(LineSource& src, const std::string& name, uint64_t total_bytes, const ReadOptions& opts,
                  const Sink& sink, ReadStats* stats, const Progress& progress) {
  ReadStats st;
  st.file_bytes = total_bytes;
  Format fmt = opts.format;
  std::string line;
  uint64_t next_progress = 0;
  for (;;) {
    auto more = src.next(line);
    if (!more) return Status::error(more.status().code(), name + ": " + more.status().message(), EIO);
    if (!*more) break;
    ++st.lines;
    if (fmt == Format::kAuto) {
      if (trim(line).empty()) {
        ++st.skipped;
        continue;
      }
      fmt = detect(line);
      if (fmt == Format::kAuto) {
        return Status::invalid(name + ":" + std::to_string(st.lines) +
                               ": cannot tell the trace format from this line; give --format");
      }
    }
    Request req;
    uint32_t repeat = 1;
    auto r = parse_line(fmt, line, opts, &req, &repeat);
    if (!r) {
      return Status::invalid(name + ":" + std::to_string(st.lines) + ": " + r.status().message());
    }
    if (!*r) {
      ++st.skipped;
      continue;
    }
    if (repeat <= 1) {
      sink(req);
      ++st.requests;
    } else {
      // History rows: spread the count over the bucket, at t0 + span * k / repeat
      // (computed so that nothing overflows: span * k may not fit in 64 bits).
      const int64_t span = static_cast<int64_t>(opts.history_bucket_s) * 1'000'000'000LL;
      const int64_t t0 = req.time_ns;
      const int64_t step = span / repeat, rest = span % repeat;
      for (uint32_t k = 0; k < repeat; ++k) {
        req.time_ns = t0 + step * k + rest * k / repeat;
        sink(req);
      }
      st.requests += repeat;
    }
    if (progress && (st.lines & 0xfff) == 0) {
      const uint64_t done = src.offset();
      if (done >= next_progress) {
        progress(done, st.file_bytes);
        next_progress = done + st.file_bytes / 200;
      }
    }
  }
  if (progress) progress(st.file_bytes, st.file_bytes);
  st.format = fmt;
  if (stats) *stats = st;
  return Status::ok();
}

}  // namespace

Result<Format> parse_format(std::string_view name) {
  if (name == "auto") return Format::kAuto;
  if (name == "msr") return Format::kMsr;
  if (name == "blkparse") return Format::kBlkparse;
  if (name == "history") return Format::kHistory;
  return Status::invalid("unknown trace format '" + std::string(name) + "' (msr, blkparse, history or auto)");
}

std::string_view format_name(Format f) {
  switch (f) {
    case Format::kMsr:
      return "msr";
    case Format::kBlkparse:
      return "blkparse";
    case Format::kHistory:
      return "history";
    default:
      return "auto";
  }
}

Format detect(std::string_view line) {
  line = trim(line);
  if (line.starts_with("timestamp,segment,op")) return Format::kHistory;
  const auto w = words(line);
  if (!w.empty() && is_device(w[0]) && w.size() >= 7) return Format::kBlkparse;
  const auto f = split(line, ',');
  if (f.size() == 7) {
    const std::string_view type = trim(f[3]);
    if (iequals(type, "Read") || iequals(type, "Write")) return Format::kMsr;
  }
  if (f.size() == 5 && (trim(f[2]) == "read" || trim(f[2]) == "write")) return Format::kHistory;
  return Format::kAuto;
}

Result<bool> parse_line(Format f, std::string_view line, const ReadOptions& opts, Request* req, uint32_t* repeat) {
  *repeat = 1;
  if (trim(line).empty()) return false;
  switch (f) {
    case Format::kMsr:
      return parse_msr(line, req);
    case Format::kBlkparse:
      return parse_blkparse(line, req);
    case Format::kHistory:
      return parse_history(line, opts, req, repeat);
    default:
      return Status::invalid("no trace format");
  }
}

Status read_file(const std::string& path, const ReadOptions& opts, const Sink& sink, ReadStats* stats,
                 const Progress& progress) {
  struct stat stt {};
  if (::stat(path.c_str(), &stt) != 0) return Status::from_errno(errno, path);
  if (S_ISDIR(stt.st_mode)) return Status::invalid(path + ": is a directory");
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) return Status::from_errno(errno != 0 ? errno : EIO, path);
  gzbuffer(f, 1 << 17);
  LineReader lr(f);
  return read_lines(lr, path, static_cast<uint64_t>(stt.st_size), opts, sink, stats, progress);
}

Status read_text(std::string_view text, const std::string& name, const ReadOptions& opts, const Sink& sink,
                 ReadStats* stats) {
  TextLines lines(text);
  return read_lines(lines, name, text.size(), opts, sink, stats, nullptr);
}

}  // namespace shadowd::trace
