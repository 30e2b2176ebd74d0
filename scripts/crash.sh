#!/usr/bin/env bash
# Crash loops of the real daemon, long mode: tests/crash/test_crash_loop.py
# with hundreds of cycles against the built shadowd and shadowctl. Every cycle
# writes through libnbd (FUA, FLUSH, WRITE_ZEROES, TRIM, several connections),
# kills shadowd with SIGKILL at a random moment, restarts it on the same
# backing and pool, and checks against the test's model: every acknowledged
# write reads back, a write in flight at the kill is all there or not at all,
# the journal (`shadowctl history`, `versions`) holds each write at its time,
# and restores (`shadowctl export --at`, `restore --output`) at random earlier
# seconds equal the model's device at that second, across the crashes. Then
# prints the figure for docs/RELIABILITY.md.
#
# Usage: scripts/crash.sh [--cycles N] [--seed S]
#   --cycles N   crash cycles (default 300)
#   --seed S     replay a run's requests and kill points (default: random,
#                printed)
#
# Environment:
#   BUILD_DIR=DIR   build directory (default build/); scripts/build.sh is run
#                   only if DIR/daemon/shadowd or DIR/ctl/shadowctl is missing
#   CRASH_OUT=FILE  the figures as JSON (default var/crash/crash-<timestamp>.json);
#                   the whole output goes beside it (.log)
#   TMPDIR=DIR      where the backing file and the pool go (the pool is 128 MiB
#                   + 14 MiB per cycle, fallocated: 4.2 GiB for 300; default /tmp)
#   SHADOWD_TEST_KEEP=1  keep the daemons' temporary directories
#
# Exit status: 0 when every cycle passed, 1 on a failure (the output names the
# cycle, the seed and the command that replays it), 2 on bad usage.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

log() { echo "crash: $*" >&2; }
die() { log "error: $*"; exit "${2:-1}"; }

cycles=300
seed=
while (( $# )); do
  case $1 in
    --cycles) (( $# >= 2 )) || die "--cycles needs a number" 2; cycles=$2; shift 2 ;;
    --cycles=*) cycles=${1#*=}; shift ;;
    --seed) (( $# >= 2 )) || die "--seed needs a number" 2; seed=$2; shift 2 ;;
    --seed=*) seed=${1#*=}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" 2 ;;
  esac
done
[[ $cycles =~ ^[1-9][0-9]*$ ]] || die "--cycles must be a whole number above 0, not '$cycles'" 2
[[ -z $seed || $seed =~ ^[0-9]+$ ]] || die "--seed must be a whole number, not '$seed'" 2

py=/usr/bin/python3
[[ -x $py ]] || py=python3
"$py" -c 'import nbd' 2>/dev/null || die "$py has no libnbd bindings (python3-libnbd; scripts/deps.sh installs it)"

build_dir=${BUILD_DIR:-build}
[[ $build_dir == /* ]] || build_dir=$root/$build_dir
shadowd_bin=$build_dir/daemon/shadowd
shadowctl_bin=$build_dir/ctl/shadowctl
if [[ ! -x $shadowd_bin || ! -x $shadowctl_bin ]]; then
  log "$shadowd_bin or $shadowctl_bin missing: running scripts/build.sh"
  BUILD_DIR=$build_dir scripts/build.sh
  [[ -x $shadowd_bin && -x $shadowctl_bin ]] || die "build did not produce $shadowd_bin and $shadowctl_bin"
fi

stamp=$(date -u +%Y%m%dT%H%M%SZ)
out_json=${CRASH_OUT:-$root/var/crash/crash-$stamp.json}
out_log=${out_json%.json}.log
mkdir -p "$(dirname "$out_json")"
rm -f "$out_json"

args=(--cycles "$cycles" --summary "$out_json")
[[ -z $seed ]] || args+=(--seed "$seed")
log "$cycles cycles against $shadowd_bin (repository at $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')); output in $out_log"
start=$(date +%s)
# The whole output to the log; every 10th cycle's line and a failure to stderr.
set +e
SHADOWD=$shadowd_bin SHADOWCTL=$shadowctl_bin PYTHONDONTWRITEBYTECODE=1 \
  "$py" tests/crash/test_crash_loop.py "${args[@]}" 2>&1 | tee "$out_log" |
  awk '/^\[crash-loop\]|^CRASH-LOOP FAILED|^replay:/ { print; fflush() }
       /^cycle [0-9]+\// { split($2, c, "/"); if (c[1] % 10 == 0) { print; fflush() } }' >&2
rc=${PIPESTATUS[0]}
set -e
wall=$(( $(date +%s) - start ))

if (( rc != 0 )) || [[ ! -s $out_json ]]; then
  echo
  echo "crash loop FAILED (exit $rc) after $wall s:"
  grep -E '^CRASH-LOOP FAILED|^replay:' "$out_log" || tail -n 30 "$out_log"
  echo "full output: $out_log"
  exit 1
fi

"$py" - "$out_json" "$cycles" "$wall" "$(uname -r)" "$(nproc)" <<'PY'
import json
import sys

s = json.load(open(sys.argv[1]))
cycles, wall, kernel, cpus = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
gib = s["bytes_verified"] / 2**30
print()
print(f"crash cycles survived: {s['crash_cycles_survived']} of {s['cycles']} "
      f"(SIGKILL at a random moment, restart, full checks), failures: {s['failures']}")
print(f"  daemon starts        {s['daemon_starts']} (+{s['startup_kills']} killed during start-up)")
print(f"  writes acknowledged  {s['writes_acknowledged']:,} of {s['requests']:,} sent "
      f"({s['writes_durable']:,} durable by FUA/FLUSH, {s['bytes_acknowledged'] / 2**20:.1f} MiB), "
      f"{s['flushes']:,} FLUSHes")
print(f"  in flight at a kill  {s['in_flight_at_kill']:,}: {s['in_flight_kept']:,} kept whole, "
      f"{s['in_flight_lost']:,} lost whole, {s['in_flight_undecidable']:,} undecidable "
      f"(zeroes over zeroes)")
print(f"  bytes verified       {gib:.1f} GiB (live export after every restart, restored images)")
print(f"  restores compared    {s['restores_compared']:,} (export --at @S {s['restores_export_at']}, "
      f"export --at seq:N {s['restores_export_seq']}, restore --output {s['restores_to_file']}); "
      f"{s['restores_across_2_kills']} of a second 2 kills or more back, {s['restores_mean_kills_crossed']} "
      f"kills back on average; {s['seconds_of_history']} seconds of test-clock history")
print(f"  shadowctl verify     {s['verify_runs']} runs, clean")
print(f"  pool at the end      {s['pool_bytes_used'] / 2**20:.0f} MiB of zones in use of {s['pool_bytes'] / 2**20:.0f} MiB, "
      f"{s['journal_records']:,} journal records; the window never shrank")
print(f"  seed {s['seed']}, {wall} s wall, {cpus} CPUs, kernel {kernel}")
print()
print("figure (docs/RELIABILITY.md):")
print(f"  {s['crash_cycles_survived']} crash cycles survived (SIGKILL at random moments, 0 failures): "
      f"{s['writes_acknowledged']:,} writes acknowledged, {gib:.1f} GiB verified, "
      f"{s['restores_compared']:,} restores compared byte for byte — "
      f"`scripts/crash.sh --cycles {cycles} --seed {s['seed']}`")
PY
echo
echo "raw results: $out_json (log: $out_log)"
