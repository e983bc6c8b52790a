"""Helpers for tests that run a child process or a server: its environment, a free port, HTTP
requests to it, its children, and a CPU burner whose time the child measures.

``spin`` and ``burn`` run inside the children too (imported, or copied by ``inspect.getsource``
into an app module), so they use only ``time``; the profiles are searched for them by name.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = str(Path(__file__).resolve().parents[2])  # the checkout
# Variables that configure the profiler (or that it reads as a fallback): a child starts without them.
PROFILER_PREFIXES = ("MW_", "OTEL_")


def clean_env(*also_drop: str) -> dict[str, str]:
    """This process's environment without the profiler's variables (nor those starting with
    ``also_drop``), so that a child's profiler sees only what the test sets."""
    drop = PROFILER_PREFIXES + also_drop
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def run_code(code: str, *args: str, env: dict[str, str | None] | None = None,
             timeout: float = 60) -> tuple[dict[str, Any], str]:
    """Runs ``code`` in a fresh interpreter (argv: the checkout, then ``args``; ``env`` added to
    this process's, None removing a variable); asserts it exits 0 and returns the JSON of its
    last stdout line and its stderr."""
    full = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    p = subprocess.run([sys.executable, "-c", code, ROOT, *args], capture_output=True, text=True, timeout=timeout,
                       env=full)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, bytes]:
    """One request to 127.0.0.1:``port`` on a new connection: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_get(port: int, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
    return http_request(port, "GET", path, timeout=timeout)


def closed_loop(port: int, next_path: Callable[[int], str | None], clients: int,
                on_answer: Callable[[str, bytes], None] | None = None, join_timeout: float | None = None) -> None:
    """Closed-loop HTTP load: ``clients`` threads each GET ``next_path(client)`` (called under one
    lock, so it may keep state) until it returns None; ``on_answer(path, body)`` (also under the
    lock) sees each 200 answer and may raise to reject it. The first failure (not 200, a
    connection error, a rejected answer) stops every client and fails the caller with the
    failures seen."""
    lock = threading.Lock()
    errors: list[str] = []

    def client(k: int) -> None:
        while not errors:
            with lock:
                path = next_path(k)
            if path is None:
                return
            try:
                status, body = http_get(port, path)
            except OSError as exc:
                errors.append(f"{path}: {exc!r}")
                return
            if status != 200:
                errors.append(f"{path}: {status} {body[:200]!r}")
                return
            if on_answer is not None:
                with lock:
                    try:
                        on_answer(path, body)
                    except Exception as exc:
                        errors.append(f"{path}: {exc!r}: {body[:200]!r}")
                        return

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=join_timeout)
    assert not errors, errors


def children(pid: int) -> set[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    kids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces, so split after the last ')'
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.add(int(entry.name))
    return kids


def spin(k: int) -> int:
    s = 0
    for i in range(k):
        s += i * i
    return s


def burn(seconds: float) -> int:
    """Burns ``seconds`` of this thread's CPU; returns the CPU ns it measured."""
    t0 = time.thread_time_ns()
    while time.thread_time_ns() - t0 < seconds * 1e9:
        spin(2000)
    return time.thread_time_ns() - t0


def burn_cpu_by_pid(profiles: Iterable[Any]) -> tuple[dict[str, int], set[str]]:
    """The CPU ns of the samples whose stack holds ``burn``, per ``pid`` label; and the thread
    names those samples carry."""
    out: dict[str, int] = {}
    names: set[str] = set()
    for p in profiles:
        if "cpu" not in (t for t, _ in p.sample_types):
            continue  # a lock-wait profile of the same window
        ci = p.value_index("cpu")
        for s in p.samples:
            if any(f.function == "burn" for f in s.stack):
                pid = s.label("pid") or "?"
                out[pid] = out.get(pid, 0) + s.values[ci]
                names.add(s.label("thread_name") or "?")
    return out, names
