"""Upload failures are visible: one stderr line per kind of failure and process.

Each test runs an app profiled by ``MwTracker`` in a fresh interpreter, configured through the
environment only, against a backend on 127.0.0.1 that fails in one way for every window (a
refused connection, 401 on every upload, 401 on the API key exchange) or with the uploader
module impossible to import. The child exports several windows, reports the uploader's
counters (the ground truth of how often it failed) and exits with a code of its own. The
tests check that stderr holds exactly one ``middleware: ...`` line per kind of failure, naming
the backend URL, the HTTP status or connection error and what happens to the profiles, never a
secret; that the counters show several failures behind that one line; and that the exit code
is the app's.

The children run side by side (each spends a few seconds in the uploader's exit deadline).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.fake_backend import FakeBackend
from support.processes import ROOT

pytestmark = pytest.mark.asan

APP = r"""
import json, os, sys, time
PRELUDE
from middleware import MwTracker

def visible_upload_work(seconds):
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += sum(i * i for i in range(300))
    return x

t = MwTracker(service_name="visible", sample_rate=200, upload_interval=0.2, profile_dir=STORE,
              instrument=False)
visible_upload_work(1.2)
t.flush(1.0)
if FORK:
    pid = os.fork()
    if pid == 0:  # the profiler restarts in the child (a gunicorn worker)
        visible_upload_work(1.0)
        t.flush(1.0)
        t.stop()
        os._exit(0)
    os.waitpid(pid, 0)
st = t.stats()
print(json.dumps({k: v for k, v in st.items() if k.startswith(("upload_", "export", "files"))}), flush=True)
sys.exit(EXIT_CODE)
"""

EXIT_CODE = 7  # the app's own exit code: the profiler must not change it
LINE = re.compile(r"^middleware: .*$", re.M)
SECRETS = ("tok-SECRET-123", "key-SECRET-456")


def app_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MW_", "OTEL_"))}
    env.update(MW_PROFILING_UPLOAD_INTERVAL="0.2", **extra)
    return env


def start_app(tmp: Path, env: dict[str, str], store: str | None = None, fork: bool = False,
              prelude: str = "") -> subprocess.Popen[str]:
    code = (APP.replace("PRELUDE", prelude).replace("STORE", repr(store or "none"))
            .replace("FORK", repr(fork)).replace("EXIT_CODE", str(EXIT_CODE)))
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], list[str], str]:
    """(the app's counters, its ``middleware:`` stderr lines, its whole stderr)."""
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == EXIT_CODE, err[-4000:]
    return json.loads(out.strip().splitlines()[-1]), LINE.findall(err), err


@pytest.fixture
def backends() -> Iterator[tuple[FakeBackend, FakeBackend, FakeBackend]]:
    with FakeBackend() as refused, FakeBackend() as denied, FakeBackend() as keyed:
        yield refused, denied, keyed


def test_each_upload_failure_is_one_stderr_line_and_the_exit_code_is_the_apps(backends, tmp_path):
    refused, denied, keyed = backends
    # GIVEN three apps uploading every 0.2 s: to a port that refuses connections (with room for
    # 2 profiles, so the queue fills), to a backend that answers 401 to every upload (a bearer
    # token), and with an API key whose exchange for a tenant is answered 401
    refused.refuse()
    denied.status(401, body=b'{"error": "invalid token"}')
    keyed.auth(401, b'{"error": "invalid key"}')
    apps = {
        "refused": start_app(tmp_path, app_env(MW_PROFILING_SERVER_URL=refused.url,
                                               MW_PROFILING_UPLOAD_QUEUE="2")),
        "denied": start_app(tmp_path, app_env(MW_PROFILING_SERVER_URL=denied.url,
                                              MW_PROFILING_BEARER_TOKEN=SECRETS[0])),
        "keyed": start_app(tmp_path, app_env(MW_PROFILING_SERVER_URL=keyed.url, MW_API_KEY=SECRETS[1],
                                             MW_AUTH_URL=keyed.auth_url)),
    }
    # WHEN they export several windows and exit
    res = {name: finish(p) for name, p in apps.items()}

    # THEN the refused backend: one line about it (kept, retried), one about profiles dropped
    # when the queue was full, behind several failed attempts and dropped profiles
    st, lines, err = res["refused"]
    assert st["upload_failed_attempts"] >= 2 and st["upload_dropped_queue_full"] >= 2, st
    assert st["upload_uploaded"] == 0 and st["export_uploads_submitted"] >= 4, st
    assert len(lines) == 2, err
    unreachable = [ln for ln in lines if "failed (" in ln]
    assert len(unreachable) == 1, lines
    assert refused.url in unreachable[0] and "connect" in unreachable[0].lower()
    assert "kept" in unreachable[0] and "retried" in unreachable[0]
    [full] = [ln for ln in lines if ln not in unreachable]
    assert refused.url in full and "full" in full and "dropped" in full

    # the 401 backend: every window was refused, one line says so (status, dropped), no secret
    st, lines, err = res["denied"]
    refusals = [r for r in denied.ingests() if r.answered == "401"]
    assert len(refusals) >= st["upload_dropped_rejected"] >= 4, st  # counters read before exit
    assert len(lines) == 1, err
    assert denied.url in lines[0] and "HTTP 401" in lines[0] and "dropped" in lines[0]
    assert "MW_PROFILING_BEARER_TOKEN" in lines[0]  # names the setting to check, not its value
    assert all(s not in err for s in SECRETS)

    # the refused key exchange: retried (the profiles wait), one line; the waiting profiles are
    # dropped (the queue filled, or they were still held at exit), one line
    st, lines, err = res["keyed"]
    assert len(keyed.auths()) >= 2 and not keyed.ingests() and st["upload_auth_failed"] >= 2, st
    assert len(lines) == 2, err
    [auth] = [ln for ln in lines if "cannot start" in ln]
    assert keyed.auth_url in auth and "key exchange" in auth and "HTTP 401" in auth and "MW_API_KEY" in auth
    assert "kept" in auth and "retried" in auth
    [gone] = [ln for ln in lines if ln != auth]
    assert keyed.url in gone and "dropped" in gone and ("full" in gone or "stopped" in gone)
    assert all(s not in err for s in SECRETS)


def test_a_forked_child_reports_its_own_failure_once_and_quiet_silences_it(backends, tmp_path):
    _, denied, quiet = backends
    denied.status(401)
    quiet.status(401)
    # GIVEN an app uploading to a backend that answers 401, which forks a worker after a few
    # windows (the profiler restarts there), and the same app with MW_PROFILING_QUIET=1
    forked = start_app(tmp_path, app_env(MW_PROFILING_SERVER_URL=denied.url), fork=True)
    silent = start_app(tmp_path, app_env(MW_PROFILING_SERVER_URL=quiet.url, MW_PROFILING_QUIET="1"))
    (_, lines, err), (st_quiet, quiet_lines, quiet_err) = finish(forked), finish(silent)
    # THEN parent and child each said it once, though both had several windows refused
    refusals = [r for r in denied.ingests() if r.answered == "401"]
    assert len(refusals) >= 6, len(refusals)
    assert len(lines) == 2 and all("HTTP 401" in ln for ln in lines), err
    # and MW_PROFILING_QUIET=1 silences the line, not the counting
    assert quiet_lines == [] and st_quiet["upload_dropped_rejected"] >= 3, (st_quiet, quiet_err)


def test_an_uploader_that_cannot_be_loaded_is_said_once_and_the_store_still_gets_profiles(tmp_path):
    store = tmp_path / "store"
    with FakeBackend() as backend:
        # GIVEN an app configured to upload whose uploader module cannot be imported
        app = start_app(tmp_path, app_env(MW_PROFILING_SERVER_URL=backend.url), store=str(store),
                        prelude='sys.modules["middleware._upload"] = None')
        st, lines, err = finish(app)
        # THEN one line says that nothing is uploaded and why; the local store got the windows
        assert len(lines) == 1, err
        assert "middleware._upload" in lines[0] and "cannot be loaded" in lines[0], lines
        assert "not uploaded" in lines[0] or "no profile" in lines[0], lines
        assert not backend.requests and st["upload_submitted"] == 0, st
        files = list(store.glob("visible-*.pb.gz"))  # the counters were read before the last one
        assert len(files) >= st["export_files_written"] >= 3, (st, files)


CLOSING_APP = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.join(sys.argv[1], "tests", "targets"))
from closing_fds import close_every_descriptor_and_open_pipes, pipes_intact
from middleware import MwTracker

def work(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(i * i for i in range(300))

t = MwTracker(service_name="closing", sample_rate=200, upload_interval=0.2, profile_dir="none",
              instrument=False)
work(1.0)
t.flush(2.0)  # uploaded: libcurl keeps its connection and its multi handle's wakeup pair open
app = close_every_descriptor_and_open_pipes()  # the app's pipes get libcurl's old numbers
work(1.0)
t.flush(2.0)
t.stop()
intact = pipes_intact(app)
st = t.stats()
print(json.dumps({"intact": intact, **{k: v for k, v in st.items() if k.startswith("upload_")}}), flush=True)
"""


def test_an_app_closing_every_descriptor_keeps_its_files_and_its_uploads(tmp_path):
    with FakeBackend() as backend:
        # GIVEN an app uploading every 0.2 s that closes every descriptor (as a daemon does) and
        # opens pipes of its own, which get the numbers libcurl held
        env = app_env(MW_PROFILING_SERVER_URL=backend.url)
        proc = subprocess.run([sys.executable, "-c", CLOSING_APP, ROOT], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=90)
        assert proc.returncode == 0, proc.stderr[-4000:]
        st = json.loads(proc.stdout.strip().splitlines()[-1])
        # THEN no pipe of the app was written, read or closed by the uploader (before: libcurl
        # closed two of them at stop, and the uploads after the close never left)
        assert st["intact"] == 16, (st, proc.stderr)
        # AND every window was uploaded, on new handles, without a failed attempt or a line
        assert st["upload_fds_lost"] >= 1, st
        assert st["upload_uploaded"] == st["upload_submitted"] == len(backend.ingests()) >= 8, st
        assert st["upload_failed_attempts"] == 0, (st, proc.stderr)
        assert not [ln for ln in LINE.findall(proc.stderr) if "upload" in ln], proc.stderr
