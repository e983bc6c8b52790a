"""End to end: `serve` flags the function a new version of the demo made slower, by itself.

GIVEN `serve` running, and the Flask demo under gunicorn (2 workers) pushing to it, deployed as
version A, then as version B whose calc2 does 1.5x the work (calc2's loops widened by sqrt(1.5)
in place, as a deploy replaces the files), each labelled by MW_VCS_COMMIT_SHA as Middleware's
agents are
WHEN both endpoints get requests under each version (3 of 4 to /calculate1; the default 10 s
windows; the agent counts them, so costs compare per request)
THEN within two windows of B's first profile the regressions API flags calc2 for A -> B, over the
service and within /calculate1 (where calc2 runs; in /calculate2 it is a few µs per request),
and flags no other function (calc1, calc3: their cost did not change).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from middleware.serve import ServeApp, ServeConfig
from support.demo_deploy import demo_copy, deploy, make_calc2_slower, regressions

pytestmark = pytest.mark.slow

WINDOW_S = 10  # the agent's default upload interval


def test_serve_flags_the_function_the_new_version_made_slower(tmp_path: Path) -> None:
    app = ServeApp(ServeConfig(port=0, data_dir=str(tmp_path / "serve"), regress_interval=3600)).start()
    try:
        demo = demo_copy(tmp_path / "demo")
        log = tmp_path / "gunicorn.log"
        deploy(demo, "A", app.url, 3 * WINDOW_S, WINDOW_S, log)
        make_calc2_slower(demo)
        # B runs two windows (and the final export of each worker's last one)
        deploy(demo, "B", app.url, 2 * WINDOW_S, WINDOW_S, log)
        body = regressions(app)
        comparisons = body["comparisons"]
        assert [(c["before"]["version"], c["after"]["version"]) for c in comparisons] == [("A", "B")], body
        flagged = {(f["function"], f["endpoint"]) for f in comparisons[0]["findings"]}
        detail = [(f["function"], f["endpoint"], f["kind"], f["metric"], f["basis"], round(f["share_before"], 4),
                   round(f["share_after"], 4), f["samples_before"], f["samples_after"])
                  for f in comparisons[0]["findings"]]
        context = {k: comparisons[0][k] for k in ("before", "after", "error", "common")}
        said = [line for line in log.read_text(errors="replace").splitlines() if "middleware" in line]
        context["agent said"] = said[-10:]
        assert ("calc2", None) in flagged and ("calc2", "/calculate1/<int:number>") in flagged, (detail, context)
        assert {fn for fn, _ in flagged} == {"calc2"}, (detail, context)
        # the demo's Flask requests are counted: costs compare per request
        assert all(f["basis"] == "request" and f["requests_after"] > 0 for f in comparisons[0]["findings"]), detail
    finally:
        app.stop()
