"""Retention of ``serve``'s store: the oldest data goes first, by age and by size.

Two bounds, either may be off: ``--retention`` (``$MW_SERVE_RETENTION``, default 7 days) drops
profiles whose window started longer ago than that; ``--max-size`` (``$MW_SERVE_MAX_SIZE``,
default 2 GiB) drops the oldest profiles while the data kept is larger than that. A profile goes
with everything indexed from it (its samples, totals, request counts and span rows, and the
trace of each span no remaining profile carries); call stacks and series are shared by
many profiles and stay (they are a small part of the store). What a restart keeps: the bounds
given last (by option or variable) are written in the store and used when none is given.

How, without blocking ingest or queries: the store's single writer thread runs :func:`step`
between write batches, each step one short transaction deleting at most ``batch`` of the
oldest profiles (uploads queued meanwhile are written before the next step); readers use their
own connections and never wait. A step that found more to delete is followed by another at
once, else the next runs ``interval_s`` later.

Size is the pages the data occupies (``page_count - freelist_count``): pages freed by a
deletion are reused by the next uploads. A store created by this version is in SQLite's
incremental auto-vacuum mode, so freed pages are also given back to the file system after each
step; an older store's file keeps its size (its free pages are still reused).
"""
from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass

__all__ = ["RetentionPolicy", "parse_duration", "parse_size", "used_bytes", "step", "span",
           "RETENTION_ENV", "MAX_SIZE_ENV", "DEFAULT_RETENTION_S", "DEFAULT_MAX_BYTES"]

RETENTION_ENV = "MW_SERVE_RETENTION"
MAX_SIZE_ENV = "MW_SERVE_MAX_SIZE"
DEFAULT_RETENTION_S = 7 * 86400.0
DEFAULT_MAX_BYTES = 2 << 30
_OFF = ("0", "off", "none", "forever", "unlimited")
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*\Z", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str) -> float | None:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"90s"``, ``"2w"`` or seconds -> seconds; ``"0"``/``"off"``:
    no bound (None). ValueError otherwise."""
    if text.strip().lower() in _OFF:
        return None
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"bad duration {text!r} (examples: 7d, 12h, 30m, 3600; off)")
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    if seconds <= 0:
        return None
    return seconds


def parse_size(text: str) -> int | None:
    """``"2GiB"``, ``"2G"``, ``"500MB"``, ``"512k"`` or bytes -> bytes (K, M, G, T are powers of
    1024, with or without ``i``/``B``); ``"0"``/``"off"``: no bound (None). ValueError otherwise."""
    if text.strip().lower() in _OFF:
        return None
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"bad size {text!r} (examples: 2GiB, 500M, 1048576; off)")
    size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    return size if size > 0 else None


@dataclass(frozen=True)
class RetentionPolicy:
    """What the store keeps (None: no bound) and how it gets there."""

    max_age_s: float | None = DEFAULT_RETENTION_S
    max_bytes: int | None = DEFAULT_MAX_BYTES
    interval_s: float = 10.0  # between steps, when the last one had nothing more to delete
    batch: int = 50  # profiles deleted per transaction at most

    @property
    def bounded(self) -> bool:
        return self.max_age_s is not None or self.max_bytes is not None


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the pages holding data (free pages, reused by the next writes, not counted)."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int(page_size) * max(0, int(pages) - int(free))


def file_bytes(path: str) -> int:
    """The store's size on disk: the database file and its write-ahead log."""
    total = 0
    for p in (path, path + "-wal"):
        try:
            total += os.path.getsize(p)
        except OSError:
            pass
    return total


def step(conn: sqlite3.Connection, policy: RetentionPolicy, now_ns: int) -> int:
    """One transaction on the writer's connection: deletes up to ``policy.batch`` of the oldest
    profiles that are past the age bound, or while the data is over the size bound. Returns how
    many profiles were deleted (``policy.batch``: there may be more)."""
    if not policy.bounded:
        return 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = conn.execute("SELECT id, start_ns FROM profiles ORDER BY start_ns, id LIMIT ?",
                            (policy.batch,)).fetchall()
        victims: list[tuple[int, int]] = []
        if rows and policy.max_bytes is not None and used_bytes(conn) > policy.max_bytes:
            victims = rows
        elif rows and policy.max_age_s is not None:
            cutoff = now_ns - int(policy.max_age_s * 1e9)
            victims = [r for r in rows if r[1] < cutoff]
        if victims:
            _delete(conn, victims)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if victims:
        conn.execute("PRAGMA incremental_vacuum").fetchall()  # a no-op unless the store was made in that mode
    return len(victims)


def _delete(conn: sqlite3.Connection, victims: list[tuple[int, int]]) -> None:
    ids = [v[0] for v in victims]
    lo, hi = min(v[1] for v in victims), max(v[1] for v in victims)
    marks = ",".join("?" * len(ids))
    stypes = [r[0] for r in conn.execute(f"SELECT DISTINCT stype FROM totals WHERE profile_id IN ({marks})", ids)]
    for stype in stypes:  # through samples' (stype, start_ns) index, not a scan of the table
        conn.execute(
            f"DELETE FROM samples WHERE stype=? AND start_ns BETWEEN ? AND ? AND profile_id IN ({marks})",
            (stype, lo, hi, *ids),
        )
    conn.execute(f"DELETE FROM totals WHERE profile_id IN ({marks})", ids)
    conn.execute(f"DELETE FROM requests WHERE profile_id IN ({marks})", ids)
    _delete_spans(conn, ids, marks)
    conn.execute(f"UPDATE imported_files SET profile_id=NULL WHERE profile_id IN ({marks})", ids)
    conn.execute(f"DELETE FROM profiles WHERE id IN ({marks})", ids)


def _delete_spans(conn: sqlite3.Connection, ids: list[int], marks: str) -> None:
    """The span rows of the profiles ``ids``, and the trace of each of their spans that no other
    profile's samples carry any more."""
    rows = conn.execute(f"SELECT DISTINCT span_id FROM span_samples WHERE profile_id IN ({marks})", ids)
    spans = [int(r[0]) for r in rows]
    if not spans:
        return
    conn.execute(f"DELETE FROM span_samples WHERE profile_id IN ({marks})", ids)
    for n in range(0, len(spans), 500):
        # span keys are integers from our own table: inlined (no bound-parameter limit)
        chunk = ",".join(str(int(s)) for s in spans[n : n + 500])
        conn.execute(
            f"DELETE FROM span_traces WHERE span_id IN ({chunk}) AND NOT EXISTS "
            "(SELECT 1 FROM span_samples s WHERE s.span_id = span_traces.span_id)"
        )


def span(conn: sqlite3.Connection) -> tuple[int | None, int | None, int]:
    """(oldest window start, newest window end, profiles) of the data kept."""
    oldest, newest, count = conn.execute("SELECT MIN(start_ns), MAX(end_ns), COUNT(*) FROM profiles").fetchone()
    return oldest, newest, int(count)
