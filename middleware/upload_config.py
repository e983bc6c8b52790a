"""The uploader's side of the configuration, and its messages.

The upload settings are rows of the one settings table, :data:`middleware.config.SETTINGS`, and
are resolved there (:func:`~middleware.config.resolve_upload_config`, re-exported here with the
other names of the uploader's configuration). ``resolve_upload_config()`` returns an
:class:`UploadConfig` whose fields are exactly the keyword arguments of
``middleware._native.upload_start``, so the tracker starts the uploader with::

    cfg = resolve_upload_config(service_name=service_name, sample_rate=rate, tags=tags)
    if cfg is not None:  # None: no server URL and no API key, nowhere to upload
        _native.upload_start(**dataclasses.asdict(cfg))

and calls :func:`drain_upload_messages` now and then to turn the uploader's pending messages
(rejected profiles, key exchange problems, start and end of an outage) into log records of this
module's logger, under which bad upload settings are reported too.
"""
from __future__ import annotations

import logging
from typing import Any

from middleware.config import (
    DEFAULT_AUTH_URL,
    DEFAULT_QUEUE_MAX,
    DEFAULT_SERVER_URL_TEMPLATE,
    MAX_QUEUE_MAX,
    SPY_NAME,
    UploadConfig,
    parse_tags,
    resolve_service_name,
    resolve_upload_config,
)

logger = logging.getLogger(__name__)  # = middleware.config.upload_logger

__all__ = [
    "UploadConfig",
    "resolve_upload_config",
    "resolve_service_name",
    "parse_tags",
    "drain_upload_messages",
    "DEFAULT_AUTH_URL",
    "DEFAULT_SERVER_URL_TEMPLATE",
    "DEFAULT_QUEUE_MAX",
    "MAX_QUEUE_MAX",
    "SPY_NAME",
]


def drain_upload_messages(native: Any = None, limit: int = 100) -> int:
    """Logs the uploader's pending messages through this module's logger; returns how many.

    ``native`` defaults to ``middleware._native``; nothing happens if it cannot be imported.
    Call it periodically from Python (never from the uploader thread).
    """
    if native is None:
        try:
            from middleware import _native as native
        except ImportError:
            return 0
    n = 0
    while n < limit:
        item = native.upload_take_message(with_level=True)
        if item is None:
            break
        level, text = item
        logger.log(level if level in (logging.INFO, logging.WARNING, logging.ERROR) else logging.WARNING,
                   "middleware upload: %s", text)
        n += 1
    return n

