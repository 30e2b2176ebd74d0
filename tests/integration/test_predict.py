#!/usr/bin/python3
"""Predictive shadowing: `shadowctl simulate` and the live daemon's policy.

* simulate reads an MSR trace (plain and gzip), a blkparse text and a
  history export; --json carries every documented key; the human form
  names the stalls; a malformed line fails with FILE:LINE and prints no
  result; bad option values fail with a message naming the option.
* The simulator and the live daemon agree: a generated trace (writes at whole
  seconds, no segment left idle for exactly the retention, so no record sits
  on the window's edge) replayed through a real shadowd with a test clock
  (`debug advance` moves it a second at a time and runs a shadowing round),
  written through libnbd, gives the COW stall count that `shadowctl simulate`
  predicts for the same trace, policy and retention — within 5 % (the
  reactive policies here agree exactly) — for policies none and lru.
* A workload that repeats (the same areas written at the same offset of each
  period, driven with the test clock) stalls less in later periods than in
  the first, with the default policy; `tune run` then replays that history,
  never ends worse than it started, and changes the values in use, which
  `config get` shows; `tune off` stops periodic runs.

Synchronisation: each request's reply; `debug advance` replies after its
shadowing round. No sleeps.
"""

import gzip
import json
import os
import random
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd  # noqa: E402
from harness import (KiB, MiB, Checks, Daemon, ShadowCtl, expect, expect_eq,  # noqa: E402
                     log, main, make_pool_file, scrape, shadowctl_path)

SEG = 64 * KiB
SIZE = 16 * MiB
NSEG = SIZE // SEG
RETENTION = 20
FILETIME_EPOCH = 116444736000000000  # 1970-01-01 in 100 ns ticks since 1601
T0 = 1_790_000_000

KEYS = ["requests", "writes", "segment_writes", "stalls", "stalls_per_1k_writes", "stall_bytes",
        "copied_bytes", "pool_peak_bytes", "history_shrinks", "replay_records_mean",
        "replay_records_p99", "policy", "sim_seconds"]


def simulate(*args):
    cmd = [shadowctl_path(), "simulate", "--no-progress"] + [str(a) for a in args]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=300)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def msr_line(t_s, op, off, size):
    ticks = FILETIME_EPOCH + int(t_s * 10_000_000)
    return f"{ticks},host,0,{op},{off},{size},0\n"


def generate(seed, seconds):
    """[(second, offset, length)]: a hot set, a sequential stream, cold writes;
    no segment idle for exactly RETENTION seconds."""
    rng = random.Random(seed)
    last = {}
    out = []
    stream = NSEG // 2
    for sec in range(seconds):
        for _ in range(rng.randrange(0, 6)):
            pick = rng.random()
            if pick < 0.4:
                seg = rng.randrange(0, 8)
            elif pick < 0.6:
                seg = stream
                stream = NSEG // 2 + (stream + 1 - NSEG // 2) % (NSEG // 4)
            else:
                seg = rng.randrange(0, NSEG)
            if seg in last and sec - last[seg] == RETENTION:
                continue
            off = seg * SEG + rng.randrange(0, SEG // 4096) * 4096
            out.append((sec, off, 4096))
            last[seg] = sec
    return out


def replay_live(trace, policy, seconds, pool_dir):
    """Replays `trace` through a real shadowd; returns its COW stall count."""
    pool = os.path.join(pool_dir, f"pool-{policy}.img")
    make_pool_file(pool, 96 * MiB)
    with Daemon(size=SIZE, pool=pool, pool_init=True, metrics=True,
                extra_args=["--test-clock", "--segment-size", str(SEG), "--zone-size", "4M",
                            "--retention", f"{RETENTION}s", "--shadow-policy", policy,
                            "--shadow-budget", "0"]) as d:
        ctl = ShadowCtl(d)
        h = nbd.NBD()
        h.set_export_name("disk")
        h.connect_unix(d.unix_path)
        buf = b"\x5a" * 4096
        i = 0
        for sec in range(seconds):
            while i < len(trace) and trace[i][0] == sec:
                h.pwrite(buf, trace[i][1])
                i += 1
            ctl.json("debug", "advance", 1)
        h.shutdown()
        st = ctl.json("status")["shadow"]
        log(f"   live {policy}: {st['cow_stalls']} stalls, {st['bases_freed']} bases freed, "
            f"{st['speculative_hits']} speculative hits")
        # The policy's figures: what the kind of policy implies, and the
        # metrics endpoint agreeing with status.
        expect_eq(st["policy"], policy, "status policy")
        if policy == "none":
            expect(st["bases_freed"] > 0 and st["speculative_hits"] == 0 and st["bases_speculative"] == 0,
                   f"none frees bases, keeps none: {st}")
        else:
            expect(st["bases_freed"] == 0 and st["speculative_hits"] > 0, f"{policy} keeps bases: {st}")
        mt = scrape(d.metrics_url)
        for metric, key in (("shadowd_speculative_hits_total", "speculative_hits"),
                            ("shadowd_speculative_misses_total", "cow_stalls"),
                            ("shadowd_bases_freed_total", "bases_freed"),
                            ("shadowd_copies_ahead_total", "copies_ahead"),
                            ('shadowd_bases{kind="pinned"}', "bases_pinned"),
                            ('shadowd_bases{kind="speculative"}', "bases_speculative")):
            expect_eq(mt.get(metric), float(st[key]), metric)
        return st["cow_stalls"]


def test():
    checks = Checks("predict")
    tmp = tempfile.mkdtemp(prefix="shadowd-predict-")
    seconds = 240
    trace = generate(7, seconds)
    msr = os.path.join(tmp, "trace.csv")
    with open(msr, "w") as f:
        for sec, off, ln in trace:
            f.write(msr_line(T0 + sec, "Write", off, ln))
    log(f"trace: {len(trace)} writes over {seconds} s")

    with checks.check("simulate: msr (plain and gzip) with --json carries every key"):
        rc, out, err = simulate("--trace", msr, "--device-size", SIZE, "--segment-size", "64K",
                                "--retention", f"{RETENTION}s", "--policy", "none", "--json")
        expect_eq(rc, 0, f"exit ({err})")
        j = json.loads(out)
        for k in KEYS:
            expect(k in j, f"key {k} missing: {sorted(j)}")
        expect_eq(j["requests"], len(trace), "requests")
        expect_eq(j["writes"], len(trace), "writes")
        expect_eq(j["policy"], "none", "policy")
        gz = msr + ".gz"
        with open(msr, "rb") as f, gzip.open(gz, "wb") as g:
            g.write(f.read())
        rc2, out2, _ = simulate("--trace", gz, "--device-size", SIZE, "--segment-size", "64K",
                                "--retention", f"{RETENTION}s", "--policy", "none", "--json")
        expect_eq(rc2, 0, "gzip exit")
        expect_eq(json.loads(out2)["stalls"], j["stalls"], "same stalls from the gzip file")

    with checks.check("simulate: blkparse text and a history export"):
        blk = os.path.join(tmp, "trace.blk")
        with open(blk, "w") as f:
            for n, (sec, off, ln) in enumerate(trace):
                f.write(f"  8,0    0 {n + 1:8d} {sec:5d}.000000000  123  Q  WS {off // 512} + {ln // 512} [postgres]\n")
        rc, out, err = simulate("--trace", blk, "--segment-size", "64K", "--json")
        expect_eq(rc, 0, f"blkparse exit ({err})")
        j = json.loads(out)
        expect_eq(j["format"], "blkparse", "detected format")
        expect_eq(j["writes"], len(trace), "blkparse writes")
        hist = os.path.join(tmp, "history.csv")
        with open(hist, "w") as f:
            f.write("timestamp,segment,op,count,bytes\n")
            f.write(f"{T0},3,write,4,16384\n{T0 + 60},5,read,2,8192\n")
        rc, out, err = simulate("--trace", hist, "--segment-size", "64K", "--json")
        expect_eq(rc, 0, f"history exit ({err})")
        j = json.loads(out)
        expect_eq((j["format"], j["writes"], j["reads"]), ("history", 4, 2), "history counts")

    with checks.check("simulate: the human form names the stalls"):
        rc, out, err = simulate("--trace", msr, "--segment-size", "64K")
        expect_eq(rc, 0, f"exit ({err})")
        expect("stalls" in out and "per 1000 segment-writes" in out, out)

    with checks.check("simulate: a malformed line fails with FILE:LINE, no result"):
        bad = os.path.join(tmp, "bad.csv")
        with open(msr) as f:
            lines = f.readlines()
        lines.insert(5, "128166372003061629,host,0,Write,notanumber,4096,0\n")
        with open(bad, "w") as f:
            f.writelines(lines)
        rc, out, err = simulate("--trace", bad, "--json")
        expect_eq(rc, 1, "exit")
        expect(f"{bad}:6:" in err, f"line number in {err!r}")
        expect_eq(out, "", "nothing on stdout")

    with checks.check("simulate: bad values name the option"):
        for args, word in ((["--budget", "fast"], "--budget"), (["--retention", "soon"], "--retention"),
                           (["--pool-capacity", "-5%"], "--pool-capacity"),
                           (["--policy", "belady"], "belady"), (["--segment-size", "3000"], "--segment-size"),
                           (["--device-size", "4K"], "past the device size")):
            rc, out, err = simulate("--trace", msr, *args)
            expect(rc != 0, f"{args}: exit {rc}")
            expect(word in err, f"{args}: {err!r}")
        rc, out, err = simulate("--trace", os.path.join(tmp, "missing.csv"))
        expect(rc == 1 and "missing.csv" in err, f"missing file: {rc} {err!r}")

    for policy in ("none", "lru"):
        with checks.check(f"the live daemon stalls as simulate predicts ({policy})"):
            rc, out, err = simulate("--trace", msr, "--device-size", SIZE, "--segment-size", "64K",
                                    "--retention", f"{RETENTION}s", "--policy", policy,
                                    "--budget", "0", "--json")
            expect_eq(rc, 0, f"simulate exit ({err})")
            predicted = json.loads(out)["stalls"]
            live = replay_live(trace, policy, seconds, tmp)
            log(f"   {policy}: simulate {predicted}, live {live}")
            expect(predicted > 0, "the trace stalls at all")
            expect(abs(live - predicted) <= 0.05 * predicted, f"live {live} vs simulated {predicted}")

    with checks.check("a repeating workload stalls less in later periods than in the first"):
        period = 60
        pool = os.path.join(tmp, "pool-repeat.img")
        make_pool_file(pool, 96 * MiB)
        with Daemon(size=SIZE, pool=pool, pool_init=True, metrics=True,
                    extra_args=["--test-clock", "--segment-size", str(SEG), "--zone-size", "4M",
                                "--retention", f"{RETENTION}s", "--shadow-budget", "64M",
                                "--shadow-budget-busy", "64M"]) as d:
            ctl = ShadowCtl(d)
            h = nbd.NBD()
            h.set_export_name("disk")
            h.connect_unix(d.unix_path)
            buf = b"\xa5" * SEG
            per_period = []
            for p in range(4):
                before = ctl.json("status")["shadow"]["cow_stalls"]
                for sec in range(period):
                    # Seconds 5..14 of each period: a run through segments 64..103.
                    if 5 <= sec < 15:
                        for k in range(4):
                            h.pwrite(buf, (64 + (sec - 5) * 4 + k) * SEG)
                    # Second 30: a scattered set.
                    if sec == 30:
                        for s in (150, 170, 190, 210, 230):
                            h.pwrite(buf[:4096], s * SEG)
                    ctl.json("debug", "advance", 1)
                per_period.append(ctl.json("status")["shadow"]["cow_stalls"] - before)
            h.shutdown()
            log(f"   stalls per period: {per_period}")
            expect(per_period[0] > 0, "the first period stalls")
            expect(max(per_period[1:]) < per_period[0], f"later periods stall less: {per_period}")

            # Auto-tuning on the history this workload left.
            t0 = ctl.json("tune", "status")
            expect_eq((t0["enabled"], t0["runs"]), (True, 0), "tuning on, not run yet")
            t1 = ctl.json("tune", "run")
            log(f"   tune run: {t1['last']}")
            expect_eq(t1["runs"], 1, "one run")
            expect(t1["last"]["requests"] > 0, "the history was replayed")
            expect(len(t1["last"]["trials"]) >= 5, "settings tried")
            expect(t1["last"]["stalls_after"] <= t1["last"]["stalls_before"], "never worse")
            changed = {k: (t0["in_use"][k], t1["in_use"][k]) for k in t0["in_use"]
                       if t0["in_use"][k] != t1["in_use"][k]}
            log(f"   changed: {changed}")
            expect(changed, "auto-tuning changed the values in use")
            cfg = ctl.json("config", "get")["config"]
            for k in ("alpha", "beta", "gamma", "baseline", "max_versions_per_segment"):
                expect_eq(cfg[k], t1["in_use"][k], f"config get {k}")
            st = ctl.json("status")["shadow"]
            expect(st["copies_ahead"] > 0 and st["copies_ahead_used"] > 0, f"copies ahead: {st}")
            expect(set(st["forecast_error"]) == {"sequential", "ewma"}, f"forecast error: {st}")
            mt = scrape(d.metrics_url)
            expect_eq(mt.get("shadowd_tune_runs_total"), 1.0, "shadowd_tune_runs_total")
            expect_eq(mt.get("shadowd_copies_ahead_used_total"), float(st["copies_ahead_used"]),
                      "shadowd_copies_ahead_used_total")
            for k in ("min_value", "seq_ahead", "max_versions_per_segment"):
                expect_eq(mt.get(f'shadowd_tuned_value{{name="{k}"}}'), float(t1["in_use"][k]),
                          f"shadowd_tuned_value {k}")
            expect('shadowd_forecast_error{predictor="ewma"}' in mt, "forecast error metric")
            expect_eq(ctl.json("tune", "off")["enabled"], False, "tune off")
            expect("auto-tuning: off" in ctl.text("tune"), "human form")

    checks.finish()


if __name__ == "__main__":
    main(test)
