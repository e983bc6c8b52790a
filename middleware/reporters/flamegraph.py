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
        {"f": function id, "v": total value, "s": self value, "c": [...]}, ...]},
      "deep": [[node, ...], ...],                           # continuation child lists (below)
      "pruned_nodes": int, "pruned_below": int              # nodes left out (see max_nodes)
    }

Tree nodes merge frames by function (name and file), not by line, so each function is one box
per call path. ``v`` of a node is its ``s`` plus the ``v`` of its children, except where small
children were pruned (``pruned_nodes > 0``: every node whose value is below ``pruned_below`` is
left out; the table is still exact).

Nesting is capped so that ``json.dumps`` (recursive, ~1000 levels on CPython 3.10-3.12) never
fails on deep stacks: a node :data:`CHUNK_DEPTH` levels below the top of its chunk has ``"c": []``
and ``"cx": i`` instead, its children being ``deep[i]`` (nested the same way).
"""
from __future__ import annotations

import gc
import html
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib import resources
from typing import Any

from middleware.profile import Profile, Sample
from middleware.reporters import resolve_value
from middleware.reporters.table import NO_FRAMES, FunctionKey, function_table

logger = logging.getLogger(__name__)

__all__ = ["profile_to_json", "diff_to_json", "render_html", "flamegraph_js", "flamegraph_css", "json_for_script"]

JSON_VERSION = 1
#: Default bound on the number of tree nodes sent to the browser.
DEFAULT_MAX_NODES = 100_000
#: Tree levels per nested chunk; deeper children continue in ``deep`` (see module doc).
CHUNK_DEPTH = 128


@cache
def _asset(name: str) -> str:
    return resources.files("middleware.reporters").joinpath(name).read_text(encoding="utf-8")


def flamegraph_js() -> str:
    """The viewer script (defines ``window.MwFlame``)."""
    return _asset("flamegraph.js")


def flamegraph_css() -> str:
    """The viewer's style sheet."""
    return _asset("flamegraph.css")


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Building a tree allocates up to millions of small containers: keep the cyclic GC from
    rescanning them over and over (it made the build several times slower)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _build_tree(profile: Profile, index: int, fids: dict[FunctionKey, int], extra: tuple[int, ...] = ()) -> list[Any]:
    """Call tree as nested lists ``[fid, total, self, {fid: child}, *extra totals]``; the root has
    fid -1. ``extra``: indexes of further sample types whose totals each node also sums."""
    root: list[Any] = [-1, 0, 0, {}] + [0] * len(extra)
    for sample in profile.samples:
        v = sample.values[index]
        if not v:
            continue
        more = [sample.values[i] for i in extra]
        node = root
        node[1] += v
        for k, x in enumerate(more):
            node[4 + k] += x
        for frame in sample.stack or NO_FRAMES:
            fid = fids[(frame.function, frame.file)]
            child = node[3].get(fid)
            if child is None:
                child = node[3][fid] = [fid, 0, 0, {}] + [0] * len(extra)
            child[1] += v
            for k, x in enumerate(more):
                child[4 + k] += x
            node = child
        node[2] += v
    return root


def _prune_threshold(root: list[Any], max_nodes: int | None) -> int:
    """Smallest node value to keep so that at most ``max_nodes`` nodes remain (1: keep all).

    A node's value is at least the value of each of its children, so keeping the nodes at or
    above a threshold keeps a connected tree.
    """
    if not max_nodes or max_nodes <= 0:
        return 1
    values: list[int] = []
    todo = [root]
    while todo:
        node = todo.pop()
        values.append(node[1])
        todo.extend(node[3].values())
    if len(values) <= max_nodes:
        return 1
    values.sort(reverse=True)
    return values[max_nodes] + 1


def _node_json(node: list[Any], extra: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"f": node[0], "v": node[1], "s": node[2], "c": []}
    for k, key in enumerate(extra):
        out[key] = node[4 + k]
    return out


def _tree_json(
    root: list[Any], threshold: int, extra: tuple[str, ...] = ()
) -> tuple[dict[str, Any], list[list[dict[str, Any]]], int]:
    """``(tree, deep, dropped)``: nested dict nodes, the child lists cut off at CHUNK_DEPTH, and
    the number of nodes left out (value below ``threshold``). Built without recursion. ``extra``:
    the keys of the nodes' extra totals (see :func:`_build_tree`)."""
    tree: dict[str, Any] = _node_json(root, extra)
    deep: list[list[dict[str, Any]]] = []
    dropped = 0
    todo: list[tuple[list[Any], dict[str, Any], int]] = [(root, tree, 0)]
    while todo:
        src, out, depth = todo.pop()
        kids = sorted(src[3].values(), key=lambda n: (-n[1], n[0]))
        kept = [k for k in kids if k[1] >= threshold]
        if len(kept) < len(kids):
            stack = [k for k in kids if k[1] < threshold]
            while stack:  # count the whole dropped subtrees
                n = stack.pop()
                dropped += 1
                stack.extend(n[3].values())
        children: list[dict[str, Any]] = [_node_json(k, extra) for k in kept]
        if depth + 1 >= CHUNK_DEPTH and children:
            out["cx"] = len(deep)
            deep.append(children)
            child_depth = 0
        else:
            out["c"] = children
            child_depth = depth + 1
        todo.extend((k, c, child_depth) for k, c in zip(kept, children, strict=True))
    return tree, deep, dropped


def profile_to_json(
    profile: Profile,
    value: str | None = None,
    title: str = "",
    max_nodes: int | None = DEFAULT_MAX_NODES,
) -> dict[str, Any]:
    """The viewer's data for sample type ``value`` (None: the profile's default); see module doc.

    ``max_nodes`` bounds the size of the tree (None or 0: no bound): the smallest call paths are
    left out and counted in ``pruned_nodes``. The function table is always complete.
    Raises ``KeyError`` for an unknown sample type.
    """
    index, name, unit = resolve_value(profile, value)
    rows = function_table(profile, name, sort="self")
    fids: dict[FunctionKey, int] = {row.key: i for i, row in enumerate(rows)}
    with _gc_paused():
        root = _build_tree(profile, index, fids)
        threshold = _prune_threshold(root, max_nodes)
        tree, deep, dropped = _tree_json(root, threshold)
    if dropped:
        logger.info("flame graph: left out %d call paths below %d", dropped, threshold)
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
        "tree": tree,
        "deep": deep,
        "pruned_nodes": dropped,
        "pruned_below": threshold if dropped else 0,
    }


#: Each side of a diff weighs the same: a value counts as its share of its side's total, in
#: billionths (so the root of a diff tree is 2e9 when both sides have samples).
DIFF_SCALE = 1_000_000_000


def diff_to_json(
    before: Profile,
    after: Profile,
    value: str | None = None,
    title: str = "",
    names: tuple[str, str] = ("A", "B"),
    max_nodes: int | None = DEFAULT_MAX_NODES,
) -> dict[str, Any]:
    """The viewer's data for the diff flame graph of ``before`` (A) and ``after`` (B).

    One tree of the stacks of both sides. A node's ``v``/``s`` weigh each side by its share of
    that side's total (:data:`DIFF_SCALE`), so both sides count alike whatever their sizes; ``a``
    and ``b`` are the node's total values on each side, in the sample type's unit. Functions carry
    ``self_a``/``self_b``/``total_a``/``total_b`` likewise. ``diff`` holds both totals and names.
    The viewer colours a frame by the change of its share from A to B.
    """
    ia, name, unit = resolve_value(before, value)
    ib, _, _ = resolve_value(after, name)
    ta, tb = before.total(name), after.total(name)

    def weighed(p: Profile, i: int, total: int, side: int) -> list[Sample]:
        out = []
        for smp in p.samples:
            v = smp.values[i]
            if v:
                vals = (v, 0) if side == 0 else (0, v)
                out.append(Sample(smp.stack, (*vals, v * DIFF_SCALE // total), smp.labels))
        return out

    both = Profile(sample_types=[("a", unit), ("b", unit), ("weight", "share")],
                   samples=weighed(before, ia, ta, 0) + weighed(after, ib, tb, 1))
    rows = function_table(both, "weight", sort="self")
    side = [{r.key: r for r in function_table(both, t)} for t in ("a", "b")]
    fids: dict[FunctionKey, int] = {row.key: i for i, row in enumerate(rows)}
    with _gc_paused():
        root = _build_tree(both, 2, fids, extra=(0, 1))
        threshold = _prune_threshold(root, max_nodes)
        tree, deep, dropped = _tree_json(root, threshold, extra=("a", "b"))

    def side_values(key: FunctionKey, k: int) -> tuple[int, int]:
        r = side[k].get(key)
        return (r.self_value, r.total_value) if r else (0, 0)

    functions = []
    for r in rows:
        (sa, tota), (sb, totb) = side_values(r.key, 0), side_values(r.key, 1)
        functions.append({"name": r.function, "file": r.file, "line": r.line, "self": r.self_value,
                          "total": r.total_value, "self_a": sa, "self_b": sb, "total_a": tota, "total_b": totb})
    return {
        "version": JSON_VERSION,
        "title": title,
        "value": {"name": name, "unit": unit},
        "sample_types": [[name, unit]],
        "total": root[1],
        "samples": len(both.samples),
        "time_nanos": min((t for t in (before.time_nanos, after.time_nanos) if t), default=0),
        "duration_nanos": 0,
        "functions": functions,
        "tree": tree,
        "deep": deep,
        "pruned_nodes": dropped,
        "pruned_below": threshold if dropped else 0,
        "diff": {"total_a": ta, "total_b": tb, "name_a": names[0], "name_b": names[1]},
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


def render_html(
    profile: Profile, title: str = "middleware profile", value: str | None = None, data: dict[str, Any] | None = None
) -> str:
    """One self-contained HTML page (no external resources) showing ``profile`` (or ``data``, the
    viewer's data made already, e.g. by :func:`diff_to_json`).

    Raises ``KeyError`` for an unknown sample type.
    """
    if data is None:
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
