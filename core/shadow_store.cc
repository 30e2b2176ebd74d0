#include "core/shadow_store.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "core/zstd_codec.h"

#include <zstd.h>

namespace shadowd {
namespace {

using pool::Codec;
using pool::JournalOp;
using pool::RecordType;
using pool::ZoneKind;

constexpr uint64_t kB = pool::kBlockBytes;
constexpr uint64_t kNs = 1'000'000'000;
// How long the shadow thread leaves a segment alone after it could not read
// it from the primary.
constexpr uint64_t kUnreadableRetryNs = 30 * kNs;

uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }
bool is_pow2(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

struct FreeDeleter {
  void operator()(uint8_t* p) const { std::free(p); }
};
using ABuf = std::unique_ptr<uint8_t[], FreeDeleter>;
ABuf aligned_buf(size_t n) {
  return ABuf(static_cast<uint8_t*>(std::aligned_alloc(kB, round_up(std::max<size_t>(n, 1), kB))));
}

// Every thread that touches a pool device or the primary synchronously has
// its own small loop.
EventLoop& thread_loop() {
  thread_local std::unique_ptr<EventLoop> loop;
  if (!loop) {
    auto l = EventLoop::create(64);
    if (!l) {
      spdlog::critical("cannot create an io_uring for the pool: {}", l.status().message());
      std::abort();
    }
    loop = std::move(*l);
  }
  return *loop;
}

Status sync_io(IoBackend& b, BlockOpKind kind, uint64_t off, uint64_t len, uint8_t* buf,
               uint32_t flags = 0) {
  return run_on(thread_loop(), b, kind, off, len, buf, flags);
}

// Where a record lives.
struct Loc {
  uint8_t tier = 0;
  uint32_t zone = 0;
  uint32_t offset = 0;
  uint32_t bytes = 0;
  uint64_t gen = 0;
};

struct VEntry {
  uint64_t seq = 0;
  int64_t ts = 0;
  Loc loc;
  uint16_t depth = 0;
  uint64_t base_seq = 0;
  uint64_t xxh = 0;
  uint32_t raw = 0;  // content bytes
  bool cow = false;
};

struct REntry {
  uint64_t seq = 0;
  int64_t ts = 0;
  Loc loc;
  JournalOp op = JournalOp::kWrite;
  uint32_t off = 0;  // within the segment
  uint32_t len = 0;
  bool correction = false;  // replaces the record with the same seq and off
};

class Item;

struct Seg {
  std::vector<VEntry> versions;  // ascending seq
  std::deque<REntry> records;    // ascending seq
  uint32_t inflight = 0;         // writes sequenced but not yet applied to the primary
  uint64_t gen = 0;              // writes applied
  bool cow_pending = false;
  std::vector<Item*> applying;  // journaled writes now being applied to the primary
  bool empty() const { return versions.empty() && records.empty(); }
  // A journal record after `seq`: the primary no longer holds the content at seq.
  bool written_after(uint64_t seq) const { return !records.empty() && records.back().seq > seq; }
  // A base, or one being copied: nothing to copy ahead.
  bool holds_base() const { return !versions.empty() || cow_pending; }
  // A base no journal record pins and no write is using: it may be given up.
  bool speculative() const { return !versions.empty() && records.empty() && inflight == 0 && !cow_pending; }
};

struct Zone {
  ZoneKind kind = ZoneKind::kFree;
  uint64_t gen = 0;
  uint64_t used = 0;  // committed bytes (everything before is in the index)
  uint64_t live = 0;  // index entries in the zone
  uint64_t live_bytes = 0;
  int64_t max_ts = 0;
  bool open = false;
};

struct Tier {
  PoolDevice dev;
  pool::Superblock sb;
  std::vector<Zone> zones;  // usable zones only
};

// ---- a small binary writer/reader for the checkpoint ----
class Writer {
 public:
  template <typename T>
  void put(T v) {
    static_assert(std::is_trivially_copyable_v<T>);
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    out.insert(out.end(), p, p + sizeof(T));
  }
  std::vector<uint8_t> out;
};
class Reader {
 public:
  explicit Reader(std::span<const uint8_t> in) : in_(in) {}
  template <typename T>
  bool get(T& v) {
    if (pos_ + sizeof(T) > in_.size()) return false;
    std::memcpy(&v, in_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  bool done() const { return pos_ == in_.size(); }

 private:
  std::span<const uint8_t> in_;
  size_t pos_ = 0;
};
constexpr uint64_t kCheckpointMagic = 0x54504b4357444853ull;  // "SHDWCKPT"
constexpr uint32_t kCheckpointVersion = 1;

void put_loc(Writer& w, const Loc& l) {
  w.put(l.tier);
  w.put(l.zone);
  w.put(l.offset);
  w.put(l.bytes);
  w.put(l.gen);
}
bool get_loc(Reader& r, Loc& l) {
  return r.get(l.tier) && r.get(l.zone) && r.get(l.offset) && r.get(l.bytes) && r.get(l.gen);
}

class StoreImpl;

// One journaled request on its way: queued to the pool thread, then applied
// to the primary (this object is the primary op), then acknowledged.
class Item final : public BlockOp {
 public:
  enum class Type : uint8_t { kWrite, kFlush };
  struct Piece {
    uint64_t segment;
    pool::JournalRecord rec;
    Codec codec;
    std::span<const uint8_t> data;  // the record's payload: `packed`, or the client's buffer
    std::vector<uint8_t> packed;    // the compressed payload
  };
  Item(StoreImpl* s, EventLoop* l, BlockOp* c, Type t) : store(s), loop(l), client(c), type(t) {}
  void proceed();
  void on_done(Status st) override;

  StoreImpl* store;
  EventLoop* loop;
  BlockOp* client;
  Type type;
  bool bypass = false;  // history degraded: not journaled
  // The primary refused the write: the pool thread reads the range back and
  // journals what the primary holds in place of the request's records
  // (kJournalCorrection); then the request completes with `failure`.
  bool correcting = false;
  Status failure;
  uint64_t seq = 0;
  int64_t ts = 0;
  uint64_t first_seg = 0, last_seg = 0;
  std::vector<uint64_t> cow_segs;
  std::vector<Piece> pieces;
};

// Appends records to one stream of zones (one kind on one tier). Owned by
// one thread; zone bookkeeping goes through the store's lock.
class Appender {
 public:
  Appender(StoreImpl& s, uint8_t tier, ZoneKind kind) : s_(s), tier_(tier), kind_(kind) {}
  // Reserve room for a record of `bytes` and encode it with fn(out, gen).
  template <typename Fn>
  Result<Loc> add(size_t bytes, Fn fn);
  // Write what was added (padded to 4 KiB). Bookkeeping is committed by
  // commit() under the store lock, together with the index entries.
  Status write_out();
  // The asynchronous form (the journal's pipeline): what was added, padded,
  // in a buffer for one write at *dev_off; the appender moves on as if it
  // were written. Its zone bookkeeping goes with take_pending() into the
  // batch, committed when the write is known to have landed in order; a
  // failed write must be followed by reset_locked() once none is in flight.
  ABuf seal(uint64_t* dev_off, size_t* len);
  struct Pending {
    std::vector<std::pair<uint32_t, uint64_t>> used;  // (zone, used)
    std::vector<uint32_t> closed;
  };
  Pending take_pending() {
    Pending p{std::move(used_), std::move(closed_)};
    used_.clear();
    closed_.clear();
    return p;
  }
  // REQUIRES: store lock held.
  void commit_locked();
  void commit_locked(const Pending& p);
  // Called before a full zone is flushed and closed: the pipeline waits
  // there for its writes in flight, which the flush must cover.
  std::function<void()> before_close;
  // Forget the open zone (after an error): the next add opens a new one.
  void reset_locked();
  uint64_t pending_bytes() const { return buf_.size(); }
  // After recovery: go on appending to `zone` at `pos` (a batch boundary).
  void resume(uint32_t zone, uint64_t gen, uint64_t pos) {
    zone_ = zone;
    gen_ = gen;
    pos_ = pos;
  }
  ZoneKind kind() const { return kind_; }
  uint8_t tier() const { return tier_; }

 private:
  Status open_zone();
  // What was added, padded to 4 KiB, in an aligned buffer for one write at pos_.
  ABuf pack();
  // That write is issued (seal) or done (write_out): move past it.
  void advance();
  StoreImpl& s_;
  uint8_t tier_;
  ZoneKind kind_;
  int64_t zone_ = -1;
  uint64_t gen_ = 0;
  uint64_t pos_ = 0;  // zone offset where buf_ starts (written before it)
  std::vector<uint8_t> buf_;
  std::vector<std::pair<uint32_t, uint64_t>> used_;  // (zone, used) not yet committed
  std::vector<uint32_t> closed_;                     // zones filled, not yet committed
};

// One group commit of the journal: encoded by the pool thread, written
// asynchronously (up to kBatchesInFlight at a time, so that the next batch
// is on its way while one completes), retired strictly in order. Only a
// retired batch's records enter the index and only then do its requests
// go on to the primary, so every write the primary sees was preceded by
// its record and every record before it: as if the batches were written
// one after another.
struct Batch final : public BlockOp {
  void on_done(Status s) override {
    write_status = std::move(s);
    done = true;
  }
  std::vector<Item*> items;
  std::vector<std::pair<uint64_t, VEntry>> versions;
  std::vector<std::pair<uint64_t, REntry>> records;
  uint64_t cows = 0;
  uint64_t corrections = 0;  // refused requests whose records are replaced
  bool need_flush = false;
  bool degraded = false;  // encoded while history was degraded: nothing journaled
  Status st;              // encoding failed
  Appender::Pending pending;
  ABuf data;
  bool done = true;  // no write in flight
  bool overlapped = false;  // written while an earlier batch's write was in flight
  Status write_status;
  bool failed() const { return !st || !write_status; }
};

constexpr size_t kBatchesInFlight = 4;
// A warning repeated while a condition lasts goes to the log at most every
// 10 s: true (and `last` becomes `now`, monotonic ns) when one is due.
bool log_due(uint64_t& last, uint64_t now) {
  if (last != 0 && now - last < 10 * kNs) return false;
  last = now;
  return true;
}
// Zones of tier 0 the journal leaves to the work that frees the others: one
// for a checkpoint, one more for the folds and moves that come before it.
constexpr uint32_t kJournalReserveZones = 2;
constexpr uint64_t kBusyWindowNs = 200'000'000;  // clients active: a request this recent
constexpr double kUrgentScore = 1e18;

class StoreImpl final : public ShadowStore, public Monitor::HistorySink {
 public:
  StoreImpl(std::vector<Tier> tiers, std::shared_ptr<IoBackend> primary, const StoreOptions& o,
            const Clock& clock, Monitor* monitor)
      : tiers_(std::move(tiers)), primary_(std::move(primary)), opts_(o), clock_(clock),
        monitor_(monitor), journal_(*this, 0, ZoneKind::kJournal),
        history_(*this, 0, ZoneKind::kHistory) {
    seg_bytes_ = tiers_[0].sb.segment_bytes;
    shift_ = static_cast<uint32_t>(__builtin_ctz(seg_bytes_));
    zone_bytes_ = tiers_[0].sb.zone_bytes;
    epoch_ns_ = tiers_[0].sb.epoch_ns;
    retention_start_ = epoch_ns_;
    last_ts_ = epoch_ns_;
    budget_ = o.shadow_budget_bytes_per_s;
    auto pol = make_policy(o.policy, o.policy_params, monitor);
    if (!pol) pol = make_policy(PolicyKind::kLru, o.policy_params, monitor);  // open() checked it
    policy_ = std::move(*pol);
    for (size_t t = 0; t < tiers_.size(); ++t) {
      versions_.push_back(std::make_unique<Appender>(*this, static_cast<uint8_t>(t), ZoneKind::kVersions));
    }
    backend_ = std::make_shared<JournalBackend>(*this);
  }
  ~StoreImpl() override {
    if (pool_thread_.joinable() || shadow_thread_.joinable() || state_thread_.joinable()) abandon();
    if (monitor_) monitor_->set_history_sink(nullptr);
    // Completions still held (abandoned: the process "died" before they
    // were acknowledged) are never answered.
    for (auto& [it, st] : held_) delete it;
  }
  // The store that records degraded episodes (open() sets it before recover()).
  void set_state_store(std::shared_ptr<DegradedStateStore> s) { state_ = std::move(s); }

  Status recover();

  // ---- ShadowStore ----
  std::shared_ptr<IoBackend> backend() override { return backend_; }
  void start() override;
  Status stop() override;
  void abandon() override;
  uint32_t segment_bytes() const override { return seg_bytes_; }
  StoreStats stats() const override;
  std::vector<ZoneInfo> zones() const override;
  std::vector<SegmentHistory> segments(uint64_t first, size_t limit) const override;
  std::optional<SegmentHistory> segment(uint64_t id) const override;
  void set_budget(uint64_t bps) override {
    std::lock_guard<std::mutex> lock(mu_);
    budget_ = bps;
  }
  void set_retention(uint64_t seconds) override {
    std::lock_guard<std::mutex> lock(mu_);
    opts_.retention_seconds = seconds;
    wake_shadow();
  }
  void set_policy_params(const PolicyParams& p) override {
    std::lock_guard<std::mutex> g(op_mu_);
    opts_.policy_params = p;
    policy_->set_params(p);
  }
  PolicyParams policy_params() const override {
    std::lock_guard<std::mutex> g(const_cast<StoreImpl*>(this)->op_mu_);
    return opts_.policy_params;
  }
  void set_max_versions(uint32_t n) override {
    std::lock_guard<std::mutex> g(op_mu_);
    opts_.max_versions_per_segment = std::clamp<uint32_t>(n, 2, 64);
  }
  Status shadow_segment(uint64_t segment) override {
    std::lock_guard<std::mutex> g(op_mu_);
    return make_version(segment, true);
  }
  Status prune(int64_t start_ns) override {
    std::lock_guard<std::mutex> g(op_mu_);
    return prune_locked(start_ns);
  }
  Status checkpoint() override {
    std::lock_guard<std::mutex> g(op_mu_);
    return checkpoint_locked();
  }
  void shadow_round() override {
    std::lock_guard<std::mutex> g(op_mu_);
    tick();
  }
  Result<std::vector<uint8_t>> reconstruct_seq(uint64_t segment, uint64_t seq) override {
    return reconstruct(segment, true, static_cast<int64_t>(seq));
  }
  Result<std::vector<uint8_t>> reconstruct_time(uint64_t segment, int64_t t) override {
    return reconstruct(segment, false, t);
  }
  uint64_t seq_at(int64_t time_ns) const override;
  int64_t time_of(uint64_t seq) const override;
  void pin(int64_t t) override {
    std::lock_guard<std::mutex> lock(mu_);
    pins_.insert(t);
  }
  void unpin(int64_t t) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto f = pins_.find(t);
    if (f != pins_.end()) pins_.erase(f);
  }
  Result<SegmentAt> reconstruct_at(uint64_t segment, uint64_t seq) override {
    SegmentAt out;
    auto r = reconstruct(segment, true, static_cast<int64_t>(seq), &out);
    if (!r) return r.status();
    out.data = std::move(*r);
    return out;
  }
  uint32_t source_of(uint64_t segment, uint64_t seq) const override {
    std::lock_guard<std::mutex> lock(mu_);
    auto f = segs_.find(segment);
    if (f == segs_.end() || !f->second.written_after(seq)) {
      return kFromPrimary;
    }
    const Seg& sg = f->second;
    uint64_t vseq = 0;
    for (const VEntry& v : sg.versions) {
      if (v.seq <= seq) vseq = v.seq;
    }
    for (const REntry& r : sg.records) {
      if (r.seq > vseq && r.seq <= seq) return kFromVersion | kFromJournal;
    }
    return kFromVersion;
  }
  Result<bool> read_primary_at(uint64_t offset, uint64_t length, uint64_t seq,
                               uint8_t* out) override;
  std::vector<uint64_t> segments_changed_after(uint64_t seq) const override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<uint64_t> out;
    for (const auto& [id, sg] : segs_) {
      if (sg.written_after(seq)) out.push_back(id);
    }
    std::sort(out.begin(), out.end());
    return out;
  }
  uint64_t stable_seq() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return inflight_seqs_.empty() ? last_seq_ : inflight_seqs_.begin()->first - 1;
  }
  VerifyReport verify_pool() override;
  Status check_index() const override {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, s] : segs_) {
      auto bad = [&](const std::string& what) {
        return Status::error(Status::Code::kCorruption, "segment " + std::to_string(id) + ": " + what, EIO);
      };
      for (size_t i = 0; i < s.versions.size(); ++i) {
        const VEntry& v = s.versions[i];
        if (i > 0 && s.versions[i - 1].seq >= v.seq) return bad("versions out of order");
        if (i > 0 && s.versions[i - 1].ts > v.ts) return bad("version times out of order");
        if (v.depth > 0) {
          auto f = std::find_if(s.versions.begin(), s.versions.begin() + i,
                                [&](const VEntry& b) { return b.seq == v.base_seq; });
          if (f == s.versions.begin() + i) {
            return bad("version " + std::to_string(v.seq) + " lost its base " + std::to_string(v.base_seq));
          }
        }
      }
      for (size_t i = 1; i < s.records.size(); ++i) {
        if (s.records[i - 1].seq > s.records[i].seq) return bad("records out of order");
      }
      if (!s.records.empty() && (s.versions.empty() || s.versions.front().seq >= s.records.front().seq)) {
        return bad("records without a base version");
      }
    }
    return Status::ok();
  }

  // ---- HistorySink (called under the monitor's lock) ----
  void append(const HistoryRecord& r) override {
    std::lock_guard<std::mutex> lock(hist_mu_);
    if (hist_.size() < (1u << 22)) hist_.push_back(r);
  }

  // ---- the data path ----
  void submit(EventLoop& loop, BlockOp* op);
  void apply(Item* it);
  void item_done(Item& it, const Status& st);
  // Answer the client of a finished item (and delete it).
  static void finish(Item* it, const Status& st);
  bool must_wait_locked(const Item& it) const;
  IoBackend& primary() { return *primary_; }

  // ---- for Appender ----
  Result<std::pair<uint32_t, uint64_t>> alloc_zone(uint8_t tier, ZoneKind kind);
  Result<std::pair<uint32_t, uint64_t>> alloc_journal_zone();
  uint64_t zone_offset(uint32_t zone) const { return pool::kZonesStart + uint64_t{zone} * zone_bytes_; }
  uint32_t zone_bytes() const { return zone_bytes_; }
  IoBackend& device(uint8_t tier) { return *tiers_[tier].dev.backend; }
  const pool::Uuid& uuid() const { return tiers_[0].sb.pool_uuid; }
  mutable std::mutex mu_;  // the index, zones, sequence, state
  std::vector<Tier> tiers_;
  uint64_t pool_bytes_written_ = 0;  // guarded by mu_

 private:
  class JournalBackend final : public IoBackend {
   public:
    explicit JournalBackend(StoreImpl& s) : s_(s), info_(s.primary_->info()) {
      info_.can_trim = true;
      info_.can_zero = true;
    }
    const BackendInfo& info() const override { return info_; }
    void submit(EventLoop& loop, BlockOp* op) override { s_.submit(loop, op); }
    Result<Extent> extent_at(uint64_t offset, uint64_t max_len) override {
      return s_.primary_->extent_at(offset, max_len);
    }

   protected:
    void on_cqe(BlockOp&, int) override {}

   private:
    StoreImpl& s_;
    BackendInfo info_;
  };

  uint32_t seg_len(uint64_t seg) const {
    const uint64_t start = seg << shift_;
    return static_cast<uint32_t>(std::min<uint64_t>(seg_bytes_, primary_->size_bytes() - start));
  }
  int64_t next_ts_locked() {
    int64_t t = clock_.now_ns();
    if (t <= last_ts_) t = last_ts_ + 1;
    last_ts_ = t;
    return t;
  }
  void enter_degraded(const std::string& why);
  // REQUIRES: mu_ held. Starts a degraded episode (unless one is on): the
  // state file is to record it, completions wait for that.
  void enter_degraded_locked(const std::string& why);
  // ---- the state file (mu_ held) ----
  void want_state_locked(bool present, const DegradedState& s = {});
  // Answer the completions held for the state file.
  void release_held_locked();
  void state_main();
  // Write (or remove) the state file as `want` says, on a worker thread;
  // completions held longer than the timeout meanwhile are released.
  // Returns how it went (*flushed: whether the primary is flushed).
  Status run_state_job(bool present, const DegradedState& want, bool* flushed);
  void wake_shadow() {
    {
      std::lock_guard<std::mutex> l(shadow_cv_mu_);
      shadow_wake_ = true;
    }
    shadow_cv_.notify_one();
  }

  // pool thread
  void pool_main();
  std::unique_ptr<Batch> encode(std::vector<Item*>& items, EventLoop& loop);
  Status encode_correction(Item& it, Batch& b);
  void retire(Batch& b, bool& broken);
  void enqueue(Item* it);
  // shadow thread and engine operations (op_mu_ held)
  void shadow_main();
  void tick();
  void round_locked();
  Status make_version(uint64_t seg, bool force);
  Status prune_locked(int64_t w, bool lean = false);
  Status checkpoint_locked();
  Status shrink_locked();
  Status compact_locked();
  Status try_restart_locked();
  Status enforce_max_versions(uint64_t seg);
  void flush_history();
  Status flush_all_pool();
  Status write_version(uint8_t tier, uint64_t seg, const VEntry& proto, std::span<const uint8_t> content,
                       const std::vector<uint8_t>* base, VEntry& out);
  bool is_hot(uint64_t seg) const;
  uint32_t free_zones_locked(uint8_t tier) const;
  uint32_t low_water_locked(uint8_t tier) const;
  // Some tier has fewer free zones than its low water plus `margin`.
  bool any_tier_below_locked(uint32_t margin = 0) const;

  // reading
  Result<std::vector<uint8_t>> read_record(const Loc& loc, pool::Record& rec);
  Result<std::vector<uint8_t>> version_content(const std::vector<VEntry>& versions, size_t idx);
  Status apply_record(const REntry& r, std::vector<uint8_t>& content);
  // Over every segment's newest record at or before `bound` (a seq when
  // by_seq, else a time): the largest seq and the largest time (0 if none).
  struct Newest {
    uint64_t seq = 0;
    int64_t ts = 0;
  };
  Newest newest_records_locked(bool by_seq, int64_t bound) const;
  // in_window: refuse a bound before the retention window (a fold may
  // need one: a lean prune leaves the history of busy segments behind).
  Result<std::vector<uint8_t>> reconstruct(uint64_t seg, bool by_seq, int64_t bound,
                                           SegmentAt* meta = nullptr, bool in_window = true);
  Result<std::vector<uint8_t>> read_primary(uint64_t seg);

  // index bookkeeping (mu_ held)
  void add_version_locked(uint64_t seg, const VEntry& v);
  void add_record_locked(uint64_t seg, const REntry& r);
  void unref_locked(const Loc& l);
  void ref_locked(const Loc& l, int64_t ts);

  // recovery
  void repair_versions_locked(Seg& s);
  Status load_checkpoint(std::vector<std::vector<Zone>>& ckpt_zones, uint64_t& applied_through,
                         uint64_t& ckpt_next_gen);
  std::vector<uint8_t> serialize_locked(uint64_t applied_through,
                                        const std::set<std::pair<uint8_t, uint32_t>>& freeing);

  std::shared_ptr<IoBackend> primary_;
  StoreOptions opts_;
  const Clock& clock_;
  Monitor* monitor_;
  std::shared_ptr<JournalBackend> backend_;
  uint32_t seg_bytes_ = 0, shift_ = 0, zone_bytes_ = 0;
  int64_t epoch_ns_ = 0;

  // guarded by mu_
  std::unordered_map<uint64_t, Seg> segs_;
  uint64_t last_seq_ = 0;
  int64_t last_ts_ = 0;
  int64_t retention_start_ = 0;
  uint64_t window_seq_ = 0;  // the last seq with time <= retention_start_
  std::map<uint64_t, int64_t> inflight_seqs_;
  std::multiset<int64_t> pins_;  // times point-in-time exports show
  std::map<uint64_t, Item*> blocked_;  // journaled writes waiting for an overlapping one  // seq -> time of writes not yet applied
  uint64_t next_gen_ = 1;
  bool degraded_ = false;
  std::string degraded_reason_;
  uint64_t bypass_inflight_ = 0;
  // The state file (core/degraded_state.h), guarded by mu_: what it should
  // hold and what it is known to hold durably. Only the state thread writes
  // it once the store runs.
  std::shared_ptr<DegradedStateStore> state_;
  bool state_want_present_ = false;
  DegradedState state_want_;
  bool state_have_present_ = false;
  uint64_t state_gen_ = 0;         // bumped with every change of the wanted state
  uint64_t state_done_gen_ = 0;    // the wanted state the file holds (== state_gen_: nothing to do)
  uint64_t state_retry_at_ = 0;    // monotonic ns: after a failure, not before
  std::string state_error_;        // the last failure ("" none)
  bool state_stop_ = false, state_abandon_ = false;
  std::condition_variable state_cv_;
  std::thread state_thread_;
  uint64_t episode_ = 0;           // degraded episodes since open
  // From the start of an episode until the state file records it (or it
  // failed or took too long, or history restarted): completions of writes
  // and flushes wait here instead of being acknowledged.
  bool acks_held_ = false;
  uint64_t held_since_ = 0;  // monotonic ns
  std::vector<std::pair<Item*, Status>> held_;
  bool warned_no_state_ = false;
  bool retention_shrunk_ = false;
  uint64_t budget_ = 0;
  std::atomic<bool> fg_seen_{false};  // a client request since the last shadowing round
  std::atomic<bool> fg_busy_{false};  // as of the last shadowing round
  std::set<uint64_t> urgent_;
  uint64_t checkpoint_id_ = 0;
  uint64_t sb_generation_ = 0;
  std::vector<uint32_t> ckpt_zones_;
  int64_t last_checkpoint_ns_ = 0;
  uint64_t shadow_queue_ = 0;
  // counters
  uint64_t journal_corrections_ = 0;
  uint64_t pool_full_waits_ = 0, pool_full_wait_ns_ = 0;  // journal writes held for room (mu_)
  uint64_t pool_full_logged_ns_ = 0, shrink_logged_ns_ = 0;
  bool pool_full_waiting_ = false;
  std::atomic<std::thread::id> pool_tid_{};  // the pool thread (only it waits for room)
  bool pool_room_ = false;  // (qmu_) a checkpoint freed zones
  uint64_t client_bytes_ = 0, cow_stalls_ = 0, versions_made_ = 0, versions_folded_ = 0,
           versions_dropped_ = 0, records_pruned_ = 0, zones_reclaimed_ = 0, retention_shrinks_ = 0,
           checkpoints_ = 0, group_commits_ = 0, group_commits_overlapped_ = 0, pool_errors_ = 0, primary_write_errors_ = 0,
           shadow_bytes_read_ = 0, recovered_records_ = 0, redo_records_ = 0, redo_skipped_ = 0;
  bool checkpoint_due_ = false;

  std::mutex op_mu_;  // serialises engine operations (shadow thread, tests)
  Appender journal_;  // pool thread
  Appender history_;  // op_mu_
  std::vector<std::unique_ptr<Appender>> versions_;  // op_mu_, one per tier

  // pool thread queue
  std::mutex qmu_;
  std::condition_variable qcv_;
  std::vector<Item*> queue_;
  EventLoop* pool_loop_ = nullptr;  // the pool thread's ring, while it runs
  bool pool_waiting_ = false;       // the pool thread waits on its ring, not on qcv_
  bool pool_stop_ = false;
  bool pool_abandon_ = false;
  std::thread pool_thread_;

  // shadow thread
  std::mutex shadow_cv_mu_;
  std::condition_variable shadow_cv_;
  bool shadow_wake_ = false;
  bool shadow_stop_ = false;
  std::thread shadow_thread_;
  double tokens_ = 0;
  double busy_tokens_ = 0;
  uint64_t last_refill_ns_ = 0;
  int64_t last_refill_clock_ns_ = 0;
  uint64_t last_fg_ns_ = 0;
  int64_t last_restart_try_ns_ = 0;
  // Segments a background copy could not read from the primary (a bad
  // range): left alone until the monotonic time given (op_mu_).
  std::map<uint64_t, uint64_t> unreadable_;

  std::mutex hist_mu_;
  std::vector<HistoryRecord> hist_;

  // The shadowing policy (shadow thread and op_mu_ only: not thread-safe)
  // and the accesses it has yet to see, queued by the I/O path.
  std::unique_ptr<ShadowPolicy> policy_;
  struct Access {
    uint64_t seg;
    int64_t t_ns;
    predict::Op op;
  };
  static constexpr size_t kMaxQueuedAccesses = 1 << 16;
  static constexpr uint64_t kMaxAccessSegments = 64;  // per request
  std::mutex feed_mu_;
  std::vector<Access> feed_;
  uint64_t feed_dropped_ = 0;
  std::atomic<uint64_t> policy_mem_{0};
  std::vector<ShadowPolicy::ForecastError> forecast_errors_;  // feed_mu_
  void feed(predict::Op op, uint64_t first, uint64_t last);
  // Give up speculative bases, lowest value first, until about `bytes` of
  // stored versions are released (op_mu_ held).
  uint64_t drop_speculative_locked(uint64_t bytes);  // returns how many were given up
  // The speculative bases by the policy's value, lowest first (op_mu_ held).
  std::vector<std::pair<double, uint64_t>> speculative_by_value_locked();
  // Gives up one speculative base (mu_ held): the bytes its versions held,
  // or nothing if the segment holds no speculative base now.
  std::optional<uint64_t> give_up_speculative_mu(uint64_t id);
  // Two tiers: move the versions of segments ranked hot to the fast tier,
  // and, while the fast tier runs low, those of segments no longer hot to
  // the slow one (op_mu_ held; a few per round).
  Status migrate_tiers_locked();
  // After version records were written to `tier` (st: how that went): flush
  // the tier; on failure go degraded and drop what the appender holds.
  Status seal_versions(uint8_t tier, Status st, const char* what);
  uint64_t promoted_ = 0, demoted_ = 0;  // mu_
  // guarded by mu_
  std::unordered_set<uint64_t> ahead_;  // copied ahead, not yet written
  uint64_t copies_ahead_ = 0, copies_ahead_used_ = 0, spec_hits_ = 0, spec_dropped_ = 0, bases_freed_ = 0;
  uint64_t spec_replaced_ = 0;  // of spec_dropped_, for a copy ahead worth more
};

// ---------------------------------------------------------------------------
// Appender

template <typename Fn>
Result<Loc> Appender::add(size_t bytes, Fn fn) {
  if (zone_ < 0 || pos_ + buf_.size() + bytes + 2 * kB > s_.zone_bytes()) {
    if (zone_ >= 0) {
      if (before_close) before_close();
      if (!buf_.empty()) {
        Status st = write_out();
        if (!st) return st;
      }
      // A stream is a log across zones: nothing may reach the next zone
      // before the last one is durable, or a crash could keep a later batch
      // and lose an earlier one, and recovery would find a hole.
      Status st = sync_io(s_.device(tier_), BlockOpKind::kFlush, 0, 0, nullptr);
      if (!st) return st;
      closed_.push_back(static_cast<uint32_t>(zone_));
      zone_ = -1;
    }
    Status st = open_zone();
    if (!st) return st;
  }
  Loc loc;
  loc.tier = tier_;
  loc.zone = static_cast<uint32_t>(zone_);
  loc.offset = static_cast<uint32_t>(pos_ + buf_.size());
  loc.gen = gen_;
  const size_t before = buf_.size();
  fn(buf_, gen_);
  loc.bytes = static_cast<uint32_t>(buf_.size() - before);
  return loc;
}

Status Appender::open_zone() {
  auto z = kind_ == ZoneKind::kJournal ? s_.alloc_journal_zone() : s_.alloc_zone(tier_, kind_);
  if (!z) return z.status();
  zone_ = z->first;
  gen_ = z->second;
  pos_ = 0;
  buf_.clear();
  pool::ZoneHeader h;
  h.kind = kind_;
  h.tier = tier_;
  h.zone_index = static_cast<uint32_t>(zone_);
  h.pool_uuid = s_.uuid();
  h.opened_ns = 0;
  pool::encode_zone_header(buf_, gen_, h);
  return Status::ok();
}

ABuf Appender::pack() {
  pool::pad_to_block(buf_, gen_);
  ABuf a = aligned_buf(buf_.size());
  std::memcpy(a.get(), buf_.data(), buf_.size());
  return a;
}

void Appender::advance() {
  pos_ += buf_.size();
  {
    std::lock_guard<std::mutex> lock(s_.mu_);  // the byte counter only
    s_.pool_bytes_written_ += buf_.size();
  }
  buf_.clear();
  used_.emplace_back(static_cast<uint32_t>(zone_), pos_);
}

ABuf Appender::seal(uint64_t* dev_off, size_t* len) {
  if (buf_.empty() || zone_ < 0) return nullptr;
  ABuf a = pack();
  *dev_off = s_.zone_offset(static_cast<uint32_t>(zone_)) + pos_;
  *len = buf_.size();
  advance();
  return a;
}

Status Appender::write_out() {
  if (buf_.empty() || zone_ < 0) return Status::ok();
  ABuf a = pack();
  Status st = sync_io(s_.device(tier_), BlockOpKind::kWrite, s_.zone_offset(static_cast<uint32_t>(zone_)) + pos_,
                      buf_.size(), a.get());
  if (!st) return st;
  advance();
  return Status::ok();
}

void Appender::commit_locked() {
  commit_locked(take_pending());
}

void Appender::commit_locked(const Pending& p) {
  for (auto [z, used] : p.used) {
    Zone& zone = s_.tiers_[tier_].zones[z];
    zone.used = std::max(zone.used, used);
  }
  for (uint32_t z : p.closed) s_.tiers_[tier_].zones[z].open = false;
}

void Appender::reset_locked() {
  commit_locked();
  if (zone_ >= 0) s_.tiers_[tier_].zones[zone_].open = false;
  zone_ = -1;
  buf_.clear();
}

// ---------------------------------------------------------------------------
// zones and index bookkeeping

Result<std::pair<uint32_t, uint64_t>> StoreImpl::alloc_zone(uint8_t tier, ZoneKind kind) {
  std::lock_guard<std::mutex> lock(mu_);
  Tier& t = tiers_[tier];
  // Keep zones of tier 0 for the work that frees the others: one for a
  // checkpoint, one more for the folds and moves that come before it.
  const uint32_t reserve = tier != 0 || kind == ZoneKind::kCheckpoint ? 0
                           : kind == ZoneKind::kVersions           ? 1
                                                                    : kJournalReserveZones;
  if (free_zones_locked(tier) <= reserve) {
    wake_shadow();
    return Status::error(Status::Code::kNoSpace,
                         "pool tier " + std::to_string(tier) + " (" + t.dev.path + ") has no free zone",
                         ENOSPC);
  }
  for (uint32_t i = 0; i < t.zones.size(); ++i) {
    Zone& z = t.zones[i];
    if (z.kind != ZoneKind::kFree) continue;
    z = Zone{};
    z.kind = kind;
    z.gen = next_gen_++;
    z.open = true;
    if (free_zones_locked(tier) < low_water_locked(tier)) wake_shadow();
    return std::make_pair(i, z.gen);
  }
  return Status::error(Status::Code::kNoSpace, "no free zone", ENOSPC);
}

// The journal's next zone. When tier 0 is down to the zones kept for the
// work that frees the others, the pool thread waits (its batch, and so the
// writes in it, wait) while the shadow thread cuts retention, for at most
// pool_full_wait_ms, rather than fail the append and degrade history:
// writes slow down to the rate at which the pool is reclaimed.
Result<std::pair<uint32_t, uint64_t>> StoreImpl::alloc_journal_zone() {
  auto z = alloc_zone(0, ZoneKind::kJournal);
  if (z || z.status().code() != Status::Code::kNoSpace || opts_.pool_full_wait_ms == 0 ||
      std::this_thread::get_id() != pool_tid_.load(std::memory_order_relaxed)) {
    return z;
  }
  const uint64_t start = monotonic_ns(), limit = uint64_t{opts_.pool_full_wait_ms} * 1'000'000;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++pool_full_waits_;
    pool_full_waiting_ = true;
    if (log_due(pool_full_logged_ns_, start)) {
      spdlog::warn("pool tier 0 is full: journal writes wait (up to {} ms at a time) while retention is cut "
                   "({} times so far)",
                   opts_.pool_full_wait_ms, pool_full_waits_);
    }
  }
  for (;;) {
    wake_shadow();
    {
      std::unique_lock<std::mutex> q(qmu_);
      qcv_.wait_for(q, std::chrono::milliseconds(10), [&] { return pool_room_ || pool_abandon_; });
      pool_room_ = false;
      if (pool_abandon_) break;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (degraded_) break;
    }
    z = alloc_zone(0, ZoneKind::kJournal);
    if (z || z.status().code() != Status::Code::kNoSpace || monotonic_ns() - start >= limit) break;
  }
  std::lock_guard<std::mutex> lock(mu_);
  pool_full_waiting_ = false;
  pool_full_wait_ns_ += monotonic_ns() - start;
  if (!z) {
    spdlog::error("pool tier 0 stayed full for {} ms: the journal cannot go on", opts_.pool_full_wait_ms);
  }
  return z;
}

uint32_t StoreImpl::free_zones_locked(uint8_t tier) const {
  uint32_t n = 0;
  for (const Zone& z : tiers_[tier].zones) n += z.kind == ZoneKind::kFree;
  return n;
}

void StoreImpl::ref_locked(const Loc& l, int64_t ts) {
  Zone& z = tiers_[l.tier].zones[l.zone];
  ++z.live;
  z.live_bytes += l.bytes;
  z.max_ts = std::max(z.max_ts, ts);
}

void StoreImpl::unref_locked(const Loc& l) {
  Zone& z = tiers_[l.tier].zones[l.zone];
  if (z.gen != l.gen) return;
  if (z.live > 0) --z.live;
  z.live_bytes -= std::min<uint64_t>(z.live_bytes, l.bytes);
  if (z.live == 0 && !z.open) checkpoint_due_ = true;
}

void StoreImpl::add_version_locked(uint64_t seg, const VEntry& v) {
  Seg& s = segs_[seg];
  auto it = std::lower_bound(s.versions.begin(), s.versions.end(), v.seq,
                             [](const VEntry& e, uint64_t q) { return e.seq < q; });
  if (it != s.versions.end() && it->seq == v.seq) {
    unref_locked(it->loc);
    *it = v;
  } else {
    s.versions.insert(it, v);
  }
  ref_locked(v.loc, v.ts);
}

void StoreImpl::add_record_locked(uint64_t seg, const REntry& r) {
  if (r.correction) {
    // Replaces the refused request's record; gone (history restarted
    // since) means there is nothing to correct.
    auto f = segs_.find(seg);
    if (f == segs_.end()) return;
    for (REntry& e : f->second.records) {
      if (e.seq == r.seq && e.off == r.off) {
        unref_locked(e.loc);
        e = r;
        ref_locked(e.loc, e.ts);
        ++f->second.gen;
        return;
      }
    }
    return;
  }
  Seg& s = segs_[seg];
  if (s.records.empty() || s.records.back().seq < r.seq ||
      (s.records.back().seq == r.seq && s.records.back().off < r.off)) {
    s.records.push_back(r);
  } else {
    auto it = std::lower_bound(s.records.begin(), s.records.end(), r.seq,
                               [](const REntry& e, uint64_t q) { return e.seq < q; });
    s.records.insert(it, r);
  }
  ref_locked(r.loc, r.ts);
  if (r.seq > last_seq_) last_seq_ = r.seq;
  if (r.ts > last_ts_) last_ts_ = r.ts;
}

void StoreImpl::enter_degraded(const std::string& why) {
  std::lock_guard<std::mutex> lock(mu_);
  ++pool_errors_;
  enter_degraded_locked(why);
}

void StoreImpl::enter_degraded_locked(const std::string& why) {
  if (degraded_) return;
  degraded_ = true;
  degraded_reason_ = why;
  ++episode_;
  spdlog::error("history degraded: {} (the export keeps serving; history restarts when the pool works)",
                why);
  if (state_ && state_done_gen_ == state_gen_ && state_have_present_ && state_want_.seq >= last_seq_) {
    // The file already says so (an attempt to restart history failed before
    // any seq was handed out): nothing to write, nothing to wait for.
  } else if (state_) {
    // From here on writes bypass the journal. No seq is handed out while
    // degraded, so every record the journal holds or will hold from before
    // has seq <= last_seq_: the state file says that none of them may be
    // re-applied. Until it is durable, nothing is acknowledged (item_done).
    DegradedState d;
    if (state_want_present_) {
      // History has not restarted since (an attempt to restart it handed
      // out sequence numbers, then failed): degraded since then, for the
      // same reason; the backing was flushed then, and is not again.
      d = state_want_;
    } else {
      d.since_ns = clock_.now_ns();
      d.reason = why;
    }
    d.pool_uuid = uuid();
    d.primary_id = opts_.primary_id;
    d.seq = last_seq_;
    want_state_locked(true, d);
    acks_held_ = true;
    held_since_ = monotonic_ns();
  } else if (!warned_no_state_) {
    warned_no_state_ = true;
    spdlog::warn("history degraded without a state directory: if shadowd stops or crashes before "
                 "history restarts, the next start may re-apply older journal records over writes "
                 "acknowledged meanwhile");
  }
  wake_shadow();
}

void StoreImpl::want_state_locked(bool present, const DegradedState& d) {
  state_want_present_ = present;
  state_want_ = d;
  ++state_gen_;
  state_retry_at_ = 0;
  state_cv_.notify_all();
}

void StoreImpl::finish(Item* it, const Status& st) {
  BlockOp* client = it->client;
  delete it;
  client->on_done(st);
}

void StoreImpl::release_held_locked() {
  acks_held_ = false;
  for (auto& [it, st] : held_) {
    it->loop->post([it = it, st = st] { finish(it, st); });
  }
  held_.clear();
}

Status StoreImpl::run_state_job(bool present, const DegradedState& want, bool* flushed) {
  // On a worker, so that a file system that hangs holds completions for the
  // timeout at most (the state thread waits for the worker either way).
  struct Job {
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    bool flushed = false;
    Status st;
  };
  auto job = std::make_shared<Job>();
  std::thread worker([this, present, want, job] {
    Status st;
    if (present) {
      DegradedState d = want;
      // The primary first: every write acknowledged before history degraded
      // is then durable on it, so not re-applying the journal's records at
      // the next start loses none of them, not even after a power failure.
      // (The file's claim does not depend on it: see docs/FORMAT.md.)
      if (!d.primary_flushed) {
        Status fs = sync_io(*primary_, BlockOpKind::kFlush, 0, 0, nullptr);
        d.primary_flushed = fs.is_ok();
        if (!fs) spdlog::error("primary flush as history degraded: {}", fs.message());
      }
      st = state_->save(d);
      std::lock_guard<std::mutex> l(job->m);
      job->flushed = d.primary_flushed;
    } else {
      st = state_->clear();
    }
    std::lock_guard<std::mutex> l(job->m);
    job->st = std::move(st);
    job->done = true;
    job->cv.notify_all();
  });
  // Completions held longer than the timeout (this episode's or, while an
  // earlier job hangs, a later one's) are answered without the file.
  const uint64_t timeout_ns = uint64_t{opts_.state_timeout_ms} * 1'000'000;
  for (;;) {
    uint64_t wait_ns = timeout_ns;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (acks_held_) {
        const uint64_t held_for = monotonic_ns() - held_since_;
        if (held_for >= timeout_ns) {
          spdlog::critical("history degraded and the state file {} is not written after {} ms (the "
                           "flush of the backing before it, or the file's own write, is that slow): "
                           "writes are acknowledged without it from now on; until it is written or "
                           "history restarts, a crash or stop of shadowd may let the next start "
                           "re-apply older journal records over them",
                           state_->where(), opts_.state_timeout_ms);
          release_held_locked();
        } else {
          wait_ns = timeout_ns - held_for;
        }
      }
    }
    std::unique_lock<std::mutex> l(job->m);
    if (job->cv.wait_for(l, std::chrono::nanoseconds(wait_ns), [&] { return job->done; })) break;
  }
  worker.join();
  if (flushed) *flushed = job->flushed;
  return job->st;
}

void StoreImpl::state_main() {
  std::unique_lock<std::mutex> lock(mu_);
  bool last_try = false;
  for (;;) {
    if (state_abandon_) break;
    const bool pending = state_done_gen_ != state_gen_;
    if (state_stop_ && (!pending || last_try)) break;
    const uint64_t now = monotonic_ns();
    if (!state_stop_ && (!pending || now < state_retry_at_)) {
      if (pending) {
        state_cv_.wait_for(lock, std::chrono::nanoseconds(state_retry_at_ - now));
      } else {
        state_cv_.wait(lock);
      }
      continue;
    }
    last_try = state_stop_;  // stopping: one more try, then leave
    const bool present = state_want_present_;
    const DegradedState want = state_want_;
    const uint64_t gen = state_gen_;
    const uint64_t episode = episode_;
    lock.unlock();
    bool flushed = false;
    Status st = run_state_job(present, want, &flushed);
    lock.lock();
    if (st) {
      state_have_present_ = present;
      state_done_gen_ = gen;
      if (present && gen == state_gen_) state_want_.primary_flushed = flushed;
      if (!state_error_.empty()) {
        spdlog::warn("state file {} {} now", state_->where(), present ? "written" : "removed");
        state_error_.clear();
      }
      if (present) {
        spdlog::info("state file {}: history degraded at seq {}; a start re-applies no journal record "
                     "up to it",
                     state_->where(), want.seq);
        if (acks_held_ && episode == episode_) release_held_locked();
      }
    } else {
      const bool first = state_error_ != st.message();
      state_error_ = st.message();
      state_retry_at_ = monotonic_ns() + kNs;
      if (present) {
        if (first) {
          spdlog::critical("history degraded and the state file cannot be written: {}; writes are "
                           "acknowledged without it (retrying every second): until it is written or "
                           "history restarts, a crash or stop of shadowd may let the next start "
                           "re-apply older journal records over them",
                           st.message());
        }
        if (acks_held_ && episode == episode_) release_held_locked();
      } else if (first) {
        spdlog::warn("{} (retrying every second; while it stays, a start restarts history)", st.message());
      }
    }
  }
}

// ---------------------------------------------------------------------------
// data path

void StoreImpl::submit(EventLoop& loop, BlockOp* op) {
  // Read first: the flag's cache line is written once per shadowing round,
  // not once per request.
  if (!fg_seen_.load(std::memory_order_relaxed)) fg_seen_.store(true, std::memory_order_relaxed);
  if (op->kind == BlockOpKind::kRead || op->kind == BlockOpKind::kCache ||
      (op->length == 0 && op->kind != BlockOpKind::kFlush)) {
    if (op->length > 0) feed(predict::Op::kRead, op->offset >> shift_, (op->offset + op->length - 1) >> shift_);
    primary_->submit(loop, op);
    return;
  }
  if (op->kind == BlockOpKind::kFlush) {
    enqueue(new Item(this, &loop, op, Item::Type::kFlush));
    return;
  }
  auto* it = new Item(this, &loop, op, Item::Type::kWrite);
  it->first_seg = op->offset >> shift_;
  it->last_seg = (op->offset + op->length - 1) >> shift_;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (degraded_) {
      it->bypass = true;
      ++bypass_inflight_;
    } else {
      it->seq = ++last_seq_;
      it->ts = next_ts_locked();
      inflight_seqs_[it->seq] = it->ts;
      for (uint64_t s = it->first_seg; s <= it->last_seg; ++s) {
        Seg& st = segs_[s];
        if (!st.versions.empty() && st.records.empty() && st.inflight == 0) {
          ++spec_hits_;  // a speculative base saved this write a copy
          if (ahead_.erase(s)) ++copies_ahead_used_;
        }
        ++st.inflight;
        if (st.versions.empty() && !st.cow_pending) {
          st.cow_pending = true;
          it->cow_segs.push_back(s);
        }
        if (st.records.size() >= opts_.max_records_per_segment) urgent_.insert(s);
      }
      if (op->kind == BlockOpKind::kWrite) client_bytes_ += op->length;
    }
  }
  feed(predict::Op::kWrite, it->first_seg, it->last_seg);
  if (it->bypass) {
    it->proceed();
    return;
  }
  // Cut into per-segment records, compressing writes here on the I/O thread.
  const JournalOp jop = op->kind == BlockOpKind::kWrite       ? JournalOp::kWrite
                        : op->kind == BlockOpKind::kTrim      ? JournalOp::kTrim
                                                              : JournalOp::kWriteZeroes;
  uint64_t pos = op->offset;
  const uint64_t end = op->offset + op->length;
  while (pos < end) {
    const uint64_t seg = pos >> shift_;
    const uint64_t piece_end = std::min(end, (seg + 1) << shift_);
    Item::Piece p;
    p.segment = seg;
    p.rec.seq = it->seq;
    p.rec.time_ns = it->ts;
    p.rec.op = jop;
    p.rec.offset = pos;
    p.rec.length = static_cast<uint32_t>(piece_end - pos);
    p.codec = Codec::kNone;
    if (jop == JournalOp::kWrite) {
      // The client's buffer lives until the request is answered, so an
      // incompressible payload is not copied: the record points at it.
      p.data = std::span<const uint8_t>(op->buf + (pos - op->offset), p.rec.length);
      if (zstd_compress_smaller(p.data, opts_.journal_zstd_level, p.packed)) {
        p.codec = Codec::kZstd;
        p.data = p.packed;
      }
    }
    it->pieces.push_back(std::move(p));
    pos = piece_end;
  }
  enqueue(it);
}

void StoreImpl::feed(predict::Op op, uint64_t first, uint64_t last) {
  const int64_t t = clock_.now_ns();
  last = std::min(last, first + kMaxAccessSegments - 1);
  std::lock_guard<std::mutex> lock(feed_mu_);
  if (feed_.size() + (last - first + 1) > kMaxQueuedAccesses) {
    feed_dropped_ += last - first + 1;
    return;
  }
  for (uint64_t s = first; s <= last; ++s) feed_.push_back(Access{s, t, op});
}

void StoreImpl::enqueue(Item* it) {
  std::lock_guard<std::mutex> q(qmu_);
  queue_.push_back(it);
  if (pool_waiting_) {
    // The pool thread sleeps on its ring for a batch write: wake it there.
    pool_waiting_ = false;
    pool_loop_->post([] {});
  }
  qcv_.notify_one();
}

void Item::proceed() {
  if (correcting) {  // corrected in the journal: completes with the primary's error
    const Status st = failure;  // a copy: completing deletes this item
    store->item_done(*this, st);
    return;
  }
  if (type == Type::kFlush) {
    kind = BlockOpKind::kFlush;
    offset = 0;
    length = 0;
    flags = 0;
  } else {
    offset = client->offset;
    length = client->length;
    buf = client->buf;
    if (client->kind == BlockOpKind::kWrite) {
      kind = BlockOpKind::kWrite;
      flags = client->flags & kFua;
    } else if (client->kind == BlockOpKind::kTrim) {
      // A TRIM leaves zeroes, so that the journal knows what it left.
      kind = BlockOpKind::kWriteZeroes;
      flags = client->flags & kFua;
    } else {
      kind = BlockOpKind::kWriteZeroes;
      flags = client->flags & (kFua | kNoHole);
    }
  }
  store->apply(this);
}

void Item::on_done(Status st) { store->item_done(*this, st); }

bool overlaps(const Item& a, const Item& b) {
  return a.client->offset < b.client->offset + b.client->length &&
         b.client->offset < a.client->offset + a.client->length;
}

// Overlapping writes reach the primary in journal order: a write waits
// while an earlier overlapping one is being applied (the kernel may reorder
// requests in flight, and the journal's order must be the device's).
bool StoreImpl::must_wait_locked(const Item& it) const {
  for (uint64_t s = it.first_seg; s <= it.last_seg; ++s) {
    auto f = segs_.find(s);
    if (f == segs_.end()) continue;
    for (const Item* a : f->second.applying) {
      if (overlaps(*a, it)) return true;
    }
  }
  for (const auto& [seq, b] : blocked_) {
    if (seq >= it.seq) break;
    if (overlaps(*b, it)) return true;
  }
  return false;
}

void StoreImpl::apply(Item* it) {
  if (it->type == Item::Type::kWrite && !it->bypass) {
    std::lock_guard<std::mutex> lock(mu_);
    if (must_wait_locked(*it)) {
      blocked_.emplace(it->seq, it);
      return;
    }
    for (uint64_t s = it->first_seg; s <= it->last_seg; ++s) segs_[s].applying.push_back(it);
  }
  primary_->submit(*it->loop, it);
}

void StoreImpl::item_done(Item& it, const Status& st) {
  std::unique_lock<std::mutex> lock(mu_);
  if (it.type == Item::Type::kWrite && !it.bypass && !st && !it.correcting) {
    // The journal says the request's bytes are there, the primary may hold
    // anything in the range now. The request stays in flight (later
    // overlapping writes wait, its records are not folded) until the pool
    // thread has journaled what the primary holds.
    ++primary_write_errors_;
    it.correcting = true;
    it.failure = st;
    it.cow_segs.clear();
    spdlog::warn("primary {} at {} (+{}) failed: {}; reading the range back to correct the journal",
                 op_name(it.client->kind), it.client->offset, it.client->length, st.message());
    lock.unlock();
    enqueue(&it);
    return;
  }
  if (it.type == Item::Type::kWrite) {
    if (it.bypass) {
      --bypass_inflight_;
    } else {
      for (uint64_t s = it.first_seg; s <= it.last_seg; ++s) {
        Seg& sg = segs_[s];
        --sg.inflight;
        ++sg.gen;
        std::erase(sg.applying, &it);
      }
      inflight_seqs_.erase(it.seq);
      // Writes that waited for this one may go now (in journal order).
      for (auto b = blocked_.begin(); b != blocked_.end();) {
        Item* w = b->second;
        b = blocked_.erase(b);
        if (must_wait_locked(*w)) {
          b = blocked_.emplace(w->seq, w).first;
          ++b;
          continue;
        }
        for (uint64_t s = w->first_seg; s <= w->last_seg; ++s) segs_[s].applying.push_back(w);
        w->loop->post([this, w] { primary_->submit(*w->loop, w); });
      }
    }
    if (!st && it.bypass) {
      ++primary_write_errors_;
      spdlog::warn("primary {} at {} (+{}) failed: {}", op_name(it.client->kind), it.client->offset,
                   it.client->length, st.message());
    }
  }
  // History is degraded and the state file does not record it yet: a write
  // (or a flush that vouches for writes) answered now could be undone by
  // the next start's replay of the journal. Held until the file is durable.
  if (acks_held_) {
    held_.emplace_back(&it, st);
    return;
  }
  lock.unlock();  // the client may submit more from its callback
  finish(&it, st);
}

void StoreImpl::pool_main() {
  EventLoop& loop = thread_loop();
  {
    std::lock_guard<std::mutex> q(qmu_);
    pool_loop_ = &loop;
  }
  pool_tid_.store(std::this_thread::get_id(), std::memory_order_relaxed);
  std::deque<std::unique_ptr<Batch>> inflight;
  auto writes_done = [&] {
    return std::all_of(inflight.begin(), inflight.end(), [](const auto& b) { return b->done; });
  };
  // A full zone is flushed before the journal moves on: the flush must
  // cover every write to it, so wait for those in flight first.
  journal_.before_close = [&] {
    while (!writes_done()) loop.run_once(true);
  };
  bool broken = false;  // a batch failed: the ones after it are past a hole
  for (;;) {
    // No new batch while one in flight has failed: the journal forgets its
    // zone once they are all retired, and starts again from there.
    const bool hold = broken || std::any_of(inflight.begin(), inflight.end(), [](const auto& b) {
                        return b->failed() && b->done;
                      });
    std::vector<Item*> items;
    bool leave = false;
    {
      std::unique_lock<std::mutex> q(qmu_);
      if (inflight.empty()) qcv_.wait(q, [&] { return !queue_.empty() || pool_stop_; });
      leave = pool_abandon_ || (pool_stop_ && queue_.empty() && inflight.empty());
      if (!leave && !hold && inflight.size() < kBatchesInFlight) items.swap(queue_);
      pool_waiting_ = !leave && items.empty() && !inflight.empty();
    }
    if (leave) break;
    if (!items.empty()) {
      const bool overlapped = !writes_done();
      inflight.push_back(encode(items, loop));
      inflight.back()->overlapped = overlapped && !inflight.back()->done;
      loop.run_once(false);  // submit it; reap what is done
    } else {
      loop.run_once(true);  // a write completes, or enqueue() wakes us
    }
    while (!inflight.empty() && inflight.front()->done) {
      retire(*inflight.front(), broken);
      inflight.pop_front();
    }
    if (broken && inflight.empty()) {
      std::lock_guard<std::mutex> lock(mu_);
      journal_.reset_locked();
      broken = false;
    }
  }
  journal_.before_close();  // abandoned: the writes still point at our buffers
  journal_.before_close = nullptr;
  std::lock_guard<std::mutex> q(qmu_);
  pool_loop_ = nullptr;
  pool_waiting_ = false;
}

std::unique_ptr<Batch> StoreImpl::encode(std::vector<Item*>& items, EventLoop& loop) {
  auto b = std::make_unique<Batch>();
  b->items.swap(items);
  bool degraded;
  uint64_t cow_seq;
  int64_t cow_ts;
  {
    std::lock_guard<std::mutex> lock(mu_);
    degraded = degraded_;
    cow_seq = window_seq_;
    cow_ts = retention_start_;
  }
  b->degraded = degraded;
  Status& st = b->st;
  for (Item* it : b->items) {
    if (it->type == Item::Type::kFlush) {
      b->need_flush = true;
      continue;
    }
    if (it->client->flags & kFua) b->need_flush = true;
    if (degraded || !st) continue;
    if (it->correcting) {
      st = encode_correction(*it, *b);
      continue;
    }
    for (uint64_t seg : it->cow_segs) {
      // Copy-on-first-write: the before-image goes into the journal stream
      // ahead of the record, so no scan can find the record without it.
      auto content = read_primary(seg);
      if (!content) {
        st = Status::error(content.status().code(),
                           "primary read for a copy-on-first-write failed: " + content.status().message(),
                           content.status().err());
        break;
      }
      ++b->cows;
      std::vector<uint8_t> payload = zstd_compress(*content, opts_.journal_zstd_level);
      pool::VersionRecord vr;
      vr.segment = seg;
      vr.seq = cow_seq;
      vr.time_ns = cow_ts;
      vr.segment_bytes = static_cast<uint32_t>(content->size());
      vr.tier = 0;
      vr.depth = 0;
      vr.content_xxh = pool::xxh64(*content);
      auto loc = journal_.add(pool::version_record_bytes(payload.size()),
                              [&](std::vector<uint8_t>& out, uint64_t gen) {
                                pool::encode_version(out, gen, vr, payload);
                              });
      if (!loc) {
        st = loc.status();
        break;
      }
      VEntry v;
      v.seq = vr.seq;
      v.ts = vr.time_ns;
      v.loc = *loc;
      v.xxh = vr.content_xxh;
      v.raw = vr.segment_bytes;
      v.cow = true;
      b->versions.emplace_back(seg, v);
    }
    if (!st) continue;
    for (Item::Piece& p : it->pieces) {
      const std::span<const uint8_t> payload = p.data;
      auto loc = journal_.add(pool::journal_record_bytes(payload.size()),
                              [&](std::vector<uint8_t>& out, uint64_t gen) {
                                pool::encode_journal(out, gen, p.rec, p.codec, payload);
                              });
      if (!loc) {
        st = loc.status();
        break;
      }
      REntry r;
      r.seq = p.rec.seq;
      r.ts = p.rec.time_ns;
      r.loc = *loc;
      r.op = p.rec.op;
      r.off = static_cast<uint32_t>(p.rec.offset - (p.segment << shift_));
      r.len = p.rec.length;
      b->records.emplace_back(p.segment, r);
    }
  }
  if (degraded || !b->st) return b;
  uint64_t off = 0;
  size_t len = 0;
  b->data = journal_.seal(&off, &len);
  b->pending = journal_.take_pending();
  if (b->data) {
    b->kind = BlockOpKind::kWrite;
    b->offset = off;
    b->length = len;
    b->buf = b->data.get();
    b->flags = 0;
    b->done = false;
    device(0).submit(loop, b.get());
  }
  return b;
}

// The records that replace a refused request's: per piece, what the primary
// reads back in its range (whole segments are read: the primary may want
// aligned I/O).
Status StoreImpl::encode_correction(Item& it, Batch& b) {
  uint64_t have_seg = ~0ull;
  std::vector<uint8_t> content;
  for (Item::Piece& p : it.pieces) {
    if (p.segment != have_seg) {
      auto c = read_primary(p.segment);
      if (!c) {
        return Status::error(c.status().code(),
                             "reading back a range the primary refused to write failed: " + c.status().message(),
                             c.status().err());
      }
      content = std::move(*c);
      have_seg = p.segment;
    }
    pool::JournalRecord rec = p.rec;
    rec.op = JournalOp::kWrite;
    rec.flags = pool::kJournalCorrection;
    const uint64_t in_seg = rec.offset - (p.segment << shift_);
    const std::span<const uint8_t> raw(content.data() + in_seg, rec.length);
    std::vector<uint8_t> packed;
    const bool z = zstd_compress_smaller(raw, opts_.journal_zstd_level, packed);
    const std::span<const uint8_t> payload = z ? std::span<const uint8_t>(packed) : raw;
    auto loc = journal_.add(pool::journal_record_bytes(payload.size()), [&](std::vector<uint8_t>& out, uint64_t gen) {
      pool::encode_journal(out, gen, rec, z ? Codec::kZstd : Codec::kNone, payload);
    });
    if (!loc) return loc.status();
    REntry r;
    r.seq = rec.seq;
    r.ts = rec.time_ns;
    r.loc = *loc;
    r.op = JournalOp::kWrite;
    r.off = static_cast<uint32_t>(in_seg);
    r.len = rec.length;
    r.correction = true;
    b.records.emplace_back(p.segment, r);
  }
  ++b.corrections;
  return Status::ok();
}

void StoreImpl::retire(Batch& b, bool& broken) {
  Status st = !b.st ? b.st : b.write_status;
  if (!b.degraded && !broken && st && b.need_flush) {
    st = sync_io(device(0), BlockOpKind::kFlush, 0, 0, nullptr);
  }
  if (!b.degraded && !broken && !st) {
    broken = true;
    enter_degraded(b.st ? "journal append failed: " + st.message() : st.message());
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!b.degraded && !broken && degraded_) broken = true;  // degraded elsewhere meanwhile
    if (!b.degraded && !broken) {
      journal_.commit_locked(b.pending);
      for (auto& [seg, v] : b.versions) add_version_locked(seg, v);
      for (auto& [seg, r] : b.records) add_record_locked(seg, r);
      cow_stalls_ += b.cows;
      journal_corrections_ += b.corrections;
      ++group_commits_;
      group_commits_overlapped_ += b.overlapped;
    }
    for (Item* it : b.items) {
      for (uint64_t seg : it->cow_segs) segs_[seg].cow_pending = false;
    }
  }
  for (Item* it : b.items) {
    it->loop->post([it] { it->proceed(); });
  }
}

Result<bool> StoreImpl::read_primary_at(uint64_t offset, uint64_t length, uint64_t seq,
                                        uint8_t* out) {
  if (length == 0) return true;
  if (offset + length > primary_->size_bytes() || offset + length < offset) {
    return Status::out_of_range("read beyond the end of the device");
  }
  const uint64_t first = offset >> shift_, last = (offset + length - 1) >> shift_;
  std::vector<uint64_t> gens(last - first + 1, 0);
  uint64_t episode = 0;
  // reconstruct()'s from-primary rule for every segment; `note` records the
  // generations (and the degraded episodes: writes while degraded change
  // the primary without a generation), else they must not have changed.
  auto from_primary_locked = [&](bool note) {
    if (degraded_ || seq < window_seq_) return false;
    if (note) {
      episode = episode_;
    } else if (episode != episode_) {
      return false;
    }
    for (uint64_t s = first; s <= last; ++s) {
      auto f = segs_.find(s);
      const uint64_t g = f == segs_.end() ? 0 : f->second.gen;
      if (f != segs_.end()) {
        const Seg& sg = f->second;
        if (sg.inflight != 0 || sg.written_after(seq)) return false;
      }
      if (note) {
        gens[s - first] = g;
      } else if (gens[s - first] != g) {
        return false;
      }
    }
    return true;
  };
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!from_primary_locked(true)) return false;
  }
  // Through an aligned bounce buffer (the primary may be opened O_DIRECT).
  const uint64_t a0 = offset & ~(kB - 1);
  const uint64_t a1 = std::min(primary_->size_bytes(), (offset + length + kB - 1) & ~(kB - 1));
  ABuf a = aligned_buf(a1 - a0);
  Status st = sync_io(*primary_, BlockOpKind::kRead, a0, a1 - a0, a.get());
  if (!st) return st;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!from_primary_locked(false)) return false;
  }
  std::memcpy(out, a.get() + (offset - a0), length);
  return true;
}

Result<std::vector<uint8_t>> StoreImpl::read_primary(uint64_t seg) {
  const uint32_t n = seg_len(seg);
  ABuf a = aligned_buf(n);
  Status st = sync_io(*primary_, BlockOpKind::kRead, seg << shift_, n, a.get());
  if (!st) return st;
  return std::vector<uint8_t>(a.get(), a.get() + n);
}

// ---------------------------------------------------------------------------
// reading records and reconstruction

Result<std::vector<uint8_t>> StoreImpl::read_record(const Loc& loc, pool::Record& rec) {
  const uint64_t start = uint64_t{loc.offset} & ~(kB - 1);
  const uint64_t end = round_up(uint64_t{loc.offset} + loc.bytes, kB);
  ABuf a = aligned_buf(end - start);
  Status st = sync_io(device(loc.tier), BlockOpKind::kRead, zone_offset(loc.zone) + start, end - start, a.get());
  if (!st) return st;
  std::span<const uint8_t> view(a.get() + (loc.offset - start), loc.bytes);
  pool::DecodeError e = pool::decode_record(view, loc.gen, rec);
  if (e != pool::DecodeError::kOk) {
    return Status::error(Status::Code::kCorruption,
                         "record at tier " + std::to_string(loc.tier) + " zone " + std::to_string(loc.zone) +
                             " offset " + std::to_string(loc.offset) + ": " + pool::decode_error_name(e),
                         EIO);
  }
  std::vector<uint8_t> payload(rec.payload.begin(), rec.payload.end());
  rec.payload = {};
  return payload;
}

Result<std::vector<uint8_t>> StoreImpl::version_content(const std::vector<VEntry>& versions, size_t idx) {
  // Walk back to the full image, then decode forward.
  std::vector<size_t> chain{idx};
  while (versions[chain.back()].depth > 0) {
    const uint64_t base = versions[chain.back()].base_seq;
    auto it = std::find_if(versions.begin(), versions.end(), [&](const VEntry& v) { return v.seq == base; });
    if (it == versions.end()) {
      return Status::error(Status::Code::kCorruption,
                           "version " + std::to_string(versions[chain.back()].seq) + " lost its base " +
                               std::to_string(base),
                           EIO);
    }
    chain.push_back(static_cast<size_t>(it - versions.begin()));
  }
  std::vector<uint8_t> content;
  for (auto c = chain.rbegin(); c != chain.rend(); ++c) {
    const VEntry& v = versions[*c];
    pool::Record rec;
    auto payload = read_record(v.loc, rec);
    if (!payload) return payload.status();
    if (rec.type != RecordType::kVersion) return Status::error(Status::Code::kCorruption, "not a version", EIO);
    std::vector<uint8_t> out(rec.version.segment_bytes);
    Status st = zstd_decompress(*payload, out, content);
    if (!st) return st;
    if (pool::xxh64(out) != rec.version.content_xxh) {
      return Status::error(Status::Code::kCorruption, "version content checksum mismatch", EIO);
    }
    content.swap(out);
  }
  return content;
}

Status StoreImpl::apply_record(const REntry& r, std::vector<uint8_t>& content) {
  if (r.off + uint64_t{r.len} > content.size()) {
    return Status::error(Status::Code::kCorruption, "journal record outside its segment", EIO);
  }
  if (r.op != JournalOp::kWrite) {
    std::memset(content.data() + r.off, 0, r.len);
    return Status::ok();
  }
  pool::Record rec;
  auto payload = read_record(r.loc, rec);
  if (!payload) return payload.status();
  if (rec.type != RecordType::kJournal || rec.journal.length != r.len) {
    return Status::error(Status::Code::kCorruption, "journal record does not match the index", EIO);
  }
  std::span<uint8_t> dst(content.data() + r.off, r.len);
  if (rec.codec == Codec::kZstd) return zstd_decompress(*payload, dst);
  if (payload->size() != r.len) return Status::error(Status::Code::kCorruption, "short journal payload", EIO);
  std::memcpy(dst.data(), payload->data(), r.len);
  return Status::ok();
}

Result<std::vector<uint8_t>> StoreImpl::reconstruct(uint64_t seg, bool by_seq, int64_t bound,
                                                    SegmentAt* meta, bool in_window) {
  if ((seg << shift_) >= primary_->size_bytes()) return Status::out_of_range("no such segment");
  auto in_bound = [&](uint64_t seq, int64_t ts) {
    return by_seq ? seq <= static_cast<uint64_t>(bound) : ts <= bound;
  };
  for (int attempt = 0; attempt < 100; ++attempt) {
    std::vector<VEntry> versions;
    std::vector<REntry> records;
    uint64_t gen0 = 0;
    bool from_primary = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (degraded_) return Status::error(Status::Code::kBusy, "history is degraded: " + degraded_reason_, EAGAIN);
      if (in_window && (by_seq ? static_cast<uint64_t>(bound) < window_seq_ : bound < retention_start_)) {
        return Status::out_of_range("before the retention window");
      }
      auto f = segs_.find(seg);
      const bool later = f != segs_.end() && !f->second.records.empty() &&
                         !in_bound(f->second.records.back().seq, f->second.records.back().ts);
      if (!later && (f == segs_.end() || f->second.inflight == 0)) {
        from_primary = true;
        gen0 = f == segs_.end() ? 0 : f->second.gen;
      } else {
        const Seg& s = f->second;
        int vi = -1;
        for (size_t i = 0; i < s.versions.size(); ++i) {
          if (in_bound(s.versions[i].seq, s.versions[i].ts)) vi = static_cast<int>(i);
        }
        if (vi < 0) return Status::out_of_range("no version of this segment at or before that time");
        versions = s.versions;
        const uint64_t vseq = s.versions[vi].seq;
        for (const REntry& r : s.records) {
          if (r.seq > vseq && in_bound(r.seq, r.ts)) records.push_back(r);
        }
        versions.resize(static_cast<size_t>(vi) + 1);
      }
    }
    if (from_primary) {
      auto c = read_primary(seg);
      if (!c) return c.status();
      std::lock_guard<std::mutex> lock(mu_);
      auto f = segs_.find(seg);
      const uint64_t g = f == segs_.end() ? 0 : f->second.gen;
      const uint32_t infl = f == segs_.end() ? 0 : f->second.inflight;
      if (g == gen0 && infl == 0) {
        if (meta != nullptr) *meta = SegmentAt{{}, kFromPrimary, 0, 0};
        return c;
      }
      continue;  // a write raced with the read: look again
    }
    auto content = version_content(versions, versions.size() - 1);
    if (!content) {
      if (content.status().code() == Status::Code::kCorruption && attempt < 3) continue;  // zone reused
      return content.status();
    }
    Status st;
    for (const REntry& r : records) {
      st = apply_record(r, *content);
      if (!st) break;
    }
    if (!st) {
      if (st.code() == Status::Code::kCorruption && attempt < 3) continue;
      return st;
    }
    if (meta != nullptr) {
      const uint32_t chain = uint32_t{versions.back().depth} + 1;  // the full image and its deltas
      *meta = SegmentAt{{},
                        kFromVersion | (records.empty() ? 0u : uint32_t{kFromJournal}),
                        chain, static_cast<uint32_t>(records.size())};
    }
    return content;
  }
  return Status::error(Status::Code::kBusy, "segment too busy to reconstruct", EAGAIN);
}

ShadowStore::VerifyReport StoreImpl::verify_pool() {
  VerifyReport rep;
  struct Scanned {
    uint64_t gen;
    uint64_t used;  // the committed bytes read: later appends start at or after it
    std::set<uint32_t> offsets;
  };
  std::map<std::pair<uint8_t, uint32_t>, Scanned> scanned;
  for (size_t t = 0; t < tiers_.size(); ++t) {
    for (uint32_t z = 0;; ++z) {
      uint64_t gen, used;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (z >= tiers_[t].zones.size()) break;
        const Zone& zn = tiers_[t].zones[z];
        if (zn.kind == ZoneKind::kFree || zn.used == 0) continue;
        gen = zn.gen;
        used = zn.used;
      }
      const uint64_t len = round_up(used, kB);
      ABuf a = aligned_buf(len);
      Status st = sync_io(device(static_cast<uint8_t>(t)), BlockOpKind::kRead, zone_offset(z), len, a.get());
      const std::string where = "tier " + std::to_string(t) + " zone " + std::to_string(z);
      if (!st) {
        rep.errors.push_back(where + ": read failed: " + st.message());
        continue;
      }
      Scanned sc{gen, used, {}};
      auto end = pool::scan_records(std::span<const uint8_t>(a.get(), used), gen, 0,
                                    [&](const pool::Record& rec, uint64_t off) {
                                      ++rep.records_checked;
                                      rep.bytes_checked += rec.total_bytes;
                                      if (rec.type == RecordType::kVersion) ++rep.versions_checked;
                                      sc.offsets.insert(static_cast<uint32_t>(off));
                                    });
      ++rep.zones_scanned;
      bool reused;
      {
        std::lock_guard<std::mutex> lock(mu_);
        reused = tiers_[t].zones[z].gen != gen || tiers_[t].zones[z].kind == ZoneKind::kFree;
      }
      if (reused) continue;  // reclaimed while it was read: nothing of it is in the index
      if (end.next_offset < used) {
        rep.errors.push_back(where + ": record at offset " + std::to_string(end.next_offset) + " of the " +
                             std::to_string(used) + " committed bytes is damaged (" +
                             pool::decode_error_name(end.stop) + ")");
      }
      scanned[{static_cast<uint8_t>(t), z}] = std::move(sc);
    }
  }
  // Every index entry must point at a record found by the scan.
  std::vector<std::pair<uint64_t, std::vector<VEntry>>> all_versions;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto check = [&](uint64_t seg, const char* what, uint64_t seq, const Loc& l) {
      auto f = scanned.find({l.tier, l.zone});
      if (f == scanned.end() || f->second.gen != l.gen) return;  // reclaimed or not scanned
      if (l.offset >= f->second.used) return;  // appended after the scan read the zone
      if (f->second.offsets.count(l.offset) == 0) {
        rep.errors.push_back("segment " + std::to_string(seg) + ": " + what + " seq " + std::to_string(seq) +
                             " points at tier " + std::to_string(l.tier) + " zone " + std::to_string(l.zone) +
                             " offset " + std::to_string(l.offset) + ", where no intact record starts");
      }
    };
    for (const auto& [id, sg] : segs_) {
      for (const VEntry& v : sg.versions) check(id, "version", v.seq, v.loc);
      for (const REntry& r : sg.records) {
        if (r.op == JournalOp::kWrite) check(id, "journal record", r.seq, r.loc);
      }
      if (!sg.versions.empty()) all_versions.emplace_back(id, sg.versions);
    }
  }
  // Every version decodes to content with its checksum (chains included).
  for (auto& [id, vs] : all_versions) {
    for (size_t i = 0; i < vs.size(); ++i) {
      auto c = version_content(vs, i);
      if (!c) {
        // A version pruned while we read it is not damage: check it is still indexed.
        std::lock_guard<std::mutex> lock(mu_);
        auto f = segs_.find(id);
        const bool still = f != segs_.end() && std::any_of(f->second.versions.begin(), f->second.versions.end(),
                                                            [&](const VEntry& v) { return v.seq == vs[i].seq; });
        if (still) {
          rep.errors.push_back("segment " + std::to_string(id) + ": version seq " + std::to_string(vs[i].seq) +
                               ": " + c.status().message());
        }
      }
    }
  }
  return rep;
}

StoreImpl::Newest StoreImpl::newest_records_locked(bool by_seq, int64_t bound) const {
  Newest n;
  for (const auto& [id, sg] : segs_) {
    for (auto it = sg.records.rbegin(); it != sg.records.rend(); ++it) {
      if (by_seq ? it->seq <= static_cast<uint64_t>(bound) : it->ts <= bound) {
        n.seq = std::max(n.seq, it->seq);
        n.ts = std::max(n.ts, it->ts);
        break;
      }
    }
  }
  return n;
}

int64_t StoreImpl::time_of(uint64_t seq) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (seq >= last_seq_) return last_ts_;
  return std::max(retention_start_, newest_records_locked(true, static_cast<int64_t>(seq)).ts);
}

uint64_t StoreImpl::seq_at(int64_t t) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (t >= last_ts_) return last_seq_;
  return std::max(t >= retention_start_ ? window_seq_ : uint64_t{0}, newest_records_locked(false, t).seq);
}

// ---------------------------------------------------------------------------
// versions

bool StoreImpl::is_hot(uint64_t seg) const {
  if (!monitor_ || tiers_.size() < 2) return true;
  auto top = monitor_->top_k(1024);
  return std::find(top.begin(), top.end(), seg) != top.end();
}

Status StoreImpl::flush_all_pool() {
  for (size_t t = 0; t < tiers_.size(); ++t) {
    Status st = sync_io(device(static_cast<uint8_t>(t)), BlockOpKind::kFlush, 0, 0, nullptr);
    if (!st) return st;
  }
  return Status::ok();
}

Status StoreImpl::write_version(uint8_t tier, uint64_t seg, const VEntry& proto,
                                std::span<const uint8_t> content, const std::vector<uint8_t>* base,
                                VEntry& out) {
  std::vector<uint8_t> payload = zstd_compress(content, opts_.version_zstd_level);
  out = proto;
  out.depth = 0;
  out.base_seq = 0;
  if (base) {
    std::vector<uint8_t> delta = zstd_compress(content, opts_.version_zstd_level, *base);
    if (delta.size() < payload.size()) {
      payload.swap(delta);
      out.depth = static_cast<uint16_t>(proto.depth);
      out.base_seq = proto.base_seq;
    }
  }
  pool::VersionRecord vr;
  vr.segment = seg;
  vr.seq = out.seq;
  vr.time_ns = out.ts;
  vr.segment_bytes = static_cast<uint32_t>(content.size());
  vr.tier = tier;
  vr.depth = out.depth;
  vr.base_seq = out.base_seq;
  vr.content_xxh = pool::xxh64(content);
  out.xxh = vr.content_xxh;
  out.raw = vr.segment_bytes;
  Appender& app = *versions_[tier];
  auto loc = app.add(pool::version_record_bytes(payload.size()), [&](std::vector<uint8_t>& o, uint64_t gen) {
    pool::encode_version(o, gen, vr, payload);
  });
  if (!loc) return loc.status();
  out.loc = *loc;
  return app.write_out();
}

Status StoreImpl::make_version(uint64_t seg, bool force) {
  if ((seg << shift_) >= primary_->size_bytes()) return Status::out_of_range("no such segment");
  std::vector<uint8_t> content;
  std::vector<VEntry> prev;
  VEntry proto;
  for (int attempt = 0;; ++attempt) {
    uint64_t g0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (degraded_) return Status::error(Status::Code::kBusy, "history is degraded", EAGAIN);
      Seg& s = segs_[seg];
      if (s.inflight == 0 && !s.cow_pending) {
        const bool history = !s.empty();
        if (!force && history && !s.versions.empty() &&
            !s.written_after(s.versions.back().seq)) {
          return Status::ok();  // the newest version is current
        }
        g0 = s.gen;
        // A segment without history has not changed inside the window: its
        // content is valid from the window start on.
        proto.seq = history ? last_seq_ : window_seq_;
        proto.ts = history ? next_ts_locked() : retention_start_;
        if (!s.versions.empty() && proto.seq <= s.versions.back().seq) return Status::ok();
        prev = s.versions;
      } else {
        g0 = ~0ull;
      }
    }
    if (g0 != ~0ull) {
      auto c = read_primary(seg);
      if (!c) {
        // No version now, which costs history nothing (a version only
        // shortens a replay or saves a later copy); the shadow thread leaves
        // the segment alone for a while. A write's copy-on-first-write that
        // cannot read it still degrades history (encode()).
        spdlog::warn("primary read of segment {} for a version failed: {}; retrying in {} s", seg,
                     c.status().message(), kUnreadableRetryNs / kNs);
        unreadable_[seg] = monotonic_ns() + kUnreadableRetryNs;
        return Status::error(Status::Code::kBusy, "primary read for a version failed: " + c.status().message(),
                             c.status().err());
      }
      std::lock_guard<std::mutex> lock(mu_);
      shadow_bytes_read_ += c->size();
      Seg& s = segs_[seg];
      if (s.inflight == 0 && s.gen == g0) {
        content = std::move(*c);
        break;
      }
    }
    if (attempt >= 50) return Status::error(Status::Code::kBusy, "segment kept changing during the copy", EAGAIN);
    std::this_thread::sleep_for(std::chrono::microseconds(200));  // let the racing writes finish
  }
  // The journal records the copy saw must not be less durable than the
  // version. On tier 0 they are on the same device, written before it, and
  // the flush after the version covers both; a version on another tier
  // needs tier 0 flushed first. The primary needs no flush: whatever of it
  // a crash loses is redone from the journal at start-up (records after the
  // checkpoint's applied_through), and pruning flushes it before it drops
  // records.
  const uint8_t tier = is_hot(seg) ? 0 : static_cast<uint8_t>(tiers_.size() - 1);
  Status st;
  if (tier != 0) st = sync_io(device(0), BlockOpKind::kFlush, 0, 0, nullptr);
  if (!st) {
    enter_degraded("flush before a version failed: " + st.message());
    return st;
  }
  std::vector<uint8_t> base;
  const std::vector<uint8_t>* basep = nullptr;
  if (!prev.empty() && prev.back().depth + 1u < opts_.full_every) {
    auto b = version_content(prev, prev.size() - 1);
    if (b) {
      base = std::move(*b);
      basep = &base;
      proto.depth = static_cast<uint16_t>(prev.back().depth + 1);
      proto.base_seq = prev.back().seq;
    }
  }
  VEntry v;
  st = seal_versions(tier, write_version(tier, seg, proto, content, basep, v), "version write");
  if (!st) return st;
  {
    std::lock_guard<std::mutex> lock(mu_);
    versions_[tier]->commit_locked();
    add_version_locked(seg, v);
    ++versions_made_;
    urgent_.erase(seg);
  }
  return enforce_max_versions(seg);
}

Status StoreImpl::enforce_max_versions(uint64_t seg) {
  for (;;) {
    std::vector<VEntry> vs;
    size_t base = 0;  // the version the window's replay starts from
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto f = segs_.find(seg);
      if (f == segs_.end() || f->second.versions.size() <= std::max<uint32_t>(2, opts_.max_versions_per_segment)) {
        return Status::ok();
      }
      vs = f->second.versions;
      for (size_t i = 0; i < vs.size(); ++i) {
        if (vs[i].ts <= retention_start_) base = i;
      }
    }
    // Drop a version no time of the window needs: one older than the
    // window's base version if there is one (kept as the base of a delta,
    // or brought back by a restart: versions dropped after the last
    // checkpoint are found again), else the one after the base. Never the
    // base itself: the window's replay starts there, and the records before
    // it are gone. A version that was a delta on the victim is rewritten as
    // a full image first.
    const VEntry victim = vs[base > 0 ? 0 : 1];
    for (size_t i = 0; i < vs.size(); ++i) {
      if (vs[i].depth == 0 || vs[i].base_seq != victim.seq) continue;
      auto c = version_content(vs, i);
      if (!c) return c.status();
      VEntry full;
      Status st = write_version(vs[i].loc.tier, seg, vs[i], *c, nullptr, full);
      if (st) st = sync_io(device(vs[i].loc.tier), BlockOpKind::kFlush, 0, 0, nullptr);
      if (!st) {
        enter_degraded("version rewrite failed: " + st.message());
        return st;
      }
      std::lock_guard<std::mutex> lock(mu_);
      versions_[vs[i].loc.tier]->commit_locked();
      add_version_locked(seg, full);  // replaces by seq
      // Later deltas keep pointing at the same seq: same content.
    }
    std::lock_guard<std::mutex> lock(mu_);
    Seg& s = segs_[seg];
    auto it = std::find_if(s.versions.begin(), s.versions.end(),
                           [&](const VEntry& v) { return v.seq == victim.seq; });
    if (it != s.versions.end()) {
      unref_locked(it->loc);
      s.versions.erase(it);
      ++versions_dropped_;
    }
  }
}

// ---------------------------------------------------------------------------
// retention

Status StoreImpl::prune_locked(int64_t w, bool lean) {
  std::vector<uint64_t> ids;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (degraded_) return Status::error(Status::Code::kBusy, "history is degraded", EAGAIN);
    w = std::min(w, last_ts_);
    // Only records the primary holds may be folded away (see below).
    if (!inflight_seqs_.empty()) w = std::min(w, inflight_seqs_.begin()->second - 1);
    if (w <= retention_start_) return Status::ok();
    ids.reserve(segs_.size());
    for (const auto& [id, s] : segs_) ids.push_back(id);
  }
  uint64_t new_window_seq = 0;
  uint64_t folded = 0, pruned = 0, dropped = 0, lean_fold_bytes = 0;
  // Lean (the pool is full): no speculative bases, so a segment whose
  // records all leave the window is dropped without a fold to write.
  const bool keeps_bases = policy_->keeps_bases() && !lean;
  struct Plan {
    uint64_t seg;
    VEntry start;
    bool fold;
    std::vector<std::pair<uint64_t, VEntry>> rewritten;
    bool drop = false;  // its whole history goes: the primary holds its content
  };
  std::vector<Plan> plans;
  // No room for the folds and rewrites: give up this prune (nothing in the
  // index changed; what was appended is unreferenced). A full pool's shrink
  // goes on with a lean prune, which writes little.
  auto give_up_no_room = [&](const Status& st) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& a : versions_) a->reset_locked();
    return st;
  };
  // (mu_ held) Nothing of the segment is written after w or on its way:
  // without speculative bases its history can go whole.
  auto quiet_since_w = [&](const Seg& s) {
    return (s.records.empty() || s.records.back().ts <= w) && s.inflight == 0 && !s.cow_pending;
  };
  // (mu_ held) Frees the segment's versions: its content is the primary's.
  auto free_base = [&](Seg& s) {
    for (const VEntry& v : s.versions) {
      unref_locked(v.loc);
      ++dropped;
    }
    s.versions.clear();
    ++bases_freed_;
  };
  for (uint64_t seg : ids) {
    std::vector<VEntry> vs;
    int vb = -1;
    uint64_t last_rec_seq = 0;
    int64_t last_rec_ts = 0;
    bool fold = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto f = segs_.find(seg);
      if (f == segs_.end()) continue;
      const Seg& s = f->second;
      for (size_t i = 0; i < s.versions.size(); ++i) {
        if (s.versions[i].ts <= w) vb = static_cast<int>(i);
      }
      for (const REntry& r : s.records) {
        if (r.ts > w) break;
        last_rec_seq = r.seq;
        last_rec_ts = r.ts;
      }
      if (vb < 0) continue;  // everything is newer than w
      new_window_seq = std::max(new_window_seq, last_rec_seq);
      if (!keeps_bases && quiet_since_w(s)) {
        plans.push_back(Plan{seg, {}, false, {}, true});
        continue;
      }
      // Lean: a segment written after w is folded while the folds fit in
      // half a zone (the one kept for them); past that it keeps its older
      // history for now (nothing of it is freed, every time still restores).
      if (lean && lean_fold_bytes >= zone_bytes_ / 2) continue;
      fold = last_rec_seq > s.versions[vb].seq;
      if (!fold && vb == 0) continue;  // nothing older than the base to free
      vs = s.versions;
    }
    // The version that will start this segment's window.
    VEntry start;
    std::vector<std::pair<uint64_t, VEntry>> rewritten;  // (old seq, new entry)
    if (fold) {
      auto c = reconstruct(seg, true, static_cast<int64_t>(last_rec_seq), nullptr, /*in_window=*/false);
      if (!c) {
        spdlog::error("prune: segment {} cannot be folded: {}", seg, c.status().message());
        enter_degraded("fold failed: " + c.status().message());
        return c.status();
      }
      VEntry proto;
      proto.seq = last_rec_seq;
      proto.ts = last_rec_ts;
      Status st = write_version(vs[vb].loc.tier, seg, proto, *c, nullptr, start);
      if (st) lean_fold_bytes += start.loc.bytes;
      if (!st && st.code() == Status::Code::kNoSpace) return give_up_no_room(st);
      if (!st) {
        enter_degraded("fold write failed: " + st.message());
        return st;
      }
      ++folded;
    } else {
      start = vs[vb];
      if (start.depth > 0) {
        auto c = version_content(vs, vb);
        if (!c) return c.status();
        Status st = write_version(start.loc.tier, seg, start, *c, nullptr, start);
        if (st) lean_fold_bytes += start.loc.bytes;
        if (!st && st.code() == Status::Code::kNoSpace) return give_up_no_room(st);
        if (!st) {
          enter_degraded("version rewrite failed: " + st.message());
          return st;
        }
      }
    }
    // A kept version that was a delta on one about to go becomes a full image.
    for (size_t i = vb + 1; i < vs.size(); ++i) {
      if (vs[i].depth > 0 && vs[i].base_seq < start.seq) {
        auto c = version_content(vs, i);
        if (!c) return c.status();
        VEntry full;
        Status st = write_version(vs[i].loc.tier, seg, vs[i], *c, nullptr, full);
        if (st) lean_fold_bytes += full.loc.bytes;
        if (!st && st.code() == Status::Code::kNoSpace) return give_up_no_room(st);
        if (!st) {
          enter_degraded("version rewrite failed: " + st.message());
          return st;
        }
        rewritten.emplace_back(vs[i].seq, full);
      }
    }
    plans.push_back(Plan{seg, start, fold, std::move(rewritten)});
  }
  // One flush makes every fold and rewrite durable before the index forgets
  // what they replace.
  // The primary is flushed too: a record the index forgets can no longer be
  // re-applied after a crash, so its write must be durable first.
  if (!plans.empty()) {
    Status st = flush_all_pool();
    if (st) st = sync_io(*primary_, BlockOpKind::kFlush, 0, 0, nullptr);
    if (!st) {
      enter_degraded("flush during prune failed: " + st.message());
      return st;
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    // The window moves before anything older than w is freed, in the same
    // locked section: a reconstruction never finds a segment emptied for a
    // time the window still claims, and a copy-on-first-write made after
    // this is stamped with the new start (the recovery floor).
    retention_start_ = std::max(retention_start_, w);
    window_seq_ = std::max({window_seq_, new_window_seq, last_ts_ <= w ? last_seq_ : 0});
    for (auto& a : versions_) a->commit_locked();
    for (Plan& p : plans) {
      const uint64_t seg = p.seg;
      const VEntry& start = p.start;
      const bool fold = p.fold;
      Seg& s = segs_[seg];
      if (p.drop) {
        // Unless a write came meanwhile (then it stays as it is: nothing
        // of it is freed, so every time in the window still restores).
        if (quiet_since_w(s)) {
          for (const REntry& r : s.records) {
            unref_locked(r.loc);
            ++pruned;
          }
          s.records.clear();
          free_base(s);
        }
        continue;
      }
      for (auto& [old_seq, v] : p.rewritten) add_version_locked(seg, v);
      // Remove versions older than the start, and records up to it.
      std::vector<VEntry> kept;
      for (VEntry& v : s.versions) {
        if (v.seq < start.seq || (v.seq == start.seq && fold)) {
          unref_locked(v.loc);
          ++dropped;
        } else if (v.seq == start.seq) {
          if (v.loc.gen != start.loc.gen || v.loc.offset != start.loc.offset || v.loc.zone != start.loc.zone) {
            unref_locked(v.loc);
            v = start;
            ref_locked(v.loc, v.ts);
          }
          kept.push_back(v);
        } else {
          kept.push_back(v);
        }
      }
      if (fold) {
        kept.insert(kept.begin(), start);
        ref_locked(start.loc, start.ts);
      }
      s.versions.swap(kept);
      while (!s.records.empty() && s.records.front().seq <= start.seq) {
        unref_locked(s.records.front().loc);
        s.records.pop_front();
        ++pruned;
      }
      // Its last record left the window: a policy that keeps no speculative
      // bases frees the base (the segment's content is the primary's).
      if (s.records.empty() && s.inflight == 0 && !s.cow_pending && !keeps_bases) free_base(s);
    }
  }
  Status st = flush_all_pool();
  pool::MarkerRecord m;
  {
    std::lock_guard<std::mutex> lock(mu_);
    m.kind = pool::MarkerKind::kRetention;
    m.seq = window_seq_;
    m.time_ns = w;
    versions_folded_ += folded;
    records_pruned_ += pruned;
    versions_dropped_ += dropped;
    for (auto it = segs_.begin(); it != segs_.end();) {
      if (it->second.empty() && it->second.inflight == 0 && !it->second.cow_pending) {
        it = segs_.erase(it);
      } else {
        ++it;
      }
    }
  }
  auto loc = versions_[0]->add(kB, [&](std::vector<uint8_t>& o, uint64_t gen) { pool::encode_marker(o, gen, m); });
  if (loc) st = versions_[0]->write_out();
  if (!loc || !st) {
    enter_degraded("marker write failed");
    return loc ? st : loc.status();
  }
  std::lock_guard<std::mutex> lock(mu_);
  versions_[0]->commit_locked();
  return Status::ok();
}

// ---------------------------------------------------------------------------
// checkpoints

std::vector<uint8_t> StoreImpl::serialize_locked(uint64_t applied_through,
                                                 const std::set<std::pair<uint8_t, uint32_t>>& freeing) {
  Writer w;
  w.put(kCheckpointMagic);
  w.put(kCheckpointVersion);
  w.put(last_seq_);
  w.put(last_ts_);
  w.put(retention_start_);
  w.put(window_seq_);
  w.put(applied_through);
  w.put(next_gen_);
  w.put(client_bytes_);
  w.put(pool_bytes_written_);
  w.put(cow_stalls_);
  w.put(static_cast<uint32_t>(tiers_.size()));
  for (size_t t = 0; t < tiers_.size(); ++t) {
    const Tier& tier = tiers_[t];
    w.put(static_cast<uint32_t>(tier.zones.size()));
    for (uint32_t i = 0; i < tier.zones.size(); ++i) {
      const Zone& z = tier.zones[i];
      const bool free = z.kind == ZoneKind::kFree || freeing.count({static_cast<uint8_t>(t), i}) > 0;
      w.put(static_cast<uint8_t>(free ? ZoneKind::kFree : z.kind));
      w.put(free ? uint64_t{0} : z.gen);
      w.put(free ? uint64_t{0} : z.used);
      w.put(static_cast<uint8_t>(!free && z.open));
      w.put(free ? int64_t{0} : z.max_ts);
    }
  }
  uint64_t n = 0;
  for (const auto& [id, s] : segs_) n += !s.empty();
  w.put(n);
  for (const auto& [id, s] : segs_) {
    if (s.empty()) continue;
    w.put(id);
    w.put(static_cast<uint32_t>(s.versions.size()));
    w.put(static_cast<uint32_t>(s.records.size()));
    for (const VEntry& v : s.versions) {
      w.put(v.seq);
      w.put(v.ts);
      put_loc(w, v.loc);
      w.put(v.depth);
      w.put(v.base_seq);
      w.put(v.xxh);
      w.put(v.raw);
      w.put(static_cast<uint8_t>(v.cow));
    }
    for (const REntry& r : s.records) {
      w.put(r.seq);
      w.put(r.ts);
      put_loc(w, r.loc);
      w.put(static_cast<uint8_t>(r.op));
      w.put(r.off);
      w.put(r.len);
    }
  }
  return std::move(w.out);
}

Status StoreImpl::checkpoint_locked() {
  flush_history();
  std::set<std::pair<uint8_t, uint32_t>> freeing;
  std::vector<uint8_t> blob;
  uint64_t id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (degraded_) return Status::error(Status::Code::kBusy, "history is degraded", EAGAIN);
    const uint64_t applied = inflight_seqs_.empty() ? last_seq_ : inflight_seqs_.begin()->first - 1;
    // Zones nothing refers to any more are freed once this checkpoint is
    // durable; until then the previous checkpoint may still name them.
    std::vector<std::pair<uint64_t, uint32_t>> hist_zones;
    for (size_t t = 0; t < tiers_.size(); ++t) {
      for (uint32_t i = 0; i < tiers_[t].zones.size(); ++i) {
        const Zone& z = tiers_[t].zones[i];
        if (z.open) continue;
        if ((z.kind == ZoneKind::kJournal || z.kind == ZoneKind::kVersions) && z.live == 0) {
          freeing.insert({static_cast<uint8_t>(t), i});
        }
        if (z.kind == ZoneKind::kHistory) hist_zones.emplace_back(z.gen, i);
      }
    }
    std::sort(hist_zones.begin(), hist_zones.end());
    while (hist_zones.size() > opts_.history_zones) {
      freeing.insert({0, hist_zones.front().second});
      hist_zones.erase(hist_zones.begin());
    }
    for (uint32_t z : ckpt_zones_) freeing.insert({0, z});
    blob = serialize_locked(applied, freeing);
    id = checkpoint_id_ + 1;
  }
  // The journal, then the primary: the checkpoint promises both.
  Status st = flush_all_pool();
  if (st) st = sync_io(*primary_, BlockOpKind::kFlush, 0, 0, nullptr);
  if (!st) {
    enter_degraded("flush for a checkpoint failed: " + st.message());
    return st;
  }
  std::vector<uint8_t> packed = zstd_compress(blob, 1);
  const size_t chunk = zone_bytes_ / 2;
  const uint32_t count = static_cast<uint32_t>((packed.size() + chunk - 1) / chunk);
  Appender app(*this, 0, ZoneKind::kCheckpoint);
  std::vector<uint32_t> zones;
  std::vector<uint64_t> gens;
  for (uint32_t i = 0; i < count; ++i) {
    std::span<const uint8_t> part(packed.data() + size_t{i} * chunk,
                                  std::min(chunk, packed.size() - size_t{i} * chunk));
    pool::CheckpointRecord cr{id, i, count};
    auto loc = app.add(part.size() + 128, [&](std::vector<uint8_t>& o, uint64_t gen) {
      pool::encode_checkpoint(o, gen, cr, part);
    });
    if (!loc) {
      st = loc.status();
      break;
    }
    if (zones.empty() || zones.back() != loc->zone) {
      zones.push_back(loc->zone);
      gens.push_back(loc->gen);
    }
  }
  if (st) st = app.write_out();
  if (st) st = sync_io(device(0), BlockOpKind::kFlush, 0, 0, nullptr);
  pool::Superblock sb;
  {
    std::lock_guard<std::mutex> lock(mu_);
    app.commit_locked();
    // The new checkpoint's zones are closed right away.
    for (uint32_t z : zones) tiers_[0].zones[z].open = false;
    if (!st) {
      for (uint32_t z : zones) tiers_[0].zones[z] = Zone{};
    }
    sb = tiers_[0].sb;
  }
  if (!st) {
    enter_degraded("checkpoint write failed: " + st.message());
    return st;
  }
  sb.generation = ++sb_generation_;
  sb.checkpoint_id = id;
  sb.checkpoint_zones = zones;
  sb.checkpoint_zone_gens = gens;
  std::vector<uint8_t> enc = pool::encode_superblock(sb);
  ABuf a = aligned_buf(enc.size());
  std::memcpy(a.get(), enc.data(), enc.size());
  st = sync_io(device(0), BlockOpKind::kWrite, pool::kSuperblockOffsets[sb.generation % 2], enc.size(), a.get());
  if (st) st = sync_io(device(0), BlockOpKind::kFlush, 0, 0, nullptr);
  if (!st) {
    enter_degraded("superblock write failed: " + st.message());
    return st;
  }
  std::lock_guard<std::mutex> lock(mu_);
  tiers_[0].sb = sb;
  checkpoint_id_ = id;
  for (auto [t, z] : freeing) {
    tiers_[t].zones[z] = Zone{};
  }
  if (!freeing.empty()) {
    std::lock_guard<std::mutex> q(qmu_);  // journal batches waiting for room may go
    pool_room_ = true;
    qcv_.notify_one();
  }
  zones_reclaimed_ += freeing.size() - std::min(freeing.size(), ckpt_zones_.size());
  ckpt_zones_ = zones;
  ++checkpoints_;
  last_checkpoint_ns_ = clock_.now_ns();
  checkpoint_due_ = false;
  return Status::ok();
}

void StoreImpl::flush_history() {
  std::vector<HistoryRecord> h;
  {
    std::lock_guard<std::mutex> lock(hist_mu_);
    h.swap(hist_);
  }
  if (h.empty()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (degraded_) return;
  }
  constexpr size_t kPer = 8192;
  Status st;
  for (size_t i = 0; i < h.size() && st; i += kPer) {
    const size_t n = std::min(kPer, h.size() - i);
    Writer w;
    for (size_t j = i; j < i + n; ++j) {
      const HistoryRecord& r = h[j];
      w.put(r.bucket_start_s);
      w.put(r.segment);
      w.put(r.reads);
      w.put(r.writes);
      w.put(r.bytes_read);
      w.put(r.bytes_written);
    }
    pool::HistoryChunk hc{static_cast<uint32_t>(n)};
    auto loc = history_.add(w.out.size() + 128, [&](std::vector<uint8_t>& o, uint64_t gen) {
      pool::encode_history(o, gen, hc, w.out);
    });
    if (!loc) st = loc.status();
  }
  if (st) st = history_.write_out();
  std::lock_guard<std::mutex> lock(mu_);
  if (st) {
    history_.commit_locked();
  } else {
    history_.reset_locked();
    spdlog::warn("access history not persisted: {}", st.message());
  }
}

// ---------------------------------------------------------------------------
// space

Status StoreImpl::shrink_locked() {
  // Oldest history first: move the window start past the oldest journal
  // zone, fold, move surviving versions out of mostly-dead zones, and free
  // zones with a checkpoint; repeat until there is room again.
  bool lean_next = false;
  for (int round = 0; round < 16; ++round) {
    int64_t w = 0;
    bool low, critical = false;
    int64_t round_start;
    uint32_t round_free;
    {
      std::lock_guard<std::mutex> lock(mu_);
      low = any_tier_below_locked();
      if (!low) return Status::ok();
      round_start = retention_start_;
      round_free = free_zones_locked(0);
      // Past as many of the oldest journal zones as tier 0 is short of
      // half again its low-water mark: one prune that frees enough, rather
      // than a prune (and a fold of every segment) per zone while writes
      // keep filling the pool.
      std::vector<std::pair<uint64_t, int64_t>> journal;  // (gen, max_ts) of closed journal zones
      for (const Zone& z : tiers_[0].zones) {
        if (z.kind == ZoneKind::kJournal && !z.open && z.live > 0) journal.emplace_back(z.gen, z.max_ts);
      }
      std::sort(journal.begin(), journal.end());
      const uint32_t lw = low_water_locked(0), free = free_zones_locked(0);
      const size_t want = lw + lw / 2 > free ? lw + lw / 2 - free : 1;
      if (!journal.empty()) w = journal[std::min(want, journal.size()) - 1].second;
      // Down to the zones kept for this work (journal writes wait for it):
      // cut the window to the present, dropping what leaves it rather than
      // folding it into versions there is no room to write.
      critical = lean_next || pool_full_waiting_;
      lean_next = false;
      if (critical) w = last_ts_;
    }
    // Cheap first: move live versions out of mostly-dead zones and free
    // what no longer holds anything (not when there is no room to move
    // them to: then the window goes first).
    Status st = critical ? Status::ok() : compact_locked();
    if (st) st = checkpoint_locked();
    if (!st) return st;
    {
      std::lock_guard<std::mutex> lock(mu_);
      low = any_tier_below_locked();
    }
    if (!low) return Status::ok();
    // Then speculative bases, lowest value first: the window comes first.
    if (!critical) {
      uint64_t need = 0;
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (size_t t = 0; t < tiers_.size(); ++t) {
          const uint32_t f = free_zones_locked(static_cast<uint8_t>(t)), lw = low_water_locked(static_cast<uint8_t>(t));
          if (f < lw) need += uint64_t{lw - f} * zone_bytes_;
        }
      }
      if (drop_speculative_locked(2 * need) > 0) {
        st = compact_locked();
        if (st) st = checkpoint_locked();
        if (!st) return st;
        std::lock_guard<std::mutex> lock(mu_);
        low = any_tier_below_locked();
      }
    }
    if (!low) return Status::ok();
    if (w > 0) {
      int64_t before;
      {
        std::lock_guard<std::mutex> lock(mu_);
        before = retention_start_;
      }
      Status st = prune_locked(w, critical);
      if (!st && st.code() == Status::Code::kNoSpace && !critical) {
        lean_next = true;  // no room for its folds: cut to the present instead
        continue;
      }
      if (!st) return st;
      std::lock_guard<std::mutex> lock(mu_);
      if (retention_start_ > before) {
        ++retention_shrinks_;
        retention_shrunk_ = true;
        if (log_due(shrink_logged_ns_, monotonic_ns())) {
          spdlog::warn("pool nearly full: retention shrunk, the window now starts {} s ago ({} shrinks so far)",
                       (clock_.now_ns() - retention_start_) / static_cast<int64_t>(kNs), retention_shrinks_);
        }
      }
    }
    st = critical ? Status::ok() : compact_locked();
    if (st) st = checkpoint_locked();
    if (!st) return st;
    if (w == 0) break;  // nothing more to give up
    {
      // Cut to the present and nothing freed: more rounds would only write
      // checkpoints (writes in flight hold what is left).
      std::lock_guard<std::mutex> lock(mu_);
      if (critical && retention_start_ == round_start && free_zones_locked(0) <= round_free) break;
    }
  }
  return Status::ok();
}

bool StoreImpl::any_tier_below_locked(uint32_t margin) const {
  for (size_t t = 0; t < tiers_.size(); ++t) {
    if (free_zones_locked(static_cast<uint8_t>(t)) < low_water_locked(static_cast<uint8_t>(t)) + margin) return true;
  }
  return false;
}

uint32_t StoreImpl::low_water_locked(uint8_t tier) const {
  const uint32_t n = static_cast<uint32_t>(tiers_[tier].zones.size());
  return tier == 0 ? std::max<uint32_t>(4, n / 8) : std::max<uint32_t>(2, n / 8);
}

Status StoreImpl::compact_locked() {
  // Move the live versions out of closed zones that are mostly dead, so the
  // zones can be freed. Versions are found by segment and seq, not by place.
  for (size_t t = 0; t < tiers_.size(); ++t) {
    std::vector<std::pair<uint64_t, VEntry>> movers;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Zones still holding journal records wait for the records to age out.
      std::set<uint32_t> has_records;
      for (const auto& [id, s] : segs_) {
        for (const REntry& r : s.records) {
          if (r.loc.tier == t) has_records.insert(r.loc.zone);
        }
      }
      std::set<uint32_t> sparse;
      for (uint32_t i = 0; i < tiers_[t].zones.size(); ++i) {
        const Zone& z = tiers_[t].zones[i];
        if (z.open || z.live == 0 || has_records.count(i)) continue;
        if (z.kind == ZoneKind::kJournal || (z.kind == ZoneKind::kVersions && z.live_bytes * 2 < z.used)) {
          sparse.insert(i);
        }
      }
      if (sparse.empty()) continue;
      for (const auto& [id, s] : segs_) {
        for (const VEntry& v : s.versions) {
          if (v.loc.tier == t && sparse.count(v.loc.zone)) movers.emplace_back(id, v);
        }
      }
    }
    for (auto& [seg, v] : movers) {
      pool::Record rec;
      auto payload = read_record(v.loc, rec);
      if (!payload) return payload.status();
      pool::VersionRecord vr = rec.version;
      Appender& app = *versions_[t];
      auto loc = app.add(pool::version_record_bytes(payload->size()), [&](std::vector<uint8_t>& o, uint64_t gen) {
        pool::encode_version(o, gen, vr, *payload);
      });
      if (!loc) return loc.status();
      VEntry moved = v;
      moved.loc = *loc;
      v = moved;
    }
    if (movers.empty()) continue;
    Status st = versions_[t]->write_out();
    if (st) st = sync_io(device(static_cast<uint8_t>(t)), BlockOpKind::kFlush, 0, 0, nullptr);
    if (!st) {
      enter_degraded("compaction failed: " + st.message());
      return st;
    }
    std::lock_guard<std::mutex> lock(mu_);
    versions_[t]->commit_locked();
    for (auto& [seg, v] : movers) {
      auto f = segs_.find(seg);
      if (f == segs_.end()) continue;
      for (VEntry& cur : f->second.versions) {
        if (cur.seq == v.seq) {
          unref_locked(cur.loc);
          cur.loc = v.loc;
          ref_locked(cur.loc, cur.ts);
        }
      }
    }
  }
  return Status::ok();
}

Status StoreImpl::seal_versions(uint8_t tier, Status st, const char* what) {
  if (st) st = sync_io(device(tier), BlockOpKind::kFlush, 0, 0, nullptr);
  if (!st) {
    enter_degraded(std::string(what) + " failed: " + st.message());
    std::lock_guard<std::mutex> lock(mu_);
    versions_[tier]->reset_locked();
  }
  return st;
}

Status StoreImpl::migrate_tiers_locked() {
  if (tiers_.size() < 2 || !monitor_) return Status::ok();
  constexpr size_t kPerRound = 16;
  auto top = monitor_->top_k(1024);
  std::unordered_set<uint64_t> hot(top.begin(), top.end());
  struct Move {
    uint64_t seg;
    VEntry v;
    uint8_t to;
  };
  std::vector<Move> moves;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const bool fast_room = free_zones_locked(0) > low_water_locked(0) + 2;
    const bool fast_low = free_zones_locked(0) < low_water_locked(0) + 2;
    const bool slow_room = free_zones_locked(1) > low_water_locked(1) + 1;
    // Promote: the hottest first (the ranking's order).
    if (fast_room) {
      for (uint64_t seg : top) {
        if (moves.size() >= kPerRound) break;
        auto f = segs_.find(seg);
        if (f == segs_.end()) continue;
        for (const VEntry& v : f->second.versions) {
          if (v.loc.tier == 1 && moves.size() < kPerRound) moves.push_back(Move{seg, v, 0});
        }
      }
    }
    // Demote: versions of segments not hot, while the fast tier is low.
    if (fast_low && slow_room) {
      for (const auto& [seg, sg] : segs_) {
        if (moves.size() >= kPerRound) break;
        if (hot.count(seg)) continue;
        for (const VEntry& v : sg.versions) {
          if (v.loc.tier == 0 && moves.size() < kPerRound) moves.push_back(Move{seg, v, 1});
        }
      }
    }
  }
  if (moves.empty()) return Status::ok();
  for (Move& m : moves) {
    pool::Record rec;
    auto payload = read_record(m.v.loc, rec);
    if (!payload) return payload.status();
    pool::VersionRecord vr = rec.version;
    vr.tier = m.to;
    auto loc = versions_[m.to]->add(pool::version_record_bytes(payload->size()),
                                    [&](std::vector<uint8_t>& o, uint64_t gen) { pool::encode_version(o, gen, vr, *payload); });
    if (!loc) return loc.status();
    m.v.loc = *loc;
  }
  // The copies are durable before the index points at them; the old ones
  // stay in their zones until a checkpoint frees those.
  for (uint8_t t = 0; t < 2; ++t) {
    Status st = seal_versions(t, versions_[t]->write_out(), "tier migration");
    if (!st) return st;
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (uint8_t t = 0; t < 2; ++t) versions_[t]->commit_locked();
  for (const Move& m : moves) {
    auto f = segs_.find(m.seg);
    if (f == segs_.end()) continue;
    for (VEntry& cur : f->second.versions) {
      if (cur.seq != m.v.seq) continue;
      unref_locked(cur.loc);
      cur.loc = m.v.loc;
      ref_locked(cur.loc, cur.ts);
      ++(m.to == 0 ? promoted_ : demoted_);
    }
  }
  return Status::ok();
}

Status StoreImpl::try_restart_locked() {
  // Start history again once the pool takes writes: everything before now is
  // dropped (a write may have missed the journal), and a marker says so.
  std::string was;  // why history was degraded
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!degraded_ || bypass_inflight_ > 0 || !inflight_seqs_.empty()) return Status::ok();
    for (auto& [id, s] : segs_) {
      for (const VEntry& v : s.versions) unref_locked(v.loc);
      for (const REntry& r : s.records) unref_locked(r.loc);
    }
    segs_.clear();
    urgent_.clear();
    journal_.reset_locked();
    for (auto& a : versions_) a->reset_locked();
    history_.reset_locked();
    for (auto& t : tiers_) {
      for (Zone& z : t.zones) {
        if (z.kind == ZoneKind::kJournal || z.kind == ZoneKind::kVersions) z.open = false;
      }
    }
    retention_start_ = next_ts_locked();
    window_seq_ = last_seq_;
    degraded_ = false;
    was = degraded_reason_;
  }
  // The checkpoint records the empty index and the new window start and
  // frees every zone; until it is durable the old one still stands. It
  // flushes the primary first, and vouches for every seq handed out before
  // (applied_through >= window_seq_): from then on no start re-applies a
  // record from before the restart, and the state file is not needed.
  Status st = checkpoint_locked();
  pool::MarkerRecord m;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!st) {
      // checkpoint_locked() started a new episode (it may have journaled
      // writes since degraded_ was cleared: the state file covers them).
      enter_degraded_locked("history restart: " + st.message());
      return st;
    }
    m = pool::MarkerRecord{pool::MarkerKind::kRestart, window_seq_, retention_start_};
  }
  auto loc = versions_[0]->add(kB, [&](std::vector<uint8_t>& o, uint64_t gen) { pool::encode_marker(o, gen, m); });
  if (loc) st = versions_[0]->write_out();
  if (loc && st) st = sync_io(device(0), BlockOpKind::kFlush, 0, 0, nullptr);
  std::lock_guard<std::mutex> lock(mu_);
  if (!loc || !st) {
    versions_[0]->reset_locked();
    ++pool_errors_;
    enter_degraded_locked("history restart marker write failed: " + (loc ? st : loc.status()).message());
    return loc ? st : loc.status();
  }
  versions_[0]->commit_locked();
  if (degraded_) {
    // Another failure started a new episode while this one restarted: it
    // stands (with its own reason); the next try restarts from it.
    return Status::error(Status::Code::kBusy, "history degraded again while it restarted: " + degraded_reason_,
                         EAGAIN);
  }
  spdlog::warn("history restarted after '{}': restorable from now on", was);
  degraded_reason_.clear();
  if (state_) {
    // The checkpoint above covers what the state file protected, and the
    // writes answered since (they reached the primary before its flush).
    want_state_locked(false);
    if (acks_held_) release_held_locked();
  }
  return Status::ok();
}

// ---------------------------------------------------------------------------
// the shadow thread

void StoreImpl::round_locked() {
  const uint64_t now = monotonic_ns();
  const int64_t now_clock = clock_.now_ns();
  uint64_t budget;
  {
    std::lock_guard<std::mutex> lock(mu_);
    budget = budget_;
  }
  // The policy sees the accesses since the last round, in order.
  std::vector<Access> ev;
  {
    std::lock_guard<std::mutex> lock(feed_mu_);
    ev.swap(feed_);
    feed_.reserve(std::min<size_t>(ev.size() * 2 + 64, kMaxQueuedAccesses));
  }
  for (const Access& a : ev) policy_->observe(a.op, a.seg, a.t_ns);
  policy_->tick(now_clock);
  policy_mem_.store(policy_->memory_bytes(), std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(feed_mu_);
    forecast_errors_ = policy_->forecast_errors();
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (degraded_) return;
  }
  // Clients active: the busy budget for all but urgent segments.
  if (fg_seen_.exchange(false, std::memory_order_relaxed)) last_fg_ns_ = now;
  const bool busy = last_fg_ns_ != 0 && now - last_fg_ns_ < kBusyWindowNs;
  fg_busy_.store(busy, std::memory_order_relaxed);
  const uint64_t busy_budget = std::min(budget, opts_.shadow_busy_budget_bytes_per_s);
  // The bucket fills with time: the store's clock or, if more, the real
  // time since the last round (a virtual clock in tests moves it as it moves
  // retention; one standing still does not stop the copies).
  if (last_refill_ns_ == 0) {
    last_refill_ns_ = now;
    last_refill_clock_ns_ = now_clock;
  }
  const double dt = std::max(static_cast<double>(now - last_refill_ns_),
                             static_cast<double>(now_clock - last_refill_clock_ns_)) / 1e9;
  tokens_ += static_cast<double>(budget) * dt;
  tokens_ = std::min(tokens_, std::max<double>(static_cast<double>(budget), 2.0 * seg_bytes_));
  busy_tokens_ += static_cast<double>(busy_budget) * dt;
  busy_tokens_ = std::min(busy_tokens_, std::max<double>(static_cast<double>(busy_budget), 2.0 * seg_bytes_));
  last_refill_ns_ = now;
  last_refill_clock_ns_ = now_clock;
  // Work, in order: urgent segments (too many records), copies ahead of need
  // (what keeps writes from stalling), then versions of stale segments.
  std::vector<uint64_t> urgent, ahead, stale;
  std::vector<double> ahead_value;  // policy_->value() of ahead[i] (without free room)
  std::vector<std::pair<double, uint64_t>> victims;  // speculative bases by value, lowest first
  std::vector<std::pair<double, uint64_t>> stale_scored;
  bool room = true, replace = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    urgent.assign(urgent_.begin(), urgent_.end());
    for (const auto& [id, s] : segs_) {
      if (s.versions.empty() || s.records.empty()) continue;
      const uint64_t vseq = s.versions.back().seq;
      uint64_t since = 0;
      for (auto it = s.records.rbegin(); it != s.records.rend() && it->seq > vseq; ++it) ++since;
      if (since >= opts_.stale_records) stale_scored.emplace_back(static_cast<double>(since), id);
    }
    // Copies ahead go into free space: the pool's room is the window's
    // first. Short of it (but not below low water), a copy may take the
    // place of a speculative base the policy values less.
    room = !any_tier_below_locked(2);
    replace = !room && !any_tier_below_locked(0);
  }
  if ((room || replace) && policy_->copies_ahead()) {
    std::vector<std::pair<double, uint64_t>> cand;
    const uint64_t nseg = (primary_->size_bytes() + seg_bytes_ - 1) >> shift_;
    // The forecast runs without the store's lock (writes take it): only
    // each look at the index does, briefly.
    policy_->candidates(now_clock, opts_.policy_params.max_candidates,
                        [&](uint64_t seg) {
                          if (seg >= nseg) return true;
                          std::lock_guard<std::mutex> lock(mu_);
                          auto f = segs_.find(seg);
                          return f != segs_.end() && f->second.holds_base();
                        },
                        cand);
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const auto& [v, seg] : cand) {
        if (seg >= nseg) continue;
        // Without free room only what the policy nominates for itself (not
        // the filler it lists below min_value) may take a base's place.
        if (!room && v < opts_.policy_params.min_value) break;
        auto f = segs_.find(seg);
        if (f != segs_.end() && f->second.holds_base()) continue;
        ahead.push_back(seg);
      }
    }
    if (!room && !ahead.empty() && tokens_ >= seg_bytes_) {
      // Both sides by the policy's value(): the order it keeps bases in.
      for (uint64_t seg : ahead) ahead_value.push_back(policy_->value(seg, clock_.now_ns()));
      victims = speculative_by_value_locked();
    }
    if (!room && victims.empty()) ahead.clear();
  }
  std::sort(stale_scored.begin(), stale_scored.end(), std::greater<>());
  for (const auto& [sc, id] : stale_scored) stale.push_back(id);
  {
    std::lock_guard<std::mutex> lock(mu_);
    shadow_queue_ = urgent.size() + ahead.size() + stale.size();
  }
  size_t done = 0;
  size_t next_victim = 0;
  // Short of free room: the next speculative base in line is worth less
  // than the copy ahead[i].
  auto victim_below = [&](size_t i) {
    return next_victim < victims.size() && victims[next_victim].first < ahead_value[i];
  };
  auto run = [&](const std::vector<uint64_t>& list, bool is_urgent, bool is_ahead) {
    for (size_t i = 0; i < list.size(); ++i) {
      const uint64_t seg = list[i];
      if (tokens_ < seg_bytes_) return false;
      if (busy && !is_urgent && busy_tokens_ < seg_bytes_) return false;
      if ((seg << shift_) >= primary_->size_bytes()) continue;
      if (auto u = unreadable_.find(seg); u != unreadable_.end()) {
        if (now < u->second) continue;
        unreadable_.erase(u);
      }
      if (is_ahead && !room) {
        // Short of free room: only in the place of a base worth less, and
        // never below low water.
        std::lock_guard<std::mutex> lock(mu_);
        if (!victim_below(i) || any_tier_below_locked(0)) return true;
      }
      Status st = make_version(seg, false);
      tokens_ -= seg_bytes_;
      // Urgent work counts against the busy budget too (it may go below zero).
      busy_tokens_ = std::max(busy_tokens_ - seg_bytes_, -static_cast<double>(budget));
      ++done;
      if (st && is_ahead) {
        std::lock_guard<std::mutex> lock(mu_);
        auto f = segs_.find(seg);
        if (f != segs_.end() && !f->second.versions.empty() && f->second.records.empty()) {
          ahead_.insert(seg);
          ++copies_ahead_;
          // The copy is a speculative base: the least valued one that still
          // is, and is worth less, gives way (its space comes back with the
          // next compaction).
          for (; !room && victim_below(i); ++next_victim) {
            if (give_up_speculative_mu(victims[next_victim].second)) {
              ++next_victim;
              ++spec_replaced_;
              break;
            }
          }
        }
      }
      if (!st && st.code() != Status::Code::kBusy) return false;
    }
    return true;
  };
  if (run(urgent, true, false) && run(ahead, false, true)) run(stale, false, false);
  std::lock_guard<std::mutex> lock(mu_);
  shadow_queue_ -= std::min<uint64_t>(shadow_queue_, done);
}

std::vector<std::pair<double, uint64_t>> StoreImpl::speculative_by_value_locked() {
  const int64_t now = clock_.now_ns();
  std::vector<std::pair<double, uint64_t>> spec;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, s] : segs_) {
      if (s.speculative()) spec.emplace_back(0, id);
    }
  }
  for (auto& [v, id] : spec) v = policy_->value(id, now);
  std::sort(spec.begin(), spec.end());
  return spec;
}

std::optional<uint64_t> StoreImpl::give_up_speculative_mu(uint64_t id) {
  auto f = segs_.find(id);
  if (f == segs_.end()) return std::nullopt;
  Seg& s = f->second;
  if (!s.speculative()) return std::nullopt;
  uint64_t freed = 0;
  for (const VEntry& ve : s.versions) {
    freed += ve.loc.bytes;
    unref_locked(ve.loc);
    ++versions_dropped_;
  }
  s.versions.clear();
  ahead_.erase(id);
  ++spec_dropped_;
  if (s.empty()) segs_.erase(f);
  return freed;
}

uint64_t StoreImpl::drop_speculative_locked(uint64_t bytes) {
  const auto spec = speculative_by_value_locked();
  uint64_t freed = 0, dropped = 0;
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [v, id] : spec) {
    if (freed >= bytes) break;
    if (auto b = give_up_speculative_mu(id)) {
      freed += *b;
      ++dropped;
    }
  }
  return dropped;
}

void StoreImpl::tick() {
  flush_history();
  const int64_t now = clock_.now_ns();
  bool degraded, low, due;
  int64_t target;
  {
    std::lock_guard<std::mutex> lock(mu_);
    degraded = degraded_;
    target = now - static_cast<int64_t>(opts_.retention_seconds) * static_cast<int64_t>(kNs);
    // The window moves in steps of a second or more (a prune per tick
    // would fold for nothing), but right up to a pinned export's time.
    const bool to_pin = !pins_.empty() && *pins_.begin() <= target;
    if (to_pin) target = *pins_.begin();
    if (target <= retention_start_ || (!to_pin && target <= retention_start_ + static_cast<int64_t>(kNs))) {
      target = 0;
    }
    low = any_tier_below_locked();
    due = checkpoint_due_ ||
          now - last_checkpoint_ns_ >= static_cast<int64_t>(opts_.checkpoint_interval_s) * static_cast<int64_t>(kNs);
  }
  if (degraded) {
    if (now - last_restart_try_ns_ >= static_cast<int64_t>(kNs)) {
      last_restart_try_ns_ = now;
      Status st = try_restart_locked();
      if (!st) spdlog::debug("history restart: {}", st.message());
    }
    return;
  }
  if (target > 0) (void)prune_locked(target);
  if (low) {
    (void)shrink_locked();
  } else if (due) {
    Status st = checkpoint_locked();
    if (!st) spdlog::error("checkpoint: {}", st.message());
  }
  round_locked();
  Status mt = migrate_tiers_locked();
  if (!mt) spdlog::warn("tier migration: {}", mt.message());
}

void StoreImpl::shadow_main() {
  for (;;) {
    {
      std::unique_lock<std::mutex> l(shadow_cv_mu_);
      shadow_cv_.wait_for(l, std::chrono::milliseconds(100), [&] { return shadow_stop_ || shadow_wake_; });
      shadow_wake_ = false;
      if (shadow_stop_) return;
    }
    std::lock_guard<std::mutex> g(op_mu_);
    tick();
  }
}

void StoreImpl::start() {
  if (monitor_) monitor_->set_history_sink(this);
  if (state_) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (acks_held_) held_since_ = monotonic_ns();  // degraded since recovery: nothing held yet
    }
    state_thread_ = std::thread([this] { state_main(); });
  }
  pool_thread_ = std::thread([this] { pool_main(); });
  if (opts_.shadow_thread) shadow_thread_ = std::thread([this] { shadow_main(); });
}

Status StoreImpl::stop() {
  {
    std::lock_guard<std::mutex> l(shadow_cv_mu_);
    shadow_stop_ = true;
  }
  shadow_cv_.notify_all();
  if (shadow_thread_.joinable()) shadow_thread_.join();
  {
    std::lock_guard<std::mutex> q(qmu_);
    pool_stop_ = true;
  }
  qcv_.notify_all();
  if (pool_thread_.joinable()) pool_thread_.join();
  if (monitor_) monitor_->set_history_sink(nullptr);
  Status result;
  {
    std::lock_guard<std::mutex> g(op_mu_);
    bool degraded;
    {
      std::lock_guard<std::mutex> lock(mu_);
      degraded = degraded_;
    }
    if (degraded) {
      // The pool may work again: then history restarts now (and the state
      // file goes) rather than at the next start.
      Status rs = try_restart_locked();
      if (!rs) spdlog::debug("history restart at stop: {}", rs.message());
      std::lock_guard<std::mutex> lock(mu_);
      degraded = degraded_;
    }
    if (degraded) {
      // Nothing to checkpoint; what the writes since left on the primary is
      // made durable (the state file keeps the journal from being replayed).
      Status fs = sync_io(*primary_, BlockOpKind::kFlush, 0, 0, nullptr);
      if (!fs) result = Status::error(fs.code(), "primary flush: " + fs.message(), fs.err());
    } else {
      result = checkpoint_locked();
    }
  }
  // The state file as it should be (one more try if it is behind), then the
  // state thread leaves.
  {
    std::lock_guard<std::mutex> lock(mu_);
    state_stop_ = true;
    state_cv_.notify_all();
  }
  if (state_thread_.joinable()) state_thread_.join();
  std::lock_guard<std::mutex> lock(mu_);
  if (!held_.empty() || acks_held_) release_held_locked();  // no request is left; for form
  if (state_ && state_done_gen_ != state_gen_ && state_want_present_) {
    spdlog::critical("stopping with history degraded, and the state file {} could not be written ({}): "
                     "the next start on this pool would re-apply older journal records over writes "
                     "acknowledged since; create that file before it (README \"Shadow pool\"), with "
                     "these lines:\n{}",
                     state_->where(), state_error_, encode_degraded_state(state_want_));
    return Status::error(Status::Code::kIoError, "history is degraded and its state file could not be written: " +
                                                     state_error_,
                         EIO);
  }
  return result;
}

void StoreImpl::abandon() {
  {
    std::lock_guard<std::mutex> l(shadow_cv_mu_);
    shadow_stop_ = true;
  }
  shadow_cv_.notify_all();
  if (shadow_thread_.joinable()) shadow_thread_.join();
  {
    std::lock_guard<std::mutex> q(qmu_);
    pool_stop_ = true;
    pool_abandon_ = true;
  }
  qcv_.notify_all();
  if (pool_thread_.joinable()) pool_thread_.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    state_stop_ = true;
    state_abandon_ = true;
    state_cv_.notify_all();
  }
  if (state_thread_.joinable()) state_thread_.join();
  if (monitor_) monitor_->set_history_sink(nullptr);
}

// ---------------------------------------------------------------------------
// queries

StoreStats StoreImpl::stats() const {
  auto& self = const_cast<StoreImpl&>(*this);
  std::lock_guard<std::mutex> lock(self.mu_);
  StoreStats s;
  s.epoch_ns = epoch_ns_;
  s.retention_start_ns = retention_start_;
  s.newest_ns = last_ts_;
  s.first_seq = window_seq_;
  s.last_seq = last_seq_;
  for (const auto& [id, sg] : segs_) {
    if (sg.empty()) continue;
    ++s.segments_with_history;
    s.journal_records += sg.records.size();
    for (const REntry& r : sg.records) {
      s.journal_bytes += r.loc.bytes;
      if (r.op == JournalOp::kWrite) s.journal_raw_bytes += r.len;
    }
    s.versions += sg.versions.size();
    if (!sg.versions.empty()) ++(sg.records.empty() ? s.bases_speculative : s.bases_pinned);
    for (const VEntry& v : sg.versions) {
      s.version_bytes += v.loc.bytes;
      s.version_raw_bytes += v.raw;
    }
  }
  s.client_bytes_written = client_bytes_;
  s.pool_bytes_written = pool_bytes_written_;
  s.cow_stalls = cow_stalls_;
  s.versions_made = versions_made_;
  s.versions_folded = versions_folded_;
  s.versions_dropped = versions_dropped_;
  s.records_pruned = records_pruned_;
  s.zones_reclaimed = zones_reclaimed_;
  s.retention_shrinks = retention_shrinks_;
  s.checkpoints = checkpoints_;
  s.group_commits = group_commits_;
  s.group_commits_overlapped = group_commits_overlapped_;
  s.pool_errors = pool_errors_;
  s.primary_write_errors = primary_write_errors_;
  s.journal_corrections = journal_corrections_;
  s.pool_full_waits = pool_full_waits_;
  s.pool_full_wait_ns = pool_full_wait_ns_;
  s.pool_full_waiting = pool_full_waiting_;
  s.shadow_budget_bytes_per_s = budget_;
  s.shadow_busy_budget_bytes_per_s = std::min(budget_, opts_.shadow_busy_budget_bytes_per_s);
  s.foreground_busy = fg_busy_.load(std::memory_order_relaxed);
  s.shadow_queue = shadow_queue_;
  s.shadow_bytes_read = shadow_bytes_read_;
  s.policy = std::string(policy_name(opts_.policy));
  s.copies_ahead = copies_ahead_;
  s.copies_ahead_bytes = copies_ahead_ * seg_bytes_;
  s.copies_ahead_used = copies_ahead_used_;
  s.speculative_hits = spec_hits_;
  s.speculative_dropped = spec_dropped_;
  s.speculative_replaced = spec_replaced_;
  s.bases_freed = bases_freed_;
  s.versions_promoted = promoted_;
  s.versions_demoted = demoted_;
  s.policy_memory_bytes = policy_mem_.load(std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> fl(self.feed_mu_);
    s.access_events_dropped = feed_dropped_;
    s.forecast_errors = forecast_errors_;
  }
  s.degraded = degraded_;
  s.degraded_reason = degraded_reason_;
  s.retention_shrunk = retention_shrunk_;
  s.last_checkpoint_ns = last_checkpoint_ns_;
  s.segment_bytes = seg_bytes_;
  s.recovered_records = recovered_records_;
  s.redo_records = redo_records_;
  s.redo_skipped = redo_skipped_;
  s.state_file = state_ ? state_->where() : std::string();
  s.state_error = state_error_;
  for (size_t t = 0; t < tiers_.size(); ++t) {
    TierUse u;
    u.tier = static_cast<uint32_t>(t);
    u.path = tiers_[t].dev.path;
    u.zones = tiers_[t].zones.size();
    u.zone_bytes = zone_bytes_;
    for (const Zone& z : tiers_[t].zones) {
      if (z.kind == ZoneKind::kFree) {
        ++u.zones_free;
      } else {
        u.bytes_used += z.used;
      }
    }
    for (const auto& [id, sg] : segs_) {
      for (const VEntry& v : sg.versions) {
        if (v.loc.tier == t) {
          ++u.versions;
          u.version_bytes += v.loc.bytes;
        }
      }
    }
    s.tiers.push_back(u);
  }
  return s;
}

std::vector<ZoneInfo> StoreImpl::zones() const {
  auto& self = const_cast<StoreImpl&>(*this);
  std::lock_guard<std::mutex> lock(self.mu_);
  std::vector<ZoneInfo> out;
  for (size_t t = 0; t < tiers_.size(); ++t) {
    for (uint32_t i = 0; i < tiers_[t].zones.size(); ++i) {
      const Zone& z = tiers_[t].zones[i];
      out.push_back(ZoneInfo{static_cast<uint32_t>(t), i, z.kind, z.gen, z.used, z.live, z.open});
    }
  }
  return out;
}

SegmentHistory to_history(uint64_t id, const Seg& s) {
  SegmentHistory h;
  h.segment = id;
  for (const VEntry& v : s.versions) {
    VersionInfo vi;
    vi.segment = id;
    vi.seq = v.seq;
    vi.time_ns = v.ts;
    vi.tier = v.loc.tier;
    vi.zone = v.loc.zone;
    vi.offset = v.loc.offset;
    vi.stored_bytes = v.loc.bytes;
    vi.depth = v.depth;
    vi.base_seq = v.base_seq;
    vi.content_xxh = v.xxh;
    vi.cow = v.cow;
    h.versions.push_back(vi);
  }
  h.records = s.records.size();
  if (!s.records.empty()) {
    h.first_record_seq = s.records.front().seq;
    h.last_record_seq = s.records.back().seq;
    h.first_record_ns = s.records.front().ts;
    h.last_record_ns = s.records.back().ts;
  }
  return h;
}

std::vector<SegmentHistory> StoreImpl::segments(uint64_t first, size_t limit) const {
  auto& self = const_cast<StoreImpl&>(*this);
  std::lock_guard<std::mutex> lock(self.mu_);
  std::vector<uint64_t> ids;
  for (const auto& [id, s] : segs_) {
    if (id >= first && !s.empty()) ids.push_back(id);
  }
  std::sort(ids.begin(), ids.end());
  if (limit > 0 && ids.size() > limit) ids.resize(limit);
  std::vector<SegmentHistory> out;
  for (uint64_t id : ids) out.push_back(to_history(id, segs_.at(id)));
  return out;
}

std::optional<SegmentHistory> StoreImpl::segment(uint64_t id) const {
  auto& self = const_cast<StoreImpl&>(*this);
  std::lock_guard<std::mutex> lock(self.mu_);
  auto f = segs_.find(id);
  if (f == segs_.end() || f->second.empty()) return std::nullopt;
  return to_history(id, f->second);
}

// ---------------------------------------------------------------------------
// recovery

Status StoreImpl::load_checkpoint(std::vector<std::vector<Zone>>& ckpt_zones, uint64_t& applied_through,
                                  uint64_t& ckpt_next_gen) {
  const pool::Superblock& sb = tiers_[0].sb;
  std::map<uint32_t, std::vector<uint8_t>> chunks;
  uint32_t count = 0;
  for (size_t i = 0; i < sb.checkpoint_zones.size(); ++i) {
    const uint32_t z = sb.checkpoint_zones[i];
    const uint64_t gen = sb.checkpoint_zone_gens[i];
    if (z >= tiers_[0].zones.size()) return Status::error(Status::Code::kCorruption, "checkpoint zone out of range");
    ABuf a = aligned_buf(zone_bytes_);
    Status st = sync_io(device(0), BlockOpKind::kRead, zone_offset(z), zone_bytes_, a.get());
    if (!st) return st;
    pool::scan_records(std::span<const uint8_t>(a.get(), zone_bytes_), gen, 0,
                       [&](const pool::Record& rec, uint64_t) {
                         if (rec.type != RecordType::kCheckpoint || rec.checkpoint.checkpoint_id != sb.checkpoint_id) {
                           return;
                         }
                         count = rec.checkpoint.count;
                         chunks[rec.checkpoint.index].assign(rec.payload.begin(), rec.payload.end());
                       });
    ckpt_zones_.push_back(z);
  }
  if (count == 0 || chunks.size() != count) {
    return Status::error(Status::Code::kCorruption,
                         "checkpoint " + std::to_string(sb.checkpoint_id) + " is incomplete (" +
                             std::to_string(chunks.size()) + " of " + std::to_string(count) + " chunks)");
  }
  std::vector<uint8_t> packed;
  for (auto& [i, c] : chunks) packed.insert(packed.end(), c.begin(), c.end());
  // The uncompressed size is in the frame header.
  const unsigned long long raw = ZSTD_getFrameContentSize(packed.data(), packed.size());
  if (raw == ZSTD_CONTENTSIZE_ERROR || raw == ZSTD_CONTENTSIZE_UNKNOWN || raw > (64ull << 30)) {
    return Status::error(Status::Code::kCorruption, "checkpoint frame is unreadable");
  }
  std::vector<uint8_t> blob(raw);
  Status st = zstd_decompress(packed, blob);
  if (!st) return st;
  Reader r(blob);
  uint64_t magic;
  uint32_t ver, ntiers;
  bool ok = r.get(magic) && magic == kCheckpointMagic && r.get(ver) && ver == kCheckpointVersion &&
            r.get(last_seq_) && r.get(last_ts_) && r.get(retention_start_) && r.get(window_seq_) &&
            r.get(applied_through) && r.get(ckpt_next_gen) && r.get(client_bytes_) &&
            r.get(pool_bytes_written_) && r.get(cow_stalls_) && r.get(ntiers) && ntiers == tiers_.size();
  for (uint32_t t = 0; ok && t < ntiers; ++t) {
    uint32_t nz;
    ok = r.get(nz) && nz == tiers_[t].zones.size();
    ckpt_zones[t].resize(tiers_[t].zones.size());
    for (uint32_t i = 0; ok && i < nz; ++i) {
      Zone& z = ckpt_zones[t][i];
      uint8_t kind = 0, open = 0;
      ok = r.get(kind) && r.get(z.gen) && r.get(z.used) && r.get(open) && r.get(z.max_ts);
      z.kind = static_cast<ZoneKind>(kind);
      z.open = open != 0;
    }
  }
  uint64_t nsegs = 0;
  ok = ok && r.get(nsegs);
  for (uint64_t i = 0; ok && i < nsegs; ++i) {
    uint64_t id;
    uint32_t nv, nr;
    ok = r.get(id) && r.get(nv) && r.get(nr);
    Seg& s = segs_[id];
    for (uint32_t j = 0; ok && j < nv; ++j) {
      VEntry v;
      uint8_t cow = 0;
      ok = r.get(v.seq) && r.get(v.ts) && get_loc(r, v.loc) && r.get(v.depth) && r.get(v.base_seq) &&
           r.get(v.xxh) && r.get(v.raw) && r.get(cow);
      v.cow = cow != 0;
      s.versions.push_back(v);
    }
    for (uint32_t j = 0; ok && j < nr; ++j) {
      REntry e;
      uint8_t op = 0;
      ok = r.get(e.seq) && r.get(e.ts) && get_loc(r, e.loc) && r.get(op) && r.get(e.off) && r.get(e.len);
      e.op = static_cast<JournalOp>(op);
      s.records.push_back(e);
    }
  }
  if (!ok || !r.done()) return Status::error(Status::Code::kCorruption, "checkpoint contents are malformed");
  checkpoint_id_ = sb.checkpoint_id;
  return Status::ok();
}

// After a crash the index may hold versions that were dropped (from the
// older checkpoint) or lost their delta base (its zone was reused): keep the
// versions that decode, start the segment's window at the newest one at or
// before the window start, and keep older ones only as delta bases.
void StoreImpl::repair_versions_locked(Seg& s) {
  std::vector<VEntry> ok;
  for (const VEntry& v : s.versions) {
    if (v.depth == 0 || std::any_of(ok.begin(), ok.end(), [&](const VEntry& b) { return b.seq == v.base_seq; })) {
      ok.push_back(v);
    }
  }
  int vb = -1;
  for (size_t i = 0; i < ok.size(); ++i) {
    if (ok[i].ts <= retention_start_) vb = static_cast<int>(i);
  }
  std::vector<bool> keep(ok.size(), false);
  for (size_t i = std::max(vb, 0); i < ok.size(); ++i) keep[i] = true;
  for (size_t i = ok.size(); i-- > 0;) {
    if (!keep[i] || ok[i].depth == 0) continue;
    for (size_t j = 0; j < i; ++j) {
      if (ok[j].seq == ok[i].base_seq) keep[j] = true;
    }
  }
  std::vector<VEntry> out;
  for (size_t i = 0; i < ok.size(); ++i) {
    if (keep[i]) out.push_back(ok[i]);
  }
  if (vb >= 0) {
    const uint64_t base = ok[vb].seq;
    while (!s.records.empty() && s.records.front().seq <= base) s.records.pop_front();
  }
  s.versions.swap(out);
}

Status StoreImpl::recover() {
  sb_generation_ = tiers_[0].sb.generation;
  next_gen_ = static_cast<uint64_t>(epoch_ns_);
  // A degraded episode recorded by an earlier run: writes were answered
  // without journal records after the journal reached seq `no_redo`, so no
  // record up to it may be re-applied, and history restarts.
  bool was_degraded = false;
  uint64_t no_redo = 0;
  std::string episode;
  if (state_) {
    auto loaded = state_->load();
    if (!loaded) {
      // Something is there, but not what it says: take it for the worst
      // (an episode after every record); re-applying nothing is safe.
      spdlog::error("{}; taken as a record that history was degraded after every journal record",
                    loaded.status().message());
      was_degraded = true;
      no_redo = ~0ull;
      episode = "an unreadable state file";
    } else if (*loaded) {
      const DegradedState& d = **loaded;
      was_degraded = true;
      if (d.pool_uuid != uuid()) {
        spdlog::error("state file {} names the pool {}, not this one ({}); taken as a record that "
                      "history was degraded after every journal record",
                      state_->where(), pool::uuid_to_string(d.pool_uuid), pool::uuid_to_string(uuid()));
        no_redo = ~0ull;
        episode = "a state file of another pool";
      } else {
        no_redo = d.seq;
        episode = "history degraded at seq " + std::to_string(d.seq) + " (" + d.reason + ")";
      }
      state_want_ = d;
    }
    state_want_.seq = no_redo;
    state_want_present_ = state_have_present_ = was_degraded;
  }
  std::vector<std::vector<Zone>> ckpt(tiers_.size());
  uint64_t applied = 0, ckpt_next_gen = next_gen_;
  bool have_ckpt = tiers_[0].sb.checkpoint_id != 0;
  if (have_ckpt) {
    Status st = load_checkpoint(ckpt, applied, ckpt_next_gen);
    if (!st) return Status::error(st.code(), "cannot load the pool's checkpoint: " + st.message(), EIO);
  } else {
    for (size_t t = 0; t < tiers_.size(); ++t) ckpt[t].resize(tiers_[t].zones.size());
  }
  // Read every zone header: zones opened after the checkpoint are scanned
  // whole, zones open at the checkpoint from where it left them.
  struct ScanJob {
    uint64_t gen;
    uint8_t tier;
    uint32_t zone;
    uint64_t from;
    ZoneKind kind;
  };
  std::vector<ScanJob> jobs;
  uint64_t max_gen = ckpt_next_gen;
  for (size_t t = 0; t < tiers_.size(); ++t) {
    for (uint32_t i = 0; i < tiers_[t].zones.size(); ++i) {
      Zone& z = tiers_[t].zones[i];
      z = ckpt[t][i];
      ABuf a = aligned_buf(kB);
      Status st = sync_io(device(static_cast<uint8_t>(t)), BlockOpKind::kRead, zone_offset(i), kB, a.get());
      if (!st) return Status::error(st.code(), "reading zone headers: " + st.message(), EIO);
      pool::Record rec;
      const bool valid = pool::decode_record(std::span<const uint8_t>(a.get(), kB), 0, rec) == pool::DecodeError::kOk &&
                         rec.type == RecordType::kZoneHeader && rec.zone.pool_uuid == uuid() &&
                         rec.zone.zone_index == i;
      if (!valid || (z.kind != ZoneKind::kFree && rec.zone_gen < z.gen)) {
        if (z.kind != ZoneKind::kFree && z.open && z.used == 0) {
          z = Zone{};  // opened just before the checkpoint, never written
          continue;
        }
        if (z.kind != ZoneKind::kFree && z.kind != ZoneKind::kCheckpoint) {
          return Status::error(Status::Code::kCorruption,
                               "zone " + std::to_string(i) + " of tier " + std::to_string(t) +
                                   " lost its header although the checkpoint uses it");
        }
        continue;
      }
      const uint64_t g = rec.zone_gen;
      if (z.kind != ZoneKind::kFree && g == z.gen) {
        if (z.open && z.kind != ZoneKind::kCheckpoint) jobs.push_back({g, static_cast<uint8_t>(t), i, z.used, z.kind});
        if (z.kind == ZoneKind::kHistory) jobs.push_back({g, static_cast<uint8_t>(t), i, ~0ull, z.kind});
      } else if (g >= ckpt_next_gen) {
        z = Zone{};
        z.kind = rec.zone.kind;
        z.gen = g;
        if (z.kind != ZoneKind::kCheckpoint) jobs.push_back({g, static_cast<uint8_t>(t), i, 0, z.kind});
      } else if (z.kind != ZoneKind::kFree && g != z.gen) {
        return Status::error(Status::Code::kCorruption, "zone " + std::to_string(i) + " of tier " +
                                                            std::to_string(t) + " changed generation behind the checkpoint");
      }
      max_gen = std::max(max_gen, g + 1);
      z.open = false;  // appends after a restart go to fresh zones
    }
  }
  // The checkpoint's own zones stay in use until the next checkpoint.
  for (size_t i = 0; i < ckpt_zones_.size(); ++i) {
    Zone& z = tiers_[0].zones[ckpt_zones_[i]];
    z = Zone{};
    z.kind = ZoneKind::kCheckpoint;
    z.gen = tiers_[0].sb.checkpoint_zone_gens[i];
  }
  // Zones opened after the checkpoint whose header a crash lost may still
  // hold records with their generation: never hand those out again. At most
  // every zone can have been opened since the checkpoint (zones are freed
  // only by checkpoints).
  uint64_t all_zones = 0;
  for (const Tier& t : tiers_) all_zones += t.zones.size();
  next_gen_ = std::max(max_gen, ckpt_next_gen + all_zones + 1);
  std::sort(jobs.begin(), jobs.end(), [](const ScanJob& a, const ScanJob& b) { return a.gen < b.gen; });
  std::vector<HistoryRecord> hist;
  std::vector<std::pair<uint64_t, REntry>> found;
  int64_t restart_ns = 0;
  uint64_t restart_seq = 0;
  for (const ScanJob& j : jobs) {
    ABuf a = aligned_buf(zone_bytes_);
    Status st = sync_io(device(j.tier), BlockOpKind::kRead, zone_offset(j.zone), zone_bytes_, a.get());
    if (!st) return Status::error(st.code(), "scanning the journal: " + st.message(), EIO);
    std::span<const uint8_t> img(a.get(), zone_bytes_);
    const bool history_only = j.from == ~0ull;
    Zone& z = tiers_[j.tier].zones[j.zone];
    auto end = pool::scan_records(img, j.gen, history_only ? 0 : j.from, [&](const pool::Record& rec, uint64_t off) {
      Loc loc{j.tier, j.zone, static_cast<uint32_t>(off), rec.total_bytes, j.gen};
      switch (rec.type) {
        case RecordType::kJournal: {
          if (history_only) break;
          REntry e;
          e.seq = rec.journal.seq;
          e.ts = rec.journal.time_ns;
          e.loc = loc;
          e.op = rec.journal.op;
          e.correction = (rec.journal.flags & pool::kJournalCorrection) != 0;
          const uint64_t seg = rec.journal.offset >> shift_;
          e.off = static_cast<uint32_t>(rec.journal.offset - (seg << shift_));
          e.len = rec.journal.length;
          if (e.seq > last_seq_) last_seq_ = e.seq;
          if (e.ts > last_ts_) last_ts_ = e.ts;
          found.emplace_back(seg, e);
          break;
        }
        case RecordType::kVersion: {
          if (history_only) break;
          VEntry v;
          v.seq = rec.version.seq;
          v.ts = rec.version.time_ns;
          v.loc = loc;
          v.depth = rec.version.depth;
          v.base_seq = rec.version.base_seq;
          v.xxh = rec.version.content_xxh;
          v.raw = rec.version.segment_bytes;
          v.cow = z.kind == ZoneKind::kJournal;
          segs_[rec.version.segment].versions.push_back(v);  // sorted below
          break;
        }
        case RecordType::kMarker:
          if (history_only) break;
          if (rec.marker.kind == pool::MarkerKind::kRestart && rec.marker.time_ns >= restart_ns) {
            restart_ns = rec.marker.time_ns;
            restart_seq = rec.marker.seq;
          }
          if (rec.marker.time_ns > retention_start_) {
            retention_start_ = rec.marker.time_ns;
            window_seq_ = std::max(window_seq_, rec.marker.seq);
          }
          break;
        case RecordType::kHistory: {
          if (!monitor_) break;
          Reader hr(rec.payload);
          for (uint32_t k = 0; k < rec.history.count; ++k) {
            HistoryRecord h;
            if (!(hr.get(h.bucket_start_s) && hr.get(h.segment) && hr.get(h.reads) && hr.get(h.writes) &&
                  hr.get(h.bytes_read) && hr.get(h.bytes_written))) {
              break;
            }
            hist.push_back(h);
          }
          break;
        }
        default:
          break;
      }
    });
    if (!history_only) {
      z.used = round_up(end.next_offset, kB);
      spdlog::debug("pool: tier {} zone {}: the log ends at offset {} ({})", j.tier, j.zone, end.next_offset,
                    pool::decode_error_name(end.stop));
      // Appends never resume in a zone found open: past the end of its log
      // a crash may have left later batches of the same generation, which a
      // new batch ending at their start would bring back to life.
    }
  }
  for (auto& [seg, e] : found) {
    Seg& s = segs_[seg];
    s.records.push_back(e);
  }
  recovered_records_ = found.size();
  // Order, de-duplicate, apply a restart marker, rebuild zone counts.
  for (auto it = segs_.begin(); it != segs_.end();) {
    Seg& s = it->second;
    std::stable_sort(s.versions.begin(), s.versions.end(), [](const VEntry& a, const VEntry& b) { return a.seq < b.seq; });
    std::vector<VEntry> vs;
    for (VEntry& v : s.versions) {
      if (!vs.empty() && vs.back().seq == v.seq) {
        vs.back() = v;  // the later copy (a rewrite or a move) wins
      } else {
        vs.push_back(v);
      }
    }
    s.versions.swap(vs);
    std::stable_sort(s.records.begin(), s.records.end(), [](const REntry& a, const REntry& b) {
      return a.seq != b.seq ? a.seq < b.seq : a.off < b.off;
    });
    // A correction replaces the record of its (seq, off); the last one
    // written wins (the scan goes in append order).
    {
      std::deque<REntry> rs;
      for (REntry& r : s.records) {
        if (!rs.empty() && rs.back().seq == r.seq && rs.back().off == r.off && (r.correction || rs.back().correction)) {
          if (r.correction) rs.back() = r;
          continue;
        }
        rs.push_back(r);
      }
      s.records.swap(rs);
    }
    if (restart_ns > 0) {
      std::erase_if(s.versions, [&](const VEntry& v) { return v.seq < restart_seq || v.ts < restart_ns; });
      std::erase_if(s.records, [&](const REntry& r) { return r.seq <= restart_seq; });
    }
    // A copy-on-first-write is stamped with the window as it stood in
    // memory; the retention marker of that move may not have reached the
    // pool before the crash. The window never reopens below it: the
    // segment's history before that point is gone (its base was freed).
    for (const VEntry& v : s.versions) {
      if (v.cow && v.ts > retention_start_) {
        retention_start_ = v.ts;
        window_seq_ = std::max(window_seq_, v.seq);
      }
    }
    repair_versions_locked(s);
    if (!s.records.empty() && (s.versions.empty() || s.versions.front().seq >= s.records.front().seq)) {
      spdlog::error("pool: segment {} has journal records without a base version; its history is dropped",
                    it->first);
      s.records.clear();
      s.versions.clear();
    }
    if (s.empty()) {
      it = segs_.erase(it);
    } else {
      ++it;
    }
  }
  if (restart_ns > retention_start_) {
    retention_start_ = restart_ns;
    window_seq_ = std::max(window_seq_, restart_seq);
  }
  for (auto& t : tiers_) {
    for (Zone& z : t.zones) {
      z.live = 0;
      z.live_bytes = 0;
    }
  }
  for (auto& [id, s] : segs_) {
    auto stale = [&](const Loc& l) {
      return l.tier >= tiers_.size() || l.zone >= tiers_[l.tier].zones.size() ||
             tiers_[l.tier].zones[l.zone].gen != l.gen;
    };
    const size_t before = s.versions.size() + s.records.size();
    std::erase_if(s.versions, [&](const VEntry& v) { return stale(v.loc); });
    std::erase_if(s.records, [&](const REntry& r) { return stale(r.loc); });
    if (s.versions.size() + s.records.size() != before) {
      spdlog::debug("pool: segment {}: {} index entries point at reused zones and were dropped", id,
                    before - s.versions.size() - s.records.size());
      repair_versions_locked(s);
      if (!s.records.empty() && (s.versions.empty() || s.versions.front().seq >= s.records.front().seq)) {
        spdlog::error("pool: segment {} has journal records without a base version; its history is dropped", id);
        s.records.clear();
        s.versions.clear();
      }
    }
    for (const VEntry& v : s.versions) ref_locked(v.loc, v.ts);
    for (const REntry& r : s.records) ref_locked(r.loc, r.ts);
  }
  last_ts_ = std::max(last_ts_, retention_start_);
  // Redo: the journal is written before the primary, so re-applying every
  // record the last checkpoint does not vouch for makes the primary whole.
  // Not those a degraded episode came after: a write answered in it may
  // have overwritten them on the primary without a record of its own (the
  // primary was flushed before the state file was written, so it holds
  // every one of them that was acknowledged before the episode).
  std::vector<std::pair<uint64_t, REntry>> redo;
  for (const auto& [id, s] : segs_) {
    for (const REntry& r : s.records) {
      if (r.seq <= applied) continue;
      if (r.seq <= no_redo) {
        ++redo_skipped_;
      } else {
        redo.emplace_back(id, r);
      }
    }
  }
  if (was_degraded) {
    spdlog::warn("state file {}: {}; {} journal records past the checkpoint are not re-applied to the "
                 "primary (writes acknowledged after them never reached the journal), and history "
                 "restarts",
                 state_->where(), episode, redo_skipped_);
    // Sequence numbers are never handed out twice, not even those of
    // records a crash lost from the journal.
    if (no_redo != ~0ull) last_seq_ = std::max(last_seq_, no_redo);
  }
  std::sort(redo.begin(), redo.end(), [](const auto& a, const auto& b) {
    return a.second.seq != b.second.seq ? a.second.seq < b.second.seq : a.second.off < b.second.off;
  });
  for (const auto& [seg, r] : redo) {
    const uint64_t off = (seg << shift_) + r.off;
    Status st;
    if (r.op == JournalOp::kWrite) {
      std::vector<uint8_t> content(r.off + r.len);
      st = apply_record(r, content);
      if (st) {
        ABuf a = aligned_buf(r.len);
        std::memcpy(a.get(), content.data() + r.off, r.len);
        st = sync_io(*primary_, BlockOpKind::kWrite, off, r.len, a.get());
      }
    } else {
      st = sync_io(*primary_, BlockOpKind::kWriteZeroes, off, r.len, nullptr);
    }
    if (!st) return Status::error(st.code(), "re-applying journal record seq " + std::to_string(r.seq) + ": " + st.message(), EIO);
  }
  redo_records_ = redo.size();
  if (!redo.empty()) {
    Status st = sync_io(*primary_, BlockOpKind::kFlush, 0, 0, nullptr);
    if (!st) return st;
  }
  if (monitor_ && !hist.empty()) monitor_->restore_history(hist);
  if (was_degraded) {
    // History restarts from now, as after any degraded episode: the index
    // is dropped, a checkpoint (which vouches for every seq so far) and a
    // kRestart marker are written. If the pool fails, this run starts
    // degraded and the state file is rewritten to cover it.
    std::lock_guard<std::mutex> g(op_mu_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      degraded_ = true;
      degraded_reason_ = "was degraded when shadowd last stopped: " + episode;
    }
    Status st = try_restart_locked();
    if (!st) spdlog::error("history restart at start-up: {}", st.message());
    std::lock_guard<std::mutex> lock(mu_);
    if (state_done_gen_ != state_gen_ && !state_want_present_) {
      // Restarted: the file goes now, before the export serves.
      Status cs = state_->clear();
      if (cs) {
        state_have_present_ = false;
        state_done_gen_ = state_gen_;
      } else {
        state_error_ = cs.message();
        spdlog::warn("{} (retried while shadowd runs; while it stays, a start restarts history)",
                     cs.message());
      }
    }
    last_checkpoint_ns_ = clock_.now_ns();
    return Status::ok();
  }
  // A checkpoint before the first append. A zone opened since the last
  // checkpoint whose header a crash lost is invisible to the scan, but may
  // hold later batches under the generation it was opened with; next_gen_
  // skips every generation that could have been handed out since that
  // checkpoint, and this checkpoint makes the skip durable. Without it a
  // second crash before the next checkpoint would compute the same
  // next_gen_ again, a zone could be reopened under a generation it has
  // already used, and a scan would bring that zone's stale batches back.
  // If it fails, history is degraded (checkpoint_locked says why) and the
  // export still starts: history restarts once the pool takes writes.
  {
    std::lock_guard<std::mutex> g(op_mu_);
    (void)checkpoint_locked();
  }
  last_checkpoint_ns_ = clock_.now_ns();
  return Status::ok();
}

Result<pool::Superblock> read_sb(IoBackend& dev) {
  if (dev.size_bytes() < pool::kZonesStart) {
    return Status::error(Status::Code::kNotFound, "too small to hold a shadow pool", ENOENT);
  }
  ABuf a = aligned_buf(2 * kB);
  Status st = run_sync(dev, BlockOpKind::kRead, 0, 2 * kB, a.get());
  if (!st) return st;
  std::optional<pool::Superblock> best;
  Status damaged;
  int magic = 0;
  for (int i = 0; i < 2; ++i) {
    uint64_t m;
    std::memcpy(&m, a.get() + i * kB, sizeof m);
    magic += m == pool::kSuperMagic;
    auto sb = pool::decode_superblock(std::span<const uint8_t>(a.get() + i * kB, kB));
    if (!sb) {
      if (m == pool::kSuperMagic) damaged = sb.status();
      continue;
    }
    if (!best || sb->generation > best->generation) best = *sb;
  }
  if (best) return *best;
  // Blank (no superblock at all) and damaged (a superblock that does not
  // check out) are different answers: only a blank device is formatted
  // without --force.
  if (magic == 0) return Status::error(Status::Code::kNotFound, "no shadow pool superblock", ENOENT);
  return Status::error(Status::Code::kCorruption, "damaged shadow pool superblock: " + damaged.message(), EIO);
}

}  // namespace

Result<pool::Superblock> ShadowStore::read_superblock(IoBackend& device) { return read_sb(device); }

Status ShadowStore::format(const std::vector<PoolDevice>& devices, const FormatOptions& o, const Clock& clock) {
  if (devices.empty() || devices.size() > 2) return Status::invalid("a pool has one or two devices");
  if (!is_pow2(o.segment_bytes) || o.segment_bytes < (64u << 10) || o.segment_bytes > (1u << 20)) {
    return Status::invalid("segment size must be a power of two between 64 KiB and 1 MiB");
  }
  if (!is_pow2(o.zone_bytes) || o.zone_bytes < pool::kMinZoneBytes || o.zone_bytes > pool::kMaxZoneBytes) {
    return Status::invalid("zone size must be a power of two between 4 MiB and 1 GiB");
  }
  const pool::Uuid uuid = pool::new_uuid();
  const int64_t epoch = clock.now_ns();
  for (size_t t = 0; t < devices.size(); ++t) {
    IoBackend& dev = *devices[t].backend;
    if (dev.info().read_only) return Status::error(Status::Code::kReadOnly, devices[t].path + " is read-only", EROFS);
    const uint64_t zones = dev.size_bytes() > pool::kZonesStart ? (dev.size_bytes() - pool::kZonesStart) / o.zone_bytes : 0;
    const uint64_t need = t == 0 ? 8 : 2;
    if (zones < need) {
      return Status::invalid(devices[t].path + " is too small: " + std::to_string(zones) + " zones of " +
                             std::to_string(o.zone_bytes >> 20) + " MiB fit, at least " + std::to_string(need) +
                             " are needed (" + std::to_string((pool::kZonesStart + need * o.zone_bytes) >> 20) +
                             " MiB)");
    }
    auto existing = read_sb(dev);
    if (existing && !o.force) {
      return Status::invalid(devices[t].path + " already holds a shadow pool (" + pool::uuid_to_string(existing->pool_uuid) +
                             ", for " + existing->primary_id + "); refusing to overwrite it without --force");
    }
    if (!existing && existing.status().code() != Status::Code::kNotFound && !o.force) {
      return Status::invalid(devices[t].path + ": " + existing.status().message() +
                             "; refusing to overwrite it without --force");
    }
  }
  for (size_t t = 0; t < devices.size(); ++t) {
    IoBackend& dev = *devices[t].backend;
    pool::Superblock sb;
    sb.pool_uuid = uuid;
    sb.tier = static_cast<uint32_t>(t);
    sb.tier_count = static_cast<uint32_t>(devices.size());
    sb.primary_id = o.primary_id;
    sb.primary_bytes = o.primary_bytes;
    sb.segment_bytes = o.segment_bytes;
    sb.zone_bytes = o.zone_bytes;
    sb.zone_count = (dev.size_bytes() - pool::kZonesStart) / o.zone_bytes;
    sb.epoch_ns = epoch;
    sb.generation = 1;
    std::vector<uint8_t> enc = pool::encode_superblock(sb);
    ABuf a = aligned_buf(2 * kB);
    std::memcpy(a.get(), enc.data(), kB);
    sb.generation = 0;  // copy B: older, so A wins until the first checkpoint
    enc = pool::encode_superblock(sb);
    std::memcpy(a.get() + kB, enc.data(), kB);
    Status st = run_sync(dev, BlockOpKind::kWrite, 0, 2 * kB, a.get());
    if (st) st = run_sync(dev, BlockOpKind::kFlush, 0, 0);
    if (!st) return Status::error(st.code(), devices[t].path + ": " + st.message(), st.err());
  }
  return Status::ok();
}

Result<std::unique_ptr<ShadowStore>> ShadowStore::open(std::vector<PoolDevice> devices,
                                                       std::shared_ptr<IoBackend> primary, const StoreOptions& o,
                                                       const Clock& clock, Monitor* monitor) {
  if (devices.empty() || devices.size() > 2) return Status::invalid("a pool has one or two devices");
  if (auto p = make_policy(o.policy, o.policy_params, monitor); !p) return p.status();
  std::vector<Tier> tiers(devices.size());
  for (size_t i = 0; i < devices.size(); ++i) {
    auto sb = read_sb(*devices[i].backend);
    if (!sb) {
      if (sb.status().code() == Status::Code::kNotFound) {
        return Status::error(Status::Code::kNotFound,
                             devices[i].path + " is not a shadow pool (" + sb.status().message() +
                                 "); start once with --init to format it");
      }
      return Status::error(sb.status().code(), devices[i].path + ": " + sb.status().message(), sb.status().err());
    }
    if (sb->tier >= devices.size() || sb->tier_count != devices.size()) {
      return Status::invalid(devices[i].path + " is tier " + std::to_string(sb->tier) + " of a pool of " +
                             std::to_string(sb->tier_count) + " devices, but " + std::to_string(devices.size()) +
                             " were given");
    }
    Tier& t = tiers[sb->tier];
    if (t.dev.backend) return Status::invalid("two devices claim tier " + std::to_string(sb->tier));
    t.dev = devices[i];
    t.sb = *sb;
  }
  const pool::Superblock& sb0 = tiers[0].sb;
  for (const Tier& t : tiers) {
    if (t.sb.pool_uuid != sb0.pool_uuid) {
      return Status::invalid(t.dev.path + " belongs to another pool (" + pool::uuid_to_string(t.sb.pool_uuid) +
                             ") than " + tiers[0].dev.path + " (" + pool::uuid_to_string(sb0.pool_uuid) + ")");
    }
  }
  const uint64_t size = primary->size_bytes();
  if (sb0.primary_id != o.primary_id || sb0.primary_bytes != size ||
      (o.segment_bytes != 0 && sb0.segment_bytes != o.segment_bytes)) {
    return Status::invalid(tiers[0].dev.path + " was formatted for " + sb0.primary_id + " (" +
                           std::to_string(sb0.primary_bytes) + " bytes, segments of " +
                           std::to_string(sb0.segment_bytes) + " bytes), not for " + o.primary_id + " (" +
                           std::to_string(size) + " bytes, segments of " +
                           std::to_string(o.segment_bytes ? o.segment_bytes : sb0.segment_bytes) +
                           " bytes); refusing to use it (reformat with --init --force to discard its history)");
  }
  if (monitor && monitor->segment_bytes() != sb0.segment_bytes) {
    return Status::invalid("the monitor's segment size differs from the pool's");
  }
  for (Tier& t : tiers) {
    uint64_t n = t.sb.zone_count;
    if (o.pool_max_bytes > 0) n = std::min<uint64_t>(n, o.pool_max_bytes / t.sb.zone_bytes);
    if (n < (t.sb.tier == 0 ? 8u : 2u)) return Status::invalid("pool_max_bytes leaves too few zones on " + t.dev.path);
    t.zones.resize(n);
  }
  std::shared_ptr<DegradedStateStore> state = o.state_store;
  if (!state && !o.state_dir.empty()) {
    auto f = open_state_file(o.state_dir, o.export_name, sb0.pool_uuid);
    if (!f) return f.status();
    state = std::move(*f);
    for (const std::string& other : find_state_files(o.state_dir, o.export_name)) {
      if (other == state->where()) continue;
      spdlog::warn("{} records a degraded history of another shadow pool of export '{}' (not {}); it is "
                   "left in place: it keeps that pool's journal from being replayed if it is used "
                   "again (remove it if that pool is gone)",
                   other, o.export_name, pool::uuid_to_string(sb0.pool_uuid));
    }
  }
  auto store = std::make_unique<StoreImpl>(std::move(tiers), std::move(primary), o, clock, monitor);
  store->set_state_store(std::move(state));
  Status st = store->recover();
  if (!st) return st;
  return std::unique_ptr<ShadowStore>(std::move(store));
}

}  // namespace shadowd
