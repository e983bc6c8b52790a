"""``MwProfile``: questions about the samples recorded for one test (the ``mw_profile`` fixture).

The pytest side — the fixtures that create it, the assertion explanations and the failure
report section — is :mod:`middleware.pytest_plugin`; this module does not import pytest.

An :class:`MwProfile` pushes a label unique to it (``mw_test=<pid>-<n>:test`` from
:meth:`MwProfile.start`, ``...:block`` inside ``with mw_profile:``) onto the calling thread and
answers from the tracker's snapshot filtered on that label: shares (:class:`Share`, a float
that remembers its question), callers and callees (:class:`Callers`), the top functions
(:class:`TopRow`) and text reports. Stacks start at the test function (``root``): frames above
it are cut off. A function is named by its qualified name (``"Calc.run"``), a dotted suffix of
it (``"run"``) or ``"FILE:NAME"`` (``"app.py:calc3"``); every function the name matches is
counted (:meth:`MwProfile.functions` lists them).
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import contextvars

    from middleware.profile import Profile

__all__ = ["MwProfile", "Share", "Callers", "TopRow", "LABEL_KEY", "matches"]

#: The label that marks the samples recorded for a test.
LABEL_KEY = "mw_test"
#: Below this many samples, failure messages warn that the shares are noise.
FEW_SAMPLES = 20
#: Rows of the top table shown in failure messages.
TABLE_ROWS = 12

_ids = itertools.count(1)


# ------------------------------------------------------------------------------------------------
# answers
# ------------------------------------------------------------------------------------------------
class Share(float):
    """A fraction of the profile (0..1) that remembers what it measures, for failure messages."""

    def __new__(cls, value: float, function: str, kind: str, profile: MwProfile) -> Share:
        share = super().__new__(cls, value)
        share.function = function
        share.kind = kind
        share.source = profile
        return share

    function: str
    kind: str
    source: MwProfile

    def __repr__(self) -> str:
        return f"{float(self):.3f}"

    def describe(self) -> str:
        return f"{self.kind} share of {self.function!r} = {float(self):.1%}"


class Callers(dict[str, float]):
    """``{caller function: share of the callee's Total}``, largest first."""

    function: str
    source: MwProfile

    def describe(self) -> str:
        return f"callers of {self.function!r}"


@dataclass(frozen=True)
class TopRow:
    """One function of :meth:`MwProfile.top` (shares are fractions of the profile total)."""

    function: str
    file: str
    line: int
    self_share: float
    total_share: float
    self_value: int
    total_value: int


def matches(function: str, name: str) -> bool:
    """Whether a frame's qualified ``function`` is called ``name`` (or ends in ``.name``)."""
    return function == name or function.endswith("." + name)


def _for_test(profile: Profile, root: tuple[str, str] | None, base: str | None) -> Profile:
    """The test's view of ``profile``: stacks start at the test function, paths are short.

    Frames above the test function (pytest's runner) are dropped; samples whose stack does not
    contain it (fixture code) are kept whole. Files under ``base`` (the rootdir) become relative.
    """
    from middleware.profile import Frame, Sample

    prefix = base.rstrip(os.sep) + os.sep if base else None
    frames: dict[Frame, Frame] = {}

    def short(frame: Frame) -> Frame:
        out = frames.get(frame)
        if out is None:
            out = frame
            if prefix and frame.file.startswith(prefix):
                out = Frame(frame.function, frame.file[len(prefix) :], frame.line)
            frames[frame] = out
        return out

    samples = []
    for s in profile.samples:
        cut = 0
        if root is not None:
            name, file = root
            cut = next(
                (i for i, f in enumerate(s.stack) if f.file == file and matches(f.function, name)),
                0,
            )
        samples.append(Sample(tuple(short(f) for f in s.stack[cut:]), s.values, s.labels))
    profile.samples = samples
    return profile


# ------------------------------------------------------------------------------------------------
# the fixture object
# ------------------------------------------------------------------------------------------------
class MwProfile:
    """Profile of the code under test, with questions about it (the ``mw_profile`` fixture)."""

    def __init__(
        self,
        tracker: Any,
        name: str = "",
        root: tuple[str, str] | None = None,
        base: str | None = None,
        save_baselines: bool = False,
    ) -> None:
        self._tracker = tracker
        #: assert_no_regression writes baselines instead of comparing (pytest --mw-save-baseline).
        self.save_baselines = save_baselines
        self.name = name
        #: ``(function name, file)`` of the test function: frames above it (pytest's own) are cut.
        self.root = root
        #: Files under this directory are shown relative to it.
        self.base = base
        self.asked: list[str] = []  # functions asked about, for the failure report
        self.value = "cpu"
        self._id = f"{os.getpid()}-{next(_ids)}"
        self._auto_token: contextvars.Token[tuple[tuple[str, str], ...]] | None = None
        self._block_tokens: list[contextvars.Token[tuple[tuple[str, str], ...]]] = []
        self._used_blocks = False
        self._profile: Profile | None = None

    # -- recording ------------------------------------------------------------------------------
    def _label(self, kind: str) -> dict[str, str]:
        return {LABEL_KEY: f"{self._id}:{kind}"}

    def start(self) -> None:
        """Start recording the test's thread (the fixture does this at set-up)."""
        from middleware.labels import push_labels

        if self._auto_token is None:
            self._auto_token = push_labels(self._label("test"))
            self._profile = None

    def stop(self) -> None:
        """Stop the recording started at set-up (any question does this first)."""
        from middleware.labels import pop_labels

        if self._auto_token is not None:
            token, self._auto_token = self._auto_token, None
            pop_labels(token)

    def __enter__(self) -> MwProfile:
        from middleware.labels import push_labels

        self.stop()  # from now on only the blocks count
        self._used_blocks = True
        self._profile = None
        self._block_tokens.append(push_labels(self._label("block")))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        from middleware.labels import pop_labels

        pop_labels(self._block_tokens.pop())

    def record(self) -> MwProfile:
        """``with mw_profile.record():`` is the same as ``with mw_profile:``."""
        return self

    # -- the data -------------------------------------------------------------------------------
    @property
    def profile(self) -> Profile:
        """The samples recorded for this test (stops the set-up recording)."""
        if self._block_tokens:
            raise RuntimeError("mw_profile: ask questions after the `with mw_profile:` block")
        self.stop()
        if self._profile is None:
            wanted = self._label("block" if self._used_blocks else "test")[LABEL_KEY]
            snapshot = self._tracker.snapshot()
            self._profile = _for_test(
                snapshot.filter(labels={LABEL_KEY: wanted}), self.root, self.base
            )
        return self._profile

    def _value_index(self, profile: Profile) -> int:
        try:
            return profile.value_index(self.value)
        except KeyError:
            raise ValueError(
                f"mw_profile.value = {self.value!r}: no such sample type "
                f"(have {', '.join(n for n, _ in profile.sample_types)})"
            ) from None

    def total(self) -> int:
        """Sum of the selected value (e.g. CPU nanoseconds) over the recorded samples."""
        profile = self.profile
        i = self._value_index(profile)
        return sum(s.values[i] for s in profile.samples)

    def sample_count(self) -> int:
        """Number of on-CPU samples recorded (``samples/count``)."""
        profile = self.profile
        try:
            i = profile.value_index("samples")
        except KeyError:
            return len(profile.samples)
        return sum(s.values[i] for s in profile.samples)

    # -- questions ------------------------------------------------------------------------------
    def functions(self, function: str) -> list[tuple[str, str]]:
        """The ``(name, file)`` of every recorded function that ``function`` names.

        ``function`` is a qualified name (``"Calc.run"``), a dotted suffix of one (``"run"``), or
        ``"FILE:NAME"`` with FILE a path suffix (``"app.py:calc3"``).
        """
        keys = {(f.function, f.file) for s in self.profile.samples for f in s.stack}
        found = [k for k in keys if matches(k[0], function)]
        if not found and ":" in function:
            fpart, _, npart = function.rpartition(":")
            found = [
                k
                for k in keys
                if matches(k[0], npart) and (k[1] == fpart or k[1].endswith("/" + fpart))
            ]
        return sorted(found)

    def _share(self, function: str, kind: str) -> Share:
        self._ask(function)
        profile = self.profile
        keys = set(self.functions(function))
        i = self._value_index(profile)
        total = part = 0
        for s in profile.samples:
            v = s.values[i]
            total += v
            if not keys or not s.stack:
                continue
            if kind == "self":
                leaf = s.stack[-1]
                hit = (leaf.function, leaf.file) in keys
            else:
                hit = any((f.function, f.file) in keys for f in s.stack)
            if hit:
                part += v
        return Share(part / total if total else 0.0, function, kind, self)

    def self_share(self, function: str) -> Share:
        """Fraction of the total where ``function`` is the running (leaf) frame."""
        return self._share(function, "self")

    def total_share(self, function: str) -> Share:
        """Fraction of the total where ``function`` is anywhere on the stack."""
        return self._share(function, "total")

    def top(self, n: int = 10, by: str = "self") -> list[TopRow]:
        """The ``n`` functions with the largest Self (``by="self"``) or Total share."""
        from middleware.reporters.table import function_table

        rows = function_table(self.profile, value=self.value, sort=by)
        out = []
        for r in rows[: n if n > 0 else None]:
            t = r.profile_total
            out.append(
                TopRow(
                    r.function,
                    r.file,
                    r.line,
                    r.self_value / t if t else 0.0,
                    r.total_value / t if t else 0.0,
                    r.self_value,
                    r.total_value,
                )
            )
        return out

    def callers(self, function: str) -> Callers:
        """``{caller: fraction of function's Total reached through it}``, largest first.

        As in ``python -m middleware sandwich``: direct self-recursion is not a caller, and the
        test function is the root of every stack.
        """
        return self._neighbours(function, "callers")

    def callees(self, function: str) -> Callers:
        """``{callee: fraction of function's Total spent below it}``, largest first."""
        return self._neighbours(function, "callees")

    def _ask(self, function: str) -> None:
        if function not in self.asked:
            self.asked.append(function)

    def _sandwiches(self, function: str) -> list[Any]:
        from middleware.reporters.sandwich import sandwich

        return [sandwich(self.profile, key, value=self.value) for key in self.functions(function)]

    def _neighbours(self, function: str, side: str) -> Callers:
        self._ask(function)
        per: dict[str, int] = defaultdict(int)
        function_total = 0
        for sw in self._sandwiches(function):
            function_total += sw.total_value
            for rel in getattr(sw, side):
                per[rel.function] += rel.value
        result = Callers(
            sorted(
                ((name, v / function_total) for name, v in per.items() if function_total),
                key=lambda kv: -kv[1],
            )
        )
        result.function = function
        result.source = self
        return result

    # -- reports --------------------------------------------------------------------------------
    def table(self, n: int = TABLE_ROWS, by: str = "self", header: bool = True) -> str:
        """The top ``n`` functions as text, under a summary line (``header``)."""
        from middleware.reporters.table import function_table, render_table

        profile = self.profile
        rows = function_table(profile, value=self.value, sort=by)
        unit = profile.sample_types[self._value_index(profile)][1]
        shown = rows[:n] if n > 0 else rows
        text = render_table(shown, unit, header=self.summary() if header else "")
        if len(shown) < len(rows):
            text += f"({len(rows) - len(shown)} more functions)\n"
        return text

    def summary(self) -> str:
        """One line: what was recorded."""
        profile = self.profile
        count = self.sample_count()
        line = f"mw_profile{f' of {self.name}' if self.name else ''}: {count} samples, value={self.value}"
        if profile.samples:
            from middleware.reporters import format_value

            i = self._value_index(profile)
            line += f" (total {format_value(self.total(), profile.sample_types[i][1])})"
        if count < FEW_SAMPLES:
            line += (
                f" - fewer than {FEW_SAMPLES} samples: shares are noise; run the code longer"
                " or raise the sampling rate (ini mw_sample_rate)"
            )
            try:  # what the sampler saw: running? found the thread on CPU? could it read it?
                st = self._tracker.stats()
                keys = ("running", "ticks", "samples", "cpu_samples", "paused", "unproven",
                        "unverified", "can_pause", "dropped", "unwind_timeouts")
                line += " [sampler: " + ", ".join(f"{k}={st[k]}" for k in keys if k in st) + "]"
            except Exception:  # the figures are a hint, never a second failure
                pass
        return line

    def _callers_lines(self, callers: Callers, limit: int) -> list[str]:
        lines = [f"callers of {callers.function!r} (share of its Total):"]
        if not callers:
            lines.append(f"  ({callers.function!r} does not appear in the profile)")
        for name, share in list(callers.items())[:limit]:
            lines.append(f"  {share:7.1%}  {name}")
        return lines

    def explain(self, subject: Share | Callers, rows: int = 5) -> list[str]:
        """A few lines that explain ``subject`` (kept short: pytest truncates long explanations;
        the full report is added to the failed test's report as the "mw_profile" section)."""
        if isinstance(subject, Callers):
            lines = self._callers_lines(subject, rows)
            lines.append(self.summary())
            return lines
        return self.table(n=rows).rstrip("\n").split("\n")

    def report(self) -> str:
        """The full text for a failed test: summary, top table, sandwich of the functions asked."""
        from middleware.reporters.sandwich import render_sandwich

        parts = [self.table(n=TABLE_ROWS).rstrip("\n")]
        profile = self.profile
        unit = profile.sample_types[self._value_index(profile)][1]
        for function in self.asked:
            sandwiches = self._sandwiches(function)
            if not sandwiches:
                parts.append(f"{function!r} does not appear in the profile")
            for sw in sandwiches:
                parts.append(render_sandwich(sw, unit, limit=TABLE_ROWS).rstrip("\n"))
        return "\n\n".join(parts) + "\n"

    # -- explicit assertions --------------------------------------------------------------------
    def assert_top(self, function: str, by: str = "self") -> None:
        """Fail unless ``function`` has the largest Self (or Total) share."""
        rows = self.top(n=1, by=by)
        if not rows or not matches(rows[0].function, function):
            raise AssertionError(
                f"expected {function!r} to have the largest {by} share\n{self.table(by=by)}"
            )

    def assert_no_regression(self, baseline: str | os.PathLike[str], threshold: float = 0.10) -> None:
        """Fail when a function's share of this test's profile grew by more than ``threshold``
        beyond the sampling noise, or a function is new, compared with the profile saved in
        ``baseline`` (a pprof file; relative to pytest's root directory) by a run with
        ``--mw-save-baseline``. The test: :mod:`middleware.regression`."""
        from middleware.pprof import read_pprof_file, write_pprof_file
        from middleware.regression import detect, render_findings

        path = Path(baseline)
        if not path.is_absolute() and self.base:
            path = Path(self.base) / path
        if self.save_baselines:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_pprof_file(self.profile, path)
            return
        if not path.exists():
            raise AssertionError(
                f"no baseline profile at {path}: run the tests once with --mw-save-baseline on the code "
                "to compare with"
            )
        before = read_pprof_file(path)
        findings = detect(before, self.profile, value=self.value, threshold=threshold)
        if findings:
            raise AssertionError(
                f"the profile regressed against {path}:\n"
                + render_findings(findings, threshold).rstrip("\n")
            )

    def assert_called_by(self, function: str, caller: str, min_share: float = 0.0) -> None:
        """Fail unless ``caller`` calls ``function`` (for more than ``min_share`` of its Total)."""
        callers = self.callers(function)
        share = sum(v for k, v in callers.items() if matches(k, caller))
        if share <= min_share or not any(matches(k, caller) for k in callers):
            raise AssertionError(
                f"expected {caller!r} to call {function!r} (share > {min_share:.0%}), "
                f"got {share:.1%}\n" + "\n".join(self.explain(callers))
            )
