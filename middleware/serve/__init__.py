"""``python -m middleware serve``: a local collector speaking the Pyroscope ingest API, with a
continuous-profiling web page.

* :mod:`.ingest` — decoding and validating uploads (``POST /ingest``)
* :mod:`.store` — SQLite storage (gzipped pprof blobs + a series/totals index)
* :mod:`.importer` — importing the agent's local-store pprof files
* :mod:`.query` — the JSON query API (services, types, labels, timeline, merged profile, diff)
* :mod:`.server` — the HTTP server tying them together, and the page under ``static/``
"""
from middleware.serve.server import ConfigError, ServeApp, ServeConfig, is_loopback

__all__ = ["ServeApp", "ServeConfig", "ConfigError", "is_loopback"]
