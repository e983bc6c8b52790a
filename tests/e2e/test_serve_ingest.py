"""`python -m middleware serve`: the ingest side (docs/protocol.md), its limits, auth and the importer.

GIVEN a serve started in-process on 127.0.0.1 (free port, temporary --data)
WHEN profiles built with encode_pprof are pushed as raw, gzipped, multipart or push-API bodies
THEN the query API gives back exactly what was pushed (totals per profile type, labels, window);
and every malformed upload gets a 4xx with a clear message and leaves the store unchanged.
The native uploader (`_native.upload_start/submit`) pushes a profile of a real profiled workload.
"""
from __future__ import annotations

import base64
import gzip
import http.client
import json
import math
import os
import subprocess
import sys
import textwrap
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from middleware.pprof import encode_pprof, parse_pprof, write_pprof_file
from middleware.profile import Profile
from middleware.serve import ConfigError, ServeApp, ServeConfig, is_loopback
from middleware.serve.ingest import IngestLimits, profile_type_ids
from support.profiles import build, calc_profile, sample

ROOT = Path(__file__).resolve().parents[2]
CPU = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
SAMPLES = "process_cpu:samples:count:cpu:nanoseconds"
WALL = "wall:wall:nanoseconds:wall:nanoseconds"
T0_S = 1_763_719_200  # support.profiles.T0 in seconds
LIMITS = IngestLimits(max_body_bytes=256 * 1024, max_decompressed_bytes=1024 * 1024)
TOKEN = "s3cret-token-for-tests"


class Client:
    """A tiny HTTP client for one serve (a new connection per request)."""

    def __init__(self, app: ServeApp) -> None:
        self.app = app
        self.host, self.port = "127.0.0.1", app.port

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, dict[str, str]]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()

    def ingest(self, body: bytes, headers: dict[str, str] | None = None, **params: Any) -> tuple[int, str]:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        h = {"Content-Type": "binary/octet-stream"}
        h.update(headers or {})
        status, data, _ = self.request("POST", f"/ingest?{query}", body, h)
        return status, data.decode("utf-8", "replace")

    def get(self, path: str, headers: dict[str, str] | None = None, **params: Any) -> Any:
        status, data, _ = self.request("GET", f"{path}?{urllib.parse.urlencode(params)}", headers=headers)
        assert status == 200, f"GET {path} -> {status}: {data[:300]!r}"
        return json.loads(data)


def push(
    client: Client, profile: Profile, name: str = "svc", *, start_s: int = T0_S, gz: bool = True, **extra: Any
) -> tuple[int, str]:
    body = encode_pprof(profile, compress=gz)
    params = {
        "name": name,
        "from": start_s,
        "until": start_s + 10,
        "format": "pprof",
        "sampleRate": 100,
        "spyName": "test",
    }
    params.update(extra)
    return client.ingest(body, **params)


def totals(
    client: Client, service: str, type_id: str, selector: str = "{}", start_s: int = T0_S - 60, end_s: int = T0_S + 3600
) -> int:
    doc = client.get(
        "/api/profile", service=service, type=type_id, **{"from": start_s, "until": end_s}, selector=selector
    )
    return int(doc["total"])


def expected_total(profile: Profile, value: str, labels: dict[str, str] | None = None) -> int:
    return profile.filter(labels=labels).total(value) if labels else profile.total(value)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Client]:
    app = ServeApp(ServeConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path / "data"), limits=LIMITS)).start()
    try:
        yield Client(app)
    finally:
        app.stop()


# ------------------------------------------------------------------------------------------------
# accepted uploads
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_pushed_profile_reads_back_equal(serve: Client, gz: bool) -> None:
    # GIVEN the calc profile (three sample types, labels endpoint + thread_name)
    profile = calc_profile()
    # WHEN it is pushed (gzipped or plain body)
    status, body = push(serve, profile, name="calc-svc{env=prod,region=eu}", gz=gz)
    assert status == 200, body
    # THEN the service and its three profile types are listed
    services = serve.get("/api/services")["services"]
    assert [s["name"] for s in services] == ["calc-svc"]
    assert sorted(services[0]["types"]) == sorted([CPU, SAMPLES, WALL])
    assert services[0]["first"] == T0_S and services[0]["last"] == T0_S + 10
    # AND every type's merged total equals the pushed values
    assert totals(serve, "calc-svc", CPU) == profile.total("cpu")
    assert totals(serve, "calc-svc", SAMPLES) == profile.total("samples")
    assert totals(serve, "calc-svc", WALL) == profile.total("wall")
    # AND the function table equals the original's (same Self and Total per function)
    doc = serve.get("/api/profile", service="calc-svc", type=CPU, **{"from": T0_S - 60, "until": T0_S + 60})
    got = {(f["name"], f["file"]): (f["self"], f["total"]) for f in doc["data"]["functions"]}
    from middleware.reporters.table import function_table

    want = {r.key: (r.self_value, r.total_value) for r in function_table(profile, "cpu")}
    assert got == want
    assert doc["profiles"] == 1
    assert doc["data"]["functions"][0]["name"] == "calc3"


def test_static_tags_and_sample_labels_are_queryable(serve: Client) -> None:
    profile = calc_profile()
    profile.samples.append(sample("main;traced", 70_000_000, labels={"span_id": "abc123", "endpoint": "/t"}))
    assert push(serve, profile, name="svc{env=prod}")[0] == 200
    names = serve.get("/api/label_names", service="svc")["names"]
    # static tag, sample labels and service_name; span_id is not a series label (docs/protocol.md)
    assert names == ["endpoint", "env", "service_name", "thread_name"]
    assert serve.get("/api/label_values", service="svc", name="endpoint")["values"] == ["/calculate", "/other", "/t"]
    assert serve.get("/api/label_values", service="svc", name="env")["values"] == ["prod"]
    # selectors on a sample label, a static tag, negation and regex give the matching subsets
    assert totals(serve, "svc", CPU, '{endpoint="/calculate"}') == expected_total(
        profile, "cpu", {"endpoint": "/calculate"}
    )
    assert totals(serve, "svc", CPU, '{env="prod"}') == profile.total("cpu")
    assert totals(serve, "svc", CPU, '{env="dev"}') == 0
    assert totals(serve, "svc", CPU, '{thread_name!="MainThread"}') == profile.total("cpu") - expected_total(
        profile, "cpu", {"thread_name": "MainThread"}
    )
    assert totals(serve, "svc", WALL, '{endpoint=~"/calc.*",thread_name="worker-1"}') == expected_total(
        profile, "wall", {"endpoint": "/calculate", "thread_name": "worker-1"}
    )
    status, data, _ = serve.request("GET", "/api/profile?" + urllib.parse.urlencode(
        {"service": "svc", "type": CPU, "selector": '{span_id="abc123"}'}))
    assert status == 400 and b"span_id" in data


def test_asyncio_tasks_are_queryable_by_their_task_label(serve: Client, tmp_path: Path) -> None:
    # GIVEN the profile of a real asyncio workload: tasks crunch-x/y/z burning CPU under their
    # parents, each waiting for its turn, and a task blocking the loop
    out = tmp_path / "tasks.pprof"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "targets" / "asyncio_workloads.py"), "running", "1000"],
                          capture_output=True, text=True, timeout=120, cwd=str(ROOT),
                          env={**os.environ, "MW_WORKLOAD_PPROF": str(out)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = parse_pprof(out.read_bytes())
    # WHEN it is pushed
    assert push(serve, profile, name="tasks-svc")[0] == 200
    # THEN `task` is a label of the service, with every task's name
    assert "task" in serve.get("/api/label_names", service="tasks-svc")["names"]
    values = serve.get("/api/label_values", service="tasks-svc", name="task")["values"]
    assert {"crunch-x", "crunch-y", "crunch-z", "blocker"} <= set(values), values
    # AND a selector on it gives that task's CPU and wall exactly, under its own frames
    for task in ("crunch-x", "crunch-z"):
        cpu = expected_total(profile, "cpu", {"task": task})
        assert cpu > 0.1e9 and totals(serve, "tasks-svc", CPU, f'{{task="{task}"}}') == cpu
        assert totals(serve, "tasks-svc", WALL, f'{{task="{task}"}}') == expected_total(profile, "wall", {"task": task})
        doc = serve.get("/api/profile", service="tasks-svc", type=CPU, selector=f'{{task="{task}"}}',
                        **{"from": 0, "until": int(time.time()) + 60})
        names = {f["name"].split(".")[-1] for f in doc["data"]["functions"] if f["self"] or f["total"]}
        assert {"crunch", "spin_slices", "spin"} <= names, names
        assert "blocker" not in names, names


def test_window_from_query_or_from_pprof(serve: Client) -> None:
    # from/until given: they are the window
    assert push(serve, calc_profile(), name="a", start_s=T0_S + 100)[0] == 200
    # no from/until: the pprof's time_nanos/duration_nanos are used
    p = calc_profile(time_nanos=(T0_S + 500) * 10**9)
    assert serve.ingest(encode_pprof(p), name="b", format="pprof")[0] == 200
    info = {s["name"]: s for s in serve.get("/api/services")["services"]}
    assert (info["a"]["first"], info["a"]["last"]) == (T0_S + 100, T0_S + 110)
    assert (info["b"]["first"], info["b"]["last"]) == (T0_S + 500, T0_S + 510)
    # a time range that excludes the profile's start gives nothing
    assert totals(serve, "b", CPU, start_s=T0_S + 501, end_s=T0_S + 900) == 0
    assert totals(serve, "b", CPU, start_s=T0_S + 500, end_s=T0_S + 501) == p.total("cpu")


def multipart(fields: list[tuple[str, str, bytes]], boundary: str = "mwBoundary7MA4YWxkTrZu0gW") -> tuple[bytes, str]:
    out = b""
    for name, filename, data in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


@pytest.mark.asan
def test_multipart_upload(serve: Client) -> None:
    profile = calc_profile()
    config = json.dumps({"cpu": {"units": "nanoseconds", "aggregation": "sum", "display-name": "cpu"}}).encode()
    body, ctype = multipart([("profile", "profile.pprof", encode_pprof(profile)), ("sample_type_config", "", config)])
    status, text = serve.ingest(
        body, {"Content-Type": ctype}, name="mp", **{"from": T0_S, "until": T0_S + 10}, format="pprof"
    )
    assert status == 200, text
    assert totals(serve, "mp", CPU) == profile.total("cpu")


def test_content_encoding_gzip_and_chunked(serve: Client) -> None:
    profile = calc_profile()
    raw = encode_pprof(profile, compress=False)
    status, text = serve.ingest(gzip.compress(raw), {"Content-Encoding": "gzip"}, name="ce", format="pprof")
    assert status == 200, text
    # a chunked body (no Content-Length)
    conn = http.client.HTTPConnection("127.0.0.1", serve.port, timeout=30)
    conn.putrequest("POST", "/ingest?name=chunked&format=pprof")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.putheader("Content-Type", "binary/octet-stream")
    conn.endheaders()
    data = encode_pprof(profile)
    for i in range(0, len(data), 100):
        piece = data[i : i + 100]
        conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    conn.send(b"0\r\n\r\n")
    assert conn.getresponse().status == 200
    conn.close()
    assert totals(serve, "ce", CPU) == totals(serve, "chunked", CPU) == profile.total("cpu")


def test_same_profile_twice_is_stored_once(serve: Client) -> None:
    # GIVEN an upload that was stored (say the agent's answer got lost and it retries)
    profile = calc_profile()
    assert push(serve, profile, name="retry")[0] == 200
    first_id = serve.app.store.query("SELECT id FROM profiles")[0][0]
    # WHEN exactly the same upload arrives again, also as plain pprof
    status, body = push(serve, profile, name="retry")
    assert status == 200 and json.loads(body)["id"] == first_id
    assert push(serve, profile, name="retry", gz=False)[0] == 200
    # THEN it is counted once
    assert serve.app.store.profile_count() == 1
    assert totals(serve, "retry", CPU) == profile.total("cpu")
    # while the same bytes for another window or another service are new profiles
    assert push(serve, profile, name="retry", start_s=T0_S + 10)[0] == 200
    assert push(serve, profile, name="retry2")[0] == 200
    assert serve.app.store.profile_count() == 3
    assert totals(serve, "retry", CPU) == 2 * profile.total("cpu")


def test_push_api(serve: Client) -> None:
    from middleware.serve.ingest import _push_request_class

    profile = calc_profile()
    req = _push_request_class()()
    series = req.series.add()
    for k, v in (("__name__", "process_cpu"), ("service_name", "pushed"), ("env", "staging")):
        series.labels.add(name=k, value=v)
    series.samples.add(raw_profile=encode_pprof(profile), ID="0b5c8f1e-0000-4000-8000-000000000001")
    status, data, headers = serve.request(
        "POST", "/push.v1.PusherService/Push", req.SerializeToString(), {"Content-Type": "application/proto"}
    )
    assert status == 200, data
    assert totals(serve, "pushed", CPU, '{env="staging"}') == profile.total("cpu")
    # Connect's JSON encoding of the same request is accepted too (another window: a new profile)
    from google.protobuf import json_format

    later = calc_profile(time_nanos=(T0_S + 10) * 10**9)
    series.samples[0].raw_profile = encode_pprof(later)
    status, data, _ = serve.request(
        "POST",
        "/push.v1.PusherService/Push",
        json_format.MessageToJson(req).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200 and json.loads(data) == {}
    assert totals(serve, "pushed", CPU) == profile.total("cpu") + later.total("cpu")
    # a bad push is refused with a Connect error and stores nothing
    bad = _push_request_class()()
    s2 = bad.series.add()
    s2.labels.add(name="service_name", value="pushed")
    s2.samples.add(raw_profile=b"not a profile")
    status, data, _ = serve.request(
        "POST", "/push.v1.PusherService/Push", bad.SerializeToString(), {"Content-Type": "application/proto"}
    )
    assert status == 400 and json.loads(data)["code"] == "invalid_argument"
    assert serve.app.store.profile_count() == 2


# ------------------------------------------------------------------------------------------------
# refused uploads: 4xx, clear message, nothing stored
# ------------------------------------------------------------------------------------------------
def _bomb(size: int) -> bytes:
    return gzip.compress(b"\0" * size, compresslevel=9)


GOOD = encode_pprof(calc_profile())
OK_PARAMS = {"name": "svc", "from": T0_S, "until": T0_S + 10, "format": "pprof"}


@pytest.mark.parametrize(
    "body, params, headers, status, message",
    [
        (os.urandom(2000), {}, {}, 400, "not a pprof profile"),
        (b"hello, this is text", {}, {}, 400, "not a pprof profile"),
        (b"", {}, {}, 400, "empty profile"),
        (GOOD[:-20], {}, {}, 400, "corrupt gzip"),
        (b"\x1f\x8b\x08\x00" + os.urandom(500), {}, {}, 400, "corrupt gzip"),
        (GOOD + b"garbage", {}, {}, 400, "trailing garbage"),
        (_bomb(20 * 1024 * 1024), {}, {}, 413, "decompressed profile exceeds"),
        (gzip.compress(_bomb(20 * 1024 * 1024)), {}, {"Content-Encoding": "gzip"}, 413, "exceeds"),
        (os.urandom(300 * 1024), {}, {}, 413, "exceeds the limit"),
        (GOOD, {"name": None}, {}, 400, "missing 'name'"),
        (GOOD, {"name": ""}, {}, 400, "missing 'name'"),
        (GOOD, {"name": "svc{a}"}, {}, 400, "expected k=v"),
        (GOOD, {"name": "svc{a=1"}, {}, 400, "trailing"),
        (GOOD, {"name": "svc{__a=1}"}, {}, 400, "reserved"),
        (GOOD, {"name": "svc{1a=1}"}, {}, 400, "bad label name"),
        (GOOD, {"name": "svc{a=1,a=2}"}, {}, 400, "repeated"),
        (GOOD, {"name": "svc{service_name=x}"}, {}, 400, "reserved"),
        (GOOD, {"name": "my svc"}, {}, 400, "bad service name"),
        (GOOD, {"from": "yesterday"}, {}, 400, "bad 'from'"),
        (GOOD, {"from": str(T0_S * 1000)}, {}, 400, "not ms or ns"),
        (GOOD, {"until": str(T0_S - 5)}, {}, 400, "before 'from'"),
        (GOOD, {"format": "jfr"}, {}, 400, "unsupported format"),
        (GOOD, {"sampleRate": "fast"}, {}, 400, "bad 'sampleRate'"),
        (GOOD, {"sampleRate": "0"}, {}, 400, "bad 'sampleRate'"),
        (GOOD, {}, {"Content-Encoding": "br"}, 415, "Content-Encoding"),
        (multipart([("other", "x", GOOD)])[0], {}, {"Content-Type": multipart([])[1]}, 400, "no 'profile' field"),
        (
            multipart([("profile", "p", GOOD), ("sample_type_config", "", b"{not json")])[0],
            {}, {"Content-Type": multipart([])[1]}, 400, "sample_type_config",
        ),
        (encode_pprof(build([sample("main", 10, labels={"bad-name": "x"})])), {}, {}, 400, "bad label name"),
    ],
    ids=[
        "random-bytes", "text", "empty", "truncated-gzip", "corrupt-gzip", "gzip-trailing-garbage",
        "gzip-bomb", "content-encoding-bomb", "body-too-large", "no-name", "empty-name", "tag-without-value",
        "unclosed-tags", "reserved-label", "bad-label-name", "repeated-tag", "service_name-tag", "space-in-service",
        "bad-from", "from-in-ms", "until-before-from", "bad-format", "bad-sample-rate", "zero-sample-rate",
        "unknown-content-encoding", "multipart-without-profile", "bad-sample-type-config", "bad-pprof-label",
    ],
)
@pytest.mark.asan
def test_bad_upload_is_refused_and_changes_nothing(
    serve: Client, body: bytes, params: dict[str, Any], headers: dict[str, str], status: int, message: str
) -> None:
    # GIVEN a store with one good profile
    assert serve.ingest(GOOD, **OK_PARAMS)[0] == 200
    before = serve.get("/api/timeline", service="svc", type=CPU, **{"from": T0_S - 60, "until": T0_S + 60})
    # WHEN a bad upload arrives
    q = dict(OK_PARAMS)
    q.update(params)
    got_status, text = serve.ingest(body, headers, **q)
    # THEN it gets the 4xx with a message saying why
    assert got_status == status, text
    assert message in text
    # AND nothing changed
    assert serve.app.store.profile_count() == 1
    assert [s["name"] for s in serve.get("/api/services")["services"]] == ["svc"]
    after = serve.get("/api/timeline", service="svc", type=CPU, **{"from": T0_S - 60, "until": T0_S + 60})
    assert after == before


def test_wrong_method_and_path(serve: Client) -> None:
    assert serve.request("GET", "/ingest?name=svc")[0] == 405
    assert serve.request("POST", "/upload?name=svc", GOOD)[0] == 404
    assert serve.request("POST", "/api/services", b"{}")[0] == 405
    assert serve.request("GET", "/api/nothing")[0] == 404
    assert serve.request("GET", "/static/../store.py")[0] == 404
    status, data, _ = serve.request(
        "POST", "/ingest?name=svc&format=pprof", None, {"Content-Type": "binary/octet-stream"}
    )
    assert status in (400, 411) and serve.app.store.profile_count() == 0


def test_bad_query_parameters_get_400(serve: Client) -> None:
    assert serve.ingest(GOOD, **OK_PARAMS)[0] == 200
    for params in (
        {"type": CPU},  # no service
        {"service": "svc"},  # no type
        {"service": "svc", "type": "cpu"},
        {"service": "svc", "type": CPU, "from": "x"},
        {"service": "svc", "type": CPU, "from": "20", "until": "10"},
        {"service": "svc", "type": CPU, "selector": "{endpoint=/x}"},
        {"service": "svc", "type": CPU, "selector": '{endpoint=~"("}'},
    ):
        for path in ("/api/profile", "/api/timeline"):
            status, data, _ = serve.request("GET", f"{path}?{urllib.parse.urlencode(params)}")
            assert status == 400, (path, params, data)
            assert json.loads(data)["error"]


# ------------------------------------------------------------------------------------------------
# auth
# ------------------------------------------------------------------------------------------------
def test_token_required_when_configured(tmp_path: Path) -> None:
    app = ServeApp(ServeConfig(port=0, data_dir=str(tmp_path / "d"), token=TOKEN, limits=LIMITS)).start()
    try:
        c = Client(app)
        assert c.ingest(GOOD, **OK_PARAMS)[0] == 401
        assert c.ingest(GOOD, {"Authorization": "Bearer wrong-token-xyz"}, **OK_PARAMS)[0] == 401
        basic_bad = base64.b64encode(b"user:nope").decode()
        assert c.ingest(GOOD, {"Authorization": f"Basic {basic_bad}"}, **OK_PARAMS)[0] == 401
        assert app.store.profile_count() == 0
        assert c.ingest(GOOD, {"Authorization": f"Bearer {TOKEN}"}, **OK_PARAMS)[0] == 200
        basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
        assert c.ingest(encode_pprof(calc_profile(scale=2)), {"Authorization": f"Basic {basic}"}, **OK_PARAMS)[0] == 200
        assert app.store.profile_count() == 2
        # the page and the query API need it too; the health check does not
        status, _, headers = c.request("GET", "/api/services")
        assert status == 401 and headers["www-authenticate"].startswith("Basic")
        assert c.request("GET", "/")[0] == 401
        assert c.request("GET", "/api/services", headers={"Authorization": f"Basic {basic}"})[0] == 200
        assert c.request("GET", "/healthz")[0] == 200
    finally:
        app.stop()


def test_non_loopback_needs_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")
    with pytest.raises(ConfigError, match="token"):
        ServeApp(ServeConfig(host="0.0.0.0", port=0, data_dir=str(tmp_path / "d")))
    # the command refuses to start (exit status 2, one line), before binding anything
    monkeypatch.delenv("MW_SERVE_TOKEN", raising=False)
    env = {k: v for k, v in os.environ.items() if k != "MW_SERVE_TOKEN"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "middleware",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--data",
            str(tmp_path / "d2"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
        env=env,
    )
    assert proc.returncode == 2
    assert "without a token" in proc.stderr and "MW_SERVE_TOKEN" in proc.stderr


def test_serve_command_runs_and_takes_token_from_env(tmp_path: Path) -> None:
    env = dict(os.environ, MW_SERVE_TOKEN=TOKEN, MW_PROFILE_DIR=str(tmp_path / "store"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "middleware", "serve", "--port", "0", "--data", str(tmp_path / "d")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT), env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line and "token required" in line, line
        assert str(tmp_path / "store") in line  # the local store is imported
        port = int(line.split("http://127.0.0.1:")[1].split()[0].rstrip(")"))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/ingest?name=cmd&format=pprof", GOOD, {"Authorization": f"Bearer {TOKEN}"})
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "1 uploads accepted" in out


# ------------------------------------------------------------------------------------------------
# importing the local store
# ------------------------------------------------------------------------------------------------
def test_local_store_files_are_imported_once(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    p1 = calc_profile(time_nanos=T0_S * 10**9)
    p2 = calc_profile(time_nanos=(T0_S + 10) * 10**9, scale=2)
    write_pprof_file(p1, store_dir / f"my-app-4242-{T0_S}.pb.gz")
    write_pprof_file(p2, store_dir / f"my-app-4242-{T0_S + 10}.pb.gz")
    (store_dir / "notes.txt").write_text("not a profile")
    old_bad = store_dir / f"my-app-4243-{T0_S}.pb.gz"
    old_bad.write_bytes(b"\x1f\x8b broken")
    os.utime(old_bad, (time.time() - 3600, time.time() - 3600))
    data_dir = str(tmp_path / "data")

    def start() -> ServeApp:
        return ServeApp(
            ServeConfig(port=0, data_dir=data_dir, import_dirs=[str(store_dir)], import_interval=0.2)
        ).start()

    app = start()
    try:
        c = Client(app)
        _wait(lambda: app.store.profile_count() == 2)
        assert totals(c, "my-app", CPU) == p1.total("cpu") + p2.total("cpu")
        # a file written later is picked up by the periodic scan
        p3 = calc_profile(time_nanos=(T0_S + 20) * 10**9)
        write_pprof_file(p3, store_dir / f"my-app-4242-{T0_S + 20}.pb.gz")
        _wait(lambda: app.store.profile_count() == 3)
        assert app.store.imported(str(old_bad)).error  # recorded as failed, with the reason
    finally:
        app.stop()
    # a restart on the same data does not import anything twice
    app = start()
    try:
        time.sleep(0.6)
        assert app.store.profile_count() == 3
        assert totals(Client(app), "my-app", CPU) == p1.total("cpu") + p2.total("cpu") + p3.total("cpu")
    finally:
        app.stop()


def _wait(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------
# end to end through the native uploader, from a profiled workload
# ------------------------------------------------------------------------------------------------
UPLOADER_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from middleware import _native
    from middleware.pprof import encode_pprof
    from middleware.tracker import MwTracker
    sys.path.insert(0, sys.argv[3])
    from calculations import with_bottleneck

    url, out = sys.argv[1], sys.argv[2]
    tracker = MwTracker(service_name="e2e-svc", sample_rate=250, instrument=False)
    start = int(time.time())
    deadline = time.monotonic() + 1.2
    with tracker.labels(endpoint="/calculate2"):
        while time.monotonic() < deadline:
            with_bottleneck(7)
    profile = tracker.snapshot()
    tracker.stop()
    data = encode_pprof(profile)
    open(out, "wb").write(data)
    _native.upload_start(server_url=url, app_name="e2e-svc", tags="env=e2e", sample_rate=250,
                         spy_name="middleware-python", user_agent="middleware-test/1")
    ok = _native.upload_submit(data, start, start + 2)
    left = _native.upload_flush(20.0)
    _native.upload_stop(5.0)
    print(json.dumps({"ok": ok, "left": left, "stats": _native.upload_stats()}))
    """
)


@pytest.mark.asan
def test_native_uploader_end_to_end(serve: Client, tmp_path: Path) -> None:
    # GIVEN a profiled workload (calc3 under with_bottleneck) pushed by the native uploader
    script = tmp_path / "uploader.py"
    script.write_text(UPLOADER_SCRIPT)
    sent = tmp_path / "sent.pb.gz"
    proc = subprocess.run(
        [sys.executable, str(script), serve.app.url, str(sent), str(ROOT / "demo_flask")],
        capture_output=True, text=True, timeout=90, cwd=str(ROOT),
        env={k: v for k, v in os.environ.items() if not k.startswith("MW_")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["left"] == 0 and report["stats"]["uploaded"] == 1, report
    pushed = parse_pprof(sent.read_bytes())
    assert pushed.total("cpu") > 0
    # THEN serve holds exactly that profile, under the uploader's name and tags
    services = serve.get("/api/services")["services"]
    assert [s["name"] for s in services] == ["e2e-svc"]
    window = {"from": math.floor(services[0]["first"]), "until": math.ceil(services[0]["last"]) + 1}
    for type_id, index in profile_type_ids(pushed):
        value = pushed.sample_types[index][0]
        got = serve.get("/api/profile", service="e2e-svc", type=type_id, selector='{env="e2e"}', **window)
        assert got["total"] == pushed.total(value), type_id
    doc = serve.get("/api/profile", service="e2e-svc", type=CPU, selector='{endpoint="/calculate2"}', **window)
    top = doc["data"]["functions"][0]
    assert top["name"] == "calc3", doc["data"]["functions"][:3]
    sw = serve.get("/api/sandwich", service="e2e-svc", type=CPU, function="calc3", **window)
    assert sw["callers"][0]["function"] == "with_bottleneck"


AGENT_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    from calculations import efficient, with_bottleneck
    from middleware.tracker import MwTracker

    tracker = MwTracker(service_name="agent-e2e", sample_rate=200, upload_interval=0.5, instrument=False)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        with tracker.labels(endpoint="/calculate2"):
            with_bottleneck(7)
        with tracker.labels(endpoint="/calculate1"):
            efficient(150)
    tracker.stop()
    print(json.dumps(tracker.stats()))
    """
)


@pytest.mark.asan
def test_agent_uploads_equal_its_local_store(serve: Client, tmp_path: Path) -> None:
    from middleware.serve.importer import Importer

    # GIVEN an app profiled by MwTracker that both uploads to serve and writes its local store
    store_dir = tmp_path / "store"
    script = tmp_path / "agent.py"
    script.write_text(AGENT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MW_", "OTEL_"))}
    env.update(
        MW_PROFILING_SERVER_URL=serve.app.url, MW_PROFILE_DIR=str(store_dir), MW_CUSTOM_RESOURCE_ATTRIBUTES="env=e2e"
    )
    proc = subprocess.run([sys.executable, str(script), str(ROOT / "demo_flask")], capture_output=True, text=True,
                          timeout=90, cwd=str(ROOT), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    files = sorted(store_dir.glob("agent-e2e-*.pb.gz"))
    assert files and stats["upload_uploaded"] == len(files), (stats, files)
    written = [parse_pprof(f.read_bytes()) for f in files]
    # THEN serve holds the same profiles the agent wrote to disk: same count, same totals per type
    info = {s["name"]: s for s in serve.get("/api/services")["services"]}["agent-e2e"]
    assert info["profiles"] == len(files)
    window = {"from": math.floor(info["first"]), "until": math.ceil(info["last"]) + 1}
    for type_id, index in profile_type_ids(written[0]):
        want = sum(p.total(p.sample_types[index][0]) for p in written)
        assert serve.get("/api/profile", service="agent-e2e", type=type_id, **window)["total"] == want, type_id
    assert serve.get("/api/label_values", service="agent-e2e", name="env")["values"] == ["e2e"]
    # AND the bottleneck shows: calc3 on top for /calculate2, called by with_bottleneck
    doc = serve.get("/api/profile", service="agent-e2e", type=CPU, selector='{endpoint="/calculate2"}', **window)
    assert doc["data"]["functions"][0]["name"] == "calc3"
    sw = serve.get("/api/sandwich", service="agent-e2e", type=CPU, function="calc3", **window)
    assert [c["function"] for c in sw["callers"]] == ["with_bottleneck"]
    # AND importing that local store into the same serve adds nothing (the same profiles)
    cpu_before = serve.get("/api/profile", service="agent-e2e", type=CPU, **window)["total"]
    assert Importer(serve.app.store, [str(store_dir)]).scan_once() == len(files)  # recorded as imported...
    assert serve.app.store.profile_count() == len(files)  # ...but stored once
    assert serve.get("/api/profile", service="agent-e2e", type=CPU, **window)["total"] == cpu_before


def test_lock_wait_profiles_reach_serve_as_block_types(serve: Client, tmp_path: Path) -> None:
    # GIVEN an app whose threads wait for two contended locks, uploading to serve and storing locally
    store_dir = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MW_", "OTEL_"))}
    env.update(MW_PROFILING_SERVER_URL=serve.app.url)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "targets" / "lock_workloads.py"), "contention",
                           str(store_dir), "2"], capture_output=True, text=True, timeout=90, cwd=str(ROOT), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    truth = json.loads(proc.stdout)
    block = [p for p in (parse_pprof(f.read_bytes()) for f in sorted(store_dir.glob("locks-*.pb.gz")))
             if p.sample_types[0][0] == "contentions"]
    assert block
    # THEN serve lists the two block types under Pyroscope's ids, with the delay the agent stored
    types = serve.get("/api/profile_types", service="locks")["types"]
    delay, contentions = "block:delay:nanoseconds:contentions:count", "block:contentions:count:contentions:count"
    assert {delay, contentions} <= {t if isinstance(t, str) else t["id"] for t in types}, types
    info = {s["name"]: s for s in serve.get("/api/services")["services"]}["locks"]
    window = {"from": math.floor(info["first"]), "until": math.ceil(info["last"]) + 1}
    assert serve.get("/api/profile", service="locks", type=delay, **window)["total"] == sum(
        p.total("delay") for p in block)
    # AND the lock label says which lock was waited for
    sites = serve.get("/api/label_values", service="locks", name="lock")["values"]
    assert f"{truth['file']}:{truth['sites']['a']}" in sites, sites

