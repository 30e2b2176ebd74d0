// shadowctl's side of the control socket: connect, send one request, read
// one reply (ctl/protocol.h).
#pragma once

#include <string>
#include <variant>

#include "ctl/protocol.h"

namespace shadowd::ctl {

inline constexpr const char* kDefaultSocketPath = "/run/shadowd/disk.sock";
inline constexpr const char* kSocketEnv = "SHADOWD_SOCKET";
// Seconds one receive may wait for the daemon before giving up.
inline constexpr int kReplyTimeoutSeconds = 120;
// For commands that reconstruct or rewrite much of the device (export,
// rollback, verify).
inline constexpr int kLongReplyTimeoutSeconds = 3600;

// `flag` when given, else $SHADOWD_SOCKET, else kDefaultSocketPath.
std::string socket_path(const std::string& flag);

// The reply (successful or not: see check_reply()), or why there is none.
// Client-side error codes: "unreachable" (no socket, refused, no
// permission), "io" (the connection failed midway, timeout), "protocol" (no
// reply line, not JSON, too long). One receive waits at most
// `reply_timeout_seconds`.
std::variant<json, ControlError> call(const std::string& path, const json& request,
                                      int reply_timeout_seconds = kReplyTimeoutSeconds);

}  // namespace shadowd::ctl
