#!/usr/bin/env bash
# The peers benchmark with the journal and shadowing on: shadowd with a shadow
# pool (--pool FILE --init, full history) against qemu-nbd on the same kind of
# backing file, in one run, and what the history costs in pool writes.
#
# 1. Throughput (like nbd-peers.sh): fio --ioengine=nbd over a Unix socket,
#    4k randwrite at iodepth 32 and 1 MiB sequential write at iodepth 8, on a
#    preallocated backing file filled with random data. Per job: qemu-nbd, then
#    shadowd on a freshly formatted pool, twice in a row on that pool:
#      cold  the pool is new, so the first write to every segment copies the
#            segment's old content into the pool first (a COW stall);
#      warm  the same job again: the segments have versions, no more COW; the
#            steady state of a daemon that has been running.
#    Prints IOPS (4k) or MB/s (1 MiB) per server and the ratio shadowd/qemu-nbd
#    (target >= 0.9 with full history on), then for every shadowd row what
#    `shadowctl --json status|history|pool` counted during it: pool bytes
#    written per client byte written, journal compression, COW stalls, versions,
#    group commits, and where the CPU went (per shadowd thread, from /proc;
#    thread roles from one gdb backtrace at start).
# 2. Compressibility: a data set copied onto a fresh, sparse (all-zero) backing
#    with nbdcopy, once through qemu-nbd (for the copy time) and once through
#    shadowd on a fresh pool:
#      tarball  realistic compressible data: `tar -cf - /usr/share | head -c N`
#      random   the same number of bytes from /dev/urandom
#    Prints pool bytes per client byte at the end of the copy and after
#    BENCH_SETTLE seconds of background shadowing (target < 0.6 for tarball),
#    COW stalls, and the copy time through each server.
#
# Results also go, as JSON, to var/bench/journal-<timestamp>.json.
#
# Environment:
#   BUILD_DIR=DIR              build directory (default build/); scripts/build.sh
#                              is run only if DIR/daemon/shadowd or shadowctl is missing
#   BENCH_SIZE=SIZE            backing file size (default 2G)
#   BENCH_POOL_SIZE=SIZE       pool file size, fallocated (default 8G; smaller when
#                              the file system has less room, 2G at least)
#   BENCH_DIR=DIR              where the work directory goes (default var/ in the
#                              repository; the pool is there too); removed at exit
#   BENCH_RUNTIME=SECONDS      measured time per fio job (default 15)
#   BENCH_RAMP=SECONDS         fio ramp_time per job, not measured (default 2)
#   BENCH_PREFILL=0|1          fill the part 1 backing file with random data (default 1)
#   BENCH_JOBS="..."           subset/order of: randwrite seqwrite (default both)
#   BENCH_PASSES="..."         subset/order of: cold warm (default both)
#   BENCH_PARTS="..."          subset of: throughput compress (default both)
#   BENCH_DATASETS="..."       subset/order of: tarball random (default both)
#   BENCH_DATA_SIZE=SIZE       bytes per data set (default 512M; at most BENCH_SIZE)
#   BENCH_DATA_SRC=DIR         directory the tarball is made of (default /usr/share)
#   BENCH_SETTLE=SECONDS       wait after a copy before the "settled" figures (default 5)
#   BENCH_COPY_QEMU=0|1        also copy each data set through qemu-nbd (default 1)
#   BENCH_SHADOWD_ARGS="..."   extra shadowd options, e.g. "--shadow-budget 32M"
#   BENCH_THREADS=0|1          per-thread CPU and thread roles via gdb (default 1)
#   BENCH_TOP=0|1              a `top -H` sample of shadowd mid-job (default 1)
#   BENCH_PERF=0|1             `perf record -g` of shadowd during each shadowd job,
#                              top symbols in the report (default 0: it perturbs)
#   BENCH_OUT=FILE             JSON result file (default var/bench/journal-<ts>.json)
#   BENCH_KEEP=1               keep the work directory (files, logs, fio JSON, samples)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

pool_size=${BENCH_POOL_SIZE:-8G}
prefill=${BENCH_PREFILL:-1}
read -ra jobs <<<"${BENCH_JOBS:-randwrite seqwrite}"
read -ra passes <<<"${BENCH_PASSES:-cold warm}"
read -ra parts <<<"${BENCH_PARTS:-throughput compress}"
read -ra datasets <<<"${BENCH_DATASETS:-tarball random}"
data_size=${BENCH_DATA_SIZE:-512M}
data_src=${BENCH_DATA_SRC:-/usr/share}
settle=${BENCH_SETTLE:-5}
copy_qemu=${BENCH_COPY_QEMU:-1}
want_threads=${BENCH_THREADS:-1}
want_top=${BENCH_TOP:-1}
want_perf=${BENCH_PERF:-0}
out_json=${BENCH_OUT:-$root/var/bench/journal-$stamp.json}

# --- prerequisites --------------------------------------------------------
check_words job BENCH_JOBS "randwrite seqwrite" "${jobs[@]}"
check_words pass BENCH_PASSES "cold warm" "${passes[@]}"
check_words part BENCH_PARTS "throughput compress" "${parts[@]}"
check_words "data set" BENCH_DATASETS "tarball random" "${datasets[@]}"
[[ $settle =~ ^[0-9]+$ ]] || die "BENCH_SETTLE must be a whole number of seconds"
want_throughput=0 want_compress=0
[[ " ${parts[*]} " != *" throughput "* ]] || want_throughput=1
[[ " ${parts[*]} " != *" compress "* ]] || want_compress=1
need=(fio nbdinfo qemu-nbd fallocate numfmt)
(( want_compress )) && need+=(nbdcopy tar)
need_tools "${need[@]}"
if [[ $want_perf == 1 ]] && ! command -v perf >/dev/null; then
  log "perf not found: BENCH_PERF=1 ignored"; want_perf=0
fi
if [[ $want_threads == 1 ]] && ! command -v gdb >/dev/null; then
  log "gdb not found: thread roles unknown (per-thread CPU still measured)"
fi
if [[ ! -x $shadowd_bin || ! -x $shadowctl_bin ]]; then
  build_shadowd "$shadowd_bin or $shadowctl_bin"
fi
[[ -x $shadowctl_bin ]] || die "build did not produce $shadowctl_bin"

size_bytes=$(to_bytes "$size")
pool_bytes=$(to_bytes "$pool_size")
data_bytes=$(to_bytes "$data_size")
(( size_bytes >= 64 << 20 )) || die "BENCH_SIZE too small (64M at least)"
(( data_bytes <= size_bytes )) || die "BENCH_DATA_SIZE ($data_size) is larger than BENCH_SIZE ($size)"
(( data_bytes >= 1 << 20 )) || die "BENCH_DATA_SIZE too small (1M at least)"

# --- work directory, room ----------------------------------------------------
bench_workdir journal "$(dirname "$out_json")"
# Room: the part 1 backing (written in full), the pool (fallocated), the fill
# backing of part 2 (written up to the data set), the data sets, 1 GiB spare.
avail=$(( $(df --output=avail -B1 "$work" | tail -n 1) ))
others=$(( 1 << 30 ))
(( want_throughput )) && others=$(( others + size_bytes ))
(( want_compress )) && others=$(( others + data_bytes * (1 + ${#datasets[@]}) ))
if (( avail < others + pool_bytes )); then
  fit=$(( (avail - others) / (1 << 30) * (1 << 30) ))
  (( fit >= 2 << 30 )) ||
    die "not enough room in $work: $(numfmt --to=iec "$avail") free, need $(numfmt --to=iec $(( others + (2 << 30) ))) at least"
  log "only $(numfmt --to=iec "$avail") free in $work: pool $(numfmt --to=iec "$pool_bytes") -> $(numfmt --to=iec "$fit")"
  pool_bytes=$fit
fi
pool=$work/pool.img
sock=$sockdir/nbd.sock
ctl=$sockdir/ctl.sock
uri="nbd+unix:///?socket=$sock"
extra_pids=()

new_pool() {  # a blank, fallocated pool file
  rm -f "$pool"
  fallocate -l "$pool_bytes" "$pool" || die "cannot fallocate $pool_bytes bytes at $pool"
}

# --- servers ----------------------------------------------------------------
qemu_cmd() {  # FILE SOCK -> cmd=()
  cmd=(qemu-nbd -f raw --cache=none --aio=io_uring -t --shared=16 -k "$2" "$1")
}
shadowd_cmd() {  # FILE SOCK CTL -> cmd=()
  cmd=("$shadowd_bin" --backing "$1" --unix "$2" --control "$3" --pool "$pool" --init
       --foreground --log-level warn "${shadowd_extra[@]}")
}

# start_qemu FILE LOG : sets server_pid; dies on failure.
start_qemu() {
  rm -f "$sock"
  qemu_cmd "$1" "$sock"
  start_polled 10 "$2" "$uri" "${cmd[@]}" ||
    { tail -n 20 "$2" >&2; die "qemu-nbd did not become ready"; }
}

# start_shadowd FILE LOG ROLES : on a fresh pool; sets server_pid, writes the
# thread roles to ROLES; dies on failure.
start_shadowd() {
  rm -f "$sock" "$ctl"
  new_pool
  shadowd_cmd "$1" "$sock" "$ctl"
  start_notified 120 "$2" "${cmd[@]}" ||
    { tail -n 20 "$2" >&2; die "shadowd did not report READY=1 (helper rc $notify_rc)"; }
  nbdinfo --size "$uri" >/dev/null 2>&1 || die "shadowd: nbdinfo failed"
  if [[ $want_threads == 1 ]]; then thread_roles "$server_pid" "$3"; else : >"$3"; fi
}

# snap FILE : status, history and pool of the running shadowd as one JSON object.
snap() {
  local s h p
  s=$("$shadowctl_bin" --socket "$ctl" --json status) || die "shadowctl status failed"
  h=$("$shadowctl_bin" --socket "$ctl" --json history) || die "shadowctl history failed"
  p=$("$shadowctl_bin" --socket "$ctl" --json pool) || die "shadowctl pool failed"
  printf '{"status":%s,"history":%s,"pool":%s,"wall":%s}\n' "$s" "$h" "$p" "$(date +%s.%N)" >"$1"
}

# Samplers that run beside a shadowd job: top -H midway, perf over the job.
start_samplers() {  # PREFIX
  extra_pids=()
  local mid=$(( ramp + runtime / 2 ))
  if [[ $want_top == 1 ]]; then
    ( sleep "$mid"
      top -H -b -n 2 -d 1 -w 200 -p "$server_pid" >"$1.top" 2>/dev/null || true
      top -b -n 2 -d 1 -w 200 >"$1.top-all" 2>/dev/null || true ) &
    extra_pids+=($!)
  fi
  if [[ $want_perf == 1 ]]; then
    ( sleep "$ramp"
      perf record -q -F 499 -g -p "$server_pid" -o "$1.perf" -- sleep "$runtime" \
        >/dev/null 2>"$1.perf.log" || true ) &
    extra_pids+=($!)
  fi
}
stop_samplers() {  # PREFIX
  local p
  for p in "${extra_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  extra_pids=()
  if [[ -s $1.perf ]]; then
    perf report -i "$1.perf" --no-children --stdio --sort dso,sym --percent-limit 1.5 \
      2>/dev/null | grep -E '^ +[0-9.]+%' | head -n 25 >"$1.perf.txt" || true
  fi
}

# --- header ------------------------------------------------------------------
header=$work/header.txt
fs_type=$(stat -f -c %T "$work")
{
  echo "journal benchmark (shadowd with full history vs qemu-nbd)  $stamp"
  host_info 2
  echo "shadowd: $("$shadowd_bin" --version 2>&1 | head -n1)   qemu-nbd: $(qemu-nbd --version 2>&1 | head -n1)   fio: $(fio --version)"
  echo "work directory: $work ($fs_type, $(numfmt --to=iec "$avail") free at start)"
  echo "pool: $(q fallocate -l "$pool_bytes" POOL) (fresh for every shadowd start; --init formats it)"
  echo "servers (FILE = the backing file, SOCK/CTL = Unix sockets in the work directory):"
  qemu_cmd FILE SOCK
  echo "  qemu-nbd  $(q "${cmd[@]}")"
  shadowd_cmd FILE SOCK CTL
  echo "  shadowd   $(q "${cmd[@]}" | sed "s|$pool|POOL|g")"
  echo "  counters: shadowctl --socket CTL --json status|history|pool before and after every shadowd job"
} >"$header"
cat "$header"

manifest=$work/manifest.tsv
: >"$manifest"

# --- part 1: throughput ----------------------------------------------------------
if (( want_throughput )); then
  file=$work/backing.img
  log "preallocating $size at $file"
  preallocate "$file" "$size_bytes"
  if [[ $prefill == 1 ]]; then
    log "prefilling $size_bytes bytes with random data"
    prefill "$file" "$size_bytes"
  fi
  passes_text=${passes[*]}
  {
    echo
    echo "part 1: throughput. FILE = $file ($size_bytes bytes$([[ $prefill == 1 ]] && echo ', prefilled with random data'), page cache dropped before each server)"
    echo "  per job: qemu-nbd; then shadowd on a fresh pool, the job run ${passes_text// / then } on that pool"
    echo "  fio jobs (one connection; runtime ${runtime}s + ramp ${ramp}s):"
    for j in "${jobs[@]}"; do
      fio_cmd "$j" 'nbd+unix:///?socket=SOCK'
      printf '    %-9s %s\n' "$j" "$(q "${fcmd[@]}" --output=FILE)"
    done
  } | tee -a "$header"

  for j in "${jobs[@]}"; do
    fio_cmd "$j" "$uri"
    # qemu-nbd
    drop_page_cache "$file"
    log "qemu-nbd: $j (${runtime}s)"
    pre=$work/qemu-nbd-$j
    start_qemu "$file" "$pre.log"
    frc=0
    cpu_mark "$pre.cpu" "$server_pid"
    "${fcmd[@]}" "--output=$pre.json" >"$pre.fio.log" 2>&1 || frc=$?
    cpu_mark "$pre.cpu" "$server_pid"
    (( frc == 0 )) || log "qemu-nbd: fio $j exited $frc: $(tail -n 3 "$pre.fio.log" | tr '\n' ' ')"
    stop_server
    printf 'fio\tqemu-nbd\t%s\t-\t%s\t%s\n' "$j" "$frc" "$pre" >>"$manifest"
    printf 'server\tqemu-nbd\t%s\t-\t%s\t%s\n' "$j" "$server_rc" "$pre.log" >>"$manifest"

    # shadowd with a fresh pool: cold, then warm
    drop_page_cache "$file"
    log "shadowd: fresh pool, $j"
    slog=$work/shadowd-$j.log
    start_shadowd "$file" "$slog" "$work/shadowd-$j.roles"
    for p in "${passes[@]}"; do
      pre=$work/shadowd-$j-$p
      log "shadowd ($p pool): $j (${runtime}s)"
      snap "$pre.before"
      thread_ticks "$server_pid" >"$pre.ticks0"
      start_samplers "$pre"
      frc=0
      cpu_mark "$pre.cpu" "$server_pid"
      "${fcmd[@]}" "--output=$pre.json" >"$pre.fio.log" 2>&1 || frc=$?
      cpu_mark "$pre.cpu" "$server_pid"
      thread_ticks "$server_pid" >"$pre.ticks1"
      snap "$pre.after"
      stop_samplers "$pre"
      (( frc == 0 )) || log "shadowd: fio $j exited $frc: $(tail -n 3 "$pre.fio.log" | tr '\n' ' ')"
      printf 'fio\tshadowd\t%s\t%s\t%s\t%s\n' "$j" "$p" "$frc" "$pre" >>"$manifest"
    done
    stop_server
    printf 'server\tshadowd\t%s\t-\t%s\t%s\n' "$j" "$server_rc" "$slog" >>"$manifest"
  done
fi

# --- part 2: compressibility -----------------------------------------------------
if (( want_compress )); then
  fill=$work/fill.img
  tarball=$work/tarball.bin
  randfile=$work/random.bin
  copy_cmd=(nbdcopy --flush DATASET 'nbd+unix:///?socket=SOCK')
  for d in "${datasets[@]}"; do
    case $d in
      tarball)
        log "data set: tar -cf - $data_src | head -c $data_bytes"
        { tar -cf - "$data_src" 2>/dev/null || true; } | head -c "$data_bytes" >"$tarball" || true
        got=$(stat -c %s "$tarball")
        got=$(( got / (1 << 20) * (1 << 20) ))
        (( got >= 1 << 20 )) || die "tar of $data_src gave less than 1 MiB"
        truncate -s "$got" "$tarball"
        data_bytes=$got  # the random set gets as many bytes
        ;;
    esac
  done
  for d in "${datasets[@]}"; do
    if [[ $d == random ]]; then
      log "data set: $data_bytes bytes from /dev/urandom"
      head -c "$data_bytes" /dev/urandom >"$randfile"
    fi
  done
  {
    echo
    echo "part 2: compressibility. Each data set copied onto a fresh sparse (all-zero) FILE of $size_bytes bytes:"
    for d in "${datasets[@]}"; do
      case $d in
        tarball) echo "  tarball  $(q tar -cf - "$data_src") | $(q head -c "$data_bytes")   ($data_bytes bytes)" ;;
        random)  echo "  random   $(q head -c "$data_bytes" /dev/urandom)   ($data_bytes bytes)" ;;
      esac
    done
    echo "  copy: $(q "${copy_cmd[@]}")   (default 4 connections, zero blocks sent as zero requests)"
    echo "  servers: $([[ $copy_qemu == 1 ]] && echo 'qemu-nbd (copy time only), then ')shadowd on a fresh pool; counters before, right after the copy, and after ${settle}s more"
  } | tee -a "$header"

  for d in "${datasets[@]}"; do
    src=$tarball
    [[ $d == random ]] && src=$randfile
    if [[ $copy_qemu == 1 ]]; then
      rm -f "$fill"; truncate -s "$size_bytes" "$fill"
      pre=$work/copy-qemu-nbd-$d
      log "qemu-nbd: nbdcopy $d"
      start_qemu "$fill" "$pre.log"
      t0=$(date +%s.%N)
      crc=0
      nbdcopy --flush "$src" "$uri" >"$pre.copy.log" 2>&1 || crc=$?
      t1=$(date +%s.%N)
      stop_server
      printf 'copy\tqemu-nbd\t%s\t%s\t%s\t%s %s\n' "$d" "$crc" "$pre" "$t0" "$t1" >>"$manifest"
      printf 'server\tqemu-nbd\tcopy-%s\t-\t%s\t%s\n' "$d" "$server_rc" "$pre.log" >>"$manifest"
    fi
    rm -f "$fill"; truncate -s "$size_bytes" "$fill"
    pre=$work/copy-shadowd-$d
    log "shadowd: nbdcopy $d"
    start_shadowd "$fill" "$pre.log" "$pre.roles"
    snap "$pre.before"
    t0=$(date +%s.%N)
    crc=0
    nbdcopy --flush "$src" "$uri" >"$pre.copy.log" 2>&1 || crc=$?
    t1=$(date +%s.%N)
    snap "$pre.after"
    sleep "$settle"
    snap "$pre.settled"
    stop_server
    printf 'copy\tshadowd\t%s\t%s\t%s\t%s %s\n' "$d" "$crc" "$pre" "$t0" "$t1" >>"$manifest"
    printf 'server\tshadowd\tcopy-%s\t-\t%s\t%s\n' "$d" "$server_rc" "$pre.log" >>"$manifest"
    (( crc == 0 )) || log "nbdcopy $d to shadowd exited $crc: $(tail -n 3 "$pre.copy.log" | tr '\n' ' ')"
  done
  rm -f "$fill" "$tarball" "$randfile"
fi
rm -f "$pool"

# --- report -------------------------------------------------------------------
echo
bench_py "$manifest" "$header" "$out_json" "$stamp" "${jobs[*]}" "${passes[*]}" \
  "${datasets[*]}" "$data_bytes" "$settle" <<'PY'
import json, os, sys
manifest, header, out_json, stamp = sys.argv[1:5]
jobs, passes, datasets = sys.argv[5].split(), sys.argv[6].split(), sys.argv[7].split()
data_bytes, settle = int(sys.argv[8]), int(sys.argv[9])
labels = {"randwrite": "4k randwrite qd32 (IOPS)", "seqwrite": "1M seq write qd8  (MB/s)"}
anomalies = []


def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError) as e:
        anomalies.append(f"{path}: unreadable counters ({e})")
        return None


def counters(sn):
    """The figures of one snapshot that are compared across snapshots."""
    st, hi, po = sn["status"], sn["history"], sn["pool"]
    sh = st.get("shadow", {})
    w = st.get("ops", {}).get("write", {})
    wz = st.get("ops", {}).get("write_zeroes", {})
    tr = st.get("ops", {}).get("trim", {})
    return {"wall": sn["wall"],
            "pool_bytes_written": po["pool_bytes_written"],
            "client_bytes_written": po["client_bytes_written"],
            "group_commits": po["group_commits"],
            "cow_stalls": sh.get("cow_stalls", 0),
            "versions_made": sh.get("versions_made", 0),
            "shadow_bytes_read": sh.get("bytes_read", 0),
            "checkpoints": po.get("checkpoints", 0),
            "retention_shrinks": po.get("retention_shrinks", 0),
            "zones_reclaimed": po.get("zones_reclaimed", 0),
            "pool_errors": po.get("pool_errors", 0),
            "journal_records": hi.get("journal_records", 0),
            "journal_bytes": hi.get("journal_bytes", 0),
            "journal_raw_bytes": hi.get("journal_raw_bytes", 0),
            "versions": hi.get("versions", 0),
            "version_bytes": hi.get("version_bytes", 0),
            "version_raw_bytes": hi.get("version_raw_bytes", 0),
            "write_requests": w.get("requests", 0), "write_bytes": w.get("bytes", 0),
            "zero_requests": wz.get("requests", 0) + tr.get("requests", 0),
            "zero_bytes": wz.get("bytes", 0) + tr.get("bytes", 0),
            "degraded": po.get("degraded", False), "degraded_reason": po.get("degraded_reason", ""),
            "pool_used": po.get("bytes_used", 0), "pool_capacity": po.get("capacity_bytes", 0),
            "shadow_queue": sh.get("queue", 0)}


def delta(a, b):
    d = {k: b[k] - a[k] for k in a if isinstance(a[k], (int, float)) and not isinstance(a[k], bool)}
    for k in ("degraded", "degraded_reason", "pool_used", "pool_capacity", "shadow_queue"):
        d[k] = b[k]
    d["pool_per_client"] = (d["pool_bytes_written"] / d["client_bytes_written"]
                            if d["client_bytes_written"] else None)
    return d


def threads(prefix, roles_path):
    """CPU of each shadowd thread during the job, % of one core, with its role
    (io_uring workers, iou-wrk-TID, as "wrk(<role of TID>)")."""
    try:
        t0 = {l.split()[0]: int(l.split()[1]) for l in open(prefix + ".ticks0")}
        t1 = {l.split()[0]: (int(l.split()[1]), l.split()[2]) for l in open(prefix + ".ticks1")}
        a, b = [l.split() for l in open(prefix + ".cpu").read().splitlines()[:2]]
        wall = float(b[0]) - float(a[0])
    except (OSError, ValueError, IndexError):
        return []
    roles = {}
    if os.path.exists(roles_path):
        roles = dict(l.split() for l in open(roles_path) if len(l.split()) == 2)
    out = []
    for tid, (v, comm) in t1.items():
        used = (v - t0.get(tid, 0)) / tck
        role = roles.get(tid)
        if role is None:
            role = (f"wrk({roles.get(comm[8:], comm[8:])})" if comm.startswith("iou-wrk-")
                    else comm)
        out.append({"tid": int(tid), "comm": comm, "role": role, "cpu_pct": 100 * used / wall})
    out.sort(key=lambda x: -x["cpu_pct"])
    return out


def top_lines(path, n=8, skip=None):
    """The last frame of a `top -b -n 2` sample: its header and first N tasks
    (without the task SKIP: in `top -H -p PID` the line of PID itself shows the
    whole process, not its main thread)."""
    try:
        txt = open(path).read()
    except OSError:
        return []
    last = txt.split("top - ")[-1].splitlines()
    try:
        i = next(k for k, l in enumerate(last) if l.strip().startswith("PID"))
    except StopIteration:
        return []
    rows = [l.rstrip() for l in last[i + 1:] if l.strip() and l.split()[0] != skip]
    return [last[i].rstrip()] + rows[:n]


def main_tid(roles_path):
    try:
        return next((l.split()[0] for l in open(roles_path) if l.split()[1:] == ["main"]), None)
    except OSError:
        return None


fio_rows, copies, servers = {}, {}, []
for line in open(manifest):
    kind, srv, what, sub, rc, rest = line.rstrip("\n").split("\t")
    if kind == "server":
        servers.append({"server": srv, "run": what, "exit": rc, "log": rest})
        if rc != "0":
            anomalies.append(f"{srv} ({what}): exit status {rc}")
        if os.path.exists(rest) and os.path.getsize(rest):
            anomalies.append(f"{srv} ({what}) wrote to stderr: "
                             + open(rest, errors="replace").read().strip().splitlines()[-1][:200])
    elif kind == "fio":
        r = {"server": srv, "job": what, "pass": sub, "fio_rc": int(rc), "prefix": rest}
        try:
            fj, fig = fio_figures(rest + ".json", what, ("iops", "bw_bytes", "lat_mean_us",
                                                        "clat_p99_us", "total_ios", "io_errors"))
            r.update(fig)
            if fj.get("error", 0):
                anomalies.append(f"{srv} {what} {sub}: fio error {fj['error']}")
        except Exception as e:  # noqa: BLE001
            anomalies.append(f"{srv} {what} {sub}: no fio result ({e})")
        if r["fio_rc"]:
            anomalies.append(f"{srv} {what} {sub}: fio exit {rc}")
        r["cpu"] = cpu_usage(rest + ".cpu")
        if r["cpu"] and r["cpu"]["other"] > 25:
            anomalies.append(f"{srv} {what} {sub}: other processes used {r['cpu']['other']:.0f}% "
                             "of a core during the job (the machine was not idle)")
        if srv == "shadowd":
            a, b = load(rest + ".before"), load(rest + ".after")
            if a and b:
                r["counters"] = delta(counters(a), counters(b))
                r["counters_after"] = counters(b)
            roles = os.path.join(os.path.dirname(rest), f"shadowd-{what}.roles")
            r["threads"] = threads(rest, roles)
            r["top"] = top_lines(rest + ".top", skip=main_tid(roles))
            r["top_all"] = top_lines(rest + ".top-all", 6)
            if os.path.exists(rest + ".perf.txt"):
                r["perf"] = open(rest + ".perf.txt").read().splitlines()
        fio_rows[(srv, what, sub)] = r
    elif kind == "copy":
        crc, prefix, times = int(sub), rc, rest
        t0, t1 = (float(x) for x in times.split())
        c = {"server": srv, "data": what, "rc": crc, "prefix": prefix, "seconds": t1 - t0}
        if crc:
            anomalies.append(f"nbdcopy {what} to {srv}: exit {crc}")
        if srv == "shadowd":
            a, b, s = (load(f"{prefix}.{k}") for k in ("before", "after", "settled"))
            if a and b and s:
                c["at_end"] = delta(counters(a), counters(b))
                c["settled"] = delta(counters(a), counters(s))
        copies[(srv, what)] = c


def value(r):
    if not r or "iops" not in r or r.get("io_errors"):
        return None
    return r["iops"] if r["job"].startswith("rand") else r["bw_bytes"] / 1e6


def mib(b):
    return f"{b / 1048576:,.1f} MiB" if b is not None else "-"


out = []
if fio_rows:
    cols = [("qemu-nbd", "-")] + [("shadowd", p) for p in passes]
    names = ["qemu-nbd"] + [f"shadowd {p}" for p in passes]
    head = f"{'job':<26}" + "".join(f"{n:>14}" for n in names) + "".join(
        f"{p + '/qemu':>12}" for p in passes)
    out += ["part 1: throughput, shadowd with full history (fresh pool) vs qemu-nbd", head,
            "-" * len(head)]
    for j in jobs:
        row = f"{labels[j]:<26}"
        for c in cols:
            v = value(fio_rows.get((c[0], j, c[1])))
            row += f"{'ERR':>14}" if v is None else f"{v:>14,.0f}"
        q = value(fio_rows.get(("qemu-nbd", j, "-")))
        for p in passes:
            v = value(fio_rows.get(("shadowd", j, p)))
            row += f"{v / q:>11.2f}x" if v is not None and q else f"{'-':>12}"
        out.append(row)
    out.append("target: shadowd >= 0.9x qemu-nbd with full history on. cold = first pass on a new "
               "pool (every first write to a segment copies it: COW); warm = the same job again.")
    out.append("")
    head = (f"{'mean latency (us)':<26}" + "".join(f"{n:>14}" for n in names))
    out += [head]
    for j in jobs:
        row = f"{j:<26}"
        for c in cols:
            r = fio_rows.get((c[0], j, c[1]), {})
            row += f"{r['lat_mean_us']:>14,.0f}" if "lat_mean_us" in r else f"{'-':>14}"
        out.append(row)
    out.append("")
    head = f"{'CPU % of a core: srv/fio/other':<32}" + "".join(f"{n:>15}" for n in names)
    out.append(head)
    for j in jobs:
        row = f"{j:<32}"
        for c in cols:
            u = (fio_rows.get((c[0], j, c[1])) or {}).get("cpu")
            row += f"{u['server']:>5.0f}/{u['fio']:>3.0f}/{u['other']:>3.0f}" if u else f"{'-':>15}"
        out.append(row)
    out.append("")
    head = (f"{'shadowd row':<16}{'client MiB':>11}{'pool MiB':>10}{'pool/client':>12}"
            f"{'journal':>10}{'COW stalls':>11}{'versions':>9}{'commits':>9}{'writes/':>8}"
            f"{'shrinks':>8}{'pool used':>11}")
    out += ["pool writes per shadowd row (counter deltas over the fio job, ramp included)", head]
    out.append(f"{'':<16}{'':>11}{'':>10}{'':>12}{'raw:st':>10}{'':>11}{'made':>9}{'':>9}"
               f"{'commit':>8}{'':>8}{'':>11}")
    out.append("-" * len(head))
    for j in jobs:
        for p in passes:
            r = fio_rows.get(("shadowd", j, p))
            d = (r or {}).get("counters")
            if not d:
                out.append(f"{j + ' ' + p:<16}{'-':>11}")
                continue
            jr = d["journal_raw_bytes"] / d["journal_bytes"] if d["journal_bytes"] > 0 else 0
            wpc = d["write_requests"] / d["group_commits"] if d["group_commits"] else 0
            ppc = d["pool_per_client"]
            out.append(f"{j + ' ' + p:<16}{d['client_bytes_written'] / 1048576:>11,.0f}"
                       f"{d['pool_bytes_written'] / 1048576:>10,.0f}"
                       f"{(f'{ppc:.3f}' if ppc is not None else '-'):>12}{jr:>8.2f}:1"
                       f"{d['cow_stalls']:>11,}{d['versions_made']:>9,}{d['group_commits']:>9,}"
                       f"{wpc:>8.1f}{d['retention_shrinks']:>8}"
                       f"{d['pool_used'] / 2**30:>6.1f}/{d['pool_capacity'] / 2**30:.0f}G")
            if d["retention_shrinks"] or d["zones_reclaimed"]:
                anomalies.append(f"shadowd {j} {p}: the pool ran full ({d['retention_shrinks']} "
                                 f"retention shrinks, {d['zones_reclaimed']} zones reclaimed): "
                                 "raise BENCH_POOL_SIZE")
            if d["degraded"] or d["pool_errors"]:
                anomalies.append(f"shadowd {j} {p}: history degraded ({d['degraded_reason']}), "
                                 f"{d['pool_errors']} pool errors")
    out.append("pool/client = pool_bytes_written / client_bytes_written (shadowctl pool); journal "
               "raw:st = client bytes : stored bytes of the journal records written in the row;")
    out.append("versions made = by background shadowing (COW versions are in COW stalls); "
               "writes/commit = client WRITE requests per group commit.")
    out.append("")
    out.append("where shadowd's CPU went (per thread, % of one core over the job; roles from gdb):")
    for j in jobs:
        for p in passes:
            r = fio_rows.get(("shadowd", j, p)) or {}
            th = r.get("threads") or []
            d = r.get("counters") or {}
            wall = (r.get("cpu") or {}).get("wall_s") or 0
            by_role = {}
            for t in th:
                by_role.setdefault(t["role"], []).append(t["cpu_pct"])
            cells = ", ".join(f"{role} " + "+".join(f"{v:.0f}" for v in vals)
                              for role, vals in sorted(by_role.items(), key=lambda x: -sum(x[1]))
                              if sum(vals) >= 0.5)
            rate = f"{d['group_commits'] / wall:,.0f} commits/s" if d and wall else ""
            out.append(f"  {j + ' ' + p:<16}{cells or '-'}   {rate}")
    if any((fio_rows.get(("shadowd", j, p)) or {}).get("top") for j in jobs for p in passes):
        out.append("")
        out.append("top -H -b -n 2 -d 1 -p SHADOWD and top -b -n 2 -d 1, mid-job (last frame, busiest "
                   "threads; the process-total line of -p dropped):")
        for j in jobs:
            for p in passes:
                r = fio_rows.get(("shadowd", j, p)) or {}
                if r.get("top"):
                    out.append(f"  [{j} {p}]")
                    out += ["    " + l for l in r["top"][:6]]
                if r.get("top_all"):
                    out.append(f"  [{j} {p}] whole machine:")
                    out += ["    " + l for l in r["top_all"][:5]]
    for j in jobs:
        for p in passes:
            r = fio_rows.get(("shadowd", j, p)) or {}
            if r.get("perf"):
                out.append("")
                out.append(f"perf record -F 499 -g -p SHADOWD over the job, {j} {p} "
                           "(perf report --no-children --sort dso,sym):")
                out += ["  " + l.strip() for l in r["perf"]]
    out.append("")

if copies:
    out.append(f"part 2: pool bytes per client byte for a copied data set ({data_bytes:,} bytes, "
               "nbdcopy onto a zeroed FILE, fresh pool)")
    head = (f"{'data set':<10}{'copy s':>8}{'copy s':>8}{'WRITE MiB':>10}{'zero MiB':>9}"
            f"{'pool MiB':>9}{'pool/client':>12}{'pool MiB':>9}{'pool/client':>12}"
            f"{'journal':>10}{'COW':>8}{'versions':>9}")
    out.append(head)
    out.append(f"{'':<10}{'qemu':>8}{'shadowd':>8}{'(client)':>10}{'':>9}{'end':>9}{'end':>12}"
               f"{'settled':>9}{'settled':>12}{'raw:st':>10}{'stalls':>8}{'made':>9}")
    out.append("-" * len(head))
    for d in datasets:
        qc = copies.get(("qemu-nbd", d)) or {}
        sc = copies.get(("shadowd", d)) or {}
        e, s = sc.get("at_end"), sc.get("settled")
        qs = f"{qc['seconds']:.1f}" if qc.get("seconds") else "-"
        ss = f"{sc['seconds']:.1f}" if sc.get("seconds") else "-"
        if not e or not s:
            out.append(f"{d:<10}{qs:>8}{ss:>8}{'-':>10}")
            continue
        jr = e["journal_raw_bytes"] / e["journal_bytes"] if e["journal_bytes"] else 0
        pe, ps = e["pool_per_client"], s["pool_per_client"]
        out.append(f"{d:<10}{qs:>8}{ss:>8}{e['client_bytes_written'] / 1048576:>10,.0f}"
                   f"{e['zero_bytes'] / 1048576:>9,.0f}{e['pool_bytes_written'] / 1048576:>9,.0f}"
                   f"{(f'{pe:.3f}' if pe is not None else '-'):>12}"
                   f"{s['pool_bytes_written'] / 1048576:>9,.0f}"
                   f"{(f'{ps:.3f}' if ps is not None else '-'):>12}{jr:>8.2f}:1"
                   f"{s['cow_stalls']:>8,}{s['versions_made']:>9,}")
        if s["degraded"] or s["pool_errors"]:
            anomalies.append(f"shadowd copy {d}: history degraded ({s['degraded_reason']})")
    out.append(f"end = right after nbdcopy --flush returned; settled = {settle}s later (background "
               "shadowing, checkpoints). pool/client = pool bytes written / WRITE payload bytes;")
    out.append("zero MiB = WRITE_ZEROES/TRIM bytes (nbdcopy sends zero blocks so; not in the "
               "client bytes). target: tarball pool/client < 0.6.")
    out.append("")

table = "\n".join(out)
print(table)
fio_json = {f"{k[0]} {k[1]} {k[2]}": v for k, v in fio_rows.items()}
copy_json = {f"{k[0]} {k[1]}": v for k, v in copies.items()}
finish(anomalies, "servers",
       {"timestamp": stamp, "header": open(header).read(), "table": table, "jobs": jobs,
        "passes": passes, "datasets": datasets, "data_bytes": data_bytes, "fio": fio_json,
        "copies": copy_json, "servers": servers, "anomalies": anomalies}, out_json)
PY
