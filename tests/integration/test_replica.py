#!/usr/bin/python3
"""The replica (--replica, docs/REPLICA.md) on a local file, with the real
daemon and real clients.

1. shadowd with a pool and --replica FILE: the initial copy brings the
   replica in sync (`shadowctl status` replica.state), libnbd writes random
   blocks (some FUA, flushes between them), the replica drains; after a
   clean stop the replica file's areas are byte-for-byte the pool file and
   the backing file, and its header names the backing and says in sync.
2. --replica-sync: once in sync, a write and a flush; the daemon is killed
   with SIGKILL right after the flush's reply: the replica's mirror of the
   backing already holds the write (RPO 0 for what a client flushed).
3. A restart on the same replica resynchronises by comparing: what did not
   change is not written again.
4. Refusals at start: --replica without --pool, a replica file too small
   (the message says how many bytes it needs), the replica being the backing
   or the pool.

Synchronisation: sd_notify READY=1; `shadowctl status` is polled for the
replica's state (wait_until), never a sleep.
"""

import os
import sys
import tempfile

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (KiB, MiB, Checks, Daemon, ShadowCtl, expect, expect_eq,  # noqa: E402
                     main, make_pool_file, make_rng, run_shadowd, wait_until)

SIZE = 32 * MiB
POOL_SIZE = 64 * MiB
HEADER = 1 * MiB
REPLICA_SIZE = HEADER + POOL_SIZE + SIZE
POOL_ARGS = ["--segment-size", str(64 * KiB), "--zone-size", "4M"]


def replica_state(ctl):
    return ctl.json("status")["replica"]


def wait_in_sync(ctl, what):
    def ready():
        r = replica_state(ctl)
        return r if r["state"] == "in-sync" and r["backlog_bytes"] == 0 else None
    return wait_until(ready, what)


def read(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def make_replica(path, size=REPLICA_SIZE):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test():
    checks = Checks("replica")
    rng = make_rng("replica")
    with tempfile.TemporaryDirectory(prefix="shadowd-replica-") as work:
        pool = make_pool_file(os.path.join(work, "pool.img"), POOL_SIZE)
        replica = make_replica(os.path.join(work, "replica.img"))
        backing = make_replica(os.path.join(work, "backing.img"), SIZE)
        args = POOL_ARGS + ["--replica", replica, "--checkpoint-interval", "1"]

        with checks.check("in sync after the initial copy; writes shipped; areas equal after a stop"):
            with Daemon(size=SIZE, checks=checks, pool=pool, pool_init=True, backing=backing,
                        extra_args=args) as d:
                ctl = ShadowCtl(d)
                r = wait_in_sync(ctl, "the initial copy")
                expect_eq(r["target"], replica, "the target is named")
                expect(r["copied_bytes"] >= SIZE + POOL_SIZE, f"the initial copy: {r}")
                h = nbd.NBD()
                h.connect_unix(d.unix_path)
                for i in range(200):
                    n = 512 * rng.randrange(1, 256)
                    off = 512 * rng.randrange(0, (SIZE - n) // 512)
                    h.pwrite(rng.randbytes(n), off,
                             nbd.CMD_FLAG_FUA if i % 7 == 0 else 0)
                    if i % 25 == 24:
                        h.flush()
                h.flush()
                h.shutdown()
                r = wait_in_sync(ctl, "the replica to drain")
                expect(r["epochs"] > 0 and r["shipped_bytes"] > r["copied_bytes"], f"shipped: {r}")
            with open(replica, "rb") as f:
                head = f.read(4096)
            expect(head[:8] == b"REPLICP1", "the replica header's magic")
            expect(backing.encode() in head, "the header names the backing")
            expect_eq(head[12], 1, "the header says in sync")
            expect(read(replica, HEADER, POOL_SIZE) == read(pool, 0, POOL_SIZE),
                   "the replica's pool area is the pool file")
            expect(read(replica, HEADER + POOL_SIZE, SIZE) == read(backing, 0, SIZE),
                   "the replica's mirror is the backing file")

        with checks.check("--replica-sync: a flushed write is on the replica before kill -9"):
            with Daemon(size=SIZE, checks=checks, pool=pool, pool_init=True, backing=backing,
                        extra_args=args + ["--replica-sync"]) as d:
                ctl = ShadowCtl(d)
                wait_in_sync(ctl, "the resync after the restart")
                h = nbd.NBD()
                h.connect_unix(d.unix_path)
                data = rng.randbytes(256 * KiB)
                off = 5 * MiB + 4096
                h.pwrite(data, off)
                h.flush()
                d.crash()
                expect(read(replica, HEADER + POOL_SIZE + off, len(data)) == data,
                       "the flushed write is in the replica's mirror")

        with checks.check("a restart resynchronises by comparing: unchanged chunks are not written"):
            with Daemon(size=SIZE, checks=checks, pool=pool, pool_init=True, backing=backing,
                        extra_args=args) as d:
                ctl = ShadowCtl(d)
                r = wait_in_sync(ctl, "the resync")
                # Recovery after the kill wrote to the pool and the backing;
                # most chunks are what the replica already holds.
                expect(r["copied_bytes"] >= SIZE + POOL_SIZE, f"every chunk checked: {r}")
                expect(r["shipped_bytes"] < r["copied_bytes"], f"not every chunk written: {r}")

        with checks.check("bad settings are refused at start"):
            rc, out = run_shadowd(["--backing", pool, "--replica", replica, "--unix",
                                   os.path.join(work, "x.sock")])
            expect_eq(rc, 2, "--replica without --pool")
            expect("replica needs a pool" in out, f"message: {out}")
            small = make_replica(os.path.join(work, "small.img"), 4 * MiB)
            back = os.path.join(work, "b.img")
            with open(back, "wb") as f:
                f.truncate(SIZE)
            common = ["--backing", back, "--pool", pool, "--init", "--force",
                      "--control", os.path.join(work, "c.sock"), "--state-dir",
                      os.path.join(work, "state"), "--unix", os.path.join(work, "x.sock")] + POOL_ARGS
            rc, out = run_shadowd(common + ["--replica", small])
            expect_eq(rc, 2, "a replica too small")
            expect(f"needs {REPLICA_SIZE}" in out, f"the message says what it needs: {out}")
            rc, out = run_shadowd(common + ["--replica", back])
            expect_eq(rc, 2, "the replica is the backing")
            rc, out = run_shadowd(common + ["--replica", pool])
            expect_eq(rc, 2, "the replica is the pool")
            expect("device of its own" in out, f"message: {out}")
        checks.finish()


if __name__ == "__main__":
    main(test)
