#!/usr/bin/env bash
# A pool far too small for the write rate: shadowd on a sparse backing file
# with a small shadow pool, fio --ioengine=nbd writing random incompressible
# blocks as fast as it can (time-based). The pool fills every few seconds, so
# retention is cut over and over; the question is what that costs. Prints the
# write throughput, and from `shadowctl pool` and the log: retention shrinks,
# times journal writes waited for room (and how long in all), and how often
# history was degraded and restarted. Run it with BENCH_SHADOWD_ARGS=
# "--pool-full-wait 0" to see history degrade instead of writes waiting.
#
# Environment:
#   BUILD_DIR=DIR            build directory (default build/)
#   BENCH_SIZE=SIZE          backing file (default 2G)
#   BENCH_POOL_SIZE=SIZE     pool file, fallocated (default 256M)
#   BENCH_ZONE_SIZE=SIZE     pool zone size (default 4M)
#   BENCH_RUNTIME=S          seconds of writing (default 20)
#   BENCH_BS=SIZE            fio block size (default 1M)
#   BENCH_IODEPTH=N          fio iodepth (default 16)
#   BENCH_SHADOWD_ARGS="..." extra shadowd options
#   BENCH_DIR=DIR, BENCH_KEEP=1   as in lib.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runtime=${BENCH_RUNTIME:-20}
pool_size=${BENCH_POOL_SIZE:-256M}
zone_size=${BENCH_ZONE_SIZE:-4M}
bs=${BENCH_BS:-1M}
iodepth=${BENCH_IODEPTH:-16}
need_tools fio fallocate
[[ -x $shadowd_bin ]] || build_shadowd "$shadowd_bin"
shadowctl_bin=$build_dir/ctl/shadowctl

bench_workdir pool-full "$root/var/bench"
backing=$work/backing.img
pool=$work/pool.img
truncate -s "$size" "$backing"
fallocate -l "$pool_size" "$pool" || die "cannot fallocate $pool_size at $pool"
sock=$sockdir/nbd.sock
ctl=$sockdir/ctl.sock
slog=$work/shadowd.log
cmd=("$shadowd_bin" --backing "$backing" --pool "$pool" --init --zone-size "$zone_size"
     --unix "$sock" --control "$ctl" --state-dir "$work/state" --foreground --log-level info
     "${shadowd_extra[@]}")
log "shadowd: $(q "${cmd[@]}")"
start_notified 30 "$slog" "${cmd[@]}" || die "shadowd did not start: $(tail -n 5 "$slog")"

fio_job=(fio --name=fill --ioengine=nbd "--uri=nbd+unix:///?socket=$sock" --rw=randwrite
         "--bs=$bs" "--iodepth=$iodepth" "--size=$size" --time_based "--runtime=${runtime}s"
         --refill_buffers --randrepeat=0 --output-format=json "--output=$work/fio.json")
log "fio: $(q "${fio_job[@]}")"
"${fio_job[@]}" >"$work/fio.out" 2>&1 || die "fio failed: $(tail -n 5 "$work/fio.out")"
"$shadowctl_bin" --socket "$ctl" pool --json >"$work/pool.json"
"$shadowctl_bin" --socket "$ctl" status --json >"$work/status.json"
stop_server

"$py" - "$work" "$size" "$pool_size" "$bs" "$iodepth" "$runtime" <<'EOF'
import json, sys
work, size, pool_size, bs, iodepth, runtime = sys.argv[1:]
fio = json.load(open(f"{work}/fio.json"))
w = fio["jobs"][0]["write"]
pool = json.load(open(f"{work}/pool.json"))
status = json.load(open(f"{work}/status.json"))["shadow"]
lines = open(f"{work}/shadowd.log").read().splitlines()
print(f"pool-full: backing {size}, pool {pool_size}; fio randwrite bs={bs} iodepth={iodepth} "
      f"{runtime}s, incompressible")
print(f"  write throughput         {w['bw_bytes'] / 2**20:8.1f} MiB/s "
      f"({w['io_bytes'] / 2**30:.2f} GiB)")
print(f"  retention shrinks        {pool['retention_shrinks']:8d}")
print(f"  journal waits for room   {pool['pool_full_waits']:8d} "
      f"({pool['pool_full_wait_seconds']:.1f} s in all)")
print(f"  zones reclaimed          {pool['zones_reclaimed']:8d}")
print(f"  'history degraded' lines {sum('history degraded' in l for l in lines):8d}")
print(f"  'history restarted'      {sum('history restarted' in l for l in lines):8d}")
print(f"  degraded at the end      {str(status['degraded']):>8s} {status['degraded_reason']}")
EOF
