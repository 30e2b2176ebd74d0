#include "nbd/negotiate.h"

#include <string_view>

namespace shadowd::nbd {
namespace {

// Bounds-checked reader over an option's data.
class Reader {
 public:
  explicit Reader(std::span<const uint8_t> d) : d_(d) {}
  bool u16(uint16_t& v) {
    if (left() < 2) return false;
    v = get16(d_.data() + pos_);
    pos_ += 2;
    return true;
  }
  bool u32(uint32_t& v) {
    if (left() < 4) return false;
    v = get32(d_.data() + pos_);
    pos_ += 4;
    return true;
  }
  bool str(uint32_t len, std::string& s) {
    if (left() < len) return false;
    s.assign(reinterpret_cast<const char*>(d_.data() + pos_), len);
    pos_ += len;
    return true;
  }
  // A u32 length followed by that many bytes, at most kMaxStringBytes.
  bool lstr(std::string& s) {
    uint32_t len;
    return u32(len) && len <= kMaxStringBytes && str(len, s);
  }
  size_t left() const { return d_.size() - pos_; }

 private:
  std::span<const uint8_t> d_;
  size_t pos_ = 0;
};

void put_info_export(std::vector<uint8_t>& p, const Export& e) {
  p.resize(12);
  put16(p.data(), kInfoExport);
  put64(p.data() + 2, e.size_bytes());
  put16(p.data() + 10, e.transmission_flags());
}

std::vector<uint8_t> info_string(uint16_t type, const std::string& s) {
  std::vector<uint8_t> p(2 + s.size());
  put16(p.data(), type);
  std::memcpy(p.data() + 2, s.data(), s.size());
  return p;
}

std::vector<uint8_t> info_block_size(const Export& e) {
  std::vector<uint8_t> p(14);
  put16(p.data(), kInfoBlockSize);
  put32(p.data() + 2, e.min_block_bytes);
  put32(p.data() + 6, e.preferred_block_bytes);
  put32(p.data() + 10, e.max_payload_bytes);
  return p;
}

// The meta contexts this server offers, in the order they are listed.
struct ContextDef {
  std::string_view name;
  uint32_t id;
  bool MetaContexts::*selected;
};
constexpr ContextDef kContexts[] = {
    {kBaseAllocation, kBaseAllocationId, &MetaContexts::base_allocation},
    {kShadowdSource, kShadowdSourceId, &MetaContexts::shadowd_source},
};

bool offered(const ContextDef& c, const Export& e) {
  return c.id != kShadowdSourceId || e.backend->info().can_sources;
}

// Whether query `q` names context `c`: exactly, or, in LIST only, as the
// wildcard of its namespace ("base:", "shadowd:"). proto.md: the empty leaf
// name SHOULD NOT select anything in SET.
bool matches(std::string_view q, const ContextDef& c, bool list) {
  return q == c.name || (list && q == c.name.substr(0, c.name.find(':') + 1));
}

}  // namespace

void append_option_reply(std::vector<uint8_t>& out, uint32_t opt, uint32_t type,
                         std::span<const uint8_t> payload) {
  const size_t at = out.size();
  out.resize(at + kOptReplyHeaderSize + payload.size());
  uint8_t* p = out.data() + at;
  put64(p, kOptReplyMagic);
  put32(p + 8, opt);
  put32(p + 12, type);
  put32(p + 16, static_cast<uint32_t>(payload.size()));
  if (!payload.empty()) std::memcpy(p + kOptReplyHeaderSize, payload.data(), payload.size());
}

std::vector<uint8_t> Negotiator::greeting() {
  std::vector<uint8_t> g(18);
  put64(g.data(), kNbdMagic);
  put64(g.data() + 8, kIHaveOpt);
  put16(g.data() + 16, kFlagFixedNewstyle | kFlagNoZeroes);
  return g;
}

size_t Negotiator::feed(std::span<const uint8_t> in, std::vector<uint8_t>& out) {
  size_t used = 0;
  while (state_ == State::kClientFlags || state_ == State::kOptions) {
    std::span<const uint8_t> rest = in.subspan(used);
    if (state_ == State::kClientFlags) {
      if (rest.size() < 4) break;
      const uint32_t flags = get32(rest.data());
      used += 4;
      if (flags & ~(kClientFixedNewstyle | kClientNoZeroes)) {
        close("unknown client flags");
        break;
      }
      fixed_newstyle_ = flags & kClientFixedNewstyle;
      no_zeroes_ = flags & kClientNoZeroes;
      state_ = State::kOptions;
      continue;
    }
    if (rest.size() < kOptionHeaderSize) break;
    if (get64(rest.data()) != kIHaveOpt) {
      close("bad option magic");
      break;
    }
    const uint32_t opt = get32(rest.data() + 8);
    const uint32_t len = get32(rest.data() + 12);
    if (len > kMaxOptionBytes) {
      close("option too long");
      break;
    }
    if (rest.size() < kOptionHeaderSize + len) break;
    used += kOptionHeaderSize + len;
    handle_option(opt, rest.subspan(kOptionHeaderSize, len), out);
  }
  return used;
}

void Negotiator::tls_started() {
  tls_active_ = true;
  structured_ = false;
  meta_ = {};
  meta_export_.clear();
  state_ = State::kOptions;
}

void Negotiator::handle_option(uint32_t opt, std::span<const uint8_t> data,
                               std::vector<uint8_t>& out) {
  const bool tls_required = tls_ == TlsPolicy::kRequire && !tls_active_;
  if (opt == kOptExportName) {
    // It cannot be answered with an error: the connection closes, with no
    // word of the export.
    if (tls_required) return close("EXPORT_NAME without TLS (TLS is required)");
    return handle_export_name(data, out);
  }
  if (!fixed_newstyle_) {
    // Plain newstyle clients may only send EXPORT_NAME.
    return close("option " + std::to_string(opt) + " without fixed newstyle");
  }
  if (opt == kOptStartTls) return handle_starttls(data, out);
  if (tls_required && opt != kOptAbort) {
    static constexpr std::string_view kMsg = "TLS is required: send NBD_OPT_STARTTLS first";
    return append_option_reply(out, opt, kRepErrTlsReqd,
                               {reinterpret_cast<const uint8_t*>(kMsg.data()), kMsg.size()});
  }
  switch (opt) {
    case kOptAbort:
      append_option_reply(out, opt, kRepAck);
      return close("client aborted");
    case kOptInfo:
    case kOptGo:
      return handle_info_go(opt, data, out);
    case kOptList:
      return handle_list(opt, data, out);
    case kOptStructuredReply:
      if (!data.empty()) return append_option_reply(out, opt, kRepErrInvalid);
      structured_ = true;
      return append_option_reply(out, opt, kRepAck);
    case kOptListMetaContext:
    case kOptSetMetaContext:
      return handle_meta(opt, data, out);
    default:
      // EXTENDED_HEADERS, PEEK_EXPORT and anything unknown.
      return append_option_reply(out, opt, kRepErrUnsup);
  }
}

void Negotiator::handle_starttls(std::span<const uint8_t> data, std::vector<uint8_t>& out) {
  if (tls_ == TlsPolicy::kOff) {
    static constexpr std::string_view kMsg = "TLS is not enabled on this server";
    return append_option_reply(out, kOptStartTls, kRepErrPolicy,
                               {reinterpret_cast<const uint8_t*>(kMsg.data()), kMsg.size()});
  }
  if (tls_active_ || !data.empty()) return append_option_reply(out, kOptStartTls, kRepErrInvalid);
  append_option_reply(out, kOptStartTls, kRepAck);
  state_ = State::kStartTls;
}

void Negotiator::handle_export_name(std::span<const uint8_t> data, std::vector<uint8_t>& out) {
  std::string name(reinterpret_cast<const char*>(data.data()), data.size());
  auto e = registry_.find(name);
  if (!e) return close("unknown export '" + name + "' requested with EXPORT_NAME");
  const size_t at = out.size();
  out.resize(at + 10 + (no_zeroes_ ? 0 : kExportNameZeroes), 0);
  put64(out.data() + at, e->size_bytes());
  put16(out.data() + at + 8, e->transmission_flags());
  select(std::move(e));
}

void Negotiator::handle_info_go(uint32_t opt, std::span<const uint8_t> data,
                                std::vector<uint8_t>& out) {
  Reader r(data);
  std::string name;
  uint16_t nreq = 0;
  if (!r.lstr(name) || !r.u16(nreq) || r.left() != size_t{nreq} * 2) {
    return append_option_reply(out, opt, kRepErrInvalid);
  }
  auto e = registry_.find(name);
  if (!e) return append_option_reply(out, opt, kRepErrUnknown);
  std::vector<uint8_t> p;
  for (uint16_t i = 0; i < nreq; ++i) {
    uint16_t type = 0;
    r.u16(type);
    if (type == kInfoName) append_option_reply(out, opt, kRepInfo, info_string(kInfoName, e->name));
    if (type == kInfoDescription && !e->description.empty()) {
      append_option_reply(out, opt, kRepInfo, info_string(kInfoDescription, e->description));
    }
    if (type == kInfoBlockSize) append_option_reply(out, opt, kRepInfo, info_block_size(*e));
  }
  put_info_export(p, *e);
  append_option_reply(out, opt, kRepInfo, p);
  append_option_reply(out, opt, kRepAck);
  if (opt == kOptGo) select(std::move(e));
}

// Enter transmission with `e`; contexts selected for another export lapse.
void Negotiator::select(std::shared_ptr<Export> e) {
  if (meta_export_ != e->name) meta_ = {};
  selected_ = std::move(e);
  state_ = State::kTransmission;
}

void Negotiator::handle_list(uint32_t opt, std::span<const uint8_t> data,
                             std::vector<uint8_t>& out) {
  if (!data.empty()) return append_option_reply(out, opt, kRepErrInvalid);
  for (const auto& e : registry_.list()) {
    std::vector<uint8_t> p(4 + e->name.size() + e->description.size());
    put32(p.data(), static_cast<uint32_t>(e->name.size()));
    std::memcpy(p.data() + 4, e->name.data(), e->name.size());
    std::memcpy(p.data() + 4 + e->name.size(), e->description.data(), e->description.size());
    append_option_reply(out, opt, kRepServer, p);
  }
  append_option_reply(out, opt, kRepAck);
}

void Negotiator::handle_meta(uint32_t opt, std::span<const uint8_t> data,
                             std::vector<uint8_t>& out) {
  const bool set = opt == kOptSetMetaContext;
  if (set) meta_ = {};  // SET replaces the selection, even on failure
  if (!structured_) return append_option_reply(out, opt, kRepErrInvalid);
  Reader r(data);
  std::string name;
  uint32_t nq = 0;
  if (!r.lstr(name) || !r.u32(nq)) return append_option_reply(out, opt, kRepErrInvalid);
  std::vector<std::string> queries;
  for (uint32_t i = 0; i < nq; ++i) {
    std::string q;
    if (!r.lstr(q)) return append_option_reply(out, opt, kRepErrInvalid);
    queries.push_back(std::move(q));
  }
  if (r.left() != 0) return append_option_reply(out, opt, kRepErrInvalid);
  auto e = registry_.find(name);
  if (!e) return append_option_reply(out, opt, kRepErrUnknown);
  MetaContexts chosen;
  for (const ContextDef& c : kContexts) {
    if (!offered(c, *e)) continue;  // its queries are unknown names here: ignored
    // LIST with no query lists everything; SET with none selects nothing.
    bool match = queries.empty() && !set;
    for (const std::string& q : queries) match = match || matches(q, c, !set);
    if (!match) continue;
    std::vector<uint8_t> p(4 + c.name.size());
    put32(p.data(), set ? c.id : 0);
    std::memcpy(p.data() + 4, c.name.data(), c.name.size());
    append_option_reply(out, opt, kRepMetaContext, p);
    chosen.*c.selected = true;
  }
  if (set) {
    meta_ = chosen;
    meta_export_ = e->name;
  }
  append_option_reply(out, opt, kRepAck);
}

}  // namespace shadowd::nbd
