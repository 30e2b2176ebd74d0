#!/usr/bin/python3
"""The NBD foundation's client tests with an RBD image as the backing.

One throwaway cluster (memstore) with its pool ("shadowd", made and `rbd
pool init`ed by scripts/ceph-cluster.sh), then each of the integration
scripts below as a subprocess with SHADOWD_TEST_RBD_CONF and
SHADOWD_TEST_RBD_POOL set: every Daemon of theirs that names no backing of
its own serves a fresh image (`rbd import` of the sparse file the test
prepared) through `--backing rbd:POOL/IMAGE:conf=CONF`, and the checks that
look at the backing read it with `rbd export` (tests/integration/harness.py).
SHADOWD and SHADOWCTL pass through. Their output streams through, each line
prefixed with the script's name; the block-status scripts run on images of
4 KiB objects (SUITES); at the end every script that failed is
named, with the seconds each took. Afterwards the pool must be empty: each
Daemon removed its image.

    test_rbd_suites.py [NAME...]   # only these, e.g. nbdinfo libnbd

Synchronisation: each script runs to completion (a per-script deadline is
only a failure guard that ends its process group).
"""

import os
import signal
import subprocess
import sys
import threading
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_INTEGRATION = os.path.join(os.path.dirname(_HERE), "integration")
sys.path.insert(0, _HERE)
from ceph_cluster import CephCluster  # noqa: E402

# name -> (script in tests/integration, the images' object size). RBD
# knows holes in whole objects (the object map, as base:allocation reports
# them): the scripts that check block status hole by hole, as on a file's
# 4 KiB blocks, run on images of 4 KiB objects; the data-path scripts on
# Ceph's default 4 MiB objects.
SUITES = {
    "nbdinfo": ("test_nbdinfo.py", "4K"),
    "libnbd": ("test_libnbd.py", "4K"),
    "raw_protocol": ("test_raw_protocol.py", "4K"),
    "qemu_img": ("test_qemu_img.py", None),
    "nbdcopy": ("test_nbdcopy.py", None),
    "fio": ("test_fio.py", None),
}
# A failure guard per script, not an expectation: each takes seconds (the
# slowest, libnbd on 4 KiB objects, about 30 s); six of them fit in the
# ctest timeout (tests/ceph/CMakeLists.txt), so a hung one is ended here,
# with its shadowd, rather than by ctest, which would leave its session.
SCRIPT_TIMEOUT = 120


def log(*args):
    print(*args, flush=True)


def run_script(name, script, env):
    """Run one script, streaming its output; return (exit code or
    "timeout", seconds)."""
    cmd = [sys.executable, os.path.join(_INTEGRATION, script)]
    log(f"===== {name}: {' '.join(cmd)}")
    t0 = time.monotonic()
    # Its own session: a hung script is ended with its shadowd and clients.
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def pump():
        for line in p.stdout:
            sys.stdout.write(f"[{name}] {line.decode(errors='replace')}")
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = p.wait(timeout=SCRIPT_TIMEOUT)
    except subprocess.TimeoutExpired:
        log(f"===== {name}: still running after {SCRIPT_TIMEOUT} s: ending its process group")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = "timeout"
    reader.join(timeout=30)
    secs = time.monotonic() - t0
    log(f"===== {name}: exit {rc} after {secs:.1f} s")
    return rc, secs


def test():
    names = sys.argv[1:] or list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        log(f"unknown suite(s) {unknown}; known: {list(SUITES)}")
        return 2
    base = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    for var in ("SHADOWD", "SHADOWCTL"):  # the scripts may run elsewhere
        if base.get(var):
            base[var] = os.path.abspath(base[var])
    results = {}
    with CephCluster() as c:
        env = dict(base, SHADOWD_TEST_RBD_CONF=c.conf, SHADOWD_TEST_RBD_POOL=c.pool)
        for name in names:
            script, object_size = SUITES[name]
            env.pop("SHADOWD_TEST_RBD_OBJECT_SIZE", None)
            if object_size:
                env["SHADOWD_TEST_RBD_OBJECT_SIZE"] = object_size
            results[name] = run_script(name, script, env)
        left = c.rbd("ls", c.pool).stdout.decode().split()
    log("===== rbd suites:")
    for name, (rc, secs) in results.items():
        log(f"  {name:<13} {'ok' if rc == 0 else f'FAILED (exit {rc})':<20} {secs:6.1f} s")
    failed = [name for name, (rc, _) in results.items() if rc != 0]
    if left:
        log(f"images left in the pool (a Daemon did not remove its image): {left}")
    if failed:
        log(f"FAILED under RBD: {', '.join(failed)}")
    return 1 if failed or left else 0


if __name__ == "__main__":
    try:
        sys.exit(test())
    except Exception:  # noqa: BLE001 — a cluster that did not start, etc.
        import traceback
        traceback.print_exc()
        sys.exit(1)
