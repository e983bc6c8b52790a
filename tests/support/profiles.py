"""Builders of small synthetic profiles for deterministic tests of the pprof reader and the views.

A stack is written as text, root first: ``"main;calc1;calc2;calc3"``. A frame may carry a file
and line: ``"calc3@app.py:30"`` (default file ``app.py``, line from :data:`LINES` or 1).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from middleware.profile import DEFAULT_SAMPLE_TYPES, Frame, Profile, Sample

#: Default lines of the calc workload's functions (used when a frame gives none).
LINES = {"main": 5, "handle": 12, "calc1": 20, "calc2": 30, "calc3": 40, "helper": 50, "fib": 60}

PERIOD = 10_000_000  # 100 Hz, in ns
T0 = 1_763_719_200 * 1_000_000_000  # 2025-11-21T10:00:00Z

StackSpec = str | Sequence[Frame]


def frame(spec: str) -> Frame:
    name, _, where = spec.partition("@")
    if not where:
        return Frame(name, "app.py", LINES.get(name, 1))
    file, _, line = where.rpartition(":")
    if not file:
        return Frame(name, where, LINES.get(name, 1))
    return Frame(name, file, int(line))


def stack(spec: StackSpec) -> tuple[Frame, ...]:
    if isinstance(spec, str):
        return tuple(frame(s) for s in spec.split(";") if s)
    return tuple(spec)


def sample(spec: StackSpec, cpu_ns: int, wall_ns: int | None = None, labels: Mapping[str, str] | None = None) -> Sample:
    """A sample with the agent's three sample types: samples/count, cpu/ns, wall/ns."""
    wall = cpu_ns if wall_ns is None else wall_ns
    return Sample(stack(spec), (max(cpu_ns // PERIOD, 0), cpu_ns, wall), tuple(sorted((labels or {}).items())))


def build(
    samples: Iterable[Sample | tuple],
    time_nanos: int = T0,
    duration_nanos: int = 10_000_000_000,
    sample_types: list[tuple[str, str]] | None = None,
    default_sample_type: str = "cpu",
) -> Profile:
    """A profile from samples (or ``(stack, cpu_ns[, wall_ns[, labels]])`` tuples)."""
    out = [s if isinstance(s, Sample) else sample(*s) for s in samples]
    return Profile(
        sample_types=list(sample_types or DEFAULT_SAMPLE_TYPES),
        samples=out,
        time_nanos=time_nanos,
        duration_nanos=duration_nanos,
        period_type=("cpu", "nanoseconds"),
        period=PERIOD,
        default_sample_type=default_sample_type,
    )


def calc_profile(time_nanos: int = T0, scale: int = 1) -> Profile:
    """The calc workload: calc3 is the bottleneck (largest Self), called by calc2 from calc1.

    cpu (ms): calc3 self 600 (via calc2), calc2 self 150, calc1 self 100, helper self 100
    (called by calc1 and by calc3), main self 50. Total 1000 ms.
    """
    ms = 1_000_000 * scale
    return build(
        [
            (
                "main;handle;calc1;calc2;calc3",
                500 * ms,
                520 * ms,
                {"endpoint": "/calculate", "thread_name": "MainThread"},
            ),
            (
                "main;handle;calc1;calc2;calc3@app.py:41",
                100 * ms,
                110 * ms,
                {"endpoint": "/calculate", "thread_name": "worker-1"},
            ),
            ("main;handle;calc1;calc2", 150 * ms, 160 * ms, {"endpoint": "/calculate", "thread_name": "MainThread"}),
            ("main;handle;calc1", 100 * ms, 300 * ms, {"endpoint": "/other", "thread_name": "MainThread"}),
            ("main;handle;calc1;helper", 60 * ms, 60 * ms, {"endpoint": "/other", "thread_name": "MainThread"}),
            (
                "main;handle;calc1;calc2;calc3;helper",
                40 * ms,
                40 * ms,
                {"endpoint": "/calculate", "thread_name": "worker-1"},
            ),
            ("main", 50 * ms, 2000 * ms, {"thread_name": "MainThread"}),
        ],
        time_nanos=time_nanos,
    )


def recursive_profile() -> Profile:
    """fib calls itself: Total must count fib once per sample."""
    ms = 1_000_000
    return build(
        [
            ("main;fib;fib;fib", 300 * ms),
            ("main;fib;fib", 200 * ms),
            ("main;fib;helper", 100 * ms),
            ("main;other", 400 * ms),
        ]
    )


def cpu_seconds_by_thread(profile: Profile) -> dict[str, float]:
    """The CPU seconds of ``profile`` per ``thread_name`` label ("?" for samples without one)."""
    ci = profile.value_index("cpu")
    out: dict[str, float] = {}
    for s in profile.samples:
        name = s.label("thread_name") or "?"
        out[name] = out.get(name, 0.0) + s.values[ci] / 1e9
    return out
