// What the daemon's control plane (control socket, metrics, SIGHUP reload)
// can see and change. Owned by main(); outlives every user.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "config/config.h"
#include "core/clock.h"
#include "core/gate_backend.h"
#include "core/monitor.h"
#include "core/reconstructor.h"
#include "core/replica.h"
#include "core/shadow_store.h"
#include "core/tune.h"
#include "nbd/export.h"
#include "nbd/server.h"
#include "nbd/tls.h"

namespace shadowd {

struct DaemonContext {
  Config config;                 // as loaded; guarded by config_mu for changes
  std::string config_path;       // empty if none (SIGHUP then reloads nothing)
  mutable std::mutex config_mu;
  const Clock* clock = nullptr;  // the monitor's clock
  ManualClock* test_clock = nullptr;  // non-null with --test-clock only
  int64_t started_s = 0;
  std::shared_ptr<nbd::Export> export_;
  nbd::Server* server = nullptr;
  std::shared_ptr<const nbd::TlsContext> tls;  // null when TLS is off
  Monitor* monitor = nullptr;    // null when the monitor is disabled
  ShadowStore* store = nullptr;  // the shadow pool; null without --pool
  Replica* replica = nullptr;    // the history's replica; null without --replica

  // Restore (with a pool): the exports the NBD server offers, the
  // reconstructor shared by point-in-time exports and commands, the gate in
  // front of the live export (paused during a rollback) and the journaled
  // backend below it (where a rollback writes).
  nbd::ExportRegistry* registry = nullptr;
  std::shared_ptr<Reconstructor> reconstructor;
  GateBackend* gate = nullptr;
  std::shared_ptr<IoBackend> journal;
  struct PitExport {
    uint64_t seq = 0;
    int64_t time_ns = 0;     // the time asked for (or the seq's time)
    int64_t created_ns = 0;
    int64_t pinned_ns = 0;   // ShadowStore::pin()ned while the export exists
    std::shared_ptr<PointInTimeBackend> backend;
  };
  std::mutex pit_mu;
  std::map<std::string, PitExport> pit_exports;
  std::mutex rollback_mu;  // one rollback at a time

  // Auto-tuning (`shadowctl tune`): periodic runs on the roller thread while
  // enabled, or one on request. One run at a time (run_mu).
  struct Tune {
    std::mutex mu;                 // the fields below
    bool enabled = true;
    uint32_t interval_s = 3600;
    int64_t last_run_ns = 0;       // the daemon's clock
    uint64_t runs = 0;
    bool have_last = false;
    tune::Output last;
    std::string last_error;
    std::mutex run_mu;
    std::atomic<bool> cancel{false};  // set at shutdown: a run in progress stops
  } tune;
};

}  // namespace shadowd
