"""`serve` with memory profiles: the four Pyroscope memory types, amounts summed over a range and
snapshots (inuse_*) taken from each process's latest window, in merged profiles and timelines.

GIVEN two processes of service "shop" pushing memory profiles every 10 s: in process 1 `leak`
keeps 1 MiB more live in each window while `churn` allocates 50 MiB a window and keeps 64 KiB
live; process 2 pushes windows 0..2 only, with 2 MiB live in `cache`.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from middleware.profile import Profile, Sample
from middleware.serve import ServeApp, ServeConfig
from support.profiles import stack
from support.serve_http import api, ingest_pprof

pytestmark = pytest.mark.unit

T0 = 1_763_719_200
N = 6
MIB = 1 << 20
TYPES = [("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"), ("inuse_space", "bytes")]
INUSE = "memory:inuse_space:bytes:space:bytes"
ALLOC = "memory:alloc_space:bytes:space:bytes"


def window(pid: int, i: int) -> Profile:
    labels = (("pid", str(pid)), ("thread_name", "MainThread"))
    if pid == 1:
        samples = [
            Sample(stack("main;leak"), (1000, MIB, 1000 * (i + 1), MIB * (i + 1)), labels),
            Sample(stack("main;churn"), (50_000, 50 * MIB, 64, 64 * 1024), labels),
        ]
    else:
        samples = [Sample(stack("main;cache"), (10, 2 * MIB if i == 0 else 0, 10, 2 * MIB), labels)]
    return Profile(sample_types=list(TYPES), samples=samples, time_nanos=(T0 + 10 * i) * 10**9,
                   duration_nanos=10 * 10**9, period_type=("space", "bytes"), period=512 * 1024,
                   default_sample_type="inuse_space")


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    app = ServeApp(ServeConfig(port=0, data_dir=str(tmp_path_factory.mktemp("serve-memory")))).start()
    try:
        for i in range(N):
            for pid in (1, 2) if i < 3 else (1,):
                ingest_pprof(app, "shop", window(pid, i), T0 + 10 * i)
        yield app
    finally:
        app.stop()


def functions(doc: dict[str, Any]) -> dict[str, int]:
    return {f["name"]: f["self"] for f in doc["data"]["functions"] if f["self"]}


def test_the_four_memory_types_with_their_units(app: ServeApp) -> None:
    types = {t["id"]: t for t in api(app, "/api/profile_types", service="shop")["types"]}
    assert set(types) == {f"memory:{name}:{unit}:space:bytes" for name, unit in TYPES}
    assert types[INUSE]["unit"] == "bytes" and types["memory:alloc_objects:count:space:bytes"]["unit"] == "count"


def test_amounts_add_up_over_the_range_and_snapshots_are_the_latest_window(app: ServeApp) -> None:
    span = {"from": T0, "until": T0 + 10 * N}
    alloc = api(app, "/api/profile", service="shop", type=ALLOC, **span)
    assert functions(alloc) == {"leak": N * MIB, "churn": N * 50 * MIB, "cache": 2 * MIB}
    inuse = api(app, "/api/profile", service="shop", type=INUSE, **span)
    # process 1's last window (6 MiB leaked, 64 KiB of churn) and process 2's last one (window 2)
    assert functions(inuse) == {"leak": N * MIB, "churn": 64 * 1024, "cache": 2 * MIB}
    first_half = api(app, "/api/profile", service="shop", type=INUSE, **{"from": T0, "until": T0 + 30})
    assert functions(first_half) == {"leak": 3 * MIB, "churn": 64 * 1024, "cache": 2 * MIB}
    only_1 = api(app, "/api/profile", service="shop", type=INUSE, selector='{pid="1"}', **span)
    assert functions(only_1) == {"leak": N * MIB, "churn": 64 * 1024}


def test_snapshot_timeline_takes_the_latest_window_of_each_bucket(app: ServeApp) -> None:
    doc = api(app, "/api/timeline", service="shop", type=INUSE, step=20, **{"from": T0, "until": T0 + 10 * N})
    # buckets of two windows: windows 1, 3, 5 of process 1; windows 1 (bucket 0) and 2 of process 2
    want = [2 * MIB + 64 * 1024 + 2 * MIB, 4 * MIB + 64 * 1024 + 2 * MIB, 6 * MIB + 64 * 1024]
    assert [p["value"] for p in doc["points"]] == want
    alloc = api(app, "/api/timeline", service="shop", type=ALLOC, step=20, **{"from": T0, "until": T0 + 10 * N})
    assert [p["value"] for p in alloc["points"]] == [2 * 51 * MIB + 2 * MIB, 2 * 51 * MIB, 2 * 51 * MIB]
