#!/usr/bin/env bash
# Load and soak: shadowd in its production configuration (io_uring, O_DIRECT
# where the file system allows it, a shadow pool, --max-connections N, the
# metrics endpoint) on a sparse backing file, loopback only (Unix socket).
#
# 1. Connections: one process (/usr/bin/python3 + libnbd) opens N connections
#    at once (a burst of N non-blocking connects, then a retry of any the
#    kernel refused), every connection writes and reads back one request of
#    each size (4 KiB, 64 KiB, 1 MiB) in its own region, all of them in flight
#    together; then, holding all N: `shadowctl status` must show N open (and
#    the metrics shadowd_connections_active N), K more connections (a burst)
#    must each be refused promptly and cleanly (the server closes before its
#    greeting: the client sees an error, not a hang; a raw socket sees EOF
#    without a byte), the N held connections still do verified I/O, then they
#    are closed (half with NBD_CMD_DISC, half by just closing the socket) and
#    the daemon's open connections must return to 0 and its file descriptors
#    (/proc/PID/fd) to their count; a new connection afterwards must be served.
#    The cycle runs LOAD_CYCLES times. "Their count" is the fresh daemon's, plus
#    at most the one thing it opens lazily and keeps: the shadow thread's own
#    ring (an io_uring and its eventfd), opened when it first makes a version,
#    in the background; anything more is a leak.
# 2. Soak: fio --ioengine=nbd, J jobs (one connection each, each in its own
#    region) x iodepth D, randrw with mixed block sizes (bssplit), verified with
#    crc32c as it runs (verify_backlog; continue_on_error=verify, so that every
#    verify failure is counted), for LOAD_SOAK_SECONDS, while a sampler records
#    the daemon's RSS, file descriptors and threads every LOAD_SAMPLE_SECONDS.
#
# Prints the parameters, a table of checks (PASS/FAIL) and the soak's figures:
# throughput (MiB/s, IOPS), p99 completion latency (fio clat percentiles, all
# block sizes together), RSS first/max/last and its growth over the second
# half of the soak (least-squares line), descriptors first/last. Exits 1 if any
# check fails. Raw results (samples, fio JSON) go to var/bench/load-<ts>.json.
#
# Environment:
#   BUILD_DIR=DIR              build directory (default build/); scripts/build.sh
#                              is run only if DIR/daemon/shadowd or ctl/shadowctl is missing
#   BENCH_SIZE=SIZE            sparse backing file (default 4G)
#   BENCH_POOL_SIZE=SIZE       pool file, fallocated (default 4G; the soak fills it,
#                              so history is reclaimed and the window cut as it runs)
#   BENCH_DIR=DIR              where the work directory goes (default var/); removed at exit
#   BENCH_SHADOWD_ARGS="..."   extra shadowd options
#   BENCH_OUT=FILE             JSON result file (default var/bench/load-<ts>.json)
#   BENCH_KEEP=1               keep the work directory (files, logs, fio JSON, samples)
#   LOAD_CONNECTIONS=N         --max-connections and connections held (default 256)
#   LOAD_EXTRA=K               connections tried beyond the limit (default 32)
#   LOAD_CYCLES=C              connection cycles (default 2; 0 skips the phase)
#   LOAD_HANG_SECONDS=S        failure guard: a connect or I/O round still pending
#                              after S seconds counts as hung (default 30)
#   LOAD_SOAK_SECONDS=S        soak duration (default 180; 0 skips the soak)
#   LOAD_SAMPLE_SECONDS=S      sampling interval (default 5)
#   LOAD_FIO_JOBS=J            fio jobs = connections during the soak (default 8)
#   LOAD_FIO_IODEPTH=D         iodepth per job (default 16)
#   LOAD_BSSPLIT=SPEC          fio bssplit (default 4k/60:64k/30:1m/10)
#   LOAD_RWMIXREAD=PCT         reads in the mix, not counting verify reads (default 50)
#   LOAD_VERIFY_BACKLOG=N      fio verify_backlog (default 256)
#   LOAD_RSS_BOUND_MIB=M       largest RSS growth over the second half of the soak
#                              that counts as flat (default 16)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

size=${BENCH_SIZE:-4G}
pool_size=${BENCH_POOL_SIZE:-4G}
conns=${LOAD_CONNECTIONS:-256}
extra=${LOAD_EXTRA:-32}
cycles=${LOAD_CYCLES:-2}
hang=${LOAD_HANG_SECONDS:-30}
soak=${LOAD_SOAK_SECONDS:-180}
sample_every=${LOAD_SAMPLE_SECONDS:-5}
fio_jobs=${LOAD_FIO_JOBS:-8}
fio_depth=${LOAD_FIO_IODEPTH:-16}
bssplit=${LOAD_BSSPLIT:-4k/60:64k/30:1m/10}
rwmixread=${LOAD_RWMIXREAD:-50}
verify_backlog=${LOAD_VERIFY_BACKLOG:-256}
rss_bound=${LOAD_RSS_BOUND_MIB:-16}
out_json=${BENCH_OUT:-$root/var/bench/load-$stamp.json}

# --- prerequisites --------------------------------------------------------
for v in conns extra cycles hang soak sample_every fio_jobs fio_depth rwmixread verify_backlog rss_bound; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
(( conns >= 1 && hang >= 1 && sample_every >= 1 && fio_jobs >= 1 && fio_depth >= 1 )) ||
  die "LOAD_CONNECTIONS, LOAD_HANG_SECONDS, LOAD_SAMPLE_SECONDS, LOAD_FIO_JOBS and LOAD_FIO_IODEPTH must be at least 1"
(( fio_jobs + 2 <= conns )) || die "LOAD_FIO_JOBS ($fio_jobs) must leave room under LOAD_CONNECTIONS ($conns)"
(( rwmixread <= 100 )) || die "LOAD_RWMIXREAD is a percentage"
(( soak == 0 || soak >= 4 * sample_every )) ||
  die "LOAD_SOAK_SECONDS ($soak) must be 0 or at least 4 samples long (LOAD_SAMPLE_SECONDS=$sample_every)"
need_tools fio fallocate numfmt
"$py" -c 'import nbd' 2>/dev/null || die "$py has no libnbd bindings (python3-libnbd)"
if [[ ! -x $shadowd_bin || ! -x $shadowctl_bin ]]; then
  build_shadowd "$shadowd_bin or $shadowctl_bin"
fi
[[ -x $shadowctl_bin ]] || die "build did not produce $shadowctl_bin"
size_bytes=$(to_bytes "$size")
pool_bytes=$(to_bytes "$pool_size")
(( size_bytes >= conns * (2 << 20) )) ||
  die "BENCH_SIZE ($size) too small: the connections phase needs 2 MiB per connection"
(( size_bytes / fio_jobs >= 64 << 20 )) || die "BENCH_SIZE ($size) too small for $fio_jobs fio jobs"
nofile=$(ulimit -n)
(( nofile > conns + extra + 64 )) ||
  log "warning: ulimit -n is $nofile, close to LOAD_CONNECTIONS + LOAD_EXTRA: the daemon may run out of descriptors"

# --- work directory ---------------------------------------------------------
bench_workdir load "$(dirname "$out_json")"
sampler_pid=
# At exit, stop the sampler too, then cleanup (lib.sh: stops the daemon,
# removes the work directory, exits with the status it finds in $?).
on_exit() {
  local rc=$?
  set +e
  [[ -z $sampler_pid ]] || kill "$sampler_pid" 2>/dev/null
  (exit "$rc")
  cleanup
}
trap on_exit EXIT
avail=$(( $(df --output=avail -B1 "$work" | tail -n 1) ))
(( avail > pool_bytes + size_bytes + (1 << 30) )) ||
  die "not enough room in $work: $(numfmt --to=iec "$avail") free, need pool + backing + 1 GiB"
file=$work/backing.img
pool=$work/pool.img
sock=$sockdir/nbd.sock
ctl=$sockdir/ctl.sock
uri="nbd+unix:///?socket=$sock"
metrics_port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
truncate -s "$size_bytes" "$file"
fallocate -l "$pool_bytes" "$pool" || die "cannot fallocate $pool_bytes bytes at $pool"

shadowd_cmd() {  # FILE SOCK CTL POOL PORT -> cmd=()
  cmd=("$shadowd_bin" --backing "$1" --unix "$2" --control "$3" --pool "$4" --init
       --metrics-listen "127.0.0.1:$5" --max-connections "$conns"
       --foreground --log-level warn "${shadowd_extra[@]}")
}

job_bytes=$(( size_bytes / fio_jobs / (1 << 20) * (1 << 20) ))
fio_soak=(fio --name=soak --ioengine=nbd --numjobs="$fio_jobs" --iodepth="$fio_depth"
          --rw=randrw --rwmixread="$rwmixread" --bssplit="$bssplit"
          --size="$job_bytes" --offset_increment="$job_bytes"
          --time_based --runtime="${soak}s"
          --verify=crc32c --verify_backlog="$verify_backlog" --continue_on_error=verify
          --group_reporting --output-format=json)

# --- the connections helper ---------------------------------------------------
# conns.py phase URI N K PID SHADOWCTL CTL METRICS_PORT HANG OUT : the
#   connections phase; writes its figures as JSON to OUT (the report judges them).
# conns.py quiet PID SOCK CTL METRICS_PORT SHADOWCTL HANG : waits (bounded)
#   until the daemon has no connection open (status) and no client, control or
#   metrics connection among its descriptors; prints the descriptor counts.
# The daemon's descriptors are told apart through /proc/net/unix and
# /proc/net/tcp: an accepted Unix socket carries its listener's path, so
# control connections (from shadowctl) and metrics scrapes, which come and go,
# are not taken for NBD connections or for a leak.
conns_py=$work/conns.py
cat >"$conns_py" <<'PY'
import errno, json, os, select, socket, subprocess, sys, time, urllib.request
import nbd

SIZES = (4096, 65536, 1 << 20)          # one request of each size per connection
REGION = 2 << 20                        # bytes of the export per connection


class Daemon:
    def __init__(self, pid, sock, ctl, metrics_port, ctl_bin):
        self.pid, self.sock, self.ctl, self.port, self.ctl_bin = pid, sock, ctl, metrics_port, ctl_bin

    def vm(self, key):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return None

    def fds(self):
        """Descriptor counts: total, and the connected sockets among them by
        listener (nbd, ctl, metrics)."""
        unix = {}
        with open("/proc/net/unix") as f:
            for line in f.readlines()[1:]:
                p = line.split()
                if len(p) >= 8 and p[5] == "03":  # SS_CONNECTED
                    unix[p[6]] = p[7]
        tcp = set()
        for name in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(name) as f:
                    for line in f.readlines()[1:]:
                        p = line.split()
                        if int(p[1].rsplit(":", 1)[1], 16) == self.port and p[3] != "0A":
                            tcp.add(p[9])
            except OSError:
                pass
        out = {"total": 0, "nbd": 0, "ctl": 0, "metrics": 0, "kinds": {}}
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            out["total"] += 1
            try:
                t = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                continue
            kind = t
            if t.startswith("socket:["):
                ino = t[8:-1]
                path = unix.get(ino)
                kind = "socket"
                if path == self.sock:
                    out["nbd"] += 1
                    kind = "socket (NBD client)"
                elif path == self.ctl:
                    out["ctl"] += 1
                    kind = "socket (control client)"
                elif ino in tcp:
                    out["metrics"] += 1
                    kind = "socket (metrics client)"
            elif t.startswith("pipe:["):
                kind = "pipe"
            out["kinds"][kind] = out["kinds"].get(kind, 0) + 1
        return out

    def status(self):
        p = subprocess.run([self.ctl_bin, "--socket", self.ctl, "--json", "status"],
                           capture_output=True, timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"shadowctl status: exit {p.returncode}: {p.stderr.decode()}")
        return json.loads(p.stdout)["connections"]

    def metric(self, name):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return None

    def quiet(self, hang):
        """Waits until status shows no connection open, then until no client,
        control or metrics connection is left among the descriptors (the
        daemon closes them on its own time); returns the counts then."""
        t0 = time.monotonic()
        deadline = t0 + hang
        while True:
            st = self.status()
            if st["open"] == 0 or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        while True:
            f = self.fds()
            if (f["nbd"] == 0 and f["ctl"] == 0 and f["metrics"] == 0) or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return {**f, "open": st["open"], "status_total": st["total"],
                "settled": st["open"] == 0 and f["nbd"] + f["ctl"] + f["metrics"] == 0,
                "seconds": time.monotonic() - t0}


class Conn:
    def __init__(self, i):
        self.i, self.h, self.err, self.errnum = i, nbd.NBD(), None, None
        self.t0, self.t1, self.cookies, self.bufs = 0.0, None, [], []

    def fail(self, e):
        if self.err is None:
            self.err, self.errnum = str(e), e.errnum
        self.t1 = time.monotonic()


def drive(conns, done, deadline):
    """Runs the state machines of CONNS together until done(c) for every one
    without an error; returns those still pending at DEADLINE (hung)."""
    while True:
        pending = [c for c in conns if c.err is None and not done(c)]
        if not pending:
            return []
        left = deadline - time.monotonic()
        if left <= 0:
            return pending
        rd, wr, by_fd = [], [], {}
        for c in pending:
            fd, d = c.h.aio_get_fd(), c.h.aio_get_direction()
            by_fd[fd] = c
            if d & nbd.AIO_DIRECTION_READ:
                rd.append(fd)
            if d & nbd.AIO_DIRECTION_WRITE:
                wr.append(fd)
        r, w, _ = select.select(rd, wr, [], min(left, 1.0))
        for fds, notify in ((r, "aio_notify_read"), (w, "aio_notify_write")):
            for fd in fds:
                c = by_fd[fd]
                if c.err is None:
                    try:
                        getattr(c.h, notify)()
                    except nbd.Error as e:
                        c.fail(e)
        now = time.monotonic()
        for c in pending:
            if c.err is None and (c.h.aio_is_dead() or c.h.aio_is_closed()):
                c.fail(nbd.Error("connection dead", 0))
            elif c.t1 is None and c.err is None and done(c):
                c.t1 = now


def connect_all(conns, uri):
    """Starts every connect at once; returns (started, refused by the kernel
    with EAGAIN: the listen backlog was full)."""
    started, backlog = [], []
    for c in conns:
        c.t0 = time.monotonic()
        try:
            c.h.aio_connect_uri(uri)
            started.append(c)
        except nbd.Error as e:
            c.fail(e)
            (backlog if e.errnum == errno.EAGAIN else started).append(c)
    return started, backlog


def connected(c):
    return not c.h.aio_is_connecting()


def io_round(conns, hang, tag):
    """Every connection writes one request of each size to its own region, all
    in flight together, then reads them back, all in flight together, and
    compares; returns (connections verified, failures)."""
    data = {}
    for c in conns:
        c.cookies, off, data[c.i] = [], c.i * REGION, []
        for s in SIZES:
            b = os.urandom(s)
            data[c.i].append((off, b))
            try:
                c.cookies.append(c.h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b)), off))
            except nbd.Error as e:
                c.fail(e)
            off += s
    for phase in ("write", "read"):
        for c in drive(conns, lambda c: c.h.aio_in_flight() == 0, time.monotonic() + hang):
            c.fail(nbd.Error(f"{tag} {phase}: still in flight after {hang:.0f}s", 0))
        for c in conns:
            if c.err is None:
                try:
                    for ck in c.cookies:
                        if not c.h.aio_command_completed(ck):
                            raise nbd.Error(f"{tag} {phase}: command {ck} not completed", 0)
                except nbd.Error as e:
                    c.fail(e)
            c.cookies = []
        if phase == "write":
            for c in conns:
                c.bufs = []
                if c.err is None:
                    for off, b in data[c.i]:
                        buf = nbd.Buffer(len(b))
                        c.bufs.append((off, b, buf))
                        try:
                            c.cookies.append(c.h.aio_pread(buf, off))
                        except nbd.Error as e:
                            c.fail(e)
    ok, bad = 0, []
    for c in conns:
        if c.err is None:
            wrong = [off for off, b, buf in c.bufs if bytes(buf.to_bytearray()) != b]
            if wrong:
                bad.append(f"connection {c.i}: {tag}: read back other data at offsets {wrong}")
            else:
                ok += 1
        else:
            bad.append(f"connection {c.i}: {c.err}")
        c.bufs = []
    return ok, bad


def kinds_diff(a, b):
    """What descriptors B has more or fewer of than A, by kind."""
    ka, kb = a["kinds"], b["kinds"]
    return {x: kb.get(x, 0) - ka.get(x, 0) for x in sorted(set(ka) | set(kb))
            if kb.get(x, 0) != ka.get(x, 0)}


def cycle(uri, n, k, d, hang):
    res = {"n": n, "k": k, "sizes": SIZES}
    q = d.quiet(hang)
    res["baseline"] = {"fds": q["total"], "quiet": q, "rss_kb": d.vm("VmRSS"),
                       "threads": d.vm("Threads"), "status_open": q["open"],
                       "status_total": q["status_total"]}
    total0 = q["status_total"]
    try:
        # 1. N at once
        conns = [Conn(i) for i in range(n)]
        t0 = time.monotonic()
        started, backlog = connect_all(conns, uri)
        hung = drive(started, connected, time.monotonic() + hang)
        res["burst"] = {"connected": sum(1 for c in conns if c.h.aio_is_ready()),
                        "backlog_eagain": len(backlog), "hung": len(hung),
                        "other_error_count": sum(1 for c in started if c.err),
                        "other_errors": sorted({c.err for c in started if c.err})[:5],
                        "seconds": time.monotonic() - t0,
                        "first_backlog_error": backlog[0].err if backlog else None}
        # Connects the kernel refused (listen backlog full) or that failed:
        # again, one after another, so that the phase still holds N.
        retried = [c.i for c in conns if not c.h.aio_is_ready()]
        for i in retried:
            conns[i] = Conn(i)
            connect_all([conns[i]], uri)
            drive([conns[i]], connected, time.monotonic() + hang)
        res["retried"] = len(retried)
        res["retried_connected"] = sum(1 for i in retried if conns[i].h.aio_is_ready())
        held = [c for c in conns if c.h.aio_is_ready()]
        res["held"] = len(held)
        res["seconds"] = {"connect": time.monotonic() - t0}
        t = time.monotonic()

        # 2. verified I/O on all of them at once
        ok, bad = io_round(held, hang, "round 1")
        res["round1"] = {"verified": ok, "failures": bad[:10], "failure_count": len(bad)}
        res["seconds"]["round1"] = time.monotonic() - t
        st = d.status()
        res["holding"] = {"status_open": st["open"], "status_total": st["total"],
                          "fds": d.fds(), "rss_kb": d.vm("VmRSS"), "threads": d.vm("Threads")}
        try:
            res["holding"]["metrics_connections_active"] = d.metric("shadowd_connections_active")
        except Exception as e:  # noqa: BLE001 - reported; the report judges it
            res["holding"]["metrics_error"] = str(e)

        # 3. K more at once: each must fail promptly, before the greeting
        t = time.monotonic()
        more = [Conn(n + i) for i in range(k)]
        started, backlog = connect_all(more, uri)
        hung = drive(started, connected, time.monotonic() + hang)
        lat = [c.t1 - c.t0 for c in more if c.t1 is not None and c.err]
        res["extra"] = {"tried": k,
                        "refused": sum(1 for c in started if c.err and c not in hung),
                        "connected": sum(1 for c in more if c.h.aio_is_ready()),
                        "hung": len(hung), "backlog_eagain": len(backlog),
                        "errors": sorted({c.err for c in started if c.err}),
                        "errnos": sorted({c.errnum for c in started if c.err}),
                        "slowest_refusal_ms": 1000 * max(lat) if lat else None}
        # a raw socket: the server must close it without sending a byte
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(hang)
        try:
            s.connect(d.sock)
            got = s.recv(256)
            res["raw_probe"] = "eof" if got == b"" else f"received {len(got)} bytes"
        except socket.timeout:
            res["raw_probe"] = f"no reply and no close within {hang:.0f}s"
        except OSError as e:
            res["raw_probe"] = f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
        finally:
            s.close()
        for c in more:
            c.h = None
        st = d.status()
        res["after_extra"] = {"status_open": st["open"], "status_total": st["total"],
                              "attempts_seen": st["total"] - res["holding"]["status_total"]}

        res["seconds"]["extra"] = time.monotonic() - t
        # 4. the held connections are unaffected
        t = time.monotonic()
        ok, bad = io_round(held, hang, "round 2")
        res["seconds"]["round2"] = time.monotonic() - t
        t = time.monotonic()
        res["round2"] = {"verified": ok, "failures": bad[:10], "failure_count": len(bad)}

        # 5. close: half with NBD_CMD_DISC first, half by just closing the socket
        for c in held:
            if c.i % 2 == 0:
                try:
                    c.h.shutdown()
                except nbd.Error as e:
                    c.fail(e)
        for c in conns:
            c.h = None
        conns = held = more = None
        q = d.quiet(hang)
        res["seconds"]["close"] = time.monotonic() - t
        res["closed"] = {"fds": q["total"], "quiet": q, "status_open": q["open"],
                         "seconds": q["seconds"], "rss_kb": d.vm("VmRSS"),
                         "threads": d.vm("Threads")}

        # 6. a new connection is served
        try:
            h = nbd.NBD()
            h.connect_uri(uri)
            h.pwrite(b"\x5a" * 4096, 0)
            res["new_connection"] = "ok" if h.pread(4096, 0) == b"\x5a" * 4096 else "wrong data"
            h.shutdown()
        except nbd.Error as e:
            res["new_connection"] = str(e)
        h = None
        q = d.quiet(hang)
        res["end"] = {"fds": q["total"], "quiet": q, "status_open": q["open"],
                      "status_total": q["status_total"]}
        res["accepted_during_phase"] = q["status_total"] - total0
    except Exception as e:  # noqa: BLE001 - the report shows it as a failed check
        res["exception"] = f"{type(e).__name__}: {e}"
    return res


if sys.argv[1] == "phase":
    uri, n, k, pid, ctl_bin, ctl, port, hang, cycles, out = sys.argv[2:12]
    d = Daemon(int(pid), uri.split("socket=", 1)[1], ctl, int(port), ctl_bin)
    res = {"cycles": []}
    for i in range(int(cycles)):
        r = cycle(uri, int(n), int(k), d, float(hang))
        res["cycles"].append(r)
        if "closed" in r:
            r["closed"]["diff_from_start"] = kinds_diff(res["cycles"][0]["baseline"]["quiet"],
                                                        r["closed"]["quiet"])
            r["closed"]["diff_from_cycle1"] = kinds_diff(res["cycles"][0]["closed"]["quiet"],
                                                         r["closed"]["quiet"])
        if "exception" in r:
            break
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
elif sys.argv[1] == "quiet":
    pid, sock, ctl, port, ctl_bin, hang = sys.argv[2:8]
    print(json.dumps(Daemon(int(pid), sock, ctl, int(port), ctl_bin).quiet(float(hang))))
PY

# --- sampler --------------------------------------------------------------------
# Appends "wall phase rss_kb hwm_kb fds threads" for $server_pid to FILE every
# $sample_every seconds; the phase is read from $work/phase.
start_sampler() {  # FILE
  local f=$1 pid=$server_pid
  ( while kill -0 "$pid" 2>/dev/null; do
      rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || break
      hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || break
      thr=$(awk '/^Threads:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || break
      nfd=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
      echo "$(date +%s.%N) $(cat "$work/phase" 2>/dev/null || echo -) $rss $hwm $nfd $thr" >>"$f"
      sleep "$sample_every"
    done ) &
  sampler_pid=$!
}
stop_sampler() {
  [[ -n $sampler_pid ]] || return 0
  kill "$sampler_pid" 2>/dev/null || true
  wait "$sampler_pid" 2>/dev/null || true
  sampler_pid=
}

# --- header ------------------------------------------------------------------
header=$work/header.txt
fs_type=$(stat -f -c %T "$work")
{
  echo "load benchmark  $stamp"
  host_info 2
  echo "shadowd: $("$shadowd_bin" --version 2>&1 | head -n1)   fio: $(fio --version)   libnbd: $("$py" -c 'import nbd; print(nbd.NBD().get_version())' 2>/dev/null || echo '?')   ulimit -n: $nofile"
  echo "work directory: $work ($fs_type, $(numfmt --to=iec "$avail") free at start)"
  echo "backing: FILE = sparse $(numfmt --to=iec "$size_bytes") ($(q truncate -s "$size_bytes" FILE)); pool: $(q fallocate -l "$pool_bytes" POOL)"
  shadowd_cmd FILE SOCK CTL POOL PORT
  echo "shadowd: $(q "${cmd[@]}")"
  if (( cycles > 0 )); then
    echo "connections phase: $conns connections at once (--max-connections $conns) from one process ($py + libnbd, non-blocking connects, one select loop),"
    echo "  each: WRITE then READ of 4 KiB + 64 KiB + 1 MiB in its own 2 MiB region, all in flight together, verified, twice;"
    echo "  $extra more at once beyond the limit, then one raw socket; all closed (half after NBD_CMD_DISC); one new connection;"
    echo "  the whole cycle $cycles times (descriptors compared after each cycle); hang guard ${hang}s"
  else
    echo "connections phase: skipped (LOAD_CYCLES=0)"
  fi
  if (( soak > 0 )); then
    echo "soak: ${soak}s, sampled every ${sample_every}s (VmRSS, VmHWM, /proc/PID/fd, Threads):"
    echo "  $(q "${fio_soak[@]}" --uri='nbd+unix:///?socket=SOCK' --output=FILE)"
  else
    echo "soak: skipped (LOAD_SOAK_SECONDS=0)"
  fi
  echo "RSS flat: growth over the soak's second half (least-squares line) <= ${rss_bound} MiB"
} >"$header"
cat "$header"
echo

# --- run ----------------------------------------------------------------------
shadowd_cmd "$file" "$sock" "$ctl" "$pool" "$metrics_port"
slog=$work/shadowd.log
log "starting shadowd (formatting the pool)"
start_notified 120 "$slog" "${cmd[@]}" ||
  { tail -n 20 "$slog" >&2; die "shadowd did not report READY=1 (helper rc $notify_rc)"; }
samples=$work/samples.txt
: >"$samples"
echo idle >"$work/phase"
start_sampler "$samples"

if (( cycles > 0 )); then
  log "connections phase: $conns held, $extra beyond the limit, $cycles cycles"
  echo connections >"$work/phase"
  "$py" "$conns_py" phase "$uri" "$conns" "$extra" "$server_pid" "$shadowctl_bin" "$ctl" \
    "$metrics_port" "$hang" "$cycles" "$work/conns.json" 2>"$work/conns.log" ||
    log "the connections helper exited $?: $(tail -n 3 "$work/conns.log" | tr '\n' ' ')"
fi

quiet() {  # OUT : the daemon's descriptors once no connection is open (JSON)
  "$py" "$conns_py" quiet "$server_pid" "$sock" "$ctl" "$metrics_port" "$shadowctl_bin" \
    "$hang" >"$1" 2>>"$work/conns.log" || log "descriptor count failed: $(tail -n 1 "$work/conns.log")"
}

fio_rc=skipped
if (( soak > 0 )); then
  quiet "$work/fds-before-soak.json"
  log "soak: ${soak}s of fio, $fio_jobs jobs x iodepth $fio_depth"
  echo soak >"$work/phase"
  fio_rc=0
  cpu_mark "$work/soak.cpu" "$server_pid"
  "${fio_soak[@]}" --uri="$uri" --output="$work/fio.json" >"$work/fio.log" 2>&1 || fio_rc=$?
  cpu_mark "$work/soak.cpu" "$server_pid"
  echo after >"$work/phase"
  quiet "$work/fds-after-soak.json"
fi
stop_sampler
"$shadowctl_bin" --socket "$ctl" --json status >"$work/status-end.json" 2>/dev/null || true
"$shadowctl_bin" --socket "$ctl" --json pool >"$work/pool-end.json" 2>/dev/null || true
alive=1
kill -0 "$server_pid" 2>/dev/null || alive=0
stop_server
log "shadowd exited: $server_rc"

# --- report -------------------------------------------------------------------
bench_py "$work" "$header" "$out_json" "$stamp" "$conns" "$extra" "$soak" "$rss_bound" \
  "$fio_rc" "$server_rc" "$alive" "$cycles" <<'PY'
import json, os, sys
work, header, out_json, stamp = sys.argv[1:5]
n, k, soak, rss_bound = (int(x) for x in sys.argv[5:9])
fio_rc, server_rc, alive = sys.argv[9], sys.argv[10], sys.argv[11] == "1"
n_cycles = int(sys.argv[12])
checks = []  # (name, ok, figures)
anomalies = []


def check(name, ok, figures):
    checks.append((name, bool(ok), figures))


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --- connections phase
res = load(f"{work}/conns.json") or {}
cyc = res.get("cycles", [])
conn_lines = []
if not cyc and n_cycles > 0:
    check("connections phase ran", False, "no result (the helper failed: see conns.log)")
for i, c in enumerate(cyc):
    if "exception" in c:
        check(f"connections cycle {i + 1} ran", False, c["exception"])


def all_cycles(key):
    return [c for c in cyc if key in c]


def fmt_diff(dd):
    return ", ".join(f"{v:+d} {k}" for k, v in dd.items()) or "same kinds"


def kinds_diff(a, b):
    return {x: b.get(x, 0) - a.get(x, 0) for x in sorted(set(a) | set(b)) if b.get(x, 0) != a.get(x, 0)}


# The one thing the daemon opens lazily and keeps: the shadow thread's own
# ring (an io_uring and its eventfd), when it first makes a version (in the
# background, at a moment no client can see). Descriptors may differ from the
# fresh daemon's by exactly that, and by nothing else.
LAZY = {"anon_inode:[eventfd]": 1, "anon_inode:[io_uring]": 1}


def fresh_or_lazy(fresh_kinds, kinds):
    # (a fresh count taken while the shadow thread was between the two gets half of it)
    return all(LAZY.get(k) == v for k, v in kinds_diff(fresh_kinds, kinds).items())


bs = all_cycles("burst")
if bs:
    check(f"burst: {n} connects at once all accepted", all(c["burst"]["connected"] == n for c in bs),
          "; ".join(f"cycle {i + 1}: {c['burst']['connected']} at once, "
                    f"{c['burst']['backlog_eagain']} EAGAIN (listen backlog full), "
                    f"{c['burst']['other_error_count']} other errors, {c['burst']['hung']} hung"
                    + (f", {c['retried_connected']}/{c['retried']} connected when retried one by one"
                       if c.get("retried") else "")
                    for i, c in enumerate(bs)))
hs = all_cycles("round2")
if hs:
    c = hs[0]
    h, r1, r2 = c["holding"], c["round1"], c["round2"]
    fails = [f for x in hs for f in x["round1"]["failures"] + x["round2"]["failures"]]
    check(f"connections held: {n} served at once", all(
        x["held"] == n and x["holding"]["status_open"] == n and x["holding"]["fds"]["nbd"] == n
        and x["holding"].get("metrics_connections_active") == n and x["round1"]["verified"] == n
        and x["round2"]["verified"] == n for x in hs),
        f"{c['held']} held; status open {h['status_open']}, {h['fds']['nbd']} client sockets "
        f"in /proc/PID/fd, shadowd_connections_active "
        f"{h.get('metrics_connections_active', h.get('metrics_error'))}; verified I/O on "
        f"{r1['verified']} then {r2['verified']} connections"
        + (f" (same in all {len(hs)} cycles)" if len(hs) > 1 else "")
        + ("; failures: " + "; ".join(fails[:3]) if fails else ""))
es = all_cycles("after_extra")
if es:
    def extra_ok(c):
        e, ae = c["extra"], c["after_extra"]
        return (e["refused"] == k and e["connected"] == 0 and e["hung"] == 0
                and e["backlog_eagain"] == 0 and c["raw_probe"] == "eof"
                and ae["status_open"] == n and ae["attempts_seen"] == k + 1)
    c = es[0]
    e, ae = c["extra"], c["after_extra"]
    slow = max((x["extra"]["slowest_refusal_ms"] or 0) for x in es)
    check(f"refusals clean: {k} beyond the limit + 1 raw socket", all(extra_ok(x) for x in es),
          f"{e['refused']} refused ({'; '.join(e['errors'])[:90]}), slowest {slow:.1f} ms, "
          f"{e['connected']} connected, {e['hung']} hung, {e['backlog_eagain']} EAGAIN; "
          f"raw socket: {c['raw_probe']}; daemon counted {ae['attempts_seen']} attempts, "
          f"still {ae['status_open']} open"
          + (f" (cycle 1; all {len(es)} cycles {'alike' if all(extra_ok(x) for x in es) else 'NOT alike'})"
             if len(es) > 1 else ""))
cs = all_cycles("closed")
if cs:
    check("connections closed: 0 open, no client socket left",
          all(c["closed"]["status_open"] == 0 and c["closed"]["quiet"]["settled"] for c in cs),
          "; ".join(f"cycle {i + 1}: open {c['closed']['status_open']}, "
                    f"{c['closed']['quiet']['nbd']} client sockets, {c['closed']['seconds']:.2f}s to settle"
                    for i, c in enumerate(cs)))
    fresh_kinds = cs[0]["baseline"]["quiet"]["kinds"]
    figs = (f"fresh daemon {cs[0]['baseline']['fds']}, holding {cs[0]['holding']['fds']['total']}; "
            + "; ".join(f"after cycle {i + 1}: {c['closed']['fds']} "
                        f"({fmt_diff(kinds_diff(fresh_kinds, c['closed']['quiet']['kinds']))} vs fresh)"
                        for i, c in enumerate(cs)))
    check("fds back to baseline after every cycle (fresh + the shadow thread's ring)",
          all(fresh_or_lazy(fresh_kinds, c["closed"]["quiet"]["kinds"]) for c in cs), figs)
    conn_lines.append("connections phase RSS MiB: fresh " + f"{cs[0]['baseline']['rss_kb'] / 1024:.0f}; "
                      + "; ".join(f"cycle {i + 1} holding {c['holding']['rss_kb'] / 1024:.0f}, "
                                  f"after close {c['closed']['rss_kb'] / 1024:.0f}"
                                  for i, c in enumerate(cs)))
    conn_lines.append("connections phase seconds: " + "; ".join(
        f"cycle {i + 1} " + ", ".join(f"{a} {v:.1f}" for a, v in c.get("seconds", {}).items())
        for i, c in enumerate(cs)))
ns = all_cycles("end")
if ns:
    check("a new connection afterwards is served", all(
        c["new_connection"] == "ok" and c["end"]["status_open"] == 0 and c["end"]["quiet"]["settled"]
        for c in ns), "; ".join(f"cycle {i + 1}: {c['new_connection']}" for i, c in enumerate(ns)))

# --- samples
samples = []
for line in open(f"{work}/samples.txt"):
    p = line.split()
    if len(p) == 6 and all(p[i].isdigit() for i in range(2, 6)):
        samples.append({"t": float(p[0]), "wall": float(p[0]), "phase": p[1], "rss_kb": int(p[2]),
                        "hwm_kb": int(p[3]), "fds": int(p[4]), "threads": int(p[5])})
t0 = samples[0]["t"] if samples else 0
for s in samples:
    s["t"] -= t0

# --- soak
figures = {}
rss_steps = []
log_text = open(f"{work}/shadowd.log", errors="replace").read()
if soak > 0:
    fj = None
    try:
        txt = open(f"{work}/fio.json").read()
        fj = json.loads(txt[txt.index("{"):])["jobs"][0]
    except (OSError, ValueError) as ex:
        check("soak: fio ran", False, f"no fio JSON ({ex}); fio exit {fio_rc}")
    fio_log = open(f"{work}/fio.log", errors="replace").read() if os.path.exists(f"{work}/fio.log") else ""
    verify_lines = [l for l in fio_log.splitlines() if "verify" in l and ("fail" in l or "bad" in l)]
    if fj:
        rd, wr = fj["read"], fj["write"]
        figures = {
            "read_mib_s": rd["bw_bytes"] / 2**20, "write_mib_s": wr["bw_bytes"] / 2**20,
            "read_iops": rd["iops"], "write_iops": wr["iops"],
            "read_clat_p99_ms": rd["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e6,
            "write_clat_p99_ms": wr["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e6,
            "read_clat_p50_ms": rd["clat_ns"].get("percentile", {}).get("50.000000", 0) / 1e6,
            "write_clat_p50_ms": wr["clat_ns"].get("percentile", {}).get("50.000000", 0) / 1e6,
            "read_ios": rd["total_ios"], "write_ios": wr["total_ios"],
            "gib_written": wr["io_bytes"] / 2**30, "gib_read": rd["io_bytes"] / 2**30,
            "total_err": fj.get("total_err", 0), "error": fj.get("error", 0),
            "verify_failure_lines": len(verify_lines)}
        verr = figures["total_err"] if figures["error"] == 84 or verify_lines else 0
        verr = max(verr, len(verify_lines))
        figures["verify_errors"] = verr
        check("soak: fio verify errors 0", verr == 0,
              f"{verr} verify failures ({figures['read_ios']:,} reads incl. verify reads, "
              f"{figures['write_ios']:,} writes, {figures['gib_written']:.1f} GiB written)"
              + (f"; first: {verify_lines[0][:150]}" if verify_lines else ""))
        check("soak: no I/O errors, fio exit 0",
              fio_rc == "0" and figures["error"] in (0, 84) and (figures["error"] == 0 or verr),
              f"fio exit {fio_rc}, error {figures['error']}, total_err {figures['total_err']}")
    soak_s = [s for s in samples if s["phase"] == "soak"]
    if len(soak_s) >= 4:
        half = [s for s in soak_s if s["t"] >= (soak_s[0]["t"] + soak_s[-1]["t"]) / 2]
        xs, ys = [s["t"] for s in half], [s["rss_kb"] / 1024 for s in half]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        growth = slope * (xs[-1] - xs[0])
        rss = [s["rss_kb"] / 1024 for s in soak_s]
        figures.update(rss_first_mib=rss[0], rss_max_mib=max(rss), rss_last_mib=rss[-1],
                       rss_growth_2nd_half_mib=growth, rss_slope_mib_per_min=slope * 60,
                       fds_first=soak_s[0]["fds"], fds_last=soak_s[-1]["fds"],
                       fds_max=max(s["fds"] for s in soak_s),
                       # without the soak's last sample: fio may be closing its connections
                       fds_2nd_half_first=half[0]["fds"], fds_2nd_half_last=half[-2]["fds"],
                       fds_2nd_half_max=max(s["fds"] for s in half[:-1]),
                       threads_first=soak_s[0]["threads"], threads_last=soak_s[-1]["threads"],
                       threads_max=max(s["threads"] for s in soak_s), samples=len(soak_s))
        check(f"soak: RSS flat (2nd-half growth <= {rss_bound} MiB)", growth <= rss_bound,
              f"RSS {rss[0]:.1f} first, {max(rss):.1f} max, {rss[-1]:.1f} last MiB; "
              f"2nd half {growth:+.1f} MiB ({slope * 60:+.2f} MiB/min, {len(half)} samples)")
        # Where RSS rose by 8 MiB or more from one sample to the next, and
        # what the daemon logged since the sample before (the log's local time).
        import datetime
        events = []
        for l in log_text.splitlines():
            try:
                events.append((datetime.datetime.fromisoformat(l.split()[0]).timestamp(), l))
            except (ValueError, IndexError):
                pass
        for a, b in zip(soak_s, soak_s[1:]):
            if b["rss_kb"] - a["rss_kb"] >= 8 << 10:
                near = [l.split(" ", 2)[2][:70] for t, l in events if a["wall"] - 1 < t <= b["wall"]]
                rss_steps.append(f"{b['t'] - soak_s[0]['t']:.0f}s into the soak: "
                                 f"{(b['rss_kb'] - a['rss_kb']) / 1024:+.0f} MiB to "
                                 f"{b['rss_kb'] / 1024:.0f}"
                                 + (f" (logged meanwhile: {'; '.join(sorted(set(near))[:2])})"
                                    if near else " (nothing logged meanwhile)"))
    else:
        check("soak: RSS sampled", False, f"only {len(soak_s)} samples during the soak")
    before, after = load(f"{work}/fds-before-soak.json"), load(f"{work}/fds-after-soak.json")
    if before and after:
        figures.update(fds_before_soak=before["total"], fds_after_soak=after["total"],
                       open_after_soak=after["open"])
        diff = kinds_diff(before["kinds"], after["kinds"])
        fresh_kinds = cs[0]["baseline"]["quiet"]["kinds"] if cs else before["kinds"]
        ok = after["settled"] and fresh_or_lazy(fresh_kinds, after["kinds"])
        fig = (f"fds {before['total']} before, {after['total']} after the soak"
               + (f" ({fmt_diff(diff)}; vs fresh: "
                  f"{fmt_diff(kinds_diff(fresh_kinds, after['kinds']))})" if diff else "")
               + f"; open {after['open']}, {after['nbd']} client sockets left")
        if "fds_2nd_half_first" in figures:
            ok = ok and figures["fds_2nd_half_first"] == figures["fds_2nd_half_last"]
            fig += (f"; during the soak's 2nd half (but its last sample): "
                    f"{figures['fds_2nd_half_first']} first, {figures['fds_2nd_half_last']} last, "
                    f"{figures['fds_2nd_half_max']} max")
        check("soak: no descriptor leak", ok, fig)
    else:
        check("soak: no descriptor leak", False, "no descriptor counts (see conns.log)")

# --- the daemon
check("daemon alive to the end, exit 0 on SIGTERM", alive and server_rc == "0",
      f"{'alive' if alive else 'DIED'}, exit {server_rc}")
refusing = [l for l in log_text.splitlines() if "refusing connection" in l]
others = [l for l in log_text.splitlines() if l.strip() and "refusing connection" not in l]
for l in others[:20]:
    anomalies.append("shadowd: " + l[:200])
if len(others) > 20:
    anomalies.append(f"shadowd: ... {len(others) - 20} more lines")
if es:
    want = (k + 1) * len(es)
    if len(refusing) != want:
        anomalies.append(f"shadowd logged {len(refusing)} 'refusing connection' lines, "
                         f"expected {want} (one per refused attempt)")

# --- print
w = max(len(x[0]) for x in checks) + 2
lines = [f"{'check':<{w}}result  figures", "-" * (w + 60)]
for name, ok, fig in checks:
    lines.append(f"{name:<{w}}{'PASS' if ok else 'FAIL':<8}{fig}")
table = "\n".join(lines)
print(table)
print()
for line in conn_lines:
    print(line)
if conn_lines:
    print()
if figures.get("read_iops") is not None:
    f = figures
    soak_table = "\n".join([
        f"soak ({soak}s)          read        write",
        f"throughput MiB/s  {f['read_mib_s']:>9.1f}  {f['write_mib_s']:>11.1f}",
        f"IOPS              {f['read_iops']:>9,.0f}  {f['write_iops']:>11,.0f}",
        f"clat p50 ms       {f['read_clat_p50_ms']:>9.2f}  {f['write_clat_p50_ms']:>11.2f}",
        f"clat p99 ms       {f['read_clat_p99_ms']:>9.2f}  {f['write_clat_p99_ms']:>11.2f}",
        f"RSS MiB           first {f.get('rss_first_mib', 0):.1f}  max {f.get('rss_max_mib', 0):.1f}"
        f"  last {f.get('rss_last_mib', 0):.1f}  2nd-half growth {f.get('rss_growth_2nd_half_mib', 0):+.1f}",
        f"fds               first {f.get('fds_first', '-')}  last {f.get('fds_last', '-')}"
        f"  (after the soak {f.get('fds_after_soak', '-')}, before {f.get('fds_before_soak', '-')})",
        f"threads           first {f.get('threads_first', '-')}  max {f.get('threads_max', '-')}"
        f"  last {f.get('threads_last', '-')}"])
    print(soak_table)
    print("(reads include fio's verify reads; latency percentiles over all block sizes together)")
    if rss_steps:
        print("RSS steps of 8 MiB or more between samples:")
        for x in rss_steps:
            print("  " + x)
    print()
else:
    soak_table = ""
cpu = cpu_usage(f"{work}/soak.cpu") if soak > 0 else None
if cpu:
    print(f"CPU during the soak (% of one core): shadowd {cpu['server']:.0f}, fio {cpu['fio']:.0f}, "
          f"other {cpu['other']:.0f}")
    if cpu["other"] > 25:
        anomalies.append(f"other processes used {cpu['other']:.0f}% of a core during the soak "
                         "(the machine was not idle)")
    print()
status_end = load(f"{work}/status-end.json")
pool_end = load(f"{work}/pool-end.json")
lines_all = log_text.splitlines()
pool_line = None
if pool_end:
    pool_line = (f"pool ({pool_end.get('capacity_bytes', 0) / 2**30:.1f} GiB): "
                 f"{sum('history degraded' in l for l in lines_all)} 'history degraded' and "
                 f"{sum('history restarted' in l for l in lines_all)} 'history restarted' log lines; "
                 f"`shadowctl pool` at the end: retention_shrinks {pool_end.get('retention_shrinks')}, "
                 f"pool_errors {pool_end.get('pool_errors')}, zones_reclaimed "
                 f"{pool_end.get('zones_reclaimed')}")
    print(pool_line)
    print()
failed = [x[0] for x in checks if not x[1]]
print(f"verdict: {'PASS' if not failed else 'FAIL'} ({len(checks) - len(failed)} of {len(checks)} checks passed)")
finish(anomalies, "shadowd",
       {"timestamp": stamp, "header": open(header).read(), "table": table,
        "soak_table": soak_table, "pool_line": pool_line, "rss_steps": rss_steps, "checks": [{"name": a, "pass": b, "figures": c_}
                                             for a, b, c_ in checks],
        "connections": res, "soak": figures, "samples": samples, "cpu_soak": cpu,
        "fio": (json.loads(open(f"{work}/fio.json").read()[open(f"{work}/fio.json").read().index("{"):])
                if soak > 0 and os.path.exists(f"{work}/fio.json") else None),
        "status_end": status_end, "pool_end": pool_end,
        "shadowd_log_tail": log_text[-4000:], "anomalies": anomalies}, out_json)
sys.exit(1 if failed else 0)
PY
