// shadowctl: the operator's command line for shadowd.
//
// Most commands talk to the daemon's control socket (ctl/protocol.h); `info`
// inspects an export over NBD itself (libnbd). Human output is tables with
// units; --json prints the daemon's reply as one JSON object instead.
#include <fcntl.h>
#include <libnbd.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <variant>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "ctl/client.h"
#include "ctl/format.h"
#include "ctl/protocol.h"
#include "ctl/replica_daemon.h"
#include "ctl/restore.h"
#include "ctl/simulate.h"
#include "ctl/timespec.h"
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
std::optional<json> call(const Globals& g, std::string_view cmd, json args = json::object(),
                         int reply_timeout_seconds = ctl::kReplyTimeoutSeconds) {
  auto reply = ctl::call(ctl::socket_path(g.socket), ctl::make_request(cmd, std::move(args)),
                         reply_timeout_seconds);
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

// "3.20:1" for a ratio, "-" when there is none yet (null).
std::string ratio_text(const json& j) {
  if (!j.is_number()) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f:1", j.get<double>());
  return buf;
}

// A count with thousands separators: 1234567 -> "1,234,567".
std::string count(uint64_t n) {
  std::string digits = std::to_string(n);
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

constexpr int64_t kNsPerS = 1'000'000'000;

// A time in ns as "ISO (3m ago)"; "never" for 0.
std::string when_ns(const json& t, int64_t now_ns) {
  const int64_t v = i64(t);
  if (v == 0) return "never";
  return ctl::format_utc_ns(v) + " (" + ctl::format_age(v / kNsPerS, now_ns / kNsPerS) + ")";
}

std::string degraded_text(const json& r) {
  if (!r.value("degraded", false)) return "ok";
  const std::string why = str(r["degraded_reason"]);
  return "DEGRADED" + (why.empty() ? std::string() : ": " + why) +
         " (writes go on to the primary; history restarts when the pool works again)";
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
  const json& sh = r.contains("shadow") ? r["shadow"] : json::object();
  if (sh.value("enabled", false)) {
    const int64_t now_ns = i64(r["now_s"]) * kNsPerS;
    std::string pool;
    for (const auto& p : sh["pool"]) pool += (pool.empty() ? "" : ", ") + str(p);
    t.add({"pool", pool});
    const uint64_t budget = u64(sh["budget_bytes_per_s"]);
    const uint64_t busy = u64(sh["busy_budget_bytes_per_s"]);
    t.add({"shadowing", (budget == 0 ? std::string("budget 0 (no background shadowing)")
                                     : "budget " + ctl::format_bytes(budget) + "/s, " +
                                           ctl::format_bytes(busy) + "/s while clients are busy" +
                                           (sh.value("foreground_busy", false) ? " (now)" : "")) +
                            ", " + count(u64(sh["queue"])) + " segments queued, " +
                            ctl::format_bytes(u64(sh["bytes_read"])) + " read, " +
                            count(u64(sh["versions_made"])) + " versions made"});
    t.add({"cow stalls",
           count(u64(sh["cow_stalls"])) + " writes waited for a copy-on-first-write"});
    const int64_t span = std::max<int64_t>(0, i64(sh["to_ns"]) - i64(sh["from_ns"])) / kNsPerS;
    t.add({"window", ctl::format_utc_ns(i64(sh["from_ns"])) + " .. " +
                         ctl::format_utc_ns(i64(sh["to_ns"])) + " (" + ctl::format_span(span) +
                         "; retention " + ctl::format_window(u64(sh["retention_seconds"])) +
                         (sh.value("retention_shrunk", false) ? ", cut short for space" : "") +
                         ")"});
    t.add({"pool state", degraded_text(sh)});
    t.add({"checkpoint", "last " + when_ns(sh["last_checkpoint_ns"], now_ns) + ", " +
                             count(u64(sh["checkpoints"])) + " since start"});
  } else {
    t.add({"pool", "none (no history; start shadowd with --pool)"});
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

// ------------------------------------------------------ history window

std::string tier_table(const json& tiers) {
  ctl::Table t({"TIER", "PATH", "ZONES", "FREE", "USED", "CAPACITY", "UTIL", "VERSIONS",
                "VERSION BYTES"});
  t.right({0, 2, 3, 4, 5, 6, 7, 8});
  for (const json& x : tiers) {
    t.add({std::to_string(u64(x["tier"])), str(x["path"]), count(u64(x["zones"])),
           count(u64(x["zones_free"])), ctl::format_bytes(u64(x["bytes_used"])),
           ctl::format_bytes(u64(x["capacity_bytes"])),
           ctl::format_percent(num(x["utilisation_percent"])), count(u64(x["versions"])),
           ctl::format_bytes(u64(x["version_bytes"]))});
  }
  return t.render();
}

int cmd_history(const Globals& g) {
  auto r = call(g, "history");
  if (!r) return kExitError;
  if (g.json) return print_json(*r);
  const json& h = *r;
  const int64_t now_ns = i64(h["now_ns"]);
  ctl::Table t({"", ""});
  t.add({"restorable", ctl::format_utc_ns(i64(h["from_ns"])) + " .. " +
                           ctl::format_utc_ns(i64(h["to_ns"])) + "  (" +
                           ctl::format_span(i64(h["span_seconds"])) + ")"});
  t.add({"", "from: " + str(h["from"]) + "  to: " + str(h["to"])});
  t.add({"sequence", count(u64(h["first_seq"])) + " .. " + count(u64(h["last_seq"]))});
  std::string retention = ctl::format_window(u64(h["retention_seconds"])) + " configured";
  if (h.value("retention_shrunk", false)) {
    retention += "; the window is cut short for pool space";
  }
  if (u64(h["retention_shrinks"]) > 0) {
    retention += " (" + count(u64(h["retention_shrinks"])) + " shrinks since start)";
  }
  t.add({"retention", retention});
  t.add({"journal", count(u64(h["journal_records"])) + " records, " +
                        ctl::format_bytes(u64(h["journal_bytes"])) + " stored for " +
                        ctl::format_bytes(u64(h["journal_raw_bytes"])) + " written"});
  t.add({"versions", count(u64(h["versions"])) + " versions, " +
                         ctl::format_bytes(u64(h["version_bytes"])) + " stored (" +
                         ctl::format_bytes(u64(h["version_raw_bytes"])) + " of content), " +
                         count(u64(h["segments_with_history"])) + " segments with history"});
  t.add({"state", degraded_text(h)});
  t.add({"pool since", when_ns(h["epoch_ns"], now_ns)});
  std::printf("%s\n%s", t.render(/*header=*/false).c_str(), tier_table(h["tiers"]).c_str());
  return kExitOk;
}

// ------------------------------------------------------------- versions

// The "segment" argument of `versions`: "#ID" or a byte offset (any suffix
// parse_size() reads, sent as a number).
std::optional<json> versions_target(const std::string& target) {
  if (!target.empty() && target[0] == '#') {
    if (target.size() < 2 || target.find_first_not_of("0123456789", 1) != std::string::npos) {
      return std::nullopt;
    }
    return json(target);
  }
  auto offset = ctl::parse_size(target);
  if (!offset) return std::nullopt;
  return json(*offset);
}

void print_segment_versions(const json& s) {
  const uint64_t seg_bytes = u64(s["length"]);
  ctl::Table head({"", ""});
  head.add({"segment", "#" + std::to_string(u64(s["id"])) + " at offset " +
                           ctl::format_offset(u64(s["offset"])) + " (" +
                           std::to_string(u64(s["offset"])) + "), " +
                           ctl::format_bytes(seg_bytes)});
  if (u64(s["records"]) == 0) {
    head.add({"records", "none in the window"});
  } else {
    head.add({"records", count(u64(s["records"])) + " in the window, seq " +
                             count(u64(s["first_record_seq"])) + " .. " +
                             count(u64(s["last_record_seq"])) + ", " +
                             ctl::format_utc_ns(i64(s["first_record_ns"])) + " .. " +
                             ctl::format_utc_ns(i64(s["last_record_ns"]))});
  }
  head.add({"versions", count(s["versions"].size())});
  std::printf("%s", head.render(/*header=*/false).c_str());
  if (s["versions"].empty()) {
    std::printf("\nNo versions: the segment's content at any time in the window is its\n"
                "current content plus its journal records (or it was never written).\n");
    return;
  }
  ctl::Table t({"SEQ", "TIME", "TIER", "ZONE", "OFFSET", "STORED", "KIND", "BASE SEQ",
                "CHECKSUM", "COW"});
  t.right({0, 2, 3, 4, 5, 7});
  for (const json& v : s["versions"]) {
    const uint64_t depth = u64(v["depth"]);
    t.add({count(u64(v["seq"])), ctl::format_utc_ns(i64(v["time_ns"])),
           std::to_string(u64(v["tier"])), std::to_string(u64(v["zone"])),
           std::to_string(u64(v["offset"])), ctl::format_bytes(u64(v["stored_bytes"])),
           depth == 0 ? std::string("full") : "delta " + std::to_string(depth),
           depth == 0 ? std::string("-") : count(u64(v["base_seq"])), str(v["checksum"]),
           v.value("cow", false) ? "cow" : ""});
  }
  std::printf("\n%s", t.render().c_str());
}

int cmd_versions(const Globals& g, const std::string& target, uint64_t limit) {
  if (!target.empty()) {
    auto seg = versions_target(target);
    if (!seg) return usage("versions: '" + target + "' is neither an OFFSET (e.g. 3M) nor #ID");
    auto r = call(g, "versions", {{"segment", *seg}});
    if (!r) return kExitError;
    if (g.json) return print_json(*r);
    print_segment_versions((*r)["segment"]);
    return kExitOk;
  }
  // The list, fetched page by page up to `limit` segments (0: all).
  constexpr uint64_t kPage = 1000;
  json all = json::array();
  json last;
  json args = json::object();
  for (;;) {
    const uint64_t want = limit == 0 ? kPage : std::min<uint64_t>(kPage, limit - all.size());
    args["limit"] = want;
    auto r = call(g, "versions", args);
    if (!r) return kExitError;
    for (auto& x : (*r)["segments"]) all.push_back(std::move(x));
    last = std::move(*r);
    if (!last.value("more", false) || (limit != 0 && all.size() >= limit)) break;
    args = {{"first", last["next"]["first"]}};
  }
  const bool more = last.value("more", false);
  if (g.json) {
    last["segments"] = std::move(all);
    last.erase("first");
    return print_json(last);
  }
  if (all.empty()) {
    std::printf("No segment has history yet.\n");
    return kExitOk;
  }
  ctl::Table t({"SEGMENT", "OFFSET", "VERSIONS", "STORED", "OLDEST VERSION", "NEWEST VERSION",
                "RECORDS", "LAST WRITE"});
  t.right({0, 1, 2, 3, 6});
  auto at = [](const json& ns) {
    return i64(ns) == 0 ? std::string("-") : ctl::format_utc_ns(i64(ns));
  };
  for (const json& x : all) {
    t.add({"#" + std::to_string(u64(x["id"])), ctl::format_offset(u64(x["offset"])),
           std::to_string(u64(x["versions"])), ctl::format_bytes(u64(x["version_bytes"])),
           at(x["oldest_version_ns"]), at(x["newest_version_ns"]), count(u64(x["records"])),
           at(x["last_record_ns"])});
  }
  std::printf("%s", t.render().c_str());
  std::printf("%s segments shown of %s with history%s\n", count(all.size()).c_str(),
              count(u64(last["segments_with_history"])).c_str(),
              more ? " (--limit 0 lists all)" : "");
  return kExitOk;
}

// ----------------------------------------------------------------- pool

int cmd_pool(const Globals& g, bool zones) {
  json args = json::object();
  if (zones) args["zones"] = true;
  auto r = call(g, "pool", args);
  if (!r) return kExitError;
  if (g.json) return print_json(*r);
  const json& p = *r;
  const int64_t now_ns = i64(p["now_ns"]);
  ctl::Table tiers({"TIER", "PATH", "ZONES", "FREE", "JOURNAL", "VERSIONS", "CHECKPOINT",
                    "HISTORY", "ZONE SIZE", "USED", "CAPACITY", "UTIL"});
  tiers.right({0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11});
  for (const json& x : p["tiers"]) {
    const json& k = x["zones_by_kind"];
    tiers.add({std::to_string(u64(x["tier"])), str(x["path"]), count(u64(x["zones"])),
               count(u64(k["free"])), count(u64(k["journal"])), count(u64(k["versions"])),
               count(u64(k["checkpoint"])), count(u64(k["history"])),
               ctl::format_bytes(u64(x["zone_bytes"])), ctl::format_bytes(u64(x["bytes_used"])),
               ctl::format_bytes(u64(x["capacity_bytes"])),
               ctl::format_percent(num(x["utilisation_percent"]))});
  }
  std::printf("%s\n", tiers.render().c_str());
  ctl::Table t({"", ""});
  t.add({"used", ctl::format_bytes(u64(p["bytes_used"])) + " of " +
                     ctl::format_bytes(u64(p["capacity_bytes"])) + " (" +
                     ctl::format_percent(num(p["utilisation_percent"])) + ")"});
  t.add({"compression", "versions " + ratio_text(p["version_compression"]) + " (" +
                            ctl::format_bytes(u64(p["version_raw_bytes"])) + " in " +
                            ctl::format_bytes(u64(p["version_bytes"])) + "), journal " +
                            ratio_text(p["journal_compression"]) + " (" +
                            ctl::format_bytes(u64(p["journal_raw_bytes"])) + " in " +
                            ctl::format_bytes(u64(p["journal_bytes"])) + ")"});
  std::string amp = "-";
  if (p["pool_bytes_per_client_byte"].is_number()) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f", num(p["pool_bytes_per_client_byte"]));
    amp = buf;
  }
  t.add({"pool writes", amp + " pool bytes per client byte written (" +
                            ctl::format_bytes(u64(p["pool_bytes_written"])) + " for " +
                            ctl::format_bytes(u64(p["client_bytes_written"])) + " since start, " +
                            count(u64(p["group_commits"])) + " group commits, " +
                            count(u64(p["group_commits_overlapped"])) + " overlapping another)"});
  t.add({"reclaim", count(u64(p["zones_reclaimed"])) + " zones reclaimed, " +
                        count(u64(p["records_pruned"])) + " records pruned, " +
                        count(u64(p["versions_folded"])) + " versions folded, " +
                        count(u64(p["versions_dropped"])) + " dropped, " +
                        count(u64(p["retention_shrinks"])) + " retention shrinks"});
  t.add({"checkpoints", count(u64(p["checkpoints"])) + " since start, last " +
                            when_ns(p["last_checkpoint_ns"], now_ns)});
  t.add({"errors", count(u64(p["pool_errors"])) + " pool, " +
                       count(u64(p["primary_write_errors"])) + " primary write (" +
                       count(u64(p["journal_corrections"])) + " corrected in the journal)"});
  t.add({"state", degraded_text(p)});
  std::printf("%s", t.render(/*header=*/false).c_str());
  if (p.contains("zones")) {
    ctl::Table z({"TIER", "ZONE", "KIND", "GEN", "USED", "LIVE", "OPEN"});
    z.right({0, 1, 3, 4, 5});
    for (const json& x : p["zones"]) {
      z.add({std::to_string(u64(x["tier"])), std::to_string(u64(x["index"])), str(x["kind"]),
             std::to_string(u64(x["gen"])), ctl::format_bytes(u64(x["used_bytes"])),
             count(u64(x["live_entries"])), x.value("open", false) ? "open" : ""});
    }
    std::printf("\n%s", z.render().c_str());
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

// ------------------------------------------------------ points in time

int64_t realtime_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return int64_t{ts.tv_sec} * kNsPerS + ts.tv_nsec;
}

double monotonic_s() {
  using std::chrono::steady_clock;
  return std::chrono::duration<double>(steady_clock::now().time_since_epoch()).count();
}

// `--at TEXT` read with the current time, or the usage error for `cmd`
// (already reported: the exit status).
std::variant<ctl::AtSpec, int> parse_at_option(const std::string& cmd, const std::string& text) {
  auto at = ctl::parse_at(text, realtime_ns());
  if (auto* e = std::get_if<std::string>(&at)) return usage(cmd + ": --at: " + *e);
  return std::get<ctl::AtSpec>(std::move(at));
}

// The request arguments that name a point in time.
json at_args(const ctl::AtSpec& at) {
  if (at.kind == ctl::AtSpec::Kind::kSeq) return {{"seq", at.seq}};
  return {{"at_ns", at.time_ns}};
}

// "seq 48,213 at 2026-11-25T10:40:51.902Z (1h ago)" for a reply's seq and time_ns.
std::string point_text(const json& r) {
  const int64_t t = i64(r["time_ns"]);
  return "seq " + count(u64(r["seq"])) + " at " + ctl::format_at_utc(t) + " (" +
         ctl::format_age(t / kNsPerS, realtime_ns() / kNsPerS) + ")";
}

// A string field, or "" when it is missing or not a string.
std::string opt_str(const json& r, const char* key) {
  auto it = r.find(key);
  return it != r.end() && it->is_string() ? it->get<std::string>() : std::string();
}

// ---------------------------------------------------- export, exports

int cmd_export(const Globals& g, const std::string& at_text, const std::string& name) {
  auto at = parse_at_option("export", at_text);
  if (auto* rc = std::get_if<int>(&at)) return *rc;
  json args = at_args(std::get<ctl::AtSpec>(at));
  if (!name.empty()) args["name"] = name;
  auto r = call(g, "export", args, ctl::kLongReplyTimeoutSeconds);
  if (!r) return kExitError;
  if (g.json) return print_json(*r);
  const std::string export_name = str((*r)["name"]);
  ctl::Table t({"", ""});
  t.add({"export", export_name + "  (read-only, " + ctl::format_bytes(u64((*r)["size_bytes"])) +
                       ")"});
  t.add({"shows", point_text(*r)});
  std::vector<std::string> uris;
  for (const char* key : {"uri_unix", "uri_tcp"}) {
    if (std::string u = opt_str(*r, key); !u.empty()) uris.push_back(u);
  }
  for (const std::string& u : uris) t.add({"uri", u});
  std::printf("%s", t.render(/*header=*/false).c_str());
  if (!uris.empty()) {
    std::printf("\nReach it with one of:\n");
    for (const std::string& line : ctl::access_hints(uris.front())) {
      std::printf("  %s\n", line.c_str());
    }
  } else {
    std::printf("\nshadowd serves NBD on no socket (--unix, --listen): nothing can reach it.\n");
  }
  std::printf("\nRemove it with: shadowctl unexport %s\n", export_name.c_str());
  return kExitOk;
}

int cmd_exports(const Globals& g) {
  auto r = call(g, "exports");
  if (!r) return kExitError;
  if (g.json) return print_json(*r);
  const int64_t now_s = realtime_ns() / kNsPerS;
  ctl::Table t({"NAME", "KIND", "SIZE", "SEQ", "TIME", "CREATED", "READS", "READ", "SEGMENTS",
                "RECORDS", "VERSIONS", "CACHE HITS"});
  t.right({2, 3, 6, 7, 8, 9, 10, 11});
  for (const json& e : (*r)["exports"]) {
    if (e.value("live", false)) {
      t.add({str(e["name"]), e.value("read_only", false) ? "live, read-only" : "live",
             ctl::format_bytes(u64(e["size_bytes"])), "-", "now", "-", "-", "-", "-", "-", "-",
             "-"});
      continue;
    }
    t.add({str(e["name"]), "point-in-time", ctl::format_bytes(u64(e["size_bytes"])),
           count(u64(e["seq"])), ctl::format_at_utc(i64(e["time_ns"])),
           ctl::format_age(i64(e["created_ns"]) / kNsPerS, now_s), count(u64(e["reads"])),
           ctl::format_bytes(u64(e["bytes_read"])), count(u64(e["segments_reconstructed"])),
           count(u64(e["records_applied"])), count(u64(e["versions_decoded"])),
           count(u64(e["cache_hits"]))});
  }
  std::printf("%s", t.render().c_str());
  return kExitOk;
}

int cmd_unexport(const Globals& g, const std::string& name) {
  auto r = call(g, "unexport", {{"name", name}});
  if (!r) return kExitError;
  if (g.json) return print_json(*r);
  std::printf("removed export %s\n", str((*r)["name"]).c_str());
  return kExitOk;
}

// -------------------------------------------------------------- rollback

// "#3 #17 #18 ... (and 1,204 more)": the first ids of a reply's "segments".
std::string segment_list_text(const json& ids, uint64_t total) {
  constexpr size_t kShown = 16;
  std::string s;
  size_t shown = 0;
  for (const json& id : ids) {
    if (shown++ == kShown) break;
    s += (s.empty() ? "#" : " #") + std::to_string(u64(id));
  }
  const uint64_t listed = std::min<uint64_t>(kShown, ids.size());
  if (total > listed) s += " (and " + count(total - listed) + " more)";
  return s.empty() ? "-" : s;
}

// `rewritten` is a count; a daemon that sends a flag means all of them.
uint64_t rewritten_count(const json& r) {
  const json& w = r["rewritten"];
  if (w.is_boolean()) return w.get<bool>() ? u64(r["segments_total"]) : 0;
  return u64(w);
}

int cmd_rollback(const Globals& g, const std::string& at_text, bool yes) {
  auto at = parse_at_option("rollback", at_text);
  if (auto* rc = std::get_if<int>(&at)) return *rc;
  json args = at_args(std::get<ctl::AtSpec>(at));
  args["dry_run"] = !yes;
  auto r = call(g, "rollback", args, ctl::kLongReplyTimeoutSeconds);
  if (!r) return kExitError;
  if (g.json) return print_json(*r);
  const uint64_t seq = u64((*r)["seq"]);
  const uint64_t total = u64((*r)["segments_total"]);
  ctl::Table t({"", ""});
  t.add({"target", point_text(*r)});
  if (!yes) {
    t.add({"would rewrite", count(total) + " segments, " + ctl::format_bytes(u64((*r)["bytes"]))});
    t.add({"segments", segment_list_text((*r)["segments"], total)});
    std::printf("Dry run: nothing was changed.\n%s", t.render(/*header=*/false).c_str());
    std::printf("\nTo roll the live export back: shadowctl rollback --at seq:%llu --yes\n",
                static_cast<unsigned long long>(seq));
    return kExitOk;
  }
  t.add({"rewrote", count(rewritten_count(*r)) + " of " + count(total) + " segments, " +
                        ctl::format_bytes(u64((*r)["bytes"]))});
  t.add({"segments", segment_list_text((*r)["segments"], total)});
  char paused[32];
  std::snprintf(paused, sizeof paused, "%.1f ms", num((*r)["paused_ns"]) / 1e6);
  t.add({"paused", std::string("writes waited ") + paused});
  const uint64_t first = u64((*r)["journal_first_seq"]);
  const bool journaled = first > 0 && u64((*r)["journal_last_seq"]) >= first;
  if (journaled) {
    t.add({"journal", "the rollback is records " + count(first) + " .. " +
                          count(u64((*r)["journal_last_seq"]))});
  }
  std::printf("Rolled back.\n%s", t.render(/*header=*/false).c_str());
  if (journaled) {
    std::printf("\nTo undo it (back to just before the rollback):\n"
                "  shadowctl rollback --at seq:%llu --yes\n",
                static_cast<unsigned long long>(first - 1));
  }
  return kExitOk;
}

// ---------------------------------------------------------------- verify

// ------------------------------------------------------------ tune

int cmd_tune(const Globals& g, const std::string& action) {
  auto r = call(g, "tune." + action, json::object(), action == "run" ? 600 : ctl::kReplyTimeoutSeconds);
  if (!r) return kExitError;
  if (g.json) return print_json(*r);
  const json& u = (*r)["in_use"];
  std::printf("auto-tuning: %s, every %s; %llu runs%s\n", (*r)["enabled"].get<bool>() ? "on" : "off",
              ctl::format_span(i64((*r)["interval_s"])).c_str(), static_cast<unsigned long long>(u64((*r)["runs"])),
              (*r)["last_run"].is_string() ? (", last " + (*r)["last_run"].get<std::string>()).c_str() : "");
  if (!(*r)["last_error"].get<std::string>().empty()) {
    std::printf("last error: %s\n", (*r)["last_error"].get<std::string>().c_str());
  }
  ctl::Table t({"", ""});
  for (const char* k : {"alpha", "beta", "gamma", "baseline", "min_value", "horizon_s", "seq_ahead", "frontier_ahead"}) {
    if (u.contains(k)) t.add({k, ctl::format_number(num(u[k]))});
  }
  if (u.contains("max_versions_per_segment")) {
    t.add({"max_versions_per_segment", std::to_string(u64(u["max_versions_per_segment"]))});
  }
  std::printf("in use:\n%s", t.render(false).c_str());
  if (r->contains("last")) {
    const json& l = (*r)["last"];
    std::printf("last run: %llu requests replayed in %.2f s, %zu settings tried; stalls %llu -> %llu, "
                "background bytes %s -> %s%s\n",
                static_cast<unsigned long long>(u64(l["requests"])), num(l["seconds"]), l["trials"].size(),
                static_cast<unsigned long long>(u64(l["stalls_before"])),
                static_cast<unsigned long long>(u64(l["stalls_after"])),
                ctl::format_bytes(u64(l["copied_bytes_before"])).c_str(),
                ctl::format_bytes(u64(l["copied_bytes_after"])).c_str(),
                l["changed"].get<bool>() ? "" : " (nothing better found: unchanged)");
  }
  return kExitOk;
}

int cmd_verify(const Globals& g, const std::string& at_text, std::optional<uint64_t> sample) {
  json args = json::object();
  if (!at_text.empty()) {
    auto at = parse_at_option("verify", at_text);
    if (auto* rc = std::get_if<int>(&at)) return *rc;
    args = at_args(std::get<ctl::AtSpec>(at));
  }
  if (sample) args["sample"] = *sample;
  auto r = call(g, "verify", args, ctl::kLongReplyTimeoutSeconds);
  if (!r) return kExitError;
  const bool clean = (*r).value("clean", false);
  if (g.json) {
    print_json(*r);
    return clean ? kExitOk : kExitError;
  }
  const json& errors = (*r)["errors"];
  ctl::Table t({"", ""});
  t.add({"result", clean ? std::string("clean")
                         : "NOT CLEAN: " + count(errors.size()) + " error(s)"});
  t.add({"point", point_text(*r)});
  t.add({"scanned", count(u64((*r)["zones_scanned"])) + " zones, " +
                        count(u64((*r)["records_checked"])) + " journal records, " +
                        count(u64((*r)["versions_checked"])) + " versions, " +
                        ctl::format_bytes(u64((*r)["bytes_checked"]))});
  t.add({"rebuilt", count(u64((*r)["segments_reconstructed"])) +
                        " segments reconstructed at that point"});
  std::printf("%s", t.render(/*header=*/false).c_str());
  if (!errors.empty()) {
    std::printf("\nerrors:\n");
    for (const json& x : errors) {
      const std::string where = opt_str(x, "where");
      std::printf("  %s%s\n", where.empty() ? "" : (where + ": ").c_str(),
                  str(x["message"]).c_str());
    }
  }
  return clean ? kExitOk : kExitError;
}

// --------------------------------------------------------------- restore
//
// A temporary point-in-time export, read over NBD (libnbd aio, several
// requests in flight) into a file or a block device, with a state file
// (ctl/restore.h) that marks the output incomplete and makes an interrupted
// run resumable.

// The signal (SIGINT, SIGTERM) that asked a restore to stop, or 0. A signal
// handler reaches nothing but globals: this is shadowctl's one piece of
// global mutable state.
volatile std::sig_atomic_t g_stop_signal = 0;

void on_stop_signal(int sig) { g_stop_signal = sig; }

// Catches SIGINT and SIGTERM while alive (without SA_RESTART, so that a
// wait in poll() wakes up) and puts the old handlers back.
class StopSignals {
 public:
  StopSignals() {
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGINT, &sa, &old_int_);
    ::sigaction(SIGTERM, &sa, &old_term_);
  }
  ~StopSignals() {
    ::sigaction(SIGINT, &old_int_, nullptr);
    ::sigaction(SIGTERM, &old_term_, nullptr);
  }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

 private:
  struct sigaction old_int_ {};
  struct sigaction old_term_ {};
};

// A point-in-time export this process made; unexported when it goes, on
// every path out.
class TempExport {
 public:
  explicit TempExport(const Globals& g) : g_(g) {}
  ~TempExport() { release(); }
  TempExport(const TempExport&) = delete;
  TempExport& operator=(const TempExport&) = delete;
  void adopt(std::string name) { name_ = std::move(name); }
  const std::string& name() const { return name_; }
  void release() {
    if (name_.empty()) return;
    auto reply = ctl::call(ctl::socket_path(g_.socket),
                           ctl::make_request("unexport", {{"name", name_}}));
    std::optional<ControlError> e;
    if (auto* ce = std::get_if<ControlError>(&reply)) {
      e = *ce;
    } else {
      e = ctl::check_reply(std::get<json>(reply));
    }
    if (e) {
      std::fprintf(stderr,
                   "shadowctl: warning: the temporary export %s is still there (%s: %s); "
                   "remove it with: shadowctl unexport %s\n",
                   name_.c_str(), e->code.c_str(), e->message.c_str(), name_.c_str());
    }
    name_.clear();
  }

 private:
  const Globals& g_;
  std::string name_;
};

// "restore-<pid>-<8 hex digits>"
std::string temp_export_name() {
  std::random_device rd;
  char buf[64];
  std::snprintf(buf, sizeof buf, "restore-%d-%08x", static_cast<int>(::getpid()),
                static_cast<unsigned>(rd()));
  return buf;
}

std::string errno_message(const std::string& what) { return what + ": " + std::strerror(errno); }

// What is at the output path now (nothing is changed).
std::variant<ctl::TargetFacts, std::string> inspect_target(const std::string& path,
                                                           const std::string& state_path) {
  ctl::TargetFacts f;
  struct stat st {};
  f.state_exists = ::lstat(state_path.c_str(), &st) == 0;
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return f;
    return errno_message("cannot examine " + path);
  }
  if (S_ISREG(st.st_mode)) {
    f.kind = ctl::TargetKind::kRegular;
    f.size_bytes = static_cast<uint64_t>(st.st_size);
    return f;
  }
  if (!S_ISBLK(st.st_mode)) {
    f.kind = ctl::TargetKind::kOther;
    return f;
  }
  f.kind = ctl::TargetKind::kBlockDevice;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno_message("cannot open " + path);
  uint64_t bytes = 0;
  const int rc = ::ioctl(fd, BLKGETSIZE64, &bytes);
  const int err = errno;
  ::close(fd);
  errno = err;
  if (rc != 0) return errno_message("cannot read the size of " + path);
  f.size_bytes = bytes;
  return f;
}

// True when `a` and `b` name the same file or device.
bool same_file(const std::string& a, const std::string& b) {
  struct stat sa {};
  struct stat sb {};
  if (::stat(a.c_str(), &sa) != 0 || ::stat(b.c_str(), &sb) != 0) return false;
  if (S_ISBLK(sa.st_mode) && S_ISBLK(sb.st_mode)) return sa.st_rdev == sb.st_rdev;
  return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

// The output file or device of a restore.
class Output {
 public:
  Output() = default;
  ~Output() {
    if (fd_ >= 0) ::close(fd_);
  }
  Output(const Output&) = delete;
  Output& operator=(const Output&) = delete;

  // Opens (creates, empties and sizes) the output for `action`.
  std::optional<std::string> open(const std::string& path, ctl::TargetAction action,
                                  uint64_t size_bytes, bool block_device);
  bool is_open() const { return fd_ >= 0; }
  std::optional<std::string> write(uint64_t off, const unsigned char* data, uint64_t len);
  // Makes [off, off + len) read as zeroes; `zeros` holds `len` zero bytes.
  std::optional<std::string> zero(uint64_t off, const unsigned char* zeros, uint64_t len);
  std::optional<std::string> read(uint64_t off, unsigned char* buf, uint64_t len);
  std::optional<std::string> sync();
  // After sync(): drops the cached pages, so that reads come from the medium.
  void drop_cache() { ::posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED); }
  // What became of zero ranges: "holes" (left or punched), "zeroed"
  // (BLKZEROOUT) or "written" (as zeroes).
  const char* zero_handling() const {
    switch (zero_mode_) {
      case ZeroMode::kSkip:
      case ZeroMode::kPunch:
        return "holes";
      case ZeroMode::kDevice:
        return "zeroed";
      case ZeroMode::kWrite:
        break;
    }
    return "written";
  }

 private:
  enum class ZeroMode {
    kSkip,    // a file just emptied and sized: zero ranges are holes already
    kPunch,   // a resumed file: punch holes (the ranges may hold old data)
    kDevice,  // a block device: BLKZEROOUT
    kWrite,   // where neither works: write the zeroes
  };
  std::string io_error(const std::string& what, uint64_t off) const {
    return errno_message(what + " " + path_ + " at offset " + std::to_string(off));
  }

  std::string path_;
  int fd_ = -1;
  ZeroMode zero_mode_ = ZeroMode::kWrite;
};

std::optional<std::string> Output::open(const std::string& path, ctl::TargetAction action,
                                        uint64_t size_bytes, bool block_device) {
  path_ = path;
  int flags = O_RDWR | O_CLOEXEC;
  if (action == ctl::TargetAction::kCreate) flags |= O_CREAT | O_EXCL;
  if (block_device) flags |= O_EXCL;  // EBUSY while mounted or held by another program
  // 0600: a disk image is as private as the disk.
  fd_ = ::open(path.c_str(), flags, 0600);
  if (fd_ < 0) {
    if (errno == EBUSY) return path + " is in use (mounted, or held by another program)";
    return errno_message("cannot open " + path);
  }
  if (block_device) {
    zero_mode_ = ZeroMode::kDevice;
  } else if (action == ctl::TargetAction::kResume) {
    zero_mode_ = ZeroMode::kPunch;
  } else {
    zero_mode_ = ZeroMode::kSkip;
    if (::ftruncate(fd_, 0) != 0 || ::ftruncate(fd_, static_cast<off_t>(size_bytes)) != 0) {
      return errno_message("cannot size " + path + " to " + std::to_string(size_bytes) +
                           " bytes");
    }
  }
  return std::nullopt;
}

std::optional<std::string> Output::write(uint64_t off, const unsigned char* data, uint64_t len) {
  const uint64_t off0 = off, len0 = len;
  while (len > 0) {
    const ssize_t n = ::pwrite(fd_, data, len, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return io_error("cannot write to", off);
    if (n == 0) return "cannot write to " + path_ + " at offset " + std::to_string(off);
    data += n;
    off += static_cast<uint64_t>(n);
    len -= static_cast<uint64_t>(n);
  }
  // Start the writeback now, without waiting for it: the pages then reach
  // the medium while the copy goes on, and the periodic fdatasync (before
  // each state save) finds little left to write instead of a burst.
  if (len0 > 0) {  // 0 would mean "to the end of the file"; a failure here is only a hint lost
    ::sync_file_range(fd_, static_cast<off_t>(off0), static_cast<off_t>(len0), SYNC_FILE_RANGE_WRITE);
  }
  return std::nullopt;
}

std::optional<std::string> Output::zero(uint64_t off, const unsigned char* zeros, uint64_t len) {
  switch (zero_mode_) {
    case ZeroMode::kSkip:
      return std::nullopt;
    case ZeroMode::kPunch:
      if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                      static_cast<off_t>(len)) == 0) {
        return std::nullopt;
      }
      if (errno != EOPNOTSUPP) return io_error("cannot punch a hole in", off);
      zero_mode_ = ZeroMode::kWrite;
      break;
    case ZeroMode::kDevice: {
      uint64_t range[2] = {off, len};
      if (::ioctl(fd_, BLKZEROOUT, range) == 0) return std::nullopt;
      // EINVAL: a range not in whole sectors (the device's last bytes).
      if (errno == EINVAL) break;
      if (errno != EOPNOTSUPP && errno != ENOTTY) return io_error("cannot zero", off);
      zero_mode_ = ZeroMode::kWrite;
      break;
    }
    case ZeroMode::kWrite:
      break;
  }
  return write(off, zeros, len);
}

std::optional<std::string> Output::read(uint64_t off, unsigned char* buf, uint64_t len) {
  while (len > 0) {
    const ssize_t n = ::pread(fd_, buf, len, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return io_error("cannot read back", off);
    if (n == 0) return path_ + " ends early, at offset " + std::to_string(off);
    buf += n;
    off += static_cast<uint64_t>(n);
    len -= static_cast<uint64_t>(n);
  }
  return std::nullopt;
}

std::optional<std::string> Output::sync() {
  if (::fdatasync(fd_) != 0) return errno_message("cannot sync " + path_);
  return std::nullopt;
}

struct NbdClose {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};
using NbdHandle = std::unique_ptr<nbd_handle, NbdClose>;

// How a ReadPass ended.
struct PassEnd {
  enum class Kind { kDone, kStopped, kFailed } kind = Kind::kDone;
  std::string error;
};

// Reads ranges of an NBD export with kDepth requests in flight (libnbd aio)
// and hands each one to a sink as it completes.
// REQUIRES: the handle outlives no ReadPass whose reads are in flight; keep
// the handle's owner declared after the ReadPass's, so it closes first.
class ReadPass {
 public:
  using Sink = std::function<std::optional<std::string>(const ctl::ByteRange&,
                                                        const unsigned char*)>;
  ReadPass(nbd_handle* h, uint64_t max_range_bytes) : h_(h), slots_(kDepth) {
    for (Slot& s : slots_) s.buf.resize(max_range_bytes);
  }
  // REQUIRES: no range of `plan` is longer than max_range_bytes.
  // Stops early on a stop signal or the first error (of NBD or the sink).
  PassEnd run(const std::vector<ctl::ByteRange>& plan, const Sink& sink,
              const std::function<void()>& tick);

 private:
  static constexpr size_t kDepth = 16;
  static constexpr int kPollMs = 200;  // how often a stop signal is looked at, at worst
  struct Slot {
    ctl::ByteRange range;
    std::vector<unsigned char> buf;
    int64_t cookie = -1;  // -1: free
  };
  static PassEnd failed(const ctl::ByteRange& r) {
    return {PassEnd::Kind::kFailed, "reading bytes " + std::to_string(r.begin) + ".." +
                                        std::to_string(r.end) +
                                        " of the export: " + nbd_get_error()};
  }

  nbd_handle* h_;
  std::vector<Slot> slots_;
};

PassEnd ReadPass::run(const std::vector<ctl::ByteRange>& plan, const Sink& sink,
                      const std::function<void()>& tick) {
  size_t next = 0;
  size_t busy = 0;
  for (;;) {
    if (g_stop_signal != 0) return {PassEnd::Kind::kStopped, ""};
    for (Slot& s : slots_) {
      if (s.cookie >= 0 || next >= plan.size()) continue;
      s.range = plan[next++];
      s.cookie = nbd_aio_pread(h_, s.buf.data(), s.range.bytes(), s.range.begin,
                               NBD_NULL_COMPLETION, 0);
      if (s.cookie < 0) return failed(s.range);
      ++busy;
    }
    if (busy == 0) return {};
    if (nbd_poll(h_, kPollMs) < 0 && nbd_get_errno() != EINTR) {
      return {PassEnd::Kind::kFailed, std::string("NBD connection: ") + nbd_get_error()};
    }
    for (Slot& s : slots_) {
      if (s.cookie < 0) continue;
      const int done = nbd_aio_command_completed(h_, s.cookie);
      if (done == 0) continue;
      s.cookie = -1;
      --busy;
      if (done < 0) return failed(s.range);
      if (auto e = sink(s.range, s.buf.data())) return {PassEnd::Kind::kFailed, *e};
    }
    tick();
  }
}

// Progress on stderr: one updating line on a terminal, or JSON lines.
class ProgressLine {
 public:
  enum class Mode { kOff, kTty, kJson };
  explicit ProgressLine(Mode mode) : mode_(mode) {}
  void show(std::string_view phase, std::string_view label, const ctl::Progress& p, bool force) {
    if (mode_ == Mode::kOff) return;
    const double now = monotonic_s();
    if (!force && now - last_s_ < (mode_ == Mode::kTty ? 0.2 : 1.0)) return;
    last_s_ = now;
    if (mode_ == Mode::kJson) {
      std::fprintf(stderr, "%s", ctl::encode_line(ctl::progress_json(phase, p)).c_str());
      return;
    }
    std::fprintf(stderr, "\r%s\x1b[K", ctl::format_progress_line(label, p).c_str());
    open_ = true;
  }
  // Ends an updating line (before other output, and at the end).
  void end() {
    if (open_) std::fputc('\n', stderr);
    open_ = false;
  }

 private:
  Mode mode_;
  double last_s_ = -1e9;
  bool open_ = false;
};

struct RestoreOptions {
  std::string at;
  std::string output;
  std::string state;  // the state file; default PATH + kRestoreStateSuffix
  bool verify = false;
  bool no_progress = false;
  bool resume = false;
  bool force = false;
  std::string from;  // a replica: restore from it alone (a private shadowd --restore-from)
};

ProgressLine::Mode progress_mode(const Globals& g, const RestoreOptions& o) {
  if (o.no_progress) return ProgressLine::Mode::kOff;
  if (g.json) return ProgressLine::Mode::kJson;
  return ::isatty(STDERR_FILENO) ? ProgressLine::Mode::kTty : ProgressLine::Mode::kOff;
}

// One `shadowctl restore`, step by step; see cmd_restore().
class RestoreRun {
 public:
  RestoreRun(const Globals& g, RestoreOptions o)
      : g_(g), o_(std::move(o)), progress_(progress_mode(g, o_)), export_(g) {}
  int run();

 private:
  static constexpr int kHotSegments = 4096;  // the most `top` ranks first
  static constexpr double kSaveIntervalS = 1.0;

  std::optional<int> prepare();
  std::optional<int> load_resume_state();
  std::optional<int> refuse_daemon_files();
  std::optional<int> start_export();
  std::optional<int> connect();
  std::optional<int> rank_segments();
  std::optional<int> open_output();
  std::optional<int> copy();
  std::optional<int> verify();
  std::optional<int> read_pass(const std::vector<ctl::ByteRange>& plan, bool verifying);
  int finish();
  std::optional<std::string> copy_chunk(const ctl::ByteRange& r, const unsigned char* data);
  std::optional<std::string> verify_chunk(const ctl::ByteRange& r, const unsigned char* data);
  std::optional<std::string> checkpoint(bool now);
  void show_progress(bool verifying, bool force);
  int fail(const std::string& code, std::string message);
  int failed_call();
  int stopped();
  std::string incomplete_text() const;
  json summary_json() const;
  void print_summary() const;

  const Globals& g_;
  const RestoreOptions o_;
  std::optional<ctl::AtSpec> at_;
  ctl::TargetFacts facts_;
  ctl::TargetAction action_ = ctl::TargetAction::kCreate;
  std::string state_path_;
  ctl::RestoreState state_;
  bool incomplete_ = false;  // the state file marks the output incomplete
  std::vector<uint64_t> hot_;
  json replay_;  // the temporary export's replay cost, read before it goes
  uint64_t hot_segment_bytes_ = 0;
  uint64_t size_ = 0;
  uint64_t chunk_ = ctl::kRestoreChunkBytes;
  std::string uri_;
  Output out_;
  ctl::RangeSet written_;  // ranges written this run or before
  uint64_t prior_bytes_ = 0, prior_zero_bytes_ = 0;
  uint64_t run_bytes_ = 0, data_bytes_ = 0, zero_bytes_ = 0;
  double copy_start_s_ = 0, copy_s_ = 0, last_save_s_ = 0;
  std::vector<unsigned char> back_;  // verify: the output's bytes
  ctl::RangeSet mismatched_;
  std::optional<uint64_t> first_mismatch_;
  uint64_t verified_bytes_ = 0;
  double verify_start_s_ = 0, verify_s_ = 0;
  ProgressLine progress_;
  // Destroyed in reverse order: the NBD connection closes before the
  // buffers its reads use go, and before the export is removed.
  TempExport export_;
  std::optional<ReadPass> pass_;
  NbdHandle nbd_;
};

int RestoreRun::run() {
  if (auto rc = prepare()) return *rc;
  StopSignals signals;
  g_stop_signal = 0;
  using Step = std::optional<int> (RestoreRun::*)();
  for (Step step : {&RestoreRun::refuse_daemon_files, &RestoreRun::start_export,
                    &RestoreRun::connect, &RestoreRun::rank_segments, &RestoreRun::open_output,
                    &RestoreRun::copy, &RestoreRun::verify}) {
    if (g_stop_signal != 0) return stopped();
    if (auto rc = (this->*step)()) return *rc;
  }
  return finish();
}

std::optional<int> RestoreRun::prepare() {
  if (o_.at.empty() && !o_.resume) {
    return usage("restore: --at T is required (or --resume, to continue an interrupted restore)");
  }
  if (!o_.at.empty()) {
    auto at = parse_at_option("restore", o_.at);
    if (auto* rc = std::get_if<int>(&at)) return *rc;
    at_ = std::get<ctl::AtSpec>(std::move(at));
  }
  state_path_ = o_.state.empty() ? ctl::restore_state_path(o_.output) : o_.state;
  auto facts = inspect_target(o_.output, state_path_);
  if (auto* e = std::get_if<std::string>(&facts)) return fail("io", *e);
  facts_ = std::get<ctl::TargetFacts>(facts);
  auto action = ctl::decide_target(o_.output, state_path_, facts_, o_.resume, o_.force);
  if (auto* e = std::get_if<std::string>(&action)) return fail("refused", *e);
  action_ = std::get<ctl::TargetAction>(action);
  if (action_ == ctl::TargetAction::kResume) return load_resume_state();
  return std::nullopt;
}

std::optional<int> RestoreRun::load_resume_state() {
  ctl::LoadedState loaded = ctl::load_state(state_path_);
  if (!loaded.state) {
    return fail("refused", (loaded.error.empty() ? state_path_ + " is gone" : loaded.error) +
                               "; start over with --force (without --resume)");
  }
  state_ = std::move(*loaded.state);
  incomplete_ = true;
  written_ = state_.done;
  size_ = state_.size_bytes;
  prior_bytes_ = written_.bytes();
  prior_zero_bytes_ = state_.zero_bytes;
  if (at_) {
    const bool same = at_->kind == ctl::AtSpec::Kind::kSeq ? at_->seq == state_.seq
                                                           : state_.at_ns == at_->time_ns;
    if (!same) {
      return fail("refused", "the interrupted restore into " + o_.output + " is of seq " +
                                 std::to_string(state_.seq) + " (--at '" + state_.at +
                                 "'), not --at '" + o_.at +
                                 "'; leave --at out with --resume, or start over with --force");
    }
  }
  return std::nullopt;
}

// Refuses an output that is the daemon's own backing file or pool device.
std::optional<int> RestoreRun::refuse_daemon_files() {
  if (facts_.kind == ctl::TargetKind::kMissing) return std::nullopt;
  auto r = call(g_, "config.get");
  if (!r) return failed_call();
  const json& c = (*r)["config"];
  std::vector<std::string> paths;
  if (c.contains("backing") && c["backing"].is_string()) paths.push_back(c["backing"]);
  if (c.contains("pool") && c["pool"].is_array()) {
    for (const json& p : c["pool"]) {
      if (p.is_string()) paths.push_back(p);
    }
  }
  for (const std::string& p : paths) {
    if (same_file(o_.output, p)) {
      return fail("refused", o_.output + " is " + p + ", which shadowd itself uses");
    }
  }
  return std::nullopt;
}

std::optional<int> RestoreRun::start_export() {
  auto h = call(g_, "history");
  if (!h) return failed_call();
  const uint64_t segment_bytes = u64((*h)["segment_bytes"]);
  json args = action_ == ctl::TargetAction::kResume ? json{{"seq", state_.seq}} : at_args(*at_);
  const std::string name = temp_export_name();
  args["name"] = name;
  auto r = call(g_, "export", args, ctl::kLongReplyTimeoutSeconds);
  if (!r) return failed_call();
  export_.adopt(name);
  size_ = u64((*r)["size_bytes"]);
  if (action_ == ctl::TargetAction::kResume) {
    if (auto e = ctl::check_resume(state_, u64((*r)["seq"]), size_)) return fail("refused", *e);
  } else {
    state_ = ctl::RestoreState{};
    state_.at = at_->text;
    if (at_->kind == ctl::AtSpec::Kind::kSeq) {
      state_.at_seq = at_->seq;
    } else {
      state_.at_ns = at_->time_ns;
    }
    state_.seq = u64((*r)["seq"]);
    state_.time_ns = i64((*r)["time_ns"]);
    state_.size_bytes = size_;
    state_.segment_bytes = segment_bytes == 0 ? chunk_ : segment_bytes;
    state_.started_ns = realtime_ns();
  }
  uri_ = opt_str(*r, "uri_unix");
  if (uri_.empty()) uri_ = opt_str(*r, "uri_tcp");
  if (uri_.empty()) {
    return fail("unavailable",
                "shadowd serves NBD on no socket (start it with --unix or --listen), so the "
                "export cannot be read");
  }
  if (auto e = ctl::check_target_size(o_.output, facts_, action_, size_)) {
    return fail("refused", *e);
  }
  return std::nullopt;
}

std::optional<int> RestoreRun::connect() {
  nbd_.reset(nbd_create());
  if (!nbd_) return fail("nbd", nbd_get_error());
  if (nbd_connect_uri(nbd_.get(), uri_.c_str()) < 0) {
    return fail("nbd", "cannot connect to " + uri_ + ": " + nbd_get_error());
  }
  const int64_t size = nbd_get_size(nbd_.get());
  if (size < 0 || static_cast<uint64_t>(size) != size_) {
    return fail("protocol", uri_ + " has " + std::to_string(size) + " bytes, shadowd said " +
                                std::to_string(size_));
  }
  const int64_t max = nbd_get_block_size(nbd_.get(), LIBNBD_SIZE_MAXIMUM);
  if (max > 0 && static_cast<uint64_t>(max) < chunk_) chunk_ = static_cast<uint64_t>(max);
  if (state_.chunk_bytes == 0) state_.chunk_bytes = chunk_;
  pass_.emplace(nbd_.get(), chunk_);
  return std::nullopt;
}

// The hottest segments by priority go first. Without the access monitor
// there is no ranking, and the copy is in offset order: not an error.
std::optional<int> RestoreRun::rank_segments() {
  auto reply = ctl::call(ctl::socket_path(g_.socket),
                         ctl::make_request("top", {{"n", kHotSegments}, {"by", "priority"}}));
  const json* r = std::get_if<json>(&reply);
  if (r == nullptr || ctl::check_reply(*r)) return std::nullopt;
  hot_segment_bytes_ = u64((*r)["segment_bytes"]);
  if (hot_segment_bytes_ == 0) return std::nullopt;
  for (const json& s : (*r)["segments"]) hot_.push_back(u64(s["id"]));
  return std::nullopt;
}

std::optional<int> RestoreRun::open_output() {
  if (action_ != ctl::TargetAction::kResume) {
    // The state file first: from here on the output is incomplete.
    state_.chunk_bytes = chunk_;
    if (auto e = ctl::save_state(state_path_, state_)) return fail("io", *e);
    incomplete_ = true;
  }
  const bool block = facts_.kind == ctl::TargetKind::kBlockDevice;
  if (auto e = out_.open(o_.output, action_, size_, block)) {
    // Nothing was touched: no output to call incomplete, unless it already was.
    if (!out_.is_open() && action_ != ctl::TargetAction::kResume && !facts_.state_exists) {
      ::unlink(state_path_.c_str());
      incomplete_ = false;
    }
    return fail("io", *e);
  }
  return std::nullopt;
}

std::optional<int> RestoreRun::copy() {
  const std::vector<ctl::ByteRange> plan =
      ctl::plan_copy(size_, hot_segment_bytes_ == 0 ? chunk_ : hot_segment_bytes_, chunk_, hot_,
                     written_);
  if (!g_.json) {
    std::fprintf(stderr,
                 "shadowctl: restoring %s into %s; it is incomplete until this finishes "
                 "(state: %s)\n",
                 point_text(json{{"seq", state_.seq}, {"time_ns", state_.time_ns}}).c_str(),
                 o_.output.c_str(), state_path_.c_str());
  }
  last_save_s_ = monotonic_s();
  if (auto rc = read_pass(plan, /*verifying=*/false)) return rc;
  if (auto e = checkpoint(/*now=*/true)) return fail("io", *e);
  return std::nullopt;
}

// One pass over `plan` into copy_chunk() or verify_chunk(), with progress;
// an exit status when it did not get through.
std::optional<int> RestoreRun::read_pass(const std::vector<ctl::ByteRange>& plan,
                                         bool verifying) {
  double& start_s = verifying ? verify_start_s_ : copy_start_s_;
  start_s = monotonic_s();
  const PassEnd end = pass_->run(
      plan,
      [this, verifying](const ctl::ByteRange& r, const unsigned char* d) {
        return verifying ? verify_chunk(r, d) : copy_chunk(r, d);
      },
      [this, verifying] { show_progress(verifying, /*force=*/false); });
  (verifying ? verify_s_ : copy_s_) = monotonic_s() - start_s;
  if (end.kind == PassEnd::Kind::kStopped) return stopped();
  if (end.kind == PassEnd::Kind::kFailed) return fail("io", end.error);
  show_progress(verifying, /*force=*/true);
  progress_.end();
  return std::nullopt;
}

std::optional<std::string> RestoreRun::copy_chunk(const ctl::ByteRange& r,
                                                  const unsigned char* data) {
  for (const ctl::ZeroRun& run : ctl::zero_runs(data, r.bytes())) {
    const unsigned char* p = data + run.offset;
    auto e = run.zero ? out_.zero(r.begin + run.offset, p, run.bytes)
                      : out_.write(r.begin + run.offset, p, run.bytes);
    if (e) return e;
    (run.zero ? zero_bytes_ : data_bytes_) += run.bytes;
  }
  written_.add(r.begin, r.end);
  run_bytes_ += r.bytes();
  return checkpoint(/*now=*/false);
}

// Syncs the output, then records what it holds in the state file: at most
// every kSaveIntervalS unless `now`.
std::optional<std::string> RestoreRun::checkpoint(bool now) {
  const double t = monotonic_s();
  if (!now && t - last_save_s_ < kSaveIntervalS) return std::nullopt;
  last_save_s_ = t;
  if (auto e = out_.sync()) return e;
  state_.done = written_;
  state_.zero_bytes = prior_zero_bytes_ + zero_bytes_;
  state_.updated_ns = realtime_ns();
  return ctl::save_state(state_path_, state_);
}

void RestoreRun::show_progress(bool verifying, bool force) {
  const double now = monotonic_s();
  const ctl::Progress p =
      verifying ? ctl::measure_progress(verified_bytes_, size_, verified_bytes_,
                                        now - verify_start_s_)
                : ctl::measure_progress(written_.bytes(), size_, run_bytes_, now - copy_start_s_);
  progress_.show(verifying ? "verify" : "copy", verifying ? "verifying" : "restoring", p, force);
}

std::optional<int> RestoreRun::verify() {
  if (!o_.verify) return std::nullopt;
  if (auto e = out_.sync()) return fail("io", *e);
  out_.drop_cache();
  const auto plan = ctl::plan_copy(size_, chunk_, chunk_, {}, ctl::RangeSet());
  if (auto rc = read_pass(plan, /*verifying=*/true)) return rc;
  if (!first_mismatch_) return std::nullopt;
  // The state file takes the mismatching ranges back, so --resume copies
  // them again.
  for (const ctl::ByteRange& r : mismatched_.ranges()) written_.remove(r.begin, r.end);
  std::string message = o_.output + " differs from the export, first at offset " +
                        std::to_string(*first_mismatch_) + " (" +
                        ctl::format_bytes(mismatched_.bytes()) + " in the chunks that differ)";
  if (auto e = checkpoint(/*now=*/true)) message += "; and " + *e;
  return fail("mismatch", message);
}

std::optional<std::string> RestoreRun::verify_chunk(const ctl::ByteRange& r,
                                                    const unsigned char* data) {
  back_.resize(r.bytes());
  if (auto e = out_.read(r.begin, back_.data(), r.bytes())) return e;
  verified_bytes_ += r.bytes();
  if (std::memcmp(back_.data(), data, r.bytes()) == 0) return std::nullopt;
  const auto diff = std::mismatch(back_.begin(), back_.end(), data);
  const uint64_t at = r.begin + static_cast<uint64_t>(diff.first - back_.begin());
  first_mismatch_ = std::min(first_mismatch_.value_or(UINT64_MAX), at);
  mismatched_.add(r.begin, r.end);
  return std::nullopt;
}

int RestoreRun::finish() {
  if (::unlink(state_path_.c_str()) != 0 && errno != ENOENT) {
    return fail("io", errno_message("the restore is complete, but removing " + state_path_));
  }
  incomplete_ = false;
  // Disconnect first: the daemon need not wait for a reader to go.
  nbd_shutdown(nbd_.get(), 0);
  nbd_.reset();
  // What reconstructing cost the daemon (the copy and, with --verify, the
  // second read): from the temporary export's counters.
  if (auto r = ctl::call(ctl::socket_path(g_.socket), ctl::make_request("exports", json::object()));
      std::holds_alternative<json>(r) && !ctl::check_reply(std::get<json>(r))) {
    for (const json& e : std::get<json>(r).value("exports", json::array())) {
      if (e.value("name", "") != export_.name()) continue;
      for (const char* k : {"segments_reconstructed", "segments_from_primary", "versions_decoded",
                            "records_applied", "cache_hits"}) {
        replay_[k] = e.value(k, uint64_t{0});
      }
    }
  }
  export_.release();
  if (g_.json) return print_json(ctl::ok_reply(summary_json()));
  print_summary();
  return kExitOk;
}

json RestoreRun::summary_json() const {
  json j = {{"output", o_.output},
            {"at", state_.at},
            {"seq", state_.seq},
            {"time_ns", state_.time_ns},
            {"time", ctl::format_at_utc(state_.time_ns)},
            {"size_bytes", size_},
            {"copied_bytes", run_bytes_},
            {"data_bytes", data_bytes_},
            {"zero_bytes", zero_bytes_},
            {"zero_handling", out_.zero_handling()},
            {"resumed", action_ == ctl::TargetAction::kResume},
            {"earlier_bytes", prior_bytes_},
            {"hot_segments_first", hot_.size()},
            {"seconds", copy_s_},
            {"rate_bytes_per_s", copy_s_ > 0 ? static_cast<double>(run_bytes_) / copy_s_ : 0.0},
            {"verified", o_.verify}};
  if (replay_.is_object()) j["replay"] = replay_;
  if (o_.verify) {
    j["verified_bytes"] = verified_bytes_;
    j["verify_seconds"] = verify_s_;
  }
  return j;
}

// "left as holes", ... for Output::zero_handling().
std::string zero_text(std::string_view handling) {
  if (handling == "holes") return "left as holes";
  if (handling == "zeroed") return "zeroed on the device";
  return "written as zeroes";
}

void RestoreRun::print_summary() const {
  char secs[64];
  std::snprintf(secs, sizeof secs, "%.2f s", copy_s_);
  const double rate = copy_s_ > 0 ? static_cast<double>(run_bytes_) / copy_s_ : 0.0;
  ctl::Table t({"", ""});
  t.add({"restored", point_text(json{{"seq", state_.seq}, {"time_ns", state_.time_ns}}) +
                         " into " + o_.output});
  if (!state_.at.empty()) t.add({"requested", "--at " + state_.at});
  t.add({"size", ctl::format_bytes(size_) + " (" + count(size_) + " bytes)"});
  t.add({"copied", ctl::format_bytes(data_bytes_) + " of data written, " +
                       ctl::format_bytes(zero_bytes_) + " of zeroes " +
                       zero_text(out_.zero_handling()) +
                       ", in " + secs + " (" + ctl::format_mib_per_s(rate) + ")"});
  if (prior_bytes_ > 0) {
    t.add({"resumed", ctl::format_bytes(prior_bytes_) + " were restored by an earlier run"});
  }
  if (!hot_.empty()) {
    t.add({"order", "the " + count(hot_.size()) + " hottest segments first, then by offset"});
  }
  if (replay_.is_object()) {
    t.add({"replay", count(replay_.value("segments_reconstructed", uint64_t{0})) + " segments reconstructed (" +
                         count(replay_.value("segments_from_primary", uint64_t{0})) + " from the backing, " +
                         count(replay_.value("cache_hits", uint64_t{0})) + " from the cache), " +
                         count(replay_.value("versions_decoded", uint64_t{0})) + " versions decoded, " +
                         count(replay_.value("records_applied", uint64_t{0})) + " journal records applied"});
  }
  if (o_.verify) {
    char vs[64];
    std::snprintf(vs, sizeof vs, "%.2f s", verify_s_);
    t.add({"verified", ctl::format_bytes(verified_bytes_) +
                           " read back: identical to a second read of the export (" + vs + ")"});
  }
  std::printf("%s", t.render(/*header=*/false).c_str());
}

std::string RestoreRun::incomplete_text() const {
  std::string cmd = "shadowctl";
  if (!g_.socket.empty()) cmd += " --socket " + ctl::shell_quote(g_.socket);
  cmd += " restore --output " + ctl::shell_quote(o_.output);
  if (!o_.state.empty()) cmd += " --state " + ctl::shell_quote(o_.state);
  cmd += " --resume";
  if (o_.verify) cmd += " --verify";
  return o_.output + " is incomplete (" + ctl::format_bytes(written_.bytes()) + " of " +
         (size_ > 0 ? ctl::format_bytes(size_) : std::string("?")) +
         " restored; state in " + state_path_ + "); continue with: " + cmd;
}

// Reports an error; the state file is brought up to date first and the
// output called incomplete while it exists.
int RestoreRun::fail(const std::string& code, std::string message) {
  progress_.end();
  if (incomplete_) {
    if (out_.is_open()) {
      if (auto e = checkpoint(/*now=*/true)) message += "; and " + *e;
    }
    message += ". " + incomplete_text();
  }
  return report(g_, ControlError{code, message});
}

// After call() reported the daemon's error.
int RestoreRun::failed_call() {
  if (incomplete_) std::fprintf(stderr, "shadowctl: %s\n", incomplete_text().c_str());
  return kExitError;
}

int RestoreRun::stopped() {
  const int sig = g_stop_signal;
  const std::string name = sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : "a signal";
  fail("interrupted", "stopped by " + name + (incomplete_ ? "" : "; nothing was written"));
  return 128 + sig;
}

int cmd_restore(const Globals& g, const RestoreOptions& o) { return RestoreRun(g, o).run(); }

// ------------------------------------------------------------------ CLI

const char* kMainHelp =
    "shadowctl: inspect and control a running shadowd.\n\n"
    "Commands that talk to the daemon use its control socket: --socket PATH, else\n"
    "$SHADOWD_SOCKET, else /run/shadowd/disk.sock. Reading needs permission to\n"
    "connect to the socket (mode 0660: root and the daemon's control group);\n"
    "changing settings needs root or membership in the control group.\n";

const char* kMainFooter =
    "Every command takes --json: the daemon's reply as one JSON object on stdout\n"
    "(\"ok\", \"version\" and the result fields; on failure \"code\" and \"message\");\n"
    "restore prints its own summary so, and its progress as JSON lines on stderr.\n\n"
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
  std::string history_format = "csv", history_out, history_from;
  std::string versions_segment;
  uint64_t versions_limit = 50;
  bool pool_zones = false;
  std::string advance_seconds;
  std::string export_at, export_name, unexport_name;
  RestoreOptions restore;
  std::string rollback_at;
  bool rollback_yes = false;
  std::string verify_at;
  std::optional<uint64_t> verify_sample;
  bool verify_all = false;
  ctl::SimulateOptions simulate;
  std::string tune_action = "status";
};

// The forms `--at T` takes, for every command's help.
const char* kAtHelp =
    "T, the point in time (the time zone is the local one unless given):\n"
    "  2026-11-24T14:05:30Z, 2026-11-24 14:05:30.250+01:00   ISO 8601\n"
    "  2026-11-24 14:05:30, 2026-11-24                       local time, local midnight\n"
    "  @1795000000.5                                         seconds since the epoch\n"
    "  now, -15min, -1h30min, '2 hours ago'                  relative to now\n"
    "  seq:48213                                             a journal sequence number\n"
    "It must lie in the restorable window (`shadowctl history`).\n\n";

void add_export(CLI::App& app, Cli& c) {
  CLI::App* exp = app.add_subcommand(
      "export", "Serve the device as it was at a point in time, read-only, over NBD");
  exp->footer(std::string(kAtHelp) +
              "Adds a read-only NBD export that shows the device as it was at T (the last\n"
              "journal record at or before T), served on the daemon's NBD sockets beside the\n"
              "live export. Reads reconstruct segments from their versions and the journal;\n"
              "the live device and its history are not changed. The export stays until\n"
              "`shadowctl unexport NAME` or the daemon stops.\n\n"
              "Prints the export's name, the sequence number and time it shows, its URIs,\n"
              "and commands that reach it (nbdinfo, nbd-client -readonly, nbdfuse + mount -o\n"
              "ro,loop). A file system captured while mounted may need `noload` (ext4) or\n"
              "`norecovery` (xfs) among the mount options to mount read-only.\n\n"
              "Examples:\n"
              "  shadowctl export --at '2026-11-24 14:05'\n"
              "  shadowctl export --at=-15min --name before-upgrade\n"
              "  shadowctl export --at seq:48213 --json | jq -r .uri_unix\n\n"
              "Exit status: 0 when the export was added; 1 when the daemon refuses (T outside\n"
              "the window: out_of_range; the name taken: exists; no pool: unavailable); 2 on\n"
              "bad usage, e.g. a T that does not parse.");
  exp->add_option("--at", c.export_at, "The point in time T (see below)")
      ->type_name("T")
      ->required();
  exp->add_option("--name", c.export_name,
                  "The export's name (default at-YYYYMMDDTHHMMSSZ, the time it shows)");

  CLI::App* list = app.add_subcommand("exports", "List the NBD exports: live and point-in-time");
  list->footer(
      "One line per export: name, kind (the live export, or point-in-time), size, and for\n"
      "point-in-time exports the sequence number and time shown, when it was added, reads\n"
      "and bytes read, segments reconstructed, journal records applied, versions decoded\n"
      "and reconstruction cache hits.\n\n"
      "Examples:\n"
      "  shadowctl exports\n"
      "  shadowctl exports --json | jq '.exports[] | select(.live | not) | .name'\n\n"
      "Exit status: 0 on success; 1 when the daemon cannot be reached or refuses.");

  CLI::App* un = app.add_subcommand("unexport", "Remove a point-in-time export");
  un->footer(
      "Removes the point-in-time export NAME: new clients cannot connect to it; clients\n"
      "still connected keep reading it until they disconnect. The live export cannot be\n"
      "removed.\n\n"
      "Example:\n"
      "  shadowctl unexport before-upgrade\n\n"
      "Exit status: 0 when it was removed; 1 when there is no such export (not_found),\n"
      "it is the live one (invalid_argument), or the daemon cannot be reached.");
  un->add_option("NAME", c.unexport_name, "The export's name (see `shadowctl exports`)")
      ->required();
}

void add_restore(CLI::App& app, Cli& c) {
  CLI::App* r = app.add_subcommand(
      "restore", "Copy the device as it was at a point in time into a file or block device");
  r->footer(
      std::string(kAtHelp) +
      "Adds a temporary point-in-time export (restore-PID-RANDOM), reads it over NBD with\n"
      "several requests in flight, and writes the whole device to PATH: a regular file\n"
      "(created, or emptied and sized; mode 0600 when created) or a block device of at\n"
      "least the device's size (a smaller one is refused before anything is written; one\n"
      "that is mounted or held is refused too). The segments shadowd ranks hottest come\n"
      "first, then the rest in offset order. Zero ranges are left as holes in a file and\n"
      "zeroed on a device. The temporary export is removed at the end, on errors and on\n"
      "SIGINT/SIGTERM.\n\n"
      "While PATH.shadowd-restore (or --state FILE) exists, PATH is incomplete. It records\n"
      "the point in time (its sequence number), the size and the ranges already written\n"
      "(synced, then recorded, about every second); it is removed when the restore\n"
      "finished (and, with --verify, compared equal). For a block device the default\n"
      "lies in /dev, which a reboot empties: give --state on persistent storage, and the\n"
      "same --state with --resume. --resume continues at the same sequence number\n"
      "(--at may be left out) and is refused if the device size or sequence number no\n"
      "longer match. Without --resume, an existing state file or a non-empty PATH (or any\n"
      "block device) is refused unless --force. SIGINT/SIGTERM stop cleanly: the state\n"
      "file is kept and the command to resume is printed.\n\n"
      "--verify reads PATH back after the copy (past the page cache) and compares it with\n"
      "a second read of the export; the first differing offset is reported, the chunks\n"
      "that differ are marked to be copied again (--resume --verify), and the exit status\n"
      "is 1.\n\n"
      "Progress goes to stderr: one updating line (percent, MiB/s, ETA) when stderr is a\n"
      "terminal; with --json, one JSON object a second, {\"phase\":\"copy\"|\"verify\",\n"
      "\"progress\":{\"done_bytes\",\"total_bytes\",\"percent\",\"rate_bytes_per_s\",\"eta_s\"}},\n"
      "terminal or not. --no-progress turns both off. The summary (bytes, zero bytes,\n"
      "seconds, rate, the sequence number and time restored) goes to stdout; with --json\n"
      "as one object.\n\n"
      "Examples:\n"
      "  shadowctl restore --at '2026-11-24 14:05' --output /var/tmp/disk-1405.img\n"
      "  shadowctl restore --at=-1h --output /dev/sdc --force --verify\n"
      "  shadowctl restore --output /var/tmp/disk-1405.img --resume\n"
      "  shadowctl restore --at seq:48213 -o /dev/sdc --state /var/tmp/sdc.state --force\n"
      "  shadowctl --json restore --at=-1d -o /var/tmp/d.img 2>progress.jsonl | jq .rate_bytes_per_s\n\n"
      "Exit status: 0 when PATH holds the device at T (and compared equal with --verify);\n"
      "1 on errors: the daemon refuses or cannot be reached, PATH is refused (refused),\n"
      "I/O or NBD errors (io, nbd), a --verify mismatch (mismatch); 2 on bad usage;\n"
      "130 after SIGINT, 143 after SIGTERM (PATH is then incomplete, the state file kept).");
  RestoreOptions& o = c.restore;
  r->add_option("--at", o.at, "The point in time T (see below; optional with --resume)")
      ->type_name("T");
  r->add_option("-o,--output", o.output, "The file or block device to write")
      ->type_name("PATH")
      ->required();
  r->add_option("--state", o.state,
                "The state file (default PATH.shadowd-restore; give one on persistent storage "
                "for a device in /dev)")
      ->type_name("FILE");
  r->add_flag("--verify", o.verify, "Read PATH back and compare it with the export");
  r->add_flag("--no-progress", o.no_progress, "No progress on stderr");
  r->add_flag("--resume", o.resume, "Continue an interrupted restore into PATH");
  r->add_flag("--force", o.force,
              "Overwrite a non-empty PATH or a block device; start over an incomplete one");
  r->add_option("--from", o.from,
                "Restore from a replica alone (an RBD image rbd:POOL/IMAGE[:conf=...] or a file "
                "written by shadowd --replica), on any host: a private `shadowd --restore-from` "
                "serves it for the restore; --socket is not used")
      ->type_name("URI|PATH");
}

void add_rollback_verify(CLI::App& app, Cli& c) {
  CLI::App* rb = app.add_subcommand(
      "rollback", "Put the live device back to a point in time (a dry run without --yes)");
  rb->footer(
      std::string(kAtHelp) +
      "Without --yes: a dry run. Shows the sequence number and time T resolves to, how\n"
      "many segments and bytes would be rewritten and the first segment ids; nothing is\n"
      "changed.\n\n"
      "With --yes: rewrites the live device's changed segments to their content at T\n"
      "(client writes wait meanwhile; the pause is shown). The rollback is journaled like\n"
      "any write, so it can itself be undone: the command that does it, a rollback to the\n"
      "sequence number just before the rollback's own journal records, is printed.\n"
      "Clients with cached data (a mounted file system) must unmount or drop caches first.\n\n"
      "Examples:\n"
      "  shadowctl rollback --at=-10min\n"
      "  shadowctl rollback --at seq:48213 --yes\n\n"
      "Exit status: 0 after a dry run or a rollback; 1 when the daemon refuses (T outside\n"
      "the window: out_of_range; a read-only client: permission_denied); 2 on bad usage.");
  rb->add_option("--at", c.rollback_at, "The point in time T (see below)")
      ->type_name("T")
      ->required();
  rb->add_flag("-y,--yes", c.rollback_yes, "Do it (without: a dry run that changes nothing)");

  CLI::App* v = app.add_subcommand("verify", "Check the shadow pool's history");
  v->footer(
      "Scans the pool: its zones, journal records and versions are read and checked\n"
      "(checksums, structure). Then segments with history are reconstructed at T\n"
      "(default: a random point in the window): a random sample of 64, --sample N, or\n"
      "--all of them. Prints what was checked and every problem found. Reads the whole\n"
      "pool: can take long on a large one.\n\n" +
      std::string(kAtHelp) +
      "Examples:\n"
      "  shadowctl verify\n"
      "  shadowctl verify --at=-1d --all\n"
      "  shadowctl verify --json | jq .errors\n\n"
      "Exit status: 0 when clean; 1 when errors were found (or the daemon refuses or\n"
      "cannot be reached); 2 on bad usage.");
  v->add_option("--at", c.verify_at, "Reconstruct at T (default: a random point in the window)")
      ->type_name("T");
  CLI::Option* sample =
      v->add_option("--sample", c.verify_sample, "Segments to reconstruct (default 64)")
          ->type_name("N");
  CLI::Option* all = v->add_flag("--all", c.verify_all, "Reconstruct every segment");
  sample->excludes(all);
}

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
      "priority parameters, and per operation the requests, bytes and errors since start.\n"
      "With a shadow pool (--pool) also: the pool devices, background shadowing (budget,\n"
      "queue, bytes read, versions made), copy-on-first-write stalls, the restorable\n"
      "window, whether history is degraded, and the last checkpoint.\n\n"
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

  CLI::App* history = app.add_subcommand(
      "history", "Show the restorable window of the shadow pool (or: history export)");
  history->require_subcommand(0, 1);
  history->footer(
      "Without a further word: the window that can be restored (oldest and newest time,\n"
      "first and last journal sequence number), the configured retention and whether the\n"
      "pool had to cut it short for space, the journal (records, stored and written bytes),\n"
      "the versions, the segments with history, pool use per tier, and whether history is\n"
      "degraded (pool full or failing: writes go on, history restarts later). Needs a\n"
      "daemon started with --pool.\n\n"
      "`history export` writes the per-segment access history instead (see its --help).\n\n"
      "Examples:\n"
      "  shadowctl history\n"
      "  shadowctl --json history | jq .from");
  history->add_option("--from", c.history_from,
                      "The window of a replica (an RBD image or a file written by shadowd "
                      "--replica) instead of a running daemon's")
      ->type_name("URI|PATH");
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

  CLI::App* versions = app.add_subcommand(
      "versions", "List the shadow versions of a segment, or the segments with history");
  versions->footer(
      "With --segment: that segment's shadow versions, oldest first (journal sequence\n"
      "number and time, tier, zone and offset in the zone, stored bytes, full image or\n"
      "delta with its depth and base, content checksum, and \"cow\" for a version captured\n"
      "on the write path by copy-on-first-write), and its journal records in the window.\n"
      "OFFSET is a byte offset anywhere inside the segment (K, M, G, T suffixes: 4096,\n"
      "3M, 1.5G); #ID is a segment number.\n\n"
      "Without --segment: the segments that have history, in order, with their version\n"
      "and record counts (the first --limit of them).\n\n"
      "Examples:\n"
      "  shadowctl versions\n"
      "  shadowctl versions --segment 3M\n"
      "  shadowctl versions --segment '#12' --json");
  versions->add_option("--segment", c.versions_segment, "OFFSET (bytes; K/M/G suffixes) or #ID")
      ->type_name("OFFSET|#ID");
  versions->add_option("--limit", c.versions_limit,
                       "How many segments to list without --segment (default 50, 0 = all)")
      ->type_name("N");

  CLI::App* pool = app.add_subcommand("pool", "Show the shadow pool's zones, use and compression");
  pool->footer(
      "Per tier: zones in total, free and by kind (journal, versions, checkpoint, access\n"
      "history), zone size, bytes used, capacity and utilisation. Then the compression\n"
      "of versions and journal (content bytes : stored bytes), pool bytes written per\n"
      "client byte written, reclaim activity (zones reclaimed, records pruned, versions\n"
      "folded or dropped, retention shrinks), checkpoints, errors and the degraded state.\n"
      "--zones adds one line per zone (kind, generation, bytes used, live entries).\n\n"
      "Examples:\n"
      "  shadowctl pool\n"
      "  shadowctl pool --zones");
  pool->add_flag("--zones", c.pool_zones, "List every zone");

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
  if (CLI::App* history = app.get_subcommand("history"); history->parsed()) {
    if (history->got_subcommand("export")) {
      return cmd_history_export(g, c.history_format, c.history_out);
    }
    if (!c.history_from.empty()) {
      ctl::ReplicaDaemon rd;
      if (std::string e = rd.start(c.history_from, "now"); !e.empty()) {
        return report(g, ControlError{"unavailable", e});
      }
      Globals g2 = g;
      g2.socket = rd.control_socket();
      return cmd_history(g2);
    }
    return cmd_history(g);
  }
  if (app.got_subcommand("versions")) return cmd_versions(g, c.versions_segment, c.versions_limit);
  if (app.got_subcommand("pool")) return cmd_pool(g, c.pool_zones);
  if (app.got_subcommand("export")) return cmd_export(g, c.export_at, c.export_name);
  if (app.got_subcommand("exports")) return cmd_exports(g);
  if (app.got_subcommand("unexport")) return cmd_unexport(g, c.unexport_name);
  if (app.got_subcommand("restore")) {
    if (!c.restore.from.empty()) {
      ctl::ReplicaDaemon rd;
      if (std::string e = rd.start(c.restore.from, c.restore.at.empty() ? "now" : c.restore.at);
          !e.empty()) {
        return report(g, ControlError{"unavailable", e});
      }
      Globals g2 = g;
      g2.socket = rd.control_socket();
      return cmd_restore(g2, c.restore);
    }
    return cmd_restore(g, c.restore);
  }
  if (app.got_subcommand("rollback")) return cmd_rollback(g, c.rollback_at, c.rollback_yes);
  if (app.got_subcommand("verify")) {
    return cmd_verify(g, c.verify_at, c.verify_all ? std::optional<uint64_t>(0) : c.verify_sample);
  }
  if (app.got_subcommand("simulate")) return ctl::cmd_simulate(c.simulate, g.json);
  if (app.got_subcommand("tune")) return cmd_tune(g, c.tune_action);
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
  add_export(app, c);
  add_restore(app, c);
  add_rollback_verify(app, c);
  ctl::add_simulate(app, c.simulate);
  CLI::App* tune = app.add_subcommand("tune", "Show or control auto-tuning of the shadowing policy");
  tune->add_option("action", c.tune_action, "status (default), run, on or off")
      ->check(CLI::IsMember({"status", "run", "on", "off"}));
  tune->footer(
      "The daemon replays its own access history through the simulator (as `shadowctl\n"
      "simulate` does) with the priority formula's alpha, beta, gamma and baseline and the\n"
      "policy's min_value and horizon moved one at a time, and keeps what gives the fewest\n"
      "copy-on-write stalls (then the fewest background bytes) at the configured budget,\n"
      "retention and pool capacity; max_versions_per_segment follows the pool's capacity.\n"
      "It runs every --tune-interval seconds while on.\n\n"
      "  status   on/off, the last run and the values in use (also in `config get`)\n"
      "  run      tune now and apply (needs --pool); prints the result\n"
      "  on, off  periodic runs\n\n"
      "Examples:\n"
      "  shadowctl tune\n"
      "  shadowctl --json tune run | jq .last");
  app.add_subcommand("version", "Print shadowctl's version");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? kExitOk : kExitUsage;
  }
  return dispatch(app, c);
}
