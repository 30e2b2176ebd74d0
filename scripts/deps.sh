#!/usr/bin/env bash
# Install the Debian packages shadowd needs to build, run and test.
#
# Idempotent: asks dpkg which packages are missing and installs only those.
# When nothing is missing it changes nothing and needs no root.
# README.md ("Dependencies") says what each package is for.
set -euo pipefail

PACKAGES=(
  # build
  build-essential cmake pkg-config git
  # libraries
  liburing-dev libnbd-dev libzstd-dev libspdlog-dev libcli11-dev
  nlohmann-json3-dev catch2 libxxhash-dev libeigen3-dev libsystemd-dev
  libgnutls28-dev prometheus-cpp-dev zlib1g-dev
  # NBD peers and test clients
  libnbd-bin python3-libnbd qemu-utils nbdkit fio nbd-client
  # filesystem test, systemd unit checks, process tools
  fuse3 e2fsprogs systemd util-linux procps
  # TLS test certificates and PSK files (certtool, psktool)
  gnutls-bin
  # fuzzing: clang with libFuzzer and the sanitizer runtimes
  clang libclang-rt-14-dev
  # Ceph: the RADOS/RBD client libraries, and a throwaway single-node test
  # cluster (scripts/ceph-cluster.sh) with the ceph, rados and rbd CLIs
  librados-dev librbd-dev ceph-mon ceph-mgr ceph-osd ceph-common
  # qemu's rbd block driver (qemu-nbd and qemu-img on rbd: images)
  qemu-block-extra
)

is_installed() {
  local status
  status=$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) || return 1
  [[ $status == installed ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! is_installed "$pkg"; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "deps: all ${#PACKAGES[@]} required packages are installed"
  exit 0
fi

echo "deps: missing packages: ${missing[*]}"
if ((EUID != 0)); then
  echo "deps: error: installing packages needs root; run as root, or run:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

echo "deps: apt-get update"
apt-get update
echo "deps: apt-get install ${missing[*]}"
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
echo "deps: installed ${#missing[@]} package(s)"
