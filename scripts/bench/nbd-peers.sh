#!/usr/bin/env bash
# Benchmark shadowd against its peers, qemu-nbd and nbdkit, on one backing file
# in one run: fio --ioengine=nbd over a Unix socket, four jobs per server
# (4k randread and 4k randwrite at iodepth 32, 1 MiB sequential read and write
# at iodepth 8). Prints a table (IOPS for 4k, MB/s for 1 MiB, and the ratio
# shadowd/qemu-nbd) and writes the raw fio results as JSON to
# var/bench/nbd-peers-<timestamp>.json. The server shadowd-nbd is shadowd with
# an NBD backing, `--backing nbd+unix:///?socket=...` of a qemu-nbd serving
# the file (started with it, as qemu-nbd is below): its ratio to plain
# qemu-nbd is the cost of the extra hop.
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
#   BENCH_SERVERS="..."        subset/order of: shadowd qemu-nbd nbdkit shadowd-nbd
#                              (default: shadowd qemu-nbd nbdkit)
#   BENCH_JOBS="..."           subset/order of: randread randwrite seqread seqwrite
#   BENCH_SHADOWD_ARGS="..."   extra shadowd options, e.g. "--io-threads 1"
#   BENCH_NBDKIT_CACHE=MODE    nbdkit file plugin cache= (default none)
#   BENCH_OUT=FILE             JSON result file (default var/bench/nbd-peers-<ts>.json)
#   BENCH_KEEP=1               keep the work directory (backing file, logs, fio JSON)
#   BENCH_TLS=1                NBD over TLS instead (x509 certificates made by
#                              scripts/tls-certs.sh; shadowd --tls require,
#                              qemu-nbd --tls-creds, nbdkit --tls=require), each
#                              server on TCP 127.0.0.1 (fio's nbd engine cannot
#                              name certificates in its URI: it runs as nobody
#                              with them in libnbd's default $HOME/.pki/libnbd)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

prefill=${BENCH_PREFILL:-1}
read -ra servers <<<"${BENCH_SERVERS:-shadowd qemu-nbd nbdkit}"
read -ra jobs <<<"${BENCH_JOBS:-randread randwrite seqread seqwrite}"
nbdkit_cache=${BENCH_NBDKIT_CACHE:-none}
tls=${BENCH_TLS:-0}
[[ $tls == 0 || $tls == 1 ]] || die "BENCH_TLS must be 0 or 1 (got '$tls')"
out_json=${BENCH_OUT:-$root/var/bench/nbd-peers-$stamp.json}

# --- prerequisites --------------------------------------------------------
check_words server BENCH_SERVERS "shadowd qemu-nbd nbdkit shadowd-nbd" "${servers[@]}"
need=(fio nbdinfo)
((tls == 0)) || need+=(certtool psktool setpriv)
for s in "${servers[@]}"; do
  case $s in
    shadowd) ;;
    shadowd-nbd) need+=(qemu-nbd) ;;
    *) need+=("$s") ;;
  esac
done
check_words job BENCH_JOBS "randread randwrite seqread seqwrite" "${jobs[@]}"
need_tools "${need[@]}"

if [[ " ${servers[*]} " == *" shadowd"* && ! -x $shadowd_bin ]]; then
  build_shadowd "$shadowd_bin"
fi

# --- work directory, backing file -----------------------------------------
bench_workdir nbd-peers "$(dirname "$out_json")"

if [[ -n ${BENCH_FILE:-} ]]; then
  [[ ${BENCH_OVERWRITE_OK:-0} == 1 ]] ||
    die "BENCH_FILE=$BENCH_FILE would be overwritten; set BENCH_OVERWRITE_OK=1 to confirm"
  [[ -e $BENCH_FILE ]] || die "BENCH_FILE=$BENCH_FILE does not exist"
  file=$(realpath "$BENCH_FILE")
else
  file=$work/backing.img
  log "preallocating $size at $file"
  preallocate "$file" "$size"
fi
file_bytes=$("$py" -c 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); print(os.lseek(fd, 0, os.SEEK_END))' "$file")
(( file_bytes >= 64 * 1024 * 1024 )) || die "backing file too small ($file_bytes bytes)"


if [[ $prefill == 1 ]]; then
  log "prefilling $file_bytes bytes with random data"
  prefill "$file" "$file_bytes"
fi
# One direct read of the whole file first, so that caches below the page
# cache (a VM host's, a disk's) are in the same state for every server: the
# first server measured would otherwise read cold where the others read warm.
log "warming the device below the page cache (one O_DIRECT pass)"
dd if="$file" of=/dev/null bs=4M iflag=direct status=none 2>/dev/null ||
  dd if="$file" of=/dev/null bs=4M status=none
drop_page_cache "$file"

# --- TLS: certificates, and a home for fio with libnbd's default certificate place
if ((tls)); then
  pki=$work/pki
  "$root/scripts/tls-certs.sh" "$pki" >/dev/null
  fio_home=$work/fio-home
  mkdir -p "$fio_home/.pki/libnbd"
  cp "$pki"/client/*.pem "$fio_home/.pki/libnbd/"
  chown -R 65534:65534 "$fio_home"
  chmod 755 "$work"
  tls_port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

# The URI fio uses, and the one nbdinfo (as root) checks readiness with.
server_uri() {  # socket
  if ((tls)); then echo "nbds://localhost:$tls_port/"; else echo "nbd+unix:///?socket=$1"; fi
}
probe_uri() {  # socket
  if ((tls)); then echo "nbds://localhost:$tls_port/?tls-certificates=$pki/client"; else server_uri "$1"; fi
}

# --- servers ----------------------------------------------------------------
# shadowd-nbd's backing: qemu-nbd on this socket, over the same file.
under_sock=$sockdir/under.sock
under_cmd=(qemu-nbd -f raw --cache=none --aio=io_uring -t --shared=16 -k "$under_sock" "$file")
under_pid=

server_cmd() {  # server socket -> prints nothing, sets cmd=()
  local s=$1 sock=$2 backing=$file
  [[ $s != shadowd-nbd ]] || backing="nbd+unix:///?socket=$under_sock"
  if ((tls)); then
    case $s in
      shadowd|shadowd-nbd)
        cmd=("$shadowd_bin" --backing "$backing" --listen "127.0.0.1:$tls_port" --foreground
             --log-level warn --tls require --tls-certificates "$pki/server" "${shadowd_extra[@]}") ;;
      qemu-nbd) cmd=(qemu-nbd -f raw --cache=none --aio=io_uring -t --shared=16
                     --object "tls-creds-x509,id=tls0,endpoint=server,dir=$pki/server"
                     --tls-creds tls0 -b 127.0.0.1 -p "$tls_port" "$file") ;;
      nbdkit) cmd=(nbdkit -i 127.0.0.1 -p "$tls_port" --foreground --exit-with-parent
                   --tls=require "--tls-certificates=$pki/server" file "$file" cache="$nbdkit_cache") ;;
    esac
    return
  fi
  case $s in
    shadowd|shadowd-nbd)
      cmd=("$shadowd_bin" --backing "$backing" --unix "$sock" --foreground
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
    shadowd-nbd) echo "$("$shadowd_bin" --version 2>&1 | head -n1) over $(qemu-nbd --version 2>&1 | head -n1)" ;;
    qemu-nbd) qemu-nbd --version 2>&1 | head -n1 ;;
    nbdkit) nbdkit --version 2>&1 | head -n1 ;;
  esac
}

# qemu-nbd and nbdkit have no readiness notification here: poll (bounded)
# until process $1 answers nbdinfo on URI $3 (socket $2, when not TLS).
wait_polled() {  # pid socket uri
  for _ in $(seq 200); do
    kill -0 "$1" 2>/dev/null || return 1
    if { ((tls)) || [[ -S $2 ]]; } && nbdinfo --size "$3" >/dev/null 2>&1; then return 0; fi
    sleep 0.05
  done
  return 1
}

# Start server $1 on socket $2, log to $3; sets server_pid; returns nonzero on failure.
start_server() {
  local s=$1 sock=$2 slog=$3 uri
  uri=$(probe_uri "$2")
  server_cmd "$s" "$sock"
  rm -f "$sock"
  if [[ $s == shadowd-nbd ]]; then
    rm -f "$under_sock"
    "${under_cmd[@]}" >"${slog%.log}-under.log" 2>&1 &
    under_pid=$!
    wait_polled "$under_pid" "$under_sock" "nbd+unix:///?socket=$under_sock" ||
      { log "$s: qemu-nbd below it did not become ready"; return 1; }
  fi
  if [[ $s == shadowd || $s == shadowd-nbd ]]; then
    start_notified 30 "$slog" "${cmd[@]}" ||
      { log "$s did not report READY=1 (helper rc $notify_rc)"; return 1; }
  else
    "${cmd[@]}" >"$slog" 2>&1 &
    server_pid=$!
    wait_polled "$server_pid" "$sock" "$uri" || { log "$s did not become ready"; return 1; }
  fi
  nbdinfo --size "$uri" >/dev/null 2>&1 || { log "$s: nbdinfo failed"; return 1; }
}

stop_under() {  # the qemu-nbd below shadowd-nbd, if running
  [[ -n $under_pid ]] || return 0
  local p=$under_pid
  under_pid=
  kill -TERM "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
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

# --- header -----------------------------------------------------------------
header=$work/header.txt
{
  echo "nbd-peers benchmark  $stamp"
  host_info 2
  echo "backing: $file ($file_bytes bytes$([[ $prefill == 1 ]] && echo ', prefilled with random data'); one O_DIRECT warm-up pass; page cache dropped before each server)"
  echo "fio: $(fio --version)   runtime ${runtime}s + ramp ${ramp}s per job"
  if ((tls)); then echo "servers:"; else echo "servers (SOCK = a Unix socket in the work directory):"; fi
  for s in "${servers[@]}"; do
    server_cmd "$s" SOCK
    printf '  %-9s %s   [%s]\n' "$s" "$(q "${cmd[@]}")" "$(server_version "$s")"
    [[ $s != shadowd-nbd ]] || printf '  %-9s %s\n' "  below:" "$(q "${under_cmd[@]}")"
  done
  [[ " ${servers[*]} " != *" shadowd-nbd "* ]] ||
    echo "  (shadowd-nbd's CPU column counts shadowd only: the qemu-nbd below it is in 'other')"
  [[ " ${servers[*]} " != *" nbdkit "* || $nbdkit_cache != none ]] ||
    echo "  (nbdkit uses cache=none: pages are evicted after use; qemu-nbd and shadowd use O_DIRECT)"
  ((tls == 0)) || echo "TLS: x509 (scripts/tls-certs.sh: RSA keys, certtool defaults), TCP 127.0.0.1:$tls_port; fio runs as nobody with HOME=$fio_home (client certificates in .pki/libnbd)"
  echo "fio jobs (one connection each, run one after another):"
  for j in "${jobs[@]}"; do
    fio_cmd "$j" "$(server_uri SOCK)"
    printf '  %-9s %s\n' "$j" "$(q "${fcmd[@]}" --output=FILE)"
  done
} >"$header"
cat "$header"
echo

# --- run ----------------------------------------------------------------------
manifest=$work/manifest.tsv
: >"$manifest"
for s in "${servers[@]}"; do
  sock=$sockdir/$s.sock
  uri=$(server_uri "$sock")
  slog=$work/$s.log
  drop_page_cache "$file"
  log "starting $s"
  if ! start_server "$s" "$sock" "$slog"; then
    log "$s failed to start; log:"; tail -n 20 "$slog" >&2 || true
    if [[ -n $server_pid ]]; then stop_server; fi
    stop_under
    printf '%s\t-\tstart-failed\t\n' "$s" >>"$manifest"
    continue
  fi
  for j in "${jobs[@]}"; do
    fio_cmd "$j" "$uri"
    out=$work/$s-$j.json
    if ((tls)); then  # fio as nobody, finding the certificates in its HOME
      fcmd=(setpriv --reuid=65534 --regid=65534 --clear-groups env "HOME=$fio_home" "${fcmd[@]}")
      out=$fio_home/$s-$j.json
    fi
    log "$s: $j (${runtime}s)"
    if ! kill -0 "$server_pid" 2>/dev/null; then
      log "$s died before $j"
      printf '%s\t%s\tserver-died\t\n' "$s" "$j" >>"$manifest"
      continue
    fi
    frc=0
    rm -f "${out%.json}.cpu"
    cpu_snap "${out%.json}.cpu"
    "${fcmd[@]}" "--output=$out" >"$work/$s-$j.fio.log" 2>&1 || frc=$?
    cpu_snap "${out%.json}.cpu"
    if (( frc != 0 )); then
      log "$s: fio $j exited $frc: $(tail -n 3 "$work/$s-$j.fio.log" | tr '\n' ' ')"
    fi
    printf '%s\t%s\tfio-rc=%s\t%s\n' "$s" "$j" "$frc" "$out" >>"$manifest"
  done
  stop_server
  stop_under
  printf '%s\t-\tserver-exit=%s\t%s\n' "$s" "$server_rc" "$slog" >>"$manifest"
  [[ $server_rc == 0 ]] || log "$s exited with status $server_rc"
  if [[ -s $slog ]]; then
    log "$s wrote to stderr (last lines):"
    tail -n 10 "$slog" | sed 's/^/    /' >&2
  fi
done

# --- report -------------------------------------------------------------------
bench_py "$manifest" "$header" "$out_json" "$stamp" "${servers[*]}" "${jobs[*]}" <<'PY'
import json, os, sys
manifest, header, out_json, stamp = sys.argv[1:5]
servers, jobs = sys.argv[5].split(), sys.argv[6].split()
labels = {"randread": "4k randread  qd32 (IOPS)", "randwrite": "4k randwrite qd32 (IOPS)",
          "seqread": "1M seq read  qd8  (MB/s)", "seqwrite": "1M seq write qd8  (MB/s)"}
results = {s: {} for s in servers}

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
            fj, figures = fio_figures(path, j, ("iops", "bw_bytes", "lat_mean_us", "clat_p99_us",
                                                "io_errors", "total_ios", "cpu_usr", "cpu_sys"))
            r.update(figures, fio=fj)
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
# Ratio columns: shadowd over the file, and shadowd over qemu-nbd (the NBD
# backing), each to plain qemu-nbd.
ratios = [(s, f"{s}/qemu") for s in ("shadowd", "shadowd-nbd")
          if s in servers and "qemu-nbd" in servers]
head = f"{'job':<26}" + "".join(f"{c:>12}" for c in cols)
head += "".join(f"{title:>18}" for _, title in ratios)
lines = [head, "-" * len(head)]
for j in jobs:
    row = f"{labels[j]:<26}"
    for c in cols:
        v = value(c, j)
        row += f"{'ERR':>12}" if v is None else f"{v:>12,.0f}"
    for s, _ in ratios:
        a, b = value(s, j), value("qemu-nbd", j)
        row += f"{(a / b):>17.2f}x" if a is not None and b else f"{'-':>18}"
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
finish(anomalies, "servers",
       {"timestamp": stamp, "header": open(header).read(), "table": table,
        "servers": servers, "jobs": jobs, "anomalies": anomalies,
        "server_notes": notes, "results": results}, out_json)
PY
