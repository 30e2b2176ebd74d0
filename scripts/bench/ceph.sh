#!/usr/bin/env bash
# The replica's cost and the restore from it, on a throwaway single-node Ceph
# cluster (scripts/ceph-cluster.sh, memstore OSD, pool "shadowd" of size 1),
# in one run:
#
# 1. Write throughput: fio --ioengine=nbd over a Unix socket, 4k randwrite at
#    iodepth 32 and 1 MiB sequential write at iodepth 8 (BENCH_RUNTIME each),
#    against
#      shadowd          a local sparse backing file and a local pool, no replica
#      shadowd+async    the same with --replica rbd:shadowd/replica (in sync first)
#      shadowd+sync     the same with --replica-sync
#      qemu-nbd rbd     qemu-nbd -f raw serving an RBD image of the same size
#                       directly (Ceph's own path, for reference)
#    Prints IOPS or MB/s and the ratios to shadowd without a replica (target:
#    async >= 0.9), and for the replica rows the replication lag p50/p99 over
#    the run (target p99 <= 5 s) and whether it fell behind.
# 2. Restore from the replica: after the last row, `shadowctl restore
#    --from rbd:... --at now --output FILE` of the whole device against
#    `rbd export` of two images of the same size: the one qemu-nbd served
#    (written by the same fio jobs; target >= 0.7) and one imported in
#    order; each export also with sync(1) after it (the restore ends
#    synced, the export does not); medians of BENCH_RESTORE_RUNS
#    alternating runs.
#
# Results also go, as JSON, to var/bench/ceph-<timestamp>.json.
#
# Environment:
#   BUILD_DIR=DIR            build directory (default build/)
#   BENCH_SIZE=SIZE          device size (default 1G)
#   BENCH_POOL_SIZE=SIZE     local pool file (default 1G)
#   BENCH_RUNTIME=S          seconds per fio job (default 15)
#   BENCH_OSD_SIZE=SIZE      what the memstore OSD may hold (default 12G)
#   BENCH_RESTORE_RUNS=N     restores and exports timed, alternating (default 3)
#   BENCH_SHADOWD_ARGS="..." extra shadowd options
#   BENCH_DIR=DIR, BENCH_KEEP=1   as in lib.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

size=${BENCH_SIZE:-1G}
pool_size=${BENCH_POOL_SIZE:-1G}
osd_size=${BENCH_OSD_SIZE:-12G}
restore_runs=${BENCH_RESTORE_RUNS:-3}
[[ $restore_runs =~ ^[1-9][0-9]*$ ]] || die "BENCH_RESTORE_RUNS must be a whole number >= 1"
need_tools fio rbd qemu-nbd fallocate
[[ -x $shadowd_bin && -x $shadowctl_bin ]] || build_shadowd "shadowd or shadowctl"
size_b=$(to_bytes "$size")
pool_b=$(to_bytes "$pool_size")
mib=$((1 << 20))

bench_workdir ceph "$root/var/bench"
out_json=${BENCH_OUT:-$root/var/bench/ceph-$stamp.json}
cluster=$sockdir/ceph
ceph_up=0
stop_cluster() {
  if ((ceph_up)); then scripts/ceph-cluster.sh stop "$cluster" >/dev/null 2>&1 || true; fi
}
trap 'rc=$?; stop_cluster; (exit "$rc"); cleanup' EXIT
host_info 2
log "starting the Ceph cluster"
scripts/ceph-cluster.sh start "$cluster" --size "$osd_size" >"$work/cluster.env" 2>"$work/cluster.log" ||
  die "the cluster did not start: $(tail -n 5 "$work/cluster.log")"
ceph_up=1
conf=$(sed -n 's/^CEPH_CONF=//p' "$work/cluster.env")
rbdc() { rbd -c "$conf" "$@"; }
rbdc create --size "$((size_b / mib))M" shadowd/direct
rbdc create --size "$(((mib + pool_b + size_b) / mib))M" shadowd/replica
replica="rbd:shadowd/replica:conf=$conf"
sock=$sockdir/nbd.sock
ctl=$sockdir/ctl.sock
uri="nbd+unix:///?socket=$sock"
sctl() { "$shadowctl_bin" --socket "$ctl" "$@"; }

# start_shadowd NAME EXTRA... : fresh sparse backing and pool, shadowd on them.
start_shadowd() {
  local name=$1
  shift
  rm -f "$work/backing.img" "$work/pool.img"
  truncate -s "$size" "$work/backing.img"
  fallocate -l "$pool_size" "$work/pool.img"
  local -a cmd=("$shadowd_bin" --backing "$work/backing.img" --pool "$work/pool.img" --init
                --unix "$sock" --control "$ctl" --state-dir "$work/state" --foreground
                --log-level info "$@" "${shadowd_extra[@]}")
  log "shadowd ($name): $(q "${cmd[@]}")"
  start_notified 60 "$work/shadowd-$name.log" "${cmd[@]}" ||
    die "shadowd did not start: $(tail -n 5 "$work/shadowd-$name.log")"
}

wait_in_sync() {
  local i
  for ((i = 0; i < 1200; i++)); do
    if sctl --json status | "$py" -c '
import json, sys
r = json.load(sys.stdin)["replica"]
sys.exit(0 if r["state"] == "in-sync" and r["backlog_bytes"] == 0 else 1)'; then
      return 0
    fi
    sleep 0.25
  done
  die "the replica did not come in sync"
}

run_jobs() {  # NAME: the two fio jobs against $uri
  local name=$1 job
  for job in randwrite seqwrite; do
    fio_cmd "$job" "$uri"
    "${fcmd[@]}" "--output=$work/fio-$name-$job.json" >"$work/fio-$name-$job.out" 2>&1 ||
      die "fio $job ($name) failed: $(tail -n 5 "$work/fio-$name-$job.out")"
    if [[ $name == shadowd+* ]]; then
      wait_in_sync
      sctl --json status >"$work/status-$name-$job.json"
    fi
  done
}

start_shadowd plain
run_jobs shadowd
stop_server

start_shadowd async --replica "$replica"
wait_in_sync
run_jobs shadowd+async
stop_server
start_shadowd sync --replica "$replica" --replica-sync
wait_in_sync
run_jobs shadowd+sync
stop_server

log "qemu-nbd on an RBD image"
start_polled 30 "$work/qemu-nbd.log" "$uri" \
  qemu-nbd -f raw -t -e 4 --cache=none "--socket=$sock" "rbd:shadowd/direct:conf=$conf" ||
  die "qemu-nbd did not start: $(tail -n 5 "$work/qemu-nbd.log")"
run_jobs qemu-nbd-rbd
stop_server

# Restore from the replica (the sync run's last state) against rbd export of
# two images of the same size: "direct", which took the same fio jobs
# through qemu-nbd (objects written the same way: on memstore a randomly
# written image reads at about half the speed of one written in order), and
# "fresh", imported in one sequential pass. RESTORE_RUNS times each,
# alternating; the medians are compared (this VM's disk varies a lot from
# run to run). The restore ends with the output synced (fdatasync); rbd
# export does not sync, so each export is also timed with sync(1) after it.
rm -f "$work"/*.seconds
preallocate "$work/random.img" "$size"
prefill "$work/random.img" "$size"
rbdc import --no-progress "$work/random.img" shadowd/fresh >/dev/null 2>&1 ||
  die "rbd import failed"
rm -f "$work/random.img"
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f\n", b - a }'; }
for ((run = 1; run <= restore_runs; run++)); do
  log "restore --from the replica, then rbd export of direct and fresh (run $run of $restore_runs)"
  sync
  t0=$(date +%s.%N)
  SHADOWD=$shadowd_bin "$shadowctl_bin" --json restore --from "$replica" --at now \
    --output "$work/restored.img" --no-progress >"$work/restore.json" 2>"$work/restore.err" ||
    die "restore --from failed: $(tail -n 5 "$work/restore.err")"
  t1=$(date +%s.%N)
  elapsed "$t0" "$t1" >>"$work/restore.seconds"
  rm -f "$work/restored.img"
  for image in direct fresh; do
    sync
    t0=$(date +%s.%N)
    rbdc export --no-progress "shadowd/$image" "$work/exported.img" 2>"$work/export.err" ||
      die "rbd export failed: $(tail -n 5 "$work/export.err")"
    t1=$(date +%s.%N)
    sync
    t2=$(date +%s.%N)
    elapsed "$t0" "$t1" >>"$work/export-$image.seconds"
    elapsed "$t0" "$t2" >>"$work/export-$image-sync.seconds"
    rm -f "$work/exported.img"
  done
done

bench_py "$work" "$size" "$runtime" "$out_json" "$(q "$0")" <<'EOF'
import statistics
import sys
work, size, runtime, out_json, cmd = sys.argv[1:]
doc = {"size": size, "runtime_s": int(runtime), "rows": {}}
anomalies = []
rows = ["shadowd", "shadowd+async", "shadowd+sync", "qemu-nbd-rbd"]
print(f"\nwrite throughput (fio --ioengine=nbd, {runtime} s per job, device {size})")
print(f"{'':16s} {'4k randwrite qd32 IOPS':>24s} {'1M seqwrite qd8 MB/s':>22s}")
fig = {}
for r in rows:
    vals = []
    for job in ("randwrite", "seqwrite"):
        fj, f = fio_figures(f"{work}/fio-{r}-{job}.json", job, ["iops", "bw_bytes", "io_errors"])
        if f["io_errors"]:
            anomalies.append(f"{r} {job}: fio errors {f['io_errors']}")
        vals.append(f["iops"] if job == "randwrite" else f["bw_bytes"] / 1e6)
    fig[r] = vals
    doc["rows"][r] = {"randwrite_iops": vals[0], "seqwrite_mb_s": vals[1]}
    print(f"{r:16s} {vals[0]:24,.0f} {vals[1]:22,.1f}")
base = fig["shadowd"]
for r in ("shadowd+async", "shadowd+sync", "qemu-nbd-rbd"):
    ra, rs = fig[r][0] / base[0], fig[r][1] / base[1]
    tgt = " (target >= 0.9: " + ("met" if min(ra, rs) >= 0.9 else "MISSED") + ")" if r == "shadowd+async" else ""
    print(f"  {r} / shadowd: {ra:.2f}x randwrite, {rs:.2f}x seqwrite{tgt}")
print("\nreplication lag over each replica run (status after it drained)")
worst = 0.0
for r in ("shadowd+async", "shadowd+sync"):
    for job in ("randwrite", "seqwrite"):
        st = json.load(open(f"{work}/status-{r}-{job}.json"))["replica"]
        worst = max(worst, st["lag_p99_seconds"])
        doc["rows"][r][f"{job}_replica"] = st
        print(f"  {r:14s} {job:9s} p50 {st['lag_p50_seconds']:.3f} s  p99 {st['lag_p99_seconds']:.3f} s  "
              f"overflows {st['overflows']}  sync lapses {st['sync_lapses']}")
print(f"  lag p99 target <= 5 s: {'met' if worst <= 5 else 'MISSED'}")
def runs(name):
    return [float(x) for x in open(f"{work}/{name}.seconds").read().split()]
def fmt(xs):
    return ", ".join(f"{x:.2f}" for x in xs)
r = json.load(open(f"{work}/restore.json"))
total = r["size_bytes"]
timed = {"restore --from (start, stop, fdatasync included)": runs("restore")}
for image, what in (("direct", "same fio jobs"), ("fresh", "imported in order")):
    timed[f"rbd export {image} ({what})"] = runs(f"export-{image}")
    timed[f"rbd export {image} + sync"] = runs(f"export-{image}-sync")
med = {k: statistics.median(v) for k, v in timed.items()}
doc["restore"] = {"median_seconds": med, "runs": timed, "summary": r}
print(f"\nrestore --from the replica and rbd export ({total / 2**30:.2f} GiB), median of "
      f"{len(timed['restore --from (start, stop, fdatasync included)'])} runs each")
for k, v in timed.items():
    print(f"  {k:52s} {med[k]:6.2f} s {total / med[k] / 2**20:8.1f} MiB/s  [{fmt(v)}]")
rs = med["restore --from (start, stop, fdatasync included)"]
ed, ef = med["rbd export direct (same fio jobs)"], med["rbd export fresh (imported in order)"]
eds, efs = med["rbd export direct + sync"], med["rbd export fresh + sync"]
print(f"  ratio to rbd export of direct {ed / rs:.2f}x (target >= 0.7: {'met' if ed / rs >= 0.7 else 'MISSED'}); "
      f"with sync {eds / rs:.2f}x")
print(f"  ratio to rbd export of fresh  {ef / rs:.2f}x; with sync {efs / rs:.2f}x")
print(f"\ncommand: {cmd}")
finish(anomalies, "every server", doc, out_json)
EOF
