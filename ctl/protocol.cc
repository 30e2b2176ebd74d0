#include "ctl/protocol.h"

#include <charconv>
#include <utility>
#include <vector>

namespace shadowd::ctl {

json make_request(std::string_view cmd, json args) {
  json req = json::object();
  req["version"] = kControlProtocolVersion;
  req["cmd"] = std::string(cmd);
  if (args.is_object()) {
    // An argument never replaces the envelope: "cmd" is `cmd`, "version" ours.
    for (auto it = args.begin(); it != args.end(); ++it) {
      if (it.key() != "cmd" && it.key() != "version") req[it.key()] = it.value();
    }
  }
  return req;
}

json ok_reply(json result) {
  json reply = json::object();
  reply["ok"] = true;
  reply["version"] = kControlProtocolVersion;
  if (result.is_object()) {
    for (auto it = result.begin(); it != result.end(); ++it) {
      if (it.key() != "ok" && it.key() != "version") reply[it.key()] = std::move(it.value());
    }
  }
  return reply;
}

json error_reply(const ControlError& e) { return error_reply(e.code.c_str(), e.message); }

json error_reply(const char* code, std::string message) {
  return json{{"ok", false},
              {"version", kControlProtocolVersion},
              {"code", code},
              {"message", std::move(message)}};
}

std::string encode_line(const json& message) {
  std::string s = message.dump(-1, ' ', false, json::error_handler_t::replace);
  s += '\n';
  return s;
}

namespace {

// Whether `j` nests arrays and objects more than `limit` deep (an object
// with scalar fields is 1 deep), found without recursion.
bool deeper_than(const json& j, size_t limit) {
  std::vector<std::pair<const json*, size_t>> todo{{&j, 1}};
  while (!todo.empty()) {
    const auto [v, depth] = todo.back();
    todo.pop_back();
    if (!v->is_structured()) continue;
    if (depth > limit) return true;
    for (const json& child : *v) todo.emplace_back(&child, depth + 1);
  }
  return false;
}

}  // namespace

std::optional<ControlError> check_request(const json& message, Request& out) {
  if (!message.is_object()) {
    return ControlError{errc::kInvalidRequest, "a request must be a JSON object"};
  }
  if (deeper_than(message, kMaxRequestDepth)) {
    return ControlError{errc::kInvalidRequest, "a request may nest arrays and objects at most " +
                                                   std::to_string(kMaxRequestDepth) + " deep"};
  }
  auto v = message.find("version");
  if (v != message.end()) {
    if (!v->is_number_integer()) {
      return ControlError{errc::kInvalidRequest, "\"version\" must be an integer"};
    }
    if (v->get<int64_t>() != kControlProtocolVersion) {
      return ControlError{
          errc::kUnsupportedVersion,
          "client speaks control protocol version " + v->dump() + "; this shadowd speaks version " +
              std::to_string(kControlProtocolVersion) + " (use a shadowctl of the same release)"};
    }
  }
  auto c = message.find("cmd");
  if (c == message.end()) return ControlError{errc::kInvalidRequest, "\"cmd\" is missing"};
  if (!c->is_string()) return ControlError{errc::kInvalidRequest, "\"cmd\" must be a string"};
  out.cmd = c->get<std::string>();
  out.message = message;
  return std::nullopt;
}

std::optional<ControlError> check_reply(const json& reply) {
  if (!reply.is_object()) return ControlError{"protocol", "the reply is not a JSON object"};
  auto v = reply.find("version");
  if (v == reply.end() || !v->is_number_integer()) {
    return ControlError{"protocol", "the reply has no protocol version"};
  }
  if (v->get<int64_t>() != kControlProtocolVersion) {
    return ControlError{"version_mismatch", "shadowd speaks control protocol version " + v->dump() +
                                                "; this shadowctl speaks version " +
                                                std::to_string(kControlProtocolVersion) +
                                                " (use a shadowctl of the same release)"};
  }
  auto ok = reply.find("ok");
  if (ok == reply.end() || !ok->is_boolean()) {
    return ControlError{"protocol", "the reply has no \"ok\" field"};
  }
  if (ok->get<bool>()) return std::nullopt;
  ControlError e{"internal", "the daemon reported an error without a message"};
  auto code = reply.find("code");
  if (code != reply.end() && code->is_string()) e.code = code->get<std::string>();
  auto msg = reply.find("message");
  if (msg != reply.end() && msg->is_string()) e.message = msg->get<std::string>();
  return e;
}

std::optional<uint32_t> parse_duration_seconds(std::string_view s) {
  uint64_t n = 0;
  const char* end = s.data() + s.size();
  auto [p, ec] = std::from_chars(s.data(), end, n);
  if (ec != std::errc() || p == s.data()) return std::nullopt;
  uint64_t unit = 1;
  const std::string_view suffix(p, static_cast<size_t>(end - p));
  if (suffix.empty() || suffix == "s") {
    unit = 1;
  } else if (suffix == "m" || suffix == "min") {
    unit = 60;
  } else if (suffix == "h") {
    unit = 3600;
  } else if (suffix == "d") {
    unit = 86400;
  } else if (suffix == "w") {
    unit = 604800;
  } else {
    return std::nullopt;
  }
  if (n > UINT32_MAX / unit) return std::nullopt;
  return static_cast<uint32_t>(n * unit);
}

}  // namespace shadowd::ctl
