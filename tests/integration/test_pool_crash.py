#!/usr/bin/python3
"""kill -9 of a shadowd with a shadow pool loses nothing acknowledged.

1. fio --ioengine=nbd writes a region with crc32c verify headers and ends
   with a FLUSH (end_fsync=1); nothing is verified yet.
2. Crash cycles: a libnbd client keeps 16 writes in flight on another region,
   every write to a block of its own (so an acknowledged block can only hold
   its data), half of them with FUA and the rest followed by FLUSHes; the
   daemon is killed with SIGKILL once a seeded number of replies has come
   back, while writes are in flight and the shadow thread is copying segments.
   The daemon restarts on the same pool (recovery: checkpoint + journal tail)
   and then:
     - every write acknowledged with FUA, or followed by an acknowledged
       FLUSH, reads back; a write that was in flight reads as either its old
       or its new content;
     - the journal did not shrink: `shadowctl history` shows a last_seq and
       a number of versions at least those seen before the kill, and every
       durable write of the cycle is a journal record;
     - history is not degraded.
3. fio --verify_only over the region of phase 1 after the last restart.

Synchronisation: sd_notify READY=1 for every start; the kill happens when
the client has counted enough replies, never after a sleep.
"""

import json
import os
import random
import sys
import tempfile

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (KiB, MiB, Checks, Daemon, ShadowCtl, expect, expect_eq,  # noqa: E402
                     log, main, make_pool_file, make_rng, run)

SIZE = 64 * MiB
SEG = 64 * KiB
POOL_SIZE = 256 * MiB
FIO_SIZE = 16 * MiB                 # phase 1: [0, 16 MiB)
REGION = 32 * MiB                   # phase 2: [32 MiB, 64 MiB)
BLOCK = 4 * KiB
CYCLES = int(os.environ.get("SHADOWD_CRASH_CYCLES", "4"))
PER_CYCLE = 256                     # blocks written per cycle at most
DEPTH = 16
POOL_ARGS = ["--segment-size", str(SEG), "--zone-size", "4M",
             "--checkpoint-interval", "1"]


def connect(d):
    h = nbd.NBD()
    h.set_export_name("disk")
    h.connect_unix(d.unix_path)
    return h


def fio(work, name, uri, extra):
    out = os.path.join(work, f"{name}.json")
    rc, _ = run(["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}",
                 "--verify=crc32c", "--verify_fatal=1", "--randrepeat=1",
                 "--verify_state_save=0", "--output-format=json", f"--output={out}",
                 "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={FIO_SIZE}",
                 "--offset=0", *extra], check=False, cwd=work)
    text = open(out).read() if os.path.exists(out) else ""
    if rc != 0:
        print(text, flush=True)
    expect_eq(rc, 0, f"fio {name} exit code")
    j = json.loads(text[text.index("{"):])
    for job in j["jobs"]:
        expect_eq(job["error"], 0, f"fio {name} error")
    return j["jobs"][0]


class Cycle:
    """One crash cycle's writes: block index -> (old bytes, new bytes), and
    which of them are durable (FUA reply, or a FLUSH reply after them)."""

    def __init__(self, rng, first_block, old):
        self.rng = rng
        self.blocks = list(range(first_block, first_block + PER_CYCLE))
        self.old = old                  # bytearray of the whole region
        self.new = {}                   # block -> bytes written
        self.fua = {}                   # block -> sent with FUA
        self.acked = set()              # blocks whose write was answered ok
        self.durable = set()            # acked with FUA, or before an acked FLUSH
        self.replies = 0

    def run(self, d, kill_after):
        """Keep DEPTH requests in flight until ``kill_after`` replies, then
        SIGKILL the daemon and drain what the connection returns."""
        h = connect(d)
        killed = False

        def on_write(b):
            def cb(err):
                self.replies += 1
                if err.value == 0:
                    self.acked.add(b)
                    if self.fua[b]:
                        self.durable.add(b)
                return 1
            return cb

        def on_flush(blocks):
            def cb(err):
                self.replies += 1
                if err.value == 0:
                    self.durable.update(blocks)
                return 1
            return cb

        todo = list(self.blocks)
        sent = 0
        try:
            while True:
                if not killed and self.replies >= kill_after:
                    log(f"  SIGKILL after {self.replies} replies, "
                        f"{h.aio_in_flight()} requests in flight")
                    d.crash()
                    killed = True
                while not killed and todo and h.aio_in_flight() < DEPTH:
                    b = todo.pop(0)
                    data = self.rng.randbytes(BLOCK)
                    self.new[b] = data
                    self.fua[b] = self.rng.random() < 0.5
                    h.aio_pwrite(data, REGION + b * BLOCK, completion=on_write(b),
                                 flags=nbd.CMD_FLAG_FUA if self.fua[b] else 0)
                    sent += 1
                    if sent % 8 == 0:
                        h.aio_flush(completion=on_flush(set(self.acked)))
                if h.aio_in_flight() == 0:
                    if killed or not todo:
                        break
                    continue
                h.poll(-1)
        except nbd.Error as e:
            expect(killed, f"the connection failed before the kill: {e}")
        if not killed:
            d.crash()
        del h

    def check(self, d):
        h = connect(d)
        lost = []
        for b, data in self.new.items():
            got = h.pread(BLOCK, REGION + b * BLOCK)
            old = bytes(self.old[b * BLOCK:(b + 1) * BLOCK])
            if b in self.durable:
                if got != data:
                    lost.append(b)
            else:
                expect(got in (data, old),
                       f"block {b} (in flight at the kill) reads neither old nor new content")
            self.old[b * BLOCK:(b + 1) * BLOCK] = got
        h.shutdown()
        expect(not lost, f"{len(lost)} durable acknowledged writes lost: blocks {lost[:10]}")


def test():
    checks = Checks("pool-crash")
    rng = make_rng("pool-crash")
    with tempfile.TemporaryDirectory(prefix="shadowd-pool-crash-") as work:
        backing = os.path.join(work, "disk.img")
        pool = make_pool_file(os.path.join(work, "pool.img"), POOL_SIZE)
        with open(backing, "wb") as f:
            f.truncate(SIZE)
        region = bytearray(SIZE - REGION)

        with checks.check("phase 1: fio writes a verified region and flushes"):
            with Daemon(size=SIZE, backing=backing, pool=pool, pool_init=True,
                        extra_args=POOL_ARGS, name="fio-write", checks=checks) as d:
                job = fio(work, "phase1", d.uri_unix, ["--do_verify=0", "--end_fsync=1"])
                expect_eq(job["write"]["io_bytes"], FIO_SIZE, "fio phase 1 bytes written")
                h = ShadowCtl(d).json("history")
                expect(h["journal_records"] >= FIO_SIZE // BLOCK,
                       f"journal_records {h['journal_records']} after fio")
                # A crash right after the flush: nothing of phase 1 may be lost.
                d.crash()

        before = None
        for c in range(CYCLES):
            kill_after = rng.randrange(8, PER_CYCLE)
            cyc = Cycle(rng, c * PER_CYCLE, region)
            with checks.check(f"crash cycle {c + 1}/{CYCLES}: SIGKILL after "
                              f"{kill_after} replies; restart recovers every durable write"):
                with Daemon(size=SIZE, backing=backing, pool=pool, extra_args=POOL_ARGS,
                            name=f"cycle{c + 1}", checks=checks) as d:
                    ctl = ShadowCtl(d)
                    h0 = ctl.json("history")
                    if before is not None:
                        expect(h0["last_seq"] >= before["last_seq"],
                               f"last_seq {h0['last_seq']} < {before['last_seq']} before the kill")
                        expect(h0["versions"] >= before["versions"],
                               f"versions {h0['versions']} < {before['versions']} before the kill")
                        expect_eq(h0["first_seq"], before["first_seq"], "first_seq kept")
                    expect(not h0["degraded"], f"degraded after restart: {h0['degraded_reason']}")
                    before = h0
                    cyc.run(d, kill_after)
                    log(f"  {len(cyc.new)} writes sent, {len(cyc.acked)} acknowledged, "
                        f"{len(cyc.durable)} durable")
                with Daemon(size=SIZE, backing=backing, pool=pool, extra_args=POOL_ARGS,
                            name=f"cycle{c + 1}-check", checks=checks) as d:
                    ctl = ShadowCtl(d)
                    cyc.check(d)
                    h1 = ctl.json("history")
                    durable_seqs = len(cyc.durable)
                    expect(h1["last_seq"] >= before["last_seq"] + durable_seqs,
                           f"last_seq {h1['last_seq']}: the {durable_seqs} durable writes "
                           f"after seq {before['last_seq']} are not all in the journal")
                    expect(h1["versions"] >= before["versions"], "versions kept")
                    expect(not h1["degraded"], f"degraded: {h1['degraded_reason']}")
                    p = ctl.json("pool")
                    expect_eq(p["pool_errors"], 0, "pool errors")
                    before = h1
                    # Crash this one too, idle: recovery of a recovery.
                    d.crash()

        with checks.check("phase 3: fio verifies the region of phase 1 after all the crashes"):
            with Daemon(size=SIZE, backing=backing, pool=pool, extra_args=POOL_ARGS,
                        name="fio-verify", checks=checks) as d:
                job = fio(work, "phase1", d.uri_unix, ["--verify_only"])
                expect_eq(job["read"]["io_bytes"], FIO_SIZE, "fio bytes verified")
        checks.finish()


if __name__ == "__main__":
    main(test)
