// The NBD backend against real nbdkit servers (memory and eval plugins,
// with filters that take features away or add limits), each started by the
// test on a Unix socket the test listens on itself and hands over by socket
// activation: connections queue in the backlog until nbdkit accepts them,
// so nothing waits for the server to be ready. nbdkit's log filter shows
// what reached the server.
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/nbd_backend.h"
#include "tests/unit/test_util.h"

extern char** environ;

namespace shadowd {
namespace {

using test::first_difference;
using test::random_bytes;
using test::RecordingOp;
using Bytes = std::vector<uint8_t>;
using Code = Status::Code;

constexpr uint64_t kMiB = 1 << 20;

const char* find_nbdkit() {
  for (const char* p : {"/usr/bin/nbdkit", "/usr/sbin/nbdkit", "/usr/local/bin/nbdkit"}) {
    if (access(p, X_OK) == 0) return p;
  }
  return nullptr;
}

// nbdkit with `args` (plugin, filters, parameters) on a socket-activated
// Unix socket in a private directory, and its log filter's file when
// `logged`. Stopped (SIGTERM, or SIGKILL through kill_now) and removed by
// the destructor.
class Nbdkit {
 public:
  explicit Nbdkit(std::vector<std::string> args, bool logged = true) {
    const char* exe = find_nbdkit();
    if (exe == nullptr) test::skip("nbdkit is not installed");
    std::string tmpl = std::string(std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp") +
                       "/shadowd-nbdkit-XXXXXX";
    REQUIRE(mkdtemp(tmpl.data()) != nullptr);
    dir_ = tmpl;
    sock_ = dir_ + "/nbdkit.sock";
    log_ = dir_ + "/nbdkit.log";
    const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd >= 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    REQUIRE(sock_.size() < sizeof addr.sun_path);
    std::memcpy(addr.sun_path, sock_.c_str(), sock_.size() + 1);
    REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(listen(fd, 128) == 0);

    std::vector<std::string> argv_s = {exe, "-f", "--exit-with-parent"};
    if (logged) argv_s.push_back("--filter=log");
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    if (logged) argv_s.push_back("logfile=" + log_);
    std::vector<std::string> env_s;
    for (char** e = environ; *e != nullptr; ++e) {
      if (std::strncmp(*e, "LISTEN_", 7) != 0) env_s.emplace_back(*e);
    }
    env_s.emplace_back("LISTEN_FDS=1");
    env_s.emplace_back("LISTEN_PID=" + std::string(20, '\0'));  // the child writes its pid here
    std::vector<char*> argv, envp;
    for (auto& s : argv_s) argv.push_back(s.data());
    argv.push_back(nullptr);
    for (auto& s : env_s) envp.push_back(s.data());
    envp.push_back(nullptr);
    char* pid_digits = env_s.back().data() + std::strlen("LISTEN_PID=");

    pid_ = fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {  // only async-signal-safe calls from here on
      char tmp[20];
      int n = 0;
      for (pid_t p = getpid(); p > 0; p /= 10) tmp[n++] = static_cast<char>('0' + p % 10);
      for (int i = 0; i < n; ++i) pid_digits[i] = tmp[n - 1 - i];
      pid_digits[n] = '\0';
      if (fd == 3) {
        fcntl(3, F_SETFD, 0);
      } else if (dup2(fd, 3) < 0) {
        _exit(126);
      }
      execve(exe, argv.data(), envp.data());
      _exit(127);
    }
    close(fd);
  }
  ~Nbdkit() {
    stop(SIGTERM);
    unlink(sock_.c_str());
    unlink(log_.c_str());
    rmdir(dir_.c_str());
  }
  Nbdkit(const Nbdkit&) = delete;
  Nbdkit& operator=(const Nbdkit&) = delete;

  std::string uri() const { return "nbd+unix:///?socket=" + sock_; }
  void kill_now() { stop(SIGKILL); }
  // nbdkit's log: one line per connection and per request.
  std::string log() const {
    std::ifstream in(log_);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  // Lines of the log containing every one of `words`.
  size_t count(std::initializer_list<const char*> words) const {
    std::istringstream in(log());
    size_t n = 0;
    for (std::string line; std::getline(in, line);) {
      bool all = true;
      for (const char* w : words) all = all && line.find(w) != std::string::npos;
      n += all ? 1 : 0;
    }
    return n;
  }

 private:
  void stop(int sig) {
    if (pid_ <= 0) return;
    kill(pid_, sig);
    int st;
    waitpid(pid_, &st, 0);
    pid_ = -1;
  }
  std::string dir_, sock_, log_;
  pid_t pid_ = -1;
};

std::unique_ptr<IoBackend> open_or_fail(const std::string& uri, NbdBackendOptions opts = {}) {
  auto b = open_nbd_backend(uri, opts);
  INFO(b.status().to_string());
  REQUIRE(b.is_ok());
  return std::move(*b);
}

Status run(EventLoop& loop, IoBackend& b, BlockOpKind kind, uint64_t off, uint64_t len,
           uint8_t* buf = nullptr, uint32_t flags = 0) {
  RecordingOp op(kind, off, len, buf, flags);
  b.submit(loop, &op);
  REQUIRE(op.done_count == 0);  // never from inside submit()
  while (op.done_count == 0) loop.run_once(true);
  REQUIRE(op.done_count == 1);
  return op.status;
}

Bytes read_back(EventLoop& loop, IoBackend& b, uint64_t off, uint64_t len) {
  Bytes out(len, 0xee);
  Status st = run(loop, b, BlockOpKind::kRead, off, len, out.data());
  INFO(st.to_string());
  REQUIRE(st.is_ok());
  return out;
}

TEST_CASE("nbd backend: info reflects what the server offers") {
  Nbdkit kit({"memory", "16M"}, false);
  auto b = open_or_fail(kit.uri());
  const BackendInfo& info = b->info();
  CHECK(info.size_bytes == 16 * kMiB);
  CHECK_FALSE(info.read_only);
  CHECK(info.can_trim);
  CHECK(info.can_zero);
  CHECK(info.can_extents);
}

TEST_CASE("nbd backend: a read-only server is refused unless read-only is asked for") {
  Nbdkit kit({"-r", "memory", "4M"}, false);
  auto refused = open_nbd_backend(kit.uri(), {});
  REQUIRE_FALSE(refused.is_ok());
  CHECK(refused.status().code() == Code::kReadOnly);
  CHECK(refused.status().message().find("--read-only") != std::string::npos);

  NbdBackendOptions ro;
  ro.read_only = true;
  auto b = open_or_fail(kit.uri(), ro);
  CHECK(b->info().read_only);
  auto loop = test::make_loop();
  Bytes buf(4096, 1);
  Status st = run(*loop, *b, BlockOpKind::kWrite, 0, buf.size(), buf.data());
  CHECK(st.code() == Code::kReadOnly);
  CHECK(run(*loop, *b, BlockOpKind::kRead, 0, buf.size(), buf.data()).is_ok());
}

// Rounds of up to 48 concurrent writes and write-zeroes to disjoint random
// ranges (512 B .. 3 MiB), then 48 concurrent reads of random ranges, all
// checked against a model. The server takes at most 1 MiB per request, so
// larger requests only succeed when split.
void model_rounds(IoBackend& b, EventLoop& loop, uint64_t size, uint64_t seed, int rounds) {
  std::mt19937_64 rng(seed);
  Bytes model(size, 0);
  auto rand_len = [&] {
    const uint64_t len = 512 + rng() % (3 * kMiB);
    return rng() % 4 == 0 ? len : len / 512 * 512;  // mostly sector-sized, some odd
  };
  for (int r = 0; r < rounds; ++r) {
    std::vector<std::unique_ptr<RecordingOp>> ops;
    std::vector<Bytes> bufs;
    std::vector<std::pair<uint64_t, uint64_t>> taken;
    bufs.reserve(48);
    for (int i = 0; i < 48; ++i) {
      const uint64_t len = rand_len();
      const uint64_t off = rng() % (size - len);
      bool overlap = false;
      for (auto [o, l] : taken) overlap = overlap || (off < o + l && o < off + len);
      if (overlap) continue;
      taken.emplace_back(off, len);
      if (rng() % 5 == 0) {
        const uint32_t flags = rng() % 2 ? uint32_t{kNoHole} : 0u;
        ops.push_back(std::make_unique<RecordingOp>(BlockOpKind::kWriteZeroes, off, len, nullptr, flags));
        std::fill(model.begin() + off, model.begin() + off + len, 0);
      } else {
        bufs.push_back(random_bytes(rng, len));
        const uint32_t flags = rng() % 8 == 0 ? uint32_t{kFua} : 0u;
        ops.push_back(std::make_unique<RecordingOp>(BlockOpKind::kWrite, off, len, bufs.back().data(), flags));
        std::copy(bufs.back().begin(), bufs.back().end(), model.begin() + off);
      }
    }
    for (auto& op : ops) b.submit(loop, op.get());
    test::run_until_done(loop, ops);
    for (auto& op : ops) {
      INFO(op->status.to_string());
      REQUIRE(op->done_count == 1);
      REQUIRE(op->status.is_ok());
    }
    std::vector<std::unique_ptr<RecordingOp>> reads;
    std::vector<Bytes> got(48);
    for (int i = 0; i < 48; ++i) {
      const uint64_t len = rand_len();
      const uint64_t off = rng() % (size - len);
      got[i].assign(len, 0xee);
      reads.push_back(std::make_unique<RecordingOp>(BlockOpKind::kRead, off, len, got[i].data()));
    }
    for (auto& op : reads) b.submit(loop, op.get());
    test::run_until_done(loop, reads);
    for (size_t i = 0; i < reads.size(); ++i) {
      REQUIRE(reads[i]->status.is_ok());
      const uint64_t off = reads[i]->offset;
      const Bytes want(model.begin() + off, model.begin() + off + reads[i]->length);
      INFO("round " << r << " read at " << off << " length " << reads[i]->length);
      REQUIRE(first_difference(got[i], want) == -1);
    }
  }
  REQUIRE(run(loop, b, BlockOpKind::kFlush, 0, 0).is_ok());
  REQUIRE(first_difference(read_back(loop, b, 0, size), model) == -1);
}

TEST_CASE("nbd backend: many requests in flight, split at the server's maximum, match a model") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  Nbdkit kit({"--filter=blocksize-policy", "memory", "64M", "blocksize-maximum=1M",
              "blocksize-error-policy=error"});
  auto b = open_or_fail(kit.uri());
  auto loop = test::make_loop();
  model_rounds(*b, *loop, 64 * kMiB, seed, 4);
  // Nothing bigger than the maximum reached the server, and big requests did.
  CHECK(kit.count({"return=-1"}) == 0);
  CHECK(kit.count({"Write", "count=0x100000 "}) > 0);
}

TEST_CASE("nbd backend: with multi-conn, several connections share the requests") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  Nbdkit kit({"memory", "32M"});
  NbdBackendOptions opts;
  opts.connections = 3;
  auto b = open_or_fail(kit.uri(), opts);
  CHECK(kit.count({"Connect export="}) == 3);
  auto loop = test::make_loop();
  model_rounds(*b, *loop, 32 * kMiB, seed, 2);
  for (const char* c : {"connection=1 Write", "connection=2 Write", "connection=3 Write"}) {
    INFO(c);
    CHECK(kit.count({c}) > 0);
  }
}

TEST_CASE("nbd backend: without multi-conn there is one connection") {
  Nbdkit kit({"--filter=multi-conn", "memory", "8M", "multi-conn-mode=disable"});
  NbdBackendOptions opts;
  opts.connections = 4;
  auto b = open_or_fail(kit.uri(), opts);
  CHECK(kit.count({"Connect export="}) == 1);
}

TEST_CASE("nbd backend: FUA, NO_HOLE, trim, cache and flush reach the server as such") {
  Nbdkit kit({"memory", "8M"});
  auto b = open_or_fail(kit.uri());
  auto loop = test::make_loop();
  Bytes data(64 * 1024, 0x5a);
  REQUIRE(run(*loop, *b, BlockOpKind::kWrite, 0, data.size(), data.data(), kFua).is_ok());
  CHECK(kit.count({"Write", "fua=1"}) == 1);
  REQUIRE(run(*loop, *b, BlockOpKind::kWriteZeroes, 4096, 4096, nullptr, kNoHole).is_ok());
  CHECK(kit.count({"Zero", "trim=0"}) == 1);
  REQUIRE(run(*loop, *b, BlockOpKind::kWriteZeroes, 8192, 4096).is_ok());
  CHECK(kit.count({"Zero", "trim=1"}) == 1);
  REQUIRE(run(*loop, *b, BlockOpKind::kTrim, 16384, 4096, nullptr, kFua).is_ok());
  CHECK(kit.count({"Trim", "fua=1"}) == 1);
  REQUIRE(run(*loop, *b, BlockOpKind::kCache, 0, 65536).is_ok());
  CHECK(kit.count({"Cache", "count=0x10000"}) == 1);
  REQUIRE(run(*loop, *b, BlockOpKind::kFlush, 0, 0).is_ok());
  CHECK(kit.count({" Flush id="}) == 1);
  Bytes want = data;
  std::fill(want.begin() + 4096, want.begin() + 12288, 0);
  std::fill(want.begin() + 16384, want.begin() + 20480, 0);  // the memory plugin zeroes a trim
  CHECK(first_difference(read_back(*loop, *b, 0, want.size()), want) == -1);
}

TEST_CASE("nbd backend: extent_at reports holes and data from base:allocation") {
  Nbdkit kit({"memory", "8M"}, false);
  auto b = open_or_fail(kit.uri());
  auto loop = test::make_loop();
  Bytes data(kMiB, 7);
  REQUIRE(run(*loop, *b, BlockOpKind::kWrite, 2 * kMiB, data.size(), data.data()).is_ok());
  auto e = b->extent_at(0, 8 * kMiB);
  REQUIRE(e.is_ok());
  CHECK(e->is_hole);
  CHECK(e->length == 2 * kMiB);
  e = b->extent_at(2 * kMiB, 6 * kMiB);
  REQUIRE(e.is_ok());
  CHECK_FALSE(e->is_hole);
  CHECK(e->length == kMiB);
  e = b->extent_at(2 * kMiB, 4096);  // capped at what was asked
  REQUIRE(e.is_ok());
  CHECK(e->length == 4096);
}

// An eval plugin over a file: no FUA, no trim, no cache, and extents that
// report everything as data, as a minimal server offers.
std::vector<std::string> minimal_server(const std::string& file) {
  return {"eval",
          "get_size=echo 4194304",
          "pread=dd if=" + file + " skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
          "pwrite=dd of=" + file + " seek=$4 conv=notrunc oflag=seek_bytes status=none",
          "can_write=exit 0",
          "can_flush=exit 0",
          "flush=exit 0",
          "can_fua=echo none"};
}

TEST_CASE("nbd backend: a server without FUA gets a flush after a FUA write; missing trim and cache succeed") {
  std::string file = std::string(std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp") +
                     "/shadowd-nbd-minimal-XXXXXX";
  const int fd = mkstemp(file.data());
  REQUIRE(fd >= 0);
  REQUIRE(ftruncate(fd, 4 * kMiB) == 0);
  close(fd);
  {
    Nbdkit kit(minimal_server(file));
    auto b = open_or_fail(kit.uri());
    CHECK_FALSE(b->info().can_trim);
    auto loop = test::make_loop();
    Bytes data(8192, 0x33);
    REQUIRE(run(*loop, *b, BlockOpKind::kWrite, 4096, data.size(), data.data()).is_ok());
    CHECK(kit.count({" Flush id="}) == 0);
    REQUIRE(run(*loop, *b, BlockOpKind::kWrite, 65536, data.size(), data.data(), kFua).is_ok());
    CHECK(kit.count({" Flush id="}) == 1);  // the write is durable when it completes
    CHECK(kit.count({"Write", "fua=1"}) == 0);
    REQUIRE(run(*loop, *b, BlockOpKind::kTrim, 0, 4096).is_ok());
    REQUIRE(run(*loop, *b, BlockOpKind::kCache, 0, 4096).is_ok());
    CHECK(kit.count({"Trim"}) == 0);
    CHECK(kit.count({"Cache"}) == 0);
    auto e = b->extent_at(0, 4 * kMiB);
    REQUIRE(e.is_ok());
    CHECK_FALSE(e->is_hole);
    CHECK(read_back(*loop, *b, 65536, data.size()) == data);
  }
  // The bytes are in the file, not only in the server.
  std::ifstream in(file, std::ios::binary);
  in.seekg(65536);
  Bytes on_disk(8192);
  in.read(reinterpret_cast<char*>(on_disk.data()), on_disk.size());
  unlink(file.c_str());
  CHECK(on_disk == Bytes(8192, 0x33));
}

TEST_CASE("nbd backend: WRITE_ZEROES without server support writes zeroes") {
  Nbdkit kit({"--filter=nozero", "--filter=blocksize-policy", "memory", "8M", "zeromode=none",
              "blocksize-maximum=1M", "blocksize-error-policy=error"});
  auto b = open_or_fail(kit.uri());
  CHECK_FALSE(b->info().can_zero);
  auto loop = test::make_loop();
  Bytes data(3 * kMiB, 0x11);
  REQUIRE(run(*loop, *b, BlockOpKind::kWrite, 0, data.size(), data.data()).is_ok());
  const size_t writes = kit.count({" Write id="});
  REQUIRE(run(*loop, *b, BlockOpKind::kWriteZeroes, 100, 2 * kMiB + 1000, nullptr, kNoHole).is_ok());
  CHECK(kit.count({" Zero id="}) == 0);
  CHECK(kit.count({" Write id="}) - writes == 3);  // 1 MiB at a time
  Bytes want = data;
  std::fill(want.begin() + 100, want.begin() + 100 + 2 * kMiB + 1000, 0);
  CHECK(first_difference(read_back(*loop, *b, 0, want.size()), want) == -1);
}

// Completions of ops submitted from two loops on two threads come back on
// each op's own loop thread, exactly once.
class ThreadOp final : public BlockOp {
 public:
  void on_done(Status st) override {
    status = std::move(st);
    thread = std::this_thread::get_id();
    ++done_count;
  }
  Status status;
  std::thread::id thread;
  int done_count = 0;
};

TEST_CASE("nbd backend: completions arrive on the submitting loop's thread") {
  Nbdkit kit({"memory", "16M"}, false);
  auto b = open_or_fail(kit.uri());
  auto work = [&b](uint64_t base, bool* ok) {
    auto loop = test::make_loop();
    std::vector<std::unique_ptr<ThreadOp>> ops;
    std::vector<Bytes> bufs(32, Bytes(65536));
    for (int i = 0; i < 32; ++i) {
      auto op = std::make_unique<ThreadOp>();
      op->kind = i % 4 == 3 ? BlockOpKind::kFlush : i % 2 ? BlockOpKind::kRead : BlockOpKind::kWrite;
      op->offset = base + uint64_t(i) * 65536;
      op->length = op->kind == BlockOpKind::kFlush ? 0 : 65536;
      op->buf = bufs[i].data();
      b->submit(*loop, op.get());
      *ok = *ok && op->done_count == 0;
      ops.push_back(std::move(op));
    }
    for (bool all = false; !all;) {
      loop->run_once(true);
      all = true;
      for (auto& op : ops) all = all && op->done_count > 0;
    }
    for (auto& op : ops) {
      *ok = *ok && op->done_count == 1 && op->status.is_ok() &&
            op->thread == std::this_thread::get_id();
    }
  };
  bool ok1 = true, ok2 = true;
  std::thread t1(work, 0, &ok1);
  std::thread t2(work, 8 * kMiB, &ok2);
  t1.join();
  t2.join();
  CHECK(ok1);
  CHECK(ok2);
}

TEST_CASE("nbd backend: a lost connection fails requests in flight and later ones with EIO") {
  // Reads wait 60 s in the server: they are still in flight when it dies.
  Nbdkit kit({"--filter=delay", "memory", "8M", "delay-read=60"}, false);
  auto b = open_or_fail(kit.uri());
  auto loop = test::make_loop();
  std::vector<std::unique_ptr<RecordingOp>> ops;
  std::vector<Bytes> bufs(8, Bytes(4096));
  for (int i = 0; i < 8; ++i) {
    ops.push_back(std::make_unique<RecordingOp>(BlockOpKind::kRead, i * 4096, 4096, bufs[i].data()));
    b->submit(*loop, ops.back().get());
  }
  kit.kill_now();
  test::run_until_done(*loop, ops);
  for (auto& op : ops) {
    CHECK(op->done_count == 1);
    CHECK(op->status.code() == Code::kIoError);
    CHECK(op->status.err() == EIO);
    CHECK(op->status.message().find("connection to the NBD server is lost") != std::string::npos);
  }
  Bytes data(4096, 1);
  Status st = run(*loop, *b, BlockOpKind::kWrite, 0, data.size(), data.data());
  CHECK(st.code() == Code::kIoError);
  CHECK(run(*loop, *b, BlockOpKind::kFlush, 0, 0).code() == Code::kIoError);
  CHECK_FALSE(b->extent_at(0, 4096).is_ok());
}

TEST_CASE("nbd backend: bad URIs and dead servers are refused with the reason") {
  auto not_uri = open_nbd_backend("/tmp/disk.img", {});
  REQUIRE_FALSE(not_uri.is_ok());
  CHECK(not_uri.status().code() == Code::kInvalid);

  auto no_socket = open_nbd_backend("nbd+unix:///?socket=/nonexistent/shadowd/nbd.sock", {});
  REQUIRE_FALSE(no_socket.is_ok());
  CHECK(no_socket.status().message().find("cannot connect to NBD server") != std::string::npos);
  CHECK(no_socket.status().message().find("No such file") != std::string::npos);

  auto missing_param = open_nbd_backend("nbd+unix:///disk", {});
  REQUIRE_FALSE(missing_param.is_ok());
  CHECK(missing_param.status().message().find("nbd+unix:///disk") != std::string::npos);

  auto dead = std::make_unique<Nbdkit>(std::vector<std::string>{"memory", "1M"}, false);
  const std::string uri = dead->uri();
  dead->kill_now();
  auto refused = open_nbd_backend(uri, {});
  REQUIRE_FALSE(refused.is_ok());
  CHECK(refused.status().message().find("cannot connect to NBD server") != std::string::npos);
}

TEST_CASE("nbd backend: URI helpers") {
  CHECK(is_nbd_uri("nbd://host/disk"));
  CHECK(is_nbd_uri("nbds+unix:///?socket=/s"));
  CHECK(is_nbd_uri("nbd+vsock:///"));
  CHECK_FALSE(is_nbd_uri("/var/lib/disk.img"));
  CHECK_FALSE(is_nbd_uri("nbdfile.img"));
  CHECK_FALSE(is_nbd_uri("http://host/disk"));
  CHECK(redact_nbd_uri("nbds://alice:secret@host:10809/disk") == "nbds://alice@host:10809/disk");
  CHECK(redact_nbd_uri("nbds+unix://alice@/?socket=/s&tls-psk-file=/k") ==
        "nbds+unix://alice@/?socket=/s&tls-psk-file=/k");
  CHECK(redact_nbd_uri("nbd://host:10809/a@b") == "nbd://host:10809/a@b");
}

}  // namespace
}  // namespace shadowd
