"""The views (table, sandwich, folded, speedscope, diff, flame graph JSON/HTML) on synthetic profiles."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from middleware.profile import Frame, Profile, Sample
from middleware.reporters import format_value
from middleware.reporters.diff import diff_profiles, render_diff
from middleware.reporters.flamegraph import (
    DIFF_SCALE,
    diff_to_json,
    flamegraph_js,
    json_for_script,
    profile_to_json,
    render_html,
)
from middleware.reporters.folded import folded_stacks, render_folded
from middleware.reporters.sandwich import (
    FunctionMatchError,
    find_function,
    render_sandwich,
    sandwich,
)
from middleware.reporters.speedscope import SCHEMA_URL, speedscope_document
from middleware.reporters.table import function_table, render_table
from support.profiles import PERIOD, build, calc_profile, recursive_profile, sample

pytestmark = pytest.mark.unit

MS = 1_000_000


# ------------------------------------------------------------------------------------------------
# table
# ------------------------------------------------------------------------------------------------
def test_table_calc3_first_and_self_sums_to_total():
    p = calc_profile()
    rows = function_table(p, "cpu")
    assert [r.function for r in rows] == ["calc3", "calc2", "calc1", "helper", "main", "handle"]
    got = {r.function: (r.self_value // MS, r.total_value // MS) for r in rows}
    assert got == {
        "calc3": (600, 640), "calc2": (150, 790), "calc1": (100, 950),
        "helper": (100, 100), "main": (50, 1000), "handle": (0, 950),
    }
    assert sum(r.self_value for r in rows) == p.total("cpu")
    assert rows[0].self_percent == pytest.approx(60.0) and rows[0].total_percent == pytest.approx(64.0)
    assert rows[0].line == 40, "calc3's hottest line (500ms at 40 vs 100ms at 41)"
    assert all(r.profile_total == p.total("cpu") for r in rows)


def test_table_other_values_and_sorts():
    p = calc_profile()
    wall = function_table(p, "wall")
    assert wall[0].function == "main" and wall[0].self_value == 2000 * MS
    assert sum(r.self_value for r in wall) == p.total("wall")
    assert function_table(p, "samples")[0].self_value == 60
    by_total = [r.function for r in function_table(p, sort="total")]
    assert by_total == ["main", "calc1", "handle", "calc2", "calc3", "helper"]
    assert [r.function for r in function_table(p, sort="name")] == sorted(by_total)
    with pytest.raises(ValueError):
        function_table(p, sort="bogus")
    with pytest.raises(KeyError):
        function_table(p, "alloc")


def test_table_counts_recursive_function_once_per_sample():
    rows = {r.function: r for r in function_table(recursive_profile())}
    assert rows["fib"].total_value == 600 * MS, "not 300*3 + 200*2 + 100"
    assert rows["fib"].self_value == 500 * MS
    assert rows["main"].total_value == 1000 * MS
    assert sum(r.self_value for r in rows.values()) == 1000 * MS


def test_table_keeps_same_name_in_different_files_apart():
    p = build([sample("run@a.py:1", 10 * MS), sample("run@b.py:2", 30 * MS)])
    rows = function_table(p)
    assert [(r.function, r.file) for r in rows] == [("run", "b.py"), ("run", "a.py")]


def test_render_table_text():
    rows = function_table(calc_profile())
    text = render_table(rows, "nanoseconds", limit=2, header="HEADER")
    lines = text.splitlines()
    assert lines[0] == "HEADER"
    assert re.match(r"^\s*Self\s+Self%\s+Total\s+Total%\s+Function\s+Location$", lines[1])
    assert re.match(r"^600\.00ms\s+60\.00%\s+640\.00ms\s+64\.00%\s+calc3\s+app\.py:40$", lines[2].strip())
    assert "calc2" in lines[3]
    assert lines[4] == "(4 more functions; use --limit 0 to show all)"
    assert len(render_table(rows, "nanoseconds", limit=0).splitlines()) == 7


@pytest.mark.parametrize(
    "value, unit, text",
    [(1_500_000_000, "nanoseconds", "1.50s"), (2_500_000, "nanoseconds", "2.50ms"), (1500, "nanoseconds", "1.50us"),
     (7, "nanoseconds", "7ns"), (3, "seconds", "3.00s"), (42, "count", "42"), (3 << 20, "bytes", "3.00MiB")],
)
def test_format_value(value, unit, text):
    assert format_value(value, unit) == text


# ------------------------------------------------------------------------------------------------
# sandwich
# ------------------------------------------------------------------------------------------------
def test_sandwich_calc3():
    sw = sandwich(calc_profile(), "calc3", "cpu")
    assert (sw.function, sw.file) == ("calc3", "app.py")
    assert [(r.function, r.value // MS) for r in sw.callers] == [("calc2", 640)]
    assert [(r.function, r.value // MS) for r in sw.callees] == [("helper", 40)]
    assert (sw.self_value // MS, sw.total_value // MS) == (600, 640)
    assert sw.total_percent == pytest.approx(64.0)
    text = render_sandwich(sw, "nanoseconds")
    assert text.splitlines()[0] == "Callers of calc3:"
    assert re.search(r"640\.00ms\s+64\.00%\s+calc2", text)
    assert "==> calc3 (app.py)  total 640.00ms (64.00%)  self 600.00ms (60.00%)" in text


def test_sandwich_helper_has_two_callers_and_recursion_is_counted_once():
    sw = sandwich(calc_profile(), "helper")
    assert [(r.function, r.value // MS) for r in sw.callers] == [("calc1", 60), ("calc3", 40)]
    assert sw.callees == [] and "(none)" in render_sandwich(sw, "nanoseconds")
    fib = sandwich(recursive_profile(), "fib")
    assert [(r.function, r.value // MS) for r in fib.callers] == [("main", 600)]
    assert [(r.function, r.value // MS) for r in fib.callees] == [("helper", 100)]
    assert fib.total_value == 600 * MS and fib.self_value == 500 * MS


def test_find_function_rules():
    p = build([
        sample("main;Calc.run@calc.py:3;calc3@calc.py:9", 10 * MS),
        sample("main;Other.run_fast@o.py:1", 10 * MS),
        sample("main;util@a/x.py:1", 5 * MS),
        sample("main;util@b/x.py:1", 5 * MS),
    ])
    assert find_function(p, "Calc.run") == ("Calc.run", "calc.py")
    assert find_function(p, "run") == ("Calc.run", "calc.py"), "unique .suffix beats substring"
    assert find_function(p, "run_f") == ("Other.run_fast", "o.py"), "unique substring"
    assert find_function(p, "CALC3") == ("calc3", "calc.py"), "substring is case-insensitive"
    assert find_function(p, "b/x.py:util") == ("util", "b/x.py")
    with pytest.raises(FunctionMatchError, match=r"'util' is ambiguous .*util \(a/x.py\), util \(b/x.py\)"):
        find_function(p, "util")
    with pytest.raises(FunctionMatchError, match=r"'Calc' is ambiguous \(is part of 2 functions"):
        find_function(p, "Calc")
    with pytest.raises(FunctionMatchError, match=r"no function matching 'calc4' in the profile \(did you mean calc3"):
        find_function(p, "calc4")


# ------------------------------------------------------------------------------------------------
# folded, speedscope
# ------------------------------------------------------------------------------------------------
def test_folded():
    p = calc_profile()
    assert render_folded(p, "cpu") == (
        "main 50000000\n"
        "main;handle;calc1 100000000\n"
        "main;handle;calc1;calc2 150000000\n"
        "main;handle;calc1;calc2;calc3 600000000\n"  # two lines of calc3 merged
        "main;handle;calc1;calc2;calc3;helper 40000000\n"
        "main;handle;calc1;helper 60000000\n"
    )
    assert sum(folded_stacks(p, "wall").values()) == p.total("wall")
    odd = build([sample("a;b", 0), Sample((Frame("x;y"), Frame("z\nw")), (1, 5, 5))])
    assert render_folded(odd) == "x:y;z w 5\n", "zero values dropped, separators escaped"


def test_speedscope_document():
    p = calc_profile()
    doc = speedscope_document(p, "cpu", name="calc")
    assert doc["$schema"] == SCHEMA_URL and doc["name"] == "calc"
    frames = doc["shared"]["frames"]
    assert {"name": "calc3", "file": "app.py"} in frames
    names = {pr["name"]: pr for pr in doc["profiles"]}
    assert set(names) == {"cpu - MainThread", "cpu - worker-1"}
    assert doc["profiles"][0]["name"] == "cpu - MainThread", "busiest thread first"
    total = 0
    for prof in doc["profiles"]:
        assert prof["type"] == "sampled" and prof["unit"] == "nanoseconds" and prof["startValue"] == 0
        assert len(prof["samples"]) == len(prof["weights"])
        assert prof["endValue"] == sum(prof["weights"])
        total += prof["endValue"]
        for stack in prof["samples"]:
            assert frames[stack[0]]["name"] == "main", "stacks are root first"
    assert total == p.total("cpu")
    worker = names["cpu - worker-1"]
    stacks = {tuple(frames[i]["name"] for i in s): w for s, w in zip(worker["samples"], worker["weights"], strict=True)}
    assert stacks == {("main", "handle", "calc1", "calc2", "calc3"): 100 * MS,
                      ("main", "handle", "calc1", "calc2", "calc3", "helper"): 40 * MS}
    assert json.loads(json.dumps(doc)) == doc
    assert speedscope_document(p, "samples")["profiles"][0]["unit"] == "none"


# ------------------------------------------------------------------------------------------------
# diff
# ------------------------------------------------------------------------------------------------
def test_diff_shares():
    before = build(
        [sample("main;calc1;calc2", 500 * MS), sample("main;calc1;calc3", 300 * MS), sample("main;io", 200 * MS)]
    )
    after = build(
        [sample("main;calc1;calc2", 100 * MS), sample("main;calc1;calc3", 1400 * MS), sample("main;new", 500 * MS)]
    )
    rows = diff_profiles(before, after, "cpu")
    got = [(r.function, round(r.before_percent, 2), round(r.after_percent, 2), round(r.change, 2)) for r in rows]
    assert got == [
        ("calc2", 50.0, 5.0, -45.0),
        ("calc3", 30.0, 70.0, 40.0),
        ("new", 0.0, 25.0, 25.0),
        ("io", 20.0, 0.0, -20.0),
    ], "sorted by absolute change; functions with no Self on either side left out"
    text = render_diff(rows, "nanoseconds", limit=2)
    assert re.search(r"-45\.00pp\s+50\.00%\s+5\.00%\s+500\.00ms\s+100\.00ms\s+calc2", text)
    assert re.search(r"\+40\.00pp\s+30\.00%\s+70\.00%\s+300\.00ms\s+1\.40s\s+calc3", text)
    assert "(2 more functions" in text
    with pytest.raises(KeyError):
        diff_profiles(before, Profile(sample_types=[("wall", "nanoseconds")]), "cpu")


# ------------------------------------------------------------------------------------------------
# flame graph JSON and page
# ------------------------------------------------------------------------------------------------
def _children(node, data):
    return data["deep"][node["cx"]] if "cx" in node else node["c"]


def _check_tree(data, exact=True):
    """Walk tree + deep chunks; check the sums and orders. Returns (node count, max depth)."""
    functions, count, max_depth = data["functions"], 0, 0
    todo = [(data["tree"], 0)]
    while todo:
        node, depth = todo.pop()
        count, max_depth = count + 1, max(max_depth, depth)
        children = _children(node, data)
        if "cx" in node:
            assert node["c"] == []
        if exact:
            assert node["v"] == node["s"] + sum(c["v"] for c in children)
        else:
            assert node["v"] >= node["s"] + sum(c["v"] for c in children)
        assert [c["v"] for c in children] == sorted((c["v"] for c in children), reverse=True)
        assert len({c["f"] for c in children}) == len(children), "siblings merged by function"
        for c in children:
            assert 0 <= c["f"] < len(functions)
            todo.append((c, depth + 1))
    return count, max_depth


def test_profile_to_json_tree_and_table():
    p = calc_profile()
    data = profile_to_json(p, "cpu", title="t")
    assert data["version"] == 1 and data["value"] == {"name": "cpu", "unit": "nanoseconds"}
    assert data["total"] == p.total("cpu") == data["tree"]["v"]
    fns = data["functions"]
    assert [f["name"] for f in fns] == [r.function for r in function_table(p, "cpu")]
    assert fns[0] == {"name": "calc3", "file": "app.py", "line": 40, "self": 600 * MS, "total": 640 * MS}
    assert _check_tree(data) == (8, 6)  # all, main, handle, calc1, calc2, calc3, helper x2
    assert data["pruned_nodes"] == 0 and data["deep"] == []
    # follow main > handle > calc1 > calc2 > calc3
    node = data["tree"]
    for name in ["main", "handle", "calc1", "calc2", "calc3"]:
        node = next(c for c in node["c"] if fns[c["f"]]["name"] == name)
    assert (node["v"], node["s"]) == (640 * MS, 600 * MS)
    # self of each function in the tree adds up to its table Self
    selfs: dict[int, int] = {}
    todo = [data["tree"]]
    while todo:
        n = todo.pop()
        if n["f"] >= 0:
            selfs[n["f"]] = selfs.get(n["f"], 0) + n["s"]
        todo.extend(n["c"])
    assert all(selfs.get(i, 0) == f["self"] for i, f in enumerate(fns))
    assert profile_to_json(p, "wall")["total"] == p.total("wall")


def test_profile_to_json_deep_stacks_serialize_on_every_python():
    """CPython 3.10-3.12's json.dumps recurses: 1500 nested levels would raise RecursionError."""
    depth = 1500
    deep = build([Sample(tuple(Frame(f"f{i}", "d.py", i) for i in range(depth)), (1, 10 * MS, 10 * MS)),
                  Sample(tuple(Frame(f"f{i}", "d.py", i) for i in range(700)), (1, 5 * MS, 5 * MS))])
    data = json.loads(json.dumps(profile_to_json(deep)))
    assert len(data["deep"]) >= depth // 128
    assert _check_tree(data) == (depth + 1, depth)
    # the node for f699 has both self (5ms) and a child (f700)
    node = data["tree"]
    for _ in range(700):
        (node,) = _children(node, data)
    assert data["functions"][node["f"]]["name"] == "f699" and (node["v"], node["s"]) == (15 * MS, 5 * MS)


def test_profile_to_json_prunes_smallest_paths_beyond_max_nodes():
    p = build([sample(f"main;mid{i % 7};leaf{i}", (i + 1) * MS) for i in range(200)])
    full = profile_to_json(p, max_nodes=None)
    assert _check_tree(full)[0] == 1 + 1 + 7 + 200 and full["pruned_nodes"] == 0
    small = profile_to_json(p, max_nodes=50)
    count, _ = _check_tree(small, exact=False)
    assert count <= 50 and small["pruned_nodes"] == 209 - count
    kept_leaves = sorted(small["functions"][c["f"]]["name"] for m in small["tree"]["c"][0]["c"] for c in m["c"])
    assert kept_leaves == sorted(f"leaf{i}" for i in range(200 - len(kept_leaves), 200)), "the biggest paths stay"
    assert all(c["v"] >= small["pruned_below"] for m in small["tree"]["c"][0]["c"] for c in m["c"])
    assert small["functions"] == full["functions"], "the table stays complete"
    assert small["total"] == full["total"] == small["tree"]["v"]


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_diff_flame_graph_data_weighs_both_sides_by_share():
    before = build(
        [sample("main;calc1;calc2", 500 * MS), sample("main;calc1;calc3", 300 * MS), sample("main;io", 200 * MS)]
    )
    after = build(  # twice the total: shares, not values, are compared
        [sample("main;calc1;calc2", 200 * MS), sample("main;calc1;calc3", 1400 * MS), sample("main;new", 400 * MS)]
    )
    data = diff_to_json(before, after, "cpu", names=("old", "new"))
    assert data["diff"] == {"total_a": 1000 * MS, "total_b": 2000 * MS, "name_a": "old", "name_b": "new"}
    assert data["value"] == {"name": "cpu", "unit": "nanoseconds"}
    tree = data["tree"]
    assert (tree["a"], tree["b"], tree["v"]) == (1000 * MS, 2000 * MS, 2 * DIFF_SCALE)
    fns = [f["name"] for f in data["functions"]]
    main = tree["c"][0]
    by_name = {fns[c["f"]]: c for c in main["c"]}
    # calc1: 80% of A, 80% of B; io: only in A; new: only in B
    assert (by_name["calc1"]["a"], by_name["calc1"]["b"]) == (800 * MS, 1600 * MS)
    assert by_name["calc1"]["v"] == pytest.approx(1.6 * DIFF_SCALE, abs=2)
    assert (by_name["io"]["a"], by_name["io"]["b"]) == (200 * MS, 0)
    assert (by_name["new"]["a"], by_name["new"]["b"]) == (0, 400 * MS)
    calc3 = next(f for f in data["functions"] if f["name"] == "calc3")
    assert (calc3["self_a"], calc3["self_b"], calc3["total_a"], calc3["total_b"]) == (300 * MS, 1400 * MS,
                                                                                      300 * MS, 1400 * MS)
    page = render_html(after, title="diff", data=data)
    embedded = re.search(r'<script type="application/json" id="mw-profile-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(embedded)["diff"]["name_b"] == "new"
    with pytest.raises(KeyError):
        diff_to_json(before, after, "bogus")


def test_render_html_is_self_contained():
    page = render_html(calc_profile(), title="calc <workload>")
    parser = _Collect()
    parser.feed(page)
    tags = parser.tags
    assert not [t for t in tags if t[0] in ("link", "img", "iframe")]
    assert not [t for t in tags if "src" in t[1] or "href" in t[1]], "nothing loaded from elsewhere"
    assert not re.search(r"\bfetch\s*\(|XMLHttpRequest|\bimport\s*\(|WebSocket|EventSource|https?:", flamegraph_js()), (
        "the viewer makes no requests"
    )
    assert "<title>calc &lt;workload&gt;</title>" in page and "<h1>calc &lt;workload&gt;</h1>" in page
    assert "__MW_" not in page, "every placeholder filled"
    data = re.search(r'<script type="application/json" id="mw-profile-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data) == json.loads(json.dumps(profile_to_json(calc_profile(), title="calc <workload>")))


def test_render_html_escapes_hostile_names():
    evil = "</script><script>alert(1)</script>"
    p = build([Sample((Frame(evil, "<b>.py", 1),), (1, 10 * PERIOD, 10 * PERIOD))])
    page = render_html(p)
    assert evil not in page and page.count("</script>") == 3
    embedded = re.search(r'id="mw-profile-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(embedded)["functions"][0]["name"] == evil
    assert json_for_script({"a": "\u2028&"}) == '{"a":"\\u2028\\u0026"}'


def test_diff_of_in_use_memory_is_the_growth_view() -> None:
    # biggest growth first, whatever the shares (a leak with a small share but the most growth leads)
    from support.profiles import stack

    def window(leak: int, big: int) -> Profile:
        types = [("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"),
                 ("inuse_space", "bytes")]
        return Profile(sample_types=types, samples=[Sample(stack("main;leak"), (0, 0, 1, leak)),
                                                    Sample(stack("main;big"), (0, 0, 1, big))],
                       period_type=("space", "bytes"), default_sample_type="inuse_space")

    rows = diff_profiles(window(1 << 20, 100 << 20), window(3 << 20, 120 << 20), "inuse_space")
    assert [(r.function, r.growth) for r in rows] == [("big", 20 << 20), ("leak", 2 << 20)]
    rows = diff_profiles(window(1 << 20, 100 << 20), window(30 << 20, 100 << 20), "inuse_space")
    assert rows[0].function == "leak" and rows[0].growth == 29 << 20
    text = render_diff(rows, "bytes", growth=True)
    assert text.splitlines()[0].split()[0] == "Growth" and "+29.00MiB" in text
