"""SQLite storage for ``python -m middleware serve``.

What is stored, and why this shape
----------------------------------
Each accepted upload (or imported file) becomes one row of ``profiles`` holding the **gzipped
pprof exactly as received** (the lossless source of truth: every sample, label, line and sample
type survives, and it can be handed back as pprof) plus its service, tags, time window, sample
rate, spy name and source. Beside it, in the same transaction, a **normalised index** is written
so that no query ever has to parse a blob:

* ``series`` / ``series_labels`` — one row per distinct (service, label set); a label set is the
  upload's static tags plus a sample's string labels (minus ``span_id``/``trace_id``/
  ``profile_id``). Label names/values and selectors are answered from here.
* ``service_types`` — the profile types of each service; its integer id (``stype``) keys the
  two tables below, so every query filters on one small integer plus a time range.
* ``stacks`` — every distinct call stack once (deduplicated by a digest across all uploads:
  an app has far fewer distinct stacks than samples).
* ``samples`` — per (profile, series, stack, profile type) the value, with the profile's start
  time copied in. A merged flame graph is one indexed ``GROUP BY stack_id`` in SQLite.
* ``totals`` — per (profile, series, profile type) the sum; the timeline is a ``GROUP BY`` on it.
* ``requests`` — per (profile, series) the requests the agent counted in the profile's window
  (its ``mw:requests`` comments; the series is the upload's tags plus the request's labels, e.g.
  ``endpoint``, ``version``, ``pid``), so a merge can also say how many requests its cost served.
* ``span_samples`` — per (profile, span, series, profile type, stack) the value of the samples
  that carry a ``span_id`` label (the request's local root span, 16 hex digits, stored as the
  signed 64-bit integer of its bits). A span id is never a series label (one series per request
  would slow every query): the samples are counted in ``samples``/``totals`` like any other, and
  this table holds, beside them, which span each value came from, indexed by span id. The
  flame graph of one request is one indexed lookup of its few rows.
* ``span_traces`` — span id -> trace id (16 bytes) of the spans in ``span_samples``, from the
  profiles' ``mw:spans`` comments (:attr:`middleware.profile.Profile.span_traces`), indexed by
  trace id: the samples of a trace are those of its spans.

A ``span_id`` value that is not 16 hex digits (another client's) is kept in the pprof blob and in
every total, but not indexed by span (said once per service in the log).

Normalising costs some work per upload (a few hundred small rows, written in one
``executemany``), which the single writer absorbs; in exchange a query over an hour or a day of
uploads costs milliseconds instead of re-parsing every pprof (measured: merging 1000 uploads of
120 stacks takes ~0.1 s this way versus ~7 s parsing the blobs).

Series cap
----------
A service has at most ``max_series_per_service`` series (label sets). A sample whose label set
would open a series beyond the cap is stored in the service's one **overflow series**, labelled
only ``__series_overflow__="true"`` (a reserved name no upload can send): its values still count
in every total, flame graph and timeline of the service, only the breakdown by its labels is
lost. Each upload records how many samples and label sets went there
(``Upload.overflow_samples``/``overflow_series``, which the server reports in its answer), the
store counts them (:attr:`Store.overflow_samples`), and the first overflow of each service is
logged as a warning. The profile's own pprof blob keeps every label.

Duplicates
----------
A profile is identified by (service, window start, digest of its pprof bytes). The same profile
arriving again — an agent retrying after its answer was lost, or a local-store file of a profile
that was also uploaded — is acknowledged with the stored profile's id and not counted twice.

Retention
---------
The oldest profiles go (by age and by size, :mod:`middleware.serve.retention`), deleted by the
writer thread between write batches in short transactions.

Concurrency
-----------
The database runs in WAL mode. All writes go through **one writer thread** owning the only
writing connection: request threads hand it a decoded upload and block until the transaction
that contains it has committed (group commit: the writer drains whatever is queued into one
transaction). An upload is acknowledged with 200 only after its commit, so an accepted upload is
never lost. Readers use a small pool of separate read-only connections with a busy timeout, so UI
queries never block uploads and vice versa.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from middleware.profile import Frame
from middleware.serve import retention as _retention
from middleware.serve.ingest import Upload, series_labels
from middleware.serve.retention import RetentionPolicy
from middleware.serve.spans import SPAN_LABEL, insert_span_rows, span_key

log = logging.getLogger(__name__)

__all__ = ["Store", "StoreClosed", "ImportedFile", "SeriesRow", "OVERFLOW_LABEL", "OVERFLOW_LABELS"]

#: The label of the overflow series of a service (``__`` names are refused in uploads).
OVERFLOW_LABEL = "__series_overflow__"
OVERFLOW_LABELS: tuple[tuple[str, str], ...] = ((OVERFLOW_LABEL, "true"),)

DB_FILENAME = "profiles.sqlite3"
SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS profiles(
    id INTEGER PRIMARY KEY,
    service TEXT NOT NULL,
    tags TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    sample_rate INTEGER,
    spy_name TEXT NOT NULL DEFAULT '',
    tenant TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL,
    sample_types TEXT NOT NULL,
    period INTEGER NOT NULL DEFAULT 0,
    digest BLOB NOT NULL,
    pprof_gz BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS profiles_by_service_time ON profiles(service, start_ns);
CREATE INDEX IF NOT EXISTS profiles_by_time ON profiles(start_ns);
CREATE UNIQUE INDEX IF NOT EXISTS profiles_unique ON profiles(service, start_ns, digest);
CREATE TABLE IF NOT EXISTS series(
    id INTEGER PRIMARY KEY,
    service TEXT NOT NULL,
    labels TEXT NOT NULL,
    UNIQUE(service, labels)
);
CREATE TABLE IF NOT EXISTS series_labels(
    series_id INTEGER NOT NULL REFERENCES series(id),
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY(series_id, name)
);
CREATE INDEX IF NOT EXISTS series_labels_by_name ON series_labels(name, value);
CREATE TABLE IF NOT EXISTS service_types(
    id INTEGER PRIMARY KEY,
    service TEXT NOT NULL,
    type_id TEXT NOT NULL,
    UNIQUE(service, type_id)
);
CREATE TABLE IF NOT EXISTS stacks(
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL UNIQUE,
    frames TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS totals(
    profile_id INTEGER NOT NULL REFERENCES profiles(id),
    series_id INTEGER NOT NULL REFERENCES series(id),
    stype INTEGER NOT NULL REFERENCES service_types(id),
    start_ns INTEGER NOT NULL,
    total INTEGER NOT NULL,
    PRIMARY KEY(profile_id, series_id, stype)
);
CREATE INDEX IF NOT EXISTS totals_by_query ON totals(stype, start_ns);
CREATE TABLE IF NOT EXISTS samples(
    profile_id INTEGER NOT NULL REFERENCES profiles(id),
    series_id INTEGER NOT NULL REFERENCES series(id),
    stype INTEGER NOT NULL REFERENCES service_types(id),
    stack_id INTEGER NOT NULL REFERENCES stacks(id),
    start_ns INTEGER NOT NULL,
    value INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_query ON samples(stype, start_ns);
CREATE TABLE IF NOT EXISTS requests(
    profile_id INTEGER NOT NULL REFERENCES profiles(id),
    series_id INTEGER NOT NULL REFERENCES series(id),
    start_ns INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY(profile_id, series_id)
);
CREATE INDEX IF NOT EXISTS requests_by_time ON requests(start_ns);
CREATE TABLE IF NOT EXISTS span_samples(
    profile_id INTEGER NOT NULL REFERENCES profiles(id),
    span_id INTEGER NOT NULL,
    series_id INTEGER NOT NULL REFERENCES series(id),
    stype INTEGER NOT NULL REFERENCES service_types(id),
    stack_id INTEGER NOT NULL REFERENCES stacks(id),
    start_ns INTEGER NOT NULL,
    value INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS span_samples_by_span ON span_samples(span_id, stype);
CREATE INDEX IF NOT EXISTS span_samples_by_profile ON span_samples(profile_id);
CREATE TABLE IF NOT EXISTS span_traces(
    span_id INTEGER PRIMARY KEY,
    trace_id BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS span_traces_by_trace ON span_traces(trace_id);
CREATE TABLE IF NOT EXISTS imported_files(
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    profile_id INTEGER,
    error TEXT
);
"""

#: Store(): the retention bounds written in the store last (else the defaults).
STORED: Any = object()
_RETAIN: Any = object()  # the writer's own wake-up for a retention step

Labels = tuple[tuple[str, str], ...]
Stack = tuple[Frame, ...]
_WRITER_CACHE_MAX = 200_000
_READER_STACK_CACHE_MAX = 200_000


def _labels_key(labels: Labels) -> str:
    """Canonical text of a sorted label tuple (used as a unique key and stored as JSON)."""
    return json.dumps([list(pair) for pair in labels], separators=(",", ":"))


def labels_from_key(text: str) -> Labels:
    return tuple((str(k), str(v)) for k, v in json.loads(text))


def _stack_text(stack: Stack) -> str:
    return json.dumps([[f.function, f.file, f.line] for f in stack], separators=(",", ":"))


class StoreClosed(RuntimeError):
    """The store was closed while a write was pending."""


@dataclass(frozen=True)
class ImportedFile:
    """Bookkeeping for a file of the local store (see :mod:`middleware.serve.importer`)."""

    path: str
    size: int
    mtime_ns: int
    error: str | None = None


@dataclass(frozen=True)
class SeriesRow:
    id: int
    labels: Labels


@dataclass
class _WriteJob:
    uploads: list[Upload]
    source: str
    imported: ImportedFile | None
    future: Future[list[int]]


class Store:
    """The SQLite store under ``data_dir`` (created if missing).

    Thread-safe: any thread may call any method. Call :meth:`close` when done.
    """

    def __init__(
        self,
        data_dir: str,
        *,
        read_connections: int = 4,
        busy_timeout_ms: int = 10_000,
        max_batch: int = 128,
        max_series_per_service: int | None = None,
        max_age_s: float | None | object = STORED,
        max_bytes: int | None | object = STORED,
        retention_interval_s: float = 10.0,
    ) -> None:
        """``max_age_s`` / ``max_bytes``: the retention bounds (None: none); :data:`STORED` (the
        default): those this store was last given, else 7 days and 2 GiB. See
        :mod:`middleware.serve.retention`."""
        os.makedirs(data_dir, exist_ok=True)
        self.max_series_per_service = max_series_per_service
        self.path = os.path.join(data_dir, DB_FILENAME)
        self._busy_timeout_ms = busy_timeout_ms
        self._max_batch = max_batch
        self._writer_conn = self._connect(write=True)
        self._init_schema(self._writer_conn)
        self.retention = self._retention_policy(max_age_s, max_bytes, retention_interval_s)
        #: Profiles deleted by retention since the start, and the last retention failure.
        self.retention_deleted = 0
        self.retention_error: str | None = None
        self._jobs: queue.Queue[_WriteJob | None] = queue.Queue()
        self._closed = False
        self._close_lock = threading.Lock()
        self._readers: queue.Queue[sqlite3.Connection] = queue.Queue()
        self._all_readers: list[sqlite3.Connection] = []
        for _ in range(max(1, read_connections)):
            conn = self._connect(write=False)
            self._readers.put(conn)
            self._all_readers.append(conn)
        # Writer-thread-only caches of ids (cleared when a transaction rolls back).
        self._w_stacks: dict[Stack, int] = {}
        self._w_series: dict[tuple[str, Labels], int] = {}
        self._w_stypes: dict[tuple[str, str], int] = {}
        self._w_series_count: dict[str, int] = {}  # service -> its number of series
        self._overflow_warned: set[str] = set()
        self._span_warned: set[str] = set()  # services told once that some span ids are not indexed
        #: Samples (and uploads holding any) stored in an overflow series since the start.
        self.overflow_samples = 0
        self.overflow_uploads = 0
        # Reader cache: stack id -> frames (rows never change, so it never goes stale).
        self._r_stacks: dict[int, Stack] = {}
        self._r_frames: dict[tuple[str, str, int], Frame] = {}
        self._r_lock = threading.Lock()
        self.writes_committed = 0
        self._writer = threading.Thread(target=self._writer_loop, name="mw-serve-writer", daemon=True)
        self._writer.start()

    # -- connections -------------------------------------------------------------------------

    def _connect(self, write: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout_ms / 1000,
            check_same_thread=False,
            isolation_level=None,  # explicit BEGIN/COMMIT
        )
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
        if write:
            # Only takes effect on a new, empty database: freed pages go back to the file system.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a process crash; only an OS crash or power
            # loss can lose the last transactions. Fine for a local collector, and much faster.
            conn.execute("PRAGMA synchronous=NORMAL")
        else:
            conn.execute("PRAGMA query_only=ON")
        return conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        conn.executescript(_SCHEMA)  # idempotent (IF NOT EXISTS)
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta(key, value) VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has schema version {row[0]}, this serve expects {SCHEMA_VERSION}; "
                    "use another --data directory"
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _retention_policy(self, max_age_s: Any, max_bytes: Any, interval_s: float) -> RetentionPolicy:
        """The bounds given, written in ``meta`` for the next start; or those written last."""
        conn = self._writer_conn
        stored = dict(conn.execute(
            "SELECT key, value FROM meta WHERE key IN ('retention_max_age_s', 'retention_max_bytes')").fetchall())

        def pick(given: Any, key: str, default: Any, kind: type) -> Any:
            if given is STORED:
                if key not in stored:
                    return default
                return None if stored[key] == "off" else kind(stored[key])
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)",
                         (key, "off" if given is None else str(given)))
            return given

        age = pick(max_age_s, "retention_max_age_s", _retention.DEFAULT_RETENTION_S, float)
        size = pick(max_bytes, "retention_max_bytes", _retention.DEFAULT_MAX_BYTES, int)
        return RetentionPolicy(max_age_s=age, max_bytes=size, interval_s=interval_s)

    def storage(self) -> dict[str, Any]:
        """What the store keeps: the span of its data, its size and the retention bounds."""
        with self._reader() as conn:
            oldest, newest, count = _retention.span(conn)
            used = _retention.used_bytes(conn)
        policy = self.retention
        return {
            "oldest_ns": oldest, "newest_ns": newest, "profiles": count, "used_bytes": used,
            "file_bytes": _retention.file_bytes(self.path), "retention_s": policy.max_age_s,
            "max_bytes": policy.max_bytes, "deleted": self.retention_deleted, "error": self.retention_error,
        }

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        if self._closed:
            raise StoreClosed("store is closed")
        conn = self._readers.get()
        try:
            yield conn
        finally:
            self._readers.put(conn)

    # -- writes ------------------------------------------------------------------------------

    def add(self, upload: Upload, *, source: str = "ingest", timeout: float = 60.0) -> int:
        """Store ``upload``; returns its profile id once committed (raises on failure)."""
        return self.add_many([upload], source=source, timeout=timeout)[0]

    def add_many(self, uploads: list[Upload], *, source: str = "ingest", timeout: float = 60.0) -> list[int]:
        """Store several uploads in one transaction (all or none); returns their ids."""
        return self._submit(_WriteJob(list(uploads), source, None, Future()), timeout)

    def add_imported(
        self, upload: Upload | None, imported: ImportedFile, *, timeout: float = 60.0
    ) -> int | None:
        """Record an imported file (and its profile, unless ``upload`` is None: a failed import)."""
        ids = self._submit(_WriteJob([upload] if upload else [], "import", imported, Future()), timeout)
        return ids[0] if ids else None

    def _submit(self, job: _WriteJob, timeout: float) -> list[int]:
        with self._close_lock:
            if self._closed:
                raise StoreClosed("store is closed")
            self._jobs.put(job)
        return job.future.result(timeout=timeout)

    def _writer_loop(self) -> None:
        conn = self._writer_conn
        policy = self.retention
        next_step = time.monotonic() if policy.bounded else float("inf")
        while True:
            try:
                job = self._jobs.get(timeout=max(0.0, next_step - time.monotonic()) if policy.bounded else None)
            except queue.Empty:
                job = _RETAIN
            if job is None:
                return
            if job is _RETAIN or time.monotonic() >= next_step:
                # Retention: one short transaction between write batches (see retention.py).
                more = self._retention_step(conn) == policy.batch
                next_step = time.monotonic() + (0.0 if more else policy.interval_s)
                if job is _RETAIN:
                    continue
            batch = [job]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._write_batch(conn, batch)
            if stop:
                return

    def _retention_step(self, conn: sqlite3.Connection) -> int:
        try:
            n = _retention.step(conn, self.retention, time.time_ns())
        except Exception as exc:  # the writer must live on: uploads depend on it
            if self.retention_error is None:
                log.warning("retention could not delete old profiles: %s", exc)
            self.retention_error = str(exc)
            return 0
        self.retention_error = None
        self.retention_deleted += n
        return n

    def _write_batch(self, conn: sqlite3.Connection, batch: list[_WriteJob]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            ids = [self._insert(conn, job) for job in batch]
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:  # the writer must live on (a full disk rolls back by itself)
                    log.exception("rolling back a failed write failed")
            # Ids handed out inside the rolled-back transaction are void.
            self._w_stacks.clear()
            self._w_series.clear()
            self._w_stypes.clear()
            self._w_series_count.clear()
            for job in batch:
                for upload in job.uploads:
                    upload.overflow_samples = upload.overflow_series = 0
            if len(batch) == 1:
                log.error("storing a profile failed: %r", exc)
                batch[0].future.set_exception(exc)
                return
            # One bad job must not fail the others: retry them one by one.
            for job in batch:
                self._write_batch(conn, [job])
            return
        self.writes_committed += len(batch)
        for job in batch:
            for upload in job.uploads:
                if upload.overflow_samples:
                    self.overflow_samples += upload.overflow_samples
                    self.overflow_uploads += 1
                    if upload.params.service not in self._overflow_warned:
                        self._overflow_warned.add(upload.params.service)
                        log.warning(
                            "service %r reached its limit of %d series: samples with new label sets are "
                            "stored under %s=\"true\" (their labels are not indexed)",
                            upload.params.service, self.max_series_per_service, OVERFLOW_LABEL,
                        )
        for job, job_ids in zip(batch, ids, strict=True):
            job.future.set_result(job_ids)

    def _insert(self, conn: sqlite3.Connection, job: _WriteJob) -> list[int]:
        ids = [self._insert_upload(conn, upload, job.source) for upload in job.uploads]
        if job.imported is not None:
            imp = job.imported
            conn.execute(
                "INSERT OR REPLACE INTO imported_files(path, size, mtime_ns, profile_id, error) "
                "VALUES(?, ?, ?, ?, ?)",
                (imp.path, imp.size, imp.mtime_ns, ids[0] if ids else None, imp.error),
            )
        return ids

    def _insert_upload(self, conn: sqlite3.Connection, upload: Upload, source: str) -> int:
        params = upload.params
        profile = upload.profile
        service = params.service
        digest = upload.digest
        row = conn.execute(
            "SELECT id FROM profiles WHERE service=? AND start_ns=? AND digest=?", (service, upload.start_ns, digest)
        ).fetchone()
        if row is not None:
            # The same profile again (an agent's retry after a lost answer, or a local-store file
            # of a profile that was also uploaded): stored once.
            log.debug("duplicate profile for %s at %d: kept the stored one", service, upload.start_ns)
            return int(row[0])
        blob = upload.pprof_gz or gzip.compress(upload.pprof_plain, compresslevel=6, mtime=0)
        cur = conn.execute(
            "INSERT INTO profiles(service, tags, start_ns, end_ns, received_ns, sample_rate, spy_name, "
            "tenant, source, sample_types, period, digest, pprof_gz) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                service,
                _labels_key(params.tags),
                upload.start_ns,
                upload.end_ns,
                time.time_ns(),
                params.sample_rate,
                params.spy_name,
                upload.tenant,
                source,
                json.dumps([list(st) for st in profile.sample_types]),
                int(profile.period),
                digest,
                blob,
            ),
        )
        profile_id = int(cur.lastrowid or 0)
        start = upload.start_ns
        stypes = [(self._stype_id(conn, service, type_id), index) for type_id, index in upload.type_ids]

        series_of: dict[Labels, tuple[int, int | None]] = {}  # labels -> (series, span key)
        values: dict[tuple[int, int, int], int] = {}  # (series, stype, stack) -> value
        totals: dict[tuple[int, int], int] = {}  # (series, stype) -> total
        span_values: dict[tuple[int, int, int, int], int] = {}  # (span, series, stype, stack) -> value
        unindexed_span = ""
        overflow_id = -1
        span: int | None
        for sample in profile.samples:
            known = series_of.get(sample.labels)
            if known is None:
                series_id = self._series_id(conn, service, series_labels(params.tags, sample.labels), capped=True)
                if series_id < 0:
                    upload.overflow_series += 1
                    if overflow_id < 0:
                        overflow_id = self._series_id(conn, service, OVERFLOW_LABELS)
                    series_id = overflow_id
                span = None
                for name, text in sample.labels:
                    if name == SPAN_LABEL:
                        span = span_key(text)
                        if span is None:
                            unindexed_span = text
                known = series_of[sample.labels] = (series_id, span)
            series_id, span = known
            if series_id == overflow_id:
                upload.overflow_samples += 1
            stack_id = -1
            for stype, index in stypes:
                value = int(sample.values[index])
                key = (series_id, stype)
                totals[key] = totals.get(key, 0) + value
                if value:
                    if stack_id < 0:
                        stack_id = self._stack_id(conn, sample.stack)
                    vkey = (series_id, stype, stack_id)
                    values[vkey] = values.get(vkey, 0) + value
                    if span is not None:
                        skey = (span, series_id, stype, stack_id)
                        span_values[skey] = span_values.get(skey, 0) + value
        if unindexed_span and service not in self._span_warned:
            self._span_warned.add(service)
            log.warning(
                "service %r sends span_id values that are not 16 hex digits (e.g. %r): their samples are "
                "stored and counted, but cannot be queried by span",
                service, unindexed_span[:64],
            )
        if not totals:
            # An empty profile still marks the service's series (its static tags) as present.
            series_id = self._series_id(conn, service, params.tags, capped=True)
            if series_id < 0:
                upload.overflow_series += 1
                series_id = self._series_id(conn, service, OVERFLOW_LABELS)
            totals = {(series_id, stype): 0 for stype, _ in stypes}
        conn.executemany(
            "INSERT INTO totals(profile_id, series_id, stype, start_ns, total) VALUES(?, ?, ?, ?, ?)",
            [(profile_id, series_id, stype, start, total) for (series_id, stype), total in totals.items()],
        )
        conn.executemany(
            "INSERT INTO samples(profile_id, series_id, stype, stack_id, start_ns, value) VALUES(?, ?, ?, ?, ?, ?)",
            [(profile_id, sid, stype, stack, start, v) for (sid, stype, stack), v in values.items()],
        )
        insert_span_rows(conn, profile_id, start, span_values, profile.span_traces)
        counts: dict[int, int] = {}
        for labels, count in profile.requests.items():
            series_id = self._series_id(conn, service, series_labels(params.tags, labels), capped=True)
            if series_id < 0:  # beyond the series cap: the count is dropped, counted like samples
                upload.overflow_series += 1
                continue
            counts[series_id] = counts.get(series_id, 0) + int(count)
        conn.executemany(
            "INSERT INTO requests(profile_id, series_id, start_ns, count) VALUES(?, ?, ?, ?)",
            [(profile_id, sid, start, count) for sid, count in counts.items()],
        )
        return profile_id

    def _stype_id(self, conn: sqlite3.Connection, service: str, type_id: str) -> int:
        key = (service, type_id)
        cached = self._w_stypes.get(key)
        if cached is not None:
            return cached
        conn.execute("INSERT OR IGNORE INTO service_types(service, type_id) VALUES(?, ?)", key)
        row = conn.execute("SELECT id FROM service_types WHERE service=? AND type_id=?", key).fetchone()
        self._w_stypes[key] = int(row[0])
        return int(row[0])

    def _series_id(self, conn: sqlite3.Connection, service: str, labels: Labels, capped: bool = False) -> int:
        """The id of the series (service, labels), created if new; -1 when ``capped`` and the
        service already has its maximum number of series."""
        cached = self._w_series.get((service, labels))
        if cached is not None:
            return cached
        key = _labels_key(labels)
        row = conn.execute("SELECT id FROM series WHERE service=? AND labels=?", (service, key)).fetchone()
        if row is not None:
            series_id = int(row[0])
        else:
            count = self._w_series_count.get(service)
            if count is None:
                count = int(conn.execute("SELECT COUNT(*) FROM series WHERE service=?", (service,)).fetchone()[0])
            if capped and self.max_series_per_service is not None and count >= self.max_series_per_service:
                self._w_series_count[service] = count
                return -1
            self._w_series_count[service] = count + 1
            cur = conn.execute("INSERT INTO series(service, labels) VALUES(?, ?)", (service, key))
            series_id = int(cur.lastrowid or 0)
            conn.executemany(
                "INSERT INTO series_labels(series_id, name, value) VALUES(?, ?, ?)",
                [(series_id, name, value) for name, value in labels],
            )
        if len(self._w_series) > _WRITER_CACHE_MAX:
            self._w_series.clear()
        self._w_series[(service, labels)] = series_id
        return series_id

    def _stack_id(self, conn: sqlite3.Connection, stack: Stack) -> int:
        cached = self._w_stacks.get(stack)
        if cached is not None:
            return cached
        text = _stack_text(stack)
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        row = conn.execute("SELECT id FROM stacks WHERE digest=?", (digest,)).fetchone()
        if row is not None:
            stack_id = int(row[0])
        else:
            cur = conn.execute("INSERT INTO stacks(digest, frames) VALUES(?, ?)", (digest, text))
            stack_id = int(cur.lastrowid or 0)
        if len(self._w_stacks) > _WRITER_CACHE_MAX:
            self._w_stacks.clear()
        self._w_stacks[stack] = stack_id
        return stack_id

    # -- reads -------------------------------------------------------------------------------

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query on a pooled reader connection."""
        with self._reader() as conn:
            return conn.execute(sql, args).fetchall()

    def services(self) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT service, COUNT(*), MIN(start_ns), MAX(end_ns) FROM profiles GROUP BY service ORDER BY service"
        )
        return [
            {"name": r[0], "profiles": int(r[1]), "first_ns": int(r[2]), "last_ns": int(r[3])} for r in rows
        ]

    def profile_types(self, service: str) -> list[str]:
        rows = self.query("SELECT type_id FROM service_types WHERE service=? ORDER BY type_id", (service,))
        return [r[0] for r in rows]

    def stype_id(self, service: str, type_id: str) -> int | None:
        """The integer id of (service, profile type), or None if the service never had it."""
        rows = self.query("SELECT id FROM service_types WHERE service=? AND type_id=?", (service, type_id))
        return int(rows[0][0]) if rows else None

    def series(self, service: str) -> list[SeriesRow]:
        rows = self.query("SELECT id, labels FROM series WHERE service=? ORDER BY id", (service,))
        return [SeriesRow(int(r[0]), labels_from_key(r[1])) for r in rows]

    def stacks(self, ids: list[int]) -> dict[int, Stack]:
        """Frames (root first) of the given stack ids."""
        out: dict[int, Stack] = {}
        missing: list[int] = []
        with self._r_lock:
            for i in ids:
                stack = self._r_stacks.get(i)
                if stack is None:
                    missing.append(i)
                else:
                    out[i] = stack
        if not missing:
            return out
        rows: list[tuple[Any, ...]] = []
        for n in range(0, len(missing), 500):
            chunk = missing[n : n + 500]
            marks = ",".join("?" * len(chunk))
            rows += self.query(f"SELECT id, frames FROM stacks WHERE id IN ({marks})", tuple(chunk))
        with self._r_lock:
            if len(self._r_stacks) + len(rows) > _READER_STACK_CACHE_MAX:
                self._r_stacks.clear()
                self._r_frames.clear()
            frames = self._r_frames
            for stack_id, text in rows:
                stack_frames: list[Frame] = []
                for function, file, line in json.loads(text):
                    key = (function, file, line)
                    frame = frames.get(key)
                    if frame is None:
                        frame = frames[key] = Frame(function, file, line)
                    stack_frames.append(frame)
                out[int(stack_id)] = self._r_stacks[int(stack_id)] = tuple(stack_frames)
        return out

    def pprof_blob(self, profile_id: int) -> bytes:
        """The stored gzipped pprof of ``profile_id``."""
        with self._reader() as conn:
            row = conn.execute("SELECT pprof_gz FROM profiles WHERE id=?", (profile_id,)).fetchone()
        if row is None:
            raise KeyError(profile_id)
        return bytes(row[0])

    def imported(self, path: str) -> ImportedFile | None:
        rows = self.query("SELECT path, size, mtime_ns, error FROM imported_files WHERE path=?", (path,))
        if not rows:
            return None
        r = rows[0]
        return ImportedFile(r[0], int(r[1]), int(r[2]), r[3])

    def imported_paths(self) -> dict[str, ImportedFile]:
        rows = self.query("SELECT path, size, mtime_ns, error FROM imported_files")
        return {r[0]: ImportedFile(r[0], int(r[1]), int(r[2]), r[3]) for r in rows}

    def profile_count(self) -> int:
        return int(self.query("SELECT COUNT(*) FROM profiles")[0][0])

    # -- life --------------------------------------------------------------------------------

    def close(self) -> None:
        """Finish pending writes, stop the writer and close all connections (idempotent)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        self._writer.join(timeout=30)
        # Anything still queued after the sentinel cannot be written any more.
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None and not job.future.done():
                job.future.set_exception(StoreClosed("store closed before the write"))
        try:
            self._writer_conn.close()
        except sqlite3.Error:  # pragma: no cover
            pass
        for conn in self._all_readers:
            try:
                conn.close()
            except sqlite3.Error:  # pragma: no cover
                pass

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
