"""Lock workloads for the lock-wait (block) profile, each run in a fresh interpreter with the
profiler on; the truth goes to stdout as JSON.

    python lock_workloads.py contention STORE_DIR SECONDS
        Two contended locks, A held 3 ms and B 1 ms at a time by three threads each (then 3 ms,
        resp. 1.5 ms, outside the lock), and an uncontended lock U that one thread takes in a
        tight loop. Every acquire of A and B is
        timed with time.perf_counter around it (the truth: how long each thread waited), and each
        lock's creation line is reported.

    python lock_workloads.py stacks STORE_DIR SECONDS
        Waits under short-lived code objects: every round execs 20 fresh functions fn_<k>_<round>,
        each calling mid<k % 3>, which recurses k % 7 times and then waits on a lock that is never
        free (a 0.3 ms timeout): the static call graph every recorded stack must follow.

    python lock_workloads.py stress STORE_DIR SECONDS
        32 threads contending for a few locks every way threading offers (with, timeouts,
        non-blocking tries, RLock recursion, Conditions, Semaphores, Events, a Queue), locks and
        threads made and dropped all along, exports every 0.2 s: reports the counters and the
        peak RSS.
"""
from __future__ import annotations

import json
import os
import queue
import random
import sys
import threading
import time

# the checkout, for interpreters where the package is not installed (make matrix's venvs)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from middleware import MwTracker  # noqa: E402
from peak_rss import peak_rss_kib  # noqa: E402 - beside this script


def run_all(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def wait_on_a(lock: threading.Lock) -> float:
    t0 = time.perf_counter()
    lock.acquire()
    return time.perf_counter() - t0


def wait_on_b(lock: threading.Lock) -> float:
    t0 = time.perf_counter()
    lock.acquire()
    return time.perf_counter() - t0


def take_uncontended(lock: threading.Lock, n: int) -> int:
    x = 0
    for i in range(n):
        with lock:
            x += i
    return x


def contention(store: str, seconds: float) -> dict[str, object]:
    tracker = MwTracker(service_name="locks", profile_dir=store, upload_interval=0.5)
    site = sys._getframe().f_lineno
    lock_a = threading.Lock()  # site + 1
    lock_b = threading.Lock()  # site + 2
    lock_u = threading.Lock()  # site + 3
    deadline = time.perf_counter() + seconds
    waited = {"a": [0.0] * 3, "b": [0.0] * 3}
    acquires = {"a": [0] * 3, "b": [0] * 3}

    def worker(which: str, k: int, lock: threading.Lock, wait: object, hold: float, outside: float) -> None:
        while time.perf_counter() < deadline:
            waited[which][k] += wait(lock)  # type: ignore[operator]
            acquires[which][k] += 1
            time.sleep(hold)
            lock.release()
            time.sleep(outside)

    def uncontended() -> None:
        while time.perf_counter() < deadline:
            take_uncontended(lock_u, 2000)
            time.sleep(0.001)

    threads = [threading.Thread(target=worker, args=("a", k, lock_a, wait_on_a, 0.003, 0.003), name=f"a{k}")
               for k in range(3)]
    threads += [threading.Thread(target=worker, args=("b", k, lock_b, wait_on_b, 0.001, 0.0015), name=f"b{k}")
                for k in range(3)]
    threads.append(threading.Thread(target=uncontended, name="u"))
    run_all(threads)
    stats = tracker.stats()
    tracker.stop()
    return {
        "sites": {"a": site + 1, "b": site + 2, "u": site + 3},
        "file": __file__,
        "waited_ns": {k: int(sum(v) * 1e9) for k, v in waited.items()},
        "acquires": {k: sum(v) for k, v in acquires.items()},
        "stats": {k: v for k, v in stats.items() if k.startswith("lock_")},
    }


def leaf_wait(lock: threading.Lock) -> None:
    lock.acquire(timeout=0.0003)


def mid0(lock: threading.Lock, d: int) -> None:
    return mid0(lock, d - 1) if d else leaf_wait(lock)


def mid1(lock: threading.Lock, d: int) -> None:
    return mid1(lock, d - 1) if d else leaf_wait(lock)


def mid2(lock: threading.Lock, d: int) -> None:
    return mid2(lock, d - 1) if d else leaf_wait(lock)


def stacks(store: str, seconds: float) -> dict[str, object]:
    tracker = MwTracker(service_name="lockstacks", profile_dir=store, upload_interval=0.3)
    held = threading.Lock()
    held.acquire()
    mids = (mid0, mid1, mid2)
    deadline = time.perf_counter() + seconds
    rounds = 0

    def run() -> None:
        nonlocal rounds
        while time.perf_counter() < deadline:
            rounds += 1
            for k in range(20):
                scope: dict[str, object] = {}
                exec(f"def fn_{k}_{rounds}(m, lock, d):\n    return m(lock, d)\n", scope)
                scope[f"fn_{k}_{rounds}"](mids[k % 3], held, k % 7)  # type: ignore[operator]

    threads = [threading.Thread(target=run, name=f"s{i}") for i in range(2)]
    run_all(threads)
    stats = tracker.stats()
    tracker.stop()
    return {"rounds": rounds, "stats": {k: v for k, v in stats.items() if k.startswith("lock_")}}


def stress(store: str, seconds: float) -> dict[str, object]:
    tracker = MwTracker(service_name="lockstress", profile_dir=store, upload_interval=0.2, upload=False)
    deadline = time.perf_counter() + seconds
    shared = [threading.Lock() for _ in range(3)]
    rlock = threading.RLock()
    cond = threading.Condition()
    sem = threading.BoundedSemaphore(2)
    q: queue.Queue[int] = queue.Queue(maxsize=8)
    done = [0] * 32

    def churn(k: int) -> None:
        rnd = random.Random(k)
        while time.perf_counter() < deadline:
            op = rnd.randrange(8)
            if op == 0:
                with shared[rnd.randrange(3)]:
                    time.sleep(rnd.random() * 0.0005)
            elif op == 1:
                lk = shared[rnd.randrange(3)]
                if lk.acquire(timeout=rnd.random() * 0.001):
                    lk.release()
            elif op == 2:
                lk = shared[rnd.randrange(3)]
                if lk.acquire(False):
                    lk.release()
            elif op == 3:
                with rlock, rlock:
                    time.sleep(0)
            elif op == 4:
                with cond:
                    cond.notify_all() if rnd.random() < 0.5 else cond.wait(0.001)
            elif op == 5:
                with sem:
                    time.sleep(0)
            elif op == 6:
                try:
                    q.put(k, timeout=0.001)
                    q.get(timeout=0.001)
                except (queue.Full, queue.Empty):
                    pass
            else:  # locks and a thread made and dropped
                fresh = threading.Lock()
                with fresh:
                    pass
                t = threading.Thread(target=threading.Event().wait, args=(0.0005,))
                t.start()
                t.join()
            done[k] += 1

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(32)]
    run_all(threads)
    stats = tracker.stats()
    tracker.stop()
    return {
        "ops": sum(done),
        "max_rss_kib": peak_rss_kib(),
        "stats": {k: v for k, v in stats.items() if k.startswith(("lock_", "export_block"))},
    }


if __name__ == "__main__":
    if sys.argv[1] == "contention":
        print(json.dumps(contention(sys.argv[2], float(sys.argv[3]))))
    elif sys.argv[1] == "stacks":
        print(json.dumps(stacks(sys.argv[2], float(sys.argv[3]))))
    elif sys.argv[1] == "stress":
        print(json.dumps(stress(sys.argv[2], float(sys.argv[3]))))
    else:
        raise SystemExit(f"unknown workload {sys.argv[1]!r}")
