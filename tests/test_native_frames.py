"""Native frames (issue 7): mixed Python and C stacks with libunwind, in child processes.

GIVEN a thread whose hot spots are inside C code called from Python (zlib.compress on a large
buffer; mw_test_spin in a small test-only extension built here with gcc), WHEN it is profiled
with MwTracker(native=True), THEN the native function is the leaf, directly under the Python
function that called it, with the CPU share that time.thread_time measured. Plus: the app's
signals, faulthandler and blocking I/O keep working while the sampler's signals flow.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.sampler]
ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "tests" / "native_ext" / "native_target.py"


@pytest.fixture(scope="module")
def ext_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Builds tests/native_ext/mw_test_ext.c for this interpreter into a temporary directory."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the test extension")
    out = tmp_path_factory.mktemp("native_ext")
    so = out / f"mw_test_ext{sysconfig.get_config_var('EXT_SUFFIX')}"
    cmd = ["gcc", "-shared", "-fPIC", "-O1", "-g", f"-I{sysconfig.get_paths()['include']}",
           "-o", str(so), str(ROOT / "tests" / "native_ext" / "mw_test_ext.c")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return str(out)


def run_target(mode: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(TARGET), mode, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))
    assert proc.returncode == 0, f"native target {mode} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def caller_shares(samples: list[dict[str, Any]]) -> dict[str, float]:
    """CPU share of the samples under each *_caller Python function."""
    total = sum(s["cpu"] for s in samples) or 1
    out: dict[str, float] = {}
    for s in samples:
        names = [f for f, _ in s["stack"]]
        for caller in ("zlib_caller", "ext_caller", "py_caller"):
            if caller in names:
                out[caller] = out.get(caller, 0.0) + s["cpu"] / total
    return out


def truth_shares(r: dict[str, Any]) -> dict[str, float]:
    t = r["truth_cpu_s"]
    total = sum(t.values())
    return {k: v / total for k, v in t.items()}


def leaf_share(samples: list[dict[str, Any]], pred: Any) -> float:
    total = sum(s["cpu"] for s in samples) or 1
    return sum(s["cpu"] for s in samples if s["stack"] and pred(s["stack"])) / total


def below(stack: list[list[str]], caller: str) -> list[list[str]]:
    """The frames leafward of the innermost `caller` frame (root first)."""
    names = [f for f, _ in stack]
    i = len(names) - 1 - names[::-1].index(caller)
    return stack[i + 1:]


@pytest.fixture(scope="module")
def hot(ext_dir: str) -> dict[str, Any]:
    return run_target("hotspots", "--ext-dir", ext_dir, "--seconds", "4")


def test_native_leaf_is_the_c_function_under_its_python_caller(hot: dict[str, Any]) -> None:
    samples = hot["samples"]
    truth = truth_shares(hot)
    assert hot["native"]["unwind_captured"] > 100, hot["native"]
    # the test extension: mw_test_spin is the leaf, called from ext_caller through the module
    spin = leaf_share(samples, lambda st: st[-1][0] == "mw_test_spin" and st[-1][1].startswith("mw_test_ext"))
    assert abs(spin - truth["ext_caller"]) < 0.10, (spin, truth)
    for s in samples:
        if s["stack"][-1][0] == "mw_test_spin":
            names = [f for f, _ in s["stack"]]
            assert "ext_caller" in names and "worker" in names, names
            assert names.index("worker") < names.index("ext_caller"), names  # root to leaf
            tail = below(s["stack"], "ext_caller")
            # nothing but the extension's own frames between the Python caller and the leaf
            assert all(file.startswith("mw_test_ext") for _, file in tail), tail
    # zlib: time under zlib_caller is spent in libz (deflate and its helpers), as the leaf
    in_libz = leaf_share(samples, lambda st: "zlib_caller" in [f for f, _ in st] and st[-1][1].startswith("libz"))
    assert abs(in_libz - truth["zlib_caller"]) < 0.12, (in_libz, truth)
    deflate_stacks = [s for s in samples if s["stack"][-1][1].startswith("libz")]
    assert deflate_stacks and all(any(f.startswith("deflate") for f, _ in below(s["stack"], "zlib_caller"))
                                  for s in deflate_stacks if "zlib_caller" in [f for f, _ in s["stack"]])
    assert "deflate" in {f for s in deflate_stacks for f, _ in s["stack"]}
    # every caller's total share (its own and its callees', C included) matches the truth
    # (py_caller's leaf may be C too: the allocator, when it is not libpython's)
    shares = caller_shares(samples)
    for k in truth:
        assert abs(shares.get(k, 0.0) - truth[k]) < 0.10, (k, shares, truth)


def test_native_interpreter_frames_hidden_by_default(hot: dict[str, Any]) -> None:
    files = {file for s in hot["samples"] for _, file in s["stack"]}
    assert not any(f.startswith("libpython") for f in files), files
    names = {f for s in hot["samples"] for f, _ in s["stack"]}
    assert "_PyEval_EvalFrameDefault" not in names
    assert not {"start_thread", "clone", "clone3", "__libc_start_main"} & names
    st = hot["native"]
    assert st["unwind_timeouts"] <= 0.02 * st["unwind_requests"], st
    assert st["unwind_mismatches"] <= 0.05 * st["unwind_captured"], st


def test_native_show_internal(ext_dir: str) -> None:
    r = run_target("hotspots", "--ext-dir", ext_dir, "--seconds", "1.5", "--internal")
    names = {f for s in r["samples"] for f, _ in s["stack"]}
    assert "_PyEval_EvalFrameDefault" in names
    for s in r["samples"]:
        if s["stack"][-1][0] == "mw_test_spin":
            st = [f for f, _ in s["stack"]]
            # the eval loop that runs ext_caller sits right above it, root side
            assert st.index("_PyEval_EvalFrameDefault") < st.index("ext_caller") < st.index("mw_test_spin")
            break
    else:
        pytest.fail("no mw_test_spin sample")


def test_python_only_mode_has_no_native_frames(ext_dir: str) -> None:
    r = run_target("hotspots", "--ext-dir", ext_dir, "--seconds", "1", "--python-only")
    names = {f for s in r["samples"] for f, _ in s["stack"]}
    assert "mw_test_spin" not in names and "ext_caller" in names
    # no native stack is ever captured: the only requests are pauses of a thread that runs
    # Python while its frames are read (consistent stacks), never an unwind
    assert r["native"].get("unwind_captured", 0) == 0
    assert r["native"].get("unwind_requests", 0) == r["native"].get("unwind_pauses", 0)


def test_native_signals_io_and_faulthandler_keep_working() -> None:
    r = run_target("signals", "--seconds", "4", "--rate", "200", "--occupy-rt")
    assert r["errors"] == [], r["errors"][:10]
    ops = r["ops"]
    assert ops.get("c_read", 0) > 50 and ops.get("os_read", 0) > 30 and ops.get("recv", 0) > 30, ops
    assert r["usr1"] >= r["dumps"] - 1 > 20, (r["usr1"], r["dumps"])  # the app's own handler ran
    assert r["faulthandler_enabled"]
    st = r["native"]
    assert st["unwind_signal"] != r["taken_signal"], st  # avoided the app's real-time signal
    assert st["unwind_captured"] > 200, st
    # the blocked threads really got the signal: their native leaf is the libc call they wait in
    c_files = {s["stack"][-1][1] for s in r["c_reader_samples"] if s["stack"]}
    assert any(f.startswith("libc") for f in c_files), c_files
    io_files = {file for s in r["py_io_samples"] for _, file in s["stack"]}
    assert any(f.startswith("libc") for f in io_files), io_files


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""), reason="a deliberate segfault under ASan")
def test_native_crash_still_reported_by_faulthandler() -> None:
    proc = subprocess.run([sys.executable, str(TARGET), "crash"], capture_output=True, text=True, timeout=60,
                          cwd=str(ROOT))
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr[-2000:])
    assert "Fatal Python error: Segmentation fault" in proc.stderr, proc.stderr[-2000:]
    assert "run_crash" in proc.stderr


def test_native_refused_with_a_warning_when_no_signal_is_free() -> None:
    r = run_target("refuse")
    assert any("native frames disabled" in w for w in r["warnings"]), r["warnings"]
    assert r["running"] and r["samples"] > 0  # Python frames only, still profiling
    assert r["native"]["unwind_enabled"] == 0 and r["native"]["unwind_requests"] == 0
