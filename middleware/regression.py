"""Regression detection: which functions cost more in AFTER than in BEFORE, beyond the noise.

One detector, used by the CLI (``python -m middleware regress BEFORE AFTER``) and the pytest
plugin (``mw_profile.assert_no_regression(baseline)``).

What is compared. For every function, its cost normalised by the work done, on one of two bases:

* ``request`` (when both sides count requests: profiles of an app whose requests the Flask, WSGI
  or ASGI integration counts, see :attr:`middleware.profile.Profile.requests`): its Self and its
  Total value **per request** served in the profiles' windows (within an endpoint when the
  profiles are filtered on ``endpoint``). A function that did not change keeps its cost per
  request whatever else changed -- other code made faster or slower, more or fewer requests.
* ``share`` (otherwise): its Self and Total value divided by the whole profile's value of the
  same type, so that a run that did more or less work in all (a longer window) compares like
  for like. Here a function's share also grows when *other* code got faster, which the request
  basis does not mistake for a regression; the request basis in turn moves with the mix of
  requests (heavier inputs cost more per request), which shares do not. Reported by
default: the functions whose Self share grew (the code that got slower), and those whose Total
share grew with no reported callee below them (a function whose own frames did not change but
whose calls cost more, e.g. into a helper shared with others) -- not every caller whose Total
grew with its callee. A function whose
share grew by more than ``threshold`` (default 10%) AND whose growth is beyond the sampling
noise is a regression; a function absent before and clearly present after is new.

The noise. A sampled profile's values are counts of samples times the sampling period, so a
function's value in a profile is ``k`` samples, a Poisson count whose mean is its rate times the
exposure ``n`` (the profile's samples on the share basis, its requests on the request basis).
Given the two counts' sum, ``k_after`` is binomial with ``k_before + k_after`` trials and
probability ``p = n_after * r / (n_before + n_after * r)`` where ``r`` is the true ratio of
rates (the conditional test of two Poisson rates). The
interval for ``r`` comes from the Wilson score interval of that binomial proportion, which stays
right for small counts (an exact test would be marginally tighter; the normal approximation on
``log r`` is wrong for the counts of rare functions). A function is flagged when both hold: its
share grew by more than ``threshold`` (the point estimate of ``r`` is above ``1 + threshold``)
and it grew beyond the noise (the interval's lower bound is above 1). The intervals have a
family-wise confidence of 99.9%: each function's is at ``1 - 0.001 / m`` for ``m`` functions
compared (Bonferroni), so a null change (same code, fresh samples) flags nothing in all but
about one comparison in a thousand, however many functions there are. The sample count of a
value is the value over the sampling period (the profile's period for its period type, 1 for
counts, else the least value a stack has: one sample).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist

from middleware.profile import Profile
from middleware.reporters.table import function_table

__all__ = ["Finding", "detect", "render_findings", "DEFAULT_THRESHOLD", "DEFAULT_CONFIDENCE", "BASES"]

DEFAULT_THRESHOLD = 0.10
DEFAULT_CONFIDENCE = 0.999
#: What a function's cost is divided by: ``auto`` is ``request`` when both sides count requests.
BASES = ("auto", "request", "share")


@dataclass(frozen=True)
class Finding:
    """A function whose cost grew (``kind="regression"``) or appeared (``kind="new"``).

    ``share_before``/``share_after`` are its cost on the finding's ``basis``: a share of the
    profile's total (0..1) for ``"share"``, the value per request (e.g. nanoseconds of CPU) for
    ``"request"``."""

    kind: str
    metric: str  # "self" or "total": which share grew
    function: str
    file: str
    share_before: float  # of the profile's total, 0..1
    share_after: float
    ratio: float  # share_after / share_before (inf for a new function)
    ratio_low: float  # the interval's bounds for the ratio
    ratio_high: float
    samples_before: float
    samples_after: float
    basis: str = "share"
    requests_before: float = 0.0  # requests served on each side (request basis)
    requests_after: float = 0.0

    @property
    def growth(self) -> float:
        """Relative growth of the share (0.5 = +50%)."""
        return self.ratio - 1.0


@dataclass(frozen=True)
class _Side:
    """One profile's figures: each function's Self and Total, the whole total, the value of one
    sample, the requests served."""

    self_values: dict[tuple[str, str], float]
    total_values: dict[tuple[str, str], float]
    total: float
    period: float
    requests: float


def _side(profile: Profile, value: str | None) -> _Side:
    rows = function_table(profile, value)
    index = profile.value_index(value)
    name, unit = profile.sample_types[index]
    if unit == "count":
        period = 1.0
    elif profile.period > 0 and name == profile.period_type[0]:
        period = float(profile.period)
    else:  # e.g. wall time: a stack's value is its samples times the interval, the least is one sample
        period = float(min((s.values[index] for s in profile.samples if s.values[index] > 0), default=0))
    return _Side({(r.function, r.file): float(r.self_value) for r in rows},
                 {(r.function, r.file): float(r.total_value) for r in rows},
                 float(rows[0].profile_total) if rows else 0.0, period, float(profile.request_count()))


def _wilson(k: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (k successes in n trials)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def detect(
    before: Profile,
    after: Profile,
    *,
    value: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    confidence: float = DEFAULT_CONFIDENCE,
    metric: str = "auto",
    per: str = "auto",
) -> list[Finding]:
    """The functions whose ``metric`` ("self", "total", or "auto": see the module's doc) cost of
    ``value`` grew beyond ``threshold`` and the noise, and the new ones; biggest growth first.

    ``per``: the basis of the cost, "request", "share", or "auto" (request when both profiles
    count requests, else share)."""
    if threshold < 0:
        raise ValueError("threshold must not be negative")
    if per not in BASES:
        raise ValueError(f"per must be one of {', '.join(BASES)}")
    a, b = _side(before, value), _side(after, value)
    if a.total <= 0 or b.total <= 0:
        raise ValueError("BEFORE and AFTER must both hold samples of that type")
    has_requests = a.requests > 0 and b.requests > 0
    if per == "request" and not has_requests:
        raise ValueError("cost per request needs request counts on both sides (profiles of an app whose "
                         "requests the Flask, WSGI or ASGI integration counts)")
    basis = "request" if per == "request" or (per == "auto" and has_requests) else "share"
    if metric != "auto":
        return _detect(a, b, threshold, confidence, metric, basis)
    by_self = _detect(a, b, threshold, confidence, "self", basis)
    by_total = _detect(a, b, threshold, confidence, "total", basis)
    above = _ancestors(after)
    flagged = {(f.function, f.file) for f in by_total}
    deepest = [f for f in by_total
               if not any((f.function, f.file) in above.get(g, ()) for g in flagged if g != (f.function, f.file))]
    seen = {(f.function, f.file) for f in by_self}
    out = by_self + [f for f in deepest if (f.function, f.file) not in seen]
    out.sort(key=_order)
    return out


def _order(f: Finding) -> tuple[bool, float, str]:
    """Regressions first, the biggest growth first, then new functions."""
    return f.kind != "regression", -min(f.ratio, 1e9), f.function


def _ancestors(profile: Profile) -> dict[tuple[str, str], set[tuple[str, str]]]:
    """function -> the functions found above it (its callers, theirs...) in some stack."""
    out: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for sample in profile.samples:
        keys = [(f.function, f.file) for f in sample.stack]
        for i, key in enumerate(keys):
            out.setdefault(key, set()).update(k for k in keys[:i] if k != key)
    return out


def _detect(a: _Side, b: _Side, threshold: float, confidence: float, metric: str, basis: str) -> list[Finding]:
    per_a = a.total_values if metric == "total" else a.self_values
    per_b = b.total_values if metric == "total" else b.self_values
    total_a, total_b, period_a, period_b = a.total, b.total, a.period, b.period
    unit_a = period_a or max(total_a, total_b) / 100.0  # no sample at all: coarse units
    unit_b = period_b or max(total_a, total_b) / 100.0
    # the exposures: samples in all (share basis) or requests served (request basis)
    n_a, n_b = (a.requests, b.requests) if basis == "request" else (total_a / unit_a, total_b / unit_b)
    # a cost as reported: a share, or the value per request
    scale_a, scale_b = (unit_a, unit_b) if basis == "request" else (1.0, 1.0)
    reqs = (a.requests, b.requests) if basis == "request" else (0.0, 0.0)
    keys = set(per_a) | set(per_b)
    compared = [k for k in keys if per_a.get(k, 0) > 0 or per_b.get(k, 0) > 0]
    alpha = (1 - confidence) / max(1, len(compared))
    z = NormalDist().inv_cdf(1 - alpha / 2)
    out: list[Finding] = []
    for key in compared:
        k_a, k_b = per_a.get(key, 0.0) / unit_a, per_b.get(key, 0.0) / unit_b
        share_a, share_b = k_a / n_a, k_b / n_b
        lo_p, hi_p = _wilson(k_b, k_a + k_b, z)
        # p = n_b r / (n_a + n_b r)  <=>  r = p n_a / ((1 - p) n_b)
        r_low = lo_p * n_a / ((1 - lo_p) * n_b) if lo_p < 1 else math.inf
        r_high = hi_p * n_a / ((1 - hi_p) * n_b) if hi_p < 1 else math.inf
        if k_a == 0:
            # new: present after, beyond what chance alone would leave at 0 before
            if r_low > 1 and share_b > 0:
                out.append(Finding("new", metric, key[0], key[1], 0.0, share_b * scale_b, math.inf, r_low, r_high,
                                   k_a, k_b, basis, *reqs))
            continue
        ratio = share_b / share_a
        if ratio > 1 + threshold and r_low > 1:
            out.append(Finding("regression", metric, key[0], key[1], share_a * scale_a, share_b * scale_b, ratio,
                               r_low, r_high, k_a, k_b, basis, *reqs))
    out.sort(key=_order)
    return out


def _cost(f: Finding, v: float, unit: str) -> str:
    if f.basis != "request":
        return f"{v:.2%}"
    if unit == "nanoseconds":
        return f"{v / 1e6:.3g}ms/req" if v >= 1e5 else f"{v / 1e3:.3g}us/req"
    if unit == "bytes":
        return f"{v / 1024:.3g}KiB/req"
    return f"{v:.3g}/req"


def render_findings(findings: Iterable[Finding], threshold: float, header: str = "", unit: str = "") -> str:
    """The findings as a text table (one line saying so when there is none); ``unit``: of the
    value compared (for costs per request)."""
    rows = list(findings)
    lines = [header] if header else []
    if not rows:
        lines.append(f"no regression: no function's cost grew by more than {threshold:.0%} beyond the noise")
        return "\n".join(lines) + "\n"
    width = 14 if rows[0].basis == "request" else 8
    lines.append(f"{'kind':<10} {'cost':<5} {'before':>{width}} {'after':>{width}} {'change':>8} {'interval':>17}  "
                 "function")
    for f in rows:
        change = "new" if f.kind == "new" else f"{f.growth:+.0%}"
        high = "inf" if math.isinf(f.ratio_high) else f"{f.ratio_high - 1:+.0%}"
        interval = f"[{f.ratio_low - 1:+.0%}, {high}]"
        where = f" ({f.file})" if f.file else ""
        lines.append(f"{f.kind:<10} {f.metric:<5} {_cost(f, f.share_before, unit):>{width}} "
                     f"{_cost(f, f.share_after, unit):>{width}} {change:>8} {interval:>17}  {f.function}{where}")
    return "\n".join(lines) + "\n"
