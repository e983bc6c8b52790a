"""Threads without a Python thread state: their CPU is in the CPU profile, and counted once.

A C library's own threads (a BLAS pool, a driver's I/O threads) and a native thread that calls
into Python now and then (a ctypes callback: a thread state only for the call) use CPU that no
read of the interpreter's thread list sees. The workload (tests/targets/native_threads_workload.py)
runs a named and an unnamed native thread burning C, a native thread alternating 30 ms of C with
a 4 ms Python callback, and the main thread burning Python; every thread measures its own CPU
clock, and the process's CPU is measured around it all. Checked, with each way of taking CPU
samples (perf events, POSIX CPU timers, ticks only):

- the whole profile holds the process's CPU (before: the two native threads' 1.9 s of 4.1 s
  missing, without a word);
- each native thread's CPU is under its kernel name (``thread-<tid>`` when it has the process's
  own), in a ``[native thread]`` frame;
- the callback thread's Python CPU is the callback's, its C CPU is not charged to the callback, and
  its total is its clock (before: ticks only charged the C between two ticks to the callback, 1.35 s
  for 0.16; with CPU timers the thread's clock was counted again at each new thread state, 2.58 s
  for 1.36);
- the profiler's own threads (``mw-*``) are not in the profile, not even while they start.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.sampler
ROOT = Path(__file__).resolve().parents[2]
MS = 1_000_000


@pytest.fixture(scope="module")
def native_lib(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tests/targets/native_ext/native_threads.c built into a temporary directory."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the native-thread workload")
    so = tmp_path_factory.mktemp("native_threads") / "libmw_native_threads.so"
    proc = subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-O1", "-shared", "-fPIC",
                           "-o", str(so), str(ROOT / "tests" / "targets" / "native_ext" / "native_threads.c"),
                           "-pthread"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return str(so)


def run_workload(lib: str, cpu_timer: str | None, rate: int = 1000, crowd: int = 0, churn: int = 0,
                 py_churn: int = 0) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("MW_PROFILING_CPU_TIMER", None)
    if cpu_timer:
        env["MW_PROFILING_CPU_TIMER"] = cpu_timer
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "targets" / "native_threads_workload.py"), lib,
                           "--rate", str(rate), "--crowd", str(crowd), "--churn", str(churn),
                           "--py-churn", str(py_churn)],
                          capture_output=True, text=True, timeout=120, cwd=str(ROOT), env=env)
    assert proc.returncode == 0, f"workload failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def near(got: float, want: float, rel: float, abs_ms: float) -> bool:
    return abs(got - want) <= rel * want + abs_ms * MS


@pytest.mark.parametrize("cpu_timer", [None, "timer", "off"], ids=["default", "posix-timer", "ticks-only"])
def test_threads_without_python_have_their_cpu_in_the_profile_once(native_lib: str, cpu_timer: str | None) -> None:
    d = run_workload(native_lib, cpu_timer)
    truth = d["truth"]
    threads: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for thread, leaf, cpu in d["rows"]:
        threads[thread][leaf] += cpu
    shown = {t: {f: round(v / MS) for f, v in leaves.items() if v} for t, leaves in threads.items()}
    why = f"truth (ms): { {k: round(v / MS) for k, v in truth.items()} }, profile (ms): {shown}"

    # The whole process: what the profile holds is what the process used (the profile also holds
    # the tracker's start, before the first measurement: a few ms).
    assert near(d["profile_cpu_ns"], d["process_cpu_ns"], 0.03, 40), \
        f"profile {d['profile_cpu_ns'] / MS:.0f} ms for {d['process_cpu_ns'] / MS:.0f} ms of process CPU; {why}"
    assert not [t for t in threads if t.startswith("mw-")], f"the profiler's own threads are in the profile: {why}"

    # A native thread named by its library: under that name, all of its CPU, in C.
    pool = threads.get("pool-worker", {})
    assert set(pool) <= {"[native thread]"} and near(sum(pool.values()), truth["pool-worker"], 0.02, 15), why

    # The unnamed native thread: thread-<tid>, all of its CPU in C.
    unnamed = [t for t, leaves in threads.items() if t.startswith("thread-") and set(leaves) == {"[native thread]"}
               and near(sum(leaves.values()), truth["unnamed"], 0.02, 15)]
    assert len(unnamed) == 1, why

    # The callback thread: its clock in all (C and Python), the callback's CPU at the callback.
    caller = [t for t, leaves in threads.items() if t.startswith("thread-") and "py_burn" in leaves]
    assert len(caller) == 1, why
    leaves = threads[caller[0]]
    assert near(sum(leaves.values()), truth["caller"], 0.03, 30), why
    c_leaves = {"[native thread]", "[no Python frame]"}
    assert set(leaves) - c_leaves <= {"py_burn", "mixed.<locals>.on_callback", "on_callback"}, why  # 3.10: co_name
    # 160 ms of callback at 1 kHz: ~160 samples (sd 8%); ticks-only charges a tick's whole
    # interval to the stack it finds (the callback holds the thread for 4 ms of each 34).
    python_cpu = sum(v for f, v in leaves.items() if f not in c_leaves)
    high = 1.6 if cpu_timer == "off" else 1.35
    assert 0.65 * truth["callback"] <= python_cpu <= high * truth["callback"], why
    assert d["stats"]["native_thread_cpu_ns"] >= truth["pool-worker"] + truth["unnamed"] - 30 * MS, why


def test_thousands_of_threads_without_python_are_each_counted_once(native_lib: str) -> None:
    """4,500 native threads started as the profiler starts, each burning 0.4 ms three times with
    30 ms sleeps between: more threads than the sampler's first tables hold (they grow), and a
    first listing slowed down by thousands of threads met at once. Before: 406 threads never
    counted and the CPU of threads made during the first listing dropped as if they had been
    there before the profiler (4.998 s for 5.515 s); now each thread under its own name with
    all its CPU."""
    d = run_workload(native_lib, None, rate=100, crowd=4500)
    truth, stats = d["truth"], d["stats"]
    native = {t: v for t, leaf, v in d["rows"] if leaf == "[native thread]"}
    why = (f"crowd {truth['crowd'] / MS:.0f} ms in {truth['started']} threads, profile "
           f"{sum(native.values()) / MS:.0f} ms in {len(native)}, stats "
           f"{ {k: v for k, v in stats.items() if k.startswith('native')} }")
    assert truth["started"] == 4500, why
    assert len(native) == truth["started"], why
    assert stats["native_threads"] == truth["started"], why
    assert stats["native_threads_untracked"] == 0, why
    assert near(sum(native.values()), truth["crowd"], 0.03, 40), why


@pytest.mark.parametrize("py_churn", [0, 150], ids=["native-only", "python-threads-ending-too"])
def test_threads_that_end_before_any_listing_keep_their_cpu(native_lib: str, py_churn: int) -> None:
    """A native thread makes 60 threads one after the other, each burning 10 ms of C and ending: most
    live less than the 50 ms between two listings of the process's threads and were missing from
    the profile (124 ms of 1,001 for 100 such threads). The process's CPU clock counts them: what it
    gained between two listings beyond what the listed threads' clocks gained is theirs, under
    "[exited thread]". With Python threads ending too (150 of 3 ms each, started one after the
    other), a listing where one ended cannot tell their CPU apart (partly counted by the ticks):
    none of it is counted there (stats: exited_unknown), and nothing is counted twice."""
    d = run_workload(native_lib, None, rate=100, churn=60, py_churn=py_churn)
    truth, stats = d["truth"], d["stats"]
    native = sum(v for _, leaf, v in d["rows"] if leaf == "[native thread]")
    exited = sum(v for t, leaf, v in d["rows"] if leaf == "[exited thread]" and t == "exited threads")
    why = (f"truth {truth}, profile native {native / MS:.0f} ms + exited {exited / MS:.0f} ms, profile "
           f"{d['profile_cpu_ns'] / MS:.0f} ms, process {d['process_cpu_ns'] / MS:.0f} ms, stats "
           f"{ {k: v for k, v in stats.items() if 'exited' in k or k.startswith('native')} }")
    assert d["profile_cpu_ns"] <= 1.02 * d["process_cpu_ns"] + 20 * MS, why  # never more
    assert native + exited <= 1.02 * truth["churn"] + 20 * MS, why
    if py_churn:
        assert stats["exited_unknown"] > 0, why
        python = sum(v for t, leaf, v in d["rows"] if t.startswith("Thread-"))
        # 150 threads of 3 ms at 100 Hz: ~0.3 samples a thread, each standing for a period, so
        # their sum spreads: 0.83-1.27 of the truth in 30 runs here (before this session's
        # sampler changes as after), once 1.36 in a CI run on 3.12
        assert near(python, truth["py_churn"], 0.4, 30), why
    else:
        assert stats["exited_unknown"] == 0, why
        assert exited >= truth["churn"] / 2, why
        assert near(native + exited, truth["churn"], 0.03, 20), why
        assert near(d["profile_cpu_ns"], d["process_cpu_ns"], 0.03, 40), why


SLOW_START_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from middleware import MwTracker
t = MwTracker(profile_dir=sys.argv[2], upload_interval=3600, sample_rate=1000, instrument=False)
end = time.thread_time() + 1.0  # the exporter and SIGTERM threads start meanwhile, slowly
while time.thread_time() < end:
    pass
t.stop()
print(json.dumps(t.stats()))
"""


def test_the_profilers_own_threads_are_not_in_the_profile_while_they_start(tmp_path: Path) -> None:
    # GIVEN threads that take 0.4 s of their own CPU to start (a preloaded pthread_create; the
    # sampler's thread, created first, starts at once): the profiler's exporter and SIGTERM threads
    # start while the sampler lists the process's threads
    shim = tmp_path / "libslow_thread_start.so"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(shim),
                    str(Path(__file__).parent / "c" / "slow_thread_start.c"), "-ldl"], check=True)
    preload = f"{os.environ.get('LD_PRELOAD', '')} {shim}".strip()  # after ASan's when there
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-c", SLOW_START_CHILD, str(ROOT), str(store)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "LD_PRELOAD": preload})
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    # THEN no native thread is in the profile: they bear the profiler's names from their first
    # instant (before: each was an unnamed native thread until it named itself, 0.4 s of CPU each
    # under thread-<tid>)
    from middleware.pprof import parse_pprof

    native = [s for f in store.glob("*.pb.gz") for s in parse_pprof(f.read_bytes()).samples
              if any(fr.function == "[native thread]" for fr in s.stack)]
    assert native == [] and stats["native_thread_cpu_ns"] == 0, (stats["native_thread_cpu_ns"], native[:3])
