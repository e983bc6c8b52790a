"""Throughput of the Flask demo under gunicorn, with and without the tracker.

Serves ``demo_flask`` with gunicorn (2 sync workers by default) and measures requests per second
on ``/calculate1/100`` with ``wrk`` (or bench/loadgen.py when wrk is missing). Every round runs
the app once with profiling off (``MW_APM_COLLECT_PROFILING=false``: the two tracker lines stay in
the app but start nothing) and once with it on (default settings, local store in a temp dir),
alternating which goes first so drift on a shared machine hits both sides alike. Each run gets a
fresh gunicorn, a warm-up, then the measured window.

Prints every run, the median requests/s of each side and ``ratio = median(on) / median(off)``
(target >= 0.99), plus the spread of the per-round paired ratios, which says how much of the
difference is noise. It also reports, from /proc, the workers' CPU time per request and the part
of it spent in the profiler's own threads (``mw-sampler``, ``mw-export``): on a shared machine
throughput moves with other load, while these two say what the tracker itself costs. (What the
tracker adds on the request path, the endpoint label, is in the workers' main-thread CPU.)

With ``--vs-setting MW_NAME=VALUE`` the "off" side runs the tracker too, with that setting, and
``--setting MW_NAME=VALUE`` sets the profiled side (``--setting MW_PROFILING_MEMORY=true
--vs-setting MW_PROFILING_MEMORY=false``: the cost of memory profiling alone).

With ``--otel`` both sides serve the demo traced by OpenTelemetry (the SDK, a batch span processor
whose exporter drops the spans, ``opentelemetry-instrumentation-flask``), so that ``--setting
MW_PROFILING_SPAN_LINKS=true --vs-setting MW_PROFILING_SPAN_LINKS=false`` measures what labelling
samples with their request's span costs.

    python bench/demo_throughput.py [--rounds 5] [--seconds 5] [--json] [--otel]
                                    [--setting MW_NAME=VALUE] [--vs-setting MW_NAME=VALUE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo_flask"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import run_load  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("gunicorn did not answer in time")


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def _cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """CPU time (user + system) of ``pids``: (all threads, the profiler's own ``mw-*`` threads)."""
    ticks = mw_ticks = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue
            used = int(fields[11]) + int(fields[12])  # utime, stime
            ticks += used
            if name.startswith("mw-"):
                mw_ticks += used
    hz = os.sysconf("SC_CLK_TCK")
    return ticks / hz, mw_ticks / hz


def _stop(proc: subprocess.Popen[bytes]) -> bytes:
    """SIGTERM, then SIGKILL after 30 s; the process's stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)[1] or b""
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1] or b""


def _wrk(url: str, seconds: float, connections: int) -> float:
    done = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    )
    match = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", done.stdout)
    if match is None:
        raise RuntimeError(f"cannot read wrk output:\n{done.stdout}")
    if errors and int(errors.group(1)):
        raise RuntimeError(f"wrk saw errors:\n{done.stdout}")
    return float(match.group(1))


def _python_load(url: str, seconds: float, connections: int) -> float:
    result = run_load([url], seconds, connections)
    if result.errors:
        raise RuntimeError(f"load generator saw {result.errors} errors: {result.statuses}")
    return result.rate


# The demo traced by OpenTelemetry (--otel): gunicorn serves otel_wsgi:app from a temporary directory.
OTEL_WSGI = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class DropSpans(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(DropSpans()))
trace.set_tracer_provider(provider)

from opentelemetry.instrumentation.flask import FlaskInstrumentor  # noqa: E402
from wsgi import app  # noqa: E402  (the demo: its app module starts the tracker)

FlaskInstrumentor().instrument_app(app)
"""


def one_run(profiled: bool, args: argparse.Namespace, load: str) -> tuple[float, float, float]:
    """Start gunicorn, warm up, measure.

    Returns (requests/s, workers' CPU us per request, of which the profiler's threads).
    Threads that exited during the window (none in a steady run) are not counted.
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}{args.path}"
    store = tempfile.mkdtemp(prefix="mw-bench-store-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MW_", "OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["MW_SERVICE_NAME"] = "demo-bench"
    env["MW_PROFILE_DIR"] = store
    env["MW_APM_COLLECT_PROFILING"] = "true" if profiled or args.vs_setting else "false"
    if not profiled:  # --vs-setting: the tracker runs on both sides, this one with these settings
        env.update(kv.split("=", 1) for kv in args.vs_setting)
    else:
        env.update(kv.split("=", 1) for kv in args.setting)
    if args.rate:
        env["MW_PROFILING_SAMPLE_RATE"] = str(args.rate)
    cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}"]
    cmd += ["--workers", str(args.workers), "--log-level", "warning"]
    shim = tempfile.mkdtemp(prefix="mw-bench-otel-") if args.otel else None
    if shim:
        Path(shim, "otel_wsgi.py").write_text(OTEL_WSGI)
        env["PYTHONPATH"] = os.pathsep.join([shim, str(DEMO), env["PYTHONPATH"]])
        cmd.append("otel_wsgi:app")
    proc = subprocess.Popen(cmd, cwd=DEMO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_ready(proc, url)
        measure = _wrk if load == "wrk" else _python_load
        if args.warmup > 0:
            measure(url, args.warmup, args.connections)
        workers = _children(proc.pid)
        (cpu0, mw0), t0 = _cpu_seconds(workers), time.monotonic()
        rate = measure(url, args.seconds, args.connections)
        cpu1, mw1 = _cpu_seconds(workers)
        requests = rate * (time.monotonic() - t0) if load == "python" else rate * args.seconds
        if not requests:
            return rate, 0.0, 0.0
        return rate, 1e6 * (cpu1 - cpu0) / requests, 1e6 * (mw1 - mw0) / requests
    finally:
        stderr = _stop(proc)
        if proc.returncode not in (0, None):
            sys.stderr.write(stderr.decode(errors="replace")[-2000:])
        wrote = len(os.listdir(store))
        shutil.rmtree(store, ignore_errors=True)
        if shim:
            shutil.rmtree(shim, ignore_errors=True)
        if profiled and wrote == 0:
            sys.stderr.write("warning: the profiled run wrote no profile\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Demo throughput with and without the tracker.")
    parser.add_argument("--rounds", type=int, default=5, help="off/on pairs (default 5)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run (default 1)")
    parser.add_argument("--connections", type=int, default=4, help="concurrent connections (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--path", default="/calculate1/100", help="URL path (default /calculate1/100)")
    parser.add_argument("--rate", type=int, default=0, help="sampling rate in Hz (default: the tracker's)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--setting", action="append", default=[], metavar="MW_NAME=VALUE",
                        help="settings of the profiled side (repeatable)")
    parser.add_argument(
        "--vs-setting", action="append", default=[], metavar="MW_NAME=VALUE",
        help="compare against the tracker with these settings instead of without the tracker "
             "(e.g. MW_PROFILING_MEMORY=false: what memory profiling costs); repeatable",
    )
    parser.add_argument("--otel", action="store_true",
                        help="serve the demo traced by OpenTelemetry (opentelemetry-sdk + its Flask instrumentation)")
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be >= 1 and --seconds > 0")
    load = args.loadgen
    if load == "auto":
        load = "wrk" if shutil.which("wrk") else "python"

    out = sys.stdout
    out.write(
        f"demo throughput: GET {args.path}, gunicorn {args.workers} sync workers, {load}, "
        f"{args.connections} connections, {args.rounds} rounds x {args.seconds:g}s (+{args.warmup:g}s warm-up)\n"
    )
    runs: dict[str, list[float]] = {"off": [], "on": []}
    cpu_us: dict[str, list[float]] = {"off": [], "on": []}
    mw_us: list[float] = []
    paired: list[float] = []
    for r in range(args.rounds):
        order = ("off", "on") if r % 2 == 0 else ("on", "off")
        got = {}
        for mode in order:
            got[mode], per_request, profiler = one_run(mode == "on", args, load)
            runs[mode].append(got[mode])
            cpu_us[mode].append(per_request)
            if mode == "on":
                mw_us.append(profiler)
            out.write(
                f"  round {r + 1} {mode:>3}: {got[mode]:9.1f} req/s   "
                f"workers' CPU {per_request:7.1f} us/request"
                + (f" (profiler threads {profiler:.1f})" if mode == "on" else "")
                + "\n"
            )
            out.flush()
        paired.append(got["on"] / got["off"])
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    ratio = on / off
    cpu_off, cpu_on = statistics.median(cpu_us["off"]), statistics.median(cpu_us["on"])
    out.write(
        f"median req/s: without tracker {off:.1f}, with tracker {on:.1f}\n"
        f"ratio (with / without) = {ratio:.4f}   target >= 0.99: {'met' if ratio >= 0.99 else 'NOT met'}\n"
        f"paired per-round ratios: min {min(paired):.3f}  median {statistics.median(paired):.3f}  "
        f"max {max(paired):.3f}\n"
        f"median workers' CPU per request: without {cpu_off:.1f} us, with {cpu_on:.1f} us "
        f"({100 * (cpu_on / cpu_off - 1):+.1f}%)\n"
        f"median CPU of the profiler's own threads (sampler, exporter): "
        f"{statistics.median(mw_us):.1f} us/request = {100 * statistics.median(mw_us) / cpu_on:.2f}% "
        f"of the workers' CPU\n"
    )
    if args.json:
        out.write(
            json.dumps(
                {
                    "path": args.path,
                    "loadgen": load,
                    "off": runs["off"],
                    "on": runs["on"],
                    "ratio": ratio,
                    "paired": paired,
                    "cpu_us_per_request": cpu_us,
                    "profiler_threads_us_per_request": mw_us,
                }
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
