"""Helpers for the uploader tests: the native module, fast settings, real pprof payloads."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from middleware.pprof import encode_pprof
from support.profiles import build

try:
    from middleware import _native
except ImportError as exc:  # pragma: no cover - the build is broken
    pytest.fail(f"middleware._native does not import ({exc}); run `make build`", pytrace=False)

native: Any = _native

# Short timeouts and backoffs so fault tests stay within a few seconds.
FAST: dict[str, Any] = dict(
    app_name="svc",
    spy_name="middleware-python",
    user_agent="middleware-python/test",
    sample_rate=100,
    queue_max=16,
    connect_timeout_s=0.5,
    total_timeout_s=1.0,
    backoff_initial_s=0.05,
    backoff_max_s=0.2,
)


def start(server_url: str | None, **overrides: Any) -> None:
    """Starts the uploader against ``server_url`` with FAST settings plus overrides."""
    kw = dict(FAST, server_url=server_url)
    kw.update(overrides)
    native.upload_start(**kw)


def payload(i: int) -> bytes:
    """A real gzipped pprof, different for every ``i`` (the stack names carry it)."""
    prof = build([(f"main;handle;work_{i}", 10_000_000 * (i % 7 + 1))], time_nanos=1_700_000_000_000_000_000 + i)
    return encode_pprof(prof)


def stats() -> dict[str, int]:
    return native.upload_stats()


def messages() -> list[tuple[int, str]]:
    out = []
    while (m := native.upload_take_message(with_level=True)) is not None:
        out.append(m)
    return out


def wait_until(pred: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def assert_accounting(s: dict[str, int]) -> None:
    """Once stopped, every submitted profile is delivered or dropped, and counted exactly once."""
    assert s["queued"] == 0
    assert s["submitted"] == s["uploaded"] + s["dropped_queue_full"] + s["dropped_rejected"] + s["dropped_at_exit"], s


@pytest.fixture(autouse=True)
def no_uploader_left() -> Iterator[None]:
    """Each test starts with no uploader running and must not leave one behind."""
    if native.upload_running():
        native.upload_stop(0.0)
    yield
    running = native.upload_running()
    if running:
        native.upload_stop(0.0)
    messages()
    assert not running, "the test left the uploader running"
