"""A write our signal cut short is finished before the app sees it (csrc/mw_finishwrite.h): pipes
written by a thread that burns CPU between its writes, a large print under PYTHONUNBUFFERED=1, and
the app's own signal ending such a write."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from support.processes import ROOT
from support.processes import run_code as run_child

pytestmark = pytest.mark.asan  # the handler's new path runs under make asan too

PIPE_WRITER_CHILD = r"""
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
from middleware import MwTracker
t = MwTracker(profile_dir="none", instrument=False, sample_rate=1000)
r, w = os.pipe()

def reader():  # a slow reader: the pipe fills and each large write blocks in the kernel
    while os.read(r, 4096):
        time.sleep(0.0001)

th = threading.Thread(target=reader)
th.start()
big = b"x" * 300_000
partial = 0
for _ in range(60):
    end = time.thread_time() + 0.002
    while time.thread_time() < end:  # CPU right before the write: an overflow can fall in it
        pass
    n = os.write(w, big)
    if n < len(big):
        partial += 1
        rest = memoryview(big)[n:]
        while rest:
            rest = rest[os.write(w, rest):]
os.close(w)
th.join()
st = t.stats()
import signal
print(json.dumps({"partial": partial, "sigtrap": st["cpu_timer_sigtrap"], "signals": st["cpu_timer_signals"],
                  "periods": st["cpu_timer_periods"],
                  "trap_untouched": signal.getsignal(signal.SIGTRAP) == signal.SIG_DFL,
                  "finished": st["cut_writes_finished"], "watched": st["cut_writes_watched"]}))
"""


@pytest.mark.parametrize("mode", ["perf", "perf-trap", "timer"])
def test_cpu_samples_never_cut_a_write_short(mode):
    # GIVEN a thread that burns 2 ms, then writes 300 KB to a pipe whose reader is slow, 60 times,
    # sampled at 1 kHz
    r, _ = run_child(PIPE_WRITER_CHILD, env={"MW_PROFILING_CPU_TIMER": mode}, timeout=120)
    # the timer ran through the burns and the writes (about 250 ms of the thread's CPU, one period
    # a ms); perf events signal each overflow, but the kernel checks POSIX CPU timers at its tick
    # (4 ms at HZ=250) and counts the expiries that fall while one signal is pending as overruns:
    # 21 to 69 signals for about 250 periods here
    assert r["periods"] >= 100, r
    assert r["signals"] >= (100 if mode.startswith("perf") else 10), r
    if mode == "perf":
        # on the default route an overflow in the kernel queues our real-time signal, pending when
        # the write then blocks: the write returns a partial count (24 of 60 here) and the handler
        # finishes it before the app sees it
        if not r["watched"]:
            pytest.skip(f"this C library's write(2) is not one whose cut writes are finished: {r}")
        assert r["finished"] > 0 and not r["sigtrap"], r
        # and by default SIGTRAP is left alone (libraries take it: Celery's billiard pool workers
        # exit on it)
        assert r["trap_untouched"], r
    if mode == "perf-trap" and not r["sigtrap"]:
        pytest.skip(f"the perf events' SIGTRAP route is not available here: {r}")
    # THEN no write returns short: with perf-trap the signal is raised on the way back to user
    # mode, POSIX timers expire there too (a tick's pause signal may still cut one: finished)
    assert r["partial"] == 0, r


UNBUFFERED_PRINT_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from middleware import MwTracker
t = MwTracker(profile_dir="none", instrument=False, sample_rate=1000)
print("x" * 3_000_000)
"""


def test_a_large_unbuffered_print_to_a_slow_reader_arrives_whole():
    # GIVEN a child with PYTHONUNBUFFERED=1 (as many container images set it: CPython's
    # TextIOWrapper over a raw stdout drops the rest of a text whose write returned short) printing
    # 3 MB at 1 kHz to a reader taking 4 KiB every 0.2 ms; 10 runs of 10 lost data before the
    # handler finished the writes its signal cut short
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    lost = []
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-c", UNBUFFERED_PRINT_CHILD, ROOT], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
        assert p.stdout is not None and p.stderr is not None
        got = 0
        while chunk := p.stdout.read1(4096):
            got += len(chunk)
            time.sleep(0.0002)
        err = p.stderr.read()
        assert p.wait(timeout=60) == 0, err[-2000:]
        if got != 3_000_001:
            lost.append(got)
    # THEN every byte arrives
    assert not lost, lost


ALARM_DURING_WRITE_CHILD = r"""
import json, os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
from middleware import MwTracker
t = MwTracker(profile_dir="none", instrument=False, sample_rate=1000)
r, w = os.pipe()
stop = threading.Event()
def reader():  # reads slowly for 1 s, then never again: the next write waits for good
    while not stop.is_set() and os.read(r, 4096):
        time.sleep(0.0001)
threading.Thread(target=reader, daemon=True).start()
threading.Timer(1.0, stop.set).start()
def on_alarm(signum, frame):
    raise TimeoutError
signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, 3.0)
big = b"x" * 300_000
writes = 0
t0 = time.monotonic()
try:
    while True:
        end = time.thread_time() + 0.002
        while time.thread_time() < end:
            pass
        os.write(w, big)
        writes += 1
except TimeoutError:
    pass
st = t.stats()
print(json.dumps({"after": time.monotonic() - t0, "writes": writes, "finished": st["cut_writes_finished"]}))
t.stop()
os._exit(0)
"""


def test_the_apps_own_signal_still_ends_a_write_the_handler_finishes():
    # GIVEN the main thread burning 2 ms then writing 300 KB to a pipe, 1 kHz samples, whose reader
    # stops after 1 s, and a SIGALRM at 3 s whose Python handler raises
    r, _ = run_child(ALARM_DURING_WRITE_CHILD, timeout=60)
    # THEN the app's signal ends the write that waits for good, as it would unprofiled (the handler
    # that finishes a cut write waits with the app's signals open): no hang
    assert 2.9 < r["after"] < 10, r
    assert r["writes"] > 0, r
