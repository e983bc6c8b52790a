"""C unit tests of the pure C parts: tests/native/c/test_c_units.c linked against csrc/ sources.

The line-table decoder is checked against CPython itself: each available CPython 3.10-3.13
compiles hostile code shapes and a few standard-library modules, and sends every code object's
co_linetable with the line co_lines() gives each code unit; the decoder must give the same
line for every code unit, firstlineno where CPython has none, and stay inside cut tables.
The stack table's limits, the tenant-answer reader and the store's backlog are checked inside the C
program.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit, pytest.mark.asan]

ROOT = Path(__file__).resolve().parents[2]
BIN = "build/ctest/test_c_units"

# Runs in the CPython under test; prints one line per code object (format documented in
# tests/native/c/test_c_units.c) and, first, the number of code objects it sends.
DUMP = r'''
import importlib.util, sys, types

HOSTILE = """
def empty(): pass

def far_apart():
    a = 1
""" + "\n" * 300 + """    b = 2
""" + "\n" * 70000 + """    return a + b

def long_line(xs):
    return LONG_EXPR

def backwards(n):
    total = (
        n
        +
        1
    )
    for i in range(n):
        if i % 2:
            continue
        total += i
    else:
        total -= 1
    while total > 10:
        total //= 2
    return total

@staticmethod
def decorated(x):
    try:
        return 1 / x
    except ZeroDivisionError as e:
        raise ValueError(x) from e
    finally:
        x = None

class K:
    attr = [i for i in range(3)]
    def method(self):
        return lambda y: (yield y)

async def coro(xs):
    async with xs as c:
        async for v in c:
            await v

def gen():
    yield from range(3)
    with open(__file__) as f, open(__file__) as g:
        return f.read() + g.read()

def match_it(p):
    match p:
        case {"k": [1, *rest]} if rest:
            return rest
        case (a, b):
            return a
        case _:
            return None
"""

# one line of a few hundred code units: entries longer than any single table entry can be
HOSTILE = HOSTILE.replace("LONG_EXPR", " + ".join(
    "[x * %d + 1 for x in xs if x %% %d] + [a.b.c.d for a in xs]" % (i, i + 2) for i in range(30)))

def codes(co):
    yield co
    for c in co.co_consts:
        if isinstance(c, types.CodeType):
            yield from codes(c)

fmt = 310 if sys.version_info[:2] == (3, 10) else 311
sources = [("<hostile>", HOSTILE)]
for name in ("argparse", "dis", "json.decoder", "asyncio.base_events", "dataclasses"):
    path = importlib.util.find_spec(name).origin
    with open(path, encoding="utf-8") as f:
        sources.append((path, f.read()))
out = []
for path, src in sources:
    for co in codes(compile(src, path, "exec")):
        n = len(co.co_code) // 2
        lines = [co.co_firstlineno] * n
        for start, end, line in co.co_lines():
            for b in range(start, end, 2):
                if b // 2 < n and line is not None and line > 0:
                    lines[b // 2] = line
        table = co.co_linetable.hex() or "-"
        out.append("%d %d %d %s %s" % (fmt, co.co_firstlineno, n, table, ",".join(map(str, lines))))
print(len(out))
print("\n".join(out))
'''


def _interpreters() -> dict[str, str]:
    """CPython 3.10-3.13 available here: the one running the tests, and pyenv's."""
    found = {f"{sys.version_info[0]}.{sys.version_info[1]}": sys.executable}
    pyenv = shutil.which("pyenv")
    root = os.environ.get("PYENV_ROOT") or (
        subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip() if pyenv else ""
    ) or str(Path.home() / ".pyenv")
    for v in ("3.10", "3.11", "3.12", "3.13"):
        cands = sorted(Path(root, "versions").glob(f"{v}.*/bin/python{v}"))
        if v not in found and cands:
            found[v] = str(cands[-1])
    return found


INTERPRETERS = _interpreters()


@pytest.fixture(scope="module")
def ctest() -> str:
    """The test program: MW_CTEST_BIN (scripts/asan.sh builds a sanitized one) or make's."""
    if os.environ.get("MW_CTEST_BIN"):
        return os.environ["MW_CTEST_BIN"]
    proc = subprocess.run(["make", "-s", "-C", str(ROOT), BIN], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return str(ROOT / BIN)


def _run(ctest: str, part: str, stdin: str = "") -> tuple[int, str]:
    proc = subprocess.run([ctest, part], input=stdin, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{part}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    m = re.search(rf"^{part}: (\d+) checks, (\d+) failed$", proc.stdout, re.M)
    assert m, proc.stdout
    checks, failed = int(m.group(1)), int(m.group(2))
    assert failed == 0
    return checks, proc.stdout


def test_profbuf_tables_refuse_past_their_limits_and_keep_what_they_hold(ctest: str) -> None:
    checks, _ = _run(ctest, "profbuf")
    assert checks >= 1000, checks


def test_tenant_answer_reading_takes_valid_answers_and_refuses_the_rest(ctest: str) -> None:
    checks, _ = _run(ctest, "json")
    assert checks >= 40, checks


def test_forgotten_threads_keep_their_names_until_the_sampler_has_drained_their_samples(ctest: str) -> None:
    checks, _ = _run(ctest, "threads")
    assert checks >= 4000, checks


def test_request_counts_taken_while_threads_count_are_each_taken_once(ctest: str) -> None:
    checks, _ = _run(ctest, "requests")
    assert checks >= 40, checks


def test_span_label_sets_are_recycled_two_windows_after_release_and_stale_ids_never_answer(ctest: str) -> None:
    checks, _ = _run(ctest, "spansets")
    assert checks >= 200000, checks


def test_sigterm_guard_resends_a_sigterm_the_main_thread_took_before_blocking_or_did_not_take(
        ctest: str) -> None:
    checks, _ = _run(ctest, "termguard")
    assert checks >= 10, checks


def test_profiles_waiting_for_room_in_the_store_are_bounded_ordered_and_forgotten_by_a_fork_child(
        ctest: str) -> None:
    checks, _ = _run(ctest, "backlog")
    assert checks >= 30, checks


def test_line_table_decoder_answers_a_line_for_corrupt_tables(ctest: str) -> None:
    """Random bytes and cut varints: the decoder reads only the table (ASan) and answers a
    positive line (the line or firstlineno), with no undefined arithmetic on the way (UBSan)."""
    checks, _ = _run(ctest, "corrupt")
    assert checks >= 3, checks


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13"])
def test_line_table_decoder_agrees_with_cpython(ctest: str, version: str) -> None:
    if version not in INTERPRETERS:
        pytest.skip(f"CPython {version} is not installed here")
    dump = subprocess.run([INTERPRETERS[version], "-c", DUMP], capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0, dump.stderr[-4000:]
    count, _, cases = dump.stdout.partition("\n")
    sent = int(count)
    assert sent > 300, sent  # the hostile shapes and five standard-library modules
    checks, out = _run(ctest, "linetable", cases)
    assert f"linetable: {sent} code objects" in out
    assert checks >= 5 * sent


def test_a_perf_count_is_read_less_the_time_the_host_took_the_virtual_cpu(ctest: str) -> None:
    """perf's task-clock runs on while the host has the vCPU (steal), the thread's CPU clock does
    not: over each interval the count advances no more than the clock (a small slack aside)."""
    checks, _ = _run(ctest, "steal")
    assert checks >= 12, checks
