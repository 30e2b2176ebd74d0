#!/usr/bin/python3
"""libnbd (python3-libnbd) against a live shadowd: every command and flag.

READ/WRITE at many offsets and unaligned sizes, FUA, FLUSH, TRIM,
WRITE_ZEROES with and without NO_HOLE, CACHE, BLOCK_STATUS (base:allocation,
REQ_ONE), 64 concurrent AIO requests against an in-memory model, error
replies (past-end, read-only export), structured replies switched off, and a
connection that only uses NBD_OPT_EXPORT_NAME with simple replies (as the
Linux kernel does).

Synchronisation: the harness waits for sd_notify READY=1; all libnbd calls
are synchronous or driven by nbd.poll() until the in-flight count is zero.
"""

import contextlib
import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd  # noqa: E402

from harness import (KiB, MiB, Checks, Daemon, expect, expect_clean_refusal,  # noqa: E402
                     expect_eq, log, main, make_rng)

SIZE = 64 * MiB
MAX_PAYLOAD = 32 * MiB


class Model:
    """What the export must contain."""

    def __init__(self, size):
        self.data = bytearray(size)

    def write(self, off, buf):
        self.data[off:off + len(buf)] = buf

    def zero(self, off, ln):
        self.data[off:off + ln] = bytes(ln)

    def get(self, off, ln):
        return bytes(self.data[off:off + ln])


def connect(d, uri=None, meta=True, structured=True, handshake_flags=None, strict=None):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if not structured:
        h.set_request_structured_replies(False)
    if handshake_flags is not None:
        h.set_handshake_flags(handshake_flags)
    if strict is not None:
        h.set_strict_mode(strict)
    if uri:
        h.connect_uri(uri)
    else:
        h.set_export_name("disk")
        h.connect_unix(d.unix_path)
    return h


@contextlib.contextmanager
def opened(d, **kw):
    """A connected handle that is shut down (errors ignored) afterwards."""
    h = connect(d, **kw)
    try:
        yield h
    finally:
        try:
            h.shutdown()
        except nbd.Error:
            pass


def expect_nbd_error(fn, errnos, what):
    try:
        fn()
    except nbd.Error as e:
        if e.errnum not in errnos:
            raise AssertionError(f"{what}: failed with {e.errno} ({e.errnum}), "
                                 f"want one of {[errno.errorcode[x] for x in errnos]}: {e}")
        log(f"   {what}: failed as expected: {e}")
        return e
    raise AssertionError(f"{what}: succeeded, expected an error "
                         f"{[errno.errorcode[x] for x in errnos]}")


def extents(h, off, ln, flags=0):
    """Block status for base:allocation -> list of (offset, length, flags)."""
    got = []

    def cb(metacontext, offset, entries, err):
        if metacontext != nbd.CONTEXT_BASE_ALLOCATION:
            return 0
        pos = offset
        for i in range(0, len(entries), 2):
            got.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        return 0

    h.block_status(ln, off, cb, flags)
    expect(got, f"block_status({off},{ln}) returned no base:allocation extents")
    expect_eq(got[0][0], off, "first extent offset")
    return got


def status_over(h, off, ln):
    """Set of base:allocation flag values over [off, off+ln) (follows up on
    short replies, as the protocol allows the server to return less)."""
    flags = set()
    pos = off
    end = off + ln
    while pos < end:
        ex = extents(h, pos, end - pos)
        for eoff, eln, ef in ex:
            if eoff >= end:
                break
            flags.add(ef)
            pos = eoff + eln
    return flags


def verify_all(h, model, what, chunk=8 * MiB):
    for off in range(0, SIZE, chunk):
        got = h.pread(chunk, off)
        if got != model.get(off, chunk):
            first = next(i for i in range(chunk) if got[i] != model.data[off + i])
            raise AssertionError(f"{what}: export differs from model at byte {off + first}")


def test_basic(checks, d, rng):
    model = Model(SIZE)
    h = connect(d)

    with checks.check("handshake facts (size, flags, block sizes, protocol)"):
        expect_eq(h.get_size(), SIZE, "size")
        expect_eq(h.get_protocol(), "newstyle-fixed", "protocol")
        expect_eq(h.get_structured_replies_negotiated(), True, "structured replies")
        expect_eq(h.is_read_only(), False, "read-only")
        for name in ("can_flush", "can_fua", "can_trim", "can_zero", "can_cache",
                     "can_multi_conn"):
            expect_eq(bool(getattr(h, name)()), True, name)
        expect_eq(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), True,
                  "base:allocation negotiated")
        expect_eq(h.get_block_size(nbd.SIZE_MINIMUM), 1, "minimum block size")
        expect_eq(h.get_block_size(nbd.SIZE_PREFERRED), 4096, "preferred block size")
        expect_eq(h.get_block_size(nbd.SIZE_MAXIMUM), MAX_PAYLOAD, "maximum payload")

    with checks.check("full info: canonical name and description (NBD_INFO_NAME/DESCRIPTION)"):
        h2 = nbd.NBD()
        h2.set_full_info(True)
        h2.set_export_name("disk")
        h2.connect_unix(d.unix_path)
        expect_eq(h2.get_canonical_export_name(), "disk", "canonical export name")
        expect_eq(h2.get_export_description(), "libnbd test export", "description")
        h2.shutdown()

    with checks.check("pread of a fresh sparse export reads zeros"):
        expect_eq(h.pread(MiB, 0), bytes(MiB), "first MiB")
        expect_eq(h.pread(4096, SIZE - 4096), bytes(4096), "last 4 KiB")

    with checks.check("pwrite/pread round trip at various offsets and unaligned sizes"):
        cases = [(0, 1), (1, 1), (511, 2), (4095, 2), (4096, 4096), (12345, 511),
                 (100000, 65537), (3 * MiB + 7, 1 * MiB + 3), (SIZE - 1, 1),
                 (SIZE - 4099, 4099), (7 * MiB, 4096 * 3 + 1), (9 * MiB + 4095, 8193)]
        for off, ln in cases:
            buf = rng.randbytes(ln)
            h.pwrite(buf, off)
            model.write(off, buf)
            got = h.pread(ln, off)
            expect(got == buf, f"read-back mismatch at {off}+{ln}")
        # Re-read every case (later writes did not clobber earlier ones
        # except where the model says so) and read across neighbours.
        for off, ln in cases:
            lo = max(0, off - 100)
            hi = min(SIZE, off + ln + 100)
            expect(h.pread(hi - lo, lo) == model.get(lo, hi - lo),
                   f"mismatch around {off}+{ln}")

    with checks.check("maximum payload (32 MiB) write and read"):
        buf = rng.randbytes(MAX_PAYLOAD)
        h.pwrite(buf, 16 * MiB)
        model.write(16 * MiB, buf)
        expect(h.pread(MAX_PAYLOAD, 16 * MiB) == buf, "32 MiB read-back mismatch")

    with checks.check("pwrite with FUA reaches the backing file"):
        buf = rng.randbytes(8192 + 13)
        h.pwrite(buf, 5 * MiB + 3, nbd.CMD_FLAG_FUA)
        model.write(5 * MiB + 3, buf)
        expect(d.read_backing(5 * MiB + 3, len(buf)) == buf,
               "FUA write not in the backing file after the reply")

    with checks.check("flush makes earlier writes visible in the backing file"):
        buf = rng.randbytes(3 * 4096)
        h.pwrite(buf, 6 * MiB)
        model.write(6 * MiB, buf)
        h.flush()
        expect(d.read_backing(6 * MiB, len(buf)) == buf,
               "flushed write not in the backing file")

    with checks.check("block_status: never-written range is a hole"):
        # 48 MiB..64 MiB - 4099 was written by the 32 MiB write above; use
        # the untouched range 12 MiB..16 MiB.
        fl = status_over(h, 12 * MiB, 4 * MiB)
        expect(all(f & nbd.STATE_HOLE for f in fl),
               f"untouched range reported with flags {fl}, want HOLE")
        expect(all(f & nbd.STATE_ZERO for f in fl),
               f"untouched range reported with flags {fl}, want ZERO")

    with checks.check("block_status: written range is data"):
        fl = status_over(h, 16 * MiB, 4 * MiB)
        expect(fl == {0}, f"written range reported with flags {fl}, want data (0)")

    with checks.check("block_status: mixed range, contiguous extents, REQ_ONE"):
        ex = extents(h, 11 * MiB, 6 * MiB)
        pos = 11 * MiB
        for eoff, eln, ef in ex:
            expect_eq(eoff, pos, "extent contiguity")
            expect(eln > 0, "zero-length extent")
            pos += eln
        kinds = {ef & nbd.STATE_HOLE for _, _, ef in ex}
        expect(len(ex) >= 2 and kinds == {0, nbd.STATE_HOLE},
               f"11..17 MiB should contain a hole then data, got {ex}")
        one = extents(h, 11 * MiB, 6 * MiB, nbd.CMD_FLAG_REQ_ONE)
        expect_eq(len(one), 1, "REQ_ONE extent count")
        expect(one[0][1] <= 6 * MiB, "REQ_ONE extent longer than the request")
        expect(one[0][2] & nbd.STATE_HOLE, f"REQ_ONE first extent {one} should be a hole")
        # Unaligned query inside data.
        ex = extents(h, 16 * MiB + 1, 4095)
        expect(ex[0][2] & nbd.STATE_HOLE == 0, f"unaligned query in data: {ex}")

    with checks.check("trim: succeeds, backing size unchanged, hole reported"):
        st_before = d.backing_size()
        off, ln = 20 * MiB, 2 * MiB
        h.trim(ln, off)
        h.trim(4096, 30 * MiB, nbd.CMD_FLAG_FUA)
        h.trim(1000, 31 * MiB + 17)  # unaligned: the server may ignore parts
        h.flush()
        expect_eq(d.backing_size(), st_before, "backing file size after trim")
        fl = status_over(h, off, ln)
        # Contents after trim are unspecified: overwrite to keep the model
        # (before the hole check, so that its failure stays its own).
        for o, n in ((off, ln), (30 * MiB, 4096), (31 * MiB + 17, 1000)):
            buf = rng.randbytes(n)
            h.pwrite(buf, o)
            model.write(o, buf)
        expect(all(f & nbd.STATE_HOLE for f in fl),
               f"trimmed range reported with flags {fl}, want HOLE")

    with checks.check("write_zeroes without NO_HOLE: zeros, hole reported, neighbours intact"):
        off, ln = 22 * MiB, 1 * MiB
        buf = rng.randbytes(ln + 2 * 4096)
        h.pwrite(buf, off - 4096)
        model.write(off - 4096, buf)
        h.zero(ln, off)
        model.zero(off, ln)
        expect_eq(h.pread(ln, off), bytes(ln), "zeroed range")
        expect(h.pread(ln + 8192, off - 4096) == model.get(off - 4096, ln + 8192),
               "neighbours of the zeroed range")
        fl = status_over(h, off, ln)
        expect(all(f & nbd.STATE_ZERO for f in fl), f"zeroed range flags {fl}, want ZERO")
        expect(all(f & nbd.STATE_HOLE for f in fl),
               f"zero-with-hole range reported with flags {fl}, want HOLE")

    with checks.check("write_zeroes unaligned, with FUA: exact bytes, in the backing"):
        # Inside the data written just above the range zeroed there.
        o2, n2 = 23 * MiB + 100, 3000
        h.zero(n2, o2, nbd.CMD_FLAG_FUA)
        model.zero(o2, n2)
        expect(h.pread(8192, o2 - 100) == model.get(o2 - 100, 8192), "unaligned zero")
        expect(d.read_backing(o2, n2) == bytes(n2), "FUA zero not in backing file")

    with checks.check("write_zeroes with NO_HOLE: zeros, range provisioned"):
        # 52 MiB .. 53 MiB has never been written: it is a hole in the file.
        off, ln = 52 * MiB, 1 * MiB
        h.flush()
        allocated_before = d.backing_allocated()
        h.zero(ln, off, nbd.CMD_FLAG_NO_HOLE)
        model.zero(off, ln)
        h.flush()
        expect_eq(h.pread(ln, off), bytes(ln), "NO_HOLE zeroed range")
        allocated_after = d.backing_allocated()
        expect(allocated_after - allocated_before >= ln,
               f"NO_HOLE zero of {ln} bytes grew the allocation by only "
               f"{allocated_after - allocated_before} bytes")
        # NO_HOLE over data keeps reading zeros too.
        off2 = 16 * MiB + 12345
        h.zero(70000, off2, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
        model.zero(off2, 70000)
        expect(h.pread(80000, off2 - 5000) == model.get(off2 - 5000, 80000),
               "NO_HOLE zero over data")

    with checks.check("cache"):
        h.cache(MiB, 0)
        h.cache(4096, SIZE - 4096)
        h.cache(1, 12345)

    with checks.check("whole export equals the model"):
        verify_all(h, model, "after command tests")

    with checks.check("flush, then backing file equals the model"):
        h.flush()
        expect(d.read_backing() == bytes(model.data), "backing file differs from the model")

    h.shutdown()
    return model


def test_aio(checks, d, rng, model):
    with checks.check("64 concurrent aio requests (reads and writes) vs the model"):
        h = connect(d)
        rounds = 24
        depth = 64
        out_of_order = 0
        max_in_flight = 0
        for rnd in range(rounds):
            # Non-overlapping random ranges, so the result is deterministic
            # whatever order the server completes them in.
            slots = sorted(rng.sample(range(SIZE // (256 * KiB)), depth))
            reqs = []
            for i, slot in enumerate(slots):
                base = slot * 256 * KiB
                ln = rng.choice([1, 512, 4096, 4096 + 1, 65536, 200000, 256 * KiB])
                off = base + rng.randrange(0, 256 * KiB - ln + 1)
                if rng.random() < 0.5:
                    data = rng.randbytes(ln)
                    model.write(off, data)
                    reqs.append(["w", off, ln, nbd.Buffer.from_bytearray(data), None])
                else:
                    reqs.append(["r", off, ln, nbd.Buffer(ln), model.get(off, ln)])
            rng.shuffle(reqs)
            done = []
            errors = []

            def mk(idx):
                def cb(err):
                    if err.value:
                        errors.append((idx, err.value))
                    done.append(idx)
                    return 1
                return cb

            for idx, r in enumerate(reqs):
                flags = nbd.CMD_FLAG_FUA if (r[0] == "w" and idx % 7 == 0) else 0
                if r[0] == "w":
                    h.aio_pwrite(r[3], r[1], completion=mk(idx), flags=flags)
                else:
                    h.aio_pread(r[3], r[1], completion=mk(idx))
            max_in_flight = max(max_in_flight, h.aio_in_flight())
            while h.aio_in_flight() > 0:
                h.poll(-1)
            expect(not errors, f"round {rnd}: aio errors {errors}")
            expect_eq(sorted(done), list(range(len(reqs))), f"round {rnd}: completions")
            if done != sorted(done):
                out_of_order += 1
            for idx, r in enumerate(reqs):
                if r[0] == "r":
                    got = bytes(r[3].to_bytearray())
                    expect(got == r[4], f"round {rnd}: aio read {r[1]}+{r[2]} mismatch")
        log(f"   {rounds} rounds x {depth}: max in flight {max_in_flight}, "
            f"rounds completed out of order: {out_of_order}")
        verify_all(h, model, "after aio")
        h.shutdown()

    with checks.check("aio mixed with flush/trim/zero/cache/block_status in flight"):
        h = connect(d)
        cookies = []
        base = 44 * MiB
        for i in range(32):
            data = rng.randbytes(4096)
            model.write(base + i * 8192, data)
            cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(data), base + i * 8192))
        cookies.append(h.aio_flush())
        cookies.append(h.aio_cache(MiB, base))
        cookies.append(h.aio_zero(4096, base + 8192 * 40))
        model.zero(base + 8192 * 40, 4096)
        cookies.append(h.aio_block_status(MiB, base, lambda *a: 0))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            expect(h.aio_command_completed(c), f"cookie {c} not completed")
        expect(h.pread(MiB, base) == model.get(base, MiB), "aio mix read-back")
        h.shutdown()


def test_errors(checks, d, rng, model):
    # strict=0: let libnbd send what the server must reject.
    with checks.check("read past the end -> EINVAL, connection still works"), \
            opened(d, strict=0) as h:
        expect_nbd_error(lambda: h.pread(4096, SIZE - 2048), {errno.EINVAL}, "pread straddling end")
        expect_nbd_error(lambda: h.pread(512, SIZE), {errno.EINVAL}, "pread at end")
        expect_nbd_error(lambda: h.pread(512, SIZE + 10 * MiB), {errno.EINVAL}, "pread beyond end")
        expect(h.pread(4096, 0) == model.get(0, 4096), "read after errors")

    with checks.check("write past the end -> error (EINVAL/ENOSPC), nothing written"), \
            opened(d, strict=0) as h:
        sha = d.backing_sha256()
        size_before = d.backing_size()
        expect_nbd_error(lambda: h.pwrite(rng.randbytes(4096), SIZE - 2048),
                         {errno.EINVAL, errno.ENOSPC}, "pwrite straddling end")
        expect_nbd_error(lambda: h.pwrite(b"x", SIZE), {errno.EINVAL, errno.ENOSPC},
                         "pwrite at end")
        expect_nbd_error(lambda: h.zero(8192, SIZE - 4096), {errno.EINVAL, errno.ENOSPC},
                         "zero straddling end")
        expect_nbd_error(lambda: h.trim(8192, SIZE - 4096), {errno.EINVAL, errno.ENOSPC},
                         "trim straddling end")
        expect_nbd_error(lambda: h.cache(8192, SIZE - 4096), {errno.EINVAL},
                         "cache straddling end")
        h.flush()
        expect_eq(d.backing_size(), size_before, "backing size")
        expect_eq(d.backing_sha256(), sha, "backing sha256 after rejected writes")
        expect(h.pread(4096, SIZE - 4096) == model.get(SIZE - 4096, 4096),
               "read after write errors")

    with checks.check("block_status past the end -> EINVAL"), opened(d, strict=0) as h:
        expect_nbd_error(lambda: h.block_status(4096, SIZE, lambda *a: 0), {errno.EINVAL},
                         "block_status at end")
        expect(h.pread(4096, 0) == model.get(0, 4096), "read after block_status error")

    with checks.check("zero-length requests do not break the connection"), \
            opened(d, strict=0) as h:
        for name, fn in (("pread", lambda: h.pread(0, 4096)),
                         ("pwrite", lambda: h.pwrite(b"", 4096)),
                         ("trim", lambda: h.trim(0, 4096)),
                         ("zero", lambda: h.zero(0, 4096)),
                         ("cache", lambda: h.cache(0, 4096))):
            try:
                fn()
                log(f"   zero-length {name}: success")
            except nbd.Error as e:
                log(f"   zero-length {name}: error {e}")
        expect(h.pread(8192, 0) == model.get(0, 8192), "read after zero-length requests")
        d.assert_alive()

    with checks.check("write larger than the maximum payload is refused, server survives"):
        # The client must not do this; the server may answer with an error
        # or close the connection.  Either way: nothing written, daemon up.
        sha = d.backing_sha256()
        with opened(d, strict=0) as h:
            try:
                h.pwrite(bytes(MAX_PAYLOAD + 4096), 0)
                raise AssertionError("a write above the maximum payload succeeded")
            except nbd.Error as e:
                expect_clean_refusal(e, "write above the maximum payload")
        d.assert_alive()
        expect_eq(d.backing_sha256(), sha, "backing sha256 after oversized write")
        with opened(d) as h:
            expect(h.pread(4096, 0) == model.get(0, 4096), "new connection after oversized write")


def test_simple_replies(checks, d, rng, model):
    with checks.check("structured replies off: read/write/flush/trim/zero and error replies"):
        h = connect(d, meta=False, structured=False, strict=0)
        expect_eq(h.get_structured_replies_negotiated(), False, "structured negotiated")
        expect_eq(h.get_protocol(), "newstyle-fixed", "protocol")
        for off, ln in ((0, 1), (4097, 12345), (33 * MiB + 3, 2 * MiB + 1)):
            buf = rng.randbytes(ln)
            h.pwrite(buf, off)
            model.write(off, buf)
            expect(h.pread(ln, off) == buf, f"simple-reply round trip {off}+{ln}")
        buf = rng.randbytes(100)
        h.pwrite(buf, 50, nbd.CMD_FLAG_FUA)
        model.write(50, buf)
        h.flush()
        h.zero(4096, 8192)
        model.zero(8192, 4096)
        h.zero(4096, 16384, nbd.CMD_FLAG_NO_HOLE)
        model.zero(16384, 4096)
        h.cache(4096, 0)
        expect_nbd_error(lambda: h.pread(4096, SIZE - 1), {errno.EINVAL},
                         "simple-reply read past end")
        expect_nbd_error(lambda: h.pwrite(b"abc", SIZE - 1), {errno.EINVAL, errno.ENOSPC},
                         "simple-reply write past end")
        expect(h.pread(65536, 0) == model.get(0, 65536), "simple-reply read after errors")
        # A read of the maximum payload with a simple reply.
        expect(h.pread(MAX_PAYLOAD, 0) == model.get(0, MAX_PAYLOAD), "32 MiB simple read")
        h.shutdown()

    for hflags, label in ((0, "no flags"), (nbd.HANDSHAKE_FLAG_NO_ZEROES, "NO_ZEROES only")):
        with checks.check(f"kernel-like: NBD_OPT_EXPORT_NAME only + simple replies ({label})"):
            h = connect(d, meta=False, structured=False, handshake_flags=hflags, strict=0)
            # Without FIXED_NEWSTYLE the client may send no option other
            # than EXPORT_NAME; libnbd reports that as plain "newstyle".
            expect_eq(h.get_protocol(), "newstyle", "protocol")
            expect_eq(h.get_handshake_flags(), hflags, "handshake flags")
            expect_eq(h.get_structured_replies_negotiated(), False, "structured negotiated")
            expect_eq(h.get_size(), SIZE, "size")
            expect(h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero(),
                   "transmission flags over EXPORT_NAME")
            off = 35 * MiB + 512
            buf = rng.randbytes(128 * KiB)
            h.pwrite(buf, off)
            model.write(off, buf)
            h.pwrite(buf[:4096], off, nbd.CMD_FLAG_FUA)
            h.flush()
            expect(h.pread(len(buf), off) == model.get(off, len(buf)), "EXPORT_NAME round trip")
            h.trim(4096, 36 * MiB)
            h.zero(4096, 36 * MiB)
            model.zero(36 * MiB, 4096)
            expect_nbd_error(lambda: h.pread(4096, SIZE), {errno.EINVAL},
                             "EXPORT_NAME read past end")
            expect_eq(h.pread(4096, 36 * MiB), bytes(4096), "zeroed over EXPORT_NAME")
            h.shutdown()

    with checks.check("TCP connection with libnbd, and the empty (default) export name"):
        h = connect(d, uri=d.uri_tcp)
        expect(h.pread(MiB, 0) == model.get(0, MiB), "TCP read")
        h.shutdown()
        h = connect(d, uri=f"nbd+unix:///?socket={d.unix_path}")
        expect_eq(h.get_size(), SIZE, "size via empty export name")
        expect(h.pread(MiB, 0) == model.get(0, MiB), "read via empty export name")
        h.shutdown()

    with checks.check("unknown export name: GO fails, connection can retry"):
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_unix(d.unix_path)
        h.set_export_name("no-such-export")
        try:
            h.opt_go()
            raise AssertionError("opt_go on an unknown export succeeded")
        except nbd.Error as e:
            log(f"   opt_go(no-such-export) failed as expected: {e}")
        h.set_export_name("disk")
        h.opt_go()
        expect(h.pread(4096, 0) == model.get(0, 4096), "read after retried GO")
        h.shutdown()

    with checks.check("libnbd opt mode: opt_info, opt_list, opt_list_meta_context"):
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_unix(d.unix_path)
        names = []
        n = h.opt_list(lambda name, desc: names.append(name))
        expect_eq((n, names), (1, ["disk"]), "opt_list")
        h.set_export_name("disk")
        h.opt_info()
        expect_eq(h.get_size(), SIZE, "size from opt_info")
        ctxs = []
        h.opt_list_meta_context(lambda name: ctxs.append(name))
        expect(nbd.CONTEXT_BASE_ALLOCATION in ctxs, f"meta contexts {ctxs}")
        # shadowd:source is for point-in-time exports only, not the live one.
        expect("shadowd:source" not in ctxs, f"meta contexts {ctxs}")
        h.add_meta_context("shadowd:")  # libnbd 1.14 lists the added contexts as queries
        ctxs = []
        n = h.opt_list_meta_context(lambda name: ctxs.append(name))
        expect_eq((n, ctxs), (0, []), "opt_list_meta_context(shadowd:)")
        h.opt_abort()

    with checks.check("shadowd:source is not selected on the live export"):
        h = nbd.NBD()
        h.add_meta_context("shadowd:source")
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.set_export_name("disk")
        h.connect_unix(d.unix_path)
        expect_eq(h.can_meta_context("shadowd:source"), False, "shadowd:source negotiated")
        expect_eq(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), True,
                  "base:allocation negotiated")
        expect(extents(h, 0, MiB), "block_status with base:allocation alone")
        h.shutdown()


def test_unadvertised_flags(checks, d, model):
    # proto.md: the server MUST set SEND_DF if READ supports NBD_CMD_FLAG_DF,
    # and SHOULD fail FAST_ZERO with EINVAL when SEND_FAST_ZERO is not set;
    # unknown or inapplicable flags SHOULD get EINVAL.
    with checks.check("READ with NBD_CMD_FLAG_DF when SEND_DF is not advertised -> EINVAL"), \
            opened(d, strict=0) as h:
        if h.can_df():
            log("   server advertises SEND_DF; DF read must then succeed")
            expect(h.pread(4096, 0, nbd.CMD_FLAG_DF) == model.get(0, 4096), "DF read")
        else:
            expect_nbd_error(lambda: h.pread(4096, 0, nbd.CMD_FLAG_DF),
                             {errno.EINVAL}, "pread with unadvertised DF")
        expect(h.pread(4096, 0) == model.get(0, 4096), "read after the DF request")
    with checks.check("WRITE_ZEROES with FAST_ZERO when not advertised -> EINVAL"), \
            opened(d, strict=0) as h:
        if h.can_fast_zero():
            log("   server advertises SEND_FAST_ZERO; skipping")
        else:
            expect_nbd_error(lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO),
                             {errno.EINVAL}, "zero with unadvertised FAST_ZERO")
        expect(h.pread(4096, 0) == model.get(0, 4096), "read after the FAST_ZERO request")
    with checks.check("inapplicable flags -> EINVAL (NO_HOLE on WRITE, REQ_ONE on READ)"), \
            opened(d, strict=0) as h:
        sha = d.backing_sha256()
        expect_nbd_error(lambda: h.pwrite(b"z" * 4096, 0, nbd.CMD_FLAG_NO_HOLE),
                         {errno.EINVAL}, "pwrite with NO_HOLE")
        expect_nbd_error(lambda: h.pread(4096, 0, nbd.CMD_FLAG_REQ_ONE),
                         {errno.EINVAL}, "pread with REQ_ONE")
        expect_nbd_error(lambda: h.trim(4096, 0, nbd.CMD_FLAG_NO_HOLE),
                         {errno.EINVAL}, "trim with NO_HOLE")
        h.flush()
        expect_eq(d.backing_sha256(), sha, "backing sha256 after refused requests")


def test_read_only(checks, rng):
    def fill(p):
        with open(p, "r+b") as f:
            f.seek(MiB)
            f.write(rng.randbytes(2 * MiB))

    with Daemon(size=SIZE, read_only=True, init_backing=fill, name="shadowd-ro",
                checks=checks) as d:
        sha = d.backing_sha256()
        expected = d.read_backing(0, 4 * MiB)
        with checks.check("read-only export: flags and reads"):
            h = connect(d, strict=0)
            expect_eq(h.is_read_only(), True, "is_read_only")
            expect(h.pread(4 * MiB, 0) == expected, "read-only read")
        with checks.check("read-only export: write/zero/trim fail with EPERM"):
            expect_nbd_error(lambda: h.pwrite(b"hello", MiB), {errno.EPERM}, "pwrite")
            expect_nbd_error(lambda: h.pwrite(rng.randbytes(65536), 0, nbd.CMD_FLAG_FUA),
                             {errno.EPERM}, "pwrite FUA")
            expect_nbd_error(lambda: h.zero(65536, MiB), {errno.EPERM}, "zero")
            expect_nbd_error(lambda: h.zero(65536, MiB, nbd.CMD_FLAG_NO_HOLE), {errno.EPERM},
                             "zero NO_HOLE")
            expect_nbd_error(lambda: h.trim(65536, MiB), {errno.EPERM}, "trim")
            if h.can_flush():
                h.flush()
            expect(h.pread(4 * MiB, 0) == expected, "read after refused writes")
            h.shutdown()
        with checks.check("read-only export: simple replies, EPERM"):
            h = connect(d, meta=False, structured=False, strict=0)
            expect_nbd_error(lambda: h.pwrite(b"x" * 4096, 0), {errno.EPERM}, "simple pwrite")
            expect(h.pread(4096, MiB) == expected[MiB:MiB + 4096], "simple read")
            h.shutdown()
        with checks.check("read-only export: backing file unchanged"):
            expect_eq(d.backing_sha256(), sha, "backing sha256")


def test():
    checks = Checks("libnbd")
    rng = make_rng("libnbd")
    with Daemon(size=SIZE, checks=checks, description="libnbd test export") as d:
        model = test_basic(checks, d, rng)
        test_aio(checks, d, rng, model)
        test_errors(checks, d, rng, model)
        test_simple_replies(checks, d, rng, model)
        with checks.check("final: export and backing file equal the model"):
            h = connect(d)
            verify_all(h, model, "final")
            h.flush()
            h.shutdown()
            expect(d.read_backing() == bytes(model.data), "backing file differs from the model")
        test_unadvertised_flags(checks, d, model)
    test_read_only(checks, rng)
    checks.finish()


if __name__ == "__main__":
    main(test)
