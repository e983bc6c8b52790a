"""Runs one end-to-end test many times in a row and counts how often it passes (a flakiness probe;
not part of CI: 50 runs take a few minutes).

    .venv/bin/python bench/flaky_e2e.py [--runs 50] [--test test_agent_uploads_equal_its_local_store]
                                        [--file tests/e2e/test_serve_ingest.py]

Each run is a fresh `pytest -q FILE -k TEST`. Without --file, the file is the one under tests/ that
defines TEST. Prints `N passed, M failed`, and the last lines of pytest's output for each distinct
failure. A run that selects no test is an error (exit status 2), never a pass or a failure.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEST = "test_agent_uploads_equal_its_local_store"
NO_TESTS_COLLECTED = 5  # pytest's exit status when nothing was selected


def defining_file(test: str) -> Path | None:
    """The test file under tests/ that defines `test`."""
    pattern = re.compile(rf"^\s*(?:async\s+)?def {re.escape(test)}\(", re.M)
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if pattern.search(path.read_text(errors="replace")):
            return path
    return None


def failure_summary(output: str) -> str:
    """The lines of pytest's output that say why the run failed (E lines and the summary)."""
    lines = output.strip().splitlines()
    why = [ln for ln in lines if ln.startswith("E ")][:3]
    return "\n".join(why + lines[-1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--test", default=DEFAULT_TEST, help="test name (pytest -k expression)")
    ap.add_argument("--file", type=Path, default=None, help="test file (default: the one defining --test)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run before it counts as failed")
    args = ap.parse_args()
    file = args.file or defining_file(args.test)
    if file is None:
        print(f"no file under tests/ defines {args.test}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(file), "-k", args.test]
    print(f"{args.runs} runs of: {' '.join(cmd[1:])}", flush=True)
    passed = failed = 0
    reasons: dict[str, int] = {}
    t0 = time.monotonic()
    for i in range(1, args.runs + 1):
        try:
            proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=args.timeout)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired:
            rc, out = -1, f"timed out after {args.timeout:.0f} s"
        if rc == NO_TESTS_COLLECTED:
            print(f"run {i}: no test selected by -k {args.test} in {file}", file=sys.stderr)
            return 2
        if rc == 0:
            passed += 1
        else:
            failed += 1
            why = failure_summary(out) or f"exit status {rc}"
            reasons[why] = reasons.get(why, 0) + 1
            print(f"run {i}: FAILED (exit status {rc})", flush=True)
    print(f"{args.runs} runs in {time.monotonic() - t0:.0f} s")
    print(f"{passed} passed, {failed} failed")
    for why, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"--- {n}x:\n{why}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
