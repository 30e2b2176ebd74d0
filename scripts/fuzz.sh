#!/usr/bin/env bash
# Build the fuzz targets (tests/fuzz/) with clang and libFuzzer, and run them.
#
#   scripts/fuzz.sh [OPTIONS] [TARGET...]     (default: every target)
#
# Builds build-fuzz/ (CC=clang CXX=clang++, -DSHADOWD_FUZZ=ON, RelWithDebInfo:
# coverage feedback, ASan, UBSan, assertions on), then fuzzes each TARGET in
# turn, starting from its checked-in inputs tests/fuzz/corpus/TARGET/ and
# tests/fuzz/regressions/TARGET/. Inputs that find new coverage go to a
# scratch corpus, var/fuzz/TARGET/corpus/ (kept between runs, so a series of
# runs goes deeper), never into tests/fuzz/ unless --merge.
#
# Options:
#   --seconds N       fuzz each target N seconds (default 60)
#   --long            fuzz each target an hour (--seconds for any other time)
#   --ci              the bounded pass of scripts/test.sh: SHADOWD_FUZZ_SECONDS
#                     (default 45) per target from the checked-in inputs only,
#                     with a scratch corpus that is thrown away
#   --merge           afterwards, add the scratch inputs that reach code the
#                     corpus does not to tests/fuzz/corpus/TARGET/ (libFuzzer
#                     -merge=1 on edges only, so that the corpus stays small)
#   --save-crashes    copy each input that broke a target to
#                     tests/fuzz/regressions/TARGET/ (check it in once fixed)
#   --no-build        use build-fuzz/ as it is
#   --list            print the targets and exit
#
# A target that crashes, times out (-timeout=$SHADOWD_FUZZ_TIMEOUT, 10 s per
# input), runs out of memory or breaks an invariant stops; its input is kept
# in var/fuzz/TARGET/ (crash-*, timeout-*, oom-*, leak-*) and the others
# still run. The script prints one line per target (executions, seconds,
# corpus, coverage, result) and a total line to quote, and exits 1 if any
# target found something.
#
# Environment:
#   FUZZ_BUILD_DIR=DIR     build directory (default build-fuzz)
#   SHADOWD_FUZZ_SECONDS   seconds per target in --ci mode (default 45)
#   SHADOWD_FUZZ_TIMEOUT   seconds one input may take (default 10)
#   SHADOWD_SKIP_DEPS=1    do not run scripts/deps.sh
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

log() { echo "fuzz: $*"; }
positive() { [[ $1 =~ ^[0-9]+$ ]] && (($1 > 0)); }
die() {
  echo "fuzz: error: $*" >&2
  exit 2
}

# The targets, as tests/fuzz/CMakeLists.txt lists them.
mapfile -t all_targets < <(sed -n '/^set(SHADOWD_FUZZ_TARGETS$/,/^)$/{/^  /s/^ *//p}' tests/fuzz/CMakeLists.txt)
((${#all_targets[@]} > 0)) || die "no targets found in tests/fuzz/CMakeLists.txt"

seconds=60
ci=0
merge=0
save_crashes=0
build=1
targets=()
while (($# > 0)); do
  case $1 in
    --seconds)
      positive "${2:-}" || die "--seconds needs a positive number of seconds"
      seconds=$2
      shift
      ;;
    --long) seconds=3600 ;;
    --ci) ci=1 ;;
    --merge) merge=1 ;;
    --save-crashes) save_crashes=1 ;;
    --no-build) build=0 ;;
    --list)
      printf '%s\n' "${all_targets[@]}"
      exit 0
      ;;
    -h | --help)
      sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *)
      [[ " ${all_targets[*]} " == *" $1 "* ]] || die "unknown target '$1' (${all_targets[*]})"
      targets+=("$1")
      ;;
  esac
  shift
done
((${#targets[@]} > 0)) || targets=("${all_targets[@]}")
if ((ci)); then
  seconds=${SHADOWD_FUZZ_SECONDS:-45}
  positive "$seconds" || die "SHADOWD_FUZZ_SECONDS must be a positive number"
fi
timeout=${SHADOWD_FUZZ_TIMEOUT:-10}
build_dir=${FUZZ_BUILD_DIR:-build-fuzz}
command_line="scripts/fuzz.sh --seconds $seconds"
if ((ci)); then
  command_line="SHADOWD_FUZZ_SECONDS=$seconds scripts/fuzz.sh --ci"
fi
if ((${#targets[@]} < ${#all_targets[@]})); then
  command_line+=" ${targets[*]}"
fi

# --- build ---------------------------------------------------------------------
if ((build)); then
  if [[ ${SHADOWD_SKIP_DEPS:-0} != 1 ]]; then
    scripts/deps.sh
  fi
  command -v clang++ >/dev/null || die "clang++ not found (scripts/deps.sh installs it)"
  log "configuring $build_dir (clang, SHADOWD_FUZZ=ON, RelWithDebInfo)"
  CC=clang CXX=clang++ cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSHADOWD_FUZZ=ON >/dev/null
  log "compiling the fuzz targets with 2 jobs"
  cmake --build "$build_dir" -j2 --target fuzz_targets
fi

# --- run -----------------------------------------------------------------------
mkdir -p var/fuzz
scratch_root=
if ((ci)); then
  scratch_root=$(mktemp -d "$root/var/fuzz/ci.XXXXXX")
  trap 'rm -rf "$scratch_root"' EXIT
fi

# The last "corp: N/SIZE" and "cov: N" libFuzzer printed in log $1.
corpus_of() { grep -o 'corp: [0-9]*/[0-9]*[bKMG]*b' "$1" | tail -1 | sed 's/corp: //; s|/| inputs, |' || true; }
cov_of() { grep -o 'cov: [0-9]*' "$1" | tail -1 | sed 's/cov: //' || true; }
stat_of() { sed -n "s/^stat::$2: *//p" "$1" | tail -1; }

total_execs=0
total_seconds=0
findings=()
for t in "${targets[@]}"; do
  bin=$build_dir/tests/fuzz/fuzz_$t
  [[ -x $bin ]] || die "$bin is missing (run without --no-build)"
  out=var/fuzz/$t
  scratch=$out/corpus
  [[ -n $scratch_root ]] && scratch=$scratch_root/$t
  mkdir -p "$out" "$scratch"
  fuzz_log=$out/fuzz.log
  dict=()
  [[ -f tests/fuzz/dict/$t.dict ]] && dict=(-dict="tests/fuzz/dict/$t.dict")
  log "$t: fuzzing for $seconds s (log: $fuzz_log)"
  start=$(date +%s)
  rc=0
  "$bin" -max_total_time="$seconds" -timeout="$timeout" -print_final_stats=1 \
    -artifact_prefix="$out/" "${dict[@]}" \
    "$scratch" "tests/fuzz/corpus/$t" "tests/fuzz/regressions/$t" >"$fuzz_log" 2>&1 || rc=$?
  took=$(($(date +%s) - start))
  execs=$(stat_of "$fuzz_log" number_of_executed_units)
  execs=${execs:-0}
  artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$fuzz_log" | tail -1)
  if ((rc == 0)); then
    result=ok
  else
    result="FOUND (exit $rc)"
    [[ -n $artifact ]] && result+=": $artifact"
    findings+=("$t")
    grep -m1 -E '^(==[0-9]+==ERROR|SUMMARY|.*fuzz invariant violated|.*runtime error)' "$fuzz_log" | sed 's/^/fuzz:   /' || true
    if ((save_crashes)) && [[ -n $artifact && -f $artifact ]]; then
      mkdir -p "tests/fuzz/regressions/$t"
      cp "$artifact" "tests/fuzz/regressions/$t/"
      log "$t: copied $artifact to tests/fuzz/regressions/$t/"
    else
      log "$t: reproduce with: $bin $artifact"
      log "$t: once fixed, keep it: cp $artifact tests/fuzz/regressions/$t/"
    fi
  fi
  printf 'fuzz: %-16s %12s executions  %5s s  corpus %s  cov %s  %s\n' \
    "$t" "$execs" "$took" "$(corpus_of "$fuzz_log")" "$(cov_of "$fuzz_log")" "$result"
  total_execs=$((total_execs + execs))
  total_seconds=$((total_seconds + took))
  if ((merge)) && ((rc == 0)); then
    before=$(find "tests/fuzz/corpus/$t" -type f | wc -l)
    # Edges only (no hit counts): what is checked in stays small.
    "$bin" -merge=1 -use_counters=0 -timeout="$timeout" "tests/fuzz/corpus/$t" "$scratch" >"$out/merge.log" 2>&1 ||
      die "$t: merge failed (see $out/merge.log)"
    log "$t: merge added $(($(find "tests/fuzz/corpus/$t" -type f | wc -l) - before)) inputs to tests/fuzz/corpus/$t/"
  fi
done

clang_version=$(clang++ --version | sed -n '1s/.*version \([0-9.]*\).*/\1/p')
summary="$total_execs executions (inputs tried) over ${#targets[@]} target(s) in $total_seconds s"
summary+=" (libFuzzer, clang $clang_version, ASan+UBSan):"
if ((${#findings[@]} == 0)); then
  log "total: $summary no findings; command: $command_line"
else
  log "total: $summary ${#findings[@]} with findings (${findings[*]}); command: $command_line"
  exit 1
fi
