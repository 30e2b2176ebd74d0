// Fuzz target: the NBD handshake (nbd/negotiate.h) driven as the connection
// loop drives it. The client's bytes arrive in chunks of any size; the
// Negotiator consumes whole messages and appends replies; once it says
// kTransmission the rest of the stream is requests (nbd/codec.h), checked
// against what was negotiated.
//
// Input: byte 0 seeds the chunk sizes (fuzz_util.h, Chunker); the rest is
// what a client sends after the server's greeting: client flags, options,
// then requests.
//
// Invariants: feed() consumes whole messages only, never more than it was
// given, leaves no whole message behind while haggling, and consumes and
// sends nothing once the state says stop; where the stream is cut changes
// nothing (bytes consumed and sent, the outcome); the output is option replies for
// the options consumed, in order, each option's ending in one ACK or error
// (or the EXPORT_NAME reply, which ends the haggling); replies carry what
// the registry holds; the meta contexts selected are ones the export offers,
// negotiated with structured replies; requests get the verdicts
// request_checks.h states.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/memory_backend.h"
#include "nbd/codec.h"
#include "nbd/negotiate.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/fuzz/request_checks.h"
#include "tests/unit/source_backend.h"

namespace shadowd::nbd {
namespace {

using State = Negotiator::State;

// "disk" (the default), read-write with a description; "ro", read-only
// without; "pit", a point-in-time export that offers shadowd:source.
const ExportRegistry& registry() {
  static const ExportRegistry* reg = [] {
    auto* r = new ExportRegistry;
    auto add = [&](std::string name, std::shared_ptr<IoBackend> backend, std::string description) {
      auto e = std::make_shared<Export>();
      e->name = std::move(name);
      e->description = std::move(description);
      e->read_only = backend->info().read_only;
      e->backend = std::move(backend);
      FUZZ_CHECK(r->add(std::move(e)).is_ok());
    };
    add("disk", std::make_shared<MemoryBackend>(1u << 20, 1), "the disk");
    add("ro", std::make_shared<MemoryBackend>(64u << 10, 1, /*read_only=*/true), "");
    add("pit",
        std::make_shared<test::SourceBackend>(
            256u << 10, std::vector<test::SourceBackend::Run>{{128u << 10, 0}, {256u << 10, 1}}),
        "at T");
    return r;
  }();
  return *reg;
}

bool haggling(State s) { return s == State::kClientFlags || s == State::kOptions; }

std::string_view text(std::span<const uint8_t> b) {
  return {reinterpret_cast<const char*>(b.data()), b.size()};
}

bool is_export(const Export& e, uint64_t size, uint16_t flags) {
  return e.size_bytes() == size && e.transmission_flags() == flags;
}

bool some_export(uint64_t size, uint16_t flags) {
  const auto all = registry().list();
  return std::any_of(all.begin(), all.end(), [&](const auto& e) { return is_export(*e, size, flags); });
}

bool some_export_named(std::string_view name) { return registry().find(name) != nullptr && !name.empty(); }

// The options in bytes the negotiator consumed: whole messages only.
std::vector<uint32_t> consumed_options(std::span<const uint8_t> used, bool& flags_seen) {
  std::vector<uint32_t> opts;
  size_t p = 0;
  if (!flags_seen && used.size() >= 4) {
    flags_seen = true;
    p = 4;
  }
  while (p < used.size()) {
    FUZZ_CHECK(used.size() - p >= kOptionHeaderSize);
    FUZZ_CHECK(get64(used.data() + p) == kIHaveOpt);
    const uint32_t len = get32(used.data() + p + 12);
    FUZZ_CHECK(used.size() - p - kOptionHeaderSize >= len);
    opts.push_back(get32(used.data() + p + 8));
    p += kOptionHeaderSize + len;
  }
  return opts;
}

void check_info(std::span<const uint8_t> p) {
  FUZZ_CHECK(p.size() >= 2);
  switch (get16(p.data())) {
    case kInfoExport:
      FUZZ_CHECK(p.size() == 12 && some_export(get64(p.data() + 2), get16(p.data() + 10)));
      break;
    case kInfoName: FUZZ_CHECK(some_export_named(text(p.subspan(2)))); break;
    case kInfoDescription: FUZZ_CHECK(p.size() > 2); break;
    case kInfoBlockSize: {
      FUZZ_CHECK(p.size() == 14);
      const uint32_t min = get32(p.data() + 2), pref = get32(p.data() + 6), max = get32(p.data() + 10);
      FUZZ_CHECK(min >= 1 && min <= pref && pref <= max);
      break;
    }
    default: FUZZ_FAIL("an NBD_INFO type the server does not send");
  }
}

// One informational reply's payload; false when `type` ends the option.
bool check_reply_payload(uint32_t opt, uint32_t type, std::span<const uint8_t> p) {
  if (type == kRepAck) {
    FUZZ_CHECK(p.empty());
    return false;
  }
  if (type & kRepErrBit) return false;  // any message
  if (type == kRepInfo) {
    FUZZ_CHECK(opt == kOptInfo || opt == kOptGo);
    check_info(p);
  } else if (type == kRepServer) {
    FUZZ_CHECK(opt == kOptList && p.size() >= 4 && get32(p.data()) <= p.size() - 4);
    FUZZ_CHECK(registry().find(text(p.subspan(4, get32(p.data())))) != nullptr);
  } else if (type == kRepMetaContext) {
    FUZZ_CHECK(opt == kOptListMetaContext || opt == kOptSetMetaContext);
    FUZZ_CHECK(p.size() > 4);
    const uint32_t id = get32(p.data());
    const std::string_view name = text(p.subspan(4));
    FUZZ_CHECK(name == kBaseAllocation || name == kShadowdSource);
    if (opt == kOptListMetaContext) {
      FUZZ_CHECK(id == 0);
    } else {
      FUZZ_CHECK(id == (name == kBaseAllocation ? kBaseAllocationId : kShadowdSourceId));
    }
  } else {
    FUZZ_FAIL("an option reply type the server does not send");
  }
  return true;
}

// The output of one feed() for the options it consumed.
void check_output(std::span<const uint8_t> out, const std::vector<uint32_t>& opts, const Negotiator& n) {
  size_t pos = 0;
  for (size_t i = 0; i < opts.size(); ++i) {
    const bool last = i + 1 == opts.size();
    if (opts[i] == kOptExportName) {
      // No option reply: the export's size and flags (124 zero bytes unless
      // NO_ZEROES), or a close without a word.
      FUZZ_CHECK(last && (n.state() == State::kTransmission || n.state() == State::kClose));
      if (n.state() == State::kTransmission) {
        const size_t rest = out.size() - pos;
        FUZZ_CHECK(rest == 10 || rest == 10 + kExportNameZeroes);
        FUZZ_CHECK(is_export(*n.selected(), get64(out.data() + pos), get16(out.data() + pos + 8)));
        FUZZ_CHECK(std::all_of(out.begin() + pos + 10, out.end(), [](uint8_t b) { return b == 0; }));
        pos = out.size();
      }
      continue;
    }
    bool more = true;
    while (more && pos < out.size()) {
      FUZZ_CHECK(out.size() - pos >= kOptReplyHeaderSize);
      const uint8_t* h = out.data() + pos;
      FUZZ_CHECK(get64(h) == kOptReplyMagic && get32(h + 8) == opts[i]);
      const uint32_t len = get32(h + 16);
      FUZZ_CHECK(out.size() - pos - kOptReplyHeaderSize >= len);
      more = check_reply_payload(opts[i], get32(h + 12), out.subspan(pos + kOptReplyHeaderSize, len));
      pos += kOptReplyHeaderSize + len;
    }
    // Only the option that ended the haggling may go unanswered.
    if (more) FUZZ_CHECK(last && !haggling(n.state()));
  }
  FUZZ_CHECK(pos == out.size());
}

// While haggling, what is left must be less than one whole message.
void check_leftover(std::span<const uint8_t> left, State s) {
  if (s == State::kClientFlags) {
    FUZZ_CHECK(left.size() < 4);
  } else if (left.size() >= kOptionHeaderSize) {
    const uint32_t len = get32(left.data() + 12);
    FUZZ_CHECK(get64(left.data()) == kIHaveOpt && len <= Negotiator::kMaxOptionBytes);
    FUZZ_CHECK(left.size() < kOptionHeaderSize + len);
  }
}

void check_selection(const Negotiator& n) {
  FUZZ_CHECK(n.selected() != nullptr);
  FUZZ_CHECK(registry().find(n.selected()->name) == n.selected());
  const MetaContexts& m = n.meta_contexts();
  if (m.any()) FUZZ_CHECK(n.structured_replies());
  if (m.shadowd_source) FUZZ_CHECK(n.selected()->backend->info().can_sources);
}

// The transmission phase as the connection starts it: requests checked
// against the negotiated context, refused payloads skipped.
void serve_requests(std::span<const uint8_t> in, const Negotiator& n) {
  const Export& e = *n.selected();
  RequestContext ctx;
  ctx.export_size = e.size_bytes();
  ctx.read_only = e.read_only;
  ctx.structured = n.structured_replies();
  ctx.base_allocation = n.base_allocation();
  ctx.shadowd_source = n.shadowd_source();
  ctx.max_payload_bytes = e.max_payload_bytes;
  for (;;) {
    Request r;
    if (parse_request(in, r) != ParseStatus::kOk) return;
    in = in.subspan(kRequestSize);
    const Verdict v = check_request(r, ctx);
    fuzz::check_verdict(r, ctx, v);
    if (v.close || v.disconnect) return;
    if (v.has_payload) in = in.subspan(std::min<size_t>(r.length, in.size()));
  }
}

// What a negotiation did with a stream.
struct Outcome {
  size_t consumed = 0;
  std::vector<uint8_t> sent;
};

// Feed `stream` to `n` in chunks, as recv() would hand it over, checking
// every feed() on the way.
Outcome negotiate(Negotiator& n, std::span<const uint8_t> stream, fuzz::Chunker chunks) {
  Outcome o;
  std::vector<uint8_t> pending;  // received, not yet consumed
  std::vector<uint8_t> out;
  bool flags_seen = false;
  size_t pos = 0;
  while (pos < stream.size() && haggling(n.state())) {
    const size_t c = chunks.next(stream.size() - pos);
    pending.insert(pending.end(), stream.begin() + pos, stream.begin() + pos + c);
    pos += c;
    out.clear();
    const size_t used = n.feed(pending, out);
    FUZZ_CHECK(used <= pending.size());
    check_output(out, consumed_options({pending.data(), used}, flags_seen), n);
    o.consumed += used;
    o.sent.insert(o.sent.end(), out.begin(), out.end());
    pending.erase(pending.begin(), pending.begin() + static_cast<std::ptrdiff_t>(used));
    if (haggling(n.state())) check_leftover(pending, n.state());
  }
  // Nothing more arrives, or the state says stop (kTransmission, kClose, or
  // one this target does not know, such as a TLS upgrade): either way
  // feeding changes nothing any more.
  pending.insert(pending.end(), stream.begin() + pos, stream.end());
  out.clear();
  const State s = n.state();
  FUZZ_CHECK(n.feed(pending, out) == 0);
  FUZZ_CHECK(out.empty() && n.state() == s);
  return o;
}

}  // namespace
}  // namespace shadowd::nbd

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace shadowd::nbd;
  if (size == 0) return 0;
  const std::span<const uint8_t> stream(data + 1, size - 1);
  Negotiator n(registry());
  const Outcome o = negotiate(n, stream, shadowd::fuzz::Chunker(data[0]));

  // Where the stream was cut must not matter.
  Negotiator whole(registry());
  std::vector<uint8_t> sent;
  FUZZ_CHECK(whole.feed(stream, sent) == o.consumed && sent == o.sent && whole.state() == n.state());
  if (n.state() != State::kTransmission) return 0;
  FUZZ_CHECK(whole.selected() == n.selected() && whole.structured_replies() == n.structured_replies());
  FUZZ_CHECK(whole.base_allocation() == n.base_allocation() && whole.shadowd_source() == n.shadowd_source());
  check_selection(n);
  serve_requests(stream.subspan(o.consumed), n);
  return 0;
}
