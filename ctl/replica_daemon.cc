// See replica_daemon.h.
#include "ctl/replica_daemon.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

namespace shadowd::ctl {
namespace {

bool executable(const std::string& p) { return ::access(p.c_str(), X_OK) == 0; }

std::string self_dir() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return "";
  std::string p(buf, static_cast<size_t>(n));
  return p.substr(0, p.rfind('/'));
}

// The daemon's log lines at error level, or its last lines.
std::string errors_of(const std::string& log) {
  std::ifstream f(log);
  std::string line, errors, tail;
  std::vector<std::string> last;
  while (std::getline(f, line)) {
    if (line.find(" error ") != std::string::npos || line.find(" critical ") != std::string::npos) {
      errors += (errors.empty() ? "" : "; ") + line.substr(line.find(' ') == std::string::npos ? 0 : line.find(' ') + 1);
    }
    last.push_back(line);
    if (last.size() > 3) last.erase(last.begin());
  }
  if (!errors.empty()) return errors;
  for (const std::string& l : last) tail += (tail.empty() ? "" : "; ") + l;
  return tail;
}

}  // namespace

std::string shadowd_binary() {
  if (const char* e = std::getenv("SHADOWD"); e != nullptr && *e != '\0') return e;
  const std::string dir = self_dir();
  for (const std::string& p : {dir + "/shadowd", dir + "/../daemon/shadowd"}) {
    if (!dir.empty() && executable(p)) return p;
  }
  return "shadowd";
}

std::string ReplicaDaemon::start(const std::string& from, const std::string& at) {
  char tmpl[] = "/tmp/shadowctl-replica.XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) return std::string("mkdtemp: ") + std::strerror(errno);
  dir_ = tmpl;
  control_ = dir_ + "/control.sock";
  const std::string nbd_sock = dir_ + "/nbd.sock", notify = dir_ + "/notify.sock";
  const std::string log = dir_ + "/shadowd.log";
  const int ns = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (ns < 0) return std::string("socket: ") + std::strerror(errno);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::snprintf(a.sun_path, sizeof a.sun_path, "%s", notify.c_str());
  if (::bind(ns, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(ns);
    return "bind " + notify + ": " + std::strerror(errno);
  }
  const std::string bin = shadowd_binary();
  std::vector<std::string> args = {bin, "--restore-from", from, "--at", at, "--unix", nbd_sock,
                                   "--control", control_, "--foreground", "--log-level", "info",
                                   "--export-name", "replica"};
  const pid_t parent = ::getpid();
  pid_ = ::fork();
  if (pid_ < 0) {
    ::close(ns);
    return std::string("fork: ") + std::strerror(errno);
  }
  if (pid_ == 0) {
    // The private shadowd goes with shadowctl, even a shadowctl killed
    // with SIGKILL: SIGTERM when this (the forking, main) thread ends; kept
    // across exec. If shadowctl is already gone, so is the reason to start.
    if (::prctl(PR_SET_PDEATHSIG, SIGTERM) != 0 || ::getppid() != parent) ::_exit(127);
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd >= 0) {
      ::dup2(fd, STDOUT_FILENO);
      ::dup2(fd, STDERR_FILENO);
    }
    ::setenv("NOTIFY_SOCKET", notify.c_str(), 1);
    ::unsetenv("LISTEN_FDS");
    ::unsetenv("LISTEN_PID");
    std::vector<char*> argv;
    for (std::string& s : args) argv.push_back(s.data());
    argv.push_back(nullptr);
    ::execvp(argv[0], argv.data());
    std::fprintf(stderr, " error cannot run %s: %s\n", bin.c_str(), std::strerror(errno));
    ::_exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(300);
  std::string why;
  for (;;) {
    pollfd p{ns, POLLIN, 0};
    if (::poll(&p, 1, 100) > 0) {
      char buf[4096];
      const ssize_t n = ::recv(ns, buf, sizeof buf - 1, 0);
      if (n > 0 && std::string(buf, static_cast<size_t>(n)).find("READY=1") != std::string::npos) break;
    }
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      why = "shadowd --restore-from " + from + " exited: " + errors_of(log);
      break;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      why = "shadowd --restore-from " + from + " was not ready within 300 s: " + errors_of(log);
      break;
    }
  }
  ::close(ns);
  return why;
}

ReplicaDaemon::~ReplicaDaemon() {
  if (pid_ > 0) {
    ::kill(pid_, SIGTERM);
    int status = 0;
    for (int i = 0; i < 300; ++i) {
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
      ::usleep(20000);
    }
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &status, 0);
    }
  }
  if (!dir_.empty()) {
    for (const char* f : {"/control.sock", "/nbd.sock", "/notify.sock", "/shadowd.log"}) {
      ::unlink((dir_ + f).c_str());
    }
    ::rmdir(dir_.c_str());
  }
}

}  // namespace shadowd::ctl
