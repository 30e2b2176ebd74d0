#include "nbd/tls.h"

#include <gnutls/gnutls.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>

namespace shadowd::nbd {
namespace {

gnutls_certificate_credentials_t x509_of(void* p) { return static_cast<gnutls_certificate_credentials_t>(p); }
gnutls_psk_server_credentials_t psk_of(void* p) { return static_cast<gnutls_psk_server_credentials_t>(p); }
gnutls_session_t session_of(void* p) { return static_cast<gnutls_session_t>(p); }

Status file_error(const std::string& path, const std::string& what, int rc) {
  return Status::invalid(path + ": " + what + ": " + gnutls_strerror(rc));
}

// A readable regular file, or an error naming it.
Status readable(const std::string& path, const std::string& role) {
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0) return Status::from_errno(errno, role + " " + path);
  if (!S_ISREG(st.st_mode)) return Status::invalid(role + " " + path + " is not a regular file");
  if (::access(path.c_str(), R_OK) != 0) return Status::from_errno(errno, role + " " + path);
  return Status::ok();
}

// psktool's format, which GnuTLS reads only when a client asks: one
// "username:hexkey" per line. Checked at start so that a typo is an error
// there, not a refused client later.
Status check_psk_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Status::from_errno(errno, "tls_psk " + path);
  std::string line;
  int n = 0, keys = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.empty()) continue;
    const size_t colon = line.find(':');
    const std::string where = path + ":" + std::to_string(n) + ": ";
    if (colon == 0 || colon == std::string::npos) {
      return Status::invalid(where + "expected username:hexkey (as psktool writes)");
    }
    const std::string_view key = std::string_view(line).substr(colon + 1);
    if (key.empty() || key.size() % 2 != 0 ||
        key.find_first_not_of("0123456789abcdefABCDEF") != std::string_view::npos) {
      return Status::invalid(where + "the key is not an even number of hex digits");
    }
    ++keys;
  }
  if (keys == 0) return Status::invalid("tls_psk " + path + " holds no key");
  return Status::ok();
}

bool exists(const std::string& path) {
  struct stat st{};
  return ::stat(path.c_str(), &st) == 0;
}

}  // namespace

Result<TlsMode> parse_tls_mode(std::string_view s) {
  if (s == "off") return TlsMode::kOff;
  if (s == "on") return TlsMode::kOn;
  if (s == "require") return TlsMode::kRequire;
  return Status::invalid("tls must be off|on|require (got '" + std::string(s) + "')");
}

std::string_view tls_mode_name(TlsMode m) {
  switch (m) {
    case TlsMode::kOff: return "off";
    case TlsMode::kOn: return "on";
    case TlsMode::kRequire: return "require";
  }
  return "?";
}

Result<std::shared_ptr<TlsContext>> TlsContext::create(const TlsOptions& o) {
  if (o.mode == TlsMode::kOff) return Status::invalid("TLS is off");
  if (o.certificates_dir.empty() && o.psk_file.empty()) {
    return Status::invalid("tls " + std::string(tls_mode_name(o.mode)) +
                           " needs tls_certificates (a directory with server-cert.pem and "
                           "server-key.pem) or tls_psk (a psktool key file)");
  }
  if (o.verify_peer && o.certificates_dir.empty()) {
    return Status::invalid("tls_verify_peer needs tls_certificates (its ca-cert.pem checks the clients)");
  }
  std::shared_ptr<TlsContext> c(new TlsContext(o));
  if (!o.certificates_dir.empty()) {
    const std::string dir = o.certificates_dir;
    struct stat st{};
    if (::stat(dir.c_str(), &st) != 0) return Status::from_errno(errno, "tls_certificates " + dir);
    if (!S_ISDIR(st.st_mode)) return Status::invalid("tls_certificates " + dir + " is not a directory");
    const std::string cert = dir + "/server-cert.pem", key = dir + "/server-key.pem";
    const std::string ca = dir + "/ca-cert.pem", crl = dir + "/ca-crl.pem";
    if (Status s = readable(cert, "server certificate"); !s) return s;
    if (Status s = readable(key, "server key"); !s) return s;
    gnutls_certificate_credentials_t x509 = nullptr;
    if (int rc = gnutls_certificate_allocate_credentials(&x509); rc < 0) {
      return Status::io_error(std::string("gnutls: ") + gnutls_strerror(rc));
    }
    c->x509_ = x509;
    if (int rc = gnutls_certificate_set_x509_key_file(x509, cert.c_str(), key.c_str(), GNUTLS_X509_FMT_PEM);
        rc < 0) {
      return file_error(cert, "cannot load the certificate with " + key, rc);
    }
    if (exists(ca)) {
      if (Status s = readable(ca, "CA certificate"); !s) return s;
      const int rc = gnutls_certificate_set_x509_trust_file(x509, ca.c_str(), GNUTLS_X509_FMT_PEM);
      if (rc < 0) return file_error(ca, "cannot load the CA certificate", rc);
      if (rc == 0) return Status::invalid(ca + ": no certificate in it");
    } else if (o.verify_peer) {
      return Status::invalid("tls_verify_peer: " + ca + " is missing (it checks the clients' certificates)");
    }
    if (exists(crl)) {
      const int rc = gnutls_certificate_set_x509_crl_file(x509, crl.c_str(), GNUTLS_X509_FMT_PEM);
      if (rc < 0) return file_error(crl, "cannot load the revocation list", rc);
    }
    gnutls_certificate_set_known_dh_params(x509, GNUTLS_SEC_PARAM_MEDIUM);
  }
  if (!o.psk_file.empty()) {
    if (Status s = readable(o.psk_file, "tls_psk"); !s) return s;
    if (Status s = check_psk_file(o.psk_file); !s) return s;
    gnutls_psk_server_credentials_t psk = nullptr;
    if (int rc = gnutls_psk_allocate_server_credentials(&psk); rc < 0) {
      return Status::io_error(std::string("gnutls: ") + gnutls_strerror(rc));
    }
    c->psk_ = psk;
    if (int rc = gnutls_psk_set_server_credentials_file(psk, o.psk_file.c_str()); rc < 0) {
      return file_error(o.psk_file, "cannot use it as a PSK file", rc);
    }
    gnutls_psk_set_server_known_dh_params(psk, GNUTLS_SEC_PARAM_MEDIUM);
  }
  // The system's defaults, plus the PSK key exchanges when a PSK is set.
  const char* prio = c->psk_ ? "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK" : "NORMAL";
  gnutls_priority_t p = nullptr;
  if (int rc = gnutls_priority_init(&p, prio, nullptr); rc < 0) {
    return Status::io_error(std::string("gnutls priority '") + prio + "': " + gnutls_strerror(rc));
  }
  c->priority_ = p;
  return c;
}

TlsContext::~TlsContext() {
  if (priority_) gnutls_priority_deinit(static_cast<gnutls_priority_t>(priority_));
  if (x509_) gnutls_certificate_free_credentials(x509_of(x509_));
  if (psk_) gnutls_psk_free_server_credentials(psk_of(psk_));
}

std::string TlsContext::describe() const {
  std::string d;
  if (x509_) d = opts_.verify_peer ? "x509 (client certificates required)" : "x509";
  if (psk_) d += d.empty() ? "psk" : " + psk";
  return d;
}

Result<std::unique_ptr<TlsSession>> TlsContext::new_session() const {
  std::unique_ptr<TlsSession> t(new TlsSession());
  gnutls_session_t s = nullptr;
  if (int rc = gnutls_init(&s, GNUTLS_SERVER); rc < 0) {
    return Status::io_error(std::string("gnutls_init: ") + gnutls_strerror(rc));
  }
  t->s_ = s;
  int rc = gnutls_priority_set(s, static_cast<gnutls_priority_t>(priority_));
  if (rc >= 0 && x509_) rc = gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, x509_of(x509_));
  if (rc >= 0 && psk_) rc = gnutls_credentials_set(s, GNUTLS_CRD_PSK, psk_of(psk_));
  if (rc < 0) return Status::io_error(std::string("gnutls session: ") + gnutls_strerror(rc));
  if (opts_.verify_peer) {
    gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE);
    gnutls_session_set_verify_cert(s, nullptr, 0);  // against ca-cert.pem, no host name
  }
  gnutls_handshake_set_timeout(s, 0);  // no timer of its own: the loop has none
  gnutls_transport_set_ptr(s, t.get());
  gnutls_transport_set_pull_function(s, &TlsSession::pull);
  gnutls_transport_set_push_function(s, &TlsSession::push);
  return t;
}

TlsSession::~TlsSession() {
  if (s_) gnutls_deinit(session_of(s_));
}

void TlsSession::feed(const uint8_t* p, size_t n) {
  if (in_pos_ == in_.size()) {
    in_.clear();
    in_pos_ = 0;
  } else if (in_pos_ > 64 * 1024 && in_pos_ * 2 > in_.size()) {
    in_.erase(in_.begin(), in_.begin() + static_cast<std::ptrdiff_t>(in_pos_));
    in_pos_ = 0;
  }
  in_.insert(in_.end(), p, p + n);
}

ssize_t TlsSession::pull(void* self, void* buf, size_t n) {
  auto* t = static_cast<TlsSession*>(self);
  const size_t avail = t->in_.size() - t->in_pos_;
  if (avail == 0) {
    gnutls_transport_set_errno(session_of(t->s_), EAGAIN);
    return -1;
  }
  const size_t k = std::min(avail, n);
  std::memcpy(buf, t->in_.data() + t->in_pos_, k);
  t->in_pos_ += k;
  return static_cast<ssize_t>(k);
}

ssize_t TlsSession::push(void* self, const void* buf, size_t n) {
  auto* t = static_cast<TlsSession*>(self);
  const auto* p = static_cast<const uint8_t*>(buf);
  t->out_.insert(t->out_.end(), p, p + n);
  return static_cast<ssize_t>(n);
}

TlsSession::Step TlsSession::handshake(std::string& error) {
  for (;;) {
    const int rc = gnutls_handshake(session_of(s_));
    if (rc == GNUTLS_E_SUCCESS) return Step::kDone;
    if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) return Step::kAgain;
    if (gnutls_error_is_fatal(rc) == 0) continue;  // a warning alert
    error = gnutls_strerror(rc);
    if (rc == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
      const unsigned status = gnutls_session_get_verify_cert_status(session_of(s_));
      gnutls_datum_t out{};
      if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) == 0) {
        error += std::string(": ") + reinterpret_cast<const char*>(out.data);
        gnutls_free(out.data);
      }
    }
    // Tell the peer why (an alert), if GnuTLS has one for it.
    gnutls_alert_send_appropriate(session_of(s_), rc);
    return Step::kFailed;
  }
}

long TlsSession::read(uint8_t* dst, size_t n, std::string& error) {
  for (;;) {
    const ssize_t rc = gnutls_record_recv(session_of(s_), dst, n);
    if (rc >= 0) return static_cast<long>(rc);
    if (rc == GNUTLS_E_AGAIN) return kAgain;
    if (rc == GNUTLS_E_INTERRUPTED) continue;
    if (rc == GNUTLS_E_REHANDSHAKE) {
      // A TLS 1.2 renegotiation request: refused with a warning alert.
      gnutls_alert_send(session_of(s_), GNUTLS_AL_WARNING, GNUTLS_A_NO_RENEGOTIATION);
      continue;
    }
    if (gnutls_error_is_fatal(static_cast<int>(rc)) == 0) continue;
    error = gnutls_strerror(static_cast<int>(rc));
    return kError;
  }
}

bool TlsSession::write(const uint8_t* p, size_t n, std::string& error) {
  while (n > 0) {
    const ssize_t rc = gnutls_record_send(session_of(s_), p, n);
    if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) continue;  // push never blocks
    if (rc < 0) {
      error = gnutls_strerror(static_cast<int>(rc));
      return false;
    }
    p += rc;
    n -= static_cast<size_t>(rc);
  }
  return true;
}

void TlsSession::bye() { gnutls_bye(session_of(s_), GNUTLS_SHUT_WR); }

std::string TlsSession::describe() const {
  gnutls_session_t s = session_of(s_);
  const char* ver = gnutls_protocol_get_name(gnutls_protocol_get_version(s));
  const char* cipher = gnutls_cipher_get_name(gnutls_cipher_get(s));
  std::string d = std::string(ver ? ver : "?") + " " + (cipher ? cipher : "?");
  if (gnutls_auth_get_type(s) == GNUTLS_CRD_PSK) {
    const char* user = gnutls_psk_server_get_username(s);
    d += std::string(" psk user '") + (user ? user : "") + "'";
  } else {
    d += " x509";
    unsigned n = 0;
    if (gnutls_certificate_get_peers(s, &n) != nullptr && n > 0) d += " (client certificate verified)";
  }
  return d;
}

}  // namespace shadowd::nbd
