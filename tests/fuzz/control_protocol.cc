// Fuzz target: the control protocol (ctl/protocol.h) on both ends of the
// socket. The input is what arrives on a control connection; each line is
// read as the daemon reads a request (json::parse without exceptions, then
// check_request) and as shadowctl reads a reply (check_reply); the message
// builders are fed the same bytes.
//
// Invariants: nothing throws; a checked request carries its "cmd" and is
// no deeper than kMaxRequestDepth (copying it could overflow the stack);
// every line encode_line() writes is one line of JSON that parses back to
// the same line; replies built by ok_reply() and error_reply() pass
// check_reply() with their code and message, whatever bytes went in (text
// that is not UTF-8 is repaired, never a failure); requests built by
// make_request() pass check_request() with their command; a parsed
// duration is in range.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ctl/protocol.h"
#include "tests/fuzz/fuzz_util.h"

namespace shadowd::ctl {
namespace {

// One line of JSON as encode_line() promises it: parses, and encodes to itself.
json check_line(const std::string& line) {
  FUZZ_CHECK(!line.empty() && line.back() == '\n');
  FUZZ_CHECK(line.find('\n') == line.size() - 1);
  json back = json::parse(line, nullptr, /*allow_exceptions=*/false);
  FUZZ_CHECK(!back.is_discarded());
  FUZZ_CHECK(encode_line(back) == line);
  return back;
}

bool valid_utf8(const std::string& s) {
  try {
    json(s).dump();  // the strict error handler: throws on bytes that are not UTF-8
    return true;
  } catch (const json::type_error&) {
    return false;
  }
}

// Nesting depth of arrays and objects (a scalar is 0), counted without
// recursion: the input may be deep enough to overflow the stack.
size_t depth_of(const json& j) {
  size_t max = 0;
  std::vector<std::pair<const json*, size_t>> todo{{&j, 0}};
  while (!todo.empty()) {
    const auto [v, d] = todo.back();
    todo.pop_back();
    if (!v->is_structured()) continue;
    max = std::max(max, d + 1);
    for (const json& child : *v) todo.emplace_back(&child, d + 1);
  }
  return max;
}

void check_parsed(const json& message) {
  const size_t depth = depth_of(message);
  Request req;
  if (!check_request(message, req)) {
    FUZZ_CHECK(depth <= kMaxRequestDepth);
    FUZZ_CHECK(message.is_object() && message.at("cmd").is_string());
    FUZZ_CHECK(req.cmd == message.at("cmd").get<std::string>() && req.message == message);
  }
  check_reply(message);  // what shadowctl does with any reply line: must not throw
  // What follows copies and compares (recursively): the daemon never does
  // that with a request deeper than the limit.
  if (depth > kMaxRequestDepth) return;
  FUZZ_CHECK(check_line(encode_line(message)) == message);

  if (message.is_object()) {
    const json ok = check_line(encode_line(ok_reply(message)));
    FUZZ_CHECK(!check_reply(ok));
    const json as_request = check_line(encode_line(make_request("status", message)));
    FUZZ_CHECK(!check_request(as_request, req) && req.cmd == "status");
  }
}

// Raw bytes as a command name and as an error message.
void check_raw(std::string_view text) {
  const std::string s(text);
  const json err = check_line(encode_line(error_reply(errc::kInvalidArgument, s)));
  const std::optional<ControlError> e = check_reply(err);
  FUZZ_CHECK(e && e->code == errc::kInvalidArgument);
  if (valid_utf8(s)) FUZZ_CHECK(e->message == s);

  Request req;
  const json request = check_line(encode_line(make_request(s)));
  FUZZ_CHECK(!check_request(request, req));
  if (valid_utf8(s)) FUZZ_CHECK(req.cmd == s);

  if (const std::optional<uint32_t> d = parse_duration_seconds(text)) {
    FUZZ_CHECK(parse_duration_seconds(std::to_string(*d) + "s") == d);
  }
}

}  // namespace
}  // namespace shadowd::ctl

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace shadowd::ctl;
  std::string_view in(reinterpret_cast<const char*>(data), size);
  // Lines as daemon/control.cc cuts them: at '\n', without a trailing '\r'.
  while (!in.empty()) {
    const size_t nl = in.find('\n');
    std::string_view line = in.substr(0, nl);
    in = nl == std::string_view::npos ? std::string_view() : in.substr(nl + 1);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    const json message = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!message.is_discarded()) check_parsed(message);
    check_raw(line);
  }
  return 0;
}
