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
import sqlite3
from collections.abc import Mapping

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


def insert_span_rows(conn: sqlite3.Connection, profile_id: int, start_ns: int,
                     span_values: Mapping[tuple[int, int, int, int], int], span_traces: Mapping[str, str]) -> None:
    """Writes a profile's ``span_samples`` rows ((span, series, type, stack) -> value) and the
    ``span_traces`` of those spans (span id -> trace id from the profile's ``mw:spans``); the
    store's writer thread, inside its transaction."""
    if not span_values:
        return
    conn.executemany(
        "INSERT INTO span_samples(profile_id, span_id, series_id, stype, stack_id, start_ns, value) "
        "VALUES(?, ?, ?, ?, ?, ?, ?)",
        [(profile_id, k, sid, stype, stack, start_ns, v) for (k, sid, stype, stack), v in span_values.items()],
    )
    spans = {key[0] for key in span_values}
    traces: list[tuple[int, bytes]] = []
    for span_text, trace_text in span_traces.items():
        span, trace = span_key(span_text), trace_key(trace_text)
        if span is not None and span in spans and trace is not None:
            traces.append((span, trace))
    conn.executemany("INSERT OR REPLACE INTO span_traces(span_id, trace_id) VALUES(?, ?)", traces)
