"""What lock-wait profiling costs: the uncontended path, lock creation, and a gthread service.

1. Uncontended acquire/release loops (``with lock`` and ``acquire(); release()``) and lock
   creation, stock ``_thread`` types against the profiled ones, in this process, alternating,
   medians of --pairs pairs (target: profiled / stock <= 1.10 for the loops).
2. A Flask app under gunicorn gthread (1 worker x 4 threads) whose every request borrows one of
   two connections from a ``queue.LifoQueue`` pool made after ``MwTracker()`` (its lock and
   Conditions are profiled ones) for a 1 ms "query" (a sleep: the GIL is free meanwhile, so the
   threads really queue for connections), then computes ~0.1 ms; measured with wrk: profiling on
   with ``MW_PROFILING_LOCKS=true`` against ``MW_PROFILING_LOCKS=false``, alternating, medians
   (target: throughput ratio >= 0.99).

    python bench/lock_overhead.py [--pairs 15] [--rounds 5] [--seconds 5] [--json]
"""
from __future__ import annotations

import _thread
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_throughput import _free_port, _stop, _wait_ready, _wrk  # noqa: E402
from middleware import _native  # noqa: E402

LOOP = 200_000

APP = textwrap.dedent('''
    import queue
    import time
    from flask import Flask
    from middleware import MwTracker

    tracker = MwTracker(service_name="lock-bench")
    # A connection pool as urllib3's and SQLAlchemy's: a queue (a threading.Lock and two Conditions
    # made after MwTracker(): profiled when MW_PROFILING_LOCKS is on), fewer connections than
    # threads, so requests wait for one.
    pool = queue.LifoQueue()
    for _ in range(2):
        pool.put(object())
    app = Flask(__name__)

    def work(n):
        return sum(i * i for i in range(n))

    @app.route("/query")
    def query():
        conn = pool.get()
        try:
            time.sleep(0.001)  # the query: the connection is busy, the GIL free
        finally:
            pool.put(conn)
        return str(work(1500))
''')


def loop_with(lock: Any) -> float:
    t0 = time.perf_counter()
    for _ in range(LOOP):
        with lock:
            pass
    return time.perf_counter() - t0


def loop_calls(lock: Any) -> float:
    acquire, release = lock.acquire, lock.release
    t0 = time.perf_counter()
    for _ in range(LOOP):
        acquire()
        release()
    return time.perf_counter() - t0


def loop_create(make: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    for _ in range(LOOP):
        make()
    return time.perf_counter() - t0


def micro(pairs: int) -> dict[str, dict[str, float]]:
    _native.locks_enable(1_000_000, [threading.__file__])  # recording on, as under MwTracker()
    kinds = {"Lock": (_thread.allocate_lock, _native.ProfiledLock), "RLock": (_thread.RLock, _native.ProfiledRLock)}
    out: dict[str, dict[str, float]] = {}
    try:
        for kind, (stock, profiled) in kinds.items():
            cases: dict[str, Callable[[Callable[[], Any]], float]] = {
                "with": lambda make: loop_with(make()),
                "acquire/release": lambda make: loop_calls(make()),
                "create": loop_create,
            }
            for case, measure in cases.items():
                ratios, stock_ns, prof_ns = [], [], []
                for k in range(pairs):
                    order = (stock, profiled) if k % 2 == 0 else (profiled, stock)
                    got = {make: measure(make) for make in order}
                    ratios.append(got[profiled] / got[stock])
                    stock_ns.append(got[stock] / LOOP * 1e9)
                    prof_ns.append(got[profiled] / LOOP * 1e9)
                out[f"{kind} {case}"] = {"ratio": statistics.median(ratios), "stock_ns": statistics.median(stock_ns),
                                         "profiled_ns": statistics.median(prof_ns)}
    finally:
        _native.locks_disable()
    return out


def waits_in_store(store: str) -> float:
    """Lock waits (estimated, from the contentions of the block profiles) in a store."""
    from middleware.pprof import find_profile_files, read_pprof_file

    total = 0.0
    for f in find_profile_files(store):
        p = read_pprof_file(f)
        if p.sample_types[0][0] == "contentions":
            total += p.total("contentions")
    return total


def one_service_run(locks_on: bool, app_dir: str, seconds: float, connections: int, rate: int | None,
                    waits: list[float]) -> float:
    port = _free_port()
    store = tempfile.mkdtemp(prefix="mw-lock-bench-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MW_", "OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join([app_dir, str(ROOT)])
    env.update(MW_PROFILE_DIR=store, MW_PROFILING_LOCKS="true" if locks_on else "false")
    if rate is not None:
        env["MW_PROFILING_LOCK_RATE"] = str(rate)
    cmd = [sys.executable, "-m", "gunicorn", "lock_app:app", "--bind", f"127.0.0.1:{port}", "--workers", "1",
           "--worker-class", "gthread", "--threads", "4", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=app_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/query"
    try:
        _wait_ready(proc, url)
        _wrk(url, 1, connections)
        return _wrk(url, seconds, connections)
    finally:
        _stop(proc)
        if locks_on:
            waits.append(waits_in_store(store))
        shutil.rmtree(store, ignore_errors=True)


def service(rounds: int, seconds: float, connections: int, rate: int | None) -> dict[str, Any]:
    app_dir = tempfile.mkdtemp(prefix="mw-lock-app-")
    Path(app_dir, "lock_app.py").write_text(APP)
    runs: dict[str, list[float]] = {"off": [], "on": []}
    waits: list[float] = []
    try:
        for r in range(rounds):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                rate = one_service_run(mode == "on", app_dir, seconds, connections, rate, waits)
                runs[mode].append(rate)
                print(f"  round {r + 1} locks {mode:>3}: {rate:9.1f} req/s", flush=True)
    finally:
        shutil.rmtree(app_dir, ignore_errors=True)
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    return {"off": runs["off"], "on": runs["on"], "ratio": on / off, "waits_per_run": statistics.median(waits)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=15, help="stock/profiled pairs per micro case (default 15)")
    parser.add_argument("--rounds", type=int, default=5, help="off/on pairs of the service run (default 5, 0: skip)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per service run")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections (default 8)")
    parser.add_argument("--lock-rate", type=int, default=None, help="MW_PROFILING_LOCK_RATE (default: the tracker's)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args(argv)
    print(f"uncontended locks, CPython {sys.version.split()[0]}, {args.pairs} pairs x {LOOP} operations")
    m = micro(args.pairs)
    for case, r in m.items():
        print(f"  {case:<22} stock {r['stock_ns']:6.1f} ns  profiled {r['profiled_ns']:6.1f} ns  "
              f"ratio {r['ratio']:.3f}")
    worst = max(r["ratio"] for case, r in m.items() if not case.endswith("create"))
    print(f"worst acquire/release ratio {worst:.3f}   target <= 1.10: {'met' if worst <= 1.10 else 'NOT met'}")
    result: dict[str, Any] = {"micro": m}
    if args.rounds > 0:
        if not shutil.which("wrk"):
            print("wrk not found: service run skipped")
        else:
            print(f"gunicorn gthread 1x4, a pool of 2 connections in a LifoQueue, wrk {args.connections} connections, "
                  f"{args.rounds} rounds x {args.seconds:g}s, MW_PROFILING_LOCKS false vs true")
            s = service(args.rounds, args.seconds, args.connections, args.lock_rate)
            print(f"median req/s: locks off {statistics.median(s['off']):.1f}, on {statistics.median(s['on']):.1f}; "
                  f"ratio {s['ratio']:.4f}   target >= 0.99: {'met' if s['ratio'] >= 0.99 else 'NOT met'}\n"
                  f"lock waits profiled per run (median, warm-up included): {s['waits_per_run']:.0f}")
            result["service"] = s
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
