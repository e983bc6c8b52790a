"""End to end: the Flask demo under gunicorn (2 workers, with and without --preload).

GIVEN the demo app, whose only profiler code is ``tracker = MwTracker()``, served by gunicorn
WHEN both endpoints get requests and gunicorn is stopped gracefully
THEN the local store holds profiles in which
  - for ``/calculate2/<int:number>`` calc3 has the largest Self share, called by with_bottleneck;
  - for ``/calculate1/<int:number>`` calc3 does not appear;
  - both workers' pids contributed samples;
  - the master (profiled only with --preload) contributes no request samples, and its idle loop
    no CPU time (wall-clock views do show its waiting, as they show any idle thread's).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from middleware.pprof import load_profiles
from middleware.profile import Profile
from middleware.reporters.table import function_table
from support.processes import children, clean_env, closed_loop, free_port, http_get

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "demo_flask"
CALC1 = "/calculate1/<int:number>"
CALC2 = "/calculate2/<int:number>"
BOTTLENECK_N = 9  # calc3(9): 9! permutations, about 0.1 s; calc1/calc2(9) are negligible
EFFICIENT_N = 400  # efficient(400): about 10 ms of quadratic work
REQUESTS_PER_ENDPOINT = 20  # about 2 s of calc3 per worker on an idle machine
MAX_LOAD_SECONDS = 40.0


@dataclass
class Served:
    master: int
    workers: set[int]
    store: Path
    log: Path
    preload: bool
    master_cpu_ns: int  # the master's own CPU (user + system, /proc) just before its SIGTERM


def _cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> set[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"gunicorn exited with {proc.returncode}:\n{log.read_text()}")
        workers = children(proc.pid)
        if len(workers) == 2:
            try:
                if http_get(port, "/calculate1/1", timeout=2)[0] == 200:
                    return workers
            except OSError:
                pass
        time.sleep(0.1)
    pytest.fail(f"gunicorn did not become ready:\n{log.read_text()}")


def _drive_load(port: int, per_endpoint: int, max_seconds: float, clients: int = 4) -> dict[str, int]:
    """Closed-loop load from ``clients`` threads, alternating the two endpoints, until each
    endpoint has answered ``per_endpoint`` requests (or ``max_seconds`` passed: the machine may
    be busy, so the test counts requests rather than trusting a fixed duration)."""
    counts = {"calc1": 0, "calc2": 0}
    names = {f"/calculate1/{EFFICIENT_N}": "calc1", f"/calculate2/{BOTTLENECK_N}": "calc2"}
    stop_at = time.monotonic() + max_seconds
    sent = [0] * clients

    def next_path(k: int) -> str | None:
        if time.monotonic() >= stop_at or min(counts.values()) >= per_endpoint:
            return None
        i = k + sent[k]
        sent[k] += 1
        return f"/calculate2/{BOTTLENECK_N}" if i % 2 else f"/calculate1/{EFFICIENT_N}"

    def on_answer(path: str, body: bytes) -> None:
        if "result" not in json.loads(body):
            raise ValueError("no result")
        counts[names[path]] += 1

    closed_loop(port, next_path, clients, on_answer)
    return counts


@pytest.fixture(params=[False, True], ids=["no-preload", "preload"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    preload: bool = request.param
    store = tmp_path / "profiles"
    log = tmp_path / "gunicorn.log"
    port = free_port()
    env = clean_env()
    env.update(
        MW_SERVICE_NAME="demo-e2e",
        MW_PROFILE_DIR=str(store),
        MW_PROFILING_UPLOAD_INTERVAL="2",
        MW_PROFILING_MEMORY="true",  # as make demo: where /calculate2 allocates
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
    cmd += ["--bind", f"127.0.0.1:{port}", "--workers", "2", "--graceful-timeout", "20"]
    if preload:
        cmd.append("--preload")
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=DEMO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        workers = _wait_ready(proc, port, log)
        counts = _drive_load(port, REQUESTS_PER_ENDPOINT, MAX_LOAD_SECONDS)
        assert min(counts.values()) >= REQUESTS_PER_ENDPOINT, counts
        master_cpu_ns = _cpu_ns(proc.pid)
        # Graceful stop: workers finish, exit normally and write their last profile.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, log.read_text()
        yield Served(proc.pid, workers, store, log, preload, master_cpu_ns)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _callers(profile: Profile, function: str) -> set[str]:
    out = set()
    for s in profile.samples:
        for i, frame in enumerate(s.stack):
            if frame.function == function:
                out.add(s.stack[i - 1].function if i else "<root>")
    return out


def _cpu_by_pid(profile: Profile) -> dict[str, int]:
    i = profile.value_index("cpu")
    out: dict[str, int] = {}
    for s in profile.samples:
        pid = s.label("pid") or "?"
        out[pid] = out.get(pid, 0) + s.values[i]
    return out


def test_demo_profiles_show_the_bottleneck_per_endpoint(served: Served) -> None:
    files = sorted(p.name for p in served.store.iterdir())
    assert files, f"no profile written\n{served.log.read_text()}"
    profile = load_profiles([served.store])
    workers = {str(pid) for pid in served.workers}

    # /calculate2: calc3 has the largest Self share, and with_bottleneck calls it
    calc2 = profile.filter(labels={"endpoint": CALC2})
    rows = function_table(calc2, value="cpu", sort="self")
    assert rows, f"no samples labelled endpoint={CALC2}: {profile.label_values().get('endpoint')}"
    assert rows[0].function == "calc3", [(r.function, round(r.self_percent, 1)) for r in rows[:5]]
    assert rows[0].self_percent > 50
    assert _callers(calc2, "calc3") == {"with_bottleneck"}

    # and where it allocates: its memory samples carry the endpoint label too, calc3 on top
    mem = function_table(calc2, value="alloc_space", sort="self")
    assert mem and mem[0].function == "calc3", [(r.function, round(r.self_percent, 1)) for r in mem[:5]]

    # /calculate1: calc1 and calc2 run, calc3 never
    calc1 = profile.filter(labels={"endpoint": CALC1})
    names = {f.function for s in calc1.samples for f in s.stack}
    assert "calc1" in names and "efficient" in names
    assert "calc3" not in names and "with_bottleneck" not in names

    # both workers served (and were profiled)
    request_pids = {s.label("pid") for s in profile.samples if s.label("endpoint")}
    assert request_pids == workers
    for endpoint in (CALC1, CALC2):
        per_pid = _cpu_by_pid(profile.filter(labels={"endpoint": endpoint}))
        assert set(per_pid) == workers, (endpoint, per_pid)
    for pid in workers:
        assert any(f"-{pid}-" in name for name in files), (pid, files)

    # the master: never in request samples; its idle loop is not CPU
    master = str(served.master)
    assert master not in request_pids
    cpu = _cpu_by_pid(profile)
    total_cpu = sum(cpu.values())
    if not served.preload:
        # it never imports the app, so it is not profiled at all
        assert master not in cpu and not any(f"-{master}-" in name for name in files)
    else:
        # it imported the app (real start-up work: 100-160 ms of CPU here, whatever the load) and
        # then only waited: its profile holds no more CPU than it used (measured before its
        # SIGTERM; its shutdown — reaping, the last export — gets 50 ms)
        assert cpu.get(master, 0) <= 1.1 * served.master_cpu_ns + 50_000_000, (cpu, served.master_cpu_ns)
        i = profile.value_index("cpu")
        # (managing the workers — forking a process this size, reaping, checking on them — is
        # real work of the loop and costs the parent milliseconds of CPU; its waiting —
        # Arbiter.wait_for_signals, Arbiter.sleep in older gunicorns — is what must be free)
        master_loop = sum(
            s.values[i]
            for s in profile.samples
            if s.label("pid") == master
            and any(f.function.endswith("run") and f.file.endswith("arbiter.py") for f in s.stack)
            and any(f.function.endswith(("wait_for_signals", "sleep")) and f.file.endswith("arbiter.py")
                    for f in s.stack)
        )
        assert master_loop <= 0.01 * total_cpu, (master_loop, total_cpu)
