// The handshake and option haggling, as a pure state machine: bytes from the
// client go in, bytes for the client come out, and the state says when the
// transmission phase starts (or the connection must close). The connection
// loop only moves bytes; everything here can be unit-tested and fuzzed.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "nbd/export.h"

namespace shadowd::nbd {

// The meta contexts the last SET_META_CONTEXT selected for the export that
// went into transmission; their context ids are fixed (protocol.h).
struct MetaContexts {
  bool base_allocation = false;  // kBaseAllocationId
  bool shadowd_source = false;   // kShadowdSourceId
  bool any() const { return base_allocation || shadowd_source; }
};

// How the server treats NBD_OPT_STARTTLS (proto.md "TLS support"): kOff is
// NOTLS (STARTTLS refused), kOn is SELECTIVETLS with no TLS-only export
// (plain clients are served too), kRequire is FORCEDTLS.
enum class TlsPolicy { kOff, kOn, kRequire };

class Negotiator {
 public:
  enum class State {
    kClientFlags,   // waiting for the 4-byte client flags
    kOptions,       // haggling
    kStartTls,      // STARTTLS acknowledged: send the output in the clear, run
                    // the TLS handshake, then tls_started()
    kTransmission,  // an export was selected; send the output, then serve
    kClose,         // send the output (if any), then close
  };

  // Options longer than this close the connection (proto.md permits a hard
  // disconnect for payloads deemed a denial of service).
  static constexpr uint32_t kMaxOptionBytes = 64 * 1024;

  explicit Negotiator(const ExportRegistry& registry, TlsPolicy tls = TlsPolicy::kOff)
      : registry_(registry), tls_(tls) {}

  // The 18 bytes the server sends on accept.
  static std::vector<uint8_t> greeting();

  // Consume as much of `in` as forms complete messages; append replies to
  // `out`. Returns the number of bytes consumed. Stops consuming once the
  // state is kTransmission or kClose.
  size_t feed(std::span<const uint8_t> in, std::vector<uint8_t>& out);

  State state() const { return state_; }
  // The TLS handshake after kStartTls succeeded: haggling goes on, over TLS,
  // with nothing negotiated before it kept (proto.md, NBD_OPT_STARTTLS).
  void tls_started();
  bool tls_active() const { return tls_active_; }
  const std::string& close_reason() const { return close_reason_; }

  // Valid in kTransmission.
  const std::shared_ptr<Export>& selected() const { return selected_; }
  bool structured_replies() const { return structured_; }
  const MetaContexts& meta_contexts() const { return meta_; }
  bool base_allocation() const { return meta_.base_allocation; }
  bool shadowd_source() const { return meta_.shadowd_source; }

 private:
  void handle_option(uint32_t opt, std::span<const uint8_t> data, std::vector<uint8_t>& out);
  void handle_starttls(std::span<const uint8_t> data, std::vector<uint8_t>& out);
  void handle_export_name(std::span<const uint8_t> data, std::vector<uint8_t>& out);
  void handle_info_go(uint32_t opt, std::span<const uint8_t> data, std::vector<uint8_t>& out);
  void handle_list(uint32_t opt, std::span<const uint8_t> data, std::vector<uint8_t>& out);
  void handle_meta(uint32_t opt, std::span<const uint8_t> data, std::vector<uint8_t>& out);
  void select(std::shared_ptr<Export> e);
  void close(std::string reason) {
    state_ = State::kClose;
    close_reason_ = std::move(reason);
  }

  const ExportRegistry& registry_;
  TlsPolicy tls_;
  bool tls_active_ = false;
  State state_ = State::kClientFlags;
  std::string close_reason_;
  bool fixed_newstyle_ = false;
  bool no_zeroes_ = false;
  bool structured_ = false;
  MetaContexts meta_;
  std::string meta_export_;  // export name meta_ was selected for
  std::shared_ptr<Export> selected_;
};

// Append one option reply (header + payload) to `out`.
void append_option_reply(std::vector<uint8_t>& out, uint32_t opt, uint32_t type,
                         std::span<const uint8_t> payload = {});

}  // namespace shadowd::nbd
