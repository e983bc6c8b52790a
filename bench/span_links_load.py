"""What linking samples to OpenTelemetry spans costs the demo under load: both sides at once.

``bench/demo_throughput.py`` runs the profiled and unprofiled servers one after the other; on a
shared VM the machine's speed drifts between two runs by more than the 1% to resolve. Here the two
sides run **at the same time**: two gunicorns serving the demo traced by OpenTelemetry (the SDK, a
batch span processor whose exporter drops the spans, ``opentelemetry-instrumentation-flask``), the
tracker on in both with its defaults, ``MW_PROFILING_SPAN_LINKS=true`` in one and ``false`` in the
other, each loaded by its own ``wrk`` for the same seconds. Whatever the machine does in a window it
does to both. Each round starts both servers afresh (so neither keeps a favourable placement),
warms them up, measures one window; the figures are medians over the rounds of the per-round
ratios:

- throughput: requests/s with span links over requests/s without;
- CPU per request: the workers' CPU (``/proc``: user + system of every thread) per request, with
  over without.

``--control`` runs span links off on both sides: the spread of its ratios is the bench's own noise.

    python bench/span_links_load.py [--rounds 15] [--seconds 5] [--path /calculate1/100] [--control]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_throughput import (  # noqa: E402
    DEMO,
    OTEL_WSGI,
    ROOT,
    _children,
    _cpu_seconds,
    _free_port,
    _stop,
    _wait_ready,
    _wrk,
)


class Server:
    """One gunicorn serving the traced demo with the tracker on and the given span-link setting."""

    def __init__(self, span_links: bool, path: str, workers: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}{path}"
        self.store = tempfile.mkdtemp(prefix="mw-bench-store-")
        self.shim = tempfile.mkdtemp(prefix="mw-bench-otel-")
        Path(self.shim, "otel_wsgi.py").write_text(OTEL_WSGI)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MW_", "OTEL_"))}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.shim, str(DEMO), str(ROOT), env.get("PYTHONPATH")]))
        env["MW_SERVICE_NAME"] = "span-links-load"
        env["MW_PROFILE_DIR"] = self.store
        env["MW_APM_COLLECT_PROFILING"] = "true"
        env["MW_PROFILING_SPAN_LINKS"] = "true" if span_links else "false"
        cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{self.port}",
               "--workers", str(workers), "--log-level", "warning", "otel_wsgi:app"]
        self.proc = subprocess.Popen(cmd, cwd=DEMO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def ready(self) -> None:
        _wait_ready(self.proc, self.url)
        self.workers = _children(self.proc.pid)

    def close(self) -> None:
        stderr = _stop(self.proc)
        if self.proc.returncode not in (0, None):
            sys.stderr.write(stderr.decode(errors="replace")[-2000:])
        shutil.rmtree(self.store, ignore_errors=True)
        shutil.rmtree(self.shim, ignore_errors=True)


def _both(servers: list[Server], seconds: float, connections: int) -> list[tuple[float, float]]:
    """wrk on every server at once; per server (requests/s, workers' CPU us per request)."""
    rates = [0.0] * len(servers)
    errors: list[BaseException] = []

    def load(i: int) -> None:
        try:
            rates[i] = _wrk(servers[i].url, seconds, connections)
        except BaseException as e:  # reported after the join
            errors.append(e)

    cpu0 = [_cpu_seconds(s.workers)[0] for s in servers]
    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu1 = [_cpu_seconds(s.workers)[0] for s in servers]
    if errors:
        raise RuntimeError(f"load failed: {errors[0]}")
    return [(r, 1e6 * (c1 - c0) / (r * seconds) if r else 0.0) for r, c0, c1 in zip(rates, cpu0, cpu1, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per round")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=2, help="wrk connections per server")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers per server")
    parser.add_argument("--path", default="/calculate1/100")
    parser.add_argument("--control", action="store_true", help="span links off on both sides (the noise)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is needed (apt-get install wrk)", file=sys.stderr)
        return 2
    on_label = "off (control)" if args.control else "on"
    thr, cpu = [], []
    for r in range(args.rounds):
        # which side starts first alternates
        sides = [Server(not args.control, args.path, args.workers), Server(False, args.path, args.workers)]
        if r % 2:
            sides.reverse()
        try:
            for s in sides:
                s.ready()
            if args.warmup > 0:
                _both(sides, args.warmup, args.connections)
            got = _both(sides, args.seconds, args.connections)
        finally:
            for s in sides:
                s.close()
        if r % 2:
            got.reverse()
        (rate_on, cpu_on), (rate_off, cpu_off) = got
        thr.append(rate_on / rate_off)
        cpu.append(cpu_on / cpu_off)
        print(f"round {r + 1}/{args.rounds}: span links {on_label} {rate_on:.0f} req/s {cpu_on:.0f} us CPU/req, "
              f"off {rate_off:.0f} req/s {cpu_off:.0f} us CPU/req", flush=True)
        time.sleep(0.2)
    q = statistics.quantiles
    print(f"span links {on_label} vs off, GET {args.path}, both sides at once, "
          f"{args.rounds} rounds of {args.seconds:g} s")
    print(f"throughput ratio: median {statistics.median(thr):.4f} (quartiles {q(thr)[0]:.4f}..{q(thr)[2]:.4f}, "
          f"min..max {min(thr):.4f}..{max(thr):.4f})")
    print(f"CPU per request ratio: median {statistics.median(cpu):.4f} (quartiles {q(cpu)[0]:.4f}..{q(cpu)[2]:.4f}, "
          f"min..max {min(cpu):.4f}..{max(cpu):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
