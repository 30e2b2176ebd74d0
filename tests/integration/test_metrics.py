#!/usr/bin/python3
"""The Prometheus metrics endpoint (--metrics-listen), scraped and parsed.

* The page is valid text exposition format (a small strict parser below:
  HELP/TYPE before samples, label syntax and escapes, float values, no
  duplicate series, histogram series named and ordered as the format wants).
* shadowd_ names: base units, counters end in _total, gauges do not.
* A known workload over two concurrent libnbd connections (AIO reads and
  writes on both, flushes, one read refused past the end) gives exactly
  those shadowd_requests_total / _request_bytes_total /
  _request_errors_total values; the latency histogram's buckets are
  cumulative, le ascending, +Inf == _count == all requests.
* shadowd_connections_active counts the open connections,
  shadowd_connections_total the accepted ones.
* shadowd_segments == ceil(size / segment size); shadowd_segments_active is
  the number of distinct segments the workload touched;
  shadowd_monitor_memory_bytes is non-zero after I/O.
* --no-monitor: the request metrics are there, the monitor's are not.
* Only the requested address is bound (127.0.0.2 is refused), other paths
  get 404, and a metrics port already in use makes start-up fail.

Synchronisation: every figure is read after the client has its replies (the
server counts a request before queueing the reply); no sleeps.
"""

import errno
import math
import os
import re
import socket
import sys
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd  # noqa: E402
from harness import (KiB, MiB, Checks, Daemon, DaemonError, expect,  # noqa: E402
                     expect_eq, free_tcp_port, log, main, make_rng)

SEGMENT = 64 * KiB
SIZE = 64 * MiB + 4 * KiB  # not a multiple of the segment size: ceil() matters
OPS = ["read", "write", "flush", "trim", "write_zeroes", "cache", "block_status", "other"]

# --------------------------------------------------------------------------
# Text exposition format parser (version 0.0.4)

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


class ParseError(AssertionError):
    pass


def _parse_value(s, where):
    special = {"+Inf": math.inf, "Inf": math.inf, "-Inf": -math.inf,
               "NaN": math.nan, "Nan": math.nan}
    if s in special:
        return special[s]
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", s):
        raise ParseError(f"{where}: bad value {s!r}")
    return float(s)


def _parse_labels(text, pos, where):
    """Parse '{a="x",b="y"}' starting at text[pos] == '{'; return (dict, end)."""
    labels = {}
    pos += 1
    while True:
        if text[pos:pos + 1] == "}":
            return labels, pos + 1
        m = re.compile(_LABEL).match(text, pos)
        if not m:
            raise ParseError(f"{where}: bad label name at {text[pos:]!r}")
        name = m.group(0)
        pos = m.end()
        if text[pos:pos + 2] != '="':
            raise ParseError(f"{where}: expected =\" after label {name}")
        pos += 2
        val = []
        while True:
            if pos >= len(text):
                raise ParseError(f"{where}: unterminated label value")
            c = text[pos]
            if c == "\\":
                nxt = text[pos + 1:pos + 2]
                if nxt not in ('\\', '"', 'n'):
                    raise ParseError(f"{where}: bad escape \\{nxt}")
                val.append("\n" if nxt == "n" else nxt)
                pos += 2
            elif c == '"':
                pos += 1
                break
            else:
                val.append(c)
                pos += 1
        if name in labels:
            raise ParseError(f"{where}: duplicate label {name}")
        labels[name] = "".join(val)
        if text[pos:pos + 1] == ",":
            pos += 1
        elif text[pos:pos + 1] != "}":
            raise ParseError(f"{where}: expected , or }} after label {name}")


class Family:
    def __init__(self, name):
        self.name = name
        self.help = None
        self.type = None
        self.samples = []  # (sample name, labels dict, value)

    def sample(self, suffix="", **labels):
        """The value of the one sample with exactly these labels."""
        found = [v for (n, lb, v) in self.samples if n == self.name + suffix and lb == labels]
        if len(found) != 1:
            raise AssertionError(f"{self.name}{suffix}{labels}: {len(found)} samples")
        return found[0]


def parse_exposition(text):
    """Parse a Prometheus text page into {family name: Family}; strict."""
    families = {}
    seen_series = set()
    current = None
    if not text.endswith("\n"):
        raise ParseError("page does not end with a newline")
    for lineno, line in enumerate(text.split("\n")[:-1], 1):
        where = f"line {lineno}"
        if line == "":
            continue
        if line.startswith("#"):
            m = re.fullmatch(r"# (HELP|TYPE) (" + _NAME + r") ?(.*)", line)
            if not m:
                continue  # a plain comment
            kind, name, rest = m.groups()
            fam = families.get(name)
            if fam is None:
                fam = families[name] = Family(name)
            elif fam.samples:
                raise ParseError(f"{where}: {kind} for {name} after its samples")
            if kind == "HELP":
                if fam.help is not None:
                    raise ParseError(f"{where}: second HELP for {name}")
                fam.help = rest.replace("\\n", "\n").replace("\\\\", "\\")
            else:
                if fam.type is not None:
                    raise ParseError(f"{where}: second TYPE for {name}")
                if rest not in _TYPES:
                    raise ParseError(f"{where}: unknown type {rest!r}")
                fam.type = rest
            current = fam
            continue
        m = re.compile(_NAME).match(line)
        if not m:
            raise ParseError(f"{where}: bad sample line {line!r}")
        sname = m.group(0)
        pos = m.end()
        labels = {}
        if line[pos:pos + 1] == "{":
            labels, pos = _parse_labels(line, pos, where)
        rest = line[pos:]
        if not rest.startswith(" "):
            raise ParseError(f"{where}: expected a space before the value: {line!r}")
        parts = rest.split()
        if len(parts) not in (1, 2):
            raise ParseError(f"{where}: expected value [timestamp]: {line!r}")
        value = _parse_value(parts[0], where)
        if len(parts) == 2 and not re.fullmatch(r"-?\d+", parts[1]):
            raise ParseError(f"{where}: bad timestamp {parts[1]!r}")
        # Which family does the sample belong to?
        fam = None
        if current is not None:
            allowed = {current.name}
            if current.type == "histogram":
                allowed = {current.name + s for s in ("_bucket", "_sum", "_count")}
            elif current.type == "summary":
                allowed = {current.name, current.name + "_sum", current.name + "_count"}
            if sname in allowed:
                fam = current
        if fam is None:
            if sname in families:
                raise ParseError(f"{where}: samples of {sname} are not together")
            fam = current = families[sname] = Family(sname)  # untyped, undeclared
        if fam.type == "histogram" and sname.endswith("_bucket"):
            if "le" not in labels:
                raise ParseError(f"{where}: histogram bucket without le")
            _parse_value(labels["le"], where)
        key = (sname, tuple(sorted(labels.items())))
        if key in seen_series:
            raise ParseError(f"{where}: duplicate series {sname}{labels}")
        seen_series.add(key)
        fam.samples.append((sname, labels, value))
    return families


# --------------------------------------------------------------------------


def scrape(port, host="127.0.0.1", path="/metrics"):
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=30) as r:
        expect_eq(r.status, 200, "HTTP status")
        ctype = r.headers.get("Content-Type", "")
        expect(ctype.startswith("text/plain"), f"Content-Type {ctype!r}")
        text = r.read().decode("utf-8")
    fams = parse_exposition(text)
    return fams, text


def check_names(fams, at_least=10):
    """shadowd_ naming rules: base units, _total on counters and only there."""
    ours = [f for f in fams.values() if f.name.startswith("shadowd_")]
    expect(len(ours) >= at_least, f"only {len(ours)} shadowd_ families")
    for f in ours:
        expect(f.type in ("counter", "gauge", "histogram"), f"{f.name}: type {f.type}")
        expect(f.help, f"{f.name}: no HELP")
        expect(re.fullmatch(r"shadowd_[a-z0-9_]+", f.name), f"{f.name}: name")
        if f.type == "counter":
            expect(f.name.endswith("_total"), f"counter {f.name} must end in _total")
        else:
            expect(not f.name.endswith("_total"), f"{f.type} {f.name} must not end in _total")
        for bad in ("_ms", "_us", "_ns", "_kb", "_mb", "_kib", "_mib", "_milliseconds"):
            expect(bad not in f.name, f"{f.name}: not a base unit")


def check_histogram(fams, want_count):
    h = fams["shadowd_request_duration_seconds"]
    expect_eq(h.type, "histogram", "duration type")
    buckets = [(lb["le"], v) for (n, lb, v) in h.samples if n.endswith("_bucket")]
    expect(len(buckets) >= 2, "histogram has buckets")
    les = [float(le) for le, _ in buckets]
    expect_eq(buckets[-1][0], "+Inf", "last bucket le")
    expect(all(a < b for a, b in zip(les, les[1:])), f"le not ascending: {les}")
    counts = [v for _, v in buckets]
    expect(all(a <= b for a, b in zip(counts, counts[1:])),
           f"buckets not cumulative (non-decreasing): {counts}")
    count = h.sample("_count")
    total = h.sample("_sum")
    expect_eq(counts[-1], count, "+Inf bucket == _count")
    expect_eq(count, want_count, "histogram _count == requests")
    expect(les[0] > 0 and les[0] <= 1e-3, f"smallest bound {les[0]} s: seconds, not us")
    if want_count:
        expect(0 < total < want_count * 30, f"_sum {total} s for {want_count} requests")
    else:
        expect_eq(total, 0.0, "_sum with no requests")
    log(f"   histogram: count {count}, sum {total:.6f} s, {len(buckets)} buckets")


def requests(fams, metric="shadowd_requests_total"):
    f = fams[metric]
    expect_eq(f.type, "counter", f"{metric} type")
    got = {}
    for n, lb, v in f.samples:
        expect_eq(set(lb), {"op"}, f"{metric} labels")
        got[lb["op"]] = v
    expect_eq(sorted(got), sorted(OPS), f"{metric} ops")
    return got


def gauge(fams, name):
    f = fams[name]
    expect_eq(f.type, "gauge", f"{name} type")
    return f.sample()


def connect(d, strict=None):
    h = nbd.NBD()
    if strict is not None:
        h.set_strict_mode(strict)
    h.set_export_name("disk")
    h.connect_unix(d.unix_path)
    return h


def segments_of(off, ln):
    return set(range(off // SEGMENT, (off + ln - 1) // SEGMENT + 1))


def test_workload(checks, rng):
    port = free_tcp_port()
    args = ["--metrics-listen", f"127.0.0.1:{port}", "--segment-size", str(SEGMENT)]
    with Daemon(size=SIZE, extra_args=args, name="shadowd-metrics", checks=checks) as d:
        _test_workload(checks, rng, d, port)


def _test_workload(checks, rng, d, port):
    want_segments = -(-SIZE // SEGMENT)

    with checks.check("scrape before any I/O: valid page, names, zeroes, segments"):
        fams, text = scrape(port)
        log(f"   {len(text)} bytes, {len(fams)} families")
        check_names(fams)
        expect_eq(requests(fams), {op: 0 for op in OPS}, "requests before I/O")
        expect_eq(requests(fams, "shadowd_request_bytes_total"), {op: 0 for op in OPS},
                  "bytes before I/O")
        check_histogram(fams, 0)
        expect_eq(gauge(fams, "shadowd_connections_active"), 0, "connections_active")
        expect_eq(fams["shadowd_connections_total"].sample(), 0, "connections_total")
        expect_eq(gauge(fams, "shadowd_export_size_bytes"), SIZE, "export_size_bytes")
        expect_eq(gauge(fams, "shadowd_segments"), want_segments,
                  f"segments == ceil({SIZE}/{SEGMENT})")
        expect_eq(gauge(fams, "shadowd_segments_active"), 0, "segments_active")
        expect(gauge(fams, "shadowd_uptime_seconds") >= 0, "uptime")
        for name in ("shadowd_monitor_memory_bytes", "shadowd_history_records"):
            expect(gauge(fams, name) >= 0, name)

    # Two connections, AIO on both, all submitted before any is awaited.
    want = {op: 0 for op in OPS}
    want_bytes = {op: 0 for op in OPS}
    want_errors = {op: 0 for op in OPS}
    touched = set()
    with checks.check("known workload on two concurrent connections: exact counters"):
        h1, h2 = connect(d), connect(d, strict=0)
        fams, _ = scrape(port)
        expect_eq(gauge(fams, "shadowd_connections_active"), 2, "connections_active, 2 open")
        expect_eq(fams["shadowd_connections_total"].sample(), 2, "connections_total")

        bufs = []
        for i in range(120):
            h = h1 if i % 2 else h2
            ln = rng.choice([512, 4 * KiB, 8 * KiB, 64 * KiB, 100 * KiB, 256 * KiB + 512])
            off = rng.randrange(0, SIZE - ln + 1)
            if rng.random() < 0.45:
                data = rng.randbytes(ln)
                buf = nbd.Buffer.from_bytearray(bytearray(data))
                h.aio_pwrite(buf, off)
                want["write"] += 1
                want_bytes["write"] += ln
            else:
                buf = nbd.Buffer(ln)
                h.aio_pread(buf, off)
                want["read"] += 1
                want_bytes["read"] += ln
            bufs.append(buf)
            touched |= segments_of(off, ln)
            if i % 40 == 39:
                h.aio_flush()
                want["flush"] += 1
        for h in (h1, h2):
            while h.aio_in_flight() > 0:
                h.poll(-1)
        # One read the server must refuse: counted, as an error, with no bytes.
        try:
            h2.pread(4096, SIZE)
            raise AssertionError("read at the end succeeded")
        except nbd.Error as e:
            expect_eq(e.errnum, errno.EINVAL, "read past the end errno")
        want["read"] += 1
        want_errors["read"] += 1
        log(f"   sent {want['read']} reads ({want_bytes['read']} B), {want['write']} writes "
            f"({want_bytes['write']} B), {want['flush']} flushes; {len(touched)} segments")

        fams, _ = scrape(port)
        check_names(fams)
        expect_eq(requests(fams), want, "shadowd_requests_total")
        expect_eq(requests(fams, "shadowd_request_bytes_total"), want_bytes,
                  "shadowd_request_bytes_total")
        expect_eq(requests(fams, "shadowd_request_errors_total"), want_errors,
                  "shadowd_request_errors_total")
        check_histogram(fams, sum(want.values()))
        expect_eq(gauge(fams, "shadowd_connections_active"), 2, "connections_active")
        expect_eq(gauge(fams, "shadowd_segments"), want_segments, "segments")
        expect_eq(gauge(fams, "shadowd_segments_active"), len(touched), "segments_active")
        mem = gauge(fams, "shadowd_monitor_memory_bytes")
        expect(mem > 0, "monitor memory after I/O")
        # 32 B of state per segment at most, page-rounded, plus small bookkeeping.
        expect(mem <= 32 * want_segments + 64 * KiB, f"monitor memory {mem} B")
        log(f"   monitor memory {mem:.0f} B for {want_segments} segments")
        h1.shutdown()
        h2.shutdown()

    with checks.check("scrapes do not count as I/O; a third connection is counted"):
        h3 = connect(d)
        h3.pread(4096, 0)
        fams, _ = scrape(port)
        want["read"] += 1
        want_bytes["read"] += 4096
        expect_eq(requests(fams), want, "requests after a third connection's read")
        expect_eq(requests(fams, "shadowd_request_bytes_total"), want_bytes, "bytes")
        expect_eq(fams["shadowd_connections_total"].sample(), 3, "connections_total")
        active = gauge(fams, "shadowd_connections_active")
        expect(1 <= active <= 3, f"connections_active {active} with one surely open")
        h3.shutdown()

    with checks.check("only the asked address is bound; other paths are 404"):
        with socket.socket() as s:
            s.settimeout(10)
            rc = s.connect_ex(("127.0.0.2", port))
            expect(rc != 0, "metrics port answers on 127.0.0.2: bound beyond 127.0.0.1")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=30)
            raise AssertionError("GET /other succeeded")
        except urllib.error.HTTPError as e:
            expect_eq(e.code, 404, "GET /other status")
        d.assert_alive()


def test_no_monitor(checks):
    port = free_tcp_port()
    with checks.check("--no-monitor: request metrics present, monitor metrics absent"):
        with Daemon(size=8 * MiB, name="shadowd-nomon", checks=checks,
                    extra_args=["--no-monitor", "--metrics-listen", f"127.0.0.1:{port}"]) as d:
            h = connect(d)
            h.pwrite(b"m" * 8192, 4096)
            fams, _ = scrape(port)
            check_names(fams, at_least=6)
            got = requests(fams)
            expect_eq((got["write"], got["read"]), (1, 0), "requests")
            expect_eq(requests(fams, "shadowd_request_bytes_total")["write"], 8192, "bytes")
            check_histogram(fams, 1)
            for name in ("shadowd_segments", "shadowd_segments_active",
                         "shadowd_monitor_memory_bytes", "shadowd_history_records"):
                expect(name not in fams, f"{name} present without a monitor")
            h.shutdown()


def test_port_in_use(checks):
    with checks.check("metrics port in use: start-up fails without READY=1"):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            try:
                with Daemon(size=8 * MiB, name="shadowd-busy", check_exit=False,
                            extra_args=["--metrics-listen", f"127.0.0.1:{port}"]) as d:
                    d.stop()
                    raise AssertionError("shadowd started although the metrics port is taken")
            except DaemonError as e:
                log(f"   refused as expected: {e}")


def test():
    checks = Checks("metrics")
    rng = make_rng("metrics")
    test_workload(checks, rng)
    test_no_monitor(checks)
    test_port_in_use(checks)
    checks.finish()


if __name__ == "__main__":
    main(test)
