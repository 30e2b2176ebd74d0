#!/usr/bin/python3
"""Raw-socket NBD clients (no libnbd) against a live shadowd.

* a client that behaves exactly like the Linux kernel: fixed newstyle,
  NBD_OPT_GO with zero information requests, simple replies, then
  READ/WRITE/FLUSH/TRIM/DISC;
* NBD_OPT_EXPORT_NAME with NO_ZEROES negotiated and not negotiated (124
  zero bytes of padding expected when not);
* NBD_OPT_INFO with each NBD_INFO_* request, unknown options answered with
  NBD_REP_ERR_UNSUP while negotiation continues, NBD_OPT_LIST,
  NBD_OPT_ABORT, LIST/SET_META_CONTEXT for base:allocation, for
  shadowd:source (not offered on the live export) and for an unknown
  namespace, structured replies (OFFSET_DATA/HOLE, BLOCK_STATUS).

Synchronisation: sd_notify READY=1, then blocking socket reads with a
timeout as a failure guard.
"""

import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbdproto as P  # noqa: E402
from harness import (MiB, Checks, Daemon, expect, expect_eq, log, main,  # noqa: E402
                     make_rng)

SIZE = 32 * MiB
MAX_PAYLOAD = 32 * MiB
EXPECTED_TFLAGS = (P.TF_HAS_FLAGS | P.TF_SEND_FLUSH | P.TF_SEND_FUA | P.TF_SEND_TRIM |
                   P.TF_SEND_WRITE_ZEROES | P.TF_SEND_CACHE | P.TF_CAN_MULTI_CONN)


def rep_name(t):
    return P.REP_NAMES.get(t, hex(t))


def expect_rep(got, want, what):
    if got != want:
        raise AssertionError(f"{what}: got {rep_name(got)}, want {rep_name(want)}")


def check_tflags(tflags, read_only=False):
    want = EXPECTED_TFLAGS | (P.TF_READ_ONLY if read_only else 0)
    missing = want & ~tflags
    expect(missing == 0, f"transmission flags {tflags:#x} lack {missing:#x} (want {want:#x})")
    if not read_only:
        expect(tflags & P.TF_READ_ONLY == 0, f"READ_ONLY set on a writable export: {tflags:#x}")
    # DF and FAST_ZERO may only be set consistently with their commands.
    if tflags & P.TF_SEND_FAST_ZERO:
        expect(tflags & P.TF_SEND_WRITE_ZEROES, "SEND_FAST_ZERO without SEND_WRITE_ZEROES")


def kernel_like_session(checks, d, rng, transport):
    """Exactly the kernel's sequence (nbd-client + nbd.ko)."""
    with checks.check(f"kernel-like client over {transport}: GO without info requests, "
                      "simple replies, READ/WRITE/FLUSH/TRIM/DISC"):
        c = P.Client.unix(d.unix_path) if transport == "unix" else P.Client.tcp(d.port)
        with c:
            hs = c.read_greeting()
            expect(hs & P.FLAG_FIXED_NEWSTYLE, f"handshake flags {hs:#x} lack FIXED_NEWSTYLE")
            expect(hs & P.FLAG_NO_ZEROES, f"handshake flags {hs:#x} lack NO_ZEROES")
            c.send_client_flags(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
            final, info, replies = c.opt_go("disk", ())
            expect_rep(final, P.REP_ACK, "GO")
            expect_eq(c.size, SIZE, "size from NBD_INFO_EXPORT")
            check_tflags(c.tflags)
            # The server MAY send unrequested info; it MUST send EXPORT.
            log(f"   GO replies: info types {sorted(info)}")

            # Transmission, simple replies only.
            off = 3 * MiB + 512
            data = rng.randbytes(128 * 1024)
            err = c.simple_cmd(P.CMD_WRITE, off, len(data), payload=data, handle=1)
            expect_eq(err, 0, "WRITE error")
            err, got = c.read_cmd(off, len(data), handle=2)
            expect_eq(err, 0, "READ error")
            expect(got == data, "READ returned different data")
            # Several requests pipelined, replies matched by handle.
            reqs = {}
            for i in range(16):
                o = 5 * MiB + i * 8192
                b = rng.randbytes(4096)
                reqs[100 + i] = (o, b)
                c.send_request(P.CMD_WRITE, 100 + i, o, len(b), payload=b)
            seen = set()
            for _ in range(16):
                err, h, _ = c.read_simple_reply(0)
                expect_eq(err, 0, f"pipelined WRITE {h} error")
                expect(h in reqs and h not in seen, f"unexpected reply handle {h}")
                seen.add(h)
            for i in range(8):
                o, _ = reqs[100 + i]
                c.send_request(P.CMD_READ, 200 + i, o, 4096)
            for _ in range(8):
                err, h, payload = c.read_simple_reply(4096)
                expect_eq(err, 0, "pipelined READ error")
                expect(payload == reqs[h - 100][1], f"pipelined READ {h} data mismatch")
            err = c.simple_cmd(P.CMD_WRITE, off, 4096, flags=P.CMD_FLAG_FUA,
                               payload=data[:4096], handle=3)
            expect_eq(err, 0, "WRITE+FUA error")
            err = c.simple_cmd(P.CMD_FLUSH, handle=4)
            expect_eq(err, 0, "FLUSH error")
            expect(d.read_backing(off, len(data)) == data, "backing file after FLUSH")
            err = c.simple_cmd(P.CMD_TRIM, 8 * MiB, MiB, handle=5)
            expect_eq(err, 0, "TRIM error")
            # Error reply: read past the end, simple reply carries no payload.
            err, h, payload = None, None, None
            c.send_request(P.CMD_READ, 6, SIZE - 100, 4096)
            err, h, payload = c.read_simple_reply(4096)
            expect_eq((err, h, payload), (P.EINVAL, 6, b""), "READ past end simple reply")
            # Still works.
            err, got = c.read_cmd(off, 4096, handle=7)
            expect((err, got) == (0, data[:4096]), "READ after error")
            c.disconnect()


def export_name_sessions(checks, d, rng):
    for no_zeroes in (True, False):
        label = "NO_ZEROES negotiated" if no_zeroes else "NO_ZEROES not negotiated"
        with checks.check(f"NBD_OPT_EXPORT_NAME, {label}"):
            with P.Client.unix(d.unix_path) as c:
                c.handshake(fixed=True, no_zeroes=no_zeroes)
                size, tflags, pad = c.opt_export_name("disk")
                expect_eq(size, SIZE, "size")
                check_tflags(tflags)
                if no_zeroes:
                    expect_eq(pad, b"", "padding")
                else:
                    expect_eq(pad, bytes(124), "124 bytes of zero padding")
                # The very next bytes must be a reply to our first request.
                data = rng.randbytes(1000)
                expect_eq(c.simple_cmd(P.CMD_WRITE, 4096, 1000, payload=data, handle=9), 0,
                          "WRITE after EXPORT_NAME")
                err, got = c.read_cmd(4096, 1000, handle=10)
                expect((err, got) == (0, data), "READ after EXPORT_NAME")
                c.disconnect()

    with checks.check("NBD_OPT_EXPORT_NAME without FIXED_NEWSTYLE (plain newstyle client)"):
        with P.Client.unix(d.unix_path) as c:
            c.read_greeting()
            c.send_client_flags(0)
            size, tflags, pad = c.opt_export_name("disk")
            expect_eq((size, pad), (SIZE, bytes(124)), "size and padding")
            err, _ = c.read_cmd(0, 512, handle=1)
            expect_eq(err, 0, "READ")
            c.disconnect()

    with checks.check("NBD_OPT_EXPORT_NAME with the empty (default) name"):
        with P.Client.unix(d.unix_path) as c:
            c.handshake()
            size, _, _ = c.opt_export_name("")
            expect_eq(size, SIZE, "size")
            c.disconnect()

    with checks.check("NBD_OPT_EXPORT_NAME with an unknown name: server closes"):
        with P.Client.unix(d.unix_path) as c:
            c.handshake()
            c.send_option(P.OPT_EXPORT_NAME, b"no-such-export")
            rest = P.recv_until_eof(c.sock)
            expect_eq(rest, b"", "bytes sent for an unknown EXPORT_NAME")


def info_sessions(checks, d):
    with checks.check("NBD_OPT_INFO with each NBD_INFO_* request, then GO on the same connection"):
        with P.Client.unix(d.unix_path) as c:
            c.handshake()
            # No requests: EXPORT is mandatory.
            final, info, _ = c.opt_info("disk", ())
            expect_rep(final, P.REP_ACK, "INFO without requests")
            size, tflags = P.parse_info_export(info[P.INFO_EXPORT])
            expect_eq(size, SIZE, "INFO_EXPORT size")
            check_tflags(tflags)
            # Each type alone.
            final, info, _ = c.opt_info("disk", (P.INFO_NAME,))
            expect_rep(final, P.REP_ACK, "INFO(NAME)")
            expect(P.INFO_EXPORT in info, "INFO_EXPORT missing")
            expect_eq(info.get(P.INFO_NAME), b"disk", "INFO_NAME")
            final, info, _ = c.opt_info("disk", (P.INFO_DESCRIPTION,))
            expect_rep(final, P.REP_ACK, "INFO(DESCRIPTION)")
            expect_eq(info.get(P.INFO_DESCRIPTION), b"raw protocol export", "INFO_DESCRIPTION")
            final, info, _ = c.opt_info("disk", (P.INFO_BLOCK_SIZE,))
            expect_rep(final, P.REP_ACK, "INFO(BLOCK_SIZE)")
            expect(P.INFO_BLOCK_SIZE in info, "INFO_BLOCK_SIZE missing")
            expect_eq(P.parse_block_size(info[P.INFO_BLOCK_SIZE]), (1, 4096, MAX_PAYLOAD),
                      "block sizes")
            final, info, _ = c.opt_info("disk", (P.INFO_EXPORT,))
            expect_rep(final, P.REP_ACK, "INFO(EXPORT)")
            expect_eq(P.parse_info_export(info[P.INFO_EXPORT])[0], SIZE, "INFO_EXPORT size")
            # All at once, plus an unknown info type the server must ignore.
            final, info, _ = c.opt_info("disk", (P.INFO_NAME, P.INFO_DESCRIPTION,
                                                 P.INFO_BLOCK_SIZE, 0x7777))
            expect_rep(final, P.REP_ACK, "INFO(all + unknown)")
            for t in (P.INFO_EXPORT, P.INFO_NAME, P.INFO_DESCRIPTION, P.INFO_BLOCK_SIZE):
                expect(t in info, f"NBD_INFO type {t} missing from combined INFO")
            expect(0x7777 not in info, "server answered an unknown info type")
            # Empty name = default export.
            final, info, _ = c.opt_info("", (P.INFO_NAME,))
            expect_rep(final, P.REP_ACK, "INFO('')")
            expect_eq(P.parse_info_export(info[P.INFO_EXPORT])[0], SIZE, "INFO('') size")
            # Unknown export.
            final, info, replies = c.opt_info("nope", ())
            expect_rep(final, P.REP_ERR_UNKNOWN, "INFO(unknown export)")
            # Malformed: name length beyond the option data.
            replies = c.option(P.OPT_INFO, struct.pack(">I", 100) + b"disk" + b"\0\0")
            expect_rep(replies[-1][0], P.REP_ERR_INVALID, "INFO with bad name length")
            # Malformed: info count beyond the option data.
            replies = c.option(P.OPT_INFO, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 3))
            expect_rep(replies[-1][0], P.REP_ERR_INVALID, "INFO with bad request count")
            # Negotiation continues and GO with BLOCK_SIZE works.
            final, info, _ = c.opt_go("disk", (P.INFO_BLOCK_SIZE,))
            expect_rep(final, P.REP_ACK, "GO after INFO")
            err, _ = c.read_cmd(0, 4096, handle=1)
            expect_eq(err, 0, "READ after GO")
            c.disconnect()

    with checks.check("GO on an unknown export: ERR_UNKNOWN, then negotiation continues"):
        with P.Client.unix(d.unix_path) as c:
            c.handshake()
            final, _, _ = c.opt_go("does-not-exist", ())
            expect_rep(final, P.REP_ERR_UNKNOWN, "GO(unknown)")
            final, _, _ = c.opt_go("disk", ())
            expect_rep(final, P.REP_ACK, "GO(disk)")
            c.disconnect()


def option_sessions(checks, d):
    with checks.check("unknown options -> ERR_UNSUP and negotiation continues"):
        with P.Client.unix(d.unix_path) as c:
            c.handshake()
            for opt, data in ((0x1234, b""), (0x7FFFFFFF, b"some payload"),
                              (P.OPT_PEEK_EXPORT, b""), (11, b""), (0, b"")):
                replies = c.option(opt, data)
                expect_eq(len(replies), 1, f"reply count for option {opt:#x}")
                expect_rep(replies[0][0], P.REP_ERR_UNSUP, f"option {opt:#x}")
            # STARTTLS: no TLS configured -> an error reply, not a hang.
            replies = c.option(P.OPT_STARTTLS)
            expect(replies[-1][0] & P.REP_ERR, f"STARTTLS answered {rep_name(replies[-1][0])}")
            final, _, _ = c.opt_go("disk", ())
            expect_rep(final, P.REP_ACK, "GO after unknown options")
            err, _ = c.read_cmd(0, 512, handle=1)
            expect_eq(err, 0, "READ")
            c.disconnect()

    with checks.check("NBD_OPT_LIST"):
        with P.Client.unix(d.unix_path) as c:
            c.handshake()
            replies = c.option(P.OPT_LIST)
            expect_rep(replies[-1][0], P.REP_ACK, "LIST final reply")
            names = []
            for rtype, rdata in replies[:-1]:
                expect_rep(rtype, P.REP_SERVER, "LIST entry")
                nl = struct.unpack(">I", rdata[:4])[0]
                expect(nl <= len(rdata) - 4, "REP_SERVER name length beyond the reply")
                names.append(rdata[4:4 + nl].decode())
            expect_eq(names, ["disk"], "listed exports")
            # LIST with data is invalid.
            replies = c.option(P.OPT_LIST, b"junk")
            expect_rep(replies[-1][0], P.REP_ERR_INVALID, "LIST with data")
            final, _, _ = c.opt_go("disk", ())
            expect_rep(final, P.REP_ACK, "GO after LIST")
            c.disconnect()

    with checks.check("NBD_OPT_ABORT: ACK (or close), then the server closes"):
        with P.Client.unix(d.unix_path) as c:
            c.handshake()
            c.send_option(P.OPT_ABORT)
            rest = P.recv_until_eof(c.sock)
            if rest:
                expect_eq(len(rest), 20, "ABORT reply length")
                magic, opt, rtype, ln = struct.unpack(">QIII", rest)
                expect_eq((magic, opt, rtype, ln), (P.REPLY_MAGIC, P.OPT_ABORT, P.REP_ACK, 0),
                          "ABORT reply")

    with checks.check("STRUCTURED_REPLY: ACK; with data -> ERR_INVALID"):
        with P.Client.unix(d.unix_path) as c:
            c.handshake()
            replies = c.option(P.OPT_STRUCTURED_REPLY, b"x")
            expect_rep(replies[-1][0], P.REP_ERR_INVALID, "STRUCTURED_REPLY with data")
            expect_rep(c.opt_structured_reply(), P.REP_ACK, "STRUCTURED_REPLY")
            final, _, _ = c.opt_go("disk", ())
            expect_rep(final, P.REP_ACK, "GO")
            c.disconnect()


def meta_context_sessions(checks, d, rng):
    with checks.check("LIST_META_CONTEXT / SET_META_CONTEXT"):
        with P.Client.unix(d.unix_path) as c:
            c.handshake()
            # SET before STRUCTURED_REPLY is invalid.
            final, ctxs = c.opt_meta_context(P.OPT_SET_META_CONTEXT, "disk", ["base:allocation"])
            expect_rep(final, P.REP_ERR_INVALID, "SET_META_CONTEXT before STRUCTURED_REPLY")
            expect_rep(c.opt_structured_reply(), P.REP_ACK, "STRUCTURED_REPLY")
            final, ctxs = c.opt_meta_context(P.OPT_LIST_META_CONTEXT, "disk", [])
            expect_rep(final, P.REP_ACK, "LIST_META_CONTEXT (all)")
            expect("base:allocation" in [n for _, n in ctxs], f"LIST(all) gave {ctxs}")
            final, ctxs = c.opt_meta_context(P.OPT_LIST_META_CONTEXT, "disk", ["base:allocation"])
            expect_rep(final, P.REP_ACK, "LIST_META_CONTEXT base:allocation")
            expect_eq([n for _, n in ctxs], ["base:allocation"], "LIST(base:allocation)")
            final, ctxs = c.opt_meta_context(P.OPT_LIST_META_CONTEXT, "disk", ["base:"])
            expect_rep(final, P.REP_ACK, "LIST_META_CONTEXT base:")
            expect_eq([n for _, n in ctxs], ["base:allocation"], "LIST(base:)")
            # shadowd:source is offered on point-in-time exports only: the
            # live export lists and selects nothing for it.
            final, ctxs = c.opt_meta_context(P.OPT_LIST_META_CONTEXT, "disk", [])
            expect("shadowd:source" not in [n for _, n in ctxs], f"LIST(all) gave {ctxs}")
            for queries in (["shadowd:"], ["shadowd:source"]):
                final, ctxs = c.opt_meta_context(P.OPT_LIST_META_CONTEXT, "disk", queries)
                expect_rep(final, P.REP_ACK, f"LIST_META_CONTEXT {queries}")
                expect_eq(ctxs, [], f"contexts listed for {queries} on the live export")
            final, ctxs = c.opt_meta_context(P.OPT_SET_META_CONTEXT, "disk", ["shadowd:source"])
            expect_rep(final, P.REP_ACK, "SET_META_CONTEXT shadowd:source")
            expect_eq(ctxs, [], "contexts selected for shadowd:source on the live export")
            final, ctxs = c.opt_meta_context(P.OPT_LIST_META_CONTEXT, "disk",
                                             ["x-unknown:thing"])
            expect_rep(final, P.REP_ACK, "LIST_META_CONTEXT unknown namespace")
            expect_eq(ctxs, [], "contexts for an unknown namespace")
            final, ctxs = c.opt_meta_context(P.OPT_SET_META_CONTEXT, "disk", ["x-unknown:thing"])
            expect_rep(final, P.REP_ACK, "SET_META_CONTEXT unknown namespace")
            expect_eq(ctxs, [], "contexts selected for an unknown namespace")
            # Unknown export: the spec allows an error or a (deferred) ACK;
            # either way negotiation continues and the final SET counts.
            final, ctxs = c.opt_meta_context(P.OPT_SET_META_CONTEXT, "nope", ["base:allocation"])
            log(f"   SET_META_CONTEXT(nope) -> {rep_name(final)} {ctxs}")
            final, ctxs = c.opt_meta_context(P.OPT_SET_META_CONTEXT, "disk",
                                             ["x-unknown:thing", "base:allocation"])
            expect_rep(final, P.REP_ACK, "SET_META_CONTEXT base:allocation")
            expect_eq([n for _, n in ctxs], ["base:allocation"], "selected contexts")
            ctx_id = ctxs[0][0]
            final, _, _ = c.opt_go("disk", ())
            expect_rep(final, P.REP_ACK, "GO")

            # Transmission with structured replies.
            data = rng.randbytes(64 * 1024)
            expect_eq(c.simple_cmd(P.CMD_WRITE, MiB, len(data), payload=data, handle=1), 0,
                      "WRITE")
            err, got = c.read_cmd(MiB, len(data), handle=2)
            expect((err, got) == (0, data), "structured READ of data")
            err, got = c.read_cmd(20 * MiB, 256 * 1024, handle=3)
            expect((err, got) == (0, bytes(256 * 1024)), "structured READ of a hole")
            err, got = c.read_cmd(MiB - 4096, 8192, handle=4)
            expect((err, got) == (0, bytes(4096) + data[:4096]), "structured READ hole+data")
            # READ error must be a structured error chunk.
            c.send_request(P.CMD_READ, 5, SIZE - 10, 4096)
            err, chunks = c.read_structured_reply(5)
            expect_eq(err, P.EINVAL, "structured READ past end error")
            expect(all(t != "simple" for t, _ in chunks), "simple reply to a READ with "
                   "structured replies negotiated")
            # BLOCK_STATUS.
            c.send_request(P.CMD_BLOCK_STATUS, 6, 0, 4 * MiB)
            err, chunks = c.read_structured_reply(6)
            expect_eq(err, 0, "BLOCK_STATUS error")
            bs = [p for t, p in chunks if t == P.REPLY_TYPE_BLOCK_STATUS]
            expect_eq(len(bs), 1, "BLOCK_STATUS chunks")
            cid = struct.unpack(">I", bs[0][:4])[0]
            expect_eq(cid, ctx_id, "context id in BLOCK_STATUS")
            desc = [struct.unpack(">II", bs[0][i:i + 8]) for i in range(4, len(bs[0]), 8)]
            expect((len(bs[0]) - 4) % 8 == 0 and desc, "BLOCK_STATUS payload shape")
            pos, states = 0, []
            for ln, fl in desc:
                expect(ln > 0, "zero-length descriptor")
                states.append((pos, ln, fl))
                pos += ln
            log(f"   block status 0..4MiB: {states}")
            expect(sum(ln for ln, _ in desc[:-1]) < 4 * MiB, "descriptors beyond the request")

            def flag_at(x):
                for o, l, f in states:
                    if o <= x < o + l:
                        return f
                return None
            # REQ_ONE: exactly one descriptor, not longer than the request.
            c.send_request(P.CMD_BLOCK_STATUS, 7, MiB, 8192, flags=P.CMD_FLAG_REQ_ONE)
            err, chunks = c.read_structured_reply(7)
            bs = [p for t, p in chunks if t == P.REPLY_TYPE_BLOCK_STATUS]
            expect(err == 0 and len(bs) == 1 and len(bs[0]) == 12,
                   f"REQ_ONE reply: err {err}, chunks {[(t, len(p)) for t, p in chunks]}")
            ln, fl = struct.unpack(">II", bs[0][4:])
            expect(0 < ln <= 8192 and fl & 1 == 0, f"REQ_ONE descriptor ({ln}, {fl})")
            # BLOCK_STATUS past end -> EINVAL.
            c.send_request(P.CMD_BLOCK_STATUS, 8, SIZE, 4096)
            err, _ = c.read_structured_reply(8)
            expect_eq(err, P.EINVAL, "BLOCK_STATUS past end")
            # Last, so that the protocol checks above run whatever the
            # backing reports.
            expect_eq(flag_at(MiB) & 1, 0, "offset 1 MiB (written) HOLE bit")
            expect_eq(flag_at(0) & 1, 1, "offset 0 (never written) HOLE bit")
            c.disconnect()

    with checks.check("BLOCK_STATUS without a selected context -> EINVAL"):
        with P.Client.unix(d.unix_path) as c:
            c.handshake()
            expect_rep(c.opt_structured_reply(), P.REP_ACK, "STRUCTURED_REPLY")
            final, _, _ = c.opt_go("disk", ())
            expect_rep(final, P.REP_ACK, "GO")
            c.send_request(P.CMD_BLOCK_STATUS, 1, 0, 4096)
            err, _ = c.read_structured_reply(1)
            expect_eq(err, P.EINVAL, "BLOCK_STATUS without context")
            err, _ = c.read_cmd(0, 512, handle=2)
            expect_eq(err, 0, "READ afterwards")
            c.disconnect()


def error_sessions(checks, d):
    with checks.check("simple-reply errors for bad requests (no bytes change)"):
        sha = d.backing_sha256()
        with P.Client.unix(d.unix_path) as c:
            c.handshake()
            final, _, _ = c.opt_go("disk", ())
            expect_rep(final, P.REP_ACK, "GO")
            cases = [
                ("unknown command 0x55", dict(cmd=0x55, offset=0, length=0), {P.EINVAL}),
                ("unknown flag on READ", dict(cmd=P.CMD_READ, offset=0, length=512, flags=0x4000),
                 {P.EINVAL}),
                ("TRIM past end", dict(cmd=P.CMD_TRIM, offset=SIZE - 512, length=4096),
                 {P.EINVAL, P.ENOSPC}),
                ("WRITE_ZEROES past end", dict(cmd=P.CMD_WRITE_ZEROES, offset=SIZE, length=4096),
                 {P.EINVAL, P.ENOSPC}),
                ("offset+length overflow (READ)", dict(cmd=P.CMD_READ, offset=(1 << 64) - 512,
                                                       length=1024), {P.EINVAL}),
                ("offset+length overflow (TRIM)", dict(cmd=P.CMD_TRIM, offset=(1 << 64) - 512,
                                                       length=1024), {P.EINVAL, P.ENOSPC}),
                ("CACHE past end", dict(cmd=P.CMD_CACHE, offset=SIZE, length=512), {P.EINVAL}),
                ("BLOCK_STATUS with simple replies", dict(cmd=P.CMD_BLOCK_STATUS, offset=0,
                                                          length=4096), {P.EINVAL}),
            ]
            for i, (what, req, errs) in enumerate(cases):
                c.send_request(req["cmd"], 1000 + i, req["offset"], req["length"],
                               req.get("flags", 0))
                err, h, _ = c.read_simple_reply(0)
                expect_eq(h, 1000 + i, f"{what}: reply handle")
                expect(err in errs, f"{what}: error {err}, want one of {sorted(errs)}")
            # WRITE past the end, payload sent: the server must consume it.
            payload = bytes(4096)
            c.send_request(P.CMD_WRITE, 2000, SIZE - 1024, len(payload), payload=payload)
            err, h, _ = c.read_simple_reply(0)
            expect((h, err in (P.EINVAL, P.ENOSPC)) == (2000, True),
                   f"WRITE past end: handle {h}, error {err}")
            err, data = c.read_cmd(0, 4096, handle=2001)
            expect_eq(err, 0, "READ after errors")
            c.disconnect()
        expect_eq(d.backing_sha256(), sha, "backing sha256")

    with checks.check("simple-reply READ longer than the maximum payload: error or close"):
        with P.Client.unix(d.unix_path) as c:
            c.handshake()
            final, _, _ = c.opt_go("disk", ())
            expect_rep(final, P.REP_ACK, "GO")
            c.send_request(P.CMD_READ, 77, 0, MAX_PAYLOAD + 1)
            try:
                err, h, _ = c.read_simple_reply(0)
            except P.Closed:
                log("   server closed the connection (allowed)")
            else:
                expect_eq(h, 77, "reply handle")
                expect(err in (P.EINVAL, P.EOVERFLOW, P.ENOMEM),
                       f"oversized READ answered with error {err}")
                err, _ = c.read_cmd(0, 512, handle=78)
                expect_eq(err, 0, "READ after oversized READ")
        d.assert_alive()


def read_only_sessions(checks, rng):
    def fill(p):
        with open(p, "r+b") as f:
            f.write(rng.randbytes(2 * MiB))

    with Daemon(size=SIZE, read_only=True, init_backing=fill, name="shadowd-ro",
                checks=checks) as d:
        with checks.check("read-only export, kernel-like client: READ_ONLY flag, EPERM"):
            sha = d.backing_sha256()
            with P.Client.unix(d.unix_path) as c:
                c.handshake()
                final, _, _ = c.opt_go("disk", ())
                expect_rep(final, P.REP_ACK, "GO")
                expect(c.tflags & P.TF_READ_ONLY, f"READ_ONLY not set: {c.tflags:#x}")
                for i, (cmd, ln) in enumerate(((P.CMD_WRITE, 4096), (P.CMD_TRIM, 4096),
                                                (P.CMD_WRITE_ZEROES, 4096))):
                    payload = bytes(ln) if cmd == P.CMD_WRITE else b""
                    c.send_request(cmd, 50 + i, 0, ln, payload=payload)
                    err, h, _ = c.read_simple_reply(0)
                    expect_eq((h, err), (50 + i, P.EPERM), f"command {cmd} on read-only export")
                err, data = c.read_cmd(0, 4096, handle=60)
                expect_eq(err, 0, "READ")
                expect(data == d.read_backing(0, 4096), "READ data")
                c.disconnect()
            with P.Client.unix(d.unix_path) as c:
                c.handshake()
                size, tflags, _ = c.opt_export_name("disk")
                expect(tflags & P.TF_READ_ONLY, "READ_ONLY not set over EXPORT_NAME")
                c.disconnect()
            expect_eq(d.backing_sha256(), sha, "backing sha256")


def test():
    checks = Checks("raw-protocol")
    rng = make_rng("raw-protocol")
    with Daemon(size=SIZE, checks=checks, description="raw protocol export") as d:
        kernel_like_session(checks, d, rng, "unix")
        kernel_like_session(checks, d, rng, "tcp")
        export_name_sessions(checks, d, rng)
        info_sessions(checks, d)
        option_sessions(checks, d)
        meta_context_sessions(checks, d, rng)
        error_sessions(checks, d)
    read_only_sessions(checks, rng)
    checks.finish()


if __name__ == "__main__":
    main(test)
