#include "ctl/timespec.h"

#include <cctype>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <optional>

#include "ctl/format.h"

namespace shadowd::ctl {
namespace {

constexpr int64_t kNsPerS = 1'000'000'000;
constexpr int64_t kNsPerMs = 1'000'000;
constexpr int kFractionDigitsMax = 9;

constexpr std::string_view kAccepted =
    "accepted: ISO 8601 with a zone (2026-11-24T14:05:30Z, 2026-11-24T14:05:30.250+01:00), "
    "ISO 8601 local time (2026-11-24 14:05, 2026-11-24), @EPOCH_SECONDS, now, "
    "-15min, -1h30min, 2h ago, seq:N";

// An error's reason, without the text or the accepted forms.
using Err = std::optional<std::string>;
template <class T>
using OrErr = std::variant<T, std::string>;

bool is_space(char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; }
bool is_digit(char c) { return c >= '0' && c <= '9'; }

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

// Reads a lowercased input left to right; nothing is consumed on a mismatch.
class Cursor {
 public:
  explicit Cursor(std::string_view s) : s_(s) {}
  bool done() const { return pos_ == s_.size(); }
  char peek() const { return done() ? '\0' : s_[pos_]; }
  std::string_view rest() const { return s_.substr(pos_); }
  bool eat(char c) {
    if (peek() != c) return false;
    ++pos_;
    return true;
  }
  // Exactly `n` digits (more may follow).
  bool fixed(int n, int& out) {
    if (s_.size() - pos_ < static_cast<size_t>(n)) return false;
    int v = 0;
    for (size_t i = pos_; i < pos_ + n; ++i) {
      if (!is_digit(s_[i])) return false;
      v = v * 10 + (s_[i] - '0');
    }
    pos_ += n;
    out = v;
    return true;
  }
  std::string_view digits() { return span_of(is_digit); }
  std::string_view letters() {
    return span_of([](char c) { return c >= 'a' && c <= 'z'; });
  }
  void skip_spaces() { span_of(is_space); }

 private:
  template <class Pred>
  std::string_view span_of(Pred pred) {
    const size_t start = pos_;
    while (pos_ < s_.size() && pred(s_[pos_])) ++pos_;
    return s_.substr(start, pos_ - start);
  }

  std::string_view s_;
  size_t pos_ = 0;
};

// 1..9 fraction digits ("25" -> 250000000 ns), or nothing if the count is off.
std::optional<int64_t> fraction_ns(std::string_view digits) {
  if (digits.empty() || digits.size() > kFractionDigitsMax) return std::nullopt;
  int64_t ns = 0;
  for (size_t i = 0; i < kFractionDigitsMax; ++i) ns = ns * 10 + (i < digits.size() ? digits[i] - '0' : 0);
  return ns;
}

// An optional ".digits" at the cursor, as nanoseconds.
OrErr<int64_t> optional_fraction(Cursor& c) {
  if (!c.eat('.')) return int64_t{0};
  const std::optional<int64_t> ns = fraction_ns(c.digits());
  if (!ns) return std::string("a fraction needs 1 to 9 digits");
  return *ns;
}

constexpr std::string_view kTooEarly = "before 1970-01-01T00:00:00Z";
constexpr std::string_view kTooLate = "after 2262-04-11T23:47:16Z, the last time 64-bit nanoseconds hold";

// Seconds and nanoseconds since the epoch as one count of nanoseconds, if
// it is non-negative and fits.
OrErr<int64_t> to_ns(int64_t s, int64_t frac_ns) {
  constexpr int64_t kMaxS = INT64_MAX / kNsPerS;
  if (s < 0) return std::string(kTooEarly);
  if (s > kMaxS || (s == kMaxS && frac_ns > INT64_MAX % kNsPerS)) return std::string(kTooLate);
  return s * kNsPerS + frac_ns;
}

// ---- ISO 8601 ----

struct Civil {
  int year = 0, month = 0, day = 0, hour = 0, minute = 0, second = 0;
  int64_t frac_ns = 0;
  std::optional<int> offset_s;  // east of UTC; none: local time
};

// "z", "+hh:mm", "+hhmm" or "+hh" (or "-").
Err parse_zone(Cursor& c, Civil& t) {
  if (c.eat('z')) {
    t.offset_s = 0;
    return std::nullopt;
  }
  const int sign = c.eat('+') ? 1 : c.eat('-') ? -1 : 0;
  if (sign == 0) return "unexpected '" + std::string(c.rest()) + "'";
  int hours = 0, minutes = 0;
  bool ok = c.fixed(2, hours);
  if (ok && (c.eat(':') || is_digit(c.peek()))) ok = c.fixed(2, minutes);
  if (!ok) return std::string("a zone offset is Z, +hh:mm, +hhmm or +hh");
  if (hours > 23 || minutes > 59) return std::string("zone offset out of range");
  t.offset_s = sign * (hours * 3600 + minutes * 60);
  return std::nullopt;
}

// "hh:mm[:ss[.fff]][zone]" after the date.
Err parse_clock(Cursor& c, Civil& t) {
  if (!c.fixed(2, t.hour) || !c.eat(':') || !c.fixed(2, t.minute)) {
    return std::string("expected hh:mm after the date");
  }
  if (c.eat(':')) {
    if (!c.fixed(2, t.second)) return std::string("expected two digits of seconds");
    OrErr<int64_t> frac = optional_fraction(c);
    if (auto* e = std::get_if<std::string>(&frac)) return *e;
    t.frac_ns = std::get<int64_t>(frac);
  }
  if (c.done()) return std::nullopt;
  return parse_zone(c, t);
}

// The fields as written; ranges are checked by validate().
Err parse_iso_fields(Cursor& c, Civil& t) {
  if (!c.fixed(4, t.year) || !c.eat('-') || !c.fixed(2, t.month) || !c.eat('-') || !c.fixed(2, t.day)) {
    return std::string("expected a date as YYYY-MM-DD");
  }
  if (c.done()) return std::nullopt;  // a bare date: local midnight
  if (!c.eat('t') && !c.eat(' ')) return "unexpected '" + std::string(c.rest()) + "' after the date";
  if (Err e = parse_clock(c, t)) return e;
  if (!c.done()) return "unexpected '" + std::string(c.rest()) + "'";
  return std::nullopt;
}

std::chrono::year_month_day ymd_of(const Civil& t) {
  return std::chrono::year_month_day{std::chrono::year{t.year},
                                     std::chrono::month{static_cast<unsigned>(t.month)},
                                     std::chrono::day{static_cast<unsigned>(t.day)}};
}

Err validate(const Civil& t) {
  if (t.year < 1970) return std::string("year out of range (1970..9999)");
  if (!ymd_of(t).ok()) return std::string("no such date");
  if (t.hour > 23) return std::string("hour out of range (00..23)");
  if (t.minute > 59) return std::string("minute out of range (00..59)");
  // POSIX time has no leap seconds, so :60 cannot be told from :00 of the next minute.
  if (t.second > 59) return std::string("second out of range (00..59)");
  return std::nullopt;
}

int64_t utc_seconds(const Civil& t) {
  const int64_t days = std::chrono::sys_days{ymd_of(t)}.time_since_epoch().count();
  return days * 86400 + t.hour * 3600 + t.minute * 60 + t.second - t.offset_s.value_or(0);
}

// Whether `tm` shows the wall-clock fields of `t`.
bool shows(const std::tm& tm, const Civil& t) {
  return tm.tm_year == t.year - 1900 && tm.tm_mon == t.month - 1 && tm.tm_mday == t.day &&
         tm.tm_hour == t.hour && tm.tm_min == t.minute && tm.tm_sec == t.second;
}

// mktime() alone would silently shift a wall time that a DST change skips
// and picks either instant of a repeated one. Asking for both DST states and
// keeping the results that map back to the same wall time rejects the first
// and takes the earlier of the second, whatever mktime's internal state.
OrErr<int64_t> local_seconds(const Civil& t) {
  std::optional<int64_t> best;
  for (int isdst : {0, 1}) {
    std::tm in{};
    in.tm_year = t.year - 1900;
    in.tm_mon = t.month - 1;
    in.tm_mday = t.day;
    in.tm_hour = t.hour;
    in.tm_min = t.minute;
    in.tm_sec = t.second;
    in.tm_isdst = isdst;
    const std::time_t r = std::mktime(&in);
    std::tm back{};
    if (r == static_cast<std::time_t>(-1) || !localtime_r(&r, &back) || !shows(back, t)) continue;
    if (!best || r < *best) best = static_cast<int64_t>(r);
  }
  if (!best) return std::string("this local time does not exist (skipped by a DST change)");
  return *best;
}

OrErr<int64_t> parse_iso(std::string_view s) {
  Cursor c(s);
  Civil t;
  if (Err e = parse_iso_fields(c, t)) return *e;
  if (Err e = validate(t)) return *e;
  if (t.offset_s) return to_ns(utc_seconds(t), t.frac_ns);
  OrErr<int64_t> local = local_seconds(t);
  if (auto* e = std::get_if<std::string>(&local)) return *e;
  return to_ns(std::get<int64_t>(local), t.frac_ns);
}

// ---- @epoch and seq:N ----

OrErr<int64_t> parse_epoch(std::string_view s) {
  Cursor c(s);
  if (c.peek() == '-') return std::string("epoch seconds must not be negative");
  const std::string_view whole = c.digits();
  if (whole.empty()) return std::string("expected digits after '@'");
  uint64_t secs = 0;
  auto [p, ec] = std::from_chars(whole.data(), whole.data() + whole.size(), secs);
  if (ec != std::errc() || secs > static_cast<uint64_t>(INT64_MAX)) return std::string(kTooLate);
  OrErr<int64_t> frac = optional_fraction(c);
  if (auto* e = std::get_if<std::string>(&frac)) return *e;
  if (!c.done()) return "unexpected '" + std::string(c.rest()) + "'";
  return to_ns(static_cast<int64_t>(secs), std::get<int64_t>(frac));
}

OrErr<uint64_t> parse_seq(std::string_view s) {
  uint64_t seq = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), seq);
  if (s.empty() || !is_digit(s.front()) || p != s.data() + s.size()) {
    return std::string("expected seq:N with N a decimal number");
  }
  if (ec != std::errc()) return std::string("sequence number out of range");
  return seq;
}

// ---- durations ----

// Nanoseconds per unit name; 0 for an unknown name.
int64_t unit_ns(std::string_view unit) {
  struct Unit {
    std::string_view name;
    int64_t ns;
  };
  static constexpr int64_t kS = kNsPerS;
  static constexpr Unit kUnits[] = {
      {"ms", kNsPerMs},
      {"s", kS}, {"sec", kS}, {"secs", kS}, {"second", kS}, {"seconds", kS},
      {"m", 60 * kS}, {"min", 60 * kS}, {"mins", 60 * kS}, {"minute", 60 * kS}, {"minutes", 60 * kS},
      {"h", 3600 * kS}, {"hr", 3600 * kS}, {"hrs", 3600 * kS}, {"hour", 3600 * kS}, {"hours", 3600 * kS},
      {"d", 86400 * kS}, {"day", 86400 * kS}, {"days", 86400 * kS},
      {"w", 604800 * kS}, {"week", 604800 * kS}, {"weeks", 604800 * kS},
  };
  for (const Unit& u : kUnits) {
    if (u.name == unit) return u.ns;
  }
  return 0;
}

// `whole`.`frac_digits` units of `unit` ns each, exactly (sub-ns truncated).
std::optional<int64_t> amount_ns(std::string_view whole, std::string_view frac_digits, int64_t unit) {
  uint64_t n = 0;
  auto [p, ec] = std::from_chars(whole.data(), whole.data() + whole.size(), n);
  if (ec != std::errc() || n > static_cast<uint64_t>(INT64_MAX / unit)) return std::nullopt;
  int64_t f = 0, scale = 1;
  for (char c : frac_digits) {
    f = f * 10 + (c - '0');
    scale *= 10;
  }
  // Split so that no product exceeds unit or 10^9 * 10^9.
  const int64_t frac = unit / scale * f + unit % scale * f / scale;
  const int64_t total = static_cast<int64_t>(n) * unit;
  if (total > INT64_MAX - frac) return std::nullopt;
  return total + frac;
}

// One or more "<amount>[ ]<unit>" parts, optionally separated by spaces:
// "1h30min", "2 hours", "1.5h", "1 h 30 m".
OrErr<int64_t> parse_duration(std::string_view s) {
  Cursor c(s);
  int64_t total = 0;
  do {
    const std::string_view whole = c.digits();
    if (whole.empty()) return std::string("expected a number in the duration");
    std::string_view frac;
    if (c.eat('.')) {
      frac = c.digits();
      if (frac.empty() || frac.size() > kFractionDigitsMax) return std::string("a fraction needs 1 to 9 digits");
    }
    c.skip_spaces();
    const std::string_view name = c.letters();
    const int64_t unit = unit_ns(name);
    if (unit == 0) {
      return name.empty() ? std::string("a duration needs a unit (ms, s, min, h, d, w)")
                          : "unknown unit '" + std::string(name) + "' (ms, s, min, h, d, w)";
    }
    const std::optional<int64_t> part = amount_ns(whole, frac, unit);
    if (!part || total > INT64_MAX - *part) return std::string("duration too long");
    total += *part;
    c.skip_spaces();
  } while (!c.done());
  return total;
}

// "-<duration>" or "<duration> ago" (`s` lowercased), as now_ns minus it.
OrErr<int64_t> parse_relative(std::string_view s, int64_t now_ns) {
  std::string_view body;
  if (s.front() == '-') {
    body = s.substr(1);
  } else {
    body = s.substr(0, s.size() - 3);  // the caller found "ago" at the end
    if (body.empty() || !is_space(body.back())) return std::string("expected '<duration> ago', e.g. 2h ago");
    body = trim(body);
  }
  OrErr<int64_t> d = parse_duration(body);
  if (auto* e = std::get_if<std::string>(&d)) return *e;
  const int64_t ago = std::get<int64_t>(d);
  if (now_ns < ago) return std::string(kTooEarly);
  return now_ns - ago;
}

// A time in ns from any form but seq:N; `s` is trimmed and lowercased.
OrErr<int64_t> parse_time(std::string_view s, int64_t now_ns) {
  if (s == "now") return now_ns;
  if (s.front() == '@') return parse_epoch(s.substr(1));
  if (s.front() == '-' || s.ends_with("ago")) return parse_relative(s, now_ns);
  const bool dated = s.size() > 4 && s[4] == '-' && is_digit(s[0]);
  if (dated) return parse_iso(s);
  if (is_digit(s.front())) {
    return std::string("not a time (a duration needs '-' before it or 'ago' after it, epoch seconds need '@')");
  }
  return std::string("not a time");
}

}  // namespace

std::variant<AtSpec, std::string> parse_at(std::string_view text, int64_t now_ns) {
  AtSpec at;
  at.text = std::string(trim(text));
  std::string lower = at.text;
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  const auto fail = [&](const std::string& why) {
    return "invalid time '" + at.text + "': " + why + "; " + std::string(kAccepted);
  };
  if (lower.empty()) return fail("empty");
  if (lower.starts_with("seq:")) {
    OrErr<uint64_t> seq = parse_seq(std::string_view(lower).substr(4));
    if (auto* e = std::get_if<std::string>(&seq)) return fail(*e);
    at.kind = AtSpec::Kind::kSeq;
    at.seq = std::get<uint64_t>(seq);
    return at;
  }
  OrErr<int64_t> ns = parse_time(lower, now_ns);
  if (auto* e = std::get_if<std::string>(&ns)) return fail(*e);
  at.time_ns = std::get<int64_t>(ns);
  return at;
}

std::string format_at_utc(int64_t ns) { return format_utc_ns(ns); }

}  // namespace shadowd::ctl
