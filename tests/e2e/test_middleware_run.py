"""``middleware-run COMMAND``: Python programs profiled with no code change, and otherwise unchanged.

Each program here burns CPU in a function named ``burn`` (tests/support/processes.py) and has no
profiler code; ``middleware-run`` (``python -m middleware.run``, the console script's module) runs
it with the store in a temporary directory, configured by variables only. The profiles must
hold ``burn`` under each process that ran it (a plain script, a ``multiprocessing`` spawn child,
gunicorn's workers with and without ``--preload``, and gevent workers), and the program's exit code, standard
streams and signal behaviour must be the same as without ``middleware-run``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from middleware.pprof import find_profile_files, read_pprof_file
from support.processes import burn_cpu_by_pid, children, clean_env, free_port, http_get

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
RUN = [sys.executable, "-m", "middleware.run"]

BURN = r'''
import time
def burn(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        sum(i * i for i in range(500))
'''

SCRIPT = BURN + r'''
import sys
line = sys.stdin.readline()
burn(0.3)
sys.stdout.write("got " + line.strip() + " args " + " ".join(sys.argv[1:]) + "\n")
sys.stderr.write("to stderr\n")
sys.exit(3)
'''

SPAWN = BURN + r'''
import multiprocessing as mp, os
def child():
    burn(0.3)
if __name__ == "__main__":
    mp.set_start_method("spawn")
    p = mp.Process(target=child)
    p.start()
    p.join()
    print("parent", os.getpid(), "child", p.pid, "exit", p.exitcode)
'''

APP = BURN + r'''
def app(environ, start_response):
    burn(0.02)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
'''

ELSEWHERE = BURN + r'''
import os, subprocess, sys
os.makedirs("elsewhere", exist_ok=True)
subprocess.run([sys.executable, "-c", sys.argv[1] + "\nburn(0.3)\n"], cwd="elsewhere", check=True)
burn(0.2)
'''

SIGINT_WAIT = r'''
import sys, time
sys.stdout.write("ready\n"); sys.stdout.flush()
time.sleep(30)
'''


def _env(store: Path, **extra: str) -> dict[str, str]:
    env = clean_env()
    env.pop("PYTHONPATH", None)
    env.update({"MW_PROFILE_DIR": str(store), "MW_PROFILING_SAMPLE_RATE": "250", "MW_PROFILING_UPLOAD_INTERVAL": "1"})
    env.update(extra)
    return env


def _burn_by_pid(store: Path) -> dict[str, int]:
    files = find_profile_files(store)
    return burn_cpu_by_pid(read_pprof_file(f) for f in files)[0] if files else {}


def test_a_plain_script_is_profiled_and_its_streams_and_exit_code_are_unchanged(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    plain = subprocess.run([sys.executable, str(script), "a", "b"], input="hello\n", capture_output=True, text=True,
                           timeout=60, env=_env(tmp_path / "unused", MW_APM_COLLECT_PROFILING="false"))
    store = tmp_path / "store"
    run = subprocess.run([*RUN, sys.executable, str(script), "a", "b"], input="hello\n", capture_output=True,
                         text=True, timeout=60, env=_env(store))
    assert (run.returncode, run.stdout, run.stderr) == (plain.returncode, plain.stdout, plain.stderr) == (
        3, "got hello args a b\n", "to stderr\n")
    burnt = _burn_by_pid(store)
    assert len(burnt) == 1 and 0.2e9 <= sum(burnt.values()) <= 0.45e9, burnt  # ~0.3 s of CPU in burn


def test_collect_profiling_false_starts_nothing(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    store = tmp_path / "store"
    run = subprocess.run([*RUN, sys.executable, str(script)], input="x\n", capture_output=True, text=True,
                         timeout=60, env=_env(store, MW_APM_COLLECT_PROFILING="false"))
    assert run.returncode == 3 and run.stderr == "to stderr\n"
    assert not store.exists() or find_profile_files(store) == []


def test_a_spawn_child_is_profiled_too(tmp_path: Path) -> None:
    script = tmp_path / "spawn.py"
    script.write_text(SPAWN)
    store = tmp_path / "store"
    run = subprocess.run([*RUN, sys.executable, str(script)], capture_output=True, text=True, timeout=90,
                         env=_env(store))
    assert run.returncode == 0, run.stderr
    words = run.stdout.split()
    child_pid, exitcode = words[3], words[5]
    assert exitcode == "0", run.stdout
    burnt = _burn_by_pid(store)
    assert 0.2e9 <= burnt.get(child_pid, 0) <= 0.45e9, (child_pid, burnt)


def test_a_relative_store_is_one_store_for_processes_started_in_other_directories(tmp_path: Path) -> None:
    # GIVEN MW_PROFILE_DIR=store (relative) and a program that starts a Python subprocess in
    # another working directory
    script = tmp_path / "elsewhere.py"
    script.write_text(ELSEWHERE)
    run = subprocess.run([*RUN, sys.executable, str(script), BURN], capture_output=True, text=True, timeout=60,
                         env=_env(Path("store")), cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    # THEN both processes write to <where middleware-run started>/store, none to elsewhere/store
    burnt = _burn_by_pid(tmp_path / "store")
    assert len(burnt) == 2 and all(0.1e9 <= v <= 0.45e9 for v in burnt.values()), burnt
    assert not (tmp_path / "elsewhere" / "store").exists()


def test_the_users_own_sitecustomize_still_runs(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import os\nos.environ['OWN_SITECUSTOMIZE'] = 'ran'\n")
    env = _env(tmp_path / "store", PYTHONPATH=str(own))
    code = "import os, sys; print(os.environ.get('OWN_SITECUSTOMIZE'), 'middleware._native' in sys.modules)"
    run = subprocess.run([*RUN, sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0 and run.stdout.split() == ["ran", "True"], (run.stdout, run.stderr)


def test_sigint_ends_the_program_as_it_would_without_the_profiler(tmp_path: Path) -> None:
    script = tmp_path / "wait.py"
    script.write_text(SIGINT_WAIT)
    results = []
    for cmd, env in (([sys.executable, str(script)], _env(tmp_path / "s0", MW_APM_COLLECT_PROFILING="false")),
                     ([*RUN, sys.executable, str(script)], _env(tmp_path / "s1"))):
        # SIGINT's default action, whatever this test runner inherited (a background job ignores it)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        results.append((proc.returncode, "KeyboardInterrupt" in err))
    assert results[0] == results[1] == (-signal.SIGINT, True), results


def test_a_missing_command_is_said_and_exits_127(tmp_path: Path) -> None:
    run = subprocess.run([*RUN, "no-such-command-here"], capture_output=True, text=True, timeout=30,
                         env=_env(tmp_path / "store"))
    assert run.returncode == 127 and "no-such-command-here: command not found" in run.stderr


@pytest.mark.parametrize("preload,worker", [(False, "sync"), (True, "sync"), (False, "gevent")],
                         ids=["fork", "preload", "gevent"])
def test_gunicorn_workers_are_profiled(tmp_path: Path, preload: bool, worker: str) -> None:
    if worker == "gevent":  # the workers patch the standard library after the profiler started
        pytest.importorskip("gevent")
    (tmp_path / "wsgiapp.py").write_text(APP)
    store = tmp_path / "store"
    port = free_port()
    cmd = [*RUN, sys.executable, "-m", "gunicorn", "-w", "2", "-k", worker, "-b", f"127.0.0.1:{port}",
           "--chdir", str(tmp_path), *(["--preload"] if preload else []), "wsgiapp:app"]
    log = (tmp_path / "gunicorn.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(store), cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + 30
        workers: set[int] = set()
        while time.monotonic() < deadline and len(workers) < 2:
            assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()
            workers = children(proc.pid)
            time.sleep(0.1)
        served = 0
        while time.monotonic() < deadline + 30 and served < 40:
            try:
                served += http_get(port, "/", timeout=5)[0] == 200
            except OSError:
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        log.close()
    assert served == 40 and rc == 0, (tmp_path / "gunicorn.log").read_text()
    burnt = _burn_by_pid(store)
    # 40 requests x 20 ms of burn, served by the workers (not by the master)
    assert set(burnt) <= {str(w) for w in workers} and 0.5e9 <= sum(burnt.values()) <= 1.1e9, (burnt, workers)
    assert os.getpid() not in {int(p) for p in burnt}
