#include "core/degraded_state.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <map>

namespace shadowd {
namespace {

constexpr const char* kSuffix = ".degraded";

std::string sanitize(const std::string& name) {
  std::string out;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    out += ok ? c : '_';
    if (out.size() == 64) break;
  }
  if (out.empty() || out[0] == '.') out.insert(out.begin(), '_');
  return out;
}

std::string one_line(const std::string& s) {
  std::string out = s;
  std::replace(out.begin(), out.end(), '\n', ' ');
  std::replace(out.begin(), out.end(), '\r', ' ');
  return out;
}

std::string utc(int64_t ns) {
  const time_t s = static_cast<time_t>(ns / 1'000'000'000);
  tm t{};
  gmtime_r(&s, &t);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%09lldZ", t.tm_year + 1900, t.tm_mon + 1,
                t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, static_cast<long long>(ns % 1'000'000'000));
  return buf;
}

bool parse_u64(std::string_view s, uint64_t& out) {
  if (s.empty() || s.size() > 20) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    const uint64_t d = static_cast<uint64_t>(c - '0');
    if (v > (UINT64_MAX - d) / 10) return false;
    v = v * 10 + d;
  }
  out = v;
  return true;
}

Status write_all(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::from_errno(errno, "write");
    }
    done += static_cast<size_t>(n);
  }
  return Status::ok();
}

Status mkdirs(const std::string& dir) {
  std::string path;
  size_t pos = 0;
  while (pos <= dir.size()) {
    const size_t next = dir.find('/', pos);
    path = dir.substr(0, next == std::string::npos ? dir.size() : next);
    pos = next == std::string::npos ? dir.size() + 1 : next + 1;
    if (path.empty()) continue;
    if (::mkdir(path.c_str(), 0755) < 0 && errno != EEXIST) {
      return Status::from_errno(errno, "cannot create " + path);
    }
  }
  struct stat st{};
  if (::stat(dir.c_str(), &st) < 0) return Status::from_errno(errno, dir);
  if (!S_ISDIR(st.st_mode)) return Status::invalid(dir + " is not a directory");
  return Status::ok();
}

class StateFile final : public DegradedStateStore {
 public:
  StateFile(std::string dir, int dirfd, std::string name)
      : dir_(std::move(dir)), dirfd_(dirfd), name_(std::move(name)), tmp_(name_ + ".tmp"),
        path_(dir_ + (dir_.empty() || dir_.back() == '/' ? "" : "/") + name_) {}
  ~StateFile() override { ::close(dirfd_); }

  const std::string& where() const override { return path_; }

  Result<std::optional<DegradedState>> load() override {
    const int fd = ::openat(dirfd_, name_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      if (errno == ENOENT) return std::optional<DegradedState>();
      return Status::from_errno(errno, "cannot read " + path_);
    }
    std::string text;
    char buf[4096];
    for (;;) {
      const ssize_t n = ::read(fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        const int err = errno;
        ::close(fd);
        return Status::from_errno(err, "cannot read " + path_);
      }
      if (n == 0) break;
      text.append(buf, static_cast<size_t>(n));
      if (text.size() > (1u << 20)) break;
    }
    ::close(fd);
    auto s = parse_degraded_state(text);
    if (!s) return Status::error(Status::Code::kCorruption, path_ + ": " + s.status().message(), EIO);
    return std::optional<DegradedState>(*s);
  }

  Status save(const DegradedState& s) override {
    const std::string text = encode_degraded_state(s);
    const int fd = ::openat(dirfd_, tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return Status::from_errno(errno, "cannot create " + dir_ + "/" + tmp_);
    Status st = write_all(fd, text);
    if (st && ::fsync(fd) < 0) st = Status::from_errno(errno, "fsync");
    ::close(fd);
    if (st && ::renameat(dirfd_, tmp_.c_str(), dirfd_, name_.c_str()) < 0) st = Status::from_errno(errno, "rename");
    if (st && ::fsync(dirfd_) < 0) st = Status::from_errno(errno, "fsync of " + dir_);
    if (!st) {
      ::unlinkat(dirfd_, tmp_.c_str(), 0);
      return Status::error(st.code(), "cannot write " + path_ + ": " + st.message(), st.err());
    }
    return Status::ok();
  }

  Status clear() override {
    if (::unlinkat(dirfd_, name_.c_str(), 0) < 0 && errno != ENOENT) {
      return Status::from_errno(errno, "cannot remove " + path_);
    }
    ::unlinkat(dirfd_, tmp_.c_str(), 0);
    if (::fsync(dirfd_) < 0) return Status::from_errno(errno, "fsync of " + dir_);
    return Status::ok();
  }

 private:
  std::string dir_;
  int dirfd_;
  std::string name_, tmp_, path_;
};

}  // namespace

std::string encode_degraded_state(const DegradedState& s) {
  std::string out;
  out += "# shadowd: the history of this export's shadow pool was degraded. While this file\n";
  out += "# exists, a start does not re-apply the pool's journal records up to seq (writes\n";
  out += "# acknowledged since never reached the journal) and restarts the history.\n";
  out += "# Removing it by hand lets a start replay older data over those writes.\n";
  out += "format=1\n";
  out += "pool_uuid=" + pool::uuid_to_string(s.pool_uuid) + "\n";
  out += "primary=" + one_line(s.primary_id) + "\n";
  out += "seq=" + std::to_string(s.seq) + "\n";
  out += "since_ns=" + std::to_string(s.since_ns) + "\n";
  out += "since=" + utc(s.since_ns) + "\n";
  out += std::string("primary_flushed=") + (s.primary_flushed ? "1" : "0") + "\n";
  out += "reason=" + one_line(s.reason) + "\n";
  out += "end\n";  // a file cut short has no end line
  return out;
}

Result<pool::Uuid> parse_uuid(std::string_view text) {
  pool::Uuid u{};
  size_t i = 0;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (char c : text) {
    if (c == '-') continue;
    const int v = hex(c);
    if (v < 0 || i >= 32) return Status::error(Status::Code::kCorruption, "bad uuid");
    u[i / 2] = static_cast<uint8_t>(u[i / 2] | (i % 2 == 0 ? v << 4 : v));
    ++i;
  }
  if (i != 32) return Status::error(Status::Code::kCorruption, "bad uuid");
  return u;
}

Result<DegradedState> parse_degraded_state(std::string_view text) {
  auto bad = [](const std::string& why) {
    return Status::error(Status::Code::kCorruption, "not a shadowd state file: " + why, EIO);
  };
  std::map<std::string, std::string, std::less<>> kv;
  bool end = false;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string_view::npos) return bad("the last line is cut short");
    std::string_view line = text.substr(pos, nl - pos);
    pos = nl + 1;
    if (line.empty() || line[0] == '#') continue;
    if (end) return bad("text after the end line");
    if (line == "end") {
      end = true;
      continue;
    }
    const size_t eq = line.find('=');
    if (eq == std::string_view::npos) return bad("a line without '='");
    kv.emplace(std::string(line.substr(0, eq)), std::string(line.substr(eq + 1)));
  }
  if (!end) return bad("no end line");
  auto f = kv.find("format");
  if (f == kv.end() || f->second != "1") return bad("format is not 1");
  DegradedState s;
  auto u = kv.find("pool_uuid");
  if (u == kv.end()) return bad("no pool_uuid");
  auto uuid = parse_uuid(u->second);
  if (!uuid) return bad("bad pool_uuid");
  s.pool_uuid = *uuid;
  auto q = kv.find("seq");
  if (q == kv.end() || !parse_u64(q->second, s.seq)) return bad("no valid seq");
  if (auto t = kv.find("since_ns"); t != kv.end()) {
    uint64_t v = 0;
    if (!parse_u64(t->second, v) || v > static_cast<uint64_t>(INT64_MAX)) return bad("bad since_ns");
    s.since_ns = static_cast<int64_t>(v);
  }
  if (auto p = kv.find("primary"); p != kv.end()) s.primary_id = p->second;
  if (auto p = kv.find("primary_flushed"); p != kv.end()) s.primary_flushed = p->second == "1";
  if (auto r = kv.find("reason"); r != kv.end()) s.reason = r->second;
  return s;
}

std::string state_file_name(const std::string& export_name, const pool::Uuid& uuid) {
  return sanitize(export_name) + "." + pool::uuid_to_string(uuid) + kSuffix;
}

Result<std::unique_ptr<DegradedStateStore>> open_state_file(const std::string& dir,
                                                            const std::string& export_name,
                                                            const pool::Uuid& uuid) {
  auto fail = [&](const Status& st) {
    return Status::error(st.code() == Status::Code::kOk ? Status::Code::kIoError : st.code(),
                         "state directory " + dir + ": " + st.message() +
                             " (shadowd records there that the pool's history is degraded; "
                             "give a directory it can write with --state-dir)",
                         st.err());
  };
  if (dir.empty()) return Status::invalid("the state directory is empty");
  Status st = mkdirs(dir);
  if (!st) return fail(st);
  const int dirfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dirfd < 0) return fail(Status::from_errno(errno, "cannot open it"));
  const std::string name = state_file_name(export_name, uuid);
  // A file can be created (and synced) here: a read-only or full file
  // system shows now, not when history degrades.
  const std::string probe = name + ".probe";
  const int fd = ::openat(dirfd, probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    const int err = errno;
    ::close(dirfd);
    return fail(Status::from_errno(err, "cannot create a file in it"));
  }
  ::close(fd);
  ::unlinkat(dirfd, probe.c_str(), 0);
  if (::fsync(dirfd) < 0) {
    const int err = errno;
    ::close(dirfd);
    return fail(Status::from_errno(err, "cannot sync it"));
  }
  return std::unique_ptr<DegradedStateStore>(std::make_unique<StateFile>(dir, dirfd, name));
}

std::vector<std::string> find_state_files(const std::string& dir, const std::string& export_name) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  const std::string prefix = sanitize(export_name) + ".";
  const std::string suffix = kSuffix;
  while (dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n.size() != prefix.size() + 36 + suffix.size()) continue;  // <export>.<uuid>.degraded
    if (n.compare(0, prefix.size(), prefix) != 0) continue;
    if (n.compare(n.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    if (!parse_uuid(std::string_view(n).substr(prefix.size(), 36))) continue;
    out.push_back(dir + (dir.back() == '/' ? "" : "/") + n);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace shadowd
