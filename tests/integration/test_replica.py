#!/usr/bin/python3
"""The replica (--replica, docs/REPLICA.md) on a local file, with the real
daemon and real clients.

1. shadowd with a pool and --replica FILE: the initial copy brings the
   replica in sync (`shadowctl status` replica.state, and the metrics
   shadowd_replica_in_sync and _shipped_bytes_total), libnbd writes random
   blocks (some FUA, flushes between them), the replica drains; after a
   clean stop the replica file's areas are byte-for-byte the pool file and
   the backing file, and its header names the backing and says in sync.
2. --replica-sync: once in sync, a write and a flush; the daemon is killed
   with SIGKILL right after the flush's reply: the replica's mirror of the
   backing already holds the write (RPO 0 for what a client flushed).
3. A restart on the same replica resynchronises by comparing: what did not
   change is not written again.
4. Restore from the replica alone: with --replica-sync, writes, a flush,
   T1, more writes, a flush, kill -9; the backing and the pool are deleted;
   `shadowd --restore-from REPLICA --at T1` serves exactly the device at T1
   read-only, `export --at now` on it the last flushed state;
   `shadowctl restore --from REPLICA --at T1 --verify` writes the device at
   T1 and `shadowctl history --from REPLICA` shows a window holding T1, with
   no daemon running; the replica file is not written; a T outside its
   window and a missing replica are refused.
5. A daemon killed during the initial copy leaves a replica whose header
   says "syncing": --restore-from refuses it.
6. Refusals at start: --replica without --pool, a replica file too small
   (the message says how many bytes it needs), the replica being the backing
   or the pool.

Synchronisation: sd_notify READY=1; `shadowctl status` is polled for the
replica's state (wait_until), never a sleep.
"""

import fcntl
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (KiB, MiB, Checks, Daemon, ShadowCtl, children_of, expect,  # noqa: E402
                     expect_eq, main, make_pool_file, pid_alive, proc_cmdline, read_all, scrape,
                     make_rng, run_shadowd, shadowctl_path, wait_until, write_random_blocks)

SIZE = 32 * MiB
POOL_SIZE = 64 * MiB
HEADER = 1 * MiB
REPLICA_SIZE = HEADER + POOL_SIZE + SIZE
POOL_ARGS = ["--segment-size", str(64 * KiB), "--zone-size", "4M"]


def at(ns):
    return f"@{ns // 10**9}.{ns % 10**9:09d}"


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


def blocked_writing_stderr(pid):
    """A thread of pid is inside write(2, ...) (/proc/PID/task/TID/syscall:
    number 1, first argument 2)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                if f.read().split()[:2] == ["1", "0x2"]:
                    return True
        except OSError:
            continue
    return False


def kill_shadowctl_during_from(replica, work):
    """`shadowctl restore --from` killed with SIGKILL while its private
    shadowd serves: the private shadowd goes too."""
    before = set(glob.glob("/tmp/shadowctl-replica.*"))
    r, w = os.pipe()
    p = None
    private = None
    try:
        # stderr is a full pipe: shadowctl blocks printing its progress at
        # the end of the copy (with --json, unbuffered), its private
        # shadowd ready and serving, until it is killed.
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
        os.set_blocking(w, False)
        try:
            while True:
                os.write(w, b"x" * 4096)
        except BlockingIOError:
            pass
        os.set_blocking(w, True)
        p = subprocess.Popen([shadowctl_path(), "--json", "restore", "--from", replica,
                              "--at", "now", "--output", os.path.join(work, "killed.img")],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=w)

        def serving():
            nonlocal private
            if not blocked_writing_stderr(p.pid):
                return False
            for k in children_of(p.pid):
                if "--restore-from" in proc_cmdline(k).split():
                    private = k
                    return True
            return False
        wait_until(serving, "shadowctl blocked on its stderr, its private shadowd running")
        expect(p.poll() is None, "shadowctl is still running (its stderr is full)")
        p.kill()
        p.wait()
        wait_until(lambda: not pid_alive(private),
                   f"the private shadowd (pid {private}) to go with the killed shadowctl")
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        os.close(r)
        os.close(w)
        if private is not None and pid_alive(private):
            os.kill(private, signal.SIGKILL)
            wait_until(lambda: not pid_alive(private), f"pid {private} to go after SIGKILL")
        # The temporary directory shadowctl removes when it ends normally.
        for d in set(glob.glob("/tmp/shadowctl-replica.*")) - before:
            shutil.rmtree(d, ignore_errors=True)


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
        # One-second buckets: the access history of the first run's writes
        # is persisted (at a checkpoint) before it stops, and the next start
        # ranks those segments first.
        conf = os.path.join(work, "shadowd.json")
        with open(conf, "w") as f:
            json.dump({"bucket_seconds": 1}, f)
        args = POOL_ARGS + ["--replica", replica, "--checkpoint-interval", "1", "--config", conf]

        with checks.check("in sync after the initial copy; writes shipped; areas equal after a stop"):
            with Daemon(size=SIZE, checks=checks, pool=pool, pool_init=True, backing=backing,
                        extra_args=args, metrics=True) as d:
                ctl = ShadowCtl(d)
                r = wait_in_sync(ctl, "the initial copy")
                expect_eq(r["target"], replica, "the target is named")
                # A file replica: completions come from io_uring, the spin stays.
                expect("do not busy-poll" not in d.stderr_text(),
                       "the I/O threads still busy-poll with a replica on a file")
                expect(r["copied_bytes"] >= SIZE + POOL_SIZE, f"the initial copy: {r}")
                m = scrape(f"http://127.0.0.1:{d.metrics_port}/metrics")
                expect_eq(m.get("shadowd_replica_in_sync"), 1.0, "metric shadowd_replica_in_sync")
                expect(m.get("shadowd_replica_shipped_bytes_total", 0) >= SIZE + POOL_SIZE,
                       f"metric shadowd_replica_shipped_bytes_total: {m.get('shadowd_replica_shipped_bytes_total')}")
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
                wait_until(lambda: ctl.json("status")["monitor"]["history_records"] > 0,
                           "the writes' access bucket to close")
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
                # The first run's writes are in the pool's access history:
                # the resync took those segments first.
                m = re.search(r"initial copy takes the (\d+) hottest segments first", d.stderr_text())
                expect(m is not None and int(m.group(1)) > 0,
                       "the log says the resync took the hottest segments first")
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

        with checks.check("restore from the replica alone: kill -9, backing and pool gone"):
            back2 = make_replica(os.path.join(work, "backing2.img"), SIZE)
            pool2 = make_pool_file(os.path.join(work, "pool2.img"), POOL_SIZE)
            rep2 = make_replica(os.path.join(work, "replica2.img"))
            with Daemon(size=SIZE, checks=checks, pool=pool2, pool_init=True, backing=back2,
                        extra_args=POOL_ARGS + ["--replica", rep2, "--replica-sync"]) as d:
                ctl = ShadowCtl(d)
                wait_in_sync(ctl, "the initial copy")
                h = nbd.NBD()
                h.connect_unix(d.unix_path)
                img = bytearray(SIZE)
                write_random_blocks(h, rng, img, 40)
                h.flush()
                t1 = time.time_ns()
                img_t1 = bytes(img)
                write_random_blocks(h, rng, img, 40)
                h.flush()
                d.crash()
            os.unlink(back2)
            os.unlink(pool2)
            with Daemon(size=SIZE, checks=checks, backing=False,
                        extra_args=["--restore-from", rep2, "--at", at(t1)]) as r:
                h = nbd.NBD()
                h.connect_unix(r.unix_path)
                expect(h.is_read_only(), "the restored export is read-only")
                got = read_all(h)
                expect(got == img_t1, "the device at T1, from the replica alone")
                h.shutdown()
                ctl = ShadowCtl(r)
                hist = ctl.json("history")
                expect(hist["from_ns"] <= t1 <= hist["to_ns"], f"the window holds T1: {hist}")
                # The latest flushed state is in the replica too (sync mode).
                e = ctl.json("export", "--at", "now", "--name", "latest")
                h = nbd.NBD()
                h.connect_uri(e["uri_unix"])
                got = read_all(h)
                expect(got == bytes(img), "the latest flushed state, from the replica alone")
                h.shutdown()
            # shadowctl on any host: restore --from and history --from.
            ctl = ShadowCtl(os.path.join(work, "no-daemon.sock"))
            out_file = os.path.join(work, "t1.img")
            r = ctl.json("restore", "--from", rep2, "--at", at(t1), "--output", out_file,
                         "--verify", "--no-progress")
            expect(r["verified"] is True, f"restore --from: {r}")
            with open(out_file, "rb") as f:
                expect(f.read() == img_t1, "restore --from --at T1 writes the device at T1")
            hist = ctl.json("history", "--from", rep2)
            expect(hist["from_ns"] <= t1 <= hist["to_ns"], f"history --from: {hist}")
            rc, out, err = ctl.run("history", "--from", os.path.join(work, "nothing.img"))
            expect(rc == 1 and "nothing.img" in err, f"a missing replica: {rc} {err.strip()}")
            with open(rep2, "rb") as f:
                expect(f.read(4096)[12] == 1, "the replica was not written (still in sync)")
            rc, out = run_shadowd(["--restore-from", rep2, "--at", at(t1 - 3600 * 10**9),
                                   "--unix", os.path.join(work, "r.sock"),
                                   "--control", os.path.join(work, "r.ctl")])
            expect_eq(rc, 2, "a time outside the replica's window")
            expect("outside the restorable window" in out, f"message: {out}")

        with checks.check("the private shadowd of shadowctl --from goes when shadowctl is killed"):
            kill_shadowctl_during_from(rep2, work)

        with checks.check("a replica killed while copying is refused by --restore-from"):
            back3 = make_replica(os.path.join(work, "backing3.img"), SIZE)
            pool3 = make_pool_file(os.path.join(work, "pool3.img"), POOL_SIZE)
            rep3 = make_replica(os.path.join(work, "replica3.img"))
            # The initial copy at 1 MiB/s takes minutes: it is under way
            # (its header durably says "syncing") when the daemon dies.
            with Daemon(size=SIZE, checks=checks, pool=pool3, pool_init=True, backing=back3,
                        extra_args=POOL_ARGS + ["--replica", rep3, "--shadow-budget", "1M"]) as d:
                ctl = ShadowCtl(d)
                wait_until(lambda: replica_state(ctl)["copied_bytes"] > 0, "the copy to start")
                expect_eq(replica_state(ctl)["state"], "syncing", "the replica is syncing")
                d.crash()
            rc, out = run_shadowd(["--restore-from", rep3, "--at", "now",
                                   "--unix", os.path.join(work, "r3.sock"),
                                   "--control", os.path.join(work, "r3.ctl")])
            expect_eq(rc, 1, "a replica that is not in sync")
            expect("is syncing" in out and "until it is in sync" in out, f"message: {out}")

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
