// NBD over TLS (NBD_OPT_STARTTLS) with GnuTLS.
//
// TlsContext holds the server's credentials, loaded and checked once at
// start: x509 (a directory with ca-cert.pem, server-cert.pem,
// server-key.pem, and optionally ca-crl.pem, the layout nbdkit and
// qemu-nbd use) and/or a PSK file in psktool's format ("username:hexkey"
// lines). It is immutable afterwards and shared by every worker thread.
//
// TlsSession is one connection's TLS state over memory buffers, not a
// socket: the connection's io_uring loop receives ciphertext and hands it
// in with feed(), and takes what GnuTLS wrote from wire() to send it. So
// the socket I/O stays on io_uring and the plain path does not change.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace shadowd::nbd {

enum class TlsMode {
  kOff,      // STARTTLS refused (NBD_REP_ERR_POLICY)
  kOn,       // STARTTLS offered; plain clients are served too
  kRequire,  // every option but STARTTLS and ABORT is refused before TLS
};

Result<TlsMode> parse_tls_mode(std::string_view s);
std::string_view tls_mode_name(TlsMode m);

struct TlsOptions {
  TlsMode mode = TlsMode::kOff;
  std::string certificates_dir;  // ca-cert.pem, server-cert.pem, server-key.pem
  bool verify_peer = false;      // clients must present a certificate signed by ca-cert.pem
  std::string psk_file;          // psktool format
};

class TlsSession;

class TlsContext {
 public:
  // Loads and checks every file named by `o` (mode must not be kOff). The
  // error names the file and what is wrong with it.
  static Result<std::shared_ptr<TlsContext>> create(const TlsOptions& o);
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  TlsMode mode() const { return opts_.mode; }
  const TlsOptions& options() const { return opts_; }
  // What the server offers, for the log: "x509 (client certificates
  // required)", "psk", "x509 + psk".
  std::string describe() const;

  // A new server-side session, or an error (out of memory).
  Result<std::unique_ptr<TlsSession>> new_session() const;

 private:
  explicit TlsContext(TlsOptions o) : opts_(std::move(o)) {}
  TlsOptions opts_;
  void* x509_ = nullptr;      // gnutls_certificate_credentials_t
  void* psk_ = nullptr;       // gnutls_psk_server_credentials_t
  void* priority_ = nullptr;  // gnutls_priority_t
};

class TlsSession {
 public:
  ~TlsSession();
  TlsSession(const TlsSession&) = delete;
  TlsSession& operator=(const TlsSession&) = delete;

  // Ciphertext received from the peer.
  void feed(const uint8_t* p, size_t n);
  // Ciphertext received but not yet consumed by GnuTLS.
  size_t buffered_in() const { return in_.size() - in_pos_; }

  enum class Step { kAgain, kDone, kFailed };
  // Advance the handshake with what was fed; on kFailed `error` says why.
  Step handshake(std::string& error);

  // Decrypt into dst. Returns the bytes decrypted (> 0), 0 when the peer
  // closed TLS (close_notify), kAgain when more ciphertext is needed, or
  // kError (then `error` says why).
  static constexpr long kAgain = -1;
  static constexpr long kError = -2;
  long read(uint8_t* dst, size_t n, std::string& error);

  // Encrypt all of p[0, n); the records are appended to wire(). False on
  // error (then `error` says why).
  bool write(const uint8_t* p, size_t n, std::string& error);
  // Queue a close_notify alert.
  void bye();

  // Bytes for the socket: ciphertext, and before the handshake whatever
  // was put here in the clear (the STARTTLS acknowledgement).
  std::vector<uint8_t>& wire() { return out_; }

  // After the handshake: "TLS1.3 AES-256-GCM x509" / "... psk user 'alice'".
  std::string describe() const;

 private:
  friend class TlsContext;
  TlsSession() = default;
  static ssize_t pull(void* self, void* buf, size_t n);
  static ssize_t push(void* self, const void* buf, size_t n);

  void* s_ = nullptr;  // gnutls_session_t
  std::vector<uint8_t> in_;
  size_t in_pos_ = 0;
  std::vector<uint8_t> out_;
};

}  // namespace shadowd::nbd
