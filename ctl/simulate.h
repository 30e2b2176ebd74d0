// `shadowctl simulate`: replay a block trace through the shadowing policy on
// a virtual clock (core/simulator.h), for capacity planning and for
// comparing policies. Runs locally; no daemon is needed.
#pragma once

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace shadowd::ctl {

struct SimulateOptions {
  std::string trace;
  std::string format = "auto";
  std::string device_size;
  std::string segment_size = "256K";
  std::string pool_capacity = "100%";
  std::string budget = "64M";
  std::string retention = "7d";
  std::string policy = "auto";
  std::string horizon;   // forecast horizon (seconds); default the policy's
  std::string min_value; // forecast below which nothing is copied; default the policy's
  uint64_t seed = 1;
  bool no_progress = false;
};

CLI::App* add_simulate(CLI::App& app, SimulateOptions& o);
// Exit status: 0 ok, 1 failed (unreadable or malformed trace, bad values).
int cmd_simulate(const SimulateOptions& o, bool json);

}  // namespace shadowd::ctl
