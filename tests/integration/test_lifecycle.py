#!/usr/bin/python3
"""shadowd process lifecycle and configurable limits.

* sd_notify READY=1 on start, STOPPING=1 on SIGTERM, exit code 0 on
  SIGTERM and on SIGINT, --pidfile written by the time READY=1 is sent;
* a start-up error (missing backing file) exits non-zero without READY=1;
* SIGTERM with requests in flight: every write the client saw acknowledged
  is in the backing file afterwards, and the daemon exits 0;
* --export-name NAME, --max-payload-bytes, --max-connections,
  --max-inflight-per-connection, --direct-io on|off|auto with several
  --io-threads counts, --config JSON overridden by the command line, and
  exit code 2 on bad usage.

Synchronisation: sd_notify datagrams and process exit; a raw-socket client
waits for EOF to know the server closed a connection.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd  # noqa: E402
import nbdproto as P  # noqa: E402
from harness import (MiB, Checks, Daemon, DaemonError, expect,  # noqa: E402
                     expect_clean_refusal, expect_eq, log, main, make_rng, run,
                     sha256_file, shadowd_path)

SIZE = 64 * MiB


def connect(d, name="disk", strict=None):
    h = nbd.NBD()
    if strict is not None:
        h.set_strict_mode(strict)
    h.set_export_name(name)
    h.connect_unix(d.unix_path)
    return h


def test_signals(checks, rng):
    for sig in (signal.SIGTERM, signal.SIGINT):
        with checks.check(f"READY=1, --pidfile, STOPPING=1 and exit 0 on {sig.name}"):
            with Daemon(size=SIZE, name=f"shadowd-{sig.name}", checks=checks,
                        pidfile=True) as d:
                expect(any("READY=1" in m.split("\n") for m in d.notify_messages),
                       "no READY=1 datagram")
                log(f"   notify messages: {d.notify_messages}")
                with open(d.pidfile) as f:
                    expect_eq(int(f.read().strip()), d.proc.pid, "pid in --pidfile")
                h = connect(d)
                h.pwrite(rng.randbytes(4096), 0)
                h.shutdown()
                rc = d.stop(sig)
                expect_eq(rc, 0, f"exit code after {sig.name}")
                expect(any("STOPPING=1" in m.split("\n") for m in d.notify_messages),
                       f"no STOPPING=1 datagram (got {d.notify_messages})")


def test_startup_error(checks):
    with checks.check("missing backing file: non-zero exit, no READY=1"):
        try:
            with Daemon(backing="/nonexistent/shadowd-test/backing.img", name="shadowd-bad"):
                raise AssertionError("shadowd became ready on a missing backing file")
        except DaemonError as e:
            expect("before READY=1" in str(e), f"unexpected failure: {e}")
            log(f"   {e}")


def test_sigterm_in_flight(checks, rng):
    with checks.check("SIGTERM with writes in flight: acknowledged writes are durable, exit 0"):
        with Daemon(size=SIZE, name="shadowd-inflight", checks=checks) as d:
            h = connect(d)
            writes = []
            acked_idx = []

            def mk(i):
                def cb(err):
                    if err.value == 0:
                        acked_idx.append(i)
                    return 1
                return cb
            for i in range(48):
                data = rng.randbytes(MiB)
                buf = nbd.Buffer.from_bytearray(data)
                writes.append((i * MiB, data, buf))
                h.aio_pwrite(buf, i * MiB, completion=mk(i))
            # Let some complete, then signal while the rest are in flight.
            while len(acked_idx) < 8 and h.aio_in_flight() > 0:
                h.poll(-1)
            d.proc.send_signal(signal.SIGTERM)
            try:
                while h.aio_in_flight() > 0:
                    h.poll(-1)
            except nbd.Error as e:
                log(f"   connection ended: {e}")
            acked = [(writes[i][0], writes[i][1]) for i in acked_idx]
            failed = [w[0] for i, w in enumerate(writes) if i not in acked_idx]
            log(f"   {len(acked)} writes acknowledged, {len(failed)} failed or unanswered")
            rc = d.stop()
            expect_eq(rc, 0, "exit code after SIGTERM with requests in flight")
            with open(d.backing, "rb") as f:
                for off, data in acked:
                    f.seek(off)
                    expect(f.read(len(data)) == data,
                           f"acknowledged write at {off} is not in the backing file")


def test_export_name(checks):
    with checks.check("--export-name: listed, selected by name and by ''; 'disk' unknown"):
        with Daemon(size=SIZE, export_name="vol0", name="shadowd-vol0", checks=checks) as d:
            _, out = run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={d.unix_path}"])
            expect_eq([e["export-name"] for e in json.loads(out)["exports"]], ["vol0"],
                      "listed exports")
            h = connect(d, "vol0")
            expect_eq(h.get_size(), SIZE, "size")
            h.shutdown()
            h = connect(d, "")
            expect_eq(h.get_size(), SIZE, "size via ''")
            h.shutdown()
            try:
                connect(d, "disk")
                raise AssertionError("connected to export 'disk' on a daemon exporting 'vol0'")
            except nbd.Error as e:
                log(f"   'disk' refused: {e}")


def test_max_payload(checks, rng):
    with checks.check("--max-payload-bytes 1 MiB: advertised, enforced"):
        with Daemon(size=SIZE, name="shadowd-payload", checks=checks,
                    extra_args=["--max-payload-bytes", str(MiB)]) as d:
            _, out = run(["nbdinfo", "--json", d.uri_unix])
            expect_eq(json.loads(out)["exports"][0].get("block_size_maximum"), MiB,
                      "block_size_maximum")
            h = connect(d, strict=0)
            data = rng.randbytes(MiB)
            h.pwrite(data, 0)
            expect(h.pread(MiB, 0) == data, "1 MiB round trip")
            sha = sha256_file(d.backing)
            try:
                h.pwrite(rng.randbytes(MiB + 4096), 4 * MiB)
                raise AssertionError("write above --max-payload-bytes succeeded")
            except nbd.Error as e:
                expect_clean_refusal(e, "write above --max-payload-bytes")
            d.assert_alive()
            expect_eq(sha256_file(d.backing), sha, "backing sha256 after oversized write")
            h2 = connect(d)
            expect(h2.pread(MiB, 0) == data, "new connection after oversized write")
            h2.shutdown()


def raw_go(d):
    c = P.Client.unix(d.unix_path)
    c.handshake()
    final, _, _ = c.opt_go("disk", ())
    expect_eq(final, P.REP_ACK, "GO")
    return c


def test_max_connections(checks):
    with checks.check("--max-connections 4: the 5th connection is closed cleanly"):
        with Daemon(size=SIZE, name="shadowd-maxconn", checks=checks,
                    extra_args=["--max-connections", "4"]) as d:
            conns = [raw_go(d) for _ in range(4)]
            for c in conns:
                err, _ = c.read_cmd(0, 512, handle=1)
                expect_eq(err, 0, "READ on an admitted connection")
            extra = P.Client.unix(d.unix_path)
            try:
                extra.handshake()
                final, _, _ = extra.opt_go("disk", ())
                # A server may also refuse at GO with an error reply.
                expect(final != P.REP_ACK, "a 5th connection entered transmission")
                log(f"   5th connection refused at GO: {P.REP_NAMES.get(final, final)}")
            except P.Closed as e:
                log(f"   5th connection closed: {e}")
            except (ConnectionResetError, BrokenPipeError) as e:
                log(f"   5th connection reset: {e}")
            finally:
                extra.close()
            # Admitted connections are unaffected.
            for c in conns:
                err, _ = c.read_cmd(512, 512, handle=2)
                expect_eq(err, 0, "READ after the refused connection")
            for c in conns:
                c.disconnect()
                c.close()

    with checks.check("--max-connections 1: the slot is free once a disconnected client "
                      "has seen the server's EOF"):
        with Daemon(size=SIZE, name="shadowd-maxconn1", checks=checks,
                    extra_args=["--max-connections", "1"]) as d:
            for i in range(5):
                # NBD_CMD_DISC, then wait for EOF: the server has closed the
                # connection, so a reconnecting client must be admitted.
                c = raw_go(d)
                err, _ = c.read_cmd(0, 512, handle=i)
                expect_eq(err, 0, f"READ on connection {i}")
                c.disconnect()
                c.close()


def test_max_inflight(checks, rng):
    with checks.check("--max-inflight-per-connection 4: 64 in flight still all succeed"):
        with Daemon(size=SIZE, name="shadowd-inflight-limit", checks=checks,
                    extra_args=["--max-inflight-per-connection", "4"]) as d:
            h = connect(d)
            model = bytearray(SIZE)
            cookies = []
            for i in range(64):
                off = i * 512 * 1024
                data = rng.randbytes(65536)
                model[off:off + 65536] = data
                cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(data), off))
            while h.aio_in_flight() > 0:
                h.poll(-1)
            for c in cookies:
                expect(h.aio_command_completed(c), "write not completed")
            bufs = []
            for i in range(64):
                b = nbd.Buffer(65536)
                bufs.append((i * 512 * 1024, b, h.aio_pread(b, i * 512 * 1024)))
            while h.aio_in_flight() > 0:
                h.poll(-1)
            for off, b, c in bufs:
                expect(h.aio_command_completed(c), "read not completed")
                expect(bytes(b.to_bytearray()) == bytes(model[off:off + 65536]),
                       f"read at {off} mismatch")
            h.shutdown()


def test_io_modes(checks, rng):
    """The same data-path checks under each --direct-io mode and io-thread count."""
    for dio, threads in (("on", 1), ("off", 1), ("auto", 3), ("on", 4)):
        with checks.check(f"--direct-io {dio} --io-threads {threads}: unaligned I/O, "
                          "zero, trim, FUA; backing equals the model"):
            with Daemon(size=SIZE, name=f"shadowd-dio-{dio}-{threads}", checks=checks,
                        extra_args=["--direct-io", dio, "--io-threads", str(threads)]) as d:
                model = bytearray(SIZE)
                hs = [connect(d) for _ in range(3)]
                for i in range(60):
                    h = hs[i % 3]
                    ln = rng.choice([1, 100, 511, 512, 4095, 4096, 4097, 65536 + 7, MiB + 3])
                    off = rng.randrange(0, SIZE - ln)
                    op = rng.random()
                    if op < 0.7:
                        data = rng.randbytes(ln)
                        h.pwrite(data, off, nbd.CMD_FLAG_FUA if i % 5 == 0 else 0)
                        model[off:off + ln] = data
                    elif op < 0.85:
                        h.zero(ln, off, nbd.CMD_FLAG_NO_HOLE if i % 2 else 0)
                        model[off:off + ln] = bytes(ln)
                    else:
                        # Trim, then overwrite: contents after trim are unspecified.
                        h.trim(ln, off)
                        data = rng.randbytes(ln)
                        h.pwrite(data, off)
                        model[off:off + ln] = data
                    lo = max(0, off - 4096)
                    hi = min(SIZE, off + ln + 4096)
                    got = hs[(i + 1) % 3].pread(hi - lo, lo)  # another connection
                    expect(got == bytes(model[lo:hi]), f"op {i} at {off}+{ln}: read-back mismatch")
                hs[0].flush()
                for h in hs:
                    h.shutdown()
                with open(d.backing, "rb") as f:
                    expect(f.read() == bytes(model), "backing file differs from the model")


def test_config_file(checks):
    with checks.check("--config JSON: keys apply, command-line options override them"):
        with tempfile.TemporaryDirectory(prefix="shadowd-cfg-") as tmp:
            cfg = os.path.join(tmp, "shadowd.json")
            with open(cfg, "w") as f:
                json.dump({"export_name": "fromconfig", "description": "described by config",
                           "max_payload_bytes": 2 * MiB, "read_only": True,
                           "log_level": "debug"}, f)
            with Daemon(size=SIZE, name="shadowd-config", checks=checks,
                        extra_args=["--config", cfg]) as d:
                _, out = run(["nbdinfo", "--json",
                              f"nbd+unix:///fromconfig?socket={d.unix_path}"])
                e = json.loads(out)["exports"][0]
                expect_eq(e.get("export-name"), "fromconfig", "export name from config")
                expect_eq(e.get("description"), "described by config", "description")
                expect_eq(e.get("block_size_maximum"), 2 * MiB, "max payload from config")
                expect_eq(e.get("is_read_only"), True, "read_only from config")
            with Daemon(size=SIZE, name="shadowd-config-override", checks=checks,
                        export_name="fromcli", description="described by cli",
                        extra_args=["--config", cfg, "--max-payload-bytes", str(MiB)]) as d:
                _, out = run(["nbdinfo", "--json", d.uri_unix])
                e = json.loads(out)["exports"][0]
                expect_eq(e.get("export-name"), "fromcli", "export name from the command line")
                expect_eq(e.get("description"), "described by cli", "description override")
                expect_eq(e.get("block_size_maximum"), MiB, "max payload override")

    with checks.check("bad usage: unknown option exits 2 without READY=1"):
        p = subprocess.run([shadowd_path(), "--no-such-option", "--backing", "/dev/null"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        expect_eq(p.returncode, 2, "exit code for an unknown option")


def test():
    checks = Checks("lifecycle")
    rng = make_rng("lifecycle")
    test_signals(checks, rng)
    test_startup_error(checks)
    test_sigterm_in_flight(checks, rng)
    test_export_name(checks)
    test_max_payload(checks, rng)
    test_max_connections(checks)
    test_max_inflight(checks, rng)
    test_io_modes(checks, rng)
    test_config_file(checks)
    checks.finish()


if __name__ == "__main__":
    main(test)
