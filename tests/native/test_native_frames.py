"""Native frames: mixed Python and C stacks with libunwind (native=True), in child processes.

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
ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "tests" / "targets" / "native_ext" / "native_target.py"


@pytest.fixture(scope="module")
def ext_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Builds tests/targets/native_ext/mw_test_ext.c for this interpreter into a temporary directory."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the test extension")
    out = tmp_path_factory.mktemp("native_ext")
    so = out / f"mw_test_ext{sysconfig.get_config_var('EXT_SUFFIX')}"
    cmd = ["gcc", "-shared", "-fPIC", "-O1", "-g", f"-I{sysconfig.get_paths()['include']}",
           "-o", str(so), str(ROOT / "tests" / "targets" / "native_ext" / "mw_test_ext.c")]
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


THREAD_ROOTS = {"start_thread", "clone", "clone3", "__libc_start_main"}


def test_a_thread_exiting_after_its_python_code_shows_no_thread_start_frames() -> None:
    # Sampled at 1 kHz, threads that live a few milliseconds are often caught after their Python
    # function returned, in libc's thread exit (start_thread -> __munmap): a complete native
    # stack with no eval frame. libc's thread start is hidden there too, as under Python code.
    r = run_target("exits", "--seconds", "3", "--rate", "1000")
    assert r["threads"] > 100 and r["samples"], (r["threads"], len(r["samples"]))
    for s in r["samples"]:
        names = [f for f, _ in s["stack"]]
        assert not THREAD_ROOTS & set(names), names
        # Python frames, when any, are the thread's own: its target under threading's start
        py = [f for f, file in s["stack"] if file.endswith(".py")]
        assert not py or py[0] == "_bootstrap", names


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
    assert r["native"].get("unwind_captured", 0) == 0 and r["native"].get("unwind_frames", 0) == 0


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
    # Python frames only, still profiling (the running thread cannot be paused either: its
    # stacks are the ones two reads agree on, counted as unverified)
    assert r["running"] and r["samples"] > 0, r
    assert r["native"]["unwind_enabled"] == 0 and r["native"]["unwind_requests"] == 0


# --- native frames are functions: one row per C function, also in stripped libraries ----------

FUNC_CHILD = r'''
import ctypes, json, os, sys, threading, time, zlib
sys.path.insert(0, sys.argv[1])
import middleware
from middleware import MwTracker


def rows(p: "middleware.profile.Profile", thread: str) -> list:
    ci = p.value_index("cpu")
    return [{"stack": [[f.function, os.path.basename(f.file)] for f in s.stack], "cpu": s.values[ci]}
            for s in p.samples if s.label("thread_name") == thread]


def zlib_mode(seconds: float) -> dict:
    tracker = MwTracker(sample_rate=200, native=True, profile_dir="none", instrument=False)
    data = os.urandom(1 << 17) + b"".join(str(i * 7919 % 100003).encode() for i in range(40000))
    truth = [0.0, 0.0]
    half = [0]

    def worker() -> None:
        for h in (0, 1):
            deadline = time.monotonic() + seconds / 2
            while time.monotonic() < deadline:
                t0 = time.thread_time()
                zlib.compress(data, 9)
                truth[h] += time.thread_time() - t0
            half[0] = h + 1
            while half[0] == h + 1:  # the main thread snapshots the first half
                time.sleep(0.001)

    th = threading.Thread(target=worker, name="z9")
    th.start()
    while half[0] != 1:
        time.sleep(0.005)
    p1 = tracker.snapshot(reset=True)
    half[0] = 3
    while half[0] != 2:
        time.sleep(0.005)
    p2 = tracker.snapshot()
    half[0] = 4
    th.join()
    libz = sorted({line.split()[-1] for line in open("/proc/self/maps")
                   if os.path.basename(line.split()[-1]).startswith("libz.so")})
    from middleware import _native
    return {"halves": [rows(p1, "z9"), rows(p2, "z9")], "truth_cpu_s": truth, "libz": libz,
            "native": dict(_native.unwind_stats())}


def libs_mode(seconds: float, libdir: str) -> dict:
    tracker = MwTracker(sample_rate=200, native=True, profile_dir="none", instrument=False)
    libs = {n: ctypes.CDLL(os.path.join(libdir, n)) for n in ("libmwfull.so", "libmwdbg.so", "libmwbare.so")}

    def worker() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for lib in libs.values():
                lib.mw_run(3_000_000)

    th = threading.Thread(target=worker, name="libs")
    th.start()
    th.join()
    return {"samples": rows(tracker.snapshot(), "libs")}


mode = sys.argv[2]
out = zlib_mode(float(sys.argv[3])) if mode == "zlib" else libs_mode(float(sys.argv[3]), sys.argv[4])
out["middleware_file"] = middleware.__file__
print(json.dumps(out))
'''

STATIC_LIB_C = r'''
#include <stdint.h>
/* static: no dynamic symbol; noinline/noclone: its own function and FDE, under its own name */
__attribute__((noinline, noclone)) static uint64_t mw_static_spin(uint64_t n, uint64_t seed) {
    volatile uint64_t acc = seed;
    for (uint64_t i = 0; i < n; i++)
        acc = acc * 6364136223846793005ULL + i;
    return acc;
}
uint64_t mw_run(uint64_t n) { return mw_static_spin(n, n | 1) + 1; }
'''


def run_func_child(tmp_path: Path, *args: str) -> dict[str, Any]:
    script = tmp_path / "func_child.py"
    script.write_text(FUNC_CHILD)
    proc = subprocess.run([sys.executable, str(script), str(ROOT), *args], capture_output=True, text=True,
                          timeout=120, cwd=str(ROOT))
    assert proc.returncode == 0, f"child {args} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    r = json.loads(proc.stdout)
    assert Path(r["middleware_file"]).resolve().is_relative_to(ROOT), r["middleware_file"]  # this checkout
    return r


def fde_starts(path: str) -> set[int]:
    """Function start addresses of a 64-bit little-endian ELF file, from its .eh_frame_hdr search
    table (one entry per FDE), read independently of the profiler."""
    import struct

    data = Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, path
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr = struct.unpack_from("<IIQQ", data, phoff + i * phentsize)
        if p_type == 0x6474E550:  # PT_GNU_EH_FRAME
            break
    else:
        pytest.fail(f"{path}: no PT_GNU_EH_FRAME")
    _, ptr_enc, count_enc, table_enc = data[p_offset:p_offset + 4]
    size = {0x03: 4, 0x0B: 4, 0x04: 8, 0x0C: 8}
    assert table_enc == 0x3B and ptr_enc & 0x0F in size and count_enc & 0x0F in size, (ptr_enc, count_enc, table_enc)
    at = p_offset + 4 + size[ptr_enc & 0x0F]
    count = int.from_bytes(data[at:at + size[count_enc & 0x0F]], "little")
    at += size[count_enc & 0x0F]
    # (initial location, FDE address) pairs, signed 32-bit, relative to the header's address
    return {p_vaddr + struct.unpack_from("<i", data, at + 8 * k)[0] for k in range(count)}


def test_native_stripped_library_functions_are_one_row_each(tmp_path: Path) -> None:
    """zlib at level 9 spends its time in static functions of a stripped libz (longest_match,
    deflate_slow: no symbol). Each must be ONE row, `libz.so.1+0xSTART` with START the
    function's first address (an FDE start of the file), not one row per instruction."""
    import ctypes
    import re

    r = run_func_child(tmp_path, "zlib", "3")
    assert len(r["libz"]) == 1, r["libz"]
    libz_path = r["libz"][0]  # the file mapped (the soname is a link to it)
    starts = fde_starts(libz_path)
    libz = ctypes.CDLL(libz_path)
    leaves: list[dict[str, float]] = []
    under_libz = 0.0
    for half in r["halves"]:
        cpu: dict[str, float] = {}
        for s in half:
            if any(file.startswith("libz.so") for _, file in s["stack"]):
                under_libz += s["cpu"] / 1e9
            if s["stack"] and s["stack"][-1][1].startswith("libz.so"):
                cpu[s["stack"][-1][0]] = cpu.get(s["stack"][-1][0], 0.0) + s["cpu"] / 1e9
        leaves.append(cpu)
    names = set(leaves[0]) | set(leaves[1])
    assert 1 <= len(names) <= 10, sorted(names)
    for name in names:
        m = re.fullmatch(r"libz\.so[.0-9]*\+0x([0-9a-f]+)", name)
        if m:
            assert int(m.group(1), 16) in starts, (name, "not a function start of", libz_path)
        else:  # a symbol: exported, or from a symbol table when libz's debug symbols are installed
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), name
    # the static functions (the hot loop) are there, by their start or their .symtab name
    assert any(not hasattr(libz, name) for name in names), sorted(names)
    # the same functions in both halves: the hottest of each half is a row of the other
    for a, b in ((0, 1), (1, 0)):
        top = max(leaves[a], key=leaves[a].get)
        assert top in leaves[b], (top, leaves)
    # all of the compress time is still there, under libz
    truth = sum(r["truth_cpu_s"])
    assert truth > 0.5, r["truth_cpu_s"]
    assert 0.85 * truth <= under_libz <= 1.08 * truth, (under_libz, truth)
    st = r["native"]
    assert st["unwind_mismatches"] <= 0.05 * st["unwind_captured"], st


def test_native_static_function_named_from_symtab_debug_file_or_start(tmp_path: Path) -> None:
    """A static C function (no dynamic symbol) in three builds of one library: unstripped (named
    from its .symtab), stripped with a separate debug file found by .gnu_debuglink (named from the
    debug file's .symtab), stripped without one (`libmwbare.so+0xSTART`, START = the function's
    address according to the symbol table, read with nm)."""
    tools = {t: shutil.which(t) for t in ("gcc", "objcopy", "strip", "nm")}
    if not all(tools.values()):
        pytest.skip(f"needs gcc and binutils: {tools}")
    src = tmp_path / "mwstatic.c"
    src.write_text(STATIC_LIB_C)
    libdir = tmp_path / "libs"
    libdir.mkdir()

    def sh(*cmd: str) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(libdir))
        assert proc.returncode == 0, (cmd, proc.stderr)
        return proc.stdout

    for name in ("libmwfull.so", "libmwdbg.so", "libmwbare.so"):
        sh("gcc", "-shared", "-fPIC", "-O1", "-g", "-o", name, str(src))
    nm = sh("nm", "libmwfull.so").split("\n")
    start = int(next(line.split()[0] for line in nm if line.endswith(" mw_static_spin")), 16)
    sh("objcopy", "--only-keep-debug", "libmwdbg.so", "libmwdbg.so.debug")
    sh("strip", "--strip-all", "libmwdbg.so")
    sh("objcopy", "--add-gnu-debuglink=libmwdbg.so.debug", "libmwdbg.so")
    sh("strip", "--strip-all", "libmwbare.so")
    assert "mw_static_spin" not in sh("nm", "-D", "libmwbare.so")  # really no dynamic symbol
    assert "no symbols" in subprocess.run(["nm", "libmwbare.so"], capture_output=True, text=True,
                                          cwd=str(libdir)).stderr

    r = run_func_child(tmp_path, "libs", "2.4", str(libdir))
    expect = {"libmwfull.so": "mw_static_spin", "libmwdbg.so": "mw_static_spin",
              "libmwbare.so": f"libmwbare.so+0x{start:x}"}
    for lib, want in expect.items():
        leaf: dict[str, float] = {}
        for s in r["samples"]:
            if s["stack"] and s["stack"][-1][1] == lib:
                leaf[s["stack"][-1][0]] = leaf.get(s["stack"][-1][0], 0.0) + s["cpu"]
                if s["stack"][-1][0] == want:  # called by the exported function, as in the source
                    assert len(s["stack"]) > 1 and s["stack"][-2] == ["mw_run", lib], s["stack"][-4:]
        total = sum(leaf.values())
        assert total > 0 and leaf.get(want, 0.0) >= 0.9 * total, (lib, want, leaf)
