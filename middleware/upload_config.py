"""Upload settings for the native uploader: arguments beat environment variables beat defaults.

``resolve_upload_config()`` returns an :class:`UploadConfig` whose fields are exactly the keyword
arguments of ``middleware._native.upload_start``, so the tracker starts the uploader with::

    cfg = resolve_upload_config(service_name=service_name, sample_rate=rate, tags=tags)
    if cfg is not None:  # None: no server URL and no API key, nowhere to upload
        _native.upload_start(**dataclasses.asdict(cfg))

and calls :func:`drain_upload_messages` now and then to turn the uploader's pending messages
(rejected profiles, key exchange problems, start and end of an outage) into log records.

Environment variables (PROTOCOL.md names, plus ours):

========================================  =====================================================
``MW_API_KEY``                            account key, exchanged for a tenant at ``MW_AUTH_URL``
``OTEL_SERVICE_NAME`` / ``MW_SERVICE_NAME`` service name (OTel's wins); ``python-service-<pid>``
``MW_PROFILING_SERVER_URL``               backend base URL (``{server}/ingest``); with a key and
                                          no URL: ``https://<tenant>.middleware.io/profiling``
``MW_AUTH_URL``                           ``https://app.middleware.io/api/v1/auth``
``MW_CUSTOM_RESOURCE_ATTRIBUTES``         ``k=v,k=v`` static tags added to the series name
``MW_PROFILING_TENANT_ID``                ``X-Scope-OrgID`` (skips the key exchange)
``MW_PROFILING_BEARER_TOKEN``             ``Authorization: Bearer`` for self-hosted backends
``MW_PROFILING_BASIC_AUTH_USER/PASSWORD`` basic auth for self-hosted backends
``MW_PROFILING_UPLOAD_QUEUE``             profiles kept while the backend is down (16, 1..4096)
``MW_PROFILING_PUSH_API``                 ``true``: use ``/push.v1.PusherService/Push``
``MW_PROFILING_SAMPLE_RATE``              sampling rate reported as ``sampleRate`` (100 Hz)
========================================  =====================================================

A bad value never raises: it is a warning (shown once on stderr when the app has not configured
logging, see :func:`middleware.config.visible_warning`) and the default is used. Tag (label) names
must match ``[a-zA-Z_][a-zA-Z0-9_]*``, must not start with ``__`` and must not repeat; values must
be non-empty and free of ``,{}=``; offending tags are dropped with a warning.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from middleware.config import float_in as _float_in
from middleware.config import int_in as _int_in
from middleware.config import parse_bool as _bool
from middleware.config import visible_warning as _warn

logger = logging.getLogger(__name__)

__all__ = [
    "UploadConfig",
    "resolve_upload_config",
    "resolve_service_name",
    "parse_tags",
    "drain_upload_messages",
    "drain_messages",
    "DEFAULT_AUTH_URL",
    "DEFAULT_SERVER_URL_TEMPLATE",
]

T = TypeVar("T")

DEFAULT_AUTH_URL = "https://app.middleware.io/api/v1/auth"
#: The uploader replaces ``{tenant}`` with the tenant id it gets for the API key.
DEFAULT_SERVER_URL_TEMPLATE = "https://{tenant}.middleware.io/profiling"
DEFAULT_QUEUE_MAX = 16
MAX_QUEUE_MAX = 4096  # MW_UPLOAD_QUEUE_MAX_LIMIT in csrc/mw_upload.h
SPY_NAME = "middleware-python"

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_TENANT = re.compile(r"[A-Za-z0-9_.-]{1,128}\Z")
_BAD_VALUE_CHARS = re.compile(r"[,{}=\x00-\x1f\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SECRETS = ("api_key", "bearer_token", "basic_password")


@dataclass(repr=False)
class UploadConfig:
    """Resolved uploader settings; field names = ``_native.upload_start`` keyword arguments."""

    server_url: str | None = None
    app_name: str = ""
    tags: str | None = None
    tenant_id: str | None = None
    auth_url: str | None = DEFAULT_AUTH_URL
    api_key: str | None = None
    bearer_token: str | None = None
    basic_user: str | None = None
    basic_password: str | None = None
    spy_name: str = SPY_NAME
    user_agent: str = f"{SPY_NAME}/unknown"
    sample_rate: int = 100
    queue_max: int = DEFAULT_QUEUE_MAX
    connect_timeout_s: float = 5.0
    total_timeout_s: float = 30.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    use_push_api: bool = False

    @property
    def enabled(self) -> bool:
        """Whether there is anywhere to upload to (a server URL or an API key)."""
        return bool(self.server_url or self.api_key)

    def __repr__(self) -> str:  # never print secrets
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            parts.append(f"{f.name}={repr('***') if f.name in _SECRETS and v else repr(v)}")
        return f"UploadConfig({', '.join(parts)})"


# ---------------------------------------------------------------- value parsers (raise ValueError)


def _http_url(text: str) -> str:
    url = text.strip()
    if not re.match(r"https?://[^/?#\s]+", url, re.IGNORECASE):
        raise ValueError("must be an http:// or https:// URL")
    if _CONTROL.search(url) or " " in url:
        raise ValueError("contains spaces or control characters")
    return url


def _header_value(text: str) -> str:
    v = text.strip()
    if not v:
        raise ValueError("empty")
    if _CONTROL.search(v):
        raise ValueError("contains control characters")
    return v


def _tenant(text: str) -> str:
    v = text.strip()
    if not _TENANT.match(v):
        raise ValueError("must match [A-Za-z0-9_.-]{1,128}")
    return v


def _setting(
    name: str,
    arg: Any,
    env: Mapping[str, str],
    variables: tuple[str, ...],
    parse: Callable[[str], T],
    default: T,
    secret: bool = False,
) -> T:
    """The argument if given (validated), else the first non-empty variable, else default."""

    def shown(v: Any) -> str:
        return "'***'" if secret else repr(v)

    if arg is not None:
        if isinstance(arg, bool) and default.__class__ is bool:
            return arg  # type: ignore[return-value]
        try:
            return parse(str(arg))
        except (ValueError, TypeError) as exc:
            _warn(logger, "middleware: invalid upload setting %s=%s (%s); using %s", name, shown(arg), exc,
                  shown(default))
            return default
    for var in variables:
        raw = env.get(var)
        if raw is None or raw.strip() == "":
            continue
        try:
            return parse(raw)
        except (ValueError, TypeError) as exc:
            _warn(logger, "middleware: invalid %s=%s (%s); using %s", var, shown(raw), exc, shown(default))
            return default
    return default


# ---------------------------------------------------------------- names and tags


def resolve_service_name(arg: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Argument, else ``OTEL_SERVICE_NAME``, else ``MW_SERVICE_NAME``, else ``python-service-<pid>``.

    Whitespace runs become ``-``; characters that would break the ``name{k=v}`` series syntax
    (``{}``, ``,``, ``=``, quotes) are replaced by ``-`` with a warning.
    """
    env = os.environ if env is None else env
    default = f"python-service-{os.getpid()}"
    for source, raw in (("service name", arg), ("OTEL_SERVICE_NAME", env.get("OTEL_SERVICE_NAME")),
                        ("MW_SERVICE_NAME", env.get("MW_SERVICE_NAME"))):
        if raw is None or not str(raw).strip():
            continue
        name = re.sub(r"\s+", "-", str(raw).strip())
        cleaned = re.sub(r"[{}=,\"'\x00-\x1f\x7f]", "-", name)
        if cleaned != name:
            _warn(logger, "middleware: %s %r contains characters not allowed in a series name; using %r",
                  source, name, cleaned)
        return cleaned
    return default


def parse_tags(tags: str | Mapping[str, Any] | None, source: str = "tags") -> str | None:
    """Validates static tags (``"k=v,k=v"`` or a mapping) into a ``"k=v,k=v"`` string or None.

    Invalid or repeated names, empty values and values containing ``,{}=`` are dropped with a
    warning; the first occurrence of a repeated name wins.
    """
    if tags is None:
        return None
    pairs: list[tuple[str, str]] = []
    if isinstance(tags, Mapping):
        pairs = [(str(k).strip(), str(v).strip()) for k, v in tags.items()]
    else:
        for part in str(tags).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                _warn(logger, "middleware: ignoring tag %r in %s (expected k=v)", part.strip(), source)
                continue
            k, v = part.split("=", 1)
            pairs.append((k.strip(), v.strip()))
    seen: set[str] = set()
    out: list[str] = []
    for k, v in pairs:
        if not _LABEL_NAME.match(k) or k.startswith("__"):
            _warn(
                logger,
                "middleware: ignoring tag %r in %s: names must match [a-zA-Z_][a-zA-Z0-9_]* and not start with '__'",
                k, source,
            )
            continue
        if k in seen:
            _warn(logger, "middleware: ignoring repeated tag %r in %s", k, source)
            continue
        if not v or _BAD_VALUE_CHARS.search(v):
            _warn(logger, "middleware: ignoring tag %r in %s: the value must be non-empty without ,{}=", k, source)
            continue
        seen.add(k)
        out.append(f"{k}={v}")
    return ",".join(out) or None


_user_agent_cache: str | None = None


def _user_agent() -> str:
    """``middleware-python/<installed version>``; looked up once, and only when there is a backend
    (importing :mod:`importlib.metadata` costs tens of milliseconds)."""
    global _user_agent_cache
    if _user_agent_cache is None:
        try:
            from importlib.metadata import version

            _user_agent_cache = f"{SPY_NAME}/{version('middleware')}"
        except Exception:  # not installed as a distribution
            _user_agent_cache = f"{SPY_NAME}/unknown"
    return _user_agent_cache


# ---------------------------------------------------------------- resolution


def resolve_upload_config(
    *,
    server_url: str | None = None,
    app_name: str | None = None,
    service_name: str | None = None,
    tags: str | Mapping[str, Any] | None = None,
    tenant_id: str | None = None,
    api_key: str | None = None,
    auth_url: str | None = None,
    bearer_token: str | None = None,
    basic_user: str | None = None,
    basic_password: str | None = None,
    sample_rate: int | None = None,
    queue_max: int | None = None,
    use_push_api: bool | None = None,
    spy_name: str | None = None,
    user_agent: str | None = None,
    connect_timeout_s: float | None = None,
    total_timeout_s: float | None = None,
    backoff_initial_s: float | None = None,
    backoff_max_s: float | None = None,
    env: Mapping[str, str] | None = None,
) -> UploadConfig | None:
    """Builds the upload settings from arguments, then ``env`` (default ``os.environ``), then defaults.

    Returns None when there is nowhere to upload (neither a server URL nor an API key): profiles
    then stay local. ``service_name`` is an alias of ``app_name`` (``app_name`` wins). Never
    raises over a bad value: it logs a warning and uses the default.
    """
    cfg = _resolve(
        server_url=server_url, app_name=app_name if app_name is not None else service_name, tags=tags,
        tenant_id=tenant_id, api_key=api_key, auth_url=auth_url, bearer_token=bearer_token,
        basic_user=basic_user, basic_password=basic_password, sample_rate=sample_rate, queue_max=queue_max,
        use_push_api=use_push_api, spy_name=spy_name, user_agent=user_agent,
        connect_timeout_s=connect_timeout_s, total_timeout_s=total_timeout_s,
        backoff_initial_s=backoff_initial_s, backoff_max_s=backoff_max_s, env=env,
    )
    return cfg if cfg.enabled else None


def _resolve(
    *,
    server_url: Any,
    app_name: Any,
    tags: Any,
    tenant_id: Any,
    api_key: Any,
    auth_url: Any,
    bearer_token: Any,
    basic_user: Any,
    basic_password: Any,
    sample_rate: Any,
    queue_max: Any,
    use_push_api: Any,
    spy_name: Any,
    user_agent: Any,
    connect_timeout_s: Any,
    total_timeout_s: Any,
    backoff_initial_s: Any,
    backoff_max_s: Any,
    env: Mapping[str, str] | None,
) -> UploadConfig:
    """All settings, resolved, whether or not there is a destination."""
    env = os.environ if env is None else env
    d = UploadConfig()
    key = _setting("api_key", api_key, env, ("MW_API_KEY",), _header_value, None, secret=True)
    tenant = _setting("tenant_id", tenant_id, env, ("MW_PROFILING_TENANT_ID",), _tenant, None)
    server = _setting("server_url", server_url, env, ("MW_PROFILING_SERVER_URL",), _http_url, None)
    if server is None and key is not None:
        server = DEFAULT_SERVER_URL_TEMPLATE
    if server is not None and tenant is not None:
        server = server.replace("{tenant}", tenant)
    if server is not None and "{tenant}" in server and key is None and tenant is None:
        _warn(logger, "middleware: the server URL %r needs a tenant (MW_API_KEY or MW_PROFILING_TENANT_ID); "
              "uploads are disabled", server)
        server = None

    bearer = _setting("bearer_token", bearer_token, env, ("MW_PROFILING_BEARER_TOKEN",), _header_value, None,
                      secret=True)
    user = _setting("basic_user", basic_user, env, ("MW_PROFILING_BASIC_AUTH_USER",), _header_value, None)
    password = _setting("basic_password", basic_password, env, ("MW_PROFILING_BASIC_AUTH_PASSWORD",),
                        _header_value, None, secret=True)
    if password is not None and user is None:
        _warn(logger, "middleware: MW_PROFILING_BASIC_AUTH_PASSWORD is set without a user; ignoring it")
        password = None
    if bearer is not None and user is not None:
        _warn(logger, "middleware: both a bearer token and basic auth are configured; using the bearer token")
        user = password = None

    tag_arg = tags if tags is not None else env.get("MW_CUSTOM_RESOURCE_ATTRIBUTES")
    tag_source = "tags" if tags is not None else "MW_CUSTOM_RESOURCE_ATTRIBUTES"

    return UploadConfig(
        server_url=server,
        app_name=resolve_service_name(app_name, env),
        tags=parse_tags(tag_arg, tag_source),
        tenant_id=tenant,
        auth_url=_setting("auth_url", auth_url, env, ("MW_AUTH_URL",), _http_url, DEFAULT_AUTH_URL),
        api_key=key,
        bearer_token=bearer,
        basic_user=user,
        basic_password=password,
        spy_name=_setting("spy_name", spy_name, {}, (), _header_value, d.spy_name),
        user_agent=_setting("user_agent", user_agent, {}, (), _header_value,
                            _user_agent() if server is not None or key is not None else d.user_agent),
        sample_rate=_setting("sample_rate", sample_rate, env, ("MW_PROFILING_SAMPLE_RATE",), _int_in(1, 10000),
                             d.sample_rate),
        queue_max=_setting("queue_max", queue_max, env, ("MW_PROFILING_UPLOAD_QUEUE",), _int_in(1, MAX_QUEUE_MAX),
                           d.queue_max),
        connect_timeout_s=_setting("connect_timeout_s", connect_timeout_s, {}, (), _float_in(0.001, 600),
                                   d.connect_timeout_s),
        total_timeout_s=_setting("total_timeout_s", total_timeout_s, {}, (), _float_in(0.001, 3600),
                                 d.total_timeout_s),
        backoff_initial_s=_setting("backoff_initial_s", backoff_initial_s, {}, (), _float_in(0.001, 3600),
                                   d.backoff_initial_s),
        backoff_max_s=_setting("backoff_max_s", backoff_max_s, {}, (), _float_in(0.001, 86400), d.backoff_max_s),
        use_push_api=_setting("use_push_api", use_push_api, env, ("MW_PROFILING_PUSH_API",), _bool, False),
    )


def drain_upload_messages(native: Any = None, limit: int = 100) -> int:
    """Logs the uploader's pending messages through this module's logger; returns how many.

    ``native`` defaults to ``middleware._native``; nothing happens if it cannot be imported.
    Call it periodically from Python (never from the uploader thread).
    """
    if native is None:
        try:
            from middleware import _native as native  # type: ignore[attr-defined, no-redef]
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


#: The name the tracker looks up.
drain_messages = drain_upload_messages
