"""Span and trace ids as ``serve`` stores and queries them.

A sample of a request the agent traced carries the label ``span_id``: the id of the request's
local root span, 16 lowercase hex digits (OpenTelemetry's 8-byte span id). The store keeps it as
the signed 64-bit integer of the same bits (an SQLite ``INTEGER``: half the bytes of the text, and
the key of an integer index); the trace of each span comes with the profile (``mw:spans``
comments, :attr:`middleware.profile.Profile.span_traces`) and is stored as its 16 bytes.

Pure functions, no state: any thread may call them.
"""

from __future__ import annotations

import re

__all__ = [
    "SPAN_LABEL",
    "span_key",
    "span_hex",
    "trace_key",
    "trace_hex",
    "parse_span_id",
    "parse_trace_id",
]

#: The sample label holding the span id (never a series label).
SPAN_LABEL = "span_id"
_ANY_CASE_SPAN_RE = re.compile(r"[0-9a-fA-F]{16}\Z")
_SPAN_RE = re.compile(r"[0-9a-f]{16}\Z")
_TRACE_RE = re.compile(r"[0-9a-f]{32}\Z")
_ANY_CASE_TRACE_RE = re.compile(r"[0-9a-fA-F]{32}\Z")
_TWO_64 = 1 << 64
_TWO_63 = 1 << 63


def span_key(text: str) -> int | None:
    """The stored key of a sample's ``span_id`` value: 16 hex digits (either case) as a signed
    64-bit integer; None for any other value (not indexed by span)."""
    if not _ANY_CASE_SPAN_RE.match(text):
        return None
    value = int(text, 16)
    return value - _TWO_64 if value >= _TWO_63 else value


def span_hex(key: int) -> str:
    """The span id (16 lowercase hex digits) of a stored key."""
    return format(key % _TWO_64, "016x")


def trace_key(text: str) -> bytes | None:
    """The stored key of a trace id, 32 hex digits (either case): its 16 bytes; None for any
    other value."""
    if not _ANY_CASE_TRACE_RE.match(text):
        return None
    return bytes.fromhex(text)


def trace_hex(key: bytes) -> str:
    """The trace id (32 lowercase hex digits) of a stored key."""
    return bytes(key).hex()


def parse_span_id(text: str) -> int:
    """A span id given to a query: exactly 16 lowercase hex digits, else :class:`ValueError`
    with a message for the user."""
    if not _SPAN_RE.match(text):
        raise ValueError(
            f"bad 'span_id' {text[:64]!r}: expected 16 lowercase hex digits (an OpenTelemetry span id)"
        )
    key = span_key(text)
    assert key is not None
    return key


def parse_trace_id(text: str) -> bytes:
    """A trace id given to a query: exactly 32 lowercase hex digits, else :class:`ValueError`."""
    if not _TRACE_RE.match(text):
        raise ValueError(
            f"bad 'trace_id' {text[:80]!r}: expected 32 lowercase hex digits (an OpenTelemetry trace id)"
        )
    return bytes.fromhex(text)
