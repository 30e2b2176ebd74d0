#!/usr/bin/env bash
# Make a throwaway certificate authority, a server and a client certificate,
# and a pre-shared key, for trying and testing NBD over TLS:
#
#   scripts/tls-certs.sh DIR [PSK_USER]
#
#   DIR/server/   ca-cert.pem server-cert.pem server-key.pem
#                 -> shadowd --tls-certificates DIR/server (nbdkit, qemu-nbd: same layout)
#   DIR/client/   ca-cert.pem client-cert.pem client-key.pem
#                 -> nbdinfo 'nbds+unix:///disk?socket=S&tls-certificates=DIR/client'
#                 -> qemu: --object tls-creds-x509,id=tls0,endpoint=client,dir=DIR/client
#   DIR/psk/keys.psk  PSK_USER:hexkey (default user "shadowd")
#                 -> shadowd --tls-psk DIR/psk/keys.psk
#                 -> nbdinfo 'nbds+unix://PSK_USER@/disk?socket=S&tls-psk-file=DIR/psk/keys.psk'
#                 -> qemu: --object tls-creds-psk,id=tls0,endpoint=client,dir=DIR/psk,username=PSK_USER
#   DIR/ca-key.pem    the CA's private key (signs more client certificates)
#
# The server certificate names localhost and 127.0.0.1. certtool and psktool
# come with Debian's gnutls-bin (scripts/deps.sh installs it). For real use,
# issue certificates from your own CA; these are for tests and trials.
set -euo pipefail

die() {
  echo "tls-certs: error: $*" >&2
  exit 1
}

(($# >= 1 && $# <= 2)) || die "usage: scripts/tls-certs.sh DIR [PSK_USER]"
dir=$1
user=${2:-shadowd}
[[ $user =~ ^[A-Za-z0-9._-]+$ ]] || die "PSK user '$user': letters, digits, '.', '_' and '-' only"
command -v certtool >/dev/null && command -v psktool >/dev/null ||
  die "certtool and psktool are missing (Debian package gnutls-bin; scripts/deps.sh installs it)"
[[ -e $dir/server/server-cert.pem ]] && die "$dir already holds certificates; remove it first"

mkdir -p "$dir/server" "$dir/client" "$dir/psk"
chmod 700 "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cat >"$tmp/ca.info" <<'EOF'
cn = shadowd test CA
ca
cert_signing_key
expiration_days = 3650
EOF
cat >"$tmp/server.info" <<'EOF'
organization = shadowd test
cn = localhost
dns_name = localhost
ip_address = 127.0.0.1
ip_address = ::1
tls_www_server
encryption_key
signing_key
expiration_days = 3650
EOF
cat >"$tmp/client.info" <<'EOF'
organization = shadowd test
cn = shadowd test client
tls_www_client
encryption_key
signing_key
expiration_days = 3650
EOF

quiet() { "$@" >"$tmp/out" 2>&1 || { cat "$tmp/out" >&2; die "$1 failed"; }; }
quiet certtool --generate-privkey --outfile "$dir/ca-key.pem"
quiet certtool --generate-self-signed --load-privkey "$dir/ca-key.pem" --template "$tmp/ca.info" \
  --outfile "$dir/server/ca-cert.pem"
cp "$dir/server/ca-cert.pem" "$dir/client/ca-cert.pem"
quiet certtool --generate-privkey --outfile "$dir/server/server-key.pem"
quiet certtool --generate-certificate --load-ca-certificate "$dir/server/ca-cert.pem" \
  --load-ca-privkey "$dir/ca-key.pem" --load-privkey "$dir/server/server-key.pem" \
  --template "$tmp/server.info" --outfile "$dir/server/server-cert.pem"
quiet certtool --generate-privkey --outfile "$dir/client/client-key.pem"
quiet certtool --generate-certificate --load-ca-certificate "$dir/client/ca-cert.pem" \
  --load-ca-privkey "$dir/ca-key.pem" --load-privkey "$dir/client/client-key.pem" \
  --template "$tmp/client.info" --outfile "$dir/client/client-cert.pem"
quiet psktool -u "$user" -p "$dir/psk/keys.psk"
chmod 600 "$dir"/ca-key.pem "$dir"/server/server-key.pem "$dir"/client/client-key.pem "$dir"/psk/keys.psk
echo "tls-certs: $dir/server (shadowd --tls-certificates), $dir/client (clients), $dir/psk/keys.psk (user $user)"
