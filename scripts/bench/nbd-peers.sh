#!/usr/bin/env bash
# Benchmark shadowd against its peers, qemu-nbd and nbdkit, on one backing file
# in one run: fio --ioengine=nbd over a Unix socket, four jobs per server
# (4k randread and 4k randwrite at iodepth 32, 1 MiB sequential read and write
# at iodepth 8). Prints a table (IOPS for 4k, MB/s for 1 MiB, and the ratio
# shadowd/qemu-nbd) and writes the raw fio results as JSON to
# var/bench/nbd-peers-<timestamp>.json.
#
# Environment:
#   BUILD_DIR=DIR              build directory (default build/); scripts/build.sh
#                              is run only if DIR/daemon/shadowd is missing
#   BENCH_SIZE=SIZE            size of the preallocated backing file (default 2G)
#   BENCH_DIR=DIR              where the temporary work directory goes
#                              (default var/ in the repository); removed at exit
#   BENCH_FILE=PATH            benchmark this existing file or block device
#                              instead (its contents are overwritten: needs
#                              BENCH_OVERWRITE_OK=1)
#   BENCH_RUNTIME=SECONDS      measured time per fio job (default 15)
#   BENCH_RAMP=SECONDS         fio ramp_time per job, not measured (default 2)
#   BENCH_PREFILL=0|1          fill the file with random data first (default 1)
#   BENCH_SERVERS="..."        subset/order of: shadowd qemu-nbd nbdkit
#                              (default all three)
#   BENCH_JOBS="..."           subset/order of: randread randwrite seqread seqwrite
#   BENCH_SHADOWD_ARGS="..."   extra shadowd options, e.g. "--io-threads 1"
#   BENCH_NBDKIT_CACHE=MODE    nbdkit file plugin cache= (default none)
#   BENCH_OUT=FILE             JSON result file (default var/bench/nbd-peers-<ts>.json)
#   BENCH_KEEP=1               keep the work directory (backing file, logs, fio JSON)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

py=/usr/bin/python3
[[ -x $py ]] || py=python3

build_dir=${BUILD_DIR:-build}
[[ $build_dir == /* ]] || build_dir=$root/$build_dir
shadowd_bin=$build_dir/daemon/shadowd

runtime=${BENCH_RUNTIME:-15}
ramp=${BENCH_RAMP:-2}
size=${BENCH_SIZE:-2G}
prefill=${BENCH_PREFILL:-1}
read -ra servers <<<"${BENCH_SERVERS:-shadowd qemu-nbd nbdkit}"
read -ra jobs <<<"${BENCH_JOBS:-randread randwrite seqread seqwrite}"
read -ra shadowd_extra <<<"${BENCH_SHADOWD_ARGS:-}"
nbdkit_cache=${BENCH_NBDKIT_CACHE:-none}
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out_json=${BENCH_OUT:-$root/var/bench/nbd-peers-$stamp.json}

log() { echo "bench: $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- prerequisites --------------------------------------------------------
need=(fio nbdinfo)
for s in "${servers[@]}"; do
  case $s in
    shadowd) ;;
    qemu-nbd) need+=(qemu-nbd) ;;
    nbdkit) need+=(nbdkit) ;;
    *) die "unknown server '$s' in BENCH_SERVERS (shadowd qemu-nbd nbdkit)" ;;
  esac
done
for j in "${jobs[@]}"; do
  case $j in randread|randwrite|seqread|seqwrite) ;;
    *) die "unknown job '$j' in BENCH_JOBS (randread randwrite seqread seqwrite)" ;;
  esac
done
for c in "${need[@]}"; do
  command -v "$c" >/dev/null || die "$c not found (scripts/deps.sh installs it)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"

if [[ " ${servers[*]} " == *" shadowd "* && ! -x $shadowd_bin ]]; then
  log "$shadowd_bin missing: running scripts/build.sh"
  scripts/build.sh
  [[ -x $shadowd_bin ]] || die "build did not produce $shadowd_bin"
fi

# --- work directory, backing file -----------------------------------------
bench_parent=${BENCH_DIR:-$root/var}
mkdir -p "$bench_parent" "$(dirname "$out_json")"
work=$(mktemp -d "$bench_parent/nbd-peers.XXXXXX")
work=$(cd "$work" && pwd)
sockdir=$work
if (( ${#sockdir} > 80 )); then  # sun_path holds 108 bytes
  sockdir=$(mktemp -d "${TMPDIR:-/tmp}/nbd-peers.XXXXXX")
fi

server_pid=
helper_pid=
cleanup() {
  local rc=$?
  for p in $helper_pid $server_pid; do
    if kill -0 "$p" 2>/dev/null; then
      kill -TERM "$p" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$p" 2>/dev/null || true
      wait "$p" 2>/dev/null || true
    fi
  done
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then
    log "kept work directory $work"
  else
    rm -rf "$work"
  fi
  [[ $sockdir == "$work" ]] || rm -rf "$sockdir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n ${BENCH_FILE:-} ]]; then
  [[ ${BENCH_OVERWRITE_OK:-0} == 1 ]] ||
    die "BENCH_FILE=$BENCH_FILE would be overwritten; set BENCH_OVERWRITE_OK=1 to confirm"
  [[ -e $BENCH_FILE ]] || die "BENCH_FILE=$BENCH_FILE does not exist"
  file=$(realpath "$BENCH_FILE")
else
  file=$work/backing.img
  log "preallocating $size at $file"
  fallocate -l "$size" "$file" 2>/dev/null || truncate -s "$size" "$file"
fi
file_bytes=$("$py" -c 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); print(os.lseek(fd, 0, os.SEEK_END))' "$file")
(( file_bytes >= 64 * 1024 * 1024 )) || die "backing file too small ($file_bytes bytes)"

# Drop the backing file's pages from the page cache so no server starts warm.
drop_file_cache() {
  "$py" - "$file" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)
PY
}

if [[ $prefill == 1 ]]; then
  log "prefilling $file_bytes bytes with random data"
  prefill_cmd=(fio --name=prefill --filename="$file" --rw=write --bs=1M --iodepth=16
    --ioengine=libaio --size="$file_bytes" --refill_buffers --end_fsync=1
    --output=/dev/null)
  "${prefill_cmd[@]}" --direct=1 >/dev/null 2>"$work/prefill.log" ||
    "${prefill_cmd[@]}" --direct=0 >/dev/null 2>>"$work/prefill.log" ||
    die "prefill failed: $(tail -n 5 "$work/prefill.log")"
fi
drop_file_cache

# --- servers ----------------------------------------------------------------
# Waits for READY=1 on a NOTIFY_SOCKET datagram socket (sd_notify protocol).
# Exits 0 on READY=1, 2 if the watched PID (read from a file) dies, 3 on timeout.
notify_helper=$work/notify-wait.py
cat >"$notify_helper" <<'PY'
import os, socket, sys, time
path, pidfile, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
open(path + ".bound", "w").close()
s.settimeout(0.05)
deadline = time.monotonic() + timeout
def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
while time.monotonic() < deadline:
    try:
        msg = s.recv(4096).decode(errors="replace")
        if "READY=1" in msg.split("\n"):
            sys.exit(0)
        continue
    except socket.timeout:
        pass
    try:
        pid = int(open(pidfile).read())
    except (OSError, ValueError):
        continue
    if not alive(pid):
        sys.exit(2)
sys.exit(3)
PY

server_cmd() {  # server socket -> prints nothing, sets cmd=()
  local s=$1 sock=$2
  case $s in
    shadowd) cmd=("$shadowd_bin" --backing "$file" --unix "$sock" --foreground
                  --log-level warn "${shadowd_extra[@]}") ;;
    qemu-nbd) cmd=(qemu-nbd -f raw --cache=none --aio=io_uring -t --shared=16
                   -k "$sock" "$file") ;;
    nbdkit) cmd=(nbdkit -U "$sock" --foreground --exit-with-parent file "$file"
                 cache="$nbdkit_cache") ;;
  esac
}

server_version() {
  case $1 in
    shadowd) "$shadowd_bin" --version 2>&1 | head -n1 ;;
    qemu-nbd) qemu-nbd --version 2>&1 | head -n1 ;;
    nbdkit) nbdkit --version 2>&1 | head -n1 ;;
  esac
}

# Start server $1 on socket $2, log to $3; sets server_pid; returns nonzero on failure.
start_server() {
  local s=$1 sock=$2 slog=$3 uri="nbd+unix:///?socket=$2"
  server_cmd "$s" "$sock"
  rm -f "$sock"
  if [[ $s == shadowd ]]; then
    local nsock=$sockdir/notify.sock
    rm -f "$nsock" "$nsock.bound" "$work/shadowd.pid"
    "$py" "$notify_helper" "$nsock" "$work/shadowd.pid" 30 &
    helper_pid=$!
    for _ in $(seq 100); do [[ -e $nsock.bound ]] && break; sleep 0.05; done
    NOTIFY_SOCKET=$nsock "${cmd[@]}" >"$slog" 2>&1 &
    server_pid=$!
    echo "$server_pid" >"$work/shadowd.pid"
    local hrc=0
    wait "$helper_pid" || hrc=$?
    helper_pid=
    rm -f "$nsock" "$nsock.bound"
    (( hrc == 0 )) || { log "shadowd did not report READY=1 (helper rc $hrc)"; return 1; }
  else
    "${cmd[@]}" >"$slog" 2>&1 &
    server_pid=$!
    # qemu-nbd and nbdkit have no readiness notification here: poll (bounded).
    local ok=0
    for _ in $(seq 200); do
      kill -0 "$server_pid" 2>/dev/null || break
      if [[ -S $sock ]] && nbdinfo --size "$uri" >/dev/null 2>&1; then ok=1; break; fi
      sleep 0.05
    done
    (( ok )) || { log "$s did not become ready"; return 1; }
  fi
  nbdinfo --size "$uri" >/dev/null 2>&1 || { log "$s: nbdinfo failed"; return 1; }
}

stop_server() {  # stops $server_pid; sets server_rc (exit status, or "killed")
  server_rc=0
  kill -TERM "$server_pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$server_pid" 2>/dev/null; then
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_rc=killed
  else
    wait "$server_pid" 2>/dev/null || server_rc=$?
  fi
  server_pid=
}

# CPU accounting around a job, to see who used the CPUs (this machine may be
# shared): appends "wall busy_ticks server_ticks children_user children_sys"
# to file $1. Children times come from the `times` builtin (fio is a waited-for
# child), so it must run in this shell, not in a subshell.
cpu_snap() {
  local f=$1 wall u n sy irq sirq srv=0 stat rest
  local -a a
  wall=$(date +%s.%N)
  read -r _ u n sy _ _ irq sirq _ </proc/stat
  if stat=$(<"/proc/$server_pid/stat") 2>/dev/null; then
    rest=${stat##*) }
    read -ra a <<<"$rest"
    srv=$(( a[11] + a[12] ))  # utime + stime, all threads
  fi
  times >"$work/times.txt"
  echo "$wall $((u + n + sy + irq + sirq)) $srv $(sed -n 2p "$work/times.txt")" >>"$f"
}

job_args() {  # job -> sets jargs=()
  case $1 in
    randread)  jargs=(--rw=randread  --bs=4k --iodepth=32) ;;
    randwrite) jargs=(--rw=randwrite --bs=4k --iodepth=32) ;;
    seqread)   jargs=(--rw=read      --bs=1M --iodepth=8) ;;
    seqwrite)  jargs=(--rw=write     --bs=1M --iodepth=8) ;;
  esac
}
fio_common=(--ioengine=nbd --numjobs=1 --time_based "--runtime=${runtime}s"
            "--ramp_time=${ramp}s" --output-format=json)

# --- header -----------------------------------------------------------------
q() {  # print a command line, single-quoting words that need it
  local out='' a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+="${out:+ }$a"
    else out+="${out:+ }'${a//\'/\'\\\'\'}'"; fi
  done
  echo "$out"
}
header=$work/header.txt
{
  echo "nbd-peers benchmark  $stamp"
  echo "host: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  if awk -v n="$(nproc)" '{ exit !($1 > n / 2) }' /proc/loadavg; then
    echo "WARNING: the machine is busy (load average above) - other work skews the figures"
  fi
  echo "backing: $file ($file_bytes bytes$([[ $prefill == 1 ]] && echo ', prefilled with random data'); page cache dropped before each server)"
  echo "fio: $(fio --version)   runtime ${runtime}s + ramp ${ramp}s per job"
  echo "servers (SOCK = a Unix socket in the work directory):"
  for s in "${servers[@]}"; do
    server_cmd "$s" SOCK
    printf '  %-9s %s   [%s]\n' "$s" "$(q "${cmd[@]}")" "$(server_version "$s")"
  done
  [[ " ${servers[*]} " != *" nbdkit "* || $nbdkit_cache != none ]] ||
    echo "  (nbdkit uses cache=none: pages are evicted after use; qemu-nbd and shadowd use O_DIRECT)"
  echo "fio jobs (one connection each, run one after another):"
  for j in "${jobs[@]}"; do
    job_args "$j"
    printf '  %-9s %s\n' "$j" "$(q fio "--name=$j" "${fio_common[@]}" "${jargs[@]}" '--uri=nbd+unix:///?socket=SOCK' --output=FILE)"
  done
} >"$header"
cat "$header"
echo

# --- run ----------------------------------------------------------------------
manifest=$work/manifest.tsv
: >"$manifest"
for s in "${servers[@]}"; do
  sock=$sockdir/$s.sock
  uri="nbd+unix:///?socket=$sock"
  slog=$work/$s.log
  drop_file_cache
  log "starting $s"
  if ! start_server "$s" "$sock" "$slog"; then
    log "$s failed to start; log:"; tail -n 20 "$slog" >&2 || true
    if [[ -n $server_pid ]]; then stop_server; fi
    printf '%s\t-\tstart-failed\t\n' "$s" >>"$manifest"
    continue
  fi
  for j in "${jobs[@]}"; do
    job_args "$j"
    out=$work/$s-$j.json
    log "$s: $j (${runtime}s)"
    if ! kill -0 "$server_pid" 2>/dev/null; then
      log "$s died before $j"
      printf '%s\t%s\tserver-died\t\n' "$s" "$j" >>"$manifest"
      continue
    fi
    frc=0
    rm -f "$work/$s-$j.cpu"
    cpu_snap "$work/$s-$j.cpu"
    fio "--name=$j" "${fio_common[@]}" "${jargs[@]}" "--uri=$uri" "--output=$out" \
      >"$work/$s-$j.fio.log" 2>&1 || frc=$?
    cpu_snap "$work/$s-$j.cpu"
    if (( frc != 0 )); then
      log "$s: fio $j exited $frc: $(tail -n 3 "$work/$s-$j.fio.log" | tr '\n' ' ')"
    fi
    printf '%s\t%s\tfio-rc=%s\t%s\n' "$s" "$j" "$frc" "$out" >>"$manifest"
  done
  stop_server
  printf '%s\t-\tserver-exit=%s\t%s\n' "$s" "$server_rc" "$slog" >>"$manifest"
  [[ $server_rc == 0 ]] || log "$s exited with status $server_rc"
  if [[ -s $slog ]]; then
    log "$s wrote to stderr (last lines):"
    tail -n 10 "$slog" | sed 's/^/    /' >&2
  fi
done

# --- report -------------------------------------------------------------------
"$py" - "$manifest" "$header" "$out_json" "$stamp" "${servers[*]}" "${jobs[*]}" <<'PY'
import json, os, sys
manifest, header, out_json, stamp = sys.argv[1:5]
servers, jobs = sys.argv[5].split(), sys.argv[6].split()
labels = {"randread": "4k randread  qd32 (IOPS)", "randwrite": "4k randwrite qd32 (IOPS)",
          "seqread": "1M seq read  qd8  (MB/s)", "seqwrite": "1M seq write qd8  (MB/s)"}
results = {s: {} for s in servers}
tck = os.sysconf("SC_CLK_TCK")

def secs(t):  # "1m2.345s" -> 62.345
    m, rest = t.rstrip("s").split("m")
    return int(m) * 60 + float(rest)

def cpu_usage(path):
    """CPU used during a job, in % of one core: server, fio, everything else."""
    try:
        a, b = [l.split() for l in open(path).read().splitlines()[:2]]
    except (OSError, ValueError):
        return None
    wall = float(b[0]) - float(a[0])
    busy = (int(b[1]) - int(a[1])) / tck
    srv = (int(b[2]) - int(a[2])) / tck
    fio = secs(b[3]) + secs(b[4]) - secs(a[3]) - secs(a[4])
    if wall <= 0:
        return None
    return {"server": 100 * srv / wall, "fio": 100 * fio / wall,
            "other": max(0.0, 100 * (busy - srv - fio) / wall), "wall_s": wall}
notes = {s: {} for s in servers}
anomalies = []
for line in open(manifest):
    s, j, status, path = line.rstrip("\n").split("\t")
    if j == "-":
        notes[s]["server"] = status
        if status == "start-failed":
            anomalies.append(f"{s}: failed to start")
        elif status != "server-exit=0":
            anomalies.append(f"{s}: {status}")
        if path and os.path.exists(path) and os.path.getsize(path):
            notes[s]["stderr"] = open(path, errors="replace").read()[-4000:]
            anomalies.append(f"{s}: wrote to stderr: "
                             + notes[s]["stderr"].strip().splitlines()[-1][:200])
        continue
    r = {"status": status}
    if os.path.exists(path) and os.path.getsize(path):
        try:
            txt = open(path).read()
            d = json.loads(txt[txt.index("{"):])
            fj = d["jobs"][0]
            side = "write" if "write" in j else "read"
            io = fj[side]
            r.update(iops=io["iops"], bw_bytes=io["bw_bytes"],
                     lat_mean_us=io["lat_ns"]["mean"] / 1000,
                     clat_p99_us=io["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000,
                     io_errors=fj.get("error", 0), total_ios=io["total_ios"],
                     cpu_usr=fj.get("usr_cpu"), cpu_sys=fj.get("sys_cpu"),
                     fio=fj)
            if fj.get("error", 0):
                anomalies.append(f"{s} {j}: fio error {fj['error']}")
        except Exception as e:  # noqa
            r["parse_error"] = str(e)
            anomalies.append(f"{s} {j}: unparsable fio output ({e})")
    cpu = cpu_usage(path[:-len(".json")] + ".cpu")
    if cpu:
        r["cpu_pct_of_one_core"] = cpu
        if cpu["other"] > 25:
            anomalies.append(f"{s} {j}: other processes used {cpu['other']:.0f}% of a core "
                             "during the job (the machine was not idle)")
    if status != "fio-rc=0":
        anomalies.append(f"{s} {j}: {status}")
    results[s][j] = r

def value(s, j):
    r = results.get(s, {}).get(j)
    if not r or "iops" not in r or r.get("io_errors"):
        return None
    return r["iops"] if j.startswith("rand") else r["bw_bytes"] / 1e6

cols = list(servers)
show_ratio = "shadowd" in servers and "qemu-nbd" in servers
head = f"{'job':<26}" + "".join(f"{c:>12}" for c in cols)
if show_ratio:
    head += f"{'shadowd/qemu':>14}"
lines = [head, "-" * len(head)]
for j in jobs:
    row = f"{labels[j]:<26}"
    for c in cols:
        v = value(c, j)
        row += f"{'ERR':>12}" if v is None else f"{v:>12,.0f}"
    if show_ratio:
        a, b = value("shadowd", j), value("qemu-nbd", j)
        row += f"{(a / b):>13.2f}x" if a is not None and b else f"{'-':>14}"
    lines.append(row)
table = "\n".join(lines)
print(table)
print()
lat = [f"{'mean latency (us)':<26}" + "".join(f"{c:>12}" for c in cols)]
for j in jobs:
    row = f"{j:<26}"
    for c in cols:
        r = results.get(c, {}).get(j, {})
        row += f"{r['lat_mean_us']:>12,.0f}" if "lat_mean_us" in r else f"{'-':>12}"
    lat.append(row)
print("\n".join(lat))
print()
cpu = [f"{'CPU % of a core: srv/fio/other':<32}" + "".join(f"{c:>15}" for c in cols)]
for j in jobs:
    row = f"{j:<32}"
    for c in cols:
        u = results.get(c, {}).get(j, {}).get("cpu_pct_of_one_core")
        row += f"{u['server']:>5.0f}/{u['fio']:>3.0f}/{u['other']:>3.0f}" if u else f"{'-':>15}"
    cpu.append(row)
print("\n".join(cpu))
print()
if anomalies:
    print("anomalies:")
    for a in anomalies:
        print("  " + a)
else:
    print("anomalies: none (no fio errors, servers exited cleanly and silently)")
doc = {"timestamp": stamp, "header": open(header).read(), "table": table,
       "servers": servers, "jobs": jobs, "anomalies": anomalies,
       "server_notes": notes, "results": results}
with open(out_json, "w") as f:
    json.dump(doc, f, indent=1)
print(f"\nraw results: {out_json}")
PY
