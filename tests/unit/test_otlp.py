"""OTLP profiles: `middleware.otlp` (to and from `ExportProfilesServiceRequest`), `export --format
otlp`, and `serve`'s `POST /v1development/profiles`.

Every request we write is decoded with the OFFICIAL classes of `opentelemetry-proto` (never with
our generated ones) and compared with the pprof it came from: per type totals, stacks, labels,
links, dictionary zero entries, resources. GIVEN a CPU profile of two processes (pids 101 and 202;
spans of known traces, one span id whose trace is unknown, samples with wall time only), a
lock-wait profile and a memory profile, each built from seeded random stacks with known totals.
"""
from __future__ import annotations

import gzip
import http.client
import json
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest as OfficialRequest,
)
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceResponse as OfficialResponse,
)

import middleware
from middleware.otlp import OtlpError, encode_otlp, from_otlp, read_otlp, to_otlp
from middleware.pprof import encode_pprof, parse_pprof
from middleware.profile import Frame, Profile, Sample
from middleware.serve import ServeApp, ServeConfig
from support.otlp import sample_stack
from support.serve_http import api

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_763_719_200 * 1_000_000_000
FUNCS = ["main", "handle", "calc1", "calc2", "calc3", "helper", "fib", "Calc.run"]
SPANS = {  # span id -> trace id
    "00f067aa0ba902b7": "4bf92f3577b34da6a3ce929d0e0e4736",
    "b7ad6b7169203331": "0af7651916cd43dd8448eb211c80319c",
    "53995c3f42cd8ad8": "5b8efff798038103d269b633813fc60c",
}
ORPHAN_SPAN = "1111111111111111"  # a span_id label whose trace the profile does not carry
ENV = {
    "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=staging,team=a%2Cb,service.name=ignored,k8s.pod.name=web-1",
    "MW_CUSTOM_RESOURCE_ATTRIBUTES": "deployment.environment=prod,region=eu",
}


def _stack(rng: random.Random) -> tuple[Frame, ...]:
    depth = rng.randint(1, 6)
    files = ("app.py", "lib/util.py")
    return tuple(Frame(rng.choice(FUNCS), rng.choice(files), rng.randint(1, 4)) for _ in range(depth))


def cpu_profile(seed: int = 7) -> Profile:
    rng = random.Random(seed)
    samples: list[Sample] = []
    for i in range(400):
        pid = ("101", "202")[i % 2]
        labels = {"pid": pid, "thread_name": rng.choice(["MainThread", "worker-1", "worker-2"]),
                  "endpoint": rng.choice(["/a", "/b/<int:n>", "/c"])}
        pick = rng.random()
        if pick < 0.5:
            span = rng.choice(sorted(SPANS))
            labels["span_id"] = span
            labels["span_name"] = f"GET {labels['endpoint']}"
        elif pick < 0.6:
            labels["span_id"] = ORPHAN_SPAN
        n = rng.randint(0, 5)
        wall = rng.randint(1, 9) * 10_000_000
        samples.append(Sample(_stack(rng), (n, n * 10_000_000, wall), tuple(sorted(labels.items()))))
    p = Profile(samples=samples, time_nanos=T0, duration_nanos=10_000_000_000,
                span_traces=dict(SPANS)).aggregated()
    p.span_traces = dict(SPANS)  # (aggregated keeps them; said again for the reader)
    return p


def lock_profile() -> Profile:
    rng = random.Random(11)
    samples = [
        Sample(_stack(rng), (c, c * 2_500_000), (("lock", f"app.py:{c}"), ("pid", "101"), ("thread_name", "w")))
        for c in range(1, 30)
    ]
    return Profile(sample_types=[("contentions", "count"), ("delay", "nanoseconds")], samples=samples,
                   time_nanos=T0, duration_nanos=10_000_000_000, period_type=("contentions", "count"), period=1,
                   default_sample_type="delay").aggregated()


def memory_profile() -> Profile:
    rng = random.Random(13)
    types = [("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"), ("inuse_space", "bytes")]
    samples = [
        Sample(_stack(rng), (n, n * 4096, n // 2, n // 2 * 4096), (("pid", "101"), ("thread_name", "MainThread")))
        for n in range(1, 40)
    ]
    return Profile(sample_types=types, samples=samples, time_nanos=T0 + 5, duration_nanos=10_000_000_000,
                   period_type=("space", "bytes"), period=512 * 1024, default_sample_type="inuse_space").aggregated()


def official(data: bytes) -> OfficialRequest:
    msg = OfficialRequest()
    msg.ParseFromString(data)
    return msg


def attrs(kvs: Any) -> dict[str, Any]:
    """Resource attributes of the official message as Python values."""
    out: dict[str, Any] = {}
    for kv in kvs:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind)
    return out


def official_samples(msg: OfficialRequest, prof: Any) -> Counter[tuple[Any, ...]]:
    """(stack root first, labels with the link's span as span_id, trace, value) of an official Profile."""
    d = msg.dictionary
    s = d.string_table
    out: Counter[tuple[Any, ...]] = Counter()
    for smp in prof.samples:
        labels = {}
        for ai in smp.attribute_indices:
            kv = d.attribute_table[ai]
            assert kv.value.WhichOneof("value") == "string_value"
            labels[s[kv.key_strindex]] = kv.value.string_value
        trace = None
        if smp.link_index:
            link = d.link_table[smp.link_index]
            assert "span_id" not in labels
            labels["span_id"] = link.span_id.hex()
            trace = link.trace_id.hex()
        assert len(smp.values) == 1 and smp.values[0] != 0
        out[(sample_stack(d, smp), tuple(sorted(labels.items())), trace, smp.values[0])] += 1
    return out


def expected_samples(p: Profile, index: int, pid: str) -> Counter[tuple[Any, ...]]:
    out: Counter[tuple[Any, ...]] = Counter()
    for smp in p.samples:
        if smp.label("pid") == pid and smp.values[index]:
            span = smp.label("span_id")
            out[(smp.stack, smp.labels, p.span_traces.get(span or ""), smp.values[index])] += 1
    return out


# ------------------------------------------------------------------------------------------------
# to_otlp, read with the official classes


def test_request_decodes_with_the_official_classes_totals_stacks_labels_links() -> None:
    cpu = cpu_profile()
    msg = official(encode_otlp(cpu, service_name="shop", env=ENV))
    d = msg.dictionary
    # every table's index 0 is its zero value
    assert d.string_table[0] == ""
    for table in (d.mapping_table, d.location_table, d.function_table, d.link_table, d.attribute_table,
                  d.stack_table):
        assert table[0].ByteSize() == 0
    assert len(d.mapping_table) == 1  # no mappings
    assert [attrs(rp.resource.attributes)["process.pid"] for rp in msg.resource_profiles] == [101, 202]
    for rp in msg.resource_profiles:
        pid = str(attrs(rp.resource.attributes)["process.pid"])
        assert len(rp.scope_profiles) == 1
        scope = rp.scope_profiles[0]
        assert (scope.scope.name, scope.scope.version) == ("middleware", middleware.__version__)
        assert [(d.string_table[p.sample_type.type_strindex], d.string_table[p.sample_type.unit_strindex])
                for p in scope.profiles] == cpu.sample_types
        for index, prof in enumerate(scope.profiles):
            assert (prof.time_unix_nano, prof.duration_nano, prof.period) == (T0, 10_000_000_000, 10_000_000)
            assert (d.string_table[prof.period_type.type_strindex],
                    d.string_table[prof.period_type.unit_strindex]) == ("cpu", "nanoseconds")
            got = official_samples(msg, prof)
            want = expected_samples(cpu, index, pid)
            assert got == want
            assert sum(v * n for (*_, v), n in got.items()) == sum(
                s.values[index] for s in cpu.samples if s.label("pid") == pid)
    linked = [smp for rp in msg.resource_profiles for p in rp.scope_profiles[0].profiles for smp in p.samples
              if smp.link_index]
    assert linked and {(d.link_table[s.link_index].span_id.hex(), d.link_table[s.link_index].trace_id.hex())
                       for s in linked} == set(SPANS.items())
    # the orphan span id stays an attribute, no link
    orphan = [a for a in d.attribute_table if d.string_table[a.key_strindex] == "span_id"]
    assert [a.value.string_value for a in orphan] == [ORPHAN_SPAN]


def test_dictionary_interns_functions_locations_stacks_and_attributes_once() -> None:
    cpu = cpu_profile()
    msg = official(encode_otlp([cpu, lock_profile()], service_name="shop", env={}))
    d = msg.dictionary
    s = d.string_table
    frames = {f for p in (cpu, lock_profile()) for smp in p.samples for f in smp.stack}
    assert len(s) == len(set(s))
    assert len(d.function_table) - 1 == len({(f.function, f.file) for f in frames})
    assert len(d.location_table) - 1 == len(frames)
    assert len({tuple(st.location_indices) for st in d.stack_table}) == len(d.stack_table)
    keys = [(a.key_strindex, a.value.string_value) for a in d.attribute_table]
    assert len(keys) == len(set(keys))
    assert len(d.link_table) - 1 == len(SPANS)


def test_resource_attributes_from_the_environment_and_the_service_setting() -> None:
    msg = official(encode_otlp(lock_profile(), service_name="shop", env=ENV))
    (rp,) = msg.resource_profiles
    assert attrs(rp.resource.attributes) == {
        "service.name": "shop",  # the agent's setting beats the attributes' service.name
        "process.pid": 101,
        "telemetry.sdk.name": "middleware",
        "telemetry.sdk.language": "python",
        "telemetry.sdk.version": middleware.__version__,
        "deployment.environment": "prod",  # MW_CUSTOM_RESOURCE_ATTRIBUTES comes later and wins
        "team": "a,b",  # percent-decoded
        "k8s.pod.name": "web-1",
        "region": "eu",
    }
    # a variable's key given again replaces ours in its place, except service.name
    env = {"MW_CUSTOM_RESOURCE_ATTRIBUTES": "telemetry.sdk.language=cpython,service.name=x"}
    got = list(attrs(official(encode_otlp(lock_profile(), service_name="shop", env=env)).resource_profiles[0]
                     .resource.attributes).items())
    assert got[:5] == [("service.name", "shop"), ("process.pid", 101), ("telemetry.sdk.name", "middleware"),
                       ("telemetry.sdk.language", "cpython"), ("telemetry.sdk.version", middleware.__version__)]
    assert len(got) == 5
    # no setting: OTEL_SERVICE_NAME, then service.name of the attributes
    env = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs"}
    assert attrs(official(encode_otlp(lock_profile(), env=env)).resource_profiles[0].resource.attributes)[
        "service.name"] == "from-attrs"
    env["OTEL_SERVICE_NAME"] = "from-setting"
    assert attrs(official(encode_otlp(lock_profile(), env=env)).resource_profiles[0].resource.attributes)[
        "service.name"] == "from-setting"


def test_zero_values_are_left_out_of_each_type() -> None:
    p = Profile(samples=[Sample((Frame("a", "x.py", 1),), (0, 0, 70), (("pid", "5"),)),
                         Sample((Frame("b", "x.py", 2),), (1, 10, 0), (("pid", "5"),))], time_nanos=T0)
    msg = official(encode_otlp(p, service_name="s", env={}))
    counts = [len(prof.samples) for prof in msg.resource_profiles[0].scope_profiles[0].profiles]
    assert counts == [1, 1, 1]


# ------------------------------------------------------------------------------------------------
# from_otlp


def _normal(p: Profile) -> Profile:
    q = p.aggregated()
    q.samples = sorted((s for s in q.samples if any(s.values)), key=lambda s: (s.stack, s.labels))
    return q


@pytest.mark.parametrize("make", [cpu_profile, lock_profile, memory_profile])
def test_from_otlp_gives_back_each_process_profile(make: Any) -> None:
    p = make()
    back = from_otlp(to_otlp(p, service_name="shop", env=ENV).SerializeToString())
    pids = sorted({s.label("pid") for s in p.samples})
    assert [service for service, _ in back] == ["shop"] * len(pids)
    for (_, got), pid in zip(back, pids, strict=True):
        want = p.filter(labels={"pid": pid})
        assert _normal(got) == _normal(want)


def test_profiles_of_one_window_and_period_become_one_pprof_and_resource_attributes_are_returned() -> None:
    cpu = cpu_profile().filter(labels={"pid": "101"})
    data = encode_otlp([("shop", cpu), ("shop", lock_profile()), ("shop", memory_profile())], env=ENV)
    got = read_otlp(data)
    assert [g.profile.sample_types for g in got] == [cpu.sample_types, lock_profile().sample_types,
                                                     memory_profile().sample_types]
    assert [g.otlp_profiles for g in got] == [3, 2, 4]
    assert [g.profile.default_sample_type for g in got] == ["cpu", "delay", "inuse_space"]
    assert got[0].attributes == {"telemetry.sdk.name": "middleware", "telemetry.sdk.language": "python",
                                 "telemetry.sdk.version": middleware.__version__, "deployment.environment": "prod",
                                 "team": "a,b", "k8s.pod.name": "web-1", "region": "eu"}


def test_official_request_with_timestamps_and_a_process_pid_reads_as_counts_with_a_pid_label() -> None:
    req = OfficialRequest()
    d = req.dictionary
    d.string_table.extend(["", "f", "f.py", "cpu", "nanoseconds", "thread.name", "t1", "samples", "count"])
    d.mapping_table.add(), d.location_table.add(), d.function_table.add(), d.link_table.add()
    d.attribute_table.add(), d.stack_table.add()
    d.function_table.add(name_strindex=1, filename_strindex=2)
    d.location_table.add().lines.add(function_index=1, line=9)
    d.stack_table.add(location_indices=[1])
    d.attribute_table.add(key_strindex=5).value.string_value = "t1"
    rp = req.resource_profiles.add()
    rp.resource.attributes.add(key="service.name").value.string_value = "ebpf"
    rp.resource.attributes.add(key="process.pid").value.int_value = 77
    prof = rp.scope_profiles.add().profiles.add(time_unix_nano=T0, duration_nano=5)
    prof.sample_type.type_strindex, prof.sample_type.unit_strindex = 7, 8
    prof.samples.add(stack_index=1, attribute_indices=[1], timestamps_unix_nano=[T0 + 1, T0 + 2, T0 + 3])
    ((service, p),) = from_otlp(req.SerializeToString())
    assert service == "ebpf"
    assert p.samples == [Sample((Frame("f", "f.py", 9),), (3,), (("pid", "77"), ("thread.name", "t1")))]


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.dictionary.string_table.__setitem__(0, "x"), "string_table[0]"),
    (lambda r: r.dictionary.stack_table[1].location_indices.append(999), "index 999"),
    (lambda r: setattr(r.dictionary.link_table[1], "span_id", b"\x01\x02"), "span_id 8 \\(got 16 and 2\\)"),
    (lambda r: r.resource_profiles[0].scope_profiles[0].profiles[0].samples[0].ClearField("values"),
     "neither values nor timestamps"),
    (lambda r: r.resource_profiles[0].scope_profiles[0].profiles[0].samples[0].attribute_indices.append(10**6),
     "index 1000000"),
])
def test_malformed_requests_are_a_clear_error(mutate: Any, message: str) -> None:
    req = OfficialRequest()
    req.ParseFromString(encode_otlp(cpu_profile(), service_name="s", env={}))
    mutate(req)
    with pytest.raises(OtlpError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_otlp(req.SerializeToString())


def test_bytes_that_are_not_a_request_are_a_clear_error() -> None:
    with pytest.raises(OtlpError, match="not an ExportProfilesServiceRequest"):
        from_otlp(b"\xff\xff\xff\xff not protobuf")
    with pytest.raises(OtlpError, match="not an OTLP/JSON"):
        from_otlp(b"{", "application/json")


# ------------------------------------------------------------------------------------------------
# our generated modules beside the official package


@pytest.mark.parametrize("first", ["ours", "official"])
def test_generated_modules_and_the_official_package_share_one_process(first: str) -> None:
    code = """
import sys
def ours():
    import middleware.otlp
    from middleware._proto.otlp import profiles_service_pb2
    assert not [m for m in sys.modules if m.startswith("opentelemetry")] or FIRST == "official", sorted(sys.modules)
    return profiles_service_pb2.ExportProfilesServiceRequest
def official():
    from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2
    return profiles_service_pb2.ExportProfilesServiceRequest
a, b = (ours(), official()) if FIRST == "ours" else (official(), ours())
assert a.DESCRIPTOR.full_name != b.DESCRIPTOR.full_name
assert a.DESCRIPTOR.file.name != b.DESCRIPTOR.file.name
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", f"FIRST = {first!r}\n{code}"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ------------------------------------------------------------------------------------------------
# export --format otlp


def test_cli_writes_a_request_that_decodes(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    cpu = cpu_profile()
    (store / f"shop-101-{T0 // 1_000_000}.pb.gz").write_bytes(encode_pprof(cpu.filter(labels={"pid": "101"})))
    (store / f"shop-202-{T0 // 1_000_000}.pb.gz").write_bytes(encode_pprof(cpu.filter(labels={"pid": "202"})))
    (store / f"locks-101-{T0 // 1_000_000 + 1}.pb.gz").write_bytes(encode_pprof(lock_profile()))
    out = tmp_path / "out.otlp"

    def run(*args: str, stdout: bool = False) -> bytes:
        res = subprocess.run([sys.executable, "-m", "middleware", "export", "--format", "otlp", *args],
                             capture_output=True, cwd=ROOT, timeout=120,
                             env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        assert res.returncode == 0, res.stderr
        return res.stdout if stdout else out.read_bytes()

    msg = official(run("-o", str(out), str(store)))
    services = [(attrs(rp.resource.attributes)["service.name"], attrs(rp.resource.attributes)["process.pid"])
                for rp in msg.resource_profiles]
    assert sorted(services) == [("locks", 101), ("shop", 101), ("shop", 202)]
    totals: Counter[str] = Counter()
    for rp in msg.resource_profiles:
        for prof in rp.scope_profiles[0].profiles:
            totals[msg.dictionary.string_table[prof.sample_type.type_strindex]] += sum(
                s.values[0] for s in prof.samples)
    assert totals == {"samples": cpu.total("samples"), "cpu": cpu.total("cpu"), "wall": cpu.total("wall"),
                      "contentions": lock_profile().total("contentions"), "delay": lock_profile().total("delay")}
    # stdout, a label selection and one value type
    msg = official(run("--label", "endpoint=/a", "--value", "cpu", "--service", "renamed", str(store), stdout=True))
    assert {attrs(rp.resource.attributes)["service.name"] for rp in msg.resource_profiles} == {"renamed"}
    got = sum(s.values[0] for rp in msg.resource_profiles for p in rp.scope_profiles[0].profiles for s in p.samples)
    assert got == cpu.filter(labels={"endpoint": "/a"}).total("cpu")
    assert {msg.dictionary.string_table[p.sample_type.type_strindex] for rp in msg.resource_profiles
            for p in rp.scope_profiles[0].profiles} == {"cpu"}


def test_cli_refuses_an_empty_selection(tmp_path: Path) -> None:
    f = tmp_path / "one.pb.gz"
    f.write_bytes(encode_pprof(lock_profile()))
    res = subprocess.run([sys.executable, "-m", "middleware", "export", "--format", "otlp", "--label", "lock=none",
                          "-o", str(tmp_path / "o"), str(f)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "no profile with samples matches" in res.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# serve: POST /v1development/profiles


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    app = ServeApp(ServeConfig(port=0, data_dir=str(tmp_path_factory.mktemp("serve-otlp")))).start()
    try:
        yield app
    finally:
        app.stop()


def post(app: ServeApp, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=30)
    try:
        conn.request("POST", "/v1development/profiles", body,
                     {"Content-Type": "application/x-protobuf", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Type") or ""
    finally:
        conn.close()


def stored(app: ServeApp, service: str) -> Profile:
    """The service's stored pprofs (the store's lossless record), merged."""
    rows = app.store.query("SELECT pprof_gz FROM profiles WHERE service=?", (service,))
    return Profile.merge_all([parse_pprof(r[0]) for r in rows])


CPU_TYPE = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
WINDOW = {"from": T0 // 10**9, "until": T0 // 10**9 + 10}


def test_serve_stores_an_export_with_its_totals_labels_and_spans(app: ServeApp) -> None:
    cpu = cpu_profile()
    status, body, ctype = post(app, encode_otlp([cpu, lock_profile()], service_name="otlp-shop", env=ENV))
    assert status == 200 and ctype == "application/x-protobuf", body
    response = OfficialResponse()
    response.ParseFromString(body)
    assert not response.HasField("partial_success")
    types = {t["id"] for t in api(app, "/api/profile_types", service="otlp-shop")["types"]}
    assert {CPU_TYPE, "wall:wall:nanoseconds:wall:nanoseconds", "block:delay:nanoseconds:contentions:count",
            "block:contentions:count:contentions:count"} <= types
    doc = api(app, "/api/profile", service="otlp-shop", type=CPU_TYPE, **WINDOW)
    assert doc["total"] == cpu.total("cpu")
    for pid in ("101", "202"):
        sel = api(app, "/api/profile", service="otlp-shop", type=CPU_TYPE, selector=f'{{pid="{pid}"}}', **WINDOW)
        assert sel["total"] == cpu.filter(labels={"pid": pid}).total("cpu")
    values = api(app, "/api/label_values", service="otlp-shop", name="endpoint")["values"]
    assert sorted(values) == ["/a", "/b/<int:n>", "/c"]
    # resource attributes are series labels (dots become _)
    assert api(app, "/api/label_values", service="otlp-shop", name="deployment_environment")["values"] == ["prod"]
    # links came back as span_id labels with their traces (mw:spans of the stored pprof)
    merged = stored(app, "otlp-shop")
    assert merged.span_traces == SPANS
    assert {s.label("span_id") for s in merged.samples} == {*SPANS, ORPHAN_SPAN, None}
    assert merged.total("cpu") == cpu.total("cpu")
    # the same request again (a retry) is stored once
    assert post(app, encode_otlp([cpu, lock_profile()], service_name="otlp-shop", env=ENV))[0] == 200
    assert api(app, "/api/profile", service="otlp-shop", type=CPU_TYPE, **WINDOW)["total"] == cpu.total("cpu")


def test_serve_accepts_gzip_and_json(app: ServeApp) -> None:
    p = lock_profile()
    status, body, _ = post(app, gzip.compress(encode_otlp(p, service_name="gz-svc", env={})),
                           {"Content-Encoding": "gzip"})
    assert status == 200, body
    doc = api(app, "/api/profile", service="gz-svc", type="block:delay:nanoseconds:contentions:count", **WINDOW)
    assert doc["total"] == p.total("delay")
    # OTLP/JSON: lowerCamelCase names, ids in hex
    request = json_format.MessageToDict(official(encode_otlp(cpu_profile(), service_name="json-svc", env={})))
    for link in request["dictionary"]["linkTable"][1:]:
        link["traceId"] = __import__("base64").b64decode(link["traceId"]).hex()
        link["spanId"] = __import__("base64").b64decode(link["spanId"]).hex()
    status, body, ctype = post(app, json.dumps(request).encode(), {"Content-Type": "application/json"})
    assert status == 200 and ctype == "application/json", body
    assert json.loads(body) == {}
    merged = stored(app, "json-svc")
    assert merged.span_traces == SPANS and merged.total("cpu") == cpu_profile().total("cpu")


def test_serve_answers_partial_success_for_refused_profiles(app: ServeApp) -> None:
    good = encode_otlp([("partial-ok", lock_profile()), ("bad service", lock_profile())], env={})
    status, body, _ = post(app, good)
    assert status == 200, body
    response = OfficialResponse()
    response.ParseFromString(body)
    assert response.partial_success.rejected_profiles == 2
    assert "bad service.name 'bad service'" in response.partial_success.error_message
    doc = api(app, "/api/profile", service="partial-ok", type="block:delay:nanoseconds:contentions:count", **WINDOW)
    assert doc["total"] == lock_profile().total("delay")
    # every profile refused: 400 with the reason
    neg = Profile(samples=[Sample((Frame("f", "x.py", 1),), (-5, 1, 1), (("pid", "9"),))], time_nanos=T0)
    status, body, _ = post(app, encode_otlp(neg, service_name="neg", env={}))
    assert status == 400 and b"negative value -5" in body
    assert "neg" not in [s["name"] for s in api(app, "/api/services")["services"]]


@pytest.mark.parametrize("body, headers, status, message", [
    (b"\xff\xff\xff\xff garbage", {}, 400, b"not an ExportProfilesServiceRequest"),
    (b"\x1f\x8b\x08\x00broken", {"Content-Encoding": "gzip"}, 400, b"corrupt gzip"),
    (b"{}", {"Content-Type": "text/plain"}, 415, b"unsupported Content-Type"),
    (b"", {}, 400, b"holds no profile"),
    (b"x" * (16 * 1024 * 1024 + 1), {}, 413, b"exceeds the limit"),
])
def test_serve_refuses_bad_bodies(app: ServeApp, body: bytes, headers: dict[str, str], status: int,
                                  message: bytes) -> None:
    before = api(app, "/api/stats")["uploads"]["accepted"]
    got, text, _ = post(app, body, headers)
    assert got == status and message in text, text
    assert api(app, "/api/stats")["uploads"]["accepted"] == before


def test_serve_needs_the_token_for_otlp_exports(tmp_path: Path) -> None:
    app = ServeApp(ServeConfig(port=0, data_dir=str(tmp_path), token="s3cret-token")).start()
    try:
        body = encode_otlp(lock_profile(), service_name="guarded", env={})
        status, text, _ = post(app, body)
        assert status == 401 and b"unauthorized" in text
        assert app.store.query("SELECT COUNT(*) FROM profiles")[0][0] == 0
        status, text, _ = post(app, body, {"Authorization": "Bearer s3cret-token"})
        assert status == 200, text
        assert app.store.query("SELECT COUNT(*) FROM profiles")[0][0] == 1
    finally:
        app.stop()
