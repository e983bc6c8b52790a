"""What does the profiler cost a process that forks: fork round trips and subprocess spawns.

    .venv/bin/python bench/fork_cost.py [--runs 7] [--forks 60]

Each run starts one fresh interpreter per variant (``off``: no profiler; ``mw``: ``MwTracker(
profile_dir="none", instrument=False)``), in an order that alternates from run to run, and each
measures, as the mean over ``--forks`` of them (the best of three such means):

- ``fork``: ``os.fork()`` of a child that calls ``os._exit(0)`` at once, and the parent's
  ``waitpid``: the child runs the profiler's fork handlers and restarts it (as a gunicorn worker
  or a ``multiprocessing`` fork child does);
- ``spawn``: ``subprocess.run(["/bin/true"])`` (``vfork``/``posix_spawn``: no fork handler runs);
- ``spawn preexec``: the same with ``preexec_fn`` (CPython forks and runs the fork handlers in
  the child before it execs; the parent waits for the exec).

The table shows medians over the runs, in ms, and the ratios mw / off.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
forks, variant = int(sys.argv[2]), sys.argv[3]
if variant != "off":
    from middleware import MwTracker
    tracker = MwTracker(profile_dir="none", instrument=False)
time.sleep(0.2)

def fork_once():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

def spawn():
    subprocess.run(["/bin/true"])

def spawn_preexec():
    subprocess.run(["/bin/true"], preexec_fn=lambda: None)

out = {}
for name, fn in (("fork", fork_once), ("spawn", spawn), ("spawn preexec", spawn_preexec)):
    best = None
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(forks):
            fn()
        mean = (time.perf_counter() - t0) / forks * 1e3
        best = mean if best is None else min(best, mean)
    out[name] = best
print(json.dumps(out))
"""

VARIANTS = ("off", "mw")
CASES = ("fork", "spawn", "spawn preexec")


def run(variant: str, forks: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MW_")}
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(forks), variant],
                         capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"{variant}: child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--forks", type=int, default=60)
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for i in range(args.runs):
        for v in VARIANTS[i % 2:] + VARIANTS[:i % 2]:
            results[v].append(run(v, args.forks))
    print(f"fork cost, {args.runs} runs of {args.forks} per case, medians in ms:")
    print(f"{'case':<16}{'off':>9}{'mw':>9}{'mw/off':>9}")
    for case in CASES:
        off = statistics.median(r[case] for r in results["off"])
        mw = statistics.median(r[case] for r in results["mw"])
        print(f"{case:<16}{off:>9.2f}{mw:>9.2f}{mw / off:>9.2f}")


if __name__ == "__main__":
    main()
