#!/usr/bin/python3
"""nbdcopy round trip with multi-conn against a live shadowd.

A random image (with some all-zero stretches, so nbdcopy's zero/sparse
paths are used) is copied onto the export with --connections=4, copied
back to a new file with --connections=4, and compared.

Synchronisation: sd_notify READY=1; nbdcopy runs to completion.
"""

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (MiB, Checks, Daemon, expect_eq, main, make_rng, run,  # noqa: E402
                     sha256_file)

SIZE = 64 * MiB


def make_source(path, rng):
    with open(path, "wb") as f:
        for i in range(SIZE // MiB):
            if i % 5 == 3:
                f.write(bytes(MiB))                 # zero stretch
            elif i % 7 == 2:
                f.write(rng.randbytes(4096) + bytes(MiB - 8192) + rng.randbytes(4096))
            else:
                f.write(rng.randbytes(MiB))


def test():
    checks = Checks("nbdcopy")
    rng = make_rng("nbdcopy")

    def prefill(p):
        # Non-zero garbage in the export, so that zero stretches of the source
        # must really be written as zeroes.
        with open(p, "r+b") as f:
            f.write(rng.randbytes(SIZE))

    with tempfile.TemporaryDirectory(prefix="shadowd-nbdcopy-") as work, \
            Daemon(size=SIZE, init_backing=prefill, checks=checks) as d:
        src = os.path.join(work, "src.raw")
        back = os.path.join(work, "back.raw")
        make_source(src, rng)
        want = sha256_file(src)

        with checks.check("export advertises multi-conn"):
            _, out = run(["nbdinfo", "--json", d.uri_unix])
            expect_eq(json.loads(out)["exports"][0].get("can_multi_conn"), True, "can_multi_conn")

        with checks.check("nbdcopy file -> export with --connections=4"):
            run(["nbdcopy", "--connections=4", "--requests=16", "--flush", "--progress",
                 src, d.uri_unix])
            expect_eq(d.backing_sha256(), want, "backing file sha256 after copy in")

        with checks.check("nbdcopy export -> new file with --connections=4"):
            run(["nbdcopy", "--connections=4", "--requests=16", "--progress", d.uri_unix, back])
            expect_eq(os.path.getsize(back), SIZE, "copied size")
            expect_eq(sha256_file(back), want, "round-trip sha256")
            run(["cmp", src, back])

        with checks.check("nbdcopy over TCP, 4 connections, export -> export-sized file"):
            back2 = os.path.join(work, "back2.raw")
            run(["nbdcopy", "--connections=4", d.uri_tcp, back2])
            expect_eq(sha256_file(back2), want, "TCP round-trip sha256")

        with checks.check("nbdcopy synchronous mode (--synchronous) round trip"):
            back3 = os.path.join(work, "back3.raw")
            run(["nbdcopy", "--synchronous", d.uri_unix, back3])
            expect_eq(sha256_file(back3), want, "synchronous round-trip sha256")
        checks.finish()


if __name__ == "__main__":
    main(test)
