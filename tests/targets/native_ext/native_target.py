"""Child process for tests/native/test_native_frames.py: known native workloads under MwTracker(native=True).

    python tests/targets/native_ext/native_target.py MODE --ext-dir DIR [--seconds S] [--internal] [--python-only]

MODE hotspots: one thread alternates zlib.compress on a large buffer (zlib_caller), the test
extension's C loop (ext_caller) and a pure-Python loop (py_caller); prints the ground truth
(time.thread_time per caller) and every sample of that thread (root first).
MODE signals: native mode while the app uses faulthandler, its own SIGUSR1 handler, blocking
reads through ctypes (libc read, restarted by SA_RESTART or failing with EINTR) and Python I/O
(os.read, time.sleep, select, socket.recv); prints what each saw.
MODE exits: threads that each compress a buffer and exit, one after another, sampled at
--rate in native mode: many samples fall in a thread's exit path, after its Python function
returned; prints every sample of those threads (root first).
MODE crash: faulthandler enabled, native mode on, then a segfault: faulthandler must report it.
"""
from __future__ import annotations

import argparse
import ctypes
import faulthandler
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import warnings
import zlib
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)

from middleware import MwTracker  # noqa: E402
from middleware.profile import Profile  # noqa: E402


def zlib_caller(data: bytes) -> int:
    return len(zlib.compress(data, 6))


def ext_caller(ext: Any, n: int) -> int:
    return int(ext.spin(n))


def py_caller(n: int) -> int:
    s = 0
    for i in range(n):
        s += i * i
    return s


def samples_of(p: Profile, thread: str) -> list[dict[str, Any]]:
    ci = p.value_index("cpu")
    wi = p.value_index("wall")
    out = []
    for s in p.samples:
        if s.label("thread_name") != thread:
            continue
        # Python functions by bare name (3.10 has co_name only); native symbols as they are
        out.append({"stack": [[f.function.rsplit(".", 1)[-1] if f.file.endswith(".py") else f.function,
                               os.path.basename(f.file)] for f in s.stack],
                    "cpu": s.values[ci], "wall": s.values[wi]})
    return out


def native_stats() -> dict[str, int]:
    from middleware import _native

    return dict(_native.unwind_stats())


def run_hotspots(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, args.ext_dir)
    import mw_test_ext  # type: ignore[import-not-found]

    tracker = MwTracker(sample_rate=args.rate, native=not args.python_only, native_show_internal=args.internal,
                        profile_dir="none", instrument=False)
    data = os.urandom(1 << 19) + bytes(range(256)) * 2048  # half random, half compressible
    truth = {"zlib_caller": 0.0, "ext_caller": 0.0, "py_caller": 0.0}

    def worker() -> None:
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            for name, fn in (("zlib_caller", lambda: zlib_caller(data)),
                             ("ext_caller", lambda: ext_caller(mw_test_ext, 30_000_000)),
                             ("py_caller", lambda: py_caller(300_000))):
                t0 = time.thread_time()
                fn()
                truth[name] += time.thread_time() - t0

    th = threading.Thread(target=worker, name="hot-worker")
    th.start()
    th.join()
    p = tracker.snapshot()
    out = {"truth_cpu_s": truth, "samples": samples_of(p, "hot-worker"), "native": native_stats(),
           "stats": tracker.stats()}
    tracker.stop()
    return out


def run_exits(args: argparse.Namespace) -> dict[str, Any]:
    tracker = MwTracker(sample_rate=args.rate, native=True, profile_dir="none", instrument=False)
    data = os.urandom(1 << 18)
    deadline = time.monotonic() + args.seconds
    n = 0
    while time.monotonic() < deadline:
        th = threading.Thread(target=zlib_caller, args=(data,), name="short-lived")
        th.start()
        th.join()
        n += 1
    p = tracker.snapshot()
    out = {"threads": n, "samples": samples_of(p, "short-lived"), "native": native_stats()}
    tracker.stop()
    return out


def run_signals(args: argparse.Namespace) -> dict[str, Any]:
    faulthandler.enable()
    usr1 = [0]

    def on_usr1(signum: int, frame: Any) -> None:
        usr1[0] += 1

    signal.signal(signal.SIGUSR1, on_usr1)
    taken = None
    if args.occupy_rt:  # the app already handles a real-time signal: native mode must avoid it
        taken = signal.SIGRTMIN + 6
        signal.signal(taken, lambda s, f: None)
    tracker = MwTracker(sample_rate=args.rate, native=True, profile_dir="none", instrument=False)
    deadline = time.monotonic() + args.seconds
    report: dict[str, Any] = {"errors": [], "ops": {}}
    lock = threading.Lock()

    def count(kind: str, n: int = 1) -> None:
        with lock:
            report["ops"][kind] = report["ops"].get(kind, 0) + n

    def fail(msg: str) -> None:
        with lock:
            report["errors"].append(msg)

    libc = ctypes.CDLL(None, use_errno=True)
    libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    libc.read.restype = ctypes.c_ssize_t

    def c_reader() -> None:
        """Blocking libc read() in C, GIL released: SA_RESTART must hide the signal.

        SIGUSR1 is blocked here: the app's own handler (Python's, without SA_RESTART) would
        interrupt the read whenever the kernel hands the process-wide SIGUSR1 to this thread — which
        any thread-directed signal arriving at that moment can cause. What is tested is that the
        profiler's own signal never does."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        r, w = os.pipe()

        def feed() -> None:
            while time.monotonic() < deadline:
                os.write(w, b"x" * 64)
                time.sleep(0.02)
            os.close(w)

        f = threading.Thread(target=feed, name="c-feeder")
        f.start()
        buf = ctypes.create_string_buffer(64)
        while True:
            n = libc.read(r, buf, 64)
            if n < 0:
                fail(f"libc read failed: errno {ctypes.get_errno()}")
                continue
            if n == 0:
                break
            if n != 64:
                fail(f"libc short read {n}")
            count("c_read")
        f.join()
        os.close(r)

    def py_io() -> None:
        r, w = os.pipe()
        a, b = socket.socketpair()
        try:
            while time.monotonic() < deadline:
                try:
                    time.sleep(0.003)
                    count("sleep")
                    os.write(w, b"y" * 32)
                    if os.read(r, 32) != b"y" * 32:
                        fail("short os.read")
                    count("os_read")
                    ready, _, _ = select.select([r], [], [], 0.004)
                    if ready:
                        fail("select reported a readable empty pipe")
                    count("select")
                    a.sendall(b"z" * 16)
                    if b.recv(16) != b"z" * 16:
                        fail("short recv")
                    count("recv")
                except InterruptedError as exc:
                    fail(f"InterruptedError: {exc}")
        finally:
            for fd in (r, w):
                os.close(fd)
            a.close()
            b.close()

    def busy() -> None:
        while time.monotonic() < deadline:
            py_caller(20_000)
            count("busy")

    threads = [threading.Thread(target=t, name=t.__name__) for t in (c_reader, py_io, busy)]
    for t in threads:
        t.start()
    dumps_ok = 0
    while time.monotonic() < deadline:
        os.kill(os.getpid(), signal.SIGUSR1)
        with open(os.devnull, "w") as devnull:
            faulthandler.dump_traceback(file=devnull, all_threads=True)
        dumps_ok += 1
        time.sleep(0.05)
    for t in threads:
        t.join()
    time.sleep(0.05)  # the last SIGUSR1 runs at the next bytecode boundary
    p = tracker.snapshot()
    st = native_stats()
    tracker.stop()
    report.update(
        usr1=usr1[0], dumps=dumps_ok, native=st, taken_signal=int(taken) if taken else 0,
        faulthandler_enabled=faulthandler.is_enabled(),
        c_reader_samples=samples_of(p, "c_reader"), py_io_samples=samples_of(p, "py_io"),
    )
    return report


def run_crash(args: argparse.Namespace) -> dict[str, Any]:
    faulthandler.enable()
    MwTracker(sample_rate=args.rate, native=True, profile_dir="none", instrument=False)
    py_caller(2_000_000)  # some samples first
    ctypes.string_at(0)  # SIGSEGV: faulthandler must print the traceback
    return {}


def run_refuse(args: argparse.Namespace) -> dict[str, Any]:
    for sig in range(signal.SIGRTMIN + 6, signal.SIGRTMAX - 1):
        signal.signal(sig, lambda s, f: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = MwTracker(sample_rate=args.rate, native=True, profile_dir="none", instrument=False)
    deadline = time.monotonic() + 0.5  # ~50 ticks: Python-only samples must keep coming
    while time.monotonic() < deadline:
        py_caller(100_000)
    p = tracker.snapshot()
    out = {"warnings": [str(w.message) for w in caught], "native": native_stats(),
           "samples": sum(1 for _ in p.samples), "running": tracker.running}
    tracker.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["hotspots", "exits", "signals", "crash", "refuse"])
    ap.add_argument("--ext-dir", default="")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--internal", action="store_true")
    ap.add_argument("--python-only", action="store_true")
    ap.add_argument("--occupy-rt", action="store_true")
    args = ap.parse_args()
    fn = {"hotspots": run_hotspots, "exits": run_exits, "signals": run_signals, "crash": run_crash,
          "refuse": run_refuse}[args.mode]
    json.dump(fn(args), sys.stdout)


if __name__ == "__main__":
    main()
