"""Are the samples TRUE? The profile against ground truth measured inside hostile workloads
(tests/targets/truth_workloads.py, each in a child process):

- CPU attribution: threads that burn 1-5 ms and then block 10-20 ms must show their CPU in their
  burn function, not in the blocking call they are in when the tick comes (time.thread_time);
- stacks: no sample may hold a caller -> callee edge outside the workload's static call graph
  (call-heavy code, recursion, context managers, generators, labels blocks);
- names and lines: under churn of short-lived code objects every function name is one a code
  object that ran really had, and every line lies inside that code object's lines;
- lines agree between Python-only and native (C frames) sampling.

Tolerance bands, not exact counts; every band is justified where it is set. 40-60 s in all
on 2 cores.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.sampler
ROOT = Path(__file__).resolve().parents[2]


def run_truth(name: str, *args: str, timeout: float = 150, cpu_timer: str | None = None) -> dict[str, Any]:
    """Runs tests/targets/truth_workloads.py NAME in a fresh interpreter and returns its JSON report.
    cpu_timer: force MW_PROFILING_CPU_TIMER (e.g. "timer": the POSIX timers a process gets where
    perf_event_open is refused: a container's default seccomp profile, perf_event_paranoid >= 3)."""
    env = dict(os.environ)
    if cpu_timer:
        env["MW_PROFILING_CPU_TIMER"] = cpu_timer
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "targets" / "truth_workloads.py"), name, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), env=env)
    assert proc.returncode == 0, f"truth workload {name} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def thread_names(truth_threads: dict[str, Any]) -> set[str]:
    """The names a thread's samples can carry: its Python name, or thread-<tid> when a sample was
    taken before the thread registered its name."""
    return {n for name, t in truth_threads.items() for n in (name, f"thread-{t['tid']}")}


def is_marker(name: str) -> bool:
    """The profiler's own marker frames, e.g. '[no Python frame]'."""
    return name.startswith("[") and name.endswith("]")


# --- 1. CPU attribution: bursty threads ---------------------------------------------------------
# Bands. Each thread burns in a burn function of its own, so a thread's CPU (read from its own
# clock, exact) belongs to its burn function except for what its loop and blocking calls really
# cost: 40-100 µs of CPU per blocking call on a VM, ~2% of the thread's CPU, measured as the
# truth ("outside" = thread_time not inside a burn call). The profile may put at most 5% of the
# bursty threads' CPU outside the burn functions, or the true outside share plus 3 points (4 sigma
# when that is more) when a loaded machine makes the blocking calls dearer than 2%.
# Durations. A sampler that charges each thread's CPU to where that thread really ran gets these
# shares right whatever the number of samples; the duration is for a sampler that finds the
# running stack by sampling: at 100 Hz a tick lands inside a burst only 15-25% of the time, and
# the 4 threads share one GIL. 10 s at 100 Hz is ~1,000 ticks and 200-500 bursts per thread,
# ~4 s of CPU in all, i.e. >= 400 on-CPU samples (10 ms of CPU each): at a true outside share of
# ~3% the sampling error is under a point (3 points is ~4 sigma), and the last partial tick of a
# thread (<= 10 ms of ~1 s of CPU) is under 1% of the total. 1000 Hz needs far less: 4 s.
@pytest.mark.parametrize("rate,seconds", [pytest.param(100, 10.0, marks=pytest.mark.interpreter_independent),
                                          (1000, 4.0)], ids=["100Hz", "1000Hz"])
def test_bursty_threads_cpu_is_charged_to_the_burning_function(rate: int, seconds: float) -> None:
    # GIVEN 4 threads, each looping: burn 1.5-5 ms in its own burn_x, then block 10-20 ms in
    # time.sleep / queue.Queue.get / socket recv (a peer thread answers) / Lock.acquire
    r = run_truth("bursty", "--rate", str(rate), "--seconds", str(seconds), "--threads", "4")
    threads = r["truth"]["threads"]
    bursty = {name: t for name, t in threads.items() if "burn" in t}
    assert len(bursty) == 4 and all(t["bursts"] >= 40 for t in bursty.values()), threads
    stacks = r["profile"]["stacks"]
    total = sum(s["cpu"] for s in stacks)
    truth_total = 1e9 * sum(t["thread_cpu_s"] for t in threads.values())
    mine = [s for s in stacks if s["thread"] in thread_names(bursty)]
    mine_cpu = sum(s["cpu"] for s in mine)
    mine_truth = 1e9 * sum(t["thread_cpu_s"] for t in bursty.values())
    in_burn = {t["burn"]: sum(s["cpu"] for s in mine if any(f[0] == t["burn"] for f in s["frames"]))
               for t in bursty.values()}
    outside = (mine_cpu - sum(in_burn.values())) / max(mine_cpu, 1)
    truth_outside = 1 - 1e9 * sum(t["burn_cpu_s"] for t in bursty.values()) / mine_truth
    shares = {t["burn"]: (round(100 * t["burn_cpu_s"] * 1e9 / mine_truth, 1),
                          round(100 * in_burn[t["burn"]] / max(mine_cpu, 1), 1)) for t in bursty.values()}
    figures = (f"{rate} Hz: profile CPU {total / 1e9:.3f} s vs thread_time {truth_total / 1e9:.3f} s; "
               f"bursty threads' CPU outside burn functions {100 * outside:.1f}% (truly {100 * truth_outside:.1f}%); "
               f"burn shares (truth %, profile %) {shares}")
    print(figures)
    # THEN the blocking calls (every stack without a burn function) get <= 5% of the CPU, or
    # their true share plus the larger of 3 points and 4 sigma of a share estimated from the
    # bursty threads' on-CPU samples (their CPU / period): on a loaded machine the blocking calls
    # cost more (a true 8.7% in one CI run), and at ~550 samples one sigma is then 1.2 points
    n_samples = max(mine_cpu * rate / 1e9, 1)
    sigma = (max(truth_outside, 0.01) * (1 - truth_outside) / n_samples) ** 0.5
    assert outside <= max(0.05, truth_outside + max(0.03, 4 * sigma)), figures
    # AND each burn function's share is within 5 points of its thread_time share
    for b, (want, got) in shares.items():
        assert abs(want - got) <= 5, (b, figures)
    # AND the profile's CPU total is the threads' CPU time, within 5%
    assert abs(total - truth_total) <= 0.05 * truth_total, figures


# --- 2. Stacks: a static call graph -------------------------------------------------------------
# Nodes are "<kind>:<qualname>", kind = the file the frame is in: W (tests/targets/truth_workloads.py),
# contextlib, labels (middleware/labels.py), tracker (MwTracker.labels only), threading, other.
# The generator-based context manager's __enter__/__exit__ are one node per calling function,
# because what they may call depends on whose `with` they serve.
# Rules: a W, contextlib or MwTracker.labels frame may call only what GRAPH lists for it; any
# other frame (threading, the labels implementation, importlib...) may call what it likes outside
# the workload, but a W frame only where GRAPH says so (Thread.run -> graph_worker); and every
# stack starts at threading's Thread._bootstrap.
W, CL, LB, TR, TH = "W:", "contextlib:", "labels:", "tracker:", "threading:"
ENTER, EXIT = CL + "_GeneratorContextManager.__enter__", CL + "_GeneratorContextManager.__exit__"
HELPER, CM_INIT = CL + "contextmanager.<locals>.helper", CL + "_GeneratorContextManagerBase.__init__"
ROOT_NODE = TH + "Thread._bootstrap"
GRAPH: dict[str, set[str]] = {
    TH + "Thread.run": {W + "graph_worker"},  # the only way into the workload from threading
    W + "graph_worker": {W + "call_heavy", W + "recurse", W + "with_class_cm", W + "with_gen_cm",
                         W + "use_generator", W + "labelled_task"},
    W + "call_heavy": {W + "tiny_add", W + "mid_one", W + "mid_two"},
    W + "mid_one": {W + "tiny_mul"},
    W + "mid_two": {W + "tiny_add"},
    W + "tiny_add": set(),
    W + "tiny_mul": set(),
    W + "recurse": {W + "recurse", W + "tiny_add", W + "call_heavy"},
    W + "with_class_cm": {W + "Guard.__init__", W + "Guard.__enter__", W + "Guard.__exit__", W + "call_heavy",
                          W + "mid_two"},
    W + "Guard.__init__": set(),
    W + "Guard.__enter__": {W + "tiny_add"},
    W + "Guard.__exit__": {W + "tiny_mul"},  # never mid_two, which runs just before at the same depth
    W + "with_gen_cm": {HELPER, ENTER + " from with_gen_cm", EXIT + " from with_gen_cm", W + "call_heavy",
                        W + "mid_two"},
    HELPER: {CM_INIT},
    CM_INIT: set(),  # creates the generator object: no frame runs
    ENTER + " from with_gen_cm": {W + "gen_cm"},  # next(self.gen)
    EXIT + " from with_gen_cm": {W + "gen_cm"},  # never mid_two
    W + "gen_cm": {W + "tiny_add", W + "mid_one"},
    W + "use_generator": {W + "gen_values", W + "mid_one"},
    W + "gen_values": {W + "tiny_add"},
    W + "labelled_task": {TR + "MwTracker.labels", ENTER + " from labelled_task", EXIT + " from labelled_task",
                          W + "call_heavy", W + "recurse"},
    TR + "MwTracker.labels": {HELPER},
    ENTER + " from labelled_task": {LB + "labels"},  # the labels generator: push_labels...
    EXIT + " from labelled_task": {LB + "labels"},  # ...pop_labels: its own business, never W
}
CHECKED_KINDS = {"W", "contextlib", "tracker"}  # their frames may call only what GRAPH lists


class GraphNodes:
    """Maps profile frames to GRAPH nodes (3.10 frames carry bare co_names: mapped back)."""

    def __init__(self, r: dict[str, Any]) -> None:
        paths = r["truth"]["files"]
        self.kind_of_file = {paths["workload"]: "W", paths["contextlib"]: "contextlib", paths["labels"]: "labels",
                             paths["tracker"]: "tracker", paths["threading"]: "threading"}
        self.files = r["profile"]["files"]
        self.bare = tuple(r["python"]) < (3, 11)
        self.qual_of_bare: dict[tuple[str, str], str] = {}
        for node in set(GRAPH) | {n for v in GRAPH.values() for n in v} | {ROOT_NODE}:
            kind, qual = node.split(" from ")[0].split(":", 1)
            self.qual_of_bare[(kind, qual.rsplit(".", 1)[-1])] = qual

    def kind(self, frame: list[Any]) -> str:
        k = self.kind_of_file.get(self.files[frame[1]], "other")
        if k == "tracker" and self.qual(frame, k) != "MwTracker.labels":
            return "other"  # the thread-naming hook at thread start-up: not part of the graph
        return k

    def qual(self, frame: list[Any], kind: str) -> str:
        name = frame[0]
        return self.qual_of_bare.get((kind, name), name) if self.bare else name

    def path(self, frames: list[list[Any]]) -> list[tuple[str, str]]:
        """(kind, node) per frame, root first."""
        out: list[tuple[str, str]] = []
        for i, f in enumerate(frames):
            k = self.kind(f)
            node = f"{k}:{self.qual(f, k)}"
            if node in (ENTER, EXIT):
                caller = out[i - 1][1] if i else "?"
                node += " from " + (caller[2:] if caller.startswith(W) else caller)
            out.append((k, node))
        return out


def impossible_edges(nodes: GraphNodes, frames: list[list[Any]]) -> list[tuple[str, str]]:
    """The edges of one stack that the workload cannot produce, plus ('<root>', x) when the stack
    does not start at the thread's bootstrap (a walk that lost the root side)."""
    if len(frames) == 1 and is_marker(frames[0][0]):
        return []
    path = nodes.path(frames)
    bad = [] if path[0][1] == ROOT_NODE else [("<root>", path[0][1])]
    for (ka, a), (kb, b) in pairwise(path):
        if (ka in CHECKED_KINDS or kb == "W") and b not in GRAPH.get(a, ()):
            bad.append((a, b))
    return bad


GRAPH_SECONDS = 3


@pytest.mark.parametrize("threads", [1, 4], ids=["1-thread", "4-threads"])
def test_no_sample_holds_a_call_edge_outside_the_static_graph(threads: int) -> None:
    # GIVEN `threads` busy threads running call-heavy code (a call every ~0.3 µs), recursion of
    # random depth 1-30, class and generator context managers, generators and labels blocks, on
    # another CPU than the sampler (so they really run while it reads them), at 1 kHz for 3 s:
    # >= 700 samples of the busy threads even when the machine is so busy that only a quarter of
    # the ticks come, so a 1% rate of bad stacks shows as ~7 samples
    r = run_truth("graph", "--rate", "1000", "--seconds", str(GRAPH_SECONDS), "--threads", str(threads))
    nodes = GraphNodes(r)
    names = thread_names(r["truth"]["threads"])
    mine = [s for s in r["profile"]["stacks"] if s["thread"] in names]
    # a stack's weight in samples: its CPU samples, or 1 for a stack that carries only wall time
    weight = {id(s): s["n"] or 1 for s in mine}
    n_samples = sum(weight.values())
    bad: dict[tuple[str, str], int] = defaultdict(int)
    bad_samples = bad_cpu = 0
    for s in mine:
        edges = impossible_edges(nodes, s["frames"])
        if edges:
            bad_samples += weight[id(s)]
            bad_cpu += s["cpu"]
        for e in set(edges):
            bad[e] += weight[id(s)]
    cpu = sum(s["cpu"] for s in mine)
    wall = sum(s["wall"] for s in mine)
    truth_cpu = 1e9 * sum(t["thread_cpu_s"] for t in r["truth"]["threads"].values())
    stats = r["stats"]
    worst = sorted(bad.items(), key=lambda kv: -kv[1])[:12]
    figures = (f"{threads} thread(s): {bad_samples} of {n_samples} samples "
               f"({100 * bad_samples / max(n_samples, 1):.2f}%, {100 * bad_cpu / max(cpu, 1):.2f}% of the CPU) "
               f"hold an impossible edge; worst {worst}; "
               f"CPU {cpu / 1e9:.3f} s vs thread_time {truth_cpu / 1e9:.3f} s; wall {wall / 1e9:.2f} s; "
               f"dropped {stats['dropped']} of {stats['samples']} samples")
    print(figures)
    # the busy threads were sampled all along (every tick gives each thread its wall time)
    assert wall >= 0.8 * threads * GRAPH_SECONDS * 1e9 and len(mine) >= 50, figures
    # THEN no sample holds a stack that never existed
    assert bad_samples == 0, figures
    # AND the CPU total is the threads' CPU time within 2%, with (almost) nothing dropped
    assert abs(cpu - truth_cpu) <= 0.02 * truth_cpu, figures
    assert stats["dropped"] <= 0.005 * stats["samples"], figures


# --- 3. Names and lines under code-object churn -------------------------------------------------
# What the profile uses for a frame whose instruction has no line (a module's RESUME, artificial
# instructions): the code object's first line, never 0; 0 appears only on the profiler's marker
# frames. So a real frame's line must lie in [first line, last line] of its code object.
COMPONENT = re.compile(r"^(?:[^\W\d]\w*|<[a-z_]+>)$")


def plausible_name(name: str) -> bool:
    """A printable Python (qual)name or a marker: no control characters, no '?' or U+FFFD."""
    if not name or not name.isprintable() or "?" in name or "\ufffd" in name:
        return False
    return is_marker(name) or all(COMPONENT.match(c) for c in name.split("."))


def unit_index(name: str) -> str | None:
    """The churn unit a generated function belongs to (cx_12, CK_12.cm_12, mod_30_work...)."""
    m = re.search(r"_(\d+)", name)
    return m.group(1) if m else None


def test_names_and_lines_are_those_of_code_objects_that_ran() -> None:
    # GIVEN, sampled at 1 kHz for 4 s: two threads exec'ing units of uniquely named functions (a
    # nested one, a method, a comprehension), each unit under labels unit=<i>, freed right after
    # a few calls, 4 file names shared, half at line 1 and half at random first lines; fresh
    # modules written, imported and dropped; short threads running those functions; and a thread
    # making ~100,000 code objects a second (copies of one function under a new name and first
    # line, each called once and freed at once, so the next copy reuses its memory)
    r = run_truth("churn", "--rate", "1000", "--seconds", "4")
    truth = r["truth"]
    key = 1 if tuple(r["python"]) >= (3, 11) else 2  # qualname, or the bare name on 3.10
    ranges: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for c in truth["code"]:
        ranges[(c[0], c[key])].append((c[3], c[4]))
    fast = truth["fast"]  # fast_<i>, i in 1..count, first line line0 + (i % mod) * step
    fast_name = re.compile(re.escape(fast["prefix"]) + r"([1-9]\d*)$")

    def churn_ranges(file: str, name: str) -> list[tuple[int, int]]:
        if file != fast["file"]:
            return ranges.get((file, name), [])
        m = fast_name.match(name)
        if not m or int(m.group(1)) > fast["count"]:
            return []
        first = fast["line0"] + (int(m.group(1)) % fast["mod"]) * fast["step"]
        return [(first + fast["lo"], first + fast["hi"])]

    churn_files = {c[0] for c in truth["code"]} | {fast["file"]}
    real: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for file, codes in truth["real_code"].items():
        for c in codes:
            real[(file, c[key - 1])].append((c[2], c[3]))
    real_files = set(truth["real_code"])

    files = r["profile"]["files"]
    frames_seen = churn_frames = 0
    bad_name: dict[str, int] = defaultdict(int)
    bad_line: dict[str, int] = defaultdict(int)
    bad_unit: dict[str, int] = defaultdict(int)
    for s in r["profile"]["stacks"]:
        w = s["n"] or 1  # CPU samples, or 1 for a stack that carries only wall time
        unit = s["labels"].get("unit")
        prev: tuple[str, str | None] | None = None
        for name, fi, line in s["frames"]:
            file = files[fi]
            frames_seen += w
            where = f"{name!r} in {file!r}:{line}"
            if is_marker(name):  # the profiler saying it does not know: not a claim to check
                pass
            elif not plausible_name(name) or not file.isprintable():
                bad_name[where] += w
            elif file in churn_files or file in real_files:
                known = churn_ranges(file, name) if file in churn_files else real.get((file, name), [])
                churn_frames += w if file in churn_files else 0
                if not known:  # a name no code object of this file had
                    bad_name[where] += w
                elif not any(lo <= line <= hi for lo, hi in known):
                    bad_line[f"{where} (code lines {known[:3]})"] += w
            elif line == 0:
                bad_line[where] += w
            # a unit's function runs under that unit's labels and only calls its own functions
            idx = unit_index(name) if file in churn_files else None
            if idx is not None and file.startswith("<churn-exec-") and unit is not None and idx != unit:
                bad_unit[f"{name} under unit={unit}"] += w
            if prev is not None and prev[1] is not None and idx is not None and idx != prev[1]:
                bad_unit[f"{prev[0]} > {name}"] += w
            prev = (name, idx) if file in churn_files else None

    def top(d: dict[str, int]) -> list[tuple[str, int]]:
        return sorted(d.items(), key=lambda kv: -kv[1])[:8]

    figures = (f"{truth['units']} units, {truth['modules']} modules, {truth['threads']} threads, "
               f"{len(truth['code'])} code objects, {fast['count']} fast copies; "
               f"frames {frames_seen} (churn {churn_frames}): "
               f"bad names {sum(bad_name.values())} {top(bad_name)}; "
               f"bad lines {sum(bad_line.values())} {top(bad_line)}; "
               f"another unit's functions {sum(bad_unit.values())} {top(bad_unit)}; "
               f"source files changed during the run (names checked for form only): {truth['changed_files']}")
    print(figures)
    # the churn ran and was sampled
    assert truth["units"] >= 150 and truth["modules"] >= 10 and truth["threads"] >= 50, figures
    assert fast["count"] >= 50_000 and churn_frames >= 300, figures
    # THEN every name is a printable name that some code object that ran had
    assert not bad_name, figures
    # AND every line lies inside that code object's lines
    assert not bad_line, figures
    # AND no sample shows a unit's function under another unit's labels or function (a name
    # taken from the code object that lived at the same address before)
    assert not bad_unit, figures


# --- 4. Lines agree between Python-only and native sampling -------------------------------------
TARGETS = ("rec_lines", "busy_two")


def line_shares(r: dict[str, Any]) -> tuple[dict[str, float], int]:
    """CPU share per line of the innermost target frame of each sample, and the sample count."""
    files = r["profile"]["files"]
    acc: dict[str, int] = defaultdict(int)
    n = 0
    for s in r["profile"]["stacks"]:
        inner = [f for f in s["frames"] if f[0] in TARGETS and files[f[1]] == r["truth"]["file"]]
        if inner:
            acc[f"{inner[-1][0]}:{inner[-1][2]}"] += s["cpu"]
            n += s["n"]
    total = sum(acc.values()) or 1
    return {k: v / total for k, v in acc.items()}, n


LINES_SAMPLES = 2500


@pytest.mark.skipif("ASAN_OPTIONS" in os.environ, reason="ASan holds freed memory back: no address reused")
def test_code_objects_remade_at_a_freed_ones_address_keep_their_own_cpu() -> None:
    # GIVEN one thread alternating for 4 s, sampled at 1 kHz, between a copy of a burn loop named
    # recycled_long (3 ms of CPU a call) and one named recycled_short (1 ms), each copy made,
    # called once and freed before the next: the same code address and the same instructions
    # come back under the other name (a profiler that knows a sample's stack by addresses and
    # instructions, as it may to skip naming a stack it has just named, mixes them up)
    r = run_truth("recycled", "--rate", "1000", "--seconds", "4")
    truth = r["truth"]
    assert truth["same_address"] >= 0.5 * truth["copies"], truth  # the memory was taken again
    cpu: dict[str, float] = defaultdict(float)
    for s in r["profile"]["stacks"]:
        for name in {f[0] for f in s["frames"]} & set(truth["cpu"]):
            cpu[name] += s["cpu"]
    # THEN each name's share of the two names' CPU is its own (truth ~3/4 and ~1/4), within 3
    # points (~4,000 samples: a share's sd is under a point)
    total, true_total = sum(cpu.values()), sum(truth["cpu"].values())
    assert total > 0.5 * true_total * 1e9, (dict(cpu), truth)
    for name, true_cpu in truth["cpu"].items():
        assert abs(cpu[name] / total - true_cpu / true_total) <= 0.03, (name, dict(cpu), truth)
    # AND next to no sample went without its names (they were 3/4 of them: the cache kept one
    # code object per address, and the other's samples were dropped, their CPU given to the rest)
    st = r["stats"]
    assert st["names_lost"] <= 0.01 * st["cpu_timer_recorded"], (st["names_lost"], st["cpu_timer_recorded"])


def test_line_shares_agree_between_python_and_native_sampling() -> None:
    # GIVEN a function recursing to depth 20 with its work on two lines at the bottom, and a loop
    # with two hot lines, alternating; sampled at 1 kHz for 3 s per mode and on until 2,500 on-CPU
    # samples (up to 12 s: on a loaded machine the thread is on CPU at fewer ticks): a 25% line
    # share then has a sampling error of ~0.9 points per mode, ~1.2 on the difference, so the
    # 5-point band is ~4 sigma
    args = ("--rate", "1000", "--seconds", "3", "--samples", str(LINES_SAMPLES))
    py = run_truth("lines", *args)
    nat = run_truth("lines", *args, "--native")
    if not nat["stats"].get("unwind_enabled"):
        pytest.skip("native frames are not available here")
    tags = py["truth"]["lines"]
    hot = {f"rec_lines:{tags['REC_A']}", f"rec_lines:{tags['REC_B']}", f"busy_two:{tags['BUSY_A']}",
           f"busy_two:{tags['BUSY_B']}"}
    (a, na), (b, nb) = line_shares(py), line_shares(nat)
    diffs = {k: round(100 * (a.get(k, 0) - b.get(k, 0)), 1) for k in set(a) | set(b)}
    figures = (f"python ({na} samples, {py['truth']['seconds']:.1f} s) "
               f"{({k: round(100 * v, 1) for k, v in sorted(a.items())})}; "
               f"native ({nb} samples, {nat['truth']['seconds']:.1f} s) "
               f"{({k: round(100 * v, 1) for k, v in sorted(b.items())})}; "
               f"differences {diffs}; thread_time split {py['truth']['cpu_s']}")
    print(figures)
    # enough samples for the band: a busy thread must be found on CPU at >= 1,000 ticks in 12 s
    assert min(na, nb) >= 1000, f"too few on-CPU samples of a busy thread to compare lines: {figures}"
    # THEN the hot lines hold (nearly) all of the targets' CPU in both modes
    assert sum(a.get(k, 0) for k in hot) >= 0.9 and sum(b.get(k, 0) for k in hot) >= 0.9, figures
    # AND every line's share agrees within 5 points between the modes
    worst_line = max(abs(d) for d in diffs.values())
    # AND in both modes the two targets' shares match their thread_time split
    off = {}
    for mode, r, shares in (("python", py, a), ("native", nat, b)):
        t = r["truth"]["cpu_s"]
        want = t["rec_lines"] / (t["rec_lines"] + t["busy_two"])
        off[mode] = 100 * (sum(v for k, v in shares.items() if k.startswith("rec_lines:")) - want)
    # (within 4 points: ~4 sigma of a 50% share at 2,500 samples). This is what caught the
    # strictly periodic CPU timer aliasing with code alternating every ~0.3 ms, and a deep
    # stack's dearer handler run (3.10 native: ~80 native frames to unwind) being split over all
    # samples instead of charged to its own stack: the recursion came out 1-6 points short.
    assert abs(off["python"]) <= 4 and abs(off["native"]) <= 4, (off, figures)
    assert worst_line <= 5, (worst_line, figures)


# --- 4b. Threads shorter than a sampling period -------------------------------------------------
# Batches of 50 threads that each live ~0.2 ms of CPU, 2 s at 1 kHz (~6,000 threads, ~1.3 s of
# their CPU): a CPU sample is due at a random instant of each period of a thread's CPU time, so a
# thread shorter than a period gets one with probability (its CPU / period). Its CPU before its
# timer is armed (creation, CPython's bootstrap, the arming: ~35-60 us here) is credited by an
# extra sample at its start with probability (that CPU / period); samples due in its exit path,
# where no signal is delivered any more, are counted from its event's final count. Left out:
# the kernel's exit after the event stops counting (~25 us a thread) and the handlers' own runs.
# Measured: 81-88% of their CPU at 1 kHz on 3.10-3.13 (50-60% before the start-up credit). Below 65%
# start-up or exit CPU is lost again; above 115% short threads are over-sampled (an overflow of a
# short first period that came before the sample due was once counted as a sample: 216%).
# With POSIX timers (test_light_threads...: the kernel's tick decides when a signal comes) the
# same band holds: a thread's first expiry lies at a random instant of its first period of CPU.
@pytest.mark.parametrize("cpu_timer", [None, "timer"], ids=["default", "posix-timer"])
def test_threads_shorter_than_a_period_are_neither_lost_nor_over_sampled(cpu_timer: str | None) -> None:
    r = run_truth("short", "--rate", "1000", "--seconds", "2", cpu_timer=cpu_timer)
    truth = r["truth"]
    profiled = sum(s["cpu"] for s in r["profile"]["stacks"] if s["thread"] != "MainThread") / 1e9
    ratio = profiled / truth["short_cpu_s"]
    figures = (f"{truth['threads']} threads, their CPU {truth['short_cpu_s']:.3f} s, in the profile "
               f"{profiled:.3f} s (ratio {ratio:.2f}); early overflows {r['stats'].get('cpu_timer_early')}")
    print(figures)
    assert truth["threads"] >= 1000, figures
    assert 0.65 <= ratio <= 1.15, figures
    # the thread starting them keeps its own CPU: on CPython <= 3.11 a new thread's state carries
    # its creator's ids until it runs, and taking it for the creator re-armed the creator's timer
    # at every start (its CPU came out 5-14% high)
    # Its truth is bracketed: its CPU inside the loop (measured there) and over the profile window
    # (the reset, the loop's own measuring and its return included: 0.5-0.8% more; the profile
    # comes within 0.3% of it). Under the sanitizers the main thread's frees now and then pay a
    # recycling of the allocator's quarantine, ~12 ms of CPU at once (perf: __asan's Recycle); one
    # that falls after the loop's last reading (its final stats() call, the frees at its return)
    # is the main thread's CPU in the window, rightly profiled, but +4% over the loop's 0.3 s.
    main = sum(s["cpu"] for s in r["profile"]["stacks"] if s["thread"] == "MainThread") / 1e9
    bracket = (truth["main_cpu_s"], truth["main_window_cpu_s"])
    assert 0.95 * bracket[0] <= main <= 1.03 * bracket[1], (main, bracket, figures)
    # ... each under its own thread's name: samples named after the Thread object was collected
    # (at the sampler's next drain) once came out as "thread-<id>", ~30% of these threads' CPU.
    # A thread's start before it registers its name (threading's bootstrap up to _set_native_id,
    # read by a tick or a POSIX timer's expiry) was left there too: 1.0-1.35% with POSIX timers (a
    # CI run on 3.12 failed at 1.1%), 0.04-0.29% with perf events, 0.65-1.04% under the sanitizers;
    # now the thread's "thread-<tid>" string takes its name when it registers one: 0.00-0.09%
    bound = 0.01 if "ASAN_OPTIONS" in os.environ else 0.005
    unnamed = sum(s["cpu"] for s in r["profile"]["stacks"]
                  if s["thread"] != "MainThread" and not s["thread"].startswith("short-")) / 1e9
    assert unnamed <= bound * profiled, (unnamed, figures)


# --- 4c. Light threads: less CPU than a period in a life of several ticks --------------------------
# 6 rounds of 250 threads, each 3 x (1 ms of CPU, 0.25 s asleep), 100 Hz: ~5 s of their CPU, each
# thread ~3 ms (a sample with probability ~0.3), read by several ticks. Truth: the process's CPU
# less the main thread's and the sampler's (each thread's time.thread_time for the bursts). A sample
# stands for the CPU its slot held (one period). When a thread's clock was split over its samples
# instead, a thread without a sample kept its CPU waiting for one that never came (lost at its
# end) and a sampled one got only its own few ms: 300 such threads came out at 44% of their CPU
# (this workload: 64-69%, the rest counted as unattributed). The band is ~4 sigma of ~450
# samples, less the context switches the perf event does not count (~2% here).
# With POSIX timers (no perf_event_open: a container's default seccomp profile, perf_event_paranoid
# >= 3) the kernel checks a thread's CPU timer only at its scheduler tick (CONFIG_HZ: 250 here, every
# 4 ms) while the thread runs: a 1 ms burst holds a tick one time in four, so most samples due in
# a burst come at a later burst's tick or not before the thread ends, where they are credited from
# its clock under "[place unknown: due before thread exit]". Their total must still hold (a timer
# whose first expiry came a whole period after the arming gave these threads no sample at all: 9%
# of their CPU), none may be
# charged where the thread did not run (its sleep line: what the bursts' loop and the sleep calls
# really cost, twice over), and the bursts may not hold more than they used.
@pytest.mark.interpreter_independent
@pytest.mark.parametrize("cpu_timer", [None, "timer"], ids=["default", "posix-timer"])
def test_light_threads_cpu_is_not_lost_waiting_for_a_sample(cpu_timer: str | None) -> None:
    r = run_truth("light", "--rate", "100", cpu_timer=cpu_timer)
    truth = r["truth"]
    light = [s for s in r["profile"]["stacks"] if s["thread"].startswith("light-")]
    profiled = sum(s["cpu"] for s in light) / 1e9
    burst = sum(s["cpu"] for s in light if any(f[0] == "light_burst" for f in s["frames"])) / 1e9
    unlocated = sum(s["cpu"] for s in light
                    if [f[0] for f in s["frames"]] == ["[place unknown: due before thread exit]"]) / 1e9
    at_sleep = sum(s["cpu"] for s in light if s["frames"] and s["frames"][-1][0] == "light_thread") / 1e9
    # their CPU: the process's less the other threads' (each thread's own thread_time misses its
    # exit, which a loaded VM makes dear: 1,500 exits once cost ~1.8 s more than here)
    ratio = profiled / truth["light_process_s"]
    burst_ratio = burst / truth["light_burst_s"]
    outside = truth["light_cpu_s"] - truth["light_burst_s"]
    figures = (f"{truth['threads']} threads, their CPU {truth['light_process_s']:.3f} s (measured inside "
               f"each {truth['light_cpu_s']:.3f} s), in the profile {profiled:.3f} s (ratio {ratio:.2f}), "
               f"in light_burst {burst:.3f} s of {truth['light_burst_s']:.3f} s measured (ratio {burst_ratio:.2f}), "
               f"place unknown {unlocated:.3f} s, at the sleep line {at_sleep:.3f} s (outside the bursts "
               f"{outside:.3f} s); timer mode {r['stats'].get('cpu_timer_mode')}")
    print(figures)
    assert truth["threads"] == 1500, figures
    assert 0.8 <= ratio <= 1.2, figures
    assert at_sleep <= 2 * outside + 0.05, figures
    if cpu_timer == "timer":
        assert r["stats"]["cpu_timer_mode"] == 1, figures
        assert burst_ratio <= 1.2, figures
        # what the bursts miss is marked as unplaced, not put elsewhere
        assert burst + unlocated >= 0.8 * truth["light_burst_s"], figures
        return
    # and the CPU of the bursts themselves, as each measured it, is where they ran (the rest is each
    # thread's start and exit, whose share grows on a slower machine and under the sanitizers)
    assert 0.8 <= burst_ratio <= 1.2, figures


# --- 4d. Threads that end while they burn -----------------------------------------------------------
# 20 threads one after the other, each burning 0.2 s and ending at once, then 60 of 20 ms, 100 Hz.
# Truth: each thread's time.thread_time and perf_counter. A tick reads a thread's clock only while
# it lives: the CPU a busy thread used from its last tick to its end (half a tick's on average,
# 5 ms here) was lost: totals 0.980-0.981, a thread down to 0.95 (with 0.1 s threads 0.943-0.960,
# a thread down to 0.83). Each thread now leaves its clock as it ends. Bands: a thread's CPU is its
# clock (exact) once it has 8 CPU samples in the window (ticks only: always); with fewer it stands
# for its samples' periods, +-45 ms (~1% of the total; 20 samples are expected, so that is rare).
# Wall: with CPU timers, ticks that find a thread running owe their wall time to its next CPU
# sample, which a thread that ends never has: the 20 ms threads' wall came out at 0.86-0.92
# (0.2 s threads: 0.966-0.990). It now goes to its last sample. The tick before a thread's birth
# stands for the whole interval, its last tick's wall to its end is not counted: even on average
# (ticks only: 0.99-1.02); their thread's bootstrap and exit are outside the truth (~1%).
@pytest.mark.parametrize("cpu_timer", [None, "timer", "off"], ids=["default", "posix-timer", "ticks-only"])
def test_threads_ending_while_they_burn_keep_the_cpu_of_their_last_moments(cpu_timer: str | None) -> None:
    r = run_truth("ending", "--rate", "100", "--seconds", "0.2", cpu_timer=cpu_timer)
    truth, walls = r["truth"]["threads"], r["truth"]["walls"]
    cpu: dict[str, float] = defaultdict(float)
    wall: dict[str, float] = defaultdict(float)
    samples: dict[str, int] = defaultdict(int)
    for s in r["profile"]["stacks"]:
        cpu[s["thread"]] += s["cpu"] / 1e9
        wall[s["thread"]] += s["wall"] / 1e9
        samples[s["thread"]] += s["n"]
    ending = [name for name in truth if name.startswith("ending-")]
    brief = [name for name in truth if name.startswith("brief-")]
    ratios = {name: cpu[name] / truth[name] for name in ending}
    total = sum(cpu[name] for name in ending) / sum(truth[name] for name in ending)
    clocked = [name for name in ending if cpu_timer == "off" or samples[name] >= 10]

    def wall_ratio(names: list[str]) -> float:
        return sum(wall[name] for name in names) / sum(walls[name] for name in names)

    stats = {k: v for k, v in r["stats"].items() if k.startswith(("exit", "cpu_timer_exit", "cpu_unattr", "wall_un"))}
    # where a thread's missing CPU went, should a thread fall short (once under make asan: two of 20
    # at 0.95, the total at 0.997): under another thread's name, or a name of no thread
    others = {name: round(v, 4) for name, v in cpu.items() if name not in truth and v}
    figures = (f"CPU total {total:.3f}, per thread {sorted(ratios.values())}, {len(clocked)} by their clock; "
               f"wall {wall_ratio(ending):.3f} / brief threads {wall_ratio(brief):.3f}; {stats}; CPU of other "
               f"names {others}; preempted {r['stats'].get('preempted')}, without the GIL "
               f"{r['stats'].get('preempted_released')}")
    print(figures)
    assert len(ending) == 20 and len(brief) == 60 and len(clocked) >= 15, figures
    assert 0.985 <= total <= 1.015, figures
    # (under the sanitizers a thread's exit, which the profile counts and the thread's own last
    # reading does not, may pay a recycling of the allocator's quarantine: ~10 ms at once, once
    # +4.7% of a 0.2 s thread; see the short threads' test above)
    slack = 0.015 if "ASAN_OPTIONS" in os.environ else 0.0
    assert all(0.985 * truth[name] <= cpu[name] <= 1.015 * truth[name] + slack for name in clocked), figures
    assert 0.985 <= wall_ratio(ending) <= 1.015, figures
    assert 0.96 <= wall_ratio(brief) <= 1.06, figures


# --- 5. Wall time of idle threads: quiet ticks read (almost) none of them ---------------------------
# 300 idle threads (half in idle_a, half in idle_b), 20 movers (phase_one for the first half,
# phase_two for the second), one busy thread, 100 Hz, 4 s. Truth: each idle thread waited the
# whole window in its own function; each mover half in each phase.
def test_idle_threads_wall_is_theirs_and_follows_a_move() -> None:
    r = run_truth("idle", "--rate", "100", "--seconds", "4", "--threads", "300")
    elapsed_ns = r["truth"]["elapsed_s"] * 1e9
    expect = r["truth"]["idle"]
    wall: dict[str, float] = {}
    in_fn: dict[str, float] = {}
    phases: dict[str, dict[str, float]] = {}
    for s in r["profile"]["stacks"]:
        names = [f[0] for f in s["frames"]]
        t = s["thread"]
        if t in expect:
            wall[t] = wall.get(t, 0) + s["wall"]
            if any(n.split(".")[-1] == expect[t] for n in names):
                in_fn[t] = in_fn.get(t, 0) + s["wall"]
        elif t.startswith("mover-"):
            p = phases.setdefault(t, {"one": 0.0, "two": 0.0, "all": 0.0})
            p["all"] += s["wall"]
            if any(n.split(".")[-1] == "phase_one" for n in names):
                p["one"] += s["wall"]
            if any(n.split(".")[-1] == "phase_two" for n in names):
                p["two"] += s["wall"]
    st = r["stats"]
    figures = (
        f"elapsed {elapsed_ns / 1e9:.2f} s; idle threads {len(wall)}/{len(expect)}; wall/elapsed "
        f"min {min(wall.values(), default=0) / elapsed_ns:.3f} max {max(wall.values(), default=0) / elapsed_ns:.3f}; "
        f"quiet ticks {st['quiet_ticks']}/{st['ticks']}; movers "
        f"{sorted(round(p['two'] / p['all'], 2) for p in phases.values() if p['all'])}"
    )
    print(figures)
    # every idle thread is in the profile with the window's wall time (the last tick can be up
    # to a period before the snapshot: 2.5% of 4 s) ...
    assert len(wall) == len(expect), figures
    assert all(0.95 * elapsed_ns <= w <= 1.03 * elapsed_ns for w in wall.values()), figures
    # ... all of it in its own function
    assert all(in_fn.get(t, 0) >= 0.999 * w for t, w in wall.items()), figures
    # the ticks were mostly quiet (the test is about them)
    assert st["quiet_ticks"] >= 0.5 * st["ticks"], figures
    # a mover's wall follows it: half in each phase (a tick or two at the turn)
    assert len(phases) == 20, figures
    for p in phases.values():
        assert p["one"] + p["two"] >= 0.97 * p["all"], figures
        assert 0.42 <= p["two"] / p["all"] <= 0.58, figures


# --- 6. Where in its bursts a thread is read -------------------------------------------------------
# One thread: bursts of 0.6 ms of CPU in phase_head then 0.6 ms in phase_tail, each followed by a
# 2-4 ms sleep, 1 kHz, 4 s (~1.1 s of CPU: ~550 on-CPU samples per half, a half's share within
# ~3%). Truth: each half's time.thread_time and perf_counter.
# - Ticks: a tick must read the thread at its own instant; woken on the CPU where the thread ran,
#   the sampler waited for it to block or to use up its time slice, so its reads came late in the
#   bursts: with ticks only, phase_head 0.68-0.80 of its CPU and 0.27-0.35 of its wall, phase_tail
#   1.22-1.32 and 0.53, the sleep 1.25 of its wall (the thread seen asleep when it ran). The sampler
#   now asks for a short time slice of its own (Linux 6.12+): 0.93-1.02 / 0.98-1.09 of the CPU,
#   0.89-0.98 / 0.98-1.06 / 1.02-1.04 of the wall.
# - POSIX CPU timers (where perf_event_open is refused): the kernel checks them at its scheduler
#   tick while the thread runs, and those ticks fall late in bursts: 0.66-0.73 / 1.27-1.36 of the
#   halves' CPU (100 Hz, 16 s). Ticks that find the thread running now place its CPU (its timer's
#   samples only count it): 0.96-1.01 / 1.00-1.05 here (ticks at the sampling rate).
# - perf events: the CPU samples come from the thread itself. A tick that finds it running owed its
#   wall time to its next CPU sample, which at 1 kHz lands later in the burst than the tick: the
#   halves' wall came out at 0.71-0.89 / 1.05-1.19 (a run at 1.2 / 0.94 too: lumps). That wall is
#   now split over the thread's CPU samples of the window, as its CPU is: 0.96-1.05 / 0.92-0.99.
# Bands: +-15% for a half (4-5 sigma), +-6% for the sleep's wall (2.9 s).
@pytest.mark.parametrize("cpu_timer", [None, "timer", "off"], ids=["default", "posix-timer", "ticks-only"])
def test_a_bursty_thread_is_read_evenly_across_its_bursts(cpu_timer: str | None) -> None:
    r = run_truth("phases", "--rate", "1000", "--wall-rate", "1000", "--seconds", "4", cpu_timer=cpu_timer)
    truth = r["truth"]
    cpu: dict[str, float] = defaultdict(float)
    wall: dict[str, float] = defaultdict(float)
    for s in r["profile"]["stacks"]:
        if s["thread"] != "phased":
            continue
        names = [f[0] for f in s["frames"]]
        half = next((n for n in ("phase_head", "phase_tail") if n in names), None)
        where = half or ("sleep" if names and names[-1].endswith("phased") else "other")
        cpu[where] += s["cpu"] / 1e9
        wall[where] += s["wall"] / 1e9
    cpu_r = {k: cpu[k] / v for k, v in truth["cpu"].items()}
    wall_r = {k: wall[k] / v for k, v in truth["wall"].items()}
    st = r["stats"]
    late_us = st["tick_late_ns"] / max(st["ticks"], 1) / 1e3
    figures = (f"{truth['bursts']} bursts; CPU {({k: round(v, 3) for k, v in cpu_r.items()})}, wall "
               f"{({k: round(v, 3) for k, v in wall_r.items()})}; elsewhere {cpu['other']:.3f} s CPU; "
               f"sampler slice {st['sampler_slice_ns']} ns, ticks late by {late_us:.0f} us on average; "
               f"timer mode {st.get('cpu_timer_mode')}, placed by ticks {st['tick_placed']}")
    print(figures)
    assert truth["bursts"] >= 500, figures
    assert all(0.85 <= v <= 1.15 for v in cpu_r.values()), figures
    assert 0.94 <= wall_r["sleep"] <= 1.06, figures
    # Where ticks place the wall (ticks only, POSIX timers): a tick at a burst's start still finds
    # the thread asleep (woken, not yet run: its first read after a wake-up comes late), so its
    # first half's wall is short and the sleep's long: ticks only 0.88-0.91 and 1.03-1.05 in 4 runs
    # here, once 0.83 in a CI run on 3.12; POSIX timers 0.875-0.937 in 8 runs (the same before the
    # last changes to the sampler), once 0.838 in a suite run. Known residual; perf events' wall
    # stays within 15%.
    head_low = 0.85 if cpu_timer is None else 0.80
    assert head_low <= wall_r["phase_head"] <= 1.15 and 0.85 <= wall_r["phase_tail"] <= 1.15, figures
    if cpu_timer == "timer":
        assert st["cpu_timer_mode"] == 1 and st["tick_placed"] >= 500, figures


# --- 9. CPU without the GIL: C code and the kernel beside Python ------------------------------------
# Bursts of 0.4 ms of CPU in Python, 0.4 ms hashing 64 KiB buffers (hashlib releases the GIL) and
# 0.4 ms reading /dev/zero (a third of that part's CPU is the kernel's), then 2-4 ms asleep, 6 s at
# 1 kHz. Where the ticks place CPU (ticks only; POSIX timers) a thread read while it waits for a
# CPU counts as running only if it says so: before, only a GIL holder did, and the sampler itself,
# woken on the thread's CPU, preempts it there, in C without the GIL as often as in Python. The C
# part came out at 0.26 (POSIX timers) / 0.33 (ticks only) of its CPU, the kernel part at 0.48 /
# 0.43, Python at 1.5-1.8; now 0.90-1.11 in every mode (perf events: 0.96-1.05 before and now).
# Bands +-18% (~3.5 sigma at ~550 samples a part).
@pytest.mark.parametrize("cpu_timer", [None, "timer", "off"], ids=["default", "posix-timer", "ticks-only"])
def test_cpu_spent_without_the_gil_is_placed_where_it_was_spent(cpu_timer: str | None) -> None:
    r = run_truth("released", "--rate", "1000", "--wall-rate", "1000", "--seconds", "6", cpu_timer=cpu_timer)
    truth = r["truth"]
    cpu: dict[str, float] = defaultdict(float)
    for s in r["profile"]["stacks"]:
        if s["thread"] != "releasing":
            continue
        names = [f[0] for f in s["frames"]]
        part = next((n for n in truth["cpu"] if n in names), "other")
        cpu[part] += s["cpu"] / 1e9
    ratio = {k: cpu[k] / v for k, v in truth["cpu"].items()}
    st = r["stats"]
    figures = (f"{truth['bursts']} bursts; CPU {({k: round(v, 3) for k, v in ratio.items()})}; elsewhere "
               f"{cpu['other']:.3f} s; kernel share of in_kernel {truth['kernel_share']:.2f}; preempted: "
               f"holding the GIL {st['preempted']}, without it {st['preempted_released']}")
    print(figures)
    assert truth["bursts"] >= 800, figures
    # Ticks only: once 0.801 / 1.027 / 1.178 in a CI run on 3.13 (a thread preempted at a system
    # call's return counts as running there, see the README's known limit): +-25% in that mode
    band = 0.25 if cpu_timer == "off" else 0.18
    assert all(1 - band <= v <= 1 + band for v in ratio.values()), figures


# --- 10. A thread that blocks every signal, the profiler's included ---------------------------------
# One thread blocks every signal (signal.pthread_sigmask, as a worker leaving signals to the main
# thread does) for 3 s of bursts in masked_a (1.2 ms) and masked_b (0.6 ms) between 1-2 ms sleeps,
# then for 3 s blocks them only around 1.2 ms bursts in short_masked, each followed by 0.6 ms in
# open_c and a sleep; 1 kHz. No CPU-timer signal and no pause reaches it while it blocks them, and
# the CPU it used then went to wherever it was when it unblocked: masked_a/b came out at 0.00-0.04 of
# their CPU in every mode (open_c 2.8 when it followed them), short_masked at 0.00 with perf events
# (its CPU at the unblocking pthread_sigmask call). The ticks now place such a thread's CPU (read
# unpaused, two reads that agree): while a timer's signal is overdue, and after a timer's sample
# came as the thread unblocked it (its stack then is the unblocking call's: counted, not placed).
# With POSIX timers, asking /proc whether it blocked them before each read put the blocked stretches'
# reads ~25 us after their ticks, the open ones' at once: open_c came out at 1.035 on average (1.16
# once in CI); now it is read the same way throughout (~1.02).
# Bands: +-12% for the long-masked pair, +-15% for short_masked and open_c, +-25% for masked_a and
# masked_b each (~340-700 samples a function: 3 s each half, sd ~4% for open_c); elsewhere (the loops',
# the sleeps' and the masks' calls) at most its true CPU + 5% of the functions' (8% under the sanitizers).
# Native mode with POSIX timers: open_c at 0.07 before the ticks placed such a thread there too (its
# timer's samples, held while it blocked them, came at the unblocking call, not in open_c).
@pytest.mark.interpreter_independent
@pytest.mark.parametrize(("cpu_timer", "native"), [(None, False), ("timer", False), ("off", False), ("timer", True)],
                         ids=["default", "posix-timer", "ticks-only", "posix-timer-native"])
def test_cpu_of_a_thread_blocking_the_profilers_signal_stays_where_it_was_spent(cpu_timer: str | None,
                                                                                native: bool) -> None:
    native_arg = ["--native"] if native else []
    r = run_truth("masked", "--rate", "1000", "--wall-rate", "1000", "--seconds", "6", *native_arg, cpu_timer=cpu_timer)
    truth = r["truth"]["cpu"]
    cpu: dict[str, float] = defaultdict(float)
    for s in r["profile"]["stacks"]:
        if s["thread"] != "masking":
            continue
        names = [f[0] for f in s["frames"]]
        cpu[next((n for n in truth if n in names), "other")] += s["cpu"] / 1e9
    ratio = {k: cpu[k] / v for k, v in truth.items()}
    masked = (cpu["masked_a"] + cpu["masked_b"]) / (truth["masked_a"] + truth["masked_b"])
    in_functions = sum(truth.values())
    elsewhere = r["truth"]["thread_cpu"] - in_functions  # the loops, sleeps' and masks' calls
    st = r["stats"]
    figures = (f"CPU {({k: round(v, 3) for k, v in ratio.items()})}, long-masked pair {masked:.3f}, elsewhere "
               f"{cpu['other']:.3f} s (truth {elsewhere:.3f} s); found blocking {st['signals_blocked']}, "
               f"placed by ticks {st['sigblk_placed']}, unverified {st['unverified']}, "
               f"late timer samples {st['timer_late']}")
    print(figures)
    assert st["signals_blocked"] >= 1 and st["sigblk_placed"] > 0, figures
    if "ASAN_OPTIONS" in os.environ and cpu_timer == "off":
        # under the sanitizers ticks only read the masked thread with two reads, each several
        # times slower, against its 1.2 ms bursts: short_masked 0.55-0.92 in 8 runs, the pair
        # 0.79 on a loaded machine (0.98-1.02 in the plain build, where the bands below hold);
        # this run is for the path's memory safety
        return
    assert 0.88 <= masked <= 1.12, figures
    band = 0.20 if "ASAN_OPTIONS" in os.environ else 0.15  # 0.857 once there, ticks only (slower reads)
    assert all(abs(ratio[k] - 1) <= band for k in ("short_masked", "open_c")), figures
    assert 0.75 <= ratio["masked_a"] <= 1.25 and 0.75 <= ratio["masked_b"] <= 1.25, figures
    # where ticks place CPU, a thread found waking from its sleeps counts as running there (the
    # known limit of those modes): more so under the sanitizers, whose sampler is slower
    assert cpu["other"] <= elsewhere + (0.08 if "ASAN_OPTIONS" in os.environ else 0.05) * in_functions, figures


# --- 10b. Threads that block every signal soon after they start -------------------------------------
# 30 threads one after the other, each 5 ms in early_open, then every signal blocked and 45 ms in
# late_masked, at 2 kHz. The first tick that reads such a thread comes 0-10 ms after its start,
# often inside late_masked, when its own timer has already taken its first samples (10 with perf
# events). Before: with perf events the CPU those samples had credited was lost when that first
# reading placed the blocked stretch (threads at 0.972-0.996 of their CPU, late_masked 0.95-0.97);
# with POSIX timers (a sample each kernel tick, 4 ms) a thread kept what its few samples stood
# for, less the CPU from its last one to the stretch the ticks placed: 0.94, late_masked 0.91.
# Now every mode 1.006-1.015 (the threads' start and end are outside the truth: ~0.3 ms each),
# late_masked 0.983-0.992. early_open also holds its thread's start (the CPU before its first
# instruction of Python, placed at its first sample): 1.05-1.16 of what it measured.
@pytest.mark.interpreter_independent
@pytest.mark.parametrize("cpu_timer", [None, "timer", "off"], ids=["default", "posix-timer", "ticks-only"])
def test_threads_that_block_signals_after_starting_keep_all_their_cpu(cpu_timer: str | None) -> None:
    r = run_truth("startmasked", "--rate", "2000", "--threads", "30", cpu_timer=cpu_timer)
    truth = r["truth"]
    cpu: dict[str, float] = defaultdict(float)
    for s in r["profile"]["stacks"]:
        if s["thread"].startswith("startmasked-"):
            names = [f[0] for f in s["frames"]]
            cpu[next((n for n in truth["cpu"] if n in names), "other")] += s["cpu"] / 1e9
    total = sum(cpu.values()) / truth["thread_cpu"]
    ratio = {k: cpu[k] / v for k, v in truth["cpu"].items()}
    figures = (f"their CPU {total:.3f} of {truth['thread_cpu']:.3f} s, by function "
               f"{({k: round(v, 3) for k, v in ratio.items()})}; found blocking {r['stats']['signals_blocked']}")
    print(figures)
    slack = 0.03 if "ASAN_OPTIONS" in os.environ else 0.0  # dearer thread starts, outside the truth
    assert 0.99 <= total <= 1.04 + slack, figures
    assert 0.95 <= ratio["late_masked"] <= 1.05, figures
    assert 0.8 <= ratio["early_open"] <= 1.3 + slack, figures


# --- 11. A loop on the ticks' own cycle ---------------------------------------------------------------
# A thread on a fixed 10 ms cycle with absolute deadlines (3 ms of work, 7 ms asleep: a 100 Hz
# control or polling loop) against ticks at 100 Hz. Each tick places its wall time at the stack it
# reads, so what matters is the phase of the ticks in the loop's cycle. When each interval between
# ticks was the period +-10%, that phase drifted slowly (a random walk of ~6% of a cycle a tick):
# over 6 s the work had 14-46% of the wall for a truth of 29%, and single seconds were further off.
# Each tick is now at a random instant of its own slot of one period and stands for the slot:
# 27-32% over 6 s. A second holds 100 ticks (a 29% share has a sampling error of ~4.5 points; 64
# seconds here: sd 4.1 points, at most 12.9 off; before, 16-51 points off in every run), so +-18
# points per second is 4.4 sigma. Over 8 s: -0.5 points on average, sd 1.3 with perf events; with
# POSIX timers -2.4 (sd 1.5): their ticks find the thread asleep at its bursts' starts (see 6.).
@pytest.mark.interpreter_independent
@pytest.mark.parametrize("cpu_timer", [None, "timer"], ids=["default", "posix-timer"])
def test_a_loop_on_the_ticks_cycle_has_its_wall_time_where_it_spends_it(cpu_timer: str | None) -> None:
    r = run_truth("periodic", "--rate", "100", "--seconds", "8", "--cycle-ms", "10", cpu_timer=cpu_timer)
    windows = r["truth"]["windows"]
    shares = [(w["work"] / max(w["work"] + w["wait"], 1), w["truth_work"] / (w["truth_work"] + w["truth_wait"]))
              for w in windows]
    work = sum(w["work"] for w in windows)
    total = work + sum(w["wait"] for w in windows)
    truth_work = sum(w["truth_work"] for w in windows)
    truth_share = truth_work / (truth_work + sum(w["truth_wait"] for w in windows))
    figures = (f"work's share of the wall per second (profile, truth): "
               f"{[(round(a, 3), round(b, 3)) for a, b in shares]}; overall {work / total:.3f} "
               f"(truth {truth_share:.3f}); mode {r['stats'].get('cpu_timer_mode')}")
    print(figures)
    assert len(windows) == 8, figures
    # THEN each second's wall time is split between the work and the sleep as the thread spent it
    assert all(abs(got - true) <= 0.18 for got, true in shares), figures
    # AND so is the whole run's
    assert abs(work / total - truth_share) <= (0.06 if cpu_timer is None else 0.08), figures
