"""Stress target for the sampler (run in a child process by tests/native/test_stress.py).

For --seconds: thread churn (hundreds of short threads a second), recursion 1,000 deep,
generators and coroutines, functions created with exec and discarded in a loop, greenlets
switching every few microseconds, and threads made by C running a ctypes callback — all while
the sampler runs at a high rate. Prints a JSON report of what the profile contains.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from middleware import MwTracker  # noqa: E402


def churn(deadline: float, counter: list[int], at_least: int) -> None:
    def short_lived() -> None:
        s = 0
        for i in range(2000):
            s += i

    while time.monotonic() < deadline or counter[0] < at_least:
        batch = [threading.Thread(target=short_lived, name="churn") for _ in range(20)]
        for t in batch:
            t.start()
        for t in batch:
            t.join()
        counter[0] += len(batch)


def deep_recursion(n: int) -> int:
    if n == 0:
        s = 0
        for i in range(20000):
            s += i
        return s
    return deep_recursion(n - 1) + 1


def recurse_loop(deadline: float) -> None:
    while time.monotonic() < deadline:
        deep_recursion(950)
        time.sleep(0.002)  # leave the GIL to the churner now and then


def gen_numbers(n: int):
    for i in range(n):
        yield i * i


def generators_loop(deadline: float) -> None:
    while time.monotonic() < deadline:
        sum(gen_numbers(20000))
        time.sleep(0.002)


async def coro_leaf(n: int) -> int:
    s = 0
    for i in range(n):
        s += i
        if i % 1000 == 0:
            await asyncio.sleep(0)
    return s


async def coro_main(deadline: float) -> None:
    while time.monotonic() < deadline:
        await asyncio.gather(*(coro_leaf(5000) for _ in range(10)))
        await asyncio.sleep(0.002)


def coroutines_loop(deadline: float) -> None:
    asyncio.run(coro_main(deadline))


def exec_loop(deadline: float) -> None:
    i = 0
    while time.monotonic() < deadline:
        ns: dict[str, object] = {}
        exec(f"def exec_fn_{i % 50}(n):\n    s = 0\n    for k in range(n):\n        s += k\n    return s\n", ns)
        ns[f"exec_fn_{i % 50}"](3000)  # type: ignore[operator]
        del ns
        i += 1
        if i % 10 == 0:
            time.sleep(0.002)


def greenlets_loop(deadline: float, tracker: MwTracker) -> None:
    """Two greenlets at different depths switching every few microseconds, each under its own
    labels (if greenlet is installed): their C stacks are sliced and copied at every switch, and
    the thread's label slot written, under the sampler's signals."""
    try:
        import greenlet
    except ImportError:
        return
    peers: dict[str, greenlet.greenlet] = {}

    def greenlet_leaf(other: str, depth: int, side: str) -> None:
        if depth:
            return greenlet_leaf(other, depth - 1, side)
        with tracker.labels(side=side):
            while time.monotonic() < deadline:
                sum(range(30))
                peers[other].switch()
        return None

    peers["a"] = greenlet.greenlet(lambda: greenlet_leaf("b", 40, "a"))
    peers["b"] = greenlet.greenlet(lambda: greenlet_leaf("a", 3, "b"))
    peers["a"].switch()  # back here when a ends; then b, at its next step
    if not peers["b"].dead:
        peers["b"].switch()


def native_threads_loop(deadline: float, counter: list[int]) -> None:
    """Threads made by C (libc's pthread_create), whose start routine is a ctypes callback: each
    runs Python under a thread state made for the call and freed at its return, inside C (qsort
    calling back a Python comparison: C frames between Python ones), and ends; new ones reuse
    the freed states' memory and ids."""
    libc = ctypes.CDLL(None)
    libc.pthread_create.argtypes = [ctypes.POINTER(ctypes.c_ulong), ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_void_p]
    libc.pthread_join.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
    cmp_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))

    def native_cmp(a: Any, b: Any) -> int:
        return a[0] - b[0]

    compare = cmp_type(native_cmp)

    def native_start(_arg: Any) -> None:
        values = (ctypes.c_int * 3000)(*range(3000, 0, -1))  # ~30 ms of comparisons: met by ticks
        libc.qsort(values, len(values), ctypes.sizeof(ctypes.c_int), compare)

    start = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(native_start)
    batches = 0
    # two batches at least, however slow the machine (a sanitized build under contention takes
    # seconds a batch): the second's threads reuse the first's freed thread states
    while time.monotonic() < deadline or batches < 2:
        batches += 1
        ids = [ctypes.c_ulong() for _ in range(4)]
        made = [i for i in ids if libc.pthread_create(ctypes.byref(i), None, start, None) == 0]
        for i in made:
            libc.pthread_join(i.value, None)
        counter[0] += len(made)


def io_loop(deadline: float, io: dict[str, int]) -> None:
    """--native: blocking I/O while the sampler's signals flow; any EINTR failure is counted."""
    import select

    r, w = os.pipe()
    try:
        while time.monotonic() < deadline:
            try:
                time.sleep(0.001)
                os.write(w, b"x" * 16)
                if os.read(r, 16) != b"x" * 16:
                    io["errors"] += 1
                if select.select([r], [], [], 0.001)[0]:
                    io["errors"] += 1
                io["ops"] += 1
            except InterruptedError:
                io["errors"] += 1
    finally:
        os.close(r)
        os.close(w)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--native", action="store_true", help="native frames too (plus an I/O thread)")
    ap.add_argument("--min-threads", type=int, default=0,
                    help="the churning thread goes on past --seconds until it has started this many threads")
    args = ap.parse_args()
    tracker = MwTracker(sample_rate=args.rate, profile_dir=os.environ.get("MW_STRESS_DIR", "none"),
                        upload_interval=1.0, instrument=False, native=args.native)
    sys.setswitchinterval(0.001)
    deadline = time.monotonic() + args.seconds
    counter, native_counter = [0], [0]
    workers = [
        threading.Thread(target=churn, args=(deadline, counter, args.min_threads), name="churner"),
        threading.Thread(target=recurse_loop, args=(deadline,), name="recurser"),
        threading.Thread(target=generators_loop, args=(deadline,), name="generators"),
        threading.Thread(target=coroutines_loop, args=(deadline,), name="coroutines"),
        threading.Thread(target=exec_loop, args=(deadline,), name="exec"),
        threading.Thread(target=greenlets_loop, args=(deadline, tracker), name="greenlets"),
        threading.Thread(target=native_threads_loop, args=(deadline, native_counter), name="native-starter"),
    ]
    io = {"ops": 0, "errors": 0}
    if args.native:
        workers.append(threading.Thread(target=io_loop, args=(deadline, io), name="io"))
    for w in workers:
        w.start()
    snapshots = 0
    while any(w.is_alive() for w in workers):
        time.sleep(0.5)
        tracker.snapshot()  # concurrent readers of the native tables
        snapshots += 1
    for w in workers:
        w.join()
    p = tracker.snapshot()
    functions = sorted({f.function for s in p.samples for f in s.stack})
    max_depth = max((len(s.stack) for s in p.samples), default=0)
    stats = tracker.stats()
    tracker.stop()
    json.dump({"threads_started": counter[0], "native_threads_started": native_counter[0],
               "functions": functions, "max_depth": max_depth, "stats": stats, "snapshots": snapshots,
               "seconds": args.seconds, "io": io}, sys.stdout)


if __name__ == "__main__":
    main()
