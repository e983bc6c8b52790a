"""Does an export pause the application? And what does one export cost the exporter thread?

    .venv/bin/python bench/export_pause.py [--stacks 10000] [--rounds 15] [--depth 16]

Each round fills the sampler's active buffer with N distinct synthetic stacks
(`_native._debug_fill_active`, a test-only method), then either exports it (`export_flush`: rotate,
merge into the cumulative profile, pprof encode, gzip, write to a temporary store) or, in the
baseline arm, sleeps for as long as the export took. Meanwhile an application thread ticks every
100 µs (`time.sleep(0.0001)`) and records the gaps between its ticks. The two arms alternate, so
both see the same machine noise (the ticker and the native threads are pinned to different CPUs, so CPU
contention on a busy machine is not mistaken for a pause). An export that held the GIL or stopped threads would
show up as larger gaps in the export arm; the exporter's own cost is read from its thread CPU clock
(`export_stats()["last_export_cpu_ns"]`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from middleware import _native as n  # noqa: E402


class Ticker(threading.Thread):
    """Sleeps 100 µs at a time and keeps the gaps between wake-ups while `recording` is set."""

    def __init__(self, cpu: int | None) -> None:
        super().__init__(daemon=True)
        self.cpu = cpu
        self.recording = threading.Event()
        self.done = threading.Event()
        self.gaps: list[int] = []

    def run(self) -> None:
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})  # Linux: pins this thread only
        last = time.perf_counter_ns()
        while not self.done.is_set():
            time.sleep(0.0001)
            now = time.perf_counter_ns()
            if self.recording.is_set():
                self.gaps.append(now - last)
            last = now

    def take(self) -> list[int]:
        g, self.gaps = self.gaps, []
        return g


def pct(xs: list[int], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] / 1e3 if xs else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stacks", type=int, default=10_000, help="distinct stacks per window")
    ap.add_argument("--depth", type=int, default=16, help="frames per synthetic stack")
    ap.add_argument("--rounds", type=int, default=15, help="rounds per arm")
    ap.add_argument("--rate", type=int, default=100, help="sampler rate (Hz), running in both arms")
    ap.add_argument("--no-store", action="store_true", help="encode only, write no files")
    ap.add_argument("-v", "--verbose", action="store_true", help="largest gap of every round")
    ap.add_argument("--no-pin", action="store_true",
                    help="do not pin the ticker to CPU 0 and the native threads to CPU 1")
    args = ap.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    if pin:  # the sampler and exporter threads inherit the main thread's affinity
        os.sched_setaffinity(0, {cpus[1]})
    n.start(rate_hz=args.rate, max_stacks=max(32768, 2 * args.stacks))
    with tempfile.TemporaryDirectory(prefix="mw-bench-") as store:
        n.export_start(interval_s=3600.0, service="bench", profile_dir=None if args.no_store else store,
                       store_max_bytes=64 << 20, upload=False)
        ticker = Ticker(cpus[0] if pin else None)
        ticker.start()
        gaps: dict[str, list[int]] = {"baseline": [], "export": []}
        round_max: dict[str, list[int]] = {"baseline": [], "export": []}
        per_export: list[dict[str, int]] = []
        # one warm-up export (allocations, the cumulative buffer's first merge)
        n._debug_fill_active(args.stacks, args.depth)
        n.export_flush(30.0)
        for _ in range(args.rounds):
            for arm in ("export", "baseline"):
                added = n._debug_fill_active(args.stacks, args.depth)
                time.sleep(0.01)
                ticker.take()
                ticker.recording.set()
                t0 = time.perf_counter()
                if arm == "export":
                    if not n.export_flush(30.0):
                        print("export_flush timed out", file=sys.stderr)
                        return 1
                    st = n.export_stats()
                    st["added"] = added
                    per_export.append(st)
                    last_export_s = time.perf_counter() - t0
                else:
                    time.sleep(max(last_export_s, 0.001))
                time.sleep(0.005)  # a little tail on both arms
                ticker.recording.clear()
                g = ticker.take()
                gaps[arm] += g
                round_max[arm].append(max(g, default=0))
                if args.verbose:
                    print(f"  round {arm:<8} {len(g):5d} ticks, largest gap {max(g, default=0) / 1e3:8.0f} us",
                          file=sys.stderr)
        ticker.done.set()
        ticker.join()
        n.export_stop(10.0)
    n.stop()

    stacks = statistics.median(s["last_stacks"] for s in per_export)
    cpu = sorted(s["last_export_cpu_ns"] / 1e6 for s in per_export)
    wall = sorted(s["last_export_wall_ns"] / 1e6 for s in per_export)
    print(f"export_pause: {len(per_export)} exports of {stacks:.0f} distinct stacks "
          f"(depth {args.depth}, {per_export[-1]['last_functions']} functions, "
          f"{per_export[-1]['last_locations']} locations), store={'off' if args.no_store else 'tmp dir'}, "
          f"sampler {args.rate} Hz, python {sys.version.split()[0]}")
    print(f"  {f'ticker on CPU {cpus[0]}, sampler+exporter on CPU {cpus[1]}' if pin else 'no pinning'}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  pprof size: {per_export[-1]['last_raw_bytes'] / 1024:.0f} KiB raw, "
          f"{per_export[-1]['last_gz_bytes'] / 1024:.0f} KiB gzipped")
    print(f"  exporter CPU per export (thread CPU clock): median {statistics.median(cpu):.1f} ms, "
          f"max {cpu[-1]:.1f} ms;  wall: median {statistics.median(wall):.1f} ms, max {wall[-1]:.1f} ms")
    print("  app thread ticking every 100 us, gaps between ticks (us):")
    print(f"    {'arm':<9}{'ticks':>8}{'median':>9}{'p99':>9}{'p99.9':>9}{'max':>9}"
          f"{'median of the rounds largest gap':>34}")
    med_max = {}
    for arm in ("baseline", "export"):
        g = gaps[arm]
        med_max[arm] = statistics.median(round_max[arm]) / 1e3
        print(f"    {arm:<9}{len(g):>8}{pct(g, 50):>9.0f}{pct(g, 99):>9.0f}{pct(g, 99.9):>9.0f}"
              f"{max(g) / 1e3 if g else 0:>9.0f}{med_max[arm]:>34.0f}")
    # An export that stopped the app would put a gap of about its duration into EVERY export
    # round, so the median of the per-round maxima is the robust figure on a noisy machine.
    print(f"  extra pause per export (median of per-round largest gaps, export - baseline): "
          f"{med_max['export'] - med_max['baseline']:+.0f} us "
          f"(an export holding the GIL would add ~{statistics.median(wall) * 1e3:.0f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
