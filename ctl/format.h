// Human-readable output for shadowctl: sizes with binary units, times
// relative to now, and aligned text tables. Also the size suffixes accepted
// on the command line. Pure functions.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace shadowd::ctl {

// 512 -> "512 B", 262144 -> "256 KiB", 1572864 -> "1.5 MiB".
std::string format_bytes(uint64_t bytes);
// An offset, exactly, in the largest binary unit that divides it (the
// syntax parse_size() reads): 262144 -> "256K", 3145728 -> "3M", 0 -> "0".
std::string format_offset(uint64_t offset);
// A span of seconds, two units at most: "45s", "3m", "1h 2m", "6d 4h".
std::string format_span(int64_t seconds);
// A window length: "1h", "1d", "1w", "90m", "45s" (exact, one unit).
std::string format_window(uint64_t seconds);
// A Unix time relative to `now_s`: "3m ago", "in 2h", "now"; "never" for -1.
std::string format_age(int64_t t_s, int64_t now_s);
// A Unix time as ISO 8601 UTC: "2026-11-25T10:00:00Z".
std::string format_utc(int64_t t_s);
// Nanoseconds since the Unix epoch as ISO 8601 UTC with milliseconds
// (truncated): "2026-11-25T10:00:00.250Z".
std::string format_utc_ns(int64_t ns);
// A percentage with one decimal: 7.25 -> "7.3 %", 0 -> "0 %".
std::string format_percent(double percent);
// A rate per second with enough digits to tell small rates apart.
std::string format_rate(double per_second);
// A double without noise: "1", "0.25", "1e-06".
std::string format_number(double v);

// "4096", "4K", "4KiB", "1.5M", "2G", "1T" (binary units) -> bytes.
std::optional<uint64_t> parse_size(std::string_view s);

// A text table: a header row, rows of cells, columns padded to their widest
// cell; numeric columns are right-aligned.
class Table {
 public:
  explicit Table(std::vector<std::string> header) : header_(std::move(header)) {}
  // Columns given here are right-aligned.
  Table& right(std::vector<size_t> columns);
  void add(std::vector<std::string> row);
  // The rendered table; without the header row when `header` is false.
  std::string render(bool header = true) const;

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
  std::vector<bool> right_;
};

}  // namespace shadowd::ctl
