#!/usr/bin/python3
"""shadowd on Ceph RBD images, against a real throwaway cluster.

1. --backing rbd:POOL/IMAGE:conf=CONF with a local pool: nbdinfo sees the
   image's size; libnbd writes random blocks (FUA, flush, trim, zeroes);
   nbdcopy of the export, `rbd export` of the image and the test's model
   agree byte for byte; `qemu-img compare` of the export with the image
   (qemu's rbd driver) finds them identical; `shadowctl export --at T1`
   reads the content at T1 while the image has changed since.
2. The pool on RBD too (--pool rbd:...) and --replica rbd:...: the replica
   comes in sync, writes are shipped; after a clean stop `rbd export` of the
   replica image holds the pool image and the backing image in its areas.
3. Restore from the replica alone: --replica-sync, writes, T1, more
   writes, kill -9; `shadowd --restore-from rbd:...replica --at T1` and
   `shadowctl restore --from rbd:... --at T1 --verify` give the device at T1.
4. The OSD stopped (SIGTERM, memstore keeps its data) during writes with a
   1 MiB replica backlog: every write and flush completes, the replica is
   marked behind with chunks to copy; after the OSD is back it catches up
   (in sync, backlog empty), and --restore-from at a time inside the outage
   gives exactly the device then.
5. A shadowd killed (SIGKILL) while it holds the backing image's exclusive
   lock: a new one without --rbd-break-lock refuses at once and names the
   lock's owner; with --rbd-break-lock it breaks the lock (the dead client is
   blocklisted) and serves the image with its content.

Synchronisation: sd_notify READY=1; `shadowctl status` polled with deadlines.
"""

import os
import sys
import tempfile
import time

import nbd

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "integration"))
from ceph_cluster import CephCluster  # noqa: E402
from harness import (KiB, MiB, Checks, Daemon, ShadowCtl, expect, expect_eq,  # noqa: E402
                     main, read_all, make_pool_file, make_rng, run, run_shadowd, wait_until,
                     write_random_blocks)

SIZE = 64 * MiB
POOL_SIZE = 64 * MiB
HEADER = 1 * MiB
POOL_ARGS = ["--segment-size", str(64 * KiB), "--zone-size", "4M"]


def at(ns):
    return f"@{ns // 10**9}.{ns % 10**9:09d}"


def in_sync_check(ctl):
    """A wait_until predicate: the replica's status once in sync and drained."""
    def in_sync():
        r = ctl.json("status")["replica"]
        return r if r["state"] == "in-sync" and r["backlog_bytes"] == 0 else None
    return in_sync


def export_image(c, name, path):
    c.rbd("export", c.image(name), path, quiet=True)
    with open(path, "rb") as f:
        return f.read()


def test():
    checks = Checks("ceph-rbd")
    rng = make_rng("ceph-rbd")
    with tempfile.TemporaryDirectory(prefix="shadowd-rbd-") as work, CephCluster() as c:
        for name, size in (("vol", SIZE), ("pool", POOL_SIZE),
                           ("replica", HEADER + POOL_SIZE + SIZE), ("vol2", SIZE)):
            c.rbd("create", "--size", f"{size // MiB}M", c.image(name))
        backing = c.rbd_uri("vol")
        with checks.check("--backing rbd: serves the image, history works"):
            pool = make_pool_file(os.path.join(work, "pool.img"), POOL_SIZE)
            model = bytearray(SIZE)
            with Daemon(size=SIZE, checks=checks, backing=backing, pool=pool, pool_init=True,
                        extra_args=POOL_ARGS) as d:
                ctl = ShadowCtl(d)
                rc, out = run(["nbdinfo", "--size", d.uri_unix])
                expect_eq(int(out.strip().splitlines()[-1]), SIZE, "nbdinfo --size")
                # librbd's threads complete the requests: no busy-poll.
                expect("I/O threads do not busy-poll" in d.stderr_text(),
                       "the log says the I/O threads do not busy-poll on an RBD backing")
                h = nbd.NBD()
                h.connect_unix(d.unix_path)
                for i in range(100):
                    n = 512 * rng.randrange(1, 512)
                    off = 512 * rng.randrange(0, (SIZE - n) // 512)
                    data = rng.randbytes(n)
                    h.pwrite(data, off, nbd.CMD_FLAG_FUA if i % 5 == 0 else 0)
                    model[off:off + n] = data
                h.zero(256 * KiB, 1 * MiB)
                model[1 * MiB:1 * MiB + 256 * KiB] = bytes(256 * KiB)
                h.flush()
                t1 = time.time_ns()
                img_t1 = bytes(model)
                later = rng.randbytes(2 * MiB)
                h.pwrite(later, 10 * MiB)
                model[10 * MiB:12 * MiB] = later
                h.flush()
                expect(read_all(h) == bytes(model), "the export reads the model")
                h.shutdown()
                out_file = os.path.join(work, "copy.img")
                run(["nbdcopy", d.uri_unix, out_file])
                with open(out_file, "rb") as f:
                    expect(f.read() == bytes(model), "nbdcopy of the export equals the model")
                r = ctl.json("export", "--at", at(t1), "--name", "t1")
                h1 = nbd.NBD()
                h1.connect_uri(r["uri_unix"])
                expect(read_all(h1) == img_t1, "the export at T1 reads the image at T1")
                h1.shutdown()
                ctl.json("unexport", "t1")
            expect(export_image(c, "vol", os.path.join(work, "vol.img")) == bytes(model),
                   "rbd export of the image equals the model")

        with checks.check("--pool rbd: and --replica rbd: the replica holds the pool and the backing"):
            args = ["--segment-size", str(64 * KiB), "--zone-size", "4M",
                    "--replica", c.rbd_uri("replica")]
            with Daemon(size=SIZE, checks=checks, backing=c.rbd_uri("vol2"),
                        pool=c.rbd_uri("pool"), pool_init=True, extra_args=args) as d:
                ctl = ShadowCtl(d)
                in_sync = in_sync_check(ctl)
                wait_until(in_sync, "the replica's initial copy", timeout=120)
                h = nbd.NBD()
                h.connect_unix(d.unix_path)
                for i in range(50):
                    n = 4096 * rng.randrange(1, 64)
                    off = 4096 * rng.randrange(0, (SIZE - n) // 4096)
                    h.pwrite(rng.randbytes(n), off)
                h.flush()
                h.shutdown()
                r = wait_until(in_sync, "the replica to drain", timeout=120)
                expect(r["epochs"] > 0, f"epochs shipped: {r}")
            rep = export_image(c, "replica", os.path.join(work, "replica.img"))
            expect(rep[:8] == b"REPLICP1", "the replica header")
            expect(rep[HEADER:HEADER + POOL_SIZE] ==
                   export_image(c, "pool", os.path.join(work, "pool-rbd.img")),
                   "the replica's pool area is the pool image")
            expect(rep[HEADER + POOL_SIZE:] ==
                   export_image(c, "vol2", os.path.join(work, "vol2.img")),
                   "the replica's mirror is the backing image")

        with checks.check("restore from the RBD replica alone after a kill -9"):
            for name in ("vol3", "pool3", "replica3"):
                size = {"vol3": SIZE, "pool3": POOL_SIZE, "replica3": HEADER + POOL_SIZE + SIZE}[name]
                c.rbd("create", "--size", f"{size // MiB}M", c.image(name))
            args = ["--segment-size", str(64 * KiB), "--zone-size", "4M",
                    "--replica", c.rbd_uri("replica3"), "--replica-sync"]
            with Daemon(size=SIZE, checks=checks, backing=c.rbd_uri("vol3"),
                        pool=c.rbd_uri("pool3"), pool_init=True, extra_args=args) as d:
                ctl = ShadowCtl(d)
                wait_until(lambda: ctl.json("status")["replica"]["state"] == "in-sync",
                           "the replica's initial copy", timeout=120)
                h = nbd.NBD()
                h.connect_unix(d.unix_path)
                img = bytearray(SIZE)
                write_random_blocks(h, rng, img, 30)
                h.flush()
                t1 = time.time_ns()
                img_t1 = bytes(img)
                h.pwrite(rng.randbytes(4 * MiB), 8 * MiB)
                h.flush()
                d.crash()
            rep = c.rbd_uri("replica3")
            with Daemon(size=SIZE, checks=checks, backing=False,
                        extra_args=["--restore-from", rep, "--at", at(t1)]) as r:
                h = nbd.NBD()
                h.connect_unix(r.unix_path)
                expect(read_all(h) == img_t1, "the device at T1 from the RBD replica alone")
                h.shutdown()
            out_file = os.path.join(work, "t1.img")
            ctl = ShadowCtl(os.path.join(work, "none.sock"))
            res = ctl.json("restore", "--from", rep, "--at", at(t1), "--output", out_file,
                           "--verify", "--no-progress")
            with open(out_file, "rb") as f:
                expect(f.read() == img_t1, f"shadowctl restore --from: {res}")

        with checks.check("the OSD stopped under writes: serving goes on, the replica catches up"):
            c.rbd("create", "--size", f"{(HEADER + POOL_SIZE + SIZE) // MiB}M", c.image("replica4"))
            back4 = os.path.join(work, "back4.img")
            with open(back4, "wb") as f:
                f.truncate(SIZE)
            pool4 = make_pool_file(os.path.join(work, "pool4.img"), POOL_SIZE)
            rep = c.rbd_uri("replica4")
            args = ["--segment-size", str(64 * KiB), "--zone-size", "4M", "--replica", rep,
                    "--replica-max-backlog", "1M"]
            with Daemon(size=SIZE, checks=checks, backing=back4, pool=pool4, pool_init=True,
                        extra_args=args) as d:
                ctl = ShadowCtl(d)
                expect("I/O threads do not busy-poll" in d.stderr_text(),
                       "the log says the I/O threads do not busy-poll with a replica on RBD")
                in_sync = in_sync_check(ctl)
                wait_until(in_sync, "the replica's initial copy", timeout=120)
                h = nbd.NBD()
                h.connect_unix(d.unix_path)
                img = bytearray(SIZE)
                write_random_blocks(h, rng, img, 20)
                h.flush()
                c.stop_osd()
                # Ceph is down: every write and flush still completes.
                write_random_blocks(h, rng, img, 60)
                h.flush()
                t_out = time.time_ns()
                img_out = bytes(img)
                write_random_blocks(h, rng, img, 20)
                h.flush()
                r = ctl.json("status")["replica"]
                expect_eq(r["state"], "behind", f"the replica fell behind: {r}")
                expect(r["dirty_bytes"] > 0, f"chunks to copy: {r}")
                c.start_osd()
                r = wait_until(in_sync, "the replica to catch up", timeout=300)
                expect(r["overflows"] >= 1, f"it overflowed once at least: {r}")
                expect(read_all(h) == bytes(img), "the live export kept every write")
                h.shutdown()
            with Daemon(size=SIZE, checks=checks, backing=False,
                        extra_args=["--restore-from", rep, "--at", at(t_out)]) as r:
                h = nbd.NBD()
                h.connect_unix(r.unix_path)
                expect(read_all(h) == img_out, "a time inside the outage, from the replica alone")
                h.shutdown()

        with checks.check("a killed shadowd's exclusive lock: refused at once, broken on request"):
            d = Daemon(size=SIZE, checks=checks, backing=backing)
            d.__enter__()
            try:
                h = nbd.NBD()
                h.connect_unix(d.unix_path)
                h.pwrite(b"\x77" * 4096, 0)
                h.flush()
                h.shutdown()
                d.crash()
            finally:
                d.__exit__(None, None, None)
            rc, out = run_shadowd(["--backing", backing, "--unix", os.path.join(work, "l.sock"),
                                   "--control", os.path.join(work, "l.ctl")], timeout=60)
            expect_eq(rc, 1, "a locked image is refused")
            expect("is locked by" in out and "--rbd-break-lock" in out, f"message: {out}")
            with Daemon(size=SIZE, checks=checks, backing=backing,
                        extra_args=["--rbd-break-lock"]) as d2:
                h = nbd.NBD()
                h.connect_unix(d2.unix_path)
                expect(h.pread(4096, 0) == b"\x77" * 4096, "the image's content")
                h.pwrite(b"\x78" * 4096, 4096)
                h.flush()
                h.shutdown()
            bl = c.ceph("osd", "blocklist", "ls").stdout.decode() + \
                c.ceph("osd", "blocklist", "ls").stderr.decode()
            expect("listed" in bl and not bl.strip().startswith("listed 0"),
                   f"the dead client is blocklisted: {bl}")
        checks.finish()


if __name__ == "__main__":
    main(test)
