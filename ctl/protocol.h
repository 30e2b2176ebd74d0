// The control protocol between shadowd and shadowctl, shared by both.
//
// Transport: a Unix stream socket; newline-delimited JSON, one object per
// line, each way. A client sends requests and reads one reply per request,
// in order.
//
//   request  {"version":1,"cmd":"top","n":5,"by":"reads","window":"1h"}
//            Arguments sit beside "cmd". "version" is the client's protocol
//            version (optional; missing means this version).
//   success  {"ok":true,"version":1, ...result fields}
//   failure  {"ok":false,"version":1,"code":"out_of_range","message":"..."}
//
// "version" in a reply is the daemon's protocol version; a client that
// speaks another one must refuse the reply (check_reply() does). Error codes
// are the strings in `errc` below; the message is for humans.
//
// Limits: a request line is at most kMaxRequestLineBytes (longer lines get
// line_too_long and the connection is closed) and nests arrays and objects
// at most kMaxRequestDepth deep (invalid_request); a reply line is at most
// kMaxReplyBytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace shadowd::ctl {

using json = nlohmann::json;

inline constexpr int kControlProtocolVersion = 1;
inline constexpr size_t kMaxRequestLineBytes = size_t{1} << 20;
inline constexpr size_t kMaxReplyBytes = size_t{256} << 20;
// Copying or comparing a json value recurses once per level, so a request
// line of nested brackets could overflow the stack. Real requests nest at
// most 2 deep (an array value of config.set).
inline constexpr size_t kMaxRequestDepth = 32;

// Error codes (the "code" field of a failed reply).
namespace errc {
inline constexpr const char* kInvalidJson = "invalid_json";        // line is not JSON
inline constexpr const char* kInvalidRequest = "invalid_request";  // not an object, no "cmd"
inline constexpr const char* kUnsupportedVersion = "unsupported_version";
inline constexpr const char* kUnknownCommand = "unknown_command";
inline constexpr const char* kInvalidArgument = "invalid_argument";    // unknown arg, wrong type
inline constexpr const char* kOutOfRange = "out_of_range";             // right type, bad value
inline constexpr const char* kPermissionDenied = "permission_denied";  // mutating, not allowed
inline constexpr const char* kLineTooLong = "line_too_long";
inline constexpr const char* kUnavailable = "unavailable";  // feature off, too many clients
inline constexpr const char* kInternal = "internal";
}  // namespace errc

struct ControlError {
  std::string code;  // one of errc, or a client-side code ("unreachable", ...)
  std::string message;
};

// ---- building messages ----
// The fields of `args` (an object) become arguments; "cmd" and "version"
// among them are ignored.
json make_request(std::string_view cmd, json args = json::object());
// {"ok":true,"version":V} merged with the fields of `result` (an object).
json ok_reply(json result = json::object());
json error_reply(const ControlError& e);
json error_reply(const char* code, std::string message);
// One line: compact JSON and '\n'. Strings that are not valid UTF-8 are
// repaired (U+FFFD), never a reason to fail.
std::string encode_line(const json& message);

// ---- reading messages ----
struct Request {
  std::string cmd;
  json message;  // the whole request object (arguments are its other keys)
};
// Check the envelope of a request that is already JSON, and its depth (see
// kMaxRequestDepth) before anything copies it.
std::optional<ControlError> check_request(const json& message, Request& out);
// Check a reply's envelope: an object with "ok" and this protocol version.
// Returns nullopt for a success reply, else the error (the daemon's own code
// and message for a failure reply; "protocol" or "version_mismatch" when
// the reply itself is unusable).
std::optional<ControlError> check_reply(const json& reply);

// ---- values both sides parse ----
// "3600", "3600s", "90m", "1h", "1d", "1w" -> seconds. nullopt if malformed
// or above 2^32 - 1.
std::optional<uint32_t> parse_duration_seconds(std::string_view s);

}  // namespace shadowd::ctl
