"""Labels flipping between greenlets that share one OS thread, for the label tests.

    python tests/targets/greenlet_workloads.py MODE [--rate HZ] [--seconds S] [--min-switches N]

MODE: ``gevent-first`` (``monkey.patch_all()`` before the profiler is imported, as a gevent
worker does), ``tracker-first`` (the profiler imported and started, then gevent patched), or
``greenlet`` (bare greenlets switching to each other, no gevent). Two greenlets, each inside its
own ``labels(side=...)`` block, run ``side_a`` / ``side_b`` for ~0.1 ms and switch to the other,
so the thread's label slot must change at every switch. ``gevent-threads``: gevent patched first,
three ``threading.Thread`` (greenlets, then) run ``side_b`` one after the other and are
collected; then the main thread runs ``side_a`` under ``labels(side="a")``. Prints one JSON
object: per leaf function, the samples (CPU samples + wall seconds) per ``side`` label, the
switches made and the thread names the samples carry.
"""
from __future__ import annotations

import os
import sys

MODE = sys.argv[1] if len(sys.argv) > 1 else ""
if MODE in ("gevent-first", "gevent-threads"):
    from gevent import monkey

    monkey.patch_all()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from middleware import MwTracker  # noqa: E402
from workloads import side_a, side_b, summarize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["gevent-first", "tracker-first", "greenlet", "gevent-threads"])
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--min-switches", type=int, default=0,
                    help="the greenlets go on past --seconds until they have switched this often (a slow machine)")
    args = ap.parse_args()
    tracker = MwTracker(sample_rate=args.rate, wall_rate=args.rate, profile_dir="none", instrument=False)
    if args.mode == "tracker-first":
        from gevent import monkey

        monkey.patch_all()
    import greenlet

    deadline = time.monotonic() + args.seconds
    switches = [0]

    def going() -> bool:
        return time.monotonic() < deadline or switches[0] < args.min_switches

    tracker.snapshot(reset=True)
    if args.mode == "gevent-threads":
        import gc
        import threading

        def burn_b() -> None:
            end = time.thread_time() + args.seconds / 6
            while time.thread_time() < end:
                side_b(2000)

        for i in range(3):
            t = threading.Thread(target=burn_b, name=f"green-{i}")
            t.start()
            t.join()
            del t
        gc.collect()  # their Thread objects go: the OS thread's name and slot must stay
        time.sleep(0.3)  # the sampler's drains forget what those objects named
        with tracker.labels(side="a"):
            end = time.thread_time() + args.seconds / 2
            while time.thread_time() < end:
                side_a(2000)
    elif args.mode == "greenlet":
        peers: dict[str, Any] = {}

        def bare(side: str, fn: Any, other: str) -> None:
            with tracker.labels(side=side):
                while going():
                    fn(2000)
                    switches[0] += 1
                    peers[other].switch()

        peers["a"] = greenlet.greenlet(lambda: bare("a", side_a, "b"))
        peers["b"] = greenlet.greenlet(lambda: bare("b", side_b, "a"))
        peers["a"].switch()
    else:
        import gevent

        def cooperative(side: str, fn: Any) -> None:
            with tracker.labels(side=side):
                while going():
                    fn(2000)
                    switches[0] += 1
                    time.sleep(0)  # gevent's sleep once patched: the other greenlet runs

        gevent.joinall([gevent.spawn(cooperative, "a", side_a), gevent.spawn(cooperative, "b", side_b)])
    profile = tracker.snapshot()
    tracker.stop()
    summary: dict[str, Any] = summarize(profile)
    json.dump({"switches": switches[0], "leaf_sides": summary.get("leaf_sides", {}),
               "leaf_sides_wall": summary.get("leaf_sides_wall", {}), "threads": sorted(summary["threads"])},
              sys.stdout)


if __name__ == "__main__":
    main()
