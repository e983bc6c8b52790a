"""A small, bounded, closed-loop HTTP load generator for loopback benchmarks and the demo.

Used when ``wrk`` is not installed. Each of ``connections`` threads sends one GET at a time
(round-robin over the given paths) on a fresh connection, as gunicorn's sync workers close the
connection after every response anyway, until ``seconds`` have passed.

    python bench/loadgen.py --seconds 5 --connections 4 http://127.0.0.1:8000/calculate1/100
"""

from __future__ import annotations

import argparse
import http.client
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["LoadResult", "run_load"]


@dataclass
class LoadResult:
    """What one load run did."""

    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Successful requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def run_load(urls: Sequence[str], seconds: float, connections: int = 4, timeout: float = 30.0) -> LoadResult:
    """GET ``urls`` round-robin from ``connections`` threads for ``seconds``; count 2xx answers."""
    targets = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not an http:// URL: {url}")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        targets.append((parts.hostname, parts.port or 80, path))
    result = LoadResult()
    lock = threading.Lock()
    start = time.monotonic()
    stop_at = start + seconds

    def worker(k: int) -> None:
        ok = errors = 0
        statuses: dict[int, int] = {}
        i = k
        while time.monotonic() < stop_at:
            host, port, path = targets[i % len(targets)]
            i += 1
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
                if 200 <= response.status < 300:
                    ok += 1
                else:
                    errors += 1
            except OSError:
                errors += 1
                time.sleep(0.01)  # do not spin on a refused connection
            finally:
                conn.close()
        with lock:
            result.requests += ok
            result.errors += errors
            for status, n in statuses.items():
                result.statuses[status] = result.statuses.get(status, 0) + n

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - start
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", nargs="+", help="http:// URLs, requested round-robin")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration (default 5)")
    parser.add_argument("--connections", type=int, default=4, help="concurrent requests (default 4)")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 600 or not 0 < args.connections <= 256:
        parser.error("--seconds must be in (0, 600] and --connections in 1..256")
    result = run_load(args.urls, args.seconds, args.connections)
    sys.stdout.write(
        f"{result.requests} requests in {result.seconds:.1f}s, {result.errors} errors, "
        f"statuses {dict(sorted(result.statuses.items()))}\n"
        f"Requests/sec: {result.rate:.2f}\n"
    )
    return 0 if result.requests and not result.errors else 1


if __name__ == "__main__":
    sys.exit(main())
