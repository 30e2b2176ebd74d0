// The control commands of shadowd: a JSON request in, a JSON reply out.
// No sockets here (daemon/control.cc carries the bytes), so every command
// can be tested on its own.
//
// Commands (arguments beside "cmd"; see ctl/protocol.h for the envelope):
//   version                      daemon and protocol versions
//   status                       export, endpoints, connections, requests and
//                                bytes by op, uptime, monitor totals
//   top [n] [by] [window]        the hottest segments; n 1..10000 (10), by
//                                "priority"|"reads"|"writes", window seconds
//                                or "1h"/"1d"/"1w" (one of the configured)
//   segment offset|id            one segment in detail
//   config.get [key]             the configuration (or one key)
//   config.set key value         a run-time tunable (mutating)
//   history.export [format]      access history, "json" or "csv"
//   history                      the restorable window of the shadow pool:
//                                from/to, seqs, retention, journal, versions,
//                                pool use per tier, degraded state
//   versions [segment] [first] [limit]
//                                with segment ("#ID", an offset, "3M"): that
//                                segment's versions and journal records;
//                                without: a page of the segments with history
//                                (first = segment id to start at; limit 1..10000,
//                                default 1000; "next" gives the following page)
//   pool [zones]                 zones per tier and kind, use, compression,
//                                pool bytes per client byte, reclaim,
//                                checkpoints; zones=true lists every zone
//   tune.status                  auto-tuning: on/off, last run, values in use
//   tune.run                     tune now (mutating; needs a pool)
//   tune.on / tune.off           periodic tuning (mutating)
//   debug.advance seconds        move the --test-clock (mutating; only with
//                                a test clock, else an unknown command), then
//                                run one shadowing round
// history, versions and pool need a shadow pool (--pool); without one they
// fail with "unavailable". A request that fails changes nothing.
#pragma once

#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/monitor.h"
#include "daemon/context.h"

namespace shadowd {

// Run one parsed request. `may_write`: the peer may run mutating commands.
// Never throws; the reply always has "ok" and "version".
nlohmann::json run_command(DaemonContext& ctx, const nlohmann::json& request, bool may_write);

// The journal sequence number and time that `at` ({"at_ns": T} or {"seq":
// N}) names in ctx.store's window, or a message naming the window.
struct RestorePoint {
  uint64_t seq = 0;
  int64_t time_ns = 0;
};
std::variant<RestorePoint, std::string> resolve_restore_point(DaemonContext& ctx,
                                                              const nlohmann::json& at);
// Parse one request line (without '\n') and run it. `cmd`, if given, gets
// the command's name when the line was a request at all.
nlohmann::json run_command_line(DaemonContext& ctx, std::string_view line, bool may_write,
                                std::string* cmd = nullptr);
// True for commands that change the daemon's state.
bool is_mutating_command(std::string_view cmd);

// The priority tunables of a configuration.
PriorityParams priority_params(const Config& cfg);

// Auto-tuning: replay the access history through the simulator and apply
// the best settings found (see core/tune.h). maybe_tune() does so when the
// periodic run is due (called from the roller thread).
Status run_tune(DaemonContext& ctx);
void maybe_tune(DaemonContext& ctx);

// Apply the run-time tunables of a validated configuration (windows and
// priority to the monitor; shadow_budget_bytes_per_s and retention_seconds
// to the shadow pool), then record them in ctx.config. Used by `config.set`
// and by SIGHUP. On error nothing in ctx.config changes.
// REQUIRES: ctx.config_mu held.
Status apply_runtime_config(DaemonContext& ctx, const Config& next);

// The keys (config-file names) whose values differ between `running` and
// `next` but apply only at start (everything that is not a run-time
// tunable). SIGHUP warns about them.
std::vector<std::string> start_time_changes(const Config& running, const Config& next);

}  // namespace shadowd
