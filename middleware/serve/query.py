"""The JSON query API behind the web page (``GET /api/...``).

A *selection* is: a service, a profile type id (``process_cpu:cpu:nanoseconds:cpu:nanoseconds``),
a time range ``[from, until)`` in unix seconds (a profile belongs to the range when its window
starts inside it) and a label selector in Prometheus style::

    {endpoint="/calc", thread_name!="MainThread", pid=~"12.*"}

(``=``, ``!=``, ``=~`` and ``!~``; a regex must match the whole value; a missing label reads as
the empty string). Labels are the upload's static tags, the pprof's string sample labels and
``service_name``.

Everything is answered from the SQLite index (:mod:`middleware.serve.store`): the selector picks
the service's matching series, the timeline sums ``totals`` per time bucket, and a merged
profile sums ``samples`` per stack for the selected profile type. The JSON of a merged profile is the reporters' model
(:func:`middleware.reporters.flamegraph.profile_to_json`: flame tree + function table), so the
page and ``python -m middleware flamegraph`` render the same thing.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from middleware.labels import LABEL_NAME_FORM
from middleware.profile import GAUGE_TYPES, Profile, Sample
from middleware.serve.ingest import (
    EXCLUDED_SAMPLE_LABELS,
    INT64_MAX,
    MAX_UNIX_SECONDS,
    SERVICE_LABEL,
    unix_seconds_to_ns,
)
from middleware.serve.spans import parse_span_id, parse_trace_id, span_hex, trace_hex
from middleware.serve.store import Store, labels_from_key

log = logging.getLogger(__name__)

__all__ = [
    "QueryError", "Matcher", "Selection", "parse_selector", "parse_selection", "parse_span_filter", "QueryEngine",
]

Labels = tuple[tuple[str, str], ...]
_MAX_TIMELINE_POINTS = 2000
_DEFAULT_RANGE_S = 3600


class QueryError(Exception):
    """A bad query (HTTP 400 unless ``status`` says otherwise)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Matcher:
    """One label matcher of a selector."""

    name: str
    op: str  # "=", "!=", "=~", "!~"
    value: str

    def __post_init__(self) -> None:
        if self.op in ("=~", "!~"):
            try:
                object.__setattr__(self, "_regex", re.compile(self.value))
            except re.error as exc:
                raise QueryError(f"bad regular expression {self.value!r} for label {self.name!r}: {exc}") from None

    def matches(self, labels: Mapping[str, str]) -> bool:
        have = labels.get(self.name, "")
        if self.op == "=":
            return have == self.value
        if self.op == "!=":
            return have != self.value
        regex: re.Pattern[str] = vars(self)["_regex"]  # set by __post_init__ (the dataclass is frozen)
        found = regex.fullmatch(have) is not None
        return found if self.op == "=~" else not found

    def to_text(self) -> str:
        escaped = self.value.replace("\\", "\\\\").replace('"', '\\"')
        return f'{self.name}{self.op}"{escaped}"'


_MATCHER_RE = re.compile(
    rf'\s*(?P<name>{LABEL_NAME_FORM})\s*(?P<op>=~|!~|!=|=)\s*"(?P<value>(?:[^"\\]|\\.)*)"\s*(?P<sep>,|$)'
)


def parse_selector(text: str) -> tuple[Matcher, ...]:
    """Parse ``{k="v",...}`` (braces optional, empty = match everything)."""
    body = text.strip()
    if body.startswith("{"):
        if not body.endswith("}"):
            raise QueryError(f"bad selector {text!r}: missing closing brace")
        body = body[1:-1]
    body = body.strip()
    matchers: list[Matcher] = []
    pos = 0
    while pos < len(body):
        m = _MATCHER_RE.match(body, pos)
        if m is None:
            raise QueryError(f'bad selector {text!r}: expected name="value" (or !=, =~, !~) at {body[pos:]!r}')
        name = m.group("name")
        if name in EXCLUDED_SAMPLE_LABELS:
            raise QueryError(f"label {name!r} is not a series label and cannot be selected")
        value = re.sub(r"\\(.)", r"\1", m.group("value"))
        matchers.append(Matcher(name, m.group("op"), value))
        pos = m.end()
        if m.group("sep") == "" and pos < len(body):
            raise QueryError(f"bad selector {text!r}: expected ',' between matchers")
    return tuple(matchers)


@dataclass(frozen=True)
class Selection:
    """What to merge: a service, a profile type, a time range and a label selector; optionally
    the samples of one request (``span_id``: its local root span) or of one trace (``trace_id``:
    the samples of all its spans), in which case ``service`` may be empty (every service)."""

    service: str
    type_id: str
    from_ns: int
    until_ns: int
    matchers: tuple[Matcher, ...] = ()
    span_id: str | None = None
    trace_id: str | None = None

    @property
    def selector_text(self) -> str:
        return "{" + ",".join(m.to_text() for m in self.matchers) + "}"

    @property
    def spanned(self) -> bool:
        """Whether the selection is the samples of a span or a trace."""
        return self.span_id is not None or self.trace_id is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "service": self.service,
            "type": self.type_id,
            "from": self.from_ns / 1e9,
            "until": self.until_ns / 1e9,
            "selector": self.selector_text,
        }
        if self.span_id is not None:
            out["span_id"] = self.span_id
        if self.trace_id is not None:
            out["trace_id"] = self.trace_id
        return out


def parse_seconds(raw: str, name: str) -> int:
    """Unix seconds (a decimal number) as int64 nanoseconds (0 .. the year 2262); raises
    :class:`QueryError` (400)."""
    try:
        return unix_seconds_to_ns(raw, name)
    except ValueError as exc:
        raise QueryError(str(exc)) from None


def parse_step(raw: str) -> float:
    """A timeline bucket width in seconds: positive, finite, at most the whole int64 range."""
    try:
        step = float(raw)
    except ValueError:
        raise QueryError(f"bad 'step' {raw[:64]!r}: expected seconds") from None
    if not (math.isfinite(step) and step > 0 and step <= MAX_UNIX_SECONDS):
        raise QueryError(f"bad 'step' {raw[:64]!r}: expected seconds, more than 0 and at most {MAX_UNIX_SECONDS}")
    return step


def parse_span_filter(span_id: str | None, trace_id: str | None, suffix: str = "") -> tuple[str | None, str | None]:
    """``span_id`` (16 lowercase hex digits) or ``trace_id`` (32), checked; empty means not given.
    Raises :class:`QueryError` (400) on a malformed id or on both given."""
    span_id = span_id or None
    trace_id = trace_id or None
    if span_id is not None and trace_id is not None:
        raise QueryError(f"give 'span_id{suffix}' or 'trace_id{suffix}', not both")
    try:
        if span_id is not None:
            parse_span_id(span_id)
        if trace_id is not None:
            parse_trace_id(trace_id)
    except ValueError as exc:
        raise QueryError(str(exc)) from None
    return span_id, trace_id


def parse_selection(params: Mapping[str, str], suffix: str = "", now_ns: int | None = None) -> Selection:
    """A :class:`Selection` from query parameters ``service``, ``type``, ``from``, ``until`` and
    ``selector`` (each name + ``suffix``, e.g. ``from2`` for the comparison side of a diff; a
    missing suffixed parameter falls back to the unsuffixed one), and optionally ``span_id`` or
    ``trace_id``: then ``service`` may be left out (every service) and the time range defaults
    to all the data (a request's samples lie where they lie)."""

    def get(name: str) -> str | None:
        value = params.get(name + suffix)
        if value is None and suffix:
            value = params.get(name)
        return value

    span_id, trace_id = parse_span_filter(get("span_id"), get("trace_id"), suffix)
    spanned = span_id is not None or trace_id is not None
    service = get("service") or ""
    if not service and not spanned:
        raise QueryError("missing 'service'")
    type_id = get("type")
    if not type_id:
        raise QueryError("missing 'type' (a profile type id such as process_cpu:cpu:nanoseconds:cpu:nanoseconds)")
    if type_id.count(":") != 4:
        raise QueryError(f"bad 'type' {type_id!r}: expected name:sample_type:unit:period_type:period_unit")
    now = now_ns if now_ns is not None else time.time_ns()
    until_raw, from_raw = get("until"), get("from")
    until_ns = parse_seconds(until_raw, "until" + suffix) if until_raw else INT64_MAX if spanned else now
    if from_raw:
        from_ns = parse_seconds(from_raw, "from" + suffix)
    else:
        from_ns = 0 if spanned else until_ns - _DEFAULT_RANGE_S * 1_000_000_000
    if from_ns >= until_ns:
        raise QueryError(f"empty time range: 'from{suffix}' must be before 'until{suffix}'")
    matchers = parse_selector(get("selector") or "")
    return Selection(service, type_id, max(from_ns, 0), until_ns, matchers, span_id, trace_id)


@dataclass
class MergeResult:
    profile: Profile
    profiles: int  # number of stored profiles that contributed


class QueryEngine:
    """Answers the UI's queries from a :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- catalogue ---------------------------------------------------------------------------

    def services(self) -> list[dict[str, Any]]:
        out = []
        for row in self.store.services():
            out.append(
                {
                    "name": row["name"],
                    "profiles": row["profiles"],
                    "first": row["first_ns"] / 1e9,
                    "last": row["last_ns"] / 1e9,
                    "first_ns": row["first_ns"],
                    "last_ns": row["last_ns"],
                    "types": self.store.profile_types(row["name"]),
                }
            )
        return out

    def profile_types(self, service: str) -> list[dict[str, str]]:
        out = []
        for type_id in self.store.profile_types(service):
            name, stype, unit, ptype, punit = type_id.split(":")
            out.append(
                {
                    "id": type_id, "name": name, "sample_type": stype, "unit": unit,
                    "period_type": ptype, "period_unit": punit,
                }
            )
        return out

    def _series_in_range(
        self, service: str, from_ns: int | None, until_ns: int | None, type_id: str | None = None
    ) -> list[Labels]:
        if from_ns is None and until_ns is None and type_id is None:
            return [s.labels for s in self.store.series(service)]
        if type_id:
            stype = self.store.stype_id(service, type_id)
            stypes: list[int | None] = [stype] if stype is not None else []
        else:
            stypes = [self.store.stype_id(service, t) for t in self.store.profile_types(service)]
        if not stypes:
            return []
        sql = (
            "SELECT DISTINCT s.labels FROM totals t JOIN series s ON s.id = t.series_id "
            f"WHERE t.stype IN ({','.join(str(int(x)) for x in stypes if x is not None)}) "
            "AND t.start_ns >= ? AND t.start_ns < ?"
        )
        args = (from_ns or 0, until_ns if until_ns is not None else 2**62)
        return [labels_from_key(r[0]) for r in self.store.query(sql, args)]

    def label_names(
        self, service: str, from_ns: int | None = None, until_ns: int | None = None, type_id: str | None = None
    ) -> list[str]:
        names = {SERVICE_LABEL}
        for labels in self._series_in_range(service, from_ns, until_ns, type_id):
            names.update(k for k, _ in labels)
        return sorted(names)

    def label_values(
        self,
        service: str,
        name: str,
        from_ns: int | None = None,
        until_ns: int | None = None,
        type_id: str | None = None,
    ) -> list[str]:
        if name == SERVICE_LABEL:
            return [service]
        values = set()
        for labels in self._series_in_range(service, from_ns, until_ns, type_id):
            for k, v in labels:
                if k == name:
                    values.add(v)
        return sorted(values)

    # -- series selection --------------------------------------------------------------------

    def _matching_series(self, sel: Selection) -> list[int] | None:
        """Ids of the service's (every service's, when none is selected) series matching the
        selector (None: all of them)."""
        if not sel.matchers:
            return None
        out = []
        services = [sel.service] if sel.service else [s["name"] for s in self.store.services()]
        for service in services:
            for row in self.store.series(service):
                labels = dict(row.labels)
                labels[SERVICE_LABEL] = service
                if all(m.matches(labels) for m in sel.matchers):
                    out.append(row.id)
        return out

    def _stypes(self, sel: Selection) -> list[int]:
        """The ids of (service, profile type) of the selection: one, or one per service having
        the type when no service is selected."""
        if sel.service:
            stype = self.store.stype_id(sel.service, sel.type_id)
            return [stype] if stype is not None else []
        return [int(r[0]) for r in self.store.query("SELECT id FROM service_types WHERE type_id=?", (sel.type_id,))]

    def _span_keys(self, sel: Selection) -> list[int] | None:
        """The stored keys of the selection's spans (its span, or its trace's spans); None when
        it is not a span selection."""
        if sel.span_id is not None:
            return [parse_span_id(sel.span_id)]
        if sel.trace_id is not None:
            rows = self.store.query("SELECT span_id FROM span_traces WHERE trace_id=?", (parse_trace_id(sel.trace_id),))
            return sorted(int(r[0]) for r in rows)
        return None

    @staticmethod
    def _tables(sel: Selection) -> tuple[str, str, str]:
        """(table of values per stack, table of totals, its total column) for the selection: the
        span rows for a span selection, else the index of every sample."""
        if sel.spanned:
            return "span_samples", "span_samples", "value"
        return "samples", "totals", "total"

    def _where(self, sel: Selection) -> tuple[str, tuple[Any, ...]] | None:
        """SQL condition (on ``totals`` or ``samples``; on ``span_samples`` for a span
        selection) for the selection; None: matches nothing."""
        stypes = self._stypes(sel)
        if not stypes:
            return None
        # Ids and span keys are integers from our own tables: inlining them is safe and avoids
        # the bound-parameter limit for services with many series.
        where = f"stype IN ({','.join(str(int(i)) for i in stypes)}) AND start_ns >= ? AND start_ns < ?"
        args: tuple[Any, ...] = (sel.from_ns, sel.until_ns)
        spans = self._span_keys(sel)
        if spans is not None:
            if not spans:
                return None
            where += f" AND span_id IN ({','.join(str(int(k)) for k in spans)})"
        ids = self._matching_series(sel)
        if ids is not None:
            if not ids:
                return None
            where += f" AND series_id IN ({','.join(str(int(i)) for i in ids)})"
        return where, args

    # -- snapshot types (inuse_*) ------------------------------------------------------------
    # A snapshot type's value is what was live at the end of a window: over a range (or a
    # timeline bucket) each process counts with its latest window in it, never summed over time.

    def _latest_per_process(
        self, sel: Selection, where: str, args: tuple[Any, ...], bucket_ns: int | None = None
    ) -> str | None:
        """SQL condition keeping, of a snapshot type, the rows of each process's (``pid`` label;
        without one, each series') latest window within the selection (or within each timeline
        bucket of ``bucket_ns``); None when nothing matches."""
        rows = self.store.query(f"SELECT DISTINCT series_id, start_ns FROM totals WHERE {where}", args)
        if not rows:
            return None
        pid_of = {r.id: dict(r.labels).get("pid") for r in self.store.series(sel.service)}

        def owner(series_id: int) -> str:
            pid = pid_of.get(series_id)
            return f"pid:{pid}" if pid is not None else f"series:{series_id}"

        latest: dict[tuple[str, int], int] = {}
        for series_id, start in rows:
            b = (int(start) - sel.from_ns) // bucket_ns if bucket_ns else 0
            key = (owner(int(series_id)), b)
            if int(start) > latest.get(key, -1):
                latest[key] = int(start)
        by_start: dict[int, list[int]] = {}
        for series_id, start in rows:
            b = (int(start) - sel.from_ns) // bucket_ns if bucket_ns else 0
            if latest[(owner(int(series_id)), b)] == int(start):
                by_start.setdefault(int(start), []).append(int(series_id))
        # integers from our own tables: inlined (no bound-parameter limit)
        return "(" + " OR ".join(
            f"(start_ns = {start} AND series_id IN ({','.join(str(i) for i in sorted(set(ids)))}))"
            for start, ids in sorted(by_start.items())
        ) + ")"

    # -- timeline ----------------------------------------------------------------------------

    def timeline(self, sel: Selection, step_s: float | None = None) -> dict[str, Any]:
        """Total of the selected type per time bucket, zero-filled, buckets aligned on ``from``."""
        span_ns = sel.until_ns - sel.from_ns
        if step_s is None or step_s <= 0:
            step_ns = max(10_000_000_000, _nice_step(span_ns / 200))
        else:
            if not (math.isfinite(step_s) and step_s <= MAX_UNIX_SECONDS):
                raise QueryError(f"bad 'step' {step_s!r}: at most {MAX_UNIX_SECONDS} seconds")
            step_ns = min(int(step_s * 1e9), INT64_MAX)
        if step_ns <= 0 or span_ns / step_ns > _MAX_TIMELINE_POINTS:
            raise QueryError(f"'step' too small: at most {_MAX_TIMELINE_POINTS} points per timeline")
        buckets = int(math.ceil(span_ns / step_ns))
        values = [0] * buckets
        profiles = [0] * buckets
        clause = self._where(sel)
        if clause is not None and sel.type_id.split(":")[1] in GAUGE_TYPES and not sel.spanned:
            where, args = clause
            latest = self._latest_per_process(sel, where, args, bucket_ns=step_ns)
            clause = (f"{where} AND {latest}", args) if latest else None
        if clause is not None:
            where, args = clause
            _, table, column = self._tables(sel)
            rows = self.store.query(
                f"SELECT (start_ns - ?) / ? AS b, TOTAL({column}), COUNT(DISTINCT profile_id) FROM {table} "
                f"WHERE {where} GROUP BY b",
                (sel.from_ns, step_ns) + args,
            )
            for b, total, count in rows:
                if 0 <= b < buckets:
                    values[int(b)] += int(round(total))
                    profiles[int(b)] += int(count)
        return {
            **sel.to_json(),
            "step": step_ns / 1e9,
            "points": [
                {"t": (sel.from_ns + i * step_ns) / 1e9, "value": values[i], "profiles": profiles[i]}
                for i in range(buckets)
            ],
            "total": sum(values),
            "unit": sel.type_id.split(":")[2],
        }

    # -- merged profiles ---------------------------------------------------------------------

    def merge(self, sel: Selection) -> MergeResult:
        """The selection merged into one profile with the single selected sample type (one
        indexed ``GROUP BY stack_id`` over the stored samples; see :mod:`middleware.serve.store`)."""
        _, stype, sunit, ptype, punit = sel.type_id.split(":")
        clause = self._where(sel)
        if clause is not None and stype in GAUGE_TYPES and not sel.spanned:
            where, args = clause
            latest = self._latest_per_process(sel, where, args)
            clause = (f"{where} AND {latest}", args) if latest else None
        values: list[tuple[Any, ...]] = []
        profiles, period = 0, 0
        if clause is not None:
            where, args = clause
            values_table, totals_table, _ = self._tables(sel)
            # TOTAL, not SUM: sums beyond int64 (possible over many profiles) come back as
            # floats instead of failing the query with SQLite's "integer overflow".
            values = self.store.query(
                f"SELECT stack_id, TOTAL(value) FROM {values_table} WHERE {where} GROUP BY stack_id", args
            )
            row = self.store.query(
                "SELECT COUNT(*), MAX(p.period) FROM profiles p WHERE p.id IN "
                f"(SELECT DISTINCT profile_id FROM {totals_table} WHERE {where})",
                args,
            )[0]
            profiles, period = int(row[0]), int(row[1] or 0)
        if clause is not None and sel.spanned:
            # A span is one request (its local root span): the requests are the spans seen.
            where, args = clause
            row = self.store.query(f"SELECT COUNT(DISTINCT span_id) FROM span_samples WHERE {where}", args)[0]
            requests = int(row[0])
        else:
            requests = self._requests(sel) if clause is not None and stype not in GAUGE_TYPES else 0
        stacks = self.store.stacks([int(r[0]) for r in values])
        merged = Profile(
            sample_types=[(stype, sunit)],
            samples=[Sample(stacks[int(stack_id)], (int(round(value)),), ()) for stack_id, value in values if value],
            time_nanos=sel.from_ns,
            duration_nanos=sel.until_ns - sel.from_ns,
            period_type=(ptype, punit),
            period=period,
            default_sample_type=stype,
            requests={(): requests} if requests else {},
        )
        return MergeResult(merged, profiles)

    def _requests(self, sel: Selection) -> int:
        """The requests counted in the profiles of the selection's type and range, by the series
        the selector matches (a selector on a label requests do not carry, such as a thread's
        name, matches none: no count)."""
        stype = self.store.stype_id(sel.service, sel.type_id)
        if stype is None:
            return 0
        where = "start_ns >= ? AND start_ns < ?"
        ids = self._matching_series(sel)
        if ids is not None:
            if not ids:
                return 0
            where += f" AND series_id IN ({','.join(str(int(i)) for i in ids)})"
        row = self.store.query(
            f"SELECT TOTAL(count) FROM requests WHERE {where} AND profile_id IN "
            "(SELECT DISTINCT profile_id FROM totals WHERE stype = ? AND start_ns >= ? AND start_ns < ?)",
            (sel.from_ns, sel.until_ns, stype, sel.from_ns, sel.until_ns),
        )[0]
        return int(row[0] or 0)

    def profile_json(self, sel: Selection) -> dict[str, Any]:
        """The merged profile as the reporters' JSON, plus what was selected."""
        from middleware.reporters.flamegraph import profile_to_json

        result = self.merge(sel)
        stype = sel.type_id.split(":")[1]
        return {
            **sel.to_json(),
            "profiles": result.profiles,
            "total": result.profile.total(stype),
            "unit": sel.type_id.split(":")[2],
            "data": profile_to_json(result.profile, value=stype),
        }

    # -- spans -------------------------------------------------------------------------------

    def spans(self, span_id: str | None = None, trace_id: str | None = None) -> dict[str, Any]:
        """The spans of a trace (or the one span) whose samples are stored, to navigate a trace
        that ran in several processes: per span and service, its name (``span_name``), process
        (``pid``), first window start and last window end, profiles, and per profile type the
        total of its samples, with the CPU samples (``samples/count``, on-CPU samples), CPU time and
        wall time drawn out. An unknown id: no spans."""
        span_id, trace_id = parse_span_filter(span_id, trace_id)
        if span_id is None and trace_id is None:
            raise QueryError("missing 'span_id' or 'trace_id'")
        sel = Selection("", "", 0, INT64_MAX, (), span_id, trace_id)
        keys = self._span_keys(sel) or []
        out: dict[str, Any] = {"span_id": span_id, "trace_id": trace_id, "spans": []}
        if not keys:
            return out
        inlined = ",".join(str(int(k)) for k in keys)  # integers from our own table
        traces = {
            int(r[0]): trace_hex(r[1])
            for r in self.store.query(f"SELECT span_id, trace_id FROM span_traces WHERE span_id IN ({inlined})")
        }
        windows = self.store.query(
            "SELECT s.span_id, p.service, COUNT(DISTINCT s.profile_id), MIN(p.start_ns), MAX(p.end_ns) "
            f"FROM span_samples s JOIN profiles p ON p.id = s.profile_id WHERE s.span_id IN ({inlined}) "
            "GROUP BY s.span_id, p.service"
        )
        sums = self.store.query(
            "SELECT span_id, series_id, stype, TOTAL(value) FROM span_samples "
            f"WHERE span_id IN ({inlined}) GROUP BY span_id, series_id, stype"
        )
        stypes = {int(r[0]): (str(r[1]), str(r[2])) for r in self.store.query(
            "SELECT id, service, type_id FROM service_types WHERE id IN "
            f"({','.join(sorted({str(int(r[2])) for r in sums}))})")}
        series = {int(r[0]): dict(labels_from_key(r[1])) for r in self.store.query(
            "SELECT id, labels FROM series WHERE id IN "
            f"({','.join(sorted({str(int(r[1])) for r in sums}))})")}
        spans: dict[tuple[int, str], dict[str, Any]] = {}
        for key, service, profiles, first, last in windows:
            spans[(int(key), str(service))] = {
                "span_id": span_hex(int(key)),
                "trace_id": traces.get(int(key)),
                "service": service,
                "profiles": int(profiles),
                "first": int(first) / 1e9,
                "last": int(last) / 1e9,
                "first_ns": int(first),
                "last_ns": int(last),
                "types": {},
                "_names": set(),
                "_pids": set(),
            }
        for key, series_id, stype, total in sums:
            service, type_id = stypes[int(stype)]
            entry = spans[(int(key), service)]
            entry["types"][type_id] = entry["types"].get(type_id, 0) + int(round(total))
            labels = series.get(int(series_id), {})
            if labels.get("span_name"):
                entry["_names"].add(labels["span_name"])
            if labels.get("pid"):
                entry["_pids"].add(labels["pid"])
        for entry in spans.values():
            names, pids = sorted(entry.pop("_names")), sorted(entry.pop("_pids"))
            entry["span_name"] = ", ".join(names)
            entry["pid"] = ", ".join(pids)
            types: dict[str, int] = entry["types"]
            entry["cpu_samples"] = _type_total(types, "process_cpu", "samples")
            entry["cpu_ns"] = _type_total(types, "process_cpu", "cpu")
            entry["wall_ns"] = _type_total(types, "wall", "wall")
        out["spans"] = sorted(spans.values(), key=lambda e: (e["first_ns"], e["service"], e["span_id"]))
        if trace_id is None and out["spans"]:
            out["trace_id"] = out["spans"][0]["trace_id"]
        return out

    def sandwich_json(self, sel: Selection, function: str, file: str | None) -> dict[str, Any]:
        """Callers and callees of one function in the selection."""
        from middleware.reporters.sandwich import FunctionMatchError, sandwich

        result = self.merge(sel)
        stype = sel.type_id.split(":")[1]
        target: str | tuple[str, str] = (function, file) if file is not None else function
        try:
            sw = sandwich(result.profile, target, value=stype)
        except FunctionMatchError as exc:
            raise QueryError(str(exc), status=404) from None
        if sw.total_value == 0 and file is not None:
            raise QueryError(f"function {function!r} ({file}) is not in the selection", status=404)

        def rel(items: list[Any]) -> list[dict[str, Any]]:
            return [{"function": r.function, "file": r.file, "value": r.value} for r in items]

        return {
            **sel.to_json(),
            "unit": sel.type_id.split(":")[2],
            "function": sw.function,
            "file": sw.file,
            "self": sw.self_value,
            "total": sw.total_value,
            "profile_total": sw.profile_total,
            "callers": rel(sw.callers),
            "callees": rel(sw.callees),
        }

    def diff_json(self, base: Selection, comparison: Selection) -> dict[str, Any]:
        """What changed from ``base`` to ``comparison``: each function's Self share (percent of
        each side's own total) and the change in percentage points, from the reporters' diff
        (:func:`middleware.reporters.diff.diff_profiles`), with Total values alongside; and the
        diff flame graph's data (``flame``, :func:`middleware.reporters.flamegraph.diff_to_json`)."""
        from middleware.reporters.diff import diff_profiles
        from middleware.reporters.table import function_table

        a = self.merge(base)
        b = self.merge(comparison)
        stype = base.type_id.split(":")[1]
        totals_a = {r.key: r.total_value for r in function_table(a.profile, value=stype)}
        totals_b = {r.key: r.total_value for r in function_table(b.profile, value=stype)}
        rows = diff_profiles(a.profile, b.profile, value=stype)
        from middleware.reporters.flamegraph import diff_to_json

        return {
            "flame": diff_to_json(a.profile, b.profile, value=stype, names=("A", "B")),
            "base": {**base.to_json(), "profiles": a.profiles, "total": a.profile.total(stype)},
            "comparison": {**comparison.to_json(), "profiles": b.profiles, "total": b.profile.total(stype)},
            "unit": base.type_id.split(":")[2],
            "functions": [
                {
                    "function": r.function,
                    "file": r.file,
                    "self_a": r.before_self,
                    "self_b": r.after_self,
                    "total_a": totals_a.get((r.function, r.file), 0),
                    "total_b": totals_b.get((r.function, r.file), 0),
                    "self_share_a": r.before_percent,
                    "self_share_b": r.after_percent,
                    "change": r.change,
                }
                for r in rows
            ],
        }


def _type_total(types: Mapping[str, int], name: str, sample_type: str) -> int:
    """The total of the profile type ``name:sample_type:...`` among ``types`` (0 when absent)."""
    return sum(v for t, v in types.items() if t.split(":")[:2] == [name, sample_type])


def _nice_step(ns: float) -> int:
    """Round a bucket width up to 10 s, 30 s, 1/5/10/30 min, 1/3/6/12 h or 1 d."""
    for seconds in (10, 30, 60, 300, 600, 1800, 3600, 10800, 21600, 43200, 86400):
        if ns <= seconds * 1e9:
            return seconds * 1_000_000_000
    return int(math.ceil(ns / 86400e9)) * 86400 * 1_000_000_000
