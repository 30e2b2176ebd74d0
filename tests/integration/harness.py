"""Shared harness for the shadowd integration tests.

Every test script imports this module.  It starts a real ``shadowd`` on a
sparse backing file in a private temporary directory and waits for it to be
ready through the sd_notify protocol: the harness binds an AF_UNIX datagram
socket, passes its path in ``NOTIFY_SOCKET`` and blocks until a datagram
containing ``READY=1`` arrives.  Nothing here sleeps to synchronise; every
wait is on an event (a datagram, a process exit, an inotify event), bounded
by a generous deadline that only exists to turn a hang into a failure.

Environment:
  SHADOWD                path of the shadowd binary (set by ctest)
  SHADOWCTL              path of the shadowctl binary (set by ctest)
  SHADOWD_TEST_LOG_LEVEL log level passed to shadowd (default "info")
  SHADOWD_TEST_KEEP      if set, keep the temporary directory (and RBD image)
  SHADOWD_TEST_RBD_CONF  with SHADOWD_TEST_RBD_POOL: serve RBD images, not
  SHADOWD_TEST_RBD_POOL  files (see "RBD backing" below)
  SHADOWD_TEST_RBD_OBJECT_SIZE  the images' object size (rbd import
                         --object-size; default Ceph's, 4 MiB)

A daemon with a shadow pool: make_pool_file() preallocates a pool file,
Daemon(pool=..., pool_init=True) passes --pool/--init, Daemon.crash() kills
it with SIGKILL (a crash, not a failure of the test), ShadowCtl runs the real
shadowctl against the daemon's control socket, run_shadowd() runs a shadowd
that is expected to refuse to start, and wait_until() polls a condition of
the daemon's background threads with a deadline.

RBD backing (opt-in): with SHADOWD_TEST_RBD_CONF (a ceph.conf) and
SHADOWD_TEST_RBD_POOL (a pool with the rbd application) both set, a Daemon
the test gives no ``backing=`` still makes its sparse file (and runs
``init_backing`` on it), then `rbd import`s it into a new, uniquely named
image, deletes the file and starts shadowd with ``--backing
rbd:POOL/IMAGE:conf=CONF``; the image is removed when the daemon is done
with.  ``d.backing`` is then that rbd: spec, not a path: tests look at the
backing through ``d.read_backing()``, ``d.backing_sha256()``,
``d.backing_size()`` and ``d.backing_allocated()`` (the rbd CLI under RBD),
and ``d.backing_is_rbd`` tells them apart.  tests/ceph/test_rbd_suites.py
runs the NBD client tests this way against a throwaway cluster.
"""

import contextlib
import ctypes
import ctypes.util
import hashlib
import json as _json  # ShadowCtl has a method named json
import os
import random
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Failure guards, not synchronisation: nothing waits for these to elapse in a
# passing run.
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

SKIP = 77  # ctest SKIP_RETURN_CODE, for genuinely missing kernel features

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))


def log(*args):
    print(*args, flush=True)


def shadowd_path():
    p = os.environ.get("SHADOWD") or os.path.join(_REPO, "build", "daemon", "shadowd")
    if not os.access(p, os.X_OK):
        raise RuntimeError(f"shadowd binary not found or not executable: {p} "
                           "(set SHADOWD)")
    return p


def shadowctl_path():
    return os.environ.get("SHADOWCTL") or os.path.join(_REPO, "build", "ctl", "shadowctl")


def free_tcp_port(host="127.0.0.1"):
    """Bind port 0 to let the kernel pick a free port and return it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return s.getsockname()[1]


def sha256_file(path, chunk=4 * MiB):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_bytes(b):
    return hashlib.sha256(b).hexdigest()


def make_rng(name):
    """Seeded RNG; the seed is printed so that a failure can be replayed.

    SHADOWD_TEST_SEED overrides the seed.
    """
    seed = os.environ.get("SHADOWD_TEST_SEED")
    seed = int(seed) if seed else random.SystemRandom().randrange(1 << 32)
    log(f"[{name}] random seed: {seed}  (replay with SHADOWD_TEST_SEED={seed})")
    return random.Random(seed)


def random_bytes(rng, n):
    return rng.randbytes(n)


def write_random_file(path, size, rng, chunk=1 * MiB):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(rng.randbytes(n))
            left -= n


def run(cmd, check=True, timeout=600, **kw):
    """Run a command, echo it and its output; raise with output on failure."""
    log("+ " + " ".join(str(c) for c in cmd))
    p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout, **kw)
    out = p.stdout.decode(errors="replace")
    if out.strip():
        log(out.rstrip())
    if check and p.returncode != 0:
        raise AssertionError(f"command failed with exit {p.returncode}: {cmd}")
    return p.returncode, out


# --------------------------------------------------------------------------
# inotify + pidfd: event-driven waits without polling loops


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_CLOEXEC = 0o2000000


def wait_for_file_written(path, proc=None, timeout=READY_TIMEOUT):
    """Block until ``path`` exists and has been closed after writing.

    Uses inotify on the parent directory (no polling).  If ``proc`` (a
    subprocess.Popen) exits first, raise.  Used for programs that announce
    readiness by writing a pidfile (nbdfuse -P).
    """
    d, name = os.path.split(os.path.abspath(path))
    fd = _libc.inotify_init1(IN_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    pidfd = -1
    try:
        wd = _libc.inotify_add_watch(fd, d.encode(), IN_CLOSE_WRITE | IN_MOVED_TO)
        if wd < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")
        if proc is not None:
            pidfd = os.pidfd_open(proc.pid)
        # The watch is in place; a file written before it was added is
        # caught here (non-empty means the writer already closed it for
        # writers like nbdfuse that write then close).
        if os.path.exists(path) and os.path.getsize(path) > 0:
            return
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out waiting for {path}")
            fds = [fd] + ([pidfd] if pidfd >= 0 else [])
            r, _, _ = select.select(fds, [], [], left)
            if pidfd in r:
                if os.path.exists(path) and os.path.getsize(path) > 0:
                    return
                raise RuntimeError(f"process {proc.args!r} exited with "
                                   f"{proc.wait()} before writing {path}")
            if fd in r:
                buf = os.read(fd, 65536)
                off = 0
                while off < len(buf):
                    _wd, _mask, _cookie, ln = struct.unpack_from("iIII", buf, off)
                    nm = buf[off + 16:off + 16 + ln].rstrip(b"\0").decode()
                    off += 16 + ln
                    if nm == name:
                        return
    finally:
        os.close(fd)
        if pidfd >= 0:
            os.close(pidfd)


def wait_process(proc, timeout):
    """Wait for a Popen to exit; return its exit code or None on timeout."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _proc_stat_fields(pid):
    """/proc/PID/stat after the command name (state, ppid, ...), or None if
    the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_state(pid):
    """The state letter of a process (R, S, Z, ...) or None if it is gone."""
    fields = _proc_stat_fields(pid)
    return fields[0] if fields else None


def proc_cmdline(pid):
    """A process's arguments joined by spaces ("" if it is gone, or a zombie)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def pid_alive(pid):
    """Running: a zombie (PID 1 may reap exited processes late) is not."""
    st = proc_state(pid)
    return st is not None and st not in ("Z", "X")


def children_of(pid):
    """The pids whose parent is pid."""
    kids = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            fields = _proc_stat_fields(e)
            if fields and int(fields[1]) == pid:
                kids.append(int(e))
    return kids


# --------------------------------------------------------------------------
# RBD images as the backing (SHADOWD_TEST_RBD_CONF / SHADOWD_TEST_RBD_POOL)


RBD_TIMEOUT = 120  # one rbd command: a failure guard


def rbd_target():
    """(conf, pool) when the tests are to run on RBD images, else None."""
    conf = os.environ.get("SHADOWD_TEST_RBD_CONF")
    pool = os.environ.get("SHADOWD_TEST_RBD_POOL")
    if not conf and not pool:
        return None
    if not (conf and pool):
        raise RuntimeError("set both SHADOWD_TEST_RBD_CONF and SHADOWD_TEST_RBD_POOL, or neither")
    return conf, pool


def rbd_cli(conf, *args, timeout=RBD_TIMEOUT, quiet=False):
    """Run rbd -c CONF ARGS; return stdout (bytes); raise with stderr on failure."""
    cmd = ["rbd", "-c", conf, *[str(a) for a in args]]
    if not quiet:
        log("+ " + " ".join(cmd))
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed with exit {p.returncode}: "
                             f"{p.stderr.decode(errors='replace').strip()}")
    return p.stdout


_rbd_images_made = 0


def _new_rbd_image_name(prefix):
    global _rbd_images_made
    _rbd_images_made += 1
    return f"{prefix}-{os.getpid()}-{_rbd_images_made}-{secrets.token_hex(3)}"


# --------------------------------------------------------------------------
# The daemon


class DaemonError(AssertionError):
    pass


class Daemon:
    """A running shadowd on a private sparse backing file.

    with Daemon(size=64 * MiB) as d:
        d.unix_path, d.port, d.uri_unix, d.uri_tcp, d.backing

    backing=False starts it without --backing (for --restore-from).

    With SHADOWD_TEST_RBD_CONF/SHADOWD_TEST_RBD_POOL set and no backing=,
    the sparse file becomes an RBD image (module docstring); the
    read_backing()/backing_*() helpers look at the backing either way.
    """

    def __init__(self, size=64 * MiB, read_only=False, extra_args=(),
                 export_name=None, description=None, tcp=True, unix=True,
                 backing=None, init_backing=None, name="shadowd",
                 check_exit=True, checks=None, pidfile=False,
                 pool=None, pool_init=False, pool_force=False, metrics=False):
        self.size = size
        self.read_only = read_only
        self.extra_args = list(extra_args)
        self.export_name = export_name
        self.description = description
        self.want_tcp = tcp
        self.want_unix = unix
        self._backing_arg = backing
        self.init_backing = init_backing
        self.name = name
        self.check_exit = check_exit
        self.checks = checks
        self.want_pidfile = pidfile
        self.pidfile = None
        # Shadow pool: a path or a list of paths (tier order); --init, --force.
        if isinstance(pool, (list, tuple)):
            self.pool = list(pool)
        else:
            self.pool = [pool] if pool else []
        self.pool_init = pool_init
        self.pool_force = pool_force
        self.want_metrics = metrics
        self.metrics_port = None
        self.crashed = False  # crash() killed it on purpose
        self._failures_at_start = len(checks.failures) if checks else 0
        self.proc = None
        self.notify_messages = []
        self.returncode = None
        self._stderr_dumped = False
        self.rbd_conf = None
        self.rbd_image = None  # "POOL/IMAGE" of the image made for this daemon

    # --- properties
    @property
    def export(self):
        return "disk" if self.export_name is None else self.export_name

    @property
    def uri_unix(self):
        return f"nbd+unix:///{self.export}?socket={self.unix_path}"

    @property
    def uri_tcp(self):
        return f"nbd://127.0.0.1:{self.port}/{self.export}"

    # --- lifecycle
    def __enter__(self):
        self.tmpdir = tempfile.mkdtemp(prefix="shadowd-it-")
        try:
            self._start()
        except BaseException:
            self.dump_stderr("daemon failed to start")
            self._kill()
            self._cleanup_dir()
            raise
        return self

    def _start(self):
        if self._backing_arg is False:  # no --backing at all (--restore-from)
            self.backing = None
        elif self._backing_arg is None:
            self.backing = os.path.join(self.tmpdir, "backing.img")
            with open(self.backing, "wb") as f:
                f.truncate(self.size)  # sparse
            if self.init_backing is not None:
                self.init_backing(self.backing)
            target = rbd_target()
            if target is not None:
                self._backing_to_rbd(*target)
        else:
            self.backing = self._backing_arg
        self.unix_path = os.path.join(self.tmpdir, "nbd.sock") if self.want_unix else None
        self.port = free_tcp_port() if self.want_tcp else None
        self.stderr_path = os.path.join(self.tmpdir, "shadowd.stderr")
        self.notify_path = os.path.join(self.tmpdir, "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.notify.bind(self.notify_path)

        cmd = [shadowd_path()] + (["--backing", self.backing] if self.backing else []) + [
            "--foreground", "--log-level", os.environ.get("SHADOWD_TEST_LOG_LEVEL", "info")]
        if self.unix_path:
            cmd += ["--unix", self.unix_path]
        if self.port:
            cmd += ["--listen", f"127.0.0.1:{self.port}"]
        if self.export_name is not None:
            cmd += ["--export-name", self.export_name]
        if self.description is not None:
            cmd += ["--description", self.description]
        if self.read_only:
            cmd += ["--read-only"]
        if self.want_pidfile:
            self.pidfile = os.path.join(self.tmpdir, "shadowd.pid")
            cmd += ["--pidfile", self.pidfile]
        if self.pool:
            cmd += ["--pool", ",".join(self.pool)]
            if self.pool_init:
                cmd += ["--init"]
            if self.pool_force:
                cmd += ["--force"]
        if self.want_metrics:
            self.metrics_port = free_tcp_port()
            cmd += ["--metrics-listen", f"127.0.0.1:{self.metrics_port}"]
        if "--control" not in self.extra_args:
            # Private control socket: tests run in parallel, each daemon its own.
            self.control_path = os.path.join(self.tmpdir, "control.sock")
            cmd += ["--control", self.control_path]
        else:
            self.control_path = self.extra_args[self.extra_args.index("--control") + 1]
        cmd += self.extra_args
        self.cmd = cmd
        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = self.notify_path
        env.pop("LISTEN_FDS", None)
        env.pop("LISTEN_PID", None)
        log(f"[{self.name}] starting: {' '.join(cmd)}")
        self._stderr_f = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=self._stderr_f, stderr=self._stderr_f,
                                     env=env, close_fds=True)
        self._wait_ready()
        log(f"[{self.name}] ready (pid {self.proc.pid}); unix={self.unix_path} "
            f"tcp=127.0.0.1:{self.port}")

    def _backing_to_rbd(self, conf, pool):
        """Import the prepared sparse file into a new image (`rbd import`
        skips runs of zeroes: as thin as the file, and as fast as `rbd
        create` for an empty one), then serve the image instead."""
        image = f"{pool}/{_new_rbd_image_name(self.name)}"
        # RBD finds holes in whole objects: SHADOWD_TEST_RBD_OBJECT_SIZE
        # (e.g. 4K) gives the block-status checks a file's granularity.
        osize = os.environ.get("SHADOWD_TEST_RBD_OBJECT_SIZE")
        rbd_cli(conf, "import", "--no-progress", *(["--object-size", osize] if osize else []),
                self.backing, image)
        self.rbd_conf = conf
        self.rbd_image = image
        os.unlink(self.backing)  # nothing may read a stale copy
        self.backing = f"rbd:{image}:conf={conf}"
        log(f"[{self.name}] backing: RBD image {image}")

    @property
    def backing_is_rbd(self):
        return self.rbd_image is not None

    def read_backing(self, offset=0, length=None):
        """The backing's bytes [offset, offset+length) (to its end without
        length): a read of the file, or under RBD an `rbd export` of the
        whole image (it opens it read-only: shadowd keeps its lock)."""
        if not self.backing_is_rbd:
            with open(self.backing, "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        data = rbd_cli(self.rbd_conf, "export", "--no-progress", self.rbd_image, "-", quiet=True)
        return data[offset:] if length is None else data[offset:offset + length]

    def backing_sha256(self):
        if not self.backing_is_rbd:
            return sha256_file(self.backing)
        return sha256_bytes(self.read_backing())

    def backing_size(self):
        """The file's st_size or the image's size."""
        if not self.backing_is_rbd:
            return os.stat(self.backing).st_size
        return _json.loads(rbd_cli(self.rbd_conf, "info", "--format", "json", self.rbd_image,
                                   quiet=True))["size"]

    def backing_allocated(self):
        """Bytes of the backing that hold storage: the file's blocks, or the
        extents `rbd diff` lists (per object extent; objects of 4 MiB by default)."""
        if not self.backing_is_rbd:
            return os.stat(self.backing).st_blocks * 512
        rows = _json.loads(rbd_cli(self.rbd_conf, "diff", "--format", "json", self.rbd_image,
                                   quiet=True))
        return sum(r["length"] for r in rows if r.get("exists") in (True, "true"))

    def _remove_rbd_image(self):
        if self.rbd_image is None:
            return
        if os.environ.get("SHADOWD_TEST_KEEP"):
            log(f"[{self.name}] keeping RBD image {self.rbd_image}")
            return
        try:
            rbd_cli(self.rbd_conf, "rm", "--no-progress", self.rbd_image)
        except Exception as e:  # noqa: BLE001 — a leftover image in a throwaway cluster
            log(f"[{self.name}] could not remove RBD image {self.rbd_image}: {e}")

    def _recv_notify(self, timeout):
        """Wait for one notify datagram or the daemon's exit.

        Returns the message, or None if the daemon exited.
        """
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            r, _, _ = select.select([self.notify, pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
        if self.notify in r:
            msg = self.notify.recv(65536).decode(errors="replace")
            self.notify_messages.append(msg)
            return msg
        if r:
            return None
        raise TimeoutError("timed out waiting for an sd_notify message")

    def _wait_ready(self):
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonError(f"shadowd sent no READY=1 within {READY_TIMEOUT}s")
            msg = self._recv_notify(left)
            if msg is None:
                rc = self.proc.wait()
                raise DaemonError(f"shadowd exited with {rc} before READY=1")
            if "READY=1" in msg.split("\n"):
                return

    def drain_notify(self):
        """Collect notify messages already queued (non-blocking)."""
        while True:
            try:
                msg = self.notify.recv(65536, socket.MSG_DONTWAIT).decode(errors="replace")
            except BlockingIOError:
                return
            self.notify_messages.append(msg)

    def stop(self, sig=signal.SIGTERM):
        """Signal the daemon and wait for it to exit; return the exit code."""
        if self.proc is None or self.returncode is not None:
            return self.returncode
        self.proc.send_signal(sig)
        rc = wait_process(self.proc, STOP_TIMEOUT)
        if rc is None:
            self.proc.kill()
            self.proc.wait()
            self.returncode = "hung"
            raise DaemonError(f"shadowd did not exit within {STOP_TIMEOUT}s of {sig!r}")
        self.returncode = rc
        self.drain_notify()
        return rc

    def crash(self, sig=signal.SIGKILL):
        """Kill the daemon with ``sig`` (default SIGKILL: no clean-up at all)
        and wait for it to be gone; return the exit code.  Leaving the
        ``with`` block afterwards is not a failure."""
        self.proc.send_signal(sig)
        rc = wait_process(self.proc, STOP_TIMEOUT)
        if rc is None:
            self.proc.kill()
            rc = self.proc.wait()
        self.returncode = rc
        self.crashed = True
        self.drain_notify()
        return rc

    @property
    def metrics_url(self):
        return f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def assert_alive(self):
        if not self.alive():
            raise DaemonError(f"shadowd died (exit {self.proc.poll()})")

    def stderr_text(self):
        try:
            # No stderr_path yet: it failed before starting shadowd.
            with open(getattr(self, "stderr_path", None) or os.devnull, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def dump_stderr(self, why):
        if self._stderr_dumped:
            return
        self._stderr_dumped = True
        text = self.stderr_text()
        lines = text.splitlines()
        if len(lines) > 400:
            lines = lines[:100] + [f"... ({len(lines) - 300} lines omitted) ..."] + lines[-200:]
        sys.stderr.write(f"===== shadowd stderr ({why}) =====\n")
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.write("===== end of shadowd stderr =====\n")
        sys.stderr.flush()

    def _kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _cleanup_dir(self):
        try:
            self.notify.close()
        except Exception:
            pass
        try:
            self._stderr_f.close()
        except Exception:
            pass
        self._remove_rbd_image()
        if os.environ.get("SHADOWD_TEST_KEEP"):
            log(f"[{self.name}] keeping {self.tmpdir}")
        else:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb):
        failed = exc_type is not None
        checks_failed = (self.checks is not None and
                         len(self.checks.failures) > self._failures_at_start)
        try:
            if self.proc.poll() is not None and self.returncode is None:
                # Died on its own while the test ran.
                self.returncode = self.proc.returncode
                self.dump_stderr(f"shadowd died during the test, exit {self.returncode}")
                if not failed:
                    raise DaemonError(f"shadowd died during the test (exit {self.returncode})")
            rc = self.stop()
            if self.check_exit and rc != 0 and not self.crashed:
                self.dump_stderr(f"exit code {rc} after SIGTERM")
                if not failed:
                    raise DaemonError(f"shadowd exited with {rc} after SIGTERM, expected 0")
            if failed or checks_failed:
                self.dump_stderr("test failed")
        finally:
            self._kill()
            self._cleanup_dir()
        return False



# --------------------------------------------------------------------------
# The shadow pool and shadowctl


def make_pool_file(path, size):
    """Create a preallocated (posix_fallocate) pool file of ``size`` bytes,
    as an operator would with `fallocate -l`: its blocks are reserved and
    read as zeroes, so it holds no pool superblock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return path


def file_head(path, n=8 * KiB):
    """The first ``n`` bytes of a file (the pool's superblocks live there)."""
    with open(path, "rb") as f:
        return f.read(n)


def run_shadowd(args, timeout=READY_TIMEOUT):
    """Run a shadowd that is expected to exit on its own (a refusal at
    start-up) in the foreground; return (exit code, stdout+stderr).  If it
    starts serving instead it does not exit: killed after ``timeout``, which
    is then a failure."""
    cmd = [shadowd_path(), "--foreground", "--log-level", "info"] + [str(a) for a in args]
    env = dict(os.environ)
    for k in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(k, None)
    log("+ " + " ".join(cmd))
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"shadowd did not exit within {timeout}s: {cmd}")
    out = p.stdout.decode(errors="replace")
    log(f"  exit {p.returncode}: {out.strip()}")
    return p.returncode, out


class ShadowCtl:
    """The real shadowctl against one control socket (--socket PATH)."""

    def __init__(self, path):
        self.path = path if isinstance(path, str) else path.control_path

    def run(self, *args, json_out=True, timeout=60):
        cmd = [shadowctl_path(), "--socket", self.path]
        if json_out:
            cmd.append("--json")
        cmd += [str(a) for a in args]
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
        return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")

    def json(self, *args):
        """Run with --json; the reply must be ok and pure JSON."""
        rc, out, err = self.run(*args)
        if rc != 0:
            raise AssertionError(f"shadowctl --json {' '.join(map(str, args))}: exit {rc}: "
                                 f"{err.strip()} {out.strip()}")
        reply = _json.loads(out)
        if reply.get("ok") is not True:
            raise AssertionError(f"shadowctl {' '.join(map(str, args))}: reply {reply}")
        return reply

    def text(self, *args):
        """Run the human-readable form; it must exit 0; return stdout."""
        rc, out, err = self.run(*args, json_out=False)
        if rc != 0:
            raise AssertionError(f"shadowctl {' '.join(map(str, args))}: exit {rc}: "
                                 f"{err.strip()} {out.strip()}")
        return out

    def fails(self, code, *args):
        """Run with --json a command the daemon must refuse with ``code``:
        exit 1, the code on stderr and in the JSON reply."""
        rc, out, err = self.run(*args)
        if rc != 1:
            raise AssertionError(f"shadowctl {' '.join(map(str, args))}: exit {rc}, want 1 "
                                 f"({err.strip()})")
        reply = _json.loads(out)
        if reply.get("ok") is not False or reply.get("code") != code or code not in err:
            raise AssertionError(f"shadowctl {' '.join(map(str, args))}: want code {code}, "
                                 f"got {reply} / {err.strip()!r}")
        return reply


def scrape(url):
    """name{labels} -> value of a Prometheus text page (no HELP/TYPE)."""
    import urllib.request
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def wait_until(pred, what, timeout=READY_TIMEOUT, interval=0.02):
    """Poll ``pred()`` until it returns a true value and return that value.

    Only for conditions that a background thread of the daemon brings about
    and that announce themselves nowhere; ``timeout`` is a failure guard that
    a passing run never reaches."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------
# Test running


class TestFailures(AssertionError):
    pass


class Checks:
    """Run named sub-checks, keep going after a failure, summarise at the end."""

    def __init__(self, name):
        self.name = name
        self.failures = []
        self.passed = []

    @contextlib.contextmanager
    def check(self, what):
        log(f"--- {what}")
        try:
            yield
        except Exception as e:  # noqa: BLE001 — report and continue
            self.failures.append((what, e))
            log(f"FAIL: {what}: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
        else:
            self.passed.append(what)
            log(f"ok: {what}")

    def finish(self):
        log(f"===== {self.name}: {len(self.passed)} passed, {len(self.failures)} failed")
        for what, e in self.failures:
            log(f"  FAILED: {what}: {type(e).__name__}: {e}")
        if self.failures:
            raise TestFailures(f"{len(self.failures)} check(s) failed")


def main(fn):
    """Entry point wrapper: exit 0 on success, 1 on failure, 77 on skip."""
    try:
        rc = fn()
    except SkipTest as e:
        log(f"SKIP: {e}")
        sys.exit(SKIP)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    sys.exit(rc or 0)


class SkipTest(Exception):
    pass


def expect_clean_refusal(e, what):
    """An nbd.Error from a request the server had to refuse must be a proper
    NBD error reply or a clean close of the connection, never a protocol
    violation (libnbd reports those as EPROTO, e.g. a reply it cannot match
    to a request it has finished sending)."""
    import errno as _e
    ok = {_e.EINVAL, _e.EOVERFLOW, _e.ENOMEM, _e.ENOTCONN, _e.ESHUTDOWN, _e.ECONNRESET,
          _e.EPIPE}
    if e.errnum not in ok:
        raise AssertionError(f"{what}: not a clean refusal: {e} (errno {e.errnum})")
    log(f"   {what}: refused cleanly: {e}")


def expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


def expect_eq(got, want, what):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def first_difference(a, b):
    """Offset of the first byte where two images differ (or where the
    shorter one ends); None when they are equal. Keeps a failure message
    short instead of printing whole images."""
    if a == b:
        return None
    n = min(len(a), len(b))
    for i in range(0, n, 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            for j in range(i, min(i + 4096, n)):
                if a[j] != b[j]:
                    return j
    return n


def read_all(h, size=None, chunk=8 * MiB):
    """The whole export (or its first ``size`` bytes) through libnbd handle
    ``h``, read in chunks."""
    size = h.get_size() if size is None else size
    return b"".join(h.pread(min(chunk, size - o), o) for o in range(0, size, chunk))


def write_random_blocks(h, rng, img, count, block=4096, max_blocks=64):
    """``count`` writes of 1..max_blocks random blocks at random block
    offsets through libnbd handle ``h``, also applied to the bytearray
    ``img`` (the test's model of the device)."""
    for _ in range(count):
        n = block * rng.randrange(1, max_blocks)
        off = block * rng.randrange(0, (len(img) - n) // block)
        data = rng.randbytes(n)
        h.pwrite(data, off)
        img[off:off + n] = data


def expect_same_image(got, want, what):
    d = first_difference(got, want)
    if d is not None:
        raise AssertionError(f"{what}: differs at offset {d}")
