#!/usr/bin/env bash
# Install missing dependencies, build, run every test with ctest, then fuzz
# every fuzz target for a bounded time (scripts/fuzz.sh --ci: clang build in
# build-fuzz/, SHADOWD_FUZZ_SECONDS per target, default 45).
#
# Extra arguments go to ctest, e.g.  scripts/test.sh -L unit   or   -R nbdinfo
# SANITIZE=address|thread builds into build-asan/ or build-tsan/ and tests there.
# BUILD_DIR=DIR overrides the build directory.
# SHADOWD_TEST_FUZZ=0 skips the fuzzing pass (ctest still replays the fuzz
# corpora and regressions, label "fuzz").
# Exits non-zero if ctest or the fuzzing failed; both run either way.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

case ${SANITIZE:-} in
  "") default_dir=build ;;
  address) default_dir=build-asan ;;
  thread) default_dir=build-tsan ;;
  *)
    echo "test: error: SANITIZE must be address, thread or empty (got '$SANITIZE')" >&2
    exit 2
    ;;
esac
export BUILD_DIR=${BUILD_DIR:-$default_dir}

scripts/build.sh

echo "test: ctest in $BUILD_DIR"
ctest_status=0
ctest --test-dir "$BUILD_DIR" --output-on-failure -j2 "$@" || ctest_status=$?

fuzz_status=0
if [[ ${SHADOWD_TEST_FUZZ:-1} != 0 ]]; then
  echo "test: bounded fuzzing (scripts/fuzz.sh --ci; SHADOWD_TEST_FUZZ=0 skips it)"
  SHADOWD_SKIP_DEPS=1 scripts/fuzz.sh --ci || fuzz_status=$?
fi

((ctest_status == 0)) || echo "test: error: ctest failed (exit $ctest_status)" >&2
((fuzz_status == 0)) || echo "test: error: fuzzing failed (exit $fuzz_status)" >&2
((ctest_status == 0)) || exit "$ctest_status"
exit "$fuzz_status"
