"""What memory profiling costs: CPU and resident memory, memory profiles on against off.

Each pair runs the same workload in two fresh processes, both with ``MwTracker()`` started
(CPU sampling at its defaults), one with ``MW_PROFILING_MEMORY=false`` and one with memory
profiling at its defaults (one sample per 512 KiB allocated), in alternating order. A process
reports its CPU time over the workload (``time.process_time``: every thread, the sampler and the
exporter included) and its resident memory at the end; the ratios are medians over the pairs.

Workloads:
- ``alloc``: building and dropping small dicts, lists and strings (~27 M allocator calls a
  second on this VM: the worst case for an allocator hook; target CPU ratio <= 1.03);
- ``calc``: the demo's calc1/calc2/calc3 (``demo_flask/calculations.py``; target <= 1.01);
- ``--soak SECONDS``: the alloc workload with a slowly growing cache, memory profiling on,
  printing the resident memory every 10 s (flat once the live set stops growing).

The same two workloads are also measured in ONE process (the sampler running, whose ticks move
the hooks), alternating four states per round (hooks out; hooks always in but sampling nothing,
a rate of 2**40 bytes; hooks always in at the default rate; the small blocks' hooks in at one
tick of every round(100 / --duty), default rate: the default with --duty 25), medians of
--pairs x 2 rounds: on this noisy VM the in-process ratios are far steadier than the process
pairs, and they split the cost between the hooks and the samples.

    python bench/memory_overhead.py [--pairs 9] [--only alloc,calc] [--soak 600] [--duty 25] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import json, os, resource, sys, time
    sys.path.insert(0, {root!r})
    from middleware import MwTracker
    work, reps = sys.argv[1], int(sys.argv[2])

    def alloc_round():
        n = 0
        for i in range(20000):
            d = {{"id": i, "name": "item-%d" % i, "tags": [i, i + 1, i + 2]}}
            n += len(d["name"]) + len(d["tags"])
        return n

    if work == "calc":
        from demo_flask.calculations import calc1, calc2, calc3
        def unit():
            calc1(100); calc2(100); calc3(6)
    else:
        unit = alloc_round
    unit()  # warm
    tracker = MwTracker()
    c0 = time.process_time()
    for _ in range(reps):
        unit()
    cpu = time.process_time() - c0
    with open("/proc/self/status") as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    st = tracker.stats()
    tracker.stop()
    print(json.dumps({{"cpu": cpu, "rss_kib": rss, "samples": st.get("memory_samples", 0)}}))
    """
).format(root=str(ROOT))

SOAK = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from middleware import MwTracker
    seconds = float(sys.argv[1])
    tracker = MwTracker()
    cache = {{}}
    t0 = last = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        for _ in range(2000):
            d = {{"id": i, "name": "item-%d" % i, "tags": [i, i + 1]}}
            i += 1
            if i % 97 == 0:
                cache[i % 50000] = d  # a bounded cache: the live set levels off
        if time.monotonic() - last >= 10:
            last = time.monotonic()
            with open("/proc/self/status") as f:
                rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
            st = tracker.stats()
            print(int(last - t0), rss, st["memory_samples"], st["memory_live"], st["memory_compactions"],
                  flush=True)
    tracker.stop()
    """
).format(root=str(ROOT))


def run_child(work: str, reps: int, memory: bool, store: str, duty: int) -> dict[str, Any]:
    env = {**os.environ, "MW_PROFILING_MEMORY": "true" if memory else "false", "MW_PROFILE_DIR": store,
           "MW_PROFILING_MEMORY_DUTY": str(duty),
           "MW_PROFILING_LOCKS": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, work, str(reps)], capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{work} run failed:\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def pairs(work: str, reps: int, n: int, store: str, duty: int) -> dict[str, Any]:
    ratios, rss, off_cpu, samples = [], [], [], []
    for i in range(n):
        order = (False, True) if i % 2 == 0 else (True, False)
        got = {m: run_child(work, reps, m, store, duty) for m in order}
        ratios.append(got[True]["cpu"] / got[False]["cpu"])
        rss.append(got[True]["rss_kib"] - got[False]["rss_kib"])
        off_cpu.append(got[False]["cpu"])
        samples.append(got[True]["samples"] / got[True]["cpu"])
    return {"workload": work, "pairs": n, "cpu_ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "cpu_off_s": statistics.median(off_cpu),
            "rss_added_mib": statistics.median(rss) / 1024, "samples_per_cpu_s": statistics.median(samples)}


INPROCESS = textwrap.dedent(
    """
    import json, statistics, sys, time
    sys.path.insert(0, {root!r})
    from middleware import MwTracker
    from middleware import _native as n
    from demo_flask.calculations import calc1, calc2, calc3
    rounds, run = int(sys.argv[1]), int(sys.argv[2])
    tracker = MwTracker(profile_dir="none", instrument=False, locks=False)  # the sampler's ticks move the hooks

    def alloc():
        for _ in range(10):
            for i in range(20000):
                d = {{"id": i, "name": "item-%d" % i, "tags": [i, i + 1, i + 2]}}

    def calc():
        for _ in range(100):
            calc1(100); calc2(100); calc3(6)

    out = []
    for name, fn in (("alloc", alloc), ("calc", calc)):
        fn()
        hooks, sampled, default = [], [], []
        for i in range(rounds):
            got = {{}}
            for m in ((0, 1, 2, 3) if i % 2 else (3, 2, 1, 0)):
                if m == 0:
                    n.memory_disable()  # takes the hooks out
                elif m == 3:  # --duty: the hooks in at one tick of `run`
                    n.memory_enable(512 * 1024, duty_run=run)
                else:  # the hooks always in, sampling nothing / at the default rate
                    n.memory_enable(1 << 40 if m == 1 else 512 * 1024, duty_run=1)
                t = time.process_time(); fn(); got[m] = time.process_time() - t
            hooks.append(got[1] / got[0]); sampled.append(got[2] / got[0]); default.append(got[3] / got[0])
        s0 = n.memory_stats()["samples"]
        n.memory_enable(512 * 1024, duty_run=run); t = time.process_time(); fn(); dt = time.process_time() - t
        out.append({{"workload": name, "rounds": rounds, "hooks_ratio": statistics.median(hooks),
                    "sampled_ratio": statistics.median(sampled), "default_ratio": statistics.median(default),
                    "samples_per_cpu_s": (n.memory_stats()["samples"] - s0) / dt}})
    tracker.stop()
    print(json.dumps(out))
    """
).format(root=str(ROOT))


def in_process(rounds: int, duty: int) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sys.path.insert(0, str(ROOT))
    from middleware.config import memory_duty_run

    run = memory_duty_run(duty)  # as the tracker applies MW_PROFILING_MEMORY_DUTY
    proc = subprocess.run([sys.executable, "-c", INPROCESS, str(rounds), str(run)], capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"in-process run failed:\n{proc.stderr[-3000:]}")
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    return rows


def soak(seconds: float, store: str) -> None:
    env = {**os.environ, "MW_PROFILE_DIR": store, "PYTHONPATH": str(ROOT), "MW_PROFILING_MEMORY": "true"}
    print("seconds  rss_kib  memory_samples  live_samples  compactions")
    subprocess.run([sys.executable, "-c", SOAK, str(seconds)], env=env, cwd=str(ROOT), check=True,
                   timeout=seconds + 120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=9)
    ap.add_argument("--only", default="alloc,calc")
    ap.add_argument("--soak", type=float, default=0, metavar="SECONDS")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--duty", type=int, default=25,
                    help="MW_PROFILING_MEMORY_DUTY of the memory-on side (percent; default 25, the setting's default)")
    ap.add_argument("--in-process-only", action="store_true", help="skip the process pairs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as store:
        if args.soak:
            soak(args.soak, store)
            return
        reps = {"alloc": 150, "calc": 400}
        rows = [] if args.in_process_only else [pairs(w, reps[w], args.pairs, store, args.duty)
                                                for w in args.only.split(",")]
    inproc = in_process(2 * args.pairs + 1, args.duty)
    if args.json:
        print(json.dumps({"process_pairs": rows, "in_process": inproc}))
        return
    print(f"{'workload':<8} {'pairs':>5} {'CPU ratio':>9} {'(min..max)':>14} {'off CPU':>8} {'RSS added':>10} "
          f"{'samples/CPU s':>13}")
    for r in rows:
        print(f"{r['workload']:<8} {r['pairs']:>5} {r['cpu_ratio']:>9.3f} "
              f"{r['ratio_min']:>6.3f}..{r['ratio_max']:<6.3f} {r['cpu_off_s']:>7.2f}s "
              f"{r['rss_added_mib']:>7.2f}MiB {r['samples_per_cpu_s']:>13.0f}")
    print(f"\nin one process, alternating ({inproc[0]['rounds']} rounds):")
    print(f"{'workload':<8} {'hooks always in':>15} {'+ default rate':>14} {f'duty {args.duty}%':>18} "
          f"{'samples/CPU s':>13}")
    for r in inproc:
        print(f"{r['workload']:<8} {r['hooks_ratio']:>15.3f} {r['sampled_ratio']:>14.3f} {r['default_ratio']:>18.3f} "
              f"{r['samples_per_cpu_s']:>13.0f}")


if __name__ == "__main__":
    main()
