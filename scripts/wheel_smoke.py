"""Profiles the calc workload with an installed middleware wheel: run by make wheels in a fresh venv
of each CPython, and by the wheel test.

  python wheel_smoke.py --calc DIR --out DIR [--build-tree PATH] [--seconds S]

DIR of --calc holds calculations.py (the demo's calc1/calc2/calc3). Fails (exit 1, one line on
stderr) when middleware is imported from the build tree instead of the venv, when the extension
is not found, or when no profile is written; prints one JSON line: the module's path, the
profile files and the calc functions' CPU in the profile (each must be there).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calc", required=True, help="directory holding calculations.py")
    ap.add_argument("--out", required=True, help="local store of the run (created)")
    ap.add_argument("--build-tree", help="the source tree the module must not come from")
    ap.add_argument("--seconds", type=float, default=1.5)
    args = ap.parse_args()

    sys.path.insert(0, args.calc)
    from calculations import calc1, calc2, calc3

    import middleware
    from middleware import MwTracker

    where = os.path.realpath(middleware.__file__)
    if args.build_tree and where.startswith(os.path.realpath(args.build_tree) + os.sep):
        print(f"wheel_smoke: middleware imported from the build tree ({where})", file=sys.stderr)
        return 1
    if not middleware.python_supported():
        print(f"wheel_smoke: middleware says this interpreter is unsupported ({sys.version})", file=sys.stderr)
        return 1
    tracker = MwTracker(profile_dir=args.out, service_name="wheel-smoke", sample_rate=250)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        calc1(150)
        calc2(110)
        calc3(7)
    stats = tracker.stats()
    tracker.stop()
    files = sorted(glob.glob(os.path.join(args.out, "*.pb.gz")))
    if not files:
        print(f"wheel_smoke: no profile written to {args.out} (stats: {stats})", file=sys.stderr)
        return 1
    from middleware.pprof import read_pprof_file  # the reader ships in the wheel too

    cpu_ms: dict[str, float] = {}
    for f in files:
        profile = read_pprof_file(f)
        cpu = profile.value_index("cpu")
        for s in profile.samples:
            for name in {fr.function for fr in s.stack} & {"calc1", "calc2", "calc3"}:
                cpu_ms[name] = round(cpu_ms.get(name, 0.0) + s.values[cpu] / 1e6, 1)
    if set(cpu_ms) != {"calc1", "calc2", "calc3"}:
        print(f"wheel_smoke: the profile lacks calc functions (CPU ms by function: {cpu_ms})", file=sys.stderr)
        return 1
    native = sys.modules["middleware._native"].__file__
    print(json.dumps({"module": where, "native": native, "files": files,
                      "calc_cpu_ms": cpu_ms, "python": sys.version.split()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
