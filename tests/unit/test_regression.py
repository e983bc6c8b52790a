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
from middleware.regression import detect
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
