#!/usr/bin/env bash
# Install what is missing, build, and run shadowd in the foreground on a
# sparse 1 GiB var/disk.img, served on var/shadowd.sock and 127.0.0.1:10809,
# with its history in a 1 GiB shadow pool var/pool.img (formatted on first use,
# kept across runs). TLS is offered (--tls on) with throwaway certificates and
# a PSK made in var/pki/ on first use (scripts/tls-certs.sh); plain clients are
# served too.
#
# Extra arguments go to shadowd, e.g.  scripts/run.sh --read-only --log-level debug
# BUILD_DIR=DIR selects the build directory (default build/).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

scripts/build.sh
build_dir=${BUILD_DIR:-build}

mkdir -p var
if [[ ! -e var/disk.img ]]; then
  echo "run: creating sparse 1 GiB var/disk.img"
  truncate -s 1G var/disk.img
fi
if [[ ! -e var/pool.img ]]; then
  echo "run: creating the 1 GiB shadow pool var/pool.img (fallocate)"
  fallocate -l 1G var/pool.img 2>/dev/null || truncate -s 1G var/pool.img
fi

if [[ ! -e var/pki/server/server-cert.pem ]]; then
  echo "run: making throwaway TLS certificates and a PSK in var/pki (scripts/tls-certs.sh)"
  rm -rf var/pki
  scripts/tls-certs.sh var/pki
fi
pki=$root/var/pki

sock=$root/var/shadowd.sock
unix_uri="nbd+unix:///?socket=$sock"
tcp_uri="nbd://127.0.0.1:10809"

cat <<EOF

shadowd is starting in the foreground (Ctrl-C stops it). Export "disk"
(the empty export name "" selects it too) over var/disk.img, every write
journaled into the shadow pool var/pool.img (retention 7 days):

  $unix_uri
  $tcp_uri

Try, from another shell:

  nbdinfo '$unix_uri'
  nbdinfo --list '$unix_uri'
  nbdinfo --map '$unix_uri'
  qemu-img info '$tcp_uri'
  qemu-img convert -p -O qcow2 '$tcp_uri' /tmp/disk-copy.qcow2

  # over TLS (offered here with --tls on; --tls require refuses plain clients):
  nbdinfo 'nbds://localhost:10809/?tls-certificates=$pki/client'
  nbdinfo 'nbds+unix://shadowd@/?socket=$sock&tls-psk-file=$pki/psk/keys.psk'
  qemu-img info --object tls-creds-x509,id=tls0,endpoint=client,dir=$pki/client \\
    --image-opts driver=nbd,host=localhost,port=10809,tls-creds=tls0

  # a file system through FUSE and a loop device (as root):
  mkdir -p /tmp/shadowd-fuse /tmp/shadowd-mnt
  nbdfuse /tmp/shadowd-fuse '$unix_uri' &
  loop=\$(losetup -f --show /tmp/shadowd-fuse/nbd)
  mkfs.ext4 -q "\$loop" && mount "\$loop" /tmp/shadowd-mnt
  # ... use /tmp/shadowd-mnt, then:
  umount /tmp/shadowd-mnt && losetup -d "\$loop" && fusermount3 -u /tmp/shadowd-fuse

  # a real block device (needs the nbd kernel module: modprobe nbd):
  nbd-client -unix '$sock' -N disk /dev/nbd0
  nbd-client -d /dev/nbd0

  # the daemon's view (control socket /run/shadowd/disk.sock):
  $build_dir/ctl/shadowctl status
  $build_dir/ctl/shadowctl top -n 10 --by writes
  $build_dir/ctl/shadowctl segment 0
  $build_dir/ctl/shadowctl config set alpha=2
  $build_dir/ctl/shadowctl history
  $build_dir/ctl/shadowctl versions
  $build_dir/ctl/shadowctl versions --segment 0
  $build_dir/ctl/shadowctl pool --zones
  $build_dir/ctl/shadowctl history export --format csv
  $build_dir/ctl/shadowctl --help

EOF

exec "$build_dir/daemon/shadowd" \
  --backing var/disk.img \
  --unix var/shadowd.sock \
  --listen 127.0.0.1:10809 \
  --pool var/pool.img --init \
  --tls on --tls-certificates var/pki/server --tls-psk var/pki/psk/keys.psk \
  --foreground \
  "$@"
