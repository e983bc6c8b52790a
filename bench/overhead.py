"""Sampler overhead, profiled vs unprofiled side by side, on workloads that stress different costs.

    python bench/overhead.py [--rate 100] [--pairs 7] [--quick] [--native] [--only calc,depth150,...]

Every run is a fresh interpreter (no profiler state leaks between runs). For each workload,
profiled and unprofiled runs alternate (the order flips every pair, so drift in machine load hits
both sides alike), and each figure is the median over the pairs. A run does a fixed amount of work
after a warm-up, and reports:

- wall time and process CPU time of the work (process CPU includes the sampler's and the
  exporter's threads): the *wall ratio* and *CPU ratio* profiled / unprofiled;
- the application's own CPU per unit of work (``time.thread_time`` of the threads doing the
  work, summed, per unit): the *app ratio*, the app's own slowdown (cache and memory-bandwidth
  interference, signal handling with ``--native``), apart from the sampler's CPU;
- the CPU samples taken by the threads' own CPU timers, and their handler's time in the
  application thread (``handler_ns`` / ``cpu_timer_recorded`` from ``tracker.stats()``);
- the sampler thread's CPU during the work, read from ``/proc/self/task/<tid>/schedstat``
  (nanoseconds on CPU; ``tracker.stats()["sampler_cpu_ns"]`` is only refreshed every 16 ticks),
  as a share of one core and per sample / per tick (``samples`` and ``ticks`` from
  ``tracker.stats()``; a sample is one thread's stack at one tick).

Workloads (``--only`` takes a comma-separated subset):

- ``calc``: the demo's calc1/calc2/calc3 (``demo_flask/calculations.py``), shallow stacks;
- ``depth30`` / ``depth150``: a hot loop under a 30- / 150-frame Python recursion (the cost of
  walking deep stacks);
- ``threads``: 8 threads, each running the hot loop under a 100-frame recursion;
- ``busy4``: 4 threads running the hot loop under a 30-frame recursion, at 100 Hz whatever
  ``--rate`` says: the sampler thread's own CPU at the default rate with busy threads;
- ``idle``: 1, 10, 100 and 500 threads blocked on an ``Event`` plus one busy thread, at 100 Hz
  whatever ``--rate`` says: the sampler's CPU as the thread count grows (profiled runs only);
- ``sleepers`` (with ``--native``): 4 busy threads and 2 sleeping ones at 1 kHz with native
  frames, profiled vs unprofiled: the CPU the sleeping threads themselves spend (a sleeping
  thread whose Python frames have not changed is not signalled).

``--native`` profiles every workload with ``MwTracker(native=True)`` and adds ``sleepers``.
``--quick`` runs 3 pairs of shorter runs. A default run takes about 3 minutes on 2 cores.

``--concurrent`` runs the two sides of a pair at the same time instead of one after the other
(each pinned to its own vCPU, swapped every pair): both then see the same moment of a noisy
machine, which narrows the spread of the paired ratios.
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
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child: argv[1] = JSON spec. Prints one line "OVH_RESULT {json}".
CHILD = r"""
import json, os, sys, threading, time
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["root"])
mode, work = spec["mode"], spec["workload"]
tracker = None
if mode != "off":
    from middleware import MwTracker
    tracker = MwTracker(sample_rate=spec["rate"], native=(mode == "native"), profile_dir=spec["store"],
                        instrument=False)

def leaf(n):
    s = 0
    for i in range(n):
        s += i * i
    return s

def rec(d, n):
    if d <= 1:
        return leaf(n)
    return rec(d - 1, n) + 1

def task_cpu_ns(name):
    # CPU time of our threads called `name` (schedstat: ns on CPU), or None if unreadable.
    total, found = 0, False
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != name:
                    continue
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
                found = True
        except OSError:
            continue
    return total if found else None

def stats():
    return tracker.stats() if tracker is not None else {}

depth, leaf_n, units, nthreads = spec["depth"], spec["leaf"], spec["units"], spec["threads"]
app_cpu = []  # thread_time of each working thread over its measured work

if work == "calc":
    from demo_flask.calculations import calc1, calc2, calc3
    def unit():
        calc1(260); calc2(260); calc3(8)
    calc1(100); calc2(100); calc3(6)
else:
    def unit():
        rec(depth, leaf_n)
    for _ in range(max(1, units // 20)):
        unit()

def worker(n, barrier=None):
    if barrier is not None:
        barrier.wait()
    c0 = time.thread_time()
    for _ in range(n):
        unit()
    app_cpu.append(time.thread_time() - c0)

idle_stop = threading.Event()
idle = [threading.Thread(target=idle_stop.wait, daemon=True) for _ in range(spec["idle"])]
for t in idle:
    t.start()

sleep_stop = threading.Event()
sleep_cpu = []
def sleeper():
    c0 = time.thread_time()
    while not sleep_stop.is_set():
        time.sleep(0.1)
    sleep_cpu.append(time.thread_time() - c0)
sleepers = [threading.Thread(target=sleeper, name=f"sleeper-{i}") for i in range(spec["sleepers"])]
for t in sleepers:
    t.start()

time.sleep(0.05)  # let the sampler see every thread once before the measured window
s0, smp0, exp0 = stats(), task_cpu_ns("mw-sampler"), task_cpu_ns("mw-export")
w0, c0 = time.perf_counter(), time.process_time()
if nthreads <= 1:
    worker(units)
else:
    barrier = threading.Barrier(nthreads)
    ts = [threading.Thread(target=worker, args=(units // nthreads, barrier)) for _ in range(nthreads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
w1, c1 = time.perf_counter(), time.process_time()
s1, smp1, exp1 = stats(), task_cpu_ns("mw-sampler"), task_cpu_ns("mw-export")
sleep_stop.set()
for t in sleepers:
    t.join()
idle_stop.set()
out = {"wall": w1 - w0, "cpu": c1 - c0, "app_cpu": sum(app_cpu), "units": units if nthreads <= 1 else
       (units // nthreads) * nthreads, "sleep_cpu": sleep_cpu}
if tracker is not None:
    d = {k: s1.get(k, 0) - s0.get(k, 0) for k in ("samples", "ticks", "sampler_cpu_ns", "unwind_requests",
                                                  "unwind_captured", "unwind_timeouts", "handler_ns",
                                                  "cpu_timer_recorded")}
    d["sampler_ns"] = (smp1 - smp0) if smp0 is not None and smp1 is not None else d["sampler_cpu_ns"]
    d["export_ns"] = (exp1 - exp0) if exp0 is not None and exp1 is not None else 0
    out["stats"] = d
    if spec["sleepers"]:  # the share of the CPU samples that landed in the sleeping threads
        prof = tracker.snapshot()
        ci = prof.value_index("cpu")
        tot = sum(x.values[ci] for x in prof.samples)
        slp = sum(x.values[ci] for x in prof.samples if str(x.label("thread_name") or "").startswith("sleeper-"))
        out["sleeper_cpu_share"] = slp / tot if tot else 0.0
    tracker.stop()
print("OVH_RESULT " + json.dumps(out))
"""

IDLE_COUNTS = (1, 10, 100, 500)


def workloads(quick: bool) -> dict[str, dict[str, Any]]:
    """name -> child spec (units sized for ~1.2 s of CPU per run on this VM, ~0.4 s with --quick)."""
    k = 0.35 if quick else 1.0

    def n(x: float) -> int:
        return max(1, int(x * k))

    base = {"depth": 1, "leaf": 3000, "threads": 1, "idle": 0, "sleepers": 0}
    return {
        "calc": {**base, "units": n(65)},
        "depth30": {**base, "depth": 30, "units": n(6000)},
        "depth150": {**base, "depth": 150, "units": n(5200)},
        "threads": {**base, "depth": 100, "threads": 8, "units": n(5600)},
        "busy4": {**base, "depth": 30, "threads": 4, "units": n(6000), "fixed_rate": 100},
        **{f"idle{c}": {**base, "depth": 30, "idle": c, "units": n(6000), "fixed_rate": 100} for c in IDLE_COUNTS},
        "sleepers": {**base, "depth": 30, "threads": 4, "sleepers": 2, "units": n(6000), "fixed_rate": 1000},
    }


def launch(spec: dict[str, Any], cpu: int | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("MW_"):
            del env[k]
    pin = None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, preexec_fn=pin)


def collect(p: subprocess.Popen[str], spec: dict[str, Any]) -> dict[str, Any]:
    out, err = p.communicate(timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"benchmark child failed ({spec['workload']}, {spec['mode']}):\n{err[-4000:]}")
    return json.loads([x for x in out.splitlines() if x.startswith("OVH_RESULT ")][-1][len("OVH_RESULT "):])


def run(spec: dict[str, Any]) -> dict[str, Any]:
    return collect(launch(spec), spec)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def sampler_figures(on: list[dict[str, Any]]) -> dict[str, float]:
    st = [r["stats"] for r in on]
    return {
        "core_pct": med([s["sampler_ns"] / 1e9 / r["wall"] * 100 for s, r in zip(st, on, strict=True)]),
        "us_sample": med([s["sampler_ns"] / max(1, s["samples"]) / 1e3 for s in st]),
        "us_tick": med([s["sampler_ns"] / max(1, s["ticks"]) / 1e3 for s in st]),
        "samples_tick": med([s["samples"] / max(1, s["ticks"]) for s in st]),
        "ticks_s": med([s["ticks"] / r["wall"] for s, r in zip(st, on, strict=True)]),
        "export_ms": med([s["export_ns"] / 1e6 for s in st]),
        # CPU samples taken by the threads' own CPU timers: the handler's time in the application
        # thread per sample, and everything (handler + sampler thread) per CPU sample
        "handler_us": med([s.get("handler_ns", 0) / max(1, s.get("cpu_timer_recorded", 0)) / 1e3 for s in st]),
        "total_us": med([(s["sampler_ns"] + s.get("handler_ns", 0)) / max(1, s.get("cpu_timer_recorded", 0)) / 1e3
                         for s in st]),
        "cpu_samples_s": med([s.get("cpu_timer_recorded", 0) / r["wall"] for s, r in zip(st, on, strict=True)]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=100, help="sampling rate (Hz) of calc/depth30/depth150/threads")
    ap.add_argument("--pairs", type=int, default=None, help="profiled/unprofiled pairs per workload (default 7)")
    ap.add_argument("--rounds", type=int, dest="pairs", help=argparse.SUPPRESS)  # the older name of --pairs
    ap.add_argument("--reps", type=int, default=None, help="calc repetitions per run (default 65, 22 with --quick)")
    ap.add_argument("--quick", action="store_true", help="3 pairs of shorter runs")
    ap.add_argument("--native", action="store_true", help="profile with native (C) frames; adds `sleepers`")
    ap.add_argument("--only", metavar="WORKLOAD[,...]", help="calc, depth30, depth150, threads, busy4, idle, sleepers")
    ap.add_argument("--concurrent", action="store_true",
                    help="run the two sides of each pair at once, each pinned to its own vCPU")
    ap.add_argument("--json", metavar="FILE", help="also write every run's raw result to FILE")
    args = ap.parse_args()
    pairs = args.pairs or (3 if args.quick else 7)
    mode = "native" if args.native else "on"
    wl = workloads(args.quick)
    if args.reps:
        wl["calc"]["units"] = args.reps
    names = ["calc", "depth30", "depth150", "threads", "busy4", "idle"] + (["sleepers"] if args.native else [])
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        bad = [w for w in wanted if w not in ("calc", "depth30", "depth150", "threads", "busy4", "idle", "sleepers")]
        if bad:
            ap.error(f"unknown workload(s): {', '.join(bad)}")
        names = [w for w in names + ["sleepers"] if w in wanted]
        names = list(dict.fromkeys(names))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mw-overhead-") as store:
        def spec(name: str, m: str) -> dict[str, Any]:
            s = dict(wl[name])
            rate = s.pop("fixed_rate", args.rate)
            return {**s, "workload": "calc" if name == "calc" else "loop", "mode": m, "rate": rate,
                    "store": store, "root": ROOT}

        for name in names:
            if name == "idle":
                for c in IDLE_COUNTS:
                    key = f"idle{c}"
                    results[key] = {"on": [run(spec(key, mode)) for _ in range(pairs)], "off": []}
                continue
            m = "native" if name == "sleepers" else mode
            res = results[name] = {"on": [], "off": []}
            for i in range(pairs):
                order = [("off", "off"), (m, "on")] if i % 2 == 0 else [(m, "on"), ("off", "off")]
                if args.concurrent:  # both sides at once, each on its own vCPU (swapped every pair)
                    procs = [(side, spec(name, mm), k) for k, (mm, side) in enumerate(order)]
                    running = [(side, sp, launch(sp, cpu=k % max(1, os.cpu_count() or 1))) for side, sp, k in procs]
                    for side, sp, p in running:
                        res[side].append(collect(p, sp))
                    continue
                for mm, side in order:
                    res[side].append(run(spec(name, mm)))
    elapsed = time.perf_counter() - t_start

    print(
        f"overhead bench: CPython {sys.version.split()[0]}, {args.rate} Hz"
        f"{' with native frames' if args.native else ''}, {pairs} pairs per workload "
        f"(fresh interpreter per run, profiled/unprofiled "
        f"{'at the same time, one vCPU each' if args.concurrent else 'alternating'}), medians; "
        f"{elapsed:.0f} s"
    )
    rows = [n for n in ("calc", "depth30", "depth150", "threads", "busy4") if n in results]
    if rows:
        print()
        print(f"{'workload':<10} {'wall ratio':>10} {'CPU ratio':>9} {'app ratio':>9} {'pairs: app ratio':>16} | "
              f"{'sampler':>8} {'us/tick':>8} {'ticks/s':>7} {'CPU smp/s':>9} {'handler us':>10} {'total us':>8} | "
              f"{'wall off':>8} {'wall on':>8}")
        for n in rows:
            on, off = results[n]["on"], results[n]["off"]
            wr = med([r["wall"] for r in on]) / med([r["wall"] for r in off])
            cr = med([r["cpu"] for r in on]) / med([r["cpu"] for r in off])
            ar = med([r["app_cpu"] / r["units"] for r in on]) / med([r["app_cpu"] / r["units"] for r in off])
            f = sampler_figures(on)
            # the same ratio pair by pair (each profiled run against the unprofiled run next to it)
            pr = sorted((a["app_cpu"] / a["units"]) / (b["app_cpu"] / b["units"]) for a, b in zip(on, off, strict=True))
            spread = f"{med(pr):.3f} ({pr[0]:.2f}-{pr[-1]:.2f})"
            print(f"{n:<10} {wr:10.3f} {cr:9.3f} {ar:9.3f} {spread:>16} | {f['core_pct']:7.2f}% "
                  f"{f['us_tick']:8.1f} {f['ticks_s']:7.0f} {f['cpu_samples_s']:9.0f} {f['handler_us']:10.2f} "
                  f"{f['total_us']:8.2f} | {med([r['wall'] for r in off]):7.2f}s {med([r['wall'] for r in on]):7.2f}s")
        print("  wall/CPU ratio: profiled / unprofiled (process CPU includes the profiler's threads); app ratio: the "
              "working threads' own CPU per unit of work, profiled / unprofiled;")
        print("  pairs: the app ratio of each profiled run against its unprofiled neighbour, median (min-max): the "
              "run-to-run noise of this machine;")
        print("  sampler: the sampler thread's CPU during the work as a share of one core (schedstat), per tick, "
              "ticks per second; CPU smp/s: CPU samples taken by the threads' own CPU timers per second;")
        print("  handler us: the timer handler's time in the application thread per CPU sample; total us: handler + "
              "sampler thread per CPU sample.")
        d = {n: sampler_figures(results[n]["on"])["total_us"] for n in ("depth30", "depth150") if n in results}
        if len(d) == 2:
            print(f"  per-sample cost (handler + sampler thread): depth 30 {d['depth30']:.1f} us, depth 150 "
                  f"{d['depth150']:.1f} us")
    idle = [k for k in (f"idle{c}" for c in IDLE_COUNTS) if k in results]
    if idle:
        print()
        print(f"idle threads + 1 busy thread, 100 Hz, {pairs} profiled runs each (medians):")
        print(f"  {'idle':>5} {'sampler':>8} {'us/tick':>8} {'samples/tick':>12} {'ticks/s':>7} {'handler':>8}")
        for k in idle:
            f = sampler_figures(results[k]["on"])
            hp = med([r["stats"].get("handler_ns", 0) / 1e9 / r["wall"] * 100 for r in results[k]["on"]])
            print(f"  {k[4:]:>5} {f['core_pct']:7.2f}% {f['us_tick']:8.1f} {f['samples_tick']:12.1f} "
                  f"{f['ticks_s']:7.0f} {hp:7.2f}%")
    if "sleepers" in results:
        on, off = results["sleepers"]["on"], results["sleepers"]["off"]

        def sleep_us_per_s(rs: list[dict[str, Any]]) -> float:
            return med([sum(r["sleep_cpu"]) / len(r["sleep_cpu"]) / r["wall"] * 1e6 for r in rs])

        ar = med([r["app_cpu"] / r["units"] for r in on]) / med([r["app_cpu"] / r["units"] for r in off])
        f = sampler_figures(on)
        sig = med([r["stats"]["unwind_requests"] / r["wall"] for r in on])
        tmo = med([r["stats"]["unwind_timeouts"] for r in on])
        print()
        print(f"native frames, 1000 Hz, 4 busy + 2 sleeping threads ({pairs} pairs, medians):")
        print(f"  sleeping threads' own CPU: unprofiled {sleep_us_per_s(off):.0f} us/s, profiled "
              f"{sleep_us_per_s(on):.0f} us/s per thread ({sleep_us_per_s(on) / 1e4:.2f}% of a core each)")
        share = med([r.get("sleeper_cpu_share", float("nan")) for r in on]) * 100
        print(f"  share of the CPU profile in the sleeping threads: {share:.2f}%")
        print(f"  unwind signals {sig:.0f}/s over all threads, timeouts per run {tmo:.0f}; busy threads' own CPU per "
              f"unit x{ar:.3f}; sampler {f['core_pct']:.2f}% of a core, {f['us_tick']:.0f} us/tick; "
              f"{f['cpu_samples_s']:.0f} CPU samples/s, handler {f['handler_us']:.1f} us each")
        cr = med([r["cpu"] for r in on]) / med([r["cpu"] for r in off])
        pr = sorted(a["cpu"] / b["cpu"] for a, b in zip(on, off, strict=True))
        print(f"  process CPU ratio {cr:.3f} (pairs {pr[0]:.2f}-{pr[-1]:.2f}); wall ratio "
              f"{med([r['wall'] for r in on]) / med([r['wall'] for r in off]):.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    main()
