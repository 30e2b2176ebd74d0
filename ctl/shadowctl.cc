// shadowctl: the operator's command line for shadowd.
//
// Most commands talk to the daemon's control socket (ctl/protocol.h); `info`
// inspects an export over NBD itself (libnbd). Human output is tables with
// units; --json prints the daemon's reply as one JSON object instead.
#include <libnbd.h>

#include <algorithm>
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
    t.add({"shadowing", (budget == 0 ? std::string("budget 0 (no background shadowing)")
                                     : "budget " + ctl::format_bytes(budget) + "/s") +
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
                            count(u64(p["group_commits"])) + " group commits)"});
  t.add({"reclaim", count(u64(p["zones_reclaimed"])) + " zones reclaimed, " +
                        count(u64(p["records_pruned"])) + " records pruned, " +
                        count(u64(p["versions_folded"])) + " versions folded, " +
                        count(u64(p["versions_dropped"])) + " dropped, " +
                        count(u64(p["retention_shrinks"])) + " retention shrinks"});
  t.add({"checkpoints", count(u64(p["checkpoints"])) + " since start, last " +
                            when_ns(p["last_checkpoint_ns"], now_ns)});
  t.add({"errors", count(u64(p["pool_errors"])) + " pool, " +
                       count(u64(p["primary_write_errors"])) + " primary write"});
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
  std::string versions_segment;
  uint64_t versions_limit = 50;
  bool pool_zones = false;
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
    return cmd_history(g);
  }
  if (app.got_subcommand("versions")) return cmd_versions(g, c.versions_segment, c.versions_limit);
  if (app.got_subcommand("pool")) return cmd_pool(g, c.pool_zones);
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
