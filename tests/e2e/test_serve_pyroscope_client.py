"""`python -m middleware serve` takes pushes from the official Pyroscope Python client.

GIVEN a serve started in-process on 127.0.0.1 (free port, temporary --data)
WHEN a child process profiled by the real ``pyroscope-io`` package (pinned in requirements.txt)
burns CPU in a known call chain and shuts the client down (which flushes its push)
THEN the push is accepted and stored under the application name, with the client's OTel-style
series labels (``otel.scope.name``...) under Pyroscope's sanitized names (``otel_scope_name``),
their values as sent, a CPU total within the workload's measured CPU/wall band, and the
workload's call chain among the stacks.

Also: the same label rules on the ``/ingest`` API (``name`` tags, pprof sample labels), what is
still refused (with a 400 saying why, storing nothing), the sanitizer's rules themselves, and
that the agent keeps exactly the label names serve takes as they are (one rule for both).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from middleware.pprof import encode_pprof, parse_pprof
from middleware.profile import Profile
from middleware.serve import ServeApp
from middleware.serve.ingest import LABEL_NAME_RE, _push_request_class
from middleware.serve.labels import (
    MAX_LABEL_NAME_LENGTH,
    MAX_LABEL_NAMES_PER_SERIES,
    MAX_LABEL_VALUE_LENGTH,
    LabelError,
    check_series_size,
    sanitize_label_name,
    sanitize_labels,
)
from support.processes import http_request
from support.profiles import build, calc_profile, sample
from support.serve_http import running_serve

CPU = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
T0_S = 1_763_719_200  # support.profiles.T0 in seconds
WORK_CPU_S = 1.2  # CPU seconds the child burns in its hot leaf

# The profiled child: a static call chain main -> pyro_middle -> pyro_hot_leaf that burns
# WORK_CPU_S of its own thread's CPU, then the client's shutdown (which pushes what it has).
CHILD = textwrap.dedent(
    """
    import importlib.metadata, json, platform, sys, time
    import pyroscope

    def pyro_hot_leaf(deadline):
        x = 0
        while time.thread_time() < deadline:
            for i in range(2000):
                x += i * i
        return x

    def pyro_middle(seconds):
        return pyro_hot_leaf(time.thread_time() + seconds)

    def main():
        url, app, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
        pyroscope.configure(application_name=app, server_address=url, sample_rate=100,
                            tags={"deploy.region": "eu-west.1", "team": "perf"})
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        pyro_middle(seconds)
        cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
        ok = pyroscope.shutdown()
        print(json.dumps({
            "cpu_s": cpu, "wall_s": wall, "shutdown_ok": bool(ok),
            "client_version": importlib.metadata.version("pyroscope-io"),
            "runtime_name": sys.implementation.name, "runtime_version": platform.python_version(),
        }))

    main()
    """
)


class Client:
    """A tiny HTTP client for one serve (a new connection per request)."""

    def __init__(self, app: ServeApp) -> None:
        self.app = app

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        return http_request(self.app.port, method, path, body, headers)

    def get_raw(self, path: str, **params: Any) -> bytes:
        status, data = self.request("GET", f"{path}?{urllib.parse.urlencode(params)}")
        assert status == 200, f"GET {path} -> {status}: {data[:300]!r}"
        return data

    def get(self, path: str, **params: Any) -> Any:
        return json.loads(self.get_raw(path, **params))

    def ingest(self, body: bytes, name: str, start_s: int = T0_S) -> tuple[int, str]:
        query = urllib.parse.urlencode({"name": name, "from": start_s, "until": start_s + 10, "format": "pprof"})
        status, data = self.request("POST", f"/ingest?{query}", body, {"Content-Type": "binary/octet-stream"})
        return status, data.decode("utf-8", "replace")

    def push(self, labels: list[tuple[str, str]], profile: Profile) -> tuple[int, str]:
        req = _push_request_class()()
        series = req.series.add()
        for k, v in labels:
            series.labels.add(name=k, value=v)
        series.samples.add(raw_profile=encode_pprof(profile))
        status, data = self.request(
            "POST", "/push.v1.PusherService/Push", req.SerializeToString(), {"Content-Type": "application/proto"}
        )
        return status, data.decode("utf-8", "replace")

    def label_values(self, service: str) -> dict[str, list[str]]:
        names = self.get("/api/label_names", service=service)["names"]
        return {n: self.get("/api/label_values", service=service, name=n)["values"] for n in names}


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Client]:
    with running_serve(tmp_path / "data", host="127.0.0.1") as app:
        yield Client(app)


def _stack_names(s: Any) -> list[str]:
    return [f.function for f in s.stack]


# ------------------------------------------------------------------------------------------------
# the real client
# ------------------------------------------------------------------------------------------------
def test_pyroscope_io_push_is_stored_with_sanitized_labels(serve: Client, tmp_path: Path) -> None:
    # GIVEN a child profiled by pyroscope-io, pushing to serve
    script = tmp_path / "pyro_child.py"
    script.write_text(CHILD)
    before_ns = time.time_ns()
    proc = subprocess.run(
        [sys.executable, str(script), serve.app.url, "pyro-client-app", str(WORK_CPU_S)],
        capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    truth = json.loads(proc.stdout.strip().splitlines()[-1])
    assert truth["shutdown_ok"], proc.stderr[-3000:]
    assert truth["cpu_s"] >= WORK_CPU_S

    # THEN every push was accepted (none refused) and the app is a service with a CPU profile
    assert serve.app.rejected == 0
    assert serve.app.accepted >= 1
    services = {s["name"]: s for s in serve.get("/api/services")["services"]}
    assert "pyro-client-app" in services, services
    assert CPU in services["pyro-client-app"]["types"]

    # AND its series labels are stored under sanitized names, values exactly as the client sent
    labels = serve.label_values("pyro-client-app")
    assert all(LABEL_NAME_RE.match(n) and "." not in n for n in labels), sorted(labels)
    assert labels["process_runtime_name"] == [truth["runtime_name"]]
    assert labels["process_runtime_version"] == [truth["runtime_version"]]
    assert labels["otel_scope_version"] == [truth["client_version"]]
    assert len(labels["otel_scope_name"]) == 1 and "pyroscope" in labels["otel_scope_name"][0]
    assert labels["deploy_region"] == ["eu-west.1"]  # a dotted tag name, its dotted value kept
    assert labels["team"] == ["perf"]
    assert labels["service_name"] == ["pyro-client-app"]

    # AND the stored profile holds the workload: CPU within what the child's thread measured
    # (>= half its CPU time, <= its wall time plus a margin: a 100 Hz sampler cannot see more)
    window = {"from": before_ns // 10**9 - 60, "until": time.time_ns() // 10**9 + 60}
    doc = serve.get("/api/profile", service="pyro-client-app", type=CPU, **window)
    total_s = doc["total"] / 1e9
    assert 0.5 * truth["cpu_s"] <= total_s <= 1.25 * truth["wall_s"] + 0.2, (total_s, truth)
    # selecting on a sanitized label name finds all of it
    for name in ("otel_scope_name", "deploy_region"):
        sel = f'{{{name}="{labels[name][0]}"}}'
        assert (
            serve.get("/api/profile", service="pyro-client-app", type=CPU, selector=sel, **window)["total"]
            == doc["total"]
        )

    # AND the stacks are the workload's: the hot leaf, called by pyro_middle, is most of the CPU
    merged = parse_pprof(serve.get_raw("/api/pprof", service="pyro-client-app", type=CPU, **window))
    cpu_index = merged.value_index("cpu")
    total = sum(s.values[cpu_index] for s in merged.samples)
    in_leaf = [s for s in merged.samples if "pyro_hot_leaf" in _stack_names(s)]
    leaf_cpu = sum(s.values[cpu_index] for s in in_leaf)
    assert total > 0 and leaf_cpu / total >= 0.8, [(_stack_names(s), s.values) for s in merged.samples][:10]
    # the static call graph: pyro_hot_leaf is only ever called by pyro_middle, itself by main
    chained = 0
    for s in in_leaf:
        names = _stack_names(s)
        i = names.index("pyro_hot_leaf")
        if i >= 2 and names[i - 1] == "pyro_middle" and names[i - 2] == "main":
            chained += s.values[cpu_index]
    assert chained / leaf_cpu >= 0.95, [_stack_names(s) for s in in_leaf][:10]


# ------------------------------------------------------------------------------------------------
# the same rules on /ingest and the push API, with profiles built here
# ------------------------------------------------------------------------------------------------
def test_ingest_sanitizes_dotted_tags_and_sample_labels(serve: Client) -> None:
    # GIVEN a profile whose samples carry dotted label names (one also has a span id)
    profile = calc_profile()
    profile.samples.append(sample("main;traced", 70_000_000, labels={"http.route": "/t.x", "span_id": "ab12"}))
    # WHEN it is uploaded with dotted tag names in 'name'
    status, text = serve.ingest(encode_pprof(profile), "dotted{deploy.env=prod.eu,k8s.pod.name=web-1}")
    assert status == 200, text
    # THEN names are sanitized, values untouched, and selectors on them give the right subsets
    labels = serve.label_values("dotted")
    assert labels["deploy_env"] == ["prod.eu"] and labels["k8s_pod_name"] == ["web-1"]
    assert labels["http_route"] == ["/t.x"]
    assert not any("." in n for n in labels)
    window = {"from": T0_S - 60, "until": T0_S + 60}
    got = serve.get("/api/profile", service="dotted", type=CPU, selector='{http_route="/t.x"}', **window)["total"]
    assert got == 70_000_000
    assert serve.get("/api/profile", service="dotted", type=CPU, selector='{deploy_env="prod.eu"}', **window)[
        "total"
    ] == profile.total("cpu")


def test_push_labels_that_meet_after_sanitizing_with_one_value_are_one_label(serve: Client) -> None:
    profile = calc_profile()
    status, text = serve.push(
        [("service_name", "meet"), ("__name__", "process_cpu"), ("a.b", "1"), ("a_b", "1")], profile
    )
    assert status == 200, text
    assert serve.label_values("meet")["a_b"] == ["1"]
    window = {"from": T0_S - 60, "until": T0_S + 60}
    assert serve.get("/api/profile", service="meet", type=CPU, **window)["total"] == profile.total("cpu")


def _many(n: int) -> str:
    return ",".join(f"t{i}.x=v" for i in range(n))


ROOM = MAX_LABEL_NAMES_PER_SERIES - 2  # besides service_name and __name__


@pytest.mark.parametrize(
    "name, message",
    [
        ("svc{bad-name=1}", "bad label name 'bad-name'"),
        ("svc{=1}", "bad label name ''"),
        ("svc{9lives=1}", "bad label name '9lives'"),
        ("svc{a.b=1,a_b=2}", "both become 'a_b'"),
        ("svc{..x=1}", "reserved"),
        ("svc{service.name=x}", "reserved"),
        ("svc{%s=1}" % ("n" * (MAX_LABEL_NAME_LENGTH + 1)), f"longer than {MAX_LABEL_NAME_LENGTH}"),
        (f"svc{{v={'x' * (MAX_LABEL_VALUE_LENGTH + 1)}}}", f"longer than {MAX_LABEL_VALUE_LENGTH}"),
        (f"svc{{{_many(ROOM + 1)}}}", f"limit {MAX_LABEL_NAMES_PER_SERIES}"),
    ],
    ids=["dash", "empty", "leading-digit", "collision", "reserved-after-dots", "service-name-dotted",
         "long-name", "long-value", "too-many"],
)
def test_ingest_still_refuses_what_pyroscope_refuses(serve: Client, name: str, message: str) -> None:
    unlabelled = build([sample("main;work", 10_000_000)])  # no sample labels: the tags alone count
    status, text = serve.ingest(encode_pprof(unlabelled), name)
    assert status == 400 and message in text, (status, text)
    assert serve.app.store.profile_count() == 0


def test_labels_exactly_at_the_limits_are_accepted(serve: Client) -> None:
    names = [
        "svc{%s=1}" % ("n" * MAX_LABEL_NAME_LENGTH),
        f"svc{{v={'x' * MAX_LABEL_VALUE_LENGTH}}}",
        f"svc{{{_many(ROOM)}}}",
    ]
    for i, name in enumerate(names):
        unlabelled = build([sample("main;work", 10_000_000)])  # no sample labels: the tags alone count
        status, text = serve.ingest(encode_pprof(unlabelled), name, start_s=T0_S + 10 * i)
        assert status == 200, text
    assert serve.app.store.profile_count() == len(names)


def test_too_many_labels_counts_sample_labels_too(serve: Client) -> None:
    # tags fill the room but one; two sample labels on top exceed it
    tags = _many(ROOM - 1)
    fits = build([sample("main;a", 10_000_000, labels={"endpoint": "/a"})])
    over = build([sample("main;a", 10_000_000, labels={"endpoint": "/a", "user.tier": "gold"})])
    assert serve.ingest(encode_pprof(fits), f"svc{{{tags}}}")[0] == 200
    status, text = serve.ingest(encode_pprof(over), f"svc{{{tags}}}", start_s=T0_S + 10)
    assert status == 400 and f"limit {MAX_LABEL_NAMES_PER_SERIES}" in text, text
    assert serve.app.store.profile_count() == 1


@pytest.mark.parametrize(
    "labels, message",
    [
        ([("service_name", "p"), ("bad-name", "x")], "bad label name 'bad-name'"),
        ([("service_name", "p"), ("a.b", "1"), ("a_b", "2")], "both become 'a_b'"),
        ([("service_name", "p"), ("service.name", "q")], "second, different service name"),
        ([("service_name", "p"), ("", "x")], "bad label name ''"),
        ([("service_name", "p")] + [(f"l.{i}", "v") for i in range(ROOM + 1)], f"limit {MAX_LABEL_NAMES_PER_SERIES}"),
    ],
    ids=["dash", "collision", "two-services", "empty", "too-many"],
)
def test_push_still_refuses_what_pyroscope_refuses(serve: Client, labels: list[tuple[str, str]], message: str) -> None:
    status, text = serve.push(labels, calc_profile())
    assert status == 400, text
    assert json.loads(text)["code"] == "invalid_argument" and message in json.loads(text)["message"], text
    assert serve.app.store.profile_count() == 0


def test_pprof_sample_label_with_a_dash_is_still_refused(serve: Client) -> None:
    body = encode_pprof(build([sample("main", 10, labels={"bad-name": "x"})]))
    status, text = serve.ingest(body, "svc")
    assert status == 400 and "bad label name 'bad-name'" in text
    assert serve.app.store.profile_count() == 0


# ------------------------------------------------------------------------------------------------
# the sanitizer's rules
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, want",
    [
        ("otel.scope.name", "otel_scope_name"),
        ("process.runtime.version", "process_runtime_version"),
        (".a", "_a"),
        ("a.", "a_"),
        ("a.b.c", "a_b_c"),
        ("A9_b", "A9_b"),
        ("_x", "_x"),
        ("a9.9", "a9_9"),
        ("n" * MAX_LABEL_NAME_LENGTH, "n" * MAX_LABEL_NAME_LENGTH),
    ],
)
def test_sanitize_label_name_replaces_dots_only(raw: str, want: str) -> None:
    got = sanitize_label_name(raw)
    assert got == want
    assert LABEL_NAME_RE.match(got)


@pytest.mark.parametrize(
    "raw, message",
    [
        ("", "must not be empty"),
        ("9lives", "must match"),
        ("bad-name", "must match"),
        ("a b", "must match"),
        ("a/b", "must match"),
        ("ключ", "must match"),
        ("é.x", "must match"),
        ("__name__", "reserved"),
        ("..", "reserved"),
        ("._x", "reserved"),
        ("n" * (MAX_LABEL_NAME_LENGTH + 1), "longer than"),
    ],
)
def test_sanitize_label_name_refuses_what_pyroscope_refuses(raw: str, message: str) -> None:
    with pytest.raises(LabelError, match=message):
        sanitize_label_name(raw)


def test_sanitize_labels_merges_equal_values_refuses_conflicts_and_keeps_values() -> None:
    values = ["prod.eu", "with space", "ünïcode", "", "x" * MAX_LABEL_VALUE_LENGTH]
    got = sanitize_labels([(f"k.{i}", v) for i, v in enumerate(values)])
    assert got == tuple(sorted((f"k_{i}", v) for i, v in enumerate(values)))
    assert sanitize_labels([("a.b", "1"), ("a_b", "1"), ("c", "2")]) == (("a_b", "1"), ("c", "2"))
    with pytest.raises(LabelError, match="both become 'a_b'"):
        sanitize_labels([("a_b", "1"), ("a.b", "2")])
    with pytest.raises(LabelError, match="repeated"):
        sanitize_labels([("a", "1"), ("a", "1")])
    with pytest.raises(LabelError, match=f"longer than {MAX_LABEL_VALUE_LENGTH}"):
        sanitize_labels([("a", "x" * (MAX_LABEL_VALUE_LENGTH + 1))])


def test_series_size_counts_service_name_and_profile_type() -> None:
    room = tuple((f"l{i}", "v") for i in range(MAX_LABEL_NAMES_PER_SERIES - 2))
    check_series_size(room)
    with pytest.raises(LabelError, match=f"limit {MAX_LABEL_NAMES_PER_SERIES}"):
        check_series_size(room + (("one_more", "v"),))


# ------------------------------------------------------------------------------------------------
# one label-name rule for the agent and serve
# ------------------------------------------------------------------------------------------------
AGENT_NAMES = [
    "endpoint", "_x", "A9_b", "n" * MAX_LABEL_NAME_LENGTH,  # label names
    "", "9lives", "bad-name", "a b", "ключ", "__name__", "__x",  # not label names
    "n" * (MAX_LABEL_NAME_LENGTH + 1),
]


@pytest.mark.parametrize("name", AGENT_NAMES, ids=lambda n: n[:12] or "empty")
def test_the_agent_keeps_exactly_the_label_names_serve_stores_as_sent(
    name: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import middleware.labels as agent

    # (a fresh process's state: nothing merged, no name warned about yet)
    monkeypatch.setattr(agent, "_merge_cache", {})
    monkeypatch.setattr(agent, "_warned_names", set())
    # GIVEN a label name without dots (serve's one rewrite), WHEN the agent pushes a label of
    # that name and serve receives it
    with caplog.at_level("WARNING", logger="middleware.labels"):
        with agent.labels(**{name: "v"}, kept_too="v"):
            active = agent.current_labels()
    try:
        served = sanitize_label_name(name) == name
    except LabelError:
        served = False
    # THEN both follow the one rule: the agent keeps the label exactly when serve takes the name
    # as it is, the rest of the label set is kept, and a dropped name is said in the log
    rule = agent.label_name_problem(name) is None
    assert (name in active) == served == rule, (name[:40], sorted(active)[:3], served, rule)
    assert active["kept_too"] == "v"
    warned = [r for r in caplog.records if "bad label name" in r.getMessage()]
    assert len(warned) == (0 if rule else 1), [r.getMessage()[:120] for r in warned]


def test_a_dotted_name_is_sanitized_by_serve_and_refused_by_the_agent() -> None:
    from middleware.labels import current_labels, labels

    # GIVEN an OTel-style dotted name: the agent never sends one, serve stores it with '_'
    with labels(**{"otel.scope.name": "v"}):
        assert "otel.scope.name" not in current_labels()
    assert sanitize_label_name("otel.scope.name") == "otel_scope_name"
