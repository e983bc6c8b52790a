"""`python -m middleware serve` under load (bounded, loopback only).

GIVEN `python -m middleware serve` running as its own process
WHEN 50 uploaders push back to back for 10 s (bench/serve_load.py does the 30 s run) while 4
threads query the timeline and merged profiles like the page
THEN every upload is answered 200, every accepted upload is stored (profile count and CPU total
per uploader match what it was acknowledged), and every query succeeds.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import serve_load  # noqa: E402

pytestmark = pytest.mark.slow

UPLOADERS = 50
DURATION_S = 10.0


@pytest.mark.asan
def test_concurrent_uploads_and_queries_lose_nothing() -> None:
    with serve_load.ServeProcess() as server:
        result = serve_load.run_load(server.url, uploaders=UPLOADERS, duration=DURATION_S, queriers=4)
    print(result.summary())
    assert result.problems == []
    assert result.lost == 0
    assert result.rejected == 0 and result.errors == 0
    # every uploader got through several times, and the UI queries kept working meanwhile
    assert result.accepted >= 3 * UPLOADERS
    assert result.queries > 0 and result.query_errors == 0


def test_paced_agents_see_low_latency() -> None:
    # 50 agents at one upload per 0.5 s each (20 x the real rate): no queueing, so every upload
    # is answered well within the agent's 30 s timeout
    with serve_load.ServeProcess() as server:
        result = serve_load.run_load(server.url, uploaders=UPLOADERS, duration=4.0, queriers=1, interval=0.5)
    print(result.summary())
    assert result.problems == [] and result.lost == 0 and result.errors == 0
    assert result.accepted >= 5 * UPLOADERS
    assert result.p99_ms < 5000
