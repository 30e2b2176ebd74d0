// An IoBackend over an NBD server, through libnbd: shadowd then serves and
// shadows any store an NBD URI reaches (qemu-nbd, nbdkit and its plugins,
// another shadowd), as it does a local file.
//
// Requests go out with libnbd's asynchronous API from the thread that
// submits them, so many are in flight; one driver thread per connection
// polls the socket and runs libnbd's state machine, and completions are
// posted to the submitting loop (EventLoop::post), never run inside
// submit(). Requests larger than the server's maximum payload are split;
// FUA falls back to a flush where the server has no FUA; WRITE_ZEROES to
// writes of zeroes, TRIM to nothing and CACHE to an immediate success where
// the server lacks them. A lost connection fails every request with EIO (it
// is logged once); there is no reconnection.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "core/io_backend.h"

namespace shadowd {

// True when `text` starts with an NBD URI scheme that libnbd understands:
// nbd, nbds, nbd+unix, nbds+unix, nbd+vsock, nbds+vsock, then "://".
bool is_nbd_uri(const std::string& text);

// The URI without anything secret in it (a password in its user part), as
// it may be logged and stored in the pool's superblock as the primary's id.
std::string redact_nbd_uri(const std::string& uri);

struct NbdBackendOptions {
  bool read_only = false;  // a read-only server is refused unless this is set
  // Connections to open when the server advertises multi-conn (1 without
  // it); requests are spread over them round-robin. 1..16.
  unsigned connections = 1;
  uint32_t connect_timeout_ms = 30000;  // connecting and the NBD handshake
};

// Connect to `uri` (libnbd's URI syntax: nbd://HOST[:PORT]/EXPORT,
// nbd+unix:///EXPORT?socket=PATH, nbds:// and nbds+unix:// with TLS; the
// tls-psk-file and tls-certificates query parameters are allowed).
// info() reflects what the server advertised: size, read-only, trim, zero,
// extents (base:allocation) and block sizes (alignment_bytes is the
// server's minimum block size).
Result<std::unique_ptr<IoBackend>> open_nbd_backend(const std::string& uri,
                                                    const NbdBackendOptions& opts);

}  // namespace shadowd
