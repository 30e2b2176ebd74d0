#!/usr/bin/python3
"""Robustness against a live shadowd: hostile and broken clients.

Phases (seeded randomness, the seed is printed):
  1. many connections sending random bytes (from the first byte, and after a
     valid client-flags word / after a valid handshake);
  2. truncated handshakes: a valid handshake cut at every byte boundary, the
     client closing cleanly (FIN) or abortively (RST);
  3. valid handshake, then garbage requests: bad magic, unknown command
     types, unknown flags, WRITE longer than 32 MiB, zero-length READ,
     offset+length overflow, WRITE past the end, random headers;
  4. a disconnect in the middle of a WRITE payload;
  5. clients that queue large READs and reset the connection without
     reading the replies (the server must survive EPIPE/ECONNRESET);
  6. many connections opened at once and dropped.
Throughout, a well-behaved libnbd client stays connected and keeps reading
correctly.  Afterwards the daemon is alive, a new libnbd client works, and
the backing file's sha256 is unchanged: no phase sends a valid, complete
write (mutating requests are always out of range, incomplete or malformed).

Synchronisation: sd_notify READY=1; every hostile connection half-closes
its side and then reads until the server closes, with a socket timeout as a
failure guard ("server did not close the connection").
"""

import concurrent.futures
import os
import socket
import struct
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd  # noqa: E402
import nbdproto as P  # noqa: E402
from harness import (MiB, Checks, Daemon, expect, expect_eq, log, main,  # noqa: E402
                     make_rng, sha256_file)

SIZE = 16 * MiB
MAX_PAYLOAD = 32 * MiB
WORKERS = 8
GUARD = 30.0  # seconds: failure guard for "the server never closed"


class Hang(AssertionError):
    pass


def open_conn(d, tcp=False):
    return P.connect_tcp(d.port, timeout=GUARD) if tcp else P.connect_unix(d.unix_path, GUARD)


def rst_close(s):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def finish(s, what, abort=False):
    """Half-close our side, then read until the server closes.  The server
    must close (or at least stop waiting) once it has our EOF."""
    if abort:
        rst_close(s)
        return 0
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError:
        s.close()
        return 0
    total = 0
    try:
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            total += len(b)
    except socket.timeout:
        raise Hang(f"{what}: server kept the connection open {GUARD}s after the client's EOF")
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        s.close()
    return total


def read_greeting(s):
    g = P.recv_exact(s, 18)
    magic, opt, flags = struct.unpack(">QQH", g)
    expect(magic == P.NBDMAGIC and opt == P.IHAVEOPT, f"bad greeting {g.hex()}")
    return flags


def send_quiet(s, data):
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def handshake(d, structured=False, tcp=False):
    """A complete, valid handshake (GO). Returns the socket in transmission."""
    s = open_conn(d, tcp)
    read_greeting(s)
    s.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
    c = P.Client(s)
    c.client_flags = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES
    if structured:
        expect_eq(c.opt_structured_reply(), P.REP_ACK, "STRUCTURED_REPLY")
    final, _, _ = c.opt_go("disk", ())
    expect_eq(final, P.REP_ACK, "GO")
    return s


def req(cmd, handle, offset, length, flags=0, magic=P.REQUEST_MAGIC):
    return struct.pack(">IHHQQI", magic, flags, cmd & 0xFFFF, handle, offset & (2**64 - 1),
                       length & 0xFFFFFFFF)


def run_parallel(tasks):
    """Run (name, fn) tasks on a thread pool; collect failures.  After the
    first hang (server never closed) the remaining tasks are skipped, so a
    hanging server fails the phase in one guard interval, not hundreds."""
    failures = []
    hung = threading.Event()

    def guarded(fn):
        def run_one():
            if hung.is_set():
                raise Hang("skipped: an earlier connection in this phase hung")
            try:
                fn()
            except Hang:
                hung.set()
                raise
        return run_one

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as ex:
        futs = {ex.submit(guarded(fn)): name for name, fn in tasks}
        for f in concurrent.futures.as_completed(futs):
            try:
                f.result()
            except Exception as e:  # noqa: BLE001
                failures.append(f"{futs[f]}: {type(e).__name__}: {e}")
    if failures:
        raise AssertionError(f"{len(failures)} of {len(tasks)} connections failed; first: "
                             + "; ".join(failures[:5]))


# ---------------------------------------------------------------- phases

def phase_random_bytes(d, rng):
    tasks = []
    for i in range(240):
        seed = rng.getrandbits(64)
        mode = i % 4

        def task(i=i, seed=seed, mode=mode):
            import random
            r = random.Random(seed)
            s = open_conn(d, tcp=(i % 5 == 0))
            if mode == 0:
                # Random bytes from the very first byte, without reading.
                send_quiet(s, r.randbytes(r.randrange(0, 8192)))
            elif mode == 1:
                read_greeting(s)
                send_quiet(s, r.randbytes(r.randrange(1, 8192)))
            elif mode == 2:
                # Valid flags, then a valid option magic and random rest.
                read_greeting(s)
                send_quiet(s, struct.pack(">IQ", 3, P.IHAVEOPT) + r.randbytes(r.randrange(0, 4096)))
            else:
                # Valid option header with a random option and random length
                # (possibly huge), then some bytes.
                read_greeting(s)
                send_quiet(s, struct.pack(">IQII", 3, P.IHAVEOPT, r.getrandbits(32),
                                          r.getrandbits(32)) + r.randbytes(r.randrange(0, 512)))
            finish(s, f"random-bytes #{i} (mode {mode}, seed {seed})", abort=(i % 7 == 0))
        tasks.append((f"random-bytes #{i}", task))
    run_parallel(tasks)


def phase_truncated_handshakes(d):
    variants = {
        "GO (kernel-like)": P.valid_handshake_bytes("disk", structured=False),
        "STRUCTURED_REPLY+GO": P.valid_handshake_bytes("disk", structured=True),
        "EXPORT_NAME": struct.pack(">IQII", 1, P.IHAVEOPT, P.OPT_EXPORT_NAME, 4) + b"disk",
        "INFO+LIST+SET_META_CONTEXT+GO": (
            struct.pack(">I", 3)
            + struct.pack(">QII", P.IHAVEOPT, P.OPT_INFO, 12) + P.Client.go_payload("disk", (3, 1))
            + struct.pack(">QII", P.IHAVEOPT, P.OPT_LIST, 0)
            + struct.pack(">QII", P.IHAVEOPT, P.OPT_STRUCTURED_REPLY, 0)
            + (lambda m: struct.pack(">QII", P.IHAVEOPT, P.OPT_SET_META_CONTEXT, len(m)) + m)(
                P.Client.meta_payload("disk", ["base:allocation"]))
            + struct.pack(">QII", P.IHAVEOPT, P.OPT_GO, 6) + P.Client.go_payload("disk", ())),
    }
    tasks = []
    for name, full in variants.items():
        for cut in range(len(full)):
            for abort in (False, True):
                for read_first in ((True, False) if cut == 0 else (True,)):
                    def task(full=full, cut=cut, abort=abort, read_first=read_first, name=name):
                        s = open_conn(d)
                        if read_first:
                            read_greeting(s)
                        send_quiet(s, full[:cut])
                        finish(s, f"truncated {name} at {cut}/{len(full)}", abort=abort)
                    tasks.append((f"truncated {name} at {cut} abort={abort}", task))
    log(f"   {len(tasks)} truncated handshakes")
    run_parallel(tasks)


def phase_garbage_requests(d, rng):
    fixed = [
        ("bad request magic", lambda h: req(P.CMD_READ, h, 0, 512, magic=0xDEADBEEF)),
        ("reply magic as request magic", lambda h: req(P.CMD_READ, h, 0, 512,
                                                       magic=P.SIMPLE_REPLY_MAGIC)),
        ("unknown command 0x55", lambda h: req(0x55, h, 0, 0)),
        ("unknown command 0xffff", lambda h: req(0xFFFF, h, 0, 4096)),
        ("unknown command 8 (RESIZE)", lambda h: req(8, h, SIZE * 2, 0)),
        ("unknown flags on READ", lambda h: req(P.CMD_READ, h, 0, 512, flags=0x8000)),
        ("all flags on READ", lambda h: req(P.CMD_READ, h, 0, 512, flags=0xFFFF)),
        ("unknown flags on out-of-range WRITE",
         lambda h: req(P.CMD_WRITE, h, SIZE, 512, flags=0x4000) + bytes(512)),
        ("NO_HOLE on out-of-range TRIM", lambda h: req(P.CMD_TRIM, h, SIZE, 512,
                                                       flags=P.CMD_FLAG_NO_HOLE)),
        ("WRITE longer than 32 MiB (header only)",
         lambda h: req(P.CMD_WRITE, h, 0, MAX_PAYLOAD + 1)),
        ("WRITE of 4 GiB-1 with a little payload",
         lambda h: req(P.CMD_WRITE, h, 0, 0xFFFFFFFF) + bytes(65536)),
        ("WRITE of 64 MiB past end with 1 MiB payload",
         lambda h: req(P.CMD_WRITE, h, SIZE, 64 * MiB) + bytes(MiB)),
        ("zero-length READ", lambda h: req(P.CMD_READ, h, 0, 0)),
        ("zero-length READ at end", lambda h: req(P.CMD_READ, h, SIZE, 0)),
        ("zero-length READ far beyond end", lambda h: req(P.CMD_READ, h, 2**63, 0)),
        ("READ offset+length overflow", lambda h: req(P.CMD_READ, h, 2**64 - 100, 4096)),
        ("WRITE offset+length overflow",
         lambda h: req(P.CMD_WRITE, h, 2**64 - 100, 4096) + bytes(4096)),
        ("TRIM offset+length overflow", lambda h: req(P.CMD_TRIM, h, 2**64 - 100, 4096)),
        ("WRITE_ZEROES offset+length overflow",
         lambda h: req(P.CMD_WRITE_ZEROES, h, 2**64 - 4096, 0xFFFFFFFF)),
        ("BLOCK_STATUS offset+length overflow",
         lambda h: req(P.CMD_BLOCK_STATUS, h, 2**64 - 1, 0xFFFFFFFF)),
        ("CACHE offset+length overflow", lambda h: req(P.CMD_CACHE, h, 2**64 - 1, 2)),
        ("WRITE past end", lambda h: req(P.CMD_WRITE, h, SIZE - 100, 4096) + bytes(4096)),
        ("WRITE straddling end with random payload",
         lambda h: req(P.CMD_WRITE, h, SIZE - 1, 2) + b"\xAB\xCD"),
        ("WRITE_ZEROES past end", lambda h: req(P.CMD_WRITE_ZEROES, h, SIZE, 4096)),
        ("TRIM past end", lambda h: req(P.CMD_TRIM, h, SIZE - 512, 1024)),
        ("READ longer than max payload", lambda h: req(P.CMD_READ, h, 0, MAX_PAYLOAD + 4096)),
        ("READ of 4 GiB-1", lambda h: req(P.CMD_READ, h, 0, 0xFFFFFFFF)),
        ("BLOCK_STATUS without context", lambda h: req(P.CMD_BLOCK_STATUS, h, 0, 4096)),
        ("FLUSH with offset/length", lambda h: req(P.CMD_FLUSH, h, 123, 456)),
        ("DISC with offset/length", lambda h: req(P.CMD_DISC, h, 123, 456)),
        ("DISC then more requests",
         lambda h: req(P.CMD_DISC, h, 0, 0) + req(P.CMD_READ, h, 0, 512)),
        ("truncated request header", lambda h: req(P.CMD_READ, h, 0, 512)[:17]),
        ("option after transmission started",
         lambda h: struct.pack(">QII", P.IHAVEOPT, P.OPT_LIST, 0)),
    ]
    tasks = []
    for i, (what, mk) in enumerate(fixed):
        for structured in (False, True):
            for tcp in (False, True):
                def task(what=what, mk=mk, structured=structured, i=i, tcp=tcp):
                    s = handshake(d, structured=structured, tcp=tcp)
                    # A valid READ first, so the server is fully in transmission.
                    send_quiet(s, req(P.CMD_READ, 0xAAAA, 0, 512) + mk(0x1000 + i))
                    finish(s, f"{what} (structured={structured})")
                tasks.append((f"{what} structured={structured} tcp={tcp}", task))

    # Random request headers.  Mutating commands are forced out of range
    # (and keep their payload short of the length) so no valid write exists.
    for i in range(300):
        seed = rng.getrandbits(64)

        def task(i=i, seed=seed):
            import random
            r = random.Random(seed)
            s = handshake(d, structured=bool(i & 1), tcp=(i % 3 == 0))
            out = bytearray()
            for _ in range(r.randrange(1, 12)):
                cmd = r.choice([0, 1, 3, 4, 5, 6, 7, 9, 0x42, r.getrandbits(16)])
                flags = r.choice([0, 1, 2, 4, 8, 16, r.getrandbits(16)])
                length = r.choice([0, 1, 512, 4096, r.getrandbits(32), MAX_PAYLOAD + 1])
                offset = r.choice([0, SIZE - 1, SIZE, r.getrandbits(64), 2**64 - 1])
                magic = P.REQUEST_MAGIC if r.random() < 0.9 else r.getrandbits(32)
                if cmd in (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES) or cmd > 7:
                    # never a valid mutation: start at or beyond the end
                    offset = max(offset, SIZE + r.randrange(0, 1 << 20))
                if cmd == P.CMD_DISC:
                    cmd = P.CMD_READ
                payload = b""
                if cmd == P.CMD_WRITE:
                    payload = r.randbytes(min(length, r.randrange(0, 8192)))
                out += req(cmd, r.getrandbits(64), offset, length, flags, magic) + payload
            send_quiet(s, bytes(out))
            finish(s, f"random requests #{i} (seed {seed})", abort=(i % 11 == 0))
        tasks.append((f"random requests #{i}", task))
    log(f"   {len(tasks)} garbage-request connections")
    run_parallel(tasks)


def phase_mid_payload_disconnect(d, rng):
    """A valid WRITE whose payload is cut short: it must not be applied."""
    tasks = []
    for i in range(60):
        seed = rng.getrandbits(64)

        def task(i=i, seed=seed):
            import random
            r = random.Random(seed)
            s = handshake(d, structured=bool(i & 1))
            ln = r.choice([512, 4096, 65536, MiB, 8 * MiB])
            off = r.randrange(0, SIZE - ln + 1)
            sent = r.randrange(0, ln)  # strictly less than the full payload
            # Header and partial payload of random (different) data.
            send_quiet(s, req(P.CMD_WRITE, 7, off, ln) + r.randbytes(sent))
            finish(s, f"mid-payload disconnect #{i} ({sent}/{ln} bytes)", abort=(i % 3 == 0))
        tasks.append((f"mid-payload #{i}", task))
    run_parallel(tasks)


def phase_unread_replies(d):
    """Queue large READs, then reset without reading: the server's sends fail
    with EPIPE/ECONNRESET and it must carry on."""
    tasks = []
    for i in range(24):
        def task(i=i):
            s = handshake(d, structured=bool(i & 1))
            out = b"".join(req(P.CMD_READ, k, 0, 8 * MiB) for k in range(16))
            send_quiet(s, out)
            if i % 2:
                rst_close(s)
            else:
                s.close()
        tasks.append((f"unread replies #{i}", task))
    run_parallel(tasks)


def phase_many_connections(d, rng):
    """Open many connections at once and drop them (some before the greeting
    is read, some after, some mid-option; some with RST), then a burst of
    quick open/close cycles.  The concurrent batch stays below the default
    limit of 256 (the limit itself is tested with --max-connections in the
    lifecycle test) so that whatever the server has not yet reaped cannot
    make the final checks hit the limit."""
    socks = []
    try:
        for i in range(240):
            socks.append(open_conn(d, tcp=(i % 2 == 0)))
        log(f"   {len(socks)} connections open")
        for i, s in enumerate(socks):
            if i % 3 == 1:
                read_greeting(s)
            elif i % 3 == 2:
                read_greeting(s)
                send_quiet(s, struct.pack(">IQ", 3, P.IHAVEOPT))
    finally:
        for i, s in enumerate(socks):
            if i % 2:
                rst_close(s)
            else:
                s.close()
    # Quick cycles, each finished with a half-close and the server's EOF,
    # so that every one of them has been closed by the server.
    for i in range(400):
        s = open_conn(d, tcp=(i % 2 == 1))
        if i % 2:
            read_greeting(s)
        finish(s, f"quick cycle #{i}")


# ---------------------------------------------------------------- main

class Canary:
    """A well-behaved libnbd client that stays connected throughout."""

    def __init__(self, d, expected):
        self.expected = expected
        self.h = nbd.NBD()
        self.h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        self.h.set_export_name("disk")
        self.h.connect_unix(d.unix_path)
        self.n = 0

    def check(self, rng):
        for _ in range(8):
            off = rng.randrange(0, SIZE - 65536)
            got = self.h.pread(65536, off)
            expect(got == self.expected[off:off + 65536],
                   f"canary read at {off} returned wrong data")
        self.h.flush()
        self.n += 1


def test():
    checks = Checks("robustness")
    rng = make_rng("robustness")
    initial = rng.randbytes(SIZE)

    def fill(p):
        with open(p, "r+b") as f:
            f.write(initial)

    with Daemon(size=SIZE, init_backing=fill, checks=checks) as d:
        sha = sha256_file(d.backing)
        canary = Canary(d, initial)
        phases = [
            ("random bytes on many connections", lambda: phase_random_bytes(d, rng)),
            ("truncated handshakes at every byte boundary", lambda: phase_truncated_handshakes(d)),
            ("garbage requests after a valid handshake", lambda: phase_garbage_requests(d, rng)),
            ("disconnect mid-WRITE-payload", lambda: phase_mid_payload_disconnect(d, rng)),
            ("reset with unread READ replies", lambda: phase_unread_replies(d)),
            ("many connections opened and dropped", lambda: phase_many_connections(d, rng)),
        ]
        for name, fn in phases:
            with checks.check(name):
                fn()
            with checks.check(f"after '{name}': daemon alive, canary client reads correctly"):
                d.assert_alive()
                canary.check(rng)

        with checks.check("a new libnbd client works and reads the whole export"):
            h = nbd.NBD()
            h.connect_uri(d.uri_tcp)
            for off in range(0, SIZE, 4 * MiB):
                expect(h.pread(4 * MiB, off) == initial[off:off + 4 * MiB],
                       f"new client read at {off} differs from the initial content")
            h.shutdown()
        with checks.check("backing file unchanged (sha256)"):
            canary.h.flush()
            expect_eq(sha256_file(d.backing), sha, "backing sha256")
        try:
            canary.h.shutdown()
        except nbd.Error:
            pass
        checks.finish()


if __name__ == "__main__":
    main(test)
