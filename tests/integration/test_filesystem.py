#!/usr/bin/python3
"""A real filesystem on the export: nbdfuse + losetup + mkfs.ext4 + mount.

nbdfuse exposes the export as a file, a loop device is attached to it, an
ext4 filesystem is made and mounted, files with random content are written,
the filesystem is unmounted, the loop device re-attached (so nothing is
served from cache) and checked with `e2fsck -fn`, remounted, and the files
are compared.  Finally, with everything detached, the backing file
itself is checked with e2fsck and loop-mounted read-only to compare the
files again (the data really reached the backing store).

Skips (exit 77) only when the kernel lacks what it needs: /dev/fuse, loop
devices, or the privilege to mount.

Synchronisation: sd_notify READY=1 for shadowd; nbdfuse writes its pidfile
(-P) right after the FUSE mount is established, and the test blocks on an
inotify event for that file (no polling, no sleeps).  Cleanup (umount,
losetup -d, fusermount3 -u) always runs, in finally blocks.
"""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (KiB, MiB, Checks, Daemon, SkipTest, expect, expect_eq, log,  # noqa: E402
                     main, make_rng, run, sha256_bytes, wait_for_file_written, wait_process)

SIZE = 64 * MiB


def require_kernel_features():
    if os.geteuid() != 0:
        raise SkipTest("mounting needs root")
    if not os.path.exists("/dev/fuse"):
        raise SkipTest("/dev/fuse is missing (no FUSE in this kernel/container)")
    if not os.path.exists("/dev/loop-control"):
        raise SkipTest("/dev/loop-control is missing (no loop devices)")
    rc = subprocess.run(["losetup", "-f"], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL).returncode
    if rc != 0:
        raise SkipTest("no free loop device (losetup -f failed)")


def make_files(rng):
    files = {}
    sizes = [0, 1, 511, 4096, 4097, 65536 + 3, 300 * KiB, 1 * MiB, 3 * MiB + 17, 5 * MiB]
    for i, sz in enumerate(sizes):
        files[f"file{i:02d}.bin"] = rng.randbytes(sz)
    for i in range(40):
        files[f"dir{i % 4}/small{i:02d}.dat"] = rng.randbytes(rng.randrange(0, 20000))
    files["deep/a/b/c/d/leaf.txt"] = b"hello from shadowd\n" * 100
    return files


def write_files(root, files):
    for rel, data in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def compare_files(root, files, what):
    found = set()
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), root)
            if rel.startswith("lost+found"):
                continue
            found.add(rel)
    expect_eq(sorted(found), sorted(files), f"{what}: file list")
    for rel, data in files.items():
        with open(os.path.join(root, rel), "rb") as f:
            got = f.read()
        expect(sha256_bytes(got) == sha256_bytes(data), f"{what}: {rel} content differs")


class Stack:
    """Tracks what is set up so that cleanup can undo exactly that."""

    def __init__(self):
        self.nbdfuse = None
        self.fusedir = None
        self.loops = []
        self.mounts = []

    def umount(self, mnt):
        run(["umount", mnt])
        self.mounts.remove(mnt)

    def mount(self, dev, mnt, opts=None):
        os.makedirs(mnt, exist_ok=True)
        cmd = ["mount", "-t", "ext4"] + (["-o", opts] if opts else []) + [dev, mnt]
        run(cmd)
        self.mounts.append(mnt)

    def losetup(self, path, read_only=False):
        _, out = run(["losetup", "-f", "--show"] + (["-r"] if read_only else []) + [path])
        dev = out.strip().splitlines()[-1]
        expect(dev.startswith("/dev/loop"), f"unexpected losetup output {out!r}")
        self.loops.append(dev)
        return dev

    def detach(self, dev):
        run(["losetup", "-d", dev])
        self.loops.remove(dev)

    def start_nbdfuse(self, fusedir, pidfile, sock):
        os.makedirs(fusedir, exist_ok=True)
        self.fusedir = fusedir
        cmd = ["nbdfuse", "-P", pidfile, fusedir, "--unix", sock]
        log("+ " + " ".join(cmd))
        self.nbdfuse = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        # nbdfuse writes the pidfile right after fuse_mount() succeeds.
        wait_for_file_written(pidfile, self.nbdfuse)
        return os.path.join(fusedir, "nbd")

    def stop_nbdfuse(self):
        run(["fusermount3", "-u", self.fusedir])
        rc = wait_process(self.nbdfuse, 60)
        self.nbdfuse = None if rc is not None else self.nbdfuse
        expect(rc is not None, "nbdfuse did not exit after fusermount3 -u")
        expect_eq(rc, 0, "nbdfuse exit code")

    def cleanup(self):
        for mnt in reversed(list(self.mounts)):
            subprocess.run(["umount", mnt])
            subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL)
        for dev in reversed(list(self.loops)):
            subprocess.run(["losetup", "-d", dev])
        if self.nbdfuse is not None:
            subprocess.run(["fusermount3", "-u", self.fusedir])
            if wait_process(self.nbdfuse, 30) is None:
                subprocess.run(["fusermount3", "-u", "-z", self.fusedir])
                self.nbdfuse.kill()
                self.nbdfuse.wait()


def test():
    require_kernel_features()
    checks = Checks("filesystem")
    rng = make_rng("filesystem")
    files = make_files(rng)
    with Daemon(size=SIZE, checks=checks) as d:
        st = Stack()
        try:
            fusedir = os.path.join(d.tmpdir, "fuse")
            mnt = os.path.join(d.tmpdir, "mnt")
            pidfile = os.path.join(d.tmpdir, "nbdfuse.pid")
            with checks.check("nbdfuse exposes the export as a file"):
                nbdfile = st.start_nbdfuse(fusedir, pidfile, d.unix_path)
                expect_eq(os.path.getsize(nbdfile), SIZE, "nbdfuse file size")
            if checks.failures:
                raise AssertionError("nbdfuse did not come up")
            with checks.check("losetup + mkfs.ext4 + mount + write files + umount"):
                loop = st.losetup(nbdfile)
                run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop])
                st.mount(loop, mnt)
                write_files(mnt, files)
                run(["sync", "-f", mnt])
                compare_files(mnt, files, "before umount")
                st.umount(mnt)
            with checks.check("re-attach the loop device (drops cached blocks), e2fsck -fn clean"):
                # Detaching flushes the loop device; re-opening the nbdfuse
                # file drops its page cache, so what follows reads through
                # nbdfuse from shadowd.
                st.detach(loop)
                loop = st.losetup(nbdfile)
                run(["blockdev", "--flushbufs", loop])
                run(["e2fsck", "-fn", loop])
            with checks.check("remount, files compare equal, fstrim"):
                st.mount(loop, mnt)
                compare_files(mnt, files, "after remount")
                # Delete one file and fstrim: TRIM goes to the export
                # through loop (discard) and nbdfuse, if they pass it on.
                os.unlink(os.path.join(mnt, "file09.bin"))
                del files["file09.bin"]
                subprocess.run(["fstrim", "-v", mnt])
                st.umount(mnt)
                run(["e2fsck", "-fn", loop])
            with checks.check("detach loop device and unmount nbdfuse cleanly"):
                st.detach(loop)
                st.stop_nbdfuse()
            with checks.check("backing file itself: e2fsck clean, files equal"):
                run(["e2fsck", "-fn", d.backing])
                loop2 = st.losetup(d.backing, read_only=True)
                st.mount(loop2, mnt, "ro,noload")
                compare_files(mnt, files, "backing file")
                st.umount(mnt)
                st.detach(loop2)
        finally:
            st.cleanup()
        checks.finish()


if __name__ == "__main__":
    main(test)
