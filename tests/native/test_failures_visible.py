"""Failures the user must see are shown on stderr, once, by default.

An app runs in a child process with logging not configured (the common case) and profiling that
cannot work as asked: a bad setting, a local store on a read-only (or full) file system, a backend
that refuses connections, an interpreter the sampler does not know. Each problem must show up as
one "middleware: ..." line on stderr however many export windows fail, the app's stdout and exit
code must be those of the same app unprofiled, and:
  - an app that configured logging gets the configuration warnings through its logging only;
  - MW_PROFILING_QUIET=1 silences every line while the counters still count;
  - a forked child reports its own failures once more (its own pid in the line);
  - setup.py refuses to build on a Python it does not know, in one line.

The read-only and full stores are tmpfs mounts in a private mount namespace (``unshare``): file
permissions do not stop root, a read-only mount does.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from middleware.pprof import parse_pprof

ROOT = Path(__file__).resolve().parents[2]
INTERVAL_S = 0.1  # MW_PROFILING_UPLOAD_INTERVAL: a window every 0.1 s, about a dozen per run

APP = """
import json, logging, os, sys, time
sys.path.insert(0, {root!r})
how = os.environ.get("TEST_LOGGING", "")
if how == "root":
    logging.basicConfig(stream=sys.stderr, format="LOG %(levelname)s %(name)s | %(message)s")
elif how == "app-only":  # the app logs its own records; nothing is set up for middleware's
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("APP %(message)s"))
    logging.getLogger("app").addHandler(h)
    logging.getLogger("app").propagate = False
from middleware import MwTracker



def burn(seconds):
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sum(i * i for i in range(200))


tracker = MwTracker()
if os.environ.get("TEST_FORK") and tracker.running:
    burn(0.3)
    tracker.flush()  # the parent's windows fail, and that is reported, before the fork
    pid = os.fork()
    if pid == 0:
        burn(0.6)
        tracker.flush()
        os._exit(0)
    os.waitpid(pid, 0)
for step in range(4):
    burn(0.3)
    print("step", step, sum(i * i for i in range(1000)), flush=True)
if tracker.running:
    tracker.flush()
    with open(os.environ["TEST_STATS"], "w") as f:
        json.dump(dict(tracker.stats(), pid=os.getpid()), f)
print("done", flush=True)
sys.exit(3)
"""


def _hermetic_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MW_") and k not in ("OTEL_SERVICE_NAME", "PYTHONWARNINGS")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), MW_SERVICE_NAME="failing-app",
               MW_PROFILING_UPLOAD_INTERVAL=str(INTERVAL_S), MW_PROFILING_INSTRUMENT="false",
               TEST_STATS=str(tmp_path / "stats.json"))
    env.update(extra)
    return env


def _mounted(cmd: list[str], target: Path, options: str) -> list[str]:
    """cmd run with a fresh tmpfs (mount options) on target, in a private mount namespace."""
    prefix = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix.insert(1, "--map-root-user")
    script = 'mount -t tmpfs -o "$1" middleware-test "$2" && shift 2 && exec "$@"'
    return prefix + ["sh", "-c", script, "sh", options, str(target), *cmd]


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory: pytest.TempPathFactory) -> None:
    target = tmp_path_factory.mktemp("probe")
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a read-only store in a private mount namespace")
    probe = subprocess.run(_mounted(["true"], target, "ro"), capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()}")


def _run(tmp_path: Path, env: dict[str, str], mount: str | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "app.py"
    script.write_text(APP.format(root=str(ROOT)))
    cmd = [sys.executable, str(script)]
    if mount is not None:
        cmd = _mounted(cmd, Path(env["MW_PROFILE_DIR"]), mount)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(tmp_path))


def _unprofiled(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The same app with profiling off: the stdout and exit code every run must keep."""
    base = _run(tmp_path, _hermetic_env(tmp_path, MW_APM_COLLECT_PROFILING="false"))
    assert base.returncode == 3 and base.stdout.endswith("done\n") and base.stderr == "", base
    return base


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def _stats(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "stats.json").read_text())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- everything at once, logging not configured -------------------------------------------------
def test_each_failure_is_one_stderr_line_and_the_app_is_unchanged(tmp_path, can_mount):
    # GIVEN an app that sets up no logging, a read-only store, a backend whose port is closed and
    # a bad sample rate; exports every 0.1 s for more than a second
    store = tmp_path / "store"
    store.mkdir()
    port = _closed_port()
    base = _unprofiled(tmp_path)
    env = _hermetic_env(tmp_path, MW_PROFILE_DIR=str(store), MW_PROFILING_SAMPLE_RATE="fast",
                        MW_PROFILING_SERVER_URL=f"http://127.0.0.1:{port}")

    # WHEN it runs
    r = _run(tmp_path, env, mount="ro")

    # THEN its stdout and exit code are those of the unprofiled app
    assert r.returncode == base.returncode == 3, r.stderr
    assert r.stdout == base.stdout
    # AND many windows failed at the store, yet each problem is said exactly once
    st = _stats(tmp_path)
    assert st["export_store_errors"] >= 5, st
    lines = _lines(r.stderr)
    assert all(line.startswith("middleware: ") for line in lines), lines
    rate = [line for line in lines if "MW_PROFILING_SAMPLE_RATE" in line]
    assert len(rate) == 1 and "'fast'" in rate[0] and "100" in rate[0], lines
    stored = [line for line in lines if str(store) in line]
    assert len(stored) == 1, lines
    assert "Read-only file system" in stored[0] and "dropped" in stored[0], stored
    assert f"profiles of process {st['pid']} are being dropped" in stored[0]
    # AND the backend's failures are named by its URL, each line once (one per kind of failure)
    upload = [line for line in lines if f"127.0.0.1:{port}" in line]
    assert upload and len(upload) == len(set(upload)) <= 4, lines
    assert [line for line in lines if line not in rate + stored + upload] == [], lines


def _pid_in(line: str) -> int:
    word = line.split("profiles of process ", 1)[1].split()[0]
    return int(word)


def test_a_full_store_is_said_once(tmp_path, can_mount):
    # GIVEN a store on a 4 KiB file system: the first profile does not fit
    store = tmp_path / "store"
    store.mkdir()
    r = _run(tmp_path, _hermetic_env(tmp_path, MW_PROFILE_DIR=str(store)), mount="size=4k")
    assert r.returncode == 3, r.stderr
    st = _stats(tmp_path)
    assert st["export_store_errors"] >= 5 and st["export_last_errno"] == 28, st  # ENOSPC
    lines = _lines(r.stderr)
    assert len(lines) == 1, lines
    assert str(store) in lines[0] and "is full" in lines[0] and "No space left on device" in lines[0]
    assert "wait in memory until there is room" in lines[0] and "is lost" in lines[0]
    assert st["export_store_kept"] >= 5 and st["export_store_written_late"] == 0, st


FILLED_STORE_APP = """
import json, os, resource, shutil, sys, time
sys.path.insert(0, {root!r})
store, how = os.environ["MW_PROFILE_DIR"], os.environ["TEST_HOW"]
filler = os.path.join(store, "filler")  # not a store file: the store neither counts nor removes it
if how == "full":  # the app fills the store's file system
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError:
        pass
    os.close(fd)
from middleware import MwTracker

def burn(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        sum(i * i for i in range(200))

c0 = time.process_time()
tracker = MwTracker(upload_interval=3600)
held = []
if how == "no-fd":  # the app holds as many descriptors as it may: no file can be created
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
for _ in range(5):  # five windows the store cannot take
    burn(0.15)
    tracker.flush()
full = tracker.stats()
if how == "full":
    os.unlink(filler)  # room again
for fd in held:
    os.close(fd)  # descriptors again
burn(0.15)
tracker.flush()
tracker.stop()
cpu = time.process_time() - c0
shutil.copytree(store, os.environ["TEST_OUT"])
print(json.dumps({{"cpu": cpu, "full": full, "end": tracker.stats()}}))
"""


@pytest.mark.parametrize("how", ["full", "no-fd"])
def test_profiles_a_store_could_not_take_are_written_once_it_can(tmp_path, request, how):
    # GIVEN an app whose store is on a file system it fills itself (or that holds as many
    # descriptors as it may), that exports five windows there, then removes its filler file (or
    # closes its descriptors) and exports one more
    store, out = tmp_path / "store", tmp_path / "out"
    store.mkdir()
    script = tmp_path / "filled.py"
    script.write_text(FILLED_STORE_APP.format(root=str(ROOT)))
    env = _hermetic_env(tmp_path, MW_PROFILE_DIR=str(store), TEST_OUT=str(out), TEST_HOW=how)
    cmd = [sys.executable, str(script)]
    if how == "full":
        request.getfixturevalue("can_mount")
        cmd = _mounted(cmd, store, "size=256k")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    # THEN the five windows waited in memory while the store could not take them, and were
    # written once it could, before the sixth: the store holds the CPU the app burned (an app
    # holding every descriptor lost them: only the sixth was written)
    full, end = res["full"], res["end"]
    assert full["export_store_waiting"] >= 5 and full["export_files_written"] == 0, full
    assert end["export_store_waiting"] == 0 and end["export_store_dropped"] == 0, end
    assert end["export_store_written_late"] == end["export_store_kept"] == full["export_store_waiting"], end
    cpu = 0.0
    for p in sorted(out.glob("*.pb.gz")):
        prof = parse_pprof(p.read_bytes())
        if ("cpu", "nanoseconds") in prof.sample_types:
            i = prof.value_index("cpu")
            cpu += sum(smp.values[i] for smp in prof.samples) / 1e9
    assert 0.9 * res["cpu"] - 0.02 <= cpu <= 1.1 * res["cpu"] + 0.02, (cpu, res["cpu"])
    # AND it was said once
    lines = _lines(r.stderr)
    said = "is full" if how == "full" else "(Too many open files: the process has as many files open as it may)"
    assert len(lines) == 1 and said in lines[0] and "wait in memory" in lines[0], lines


# --- logging configured by the app ------------------------------------------------------------------
def test_with_logging_configured_the_warning_goes_through_logging_only(tmp_path):
    # GIVEN an app whose root logger has a handler, and a bad sample rate
    env = _hermetic_env(tmp_path, MW_PROFILE_DIR="none", MW_PROFILING_SAMPLE_RATE="0", TEST_LOGGING="root")
    r = _run(tmp_path, env)
    assert r.returncode == 3, r.stderr
    # THEN the warning is shown once, in the app's logging format, and not printed a second time
    rate = [line for line in _lines(r.stderr) if "MW_PROFILING_SAMPLE_RATE" in line]
    assert rate == [
        "LOG WARNING middleware.config | middleware: invalid MW_PROFILING_SAMPLE_RATE='0' "
        "(must be within 1..10000); using the default 100"
    ], r.stderr


def test_logging_set_up_only_for_the_app_still_shows_our_warning_once(tmp_path):
    # GIVEN an app that logs through its own logger only (nothing reaches middleware's records)
    env = _hermetic_env(tmp_path, MW_PROFILE_DIR="none", MW_PROFILING_SAMPLE_RATE="0", TEST_LOGGING="app-only")
    r = _run(tmp_path, env)
    assert r.returncode == 3, r.stderr
    assert _lines(r.stderr) == [
        "middleware: invalid MW_PROFILING_SAMPLE_RATE='0' (must be within 1..10000); using the default 100"
    ]


# --- MW_PROFILING_QUIET ------------------------------------------------------------------------------
@pytest.mark.parametrize("quiet", ["1", None])
def test_quiet_silences_every_line_and_the_counters_still_count(tmp_path, can_mount, quiet):
    store = tmp_path / "store"
    store.mkdir()
    base = _unprofiled(tmp_path)
    extra = {"MW_PROFILING_QUIET": quiet} if quiet else {}
    env = _hermetic_env(tmp_path, MW_PROFILE_DIR=str(store), MW_PROFILING_SAMPLE_RATE="fast",
                        MW_CUSTOM_RESOURCE_ATTRIBUTES="nokv", **extra)
    r = _run(tmp_path, env, mount="ro")
    assert r.returncode == 3 and r.stdout == base.stdout, r.stderr
    assert _stats(tmp_path)["export_store_errors"] >= 5
    lines = _lines(r.stderr)
    if quiet:
        assert lines == []
    else:  # the same run without it: the three problems, one line each
        assert len(lines) == 3, lines
        assert sum("MW_PROFILING_SAMPLE_RATE" in line for line in lines) == 1
        assert sum("MW_CUSTOM_RESOURCE_ATTRIBUTES" in line for line in lines) == 1
        assert sum("Read-only file system" in line for line in lines) == 1


def test_quiet_keeps_the_apps_own_logging(tmp_path):
    env = _hermetic_env(tmp_path, MW_PROFILE_DIR="none", MW_PROFILING_SAMPLE_RATE="0", TEST_LOGGING="root",
                        MW_PROFILING_QUIET="1")
    r = _run(tmp_path, env)
    assert r.returncode == 3
    assert [line for line in _lines(r.stderr) if "MW_PROFILING_SAMPLE_RATE" in line] == [
        "LOG WARNING middleware.config | middleware: invalid MW_PROFILING_SAMPLE_RATE='0' "
        "(must be within 1..10000); using the default 100"
    ]


# --- fork ---------------------------------------------------------------------------------------------
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="GCC's libasan has no fork handler for its allocator locks")
def test_a_forked_child_reports_its_own_store_failure_once(tmp_path, can_mount):
    store = tmp_path / "store"
    store.mkdir()
    env = _hermetic_env(tmp_path, MW_PROFILE_DIR=str(store), TEST_FORK="1", PYTHONWARNINGS="ignore")
    r = _run(tmp_path, env, mount="ro")
    assert r.returncode == 3, r.stderr
    lines = _lines(r.stderr)
    assert all("Read-only file system" in line for line in lines) and len(lines) == 2, lines
    pids = {_pid_in(line) for line in lines}
    assert len(pids) == 2, lines  # the parent's line and the child's, each once


# --- an interpreter the sampler does not know ----------------------------------------------------
UNKNOWN_PYTHON = """
import json, sys
import dataclasses, logging, re, threading, typing, weakref, contextvars  # imported as the real version
sys.path.insert(0, {root!r})
sys.version_info = {version!r}
{import_tracker}
a = MwTracker()
b = MwTracker(sample_rate=500)
with a.labels(endpoint="/x"):
    pass
print(json.dumps(dict(running=[a.running, b.running], flush=a.flush(), stats=b.stats(),
                      samples=len(a.snapshot().samples), native="middleware._native" in sys.modules)))
b.stop()
print("done")
sys.exit(3)
"""


@pytest.mark.parametrize("import_tracker", [
    "import middleware\nfrom middleware import MwTracker",
    "from middleware.tracker import MwTracker",  # the class itself, not the package's name for it
], ids=["package", "tracker-module"])
@pytest.mark.parametrize("version", [(3, 14, 0, "final", 0), (3, 9, 18, "final", 0)])
def test_an_unknown_python_runs_the_app_unprofiled_and_says_so_once(tmp_path, version, import_tracker):
    script = tmp_path / "app.py"
    script.write_text(UNKNOWN_PYTHON.format(root=str(ROOT), version=version, import_tracker=import_tracker))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                       env=_hermetic_env(tmp_path), cwd=str(tmp_path))
    assert r.returncode == 3, r.stderr
    out, done = r.stdout.splitlines()
    assert done == "done"
    res = json.loads(out)
    assert res == dict(running=[False, False], flush=False, stats={}, samples=0, native=False), res
    lines = _lines(r.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"middleware: CPython {version[0]}.{version[1]} is not supported")
    assert "3.10 to 3.13" in lines[0] and "unprofiled" in lines[0]


@pytest.mark.parametrize("version,expected", [
    ((3, 14, 0, "final", 0), "error: middleware: cannot build the sampler for cpython 3.14.0"),
    ((3, 9, 18, "final", 0), "error: middleware: Python >= 3.10 required (this is Python 3.9.18)"),
])
def test_setup_refuses_an_unknown_python_in_one_line(tmp_path, version, expected):
    code = ("import runpy, sys\n"
            f"sys.version_info = {version!r}\n"
            "sys.argv = ['setup.py', '--name']\n"
            "runpy.run_path('setup.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                       env={k: v for k, v in os.environ.items() if k != "MW_SKIP_EXT"})
    lines = _lines(r.stderr)
    assert r.returncode == 1 and r.stdout == ""
    assert len(lines) == 1 and lines[0].startswith(expected), r.stderr


def test_setup_still_builds_on_this_python():
    r = subprocess.run([sys.executable, "setup.py", "--name"], capture_output=True, text=True, timeout=60,
                       cwd=str(ROOT))
    assert r.returncode == 0 and r.stdout.strip() == "middleware", r.stderr


# --- the tracker's own problems -------------------------------------------------------------------
TRACKER_APP = """
import json, os, signal, sys, time
sys.path.insert(0, {root!r})
case = os.environ["TEST_CASE"]
if os.environ.get("TEST_LOGGING") == "root":
    import logging
    logging.basicConfig(stream=sys.stderr, format="LOG %(levelname)s %(name)s | %(message)s")
if case == "no-pause":  # the app handles every real-time signal the sampler could take
    for sig in range(signal.SIGRTMIN + 6, signal.SIGRTMAX - 1):
        signal.signal(sig, signal.SIG_IGN)
if case == "perf-refused":  # as a container's default seccomp profile does (x86-64 numbers)
    import ctypes, struct
    libc = ctypes.CDLL(None, use_errno=True)
    ld_nr, jeq, ret = 0x20, 0x15, 0x06
    prog = [(ld_nr, 0, 0, 0), (jeq, 0, 1, 298), (ret, 0, 0, 0x00050000 | 13), (ret, 0, 0, 0x7FFF0000)]
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
    fprog = struct.pack("HxxxxxxP", len(prog), ctypes.addressof(code))
    assert libc.prctl(38, 1, 0, 0, 0) == 0 and libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) == 0
if case == "trap-taken":  # the app handles SIGTRAP (as Celery's billiard pool workers do)
    signal.signal(signal.SIGTRAP, lambda *args: None)
import middleware
if case == "native-unloadable":  # the native module cannot be loaded (no memory left to map it)
    sys.modules["middleware._native"] = None
else:
    from middleware import _native
if case == "start-fails":  # the sampler cannot start here
    def start(**kwargs):
        raise RuntimeError("cannot start the sampler thread")
    _native.start = start
if case == "termflush-fails":  # no thread can be started for the last export on SIGTERM
    def termflush_arm():
        raise OSError(11, "Resource temporarily unavailable")
    _native.termflush_arm = termflush_arm
from middleware import MwTracker
trackers = [MwTracker(), MwTracker()]  # the second joins (or tries again)
if case == "labels-full":  # a label whose value changes per request: more sets than the registry holds
    for i in range(66_000):
        with trackers[0].labels(request=str(i)):
            pass
if case == "bad-label":  # a name the profile cannot carry, pushed at every request
    for i in range(1000):
        with trackers[i % 2].labels(**{{"user-id": str(i)}}):
            pass
if case == "reserved-label":  # a label the profiler sets itself
    for i in range(1000):
        with trackers[0].labels(thread_name=str(i)):
            pass
if case == "spans-full":  # more traced requests than the span table holds, none released yet
    ids = [_native.span_labelset(0, "%016x" % i, "", "GET /") for i in range(33_000)]
deadline = time.perf_counter() + 0.4
while time.perf_counter() < deadline:
    sum(i * i for i in range(200))
with trackers[0].labels(step="last"):
    print("result", sum(i * i for i in range(1000)), flush=True)
if case == "native-unloadable":  # the tracker's methods do nothing, and do not fail
    assert trackers[0].stats() == {{}} and not trackers[0].snapshot().samples and not trackers[0].flush(1)
print(json.dumps({{"running": [t.running for t in trackers],
                  "can_pause": trackers[0].stats().get("can_pause") if trackers[0].running else None,
                  "timer": trackers[0].stats().get("cpu_timer_mode") if trackers[0].running else None}}))
sys.exit(3)
"""

#: (case, extra environment, what the one line says)
TRACKER_CASES = [
    ("no-pause", {}, "middleware: no free real-time signal"),
    ("start-fails", {}, "middleware: profiling could not start (RuntimeError: cannot start the sampler thread); "
                        "the app runs unprofiled"),
    ("native-unloadable", {}, "middleware: profiling could not start (ModuleNotFoundError: import of "
                              "middleware._native halted; None in sys.modules); the app runs unprofiled"),
    ("termflush-fails", {}, "middleware: no thread for the last export on SIGTERM (Resource temporarily unavailable); "
                            "a SIGTERM ends process "),
    ("profile-dir", {"MW_PROFILE_DIR": "{tmp}/a-file/profiles"}, "middleware: cannot create the profile directory "
                                                                  "{tmp}/a-file/profiles (Not a directory)"),
    ("cpu-timer-unknown", {"MW_PROFILING_CPU_TIMER": "perff"},
     "middleware: MW_PROFILING_CPU_TIMER=perff is none of perf, perf-trap, timer, off: ignored"),
    ("trap-taken", {"MW_PROFILING_CPU_TIMER": "perf-trap"},
     "middleware: MW_PROFILING_CPU_TIMER=perf-trap: no SIGTRAP route (SIGTRAP has a handler); "
     "CPU samples from perf events on the real-time signal"),
    ("labels-full", {}, "middleware: the label registry is full (65536 distinct label sets"),
    ("spans-full", {}, "middleware: the span label table is full (32768 requests"),
    ("bad-label", {}, "middleware: ignoring label 'user-id': bad label name: must match [a-zA-Z_][a-zA-Z0-9_]*"),
    ("reserved-label", {}, "middleware: ignoring label 'thread_name': the profiler sets this label itself"),
    ("perf-refused", {"MW_PROFILING_CPU_TIMER": "perf"},
     "middleware: MW_PROFILING_CPU_TIMER=perf: perf_event_open refused (Permission denied); "
     "CPU samples from POSIX CPU timers"),
]


def _run_tracker_case(
    tmp_path: Path, case: str, extra: dict[str, str], **more: str
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "a-file").write_text("not a directory\n")
    script = tmp_path / "tracker_app.py"
    script.write_text(TRACKER_APP.format(root=str(ROOT)))
    env = _hermetic_env(tmp_path, TEST_CASE=case, **{k: v.format(tmp=tmp_path) for k, v in extra.items()}, **more)
    env.setdefault("MW_PROFILE_DIR", "none")
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env,
                          cwd=str(tmp_path))


@pytest.mark.parametrize("case,extra,said", TRACKER_CASES, ids=[c[0] for c in TRACKER_CASES])
def test_the_trackers_own_problems_are_said_once_on_stderr(tmp_path, case, extra, said):
    # GIVEN an app with logging not configured that starts two trackers where profiling cannot
    # work as asked
    if case == "perf-refused" and platform.machine() != "x86_64":
        pytest.skip("the seccomp filter uses x86-64 system call numbers")
    r = _run_tracker_case(tmp_path, case, extra)
    # THEN the app runs as it would unprofiled
    assert r.returncode == 3, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == f"result {sum(i * i for i in range(1000))}", r.stdout
    res = json.loads(out[1])
    # AND the problem is one line on stderr, however many trackers ran into it
    lines = _lines(r.stderr)
    ours = [line for line in lines if line.startswith(said.format(tmp=tmp_path))]
    assert len(ours) == 1, lines
    if case == "profile-dir":
        # the exporter says it too when it drops a window (a different line, naming the directory)
        assert all(f"{tmp_path}/a-file/profiles" in line for line in lines) and len(lines) <= 2, lines
        assert res["running"] == [True, True]
    else:
        assert lines == ours, lines
    if case in ("start-fails", "native-unloadable"):
        assert res["running"] == [False, False]
    if case == "no-pause":
        assert res["can_pause"] == 0, res
    if case == "perf-refused":  # the fallback profiles: per-thread POSIX CPU timers
        assert res["running"] == [True, True] and res["timer"] == 1, res


SHORT_OF_ADDRESS_SPACE = """
import json, os, resource, sys
sys.path.insert(0, {root!r})
import middleware
with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
limit = size + int(sys.argv[1]) * 2**20  # this much more address space, and no more
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from middleware import MwTracker
t = MwTracker()
with t.labels(step="work"):
    print("result", sum(i * i for i in range(1000)), flush=True)
threads = [open(f"/proc/self/task/{{tid}}/comm").read().strip() for tid in os.listdir("/proc/self/task")]
print(json.dumps({{"running": t.running, "threads": threads, "stats": len(t.stats())}}))
t.stop()
"""


@pytest.mark.skipif("ASAN_OPTIONS" in os.environ, reason="the sanitizers reserve terabytes of address space")
def test_a_start_that_runs_out_of_memory_leaves_nothing_running_and_the_app_unchanged(tmp_path):
    # GIVEN an app allowed only a few more MiB of address space (RLIMIT_AS) once it has imported
    # middleware, from 4 to 124 MiB: the native module cannot be mapped, the sampler's tables or
    # thread cannot be had, the profile's buffers cannot, or everything starts
    script = tmp_path / "app.py"
    script.write_text(SHORT_OF_ADDRESS_SPACE.format(root=str(ROOT)))
    failures: dict[int, str] = {}
    started = []
    for mib in range(4, 125, 6):
        r = subprocess.run([sys.executable, str(script), str(mib)], capture_output=True, text=True, timeout=60,
                           env=_hermetic_env(tmp_path, MW_PROFILE_DIR="none"), cwd=str(tmp_path))
        # THEN the app runs as it would unprofiled
        assert r.returncode == 0, (mib, r.stderr)
        out = r.stdout.splitlines()
        assert out[0] == f"result {sum(i * i for i in range(1000))}", (mib, r.stdout, r.stderr)
        res = json.loads(out[1])
        if res["running"]:
            started.append(mib)
            assert "mw-sampler" in res["threads"], (mib, res)
            continue
        # AND a start that fails says so in one line, and leaves no thread of ours running (the
        # sampler went on sampling, for nothing, when the profile's buffers could not be had after
        # it had started) and a tracker whose methods do nothing (labels() raised ImportError when
        # the native module could not be mapped)
        lines = _lines(r.stderr)
        assert len(lines) == 1 and lines[0].startswith("middleware: profiling could not start (") and \
            lines[0].endswith("the app runs unprofiled"), (mib, lines)
        assert ": )" not in lines[0], (mib, lines)  # an exception without a message: its type alone
        failures[mib] = re.match(r"[^(]*\((\w+)", lines[0]).group(1)  # type: ignore[union-attr]
        assert not [n for n in res["threads"] if n.startswith("mw-")], (mib, res)
        assert res["stats"] == 0, (mib, res)
    # AND the range crossed every way to fail into a start
    assert {"ImportError", "RuntimeError", "MemoryError"} <= set(failures.values()) and started, (failures, started)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filter uses x86-64 system call numbers")
def test_where_perf_is_refused_the_default_takes_posix_timers_without_a_warning(tmp_path):
    # GIVEN a process whose seccomp filter refuses perf_event_open (Docker's default profile does)
    r = _run_tracker_case(tmp_path, "perf-refused", {})
    # THEN it is profiled with POSIX CPU timers, and that is no failure: nothing on stderr
    assert r.returncode == 3, r.stderr
    res = json.loads(r.stdout.splitlines()[1])
    assert res["running"] == [True, True] and res["timer"] == 1, res
    assert _lines(r.stderr) == [], r.stderr


def test_the_trackers_own_problems_go_through_logging_when_it_is_configured(tmp_path):
    r = _run_tracker_case(tmp_path, "start-fails", {}, TEST_LOGGING="root")
    assert r.returncode == 3, r.stderr
    # the failed start is said by each tracker that tried, in the app's format, and never bare
    lines = _lines(r.stderr)
    assert lines and all(line == "LOG WARNING middleware.tracker | middleware: profiling could not start "
                         "(RuntimeError: cannot start the sampler thread); the app runs unprofiled"
                         for line in lines), lines


def test_the_trackers_own_problems_are_silenced_by_quiet(tmp_path):
    r = _run_tracker_case(tmp_path, "no-pause", {}, MW_PROFILING_QUIET="1")
    assert r.returncode == 3 and _lines(r.stderr) == [], r.stderr
    assert json.loads(r.stdout.splitlines()[1])["can_pause"] == 0


ENDING_APP = """
import json, sys, threading, time
sys.path.insert(0, {root!r})
from middleware import MwTracker
tracker = MwTracker(sample_rate=10, profile_dir="none", instrument=False)
go = threading.Event()
threads = [threading.Thread(target=go.wait) for _ in range(800)]
for t in threads:
    t.start()
time.sleep(0.3)
go.set()  # 800 threads end at once, between two of the sampler's ticks (10 Hz)
for t in threads:
    t.join()
time.sleep(0.3)
print(json.dumps({{"exits_lost": tracker.stats()["exits_lost"]}}))
tracker.stop()
"""


def test_ending_threads_whose_last_clocks_find_no_room_are_said_once(tmp_path):
    # GIVEN 800 threads started under the profiler that end at once at 10 Hz: their last CPU
    # clocks overflow the ring of 256 the sampler empties at each tick
    script = tmp_path / "ending.py"
    script.write_text(ENDING_APP.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MW_")}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lost = json.loads(proc.stdout)["exits_lost"]
    lines = [line for line in proc.stderr.splitlines() if "ending threads" in line]
    # THEN the loss is counted and said in one stderr line
    assert lost > 0, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("middleware: "), proc.stderr
    assert "exits_lost" in lines[0], lines


MANY_THREADS_APP = r"""
import hashlib, json, sys, threading, time
sys.path.insert(0, sys.argv[1])
from middleware import MwTracker, _native
t = MwTracker(sample_rate=100, profile_dir="none", instrument=False)
t.snapshot(reset=True)
threading.stack_size(256 * 1024)
done, stop, cpu = threading.Event(), threading.Event(), {}

def oldest():  # C without the GIL, so starting the others does not wait for it
    t0, data = time.thread_time(), b"x" * (1 << 20)
    while not done.is_set():
        hashlib.sha256(data).digest()
    cpu["busy"] = time.thread_time() - t0

busy = threading.Thread(target=oldest, name="busy-oldest")
busy.start()
idle = [threading.Thread(target=stop.wait, name=f"idle-{i}") for i in range(int(sys.argv[2]))]
for th in idle:
    th.start()
time.sleep(0.5)
done.set()
busy.join()
p = t.snapshot()
stats = _native.stats()
stop.set()
for th in idle:
    th.join()
t.stop()
ci = p.value_index("cpu")
cpu["profiled"] = sum(s.values[ci] for s in p.samples if s.label("thread_name") == "busy-oldest") / 1e9
cpu["in_python"] = sum(
    s.values[ci] for s in p.samples
    if s.label("thread_name") == "busy-oldest" and any(f.function == "oldest" for f in s.stack)
) / 1e9
print(json.dumps({"cpu": cpu, "cut": stats["threads_cut"]}))
"""


@pytest.mark.skipif("ASAN_OPTIONS" in os.environ, reason="4,200 threads: heavy under the sanitizers, nothing of C")
@pytest.mark.parametrize("cpu_timer", ["off", None], ids=["ticks-only", "default"])
def test_more_python_threads_than_the_ticks_read_is_said_and_the_oldest_keep_their_cpu(cpu_timer):
    from support.processes import run_code

    # GIVEN 4,200 Python threads (the ticks list the 4,096 newest), the oldest of them busy in C
    # all along, sampled with ticks only (there its CPU is counted as a thread out of the list's)
    # or with the default CPU timers
    r, err = run_code(MANY_THREADS_APP, "4200", env={"MW_PROFILING_CPU_TIMER": cpu_timer, "MW_PROFILING_QUIET": None})
    # THEN it is said, once (before: nothing, and the oldest threads were simply not read)
    assert r["cut"] > 0 and err.count("more than 4096 Python threads") == 1, (r, err)
    # AND the oldest thread's CPU is under its own name (it was under thread-<tid> with ticks
    # only: its kernel name is the process's)
    assert abs(r["cpu"]["profiled"] - r["cpu"]["busy"]) <= 0.1 * r["cpu"]["busy"] + 0.02, r
    # AND with CPU timers all of it is at its Python stack (its handler reads the thread state it
    # was armed for: the ~18% it used once the list was cut had no Python frame)
    if cpu_timer is None:
        assert r["cpu"]["in_python"] >= 0.97 * r["cpu"]["profiled"], r


APP_TAKES_THE_SIGNAL = r"""
import json, signal, sys, threading, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from middleware import MwTracker, _native
from support.processes import burn
t = MwTracker(sample_rate=100, profile_dir="none", instrument=False)
t.snapshot(reset=True)
ours = _native.sampling_signal()
calls = []
# the app takes "its" real-time signal after the tracker started: a handler of its own, or the
# default disposition back (code resetting every signal)
signal.signal(ours, (lambda signum, frame: calls.append(signum)) if sys.argv[2] == "handler" else signal.SIG_DFL)
truth = {}
def worker(name):
    truth[name] = burn(1.0)
threads = [threading.Thread(target=worker, args=(f"w{i}",), name=f"w{i}") for i in range(2)]
for th in threads:
    th.start()
for th in threads:
    th.join()
p = t.snapshot()
ci = p.value_index("cpu")
got = {name: sum(s.values[ci] for s in p.samples
                 if s.label("thread_name") == name and any(f.function == "burn" for f in s.stack)) for name in truth}
print(json.dumps({"ours": ours, "calls": len(calls), "truth": truth, "got": got,
                  "taken": _native.stats()["signal_taken"], "now": _native.sampling_signal()}))
"""


@pytest.mark.parametrize("cpu_timer", [None, "off"], ids=["default", "ticks-only"])
@pytest.mark.parametrize("disposition", ["handler", "default"])
def test_an_app_taking_the_profilers_signal_gets_none_of_it_and_the_profile_goes_on(disposition, cpu_timer):
    from support.processes import run_code

    # GIVEN a profiled app that installs its own disposition for the profiler's real-time signal
    r, err = run_code(APP_TAKES_THE_SIGNAL, disposition, env={"MW_PROFILING_CPU_TIMER": cpu_timer,
                                                             "MW_PROFILING_QUIET": None})
    # THEN it lives (SIG_DFL: "Real-time signal 6" ended it at the next CPU sample, in every mode),
    # its handler is never called with ours (240 calls in 2 s of two busy threads before)
    assert r["ours"] > 0 and r["calls"] == 0, (r, err)
    # AND the sampler stopped sending it, said once
    assert r["taken"] == r["ours"] and r["now"] == 0, r
    assert err.count(f"set a disposition of its own for signal {r['ours']}") == 1, err
    # AND each thread's CPU is still in the profile, read by the ticks (all of it was lost)
    assert all(abs(r["got"][k] - v) <= 0.1 * v for k, v in r["truth"].items()), r


def test_a_signal_call_that_fails_outside_the_main_thread_leaves_the_profilers_signal_alone():
    from support.processes import run_code

    code = r'''
import json, signal, sys, threading
sys.path.insert(0, sys.argv[1])
from middleware import MwTracker, _native
t = MwTracker(sample_rate=100, profile_dir="none", instrument=False)
ours, out = _native.sampling_signal(), {}
def other():
    try:
        signal.signal(ours, signal.SIG_DFL)
    except ValueError as exc:  # signal only works in the main thread
        out["error"] = str(exc)
th = threading.Thread(target=other)
th.start()
th.join()
print(json.dumps({"ours": ours, "now": _native.sampling_signal(), "error": out.get("error", ""),
                  "taken": _native.stats()["signal_taken"]}))
'''
    r, err = run_code(code)
    # THEN the app's call fails as it would have, and the profiler keeps its signal (CPU timers on)
    assert r["error"] and r["ours"] > 0 and r["now"] == r["ours"] and r["taken"] == 0, (r, err)
