"""`python -m middleware serve`: the JSON query API the page uses.

GIVEN a serve holding a known series of uploads: service "shop" every 10 s for 10 minutes, where
calc3 appears only in the second half and only under endpoint=/calculate2, plus service "other"
WHEN the page's queries run (services, types, labels, timeline, merged profile, sandwich, diff,
pprof download)
THEN every number equals what the uploads contained, computed independently here from the
profiles that were pushed.
"""
from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator

import pytest

from middleware.pprof import parse_pprof
from middleware.profile import Profile
from middleware.reporters.sandwich import sandwich
from middleware.reporters.table import function_table
from middleware.serve import ServeApp, ServeConfig
from middleware.serve.query import QueryError, parse_selector
from support.profiles import build, sample
from support.serve_http import Api, ingest_pprof

pytestmark = pytest.mark.unit

CPU = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
WALL = "wall:wall:nanoseconds:wall:nanoseconds"
T0 = 1_763_719_200  # seconds
N = 60  # uploads of 10 s
MS = 1_000_000


def upload_profile(i: int) -> Profile:
    """Upload i: calc1/calc2 always; calc3 (under /calculate2, release=v2) from upload 30 on, growing."""
    samples = [
        sample("main;handle;efficient;calc1", (10 + i) * MS, 20 * MS, {"endpoint": "/calculate1", "thread_name": "w1"}),
        sample("main;handle;efficient;calc2", 15 * MS, 25 * MS, {"endpoint": "/calculate1", "thread_name": "w2"}),
        sample("main;handle;with_bottleneck;calc1", 5 * MS, 5 * MS, {"endpoint": "/calculate2", "thread_name": "w1"}),
    ]
    if i >= 30:
        samples.append(
            sample(
                "main;handle;with_bottleneck;calc3", (100 + 3 * i) * MS, 200 * MS,
                {"endpoint": "/calculate2", "thread_name": "w2", "release": "v2"},
            )
        )
    return build(samples, time_nanos=(T0 + 10 * i) * 10**9, duration_nanos=10 * 10**9)


PROFILES = [upload_profile(i) for i in range(N)]


def merged(indices: range | list[int], labels: dict[str, str] | None = None) -> Profile:
    p = Profile.merge_all([PROFILES[i] for i in indices])
    return p.filter(labels=labels) if labels else p


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    data = tmp_path_factory.mktemp("serve-query")
    app = ServeApp(ServeConfig(port=0, data_dir=str(data))).start()
    try:
        for i, p in enumerate(PROFILES):
            ingest_pprof(app, "shop{env=prod}", p, T0 + 10 * i, sampleRate=100)
        ingest_pprof(app, "other", build([sample("main;x", 7 * MS)], time_nanos=T0 * 10**9), T0, sampleRate=100)
        yield Api(app)
    finally:
        app.stop()


def rng(a: int, b: int) -> dict[str, int]:
    """Query range covering uploads a..b-1."""
    return {"from": T0 + 10 * a, "until": T0 + 10 * b}


# ------------------------------------------------------------------------------------------------
def test_catalogue(api: Api) -> None:
    services = api("/api/services")["services"]
    assert [(s["name"], s["profiles"]) for s in services] == [("other", 1), ("shop", N)]
    shop = services[1]
    assert shop["first"] == T0 and shop["last"] == T0 + 10 * N
    types = api("/api/profile_types", service="shop")["types"]
    assert {t["id"] for t in types} == {CPU, WALL, "process_cpu:samples:count:cpu:nanoseconds"}
    cpu = next(t for t in types if t["id"] == CPU)
    assert (cpu["name"], cpu["sample_type"], cpu["unit"]) == ("process_cpu", "cpu", "nanoseconds")
    assert api("/api/label_names", service="shop")["names"] == [
        "endpoint",
        "env",
        "release",
        "service_name",
        "thread_name",
    ]
    assert api("/api/label_values", service="shop", name="endpoint")["values"] == ["/calculate1", "/calculate2"]
    assert api("/api/label_values", service="shop", name="service_name")["values"] == ["shop"]
    assert api("/api/label_values", service="other", name="endpoint")["values"] == []


def test_labels_follow_the_time_range(api: Api) -> None:
    # the release label (on calc3's samples) exists only from upload 30 on
    early = api("/api/label_names", service="shop", type=CPU, **rng(0, 30))["names"]
    late = api("/api/label_names", service="shop", type=CPU, **rng(30, N))["names"]
    assert "release" not in early and "release" in late
    assert api("/api/label_values", service="shop", name="release", **rng(0, 30))["values"] == []
    assert api("/api/label_values", service="shop", name="release", **rng(29, 31))["values"] == ["v2"]
    nothing = api("/api/label_values", service="shop", name="endpoint", **{"from": T0 - 1000, "until": T0 - 500})
    assert nothing["values"] == []


def test_timeline_totals_per_bucket(api: Api) -> None:
    doc = api("/api/timeline", service="shop", type=CPU, step=60, **rng(0, N))
    assert doc["step"] == 60
    points = doc["points"]
    assert len(points) == N // 6
    for b, point in enumerate(points):
        assert point["t"] == T0 + 60 * b
        want = sum(PROFILES[i].total("cpu") for i in range(6 * b, 6 * b + 6))
        assert point["value"] == want, b
        assert point["profiles"] == 6
    assert doc["total"] == merged(range(N)).total("cpu")
    # with a label selector the buckets hold only that label's values
    doc = api("/api/timeline", service="shop", type=CPU, step=60, selector='{endpoint="/calculate2"}', **rng(0, N))
    for b, point in enumerate(doc["points"]):
        want = sum(PROFILES[i].filter(labels={"endpoint": "/calculate2"}).total("cpu") for i in range(6 * b, 6 * b + 6))
        assert point["value"] == want
    # default step: at least 10 s, zero-filled outside the data
    doc = api("/api/timeline", service="shop", type=WALL, **{"from": T0 - 600, "until": T0 + 10 * N + 600})
    assert doc["step"] >= 10 and sum(p["value"] for p in doc["points"]) == merged(range(N)).total("wall")
    assert doc["points"][0]["value"] == 0 and doc["points"][-1]["value"] == 0


@pytest.mark.parametrize(
    "a, b, selector, labels",
    [
        (0, N, "{}", None),
        (0, 30, "{}", None),
        (30, 45, '{endpoint="/calculate2"}', {"endpoint": "/calculate2"}),
        (10, 50, '{thread_name="w2",env="prod"}', {"thread_name": "w2"}),
        (0, N, '{endpoint!="/calculate2"}', {"endpoint": "/calculate1"}),
    ],
)
def test_merged_profile_equals_the_pushed_profiles(
    api: Api, a: int, b: int, selector: str, labels: dict[str, str] | None
) -> None:
    doc = api("/api/profile", service="shop", type=CPU, selector=selector, **rng(a, b))
    want = merged(range(a, b), labels)
    assert doc["profiles"] == b - a
    assert doc["total"] == want.total("cpu") == doc["data"]["total"]
    got = {(f["name"], f["file"]): (f["self"], f["total"]) for f in doc["data"]["functions"]}
    assert got == {r.key: (r.self_value, r.total_value) for r in function_table(want, "cpu")}
    # the flame tree's root children (main) carry the whole total
    assert sum(child["v"] for child in doc["data"]["tree"]["c"]) == want.total("cpu")


def test_calc3_is_on_top_only_in_the_second_half(api: Api) -> None:
    first = api("/api/profile", service="shop", type=CPU, **rng(0, 30))["data"]["functions"]
    assert "calc3" not in [f["name"] for f in first]
    second = api("/api/profile", service="shop", type=CPU, **rng(30, N))["data"]["functions"]
    assert second[0]["name"] == "calc3"


def test_sandwich(api: Api) -> None:
    doc = api("/api/sandwich", service="shop", type=CPU, function="calc1", **rng(0, N))
    want = sandwich(merged(range(N)), "calc1", "cpu")
    assert (doc["self"], doc["total"], doc["profile_total"]) == (want.self_value, want.total_value, want.profile_total)
    assert {c["function"]: c["value"] for c in doc["callers"]} == {r.function: r.value for r in want.callers}
    assert doc["callees"] == []
    assert {c["function"] for c in doc["callers"]} == {"efficient", "with_bottleneck"}
    status, data = api.raw("/api/sandwich", service="shop", type=CPU, function="nosuchfunction", **rng(0, N))
    assert status == 404 and b"no function" in data


def test_diff_of_two_time_ranges(api: Api) -> None:
    doc = api("/api/diff", service="shop", type=CPU, **rng(0, 30), from2=T0 + 300, until2=T0 + 600)
    a, b = merged(range(0, 30)), merged(range(30, N))
    assert doc["base"]["total"] == a.total("cpu") and doc["comparison"]["total"] == b.total("cpu")
    rows = {r["function"]: r for r in doc["functions"]}
    self_b = {r.function: r.self_value for r in function_table(b, "cpu")}
    assert rows["calc3"]["self_a"] == 0 and rows["calc3"]["self_b"] == self_b["calc3"] > 0
    assert rows["calc3"]["change"] == pytest.approx(100.0 * rows["calc3"]["self_b"] / b.total("cpu"))
    # calc3 grew the most; calc1 and calc2 lost share
    grew = max(doc["functions"], key=lambda r: r["change"])
    assert grew["function"] == "calc3"
    assert rows["calc2"]["change"] < 0 and rows["calc1"]["change"] < 0


def test_diff_of_two_label_values(api: Api) -> None:
    doc = api(
        "/api/diff", service="shop", type=CPU, **rng(0, N),
        selector='{endpoint="/calculate1"}', selector2='{endpoint="/calculate2"}',
    )
    a = merged(range(N), {"endpoint": "/calculate1"})
    b = merged(range(N), {"endpoint": "/calculate2"})
    assert doc["base"]["total"] == a.total("cpu") and doc["comparison"]["total"] == b.total("cpu")
    rows = {r["function"]: r for r in doc["functions"]}
    self_a = {r.function: r.self_value for r in function_table(a, "cpu")}
    self_b = {r.function: r.self_value for r in function_table(b, "cpu")}
    assert rows["calc3"]["self_a"] == 0 and rows["calc3"]["self_b"] == self_b["calc3"] > 0
    assert rows["calc2"]["self_b"] == 0 and rows["calc2"]["self_a"] == self_a["calc2"] > 0
    for r in doc["functions"]:
        assert r["change"] == pytest.approx(r["self_share_b"] - r["self_share_a"])
    status, _ = api.raw("/api/diff", service="shop", type=CPU, service2="other", **rng(0, N))
    assert status == 400


def test_pprof_download_is_the_merged_profile(api: Api) -> None:
    status, data = api.raw("/api/pprof", service="shop", type=WALL, selector='{thread_name="w1"}', **rng(5, 25))
    assert status == 200
    got = parse_pprof(gzip.decompress(data))
    want = merged(range(5, 25), {"thread_name": "w1"})
    assert got.sample_types == [("wall", "nanoseconds")]
    assert got.total("wall") == want.total("wall")
    assert {r.key: r.self_value for r in function_table(got, "wall")} == {
        r.key: r.self_value for r in function_table(want, "wall")
    }


def test_concurrent_queries_agree(api: Api) -> None:
    want = merged(range(N)).total("cpu")
    errors: list[BaseException] = []
    results: list[int] = []

    def worker() -> None:
        try:
            for _ in range(5):
                results.append(api("/api/profile", service="shop", type=CPU, **rng(0, N))["total"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [want] * 40


def test_selector_parsing() -> None:
    ms = parse_selector('{a="x", b!="y\\"z", c=~"v.*",d!~"w"}')
    assert [(m.name, m.op, m.value) for m in ms] == [
        ("a", "=", "x"),
        ("b", "!=", 'y"z'),
        ("c", "=~", "v.*"),
        ("d", "!~", "w"),
    ]
    assert parse_selector("{}") == () and parse_selector("") == ()
    assert ms[2].matches({"c": "vvv"}) and not ms[2].matches({"c": "xv"})
    assert ms[1].matches({}) and not parse_selector('{a="x"}')[0].matches({})
    for bad in ('{a="x"', "{a=x}", '{a="x" b="y"}', '{1a="x"}', '{trace_id="1"}'):
        with pytest.raises(QueryError):
            parse_selector(bad)
