"""What a daemon does after the profiler started: close every descriptor it did not open itself,
then open files of its own (which get the lowest numbers: the profiler's old ones). Shared by the
workloads that check the profiler neither reads, writes nor closes the app's files afterwards."""
from __future__ import annotations

import os

APP_DATA = b"app data"


def close_every_descriptor_and_open_pipes(count: int = 16) -> list[tuple[int, int]]:
    """Closes descriptors 3 and up, opens `count` pipes and writes APP_DATA into each."""
    os.closerange(3, 65536)
    pipes = [os.pipe() for _ in range(count)]
    for _, w in pipes:
        os.write(w, APP_DATA)
    return pipes


def pipes_intact(pipes: list[tuple[int, int]]) -> int:
    """How many of the pipes are still open with exactly APP_DATA to read (nothing taken, nothing added)."""
    intact = 0
    for r, w in pipes:
        try:
            os.fstat(w)
            os.set_blocking(r, False)
            intact += os.read(r, 4096) == APP_DATA
        except OSError:
            pass
    return intact
