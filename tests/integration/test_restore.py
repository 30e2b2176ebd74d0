#!/usr/bin/python3
"""Restore through the real daemon and the real shadowctl.

A pattern is written and flushed (T1), overwritten, trimmed and zeroed and
flushed again (T2), then changed once more (the live state C). The test
keeps its own copy of the device at T1, T2 and now, and then:

- `shadowctl export --at T1` adds a read-only export, listed by
  `nbdinfo --list` and `shadowctl exports`; nbdcopy of it, a libnbd read
  while the live export keeps taking writes, and `qemu-img compare` all
  equal the image at T1; block status in the `shadowd:source` context
  marks the segments written after T1 as coming from versions (+ journal)
  and the others from the primary; `unexport` removes it;
- a T before the window or in the future is refused, the message names the
  restorable range, and nothing is exported;
- `shadowctl restore --at T2 --output FILE --verify` writes the image at T2;
- a restore into an immutable directory, a missing directory or below a
  file fails naming the output and creates nothing; an existing file is not
  overwritten without --force, the daemon's own pool device not even with it;
- a restore onto a tmpfs too small for it fails with an io error, leaves the
  state file (--state) and a message that says the output is incomplete and
  how to resume; a plain restore onto it and a resume at another time are
  refused; after the tmpfs grows, --resume --verify finishes the copy with
  only the missing bytes and the file equals the image at T1;
- `shadowctl rollback --at T2` without --yes changes nothing; with --yes the
  live export equals the image at T2, and a rollback to the sequence number
  just before it (which it prints) brings back state C;
- `shadowctl verify` is clean; at the end, after a byte of every copy of a
  freshly journaled block is flipped in the pool file behind the daemon's
  back, it reports the damage and exits 1.

Synchronisation: sd_notify READY=1; every control command answers when its
work is done.
"""

import json
import os
import sys
import tempfile
import time

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (KiB, MiB, Checks, Daemon, ShadowCtl, expect, expect_eq,  # noqa: E402
                     expect_same_image, main, read_all, make_pool_file, make_rng, run, wait_until)

SIZE = 64 * MiB
SEG = 64 * KiB
POOL_SIZE = 256 * MiB
POOL_ARGS = ["--segment-size", str(SEG), "--zone-size", "4M"]


def at(ns):
    return f"@{ns // 10**9}.{ns % 10**9:09d}"


def connect(uri):
    h = nbd.NBD()
    h.add_meta_context("shadowd:source")
    h.connect_uri(uri)
    return h


def expect_image(got, want, what):
    expect_same_image(got, want, what)


def source_map(uri, size):
    """offset -> flags of the shadowd:source context over the whole device."""
    h = connect(uri)
    expect(h.can_meta_context("shadowd:source"), "shadowd:source negotiated")
    out = []
    off = 0
    while off < size:
        got = []

        def cb(metacontext, offset, entries, err):
            if metacontext == "shadowd:source":
                got.append(list(entries))
            return 0
        h.block_status(min(size - off, 1 << 30), off, cb)
        expect(got, f"a shadowd:source reply at offset {off}")
        e = got[0]
        for i in range(0, len(e), 2):
            out.append((off, e[i], e[i + 1]))
            off += e[i]
    h.shutdown()
    return out


def test():
    checks = Checks("restore")
    rng = make_rng("restore")
    with tempfile.TemporaryDirectory(prefix="shadowd-restore-") as work:
        pool = make_pool_file(os.path.join(work, "pool.img"), POOL_SIZE)
        with Daemon(size=SIZE, checks=checks, pool=pool, pool_init=True,
                    extra_args=POOL_ARGS) as d:
            ctl = ShadowCtl(d)
            live = nbd.NBD()
            live.connect_unix(d.unix_path)
            img = bytearray(read_all(live))

            # --- build three states ---------------------------------------
            a = rng.randbytes(8 * MiB)
            live.pwrite(a, 0)
            img[0:8 * MiB] = a
            b = rng.randbytes(1 * MiB)
            live.pwrite(b, 40 * MiB)
            img[40 * MiB:41 * MiB] = b
            live.flush()
            t1 = time.time_ns()
            img_t1 = bytes(img)

            c = rng.randbytes(3 * MiB + 5000)
            live.pwrite(c, 2 * MiB + 100)
            img[2 * MiB + 100:2 * MiB + 100 + len(c)] = c
            live.trim(1 * MiB, 6 * MiB)
            img[6 * MiB:7 * MiB] = bytes(1 * MiB)
            live.zero(256 * KiB, 40 * MiB + 64 * KiB)
            img[40 * MiB + 64 * KiB:40 * MiB + 320 * KiB] = bytes(256 * KiB)
            live.pwrite(b"\x5a" * 4096, 50 * MiB)
            img[50 * MiB:50 * MiB + 4096] = b"\x5a" * 4096
            live.flush()
            t2 = time.time_ns()
            img_t2 = bytes(img)

            e = rng.randbytes(2 * MiB)
            live.pwrite(e, 1 * MiB)
            img[1 * MiB:3 * MiB] = e
            live.flush()
            img_c = bytes(img)
            expect_image(read_all(live), img_c, "the live export (state C)")

            # --- instant export at T1 -------------------------------------
            with checks.check("export --at T1: nbdinfo, nbdcopy, libnbd, qemu-img see T1"):
                r = ctl.json("export", "--at", at(t1), "--name", "t1")
                expect_eq(r["name"], "t1", "export name")
                expect(r["read_only"] is True, "read-only")
                expect_eq(r["size_bytes"], SIZE, "size")
                uri = r["uri_unix"]
                rc, out = run(["nbdinfo", "--list", f"nbd+unix:///?socket={d.unix_path}"])
                expect("t1" in out, f"nbdinfo --list shows t1: {out}")
                rc, out = run(["nbdinfo", "--json", uri])
                info = json.loads(out)
                expect_eq(info["exports"][0]["is_read_only"], True, "nbdinfo: read-only")
                copy = os.path.join(work, "t1.img")
                run(["nbdcopy", uri, copy])
                with open(copy, "rb") as f:
                    expect_image(f.read(), img_t1, "nbdcopy of the export at T1")
                # The live export keeps changing; the export at T1 does not.
                h = connect(uri)
                live.pwrite(b"\x77" * 65536, 0)
                live.pwrite(img_c[0:65536], 0)
                expect_image(read_all(h), img_t1, "libnbd read at T1 while the live export changes")
                try:
                    h.pwrite(b"x" * 512, 0)
                    expect(False, "a write to the export at T1 succeeded")
                except nbd.Error:
                    pass
                h.shutdown()
                want_file = os.path.join(work, "want_t1.img")
                with open(want_file, "wb") as f:
                    f.write(img_t1)
                run(["qemu-img", "compare", "-f", "raw", "-F", "raw", want_file, uri])
                lst = ctl.json("exports")["exports"]
                names = {x["name"]: x for x in lst}
                expect(names["disk"]["live"] is True, "the live export is listed")
                x = names["t1"]
                expect(x["live"] is False and x["seq"] == r["seq"], f"t1 in exports: {x}")
                expect(x["bytes_read"] >= 2 * SIZE, f"bytes_read {x['bytes_read']}")
                expect(x["records_applied"] + x["versions_decoded"] > 0, f"replay cost {x}")

            with checks.check("block status shadowd:source at T1: versions where written after T1"):
                m = source_map(uri, SIZE)
                changed = set()
                for lo, hi in [(2 * MiB + 100, 5 * MiB + 5100), (6 * MiB, 7 * MiB),
                               (40 * MiB + 64 * KiB, 40 * MiB + 320 * KiB),
                               (50 * MiB, 50 * MiB + 4096), (0, 65536), (1 * MiB, 3 * MiB)]:
                    changed.update(range(lo // SEG, (hi - 1) // SEG + 1))
                for off, length, flags in m:
                    for s in range(off // SEG, (off + length - 1) // SEG + 1):
                        if s in changed:
                            expect(flags & 1, f"segment {s} (written after T1) has flags {flags}")
                        else:
                            expect_eq(flags, 0, f"segment {s} (not written after T1) flags")

            with checks.check("unexport removes the export"):
                ctl.json("unexport", "t1")
                names = [x["name"] for x in ctl.json("exports")["exports"]]
                expect("t1" not in names, f"t1 still listed: {names}")
                ctl.fails("not_found", "unexport", "t1")
                ctl.fails("invalid_argument", "unexport", "disk")

            with checks.check("a time outside the window is refused and names the window"):
                for bad in (at(t1 - 3600 * 10**9), at(time.time_ns() + 3600 * 10**9)):
                    r = ctl.fails("out_of_range", "export", "--at", bad)
                    expect("restorable window" in r["message"], f"message: {r['message']}")
                rc, _, err = ctl.run("export", "--at", "yesterday-ish")
                expect_eq(rc, 2, f"a malformed --at is a usage error: {err.strip()}")
                expect_eq([x["name"] for x in ctl.json("exports")["exports"]], ["disk"],
                          "nothing exported by refused requests")

            with checks.check("restore --at T2 --output FILE --verify writes the image at T2"):
                out_file = os.path.join(work, "t2.img")
                r = ctl.json("restore", "--at", at(t2), "--output", out_file, "--verify",
                             "--no-progress")
                with open(out_file, "rb") as f:
                    expect_image(f.read(), img_t2, "restored image at T2")
                rp = r["replay"]
                expect(rp["segments_reconstructed"] >= SIZE // SEG, f"replay cost: {rp}")
                expect(rp["versions_decoded"] > 0 and rp["records_applied"] > 0, f"replay cost: {rp}")
                expect(not os.path.exists(out_file + ".shadowd-restore"),
                       "no restore state file left after a finished restore")
                expect_eq([x["name"] for x in ctl.json("exports")["exports"]], ["disk"],
                          "the restore's temporary export is gone")

            with checks.check("restore to an unwritable or taken path is refused, nothing changed"):
                locked = os.path.join(work, "locked")
                os.mkdir(locked)
                run(["chattr", "+i", locked])  # not even root may create files in it
                try:
                    target = os.path.join(locked, "t1.img")
                    rc, out, err = ctl.run("restore", "--at", at(t1), "--output", target,
                                           "--no-progress")
                    expect(rc != 0, f"restore into an immutable directory: exit {rc}")
                    reply = json.loads(out)
                    expect(reply.get("ok") is False and target in reply.get("message", ""),
                           f"the error names the output: {reply}")
                    expect_eq(sorted(os.listdir(locked)), [], "nothing created in it")
                finally:
                    run(["chattr", "-i", locked])
                for target in (os.path.join(work, "no", "such", "dir.img"),
                               os.path.join(work, "pool.img", "x.img")):
                    rc, out, err = ctl.run("restore", "--at", at(t1), "--output", target,
                                           "--no-progress")
                    expect(rc != 0 and json.loads(out).get("ok") is False,
                           f"restore to {target}: exit {rc} {out.strip()}")
                    expect(not os.path.exists(target + ".shadowd-restore"),
                           f"no state file for {target}")
                # An existing file is not overwritten without --force.
                taken = os.path.join(work, "taken.img")
                with open(taken, "wb") as f:
                    f.write(b"precious" * 512)
                r = ctl.fails("refused", "restore", "--at", at(t1), "--output", taken,
                              "--no-progress")
                expect("--force" in r["message"], f"the message says how: {r['message']}")
                with open(taken, "rb") as f:
                    expect_eq(f.read(), b"precious" * 512, "the existing file is unchanged")
                # Nor the daemon's own pool device, even with --force.
                ctl.fails("refused", "restore", "--at", at(t1), "--output", pool, "--force",
                          "--no-progress")
                expect_eq([x["name"] for x in ctl.json("exports")["exports"]], ["disk"],
                          "no temporary export left by refused restores")

            with checks.check("a restore cut short by a full disk is marked incomplete and resumes"):
                small = os.path.join(work, "small")
                os.mkdir(small)
                # 4 MiB of room for 9 MiB of data (the rest of T1 is zeros,
                # written as holes): the copy fails part way.
                run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", small])
                try:
                    target = os.path.join(small, "t1.img")
                    state = os.path.join(work, "t1.state")
                    rc, out, err = ctl.run("restore", "--at", at(t1), "--output", target,
                                           "--state", state, "--no-progress")
                    expect_eq(rc, 1, f"restore onto a full disk fails: {err.strip()}")
                    reply = json.loads(out)
                    expect(reply.get("ok") is False and reply.get("code") == "io",
                           f"an io error: {reply}")
                    expect(os.path.exists(state), "the state file marks the output incomplete")
                    expect("incomplete" in reply.get("message", "") and
                           "--resume" in reply.get("message", ""),
                           f"the message says the output is incomplete and how to resume: {reply}")
                    # Without --resume or --force the incomplete output is not
                    # taken for a finished one nor silently started over.
                    r = ctl.fails("refused", "restore", "--at", at(t1), "--output", target,
                                  "--state", state, "--no-progress")
                    expect("--resume" in r["message"], f"says --resume: {r['message']}")
                    # A resume at another time is refused.
                    ctl.fails("refused", "restore", "--at", at(t2), "--output", target,
                              "--state", state, "--resume", "--no-progress")
                    run(["mount", "-o", "remount,size=128m", small])
                    r = ctl.json("restore", "--output", target, "--state", state, "--resume",
                                 "--verify", "--no-progress")
                    expect(r["resumed"] is True and r["earlier_bytes"] > 0,
                           f"the resume continued the earlier copy: {r}")
                    expect(r["copied_bytes"] < SIZE, f"only what was missing is copied: {r}")
                    with open(target, "rb") as f:
                        expect_image(f.read(), img_t1, "resumed restore at T1")
                    expect(not os.path.exists(state), "the state file is gone when complete")
                finally:
                    run(["umount", small])
                expect_eq([x["name"] for x in ctl.json("exports")["exports"]], ["disk"],
                          "no temporary export left")

            with checks.check("rollback --at T2: dry run, then for real, then undone"):
                r = ctl.json("rollback", "--at", at(t2))
                expect(r["dry_run"] is True, "without --yes it is a dry run")
                expect(r["segments_total"] > 0, f"segments to rewrite: {r}")
                expect_image(read_all(live), img_c, "a dry run changes nothing")
                r = ctl.json("rollback", "--at", at(t2), "--yes")
                expect(r["dry_run"] is False and r["rewritten"] == r["segments_total"], f"rollback: {r}")
                expect_image(read_all(live), img_t2, "live export after rollback to T2")
                undo = r["journal_first_seq"] - 1
                r2 = ctl.json("rollback", "--at", f"seq:{undo}", "--yes")
                expect(r2["rewritten"] > 0, f"undo: {r2}")
                expect_image(read_all(live), img_c, "live export after undoing the rollback")

            with checks.check("verify is clean"):
                r = ctl.json("verify", "--all")
                expect(r["clean"] is True, f"verify: {r}")
                expect(r["records_checked"] > 0 and r["zones_scanned"] > 0, f"verify: {r}")
                r = ctl.json("verify", "--at", at(t1))
                expect(r["clean"] is True, f"verify --at T1: {r}")
            with checks.check("an export pins the window: retention stops at its time"):
                r = ctl.json("export", "--at", at(t2), "--name", "pinned")
                pinned_uri = r["uri_unix"]
                # A short retention: the shadow thread prunes towards now - 1s
                # but not past T2 while the export shows it.
                ctl.json("config", "set", "retention_seconds=1")
                hist = wait_until(lambda: (lambda h: h if h["from_ns"] > t1 else None)(ctl.json("history")),
                                  "retention to move the window start past T1")
                expect(hist["from_ns"] <= t2, f"window start {hist['from']} passed the pinned T2")
                h = connect(pinned_uri)
                expect_image(read_all(h), img_t2, "the pinned export after pruning")
                h.shutdown()
                ctl.fails("out_of_range", "export", "--at", at(t1))
                ctl.json("unexport", "pinned")
                wait_until(lambda: ctl.json("history")["from_ns"] > t2,
                           "retention to move past T2 once the export is gone")

            with checks.check("verify finds a damaged byte in the pool and exits 1"):
                # Fresh random data in a journal record that nothing folds
                # or prunes meanwhile (a long window again); it is in the
                # pool file literally (zstd keeps incompressible blocks raw).
                # Flip one byte of every copy behind the daemon's back.
                ctl.json("config", "set", "retention_seconds=3600")
                fresh = rng.randbytes(64 * KiB)
                live.pwrite(fresh, 20 * MiB)
                live.flush()
                piece = fresh[4096:4096 + 64]
                with open(pool, "r+b") as f:
                    blob = f.read()
                    hits = []
                    i = blob.find(piece)
                    while i >= 0:
                        hits.append(i)
                        i = blob.find(piece, i + 1)
                    expect(hits, "the data just written is in the pool file")
                    for i in hits:
                        f.seek(i + 10)
                        f.write(bytes([blob[i + 10] ^ 0xFF]))
                    f.flush()
                    os.fsync(f.fileno())
                del blob
                rc, out, err = ctl.run("verify", "--all")
                expect_eq(rc, 1, f"verify exit code on a damaged pool ({err.strip()})")
                r = json.loads(out)
                expect(r.get("clean") is False and r.get("errors"), f"verify reports it: {r}")
                rc, out, err = ctl.run("verify", "--all", json_out=False)
                expect_eq(rc, 1, "verify exit code, text output")
                expect("checksum" in (out + err).lower(), f"the report names the checksum: {out}")
            live.shutdown()
        checks.finish()


if __name__ == "__main__":
    main(test)
