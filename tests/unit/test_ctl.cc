// Unit tests for the control protocol helpers (ctl/protocol.h) and
// shadowctl's formatting and parsing (ctl/format.h).
#include <catch2/catch.hpp>
#include <string>

#include "ctl/format.h"
#include "ctl/protocol.h"

namespace shadowd::ctl {
namespace {

TEST_CASE("protocol: requests and replies", "[ctl]") {
  const json req = make_request("top", {{"n", 5}});
  CHECK(req == json{{"version", kControlProtocolVersion}, {"cmd", "top"}, {"n", 5}});
  Request r;
  CHECK_FALSE(check_request(req, r).has_value());
  CHECK(r.cmd == "top");
  // Arguments cannot override the envelope either.
  CHECK(make_request("top", {{"cmd", "rollback"}, {"version", 9}}) ==
        json{{"version", kControlProtocolVersion}, {"cmd", "top"}});

  const json ok = ok_reply({{"x", 1}, {"ok", false}});  // result cannot override the envelope
  CHECK(ok == json{{"ok", true}, {"version", kControlProtocolVersion}, {"x", 1}});
  CHECK_FALSE(check_reply(ok).has_value());

  auto e = check_reply(error_reply(errc::kOutOfRange, "n too big"));
  REQUIRE(e.has_value());
  CHECK(e->code == "out_of_range");
  CHECK(e->message == "n too big");

  json newer = ok;
  newer["version"] = kControlProtocolVersion + 1;
  auto m = check_reply(newer);
  REQUIRE(m.has_value());
  CHECK(m->code == "version_mismatch");
  CHECK(m->message.find("version 2") != std::string::npos);
  CHECK(check_reply(json::array())->code == "protocol");
  CHECK(check_reply(json{{"version", 1}})->code == "protocol");
}

TEST_CASE("protocol: encode_line is one line and survives bad UTF-8", "[ctl]") {
  const std::string line = encode_line(json{{"s", std::string("a\nb\xff")}});
  CHECK(line.back() == '\n');
  CHECK(line.find('\n') == line.size() - 1);
  CHECK(json::parse(line.substr(0, line.size() - 1))["s"] == "a\nb\xEF\xBF\xBD");
}

TEST_CASE("protocol: a deeply nested request is refused, not copied", "[ctl]") {
  // A request line of the largest size, nothing but brackets: copying it
  // into Request::message (recursive, one frame per level) overflowed the
  // stack and killed the daemon (found writing tests/fuzz/control_protocol).
  const size_t depth = kMaxRequestLineBytes / 2 - 16;
  const std::string line = "{\"cmd\":\"status\",\"a\":" + std::string(depth, '[') + std::string(depth, ']') + "}";
  const json deep = json::parse(line, nullptr, /*allow_exceptions=*/false);
  REQUIRE_FALSE(deep.is_discarded());
  Request r;
  auto err = check_request(deep, r);
  REQUIRE(err.has_value());
  CHECK(err->code == errc::kInvalidRequest);

  // The limit itself: an object is 1 deep, an array in it 2.
  auto nested = [](size_t levels) {
    json v = json::object({{"cmd", "status"}});
    json* at = &v;
    for (size_t i = 1; i < levels; ++i) at = &((*at)["a"] = json::object());
    return v;
  };
  CHECK_FALSE(check_request(nested(kMaxRequestDepth), r).has_value());
  CHECK(check_request(nested(kMaxRequestDepth + 1), r)->code == errc::kInvalidRequest);
}

TEST_CASE("protocol: durations", "[ctl]") {
  CHECK(parse_duration_seconds("3600") == 3600u);
  CHECK(parse_duration_seconds("45s") == 45u);
  CHECK(parse_duration_seconds("90m") == 5400u);
  CHECK(parse_duration_seconds("1h") == 3600u);
  CHECK(parse_duration_seconds("1d") == 86400u);
  CHECK(parse_duration_seconds("1w") == 604800u);
  CHECK_FALSE(parse_duration_seconds(""));
  CHECK_FALSE(parse_duration_seconds("h"));
  CHECK_FALSE(parse_duration_seconds("-1h"));
  CHECK_FALSE(parse_duration_seconds("1y"));
  CHECK_FALSE(parse_duration_seconds("1.5h"));
  CHECK_FALSE(parse_duration_seconds("100000w"));  // over 2^32 s
}

TEST_CASE("format: sizes, offsets and their parsing", "[ctl]") {
  CHECK(format_bytes(0) == "0 B");
  CHECK(format_bytes(512) == "512 B");
  CHECK(format_bytes(262144) == "256 KiB");
  CHECK(format_bytes(1572864) == "1.50 MiB");
  CHECK(format_bytes(uint64_t{1} << 40) == "1 TiB");
  CHECK(format_bytes(100 * 1024 + 512) == "100.5 KiB");

  CHECK(format_offset(0) == "0");
  CHECK(format_offset(262144) == "256K");
  CHECK(format_offset(3 << 20) == "3M");
  CHECK(format_offset(1000) == "1000");

  CHECK(parse_size("4096") == 4096u);
  CHECK(parse_size("4K") == 4096u);
  CHECK(parse_size("4k") == 4096u);
  CHECK(parse_size("4KiB") == 4096u);
  CHECK(parse_size("3M") == 3u << 20);
  CHECK(parse_size("1.5G") == 3ull << 29);
  CHECK(parse_size("2T") == 2ull << 40);
  CHECK_FALSE(parse_size(""));
  CHECK_FALSE(parse_size("K"));
  CHECK_FALSE(parse_size("1.5"));
  CHECK_FALSE(parse_size("4X"));
  CHECK_FALSE(parse_size("4Kb"));
  CHECK_FALSE(parse_size("-4"));
  CHECK_FALSE(parse_size("99999999999999999999"));
  CHECK_FALSE(parse_size("17179869184G"));
  for (uint64_t v : {uint64_t{0}, uint64_t{65536}, uint64_t{5} << 30, uint64_t{12345}}) {
    CHECK(parse_size(format_offset(v)) == v);
  }
}

TEST_CASE("format: times", "[ctl]") {
  CHECK(format_span(0) == "0s");
  CHECK(format_span(45) == "45s");
  CHECK(format_span(180) == "3m");
  CHECK(format_span(3725) == "1h 2m");
  CHECK(format_span(6 * 86400 + 4 * 3600 + 59) == "6d 4h");
  CHECK(format_window(3600) == "1h");
  CHECK(format_window(86400) == "1d");
  CHECK(format_window(604800) == "1w");
  CHECK(format_window(5400) == "90m");
  CHECK(format_window(61) == "61s");
  CHECK(format_age(-1, 1000) == "never");
  CHECK(format_age(1000, 1000) == "now");
  CHECK(format_age(820, 1000) == "3m ago");
  CHECK(format_age(1000 + 7200, 1000) == "in 2h");
  CHECK(format_utc(0) == "1970-01-01T00:00:00Z");
  CHECK(format_rate(0) == "0/s");
  CHECK(format_rate(10.0 / 3600) == "0.00278/s");
  CHECK(format_number(0.001) == "0.001");
  CHECK(format_number(2) == "2");
}

TEST_CASE("format: tables align columns", "[ctl]") {
  Table t({"NAME", "COUNT"});
  t.right({1});
  t.add({"a", "1"});
  t.add({"longer", "12345"});
  CHECK(t.render() ==
        "NAME    COUNT\n"
        "a           1\n"
        "longer  12345\n");
  CHECK(t.render(/*header=*/false) ==
        "a           1\n"
        "longer  12345\n");
}

}  // namespace
}  // namespace shadowd::ctl
