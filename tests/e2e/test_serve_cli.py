"""`python -m middleware serve` options for its limits: --max-series-per-upload,
--max-series-per-service, --request-timeout, --max-connections.

GIVEN the command run as a user runs it (a child process on a free loopback port)
WHEN an option has a bad value
THEN it refuses to start: exit status 2, the option and the value named, no traceback, nothing
listening
WHEN the options are given (and the environment variables set to other values)
THEN the options are the limits in force — uploads over the per-upload cap get 400, series past
the per-service cap go to the overflow series, an idle connection is closed after the timeout, a
connection beyond the cap evicts an idle one — and /api/stats shows them; without the options
the environment variables are.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from middleware.pprof import encode_pprof
from middleware.profile import Profile
from support.profiles import build, sample

ROOT = Path(__file__).resolve().parents[2]
ENV_VARS = ("MW_SERVE_MAX_SERIES_PER_UPLOAD", "MW_SERVE_MAX_SERIES_PER_SERVICE", "MW_SERVE_REQUEST_TIMEOUT",
            "MW_SERVE_MAX_CONNECTIONS")
T0_S = 1_763_719_200


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS and k != "MW_SERVE_TOKEN"}
    env.update(extra)
    return env


def _serve_cmd(tmp_path: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "middleware", "serve", "--port", "0", "--data", str(tmp_path / "data"),
            "--no-store-import", *options]


BAD = [
    ("--max-series-per-upload", "0"),
    ("--max-series-per-upload", "many"),
    ("--max-series-per-service", "-5"),
    ("--max-series-per-service", "1.5"),
    ("--request-timeout", "0"),
    ("--request-timeout", "nan"),
    ("--request-timeout", "1e9"),
    ("--max-connections", "0"),
    ("--max-connections", "100001"),
]


@pytest.mark.parametrize("option,value", BAD, ids=[f"{o}={v}" for o, v in BAD])
def test_bad_values_are_refused_with_status_2(tmp_path: Path, option: str, value: str) -> None:
    proc = subprocess.run(_serve_cmd(tmp_path, option, value), capture_output=True, text=True, timeout=60,
                          cwd=str(ROOT), env=_env())
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""  # never started listening
    error = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and f"argument {option}: expected" in error[0] and repr(value) in error[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()


class Serve:
    """The command in a child process; its port from the line it prints."""

    def __init__(self, tmp_path: Path, *options: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(_serve_cmd(tmp_path, *options), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=str(ROOT), env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, (line, self.proc.stderr.read() if self.proc.stderr else "")
        self.port = int(line.split("http://127.0.0.1:")[1].split()[0].rstrip(")"))

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "binary/octet-stream"} if body else {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def ingest(self, profile: Profile, name: str) -> tuple[int, str]:
        status, data = self.request("POST", "/ingest?" + urllib.parse.urlencode({"name": name}), encode_pprof(profile))
        return status, data.decode("utf-8", "replace")

    def stats(self) -> dict[str, Any]:
        status, data = self.request("GET", "/api/stats")
        assert status == 200
        return json.loads(data)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Serve]:
    # the environment says otherwise: the options win
    env = _env(MW_SERVE_MAX_SERIES_PER_UPLOAD="100", MW_SERVE_MAX_SERIES_PER_SERVICE="100",
               MW_SERVE_REQUEST_TIMEOUT="60", MW_SERVE_MAX_CONNECTIONS="100")
    s = Serve(tmp_path, "--max-series-per-upload", "4", "--max-series-per-service", "6", "--request-timeout", "2",
              "--max-connections", "3", env=env)
    try:
        yield s
    finally:
        s.stop()


def users(first: int, count: int, at_s: int) -> Profile:
    """``count`` samples, each its own series (user=u<i>), 1 ms of CPU each."""
    return build([sample("main;handle", 1_000_000, labels={"user": f"u{i}"}) for i in range(first, first + count)],
                 time_nanos=at_s * 10**9)


def test_options_are_the_limits_in_force(served: Serve) -> None:
    stats = served.stats()
    assert stats["connections"]["max"] == 3 and stats["series_overflow"]["limit_per_service"] == 6, stats
    # one label set over the per-upload cap: 400 naming the limit, nothing stored
    status, text = served.ingest(users(0, 5, T0_S), "svc")
    assert status == 400 and "limit 4" in text, text
    # 4 + 4 new label sets against a cap of 6 series: the last 2 go to the overflow series
    status, text = served.ingest(users(0, 4, T0_S), "svc")
    assert status == 200 and "series_overflow" not in json.loads(text), text
    status, text = served.ingest(users(4, 4, T0_S + 10), "svc")
    assert status == 200, text
    assert json.loads(text)["series_overflow"] == {"series": 2, "samples": 2, "limit": 6}, text
    assert served.stats()["series_overflow"]["samples"] == 2


def test_request_timeout_and_max_connections_options(served: Serve) -> None:
    # an idle connection is closed after --request-timeout 2 s (the environment said 60)
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as idle:
        t0 = time.monotonic()
        assert idle.recv(1) == b""
        waited = time.monotonic() - t0
    assert 1.8 <= waited <= 8.0, waited
    # three idle connections fill --max-connections 3: a request on a fourth evicts one of them
    idle_conns = [socket.create_connection(("127.0.0.1", served.port), timeout=10) for _ in range(3)]
    try:
        stats = served.stats()  # (the request's own connection is the fourth)
        assert stats["connections"]["evicted"] >= 1 and stats["connections"]["open"] <= 3, stats
    finally:
        for c in idle_conns:
            c.close()


def test_without_options_the_environment_sets_the_limits(tmp_path: Path) -> None:
    env = _env(MW_SERVE_MAX_SERIES_PER_UPLOAD="2", MW_SERVE_MAX_SERIES_PER_SERVICE="9",
               MW_SERVE_MAX_CONNECTIONS="5")
    s = Serve(tmp_path, env=env)
    try:
        stats = s.stats()
        assert stats["connections"]["max"] == 5 and stats["series_overflow"]["limit_per_service"] == 9, stats
        status, text = s.ingest(users(0, 3, T0_S), "svc")
        assert status == 400 and "limit 2" in text, text
    finally:
        s.stop()
