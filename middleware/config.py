"""Settings of the profiler and of its uploader: one table, one resolver, one rule per value.

Every setting is one row of :data:`SETTINGS` (a :class:`Setting`): its name (the keyword argument
of :class:`~middleware.MwTracker` or of :func:`resolve_upload_config`, and the field of
:class:`ProfilerConfig` or :class:`UploadConfig`), the environment variables that set it (the
first one set to something other than blanks wins), the parser that checks a value (those of
:mod:`middleware.setting_values`, or a rule below), the default,
and whether the value is a secret (then never shown). :func:`resolve_setting` reads every row the
same way: an argument beats the variables, which beat the default. A bad value never raises: it is
a warning naming the argument or the variable (:func:`visible_warning`), and the default is used.

Two values have a rule of their own, applied wherever they are read:

* the service name: whitespace runs become ``-``, and so do the characters that would break the
  ``name{k=v}`` series syntax (``{}``, ``,``, ``=``, quotes, control characters; with a warning);
  ``OTEL_SERVICE_NAME`` beats ``MW_SERVICE_NAME``; the default is ``python-service-<pid>``;
* static tags (``MW_CUSTOM_RESOURCE_ATTRIBUTES=k=v,k=v`` or a mapping): a name must be a label
  name (:func:`middleware.labels.label_name_problem`: ``[a-zA-Z_][a-zA-Z0-9_]*``, at most 1024
  characters, not starting with ``__``) and must not repeat (the first wins); a value must be
  non-empty and free of ``,{}=`` and control characters; any other tag is dropped with a warning.

The profiler (:func:`resolve_config`) and the uploader (:func:`resolve_upload_config`) read the
shared rows (service name, sample rate, tags) through the same rows; the tracker resolves them
once and hands the uploader the resolved values. The native side takes every value as given: the
tracker passes each one explicitly (its own defaults and limits only serve direct calls).

The native core reads four variables itself, listed in :data:`NATIVE_VARIABLES`:
``MW_PROFILING_QUIET`` (with the rule of :func:`quiet`), and three diagnostics:
``MW_PROFILING_CPU_TIMER``, ``MW_PROFILING_DIRECT_READS`` and ``MW_PROFILING_MEMORY_HOOKS``
(``wrapped``: every allocator call hooked, as without pymalloc).
"""
from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import unquote

from middleware import setting_values as _pv
from middleware.labels import label_name_problem

logger = logging.getLogger(__name__)
#: Upload settings are reported under the uploader's logger, as its messages are.
upload_logger = logging.getLogger("middleware.upload_config")

__all__ = [
    "Setting",
    "SETTINGS",
    "NATIVE_VARIABLES",
    "ProfilerConfig",
    "UploadConfig",
    "resolve_config",
    "resolve_upload_config",
    "resolve_setting",
    "resolve_service_name",
    "parse_tags",
    "resource_attributes",
    "default_profile_dir",
    "visible_warning",
    "quiet",
    "DEFAULT_AUTH_URL",
    "DEFAULT_SERVER_URL_TEMPLATE",
]

DEFAULT_AUTH_URL = "https://app.middleware.io/api/v1/auth"
#: The uploader replaces ``{tenant}`` with the tenant id it gets for the API key.
DEFAULT_SERVER_URL_TEMPLATE = "https://{tenant}.middleware.io/profiling"
DEFAULT_QUEUE_MAX = 16
MAX_QUEUE_MAX = 4096  # the uploader's own clamp (MW_UPLOAD_QUEUE_MAX_LIMIT) is the same
SPY_NAME = "middleware-python"
#: The OTLP exporter's defaults: the collector's OTLP/HTTP address and the profiles path under it.
DEFAULT_OTLP_ENDPOINT = "http://localhost:4318"
OTLP_PROFILES_PATH = "/v1development/profiles"
EXPORTERS = _pv.EXPORTERS
SYSTEM_CA_FILES = _pv.SYSTEM_CA_FILES

# ---------------------------------------------------------------- showing a problem


def quiet(env: Mapping[str, str] | None = None) -> bool:
    """``MW_PROFILING_QUIET=1`` (or ``true``, ``yes``): no line of ours on stderr, the C side's
    failure lines included; records still go to the app's logging when it is configured."""
    return _pv.quiet_flag((os.environ if env is None else env).get("MW_PROFILING_QUIET", ""))


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


def memory_duty_run(duty_percent: int) -> int:
    """MW_PROFILING_MEMORY_DUTY as the sampler applies it: the allocation hooks are in at one tick
    of every run of this many (4 for 25%, the default; 1: always)."""
    return max(1, round(100 / duty_percent))


def exc_text(exc: BaseException) -> str:
    """An exception as a failure line shows it: ``Type: message``, or ``Type`` when it has none
    (a ``MemoryError()`` read "(MemoryError: )")."""
    msg = str(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


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


_SERIES_BREAKERS = re.compile(r"[{}=,\"'\x00-\x1f\x7f]")
_BAD_TAG_VALUE = re.compile(r"[,{}=\x00-\x1f\x7f]")


# ---------------------------------------------------------------- the service-name and tag rules


def _service_name(text: str) -> str:
    name = re.sub(r"\s+", "-", text.strip())
    if not name:
        raise ValueError("empty")
    return name


def _series_safe_name(name: str, where: str, log: logging.Logger) -> str:
    """The service name with what would break the ``name{k=v}`` series syntax replaced by ``-``."""
    cleaned = _SERIES_BREAKERS.sub("-", name)
    if cleaned != name:
        visible_warning(log, "middleware: %s %r contains characters not allowed in a series name; using %r",
                        where, name, cleaned)
    return cleaned


def _default_service_name() -> str:
    return f"python-service-{os.getpid()}"


def _tag_pairs(tags: str | Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """``"k=v,k=v"`` or a mapping as (name, value) pairs; value None for a part without ``=``."""
    if isinstance(tags, Mapping):
        return [(str(k).strip(), str(v).strip()) for k, v in tags.items()]
    if not isinstance(tags, str):
        raise TypeError("expected k=v,k=v or a mapping")
    pairs: list[tuple[str, str | None]] = []
    for part in tags.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            pairs.append((part.strip(), None))
            continue
        k, v = part.split("=", 1)
        pairs.append((k.strip(), v.strip()))
    return pairs


def _valid_tags(pairs: list[tuple[str, str | None]], where: str, log: logging.Logger) -> dict[str, str]:
    """The tag rule: the valid tags in order; each other one dropped with a warning."""
    out: dict[str, str] = {}
    for k, v in pairs:
        if v is None:
            visible_warning(log, "middleware: ignoring tag %r in %s (want k=v)", k, where)
        elif (problem := label_name_problem(k)) is not None:
            visible_warning(log, "middleware: ignoring tag %r in %s: bad label name: %s", k, where, problem)
        elif k in out:
            visible_warning(log, "middleware: ignoring repeated tag %r in %s", k, where)
        elif not v or _BAD_TAG_VALUE.search(v):
            visible_warning(log, "middleware: ignoring tag %r in %s: the value must be non-empty without ,{}=", k,
                            where)
        else:
            out[k] = v
    return out


def parse_tags(tags: str | Mapping[str, Any] | None, source: str = "tags",
               log: logging.Logger = upload_logger) -> str | None:
    """Static tags (``"k=v,k=v"`` or a mapping) checked by the tag rule, in the uploader's form:
    ``"k=v,k=v"``, or None when none is left."""
    if tags is None:
        return None
    return ",".join(f"{k}={v}" for k, v in _valid_tags(_tag_pairs(tags), source, log).items()) or None


def resource_attributes(env: Mapping[str, str] | None = None, log: logging.Logger = logger) -> dict[str, str]:
    """OpenTelemetry resource attributes: every ``key=value`` of ``OTEL_RESOURCE_ATTRIBUTES``, then
    of ``MW_CUSTOM_RESOURCE_ATTRIBUTES`` (comma separated, keys and values percent-decoded as the
    OpenTelemetry specification says; a later key wins). Unlike static tags, keys keep their dots
    (``deployment.environment``). A part without ``=`` or with an empty key is left out, said once."""
    e = os.environ if env is None else env
    out: dict[str, str] = {}
    for var in (*SETTINGS["resource_attributes"].env, *SETTINGS["tags"].env):
        for part in (e.get(var) or "").split(","):
            if not part.strip():
                continue
            try:
                key, value = _pv.kv_part(part)
            except ValueError:
                visible_warning(log, "middleware: ignoring %r in %s (want key=value)", part.strip(), var)
                continue
            out[key] = value
    return out


# ---------------------------------------------------------------- the table


def default_profile_dir() -> str:
    """The local store: ``$XDG_CACHE_HOME/middleware/profiles`` (``~/.cache/middleware/profiles``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(base, "middleware", "profiles"))


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


#: Who reads a row: the profiler (:class:`ProfilerConfig`), the uploader (:class:`UploadConfig`).
PROFILER, UPLOADER = "profiler", "uploader"


@dataclass(frozen=True)
class Setting:
    """One setting: how it is named, set, checked and defaulted."""

    name: str  # keyword argument and field name (the uploader's field for service_name: app_name)
    env: tuple[str, ...]  # the variables that set it, the first non-blank one wins
    parse: Callable[[Any], Any]  # text (or the argument) -> value; ValueError/TypeError: invalid
    default: Any = None
    default_factory: Callable[[], Any] | None = None  # computed default (beats ``default``)
    secret: bool = False  # never shown in a warning or a repr
    used_by: tuple[str, ...] = ()  # PROFILER, UPLOADER
    check: Callable[[Any, str, logging.Logger], Any] | None = None  # after parsing: (value, where, log)
    mapping_arg: bool = False  # an argument that is not a string is handed to ``parse`` as is
    doc: str = ""

    def default_value(self) -> Any:
        return self.default_factory() if self.default_factory is not None else self.default


_P, _U, _PU = (PROFILER,), (UPLOADER,), (PROFILER, UPLOADER)

#: Every setting, by name.
SETTINGS: dict[str, Setting] = {s.name: s for s in (
    # the profiler
    Setting("enabled", ("MW_APM_COLLECT_PROFILING",), _pv.parse_bool, True, used_by=_P,
            doc="profile at all"),
    Setting("service_name", ("OTEL_SERVICE_NAME", "MW_SERVICE_NAME"), _service_name,
            default_factory=_default_service_name, used_by=_PU, check=_series_safe_name,
            doc="service name (store file names, the uploaded series name)"),
    Setting("sample_rate", ("MW_PROFILING_SAMPLE_RATE",), _pv.int_in(1, 10000), 100, used_by=_PU,
            doc="CPU samples per second of a thread's CPU time (uploaded as sampleRate)"),
    Setting("wall_rate", ("MW_PROFILING_WALL_RATE",), _pv.int_in(1, 10000), 100, used_by=_P,
            doc="wall-time samples (sampler ticks) per second at most"),
    Setting("upload_interval", ("MW_PROFILING_UPLOAD_INTERVAL",), _pv.float_in(0.05, 3600.0), 10.0, used_by=_P,
            doc="seconds per exported profile"),
    Setting("profile_dir", ("MW_PROFILE_DIR",), _pv.store_dir, default_factory=default_profile_dir, used_by=_P,
            doc="local store; none/off: no store (`middleware serve` imports it too)"),
    Setting("store_max_mb", ("MW_PROFILE_DIR_MAX_MB",), _pv.int_in(1, 1 << 20), 256, used_by=_P,
            doc="store size bound, oldest files removed past it"),
    Setting("max_depth", ("MW_PROFILING_MAX_DEPTH",), _pv.int_in(1, 4096), 1024, used_by=_P,
            doc="frames kept per stack (leaf side)"),
    Setting("native", ("MW_PROFILING_NATIVE",), _pv.parse_bool, False, used_by=_P, doc="also capture C frames"),
    Setting("native_show_internal", ("MW_PROFILING_NATIVE_INTERNAL",), _pv.parse_bool, False, used_by=_P,
            doc="keep the interpreter's own C frames"),
    Setting("locks", ("MW_PROFILING_LOCKS",), _pv.parse_bool, True, used_by=_P,
            doc="lock-wait profiles (block:contentions:count, block:delay:nanoseconds)"),
    Setting("lock_rate", ("MW_PROFILING_LOCK_RATE",), _pv.int_in(0, 10**10), 1_000_000, used_by=_P,
            doc="nanoseconds of waiting per recorded lock wait; shorter waits are sampled (0: all)"),
    Setting("memory", ("MW_PROFILING_MEMORY",), _pv.parse_bool, False, used_by=_P,
            doc="memory profiles (memory:alloc_objects/alloc_space/inuse_objects/inuse_space)"),
    Setting("memory_rate", ("MW_PROFILING_MEMORY_RATE",), _pv.int_in(1, 1 << 40), 512 * 1024, used_by=_P,
            doc="mean bytes allocated between two sampled allocations while the allocation hooks are in"),
    Setting("memory_duty", ("MW_PROFILING_MEMORY_DUTY",), _pv.int_in(1, 100), 25, used_by=_P,
            doc="percent of the time the hooks of allocations of up to 512 bytes are in (one sampler "
                "tick in round(100 / it)); larger ones are always sampled. 100: always, ~2% of CPU on "
                "allocation-bound code"),
    Setting("instrument", ("MW_PROFILING_INSTRUMENT",), _pv.parse_bool, True, used_by=_P,
            doc="label Flask/WSGI requests with endpoint"),
    Setting("span_links", ("MW_PROFILING_SPAN_LINKS",), _pv.parse_bool, True, used_by=_P,
            doc="with OpenTelemetry in the app: label samples with their request's root span_id/span_name"),
    Setting("upload", ("MW_PROFILING_UPLOAD",), _pv.parse_bool, True, used_by=_P,
            doc="false: never upload, even with a backend configured"),
    Setting("tags", ("MW_CUSTOM_RESOURCE_ATTRIBUTES",), _tag_pairs, default_factory=dict, used_by=_PU,
            check=_valid_tags, mapping_arg=True, doc="static tags k=v,k=v, added to the series name"),
    Setting("commit_sha", ("MW_VCS_COMMIT_SHA",), _pv.header_value, None, used_by=_P,
            doc="code version: service_git_ref and version labels (default: the app's git commit)"),
    Setting("repository_url", ("MW_VCS_REPOSITORY_URL",), _pv.header_value, None, used_by=_P,
            doc="service_repository label (default: the app's git origin, without credentials)"),
    Setting("resource_attributes", ("OTEL_RESOURCE_ATTRIBUTES",), _pv.header_value, None, used_by=_PU,
            doc="its service.version is the version label when MW_VCS_COMMIT_SHA is not set; the OTLP "
                "exporter sends its attributes"),
    # the uploader
    Setting("server_url", ("MW_PROFILING_SERVER_URL",), _pv.http_url, None, used_by=_U,
            doc="backend base URL ({server}/ingest); with a key and no URL the tenant template"),
    Setting("api_key", ("MW_API_KEY",), _pv.header_value, None, secret=True, used_by=_U,
            doc="account key, exchanged for a tenant at auth_url"),
    Setting("auth_url", ("MW_AUTH_URL",), _pv.http_url, DEFAULT_AUTH_URL, used_by=_U, doc="key exchange URL"),
    Setting("tenant_id", ("MW_PROFILING_TENANT_ID",), _pv.tenant, None, used_by=_U,
            doc="X-Scope-OrgID (skips the key exchange)"),
    Setting("bearer_token", ("MW_PROFILING_BEARER_TOKEN",), _pv.header_value, None, secret=True, used_by=_U,
            doc="Authorization: Bearer, for self-hosted backends"),
    Setting("basic_user", ("MW_PROFILING_BASIC_AUTH_USER",), _pv.header_value, None, used_by=_U,
            doc="basic auth user, for self-hosted backends"),
    Setting("basic_password", ("MW_PROFILING_BASIC_AUTH_PASSWORD",), _pv.header_value, None, secret=True,
            used_by=_U, doc="basic auth password"),
    Setting("queue_max", ("MW_PROFILING_UPLOAD_QUEUE",), _pv.int_in(1, MAX_QUEUE_MAX), DEFAULT_QUEUE_MAX, used_by=_U,
            doc="profiles kept while the backend is down"),
    Setting("use_push_api", ("MW_PROFILING_PUSH_API",), _pv.parse_bool, False, used_by=_U,
            doc="true: /push.v1.PusherService/Push instead of /ingest"),
    Setting("ca_file", ("SSL_CERT_FILE", "CURL_CA_BUNDLE"), _pv.ca_file, default_factory=_pv.system_ca_file,
            used_by=_U,
            doc="CA certificates (PEM) for https backends; default: the system's bundle"),
    Setting("ca_path", ("SSL_CERT_DIR",), _pv.ca_dir, None, used_by=_U,
            doc="directory of hashed CA certificates for https backends, besides ca_file"),
    Setting("exporter", ("MW_PROFILING_EXPORTER",), _pv.exporter, "pyroscope", used_by=_U,
            doc="pyroscope (the ingest API at the server URL) or otlp (OTLP profiles over HTTP/protobuf)"),
    Setting("otlp_profiles_endpoint", ("OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT",), _pv.http_url, None, used_by=_U,
            doc="otlp: the full URL profiles are posted to"),
    Setting("otlp_endpoint", ("OTEL_EXPORTER_OTLP_ENDPOINT",), _pv.http_url, DEFAULT_OTLP_ENDPOINT, used_by=_U,
            doc="otlp: the collector's base URL; profiles go to {endpoint}/v1development/profiles"),
    Setting("otlp_headers", ("OTEL_EXPORTER_OTLP_PROFILES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"), _pv.otlp_headers,
            None, secret=True, used_by=_U, doc="otlp: request headers k=v,k=v (percent-decoded)"),
    Setting("otlp_compression", ("OTEL_EXPORTER_OTLP_PROFILES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"),
            _pv.compression, "none", used_by=_U, doc="otlp: gzip or none"),
    Setting("spy_name", (), _pv.header_value, SPY_NAME, used_by=_U, doc="spyName query parameter"),
    Setting("user_agent", (), _pv.header_value, f"{SPY_NAME}/unknown", used_by=_U,
            doc="User-Agent (the installed version when there is a backend)"),
    Setting("connect_timeout_s", (), _pv.float_in(0.001, 600), 5.0, used_by=_U, doc="per HTTP request"),
    Setting("total_timeout_s", (), _pv.float_in(0.001, 3600), 30.0, used_by=_U, doc="per HTTP request"),
    Setting("backoff_initial_s", (), _pv.float_in(0.001, 3600), 1.0, used_by=_U, doc="first retry delay"),
    Setting("backoff_max_s", (), _pv.float_in(0.001, 86400), 60.0, used_by=_U, doc="longest retry delay"),
    # the whole process (read by :func:`quiet` and by the native side with the same rule)
    Setting("quiet", ("MW_PROFILING_QUIET",), _pv.quiet_flag, False,
            doc="1/true/yes: none of our lines on stderr"),
)}

#: Variables the native core reads itself (csrc/), not through this table.
NATIVE_VARIABLES = ("MW_PROFILING_QUIET", "MW_PROFILING_CPU_TIMER", "MW_PROFILING_DIRECT_READS",
                    "MW_PROFILING_MEMORY_HOOKS")

# ---------------------------------------------------------------- the resolver

_UNSET: Any = object()


def _shown(row: Setting, value: Any) -> str:
    return "'***'" if row.secret and value is not None else repr(value)


def _resolve(row: Setting, arg: Any, env: Mapping[str, str], log: logging.Logger,
             default: Any = _UNSET) -> tuple[Any, bool]:
    """(value, whether the argument or a variable gave it) for one row."""
    dflt = row.default_value() if default is _UNSET else default
    if arg is not None:
        where, value = row.name, arg
    else:
        for var in row.env:
            raw = env.get(var)
            if raw is not None and raw.strip() != "":
                where, value = var, raw
                break
        else:
            return dflt, False
    try:
        if isinstance(value, bool) and row.parse is _pv.parse_bool:
            v = value
        elif isinstance(value, str) or row.mapping_arg:
            v = row.parse(value)
        else:
            v = row.parse(str(value))
    except (ValueError, TypeError) as exc:
        if where == row.name:
            visible_warning(log, "middleware: invalid %s=%s (%s); using %s", where, _shown(row, value), exc,
                            _shown(row, dflt))
        else:
            visible_warning(log, "middleware: invalid %s=%s (%s); using the default %s", where, _shown(row, value),
                            exc, _shown(row, dflt))
        return dflt, False
    return (row.check(v, where, log) if row.check is not None else v), True


def resolve_setting(name: str, arg: Any = None, env: Mapping[str, str] | None = None,
                    log: logging.Logger = logger) -> Any:
    """One setting by the name of its row: ``arg`` if given (checked), else the first variable
    set in ``env`` (default ``os.environ``), else the default; a bad value is a warning on
    ``log`` and the default."""
    return _resolve(SETTINGS[name], arg, os.environ if env is None else env, log)[0]


def resolve_service_name(arg: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Argument, else ``OTEL_SERVICE_NAME``, else ``MW_SERVICE_NAME``, else ``python-service-<pid>``,
    by the service-name rule (see the module's doc)."""
    return str(resolve_setting("service_name", arg, env, upload_logger))


# ---------------------------------------------------------------- the profiler


def _default(name: str) -> Any:
    """The dataclass field of a row's default."""
    row = SETTINGS[name]
    return field(default_factory=row.default_factory) if row.default_factory else field(default=row.default)


@dataclass
class ProfilerConfig:
    """Resolved settings of the process profiler (rows used by PROFILER; see :data:`SETTINGS`)."""

    enabled: bool = _default("enabled")
    service_name: str = _default("service_name")
    sample_rate: int = _default("sample_rate")
    # Wall-time samples per second at most (the sampler's ticks) while CPU samples come from the
    # threads' own CPU timers; without them the ticks run at sample_rate.
    wall_rate: int = _default("wall_rate")
    upload_interval: float = _default("upload_interval")
    profile_dir: str | None = _default("profile_dir")
    store_max_mb: int = _default("store_max_mb")
    max_depth: int = _default("max_depth")
    native: bool = _default("native")
    native_show_internal: bool = _default("native_show_internal")
    instrument: bool = _default("instrument")
    span_links: bool = _default("span_links")
    locks: bool = _default("locks")
    lock_rate: int = _default("lock_rate")
    memory: bool = _default("memory")
    memory_rate: int = _default("memory_rate")
    memory_duty: int = _default("memory_duty")
    upload: bool = _default("upload")  # False: never push to a backend, even if one is configured
    tags: dict[str, str] = _default("tags")
    # The code version (middleware.version turns these and the app's git work tree into labels).
    commit_sha: str | None = _default("commit_sha")
    repository_url: str | None = _default("repository_url")
    resource_attributes: str | None = _default("resource_attributes")
    # Whether the argument or MW_PROFILE_DIR chose profile_dir (else it is the default store,
    # which a process that uploads does not keep).
    profile_dir_set: bool = False


def resolve_config(env: Mapping[str, str] | None = None, **args: Any) -> ProfilerConfig:
    """Builds the configuration from keyword arguments, then ``env`` (default ``os.environ``)."""
    env = os.environ if env is None else env
    for name in sorted(set(args) - set(SETTINGS)):
        # A misspelt option must not pass for a default, nor stop the application: said once.
        import difflib  # only here: ~0.6 ms of every start otherwise (difflib, heapq)

        close = difflib.get_close_matches(name, list(SETTINGS), n=1)
        visible_warning(logger, "middleware: unknown profiler option %r ignored%s; the options are: %s", name,
                        f" (did you mean {close[0]!r}?)" if close else "", ", ".join(sorted(SETTINGS)))
    values: dict[str, Any] = {}
    for f in fields(ProfilerConfig):
        if f.name in SETTINGS:
            values[f.name], given = _resolve(SETTINGS[f.name], args.get(f.name), env, logger)
            if f.name == "profile_dir":
                values["profile_dir_set"] = given
    return ProfilerConfig(**values)


# ---------------------------------------------------------------- the uploader

_SECRETS = tuple(s.name for s in SETTINGS.values() if s.secret)


@dataclass(repr=False)
class UploadConfig:
    """Resolved uploader settings; field names = ``_native.upload_start`` keyword arguments."""

    server_url: str | None = _default("server_url")
    app_name: str = ""  # the service_name row
    tags: str | None = None  # the tags row, as "k=v,k=v"
    tenant_id: str | None = _default("tenant_id")
    auth_url: str | None = _default("auth_url")
    api_key: str | None = _default("api_key")
    bearer_token: str | None = _default("bearer_token")
    basic_user: str | None = _default("basic_user")
    basic_password: str | None = _default("basic_password")
    spy_name: str = _default("spy_name")
    user_agent: str = _default("user_agent")
    sample_rate: int = _default("sample_rate")
    queue_max: int = _default("queue_max")
    connect_timeout_s: float = _default("connect_timeout_s")
    total_timeout_s: float = _default("total_timeout_s")
    backoff_initial_s: float = _default("backoff_initial_s")
    backoff_max_s: float = _default("backoff_max_s")
    use_push_api: bool = _default("use_push_api")
    ca_file: str | None = _default("ca_file")
    ca_path: str | None = _default("ca_path")
    # The OTLP exporter (exporter="otlp"): server_url is then the full URL profiles are posted to.
    exporter: str = _default("exporter")
    otlp_headers: tuple[tuple[str, str], ...] | None = _default("otlp_headers")
    otlp_gzip: bool = False
    # OTLP resource attributes beyond ours (None: not the OTLP exporter)
    resource_attributes: tuple[tuple[str, str], ...] | None = None
    sdk_version: str = ""

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
    ca_file: str | None = None,
    ca_path: str | None = None,
    exporter: str | None = None,
    resource_attributes: str | None = None,
    env: Mapping[str, str] | None = None,
) -> UploadConfig | None:
    """Builds the upload settings from arguments, then ``env`` (default ``os.environ``), then defaults.

    Returns None when there is nowhere to upload (neither a server URL nor an API key): profiles
    then stay local. ``service_name`` is an alias of ``app_name`` (``app_name`` wins). Never
    raises over a bad value: it logs a warning (on ``middleware.upload_config``) and uses the
    default. The tracker passes the service name, sample rate and tags it resolved already.

    With ``exporter="otlp"`` (``MW_PROFILING_EXPORTER``) there is always somewhere to upload: the
    OTLP endpoint (``OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT`` as is, else ``OTEL_EXPORTER_OTLP_ENDPOINT``
    + ``/v1development/profiles``, default ``http://localhost:4318``), with the OTLP headers and
    compression, and the resource attributes of ``OTEL_RESOURCE_ATTRIBUTES`` then the static tags;
    the Pyroscope settings (server URL, key, tenant, credentials, push API) are not used.
    """
    e: Mapping[str, str] = os.environ if env is None else env
    log = upload_logger

    def get(name: str, arg: Any, default: Any = _UNSET) -> Any:
        return _resolve(SETTINGS[name], arg, e, log, default)[0]

    # how profiles travel, whichever the exporter
    transport: dict[str, Any] = dict(
        sample_rate=get("sample_rate", sample_rate),
        queue_max=get("queue_max", queue_max),
        connect_timeout_s=get("connect_timeout_s", connect_timeout_s),
        total_timeout_s=get("total_timeout_s", total_timeout_s),
        backoff_initial_s=get("backoff_initial_s", backoff_initial_s),
        backoff_max_s=get("backoff_max_s", backoff_max_s),
        ca_file=get("ca_file", ca_file),
        ca_path=get("ca_path", ca_path),
    )
    if get("exporter", exporter) == "otlp":
        return _resolve_otlp(get, e, app_name if app_name is not None else service_name, tags, resource_attributes,
                             user_agent, transport)

    key = get("api_key", api_key)
    tenant = get("tenant_id", tenant_id)
    server = get("server_url", server_url)
    if server is None and key is not None:
        server = DEFAULT_SERVER_URL_TEMPLATE
    if server is not None and tenant is not None:
        server = server.replace("{tenant}", tenant)
    if server is not None and "{tenant}" in server and key is None and tenant is None:
        visible_warning(log, "middleware: the server URL %r needs a tenant (MW_API_KEY or MW_PROFILING_TENANT_ID); "
                        "uploads are disabled", server)
        server = None

    bearer = get("bearer_token", bearer_token)
    user = get("basic_user", basic_user)
    password = get("basic_password", basic_password)
    if password is not None and user is None:
        visible_warning(log, "middleware: MW_PROFILING_BASIC_AUTH_PASSWORD is set without a user; ignoring it")
        password = None
    if bearer is not None and user is not None:
        visible_warning(log, "middleware: both a bearer token and basic auth are configured; using the bearer token")
        user = password = None

    tag_map: dict[str, str] = get("tags", tags)
    cfg = UploadConfig(
        server_url=server,
        app_name=get("service_name", app_name if app_name is not None else service_name),
        tags=",".join(f"{k}={v}" for k, v in tag_map.items()) or None,
        tenant_id=tenant,
        auth_url=get("auth_url", auth_url),
        api_key=key,
        bearer_token=bearer,
        basic_user=user,
        basic_password=password,
        spy_name=get("spy_name", spy_name),
        user_agent=get("user_agent", user_agent, _user_agent() if server is not None or key is not None else _UNSET),
        use_push_api=get("use_push_api", use_push_api),
        **transport,
    )
    return cfg if cfg.enabled else None


def _resolve_otlp(get: Callable[..., Any], env: Mapping[str, str], service: str | None,
                  tags: str | Mapping[str, Any] | None, otel_attributes: str | None, user_agent: str | None,
                  transport: dict[str, Any]) -> UploadConfig:
    """The upload settings of the OTLP exporter (see :func:`resolve_upload_config`)."""
    from middleware import __version__

    url = get("otlp_profiles_endpoint", None)
    if url is None:
        url = str(get("otlp_endpoint", None)).rstrip("/") + OTLP_PROFILES_PATH
    # resource_attributes(): OTEL_RESOURCE_ATTRIBUTES (the argument when given), then
    # MW_CUSTOM_RESOURCE_ATTRIBUTES, as OpenTelemetry reads such lists; without the variable, the
    # static tags given (an argument of the tracker). Later ones win; the agent's service name wins.
    e = dict(env)
    if otel_attributes is not None:
        e["OTEL_RESOURCE_ATTRIBUTES"] = otel_attributes
    resource = resource_attributes(e, upload_logger)
    if not (env.get("MW_CUSTOM_RESOURCE_ATTRIBUTES") or "").strip() and tags is not None:
        tag_map: dict[str, str] = get("tags", tags)
        resource.update((k, unquote(v)) for k, v in tag_map.items())
    resource.pop("service.name", None)
    return UploadConfig(
        server_url=url,
        app_name=get("service_name", service),
        spy_name=get("spy_name", None),
        user_agent=get("user_agent", user_agent, _user_agent()),
        **transport,
        exporter="otlp",
        otlp_headers=get("otlp_headers", None),
        otlp_gzip=get("otlp_compression", None) == "gzip",
        resource_attributes=tuple(resource.items()),
        sdk_version=__version__,
    )
