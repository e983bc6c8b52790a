"""HTTP helpers of the tests that run a serve (``middleware.serve.ServeApp``) on 127.0.0.1: push a
pprof window to ``/ingest``, and GET the JSON query API."""
from __future__ import annotations

import contextlib
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from middleware.pprof import encode_pprof
from middleware.profile import Profile
from middleware.serve import ServeApp, ServeConfig
from support.processes import http_request


@contextlib.contextmanager
def running_serve(data_dir: Path, **config: Any) -> Iterator[ServeApp]:
    """A serve storing in ``data_dir`` (more ServeConfig settings in ``config``) on a free port,
    stopped afterwards."""
    app = ServeApp(ServeConfig(port=0, data_dir=str(data_dir), **config)).start()
    try:
        yield app
    finally:
        app.stop()


def ingest_pprof(app: ServeApp, name: str, profile: Profile, start: int, seconds: int = 10, **params: Any) -> None:
    """Pushes ``profile`` to ``/ingest`` as the window [start, start + seconds) of ``name`` (more
    query parameters in ``params``, e.g. ``sampleRate``); the serve must answer 200."""
    q = urllib.parse.urlencode({"name": name, "from": start, "until": start + seconds, "format": "pprof", **params})
    status, body = http_request(app.port, "POST", f"/ingest?{q}", encode_pprof(profile),
                                {"Content-Type": "binary/octet-stream"})
    assert status == 200, body


class Api:
    """GET requests to a serve's query API."""

    def __init__(self, app: ServeApp) -> None:
        self.app = app

    def raw(self, path: str, **params: Any) -> tuple[int, bytes]:
        return http_request(self.app.port, "GET", f"{path}?{urllib.parse.urlencode(params)}")

    def __call__(self, path: str, **params: Any) -> Any:
        status, data = self.raw(path, **params)
        assert status == 200, (path, params, data[:300])
        return json.loads(data)


def api(app: ServeApp, path: str, **params: Any) -> Any:
    """The JSON answer of GET ``path?params`` (which must be 200)."""
    return Api(app)(path, **params)
