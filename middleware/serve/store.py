"""SQLite storage for ``python -m middleware serve``.

What is stored, and why this shape
----------------------------------
Each accepted upload (or imported file) becomes one row of ``profiles`` holding the **gzipped
pprof exactly as decoded** plus its service, time window, sample rate, spy name and source.
Beside it, a small **index** is written in the same transaction:

* ``series`` — one row per distinct (service, label set); a label set is the upload's static tags
  plus the string sample labels of a sample (minus ``span_id``/``trace_id``/``profile_id``);
* ``series_labels`` — the (name, value) pairs of each series, for label names/values and
  selectors;
* ``totals`` — per (profile, series, profile type) the sum of that type's values, with the
  profile's start time and service copied in so the timeline is one indexed ``GROUP BY``;
* ``service_types`` — which profile types each service has.

Keeping the pprof blob rather than normalising every stack into rows keeps ingest cheap (one blob
insert plus a handful of index rows per upload, whatever the stack count), which is what matters
when many agents push at once; the blob is also the lossless source of truth (every sample,
label, line and sample type survives) and can be handed back as pprof. Queries that need stacks
(the merged flame graph) parse only the blobs in the selected range and series, with an LRU cache
of parsed profiles (rows never change, so the cache never goes stale); everything that only needs
totals (timeline, services, types, labels) is answered from the index without touching a blob.

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
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from middleware.serve.ingest import Upload, series_totals

if TYPE_CHECKING:  # pragma: no cover
    from middleware.profile import Profile

log = logging.getLogger(__name__)

__all__ = ["Store", "StoreClosed", "ImportedFile", "SeriesRow", "ProfileRow"]

DB_FILENAME = "profiles.sqlite3"
SCHEMA_VERSION = 1

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
    pprof_gz BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS profiles_by_service_time ON profiles(service, start_ns);
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
CREATE TABLE IF NOT EXISTS totals(
    profile_id INTEGER NOT NULL REFERENCES profiles(id),
    series_id INTEGER NOT NULL REFERENCES series(id),
    type_id TEXT NOT NULL,
    service TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    total INTEGER NOT NULL,
    PRIMARY KEY(profile_id, series_id, type_id)
);
CREATE INDEX IF NOT EXISTS totals_by_query ON totals(service, type_id, start_ns);
CREATE TABLE IF NOT EXISTS service_types(
    service TEXT NOT NULL,
    type_id TEXT NOT NULL,
    PRIMARY KEY(service, type_id)
);
CREATE TABLE IF NOT EXISTS imported_files(
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    profile_id INTEGER,
    error TEXT
);
"""

Labels = tuple[tuple[str, str], ...]


def _labels_key(labels: Labels) -> str:
    """Canonical text of a sorted label tuple (used as a unique key and stored as JSON)."""
    return json.dumps([list(pair) for pair in labels], separators=(",", ":"))


def _labels_from_key(text: str) -> Labels:
    return tuple((str(k), str(v)) for k, v in json.loads(text))


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


@dataclass(frozen=True)
class ProfileRow:
    id: int
    service: str
    tags: Labels
    start_ns: int
    end_ns: int


@dataclass
class _WriteJob:
    uploads: list[Upload]
    source: str
    imported: ImportedFile | None
    future: "Future[list[int]]"


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
        profile_cache_size: int = 512,
        max_batch: int = 128,
    ) -> None:
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, DB_FILENAME)
        self._busy_timeout_ms = busy_timeout_ms
        self._max_batch = max_batch
        self._writer_conn = self._connect(write=True)
        self._init_schema(self._writer_conn)
        self._jobs: "queue.Queue[_WriteJob | None]" = queue.Queue()
        self._closed = False
        self._close_lock = threading.Lock()
        self._readers: "queue.Queue[sqlite3.Connection]" = queue.Queue()
        self._all_readers: list[sqlite3.Connection] = []
        for _ in range(max(1, read_connections)):
            conn = self._connect(write=False)
            self._readers.put(conn)
            self._all_readers.append(conn)
        self._cache: "OrderedDict[int, Profile]" = OrderedDict()
        self._cache_size = profile_cache_size
        self._cache_lock = threading.Lock()
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
        while True:
            job = self._jobs.get()
            if job is None:
                return
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

    def _write_batch(self, conn: sqlite3.Connection, batch: list[_WriteJob]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            ids = [self._insert(conn, job) for job in batch]
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if len(batch) == 1:
                log.error("storing a profile failed: %r", exc)
                batch[0].future.set_exception(exc)
                return
            # One bad job must not fail the others: retry them one by one.
            for job in batch:
                self._write_batch(conn, [job])
            return
        self.writes_committed += len(batch)
        with self._cache_lock:
            # Only after the commit: a rolled-back insert's rowid may be reused.
            for job, job_ids in zip(batch, ids):
                for pid, upload in zip(job_ids, job.uploads):
                    self._cache_put(pid, upload.profile)
        for job, pid in zip(batch, ids):
            job.future.set_result(pid)

    def _insert(self, conn: sqlite3.Connection, job: _WriteJob) -> list[int]:
        ids = [self._insert_upload(conn, upload, job.source) for upload in job.uploads]
        profile_id = ids[0] if ids else None
        if job.imported is not None:
            imp = job.imported
            conn.execute(
                "INSERT OR REPLACE INTO imported_files(path, size, mtime_ns, profile_id, error) "
                "VALUES(?, ?, ?, ?, ?)",
                (imp.path, imp.size, imp.mtime_ns, profile_id, imp.error),
            )
        return ids

    def _insert_upload(self, conn: sqlite3.Connection, upload: Upload, source: str) -> int:
        params = upload.params
        profile = upload.profile
        blob = upload.pprof_gz or gzip.compress(upload.pprof_plain, compresslevel=6, mtime=0)
        cur = conn.execute(
            "INSERT INTO profiles(service, tags, start_ns, end_ns, received_ns, sample_rate, spy_name, "
            "tenant, source, sample_types, pprof_gz) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                params.service,
                _labels_key(params.tags),
                upload.start_ns,
                upload.end_ns,
                time.time_ns(),
                params.sample_rate,
                params.spy_name,
                upload.tenant,
                source,
                json.dumps([list(st) for st in profile.sample_types]),
                blob,
            ),
        )
        profile_id = int(cur.lastrowid or 0)
        for type_id, _ in upload.type_ids:
            conn.execute(
                "INSERT OR IGNORE INTO service_types(service, type_id) VALUES(?, ?)",
                (params.service, type_id),
            )
        totals = series_totals(profile, params.tags, upload.type_ids)
        if not totals:
            # An empty profile still marks the service's series (with its static tags) as present.
            totals = {params.tags: {type_id: 0 for type_id, _ in upload.type_ids}}
        for labels, per_type in totals.items():
            series_id = self._series_id(conn, params.service, labels)
            conn.executemany(
                "INSERT INTO totals(profile_id, series_id, type_id, service, start_ns, total) "
                "VALUES(?, ?, ?, ?, ?, ?)",
                [
                    (profile_id, series_id, type_id, params.service, upload.start_ns, total)
                    for type_id, total in per_type.items()
                ],
            )
        return profile_id

    @staticmethod
    def _series_id(conn: sqlite3.Connection, service: str, labels: Labels) -> int:
        key = _labels_key(labels)
        row = conn.execute("SELECT id FROM series WHERE service=? AND labels=?", (service, key)).fetchone()
        if row is not None:
            return int(row[0])
        cur = conn.execute("INSERT INTO series(service, labels) VALUES(?, ?)", (service, key))
        series_id = int(cur.lastrowid or 0)
        conn.executemany(
            "INSERT INTO series_labels(series_id, name, value) VALUES(?, ?, ?)",
            [(series_id, name, value) for name, value in labels],
        )
        return series_id

    # -- parsed-profile cache ----------------------------------------------------------------

    def _cache_put(self, profile_id: int, profile: "Profile") -> None:
        self._cache[profile_id] = profile
        self._cache.move_to_end(profile_id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def load_profile(self, profile_id: int) -> "Profile":
        """The parsed profile ``profile_id`` (cached)."""
        with self._cache_lock:
            cached = self._cache.get(profile_id)
            if cached is not None:
                self._cache.move_to_end(profile_id)
                return cached
        with self._reader() as conn:
            row = conn.execute("SELECT pprof_gz FROM profiles WHERE id=?", (profile_id,)).fetchone()
        if row is None:
            raise KeyError(profile_id)
        from middleware.pprof import parse_pprof

        profile = parse_pprof(bytes(row[0]))
        with self._cache_lock:
            self._cache_put(profile_id, profile)
        return profile

    def pprof_blob(self, profile_id: int) -> bytes:
        """The stored gzipped pprof of ``profile_id``."""
        with self._reader() as conn:
            row = conn.execute("SELECT pprof_gz FROM profiles WHERE id=?", (profile_id,)).fetchone()
        if row is None:
            raise KeyError(profile_id)
        return bytes(row[0])

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

    def series(self, service: str) -> list[SeriesRow]:
        rows = self.query("SELECT id, labels FROM series WHERE service=? ORDER BY id", (service,))
        return [SeriesRow(int(r[0]), _labels_from_key(r[1])) for r in rows]

    def imported(self, path: str) -> ImportedFile | None:
        rows = self.query("SELECT path, size, mtime_ns, error FROM imported_files WHERE path=?", (path,))
        if not rows:
            return None
        r = rows[0]
        return ImportedFile(r[0], int(r[1]), int(r[2]), r[3])

    def imported_paths(self) -> dict[str, ImportedFile]:
        rows = self.query("SELECT path, size, mtime_ns, error FROM imported_files")
        return {r[0]: ImportedFile(r[0], int(r[1]), int(r[2]), r[3]) for r in rows}

    def profile_rows(self, ids: list[int]) -> list[ProfileRow]:
        """Metadata of the given profiles (in id order)."""
        out: list[ProfileRow] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.query(
                f"SELECT id, service, tags, start_ns, end_ns FROM profiles WHERE id IN ({marks})", tuple(chunk)
            )
            out += [ProfileRow(int(r[0]), r[1], _labels_from_key(r[2]), int(r[3]), int(r[4])) for r in rows]
        out.sort(key=lambda r: r.id)
        return out

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

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
