"""The native uploader under a failing backend: retries, backoff, Retry-After, rejections,
bounded memory, a submit that never blocks, recovery, and a stop that never hangs.

Timeouts and backoffs are shortened (tests/support/upload_native.py FAST) so every test is
bounded by a few seconds; all servers listen on 127.0.0.1.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from itertools import pairwise
from typing import Any

import pytest

from support.fake_backend import FakeBackend, Recorded, Response
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


def _recovers_and_delivers(backend: FakeBackend, bodies: list[bytes]) -> None:
    backend.healthy()
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    delivered = [r.body for r in backend.ingests() if r.answered == "200"]
    assert delivered == bodies  # every queued profile, in order, once
    s = stats()
    assert s["uploaded"] == len(bodies)
    assert_accounting(s)


@pytest.mark.parametrize("fault", ["refuse", "hang", "500", "503", "408", "429", "garbage"])
def test_retryable_faults_are_retried_and_profiles_delivered_on_recovery(backend, fault):
    # GIVEN a backend that fails in a retryable way
    {
        "refuse": backend.refuse,
        "hang": backend.hang,
        "garbage": backend.garbage,
    }.get(fault, lambda: backend.status(int(fault)))()
    start(backend.url, total_timeout_s=0.3)
    bodies = [payload(i) for i in range(3)]
    # WHEN profiles are submitted during the outage
    for i, b in enumerate(bodies):
        assert native.upload_submit(b, 100 + i, 110 + i)
    assert wait_until(lambda: stats()["failed_attempts"] >= 2 and stats()["retried"] >= 1)
    s = stats()
    assert s["uploaded"] == 0 and s["dropped_rejected"] == 0 and s["queued"] == 3
    assert s["last_status"] == (int(fault) if fault.isdigit() else 0)
    assert s["last_error_unix_s"] >= int(time.time()) - 60
    # THEN once it comes back, everything queued is delivered in order
    _recovers_and_delivers(backend, bodies)
    # and the outage was reported once when it began and once when it ended
    msgs = messages()
    assert [lvl for lvl, _ in msgs] == [logging.WARNING, logging.INFO], msgs
    assert "retrying" in msgs[0][1] and "recovered" in msgs[1][1]


def _first_two_attempts(backend: FakeBackend, answer: Response, **config: Any) -> tuple[Recorded, Recorded]:
    """One profile through a backend that gives ``answer`` once, then 200: the two attempts."""
    backend.script(answer)
    start(backend.url, **config)
    native.upload_submit(payload(0), 1, 2)
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    first, second = backend.ingests()
    return first, second


def test_retry_after_is_honoured(backend):
    # GIVEN one 429 with Retry-After: 1 (backoff_initial is 50 ms, backoff_max 5 s)
    first, second = _first_two_attempts(
        backend, Response(status=429, body=b"slow down", headers=(("Retry-After", "1"),)), backoff_max_s=5.0
    )
    # THEN the retry waited at least the announced second
    assert first.answered == "429" and second.answered == "200"
    assert second.t - first.t >= 0.95
    assert stats()["retried"] == 1


def test_without_retry_after_the_backoff_is_short(backend):
    # the counterpart of the test above: the delay there comes from Retry-After, not the backoff
    first, second = _first_two_attempts(backend, Response(status=503, body=b"busy"), backoff_max_s=5.0)
    assert 0.02 <= second.t - first.t < 0.5


def test_retry_after_is_capped_by_backoff_max(backend):
    first, second = _first_two_attempts(backend, Response(status=429, headers=(("Retry-After", "30"),)),
                                        backoff_max_s=0.3)
    assert 0.25 <= second.t - first.t < 1.5


def test_backoff_grows_exponentially_up_to_the_cap(backend):
    backend.status(500)
    start(backend.url, backoff_initial_s=0.05, backoff_max_s=0.4)
    native.upload_submit(payload(0), 1, 2)
    assert backend.wait_for(lambda b: len(b.ingests()) >= 7, timeout=5.0)
    native.upload_stop(0.0)
    t = [r.t for r in backend.ingests()]
    gaps = [b - a for a, b in pairwise(t)]
    # jitter keeps each delay within [d/2, d] of d = 0.05 * 2^k capped at 0.4
    for k, gap in enumerate(gaps[:6]):
        d = min(0.05 * 2**k, 0.4)
        assert d / 2 - 0.01 <= gap <= d + 0.15, (k, gaps)


@pytest.mark.parametrize("code", [400, 401, 403, 404, 413])
def test_rejections_are_not_retried_counted_and_reported_once(backend, code):
    backend.status(code, body=b"nope: invalid tenant")
    start(backend.url)
    for i in range(4):
        native.upload_submit(payload(i), i, i + 1)
    assert native.upload_flush(5.0) == 0
    assert len(backend.ingests()) == 4  # one attempt each, no retries
    s = stats()
    assert (s["dropped_rejected"], s["retried"], s["uploaded"], s["failed_attempts"], s["last_status"]) == (
        4, 0, 0, 4, code)
    msgs = messages()
    assert len(msgs) == 1  # ONE clear message, not one per interval
    level, text = msgs[0]
    assert level == logging.ERROR and f"HTTP {code}" in text and "nope: invalid tenant" in text
    # and the uploader keeps going: a later profile is delivered once the backend accepts it
    backend.healthy()
    native.upload_submit(payload(9), 9, 10)
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    assert stats()["uploaded"] == 1
    assert_accounting(stats())


def test_submit_never_blocks_while_the_backend_hangs(backend):
    backend.hang()
    start(backend.url, total_timeout_s=10.0, queue_max=8)
    body = payload(0)
    native.upload_submit(body, 0, 1)
    assert backend.wait_for(lambda b: len(b.ingests()) == 1)  # the uploader is stuck in a request
    t0 = time.perf_counter()
    for i in range(1000):
        native.upload_submit(body, i, i + 1)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.05, f"1000 submits took {elapsed * 1000:.1f} ms"
    s = stats()
    assert s["submitted"] == 1001 and s["queued"] == 8 and s["queue_high"] == 8
    assert s["dropped_queue_full"] == 1001 - 8
    native.upload_stop(0.2)


def test_queue_is_bounded_and_keeps_the_newest_profiles(backend):
    # GIVEN a backend that is down and a queue of 4
    backend.hang()
    start(backend.url, total_timeout_s=0.3, queue_max=4)
    native.upload_submit(payload(0), 0, 1)
    assert backend.wait_for(lambda b: len(b.ingests()) == 1)
    # WHEN far more intervals pass than the queue holds
    peak = 0
    for i in range(1, 200):
        native.upload_submit(payload(i), i, i + 1)
        peak = max(peak, stats()["queued"])
    # THEN memory stays bounded and the drops are counted
    s = stats()
    assert peak <= 4 and s["queue_high"] <= 4 and s["queued"] <= 4
    assert s["dropped_queue_full"] == 200 - s["queued"]
    # and on recovery the newest profiles are the ones delivered
    backend.healthy()
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    delivered = [int(r.q("from")) for r in backend.ingests() if r.answered == "200"]
    assert delivered[-3:] == [197, 198, 199]
    assert len(delivered) <= 4
    assert_accounting(stats())


@pytest.mark.parametrize("fault", ["hang", "refuse", "500"])
def test_stop_with_the_backend_down_returns_within_the_deadline(backend, fault):
    # GIVEN a dead backend, long libcurl timeouts and long backoffs
    getattr(backend, fault)() if fault != "500" else backend.status(500)
    start(backend.url, connect_timeout_s=10.0, total_timeout_s=30.0, backoff_initial_s=20.0, backoff_max_s=60.0)
    for i in range(5):
        native.upload_submit(payload(i), i, i + 1)
    assert wait_until(lambda: stats()["failed_attempts"] >= 1 or len(backend.ingests()) >= 1)
    # WHEN the app exits with a 0.5 s deadline
    t0 = time.monotonic()
    native.upload_stop(0.5)
    elapsed = time.monotonic() - t0
    # THEN stop returns on time (small slack), and the undelivered profiles are counted
    assert 0.4 <= elapsed < 0.5 + 0.3, elapsed
    assert not native.upload_running()
    s = stats()
    assert s["dropped_at_exit"] == 5 and s["uploaded"] == 0
    assert_accounting(s)


def test_stop_delivers_what_is_queued_when_the_backend_is_up(backend):
    start(backend.url)
    bodies = [payload(i) for i in range(10)]
    for i, b in enumerate(bodies):
        native.upload_submit(b, i, i + 1)
    native.upload_stop(5.0)
    assert [r.body for r in backend.ingests()] == bodies
    s = stats()
    assert s["uploaded"] == 10 and s["dropped_at_exit"] == 0


def test_stop_with_zero_deadline_drops_immediately(backend):
    backend.hang()
    start(backend.url, total_timeout_s=30.0)
    for i in range(3):
        native.upload_submit(payload(i), i, i + 1)
    assert backend.wait_for(lambda b: len(b.ingests()) == 1)
    t0 = time.monotonic()
    native.upload_stop(0.0)
    assert time.monotonic() - t0 < 0.2
    assert stats()["dropped_at_exit"] == 3


def test_flush_reports_what_is_still_pending(backend):
    backend.refuse()
    start(backend.url)
    for i in range(3):
        native.upload_submit(payload(i), i, i + 1)
    t0 = time.monotonic()
    assert native.upload_flush(0.3) == 3
    assert 0.25 <= time.monotonic() - t0 < 0.6
    native.upload_stop(0.0)


def test_outage_messages_are_not_repeated_per_attempt(backend):
    backend.status(500)
    start(backend.url, backoff_max_s=0.05)
    for i in range(5):
        native.upload_submit(payload(i), i, i + 1)
    assert wait_until(lambda: stats()["failed_attempts"] >= 10)
    native.upload_stop(0.0)
    msgs = messages()
    assert len(msgs) == 1 and msgs[0][0] == logging.WARNING and "HTTP 500" in msgs[0][1]


@pytest.mark.slow
def test_stress_concurrent_submits_while_the_backend_flips_states(backend):
    """Many submits from several threads while the backend flips between every state.

    Run under ASan by `make asan` (-k "... stress or upload"). Checks that nothing crashes, that
    every delivered body is one of the submitted payloads (no corruption, no use after free), that
    the queue never exceeds queue_max, and that every profile is accounted for exactly once.
    """
    queue_max = 6
    start(backend.url, queue_max=queue_max, total_timeout_s=0.15, connect_timeout_s=0.15,
          backoff_initial_s=0.005, backoff_max_s=0.03)
    bodies = [payload(i) for i in range(32)]
    known = set(bodies)
    seconds = min(max(float(os.environ.get("MW_STRESS_SECONDS") or 3.0), 1.0), 10.0)  # make asan: 10
    stop_at = time.monotonic() + seconds
    errors: list[BaseException] = []
    peak = [0]

    def submitter(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            n = 0
            while time.monotonic() < stop_at:
                native.upload_submit(rnd.choice(bodies), n, n + 1)
                n += 1
                if n % 50 == 0:
                    peak[0] = max(peak[0], native.upload_stats()["queued"])
                    native.upload_take_message()
                time.sleep(rnd.random() * 0.001)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    rnd = random.Random(1)
    flips = [backend.healthy, backend.hang, backend.refuse, backend.garbage,
             lambda: backend.status(500), lambda: backend.status(429, retry_after=0),
             lambda: backend.status(401)]
    while time.monotonic() < stop_at:
        rnd.choice(flips)()
        time.sleep(rnd.uniform(0.02, 0.08))
    for t in threads:
        t.join()
    assert not errors
    backend.healthy()
    native.upload_flush(3.0)
    native.upload_stop(2.0)

    s = stats()
    assert_accounting(s)
    assert s["submitted"] > 1000 and s["uploaded"] > 0
    assert peak[0] <= queue_max and s["queue_high"] <= queue_max
    answered_ok = [r for r in backend.ingests() if r.answered == "200"]
    assert all(r.body in known for r in backend.ingests())
    assert len(answered_ok) >= s["uploaded"]
