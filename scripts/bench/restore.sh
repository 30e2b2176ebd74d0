#!/usr/bin/env bash
# What restoring costs: shadowd on a backing file filled with random data and
# a shadow pool, after a scripted write history, in one run:
#
#   history     BENCH_ROUNDS rounds of fio randwrite through NBD (4k..64k
#               blocks, half compressible, offsets zipf-distributed with theta
#               1.1 so that a few hot segments take many records,
#               BENCH_ROUND_BYTES each), each followed by BENCH_IDLE seconds
#               without I/O (the time the shadow thread has for background
#               work); the time after every round is noted: T_mid after the
#               middle round, T_late after the next-to-last.
#   first byte  BENCH_TRIALS times: `shadowctl export --at T` (T one of the
#               noted times), connect with libnbd, read 4 KiB at a random
#               segment that was written after T (so it is reconstructed);
#               the time from starting shadowctl to the bytes read
#               (target < 100 ms), and its parts.
#   restore     `shadowctl restore --at T_mid --output FILE` (no --verify)
#               against a plain sequential copy of the same image on the same
#               disk (`dd bs=1M conv=fsync` of the backing file into a new
#               file), page cache dropped before each: bandwidth of both and
#               the ratio (target >= 0.7); and, for reference, nbdcopy of the
#               live export into a file (overlapped reads and writes).
#   rollback    1 % of the segments are written after a noted time T_rb, then
#               `shadowctl rollback --at T_rb --yes`: its time against the full
#               restore's (target <= 0.1), and the export's paused time.
#   reconstruct nbdcopy of an export at T_mid, then at T_late, to null: (the
#               whole device reconstructed) with the default shadowing
#               (proactive: the shadow thread copies segments ahead of need
#               first, then versions segments with many journal records) and,
#               on a second daemon given the same history, with
#               --shadow-budget 0 (copy-on-first-write versions only: every
#               read replays the journal since the segment's first write):
#               MiB/s and the replay cost (versions decoded, journal records
#               applied).
#
# Results also go, as JSON, to var/bench/restore-<timestamp>.json.
#
# Environment:
#   BUILD_DIR=DIR              build directory (default build/)
#   BENCH_SIZE=SIZE            backing file (default 1G)
#   BENCH_POOL_SIZE=SIZE       pool file, fallocated (default 4G)
#   BENCH_ROUNDS=N             write rounds (default 6)
#   BENCH_ROUND_BYTES=SIZE     bytes written per round (default 128M)
#   BENCH_IDLE=SECONDS         idle time after each round (default 3)
#   BENCH_TRIALS=N             first-byte trials (default 20)
#   BENCH_PARTS="..."          subset of: first-byte restore rollback reconstruct
#                              (default all; the history is always written)
#   BENCH_SHADOWD_ARGS="..."   extra shadowd options (both daemons)
#   BENCH_DIR=DIR, BENCH_KEEP=1   as in lib.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

size=${BENCH_SIZE:-1G}
pool_size=${BENCH_POOL_SIZE:-4G}
rounds=${BENCH_ROUNDS:-6}
round_bytes=${BENCH_ROUND_BYTES:-128M}
idle=${BENCH_IDLE:-3}
trials=${BENCH_TRIALS:-20}
read -ra parts <<<"${BENCH_PARTS:-first-byte restore rollback reconstruct}"
check_words part BENCH_PARTS "first-byte restore rollback reconstruct" "${parts[@]}"
has_part() { [[ " ${parts[*]} " == *" $1 "* ]]; }
(( rounds >= 2 )) || die "BENCH_ROUNDS must be at least 2"
need_tools fio nbdcopy fallocate dd
[[ -x $shadowd_bin && -x $shadowctl_bin ]] || build_shadowd "shadowd or shadowctl"
"$py" -c 'import nbd' 2>/dev/null || die "$py has no libnbd module (python3-libnbd)"

bench_workdir restore "$root/var/bench"
out_json=${BENCH_OUT:-$root/var/bench/restore-$stamp.json}
base=$work/base.img
backing=$work/backing.img
pool=$work/pool.img
sock=$sockdir/nbd.sock
ctl=$sockdir/ctl.sock
uri="nbd+unix:///disk?socket=$sock"
sctl() { "$shadowctl_bin" --socket "$ctl" "$@"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f\n", b - a }'; }

host_info 2
echo "restore: backing $size of random data, pool $pool_size; history of $rounds rounds of" \
     "$round_bytes randwrite (4k..64k, half compressible) + ${idle}s idle"
log "prefilling $size of random data"
preallocate "$base" "$size"
prefill "$base" "$size"

# start_daemon NAME EXTRA... : a fresh copy of the prefilled image, a fresh
# pool, shadowd on them.
start_daemon() {
  local name=$1
  shift
  rm -f "$backing" "$pool"
  cp --sparse=never "$base" "$backing"
  fallocate -l "$pool_size" "$pool" || die "cannot fallocate $pool_size at $pool"
  local -a cmd=("$shadowd_bin" --backing "$backing" --pool "$pool" --init --unix "$sock"
                --control "$ctl" --state-dir "$work/state-$name" --foreground --log-level info
                "$@" "${shadowd_extra[@]}")
  log "shadowd ($name): $(q "${cmd[@]}")"
  start_notified 30 "$work/shadowd-$name.log" "${cmd[@]}" ||
    die "shadowd did not start: $(tail -n 5 "$work/shadowd-$name.log")"
}

# write_history NAME : the scripted rounds; the noted times (epoch seconds,
# one per line) go to $work/times-NAME.
write_history() {
  local name=$1 i
  : >"$work/times-$name"
  for ((i = 1; i <= rounds; i++)); do
    fio --name="round$i" --ioengine=nbd "--uri=$uri" --rw=randwrite --bsrange=4k-64k \
        --random_distribution=zipf:1.1 --iodepth=16 "--io_size=$round_bytes" "--size=$size" --randseed="$i" \
        --buffer_compress_percentage=50 --refill_buffers --output-format=json \
        "--output=$work/fio-$name-$i.json" >"$work/fio-$name-$i.out" 2>&1 ||
      die "fio round $i failed: $(tail -n 5 "$work/fio-$name-$i.out")"
    sleep "$idle"  # idle time is part of the history, not a wait for something
    date +%s.%N >>"$work/times-$name"
  done
  sctl --json history >"$work/history-$name.json"
  sctl --json pool >"$work/pool-$name.json"
}

mid_time() { sed -n "$(( (rounds + 1) / 2 ))p" "$work/times-$1"; }

late_time() { sed -n "$(( rounds - 1 ))p" "$work/times-$1"; }

# reconstruct NAME WHEN : nbdcopy of an export at T_WHEN (mid or late) to
# null:, with its replay cost, into $work/reconstruct-NAME-WHEN.json and
# exports-rc-NAME-WHEN.json.
reconstruct() {
  local name=$1 when=$2 t0 t1 t
  t=$("${when}_time" "$name")
  sctl --json export --at "@$t" --name "rc-$name-$when" >/dev/null
  drop_page_cache "$backing"
  drop_page_cache "$pool"
  t0=$(date +%s.%N)
  nbdcopy "nbd+unix:///rc-$name-$when?socket=$sock" null: ||
    die "nbdcopy of the export at T_$when failed"
  t1=$(date +%s.%N)
  sctl --json exports >"$work/exports-rc-$name-$when.json"
  sctl --json unexport "rc-$name-$when" >/dev/null
  echo "{\"seconds\": $(elapsed "$t0" "$t1")}" >"$work/reconstruct-$name-$when.json"
}

# ---------------------------------------------------------------- proactive
start_daemon proactive
log "writing the history ($rounds rounds)"
write_history proactive
seg_bytes=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["segment_bytes"])' \
            "$work/history-proactive.json")

if has_part first-byte; then
  log "first byte: $trials trials"
  "$py" - "$shadowctl_bin" "$ctl" "$work/times-proactive" "$seg_bytes" "$trials" \
      "$work/first-byte.json" <<'EOF'
import json, random, subprocess, sys, time
import nbd
ctl_bin, ctl, times_file, seg_bytes, trials, out = sys.argv[1:]
seg_bytes, trials = int(seg_bytes), int(trials)
times = [float(l) for l in open(times_file).read().split()]
rng = random.Random(12345)
rows = []
for i in range(trials):
    t = rng.choice(times[:-1])  # a time with writes after it
    name = f"fb{i}"
    t0 = time.monotonic()
    r = subprocess.run([ctl_bin, "--socket", ctl, "--json", "export", "--at", f"@{t:.6f}",
                        "--name", name], capture_output=True, text=True)
    t1 = time.monotonic()
    if r.returncode != 0:
        sys.exit(f"export --at @{t} failed: {r.stdout} {r.stderr}")
    uri = json.loads(r.stdout)["uri_unix"]
    h = nbd.NBD()
    h.connect_uri(uri)
    t2 = time.monotonic()
    size = h.get_size()
    # A segment that was written after T: its source is not the primary.
    off = None
    for _ in range(64):
        cand = rng.randrange(size // seg_bytes) * seg_bytes
        flags = []
        h2 = nbd.NBD()
        h2.add_meta_context("shadowd:source")
        h2.connect_uri(uri)
        h2.block_status(seg_bytes, cand,
                        lambda ctx, o, entries, err: flags.extend(entries[1::2]) or 0)
        h2.shutdown()
        if flags and flags[0] != 0:
            off = cand
            break
    if off is None:
        sys.exit(f"no segment written after {t} found in 64 tries")
    # The probe above used another connection; the cache of the export may
    # hold nothing of this segment yet (block status does not reconstruct).
    t3 = time.monotonic()
    buf = h.pread(4096, off + 4096 * rng.randrange(seg_bytes // 4096))
    t4 = time.monotonic()
    assert len(buf) == 4096
    h.shutdown()
    subprocess.run([ctl_bin, "--socket", ctl, "unexport", name], check=True,
                   capture_output=True)
    rows.append({"export_ms": (t1 - t0) * 1e3, "connect_ms": (t2 - t1) * 1e3,
                 "read_ms": (t4 - t3) * 1e3, "total_ms": (t2 - t0 + t4 - t3) * 1e3})
json.dump(rows, open(out, "w"))
EOF
fi

if has_part restore; then
  log "full restore at T_mid, then a plain copy"
  drop_page_cache "$backing"
  drop_page_cache "$pool"
  t0=$(date +%s.%N)
  sctl --json restore --at "@$(mid_time proactive)" --output "$work/restored.img" --no-progress \
      >"$work/restore.json" 2>"$work/restore.err" ||
    die "restore failed: $(tail -n 5 "$work/restore.err")"
  t1=$(date +%s.%N)
  elapsed "$t0" "$t1" >"$work/restore.seconds"
  rm -f "$work/restored.img"
  drop_page_cache "$backing"
  sync
  t0=$(date +%s.%N)
  dd if="$backing" of="$work/plain.img" bs=1M conv=fsync status=none
  t1=$(date +%s.%N)
  elapsed "$t0" "$t1" >"$work/plain.seconds"
  rm -f "$work/plain.img"
  # The fastest copy tool here, over NBD, for reference: nbdcopy of the live
  # export (no reconstruction) into a file.
  drop_page_cache "$backing"
  sync
  t0=$(date +%s.%N)
  nbdcopy "$uri" "$work/nbdcopy.img" || die "nbdcopy of the live export failed"
  sync "$work/nbdcopy.img"
  t1=$(date +%s.%N)
  elapsed "$t0" "$t1" >"$work/nbdcopy.seconds"
  rm -f "$work/nbdcopy.img"
fi

if has_part rollback; then
  log "rollback of 1 % of the segments"
  sleep 1.1  # T_rb must be a second of its own, after the history's last write
  t_rb=$(date +%s.%N)
  sleep 0.1
  "$py" - "$uri" "$seg_bytes" <<'EOF'
import os, random, sys
import nbd
uri, seg = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
n = h.get_size() // seg
rng = random.Random(777)
for s in rng.sample(range(n), max(1, n // 100)):
    h.pwrite(os.urandom(65536), s * seg)
h.flush()
h.shutdown()
EOF
  t0=$(date +%s.%N)
  sctl --json rollback --at "@$t_rb" --yes >"$work/rollback.json" 2>"$work/rollback.err" ||
    die "rollback failed: $(tail -n 5 "$work/rollback.err")"
  t1=$(date +%s.%N)
  elapsed "$t0" "$t1" >"$work/rollback.seconds"
fi

if has_part reconstruct; then
  log "reconstruct (proactive)"
  reconstruct proactive mid
  reconstruct proactive late
fi
stop_server

# ---------------------------------------------------------------- cow-only
if has_part reconstruct; then
  start_daemon cow-only --shadow-budget 0
  log "writing the same history with --shadow-budget 0"
  write_history cow-only
  log "reconstruct (copy-on-first-write versions only)"
  reconstruct cow-only mid
  reconstruct cow-only late
  stop_server
fi

bench_py "$work" "$size" "$rounds" "$out_json" "$(q "$0")" "${parts[*]}" <<'EOF'
import statistics, sys
work, size, rounds, out_json, cmd, parts = sys.argv[1:]
parts = parts.split()
doc = {"size": size, "rounds": int(rounds), "parts": parts}
anomalies = []


def load(name):
    return json.load(open(f"{work}/{name}"))


def num(name):
    return float(open(f"{work}/{name}").read())


def verdict(ok):
    return "met" if ok else "MISSED"


for name in ("proactive", "cow-only"):
    try:
        h, p = load(f"history-{name}.json"), load(f"pool-{name}.json")
    except OSError:
        continue
    doc.setdefault("history", {})[name] = {"history": h, "pool": p}
    print(f"history ({name}): window {h['from']} .. {h['to']}; pool: "
          f"{p['version_bytes'] / 2**20:.0f} MiB of versions, {p['journal_bytes'] / 2**20:.0f} MiB "
          f"of journal, {p['pool_bytes_per_client_byte']:.2f} pool bytes per client byte")

if "first-byte" in parts:
    rows = load("first-byte.json")
    doc["first_byte"] = rows
    def stat(k):
        v = sorted(r[k] for r in rows)
        return statistics.median(v), v[int(0.9 * (len(v) - 1))], v[-1]
    print(f"\nfirst byte of an export at T ({len(rows)} trials; ms: median / p90 / max)")
    for k, what in (("export_ms", "shadowctl export"), ("connect_ms", "NBD connect"),
                    ("read_ms", "4 KiB read, reconstructed"), ("total_ms", "total")):
        m, p90, mx = stat(k)
        print(f"  {what:28s} {m:8.1f} {p90:8.1f} {mx:8.1f}")
    m, p90, mx = stat("total_ms")
    print(f"  target < 100 ms (median): {verdict(m < 100)}; max {mx:.1f} ms")

restore_s = None
if "restore" in parts:
    restore_s, plain_s = num("restore.seconds"), num("plain.seconds")
    r = load("restore.json")
    total = int(r["size_bytes"])
    rbw, pbw = total / restore_s / 2**20, total / plain_s / 2**20
    doc["restore"] = {"seconds": restore_s, "plain_seconds": plain_s, "summary": r}
    print(f"\nfull restore at T_mid ({total / 2**30:.2f} GiB)")
    print(f"  shadowctl restore --output  {restore_s:7.2f} s {rbw:8.1f} MiB/s")
    print(f"  dd bs=1M conv=fsync         {plain_s:7.2f} s {pbw:8.1f} MiB/s")
    nbw = total / num("nbdcopy.seconds") / 2**20
    doc["restore"]["nbdcopy_seconds"] = num("nbdcopy.seconds")
    print(f"  nbdcopy live export + sync  {num('nbdcopy.seconds'):7.2f} s {nbw:8.1f} MiB/s (reference)")
    print(f"  ratio to dd {rbw / pbw:.2f}x (target >= 0.7): {verdict(rbw / pbw >= 0.7)}; "
          f"to nbdcopy {rbw / nbw:.2f}x")
    rp = r.get("replay", {})
    print(f"  replay: {rp}")

if "rollback" in parts:
    rb_s = num("rollback.seconds")
    r = load("rollback.json")
    doc["rollback"] = {"seconds": rb_s, "reply": r}
    print(f"\nrollback of 1 % of the segments: {r.get('rewritten')} segments rewritten in "
          f"{rb_s:.3f} s (export paused {r.get('paused_ns', 0) / 1e6:.1f} ms)")
    if restore_s:
        print(f"  ratio to the full restore {rb_s / restore_s:.3f}x (target <= 0.1): "
              f"{verdict(rb_s / restore_s <= 0.1)}")

if "reconstruct" in parts:
    print("\nreconstruct the whole device (nbdcopy export -> null:)")
    for when, what in (("mid", f"T_mid (after round {(int(rounds) + 1) // 2})"),
                       ("late", f"T_late (after round {int(rounds) - 1})")):
        print(f"  at {what}")
        for name in ("proactive", "cow-only"):
            s = load(f"reconstruct-{name}-{when}.json")["seconds"]
            ex = [e for e in load(f"exports-rc-{name}-{when}.json")["exports"]
                  if e["name"] == f"rc-{name}-{when}"][0]
            total = ex["size_bytes"]
            doc.setdefault("reconstruct", {}).setdefault(when, {})[name] = {"seconds": s, "export": ex}
            print(f"    {name:10s} {s:6.2f} s {total / s / 2**20:7.1f} MiB/s  versions decoded "
                  f"{ex['versions_decoded']:5d}, journal records applied {ex['records_applied']:6d} "
                  f"({ex['segments_from_primary']} of {ex['segments_reconstructed']} segments "
                  f"from the backing)")

print(f"\ncommand: {cmd}")
finish(anomalies, "shadowd", doc, out_json)
EOF
