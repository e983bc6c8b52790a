"""How small a regression the detector finds (middleware/regression.py), and how often it cries wolf.

Draws sampled profiles of the calc demo's shape (tests/unit/test_regression.py's SHARES) at 100 Hz
for --seconds on each side (default 60: 6,000 samples), makes calc2 slower by each change size,
and prints the share of --trials comparisons that flag calc2; then the share of null comparisons
(same code, fresh samples) that flag anything. ``--per share`` (default) compares shares of the
total; ``--per request`` draws the samples of a number of requests (Poisson counts, the same
expected samples per side) whose count both profiles carry, and compares cost per request.

``--machine 1.15`` (with ``--per request``) runs the AFTER side on a machine 15% slower: every
function's cost per request x1.15, calc2's change on top (judged beyond the common change).

    .venv/bin/python bench/regress_sensitivity.py [--seconds 60] [--trials 200] [--per share|request]
        [--machine 1.15]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))

from middleware.profile import Profile  # noqa: E402
from middleware.regression import detect  # noqa: E402
from test_regression import PER_REQUEST, SHARES, sampled, served, slower  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--null-trials", type=int, default=1000)
    ap.add_argument("--per", choices=("share", "request"), default="share")
    ap.add_argument("--machine", type=float, default=1.0,
                    help="with --per request: every function's cost per request times this on the AFTER side "
                         "(a slower machine: 1.15), calc2's change on top")
    args = ap.parse_args()
    n = int(args.seconds * args.rate)
    rng = random.Random(7)
    requests = round(n / sum(PER_REQUEST.values()))

    def side(change: float, machine: float = 1.0) -> Profile:
        if args.per == "request":
            base = {s: machine * w for s, w in PER_REQUEST.items()}
            return served(slower(base, "calc2", 1 + change) if change else base, requests, rng)
        return sampled(slower(SHARES, "calc2", 1 + change) if change else SHARES, n, rng)

    what = f"{requests} requests" if args.per == "request" else "compared as shares"
    print(f"{n} samples per side ({args.seconds:g} s at {args.rate} Hz, {what}); calc2 = 15% of the samples; "
          f"threshold 10%, family-wise 99.9%")
    print(f"{'calc2 slower by':>16} {'detected':>9}")
    for change in (0.10, 0.15, 0.20, 0.25, 0.30, 0.40, 0.50):
        hits = 0
        for _ in range(args.trials):
            found = detect(side(0.0), side(change, args.machine), per=args.per)
            hits += any(f.function == "calc2" for f in found)
        print(f"{change:>15.0%} {hits / args.trials:>9.0%}")
    false = sum(bool(detect(side(0.0), side(0.0, args.machine), per=args.per)) for _ in range(args.null_trials))
    machine = f" (the AFTER machine x{args.machine:g})" if args.machine != 1.0 else ""
    print(f"null changes{machine} flagged: {false} of {args.null_trials}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
