// The handshake state machine (nbd/negotiate.h) and the export registry it
// reads, against doc/proto.md of the NBD project: exact greeting and reply
// bytes, every option, malformed and hostile input, and the promise that
// bytes may arrive split anywhere.
#include "nbd/negotiate.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <initializer_list>
#include <random>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "core/memory_backend.h"
#include "tests/unit/nbd_wire.h"
#include "tests/unit/source_backend.h"
#include "tests/unit/test_util.h"

namespace shadowd::nbd {
namespace {

using test::Bytes;
using test::info_data;
using test::meta_data;
using test::option;
using test::Wire;
using State = Negotiator::State;

constexpr uint64_t kDiskBytes = 1u << 20;
constexpr uint64_t kRoBytes = 64u << 10;
// HAS_FLAGS | SEND_FLUSH | SEND_FUA | CAN_MULTI_CONN | SEND_CACHE, plus
// SEND_TRIM | SEND_WRITE_ZEROES (read-write) or READ_ONLY.
constexpr uint16_t kDiskFlags = 0x056d;
constexpr uint16_t kRoFlags = 0x050f;
constexpr uint32_t kBothClientFlags = kClientFixedNewstyle | kClientNoZeroes;

Bytes client_flags(uint32_t flags) { return Wire().u32(flags).b; }

// The option reply the server should send, built independently of
// append_option_reply.
Bytes reply(uint32_t opt, uint32_t type, const Bytes& payload = {}) {
  Bytes b = {0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9};
  return Wire{b}.u32(opt).u32(type).u32(static_cast<uint32_t>(payload.size())).raw(payload).b;
}

Bytes cat(std::initializer_list<Bytes> parts) {
  Bytes out;
  for (const Bytes& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

struct Reply {
  uint32_t opt;
  uint32_t type;
  Bytes data;
};

// Split `out` into option replies; the framing must be exact.
std::vector<Reply> parse_replies(const Bytes& out) {
  std::vector<Reply> r;
  size_t pos = 0;
  while (pos < out.size()) {
    REQUIRE(out.size() - pos >= kOptReplyHeaderSize);
    const uint8_t* p = out.data() + pos;
    REQUIRE(get64(p) == kOptReplyMagic);
    const uint32_t len = get32(p + 16);
    REQUIRE(out.size() - pos - kOptReplyHeaderSize >= len);
    r.push_back({get32(p + 8), get32(p + 12),
                 Bytes(p + kOptReplyHeaderSize, p + kOptReplyHeaderSize + len)});
    pos += kOptReplyHeaderSize + len;
  }
  return r;
}

// Everything the server sent is whole option replies, except the reply to
// EXPORT_NAME that may end it.
void check_framing(const Bytes& out, State state) {
  size_t pos = 0;
  while (out.size() - pos >= kOptReplyHeaderSize && get64(out.data() + pos) == kOptReplyMagic) {
    const uint32_t len = get32(out.data() + pos + 16);
    REQUIRE(out.size() - pos - kOptReplyHeaderSize >= len);
    pos += kOptReplyHeaderSize + len;
  }
  const size_t rest = out.size() - pos;
  if (rest != 0) {
    REQUIRE(state == State::kTransmission);
    REQUIRE((rest == 10 || rest == 10 + kExportNameZeroes));
  }
}

std::shared_ptr<Export> make_export(std::string name, uint64_t size, std::string description,
                                    bool read_only) {
  auto e = std::make_shared<Export>();
  e->name = std::move(name);
  e->description = std::move(description);
  e->backend = std::make_shared<MemoryBackend>(size, /*seed=*/1, read_only);
  e->read_only = read_only;
  return e;
}

// "disk" (the default: added first) and a read-only "ro" without description.
struct Registry {
  Registry() {
    REQUIRE(reg.add(make_export("disk", kDiskBytes, "the disk", false)).is_ok());
    REQUIRE(reg.add(make_export("ro", kRoBytes, "", true)).is_ok());
  }
  ExportRegistry reg;
};

// One negotiation, fed whole messages.
struct Session {
  explicit Session(const ExportRegistry& reg, uint32_t flags = kBothClientFlags) : n(reg) {
    REQUIRE(feed(client_flags(flags)) == 4);
    REQUIRE(n.state() == State::kOptions);
    REQUIRE(out.empty());
  }
  size_t feed(const Bytes& in) {
    const size_t used = n.feed(in, out);
    REQUIRE(used <= in.size());
    return used;
  }
  // Feed one complete option; it must be consumed whole. Returns its replies.
  Bytes opt(uint32_t o, const Bytes& data = {}) {
    const Bytes msg = option(o, data);
    out.clear();
    REQUIRE(feed(msg) == msg.size());
    return out;
  }
  Negotiator n;
  Bytes out;
};

Bytes info_export_payload(uint64_t size, uint16_t flags) {
  return Wire().u16(kInfoExport).u64(size).u16(flags).b;
}

// ---- ExportRegistry ----

TEST_CASE("exports: transmission flags", "[exports]") {
  CHECK(make_export("a", 4096, "", false)->transmission_flags() == kDiskFlags);
  CHECK(make_export("a", 4096, "", true)->transmission_flags() == kRoFlags);
  CHECK(make_export("a", 4096, "", false)->size_bytes() == 4096);
}

TEST_CASE("exports: registry lookup, default, duplicates, removal", "[exports]") {
  ExportRegistry reg;
  CHECK(reg.find("") == nullptr);
  CHECK(reg.list().empty());
  auto b = make_export("b", 4096, "", false);
  REQUIRE(reg.add(b).is_ok());
  REQUIRE(reg.add(make_export("a", 4096, "", false)).is_ok());
  CHECK(reg.find("b") == b);
  CHECK(reg.find("") == b);  // the first export added is the default
  CHECK(reg.find("c") == nullptr);
  CHECK(reg.find("B") == nullptr);

  Status dup = reg.add(make_export("a", 8192, "", false));
  CHECK(dup.code() == Status::Code::kInvalid);
  CHECK(reg.find("a")->size_bytes() == 4096);

  auto names = [&] {
    std::vector<std::string> v;
    for (const auto& e : reg.list()) v.push_back(e->name);
    return v;
  };
  CHECK(names() == std::vector<std::string>{"a", "b"});

  CHECK(reg.remove("zzz").code() == Status::Code::kNotFound);
  REQUIRE(reg.remove("b").is_ok());
  CHECK(reg.find("b") == nullptr);
  CHECK(reg.find("") == nullptr);  // the default went with it
  CHECK(b->size_bytes() == 4096);  // holders keep the export alive
  CHECK(names() == std::vector<std::string>{"a"});
}

TEST_CASE("exports: names are limited to 4096 bytes", "[exports]") {
  ExportRegistry reg;
  CHECK(reg.add(make_export(std::string(kMaxStringBytes + 1, 'n'), 512, "", false)).code() ==
        Status::Code::kInvalid);
  CHECK(reg.add(make_export(std::string(kMaxStringBytes, 'n'), 512, "", false)).is_ok());
}

// ---- greeting and client flags ----

TEST_CASE("negotiate: greeting bytes", "[negotiate]") {
  const Bytes want = {'N', 'B', 'D', 'M', 'A', 'G', 'I', 'C',  //
                      'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T',  //
                      0x00, 0x03};  // FIXED_NEWSTYLE | NO_ZEROES
  CHECK(Negotiator::greeting() == want);
}

TEST_CASE("negotiate: client flags", "[negotiate]") {
  Registry r;
  Negotiator n(r.reg);
  Bytes out;
  CHECK(n.state() == State::kClientFlags);
  const Bytes three = {0, 0, 0};
  CHECK(n.feed(three, out) == 0);
  CHECK(n.state() == State::kClientFlags);
  CHECK(n.feed({}, out) == 0);

  SECTION("known flags move on to options") {
    for (uint32_t f : {0u, 1u, 2u, 3u}) {
      Negotiator m(r.reg);
      CHECK(m.feed(client_flags(f), out) == 4);
      CHECK(m.state() == State::kOptions);
    }
    CHECK(out.empty());
  }
  SECTION("unknown flags close without a reply") {
    for (uint32_t f : {4u, 7u, 0x80000000u, 0xffffffffu, 0x100u}) {
      CAPTURE(f);
      Negotiator m(r.reg);
      const Bytes in = cat({client_flags(f), option(kOptList)});
      CHECK(m.feed(in, out) <= in.size());
      CHECK(m.state() == State::kClose);
      CHECK_FALSE(m.close_reason().empty());
    }
    CHECK(out.empty());
  }
}

// ---- NBD_OPT_EXPORT_NAME ----

TEST_CASE("negotiate: EXPORT_NAME with and without NO_ZEROES", "[negotiate]") {
  Registry r;
  SECTION("without: 124 zero bytes follow") {
    Session s(r.reg, kClientFixedNewstyle);
    const Bytes out = s.opt(kOptExportName, Wire().str("disk").b);
    Bytes want = Wire().u64(kDiskBytes).u16(kDiskFlags).b;
    want.resize(10 + 124, 0);
    CHECK(out == want);
    CHECK(s.n.state() == State::kTransmission);
    REQUIRE(s.n.selected() != nullptr);
    CHECK(s.n.selected()->name == "disk");
  }
  SECTION("with: 10 bytes") {
    Session s(r.reg, kBothClientFlags);
    CHECK(s.opt(kOptExportName, Wire().str("ro").b) == Wire().u64(kRoBytes).u16(kRoFlags).b);
    CHECK(s.n.state() == State::kTransmission);
    CHECK(s.n.selected()->name == "ro");
  }
  SECTION("plain newstyle (no FIXED_NEWSTYLE) may use it") {
    Session s(r.reg, 0);
    CHECK(s.opt(kOptExportName, Wire().str("disk").b).size() == 134);
    CHECK(s.n.state() == State::kTransmission);
    Session z(r.reg, kClientNoZeroes);
    CHECK(z.opt(kOptExportName, Wire().str("disk").b).size() == 10);
  }
  SECTION("the empty name selects the default export") {
    Session s(r.reg);
    CHECK(s.opt(kOptExportName) == Wire().u64(kDiskBytes).u16(kDiskFlags).b);
    CHECK(s.n.selected()->name == "disk");
  }
  SECTION("an unknown name closes without a reply") {
    Session s(r.reg);
    CHECK(s.opt(kOptExportName, Wire().str("nope").b).empty());
    CHECK(s.n.state() == State::kClose);
    CHECK(s.n.selected() == nullptr);
  }
  SECTION("bytes after it belong to the transmission phase") {
    Session s(r.reg);
    const Bytes msg = option(kOptExportName, Wire().str("disk").b);
    const Bytes in = cat({msg, option(kOptList), Bytes(28, 0x25)});
    CHECK(s.feed(in) == msg.size());
    CHECK(s.out.size() == 10);
    CHECK(s.n.state() == State::kTransmission);
    CHECK(s.feed(in) == 0);  // nothing more is consumed in kTransmission
    CHECK(s.out.size() == 10);
  }
}

TEST_CASE("negotiate: options other than EXPORT_NAME need fixed newstyle", "[negotiate]") {
  Registry r;
  for (uint32_t opt : {uint32_t{kOptGo}, uint32_t{kOptInfo}, uint32_t{kOptList},
                       uint32_t{kOptAbort}, uint32_t{kOptStructuredReply},
                       uint32_t{kOptStartTls}, 999u}) {
    for (uint32_t flags : {0u, uint32_t{kClientNoZeroes}}) {
      CAPTURE(opt, flags);
      Session s(r.reg, flags);
      const Bytes data = opt == kOptGo || opt == kOptInfo ? info_data("disk") : Bytes{};
      const Bytes msg = option(opt, data);
      CHECK(s.feed(msg) <= msg.size());
      CHECK(s.n.state() == State::kClose);
      CHECK(s.out.empty());  // plain newstyle has no option replies
    }
  }
}

// ---- NBD_OPT_INFO / NBD_OPT_GO ----

TEST_CASE("negotiate: GO without information requests", "[negotiate][go]") {
  Registry r;
  Session s(r.reg);
  const Bytes out = s.opt(kOptGo, info_data("disk"));
  CHECK(out == cat({reply(kOptGo, kRepInfo, info_export_payload(kDiskBytes, kDiskFlags)),
                    reply(kOptGo, kRepAck)}));
  CHECK(s.n.state() == State::kTransmission);
  CHECK(s.n.selected()->name == "disk");
  CHECK_FALSE(s.n.structured_replies());
  CHECK_FALSE(s.n.base_allocation());
}

TEST_CASE("negotiate: GO and INFO answer each NBD_INFO request", "[negotiate][go]") {
  Registry r;
  const Bytes name_info = Wire().u16(kInfoName).str("disk").b;
  const Bytes desc_info = Wire().u16(kInfoDescription).str("the disk").b;
  const Bytes block_info = Wire().u16(kInfoBlockSize).u32(1).u32(4096).u32(32u << 20).b;
  const Bytes export_info = info_export_payload(kDiskBytes, kDiskFlags);
  const uint32_t opt = GENERATE(uint32_t{kOptInfo}, uint32_t{kOptGo});
  CAPTURE(opt);
  Session s(r.reg);

  auto infos = [&](std::initializer_list<uint16_t> req) {
    std::vector<Reply> rs = parse_replies(s.opt(opt, info_data("disk", req)));
    REQUIRE(rs.size() >= 2);
    for (const Reply& x : rs) CHECK(x.opt == opt);
    CHECK(rs.back().type == kRepAck);
    CHECK(rs.back().data.empty());
    std::vector<Bytes> payloads;
    for (size_t i = 0; i + 1 < rs.size(); ++i) {
      CHECK(rs[i].type == kRepInfo);
      payloads.push_back(rs[i].data);
    }
    // NBD_INFO_EXPORT is always sent, exactly once.
    CHECK(std::count(payloads.begin(), payloads.end(), export_info) == 1);
    return payloads;
  };
  auto has = [](const std::vector<Bytes>& v, const Bytes& x) {
    return std::count(v.begin(), v.end(), x) == 1;
  };

  SECTION("NAME") {
    auto p = infos({kInfoName});
    CHECK(p.size() == 2);
    CHECK(has(p, name_info));
  }
  SECTION("DESCRIPTION") {
    auto p = infos({kInfoDescription});
    CHECK(p.size() == 2);
    CHECK(has(p, desc_info));
  }
  SECTION("BLOCK_SIZE") {
    auto p = infos({kInfoBlockSize});
    CHECK(p.size() == 2);
    CHECK(has(p, block_info));
  }
  SECTION("EXPORT asked for explicitly is still sent once") {
    CHECK(infos({kInfoExport}).size() == 1);
  }
  SECTION("all of them, and an unknown one that is ignored") {
    auto p = infos({kInfoBlockSize, 0x7777, kInfoName, kInfoExport, kInfoDescription});
    CHECK(p.size() == 4);
    CHECK(has(p, name_info));
    CHECK(has(p, desc_info));
    CHECK(has(p, block_info));
  }
  CHECK(s.n.state() == (opt == kOptGo ? State::kTransmission : State::kOptions));
}

TEST_CASE("negotiate: INFO leaves negotiation open, GO after it", "[negotiate][go]") {
  Registry r;
  Session s(r.reg);
  const Bytes ro_reply = cat({reply(kOptInfo, kRepInfo, info_export_payload(kRoBytes, kRoFlags)),
                              reply(kOptInfo, kRepAck)});
  // "ro" has no description: nothing to send for DESCRIPTION.
  CHECK(s.opt(kOptInfo, info_data("ro", {kInfoDescription})) == ro_reply);
  CHECK(s.n.state() == State::kOptions);
  CHECK(s.n.selected() == nullptr);
  CHECK(s.opt(kOptInfo, info_data("")) ==
        cat({reply(kOptInfo, kRepInfo, info_export_payload(kDiskBytes, kDiskFlags)),
             reply(kOptInfo, kRepAck)}));
  s.opt(kOptGo, info_data("ro"));
  CHECK(s.n.state() == State::kTransmission);
  CHECK(s.n.selected()->name == "ro");
}

TEST_CASE("negotiate: GO with the empty name selects the default export", "[negotiate][go]") {
  Registry r;
  Session s(r.reg);
  s.opt(kOptGo, info_data(""));
  CHECK(s.n.state() == State::kTransmission);
  CHECK(s.n.selected()->name == "disk");
}

TEST_CASE("negotiate: GO/INFO for an unknown export", "[negotiate][go]") {
  Registry r;
  const uint32_t opt = GENERATE(uint32_t{kOptInfo}, uint32_t{kOptGo});
  CAPTURE(opt);
  Session s(r.reg);
  CHECK(s.opt(opt, info_data("nope", {kInfoName})) == reply(opt, kRepErrUnknown));
  CHECK(s.n.state() == State::kOptions);
  s.opt(kOptGo, info_data("disk"));
  CHECK(s.n.state() == State::kTransmission);
}

TEST_CASE("negotiate: GO/INFO with malformed data", "[negotiate][go]") {
  Registry r;
  const uint32_t opt = GENERATE(uint32_t{kOptInfo}, uint32_t{kOptGo});
  CAPTURE(opt);
  const std::vector<std::pair<const char*, Bytes>> cases = {
      {"no data", {}},
      {"short name length", {0, 0, 4}},
      {"name shorter than its length", Wire().u32(4).str("dis").b},
      {"name length past the end", Wire().u32(0xffffffff).str("disk").u16(0).b},
      {"no request count", Wire().lstr("disk").b},
      {"half a request count", Wire().lstr("disk").raw({0}).b},
      {"count 1, no request", Wire().lstr("disk").u16(1).b},
      {"count 2, one request", Wire().lstr("disk").u16(2).u16(kInfoName).b},
      {"count 1, a request and a half", Wire().lstr("disk").u16(1).u16(kInfoName).raw({0}).b},
      {"count 0, trailing bytes", Wire().lstr("disk").u16(0).u16(kInfoName).b},
      {"trailing odd byte", Wire().lstr("disk").u16(0).raw({0}).b},
  };
  for (const auto& [what, data] : cases) {
    CAPTURE(what);
    Session s(r.reg);
    CHECK(s.opt(opt, data) == reply(opt, kRepErrInvalid));
    CHECK(s.n.state() == State::kOptions);
    CHECK(s.n.selected() == nullptr);
    s.opt(kOptGo, info_data("disk"));  // negotiation goes on
    CHECK(s.n.state() == State::kTransmission);
  }
  SECTION("a name over the 4096-byte string limit is refused") {
    Session s(r.reg);
    std::vector<Reply> rs = parse_replies(s.opt(opt, info_data(std::string(5000, 'n'))));
    REQUIRE(rs.size() == 1);
    CHECK((rs[0].type & kRepErrBit) != 0);
    CHECK(s.n.state() == State::kOptions);
  }
}

// ---- NBD_OPT_LIST, ABORT, STRUCTURED_REPLY, unknown options ----

TEST_CASE("negotiate: LIST names every export, then ACK", "[negotiate]") {
  Registry r;
  REQUIRE(r.reg.add(make_export("zeta", 512, "last one", false)).is_ok());
  Session s(r.reg);
  CHECK(s.opt(kOptList) ==
        cat({reply(kOptList, kRepServer, Wire().lstr("disk").str("the disk").b),
             reply(kOptList, kRepServer, Wire().lstr("ro").b),
             reply(kOptList, kRepServer, Wire().lstr("zeta").str("last one").b),
             reply(kOptList, kRepAck)}));
  CHECK(s.n.state() == State::kOptions);
  SECTION("data with LIST is invalid") {
    CHECK(s.opt(kOptList, {0}) == reply(kOptList, kRepErrInvalid));
    CHECK(s.n.state() == State::kOptions);
  }
  SECTION("an empty registry lists nothing") {
    ExportRegistry none;
    Session e(none);
    CHECK(e.opt(kOptList) == reply(kOptList, kRepAck));
  }
}

TEST_CASE("negotiate: ABORT is acknowledged, then the connection closes", "[negotiate]") {
  Registry r;
  Session s(r.reg);
  SECTION("without data") {
    const Bytes in = cat({option(kOptAbort), option(kOptList)});
    s.feed(in);
    CHECK(s.out == reply(kOptAbort, kRepAck));
  }
  SECTION("data is ignored") {
    s.opt(kOptAbort, {1, 2, 3});
    CHECK(s.out == reply(kOptAbort, kRepAck));
  }
  CHECK(s.n.state() == State::kClose);
  CHECK(s.n.selected() == nullptr);
}

TEST_CASE("negotiate: STRUCTURED_REPLY", "[negotiate]") {
  Registry r;
  Session s(r.reg);
  SECTION("accepted") {
    CHECK(s.opt(kOptStructuredReply) == reply(kOptStructuredReply, kRepAck));
    s.opt(kOptGo, info_data("disk"));
    CHECK(s.n.structured_replies());
  }
  SECTION("with data: invalid, not negotiated") {
    CHECK(s.opt(kOptStructuredReply, {0}) == reply(kOptStructuredReply, kRepErrInvalid));
    s.opt(kOptGo, info_data("disk"));
    CHECK(s.n.state() == State::kTransmission);
    CHECK_FALSE(s.n.structured_replies());
  }
}

TEST_CASE("negotiate: unsupported options are refused and skipped", "[negotiate]") {
  Registry r;
  Session s(r.reg);
  for (uint32_t opt : {999u, uint32_t{kOptPeekExport},
                       uint32_t{kOptExtendedHeaders}, 0u, 12u, 0x80000000u, 0xffffffffu}) {
    CAPTURE(opt);
    for (const Bytes& data : {Bytes{}, Bytes(100, 0xee), option(kOptAbort)}) {
      CHECK(s.opt(opt, data) == reply(opt, kRepErrUnsup));
      CHECK(s.n.state() == State::kOptions);
    }
  }
  CHECK(s.opt(kOptList).size() > kOptReplyHeaderSize);
  CHECK(s.n.state() == State::kOptions);
}

// ---- NBD_OPT_STARTTLS ----

namespace {

Bytes text(std::string_view t) { return Bytes(t.begin(), t.end()); }

struct TlsSession {
  TlsSession(const ExportRegistry& reg, TlsPolicy p) : n(reg, p) {
    Bytes out;
    REQUIRE(n.feed(client_flags(kBothClientFlags), out) == 4);
  }
  Bytes opt(uint32_t o, const Bytes& data = {}) {
    const Bytes msg = option(o, data);
    Bytes out;
    REQUIRE(n.feed(msg, out) == msg.size());
    return out;
  }
  Negotiator n;
};

}  // namespace

TEST_CASE("negotiate: STARTTLS without TLS is refused by policy", "[negotiate][tls]") {
  Registry r;
  TlsSession s(r.reg, TlsPolicy::kOff);
  CHECK(s.opt(kOptStartTls) == reply(kOptStartTls, kRepErrPolicy, text("TLS is not enabled on this server")));
  CHECK(s.n.state() == State::kOptions);
  CHECK_FALSE(s.n.tls_active());
  // Everything else as before.
  CHECK(s.opt(kOptGo, info_data("disk")).size() > kOptReplyHeaderSize);
  CHECK(s.n.state() == State::kTransmission);
}

TEST_CASE("negotiate: TLS required: every option but STARTTLS and ABORT refused, nothing leaks",
          "[negotiate][tls]") {
  Registry r;
  TlsSession s(r.reg, TlsPolicy::kRequire);
  const Bytes msg = text("TLS is required: send NBD_OPT_STARTTLS first");
  for (uint32_t o : {uint32_t{kOptList}, uint32_t{kOptInfo}, uint32_t{kOptGo}, uint32_t{kOptStructuredReply},
                     uint32_t{kOptListMetaContext}, uint32_t{kOptSetMetaContext}, uint32_t{kOptPeekExport},
                     999u}) {
    CAPTURE(o);
    const Bytes data = o == kOptInfo || o == kOptGo ? info_data("disk") : Bytes{};
    CHECK(s.opt(o, data) == reply(o, kRepErrTlsReqd, msg));
    CHECK(s.n.state() == State::kOptions);
  }
  // STARTTLS with data is invalid, and changes nothing.
  CHECK(s.opt(kOptStartTls, Bytes{1}) == reply(kOptStartTls, kRepErrInvalid));
  CHECK(s.n.state() == State::kOptions);
  // ABORT is still answered.
  TlsSession a(r.reg, TlsPolicy::kRequire);
  CHECK(a.opt(kOptAbort) == reply(kOptAbort, kRepAck));
  CHECK(a.n.state() == State::kClose);
  // EXPORT_NAME cannot be refused: the connection closes with no reply.
  TlsSession e(r.reg, TlsPolicy::kRequire);
  CHECK(e.opt(kOptExportName, text("disk")).empty());
  CHECK(e.n.state() == State::kClose);
  CHECK(e.n.selected() == nullptr);
}

TEST_CASE("negotiate: STARTTLS, then haggling starts afresh over TLS", "[negotiate][tls]") {
  Registry r;
  for (TlsPolicy p : {TlsPolicy::kOn, TlsPolicy::kRequire}) {
    TlsSession s(r.reg, p);
    if (p == TlsPolicy::kOn) {
      // Before TLS, with TLS only offered: state negotiated in the clear...
      CHECK(s.opt(kOptStructuredReply) == reply(kOptStructuredReply, kRepAck));
      CHECK(s.opt(kOptSetMetaContext, meta_data("disk", {"base:allocation"})).size() > kOptReplyHeaderSize);
    }
    // The acknowledgement; bytes behind STARTTLS are left for the TLS layer.
    const Bytes msg = cat({option(kOptStartTls), Bytes{0x16, 0x03, 0x01}});
    Bytes out;
    CHECK(s.n.feed(msg, out) == msg.size() - 3);
    CHECK(out == reply(kOptStartTls, kRepAck));
    CHECK(s.n.state() == State::kStartTls);
    Bytes more;
    CHECK(s.n.feed(option(kOptList), more) == 0);  // nothing is read until TLS is up
    s.n.tls_started();
    CHECK(s.n.tls_active());
    CHECK(s.n.state() == State::kOptions);
    // ... is forgotten (proto.md: no negotiation state survives STARTTLS).
    CHECK_FALSE(s.n.structured_replies());
    CHECK_FALSE(s.n.base_allocation());
    // A second STARTTLS is invalid; everything else is served.
    CHECK(s.opt(kOptStartTls) == reply(kOptStartTls, kRepErrInvalid));
    CHECK(s.opt(kOptList).size() > kOptReplyHeaderSize);
    CHECK(s.opt(kOptGo, info_data("disk")).size() > kOptReplyHeaderSize);
    CHECK(s.n.state() == State::kTransmission);
    CHECK(s.n.selected()->name == "disk");
  }
}

TEST_CASE("negotiate: option length limit", "[negotiate]") {
  Registry r;
  Session s(r.reg);
  SECTION("one byte over closes, without waiting for the data") {
    const Bytes hdr = Wire().u64(kIHaveOpt).u32(999).u32(Negotiator::kMaxOptionBytes + 1).b;
    s.feed(hdr);
    CHECK(s.n.state() == State::kClose);
    CHECK(s.out.empty());
  }
  SECTION("a 4 GiB length closes") {
    s.feed(Wire().u64(kIHaveOpt).u32(kOptGo).u32(0xffffffff).b);
    CHECK(s.n.state() == State::kClose);
  }
  SECTION("exactly the limit is read whole and answered") {
    const Bytes msg = option(999, Bytes(Negotiator::kMaxOptionBytes, 0x5a));
    CHECK(s.feed(Bytes(msg.begin(), msg.end() - 1)) == 0);
    CHECK(s.n.state() == State::kOptions);
    CHECK(s.out.empty());
    CHECK(s.feed(msg) == msg.size());
    CHECK(s.out == reply(999, kRepErrUnsup));
  }
}

TEST_CASE("negotiate: a bad option magic closes", "[negotiate]") {
  Registry r;
  for (size_t i = 0; i < 8; ++i) {
    CAPTURE(i);
    Session s(r.reg);
    Bytes msg = option(kOptList);
    msg[i] ^= 0x20;
    s.feed(msg);
    CHECK(s.n.state() == State::kClose);
    CHECK(s.out.empty());
  }
}

// ---- meta contexts ----

Bytes meta_reply(uint32_t opt, uint32_t id) {
  return reply(opt, kRepMetaContext, Wire().u32(id).str("base:allocation").b);
}

TEST_CASE("negotiate: meta contexts need structured replies first", "[negotiate][meta]") {
  Registry r;
  Session s(r.reg);
  for (uint32_t opt : {uint32_t{kOptListMetaContext}, uint32_t{kOptSetMetaContext}}) {
    CAPTURE(opt);
    CHECK(s.opt(opt, meta_data("disk", {"base:allocation"})) == reply(opt, kRepErrInvalid));
    CHECK(s.n.state() == State::kOptions);
  }
  s.opt(kOptStructuredReply);
  s.opt(kOptGo, info_data("disk"));
  CHECK_FALSE(s.n.base_allocation());
}

TEST_CASE("negotiate: LIST_META_CONTEXT", "[negotiate][meta]") {
  Registry r;
  Session s(r.reg);
  s.opt(kOptStructuredReply);
  const uint32_t opt = kOptListMetaContext;
  // proto.md: the context id in LIST replies SHOULD be zero.
  const Bytes listed = cat({meta_reply(opt, 0), reply(opt, kRepAck)});
  CHECK(s.opt(opt, meta_data("disk", {"base:allocation"})) == listed);
  CHECK(s.opt(opt, meta_data("disk", {})) == listed);  // no query: everything
  CHECK(s.opt(opt, meta_data("ro", {"base:"})) == listed);
  CHECK(s.opt(opt, meta_data("", {"x-unknown:thing", "base:allocation"})) == listed);
  // Unknown namespaces are ignored: only the ACK.
  CHECK(s.opt(opt, meta_data("disk", {"x-foo:bar"})) == reply(opt, kRepAck));
  CHECK(s.opt(opt, meta_data("disk", {"qemu:dirty-bitmap:b0", "base:nothing"})) ==
        reply(opt, kRepAck));
  CHECK(s.opt(opt, meta_data("nope", {"base:allocation"})) == reply(opt, kRepErrUnknown));
  // LIST selects nothing.
  s.opt(kOptGo, info_data("disk"));
  CHECK_FALSE(s.n.base_allocation());
}

TEST_CASE("negotiate: SET_META_CONTEXT", "[negotiate][meta]") {
  Registry r;
  Session s(r.reg);
  s.opt(kOptStructuredReply);
  const uint32_t opt = kOptSetMetaContext;
  const Bytes selected = cat({meta_reply(opt, kBaseAllocationId), reply(opt, kRepAck)});

  SECTION("base:allocation is selected with a nonzero id") {
    CHECK(kBaseAllocationId != 0);
    CHECK(s.opt(opt, meta_data("disk", {"base:allocation"})) == selected);
    s.opt(kOptGo, info_data("disk"));
    CHECK(s.n.base_allocation());
    CHECK(s.n.structured_replies());
  }
  SECTION("with EXPORT_NAME too") {
    s.opt(opt, meta_data("ro", {"base:allocation"}));
    s.opt(kOptExportName, Wire().str("ro").b);
    CHECK(s.n.state() == State::kTransmission);
    CHECK(s.n.base_allocation());
  }
  SECTION("an unknown namespace selects nothing: only the ACK") {
    CHECK(s.opt(opt, meta_data("disk", {"x-foo:bar"})) == reply(opt, kRepAck));
    s.opt(kOptGo, info_data("disk"));
    CHECK_FALSE(s.n.base_allocation());
  }
  SECTION("zero queries select nothing") {
    CHECK(s.opt(opt, meta_data("disk", {"base:allocation"})) == selected);
    CHECK(s.opt(opt, meta_data("disk", {})) == reply(opt, kRepAck));
    s.opt(kOptGo, info_data("disk"));
    CHECK_FALSE(s.n.base_allocation());
  }
  SECTION("SET for one export, GO for another") {
    s.opt(opt, meta_data("disk", {"base:allocation"}));
    s.opt(kOptGo, info_data("ro"));
    CHECK(s.n.state() == State::kTransmission);
    CHECK_FALSE(s.n.base_allocation());
  }
  SECTION("SET for one export, EXPORT_NAME for another") {
    s.opt(opt, meta_data("ro", {"base:allocation"}));
    s.opt(kOptExportName, Wire().str("disk").b);
    CHECK_FALSE(s.n.base_allocation());
  }
  SECTION("the last SET counts") {
    s.opt(opt, meta_data("ro", {"base:allocation"}));
    s.opt(opt, meta_data("disk", {"base:allocation"}));
    s.opt(kOptGo, info_data("disk"));
    CHECK(s.n.base_allocation());
  }
  SECTION("a failed SET still replaces the selection") {
    s.opt(opt, meta_data("disk", {"base:allocation"}));
    CHECK(s.opt(opt, meta_data("nope", {"base:allocation"})) == reply(opt, kRepErrUnknown));
    s.opt(kOptGo, info_data("disk"));
    CHECK_FALSE(s.n.base_allocation());
  }
  SECTION("a malformed SET still replaces the selection") {
    s.opt(opt, meta_data("disk", {"base:allocation"}));
    CHECK(s.opt(opt, {1, 2, 3}) == reply(opt, kRepErrInvalid));
    s.opt(kOptGo, info_data("disk"));
    CHECK_FALSE(s.n.base_allocation());
  }
  SECTION("INFO in between does not disturb it") {
    s.opt(opt, meta_data("disk", {"base:allocation"}));
    s.opt(kOptInfo, info_data("ro"));
    s.opt(kOptGo, info_data("disk"));
    CHECK(s.n.base_allocation());
  }
}

// ---- shadowd:source ----

// A point-in-time export: its backend answers source_at().
std::shared_ptr<Export> make_pit_export(std::string name) {
  auto e = std::make_shared<Export>();
  e->name = std::move(name);
  e->backend = std::make_shared<test::SourceBackend>(
      kRoBytes, std::vector<test::SourceBackend::Run>{{kRoBytes, 0}});
  e->read_only = true;
  return e;
}

Bytes context_reply(uint32_t opt, uint32_t id, std::string_view ctx) {
  return reply(opt, kRepMetaContext, Wire().u32(id).str(ctx).b);
}

// "disk" and "ro" (no can_sources) and "pit" (can_sources).
struct PitRegistry : Registry {
  PitRegistry() { REQUIRE(reg.add(make_pit_export("pit")).is_ok()); }
};

// A session past STRUCTURED_REPLY, and the replies to expect for `opt`
// (LIST or SET_META_CONTEXT; LIST replies carry context id 0).
struct MetaSession {
  explicit MetaSession(uint32_t o) : opt(o) { s.opt(kOptStructuredReply); }
  const uint32_t opt;
  PitRegistry r;
  Session s{r.reg};
  const bool set = opt == kOptSetMetaContext;
  const Bytes ack = reply(opt, kRepAck);
  const Bytes base = context_reply(opt, set ? kBaseAllocationId : 0, "base:allocation");
  const Bytes source = context_reply(opt, set ? kShadowdSourceId : 0, "shadowd:source");
};

TEST_CASE("negotiate: LIST_META_CONTEXT with shadowd:source", "[negotiate][meta]") {
  MetaSession m(kOptListMetaContext);
  auto [opt, s, ack, base, source] = std::tie(m.opt, m.s, m.ack, m.base, m.source);

  SECTION("no query lists both where the backend can_sources, base only elsewhere") {
    CHECK(s.opt(opt, meta_data("pit", {})) == cat({base, source, ack}));
    CHECK(s.opt(opt, meta_data("disk", {})) == cat({base, ack}));
    CHECK(s.opt(opt, meta_data("ro", {})) == cat({base, ack}));
  }
  SECTION("the namespace wildcard lists its contexts only") {
    CHECK(s.opt(opt, meta_data("pit", {"shadowd:"})) == cat({source, ack}));
    CHECK(s.opt(opt, meta_data("pit", {"base:"})) == cat({base, ack}));
    CHECK(s.opt(opt, meta_data("pit", {"shadowd:", "base:"})) == cat({base, source, ack}));
    CHECK(s.opt(opt, meta_data("disk", {"shadowd:"})) == ack);
  }
  SECTION("exact names, each context once") {
    CHECK(s.opt(opt, meta_data("pit", {"shadowd:source"})) == cat({source, ack}));
    CHECK(s.opt(opt, meta_data("pit", {"shadowd:source", "base:allocation"})) ==
          cat({base, source, ack}));
    CHECK(s.opt(opt, meta_data("pit", {"shadowd:source", "shadowd:", "shadowd:source"})) ==
          cat({source, ack}));
    CHECK(s.opt(opt, meta_data("disk", {"shadowd:source"})) == ack);
    CHECK(s.opt(opt, meta_data("disk", {"shadowd:source", "base:allocation"})) ==
          cat({base, ack}));
  }
  SECTION("unknown shadowd names and near misses are ignored") {
    CHECK(s.opt(opt, meta_data("pit", {"shadowd:sourc", "shadowd:source2", "shadowd:x",
                                       "shadowd", "SHADOWD:source", "shadowd:source:"})) == ack);
    CHECK(s.opt(opt, meta_data("pit", {"x-shadowd:source"})) == ack);
  }
  SECTION("LIST selects nothing") {
    s.opt(opt, meta_data("pit", {}));
    s.opt(kOptGo, info_data("pit"));
    CHECK_FALSE(s.n.meta_contexts().any());
  }
}

TEST_CASE("negotiate: SET_META_CONTEXT with shadowd:source", "[negotiate][meta]") {
  MetaSession m(kOptSetMetaContext);
  auto [opt, s, ack, base, source] = std::tie(m.opt, m.s, m.ack, m.base, m.source);
  CHECK(kShadowdSourceId != 0);
  CHECK(kShadowdSourceId != kBaseAllocationId);
  CHECK(kBaseAllocationId == 1);  // unchanged for clients that saw it before

  SECTION("both, with distinct ids") {
    const Bytes out = s.opt(opt, meta_data("pit", {"shadowd:source", "base:allocation"}));
    CHECK(out == cat({base, source, ack}));  // in the server's order, not the query's
    const std::vector<Reply> rs = parse_replies(out);
    REQUIRE(rs.size() == 3);
    CHECK(get32(rs[0].data.data()) != get32(rs[1].data.data()));
    s.opt(kOptGo, info_data("pit"));
    CHECK(s.n.base_allocation());
    CHECK(s.n.shadowd_source());
  }
  SECTION("shadowd:source alone") {
    CHECK(s.opt(opt, meta_data("pit", {"shadowd:source"})) == cat({source, ack}));
    s.opt(kOptGo, info_data("pit"));
    CHECK_FALSE(s.n.base_allocation());
    CHECK(s.n.shadowd_source());
    CHECK(s.n.meta_contexts().any());
  }
  SECTION("with EXPORT_NAME too") {
    s.opt(opt, meta_data("pit", {"base:allocation", "shadowd:source"}));
    s.opt(kOptExportName, Wire().str("pit").b);
    CHECK(s.n.state() == State::kTransmission);
    CHECK(s.n.base_allocation());
    CHECK(s.n.shadowd_source());
  }
  SECTION("the wildcard selects nothing") {
    CHECK(s.opt(opt, meta_data("pit", {"shadowd:"})) == ack);
    s.opt(kOptGo, info_data("pit"));
    CHECK_FALSE(s.n.meta_contexts().any());
  }
  SECTION("unknown names select nothing") {
    CHECK(s.opt(opt, meta_data("pit", {"shadowd:nope", "x-foo:bar", "shadowd:source2"})) == ack);
    s.opt(kOptGo, info_data("pit"));
    CHECK_FALSE(s.n.meta_contexts().any());
  }
  SECTION("an export without can_sources selects nothing for it") {
    CHECK(s.opt(opt, meta_data("disk", {"shadowd:source"})) == ack);
    CHECK(s.opt(opt, meta_data("disk", {"shadowd:source", "base:allocation"})) ==
          cat({base, ack}));
    s.opt(kOptGo, info_data("disk"));
    CHECK(s.n.base_allocation());
    CHECK_FALSE(s.n.shadowd_source());
  }
  SECTION("SET for pit, GO for another export") {
    s.opt(opt, meta_data("pit", {"base:allocation", "shadowd:source"}));
    s.opt(kOptGo, info_data("disk"));
    CHECK_FALSE(s.n.meta_contexts().any());
  }
  SECTION("a later SET replaces both") {
    s.opt(opt, meta_data("pit", {"base:allocation", "shadowd:source"}));
    CHECK(s.opt(opt, meta_data("pit", {"base:allocation"})) == cat({base, ack}));
    s.opt(kOptGo, info_data("pit"));
    CHECK(s.n.base_allocation());
    CHECK_FALSE(s.n.shadowd_source());
  }
  SECTION("a failed SET clears both") {
    s.opt(opt, meta_data("pit", {"base:allocation", "shadowd:source"}));
    CHECK(s.opt(opt, meta_data("nope", {"shadowd:source"})) == reply(opt, kRepErrUnknown));
    s.opt(kOptGo, info_data("pit"));
    CHECK_FALSE(s.n.meta_contexts().any());
  }
}

TEST_CASE("negotiate: meta context options with malformed data", "[negotiate][meta]") {
  Registry r;
  const uint32_t opt = GENERATE(uint32_t{kOptListMetaContext}, uint32_t{kOptSetMetaContext});
  CAPTURE(opt);
  const std::vector<std::pair<const char*, Bytes>> cases = {
      {"no data", {}},
      {"name shorter than its length", Wire().u32(5).str("disk").b},
      {"no query count", Wire().lstr("disk").b},
      {"short query count", Wire().lstr("disk").u16(0).b},
      {"count 1, no query", Wire().lstr("disk").u32(1).b},
      {"count 2, one query", Wire().lstr("disk").u32(2).lstr("base:allocation").b},
      {"query shorter than its length", Wire().lstr("disk").u32(1).u32(16).str("base:allocation").b},
      {"huge query count", Wire().lstr("disk").u32(0xffffffff).lstr("base:allocation").b},
      {"trailing byte", Wire().lstr("disk").u32(1).lstr("base:allocation").raw({0}).b},
      {"query over the string limit",
       Wire().lstr("disk").u32(1).lstr(std::string(kMaxStringBytes + 1, 'q')).b},
  };
  for (const auto& [what, data] : cases) {
    CAPTURE(what);
    Session s(r.reg);
    s.opt(kOptStructuredReply);
    CHECK(s.opt(opt, data) == reply(opt, kRepErrInvalid));  // no context replies before it
    CHECK(s.n.state() == State::kOptions);
  }
}

// ---- split input ----

// Feed `script` in the pieces `cuts` gives (ascending offsets), as the
// connection does: keep what was not consumed and append the next piece.
struct ChunkedRun {
  Bytes out;
  Bytes left;
  State state;
  bool structured;
  bool base_allocation;
  bool shadowd_source;
  std::string selected;
};

ChunkedRun run_chunked(const ExportRegistry& reg, const Bytes& script,
                       const std::vector<size_t>& cuts) {
  Negotiator n(reg);
  ChunkedRun run;
  size_t from = 0;
  auto piece = [&](size_t to) {
    run.left.insert(run.left.end(), script.begin() + from, script.begin() + to);
    from = to;
    const size_t before = run.out.size();
    const State was = n.state();
    const size_t used = n.feed(run.left, run.out);
    REQUIRE(used <= run.left.size());
    if (was == State::kTransmission || was == State::kClose) {
      REQUIRE(used == 0);
      REQUIRE(run.out.size() == before);
    }
    run.left.erase(run.left.begin(), run.left.begin() + static_cast<ptrdiff_t>(used));
  };
  for (size_t c : cuts) piece(c);
  piece(script.size());
  run.state = n.state();
  run.structured = n.structured_replies();
  run.base_allocation = n.base_allocation();
  run.shadowd_source = n.shadowd_source();
  run.selected = n.selected() ? n.selected()->name : "";
  return run;
}

void require_same(const ChunkedRun& a, const ChunkedRun& b) {
  REQUIRE(a.out.size() == b.out.size());
  REQUIRE(test::first_difference(a.out, b.out) == -1);
  REQUIRE(a.left == b.left);
  REQUIRE(a.state == b.state);
  REQUIRE(a.structured == b.structured);
  REQUIRE(a.base_allocation == b.base_allocation);
  REQUIRE(a.shadowd_source == b.shadowd_source);
  REQUIRE(a.selected == b.selected);
}

TEST_CASE("negotiate: input split at every boundary gives the same result", "[negotiate][split]") {
  Registry r;
  const Bytes transmission = Bytes(28, 0x25);  // a request that must be left alone
  Bytes script = cat({
      client_flags(kBothClientFlags),
      option(kOptList),
      option(kOptStructuredReply),
      option(kOptListMetaContext, meta_data("disk", {})),
      option(999, Bytes(7, 1)),
      option(kOptSetMetaContext, meta_data("disk", {"base:allocation"})),
      option(kOptInfo, info_data("nope")),
      option(kOptInfo, {0, 0}),
      option(kOptInfo, info_data("ro", {kInfoName, kInfoBlockSize})),
  });
  SECTION("ending with GO") {
    script = cat({script, option(kOptGo, info_data("disk", {kInfoDescription})), transmission});
  }
  SECTION("ending with EXPORT_NAME and its zeroes") {
    script[3] = kClientFixedNewstyle;
    script = cat({script, option(kOptExportName, Wire().str("disk").b), transmission});
  }
  SECTION("ending with ABORT") {
    script = cat({script, option(kOptAbort), transmission});
  }
  const ChunkedRun whole = run_chunked(r.reg, script, {});
  REQUIRE(whole.state != State::kOptions);
  REQUIRE(whole.left == transmission);
  check_framing(whole.out, whole.state);
  for (size_t cut = 1; cut < script.size(); ++cut) {
    CAPTURE(cut);
    require_same(run_chunked(r.reg, script, {cut}), whole);
  }
  std::vector<size_t> every(script.size() - 1);
  for (size_t i = 0; i < every.size(); ++i) every[i] = i + 1;
  require_same(run_chunked(r.reg, script, every), whole);
}

// ---- randomized ----

// One client stream: mostly plausible options with random damage, sometimes
// pure noise.
Bytes random_stream(std::mt19937_64& rng) {
  auto pick = [&](uint64_t n) { return rng() % n; };
  if (pick(10) == 0) return test::random_bytes(rng, pick(200));
  static const std::string_view names[] = {"disk", "ro", "", "nope",
                                           std::string_view("disk\0x", 6), "pit"};
  static const char* queries[] = {"base:allocation", "base:", "x-foo:bar", "", "base",
                                  "shadowd:source", "shadowd:"};
  // Mostly fixed newstyle, so that the options get past the first check.
  uint32_t flags = kClientFixedNewstyle | static_cast<uint32_t>(pick(2)) * kClientNoZeroes;
  if (pick(10) == 0) flags = static_cast<uint32_t>(pick(4));
  if (pick(20) == 0) flags = static_cast<uint32_t>(rng());
  Bytes s = client_flags(flags);
  static const uint32_t common[] = {kOptInfo,           kOptInfo,           kOptGo,
                                    kOptList,           kOptStructuredReply, kOptStructuredReply,
                                    kOptListMetaContext, kOptSetMetaContext, kOptSetMetaContext,
                                    kOptStartTls,       999};
  const uint64_t count = pick(10);
  for (uint64_t i = 0; i < count; ++i) {
    uint32_t opt = common[pick(std::size(common))];
    if (pick(30) == 0) opt = kOptAbort;
    if (pick(30) == 0) opt = kOptExportName;
    if (pick(30) == 0) opt = static_cast<uint32_t>(pick(13));
    if (pick(30) == 0) opt = static_cast<uint32_t>(rng());
    const std::string_view name = names[pick(std::size(names))];
    Bytes data;
    if (opt == kOptInfo || opt == kOptGo) {
      data = info_data(name, {static_cast<uint16_t>(pick(5)), static_cast<uint16_t>(pick(5))});
    } else if (opt == kOptListMetaContext || opt == kOptSetMetaContext) {
      const uint64_t nq = std::size(queries);
      data = meta_data(name, {queries[pick(nq)], queries[pick(nq)]});
    } else if (opt == kOptExportName) {
      data = Wire().str(name).b;
    } else if (pick(2)) {
      data = test::random_bytes(rng, pick(20));
    }
    switch (pick(12)) {  // damage
      case 0:
        if (!data.empty()) data[pick(data.size())] ^= static_cast<uint8_t>(1 + pick(255));
        break;
      case 1:
        if (!data.empty()) data.resize(pick(data.size()));
        break;
      case 2: data.push_back(static_cast<uint8_t>(rng())); break;
      default: break;
    }
    Bytes msg = option(opt, data);
    switch (pick(80)) {  // damage to the header
      case 0: msg[pick(8)] ^= 1; break;
      case 1: put32(msg.data() + 12, static_cast<uint32_t>(rng())); break;
      case 2: put32(msg.data() + 12, get32(msg.data() + 12) + 1); break;
      case 3: put32(msg.data() + 12, Negotiator::kMaxOptionBytes + 1); break;
      default: break;
    }
    s.insert(s.end(), msg.begin(), msg.end());
  }
  if (pick(3) == 0) {
    const Bytes tail = test::random_bytes(rng, pick(40));
    s.insert(s.end(), tail.begin(), tail.end());
  }
  return s;
}

TEST_CASE("negotiate: random input never crashes or over-consumes", "[negotiate][random]") {
  PitRegistry r;
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  INFO("replay with SHADOWD_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  for (int iter = 0; iter < 2000; ++iter) {
    CAPTURE(iter);
    const Bytes script = random_stream(rng);
    const ChunkedRun whole = run_chunked(r.reg, script, {});
    check_framing(whole.out, whole.state);
    if (whole.state == State::kTransmission) REQUIRE_FALSE(whole.selected.empty());

    std::vector<size_t> cuts;
    for (size_t at = 0; !script.empty();) {
      at += 1 + rng() % (script.size() / 3 + 1);
      if (at >= script.size()) break;
      cuts.push_back(at);
    }
    require_same(run_chunked(r.reg, script, cuts), whole);
  }
}

}  // namespace
}  // namespace shadowd::nbd
