"""Profiler configuration: arguments beat environment variables beat defaults.

Every setting has an ``MW_*`` environment variable (see the README's configuration table). A bad
value never raises: it is a warning naming the variable (:func:`visible_warning`), and the
default is used.
"""
from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

__all__ = ["ProfilerConfig", "resolve_config", "default_profile_dir", "visible_warning", "quiet"]

T = TypeVar("T")

#: The variables that only the uploader's settings read (:mod:`middleware.upload_config`). With
#: none of them set and no tags there is nowhere to upload and nothing upload-specific to
#: validate, so the tracker does not load the upload settings at all.
UPLOAD_VARIABLES = (
    "MW_API_KEY", "MW_PROFILING_SERVER_URL", "MW_AUTH_URL", "MW_PROFILING_TENANT_ID",
    "MW_PROFILING_BEARER_TOKEN", "MW_PROFILING_BASIC_AUTH_USER", "MW_PROFILING_BASIC_AUTH_PASSWORD",
    "MW_PROFILING_UPLOAD_QUEUE", "MW_PROFILING_PUSH_API",
)

_QUIET_VALUES = ("1", "true", "yes")  # as csrc/mw_report.c reads MW_PROFILING_QUIET

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def quiet(env: Mapping[str, str] | None = None) -> bool:
    """``MW_PROFILING_QUIET=1`` (or ``true``, ``yes``): no line of ours on stderr, the C side's
    failure lines included; records still go to the app's logging when it is configured."""
    return (os.environ if env is None else env).get("MW_PROFILING_QUIET", "") in _QUIET_VALUES


def _logging_configured(log: logging.Logger) -> bool:
    """Whether a record of ``log`` reaches a handler other than a NullHandler: the test
    :meth:`logging.Logger.callHandlers` makes before it falls back to ``logging.lastResort``
    (which our package's NullHandler keeps from ever running). A handler whose level drops
    the record counts: the app chose that level."""
    c: logging.Logger | None = log
    while c is not None:
        if any(not isinstance(h, logging.NullHandler) for h in c.handlers):
            return True
        if not c.propagate:
            return False
        c = c.parent
    return False


_shown_on_stderr: dict[str, object] = {}


def visible_warning(log: logging.Logger, msg: str, *args: object) -> None:
    """A problem the user must see (a bad setting, an unsupported interpreter), shown once.

    The record always goes to ``log``. When the app has configured logging for it (some handler
    up the chain), that is all: the app's logging shows it, in its format, nothing is printed
    twice. When not (the common case: only the package's NullHandler), the message is also
    written to stderr, once per distinct message for the life of the process (forked children
    included), unless ``MW_PROFILING_QUIET`` is set. An app that lowered the ``middleware``
    loggers below WARNING, or called ``logging.disable``, sees nothing.

    Why not :func:`warnings.warn`: ``-W error`` (or pytest's ``filterwarnings = error``) would
    turn a bad setting into an exception, which configuration must never raise, and with
    ``logging.captureWarnings`` an app that logs would see the line twice.
    """
    if not log.isEnabledFor(logging.WARNING):
        return
    log.warning(msg, *args)
    if _logging_configured(log) or quiet():
        return
    try:
        text = msg % args if args else msg
    except (TypeError, ValueError):
        text = f"{msg} {args!r}"
    token = object()
    if _shown_on_stderr.setdefault(text, token) is not token:
        return  # already shown (dict.setdefault is atomic under the GIL)
    stream = sys.stderr
    if stream is None:  # no console (pythonw, some daemons)
        return
    try:
        stream.write(text + "\n")
        stream.flush()
    except (OSError, ValueError):  # closed or broken stderr: nowhere to say it
        pass


def default_profile_dir() -> str:
    """The local store: ``$XDG_CACHE_HOME/middleware/profiles`` (``~/.cache/middleware/profiles``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "middleware", "profiles")


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError("expected true or false")


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        v = int(text.strip())
        if not lo <= v <= hi:
            raise ValueError(f"must be within {lo}..{hi}")
        return v

    return parse


def float_in(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        v = float(text.strip())
        if not (math.isfinite(v) and lo <= v <= hi):
            raise ValueError(f"must be within {lo:g}..{hi:g}")
        return v

    return parse


def _service_name(text: str) -> str:
    name = re.sub(r"\s+", "-", text.strip())
    if not name:
        raise ValueError("empty")
    return name


@dataclass
class ProfilerConfig:
    """Resolved settings of the process profiler."""

    enabled: bool = True
    service_name: str = field(default_factory=lambda: f"python-service-{os.getpid()}")
    sample_rate: int = 100
    # Wall-time samples per second at most (the sampler's ticks) while CPU samples come from the
    # threads' own CPU timers; without them the ticks run at sample_rate.
    wall_rate: int = 100
    upload_interval: float = 10.0
    profile_dir: str | None = field(default_factory=default_profile_dir)
    store_max_mb: int = 256
    max_depth: int = 1024
    native: bool = False
    native_show_internal: bool = False
    instrument: bool = True
    upload: bool = True  # False: never push to a backend, even if one is configured
    tags: dict[str, str] = field(default_factory=dict)


def _setting(
    name: str,
    arg: T | None,
    env: Mapping[str, str],
    variables: tuple[str, ...],
    parse: Callable[[str], T],
    default: T,
) -> T:
    """One setting: the argument if given (validated), else the first set variable, else default."""
    if arg is not None:
        if isinstance(arg, str):
            try:
                return parse(arg)
            except (ValueError, TypeError) as exc:
                visible_warning(logger, "middleware: invalid %s=%r (%s); using %r", name, arg, exc, default)
                return default
        try:
            return parse(str(arg)) if not isinstance(arg, bool) else arg
        except (ValueError, TypeError) as exc:
            visible_warning(logger, "middleware: invalid %s=%r (%s); using %r", name, arg, exc, default)
            return default
    for var in variables:
        raw = env.get(var)
        if raw is None or raw.strip() == "":
            continue
        try:
            return parse(raw)
        except (ValueError, TypeError) as exc:
            visible_warning(logger, "middleware: invalid %s=%r (%s); using the default %r", var, raw, exc, default)
            return default
    return default


def _parse_tags(text: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            visible_warning(logger, "middleware: ignoring tag %r in MW_CUSTOM_RESOURCE_ATTRIBUTES (want k=v)", part)
            continue
        k, v = part.split("=", 1)
        tags[k.strip()] = v.strip()
    return tags


def resolve_config(env: Mapping[str, str] | None = None, **args: Any) -> ProfilerConfig:
    """Builds the configuration from keyword arguments, then ``env`` (default ``os.environ``)."""
    env = os.environ if env is None else env
    d = ProfilerConfig()
    profile_dir_arg = args.get("profile_dir")
    cfg = ProfilerConfig(
        enabled=_setting("enabled", args.get("enabled"), env, ("MW_APM_COLLECT_PROFILING",), parse_bool, True),
        service_name=_setting(
            "service_name", args.get("service_name"), env, ("OTEL_SERVICE_NAME", "MW_SERVICE_NAME"), _service_name,
            d.service_name,
        ),
        sample_rate=_setting(
            "sample_rate", args.get("sample_rate"), env, ("MW_PROFILING_SAMPLE_RATE",), int_in(1, 10000), 100
        ),
        wall_rate=_setting(
            "wall_rate", args.get("wall_rate"), env, ("MW_PROFILING_WALL_RATE",), int_in(1, 10000), 100
        ),
        upload_interval=_setting(
            "upload_interval", args.get("upload_interval"), env, ("MW_PROFILING_UPLOAD_INTERVAL",),
            float_in(0.05, 3600.0), 10.0,
        ),
        profile_dir=_setting("profile_dir", profile_dir_arg, env, ("MW_PROFILE_DIR",), str, d.profile_dir),
        store_max_mb=_setting(
            "store_max_mb", args.get("store_max_mb"), env, ("MW_PROFILE_DIR_MAX_MB",), int_in(1, 1 << 20), 256
        ),
        max_depth=_setting("max_depth", args.get("max_depth"), env, ("MW_PROFILING_MAX_DEPTH",), int_in(1, 4096), 1024),
        native=_setting("native", args.get("native"), env, ("MW_PROFILING_NATIVE",), parse_bool, False),
        native_show_internal=_setting(
            "native_show_internal", args.get("native_show_internal"), env, ("MW_PROFILING_NATIVE_INTERNAL",),
            parse_bool, False,
        ),
        instrument=_setting("instrument", args.get("instrument"), env, ("MW_PROFILING_INSTRUMENT",), parse_bool, True),
        upload=_setting("upload", args.get("upload"), env, ("MW_PROFILING_UPLOAD",), parse_bool, True),
        tags=dict(args["tags"]) if args.get("tags") else _parse_tags(env.get("MW_CUSTOM_RESOURCE_ATTRIBUTES", "")),
    )
    if cfg.profile_dir is not None and cfg.profile_dir.strip().lower() in ("", "none", "off"):
        cfg.profile_dir = None
    return cfg
