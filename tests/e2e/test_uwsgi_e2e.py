"""End to end: a WSGI app under uWSGI (master + 2 workers, recycled by --max-requests).

GIVEN an app module whose only profiler code is ``tracker = MwTracker()`` at its top (as in a
user's wsgi.py; the app is wrapped in ``MwWsgiMiddleware`` for ``endpoint`` labels), served by
uWSGI with the app loaded in the master and forked (the default), or loaded in each worker
(``--lazy-apps``); ``--enable-threads`` given or not; each worker replaced after
``MAX_REQUESTS`` requests
WHEN ``/burn`` requests (each burns ``BURN_S`` of CPU and answers with the CPU it measured with
``time.thread_time``) and ``/light`` requests (no burning) come, and uWSGI is stopped (SIGINT)
THEN the local store holds profiles in which
  - every worker that served ``/burn`` contributed, recycled ones included, under its own pid;
  - the CPU under ``burn`` per worker and in total is the CPU the requests measured (within
    the band below): a recycled worker's last window was written when uWSGI ended it;
  - ``burn`` makes up nearly all CPU of the ``/burn`` requests, and never appears in ``/light``;
  - the master never appears in request samples.
Also: with ``--skip-atexit-teardown`` (no Python ``atexit`` in workers) and ``uwsgidecorators``
imported after the tracker (it replaces uWSGI's post-fork hook with its own chain), and with
``--py-call-osafterfork`` (CPython's at-fork handlers run too: profiling restarts once).

The band: the sampler counts a forked worker's CPU from its first tick after the fork and up
to its last tick before the final export (ticks every 10 ms), so a worker may miss up to about
two tick periods of CPU: 5% + 20 ms per worker, 5% + 10 ms per worker lifetime in total (a
worker whose last window is lost misses ~300 ms).

The app's code is in this file (``application``); the app module the test writes holds a copy.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support.hangs import native_stacks, process_tree
from support.processes import burn, burn_cpu_by_pid, clean_env, closed_loop, free_port, spin

pytestmark = pytest.mark.slow

UWSGI = shutil.which("uwsgi", path=str(Path(sys.executable).parent))
WORKERS = 2
MAX_REQUESTS = 4  # 32 requests: about 8 worker lifetimes, each slot refilled 3 times
BURN_REQUESTS = 24  # 100 ms each: ~0.3 s of CPU per worker lifetime
LIGHT_REQUESTS = 8  # one in four requests
BURN_S = 0.1
BAND = 0.05
TICK_S = 0.01
LOST_PER_LIFETIME_NS = int(2 * TICK_S * 1e9)
IDLE_BEFORE_STOP_S = 0.5


# --- the app (runs in the uWSGI workers; with spin and burn from support.processes) ---------------
def application(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """``/burn``: burns BURN_S of CPU; ``/light``: does nearly nothing. Answers with the pid, the
    CPU measured around ``burn``, and whether this worker's sampler ticked meanwhile."""
    from middleware import _native

    ticks = _native.stats()["ticks"]
    t0 = time.thread_time_ns()
    if environ.get("PATH_INFO") == "/burn":
        burn(BURN_S)
    cpu_ns = time.thread_time_ns() - t0
    body = json.dumps({
        "pid": os.getpid(),
        "cpu_ns": cpu_ns,
        # the sampler of this process ticked while the request burned
        "sampling": _native.stats()["ticks"] > ticks,
        "user_postfork": os.environ.get("APP_POSTFORK_PID") == str(os.getpid()),
        "thread": threading.current_thread().name,
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


APP_MODULE = """\
from __future__ import annotations

from middleware import MwTracker

tracker = MwTracker()
{extra}
import json
import os
import threading
import time

from middleware.integrations.wsgi import MwWsgiMiddleware

BURN_S = {burn_s!r}


{functions}

application = MwWsgiMiddleware(application)
"""


def _app_module(extra: str) -> str:
    """The app module: the tracker first, then this file's app functions (copied, so a worker
    that loads the app does not import pytest with this file)."""
    functions = "\n\n".join(inspect.getsource(f) for f in (spin, burn, application))
    return APP_MODULE.format(extra=extra, burn_s=BURN_S, functions=functions)


# an app that uses uwsgidecorators after the tracker started (its import replaces
# uwsgi.post_fork_hook with its own chain) and has a post-fork function of its own
USER_POSTFORK = """\
import os
import uwsgidecorators


@uwsgidecorators.postfork
def _user_postfork():
    os.environ["APP_POSTFORK_PID"] = str(os.getpid())
"""


# --- driving uWSGI ---------------------------------------------------------------------------------
@dataclass
class Run:
    master: int
    store: Path
    log: Path
    burn: dict[str, int] = field(default_factory=dict)  # pid -> CPU ns measured in /burn
    light: set[str] = field(default_factory=set)  # pids that served /light
    answers: list[dict[str, Any]] = field(default_factory=list)


def _serve(tmp_path: Path, flags: list[str], extra: str = "") -> Run:
    if UWSGI is None:
        pytest.fail("uwsgi is not installed in this venv (requirements.txt pins it)")
    (tmp_path / "wsgi_app.py").write_text(_app_module(extra))
    store, log, port = tmp_path / "profiles", tmp_path / "uwsgi.log", free_port()
    env = clean_env("UWSGI_")
    env.update(MW_SERVICE_NAME="uwsgi-e2e", MW_PROFILE_DIR=str(store),
               MW_PROFILING_UPLOAD_INTERVAL="600")  # every profile depends on the last export
    cmd = [
        UWSGI, "--master", "--processes", str(WORKERS), "--http-socket", f"127.0.0.1:{port}",
        "--virtualenv", sys.prefix, "--chdir", str(tmp_path),
        "--module", "wsgi_app:application", "--max-requests", str(MAX_REQUESTS),
        "--min-worker-lifetime", "0", "--forkbomb-delay", "0", "--die-on-term", "--need-app", "--disable-logging",
        *flags,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    run = Run(proc.pid, store, log)
    try:
        _wait_ready(proc, port, log)
        _drive(run, port)
        _wait_idle(log, lazy="--lazy-apps" in flags, master=proc.pid)
        proc.send_signal(signal.SIGINT)  # uWSGI's shutdown: workers get SIGINT, then exit()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"uWSGI did not stop within 30 s of SIGINT; its processes' native stacks:\n"
                        f"{native_stacks(proc.pid)}\nlog:\n{log.read_text(errors='replace')[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "goodbye to uWSGI" in log.read_text(errors="replace"), log.read_text()[-3000:]
    return run


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"uwsgi exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"uwsgi did not become ready:\n{log.read_text()[-3000:]}")


def _wait_idle(log: Path, lazy: bool, master: int) -> None:
    """Waits until the workers are idle before uWSGI is stopped: a worker still closing a request
    when the master tells it to stop is busy, and uWSGI runs no Python at its exit (its last
    window is lost, as documented); and a worker respawned after its last request that has not
    yet installed its own signal handlers still has the master's: uWSGI's SIGINT then runs the
    master's handler in it (which only forwards SIGINT) and the worker lives on until the master's
    reload mercy (60 s). That window is the app's loading with --lazy-apps, and the post-fork
    hooks (the profiler's restart among them) otherwise. A worker has its own handlers once it
    catches SIGUSR2, which uWSGI installs in workers right after SIGINT's and the master never
    catches."""
    time.sleep(IDLE_BEFORE_STOP_S)
    deadline = time.monotonic() + 20
    while lazy and time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if text.count("WSGI app 0 ") >= WORKERS + text.count("Respawned uWSGI worker"):
            break
        time.sleep(0.05)
    stable_since, last = time.monotonic(), None
    while time.monotonic() < deadline:
        workers = sorted(p for p in process_tree(master) if p != master)
        ready = len(workers) >= WORKERS and all(_catches(p, signal.SIGUSR2) for p in workers)
        if workers != last or not ready:
            stable_since, last = time.monotonic(), workers
        elif time.monotonic() - stable_since >= 0.5:  # no respawn under way
            return
        time.sleep(0.05)


def _catches(pid: int, sig: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def _drive(run: Run, port: int, clients: int = 3) -> None:
    """Closed-loop load: the /burn and /light requests, interleaved, from ``clients`` threads."""
    every = BURN_REQUESTS // LIGHT_REQUESTS + 1
    paths = ["/light" if i % every == every - 1 else "/burn" for i in range(BURN_REQUESTS + LIGHT_REQUESTS)]
    assert paths.count("/burn") == BURN_REQUESTS

    def next_path(k: int) -> str | None:
        return paths.pop() if paths else None

    def on_answer(path: str, body: bytes) -> None:
        answer = json.loads(body)
        run.answers.append(answer)
        pid = str(answer["pid"])
        if path == "/burn":
            run.burn[pid] = run.burn.get(pid, 0) + answer["cpu_ns"]
        else:
            run.light.add(pid)

    closed_loop(port, next_path, clients, on_answer, join_timeout=60)
    assert len(run.answers) == BURN_REQUESTS + LIGHT_REQUESTS


# --- checks ---------------------------------------------------------------------------------------
def _check(run: Run) -> None:
    from middleware.pprof import find_profile_files, load_profiles
    from middleware.reporters.table import function_table

    log = run.log.read_text(errors="replace")[-3000:]
    files = [f.name for f in find_profile_files(run.store)] if run.store.is_dir() else []
    assert files, f"no profile written\n{log}"
    # every worker's sampler ran while it burned
    burned = [a for a in run.answers if a["cpu_ns"] >= BURN_S * 1e9]
    assert burned and all(a["sampling"] for a in burned), [a for a in burned if not a["sampling"]]
    served = set(run.burn) | run.light
    # the workers were recycled: more pids served than there are worker slots
    assert len(served) > WORKERS, served
    profile = load_profiles([run.store])
    # every worker that burned is in the store, under its own pid, in its own file
    request_pids = {s.label("pid") for s in profile.samples if s.label("endpoint")}
    assert set(run.burn) <= request_pids, (run.burn, request_pids)
    for pid in run.burn:
        assert any(f"-{pid}-" in name for name in files), (pid, files)
    assert str(run.master) not in request_pids

    # the CPU under burn is what the requests measured, per worker and in total
    profiled, _ = burn_cpu_by_pid([profile])
    assert set(profiled) == set(run.burn), (profiled, run.burn)
    per_pid = {pid: (round(m / 1e6, 1), round(profiled.get(pid, 0) / 1e6, 1)) for pid, m in run.burn.items()}
    total_m, total_p = sum(run.burn.values()), sum(profiled.values())
    lifetimes = len(served)
    assert abs(total_p - total_m) <= BAND * total_m + lifetimes * TICK_S * 1e9, (
        f"profiled {total_p / 1e6:.1f} ms vs measured {total_m / 1e6:.1f} ms; per pid (measured, "
        f"profiled) ms: {per_pid}")
    for pid, m in run.burn.items():
        assert abs(profiled[pid] - m) <= BAND * m + LOST_PER_LIFETIME_NS, (pid, per_pid)

    # hotspots: burn is (nearly) all of /burn's CPU and none of /light's
    burn_requests = profile.filter(labels={"endpoint": "/burn"})
    rows = {r.function: r for r in function_table(burn_requests, value="cpu", sort="total")}
    assert rows["burn"].total_percent > 90, sorted(
        ((r.function, round(r.total_percent, 1)) for r in rows.values()), key=lambda x: -x[1])[:8]
    assert max(rows.values(), key=lambda r: r.self_value).function == "spin"
    light = profile.filter(labels={"endpoint": "/light"})
    assert not any(f.function == "burn" for s in light.samples for f in s.stack)


MODES = {
    "prefork-threads": ["--enable-threads"],
    "prefork-nothreads": [],
    "lazy-apps-threads": ["--lazy-apps", "--enable-threads"],
    "lazy-apps-nothreads": ["--lazy-apps"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_uwsgi_workers_profiles_hold_their_cpu(mode: str, tmp_path: Path) -> None:
    run = _serve(tmp_path, MODES[mode])
    _check(run)


def test_uwsgi_skip_atexit_teardown_and_uwsgidecorators(tmp_path: Path) -> None:
    # GIVEN workers that never run Python's atexit (no interpreter teardown) and an app whose
    # uwsgidecorators import replaces uWSGI's post-fork hook after the tracker set it
    run = _serve(tmp_path, ["--skip-atexit-teardown"], extra=USER_POSTFORK)
    # THEN profiling still restarted in every worker, recycled workers still wrote their last
    # window, and the app's own post-fork function ran in every worker
    _check(run)
    assert all(a["user_postfork"] for a in run.answers), run.answers


def test_uwsgi_py_call_osafterfork(tmp_path: Path) -> None:
    # GIVEN uWSGI calling CPython's at-fork handlers itself (the tracker's restart runs there):
    # the post-fork hook must find the profiler already restarted and leave it alone
    run = _serve(tmp_path, ["--py-call-osafterfork"])
    _check(run)


def test_uwsgi_threads_every_request_thread_holds_its_cpu(tmp_path: Path) -> None:
    # GIVEN two request threads per worker (--threads 2): requests run in both (uWSGI blocks every
    # signal in the threads it starts beyond the first; the tracker unblocks its own one there)
    run = _serve(tmp_path, ["--threads", "2"])
    assert len({a["thread"] for a in run.answers}) > WORKERS, run.answers
    # THEN the CPU of both threads' requests is in the profiles
    _check(run)
