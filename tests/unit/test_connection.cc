// NBD_CMD_BLOCK_STATUS through a real Connection (nbd/connection.h) on an
// io_uring loop, driven over a socketpair: one reply chunk per selected meta
// context (base:allocation, shadowd:source), DONE on the last, REQ_ONE,
// errors from source_at(). The point-in-time backend is a scripted stand-in.
#include "nbd/connection.h"

#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <initializer_list>
#include <memory>
#include <ostream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "core/gate_backend.h"
#include "core/memory_backend.h"
#include "tests/unit/source_backend.h"
#include "tests/unit/test_util.h"

namespace shadowd::nbd {
namespace {

using Bytes = std::vector<uint8_t>;
using Run = test::SourceBackend::Run;

constexpr uint64_t kSize = 1u << 20;
constexpr uint32_t kGreetingBytes = 18;
// The source map of "pit": a primary range, a version split into two runs
// (merged in replies), a version with journal records, journal alone.
const std::vector<Run> kRuns = {
    {4096, IoBackend::kSourcePrimary},
    {8192, IoBackend::kSourceVersion},
    {12288, IoBackend::kSourceVersion},
    {65536, IoBackend::kSourceVersion | IoBackend::kSourceJournal},
    {kSize, IoBackend::kSourceJournal},
};

void put_be(Bytes& b, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

Bytes option(uint32_t opt, const Bytes& data = {}) {
  Bytes b;
  put_be(b, kIHaveOpt, 8);
  put_be(b, opt, 4);
  put_be(b, data.size(), 4);
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

Bytes meta_option(std::string_view name, std::initializer_list<std::string_view> queries) {
  Bytes d;
  put_be(d, name.size(), 4);
  d.insert(d.end(), name.begin(), name.end());
  put_be(d, queries.size(), 4);
  for (std::string_view q : queries) {
    put_be(d, q.size(), 4);
    d.insert(d.end(), q.begin(), q.end());
  }
  return option(kOptSetMetaContext, d);
}

Bytes go_option(std::string_view name) {
  Bytes d;
  put_be(d, name.size(), 4);
  d.insert(d.end(), name.begin(), name.end());
  put_be(d, 0, 2);
  return option(kOptGo, d);
}

Bytes request(uint16_t type, uint64_t cookie, uint64_t offset, uint32_t length,
              uint16_t flags = 0) {
  Bytes b(kRequestSize);
  encode_request({flags, type, cookie, offset, length}, b.data());
  return b;
}

struct Chunk {
  uint16_t flags;
  uint16_t type;
  uint64_t cookie;
  Bytes payload;
};

struct Descriptor {
  uint32_t length;
  uint32_t flags;
  bool operator==(const Descriptor&) const = default;
};

std::ostream& operator<<(std::ostream& os, const Descriptor& d) {
  return os << "(" << d.length << ", " << d.flags << ")";
}

// A BLOCK_STATUS chunk's context id and descriptors.
std::pair<uint32_t, std::vector<Descriptor>> parse_status(const Chunk& c) {
  REQUIRE(c.type == kReplyTypeBlockStatus);
  REQUIRE(c.payload.size() >= 12);
  REQUIRE((c.payload.size() - 4) % 8 == 0);
  std::vector<Descriptor> d;
  for (size_t i = 4; i < c.payload.size(); i += 8) {
    d.push_back({get32(c.payload.data() + i), get32(c.payload.data() + i + 4)});
    CHECK(d.back().length > 0);
  }
  return {get32(c.payload.data()), d};
}

// One Connection on its own loop; the test thread is its client and runs the
// loop whenever it waits for bytes.
class Peer {
 public:
  explicit Peer(const ExportRegistry& reg, ConnectionLimits limits = {})
      : loop_(test::make_loop()) {
    int sv[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    client_ = sv[1];
    auto* c = new Connection(*loop_, sv[0], "test", reg, limits, &stats_,
                             [this](Connection* done) {
                               delete done;
                               closed_ = true;
                             });
    c->start();
  }
  ~Peer() {
    ::close(client_);  // the connection sees EOF and closes itself
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!closed_ && std::chrono::steady_clock::now() < deadline) step();
  }

  void send(const Bytes& b) {
    REQUIRE(::send(client_, b.data(), b.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(b.size()));
  }
  Bytes recv(size_t n) {
    Bytes b(n);
    size_t got = 0;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (got < n) {
      const ssize_t r = ::recv(client_, b.data() + got, n - got, MSG_DONTWAIT);
      if (r > 0) {
        got += static_cast<size_t>(r);
        continue;
      }
      REQUIRE(r != 0);  // the server closed
      REQUIRE((errno == EAGAIN || errno == EWOULDBLOCK));
      REQUIRE(std::chrono::steady_clock::now() < deadline);
      step();
    }
    return b;
  }
  // Negotiate structured replies, `meta` (a SET_META_CONTEXT), GO `name`;
  // returns the number of contexts SET selected.
  size_t handshake(const Bytes& meta, std::string_view name) {
    REQUIRE(recv(kGreetingBytes).size() == kGreetingBytes);
    Bytes b = {0, 0, 0, static_cast<uint8_t>(kClientFixedNewstyle | kClientNoZeroes)};
    for (const Bytes& o : {option(kOptStructuredReply), meta, go_option(name)}) {
      b.insert(b.end(), o.begin(), o.end());
    }
    send(b);
    size_t contexts = 0;
    for (uint32_t acks = 0; acks < 3;) {
      const Bytes h = recv(kOptReplyHeaderSize);
      REQUIRE(get64(h.data()) == kOptReplyMagic);
      const uint32_t type = get32(h.data() + 12);
      recv(get32(h.data() + 16));
      REQUIRE((type == kRepAck || type == kRepMetaContext || type == kRepInfo));
      acks += type == kRepAck;
      contexts += type == kRepMetaContext;
    }
    return contexts;
  }
  Chunk chunk() {
    const Bytes h = recv(kChunkHeaderSize);
    REQUIRE(get32(h.data()) == kStructuredReplyMagic);
    return {get16(h.data() + 4), get16(h.data() + 6), get64(h.data() + 8),
            recv(get32(h.data() + 16))};
  }
  // Run the loop until it has nothing left to do and the server has read
  // everything sent to it.
  void settle() {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    for (;;) {
      int unread = 0;
      REQUIRE(::ioctl(client_, SIOCOUTQ, &unread) == 0);
      if (loop_->run_once(false) == 0 && unread == 0) return;
      REQUIRE(std::chrono::steady_clock::now() < deadline);
      if (unread > 0) std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }
  // Every chunk of the reply to `cookie`, up to the one with DONE.
  std::vector<Chunk> reply(uint64_t cookie) {
    std::vector<Chunk> cs;
    do {
      cs.push_back(chunk());
      REQUIRE(cs.back().cookie == cookie);
    } while (!(cs.back().flags & kReplyFlagDone));
    return cs;
  }

 private:
  void step() {
    if (loop_->run_once(false) == 0) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }

  std::unique_ptr<EventLoop> loop_;
  StatsShard stats_;
  int client_ = -1;
  bool closed_ = false;
};

// "pit" answers source_at (kRuns); "disk" does not.
struct Exports {
  Exports() {
    pit_backend = std::make_shared<test::SourceBackend>(kSize, kRuns);
    auto pit = std::make_shared<Export>();
    pit->name = "pit";
    pit->backend = pit_backend;
    pit->read_only = true;
    REQUIRE(reg.add(pit).is_ok());
    auto disk = std::make_shared<Export>();
    disk->name = "disk";
    disk->backend = std::make_shared<MemoryBackend>(kSize, /*seed=*/1);
    REQUIRE(reg.add(disk).is_ok());
  }
  std::shared_ptr<test::SourceBackend> pit_backend;
  ExportRegistry reg;
};

using D = std::vector<Descriptor>;

// Send BLOCK_STATUS [offset, offset + length) as `cookie`; its reply must be
// one chunk, with DONE.
Chunk only_chunk(Peer& p, uint64_t cookie, uint64_t offset, uint32_t length) {
  p.send(request(kCmdBlockStatus, cookie, offset, length));
  std::vector<Chunk> cs = p.reply(cookie);
  REQUIRE(cs.size() == 1);
  CHECK(cs[0].flags == kReplyFlagDone);
  return cs[0];
}

TEST_CASE("connection: BLOCK_STATUS with base:allocation and shadowd:source", "[connection]") {
  Exports e;
  Peer p(e.reg);
  REQUIRE(p.handshake(meta_option("pit", {"base:allocation", "shadowd:source"}), "pit") == 2);

  SECTION("one chunk per context, DONE only on the last") {
    p.send(request(kCmdBlockStatus, 7, 0, 65536));
    const std::vector<Chunk> cs = p.reply(7);
    REQUIRE(cs.size() == 2);
    CHECK(cs[0].flags == 0);
    CHECK(cs[1].flags == kReplyFlagDone);
    const auto [id0, base] = parse_status(cs[0]);
    const auto [id1, source] = parse_status(cs[1]);
    CHECK(id0 == kBaseAllocationId);
    CHECK(id1 == kShadowdSourceId);
    CHECK(base == D{{65536, 0}});
    CHECK(source == D{{4096, 0}, {8192, 1}, {53248, 3}});
  }
  SECTION("from an offset inside a run, capped at the request's end") {
    p.send(request(kCmdBlockStatus, 8, 6000, 10000));
    const std::vector<Chunk> cs = p.reply(8);
    REQUIRE(cs.size() == 2);
    CHECK(parse_status(cs[0]).second == D{{10000, 0}});
    CHECK(parse_status(cs[1]).second == D{{6288, 1}, {3712, 3}});
  }
  SECTION("to the end of the export") {
    p.send(request(kCmdBlockStatus, 9, 60000, kSize - 60000));
    const std::vector<Chunk> cs = p.reply(9);
    REQUIRE(cs.size() == 2);
    CHECK(parse_status(cs[1]).second == D{{5536, 3}, {kSize - 65536, 2}});
  }
  SECTION("REQ_ONE: one descriptor per chunk, within the request") {
    p.send(request(kCmdBlockStatus, 10, 6000, 100000, kCmdFlagReqOne));
    const std::vector<Chunk> cs = p.reply(10);
    REQUIRE(cs.size() == 2);
    CHECK(parse_status(cs[0]).second == D{{100000, 0}});
    CHECK(parse_status(cs[1]).second == D{{6288, 1}});
    p.send(request(kCmdBlockStatus, 11, 0, 100, kCmdFlagReqOne));
    CHECK(parse_status(p.reply(11)[1]).second == D{{100, 0}});
  }
  SECTION("a source_at error is an error reply; the connection goes on") {
    e.pit_backend->fail_from = 0;
    const Chunk c = only_chunk(p, 12, 4096, 4096);
    CHECK(c.type == kReplyTypeError);
    CHECK(get32(c.payload.data()) == kEio);
    e.pit_backend->fail_from = UINT64_MAX;
    p.send(request(kCmdBlockStatus, 13, 4096, 4096));
    CHECK(p.reply(13).size() == 2);
  }
  SECTION("a later source_at error shortens the list") {
    e.pit_backend->fail_from = 12288;
    p.send(request(kCmdBlockStatus, 14, 0, 65536));
    const std::vector<Chunk> cs = p.reply(14);
    REQUIRE(cs.size() == 2);
    CHECK(parse_status(cs[1]).second == D{{4096, 0}, {8192, 1}});
  }
  SECTION("past the end is EINVAL, as before") {
    const Chunk c = only_chunk(p, 15, kSize, 4096);
    CHECK(c.type == kReplyTypeError);
    CHECK(get32(c.payload.data()) == kEinval);
    CHECK(e.pit_backend->source_calls == 0);
  }
}

TEST_CASE("connection: shadowd:source alone is one DONE chunk", "[connection]") {
  Exports e;
  Peer p(e.reg);
  REQUIRE(p.handshake(meta_option("pit", {"shadowd:source"}), "pit") == 1);
  const auto [id, d] = parse_status(only_chunk(p, 1, 0, 16384));
  CHECK(id == kShadowdSourceId);
  CHECK(d == D{{4096, 0}, {8192, 1}, {4096, 3}});
}

TEST_CASE("connection: an export without can_sources answers base:allocation only",
          "[connection]") {
  Exports e;
  Peer p(e.reg);
  REQUIRE(p.handshake(meta_option("disk", {"base:allocation", "shadowd:source"}), "disk") == 1);
  const auto [id, d] = parse_status(only_chunk(p, 1, 0, 8192));
  CHECK(id == kBaseAllocationId);
  CHECK(d == D{{8192, 0}});
}

TEST_CASE("connection: shadowd:source asked for where it is not offered: no context",
          "[connection]") {
  Exports e;
  Peer p(e.reg);
  REQUIRE(p.handshake(meta_option("disk", {"shadowd:source"}), "disk") == 0);
  const Chunk c = only_chunk(p, 1, 0, 8192);
  CHECK(c.type == kReplyTypeError);
  CHECK(get32(c.payload.data()) == kEinval);
}

// Back-pressure lifted while a recv into the input buffer is pending: the
// next WRITE's payload starts in the buffer, the rest arrives through that
// recv and completes it. The recv after it must go to the input buffer, not
// into the finished request (a crash in CI with --max-inflight-per-connection).
TEST_CASE("connection: a payload completed by a recv armed before back-pressure lifted",
          "[connection]") {
  ExportRegistry reg;
  auto gate = std::make_shared<GateBackend>(std::make_shared<MemoryBackend>(kSize, /*seed=*/1));
  auto disk = std::make_shared<Export>();
  disk->name = "disk";
  disk->backend = gate;
  REQUIRE(reg.add(disk).is_ok());
  ConnectionLimits limits;
  limits.max_inflight = 1;
  Peer p(reg, limits);
  p.handshake(meta_option("disk", {"base:allocation"}), "disk");

  const Bytes a(128 * 1024, 0xa1);
  Bytes b(64 * 1024 + 1, 0xb2);
  b[0] = 0x0b;
  gate->pause();
  Bytes msg = request(kCmdWrite, 1, 0, static_cast<uint32_t>(a.size()));
  msg.insert(msg.end(), a.begin(), a.end());
  p.send(msg);
  p.settle();
  REQUIRE(gate->held() == 1);  // A is in flight: the connection is at its limit
  // B's header and first byte: read, then left in the buffer; a recv is armed.
  msg = request(kCmdWrite, 2, 256 * 1024, static_cast<uint32_t>(b.size()));
  msg.push_back(b[0]);
  p.send(msg);
  p.settle();
  gate->resume();  // A completes; B starts with 64 KiB of payload missing
  CHECK(p.reply(1).back().type == kReplyTypeNone);
  p.send(Bytes(b.begin() + 1, b.end()));
  CHECK(p.reply(2).back().type == kReplyTypeNone);
  // The connection still parses requests: read B back.
  p.send(request(kCmdRead, 3, 256 * 1024, static_cast<uint32_t>(b.size())));
  const std::vector<Chunk> r = p.reply(3);
  REQUIRE(r.size() == 1);
  REQUIRE(r[0].type == kReplyTypeOffsetData);
  CHECK(Bytes(r[0].payload.begin() + 8, r[0].payload.end()) == b);
}

}  // namespace
}  // namespace shadowd::nbd
