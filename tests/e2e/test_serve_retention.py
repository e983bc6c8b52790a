"""`serve`'s retention: the oldest data goes first (by age, by size), in the background, without
hurting ingest; the bounds survive a restart; a full disk answers 507 and keeps the page working.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from middleware.pprof import encode_pprof
from middleware.serve import ServeApp, ServeConfig
from middleware.serve.ingest import IngestLimits, decode_upload
from middleware.serve.retention import parse_duration, parse_size
from middleware.serve.store import Store
from support.profiles import build

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import serve_load  # noqa: E402

HOUR_NS = 3600 * 10**9


def _body(i: int, stacks: int = 40) -> bytes:
    """A gzipped pprof of ``stacks`` distinct stacks, different for every ``i``."""
    return encode_pprof(build([(f"main;handle_{i % 7};work_{k}", 1_000_000 + i) for k in range(stacks)]))


def _post(url: str, body: bytes, start_s: int, name: str = "svc") -> int:
    req = urllib.request.Request(
        f"{url}/ingest?name={name}&from={start_s}&until={start_s + 10}&format=pprof&sampleRate=100&spyName=t",
        data=body, method="POST", headers={"Content-Type": "application/octet-stream"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _storage(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/stats", timeout=30) as r:
        return json.load(r)["storage"]


def _wait(pred, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _prefill(data: str, n: int, start_s: int) -> None:
    """``n`` profiles of 5 services, 10 s apart from ``start_s``, written straight into the store."""
    limits = IngestLimits()
    with Store(data, max_age_s=None, max_bytes=None) as store:
        for lo in range(0, n, 200):
            uploads = [
                decode_upload(f"name=old{i % 5}&from={start_s + 10 * i}&until={start_s + 10 * i + 10}&format=pprof"
                              "&sampleRate=100&spyName=t", {"content-type": "application/octet-stream"},
                              _body(i), limits)
                for i in range(lo, min(n, lo + 200))
            ]
            store.add_many(uploads)


def test_durations_and_sizes_parse_and_off_means_no_bound() -> None:
    assert parse_duration("7d") == 7 * 86400 and parse_duration("90") == 90 and parse_duration("1.5h") == 5400
    assert parse_duration("off") is None and parse_duration("0") is None
    assert parse_size("2GiB") == 2 << 30 and parse_size("500M") == 500 << 20 and parse_size("1024") == 1024
    assert parse_size("off") is None
    for bad in ("soon", "-1d", "7 days"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        parse_size("lots")


def test_profiles_older_than_the_retention_go_and_the_rest_stay(tmp_path: Path) -> None:
    app = ServeApp(ServeConfig(port=0, data_dir=str(tmp_path / "data"), retention="1h", max_size="off",
                               retention_interval=0.1)).start()
    try:
        now_s = int(time.time())
        for i in range(30):  # 3 h ago .. 2.5 h ago: past the retention
            assert _post(app.url, _body(i), now_s - 3 * 3600 + 60 * i) == 200
        for i in range(30, 40):  # the last minutes
            assert _post(app.url, _body(i), now_s - 600 + 10 * i) == 200
        assert _wait(lambda: _storage(app.url)["profiles"] == 10), _storage(app.url)
        st = _storage(app.url)
        assert st["deleted"] == 30 and st["oldest_ns"] >= (now_s - 3600) * 10**9, st
        assert st["retention_s"] == 3600 and st["max_bytes"] is None
        # what the queries see agrees: no sample of the deleted profiles is left
        with sqlite3.connect(str(tmp_path / "data" / "profiles.sqlite3")) as db:
            old = (now_s - 3600) * 10**9
            assert db.execute("SELECT COUNT(*) FROM samples WHERE start_ns < ?", (old,)).fetchone()[0] == 0
            assert db.execute("SELECT COUNT(*) FROM totals WHERE start_ns < ?", (old,)).fetchone()[0] == 0
    finally:
        app.stop()


def test_over_the_size_bound_the_oldest_go_first(tmp_path: Path) -> None:
    app = ServeApp(ServeConfig(port=0, data_dir=str(tmp_path / "data"), retention="off", max_size="3M",
                               retention_interval=0.1)).start()
    try:
        now_s = int(time.time())
        for i in range(300):
            assert _post(app.url, _body(i, stacks=80), now_s - 3000 + 10 * i) == 200
        assert _wait(lambda: _storage(app.url)["used_bytes"] <= 3 << 20), _storage(app.url)
        st = _storage(app.url)
        assert 0 < st["profiles"] < 300 and st["deleted"] == 300 - st["profiles"], st
        # the ones kept are the newest
        assert st["oldest_ns"] == (now_s - 3000 + 10 * (300 - st["profiles"])) * 10**9, st
    finally:
        app.stop()


def test_a_restart_keeps_the_bounds_it_was_given(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    with Store(data) as s:
        assert (s.retention.max_age_s, s.retention.max_bytes) == (7 * 86400, 2 << 30)  # the defaults
    with Store(data, max_age_s=3600.0, max_bytes=None):
        pass
    with Store(data) as s:  # nothing given: the last bounds
        assert (s.retention.max_age_s, s.retention.max_bytes) == (3600.0, None)
    with Store(data, max_age_s=None) as s:
        assert (s.retention.max_age_s, s.retention.max_bytes) == (None, None)


def test_ingest_stays_fast_and_loses_nothing_while_retention_deletes(tmp_path: Path) -> None:
    # GIVEN a store holding 4,000 profiles from 30 days ago, WHEN serve restarts with a 2-day
    # retention (so it deletes them all in the background) while 20 uploaders push back to back,
    # THEN no upload fails or is lost, and the p99 latency is within 2x of the same load on the same
    # store with retention off
    data = tmp_path / "data"
    old_s = int(time.time()) - 30 * 86400
    _prefill(str(data), 4000, old_s)
    results = {}
    for retention in ("off", "2d"):
        copy = tmp_path / f"data-{retention}"
        shutil.copytree(data, copy)
        with serve_load.ServeProcess(str(copy), extra_args=["--retention", retention]) as server:
            load = serve_load.run_load(server.url, uploaders=20, duration=6.0, queriers=1)
            storage = _storage(server.url)
        assert load.problems == [] and load.lost == 0 and load.errors == 0 and load.rejected == 0, load.summary()
        results[retention] = (load.p99_ms, storage)
    assert results["2d"][1]["deleted"] > 0, results
    p99_off, p99_on = results["off"][0], results["2d"][0]
    print(f"p99 ingest latency: retention off {p99_off:.1f} ms, deleting {p99_on:.1f} ms "
          f"({results['2d'][1]['deleted']} profiles deleted during the load)")
    assert p99_on <= 2 * p99_off, (p99_off, p99_on)


DISK_FULL = r"""
import json, sqlite3, sys, time, urllib.request, urllib.error
sys.path.insert(0, {tests!r})
from middleware.serve import ServeApp, ServeConfig
from test_serve_retention import _body, _post
app = ServeApp(ServeConfig(port=0, data_dir={data!r}, retention="off", max_size="off")).start()
codes = []
now_s = int(time.time())
for i in range(3000):
    code = _post(app.url, _body(i, stacks=120), now_s - 30000 + 10 * i)
    codes.append(code)
    if code == 507 and codes.count(507) >= 3:
        break
with urllib.request.urlopen(app.url + "/api/services", timeout=30) as r:
    services = (r.status, json.load(r))
stored = app.store.storage()["profiles"]
app.stop()
db = sqlite3.connect({data!r} + "/profiles.sqlite3")
check = db.execute("PRAGMA integrity_check").fetchone()[0]
count = db.execute("SELECT COUNT(*) FROM profiles").fetchone()[0]
print(json.dumps({{"codes": codes, "services": services, "stored": stored, "check": check, "count": count}}))
"""


def test_a_full_disk_answers_507_keeps_queries_and_corrupts_nothing(tmp_path: Path) -> None:
    """The store lives on a 4 MiB file system mounted for this test only (a private mount
    namespace: nothing on the machine is filled)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a private small file system needs root and unshare")
    data = tmp_path / "small"
    data.mkdir()
    script = tmp_path / "full.py"
    script.write_text(DISK_FULL.format(tests=str(Path(__file__).parent), data=str(data)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f"mount -t tmpfs -o size=4m none {data} && exec {sys.executable} {script}"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    codes = r["codes"]
    assert 507 in codes and set(codes) <= {200, 507}, sorted(set(codes))
    first_full = codes.index(507)
    assert first_full > 10  # it stored until the disk was full
    assert r["services"][0] == 200 and r["services"][1]["services"], r["services"]
    assert r["check"] == "ok" and r["count"] == r["stored"] == codes.count(200), r


def test_bounds_come_from_the_option_then_the_variable_and_a_bad_one_is_said(tmp_path: Path, monkeypatch,
                                                                             caplog) -> None:
    from middleware.serve import ConfigError

    monkeypatch.setenv("MW_SERVE_RETENTION", "12h")
    monkeypatch.setenv("MW_SERVE_MAX_SIZE", "lots")
    with caplog.at_level("WARNING", logger="middleware.serve"):
        app = ServeApp(ServeConfig(port=0, data_dir=str(tmp_path / "a")))
    try:
        assert (app.store.retention.max_age_s, app.store.retention.max_bytes) == (12 * 3600, 2 << 30)
        assert any("MW_SERVE_MAX_SIZE" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        app.stop()
    app = ServeApp(ServeConfig(port=0, data_dir=str(tmp_path / "b"), retention="1d", max_size="off"))
    try:
        assert (app.store.retention.max_age_s, app.store.retention.max_bytes) == (86400, None)
    finally:
        app.stop()
    with pytest.raises(ConfigError):
        ServeApp(ServeConfig(port=0, data_dir=str(tmp_path / "c"), retention="soon"))
    cli = subprocess.run([sys.executable, "-m", "middleware", "serve", "--retention", "soon"],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and "argument --retention: bad duration 'soon'" in cli.stderr, cli.stderr
