"""Importing the local store's pprof files into ``serve``.

An agent without a server writes one file per upload interval into its local store directory
(``MW_PROFILE_DIR``), named ``<service>-<pid>-<start>.pb.gz``. ``serve`` scans the directories it
was given on start and then every ``interval`` seconds and imports each file once: the file's
path, size and mtime are recorded in the same SQLite transaction as its profile, so a restart
never imports a file twice.

A file that cannot be decoded is recorded with its error and retried only when its size or mtime
changes. A young file (modified less than ``settle_seconds`` ago) that fails is not recorded at
all and is retried on the next scan: it may still be being written by a writer that does not
write atomically.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Sequence

from middleware.serve.ingest import (
    IngestError,
    IngestLimits,
    IngestParams,
    gunzip_capped,
    upload_from_profile,
)
from middleware.serve.periodic import Periodic
from middleware.serve.store import ImportedFile, Store, StoreClosed

log = logging.getLogger(__name__)

__all__ = ["Importer", "STORE_FILE_RE", "parse_store_filename"]

STORE_FILE_RE = re.compile(r"^(?P<service>.+)-(?P<pid>\d+)-(?P<start>\d+)\.pb\.gz$")


def parse_store_filename(name: str) -> tuple[str, int, int] | None:
    """``(service, pid, start_ns)`` of a local-store file name, or None if it is not one.

    ``<start>`` may be unix seconds, milliseconds, microseconds or nanoseconds (told apart by
    magnitude).
    """
    m = STORE_FILE_RE.match(name)
    if m is None or name.startswith("."):
        return None
    start = int(m.group("start"))
    for limit, scale in ((1e11, 1_000_000_000), (1e14, 1_000_000), (1e17, 1_000)):
        if start < limit:
            return m.group("service"), int(m.group("pid")), start * scale
    return m.group("service"), int(m.group("pid")), start


class Importer(Periodic):
    """Imports the store files under ``directories`` into ``store`` (see module doc)."""

    thread_name = "mw-serve-import"

    def __init__(
        self,
        store: Store,
        directories: Sequence[str],
        *,
        limits: IngestLimits = IngestLimits(),
        interval: float = 10.0,
        settle_seconds: float = 30.0,
    ) -> None:
        super().__init__(interval)
        self.store = store
        self.directories = [os.path.abspath(d) for d in directories]
        self.limits = limits
        self.settle_seconds = settle_seconds
        self.imported = 0
        self.failed = 0
        self._scan_lock = threading.Lock()

    def _candidates(self) -> list[str]:
        found: list[str] = []
        for directory in self.directories:
            if not os.path.isdir(directory):
                continue
            for root, dirs, files in os.walk(directory):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found.extend(os.path.join(root, f) for f in sorted(files) if parse_store_filename(f))
        return found

    def scan_once(self) -> int:
        """Import every new file now; returns how many profiles were imported."""
        with self._scan_lock:
            known = self.store.imported_paths()
            count = 0
            for path in self._candidates():
                if self._stop.is_set():
                    break
                try:
                    st = os.stat(path)
                except OSError:
                    continue  # removed meanwhile
                prev = known.get(path)
                unchanged = prev is not None and (prev.size, prev.mtime_ns) == (st.st_size, st.st_mtime_ns)
                if prev is not None and (prev.error is None or unchanged):
                    continue
                if self._import_file(path, st):
                    count += 1
            return count

    def _import_file(self, path: str, st: os.stat_result) -> bool:
        from middleware.pprof import ProfileError, parse_pprof

        name = os.path.basename(path)
        parsed = parse_store_filename(name)
        assert parsed is not None
        service, _pid, start_ns = parsed
        record = ImportedFile(path, st.st_size, st.st_mtime_ns)
        try:
            if st.st_size > self.limits.max_decompressed_bytes:
                raise IngestError(413, f"file larger than {self.limits.max_decompressed_bytes} bytes")
            with open(path, "rb") as fh:
                data = fh.read()
            plain = gunzip_capped(data, self.limits.max_decompressed_bytes) if data[:2] == b"\x1f\x8b" else data
            try:
                profile = parse_pprof(plain, source=path)
            except ProfileError as exc:
                raise IngestError(400, str(exc)) from None
            params = IngestParams(service=service, spy_name="middleware-local-store")
            upload = upload_from_profile(params, profile, plain, default_start_ns=start_ns, limits=self.limits)
        except (IngestError, OSError) as exc:
            message = exc.message if isinstance(exc, IngestError) else str(exc)
            if time.time() - st.st_mtime < self.settle_seconds:
                log.debug("not importing %s yet (%s); retrying later", path, message)
                return False
            log.warning("cannot import %s: %s", path, message)
            self.failed += 1
            self.store.add_imported(None, ImportedFile(path, st.st_size, st.st_mtime_ns, message[:500]))
            return False
        self.store.add_imported(upload, record)
        self.imported += 1
        log.debug("imported %s", path)
        return True

    def step(self) -> bool:
        try:
            n = self.scan_once()
            if n:
                log.info("imported %d profile file(s) from the local store", n)
        except StoreClosed:
            return False
        except Exception:  # keep importing on the next round whatever happened
            log.exception("importing the local store failed")
        return True

    def start(self) -> None:
        """Scan now (in the background) and then every ``interval`` seconds."""
        if self.directories:
            super().start()
