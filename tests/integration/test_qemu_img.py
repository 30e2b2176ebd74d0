#!/usr/bin/python3
"""qemu-img / qemu-io against a live shadowd.

`qemu-img convert -n` a random 32 MiB image onto the export, `qemu-img
compare` it, `qemu-img info`, write patterns with qemu-io, and convert the
export back to a local file.

Synchronisation: sd_notify READY=1; each qemu tool runs to completion.
"""

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (MiB, Checks, Daemon, expect_eq, main, make_rng,  # noqa: E402
                     run, sha256_file, write_random_file)

SIZE = 32 * MiB


def test():
    checks = Checks("qemu-img")
    rng = make_rng("qemu-img")
    with tempfile.TemporaryDirectory(prefix="shadowd-qemu-") as work, \
            Daemon(size=SIZE, checks=checks) as d:
        src = os.path.join(work, "src.raw")
        write_random_file(src, SIZE, rng)
        uri = d.uri_unix

        with checks.check("qemu-img info on the export"):
            _, out = run(["qemu-img", "info", "--output=json", "-f", "raw", uri])
            info = json.loads(out)
            expect_eq(info.get("virtual-size"), SIZE, "virtual-size")
            expect_eq(info.get("format"), "raw", "format")
            run(["qemu-img", "info", uri])

        with checks.check("qemu-img convert -n a random image onto the export"):
            run(["qemu-img", "convert", "-n", "-p", "-f", "raw", "-O", "raw", src, uri])

        with checks.check("qemu-img compare: export equals the source"):
            rc, _ = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri], check=False)
            expect_eq(rc, 0, "qemu-img compare exit code")
            expect_eq(d.backing_sha256(), sha256_file(src), "backing file sha256")

        with checks.check("qemu-img compare detects a difference (compare is not vacuous)"):
            other = os.path.join(work, "other.raw")
            with open(src, "rb") as f, open(other, "wb") as g:
                g.write(f.read())
            with open(other, "r+b") as g:
                g.seek(SIZE // 2 + 7)
                g.write(b"\xff\x00\xee")
            rc, _ = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", other, uri],
                        check=False)
            expect_eq(rc, 1, "qemu-img compare exit code for differing images")

        with checks.check("qemu-io write/read patterns over TCP, compare again"):
            tcp = d.uri_tcp
            run(["qemu-io", "-f", "raw",
                 "-c", "write -P 0x5a 1M 64k",
                 "-c", "write -P 0xa5 3145733 12345",     # unaligned
                 "-c", "write -z 8M 1M",                   # write zeroes
                 "-c", "flush",
                 "-c", "read -P 0x5a 1M 64k",
                 "-c", "read -P 0xa5 3145733 12345",
                 "-c", "read -P 0 8M 1M",
                 tcp])
            with open(src, "r+b") as f:
                f.seek(1 * MiB)
                f.write(b"\x5a" * 65536)
                f.seek(3145733)
                f.write(b"\xa5" * 12345)
                f.seek(8 * MiB)
                f.write(bytes(MiB))
            rc, _ = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, tcp], check=False)
            expect_eq(rc, 0, "qemu-img compare after qemu-io writes")

        with checks.check("qemu-img convert the export back to a file"):
            back = os.path.join(work, "back.raw")
            run(["qemu-img", "convert", "-p", "-f", "raw", "-O", "raw", uri, back])
            expect_eq(os.path.getsize(back), SIZE, "converted size")
            expect_eq(sha256_file(back), sha256_file(src), "round-trip sha256")

        with checks.check("qemu-img convert to qcow2 and compare"):
            q = os.path.join(work, "copy.qcow2")
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, q])
            rc, _ = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", q, uri], check=False)
            expect_eq(rc, 0, "qcow2 vs export compare")
        checks.finish()


if __name__ == "__main__":
    main(test)
