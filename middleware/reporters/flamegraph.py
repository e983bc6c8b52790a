"""The interactive flame graph page, and the JSON model behind it.

The page is driven by one script, ``flamegraph.js`` (next to this module), with its style sheet
``flamegraph.css``. Both are plain files so that two kinds of pages can use them:

* :func:`render_html` writes ONE self-contained HTML file (script, style and data inline; it
  needs no network) — ``python -m middleware flamegraph -o FILE.html``;
* a server page (``serve``) can send :func:`flamegraph_js` / :func:`flamegraph_css` as static
  assets, serve :func:`profile_to_json` as JSON and call ``MwFlame.mount(element, data)``.

JSON model (``profile_to_json``; version 1)::

    {
      "version": 1,
      "title": str,
      "value": {"name": "cpu", "unit": "nanoseconds"},      # the sample type shown
      "sample_types": [["samples", "count"], ...],          # all types of the profile
      "total": int,                                         # sum of the shown values
      "samples": int,                                       # number of (aggregated) samples
      "time_nanos": int, "duration_nanos": int,
      "functions": [                                        # the function table, by Self desc;
        {"name": str, "file": str, "line": int,             # a function's index in this list is
         "self": int, "total": int}, ...                    # its id ("f") in the tree
      ],
      "tree": {"f": -1, "v": total, "s": 0, "c": [          # root; children sorted by value desc
        {"f": function id, "v": total value, "s": self value, "c": [...]}, ...]}
    }

Tree nodes merge frames by function (name and file), not by line, so each function is one box
per call path.
"""
from __future__ import annotations

import html
import json
import logging
from functools import cache, lru_cache
from importlib import resources
from typing import Any

from middleware.profile import Profile
from middleware.reporters import resolve_value
from middleware.reporters.table import NO_FRAMES, FunctionKey, function_table

logger = logging.getLogger(__name__)

__all__ = ["profile_to_json", "render_html", "flamegraph_js", "flamegraph_css", "json_for_script"]

JSON_VERSION = 1


@cache
def _asset(name: str) -> str:
    return resources.files("middleware.reporters").joinpath(name).read_text(encoding="utf-8")


def flamegraph_js() -> str:
    """The viewer script (defines ``window.MwFlame``)."""
    return _asset("flamegraph.js")


def flamegraph_css() -> str:
    """The viewer's style sheet."""
    return _asset("flamegraph.css")


def profile_to_json(profile: Profile, value: str | None = None, title: str = "") -> dict[str, Any]:
    """The viewer's data for sample type ``value`` (None: the profile's default); see module doc.

    Raises ``KeyError`` for an unknown sample type.
    """
    index, name, unit = resolve_value(profile, value)
    rows = function_table(profile, name, sort="self")
    fids: dict[FunctionKey, int] = {row.key: i for i, row in enumerate(rows)}

    # node: [fid, total, self, {fid: child}]
    root: list[Any] = [-1, 0, 0, {}]
    for sample in profile.samples:
        v = sample.values[index]
        if not v:
            continue
        node = root
        node[1] += v
        for frame in sample.stack or NO_FRAMES:
            fid = fids[(frame.function, frame.file)]
            child = node[3].get(fid)
            if child is None:
                child = node[3][fid] = [fid, 0, 0, {}]
            child[1] += v
            node = child
        node[2] += v

    def convert(node: list[Any]) -> dict[str, Any]:
        kids = sorted(node[3].values(), key=lambda n: (-n[1], n[0]))
        return {"f": node[0], "v": node[1], "s": node[2], "c": [convert(k) for k in kids]}

    return {
        "version": JSON_VERSION,
        "title": title,
        "value": {"name": name, "unit": unit},
        "sample_types": [list(t) for t in profile.sample_types],
        "total": root[1],
        "samples": len(profile.samples),
        "time_nanos": profile.time_nanos,
        "duration_nanos": profile.duration_nanos,
        "functions": [
            {"name": r.function, "file": r.file, "line": r.line, "self": r.self_value, "total": r.total_value}
            for r in rows
        ],
        "tree": convert(root),
    }


def json_for_script(data: Any) -> str:
    """JSON that is safe to place inside an HTML ``<script>`` element."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def render_html(profile: Profile, title: str = "middleware profile", value: str | None = None) -> str:
    """One self-contained HTML page (no external resources) showing ``profile``.

    Raises ``KeyError`` for an unknown sample type.
    """
    data = profile_to_json(profile, value, title)
    js, css = flamegraph_js(), flamegraph_css()
    if "</script" in js.lower() or "</style" in css.lower():
        raise RuntimeError("flamegraph assets must not close their own element")
    page = _asset("flamegraph.html")
    # data last: it is the only part that comes from the profile
    page = page.replace("__MW_TITLE__", html.escape(title))
    for marker, text in (
        ("/*__MW_CSS__*/", css),
        ("/*__MW_JS__*/", js),
        ("__MW_DATA__", json_for_script(data)),
    ):
        page = page.replace(marker, text, 1)
    return page
