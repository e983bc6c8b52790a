"""The regression detector (middleware/regression.py) and `python -m middleware regress`, on
sampled profiles drawn from known shares: a planted regression is found (and only it), a null
change (same shares, fresh samples) flags nothing, and the CLI's exit status says which."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from middleware.pprof import write_pprof_file
from middleware.profile import Profile
from middleware.regression import compare, detect, render_findings
from support.profiles import build

pytestmark = pytest.mark.unit
PERIOD_NS = 10_000_000  # 100 Hz

#: The calc demo's shape: stack -> share of the samples.
SHARES = {
    "main;handle;efficient;calc1": 0.20,
    "main;handle;efficient;calc2": 0.15,
    "main;handle;with_bottleneck;calc3": 0.50,
    "main;handle;with_bottleneck;calc1": 0.05,
    "main;handle;parse": 0.04,
    "main;handle;render": 0.03,
    "main;idle": 0.03,
}


def sampled(shares: dict[str, float], n: int, rng: random.Random) -> Profile:
    """A profile of ``n`` samples drawn from ``shares`` (normalised), each worth one period."""
    stacks = list(shares)
    weights = [shares[s] for s in stacks]
    counts = dict.fromkeys(stacks, 0)
    for s in rng.choices(stacks, weights, k=n):
        counts[s] += 1
    return build([(s, c * PERIOD_NS) for s, c in counts.items() if c])


def slower(shares: dict[str, float], function: str, factor: float) -> dict[str, float]:
    """The shares when every stack ending in ``function`` costs ``factor`` times as much."""
    return {s: w * (factor if s.endswith(";" + function) else 1.0) for s, w in shares.items()}


def test_a_planted_regression_is_found_and_only_it() -> None:
    rng = random.Random(1)
    n = 6000  # 60 s at 100 Hz
    before = sampled(SHARES, n, rng)
    after = sampled(slower(SHARES, "calc2", 1.5), n, rng)
    found = detect(before, after)
    assert [f.function for f in found] == ["calc2"], found
    f = found[0]
    assert f.kind == "regression" and 1.25 < f.ratio < 1.6 and f.ratio_low > 1, f


def test_a_null_change_flags_nothing_in_200_trials() -> None:
    rng = random.Random(2)
    flagged = sum(bool(detect(sampled(SHARES, 6000, rng), sampled(SHARES, 6000, rng))) for _ in range(200))
    assert flagged <= 1, flagged  # family-wise 0.1% per comparison


def test_a_new_function_is_reported_as_new() -> None:
    rng = random.Random(3)
    after_shares = {**SHARES, "main;handle;validate": 0.05}
    found = detect(sampled(SHARES, 6000, rng), sampled(after_shares, 6000, rng))
    assert [(f.kind, f.function) for f in found] == [("new", "validate")], found


def test_growth_below_the_threshold_or_within_the_noise_is_not_a_regression() -> None:
    rng = random.Random(4)
    # +5% of calc2: real, but under the 10% threshold
    assert detect(sampled(SHARES, 20000, rng), sampled(slower(SHARES, "calc2", 1.05), 20000, rng)) == []
    # +50% of a rare function seen a handful of times: within the noise
    rare = {**SHARES, "main;handle;rare": 0.0005}
    assert detect(sampled(rare, 6000, rng), sampled(slower(rare, "rare", 1.5), 6000, rng)) == []


def test_the_cli_exits_1_on_a_regression_and_0_without(tmp_path: Path) -> None:
    rng = random.Random(5)
    base, same, worse = tmp_path / "base.pb.gz", tmp_path / "same.pb.gz", tmp_path / "worse.pb.gz"
    write_pprof_file(sampled(SHARES, 6000, rng), base)
    write_pprof_file(sampled(SHARES, 6000, rng), same)
    write_pprof_file(sampled(slower(SHARES, "calc2", 1.5), 6000, rng), worse)
    cmd = [sys.executable, "-m", "middleware", "regress"]
    ok = subprocess.run([*cmd, str(base), str(same)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "no regression" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run([*cmd, str(base), str(worse), "--threshold", "20%"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    rows = [ln for ln in bad.stdout.splitlines() if ln.startswith("regression")]
    assert len(rows) == 1 and " calc2 (" in rows[0] and "+" in rows[0], bad.stdout
    usage = subprocess.run([*cmd, str(base), str(worse), "--threshold", "lots"], capture_output=True, text=True,
                           timeout=60)
    assert usage.returncode == 2 and "bad threshold" in usage.stderr


def test_a_function_whose_calls_into_a_shared_helper_grew_is_found_by_its_total() -> None:
    # spin() is the leaf of both calc1 and calc2: its Self share cannot move, calc2's Total does
    rng = random.Random(6)
    shares = {"main;work;calc1;spin": 0.6, "main;work;calc2;spin": 0.3, "main;work;render": 0.1}
    found = detect(sampled(shares, 6000, rng), sampled(slower(shares, "calc2;spin", 1.5), 6000, rng))
    assert [(f.kind, f.metric, f.function) for f in found] == [("regression", "total", "calc2")], found


# -- cost per request ------------------------------------------------------------------------------
#: The calc demo per request: stack -> samples per request (at 100 Hz).
PER_REQUEST = {s: 2.0 * w for s, w in SHARES.items()}
ENDPOINT = (("endpoint", "/calculate2/<int:number>"),)


def poisson(lam: float, rng: random.Random) -> int:
    """A Poisson draw (exponential inter-arrival times: exact, fine for the means used here)."""
    n, t = 0, rng.expovariate(1.0)
    while t < lam:
        n += 1
        t += rng.expovariate(1.0)
    return n


def served(per_request: dict[str, float], requests: int, rng: random.Random) -> Profile:
    """The profile of ``requests`` requests whose stacks take ``per_request`` samples each on
    average (Poisson), with its request count as an integration records it."""
    profile = sampled(per_request, poisson(sum(per_request.values()) * requests, rng), rng)
    profile.requests = {ENDPOINT: requests}
    return profile


def test_other_code_made_faster_is_no_regression_per_request_nor_by_share() -> None:
    # calc3 made twice as fast: every other function's share grows, its cost per request does not
    rng = random.Random(7)
    before = served(PER_REQUEST, 3000, rng)
    after = served(slower(PER_REQUEST, "calc3", 0.5), 3000, rng)
    assert detect(before, after) == []  # both count requests: per request
    # by share, the others' shares all grew alike: that common change is discounted (the plain
    # test flags calc1 and calc2, whose code did not change)
    by_share = compare(before, after, per="share")
    assert by_share.findings == [] and 1.2 < by_share.common < 1.45 and by_share.common_functions >= 5, by_share
    # a real regression next to the speed-up is found per request, alone
    worse = served(slower(slower(PER_REQUEST, "calc3", 0.5), "calc2", 1.5), 3000, rng)
    found = detect(before, worse)
    assert [(f.function, f.basis) for f in found] == [("calc2", "request")], found
    f = found[0]
    assert 1.3 < f.ratio < 1.7 and f.ratio_low > 1, f
    # its cost is reported per request, in the value's unit (ns of CPU)
    assert f.share_before == pytest.approx(PER_REQUEST["main;handle;efficient;calc2"] * PERIOD_NS, rel=0.15)
    assert f.requests_before == f.requests_after == 3000


def test_a_slower_machine_is_the_common_change_and_the_slower_function_is_judged_beyond_it() -> None:
    # the version after runs on a machine 15% slower (every function costs 15% more per request),
    # and calc2 does 1.5x the work on top: calc2 alone, by 1.5x, and the machine as the common change
    rng = random.Random(12)
    before = served(PER_REQUEST, 3000, rng)
    machine = {s: 1.15 * w for s, w in PER_REQUEST.items()}
    result = compare(before, served(slower(machine, "calc2", 1.5), 3000, rng))
    assert [f.function for f in result.findings] == ["calc2"], result
    f = result.findings[0]
    assert 1.08 < result.common < 1.22 and f.common == result.common, result
    assert 1.3 < f.ratio < 1.7 and f.ratio_low > 1, f
    assert f.share_after / f.share_before == pytest.approx(f.ratio * f.common)  # as measured
    # the slower machine alone: no finding
    assert detect(before, served(machine, 3000, rng)) == []
    # BEFORE on a slower machine (AFTER's costs 30% less per request) and calc2 1.5x as costly: per
    # request, calc2 costs 1.05x what it did; judged against the machine it is the 1.5x it is
    faster = {s: 0.7 * w for s, w in PER_REQUEST.items()}
    result = compare(before, served(slower(faster, "calc2", 1.5), 3000, rng))
    assert [f.function for f in result.findings] == ["calc2"] and 0.62 < result.common < 0.78, result
    assert 1.3 < result.findings[0].ratio < 1.7 and result.findings[0].ratio_low > 1, result
    said = render_findings(result.findings, 0.1, common=result.common)
    assert "common change: -" in said and "a faster machine" in said, said
    # the faster machine alone: no finding
    assert detect(before, served(faster, 3000, rng)) == []
    # by share, a common fall is what one function's growth does to the others' shares: left as is
    by_share = compare(before, served(slower(faster, "calc2", 1.5), 3000, rng), per="share")
    assert by_share.common == 1.0 and [f.function for f in by_share.findings] == ["calc2"], by_share


def test_too_few_well_sampled_functions_give_no_common_change() -> None:
    # two functions both 30% dearer: with no third to tell the machine from the code, both are flagged
    rng = random.Random(13)
    shares = {"main;a": 0.5, "main;b": 0.5}
    before = served({s: 2.0 * w for s, w in shares.items()}, 3000, rng)
    after = served({s: 2.6 * w for s, w in shares.items()}, 3000, rng)
    result = compare(before, after)
    assert result.common == 1.0 and result.common_functions == 2, result
    assert sorted(f.function for f in result.findings) == ["a", "b"], result


def test_per_request_more_requests_alone_is_no_regression_and_nulls_flag_nothing() -> None:
    rng = random.Random(8)
    # three times the traffic, same code: the profile's totals triple, costs per request do not move
    assert detect(served(PER_REQUEST, 1000, rng), served(PER_REQUEST, 3000, rng)) == []
    flagged = sum(bool(detect(served(PER_REQUEST, 3000, rng), served(PER_REQUEST, 3000, rng))) for _ in range(100))
    assert flagged <= 1, flagged


def test_per_request_needs_counts_on_both_sides() -> None:
    rng = random.Random(9)
    counted, plain = served(PER_REQUEST, 3000, rng), sampled(SHARES, 6000, rng)
    assert all(f.basis == "share" for f in detect(plain, sampled(slower(SHARES, "calc2", 1.5), 6000, rng)))
    with pytest.raises(ValueError, match="request counts on both sides"):
        detect(plain, counted, per="request")
    with pytest.raises(ValueError, match="per must be one of"):
        detect(counted, counted, per="second")


def test_request_counts_round_trip_through_pprof_merge_and_label_filters(tmp_path: Path) -> None:
    from middleware.pprof import load_profiles

    rng = random.Random(10)
    p = sampled(SHARES, 100, rng)
    p.comments = ["built by a test"]
    p.requests = {(("endpoint", "/a"), ("pid", "7")): 30, (("endpoint", "/b"), ("pid", "7")): 12}
    write_pprof_file(p, tmp_path / "one.pb.gz")
    q = sampled(SHARES, 100, rng)
    q.requests = {(("endpoint", "/a"), ("pid", "7")): 5}
    write_pprof_file(q, tmp_path / "two.pb.gz")
    loaded = load_profiles([tmp_path / "one.pb.gz"])
    assert loaded.requests == p.requests and loaded.comments == ["built by a test"]
    merged = load_profiles([tmp_path])
    assert merged.requests == {(("endpoint", "/a"), ("pid", "7")): 35, (("endpoint", "/b"), ("pid", "7")): 12}
    assert merged.filter({"endpoint": "/a"}).request_count() == 35
    # a filter on a label requests do not carry (a thread) leaves no count: no per-request basis
    assert merged.filter({"thread_name": "MainThread"}).request_count() == 0


def test_the_cli_compares_per_request_and_says_so(tmp_path: Path) -> None:
    rng = random.Random(11)
    base, faster = tmp_path / "base.pb.gz", tmp_path / "faster.pb.gz"
    write_pprof_file(served(PER_REQUEST, 3000, rng), base)
    write_pprof_file(served(slower(PER_REQUEST, "calc3", 0.5), 3000, rng), faster)
    cmd = [sys.executable, "-m", "middleware", "regress", str(base), str(faster)]
    per_request = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert per_request.returncode == 0, per_request.stdout + per_request.stderr
    by_share = subprocess.run([*cmd, "--per", "share"], capture_output=True, text=True, timeout=60)
    assert by_share.returncode == 0 and "common change: +" in by_share.stdout, by_share.stdout
    worse = tmp_path / "worse.pb.gz"
    write_pprof_file(served(slower(PER_REQUEST, "calc2", 1.5), 3000, rng), worse)
    found = subprocess.run([*cmd[:-1], str(worse)], capture_output=True, text=True, timeout=60)
    assert found.returncode == 1 and "ms/req" in found.stdout and " calc2 (" in found.stdout, found.stdout
    assert "cost per request: 3000 requests before, 3000 after" in found.stdout
