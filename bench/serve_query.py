"""How `serve`'s page queries grow with the range: a store of many days of realistic uploads.

Generates ``--services`` services x ``--days`` days x one profile per 10 s (the default, 5 x 2,
is ~86k profiles) of agent-like CPU profiles (3 sample types, ~120 stacks drawn from a few
hundred call paths, endpoint and thread labels), stores them through the store's own write path
(``Store.add_many``: the same normalisation as an HTTP upload, without the HTTP), then times
what the page asks for at first paint -- the timeline and the merged profile (flame graph JSON)
of one service -- over the last hour, 6 hours, a day and the whole range, each a few times
(cold first, then warm), through the query engine and JSON encoding the HTTP handlers use (the
browser's drawing comes on top). Targets: the last hour <= 1 s, the whole 2 days <= 5 s.

    python bench/serve_query.py [--services 5] [--days 2] [--data DIR] [--reuse] [--json]

``--data DIR --reuse`` keeps and reuses a generated store (generating 86k profiles takes
minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from middleware.pprof import encode_pprof  # noqa: E402
from middleware.profile import Frame, Profile, Sample  # noqa: E402
from middleware.serve.ingest import IngestParams, upload_from_profile  # noqa: E402
from middleware.serve.query import QueryEngine, Selection  # noqa: E402
from middleware.serve.store import Store  # noqa: E402

CPU = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
STEP_S = 10
END_S = (int(time.time()) // 3600) * 3600  # the data ends at the last full hour


def call_paths(rng: random.Random, n: int) -> list[tuple[Frame, ...]]:
    files = [f"/srv/app/{m}.py" for m in ("views", "models", "db", "cache", "serializers", "utils")]
    names = [f"{verb}_{noun}" for verb in ("get", "load", "save", "parse", "render", "check", "build")
             for noun in ("user", "order", "item", "page", "query", "row", "token")]
    base = (Frame("<module>", "/srv/app/wsgi.py", 1), Frame("handle", "/srv/app/server.py", 40))
    out = []
    for _ in range(n):
        depth = rng.randrange(3, 25)
        out.append(base + tuple(Frame(rng.choice(names), rng.choice(files), rng.randrange(1, 400))
                                for _ in range(depth)))
    return out


def window_profile(rng: random.Random, paths: list[tuple[Frame, ...]], start_s: int) -> Profile:
    samples = []
    for stack in rng.sample(paths, 120):
        cpu = rng.randrange(1, 40) * 10_000_000
        labels = (("endpoint", f"/api/{rng.randrange(8)}"), ("thread_name", f"worker-{rng.randrange(4)}"))
        samples.append(Sample(stack, (cpu // 10_000_000, cpu, cpu + rng.randrange(0, 50) * 10_000_000), labels))
    return Profile(samples=samples, time_nanos=start_s * 10**9, duration_nanos=STEP_S * 10**9)


def generate(store: Store, services: int, days: float) -> int:
    rng = random.Random(7)
    paths = call_paths(rng, 400)
    n = int(days * 86400 / STEP_S)
    t0, done = time.monotonic(), 0
    for s in range(services):
        batch = []
        for i in range(n):
            start = END_S - (n - i) * STEP_S
            profile = window_profile(rng, paths, start)
            plain = encode_pprof(profile)
            params = IngestParams(service=f"svc-{s}", tags=(("env", "prod"),), from_ns=start * 10**9,
                                  until_ns=(start + STEP_S) * 10**9, sample_rate=100)
            batch.append(upload_from_profile(params, profile, plain))
            if len(batch) == 256:
                store.add_many(batch)
                done += len(batch)
                batch = []
                if done % 8192 < 256:
                    print(f"  {done} profiles stored ({done / (time.monotonic() - t0):.0f}/s)", file=sys.stderr)
        if batch:
            store.add_many(batch)
            done += len(batch)
    return done


def first_paint(engine: QueryEngine, service: str, hours: float) -> float:
    sel = Selection(service=service, type_id=CPU, from_ns=int((END_S - hours * 3600) * 1e9), until_ns=END_S * 10**9)
    t0 = time.perf_counter()
    json.dumps(engine.timeline(sel))  # the two answers the page waits for, serialized as sent
    json.dumps(engine.profile_json(sel))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=5)
    ap.add_argument("--days", type=float, default=2.0)
    ap.add_argument("--data", help="store directory (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true", help="reuse the store in --data if it has data")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    data = args.data or tempfile.mkdtemp(prefix="mw-serve-query-")
    os.makedirs(data, exist_ok=True)
    store = Store(data, max_age_s=None, max_bytes=None)
    try:
        if not (args.reuse and store.profile_count()):
            t0 = time.monotonic()
            n = generate(store, args.services, args.days)
            print(f"generated {n} profiles in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        engine = QueryEngine(store)
        rows: list[dict[str, Any]] = []
        for hours in (1, 6, 24, args.days * 24):
            times = [first_paint(engine, "svc-0", hours) for _ in range(args.repeat)]
            rows.append({"hours": hours, "profiles": int(hours * 3600 / STEP_S), "cold_s": times[0],
                         "warm_s": statistics.median(times[1:]) if len(times) > 1 else times[0]})
        size = sum(f.stat().st_size for f in Path(data).iterdir() if f.is_file())
    finally:
        store.close()
    if args.json:
        print(json.dumps({"db_bytes": size, "rows": rows}))
        return
    print(f"store: {size / 2**20:.0f} MiB in {data}")
    print(f"{'range':>8} {'profiles':>9} {'first paint (cold)':>19} {'(warm)':>8}")
    for r in rows:
        print(f"{r['hours']:>7g}h {r['profiles']:>9} {r['cold_s']:>18.2f}s {r['warm_s']:>7.2f}s")
    last, whole = rows[0]["cold_s"], rows[-1]["cold_s"]
    print(f"targets: last hour {last:.2f}s <= 1 s: {'met' if last <= 1 else 'NOT met'}; "
          f"whole range {whole:.2f}s <= 5 s: {'met' if whole <= 5 else 'NOT met'}")


if __name__ == "__main__":
    main()
