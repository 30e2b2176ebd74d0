#!/usr/bin/python3
"""nbdinfo against a live shadowd: the NBD_OPT_GO path (--json over Unix and
TCP), --list, --map (base:allocation on a sparse backing) and a read-only
export.

Synchronisation: the harness waits for sd_notify READY=1; nbdinfo runs to
completion synchronously.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd  # noqa: E402  (python3-libnbd, /usr/bin/python3)

from harness import (MiB, Checks, Daemon, expect, expect_eq, log, main,  # noqa: E402
                     make_rng, run)

SIZE = 64 * MiB
MAX_PAYLOAD = 32 * MiB


def nbdinfo_json(*args):
    _, out = run(["nbdinfo", "--json", *args])
    return json.loads(out)


def check_export_json(info, export_name, size, read_only=False, description=None):
    expect_eq(info.get("protocol"), "newstyle-fixed", "protocol")
    expect_eq(info.get("structured"), True, "structured replies negotiated")
    exports = info["exports"]
    expect_eq(len(exports), 1, "number of exports in --json")
    e = exports[0]
    expect_eq(e.get("export-name"), export_name, "export-name")
    expect_eq(e.get("export-size"), size, "export-size")
    expect_eq(e.get("is_read_only"), read_only, "is_read_only")
    if description is not None:
        expect_eq(e.get("description"), description, "description")
    if not read_only:
        for k in ("can_flush", "can_fua", "can_trim", "can_zero", "can_cache",
                  "can_multi_conn"):
            expect_eq(e.get(k), True, k)
    expect_eq(e.get("block_size_minimum"), 1, "block_size_minimum")
    expect_eq(e.get("block_size_preferred"), 4096, "block_size_preferred")
    expect_eq(e.get("block_size_maximum"), MAX_PAYLOAD, "block_size_maximum")
    expect("base:allocation" in e.get("contexts", []),
           f"base:allocation missing from contexts {e.get('contexts')}")


def write_via_nbd(uri, extents, rng):
    """Write random data at the given (offset, length) extents, then flush."""
    h = nbd.NBD()
    h.connect_uri(uri)
    for off, ln in extents:
        h.pwrite(rng.randbytes(ln), off)
    h.flush()
    h.shutdown()


def parse_map(out):
    rows = json.loads(out)
    return [(r["offset"], r["length"], r["type"]) for r in rows]


def check_map(rows, size, data_extents):
    """The map covers [0,size) contiguously; written extents are data; any
    byte more than 1 MiB away from written data is a hole (allocation
    granularity of the backing filesystem is well below that)."""
    pos = 0
    for off, ln, typ in rows:
        expect_eq(off, pos, "map extent offset (contiguity)")
        expect(ln > 0, "zero-length map extent")
        pos += ln
    expect_eq(pos, size, "map covers the export")

    def type_at(x):
        for off, ln, typ in rows:
            if off <= x < off + ln:
                return typ
        raise AssertionError(f"offset {x} not covered by the map")

    for off, ln in data_extents:
        for x in (off, off + ln // 2, off + ln - 1):
            t = type_at(x)
            expect(t & 1 == 0, f"written byte at {x} reported as hole (type {t})")
    margin = 1 * MiB
    for probe in range(0, size, 256 * 1024):
        if any(off - margin <= probe < off + ln + margin for off, ln in data_extents):
            continue
        t = type_at(probe)
        expect(t & 1 == 1 and t & 2 == 2,
               f"never-written offset {probe} reported as type {t}, want hole,zero (3)")


def test():
    checks = Checks("nbdinfo")
    rng = make_rng("nbdinfo")
    with Daemon(size=SIZE, description="shadowd test export", checks=checks) as d:
        with checks.check("nbdinfo --json over unix socket"):
            check_export_json(nbdinfo_json(d.uri_unix), "disk", SIZE,
                              description="shadowd test export")
        with checks.check("nbdinfo --json over TCP"):
            check_export_json(nbdinfo_json(d.uri_tcp), "disk", SIZE,
                              description="shadowd test export")
        with checks.check("empty export name selects the default export"):
            info = nbdinfo_json(f"nbd+unix:///?socket={d.unix_path}")
            expect_eq(info["exports"][0].get("export-size"), SIZE, "export-size of ''")
        with checks.check("unknown export name is refused"):
            rc, out = run(["nbdinfo", "--json", f"nbd+unix:///nosuchexport?socket={d.unix_path}"],
                          check=False)
            expect(rc != 0, "nbdinfo succeeded on an unknown export name")
        with checks.check("nbdinfo --list lists the export"):
            _, out = run(["nbdinfo", "--list", f"nbd+unix:///?socket={d.unix_path}"])
            expect('export="disk"' in out, 'export="disk" not in --list output')
            info = json.loads(run(["nbdinfo", "--list", "--json",
                                   f"nbd+unix:///?socket={d.unix_path}"])[1])
            names = [e.get("export-name") for e in info["exports"]]
            expect_eq(names, ["disk"], "exports listed")
            expect_eq(info["exports"][0].get("description"), "shadowd test export",
                      "listed description")
        with checks.check("nbdinfo --list over TCP"):
            _, out = run(["nbdinfo", "--list", f"nbd://127.0.0.1:{d.port}"])
            expect('export="disk"' in out, 'export="disk" not in --list output over TCP')

        data_extents = [(0, 4096), (8 * MiB, 5000), (20 * MiB + 4096, 256 * 1024),
                        (SIZE - 65536, 65536)]
        with checks.check("nbdinfo --map on a fresh sparse export is one hole"):
            rows = parse_map(run(["nbdinfo", "--map", "--json", d.uri_unix])[1])
            check_map(rows, SIZE, [])
        with checks.check("nbdinfo --map after writes reports data vs holes"):
            write_via_nbd(d.uri_unix, data_extents, rng)
            rows = parse_map(run(["nbdinfo", "--map", "--json", d.uri_unix])[1])
            log(f"map: {rows}")
            check_map(rows, SIZE, data_extents)
            _, out = run(["nbdinfo", "--map", d.uri_tcp])
            expect("data" in out and "hole" in out, "text --map lacks data/hole rows")
        with checks.check("nbdinfo --map --totals"):
            _, out = run(["nbdinfo", "--map", "--totals", d.uri_unix])
            expect(out.strip(), "no --totals output")

    with Daemon(size=SIZE, read_only=True, name="shadowd-ro", checks=checks,
                init_backing=lambda p: _fill(p, rng)) as d:
        before = d.backing_sha256()
        with checks.check("read-only export: is_read_only"):
            check_export_json(nbdinfo_json(d.uri_unix), "disk", SIZE, read_only=True)
            check_export_json(nbdinfo_json(d.uri_tcp), "disk", SIZE, read_only=True)
        with checks.check("read-only export: --map and --list work"):
            run(["nbdinfo", "--map", d.uri_unix])
            _, out = run(["nbdinfo", "--list", f"nbd+unix:///?socket={d.unix_path}"])
            expect("is_read_only: true" in out, "--list does not show is_read_only: true")
        with checks.check("read-only backing unchanged"):
            expect_eq(d.backing_sha256(), before, "backing sha256")
        checks.finish()


def _fill(path, rng):
    with open(path, "r+b") as f:
        f.seek(3 * MiB)
        f.write(rng.randbytes(MiB))


if __name__ == "__main__":
    main(test)
