// The JSON config loader and Config::validate(): every key with the right and
// wrong types, error messages that name the key, all-or-nothing merging, and
// the example file shipped in config/.
#include "config/config.h"

#include <catch2/catch.hpp>
#include <functional>
#include <string>
#include <vector>

#ifndef SHADOWD_SOURCE_DIR
#error "SHADOWD_SOURCE_DIR must name the source tree (tests/unit/CMakeLists.txt)"
#endif

namespace shadowd {
namespace {

using Strings = std::vector<std::string>;

bool mentions(const Status& st, const std::string& word) {
  return st.message().find(word) != std::string::npos;
}

// Every field of Config, for "nothing changed" checks.
bool same(const Config& a, const Config& b) {
  return a.backing == b.backing && a.unix_sockets == b.unix_sockets && a.listen == b.listen &&
         a.export_name == b.export_name && a.description == b.description &&
         a.read_only == b.read_only && a.foreground == b.foreground && a.pidfile == b.pidfile &&
         a.log_level == b.log_level && a.direct_io == b.direct_io &&
         a.io_threads == b.io_threads && a.max_payload_bytes == b.max_payload_bytes &&
         a.max_inflight_per_connection == b.max_inflight_per_connection &&
         a.max_connections == b.max_connections;
}

// A Config with every field away from its default.
Config nondefault() {
  Config c;
  c.backing = "/old/backing";
  c.unix_sockets = {"/old/sock"};
  c.listen = {"0.0.0.0:1"};
  c.export_name = "old";
  c.description = "old description";
  c.read_only = true;
  c.foreground = true;
  c.pidfile = "/old/pid";
  c.log_level = "debug";
  c.direct_io = "off";
  c.io_threads = 3;
  c.max_payload_bytes = 8192;
  c.max_inflight_per_connection = 7;
  c.max_connections = 9;
  return c;
}

// ---- defaults ----

TEST_CASE("config: defaults are valid", "[config]") {
  Config c;
  CHECK(c.validate().is_ok());
  CHECK(c.export_name == "disk");
  CHECK(c.log_level == "info");
  CHECK(c.direct_io == "auto");
  CHECK(c.max_payload_bytes == 32u << 20);
  CHECK(c.unix_sockets.empty());
  CHECK(c.listen.empty());
}

TEST_CASE("config: an empty object changes nothing", "[config]") {
  Config c = nondefault();
  REQUIRE(merge_config_json("{}", c).is_ok());
  CHECK(same(c, nondefault()));
  REQUIRE(merge_config_json("  { }\n", c).is_ok());
  CHECK(same(c, nondefault()));
}

// ---- each key, right type ----

struct KeyCase {
  const char* key;
  const char* value;  // JSON text
  std::function<bool(const Config&)> applied;
};

TEST_CASE("config: every key accepts its type", "[config]") {
  const std::vector<KeyCase> cases = {
      {"backing", R"("/dev/vdb")", [](const Config& c) { return c.backing == "/dev/vdb"; }},
      {"unix", R"("/run/a.sock")",
       [](const Config& c) { return c.unix_sockets == Strings{"/run/a.sock"}; }},
      {"listen", R"("[::1]:10809")",
       [](const Config& c) { return c.listen == Strings{"[::1]:10809"}; }},
      {"export_name", R"("vm1")", [](const Config& c) { return c.export_name == "vm1"; }},
      {"description", R"("a disk")", [](const Config& c) { return c.description == "a disk"; }},
      {"read_only", "false", [](const Config& c) { return !c.read_only; }},
      {"foreground", "false", [](const Config& c) { return !c.foreground; }},
      {"pidfile", R"("/run/x.pid")", [](const Config& c) { return c.pidfile == "/run/x.pid"; }},
      {"log_level", R"("warn")", [](const Config& c) { return c.log_level == "warn"; }},
      {"direct_io", R"("on")", [](const Config& c) { return c.direct_io == "on"; }},
      {"io_threads", "5", [](const Config& c) { return c.io_threads == 5; }},
      {"max_payload_bytes", "65536", [](const Config& c) { return c.max_payload_bytes == 65536; }},
      {"max_inflight_per_connection", "64",
       [](const Config& c) { return c.max_inflight_per_connection == 64; }},
      {"max_connections", "1000", [](const Config& c) { return c.max_connections == 1000; }},
  };
  for (const KeyCase& k : cases) {
    const std::string text = std::string("{\"") + k.key + "\": " + k.value + "}";
    CAPTURE(text);
    Config c = nondefault();
    Status st = merge_config_json(text, c);
    REQUIRE(st.is_ok());
    CHECK(k.applied(c));
    CHECK(c.validate().is_ok());
  }
}

TEST_CASE("config: all keys at once", "[config]") {
  const std::string text = R"({
    "backing": "/b", "unix": ["/u1", "/u2"], "listen": ["127.0.0.1:1", "[::]:2"],
    "export_name": "e", "description": "d", "read_only": true, "foreground": true,
    "pidfile": "/p", "log_level": "trace", "direct_io": "off", "io_threads": 64,
    "max_payload_bytes": 4096, "max_inflight_per_connection": 4096, "max_connections": 65536
  })";
  Config c;
  REQUIRE(merge_config_json(text, c).is_ok());
  CHECK(c.backing == "/b");
  CHECK(c.unix_sockets == Strings{"/u1", "/u2"});
  CHECK(c.listen == Strings{"127.0.0.1:1", "[::]:2"});
  CHECK(c.export_name == "e");
  CHECK(c.description == "d");
  CHECK(c.read_only);
  CHECK(c.foreground);
  CHECK(c.pidfile == "/p");
  CHECK(c.log_level == "trace");
  CHECK(c.direct_io == "off");
  CHECK(c.io_threads == 64);
  CHECK(c.max_payload_bytes == 4096);
  CHECK(c.max_inflight_per_connection == 4096);
  CHECK(c.max_connections == 65536);
  CHECK(c.validate().is_ok());
}

// ---- each key, wrong types ----

TEST_CASE("config: every key refuses wrong types, naming the key", "[config]") {
  const char* string_keys[] = {"backing", "export_name", "description",
                               "pidfile", "log_level",   "direct_io"};
  const char* bool_keys[] = {"read_only", "foreground"};
  const char* u32_keys[] = {"io_threads", "max_payload_bytes", "max_inflight_per_connection",
                            "max_connections"};
  const char* list_keys[] = {"unix", "listen"};
  std::vector<std::pair<std::string, std::string>> bad;  // (key, JSON value)
  for (const char* k : string_keys) {
    for (const char* v : {"1", "true", "null", "[\"a\"]", "{}", "1.5"}) bad.emplace_back(k, v);
  }
  for (const char* k : bool_keys) {
    for (const char* v : {"1", "0", "\"true\"", "null", "[]", "{}"}) bad.emplace_back(k, v);
  }
  for (const char* k : u32_keys) {
    for (const char* v : {"-1", "1.5", "2.0", "\"2\"", "true", "null", "[2]", "{}",
                          "4294967296", "18446744073709551615", "1e3"}) {
      bad.emplace_back(k, v);
    }
  }
  for (const char* k : list_keys) {
    for (const char* v : {"1", "true", "{}", "[1]", "[\"a\", 2]", "[[\"a\"]]", "[null]"}) {
      bad.emplace_back(k, v);
    }
  }
  for (const auto& [key, value] : bad) {
    const std::string text = "{\"" + key + "\": " + value + "}";
    CAPTURE(text);
    Config c = nondefault();
    Status st = merge_config_json(text, c);
    CHECK_FALSE(st.is_ok());
    CHECK(st.code() == Status::Code::kInvalid);
    CHECK(mentions(st, "'" + key + "'"));
    CHECK(same(c, nondefault()));
  }
}

TEST_CASE("config: unsigned keys take the whole 32-bit range", "[config]") {
  Config c;
  REQUIRE(merge_config_json(R"({"max_connections": 4294967295})", c).is_ok());
  CHECK(c.max_connections == UINT32_MAX);
  REQUIRE(merge_config_json(R"({"max_connections": 0})", c).is_ok());
  CHECK(c.max_connections == 0);
  CHECK_FALSE(c.validate().is_ok());  // ranges are validate()'s business
}

// ---- unknown keys, bad documents ----

TEST_CASE("config: an unknown key is an error naming it", "[config]") {
  for (const char* key : {"bogus", "io-threads", "Backing", "", "unix_sockets", "listen "}) {
    const std::string text = std::string("{\"backing\": \"/new\", \"") + key + "\": 1}";
    CAPTURE(text);
    Config c = nondefault();
    Status st = merge_config_json(text, c);
    CHECK_FALSE(st.is_ok());
    CHECK(mentions(st, std::string("'") + key + "'"));
    CHECK(same(c, nondefault()));
  }
}

TEST_CASE("config: documents that are not one JSON object", "[config]") {
  for (const char* text : {"", "   ", "[]", "[{\"backing\": \"/x\"}]", "\"backing\"", "42",
                           "null", "{", "{\"backing\": }", "{\"backing\": \"/x\",}",
                           "{\"backing\": \"/x\"} {}", "{'backing': '/x'}",
                           "{\"backing\": \"/x\" // unterminated\n"}) {
    CAPTURE(text);
    Config c = nondefault();
    Status st = merge_config_json(text, c);
    CHECK_FALSE(st.is_ok());
    CHECK(st.code() == Status::Code::kInvalid);
    CHECK(same(c, nondefault()));
  }
}

TEST_CASE("config: a failing merge leaves the config untouched", "[config]") {
  // Keys are applied in order; a bad one late in the document must not leave
  // the earlier ones applied.
  for (const char* text : {
           R"({"backing": "/new", "export_name": "new", "io_threads": "two"})",
           R"({"backing": "/new", "unix": ["/new"], "zzz_unknown": 1})",
           R"({"unix": "/new", "listen": ["ok", 5]})",
           R"({"aaa_unknown": 1, "backing": "/new"})",
       }) {
    CAPTURE(text);
    Config c = nondefault();
    CHECK_FALSE(merge_config_json(text, c).is_ok());
    CHECK(same(c, nondefault()));
  }
}

TEST_CASE("config: merging overrides only the keys given", "[config]") {
  Config c = nondefault();
  REQUIRE(merge_config_json(R"({"io_threads": 8, "unix": "/a"})", c).is_ok());
  Config want = nondefault();
  want.io_threads = 8;
  want.unix_sockets = {"/a"};
  CHECK(same(c, want));
  // A second merge replaces lists rather than appending to them.
  REQUIRE(merge_config_json(R"({"unix": ["/b", "/c"]})", c).is_ok());
  CHECK(c.unix_sockets == Strings{"/b", "/c"});
  REQUIRE(merge_config_json(R"({"unix": []})", c).is_ok());
  CHECK(c.unix_sockets.empty());
}

TEST_CASE("config: unix and listen take a string or an array", "[config]") {
  for (const char* key : {"unix", "listen"}) {
    CAPTURE(key);
    auto field = [&](Config& c) -> Strings& {
      return std::string(key) == "unix" ? c.unix_sockets : c.listen;
    };
    const std::string k = std::string("{\"") + key + "\": ";
    Config c;
    REQUIRE(merge_config_json(k + "\"one\"}", c).is_ok());
    CHECK(field(c) == Strings{"one"});
    REQUIRE(merge_config_json(k + "[\"a\", \"b\", \"c\"]}", c).is_ok());
    CHECK(field(c) == Strings{"a", "b", "c"});
    REQUIRE(merge_config_json(k + "[\"solo\"]}", c).is_ok());
    CHECK(field(c) == Strings{"solo"});
    REQUIRE(merge_config_json(k + "[]}", c).is_ok());
    CHECK(field(c).empty());
    REQUIRE(merge_config_json(k + "\"\"}", c).is_ok());
    CHECK(field(c) == Strings{""});
  }
}

TEST_CASE("config: comments are allowed", "[config]") {
  const std::string text = R"(// shadowd configuration
{
  /* the image */ "backing": "/img", // trailing comment
  // "io_threads": "not read",
  "io_threads": 4 /* block
  comment */
}
// after
)";
  Config c;
  Status st = merge_config_json(text, c);
  REQUIRE(st.is_ok());
  CHECK(c.backing == "/img");
  CHECK(c.io_threads == 4);
}

TEST_CASE("config: strings keep their escapes and UTF-8", "[config]") {
  Config c;
  REQUIRE(merge_config_json(R"({"description": "tab\tquote\" \u00e9 é"})", c).is_ok());
  CHECK(c.description == "tab\tquote\" \xc3\xa9 \xc3\xa9");
}

// ---- validate() ----

struct RangeCase {
  const char* key;
  std::function<void(Config&)> set;
  bool ok;
};

TEST_CASE("config: validate() checks ranges, naming the key", "[config]") {
  auto u32 = [](uint32_t Config::*f, uint32_t v) {
    return [f, v](Config& c) { c.*f = v; };
  };
  auto str = [](std::string Config::*f, std::string v) {
    return [f, v](Config& c) { c.*f = v; };
  };
  const std::vector<RangeCase> cases = {
      {"io_threads", u32(&Config::io_threads, 0), false},
      {"io_threads", u32(&Config::io_threads, 1), true},
      {"io_threads", u32(&Config::io_threads, 64), true},
      {"io_threads", u32(&Config::io_threads, 65), false},
      {"io_threads", u32(&Config::io_threads, UINT32_MAX), false},
      {"max_payload_bytes", u32(&Config::max_payload_bytes, 0), false},
      {"max_payload_bytes", u32(&Config::max_payload_bytes, 4095), false},
      {"max_payload_bytes", u32(&Config::max_payload_bytes, 4096), true},
      {"max_payload_bytes", u32(&Config::max_payload_bytes, 32u << 20), true},
      {"max_payload_bytes", u32(&Config::max_payload_bytes, (32u << 20) + 1), false},
      {"max_inflight_per_connection", u32(&Config::max_inflight_per_connection, 0), false},
      {"max_inflight_per_connection", u32(&Config::max_inflight_per_connection, 1), true},
      {"max_inflight_per_connection", u32(&Config::max_inflight_per_connection, 4096), true},
      {"max_inflight_per_connection", u32(&Config::max_inflight_per_connection, 4097), false},
      {"max_connections", u32(&Config::max_connections, 0), false},
      {"max_connections", u32(&Config::max_connections, 1), true},
      {"max_connections", u32(&Config::max_connections, 65536), true},
      {"max_connections", u32(&Config::max_connections, 65537), false},
      {"export_name", str(&Config::export_name, std::string(4096, 'e')), true},
      {"export_name", str(&Config::export_name, std::string(4097, 'e')), false},
      {"export_name", str(&Config::export_name, ""), true},
      {"description", str(&Config::description, std::string(4096, 'd')), true},
      {"description", str(&Config::description, std::string(4097, 'd')), false},
      {"direct_io", str(&Config::direct_io, "auto"), true},
      {"direct_io", str(&Config::direct_io, "on"), true},
      {"direct_io", str(&Config::direct_io, "off"), true},
      {"direct_io", str(&Config::direct_io, "yes"), false},
      {"direct_io", str(&Config::direct_io, "ON"), false},
      {"direct_io", str(&Config::direct_io, ""), false},
      {"log_level", str(&Config::log_level, "verbose"), false},
      {"log_level", str(&Config::log_level, "INFO"), false},
      {"log_level", str(&Config::log_level, ""), false},
  };
  for (const RangeCase& k : cases) {
    Config c;
    k.set(c);
    Status st = c.validate();
    CAPTURE(k.key, k.ok, st.message());
    CHECK(st.is_ok() == k.ok);
    if (!k.ok) CHECK(mentions(st, k.key));
  }
  for (const char* level : {"trace", "debug", "info", "warn", "error", "critical", "off"}) {
    Config c;
    c.log_level = level;
    CAPTURE(level);
    CHECK(c.validate().is_ok());
  }
}

// ---- the shadow pool keys ----

TEST_CASE("config: parse_duration reads seconds and durations", "[config]") {
  const std::vector<std::pair<const char*, uint64_t>> good = {
      {"0", 0},          {"90", 90},         {"90s", 90},           {"1sec", 1},
      {"15min", 900},    {"15m", 900},       {"2h", 7200},          {"7d", 604800},
      {"1w", 604800},    {"1d12h", 129600},  {"1h30m15s", 5415},    {"0h", 0},
      {"18446744073709551615", UINT64_MAX},  {"3650d", 3650ull * 86400},
  };
  for (const auto& [text, want] : good) {
    CAPTURE(text);
    Result<uint64_t> r = parse_duration(text);
    REQUIRE(r.is_ok());
    CHECK(*r == want);
  }
  for (const char* text : {"", "h", "s90", "1x", "1.5h", "-1", "+5", "1h30", " 1h", "1h ",
                           "2H", "1 h", "1hh", "1mins", "18446744073709551616",
                           "30500000000000000w", "1h-1m", "0x10", "1e3"}) {
    CAPTURE(text);
    Result<uint64_t> r = parse_duration(text);
    CHECK_FALSE(r.is_ok());
    CHECK(r.status().code() == Status::Code::kInvalid);
    CHECK(mentions(r.status(), "duration"));
  }
}

TEST_CASE("config: pool keys and their defaults", "[config]") {
  Config c;
  CHECK(c.pool.empty());
  CHECK_FALSE(c.init);
  CHECK(c.zone_size_bytes == 16u << 20);
  CHECK(c.retention_seconds == 7 * 86400);
  CHECK(c.pool_max_bytes == 0);
  CHECK(c.max_versions_per_segment == 8);
  CHECK(c.shadow_budget_bytes_per_s == 64ull << 20);
  CHECK(c.checkpoint_interval_s == 60);

  REQUIRE(merge_config_json(R"({
    "pool": ["/dev/fast", "/dev/slow"], "init": true, "zone_size_bytes": 4194304,
    "retention_seconds": "2h", "pool_max_bytes": 10737418240, "max_versions_per_segment": 64,
    "shadow_budget_bytes_per_s": 0, "checkpoint_interval_s": 5
  })", c).is_ok());
  CHECK(c.pool == Strings{"/dev/fast", "/dev/slow"});
  CHECK(c.init);
  CHECK(c.zone_size_bytes == 4u << 20);
  CHECK(c.retention_seconds == 7200);
  CHECK(c.pool_max_bytes == 10ull << 30);
  CHECK(c.max_versions_per_segment == 64);
  CHECK(c.shadow_budget_bytes_per_s == 0);
  CHECK(c.checkpoint_interval_s == 5);
  CHECK(c.validate().is_ok());
}

TEST_CASE("config: pool takes a path or an array of one or two", "[config]") {
  Config c;
  REQUIRE(merge_config_json(R"({"pool": "/dev/vdc"})", c).is_ok());
  CHECK(c.pool == Strings{"/dev/vdc"});
  REQUIRE(merge_config_json(R"({"pool": ["/a"]})", c).is_ok());
  CHECK(c.pool == Strings{"/a"});
  REQUIRE(merge_config_json(R"({"pool": ["/a", "/b"]})", c).is_ok());
  CHECK(c.pool == Strings{"/a", "/b"});
  // What `config get` shows without a pool reads back as no pool.
  REQUIRE(merge_config_json(R"({"pool": []})", c).is_ok());
  CHECK(c.pool.empty());
  c.pool = {"/a"};
  REQUIRE(merge_config_json(R"({"pool": null})", c).is_ok());
  CHECK(c.pool.empty());

  for (const char* v : {"1", "true", "{}", "[1]", "[\"/a\", 2]", "[\"/a\", \"/b\", \"/c\"]",
                        "\"\"", "[\"\"]", "[\"/a\", \"\"]", "[[\"/a\"]]"}) {
    const std::string text = std::string("{\"pool\": ") + v + "}";
    CAPTURE(text);
    Config d = nondefault();
    d.pool = {"/keep"};
    Status st = merge_config_json(text, d);
    CHECK_FALSE(st.is_ok());
    CHECK(st.code() == Status::Code::kInvalid);
    CHECK(mentions(st, "'pool'"));
    CHECK(d.pool == Strings{"/keep"});
  }
}

TEST_CASE("config: retention_seconds takes seconds or a duration", "[config]") {
  const std::vector<std::pair<const char*, uint64_t>> good = {
      {"3600", 3600}, {"\"90s\"", 90}, {"\"15min\"", 900}, {"\"2h\"", 7200},
      {"\"7d\"", 604800}, {"\"86400\"", 86400}, {"\"1w2d\"", 777600}};
  for (const auto& [value, want] : good) {
    const std::string text = std::string("{\"retention_seconds\": ") + value + "}";
    CAPTURE(text);
    Config c;
    REQUIRE(merge_config_json(text, c).is_ok());
    CHECK(c.retention_seconds == want);
  }
  for (const char* value : {"-1", "1.5", "true", "null", "[3600]", "{}", "\"soon\"", "\"1h30\"",
                            "\"\"", "\"2 h\"", "\"-5m\""}) {
    const std::string text = std::string("{\"retention_seconds\": ") + value + "}";
    CAPTURE(text);
    Config c;
    Status st = merge_config_json(text, c);
    CHECK_FALSE(st.is_ok());
    CHECK(mentions(st, "'retention_seconds'"));
    CHECK(c.retention_seconds == 7 * 86400);
  }
}

TEST_CASE("config: pool numeric keys refuse wrong types, naming the key", "[config]") {
  const char* u32_keys[] = {"zone_size_bytes", "max_versions_per_segment", "checkpoint_interval_s",
                            "pool_full_wait_ms"};
  const char* u64_keys[] = {"pool_max_bytes", "shadow_budget_bytes_per_s",
                            "shadow_budget_busy_bytes_per_s"};
  std::vector<std::pair<std::string, std::string>> bad;
  for (const char* k : u32_keys) {
    for (const char* v : {"-1", "1.5", "\"16M\"", "true", "null", "[1]", "4294967296"}) {
      bad.emplace_back(k, v);
    }
  }
  for (const char* k : u64_keys) {
    for (const char* v : {"-1", "1.5", "\"64M\"", "false", "null", "{}"}) bad.emplace_back(k, v);
  }
  for (const char* v : {"1", "\"true\"", "null", "[]"}) bad.emplace_back("init", v);
  for (const auto& [key, value] : bad) {
    const std::string text = "{\"" + key + "\": " + value + "}";
    CAPTURE(text);
    Config c = nondefault();
    Status st = merge_config_json(text, c);
    CHECK_FALSE(st.is_ok());
    CHECK(mentions(st, "'" + key + "'"));
    CHECK(same(c, nondefault()));
  }
}

TEST_CASE("config: validate() checks the pool keys, naming them", "[config]") {
  auto u32 = [](uint32_t Config::*f, uint32_t v) {
    return [f, v](Config& c) { c.*f = v; };
  };
  auto u64 = [](uint64_t Config::*f, uint64_t v) {
    return [f, v](Config& c) { c.*f = v; };
  };
  auto pool = [](Strings p) {
    return [p](Config& c) {
      c.backing = "/img";
      c.pool = p;
    };
  };
  const std::vector<RangeCase> cases = {
      {"zone_size_bytes", u32(&Config::zone_size_bytes, 4u << 20), true},
      {"zone_size_bytes", u32(&Config::zone_size_bytes, 1u << 30), true},
      {"zone_size_bytes", u32(&Config::zone_size_bytes, 64u << 20), true},
      {"zone_size_bytes", u32(&Config::zone_size_bytes, 2u << 20), false},
      {"zone_size_bytes", u32(&Config::zone_size_bytes, (4u << 20) - 1), false},
      {"zone_size_bytes", u32(&Config::zone_size_bytes, 24u << 20), false},
      {"zone_size_bytes", u32(&Config::zone_size_bytes, 2u << 30), false},
      {"zone_size_bytes", u32(&Config::zone_size_bytes, 0), false},
      {"retention_seconds", u64(&Config::retention_seconds, 0), false},
      {"retention_seconds", u64(&Config::retention_seconds, 1), true},
      {"retention_seconds", u64(&Config::retention_seconds, 365ull * 86400), true},
      {"retention_seconds", u64(&Config::retention_seconds, UINT64_MAX), false},
      {"max_versions_per_segment", u32(&Config::max_versions_per_segment, 1), false},
      {"max_versions_per_segment", u32(&Config::max_versions_per_segment, 2), true},
      {"max_versions_per_segment", u32(&Config::max_versions_per_segment, 64), true},
      {"max_versions_per_segment", u32(&Config::max_versions_per_segment, 65), false},
      {"checkpoint_interval_s", u32(&Config::checkpoint_interval_s, 0), false},
      {"checkpoint_interval_s", u32(&Config::checkpoint_interval_s, 1), true},
      {"checkpoint_interval_s", u32(&Config::checkpoint_interval_s, 86400), true},
      {"checkpoint_interval_s", u32(&Config::checkpoint_interval_s, 86401), false},
      {"pool_full_wait_ms", u32(&Config::pool_full_wait_ms, 0), true},
      {"pool_full_wait_ms", u32(&Config::pool_full_wait_ms, 600000), true},
      {"pool_full_wait_ms", u32(&Config::pool_full_wait_ms, 600001), false},
      {"shadow_budget_bytes_per_s", u64(&Config::shadow_budget_bytes_per_s, 0), true},
      {"pool_max_bytes", u64(&Config::pool_max_bytes, 0), true},
      {"pool", pool({"/p0"}), true},
      {"pool", pool({"/p0", "/p1"}), true},
      {"pool", pool({"/p0", "/p1", "/p2"}), false},
      {"pool", pool({"/p0", "/p0"}), false},
      {"pool", pool({"/img"}), false},
      {"pool", pool({""}), false},
  };
  for (const RangeCase& k : cases) {
    Config c;
    k.set(c);
    Status st = c.validate();
    CAPTURE(k.key, k.ok, st.message());
    CHECK(st.is_ok() == k.ok);
    if (!k.ok) CHECK(mentions(st, k.key));
  }
  // The pool journals writes: it needs a writable export.
  Config ro;
  ro.pool = {"/p0"};
  ro.read_only = true;
  Status st = ro.validate();
  CHECK_FALSE(st.is_ok());
  CHECK(mentions(st, "pool"));
  CHECK(mentions(st, "read"));
  ro.pool.clear();
  CHECK(ro.validate().is_ok());
}

// ---- files ----

const std::string kExample = std::string(SHADOWD_SOURCE_DIR) + "/config/shadowd.example.json";

TEST_CASE("config: the example file parses and validates", "[config]") {
  Config c;
  Status st = load_config_file(kExample, c);
  CAPTURE(kExample, st.message());
  REQUIRE(st.is_ok());
  CHECK(c.validate().is_ok());
  CHECK(c.backing == "/var/lib/shadowd/disk.img");
  CHECK(c.unix_sockets == Strings{"/run/shadowd/disk.nbd"});
  CHECK(c.listen == Strings{"127.0.0.1:10809"});
  CHECK(c.export_name == "disk");
  CHECK_FALSE(c.read_only);
  CHECK(c.foreground);
  CHECK(c.log_level == "info");
  CHECK(c.direct_io == "auto");
  CHECK(c.io_threads == 2);
  CHECK(c.max_payload_bytes == 33554432);
  CHECK(c.max_inflight_per_connection == 128);
  CHECK(c.max_connections == 256);
  // The pool's tunables are spelled out; the pool itself is commented out.
  CHECK(c.pool.empty());
  CHECK_FALSE(c.init);
  CHECK(c.zone_size_bytes == 16u << 20);
  CHECK(c.retention_seconds == 7 * 86400);
  CHECK(c.shadow_budget_bytes_per_s == 64ull << 20);
  CHECK(c.max_versions_per_segment == 8);
  CHECK(c.checkpoint_interval_s == 60);
}

TEST_CASE("config: a missing file is an error naming it", "[config]") {
  Config c = nondefault();
  const std::string path = std::string(SHADOWD_SOURCE_DIR) + "/config/no-such-file.json";
  Status st = load_config_file(path, c);
  CHECK_FALSE(st.is_ok());
  CHECK(mentions(st, path));
  CHECK(same(c, nondefault()));
}

TEST_CASE("config: shadow_policy takes the daemon's policies, not the simulator's oracle", "[config]") {
  for (const char* p : {"none", "lru", "heat", "priority", "ewma", "holt-winters", "arima", "sequential", "auto"}) {
    Config c;
    REQUIRE(merge_config_json(std::string("{\"shadow_policy\": \"") + p + "\"}", c).is_ok());
    CHECK(c.shadow_policy == p);
    CHECK(c.validate().is_ok());
  }
  for (const char* p : {"oracle", "belady", ""}) {
    Config c;
    CAPTURE(p);
    REQUIRE(merge_config_json(std::string("{\"shadow_policy\": \"") + p + "\"}", c).is_ok());
    Status st = c.validate();
    CHECK_FALSE(st.is_ok());
    CHECK(st.message().find("shadow_policy") != std::string::npos);
  }
}

}  // namespace
}  // namespace shadowd
