"""The pprof encoder and the files the exporter thread writes, checked by independent readers.

Every profiling run happens in a child process (a crash in the native code becomes a readable
failure, and every test gets a fresh profiler). The files the exporter writes are decoded here
with the generated protobuf classes (middleware/_proto/profile_pb2.py), not with our own reader,
and checked against every structure rule of docs/protocol.md; `go tool pprof -top` is a second,
fully independent reader.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from middleware._proto import profile_pb2 as pb
from support.fake_backend import FakeBackend

pytestmark = pytest.mark.asan

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_TYPES = [("samples", "count"), ("cpu", "nanoseconds"), ("wall", "nanoseconds")]
LABEL_KEY = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
STORE_NAME = re.compile(r"(?P<service>.+)-(?P<pid>\d+)-(?P<ms>\d+)\.pb\.gz\Z")

# The child runs outside the source tree and only appends it to sys.path, so that PYTHONPATH
# wins (make asan points it at the sanitizer build).
CHILD_PRELUDE = """
import json, os, sys, threading, time
sys.path.append({root!r})
import middleware._native as n

def mw_hot_loop(k):
    s = 0
    for i in range(k):
        s += i * i
    return s
"""


def run_child(body: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
    """Runs CHILD_PRELUDE + body (formatted with params) in a fresh interpreter; returns the JSON
    object the child prints last."""
    code = CHILD_PRELUDE.format(root=str(ROOT)) + textwrap.dedent(body).format(**params)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=tempfile.gettempdir())
    assert proc.returncode == 0, f"child failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["_stderr"] = proc.stderr[-6000:]
    return out


# --- an independent decoder with the docs/protocol.md checks ------------------------------------
@dataclass
class Decoded:
    msg: pb.Profile
    # per sample: (frames leaf first as (function, file, line), labels, values)
    samples: list[tuple[tuple[tuple[str, str, int], ...], dict[str, str], tuple[int, ...]]] = field(
        default_factory=list)

    @property
    def window(self) -> tuple[int, int]:
        return self.msg.time_nanos, self.msg.time_nanos + self.msg.duration_nanos

    def total(self, index: int, thread: str | None = None) -> int:
        return sum(v[index] for _, lab, v in self.samples if thread is None or lab["thread_name"] == thread)


def check_pprof(data: bytes) -> Decoded:
    """Decodes a gzipped pprof and asserts every structure rule of docs/protocol.md / interfaces.md."""
    assert data[:2] == b"\x1f\x8b", "profiles are gzipped"
    msg = pb.Profile()
    msg.ParseFromString(gzip.decompress(data))  # also rejects strings that are not UTF-8
    st = list(msg.string_table)
    assert st and st[0] == "", "string_table[0] must be the empty string"

    def s(i: int) -> str:
        assert 0 <= i < len(st), f"string index {i} out of range"
        return st[i]

    assert [(s(t.type), s(t.unit)) for t in msg.sample_type] == SAMPLE_TYPES
    assert s(msg.default_sample_type) == "cpu"
    assert (s(msg.period_type.type), s(msg.period_type.unit)) == ("cpu", "nanoseconds")
    assert msg.period > 0 and msg.time_nanos > 0 and msg.duration_nanos >= 0

    mappings = {m.id for m in msg.mapping}
    assert 0 not in mappings and len(mappings) == len(msg.mapping)
    functions = {}
    for f in msg.function:
        assert f.id != 0 and f.id not in functions, f"function id {f.id} zero or repeated"
        functions[f.id] = (s(f.name), s(f.filename), f.start_line)
    assert len({(n, fl) for n, fl, _ in functions.values()}) == len(functions), "functions unique by (name, file)"
    locations = {}
    for loc in msg.location:
        assert loc.id != 0 and loc.id not in locations, f"location id {loc.id} zero or repeated"
        assert loc.mapping_id == 0 or loc.mapping_id in mappings
        assert len(loc.line) == 1, "one Line per location"
        ln = loc.line[0]
        assert ln.function_id in functions
        locations[loc.id] = (ln.function_id, ln.line)
    assert len(set(locations.values())) == len(locations), "locations unique by (function, line)"

    out = Decoded(msg)
    for smp in msg.sample:
        assert len(smp.value) == len(msg.sample_type), "one value per sample type"
        assert all(v >= 0 for v in smp.value)
        frames = []
        for lid in smp.location_id:
            fid, line = locations[lid]
            name, fname, _ = functions[fid]
            frames.append((name, fname, line))
        labels: dict[str, str] = {}
        for lab in smp.label:
            key = s(lab.key)
            assert LABEL_KEY.match(key) and not key.startswith("__"), f"invalid label name {key!r}"
            assert key not in labels, f"label {key!r} repeated"
            assert lab.num == 0 and lab.num_unit == 0, "string labels only"
            labels[key] = s(lab.str)
        assert "thread_name" in labels and "pid" in labels, labels
        out.samples.append((tuple(frames), labels, tuple(smp.value)))
    return out


def go_pprof_top(path: Path | list[Path]) -> list[str]:
    """Function names of `go tool pprof -top` rows, heaviest first (asserts go accepts the input)."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("go (Debian golang-go) is not installed")
    paths = [str(p) for p in (path if isinstance(path, list) else [path])]
    env = dict(os.environ, PPROF_TMPDIR=str(Path(paths[0]).parent), HOME=str(Path(paths[0]).parent))
    proc = subprocess.run([go, "tool", "pprof", "-top", *paths], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"go tool pprof rejected {paths}:\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["flat", "flat%"])
    return [ln.split(None, 5)[5] for ln in lines[start + 1:] if len(ln.split(None, 5)) == 6]


def store_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if STORE_NAME.match(p.name))


# --- the main end-to-end run ---------------------------------------------------------------------
EXPORT_RUN = """
D = {d!r}
stop = threading.Event()
out = {{}}

def worker():
    tid = threading.get_native_id()
    n.set_thread_name(tid, "hot-worker")
    ls = n.labelset((("endpoint", "/calc"), ("__reserved", "x"), ("1bad", "x"), ("a-b", "x"),
                     ("thread_name", "spoof"), ("pid", "0"), ("endpoint", "/dup"), ("ok_key2", "v2")))
    n.set_thread_labelset(tid, ls)
    t0 = time.thread_time()
    while not stop.is_set():
        mw_hot_loop(20000)
    out["worker_cpu_ns"] = int((time.thread_time() - t0) * 1e9)

n.set_thread_name(threading.get_native_id(), "MainThread")
t_before = time.time_ns()
n.start(rate_hz=250)
started = n.export_start(interval_s=0.3, service="svc test/1", profile_dir=D, store_max_bytes=0, upload=False)
again = n.export_start(interval_s=0.3, service="svc test/1", profile_dir=D, store_max_bytes=0, upload=False)
th = threading.Thread(target=worker)
th.start()
time.sleep(1.6)
stop.set()
th.join()
flushed = n.export_flush(5.0)
n.stop()
stopped = n.export_stop(5.0)
t_after = time.time_ns()
with open({snap!r}, "wb") as f:
    f.write(n.encode_snapshot())
print(json.dumps(dict(out, pid=os.getpid(), t_before=t_before, t_after=t_after, started=started,
                      again=again, flushed=flushed, stopped=stopped, stats=n.export_stats(),
                      sampler=n.stats())))
"""


@pytest.fixture(scope="module")
def export_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("store")
    snap = tmp_path_factory.mktemp("snap") / "snapshot.pb.gz"
    r = run_child(EXPORT_RUN, d=str(d), snap=str(snap))
    r["dir"], r["snapshot"] = d, snap
    r["files"] = store_files(d)
    r["decoded"] = [check_pprof(p.read_bytes()) for p in r["files"]]
    return r


def test_export_thread_lifecycle_and_files_written(export_run):
    r = export_run
    # GIVEN a 1.6 s workload exported every 0.3 s, then a flush and a stop
    assert (r["started"], r["again"], r["flushed"], r["stopped"]) == (True, False, True, True)
    st = r["stats"]
    # THEN about one file per interval was written, each counted, none failed
    assert 4 <= len(r["files"]) <= 9, [p.name for p in r["files"]]
    assert st["files_written"] == st["exports"] == len(r["files"])
    assert st["export_errors"] == st["store_errors"] == st["encode_errors"] == 0
    assert st["bytes_written"] == sum(p.stat().st_size for p in r["files"])
    assert st["running"] == 0 and st["flushes"] >= 1
    assert 0 < st["max_export_cpu_ns"] < 2e9 and st["last_export_wall_ns"] > 0
    # no temporary file is left behind
    assert [p.name for p in r["dir"].iterdir() if p.name.startswith(".")] == []


def test_every_file_follows_the_pprof_rules(export_run):
    r = export_run
    for path, dec in zip(r["files"], r["decoded"], strict=True):
        m = STORE_NAME.match(path.name)
        assert m and m["service"] == "svc_test_1" and int(m["pid"]) == r["pid"], path.name
        # the file name carries the window start in ms
        assert int(m["ms"]) == dec.msg.time_nanos // 1_000_000
        assert dec.msg.period == 1_000_000_000 // 250
        assert r["t_before"] <= dec.window[0] <= dec.window[1] <= r["t_after"]
        for _, labels, _ in dec.samples:
            assert labels["pid"] == str(r["pid"])
    assert sum(len(d.samples) for d in r["decoded"]) > 0


def test_consecutive_windows_are_contiguous_and_do_not_overlap(export_run):
    windows = sorted(d.window for d in export_run["decoded"])
    assert len(windows) >= 4
    for (a0, a1), (b0, b1) in pairwise(windows):
        assert a0 < a1 and b0 < b1
        assert b0 == a1, f"gap or overlap between windows: {a1} -> {b0} ({(b0 - a1) / 1e6:.3f} ms)"
    # each periodic window is about one interval long (the last two come from flush and stop)
    lengths = [(b - a) / 1e9 for a, b in windows[:-2]]
    assert all(0.2 <= x <= 0.8 for x in lengths), lengths


def test_leaf_first_labels_and_skipped_label_keys(export_run):
    r = export_run
    worker = [(f, lab, v) for d in r["decoded"] for f, lab, v in d.samples if lab["thread_name"] == "hot-worker"]
    assert worker, "the worker thread was sampled"
    for frames, labels, _ in worker:
        names = [fr[0] for fr in frames]
        if names == ["[no Python frame]"]:
            continue  # on CPU while starting or ending, outside any Python frame: truthful
        # location_id[0] is the leaf: mw_hot_loop calls no Python function
        if "mw_hot_loop" in names:
            assert names.index("mw_hot_loop") == 0, names
            assert names[1] == "worker", names
        # the root is threading's bootstrap, the outermost frame
        assert "_bootstrap" in names[-1], names
        # valid pairs of the label set are kept, the first of a repeated key wins, invalid and
        # reserved keys are dropped
        assert labels == {"thread_name": "hot-worker", "pid": str(r["pid"]), "endpoint": "/calc",
                          "ok_key2": "v2"}, labels
    assert r["stats"]["labels_skipped"] >= 6
    # the main thread's samples carry no label set and end at <module>
    main = [f for d in r["decoded"] for f, lab, _ in d.samples if lab["thread_name"] == "MainThread"]
    assert main and all(f[-1][0] == "<module>" for f in main)


def test_exported_windows_add_up_to_the_cumulative_snapshot(export_run):
    r = export_run
    snap = check_pprof(r["snapshot"].read_bytes())
    # GIVEN the sampler stopped and the last window exported, the cumulative buffer holds exactly
    # the exported windows: nothing was lost or counted twice on the way
    assert r["sampler"]["overflow"] == 0
    for i in range(3):
        assert sum(d.total(i) for d in r["decoded"]) == snap.total(i), SAMPLE_TYPES[i]
    # and the worker's CPU time in the files matches what the thread really used (±20 %)
    cpu = sum(d.total(1, "hot-worker") for d in r["decoded"])
    assert 0.8 <= cpu / r["worker_cpu_ns"] <= 1.2, (cpu, r["worker_cpu_ns"])


def test_go_pprof_accepts_every_file_and_finds_the_hot_function(export_run):
    r = export_run
    for path, dec in zip(r["files"], r["decoded"], strict=True):
        top = go_pprof_top(path)
        # windows in which the worker burned CPU have it on top (its exit, CPU outside any Python
        # frame that the sampler credits once it finds the thread gone, can fall in the short
        # window between the flush and the stop, alone: that window burned nothing)
        burned = sum(v[1] for frames, lab, v in dec.samples
                     if lab["thread_name"] == "hot-worker" and [f[0] for f in frames] != ["[no Python frame]"])
        if burned > 0.5 * dec.total(1):
            assert top[0] == "mw_hot_loop", (path.name, top[:5])
    assert go_pprof_top(r["files"])[0] == "mw_hot_loop"
    assert go_pprof_top(r["snapshot"])[0] == "mw_hot_loop"


# --- encode_snapshot against the native snapshot -------------------------------------------------
def test_encode_snapshot_matches_native_snapshot_stack_by_stack(tmp_path):
    body = """
    stop = threading.Event()
    def leaf_a():
        return mw_hot_loop(30000)
    def leaf_b():
        return mw_hot_loop(10000)
    def work():
        tid = threading.get_native_id()
        # a name cut at the registry's limit in the middle of a UTF-8 sequence
        n.set_thread_name(tid, "\\u00e9" * 40)
        n.set_thread_labelset(tid, n.labelset((("endpoint", "/a"), ("span_id", "42"))))
        while not stop.is_set():
            leaf_a(); leaf_b(); (lambda: mw_hot_loop(5000))()
    n.start(rate_hz=500)
    th = threading.Thread(target=work); th.start()
    time.sleep(1.0)
    stop.set(); th.join()
    n.stop()
    rows = n.snapshot()[2]
    data = n.encode_snapshot()
    with open({out!r}, "wb") as f:
        f.write(data)
    pairs = {{}}
    for r in rows:
        if r[2]:
            pairs[r[2]] = n.labelset_pairs(r[2])
    print(json.dumps({{"rows": rows, "pairs": {{str(k): v for k, v in pairs.items()}}, "pid": os.getpid()}}))
    """
    out = tmp_path / "snap.pb.gz"
    r = run_child(body, out=str(out))
    dec = check_pprof(out.read_bytes())

    def key(frames, thread, labels):
        return (tuple(tuple(f) for f in frames), thread, tuple(sorted(labels)))

    expected: dict[Any, list[int]] = {}
    for frames, thread, ls, cpu_samples, cpu_ns, _wall_samples, wall_ns in r["rows"]:
        labels = [tuple(p) for p in r["pairs"].get(str(ls), [])]
        k = key([(fn, file, max(line, 0)) for fn, file, line in frames], thread, labels)
        acc = expected.setdefault(k, [0, 0, 0])
        for i, v in enumerate((cpu_samples, cpu_ns, wall_ns)):
            acc[i] += v
    got: dict[Any, list[int]] = {}
    for frames, labels, values in dec.samples:
        assert labels.pop("pid") == str(r["pid"])
        thread = labels.pop("thread_name")
        acc = got.setdefault(key(frames, thread, labels.items()), [0, 0, 0])
        for i, v in enumerate(values):
            acc[i] += v
    # the thread name was cut inside a UTF-8 sequence: the encoder repaired it (the protobuf
    # decoder above would have rejected invalid UTF-8), so it differs from the raw row only there
    fixed = {(k[0], k[1].replace("\ufffd", "?"), k[2]): v for k, v in expected.items()}
    assert got == fixed
    assert any(re.fullmatch("\u00e9{20,}\\?", k[1]) for k in got), {k[1] for k in got}
    leaves = {k[0][0][0] for k in got}
    assert {"mw_hot_loop"} <= leaves
    assert any(fr[0].endswith("<lambda>") for k in got for fr in k[0]), "'<lambda>' survives in names"
    assert any(dict(k[2]).get("span_id") == "42" for k in got)


# --- the uploader as a destination ---------------------------------------------------------------
def test_each_window_goes_to_store_and_uploader_as_the_same_bytes(tmp_path):
    d = tmp_path / "store"
    with FakeBackend() as backend:
        r = run_child("""
        n.upload_start(server_url={url!r}, app_name="svc", sample_rate=250)
        n.start(rate_hz=250)
        n.export_start(interval_s=0.25, service="svc", profile_dir={d!r}, upload=True)
        t = time.time()
        while time.time() - t < 1.0:
            mw_hot_loop(5000)
        n.stop()
        n.export_stop(5.0)
        n.upload_stop(10.0)
        # without a running uploader every window is an upload error, still written locally
        n.start(rate_hz=250)
        n.export_start(interval_s=0.1, service="svc2", profile_dir={d!r}, upload=True)
        mw_hot_loop(400000)
        n.stop()
        n.export_stop(5.0)
        print(json.dumps(dict(stats=n.export_stats(), upload=n.upload_stats())))
        """, url=backend.url, d=str(d))
        reqs = backend.ingests()
    st = r["stats"]
    files = {p.read_bytes(): p for p in store_files(d) if p.name.startswith("svc-")}
    assert len(files) >= 3 and r["upload"]["uploaded"] == len(reqs) == len(files)
    assert st["uploads_submitted"] == len(files)
    # THEN every upload carries exactly the bytes of one stored file, with its window in seconds
    for req in reqs:
        assert req.body in files, "uploaded body differs from every stored file"
        start, end = check_pprof(req.body).window
        assert int(req.q("from")) == start // 10**9
        assert int(req.q("until")) == max(-(-end // 10**9), start // 10**9 + 1)
    # and the second run, with no uploader, counted its windows as upload errors
    svc2 = [p for p in store_files(d) if p.name.startswith("svc2-")]
    assert svc2 and st["upload_errors"] == len(svc2)
    assert st["export_errors"] == st["upload_errors"]
