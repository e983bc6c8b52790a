"""Workloads for the peer comparison (bench/peers.py), each runnable on its own.

    python bench/peer_workloads.py WORKLOAD [--reps N | --seconds S]
        [--profiler none|middleware|pyroscope|ddtrace] [--rate HZ]
        [--stacks FILE] [--result FILE] [--external] [--verify-graph]

Workloads (every function name below is unique in this file and in demo_flask/calculations.py,
so a stack frame is identified by its function name alone):

* ``calc``: the demo's ``calc1``/``calc2``/``calc3`` in a loop.
* ``deep``: recursion to depth 150, then a busy loop at the bottom (hot stacks 150 frames deep).
* ``threads``: 8 threads, each recursing to depth 100 and then busy.
* ``callgraph``: call-heavy code with a known static call graph: tiny functions (a call every
  ~0.1 µs), recursion of varying depth (1..40), a context manager, a generator.

``GRAPH`` is the static call graph of all of them: for every function of this file (and the three
calc functions) the functions it calls. A profiler's sample whose stack holds a caller -> callee
pair of our own functions that is not in ``GRAPH`` shows a stack that never existed (a torn walk,
a reused frame read half-way). ``--verify-graph`` runs the workload under ``sys.setprofile`` and
lists every edge it observed that ``GRAPH`` lacks (there must be none).

The profiler is started in-process before the measured window when ``--profiler`` (or the
``MW_PEER_PROFILER`` variable) names one; py-spy and austin attach from outside and pass
``--external``, which adds the parent process's CPU during the window (the profiler is our parent)
to the result. The result file gets one JSON object: the window's wall time and process CPU, the
repetitions done, and what the profiler reports about itself.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from demo_flask.calculations import calc1, calc2, calc3  # noqa: E402

# --- the static call graph -------------------------------------------------------------------------
# caller -> the functions it calls, for every workload function (the keys). An edge is checked when
# its caller is a key and its callee a function of this file or of demo_flask/calculations.py.
GRAPH: dict[str, set[str]] = {
    "w_main": {"w_calc", "w_deep", "w_threads", "w_callgraph"},
    "w_calc": {"w_calc_rep"},
    "w_calc_rep": {"calc1", "calc2", "calc3"},
    "calc1": set(),
    "calc2": set(),
    "calc3": set(),
    "w_deep": {"w_deep_rec"},
    "w_deep_rec": {"w_deep_rec", "w_deep_spin"},
    "w_deep_spin": set(),
    "w_threads": {"<listcomp>"},  # starts and joins threads: threading's frames lie between
    "w_thread_body": {"w_thread_rec"},
    "w_thread_rec": {"w_thread_rec", "w_thread_spin"},
    "w_thread_spin": set(),
    "w_callgraph": {"cg_step"},
    "cg_step": {"cg_alpha", "cg_gamma", "cg_consume", "cg_guarded", "cg_descend"},
    "cg_alpha": {"cg_beta"},
    "cg_beta": set(),
    "cg_gamma": {"cg_delta"},
    "cg_delta": set(),
    "cg_consume": {"cg_produce", "cg_epsilon"},
    "cg_produce": {"cg_zeta"},
    "cg_zeta": set(),
    "cg_epsilon": set(),
    "cg_guarded": {"__enter__", "__exit__", "cg_iota"},
    "__enter__": {"cg_eta"},
    "__exit__": {"cg_theta"},
    "cg_eta": set(),
    "cg_theta": set(),
    "cg_iota": set(),
    "cg_descend": {"cg_descend", "cg_kappa", "cg_bottom"},
    "cg_kappa": set(),
    "cg_bottom": {"cg_lam", "cg_mu"},
    "cg_lam": set(),
    "cg_mu": set(),
}
# files whose functions are "our own" for the graph check (basenames)
OWN_FILES = frozenset({"peer_workloads.py", "calculations.py"})
# the outermost frame of a complete stack: the script's module or a thread's bootstrap
ROOT_FUNCTIONS = frozenset({"<module>", "_bootstrap"})


# --- calc --------------------------------------------------------------------------------------------
def w_calc_rep() -> int:
    return calc1(180) + calc2(130) + calc3(7)


def w_calc(reps: int, deadline: float | None) -> int:
    done = 0
    while done < reps and (deadline is None or time.perf_counter() < deadline):
        w_calc_rep()
        done += 1
    return done


# --- deep --------------------------------------------------------------------------------------------
DEEP_DEPTH = 150
THREAD_DEPTH = 100
THREADS = 8


def w_deep_spin(n: int) -> int:
    s = 0
    for i in range(n):
        s += i
    return s


def w_deep_rec(depth: int, n: int) -> int:
    if depth > 1:
        return w_deep_rec(depth - 1, n) + 1
    return w_deep_spin(n)


def w_deep(reps: int, deadline: float | None) -> int:
    done = 0
    while done < reps and (deadline is None or time.perf_counter() < deadline):
        w_deep_rec(DEEP_DEPTH - 3, 200_000)  # + w_main, w_deep, <module>: 150 frames at the spin
        done += 1
    return done


# --- threads -----------------------------------------------------------------------------------------
def w_thread_spin(n: int) -> int:
    s = 0
    for i in range(n):
        s ^= i
    return s


def w_thread_rec(depth: int, n: int) -> int:
    if depth > 1:
        return w_thread_rec(depth - 1, n) + 1
    return w_thread_spin(n)


def w_thread_body(reps: int, deadline: float | None, counts: list[int], k: int) -> None:
    done = 0
    while done < reps and (deadline is None or time.perf_counter() < deadline):
        w_thread_rec(THREAD_DEPTH - 4, 20_000)  # + run, _bootstrap_inner, _bootstrap: 100 frames
        done += 1
    counts[k] = done


def w_threads(reps: int, deadline: float | None) -> int:
    counts = [0] * THREADS
    ths = [threading.Thread(target=w_thread_body, args=(reps, deadline, counts, k), name=f"busy-{k}")
           for k in range(THREADS)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    return round(sum(counts) / THREADS)  # per thread (a time-bounded run stops them unevenly)


# --- callgraph ---------------------------------------------------------------------------------------
# Every caller has callees of its own, so a stack that pairs a frame with another caller's callee
# (a torn read) breaks the graph.
def cg_beta(x: int) -> int:
    return x * 2 + 1


def cg_alpha(x: int) -> int:
    return cg_beta(x) + cg_beta(x + 1)


def cg_delta(x: int) -> int:
    return x ^ 0x55


def cg_gamma(x: int) -> int:
    return cg_delta(x) - cg_delta(x >> 1)


def cg_zeta(i: int) -> int:
    return i * 3


def cg_produce(n: int) -> Iterator[int]:
    for i in range(n):
        yield cg_zeta(i)


def cg_epsilon(v: int) -> int:
    return v - 7


def cg_consume(n: int) -> int:
    total = 0
    for v in cg_produce(n):
        total += cg_epsilon(v)
    return total


def cg_eta() -> int:
    return 3


def cg_theta() -> int:
    return 4


def cg_iota(n: int) -> int:
    return n + 11


class Region:
    """A context manager whose enter and exit call functions of their own."""

    def __enter__(self) -> int:
        return cg_eta()

    def __exit__(self, *exc: object) -> None:
        cg_theta()


def cg_guarded(n: int) -> int:
    with Region() as base:
        return base + cg_iota(n)


def cg_kappa(d: int) -> int:
    return d & 7


def cg_lam(x: int) -> int:
    return x + 1


def cg_mu(x: int) -> int:
    return x - 1


def cg_bottom(x: int) -> int:
    return cg_lam(x) * cg_mu(x)


def cg_descend(d: int) -> int:
    if d > 0:
        return cg_descend(d - 1) + cg_kappa(d)
    return cg_bottom(d)


# recursion depths 1..40 in a fixed pseudo-random order (a plain LCG: no frames of random.py)
_DEPTHS = [1 + (((i * 1103515245 + 12345) >> 8) % 40) for i in range(257)]


def cg_step(i: int) -> int:
    s = 0
    for j in range(8):
        s += cg_alpha(j) + cg_gamma(j)
    s += cg_consume(12)
    s += cg_guarded(i & 15)
    s += cg_descend(_DEPTHS[i % len(_DEPTHS)])
    return s


def w_callgraph(reps: int, deadline: float | None) -> int:
    done = 0
    while done < reps and (deadline is None or time.perf_counter() < deadline):
        for i in range(100):
            cg_step(i)
        done += 1
    return done


WORKLOADS: dict[str, Callable[[int, float | None], int]] = {
    "calc": w_calc, "deep": w_deep, "threads": w_threads, "callgraph": w_callgraph}


# --- measurement -------------------------------------------------------------------------------------
def _cpu_ns_by_thread(pid: int) -> dict[str, int] | None:
    """CPU ns of each live thread of ``pid`` (/proc/PID/task/*/schedstat), keyed by ``comm:tid``;
    None when ``pid`` is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    out: dict[str, int] = {}
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[f"{comm}:{tid}"] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def process_cpu_ns(pid: int) -> int | None:
    """CPU time of every live thread of ``pid`` (ns); None when ``pid`` is gone."""
    by_thread = _cpu_ns_by_thread(pid)
    return None if by_thread is None else sum(by_thread.values())


def thread_cpu_by_name(pid: int) -> dict[str, int]:
    """CPU ns of each live thread of ``pid``, keyed by ``comm:tid``."""
    return _cpu_ns_by_thread(pid) or {}


class Profiler:
    """An in-process profiler: start before the window, stop and write stacks after it."""

    name = "none"

    def start(self, rate: int) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}

    def finish(self, stacks_path: str | None) -> dict[str, Any]:
        return {}


class Middleware(Profiler):
    name = "middleware"

    def start(self, rate: int) -> None:
        from middleware import MwTracker

        self.rate = rate
        self.tracker = MwTracker(sample_rate=rate, profile_dir="none", instrument=False, native=False)

    def stats(self) -> dict[str, Any]:
        s = self.tracker.stats()
        return {k: s.get(k, 0) for k in ("samples", "ticks", "sampler_cpu_ns", "torn_reads", "walk_retries",
                                         "dropped", "truncated", "late_ticks", "handler_ns", "timer_samples")}

    def finish(self, stacks_path: str | None) -> dict[str, Any]:
        profile = self.tracker.snapshot()
        stats = self.stats()
        self.tracker.stop()
        if stacks_path:
            # every stack the sampler read counts: on-CPU ones ("samples") and the others, whose
            # number is their wall time over the tick interval
            si, wi = profile.value_index("samples"), profile.value_index("wall")
            folded: Counter[str] = Counter()
            for s in profile.samples:
                n = max(s.values[si], round(s.values[wi] * self.rate / 1e9))
                if n:
                    folded[";".join(f"{fr.function} ({fr.file}:{fr.line})" for fr in s.stack)] += n
            with open(stacks_path, "w") as f:
                for stack, n in folded.items():
                    f.write(f"{stack} {n}\n")
        return {"stats": stats}


class Pyroscope(Profiler):
    """pyroscope-io: its py-spy thread in this process, pushing to ``MW_PEER_PYROSCOPE_URL``."""

    name = "pyroscope"

    def start(self, rate: int) -> None:
        import pyroscope

        self.mod = pyroscope
        url = os.environ.get("MW_PEER_PYROSCOPE_URL", "http://127.0.0.1:4040")
        app = os.environ.get("MW_PEER_PYROSCOPE_APP", "peer-bench")
        pyroscope.configure(application_name=app, server_address=url, sample_rate=rate)

    def finish(self, stacks_path: str | None) -> dict[str, Any]:
        ok = self.mod.shutdown()  # flushes the last profile to the server
        return {"shutdown_ok": bool(ok)}


class DdTrace(Profiler):
    """ddtrace's stack profiler at a fixed rate (adaptive sampling off), pprof written locally.

    Only the stack collector runs (memory and exception profiling off), so it samples what the
    other profilers sample; at most 512 frames per stack (default 64) so deep stacks fit.
    """

    name = "ddtrace"

    def start(self, rate: int) -> None:
        out = os.environ.get("MW_PEER_DDTRACE_OUT") or os.path.join(os.getcwd(), "ddtrace-prof")
        self.out = out
        defaults = {
            "DD_PROFILING_OUTPUT_PPROF": out,
            "_DD_PROFILING_STACK_ADAPTIVE_SAMPLING_ENABLED": "false",
            "DD_PROFILING_MAX_FRAMES": "512",
            "DD_PROFILING_MEMORY_ENABLED": "false",
            "DD_PROFILING_EXCEPTION_ENABLED": "false",
            "DD_PROFILING_LOCK_ENABLED": "false",
            "DD_INSTRUMENTATION_TELEMETRY_ENABLED": "false",
            "DD_REMOTE_CONFIGURATION_ENABLED": "false",
            "DD_TRACE_AGENT_URL": "http://127.0.0.1:9",  # nothing listens: uploads are off anyway
        }
        for k, v in defaults.items():
            os.environ.setdefault(k, v)
        from ddtrace.internal.datadog.profiling import stack
        from ddtrace.profiling import Profiler as DdProfiler

        self.prof = DdProfiler()
        self.prof.start()
        stack.set_interval(1.0 / rate)

    def finish(self, stacks_path: str | None) -> dict[str, Any]:
        self.prof.stop(flush=True)
        meta: dict[str, Any] = {"files": sorted(glob.glob(self.out + ".*.pprof"))}
        for fn in glob.glob(self.out + ".*.internal_metadata.json"):
            try:
                with open(fn) as f:
                    m = json.load(f)
                for k in ("sample_count", "sample_capture_cpu_time_us", "sampling_interval_us"):
                    if isinstance(m.get(k), (int, float)):
                        meta[k] = meta.get(k, 0) + m[k] if k != "sampling_interval_us" else m[k]
            except (OSError, ValueError):
                continue
        return {"ddtrace": meta}


PROFILERS: dict[str, type[Profiler]] = {"none": Profiler, "middleware": Middleware, "pyroscope": Pyroscope,
                                        "ddtrace": DdTrace}


def verify_graph(name: str, reps: int) -> dict[str, Any]:
    """Run ``name`` under sys.setprofile: the checked edges seen, and those ``GRAPH`` lacks."""
    seen: Counter[tuple[str, str]] = Counter()

    def own(code: Any) -> bool:
        return os.path.basename(code.co_filename) in OWN_FILES

    def hook(frame: Any, event: str, arg: Any) -> None:
        if event != "call":
            return
        back = frame.f_back
        if back is not None and back.f_code.co_name in GRAPH and own(back.f_code) and own(frame.f_code):
            seen[(back.f_code.co_name, frame.f_code.co_name)] += 1

    threading.setprofile(hook)
    sys.setprofile(hook)
    try:
        w_main(name, reps, None)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    missing = sorted(f"{a}->{b}" for (a, b) in seen if b not in GRAPH.get(a, set()))
    return {"edges": len(seen), "calls": sum(seen.values()), "undeclared": missing}


def w_main(name: str, reps: int, deadline: float | None) -> int:
    return WORKLOADS[name](reps, deadline)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--reps", type=int, default=None, help="repetitions (fixed work)")
    ap.add_argument("--seconds", type=float, default=None, help="run for this long instead (calibration)")
    ap.add_argument("--profiler", default=os.environ.get("MW_PEER_PROFILER", "none"), choices=sorted(PROFILERS))
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--stacks", default=None, help="write the profiler's stacks here (folded), if it can")
    ap.add_argument("--result", default=None, help="write the JSON result here (default: stdout)")
    ap.add_argument("--external", action="store_true", help="our parent is the profiler: add its CPU")
    ap.add_argument("--verify-graph", action="store_true", help="check GRAPH against sys.setprofile")
    args = ap.parse_args()

    if args.verify_graph:
        out: dict[str, Any] = verify_graph(args.workload, args.reps or 2)
    else:
        reps = args.reps if args.reps is not None else (10**9 if args.seconds else 10)
        prof = PROFILERS[args.profiler]()
        c_start = time.process_time()
        prof.start(args.rate)
        startup_cpu = time.process_time() - c_start
        parent = os.getppid()
        threads0 = thread_cpu_by_name(os.getpid())
        stats0 = prof.stats()
        ext0 = process_cpu_ns(parent) if args.external else None
        w0, c0 = time.perf_counter(), time.process_time()
        deadline = w0 + args.seconds if args.seconds else None
        done = w_main(args.workload, reps, deadline)
        w1, c1 = time.perf_counter(), time.process_time()
        ext1 = process_cpu_ns(parent) if args.external else None
        stats1 = prof.stats()
        threads1 = thread_cpu_by_name(os.getpid())
        out = {"workload": args.workload, "profiler": args.profiler, "rate": args.rate, "reps": done,
               "wall": w1 - w0, "cpu": c1 - c0, "startup_cpu": startup_cpu}
        if ext0 is not None and ext1 is not None:
            out["ext_cpu"] = (ext1 - ext0) / 1e9
        # CPU of threads alive at both ends that are not the main thread or the workload's
        # (the in-process profiler's own threads: its sampler, exporter, uploader)
        main_tid = str(threading.get_native_id())
        agents = {k: threads1[k] - threads0[k] for k in threads1
                  if k in threads0 and not k.endswith(":" + main_tid)}
        out["agent_threads_cpu"] = {k: v / 1e9 for k, v in agents.items() if v > 0}
        if stats0 or stats1:
            out["stats_window"] = {k: stats1.get(k, 0) - stats0.get(k, 0) for k in stats1}
        out.update(prof.finish(args.stacks))
        ru = resource.getrusage(resource.RUSAGE_SELF)
        out["self_cpu_total"] = ru.ru_utime + ru.ru_stime
    text = json.dumps(out)
    if args.result:
        with open(args.result, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
