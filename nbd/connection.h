// One client connection, owned by one EventLoop. It moves bytes between the
// socket and the pure codec/negotiator, runs requests concurrently on the
// export's backend (replies go out in completion order, matched by cookie),
// and batches replies into one sendmsg when several are ready.
#pragma once

#include <sys/socket.h>
#include <sys/uio.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/event_loop.h"
#include "core/io_backend.h"
#include "nbd/codec.h"
#include "nbd/negotiate.h"
#include "nbd/stats.h"
#include "nbd/tls.h"

namespace shadowd::nbd {

struct ConnectionLimits {
  uint32_t max_payload_bytes = 32u << 20;
  uint32_t max_inflight = 128;
  uint64_t max_inflight_bytes = 128ull << 20;  // buffers held by one connection
};

class Connection {
 public:
  // Called on the loop thread once the connection has closed its socket and
  // may be deleted.
  using ClosedFn = std::function<void(Connection*)>;

  // `stats` is the shard of the worker thread that runs `loop`.
  // With `tls`, NBD_OPT_STARTTLS is offered (or required, by its mode).
  Connection(EventLoop& loop, int fd, std::string peer, const ExportRegistry& registry,
             const ConnectionLimits& limits, StatsShard* stats, ClosedFn on_closed,
             std::shared_ptr<const TlsContext> tls = nullptr);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  void start();
  // Stop reading new requests; finish (reply to) those in flight, then close.
  void shutdown();

  const std::string& peer() const { return peer_; }

 private:
  struct Req;
  class RecvOp;
  class SendOp;

  // Input.
  void arm_recv();
  void make_input_room();
  void on_recv(int res);
  void on_eof(int res);
  void process_input();
  void process_handshake();
  bool process_request_header();
  void take_payload();
  // Requests.
  Req* new_req(const Request& hdr, uint64_t buf_bytes);
  void dispatch(Req* r);
  void block_status(Req* r);
  void on_req_done(Req* r, const Status& st);
  void reply(Req* r, uint32_t error, const std::string& msg = {});
  void release(Req* r);
  // Output.
  void send_raw(std::vector<uint8_t> bytes);
  void kick_send();
  void on_sent(int res);
  // TLS: the session starts once the STARTTLS acknowledgement is sent.
  // Ciphertext is received into tls_rx_ and fed to the session; tls_input()
  // runs the handshake, then decrypts into in_ and processes it;
  // tls_encrypt() turns replies into records (and releases the requests);
  // tx_ is the ciphertext being sent.
  void maybe_start_tls();
  void tls_input();
  bool tls_encrypt();
  void drop_output();
  // Teardown. Every entry point (start, on_recv, on_sent, on_req_done,
  // shutdown) ends with maybe_close(), the only place that may delete this.
  void begin_drain();
  void fail(const std::string& why);
  void maybe_close();

  EventLoop& loop_;
  int fd_;
  std::string peer_;
  const ExportRegistry& registry_;
  ConnectionLimits limits_;
  StatsShard* stats_;
  ClosedFn on_closed_;
  std::shared_ptr<const TlsContext> tls_ctx_;
  Negotiator negotiator_;
  std::shared_ptr<Export> export_;
  RequestContext ctx_;

  enum class Phase { kHandshake, kTransmission, kDraining, kClosed } phase_ = Phase::kHandshake;
  std::unique_ptr<RecvOp> recv_op_;
  std::unique_ptr<SendOp> send_op_;
  bool recv_pending_ = false;
  bool send_pending_ = false;
  bool read_eof_ = false;

  std::vector<uint8_t> in_;
  size_t in_begin_ = 0;
  size_t in_end_ = 0;
  Req* payload_req_ = nullptr;  // a WRITE whose payload is being received
  uint64_t payload_got_ = 0;
  bool payload_direct_ = false;  // the next recv should target payload_req_'s buffer
  bool recv_direct_ = false;     // the pending recv targets payload_req_'s buffer
  uint64_t skip_bytes_ = 0;      // payload of a refused WRITE still to discard
  Req* skip_req_ = nullptr;      // the refused WRITE, answered once skipped
  uint32_t skip_error_ = 0;

  uint32_t inflight_ = 0;
  uint64_t inflight_bytes_ = 0;
  std::vector<std::unique_ptr<Req>> all_reqs_;
  std::vector<Req*> free_reqs_;

  std::deque<Req*> sendq_;        // replies waiting to be sent
  std::vector<Req*> sending_;     // replies in the current sendmsg
  std::vector<uint8_t> raw_out_;  // handshake bytes (the handshake phase)
  std::vector<iovec> iov_;
  msghdr msg_{};

  std::unique_ptr<TlsSession> tls_;
  bool tls_handshaking_ = false;
  bool tls_bye_ = false;        // close_notify queued
  bool recv_tls_ = false;       // the pending recv targets tls_rx_
  std::vector<uint8_t> tls_rx_;
  std::vector<uint8_t> tx_;     // ciphertext in the current send
  size_t tx_off_ = 0;
  std::vector<uint8_t> tls_stage_;  // small replies gathered into one record
};

}  // namespace shadowd::nbd
