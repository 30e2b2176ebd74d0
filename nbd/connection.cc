#include "nbd/connection.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>

#include <spdlog/spdlog.h>

#include "core/clock.h"

namespace shadowd::nbd {
namespace {

constexpr size_t kInBufBytes = 256 * 1024;
constexpr size_t kDirectRecvMin = 64 * 1024;  // payload left at which we recv in place
constexpr size_t kBufAlign = 4096;
constexpr size_t kKeepBufMax = 4u << 20;  // larger buffers are freed, not pooled
constexpr size_t kMaxIov = 128;
constexpr uint32_t kMaxExtents = 1024;  // per BLOCK_STATUS reply
constexpr size_t kTlsRxBytes = 256 * 1024;      // one recv of ciphertext
constexpr size_t kTlsInMax = 1u << 20;          // ciphertext buffered before recv pauses
constexpr size_t kTlsOutMax = 1u << 20;         // ciphertext encrypted ahead of the socket
constexpr size_t kTlsStageBytes = 16 * 1024;    // replies gathered into one record

TlsPolicy tls_policy(const TlsContext* tls) {
  if (tls == nullptr) return TlsPolicy::kOff;
  return tls->mode() == TlsMode::kRequire ? TlsPolicy::kRequire : TlsPolicy::kOn;
}

StatOp stat_op(uint16_t type) {
  switch (type) {
    case kCmdRead: return kStatRead;
    case kCmdWrite: return kStatWrite;
    case kCmdFlush: return kStatFlush;
    case kCmdTrim: return kStatTrim;
    case kCmdWriteZeroes: return kStatWriteZeroes;
    case kCmdCache: return kStatCache;
    case kCmdBlockStatus: return kStatBlockStatus;
    default: return kStatOther;
  }
}

struct FreeDeleter {
  void operator()(uint8_t* p) const { std::free(p); }
};

// The backend's source flags are the shadowd:source descriptor flags.
static_assert(IoBackend::kSourceVersion == kSourceStateVersion);
static_assert(IoBackend::kSourceJournal == kSourceStateJournal);

// One run of equal status, as a backend query reports it.
struct StatusRun {
  uint64_t length;
  uint32_t flags;
};

// The descriptors of one context for BLOCK_STATUS request `h`: from its
// offset, capped at its end, at most one with REQ_ONE, equal neighbours
// merged (a backend may report one run in pieces). `query(offset, max_len)`
// returns a Result<StatusRun>. A failing first query is the reply's error; a
// later one shortens the list, which proto.md allows (at least one
// descriptor is always sent).
template <typename Query>
Result<std::vector<Extent>> collect_extents(const Request& h, Query query) {
  std::vector<Extent> extents;
  uint64_t off = h.offset;
  const uint64_t end = h.offset + h.length;
  const size_t max = (h.flags & kCmdFlagReqOne) ? 1 : kMaxExtents;
  while (off < end) {
    Result<StatusRun> run = query(off, end - off);
    if (!run) {
      if (extents.empty()) return run.status();
      break;
    }
    const uint64_t len = std::min(run->length, end - off);  // fits: end - off <= h.length
    if (len == 0) break;
    if (!extents.empty() && extents.back().flags == run->flags) {
      extents.back().length += static_cast<uint32_t>(len);
    } else if (extents.size() < max) {
      extents.push_back({static_cast<uint32_t>(len), run->flags});
    } else {
      break;
    }
    off += len;
  }
  if (extents.empty()) return Status::io_error("block status found no extent");
  return extents;
}

// The descriptors of context `context_id` for BLOCK_STATUS request `h`.
Result<std::vector<Extent>> context_extents(IoBackend& b, uint32_t context_id, const Request& h) {
  if (context_id == kShadowdSourceId) {
    return collect_extents(h, [&b](uint64_t off, uint64_t max_len) -> Result<StatusRun> {
      auto ext = b.source_at(off, max_len);
      if (!ext) return ext.status();
      return StatusRun{ext->length, ext->flags};
    });
  }
  return collect_extents(h, [&b](uint64_t off, uint64_t max_len) -> Result<StatusRun> {
    auto ext = b.extent_at(off, max_len);
    if (!ext) return ext.status();
    return StatusRun{ext->length, ext->is_hole ? (kStateHole | kStateZero) : 0};
  });
}

}  // namespace

struct Connection::Req final : public BlockOp {
  Connection* conn = nullptr;
  Request hdr;
  uint64_t start_ns = 0;
  std::unique_ptr<uint8_t, FreeDeleter> mem;
  size_t mem_cap = 0;
  uint64_t held_bytes = 0;  // counted in inflight_bytes_
  // The reply: a header (inline) or a built chunk, then optional data.
  uint8_t head[kOffsetDataHeaderSize];
  size_t head_len = 0;
  std::vector<uint8_t> chunk;  // error and block-status replies
  const uint8_t* data = nullptr;
  size_t data_len = 0;
  size_t sent = 0;

  void on_done(Status st) override { conn->on_req_done(this, st); }
  size_t reply_len() const { return (chunk.empty() ? head_len : chunk.size()) + data_len; }
  // Append the unsent part of the reply to `iov`.
  void add_iov(std::vector<iovec>& iov) const {
    const uint8_t* h = chunk.empty() ? head : chunk.data();
    const size_t hl = chunk.empty() ? head_len : chunk.size();
    if (sent < hl) iov.push_back({const_cast<uint8_t*>(h + sent), hl - sent});
    const size_t dsent = sent > hl ? sent - hl : 0;
    if (data_len > dsent) iov.push_back({const_cast<uint8_t*>(data + dsent), data_len - dsent});
  }
};

class Connection::RecvOp final : public IoCompletion {
 public:
  explicit RecvOp(Connection* c) : c_(c) {}
  void on_complete(int res, uint32_t) override { c_->on_recv(res); }

 private:
  Connection* c_;
};

class Connection::SendOp final : public IoCompletion {
 public:
  explicit SendOp(Connection* c) : c_(c) {}
  void on_complete(int res, uint32_t) override { c_->on_sent(res); }

 private:
  Connection* c_;
};

Connection::Connection(EventLoop& loop, int fd, std::string peer, const ExportRegistry& registry,
                       const ConnectionLimits& limits, StatsShard* stats, ClosedFn on_closed,
                       std::shared_ptr<const TlsContext> tls)
    : loop_(loop),
      fd_(fd),
      peer_(std::move(peer)),
      registry_(registry),
      limits_(limits),
      stats_(stats),
      on_closed_(std::move(on_closed)),
      tls_ctx_(std::move(tls)),
      negotiator_(registry, tls_policy(tls_ctx_.get())),
      recv_op_(std::make_unique<RecvOp>(this)),
      send_op_(std::make_unique<SendOp>(this)),
      in_(kInBufBytes) {}

Connection::~Connection() {
  if (fd_ >= 0) ::close(fd_);
}

void Connection::start() {
  spdlog::debug("{}: connected", peer_);
  send_raw(Negotiator::greeting());
  arm_recv();
}

void Connection::shutdown() {
  begin_drain();
  maybe_close();  // may delete this
}

void Connection::begin_drain() {
  if (phase_ == Phase::kClosed || phase_ == Phase::kDraining) return;
  phase_ = Phase::kDraining;
  ::shutdown(fd_, SHUT_RD);  // wakes a pending recv with 0
}

// ---------------------------------------------------------------- input

// Room at the end of in_: rewind it when empty, compact it when the
// unprocessed bytes reach its end.
void Connection::make_input_room() {
  if (in_begin_ == in_end_) in_begin_ = in_end_ = 0;
  if (in_end_ == in_.size() && in_begin_ > 0) {
    std::memmove(in_.data(), in_.data() + in_begin_, in_end_ - in_begin_);
    in_end_ -= in_begin_;
    in_begin_ = 0;
  }
}

void Connection::arm_recv() {
  if (recv_pending_ || read_eof_ || phase_ == Phase::kDraining || phase_ == Phase::kClosed) {
    return;
  }
  if (tls_) {
    // Back-pressure: what was received is decrypted first.
    if (tls_->buffered_in() >= kTlsInMax) return;
    io_uring_prep_recv(loop_.sqe_for(recv_op_.get()), fd_, tls_rx_.data(), tls_rx_.size(), 0);
    recv_tls_ = true;
    recv_pending_ = true;
    return;
  }
  // STARTTLS acknowledged: nothing more is read in the clear.
  if (negotiator_.state() == Negotiator::State::kStartTls) return;
  if (!payload_direct_) {
    make_input_room();
    // Full of unprocessed requests (back-pressure): resume when replies go out.
    if (in_end_ == in_.size()) return;
  }
  io_uring_sqe* sqe = loop_.sqe_for(recv_op_.get());
  recv_tls_ = false;
  recv_direct_ = payload_direct_;
  if (payload_direct_) {
    uint8_t* dst = payload_req_->buf + payload_got_;
    io_uring_prep_recv(sqe, fd_, dst, payload_req_->hdr.length - payload_got_, MSG_WAITALL);
  } else {
    io_uring_prep_recv(sqe, fd_, in_.data() + in_end_, in_.size() - in_end_, 0);
  }
  recv_pending_ = true;
}

void Connection::on_recv(int res) {
  recv_pending_ = false;
  if (res == -EAGAIN || res == -EINTR) {
    arm_recv();
    return;
  }
  if (res <= 0) return on_eof(res);
  if (recv_tls_) {
    tls_->feed(tls_rx_.data(), static_cast<size_t>(res));
    tls_input();
    arm_recv();
    maybe_close();
    return;
  }
  if (recv_direct_) {
    payload_got_ += static_cast<uint64_t>(res);
    payload_direct_ = false;
  } else {
    in_end_ += static_cast<size_t>(res);
  }
  process_input();
  arm_recv();
  maybe_close();
}

// The peer closed (0), or the socket failed (< 0).
void Connection::on_eof(int res) {
  read_eof_ = true;
  if (res < 0 && res != -ECONNRESET) spdlog::debug("{}: recv: {}", peer_, std::strerror(-res));
  if (payload_req_ != nullptr || in_end_ != in_begin_) {
    spdlog::debug("{}: disconnected mid-request", peer_);
  }
  if (payload_req_ != nullptr) {  // never write a partial payload
    release(payload_req_);
    payload_req_ = nullptr;
    payload_direct_ = false;
  }
  if (skip_req_ != nullptr) release(std::exchange(skip_req_, nullptr));
  begin_drain();
  maybe_close();
}

// ---------------------------------------------------------------- TLS

// After the STARTTLS acknowledgement has left in the clear (and no recv
// into in_ is pending), the TLS session takes over the socket.
void Connection::maybe_start_tls() {
  if (tls_ || negotiator_.state() != Negotiator::State::kStartTls) return;
  if (send_pending_ || !raw_out_.empty() || recv_pending_) return;
  auto s = tls_ctx_->new_session();
  if (!s) return fail("TLS: " + s.status().message());
  tls_ = std::move(*s);
  tls_handshaking_ = true;
  tls_rx_.resize(kTlsRxBytes);
  // A client may send its hello right behind STARTTLS.
  if (in_end_ > in_begin_) tls_->feed(in_.data() + in_begin_, in_end_ - in_begin_);
  in_begin_ = in_end_ = 0;
  tls_input();
  arm_recv();
}

void Connection::tls_input() {
  if (tls_handshaking_) {
    std::string err;
    switch (tls_->handshake(err)) {
      case TlsSession::Step::kAgain:
        kick_send();
        return;
      case TlsSession::Step::kFailed:
        stats_->tls_handshake_failures.fetch_add(1, std::memory_order_relaxed);
        spdlog::warn("{}: TLS handshake failed: {}", peer_, err);
        tls_bye_ = true;  // no close_notify without a session
        kick_send();      // the alert
        return begin_drain();
      case TlsSession::Step::kDone:
        stats_->tls_handshakes.fetch_add(1, std::memory_order_relaxed);
        tls_handshaking_ = false;
        negotiator_.tls_started();
        spdlog::debug("{}: TLS: {}", peer_, tls_->describe());
        break;
    }
  }
  while (phase_ == Phase::kHandshake || phase_ == Phase::kTransmission) {
    make_input_room();
    if (in_end_ == in_.size()) break;  // full: process_input() makes room later
    std::string err;
    const long n = tls_->read(in_.data() + in_end_, in_.size() - in_end_, err);
    if (n == TlsSession::kAgain) break;
    if (n == TlsSession::kError) {
      fail("TLS: " + err);
      break;
    }
    if (n == 0) {  // close_notify
      tls_bye_ = true;
      on_eof(0);
      return;
    }
    in_end_ += static_cast<size_t>(n);
    process_input();
  }
  kick_send();  // alerts and key updates the session queued
}

// Encrypt raw_out_ and queued replies into the session's wire buffer (up to
// kTlsOutMax); the requests are released, their bytes are in the records.
bool Connection::tls_encrypt() {
  std::string err;
  std::vector<uint8_t>& st = tls_stage_;
  st.clear();
  auto flush = [&] {
    const bool ok = st.empty() || tls_->write(st.data(), st.size(), err);
    st.clear();
    return ok;
  };
  bool ok = true;
  if (!raw_out_.empty()) {
    ok = tls_->write(raw_out_.data(), raw_out_.size(), err);
    raw_out_.clear();
  }
  while (ok && !sendq_.empty() && tls_->wire().size() < kTlsOutMax) {
    Req* r = sendq_.front();
    sendq_.pop_front();
    const uint8_t* h = r->chunk.empty() ? r->head : r->chunk.data();
    const size_t hl = r->chunk.empty() ? r->head_len : r->chunk.size();
    st.insert(st.end(), h, h + hl);
    if (r->data_len <= kTlsStageBytes) {
      st.insert(st.end(), r->data, r->data + r->data_len);
    } else {
      ok = flush() && tls_->write(r->data, r->data_len, err);
    }
    release(r);
    if (ok && st.size() >= kTlsStageBytes) ok = flush();
  }
  if (ok) ok = flush();
  if (!ok) spdlog::warn("{}: TLS: {}", peer_, err);
  return ok;
}

void Connection::process_input() {
  if (phase_ == Phase::kHandshake) return process_handshake();
  while (phase_ == Phase::kTransmission) {
    if (payload_req_ != nullptr) {
      take_payload();
      if (payload_req_ != nullptr) return;  // waiting for more payload
      continue;
    }
    if (skip_bytes_ > 0) {
      const size_t n = std::min<uint64_t>(skip_bytes_, in_end_ - in_begin_);
      in_begin_ += n;
      skip_bytes_ -= n;
      if (skip_bytes_ > 0) return;
      Req* r = std::exchange(skip_req_, nullptr);
      reply(r, skip_error_, "request refused");
      continue;
    }
    if (inflight_ >= limits_.max_inflight || inflight_bytes_ >= limits_.max_inflight_bytes) {
      return;  // back-pressure: on_req_done() resumes
    }
    if (!process_request_header()) return;
  }
}

void Connection::process_handshake() {
  std::vector<uint8_t> out;
  const size_t used = negotiator_.feed(
      std::span<const uint8_t>(in_.data() + in_begin_, in_end_ - in_begin_), out);
  in_begin_ += used;
  if (!out.empty()) send_raw(std::move(out));
  switch (negotiator_.state()) {
    case Negotiator::State::kTransmission:
      export_ = negotiator_.selected();
      ctx_.export_size = export_->size_bytes();
      ctx_.read_only = export_->read_only;
      ctx_.structured = negotiator_.structured_replies();
      ctx_.base_allocation = negotiator_.base_allocation();
      ctx_.shadowd_source = negotiator_.shadowd_source();
      ctx_.max_payload_bytes = std::min(limits_.max_payload_bytes, export_->max_payload_bytes);
      phase_ = Phase::kTransmission;
      spdlog::debug("{}: serving export '{}'{}", peer_, export_->name,
                    ctx_.structured ? " (structured replies)" : "");
      return process_input();
    case Negotiator::State::kStartTls:
      return maybe_start_tls();
    case Negotiator::State::kClose:
      spdlog::debug("{}: handshake ended: {}", peer_, negotiator_.close_reason());
      return begin_drain();
    default:
      return;
  }
}

// Parse and start one request. Returns false when more input is needed or
// the connection stopped taking requests.
bool Connection::process_request_header() {
  Request hdr;
  const ParseStatus ps = parse_request(
      std::span<const uint8_t>(in_.data() + in_begin_, in_end_ - in_begin_), hdr);
  if (ps == ParseStatus::kNeedMore) return false;
  if (ps == ParseStatus::kBadMagic) {
    fail("bad request magic");
    return false;
  }
  in_begin_ += kRequestSize;
  const Verdict v = check_request(hdr, ctx_);
  if (spdlog::should_log(spdlog::level::trace)) {
    spdlog::trace("{}: request type={} flags={:#x} offset={} length={} -> error {}", peer_,
                  hdr.type, hdr.flags, hdr.offset, hdr.length, v.error);
  }
  if (v.close) {
    fail("request payload of " + std::to_string(hdr.length) + " bytes is too large");
    return false;
  }
  if (v.disconnect) {
    spdlog::debug("{}: client sent NBD_CMD_DISC", peer_);
    begin_drain();
    return false;
  }
  if (v.error != 0) {
    Req* r = new_req(hdr, 0);
    if (v.has_payload && hdr.length > 0) {
      // Reply only once the payload is consumed: clients match replies to
      // requests they have finished sending.
      skip_bytes_ = hdr.length;
      skip_req_ = r;
      skip_error_ = v.error;
      return true;
    }
    reply(r, v.error, "request refused");
    return true;
  }
  const bool data = hdr.type == kCmdRead || hdr.type == kCmdWrite;
  Req* r = new_req(hdr, data ? hdr.length : 0);
  if (hdr.type == kCmdWrite) {
    payload_req_ = r;
    payload_got_ = 0;
    return true;
  }
  dispatch(r);
  return true;
}

// Move the payload of payload_req_ from the input buffer; when much is
// still missing, the next recv lands in the request's buffer directly.
void Connection::take_payload() {
  Req* r = payload_req_;
  const size_t avail = in_end_ - in_begin_;
  const size_t n = std::min<uint64_t>(avail, r->hdr.length - payload_got_);
  std::memcpy(r->buf + payload_got_, in_.data() + in_begin_, n);
  in_begin_ += n;
  payload_got_ += n;
  const uint64_t left = r->hdr.length - payload_got_;
  // Decided afresh on every call: a recv into the input buffer that was
  // already pending when this payload began (armed before back-pressure
  // lifted) can complete it, and a stale flag would aim the next recv at a
  // request that is gone.
  payload_direct_ = left >= kDirectRecvMin && !tls_;
  if (left == 0) {
    payload_req_ = nullptr;
    dispatch(r);
  }
}

// ---------------------------------------------------------------- requests

Connection::Req* Connection::new_req(const Request& hdr, uint64_t buf_bytes) {
  Req* r;
  if (!free_reqs_.empty()) {
    r = free_reqs_.back();
    free_reqs_.pop_back();
  } else {
    all_reqs_.push_back(std::make_unique<Req>());
    r = all_reqs_.back().get();
    r->conn = this;
  }
  r->hdr = hdr;
  r->start_ns = monotonic_ns();
  r->chunk.clear();
  r->data = nullptr;
  r->data_len = 0;
  r->sent = 0;
  r->head_len = 0;
  r->buf = nullptr;
  if (buf_bytes > 0) {
    if (r->mem_cap < buf_bytes) {
      const size_t cap = (buf_bytes + kBufAlign - 1) / kBufAlign * kBufAlign;
      r->mem.reset(static_cast<uint8_t*>(std::aligned_alloc(kBufAlign, cap)));
      r->mem_cap = r->mem ? cap : 0;
    }
    r->buf = r->mem.get();
  }
  r->held_bytes = buf_bytes;
  inflight_bytes_ += buf_bytes;
  ++inflight_;
  return r;
}

void Connection::dispatch(Req* r) {
  const Request& h = r->hdr;
  if (h.type == kCmdBlockStatus) return block_status(r);
  if ((h.type == kCmdRead || h.type == kCmdWrite) && r->buf == nullptr) {
    return reply(r, kEnomem, "out of memory");
  }
  r->offset = h.offset;
  r->length = h.length;
  r->flags = 0;
  if (h.flags & kCmdFlagFua) r->flags |= kFua;
  if (h.flags & kCmdFlagNoHole) r->flags |= kNoHole;
  switch (h.type) {
    case kCmdRead: r->kind = BlockOpKind::kRead; break;
    case kCmdWrite: r->kind = BlockOpKind::kWrite; break;
    case kCmdFlush: r->kind = BlockOpKind::kFlush; break;
    case kCmdTrim: r->kind = BlockOpKind::kTrim; break;
    case kCmdWriteZeroes: r->kind = BlockOpKind::kWriteZeroes; break;
    case kCmdCache: r->kind = BlockOpKind::kCache; break;
    default: return reply(r, kEinval, "unknown command");
  }
  export_->backend->submit(loop_, r);
}

// One BLOCK_STATUS chunk per selected context, DONE on the last.
void Connection::block_status(Req* r) {
  const Request& h = r->hdr;
  uint32_t ids[2];
  size_t n = 0;
  if (ctx_.base_allocation) ids[n++] = kBaseAllocationId;
  if (ctx_.shadowd_source) ids[n++] = kShadowdSourceId;
  if (n == 0) return reply(r, kEinval, "no meta context selected");  // check_request's job
  std::vector<uint8_t> chunks;
  for (size_t i = 0; i < n; ++i) {
    auto extents = context_extents(*export_->backend, ids[i], h);
    if (!extents) {
      const Status& st = extents.status();
      return reply(r, to_nbd_error(st), "block status: " + st.message());
    }
    const std::vector<uint8_t> c = encode_block_status(h.cookie, ids[i], *extents, i + 1 == n);
    chunks.insert(chunks.end(), c.begin(), c.end());
  }
  r->chunk = std::move(chunks);
  stats_->add(kStatBlockStatus, 0, false, monotonic_ns() - r->start_ns);
  sendq_.push_back(r);
  kick_send();
}

void Connection::on_req_done(Req* r, const Status& st) {
  if (!st) {
    spdlog::debug("{}: {} at {}+{} failed: {}", peer_, op_name(r->kind), r->hdr.offset,
                  r->hdr.length, st.to_string());
    reply(r, to_nbd_error(st), st.message());
  } else {
    reply(r, 0);
  }
  maybe_close();
}

void Connection::reply(Req* r, uint32_t error, const std::string& msg) {
  const Request& h = r->hdr;
  const bool moves_data = h.type == kCmdRead || h.type == kCmdWrite;
  stats_->add(stat_op(h.type), error == 0 && moves_data ? h.length : 0, error != 0,
              monotonic_ns() - r->start_ns);
  if (error == 0 && h.type == kCmdRead) {
    r->data = r->buf;
    r->data_len = h.length;
    if (ctx_.structured) {
      encode_read_chunk(h.cookie, h.offset, h.length, r->head);
      r->head_len = kOffsetDataHeaderSize;
    } else {
      encode_simple_reply(h.cookie, 0, r->head);
      r->head_len = kSimpleReplySize;
    }
  } else if (!ctx_.structured) {
    encode_simple_reply(h.cookie, error, r->head);
    r->head_len = kSimpleReplySize;
  } else if (error != 0) {
    r->chunk = encode_error_chunk(h.cookie, error, msg);
  } else {
    encode_chunk_header(h.cookie, kReplyFlagDone, kReplyTypeNone, 0, r->head);
    r->head_len = kChunkHeaderSize;
  }
  sendq_.push_back(r);
  kick_send();
}

void Connection::release(Req* r) {
  --inflight_;
  inflight_bytes_ -= r->held_bytes;
  r->held_bytes = 0;
  if (r->mem_cap > kKeepBufMax) {
    r->mem.reset();
    r->mem_cap = 0;
  }
  r->chunk.clear();
  r->chunk.shrink_to_fit();
  free_reqs_.push_back(r);
}

// ---------------------------------------------------------------- output

void Connection::send_raw(std::vector<uint8_t> bytes) {
  raw_out_.insert(raw_out_.end(), bytes.begin(), bytes.end());
  kick_send();
}

void Connection::kick_send() {
  if (send_pending_ || phase_ == Phase::kClosed) return;
  if (tls_) {
    if (!tls_handshaking_ && !tls_encrypt()) {
      drop_output();
      read_eof_ = true;
      begin_drain();
      ::shutdown(fd_, SHUT_RDWR);
      return;
    }
    if (tx_off_ == tx_.size()) {
      tx_.clear();
      tx_off_ = 0;
      std::swap(tx_, tls_->wire());
    }
    if (tx_.empty()) return;
    io_uring_prep_send(loop_.sqe_for(send_op_.get()), fd_, tx_.data() + tx_off_, tx_.size() - tx_off_,
                       MSG_NOSIGNAL);
    send_pending_ = true;
    return;
  }
  iov_.clear();
  if (!raw_out_.empty()) {
    iov_.push_back({raw_out_.data(), raw_out_.size()});
  }
  while (!sendq_.empty() && iov_.size() + 2 <= kMaxIov) {
    Req* r = sendq_.front();
    sendq_.pop_front();
    r->add_iov(iov_);
    sending_.push_back(r);
  }
  if (iov_.empty()) return;
  std::memset(&msg_, 0, sizeof msg_);
  msg_.msg_iov = iov_.data();
  msg_.msg_iovlen = iov_.size();
  io_uring_prep_sendmsg(loop_.sqe_for(send_op_.get()), fd_, &msg_, MSG_NOSIGNAL);
  send_pending_ = true;
}

void Connection::on_sent(int res) {
  send_pending_ = false;
  if (res == -EAGAIN || res == -EINTR) res = 0;
  if (res < 0) {
    spdlog::debug("{}: send: {}", peer_, std::strerror(-res));
    // The peer is gone: drop every reply; in-flight ops still complete.
    drop_output();
    read_eof_ = true;
    begin_drain();
    ::shutdown(fd_, SHUT_RDWR);
    maybe_close();
    return;
  }
  if (tls_) {
    tx_off_ += static_cast<size_t>(res);
    kick_send();
    if (phase_ == Phase::kTransmission) tls_input();  // replies released: room for requests
    arm_recv();
    maybe_close();
    return;
  }
  size_t n = static_cast<size_t>(res);
  const size_t raw = std::min(n, raw_out_.size());
  raw_out_.erase(raw_out_.begin(), raw_out_.begin() + static_cast<ptrdiff_t>(raw));
  n -= raw;
  size_t i = 0;
  for (; i < sending_.size(); ++i) {
    Req* r = sending_[i];
    const size_t left = r->reply_len() - r->sent;
    if (n < left) {
      r->sent += n;
      break;
    }
    n -= left;
    release(r);
  }
  // Unsent replies go back to the front, in order.
  for (size_t j = sending_.size(); j > i; --j) sendq_.push_front(sending_[j - 1]);
  sending_.clear();
  kick_send();
  // Replies released: requests may have been waiting for room.
  if (phase_ == Phase::kTransmission) {
    process_input();
    arm_recv();
  }
  // The STARTTLS acknowledgement is out: TLS starts.
  maybe_start_tls();
  maybe_close();
}

void Connection::drop_output() {
  for (Req* r : sending_) release(r);
  sending_.clear();
  for (Req* r : sendq_) release(r);
  sendq_.clear();
  raw_out_.clear();
  tx_.clear();
  tx_off_ = 0;
  if (tls_) {
    tls_->wire().clear();
    tls_bye_ = true;
  }
}

// ---------------------------------------------------------------- teardown

void Connection::fail(const std::string& why) {
  spdlog::warn("{}: closing connection: {}", peer_, why);
  begin_drain();
}

void Connection::maybe_close() {
  if (phase_ != Phase::kDraining) return;
  if (recv_pending_ || send_pending_ || inflight_ > (payload_req_ ? 1u : 0u)) return;
  if (!raw_out_.empty() || !sendq_.empty()) return;
  if (tls_) {
    if (tx_off_ < tx_.size() || !tls_->wire().empty()) {
      kick_send();
      return;
    }
    if (!tls_bye_ && !tls_handshaking_) {  // end TLS cleanly: close_notify last
      tls_bye_ = true;
      tls_->bye();
      kick_send();
      if (send_pending_) return;
    }
  }
  if (payload_req_ != nullptr) {
    release(payload_req_);
    payload_req_ = nullptr;
  }
  phase_ = Phase::kClosed;
  spdlog::debug("{}: closed", peer_);
  // The callback releases the connection slot, then deletes this (whose
  // destructor closes the socket): a client that saw EOF may reconnect.
  ClosedFn done = std::move(on_closed_);
  done(this);
}

}  // namespace shadowd::nbd
