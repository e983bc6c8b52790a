"""Sampler stress (no crash, sane counters): 20 seconds of thread churn, deep recursion, generators,
coroutines and exec'd throw-away functions under a 1 kHz sampler. The target runs in a child
process: a crash or hang is a test failure with the child's output, not a dead test run.

MW_STRESS_SECONDS overrides the duration (make asan and make matrix use shorter runs)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sampler, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


# "timer": POSIX CPU timers (where perf_event_open is refused), whose threads also credit their
# exit from a thread-specific-data destructor; a shorter run, the thread churn is what it adds
@pytest.mark.parametrize("cpu_timer", [None, "timer"], ids=["default", "posix-timer"])
def test_stress_no_crash_and_expected_functions(cpu_timer):
    seconds = float(os.environ.get("MW_STRESS_SECONDS", "20"))
    env = dict(os.environ)
    if cpu_timer:
        env["MW_PROFILING_CPU_TIMER"] = cpu_timer
        seconds = min(seconds, 10.0)
    proc = subprocess.run(
        # hundreds of threads a second here, ~70 under the sanitizers: the churn goes on until 50 a second
        [sys.executable, str(ROOT / "tests" / "targets" / "stress_target.py"), "--seconds", str(seconds),
         "--min-threads", str(int(50 * seconds) + 1)],
        capture_output=True, text=True, timeout=seconds * 4 + 120, cwd=str(ROOT), env=env,
    )
    assert proc.returncode == 0, f"stress target died (rc={proc.returncode}):\n{proc.stderr[-6000:]}"
    r = json.loads(proc.stdout)
    fns = set(r["functions"])
    for expected in ("deep_recursion", "gen_numbers", "coro_leaf", "churn.<locals>.short_lived"):
        bare = expected.rsplit(".", 1)[-1]  # CPython 3.10 code objects carry co_name only
        assert expected in fns or (sys.version_info < (3, 11) and bare in fns), (expected, sorted(fns)[:50])
    assert any(f.startswith("exec_fn_") for f in fns)
    if importlib.util.find_spec("greenlet") is not None:  # greenlets switching, their stacks sliced
        assert any(f.rsplit(".", 1)[-1] == "greenlet_leaf" for f in fns), sorted(fns)[:60]
    assert r["threads_started"] > 50 * seconds, r["threads_started"]
    # threads made by C calling into Python (a thread state per call, freed at its return) ran,
    # and the C between the Python frames did not end the stacks: the callback under qsort is seen
    assert r["native_threads_started"] >= 8, r["native_threads_started"]  # two batches of four at least
    assert any(f.rsplit(".", 1)[-1] == "native_cmp" for f in fns), sorted(fns)[:60]
    assert r["max_depth"] >= 950
    st = r["stats"]
    # the sampler kept ticking under stress (at its tick rate: capped when CPU timers sample CPU)
    assert st["ticks"] > 0.5 * st["tick_rate"] * seconds * 0.5, (st["ticks"], st["tick_rate"])
    assert st["samples"] > st["ticks"]
    # what was lost is counted, and little was lost
    assert st["dropped"] <= 0.01 * st["samples"], st
    if cpu_timer:
        assert st["cpu_timer_mode"] == 1, st
