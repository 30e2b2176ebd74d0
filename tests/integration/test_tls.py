#!/usr/bin/python3
"""NBD over TLS (NBD_OPT_STARTTLS) with real clients.

Certificates and a PSK come from scripts/tls-certs.sh (certtool, psktool).
One daemon runs with --tls require, x509 and PSK credentials: nbdinfo,
libnbd, nbdcopy, qemu-img and fio reach it over x509 and over PSK and move
data that is compared byte for byte; a plain client gets
NBD_REP_ERR_TLS_REQD for every option and no export name or size; clients
with the wrong CA, a certificate from another CA (--tls-verify-peer), the
wrong key or an unknown PSK user are refused and counted. Then --tls on
(plain and TLS clients both served), --tls off (STARTTLS refused with
NBD_REP_ERR_POLICY), and every bad TLS setting refused at start with a
message that names it.

Synchronisation: sd_notify READY=1; every client runs to completion.
"""

import json
import os
import shutil
import socket
import struct
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd  # noqa: E402

import nbdproto as P  # noqa: E402
from harness import (MiB, Checks, Daemon, ShadowCtl, expect, expect_eq, main,  # noqa: E402
                     make_pool_file, make_rng, random_bytes, run, run_shadowd, scrape,
                     sha256_file, write_random_file)

SIZE = 64 * MiB
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
USER = "alice"
NOBODY = 65534


def make_certs(path, user=USER):
    run([os.path.join(REPO, "scripts", "tls-certs.sh"), path, user])
    return path


def x509_uri(d, certs, tcp=False, client_dir=None):
    cdir = client_dir or os.path.join(certs, "client")
    if tcp:
        return f"nbds://localhost:{d.port}/{d.export}?tls-certificates={cdir}"
    return f"nbds+unix:///{d.export}?socket={d.unix_path}&tls-certificates={cdir}"


def psk_uri(d, certs, user=USER, psk_file=None):
    f = psk_file or os.path.join(certs, "psk", "keys.psk")
    return f"nbds+unix://{user}@/{d.export}?socket={d.unix_path}&tls-psk-file={f}"


def connect(uri):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)  # tls-certificates, tls-psk-file
    h.connect_uri(uri)
    return h


def expect_refused(uri, what):
    """libnbd must fail to connect (an error, not a hang)."""
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    try:
        h.connect_uri(uri)
    except nbd.Error as e:
        return str(e)
    finally:
        del h
    raise AssertionError(f"{what}: the connection was accepted")


def tls_status(d):
    return ShadowCtl(d).json("status")["tls"]


def qemu_tls_object(certs, kind):
    if kind == "x509":
        return f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}/client"
    return f"tls-creds-psk,id=tls0,endpoint=client,dir={certs}/psk,username={USER}"


def qemu_image_opts(d, kind):
    # Over a Unix socket qemu has no host name to check the certificate
    # against: the certificate names localhost.
    host = ",tls-hostname=localhost" if kind == "x509" else ""
    return f"driver=nbd,path={d.unix_path},export={d.export},tls-creds=tls0{host}"


def fio_over_tls(work, d, certs):
    """fio's nbd engine passes its uri to libnbd, which refuses local file
    parameters (tls-certificates) in URIs it did not allow: fio finds the
    client certificates in libnbd's default place instead, $HOME/.pki/libnbd
    of a user that is not root (for root it is /etc/pki/libnbd, the
    machine's own)."""
    home = os.path.join(work, "fio-home")
    pki = os.path.join(home, ".pki", "libnbd")
    os.makedirs(pki)
    for f in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        shutil.copy(os.path.join(certs, "client", f), pki)
    for dirpath, _, files in os.walk(home):
        os.chown(dirpath, NOBODY, NOBODY)
        for f in files:
            os.chown(os.path.join(dirpath, f), NOBODY, NOBODY)
    os.chmod(work, 0o755)
    outj = os.path.join(home, "fio.json")
    rc, _ = run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 "env", f"HOME={home}",
                 "fio", "--name=tlsverify", "--ioengine=nbd",
                 f"--uri=nbds://localhost:{d.port}/{d.export}",
                 "--rw=randwrite", "--bsrange=4k-256k", "--iodepth=16", "--size=32m",
                 "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                 "--verify_state_save=0", "--output-format=json", f"--output={outj}"],
                check=False, cwd=home)
    with open(outj) as f:
        text = f.read()
    expect_eq(rc, 0, "fio exit code")
    job = json.loads(text[text.index("{"):])["jobs"][0]
    expect_eq(job["error"], 0, "fio job error")
    expect(job["write"]["io_bytes"] > 0, "fio wrote")
    expect_eq(job["read"]["io_bytes"], job["write"]["io_bytes"], "fio verified every byte")
    return job


def raw_plain_client(d):
    c = P.Client.unix(d.unix_path)
    c.handshake()
    return c


def test_require(checks, work):
    certs = make_certs(os.path.join(work, "pki"))
    other = make_certs(os.path.join(work, "other-pki"))
    rng = make_rng("tls")
    pool = os.path.join(work, "pool.img")
    make_pool_file(pool, 256 * MiB)
    with Daemon(size=SIZE, checks=checks, pool=pool, pool_init=True, metrics=True,
                extra_args=["--tls", "require", "--tls-certificates", f"{certs}/server",
                            "--tls-psk", f"{certs}/psk/keys.psk", "--tls-verify-peer"]) as d:
        with checks.check("status and config show TLS require with x509 (client certificates) + psk"):
            t = tls_status(d)
            expect_eq(t["mode"], "require", "status tls.mode")
            expect("x509" in t["credentials"] and "psk" in t["credentials"], f"credentials {t}")
            expect("client certificates required" in t["credentials"], f"credentials {t}")
            cfg = ShadowCtl(d).json("config", "get")
            expect_eq(cfg["config"]["tls"] if "config" in cfg else cfg["tls"], "require", "config tls")

        with checks.check("nbdinfo over x509 (unix and tcp with host name check) and over psk"):
            for uri in (x509_uri(d, certs), x509_uri(d, certs, tcp=True), psk_uri(d, certs)):
                rc, out = run(["nbdinfo", "--json", uri], check=False)
                expect_eq(rc, 0, f"nbdinfo {uri}")
                j = json.loads(out[out.index("{"):])
                expect_eq(j["TLS"], True, "nbdinfo TLS")
                expect_eq(j["exports"][0]["export-size"], SIZE, "export size over TLS")

        with checks.check("libnbd over x509: writes of 512 B .. 32 MiB, pipelined, read back and on disk"):
            h = connect(x509_uri(d, certs))
            model = bytearray(SIZE)
            # Sizes around TLS's 16 KiB records and the server's 16 KiB staging.
            for off, n in ((0, 512), (4096, 16384 - 16), (65536, 16384), (131072, 16385),
                           (1 * MiB, 1 * MiB), (4 * MiB, 32 * MiB)):
                buf = random_bytes(rng, n)
                h.pwrite(buf, off)
                model[off:off + n] = buf
            # 64 writes in flight at once, then 64 reads in flight.
            cookies = []
            for i in range(64):
                off = 40 * MiB + i * 65536
                buf = random_bytes(rng, 65536)
                model[off:off + 65536] = buf
                cookies.append(h.aio_pwrite(buf, off))
            expect_eq(h.aio_in_flight(), 64, "writes in flight")
            while h.aio_in_flight() > 0:
                h.poll(-1)
            expect(all(h.aio_command_completed(c) for c in cookies), "every write completed")
            bufs = [(nbd.Buffer(65536), 40 * MiB + i * 65536) for i in range(64)]
            cookies = [h.aio_pread(b, off) for b, off in bufs]
            while h.aio_in_flight() > 0:
                h.poll(-1)
            expect(all(h.aio_command_completed(c) for c in cookies), "every read completed")
            for b, off in bufs:
                expect(b.to_bytearray() == model[off:off + 65536], f"pipelined read at {off}")
            h.flush()
            got = h.pread(SIZE, 0) if SIZE <= 32 * MiB else b"".join(
                h.pread(32 * MiB, o) for o in range(0, SIZE, 32 * MiB))
            expect(got == model, "whole export read back over TLS equals what was written")
            h.shutdown()
            with open(d.backing, "rb") as f:
                expect(f.read() == model, "backing file equals what was written over TLS")

        with checks.check("nbdcopy in and out over x509 and psk: identical checksums"):
            src = os.path.join(work, "src.img")
            write_random_file(src, 16 * MiB, rng)
            for name, uri in (("x509", x509_uri(d, certs)), ("psk", psk_uri(d, certs))):
                run(["nbdcopy", src, uri])
                out = os.path.join(work, f"out-{name}.img")
                run(["nbdcopy", uri, out])
                with open(out, "r+b") as f:
                    f.truncate(16 * MiB)
                expect_eq(sha256_file(out), sha256_file(src), f"nbdcopy round trip over {name}")

        with checks.check("qemu-img compare and info over x509 and psk"):
            with open(d.backing, "rb") as f:
                local = os.path.join(work, "local.img")
                with open(local, "wb") as g:
                    shutil.copyfileobj(f, g)
            for kind in ("x509", "psk"):
                rc, out = run(["qemu-img", "compare", "--object", qemu_tls_object(certs, kind),
                               "--image-opts", qemu_image_opts(d, kind),
                               f"driver=raw,file.filename={local}"], check=False)
                expect_eq(rc, 0, f"qemu-img compare over {kind}: {out.strip()}")
                rc, out = run(["qemu-img", "info", "--output=json", "--object",
                               qemu_tls_object(certs, kind), "--image-opts",
                               qemu_image_opts(d, kind)], check=False)
                expect_eq(rc, 0, f"qemu-img info over {kind}")
                expect_eq(json.loads(out)["virtual-size"], SIZE, f"qemu-img size over {kind}")

        with checks.check("fio --ioengine=nbd over TLS with crc32c verify"):
            fio_over_tls(work, d, certs)

        with checks.check("a plain client gets NBD_REP_ERR_TLS_REQD for every option, and no export"):
            c = raw_plain_client(d)
            seen = b""
            for opt, data in ((P.OPT_LIST, b""), (P.OPT_INFO, P.Client.go_payload("disk")),
                              (P.OPT_GO, P.Client.go_payload("")),
                              (P.OPT_STRUCTURED_REPLY, b""),
                              (P.OPT_LIST_META_CONTEXT, P.Client.meta_payload("disk", [])),
                              (P.OPT_PEEK_EXPORT, b""), (77, b"x")):
                replies = c.option(opt, data)
                expect_eq([r for r, _ in replies], [P.REP_ERR_TLS_REQD], f"option {opt} without TLS")
                seen += b"".join(p for _, p in replies)
            expect(b"disk" not in seen, f"an export name leaked: {seen!r}")
            expect_eq([r for r, _ in c.option(P.OPT_ABORT)], [P.REP_ACK], "ABORT still answered")
            c.close()
            # EXPORT_NAME cannot be refused with an error: the server closes.
            c = raw_plain_client(d)
            c.send_option(P.OPT_EXPORT_NAME, b"disk")
            rest = P.recv_until_eof(c.sock)
            expect_eq(rest, b"", "bytes after EXPORT_NAME without TLS (size, flags must not leak)")
            c.close()
            # libnbd with tls=off cannot get at the export either.
            expect_refused(d.uri_unix, "plain libnbd against --tls require")

        with checks.check("STARTTLS with data is invalid; ACK then garbage ends the connection"):
            before = tls_status(d)["handshake_failures"]
            c = raw_plain_client(d)
            expect_eq([r for r, _ in c.option(P.OPT_STARTTLS, b"junk")], [P.REP_ERR_INVALID],
                      "STARTTLS with data")
            expect_eq([r for r, _ in c.option(P.OPT_STARTTLS)], [P.REP_ACK], "STARTTLS")
            # Not a TLS ClientHello: the handshake fails, the server closes
            # (possibly after an alert record, never in plain NBD).
            c.sock.sendall(struct.pack(">QII", P.IHAVEOPT, P.OPT_LIST, 0))
            rest = P.recv_until_eof(c.sock)
            expect(not rest.startswith(struct.pack(">Q", P.REPLY_MAGIC)),
                   f"the server answered in plain NBD after STARTTLS: {rest[:32]!r}")
            c.close()
            expect_eq(tls_status(d)["handshake_failures"], before + 1, "handshake failures counted")

        with checks.check("the wrong CA, a foreign client certificate, no certificate, a wrong PSK are refused"):
            before = tls_status(d)
            # The client trusts another CA: it refuses the server.
            expect_refused(x509_uri(d, certs, client_dir=f"{other}/client"), "client with the wrong CA")
            # The client trusts our CA but presents a certificate of another
            # CA: --tls-verify-peer refuses it.
            mixed = os.path.join(work, "mixed")
            os.makedirs(mixed)
            shutil.copy(f"{certs}/client/ca-cert.pem", mixed)
            shutil.copy(f"{other}/client/client-cert.pem", mixed)
            shutil.copy(f"{other}/client/client-key.pem", mixed)
            expect_refused(x509_uri(d, certs, client_dir=mixed), "client certificate of another CA")
            nocert = os.path.join(work, "nocert")
            os.makedirs(nocert)
            shutil.copy(f"{certs}/client/ca-cert.pem", nocert)
            expect_refused(x509_uri(d, certs, client_dir=nocert), "no client certificate")
            expect_refused(psk_uri(d, certs, psk_file=f"{other}/psk/keys.psk"), "the wrong PSK")
            # A known key under another name.
            stranger = os.path.join(work, "stranger.psk")
            with open(f"{certs}/psk/keys.psk") as f, open(stranger, "w") as g:
                g.write("mallory:" + f.read().split(":", 1)[1])
            expect_refused(psk_uri(d, certs, user="mallory", psk_file=stranger), "an unknown PSK user")
            after = tls_status(d)
            # The server saw every failure but the first (that client gave up
            # on the server's certificate; the server may or may not see it).
            expect(after["handshake_failures"] >= before["handshake_failures"] + 4,
                   f"handshake failures {before} -> {after}")
            expect_eq(after["handshakes"], before["handshakes"], "no handshake succeeded")
            # And the right client still gets in.
            h = connect(x509_uri(d, certs))
            expect_eq(h.get_size(), SIZE, "size after the refusals")
            h.shutdown()

        with checks.check("metrics count TLS handshakes by result, as status does"):
            m = scrape(f"http://127.0.0.1:{d.metrics_port}/metrics")
            t = tls_status(d)
            expect_eq(m['shadowd_tls_handshakes_total{result="ok"}'], t["handshakes"], "ok")
            expect_eq(m['shadowd_tls_handshakes_total{result="failed"}'], t["handshake_failures"],
                      "failed")
            expect(t["handshakes"] >= 10, f"handshakes {t}")


def test_on_and_off(checks, work):
    certs = os.path.join(work, "pki")
    with Daemon(size=SIZE, checks=checks,
                extra_args=["--tls", "on", "--tls-certificates", f"{certs}/server"]) as d:
        with checks.check("--tls on: a TLS client and a plain client are both served"):
            h = connect(x509_uri(d, certs))
            expect_eq(h.get_size(), SIZE, "TLS client")
            h.pwrite(b"T" * 4096, 0)
            h.shutdown()
            h = connect(d.uri_unix)
            expect_eq(h.pread(4096, 0), b"T" * 4096, "plain client reads the TLS client's write")
            h.shutdown()
            c = raw_plain_client(d)
            expect_eq([r for r, _ in c.option(P.OPT_STARTTLS)], [P.REP_ACK], "STARTTLS offered")
            c.close()
    with Daemon(size=SIZE, checks=checks) as d:
        with checks.check("TLS off: STARTTLS is answered NBD_REP_ERR_POLICY; a TLS-only client fails"):
            c = raw_plain_client(d)
            expect_eq([r for r, _ in c.option(P.OPT_STARTTLS)], [P.REP_ERR_POLICY], "STARTTLS")
            expect_eq([r for r, _ in c.option(P.OPT_LIST)][-1], P.REP_ACK, "LIST still works")
            c.close()
            expect_refused(x509_uri(d, certs), "TLS-only client against a plain server")
            expect_eq(tls_status(d)["mode"], "off", "status tls.mode")


def test_bad_settings(checks, work):
    certs = os.path.join(work, "pki")
    backing = os.path.join(work, "bad.img")
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    half = os.path.join(work, "half")
    os.makedirs(half)
    shutil.copy(f"{certs}/server/server-cert.pem", half)
    badpsk = os.path.join(work, "bad.psk")
    with open(badpsk, "w") as f:
        f.write("alice:not-hex\n")
    swapped = os.path.join(work, "swapped")
    os.makedirs(swapped)
    shutil.copy(f"{certs}/server/server-cert.pem", swapped)
    shutil.copy(f"{certs}/client/client-key.pem", os.path.join(swapped, "server-key.pem"))
    cases = [
        (["--tls", "require"], "needs tls_certificates"),
        (["--tls", "sometimes", "--tls-certificates", f"{certs}/server"], "tls must be off|on|require"),
        (["--tls-certificates", os.path.join(work, "missing")], "missing"),
        (["--tls-certificates", half], "server-key.pem"),
        (["--tls-certificates", swapped], "server-cert.pem"),
        (["--tls-psk", badpsk], "bad.psk:1"),
        (["--tls-verify-peer", "--tls-psk", f"{certs}/psk/keys.psk"], "tls_verify_peer needs"),
    ]
    for args, needle in cases:
        with checks.check(f"refused at start: {' '.join(os.path.basename(a) for a in args)}"):
            sock = os.path.join(work, "bad.sock")
            rc, out = run_shadowd(["--backing", backing, "--unix", sock,
                                   "--control", os.path.join(work, "bad-ctl.sock"), *args])
            expect_eq(rc, 2, "exit code")
            expect(needle in out, f"message names the problem ({needle!r}): {out.strip()}")
            expect(not os.path.exists(sock), "no socket was created")


def test():
    checks = Checks("tls")
    with tempfile.TemporaryDirectory(prefix="shadowd-tls-") as work:
        test_require(checks, work)
        test_on_and_off(checks, work)
        test_bad_settings(checks, work)
    checks.finish()


if __name__ == "__main__":
    main(test)
