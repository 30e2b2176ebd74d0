#!/usr/bin/python3
"""The filesystem story: a deleted file comes back from the export at T.

ext4 on the live export through nbdfuse + loop; files are written, the file
system is unmounted cleanly and T is noted; it is mounted again, files are
deleted and others rewritten, and unmounted. Then `shadowctl export --at T`
is attached read-only through a second nbdfuse + `losetup -r`: `e2fsck -fn`
is clean and, mounted read-only, it holds exactly the files of T with
identical checksums, while the live file system holds the new ones.

Skips (exit 77) when the kernel lacks /dev/fuse or loop devices.
Synchronisation: sd_notify READY=1; nbdfuse's pidfile (inotify).
"""

import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (KiB, MiB, Checks, Daemon, ShadowCtl, expect, log, main,  # noqa: E402
                     make_pool_file, make_rng, run, wait_for_file_written)
from test_filesystem import (Stack, compare_files, require_kernel_features,  # noqa: E402
                             write_files)

SIZE = 64 * MiB
POOL_SIZE = 256 * MiB


def start_nbdfuse_uri(st, fusedir, pidfile, uri, read_only=False):
    os.makedirs(fusedir, exist_ok=True)
    st.fusedir = fusedir
    cmd = ["nbdfuse"] + (["-r"] if read_only else []) + ["-P", pidfile, fusedir, uri]
    log("+ " + " ".join(cmd))
    st.nbdfuse = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    wait_for_file_written(pidfile, st.nbdfuse)
    return os.path.join(fusedir, "nbd")


def test():
    require_kernel_features()
    checks = Checks("restore-fs")
    rng = make_rng("restore-fs")
    before = {f"docs/report{i}.txt": rng.randbytes(rng.randrange(1000, 200 * KiB)) for i in range(8)}
    before["photos/big.bin"] = rng.randbytes(3 * MiB + 123)
    before["notes.txt"] = b"the state at T\n" * 50
    with tempfile.TemporaryDirectory(prefix="shadowd-restore-fs-") as work:
        pool = make_pool_file(os.path.join(work, "pool.img"), POOL_SIZE)
        with Daemon(size=SIZE, checks=checks, pool=pool, pool_init=True,
                    extra_args=["--segment-size", "65536", "--zone-size", "4M"]) as d:
            ctl = ShadowCtl(d)
            live, past = Stack(), Stack()
            mnt = os.path.join(work, "mnt")
            mnt_past = os.path.join(work, "mnt-past")
            try:
                with checks.check("ext4 on the live export, files written, clean umount, T noted"):
                    f = start_nbdfuse_uri(live, os.path.join(work, "fuse"), os.path.join(work, "f.pid"),
                                          f"nbd+unix:///?socket={d.unix_path}")
                    loop = live.losetup(f)
                    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop])
                    live.mount(loop, mnt)
                    write_files(mnt, before)
                    live.umount(mnt)
                    run(["blockdev", "--flushbufs", loop])
                    t = time.time_ns()
                after = dict(before)
                with checks.check("files deleted and rewritten after T"):
                    live.mount(loop, mnt)
                    for rel in ("docs/report1.txt", "photos/big.bin", "notes.txt"):
                        os.unlink(os.path.join(mnt, rel))
                        del after[rel]
                    after["docs/report2.txt"] = rng.randbytes(50 * KiB)
                    after["new.bin"] = rng.randbytes(2 * MiB)
                    write_files(mnt, {k: after[k] for k in ("docs/report2.txt", "new.bin")})
                    live.umount(mnt)
                    run(["blockdev", "--flushbufs", loop])
                with checks.check("the export at T: e2fsck -fn clean, the files of T, identical"):
                    r = ctl.json("export", "--at", f"@{t // 10**9}.{t % 10**9:09d}", "--name", "before")
                    pf = start_nbdfuse_uri(past, os.path.join(work, "fuse-past"),
                                           os.path.join(work, "p.pid"), r["uri_unix"], read_only=True)
                    ploop = past.losetup(pf, read_only=True)
                    run(["e2fsck", "-fn", ploop])
                    past.mount(ploop, mnt_past, "ro,noload")
                    compare_files(mnt_past, before, "export at T")
                    past.umount(mnt_past)
                with checks.check("the live file system holds the new files"):
                    live.mount(loop, mnt)
                    compare_files(mnt, after, "live")
                    live.umount(mnt)
                    expect(before != after, "the test changed something")
            finally:
                past.cleanup()
                live.cleanup()
        checks.finish()


if __name__ == "__main__":
    main(test)
