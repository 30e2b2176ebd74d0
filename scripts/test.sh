#!/usr/bin/env bash
# Install missing dependencies, build, and run every test with ctest.
#
# Extra arguments go to ctest, e.g.  scripts/test.sh -L unit   or   -R nbdinfo
# SANITIZE=address|thread builds into build-asan/ or build-tsan/ and tests there.
# BUILD_DIR=DIR overrides the build directory.
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
exec ctest --test-dir "$BUILD_DIR" --output-on-failure -j2 "$@"
