#!/usr/bin/python3
"""SIGHUP reloads the run-time tunables from the config file.

The daemon answers SIGHUP with sd_notify RELOADING=1 and, once the new
values are in force, READY=1: the test waits for that datagram, then reads
the values back through `shadowctl config get`. A broken file changes
nothing and the daemon keeps serving.

Synchronisation: sd_notify datagrams and shadowctl replies only.
"""

import json
import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Checks, Daemon, expect_eq, main, shadowctl_path  # noqa: E402


def config_get(ctl_path, key):
    out = subprocess.run([shadowctl_path(), "--socket", ctl_path, "--json", "config", "get", key],
                         check=True, stdout=subprocess.PIPE, timeout=60).stdout
    reply = json.loads(out)
    expect_eq(reply.get("key"), key, "config get reply key")
    return reply["value"]


def hup_and_wait(d):
    d.proc.send_signal(signal.SIGHUP)
    d._wait_ready()  # RELOADING=1 first, then READY=1 when done


def write_config(path, **values):
    with open(path, "w") as f:
        json.dump(values, f)


def main_test():
    checks = Checks("reload")
    import tempfile
    tmp = tempfile.mkdtemp(prefix="shadowd-reload-")
    cfg = os.path.join(tmp, "shadowd.json")
    write_config(cfg, alpha=1.0, beta=2.0)
    try:
        with Daemon(extra_args=["--config", cfg]) as d:
            ctl = d.control_path
            with checks.check("initial values come from the file"):
                expect_eq(float(config_get(ctl, "alpha")), 1.0, "alpha")
                expect_eq(float(config_get(ctl, "beta")), 2.0, "beta")
            with checks.check("SIGHUP applies the edited file"):
                write_config(cfg, alpha=5.0, beta=0.5, gamma=0.25)
                hup_and_wait(d)
                expect_eq(float(config_get(ctl, "alpha")), 5.0, "alpha")
                expect_eq(float(config_get(ctl, "beta")), 0.5, "beta")
                expect_eq(float(config_get(ctl, "gamma")), 0.25, "gamma")
            with checks.check("a broken file changes nothing and the daemon keeps serving"):
                with open(cfg, "w") as f:
                    f.write("{not json")
                hup_and_wait(d)
                expect_eq(float(config_get(ctl, "alpha")), 5.0, "alpha after a bad reload")
                d.assert_alive()
    finally:
        if os.path.exists(cfg):
            os.unlink(cfg)
        os.rmdir(tmp)
    checks.finish()


if __name__ == "__main__":
    main(main_test)
