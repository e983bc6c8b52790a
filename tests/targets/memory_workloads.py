"""Allocation workloads for the memory profiles, each run in a fresh interpreter; the truth goes
to stdout as JSON.

    python memory_workloads.py accuracy STORE_DIR ROUNDS
        Four functions that allocate known blocks (bytes objects of 10, 300 and 20,000 bytes,
        and bytearrays: two blocks each) into a preallocated list, and nothing else. The truth: each function's
        blocks and bytes, measured with tracemalloc (one call each, its result kept alive)
        before the profiler starts. Then ROUNDS rounds of all four with the profiler on, the
        results dropped at once (everything is allocated and freed again).

    python memory_workloads.py growth STORE_DIR ROUNDS
        Blocks grown by realloc (a string built by +=, a bytearray extended, a list appended to,
        a dict filled) and tuples in a list, each result kept alive; the truth per call from
        tracemalloc. The in-use profile at the end against it.

    python memory_workloads.py leak STORE_DIR SECONDS
        `leak_slowly` keeps ~1 MiB a second alive (small bytes objects) while `churn_dicts` and
        `churn_strings` allocate and drop ~20 times as much; exports every second.

    python memory_workloads.py stress STORE_DIR SECONDS
        Threads that allocate, pass objects to other threads through a queue and free them there;
        fork children while they run (each child allocates and exits through the normal path;
        not under ASan, whose allocator is not fork-safe);
        stop() and start again while they allocate; exports every 0.2 s. Reports the counters.
"""
from __future__ import annotations

import json
import os
import queue
import random
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

# the checkout, for interpreters where the package is not installed (make matrix's venvs)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from middleware import MwTracker  # noqa: E402
from peak_rss import peak_rss_kib  # noqa: E402 - beside this script

# Loop indices made once: iterating over range() would allocate an int per index past 256 (a
# temporary block that tracemalloc's before/after comparison cannot see, but the profile does).
INDEX = tuple(range(20000))


def small_bytes() -> list[Any]:
    out: list[Any] = [None] * 20000
    for i in INDEX:
        out[i] = bytes(10)
    return out


def medium_bytes() -> list[Any]:
    out: list[Any] = [None] * 4000
    for i in INDEX[:4000]:
        out[i] = bytes(300)
    return out


def large_bytes() -> list[Any]:
    out: list[Any] = [None] * 60
    for i in INDEX[:60]:
        out[i] = bytes(20000)
    return out


def bytearrays() -> list[Any]:
    out: list[Any] = [None] * 3000
    for i in INDEX[:3000]:
        out[i] = bytearray(100)
    return out


FUNCTIONS: dict[str, Callable[[], list[Any]]] = {
    f.__name__: f for f in (small_bytes, medium_bytes, large_bytes, bytearrays)
}


def measure(fn: Callable[[], list[Any]]) -> tuple[int, int]:
    """Blocks and bytes fn allocates (its result kept alive), from tracemalloc's traces."""
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    kept = fn()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    diff = after.compare_to(before, "filename")
    blocks = sum(d.count_diff for d in diff if d.count_diff > 0)
    size = sum(d.size_diff for d in diff if d.size_diff > 0)
    del kept
    return blocks, size


def accuracy(store: str, rounds: int) -> dict[str, Any]:
    truth = {}
    for name, fn in FUNCTIONS.items():
        fn()  # warm: the code's own first-call allocations are not the function's
        blocks, size = measure(fn)
        truth[name] = {"objects": blocks, "bytes": size}
    tracker = MwTracker()
    for _ in range(rounds):
        for fn in FUNCTIONS.values():
            fn()
    stats = tracker.stats()
    tracker.stop()
    return {"truth": truth, "stats": {k: v for k, v in stats.items() if k.startswith("memory")}}


def grow_str() -> Any:
    s = ""
    for _ in INDEX[:20000]:
        s += "abc"  # resized in place: a realloc each time, ~60 KB at the end
    return s


def grow_bytearray() -> Any:
    b = bytearray()
    chunk = b"x" * 50
    for _ in INDEX[:10000]:
        b += chunk
    return b


def grow_list() -> Any:
    out: list[Any] = []
    for i in INDEX[:50000]:
        out.append(i)
    return out


def grow_dict() -> Any:
    d: dict[int, None] = {}
    for i in INDEX[:15000]:
        d[i] = None
    return d


def kept_tuples() -> Any:
    return [(i, i) for i in INDEX[:10000]]


GROWING: dict[str, Callable[[], Any]] = {
    f.__name__: f for f in (grow_str, grow_bytearray, grow_list, grow_dict, kept_tuples)
}


def growth(store: str, rounds: int) -> dict[str, Any]:
    """In use: each function's result kept alive, ROUNDS times; the truth per call from
    tracemalloc (what stays allocated once it returns)."""
    # warm, the results kept: dropped, their tuples would refill the interpreter's free list of
    # 2-tuples, which then serves the measured call's first 2,000 without an allocation
    # (tracemalloc would see 80% of them; the profiled rounds, whose results stay, see all)
    keep = [fn() for fn in GROWING.values()]
    keep.append([(i, i) for i in INDEX[:5000]])  # and what the free list holds now
    truth = {name: measure(fn)[1] for name, fn in GROWING.items()}
    tracker = MwTracker()
    for _ in range(rounds):
        for fn in GROWING.values():
            keep.append(fn())
        time.sleep(0.006)  # more of the sampler's ticks: a duty cycle gets more stretches to draw
    tracker.flush()
    stats = tracker.stats()
    tracker.stop()
    return {"truth": truth, "stats": {k: v for k, v in stats.items() if k.startswith("memory")}}


def leak_slowly(keep: list[Any]) -> None:
    for _ in range(1000):
        keep.append(bytes(70))  # ~100 bytes each: ~100 KiB per call


def churn_dicts() -> int:
    n = 0
    for i in range(5000):
        d = {"k": i, "v": [i, i, i, i]}
        n += len(d)
    return n


def churn_strings() -> int:
    n = 0
    for i in range(5000):
        n += len(" ".join(["item", str(i), "x" * 40]))
    return n


def leak(store: str, seconds: float) -> dict[str, Any]:
    tracker = MwTracker()
    keep: list[Any] = []
    t0 = time.monotonic()
    leaked_at = []
    while time.monotonic() - t0 < seconds:
        tick = time.monotonic()
        leak_slowly(keep)
        leaked_at.append(tick - t0)
        while time.monotonic() - tick < 0.1:
            churn_dicts()
            churn_strings()
        time.sleep(0.002)
    stats = tracker.stats()
    tracker.stop()
    # what leak_slowly keeps allocated: the objects and the list's array of pointers to them
    kept_bytes = len(keep) * sys.getsizeof(bytes(70)) + sys.getsizeof(keep) - sys.getsizeof([])
    return {"leaked_calls": len(leaked_at), "kept": len(keep), "kept_bytes": kept_bytes,
            "stats": {k: v for k, v in stats.items() if k.startswith(("memory", "export_memory"))}}


def stress(store: str, seconds: float) -> dict[str, Any]:
    tracker = MwTracker()
    q: queue.Queue[Any] = queue.Queue(maxsize=1000)
    stop = threading.Event()

    def producer() -> None:
        rnd = random.Random()
        while not stop.is_set():
            obj = [bytes(rnd.randrange(1, 3000)) for _ in range(rnd.randrange(1, 50))]
            try:
                q.put(obj, timeout=0.05)
            except queue.Full:
                pass

    def consumer() -> None:
        while not stop.is_set():
            try:
                obj = q.get(timeout=0.05)
            except queue.Empty:
                continue
            obj.append(bytearray(len(obj) * 10))  # realloc of a list another thread made
            del obj

    def short_lived() -> None:
        while not stop.is_set():
            t = threading.Thread(target=lambda: [str(i) * 5 for i in range(2000)])
            t.start()
            t.join()

    threads = [threading.Thread(target=f, name=f"{f.__name__}-{i}")
               for i, f in enumerate([producer, producer, consumer, consumer, short_lived])]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    forks = restarts = 0
    children_ok = 0
    # Under ASan (make asan) no fork: GCC's libasan takes no allocator lock around fork(), so a
    # child forked while a native thread (the exporter, the sampler) is inside malloc can inherit
    # a held allocator mutex and block for ever (seen once in a few runs). glibc's malloc is
    # fork-safe; the forks run in the same test without ASan.
    forking = "ASAN_OPTIONS" not in os.environ
    while time.monotonic() - t0 < seconds:
        time.sleep(0.15)
        if not forking:
            restarts += 1
            tracker.stop()
            tracker = MwTracker()
            continue
        pid = os.fork()
        if pid == 0:
            try:
                junk = [bytes(100) for _ in range(20000)]
                del junk
                code = 0
            except BaseException:
                code = 1
            os._exit(code)
        forks += 1
        _, status = os.waitpid(pid, 0)
        children_ok += int(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)
        if forks % 4 == 0:
            tracker.stop()
            tracker = MwTracker()
            restarts += 1
    stop.set()
    for t in threads:
        t.join()
    stats = tracker.stats()
    tracker.stop()
    return {"forks": forks, "children_ok": children_ok, "restarts": restarts,
            "max_rss_kib": peak_rss_kib(),
            "stats": {k: v for k, v in stats.items() if k.startswith(("memory", "export_memory"))}}


def main() -> None:
    name, store, arg = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ["MW_PROFILE_DIR"] = store
    os.environ.setdefault("MW_PROFILING_UPLOAD_INTERVAL", "1")
    os.environ.setdefault("MW_PROFILING_LOCKS", "false")
    os.environ.setdefault("MW_PROFILING_MEMORY", "true")
    if name == "accuracy":
        out = accuracy(store, int(arg))
    elif name == "growth":
        out = growth(store, int(arg))
    elif name == "leak":
        out = leak(store, float(arg))
    elif name == "stress":
        out = stress(store, float(arg))
    else:
        raise SystemExit(f"unknown workload {name!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
