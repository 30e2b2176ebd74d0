#!/usr/bin/python3
"""fio --ioengine=nbd with --verify=crc32c against a live shadowd.

The nbd engine has a single option, `uri` (see `fio --enghelp=nbd`).
Each job writes with verification headers and then reads everything back
(do_verify=1, verify_fatal=1); fio must exit 0 and report no errors, and
the verify pass must read back as many bytes as were written.

Synchronisation: sd_notify READY=1; fio runs to completion.
"""

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import MiB, Checks, Daemon, expect, expect_eq, main, run  # noqa: E402

SIZE = 128 * MiB


def fio_job(work, name, uri, extra):
    out = os.path.join(work, f"{name}.json")
    rc, text = run(["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}",
                    "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                    "--randrepeat=1", "--verify_state_save=0", "--output-format=json",
                    f"--output={out}", *extra],
                   check=False, cwd=work)
    text = ""
    if os.path.exists(out):
        with open(out) as f:
            text = f.read()
    if rc != 0:
        print(text, flush=True)
    expect_eq(rc, 0, f"fio {name} exit code")
    expect("{" in text, f"fio {name} wrote no JSON report")
    # fio may print informational lines before the JSON document.
    j = json.loads(text[text.index("{"):])
    for job in j["jobs"]:
        expect_eq(job["error"], 0, f"fio job {job['jobname']} error")
        w = job["write"]["io_bytes"]
        r = job["read"]["io_bytes"]
        expect(w > 0, f"fio job {job['jobname']} wrote nothing")
        expect_eq(r, w, f"fio job {job['jobname']}: bytes verified vs written")
    return j


def test():
    checks = Checks("fio")
    with tempfile.TemporaryDirectory(prefix="shadowd-fio-") as work, \
            Daemon(size=SIZE, checks=checks) as d:
        with checks.check("fio nbd randwrite 4k iodepth 16 + crc32c verify (unix)"):
            fio_job(work, "randwrite4k", d.uri_unix,
                    ["--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=64m"])
        with checks.check("fio nbd sequential write 1M iodepth 8 + crc32c verify (tcp)"):
            fio_job(work, "seqwrite1m", d.uri_tcp,
                    ["--rw=write", "--bs=1M", "--iodepth=8", f"--size={SIZE // MiB}m"])
        with checks.check("fio nbd randwrite mixed sizes 512..128k iodepth 32 + verify"):
            fio_job(work, "randwritemixed", d.uri_unix,
                    ["--rw=randwrite", "--bsrange=512-128k", "--iodepth=32",
                     "--offset=16m", "--size=32m"])
        # The nbd engine maps fsync to NBD_CMD_FLUSH (it has no fdatasync).
        with checks.check("fio nbd randwrite with a flush every 8 writes + verify"):
            fio_job(work, "randwriteflush", d.uri_unix,
                    ["--rw=randwrite", "--bs=8k", "--iodepth=16", "--fsync=8",
                     "--offset=64m", "--size=16m"])
        checks.finish()


if __name__ == "__main__":
    main(test)
