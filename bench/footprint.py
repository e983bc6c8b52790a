"""What does the profiler cost a process outside the sampling loop: memory and start-up time.

    .venv/bin/python bench/footprint.py [--runs 7] [--seconds 1.0] [--detail] [--no-importtime]
                                          [--setting MW_NAME=VALUE]

Every measurement is taken in a fresh interpreter. Each run starts one child per variant, in an
order that rotates from run to run, and the table shows the median over the runs:

- ``app``: the imports of a typical service (stdlib: json, logging, re, threading, dataclasses,
  datetime, pathlib, urllib.parse, ...) and a CPU-bound workload (a ~30-deep recursion) for
  ``--seconds``; no profiler.
- ``mw``: the same plus ``from middleware import MwTracker; MwTracker(profile_dir=<tmp>)`` with
  the default settings and no backend configured (local store only: the uploader module,
  middleware._upload, and libcurl with its libraries are not loaded; the table says in how many
  children libcurl was mapped).
- ``mw upload=False``: the same with ``MwTracker(profile_dir=<tmp>, upload=False)``.
- ``bare`` / ``bare mw``: an interpreter that imported nothing but ``site``, without and with the
  tracker (start-up time of ``import middleware`` when nothing else is loaded yet);
  ``bare std``: the same importing only the standard-library modules that middleware needs
  (logging, dataclasses, typing, ...), the floor under the tracker's cost in a bare interpreter.

Children run with a bytecode cache (``PYTHONPYCACHEPREFIX`` in the temporary directory, filled by
one warm-up child per variant), as an installed package would. Memory is read in the child from
``/proc/self/status`` (VmRSS) and ``/proc/self/smaps_rollup`` (PSS; USS = Private_Clean +
Private_Dirty) after the workload ran for ``--seconds`` under the sampler, again after
``tracker.flush()`` (the first export: pprof encoding, gzip, store write), and after half as much
work again and a second export (buffers rotated and reset once: closer to the steady state). Times
are ``perf_counter`` around ``import middleware`` and around ``MwTracker(...)`` (construction + start:
sampler, exporter, hooks). ``--detail`` attributes the tracker's memory to
mappings (shared libraries loaded by the extension, anonymous mappings by size, the heap), diffing
``/proc/self/smaps`` phase by phase inside one child (import, extension load, start, sampling,
first and second export), with glibc's ``mallinfo2`` counters.
``python -X importtime`` then lists the modules that ``import middleware`` + ``MwTracker()``
import on top of the typical app's, slowest first.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What a typical (non-asyncio) Python service has imported before it starts the profiler.
TYPICAL_IMPORTS = (
    "json", "logging", "re", "threading", "typing", "dataclasses", "datetime", "collections",
    "functools", "itertools", "pathlib", "urllib.parse", "hashlib", "base64", "uuid", "contextlib",
)

# Both children's reader of /proc/self/smaps: {start: [start, end, path, Rss kB, private kB]}.
SMAPS = r"""
def smaps():
    maps, cur = {}, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                cur = [lo, hi, head[5] if len(head) > 5 else "", 0, 0]
                maps[lo] = cur
            elif head[0] == "Rss:":
                cur[3] = int(head[1])
            elif head[0] in ("Private_Clean:", "Private_Dirty:"):
                cur[4] += int(head[1])
    return maps
"""

# The child: argv = variant, seconds, store dir, detail flag. Prints one JSON line.
CHILD = r"""
import os, sys, time
T0 = time.perf_counter()
variant, seconds, store, detail = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
if not variant.startswith("bare"):
    for _m in os.environ["FP_IMPORTS"].split(","):
        __import__(_m)
sys.stderr.write("--- baseline imported ---\n"); sys.stderr.flush()

def status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0

def rollup():
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return {"rss": status_kb("VmRSS"), "pss": out.get("Pss", 0),
            "uss": out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)}

""" + SMAPS + r"""
def depth(n, x):
    if n == 0:
        s = 0
        for i in range(200):
            s += i * x
        return s
    return depth(n - 1, x) + 1

def workload(seconds):
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        depth(30, n)
        n += 1
    return n

out = {"variant": variant}
maps0 = smaps() if detail else None
out["before"] = rollup()
tracker = None
if variant == "bare-std":  # only the standard-library modules that middleware imports
    t1 = time.perf_counter()
    for _m in os.environ["FP_STDLIB"].split(","):
        __import__(_m)
    out["import_ms"] = (time.perf_counter() - t1) * 1e3
if variant.endswith("mw") or variant == "mw-noupload":
    t1 = time.perf_counter()
    import middleware
    t2 = time.perf_counter()
    from middleware import MwTracker
    kwargs = {"profile_dir": store}
    if variant == "mw-noupload":
        kwargs["upload"] = False
    tracker = MwTracker(**kwargs)
    t3 = time.perf_counter()
    out["import_ms"] = (t2 - t1) * 1e3
    out["start_ms"] = (t3 - t2) * 1e3
    out["modules_added"] = len(sys.modules)
out["started"] = rollup()
out["iterations"] = workload(seconds)
out["sampled"] = rollup()
if tracker is not None:
    tracker.flush()
out["exported"] = rollup()
workload(seconds / 2)
if tracker is not None:
    tracker.flush()
    st = tracker.stats()
    out["samples"] = st.get("samples", 0)
    out["exports"] = st.get("exports", 0)
out["exported2"] = rollup()
out["modules"] = len(sys.modules)
with open("/proc/self/maps") as f:  # the uploader's libcurl is loaded only when uploading
    out["libcurl"] = int(any("libcurl" in line for line in f))
if detail:
    maps1 = smaps()
    rows = []
    for lo, m in maps1.items():
        old = maps0.get(lo)
        d_rss = m[3] - (old[3] if old and old[1] == m[1] else 0)
        if old is None or old[1] != m[1] or d_rss:
            rows.append({"name": m[2], "size_kb": (m[1] - m[0]) // 1024, "rss_kb": m[3], "d_rss_kb": d_rss,
                         "uss_kb": m[4], "new": old is None or old[1] != m[1]})
    out["maps"] = rows
print("FP_RESULT " + repr(out))  # not json: importing it would count as ours
"""

#: The standard-library modules that ``import middleware`` + ``MwTracker()`` import into a bare
#: interpreter (the ``bare std`` variant times them alone: the floor under our own cost there).
STDLIB_USED = ("logging", "typing", "dataclasses", "contextvars", "contextlib", "weakref", "atexit")

VARIANTS = ("app", "mw", "mw-noupload", "bare", "bare-std", "bare-mw")
LABELS = {"app": "app", "mw": "mw", "mw-noupload": "mw upload=False", "bare": "bare", "bare-std": "bare std",
          "bare-mw": "bare mw"}


#: Bytecode cache for the children (PYTHONPYCACHEPREFIX): an installed package has its .pyc files,
#: so start-up is measured with them (a warm-up child per variant fills the cache).
PYCACHE = os.path.join(tempfile.gettempdir(), f"mw-footprint-pycache-{sys.version_info[0]}{sys.version_info[1]}")


#: MW_* settings given with --setting, for every child (all other MW_* variables are left out).
SETTINGS: dict[str, str] = {}


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MW_") and k != "OTEL_SERVICE_NAME"}
    env.update(SETTINGS)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = PYCACHE
    env["FP_IMPORTS"] = ",".join(TYPICAL_IMPORTS)
    env["FP_STDLIB"] = ",".join(STDLIB_USED)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_child(variant: str, seconds: float, store: str, detail: bool = False,
              importtime: bool = False) -> tuple[dict[str, Any], str]:
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + [
        "-c", CHILD, variant, str(seconds), store, "1" if detail else "0"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=120, cwd=tempfile.gettempdir())
    if p.returncode != 0:
        raise SystemExit(f"footprint child failed ({variant}):\n{p.stderr[-4000:]}")
    line = [x for x in p.stdout.splitlines() if x.startswith("FP_RESULT ")][-1]
    return ast.literal_eval(line[len("FP_RESULT "):]), p.stderr


def med(rows: list[dict[str, Any]], *path: str) -> float:
    vals = []
    for r in rows:
        v: Any = r
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else float("nan")


def mib(kb: float) -> str:
    return f"{kb / 1024:7.2f}"


def print_table(res: dict[str, list[dict[str, Any]]], runs: int, seconds: float) -> None:
    print(f"footprint: CPython {sys.version.split()[0]}, {runs} runs per variant (fresh interpreter each, "
          f"order rotated), medians; workload {seconds:g} s")
    print(f"typical app imports: {', '.join(TYPICAL_IMPORTS)}")
    print()
    phases = (("sampled", f"after {seconds:g} s of sampling"), ("exported", "after the 1st export"),
              ("exported2", "after the 2nd export"))
    hdr = (f"{'':<16} " + " | ".join(f"{t:^23}" for _, t in phases) + f" | {'':<26} |")
    print(hdr)
    print(f"{'variant':<16} " + " | ".join(f"{'RSS':>7} {'PSS':>7} {'USS':>7}" for _ in phases)
          + f" | {'import ms':>9} {'start ms':>8} {'total':>7} | {'modules':>7}")
    print("-" * len(hdr))
    for v in VARIANTS:
        rows = res[v]
        cells = " | ".join(" ".join(mib(med(rows, ph, k)) for k in ("rss", "pss", "uss")) for ph, _ in phases)
        imp, start = med(rows, "import_ms"), med(rows, "start_ms")
        if "start_ms" in rows[0]:
            tot = statistics.median(r["import_ms"] + r["start_ms"] for r in rows)
            times = f"{imp:9.1f} {start:8.1f} {tot:7.1f}"
        elif "import_ms" in rows[0]:
            times = f"{imp:9.1f} {'-':>8} {imp:7.1f}"
        else:
            times = f"{'-':>9} {'-':>8} {'-':>7}"
        print(f"{LABELS[v]:<16} {cells} | {times} | {med(rows, 'modules'):7.0f}")
    print(f"  (MiB; times in ms: `import middleware`, then `MwTracker(...)` construction + start; 'bare std' imports "
          f"only {', '.join(STDLIB_USED)})")
    print()
    print("added by the tracker (difference of the medians, MiB; ratio = RSS with / RSS without):")
    print(f"  {'':<26} " + " | ".join(f"{t:^31}" for _, t in phases))
    print(f"  {'':<26} " + " | ".join(f"{'RSS':>7} {'PSS':>7} {'USS':>7} {'ratio':>7}" for _ in phases))
    for v, base in (("mw", "app"), ("mw-noupload", "app"), ("bare-mw", "bare"), ("bare-mw", "bare-std")):
        cells = []
        for phase, _ in phases:
            d = [(med(res[v], phase, k) - med(res[base], phase, k)) / 1024 for k in ("rss", "pss", "uss")]
            r = med(res[v], phase, "rss") / med(res[base], phase, "rss")
            cells.append(f"{d[0]:+7.2f} {d[1]:+7.2f} {d[2]:+7.2f} {r:7.3f}")
        print(f"  {LABELS[v] + ' vs ' + LABELS[base]:<26} " + " | ".join(cells))
    print("  the same inside each child (RSS before `import middleware` -> after sampling, median): "
          + ", ".join(f"{LABELS[v]} {(med(res[v], 'sampled', 'rss') - med(res[v], 'before', 'rss')) / 1024:+.2f}"
                      for v in ("mw", "mw-noupload", "bare-mw")))
    print("  processes with libcurl mapped: " + ", ".join(
        f"{LABELS[v]} {sum(r.get('libcurl', 0) for r in res[v])}/{len(res[v])}" for v in VARIANTS))
    ws = [med(res[v], "iterations") for v in ("app", "mw", "mw-noupload")]
    print(f"  workload iterations (median): app {ws[0]:.0f}, mw {ws[1]:.0f}, mw upload=False {ws[2]:.0f}; "
          f"samples in mw {med(res['mw'], 'samples'):.0f}, exports after flush {med(res['mw'], 'exports'):.0f}")


# --detail: one child, RSS per phase and the mappings that grew in each phase.
DETAIL_CHILD = r"""
import ctypes, json, os, sys, time
for _m in os.environ["FP_IMPORTS"].split(","):
    __import__(_m)
store, seconds = sys.argv[1], float(sys.argv[2])

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL(None)
try:
    libc.mallinfo2.restype = MallInfo2
except AttributeError:
    libc = None

""" + SMAPS + r"""
def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

def depth(n, x):
    if n == 0:
        return sum(i * x for i in range(200))
    return depth(n - 1, x) + 1

def workload(s):
    end = time.perf_counter() + s
    while time.perf_counter() < end:
        depth(30, 1)

phases = []
prev = smaps()
def phase(name):
    global prev
    cur = smaps()
    rows = []
    for lo, m in cur.items():
        old = prev.get(lo)
        same = old is not None and old[1] == m[1] and old[2] == m[2]
        d = m[3] - (old[3] if same else 0)
        if d or not same:
            rows.append({"name": m[2], "size_kb": (m[1] - m[0]) // 1024, "d_rss_kb": d, "new": not same})
    for lo, m in prev.items():  # unmapped or replaced
        c = cur.get(lo)
        if c is None or c[1] != m[1] or c[2] != m[2]:
            rows.append({"name": m[2], "size_kb": (m[1] - m[0]) // 1024, "d_rss_kb": -m[3], "new": False})
    mi = libc.mallinfo2() if libc else None
    phases.append({"phase": name, "rss": rss_kb(), "maps": rows,
                   "malloc_heap_kb": (mi.arena // 1024) if mi else None,
                   "malloc_mmap_kb": (mi.hblkhd // 1024) if mi else None,
                   "malloc_used_kb": (mi.uordblks // 1024) if mi else None,
                   "threads": len(os.listdir("/proc/self/task"))})
    prev = cur

phase("typical app imported")
import middleware
phase("import middleware")
from middleware import _native
phase("load middleware._native (+ shared libraries)")
t = middleware.MwTracker(profile_dir=store)
phase("MwTracker(profile_dir=...) started")
workload(seconds)
phase(f"{seconds:g} s of sampling")
t.flush()
phase("first export (flush)")
workload(seconds / 2)
t.flush()
phase("second window + export")
print("FP_RESULT " + json.dumps(phases))
"""


def classify(row: dict[str, Any]) -> str:
    name = row["name"]
    if name.startswith("/"):
        return os.path.basename(name) if "cpython" in name else "shared libraries (.so)"
    if name:
        return name
    size = row["size_kb"]
    if size in (1024, 256):
        return "anon 1 MiB (obmalloc arenas)"
    if 8180 <= size <= 8200:
        return "anon ~8 MiB (thread stacks)"
    return f"anon {size} KiB"


def print_detail(seconds: float, store: str) -> None:
    p = subprocess.run([sys.executable, "-c", DETAIL_CHILD, store, str(seconds)], capture_output=True, text=True,
                       env=child_env(), timeout=120, cwd=tempfile.gettempdir())
    if p.returncode != 0:
        raise SystemExit(f"footprint detail child failed:\n{p.stderr[-4000:]}")
    phases = json.loads([x for x in p.stdout.splitlines() if x.startswith("FP_RESULT ")][-1][len("FP_RESULT "):])
    print()
    print("where the tracker's RSS goes (--detail: one child, /proc/self/smaps diffed phase by phase):")
    base = phases[0]["rss"]
    for i, ph in enumerate(phases):
        groups: dict[str, int] = {}
        for row in ph["maps"]:
            k = classify(row)
            groups[k] = groups.get(k, 0) + row["d_rss_kb"]
        d = ph["rss"] - (phases[i - 1]["rss"] if i else ph["rss"])
        top = ", ".join(f"{k} {v:+d}" for k, v in sorted(groups.items(), key=lambda kv: -abs(kv[1]))[:6] if v)
        print(f"  {ph['phase']:<46} RSS {ph['rss'] / 1024:6.2f} MiB ({d:+6d} KiB; {ph['rss'] - base:+6d} from start)"
              f"  threads {ph['threads']}  malloc: heap {ph['malloc_heap_kb']} KiB, mmapped {ph['malloc_mmap_kb']} KiB,"
              f" in use {ph['malloc_used_kb']} KiB")
        if top:
            print(f"      KiB by mapping: {top}")


def parse_importtime(err: str) -> list[tuple[int, int, str, int]]:
    """(self us, cumulative us, module, indent) of the imports after the child's baseline."""
    rows = []
    for line in err.split("--- baseline imported ---", 1)[-1].splitlines():
        if not line.startswith("import time:") or "|" not in line or "self [us]" in line:
            continue
        self_us, cum_us, name = line[len("import time:"):].split("|", 2)
        indent = len(name) - len(name.lstrip())
        rows.append((int(self_us), int(cum_us), name.strip(), indent))
    return rows


def print_importtime(store: str, repeats: int = 3) -> None:
    for variant, title in (("mw", "on top of the typical app's imports"), ("bare-mw", "in a bare interpreter")):
        runs = [parse_importtime(run_child(variant, 0.05, store, importtime=True)[1]) for _ in range(repeats)]
        selfs: dict[str, list[int]] = {}
        cums: dict[str, list[int]] = {}
        for rows in runs:
            for s, c, n, ind in rows:
                selfs.setdefault(n, []).append(s)
                if ind == 1:
                    cums.setdefault(n, []).append(c)
        total = statistics.median(sum(c for _, c, _, ind in rows if ind == 1) for rows in runs)
        print()
        print(f"python -X importtime, import middleware + MwTracker() {title}: {len(runs[0])} modules imported, "
              f"{total / 1e3:.1f} ms (median of {repeats}; importtime's own overhead included)")
        top = sorted(((statistics.median(v), n) for n, v in cums.items()), reverse=True)[:8]
        print("  top-level imports, cumulative ms: " + ", ".join(f"{n} {c / 1e3:.1f}" for c, n in top))
        top = sorted(((statistics.median(v), n) for n, v in selfs.items()), reverse=True)[:10]
        print("  modules by self time, ms:         " + ", ".join(f"{n} {s / 1e3:.1f}" for s, n in top))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7, help="children per variant (>= 7 for stable medians)")
    ap.add_argument("--seconds", type=float, default=1.0, help="workload (sampling) time per child")
    ap.add_argument("--detail", action="store_true", help="attribute the tracker's RSS to mappings")
    ap.add_argument("--no-importtime", action="store_true", help="skip the -X importtime listing")
    ap.add_argument("--setting", action="append", default=[], metavar="MW_NAME=VALUE",
                    help="a setting for every child, e.g. MW_PROFILING_MEMORY=true (repeatable)")
    ap.add_argument("--json", metavar="FILE", help="also write every child's raw result to FILE")
    args = ap.parse_args()
    for item in args.setting:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("MW_"):
            ap.error(f"--setting takes MW_NAME=VALUE, not {item!r}")
        SETTINGS[name] = value
    res: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="mw-footprint-") as store:
        for v in VARIANTS:  # warm-up: compiles the bytecode cache; not counted
            run_child(v, 0.05, store)
        for i in range(args.runs):
            order = VARIANTS[i % len(VARIANTS):] + VARIANTS[:i % len(VARIANTS)]
            for v in order:
                res[v].append(run_child(v, args.seconds, store)[0])
        print_table(res, args.runs, args.seconds)
        if args.detail:
            print_detail(args.seconds, store)
        if not args.no_importtime:
            print_importtime(store)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
