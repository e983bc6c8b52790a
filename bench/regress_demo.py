"""The regression detector of `serve` on the real demo: false positives between runs of the same
code, and detection of a slower calc2.

    .venv/bin/python bench/regress_demo.py [--nulls 20] [--seconds 20] [--window 10]

One `serve` (in this process) and the Flask demo under gunicorn (2 workers, 4 clients, 3 of 4
requests to /calculate1/600, 1 to /calculate2/8) pushing to it at the default 100 Hz. The demo is
deployed ``--nulls + 1`` times with the same code, each time under a new version label
(``MW_VCS_COMMIT_SHA=same-0``, ``same-1``, ...) for ``--seconds``: each consecutive pair is a null
comparison. Then calc2 is made 1.5x as costly in place and the demo runs once more as
``slower``, for ``--seconds``. Printed: the null comparisons with any finding (the false-positive
rate, over the service and within each endpoint), and what was flagged for the slower version.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from middleware.serve import ServeApp, ServeConfig  # noqa: E402
from support.demo_deploy import demo_copy, deploy, make_calc2_slower, regressions  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nulls", type=int, default=20, help="null comparisons (runs of the same code)")
    ap.add_argument("--seconds", type=float, default=20.0, help="load per deploy")
    ap.add_argument("--window", type=float, default=10.0, help="agent's upload interval (s)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        app = ServeApp(ServeConfig(port=0, data_dir=str(t / "serve"), regress_interval=3600)).start()
        try:
            demo = demo_copy(t / "demo")
            log = t / "gunicorn.log"
            for k in range(args.nulls + 1):
                deploy(demo, f"same-{k}", app.url, args.seconds, args.window, log)
                print(f"deployed same-{k}", flush=True)
            make_calc2_slower(demo)
            deploy(demo, "slower", app.url, args.seconds, args.window, log)
            body = regressions(app)
        finally:
            app.stop()
    nulls = [c for c in body["comparisons"] if c["after"]["version"] != "slower"]
    flagged = [c for c in nulls if c["findings"]]
    print(f"\nnull comparisons (same code, {args.seconds:g} s each side, {args.window:g} s windows): "
          f"{len(flagged)} of {len(nulls)} with a finding")
    for c in flagged:
        for f in c["findings"]:
            print(f"  {c['before']['version']} -> {c['after']['version']}: {f['function']} "
                  f"({f['endpoint'] or 'all'}) {f['kind']} x{f['ratio'] or float('inf'):.2f} per {f['basis']}")
    common = [f"{c['before']['version']} -> {c['after']['version']}: {c['common'].get('', 1.0) - 1:+.0%}"
              for c in body["comparisons"] if c.get("common", {}).get("", 1.0) != 1.0]
    print(f"common change discounted (the machine): {', '.join(common) if common else 'none'}")
    last = next(c for c in body["comparisons"] if c["after"]["version"] == "slower")
    print(f"calc2 1.5x ({last['before']['version']} -> slower, {last['after']['profiles']} profiles after):")
    for f in last["findings"]:
        ratio = "new" if f["ratio"] is None else f"x{f['ratio']:.2f} [{f['ratio_low']:.2f}, {f['ratio_high']:.2f}]"
        if f["basis"] == "request":
            cost = (f"{f['share_before'] / 1e6:.2f} -> {f['share_after'] / 1e6:.2f} ms CPU per request "
                    f"({f['requests_before']:.0f} -> {f['requests_after']:.0f} requests)")
        else:
            cost = f"{100 * f['share_before']:.1f}% -> {100 * f['share_after']:.1f}% of the CPU"
        print(f"  {f['function']} ({f['endpoint'] or 'all'}): {cost} {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
