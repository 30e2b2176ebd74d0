#!/usr/bin/python3
"""Crash loops of the real daemon: kill -9 at random moments, restart, check.

One shadowd at a time serves a 16 MiB backing file with a shadow pool and a
test clock (`--test-clock`: the daemon's clock, which stamps every journal
record, stands still until `shadowctl debug advance`). Every cycle:

1. Start the daemon on the same backing and pool (sometimes with --init,
   which must keep the pool; sometimes a first start is killed before it is
   ready, during recovery, and started again). Then check it against the
   model of the device the test keeps:
   - the live export: every acknowledged write reads back (or what a later
     acknowledged write left there); a write that was in flight at the kill
     reads as all old or all new content, never something else or a mix;
   - the journal: `shadowctl history` (not degraded, window start at the
     pool's epoch, last_seq and journal_records within what was sent and
     acknowledged) and `shadowctl versions --limit 0` (per segment: the
     number of journal records equals the writes that touched it, and its
     newest record carries the timestamp of the second in which the newest
     of them was written); `shadowctl pool`: no pool errors;
   - restores: the test clock is moved past the last record and one to three
     random earlier whole seconds S of the history — at least one in the
     second of the last kill when it has one, so that restores cross the
     crashes — are restored with `shadowctl export --at @S` (read through
     libnbd), `shadowctl export --at seq:N` or `shadowctl restore --at @S
     --output FILE`, and compared byte for byte with the model's device at
     S; `shadowctl verify` every few cycles.
2. Write: one to three "seconds" of the test clock, each a burst of random
   requests (WRITE of random or compressible data, WRITE_ZEROES, TRIM) on one
   to three libnbd connections with up to 16 requests in flight each, about a
   third with FUA and FLUSHes between them. Requests in flight never overlap
   one another, so that the state after any prefix of replies is defined.
   Between seconds every reply is in, the journal's newest timestamp and
   sequence number are read, and the clock moves on by 2 s (`debug advance`,
   which also runs a shadowing round and, with --checkpoint-interval 1, a
   checkpoint); after a start, to at least 1.5 s past the newest record.
3. SIGKILL in the last second of the cycle, at a random moment: after a
   random number of replies with writes in flight, right after a write or a
   FLUSH was sent, while idle, while a `debug advance` (shadowing round, checkpoint) is
   under way, or while a point-in-time export is being read.

The model: a history per 512-byte unit of (second, write) entries. Writes
acknowledged are always in it; writes in flight at the kill are resolved at
the next start from what the live export shows (all old: lost, all new:
kept), which then must also be what the history shows at that second. So
every restore is exact: the test clock makes the seconds exact (all records
of one second carry that second's clock, the gaps between seconds hold no
record), and restores pick whole seconds S in the gaps.

What is promised for writes acknowledged without FUA or a later FLUSH:
DESIGN.md §2.1 acknowledges a write only after its journal record is
written, and a SIGKILL does not lose what a process wrote (the kernel still
has it); only a power loss may lose unsynced writes. So every acknowledged
write must survive a SIGKILL; the test says which kind was lost when one is.

Cycles: SHADOWD_CRASH_CYCLES (default 30) or --cycles; --long (or
SHADOWD_CRASH_LONG=1) runs 300. The seed is printed; SHADOWD_CRASH_SEED or
--seed replays the same requests and kill points (the interleaving of
replies, hence what was in flight at a kill, is the machine's). A failure
prints the seed, the cycle and the command that replays it. --summary FILE
writes the figures as JSON; the last line of the output is
"CRASH-LOOP-SUMMARY {json}".

Synchronisation: sd_notify READY=1 for every start, process exit for every
kill, each request's reply, control commands that reply when done. No sleeps;
deadlines only turn a hang into a failure.
"""

import argparse
import bisect
import collections
import itertools
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import nbd

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "integration"))
from harness import (KiB, MiB, Daemon, ShadowCtl, expect, expect_eq, log,  # noqa: E402
                     main, make_pool_file, shadowctl_path, shadowd_path)

SIZE = 16 * MiB
SEG = 64 * KiB
NSEG = SIZE // SEG
UNIT = 512                      # the model's granule: writes are 512-byte aligned
NUNITS = SIZE // UNIT
ZONE = "4M"
CI_CYCLES = 30
LONG_CYCLES = 300
DEPTH = 16                      # requests in flight per connection at most
NS = 10**9
DEADLINE = 60.0                 # failure guard for any single wait
VERIFY_EVERY = 10               # `shadowctl verify` every this many cycles
POOL_PER_CYCLE = 14 * MiB       # pool file size per cycle (see CrashLoop)
# How the cycle's last second ends: SIGKILL after a number of replies; right
# after a request was sent (it may not even have reached the daemon); right
# after a FLUSH was sent; idle; with `debug advance` under way; while a
# point-in-time export is read.
KILL_KINDS = [("writes", 45), ("sent", 15), ("flush", 10), ("idle", 10), ("advance", 10),
              ("export", 10)]


class Killed(Exception):
    """The daemon was killed on purpose (unwinds the write loop)."""


# --------------------------------------------------------------------------
# The model


class Write:
    __slots__ = ("wid", "kind", "off", "length", "fua", "compressible", "dseed", "phase",
                 "acked", "durable", "state", "data")

    def __init__(self, wid, kind, off, length, fua, compressible, dseed, phase):
        self.wid = wid
        self.kind = kind            # "write", "zero" or "trim"
        self.off = off
        self.length = length
        self.fua = fua
        self.compressible = compressible
        self.dseed = dseed
        self.phase = phase
        self.acked = False
        self.durable = False        # acknowledged with FUA or before an acknowledged FLUSH
        # new (never sent), sent, acked; after a kill: kept, lost, unknown
        self.state = "new"
        self.data = None            # the payload while in flight

    @property
    def units(self):
        return range(self.off // UNIT, (self.off + self.length) // UNIT)

    @property
    def segments(self):
        return range(self.off // SEG, (self.off + self.length - 1) // SEG + 1)

    def describe(self, model):
        p = model.phases[self.phase]
        how = "FUA" if self.fua else "no FUA"
        return (f"write #{self.wid} ({self.kind} {self.length} B at {self.off}, {how}, "
                f"{'random' if not self.compressible else 'compressible'} data, cycle {p.cycle}, "
                f"second {self.phase}, {self.state}{', durable' if self.durable else ''})")


class Phase:
    """One second of the test clock: the writes made while the clock showed
    ``clock_ns``. Its records carry timestamps in [clock_ns, end_ns]; the
    whole seconds after end_ns and before next_ns show the state after it."""

    def __init__(self, idx, cycle, clock_ns, seq_start):
        self.idx = idx
        self.cycle = cycle
        self.clock_ns = clock_ns
        self.end_ns = None
        self.next_ns = None
        self.seq_start = seq_start
        self.seq_end = None         # exact when every reply was in (no kill)
        self.seq_hi = None          # after a kill: the journal's last_seq at the next start
        self.crashed = False
        self.kill = None

    def seconds(self):
        if self.end_ns is None or self.next_ns is None:
            return range(0)
        return range(self.end_ns // NS + 1, (self.next_ns - 1) // NS + 1)


class Model:
    def __init__(self):
        self.writes = [None]        # wid 0 is never used
        self.hist = [[] for _ in range(NUNITS)]   # per unit: (phase << 32 | wid), in order
        self.phases = []
        self.seg_lo = [0] * NSEG    # journal records per segment: at least
        self.seg_hi = [0] * NSEG    # ... and at most
        self.seg_first = [None] * NSEG     # phase of the first write to the segment
        self.seg_last_lo = [None] * NSEG   # phase of the newest certain write (a record)
        self.seg_last_hi = [None] * NSEG   # phase of the newest write, maybe undecidable
        self.records_lo = 0
        self.records_hi = 0
        self._cache = collections.OrderedDict()
        self._cache_bytes = 0

    # --- payloads: regenerated from the write's seed, cached
    def payload(self, w):
        if w.kind != "write":
            return bytes(w.length)
        b = self._cache.get(w.wid)
        if b is not None:
            self._cache.move_to_end(w.wid)
            return b
        r = random.Random(w.dseed)
        if w.compressible:
            b = b"".join(r.randbytes(32) + bytes(UNIT - 32) for _ in range(w.length // UNIT))
        else:
            b = r.randbytes(w.length)
        self._cache[w.wid] = b
        self._cache_bytes += len(b)
        while self._cache_bytes > 256 * MiB:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= len(old)
        return b

    def new_phase(self, cycle, clock_ns, seq_start):
        p = Phase(len(self.phases), cycle, clock_ns, seq_start)
        self.phases.append(p)
        return p

    def new_write(self, rng, phase, hot):
        r = rng.random()
        kind = "write" if r < 0.84 else "zero" if r < 0.94 else "trim"
        x = rng.random()
        if x < 0.6:
            n = rng.randint(1, 16)
        elif x < 0.93:
            n = rng.randint(17, 128)
        else:
            n = rng.randint(129, 512 if kind == "write" else 1024)
        if rng.random() < 0.2:
            n = max(8, n - n % 8)                       # whole 4 KiB blocks
        if rng.random() < 0.45:                         # the cycle's hot MiB: overwrites
            lo = hot
            hi = min(NUNITS, hot + MiB // UNIT)
        else:
            lo, hi = 0, NUNITS
        n = min(n, hi - lo)
        u0 = rng.randrange(lo, hi - n + 1)
        if rng.random() < 0.2:
            u0 -= u0 % 8
        w = Write(len(self.writes), kind, u0 * UNIT, n * UNIT, rng.random() < 0.3,
                  rng.random() < 0.5, rng.getrandbits(63), phase.idx)
        self.writes.append(w)
        return w

    # --- what happened to a write
    def _enter(self, w, certain):
        key = (w.phase << 32) | w.wid
        for u in w.units:
            self.hist[u].append(key)
        for s in w.segments:
            if self.seg_first[s] is None:
                self.seg_first[s] = w.phase
            self.seg_hi[s] += 1
            self.seg_last_hi[s] = w.phase
            if certain:
                self.seg_lo[s] += 1
                self.seg_last_lo[s] = w.phase
        self.records_hi += len(w.segments)
        if certain:
            self.records_lo += len(w.segments)

    def acked(self, w):
        w.acked = True
        w.state = "acked"
        self._enter(w, True)

    def kept(self, w):
        """An unacknowledged write found applied after the kill."""
        w.state = "kept"
        self._enter(w, True)

    def unknown(self, w):
        """Old and new content are the same: applied or not, nobody can tell."""
        w.state = "unknown"
        self._enter(w, False)

    # --- the device
    def last_entry(self, u, phase=None):
        h = self.hist[u]
        if not h:
            return None
        if phase is None:
            return h[-1]
        i = bisect.bisect_right(h, ((phase + 1) << 32) - 1)
        return h[i - 1] if i else None

    def image(self, phase=None):
        """The device after every write of seconds <= phase (None: all)."""
        lim = None if phase is None else ((phase + 1) << 32) - 1
        keys = [self._key(h, lim) for h in self.hist]
        out = bytearray(SIZE)
        u = 0
        for key, run in itertools.groupby(keys):
            n = sum(1 for _ in run)
            if key is not None:
                w = self.writes[key & 0xFFFFFFFF]
                if w.kind == "write":
                    rel = u * UNIT - w.off
                    out[u * UNIT:(u + n) * UNIT] = self.payload(w)[rel:rel + n * UNIT]
            u += n
        return out

    @staticmethod
    def _key(h, lim):
        if not h:
            return None
        if lim is None:
            return h[-1]
        i = bisect.bisect_right(h, lim)
        return h[i - 1] if i else None

    def explain(self, u, got, phase=None):
        """What the model has for unit u, and which write (if any) ``got`` is."""
        e = self.last_entry(u, phase)
        want = "zeroes (never written)" if e is None else self.writes[e & 0xFFFFFFFF].describe(self)
        seen = "nothing the model knows"
        if got == bytes(UNIT):
            seen = "zeroes"
        for key in reversed(self.hist[u]):
            w = self.writes[key & 0xFFFFFFFF]
            rel = u * UNIT - w.off
            if w.kind == "write" and self.payload(w)[rel:rel + UNIT] == got:
                seen = w.describe(self)
                break
        return f"unit at offset {u * UNIT} (segment {u * UNIT // SEG}): want {want}; got {seen}"


# --------------------------------------------------------------------------
# NBD clients


def connect_unix(path, export="disk"):
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(path)
    return h


def read_all(h, size=SIZE, chunk=4 * MiB):
    return b"".join(h.pread(min(chunk, size - o), o) for o in range(0, size, chunk))


def first_diff_unit(a, b):
    """The first 512-byte unit where a and b differ, or None."""
    if a == b:
        return None
    for o in range(0, len(a), SEG):
        if a[o:o + SEG] != b[o:o + SEG]:
            for u in range(o // UNIT, (o + SEG) // UNIT):
                if a[u * UNIT:(u + 1) * UNIT] != b[u * UNIT:(u + 1) * UNIT]:
                    return u
    return len(a) // UNIT


class Clients:
    """Several libnbd connections driven by one select() loop; replies update
    the model at once."""

    def __init__(self, model, stats, paths):
        self.model = model
        self.stats = stats
        self.hs = [connect_unix(p) for p in paths]
        self.multi_conn = all(h.can_multi_conn() for h in self.hs)
        self.inflight = [0] * len(self.hs)
        self.busy = {}              # wid -> (first unit, end unit) in flight
        self.replies = 0
        self.errors = []            # replies with an error before the kill
        self.killed = False
        self.unsynced = [set() for _ in self.hs]   # acked, not yet durable

    def _done(self, i):
        self.inflight[i] -= 1
        self.replies += 1

    def write(self, i, w):
        h = self.hs[i]
        w.data = self.model.payload(w) if w.kind == "write" else None
        flags = nbd.CMD_FLAG_FUA if w.fua else 0

        def cb(err):
            self._done(i)
            self.busy.pop(w.wid, None)
            if err.value == 0:
                self.model.acked(w)
                self.stats["writes_acked"] += 1
                self.stats["bytes_acked"] += w.length
                if w.fua:
                    w.durable = True
                    self.stats["writes_durable"] += 1
                else:
                    self.unsynced[i].add(w)
            elif not self.killed:
                self.errors.append(f"{w.describe(self.model)}: error {err.value}")
            w.data = None
            return 1

        self.busy[w.wid] = (w.off // UNIT, (w.off + w.length) // UNIT)
        w.state = "sent"
        self.inflight[i] += 1
        self.stats["requests"] += 1
        if w.kind == "write":
            h.aio_pwrite(w.data, w.off, completion=cb, flags=flags)
        elif w.kind == "zero":
            h.aio_zero(w.length, w.off, completion=cb, flags=flags)
        else:
            h.aio_trim(w.length, w.off, completion=cb, flags=flags)

    def flush(self, i):
        # With multi-conn a FLUSH covers the writes acknowledged on every
        # connection before it was sent; else those of its own connection.
        covered = set().union(*self.unsynced) if self.multi_conn else set(self.unsynced[i])

        def cb(err):
            self._done(i)
            if err.value == 0:
                for w in covered:
                    if not w.durable:
                        w.durable = True
                        self.stats["writes_durable"] += 1
                for s in self.unsynced:
                    s.difference_update(covered)
            elif not self.killed:
                self.errors.append(f"FLUSH on connection {i}: error {err.value}")
            return 1

        self.inflight[i] += 1
        self.stats["flushes"] += 1
        self.hs[i].aio_flush(completion=cb)

    def overlaps(self, w):
        a, b = w.off // UNIT, (w.off + w.length) // UNIT
        return any(a < y and x < b for x, y in self.busy.values())

    def total_inflight(self):
        return sum(self.inflight)

    def pump(self):
        """Wait for the next event on any connection and let libnbd handle it."""
        rl, wl, by_fd = [], [], {}
        for h in self.hs:
            if h.aio_is_dead() or h.aio_is_closed():
                continue
            fd = h.aio_get_fd()
            d = h.aio_get_direction()
            by_fd[fd] = h
            if d & nbd.AIO_DIRECTION_READ:
                rl.append(fd)
            if d & nbd.AIO_DIRECTION_WRITE:
                wl.append(fd)
        if not by_fd:
            return
        r, w, _ = select.select(rl, wl, [], DEADLINE)
        if not r and not w:
            raise AssertionError(f"no reply for {DEADLINE:.0f}s with "
                                 f"{self.total_inflight()} requests in flight: daemon hung")
        for fd in set(r) | set(w):
            h = by_fd[fd]
            try:
                if fd in r:
                    h.aio_notify_read()
                else:
                    h.aio_notify_write()
            except nbd.Error as e:
                if not self.killed:
                    raise AssertionError(f"a connection failed before the kill: {e}")

    def drain(self):
        """After a kill: until libnbd has failed every request left."""
        deadline = time.monotonic() + DEADLINE
        while any(not (h.aio_is_dead() or h.aio_is_closed()) and h.aio_in_flight() > 0
                  for h in self.hs):
            if time.monotonic() > deadline:
                raise AssertionError("requests still in flight long after the kill")
            self.pump()

    def settle(self):
        """Every reply in (no kill)."""
        while self.total_inflight() > 0:
            self.pump()
        expect(not self.errors, f"requests failed: {self.errors[:5]}")

    def close(self):
        for h in self.hs:
            if not (h.aio_is_dead() or h.aio_is_closed()):
                try:
                    h.shutdown()
                except nbd.Error:
                    pass
        self.hs = []


# --------------------------------------------------------------------------
# The loop


class CrashLoop:
    def __init__(self, work, rng, seed, cycles):
        self.work = work
        self.rng = rng              # the workload: requests, kill points, daemon options
        # What to restore depends on the clock (how many whole seconds a gap
        # holds): its own stream, so that a seed replays the same workload.
        self.rrng = random.Random(seed ^ 0x5EC0)
        self.seed = seed
        self.cycles = cycles
        self.model = Model()
        self.backing = os.path.join(work, "disk.img")
        with open(self.backing, "wb") as f:
            f.truncate(SIZE)
        # The pool holds the whole run's history: retention must never
        # shrink. Every start closes the zones left open (journal, versions)
        # and appends to fresh ones (FORMAT.md, start-up step 6), and the
        # records keep those zones for the retention: up to two zones a start
        # besides 1-2 MiB of journal and versions a cycle, and the low-water
        # mark keeps some zones free.
        pool_size = 128 * MiB + cycles * POOL_PER_CYCLE
        self.pool = make_pool_file(os.path.join(work, "pool.img"), pool_size)
        self.stats = collections.Counter()
        self.epoch_ns = None
        self.cycle = 0
        self.prev_stderr = ""

    # --- starting the daemon
    def daemon_args(self, c):
        rng = self.rng
        args = ["--segment-size", str(SEG), "--zone-size", ZONE, "--test-clock",
                "--io-threads", str(rng.choice([1, 2])),
                "--checkpoint-interval", str(rng.choice([1, 1, 60]))]
        budget = rng.choice(["default", "default", "1M", "0"])
        if budget == "0":
            args += ["--shadow-budget", "0", "--shadow-budget-busy", "0"]
        elif budget == "1M":
            args += ["--shadow-budget", "1M", "--shadow-budget-busy", "1M"]
        return args

    def kill_during_startup(self, args, lines):
        """Start shadowd and SIGKILL it after ``lines`` lines of its log
        (0: at once), before it is ready: recovery interrupted."""
        d = os.path.join(self.work, "early")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        cmd = [shadowd_path(), "--backing", self.backing, "--foreground", "--log-level", "info",
               "--unix", os.path.join(d, "nbd.sock"), "--control", os.path.join(d, "control.sock"),
               "--pool", self.pool] + args
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")}
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=env)
        seen = b""
        NL = b"\n"
        deadline = time.monotonic() + DEADLINE
        while seen.count(NL) < lines:
            left = deadline - time.monotonic()
            r, _, _ = select.select([p.stdout], [], [], max(0.0, left))
            if not r:
                p.kill()
                p.wait()
                raise AssertionError(f"shadowd wrote {seen.count(NL)} log lines in "
                                     f"{DEADLINE:.0f}s, waiting for {lines}")
            b = os.read(p.stdout.fileno(), 65536)
            if not b:
                break               # exited: its exit status says why
            seen += b
        p.send_signal(signal.SIGKILL)
        rc = p.wait(timeout=DEADLINE)
        p.stdout.close()
        text = seen.decode(errors="replace")
        if rc not in (-signal.SIGKILL,):
            raise AssertionError(f"shadowd exited with {rc} before the kill during "
                                 f"start-up:\n{text}")
        log(f"  killed during start-up after {lines} log line(s)")
        self.stats["startup_kills"] += 1

    def start(self, c, first):
        args = self.daemon_args(c)
        init = first or self.rng.random() < 0.25
        if not first and self.rng.random() < 0.1:
            self.kill_during_startup(args + (["--init"] if init else []), self.rng.randint(0, 2))
        self.stats["starts"] += 1
        return Daemon(size=SIZE, backing=self.backing, pool=self.pool, pool_init=init,
                      extra_args=args, tcp=False, name=f"cycle{c}")

    # --- the journal's window
    def history(self, ctl):
        """`shadowctl history`, which must show the whole history: not
        degraded, the window still starting at the pool's epoch."""
        h = ctl.json("history")
        expect(not h["degraded"], f"history degraded: {h['degraded_reason']}")
        if self.epoch_ns is None:
            self.epoch_ns = h["epoch_ns"]
        expect_eq(h["epoch_ns"], self.epoch_ns, "the pool's epoch")
        used = sum(t["zones_used"] * t["zone_bytes"] for t in h["tiers"])   # zones in use
        cap = sum(t["zones"] * t["zone_bytes"] for t in h["tiers"])
        why = ("the pool ran full: this run needs a larger pool (POOL_PER_CYCLE)"
               if h["retention_shrunk"] else "history was lost")
        expect(not h["retention_shrunk"] and h["from_ns"] == self.epoch_ns,
               f"the window start moved from the epoch {self.epoch_ns} to {h['from_ns']} "
               f"(retention_shrunk={h['retention_shrunk']}, retention_shrinks="
               f"{h['retention_shrinks']}; pool {used / MiB:.0f} of {cap / MiB:.0f} MiB "
               f"used): {why}")
        self.stats["pool_bytes_used"] = used
        self.stats["pool_bytes"] = cap
        return h

    # --- after a start
    def check_start(self, d, ctl, first):
        m = self.model
        h0 = self.history(ctl)
        if first:
            p = m.new_phase(0, h0["now_ns"], 0)
            p.end_ns = h0["to_ns"]
            p.seq_end = h0["last_seq"]
            expect_eq(h0["last_seq"], 0, "last_seq of a new pool")
            return h0
        expect_eq(h0["first_seq"], 0, "first_seq")
        crash = m.phases[-1]
        crash.end_ns = h0["to_ns"]
        sent = [w for w in m.writes[1:] if w.phase == crash.idx and w.state != "new"]
        acked = sum(1 for w in sent if w.acked)
        expect(crash.seq_start + acked <= h0["last_seq"] <= crash.seq_start + len(sent),
               f"last_seq {h0['last_seq']} after the kill: the second before it ended at "
               f"seq {crash.seq_start}, then {len(sent)} writes were sent and {acked} acknowledged")
        crash.seq_hi = h0["last_seq"]
        self.resolve_live(d, crash)
        self.check_journal(ctl, h0)
        return h0

    def resolve_live(self, d, crash):
        """Read the live export: acknowledged writes are there; each write in
        flight at the kill is all there or not at all; the model learns which."""
        m = self.model
        h = connect_unix(d.unix_path)
        live = read_all(h)
        h.shutdown()
        self.stats["bytes_verified"] += SIZE
        pending = [w for w in m.writes[1:] if w.phase == crash.idx and w.state == "sent"]
        want = m.image()            # without the writes in flight
        for w in pending:
            new = m.payload(w)
            old = bytes(want[w.off:w.off + w.length])
            got = live[w.off:w.off + w.length]
            if new == old:
                m.unknown(w)
                self.stats["inflight_unknown"] += 1
                continue
            if got == new:
                m.kept(w)
                want[w.off:w.off + w.length] = new
                self.stats["inflight_kept"] += 1
                continue
            if got == old:
                w.state = "lost"
                self.stats["inflight_lost"] += 1
                continue
            units_new = units_old = 0
            for k in range(0, w.length, UNIT):
                g = got[k:k + UNIT]
                if g == new[k:k + UNIT]:
                    units_new += 1
                elif g == old[k:k + UNIT]:
                    units_old += 1
                else:
                    u = (w.off + k) // UNIT
                    raise AssertionError(
                        f"live export after the kill: {w.describe(m)} in flight at the kill, "
                        f"but its unit at offset {w.off + k} is neither old nor new content; "
                        + m.explain(u, g))
            raise AssertionError(
                f"live export after the kill: {w.describe(m)} in flight at the kill is "
                f"partially applied ({units_new} units new, {units_old} old, 512 B each): "
                f"a write reaches the primary only after its journal record, and recovery "
                f"re-applies whole records")
        self.stats["inflight_at_kill"] += len(pending)
        u = first_diff_unit(live, want)
        if u is not None:
            e = m.last_entry(u)
            w = m.writes[e & 0xFFFFFFFF] if e is not None else None
            what = ("a durable acknowledged write (FUA, or followed by an acknowledged FLUSH) "
                    "is lost" if w is not None and w.durable else
                    "an acknowledged write (no FUA/FLUSH, but its journal record was written "
                    "before the reply, which SIGKILL cannot undo) is lost" if w is not None else
                    "a never-written unit is not zero")
            raise AssertionError(f"live export after the kill: {what}: "
                                 + m.explain(u, live[u * UNIT:(u + 1) * UNIT]))

    def check_journal(self, ctl, h0):
        m = self.model
        expect(m.records_lo <= h0["journal_records"] <= m.records_hi,
               f"journal_records {h0['journal_records']}: the model has "
               f"{m.records_lo}..{m.records_hi} records (one per segment a write touched)")
        v = ctl.json("versions", "--limit", "0")
        expect(v["more"] is False, "versions --limit 0 lists every segment")
        self.history(ctl)           # no record left the window meanwhile
        got = {s["id"]: s for s in v["segments"]}
        for s in range(NSEG):
            g = got.get(s)
            n = g["records"] if g else 0
            if not m.seg_lo[s] <= n <= m.seg_hi[s]:
                raise AssertionError(
                    f"segment {s}: {n} journal records, the model has "
                    f"{m.seg_lo[s]}..{m.seg_hi[s]}\n" + self.segment_story(ctl, s))
            if n == 0:
                continue            # then seg_lo is 0: only undecidable writes touched it
            # The newest record is the newest certain write's or that of an
            # undecidable write after it; with no certain write, any of them.
            t = g["last_record_ns"]
            lo_p = m.seg_last_lo[s] if m.seg_last_lo[s] is not None else m.seg_first[s]
            lo = m.phases[lo_p].clock_ns
            hi = m.phases[m.seg_last_hi[s]].end_ns
            if not lo <= t <= hi:
                raise AssertionError(
                    f"segment {s}: newest journal record at {t}; the newest write to it was made "
                    f"in second {lo_p}..{m.seg_last_hi[s]} (record times {lo}..{hi})\n"
                    + self.segment_story(ctl, s))
        p = ctl.json("pool")
        expect_eq(p["pool_errors"], 0, "pool errors")

    def segment_story(self, ctl, s):
        """For a failure: the daemon's view of segment s and the model's writes to it."""
        m = self.model
        lines = [f"shadowctl versions --segment #{s}: "
                 + json.dumps(ctl.json("versions", "--segment", f"#{s}"), sort_keys=True)]
        for w in m.writes[1:]:
            if w.state != "new" and s in w.segments:
                p = m.phases[w.phase]
                lines.append(f"  {w.describe(m)}; second's clock {p.clock_ns}, end {p.end_ns}, "
                             f"seq {p.seq_start}..{p.seq_end if p.seq_end is not None else p.seq_hi}")
        return "\n".join(lines)

    # --- the clock
    def next_second(self, ctl, cycle):
        """Move the test clock at least 1.5 s past the newest record and the
        current second; start a new second there."""
        m = self.model
        h = self.history(ctl)
        target = max(h["to_ns"], m.phases[-1].clock_ns, m.phases[-1].end_ns or 0) + 3 * NS // 2
        step = max(1, -(-(target - h["now_ns"]) // NS))
        r = ctl.json("debug", "advance", str(step))
        h2 = self.history(ctl)
        expect(h2["now_ns"] == h["now_ns"] + step * NS,
               f"debug advance {step}: clock {h['now_ns']} -> {h2['now_ns']} ({r})")
        m.phases[-1].next_ns = h2["now_ns"]
        p = m.new_phase(cycle, h2["now_ns"], h2["last_seq"])
        return p

    # --- restores
    def pick_seconds(self, n):
        m = self.model
        done = [p for p in m.phases if len(p.seconds())]
        out = []
        last_crash = next((p for p in reversed(done) if p.crashed), None)
        if last_crash is not None:
            out.append(last_crash)
        while len(out) < n and done:
            out.append(self.rrng.choice(done))
        return [(p, self.rrng.choice(p.seconds())) for p in out]

    def check_restores(self, d, ctl, n):
        m = self.model
        for p, s in self.pick_seconds(n):
            how = self.rrng.choice(["export", "export", "seq", "restore"])
            if how == "seq" and p.seq_end is None:
                how = "export"
            name = f"crash-{self.stats['restores']}"
            want = m.image(p.idx)
            what = f"{how} at second {s} (second #{p.idx} of cycle {p.cycle})"
            if how == "restore":
                out = os.path.join(self.work, "restore.img")
                r = ctl.json("restore", "--at", f"@{s}", "--output", out, "--no-progress",
                             *(["--verify"] if self.rrng.random() < 0.3 else []))
                with open(out, "rb") as f:
                    got = f.read()
                os.unlink(out)
            else:
                at_arg = f"seq:{p.seq_end}" if how == "seq" else f"@{s}"
                r = ctl.json("export", "--at", at_arg, "--name", name)
                h = connect_unix(d.unix_path, name)
                got = read_all(h)
                h.shutdown()
                ctl.json("unexport", name)
            if p.seq_end is not None:
                expect_eq(r["seq"], p.seq_end, f"{what}: the sequence number shown")
            else:
                # A killed second: somewhere between the newest record of the
                # seconds before it that finished (every reply in) and the
                # journal's end at the next start.
                lo = max(q.seq_end for q in m.phases[:p.idx] if q.seq_end is not None)
                expect(lo <= r["seq"] <= p.seq_hi,
                       f"{what}: seq {r['seq']} outside {lo}..{p.seq_hi}")
            expect_eq(len(got), SIZE, f"{what}: size")
            u = first_diff_unit(got, want)
            if u is not None:
                raise AssertionError(f"{what} differs from the model's device at that second: "
                                     + m.explain(u, got[u * UNIT:(u + 1) * UNIT], p.idx))
            self.stats["restores"] += 1
            self.stats[f"restores_{how}"] += 1
            self.stats["bytes_verified"] += SIZE
            # Kills since that second: one per cycle from its own on.
            kills = self.cycle - max(p.cycle, 1)
            self.stats["restores_kills_crossed"] += kills
            if kills >= 2:
                self.stats["restores_across_2_kills"] += 1

    # --- writing
    def write_second(self, cl, ctl, d, phase, nreq, kill):
        """``nreq`` requests in this second; ``kill`` = None (then wait for
        every reply) or the kill plan of the cycle's last second."""
        m = self.model
        rng = self.rng
        hot = rng.randrange(0, NUNITS - MiB // UNIT)
        kind = kill[0] if kill else None
        for i in range(nreq):
            w = m.new_write(rng, phase, hot)
            conn = rng.randrange(len(cl.hs))
            flush_after = rng.random() < 0.12
            flush_conn = rng.randrange(len(cl.hs))
            while cl.overlaps(w) or cl.inflight[conn] >= DEPTH:
                self.maybe_kill(cl, d, kill)
                cl.pump()
            self.maybe_kill(cl, d, kill)
            cl.write(conn, w)
            if flush_after:
                cl.flush(flush_conn)
            if kind == "flush" and i == kill[1]:
                if not flush_after:
                    cl.flush(flush_conn)
                self.kill(cl, d, "right after a FLUSH was sent")
            if kind == "sent" and i == kill[1]:
                self.kill(cl, d, "right after a request was sent")
        while cl.total_inflight() > 0:
            self.maybe_kill(cl, d, kill)
            cl.pump()
        expect(not cl.errors, f"requests failed: {cl.errors[:5]}")

    def maybe_kill(self, cl, d, kill):
        if kill and kill[0] == "writes" and cl.replies >= kill[1]:
            self.kill(cl, d, f"after {cl.replies} replies")

    def kill(self, cl, d, when):
        inflight = cl.total_inflight()
        d.crash()
        cl.killed = True
        self.stats["kills"] += 1
        log(f"  SIGKILL {when}, {inflight} requests in flight")
        raise Killed()

    def crash_idle(self, cl, ctl, d, kind):
        cl.settle()
        if kind == "advance":
            # The shadowing round and checkpoint of `debug advance` under way.
            p = subprocess.Popen([shadowctl_path(), "--socket", ctl.path, "--json", "debug",
                                  "advance", "1"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                self.kill(cl, d, "with a `debug advance` (shadowing round, checkpoint) sent")
            finally:
                p.wait(timeout=DEADLINE)
        if kind == "export":
            secs = self.pick_seconds(1)
            if secs:
                p, s = secs[0]
                r = ctl.json("export", "--at", f"@{s}", "--name", "killed")
                h = connect_unix(d.unix_path, r["name"])
                n = [0]

                def cb(err):
                    n[0] += 1
                    return 1
                bufs = [nbd.Buffer(MiB) for _ in range(0, SIZE, MiB)]
                for k, b in enumerate(bufs):
                    h.aio_pread(b, k * MiB, completion=cb)
                stop = self.rrng.randint(0, 8)
                while n[0] < stop and h.aio_in_flight() > 0:
                    h.poll(-1)
                try:
                    self.kill(cl, d, f"while a point-in-time export was read "
                                     f"({n[0]} of 16 reads in)")
                finally:
                    try:
                        while h.aio_in_flight() > 0:
                            h.poll(-1)
                    except nbd.Error:
                        pass
        self.kill(cl, d, "while idle")

    def run_cycle(self, c):
        m = self.model
        rng = self.rng
        first = c == 1
        with self.start(c, first) as d:
            ctl = ShadowCtl(d)
            self.check_start(d, ctl, first)
            phase = self.next_second(ctl, c)
            if not first:
                self.check_restores(d, ctl, rng.randint(1, 3))
            if c % VERIFY_EVERY == 0:
                r = ctl.json("verify")
                expect(r["clean"] is True, f"shadowctl verify: {r}")
                self.stats["verify_runs"] += 1
            seconds = rng.randint(1, 3)
            kill_kind = rng.choices([k for k, _ in KILL_KINDS], [w for _, w in KILL_KINDS])[0]
            cl = Clients(m, self.stats, [d.unix_path] * rng.randint(1, 3))
            try:
                for k in range(seconds):
                    nreq = rng.randint(8, 64)
                    last = k == seconds - 1
                    kill = None
                    if last:
                        phase.crashed = True
                        phase.kill = kill_kind
                        if kill_kind == "writes":
                            kill = ("writes", cl.replies + rng.randrange(1, max(2, nreq)))
                        elif kill_kind in ("sent", "flush"):
                            kill = (kill_kind, rng.randrange(0, nreq))
                    self.write_second(cl, ctl, d, phase, nreq, kill)
                    h = self.history(ctl)
                    phase.end_ns = h["to_ns"]
                    phase.seq_end = h["last_seq"]
                    expect_eq(h["last_seq"], phase.seq_start + nreq,
                              f"last_seq after {nreq} writes from seq {phase.seq_start}")
                    if not last:
                        phase = self.next_second(ctl, c)
                # Every reply came in before the kill point: kill now.
                self.crash_idle(cl, ctl, d, kill_kind if kill_kind in ("advance", "export")
                                else "idle")
            except Killed:
                pass
            finally:
                try:
                    cl.drain()
                finally:
                    cl.close()
            # A crashed second's journal end is known only at the next start.
            phase.seq_end = None
            phase.end_ns = None
            expect(not d.alive(), "the daemon survived SIGKILL")
            self.prev_stderr = d.stderr_text()
        n = [w for w in m.writes[1:] if w.phase == phase.idx and w.state != "new"]
        log(f"cycle {c}/{self.cycles}: {len(n)} requests in its last second, "
            f"{sum(1 for w in n if w.acked)} acknowledged before the kill ({phase.kill}); "
            f"{self.stats['writes_acked']} acknowledged, {self.stats['restores']} restores so far; "
            f"pool {self.stats['pool_bytes_used'] / MiB:.0f} of "
            f"{self.stats['pool_bytes'] / MiB:.0f} MiB used")

    def final(self):
        """Start once more: check everything, more restores, verify --all, a
        clean stop."""
        c = self.cycles + 1
        with self.start(c, False) as d:
            ctl = ShadowCtl(d)
            self.check_start(d, ctl, False)
            self.next_second(ctl, c)
            self.check_restores(d, ctl, 4)
            r = ctl.json("verify", "--all")
            expect(r["clean"] is True, f"shadowctl verify --all: {r}")
            self.stats["verify_runs"] += 1
            h = self.history(ctl)
            self.stats["journal_records"] = h["journal_records"]
            rc = d.stop()
            expect_eq(rc, 0, "exit status after SIGTERM")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--long", action="store_true",
                    default=os.environ.get("SHADOWD_CRASH_LONG", "") not in ("", "0"),
                    help=f"{LONG_CYCLES} cycles (SHADOWD_CRASH_LONG=1)")
    ap.add_argument("--cycles", type=int, default=None,
                    help=f"crash cycles (SHADOWD_CRASH_CYCLES; default {CI_CYCLES})")
    ap.add_argument("--seed", type=int, default=None, help="seed (SHADOWD_CRASH_SEED)")
    ap.add_argument("--summary", default=os.environ.get("SHADOWD_CRASH_SUMMARY"),
                    help="write the figures as JSON to this file (SHADOWD_CRASH_SUMMARY)")
    a = ap.parse_args()
    if a.cycles is None:
        env = os.environ.get("SHADOWD_CRASH_CYCLES")
        a.cycles = int(env) if env else LONG_CYCLES if a.long else CI_CYCLES
    if a.seed is None:
        env = os.environ.get("SHADOWD_CRASH_SEED")
        a.seed = int(env) if env else random.SystemRandom().randrange(1 << 32)
    expect(a.cycles >= 1, "--cycles must be at least 1")
    return a


def test():
    a = parse_args()
    replay = (f"SHADOWD_CRASH_SEED={a.seed} SHADOWD_CRASH_CYCLES={a.cycles} "
              f"{sys.executable} {os.path.abspath(__file__)}")
    log(f"[crash-loop] seed {a.seed}, {a.cycles} cycles  (replay: {replay})")
    rng = random.Random(a.seed)
    t0 = time.monotonic()
    work = tempfile.mkdtemp(prefix="shadowd-crash-")
    keep = bool(os.environ.get("SHADOWD_TEST_KEEP"))
    try:
        loop = CrashLoop(work, rng, a.seed, a.cycles)
        c = 0
        try:
            for c in range(1, a.cycles + 1):
                loop.cycle = c
                loop.run_cycle(c)
            c = a.cycles + 1
            loop.cycle = c
            loop.final()
        except BaseException as e:
            if loop.prev_stderr:
                tail = "\n".join(loop.prev_stderr.splitlines()[-40:])
                sys.stderr.write(f"===== the killed daemon's last log lines (cycle {c - 1}) =====\n"
                                 f"{tail}\n===== end =====\n")
            where = "the final check" if c > a.cycles else f"cycle {c}/{a.cycles}"
            log(f"CRASH-LOOP FAILED in {where}, seed {a.seed}: {type(e).__name__}: {e}")
            log(f"replay: {replay}")
            raise
    finally:
        if keep:
            log(f"[crash-loop] keeping {work} (backing disk.img, pool pool.img)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    st = loop.stats
    summary = {
        "seed": a.seed, "cycles": a.cycles, "crash_cycles_survived": st["kills"],
        "daemon_starts": st["starts"], "startup_kills": st["startup_kills"],
        "requests": st["requests"], "flushes": st["flushes"],
        "writes_acknowledged": st["writes_acked"], "writes_durable": st["writes_durable"],
        "bytes_acknowledged": st["bytes_acked"],
        "in_flight_at_kill": st["inflight_at_kill"], "in_flight_kept": st["inflight_kept"],
        "in_flight_lost": st["inflight_lost"], "in_flight_undecidable": st["inflight_unknown"],
        "bytes_verified": st["bytes_verified"], "restores_compared": st["restores"],
        "restores_export_at": st["restores_export"], "restores_export_seq": st["restores_seq"],
        "restores_to_file": st["restores_restore"],
        "restores_across_2_kills": st["restores_across_2_kills"],
        "restores_mean_kills_crossed":
            round(st["restores_kills_crossed"] / max(1, st["restores"]), 1),
        "verify_runs": st["verify_runs"], "seconds_of_history": len(loop.model.phases),
        "journal_records": st["journal_records"], "pool_bytes_used": st["pool_bytes_used"],
        "pool_bytes": st["pool_bytes"],
        "failures": 0, "wall_s": round(time.monotonic() - t0, 1)}
    log(f"crash loop: {summary['crash_cycles_survived']} SIGKILLs survived in {a.cycles} cycles, "
        f"{summary['writes_acknowledged']} writes acknowledged "
        f"({summary['writes_durable']} durable), "
        f"{summary['in_flight_at_kill']} in flight at a kill ({summary['in_flight_kept']} kept, "
        f"{summary['in_flight_lost']} lost), {summary['restores_compared']} restores compared, "
        f"{summary['bytes_verified'] / MiB:.0f} MiB verified, {summary['wall_s']} s")
    if a.summary:
        with open(a.summary, "w") as f:
            json.dump(summary, f, indent=1)
    log("CRASH-LOOP-SUMMARY " + json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main(test)
