// `shadowctl restore --from` and `history --from`: a private shadowd
// --restore-from on a temporary control socket, for the duration of one
// command, so that reading a replica goes through the same code as reading
// a live daemon's history.
#pragma once

#include <sys/types.h>

#include <string>

namespace shadowd::ctl {

class ReplicaDaemon {
 public:
  ReplicaDaemon() = default;
  ~ReplicaDaemon();
  ReplicaDaemon(const ReplicaDaemon&) = delete;
  ReplicaDaemon& operator=(const ReplicaDaemon&) = delete;

  // Starts `shadowd --restore-from from --at at` and waits until it is
  // ready (sd_notify READY=1). Empty on success, else why it did not start
  // (the daemon's own error lines included).
  std::string start(const std::string& from, const std::string& at);
  const std::string& control_socket() const { return control_; }

 private:
  pid_t pid_ = -1;
  std::string dir_, control_;
};

// The shadowd binary: $SHADOWD, else next to shadowctl (installed side by
// side, or the build tree's ../daemon/shadowd), else "shadowd" on PATH.
std::string shadowd_binary();

}  // namespace shadowd::ctl
