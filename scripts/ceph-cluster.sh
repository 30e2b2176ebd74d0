#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for tests: one mon, one mgr, one OSD,
# no authentication, everything (config, data, logs, pid files, sockets) under
# one directory.
#
#   scripts/ceph-cluster.sh start DIR [--port N] [--store memstore|bluestore]
#                                     [--size SIZE] [--pgs N] [--timeout SECONDS]
#   scripts/ceph-cluster.sh stop DIR
#   scripts/ceph-cluster.sh status DIR
#   scripts/ceph-cluster.sh stop-osd DIR [--kill]
#   scripts/ceph-cluster.sh start-osd DIR [--timeout SECONDS]
#
# start   makes a new cluster in DIR (which must be empty or not exist): the mon
#         on 127.0.0.1:PORT (msgr2; PORT defaults to a free one), a mgr, one
#         OSD on memstore (default) or bluestore on a sparse file of SIZE
#         (default 4G; memstore: the most it holds in memory), and the pool
#         "shadowd" (size 1, --pgs placement groups (default 8), application
#         rbd). It waits (polling `ceph -s`, bounded by --timeout, default 120)
#         for HEALTH_OK with every placement group active+clean, checks that
#         the pool takes an object, and prints on stdout:
#             CEPH_CONF=DIR/ceph.conf
#             CEPH_POOL=shadowd
#             CEPH_MON=127.0.0.1:PORT
#             CEPH_FSID=...
#             CEPH_STORE=memstore|bluestore
#         Progress and errors go to stderr. On failure it stops the daemons it
#         started and prints the tail of the failing daemon's log.
#         Clients need only the config: `rados -c DIR/ceph.conf -p shadowd ...`,
#         `rbd -c DIR/ceph.conf ...`, rados_conf_read_file(DIR/ceph.conf).
#         start on a DIR holding a stopped cluster starts its daemons again
#         (as they were made: only --timeout applies then).
# stop    stops the OSD, then the mgr, then the mon (SIGTERM, SIGKILL after 60 s),
#         by their pid files, and waits until they are gone (a zombie counts
#         as gone). DIR is kept.
# status  prints which daemons run and `ceph health detail`; exits 0 when all
#         three run and the health is HEALTH_OK, 1 otherwise, 3 when none runs.
#         (The mon learns that an OSD is gone from the OSD itself: after a
#         SIGKILL it may say HEALTH_OK for minutes.)
# stop-osd   stops the OSD alone (SIGTERM: it tells the mon it goes down;
#            --kill: SIGKILL, a crash the mon does not hear about).
# start-osd  starts it again and waits for HEALTH_OK, all PGs active+clean.
#
# memstore holds the objects in the OSD's memory. This script turns off the
# OSD's fast shutdown, so a SIGTERM stop writes them to DIR/osd/0 and the next
# start reads them back; a SIGKILL (or a crash) loses everything since the
# last clean stop, and the OSD's PGs would stay stale: starting a memstore OSD
# that did not stop cleanly is refused. bluestore (a sparse file DIR/osd/0.block)
# keeps every acknowledged write across SIGKILL: use it for crash tests.
#
# Two clusters at once need different mon ports (the default picks a free one).
# The packages come from scripts/deps.sh (ceph-mon ceph-mgr ceph-osd ceph-common).
set -euo pipefail

POOL=shadowd
STOP_TIMEOUT=60 # seconds for a daemon to exit after SIGTERM before SIGKILL
# (a memstore OSD writes what it holds to disk then: about 6 s for 1 GiB)

prog=ceph-cluster
say() { echo "$prog: $*" >&2; }
die() {
  echo "$prog: error: $*" >&2
  exit 1
}
usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

for tool in ceph ceph-mon ceph-mgr ceph-osd monmaptool rados rbd; do
  command -v "$tool" >/dev/null ||
    die "$tool is missing (Debian packages ceph-mon ceph-mgr ceph-osd ceph-common; scripts/deps.sh installs them)"
done

(($# >= 2)) || usage
cmd=$1
dir=$2
shift 2
[[ $dir == /* ]] || dir=$PWD/$dir
dir=${dir%/}

port=
store=memstore
size=4G
pgs=8
timeout=120
kill_osd=0
while (($#)); do
  case $1 in
    --port) port=${2:?--port needs a value}; shift 2 ;;
    --store) store=${2:?--store needs a value}; shift 2 ;;
    --size) size=${2:?--size needs a value}; shift 2 ;;
    --pgs) pgs=${2:?--pgs needs a value}; shift 2 ;;
    --timeout) timeout=${2:?--timeout needs a value}; shift 2 ;;
    --kill) kill_osd=1; shift ;;
    *) usage ;;
  esac
done
[[ -z $port || ($port =~ ^[0-9]+$ && $port -ge 1 && $port -le 65535) ]] || die "--port $port: not a port"
[[ $store == memstore || $store == bluestore ]] || die "--store: memstore or bluestore (got '$store')"
size_bytes=$(numfmt --from=iec "$size" 2>/dev/null) || die "--size $size: not a size (e.g. 4G, 512M)"
((size_bytes >= 1 << 30)) || die "--size $size: at least 1G"
if ! [[ $pgs =~ ^[0-9]+$ ]] || ((pgs < 1 || pgs > 128)); then
  die "--pgs $pgs: 1 to 128"
fi
if ! [[ $timeout =~ ^[0-9]+$ ]] || ((timeout < 1)); then
  die "--timeout $timeout: whole seconds"
fi
# Unix socket paths have 107 bytes; a client's admin socket is
# DIR/run/ceph-client.admin.PID.NUMBER.asok.
((${#dir} <= 60)) || die "$dir: too long for the admin sockets under it (60 characters at most)"

conf=$dir/ceph.conf
DAEMONS=(osd.0 mgr.x mon.a) # stop order; start order is the reverse

# ---------------------------------------------------------------- processes

pidfile() { echo "$dir/run/$1.pid"; }

# The pid of a live daemon NAME (mon.a, mgr.x, osd.0) from its pid file, or
# nothing. A zombie counts as gone (PID 1 may reap exited daemons late), and
# so does a pid that now belongs to another program.
daemon_pid() {
  local f pid stat cmd
  f=$(pidfile "$1")
  [[ -r $f ]] || return 0
  pid=$(<"$f") || return 0
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  [[ ${stat:0:1} != Z && ${stat:0:1} != X ]] || return 0
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 0
  [[ $cmd == *ceph-${1%%.*}* && $cmd == *"$conf"* ]] || return 0
  echo "$pid"
}

running_daemons() {
  local n
  for n in "${DAEMONS[@]}"; do
    [[ -n $(daemon_pid "$n") ]] && echo "$n"
  done
  return 0
}

log_tail() { # NAME [LINES]: the end of a daemon's log and its errors, on stderr
  local f=$dir/log/$1.log
  if [[ -s $f ]]; then
    echo "---- last ${2:-15} lines of $f" >&2
    tail -n "${2:-15}" "$f" | cut -c1-400 >&2
  fi
  if grep -q . "$dir/log/$1.stderr" 2>/dev/null; then
    echo "---- errors it printed ($dir/log/$1.stderr)" >&2
    grep . "$dir/log/$1.stderr" | tail -n 20 | cut -c1-400 >&2
  fi
  echo "----" >&2
  return 0
}

# memstore keeps the OSD's objects in its memory and writes them to osd_data
# only when the OSD stops cleanly: osd/0.saved says that the files there are
# what the OSD last held (after --mkfs, after a SIGTERM stop); starting the
# OSD removes it. Without it a memstore OSD would come back with older
# objects or none, its PGs stale: refuse instead.
saved_marker() { echo "$dir/osd/0.saved"; }
is_memstore() { grep -q '^osd_objectstore = memstore' "$conf"; }

# Stop daemon NAME: SIGTERM (or SIGKILL), wait until it is gone.
stop_daemon() {
  local name=$1 sig=${2:-TERM} pid t0 deadline
  pid=$(daemon_pid "$name")
  if [[ -z $pid ]]; then
    rm -f "$(pidfile "$name")"
    return 0
  fi
  t0=$(now)
  kill -s "$sig" "$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  while [[ -n $(daemon_pid "$name") ]]; do
    if ((SECONDS >= deadline)); then
      if [[ $sig == KILL ]]; then
        say "$name (pid $pid) is still there after SIGKILL"
        return 1
      fi
      say "$name (pid $pid) did not exit in ${STOP_TIMEOUT}s after SIG$sig; SIGKILL"
      sig=KILL
      kill -s KILL "$pid" 2>/dev/null || true
      deadline=$((SECONDS + 10))
    fi
    sleep 0.05
  done
  rm -f "$(pidfile "$name")"
  if [[ $name == osd.0 && $sig == TERM ]]; then
    : >"$(saved_marker)"
  fi
  say "stopped $name (pid $pid, SIG$sig) in $(elapsed "$t0") s"
}

stop_all() {
  local n rc=0
  for n in "${DAEMONS[@]}"; do
    stop_daemon "$n" || rc=1
  done
  return $rc
}

# Start daemon NAME (mon.a, mgr.x, osd.0); it forks into the background and
# writes its pid file. ceph-mon and ceph-osd return only once they are up (or
# failed); ceph-mgr returns at once, so wait for its pid file.
start_daemon() {
  local name=$1 type=${1%%.*} id=${1#*.} deadline
  if [[ $name == osd.0 ]] && is_memstore; then
    if [[ ! -e $(saved_marker) ]]; then
      say "osd.0 runs on memstore and did not stop cleanly (killed or crashed):"
      say "its objects were only in its memory and are gone, its PGs cannot come back."
      say "Restarting an OSD after a kill needs --store bluestore."
      return 1
    fi
    rm -f "$(saved_marker)"
  fi
  rm -f "$(pidfile "$name")"
  if ! "ceph-$type" -c "$conf" -i "$id" >"$dir/log/$name.stderr" 2>&1 </dev/null; then
    say "ceph-$type -i $id failed to start"
    log_tail "$name"
    return 1
  fi
  deadline=$((SECONDS + 30))
  until [[ -n $(daemon_pid "$name") ]]; do
    if ((SECONDS >= deadline)); then
      say "ceph-$type -i $id is not running (no live pid in $(pidfile "$name"))"
      log_tail "$name"
      return 1
    fi
    sleep 0.05
  done
}

# ---------------------------------------------------------------- ceph CLI

cli() { # a ceph command against this cluster, bounded
  timeout 60 ceph -c "$conf" --connect-timeout 30 "$@"
}

cli_quiet() { # cli, its output shown only when it fails
  local out
  if ! out=$(cli "$@" 2>&1); then
    say "ceph $* failed: $out"
    return 1
  fi
}

# Poll `ceph -s` until HEALTH_OK, the mgr active, 1 OSD up and in, and every
# PG active+clean (at least MIN_PGS of them), or until the deadline. Fails
# early when a daemon dies.
wait_healthy() {
  local min_pgs=$1 deadline=$2 t0=$3 s verdict n last=
  while :; do
    for n in "${DAEMONS[@]}"; do
      if [[ -z $(daemon_pid "$n") ]]; then
        say "$n died while waiting for the cluster to become healthy"
        log_tail "$n" 40
        return 1
      fi
    done
    s=$(timeout 20 ceph -c "$conf" --connect-timeout 10 -s --format json 2>/dev/null) || s=
    if [[ -n $s ]]; then
      verdict=$(/usr/bin/python3 -c '
import json, sys
s = json.loads(sys.argv[1]); min_pgs = int(sys.argv[2])
om = s.get("osdmap", {}); om = om.get("osdmap", om)
pg = s.get("pgmap", {})
states = {x["state_name"]: x["count"] for x in pg.get("pgs_by_state", [])}
health = s["health"]["status"]
why = []
if health != "HEALTH_OK":
    why.append(health + ": " + ", ".join(sorted(s["health"].get("checks", {}))))
if not s.get("mgrmap", {}).get("available", False):
    why.append("no active mgr")
if om.get("num_up_osds") != 1 or om.get("num_in_osds") != 1:
    why.append("osds up/in %s/%s" % (om.get("num_up_osds"), om.get("num_in_osds")))
if pg.get("num_pgs", 0) < min_pgs or states.get("active+clean", 0) != pg.get("num_pgs", 0):
    why.append("pgs %s of %s: %s" % (pg.get("num_pgs", 0), min_pgs, states))
print("ok" if not why else "; ".join(why))
' "$s" "$min_pgs")
    else
      verdict="no answer from the mon"
    fi
    if [[ $verdict == ok ]]; then
      say "HEALTH_OK, all PGs active+clean after $(elapsed "$t0") s"
      return 0
    fi
    if [[ $verdict != "$last" ]]; then
      say "waiting: $verdict"
      last=$verdict
    fi
    if ((SECONDS >= deadline)); then
      say "not healthy after ${timeout}s: $verdict"
      cli health detail >&2 || true
      log_tail osd.0 20
      log_tail mgr.x 10
      log_tail mon.a 10
      return 1
    fi
    sleep 0.25
  done
}

pool_pgs() { cli osd pool get "$POOL" pg_num --format json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["pg_num"])'; }

# The PGs the cluster must have: every pool's pg_num.
total_pgs() {
  cli osd pool ls detail --format json | /usr/bin/python3 -c 'import json,sys; print(sum(p["pg_num"] for p in json.load(sys.stdin)))'
}

probe_pool() { # an object goes in, reads back, and goes away
  local obj=ceph-cluster-probe.$$ tmp
  tmp=$(mktemp)
  echo "probe $(date +%s.%N)" >"$tmp"
  timeout 60 rados -c "$conf" -p "$POOL" put "$obj" "$tmp" &&
    timeout 60 rados -c "$conf" -p "$POOL" get "$obj" "$tmp.back" &&
    cmp -s "$tmp" "$tmp.back" &&
    timeout 60 rados -c "$conf" -p "$POOL" rm "$obj"
  local rc=$?
  rm -f "$tmp" "$tmp.back"
  return $rc
}

print_env() {
  local mon
  mon=$(sed -n 's/^mon_host = //p' "$conf")
  echo "CEPH_CONF=$conf"
  echo "CEPH_POOL=$POOL"
  echo "CEPH_MON=$mon"
  echo "CEPH_FSID=$(sed -n 's/^fsid = //p' "$conf")"
  echo "CEPH_STORE=$(sed -n 's/^osd_objectstore = //p' "$conf")"
}

# ---------------------------------------------------------------- start

port_free() {
  /usr/bin/python3 -c '
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}

free_port() {
  /usr/bin/python3 -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

write_conf() { # PORT FSID
  local store_conf
  if [[ $store == memstore ]]; then
    # Pages of 4 KiB: 4 KiB random writes over a 1 GiB image took the OSD to
    # 2.3 GiB RSS with the default whole-object buffers, 1 GiB with these.
    # memstore writes its objects to osd_data only when the OSD stops
    # cleanly, which the default fast shutdown skips.
    store_conf="osd_objectstore = memstore
memstore_device_bytes = $size_bytes
memstore_page_set = true
memstore_page_size = 4096
osd_fast_shutdown = false"
  else
    store_conf="osd_objectstore = bluestore
bluestore_block_path = $dir/osd/\$id.block
bluestore_block_size = $size_bytes
bluestore_block_create = true
osd_memory_target = 1073741824"  # not the default 4 GiB
  fi
  cat >"$conf" <<EOF
# A throwaway single-node test cluster made by scripts/ceph-cluster.sh; all of
# its state is under $dir. Clients need only this file (-c $conf).
[global]
fsid = $2
# msgr2 only (a port other than 6789 in mon_host means v2 to clients too)
mon_host = 127.0.0.1:$1
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
keyring = /dev/null
run_dir = $dir/run
crash_dir = $dir/crash
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
# The test machines' disks may be less than 30% free (MON_DISK_LOW), and at
# 5% a mon would stop: this cluster holds little.
mon_data_avail_warn = 2
mon_data_avail_crit = 1
# PG states reach the mgr, and health the mon, within a second, not five.
mgr_stats_period = 1
mgr_tick_period = 1
mon_mgr_digest_period = 1

[mon]
mon_data = $dir/mon/\$id
log_file = $dir/log/\$name.log
admin_socket = $dir/run/\$name.asok
pid_file = $dir/run/\$name.pid
mon_cluster_log_file = $dir/log/cluster.log
mgr_initial_modules = iostat

[mgr]
mgr_data = $dir/mgr/\$id
log_file = $dir/log/\$name.log
admin_socket = $dir/run/\$name.asok
pid_file = $dir/run/\$name.pid
public_addr = 127.0.0.1

[osd]
osd_data = $dir/osd/\$id
log_file = $dir/log/\$name.log
admin_socket = $dir/run/\$name.asok
pid_file = $dir/run/\$name.pid
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
$store_conf
EOF
}

# Make the cluster's files and start it; on failure the caller stops what ran.
create_cluster() { # PORT
  local port=$1 fsid osd_uuid id
  fsid=$(uuidgen)
  mkdir -p "$dir"/{mon/a,mgr/x,osd/0,log,run,crash}
  write_conf "$port" "$fsid"
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null || return 1
  ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" >"$dir/log/mon.a.stderr" 2>&1 || {
    say "ceph-mon --mkfs failed"
    log_tail mon.a
    return 1
  }
  start_daemon mon.a || return 1
  # devicehealth would make a pool of its own and scrape devices: not here.
  cli_quiet config set mgr mgr/devicehealth/enable_monitoring false --force || return 1
  start_daemon mgr.x || return 1
  osd_uuid=$(uuidgen)
  id=$(cli osd new "$osd_uuid") || return 1
  [[ $id == 0 ]] || { say "ceph osd new gave id '$id', want 0"; return 1; }
  ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$dir/log/osd.0.stderr" 2>&1 || {
    say "ceph-osd --mkfs failed"
    log_tail osd.0
    return 1
  }
  : >"$(saved_marker)"
  start_daemon osd.0 || return 1
  cli_quiet osd pool create "$POOL" "$pgs" "$pgs" replicated &&
    cli_quiet osd pool set "$POOL" size 1 --yes-i-really-mean-it &&
    cli_quiet osd pool application enable "$POOL" rbd
}

cmd_start() {
  local t0 running rc
  t0=$(now)
  running=$(running_daemons | tr '\n' ' ')
  [[ -z $running ]] || die "$dir already holds a running cluster (${running% }); 'stop $dir' first"
  mkdir -p "$dir"
  if [[ -e $conf ]]; then
    [[ -z $port ]] || die "$dir holds a stopped cluster: its port is in $conf; start it without --port"
    say "starting the stopped cluster in $dir"
    trap 'say "start failed; stopping what it started"; stop_all || true' EXIT
    for n in mon.a mgr.x osd.0; do
      start_daemon "$n" || exit 1
    done
  else
    [[ -z $(ls -A "$dir") ]] || die "$dir is not empty and holds no cluster (no $conf)"
    if [[ -n $port ]] && ! port_free "$port"; then
      die "port $port on 127.0.0.1 is in use (two clusters need different ports; without --port one is picked)"
    fi
    trap 'say "start failed; stopping what it started"; stop_all || true' EXIT
    for _ in 1 2 3; do
      local p=$port
      [[ -n $p ]] || p=$(free_port)
      say "new cluster in $dir: mon 127.0.0.1:$p, $store (${size}), pool $POOL ($pgs PGs)"
      rc=0
      create_cluster "$p" || rc=$?
      ((rc == 0)) && break
      # A port picked free may be taken before the mon binds it: try another.
      if [[ -z $port ]] && grep -qs 'Address already in use' "$dir/log/mon.a.log" "$dir/log/mon.a.stderr"; then
        say "port $p was taken before the mon bound it; again with another"
        stop_all || true
        rm -rf "${dir:?}"/{mon,mgr,osd,log,run,crash,monmap,ceph.conf}
        continue
      fi
      exit 1
    done
    ((rc == 0)) || exit 1
  fi
  wait_healthy "$(total_pgs)" $((SECONDS + timeout)) "$t0" || exit 1
  if [[ ! -e $dir/rbd-pool-initialised ]]; then
    timeout 60 rbd -c "$conf" pool init "$POOL" || { say "rbd pool init $POOL failed"; exit 1; }
    : >"$dir/rbd-pool-initialised"
  fi
  probe_pool || { say "pool $POOL does not take an object"; log_tail osd.0 20; exit 1; }
  trap - EXIT
  say "ready in $(elapsed "$t0") s"
  print_env
}

cmd_stop() {
  local t0
  t0=$(now)
  [[ -d $dir ]] || die "no such directory: $dir"
  stop_all || die "some daemons did not stop"
  [[ -z $(running_daemons) ]] || die "daemons still running: $(running_daemons | tr '\n' ' ')"
  say "stopped in $(elapsed "$t0") s"
}

cmd_status() {
  local n pid any=0 all=1
  [[ -e $conf ]] || die "no cluster in $dir (no $conf)"
  for n in mon.a mgr.x osd.0; do
    pid=$(daemon_pid "$n")
    if [[ -n $pid ]]; then
      echo "$n: running (pid $pid)"
      any=1
    else
      echo "$n: stopped"
      all=0
    fi
  done
  ((any)) || exit 3
  [[ -n $(daemon_pid mon.a) ]] || { echo "health: unknown (no mon)"; exit 1; }
  local h
  h=$(timeout 20 ceph -c "$conf" --connect-timeout 10 health detail 2>&1) || { echo "health: no answer: $h"; exit 1; }
  echo "$h"
  print_env
  [[ $h == HEALTH_OK* ]] && ((all))
}

cmd_stop_osd() {
  [[ -e $conf ]] || die "no cluster in $dir (no $conf)"
  [[ -n $(daemon_pid osd.0) ]] || die "osd.0 is not running"
  if ((kill_osd)); then
    stop_daemon osd.0 KILL
  else
    stop_daemon osd.0 TERM
  fi
}

cmd_start_osd() {
  local t0
  t0=$(now)
  [[ -e $conf ]] || die "no cluster in $dir (no $conf)"
  [[ -n $(daemon_pid mon.a) && -n $(daemon_pid mgr.x) ]] || die "the mon and mgr must run (start $dir)"
  [[ -z $(daemon_pid osd.0) ]] || die "osd.0 is already running (pid $(daemon_pid osd.0))"
  start_daemon osd.0 || exit 1
  wait_healthy "$(total_pgs)" $((SECONDS + timeout)) "$t0" || exit 1
}

case $cmd in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  stop-osd) cmd_stop_osd ;;
  start-osd) cmd_start_osd ;;
  *) usage ;;
esac
