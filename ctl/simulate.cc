#include "ctl/simulate.h"

#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>

#include <nlohmann/json.hpp>

#include "core/simulator.h"
#include "core/trace.h"
#include "ctl/format.h"
#include "ctl/protocol.h"

namespace shadowd::ctl {
namespace {

using nlohmann::json;

int fail(const std::string& msg) {
  std::fprintf(stderr, "shadowctl: simulate: %s\n", msg.c_str());
  return 1;
}

// "16MiB/s", "16M", "16777216" -> bytes per second.
std::optional<uint64_t> parse_rate(std::string s) {
  if (s.size() > 2 && s.compare(s.size() - 2, 2, "/s") == 0) s.resize(s.size() - 2);
  return parse_size(s);
}

// "15min", "90m", "2h", "7d", "3600" -> seconds.
std::optional<uint64_t> parse_span(std::string s) {
  if (s.size() > 3 && s.compare(s.size() - 3, 3, "min") == 0) s.resize(s.size() - 2);
  auto v = parse_duration_seconds(s);
  if (!v || *v == 0) return std::nullopt;
  return *v;
}

uint64_t peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<uint64_t>(u.ru_maxrss) * 1024;
}

class Bar {
 public:
  Bar(bool on, std::string label) : on_(on), label_(std::move(label)) {}
  void show(uint64_t done, uint64_t total) {
    if (!on_) return;
    const auto now = std::chrono::steady_clock::now();
    if (done < total && now - last_ < std::chrono::milliseconds(200)) return;
    last_ = now;
    const double pct = total ? 100.0 * static_cast<double>(done) / static_cast<double>(total) : 100.0;
    std::fprintf(stderr, "\r%s %5.1f %%\x1b[K", label_.c_str(), pct);
    open_ = true;
  }
  void end() {
    if (open_) std::fputc('\n', stderr);
    open_ = false;
  }

 private:
  bool on_;
  std::string label_;
  std::chrono::steady_clock::time_point last_{};
  bool open_ = false;
};

}  // namespace

CLI::App* add_simulate(CLI::App& app, SimulateOptions& o) {
  CLI::App* s = app.add_subcommand(
      "simulate", "Replay a block trace through a shadowing policy and count copy-on-write stalls");
  s->footer(
      "Replays the trace on a virtual clock through the daemon's own access monitor,\n"
      "predictors and shadowing policy, over a model of the shadow pool: no daemon, no\n"
      "I/O, much faster than real time. It answers: with this pool capacity, copy budget,\n"
      "retention and policy, how many writes would wait for a copy-on-first-write\n"
      "(a stall), how much is copied in the background, how full the pool gets, and how\n"
      "many journal records a restore would replay. The model is written down exactly\n"
      "in docs/SIMULATION.md.\n\n"
      "Trace formats (--format, detected from the first line by default):\n"
      "  msr       SNIA MSR Cambridge CSV: Timestamp,Hostname,DiskNumber,Type,Offset,\n"
      "            Size,ResponseTime (Windows filetime, 100 ns ticks)\n"
      "  blkparse  blkparse's default text output; queued (Q) events are the requests\n"
      "  history   shadowd's own `shadowctl history export --format csv`\n"
      "gzip-compressed files are read as they are. A malformed line stops the run with\n"
      "FILE:LINE and the reason; nothing is simulated then.\n\n"
      "Policies (--policy):\n"
      "  none          no speculative bases: a base is freed when its segment leaves the\n"
      "                window; nothing is copied ahead\n"
      "  lru, heat     keep speculative bases by recency / by number of writes\n"
      "                (reactive: never copy ahead)\n"
      "  priority      the priority formula (alpha, beta, gamma) and its top segments\n"
      "  ewma, holt-winters, arima, sequential\n"
      "                copy ahead what the forecaster expects to be written\n"
      "  auto          sequential streams + ewma rates + the priority formula (default;\n"
      "                the daemon's policy)\n"
      "  oracle        knows the future (Belady): the limit to compare against\n\n"
      "Output: a table; with --json one object with requests, writes, segment_writes,\n"
      "stalls, stalls_per_1k_writes, stall_bytes, copied_bytes, pool_peak_bytes,\n"
      "history_shrinks, replay_records_mean, replay_records_p99, policy, sim_seconds and\n"
      "more. Progress goes to stderr on a terminal (--no-progress turns it off).\n\n"
      "Examples:\n"
      "  shadowctl simulate --trace pgbench.csv.gz --pool-capacity 10% --budget 16MiB\n"
      "  shadowctl simulate --trace blk.txt --policy oracle --retention 15min --json\n"
      "  shadowctl history export -o h.csv && shadowctl simulate --trace h.csv");
  s->add_option("--trace", o.trace, "The block trace (FILE, gzip accepted)")->required();
  s->add_option("--format", o.format, "msr, blkparse, history or auto (default)")
      ->check(CLI::IsMember({"msr", "blkparse", "history", "auto"}));
  s->add_option("--device-size", o.device_size, "BYTES (default: the highest offset the trace reaches)");
  s->add_option("--segment-size", o.segment_size, "BYTES, a power of two from 64K to 1M (default 256K)");
  s->add_option("--pool-capacity", o.pool_capacity,
                "BYTES, or PCT% of the device size (default 100%)");
  s->add_option("--budget", o.budget, "Background copy budget, BYTES per second (default 64MiB/s)");
  s->add_option("--retention", o.retention, "The restorable window, e.g. 15min, 2h, 7d (default 7d)");
  s->add_option("--policy", o.policy, "The shadowing policy (default auto; see below)");
  s->add_option("--horizon", o.horizon, "Forecast horizon in seconds (default 60)");
  s->add_option("--min-value", o.min_value,
                "Copy ahead only segments forecast at least this (default 0.01)");
  s->add_option("--seed", o.seed, "Seed of the sampled restore times (default 1)");
  s->add_flag("--no-progress", o.no_progress, "No progress on stderr");
  return s;
}

int cmd_simulate(const SimulateOptions& o, bool as_json) {
  sim::Options so;
  auto pol = parse_policy(o.policy);
  if (!pol) return fail(pol.status().message());
  so.policy = *pol;
  auto fmt = trace::parse_format(o.format);
  if (!fmt) return fail(fmt.status().message());
  auto seg = parse_size(o.segment_size);
  if (!seg || *seg < 65536 || *seg > (1u << 20) || (*seg & (*seg - 1)) != 0) {
    return fail("--segment-size '" + o.segment_size + "': a power of two from 64K to 1M");
  }
  so.segment_bytes = static_cast<uint32_t>(*seg);
  if (!o.device_size.empty()) {
    auto d = parse_size(o.device_size);
    if (!d || *d == 0) return fail("--device-size '" + o.device_size + "': not a size");
    so.device_bytes = *d;
  }
  if (!o.pool_capacity.empty() && o.pool_capacity.back() == '%') {
    char* end = nullptr;
    const std::string num = o.pool_capacity.substr(0, o.pool_capacity.size() - 1);
    const double pct = std::strtod(num.c_str(), &end);
    if (num.empty() || end != num.c_str() + num.size() || !(pct > 0)) {
      return fail("--pool-capacity '" + o.pool_capacity + "': not a percentage");
    }
    so.pool_capacity_pct = pct;
  } else {
    auto c = parse_size(o.pool_capacity);
    if (!c || *c == 0) return fail("--pool-capacity '" + o.pool_capacity + "': not a size or a percentage");
    so.pool_capacity_bytes = *c;
  }
  auto b = parse_rate(o.budget);
  if (!b) return fail("--budget '" + o.budget + "': not a rate (e.g. 16MiB or 16MiB/s)");
  so.budget_bytes_per_s = *b;
  auto r = parse_span(o.retention);
  if (!r) return fail("--retention '" + o.retention + "': not a duration (e.g. 15min, 2h, 7d)");
  so.retention_s = *r;
  if (!o.horizon.empty()) {
    char* end = nullptr;
    const double h = std::strtod(o.horizon.c_str(), &end);
    if (end != o.horizon.c_str() + o.horizon.size() || !(h > 0)) return fail("--horizon: seconds, positive");
    so.params.horizon_s = h;
  }
  if (!o.min_value.empty()) {
    char* end = nullptr;
    const double v = std::strtod(o.min_value.c_str(), &end);
    if (end != o.min_value.c_str() + o.min_value.size() || !(v >= 0)) return fail("--min-value: a number, 0 or more");
    so.params.min_value = v;
  }
  so.seed = o.seed;
  so.params.predict.hw_period_seconds = 0;

  // The whole trace is read first: a malformed line changes nothing.
  const bool bar_on = !o.no_progress && ::isatty(STDERR_FILENO);
  std::vector<trace::Request> reqs;
  trace::ReadOptions ro;
  ro.format = *fmt;
  ro.history_segment_bytes = so.segment_bytes;
  trace::ReadStats rs;
  const auto t0 = std::chrono::steady_clock::now();
  Bar read_bar(bar_on, "reading   ");
  Status st = trace::read_file(
      o.trace, ro, [&](const trace::Request& q) { reqs.push_back(q); }, &rs,
      [&](uint64_t d, uint64_t t) { read_bar.show(d, t); });
  read_bar.end();
  if (!st) return fail(st.message());
  const double read_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  Bar sim_bar(bar_on, "simulating");
  auto res = sim::run(reqs, so, [&](uint64_t d, uint64_t t) { sim_bar.show(d, t); });
  sim_bar.end();
  if (!res) return fail(res.status().message());
  const sim::Result& x = *res;
  const double per_m = x.requests ? 1e6 / static_cast<double>(x.requests) : 0;
  if (as_json) {
    json j = {
        {"trace", o.trace},
        {"format", trace::format_name(rs.format)},
        {"policy", x.policy},
        {"requests", x.requests},
        {"reads", x.reads},
        {"writes", x.writes},
        {"segment_writes", x.segment_writes},
        {"segment_reads", x.segment_reads},
        {"stalls", x.stalls},
        {"stalls_per_1k_writes", x.stalls_per_1k_writes},
        {"stall_bytes", x.stall_bytes},
        {"copied_bytes", x.copied_bytes},
        {"copies_ahead", x.copies},
        {"copies_ahead_used", x.copies_used},
        {"versions_made", x.versions_made},
        {"speculative_hits", x.speculative_hits},
        {"speculative_evicted", x.speculative_evicted},
        {"speculative_replaced", x.speculative_replaced},
        {"bases_freed", x.bases_freed},
        {"pool_capacity_bytes", x.pool_capacity_bytes},
        {"pool_peak_bytes", x.pool_peak_bytes},
        {"history_shrinks", x.history_shrinks},
        {"replay_records_mean", x.replay_records_mean},
        {"replay_records_p99", x.replay_records_p99},
        {"device_bytes", x.device_bytes},
        {"segment_bytes", x.segment_bytes},
        {"budget_bytes_per_s", x.budget_bytes_per_s},
        {"retention_s", x.retention_s},
        {"trace_seconds", x.trace_seconds},
        {"sim_seconds", x.sim_seconds},
        {"read_seconds", read_s},
        {"sim_seconds_per_million_requests", x.sim_seconds * per_m},
        {"policy_memory_bytes", x.policy_memory_bytes},
        {"peak_rss_bytes", peak_rss_bytes()},
    };
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  Table t({"", ""});
  t.add({"trace", o.trace + " (" + std::string(trace::format_name(rs.format)) + ", " +
                      format_span(static_cast<int64_t>(x.trace_seconds + 0.5)) + ")"});
  t.add({"requests", std::to_string(x.requests) + " (" + std::to_string(x.writes) + " writes, " +
                         std::to_string(x.segment_writes) + " segment-writes)"});
  t.add({"device", format_bytes(x.device_bytes) + " in " + format_bytes(x.segment_bytes) + " segments"});
  t.add({"pool capacity", format_bytes(x.pool_capacity_bytes) + ", peak " + format_bytes(x.pool_peak_bytes)});
  t.add({"budget", format_bytes(x.budget_bytes_per_s) + "/s"});
  t.add({"retention", format_span(static_cast<int64_t>(x.retention_s)) +
                          (x.history_shrinks ? ", cut short for space " + std::to_string(x.history_shrinks) + " times"
                                             : std::string(""))});
  t.add({"policy", x.policy});
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f", x.stalls_per_1k_writes);
  t.add({"stalls", std::to_string(x.stalls) + " (" + buf + " per 1000 segment-writes, " +
                       format_bytes(x.stall_bytes) + " copied on the write path)"});
  t.add({"copied ahead", std::to_string(x.copies) + " segments, " + std::to_string(x.copies_used) + " used"});
  t.add({"background bytes", format_bytes(x.copied_bytes) + " (copies ahead and " +
                                 std::to_string(x.versions_made) + " versions)"});
  t.add({"speculative bases", std::to_string(x.speculative_hits) + " hits, " +
                                  std::to_string(x.speculative_evicted) + " evicted (" +
                                  std::to_string(x.speculative_replaced) + " for copies ahead worth more)"});
  std::snprintf(buf, sizeof buf, "%.1f mean, %.0f p99", x.replay_records_mean, x.replay_records_p99);
  t.add({"restore replay", std::string(buf) + " records per segment"});
  std::snprintf(buf, sizeof buf, "%.2f s (%.2f s per million requests), %s peak RSS", x.sim_seconds,
                x.sim_seconds * per_m, format_bytes(peak_rss_bytes()).c_str());
  t.add({"simulated in", buf});
  std::printf("%s", t.render(false).c_str());
  return 0;
}

}  // namespace shadowd::ctl
