"""The source tree stays readable: no C or Python source of the product over 800 lines (generated
code excepted: protobuf-c output under csrc/gen, protoc output under middleware/_proto)."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 800


def _sources() -> list[Path]:
    files = [*ROOT.glob("csrc/*.c"), *ROOT.glob("csrc/*.h"), *ROOT.glob("middleware/**/*.py")]
    return sorted(f for f in files if "_proto" not in f.relative_to(ROOT).parts)


def test_no_source_file_is_over_800_lines() -> None:
    files = _sources()
    assert len(files) > 50, "the source tree was not found"
    long = {str(f.relative_to(ROOT)): n for f in files if (n := len(f.read_text().splitlines())) > LIMIT}
    assert not long, f"over {LIMIT} lines (split along the file's own sections): {long}"
