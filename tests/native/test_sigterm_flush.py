"""A process ended by SIGTERM's or SIGHUP's default action keeps its last window
(csrc/mw_termflush.h): a plain script or worker killed by `kill`, `docker stop` or a Kubernetes
rolling update, or a script whose terminal went away, used to lose everything sampled since its
last export, without a word. Each case runs a child, sends it the signal and reads the store (or
the backend) it leaves."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from middleware.pprof import parse_pprof
from support.fake_backend import FakeBackend
from support.processes import ROOT

pytestmark = pytest.mark.asan  # a signal handler and a thread of the profiler's own

CHILD = r"""
import hashlib, json, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from middleware import MwTracker
store, mode = sys.argv[2], sys.argv[3]
# SIGHUP's default disposition, as a process started from a terminal has it (the test runner's may
# be nohup's SIG_IGN, which a child inherits), or, started under nohup, ignored
signal.signal(signal.SIGHUP, signal.SIG_IGN if mode == "nohup" else signal.SIG_DFL)
t = MwTracker(profile_dir=store or None, upload_interval=3600, sample_rate=100, instrument=False)
if mode == "handler":  # the app's own handler, set after the tracker started: it runs, as before
    def on_term(sig, frame):
        print(json.dumps({"handler_ran": True}), flush=True)
        sys.exit(3)
    signal.signal(signal.SIGTERM, on_term)
def burn_before_sigterm(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
if mode == "forked":  # the child of a fork (its tracker restarted there) is the one killed
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"child_signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}), flush=True)
        sys.exit(0)
burn_before_sigterm(0.5)
print(json.dumps({"pid": os.getpid(), "default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
                  "hup_default": signal.getsignal(signal.SIGHUP) == signal.SIG_DFL}), flush=True)
if mode == "busy_c":  # the main thread in a long C call when the signal comes
    hashlib.pbkdf2_hmac("sha256", b"x", b"y", 100_000_000)
else:
    time.sleep(60)
"""


def kill_when_ready(store: str, mode: str, env: dict[str, str] | None = None,
                    sig: int = signal.SIGTERM) -> dict[str, Any]:
    """Runs CHILD, sends sig to the pid it names once it has burned, and returns its exit
    code, the seconds from the signal to its end and the JSON lines it printed."""
    p = subprocess.Popen([sys.executable, "-c", CHILD, ROOT, store, mode], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    assert p.stdout is not None and p.stderr is not None
    ready = json.loads(p.stdout.readline())
    t0 = time.monotonic()
    os.kill(ready["pid"], sig)
    out, err = p.communicate(timeout=30)
    return {"rc": p.returncode, "seconds": time.monotonic() - t0, "ready": ready, "err": err,
            "lines": [json.loads(line) for line in out.splitlines() if line.strip()]}


def burn_cpu(pprofs: list[bytes]) -> float:
    total = 0
    for raw in pprofs:
        prof = parse_pprof(raw)
        i = prof.value_index("cpu")
        total += sum(s.values[i] for s in prof.samples if any(f.function == "burn_before_sigterm" for f in s.stack))
    return total / 1e9


@pytest.mark.parametrize("mode", ["sleeping", "busy_c", "forked"])
def test_a_process_ended_by_sigterm_exports_its_last_window_and_dies_of_it(mode: str, tmp_path: Path) -> None:
    # GIVEN a process (or a forked child) that burns 0.5 s, with SIGTERM's default disposition,
    # then sleeps or computes in C in its main thread
    r = kill_when_ready(str(tmp_path), mode)
    # THEN it dies of SIGTERM as it would have, within a second
    if mode == "forked":
        assert r["rc"] == 0 and r["lines"] == [{"child_signal": signal.SIGTERM}], r
    else:
        assert r["rc"] == -signal.SIGTERM, r
    assert r["seconds"] < 1.0, r
    # AND the app saw SIGTERM's default disposition, and nothing was said
    assert r["ready"]["default"] is True, r
    assert "middleware" not in r["err"], r["err"]
    # AND its last window is in the store, burn and all (before: no file at all)
    files = sorted(tmp_path.glob(f"*-{r['ready']['pid']}-*.pb.gz"))
    assert 0.45 <= burn_cpu([f.read_bytes() for f in files]) <= 0.55, [f.name for f in files]


@pytest.mark.parametrize("mode", ["sleeping", "forked"])
def test_a_process_ended_by_sighup_exports_its_last_window_and_dies_of_it(mode: str, tmp_path: Path) -> None:
    # GIVEN a process (or a forked child) with SIGHUP's default disposition (Python's), whose
    # terminal goes away
    r = kill_when_ready(str(tmp_path), mode, sig=signal.SIGHUP)
    # THEN it dies of SIGHUP as it would have, within a second, saying nothing
    if mode == "forked":
        assert r["rc"] == 0 and r["lines"] == [{"child_signal": signal.SIGHUP}], r
    else:
        assert r["rc"] == -signal.SIGHUP, r
    assert r["seconds"] < 1.0 and r["ready"]["hup_default"] is True, r
    assert "middleware" not in r["err"], r["err"]
    # AND its last window is in the store (before: no file at all)
    files = sorted(tmp_path.glob(f"*-{r['ready']['pid']}-*.pb.gz"))
    assert 0.45 <= burn_cpu([f.read_bytes() for f in files]) <= 0.55, [f.name for f in files]


def test_a_sighup_ignored_before_the_tracker_started_stays_ignored(tmp_path: Path) -> None:
    # GIVEN a process started under nohup (SIGHUP ignored)
    p = subprocess.Popen([sys.executable, "-c", CHILD, ROOT, str(tmp_path), "nohup"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    ready = json.loads(p.stdout.readline())
    # THEN a SIGHUP leaves it running, and a SIGTERM still ends it after its last export
    os.kill(ready["pid"], signal.SIGHUP)
    time.sleep(0.3)
    assert p.poll() is None and ready["hup_default"] is False
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == -signal.SIGTERM and "middleware" not in err, err
    assert 0.45 <= burn_cpu([f.read_bytes() for f in tmp_path.glob("*.pb.gz")]) <= 0.55


def test_an_apps_own_sigterm_handler_runs_as_before(tmp_path: Path) -> None:
    r = kill_when_ready(str(tmp_path), "handler")
    assert r["rc"] == 3 and {"handler_ran": True} in r["lines"], r
    assert r["ready"]["default"] is False, r
    assert 0.45 <= burn_cpu([f.read_bytes() for f in tmp_path.glob("*.pb.gz")]) <= 0.55  # its exit's export


@pytest.mark.parametrize("backend_state", ["answering", "hanging"])
def test_the_last_window_is_uploaded_before_sigterm_ends_the_process(backend_state: str) -> None:
    # GIVEN a process uploading to a backend (no local store), killed by SIGTERM
    with FakeBackend() as backend:
        if backend_state == "hanging":
            backend.hang()
        r = kill_when_ready("", "sleeping", env={"MW_PROFILING_SERVER_URL": backend.url})
        assert r["rc"] == -signal.SIGTERM, r
        if backend_state == "answering":
            # THEN the backend has its last window before it ends
            assert r["seconds"] < 1.0, r
            assert 0.45 <= burn_cpu([rec.body for rec in backend.ingests()]) <= 0.55, backend.ingests()
        else:
            # a backend that never answers holds the end back by the upload's bound (2 s), no more
            assert 1.5 <= r["seconds"] < 4.0, r


BUSY_CHILD = r"""
import sys, threading, time
sys.path.insert(0, sys.argv[1])
from middleware import MwTracker
t = MwTracker(profile_dir=sys.argv[2], upload_interval=0.05, sample_rate=1000, instrument=False)
def churn():
    while True:
        threading.Thread(target=sum, args=(range(20000),)).start()
        time.sleep(0.001)
for _ in range(3):
    threading.Thread(target=churn, daemon=True).start()
while True:
    sum(range(10000))
"""


def test_sigterm_at_any_moment_ends_the_process_promptly(tmp_path: Path) -> None:
    # GIVEN busy processes (threads starting and ending, a window exported every 50 ms, 1 kHz),
    # each sent SIGTERM at a random moment from its start (before the tracker, while it starts,
    # while it runs)
    import random

    rnd = random.Random(7)
    outcomes = []
    for i in range(12):
        p = subprocess.Popen([sys.executable, "-c", BUSY_CHILD, ROOT, str(tmp_path / str(i))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(rnd.uniform(0.0, 0.8))
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
        outcomes.append((p.returncode, round(time.monotonic() - t0, 3), err[-300:]))
    # THEN every one dies of SIGTERM, within a second, saying nothing
    assert all(rc == -signal.SIGTERM and s < 1.0 and not err for rc, s, err in outcomes), outcomes
