"""The workloads' own peak resident memory, for the tests that bound what the profiler adds."""
from __future__ import annotations


def peak_rss_kib() -> int:
    """This program's peak resident memory (VmHWM): not getrusage's ru_maxrss, which keeps the
    peak of the process that forked and exec'ed it (a test runner of 300 MiB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
