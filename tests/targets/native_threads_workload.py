"""Threads without a Python thread state beside Python threads, for tests/native/test_native_threads.py
(run in a child process; ground truth measured inside):

    python tests/targets/native_threads_workload.py LIB.so [--rate HZ] [--crowd N]
        [--churn N [--py-churn M]]

LIB.so is tests/targets/native_ext/native_threads.c built by the test. The workload, all at once:
a named native thread ("pool-worker") and an unnamed one burn C code, a native thread calls a
Python callback (a ctypes callback: Python only for the call) between bursts of C, and the main
thread burns Python. Every native thread reports its own CPU clock; the callback and the main
thread measure theirs with time.thread_time. The profile is taken while the native threads are
still alive (waiting to be released), so all their CPU is in it. With --crowd N: only N unnamed
native threads, each burning 0.4 ms three times with 30 ms sleeps between (truth: their clocks
together), the main thread waiting. With --churn N: a native thread makes N threads one after the
other, each burning 10 ms of C and ending (truth: their clocks and their maker's together); with
--py-churn M as well, the main thread meanwhile starts M short Python threads one after the other,
each burning 3 ms of Python (truth: their thread_time together).

Prints one JSON object: {"truth": {...}, "rows": [[thread, leaf function, cpu_ns]...],
"profile_cpu_ns", "process_cpu_ns", "stats"}.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from middleware import MwTracker  # noqa: E402

CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int)


def py_burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        x += 1


def crowd(lib: ctypes.CDLL, n: int, rate: int) -> dict[str, Any]:
    lib.mw_native_crowd_cpu_ns.restype = ctypes.c_int64
    tracker = MwTracker(sample_rate=rate)
    c0 = time.process_time_ns()
    started = lib.mw_native_crowd(n, 400, 3)
    while lib.mw_native_crowd_done() < started:
        time.sleep(0.01)
    time.sleep(0.1)  # past the next scan
    profile = tracker.snapshot(reset=True)
    stats = tracker.stats()
    c1 = time.process_time_ns()
    truth = {"crowd": lib.mw_native_crowd_cpu_ns(), "started": started}
    lib.mw_native_release()
    tracker.stop()  # before the report is printed (see main)
    return {"truth": truth, "profile": profile, "stats": stats, "process_cpu_ns": c1 - c0}


def churn(lib: ctypes.CDLL, n: int, py_n: int, rate: int) -> dict[str, Any]:
    lib.mw_native_churn_cpu_ns.restype = ctypes.c_int64
    py_cpu = [0.0]

    def short() -> None:
        t0 = time.thread_time()
        py_burn(0.003)
        py_cpu[0] += time.thread_time() - t0

    tracker = MwTracker(sample_rate=rate)
    c0 = time.process_time_ns()
    assert lib.mw_native_churn(n, 10) == 0
    for _ in range(py_n):
        t = threading.Thread(target=short)
        t.start()
        t.join()
    while not lib.mw_native_churn_done():
        time.sleep(0.01)
    time.sleep(0.1)  # past the next scan
    profile = tracker.snapshot(reset=True)
    stats = tracker.stats()
    c1 = time.process_time_ns()
    truth = {"churn": lib.mw_native_churn_cpu_ns(), "py_churn": int(py_cpu[0] * 1e9)}
    lib.mw_native_release()
    tracker.stop()  # before the report is printed (see main)
    return {"truth": truth, "profile": profile, "stats": stats, "process_cpu_ns": c1 - c0}


def mixed(lib: ctypes.CDLL, rate: int) -> dict[str, Any]:
    lib.mw_native_burner.argtypes = [ctypes.c_long, ctypes.c_char_p]
    lib.mw_native_caller.argtypes = [ctypes.c_long, ctypes.c_long, CALLBACK]
    lib.mw_native_cpu_ns.restype = ctypes.c_int64
    callback_cpu = [0.0]

    def on_callback(_round: int) -> None:
        t0 = time.thread_time()
        py_burn(0.004)
        callback_cpu[0] += time.thread_time() - t0

    callback = CALLBACK(on_callback)
    tracker = MwTracker(sample_rate=rate)
    c0 = time.process_time_ns()
    named = lib.mw_native_burner(1200, b"pool-worker")
    unnamed = lib.mw_native_burner(700, None)
    caller = lib.mw_native_caller(30, 40, callback)  # 1.2 s of C, 40 calls of 4 ms of Python
    main_cpu = time.thread_time()
    py_burn(0.8)
    main_cpu = time.thread_time() - main_cpu
    while not all(lib.mw_native_done(i) for i in (named, unnamed, caller)):
        time.sleep(0.01)
    time.sleep(0.1)  # past the next scan
    profile = tracker.snapshot(reset=True)
    c1 = time.process_time_ns()
    truth = {
        "pool-worker": lib.mw_native_cpu_ns(named),
        "unnamed": lib.mw_native_cpu_ns(unnamed),
        "caller": lib.mw_native_cpu_ns(caller),
        "callback": int(callback_cpu[0] * 1e9),
        "main": int(main_cpu * 1e9),
    }
    lib.mw_native_release()
    stats = tracker.stats()
    tracker.stop()  # before the report is printed (see main)
    return {"truth": truth, "profile": profile, "stats": stats, "process_cpu_ns": c1 - c0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("lib")
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--crowd", type=int, default=0)
    ap.add_argument("--churn", type=int, default=0)
    ap.add_argument("--py-churn", type=int, default=0)
    args = ap.parse_args()
    lib = ctypes.CDLL(args.lib)
    if args.crowd:
        run = crowd(lib, args.crowd, args.rate)
    elif args.churn:
        run = churn(lib, args.churn, args.py_churn, args.rate)
    else:
        run = mixed(lib, args.rate)
    profile = run["profile"]
    ci = profile.value_index("cpu")
    rows: dict[tuple[str, str], int] = defaultdict(int)
    for s in profile.samples:
        rows[(s.label("thread_name") or "?", s.stack[-1].function if s.stack else "?")] += s.values[ci]
    # The tracker is stopped by now: a CPU sample's signal landing in a write to a full pipe cuts it
    # short, and an unbuffered stdout (PYTHONUNBUFFERED=1) then loses the rest of the report (see
    # the README's known problems; 4,500 threads' rows are ~250 KB).
    print(json.dumps({
        "truth": run["truth"],
        "rows": [[t, f, v] for (t, f), v in rows.items()],
        "profile_cpu_ns": sum(rows.values()),
        "process_cpu_ns": run["process_cpu_ns"],
        "stats": run["stats"],
    }))


if __name__ == "__main__":
    main()
