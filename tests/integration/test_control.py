#!/usr/bin/python3
"""The control socket and shadowctl against a live shadowd (--test-clock).

* Exactness: a known workload through libnbd (exact pread/pwrite/zero/trim
  counts at known offsets, from one connection, from three concurrent ones
  and with 16 AIO requests in flight), then `shadowctl --json top` and
  `segment` report exactly those counts per segment; `status` reports the
  request counts by op and `history export` the same per-segment totals.
* Windows and priority: the formula's values with the default tunables and
  after `debug advance 60` (gamma); `config set alpha=0` / `beta=0` reorder
  the ranking as the formula says; after `debug advance 3660` the counts are
  gone from the 1 h window and still in the 1 d window.
* Permissions: the socket is 0660 (root:root, or root:GROUP with
  --control-group); an unprivileged uid cannot connect; given access (chmod
  0666) it may read (status) but `config set` / `debug advance` get
  permission_denied and change nothing; a uid in the control group may set.
* Every malformed request class sent raw over the socket gets its error
  code (invalid JSON, non-object, missing cmd, unknown cmd, wrong types, out
  of range values, wrong version, a 2 MiB line, 64 MiB without a newline,
  disconnect mid-line and mid-reply, more than 64 clients); afterwards the
  daemon still serves NBD I/O and the control socket.
* shadowctl's exit codes (0 / 1 daemon error or unreachable / 2 usage),
  SHADOWD_SOCKET, human output, `info` and `version`; a stale socket file is
  replaced, a regular file at the path and an unknown group are start-up
  errors; --no-monitor leaves status working and monitor commands
  unavailable.

Synchronisation: the control socket exists before READY=1; every exchange
waits for a reply line or EOF. Time moves only through `debug advance`.
"""

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd  # noqa: E402
from harness import (MiB, Checks, Daemon, DaemonError, expect, expect_eq,  # noqa: E402
                     log, main, shadowctl_path)

SIZE = 64 * MiB
SEG = 64 * 1024
IO_TIMEOUT = 30.0  # failure guard for raw socket reads, never waited for
NOBODY = 65534


# --------------------------------------------------------------------------
# helpers


class Ctl:
    """shadowctl against one control socket."""

    def __init__(self, path):
        self.path = path

    def run(self, *args, user=None, json_out=True, env=None, socket_path=True):
        cmd = [shadowctl_path()]
        if socket_path:
            cmd += ["--socket", self.path]
        if json_out:
            cmd.append("--json")
        cmd += [str(a) for a in args]
        if user is not None:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] + cmd
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=60, env=env)
        return p.returncode, p.stdout.decode(), p.stderr.decode()

    def ok(self, *args, **kw):
        rc, out, err = self.run(*args, **kw)
        if rc != 0:
            raise AssertionError(f"shadowctl {' '.join(map(str, args))}: exit {rc}: {err}{out}")
        reply = json.loads(out)  # pure JSON: exactly one object
        expect(reply.get("ok") is True and reply.get("version") == 1, f"bad reply {reply}")
        return reply

    def fails(self, code, *args, **kw):
        """Run a command that the daemon must refuse with `code`."""
        rc, out, err = self.run(*args, **kw)
        expect_eq(rc, 1, f"exit code of shadowctl {' '.join(map(str, args))} ({err.strip()})")
        expect(code in err, f"stderr does not name {code}: {err!r}")
        reply = json.loads(out)
        expect_eq(reply.get("code"), code, "error code in --json output")
        expect_eq(reply.get("ok"), False, "ok in --json output")
        return reply


class Raw:
    """A raw connection to the control socket."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(IO_TIMEOUT)
        self.s.connect(path)
        self.f = self.s.makefile("rb")

    def send(self, data):
        self.s.sendall(data)

    def reply(self):
        line = self.f.readline()
        expect(line.endswith(b"\n"), f"no complete reply line (got {line!r})")
        r = json.loads(line)
        expect("ok" in r and r.get("version") == 1, f"reply without envelope: {r}")
        return r

    def ask(self, line):
        self.send(line + b"\n")
        return self.reply()

    def at_eof(self):
        try:
            return self.f.readline() == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.f.close()
        self.s.close()


def connect(d):
    h = nbd.NBD()
    h.set_export_name("disk")
    h.connect_unix(d.unix_path)
    return h


def control_dir():
    # Reachable by an unprivileged uid (mkdtemp makes 0700 directories).
    d = tempfile.mkdtemp(prefix="shadowd-ctl-")
    os.chmod(d, 0o755)
    return d


def start(path, extra=(), name="shadowd-control", checks=None):
    return Daemon(size=SIZE, name=name, checks=checks,
                  extra_args=["--control", path, "--test-clock", "--segment-size", str(SEG),
                              *extra])


# --------------------------------------------------------------------------
# the workload and its expected counts


class Workload:
    """Known requests; per-segment [reads, writes, bytes_read, bytes_written]."""

    def __init__(self):
        self.seg = {}
        self.requests = {"read": 0, "write": 0, "write_zeroes": 0, "trim": 0}
        self.bytes = {"read": 0, "write": 0, "write_zeroes": 0, "trim": 0}
        self.lock = threading.Lock()

    def count(self, op, off, ln):
        kind = "read" if op == "read" else "write"
        with self.lock:
            self.requests[op] += 1
            self.bytes[op] += ln if op in ("read", "write") else 0
            s = off // SEG
            while s * SEG < off + ln:
                lo, hi = max(off, s * SEG), min(off + ln, (s + 1) * SEG)
                e = self.seg.setdefault(s, [0, 0, 0, 0])
                if kind == "read":
                    e[0] += 1
                    e[2] += hi - lo
                else:
                    e[1] += 1
                    e[3] += hi - lo
                s += 1

    def pread(self, h, ln, off):
        h.pread(ln, off)
        self.count("read", off, ln)

    def pwrite(self, h, ln, off):
        h.pwrite(b"\xa5" * ln, off)
        self.count("write", off, ln)

    def run(self, d):
        h = connect(d)
        for i in range(40):                            # the most accesses
            self.pread(h, 4096, 10 * SEG + i % 16 * 4096)
        for _ in range(25):                            # the most writes
            self.pwrite(h, 4096, 20 * SEG)
        self.pread(h, 8192, 31 * SEG - 4096)           # spans segments 30 and 31
        for _ in range(3):
            self.pread(h, 512, 40 * SEG + 100)          # unaligned
        for _ in range(2):
            self.pwrite(h, 1000, 40 * SEG + 700)
        self.pread(h, 3 * SEG, 50 * SEG)                # segments 50, 51, 52
        self.pwrite(h, 2 * SEG + 8192, 70 * SEG - 4096)  # segments 69..72
        h.zero(SEG, 60 * SEG)
        self.count("write_zeroes", 60 * SEG, SEG)
        h.trim(4096, 61 * SEG)
        self.count("trim", 61 * SEG, 4096)
        h.flush()                                      # counts for no segment
        self.pread(h, 4096, SIZE - 4096)                # the last segment
        h.shutdown()

        # Three connections at once, each with its own and a shared segment.
        def worker(i):
            c = connect(d)
            for _ in range(10 + i):
                self.pread(c, 4096, (100 + i) * SEG + 8192)
            for _ in range(3 + i):
                self.pwrite(c, 4096, (100 + i) * SEG)
            for _ in range(7):
                self.pread(c, 4096, 200 * SEG + i * 4096)
            for _ in range(2):
                self.pwrite(c, 512, 200 * SEG + 60000)
            c.shutdown()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        # 16 reads in flight on one connection.
        h = connect(d)
        buf = nbd.Buffer(4096)
        cookies = [h.aio_pread(buf, 300 * SEG + i * 4096) for i in range(16)]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            expect(h.aio_command_completed(c), f"aio read {c} not completed")
            self.count("read", 300 * SEG, 4096)
        h.shutdown()
        self.connections = 5


# --------------------------------------------------------------------------
# checks


def by_id(top):
    return {s["id"]: s for s in top["segments"]}


def check_exact(ctl, w, window="1h"):
    for by, idx in (("reads", 0), ("writes", 1)):
        top = ctl.ok("top", "-n", 100, "--by", by, "--window", window)
        expect_eq(top["by"], by, "top.by")
        got = {s["id"]: [s["reads"], s["writes"], s["bytes_read"], s["bytes_written"]]
               for s in top["segments"]}
        expect_eq(got, w.seg, f"per-segment counts of top --by {by} --window {window}")
        keys = [(-s[by], s["id"]) for s in top["segments"]]
        expect_eq(keys, sorted(keys), f"order of top --by {by}")
        for s in top["segments"]:
            expect_eq(s["offset"], s["id"] * SEG, "offset of a segment")
            expect_eq(s["length"], SEG, "length of a segment")


def test_exactness(checks, d, ctl, w):
    with checks.check("top and segment report exactly the workload's counts"):
        w.run(d)
        log(f"   workload touched {len(w.seg)} segments: {w.requests}")
        check_exact(ctl, w)
        for target, sid in ((10 * SEG, 10), (10 * SEG + SEG - 1, 10), ("640K", 10),
                            ("#20", 20), ("#200", 200), (SIZE - 1, SIZE // SEG - 1)):
            s = ctl.ok("segment", target)["segment"]
            expect_eq(s["id"], sid, f"segment {target}")
            hour = next(x for x in s["windows"] if x["window_seconds"] == 3600)
            expect_eq([hour["reads"], hour["writes"], hour["bytes_read"], hour["bytes_written"]],
                      w.seg[sid], f"counts of segment {target}")
        untouched = ctl.ok("segment", "#5")["segment"]
        expect_eq(untouched["last_access_s"], -1, "last access of an untouched segment")

    with checks.check("status reports requests and bytes by op, connections, segments"):
        st = ctl.ok("status")
        for op, n in w.requests.items():
            expect_eq(st["ops"][op]["requests"], n, f"{op} requests")
            expect_eq(st["ops"][op]["errors"], 0, f"{op} errors")
        for op in ("read", "write"):
            expect_eq(st["ops"][op]["bytes"], w.bytes[op], f"{op} bytes")
        expect_eq(st["ops"]["flush"]["requests"], 1, "flush requests")
        expect_eq(st["connections"]["total"], w.connections, "connections since start")
        expect_eq(st["export"]["name"], "disk", "export name")
        expect_eq(st["export"]["size_bytes"], SIZE, "export size")
        expect_eq(st["segment_bytes"], SEG, "segment size")
        expect_eq(st["segments"], SIZE // SEG, "segment count")
        expect(any(e.startswith("unix:") for e in st["endpoints"]), "unix endpoint listed")
        m = st["monitor"]
        expect_eq(m["segments_active"], len(w.seg), "active segments")
        expect(0 < m["bytes_per_segment_resident"] <= 32, f"bytes per segment {m}")
        expect_eq(st["uptime_seconds"], 0, "uptime on a stopped test clock")

    with checks.check("history export (CSV and JSON) adds up to the workload"):
        out = os.path.join(os.path.dirname(ctl.path), "history.csv")
        rc, _, err = ctl.run("history", "export", "--format", "csv", "-o", out, json_out=False)
        expect_eq(rc, 0, f"history export exit code ({err})")
        with open(out) as f:
            lines = f.read().splitlines()
        expect_eq(lines[0], "timestamp,segment,op,count,bytes", "CSV header")
        totals = {}
        for row in lines[1:]:
            t, seg, op, count, nbytes = row.split(",")
            e = totals.setdefault(int(seg), [0, 0, 0, 0])
            i = 0 if op == "read" else 1
            e[i] += int(count)
            e[i + 2] += int(nbytes)
            expect(int(count) > 0, f"row with zero count: {row}")
        expect_eq(totals, w.seg, "per-segment totals of the CSV history")
        rc, out_json, err = ctl.run("history", "export", "--format", "json", json_out=False)
        expect_eq(rc, 0, f"history export --format json ({err})")
        recs = json.loads(out_json)
        expect_eq(sorted((r["segment"], r["op"], r["count"], r["bytes"]) for r in recs),
                  sorted((int(row.split(",")[1]), row.split(",")[2], int(row.split(",")[3]),
                          int(row.split(",")[4])) for row in lines[1:]),
                  "JSON history equals CSV history")
        os.unlink(out)


def priority(s, alpha=1.0, beta=1.0, gamma=0.001, baseline=0.0, since=0):
    return (baseline + alpha * (s[0] + s[1]) / 3600 + beta * s[1] / 3600 - gamma * since)


def ranking(w, **kw):
    return [sid for _, sid in sorted((-priority(v, **kw), sid) for sid, v in w.seg.items())]


def check_priority(ctl, w, since=0, **kw):
    top = ctl.ok("top", "-n", 100, "--by", "priority")
    got = by_id(top)
    expect_eq(sorted(got), sorted(w.seg), "segments ranked by priority")
    for sid, v in w.seg.items():
        want = priority(v, since=since, **kw)
        expect(abs(got[sid]["priority"] - want) < 1e-9,
               f"priority of segment {sid}: got {got[sid]['priority']}, want {want}")
    expect_eq([s["id"] for s in top["segments"]], ranking(w, since=since, **kw),
              f"ranking with {kw}")


def test_priority(checks, d, ctl, w):
    with checks.check("priority follows the formula; config set alpha/beta reorders"):
        check_priority(ctl, w)
        # Segment 10 has the most accesses (all reads), segment 20 the most writes.
        expect_eq(ctl.ok("top", "-n", 1)["segments"][0]["id"], 20, "first with alpha=beta=1")
        r = ctl.ok("config", "set", "beta=0")
        expect_eq((r["previous"], r["value"]), (1.0, 0.0), "config set beta reply")
        check_priority(ctl, w, beta=0.0)
        expect_eq(ctl.ok("top", "-n", 1)["segments"][0]["id"], 10, "first with beta=0")
        ctl.ok("config", "set", "beta=1")
        ctl.ok("config", "set", "alpha=0")
        check_priority(ctl, w, alpha=0.0)
        expect_eq(ctl.ok("top", "-n", 1)["segments"][0]["id"], 20, "first with alpha=0")
        expect(ranking(w, alpha=0.0) != ranking(w) != ranking(w, beta=0.0),
               "the workload tells the three rankings apart")
        ctl.ok("config", "set", "alpha=1")
        ctl.ok("config", "set", "baseline=2.5")
        check_priority(ctl, w, baseline=2.5)
        ctl.ok("config", "set", "baseline=0")
        expect_eq(ctl.ok("config", "get", "alpha")["value"], 1.0, "alpha restored")

    with checks.check("debug advance 60: gamma * time since last access"):
        r = ctl.ok("debug", "advance", 60)
        expect_eq(r["buckets_rolled"], 1, "buckets closed by advancing 60 s")
        check_priority(ctl, w, since=60)
        ctl.ok("config", "set", "gamma=0.5")
        check_priority(ctl, w, since=60, gamma=0.5)
        ctl.ok("config", "set", "gamma=0.001")
        check_exact(ctl, w)  # a closed bucket still counts


def test_windows(checks, ctl, w):
    with checks.check("after 1 h the counts leave the 1 h window and stay in 1 d"):
        # 3720 s since the workload, 3660 s since the I/O after the abuse.
        ctl.ok("debug", "advance", 3660)
        for by in ("reads", "writes", "priority"):
            expect_eq(ctl.ok("top", "-n", 100, "--by", by, "--window", "1h")["segments"], [],
                      f"top --by {by} over 1h after 61 minutes")
        check_exact(ctl, w, "1d")
        check_exact(ctl, w, "1w")
        s = ctl.ok("segment", "#10")["segment"]
        counts = {x["window_seconds"]: x["reads"] for x in s["windows"]}
        expect_eq(counts, {3600: 0, 86400: 40, 604800: 40}, "segment 10 reads by window")
        ctl.ok("config", "set", "windows_seconds=1h,2h,1d")
        expect_eq(ctl.ok("top", "--window", "2h", "--by", "reads")["segments"][0]["reads"],
                  max(v[0] for v in w.seg.values()), "counts in a window added at run time")
        ctl.fails("out_of_range", "top", "--window", "1w")
        ctl.ok("config", "set", "windows_seconds=1h,1d,1w")


def test_permissions(checks, d, ctl, w):
    if os.geteuid() != 0:
        log("   not root: permission checks need setpriv to another uid; skipped")
        return
    with checks.check("socket 0660 root:root; an unprivileged uid cannot connect"):
        st = os.lstat(ctl.path)
        expect(stat.S_ISSOCK(st.st_mode), "control path is a socket")
        expect_eq(oct(st.st_mode & 0o777), oct(0o660), "control socket mode")
        rc, _, err = ctl.run("status", user=NOBODY)
        expect_eq(rc, 1, "exit code for nobody without access")
        expect("unreachable" in err and "ermission denied" in err, f"stderr: {err!r}")

    with checks.check("unprivileged uid may read but not change (permission_denied)"):
        os.chmod(ctl.path, 0o666)
        try:
            st = ctl.ok("status", user=NOBODY)
            expect_eq(st["export"]["name"], "disk", "status as nobody")
            ctl.ok("top", "-n", 3, user=NOBODY)
            ctl.ok("config", "get", user=NOBODY)
            ctl.fails("permission_denied", "config", "set", "alpha=7", user=NOBODY)
            ctl.fails("permission_denied", "config", "set", "windows_seconds=1h", user=NOBODY)
            ctl.fails("permission_denied", "debug", "advance", "60", user=NOBODY)
            expect_eq(ctl.ok("config", "get", "alpha")["value"], 1.0, "alpha unchanged")
            expect_eq(ctl.ok("debug", "advance", 0)["now_s"], st["now_s"], "clock unchanged")
        finally:
            os.chmod(ctl.path, 0o660)


def test_group(checks):
    if os.geteuid() != 0:
        return
    with checks.check("--control-group: socket group, members may change settings"):
        cdir = control_dir()
        path = os.path.join(cdir, "ctl.sock")
        with start(path, ["--control-group", "nogroup"], name="shadowd-group", checks=checks):
            st = os.lstat(path)
            expect_eq(oct(st.st_mode & 0o777), oct(0o660), "mode with a group")
            expect_eq(st.st_gid, NOBODY, "socket group is nogroup")
            ctl = Ctl(path)
            ctl.ok("status", user=NOBODY)
            r = ctl.ok("config", "set", "alpha=3", user=NOBODY)
            expect_eq(r["value"], 3.0, "alpha set by a group member")
        expect(not os.path.exists(path), "socket removed on exit")
        os.rmdir(cdir)

    with checks.check("an unknown --control-group is a start-up error"):
        cdir = control_dir()
        try:
            with start(os.path.join(cdir, "ctl.sock"), ["--control-group", "no-such-group-x"],
                       name="shadowd-badgroup"):
                raise AssertionError("shadowd started with an unknown control group")
        except DaemonError as e:
            log(f"   {e}")
        os.rmdir(cdir)


MALFORMED = [
    (b"{", "invalid_json"),
    (b"not json at all", "invalid_json"),
    (b'{"cmd":"status"} trailing', "invalid_json"),
    (b"\x00\x01\xff\xfe", "invalid_json"),
    (b"[]", "invalid_request"),
    (b'"status"', "invalid_request"),
    (b"42", "invalid_request"),
    (b"null", "invalid_request"),
    (b'{"version":1}', "invalid_request"),
    (b'{"version":1,"cmd":7}', "invalid_request"),
    (b'{"version":"1","cmd":"status"}', "invalid_request"),
    (b'{"version":2,"cmd":"status"}', "unsupported_version"),
    (b'{"version":0,"cmd":"status"}', "unsupported_version"),
    (b'{"version":1,"cmd":"reboot"}', "unknown_command"),
    (b'{"version":1,"cmd":""}', "unknown_command"),
    (b'{"version":1,"cmd":"status","x":1}', "invalid_argument"),
    (b'{"version":1,"cmd":"top","n":"5"}', "invalid_argument"),
    (b'{"version":1,"cmd":"top","n":1.5}', "invalid_argument"),
    (b'{"version":1,"cmd":"top","by":3}', "invalid_argument"),
    (b'{"version":1,"cmd":"top","window":"soon"}', "invalid_argument"),
    (b'{"version":1,"cmd":"segment","offset":"1M"}', "invalid_argument"),
    (b'{"version":1,"cmd":"segment"}', "invalid_argument"),
    (b'{"version":1,"cmd":"config.set","key":"alpha","value":"high"}', "invalid_argument"),
    (b'{"version":1,"cmd":"config.set","key":"backing","value":"/x"}', "invalid_argument"),
    (b'{"version":1,"cmd":"config.set","key":"nope","value":1}', "invalid_argument"),
    (b'{"version":1,"cmd":"debug.advance","seconds":"1h"}', "invalid_argument"),
    (b'{"version":1,"cmd":"top","n":0}', "out_of_range"),
    (b'{"version":1,"cmd":"top","n":10001}', "out_of_range"),
    (b'{"version":1,"cmd":"top","n":-3}', "out_of_range"),
    (b'{"version":1,"cmd":"top","by":"size"}', "out_of_range"),
    (b'{"version":1,"cmd":"top","window":7200}', "out_of_range"),
    (b'{"version":1,"cmd":"segment","offset":67108864}', "out_of_range"),
    (b'{"version":1,"cmd":"segment","id":1024}', "out_of_range"),
    (b'{"version":1,"cmd":"config.set","key":"windows_seconds","value":[7]}', "out_of_range"),
    (b'{"version":1,"cmd":"config.set","key":"scoring_window_seconds","value":60}',
     "out_of_range"),
    (b'{"version":1,"cmd":"debug.advance","seconds":-1}', "out_of_range"),
    (b'{"version":1,"cmd":"history.export","format":"xml"}', "out_of_range"),
]


def test_malformed(checks, d, ctl, w):
    before = ctl.ok("config", "get")["config"]

    with checks.check("every malformed request class gets its error code"):
        r = Raw(ctl.path)
        for line, code in MALFORMED:
            reply = r.ask(line)
            expect_eq(reply.get("code"), code, f"reply to {line[:60]!r}")
            expect(reply["ok"] is False and reply.get("message"), f"error reply {reply}")
        # Pipelined in one write, answered in order; blank lines are ignored.
        r.send(b'{"cmd":"version"}\n\n{"cmd":"nope"}\r\n{"version":1,"cmd":"top","n":0}\n')
        expect_eq(r.reply()["ok"], True, "pipelined 1")
        expect_eq(r.reply()["code"], "unknown_command", "pipelined 2")
        expect_eq(r.reply()["code"], "out_of_range", "pipelined 3")
        r.close()

    with checks.check("a 2 MiB line: line_too_long, then the connection is closed"):
        r = Raw(ctl.path)
        try:
            r.send(b"x" * (2 * MiB) + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon stopped reading at the limit
        expect_eq(r.reply()["code"], "line_too_long", "reply to a 2 MiB line")
        expect(r.at_eof(), "connection closed after line_too_long")
        r.close()

    with checks.check("64 MiB without a newline is cut off, never buffered whole"):
        r = Raw(ctl.path)
        sent = 0
        try:
            while sent < 64 * MiB:
                r.send(b"{" * MiB)
                sent += MiB
        except (BrokenPipeError, ConnectionResetError):
            pass
        expect(sent < 16 * MiB, f"daemon accepted {sent} bytes of one line")
        expect_eq(r.reply()["code"], "line_too_long", "reply to an endless line")
        r.close()

    with checks.check("disconnects mid-line and mid-reply, half-close, client limit"):
        r = Raw(ctl.path)
        r.send(b'{"version":1,"cmd":"sta')
        r.close()
        r = Raw(ctl.path)
        r.send(b'{"version":1,"cmd":"history.export","format":"json"}\n' * 50)
        r.close()  # never reads the replies
        r = Raw(ctl.path)
        r.send(b'{"version":1,"cmd":"status"}\n')
        r.s.shutdown(socket.SHUT_WR)  # like `socat` at the end of its input
        expect_eq(r.reply()["ok"], True, "reply after a half-close")
        expect(r.at_eof(), "closed once everything is answered")
        r.close()
        held = []
        try:
            for _ in range(64):
                held.append(Raw(ctl.path))
                expect_eq(held[-1].ask(b'{"cmd":"version"}')["ok"], True, "within the limit")
            extra = Raw(ctl.path)
            expect_eq(extra.reply()["code"], "unavailable", "the 65th client")
            expect(extra.at_eof(), "65th client closed")
            extra.close()
        finally:
            for h in held:
                h.close()

    with checks.check("afterwards: NBD I/O, status, unchanged config and counts"):
        d.assert_alive()
        h = connect(d)
        h.pwrite(b"\x5a" * 4096, 500 * SEG)
        expect_eq(h.pread(4096, 500 * SEG), b"\x5a" * 4096, "read back after the abuse")
        h.shutdown()
        w.count("write", 500 * SEG, 4096)
        w.count("read", 500 * SEG, 4096)
        w.connections += 1
        expect_eq(ctl.ok("config", "get")["config"], before, "configuration unchanged")
        check_exact(ctl, w)
        expect_eq(ctl.ok("status")["connections"]["total"], w.connections, "connections")


def test_cli(checks, d, ctl):
    with checks.check("shadowctl: human output, env socket, exit codes, info, version"):
        for args in (["status"], ["top"], ["top", "-n", "3", "--by", "writes", "--window", "1d"],
                     ["segment", "640K"], ["segment", "#20"], ["config", "get"],
                     ["config", "get", "windows_seconds"]):
            rc, out, err = ctl.run(*args, json_out=False)
            expect_eq(rc, 0, f"shadowctl {' '.join(args)} ({err})")
            expect(out.strip() and not out.lstrip().startswith("{"), f"human output: {out!r}")
            log("   $ shadowctl " + " ".join(args) + "\n" + "\n".join(
                "     " + line for line in out.splitlines()[:8]))
        env = dict(os.environ, SHADOWD_SOCKET=ctl.path)
        rc, out, _ = ctl.run("status", env=env, socket_path=False)
        expect_eq((rc, json.loads(out)["ok"]), (0, True), "SHADOWD_SOCKET")
        for bad in (["top", "-n", "0"], ["top", "--by", "size"], ["segment", "12Q"],
                    ["segment"], ["config", "set", "alpha"], ["nonsense"], [],
                    ["debug", "advance", "soon"], ["history", "export", "--format", "xml"]):
            rc, _, err = ctl.run(*bad)
            expect_eq(rc, 2, f"exit code of usage error {bad} ({err.strip()[:80]})")
        rc, out, err = Ctl(ctl.path + ".missing").run("status")
        expect_eq(rc, 1, "exit code when unreachable")
        expect("unreachable" in err, f"stderr names the code: {err!r}")
        expect_eq(json.loads(out)["code"], "unreachable", "--json error output")
        ctl.fails("out_of_range", "segment", "1G")
        rc, out, _ = ctl.run("--help", json_out=False)
        expect(rc == 0 and "status" in out and "debug" not in out.split("Subcommands")[-1],
               "--help lists the commands and hides debug")
        for sub in (["top"], ["segment"], ["config", "set"], ["history", "export"]):
            rc, out, _ = ctl.run(*sub, "--help", json_out=False)
            expect(rc == 0 and "Example" in out, f"--help of {sub}")
        rc, out, _ = ctl.run("info", "--unix", d.unix_path)
        expect_eq((rc, json.loads(out)["size_bytes"]), (0, SIZE), "info --json")
        rc, out, _ = ctl.run("version", json_out=False)
        expect(rc == 0 and out.startswith("shadowctl "), f"version: {out!r}")


def test_socket_files(checks):
    with checks.check("a stale socket file is replaced; the socket is removed on exit"):
        cdir = control_dir()
        path = os.path.join(cdir, "ctl.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.close()  # bound, nobody listening: stale
        with start(path, name="shadowd-stale", checks=checks):
            Ctl(path).ok("status")
        expect(not os.path.exists(path), "socket removed on exit")
        os.rmdir(cdir)

    with checks.check("a regular file at the control path is a start-up error"):
        cdir = control_dir()
        path = os.path.join(cdir, "ctl.sock")
        with open(path, "w") as f:
            f.write("not a socket\n")
        try:
            with start(path, name="shadowd-notsock"):
                raise AssertionError("shadowd started over a regular file")
        except DaemonError as e:
            log(f"   {e}")
        with open(path) as f:
            expect_eq(f.read(), "not a socket\n", "the file is left alone")
        os.unlink(path)
        os.rmdir(cdir)

    with checks.check("--no-monitor: status works, monitor commands are unavailable"):
        cdir = control_dir()
        path = os.path.join(cdir, "ctl.sock")
        with start(path, ["--no-monitor"], name="shadowd-nomon", checks=checks) as d:
            ctl = Ctl(path)
            expect_eq(ctl.ok("status")["monitor"]["enabled"], False, "monitor.enabled")
            ctl.fails("unavailable", "top")
            ctl.fails("unavailable", "segment", "0")
            d.assert_alive()
        os.rmdir(cdir)


def run_all():
    checks = Checks("control")
    cdir = control_dir()
    path = os.path.join(cdir, "ctl.sock")
    try:
        with start(path, checks=checks) as d:
            ctl = Ctl(path)
            w = Workload()
            test_exactness(checks, d, ctl, w)
            test_priority(checks, d, ctl, w)
            test_permissions(checks, d, ctl, w)
            test_malformed(checks, d, ctl, w)
            test_windows(checks, ctl, w)
            test_cli(checks, d, ctl)
        test_group(checks)
        test_socket_files(checks)
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(cdir)
    checks.finish()


if __name__ == "__main__":
    main(run_all)
