#!/usr/bin/env bash
# Check the unit files in systemd/ with `systemd-analyze verify`.
#
# Usage: verify_units.sh UNIT_DIR SHADOWD_BINARY [NBD_CLIENT_BINARY]
#
# The units name /usr/local/bin/shadowd (the installed path), which does not
# exist on a build machine, and verify fails on a missing executable. So the
# units are copied to a temporary directory with that path rewritten to the
# built binary (and /usr/sbin/nbd-client to NBD_CLIENT_BINARY when given),
# instantiated as shadowd@test.service, shadowd@test.socket and
# shadowd-nbd@test.service, and verified there with that directory first in
# the unit search path, so that the units' references to each other resolve.
#
# systemd-analyze exits 0 on many problems (unknown keys, unparsable values),
# printing a warning only. So any output fails the test, except messages that
# come from parsing system unit files outside our directory (a unit file we
# merely order against), which are shown but tolerated.
set -euo pipefail

if (($# < 2 || $# > 3)); then
  echo "usage: $0 UNIT_DIR SHADOWD_BINARY [NBD_CLIENT_BINARY]" >&2
  exit 2
fi
unit_dir=$1
shadowd=$2
nbd_client=${3:-}

command -v systemd-analyze >/dev/null || {
  echo "FAIL: systemd-analyze not found (Debian package: systemd)" >&2
  exit 1
}
for bin in "$shadowd" ${nbd_client:+"$nbd_client"}; do
  [[ -x $bin ]] || {
    echo "FAIL: $bin is not an executable file" >&2
    exit 1
  }
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/shadowd-units.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Escape a string for use as the replacement in sed s#...#...#.
sed_repl() { printf '%s' "$1" | sed -e 's/[#&\\]/\\&/g'; }

instance="test"
units=(shadowd@.service shadowd@.socket shadowd-nbd@.service)
targets=()
for unit in "${units[@]}"; do
  [[ -f $unit_dir/$unit ]] || {
    echo "FAIL: $unit_dir/$unit missing" >&2
    exit 1
  }
  inst=${unit/@./@$instance.}
  script=("s#/usr/local/bin/shadowd#$(sed_repl "$shadowd")#g")
  if [[ -n $nbd_client ]]; then
    script+=("s#/usr/sbin/nbd-client#$(sed_repl "$nbd_client")#g")
  fi
  sed_args=()
  for s in "${script[@]}"; do sed_args+=(-e "$s"); done
  sed "${sed_args[@]}" "$unit_dir/$unit" >"$tmp/$unit"
  cp "$tmp/$unit" "$tmp/$inst"
  targets+=("$tmp/$inst")
done

# The rewrite must have hit the daemon's ExecStart, or we would be verifying
# something other than what gets installed.
if ! grep -qxF -- "ExecStart=$shadowd --config /etc/shadowd/%i.json --foreground" \
  "$tmp/shadowd@$instance.service"; then
  echo "FAIL: shadowd@.service lacks the line" \
    "ExecStart=/usr/local/bin/shadowd --config /etc/shadowd/%i.json --foreground" >&2
  exit 1
fi

echo "verifying: ${targets[*]##*/}"
set +e
output=$(cd "$tmp" && SYSTEMD_UNIT_PATH="$tmp:" systemd-analyze verify --man=no "${targets[@]}" 2>&1)
rc=$?
set -e

bad=0
while IFS= read -r line; do
  [[ -z $line ]] && continue
  case $line in
    "$tmp"/*) bad=1; echo "FAIL: $line" ;;
    /lib/systemd/* | /usr/lib/systemd/* | /etc/systemd/* | /run/systemd/*)
      echo "note (system unit, not ours): $line" ;;
    *) bad=1; echo "FAIL: $line" ;;
  esac
done <<<"$output"

if ((rc != 0)); then
  echo "FAIL: systemd-analyze verify exited with $rc"
  exit 1
fi
if ((bad)); then
  echo "FAIL: systemd-analyze verify reported problems (above)"
  exit 1
fi
echo "OK: ${units[*]} verify cleanly"
