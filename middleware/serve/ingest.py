"""Decoding of ingest requests (the Pyroscope ``POST /ingest`` API, docs/protocol.md).

An upload is ``POST /ingest?name=<service>{k=v,...}&from=<unix s>&until=<unix s>&format=pprof
&sampleRate=<hz>&spyName=<name>`` with a pprof body, plain or gzipped, either raw
(``binary/octet-stream``) or as the ``profile`` field of a ``multipart/form-data`` body (then an
optional ``sample_type_config`` JSON field may come along; it is validated and otherwise ignored,
because our series names follow the fixed rules below).

Everything in this module is pure: it turns (query string, headers, body) into an
:class:`Upload` or raises :class:`IngestError` carrying the HTTP status and a message meant for
the uploader's log. Nothing is stored before decoding succeeded, so a bad upload changes nothing.

Limits. The body is capped before it is read (413), and gzip is inflated with a hard cap on the
output (a 1 KiB gzip bomb can inflate to gigabytes): inflation stops as soon as the output would
exceed ``max_decompressed_bytes`` and the upload is refused with 413. Times are stored as int64
nanoseconds, so every time (``from``/``until``, the pprof's ``time_nanos`` + ``duration_nanos``)
must lie within 0 .. 2**63-1 ns (unix seconds up to 9223372036, the year 2262), else 400. Sample
values must not be negative, and each sample type's total in one profile must stay below 2**53
(the largest integer the page's JavaScript holds exactly), else 400. One upload (one ``/ingest``
request, or one push request over all its series) may hold at most ``max_series_per_upload``
distinct label sets (series), else 400; the store caps the series of a service
(``max_series_per_service``, see :mod:`middleware.serve.store`).

Label names (of ``name`` tags, push series labels and pprof sample labels) follow Grafana
Pyroscope's rules, :mod:`middleware.serve.labels`: dots become underscores (``otel.scope.name``
is stored as ``otel_scope_name``), values are kept as sent, and what Pyroscope refuses is refused.

Series naming (docs/protocol.md): a sample type containing ``wall`` gives the series ``wall``, one
starting with ``alloc_``/``inuse_`` gives ``memory``, one containing ``cpu`` gives
``process_cpu``, ``contentions`` and ``delay`` give ``block``; any other sample type (e.g.
``samples/count``) takes the name of the profile's period type (``cpu`` period -> ``process_cpu``).
The profile type id is ``name:type:unit:period_type:period_unit`` where the period is the
profile's own, except for a sample type whose series differs from the period's series (a ``wall``
value in a profile whose period type is ``cpu``): that one uses itself as period type. This yields exactly
``process_cpu:cpu:nanoseconds:cpu:nanoseconds``, ``process_cpu:samples:count:cpu:nanoseconds``
and ``wall:wall:nanoseconds:wall:nanoseconds`` for the agent's CPU profiles, and
``block:contentions:count:contentions:count`` and ``block:delay:nanoseconds:contentions:count``
for its lock-wait profiles (Pyroscope's names for Go's block profile).
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import json
import logging
import os
import re
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs

# The form of every stored label name (after sanitization, see :mod:`middleware.serve.labels`).
from middleware.labels import LABEL_NAME_RE
from middleware.serve.labels import (
    MAX_LABEL_VALUE_LENGTH,
    LabelError,
    check_series_size,
    sanitize_label_name,
    sanitize_labels,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from middleware.profile import Profile

log = logging.getLogger(__name__)

__all__ = [
    "IngestError",
    "IngestLimits",
    "IngestParams",
    "Upload",
    "LABEL_NAME_RE",
    "EXCLUDED_SAMPLE_LABELS",
    "parse_name",
    "parse_ingest_query",
    "gunzip_capped",
    "extract_pprof_bytes",
    "decode_upload",
    "upload_from_profile",
    "decode_push",
    "SERVICE_LABEL",
    "profile_type_ids",
    "INT64_MAX",
    "MAX_UNIX_SECONDS",
    "MAX_PROFILE_TOTAL",
    "unix_seconds_to_ns",
    "SERIES_PER_UPLOAD_ENV",
    "SERIES_PER_SERVICE_ENV",
]

#: String sample labels that do not become series labels (docs/protocol.md): per-request ids
#: would make one series per request.
EXCLUDED_SAMPLE_LABELS = frozenset({"span_id", "trace_id", "profile_id"})
#: The label holding the service name in queries; reserved in upload tags.
SERVICE_LABEL = "service_name"

_SERVICE_RE = re.compile(r"^[^{}\s,=\"\x00-\x1f]{1,256}$")
#: Times are stored as int64 nanoseconds (SQLite INTEGER); nothing beyond fits.
INT64_MAX = 2**63 - 1
#: The last unix second whose nanoseconds fit in int64 (2262-04-11). A larger value is also the
#: usual sign of milliseconds or nanoseconds sent by mistake.
MAX_UNIX_SECONDS = INT64_MAX // 1_000_000_000
#: A sample type's total in one profile stays below this (the page's JavaScript numbers hold
#: integers exactly up to 2**53; CPU nanoseconds of 104 days, or 9 PB of allocations).
MAX_PROFILE_TOTAL = 2**53 - 1
#: Environment variables of the series caps (see :class:`IngestLimits`).
SERIES_PER_UPLOAD_ENV = "MW_SERVE_MAX_SERIES_PER_UPLOAD"
SERIES_PER_SERVICE_ENV = "MW_SERVE_MAX_SERIES_PER_SERVICE"
_GZIP_MAGIC = b"\x1f\x8b"


class IngestError(Exception):
    """A refused upload: ``status`` is the HTTP status to answer, ``message`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_N = TypeVar("_N", int, float)


def env_number(name: str, default: _N, lo: _N, hi: _N, number: Callable[[str], _N], expected: str) -> _N:
    """A numeric setting from the environment, read by ``number``; a value it cannot read or
    outside lo..hi is logged (saying it ``expected``) and the default used."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = number(raw.strip())
        ok = lo <= value <= hi  # also false for nan
    except ValueError:
        ok = False
    if not ok:
        log.warning("ignoring %s=%r: expected %s", name, raw, expected)
        return default
    return value


def _env_int(name: str, default: int, lo: int = 1, hi: int = 10**9) -> int:
    """An integer setting from the environment; a bad value is logged and the default used."""
    return env_number(name, default, lo, hi, int, f"an integer within {lo}..{hi}; using {default}")


@dataclass(frozen=True)
class IngestLimits:
    """Caps on uploads: sizes (bytes) and series (distinct label sets).

    ``max_series_per_upload``: distinct label sets one upload may hold (400 beyond it);
    default 2000 or ``$MW_SERVE_MAX_SERIES_PER_UPLOAD``. ``max_series_per_service``: series a
    service may have in the store; samples that would open a series beyond it are folded into
    the service's one overflow series (see :mod:`middleware.serve.store`); default 50000 or
    ``$MW_SERVE_MAX_SERIES_PER_SERVICE``.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    max_decompressed_bytes: int = 64 * 1024 * 1024
    max_series_per_upload: int = field(default_factory=lambda: _env_int(SERIES_PER_UPLOAD_ENV, 2000))
    max_series_per_service: int = field(default_factory=lambda: _env_int(SERIES_PER_SERVICE_ENV, 50_000))


@dataclass(frozen=True)
class IngestParams:
    """The query parameters of one upload, validated."""

    service: str
    tags: tuple[tuple[str, str], ...] = ()
    from_ns: int | None = None
    until_ns: int | None = None
    format: str = "pprof"
    sample_rate: int | None = None
    spy_name: str = ""


@dataclass
class Upload:
    """A decoded upload, ready to be stored."""

    params: IngestParams
    profile: Profile
    pprof_plain: bytes
    start_ns: int
    end_ns: int
    tenant: str = ""
    type_ids: list[tuple[str, int]] = field(default_factory=list)
    #: The upload's own gzip bytes of ``pprof_plain`` when it came gzipped (stored as they are).
    pprof_gz: bytes | None = None
    #: Distinct series labels of its samples (filled by :func:`upload_from_profile`).
    series: frozenset[tuple[tuple[str, str], ...]] = frozenset()
    #: Set by the store: samples and label sets folded into the service's overflow series.
    overflow_samples: int = 0
    overflow_series: int = 0

    @property
    def digest(self) -> bytes:
        """Content digest of the plain pprof (with service and window: the duplicate key)."""
        return hashlib.blake2b(self.pprof_plain, digest_size=16).digest()


def parse_name(name: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Split ``svc{k=v,k2=v2}`` into the service name and its sorted static tags.

    Tag names are sanitized like every label name (``otel.scope.name`` -> ``otel_scope_name``,
    see :mod:`middleware.serve.labels`). Raises :class:`IngestError` (400) on an empty service,
    unbalanced braces, a tag without ``=``, an invalid or reserved label name, a repeated label
    name, an overlong name or value, or too many tags.
    """
    name = name.strip()
    if not name:
        raise IngestError(400, "missing 'name': expected name=<service>{k=v,...}")
    tags: tuple[tuple[str, str], ...] = ()
    if "{" in name or "}" in name:
        if not name.endswith("}") or name.count("{") != 1 or name.count("}") != 1:
            raise IngestError(400, f"bad 'name' {name!r}: tags must be one trailing {{k=v,...}}")
        service, _, inner = name[:-1].partition("{")
        service = service.strip()
        raw_tags: list[tuple[str, str]] = []
        for item in inner.split(","):
            item = item.strip()
            if not item:
                continue
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq:
                raise IngestError(400, f"bad tag {item!r} in 'name': expected k=v")
            if _sanitized_name(key, where="'name' tag") == SERVICE_LABEL:
                raise IngestError(400, f"tag {SERVICE_LABEL!r} is reserved; put the service before the braces")
            raw_tags.append((key, value.strip()))
        keys = [k for k, _ in raw_tags]
        if len(set(keys)) != len(keys):
            raise IngestError(400, f"repeated tag name in 'name': {sorted(keys)}")
        tags = _sanitized_labels(raw_tags, where="'name' tags")
        _check_series_size(tags, where="'name' tags")
    else:
        service = name
    if not _SERVICE_RE.match(service):
        raise IngestError(
            400, f"bad service name {service!r}: 1-256 characters, no spaces, quotes, commas, '=' or braces"
        )
    return service, tags


def _sanitized_name(key: str, where: str) -> str:
    try:
        return sanitize_label_name(key, where)
    except LabelError as exc:
        raise IngestError(400, str(exc)) from None


def _sanitized_labels(pairs: list[tuple[str, str]], where: str) -> tuple[tuple[str, str], ...]:
    try:
        return sanitize_labels(pairs, where)
    except LabelError as exc:
        raise IngestError(400, str(exc)) from None


def _check_series_size(labels: tuple[tuple[str, str], ...], where: str) -> None:
    try:
        check_series_size(labels, where)
    except LabelError as exc:
        raise IngestError(400, str(exc)) from None


def unix_seconds_to_ns(raw: str, param: str) -> int:
    """Unix seconds (a decimal number) as int64 nanoseconds; :class:`ValueError` says why not."""
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"bad '{param}' {raw[:64]!r}: expected unix seconds") from None
    # (the first test keeps inf, nan and 1e300 away from the multiplication)
    ns = int(round(seconds * 1e9)) if 0 <= seconds <= MAX_UNIX_SECONDS + 1 else -1
    if not 0 <= ns <= INT64_MAX:
        raise ValueError(
            f"bad '{param}' {raw[:64]!r}: expected unix seconds from 0 to {MAX_UNIX_SECONDS} "
            "(not ms or ns; times are stored as int64 nanoseconds, which end in the year 2262)"
        )
    return ns


def _unix_seconds_to_ns(raw: str, param: str) -> int:
    try:
        return unix_seconds_to_ns(raw, param)
    except ValueError as exc:
        raise IngestError(400, str(exc)) from None


def parse_ingest_query(query: str) -> IngestParams:
    """Validate the ingest query string; raises :class:`IngestError` (400) on a bad parameter."""
    try:
        qs = parse_qs(query, keep_blank_values=True, strict_parsing=False, max_num_fields=64)
    except ValueError as exc:  # max_num_fields exceeded
        raise IngestError(400, f"bad query string: {exc}") from None
    for key, values in qs.items():
        if len(values) > 1:
            raise IngestError(400, f"query parameter {key!r} given {len(values)} times")
    one = {k: v[0] for k, v in qs.items()}
    if "name" not in one:
        raise IngestError(400, "missing 'name': expected name=<service>{k=v,...}")
    service, tags = parse_name(one["name"])
    fmt = one.get("format", "pprof") or "pprof"
    if fmt != "pprof":
        raise IngestError(400, f"unsupported format {fmt!r}: this server accepts format=pprof only")
    from_ns = _unix_seconds_to_ns(one["from"], "from") if one.get("from") else None
    until_ns = _unix_seconds_to_ns(one["until"], "until") if one.get("until") else None
    if from_ns is not None and until_ns is not None and until_ns < from_ns:
        raise IngestError(400, f"'until' ({one['until']}) is before 'from' ({one['from']})")
    sample_rate: int | None = None
    if one.get("sampleRate"):
        raw = one["sampleRate"]
        if not raw.isdigit() or not 0 < int(raw) <= 1_000_000:
            raise IngestError(400, f"bad 'sampleRate' {raw!r}: expected a positive integer (Hz)")
        sample_rate = int(raw)
    spy_name = one.get("spyName", "")
    if len(spy_name) > 128 or not all(c.isprintable() for c in spy_name):
        raise IngestError(400, "bad 'spyName': at most 128 printable characters")
    return IngestParams(
        service=service,
        tags=tags,
        from_ns=from_ns,
        until_ns=until_ns,
        format=fmt,
        sample_rate=sample_rate,
        spy_name=spy_name,
    )


def gunzip_capped(data: bytes, cap: int) -> bytes:
    """Inflate gzip ``data`` (one or more members) producing at most ``cap`` bytes.

    Raises :class:`IngestError`: 400 for corrupt or truncated gzip, 413 when the output would
    exceed ``cap`` (inflation stops there; the bomb is never expanded in memory).
    """
    return _gunzip(data, cap)[0]


def _gunzip(data: bytes, cap: int) -> tuple[bytes, bool]:
    """:func:`gunzip_capped`, plus whether ``data`` was nothing but gzip members (no padding)."""
    out = bytearray()
    rest = data
    clean = True
    while rest:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            # max_length = remaining budget + 1: getting that extra byte proves the cap is hit.
            out += inflater.decompress(rest, cap - len(out) + 1)
        except zlib.error as exc:
            raise IngestError(400, f"corrupt gzip body: {exc}") from None
        if len(out) > cap:
            raise IngestError(413, f"decompressed profile exceeds the limit of {cap} bytes")
        if not inflater.eof:
            raise IngestError(400, "corrupt gzip body: truncated stream")
        rest = inflater.unused_data
        if rest and not rest.startswith(_GZIP_MAGIC):
            if rest.strip(b"\x00"):
                raise IngestError(400, "corrupt gzip body: trailing garbage after the gzip stream")
            clean = False
            break
    return bytes(out), clean


def _multipart_profile(body: bytes, content_type: str) -> bytes:
    """The ``profile`` field of a multipart/form-data body (email's parser keeps bytes exact)."""
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    if not message.is_multipart():
        raise IngestError(400, "bad multipart/form-data body: no parts (missing or wrong boundary?)")
    fields: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            fields.setdefault(name, payload)
    if "profile" not in fields:
        raise IngestError(400, "multipart/form-data upload has no 'profile' field")
    config = fields.get("sample_type_config")
    if config is not None:
        try:
            parsed = json.loads(config)
        except (ValueError, UnicodeDecodeError):
            raise IngestError(400, "bad 'sample_type_config' field: not JSON") from None
        if not isinstance(parsed, dict):
            raise IngestError(400, "bad 'sample_type_config' field: expected a JSON object")
    return fields["profile"]


def extract_pprof_bytes(
    body: bytes, content_type: str, content_encoding: str, limits: IngestLimits
) -> bytes:
    """The plain (uncompressed) pprof bytes of an upload body.

    Handles ``Content-Encoding: gzip``, a multipart body with a ``profile`` field, and a gzipped
    or plain pprof payload. Raises :class:`IngestError`.
    """
    return _extract(body, content_type, content_encoding, limits)[0]


def _extract(
    body: bytes, content_type: str, content_encoding: str, limits: IngestLimits
) -> tuple[bytes, bytes | None]:
    """``(plain pprof, the payload's own gzip bytes when they can be stored as they are)``."""
    encoding = content_encoding.strip().lower()
    if encoding in ("gzip", "x-gzip"):
        body = gunzip_capped(body, limits.max_decompressed_bytes)
    elif encoding not in ("", "identity"):
        raise IngestError(415, f"unsupported Content-Encoding {content_encoding!r}: use gzip or none")
    if content_type.lower().startswith("multipart/"):
        if not content_type.lower().startswith("multipart/form-data"):
            raise IngestError(415, f"unsupported Content-Type {content_type!r}")
        body = _multipart_profile(body, content_type)
    if not body:
        raise IngestError(400, "empty profile body")
    original: bytes | None = None
    if body.startswith(_GZIP_MAGIC):
        plain, clean = _gunzip(body, limits.max_decompressed_bytes)
        original = body if clean else None
        body = plain
    if len(body) > limits.max_decompressed_bytes:
        raise IngestError(413, f"decompressed profile exceeds the limit of {limits.max_decompressed_bytes} bytes")
    if not body:
        raise IngestError(400, "empty profile after decompression")
    return body, original


def profile_type_ids(profile: Profile) -> list[tuple[str, int]]:
    """``(profile type id, value index)`` for every sample type of ``profile`` (see module doc)."""
    period_type, period_unit = profile.period_type or ("", "")
    period_series = _series_of(period_type) or _series_of_any(profile) or period_type or "unknown"
    out: list[tuple[str, int]] = []
    for index, (stype, sunit) in enumerate(profile.sample_types):
        series = _series_of(stype) or period_series
        if series == period_series and period_type:
            ptype, punit = period_type, period_unit
        else:
            ptype, punit = stype, sunit
        out.append((f"{series}:{stype}:{sunit}:{ptype}:{punit}", index))
    return out


def _series_of(sample_type: str) -> str | None:
    lowered = sample_type.lower()
    if "wall" in lowered:
        return "wall"
    if lowered.startswith(("alloc_", "inuse_")):
        return "memory"
    if "cpu" in lowered:
        return "process_cpu"
    if lowered in ("contentions", "delay"):
        return "block"
    return None


def _series_of_any(profile: Profile) -> str | None:
    for stype, _ in profile.sample_types:
        series = _series_of(stype)
        if series and series != "wall":
            return series
    return None


def series_labels(
    tags: tuple[tuple[str, str], ...], sample_labels: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, str], ...]:
    """The series labels of a sample: static tags plus its string labels (tags win on clash)."""
    merged = dict(
        (k, v) for k, v in sample_labels if k not in EXCLUDED_SAMPLE_LABELS and k != SERVICE_LABEL
    )
    merged.update(tags)
    return tuple(sorted(merged.items()))


def _check_profile(
    profile: Profile, tags: tuple[tuple[str, str], ...] = (), max_series: int | None = None
) -> frozenset[tuple[tuple[str, str], ...]]:
    """Check ``profile`` and sanitize its samples' label names in place (see ``labels``); returns
    its distinct series label sets.

    The excluded labels (``span_id``...) are kept as they are (their values within the value
    length limit); every other string label is sanitized like a series label, and each resulting
    series (``tags`` plus the labels) must stay within the label-count limit. No value may be
    negative, each sample type's total must stay within :data:`MAX_PROFILE_TOTAL`, and there may
    be at most ``max_series`` distinct series.
    """
    if not profile.sample_types:
        raise IngestError(400, "not a usable pprof profile: it has no sample types")
    width = len(profile.sample_types)
    done: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}
    series: set[tuple[tuple[str, str], ...]] = set()
    sums = [0] * width
    for sample in profile.samples:
        if len(sample.values) != width:
            raise IngestError(
                400, f"bad pprof profile: a sample has {len(sample.values)} values for {width} sample types"
            )
        for i, value in enumerate(sample.values):
            if value < 0:
                raise IngestError(
                    400, f"bad pprof profile: negative value {value} for sample type {profile.sample_types[i][0]!r}"
                )
            sums[i] += value
        clean = done.get(sample.labels)
        if clean is None:
            kept = tuple((k, v) for k, v in sample.labels if k in EXCLUDED_SAMPLE_LABELS)
            for key, text in kept:
                if len(text) > MAX_LABEL_VALUE_LENGTH:
                    raise IngestError(
                        400,
                        f"label {key!r} in a pprof sample's labels: value longer than {MAX_LABEL_VALUE_LENGTH} "
                        "characters",
                    )
            rest = [(k, v) for k, v in sample.labels if k not in EXCLUDED_SAMPLE_LABELS]
            clean = _sanitized_labels(rest, where="a pprof sample's labels") + kept
            merged = series_labels(tags, clean)
            _check_series_size(merged, where="a series (tags and pprof sample labels)")
            series.add(merged)
            if max_series is not None and len(series) > max_series:
                raise IngestError(400, _too_many_series(f"more than {max_series}", max_series))
            done[sample.labels] = clean
        sample.labels = clean
    requests: dict[tuple[tuple[str, str], ...], int] = {}
    for labels, count in profile.requests.items():
        if count > MAX_PROFILE_TOTAL:
            raise IngestError(400, f"bad pprof profile: a request count of {count}")
        rest = [(k, v) for k, v in labels if k not in EXCLUDED_SAMPLE_LABELS]
        clean = tuple(sorted(_sanitized_labels(rest, where="a pprof request count's labels")))
        merged = series_labels(tags, clean)
        _check_series_size(merged, where="a series (tags and request count labels)")
        series.add(merged)  # request counts open series too: under the same cap
        if max_series is not None and len(series) > max_series:
            raise IngestError(400, _too_many_series(f"more than {max_series}", max_series))
        requests[clean] = requests.get(clean, 0) + count
    profile.requests = requests
    for i, total in enumerate(sums):
        if total > MAX_PROFILE_TOTAL:
            raise IngestError(
                400,
                f"bad pprof profile: sample type {profile.sample_types[i][0]!r} totals {total}, "
                f"beyond the limit of {MAX_PROFILE_TOTAL} (2**53-1) per profile",
            )
    if not series:
        series.add(tuple(tags))  # an empty profile marks its static tags' series
    return frozenset(series)


def _too_many_series(count: str, limit: int) -> str:
    return (
        f"too many series in one upload: {count} distinct label sets (tags plus pprof sample labels), "
        f"limit {limit} (${SERIES_PER_UPLOAD_ENV}); a label with a value per request or per user "
        "(ids, URLs with parameters) makes a series each: keep such values out of labels"
    )


def decode_upload(
    query: str,
    headers: Mapping[str, str],
    body: bytes,
    limits: IngestLimits,
    now_ns: int | None = None,
) -> Upload:
    """Decode one upload completely (params, body, pprof); raises :class:`IngestError`.

    ``headers`` keys are matched case-insensitively by the caller (an ``email.message.Message``
    or any mapping with lower-case keys works).
    """
    from middleware.pprof import ProfileError, parse_pprof

    params = parse_ingest_query(query)
    plain, original_gz = _extract(
        body,
        headers.get("content-type", "") or "",
        headers.get("content-encoding", "") or "",
        limits,
    )
    try:
        profile = parse_pprof(plain)
    except ProfileError as exc:
        raise IngestError(400, f"not a pprof profile: {exc}") from None
    except Exception as exc:  # a parser bug must not become a 500 for the uploader
        log.warning("pprof parser failed on an upload: %r", exc)
        raise IngestError(400, f"not a pprof profile: {exc}") from None
    upload = upload_from_profile(
        params, profile, plain, tenant=headers.get("x-scope-orgid", "") or "", now_ns=now_ns, limits=limits
    )
    upload.pprof_gz = original_gz
    return upload


def upload_from_profile(
    params: IngestParams,
    profile: Profile,
    plain: bytes,
    *,
    tenant: str = "",
    now_ns: int | None = None,
    default_start_ns: int | None = None,
    limits: IngestLimits | None = None,
) -> Upload:
    """Check a parsed profile and wrap it as an :class:`Upload` (raises :class:`IngestError`).

    The window is ``from``/``until`` when given, else the pprof's ``time_nanos`` and
    ``duration_nanos``, else ``default_start_ns``, else now. ``limits`` gives the series cap
    (default: :class:`IngestLimits`' defaults).
    """
    limits = limits if limits is not None else IngestLimits()
    series = _check_profile(profile, params.tags, limits.max_series_per_upload)
    start_ns, end_ns = _window(params, profile, default_start_ns if default_start_ns is not None else now_ns)
    return Upload(
        params=params,
        profile=profile,
        pprof_plain=plain,
        start_ns=start_ns,
        end_ns=end_ns,
        tenant=tenant[:128],
        type_ids=profile_type_ids(profile),
        series=series,
    )


def _window(params: IngestParams, profile: Profile, now_ns: int | None) -> tuple[int, int]:
    """The profile's time window: ``from``/``until`` when given, else the pprof's own, else now.

    ``from``/``until`` have one-second resolution (agents send ``floor(start)`` and
    ``ceil(end)``); when the pprof's own nanosecond window agrees with them to the second, the
    precise one is kept, so the same profile has the same window whether it was uploaded or
    imported from the local store (which makes duplicates recognisable, see the store).
    """
    second = 1_000_000_000
    pprof_start = int(profile.time_nanos) if profile.time_nanos > 0 else None
    pprof_end = pprof_start + int(profile.duration_nanos) if pprof_start and profile.duration_nanos > 0 else None
    if pprof_end is not None and pprof_end > INT64_MAX:
        raise IngestError(
            400,
            f"bad pprof profile: time_nanos + duration_nanos = {pprof_end} is beyond the int64 nanoseconds "
            "of the year 2262",
        )
    if params.from_ns is not None:
        start = params.from_ns
        if pprof_start is not None and params.from_ns <= pprof_start < params.from_ns + second:
            start = pprof_start
    elif pprof_start is not None:
        start = pprof_start
    else:
        start = now_ns if now_ns is not None else time.time_ns()
    if params.until_ns is not None:
        end = params.until_ns
        if pprof_end is not None and params.until_ns - second < pprof_end <= params.until_ns:
            end = pprof_end
    elif pprof_end is not None and pprof_start == start:
        end = pprof_end
    else:
        end = max(start, params.from_ns or start)
    if end < start:
        raise IngestError(400, "'until' is before the profile's start")
    if not (0 <= start <= INT64_MAX and 0 <= end <= INT64_MAX):
        raise IngestError(400, f"profile window {start}..{end} ns is outside int64 nanoseconds (the year 2262)")
    return start, end


# ------------------------------------------------------------------------------------------------
# The newer push API: POST /push.v1.PusherService/Push (Connect protocol)
# ------------------------------------------------------------------------------------------------
#
# The messages are declared once, in proto/push.proto, which the native uploader's encoder is
# generated from as well; middleware/_proto/push_pb2.py is its generated Python side.


def _push_request_class() -> Any:
    """The generated ``push.v1.PushRequest`` class (imported at the first push)."""
    from middleware._proto.push_pb2 import PushRequest

    return PushRequest


def decode_push(
    headers: Mapping[str, str], body: bytes, limits: IngestLimits, now_ns: int | None = None
) -> list[Upload]:
    """Decode a ``PushRequest`` (``application/proto``, or Connect's ``application/json``).

    Every profile of every series is decoded before anything is stored; one bad profile refuses
    the whole request (400). The series' ``service_name`` label is the service, its other labels
    (except ``__name__``) are static tags, their names sanitized (``otel.scope.name`` ->
    ``otel_scope_name``, see :mod:`middleware.serve.labels`). Each raw profile's window is its
    pprof's own.
    """
    from google.protobuf import json_format
    from google.protobuf.message import DecodeError

    from middleware.pprof import ProfileError, parse_pprof

    encoding = (headers.get("content-encoding", "") or "").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        body = gunzip_capped(body, limits.max_decompressed_bytes)
    elif encoding not in ("", "identity"):
        raise IngestError(415, f"unsupported Content-Encoding {encoding!r}")
    ctype = (headers.get("content-type", "") or "").split(";")[0].strip().lower()
    cls = _push_request_class()
    request = cls()
    try:
        if ctype in ("application/proto", "application/protobuf", "application/x-protobuf", ""):
            request.ParseFromString(body)
        elif ctype == "application/json":
            json_format.Parse(body.decode("utf-8"), request)
        else:
            raise IngestError(415, f"unsupported Content-Type {ctype!r}: use application/proto or application/json")
    except (DecodeError, json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
        raise IngestError(400, f"not a push.v1.PushRequest: {exc}") from None
    if not request.series:
        raise IngestError(400, "PushRequest has no series")
    uploads: list[Upload] = []
    request_series: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    budget = limits.max_decompressed_bytes
    for series in request.series:
        labels: dict[str, str] = {}
        for pair in series.labels:
            if pair.name in labels:
                raise IngestError(400, f"label {pair.name!r} repeated in a series")
            labels[pair.name] = pair.value
        service = labels.pop(SERVICE_LABEL, "")
        labels.pop("__name__", None)
        if not service or not _SERVICE_RE.match(service):
            raise IngestError(400, f"series without a valid {SERVICE_LABEL!r} label ({service!r})")
        tags = _sanitized_labels(list(labels.items()), where=f"a push series of {service!r}")
        for key, value in tags:
            if key == SERVICE_LABEL and value != service:
                raise IngestError(
                    400,
                    f"a push series of {service!r} has a second, different service name {value!r} (dots become '_')",
                )
        tags = tuple((k, v) for k, v in tags if k != SERVICE_LABEL)
        _check_series_size(tags, where=f"a push series of {service!r}")
        params = IngestParams(service=service, tags=tags, spy_name="push")
        for raw in series.samples:
            data = bytes(raw.raw_profile)
            if not data:
                raise IngestError(400, "empty raw_profile in a push series")
            plain = gunzip_capped(data, budget) if data.startswith(_GZIP_MAGIC) else data
            budget -= len(plain)
            if budget < 0:
                raise IngestError(
                    413, f"decompressed profiles exceed the limit of {limits.max_decompressed_bytes} bytes"
                )
            try:
                profile = parse_pprof(plain)
            except ProfileError as exc:
                raise IngestError(400, f"not a pprof profile: {exc}") from None
            tenant = headers.get("x-scope-orgid", "") or ""
            upload = upload_from_profile(params, profile, plain, tenant=tenant, now_ns=now_ns, limits=limits)
            request_series.update((service, labels) for labels in upload.series)
            if len(request_series) > limits.max_series_per_upload:
                raise IngestError(
                    400, _too_many_series(f"more than {limits.max_series_per_upload} (over all series of the push)",
                                          limits.max_series_per_upload)
                )
            uploads.append(upload)
    return uploads
