"""Sampler overhead: the calc workload with and without profiling, side by side.

Each run is a fresh interpreter (so no profiler state leaks between runs); profiled and
unprofiled runs alternate, several rounds; we report the median wall time and the median
process CPU time (all threads, so the sampler's and exporter's CPU counts) and their ratios.

    python bench/overhead.py [--rate 100] [--rounds 7] [--native]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, os.environ["MW_ROOT"])
mode = sys.argv[1]
if mode != "off":
    from middleware import MwTracker
    tracker = MwTracker(sample_rate=int(sys.argv[2]), native=(mode == "native"),
                        profile_dir=sys.argv[3], instrument=False)
from demo_flask.calculations import calc1, calc2, calc3

def work():
    for _ in range(int(sys.argv[4])):
        calc1(260); calc2(260); calc3(8)

calc1(100); calc2(100); calc3(6)  # warm-up (imports, caches)
w0, c0 = time.perf_counter(), time.process_time()
work()
w1, c1 = time.perf_counter(), time.process_time()
out = {"wall": w1 - w0, "cpu": c1 - c0}
if mode != "off":
    out["stats"] = tracker.stats()
    tracker.stop()
print(json.dumps(out))
"""


def run(mode: str, rate: int, store: str, reps: int) -> dict:
    env = dict(os.environ, MW_ROOT=ROOT)
    p = subprocess.run([sys.executable, "-c", CHILD, mode, str(rate), store, str(reps)], capture_output=True,
                       text=True, env=env, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"benchmark child failed ({mode}):\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--native", action="store_true", help="profile with native (C) frames too")
    ap.add_argument("--reps", type=int, default=40, help="workload repetitions per run (~3 s at 40)")
    args = ap.parse_args()
    mode = "native" if args.native else "on"
    off: list[dict] = []
    on: list[dict] = []
    with tempfile.TemporaryDirectory() as store:
        for i in range(args.rounds):
            # alternate the order so drift in machine load hits both sides alike
            pair = [("off", off), (mode, on)] if i % 2 == 0 else [(mode, on), ("off", off)]
            for m, acc in pair:
                acc.append(run(m, args.rate, store, args.reps))
    wall_off = statistics.median(r["wall"] for r in off)
    wall_on = statistics.median(r["wall"] for r in on)
    cpu_off = statistics.median(r["cpu"] for r in off)
    cpu_on = statistics.median(r["cpu"] for r in on)
    ticks = statistics.median(r["stats"]["ticks"] for r in on)
    sampler = statistics.median(r["stats"]["sampler_cpu_ns"] for r in on) / 1e9
    print(f"overhead bench: CPython {sys.version.split()[0]}, {args.rate} Hz{' native' if args.native else ''}, "
          f"{args.rounds} rounds, median of each side")
    print(f"  wall  unprofiled {wall_off:.3f} s   profiled {wall_on:.3f} s   ratio {wall_on / wall_off:.4f}")
    print(f"  cpu   unprofiled {cpu_off:.3f} s   profiled {cpu_on:.3f} s   ratio {cpu_on / cpu_off:.4f}")
    print(f"  sampler thread: {sampler * 1e3:.1f} ms CPU over {ticks:.0f} ticks "
          f"({sampler / max(ticks, 1) * 1e6:.1f} us/tick) in the whole profiled run")


if __name__ == "__main__":
    main()
