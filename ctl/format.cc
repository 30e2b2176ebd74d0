#include "ctl/format.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <iterator>

namespace shadowd::ctl {

std::string format_bytes(uint64_t bytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  double v = static_cast<double>(bytes);
  while (v >= 1024 && u < 6) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  if (u == 0 || v == std::floor(v)) {
    std::snprintf(buf, sizeof buf, "%.0f %s", v, units[u]);
  } else {
    std::snprintf(buf, sizeof buf, v < 10 ? "%.2f %s" : "%.1f %s", v, units[u]);
  }
  return buf;
}

std::string format_offset(uint64_t offset) {
  static const char kUnits[] = "EPTGMK";
  for (int i = 0; i < 6; ++i) {
    const int shift = 10 * (6 - i);
    const uint64_t unit = uint64_t{1} << shift;
    if (offset != 0 && offset % unit == 0) return std::to_string(offset >> shift) + kUnits[i];
  }
  return std::to_string(offset);
}

std::string format_span(int64_t seconds) {
  static const struct {
    int64_t seconds;
    const char* name;
  } units[] = {{604800, "w"}, {86400, "d"}, {3600, "h"}, {60, "m"}, {1, "s"}};
  if (seconds < 0) seconds = -seconds;
  if (seconds == 0) return "0s";
  for (size_t i = 0; i < std::size(units); ++i) {
    if (seconds < units[i].seconds) continue;
    std::string s = std::to_string(seconds / units[i].seconds) + units[i].name;
    const int64_t rest = seconds % units[i].seconds;
    if (i + 1 < std::size(units) && rest >= units[i + 1].seconds) {
      s += " " + std::to_string(rest / units[i + 1].seconds) + units[i + 1].name;
    }
    return s;
  }
  return "0s";
}

std::string format_window(uint64_t seconds) {
  static const struct {
    uint64_t seconds;
    const char* name;
  } units[] = {{604800, "w"}, {86400, "d"}, {3600, "h"}, {60, "m"}};
  for (const auto& u : units) {
    if (seconds >= u.seconds && seconds % u.seconds == 0) {
      return std::to_string(seconds / u.seconds) + u.name;
    }
  }
  return std::to_string(seconds) + "s";
}

std::string format_age(int64_t t_s, int64_t now_s) {
  if (t_s < 0) return "never";
  if (t_s == now_s) return "now";
  return t_s < now_s ? format_span(now_s - t_s) + " ago" : "in " + format_span(t_s - now_s);
}

std::string format_utc(int64_t t_s) {
  const time_t t = static_cast<time_t>(t_s);
  tm utc;
  gmtime_r(&t, &utc);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return buf;
}

std::string format_utc_ns(int64_t ns) {
  constexpr int64_t kNs = 1'000'000'000;
  int64_t s = ns / kNs;
  int64_t frac = ns % kNs;
  if (frac < 0) {
    frac += kNs;
    --s;
  }
  std::string out = format_utc(s);  // "...SSZ"
  char ms[8];
  std::snprintf(ms, sizeof ms, ".%03lld", static_cast<long long>(frac / 1'000'000));
  out.insert(out.size() - 1, ms);
  return out;
}

std::string format_percent(double percent) {
  if (percent == 0) return "0 %";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %%", percent);
  return buf;
}

std::string format_rate(double per_second) {
  char buf[32];
  if (per_second == 0) return "0/s";
  if (per_second >= 100) {
    std::snprintf(buf, sizeof buf, "%.0f/s", per_second);
  } else {
    std::snprintf(buf, sizeof buf, "%.3g/s", per_second);
  }
  return buf;
}

std::string format_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

std::optional<uint64_t> parse_size(std::string_view s) {
  if (s.empty()) return std::nullopt;
  size_t digits = 0;
  bool dot = false;
  while (digits < s.size() &&
         (std::isdigit(static_cast<unsigned char>(s[digits])) || (s[digits] == '.' && !dot))) {
    dot |= s[digits] == '.';
    ++digits;
  }
  if (digits == 0 || s[0] == '.') return std::nullopt;
  std::string_view suffix = s.substr(digits);
  int shift = 0;
  if (!suffix.empty()) {
    static const char kUnits[] = "KMGTPE";
    const char* u = std::strchr(kUnits, std::toupper(static_cast<unsigned char>(suffix[0])));
    if (u == nullptr || *u == '\0') return std::nullopt;
    shift = 10 * static_cast<int>(u - kUnits + 1);
    suffix.remove_prefix(1);
    if (!suffix.empty() && suffix != "iB" && suffix != "B") return std::nullopt;
  } else if (dot) {
    return std::nullopt;  // a fraction of a byte
  }
  const std::string number(s.substr(0, digits));
  if (!dot) {
    errno = 0;
    const unsigned long long n = std::strtoull(number.c_str(), nullptr, 10);
    if (errno == ERANGE || (shift > 0 && n > (UINT64_MAX >> shift))) return std::nullopt;
    return static_cast<uint64_t>(n) << shift;
  }
  const double v = std::strtod(number.c_str(), nullptr) * std::ldexp(1.0, shift);
  if (!(v < 18446744073709551616.0)) return std::nullopt;
  return static_cast<uint64_t>(v);
}

Table& Table::right(std::vector<size_t> columns) {
  right_.assign(header_.size(), false);
  for (size_t c : columns) {
    if (c < right_.size()) right_[c] = true;
  }
  return *this;
}

void Table::add(std::vector<std::string> row) {
  row.resize(header_.size());
  rows_.push_back(std::move(row));
}

std::string Table::render(bool header) const {
  std::vector<size_t> width(header_.size());
  for (size_t c = 0; c < header_.size(); ++c) width[c] = header_[c].size();
  for (const auto& row : rows_) {
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  }
  auto line = [&](const std::vector<std::string>& row) {
    std::string out;
    for (size_t c = 0; c < row.size(); ++c) {
      const size_t pad = width[c] - row[c].size();
      const bool r = c < right_.size() && right_[c];
      if (c > 0) out += "  ";
      if (r) out.append(pad, ' ');
      out += row[c];
      if (!r && c + 1 < row.size()) out.append(pad, ' ');
    }
    return out + "\n";
  };
  std::string out = header ? line(header_) : "";
  for (const auto& row : rows_) out += line(row);
  return out;
}

}  // namespace shadowd::ctl
