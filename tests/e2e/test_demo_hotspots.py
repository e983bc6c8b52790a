"""The demo's calculations: right answers, and the hotspots the demo promises (via mw_profile)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from middleware.pytest_plugin import MwProfile

DEMO = Path(__file__).resolve().parents[2] / "demo_flask"


def _load_calculations() -> ModuleType:
    spec = importlib.util.spec_from_file_location("calculations", DEMO / "calculations.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("calculations", module)
    spec.loader.exec_module(module)
    return module


calc = _load_calculations()


@pytest.mark.parametrize("n", range(0, 8))
def test_calc3_sums_every_permutation(n: int) -> None:
    # GIVEN all n! permutations of 1..n, each summing to n(n+1)/2
    # THEN calc3 visits each exactly once
    assert calc.calc3(n) == math.factorial(n) * n * (n + 1) // 2


@pytest.mark.parametrize("n", [0, 1, 2, 5, 17])
def test_quadratic_calculations_match_closed_forms(n: int) -> None:
    assert calc.calc1(n) == (n * (n - 1) // 2) ** 2
    pairs = sum(1 for i in range(n) for j in range(i + 1, n) if (i + j) % 3 == 0)
    assert calc.calc2(n) == pairs
    assert calc.efficient(n) == calc.calc1(n) + calc.calc2(n)
    if n <= 7:  # calc3 is factorial
        assert calc.with_bottleneck(n) == calc.efficient(n) + calc.calc3(n)


def test_with_bottleneck_is_dominated_by_calc3(mw_profile: MwProfile) -> None:
    # WHEN the bottleneck endpoint's work runs for a few tenths of a second
    with mw_profile:
        for _ in range(4):
            calc.with_bottleneck(9)
    # THEN calc3 owns most of the CPU time and is reached through with_bottleneck
    assert mw_profile.self_share("calc3") > 0.8
    mw_profile.assert_top("calc3")
    assert mw_profile.total_share("with_bottleneck") > 0.9
    assert mw_profile.callers("calc3").get("with_bottleneck", 0.0) > 0.95


def test_efficient_spends_its_time_in_the_quadratic_functions(mw_profile: MwProfile) -> None:
    with mw_profile:
        for _ in range(100):  # about half a second
            calc.efficient(300)
    assert mw_profile.total_share("calc3") == 0.0
    # calc1 does about twice calc2's work (n^2 vs n^2/2 iterations)
    assert mw_profile.self_share("calc1") > 0.3
    assert mw_profile.self_share("calc2") > 0.1
    assert mw_profile.self_share("calc1") + mw_profile.self_share("calc2") > 0.9
    assert set(mw_profile.callers("calc1")) == {"efficient"}
