"""Workloads of the span-linked profile tests (tests/e2e/test_span_labels.py,
tests/e2e/test_otlp_serve.py), imported by their child apps: CPU burners named after the kind of
request that runs them, whose time the children measure with ``time.thread_time``."""
from __future__ import annotations

import time


def spin(k: int) -> int:
    s = 0
    for i in range(k):
        s += i * i
    return s


def burn(seconds: float) -> None:
    """Burns ``seconds`` of this thread's CPU."""
    t0 = time.thread_time()
    while time.thread_time() - t0 < seconds:
        spin(500)


def work_alpha(unit: float) -> None:
    burn(3 * unit)


def work_beta(unit: float) -> None:
    burn(5 * unit)


def work_gamma(unit: float) -> None:
    burn(7 * unit)


#: kind -> its burner; the kinds' costs are 3:5:7 units of CPU
WORK = {"alpha": work_alpha, "beta": work_beta, "gamma": work_gamma}
