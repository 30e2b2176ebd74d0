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
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

shadowctl_bin=$build_dir/ctl/shadowctl
rounds=${BENCH_ROUNDS:-2}
nseg=${BENCH_SEGMENTS:-65536}
read -ra jobs <<<"${BENCH_JOBS:-randread randwrite}"
read -ra parts <<<"${BENCH_PARTS:-overhead memory}"
out_json=${BENCH_OUT:-$root/var/bench/monitor-overhead-$stamp.json}

# --- prerequisites --------------------------------------------------------
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer"
[[ $nseg =~ ^[1-9][0-9]*$ ]] || die "BENCH_SEGMENTS must be a positive integer"
check_words job BENCH_JOBS "randread randwrite" "${jobs[@]}"
check_words part BENCH_PARTS "overhead memory" "${parts[@]}"
want_overhead=0 want_memory=0
[[ " ${parts[*]} " != *" overhead "* ]] || want_overhead=1
[[ " ${parts[*]} " != *" memory "* ]] || want_memory=1
need_tools fio nbdinfo
if [[ ! -x $shadowd_bin || ( $want_memory == 1 && ! -x $shadowctl_bin ) ]]; then
  build_shadowd "$shadowd_bin or $shadowctl_bin"
fi
[[ $want_memory == 0 || -x $shadowctl_bin ]] || die "build did not produce $shadowctl_bin"

# --- work directory, shadowd start with sd_notify readiness ----------------------
bench_workdir monitor-overhead "$(dirname "$out_json")"

# start_shadowd LOG ARGS... : sets server_pid; returns nonzero on failure.
start_shadowd() {
  local slog=$1; shift
  start_notified 60 "$slog" "$shadowd_bin" "$@" ||
    { log "shadowd did not report READY=1 (helper rc $notify_rc); log:"; tail -n 20 "$slog" >&2; return 1; }
}

manifest=$work/manifest.tsv   # part 1: round, config, job, fio-rc, json
memfile=$work/memory.tsv      # part 2: pattern, segments touched, status json
: >"$manifest"
: >"$memfile"

{
  echo "monitor-overhead benchmark  $stamp"
  host_info 4
  echo "shadowd: $("$shadowd_bin" --version 2>&1 | head -n1)   fio: $(fio --version)"
} | tee "$work/header.txt"

# --- part 1: throughput, monitor on vs off -------------------------------------------
if (( want_overhead )); then
  file=$work/backing.img
  log "preallocating $size at $file and filling it with random data"
  preallocate "$file" "$size"
  file_bytes=$(stat -c %s "$file")
  prefill "$file" "$file_bytes"

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
      fio_cmd "$j" 'nbd+unix:///?socket=DIR/nbd.sock'
      echo "  fio: $(q "${fcmd[@]}")"
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
        fio_cmd "$j" "$uri"
        out=$work/r$r-$cfg-$j.json
        log "round $r, monitor $cfg: $j (${runtime}s)"
        frc=0
        "${fcmd[@]}" "--output=$out" >"$work/r$r-$cfg-$j.fio.log" 2>&1 || frc=$?
        (( frc == 0 )) || log "fio $j exited $frc: $(tail -n 3 "$work/r$r-$cfg-$j.fio.log" | tr '\n' ' ')"
        printf '%s\t%s\t%s\t%s\t%s\n' "$r" "$cfg" "$j" "$frc" "$out" >>"$manifest"
      done
      stop_server
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
  stop_server
  [[ $server_rc == 0 ]] || log "shadowd (1 TiB) exited with status $server_rc"
  printf 'server-exit\t%s\t%s\n' "$server_rc" "$work/shadowd-1t.log" >>"$memfile"
fi

# --- report ------------------------------------------------------------------------
echo
bench_py "$manifest" "$memfile" "$work/header.txt" "$out_json" "$stamp" "$rounds" "${jobs[*]}" <<'PY'
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
        fj, figures = fio_figures(path, job, ("iops", "lat_mean_us", "clat_p99_us", "total_ios",
                                              "io_errors", "cpu_usr", "cpu_sys"))
        run.update(figures)
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

finish(anomalies, "shadowd",
       {"timestamp": stamp, "header": open(header).read(), "overhead": summary, "runs": runs,
        "memory": memory, "anomalies": anomalies}, out_json)
PY
