// Unit tests for the control commands (daemon/commands.h) over a real
// Monitor and a ManualClock, and for the control socket server
// (daemon/control.h) over a socket in a temporary directory.
#include <catch2/catch.hpp>

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/config.h"
#include "core/clock.h"
#include "core/memory_backend.h"
#include "core/monitor.h"
#include "ctl/protocol.h"
#include "daemon/commands.h"
#include "daemon/context.h"
#include "daemon/control.h"

namespace shadowd {
namespace {

using json = nlohmann::json;

constexpr uint32_t kSeg = 64 * 1024;
constexpr uint64_t kDevice = 16ull << 20;  // 256 segments
constexpr int64_t kNsPerS = 1'000'000'000;
constexpr int64_t kStart = 1'699'999'200;  // aligned to the hour
static_assert(kStart % 3600 == 0);

// A daemon context as main() builds it, without the NBD server.
struct Fixture {
  ManualClock clock{kStart * kNsPerS};
  std::unique_ptr<Monitor> monitor;
  DaemonContext ctx;

  explicit Fixture(bool with_monitor = true, bool test_clock = true) {
    ctx.config.backing = "/dev/null";
    ctx.config.segment_size_bytes = kSeg;
    ctx.clock = &clock;
    ctx.test_clock = test_clock ? &clock : nullptr;
    ctx.started_s = kStart;
    auto exp = std::make_shared<nbd::Export>();
    exp->name = "disk";
    exp->backend = std::make_shared<MemoryBackend>(kDevice, 1);
    ctx.export_ = exp;
    if (with_monitor) {
      MonitorConfig mc;
      mc.device_bytes = kDevice;
      mc.segment_bytes = kSeg;
      monitor = std::make_unique<Monitor>(mc, clock);
      REQUIRE(monitor->set_priority(priority_params(ctx.config)).is_ok());
      ctx.monitor = monitor.get();
    }
  }

  json run(json req, bool may_write = true) {
    if (req.is_object() && !req.contains("version")) req["version"] = ctl::kControlProtocolVersion;
    json reply = run_command(ctx, req, may_write);
    // Every reply, good or bad, carries the envelope.
    REQUIRE(reply.is_object());
    REQUIRE(reply.contains("ok"));
    REQUIRE(reply["version"] == ctl::kControlProtocolVersion);
    return reply;
  }
  json ok(json req, bool may_write = true) {
    json r = run(std::move(req), may_write);
    INFO(r.dump());
    REQUIRE(r["ok"] == true);
    return r;
  }
  // The error code of a request that must fail.
  std::string fails(json req, bool may_write = true) {
    json r = run(std::move(req), may_write);
    INFO(r.dump());
    REQUIRE(r["ok"] == false);
    REQUIRE(r["message"].is_string());
    REQUIRE(!r["message"].get<std::string>().empty());
    return r["code"].get<std::string>();
  }

  void reads(uint64_t segment, int n) {
    for (int i = 0; i < n; ++i) monitor->record(AccessOp::kRead, segment * kSeg + 512, 4096);
  }
  void writes(uint64_t segment, int n) {
    for (int i = 0; i < n; ++i) monitor->record(AccessOp::kWrite, segment * kSeg, 4096);
  }
};

std::vector<uint64_t> ids(const json& top) {
  std::vector<uint64_t> v;
  for (const auto& s : top["segments"]) v.push_back(s["id"].get<uint64_t>());
  return v;
}

// ---------------------------------------------------------------- envelope

TEST_CASE("commands: version and the request envelope", "[commands]") {
  Fixture f;
  json v = f.ok({{"cmd", "version"}});
  CHECK(v["protocol_version"] == ctl::kControlProtocolVersion);
  CHECK(v["daemon_version"].is_string());

  CHECK(f.fails(json::array({1, 2})) == "invalid_request");
  CHECK(f.fails(json("status")) == "invalid_request");
  CHECK(f.fails({{"version", 1}}) == "invalid_request");
  CHECK(f.fails({{"cmd", 7}}) == "invalid_request");
  CHECK(f.fails({{"cmd", "status"}, {"version", "1"}}) == "invalid_request");
  CHECK(f.fails({{"cmd", "status"}, {"version", 2}}) == "unsupported_version");
  CHECK(f.fails({{"cmd", "status"}, {"version", 0}}) == "unsupported_version");
  CHECK(f.fails({{"cmd", "reboot"}}) == "unknown_command");
  CHECK(f.fails({{"cmd", "status"}, {"verbose", true}}) == "invalid_argument");
  // A request without "version" is taken as this version.
  CHECK(run_command(f.ctx, json{{"cmd", "version"}}, false)["ok"] == true);
}

TEST_CASE("commands: request lines that are not JSON", "[commands]") {
  Fixture f;
  for (const char* line : {"", "{", "not json", "{\"cmd\":\"status\"} trailing", "\xff\xfe"}) {
    json r = run_command_line(f.ctx, line, true);
    CHECK(r["ok"] == false);
    CHECK(r["code"] == "invalid_json");
  }
  // Deep nesting is valid JSON and must neither crash nor be taken as a request.
  const std::string deep = std::string(200000, '[') + std::string(200000, ']');
  CHECK(run_command_line(f.ctx, deep, true)["code"] == "invalid_request");
  std::string cmd;
  CHECK(run_command_line(f.ctx, R"({"cmd":"status"})", false, &cmd)["ok"] == true);
  CHECK(cmd == "status");
}

// ------------------------------------------------------------------ status

TEST_CASE("commands: status without a server reports no connections", "[commands]") {
  Fixture f;
  f.reads(3, 2);
  f.clock.advance_ns(90 * kNsPerS);
  json s = f.ok({{"cmd", "status"}}, /*may_write=*/false);
  CHECK(s["export"]["name"] == "disk");
  CHECK(s["export"]["size_bytes"] == kDevice);
  CHECK(s["export"]["read_only"] == false);
  CHECK(s["segment_bytes"] == kSeg);
  CHECK(s["segments"] == kDevice / kSeg);
  CHECK(s["endpoints"] == json::array());
  CHECK(s["connections"]["open"] == 0);
  CHECK(s["connections"]["total"] == 0);
  CHECK(s["ops"]["read"]["requests"] == 0);
  CHECK(s["ops"]["write"]["bytes"] == 0);
  CHECK(s["ops"].contains("trim"));
  CHECK(s["uptime_seconds"] == 90);
  const json& m = s["monitor"];
  CHECK(m["enabled"] == true);
  CHECK(m["segments"] == kDevice / kSeg);
  CHECK(m["segments_active"] == 1);
  CHECK(m["dense_bytes_resident"].get<uint64_t>() > 0);
  CHECK(m["bytes_per_segment_resident"].get<double>() ==
        Approx(m["dense_bytes_resident"].get<double>() / (kDevice / kSeg)));
  CHECK(m["windows_seconds"] == json::array({3600, 86400, 604800}));
  CHECK(m["priority"]["alpha"] == 1.0);
  CHECK(m.contains("history_records"));
}

TEST_CASE("commands: without a monitor, monitor commands are unavailable", "[commands]") {
  Fixture f(/*with_monitor=*/false);
  CHECK(f.ok({{"cmd", "status"}})["monitor"]["enabled"] == false);
  CHECK(f.ok({{"cmd", "status"}})["segments"] == kDevice / kSeg);
  CHECK(f.fails({{"cmd", "top"}}) == "unavailable");
  CHECK(f.fails({{"cmd", "segment"}, {"id", 0}}) == "unavailable");
  CHECK(f.fails({{"cmd", "history.export"}}) == "unavailable");
  CHECK(f.fails({{"cmd", "config.set"}, {"key", "alpha"}, {"value", 2}}) == "unavailable");
  CHECK(f.ok({{"cmd", "config.get"}, {"key", "alpha"}})["value"] == 1.0);
}

// --------------------------------------------------------------------- top

TEST_CASE("commands: top reports exact counts per segment", "[commands]") {
  Fixture f;
  f.reads(5, 7);
  f.reads(9, 3);
  f.writes(9, 2);
  f.writes(200, 4);
  // A request spanning segments 10 and 11 counts once for each.
  f.monitor->record(AccessOp::kRead, 11 * kSeg - 512, 1024);

  json top = f.ok({{"cmd", "top"}, {"n", 100}, {"by", "reads"}, {"window", "1h"}}, false);
  CHECK(top["by"] == "reads");
  CHECK(top["window_seconds"] == 3600);
  CHECK(ids(top) == std::vector<uint64_t>{5, 9, 10, 11, 200});
  const json& s5 = top["segments"][0];
  CHECK(s5["reads"] == 7);
  CHECK(s5["writes"] == 0);
  CHECK(s5["bytes_read"] == 7 * 4096);
  CHECK(s5["offset"] == 5 * kSeg);
  CHECK(s5["length"] == kSeg);
  CHECK(s5["last_access_s"] == kStart);
  CHECK(s5["last_write_s"] == -1);
  CHECK(s5["windows"].size() == 3);
  CHECK(top["segments"][2]["bytes_read"] == 512);
  CHECK(top["segments"][3]["bytes_read"] == 512);

  CHECK(ids(f.ok({{"cmd", "top"}, {"by", "writes"}, {"n", 1}})) == std::vector<uint64_t>{200});
  // Windows as seconds or names; all three default windows.
  CHECK(f.ok({{"cmd", "top"}, {"window", 86400}})["window_seconds"] == 86400);
  CHECK(f.ok({{"cmd", "top"}, {"window", "1w"}})["window_seconds"] == 604800);
  CHECK(f.ok({{"cmd", "top"}, {"window", "3600"}})["window_seconds"] == 3600);
  CHECK(f.ok({{"cmd", "top"}})["segments"].size() == 5);  // default n 10, by priority
}

TEST_CASE("commands: top refuses bad arguments", "[commands]") {
  Fixture f;
  CHECK(f.fails({{"cmd", "top"}, {"n", 0}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "top"}, {"n", 10001}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "top"}, {"n", -1}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "top"}, {"n", "5"}}) == "invalid_argument");
  CHECK(f.fails({{"cmd", "top"}, {"n", 2.5}}) == "invalid_argument");
  CHECK(f.fails({{"cmd", "top"}, {"n", nullptr}}) == "invalid_argument");
  CHECK(f.fails({{"cmd", "top"}, {"by", "size"}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "top"}, {"by", 1}}) == "invalid_argument");
  CHECK(f.fails({{"cmd", "top"}, {"window", "2h"}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "top"}, {"window", 0}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "top"}, {"window", "soon"}}) == "invalid_argument");
  CHECK(f.fails({{"cmd", "top"}, {"window", true}}) == "invalid_argument");
  CHECK(f.fails({{"cmd", "top"}, {"limit", 5}}) == "invalid_argument");
  CHECK(f.ok({{"cmd", "top"}, {"n", 10000}})["n"] == 10000);
}

TEST_CASE("commands: priority follows the formula and config.set changes the ranking",
          "[commands]") {
  Fixture f;
  f.reads(1, 10);  // 10 accesses, no writes
  f.writes(2, 4);  // 4 accesses, all writes
  f.clock.advance_ns(100 * kNsPerS);
  json top = f.ok({{"cmd", "top"}, {"by", "priority"}});
  REQUIRE(ids(top) == std::vector<uint64_t>{1, 2});
  // baseline 0 + 1 * 10/3600 + 1 * 0 - 0.001 * 100
  CHECK(top["segments"][0]["priority"].get<double>() == Approx(10.0 / 3600 - 0.1));
  CHECK(top["segments"][1]["priority"].get<double>() == Approx(8.0 / 3600 - 0.1));
  CHECK(top["segments"][0]["access_rate"].get<double>() == Approx(10.0 / 3600));
  CHECK(top["segments"][1]["change_rate"].get<double>() == Approx(4.0 / 3600));

  json set = f.ok({{"cmd", "config.set"}, {"key", "alpha"}, {"value", 0}});
  CHECK(set["previous"] == 1.0);
  CHECK(set["value"] == 0.0);
  CHECK(f.ctx.config.alpha == 0.0);
  CHECK(f.monitor->priority().alpha == 0.0);
  CHECK(ids(f.ok({{"cmd", "top"}})) == std::vector<uint64_t>{2, 1});
  // The ranking the shadowing thread reads is rescored at once.
  CHECK(f.monitor->top_k(2) == std::vector<uint64_t>{2, 1});

  f.ok({{"cmd", "config.set"}, {"key", "alpha"}, {"value", 1}});
  f.ok({{"cmd", "config.set"}, {"key", "beta"}, {"value", -1}});
  CHECK(ids(f.ok({{"cmd", "top"}})) == std::vector<uint64_t>{1, 2});
  f.ok({{"cmd", "config.set"}, {"key", "baseline"}, {"value", 5}});
  f.ok({{"cmd", "config.set"}, {"key", "gamma"}, {"value", 0}});
  CHECK(f.ok({{"cmd", "top"}})["segments"][1]["priority"].get<double>() ==
        Approx(5.0 + 4.0 / 3600 - 4.0 / 3600));
}

// ----------------------------------------------------------------- segment

TEST_CASE("commands: segment by offset or id", "[commands]") {
  Fixture f;
  f.reads(3, 2);
  f.writes(3, 1);
  for (uint64_t offset : {3 * kSeg, 3 * kSeg + 1, 4 * kSeg - 1}) {
    json r = f.ok({{"cmd", "segment"}, {"offset", offset}}, false);
    CHECK(r["segment"]["id"] == 3);
    CHECK(r["segment"]["windows"][0]["reads"] == 2);
    CHECK(r["segment"]["windows"][0]["writes"] == 1);
    CHECK(r["segment"]["last_write_s"] == kStart);
  }
  CHECK(f.ok({{"cmd", "segment"}, {"id", 3}})["segment"]["offset"] == 3 * kSeg);
  CHECK(f.ok({{"cmd", "segment"}, {"id", 255}})["segment"]["windows"][0]["reads"] == 0);
  CHECK(f.fails({{"cmd", "segment"}, {"id", 256}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "segment"}, {"offset", kDevice}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "segment"}, {"offset", -5}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "segment"}, {"offset", "3M"}}) == "invalid_argument");
  CHECK(f.fails({{"cmd", "segment"}}) == "invalid_argument");
  CHECK(f.fails({{"cmd", "segment"}, {"id", 1}, {"offset", 0}}) == "invalid_argument");
}

// ------------------------------------------------------------------ config

TEST_CASE("commands: config.get reports every key in config-file form", "[commands]") {
  Fixture f;
  json all = f.ok({{"cmd", "config.get"}}, false);
  CHECK(all["config"]["alpha"] == 1.0);
  CHECK(all["config"]["segment_size_bytes"] == kSeg);
  CHECK(all["runtime_keys"].size() == 6);
  // What config.get shows, the config file accepts.
  Config c;
  CHECK(merge_config_json(all["config"].dump(), c).is_ok());
  CHECK(c.backing == "/dev/null");

  json one = f.ok({{"cmd", "config.get"}, {"key", "windows_seconds"}});
  CHECK(one["value"] == json::array({3600, 86400, 604800}));
  CHECK(one["runtime"] == true);
  CHECK(f.ok({{"cmd", "config.get"}, {"key", "backing"}})["runtime"] == false);
  CHECK(f.fails({{"cmd", "config.get"}, {"key", "nope"}}) == "invalid_argument");
  CHECK(f.fails({{"cmd", "config.get"}, {"key", 3}}) == "invalid_argument");
}

TEST_CASE("commands: config.set refuses and changes nothing", "[commands]") {
  Fixture f;
  const std::string before = f.ok({{"cmd", "config.get"}})["config"].dump();
  auto set = [&](json key, json value, bool may_write = true) {
    json req = {{"cmd", "config.set"}, {"key", key}, {"value", value}};
    return f.fails(req, may_write);
  };
  CHECK(set("alpha", 0, /*may_write=*/false) == "permission_denied");
  CHECK(set("alpha", "zero") == "invalid_argument");
  CHECK(set("alpha", nullptr) == "invalid_argument");
  CHECK(set("windows_seconds", 3600) == "invalid_argument");
  CHECK(set("windows_seconds", json::array({3600, "1d"})) == "invalid_argument");
  CHECK(set("windows_seconds", json::array({7})) == "out_of_range");
  CHECK(set("windows_seconds", json::array()) == "out_of_range");
  CHECK(set("windows_seconds", json::array({3600, 3600})) == "out_of_range");
  CHECK(set("windows_seconds", json::array({86400})) == "out_of_range");  // drops scoring
  CHECK(set("scoring_window_seconds", 7200) == "out_of_range");
  CHECK(set("scoring_window_seconds", -1) == "invalid_argument");
  CHECK(set("backing", "/tmp/x") == "invalid_argument");
  CHECK(set("segment_size_bytes", 65536) == "invalid_argument");
  CHECK(set("no_such_key", 1) == "invalid_argument");
  CHECK(set(1, 1) == "invalid_argument");
  CHECK(f.fails({{"cmd", "config.set"}, {"key", "alpha"}}) == "invalid_argument");
  CHECK(f.fails({{"cmd", "config.set"}, {"key", "alpha"}, {"value", 1}, {"x", 1}}) ==
        "invalid_argument");
  CHECK(f.ok({{"cmd", "config.get"}})["config"].dump() == before);
  CHECK(f.monitor->priority().alpha == 1.0);
  CHECK(f.monitor->config().window_seconds == std::vector<uint32_t>{3600, 86400, 604800});
}

TEST_CASE("commands: config.set windows and scoring window", "[commands]") {
  Fixture f;
  f.reads(4, 3);
  f.ok({{"cmd", "config.set"}, {"key", "windows_seconds"}, {"value", {3600, 7200, 86400}}});
  CHECK(f.ctx.config.windows_seconds == std::vector<uint32_t>{3600, 7200, 86400});
  CHECK(f.ok({{"cmd", "top"}, {"window", "2h"}})["segments"][0]["reads"] == 3);
  CHECK(f.fails({{"cmd", "top"}, {"window", "1w"}}) == "out_of_range");
  f.ok({{"cmd", "config.set"}, {"key", "scoring_window_seconds"}, {"value", 7200}});
  CHECK(f.monitor->priority().scoring_window_seconds == 7200);
  CHECK(f.ok({{"cmd", "top"}})["window_seconds"] == 7200);  // the default follows
  CHECK(f.fails({{"cmd", "config.set"}, {"key", "windows_seconds"}, {"value", {3600}}}) ==
        "out_of_range");
}

// ----------------------------------------------------------------- history

TEST_CASE("commands: history.export as JSON and CSV, in pages", "[commands]") {
  Fixture f;
  f.reads(1, 2);
  f.writes(1, 1);
  f.clock.advance_ns(60 * kNsPerS);
  REQUIRE(f.monitor->roll());
  f.reads(7, 5);
  f.clock.advance_ns(60 * kNsPerS);
  REQUIRE(f.monitor->roll());
  f.writes(9, 3);  // the open bucket

  json j = f.ok({{"cmd", "history.export"}, {"format", "json"}}, false);
  const json want = json::array({
      {{"t", kStart}, {"segment", 1}, {"op", "read"}, {"count", 2}, {"bytes", 8192}},
      {{"t", kStart}, {"segment", 1}, {"op", "write"}, {"count", 1}, {"bytes", 4096}},
      {{"t", kStart + 60}, {"segment", 7}, {"op", "read"}, {"count", 5}, {"bytes", 20480}},
      {{"t", kStart + 120}, {"segment", 9}, {"op", "write"}, {"count", 3}, {"bytes", 12288}},
  });
  CHECK(j["records"] == want);
  CHECK(j["more"] == false);

  json c = f.ok({{"cmd", "history.export"}, {"format", "csv"}});
  const std::string t0 = std::to_string(kStart);
  CHECK(c["csv"] == "timestamp,segment,op,count,bytes\n" + t0 + ",1,read,2,8192\n" + t0 +
                        ",1,write,1,4096\n" + std::to_string(kStart + 60) + ",7,read,5,20480\n" +
                        std::to_string(kStart + 120) + ",9,write,3,12288\n");

  // One history record per page: the pages add up to the whole.
  json rows = json::array();
  json req = {{"cmd", "history.export"}, {"limit", 1}};
  for (int page = 0; page < 10; ++page) {
    json r = f.ok(req);
    for (const auto& x : r["records"]) rows.push_back(x);
    if (r["more"] == false) break;
    req = {{"cmd", "history.export"}, {"limit", 1}};
    for (auto it = r["next"].begin(); it != r["next"].end(); ++it) req[it.key()] = it.value();
  }
  CHECK(rows == want);

  CHECK(f.fails({{"cmd", "history.export"}, {"format", "xml"}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "history.export"}, {"limit", 0}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "history.export"}, {"after_t", 5}}) == "invalid_argument");
}

// ------------------------------------------------------------------- debug

TEST_CASE("commands: debug.advance moves the test clock and rolls the windows", "[commands]") {
  Fixture f;
  f.reads(2, 6);
  json r = f.ok({{"cmd", "debug.advance"}, {"seconds", 3660}});
  CHECK(r["now_s"] == kStart + 3660);
  CHECK(r["buckets_rolled"] == 1);
  CHECK(f.ok({{"cmd", "top"}, {"window", "1h"}, {"by", "reads"}})["segments"].empty());
  json day = f.ok({{"cmd", "top"}, {"window", "1d"}, {"by", "reads"}});
  REQUIRE(day["segments"].size() == 1);
  CHECK(day["segments"][0]["reads"] == 6);
  CHECK(f.ok({{"cmd", "status"}})["uptime_seconds"] == 3660);

  CHECK(f.fails({{"cmd", "debug.advance"}, {"seconds", 60}}, false) == "permission_denied");
  CHECK(f.fails({{"cmd", "debug.advance"}, {"seconds", "1h"}}) == "invalid_argument");
  CHECK(f.fails({{"cmd", "debug.advance"}, {"seconds", -1}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "debug.advance"}}) == "invalid_argument");
  CHECK(f.clock.now_ns() / kNsPerS == kStart + 3660);  // refusals moved nothing

  Fixture real(/*with_monitor=*/true, /*test_clock=*/false);
  CHECK(real.fails({{"cmd", "debug.advance"}, {"seconds", 1}}) == "unknown_command");
}

// ------------------------------------------------------------- shadow pool

TEST_CASE("commands: without a shadow pool, history, versions and pool are unavailable",
          "[commands]") {
  Fixture f;
  for (const char* cmd : {"history", "versions", "pool"}) {
    CAPTURE(cmd);
    json r = f.run({{"cmd", cmd}}, /*may_write=*/false);
    CHECK(r["ok"] == false);
    CHECK(r["code"] == "unavailable");
    CHECK(r["message"] == "no shadow pool configured (start shadowd with --pool)");
  }
  CHECK(f.fails({{"cmd", "versions"}, {"segment", "#1"}}) == "unavailable");
  CHECK(f.fails({{"cmd", "pool"}, {"zones", true}}) == "unavailable");
  // `history export` (the access history) does not need a pool.
  CHECK(f.ok({{"cmd", "history.export"}})["more"] == false);
  CHECK(f.ok({{"cmd", "status"}})["shadow"] == json{{"enabled", false}});
  // The pool's run-time keys need a pool; config.get still shows them.
  CHECK(f.fails({{"cmd", "config.set"}, {"key", "retention_seconds"}, {"value", 60}}) ==
        "unavailable");
  CHECK(f.fails({{"cmd", "config.set"}, {"key", "shadow_budget_bytes_per_s"}, {"value", 0}}) ==
        "unavailable");
  CHECK(f.ok({{"cmd", "config.get"}, {"key", "retention_seconds"}})["runtime"] == false);
  CHECK(f.ok({{"cmd", "config.get"}, {"key", "pool"}})["value"] == json::array());
  CHECK(f.ctx.config.retention_seconds == 7 * 86400);
}

// A ShadowStore with canned figures; records the run-time setters.
class FakeStore final : public ShadowStore {
 public:
  StoreStats st;
  std::vector<ZoneInfo> zone_list;
  std::vector<SegmentHistory> history;  // ascending by segment
  std::vector<uint64_t> budgets, retentions;

  std::shared_ptr<IoBackend> backend() override { return nullptr; }
  void start() override {}
  Status stop() override { return Status::ok(); }
  void abandon() override {}
  uint32_t segment_bytes() const override { return kSeg; }
  StoreStats stats() const override { return st; }
  std::vector<ZoneInfo> zones() const override { return zone_list; }
  std::vector<SegmentHistory> segments(uint64_t first, size_t limit) const override {
    std::vector<SegmentHistory> out;
    for (const SegmentHistory& h : history) {
      if (h.segment < first) continue;
      if (limit != 0 && out.size() == limit) break;
      out.push_back(h);
    }
    return out;
  }
  std::optional<SegmentHistory> segment(uint64_t id) const override {
    for (const SegmentHistory& h : history) {
      if (h.segment == id) return h;
    }
    return std::nullopt;
  }
  void set_budget(uint64_t b) override { budgets.push_back(b); }
  void set_retention(uint64_t s) override { retentions.push_back(s); }
  void set_policy_params(const PolicyParams& p) override { policy = p; }
  PolicyParams policy_params() const override { return policy; }
  void set_max_versions(uint32_t n) override { max_versions = n; }
  PolicyParams policy;
  uint32_t max_versions = 0;
  Status shadow_segment(uint64_t) override { return Status::ok(); }
  Status prune(int64_t) override { return Status::ok(); }
  Status checkpoint() override { return Status::ok(); }
  void shadow_round() override {}
  Status check_index() const override { return Status::ok(); }
  Result<std::vector<uint8_t>> reconstruct_seq(uint64_t, uint64_t) override {
    return Status::not_supported("fake");
  }
  Result<std::vector<uint8_t>> reconstruct_time(uint64_t, int64_t) override {
    return Status::not_supported("fake");
  }
  uint64_t seq_at(int64_t) const override { return 0; }
  int64_t time_of(uint64_t) const override { return 0; }
  void pin(int64_t) override {}
  void unpin(int64_t) override {}
  Result<SegmentAt> reconstruct_at(uint64_t, uint64_t) override { return Status::not_supported("fake"); }
  uint32_t source_of(uint64_t, uint64_t) const override { return kFromPrimary; }
  Result<bool> read_primary_at(uint64_t, uint64_t, uint64_t, uint8_t*) override { return false; }
  std::vector<uint64_t> segments_changed_after(uint64_t) const override { return {}; }
  uint64_t stable_seq() const override { return st.last_seq; }
  VerifyReport verify_pool() override { return {}; }
};

constexpr int64_t kT0 = kStart * kNsPerS;

FakeStore fake_store() {
  FakeStore s;
  s.st.epoch_ns = kT0 - 3600 * kNsPerS;
  s.st.retention_start_ns = kT0 - 1800 * kNsPerS;
  s.st.newest_ns = kT0 + 250'000'000;  // .25 s
  s.st.first_seq = 10;
  s.st.last_seq = 99;
  s.st.journal_records = 90;
  s.st.journal_bytes = 100000;
  s.st.journal_raw_bytes = 400000;
  s.st.versions = 3;
  s.st.version_bytes = 50000;
  s.st.version_raw_bytes = 3 * kSeg;
  s.st.segments_with_history = 2;
  s.st.client_bytes_written = 400000;
  s.st.pool_bytes_written = 600000;
  s.st.cow_stalls = 4;
  s.st.versions_made = 2;
  s.st.zones_reclaimed = 1;
  s.st.checkpoints = 5;
  s.st.shadow_budget_bytes_per_s = 64ull << 20;
  s.st.shadow_queue = 7;
  s.st.shadow_bytes_read = 3 * kSeg;
  s.st.last_checkpoint_ns = kT0 - 30 * kNsPerS;
  s.st.segment_bytes = kSeg;
  TierUse t0;
  t0.tier = 0;
  t0.path = "/dev/fast";
  t0.zones = 8;
  t0.zones_free = 5;
  t0.zone_bytes = 4u << 20;
  t0.bytes_used = 8u << 20;
  t0.versions = 3;
  t0.version_bytes = 50000;
  TierUse t1 = t0;
  t1.tier = 1;
  t1.path = "/dev/slow";
  t1.zones_free = 8;
  t1.bytes_used = 0;
  t1.versions = 0;
  t1.version_bytes = 0;
  s.st.tiers = {t0, t1};
  for (uint32_t i = 0; i < 8; ++i) {
    ZoneInfo z;
    z.tier = 0;
    z.index = i;
    z.kind = i == 0   ? pool::ZoneKind::kJournal
             : i == 1 ? pool::ZoneKind::kVersions
             : i == 2 ? pool::ZoneKind::kCheckpoint
                      : pool::ZoneKind::kFree;
    z.open = i < 2;
    s.zone_list.push_back(z);
    z.tier = 1;
    z.kind = pool::ZoneKind::kFree;
    z.open = false;
    s.zone_list.push_back(z);
  }
  SegmentHistory h3;
  h3.segment = 3;
  h3.records = 5;
  h3.first_record_seq = 12;
  h3.last_record_seq = 40;
  h3.first_record_ns = kT0 - 100 * kNsPerS;
  h3.last_record_ns = kT0;
  VersionInfo v;
  v.segment = 3;
  v.seq = 11;
  v.time_ns = kT0 - 200 * kNsPerS;
  v.zone = 1;
  v.offset = 4096;
  v.stored_bytes = 30000;
  v.content_xxh = 0xabcdef;
  v.cow = true;
  h3.versions.push_back(v);
  v.seq = 30;
  v.time_ns = kT0 - 50 * kNsPerS;
  v.offset = 40960;
  v.stored_bytes = 2000;
  v.depth = 1;
  v.base_seq = 11;
  v.cow = false;
  h3.versions.push_back(v);
  SegmentHistory h9;
  h9.segment = 9;
  h9.records = 2;
  v.segment = 9;
  v.seq = 50;
  v.depth = 0;
  v.base_seq = 0;
  h9.versions.push_back(v);
  SegmentHistory h200;
  h200.segment = 200;
  h200.records = 1;
  s.history = {h3, h9, h200};
  return s;
}

TEST_CASE("commands: history reports the restorable window", "[commands]") {
  Fixture f;
  FakeStore store = fake_store();
  f.ctx.store = &store;
  json h = f.ok({{"cmd", "history"}}, /*may_write=*/false);
  CHECK(h["from_ns"] == kT0 - 1800 * kNsPerS);
  CHECK(h["to_ns"] == kT0 + 250'000'000);
  CHECK(h["from"] == "2023-11-14T21:30:00Z");
  CHECK(h["to"] == "2023-11-14T22:00:00.25Z");
  CHECK(h["epoch"] == "2023-11-14T21:00:00Z");
  CHECK(h["span_seconds"] == 1800);
  CHECK(h["first_seq"] == 10);
  CHECK(h["last_seq"] == 99);
  CHECK(h["retention_seconds"] == 7 * 86400);
  CHECK(h["retention_shrunk"] == false);
  CHECK(h["journal_records"] == 90);
  CHECK(h["journal_raw_bytes"] == 400000);
  CHECK(h["versions"] == 3);
  CHECK(h["segments_with_history"] == 2);
  CHECK(h["degraded"] == false);
  REQUIRE(h["tiers"].size() == 2);
  CHECK(h["tiers"][0]["path"] == "/dev/fast");
  CHECK(h["tiers"][0]["zones_used"] == 3);
  CHECK(h["tiers"][0]["capacity_bytes"] == 32u << 20);
  CHECK(h["tiers"][0]["utilisation_percent"].get<double>() == Approx(25.0));
  CHECK(h["tiers"][1]["zones_free"] == 8);
  CHECK(f.fails({{"cmd", "history"}, {"export", true}}) == "invalid_argument");

  store.st.degraded = true;
  store.st.degraded_reason = "pool device /dev/fast: I/O error";
  json d = f.ok({{"cmd", "history"}});
  CHECK(d["degraded"] == true);
  CHECK(d["degraded_reason"] == "pool device /dev/fast: I/O error");
}

TEST_CASE("commands: versions of one segment, by id or offset", "[commands]") {
  Fixture f;
  FakeStore store = fake_store();
  f.ctx.store = &store;
  for (json target : {json("#3"), json(3 * kSeg), json(3 * kSeg + 5), json("192K"),
                      json("192KiB"), json(std::to_string(4 * kSeg - 1))}) {
    CAPTURE(target);
    json r = f.ok({{"cmd", "versions"}, {"segment", target}}, false);
    const json& s = r["segment"];
    CHECK(s["id"] == 3);
    CHECK(s["offset"] == 3 * kSeg);
    CHECK(s["records"] == 5);
    CHECK(s["first_record_seq"] == 12);
    CHECK(s["last_record"] == "2023-11-14T22:00:00Z");
    REQUIRE(s["versions"].size() == 2);
    const json& v0 = s["versions"][0];
    CHECK(v0["seq"] == 11);
    CHECK(v0["kind"] == "full");
    CHECK(v0["checksum"] == "0000000000abcdef");
    CHECK(v0["cow"] == true);
    CHECK(v0["zone"] == 1);
    CHECK(v0["offset"] == 4096);
    CHECK(v0["time"] == "2023-11-14T21:56:40Z");
    const json& v1 = s["versions"][1];
    CHECK(v1["kind"] == "delta");
    CHECK(v1["depth"] == 1);
    CHECK(v1["base_seq"] == 11);
    CHECK(v1["stored_bytes"] == 2000);
  }
  // A segment without history: no versions, no records.
  json quiet = f.ok({{"cmd", "versions"}, {"segment", "#4"}});
  CHECK(quiet["segment"]["versions"] == json::array());
  CHECK(quiet["segment"]["records"] == 0);
  CHECK(quiet["segment"]["last_record"] == nullptr);

  CHECK(f.fails({{"cmd", "versions"}, {"segment", "#256"}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "versions"}, {"segment", kDevice}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "versions"}, {"segment", "16M"}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "versions"}, {"segment", -1}}) == "out_of_range");
  for (json bad : {json("#"), json("#x"), json("3Q"), json("1.5M"), json(""), json(true),
                   json(2.5), json::array({1})}) {
    CAPTURE(bad);
    CHECK(f.fails({{"cmd", "versions"}, {"segment", bad}}) == "invalid_argument");
  }
  CHECK(f.fails({{"cmd", "versions"}, {"segment", "#3"}, {"limit", 5}}) == "invalid_argument");
}

TEST_CASE("commands: versions lists the segments with history, in pages", "[commands]") {
  Fixture f;
  FakeStore store = fake_store();
  f.ctx.store = &store;
  json all = f.ok({{"cmd", "versions"}}, false);
  CHECK(all["more"] == false);
  CHECK(!all.contains("next"));
  REQUIRE(all["segments"].size() == 3);
  CHECK(all["segments"][0]["id"] == 3);
  CHECK(all["segments"][0]["versions"] == 2);
  CHECK(all["segments"][0]["version_bytes"] == 32000);
  CHECK(all["segments"][0]["records"] == 5);
  CHECK(all["segments"][0]["oldest_version"] == "2023-11-14T21:56:40Z");
  CHECK(all["segments"][1]["offset"] == 9 * kSeg);
  CHECK(all["segments"][2]["versions"] == 0);
  CHECK(all["segments"][2]["oldest_version"] == nullptr);

  std::vector<uint64_t> seen;
  json req = {{"cmd", "versions"}, {"limit", 1}};
  for (int page = 0; page < 10; ++page) {
    json r = f.ok(req);
    for (const auto& x : r["segments"]) seen.push_back(x["id"].get<uint64_t>());
    if (r["more"] == false) break;
    req = {{"cmd", "versions"}, {"limit", 1}, {"first", r["next"]["first"]}};
  }
  CHECK(seen == std::vector<uint64_t>{3, 9, 200});
  CHECK(f.ok({{"cmd", "versions"}, {"first", 10}})["segments"].size() == 1);
  CHECK(f.fails({{"cmd", "versions"}, {"limit", 0}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "versions"}, {"limit", 10001}}) == "out_of_range");
  CHECK(f.fails({{"cmd", "versions"}, {"first", "3"}}) == "invalid_argument");
}

TEST_CASE("commands: pool reports zones, use, compression and reclaim", "[commands]") {
  Fixture f;
  FakeStore store = fake_store();
  f.ctx.store = &store;
  json p = f.ok({{"cmd", "pool"}}, false);
  REQUIRE(p["tiers"].size() == 2);
  const json& t0 = p["tiers"][0];
  CHECK(t0["zones_by_kind"] ==
        json{{"free", 5}, {"journal", 1}, {"versions", 1}, {"checkpoint", 1}, {"history", 0}});
  CHECK(t0["zones_open"] == 2);
  CHECK(p["tiers"][1]["zones_by_kind"]["free"] == 8);
  CHECK(p["capacity_bytes"] == 64u << 20);
  CHECK(p["bytes_used"] == 8u << 20);
  CHECK(p["utilisation_percent"].get<double>() == Approx(12.5));
  CHECK(p["version_compression"].get<double>() == Approx(3.0 * kSeg / 50000));
  CHECK(p["journal_compression"].get<double>() == Approx(4.0));
  CHECK(p["pool_bytes_per_client_byte"].get<double>() == Approx(1.5));
  CHECK(p["zones_reclaimed"] == 1);
  CHECK(p["checkpoints"] == 5);
  CHECK(p["last_checkpoint"] == "2023-11-14T21:59:30Z");
  CHECK(!p.contains("zones"));

  json z = f.ok({{"cmd", "pool"}, {"zones", true}});
  REQUIRE(z["zones"].size() == 16);
  CHECK(z["zones"][0] == json{{"tier", 0}, {"index", 0}, {"kind", "journal"}, {"gen", 0},
                              {"used_bytes", 0}, {"live_entries", 0}, {"open", true}});
  CHECK(f.fails({{"cmd", "pool"}, {"zones", 1}}) == "invalid_argument");

  // Nothing written yet: ratios are null, not a division by zero.
  store.st = StoreStats{};
  json empty = f.ok({{"cmd", "pool"}});
  CHECK(empty["version_compression"] == nullptr);
  CHECK(empty["pool_bytes_per_client_byte"] == nullptr);
  CHECK(empty["last_checkpoint"] == nullptr);
}

TEST_CASE("commands: status shows the shadow pool", "[commands]") {
  Fixture f;
  FakeStore store = fake_store();
  f.ctx.store = &store;
  const json sh = f.ok({{"cmd", "status"}})["shadow"];
  CHECK(sh["enabled"] == true);
  CHECK(sh["pool"] == json::array({"/dev/fast", "/dev/slow"}));
  CHECK(sh["budget_bytes_per_s"] == 64ull << 20);
  CHECK(sh["queue"] == 7);
  CHECK(sh["bytes_read"] == 3 * kSeg);
  CHECK(sh["versions_made"] == 2);
  CHECK(sh["cow_stalls"] == 4);
  CHECK(sh["degraded"] == false);
  CHECK(sh["last_checkpoint_ns"] == kT0 - 30 * kNsPerS);
}

TEST_CASE("commands: config.set changes the pool's run-time tunables", "[commands]") {
  Fixture f;
  FakeStore store = fake_store();
  f.ctx.store = &store;
  json all = f.ok({{"cmd", "config.get"}});
  CHECK(all["runtime_keys"].size() == 8);
  CHECK(f.ok({{"cmd", "config.get"}, {"key", "retention_seconds"}})["runtime"] == true);

  json r = f.ok({{"cmd", "config.set"}, {"key", "retention_seconds"}, {"value", "2h"}});
  CHECK(r["previous"] == 7 * 86400);
  CHECK(r["value"] == 7200);
  CHECK(store.retentions == std::vector<uint64_t>{7200});
  CHECK(f.ctx.config.retention_seconds == 7200);
  f.ok({{"cmd", "config.set"}, {"key", "shadow_budget_bytes_per_s"}, {"value", 0}});
  CHECK(store.budgets == std::vector<uint64_t>{0});
  CHECK(f.ctx.config.shadow_budget_bytes_per_s == 0);

  CHECK(f.fails({{"cmd", "config.set"}, {"key", "retention_seconds"}, {"value", 0}}) ==
        "out_of_range");
  CHECK(f.fails({{"cmd", "config.set"}, {"key", "retention_seconds"}, {"value", "soon"}}) ==
        "invalid_argument");
  CHECK(f.fails({{"cmd", "config.set"}, {"key", "retention_seconds"}, {"value", 60}}, false) ==
        "permission_denied");
  CHECK(store.retentions.size() == 1);
  for (const char* key : {"pool", "init", "zone_size_bytes", "pool_max_bytes",
                          "max_versions_per_segment", "checkpoint_interval_s"}) {
    CAPTURE(key);
    json bad = f.run({{"cmd", "config.set"}, {"key", key}, {"value", 4}});
    CHECK(bad["code"] == "invalid_argument");
    CHECK(bad["message"].get<std::string>().find("cannot be changed at run time") !=
          std::string::npos);
  }
  // The pool's tunables do not need the monitor.
  Fixture bare(/*with_monitor=*/false);
  bare.ctx.store = &store;
  bare.ok({{"cmd", "config.set"}, {"key", "shadow_budget_bytes_per_s"}, {"value", 1048576}});
  CHECK(store.budgets.back() == 1048576);
  CHECK(bare.fails({{"cmd", "config.set"}, {"key", "alpha"}, {"value", 2}}) == "unavailable");
}

TEST_CASE("commands: SIGHUP's apply_runtime_config and start-time keys", "[commands]") {
  Fixture f;
  FakeStore store = fake_store();
  f.ctx.store = &store;
  Config next = f.ctx.config;
  next.retention_seconds = 3600;
  next.alpha = 3;
  next.pool_max_bytes = 1ull << 30;  // start-time only
  next.pool = {"/dev/other"};
  {
    std::lock_guard<std::mutex> lock(f.ctx.config_mu);
    CHECK(start_time_changes(f.ctx.config, next) ==
          std::vector<std::string>{"pool", "pool_max_bytes"});
    REQUIRE(apply_runtime_config(f.ctx, next).is_ok());
  }
  CHECK(store.retentions == std::vector<uint64_t>{3600});
  CHECK(store.budgets.empty());  // unchanged: not set again
  CHECK(f.ctx.config.retention_seconds == 3600);
  CHECK(f.ctx.config.alpha == 3);
  CHECK(f.ctx.config.pool_max_bytes == 0);
  CHECK(f.ctx.config.pool.empty());
  CHECK(start_time_changes(f.ctx.config, f.ctx.config).empty());
}

// ------------------------------------------------------------ control socket

// A private directory, removed with its contents.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/shadowd-ctl-XXXXXX";
    REQUIRE(mkdtemp(tmpl) != nullptr);
    path = tmpl;
  }
  ~TempDir() { std::system(("rm -rf '" + path + "'").c_str()); }
};

int connect_unix(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::strncpy(sa.sun_path, path.c_str(), sizeof sa.sun_path - 1);
  REQUIRE(connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0);
  return fd;
}

void send_text(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return;  // the server may close first (line too long)
    off += static_cast<size_t>(n);
  }
}

// Reads one reply line; empty on EOF.
std::string read_line(int fd) {
  std::string line;
  char c;
  while (recv(fd, &c, 1, 0) == 1) {
    if (c == '\n') return line;
    line += c;
  }
  return line;
}

json ask(int fd, const std::string& line) {
  send_text(fd, line + "\n");
  return json::parse(read_line(fd));
}

TEST_CASE("control: socket mode, requests, pipelining and limits", "[control]") {
  Fixture f;
  TempDir dir;
  const std::string path = dir.path + "/ctl.sock";
  ControlServer server(f.ctx, path, "");
  REQUIRE(server.start().is_ok());
  struct stat st;
  REQUIRE(lstat(path.c_str(), &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  CHECK((st.st_mode & 0777) == 0660);

  int fd = connect_unix(path);
  CHECK(ask(fd, R"({"version":1,"cmd":"version"})")["ok"] == true);
  CHECK(ask(fd, "{oops")["code"] == "invalid_json");
  CHECK(ask(fd, "[]")["code"] == "invalid_request");
  CHECK(ask(fd, R"({"cmd":"top","n":0})")["code"] == "out_of_range");
  // Two requests in one write, answered in order; CRLF is accepted.
  send_text(fd, "{\"cmd\":\"version\"}\r\n{\"cmd\":\"nope\"}\n");
  CHECK(json::parse(read_line(fd))["ok"] == true);
  CHECK(json::parse(read_line(fd))["code"] == "unknown_command");
  // We are root (or the test runs as the daemon's user): mutating allowed for uid 0 only.
  const json set = ask(fd, R"({"cmd":"config.set","key":"alpha","value":2})");
  CHECK(set["ok"] == (geteuid() == 0));

  // A line over the limit: one line_too_long reply, then EOF.
  int big = connect_unix(path);
  send_text(big, std::string(ctl::kMaxRequestLineBytes + 4096, 'x'));
  CHECK(json::parse(read_line(big))["code"] == "line_too_long");
  CHECK(read_line(big).empty());
  close(big);

  // Half a request, then gone: the server shrugs.
  int gone = connect_unix(path);
  send_text(gone, R"({"cmd":"sta)");
  close(gone);
  CHECK(ask(fd, R"({"cmd":"status"})")["ok"] == true);

  // Past kMaxClients, a connection gets "unavailable" and is closed.
  std::vector<int> fds;
  for (size_t i = 1; i < ControlServer::kMaxClients; ++i) {
    fds.push_back(connect_unix(path));
    CHECK(ask(fds.back(), R"({"cmd":"version"})")["ok"] == true);  // accepted, served
  }
  int extra = connect_unix(path);
  CHECK(json::parse(read_line(extra))["code"] == "unavailable");
  close(extra);
  for (int x : fds) close(x);
  CHECK(ask(fd, R"({"cmd":"version"})")["ok"] == true);
  close(fd);

  server.stop();
  CHECK(lstat(path.c_str(), &st) != 0);  // removed
}

TEST_CASE("control: stale sockets are replaced; other files and live sockets are not",
          "[control]") {
  Fixture f;
  TempDir dir;
  const std::string path = dir.path + "/ctl.sock";
  {
    // A socket file nobody listens on.
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strncpy(sa.sun_path, path.c_str(), sizeof sa.sun_path - 1);
    REQUIRE(bind(s, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0);
    close(s);
  }
  ControlServer a(f.ctx, path, "");
  REQUIRE(a.start().is_ok());
  ControlServer b(f.ctx, path, "");
  CHECK_FALSE(b.start().is_ok());  // a is alive there
  a.stop();

  const std::string file = dir.path + "/plain";
  REQUIRE(std::system(("touch '" + file + "'").c_str()) == 0);
  ControlServer c(f.ctx, file, "");
  CHECK_FALSE(c.start().is_ok());

  ControlServer d(f.ctx, dir.path + "/g.sock", "no-such-group-shadowd");
  const Status st = d.start();
  CHECK_FALSE(st.is_ok());
  CHECK(st.message().find("no-such-group-shadowd") != std::string::npos);
}

}  // namespace
}  // namespace shadowd
