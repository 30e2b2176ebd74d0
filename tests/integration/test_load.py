#!/usr/bin/python3
"""Many connections at once, up to --max-connections, then clean refusals.

A shadowd with a shadow pool (the production configuration, small zones) and
--max-connections 32, driven by one process holding libnbd handles:

* 32 connections opened at once (non-blocking connects, one select loop) are
  all served at the same time: each writes 4 KiB, 64 KiB and 1 MiB of seeded
  random data to its own region, all requests of all connections in flight
  together, then reads them back, all in flight together, and the data is
  the same; `shadowctl status` shows 32 open, the metrics endpoint
  shadowd_connections_active 32, and /proc/PID/fd holds 32 sockets accepted
  on the NBD listener;
* 4 more connections at once while the 32 are held, and a raw Unix and a raw
  TCP socket, are refused cleanly: every libnbd connect fails with an error
  (the server closed the connection), none is admitted, none hangs; the raw
  sockets read EOF without a byte (the server closes before its greeting);
  the daemon counts every attempt, logs "refusing connection" (at most a
  line a second, each with the number refused since the line before), and
  still has 32 open; the 32 held connections then verify a second
  round;
* all 32 are closed (half after NBD_CMD_DISC, half by closing the socket):
  the daemon's open connections return to 0 and no client socket is left in
  /proc/PID/fd;
* the whole cycle runs twice, then one more connection is served; after each,
  the daemon's descriptors are, kind by kind, those of the fresh daemon plus
  at most the one thing it opens lazily and keeps: the shadow thread's own
  io_uring and eventfd, opened when it first makes a version (in the
  background, at a moment no client can see); anything more is a leak.

Synchronisation: sd_notify READY=1; libnbd replies; the refused connects end
on the server's close (EOF). The daemon closes a connection on its own time
after the client's EOF, which announces itself nowhere: that alone is polled
for (wait_until), with a deadline. Every wait here has a deadline that only
turns a hang into a failure.
"""

import errno
import os
import re
import select
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd  # noqa: E402
from harness import (KiB, MiB, Checks, Daemon, ShadowCtl, expect, expect_eq,  # noqa: E402
                     log, main, make_pool_file, make_rng, scrape, wait_until)

LIMIT = 32
EXTRA = 4
CYCLES = 2
SIZES = (4 * KiB, 64 * KiB, 1 * MiB)   # one request of each size per connection
REGION = 2 * MiB                       # each connection's own part of the export
SIZE = LIMIT * REGION
POOL_SIZE = 256 * MiB
GUARD = 60.0                           # failure guard for a hang, never reached when passing
REFUSED_ERRNOS = {0, errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ESHUTDOWN}


class Conn:
    def __init__(self, i):
        self.i = i
        self.h = nbd.NBD()
        self.h.set_export_name("disk")
        self.err = None
        self.errnum = None

    def fail(self, e):
        if self.err is None:
            self.err, self.errnum = str(e), e.errnum


def drive(conns, done, what):
    """Runs the state machines of CONNS in one select loop until done(c) for
    every one without an error; a connection still pending at the guard is a
    hang (a failure)."""
    deadline = time.monotonic() + GUARD
    while True:
        pending = [c for c in conns if c.err is None and not done(c)]
        if not pending:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{what}: {len(pending)} connection(s) still pending after "
                                 f"{GUARD:.0f}s (hung): {[c.i for c in pending][:10]}")
        rd, wr, by_fd = [], [], {}
        for c in pending:
            fd, d = c.h.aio_get_fd(), c.h.aio_get_direction()
            by_fd[fd] = c
            if d & nbd.AIO_DIRECTION_READ:
                rd.append(fd)
            if d & nbd.AIO_DIRECTION_WRITE:
                wr.append(fd)
        expect(rd or wr, f"{what}: pending connections wait for nothing")
        r, w, _ = select.select(rd, wr, [], left)
        for fds, notify in ((r, "aio_notify_read"), (w, "aio_notify_write")):
            for fd in fds:
                c = by_fd[fd]
                if c.err is None:
                    try:
                        getattr(c.h, notify)()
                    except nbd.Error as e:
                        c.fail(e)
        for c in pending:
            if c.err is None and (c.h.aio_is_dead() or c.h.aio_is_closed()):
                c.fail(nbd.Error("connection dead", 0))


def connect_at_once(d, conns):
    for c in conns:
        try:
            c.h.aio_connect_unix(d.unix_path)
        except nbd.Error as e:
            c.fail(e)
    drive(conns, lambda c: not c.h.aio_is_connecting(), "connect")


def io_round(conns, rng, tag):
    """Each connection writes one request of each size to its own region, all
    in flight together, then reads them back, all in flight together."""
    data = {}
    for c in conns:
        c.cookies, off, data[c.i] = [], c.i * REGION, []
        for s in SIZES:
            b = rng.randbytes(s)
            data[c.i].append((off, b))
            c.cookies.append(c.h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b)), off))
            off += s
    drive(conns, lambda c: c.h.aio_in_flight() == 0, f"{tag}: writes")
    bufs = {}
    for c in conns:
        expect(c.err is None, f"{tag}: connection {c.i} failed during the writes: {c.err}")
        for ck in c.cookies:
            expect(c.h.aio_command_completed(ck), f"{tag}: connection {c.i}: write not completed")
        bufs[c.i] = []
        c.cookies = []
        for off, b in data[c.i]:
            buf = nbd.Buffer(len(b))
            bufs[c.i].append((off, b, buf))
            c.cookies.append(c.h.aio_pread(buf, off))
    drive(conns, lambda c: c.h.aio_in_flight() == 0, f"{tag}: reads")
    for c in conns:
        expect(c.err is None, f"{tag}: connection {c.i} failed during the reads: {c.err}")
        for ck in c.cookies:
            expect(c.h.aio_command_completed(ck), f"{tag}: connection {c.i}: read not completed")
        for off, b, buf in bufs[c.i]:
            expect(bytes(buf.to_bytearray()) == b,
                   f"{tag}: connection {c.i} read back other data at {off} ({len(b)} bytes)")


def fd_kinds(d):
    """The daemon's descriptors by kind; a socket accepted on the NBD or the
    control listener carries the listener's path in /proc/net/unix, a metrics
    client socket the metrics port in /proc/net/tcp."""
    unix = {}
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            p = line.split()
            if len(p) >= 8 and p[5] == "03":  # SS_CONNECTED
                unix[p[6]] = p[7]
    tcp = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(name):
            with open(name) as f:
                for line in f.readlines()[1:]:
                    p = line.split()
                    if int(p[1].rsplit(":", 1)[1], 16) == d.metrics_port and p[3] != "0A":
                        tcp.add(p[9])
    kinds = {}
    for fd in os.listdir(f"/proc/{d.proc.pid}/fd"):
        try:
            t = os.readlink(f"/proc/{d.proc.pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        kind = t
        if t.startswith("socket:["):
            ino = t[8:-1]
            kind = {d.unix_path: "nbd client", d.control_path: "control client"}.get(
                unix.get(ino), "metrics client" if ino in tcp else "socket")
        elif t.startswith("pipe:["):
            kind = "pipe"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


# The one thing the daemon opens lazily and keeps: the shadow thread's own ring
# (an io_uring and its eventfd), when it first makes a version, in the
# background, at a moment no client can see.
LAZY = {"anon_inode:[eventfd]": 1, "anon_inode:[io_uring]": 1}


def expect_fresh_or_lazy(fresh, kinds, what):
    """KINDS must be the fresh daemon's descriptors, or those plus LAZY; any
    other difference (a socket, a file, another ring) is a leak."""
    diff = {k: kinds.get(k, 0) - fresh.get(k, 0) for k in set(fresh) | set(kinds)
            if kinds.get(k, 0) != fresh.get(k, 0)}
    # (a fresh count taken while the shadow thread was between the two gets half of it)
    expect(all(LAZY.get(k) == v for k, v in diff.items()),
           f"descriptors {what} differ from the fresh daemon's by {diff} (at most {LAZY})")
    log(f"   descriptors {what}: {sum(kinds.values())}, vs fresh {diff or 'the same'}")


def clients(kinds):
    return sum(kinds.get(k, 0) for k in ("nbd client", "control client", "metrics client"))


def quiet(d, ctl, what):
    """Waits until the daemon has no connection open and no client socket
    (NBD, control, metrics) among its descriptors; returns its descriptors."""
    def closed():
        return ctl.json("status")["connections"]["open"] == 0
    wait_until(closed, f"{what}: 0 connections open", timeout=GUARD)

    def no_clients():
        k = fd_kinds(d)
        return k if clients(k) == 0 else None
    return wait_until(no_clients, f"{what}: no client socket left in /proc/PID/fd", timeout=GUARD)


def refusals(d, ctl, held):
    before = ctl.json("status")["connections"]
    more = [Conn(LIMIT + i) for i in range(EXTRA)]
    connect_at_once(d, more)
    for c in more:
        expect(not c.h.aio_is_ready(), f"connection {c.i} beyond the limit was admitted")
        expect(c.err is not None, f"connection {c.i} beyond the limit: no error")
        expect(c.errnum in REFUSED_ERRNOS and (c.errnum or "disconnected" in c.err),
               f"connection {c.i} beyond the limit: not a clean close: {c.err} ({c.errnum})")
    log(f"   {EXTRA} connects beyond the limit refused: {sorted({c.err for c in more})}")
    for family, addr in ((socket.AF_UNIX, d.unix_path), (socket.AF_INET, ("127.0.0.1", d.port))):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(GUARD)  # a failure guard: the server closes at once
        try:
            s.connect(addr)
            got = s.recv(256)
        finally:
            s.close()
        expect_eq(got, b"", f"a raw {family.name} socket beyond the limit: EOF before any byte")
    after = ctl.json("status")["connections"]
    expect_eq(after["open"], len(held), "connections open after the refusals")
    expect_eq(after["total"] - before["total"], EXTRA + 2, "attempts the daemon counted")


def cycle(d, ctl, rng, n):
    conns = [Conn(i) for i in range(LIMIT)]
    try:
        connect_at_once(d, conns)
        for c in conns:
            expect(c.err is None and c.h.aio_is_ready(),
                   f"connection {c.i} of {LIMIT} not admitted: {c.err}")
        io_round(conns, rng, f"cycle {n} round 1")
        expect_eq(ctl.json("status")["connections"]["open"], LIMIT, "status: connections open")
        expect_eq(scrape(d.metrics_url).get("shadowd_connections_active"), float(LIMIT),
                  "metrics: shadowd_connections_active")
        expect_eq(fd_kinds(d).get("nbd client", 0), LIMIT, "NBD client sockets in /proc/PID/fd")
        refusals(d, ctl, conns)
        io_round(conns, rng, f"cycle {n} round 2")
        for c in conns:
            if c.i % 2 == 0:
                c.h.shutdown()
    finally:
        for c in conns:  # closes the sockets (also after a failure)
            c.h = None
        conns = None
    return quiet(d, ctl, f"cycle {n}")


def test():
    checks = Checks("load")
    rng = make_rng("load")
    with tempfile.TemporaryDirectory(prefix="shadowd-load-") as work:
        pool = make_pool_file(os.path.join(work, "pool.img"), POOL_SIZE)
        with Daemon(size=SIZE, pool=pool, pool_init=True, metrics=True, checks=checks,
                    extra_args=["--max-connections", str(LIMIT), "--zone-size", "4M"]) as d:
            ctl = ShadowCtl(d)
            fresh = quiet(d, ctl, "start")
            log(f"   fresh daemon: {sum(fresh.values())} descriptors: {fresh}")
            after = []
            for n in range(1, CYCLES + 1):
                with checks.check(f"cycle {n}: {LIMIT} connections served at once with verified "
                                  f"I/O, {EXTRA} more and 2 raw sockets refused cleanly, all "
                                  "closed: 0 open, no client socket left"):
                    after.append(cycle(d, ctl, rng, n))
            with checks.check("descriptors after every cycle: the fresh daemon's, plus at most "
                              "the shadow thread's ring"):
                expect_eq(len(after), CYCLES, "cycles completed")
                for n, k in enumerate(after, start=1):
                    expect_fresh_or_lazy(fresh, k, f"after cycle {n}")
            with checks.check("a new connection afterwards is served"):
                c = Conn(0)
                c.h.connect_unix(d.unix_path)
                b = rng.randbytes(64 * KiB)
                c.h.pwrite(b, 0)
                expect(c.h.pread(len(b), 0) == b, "the new connection read back other data")
                c.h.shutdown()
                c.h = None
                expect_fresh_or_lazy(fresh, quiet(d, ctl, "new connection"),
                                     "after the new connection")
            with checks.check("refusals logged, at most a line a second, counted"):
                d.stop()
                lines = [l for l in d.stderr_text().splitlines() if "refusing connection" in l]
                refused = (EXTRA + 2) * len(after)
                expect(1 <= len(lines) <= refused, f"{len(lines)} 'refusing connection' lines")
                # Each line counts the refusals since the one before; those
                # after the last line are not logged yet.
                counted = sum(int(re.search(r"; (\d+) refused since", l).group(1)) for l in lines)
                expect(len(lines) <= counted <= refused, f"lines count {counted} of {refused} refusals")
        checks.finish()


if __name__ == "__main__":
    main(test)
