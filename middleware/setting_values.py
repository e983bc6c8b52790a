"""The parsers of setting values (:mod:`middleware.config`'s table): each takes the text of an
argument or a variable and returns the value, or raises ``ValueError`` saying what was expected
(the resolver turns that into one warning and the default)."""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from urllib.parse import unquote

#: The exporters ``MW_PROFILING_EXPORTER`` accepts.
EXPORTERS = ("pyroscope", "otlp")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TENANT = re.compile(r"[A-Za-z0-9_.-]{1,128}\Z")


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


def quiet_flag(text: str) -> bool:
    """Exactly ``1``, ``true`` or ``yes``, as the native side reads the variable; never raises."""
    return text in ("1", "true", "yes")


def store_dir(text: str) -> str | None:
    """A directory, made absolute now (``~`` expanded): an app that changes its working directory
    later (a daemon's ``chdir("/")``) keeps writing where it was asked to. ``none``, ``off`` or
    nothing: no local store."""
    if text.strip().lower() in ("", "none", "off"):
        return None
    return os.path.abspath(os.path.expanduser(text))


def http_url(text: str) -> str:
    url = text.strip()
    if not re.match(r"https?://[^/?#\s]+", url, re.IGNORECASE):
        raise ValueError("must be an http:// or https:// URL")
    if _CONTROL.search(url) or " " in url:
        raise ValueError("contains spaces or control characters")
    return url


#: Where distributions keep the system's CA certificates (one PEM file): Debian/Ubuntu, RHEL/Fedora,
#: openSUSE, older RHEL, Alpine-style. The uploader's libcurl may have been built on another
#: distribution (a binary wheel), so the file is found here rather than taken from its build.
SYSTEM_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/ssl/cert.pem",
)


def system_ca_file() -> str | None:
    return next((f for f in SYSTEM_CA_FILES if os.path.isfile(f)), None)


def ca_file(text: str) -> str:
    path = os.path.expanduser(text.strip())
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError("not a readable file")
    return path


def ca_dir(text: str) -> str:
    path = os.path.expanduser(text.strip())
    if not os.path.isdir(path):
        raise ValueError("not a directory")
    return path


def header_value(text: str) -> str:
    v = text.strip()
    if not v:
        raise ValueError("empty")
    if _CONTROL.search(v):
        raise ValueError("contains control characters")
    return v


def exporter(text: str) -> str:
    v = text.strip().lower()
    if v not in EXPORTERS:
        raise ValueError("expected " + " or ".join(EXPORTERS))
    return v


def compression(text: str) -> str:
    v = text.strip().lower()
    if v not in ("gzip", "none"):
        raise ValueError("expected gzip or none")
    return v


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}\Z")


def kv_part(part: str) -> tuple[str, str]:
    """One ``key=value`` of OpenTelemetry's lists (OTEL_EXPORTER_OTLP_HEADERS, OTEL_RESOURCE_ATTRIBUTES):
    key and value stripped and percent-decoded; ValueError without ``=`` or with an empty key."""
    key, sep, value = part.partition("=")
    key = unquote(key.strip())
    if not sep:
        raise ValueError("expected key=value pairs separated by commas")
    if not key:
        raise ValueError("a key is empty")
    return key, unquote(value.strip())


def kv_list(text: str) -> list[tuple[str, str]]:
    """Every ``key=value`` of a comma-separated list (:func:`kv_part`); blank parts skipped."""
    return [kv_part(part) for part in text.split(",") if part.strip()]


def otlp_headers(text: str) -> tuple[tuple[str, str], ...]:
    pairs = kv_list(text)
    for k, v in pairs:
        if not _HEADER_NAME.match(k):
            raise ValueError(f"{k[:64]!r} is not an HTTP header name")
        if _CONTROL.search(v):
            raise ValueError(f"the value of {k[:64]!r} contains control characters")
    return tuple(pairs)


def tenant(text: str) -> str:
    v = text.strip()
    if not _TENANT.match(v):
        raise ValueError("must match [A-Za-z0-9_.-]{1,128}")
    return v
