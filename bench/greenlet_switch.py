"""What following greenlet switches for labels costs: ns per switch, alternating fresh processes.

    .venv/bin/python bench/greenlet_switch.py [--switches 200000] [--rounds 7]

Two greenlets on one thread switch to each other --switches times, bare (``greenlet.switch``) and
under gevent (each ``gevent.sleep(0)``: a switch to the hub and one to the other greenlet). Three
shapes, each run in a fresh interpreter (the switch tracer, once installed, stays for the
thread's life): ``none`` (no label ever set: no tracer), ``same`` (both greenlets inside the same
``labels(...)`` block: the tracer runs at every switch and finds the slot right), ``differ``
(each greenlet inside its own block: every switch writes the thread's slot) and ``spans`` (each
greenlet under its own span id, as OpenTelemetry's requests are). Prints the medians of --rounds
alternating runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
kind, shape, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
if kind == "gevent":
    from gevent import monkey
    monkey.patch_all()
import contextlib
import greenlet
from middleware import labels as mw_labels


@contextlib.contextmanager
def span(side):
    token = mw_labels.push_span(mw_labels.SpanId(("a" if side == "a" else "b") * 16), "GET /" + side)
    try:
        yield
    finally:
        mw_labels.pop_labels(token)


def block(side):
    if shape == "none":
        return contextlib.nullcontext()
    if shape == "spans":
        return span(side)
    return mw_labels.labels(side=side if shape == "differ" else "same")


if kind == "gevent":
    import gevent

    def body(side):
        with block(side):
            for _ in range(n):
                gevent.sleep(0)

    t0 = time.perf_counter()
    gevent.joinall([gevent.spawn(body, "a"), gevent.spawn(body, "b")])
    switches = 4 * n  # each sleep(0): to the hub and back
else:
    peers = {}

    def body(side, other):
        with block(side):
            for _ in range(n):
                peers[other].switch()

    peers["a"] = greenlet.greenlet(lambda: body("a", "b"))
    peers["b"] = greenlet.greenlet(lambda: body("b", "a"))
    t0 = time.perf_counter()
    peers["a"].switch()
    switches = 2 * n
print(json.dumps((time.perf_counter() - t0) / switches * 1e9))
"""


def run(kind: str, shape: str, switches: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), kind, shape, str(switches)],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--switches", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    for kind in ("greenlet", "gevent"):
        times: dict[str, list[float]] = {"none": [], "same": [], "differ": [], "spans": []}
        for _ in range(args.rounds):
            for shape in times:
                times[shape].append(run(kind, shape, args.switches if kind == "greenlet" else args.switches // 4))
        med = {shape: statistics.median(v) for shape, v in times.items()}
        print(f"{kind}: {med['none']:.0f} ns per switch without labels, {med['same']:.0f} with the same labels "
              f"(+{med['same'] - med['none']:.0f}), {med['differ']:.0f} with each greenlet's own "
              f"(+{med['differ'] - med['none']:.0f}), {med['spans']:.0f} with each its own span "
              f"(+{med['spans'] - med['none']:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
