"""What linking samples to OpenTelemetry spans costs a traced request, measured two ways.

The Flask demo (``demo_flask``), traced by the OpenTelemetry SDK and
``opentelemetry-instrumentation-flask`` (a batch span processor whose exporter drops the spans),
with the tracker running, is called in-process through its WSGI entry (no server, no client:
what is measured is the request itself). Batches of requests alternate between the span hooks
in place (``opentelemetry.context.attach``/``detach`` are the tracker's) and the original
functions, many times, in one process:

- **in the hooks**: the wall time spent inside ``attach``/``detach`` per request (the only code of
  ours a traced request runs), read with ``perf_counter_ns`` around each call on both sides, so
  the timing's own cost cancels out. Precise to a fraction of a microsecond.
- **whole request**: the thread's CPU per request, on and off (the figure the throughput target
  is about; on a shared VM its noise is several microseconds per request).

Prints the medians over the pairs, each as a share of the request's CPU.

    python bench/span_links.py [--path /calculate1/100] [--pairs 100] [--batch 20]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _app(store: str) -> Any:
    os.environ["MW_PROFILE_DIR"] = store
    os.environ["MW_SERVICE_NAME"] = "span-links-bench"
    sys.path.insert(0, str(ROOT / "demo_flask"))
    sys.path.insert(0, str(ROOT))
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class DropSpans(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropSpans()))
    trace.set_tracer_provider(provider)
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from wsgi import app  # the demo: its app module starts the tracker

    FlaskInstrumentor().instrument_app(app)
    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default="/calculate1/100")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--batch", type=int, default=20, help="requests per batch")
    args = parser.parse_args()

    app = _app(tempfile.mkdtemp(prefix="mw-bench-spans-"))
    import opentelemetry.context as ctx

    hooks = (ctx.attach, ctx.detach)
    if not getattr(hooks[0], "_mw_wrapped", False):
        print("the span hooks are not installed (MW_PROFILING_SPAN_LINKS=false?)", file=sys.stderr)
        return 2
    originals = (hooks[0].__wrapped__, hooks[1].__wrapped__)
    inside = [0]

    def timed(fn: Any) -> Any:
        def call(arg: Any) -> Any:
            t = time.perf_counter_ns()
            try:
                return fn(arg)
            finally:
                inside[0] += time.perf_counter_ns() - t
        return call

    sides = {"on": (timed(hooks[0]), timed(hooks[1])), "off": (timed(originals[0]), timed(originals[1]))}
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": args.path, "SERVER_NAME": "bench", "SERVER_PORT": "80",
               "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr, "SERVER_PROTOCOL": "HTTP/1.1",
               "QUERY_STRING": "", "HTTP_HOST": "bench"}
    status: list[str] = []

    def start_response(s: str, headers: Any, exc_info: Any = None) -> None:
        status.append(s)

    def batch(side: str) -> tuple[float, float]:
        ctx.attach, ctx.detach = sides[side]
        inside[0] = 0
        t = time.thread_time_ns()
        for _ in range(args.batch):
            env = dict(environ)
            env["wsgi.input"] = io.BytesIO()
            for _chunk in app(env, start_response):
                pass
        cpu = (time.thread_time_ns() - t) / args.batch / 1e3
        return cpu, inside[0] / args.batch / 1e3

    for side in ("on", "off") * 3:  # warm-up
        batch(side)
    got: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    for i in range(args.pairs):
        for side in (("on", "off") if i % 2 else ("off", "on")):
            got[side].append(batch(side))
    ctx.attach, ctx.detach = hooks
    if any(not s.startswith("200") for s in status):
        print(f"requests failed: {sorted(set(status))}", file=sys.stderr)
        return 1
    cpu_off = statistics.median(c for c, _ in got["off"])
    d_inside = statistics.median(a[1] - b[1] for a, b in zip(got["on"], got["off"], strict=True))
    d_cpu = statistics.median(a[0] - b[0] for a, b in zip(got["on"], got["off"], strict=True))
    print(f"span links, GET {args.path} in-process (Flask demo traced by OpenTelemetry), "
          f"{args.pairs} pairs x {args.batch} requests")
    print(f"request CPU without span links: {cpu_off:.1f} us")
    print(f"in attach/detach per request: off {statistics.median(x for _, x in got['off']):.2f} us, "
          f"on {statistics.median(x for _, x in got['on']):.2f} us: span links +{d_inside:.2f} us "
          f"= {100 * d_inside / cpu_off:.2f}% of the request")
    print(f"whole request CPU (paired median difference): {d_cpu:+.1f} us = {100 * d_cpu / cpu_off:+.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
