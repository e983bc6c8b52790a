"""The OTLP exporter (MW_PROFILING_EXPORTER=otlp): what arrives, decoded with the official
opentelemetry-proto classes, against the local store's pprof of the same windows; the uploader's
guarantees under a failing collector; the converter on span links and on hostile input; the
settings.

The collector is a recording HTTP server on 127.0.0.1 (tests/support/fake_backend.py).
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from middleware import __version__
from middleware.pprof import ProfileError, encode_pprof, parse_pprof
from middleware.profile import Frame, Profile
from middleware.upload_config import resolve_upload_config
from support.fake_backend import FakeBackend, Recorded, Response
from support.otlp import sample_stack
from support.profiles import build, sample
from support.upload_native import (  # noqa: F401 - no_uploader_left is an autouse fixture
    assert_accounting,
    messages,
    native,
    no_uploader_left,
    payload,
    start,
    stats,
    wait_until,
)

pytestmark = pytest.mark.asan

from middleware import _upload  # noqa: E402 - after the native module is known to import

OTLP_PATH = "/v1development/profiles"
Key = tuple[tuple[Frame, ...], tuple[tuple[str, str], ...]]


# ---------------------------------------------------------------- decoding what arrives


def decode(body: bytes, gzipped: bool = False) -> ExportProfilesServiceRequest:
    return ExportProfilesServiceRequest.FromString(gzip.decompress(body) if gzipped else body)


def decode_recorded(req: Recorded) -> ExportProfilesServiceRequest:
    return decode(req.body, req.headers.get("content-encoding") == "gzip")


def resource_of(msg: ExportProfilesServiceRequest) -> dict[str, Any]:
    [rp] = msg.resource_profiles
    out: dict[str, Any] = {}
    for kv in rp.resource.attributes:
        out[kv.key] = kv.value.string_value if kv.value.HasField("string_value") else kv.value.int_value
    return out


def otlp_view(msg: ExportProfilesServiceRequest) -> tuple[int, list[tuple[str, str]], dict[Key, list[int]]]:
    """(time_unix_nano, sample types, (stack root first, labels) -> one value per type) of a
    request holding one resource's profiles of one window; a link reads as a span_id label plus
    a trace_id label."""
    d = msg.dictionary
    st = d.string_table
    for table in (d.mapping_table, d.location_table, d.function_table, d.link_table, d.attribute_table,
                  d.stack_table):
        assert table[0] == type(table[0])(), "entry 0 of every table is the zero value"
    assert st[0] == ""
    [rp] = msg.resource_profiles
    [sp] = rp.scope_profiles
    assert (sp.scope.name, sp.scope.version) == ("middleware", __version__)
    types = [(st[p.sample_type.type_strindex], st[p.sample_type.unit_strindex]) for p in sp.profiles]
    [t0] = {p.time_unix_nano for p in sp.profiles}
    agg: dict[Key, list[int]] = {}
    for ti, p in enumerate(sp.profiles):
        for s in p.samples:
            labels = [(st[d.attribute_table[a].key_strindex], d.attribute_table[a].value.string_value)
                      for a in s.attribute_indices]
            if s.link_index:
                link = d.link_table[s.link_index]
                labels += [("span_id", link.span_id.hex()), ("trace_id", link.trace_id.hex())]
            assert len(s.values) == 1 and s.values[0] != 0
            key = (sample_stack(d, s), tuple(sorted(labels)))
            agg.setdefault(key, [0] * len(types))[ti] += s.values[0]
    return t0, types, agg


def pprof_view(prof: Profile) -> dict[Key, list[int]]:
    """The same view of a pprof (samples with every value 0 are not samples of any OTLP Profile)."""
    agg: dict[Key, list[int]] = {}
    for s in prof.samples:
        if not any(s.values):
            continue
        cur = agg.setdefault((s.stack, s.labels), [0] * len(prof.sample_types))
        for i, v in enumerate(s.values):
            cur[i] += v
    return agg


# ---------------------------------------------------------------- a real app exporting OTLP

APP = r"""
import json, os, sys, threading, time
from middleware import MwTracker

def otlp_burn_alpha(seconds):
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        x += sum(i * i for i in range(200))
    return x

def otlp_burn_beta(seconds):
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        x += sum(i * i for i in range(200))
    return x

t = MwTracker(service_name="otlp-app", sample_rate=200, upload_interval=0.3, profile_dir=sys.argv[1],
              instrument=False)
spent = {}
c0 = time.thread_time()
with t.labels(endpoint="/alpha"):
    otlp_burn_alpha(0.8)
c1 = time.thread_time()
with t.labels(endpoint="/beta"):
    otlp_burn_beta(0.4)
c2 = time.thread_time()
t.stop()
st = t.stats()
print(json.dumps({"pid": os.getpid(), "alpha_ns": int((c1 - c0) * 1e9), "beta_ns": int((c2 - c1) * 1e9),
                  **{k: v for k, v in st.items() if k.startswith("upload_")}}), flush=True)
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MW_", "OTEL_"))}
    env.update(extra)
    return env


def run_app(tmp: Path, env: dict[str, str]) -> tuple[dict[str, Any], str]:
    store = tmp / "store"
    proc = subprocess.run([sys.executable, "-c", APP, str(store)], env=env, cwd=tmp, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture
def collector() -> Iterator[FakeBackend]:
    with FakeBackend() as b:
        yield b


@pytest.mark.parametrize("variant", ["base-endpoint", "full-endpoint-gzip"])
def test_an_app_exports_every_window_as_otlp_equal_to_its_local_store(collector, tmp_path, variant):
    # GIVEN an app burning known CPU in two functions under two endpoint labels, exporting OTLP
    # to the collector (the base endpoint + /v1development/profiles, or the profiles endpoint as
    # is with gzip), with resource attributes and headers, and keeping its local store
    env = clean_env(
        MW_PROFILING_EXPORTER="otlp",
        MW_CUSTOM_RESOURCE_ATTRIBUTES="team=prof%2Cile",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test,service.name=ignored,team=other",
        OTEL_EXPORTER_OTLP_HEADERS="x-generic=1",
        OTEL_EXPORTER_OTLP_PROFILES_HEADERS="x-api-key=s3cr%3Dt, x-team=profiling",
    )
    if variant == "base-endpoint":
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector.url + "/")
        path = OTLP_PATH
    else:
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_EXPORTER_OTLP_PROFILES_COMPRESSION="gzip",
                   OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT=collector.url + "/custom/profiles/")
        path = "/custom/profiles/"
    # WHEN it runs and stops
    st, err = run_app(tmp_path, env)
    assert "middleware:" not in err, err

    # THEN every window the store holds arrived once, as one OTLP request
    reqs = collector.ingests()
    assert reqs and all(r.path == path for r in reqs), [r.path for r in reqs]
    assert st["upload_uploaded"] == st["upload_submitted"] == len(reqs) and st["upload_convert_failed"] == 0, st
    for r in reqs:
        assert r.headers["content-type"] == "application/x-protobuf"
        assert r.headers["x-api-key"] == "s3cr=t" and r.headers["x-team"] == "profiling"
        assert "x-generic" not in r.headers  # the profiles' own variable wins
        assert r.headers.get("content-encoding") == ("gzip" if variant.endswith("gzip") else None)
    stored = [parse_pprof(p.read_bytes()) for p in sorted((tmp_path / "store").glob("otlp-app-*.pb.gz"))]
    assert len(stored) == len(reqs) >= 3
    by_window = {}
    for r in reqs:
        msg = decode_recorded(r)
        assert resource_of(msg) == {
            "service.name": "otlp-app", "process.pid": st["pid"], "telemetry.sdk.name": "middleware",
            "telemetry.sdk.language": "python", "telemetry.sdk.version": __version__,
            "deployment.environment": "test", "team": "prof,ile",
        }
        t0, types, agg = otlp_view(msg)
        by_window[(t0, tuple(types))] = agg
    # and each equals the stored pprof of the same window: sample types in the pprof's order,
    # every (stack, labels) with the same value of every type
    for prof in stored:
        agg = by_window.pop((prof.time_nanos, tuple(prof.sample_types)))
        assert agg == pprof_view(prof)
    assert not by_window

    # and the known work is there: each burner's CPU under its own label, close to its thread time
    cpu = {"otlp_burn_alpha": 0, "otlp_burn_beta": 0}
    for prof in stored:
        if ("cpu", "nanoseconds") not in prof.sample_types:
            continue
        ci = prof.sample_types.index(("cpu", "nanoseconds"))
        for s in prof.samples:
            names = [f.function for f in s.stack]
            for fn, label in (("otlp_burn_alpha", "/alpha"), ("otlp_burn_beta", "/beta")):
                if fn in names:
                    assert ("endpoint", label) in s.labels, s
                    cpu[fn] += s.values[ci]
    assert abs(cpu["otlp_burn_alpha"] - st["alpha_ns"]) <= 0.2 * st["alpha_ns"], (cpu, st)
    assert abs(cpu["otlp_burn_beta"] - st["beta_ns"]) <= 0.2 * st["beta_ns"], (cpu, st)


# ---------------------------------------------------------------- the uploader's guarantees


def otlp_start(url: str, **overrides: Any) -> None:
    start(url, exporter="otlp", sdk_version=__version__, **overrides)


def work_name(req: Recorded) -> str:
    _, _, agg = otlp_view(decode_recorded(req))
    [names] = {s[-1].function for s, _ in agg}
    return names


def test_500_and_429_are_retried_retry_after_honoured_then_delivered_in_order(collector):
    # GIVEN a collector answering 500, then 429 with Retry-After: 1, then 200
    collector.script(Response(status=500, body=b"boom"),
                     Response(status=429, body=b"slow", headers=(("Retry-After", "1"),)))
    otlp_start(collector.url + OTLP_PATH, backoff_max_s=5.0)
    # WHEN three windows are submitted
    for i in range(3):
        assert native.upload_submit(payload(i), 100 + i, 110 + i)
    assert native.upload_flush(10.0) == 0
    native.upload_stop(1.0)
    # THEN the first profile was tried three times, the retry after the 429 waited the second
    reqs = collector.ingests()
    assert [r.answered for r in reqs] == ["500", "429", "200", "200", "200"]
    assert reqs[3].t - reqs[2].t < 1.0 and reqs[2].t - reqs[1].t >= 0.95
    # and the retries carried the same request; every profile arrived once, in order
    assert reqs[0].body == reqs[1].body == reqs[2].body
    assert [work_name(r) for r in reqs[2:]] == ["work_0", "work_1", "work_2"]
    s = stats()
    assert (s["uploaded"], s["retried"], s["failed_attempts"], s["convert_failed"]) == (3, 2, 2, 0)
    assert_accounting(s)
    msgs = messages()
    assert [lvl for lvl, _ in msgs] == [logging.WARNING, logging.INFO], msgs


def test_an_unreachable_collector_bounds_the_queue_and_submits_never_wait(collector):
    # GIVEN a collector that refuses connections and a queue of 3
    collector.refuse()
    otlp_start(collector.url + OTLP_PATH, queue_max=3)
    # WHEN ten windows are submitted
    worst = 0.0
    for i in range(10):
        t = time.perf_counter()
        assert native.upload_submit(payload(i), 100 + i, 110 + i)
        worst = max(worst, time.perf_counter() - t)
    # THEN no submit waited for the network, at most 3 profiles are held, the oldest dropped
    assert worst < 0.05, worst
    assert wait_until(lambda: stats()["failed_attempts"] >= 2)
    s = stats()
    assert s["queued"] == 3 and s["queue_high"] == 3 and s["dropped_queue_full"] == 7, s
    # and once it answers, the three it held arrive in order: the two newest after the oldest it
    # kept, the third newest or, when the last submits found a retry of an older one on the wire (an
    # attempt in progress is never cut: the next oldest goes instead), that one
    collector.healthy()
    assert native.upload_flush(10.0) == 0
    native.upload_stop(1.0)
    delivered = [work_name(r) for r in collector.ingests() if r.answered == "200"]
    assert delivered[1:] == ["work_8", "work_9"] and delivered[0] in [f"work_{i}" for i in range(8)], delivered
    assert_accounting(stats())


def test_a_rejection_is_dropped_once_with_a_hint_naming_the_otlp_settings(collector):
    collector.status(404, body=b"no such route")
    otlp_start(collector.url + "/wrong")
    for i in range(3):
        native.upload_submit(payload(i), 100 + i, 110 + i)
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    s = stats()
    assert len(collector.ingests()) == 3 and s["dropped_rejected"] == 3 and s["retried"] == 0, s
    [(lvl, text)] = messages()
    assert lvl == logging.ERROR and "HTTP 404" in text and "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT" in text, text


def test_a_pprof_that_cannot_be_converted_is_dropped_and_counted(collector):
    otlp_start(collector.url + OTLP_PATH)
    native.upload_submit(b"\x1f\x8b not really gzip", 1, 2)
    native.upload_submit(payload(1), 3, 4)
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    s = stats()
    assert (s["convert_failed"], s["dropped_rejected"], s["uploaded"]) == (1, 1, 1), s
    assert [work_name(r) for r in collector.ingests()] == ["work_1"]
    [(lvl, text)] = messages()
    assert lvl == logging.ERROR and "converted to OTLP" in text and "gzip" in text, text


VISIBLE_APP = r"""
import json, sys, time
from middleware import MwTracker

def otlp_visible_work(seconds):
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += sum(i * i for i in range(300))
    return x

t = MwTracker(service_name="visible", sample_rate=200, upload_interval=0.2, profile_dir=sys.argv[1],
              instrument=False)
otlp_visible_work(1.5)
t.stop()
st = t.stats()
print(json.dumps({k: v for k, v in st.items() if k.startswith(("upload_", "export", "files"))}), flush=True)
"""

LINE = re.compile(r"^middleware: .*$", re.M)


def run_visible(tmp: Path, env: dict[str, str]) -> tuple[dict[str, Any], list[str], str]:
    proc = subprocess.run([sys.executable, "-c", VISIBLE_APP, str(tmp / "store")], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), LINE.findall(proc.stderr), proc.stderr


def test_an_unreachable_collector_is_one_line_per_kind_and_windows_keep_being_stored(collector, tmp_path):
    # GIVEN an app exporting OTLP every 0.2 s to a port that refuses connections, room for 2
    collector.refuse()
    st, lines, err = run_visible(tmp_path, clean_env(
        MW_PROFILING_EXPORTER="otlp", OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, MW_PROFILING_UPLOAD_QUEUE="2",
        OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer%20tok-SECRET"))
    # THEN several attempts failed and profiles were dropped behind two lines: the failure
    # (kept, retried) and the full queue; no secret is shown
    assert st["upload_failed_attempts"] >= 2 and st["upload_dropped_queue_full"] >= 2, st
    assert st["upload_uploaded"] == 0 and st["export_uploads_submitted"] >= 5, st
    assert len(lines) == 2, err
    [unreachable] = [ln for ln in lines if "failed (" in ln]
    assert collector.url + OTLP_PATH in unreachable and "kept" in unreachable and "retried" in unreachable
    [full] = [ln for ln in lines if ln != unreachable]
    assert "full" in full and "dropped" in full
    assert "tok-SECRET" not in err
    # and the exporter went on writing every window to the local store meanwhile
    files = list((tmp_path / "store").glob("visible-*.pb.gz"))
    assert len(files) >= st["export_files_written"] >= 5, (st, files)


def test_a_bad_exporter_value_is_one_line_and_the_default_is_used(collector, tmp_path):
    # GIVEN MW_PROFILING_EXPORTER with a value that is no exporter, and an OTLP endpoint
    st, lines, err = run_visible(tmp_path, clean_env(
        MW_PROFILING_EXPORTER="kafka", OTEL_EXPORTER_OTLP_ENDPOINT=collector.url))
    # THEN one line names the variable, the value and the choices; the default (pyroscope, with
    # no server URL: the local store only) is used and nothing goes to the OTLP endpoint
    assert len(lines) == 1, err
    assert "MW_PROFILING_EXPORTER" in lines[0] and "kafka" in lines[0] and "pyroscope or otlp" in lines[0]
    assert not collector.requests and st["upload_submitted"] == 0, st
    assert len(list((tmp_path / "store").glob("visible-*.pb.gz"))) >= 3


# ---------------------------------------------------------------- the converter


SPAN_A, TRACE_A = "00f067aa0ba902b7", "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_B, TRACE_B = "b7ad6b7169203331", "0af7651916cd43dd8448eb211c80319c"
SPAN_UNKNOWN = "1111111111111111"


def test_span_labels_with_a_known_trace_become_links():
    # GIVEN a window whose samples carry span ids, two of them with traces in mw:spans comments
    prof = build([
        sample("main;handle;calc1", 30_000_000, labels={"span_id": SPAN_A, "span_name": "GET /a", "pid": "77"}),
        sample("main;handle;calc2", 20_000_000, labels={"span_id": SPAN_B, "span_name": "GET /b", "pid": "77"}),
        sample("main;handle;calc2", 10_000_000, labels={"span_id": SPAN_A, "span_name": "GET /a", "pid": "77"}),
        sample("main;idle", 5_000_000, labels={"span_id": SPAN_UNKNOWN, "pid": "77"}),
        sample("main;idle", 0, 40_000_000, labels={"pid": "77"}),
    ])
    prof.span_traces = {SPAN_A: TRACE_A, SPAN_B: TRACE_B}
    data = encode_pprof(prof)
    assert b"mw:spans" in gzip.decompress(data)
    # WHEN it is converted
    msg = decode(_upload.otlp_from_pprof(data, "svc", __version__, (), 5))
    # THEN the known spans are links (trace 16 bytes, span 8 bytes), not attributes; the
    # unknown one stays a span_id attribute; totals and everything else are the pprof's
    _, types, agg = otlp_view(msg)
    assert types == prof.sample_types
    expected = pprof_view(prof)
    want = {}
    for (stack, labels), v in expected.items():
        span = dict(labels).get("span_id")
        if span in prof.span_traces:
            labels = tuple(sorted(labels + (("trace_id", prof.span_traces[span]),)))
        want[(stack, labels)] = v
    assert agg == want
    d = msg.dictionary
    assert len(d.link_table) == 3  # the zero link + one per known span, shared by its samples
    assert {(ln.trace_id.hex(), ln.span_id.hex()) for ln in d.link_table[1:]} == {(TRACE_A, SPAN_A), (TRACE_B, SPAN_B)}
    assert all(len(ln.trace_id) == 16 and len(ln.span_id) == 8 for ln in d.link_table[1:])
    keys = {d.string_table[a.key_strindex] for a in d.attribute_table[1:]}
    assert keys == {"span_id", "span_name", "pid"}  # span_id only for the unknown span
    assert resource_of(msg)["process.pid"] == 77  # the samples' pid label


def test_a_malformed_spans_comment_links_nothing():
    prof = build([sample("main;calc1", 10_000_000, labels={"span_id": SPAN_A})])
    prof.comments = ['mw:spans {"' + SPAN_A + '":"not-a-trace"}']
    msg = decode(_upload.otlp_from_pprof(encode_pprof(prof), "svc", __version__))
    _, _, agg = otlp_view(msg)
    [(_, labels)] = agg
    assert labels == (("span_id", SPAN_A),) and len(msg.dictionary.link_table) == 1


def test_plain_and_gzipped_pprof_and_gzip_output_convert_the_same():
    data = encode_pprof(build([("main;handle;calc3", 70_000_000, 90_000_000, {"endpoint": "/x"})]))
    plain = _upload.otlp_from_pprof(gzip.decompress(data), "svc", "1", (("k", "v"),), 9)
    assert _upload.otlp_from_pprof(data, "svc", "1", (("k", "v"),), 9) == plain
    assert gzip.decompress(_upload.otlp_from_pprof(data, "svc", "1", (("k", "v"),), 9, True)) == plain


def hostile_pprofs() -> Iterator[tuple[str, bytes]]:
    from middleware._proto import profile_pb2

    good = gzip.decompress(encode_pprof(build([("main;handle;calc1", 10_000_000, 20_000_000, {"a": "b"})])))
    yield "empty gzip member", gzip.compress(b"")
    yield "truncated gzip", gzip.compress(good)[:40]
    yield "corrupt gzip", b"\x1f\x8b\x08\x00" + bytes(60)
    yield "not protobuf", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"
    yield "truncated pprof", good[: len(good) // 2]

    def variant(edit: Any) -> bytes:
        m = profile_pb2.Profile.FromString(good)
        edit(m)
        return m.SerializeToString()

    yield "string index past the table", variant(lambda m: setattr(m.function[0], "name", 10**9))
    yield "negative string index", variant(lambda m: setattr(m.sample[0].label[0], "key", -5))
    yield "missing function", variant(lambda m: setattr(m.location[0].line[0], "function_id", 2**63))
    yield "missing location", variant(lambda m: m.sample[0].location_id.append(2**64 - 1))
    yield "repeated location id", variant(lambda m: setattr(m.location[1], "id", m.location[0].id))
    yield "zero function id", variant(lambda m: setattr(m.function[0], "id", 0))
    yield "values per type", variant(lambda m: m.sample[0].value.append(3))
    yield "no sample type", variant(lambda m: m.ClearField("sample_type"))
    yield "missing mapping", variant(lambda m: setattr(m.location[0], "mapping_id", 999))
    yield "comment past the table", variant(lambda m: m.comment.append(10**6))
    yield "period type past the table", variant(lambda m: setattr(m.period_type, "unit", 10**6))
    rng = random.Random(7)
    for i in range(200):
        b = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        yield f"random bytes flipped {i}", bytes(b)


def test_hostile_pprofs_get_a_clear_error_never_a_crash():
    # GIVEN truncated, corrupt and inconsistent pprofs (indices out of range, missing ids, random
    # bytes flipped), WHEN converted, THEN each is either a valid OTLP request whose totals are
    # those of the pprof as middleware.pprof reads it, or a ValueError saying why
    failed = 0
    for what, data in hostile_pprofs():
        try:
            out = _upload.otlp_from_pprof(data, "svc", __version__)
        except ValueError as exc:
            assert str(exc).startswith("otlp_from_pprof: ") and len(str(exc)) > 20, (what, exc)
            failed += 1
            continue
        msg = decode(out)
        try:
            prof = parse_pprof(data)
        except ProfileError:  # it checks parts the conversion does not read (unused functions)
            continue
        _, types, agg = otlp_view(msg)
        assert types == prof.sample_types, what
        for i in range(len(types)):
            assert sum(v[i] for v in agg.values()) == sum(s.values[i] for s in prof.samples), what
    assert failed >= 16


def test_a_pprof_inflating_past_the_limit_is_refused():
    bomb = gzip.compress(bytes(80 << 20), compresslevel=1)  # 80 MiB of zeros, ~0.3 MiB gzipped
    with pytest.raises(ValueError, match="larger than the limit"):
        _upload.otlp_from_pprof(bomb, "svc")


def test_a_large_window_converts_quickly_with_exact_totals():
    # 10,000 distinct stacks of 30 frames, 2,000 label sets
    rng = random.Random(3)
    samples = []
    for i in range(10_000):
        frames = ";".join(f"fn{rng.randrange(500)}@mod{rng.randrange(40)}.py:{rng.randrange(1, 400)}"
                          for _ in range(30))
        samples.append(sample(frames, 10_000_000 * rng.randint(1, 5), labels={"endpoint": f"/e{i % 2000}"}))
    prof = build(samples)
    data = encode_pprof(prof)
    t = time.process_time()
    out = _upload.otlp_from_pprof(data, "svc", __version__)
    cpu = time.process_time() - t
    _, _, agg = otlp_view(decode(out))
    assert agg == pprof_view(prof)
    # the uploader thread's work per window (~0.4 s here; the sanitizers (make asan) slow it 4-5x)
    assert cpu < (4.0 if "ASAN_OPTIONS" in os.environ else 1.0), cpu


# ---------------------------------------------------------------- settings


def test_otlp_settings_resolve_as_the_otel_variables_say(caplog):
    base = {"MW_PROFILING_EXPORTER": "otlp", "MW_SERVICE_NAME": "svc", "MW_API_KEY": "k",
            "MW_PROFILING_SERVER_URL": "http://pyroscope.example"}
    cfg = resolve_upload_config(env=base)
    assert cfg is not None and cfg.exporter == "otlp"
    assert cfg.server_url == "http://localhost:4318/v1development/profiles"  # the default endpoint
    assert cfg.api_key is None and cfg.tenant_id is None and not cfg.use_push_api  # Pyroscope's settings unused
    assert (cfg.otlp_headers, cfg.otlp_gzip, cfg.sdk_version) == (None, False, __version__)
    cfg = resolve_upload_config(env={**base, "OTEL_EXPORTER_OTLP_ENDPOINT": "https://c.example:4318/otlp/",
                                     "OTEL_EXPORTER_OTLP_COMPRESSION": "GZIP",
                                     "OTEL_EXPORTER_OTLP_HEADERS": "a=1,b=x%20y%2Cz ,, c = d=e "})
    assert cfg is not None and cfg.server_url == "https://c.example:4318/otlp/v1development/profiles"
    assert cfg.otlp_gzip and cfg.otlp_headers == (("a", "1"), ("b", "x y,z"), ("c", "d=e"))
    assert "a=1" not in repr(cfg)  # headers may carry keys: never shown
    cfg = resolve_upload_config(env={**base, "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT": "http://p.example/x/",
                                     "OTEL_EXPORTER_OTLP_ENDPOINT": "http://ignored.example",
                                     "OTEL_EXPORTER_OTLP_PROFILES_COMPRESSION": "none",
                                     "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
                                     "OTEL_RESOURCE_ATTRIBUTES": "a=1,service.name=no,b=%E2%9C%93",
                                     "MW_CUSTOM_RESOURCE_ATTRIBUTES": "b=2,deployment.environment=prod"})
    assert cfg is not None and cfg.server_url == "http://p.example/x/" and not cfg.otlp_gzip
    assert cfg.resource_attributes == (("a", "1"), ("b", "2"), ("deployment.environment", "prod"))
    # bad values: one warning each, naming the variable (never a header's value), default used
    with caplog.at_level(logging.WARNING, logger="middleware"):
        cfg = resolve_upload_config(env={**base, "OTEL_EXPORTER_OTLP_HEADERS": "secret-token-xyz",
                                         "OTEL_EXPORTER_OTLP_COMPRESSION": "brotli"})
    assert cfg is not None and cfg.otlp_headers is None and not cfg.otlp_gzip
    text = caplog.text
    assert "OTEL_EXPORTER_OTLP_HEADERS" in text and "OTEL_EXPORTER_OTLP_COMPRESSION" in text
    assert "secret-token-xyz" not in text


def test_the_uploader_refuses_an_unknown_exporter_and_bad_headers():
    with pytest.raises(RuntimeError, match="exporter must be pyroscope or otlp"):
        start("http://127.0.0.1:9", exporter="kafka")
    with pytest.raises(RuntimeError, match="header name"):
        start("http://127.0.0.1:9", exporter="otlp", otlp_headers=(("bad name", "v"),))
    with pytest.raises(RuntimeError, match="control characters"):
        start("http://127.0.0.1:9", exporter="otlp", otlp_headers=(("x-a", "v\r\nInjected: 1"),))
    with pytest.raises(TypeError):
        start("http://127.0.0.1:9", exporter="otlp", otlp_headers=("x-a",))
    assert not native.upload_running()


def test_the_native_converter_and_middleware_otlp_make_the_same_request():
    from middleware.otlp import encode_otlp

    # GIVEN a window with labels, span links, an unknown span, several sample types and a zero value
    prof = build([
        sample("main;handle;calc1", 30_000_000, labels={"span_id": SPAN_A, "endpoint": "/a", "pid": "77"}),
        sample("main;handle;calc2@lib.py:7", 20_000_000, 0, labels={"span_id": SPAN_UNKNOWN, "pid": "77"}),
        sample("main;idle", 0, 40_000_000, labels={"pid": "77", "thread_name": "worker"}),
    ])
    prof.span_traces = {SPAN_A: TRACE_A}
    data = encode_pprof(prof)
    # WHEN both converters convert it, THEN the requests say the same: resource, scope, sample
    # types, time window, stacks, attributes, links and values
    native_msg = decode(_upload.otlp_from_pprof(data, "svc", __version__, (("team", "x"),), 5))
    python_msg = decode(encode_otlp(parse_pprof(data), service_name="svc", attributes={"team": "x"}))
    assert resource_of(native_msg) == resource_of(python_msg)
    assert otlp_view(native_msg) == otlp_view(python_msg)
    n, p = native_msg.resource_profiles[0].scope_profiles[0], python_msg.resource_profiles[0].scope_profiles[0]
    assert [(x.period, x.duration_nano) for x in n.profiles] == [(x.period, x.duration_nano) for x in p.profiles]
