"""The flame graph page in headless Chromium (selenium + Debian's chromium-driver).

GIVEN the calc workload profile (calc3 is the bottleneck, called by calc2)
WHEN `python -m middleware flamegraph -o calc.html` writes the page and Chromium opens it
THEN the stacks are drawn nested, clicking calc3 in the table highlights calc3's frames in the
flame graph and the sandwich lists calc2 as its caller; search, zoom and sorting work.
Screenshots go to artifacts/.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from middleware.pprof import write_pprof_file
from support.browser import chromium_driver
from support.profiles import calc_profile

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"


@pytest.fixture(scope="module")
def driver():
    yield from chromium_driver("1500,900")


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("flame")
    src = d / "calc.pb.gz"
    write_pprof_file(calc_profile(), src)
    out = d / "calc.html"
    proc = subprocess.run(
        [sys.executable, "-m", "middleware", "flamegraph", "-o", str(out), "--title", "calc workload", str(src)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def _open(driver, page: Path) -> None:
    driver.get(page.as_uri())
    driver.execute_script("return document.readyState")  # wait for the load
    assert driver.execute_script("return !!window.mwViewer"), "viewer did not mount"


def _rect(driver, css: str) -> dict:
    return driver.execute_script(
        "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
        "return {left: r.left, right: r.right, top: r.top, width: r.width};",
        css,
    )


def _screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path)), f"screenshot {path} failed"
    return path


def _severe_console_errors(driver) -> list[str]:
    try:
        logs = driver.get_log("browser")
    except Exception:  # not every driver exposes logs
        return []
    return [e["message"] for e in logs if e.get("level") == "SEVERE"]


def test_flame_graph_renders_nested_stacks(driver, page):
    _open(driver, page)
    frames = driver.execute_script("return window.mwViewer.frames()")
    by_fn: dict[str, list[dict]] = {}
    for f in frames:
        by_fn.setdefault(f["function"], []).append(f)

    # the calc chain is drawn one level below its caller: all(0) main(1) handle(2) calc1(3) calc2(4) calc3(5)
    for depth, fn in enumerate(["all", "main", "handle", "calc1", "calc2", "calc3"]):
        assert fn in by_fn, f"{fn} not drawn; drawn: {sorted(by_fn)}"
        assert depth in {f["depth"] for f in by_fn[fn]}, (fn, by_fn[fn])
    # widths are shares of the total (calc3 total 64%, calc2 79%, main 100%)
    assert by_fn["calc3"][0]["width"] == pytest.approx(0.64, abs=1e-6)
    assert by_fn["calc2"][0]["width"] == pytest.approx(0.79, abs=1e-6)
    assert by_fn["main"][0]["width"] == pytest.approx(1.0, abs=1e-6)
    # helper is drawn twice: under calc1 and under calc3
    assert sorted(f["depth"] for f in by_fn["helper"]) == [4, 6]

    # on screen: calc3's box lies inside calc2's horizontally and one row lower
    calc2 = _rect(driver, '#mw-flame .mw-frame[data-function="calc2"]')
    calc3 = _rect(driver, '#mw-flame .mw-frame[data-function="calc3"]')
    assert calc2["left"] - 0.5 <= calc3["left"] and calc3["right"] <= calc2["right"] + 0.5
    assert calc3["top"] > calc2["top"]
    assert calc3["width"] > 100, "calc3 should be a wide box"
    assert not _severe_console_errors(driver)
    _screenshot(driver, "flamegraph_calc_initial.png")


def test_clicking_calc3_in_table_highlights_it_and_shows_sandwich(driver, page):
    _open(driver, page)
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#mw-table tbody tr[data-function]")
    assert rows[0].get_attribute("data-function") == "calc3", "table is sorted by Self: calc3 first"
    assert not driver.find_elements(By.CSS_SELECTOR, "#mw-flame .mw-frame.highlighted")

    driver.find_element(By.CSS_SELECTOR, '#mw-table tr[data-function="calc3"]').click()

    highlighted = driver.find_elements(By.CSS_SELECTOR, "#mw-flame .mw-frame.highlighted")
    assert highlighted, "no frame highlighted after clicking calc3"
    assert {h.get_attribute("data-function") for h in highlighted} == {"calc3"}
    all_calc3 = driver.find_elements(By.CSS_SELECTOR, '#mw-flame .mw-frame[data-function="calc3"]')
    assert len(highlighted) == len(all_calc3)
    # the highlight is visible, not just a class: the box colour changed
    colour = driver.execute_script(
        "return getComputedStyle(document.querySelector('#mw-flame .mw-frame.highlighted')).backgroundColor"
    )
    other = driver.execute_script(
        "return getComputedStyle("
        "document.querySelector('#mw-flame .mw-frame[data-function=\"calc2\"]')).backgroundColor"
    )
    assert colour != other
    row = driver.find_element(By.CSS_SELECTOR, '#mw-table tr[data-function="calc3"]')
    assert "selected" in row.get_attribute("class").split()

    # sandwich: calc2 calls calc3 (all of calc3's 640ms), calc3 calls helper (40ms)
    assert driver.find_element(By.ID, "mw-sandwich-title").text == "calc3"
    callers = driver.find_elements(By.CSS_SELECTOR, "#mw-callers tr[data-function]")
    assert [c.get_attribute("data-function") for c in callers] == ["calc2"]
    assert callers[0].find_element(By.CSS_SELECTOR, "td[data-value]").get_attribute("data-value") == str(640_000_000)
    callees = driver.find_elements(By.CSS_SELECTOR, "#mw-callees tr[data-function]")
    assert [c.get_attribute("data-function") for c in callees] == ["helper"]
    assert "64.00%" in driver.find_element(By.ID, "mw-sandwich-summary").text
    _screenshot(driver, "flamegraph_calc3_highlighted.png")

    # clicking a caller in the sandwich moves the selection to it
    driver.find_element(By.CSS_SELECTOR, '#mw-callers tr[data-function="calc2"]').click()
    assert {
        h.get_attribute("data-function") for h in driver.find_elements(By.CSS_SELECTOR, "#mw-flame .highlighted")
    } == {"calc2"}
    assert [
        c.get_attribute("data-function") for c in driver.find_elements(By.CSS_SELECTOR, "#mw-callers tr[data-function]")
    ] == ["calc1"]


def test_search_zoom_and_sort(driver, page):
    _open(driver, page)
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "mw-search")
    box.send_keys("helper")
    share = driver.find_element(By.ID, "mw-search-share")
    assert share.get_attribute("data-share") == "10.00"
    assert "10.00%" in share.text
    matched = {
        m.get_attribute("data-function") for m in driver.find_elements(By.CSS_SELECTOR, "#mw-flame .mw-frame.match")
    }
    assert matched == {"helper"}
    box.clear()
    box.send_keys("calc")  # calc1 is on every calc stack: 95%
    assert share.get_attribute("data-share") == "95.00"
    _screenshot(driver, "flamegraph_search.png")
    driver.execute_script("window.mwViewer.search('')")

    # zoom on calc2: it becomes the full width, calc3 scales to 600+40 / 790 of it
    driver.find_element(By.CSS_SELECTOR, '#mw-flame .mw-frame[data-function="calc2"]').click()
    frames = {f["function"]: f for f in driver.execute_script("return window.mwViewer.frames()") if f["depth"] >= 4}
    assert frames["calc2"]["width"] == pytest.approx(1.0)
    assert frames["calc3"]["width"] == pytest.approx(640 / 790, abs=1e-6)
    assert "helper" in frames  # the helper under calc3 is drawn, the one under calc1 is not in the subtree
    assert driver.find_element(By.ID, "mw-zoom-info").text.startswith("Zoomed on calc2")
    _screenshot(driver, "flamegraph_zoom_calc2.png")
    driver.find_element(By.ID, "mw-reset").click()
    widths = {f["function"]: f["width"] for f in driver.execute_script("return window.mwViewer.frames()")}
    assert widths["calc2"] == pytest.approx(0.79)

    # sort by Total: main (100%) first, then calc1 (95%) ... handle (95%, no self) comes after calc1
    driver.find_element(By.CSS_SELECTOR, '#mw-table th[data-sort="total"]').click()
    order = [r.get_attribute("data-function") for r in driver.find_elements(By.CSS_SELECTOR, "#mw-table tbody tr")]
    assert order[:4] == ["main", "calc1", "handle", "calc2"]
    driver.find_element(By.CSS_SELECTOR, '#mw-table th[data-sort="self"]').click()
    order = [r.get_attribute("data-function") for r in driver.find_elements(By.CSS_SELECTOR, "#mw-table tbody tr")]
    assert order[0] == "calc3"


def test_page_data_matches_profile_to_json(driver, page):
    """The embedded data is what profile_to_json produces (the serve page uses the same JSON)."""
    from middleware.reporters.flamegraph import profile_to_json

    _open(driver, page)
    embedded = driver.execute_script("return JSON.parse(document.getElementById('mw-profile-data').textContent)")
    expected = json.loads(json.dumps(profile_to_json(calc_profile(), "cpu", "calc workload")))
    assert embedded == expected


def test_deep_stacks_are_drawn_to_the_leaf(driver, tmp_path):
    """Stacks deeper than one JSON chunk (CHUNK_DEPTH levels) continue through `deep`."""
    from middleware.profile import Frame, Sample
    from middleware.reporters.flamegraph import CHUNK_DEPTH, render_html
    from support.profiles import build

    depth = CHUNK_DEPTH * 2 + 30
    stack = tuple(Frame(f"level{i}", "deep.py", i + 1) for i in range(depth))
    page = tmp_path / "deep.html"
    page.write_text(render_html(build([Sample(stack, (1, 10_000_000, 10_000_000))]), title="deep"))
    _open(driver, page)
    frames = driver.execute_script("return window.mwViewer.frames()")
    assert len(frames) == depth + 1
    leaf = max(frames, key=lambda f: f["depth"])
    assert (leaf["function"], leaf["depth"], leaf["width"]) == (f"level{depth - 1}", depth, 1.0)
