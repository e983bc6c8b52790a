"""The whole OpenTelemetry path: an app traced by the real SDK exports OTLP profiles to `serve`.

GIVEN a `serve` in-process (free port, temporary data) and an app traced by ``opentelemetry-sdk``
whose requests (root spans, each with a child span) burn known CPU in a function of their kind,
profiled with ``MW_PROFILING_EXPORTER=otlp`` pointed at that serve and keeping its local store,
WHEN it runs and stops,
THEN serve stored every window (one OTLP request each, none refused), its totals per profile
type equal the local store's pprof of the same windows, and each request's span — sent as an
OTLP Link — is found again by span id and by trace id with exactly the CPU the store's samples
of that span hold.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from middleware.pprof import find_profile_files, read_pprof_file
from support.processes import clean_env
from support.serve_http import Api, running_serve

pytest.importorskip("opentelemetry.sdk.trace")

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
CPU = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
WALL = "wall:wall:nanoseconds:wall:nanoseconds"

APP = r'''
import json, os, sys, time
sys.path.insert(0, os.environ["MW_TEST_ROOT"])
sys.path.insert(0, os.path.join(os.environ["MW_TEST_ROOT"], "tests", "targets"))
from middleware import MwTracker
tracker = MwTracker(service_name="otlp-spans", upload_interval=0.4, instrument=True)

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("otlp-serve-test")
from span_workloads import burn


def otlp_req_small(): burn(0.03)
def otlp_req_large(): burn(0.07)


truth = []
for i in range(24):
    with tracer.start_as_current_span("request-%d" % (i % 2)) as root:
        with tracer.start_as_current_span("child"):
            (otlp_req_large if i % 2 else otlp_req_small)()
        sc = root.get_span_context()
        truth.append({"span": format(sc.span_id, "016x"), "trace": format(sc.trace_id, "032x")})
tracker.stop()
st = tracker.stats()
print(json.dumps({"truth": truth, **{k: v for k, v in st.items() if k.startswith("upload_")}}))
'''


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Api]:
    with running_serve(tmp_path / "data", host="127.0.0.1") as app:
        yield Api(app)


def test_an_app_exporting_otlp_to_serve_is_stored_as_its_store_holds_it_with_its_spans(
        serve: Api, tmp_path: Path) -> None:
    store = tmp_path / "store"
    script = tmp_path / "otlp_app.py"
    script.write_text(APP)
    env = clean_env()
    env.update(MW_TEST_ROOT=str(ROOT), MW_PROFILE_DIR=str(store), MW_PROFILING_EXPORTER="otlp",
               OTEL_EXPORTER_OTLP_ENDPOINT=serve.app.url)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0 and "middleware:" not in run.stderr, run.stderr[-3000:]
    doc = json.loads(run.stdout.strip().splitlines()[-1])
    assert doc["upload_uploaded"] == doc["upload_submitted"] >= 3 and serve.app.rejected == 0, doc

    # the store's windows: totals per type, and CPU per span
    totals: Counter[str] = Counter()
    span_cpu: Counter[str] = Counter()
    span_trace: dict[str, str] = {}
    windows = 0
    for f in find_profile_files(store):
        p = read_pprof_file(f)
        if ("cpu", "nanoseconds") not in p.sample_types:
            continue
        windows += 1
        span_trace.update(p.span_traces)
        for name, type_id in (("cpu", CPU), ("wall", WALL)):
            totals[type_id] += p.total(name)
        ci = p.value_index("cpu")
        for s in p.samples:
            if s.label("span_id"):
                span_cpu[s.label("span_id")] += s.values[ci]
    assert windows >= 3 and totals[CPU] > 0

    # serve holds the same totals (the whole range of the run)
    for type_id, want in totals.items():
        tl = serve("/api/timeline", service="otlp-spans", type=type_id, **{"from": 0, "until": 2**33})
        assert tl["total"] == want, (type_id, tl["total"], want)

    # and each request's span, by span id and by its trace, with the CPU its samples hold
    assert span_cpu, "no sample carried a span id"
    truth = {t["span"]: t["trace"] for t in doc["truth"]}
    for span, cpu in span_cpu.items():
        assert span in truth and span_trace.get(span) == truth[span], span
        by_span = serve("/api/spans", span_id=span)["spans"]
        assert len(by_span) == 1 and by_span[0]["trace_id"] == truth[span], by_span
        assert by_span[0]["types"].get(CPU) == cpu, (by_span[0]["types"], cpu)
        by_trace = serve("/api/spans", trace_id=truth[span])["spans"]
        assert [s["span_id"] for s in by_trace] == [span]
