#include <catch2/catch.hpp>
#include <thread>
#include <vector>

#include "core/memory_backend.h"
#include "tests/unit/test_util.h"

namespace shadowd {
namespace {

using test::first_difference;
using test::random_bytes;
using test::RecordingOp;
using Bytes = std::vector<uint8_t>;
using Code = Status::Code;

constexpr uint64_t kSize = 64 * 1024;

// One backend driven through one loop, with short helpers for each op.
struct Disk {
  explicit Disk(uint64_t size = kSize, uint64_t seed = 1, bool read_only = false)
      : loop(test::make_loop()), mem(size, seed, read_only) {}

  Status op(BlockOpKind kind, uint64_t offset, uint64_t length, uint8_t* buf = nullptr,
            uint32_t flags = 0) {
    RecordingOp o(kind, offset, length, buf, flags);
    return test::run_on(*loop, mem, o);
  }
  Status write(uint64_t offset, Bytes data, uint32_t flags = 0) {
    return op(BlockOpKind::kWrite, offset, data.size(), data.data(), flags);
  }
  Status flush() { return op(BlockOpKind::kFlush, 0, 0); }
  Bytes read(uint64_t offset, uint64_t length) {
    Bytes out(length);
    Status st = op(BlockOpKind::kRead, offset, length, out.data());
    REQUIRE(st.is_ok());
    return out;
  }

  std::unique_ptr<EventLoop> loop;
  MemoryBackend mem;
};

Bytes filled(size_t n, uint8_t v) { return Bytes(n, v); }

void put(Bytes& image, uint64_t offset, const Bytes& data) {
  std::copy(data.begin(), data.end(), image.begin() + static_cast<ptrdiff_t>(offset));
}

TEST_CASE("memory: completion comes from the loop, never from inside submit()", "[memory]") {
  Disk d;
  Bytes data = filled(512, 7);
  RecordingOp op(BlockOpKind::kWrite, 0, data.size(), data.data());
  d.mem.submit(*d.loop, &op);
  REQUIRE(op.done_count == 0);
  d.loop->run_once(true);
  REQUIRE(op.done_count == 1);
  REQUIRE(op.status.is_ok());
}

TEST_CASE("memory: reads see writes at once, a crash drops unflushed ones", "[memory]") {
  Disk d;
  Bytes data = filled(4096, 0xab);
  REQUIRE(d.write(1000, data).is_ok());
  REQUIRE(d.read(1000, 4096) == data);
  REQUIRE(d.mem.unflushed_writes() == 1);
  REQUIRE(first_difference(d.mem.durable_contents(), Bytes(kSize)) == -1);
  d.mem.crash();
  REQUIRE(first_difference(d.mem.contents(), Bytes(kSize)) == -1);
  REQUIRE(d.mem.unflushed_writes() == 0);
  REQUIRE(d.mem.ops_completed(BlockOpKind::kWrite) == 1);
}

TEST_CASE("memory: flush makes completed writes durable", "[memory]") {
  Disk d;
  REQUIRE(d.write(0, filled(512, 1)).is_ok());
  REQUIRE(d.write(8192, filled(100, 2)).is_ok());
  REQUIRE(d.mem.unflushed_writes() == 2);
  REQUIRE(d.flush().is_ok());
  REQUIRE(d.mem.unflushed_writes() == 0);
  const Bytes before = d.mem.contents();
  d.mem.crash(true);  // nothing is pending, so even a torn crash loses nothing
  REQUIRE(first_difference(d.mem.contents(), before) == -1);
  REQUIRE(d.mem.ops_completed(BlockOpKind::kFlush) == 1);
}

TEST_CASE("memory: a FUA write is durable without a flush", "[memory]") {
  Disk d;
  REQUIRE(d.write(0, filled(4096, 1)).is_ok());           // volatile
  REQUIRE(d.write(1024, filled(1024, 2), kFua).is_ok());  // durable, over it
  REQUIRE(d.mem.unflushed_writes() == 1);
  Bytes expect(kSize);
  put(expect, 1024, filled(1024, 2));
  REQUIRE(first_difference(d.mem.durable_contents(), expect) == -1);
  d.mem.crash();
  REQUIRE(first_difference(d.mem.contents(), expect) == -1);
}

TEST_CASE("memory: an older unflushed write never lands over a later FUA write", "[memory]") {
  for (uint64_t seed = 0; seed < 64; ++seed) {
    CAPTURE(seed);
    Disk d(kSize, seed);
    REQUIRE(d.write(0, filled(4096, 1)).is_ok());
    REQUIRE(d.write(1024, filled(1024, 2), kFua).is_ok());
    d.mem.crash(true);
    REQUIRE(d.read(1024, 1024) == filled(1024, 2));
  }
}

TEST_CASE("memory: trim and write_zeroes zero the range and are volatile unless FUA", "[memory]") {
  const auto kind = GENERATE(BlockOpKind::kTrim, BlockOpKind::kWriteZeroes);
  CAPTURE(op_name(kind));
  Disk d;
  REQUIRE(d.write(0, filled(kSize, 9)).is_ok());
  REQUIRE(d.flush().is_ok());

  REQUIRE(d.op(kind, 4096, 8192).is_ok());
  REQUIRE(d.read(4096, 8192) == Bytes(8192));
  REQUIRE(d.read(0, 4096) == filled(4096, 9));
  REQUIRE(d.mem.unflushed_writes() == 1);
  d.mem.crash();
  REQUIRE(d.read(4096, 8192) == filled(8192, 9));  // the zeroing was lost

  REQUIRE(d.op(kind, 4096, 8192, nullptr, kFua).is_ok());
  d.mem.crash();
  REQUIRE(d.read(4096, 8192) == Bytes(8192));  // FUA: it stayed
  REQUIRE(d.mem.ops_completed(kind) == 2);
}

TEST_CASE("memory: cache is a no-op that succeeds", "[memory]") {
  Disk d;
  REQUIRE(d.write(0, filled(512, 3)).is_ok());
  const Bytes before = d.mem.contents();
  REQUIRE(d.op(BlockOpKind::kCache, 0, kSize).is_ok());
  REQUIRE(first_difference(d.mem.contents(), before) == -1);
  REQUIRE(d.mem.unflushed_writes() == 1);
  REQUIRE(d.mem.ops_completed(BlockOpKind::kCache) == 1);
}

TEST_CASE("memory: fail_nth fails exactly the n-th op of that kind, counted from now",
          "[memory][faults]") {
  Disk d;
  REQUIRE(d.write(0, filled(512, 1)).is_ok());  // before the fault is armed
  d.mem.fail_nth(BlockOpKind::kWrite, 3, EIO);
  REQUIRE(d.write(512, filled(512, 2)).is_ok());
  REQUIRE(d.read(0, 512) == filled(512, 1));  // reads do not count
  REQUIRE(d.write(1024, filled(512, 3)).is_ok());
  const Bytes before = d.mem.contents();
  Status st = d.write(0, filled(4096, 4));
  REQUIRE(st.code() == Code::kIoError);
  REQUIRE(st.err() == EIO);
  REQUIRE(first_difference(d.mem.contents(), before) == -1);  // a failed op changes nothing
  REQUIRE(d.mem.unflushed_writes() == 3);
  REQUIRE(d.write(0, filled(512, 5)).is_ok());  // one-shot: the next one works
  REQUIRE(d.mem.ops_completed(BlockOpKind::kWrite) == 4);
}

TEST_CASE("memory: a failed read leaves the buffer alone", "[memory][faults]") {
  Disk d;
  REQUIRE(d.write(0, filled(512, 1)).is_ok());
  d.mem.fail_nth(BlockOpKind::kRead, 1, EIO);
  Bytes buf = filled(512, 0xee);
  REQUIRE(d.op(BlockOpKind::kRead, 0, 512, buf.data()).code() == Code::kIoError);
  REQUIRE(buf == filled(512, 0xee));
  REQUIRE(d.mem.ops_completed(BlockOpKind::kRead) == 0);
}

TEST_CASE("memory: a failed flush makes nothing durable", "[memory][faults]") {
  Disk d;
  REQUIRE(d.write(0, filled(512, 1)).is_ok());
  d.mem.fail_nth(BlockOpKind::kFlush, 1, EIO);
  REQUIRE(d.flush().code() == Code::kIoError);
  REQUIRE(d.mem.unflushed_writes() == 1);
  d.mem.crash();
  REQUIRE(d.read(0, 512) == Bytes(512));
}

TEST_CASE("memory: fail_nth works for every kind and any errno", "[memory][faults]") {
  const auto kind = GENERATE(BlockOpKind::kRead, BlockOpKind::kWrite, BlockOpKind::kFlush,
                             BlockOpKind::kTrim, BlockOpKind::kWriteZeroes, BlockOpKind::kCache);
  CAPTURE(op_name(kind));
  Disk d;
  Bytes buf(512);
  d.mem.fail_nth(kind, 1, EOPNOTSUPP);
  d.mem.fail_nth(kind, 2, ENOSPC);
  REQUIRE(d.op(kind, 0, 512, buf.data()).code() == Code::kNotSupported);
  REQUIRE(d.op(kind, 0, 512, buf.data()).code() == Code::kNoSpace);
  REQUIRE(d.op(kind, 0, 512, buf.data()).is_ok());
  REQUIRE(d.mem.ops_completed(kind) == 1);
}

// The pattern of failures of `n` writes under fail_randomly(p) with `seed`.
std::vector<bool> random_failures(uint64_t seed, double p, int n) {
  Disk d(kSize, seed);
  d.mem.fail_randomly(BlockOpKind::kWrite, p, EIO);
  std::vector<bool> failed;
  for (int i = 0; i < n; ++i) {
    Status st = d.write(0, filled(16, static_cast<uint8_t>(i)));
    if (!st.is_ok()) REQUIRE(st.err() == EIO);
    failed.push_back(!st.is_ok());
  }
  return failed;
}

TEST_CASE("memory: fail_randomly fails about p of the ops, reproducibly from the seed",
          "[memory][faults]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  constexpr int kOps = 2000;
  const auto half = random_failures(seed, 0.5, kOps);
  const auto fails = std::count(half.begin(), half.end(), true);
  // Binomial(2000, 0.5): sd ~22, so +-200 is ~9 sd.
  REQUIRE(fails > 800);
  REQUIRE(fails < 1200);
  REQUIRE(random_failures(seed, 0.5, kOps) == half);

  const auto never = random_failures(seed, 0.0, 200);
  REQUIRE(std::count(never.begin(), never.end(), true) == 0);
  const auto always = random_failures(seed, 1.0, 200);
  REQUIRE(std::count(always.begin(), always.end(), true) == 200);
}

TEST_CASE("memory: clear_faults removes scheduled and random faults", "[memory][faults]") {
  Disk d;
  d.mem.fail_nth(BlockOpKind::kWrite, 1, EIO);
  d.mem.fail_randomly(BlockOpKind::kRead, 1.0, EIO);
  d.mem.enospc_after(0);
  d.mem.clear_faults();
  REQUIRE(d.write(0, filled(512, 1)).is_ok());
  REQUIRE(d.read(0, 512) == filled(512, 1));
}

TEST_CASE("memory: ENOSPC after the byte budget, and a failing write changes nothing",
          "[memory][faults]") {
  Disk d;
  d.mem.enospc_after(8192);
  REQUIRE(d.write(0, filled(4096, 1)).is_ok());
  REQUIRE(d.op(BlockOpKind::kWriteZeroes, 4096, 2048).is_ok());
  // 2048 left: a 4096-byte write does not fit, fails whole, uses nothing.
  const Bytes before = d.mem.contents();
  const uint64_t unflushed = d.mem.unflushed_writes();
  Status st = d.write(8192, filled(4096, 2));
  REQUIRE(st.code() == Code::kNoSpace);
  REQUIRE(st.err() == ENOSPC);
  REQUIRE(first_difference(d.mem.contents(), before) == -1);
  REQUIRE(d.mem.unflushed_writes() == unflushed);
  REQUIRE(d.op(BlockOpKind::kWriteZeroes, 0, 4096).code() == Code::kNoSpace);
  // Trim frees rather than uses space; reads and flushes go on working.
  REQUIRE(d.op(BlockOpKind::kTrim, 0, 512).is_ok());
  REQUIRE(d.flush().is_ok());
  REQUIRE(d.read(512, 512) == filled(512, 1));
  // What is left still fits: exactly 2048 bytes, then nothing.
  REQUIRE(d.write(8192, filled(2048, 3)).is_ok());
  REQUIRE(d.write(16384, filled(1, 4)).code() == Code::kNoSpace);
  REQUIRE(d.mem.ops_completed(BlockOpKind::kWrite) == 2);
}

TEST_CASE("memory: a read-only backend rejects every mutation", "[memory]") {
  Disk d(kSize, 1, /*read_only=*/true);
  REQUIRE(d.mem.info().read_only);
  Bytes buf = filled(512, 1);
  REQUIRE(d.op(BlockOpKind::kWrite, 0, 512, buf.data()).code() == Code::kReadOnly);
  REQUIRE(d.op(BlockOpKind::kTrim, 0, 512).code() == Code::kReadOnly);
  REQUIRE(d.op(BlockOpKind::kWriteZeroes, 0, 512).code() == Code::kReadOnly);
  REQUIRE(d.flush().is_ok());
  REQUIRE(d.op(BlockOpKind::kCache, 0, 512).is_ok());
  REQUIRE(d.read(0, 512) == Bytes(512));
}

TEST_CASE("memory: out-of-range ops fail and extent_at reports data", "[memory]") {
  Disk d;
  Bytes buf(1024);
  REQUIRE(d.op(BlockOpKind::kRead, kSize - 512, 1024, buf.data()).code() == Code::kInvalid);
  REQUIRE(d.op(BlockOpKind::kWrite, kSize + 1, 0, buf.data()).code() == Code::kInvalid);
  REQUIRE(d.op(BlockOpKind::kRead, kSize, 0, buf.data()).is_ok());  // empty, at the end
  auto e = d.mem.extent_at(4096, 1 << 20);
  REQUIRE(e.is_ok());
  REQUIRE(e->length == kSize - 4096);
  REQUIRE_FALSE(e->is_hole);
  REQUIRE(d.mem.extent_at(kSize, 1).status().code() == Code::kOutOfRange);
}

// ---- randomized, against a model ----

// What a reader sees and what survives crash(false): writes update `visible`;
// FUA writes also update `durable`; a flush copies visible into durable.
struct Model {
  Bytes visible = Bytes(kSize);
  Bytes durable = Bytes(kSize);
  void write(uint64_t offset, const Bytes& data, bool fua) {
    put(visible, offset, data);
    if (fua) put(durable, offset, data);
  }
};

TEST_CASE("memory: random ops with random faults agree with a model across crashes",
          "[memory][random]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ull);
  Disk d(kSize, seed);
  for (auto kind : {BlockOpKind::kRead, BlockOpKind::kWrite, BlockOpKind::kFlush,
                    BlockOpKind::kTrim, BlockOpKind::kWriteZeroes}) {
    d.mem.fail_randomly(kind, 0.1, EIO);
  }
  Model m;
  int failures = 0;
  for (int step = 0; step < 3000; ++step) {
    CAPTURE(step);
    const uint64_t offset = rng() % kSize;
    const uint64_t length = rng() % std::min<uint64_t>(8193, kSize - offset + 1);
    const bool fua = rng() % 4 == 0;
    const uint32_t flags = fua ? static_cast<uint32_t>(kFua) : 0;
    const unsigned pick = rng() % 100;
    Status st;
    if (pick < 40) {
      Bytes data = random_bytes(rng, length);
      st = d.write(offset, data, flags);
      if (st.is_ok()) m.write(offset, data, fua);
    } else if (pick < 55) {
      const auto kind = pick < 48 ? BlockOpKind::kTrim : BlockOpKind::kWriteZeroes;
      st = d.op(kind, offset, length, nullptr, flags);
      if (st.is_ok()) m.write(offset, Bytes(length), fua);
    } else if (pick < 65) {
      st = d.flush();
      if (st.is_ok()) m.durable = m.visible;
    } else if (pick < 97) {
      Bytes buf(length);
      st = d.op(BlockOpKind::kRead, offset, length, buf.data());
      if (st.is_ok()) {
        const auto at = m.visible.begin() + static_cast<ptrdiff_t>(offset);
        REQUIRE(first_difference(buf, Bytes(at, at + static_cast<ptrdiff_t>(length))) == -1);
      }
    } else {
      d.mem.crash();
      m.visible = m.durable;
    }
    if (!st.is_ok()) {
      REQUIRE(st.err() == EIO);
      ++failures;
    }
    REQUIRE(first_difference(d.mem.durable_contents(), m.durable) == -1);
  }
  REQUIRE(first_difference(d.mem.contents(), m.visible) == -1);
  REQUIRE(failures > 0);
}

// One unflushed write of a torn-crash round, with its place in the op order.
struct SlotWrite {
  uint64_t offset;
  Bytes data;
  size_t order;
};

// The image over `w`'s range after replaying, in order, `fuas` (order, offset,
// data) and, when `with_w`, `w` itself, on top of `base`.
Bytes replay_range(const Bytes& base, const SlotWrite& w, bool with_w,
                   const std::vector<std::pair<size_t, SlotWrite>>& fuas) {
  const uint64_t begin = w.offset;
  const uint64_t end = w.offset + w.data.size();
  Bytes out(base.begin() + static_cast<ptrdiff_t>(begin),
            base.begin() + static_cast<ptrdiff_t>(end));
  auto overlay = [&](const SlotWrite& x) {
    for (uint64_t i = std::max(begin, x.offset); i < std::min(end, x.offset + x.data.size()); ++i) {
      out[i - begin] = x.data[i - x.offset];
    }
  };
  bool w_done = false;
  for (const auto& [order, fua] : fuas) {
    if (with_w && !w_done && w.order < order) {
      overlay(w);
      w_done = true;
    }
    overlay(fua);
  }
  if (with_w && !w_done) overlay(w);
  return out;
}

enum class Fate { kWhole, kDropped, kTorn, kAmbiguous };

// Which allowed cut explains `after` over w's range: the bytes before the cut
// come from w, the rest are as if w had never been written. Fails the test
// when no cut on a 512-byte sector boundary (or 0, or the whole) does.
Fate judge(const Bytes& after, const SlotWrite& w, const Bytes& with_w, const Bytes& without_w) {
  const uint64_t len = w.data.size();
  const auto* got = after.data() + w.offset;
  uint64_t longest_with = 0;  // the cut can be at most this
  while (longest_with < len && got[longest_with] == with_w[longest_with]) ++longest_with;
  uint64_t shortest_without = len;  // and at least this
  while (shortest_without > 0 && got[shortest_without - 1] == without_w[shortest_without - 1]) {
    --shortest_without;
  }
  std::vector<uint64_t> cuts;
  for (uint64_t c = shortest_without; c <= longest_with; ++c) {
    if (c == 0 || c == len || (w.offset + c) % 512 == 0) cuts.push_back(c);
  }
  CAPTURE(w.offset, len, longest_with, shortest_without);
  REQUIRE_FALSE(cuts.empty());
  if (cuts.size() > 1) return Fate::kAmbiguous;
  return cuts[0] == len ? Fate::kWhole : cuts[0] == 0 ? Fate::kDropped : Fate::kTorn;
}

TEST_CASE("memory: a torn crash keeps each unflushed write whole, dropped or as a prefix",
          "[memory][random]") {
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed + 1);
  constexpr uint64_t kSlots = 6;
  constexpr uint64_t kSlotBytes = kSize / kSlots;
  Disk d(kSize, seed);
  int fates[4] = {};
  for (int round = 0; round < 150; ++round) {
    CAPTURE(round);
    const Bytes base = d.mem.contents();  // nothing pending after the last crash
    std::vector<SlotWrite> slots;
    std::vector<std::pair<size_t, SlotWrite>> fuas;
    size_t order = 0;
    for (uint64_t s = 0; s < kSlots; ++s) {
      // Unflushed writes do not overlap one another, so each is judged alone;
      // FUA writes go anywhere, before or after them.
      const uint64_t len = 1 + rng() % kSlotBytes;
      const uint64_t off = s * kSlotBytes + rng() % (kSlotBytes - len + 1);
      slots.push_back({off, random_bytes(rng, len), order++});
      REQUIRE(d.write(off, slots.back().data).is_ok());
      if (rng() % 2 == 0) {
        const uint64_t flen = 1 + rng() % 4096;
        const uint64_t foff = rng() % (kSize - flen + 1);
        SlotWrite f{foff, random_bytes(rng, flen), order};
        fuas.emplace_back(order++, f);
        REQUIRE(d.write(foff, f.data, kFua).is_ok());
      }
    }
    d.mem.crash(true);
    const Bytes after = d.mem.contents();
    REQUIRE(first_difference(d.mem.durable_contents(), after) == -1);
    REQUIRE(d.mem.unflushed_writes() == 0);
    // Bytes no unflushed write touched hold exactly base + the FUA writes.
    Bytes expect = base;
    std::vector<bool> in_slot(kSize, false);
    for (const auto& fua : fuas) put(expect, fua.second.offset, fua.second.data);
    for (const SlotWrite& w : slots) {
      std::fill_n(in_slot.begin() + static_cast<ptrdiff_t>(w.offset), w.data.size(), true);
    }
    for (uint64_t i = 0; i < kSize; ++i) {
      if (!in_slot[i] && after[i] != expect[i]) FAIL("byte " << i << " outside the writes changed");
    }
    for (const SlotWrite& w : slots) {
      const Fate f =
          judge(after, w, replay_range(base, w, true, fuas), replay_range(base, w, false, fuas));
      ++fates[static_cast<int>(f)];
    }
  }
  // With ~900 writes, each fate happens (each has probability ~1/3).
  CAPTURE(fates[0], fates[1], fates[2], fates[3]);
  REQUIRE(fates[static_cast<int>(Fate::kWhole)] > 0);
  REQUIRE(fates[static_cast<int>(Fate::kDropped)] > 0);
  REQUIRE(fates[static_cast<int>(Fate::kTorn)] > 0);
}

TEST_CASE("memory: loops on several threads can share one backend", "[memory][threads]") {
  constexpr int kThreads = 4;
  constexpr uint64_t kPart = kSize / kThreads;
  const uint64_t seed = test::test_seed();
  CAPTURE(seed);
  MemoryBackend mem(kSize, seed);
  std::vector<Bytes> parts;
  std::mt19937_64 rng(seed);
  for (int t = 0; t < kThreads; ++t) parts.push_back(random_bytes(rng, kPart));
  std::vector<int> errors(kThreads, 0);  // each thread writes only its own slot
  // Loops are made here and outlive the threads: liburing unmaps a ring with
  // a raw syscall TSan cannot see, so a ring mapped at a dead sibling's
  // address would be reported as a race.
  std::vector<std::unique_ptr<EventLoop>> loops;
  for (int t = 0; t < kThreads; ++t) loops.push_back(test::make_loop());
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      EventLoop* loop = loops[t].get();
      for (uint64_t off = 0; off < kPart; off += 512) {
        RecordingOp w(BlockOpKind::kWrite, t * kPart + off, 512, parts[t].data() + off);
        RecordingOp f(BlockOpKind::kFlush, 0, 0);
        errors[t] += !test::run_on(*loop, mem, w).is_ok();
        errors[t] += !test::run_on(*loop, mem, f).is_ok();
      }
    });
  }
  // Meanwhile, inspection and fault set-up from this thread.
  for (int i = 0; i < 200; ++i) {
    mem.fail_randomly(BlockOpKind::kCache, 0.5, EIO);
    (void)mem.contents();
    (void)mem.ops_completed(BlockOpKind::kWrite);
  }
  for (auto& th : threads) th.join();
  REQUIRE(errors == std::vector<int>(kThreads, 0));
  Bytes expect;
  for (const Bytes& p : parts) expect.insert(expect.end(), p.begin(), p.end());
  REQUIRE(first_difference(mem.contents(), expect) == -1);
  REQUIRE(first_difference(mem.durable_contents(), expect) == -1);
  REQUIRE(mem.ops_completed(BlockOpKind::kWrite) == kSize / 512);
}

}  // namespace
}  // namespace shadowd
