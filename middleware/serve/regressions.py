"""Regressions `serve` finds by itself: each code version compared with the one before it.

Agents label every sample with the code version they run (``version``, see
:mod:`middleware.version`). For each service and profile type, a :class:`RegressionWatcher`
thread orders the service's versions by their first profile and compares each version (AFTER)
with the one seen before it (BEFORE), with the detector the CLI's ``regress`` uses
(:func:`middleware.regression.compare`: each function's cost per request where the agents count
requests -- the store keeps their counts per profile and series -- else its share of the total,
an interval from the sampling statistics, a threshold, judged against the common change of all
functions: a slower machine is not a regression; within an endpoint, the whole service's common
change on the same basis): over the whole of each version's profiles, and within each
``endpoint`` the two versions share (the endpoint's own profile: a function's share of that
endpoint's cost, i.e. its cost per unit of the endpoint's work). A comparison is run again when
AFTER gained profiles since (a new version is compared at its first profile, and after every
window that follows), at most every ``interval_s``.

The findings are derived from the stored profiles, kept in memory and served by
``GET /api/regressions?service=...&type=...``; a restarted `serve` computes them again from its
store at its first pass (``first_seen`` is then the time of that pass).

Thread: one daemon thread reading the store through the query engine (the store's readers are
safe to use from any thread); :meth:`RegressionWatcher.snapshot` may be called from any thread
(one lock guards the results).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from middleware.regression import DEFAULT_CONFIDENCE, DEFAULT_THRESHOLD, Comparison, Finding, compare
from middleware.serve.periodic import Periodic
from middleware.serve.query import Matcher, Selection
from middleware.serve.store import StoreClosed

if TYPE_CHECKING:
    from middleware.serve.query import QueryEngine
    from middleware.serve.store import SeriesRow, Store

log = logging.getLogger(__name__)

__all__ = ["RegressionWatcher", "VERSION_LABEL", "ENDPOINT_LABEL", "DEFAULT_INTERVAL_S"]

VERSION_LABEL = "version"
ENDPOINT_LABEL = "endpoint"
DEFAULT_INTERVAL_S = 10.0
#: Endpoints compared per pair of versions, by name (each is one more merge per side).
MAX_ENDPOINTS = 20


@dataclass
class _Version:
    name: str
    first_ns: int
    last_ns: int
    profiles: int


@dataclass
class _Comparison:
    before: _Version
    after: _Version
    profiles_after: int  # AFTER's profile count when computed
    findings: list[tuple[str | None, Finding]] = field(default_factory=list)  # (endpoint, finding)
    # endpoint (None: the whole service) -> the common change its functions were judged against
    common: dict[str | None, float] = field(default_factory=dict)
    computed_at: float = 0.0
    error: str | None = None


class _SeriesByVersion:
    """A service's series grouped by version: their ids, and the endpoints among their labels."""

    def __init__(self, rows: list[SeriesRow]) -> None:
        self.ids: dict[str, list[int]] = {}
        self.endpoints: dict[str, set[str]] = {}
        for row in rows:
            labels = dict(row.labels)
            version = labels.get(VERSION_LABEL)
            if not version:
                continue
            self.ids.setdefault(version, []).append(row.id)
            if labels.get(ENDPOINT_LABEL):
                self.endpoints.setdefault(version, set()).add(labels[ENDPOINT_LABEL])


class RegressionWatcher(Periodic):
    """Compares consecutive versions of every service in the background (see the module doc)."""

    thread_name = "mw-serve-regressions"

    def __init__(self, store: Store, engine: QueryEngine, interval_s: float = DEFAULT_INTERVAL_S,
                 threshold: float = DEFAULT_THRESHOLD, confidence: float = DEFAULT_CONFIDENCE) -> None:
        super().__init__(interval_s)
        self.store = store
        self.engine = engine
        self.threshold = threshold
        self.confidence = confidence
        self._lock = threading.Lock()
        self._results: dict[tuple[str, str], list[_Comparison]] = {}
        self._first_seen: dict[tuple[Any, ...], float] = {}
        self._failed = False
        self.passes = 0

    def step(self) -> bool:
        try:
            self.run_once()
            self._failed = False
        except StoreClosed:
            return False
        except Exception as exc:  # a pass that fails is retried at the next one, said once
            if not self._failed:
                log.warning("regression detection failed: %s", exc, exc_info=True)
            self._failed = True
        return True

    # -- one pass ---------------------------------------------------------------------------------
    def run_once(self) -> None:
        """Compares, for every service and profile type, each version with its predecessor where
        AFTER has new profiles."""
        for svc in self.store.services():
            service = svc["name"]
            series = _SeriesByVersion(self.store.series(service))
            for type_id in self.store.profile_types(service):
                self._service_type(service, type_id, series)
        self.passes += 1

    def _versions(self, service: str, type_id: str, series: _SeriesByVersion) -> list[_Version]:
        stype = self.store.stype_id(service, type_id)
        if stype is None:
            return []
        versions = []
        for name, ids in series.ids.items():
            first, last, count = self.store.query(
                "SELECT MIN(start_ns), MAX(start_ns), COUNT(DISTINCT profile_id) FROM totals "
                f"WHERE stype = ? AND series_id IN ({','.join(str(int(i)) for i in ids)})", (stype,))[0]
            if count:
                versions.append(_Version(name, int(first), int(last), int(count)))
        return sorted(versions, key=lambda v: (v.first_ns, v.name))

    def _selection(self, service: str, type_id: str, v: _Version, endpoint: str | None) -> Selection:
        matchers = [Matcher(VERSION_LABEL, "=", v.name)]
        if endpoint is not None:
            matchers.append(Matcher(ENDPOINT_LABEL, "=", endpoint))
        # the window's start is what is indexed: a profile starting at last_ns is in [first, last + 1)
        return Selection(service, type_id, v.first_ns, v.last_ns + 1, tuple(matchers))

    def _service_type(self, service: str, type_id: str, series: _SeriesByVersion) -> None:
        versions = self._versions(service, type_id, series)
        with self._lock:
            done = {(c.before.name, c.after.name): c for c in self._results.get((service, type_id), [])}
        out: list[_Comparison] = []
        for before, after in itertools.pairwise(versions):
            old = done.get((before.name, after.name))
            if old is not None and old.profiles_after == after.profiles and old.error is None:
                out.append(old)
                continue
            out.append(self._compare(service, type_id, before, after, series))
        with self._lock:
            self._results[(service, type_id)] = out

    def _compare(self, service: str, type_id: str, before: _Version, after: _Version,
                 series: _SeriesByVersion) -> _Comparison:
        c = _Comparison(before, after, after.profiles, computed_at=time.time())
        # the endpoints both versions have series of (one with no data left gives empty merges)
        shared = series.endpoints.get(before.name, set()) & series.endpoints.get(after.name, set())
        scopes: list[str | None] = [None, *sorted(shared)[:MAX_ENDPOINTS]]
        whole: Comparison | None = None  # the service's: its common change holds within endpoints too
        for endpoint in scopes:
            a = self.engine.merge(self._selection(service, type_id, before, endpoint)).profile
            b = self.engine.merge(self._selection(service, type_id, after, endpoint)).profile
            if not a.samples or not b.samples:
                continue
            try:
                result = compare(a, b, threshold=self.threshold, confidence=self.confidence, common=whole)
            except ValueError as exc:  # no samples of that type on one side
                c.error = str(exc)
                continue
            if endpoint is None:
                whole = result
            c.common[endpoint] = result.common
            for f in result.findings:
                key = (service, type_id, before.name, after.name, endpoint, f.function, f.file, f.metric)
                self._first_seen.setdefault(key, c.computed_at)
                c.findings.append((endpoint, f))
        return c

    # -- results ----------------------------------------------------------------------------------
    def snapshot(self, service: str, type_id: str) -> dict[str, Any]:
        """The comparisons of one service and profile type, for the JSON API."""
        with self._lock:
            comparisons = list(self._results.get((service, type_id), []))
        out = []
        for c in comparisons:
            findings = []
            for endpoint, f in c.findings:
                key = (service, type_id, c.before.name, c.after.name, endpoint, f.function, f.file, f.metric)
                findings.append({
                    "kind": f.kind, "metric": f.metric, "function": f.function, "file": f.file,
                    "endpoint": endpoint, "share_before": f.share_before, "share_after": f.share_after,
                    "ratio": None if f.ratio == float("inf") else f.ratio,
                    "ratio_low": f.ratio_low,
                    "ratio_high": None if f.ratio_high == float("inf") else f.ratio_high,
                    "samples_before": f.samples_before, "samples_after": f.samples_after,
                    # basis "request": share_* are the value per request, over these requests
                    "basis": f.basis, "requests_before": f.requests_before, "requests_after": f.requests_after,
                    "common": f.common,
                    "first_seen": self._first_seen.get(key, c.computed_at),
                })
            out.append({
                # until: a second past the last profile's start (a range is [from, until) on starts)
                "before": {"version": c.before.name, "from": c.before.first_ns // 10**9,
                           "until": c.before.last_ns // 10**9 + 1, "profiles": c.before.profiles},
                "after": {"version": c.after.name, "from": c.after.first_ns // 10**9,
                          "until": c.after.last_ns // 10**9 + 1, "profiles": c.profiles_after},
                "computed_at": c.computed_at, "error": c.error, "findings": findings,
                # the common change each scope's functions were judged against ("" = the service)
                "common": {endpoint or "": v for endpoint, v in c.common.items()},
            })
        return {"service": service, "type": type_id, "label": VERSION_LABEL, "threshold": self.threshold,
                "confidence": self.confidence, "passes": self.passes, "comparisons": out}
