#!/usr/bin/python3
"""The shadow pool (--pool) of a live shadowd, driven by real clients.

* Start-up: without --init a blank pool file is refused (exit 2, the message
  says to start with --init) and left blank; --init formats it (zones of
  --zone-size); a restart with --init on the same pool uses it as it is (the
  history is the same after the restart as before, and the sequence goes
  on); so does a restart without --init. A pool formatted for another
  backing file or another segment size is refused (exit 2, the message names
  both backings / the option to change) and the pool file is left byte for
  byte as it was; with --init --force it is reformatted (empty history).
  A second shadowd on a pool in use is refused; --init needs --pool, --force
  needs --init, --pool needs a writable export.
* The journal: a known sequence of WRITE / WRITE_ZEROES / TRIM / FUA / FLUSH
  requests through libnbd; after each request `shadowctl --json history`
  shows exactly one more sequence number and one more record per segment
  the request touched; raw bytes count the WRITE payloads. With
  --shadow-budget 0 every first write to a segment is a copy-on-first-write
  stall: `status` counts exactly one per distinct segment, `versions
  --segment` lists that one full `cow` version (before the segment's first
  record) and the segment's records with their sequence numbers, and the
  segment list holds exactly the written segments. `pool` reports the zones
  (by kind, summing up, of --zone-size), use and utilisation consistently;
  `pool --zones` lists every zone. The human forms exit 0 and name the key
  figures; the metrics endpoint agrees with the control socket.
* Data: what is read back (and what the backing file holds after the
  daemon stopped) equals the model of what was written, zeroed and trimmed.
* Background shadowing (default budget): a segment that has only been read
  gets a version from the shadow thread once it is ranked (`config set`
  rescores), so its first write is no stall; a segment with many records
  gets a newer delta version.
* Without --pool, history / versions / pool answer `unavailable`.

Synchronisation: sd_notify READY=1; every figure is read after the client
has its replies (the journal record is in the index before the write is
acknowledged). Only the shadow thread's work is polled for, with a deadline.
"""

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd  # noqa: E402
from harness import (KiB, MiB, Checks, Daemon, ShadowCtl, expect, expect_eq, scrape,  # noqa: E402
                     file_head, log, main, make_pool_file, make_rng, run_shadowd,
                     sha256_file, wait_until, write_random_file)

SIZE = 32 * MiB
SEG = 64 * KiB
POOL_SIZE = 160 * MiB
ZONE = 4 * MiB
ZONES = (POOL_SIZE - 1 * MiB) // ZONE   # the first MiB holds the superblocks
POOL_ARGS = ["--segment-size", str(SEG), "--zone-size", "4M"]


def connect(d):
    h = nbd.NBD()
    h.set_export_name("disk")
    h.connect_unix(d.unix_path)
    return h


class Model:
    """The device as the client wrote it, and the journal it must have made."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.data = bytearray(f.read())
        self.seq = 0            # mutating requests so far
        self.records = 0        # journal records: one per segment per request
        self.raw = 0            # WRITE payload bytes
        self.segs = {}          # segment -> [seq of each record]

    def _journal(self, off, ln):
        self.seq += 1
        for s in range(off // SEG, (off + ln - 1) // SEG + 1):
            self.records += 1
            self.segs.setdefault(s, []).append(self.seq)

    def write(self, h, off, data, flags=0):
        h.pwrite(data, off, flags)
        self.data[off:off + len(data)] = data
        self.raw += len(data)
        self._journal(off, len(data))

    def zero(self, h, off, ln):
        h.zero(ln, off)
        self.data[off:off + ln] = bytes(ln)
        self._journal(off, ln)

    def trim(self, h, off, ln):
        # The pool applies a TRIM as a zeroing, so that the journal knows
        # what it left (core/shadow_store.h).
        h.trim(ln, off)
        self.data[off:off + ln] = bytes(ln)
        self._journal(off, ln)


def history(ctl):
    return ctl.json("history")


def expect_refused(rc, out, what, *words):
    expect_eq(rc, 2, f"exit code of shadowd ({what})")
    for w in words:
        expect(w in out, f"{what}: the message does not mention {w!r}: {out.strip()!r}")


# --------------------------------------------------------------------------


def check_usage_refusals(work, backing, pool):
    blank = file_head(pool)
    expect(blank == bytes(len(blank)), "a fresh pool file reads as zeroes")
    rc, out = run_shadowd(["--backing", backing, "--pool", pool, "--unix",
                           os.path.join(work, "x.sock"), "--control", os.path.join(work, "x.ctl")])
    expect_refused(rc, out, "blank pool without --init", pool, "not a shadow pool", "--init")
    expect_eq(file_head(pool), blank, "the blank pool after the refusal")
    rc, out = run_shadowd(["--backing", backing, "--init"])
    expect_refused(rc, out, "--init without --pool", "--pool")
    rc, out = run_shadowd(["--backing", backing, "--pool", pool, "--force"])
    expect_refused(rc, out, "--force without --init", "--init")
    rc, out = run_shadowd(["--backing", backing, "--pool", pool, "--init", "--read-only"])
    expect_refused(rc, out, "--pool with --read-only", "read")
    rc, out = run_shadowd(["--backing", backing, "--pool", backing, "--init"])
    expect_refused(rc, out, "the backing as its own pool", "backing")
    expect_eq(file_head(pool), blank, "the blank pool after the usage errors")


def check_fresh(d, ctl, pool):
    expect("formatted the shadow pool" in d.stderr_text(), "no 'formatted' line in the log")
    h = history(ctl)
    for k in ("journal_records", "journal_bytes", "journal_raw_bytes", "last_seq", "versions",
              "segments_with_history"):
        expect_eq(h[k], 0, f"history.{k} of a fresh pool")
    expect_eq(h["segment_bytes"], SEG, "history.segment_bytes")
    expect_eq(h["degraded"], False, "history.degraded")
    expect_eq(h["retention_seconds"], 7 * 86400, "history.retention_seconds (default 7d)")
    expect(h["from_ns"] <= h["to_ns"] <= h["now_ns"], f"window order: {h}")
    p = ctl.json("pool")
    expect_eq(len(p["tiers"]), 1, "one tier")
    t = p["tiers"][0]
    expect_eq(t["path"], pool, "tier 0 path")
    expect_eq(t["zone_bytes"], ZONE, "zone size (--zone-size 4M)")
    expect_eq(t["zones"], ZONES, "zones in a 160 MiB pool of 4 MiB zones")
    # Start-up writes a checkpoint (so that a zone generation is never
    # handed out twice across crashes): it holds one zone, nothing else does.
    expect_eq(t["zones_free"], ZONES - 1, "every zone free but the start-up checkpoint's")
    expect_eq(t["zones_by_kind"]["free"], ZONES - 1, "zones_by_kind.free")
    expect_eq(t["zones_by_kind"]["checkpoint"], 1, "zones_by_kind.checkpoint")
    expect_eq(p["checkpoints"], 1, "checkpoints of a fresh pool")
    expect_eq(p["capacity_bytes"], ZONES * ZONE, "capacity_bytes")
    expect(0 < p["bytes_used"] <= 4 * KiB, f"bytes_used of a fresh pool: {p['bytes_used']}")
    expect(p["utilisation_percent"] < 0.01, "utilisation of a fresh pool")
    s = ctl.json("status")["shadow"]
    expect_eq(s["enabled"], True, "status.shadow.enabled")
    expect_eq(s["pool"], [pool], "status.shadow.pool")
    expect_eq(s["cow_stalls"], 0, "status.shadow.cow_stalls of a fresh pool")
    expect_eq(s["budget_bytes_per_s"], 0, "status.shadow.budget (--shadow-budget 0)")
    expect_eq(s["busy_budget_bytes_per_s"], 0, "status.shadow.busy_budget: at most the budget")


def workload(d, ctl, m):
    """Known requests, each checked against the journal right after its reply."""
    h = connect(d)
    seen = [history(ctl)]

    def after(what):
        j = history(ctl)
        expect_eq(j["last_seq"], m.seq, f"last_seq after {what}")
        expect_eq(j["journal_records"], m.records, f"journal_records after {what}")
        expect_eq(j["journal_raw_bytes"], m.raw, f"journal_raw_bytes after {what}")
        expect(j["journal_bytes"] > seen[-1]["journal_bytes"],
               f"journal_bytes did not grow after {what}: {j['journal_bytes']}")
        expect_eq(j["segments_with_history"], len(m.segs), f"segments_with_history after {what}")
        expect(j["to_ns"] >= seen[-1]["to_ns"], f"the window's end went back after {what}")
        seen.append(j)

    rng = make_rng("pool")
    m.write(h, 3 * SEG, rng.randbytes(4096))
    after("a 4 KiB write to segment 3")
    m.write(h, 5 * SEG + 60 * KiB, rng.randbytes(8192))
    after("an 8 KiB write across segments 5 and 6")
    m.write(h, 3 * SEG + 8 * KiB, rng.randbytes(4096))
    after("a second write to segment 3")
    m.zero(h, 10 * SEG, SEG)
    after("WRITE_ZEROES of segment 10")
    m.trim(h, 12 * SEG + 4096, 8192)
    after("TRIM in segment 12")
    m.write(h, 14 * SEG + 512, rng.randbytes(3000), nbd.CMD_FLAG_FUA)
    after("a FUA write to segment 14")
    h.flush()
    j = history(ctl)
    expect_eq(j["last_seq"], m.seq, "a FLUSH takes no sequence number")
    expect_eq(j["journal_records"], m.records, "a FLUSH makes no journal record")
    for i in range(10):
        m.write(h, 20 * SEG + i * 4096, rng.randbytes(4096))
    after("10 writes to segment 20")
    # 16 requests in flight at once: all journaled before their replies.
    bufs = []
    for i in range(16):
        data = rng.randbytes(2048)
        b = nbd.Buffer.from_bytearray(bytearray(data))
        bufs.append((h.aio_pwrite(b, 22 * SEG + i * 2048), b))
        m.data[22 * SEG + i * 2048:22 * SEG + (i + 1) * 2048] = data
        m.raw += 2048
        m._journal(22 * SEG + i * 2048, 2048)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c, _ in bufs:
        expect(h.aio_command_completed(c), f"aio write {c} not completed")
    after("16 concurrent AIO writes to segment 22")
    h.flush()
    h.shutdown()


def check_journal_views(ctl, m):
    segs = sorted(m.segs)
    s = ctl.json("status")
    expect_eq(s["shadow"]["cow_stalls"], len(segs),
              "cow_stalls == distinct segments written (--shadow-budget 0)")
    expect_eq(s["shadow"]["versions_made"], 0, "no background versions with budget 0")
    expect_eq(s["ops"]["flush"]["requests"], 2, "FLUSH requests counted")
    expect_eq(s["ops"]["flush"]["errors"], 0, "FLUSH errors")
    expect_eq(s["ops"]["write"]["errors"], 0, "WRITE errors")
    h = history(ctl)
    expect_eq(h["versions"], len(segs), "one version per written segment")
    expect_eq(h["first_seq"], 0, "first_seq: the window starts at the epoch")
    lst = ctl.json("versions", "--limit", 0)
    expect_eq([e["id"] for e in lst["segments"]], segs, "segments listed by `versions`")
    expect_eq(lst["segments_with_history"], len(segs), "versions.segments_with_history")
    expect_eq(lst["more"], False, "versions.more")
    page = ctl.json("versions", "--limit", 2)
    expect_eq([e["id"] for e in page["segments"]], segs[:2], "versions --limit 2")
    expect_eq(page["more"], True, "versions --limit 2: more")
    for seg in segs:
        # Alternate the #ID and the offset form of --segment.
        target = f"#{seg}" if seg % 2 else str(seg * SEG + 100)
        v = ctl.json("versions", "--segment", target)["segment"]
        expect_eq(v["id"], seg, f"versions --segment {target}: id")
        expect_eq(v["offset"], seg * SEG, f"segment {seg}: offset")
        expect_eq(v["length"], SEG, f"segment {seg}: length")
        seqs = m.segs[seg]
        expect_eq(v["records"], len(seqs), f"segment {seg}: records")
        expect_eq(v["first_record_seq"], seqs[0], f"segment {seg}: first_record_seq")
        expect_eq(v["last_record_seq"], seqs[-1], f"segment {seg}: last_record_seq")
        expect_eq(len(v["versions"]), 1, f"segment {seg}: versions")
        ver = v["versions"][0]
        expect_eq(ver["cow"], True, f"segment {seg}: the version is a copy-on-first-write")
        expect_eq((ver["kind"], ver["depth"]), ("full", 0), f"segment {seg}: a full image")
        expect(ver["seq"] < seqs[0], f"segment {seg}: version seq {ver['seq']} not before "
                                     f"the first record {seqs[0]}")
        expect(ver["time_ns"] <= v["first_record_ns"], f"segment {seg}: version after record")
        expect(0 < ver["stored_bytes"], f"segment {seg}: stored_bytes")
        expect(len(ver["checksum"]) == 16, f"segment {seg}: checksum {ver['checksum']!r}")
    v = ctl.json("versions", "--segment", "#1")["segment"]
    expect_eq((v["records"], v["versions"]), (0, []), "an unwritten segment has no history")
    ctl.fails("out_of_range", "versions", "--segment", f"#{SIZE // SEG}")
    ctl.fails("out_of_range", "versions", "--segment", str(SIZE))
    rc, _, err = ctl.run("versions", "--segment", "#x1")
    expect_eq(rc, 2, f"exit code of a malformed --segment (a usage error): {err.strip()}")

    p = ctl.json("pool")
    t = p["tiers"][0]
    kinds = t["zones_by_kind"]
    expect_eq(sum(kinds.values()), t["zones"], f"zones by kind add up: {kinds}")
    expect_eq(kinds["free"], t["zones_free"], "zones_by_kind.free == zones_free")
    expect_eq(t["zones_used"], t["zones"] - t["zones_free"], "zones_used")
    expect(kinds["journal"] >= 1, f"a journal zone in use: {kinds}")
    expect(0 < p["bytes_used"] <= t["zones_used"] * ZONE, f"bytes_used {p['bytes_used']}")
    expect(abs(p["utilisation_percent"] - 100.0 * p["bytes_used"] / p["capacity_bytes"]) < 1e-9,
           f"utilisation {p['utilisation_percent']} is not bytes_used / capacity")
    expect(p["utilisation_percent"] > 0, "utilisation after writes")
    expect_eq(p["client_bytes_written"], m.raw, "pool.client_bytes_written")
    expect_eq(p["journal_raw_bytes"], m.raw, "pool.journal_raw_bytes")
    expect(p["pool_bytes_written"] > 0, "pool.pool_bytes_written")
    expect(1 <= p["group_commits"] <= m.seq, f"group_commits {p['group_commits']}")
    expect_eq((p["pool_errors"], p["primary_write_errors"], p["degraded"]), (0, 0, False),
              "no pool errors")
    z = ctl.json("pool", "--zones")
    expect_eq(len(z["zones"]), ZONES, "pool --zones lists every zone")
    expect_eq(sorted(e["index"] for e in z["zones"]), list(range(ZONES)), "zone indexes")
    expect_eq(sum(1 for e in z["zones"] if e["kind"] == "free"), t["zones_free"],
              "free zones in the list")
    expect(any(e["kind"] == "journal" and e["open"] for e in z["zones"]), "an open journal zone")


def check_data(d, m):
    h = connect(d)
    got = h.pread(SIZE, 0) if SIZE <= 32 * MiB else None
    h.shutdown()
    expect(bytes(got) == bytes(m.data), "the export reads back what was written")


def check_human(ctl, m):
    seg = sorted(m.segs)[0]
    out = ctl.text("history")
    for w in ("restorable", "sequence", "journal", f"{m.records} records", "versions", "state"):
        expect(w in out, f"`shadowctl history` does not mention {w!r}:\n{out}")
    out = ctl.text("versions", "--segment", f"#{seg}")
    for w in (f"#{seg}", "records", "versions", "full", "cow"):
        expect(w in out, f"`shadowctl versions --segment` does not mention {w!r}:\n{out}")
    out = ctl.text("versions")
    expect(str(seg) in out, f"`shadowctl versions` does not list segment {seg}:\n{out}")
    out = ctl.text("pool")
    for w in ("TIER", "ZONES", "FREE", "JOURNAL", "UTIL", "compression", "state"):
        expect(w in out, f"`shadowctl pool` does not mention {w!r}:\n{out}")
    out = ctl.text("status")
    for w in ("cow stalls", "pool", "shadowing"):
        expect(w in out, f"`shadowctl status` does not mention {w!r}:\n{out}")


def check_metrics(d, ctl):
    mt = scrape(d.metrics_url)
    st = ctl.json("status")["shadow"]
    h = history(ctl)
    p = ctl.json("pool")
    expect_eq(mt.get("shadowd_cow_stalls_total"), float(st["cow_stalls"]),
              "shadowd_cow_stalls_total")
    expect_eq(mt.get("shadowd_journal_records"), float(h["journal_records"]),
              "shadowd_journal_records")
    expect_eq(mt.get("shadowd_versions"), float(h["versions"]), "shadowd_versions")
    expect_eq(mt.get("shadowd_history_degraded"), 0.0, "shadowd_history_degraded")
    expect_eq(mt.get('shadowd_pool_zones{tier="0",state="free"}',
                     mt.get('shadowd_pool_zones{state="free",tier="0"}')),
              float(p["tiers"][0]["zones_free"]), "shadowd_pool_zones free")
    expect_eq(mt.get("shadowd_client_bytes_journaled_total"), float(p["client_bytes_written"]),
              "shadowd_client_bytes_journaled_total")


# --------------------------------------------------------------------------


def test():
    checks = Checks("pool")
    with tempfile.TemporaryDirectory(prefix="shadowd-pool-") as work:
        rng = make_rng("pool-backing")
        backing = os.path.join(work, "disk.img")
        write_random_file(backing, SIZE, rng)
        pool = make_pool_file(os.path.join(work, "pool.img"), POOL_SIZE)
        m = Model(backing)

        # No background shadowing on this pool: its figures change only
        # with the requests of the test.
        def daemon(name, init=True, force=False, extra=(), bk=backing, **kw):
            return Daemon(backing=bk, pool=pool, pool_init=init, pool_force=force,
                          extra_args=[*POOL_ARGS, "--shadow-budget", "0", *extra], name=name,
                          checks=checks, **kw)

        with checks.check("start-up refusals: a blank pool without --init, bad combinations"):
            check_usage_refusals(work, backing, pool)

        before = None
        with checks.check("--init formats a blank pool; writes are journaled"):
            with daemon("pool-fresh", metrics=True) as d:
                ctl = ShadowCtl(d)
                check_fresh(d, ctl, pool)
                workload(d, ctl, m)
                with checks.check("copy-on-first-write versions, records, zones"):
                    check_journal_views(ctl, m)
                with checks.check("data read back equals what was written (FLUSH, FUA)"):
                    check_data(d, m)
                with checks.check("human-readable history / versions / pool / status"):
                    check_human(ctl, m)
                with checks.check("metrics agree with the control socket"):
                    check_metrics(d, ctl)
                with checks.check("a second shadowd on the pool in use is refused"):
                    other = os.path.join(work, "other.img")
                    with open(other, "wb") as f:
                        f.truncate(SIZE)
                    rc, out = run_shadowd(["--backing", backing, "--pool", pool, "--init",
                                           *POOL_ARGS, "--unix", os.path.join(work, "y.sock"),
                                           "--control", os.path.join(work, "y.ctl")])
                    expect(rc != 0, "a second shadowd on the same pool started")
                    expect("in use" in out, f"the refusal does not say the pool is in use: {out}")
                before = history(ctl)
            expect_eq(d.returncode, 0, "exit code after SIGTERM")
        with checks.check("the backing file holds the data after a clean stop"):
            with open(backing, "rb") as f:
                expect(f.read() == bytes(m.data), "backing file differs from the model")

        with checks.check("a restart with --init uses the pool as it is (history kept)"):
            expect(before is not None, "no history from the first run")
            with daemon("pool-reinit") as d:
                ctl = ShadowCtl(d)
                expect("already holds" in d.stderr_text() and
                       "formatted the shadow pool" not in d.stderr_text(),
                       "--init on this backing's pool must not reformat it")
                after = history(ctl)
                for k in ("journal_records", "journal_bytes", "journal_raw_bytes", "last_seq",
                          "first_seq", "versions", "version_bytes", "segments_with_history",
                          "epoch_ns", "from_ns", "to_ns"):
                    expect_eq(after[k], before[k], f"history.{k} after the restart")
                v = ctl.json("versions", "--segment", "#3")["segment"]
                expect_eq((v["records"], v["first_record_seq"], v["last_record_seq"]),
                          (len(m.segs[3]), m.segs[3][0], m.segs[3][-1]),
                          "segment 3's records after the restart")
                h = connect(d)
                m.write(h, 3 * SEG, b"\x5a" * 4096)
                h.shutdown()
                j = history(ctl)
                expect_eq(j["last_seq"], m.seq, "the sequence goes on after the restart")
                expect_eq(j["journal_records"], m.records, "records after the restart")
                check_data(d, m)
                before = j

        with checks.check("a restart without --init uses the pool too"):
            with daemon("pool-noinit", init=False) as d:
                after = history(ShadowCtl(d))
                for k in ("journal_records", "last_seq", "versions", "epoch_ns"):
                    expect_eq(after[k], before[k], f"history.{k} after a restart without --init")

        other = os.path.join(work, "other.img")
        with open(other, "wb") as f:
            f.truncate(SIZE)
        sock = ["--unix", os.path.join(work, "z.sock"), "--control", os.path.join(work, "z.ctl")]
        with checks.check("a pool of another backing is refused and left unchanged"):
            head, whole = file_head(pool), sha256_file(pool)
            for init in ([], ["--init"]):
                rc, out = run_shadowd(["--backing", other, "--pool", pool, *init, *POOL_ARGS,
                                       *sock])
                expect_refused(rc, out, f"another backing's pool {init}", os.path.realpath(backing),
                               os.path.realpath(other))
                if init:
                    expect("--force" in out, f"the refusal does not mention --force: {out}")
            rc, out = run_shadowd(["--backing", backing, "--pool", pool, "--segment-size",
                                   str(2 * SEG), *sock])
            expect_refused(rc, out, "another segment size", "--segment-size")
            rc, out = run_shadowd(["--backing", backing, "--pool", pool, "--init",
                                   "--segment-size", str(2 * SEG), *sock])
            expect_refused(rc, out, "another segment size with --init", "--force")
            expect_eq(file_head(pool), head, "the pool's first 8 KiB after the refusals")
            expect_eq(sha256_file(pool), whole, "the pool file after the refusals")

        with checks.check("--init --force reformats a pool of another backing"):
            with daemon("pool-force", force=True, bk=other) as d:
                ctl = ShadowCtl(d)
                expect("reformatting" in d.stderr_text(), "no warning about reformatting")
                j = history(ctl)
                expect_eq((j["journal_records"], j["last_seq"], j["versions"]), (0, 0, 0),
                          "history after --force")
                expect(j["epoch_ns"] > before["epoch_ns"], "a new epoch after --force")
            rc, out = run_shadowd(["--backing", backing, "--pool", pool, *POOL_ARGS, *sock])
            expect_refused(rc, out, "the old backing on the reformatted pool",
                           os.path.realpath(other))

        with checks.check("background shadowing: read segments get versions, no stall"):
            pool2 = make_pool_file(os.path.join(work, "pool2.img"), POOL_SIZE)
            with Daemon(backing=backing, pool=pool2, pool_init=True,
                        extra_args=[*POOL_ARGS, "--shadow-budget-busy", "2M"],
                        name="pool-shadow", checks=checks) as d:
                ctl = ShadowCtl(d)
                st = ctl.json("status")["shadow"]
                expect_eq(st["budget_bytes_per_s"], 64 * MiB, "status.shadow.budget (default)")
                expect_eq(st["busy_budget_bytes_per_s"], 2 * MiB,
                          "status.shadow.busy_budget (--shadow-budget-busy 2M)")
                expect(isinstance(st["foreground_busy"], bool), f"foreground_busy {st}")
                h = connect(d)
                for _ in range(4):
                    h.pread(4096, 40 * SEG)
                ctl.json("config", "set", "alpha=1")  # rescores: the read segment ranks
                ver = wait_until(lambda: ctl.json("versions", "--segment", "#40")
                                 ["segment"]["versions"], "a version of segment 40")
                expect_eq(ver[0]["cow"], False, "the background version is not a cow")
                st = ctl.json("status")["shadow"]
                expect(st["versions_made"] >= 1, f"versions_made {st['versions_made']}")
                expect(st["bytes_read"] >= SEG, f"shadow bytes_read {st['bytes_read']}")
                h.pwrite(b"\x11" * 4096, 40 * SEG)
                st = ctl.json("status")["shadow"]
                expect_eq(st["cow_stalls"], 0, "a shadowed segment's first write is no stall")
                # Many records since the newest version make it stale: the
                # shadow thread makes a newer one (a delta).
                for i in range(20):
                    h.pwrite(bytes([i]) * 1024, 41 * SEG + i * 1024)

                def newer():
                    v = ctl.json("versions", "--segment", "#41")["segment"]["versions"]
                    return v if len(v) >= 2 else None
                vs = newer() or wait_until(newer, "a second version of segment 41")
                # Its first version is the copy-on-first-write of its first
                # write, or a copy ahead of it: the default policy's stream
                # model nominates segment 41 once 40 is written, and which
                # comes first is a race with the writes above.
                if not vs[0]["cow"]:
                    expect(ctl.json("status")["shadow"]["copies_ahead"] >= 1,
                           "segment 41's first version is neither a cow nor a copy ahead")
                expect_eq(vs[-1]["cow"], False, "segment 41's newer version is the shadow's")
                expect(vs[-1]["seq"] > vs[0]["seq"], "versions in sequence order")
                expect(vs[-1]["kind"] in ("full", "delta"), f"kind {vs[-1]['kind']}")
                h.shutdown()

        with checks.check("without --pool, history / versions / pool are unavailable"):
            with Daemon(size=4 * MiB, name="no-pool", checks=checks) as d:
                ctl = ShadowCtl(d)
                for cmd in (["history"], ["versions"], ["pool"]):
                    r = ctl.fails("unavailable", *cmd)
                    expect("--pool" in r.get("message", ""), f"message {r}")
                expect_eq(ctl.json("status")["shadow"], {"enabled": False}, "status.shadow")
        checks.finish()


if __name__ == "__main__":
    main(test)
