// An IoBackend over a Ceph RBD image, through librbd's asynchronous API:
// a primary (`--backing rbd:POOL/IMAGE`) or a pool device (`--pool
// rbd:POOL/IMAGE`). Completions arrive on librbd's threads and are handed
// to the submitting loop with EventLoop::post().
//
// Spec, as qemu writes it: rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:KEY=VALUE]...
// with the keys conf (ceph.conf path), id (client id, without "client."),
// keyring, and any Ceph option (set with rados_conf_set), e.g.
//   rbd:shadowd/vol1:conf=/etc/ceph/ceph.conf:id=shadowd
// A backslash escapes ':' or '@' inside a value or name.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "core/io_backend.h"

namespace shadowd {

struct RbdSpec {
  std::string pool;
  std::string ns;  // RADOS namespace, empty for the default one
  std::string image;
  std::string snap;
  std::string conf;     // empty: librados' default search
  std::string id;       // empty: "admin"
  std::string keyring;  // empty: from the conf
  std::map<std::string, std::string> options;  // other Ceph options
};

bool is_rbd_spec(const std::string& s);
// Parses an rbd: spec; a clear message on a malformed one.
Result<RbdSpec> parse_rbd_spec(const std::string& s);
// The spec without options: "rbd:POOL[/NS]/IMAGE[@SNAP]" (for logs and the
// pool's primary id, which must not change with a conf path).
std::string rbd_spec_name(const RbdSpec& spec);

struct RbdBackendOptions {
  bool read_only = false;
  // An exclusive lock held by another client: break it (that client is
  // blocklisted, so a dead or hung holder is fenced at once) instead of
  // refusing to open the image.
  bool break_lock = false;
  // How long connecting to the cluster may take (client_mount_timeout),
  // unless the spec sets it.
  unsigned connect_timeout_s = 30;
  // Fail a request the cluster has not answered in this many seconds
  // (rados_osd_op_timeout; 0: wait for ever, Ceph's default), unless the
  // spec sets it. A replica sets it, so that a cluster that is down makes
  // its requests fail and the replica fall behind, instead of hanging.
  unsigned op_timeout_s = 0;
  // Report holes (NBD base:allocation) from the image's object map, when it
  // has fast-diff. librbd's cache is then off unless the spec sets
  // rbd_cache (with it on, no holes are reported): its writearound mode
  // acknowledges a write before the object map records the new object, so
  // a query right after the write could call written data zeroes.
  bool report_holes = false;
};

Result<std::unique_ptr<IoBackend>> open_rbd_backend(const std::string& spec,
                                                    const RbdBackendOptions& opts);

}  // namespace shadowd
