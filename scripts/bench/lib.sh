# shellcheck shell=bash
# Shared by the benchmark scripts in this directory; they source it right after
# `set -euo pipefail`:
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Sourcing it changes to the repository root and sets:
#   root py build_dir shadowd_bin                    (BUILD_DIR)
#   runtime ramp size shadowd_extra                  (BENCH_RUNTIME BENCH_RAMP
#                                                     BENCH_SIZE BENCH_SHADOWD_ARGS)
#   stamp (UTC, for file names)   fio_common (fio options of every measured job)
# bench_workdir reads BENCH_DIR and, at exit, BENCH_KEEP.
# shellcheck disable=SC2034  # most of these are used by the sourcing scripts only

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root" || exit

py=/usr/bin/python3
[[ -x $py ]] || py=python3

build_dir=${BUILD_DIR:-build}
[[ $build_dir == /* ]] || build_dir=$root/$build_dir
shadowd_bin=$build_dir/daemon/shadowd

runtime=${BENCH_RUNTIME:-15}
ramp=${BENCH_RAMP:-2}
size=${BENCH_SIZE:-2G}
read -ra shadowd_extra <<<"${BENCH_SHADOWD_ARGS:-}"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
fio_common=(--ioengine=nbd --numjobs=1 --time_based "--runtime=${runtime}s"
            "--ramp_time=${ramp}s" --output-format=json)

log() { echo "bench: $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- prerequisites ------------------------------------------------------------
# check_words KIND VAR ALLOWED WORD... : dies on the first WORD (from the list
# in environment variable VAR) that is not one of the words in ALLOWED.
check_words() {
  local kind=$1 var=$2 allowed=$3 w
  shift 3
  for w in "$@"; do
    [[ " $allowed " == *" $w "* ]] || die "unknown $kind '$w' in $var ($allowed)"
  done
}

# need_tools CMD... : dies unless every CMD is on PATH and fio has its nbd engine.
need_tools() {
  local c
  for c in "$@"; do
    command -v "$c" >/dev/null || die "$c not found (scripts/deps.sh installs it)"
  done
  fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
}

# build_shadowd WHAT : WHAT is missing, so runs scripts/build.sh; dies if that
# did not produce $shadowd_bin.
build_shadowd() {
  log "$1 missing: running scripts/build.sh"
  scripts/build.sh
  [[ -x $shadowd_bin ]] || die "build did not produce $shadowd_bin"
}

# --- work directory, cleanup ----------------------------------------------------
# bench_workdir NAME OUTDIR : creates OUTDIR and the work directory
# BENCH_DIR/NAME.XXXXXX (sets work), and sockdir for Unix sockets (the work
# directory, or a directory NAME.XXXXXX in TMPDIR when the work directory's
# path is too long for socket paths); removes them at exit (the work directory
# stays with BENCH_KEEP=1), stopping $helper_pid, $server_pid and $under_pid
# (nbd-peers.sh's qemu-nbd below shadowd-nbd) first. Writes the sd_notify
# helper used by start_notified.
bench_workdir() {
  local name=$1 outdir=$2 bench_parent=${BENCH_DIR:-$root/var}
  mkdir -p "$bench_parent" "$outdir"
  work=$(mktemp -d "$bench_parent/$name.XXXXXX")
  work=$(cd "$work" && pwd)
  sockdir=$work
  if (( ${#sockdir} > 80 )); then  # sun_path holds 108 bytes
    sockdir=$(mktemp -d "${TMPDIR:-/tmp}/$name.XXXXXX")
  fi
  server_pid=
  helper_pid=
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  write_notify_helper
}

cleanup() {
  local rc=$?
  for p in $helper_pid $server_pid ${under_pid:-}; do
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

# --- backing file -----------------------------------------------------------------
preallocate() {  # FILE SIZE
  fallocate -l "$2" "$1" 2>/dev/null || truncate -s "$2" "$1"
}

# prefill FILE BYTES : writes BYTES of random data to FILE (O_DIRECT if the
# file system takes it); dies on failure.
prefill() {
  local -a prefill_cmd=(fio --name=prefill --filename="$1" --rw=write --bs=1M --iodepth=16
    --ioengine=libaio --size="$2" --refill_buffers --end_fsync=1 --output=/dev/null)
  "${prefill_cmd[@]}" --direct=1 >/dev/null 2>"$work/prefill.log" ||
    "${prefill_cmd[@]}" --direct=0 >/dev/null 2>>"$work/prefill.log" ||
    die "prefill failed: $(tail -n 5 "$work/prefill.log")"
}

# --- servers ------------------------------------------------------------------------
# Waits for READY=1 on a NOTIFY_SOCKET datagram socket (sd_notify protocol).
# Exits 0 on READY=1, 2 if the watched PID (read from a file) dies, 3 on timeout.
write_notify_helper() {
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
}

# start_notified TIMEOUT LOG CMD... : starts CMD in the background with
# NOTIFY_SOCKET set, its output to LOG, and waits up to TIMEOUT seconds for
# READY=1. Sets server_pid and notify_rc (0 ready, 2 CMD died, 3 timeout);
# returns nonzero unless ready.
start_notified() {
  local timeout=$1 slog=$2
  shift 2
  local nsock=$sockdir/notify.sock
  rm -f "$nsock" "$nsock.bound" "$work/shadowd.pid"
  "$py" "$notify_helper" "$nsock" "$work/shadowd.pid" "$timeout" &
  helper_pid=$!
  for _ in $(seq 100); do [[ -e $nsock.bound ]] && break; sleep 0.05; done
  NOTIFY_SOCKET=$nsock "$@" >"$slog" 2>&1 &
  server_pid=$!
  echo "$server_pid" >"$work/shadowd.pid"
  notify_rc=0
  wait "$helper_pid" || notify_rc=$?
  helper_pid=
  rm -f "$nsock" "$nsock.bound"
  (( notify_rc == 0 ))
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

# --- fio jobs, header ----------------------------------------------------------------
# fio_cmd JOB URI : sets fcmd=(fio ...), the measured fio job JOB (randread
# randwrite seqread seqwrite) against URI, without --output.
fio_cmd() {
  local -a jargs
  case $1 in
    randread)  jargs=(--rw=randread  --bs=4k --iodepth=32) ;;
    randwrite) jargs=(--rw=randwrite --bs=4k --iodepth=32) ;;
    seqread)   jargs=(--rw=read      --bs=1M --iodepth=8) ;;
    seqwrite)  jargs=(--rw=write     --bs=1M --iodepth=8) ;;
  esac
  fcmd=(fio "--name=$1" "${fio_common[@]}" "${jargs[@]}" "--uri=$2")
}

q() {  # print a command line, single-quoting words that need it
  local out='' a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+="${out:+ }$a"
    else out+="${out:+ }'${a//\'/\'\\\'\'}'"; fi
  done
  echo "$out"
}

# host_info DIVISOR : the header's host line, and a warning when the load
# average is above the number of CPUs / DIVISOR.
host_info() {
  echo "host: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  if awk -v n="$(nproc)" -v d="$1" '{ exit !($1 > n / d) }' /proc/loadavg; then
    echo "WARNING: the machine is busy (load average above) - other work skews the figures"
  fi
}

# --- report ------------------------------------------------------------------------
# bench_py ARGS... : runs the Python program on stdin with ARGS, after the
# helpers below.
bench_py() {
  { bench_py_helpers; cat; } | "$py" - "$@"
}

bench_py_helpers() {
  cat <<'PY'
import json
import os

tck = os.sysconf("SC_CLK_TCK")


def secs(t):  # bash `times` output "1m2.345s" -> 62.345
    m, rest = t.rstrip("s").split("m")
    return int(m) * 60 + float(rest)


def cpu_usage(path):
    """CPU during a job in % of one core: the server, fio, everything else,
    from the two cpu_mark lines in PATH (before and after)."""
    try:
        a, b = [l.split() for l in open(path).read().splitlines()[:2]]
    except (OSError, ValueError):
        return None
    wall = float(b[0]) - float(a[0])
    if wall <= 0:
        return None
    busy = (int(b[1]) - int(a[1])) / tck
    srv = (int(b[2]) - int(a[2])) / tck
    fio = secs(b[3]) + secs(b[4]) - secs(a[3]) - secs(a[4])
    return {"server": 100 * srv / wall, "fio": 100 * fio / wall,
            "other": max(0.0, 100 * (busy - srv - fio) / wall), "wall_s": wall}


def fio_figures(path, job, keys):
    """fio's JSON output in PATH: its first job, and the figures KEYS (in that
    order) of its read or write side (by JOB's name)."""
    txt = open(path).read()
    fj = json.loads(txt[txt.index("{"):])["jobs"][0]
    io = fj["write" if "write" in job else "read"]
    figures = {"iops": io["iops"], "bw_bytes": io["bw_bytes"],
               "lat_mean_us": io["lat_ns"]["mean"] / 1000,
               "clat_p99_us": io["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000,
               "total_ios": io["total_ios"], "io_errors": fj.get("error", 0),
               "cpu_usr": fj.get("usr_cpu"), "cpu_sys": fj.get("sys_cpu")}
    return fj, {k: figures[k] for k in keys}


def finish(anomalies, who, doc, out_json):
    """Prints the anomalies (WHO: what should have exited cleanly), writes DOC
    to OUT_JSON as JSON and says so."""
    if anomalies:
        print("anomalies:")
        for a in anomalies:
            print("  " + a)
    else:
        print(f"anomalies: none (no fio errors, {who} exited cleanly and silently)")
    with open(out_json, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nraw results: {out_json}")
PY
}

# --- helpers for scripts that measure the shadow pool (journal.sh) ---------------------
# Added after the helpers above; nothing above depends on them.
shadowctl_bin=$build_dir/ctl/shadowctl

# to_bytes SIZE : prints SIZE (512M, 8G, 1.5G or a plain number) in bytes.
to_bytes() {
  numfmt --from=iec "$1" 2>/dev/null || die "not a size: '$1'"
}

# drop_page_cache FILE : writes back FILE's dirty pages and drops its pages from
# the page cache, so that the next server does not start warm.
drop_page_cache() {
  "$py" - "$1" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)
PY
}

# start_polled TIMEOUT LOG URI CMD... : starts a server that has no readiness
# notification (qemu-nbd, nbdkit) in the background, its output to LOG, and
# polls URI with nbdinfo for up to TIMEOUT seconds. Sets server_pid; returns
# nonzero unless the export answered.
start_polled() {
  local timeout=$1 slog=$2 uri=$3 i
  shift 3
  "$@" >"$slog" 2>&1 &
  server_pid=$!
  for ((i = 0; i < timeout * 20; i++)); do
    kill -0 "$server_pid" 2>/dev/null || return 1
    nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  return 1
}

# cpu_mark FILE PID : appends "wall busy_ticks pid_ticks children_user
# children_sys" to FILE: wall clock, CPU ticks of the whole machine (user, nice,
# system, irq, softirq), of process PID (all its threads) and the `times` of
# this shell's waited-for children (fio). Call it in the shell that runs fio,
# not in a subshell, before and after the job.
cpu_mark() {
  local f=$1 pid=$2 wall u n sy irq sirq srv=0 stat rest
  local -a a
  wall=$(date +%s.%N)
  read -r _ u n sy _ _ irq sirq _ </proc/stat
  if stat=$(<"/proc/$pid/stat") 2>/dev/null; then
    rest=${stat##*) }
    read -ra a <<<"$rest"
    srv=$(( a[11] + a[12] ))  # utime + stime
  fi
  times >"$f.times"
  echo "$wall $((u + n + sy + irq + sirq)) $srv $(sed -n 2p "$f.times")" >>"$f"
  rm -f "$f.times"
}

# thread_ticks PID : prints "tid ticks comm" (ticks = utime + stime) for every
# thread of PID (io_uring's workers are threads of it too: iou-wrk-TID).
thread_ticks() {
  local t stat rest comm
  local -a a
  for t in /proc/"$1"/task/*; do
    stat=$(<"$t/stat") 2>/dev/null || continue
    comm=${stat#*(}
    comm=${comm%)*}
    rest=${stat##*) }
    read -ra a <<<"$rest"
    echo "${t##*/} $(( a[11] + a[12] )) ${comm// /_}"
  done
}

# thread_roles PID OUT : with gdb, writes "tid role" for every thread of PID
# to OUT (role from the thread's stack: io, pool, shadow, control, roller,
# metrics, main, other). The process stops for a second or two: call it
# outside measured time. Writes nothing when gdb is missing or fails.
thread_roles() {
  local pid=$1 out=$2
  : >"$out"
  command -v gdb >/dev/null || return 0
  timeout 60 gdb -p "$pid" -batch -nx -ex 'thread apply all bt' </dev/null 2>/dev/null |
    "$py" -c '
import re, sys
main_pid = sys.argv[1]
roles = [("pool_main", "pool"), ("shadow_main", "shadow"), ("EventLoop::run", "io"),
         ("ControlServer", "control"), ("Roller", "roller"), ("etrics", "metrics"),
         ("Exposer", "metrics"), ("civetweb", "metrics"), ("mg_", "metrics")]
tid, role = None, None
def emit():
    if tid is not None:
        print(tid, role or ("main" if tid == main_pid else "other"))
for line in sys.stdin:
    m = re.match(r"Thread \d+ \(.*\(LWP (\d+)\)", line)
    if m:
        emit()
        tid, role = m.group(1), None
        continue
    if tid is not None and role is None and line.startswith("#"):
        for key, r in roles:
            if key in line:
                role = r
                break
emit()
' "$pid" >"$out" || : >"$out"
}
