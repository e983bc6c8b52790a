"""What reading asyncio tasks costs the sampler: its CPU with N tasks waiting on one event loop.

    .venv/bin/python bench/asyncio_tasks.py [--tasks 0,10,100,1000,5000] [--rounds 5] [--seconds 5]

Each run is a fresh interpreter (tests/targets/asyncio_workloads.py pending N SECONDS RATE): N
tasks wait on an event (two coroutines deep) while the loop idles, and the sampler's own CPU over
SECONDS (from ``stats()``: its thread's clock) is divided by the wall time. The counts run one
after the other in each round (alternating), and the medians of --rounds rounds are printed, with
what the task walk adds over no task (the sampler's tick alone) and the share of ticks that read
only a slice of the task set (the bounded walk).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(ntasks: int, seconds: float, rate: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "targets" / "asyncio_workloads.py"), "pending",
                          str(ntasks), str(seconds), str(rate)], capture_output=True, text=True, check=True,
                         cwd=str(ROOT))
    d = json.loads(out.stdout)
    s = d["stats"]
    return {"share": d["sampler_core_share"], "task_samples": s["task_samples"],
            "partial": s["task_partial_ticks"] / max(1, s["ticks"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="0,10,100,1000,5000", help="task counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=int, default=100, help="sampling rate (Hz)")
    args = ap.parse_args()
    counts = [int(x) for x in args.tasks.split(",")]
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    for r in range(args.rounds):
        for n in counts:
            runs[n].append(run(n, args.seconds, args.rate))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    base = statistics.median(x["share"] for x in runs[counts[0]]) if counts[0] == 0 else None
    print(f"sampler CPU, % of one core, at {args.rate} Hz ({args.rounds} rounds, medians)")
    print(f"{'tasks':>6} {'sampler':>8} {'added':>7} {'partial ticks':>14}")
    for n in counts:
        share = statistics.median(x["share"] for x in runs[n]) * 100
        added = f"{share - base * 100:+.2f}" if base is not None else "-"
        partial = statistics.median(x["partial"] for x in runs[n]) * 100
        print(f"{n:>6} {share:>7.2f}% {added:>7} {partial:>13.0f}%")


if __name__ == "__main__":
    main()
