"""The profile model every part above the C layer speaks (see docs/interfaces.md).

A :class:`Profile` is a list of :class:`Sample` s, each a call stack (ROOT FIRST, leaf last) with
one value per sample type and a sorted tuple of string labels. Profiles can be merged (values of
identical stack+labels are added) and filtered by labels or by time window.

pprof stores stacks leaf first; :mod:`middleware.pprof` converts at the boundary so nothing in
the reporters has to think about it.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

__all__ = ["Frame", "Sample", "Profile", "LabelFilter", "normalize_label_filter"]

#: Sample types written by the agent (docs/interfaces.md, "pprof we write").
DEFAULT_SAMPLE_TYPES: list[tuple[str, str]] = [
    ("samples", "count"),
    ("cpu", "nanoseconds"),
    ("wall", "nanoseconds"),
]

#: ``{key: {allowed values}}``: a sample passes when, for every key, its label value is one of
#: the allowed values (AND across keys, OR within one key).
LabelFilter = Mapping[str, frozenset[str]]


@dataclass(frozen=True, order=True)
class Frame:
    """One stack frame: qualified function name, file and the line being executed."""

    function: str
    file: str = ""
    line: int = 0


@dataclass
class Sample:
    """A call stack (root first) with one value per sample type and its labels."""

    stack: tuple[Frame, ...]
    values: tuple[int, ...]
    labels: tuple[tuple[str, str], ...] = ()

    def label(self, key: str) -> str | None:
        """The value of label ``key``, or None."""
        for k, v in self.labels:
            if k == key:
                return v
        return None


def normalize_label_filter(
    labels: LabelFilter | Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> dict[str, frozenset[str]]:
    """Accept ``{"k": "v"}``, ``{"k": {"v1", "v2"}}`` or ``[("k", "v"), ...]``."""
    if not labels:
        return {}
    out: dict[str, set[str]] = {}
    items: Iterable[tuple[str, object]]
    items = labels.items() if isinstance(labels, Mapping) else labels
    for key, value in items:
        if isinstance(value, str):
            out.setdefault(key, set()).add(value)
        else:
            out.setdefault(key, set()).update(str(v) for v in value)
    return {k: frozenset(v) for k, v in out.items()}


#: Sample types that are snapshots (what is live at the end of a window), not amounts over the
#: window: merged over time, each process contributes its latest window only (summing them
#: would count memory that stayed live once per window).
GAUGE_TYPES = frozenset({"inuse_objects", "inuse_space"})


def _latest_snapshots(profiles: Sequence[Profile]) -> dict[str, int]:
    """For each process (``pid`` label), the start of its latest profile with gauge types."""
    latest: dict[str, int] = {}
    for p in profiles:
        if not any(name in GAUGE_TYPES for name, _ in p.sample_types):
            continue
        for pid in {s.label("pid") or "" for s in p.samples}:
            if p.time_nanos > latest.get(pid, -1):
                latest[pid] = p.time_nanos
    return latest


@dataclass
class Profile:
    """A set of samples sharing the same sample types."""

    sample_types: list[tuple[str, str]] = field(default_factory=lambda: list(DEFAULT_SAMPLE_TYPES))
    samples: list[Sample] = field(default_factory=list)
    time_nanos: int = 0
    duration_nanos: int = 0
    period_type: tuple[str, str] = ("cpu", "nanoseconds")
    period: int = 10_000_000
    default_sample_type: str = "cpu"
    comments: list[str] = field(default_factory=list)
    #: Requests served in the profile's window, per label set (sorted (key, value) pairs: the
    #: request's own label such as ``endpoint``, the profile's static labels, ``pid``) -> count.
    #: Read from and written as ``mw:requests`` comments (see :mod:`middleware.pprof`).
    requests: dict[tuple[tuple[str, str], ...], int] = field(default_factory=dict)
    #: The trace of each span whose id samples carry (``span_id`` label, the local root span of
    #: the request that ran them): span id -> trace id, both lowercase hex (16 and 32 digits).
    #: Read from and written as ``mw:spans`` comments (see :mod:`middleware.pprof`).
    span_traces: dict[str, str] = field(default_factory=dict)

    # -- values ---------------------------------------------------------------------------------
    def value_index(self, name: str | None = None) -> int:
        """Index of sample type ``name`` (None: the default sample type) in ``sample_types``.

        Raises ``KeyError`` with the available names when there is no such sample type.
        """
        names = [t for t, _ in self.sample_types]
        if name is None:
            name = self.default_value_name()
        try:
            return names.index(name)
        except ValueError:
            raise KeyError(
                f"no sample type {name!r} in this profile (available: {', '.join(names) or 'none'})"
            ) from None

    def default_value_name(self) -> str:
        """The default sample type's name; pprof's rule (the last type) when it is not set/known."""
        names = [t for t, _ in self.sample_types]
        if self.default_sample_type in names:
            return self.default_sample_type
        return names[-1] if names else self.default_sample_type

    def unit(self, name: str | None = None) -> str:
        """The unit of sample type ``name`` (None: default)."""
        return self.sample_types[self.value_index(name)][1]

    def total(self, name: str | None = None) -> int:
        """Sum of the values of sample type ``name`` over all samples."""
        i = self.value_index(name)
        return sum(s.values[i] for s in self.samples)

    @property
    def time_end_nanos(self) -> int:
        return self.time_nanos + self.duration_nanos

    def request_count(self) -> int:
        """Requests served in the profile's window (0 when no integration counted any)."""
        return sum(self.requests.values())

    def is_empty(self) -> bool:
        """True when there is no sample with a nonzero value."""
        return not any(any(s.values) for s in self.samples)

    # -- combining ------------------------------------------------------------------------------
    def aggregated(self) -> Profile:
        """A copy where samples with identical stack and labels are summed (order preserved)."""
        return self.merge()

    def merge(self, *others: Profile) -> Profile:
        """Merge this profile with ``others`` into a new profile.

        Sample types are the union (in order of first appearance); a profile lacking a type
        contributes 0 for it. The default sample type (and period) is the first profile's, or
        ``cpu`` when one of them defaults to it. Samples with the same stack and labels are summed. The time window
        becomes the smallest window covering every non-empty window.
        """
        profiles = [self, *others]
        types: list[tuple[str, str]] = []
        for p in profiles:
            for t in p.sample_types:
                if t not in types:
                    types.append(t)
        names = [t for t, _ in types]
        if len(set(names)) != len(names):
            raise ValueError(f"sample types with the same name but different units: {types}")

        latest = _latest_snapshots(profiles)
        acc: dict[tuple[tuple[Frame, ...], tuple[tuple[str, str], ...]], list[int]] = {}
        for p in profiles:
            where = [types.index(t) for t in p.sample_types]
            gauges = {src for src, (name, _) in enumerate(p.sample_types) if name in GAUGE_TYPES}
            for s in p.samples:
                key = (s.stack, s.labels)
                vals = acc.get(key)
                if vals is None:
                    vals = acc[key] = [0] * len(types)
                stale = bool(gauges) and latest.get(s.label("pid") or "", p.time_nanos) != p.time_nanos
                for src, dst in enumerate(where):
                    if stale and src in gauges:
                        continue
                    vals[dst] += s.values[src]

        windows = [(p.time_nanos, p.time_end_nanos) for p in profiles if p.time_nanos]
        start = min((w[0] for w in windows), default=0)
        end = max((w[1] for w in windows), default=0)
        comments: list[str] = []
        requests: dict[tuple[tuple[str, str], ...], int] = {}
        span_traces: dict[str, str] = {}
        for p in profiles:
            comments.extend(c for c in p.comments if c not in comments)
            for rkey, count in p.requests.items():
                requests[rkey] = requests.get(rkey, 0) + count
            span_traces.update(p.span_traces)
        # A store holds CPU profiles and lock-wait profiles side by side: CPU stays the default
        # whichever file comes first.
        lead = next((p for p in profiles if p.default_sample_type == "cpu"), self)
        return Profile(
            sample_types=types,
            samples=[Sample(stack, tuple(v), labels) for (stack, labels), v in acc.items()],
            time_nanos=start,
            duration_nanos=end - start,
            period_type=lead.period_type,
            period=lead.period,
            default_sample_type=lead.default_sample_type,
            comments=comments,
            requests=requests,
            span_traces=span_traces,
        )

    @staticmethod
    def merge_all(profiles: Sequence[Profile]) -> Profile:
        """Merge a non-empty sequence of profiles."""
        if not profiles:
            raise ValueError("nothing to merge")
        return profiles[0].merge(*profiles[1:])

    # -- selecting ------------------------------------------------------------------------------
    def overlaps(self, start_nanos: int | None, end_nanos: int | None) -> bool:
        """Whether this profile's window overlaps ``[start, end)`` (None = unbounded).

        A profile without a start time (``time_nanos == 0``) never matches a bounded range.
        """
        if start_nanos is None and end_nanos is None:
            return True
        if not self.time_nanos:
            return False
        end = self.time_end_nanos if self.duration_nanos > 0 else self.time_nanos + 1
        if start_nanos is not None and end <= start_nanos:
            return False
        if end_nanos is not None and self.time_nanos >= end_nanos:
            return False
        return True

    def filter(
        self,
        labels: LabelFilter | Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        time_range: tuple[int | None, int | None] | None = None,
    ) -> Profile:
        """A new profile with only the samples that match.

        ``labels``: see :data:`LabelFilter` (a plain ``{"k": "v"}`` mapping works too).
        ``time_range``: ``(start_ns, end_ns)``; samples carry no timestamps, so the whole profile
        is kept when its window overlaps the range and nothing is kept otherwise (apply it to each
        stored profile before merging, as :func:`middleware.pprof.load_profiles` does).
        """
        wanted = normalize_label_filter(labels)
        keep_all = time_range is None or self.overlaps(*time_range)
        samples: list[Sample] = []
        if keep_all:
            for s in self.samples:
                if wanted:
                    have = dict(s.labels)
                    if not all(have.get(k) in vs for k, vs in wanted.items()):
                        continue
                samples.append(s)
        requests: dict[tuple[tuple[str, str], ...], int] = {}
        if keep_all:
            for key, count in self.requests.items():
                # a request lacking a label filtered on (thread_name...) is not counted
                have = dict(key)
                if all(have.get(k) in vs for k, vs in wanted.items()):
                    requests[key] = count
        spans = {v for s in samples for k, v in s.labels if k == "span_id"}
        return Profile(
            sample_types=list(self.sample_types),
            samples=samples,
            time_nanos=self.time_nanos,
            duration_nanos=self.duration_nanos,
            period_type=self.period_type,
            period=self.period,
            default_sample_type=self.default_sample_type,
            comments=list(self.comments),
            requests=requests,
            span_traces={k: v for k, v in self.span_traces.items() if k in spans},
        )

    def label_values(self) -> dict[str, list[str]]:
        """Every label key with its sorted distinct values (for UIs and error messages)."""
        out: dict[str, set[str]] = {}
        for s in self.samples:
            for k, v in s.labels:
                out.setdefault(k, set()).add(v)
        return {k: sorted(v) for k, v in sorted(out.items())}
