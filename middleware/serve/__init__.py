"""``python -m middleware serve``: a local collector speaking the Pyroscope ingest API, with a
continuous-profiling web page.

* :mod:`.ingest` — decoding and validating uploads (``POST /ingest``, the push API)
* :mod:`.labels` — the label-name rules of received labels
* :mod:`.store` — SQLite storage (gzipped pprof blobs + a series/totals index)
* :mod:`.importer` — importing the agent's local-store pprof files
* :mod:`.query` — the JSON query API (services, types, labels, timeline, merged profile, diff)
* :mod:`.httpd` — connections (bounded, with deadlines), authentication, request bodies
* :mod:`.routes` — what each route answers: ingest, query API, the page under ``static/``
* :mod:`.server` — configuration and lifecycle (:class:`ServeApp`) tying them together
"""
from middleware.serve.server import ConfigError, ServeApp, ServeConfig, is_loopback

__all__ = ["ServeApp", "ServeConfig", "ConfigError", "is_loopback"]
