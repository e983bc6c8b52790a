"""Deliberately slow arithmetic for the profiler demo.

``efficient`` does two quadratic computations (``calc1`` and ``calc2``); ``with_bottleneck`` does
the same work and then ``calc3``, which walks all ``n!`` permutations of ``1..n``. For the inputs
the demo uses (``n`` around 8) ``calc3`` costs far more than the rest, so a profile of
``/calculate2/<n>`` must show ``calc3`` on top, called from ``with_bottleneck``.

The functions are pure Python on purpose (no ``itertools.permutations``, no ``math``): the time
must be spent in these frames so the sampler attributes it to them. The permutation step is
written inline in ``calc3`` rather than in a helper so that ``calc3`` owns the Self time.
"""

from __future__ import annotations

__all__ = ["calc1", "calc2", "calc3", "efficient", "with_bottleneck"]


def calc1(number: int) -> int:
    """Sum of ``i * j`` over all pairs ``0 <= i, j < number`` (quadratic)."""
    total = 0
    for i in range(number):
        for j in range(number):
            total += i * j
    return total


def calc2(number: int) -> int:
    """Number of ordered pairs ``0 <= i < j < number`` whose sum is divisible by 3 (quadratic)."""
    count = 0
    for i in range(number):
        for j in range(i + 1, number):
            if (i + j) % 3 == 0:
                count += 1
    return count


def calc3(number: int) -> int:
    """Sum of the elements of every permutation of ``1..number`` (factorial time).

    Visits the permutations in lexicographic order with the classic next-permutation step: find
    the longest non-increasing suffix, swap its predecessor with the rightmost larger element, and
    reverse the suffix. The result equals ``number! * number * (number + 1) / 2``.
    """
    if number <= 0:
        return 0
    perm = list(range(1, number + 1))
    total = 0
    while True:
        total += sum(perm)
        # Pivot: the last i with perm[i] < perm[i + 1]; none means perm is the last permutation.
        i = number - 2
        while i >= 0 and perm[i] >= perm[i + 1]:
            i -= 1
        if i < 0:
            return total
        j = number - 1
        while perm[j] <= perm[i]:
            j -= 1
        perm[i], perm[j] = perm[j], perm[i]
        lo, hi = i + 1, number - 1
        while lo < hi:
            perm[lo], perm[hi] = perm[hi], perm[lo]
            lo += 1
            hi -= 1


def efficient(number: int) -> int:
    """The cheap endpoint's work: two quadratic passes."""
    return calc1(number) + calc2(number)


def with_bottleneck(number: int) -> int:
    """The same work as :func:`efficient` plus the factorial ``calc3``."""
    return calc1(number) + calc2(number) + calc3(number)
