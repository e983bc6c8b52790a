"""Our profiler next to its peers: the same workloads under each, ratios side by side.

For every workload (bench/peer_workloads.py: calc, deep, threads, callgraph), sampling rate (100
and 1000 Hz) and profiler (middleware; py-spy, blocking and --nonblocking; austin; pyroscope-io;
ddtrace), each round runs the workload once unprofiled and once under every profiler, in an order
that rotates from round to round, each run a fresh interpreter doing the same fixed work (the
repetitions measured in a calibration run). Reported per row:

* wall ratio: the measured window's wall time, profiled / unprofiled of the same round (median
  over the rounds);
* CPU ratio: the window's process CPU (all threads, so an in-process profiler's threads count),
  plus, for py-spy and austin, the CPU the profiler process spent during the window (read from
  /proc by the workload, whose parent the profiler is), over the unprofiled window's CPU (median);
* impossible %: of the samples holding a workload function (all rounds pooled), those whose stack
  pairs a caller with a callee that the workload's static call graph (peer_workloads.GRAPH) does
  not have; rootless %: those whose outermost frame is not the script's module or a thread's
  bootstrap (a truncated or torn stack);
* samples: per run (median), the samples holding a workload function (all threads, the measured
  window); ours: the sampler's count of stacks read in the window (its profile weighs stacks by
  time);
* own µs/sample: the profiler's own CPU per sample (median): ours from tracker.stats()
  (sampler_cpu_ns + handler_ns over the stacks read at ticks and by the CPU-timer handlers, in the
  window), ddtrace from its own counters (whole run),
  py-spy and austin from their process's CPU in the window, pyroscope from its threads' CPU in
  the window (both from /proc), over the window's samples.

A row whose wall ratio is above 3 after 3 pairs gets no more rounds (it is far from the noise).
Each run is bounded in time (30 s + 8 x the unprofiled length); a timeout ends its row.

Stacks come from py-spy's raw (folded) output, austin's text output, our tracker.snapshot(),
ddtrace's local pprof files (DD_PROFILING_OUTPUT_PPROF, zstd) and pyroscope-io's pushes, which a
collector on loopback started here receives and decodes. A peer that is missing, fails or times
out shows as "n/a (reason)".

    .venv-bench/bin/python bench/peers.py [--quick] [--rounds 7] [--seconds 1]
        [--workloads calc,deep,threads,callgraph] [--profilers ...] [--rates 100,1000] [--json FILE]

scripts/bench-venv.sh makes .venv-bench (the peers, pinned in bench/requirements-peers.txt);
`make peers` does both and runs the full bench.
"""

from __future__ import annotations

import argparse
import glob
import http.server
import importlib.metadata
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import peer_workloads as wl  # noqa: E402

WORKLOAD_SCRIPT = os.path.join(ROOT, "bench", "peer_workloads.py")
ALL_WORKLOADS = ["calc", "deep", "threads", "callgraph"]
ALL_PROFILERS = ["middleware", "py-spy", "py-spy-nb", "austin", "pyroscope", "ddtrace"]
DISTRIBUTIONS = {"py-spy": "py-spy", "py-spy-nb": "py-spy", "austin": "austin-dist", "pyroscope": "pyroscope-io",
                 "ddtrace": "ddtrace"}

Stacks = list[tuple[list[tuple[str, str]], int]]  # [([(file basename, function), ...root->leaf], count)]


class PeerError(Exception):
    """A profiler could not run or its output could not be read; the message is the reason."""


# --- stack parsing ---------------------------------------------------------------------------------
def _norm(function: str) -> str:
    """``Class.method`` / ``outer.<locals>.inner`` -> the code object's own name."""
    return function.rsplit(".", 1)[-1] if not function.startswith("<") else function


_FOLDED_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def parse_folded(path: str) -> Stacks:
    """py-spy's raw format (and ours): ``func (file:line);... count`` per line."""
    out: Stacks = []
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = []
            for fr in stack.split(";"):
                m = _FOLDED_FRAME.match(fr)
                name, file = (m.group(1), m.group(2)) if m else (fr, "")
                frames.append((os.path.basename(file), _norm(name)))
            out.append((frames, int(count)))
    return out


def parse_austin(path: str) -> Stacks:
    """austin 3's text format: ``P<pid>;T<iid>:<tid>;file:function:line;... metric``, one sample a line."""
    out: Stacks = []
    with open(path, errors="replace") as f:
        for line in f:
            if not line.startswith("P"):
                continue
            stack, _, _metric = line.rstrip("\n").rpartition(" ")
            parts = stack.split(";")[2:]
            frames = []
            for fr in parts:
                bits = fr.rsplit(":", 2)
                if len(bits) == 3:
                    frames.append((os.path.basename(bits[0]), _norm(bits[1])))
                else:
                    frames.append(("", fr))
            out.append((frames, 1))
    return out


def stacks_from_profiles(profiles: Iterable[Any], value_names: tuple[str, ...]) -> Stacks:
    """Parsed pprof profiles -> stacks weighted by sample count: the first of ``value_names``
    present, else a ``count`` sample type, else the first value divided by the period (a profile
    of CPU nanoseconds only, as pyroscope-io pushes)."""
    out: Stacks = []
    for p in profiles:
        names = [t for t, _ in p.sample_types]
        idx = next((names.index(n) for n in value_names if n in names), None)
        if idx is None:
            idx = next((i for i, (_t, unit) in enumerate(p.sample_types) if unit == "count"), None)
        per = 1
        if idx is None:
            idx, per = 0, max(1, int(p.period))
        for s in p.samples:
            n = int(round(s.values[idx] / per))
            if n > 0:
                out.append(([(os.path.basename(fr.file), _norm(fr.function)) for fr in s.stack], n))
    return out


def parse_ddtrace(prefix: str) -> Stacks:
    from middleware.pprof import parse_pprof

    try:
        import zstandard
    except ImportError as exc:
        raise PeerError(f"zstandard missing to read ddtrace's pprof: {exc}") from None
    profiles = []
    for fn in sorted(glob.glob(prefix + ".*.pprof")):
        with open(fn, "rb") as f:
            raw = f.read()
        if raw[:4] == b"\x28\xb5\x2f\xfd":
            raw = zstandard.ZstdDecompressor().stream_reader(raw).read()
        profiles.append(parse_pprof(raw, fn))
    if not profiles:
        raise PeerError("ddtrace wrote no pprof file")
    return stacks_from_profiles(profiles, ("wall-samples", "cpu-samples"))


@dataclass
class StackCheck:
    samples: int = 0  # all samples
    own: int = 0  # samples holding a workload function
    impossible: int = 0
    rootless: int = 0
    bad_edges: Counter[str] = field(default_factory=Counter)


def check_stacks(stacks: Stacks) -> StackCheck:
    """Count the samples whose stacks break the static call graph of the workloads."""
    res = StackCheck()
    graph = wl.GRAPH
    for frames, n in stacks:
        res.samples += n
        own = [(f[0] in wl.OWN_FILES) for f in frames]
        if not any(o and frames[i][1] in graph for i, o in enumerate(own)):
            continue
        res.own += n
        bad = None
        for i in range(len(frames) - 1):
            caller, callee = frames[i][1], frames[i + 1][1]
            if own[i] and own[i + 1] and caller in graph and callee not in graph[caller]:
                bad = f"{caller}->{callee}"
                break
        if bad:
            res.impossible += n
            res.bad_edges[bad] += n
        if frames[0][1] not in wl.ROOT_FUNCTIONS:
            res.rootless += n
    return res


# --- the pyroscope collector (loopback) ------------------------------------------------------------
def decode_push_loosely(headers: dict[str, str], body: bytes) -> list[tuple[str, Any]]:
    """A push.v1.PushRequest -> [(service_name, parsed pprof)], every label accepted.

    (The bench only needs the stacks: it keeps its own small decoder rather than running a
    whole `serve` next to the workloads it measures.)
    """
    import gzip

    from middleware._proto.push_pb2 import PushRequest
    from middleware.pprof import parse_pprof

    if headers.get("content-encoding", "").lower() in ("gzip", "x-gzip"):
        body = gzip.decompress(body)
    request = PushRequest()
    request.ParseFromString(body)
    out = []
    for series in request.series:
        service = next((lp.value for lp in series.labels if lp.name == "service_name"), "")
        for raw in series.samples:
            data = bytes(raw.raw_profile)
            out.append((service, parse_pprof(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)))
    return out


class PushCollector:
    """Receives pyroscope-io's pushes on 127.0.0.1 and keeps the decoded profiles per service."""

    def __init__(self) -> None:
        self.profiles: dict[str, list[Any]] = {}
        self.errors: list[str] = []
        lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    got = decode_push_loosely(headers, body)
                    with lock:
                        for service, profile in got:
                            collector.profiles.setdefault(service, []).append(profile)
                    self.send_response(200)
                    self.send_header("Content-Type", headers.get("content-type") or "application/proto")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except Exception as exc:  # a bad push is a measurement problem, not a crash
                    with lock:
                        collector.errors.append(f"{self.path}: {exc}")
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="push-collector", daemon=True)
        self.thread.start()

    def take(self, service: str, wait: float = 2.0) -> list[Any]:
        deadline = time.monotonic() + wait
        while service not in self.profiles and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.profiles.pop(service, [])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- running ----------------------------------------------------------------------------------------
@dataclass
class Env:
    python: str
    tools: dict[str, str]  # profiler -> binary path (py-spy, austin)
    unavailable: dict[str, str]  # profiler -> reason
    versions: dict[str, str]
    collector: PushCollector | None
    tmp: str
    seconds: float
    run_id: int = 0


def find_tool(name: str) -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.access(here, os.X_OK) else shutil.which(name)


def discover(profilers: list[str], tmp: str, seconds: float) -> Env:
    env = Env(python=sys.executable, tools={}, unavailable={}, versions={}, collector=None, tmp=tmp,
              seconds=seconds)
    for prof in profilers:
        dist = DISTRIBUTIONS.get(prof)
        if dist:
            try:
                env.versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                env.unavailable[prof] = f"{dist} not installed (scripts/bench-venv.sh)"
                continue
        if prof in ("py-spy", "py-spy-nb", "austin"):
            tool = find_tool("py-spy" if prof.startswith("py-spy") else "austin")
            if not tool:
                env.unavailable[prof] = "binary not found"
                continue
            try:
                subprocess.run([tool, "--version"], capture_output=True, timeout=20, check=True)
            except (OSError, subprocess.SubprocessError) as exc:
                env.unavailable[prof] = f"{os.path.basename(tool)} --version failed: {exc}"[:80]
                continue
            env.tools[prof] = tool
        elif prof in ("pyroscope", "ddtrace", "middleware"):
            mod = {"pyroscope": "pyroscope", "ddtrace": "ddtrace.profiling", "middleware": "middleware._native"}[prof]
            p = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True, timeout=120,
                               env=child_env())
            if p.returncode != 0:
                last = (p.stderr.strip().splitlines() or ["import failed"])[-1]
                env.unavailable[prof] = f"import {mod}: {last}"[:100]
                continue
        if prof == "pyroscope":
            try:
                env.collector = PushCollector()
            except Exception as exc:
                env.unavailable[prof] = f"no loopback collector: {exc}"[:80]
    return env


def child_env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("MW_PEER_PROFILER", None)
    e["MW_PROFILE_DIR"] = "none"
    e.update(extra)
    return e


def load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def error_line(stderr: str) -> str:
    """The line of a failed run's stderr that says why (ANSI colours removed)."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", stderr).splitlines() if ln.strip()]
    why = [ln for ln in lines if re.search(r"error|exception|not a python|looks like|cannot|denied", ln, re.I)]
    return (why or lines or ["no output"])[-1]


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_once(env: Env, workload: str, profiler: str, rate: int, reps: int | None, seconds: float | None = None,
             timeout: float = 60.0) -> dict[str, Any]:
    """One fresh interpreter; returns the workload's result plus the profiler's samples/stacks."""
    env.run_id += 1
    rid = env.run_id
    result = os.path.join(env.tmp, f"r{rid}.json")
    out = os.path.join(env.tmp, f"r{rid}.prof")
    wargs = [env.python, WORKLOAD_SCRIPT, workload, "--rate", str(rate), "--result", result]
    wargs += ["--reps", str(reps)] if reps is not None else ["--seconds", str(seconds)]
    extra: dict[str, str] = {}
    if profiler in ("none", "middleware", "pyroscope", "ddtrace"):
        cmd = wargs + ["--profiler", profiler]
        if profiler == "middleware":
            cmd += ["--stacks", out]
        elif profiler == "pyroscope":
            assert env.collector is not None
            extra = {"MW_PEER_PYROSCOPE_URL": env.collector.url, "MW_PEER_PYROSCOPE_APP": f"peers-{rid}"}
        elif profiler == "ddtrace":
            extra = {"MW_PEER_DDTRACE_OUT": out}
    elif profiler in ("py-spy", "py-spy-nb"):
        cmd = [env.tools[profiler], "record", "--rate", str(rate), "-o", out, "--format", "raw"]
        if profiler == "py-spy-nb":
            cmd.append("--nonblocking")
        cmd += ["--"] + wargs + ["--external"]
    elif profiler == "austin":
        # -t: how long austin waits for the new interpreter to show up (100 ms by default: too short
        # on a loaded machine, where it then gives up with "not a Python process")
        cmd = [env.tools[profiler], "-s", "-t", "3000", "-i", str(max(1, 1_000_000 // rate)), "-o", out]
        cmd += wargs + ["--external"]
    else:
        raise PeerError(f"unknown profiler {profiler}")
    before = children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(**extra),
                            start_new_session=True, cwd=env.tmp)
    try:
        _stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session we started: the profiler and the workload
        proc.communicate()
        bound = f", wall ratio > {timeout / env.seconds:.0f}" if reps is not None else ""
        raise PeerError(f"timeout after {timeout:.0f} s{bound}") from None
    lifetime = time.perf_counter() - t0
    total_cpu = children_cpu() - before
    if not os.path.exists(result):
        raise PeerError(f"exit {proc.returncode}: {error_line(stderr or '')}"[:100])
    with open(result) as f:
        res: dict[str, Any] = json.load(f)
    res["lifetime"] = lifetime
    if profiler == "none":
        return res
    # the profiler's stacks
    stacks: Stacks | None = None
    note = ""
    if profiler == "middleware":
        stacks = parse_folded(out)
        st = res.get("stats_window", {})
        if st.get("samples"):
            # the sampler thread's CPU and the CPU-timer handlers' time in the app threads, over
            # the stacks read at ticks and by the handlers
            read = st["samples"] + st.get("timer_samples", 0)
            res["own_us_per_sample"] = (st["sampler_cpu_ns"] + st.get("handler_ns", 0)) / read / 1e3
        counted = res.get("stats", {}).get("samples", 0)
        held = sum(n for _, n in stacks)
        if counted and held < 0.8 * counted - 2:  # (stacks are counted by wall time: late ticks weigh more)
            note = f"snapshot held {held} of {counted} samples"
    elif profiler in ("py-spy", "py-spy-nb", "austin"):
        if not os.path.exists(out):
            raise PeerError(f"{profiler} wrote no output (exit {proc.returncode})")
        stacks = parse_folded(out) if profiler.startswith("py-spy") else parse_austin(out)
        res["profiler_cpu_total"] = total_cpu - res.get("self_cpu_total", 0.0)
    elif profiler == "ddtrace":
        stacks = parse_ddtrace(out)
        meta = res.get("ddtrace", {})
        if meta.get("sample_count"):
            res["own_us_per_sample"] = meta.get("sample_capture_cpu_time_us", 0) / meta["sample_count"]
    elif profiler == "pyroscope":
        assert env.collector is not None
        profiles = env.collector.take(f"peers-{rid}")
        if profiles:
            stacks = stacks_from_profiles(profiles, ("samples",))
        else:
            note = "nothing pushed"
    if stacks is not None:
        chk = check_stacks(stacks)
        res["check"] = {"samples": chk.samples, "own": chk.own, "impossible": chk.impossible,
                        "rootless": chk.rootless, "bad_edges": dict(chk.bad_edges.most_common(5))}
        # the profiler's CPU in the window over the samples taken in it (those holding a workload
        # function): its process for py-spy/austin, its own threads for pyroscope
        window_cpu = res.get("ext_cpu") if "ext_cpu" in res else (
            sum(res.get("agent_threads_cpu", {}).values()) if profiler == "pyroscope" else None)
        if window_cpu is not None and chk.own:
            res["own_us_per_sample"] = window_cpu / chk.own * 1e6
        res["window_samples"] = chk.own
    if profiler == "middleware" and res.get("stats_window", {}).get("samples"):
        # exact (its stacks are weighted by time): the stacks read at ticks and by the CPU timers
        st = res["stats_window"]
        res["window_samples"] = st["samples"] + st.get("timer_samples", 0)
    if note:
        res["note"] = note
    for p in glob.glob(out + "*"):
        try:
            os.remove(p)
        except OSError:
            pass
    return res


def calibrate(env: Env, workload: str) -> int:
    res = run_once(env, workload, "none", 100, None, seconds=env.seconds, timeout=60 + 5 * env.seconds)
    return max(1, int(res["reps"]))


def settled(cell: dict[str, Any]) -> bool:
    """A row far from the noise (wall ratio > 3 in 3 pairs) needs no more rounds."""
    pairs = cell["pairs"]
    return len(pairs) >= 3 and statistics.median(on["wall"] / off["wall"] for off, on in pairs) > 3


# --- reporting --------------------------------------------------------------------------------------
def fmt_ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}" if values else "-"


def summarize(cell: dict[str, Any]) -> dict[str, str]:
    """One table row from the runs of one (workload, rate, profiler)."""
    pairs = cell["pairs"]  # [(off result, on result)]
    if not pairs:
        return {"error": cell.get("error") or "no run"}
    wall = [on["wall"] / off["wall"] for off, on in pairs if off["wall"] > 0]
    cpu = [(on["cpu"] + on.get("ext_cpu", 0.0)) / off["cpu"] for off, on in pairs if off["cpu"] > 0]
    checks = [on["check"] for _, on in pairs if "check" in on]
    own = sum(c["own"] for c in checks)
    row = {"wall": fmt_ratio(wall), "cpu": fmt_ratio(cpu)}
    if checks and own:
        row["impossible"] = f"{100.0 * sum(c['impossible'] for c in checks) / own:.2f}"
        row["rootless"] = f"{100.0 * sum(c['rootless'] for c in checks) / own:.2f}"
        counts = [on["window_samples"] for _, on in pairs if "window_samples" in on]
        row["samples"] = f"{statistics.median(counts):.0f}" if counts else "-"
    else:
        notes = {on.get("note", "") for _, on in pairs} - {""}
        row["impossible"] = row["rootless"] = f"n/a ({', '.join(sorted(notes)) or 'no stacks'})"
        row["samples"] = "-"
    per = [on["own_us_per_sample"] for _, on in pairs if "own_us_per_sample" in on]
    row["own"] = f"{statistics.median(per):.1f}" if per else "-"
    if cell.get("error"):
        row["note"] = f"{len(pairs)} pair(s), then: {cell['error']}"
    elif cell.get("failures"):
        row["note"] = f"1 run failed: {cell['failures'][0]}"
    if any(on.get("note") for _, on in pairs):
        row["note"] = (row.get("note", "") + " " + "; ".join(sorted({on["note"] for _, on in pairs
                                                                        if on.get("note")}))).strip()
    return row


def print_table(cells: dict[tuple[str, int, str], dict[str, Any]], workloads: list[str], rates: list[int],
                profilers: list[str], unavailable: dict[str, str]) -> None:
    head = ["workload", "rate", "profiler", "wall ratio", "CPU ratio", "impossible %", "rootless %", "samples",
            "own µs/sample"]
    rows = []
    for w in workloads:
        for r in rates:
            for p in profilers:
                if p in unavailable:
                    rows.append([w, str(r), p, f"n/a ({unavailable[p]})"])
                    continue
                s = summarize(cells[(w, r, p)])
                if "error" in s:
                    rows.append([w, str(r), p, f"n/a ({s['error']})"])
                    continue
                row = [w, str(r), p, s["wall"], s["cpu"], s["impossible"], s["rootless"], s["samples"], s["own"]]
                if s.get("note"):
                    row.append(s["note"])
                rows.append(row)
    widths = [len(h) for h in head]
    for row in rows:
        for i, cell in enumerate(row[:len(head)] if len(row) > 4 else row[:3]):
            widths[i] = max(widths[i], len(cell))
    print("  ".join(h.ljust(widths[i]) for i, h in enumerate(head)))
    for row in rows:
        if len(row) == 4:  # n/a spans the rest
            print("  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3])
        else:
            line = "  ".join(row[i].ljust(widths[i]) for i in range(len(head)))
            print(line + ("  " + row[len(head)] if len(row) > len(head) else ""))


# --- main ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of ~0.4 s runs (~2-3 minutes)")
    ap.add_argument("--rounds", type=int, default=None, help="profiled/unprofiled pairs per row (default 7)")
    ap.add_argument("--seconds", type=float, default=None, help="length of an unprofiled run (default 1)")
    ap.add_argument("--workloads", default=",".join(ALL_WORKLOADS))
    ap.add_argument("--profilers", default=",".join(ALL_PROFILERS))
    ap.add_argument("--rates", default="100,1000")
    ap.add_argument("--json", default=None, help="also write every run's result to this file")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 7)
    seconds = args.seconds or (0.4 if args.quick else 1.0)
    workloads = [w for w in args.workloads.split(",") if w]
    profilers = [p for p in args.profilers.split(",") if p]
    rates = [int(r) for r in args.rates.split(",") if r]
    for w in workloads:
        if w not in ALL_WORKLOADS:
            raise SystemExit(f"unknown workload {w!r} (choose from {', '.join(ALL_WORKLOADS)})")
    for p in profilers:
        if p not in ALL_PROFILERS:
            raise SystemExit(f"unknown profiler {p!r} (choose from {', '.join(ALL_PROFILERS)})")

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mw-peers-") as tmp:
        env = discover(profilers, tmp, seconds)
        active = [p for p in profilers if p not in env.unavailable]
        print(f"peers bench: CPython {sys.version.split()[0]} ({sys.executable}), {rounds} round(s), "
              f"~{seconds:g} s per unprofiled run, {os.cpu_count()} CPUs, load average {load()}")
        print("  versions: " + (", ".join(f"{k} {v}" for k, v in sorted(env.versions.items())) or "no peers"))
        for p, why in env.unavailable.items():
            print(f"  {p}: n/a ({why})")

        # the static call graph must hold every edge the workloads really take
        for w in workloads:
            p = subprocess.run([env.python, WORKLOAD_SCRIPT, w, "--verify-graph", "--reps", "2"], capture_output=True,
                               text=True, timeout=300, env=child_env(), cwd=tmp)
            v = json.loads(p.stdout) if p.returncode == 0 and p.stdout.strip() else {"undeclared": ["(failed)"]}
            if v["undeclared"]:
                raise SystemExit(f"{w}: the static call graph lacks edges the workload takes: {v['undeclared']}")
        reps = {w: calibrate(env, w) for w in workloads}
        print("  repetitions per run: " + ", ".join(f"{w} {n}" for w, n in reps.items()))
        timeout = 30 + 8 * seconds

        cells: dict[tuple[str, int, str], dict[str, Any]] = {
            (w, r, p): {"pairs": [], "error": None, "failures": []} for w in workloads for r in rates
            for p in profilers}
        log: list[dict[str, Any]] = []
        for rnd in range(rounds):
            for gi, (w, r) in enumerate((w, r) for w in workloads for r in rates):
                todo = ["none"] + [p for p in active if cells[(w, r, p)]["error"] is None
                                   and not settled(cells[(w, r, p)])]
                k = (rnd + gi) % len(todo)
                order = todo[k:] + todo[:k]  # rotate: the unprofiled run moves through the round
                results: dict[str, dict[str, Any]] = {}
                for p in order:
                    try:
                        results[p] = run_once(env, w, p, r, reps[w], timeout=timeout)
                    except Exception as exc:  # PeerError, or a parser surprise: never the end of the bench
                        why = str(exc) if isinstance(exc, PeerError) else f"{type(exc).__name__}: {exc}"
                        why = why.replace(ROOT + os.sep, "")[:100]
                        if p == "none":
                            print(f"  the unprofiled {w} run failed ({why}): round {rnd + 1} skipped for it")
                            continue
                        cell = cells[(w, r, p)]
                        cell["failures"].append(why)
                        # a timeout, or a second failure, ends the row (a first one may be passing)
                        if why.startswith("timeout") or len(cell["failures"]) >= 2:
                            cell["error"] = why
                for p, res in results.items():
                    log.append({"round": rnd, "workload": w, "rate": r, **res, "profiler": p})
                    if p != "none" and "none" in results:
                        cells[(w, r, p)]["pairs"].append((results["none"], res))
            print(f"  round {rnd + 1}/{rounds} done ({time.monotonic() - t_start:.0f} s)", flush=True)
        if env.collector:
            env.collector.close()
            if env.collector.errors:
                print(f"  pyroscope collector: {len(env.collector.errors)} push(es) refused, first: "
                      f"{env.collector.errors[0][:120]}")

    print()
    print_table(cells, workloads, rates, profilers, env.unavailable)
    print()
    print("wall/CPU ratio: profiled/unprofiled medians of the per-round pairs (CPU includes py-spy's and austin's "
          "own process);")
    print("impossible %: samples with a caller->callee pair absent from the static graph; rootless %: outermost "
          "frame not <module>/_bootstrap;")
    print("samples: per run, in the window. own µs/sample: the profiler's own CPU per sample (see --help).")
    print("py-spy: record (pauses the process per sample), py-spy-nb: record --nonblocking; austin -s (on-CPU); "
          "pyroscope: its pushes decoded by a collector on loopback; ddtrace: stack collector only, adaptive "
          "sampling off, local pprof.")
    worst: Counter[str] = Counter()
    for (w, _r, p), cell in cells.items():
        for _, on in cell["pairs"]:
            for edge, n in on.get("check", {}).get("bad_edges", {}).items():
                worst[f"{p} {w} {edge}"] += n
    if worst:
        print("most frequent impossible edges: " + "; ".join(f"{k} ({n})" for k, n in worst.most_common(6)))
    print(f"total {time.monotonic() - t_start:.0f} s, load average now {load()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(log, f, indent=1)


if __name__ == "__main__":
    main()
