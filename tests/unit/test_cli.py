"""`python -m middleware ...` run as a subprocess on synthetic pprof files.

Includes the acceptance check against an independent reader: `go tool pprof -top` on the same
file must report the same flat/cum figures as `python -m middleware top` for the top functions.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from middleware import cli
from middleware.pprof import encode_pprof, write_pprof_file
from middleware.profile import Frame, Profile, Sample
from support.profiles import T0, build, calc_profile, recursive_profile, sample

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MS = 1_000_000
SEC = 1_000_000_000
GO = shutil.which("go")


def mw(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "middleware", *map(str, args)],
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def ok(*args: str) -> str:
    proc = mw(*args)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    return proc.stdout


def fails(*args: str) -> str:
    """Run expecting the CLI's user-error exit: status 2, one line on stderr, no traceback."""
    proc = mw(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def calc_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "calc.pb.gz"
    write_pprof_file(calc_profile(), path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Three 10 s windows: calc, calc, then a window where `slow_io` took over."""
    d = tmp_path_factory.mktemp("store") / "profiles"
    d.mkdir()
    write_pprof_file(calc_profile(T0), d / f"svc-1-{T0 // SEC}.pb.gz")
    write_pprof_file(calc_profile(T0 + 10 * SEC), d / f"svc-1-{T0 // SEC + 10}.pb.gz")
    later = build([sample("main;handle;slow_io", 3000 * MS, labels={"endpoint": "/calculate"}),
                   sample("main;handle;calc1;calc2;calc3", 1000 * MS, labels={"endpoint": "/calculate"})],
                  time_nanos=T0 + 20 * SEC)
    write_pprof_file(later, d / f"svc-1-{T0 // SEC + 20}.pb.gz")
    return d


def _table(text: str) -> list[tuple[str, str, str, str, str]]:
    """Rows (self, self%, total, total%, function) of `top`'s text output."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"^\s*(\S+)\s+([\d.]+)%\s+(\S+)\s+([\d.]+)%\s+(\S+)(\s+\S+)?$", line)
        if m:
            rows.append(m.groups()[:5])
    return rows


# ------------------------------------------------------------------------------------------------
# top
# ------------------------------------------------------------------------------------------------
def test_top_shows_calc3_first(calc_file):
    out = ok("top", calc_file)
    assert out.splitlines()[0].startswith("cpu (nanoseconds): total 1.00s in 7 stacks, 2025-11-21 10:00:00")
    rows = _table(out)
    assert rows[0] == ("600.00ms", "60.00", "640.00ms", "64.00", "calc3")
    assert [r[4] for r in rows] == ["calc3", "calc2", "calc1", "helper", "main", "handle"]
    assert "app.py:40" in out.splitlines()[2]


def test_top_options(calc_file):
    assert [r[4] for r in _table(ok("top", "--sort", "total", calc_file))][:3] == ["main", "calc1", "handle"]
    limited = ok("table", "--limit", "2", calc_file)
    assert [r[4] for r in _table(limited)] == ["calc3", "calc2"]
    assert "(4 more functions" in limited
    wall = _table(ok("top", "--value", "wall", calc_file))
    assert wall[0][:2] == ("2.00s", "62.70") and wall[0][4] == "main"
    assert _table(ok("top", "--value", "samples", calc_file))[0][:2] == ("60", "60.00")
    other = _table(ok("top", "--label", "endpoint=/other", calc_file))
    assert [(r[0], r[4]) for r in other] == [
        ("100.00ms", "calc1"),
        ("60.00ms", "helper"),
        ("0ns", "handle"),
        ("0ns", "main"),
    ]
    doc = json.loads(ok("top", "--format", "json", "--limit", "0", calc_file))
    assert doc["total"] == 1000 * MS and doc["functions"][0]["function"] == "calc3"
    assert sum(f["self"] for f in doc["functions"]) == doc["total"]


def test_top_merges_files_and_directories_and_filters_time(store):
    files = sorted(store.iterdir())
    merged = json.loads(ok("top", "--format", "json", files[0], files[1]))
    assert merged["total"] == 2000 * MS
    whole = json.loads(ok("top", "--format", "json", store))
    assert whole["total"] == 6000 * MS and whole["functions"][0]["function"] == "slow_io"
    iso = json.loads(ok("top", "--format", "json", "--from", "2025-11-21T10:00:20Z", store))
    assert iso["total"] == 4000 * MS
    unix = json.loads(ok("top", "--format", "json", "--until", str(T0 // SEC + 10), store))
    assert unix["total"] == 1000 * MS and unix["functions"][0]["function"] == "calc3"
    both = json.loads(ok("top", "--format", "json", "--from", "2025-11-21T10:00:05", "--until", "2025-11-21T10:00:15",
                         "--label", "endpoint=/calculate", store))
    assert both["total"] == 2 * 790 * MS


# ------------------------------------------------------------------------------------------------
# go tool pprof agrees
# ------------------------------------------------------------------------------------------------
def _random_profile(seed: int) -> Profile:
    """Many functions in varied stacks (some recursive), distinct values, two files."""
    rnd = random.Random(seed)
    names = [f"mod{i % 4}.func_{i}" for i in range(40)]
    samples = []
    for _ in range(300):
        depth = rnd.randint(1, 9)
        stack = tuple(
            Frame(rnd.choice(names[: 5 + 4 * d]), f"src/mod{d % 2}.py", rnd.randint(1, 200)) for d in range(depth)
        )
        # functions must map to one file for go's by-name view: derive the file from the name
        stack = tuple(Frame(f.function, f"src/{f.function.split('.')[0]}.py", f.line) for f in stack)
        cpu = rnd.randint(1, 5000) * 10_007
        samples.append(
            Sample(stack, (cpu // 10 * MS or 1, cpu, cpu * 3 + rnd.randint(0, 999)), (("thread_name", "t"),))
        )
    return build(samples)


def _go_top(path: Path, sample_index: str) -> list[tuple[int, float, int, float, str]]:
    proc = subprocess.run([GO, "tool", "pprof", "-top", "-unit=ns", f"-sample_index={sample_index}", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = []
    started = False
    for line in proc.stdout.splitlines():
        if re.match(r"^\s*flat\s+flat%\s+sum%\s+cum\s+cum%", line):
            started = True
            continue
        m = re.match(r"^\s*(\d+)(?:ns)?\s+([\d.]+)%\s+[\d.]+%\s+(\d+)(?:ns)?\s+([\d.]+)%\s+(.+)$", line)
        if started and m:
            rows.append((int(m.group(1)), float(m.group(2)), int(m.group(3)), float(m.group(4)), m.group(5).strip()))
    assert rows, proc.stdout
    return rows


_UNITS = {"ns": 1, "us": 1e3, "ms": 1e6, "s": 1e9}


def _ns(text: str) -> float:
    m = re.match(r"^([\d.]+)(ns|us|ms|s)$", text)
    assert m, text
    return float(m.group(1)) * _UNITS[m.group(2)]


@pytest.mark.skipif(GO is None, reason="go (golang-go) is not installed")
@pytest.mark.parametrize("which", ["calc", "recursive", "random"])
@pytest.mark.parametrize("value", ["cpu", "wall"])
def test_go_tool_pprof_agrees_with_top(tmp_path, which, value):
    profile = {"calc": calc_profile, "recursive": recursive_profile, "random": lambda: _random_profile(7)}[which]()
    path = tmp_path / f"{which}.pb.gz"
    path.write_bytes(encode_pprof(profile))
    go_rows = _go_top(path, value)
    n = 5
    args = ("top", "--value", value, "--limit", str(n), path)
    ours_text = _table(ok(*args))
    ours_json = json.loads(ok(*args, "--format", "json"))["functions"]

    assert [r[4] for r in go_rows[:n]] == [r[4] for r in ours_text] == [f["function"] for f in ours_json]
    for go, text, exact in zip(go_rows, ours_text, ours_json, strict=False):  # go lists more than n
        flat, flat_pct, cum, cum_pct, name = go
        assert (exact["self"], exact["total"]) == (flat, cum), name
        assert float(text[1]) == pytest.approx(flat_pct, abs=0.006), name
        assert float(text[3]) == pytest.approx(cum_pct, abs=0.006), name
        assert _ns(text[0]) == pytest.approx(flat, rel=0.005, abs=1), name
        assert _ns(text[2]) == pytest.approx(cum, rel=0.005, abs=1), name


# ------------------------------------------------------------------------------------------------
# sandwich, flamegraph, export, diff
# ------------------------------------------------------------------------------------------------
def test_sandwich_shows_caller_and_callee(calc_file):
    out = ok("sandwich", "calc3", calc_file)
    callers = out[out.index("Callers of calc3:"):out.index("==> calc3")]
    assert re.search(r"640\.00ms\s+64\.00%\s+calc2\s+app\.py", callers)
    callees = out[out.index("Callees of calc3:"):]
    assert re.search(r"40\.00ms\s+4\.00%\s+helper", callees)
    assert "calc2" in ok("sandwich", "lc3", calc_file).split("==>")[0], "unique substring works"
    assert "ambiguous" in fails("sandwich", "calc", calc_file)
    assert "no function matching 'calc9'" in fails("sandwich", "calc9", calc_file)


def test_flamegraph_writes_self_contained_page(calc_file, tmp_path):
    out = tmp_path / "flame.html"
    proc = mw("flamegraph", "-o", out, calc_file)
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "MwFlame.mount" in page
    data = json.loads(re.search(r'id="mw-profile-data">(.*?)</script>', page, re.S).group(1))
    assert data["functions"][0]["name"] == "calc3" and data["total"] == 1000 * MS
    assert f"wrote {out}" in proc.stderr
    assert "cannot write (Not a directory)" in fails("flamegraph", "-o", out / "x.html", calc_file)


@pytest.mark.asan
def test_export_folded_and_speedscope(calc_file, tmp_path):
    folded = tmp_path / "calc.folded"
    ok("export", "--format", "folded", "-o", folded, calc_file)
    lines = folded.read_text().splitlines()
    assert "main;handle;calc1;calc2;calc3 600000000" in lines
    assert sum(int(line.rsplit(" ", 1)[1]) for line in lines) == 1000 * MS
    assert ok("export", "--format", "folded", "--value", "samples", calc_file).splitlines()[0] == "main 5"
    sc = tmp_path / "calc.speedscope.json"
    ok("export", "--format", "speedscope", "-o", sc, calc_file)
    doc = json.loads(sc.read_text())
    assert doc["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    assert sum(sum(p["weights"]) for p in doc["profiles"]) == 1000 * MS


def test_diff_two_files_and_two_time_ranges(store, tmp_path):
    before, after = sorted(store.iterdir())[0], sorted(store.iterdir())[2]
    out = ok("diff", before, after)
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s*[+-]\d", line)]
    assert rows[0][:3] == ["+75.00pp", "0.00%", "75.00%"] and rows[0][5] == "slow_io"
    assert rows[1][:3] == ["-35.00pp", "60.00%", "25.00%"] and rows[1][5] == "calc3"

    ranged = ok("diff", store, "--before-until", str(T0 // SEC + 20), "--after-from", str(T0 // SEC + 20))
    ranged_rows = [line.split() for line in ranged.splitlines() if re.match(r"^\s*[+-]\d", line)]
    assert [r[5] for r in ranged_rows[:2]] == ["slow_io", "calc3"]
    assert ranged_rows[0][:3] == ["+75.00pp", "0.00%", "75.00%"]
    assert "before: cpu (nanoseconds): total 2.00s" in ranged
    assert "give AFTER" in fails("diff", store)
    assert fails("diff", before, tmp_path / "missing.pb.gz").endswith(
        "AFTER: " + str(tmp_path / "missing.pb.gz") + ": no such file or directory"
    )


def test_diff_writes_the_diff_flame_graph_page(store, tmp_path):
    before, after = sorted(store.iterdir())[0], sorted(store.iterdir())[2]
    page = tmp_path / "diff.html"
    out = ok("diff", before, after, "-o", page)
    assert "slow_io" in out  # the table still goes to stdout
    data = json.loads(re.search(r'<script type="application/json" id="mw-profile-data">(.*?)</script>',
                                page.read_text(), re.S).group(1))
    assert data["diff"]["name_a"] == "before" and data["diff"]["name_b"] == "after"
    slow_io = next(f for f in data["functions"] if f["name"] == "slow_io")
    assert slow_io["self_a"] == 0 and slow_io["self_b"] > 0  # new in AFTER: drawn red


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def test_clear_errors_for_bad_inputs(tmp_path, calc_file):
    missing = tmp_path / "missing.pb.gz"
    assert fails("top", missing) == f"python -m middleware top: error: {missing}: no such file or directory"

    text = tmp_path / "notes.txt"
    text.write_text("this is not a profile\n")
    assert f"{text}: not a pprof profile" in fails("top", text)

    corrupt = tmp_path / "corrupt.pb.gz"
    corrupt.write_bytes(encode_pprof(calc_profile())[:60])
    assert f"{corrupt}: corrupt gzip data" in fails("flamegraph", "-o", tmp_path / "x.html", corrupt)
    assert not (tmp_path / "x.html").exists()

    empty = tmp_path / "empty.pb.gz"
    write_pprof_file(build([]), empty)
    assert f"{empty}: empty profile (no samples)" in fails("sandwich", "calc3", empty)
    zero = tmp_path / "zero.pb"
    zero.write_bytes(b"")
    assert "empty file (0 bytes)" in fails("export", "--format", "folded", zero)

    assert "bad --label 'endpoint'" in fails("top", "--label", "endpoint", calc_file)
    assert "bad time 'yesterday'" in fails("top", "--from", "yesterday", calc_file)
    assert "no sample type 'alloc' in this profile (available: samples, cpu, wall)" in fails(
        "top", "--value", "alloc", calc_file
    )
    assert "no samples match --label endpoint=/x" in fails("top", "--label", "endpoint=/x", calc_file)
    assert "no profile in the time range" in fails("top", "--from", "2030-01-01", calc_file)


def test_usage_errors_and_help():
    proc = mw()
    assert proc.returncode == 2 and "COMMAND" in proc.stderr
    proc = mw("top")
    assert proc.returncode == 2 and "the following arguments are required: PROFILE" in proc.stderr
    helptext = ok("--help")
    for name in ("top (table)", "sandwich", "flamegraph", "export", "diff"):
        assert name in helptext


def test_registry_skips_absent_optional_command(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, ("middleware.commands.not_there_yet", True)])
    parser = cli.build_parser()
    choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"top", "table", "sandwich", "flamegraph", "export", "diff"} <= set(choices)
    assert "not_there_yet" not in choices
    monkeypatch.setattr(cli, "COMMANDS", [("middleware.commands.not_there_either", False)])
    with pytest.raises(ModuleNotFoundError):
        cli.build_parser()


def test_relative_and_iso_times():
    from middleware.commands import CommandError, parse_time

    now = 1_800_000_000.0
    assert parse_time("now", now) == int(now * SEC)
    assert parse_time("-15m", now) == int((now - 900) * SEC)
    assert parse_time("now-2h", now) == int((now - 7200) * SEC)
    assert parse_time("1763719200") == T0
    assert (
        parse_time("2025-11-21T10:00:00Z")
        == T0
        == parse_time("2025-11-21T11:00:00+01:00")
        == parse_time("2025-11-21 10:00:00")
    )
    assert parse_time("2025-11-21T10:00:00.5Z") == T0 + SEC // 2
    with pytest.raises(CommandError):
        parse_time("soon")
