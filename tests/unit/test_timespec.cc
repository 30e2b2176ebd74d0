// Unit tests for the --at T parser of the restore commands (ctl/timespec.h).
// Expected epoch values were computed with `date -u -d ... +%s`, not with
// the code under test.
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <optional>
#include <string>

#include "ctl/timespec.h"

namespace shadowd::ctl {
namespace {

constexpr int64_t kS = 1'000'000'000;
constexpr int64_t kMs = 1'000'000;
constexpr int64_t k20261124T140530Z = 1795529130;  // 2026-11-24T14:05:30Z
constexpr int64_t kNow = k20261124T140530Z * kS + 250 * kMs;

// The parsed spec; fails the test case if `text` is rejected.
AtSpec parsed(const std::string& text, int64_t now_ns = kNow) {
  auto r = parse_at(text, now_ns);
  INFO("text: '" << text << "'");
  if (auto* e = std::get_if<std::string>(&r)) FAIL("rejected: " << *e);
  return std::get<AtSpec>(r);
}

int64_t ns_of(const std::string& text, int64_t now_ns = kNow) {
  const AtSpec at = parsed(text, now_ns);
  CHECK(at.kind == AtSpec::Kind::kTime);
  return at.time_ns;
}

// The error for `text`, or "" if it was accepted.
std::string error_of(const std::string& text, int64_t now_ns = kNow) {
  auto r = parse_at(text, now_ns);
  if (auto* e = std::get_if<std::string>(&r)) return *e;
  return "";
}

// Sets TZ for the life of the guard, then puts the old value back.
class TzGuard {
 public:
  explicit TzGuard(const char* tz) {
    if (const char* old = std::getenv("TZ")) old_ = old;
    setenv("TZ", tz, 1);
    tzset();
  }
  ~TzGuard() {
    if (old_) {
      setenv("TZ", old_->c_str(), 1);
    } else {
      unsetenv("TZ");
    }
    tzset();
  }
  TzGuard(const TzGuard&) = delete;
  TzGuard& operator=(const TzGuard&) = delete;

 private:
  std::optional<std::string> old_;
};

// Berlin's rules; the POSIX spelling holds the same EU rules for 2026.
const char* berlin_tz() {
  return std::filesystem::exists("/usr/share/zoneinfo/Europe/Berlin") ? "Europe/Berlin"
                                                                      : "CET-1CEST,M3.5.0,M10.5.0/3";
}

TEST_CASE("timespec: ISO 8601 with a zone", "[timespec]") {
  const int64_t t = k20261124T140530Z * kS;
  CHECK(ns_of("2026-11-24T14:05:30Z") == t);
  CHECK(ns_of("2026-11-24T14:05:30.250Z") == t + 250 * kMs);
  CHECK(ns_of("2026-11-24T14:05:30.5Z") == t + 500 * kMs);
  CHECK(ns_of("2026-11-24T14:05:30.123456789Z") == t + 123'456'789);
  CHECK(ns_of("2026-11-24T14:05:30.000000001Z") == t + 1);
  CHECK(ns_of("2026-11-24T15:05:30+01:00") == t);
  CHECK(ns_of("2026-11-24T15:05:30+0100") == t);
  CHECK(ns_of("2026-11-24T15:05:30+01") == t);
  CHECK(ns_of("2026-11-24T09:05:30-05:00") == t);
  CHECK(ns_of("2026-11-24T09:05:30-0500") == t);
  CHECK(ns_of("2026-11-24T19:35:30+05:30") == t);
  CHECK(ns_of("2026-11-24 14:05:30Z") == t);
  CHECK(ns_of("2026-11-24T14:05Z") == t - 30 * kS);
  CHECK(ns_of("2026-11-24 15:05+01:00") == t - 30 * kS);
  CHECK(ns_of("2026-11-24t14:05:30z") == t);
  CHECK(ns_of("  \t2026-11-24T14:05:30Z\n") == t);
  CHECK(parsed(" 2026-11-24T14:05:30Z ").text == "2026-11-24T14:05:30Z");
  CHECK(ns_of("2024-02-29T12:00:00Z") == 1709208000 * kS);  // leap day
  CHECK(ns_of("2000-01-01T00:00:00Z") == 946684800 * kS);
  CHECK(ns_of("1970-01-01T00:00:00Z") == 0);
  CHECK(ns_of("1970-01-01T00:00:00-01:00") == 3600 * kS);
  // The last instant int64 nanoseconds hold.
  CHECK(ns_of("2262-04-11T23:47:16.854775807Z") == INT64_MAX);
}

TEST_CASE("timespec: ISO 8601 without a zone is local time", "[timespec]") {
  {
    TzGuard tz(berlin_tz());
    const int64_t t = k20261124T140530Z * kS;
    CHECK(ns_of("2026-11-24 14:05:30") == t - 3600 * kS);  // CET, +01:00
    CHECK(ns_of("2026-11-24T14:05:30") == t - 3600 * kS);
    CHECK(ns_of("2026-11-24T14:05:30.5") == t - 3600 * kS + 500 * kMs);
    CHECK(ns_of("2026-11-24 14:05") == t - 3630 * kS);
    CHECK(ns_of("2026-11-24") == 1795474800 * kS);            // 2026-11-23T23:00:00Z
    CHECK(ns_of("2026-07-01 12:00") == 1782900000 * kS);      // CEST, +02:00
    // 02:30 on 2026-03-29 is skipped when clocks go from 02:00 to 03:00.
    CHECK_THAT(error_of("2026-03-29 02:30"), Catch::Contains("does not exist"));
    CHECK(ns_of("2026-03-29 01:59:59") == (1774747800 - 1801) * kS);  // 00:59:59Z
    CHECK(ns_of("2026-03-29 03:00") == (1774747800 - 1800) * kS);  // 01:00Z
    // 02:30 on 2026-10-25 happens twice: CEST (00:30Z), then CET (01:30Z).
    CHECK(ns_of("2026-10-25 02:30") == 1792888200 * kS);
    CHECK(ns_of("2026-10-25 03:30") == (1792891800 + 3600) * kS);  // 02:30Z
    // With a zone the local TZ does not matter.
    CHECK(ns_of("2026-11-24T14:05:30Z") == t);
  }
  {
    TzGuard tz("UTC0");
    CHECK(ns_of("2026-11-24 14:05:30") == k20261124T140530Z * kS);
    CHECK(ns_of("1970-01-01") == 0);
  }
  {
    TzGuard tz("EST5");  // 05:00 behind UTC, no DST
    CHECK(ns_of("2026-11-24 09:05:30") == k20261124T140530Z * kS);
  }
}

TEST_CASE("timespec: the guard puts TZ back", "[timespec]") {
  const char* before = std::getenv("TZ");
  const std::optional<std::string> saved = before ? std::optional<std::string>(before) : std::nullopt;
  { TzGuard tz("EST5"); }
  const char* after = std::getenv("TZ");
  CHECK(saved.has_value() == (after != nullptr));
  if (saved && after) CHECK(*saved == after);
}

TEST_CASE("timespec: epoch seconds", "[timespec]") {
  CHECK(ns_of("@1795000000") == 1795000000 * kS);
  CHECK(ns_of("@1795000000.5") == 1795000000 * kS + 500 * kMs);
  CHECK(ns_of("@1795000000.000000007") == 1795000000 * kS + 7);
  CHECK(ns_of("@0") == 0);
  CHECK(ns_of(" @1795529130 ") == k20261124T140530Z * kS);
  CHECK(ns_of("@9223372036.854775807") == INT64_MAX);
  CHECK_THAT(error_of("@9223372036.854775808"), Catch::Contains("after 2262"));
  CHECK_THAT(error_of("@99999999999999999999999"), Catch::Contains("after 2262"));
  CHECK_THAT(error_of("@-5"), Catch::Contains("negative"));
  CHECK_THAT(error_of("@"), Catch::Contains("digits after '@'"));
  CHECK_THAT(error_of("@1."), Catch::Contains("1 to 9 digits"));
  CHECK_THAT(error_of("@1.1234567891"), Catch::Contains("1 to 9 digits"));
  CHECK_THAT(error_of("@12x"), Catch::Contains("unexpected 'x'"));
  CHECK_THAT(error_of("@ 12"), Catch::Contains("digits after '@'"));
  CHECK_THAT(error_of("@+12"), Catch::Contains("digits after '@'"));
}

TEST_CASE("timespec: now and durations before it", "[timespec]") {
  constexpr int64_t kMin = 60 * kS, kH = 60 * kMin, kD = 24 * kH, kW = 7 * kD;
  CHECK(ns_of("now") == kNow);
  CHECK(ns_of("NOW") == kNow);
  CHECK(ns_of(" now ") == kNow);
  CHECK(ns_of("-15min") == kNow - 15 * kMin);
  CHECK(ns_of("-2h") == kNow - 2 * kH);
  CHECK(ns_of("-90s") == kNow - 90 * kS);
  CHECK(ns_of("-1d") == kNow - kD);
  CHECK(ns_of("-1w") == kNow - kW);
  CHECK(ns_of("-1h30min") == kNow - kH - 30 * kMin);
  CHECK(ns_of("-1h 30min") == kNow - kH - 30 * kMin);
  CHECK(ns_of("-500ms") == kNow - 500 * kMs);
  CHECK(ns_of("-0s") == kNow);
  CHECK(ns_of("-2H") == kNow - 2 * kH);
  CHECK(ns_of("15min ago") == kNow - 15 * kMin);
  CHECK(ns_of("2h ago") == kNow - 2 * kH);
  CHECK(ns_of("1 h ago") == kNow - kH);
  CHECK(ns_of("2 hours ago") == kNow - 2 * kH);
  CHECK(ns_of("1 day ago") == kNow - kD);
  CHECK(ns_of("3 days ago") == kNow - 3 * kD);
  CHECK(ns_of("10 seconds ago") == kNow - 10 * kS);
  CHECK(ns_of("1h30m ago") == kNow - kH - 30 * kMin);
  CHECK(ns_of("1 hour 30 minutes ago") == kNow - kH - 30 * kMin);
  CHECK(ns_of("2h  AGO") == kNow - 2 * kH);
  CHECK(ns_of("1.5h ago") == kNow - kH - 30 * kMin);
  CHECK(ns_of("-0.25s") == kNow - 250 * kMs);
  CHECK(ns_of("-1.000000001s") == kNow - kS - 1);
  CHECK(ns_of("0.5ms ago") == kNow - kMs / 2);
  CHECK(ns_of("-1.1w") == kNow - kW - kW / 10);
  // now_ns itself, down to the epoch.
  CHECK(ns_of("-2h", 2 * kH) == 0);
  CHECK(ns_of("now", 0) == 0);

  const std::pair<const char*, int64_t> kUnits[] = {
      {"ms", kMs},       {"s", kS},         {"sec", kS},          {"secs", kS},         {"second", kS},
      {"seconds", kS},   {"m", kMin},       {"min", kMin},        {"mins", kMin},       {"minute", kMin},
      {"minutes", kMin}, {"h", kH},         {"hr", kH},           {"hrs", kH},          {"hour", kH},
      {"hours", kH},     {"d", kD},         {"day", kD},          {"days", kD},         {"w", kW},
      {"week", kW},      {"weeks", kW},
  };
  for (const auto& [name, unit] : kUnits) {
    CAPTURE(name);
    CHECK(ns_of("-3" + std::string(name)) == kNow - 3 * unit);
    CHECK(ns_of("3 " + std::string(name) + " ago") == kNow - 3 * unit);
  }
}

TEST_CASE("timespec: journal sequence numbers", "[timespec]") {
  const AtSpec a = parsed("seq:123456");
  CHECK(a.kind == AtSpec::Kind::kSeq);
  CHECK(a.seq == 123456u);
  CHECK(a.text == "seq:123456");
  CHECK(parsed("SEQ:0").seq == 0u);
  CHECK(parsed(" seq:18446744073709551615 ").seq == UINT64_MAX);
  CHECK_THAT(error_of("seq:18446744073709551616"), Catch::Contains("out of range"));
  for (const char* bad : {"seq:", "seq:-1", "seq:+1", "seq: 1", "seq:12x", "seq:1.5", "seq:0x10"}) {
    CAPTURE(bad);
    CHECK_THAT(error_of(bad), Catch::Contains("expected seq:N"));
  }
}

TEST_CASE("timespec: a time in the future is accepted", "[timespec]") {
  CHECK(ns_of("@4102444800") == 4102444800 * kS);  // 2100-01-01T00:00:00Z
  CHECK(ns_of("2100-01-01T00:00:00Z") == 4102444800 * kS);
}

TEST_CASE("timespec: rejections name the reason and the accepted forms", "[timespec]") {
  const std::pair<const char*, const char*> kBad[] = {
      {"", "empty"},
      {"  \t ", "empty"},
      {"yesterday", "not a time"},
      {"garbage", "not a time"},
      {"+2h", "not a time"},
      {"2h", "needs '-' before it or 'ago'"},
      {"1795000000", "need '@'"},
      // Trailing junk, never a partial parse.
      {"now!", "not a time"},
      {"now ago", "expected a number"},
      {"2026-11-24T14:05:30Zx", "unexpected 'x'"},
      {"2026-11-24T14:05:30+01:00x", "unexpected"},
      {"2026-11-24T14:05:300Z", "unexpected '0z'"},
      {"2026-11-24 14:05:30 Z", "unexpected ' z'"},
      {"2026-11-24x", "after the date"},
      {"2026-11-24Z", "after the date"},
      {"2026-11-24  14:05", "expected hh:mm"},
      {"2026-11-24T", "expected hh:mm"},
      {"2026-11-24T14", "expected hh:mm"},
      {"2026-11-24T1:05", "expected hh:mm"},
      {"2026-11-24T14:05:3Z", "two digits of seconds"},
      {"2026-11-24T14:05.5Z", "unexpected '.5z'"},
      {"2026-11-24T14:05:30.Z", "1 to 9 digits"},
      {"2026-11-24T14:05:30.1234567890Z", "1 to 9 digits"},
      {"2026-1-24", "YYYY-MM-DD"},
      {"2026-11-4", "YYYY-MM-DD"},
      {"20261-11-24", "not a time"},
      {"-2h!", "expected a number"},
      {"2h ago ago", "expected a number"},
      {"-2h ago", "expected a number"},
      {"2hago", "expected '<duration> ago'"},
      {"ago", "expected '<duration> ago'"},
      {"-", "expected a number"},
      {"- 2h", "expected a number"},
      {"-2", "needs a unit"},
      {"-2y", "unknown unit 'y'"},
      {"-1h30", "needs a unit"},
      {"-.5h", "expected a number"},
      {"-1.h", "1 to 9 digits"},
      {"-1.1234567891s", "1 to 9 digits"},
      // Invalid dates and clock fields.
      {"2026-02-29", "no such date"},
      {"2026-02-30T00:00Z", "no such date"},
      {"2026-04-31T00:00Z", "no such date"},
      {"2026-13-01T00:00Z", "no such date"},
      {"2026-00-10T00:00Z", "no such date"},
      {"2026-11-00T00:00Z", "no such date"},
      {"2026-11-24T24:00Z", "hour out of range"},
      {"2026-11-24T14:60Z", "minute out of range"},
      {"2026-11-24T14:05:60Z", "second out of range"},
      {"2026-11-24T14:05+24:00", "zone offset out of range"},
      {"2026-11-24T14:05+01:60", "zone offset out of range"},
      {"2026-11-24T14:05+1", "zone offset is"},
      {"2026-11-24T14:05+01:0", "zone offset is"},
      // Years and the range of int64 nanoseconds.
      {"1969-12-31T23:59:59Z", "year out of range"},
      {"0999-01-01T00:00Z", "year out of range"},
      {"1970-01-01T00:00:00+01:00", "before 1970"},
      {"2262-04-11T23:47:16.854775808Z", "after 2262"},
      {"9999-12-31T23:59:59Z", "after 2262"},
      // Durations that overflow, or reach back before the epoch.
      {"-15250w", "before 1970"},
      {"-15260w", "duration too long"},
      {"-9223372037s", "duration too long"},
      {"-99999999999999999999999s", "duration too long"},
      {"-9223372036s 855ms", "duration too long"},
      {"-100000000000000000w", "duration too long"},
  };
  for (const auto& [text, reason] : kBad) {
    CAPTURE(text);
    const std::string e = error_of(text);
    CHECK_THAT(e, Catch::Contains(reason));
    CHECK_THAT(e, Catch::Contains("accepted: ISO 8601"));
    CHECK_THAT(e, Catch::Contains("@EPOCH_SECONDS"));
    CHECK_THAT(e, Catch::Contains("2h ago"));
    CHECK_THAT(e, Catch::Contains("seq:N"));
  }
  // The message quotes the trimmed input.
  CHECK_THAT(error_of("  nope  "), Catch::StartsWith("invalid time 'nope': "));
  // The largest duration that fits, and one nanosecond more.
  CHECK(ns_of("-9223372036.854775807s", INT64_MAX) == 0);
  CHECK_THAT(error_of("-9223372036.854775808s", INT64_MAX), Catch::Contains("duration too long"));
}

TEST_CASE("timespec: format_at_utc and its round trip", "[timespec]") {
  CHECK(format_at_utc(k20261124T140530Z * kS + 123'456'789) == "2026-11-24T14:05:30.123Z");
  CHECK(format_at_utc(0) == "1970-01-01T00:00:00.000Z");
  CHECK(format_at_utc(INT64_MAX) == "2262-04-11T23:47:16.854Z");
  for (int64_t ns : {int64_t{0}, k20261124T140530Z * kS + 123 * kMs, kNow, int64_t{1709208000} * kS + 999 * kMs,
                     INT64_MAX - 807}) {
    CAPTURE(ns);
    const std::string s = format_at_utc(ns);
    CHECK(ns_of(s) == ns / kMs * kMs);  // milliseconds survive
    CHECK(format_at_utc(ns_of(s)) == s);
  }
}

}  // namespace
}  // namespace shadowd::ctl
