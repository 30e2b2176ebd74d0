#include "ctl/restore.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>

#include "ctl/format.h"

namespace shadowd::ctl {

// ------------------------------------------------------------- RangeSet

void RangeSet::add(uint64_t begin, uint64_t end) {
  if (begin >= end) return;
  // The first range that ends at or after `begin` may touch the new one.
  auto first = std::lower_bound(ranges_.begin(), ranges_.end(), begin,
                                [](const ByteRange& r, uint64_t b) { return r.end < b; });
  auto last = first;
  while (last != ranges_.end() && last->begin <= end) {
    begin = std::min(begin, last->begin);
    end = std::max(end, last->end);
    ++last;
  }
  first = ranges_.erase(first, last);
  ranges_.insert(first, ByteRange{begin, end});
}

void RangeSet::remove(uint64_t begin, uint64_t end) {
  if (begin >= end) return;
  std::vector<ByteRange> out;
  out.reserve(ranges_.size() + 1);
  for (const ByteRange& r : ranges_) {
    if (r.end <= begin || r.begin >= end) {
      out.push_back(r);
      continue;
    }
    if (r.begin < begin) out.push_back({r.begin, begin});
    if (r.end > end) out.push_back({end, r.end});
  }
  ranges_ = std::move(out);
}

bool RangeSet::contains(uint64_t begin, uint64_t end) const {
  if (begin >= end) return true;
  auto it = std::upper_bound(ranges_.begin(), ranges_.end(), begin,
                             [](uint64_t b, const ByteRange& r) { return b < r.end; });
  return it != ranges_.end() && it->begin <= begin && it->end >= end;
}

std::vector<ByteRange> RangeSet::gaps(uint64_t begin, uint64_t end) const {
  std::vector<ByteRange> out;
  uint64_t at = begin;
  auto it = std::upper_bound(ranges_.begin(), ranges_.end(), begin,
                             [](uint64_t b, const ByteRange& r) { return b < r.end; });
  for (; it != ranges_.end() && at < end; ++it) {
    if (it->begin >= end) break;
    if (it->begin > at) out.push_back({at, it->begin});
    at = std::max(at, it->end);
  }
  if (at < end) out.push_back({at, end});
  return out;
}

uint64_t RangeSet::bytes() const {
  uint64_t n = 0;
  for (const ByteRange& r : ranges_) n += r.bytes();
  return n;
}

// ------------------------------------------------------------- planning

std::vector<ByteRange> plan_copy(uint64_t size_bytes, uint64_t segment_bytes, uint64_t chunk_bytes,
                                 const std::vector<uint64_t>& hot_segments, const RangeSet& done) {
  std::vector<ByteRange> plan;
  RangeSet planned = done;
  const uint64_t segments = (size_bytes + segment_bytes - 1) / segment_bytes;
  for (uint64_t id : hot_segments) {
    if (id >= segments) continue;
    const uint64_t begin = id * segment_bytes;
    const uint64_t end = std::min(size_bytes, begin + segment_bytes);
    for (const ByteRange& g : planned.gaps(begin, end)) {
      for (uint64_t at = g.begin; at < g.end; at += chunk_bytes) {
        plan.push_back({at, std::min(g.end, at + chunk_bytes)});
      }
    }
    planned.add(begin, end);
  }
  for (const ByteRange& g : planned.gaps(0, size_bytes)) {
    for (uint64_t at = g.begin; at < g.end;) {
      const uint64_t next = std::min(g.end, (at / chunk_bytes + 1) * chunk_bytes);
      plan.push_back({at, next});
      at = next;
    }
  }
  return plan;
}

bool is_all_zero(const void* p, size_t n) {
  const auto* b = static_cast<const unsigned char*>(p);
  // Check a short head byte by byte, then compare the buffer with itself
  // shifted by that head: memcmp is vectorised, a loop here would not be.
  constexpr size_t kHead = 16;
  const size_t head = std::min(n, kHead);
  for (size_t i = 0; i < head; ++i) {
    if (b[i] != 0) return false;
  }
  return n <= kHead || std::memcmp(b, b + kHead, n - kHead) == 0;
}

std::vector<ZeroRun> zero_runs(const void* p, uint64_t n, uint64_t granule) {
  const auto* b = static_cast<const unsigned char*>(p);
  std::vector<ZeroRun> runs;
  for (uint64_t at = 0; at < n; at += granule) {
    const uint64_t len = std::min(granule, n - at);
    const bool zero = is_all_zero(b + at, len);
    if (!runs.empty() && runs.back().zero == zero) {
      runs.back().bytes += len;
    } else {
      runs.push_back({at, len, zero});
    }
  }
  return runs;
}

// ----------------------------------------------------------- state file

std::string restore_state_path(const std::string& output) { return output + kRestoreStateSuffix; }

json encode_state(const RestoreState& s) {
  json done = json::array();
  for (const ByteRange& r : s.done.ranges()) done.push_back({r.begin, r.end});
  json j = {{"format", kRestoreStateFormat},
            {"version", kRestoreStateVersion},
            {"at", s.at},
            {"seq", s.seq},
            {"time_ns", s.time_ns},
            {"time", format_utc_ns(s.time_ns)},
            {"size_bytes", s.size_bytes},
            {"segment_bytes", s.segment_bytes},
            {"chunk_bytes", s.chunk_bytes},
            {"done", std::move(done)},
            {"done_bytes", s.done.bytes()},
            {"zero_bytes", s.zero_bytes},
            {"started_ns", s.started_ns},
            {"updated_ns", s.updated_ns}};
  if (s.at_ns) j["at_ns"] = *s.at_ns;
  if (s.at_seq) j["at_seq"] = *s.at_seq;
  return j;
}

namespace {

bool get_u64(const json& j, const char* key, uint64_t& out) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_unsigned()) return false;
  out = it->get<uint64_t>();
  return true;
}

bool get_i64(const json& j, const char* key, int64_t& out) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer()) return false;
  out = it->get<int64_t>();
  return true;
}

std::optional<std::string> decode_done(const json& j, RestoreState& s) {
  auto it = j.find("done");
  if (it == j.end() || !it->is_array()) return "no \"done\" ranges";
  for (const json& r : *it) {
    if (!r.is_array() || r.size() != 2 || !r[0].is_number_unsigned() ||
        !r[1].is_number_unsigned()) {
      return "a \"done\" range is not [begin, end]";
    }
    const uint64_t b = r[0].get<uint64_t>();
    const uint64_t e = r[1].get<uint64_t>();
    if (b > e || e > s.size_bytes) {
      return "the \"done\" range [" + std::to_string(b) + ", " + std::to_string(e) +
             ") lies outside the device (" + std::to_string(s.size_bytes) + " bytes)";
    }
    s.done.add(b, e);
  }
  return std::nullopt;
}

}  // namespace

std::variant<RestoreState, std::string> decode_state(const json& j) {
  if (!j.is_object() || j.value("format", "") != kRestoreStateFormat) {
    return std::string("not a shadowctl restore state file");
  }
  if (j.value("version", 0) != kRestoreStateVersion) {
    return "state file version " + j.value("version", json()).dump() + " (this shadowctl reads " +
           std::to_string(kRestoreStateVersion) + ")";
  }
  RestoreState s;
  if (!get_u64(j, "seq", s.seq) || !get_i64(j, "time_ns", s.time_ns) ||
      !get_u64(j, "size_bytes", s.size_bytes) || !get_u64(j, "segment_bytes", s.segment_bytes) ||
      !get_u64(j, "chunk_bytes", s.chunk_bytes) || s.segment_bytes == 0 || s.chunk_bytes == 0) {
    return std::string(
        "missing or malformed seq, time_ns, size_bytes, segment_bytes or chunk_bytes");
  }
  s.at = j.value("at", "");
  int64_t at_ns = 0;
  uint64_t at_seq = 0;
  if (get_i64(j, "at_ns", at_ns)) s.at_ns = at_ns;
  if (get_u64(j, "at_seq", at_seq)) s.at_seq = at_seq;
  get_u64(j, "zero_bytes", s.zero_bytes);
  get_i64(j, "started_ns", s.started_ns);
  get_i64(j, "updated_ns", s.updated_ns);
  if (auto e = decode_done(j, s)) return *e;
  return s;
}

namespace {

std::string errno_text(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}

std::string dir_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// Writes all of `data` to a new file `tmp` and syncs it.
std::optional<std::string> write_synced(const std::string& tmp, const std::string& data) {
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return errno_text("cannot create", tmp);
  size_t off = 0;
  while (off < data.size()) {
    const ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      std::string e = errno_text("cannot write", tmp);
      ::close(fd);
      return e;
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    std::string e = errno_text("cannot sync", tmp);
    ::close(fd);
    return e;
  }
  ::close(fd);
  return std::nullopt;
}

}  // namespace

std::optional<std::string> save_state(const std::string& path, const RestoreState& s) {
  const std::string tmp = path + ".tmp";
  if (auto e = write_synced(tmp, encode_state(s).dump() + "\n")) {
    ::unlink(tmp.c_str());
    return e;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    std::string e = errno_text("cannot rename " + tmp + " to", path);
    ::unlink(tmp.c_str());
    return e;
  }
  // The rename itself is durable only once the directory is synced.
  const int dir = ::open(dir_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
  return std::nullopt;
}

LoadedState load_state(const std::string& path) {
  LoadedState out;
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    out.exists = errno != ENOENT;
    if (out.exists) out.error = errno_text("cannot read", path);
    return out;
  }
  out.exists = true;
  std::stringstream text;
  text << f.rdbuf();
  const json j = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    out.error = path + " is not valid JSON";
    return out;
  }
  auto s = decode_state(j);
  if (auto* e = std::get_if<std::string>(&s)) {
    out.error = path + ": " + *e;
    return out;
  }
  out.state = std::move(std::get<RestoreState>(s));
  return out;
}

// ---------------------------------------------------------- the output

std::variant<TargetAction, std::string> decide_target(const std::string& path,
                                                      const std::string& state,
                                                      const TargetFacts& facts, bool resume,
                                                      bool force) {
  if (facts.kind == TargetKind::kOther) {
    return path + " is neither a regular file nor a block device";
  }
  if (resume) {
    if (!facts.state_exists) {
      return "nothing to resume: there is no " + state + " (start without --resume)";
    }
    if (facts.kind == TargetKind::kMissing) {
      return path + " is gone but " + state +
             " is there; start over with --force (without --resume)";
    }
    return TargetAction::kResume;
  }
  if (facts.state_exists && !force) {
    return path + " holds an incomplete restore (" + state +
           " exists): continue it with --resume, or start over with --force";
  }
  switch (facts.kind) {
    case TargetKind::kMissing:
      return TargetAction::kCreate;
    case TargetKind::kRegular:
      if (facts.size_bytes > 0 && !force) {
        return path + " exists and is not empty (" + format_bytes(facts.size_bytes) +
               "); --force replaces its content";
      }
      return TargetAction::kTruncate;
    case TargetKind::kBlockDevice:
      if (!force) {
        return path + " is a block device (" + format_bytes(facts.size_bytes) +
               "); --force overwrites it";
      }
      return TargetAction::kOverwrite;
    case TargetKind::kOther:
      break;
  }
  return path + " is neither a regular file nor a block device";
}

std::optional<std::string> check_target_size(const std::string& path, const TargetFacts& facts,
                                             TargetAction action, uint64_t need_bytes) {
  if (facts.kind == TargetKind::kBlockDevice && facts.size_bytes < need_bytes) {
    return path + " is too small: " + std::to_string(facts.size_bytes) + " bytes (" +
           format_bytes(facts.size_bytes) + "), the restore needs " + std::to_string(need_bytes) +
           " bytes (" + format_bytes(need_bytes) + "); nothing was written";
  }
  if (action == TargetAction::kResume && facts.kind == TargetKind::kRegular &&
      facts.size_bytes != need_bytes) {
    return path + " has " + std::to_string(facts.size_bytes) +
           " bytes, the restore being resumed " + std::to_string(need_bytes) +
           "; start over with --force (without --resume)";
  }
  return std::nullopt;
}

std::optional<std::string> check_resume(const RestoreState& s, uint64_t seq, uint64_t size_bytes) {
  if (s.seq != seq) {
    return "the state file restores seq " + std::to_string(s.seq) + ", the export shows seq " +
           std::to_string(seq);
  }
  if (s.size_bytes != size_bytes) {
    return "the state file is for a device of " + std::to_string(s.size_bytes) +
           " bytes, the export has " + std::to_string(size_bytes) +
           " (was the device resized?); start over with --force";
  }
  return std::nullopt;
}

// ------------------------------------------------------------- progress

Progress measure_progress(uint64_t done_bytes, uint64_t total_bytes, uint64_t run_bytes,
                          double elapsed_s) {
  Progress p;
  p.done_bytes = done_bytes;
  p.total_bytes = total_bytes;
  p.percent = total_bytes == 0
                  ? 100.0
                  : 100.0 * static_cast<double>(done_bytes) / static_cast<double>(total_bytes);
  // Below a few milliseconds a rate is noise.
  if (elapsed_s >= 0.005) p.rate_bytes_per_s = static_cast<double>(run_bytes) / elapsed_s;
  if (done_bytes >= total_bytes) {
    p.eta_s = 0.0;
  } else if (p.rate_bytes_per_s > 0) {
    p.eta_s = static_cast<double>(total_bytes - done_bytes) / p.rate_bytes_per_s;
  }
  return p;
}

std::string format_mib_per_s(double bytes_per_s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB/s", bytes_per_s / (1024.0 * 1024.0));
  return buf;
}

std::string format_progress_line(std::string_view label, const Progress& p) {
  char pct[16];
  std::snprintf(pct, sizeof pct, "%5.1f %%", p.percent);
  const std::string eta =
      p.eta_s ? format_span(static_cast<int64_t>(*p.eta_s + 0.5)) : std::string("--");
  return std::string(label) + "  " + pct + "  " + format_bytes(p.done_bytes) + " of " +
         format_bytes(p.total_bytes) + "  " + format_mib_per_s(p.rate_bytes_per_s) + "  ETA " + eta;
}

json progress_json(std::string_view phase, const Progress& p) {
  return json{{"phase", phase},
              {"progress",
               {{"done_bytes", p.done_bytes},
                {"total_bytes", p.total_bytes},
                {"percent", p.percent},
                {"rate_bytes_per_s", p.rate_bytes_per_s},
                {"eta_s", p.eta_s ? json(*p.eta_s) : json()}}}};
}

// ------------------------------------------------------- reaching exports

namespace {

std::string percent_decode(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && std::isxdigit(static_cast<unsigned char>(s[i + 1])) &&
        std::isxdigit(static_cast<unsigned char>(s[i + 2]))) {
      out += static_cast<char>(std::stoi(std::string(s.substr(i + 1, 2)), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

}  // namespace

std::optional<NbdUri> parse_nbd_uri(std::string_view uri) {
  NbdUri u;
  constexpr std::string_view kUnix = "nbd+unix://";
  constexpr std::string_view kTcp = "nbd://";
  if (uri.substr(0, kUnix.size()) == kUnix) {
    std::string_view rest = uri.substr(kUnix.size());
    const size_t q = rest.find("?socket=");
    if (rest.empty() || rest[0] != '/' || q == std::string_view::npos) return std::nullopt;
    u.is_unix = true;
    u.name = percent_decode(rest.substr(1, q - 1));
    std::string_view sock = rest.substr(q + 8);
    sock = sock.substr(0, sock.find('&'));
    u.socket = percent_decode(sock);
    if (u.socket.empty()) return std::nullopt;
    return u;
  }
  if (uri.substr(0, kTcp.size()) != kTcp) return std::nullopt;
  std::string_view rest = uri.substr(kTcp.size());
  const size_t slash = rest.find('/');
  std::string_view authority = rest.substr(0, slash);
  if (slash != std::string_view::npos) u.name = percent_decode(rest.substr(slash + 1));
  if (!authority.empty() && authority[0] == '[') {
    const size_t close = authority.find(']');
    if (close == std::string_view::npos) return std::nullopt;
    u.host = std::string(authority.substr(1, close - 1));
    if (close + 1 < authority.size() && authority[close + 1] == ':') {
      u.port = std::string(authority.substr(close + 2));
    }
  } else {
    const size_t colon = authority.rfind(':');
    u.host = std::string(authority.substr(0, colon));
    if (colon != std::string_view::npos) u.port = std::string(authority.substr(colon + 1));
  }
  if (u.host.empty()) return std::nullopt;
  return u;
}

std::string shell_quote(const std::string& s) {
  if (!s.empty() && s.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                        "0123456789-_./:=@,+") == std::string::npos) {
    return s;
  }
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

std::vector<std::string> access_hints(const std::string& uri) {
  std::vector<std::string> out;
  const std::string q = shell_quote(uri);
  out.push_back("nbdinfo " + q);
  const auto u = parse_nbd_uri(uri);
  const std::string name = u && !u->name.empty() && u->name.find('/') == std::string::npos
                               ? u->name
                               : std::string("pit");
  if (u) {
    const std::string where = u->is_unix
                                  ? "-unix " + shell_quote(u->socket)
                                  : shell_quote(u->host) + (u->port.empty() ? "" : " " + u->port);
    out.push_back("nbd-client " + where + " -N " + shell_quote(u->name) + " -readonly /dev/nbd1");
  }
  const std::string fuse_dir = shell_quote("/tmp/" + name);
  const std::string mnt_dir = shell_quote("/mnt/" + name);
  out.push_back("mkdir -p " + fuse_dir + " && nbdfuse -r " + fuse_dir + " " + q + " &");
  out.push_back("mkdir -p " + mnt_dir + " && mount -o ro,loop " +
                shell_quote("/tmp/" + name + "/nbd") + " " + mnt_dir);
  return out;
}

}  // namespace shadowd::ctl
