"""A window whose tables fill up (per-request labels, generated code) keeps every sample's time:
past the stack table, samples keep their stack without their labels, then go under
"[stack table full]"; past the frame table, a stack is cut where a frame could not be named,
under "[frame table full]" — never a stack with a frame skipped. The truth is measured in the
child: each function's thread_time. The tables are made small (start(max_stacks=, max_frames=))
so that a short run fills them."""
from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from test_pprof_export import check_pprof, run_child, store_files

pytestmark = pytest.mark.asan

WORKLOAD = """
n.start(rate_hz=1000, max_stacks={stacks}, max_frames={frames})
if {native}:
    n.unwind_enable(False)
n.export_start(interval_s=60.0, service="svc", profile_dir={d!r})
labelsets = [n.labelset([("request", str(i))]) for i in range(3000)]
truth = {{}}
lock = threading.Lock()

def burn(s):
    end = time.thread_time() + s
    while time.thread_time() < end:
        pass

def part_a(): burn(0.0003)
def part_b(): burn(0.0006)
def part_c(): burn(0.0009)

# generated functions: each a code object (and frames) of its own
GEN = []
for i in range({generated}):
    ns = {{"burn": burn}}
    exec(compile(f"def gen_{{i}}():\\n    burn(0.0002)\\n", f"<gen {{i}}>", "exec"), ns)
    GEN.append(ns[f"gen_{{i}}"])

def call_generated(i):
    GEN[i % len(GEN)]()

def worker(k):
    tid = threading.get_native_id()
    n.set_thread_name(tid, f"w{{k}}")
    mine = {{}}
    start = time.monotonic()
    end = start + {seconds}
    i = 0
    while time.monotonic() < end:
        n.set_thread_labelset(tid, labelsets[(k * 1000 + i) % len(labelsets)])  # a request each time
        if GEN:
            f, arg = call_generated, i
        elif time.monotonic() - start < {seconds} / 2:  # first half: part_a and part_c
            f, arg = (part_a, part_c)[i % 2], None
        else:  # second half, once the table is full: part_b
            f, arg = part_b, None
        t0 = time.thread_time()
        f(arg) if arg is not None else f()
        mine[f.__name__] = mine.get(f.__name__, 0.0) + time.thread_time() - t0
        i += 1
    n.set_thread_labelset(tid, 0)
    with lock:
        for key, v in mine.items():
            truth[key] = truth.get(key, 0.0) + v

ths = [threading.Thread(target=worker, args=(k,), name=f"w{{k}}") for k in range(3)]
for t in ths: t.start()
for t in ths: t.join()
n.stop()
n.export_flush(10.0)
n.export_stop(10.0)
print(json.dumps(dict(truth=truth, stats=n.stats())))
"""


def _profile(tmp_path: Path, **params: Any) -> tuple[dict[str, Any], list[Any]]:
    d = tmp_path / "store"
    r = run_child(WORKLOAD, timeout=120, d=str(d), **params)
    samples = [s for p in store_files(d) for s in check_pprof(p.read_bytes()).samples
               if s[1]["thread_name"].startswith("w")]
    return r, samples


def _full_lines(r: dict[str, Any]) -> list[str]:
    return [line for line in r["_stderr"].splitlines() if "tables are full" in line]


def test_a_full_stack_table_keeps_each_functions_cpu_with_fewer_labels(tmp_path):
    # GIVEN three threads switching to a new request label every 0.3-0.9 ms of CPU, at 1 kHz, in a
    # window whose stack table holds 600 entries: full within the first half of the run, after
    # which the threads run a function they had not run before
    r, samples = _profile(tmp_path, stacks=600, frames=0, generated=0, seconds=2.0, native=False)
    st, truth = r["stats"], r["truth"]
    # THEN the table filled, and the samples past it were kept, none dropped
    assert st["overflow"] > 0 and st["overflow_kept"] > 0, st
    assert st["dropped"] == 0, st
    # AND each function's CPU in the profile matches its thread_time: nothing was lost or moved (a
    # dropped sample's CPU went to the window's other samples: part_b's to part_a and part_c)
    cpu = {name: sum(v[1] for frames, _, v in samples if any(f[0] == name for f in frames)) / 1e9
           for name in ("part_a", "part_b", "part_c")}
    total_truth = sum(truth.values())
    profiled = sum(v[1] for _, _, v in samples) / 1e9
    figures = f"profile {cpu} of {profiled:.3f} s, truth {truth} of {total_truth:.3f} s, stats {st}"
    assert 0.9 <= profiled / total_truth <= 1.15, figures
    for name in cpu:
        assert abs(cpu[name] / profiled - truth[name] / total_truth) <= 0.05, figures
    # AND the samples past the table carry no request label (or sit under the marker), the others do
    unlabelled = sum(v[1] for _, lab, v in samples if "request" not in lab)
    assert 0 < unlabelled < profiled * 1e9, figures
    assert all("request" not in lab for frames, lab, _ in samples if frames[0][0] == "[stack table full]")
    # AND it was said once on stderr
    assert len(_full_lines(r)) == 1, r["_stderr"]


@pytest.mark.parametrize("native", [False, True], ids=["python", "native"])
def test_a_full_frame_table_cuts_stacks_under_a_marker_and_never_skips_a_frame(tmp_path, native):
    # GIVEN 400 generated functions called in turn at 1 kHz, in a window whose frame table holds
    # 150 frames (a code-generating app: templates, ORMs, lambdas); with native frames too
    r, samples = _profile(tmp_path, stacks=0, frames=150, generated=400, seconds=2.0, native=native)
    st, truth = r["stats"], r["truth"]
    assert st["overflow_kept"] > 0 and st["dropped"] == 0, st
    # THEN every stack is a true stack: each caller -> callee pair is one the code makes, and a
    # stack cut at a full table ends in "[frame table full]" under true outer frames
    caller_of = {"call_generated": "worker", "gen_": "call_generated", "burn": "gen_"}
    cut = 0
    for frames, _, v in samples:
        names = ["gen_" if f[0].startswith("gen_") else f[0] for f in frames]  # leaf first
        if names and names[0] == "[frame table full]":
            cut += v[1]
            names = names[1:]
        if names and names[0] in ("[no Python frame]", "[stack table full]"):
            continue
        for callee, caller in pairwise(names):
            assert caller_of.get(callee, caller) == caller, (names, caller, callee)
    assert cut > 0, "no stack was cut: the table did not fill"
    if native:  # C frames were taken (the leaf under burn: time.thread_time's clock_gettime)
        assert any(".so" in f[1] for frames, _, _ in samples for f in frames), samples[:3]
    # AND the CPU is all there
    profiled = sum(v[1] for _, _, v in samples) / 1e9
    assert 0.9 <= profiled / sum(truth.values()) <= 1.15, (profiled, truth, st)
    assert len(_full_lines(r)) == 1, r["_stderr"]
