"""What following task steps for labels costs on uvloop: ns per task step, alternating runs.

    .venv/bin/python bench/label_steps.py [--steps 200000] [--rounds 7]

One task awaits ``asyncio.sleep(0)`` --steps times on a uvloop loop, with a label set active
(``with labels(job=...)``) and without; each shape runs on a plain loop (labels not followed:
those samples would be unlabelled) and on a loop with the labels' task factory (each step runs
under the task's labels, ``middleware.labels._LabelledSteps``). Prints the medians of --rounds
alternating runs.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from middleware import labels as mw_labels  # noqa: E402


def run(steps: int, follow: bool, labelled: bool) -> float:
    import uvloop

    loop = uvloop.new_event_loop()
    if follow:
        mw_labels._follow_task_steps(loop)

    async def job() -> None:
        with mw_labels.labels(job="x") if labelled else contextlib.nullcontext():
            for _ in range(steps):
                await asyncio.sleep(0)

    async def main() -> None:
        await loop.create_task(job())

    t0 = time.perf_counter()
    loop.run_until_complete(main())
    dt = time.perf_counter() - t0
    loop.close()
    return dt / steps * 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    for labelled in (False, True):
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for follow in (False, True):
                times[follow].append(run(args.steps, follow, labelled))
        plain, followed = statistics.median(times[False]), statistics.median(times[True])
        print(f"{'with' if labelled else 'without'} labels: {plain:.0f} ns per step on a plain loop, "
              f"{followed:.0f} followed (+{followed - plain:.0f} ns)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
