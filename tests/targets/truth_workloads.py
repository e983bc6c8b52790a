"""Hostile workloads with measured ground truth for tests/native/test_truth.py, each run in a child
process (a crash in the sampler becomes a readable test failure; every run gets a fresh profiler):

    python tests/targets/truth_workloads.py NAME --rate HZ --seconds S [--threads N] [--native] [--samples N]

prints one JSON object:

    {"python": [major, minor], "truth": {...}, "profile": {"files": [...], "stacks": [...]},
     "summary": workloads.summarize(profile), "stats": tracker.stats()}

where each stack is {"thread", "frames": [[function, file index, line], ...] root first, "cpu",
"wall", "n", "labels"}.

Workloads:
  bursty  threads that burn 1.5-5 ms of CPU in a burn function of their own, then block 10-20 ms
          (time.sleep, queue.Queue.get with a timeout, recv on a socketpair answered by a peer
          thread after a delay, Lock.acquire with a timeout); truth: time.thread_time
  graph   call-heavy code whose call graph is known statically (tiny functions, recursion of
          random depth, class and generator context managers, generators, labels blocks) in
          --threads busy threads, on another CPU than the profiler's threads; truth: the graph
          (in the test) and time.thread_time
  churn   short-lived code objects: --threads (2) threads exec'ing uniquely named functions
          under labels unit=<i>, freshly written modules imported then dropped from sys.modules,
          short threads, and a thread making ~100,000 code objects a second (renamed copies of
          one function, each called once and freed); truth: every code object that ran with its
          line range, and those of the real source files the profile names
  lines   a recursive target and a loop with two hot lines, Python frames only or --native,
          for --seconds and on until --samples on-CPU samples (at most 4 x --seconds)
  idle    --threads idle threads, movers between two waits, one busy thread (wall time)
  short   batches of threads of ~0.2 ms of CPU each; truth: their CPU (process - main - sampler)
  light   6 rounds of --threads (250) light threads, each 3 x (1 ms of CPU in light_burst, 0.25 s
          asleep), less CPU than a period at 100 Hz; truth: each thread's time.thread_time
  ending  threads that burn and end at once; truth: each thread's time.thread_time and wall
  phases  one thread whose ~1.2 ms bursts have two halves (phase_head, phase_tail) between 2-4 ms
          sleeps; truth: each half's time.thread_time and wall
  released  bursts in Python, in C without the GIL and in the kernel; truth: each part's thread_time
  masked  one thread burning in bursts with every signal blocked, then blocking them only around
          short bursts; truth: each function's time.thread_time
  periodic  one thread on a fixed cycle of --cycle-ms with absolute deadlines (a 100 Hz loop):
          30% of each cycle working, the rest asleep, for --seconds, the profile read every
          second; truth: each second's wall time in each part (perf_counter)
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import json
import os
import queue
import random
import resource
import shutil
import socket
import sys
import sysconfig
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from middleware import MwTracker  # noqa: E402
from middleware.profile import Profile  # noqa: E402
from workloads import summarize  # noqa: E402  (tests/targets/ is sys.path[0] when run as a script)

STARTED = time.time()
TRACKER: MwTracker | None = None
LINGER_S = 0.05  # a thread sleeps this long after its last measurement so a tick reads its clock
QUALNAMES = sys.version_info >= (3, 11)  # 3.10 code objects have no co_qualname


def dump_profile(p: Profile) -> dict[str, Any]:
    """Every stack of the profile, root first, with its thread, values and labels."""
    ci, wi, si = p.value_index("cpu"), p.value_index("wall"), p.value_index("samples")
    files: dict[str, int] = {}
    stacks = []
    for s in p.samples:
        stacks.append({
            "thread": s.label("thread_name") or "?",
            "frames": [[f.function, files.setdefault(f.file, len(files)), f.line] for f in s.stack],
            "cpu": s.values[ci], "wall": s.values[wi], "n": s.values[si],
            "labels": {k: v for k, v in s.labels if k not in ("thread_name", "pid")},
        })
    return {"files": list(files), "stacks": stacks}


def pin_apart() -> list[int]:
    """Puts the profiler's native threads (mw-sampler, mw-export) on one CPU and every other
    thread, and so every thread started later, on another: the sampler then reads a thread that
    really runs at the same time, as on any multi-core machine. Returns the two CPUs ([] with
    fewer than two)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return []
    mine, app = cpus[0], cpus[1]
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                comm = f.read().strip()
            os.sched_setaffinity(int(task), {mine} if comm.startswith("mw-") else {app})
        except OSError:  # the thread is gone
            pass
    return [mine, app]


# --- bursty: short CPU bursts between blocking calls ----------------------------------------------
# Four burn functions with the same body (distinct code objects, so each thread's CPU has a name
# of its own: burn_b, burn_c and burn_d are copies of burn_a's code under their own names). Each
# spins until its thread has used `ms` milliseconds of CPU; it has no Python callee, so "inside
# burn_x" is "burn_x is the leaf".
def burn_a(ms: float) -> int:
    end = time.thread_time() + ms / 1e3
    x = 0
    while time.thread_time() < end:
        for i in range(100):
            x += i * i
    return x


def renamed(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A function running a copy of ``fn``'s code whose code object is named ``name``."""
    code = fn.__code__.replace(co_name=name, **({"co_qualname": name} if QUALNAMES else {}))
    return types.FunctionType(code, fn.__globals__, name)


burn_b, burn_c, burn_d = (renamed(burn_a, name) for name in ("burn_b", "burn_c", "burn_d"))


# (thread name, burn function, burst length range in ms, how the thread blocks afterwards).
# A blocking call costs its thread 40-100 µs of CPU on a VM (system calls, context switches):
# true CPU of the blocking call, about 2% of these bursts.
BURSTY = (
    ("sleeper", burn_a, (1.5, 3.0), "sleep"),
    ("getter", burn_b, (4.0, 5.0), "queue"),
    ("receiver", burn_c, (2.5, 4.0), "socket"),
    ("locker", burn_d, (3.0, 5.0), "lock"),
)
BLOCK_S = (0.010, 0.020)


def run_bursty(args: argparse.Namespace) -> dict[str, Any]:
    n = max(1, min(args.threads or 4, len(BURSTY)))
    deadline = time.monotonic() + args.seconds
    out: dict[str, Any] = {}
    q: queue.Queue[int] = queue.Queue()
    held = threading.Lock()
    held.acquire()  # never released during the run: acquire(timeout=...) always waits it out
    ours, theirs = socket.socketpair()

    def peer() -> None:
        """Answers each request on the socketpair after 10-20 ms."""
        rng = random.Random(99)
        while True:
            req = theirs.recv(1)
            if not req or req == b"q":
                break
            time.sleep(rng.uniform(*BLOCK_S))
            theirs.send(b"!")
        out["peer"] = {"thread_cpu_s": time.thread_time(), "tid": threading.get_native_id()}

    def on_socket(_t: float) -> None:
        ours.send(b"?")
        ours.recv(1)

    def on_queue(t: float) -> None:
        try:
            q.get(timeout=t)
        except queue.Empty:
            pass

    def on_lock(t: float) -> None:
        held.acquire(timeout=t)

    blockers: dict[str, Callable[[float], Any]] = {
        "sleep": time.sleep, "queue": on_queue, "socket": on_socket, "lock": on_lock}

    def bursty(name: str, burn: Callable[[float], int], lo: float, hi: float, kind: str, seed: int) -> None:
        rng = random.Random(seed)
        block = blockers[kind]
        burned, bursts = 0.0, 0
        while time.monotonic() < deadline:
            t0 = time.thread_time()
            burn(rng.uniform(lo, hi))
            burned += time.thread_time() - t0
            bursts += 1
            block(rng.uniform(*BLOCK_S))
        # thread_time counts from the thread's creation, as the profile does for a new thread
        out[name] = {"burn": burn.__name__, "burn_cpu_s": burned, "bursts": bursts, "block": kind,
                     "thread_cpu_s": time.thread_time(), "tid": threading.get_native_id()}
        time.sleep(LINGER_S)

    main0 = time.thread_time()
    peer_t = threading.Thread(target=peer, name="peer")
    peer_t.start()
    threads = [threading.Thread(target=bursty, args=(name, burn, lo, hi, kind, i), name=name)
               for i, (name, burn, (lo, hi), kind) in enumerate(BURSTY[:n])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ours.send(b"q")
    peer_t.join()
    time.sleep(LINGER_S)
    ours.close()
    theirs.close()
    held.release()
    out["MainThread"] = {"thread_cpu_s": time.thread_time() - main0, "tid": threading.get_native_id()}
    return {"threads": out, "burn_functions": sorted(b.__name__ for _, b, _, _ in BURSTY[:n])}


# --- graph: a statically known call graph ---------------------------------------------------------
# Every function below calls only the functions listed for it in test_truth.GRAPH; none calls
# into another Python module except through the context managers and tracker.labels.
MASK = 0xFFFF


def tiny_add(a: int, b: int) -> int:
    return (a + b) & MASK


def tiny_mul(a: int, b: int) -> int:
    return (a * b) & MASK


def mid_one(x: int) -> int:
    return tiny_mul(x, 3) ^ 1


def mid_two(x: int) -> int:
    return tiny_add(x, 7) ^ 5


def call_heavy(n: int) -> int:
    """A call every ~0.3 µs: tiny functions, and mid functions that call tiny ones."""
    s = 0
    for i in range(n):
        s = tiny_add(s, i)
        if i & 3:
            s = mid_two(s)
        else:
            s = mid_one(s)
    return s


def recurse(depth: int) -> int:
    if depth <= 1:
        return call_heavy(8)
    return tiny_add(recurse(depth - 1), depth)


class Guard:
    """A class-based context manager whose __enter__/__exit__ call tiny functions."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> Guard:
        self.n = tiny_add(self.n, 1)
        return self

    def __exit__(self, *exc: object) -> bool:
        self.n = tiny_mul(self.n, 3)
        return False


@contextlib.contextmanager
def gen_cm(n: int) -> Iterator[int]:
    v = tiny_add(n, 2)
    yield v
    mid_one(v)


def with_class_cm(n: int) -> int:
    # mid_two runs at the same depth as __exit__ right before it: a sampler that stitches a
    # stale callee onto a reused frame slot would show __exit__ > mid_two
    with Guard(n) as g:
        s = call_heavy(n)
        s = mid_two(s)
    return s ^ g.n


def with_gen_cm(n: int) -> int:
    with gen_cm(n) as v:
        s = call_heavy(v)
        s = mid_two(s)
    return s


def gen_values(n: int) -> Iterator[int]:
    for i in range(n):
        yield tiny_add(i, i)


def use_generator(n: int) -> int:
    s = 0
    for v in gen_values(n):
        s ^= mid_one(v)
    return s


def labelled_task(n: int, key: str) -> int:
    assert TRACKER is not None
    with TRACKER.labels(task=key):
        s = call_heavy(n)
        s ^= recurse(n % 5 + 1)
    return s


def graph_worker(plan: list[tuple[int, int]], seconds: float, out: dict[str, Any], key: str) -> None:
    deadline = time.monotonic() + seconds
    acc, i, size = 0, 0, len(plan)
    while time.monotonic() < deadline:
        task, arg = plan[i % size]
        i += 1
        if task == 0:
            acc ^= call_heavy(arg)
        elif task == 1:
            acc ^= recurse(arg)
        elif task == 2:
            acc ^= with_class_cm(arg)
        elif task == 3:
            acc ^= with_gen_cm(arg)
        elif task == 4:
            acc ^= use_generator(arg)
        else:
            acc ^= labelled_task(arg, "abc"[arg % 3])
    out[key] = {"thread_cpu_s": time.thread_time(), "tasks": i, "tid": threading.get_native_id()}
    time.sleep(LINGER_S)


def run_graph(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(7)
    plan: list[tuple[int, int]] = []
    for _ in range(5000):  # random depths 1-30, call-heavy runs of 20-200 calls
        task = rng.randrange(6)
        plan.append((task, rng.randint(1, 30) if task == 1 else rng.randint(20, 200)))
    out: dict[str, Any] = {}
    n = args.threads or 1
    pinned = pin_apart()
    threads = [threading.Thread(target=graph_worker, args=(plan[i * 7:] + plan[:i * 7], args.seconds, out,
                                                             f"graph-{i}"), name=f"graph-{i}")
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = {"workload": graph_worker.__code__.co_filename, "contextlib": contextlib.__file__,
             "threading": threading.__file__}
    import middleware.labels
    import middleware.tracker
    files["labels"] = middleware.labels.__file__
    files["tracker"] = middleware.tracker.__file__
    return {"threads": out, "files": files, "pinned": pinned}


# --- churn: short-lived code objects --------------------------------------------------------------
def code_ranges(code: types.CodeType) -> Iterator[tuple[str, str, int, int]]:
    """(qualname, name, first line, last line) of a code object and every code object inside it."""
    lines = [ln for _, _, ln in code.co_lines() if ln is not None and ln > 0]
    qual = getattr(code, "co_qualname", code.co_name)
    yield qual, code.co_name, min(lines + [code.co_firstlineno]), max(lines + [code.co_firstlineno])
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from code_ranges(c)


def record_code(truth: list[str], code: types.CodeType) -> None:
    # kept as JSON text: holding the name strings themselves would keep them from being freed
    for qual, name, lo, hi in code_ranges(code):
        truth.append(json.dumps([code.co_filename, qual, name, lo, hi]))


def churn_source(i: int, rng: random.Random) -> str:
    """A unit of uniquely named functions (a nested one, a method, a comprehension). Half the
    units start at line 1, so consecutive code objects often agree in first line and in the
    sizes of their names and tables (a freed one's memory is then reused for the next one);
    the others start at a random line, so line ranges differ between code objects of a file."""
    pad = "\n" * (rng.randint(1, 300) if rng.random() < 0.5 else 0)
    return pad + f"""def cx_{i}(n):
    def cx_{i}_in(k):
        t = 0
        for j in range(k):
            t += j * {i % 7 + 1}
        return t
    s = 0
    for r in range(n):
        s += cx_{i}_in(r % 40)
    return s


class CK_{i}:
    def cm_{i}(self, n):
        vals = [v * v for v in range(n)]
        return sum(vals)


def ct_{i}(n):
    x = 0
    for j in range(n):
        x ^= j * j
    return x
"""


def module_source(j: int, rng: random.Random) -> str:
    pad = "\n" * rng.randint(0, 200)
    return f'''"""A module written and imported by the churn workload."""
{pad}

def mod_{j}_work(n):
    s = 0
    for i in range(n):
        s += i % 13
    return s


class ModK_{j}:
    def step_{j}(self, n):
        t = 0
        while n > 0:
            t += n
            n -= 1
        return t
'''


def churn_unit(i: int, rng: random.Random, truth: list[str], live: list[threading.Thread]) -> None:
    """Compiles, runs and drops one unit, inside labels unit=<i> (so a sample that shows another
    unit's function under this unit's labels shows a name its code object did not have)."""
    assert TRACKER is not None
    with TRACKER.labels(unit=i):
        code = compile(churn_source(i, rng), f"<churn-exec-{i % 4}>", "exec")
        record_code(truth, code)
        ns: dict[str, Any] = {"__name__": f"churn_{i}"}
        exec(code, ns)
        del code  # from here on only the functions hold their code objects
        for _ in range(rng.randint(1, 3)):
            ns[f"cx_{i}"](rng.randint(2, 40))
        getattr(ns[f"CK_{i}"](), f"cm_{i}")(rng.randint(10, 500))
        if i % 3 == 0:  # short threads whose target is this unit's function
            for k in range(2):
                t = threading.Thread(target=ns[f"ct_{i}"], args=(rng.randint(2000, 20000),),
                                     name=f"churn-t-{i}-{k}")
                t.start()
                live.append(t)
        else:
            ns[f"ct_{i}"](rng.randint(10, 3000))
        ns.clear()  # breaks the function <-> globals cycle: the code objects are freed right away


def churn_module(j: int, rng: random.Random, tmp: str, truth: list[str]) -> None:
    """Writes a fresh module, imports it, calls it and drops it from sys.modules."""
    path = os.path.join(tmp, f"churnmod_{j}.py")
    src = module_source(j, rng)
    with open(path, "w") as f:
        f.write(src)
    record_code(truth, compile(src, path, "exec"))
    importlib.invalidate_caches()
    mod = importlib.import_module(f"churnmod_{j}")
    getattr(mod, f"mod_{j}_work")(rng.randint(100, 5000))
    getattr(getattr(mod, f"ModK_{j}")(), f"step_{j}")(rng.randint(100, 3000))
    del sys.modules[f"churnmod_{j}"], mod


def churner(k: int, n: int, deadline: float, tmp: str, truth: list[str], counts: dict[str, int]) -> None:
    """Churner k of n: units k, k+n, k+2n... (names never collide between churners)."""
    rng = random.Random(k)
    live: list[threading.Thread] = []
    i = k
    while time.monotonic() < deadline:
        i += n
        churn_unit(i, rng, truth, live)
        counts["units"] += 1
        if i % (10 * n) == k:
            churn_module(i, rng, tmp, truth)
            counts["modules"] += 1
        if len(live) >= 16:
            counts["threads"] += len(live)
            for t in live:
                t.join()
            live.clear()
    counts["threads"] += len(live)
    for t in live:
        t.join()


def fast_template(n: int) -> int:
    """Copied by fast_churner under a new name and first line for every call."""
    s = 0
    for k in range(n):
        s += k * k
    return s


FAST = {"file": "<churn-fast>", "prefix": "fast_", "line0": 1000, "step": 10, "mod": 97}


def fast_churner(deadline: float, counts: dict[str, int]) -> None:
    """Hundreds of thousands of code objects a second: copy i of fast_template is named fast_<i>,
    starts at line line0 + (i % mod) * step, is called once and freed at once (so the next copy
    reuses its memory, and a stale read of the one before finds the next one's bytes)."""
    base = fast_template.__code__
    g = globals()
    qual = {"co_qualname": ""} if QUALNAMES else {}
    i = 0
    while time.monotonic() < deadline:
        for _ in range(500):
            i += 1
            name = FAST["prefix"] + str(i)
            if qual:
                qual["co_qualname"] = name
            code = base.replace(co_name=name, co_filename=FAST["file"],
                                co_firstlineno=FAST["line0"] + (i % FAST["mod"]) * FAST["step"], **qual)
            types.FunctionType(code, g)(i % 40)
            del code
    counts["fast_copies"] = i


def run_churn(args: argparse.Namespace) -> dict[str, Any]:
    truth: list[str] = []
    tmp = tempfile.mkdtemp(prefix="mw-churn-")
    sys.path.insert(0, tmp)
    sys.dont_write_bytecode = True
    deadline = time.monotonic() + args.seconds
    counts = {"units": 0, "modules": 0, "threads": 0, "fast_copies": 0}
    n = args.threads or 2
    threads = [threading.Thread(target=churner, args=(k, n, deadline, tmp, truth, counts), name=f"churner-{k}")
               for k in range(n)]
    threads.append(threading.Thread(target=fast_churner, args=(deadline, counts), name="fast-churner"))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(LINGER_S)
    sys.path.remove(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    (_, _, lo, hi), = code_ranges(fast_template.__code__)
    first = fast_template.__code__.co_firstlineno
    fast = dict(FAST, count=counts["fast_copies"], lo=lo - first, hi=hi - first)
    return {"code": [json.loads(x) for x in truth], "fast": fast, **counts}


def real_file(name: str) -> str | None:
    """The source file of a frame's file name: a path, or a frozen stdlib module's source."""
    if name.startswith("<frozen ") and name.endswith(">"):
        mod = name[len("<frozen "):-1]
        base = os.path.join(sysconfig.get_paths()["stdlib"], *mod.split("."))
        for cand in (base + ".py", os.path.join(base, "__init__.py")):
            if os.path.isfile(cand):
                return cand
        return None
    return name if name.endswith(".py") and os.path.isfile(name) else None


def real_code(files: list[str], skip: set[str]) -> tuple[dict[str, list[tuple[str, str, int, int]]], list[str]]:
    """For each real source file among `files`: every code object compiled from it (the same
    names and line tables as the loaded module's). A file modified since this process started
    may not be what was loaded: left out, and listed."""
    out: dict[str, list[tuple[str, str, int, int]]] = {}
    changed = []
    for name in files:
        path = None if name in skip else real_file(name)
        if path is None:
            continue
        try:
            if os.stat(path).st_mtime >= STARTED - 1:
                changed.append(name)
                continue
            with open(path, "rb") as f:
                code = compile(f.read(), name, "exec")
        except (OSError, SyntaxError, ValueError):
            continue
        out[name] = list(code_ranges(code))
    return out, changed


# --- lines: per-line shares, Python frames only or with native frames -----------------------------
def rec_lines(depth: int) -> int:
    if depth > 0:
        return rec_lines(depth - 1) + 1  # REC_CALL
    s = 0
    for i in range(4000): s += i * i  # REC_A
    for i in range(2000): s ^= i  # REC_B
    return s


def busy_two(n: int) -> int:
    s = 0
    for i in range(n): s += i * 3  # BUSY_A
    for i in range(n): s += i % 7  # BUSY_B
    return s


def tagged_lines(*fns: Callable[..., Any]) -> dict[str, int]:
    out = {}
    for fn in fns:
        src, start = inspect.getsourcelines(fn)
        for k, line in enumerate(src):
            if "# " in line and line.rstrip().split("# ")[-1].isupper():
                out[line.rstrip().split("# ")[-1]] = start + k
    return out


def run_lines(args: argparse.Namespace) -> dict[str, Any]:
    """Runs for --seconds, and on (up to 4 x --seconds) until the profiler took --samples on-CPU
    samples: on a loaded machine a busy thread is on CPU at fewer ticks."""
    assert TRACKER is not None
    start = time.monotonic()
    cpu = {"rec_lines": 0.0, "busy_two": 0.0}
    next_check = start + args.seconds
    while True:
        t0 = time.thread_time()
        rec_lines(20)
        t1 = time.thread_time()
        busy_two(3000)
        cpu["rec_lines"] += t1 - t0
        cpu["busy_two"] += time.thread_time() - t1
        now = time.monotonic()
        if now >= next_check:
            if now - start >= 4 * args.seconds or TRACKER.stats()["cpu_samples"] >= args.samples:
                break
            next_check = now + 0.1
    return {"lines": tagged_lines(rec_lines, busy_two), "cpu_s": cpu, "file": rec_lines.__code__.co_filename,
            "seconds": time.monotonic() - start}


# --- idle: many idle threads, some that move, one busy ---------------------------------------------
# Idle threads wait in idle_a / idle_b the whole run; movers sleep in phase_one for the first half
# and in phase_two for the second; the main thread burns. The sampler reads most of them on no tick
# at all (quiet ticks): their wall time must still be theirs, in their own function, and a mover's
# wall must follow it from phase_one to phase_two.
def idle_a(ev: threading.Event) -> None:
    ev.wait()


def idle_b(ev: threading.Event) -> None:
    ev.wait()


def phase_one(until: float) -> None:
    while time.monotonic() < until:  # one sleep (a wake-up would make the tick after it busy)
        time.sleep(max(0.0, until - time.monotonic()))


def phase_two(until: float) -> None:
    while time.monotonic() < until:
        time.sleep(max(0.0, until - time.monotonic()))


def mover(half: float, end: float) -> None:
    phase_one(half)
    phase_two(end)


def busy_main(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(500))


def run_idle(args: argparse.Namespace) -> dict[str, Any]:
    assert TRACKER is not None
    ev = threading.Event()
    idle = [threading.Thread(target=idle_a if i % 2 == 0 else idle_b, args=(ev,), name=f"idle-{i}", daemon=True)
            for i in range(args.threads or 300)]
    for t in idle:
        t.start()
    time.sleep(0.3)  # every thread started and blocked
    TRACKER.snapshot(reset=True)
    t0 = time.monotonic()
    half, end = t0 + args.seconds / 2, t0 + args.seconds
    movers = [threading.Thread(target=mover, args=(half, end), name=f"mover-{i}") for i in range(20)]
    for t in movers:
        t.start()
    busy_main(args.seconds)
    for t in movers:
        t.join()
    elapsed = time.monotonic() - t0
    # The idle threads stay blocked (daemon threads: they do not hold the exit): the profile is
    # taken after this returns, and a thread woken now would be sampled on its way out, outside
    # its function.
    return {"elapsed_s": elapsed, "idle": {t.name: ("idle_a" if i % 2 == 0 else "idle_b") for i, t in enumerate(idle)}}


# --- recycled: code objects remade at a freed one's address under another name -----------------------
# One thread alternates between a copy of burn_a's code named recycled_long (3 ms of CPU a call,
# its first line 1,000 lines on) and one named recycled_short (1 ms, 2,000 lines on), each copy
# made, called once and freed before the next is made: the next one takes its memory, so the same
# code address and the same instructions come back under the other name. A profiler that knows a
# stack by its code addresses and instructions alone puts one name's CPU under the other's.
# Truth: thread_time around each call.
RECYCLED = (("recycled_long", 3.0, 1000), ("recycled_short", 1.0, 2000))


def run_recycled(args: argparse.Namespace) -> dict[str, Any]:
    base = burn_a.__code__
    cpu = {name: 0.0 for name, _, _ in RECYCLED}
    copies = same_address = 0
    last = 0
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        for name, ms, shift in RECYCLED:
            code = base.replace(co_name=name, co_firstlineno=base.co_firstlineno + shift,
                                **({"co_qualname": name} if QUALNAMES else {}))
            fn = types.FunctionType(code, burn_a.__globals__, name)
            copies += 1
            same_address += id(code) == last
            last = id(code)
            t = time.thread_time()
            fn(ms)
            cpu[name] += time.thread_time() - t
            del fn, code
    return {"cpu": cpu, "copies": copies, "same_address": same_address}


# --- short: threads that live less than one sampling period ----------------------------------------
# Batches of threads that each run ~0.1 ms of Python and end, for --seconds. Truth: the process's
# CPU minus the main thread's and the sampler thread's (stats()["sampler_cpu_ns"]): all the rest
# is the short threads' own, from their start-up to their exit.
def short_task() -> None:
    sum(range(3000))


def run_short(args: argparse.Namespace) -> dict[str, Any]:
    assert TRACKER is not None
    s0 = TRACKER.stats()["sampler_cpu_ns"]
    p0, m0 = time.process_time(), time.thread_time()
    end = time.monotonic() + args.seconds
    n = 0
    while time.monotonic() < end:
        batch = [threading.Thread(target=short_task, name=f"short-{n + i}") for i in range(args.threads or 50)]
        for t in batch:
            t.start()
        for t in batch:
            t.join()
        n += len(batch)
    process, main = time.process_time() - p0, time.thread_time() - m0
    sampler = (TRACKER.stats()["sampler_cpu_ns"] - s0) / 1e9
    return {"threads": n, "short_cpu_s": process - main - sampler, "main_cpu_s": main, "sampler_cpu_s": sampler}


def light_burst(seconds: float) -> float:
    t = time.thread_time()
    while time.thread_time() - t < seconds:
        pass
    return time.thread_time() - t


def light_thread(cpu: dict[str, float], bursts: dict[str, float]) -> None:
    burst = 0.0
    for _ in range(3):
        burst += light_burst(0.001)
        time.sleep(0.25)
    cpu[threading.current_thread().name] = time.thread_time()
    bursts[threading.current_thread().name] = burst


def run_light(args: argparse.Namespace) -> dict[str, Any]:
    assert TRACKER is not None
    cpu: dict[str, float] = {}
    bursts: dict[str, float] = {}
    s0 = TRACKER.stats()["sampler_cpu_ns"]
    p0, m0 = time.process_time(), time.thread_time()
    for round_ in range(6):
        threads = [threading.Thread(target=light_thread, args=(cpu, bursts), name=f"light-{round_}-{i}")
                   for i in range(args.threads or 250)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        del threads, t  # their Thread objects go: their timers are retired, their ends counted
    time.sleep(0.05)
    # what each thread measured misses its exit (after its last thread_time); the process's CPU
    # less the main thread's and the sampler's has it, and the few ms of the exporter thread
    process, main = time.process_time() - p0, time.thread_time() - m0
    sampler = (TRACKER.stats()["sampler_cpu_ns"] - s0) / 1e9
    return {"threads": len(cpu), "light_cpu_s": sum(cpu.values()), "light_burst_s": sum(bursts.values()),
            "light_process_s": process - main - sampler}


def ending_thread(seconds: float, out: dict[str, float], walls: dict[str, float]) -> None:
    w0, t0 = time.perf_counter(), time.thread_time()
    while time.thread_time() - t0 < seconds:
        sum(range(200))
    name = threading.current_thread().name
    out[name], walls[name] = time.thread_time() - t0, time.perf_counter() - w0  # and ends at once


def run_ending(args: argparse.Namespace) -> dict[str, Any]:
    """Threads one after the other, each burning and ending at once: ``ending-<i>`` (args.threads,
    default 20, of args.seconds of CPU each), then 60 ``brief-<i>`` of 20 ms."""
    out: dict[str, float] = {}
    walls: dict[str, float] = {}
    time.sleep(LINGER_S)  # the sampler's first tick counts the threads it finds from then on
    plan = [(f"ending-{i}", args.seconds) for i in range(args.threads or 20)]
    plan += [(f"brief-{i}", 0.02) for i in range(60)]
    for name, seconds in plan:
        t = threading.Thread(target=ending_thread, args=(seconds, out, walls), name=name)
        t.start()
        t.join()
    time.sleep(LINGER_S)  # the last one's end is met before the profile is taken
    return {"threads": out, "walls": walls}


# --- phases: where in its bursts a thread is read ---------------------------------------------------
phase_head, phase_tail = (renamed(burn_a, name) for name in ("phase_head", "phase_tail"))


def run_phases(args: argparse.Namespace) -> dict[str, Any]:
    """One thread, ``phased``, for args.seconds: bursts of two halves, 0.6 ms of CPU in phase_head
    then 0.6 ms in phase_tail, each followed by a 2-4 ms sleep. Truth: each phase's CPU
    (time.thread_time) and wall time (perf_counter), and the sleeps' wall time."""
    out = {"cpu": {"phase_head": 0.0, "phase_tail": 0.0},
           "wall": {"phase_head": 0.0, "phase_tail": 0.0, "sleep": 0.0}, "bursts": 0}

    def phased() -> None:
        rng = random.Random(7)
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            for fn in (phase_head, phase_tail):
                w0, t0 = time.perf_counter(), time.thread_time()
                fn(0.6)
                out["cpu"][fn.__name__] += time.thread_time() - t0
                out["wall"][fn.__name__] += time.perf_counter() - w0
            w0 = time.perf_counter()
            time.sleep(rng.uniform(0.002, 0.004))
            out["wall"]["sleep"] += time.perf_counter() - w0
            out["bursts"] += 1
        time.sleep(LINGER_S)

    t = threading.Thread(target=phased, name="phased")
    t.start()
    t.join()
    return out


# --- released: CPU spent without the GIL, in C and in the kernel -----------------------------------
in_python = renamed(burn_a, "in_python")


# The buffers outlive the calls: CPython 3.11.2+ unlinks a returning function's frame before it
# frees its locals, so that freeing is CPU at the caller's line in any profile that reads frames
# (under the sanitizers, where unmapping a 256 KiB buffer costs ~0.1 ms, in_kernel came out at
# 0.78-0.93 of its CPU measured around the call).
HASHED = b"y" * (1 << 16)
ZEROED = bytearray(1 << 18)


def in_c(ms: float) -> int:
    """Hashing 64 KiB buffers (hashlib releases the GIL for them) for ``ms`` of this thread's CPU."""
    end = time.thread_time() + ms / 1e3
    data, n = HASHED, 0
    while time.thread_time() < end:
        n += len(hashlib.sha256(data).digest())
    return n


def in_kernel(ms: float) -> int:
    """Reading /dev/zero (the kernel clears the buffer; FileIO releases the GIL) for ``ms`` of this
    thread's CPU."""
    end = time.thread_time() + ms / 1e3
    n = 0
    with open("/dev/zero", "rb", buffering=0) as f:
        buf = ZEROED
        while time.thread_time() < end:
            n += f.readinto(buf) or 0
    return n


def run_released(args: argparse.Namespace) -> dict[str, Any]:
    """One thread, ``releasing``, for args.seconds: bursts of 0.4 ms of CPU in Python (in_python),
    0.4 ms in C without the GIL (in_c) and 0.4 ms mostly in the kernel (in_kernel), each burst
    followed by a 2-4 ms sleep. Truth: each part's CPU (time.thread_time) and the kernel's share
    of in_kernel's (getrusage's system time)."""
    out = {"cpu": {"in_python": 0.0, "in_c": 0.0, "in_kernel": 0.0}, "kernel_share": 0.0, "bursts": 0}
    system = [0.0]

    def releasing() -> None:
        rng = random.Random(11)
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            for fn in (in_python, in_c, in_kernel):
                t0, s0 = time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD).ru_stime
                fn(0.4)
                out["cpu"][fn.__name__] += time.thread_time() - t0
                if fn is in_kernel:
                    system[0] += resource.getrusage(resource.RUSAGE_THREAD).ru_stime - s0
            time.sleep(rng.uniform(0.002, 0.004))
            out["bursts"] += 1
        time.sleep(LINGER_S)

    t = threading.Thread(target=releasing, name="releasing")
    t.start()
    t.join()
    out["kernel_share"] = system[0] / max(out["cpu"]["in_kernel"], 1e-9)
    return out


# --- masked: a thread that blocks every signal, the profiler's included -------------------------------
masked_a, masked_b, short_masked, open_c = (
    renamed(burn_a, name) for name in ("masked_a", "masked_b", "short_masked", "open_c"))


def run_masked(args: argparse.Namespace) -> dict[str, Any]:
    """One thread, ``masking``, blocking every signal (``signal.pthread_sigmask``, as a worker
    keeping signals for the main thread does): for the first half of args.seconds it keeps them
    blocked and burns in bursts of 1.2 ms in masked_a then 0.6 ms in masked_b, each followed by a
    1-2 ms sleep; for the second half it blocks them only around 1.2 ms bursts in short_masked,
    each followed by 0.6 ms in open_c and a 1-2 ms sleep. Truth: each function's CPU
    (time.thread_time)."""
    import signal

    out: dict[str, Any] = {"cpu": {"masked_a": 0.0, "masked_b": 0.0, "short_masked": 0.0, "open_c": 0.0}}
    every = signal.valid_signals()

    def burst(fn: Callable[[float], int], ms: float, rng: random.Random | None) -> None:
        t0 = time.thread_time()
        fn(ms)
        out["cpu"][fn.__name__] += time.thread_time() - t0
        if rng:
            time.sleep(rng.uniform(0.001, 0.002))

    def masking() -> None:
        rng = random.Random(5)
        start, cpu0 = time.monotonic(), time.thread_time()
        signal.pthread_sigmask(signal.SIG_BLOCK, every)
        while time.monotonic() < start + args.seconds / 2:
            burst(masked_a, 1.2, rng)
            burst(masked_b, 0.6, rng)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, every)
        while time.monotonic() < start + args.seconds:
            signal.pthread_sigmask(signal.SIG_BLOCK, every)
            burst(short_masked, 1.2, None)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, every)
            burst(open_c, 0.6, rng)
        out["thread_cpu"] = time.thread_time() - cpu0  # the loops, the sleeps' calls, the masks' too
        time.sleep(LINGER_S)

    t = threading.Thread(target=masking, name="masking")
    t.start()
    t.join()
    return out


# --- startmasked: threads that block every signal soon after they start ------------------------------
early_open, late_masked = (renamed(burn_a, name) for name in ("early_open", "late_masked"))


def run_startmasked(args: argparse.Namespace) -> dict[str, Any]:
    """``args.threads`` threads one after the other, each burning 5 ms in early_open, then blocking
    every signal (``signal.pthread_sigmask``) and burning 45 ms in late_masked. A tick first reads such
    a thread 0-10 ms (at 100 Hz) after its start: half of the time inside late_masked, by then with
    10 samples of its own CPU timer at 2 kHz. Truth: each thread's CPU (time.thread_time) from its
    first instruction to its last measurement, and each function's."""
    import signal

    every = signal.valid_signals()
    out: dict[str, Any] = {"cpu": {"early_open": 0.0, "late_masked": 0.0}, "thread_cpu": 0.0}

    def starts_masking() -> None:
        t0 = time.thread_time()
        early_open(5)
        t1 = time.thread_time()
        signal.pthread_sigmask(signal.SIG_BLOCK, every)
        t2 = time.thread_time()
        late_masked(45)
        t3 = time.thread_time()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, every)
        out["cpu"]["early_open"] += t1 - t0
        out["cpu"]["late_masked"] += t3 - t2
        out["thread_cpu"] += time.thread_time() - t0
        time.sleep(LINGER_S)

    for i in range(args.threads or 20):
        t = threading.Thread(target=starts_masking, name=f"startmasked-{i}")
        t.start()
        t.join()
    return out


# --- periodic: a loop on the same cycle as the ticks ---------------------------------------------------
def periodic_work(until: float) -> None:
    while time.perf_counter() < until:
        pass


def periodic_wait(until: float) -> None:
    left = until - time.perf_counter()
    if left > 0:
        time.sleep(left)


def run_periodic(args: argparse.Namespace) -> dict[str, Any]:
    """One thread, ``periodic``, for args.seconds: cycles of args.cycle_ms on absolute deadlines,
    the first 30% in periodic_work (burning), the rest in periodic_wait (asleep). The main thread
    reads the profile (snapshot, reset) every second. Truth, per second: each part's wall time
    (perf_counter, from the thread's wake-up to the end of its work, and from there to its
    wake-up). Returns {"windows": [{"work", "wait": profile wall ns, "truth_work", "truth_wait": s}]}."""
    assert TRACKER is not None
    cycle = args.cycle_ms / 1e3
    truth = {"work": 0.0, "wait": 0.0}
    done = threading.Event()

    def periodic() -> None:
        t0 = woke = time.perf_counter()
        k = 0
        while not done.is_set():
            start = t0 + k * cycle
            periodic_work(start + 0.3 * cycle)
            worked = time.perf_counter()
            truth["work"] += worked - woke
            periodic_wait(start + cycle)
            woke = time.perf_counter()
            truth["wait"] += woke - worked
            k += 1

    t = threading.Thread(target=periodic, name="periodic")
    t.start()
    TRACKER.snapshot(reset=True)
    windows = []
    before = dict(truth)
    for _ in range(int(args.seconds)):
        time.sleep(1.0)
        profile = TRACKER.snapshot(reset=True)
        now = dict(truth)
        wi = profile.value_index("wall")
        wall = {"work": 0, "wait": 0}
        for smp in profile.samples:
            names = {f.function for f in smp.stack}
            for part in wall:
                if f"periodic_{part}" in names:
                    wall[part] += smp.values[wi]
        windows.append({**wall, "truth_work": now["work"] - before["work"], "truth_wait": now["wait"] - before["wait"]})
        before = now
    done.set()
    t.join()
    return {"windows": windows}


WORKLOADS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "bursty": run_bursty, "graph": run_graph, "churn": run_churn, "lines": run_lines, "idle": run_idle,
    "short": run_short, "light": run_light, "ending": run_ending, "phases": run_phases,
    "released": run_released, "masked": run_masked, "periodic": run_periodic,
    "startmasked": run_startmasked, "recycled": run_recycled}


def main() -> None:
    global TRACKER
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--native", action="store_true", help="MwTracker(native=True): C frames too")
    ap.add_argument("--samples", type=int, default=0, help="lines: run on until this many on-CPU samples")
    ap.add_argument("--wall-rate", type=int, default=None, help="ticks a second with CPU timers (default: 100)")
    ap.add_argument("--cycle-ms", type=float, default=10.0, help="periodic: the loop's cycle")
    args = ap.parse_args()
    TRACKER = MwTracker(sample_rate=args.rate, wall_rate=args.wall_rate, profile_dir="none", instrument=False,
                        native=args.native)
    # the main thread's CPU over the profile window (from before the reset to the call whose swap
    # ends it): what a workload measures inside itself is a lower bound of the window's, this about
    # an upper bound (the window also has the few µs of that last call before its swap)
    window_start = time.thread_time()
    TRACKER.snapshot(reset=True)
    truth = WORKLOADS[args.workload](args)
    truth["main_window_cpu_s"] = time.thread_time() - window_start
    profile = TRACKER.snapshot()
    stats = TRACKER.stats()
    TRACKER.stop()
    dumped = dump_profile(profile)
    if args.workload == "churn":
        churn_files = {c[0] for c in truth["code"]}
        truth["real_code"], truth["changed_files"] = real_code(dumped["files"], churn_files)
        summary: dict[str, Any] = {}
    else:
        summary = summarize(profile)
    json.dump({"python": list(sys.version_info[:2]), "truth": truth, "profile": dumped, "summary": summary,
               "stats": stats}, sys.stdout)


if __name__ == "__main__":
    main()
