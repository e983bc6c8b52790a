"""What does the profiler cost a thread at its start and end: CPU per short-lived thread.

    .venv/bin/python bench/thread_start.py [--runs 5] [--seconds 1.5] [--rate 100]

A workload that starts threads in batches of 50 and joins them, each thread running ~0.1 ms of
Python (``sum(range(3000))``), for ``--seconds``: the pattern of an app that starts a thread per
task. Each run starts one fresh interpreter per variant, in an order that rotates from run to
run; the table shows medians over the runs:

- ``off``: no profiler;
- ``mw``: ``MwTracker(profile_dir="none", instrument=False, sample_rate=--rate)`` (CPU timers:
  perf events where the kernel allows them);
- ``mw timers=off`` / ``mw timers=POSIX``: the same with ``MW_PROFILING_CPU_TIMER=off`` /
  ``timer``: what the per-thread perf event costs, apart from the naming hook.

Per thread, from ``time.thread_time()`` in the thread and the process CPU: ``start`` is the
thread's CPU before its first line of Python (creation, CPython's bootstrap, our naming hook and
timer arming, their first context switches), ``total`` all of its CPU (start, the ~0.1 ms of
work, its end), and ``threads/s`` the batches' pace.
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
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
seconds, rate, variant = float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if variant != "off":
    from middleware import MwTracker
    tracker = MwTracker(profile_dir="none", instrument=False, sample_rate=rate)
starts = []
def task():
    starts.append(time.thread_time())
    sum(range(3000))
n = 0
p0, m0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
end = time.monotonic() + seconds
while time.monotonic() < end:
    batch = [threading.Thread(target=task) for _ in range(50)]
    for t in batch:
        t.start()
    for t in batch:
        t.join()
    n += len(batch)
wall = time.perf_counter() - w0
others = time.process_time() - p0 - (time.thread_time() - m0)
if variant != "off":
    others -= tracker.stats().get("sampler_cpu_ns", 0) / 1e9
print(json.dumps({"threads": n, "start_us": sum(starts) / n * 1e6, "total_us": others / n * 1e6,
                  "per_s": n / wall}))
"""

VARIANTS = {"off": {}, "mw": {}, "mw timers=off": {"MW_PROFILING_CPU_TIMER": "off"},
            "mw timers=POSIX": {"MW_PROFILING_CPU_TIMER": "timer"}}


def run(variant: str, seconds: float, rate: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "MW_PROFILING_CPU_TIMER"}
    env.update(VARIANTS[variant])
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(seconds), str(rate), variant],
                         capture_output=True, text=True, env=env, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"{variant}: child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--rate", type=int, default=100)
    args = ap.parse_args()
    names = list(VARIANTS)
    results: dict[str, list[dict[str, float]]] = {v: [] for v in names}
    for i in range(args.runs):
        for v in names[i % len(names):] + names[:i % len(names)]:
            results[v].append(run(v, args.seconds, args.rate))
    print(f"thread start-up, {args.runs} runs of {args.seconds} s each, {args.rate} Hz, medians per thread:")
    print(f"{'variant':<18}{'start':>10}{'total':>10}{'threads/s':>12}")
    for v in names:
        med = {k: statistics.median(r[k] for r in results[v]) for k in ("start_us", "total_us", "per_s")}
        print(f"{v:<18}{med['start_us']:>8.0f}us{med['total_us']:>8.0f}us{med['per_s']:>12.0f}")


if __name__ == "__main__":
    main()
