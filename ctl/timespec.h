// The point in time that `shadowctl export/restore/rollback/verify --at T`
// names: an absolute time (ISO 8601, epoch seconds), a time relative to now
// ("now", "-15min", "2h ago") or a journal sequence number ("seq:123456").
// Pure functions apart from reading the process's TZ for local times.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <variant>

namespace shadowd::ctl {

struct AtSpec {
  enum class Kind { kTime, kSeq } kind = Kind::kTime;
  int64_t time_ns = 0;  // kTime: nanoseconds since the Unix epoch (UTC)
  uint64_t seq = 0;     // kSeq: a journal sequence number
  std::string text;     // the input, trimmed, for messages
};

// Parses `text` (surrounding whitespace ignored, words case-insensitive):
//   2026-11-24T14:05:30Z, 2026-11-24T14:05:30.250+01:00, 2026-11-24 14:05-0500
//                        ISO 8601 with a zone (Z, ±HH:MM, ±HHMM, ±HH);
//                        seconds optional, fraction up to 9 digits
//   2026-11-24 14:05:30  ISO 8601 without a zone: local time (TZ, DST-aware);
//   2026-11-24           a bare date is local midnight
//   @1795000000.5        seconds since the epoch, fraction up to 9 digits
//   now, -1h30min, 2 hours ago, 1.5h ago
//                        now_ns minus a duration (ms s m h d w and their
//                        long names; fractional amounts allowed)
//   seq:123456           a journal sequence number (Kind::kSeq)
// A local time that a DST change skips is an error; one it repeats resolves
// to the earlier instant. Times must lie in [1970-01-01T00:00:00Z,
// 2262-04-11T23:47:16.854775807Z], the range of non-negative int64
// nanoseconds. A time in the future is accepted (the daemon checks the
// window). On failure returns an error message that names the accepted forms.
std::variant<AtSpec, std::string> parse_at(std::string_view text, int64_t now_ns);

// Nanoseconds since the epoch as "2026-11-24T14:05:30.123Z" (UTC,
// milliseconds, truncated).
std::string format_at_utc(int64_t ns);

}  // namespace shadowd::ctl
