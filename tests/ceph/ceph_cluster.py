"""A throwaway single-node Ceph cluster for tests, as a context manager.

It runs ``scripts/ceph-cluster.sh start`` in a new temporary directory and
``stop`` when the ``with`` block ends, also on an exception::

    from ceph_cluster import CephCluster

    with CephCluster(store="bluestore") as c:
        c.rados("put", "obj", path)                  # rados -c CONF -p shadowd put ...
        c.rbd("create", "-s", "64M", c.image("img")) # rbd -c CONF create ... shadowd/img
        c.stop_osd(kill=True)                        # a crash of the only OSD
        c.start_osd()                                # back, HEALTH_OK, PGs active+clean
        subprocess.run([..., c.rbd_uri("img")])      # rbd:shadowd/img:conf=CONF (qemu)

Attributes once started: ``dir``, ``conf`` (the only file a client needs:
``-c conf``, or CEPH_CONF in ``env()``), ``pool`` ("shadowd"), ``mon``
("127.0.0.1:PORT"), ``fsid``, ``store``, ``start_seconds``.

Stores: "memstore" (default) holds objects in the OSD's memory; the cluster
script turns off the OSD's fast shutdown, so ``stop_osd()`` (SIGTERM) saves
them to the directory and ``start_osd()`` loads them back, but
``stop_osd(kill=True)`` loses them and a later ``start_osd()`` raises
CephClusterError. "bluestore" puts the OSD on a sparse file and keeps every
acknowledged write across a SIGKILL: use it for crash and fault tests.

If the test process dies without leaving the ``with`` block (SIGKILL, a ctest
timeout), a small reaper process outside the test's process tree notices (the
pipe it reads from closes) and stops the cluster, so no daemon outlives the
test. SHADOWD_TEST_KEEP=1 keeps the directory (logs under DIR/log).

Plain /usr/bin/python3, no third-party modules; it takes its /proc helpers
from the integration harness (tests/integration/harness.py).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "integration"))
from harness import pid_alive, proc_cmdline  # noqa: E402
SCRIPT = os.path.join(_REPO, "scripts", "ceph-cluster.sh")

# Failure guards, not synchronisation: a passing run waits for events.
START_TIMEOUT = 120  # seconds for HEALTH_OK after start / start_osd
CLI_TIMEOUT = 120    # one rados/rbd/ceph command


def _log(*args):
    print(*args, flush=True)


class CephClusterError(RuntimeError):
    pass


_REAPER_MARK = "--shadowd-ceph-reaper"
_REAPER = r"""
import os, shutil, signal, subprocess, sys, time
script, d, keep = sys.argv[2], sys.argv[3], sys.argv[4] == "1"
data = b""
while True:
    b = os.read(0, 64)
    if not b:
        break
    data += b


def scripts():
    # ceph-cluster.sh runs on d (a zombie's cmdline is empty)
    out = []
    for e in os.listdir("/proc"):
        if not e.isdigit() or int(e) == os.getpid():
            continue
        try:
            cmd = open(f"/proc/{e}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if (any(c.endswith(b"/ceph-cluster.sh") for c in cmd) and d.encode() in cmd
                and sys.argv[1].encode() not in cmd):
            out.append(int(e))
    return out


if data != b"done":
    # A start or start-osd under way would go on starting daemons: end it
    # first (its EXIT trap stops what it started), then stop the rest.
    for pid in scripts():
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + 120
    while scripts() and time.monotonic() < deadline:
        time.sleep(0.1)
    subprocess.run([script, "stop", d], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    if not keep:
        shutil.rmtree(d, ignore_errors=True)
"""


class CephCluster:
    DAEMONS = ("mon.a", "mgr.x", "osd.0")

    def __init__(self, store="memstore", size="4G", pgs=8, port=None,
                 timeout=START_TIMEOUT, parent_dir=None, keep=None):
        if store not in ("memstore", "bluestore"):
            raise ValueError(f"store must be memstore or bluestore, not {store!r}")
        self.store = store
        self.size = size
        self.pgs = pgs
        self.port = port
        self.timeout = timeout
        self.parent_dir = parent_dir
        self.keep = bool(os.environ.get("SHADOWD_TEST_KEEP")) if keep is None else keep
        self.dir = self.conf = self.pool = self.mon = self.fsid = None
        self.start_seconds = None
        self._reaper_w = None

    # ------------------------------------------------------------ lifecycle

    def _script(self, *args, timeout, check=True):
        cmd = [SCRIPT, *[str(a) for a in args]]
        _log("+ " + " ".join(cmd))
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
        out = p.stdout.decode(errors="replace")
        err = p.stderr.decode(errors="replace")
        for line in err.splitlines():
            _log("  " + line)
        if check and p.returncode != 0:
            raise CephClusterError(
                f"ceph-cluster.sh {args[0]} failed with exit {p.returncode}:\n{err.strip()}")
        return p.returncode, out, err

    def _spawn_reaper(self):
        # Outside the test's process tree (setsid --fork: its parent exits at
        # once), so whatever kills the test and its children leaves it.
        r, w = os.pipe()
        try:
            subprocess.run(["setsid", "--fork", sys.executable, "-c", _REAPER, _REAPER_MARK,
                            SCRIPT, self.dir, "1" if self.keep else "0"],
                           stdin=r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           check=True, timeout=30)
        finally:
            os.close(r)
        self._reaper_w = w  # not inheritable: only this process holds it

    def _dismiss_reaper(self, done=True):
        """done: the cluster is stopped, the reaper has nothing to do;
        otherwise it stops the cluster (and removes the directory) itself."""
        if self._reaper_w is not None:
            try:
                if done:
                    os.write(self._reaper_w, b"done")
            finally:
                os.close(self._reaper_w)
                self._reaper_w = None

    def start(self):
        if not os.access(SCRIPT, os.X_OK):
            raise CephClusterError(f"{SCRIPT} is missing or not executable")
        self.dir = tempfile.mkdtemp(prefix="shadowd-ceph-", dir=self.parent_dir)
        self._spawn_reaper()
        args = ["start", self.dir, "--store", self.store, "--size", self.size,
                "--pgs", self.pgs, "--timeout", int(self.timeout)]
        if self.port:
            args += ["--port", self.port]
        t0 = time.monotonic()
        try:
            _, out, _ = self._script(*args, timeout=self.timeout + 180)
        except BaseException:
            self._teardown(quiet=True)
            raise
        self.start_seconds = time.monotonic() - t0
        env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        try:
            self.conf = env["CEPH_CONF"]
            self.pool = env["CEPH_POOL"]
            self.mon = env["CEPH_MON"]
            self.fsid = env["CEPH_FSID"]
            if env["CEPH_STORE"] != self.store:
                raise CephClusterError(f"asked for {self.store}, got {env['CEPH_STORE']}")
        except KeyError as e:
            self._teardown(quiet=True)
            raise CephClusterError(f"ceph-cluster.sh start printed no {e}: {out!r}") from None
        _log(f"ceph cluster up in {self.start_seconds:.1f} s: {self.store}, mon {self.mon}, "
             f"conf {self.conf}")
        return self

    def stop(self):
        """Stop every daemon and check that none is left; keep the directory."""
        t0 = time.monotonic()
        self._script("stop", self.dir, timeout=180)
        left = self.leftover_processes()
        if left:
            raise CephClusterError(f"processes left after stop: {left}")
        return time.monotonic() - t0

    def _teardown(self, quiet):
        stopped = False
        try:
            if self.dir and os.path.exists(os.path.join(self.dir, "ceph.conf")):
                if quiet:
                    try:
                        self.stop()
                    except Exception as e:  # noqa: BLE001 — the first error matters more
                        _log(f"ceph cluster: stop after a failure also failed: {e}")
                        raise
                else:
                    self.stop()
            stopped = True
        except Exception:
            if not quiet:
                raise
        finally:
            if stopped:
                if self.dir and not self.keep:
                    shutil.rmtree(self.dir, ignore_errors=True)
                elif self.dir:
                    _log(f"ceph cluster: kept {self.dir} (SHADOWD_TEST_KEEP)")
            else:
                _log(f"ceph cluster: not stopped cleanly; its reaper tries again ({self.dir})")
            self._dismiss_reaper(done=stopped)

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        self._teardown(quiet=exc_type is not None)
        return False

    # ------------------------------------------------------------ the OSD

    def stop_osd(self, kill=False):
        """Stop the only OSD: SIGTERM (it tells the mon it goes down, and
        memstore saves its objects) or, with kill=True, SIGKILL (a crash)."""
        self._script("stop-osd", self.dir, *(["--kill"] if kill else []), timeout=120)
        if self.pids().get("osd.0"):
            raise CephClusterError("osd.0 still runs after stop-osd")

    def start_osd(self, timeout=None):
        """Start the OSD again and wait for HEALTH_OK with every PG
        active+clean; return the seconds that took."""
        t = int(timeout or self.timeout)
        t0 = time.monotonic()
        self._script("start-osd", self.dir, "--timeout", t, timeout=t + 120)
        return time.monotonic() - t0

    # ------------------------------------------------------------ looking

    def pids(self):
        """{daemon name: pid} of the daemons that run (zombies do not)."""
        out = {}
        for name in self.DAEMONS:
            try:
                with open(os.path.join(self.dir, "run", f"{name}.pid")) as f:
                    pid = int(f.read().strip())
            except (OSError, ValueError):
                continue
            if pid_alive(pid) and self.conf and self.conf in proc_cmdline(pid):
                out[name] = pid
        return out

    def leftover_processes(self):
        """Live processes (not zombies) whose command line names this
        cluster's directory: none may be left after stop()."""
        left = []
        me = os.getpid()
        for e in os.listdir("/proc"):
            if not e.isdigit() or int(e) == me:
                continue
            cmd = proc_cmdline(int(e))
            if self.dir in cmd and _REAPER_MARK not in cmd and pid_alive(int(e)):
                left.append((int(e), cmd))
        return left

    def rss_kib(self):
        """{daemon name: VmRSS in KiB} of the running daemons."""
        out = {}
        for name, pid in self.pids().items():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            out[name] = int(line.split()[1])
            except OSError:
                pass
        return out

    def status(self):
        """(exit code, text) of ceph-cluster.sh status: 0 all up and HEALTH_OK."""
        rc, out, err = self._script("status", self.dir, timeout=60, check=False)
        return rc, out + err

    def health(self):
        return self.ceph_json("health")["status"]

    # ------------------------------------------------------------ clients

    def env(self):
        """An environment for client programs: CEPH_CONF names the config."""
        return dict(os.environ, CEPH_CONF=self.conf)

    def image(self, name):
        return f"{self.pool}/{name}"

    def rbd_uri(self, name):
        """qemu's name for an image: qemu-img/qemu-nbd -f raw URI."""
        return f"rbd:{self.pool}/{name}:conf={self.conf}"

    def run(self, tool, *args, input=None, timeout=CLI_TIMEOUT, check=True, quiet=False):
        """Run TOOL -c CONF ARGS; return the CompletedProcess (bytes)."""
        cmd = [tool, "-c", self.conf, *[str(a) for a in args]]
        if not quiet:
            _log("+ " + " ".join(cmd))
        p = subprocess.run(cmd, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise CephClusterError(f"{' '.join(cmd)} failed with exit {p.returncode}: "
                                   f"{p.stderr.decode(errors='replace').strip()}")
        return p

    def rados(self, *args, **kw):
        """rados -c CONF -p POOL ARGS"""
        return self.run("rados", "-p", self.pool, *args, **kw)

    def rbd(self, *args, **kw):
        return self.run("rbd", *args, **kw)

    def ceph(self, *args, **kw):
        return self.run("ceph", "--connect-timeout", "30", *args, **kw)

    def ceph_json(self, *args, **kw):
        return json.loads(self.ceph(*args, "--format", "json", quiet=True, **kw).stdout)

    def wait_healthy(self, timeout=None):
        """Poll `ceph -s` until HEALTH_OK, the OSD up and in and every PG
        active+clean; return the seconds it took."""
        t0 = time.monotonic()
        deadline = t0 + (timeout or self.timeout)
        last = None
        while True:
            s = self.ceph_json("-s")
            why = _unhealthy(s)
            if not why:
                return time.monotonic() - t0
            if why != last:
                _log(f"  waiting: {why}")
                last = why
            if time.monotonic() >= deadline:
                raise CephClusterError(f"not healthy after {timeout or self.timeout}s: {why}")
            time.sleep(0.25)


def _unhealthy(s):
    """Why `ceph -s --format json` output is not a healthy cluster, or ''."""
    om = s.get("osdmap", {})
    om = om.get("osdmap", om)
    pg = s.get("pgmap", {})
    states = {x["state_name"]: x["count"] for x in pg.get("pgs_by_state", [])}
    why = []
    if s["health"]["status"] != "HEALTH_OK":
        why.append(s["health"]["status"] + " " + ",".join(sorted(s["health"].get("checks", {}))))
    if not s.get("mgrmap", {}).get("available", False):
        why.append("no active mgr")
    if om.get("num_up_osds") != 1 or om.get("num_in_osds") != 1:
        why.append(f"osds up/in {om.get('num_up_osds')}/{om.get('num_in_osds')}")
    if not pg.get("num_pgs") or states.get("active+clean", 0) != pg.get("num_pgs"):
        why.append(f"pgs {states}")
    return "; ".join(why)
