#!/usr/bin/env bash
# What the per-segment access monitor costs, in one run:
#
# 1. Throughput: fio --ioengine=nbd 4k randread and 4k randwrite at iodepth 32
#    against shadowd with the monitor on and with --no-monitor, alternating
#    (on, off, on, off, ...: BENCH_ROUNDS rounds) on one preallocated file
#    filled with random data. Prints IOPS per run, the mean per configuration
#    and the overhead: (IOPS off - IOPS on) / IOPS off. Target: <= 3 %.
# 2. Memory: shadowd with --segment-size 65536 over a 1 TiB sparse file
#    (16 Mi segments). Writes touch BENCH_SEGMENTS segments twice over,
#    first one after another (4k at every 64 KiB), then scattered at random
#    over the whole TiB; after each, `shadowctl --json status` gives the
#    monitor's resident bytes and bytes per segment.
#
# Results also go, as JSON, to var/bench/monitor-overhead-<timestamp>.json.
#
# Environment:
#   BUILD_DIR=DIR              build directory (default build/); scripts/build.sh
#                              is run only if DIR/daemon/shadowd is missing
#   BENCH_SIZE=SIZE            size of the preallocated file for part 1 (default 2G)
#   BENCH_DIR=DIR              where the temporary work directory goes (default
#                              var/ in the repository; needs room for BENCH_SIZE and
#                              a file system that takes a 1 TiB sparse file); removed
#                              at exit
#   BENCH_RUNTIME=SECONDS      measured time per fio job (default 15)
#   BENCH_RAMP=SECONDS         fio ramp_time per job, not measured (default 2)
#   BENCH_ROUNDS=N             on/off rounds (default 2)
#   BENCH_JOBS="..."           subset/order of: randread randwrite (default both)
#   BENCH_SEGMENTS=N           segments touched per pattern in part 2 (default 65536)
#   BENCH_PARTS="..."          subset of: overhead memory (default both)
#   BENCH_SHADOWD_ARGS="..."   extra shadowd options for part 1, e.g. "--io-threads 1"
#   BENCH_OUT=FILE             JSON result file
#   BENCH_KEEP=1               keep the work directory (logs, fio JSON)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

py=/usr/bin/python3
[[ -x $py ]] || py=python3

build_dir=${BUILD_DIR:-build}
[[ $build_dir == /* ]] || build_dir=$root/$build_dir
shadowd_bin=$build_dir/daemon/shadowd
shadowctl_bin=$build_dir/ctl/shadowctl

runtime=${BENCH_RUNTIME:-15}
ramp=${BENCH_RAMP:-2}
size=${BENCH_SIZE:-2G}
rounds=${BENCH_ROUNDS:-2}
nseg=${BENCH_SEGMENTS:-65536}
read -ra jobs <<<"${BENCH_JOBS:-randread randwrite}"
read -ra parts <<<"${BENCH_PARTS:-overhead memory}"
read -ra shadowd_extra <<<"${BENCH_SHADOWD_ARGS:-}"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out_json=${BENCH_OUT:-$root/var/bench/monitor-overhead-$stamp.json}

log() { echo "bench: $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- prerequisites --------------------------------------------------------
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer"
[[ $nseg =~ ^[1-9][0-9]*$ ]] || die "BENCH_SEGMENTS must be a positive integer"
for j in "${jobs[@]}"; do
  case $j in randread|randwrite) ;; *) die "unknown job '$j' in BENCH_JOBS (randread randwrite)" ;; esac
done
want_overhead=0 want_memory=0
for p in "${parts[@]}"; do
  case $p in overhead) want_overhead=1 ;; memory) want_memory=1 ;;
    *) die "unknown part '$p' in BENCH_PARTS (overhead memory)" ;; esac
done
for c in fio nbdinfo; do
  command -v "$c" >/dev/null || die "$c not found (scripts/deps.sh installs it)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
if [[ ! -x $shadowd_bin || ( $want_memory == 1 && ! -x $shadowctl_bin ) ]]; then
  log "$shadowd_bin or $shadowctl_bin missing: running scripts/build.sh"
  scripts/build.sh
  [[ -x $shadowd_bin ]] || die "build did not produce $shadowd_bin"
fi
[[ $want_memory == 0 || -x $shadowctl_bin ]] || die "build did not produce $shadowctl_bin"

# --- work directory -----------------------------------------------------------
bench_parent=${BENCH_DIR:-$root/var}
mkdir -p "$bench_parent" "$(dirname "$out_json")"
work=$(mktemp -d "$bench_parent/monitor-overhead.XXXXXX")
work=$(cd "$work" && pwd)
sockdir=$work
if (( ${#sockdir} > 80 )); then  # sun_path holds 108 bytes
  sockdir=$(mktemp -d "${TMPDIR:-/tmp}/monitor-overhead.XXXXXX")
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

# --- shadowd start/stop with sd_notify readiness ---------------------------------
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

# start_shadowd LOG ARGS... : sets server_pid; returns nonzero on failure.
start_shadowd() {
  local slog=$1; shift
  local nsock=$sockdir/notify.sock
  rm -f "$nsock" "$nsock.bound" "$work/shadowd.pid"
  "$py" "$notify_helper" "$nsock" "$work/shadowd.pid" 60 &
  helper_pid=$!
  for _ in $(seq 100); do [[ -e $nsock.bound ]] && break; sleep 0.05; done
  NOTIFY_SOCKET=$nsock "$shadowd_bin" "$@" >"$slog" 2>&1 &
  server_pid=$!
  echo "$server_pid" >"$work/shadowd.pid"
  local hrc=0
  wait "$helper_pid" || hrc=$?
  helper_pid=
  rm -f "$nsock" "$nsock.bound"
  (( hrc == 0 )) || { log "shadowd did not report READY=1 (helper rc $hrc); log:"; tail -n 20 "$slog" >&2; return 1; }
}

stop_shadowd() {  # stops $server_pid; sets server_rc (exit status, or "killed")
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

q() {  # print a command line, single-quoting words that need it
  local out='' a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+="${out:+ }$a"
    else out+="${out:+ }'${a//\'/\'\\\'\'}'"; fi
  done
  echo "$out"
}

manifest=$work/manifest.tsv   # part 1: round, config, job, fio-rc, json
memfile=$work/memory.tsv      # part 2: pattern, segments touched, status json
: >"$manifest"
: >"$memfile"

{
  echo "monitor-overhead benchmark  $stamp"
  echo "host: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  if awk -v n="$(nproc)" '{ exit !($1 > n / 4) }' /proc/loadavg; then
    echo "WARNING: the machine is busy (load average above) - other work skews the figures"
  fi
  echo "shadowd: $("$shadowd_bin" --version 2>&1 | head -n1)   fio: $(fio --version)"
} | tee "$work/header.txt"

# --- part 1: throughput, monitor on vs off -------------------------------------------
fio_common=(--ioengine=nbd --numjobs=1 --time_based "--runtime=${runtime}s"
            "--ramp_time=${ramp}s" --output-format=json)
job_args() {
  case $1 in
    randread)  jargs=(--rw=randread  --bs=4k --iodepth=32) ;;
    randwrite) jargs=(--rw=randwrite --bs=4k --iodepth=32) ;;
  esac
}

if (( want_overhead )); then
  file=$work/backing.img
  log "preallocating $size at $file and filling it with random data"
  fallocate -l "$size" "$file" 2>/dev/null || truncate -s "$size" "$file"
  file_bytes=$(stat -c %s "$file")
  prefill_cmd=(fio --name=prefill --filename="$file" --rw=write --bs=1M --iodepth=16
    --ioengine=libaio --size="$file_bytes" --refill_buffers --end_fsync=1 --output=/dev/null)
  "${prefill_cmd[@]}" --direct=1 >/dev/null 2>"$work/prefill.log" ||
    "${prefill_cmd[@]}" --direct=0 >/dev/null 2>>"$work/prefill.log" ||
    die "prefill failed: $(tail -n 5 "$work/prefill.log")"

  sock=$sockdir/nbd.sock
  uri="nbd+unix:///?socket=$sock"
  base_args=(--backing "$file" --unix "$sock" --control "$sockdir/ctl.sock" --foreground
             --log-level warn "${shadowd_extra[@]}")
  {
    echo
    echo "part 1: $file ($file_bytes bytes, random data), $rounds round(s) of: monitor on, monitor off"
    echo "  on:  $(q shadowd "${base_args[@]}")" | sed "s|$sockdir|DIR|g"
    echo "  off: $(q shadowd "${base_args[@]}" --no-monitor)" | sed "s|$sockdir|DIR|g"
    for j in "${jobs[@]}"; do
      job_args "$j"
      echo "  fio: $(q fio "--name=$j" "${fio_common[@]}" "${jargs[@]}" '--uri=nbd+unix:///?socket=DIR/nbd.sock')"
    done
  } | tee -a "$work/header.txt"

  for ((r = 1; r <= rounds; r++)); do
    for cfg in on off; do
      args=("${base_args[@]}")
      [[ $cfg == off ]] && args+=(--no-monitor)
      slog=$work/shadowd-r$r-$cfg.log
      log "round $r: monitor $cfg"
      rm -f "$sock"
      start_shadowd "$slog" "${args[@]}" || die "shadowd (monitor $cfg) did not start"
      for j in "${jobs[@]}"; do
        job_args "$j"
        out=$work/r$r-$cfg-$j.json
        log "round $r, monitor $cfg: $j (${runtime}s)"
        frc=0
        fio "--name=$j" "${fio_common[@]}" "${jargs[@]}" "--uri=$uri" "--output=$out" \
          >"$work/r$r-$cfg-$j.fio.log" 2>&1 || frc=$?
        (( frc == 0 )) || log "fio $j exited $frc: $(tail -n 3 "$work/r$r-$cfg-$j.fio.log" | tr '\n' ' ')"
        printf '%s\t%s\t%s\t%s\t%s\n' "$r" "$cfg" "$j" "$frc" "$out" >>"$manifest"
      done
      stop_shadowd
      [[ $server_rc == 0 ]] || log "shadowd (monitor $cfg) exited with status $server_rc"
      printf '%s\t%s\t-\tserver-exit=%s\t%s\n' "$r" "$cfg" "$server_rc" "$slog" >>"$manifest"
    done
  done
fi

# --- part 2: monitor memory over a 1 TiB sparse file ---------------------------------
if (( want_memory )); then
  big=$work/sparse-1t.img
  truncate -s 1T "$big" || die "cannot create a 1 TiB sparse file in $work (BENCH_DIR)"
  sock=$sockdir/big.sock
  ctl=$sockdir/big-ctl.sock
  uri="nbd+unix:///?socket=$sock"
  args=(--backing "$big" --unix "$sock" --control "$ctl" --segment-size 65536 --foreground
        --log-level warn)
  {
    echo
    echo "part 2: 1 TiB sparse file, 64 KiB segments, $nseg segments touched per pattern"
    echo "  $(q shadowd "${args[@]}" | sed "s|$sockdir|DIR|g; s|$work|DIR|g")"
  } | tee -a "$work/header.txt"
  rm -f "$sock" "$ctl"
  start_shadowd "$work/shadowd-1t.log" "${args[@]}" || die "shadowd over 1 TiB did not start"
  status() {  # pattern touched -> appends a status line
    local js
    js=$("$shadowctl_bin" --socket "$ctl" --json status) || die "shadowctl status failed"
    printf '%s\t%s\t%s\n' "$1" "$2" "$(tr -d '\n' <<<"$js")" >>"$memfile"
  }
  status idle 0
  # One 4k write at the start of each of the first $nseg segments.
  log "1 TiB: 4k writes at every 64 KiB, $nseg segments in a row"
  fio --name=seq --ioengine=nbd "--uri=$uri" --rw=write:60k --bs=4k --iodepth=32 \
    "--number_ios=$nseg" --output=/dev/null >"$work/seq.fio.log" 2>&1 ||
    die "fio (sequential) failed: $(tail -n 3 "$work/seq.fio.log")"
  status sequential "$nseg"
  # $nseg more 4k writes at random over the whole TiB (a few may hit a segment twice).
  log "1 TiB: $nseg random 4k writes over the whole device"
  fio --name=rand --ioengine=nbd "--uri=$uri" --rw=randwrite --bs=4k --iodepth=32 \
    "--number_ios=$nseg" --norandommap --randrepeat=0 --output=/dev/null \
    >"$work/rand.fio.log" 2>&1 ||
    die "fio (random) failed: $(tail -n 3 "$work/rand.fio.log")"
  status "sequential+random" "$nseg"
  stop_shadowd
  [[ $server_rc == 0 ]] || log "shadowd (1 TiB) exited with status $server_rc"
  printf 'server-exit\t%s\t%s\n' "$server_rc" "$work/shadowd-1t.log" >>"$memfile"
fi

# --- report ------------------------------------------------------------------------
echo
"$py" - "$manifest" "$memfile" "$work/header.txt" "$out_json" "$stamp" "$rounds" "${jobs[*]}" <<'PY'
import json, os, statistics, sys
manifest, memfile, header, out_json, stamp, rounds, jobs = sys.argv[1:8]
jobs = jobs.split()
anomalies = []
runs = []   # {round, config, job, iops, ...}
for line in open(manifest):
    r, cfg, job, status, path = line.rstrip("\n").split("\t")
    if job == "-":
        if status != "server-exit=0":
            anomalies.append(f"round {r} monitor {cfg}: shadowd {status}")
        if os.path.exists(path) and os.path.getsize(path):
            anomalies.append(f"round {r} monitor {cfg}: shadowd wrote to stderr: "
                             + open(path, errors="replace").read().strip().splitlines()[-1][:200])
        continue
    run = {"round": int(r), "config": cfg, "job": job, "fio_rc": int(status)}
    try:
        txt = open(path).read()
        fj = json.loads(txt[txt.index("{"):])["jobs"][0]
        io = fj["write" if "write" in job else "read"]
        run.update(iops=io["iops"], lat_mean_us=io["lat_ns"]["mean"] / 1000,
                   clat_p99_us=io["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000,
                   total_ios=io["total_ios"], io_errors=fj.get("error", 0),
                   cpu_usr=fj.get("usr_cpu"), cpu_sys=fj.get("sys_cpu"))
        if fj.get("error", 0):
            anomalies.append(f"round {r} monitor {cfg} {job}: fio error {fj['error']}")
    except Exception as e:  # noqa: BLE001
        anomalies.append(f"round {r} monitor {cfg} {job}: no fio result ({e})")
    if run["fio_rc"]:
        anomalies.append(f"round {r} monitor {cfg} {job}: fio exit {run['fio_rc']}")
    runs.append(run)

summary = {}
if runs:
    print("part 1: IOPS, monitor on vs off (4k, iodepth 32)")
    head = f"{'job':<11}{'round':>6}{'on':>12}{'off':>12}"
    print(head)
    print("-" * len(head))
    for job in jobs:
        for r in range(1, int(rounds) + 1):
            row = {c: next((x.get("iops") for x in runs
                            if x["job"] == job and x["round"] == r and x["config"] == c), None)
                   for c in ("on", "off")}
            cells = "".join(f"{v:>12,.0f}" if v else f"{'ERR':>12}" for v in (row["on"], row["off"]))
            print(f"{job:<11}{r:>6}{cells}")
    print()
    head = (f"{'job':<11}{'median on':>12}{'median off':>12}{'overhead':>10}{'paired':>9}"
            f"{'spread on':>11}{'spread off':>11}")
    print(head)
    print("-" * len(head))
    for job in jobs:
        vals = {c: [x["iops"] for x in runs if x["job"] == job and x["config"] == c
                    and x.get("iops") and not x.get("io_errors")] for c in ("on", "off")}
        if not vals["on"] or not vals["off"]:
            print(f"{job:<11}{'ERR':>12}{'ERR':>12}")
            continue
        on, off = statistics.median(vals["on"]), statistics.median(vals["off"])
        over = (off - on) / off * 100
        # Each round runs on and off back to back: compare within a round.
        pairs = []
        for r in range(1, int(rounds) + 1):
            pr = {c: next((x.get("iops") for x in runs if x["job"] == job and x["round"] == r
                           and x["config"] == c and not x.get("io_errors")), None)
                  for c in ("on", "off")}
            if pr["on"] and pr["off"]:
                pairs.append((pr["off"] - pr["on"]) / pr["off"] * 100)
        paired = statistics.median(pairs) if pairs else float("nan")
        spread = {c: (max(v) - min(v)) / statistics.mean(v) * 100 for c, v in vals.items()}
        summary[job] = {"iops_on_median": on, "iops_off_median": off,
                        "iops_on_mean": statistics.mean(vals["on"]),
                        "iops_off_mean": statistics.mean(vals["off"]),
                        "overhead_percent": over, "paired_overhead_percent": paired,
                        "paired_overhead_by_round": pairs,
                        "spread_on_percent": spread["on"], "spread_off_percent": spread["off"],
                        "runs_on": vals["on"], "runs_off": vals["off"]}
        print(f"{job:<11}{on:>12,.0f}{off:>12,.0f}{over:>9.1f}%{paired:>8.1f}%"
              f"{spread['on']:>10.1f}%{spread['off']:>10.1f}%")
    print("overhead = (off - on) / off of the medians; positive: slower with the monitor;")
    print("paired = the median over rounds of each round's own (off - on) / off. target <= 3 %.")
    print("spread = (max - min) / mean over the rounds of one configuration: the noise floor.")
    print()

memory = []
for line in open(memfile):
    pattern, touched, payload = line.rstrip("\n").split("\t", 2)
    if pattern == "server-exit":
        if touched != "0":
            anomalies.append(f"1 TiB shadowd exit {touched}")
        if os.path.exists(payload) and os.path.getsize(payload):
            anomalies.append("1 TiB shadowd wrote to stderr: "
                             + open(payload, errors="replace").read().strip().splitlines()[-1][:200])
        continue
    st = json.loads(payload)
    m = st.get("monitor", {})
    memory.append({"after": pattern, "touched_per_pattern": int(touched),
                   "size_bytes": st.get("export", {}).get("size_bytes"),
                   "segment_bytes": st.get("segment_bytes"),
                   "segments": m.get("segments"), "segments_active": m.get("segments_active"),
                   "dense_bytes_virtual": m.get("dense_bytes_virtual"),
                   "dense_bytes_resident": m.get("dense_bytes_resident"),
                   "bytes_per_segment_resident": m.get("bytes_per_segment_resident"),
                   "history_bytes": m.get("history_bytes"), "monitor": m})
if memory:
    def mib(b):
        return f"{b / 1048576:,.2f} MiB" if b is not None else "-"
    first = memory[0]
    print(f"part 2: monitor memory, 1 TiB sparse file, {first['segment_bytes']} B segments, "
          f"{first['segments']:,} segments")
    print(f"  dense state (virtual): {mib(first['dense_bytes_virtual'])} = "
          f"{first['dense_bytes_virtual'] / first['segments']:.0f} B per segment")
    head = (f"{'after':<19}{'active segs':>12}{'resident':>14}{'B/segment':>11}"
            f"{'B/active seg':>14}{'history':>12}")
    print(head)
    print("-" * len(head))
    for x in memory:
        act = x["segments_active"] or 0
        per_act = f"{x['dense_bytes_resident'] / act:>14,.1f}" if act else f"{'-':>14}"
        print(f"{x['after']:<19}{act:>12,}{mib(x['dense_bytes_resident']):>14}"
              f"{x['bytes_per_segment_resident']:>11.3f}{per_act}{mib(x['history_bytes']):>12}")
    print("resident = pages of the dense per-segment array in RAM (+ its page map);")
    print("B/segment = resident / all segments (shadowctl's bytes_per_segment_resident).")
    print()

if anomalies:
    print("anomalies:")
    for a in anomalies:
        print("  " + a)
else:
    print("anomalies: none (no fio errors, shadowd exited cleanly and silently)")
doc = {"timestamp": stamp, "header": open(header).read(), "overhead": summary, "runs": runs,
       "memory": memory, "anomalies": anomalies}
with open(out_json, "w") as f:
    json.dump(doc, f, indent=1)
print(f"\nraw results: {out_json}")
PY
