"""Shared fixtures. Prints which interpreter runs the suite (the matrix reads this line)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The suite's profiles carry fixed timestamps (from 2025): `serve`'s retention by age (7 days by
# default) would delete them as they arrive. The retention tests give their bounds explicitly.
os.environ.setdefault("MW_SERVE_RETENTION", "off")


def pytest_report_header(config: pytest.Config) -> str:
    return f"middleware: running on CPython {sys.version.split()[0]} ({sys.executable})"


def run_workload(name: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs tests/targets/workloads.py NAME in a fresh interpreter and returns its JSON report."""
    e = dict(os.environ)
    e.update(env or {})
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "targets" / "workloads.py"), name, *args],
        capture_output=True, text=True, timeout=timeout, env=e, cwd=str(ROOT),
    )
    assert proc.returncode == 0, f"workload {name} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


@pytest.fixture
def workload():
    return run_workload


@pytest.fixture
def backend():
    """A recording profile backend on 127.0.0.1 (support/fake_backend.py), for one test."""
    from support.fake_backend import FakeBackend

    with FakeBackend() as b:
        yield b


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    """A 1500x1000 headless Chrome (support/browser.py), with the folder made where the browser
    tests save their screenshots; a module may define a driver of its own."""
    from support.browser import ARTIFACTS, chromium_driver

    ARTIFACTS.mkdir(exist_ok=True)
    yield from chromium_driver("1500,1000")
