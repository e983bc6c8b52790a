"""What a process tree that does not exit is doing: every thread's native stack, through gdb.

A server test that times out waiting for its processes to stop calls :func:`native_stacks` on
the root pid and puts the result in its failure message, so a hang seen once (in CI, say) can
be told apart from a slow machine without reproducing it.
"""
from __future__ import annotations

import os
import shutil
import subprocess


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants, parents first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return out


def native_stacks(root: int, timeout: float = 20.0) -> str:
    """Every thread's backtrace of ``root`` and its descendants (gdb, attached in turn), or why
    not. Bounded by ``timeout`` per process."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return "(gdb not installed: no native stacks)"
    parts = []
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
            p = subprocess.run([gdb, "-batch", "-nx", "-p", str(pid), "-ex", "thread apply all bt 40"],
                               capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
            bt = "\n".join(x for x in p.stdout.splitlines() if x.startswith(("#", "Thread ")))
        except (OSError, subprocess.TimeoutExpired) as exc:
            bt = f"(gdb failed: {exc})"
        parts.append(f"--- pid {pid}: {cmd}\n{bt}")
    return "\n".join(parts)
