// What the daemon's control plane (control socket, metrics, SIGHUP reload)
// can see and change. Owned by main(); outlives every user.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "config/config.h"
#include "core/clock.h"
#include "core/monitor.h"
#include "core/shadow_store.h"
#include "nbd/export.h"
#include "nbd/server.h"

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
  Monitor* monitor = nullptr;    // null when the monitor is disabled
  ShadowStore* store = nullptr;  // the shadow pool; null without --pool
};

}  // namespace shadowd
