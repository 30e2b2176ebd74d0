// librbd backend; see rbd_backend.h.
//
// Every request is one librbd aio call (a FUA write is a write, then a
// flush). librbd calls back on its own threads: the callback only reads the
// result and posts the op's completion to the loop it was submitted from, so
// all op state is touched on that loop. The destructor waits for callbacks
// still running before it closes the image.
#include "core/rbd_backend.h"

#include <rados/librados.h>
#include <rbd/librbd.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <vector>

namespace shadowd {
namespace {

enum Stage : uint32_t {
  kStageMain = 0,
  kStageFuaFlush = 1,  // a FUA write landed; now the flush
};

Status ceph_error(int r, const std::string& what) {
  return Status::from_errno(r < 0 ? -r : EIO, what);
}

// Splits `s` at unescaped `sep`; backslashes escape the next character.
std::vector<std::string> split_escaped(const std::string& s, char sep) {
  std::vector<std::string> out(1);
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) {
      out.back() += s[++i];
    } else if (s[i] == sep) {
      out.emplace_back();
    } else {
      out.back() += s[i];
    }
  }
  return out;
}

class RbdBackend final : public IoBackend {
 public:
  // One extent_at() looks at most this far (a longer run is reported in parts).
  static constexpr uint64_t kMaxExtentQuery = uint64_t{1} << 30;

  RbdBackend(rados_t cluster, rados_ioctx_t io, rbd_image_t image, BackendInfo info,
             std::string name)
      : cluster_(cluster), io_(io), image_(image), info_(info), name_(std::move(name)) {}

  ~RbdBackend() override {
    {
      std::unique_lock<std::mutex> lock(mu_);
      idle_.wait(lock, [this] { return inflight_ == 0; });
    }
    if (int r = rbd_close(image_); r < 0) {
      spdlog::warn("{}: closing the image: {}", name_, std::strerror(-r));
    }
    rados_ioctx_destroy(io_);
    rados_shutdown(cluster_);
  }

  const BackendInfo& info() const override { return info_; }

  // base:allocation from the object map (fast-diff): an object that does
  // not exist reads as zeroes and is a hole; one that exists is data as a
  // whole, so holes are found in whole objects (4 MiB by default), as qemu's
  // rbd driver reports them.
  Result<Extent> extent_at(uint64_t offset, uint64_t max_len) override {
    if (!info_.can_extents || max_len == 0) return Extent{max_len, false};
    max_len = std::min(max_len, kMaxExtentQuery);
    struct Query {
      uint64_t begin, end;           // the range asked about
      uint64_t first = UINT64_MAX;   // where the first existing extent starts
      uint64_t data_end = 0;         // and where its contiguous run ends
      bool done = false;
    } q{offset, offset + max_len};
    auto on_extent = [](uint64_t off, size_t len, int exists, void* arg) -> int {
      auto& q = *static_cast<Query*>(arg);
      if (q.done || exists == 0) return 0;
      if (q.first == UINT64_MAX) {
        q.first = off;
        q.data_end = off + len;
      } else if (off <= q.data_end) {
        q.data_end = std::max<uint64_t>(q.data_end, off + len);
      } else {
        q.done = true;  // a hole after the first run: nothing more needed
        return -ECANCELED;  // stops the iteration
      }
      return 0;
    };
    const int r = rbd_diff_iterate2(image_, nullptr, offset, max_len, /*include_parent=*/1,
                                    /*whole_object=*/1, on_extent, &q);
    if (r < 0 && !(r == -ECANCELED && q.done)) {
      return Extent{max_len, false};  // cannot tell: data, as the protocol allows
    }
    if (q.first == UINT64_MAX || q.first >= q.end) return Extent{max_len, true};
    if (q.first > offset) return Extent{q.first - offset, true};
    return Extent{std::min(q.data_end, q.end) - offset, false};
  }

  void submit(EventLoop& loop, BlockOp* op) override {
    op->backend_ = this;
    op->loop_ = &loop;
    op->progress_ = 0;
    op->retries_ = 0;
    op->stage_ = kStageMain;
    const bool mutating = op->kind == BlockOpKind::kWrite || op->kind == BlockOpKind::kTrim ||
                          op->kind == BlockOpKind::kWriteZeroes;
    if (mutating && info_.read_only) {
      return finish(*op, Status::from_errno(EROFS, op_name(op->kind)));
    }
    const bool data = op->kind == BlockOpKind::kRead || op->kind == BlockOpKind::kWrite;
    if ((data && op->length == 0) || op->kind == BlockOpKind::kCache) {
      return finish(*op, Status::ok());
    }
    start(*op, op->kind == BlockOpKind::kFlush);
  }

 protected:
  void on_cqe(BlockOp& op, int res) override {
    if (res < 0) {
      if (!error_logged_.exchange(true, std::memory_order_relaxed)) {
        spdlog::error("{}: {} at offset {} failed: {} (further errors are not logged)", name_,
                      op_name(op.kind), op.offset, std::strerror(-res));
      }
      return finish(op, ceph_error(res, name_ + ": " + op_name(op.kind)));
    }
    if (op.stage_ == kStageMain && (op.flags & kFua) != 0 && op.kind != BlockOpKind::kRead &&
        op.kind != BlockOpKind::kFlush) {
      op.stage_ = kStageFuaFlush;
      return start(op, /*flush=*/true);
    }
    finish(op, Status::ok());
  }

 private:
  static void finish(BlockOp& op, const Status& st) {
    op.stage_ = BlockOp::kStageDone;
    op.loop_->defer(&op, st.is_ok() ? 0 : -(st.err() != 0 ? st.err() : EIO));
  }

  static void on_rbd_done(rbd_completion_t c, void* arg) {
    auto* op = static_cast<BlockOp*>(arg);
    auto* self = static_cast<RbdBackend*>(op->backend_);
    const ssize_t r = rbd_aio_get_return_value(c);
    rbd_aio_release(c);
    const int res = r < 0 ? static_cast<int>(r) : 0;
    op->loop_->post([op, res] { static_cast<IoCompletion*>(op)->on_complete(res, 0); });
    std::lock_guard<std::mutex> lock(self->mu_);
    if (--self->inflight_ == 0) self->idle_.notify_all();
  }

  // Starts the op's librbd call (or its flush).
  void start(BlockOp& op, bool flush) {
    rbd_completion_t c = nullptr;
    int r = rbd_aio_create_completion(&op, &RbdBackend::on_rbd_done, &c);
    if (r < 0) return finish(op, ceph_error(r, name_ + ": aio completion"));
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++inflight_;
    }
    if (flush) {
      r = rbd_aio_flush(image_, c);
    } else {
      switch (op.kind) {
        case BlockOpKind::kRead:
          r = rbd_aio_read2(image_, op.offset, op.length, reinterpret_cast<char*>(op.buf), c, 0);
          break;
        case BlockOpKind::kWrite:
          r = rbd_aio_write2(image_, op.offset, op.length, reinterpret_cast<const char*>(op.buf),
                             c, 0);
          break;
        case BlockOpKind::kTrim:
          r = rbd_aio_discard(image_, op.offset, op.length, c);
          break;
        case BlockOpKind::kWriteZeroes:
          r = rbd_aio_write_zeroes(
              image_, op.offset, op.length, c,
              (op.flags & kNoHole) != 0 ? RBD_WRITE_ZEROES_FLAG_THICK_PROVISION : 0, 0);
          break;
        default:
          r = rbd_aio_flush(image_, c);
          break;
      }
    }
    if (r < 0) {
      rbd_aio_release(c);
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (--inflight_ == 0) idle_.notify_all();
      }
      finish(op, ceph_error(r, name_ + ": " + op_name(op.kind)));
    }
  }

  rados_t cluster_;
  rados_ioctx_t io_;
  rbd_image_t image_;
  BackendInfo info_;
  std::string name_;
  std::atomic<bool> error_logged_{false};  // the first failure is logged, from any loop thread
  std::mutex mu_;
  std::condition_variable idle_;
  uint64_t inflight_ = 0;  // librbd calls whose callback has not finished
};

// Takes the exclusive lock, breaking another client's with opts.break_lock.
Status take_lock(rbd_image_t image, const std::string& name, const RbdBackendOptions& opts) {
  uint64_t features = 0;
  if (int r = rbd_get_features(image, &features); r < 0) {
    return ceph_error(r, name + ": reading the image's features");
  }
  if ((features & RBD_FEATURE_EXCLUSIVE_LOCK) == 0) {
    spdlog::warn("{}: the image has no exclusive-lock feature: nothing stops a second writer",
                 name);
    return Status::ok();
  }
  rbd_lock_mode_t mode{};
  std::vector<char*> owners(8);
  size_t n = owners.size();
  int r = rbd_lock_get_owners(image, &mode, owners.data(), &n);
  if (r == -ERANGE) {
    owners.resize(n);
    r = rbd_lock_get_owners(image, &mode, owners.data(), &n);
  }
  if (r < 0 && r != -ENOENT) return ceph_error(r, name + ": reading the lock's owners");
  if (r >= 0 && n > 0) {
    std::vector<std::string> held(owners.begin(), owners.begin() + static_cast<ptrdiff_t>(n));
    rbd_lock_get_owners_cleanup(owners.data(), n);
    std::string list;
    for (const std::string& o : held) list += (list.empty() ? "" : ", ") + o;
    if (!opts.break_lock) {
      return Status::error(Status::Code::kBusy,
                           name + " is locked by " + list +
                               " (another writer, or one that died); --rbd-break-lock breaks "
                               "the lock and blocklists that client",
                           EBUSY);
    }
    for (const std::string& o : held) {
      spdlog::warn("{}: breaking the exclusive lock of {} (the client is blocklisted)", name, o);
      if (int b = rbd_lock_break(image, mode, o.c_str()); b < 0 && b != -ENOENT) {
        return ceph_error(b, name + ": breaking the lock of " + o);
      }
    }
  }
  if (int a = rbd_lock_acquire(image, RBD_LOCK_MODE_EXCLUSIVE); a < 0) {
    return ceph_error(a, name + ": taking the exclusive lock");
  }
  return Status::ok();
}

}  // namespace

bool is_rbd_spec(const std::string& s) { return s.rfind("rbd:", 0) == 0; }

Result<RbdSpec> parse_rbd_spec(const std::string& s) {
  if (!is_rbd_spec(s)) return Status::invalid("'" + s + "' is not an rbd: spec");
  // POOL[/NS]/IMAGE[@SNAP] up to the first unescaped ':', then the options.
  const std::string raw = s.substr(4);
  size_t end = 0;
  for (; end < raw.size() && raw[end] != ':'; ++end) {
    if (raw[end] == '\\') ++end;
  }
  end = std::min(end, raw.size());
  std::vector<std::string> parts;
  if (end < raw.size()) parts = split_escaped(raw.substr(end + 1), ':');
  RbdSpec spec;
  const std::vector<std::string> at = split_escaped(raw.substr(0, end), '@');
  if (at.size() > 2) return Status::invalid("'" + s + "': more than one '@'");
  const std::string& where = at[0];
  if (at.size() == 2) {
    if (at[1].empty()) return Status::invalid("'" + s + "': empty snapshot name after '@'");
    spec.snap = at[1];
  }
  const std::vector<std::string> names = split_escaped(where, '/');
  if (names.size() == 2) {
    spec.pool = names[0];
    spec.image = names[1];
  } else if (names.size() == 3) {
    spec.pool = names[0];
    spec.ns = names[1];
    spec.image = names[2];
  } else {
    return Status::invalid("'" + s + "': want rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE");
  }
  if (spec.pool.empty() || spec.image.empty()) {
    return Status::invalid("'" + s + "': empty pool or image name");
  }
  for (const std::string& kv : parts) {
    const size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0) {
      return Status::invalid("'" + s + "': option '" + kv + "' is not KEY=VALUE");
    }
    const std::string key = kv.substr(0, eq), value = kv.substr(eq + 1);
    if (key == "conf") {
      spec.conf = value;
    } else if (key == "id") {
      spec.id = value;
    } else if (key == "keyring") {
      spec.keyring = value;
    } else {
      spec.options[key] = value;
    }
  }
  return spec;
}

std::string rbd_spec_name(const RbdSpec& spec) {
  std::string n = "rbd:" + spec.pool + "/";
  if (!spec.ns.empty()) n += spec.ns + "/";
  n += spec.image;
  if (!spec.snap.empty()) n += "@" + spec.snap;
  return n;
}

Result<std::unique_ptr<IoBackend>> open_rbd_backend(const std::string& text,
                                                    const RbdBackendOptions& opts) {
  auto parsed = parse_rbd_spec(text);
  if (!parsed) return parsed.status();
  const RbdSpec& spec = *parsed;
  const std::string name = rbd_spec_name(spec);
  rados_t cluster = nullptr;
  int r = rados_create(&cluster, spec.id.empty() ? nullptr : spec.id.c_str());
  if (r < 0) return ceph_error(r, name + ": creating the RADOS handle");
  auto give_up = [&](int err, const std::string& what) -> Status {
    rados_shutdown(cluster);
    return ceph_error(err, name + ": " + what);
  };
  r = rados_conf_read_file(cluster, spec.conf.empty() ? nullptr : spec.conf.c_str());
  if (r < 0) {
    return give_up(r, spec.conf.empty() ? "no ceph.conf found in the default places"
                                        : "reading " + spec.conf);
  }
  if (!spec.keyring.empty()) {
    if ((r = rados_conf_set(cluster, "keyring", spec.keyring.c_str())) < 0) {
      return give_up(r, "keyring=" + spec.keyring);
    }
  }
  if (spec.options.count("client_mount_timeout") == 0) {
    const std::string t = std::to_string(opts.connect_timeout_s);
    rados_conf_set(cluster, "client_mount_timeout", t.c_str());
  }
  if (opts.op_timeout_s != 0 && spec.options.count("rados_osd_op_timeout") == 0) {
    const std::string t = std::to_string(opts.op_timeout_s);
    rados_conf_set(cluster, "rados_osd_op_timeout", t.c_str());
    rados_conf_set(cluster, "rados_mon_op_timeout", t.c_str());
  }
  const bool cache_set = spec.options.count("rbd_cache") != 0;
  if (opts.report_holes && !cache_set) rados_conf_set(cluster, "rbd_cache", "false");
  for (const auto& [k, v] : spec.options) {
    if ((r = rados_conf_set(cluster, k.c_str(), v.c_str())) < 0) {
      return give_up(r, "option " + k + "=" + v);
    }
  }
  if ((r = rados_connect(cluster)) < 0) return give_up(r, "connecting to the cluster");
  rados_ioctx_t io = nullptr;
  if ((r = rados_ioctx_create(cluster, spec.pool.c_str(), &io)) < 0) {
    return give_up(r, "opening pool '" + spec.pool + "'");
  }
  rados_ioctx_set_namespace(io, spec.ns.empty() ? nullptr : spec.ns.c_str());
  const bool read_only = opts.read_only || !spec.snap.empty();
  rbd_image_t image = nullptr;
  const char* snap = spec.snap.empty() ? nullptr : spec.snap.c_str();
  r = read_only ? rbd_open_read_only(io, spec.image.c_str(), &image, snap)
                : rbd_open(io, spec.image.c_str(), &image, snap);
  if (r < 0) {
    rados_ioctx_destroy(io);
    return give_up(r, "opening image '" + spec.image + "'");
  }
  auto close_all = [&](const Status& st) -> Status {
    rbd_close(image);
    rados_ioctx_destroy(io);
    rados_shutdown(cluster);
    return st;
  };
  uint64_t size = 0;
  if ((r = rbd_get_size(image, &size)) < 0) {
    return close_all(ceph_error(r, name + ": reading the image size"));
  }
  if (!read_only) {
    if (Status st = take_lock(image, name, opts); !st) return close_all(st);
  }
  BackendInfo info;
  info.size_bytes = size;
  info.read_only = read_only;
  info.direct_io = false;
  info.alignment_bytes = 1;
  info.is_block_device = false;
  info.can_trim = true;
  info.can_zero = true;
  // Holes come from the object map: without fast-diff every query would
  // list each object, so the export then reports everything as data.
  uint64_t features = 0;
  uint64_t flags = 0;
  const bool cache_off = !cache_set || spec.options.at("rbd_cache") == "false" ||
                        spec.options.at("rbd_cache") == "0";
  info.can_extents = opts.report_holes && cache_off && rbd_get_features(image, &features) == 0 &&
                     (features & RBD_FEATURE_FAST_DIFF) != 0 && rbd_get_flags(image, &flags) == 0 &&
                     (flags & RBD_FLAG_FAST_DIFF_INVALID) == 0;
  spdlog::info("{}: {} bytes{}", name, size, read_only ? ", read-only" : ", exclusive lock held");
  return std::unique_ptr<IoBackend>(new RbdBackend(cluster, io, image, info, name));
}

}  // namespace shadowd
