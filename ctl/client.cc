#include "ctl/client.h"

#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace shadowd::ctl {
namespace {

// Closes the fd when the call returns, however it returns.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

ControlError unreachable(const std::string& path, int err) {
  std::string why;
  switch (err) {
    case ENOENT:
      why = "no control socket there (is shadowd running? give --socket PATH or set " +
            std::string(kSocketEnv) + ")";
      break;
    case ECONNREFUSED:
      why = "nobody is listening (a stale socket from a stopped shadowd?)";
      break;
    case EACCES:
    case EPERM:
      why = "permission denied (root or the daemon's control group may connect)";
      break;
    default:
      why = std::strerror(err);
  }
  return ControlError{"unreachable", "cannot connect to " + path + ": " + why};
}

std::variant<int, ControlError> connect_to(const std::string& path, Fd& sock,
                                           int timeout_seconds) {
  sockaddr_un sa{};
  if (path.empty() || path.size() >= sizeof sa.sun_path) {
    return ControlError{"unreachable", "control socket path empty or too long: '" + path + "'"};
  }
  sock.fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (sock.fd < 0)
    return ControlError{"unreachable", std::string("socket: ") + std::strerror(errno)};
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  if (::connect(sock.fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    return unreachable(path, errno);
  }
  timeval tv{timeout_seconds, 0};
  ::setsockopt(sock.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(sock.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  return sock.fd;
}

std::optional<ControlError> send_all(int fd, const std::string& data) {
  size_t off = 0;
  while (off < data.size()) {
    const ssize_t n = ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0)
      return ControlError{"io", std::string("sending the request: ") + std::strerror(errno)};
    off += static_cast<size_t>(n);
  }
  return std::nullopt;
}

// One line, without its '\n'.
std::variant<std::string, ControlError> read_line(int fd, int timeout_seconds) {
  std::string line;
  char buf[64 * 1024];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return ControlError{
          "io", "no reply from shadowd within " + std::to_string(timeout_seconds) + " s"};
    }
    if (n < 0) return ControlError{"io", std::string("reading the reply: ") + std::strerror(errno)};
    if (n == 0) return ControlError{"protocol", "shadowd closed the connection without a reply"};
    const char* nl = static_cast<const char*>(std::memchr(buf, '\n', static_cast<size_t>(n)));
    line.append(buf, nl ? static_cast<size_t>(nl - buf) : static_cast<size_t>(n));
    if (line.size() > kMaxReplyBytes) {
      return ControlError{"protocol",
                          "reply longer than " + std::to_string(kMaxReplyBytes) + " bytes"};
    }
    if (nl != nullptr) return line;
  }
}

}  // namespace

std::string socket_path(const std::string& flag) {
  if (!flag.empty()) return flag;
  const char* env = std::getenv(kSocketEnv);
  if (env != nullptr && *env != '\0') return env;
  return kDefaultSocketPath;
}

std::variant<json, ControlError> call(const std::string& path, const json& request,
                                      int reply_timeout_seconds) {
  Fd sock;
  auto fd = connect_to(path, sock, reply_timeout_seconds);
  if (auto* e = std::get_if<ControlError>(&fd)) return *e;
  if (auto e = send_all(sock.fd, encode_line(request))) return *e;
  auto line = read_line(sock.fd, reply_timeout_seconds);
  if (auto* e = std::get_if<ControlError>(&line)) return *e;
  json reply = json::parse(std::get<std::string>(line), nullptr, /*allow_exceptions=*/false);
  if (reply.is_discarded()) return ControlError{"protocol", "the reply is not valid JSON"};
  return reply;
}

}  // namespace shadowd::ctl
