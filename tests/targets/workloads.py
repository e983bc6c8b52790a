"""Known workloads for the sampler tests, run in a child process so that a crash in the sampler
becomes a readable test failure and every test gets a fresh profiler.

    python tests/targets/workloads.py NAME [--rate HZ] [--seconds S]

prints one JSON object: the workload's ground truth and a summary of the profile.
"""
from __future__ import annotations

import _thread
import argparse
import json
import os
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# --- the calc workload of the seed app (demo_flask/calculations.py): pure loops with no Python
# callees, so each function's self time is its total time ------------------------------------------
from demo_flask.calculations import calc1, calc2, calc3  # noqa: E402
from middleware import MwTracker  # noqa: E402
from middleware.profile import Profile  # noqa: E402


def two_loops(n: int) -> int:
    s = 0
    for i in range(2 * n): s += i * i  # LOOP_A
    for i in range(n): s += i * i  # LOOP_B
    return s


def summarize(p: Profile) -> dict[str, Any]:
    """Per thread: self cpu/wall per leaf function and per (leaf function, line)."""
    ci, wi, si = p.value_index("cpu"), p.value_index("wall"), p.value_index("samples")
    out: dict[str, Any] = {"threads": {}, "total_cpu_ns": 0, "functions": set()}
    for s in p.samples:
        t = s.label("thread_name") or "?"
        th = out["threads"].setdefault(
            t, {"cpu_ns": 0, "wall_ns": 0, "cpu_samples": 0, "self_cpu": {}, "self_wall": {}, "lines": {},
                "labels": {}}
        )
        leaf = s.stack[-1] if s.stack else None
        name = leaf.function if leaf else "?"
        th["cpu_ns"] += s.values[ci]
        th["wall_ns"] += s.values[wi]
        th["cpu_samples"] += s.values[si]
        th["self_cpu"][name] = th["self_cpu"].get(name, 0) + s.values[ci]
        th["self_wall"][name] = th["self_wall"].get(name, 0) + s.values[wi]
        if leaf:
            key = f"{leaf.function}:{leaf.line}"
            th["lines"][key] = th["lines"].get(key, 0) + s.values[ci]
        ep = s.label("endpoint")
        if ep:
            th["labels"][ep] = th["labels"].get(ep, 0) + s.values[ci]
        side = s.label("side") or "-"
        per_leaf = out.setdefault("leaf_sides", {}).setdefault(name, {})
        per_leaf[side] = per_leaf.get(side, 0) + s.values[si] + s.values[wi] // 10**9
        wall_leaf = out.setdefault("leaf_sides_wall", {}).setdefault(name, {})
        wall_leaf[side] = wall_leaf.get(side, 0) + s.values[wi]
        out["total_cpu_ns"] += s.values[ci]
        out["functions"].update(f.function for f in s.stack)
    out["functions"] = sorted(out["functions"])
    return out


def run_calc(args: argparse.Namespace, tracker: MwTracker) -> dict[str, Any]:
    truth = {"calc1": 0.0, "calc2": 0.0, "calc3": 0.0}

    def worker() -> None:
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            for fn, n in ((calc1, 180), (calc2, 130), (calc3, 7)):
                t0 = time.thread_time()
                fn(n)
                truth[fn.__name__] += time.thread_time() - t0

    th = threading.Thread(target=worker, name="calc-worker")
    th.start()
    while th.is_alive():
        time.sleep(0.05)
    th.join()
    return {"truth_cpu_s": truth}


def run_lines(args: argparse.Namespace, tracker: MwTracker) -> dict[str, Any]:
    import inspect

    src, start = inspect.getsourcelines(two_loops)
    lines = {tag: start + i for i, text in enumerate(src) for tag in ("LOOP_A", "LOOP_B") if tag in text}
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        two_loops(200_000)
    return {"lines": lines}


def run_blocked(args: argparse.Namespace, tracker: MwTracker) -> dict[str, Any]:
    # A stock lock: a profiled one (threading.Lock() while profiling) records the wait when it
    # ends, real CPU (tens of microseconds) in the waiting frame that a CPU sample may then land
    # on; what is tested here is the wait itself.
    lock = _thread.allocate_lock()
    lock.acquire()

    def sleeper() -> None:
        time.sleep(args.seconds)

    def waiter() -> None:
        lock.acquire()

    spun = [0.0]

    def spinner() -> None:
        deadline = time.monotonic() + args.seconds
        t0 = time.thread_time()
        while time.monotonic() < deadline:
            calc1(50)
        spun[0] = time.thread_time() - t0

    threads = [threading.Thread(target=f, name=f.__name__) for f in (sleeper, waiter, spinner)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    threads[0].join()
    threads[2].join()
    lock.release()
    threads[1].join()
    return {"elapsed_s": time.monotonic() - t0, "spinner_cpu_s": spun[0]}


def run_total(args: argparse.Namespace, tracker: MwTracker) -> dict[str, Any]:
    tracker.snapshot(reset=True)
    p0 = time.process_time()
    ths = [threading.Thread(target=run_calc, args=(args, tracker), name=f"w{i}") for i in range(2)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    return {"process_cpu_s": time.process_time() - p0}


def run_newthreads(args: argparse.Namespace, tracker: MwTracker) -> dict[str, Any]:
    names = []
    deadline = time.monotonic() + args.seconds
    i = 0
    while time.monotonic() < deadline:
        batch = []
        for _ in range(20):
            name = f"late-{i}"
            i += 1
            t = threading.Thread(target=calc1, args=(250,), name=name)
            t.start()
            batch.append(t)
            names.append(name)
        for t in batch:
            t.join()
    return {"started": names}


def side_a(n: int) -> int:
    s = 0
    for i in range(n):
        s += i
    return s


def side_b(n: int) -> int:
    s = 0
    for i in range(n):
        s -= i
    return s


def run_label_flips(args: argparse.Namespace, tracker: MwTracker) -> dict[str, Any]:
    # labels change every ~0.1-0.2 ms, so many ticks land while a block is entered or left:
    # a sample must never pair side_a's stack with side b's label (or the reverse)
    deadline = time.monotonic() + args.seconds
    flips = 0
    while time.monotonic() < deadline:
        with tracker.labels(side="a"):
            side_a(2000)
        with tracker.labels(side="b"):
            side_b(2000)
        flips += 2
    return {"flips": flips}


WORKLOADS = {"calc": run_calc, "lines": run_lines, "blocked": run_blocked, "total": run_total,
             "newthreads": run_newthreads, "labelflips": run_label_flips}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--rate", type=int, default=None, help="sampling rate (default: configuration)")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    # wall samples at the same rate as CPU samples: these workloads count ticks and threads
    # caught by them (the default caps ticks at 100 Hz)
    tracker = MwTracker(sample_rate=args.rate, wall_rate=args.rate, profile_dir="none", instrument=False)
    tracker.snapshot(reset=True)
    extra = WORKLOADS[args.workload](args, tracker)
    profile = tracker.snapshot()
    stats = tracker.stats()
    tracker.stop()
    json.dump({"extra": extra, "profile": summarize(profile), "stats": stats}, sys.stdout)


if __name__ == "__main__":
    main()
