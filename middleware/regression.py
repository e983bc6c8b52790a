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

The common change. Code that did not change can still cost more in AFTER: the machine is slower
(another tenant on the host, a smaller instance, a hotter CPU), the interpreter changed, or (on
the share basis) other code got faster and left it a larger share. Every function then moves
together, and judging each against 1 would flag them all. So each function is judged against the
common change: the median ratio of the functions well sampled on both sides (at least
``COMMON_MIN_SAMPLES`` samples each side, and at least ``COMMON_MIN_FUNCTIONS`` of them; each
weighted by its samples, no one above ``1 / COMMON_MIN_FUNCTIONS`` of the weight, so that a
function that did change cannot set it alone), when it is above 1 beyond its own noise (two
standard deviations: a null change's median, a little above 1 half of the time, is left alone).
A function is flagged when its ratio *divided by the common change* passes both tests, the
interval widened by the median's own noise (its spread when the functions' ratios are drawn
again from their sampling noise, added in quadrature). On the share basis only a rise is
discounted: there a common fall is what one function's growth does to the others' shares, and
the correction never flags more than the plain test. On the request basis a common fall is
discounted too: one function's cost per request does not fall because another's grew, so a fall
shared by most functions is the machine (BEFORE ran beside a busy neighbour, or on a slower
instance: on a shared 2-core VM the same code's CPU per request moves by up to a third between
runs), and a function that kept its cost while the rest got cheaper did get dearer against the
machine -- judged against 1, a function made 1.5x as costly after a slow BEFORE can show no
growth at all. What the correction takes for the machine is a change shared by most of the
well-sampled functions; a change of the code that slows (or, per request, speeds up) most of them
alike is reported as the common change (:attr:`Comparison.common`), not as findings.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist, pstdev
from typing import Any

from middleware.profile import Profile
from middleware.reporters.table import function_table

__all__ = ["Finding", "Comparison", "compare", "detect", "render_findings", "DEFAULT_THRESHOLD",
           "DEFAULT_CONFIDENCE", "BASES", "COMMON_MIN_SAMPLES", "COMMON_MIN_FUNCTIONS"]

DEFAULT_THRESHOLD = 0.10
DEFAULT_CONFIDENCE = 0.999
#: A function counts towards the common change with at least this many samples on each side
#: (its ratio is then known to about +-20% at 2 sigma)...
COMMON_MIN_SAMPLES = 50
#: ...and the common change is estimated from at least this many such functions (else it is 1).
COMMON_MIN_FUNCTIONS = 3
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
    ratio: float  # share_after / share_before over the common change (inf for a new function)
    ratio_low: float  # the interval's bounds for the ratio (over the common change too)
    ratio_high: float
    samples_before: float
    samples_after: float
    basis: str = "share"
    requests_before: float = 0.0  # requests served on each side (request basis)
    requests_after: float = 0.0
    common: float = 1.0  # the common change it was judged against (see the module's doc)

    @property
    def growth(self) -> float:
        """Relative growth of the share beyond the common change (0.5 = +50%)."""
        return self.ratio - 1.0


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare` found: the findings, and the common change every function was judged
    against (1.0 when none was discounted) with the count of functions it was estimated from."""

    findings: list[Finding]
    common: float
    common_functions: int
    basis: str
    common_sd: float = 0.0  # the standard deviation of the common change's log


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


def detect(before: Profile, after: Profile, **options: Any) -> list[Finding]:
    """The findings of :func:`compare` (same options): the functions whose ``metric`` cost of
    ``value`` grew beyond ``threshold``, the noise and the common change, and the new ones;
    biggest growth first."""
    return compare(before, after, **options).findings


def compare(
    before: Profile,
    after: Profile,
    *,
    value: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    confidence: float = DEFAULT_CONFIDENCE,
    metric: str = "auto",
    per: str = "auto",
    common: Comparison | None = None,
) -> Comparison:
    """The functions whose ``metric`` ("self", "total", or "auto": see the module's doc) cost of
    ``value`` grew beyond ``threshold``, the noise and the common change, and the new ones (biggest
    growth first), with the common change they were judged against: the one of ``common`` when
    given on the same basis (e.g. the whole service's, for a comparison within one endpoint: the
    machine is the same, and the whole has more functions to tell it from the code), else the one
    of these profiles.

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
    if common is not None and common.basis == basis:
        common_change, common_sd, counted = common.common, common.common_sd, common.common_functions
    else:
        common_change, common_sd, counted = _common(a, b, basis)
    if metric != "auto":
        return Comparison(_detect(a, b, threshold, confidence, metric, basis, common_change, common_sd),
                          common_change, counted, basis, common_sd)
    by_self = _detect(a, b, threshold, confidence, "self", basis, common_change, common_sd)
    by_total = _detect(a, b, threshold, confidence, "total", basis, common_change, common_sd)
    above = _ancestors(after)
    flagged = {(f.function, f.file) for f in by_total}
    deepest = [f for f in by_total
               if not any((f.function, f.file) in above.get(g, ()) for g in flagged if g != (f.function, f.file))]
    seen = {(f.function, f.file) for f in by_self}
    out = by_self + [f for f in deepest if (f.function, f.file) not in seen]
    out.sort(key=_order)
    return Comparison(out, common_change, counted, basis, common_sd)


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


def _units(a: _Side, b: _Side, basis: str) -> tuple[float, float, float, float]:
    """The value of one sample on each side, and the exposures: samples in all (share basis) or
    requests served (request basis)."""
    unit_a = a.period or max(a.total, b.total) / 100.0  # no sample at all: coarse units
    unit_b = b.period or max(a.total, b.total) / 100.0
    n_a, n_b = (a.requests, b.requests) if basis == "request" else (a.total / unit_a, b.total / unit_b)
    return unit_a, unit_b, n_a, n_b


def _common(a: _Side, b: _Side, basis: str) -> tuple[float, float, int]:
    """The common change (see the module's doc), the standard deviation of its log (from the
    functions' sampling noise), and the number of functions it comes from."""
    unit_a, unit_b, n_a, n_b = _units(a, b, basis)
    logs: list[float] = []  # each function's log ratio...
    sds: list[float] = []  # ...and its standard deviation (counts are Poisson: 1/k each side)
    for key, v_a in a.self_values.items():
        k_a, k_b = v_a / unit_a, b.self_values.get(key, 0.0) / unit_b
        if k_a >= COMMON_MIN_SAMPLES and k_b >= COMMON_MIN_SAMPLES:
            logs.append(math.log((k_b / n_b) / (k_a / n_a)))
            sds.append(math.sqrt(1 / k_a + 1 / k_b))
    if len(logs) < COMMON_MIN_FUNCTIONS:
        return 1.0, 0.0, len(logs)
    weights = _capped([1 / (sd * sd) for sd in sds], 1 / COMMON_MIN_FUNCTIONS)
    centre = _weighted_median(logs, weights)
    if centre <= 0 and basis != "request":  # a fall of shares: see the module's doc
        return 1.0, 0.0, len(logs)
    # the median's own noise: the median of the functions' ratios drawn again from their noise
    # (seeded: the same profiles give the same answer)
    rng = random.Random(0)
    draws = [_weighted_median([rng.gauss(x, sd) for x, sd in zip(logs, sds, strict=True)], weights)
             for _ in range(_COMMON_DRAWS)]
    spread = pstdev(draws)
    if abs(centre) <= _COMMON_SIGMAS * spread:  # within its own noise: nothing to discount
        return 1.0, 0.0, len(logs)
    return math.exp(centre), spread, len(logs)


_COMMON_DRAWS = 200
#: A common change is discounted when it is beyond this many standard deviations of its own noise.
_COMMON_SIGMAS = 2.0


def _capped(weights: list[float], most: float) -> list[float]:
    """The weights with none above ``most`` of their sum (the big ones clipped until it holds):
    the precise functions count more, but no one function decides the median alone."""
    out = list(weights)
    for _ in range(len(out)):
        cap = most * sum(out)
        if all(w <= cap * (1 + 1e-9) for w in out):
            break
        out = [min(w, cap) for w in out]
    return out


def _weighted_median(values: list[float], weights: list[float]) -> float:
    """The value where the cumulative weight (values in order) reaches half the total."""
    half, acc = sum(weights) / 2, 0.0
    pairs = sorted(zip(values, weights, strict=True))
    for v, w in pairs:
        acc += w
        if acc >= half:
            return v
    return pairs[-1][0]


def _beyond(r: float, bound: float, common: float, spread: float) -> float:
    """A bound of a ratio's interval judged against the common change: the bound's distance from
    the ratio (in logs) and the common change's own noise (``spread``: z times the standard
    deviation of its log) add in quadrature."""
    if common == 1.0 or not 0 < bound < math.inf or not 0 < r < math.inf:
        return bound / common
    margin = math.log(r) - math.log(bound)
    return math.exp(math.log(r) - math.copysign(math.hypot(margin, spread), margin)) / common


def _detect(a: _Side, b: _Side, threshold: float, confidence: float, metric: str, basis: str,
            common: float = 1.0, common_sd: float = 0.0) -> list[Finding]:
    per_a = a.total_values if metric == "total" else a.self_values
    per_b = b.total_values if metric == "total" else b.self_values
    unit_a, unit_b, n_a, n_b = _units(a, b, basis)
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
        # judged against the common change (1 when none is discounted), its noise included
        raw = share_b / share_a if share_a > 0 else math.inf
        r_low = _beyond(raw, r_low, common, z * common_sd)
        r_high = _beyond(raw, r_high, common, z * common_sd)
        if k_a == 0:
            # new: present after, beyond what chance alone would leave at 0 before
            if r_low > 1 and share_b > 0:
                out.append(Finding("new", metric, key[0], key[1], 0.0, share_b * scale_b, math.inf, r_low, r_high,
                                   k_a, k_b, basis, *reqs, common))
            continue
        ratio = raw / common
        if ratio > 1 + threshold and r_low > 1:
            out.append(Finding("regression", metric, key[0], key[1], share_a * scale_a, share_b * scale_b, ratio,
                               r_low, r_high, k_a, k_b, basis, *reqs, common))
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


def render_findings(findings: Iterable[Finding], threshold: float, header: str = "", unit: str = "",
                    common: float | None = None, common_functions: int = 0) -> str:
    """The findings as a text table (one line saying so when there is none); ``unit``: of the
    value compared (for costs per request); ``common``: the common change they were judged
    against (default: the findings'), said in a line when it is not 1."""
    rows = list(findings)
    lines = [header] if header else []
    if common is None:
        common = rows[0].common if rows else 1.0
    if common != 1.0:
        counted = f" of the {common_functions} functions well sampled on both sides" if common_functions else ""
        why = ("a slower machine or runtime, other code made faster, or a change that slowed most functions alike"
               if common > 1 else "a faster machine or runtime, or a change that sped most functions up alike")
        lines.append(f"common change: {common - 1:+.0%} (the median{counted}: {why}); each function is judged "
                     "beyond it")
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
