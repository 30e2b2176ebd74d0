// shadowctl: the operator's command line for shadowd.
//
// Most commands talk to the daemon's control socket (ctl/protocol.h); `info`
// inspects an export over NBD itself (libnbd). Human output is tables with
// units; --json prints the daemon's reply as one JSON object instead.
#include <libnbd.h>

#include <cstdio>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "ctl/client.h"
#include "ctl/format.h"
#include "ctl/protocol.h"
#include "version.h"

namespace {

using shadowd::ctl::ControlError;
using shadowd::ctl::json;
namespace ctl = shadowd::ctl;

constexpr int kExitOk = 0;
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;

struct Globals {
  std::string socket;
  bool json = false;
};

// A usage problem found after parsing (a malformed OFFSET, KEY=VALUE, ...).
int usage(const std::string& message) {
  std::fprintf(stderr, "shadowctl: %s\nRun with --help for more information.\n", message.c_str());
  return kExitUsage;
}

int report(const Globals& g, const ControlError& e) {
  std::fprintf(stderr, "shadowctl: %s: %s\n", e.code.c_str(), e.message.c_str());
  if (g.json) std::printf("%s", ctl::encode_line(ctl::error_reply(e)).c_str());
  return kExitError;
}

// Run one command on the daemon. nullopt after an error was reported.
std::optional<json> call(const Globals& g, std::string_view cmd, json args = json::object()) {
  auto reply = ctl::call(ctl::socket_path(g.socket), ctl::make_request(cmd, std::move(args)));
  if (auto* e = std::get_if<ControlError>(&reply)) {
    report(g, *e);
    return std::nullopt;
  }
  json& r = std::get<json>(reply);
  if (auto e = ctl::check_reply(r)) {
    std::fprintf(stderr, "shadowctl: %s: %s\n", e->code.c_str(), e->message.c_str());
    if (g.json)
      std::printf("%s", ctl::encode_line(r.is_object() ? r : ctl::error_reply(*e)).c_str());
    return std::nullopt;
  }
  return std::move(r);
}

int print_json(const json& j) {
  std::printf("%s", ctl::encode_line(j).c_str());
  return kExitOk;
}

std::string str(const json& j) { return j.is_string() ? j.get<std::string>() : j.dump(); }
uint64_t u64(const json& j) { return j.is_number() ? j.get<uint64_t>() : 0; }
int64_t i64(const json& j) { return j.is_number() ? j.get<int64_t>() : 0; }
double num(const json& j) { return j.is_number() ? j.get<double>() : 0.0; }

std::string windows_text(const json& list) {
  std::string s;
  for (const auto& w : list) s += (s.empty() ? "" : " ") + ctl::format_window(u64(w));
  return s;
}

// ------------------------------------------------------------------ info

std::string uri_for(const std::string& uri, const std::string& unix_path, const std::string& name) {
  if (!uri.empty()) return uri;
  return "nbd+unix:///" + name + "?socket=" + unix_path;
}

int cmd_info(const std::string& uri, bool as_json) {
  nbd_handle* h = nbd_create();
  if (h == nullptr) {
    std::fprintf(stderr, "shadowctl: %s\n", nbd_get_error());
    return kExitError;
  }
  nbd_set_request_structured_replies(h, true);
  nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION);
  nbd_set_full_info(h, true);
  if (nbd_connect_uri(h, uri.c_str()) < 0) {
    std::fprintf(stderr, "shadowctl: cannot connect to %s: %s\n", uri.c_str(), nbd_get_error());
    nbd_close(h);
    return kExitError;
  }
  json j;
  j["uri"] = uri;
  char* name = nbd_get_canonical_export_name(h);
  j["export_name"] = name ? name : "";
  free(name);
  char* desc = nbd_get_export_description(h);
  j["description"] = desc ? desc : "";
  free(desc);
  j["size_bytes"] = nbd_get_size(h);
  j["read_only"] = nbd_is_read_only(h) == 1;
  j["can_flush"] = nbd_can_flush(h) == 1;
  j["can_fua"] = nbd_can_fua(h) == 1;
  j["can_trim"] = nbd_can_trim(h) == 1;
  j["can_zero"] = nbd_can_zero(h) == 1;
  j["can_cache"] = nbd_can_cache(h) == 1;
  j["can_multi_conn"] = nbd_can_multi_conn(h) == 1;
  j["base_allocation"] = nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
  j["structured_replies"] = nbd_get_structured_replies_negotiated(h) == 1;
  j["block_size_min"] = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
  j["block_size_preferred"] = nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED);
  j["block_size_max"] = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
  nbd_shutdown(h, 0);
  nbd_close(h);
  if (as_json) return print_json(j);
  for (auto it = j.begin(); it != j.end(); ++it) {
    std::printf("%-22s %s\n", it.key().c_str(), str(*it).c_str());
  }
  return kExitOk;
}

// ---------------------------------------------------------------- status

void print_status(const json& r) {
  const json& e = r["export"];
  const json& m = r["monitor"];
  ctl::Table t({"", ""});
  t.add({"export", str(e["name"]) + "  " + ctl::format_bytes(u64(e["size_bytes"])) + "  " +
                       (e["read_only"].get<bool>() ? "read-only" : "read-write")});
  t.add({"backing", str(e["backing"])});
  std::string endpoints;
  for (const auto& ep : r["endpoints"]) endpoints += (endpoints.empty() ? "" : ", ") + str(ep);
  t.add({"endpoints", endpoints.empty() ? "-" : endpoints});
  t.add({"segments",
         std::to_string(u64(r["segments"])) + " x " + ctl::format_bytes(u64(r["segment_bytes"]))});
  t.add({"clients", std::to_string(u64(r["connections"]["open"])) + " connected, " +
                        std::to_string(u64(r["connections"]["total"])) + " since start"});
  t.add({"uptime", ctl::format_span(i64(r["uptime_seconds"])) + " (since " +
                       ctl::format_utc(i64(r["started_s"])) + ")"});
  if (m.value("enabled", false)) {
    char per[32];
    std::snprintf(per, sizeof per, "%.1f", num(m["bytes_per_segment_resident"]));
    t.add({"monitor", ctl::format_bytes(u64(m["dense_bytes_resident"])) + " resident (" + per +
                          " B/segment), " + std::to_string(u64(m["segments_active"])) +
                          " segments active"});
    t.add({"history", std::to_string(u64(m["history_records"])) + " records (" +
                          ctl::format_bytes(u64(m["history_bytes"])) + "), " +
                          std::to_string(u64(m["history_dropped_records"])) + " dropped"});
    const json& p = m["priority"];
    t.add({"windows", windows_text(m["windows_seconds"]) + "  (buckets of " +
                          ctl::format_window(u64(m["bucket_seconds"])) + ")"});
    t.add({"priority", "baseline " + ctl::format_number(num(p["baseline"])) + ", alpha " +
                           ctl::format_number(num(p["alpha"])) + ", beta " +
                           ctl::format_number(num(p["beta"])) + ", gamma " +
                           ctl::format_number(num(p["gamma"])) + " over " +
                           ctl::format_window(u64(p["scoring_window_seconds"]))});
  } else {
    t.add({"monitor", "off"});
  }
  std::printf("%s\n", t.render(/*header=*/false).c_str());

  ctl::Table ops({"OP", "REQUESTS", "BYTES", "ERRORS"});
  ops.right({1, 2, 3});
  // The daemon's op names, in the order an operator reads them.
  for (const char* op :
       {"read", "write", "write_zeroes", "trim", "flush", "cache", "block_status", "other"}) {
    auto it = r["ops"].find(op);
    if (it == r["ops"].end()) continue;
    ops.add({op, std::to_string(u64((*it)["requests"])), ctl::format_bytes(u64((*it)["bytes"])),
             std::to_string(u64((*it)["errors"]))});
  }
  std::printf("%s", ops.render().c_str());
}

int cmd_status(const Globals& g) {
  auto r = call(g, "status");
  if (!r) return kExitError;
  if (g.json) return print_json(*r);
  print_status(*r);
  return kExitOk;
}

// ------------------------------------------------------------ top, segment

int cmd_top(const Globals& g, uint64_t n, const std::string& by, const std::string& window) {
  json args = {{"n", n}, {"by", by}};
  if (!window.empty()) args["window"] = window;
  auto r = call(g, "top", args);
  if (!r) return kExitError;
  if (g.json) return print_json(*r);
  const int64_t now = i64((*r)["now_s"]);
  std::printf("top %zu segments by %s over %s (segment size %s)\n", (*r)["segments"].size(),
              by.c_str(), ctl::format_window(u64((*r)["window_seconds"])).c_str(),
              ctl::format_bytes(u64((*r)["segment_bytes"])).c_str());
  ctl::Table t({"RANK", "SEGMENT", "OFFSET", "READS", "WRITES", "READ", "WRITTEN", "ACCESS/S",
                "CHANGE/S", "LAST ACCESS", "PRIORITY"});
  t.right({0, 1, 2, 3, 4, 5, 6, 7, 8, 10});
  size_t rank = 0;
  for (const json& s : (*r)["segments"]) {
    t.add({std::to_string(++rank), "#" + std::to_string(u64(s["id"])),
           ctl::format_offset(u64(s["offset"])), std::to_string(u64(s["reads"])),
           std::to_string(u64(s["writes"])), ctl::format_bytes(u64(s["bytes_read"])),
           ctl::format_bytes(u64(s["bytes_written"])), ctl::format_rate(num(s["access_rate"])),
           ctl::format_rate(num(s["change_rate"])), ctl::format_age(i64(s["last_access_s"]), now),
           ctl::format_number(num(s["priority"]))});
  }
  std::printf("%s", t.render().c_str());
  return kExitOk;
}

// "#ID" or an offset with an optional K/M/G suffix.
std::optional<json> segment_target(const std::string& target) {
  if (!target.empty() && target[0] == '#') {
    auto id = ctl::parse_size(target.substr(1));
    if (!id || target.find_first_not_of("0123456789", 1) != std::string::npos) return std::nullopt;
    return json{{"id", *id}};
  }
  auto offset = ctl::parse_size(target);
  if (!offset) return std::nullopt;
  return json{{"offset", *offset}};
}

int cmd_segment(const Globals& g, const std::string& target) {
  auto args = segment_target(target);
  if (!args) return usage("segment: '" + target + "' is neither an OFFSET (e.g. 3M) nor #ID");
  auto r = call(g, "segment", *args);
  if (!r) return kExitError;
  if (g.json) return print_json(*r);
  const json& s = (*r)["segment"];
  const int64_t now = i64((*r)["now_s"]);
  auto when = [&](const json& t) {
    const int64_t v = i64(t);
    return v < 0 ? std::string("never") : ctl::format_age(v, now) + " (" + ctl::format_utc(v) + ")";
  };
  ctl::Table head({"", ""});
  head.add({"segment", "#" + std::to_string(u64(s["id"])) + " at offset " +
                           ctl::format_offset(u64(s["offset"])) + " (" +
                           std::to_string(u64(s["offset"])) + "), " +
                           ctl::format_bytes(u64(s["length"]))});
  head.add({"last access", when(s["last_access_s"])});
  head.add({"last write", when(s["last_write_s"])});
  head.add({"priority", ctl::format_number(num(s["priority"]))});
  std::printf("%s\n", head.render(/*header=*/false).c_str());
  ctl::Table t({"WINDOW", "READS", "WRITES", "READ", "WRITTEN", "ACCESS/S", "CHANGE/S"});
  t.right({1, 2, 3, 4, 5, 6});
  for (const json& w : s["windows"]) {
    t.add({ctl::format_window(u64(w["window_seconds"])), std::to_string(u64(w["reads"])),
           std::to_string(u64(w["writes"])), ctl::format_bytes(u64(w["bytes_read"])),
           ctl::format_bytes(u64(w["bytes_written"])), ctl::format_rate(num(w["access_rate"])),
           ctl::format_rate(num(w["change_rate"]))});
  }
  std::printf("%s", t.render().c_str());
  return kExitOk;
}

// ---------------------------------------------------------------- config

int cmd_config_get(const Globals& g, const std::string& key) {
  json args = json::object();
  if (!key.empty()) args["key"] = key;
  auto r = call(g, "config.get", args);
  if (!r) return kExitError;
  if (g.json) return print_json(*r);
  if (!key.empty()) {
    std::printf("%s\n", str((*r)["value"]).c_str());
    return kExitOk;
  }
  const json& runtime = (*r)["runtime_keys"];
  ctl::Table t({"KEY", "VALUE", "RUN-TIME"});
  for (auto it = (*r)["config"].begin(); it != (*r)["config"].end(); ++it) {
    const bool rt = std::find(runtime.begin(), runtime.end(), it.key()) != runtime.end();
    t.add({it.key(), str(*it), rt ? "yes" : ""});
  }
  std::printf("%s", t.render().c_str());
  return kExitOk;
}

// The JSON value for `key` from the text after '='. Window lists and
// lengths take durations ("1h,1d"); everything else is JSON, or a string.
std::optional<json> config_value(const std::string& key, const std::string& text) {
  if (key == "windows_seconds") {
    json list = json::array();
    size_t start = 0;
    for (;;) {
      const size_t comma = text.find(',', start);
      auto s = ctl::parse_duration_seconds(text.substr(start, comma - start));
      if (!s) return std::nullopt;
      list.push_back(*s);
      if (comma == std::string::npos) return list;
      start = comma + 1;
    }
  }
  if (key == "scoring_window_seconds") {
    auto s = ctl::parse_duration_seconds(text);
    if (!s) return std::nullopt;
    return json(*s);
  }
  json v = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (v.is_discarded()) return json(text);
  return v;
}

int cmd_config_set(const Globals& g, const std::string& assignment) {
  const size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) {
    return usage("config set: expected KEY=VALUE, got '" + assignment + "'");
  }
  const std::string key = assignment.substr(0, eq);
  auto value = config_value(key, assignment.substr(eq + 1));
  if (!value) return usage("config set: bad duration in '" + assignment + "'");
  auto r = call(g, "config.set", {{"key", key}, {"value", *value}});
  if (!r) return kExitError;
  if (g.json) return print_json(*r);
  std::printf("%s: %s -> %s\n", key.c_str(), str((*r)["previous"]).c_str(),
              str((*r)["value"]).c_str());
  return kExitOk;
}

// --------------------------------------------------------------- history

// Fetch every page of the history; the replies' records (or CSV text) in order.
std::optional<json> fetch_history(const Globals& g, const std::string& format) {
  json all = ctl::ok_reply({{"format", format}});
  std::string csv;
  json records = json::array();
  json args = {{"format", format}};
  for (;;) {
    auto r = call(g, "history.export", args);
    if (!r) return std::nullopt;
    if (format == "csv") {
      csv += (*r).value("csv", "");
    } else {
      for (auto& rec : (*r)["records"]) records.push_back(std::move(rec));
    }
    all["bucket_seconds"] = (*r)["bucket_seconds"];
    if (!(*r).value("more", false) || !(*r).contains("next")) break;
    args = {{"format", format}};
    for (auto it = (*r)["next"].begin(); it != (*r)["next"].end(); ++it) args[it.key()] = *it;
  }
  if (format == "csv") {
    all["csv"] = std::move(csv);
  } else {
    all["records"] = std::move(records);
  }
  return all;
}

int cmd_history_export(const Globals& g, const std::string& format, const std::string& out) {
  auto all = fetch_history(g, format);
  if (!all) return kExitError;
  std::string text;
  if (g.json) {
    text = ctl::encode_line(*all);
  } else if (format == "csv") {
    text = (*all)["csv"].get<std::string>();
  } else {
    text = ctl::encode_line((*all)["records"]);
  }
  if (out.empty() || out == "-") {
    std::fwrite(text.data(), 1, text.size(), stdout);
    return kExitOk;
  }
  std::ofstream f(out, std::ios::binary | std::ios::trunc);
  f.write(text.data(), static_cast<std::streamsize>(text.size()));
  f.close();
  if (!f) {
    std::fprintf(stderr, "shadowctl: cannot write %s\n", out.c_str());
    return kExitError;
  }
  return kExitOk;
}

// ----------------------------------------------------------------- debug

int cmd_debug_advance(const Globals& g, const std::string& seconds) {
  auto s = ctl::parse_duration_seconds(seconds);
  if (!s) return usage("debug advance: '" + seconds + "' is not a duration (e.g. 3660, 1h)");
  auto r = call(g, "debug.advance", {{"seconds", *s}});
  if (!r) return kExitError;
  if (g.json) return print_json(*r);
  std::printf("test clock now %s; %llu bucket(s) closed\n",
              ctl::format_utc(i64((*r)["now_s"])).c_str(),
              static_cast<unsigned long long>(u64((*r)["buckets_rolled"])));
  return kExitOk;
}

// ------------------------------------------------------------------ CLI

const char* kMainHelp =
    "shadowctl: inspect and control a running shadowd.\n\n"
    "Commands that talk to the daemon use its control socket: --socket PATH, else\n"
    "$SHADOWD_SOCKET, else /run/shadowd/disk.sock. Reading needs permission to\n"
    "connect to the socket (mode 0660: root and the daemon's control group);\n"
    "changing settings needs root or membership in the control group.\n";

const char* kMainFooter =
    "Every command takes --json: the daemon's reply as one JSON object on stdout\n"
    "(\"ok\", \"version\" and the result fields; on failure \"code\" and \"message\").\n\n"
    "Exit status: 0 on success; 1 when the daemon cannot be reached or refuses the\n"
    "request (the error code, e.g. permission_denied, is named on stderr); 2 on bad\n"
    "usage.";

struct Cli {
  Globals g;
  std::string uri, unix_path = "/run/shadowd/disk.nbd", name = "disk";
  uint64_t top_n = 10;
  std::string top_by = "priority", top_window;
  std::string segment_target;
  std::string config_key, config_assignment;
  std::string history_format = "csv", history_out;
  std::string advance_seconds;
};

void add_info(CLI::App& app, Cli& c) {
  CLI::App* info =
      app.add_subcommand("info", "Show an export's size, flags and block sizes (over NBD)");
  info->footer(
      "Connects to the export itself with libnbd (not to the control socket) and\n"
      "reports what a client negotiates: size, read-only, flush/FUA/trim/zero/cache,\n"
      "multi-conn, base:allocation, structured replies and block size limits.\n\n"
      "Examples:\n"
      "  shadowctl info --unix /run/shadowd/disk.nbd\n"
      "  shadowctl info --uri nbd://127.0.0.1:10809/disk --json");
  info->add_option("--uri", c.uri, "NBD URI (nbd://HOST:PORT/NAME, nbd+unix:///NAME?socket=PATH)");
  info->add_option("--unix", c.unix_path,
                   "Unix socket of the export (default /run/shadowd/disk.nbd)");
  info->add_option("--export-name", c.name, "Export name (default disk)");
}

void add_status_top_segment(CLI::App& app, Cli& c) {
  CLI::App* status =
      app.add_subcommand("status", "Show the export, clients, request counts and uptime");
  status->footer(
      "Shows the export (name, size, read-only), the backing file, the NBD endpoints,\n"
      "segment size and count, open and total client connections, uptime, the access\n"
      "monitor's memory (resident bytes per segment) and history, the windows and\n"
      "priority parameters, and per operation the requests, bytes and errors since start.\n\n"
      "Example:\n"
      "  shadowctl status\n"
      "  shadowctl --json status | jq .ops.read.requests");

  CLI::App* top = app.add_subcommand("top", "List the hottest segments");
  top->footer(
      "Lists the segments with the most activity in a window: rank, segment id, offset,\n"
      "reads, writes, bytes read and written, access and change rates (per second over\n"
      "the window), time of last access and priority. Segments without accesses in the\n"
      "window are not listed.\n\n"
      "Priority = baseline + alpha*AccessRate + beta*ChangeRate - gamma*SecondsSinceLastAccess\n"
      "over the scoring window (see `shadowctl config get`).\n\n"
      "Examples:\n"
      "  shadowctl top\n"
      "  shadowctl top -n 50 --by writes --window 1d");
  top->add_option("-n", c.top_n, "How many segments (1..10000, default 10)")
      ->check(CLI::Range(uint64_t{1}, uint64_t{10000}));
  top->add_option("--by", c.top_by, "Order by priority (default), reads or writes")
      ->check(CLI::IsMember({"priority", "reads", "writes"}));
  top->add_option("--window", c.top_window,
                  "Window to count in: 1h, 1d, 1w or seconds; one of the daemon's windows "
                  "(default: the scoring window)");

  CLI::App* segment = app.add_subcommand("segment", "Show one segment in detail");
  segment->footer(
      "TARGET is a byte offset anywhere inside the segment, with an optional binary\n"
      "suffix (K, M, G, T: 4096, 3M, 1.5G), or #ID for a segment number. Shows the\n"
      "segment's offset and length, last access and write, priority, and for every\n"
      "window its reads, writes, bytes and rates.\n\n"
      "Examples:\n"
      "  shadowctl segment 3M\n"
      "  shadowctl segment '#12'");
  segment->add_option("TARGET", c.segment_target, "OFFSET (bytes; K/M/G suffixes) or #ID")
      ->required();
}

void add_config_history_debug(CLI::App& app, Cli& c) {
  CLI::App* config = app.add_subcommand("config", "Show or change the daemon's settings");
  config->require_subcommand(1);
  config->footer(
      "Run-time tunables: baseline, alpha, beta, gamma (the priority formula),\n"
      "scoring_window_seconds and windows_seconds. Other keys are shown but change only\n"
      "through the config file and a restart (SIGHUP reloads the tunables from the file).");
  CLI::App* get = config->add_subcommand("get", "Show all settings, or the value of KEY");
  get->footer("Examples:\n  shadowctl config get\n  shadowctl config get alpha");
  get->add_option("KEY", c.config_key, "A config key (as in the config file)");
  CLI::App* set = config->add_subcommand("set", "Change a run-time tunable");
  set->footer(
      "VALUE is JSON (a number for baseline/alpha/beta/gamma); window lengths take\n"
      "durations: scoring_window_seconds=1d, windows_seconds=1h,1d,1w. The change applies\n"
      "at once (the ranking is rescored) and is not written to the config file. Needs\n"
      "root or membership in the control group; a refused or invalid value changes nothing.\n\n"
      "Examples:\n"
      "  shadowctl config set alpha=2.5\n"
      "  shadowctl config set windows_seconds=1h,1d,1w");
  set->add_option("KEY=VALUE", c.config_assignment, "The key and its new value")->required();

  CLI::App* history = app.add_subcommand("history", "Export the per-segment access history");
  history->require_subcommand(1);
  CLI::App* exp = history->add_subcommand("export", "Write the access history as CSV or JSON");
  exp->footer(
      "One row per time bucket, segment and operation with a nonzero count:\n"
      "  CSV:  timestamp,segment,op,count,bytes   (timestamp = bucket start, Unix s)\n"
      "  JSON: [{\"t\":..., \"segment\":..., \"op\":\"read\"|\"write\", \"count\":..., "
      "\"bytes\":...}]\n"
      "The still-open bucket is included as if it closed now.\n\n"
      "Examples:\n"
      "  shadowctl history export --format csv -o history.csv\n"
      "  shadowctl history export --format json | jq length");
  exp->add_option("--format", c.history_format, "csv (default) or json")
      ->check(CLI::IsMember({"csv", "json"}));
  exp->add_option("-o,--output", c.history_out, "Write to FILE instead of stdout");

  CLI::App* debug = app.add_subcommand("debug", "Testing aids");
  debug->group("");  // not listed in --help
  debug->require_subcommand(1);
  CLI::App* advance = debug->add_subcommand(
      "advance", "Move a --test-clock daemon's clock forward and close the buckets due");
  advance->footer(
      "Only for a shadowd started with --test-clock. Example: shadowctl debug advance 1h");
  advance->add_option("SECONDS", c.advance_seconds, "Seconds (or 90m, 1h, 1d)")->required();
}

int dispatch(CLI::App& app, Cli& c) {
  const Globals& g = c.g;
  if (app.got_subcommand("version")) {
    if (g.json) return print_json({{"version", SHADOWD_VERSION}});
    std::printf("shadowctl %s\n", SHADOWD_VERSION);
    return kExitOk;
  }
  if (app.got_subcommand("info")) return cmd_info(uri_for(c.uri, c.unix_path, c.name), g.json);
  if (app.got_subcommand("status")) return cmd_status(g);
  if (app.got_subcommand("top")) return cmd_top(g, c.top_n, c.top_by, c.top_window);
  if (app.got_subcommand("segment")) return cmd_segment(g, c.segment_target);
  if (CLI::App* config = app.get_subcommand("config"); config->parsed()) {
    if (config->got_subcommand("get")) return cmd_config_get(g, c.config_key);
    return cmd_config_set(g, c.config_assignment);
  }
  if (app.got_subcommand("history")) return cmd_history_export(g, c.history_format, c.history_out);
  if (app.got_subcommand("debug")) return cmd_debug_advance(g, c.advance_seconds);
  return kExitUsage;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{kMainHelp};
  app.footer(kMainFooter);
  app.require_subcommand(1);
  app.fallthrough();  // global options may follow the subcommand
  Cli c;
  app.add_option(
      "--socket", c.g.socket,
      "Control socket of the daemon (default $SHADOWD_SOCKET or /run/shadowd/disk.sock)");
  app.add_flag("--json", c.g.json, "Print the reply as JSON on stdout");
  add_info(app, c);
  add_status_top_segment(app, c);
  add_config_history_debug(app, c);
  app.add_subcommand("version", "Print shadowctl's version");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? kExitOk : kExitUsage;
  }
  return dispatch(app, c);
}
