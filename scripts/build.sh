#!/usr/bin/env bash
# Install missing dependencies, configure and build shadowd.
#
# Environment:
#   BUILD_DIR=DIR          build directory (default: build/ in the repository)
#   SANITIZE=address|thread  sanitizer build (passed to CMake as -DSANITIZE=)
#   SHADOWD_SKIP_DEPS=1    do not run scripts/deps.sh
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if [[ ${SHADOWD_SKIP_DEPS:-0} != 1 ]]; then
  scripts/deps.sh
fi

build_dir=${BUILD_DIR:-build}
echo "build: configuring $build_dir (RelWithDebInfo, SANITIZE='${SANITIZE:-}')"
cmake -S . -B "$build_dir" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DSANITIZE="${SANITIZE:-}"
echo "build: compiling with $(nproc) jobs"
cmake --build "$build_dir" -j"$(nproc)"
