"""pytest plugin: assert where your code spends its time.

Installed with the package (``pytest11`` entry point), so any project that has ``middleware``
installed gets the ``mw_profile`` fixture::

    def test_calc3_is_the_bottleneck(mw_profile):
        with mw_profile:                      # profile just this block (optional, see below)
            with_bottleneck(9)
        assert mw_profile.self_share("calc3") > 0.5
        assert "with_bottleneck" in mw_profile.callers("calc3")

When such an assertion fails, pytest prints the top of the profile's function table (or the
callers of the function) under it, and the failed test's report gets an "mw_profile" section with
the whole table and the sandwich (callers/callees) of every function the test asked about.

How it works: the fixture starts :class:`middleware.MwTracker` once per process (or reuses the
one the code under test started) and pushes a label unique to the test (``mw_test=<id>``) onto the
test's thread. The answers come from the tracker's snapshot filtered on that label, so they cover
the test's own thread (and asyncio tasks created from it) and nothing else running in the process.
Without a ``with mw_profile:`` block, everything from fixture set-up to the first question is
profiled; with blocks, only the blocks are. Work done in threads the test starts is not included.

Shares are fractions (0..1) of the selected sample type, CPU time by default
(``mw_profile.value = "wall"`` for wall-clock time). A function is named by its qualified name
(``"Calc.run"``), a dotted suffix of it (``"run"``) or ``"FILE:NAME"`` (``"app.py:calc3"``);
every function the name matches is counted (:meth:`MwProfile.functions` lists them). Stacks
start at the test function: pytest's frames above it are cut off, so the test function is the
root of every sample. Shares are statistical: keep the profiled code running long enough (a few
tenths of a second at the default 100 Hz gives tens of samples) and assert with margins.

ini options: ``mw_sample_rate`` (Hz) is used when the fixture starts the tracker.

This module holds the hooks and fixtures; the query object, :class:`MwProfile`, and its answers
live in :mod:`middleware.profile_query` (importable from here too).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from middleware.profile_query import LABEL_KEY, Callers, MwProfile, Share, TopRow

__all__ = ["MwProfile", "Share", "Callers", "TopRow", "LABEL_KEY"]


# ------------------------------------------------------------------------------------------------
# pytest hooks and fixtures
# ------------------------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--mw-save-baseline", action="store_true", default=False,
        help="mw_profile.assert_no_regression(BASELINE) writes this run's profile to BASELINE instead of "
             "comparing with it (run once on the code before the change)",
    )
    parser.addini(
        "mw_sample_rate",
        "sampling rate (Hz) of the middleware tracker the mw_profile fixture starts "
        "(empty: the tracker's default)",
        default="",
    )


def pytest_assertrepr_compare(
    config: pytest.Config, op: str, left: object, right: object
) -> list[str] | None:
    """Explain failed comparisons that involve an ``mw_profile`` answer."""
    subject = next((x for x in (left, right) if isinstance(x, (Share, Callers))), None)
    if subject is None:
        return None
    try:
        if isinstance(subject, Callers):
            head = f"{left!r} {op} callers of {subject.function!r}"
        else:
            other = right if subject is left else left
            shown = f"{other:.1%}" if isinstance(other, float) else repr(other)
            head = (
                f"{subject.describe()} {op} {shown}"
                if subject is left
                else f"{shown} {op} {subject.describe()}"
            )
        return [head, *subject.source.explain(subject)]
    except Exception as exc:  # never hide the original failure behind our own
        return [f"{left!r} {op} {right!r}", f"(mw_profile could not explain: {exc!r})"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test that used ``mw_profile`` gets its profile in an "mw_profile" section."""
    report = yield
    if call.when == "call" and report.failed:
        profile = getattr(item, "funcargs", {}).get("mw_profile")
        if isinstance(profile, MwProfile) and not profile._block_tokens:
            try:
                report.sections.append(("mw_profile", profile.report()))
            except Exception as exc:  # the test's own failure matters more
                report.sections.append(("mw_profile", f"(no profile: {exc!r})"))
    return report


@pytest.fixture(scope="session")
def mw_tracker(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The process's :class:`middleware.MwTracker` (started on first use)."""
    try:
        from middleware import MwTracker
    except ImportError as exc:
        raise RuntimeError(
            f"mw_profile needs middleware's native sampler, which is not importable ({exc}); "
            "build it (make build) or install a wheel"
        ) from exc
    # enabled=True: asking for mw_profile beats MW_APM_COLLECT_PROFILING=false in the environment.
    kwargs: dict[str, Any] = {"service_name": "pytest", "enabled": True}
    rate = str(pytestconfig.getini("mw_sample_rate") or "").strip()
    if rate:
        kwargs["sample_rate"] = rate  # validated by the tracker's configuration
    # The test run's profiles are not the app's: keep them out of the user's store (pytest's
    # temp dirs outlive the session, so the tracker's final write at exit still has a home).
    kwargs["profile_dir"] = str(tmp_path_factory.mktemp("mw-profiles"))
    tracker = MwTracker(**kwargs)
    if not tracker.running:
        raise RuntimeError(
            "middleware's profiler did not start in this process (its error is in the log); "
            "mw_profile has nothing to measure"
        )
    yield tracker


@pytest.fixture
def mw_profile(mw_tracker: Any, request: pytest.FixtureRequest) -> Iterator[MwProfile]:
    """Profile the test (or its ``with mw_profile:`` blocks) and answer questions about it."""
    function = getattr(request.node, "function", None)
    code = getattr(function, "__code__", None)
    root = (code.co_name, code.co_filename) if code is not None else None
    profile = MwProfile(
        mw_tracker, name=request.node.nodeid, root=root, base=str(request.config.rootpath),
        save_baselines=bool(request.config.getoption("mw_save_baseline", False)),
    )
    profile.start()
    try:
        yield profile
    finally:
        profile.stop()
        while profile._block_tokens:  # a test that failed inside a block
            profile.__exit__(None, None, None)
