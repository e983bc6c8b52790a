"""What finding the running asyncio task costs the sampler, per CPU sample.

    .venv/bin/python bench/asyncio_running.py [--rounds 7] [--seconds 4] [--rate 1000]

Each run is a fresh interpreter (tests/targets/asyncio_workloads.py burn MODE SECONDS RATE):
``task`` burns CPU in two tasks gathered by a third on one event loop, 2 ms slices in turn, so
every CPU sample is a running task's (its task looked up, its parents' chains read and spliced in);
``plain`` burns the same CPU in a plain loop. The sampler's own CPU (its thread's clock, from
``stats()``) is divided by the CPU samples taken; the modes alternate in each round and the
medians of --rounds rounds are printed, with the difference: what a running task's sample adds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(mode: str, seconds: float, rate: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "targets" / "asyncio_workloads.py"), "burn", mode,
                          str(seconds), str(rate)], capture_output=True, text=True, check=True, cwd=str(ROOT))
    d = json.loads(out.stdout)
    return {"per_sample_us": d["sampler_ns"] / max(1, d["cpu_samples"]) / 1e3,
            "share": d["sampler_ns"] / 1e9 / d["wall"], "samples": d["cpu_samples"],
            "found": d["stats"].get("tasks_running_found", 0), "missed": d["stats"].get("tasks_running_missed", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rate", type=int, default=1000, help="sampling rate (Hz)")
    args = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "task": []}
    for r in range(args.rounds):
        for mode in runs:
            runs[mode].append(run(mode, args.seconds, args.rate))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    med = {m: {k: statistics.median(x[k] for x in v) for k in v[0]} for m, v in runs.items()}
    print(f"sampler CPU per CPU sample at {args.rate} Hz ({args.rounds} rounds, medians)")
    print(f"{'mode':>6} {'us/sample':>10} {'% of a core':>12} {'samples':>8} {'found':>6} {'missed':>7}")
    for m, x in med.items():
        print(f"{m:>6} {x['per_sample_us']:>10.2f} {x['share'] * 100:>11.2f}% {x['samples']:>8.0f} "
              f"{x['found']:>6.0f} {x['missed']:>7.0f}")
    print(f"a running task's sample adds {med['task']['per_sample_us'] - med['plain']['per_sample_us']:+.2f} us")


if __name__ == "__main__":
    main()
