#!/usr/bin/python3
"""shadowd over an NBD backing: `--backing NBD-URI`.

The backing is a sparse file served by a real NBD server, which this script
starts by socket activation on a socket it has bound and listens on itself
(LISTEN_FDS): connections queue in the backlog until the server accepts
them, so nothing waits for the server to be ready.

(a) qemu-nbd on a Unix socket, shadowd with `--backing nbd+unix:///?socket=`
    and a shadow pool (`--pool --init`):
    - nbdinfo shows the file's size;
    - rounds of up to 48 concurrent libnbd aio writes and reads at random
      offsets, 512 B .. 8 MiB, read back byte-exact against a model;
    - flush, then the file itself holds every write;
    - write-zeroes (with and without NO_HOLE) and trim read back as zeroes,
      in shadowd and in the file;
    - `shadowctl export --at T1` reads the image of T1 (nbdcopy, qemu-img
      compare) while the live export holds later writes: history works
      over an NBD backing;
    - a restart with the same URI and the pool (no --init) finds its
      history; the same file under another URI is another backing, refused.
(b) nbdkit's file plugin on TCP 127.0.0.1 (port picked by the kernel for
    the socket this script binds), shadowd without a pool: nbdcopy with 4
    connections both ways, qemu-img compare against the file, block status
    of a hole; then nbdkit is killed: requests through shadowd fail with an
    error at once (no hang), the daemon keeps serving its socket and logs
    the loss once.
(c) refused at start, exit 1 and a message naming the cause: no such
    socket, nothing listening on the TCP port, a URI without its socket,
    a read-only server without --read-only (and served with it).
(d) TLS to the backing: nbdkit --tls=require with a pre-shared key on a
    Unix socket (`nbds+unix://USER@/?socket=...&tls-psk-file=...`) and with
    x509 certificates on TCP (`nbds://localhost:PORT/?tls-certificates=...`),
    keys made by scripts/tls-certs.sh: writes reach the file; a plain
    `nbd+unix://` URI to the TLS-only server is refused at start.

Synchronisation: sd_notify READY=1 for shadowd, socket activation for the
NBD servers; every request answers when its work is done.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (KiB, MiB, STOP_TIMEOUT, Checks, Daemon, ShadowCtl, expect,  # noqa: E402
                     expect_eq, expect_same_image, first_difference, log, main, read_all,
                     make_pool_file, make_rng, run, run_shadowd, wait_process)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 64 * MiB
SEG = 64 * KiB
POOL_SIZE = 256 * MiB
POOL_ARGS = ["--segment-size", str(SEG), "--zone-size", "4M"]


class ActivatedServer:
    """An NBD server (argv `cmd`) given the listening socket `listener` by
    systemd-style socket activation: fd 3, LISTEN_FDS=1, LISTEN_PID its pid
    (the shell execs into the server, so $$ is the server's pid)."""

    def __init__(self, name, cmd, listener, work):
        self.name = name
        self.log_path = os.path.join(work, f"{name}.log")
        self._log = open(self.log_path, "wb")
        log("+ (socket-activated) " + " ".join(cmd))
        self.proc = subprocess.Popen(
            ["sh", "-c", 'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@" 3<&0 0</dev/null', "sh",
             *cmd], stdin=listener.fileno(), stdout=self._log, stderr=self._log)
        listener.close()  # the server's now

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            if wait_process(self.proc, STOP_TIMEOUT) is None:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def unix_listener(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(64)
    return s


def tcp_listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s, s.getsockname()[1]


def at(ns):
    return f"@{ns // 10**9}.{ns % 10**9:09d}"


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def aio_rounds(h, img, rng, rounds, depth=48):
    """Rounds of `depth` concurrent writes to disjoint random ranges, then
    `depth` concurrent reads checked against `img` (updated in place)."""
    max_in_flight = 0
    for rnd in range(rounds):
        taken = []
        writes = []
        for _ in range(depth):
            ln = rng.choice([512, 4096, rng.randrange(512, 8 * MiB + 1), rng.randrange(1, 2 * MiB)])
            off = rng.randrange(0, SIZE - ln + 1)
            if any(off < o + n and o < off + ln for o, n in taken):
                continue
            taken.append((off, ln))
            data = rng.randbytes(ln)
            img[off:off + ln] = data
            writes.append((off, nbd.Buffer.from_bytearray(bytearray(data))))
        errors = []

        def cb(err):
            if err.value:
                errors.append(err.value)
            return 1
        for off, buf in writes:
            h.aio_pwrite(buf, off, completion=cb,
                         flags=nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
        max_in_flight = max(max_in_flight, h.aio_in_flight())
        while h.aio_in_flight() > 0:
            h.poll(-1)
        expect(not errors, f"round {rnd}: write errors {errors}")
        reads = []
        for _ in range(depth):
            ln = rng.choice([512, rng.randrange(512, 8 * MiB + 1)])
            off = rng.randrange(0, SIZE - ln + 1)
            buf = nbd.Buffer(ln)
            h.aio_pread(buf, off, completion=cb)
            reads.append((off, ln, buf))
        max_in_flight = max(max_in_flight, h.aio_in_flight())
        while h.aio_in_flight() > 0:
            h.poll(-1)
        expect(not errors, f"round {rnd}: read errors {errors}")
        for off, ln, buf in reads:
            got = bytes(buf.to_bytearray())
            d = first_difference(got, bytes(img[off:off + ln]))
            expect(d is None, f"round {rnd}: read {off}+{ln} differs at +{d}")
    log(f"   {rounds} rounds x {depth}: at most {max_in_flight} requests in flight")
    expect(max_in_flight >= 16, f"requests were in flight together ({max_in_flight})")


def case_qemu_nbd_pool(checks, work, rng):
    backing = os.path.join(work, "q-backing.img")
    with open(backing, "wb") as f:
        f.truncate(SIZE)
        f.seek(5 * MiB)
        f.write(rng.randbytes(3 * MiB))  # some content before shadowd starts
    img = bytearray(read_file(backing))
    sock = os.path.join(work, "qemu-nbd.sock")
    qemu = ActivatedServer("qemu-nbd", ["qemu-nbd", "-f", "raw", "-t", "--shared=8",
                                        "--discard=unmap", backing],
                           unix_listener(sock), work)
    uri = f"nbd+unix:///?socket={sock}"
    pool = make_pool_file(os.path.join(work, "pool.img"), POOL_SIZE)
    try:
        with Daemon(backing=uri, checks=checks, pool=pool, pool_init=True,
                    extra_args=POOL_ARGS, name="shadowd-qemu") as d:
            ctl = ShadowCtl(d)
            with checks.check("(a) nbdinfo: the backing's size through shadowd"):
                _, out = run(["nbdinfo", "--json", d.uri_unix])
                info = json.loads(out)["exports"][0]
                expect_eq(info["export-size"], SIZE, "export size")
                expect_eq(info["is_read_only"], False, "read-only")
                expect(f"NBD backing {uri}" in d.stderr_text(), "the daemon names the NBD backing")

            h = nbd.NBD()
            h.connect_uri(d.uri_unix)
            with checks.check("(a) the content already in the file reads through shadowd"):
                expect_same_image(read_all(h), bytes(img), "initial image")

            with checks.check("(a) concurrent aio writes and reads 512 B .. 8 MiB are byte-exact"):
                aio_rounds(h, img, rng, rounds=6)
                expect_same_image(read_all(h), bytes(img), "whole export after the aio rounds")

            with checks.check("(a) after FLUSH the file holds every write"):
                h.flush()
                expect_same_image(read_file(backing), bytes(img), "backing file after flush")

            with checks.check("(a) write-zeroes and trim read back as zeroes, also in the file"):
                h.zero(300 * KiB + 512, 10 * MiB + 1000, nbd.CMD_FLAG_NO_HOLE)
                img[10 * MiB + 1000:10 * MiB + 1000 + 300 * KiB + 512] = bytes(300 * KiB + 512)
                h.zero(2 * MiB, 20 * MiB)
                img[20 * MiB:22 * MiB] = bytes(2 * MiB)
                h.trim(1 * MiB, 30 * MiB, nbd.CMD_FLAG_FUA)  # the pool journals a trim as zeroes
                img[30 * MiB:31 * MiB] = bytes(1 * MiB)
                h.flush()
                expect_same_image(read_all(h), bytes(img), "export after zero and trim")
                expect_same_image(read_file(backing), bytes(img), "backing file after zero and trim")
            t1 = time.time_ns()
            img_t1 = bytes(img)

            with checks.check("(a) export --at T1 shows T1 while the live export moved on"):
                for off in (0, 5 * MiB + 4096, 40 * MiB + 77):
                    data = rng.randbytes(700 * KiB)
                    h.pwrite(data, off)
                    img[off:off + len(data)] = data
                h.zero(64 * KiB, 10 * MiB + 1000)
                img[10 * MiB + 1000:10 * MiB + 1000 + 64 * KiB] = bytes(64 * KiB)
                h.flush()
                expect_same_image(read_all(h), bytes(img), "live export after T1")
                r = ctl.json("export", "--at", at(t1), "--name", "t1")
                copy = os.path.join(work, "t1.img")
                run(["nbdcopy", r["uri_unix"], copy])
                expect_same_image(read_file(copy), img_t1, "nbdcopy of the export at T1")
                want = os.path.join(work, "want-t1.img")
                with open(want, "wb") as f:
                    f.write(img_t1)
                run(["qemu-img", "compare", "-f", "raw", "-F", "raw", want, r["uri_unix"]])
                ctl.json("unexport", "t1")
                expect_same_image(read_file(backing), bytes(img), "the file holds the live image")
            h.shutdown()
        img_now = bytes(img)

        with checks.check("(a) a restart with the same URI finds the pool and its history"):
            with Daemon(backing=uri, checks=checks, pool=pool, extra_args=POOL_ARGS,
                        name="shadowd-qemu-again") as d:
                ctl = ShadowCtl(d)
                r = ctl.json("export", "--at", at(t1), "--name", "t1again")
                hh = nbd.NBD()
                hh.connect_uri(r["uri_unix"])
                expect_same_image(read_all(hh), img_t1, "the export at T1 after a restart")
                hh.shutdown()
                live = nbd.NBD()
                live.connect_uri(d.uri_unix)
                expect_same_image(read_all(live), img_now, "the live export after a restart")
                live.shutdown()

        with checks.check("(a) the pool refuses the same server under another URI"):
            # The pool knows its backing by the URI's text: another spelling
            # of the socket's path is another backing.
            other = f"nbd+unix:///?socket={os.path.relpath(sock)}"
            rc, out = run_shadowd(["--backing", other, "--pool", pool, "--unix",
                                   os.path.join(work, "x.sock"), "--control",
                                   os.path.join(work, "x.ctl")] + POOL_ARGS)
            expect_eq(rc, 2, "exit status for a pool of another backing")
            expect(uri in out and other in out, f"both URIs named: {out}")
    finally:
        qemu.stop()


def case_nbdkit_tcp(checks, work, rng):
    backing = os.path.join(work, "k-backing.img")
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    listener, port = tcp_listener()
    kit = ActivatedServer("nbdkit", ["nbdkit", "-f", "--exit-with-parent", "file", backing],
                          listener, work)
    uri = f"nbd://127.0.0.1:{port}/"
    try:
        with Daemon(backing=uri, checks=checks, name="shadowd-nbdkit") as d:
            src = os.path.join(work, "src.img")
            with open(src, "wb") as f:
                f.truncate(SIZE)
                for off in (0, 7 * MiB + 3, 33 * MiB, 60 * MiB):
                    f.seek(off)
                    f.write(rng.randbytes(1 * MiB + 1234))
            with checks.check("(b) nbdcopy --connections=4 both ways over a TCP NBD backing"):
                run(["nbdcopy", "--connections=4", "--flush", src, d.uri_tcp])
                expect_same_image(read_file(backing), read_file(src), "the file after nbdcopy in")
                back = os.path.join(work, "back.img")
                run(["nbdcopy", "--connections=4", d.uri_unix, back])
                expect_same_image(read_file(back), read_file(src), "nbdcopy out")
                run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, d.uri_tcp])

            with checks.check("(b) block status passes the server's holes through"):
                h = nbd.NBD()
                h.add_meta_context("base:allocation")
                h.connect_uri(d.uri_unix)
                got = []

                def extents(ctx, off, entries, err):
                    if ctx == "base:allocation":
                        got.extend(entries)
                    return 0
                h.block_status(4 * MiB, 40 * MiB, extents)
                h.shutdown()
                expect(got and got[1] & 3 == 3, f"a hole at 40 MiB: {got}")

            with checks.check("(b) the server dies: requests fail at once, shadowd stays up"):
                h = nbd.NBD()
                h.connect_uri(d.uri_unix)
                expect_eq(h.pread(4096, 0), read_file(src)[0:4096], "a read before")
                kit.kill()
                for what, fn in (("read", lambda: h.pread(4096, 0)),
                                 ("write", lambda: h.pwrite(b"x" * 4096, 0)),
                                 ("flush", lambda: h.flush())):
                    try:
                        fn()
                        expect(False, f"a {what} succeeded with the server dead")
                    except nbd.Error as e:
                        log(f"   {what}: {e}")
                        expect(e.errnum == 5, f"{what}: EIO, not {e}")  # EIO
                h.shutdown()
                d.assert_alive()
                h2 = nbd.NBD()
                h2.connect_uri(d.uri_unix)  # still serving: new clients get errors, not hangs
                try:
                    h2.pread(512, 0)
                    expect(False, "a read on a new connection succeeded")
                except nbd.Error:
                    pass
                h2.shutdown()
                expect_eq(d.stderr_text().count("lost the connection"), 1,
                          "the loss is logged once")
    finally:
        kit.stop()


def case_refusals(checks, work):
    common = ["--unix", os.path.join(work, "r.sock"), "--control", os.path.join(work, "r.ctl")]

    def refused(uri, words, extra=()):
        rc, out = run_shadowd(["--backing", uri, *common, *extra])
        expect_eq(rc, 1, f"exit status for {uri}")
        for w in words:
            expect(w in out, f"{uri}: the message names '{w}': {out.strip()}")
        expect(out.count("\n") < 10, "one clear message, not a flood")

    with checks.check("(c) a missing socket, a dead port, a URI without its socket"):
        refused("nbd+unix:///disk?socket=/nonexistent/shadowd/nbd.sock",
                ["cannot connect to NBD server", "/nonexistent/shadowd/nbd.sock",
                 "No such file"])
        listener, port = tcp_listener()
        listener.close()  # nothing listens there now
        refused(f"nbd://127.0.0.1:{port}/disk", ["cannot connect to NBD server",
                                                  f"127.0.0.1:{port}", "refused"])
        refused("nbd+unix:///disk", ["cannot connect to NBD server", "socket"])

    with checks.check("(c) a read-only server needs --read-only"):
        backing = os.path.join(work, "ro.img")
        with open(backing, "wb") as f:
            f.truncate(4 * MiB)
        sock = os.path.join(work, "ro-nbd.sock")
        ro = ActivatedServer("nbdkit-ro", ["nbdkit", "-f", "--exit-with-parent", "-r", "file",
                                           backing], unix_listener(sock), work)
        try:
            uri = f"nbd+unix:///?socket={sock}"
            refused(uri, ["read-only", "--read-only"])
            with Daemon(backing=uri, read_only=True, checks=checks, name="shadowd-ro") as d:
                h = nbd.NBD()
                h.connect_uri(d.uri_unix)
                expect(h.is_read_only(), "served read-only")
                expect_eq(h.pread(4096, 0), bytes(4096), "reads work")
                h.shutdown()
        finally:
            ro.stop()


def tls_roundtrip(checks, work, rng, uri, backing, name):
    with Daemon(backing=uri, checks=checks, name=name) as d:
        expect("bytes (" in d.stderr_text(), "the NBD backing's capabilities are logged")
        h = nbd.NBD()
        h.connect_uri(d.uri_unix)
        data = rng.randbytes(1 * MiB + 4096)
        h.pwrite(data, 3 * MiB + 512)
        h.flush()
        expect_eq(h.pread(len(data), 3 * MiB + 512), data, "read back through shadowd")
        h.shutdown()
        with open(backing, "rb") as f:
            f.seek(3 * MiB + 512)
            expect_eq(f.read(len(data)), data, "the write in the file below")


def case_tls(checks, work, rng):
    pki = os.path.join(work, "pki")
    run([os.path.join(REPO, "scripts", "tls-certs.sh"), pki, "alice"])
    psk = os.path.join(pki, "psk", "keys.psk")
    backing = os.path.join(work, "tls-backing.img")
    with open(backing, "wb") as f:
        f.truncate(16 * MiB)

    sock = os.path.join(work, "tls-psk.sock")
    kit = ActivatedServer("nbdkit-psk", ["nbdkit", "-f", "--exit-with-parent", "--tls=require",
                                         f"--tls-psk={psk}", "file", backing],
                          unix_listener(sock), work)
    try:
        with checks.check("(d) nbds+unix with a pre-shared key"):
            tls_roundtrip(checks, work, rng,
                          f"nbds+unix://alice@/?socket={sock}&tls-psk-file={psk}", backing,
                          "shadowd-psk")
        with checks.check("(d) a plain URI to a TLS-only server is refused at start"):
            rc, out = run_shadowd(["--backing", f"nbd+unix:///?socket={sock}",
                                   "--unix", os.path.join(work, "p.sock"),
                                   "--control", os.path.join(work, "p.ctl")])
            expect_eq(rc, 1, "exit status")
            expect("cannot connect to NBD server" in out, f"message: {out.strip()}")
    finally:
        kit.stop()

    listener, port = tcp_listener()
    kit = ActivatedServer("nbdkit-x509", ["nbdkit", "-f", "--exit-with-parent", "--tls=require",
                                          f"--tls-certificates={pki}/server", "file", backing],
                          listener, work)
    try:
        with checks.check("(d) nbds:// with x509 certificates"):
            tls_roundtrip(checks, work, rng,
                          f"nbds://localhost:{port}/?tls-certificates={pki}/client", backing,
                          "shadowd-x509")
    finally:
        kit.stop()


def test():
    checks = Checks("nbd_backing")
    rng = make_rng("nbd_backing")
    for tool in ("qemu-nbd", "nbdkit", "certtool", "psktool"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], stdout=subprocess.DEVNULL).returncode:
            raise AssertionError(f"{tool} is not installed (scripts/deps.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="shadowd-nbdbacking-") as work:
        case_qemu_nbd_pool(checks, work, rng)
        case_nbdkit_tcp(checks, work, rng)
        case_refusals(checks, work)
        case_tls(checks, work, rng)
    checks.finish()


if __name__ == "__main__":
    main(test)
