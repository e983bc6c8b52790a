"""Deploying the Flask demo under gunicorn as a given code version, for the regression detector's
end-to-end test and its benchmark (``bench/regress_demo.py``): a copy of the demo that can be
made slower in place, and a run of it under load that pushes its profiles to a `serve`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from support.processes import children, clean_env, closed_loop, free_port, http_get

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "demo_flask"
SERVICE = "regress-demo"
CALC1_PATH, CALC2_PATH = "/calculate1/600", "/calculate2/8"
_LOOPS = "for i in range(number):\n        for j in range(i + 1, number):"


def demo_copy(where: Path) -> Path:
    """A copy of the demo at ``where`` (the same path for every version, as an in-place deploy)."""
    shutil.copytree(DEMO, where, ignore=shutil.ignore_patterns("__pycache__"))
    return where


def make_calc2_slower(demo: Path, factor: float = 1.5) -> None:
    """calc2 does ``factor`` times the work: its pair loops run over sqrt(factor) times the range."""
    calc = demo / "calculations.py"
    text = calc.read_text()
    assert text.count(_LOOPS) == 1, "calc2's loops are not where this helper expects them"
    wider = f"int(number * {factor ** 0.5:.6f})"
    calc.write_text(text.replace(_LOOPS, f"for i in range({wider}):\n        for j in range(i + 1, {wider}):"))
    shutil.rmtree(demo / "__pycache__", ignore_errors=True)


def _load(port: int, seconds: float) -> None:
    """4 clients for ``seconds``: 3 of 4 requests to /calculate1 (where calc2 runs), 1 to /calculate2."""
    stop_at = time.monotonic() + seconds
    sent = [0, 0, 0, 0]

    def next_path(k: int) -> str | None:
        if time.monotonic() >= stop_at:
            return None
        sent[k] += 1
        return CALC2_PATH if (k + sent[k]) % 4 == 3 else CALC1_PATH

    closed_loop(port, next_path, clients=4)


def deploy(demo: Path, version: str, serve_url: str, seconds: float, window_s: float, log: Path) -> None:
    """Runs the demo at ``demo`` as ``version`` (MW_VCS_COMMIT_SHA) under load for ``seconds``,
    pushing ``window_s`` windows to ``serve_url``, then stops gunicorn gracefully."""
    port = free_port()
    env = clean_env()
    env.update(MW_SERVICE_NAME=SERVICE, MW_VCS_COMMIT_SHA=version, MW_PROFILING_SERVER_URL=serve_url,
               MW_PROFILE_DIR="none", MW_PROFILING_UPLOAD_INTERVAL=str(window_s),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}",
           "--workers", "2", "--graceful-timeout", "20"]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=demo, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("gunicorn did not become ready:\n" + log.read_text()[-3000:])
            if len(children(proc.pid)) == 2:
                try:
                    if http_get(port, "/calculate1/1", timeout=2)[0] == 200:
                        break
                except OSError:
                    pass
            time.sleep(0.1)
        _load(port, seconds)
        proc.send_signal(signal.SIGTERM)
        if proc.wait(timeout=40) != 0:
            raise RuntimeError("gunicorn did not stop cleanly:\n" + log.read_text()[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def regressions(app: Any, service: str = SERVICE) -> Any:
    """Runs the serve app's regression pass and returns ``/api/regressions`` for the service."""
    import http.client

    app.regressions.run_once()
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=30)
    conn.request("GET", "/api/regressions?" + urllib.parse.urlencode({"service": service}))
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body
