"""The serve web page in headless Chromium (selenium + Debian's chromium-driver).

GIVEN a serve holding two services; in "shop" calc3 (called by with_bottleneck, endpoint
/calculate2) runs only in the second half of a 10-minute window
WHEN a user picks the service and the second half as time range
THEN calc3 is at the top of the table; clicking it highlights calc3's frames in the flame graph
and the sandwich lists with_bottleneck as its caller; dragging across the timeline, picking a
label, sorting and the comparison view (two time ranges, two label values) show what the data
says. Screenshots go to artifacts/ (gitignored).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from middleware.profile import Profile, Sample
from middleware.serve import ServeApp, ServeConfig
from support.browser import ARTIFACTS
from support.profiles import build, sample, stack
from support.serve_http import ingest_pprof

pytestmark = pytest.mark.browser

T0 = 1_763_719_200
N = 60
MS = 1_000_000


def upload_profile(i: int) -> Profile:
    samples = [
        sample("main;handle;efficient;calc1", 30 * MS, 30 * MS, {"endpoint": "/calculate1", "thread_name": "w1"}),
        sample("main;handle;efficient;calc2", 20 * MS, 20 * MS, {"endpoint": "/calculate1", "thread_name": "w1"}),
        sample("main;handle;with_bottleneck;calc1", 10 * MS, 10 * MS, {"endpoint": "/calculate2", "thread_name": "w2"}),
    ]
    if i >= N // 2:
        samples.append(
            sample(
                "main;handle;with_bottleneck;calc3",
                300 * MS,
                300 * MS,
                {"endpoint": "/calculate2", "thread_name": "w2"},
            )
        )
    return build(samples, time_nanos=(T0 + 10 * i) * 10**9)


PROFILES = [upload_profile(i) for i in range(N)]


def expected_cpu(start: float, end: float, endpoint: str | None = None) -> int:
    total = 0
    for i, p in enumerate(PROFILES):
        if start <= T0 + 10 * i < end:
            total += (p.filter(labels={"endpoint": endpoint}) if endpoint else p).total("cpu")
    return total


def local(ts: float) -> str:
    """What a user types: local time, like the browser (same machine, same TZ)."""
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    app = ServeApp(ServeConfig(port=0, data_dir=str(tmp_path_factory.mktemp("serve-browser")))).start()
    try:
        for i, p in enumerate(PROFILES):
            ingest_pprof(app, "shop{env=prod}", p, T0 + 10 * i)
        ingest_pprof(app, "another", build([sample("main;idle", 5 * MS)], time_nanos=T0 * 10**9), T0)
        yield app
    finally:
        app.stop()


class Page:
    def __init__(self, drv: Any, app: ServeApp) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select, WebDriverWait

        self.d, self.app, self.By, self.Select, self.Wait = drv, app, By, Select, WebDriverWait

    def open(self) -> None:
        self.d.get(self.app.url + "/")
        self.wait_ready(0)

    def seq(self) -> int:
        return int(self.d.execute_script("return Number(document.body.getAttribute('data-seq') || 0)"))

    def wait_ready(self, after: int) -> None:
        def ready(d: Any) -> bool:
            state = d.execute_script("return document.body.getAttribute('data-state')")
            assert state != "error", self.el("status").text
            return state == "ready" and self.seq() > after

        self.Wait(self.d, 15).until(ready)

    def el(self, id_: str) -> Any:
        return self.d.find_element(self.By.ID, id_)

    def css(self, selector: str) -> list[Any]:
        return self.d.find_elements(self.By.CSS_SELECTOR, selector)

    def when_drawn(self, action: Callable[[], Any]) -> Any:
        """Runs ``action`` until it returns something true, again when it meets a stale element: a
        view that draws its rows again after a fetch (the regressions list, each time its tab
        opens) replaces the ones found before. Returns what it returned."""
        from selenium.common.exceptions import StaleElementReferenceException

        def attempt(d: Any) -> Any:
            try:
                return action()
            except StaleElementReferenceException:
                return False

        return self.Wait(self.d, 10).until(attempt)

    def click_first(self, selector: str) -> None:
        """Clicks the first element that matches, as drawn last (see when_drawn)."""

        def click() -> bool:
            found = self.css(selector)
            if found:
                found[0].click()
            return bool(found)

        self.when_drawn(click)

    def select(self, id_: str, value: str) -> None:
        before = self.seq()
        self.Select(self.el(id_)).select_by_value(value)
        self.wait_ready(before)

    def set_range(self, start: float, end: float) -> None:
        before = self.seq()
        for id_, ts in (("range-from", start), ("range-until", end)):
            box = self.el(id_)
            box.clear()
            box.send_keys(local(ts))
        self.el("apply-range").click()
        self.wait_ready(before)

    def show(self, service: str, start: float, end: float) -> None:
        """Opens the page, then picks ``service`` and the range [start, end]."""
        self.open()
        self.select("service", service)
        self.set_range(start, end)

    def options(self, id_: str) -> list[str]:
        """The values of the options of select ``id_``."""
        return [o.get_attribute("value") for o in self.Select(self.el(id_)).options]

    def table_functions(self) -> list[str]:
        return [tr.get_attribute("data-function") for tr in self.css("#mw-table tbody tr[data-fid]")]

    def shown_total(self) -> int:
        return int(self.d.execute_script("return window.mwViewer.data.total"))

    def shot(self, name: str) -> None:
        self.d.save_screenshot(str(ARTIFACTS / f"serve-{name}.png"))

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.d.get_log("browser") if e["level"] == "SEVERE"]


def test_pick_service_and_range_then_inspect_calc3(driver: Any, server: ServeApp) -> None:
    page = Page(driver, server)
    page.open()
    # GIVEN the page, which starts on the first service ("another"), and says what the store keeps
    assert page.el("service").get_attribute("value") == "another"
    page.Wait(page.d, 10).until(lambda d: page.el("kept").text.startswith("Data kept: "))
    kept = page.el("kept").text
    assert local(T0).rsplit(":", 1)[0] in kept and "retention off" in kept, kept
    # WHEN the user picks "shop" and the second half of the window
    page.select("service", "shop")
    page.set_range(T0 + 300, T0 + 600)
    # THEN the shown profile is exactly the second half's uploads
    assert page.shown_total() == expected_cpu(T0 + 300, T0 + 600) > 0
    bars = page.css("#timeline rect.tl-bar")
    assert bars and sum(int(b.get_attribute("data-value")) for b in bars) == expected_cpu(T0 + 300, T0 + 600)
    # AND calc3 is at the top of the table
    assert page.table_functions()[0] == "calc3"
    page.shot("table")
    # WHEN the user clicks calc3's row
    page.css('#mw-table tbody tr[data-function="calc3"]')[0].click()
    # THEN calc3's frames, and only those, are highlighted in the flame graph
    highlighted = page.css("#mw-flame .mw-frame.highlighted")
    assert highlighted and {f.get_attribute("data-function") for f in highlighted} == {"calc3"}
    assert len(page.css('#mw-flame .mw-frame[data-function="calc3"]')) == len(highlighted)
    assert page.css('#mw-table tbody tr.selected')[0].get_attribute("data-function") == "calc3"
    # AND the sandwich shows calc3 with its caller with_bottleneck (and no callees)
    assert page.el("mw-sandwich-title").text == "calc3"
    callers = [tr.get_attribute("data-function") for tr in page.css("#mw-callers tr[data-function]")]
    assert callers == ["with_bottleneck"]
    assert not page.css("#mw-callees tr[data-function]")
    page.shot("calc3-selected")
    # sorting by Total puts the root frames first
    page.css('#mw-table th[data-sort="total"]')[0].click()
    assert set(page.table_functions()[:2]) == {"main", "handle"}  # both 100%
    assert page.console_errors() == []


def test_timeline_drag_selects_a_range(driver: Any, server: ServeApp) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    page = Page(driver, server)
    page.show("shop", T0, T0 + 600)
    svg = page.el("timeline")
    width = svg.size["width"]
    before = page.seq()
    # drag from 5% to 45% of the timeline (the first half, without calc3)
    ActionChains(driver).move_to_element_with_offset(svg, int(-width * 0.45), 0).click_and_hold().move_by_offset(
        int(width * 0.40), 0
    ).release().perform()
    page.wait_ready(before)
    start, end = driver.execute_script("return [mwServe.state.from, mwServe.state.until]")
    assert T0 + 10 <= start <= T0 + 50 and T0 + 250 <= end <= T0 + 290, (start - T0, end - T0)
    assert page.el("range-from").get_attribute("value") == local(start)
    assert page.el("range-preset").get_attribute("value") == "custom"
    assert page.shown_total() == expected_cpu(start, end) > 0
    assert "calc3" not in page.table_functions()
    page.shot("timeline-drag")


def test_label_selection(driver: Any, server: ServeApp) -> None:
    page = Page(driver, server)
    page.show("shop", T0, T0 + 600)
    page.Select(page.el("label-name")).select_by_value("endpoint")
    page.Wait(driver, 10).until(lambda d: page.el("label-value").is_enabled())
    values = page.options("label-value")
    assert values == ["", "/calculate1", "/calculate2"]
    page.select("label-value", "/calculate1")
    assert page.el("selector").text == '{endpoint="/calculate1"}'
    assert page.shown_total() == expected_cpu(T0, T0 + 600, "/calculate1")
    assert set(page.table_functions()) == {"main", "handle", "efficient", "calc1", "calc2"}
    page.select("label-value", "/calculate2")
    assert page.table_functions()[0] == "calc3"
    assert page.shown_total() == expected_cpu(T0, T0 + 600, "/calculate2")


def test_compare_time_ranges_and_label_values(driver: Any, server: ServeApp) -> None:
    page = Page(driver, server)
    page.show("shop", T0, T0 + 600)
    page.el("tab-compare").click()
    assert page.el("view-compare").is_displayed() and not page.el("view-profile").is_displayed()
    assert page.el("cmp-time").is_displayed() and not page.el("cmp-label").is_displayed()
    # two time ranges: first half (A) vs second half (B)
    for id_, ts in (("cmp-a-from", T0), ("cmp-a-until", T0 + 300), ("cmp-b-from", T0 + 300), ("cmp-b-until", T0 + 600)):
        box = page.el(id_)
        box.clear()
        box.send_keys(local(ts))
    page.el("cmp-run").click()
    page.Wait(driver, 10).until(lambda d: page.css("#diff-table tbody tr"))
    rows = page.css("#diff-table tbody tr")
    top = rows[0]
    assert top.get_attribute("data-function") == "calc3" and float(top.get_attribute("data-change")) > 0
    assert "grew" in top.get_attribute("class")
    share_b = 100.0 * 300 / (300 + 60)  # calc3's Self share in the second half
    assert float(top.get_attribute("data-change")) == pytest.approx(share_b, abs=0.01)
    assert page.css("#timeline rect.tl-cmp-a") and page.css("#timeline rect.tl-cmp-b")
    page.shot("compare-ranges")
    # two label values of endpoint over the whole window
    page.Select(page.el("cmp-mode")).select_by_value("label")
    assert page.el("cmp-label").is_displayed() and not page.el("cmp-time").is_displayed()
    assert not page.css("#timeline rect.tl-cmp-a")  # time ranges are not drawn in label mode
    page.Select(page.el("cmp-label-name")).select_by_value("endpoint")
    page.Wait(driver, 10).until(lambda d: len(page.Select(page.el("cmp-value-b")).options) == 2)
    page.Select(page.el("cmp-value-a")).select_by_value("/calculate1")
    page.Select(page.el("cmp-value-b")).select_by_value("/calculate2")
    page.el("cmp-run").click()
    page.Wait(driver, 10).until(
        lambda d: "/calculate2" in page.el("cmp-summary").text
    )
    changes = {
        tr.get_attribute("data-function"): float(tr.get_attribute("data-change"))
        for tr in page.css("#diff-table tbody tr")
    }
    assert max(changes, key=lambda k: changes[k]) == "calc3"
    assert changes["calc2"] < 0 and changes["calc3"] > 0
    page.shot("compare-labels")
    assert page.console_errors() == []


def test_reload_keeps_the_selection_in_the_url(driver: Any, server: ServeApp) -> None:
    page = Page(driver, server)
    page.show("shop", T0 + 300, T0 + 600)
    url = driver.current_url
    assert "service=shop" in url
    driver.get("about:blank")
    driver.get(url)
    page.wait_ready(0)
    assert page.el("service").get_attribute("value") == "shop"
    assert page.shown_total() == expected_cpu(T0 + 300, T0 + 600)


def test_empty_server_says_how_to_send_profiles(driver: Any, tmp_path: Path) -> None:
    app = ServeApp(ServeConfig(port=0, data_dir=str(tmp_path / "empty"))).start()
    try:
        driver.get(app.url + "/")
        page = Page(driver, app)
        page.Wait(driver, 10).until(
            lambda d: d.execute_script("return document.body.getAttribute('data-state')") == "empty"
        )
        text = page.el("empty").text
        assert "No profiles yet" in text and f"MW_PROFILING_SERVER_URL={app.url}" in text
    finally:
        app.stop()


def test_lock_wait_profiles_show_as_block_types_with_time_units(driver: Any, server: ServeApp) -> None:
    # GIVEN a service whose agent sent a lock-wait profile (the block type family)
    waits = Profile(
        sample_types=[("contentions", "count"), ("delay", "nanoseconds")],
        samples=[
            Sample(stack("main;handle;pool_get"), (40, 1_500 * MS), (("lock", "/srv/app/pool.py:12"),)),
            Sample(stack("main;handle;cache_get"), (10, 120 * MS), (("lock", "/srv/app/cache.py:7"),)),
        ],
        time_nanos=T0 * 10**9,
        duration_nanos=10 * 10**9,
        period_type=("contentions", "count"),
        period=1,
        default_sample_type="delay",
    )
    ingest_pprof(server, "locky", waits, T0)
    page = Page(driver, server)
    page.show("locky", T0, T0 + 20)
    # WHEN the delay type is picked
    delay = "block:delay:nanoseconds:contentions:count"
    types = page.options("profile-type")
    assert delay in types and "block:contentions:count:contentions:count" in types, types
    page.select("profile-type", delay)
    # THEN the longest wait is on top, and the totals read as times
    assert page.shown_total() == 1_620 * MS
    assert page.table_functions()[0] == "pool_get"
    assert "total 1.62s" in page.el("profile-info").text, page.el("profile-info").text
    assert page.console_errors() == []


def test_memory_profiles_show_in_bytes_with_in_use_from_the_latest_window(driver: Any, server: ServeApp) -> None:
    # GIVEN a service whose agent sent two memory windows: `leak` holds 1 MiB live, then 3 MiB
    mib = 1 << 20

    def window(i: int, leaked: int) -> Profile:
        labels = (("pid", "7"),)
        return Profile(
            sample_types=[("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"),
                          ("inuse_space", "bytes")],
            samples=[Sample(stack("main;handle;leak"), (10, 2 * mib, 10 * leaked, leaked * mib), labels),
                     Sample(stack("main;handle;churn"), (900, 40 * mib, 1, 4096), labels)],
            time_nanos=(T0 + 10 * i) * 10**9, duration_nanos=10 * 10**9, period_type=("space", "bytes"),
            period=512 * 1024, default_sample_type="inuse_space")

    ingest_pprof(server, "leaky", window(0, 1), T0)
    ingest_pprof(server, "leaky", window(1, 3), T0 + 10)
    page = Page(driver, server)
    page.show("leaky", T0, T0 + 20)
    inuse = "memory:inuse_space:bytes:space:bytes"
    types = page.options("profile-type")
    assert {inuse, "memory:alloc_space:bytes:space:bytes", "memory:alloc_objects:count:space:bytes",
            "memory:inuse_objects:count:space:bytes"} <= set(types), types
    # WHEN in-use space is picked: THEN the leak is on top, with the latest window's 3 MiB (not 4)
    page.select("profile-type", inuse)
    assert page.shown_total() == 3 * mib + 4096
    assert page.table_functions()[0] == "leak"
    assert "total 3.00MiB" in page.el("profile-info").text, page.el("profile-info").text
    # and allocated space adds both windows up: the churner is on top
    page.select("profile-type", "memory:alloc_space:bytes:space:bytes")
    assert page.shown_total() == 84 * mib
    assert page.table_functions()[0] == "churn"
    assert page.console_errors() == []


def test_diff_flame_graph_colours_frames_by_their_change(driver: Any, server: ServeApp) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    # GIVEN a service whose f_double's share doubles (20% -> 40%) and f_gone's vanishes (30% -> 0)
    # from one 10 s window to the next, and a label that splits the second window the same way
    first = build([sample("main;f_double", 20 * MS, labels={"side": "old"}),
                   sample("main;f_gone", 30 * MS, labels={"side": "old"}),
                   sample("main;f_same", 50 * MS, labels={"side": "old"})], time_nanos=T0 * 10**9)
    second = build([sample("main;f_double", 80 * MS, labels={"side": "new"}),
                    sample("main;f_same", 120 * MS, labels={"side": "new"})], time_nanos=(T0 + 10) * 10**9)
    ingest_pprof(server, "diffy", first, T0)
    ingest_pprof(server, "diffy", second, T0 + 10)
    page = Page(driver, server)
    page.show("diffy", T0, T0 + 20)
    page.el("tab-compare").click()

    def frames() -> dict[str, Any]:
        got = driver.execute_script("return window.mwDiffViewer ? window.mwDiffViewer.frames() : []")
        return {f["function"]: f for f in got}

    def compare() -> dict[str, Any]:
        before = driver.execute_script("return window.mwDiffViewer ? window.mwDiffViewer.data : null")
        page.el("cmp-run").click()
        page.Wait(driver, 10).until(lambda d: driver.execute_script(
            "return !!window.mwDiffViewer && window.mwDiffViewer.data !== arguments[0]", before))
        return frames()

    for mode in ("time", "label"):
        if mode == "time":  # WHEN the two windows are compared
            for id_, ts in (("cmp-a-from", T0), ("cmp-a-until", T0 + 10), ("cmp-b-from", T0 + 10),
                            ("cmp-b-until", T0 + 20)):
                box = page.el(id_)
                box.clear()
                box.send_keys(local(ts))
        else:  # WHEN two label values are compared instead
            page.Select(page.el("cmp-mode")).select_by_value("label")
            page.Select(page.el("cmp-label-name")).select_by_value("side")
            page.Wait(driver, 10).until(lambda d: len(page.Select(page.el("cmp-value-b")).options) == 2)
            page.Select(page.el("cmp-value-a")).select_by_value("old")
            page.Select(page.el("cmp-value-b")).select_by_value("new")
        got = compare()
        # THEN the doubled function is red (its share grew by half of its new share), the vanished
        # one fully green, and the one barely changed close to grey
        assert got["f_double"]["change"] == pytest.approx(0.5, abs=0.01), (mode, got)
        assert got["f_gone"]["change"] == pytest.approx(-1.0, abs=0.001), (mode, got)
        assert got["f_same"]["change"] == pytest.approx((0.6 - 0.5) / 0.6, abs=0.01), (mode, got)
        colours = {name: driver.execute_script(
            "return getComputedStyle(document.querySelector('#cmp-flame .mw-frame[data-function=\"' + arguments[0]"
            " + '\"]')).backgroundColor", name) for name in ("f_double", "f_gone")}
        r, g, _ = (int(x) for x in re.findall(r"\d+", colours["f_double"])[:3])
        assert r > g, colours  # red
        r, g, _ = (int(x) for x in re.findall(r"\d+", colours["f_gone"])[:3])
        assert g > r, colours  # green
        # AND the legend says what the colours mean; hovering shows both sides' values
        legend = page.css("#cmp-flame .mw-legend")[0]
        assert legend.is_displayed() and "grew" in legend.text and "shrank" in legend.text
        box = page.css('#cmp-flame .mw-frame[data-function="f_double"]')[0]
        ActionChains(driver).move_to_element(box).perform()
        tip = page.css("#cmp-flame .mw-tooltip")[0]
        page.Wait(driver, 5).until(lambda d, tip=tip: tip.is_displayed())
        assert "A 20.00ms (20.00%)" in tip.text and "B 80.00ms (40.00%)" in tip.text, tip.text
        assert "change +20.00 points" in tip.text, tip.text
        page.shot(f"compare-diff-flame-{mode}")
    assert page.console_errors() == []
