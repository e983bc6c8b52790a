"""Load test of ``python -m middleware serve``: many agents uploading at once, plus UI queries.

    .venv/bin/python bench/serve_load.py [--uploaders 50] [--duration 30] [--queriers 4]
                                         [--interval SECONDS] [--url http://127.0.0.1:PORT] [--json]

Without ``--url`` it starts ``python -m middleware serve --port 0`` on 127.0.0.1 with a
temporary ``--data`` directory (a separate process, as in real use) and stops it afterwards.

Each uploader thread keeps one HTTP/1.1 connection and POSTs the same realistic agent profile
(gzipped pprof: 3 sample types, ~120 stacks, endpoint/thread labels) back to back, as its own
service ``load-NN`` with a new 10-second window each time — a closed loop, i.e. far more than
real agents (one upload per 10 s each; ``--interval`` paces them). Query threads meanwhile ask for the timeline and the
merged profile like the page does. At the end every service's stored profile count and CPU total
are compared with what its uploader had acknowledged (an accepted upload must never be lost),
and the upload latency percentiles are printed. Loopback only; bounded by --duration.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from middleware.pprof import encode_pprof  # noqa: E402
from middleware.profile import Frame, Profile, Sample  # noqa: E402

CPU = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
# Windows from a day ago on (on the hour): recent data, which serve's retention (7 days by default) keeps
BASE_S = (int(time.time()) // 3600 - 24) * 3600


class Bodies:
    """Upload k's body: the agent profile with window k (distinct bytes per window, since the
    server stores a repeated identical profile only once). Encoded once, shared by uploaders."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._bodies: list[bytes] = []
        self._lock = threading.Lock()

    def __getitem__(self, k: int) -> bytes:
        with self._lock:
            while len(self._bodies) <= k:
                n = len(self._bodies)
                self.profile.time_nanos = (BASE_S + 10 * n) * 10**9
                self._bodies.append(encode_pprof(self.profile))
            return self._bodies[k]


def agent_profile(seed: int = 1) -> Profile:
    """A profile shaped like one 10 s upload of a web app: ~120 distinct stacks."""
    rnd = random.Random(seed)
    fns = [Frame(f"module{m}.func{f}", f"/app/module{m}.py", 10 * f + 1) for m in range(8) for f in range(12)]
    endpoints = ["/calculate1", "/calculate2", "/health", "/users", "/orders"]
    samples = []
    for _ in range(120):
        depth = rnd.randint(6, 24)
        stack = (Frame("main", "/app/main.py", 3), Frame("handle", "/app/web.py", 40)) + tuple(
            rnd.choice(fns) for _ in range(depth)
        )
        n = rnd.randint(1, 40)
        labels = (("endpoint", rnd.choice(endpoints)), ("thread_name", f"worker-{rnd.randint(1, 4)}"))
        samples.append(
            Sample(stack, (n, n * 10_000_000, n * 10_000_000 + rnd.randint(0, 5_000_000)), tuple(sorted(labels)))
        )
    return Profile(
        sample_types=[("samples", "count"), ("cpu", "nanoseconds"), ("wall", "nanoseconds")],
        samples=samples,
        time_nanos=BASE_S * 10**9,
        duration_nanos=10 * 10**9,
    )


@dataclass
class UploaderResult:
    service: str
    accepted: int = 0
    rejected: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


@dataclass
class LoadResult:
    uploaders: int
    duration_s: float
    accepted: int
    rejected: int
    errors: int
    queries: int
    query_errors: int
    lost: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    uploads_per_s: float
    body_bytes: int
    problems: list[str]

    def summary(self) -> str:
        return (
            f"{self.uploaders} uploaders for {self.duration_s:.0f} s: {self.accepted} uploads accepted "
            f"({self.uploads_per_s:.0f}/s, {self.body_bytes} bytes each), {self.rejected} rejected, "
            f"{self.errors} transport errors, {self.lost} lost; "
            f"{self.queries} UI queries ({self.query_errors} failed)\n"
            f"upload latency: p50 {self.p50_ms:.1f} ms  p90 {self.p90_ms:.1f} ms  p99 {self.p99_ms:.1f} ms  "
            f"max {self.max_ms:.1f} ms"
        )


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _uploader(
    host: str, port: int, bodies: Bodies, stop_at: float, headers: dict[str, str], out: UploaderResult, interval: float
) -> None:
    conn: http.client.HTTPConnection | None = None
    k = 0
    next_at = time.monotonic() + random.uniform(0, interval)
    while time.monotonic() < stop_at:
        if interval > 0:
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at += interval
            if time.monotonic() >= stop_at:
                break
        start_s = BASE_S + 10 * k
        body = bodies[k]
        k += 1
        q = urllib.parse.urlencode(
            {"name": f"{out.service}{{env=load}}", "from": start_s, "until": start_s + 10, "format": "pprof",
             "sampleRate": 100, "spyName": "middleware-python"}
        )
        t0 = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=60)
            conn.request("POST", f"/ingest?{q}", body, headers)
            resp = conn.getresponse()
            resp.read()
            dt = time.perf_counter() - t0
            if resp.status == 200:
                out.accepted += 1
                out.latencies.append(dt)
            else:
                out.rejected[resp.status] = out.rejected.get(resp.status, 0) + 1
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as exc:
            out.errors.append(repr(exc))
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()


def _querier(
    host: str,
    port: int,
    services: list[str],
    stop_at: float,
    headers: dict[str, str],
    counts: list[int],
    lock: threading.Lock,
) -> None:
    rnd = random.Random(threading.get_ident())
    conn = http.client.HTTPConnection(host, port, timeout=60)
    while time.monotonic() < stop_at:
        svc = rnd.choice(services)
        path = rnd.choice(["/api/timeline", "/api/profile", "/api/services"])
        q = urllib.parse.urlencode({"service": svc, "type": CPU, "from": BASE_S, "until": BASE_S + 100_000,
                                    "selector": '{endpoint="/calculate2"}' if rnd.random() < 0.5 else "{}"})
        ok = False
        try:
            conn.request("GET", f"{path}?{q}", headers=headers)
            resp = conn.getresponse()
            resp.read()
            ok = resp.status == 200
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=60)
        with lock:
            counts[0] += 1
            counts[1] += 0 if ok else 1
        time.sleep(0.05)
    conn.close()


def _get_json(host: str, port: int, path: str, headers: dict[str, str], **params: Any) -> Any:
    conn = http.client.HTTPConnection(host, port, timeout=120)
    try:
        conn.request("GET", f"{path}?{urllib.parse.urlencode(params)}", headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {path} -> {resp.status}: {data[:200]!r}")
        return json.loads(data)
    finally:
        conn.close()


def run_load(
    url: str,
    uploaders: int = 50,
    duration: float = 30.0,
    queriers: int = 4,
    token: str | None = None,
    interval: float = 0.0,
) -> LoadResult:
    """Run the load against a running serve at ``url`` (loopback) and verify what it stored.

    ``interval`` > 0 paces each uploader to one upload per ``interval`` seconds (0: back to back).
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("the load test only runs against loopback")
    headers = {"Content-Type": "binary/octet-stream", "User-Agent": "middleware-serve-load/1"}
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(auth)
    profile = agent_profile()
    bodies = Bodies(profile)
    body = bodies[0]
    for k in range(int(duration * 20)):  # enough windows for most runs, encoded before the clock starts
        bodies[k]
    cpu_per_upload = profile.total("cpu")
    results = [UploaderResult(service=f"load-{i:02d}") for i in range(uploaders)]
    counts = [0, 0]
    lock = threading.Lock()
    start = time.monotonic()
    stop_at = start + duration
    threads = [
        threading.Thread(
            target=_uploader, args=(host, port, bodies, stop_at, headers, results[i], interval), daemon=True
        )
        for i in range(uploaders)
    ]
    threads += [
        threading.Thread(
            target=_querier, args=(host, port, [r.service for r in results], stop_at, auth, counts, lock), daemon=True
        )
        for _ in range(queriers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration + 120)
    elapsed = time.monotonic() - start

    # Verify: every acknowledged upload is stored, with its values.
    problems: list[str] = []
    stored = {s["name"]: s["profiles"] for s in _get_json(host, port, "/api/services", auth)["services"]}
    lost = 0
    for r in results:
        have = stored.get(r.service, 0)
        if have < r.accepted:
            lost += r.accepted - have
            problems.append(f"{r.service}: {r.accepted} accepted but {have} stored")
        elif have > r.accepted:
            # Possible only when a response was lost after the commit (counted as an error).
            if have - r.accepted > len(r.errors):
                problems.append(f"{r.service}: {have} stored but only {r.accepted} accepted")
        if r.accepted:
            last = BASE_S + 10 * (r.accepted + len(r.errors) + sum(r.rejected.values())) + 10
            doc = _get_json(
                host,
                port,
                "/api/timeline",
                auth,
                service=r.service,
                type=CPU,
                **{"from": BASE_S, "until": last},
                step=86400,
            )
            if doc["total"] != have * cpu_per_upload:
                problems.append(f"{r.service}: cpu total {doc['total']} != {have} x {cpu_per_upload}")
    latencies = [x for r in results for x in r.latencies]
    accepted = sum(r.accepted for r in results)
    return LoadResult(
        uploaders=uploaders,
        duration_s=elapsed,
        accepted=accepted,
        rejected=sum(sum(r.rejected.values()) for r in results),
        errors=sum(len(r.errors) for r in results),
        queries=counts[0],
        query_errors=counts[1],
        lost=lost,
        p50_ms=1000 * _percentile(latencies, 0.50),
        p90_ms=1000 * _percentile(latencies, 0.90),
        p99_ms=1000 * _percentile(latencies, 0.99),
        max_ms=1000 * max(latencies, default=0.0),
        uploads_per_s=accepted / elapsed if elapsed else 0.0,
        body_bytes=len(body),
        problems=problems,
    )


class ServeProcess:
    """``python -m middleware serve`` on a free loopback port with a temporary data directory."""

    def __init__(self, data_dir: str | None = None, token: str | None = None,
                 extra_args: list[str] | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="mw-serve-load-") if data_dir is None else None
        self.data_dir = data_dir or self._tmp.name  # type: ignore[union-attr]
        self.token = token
        env = {k: v for k, v in os.environ.items() if not k.startswith("MW_")}
        if token:
            env["MW_SERVE_TOKEN"] = token
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "middleware", "serve", "--host", "127.0.0.1", "--port", "0",
             "--data", self.data_dir, "--no-store-import", *(extra_args or [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT), env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"serve did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.url = m.group(1)

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        if self._tmp is not None:
            self._tmp.cleanup()
        return out + err

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploaders", type=int, default=50)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument("--queriers", type=int, default=4, help="concurrent UI query threads (default 4)")
    parser.add_argument("--url", default=None, help="a running serve (loopback); default: start one")
    parser.add_argument("--token", default=None)
    parser.add_argument(
        "--interval", type=float, default=0.0,
        help="seconds between one uploader's uploads (default 0: back to back, the stress case; real agents: 10)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 600 or not 0 < args.uploaders <= 1000:
        parser.error("--duration must be in (0, 600] and --uploaders in (0, 1000]")
    server = None if args.url else ServeProcess(token=args.token)
    try:
        url = args.url or server.url  # type: ignore[union-attr]
        result = run_load(url, args.uploaders, args.duration, args.queriers, args.token, args.interval)
    finally:
        if server is not None:
            server.stop()
    if args.json:
        sys.stdout.write(json.dumps(result.__dict__, indent=1) + "\n")
    else:
        sys.stdout.write(result.summary() + "\n")
        for problem in result.problems:
            sys.stdout.write(f"PROBLEM: {problem}\n")
    return 0 if not result.problems and not result.lost else 1


if __name__ == "__main__":
    sys.exit(main())
