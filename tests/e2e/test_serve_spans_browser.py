"""The serve page for one request: ``/?span_id=`` and ``/?trace_id=`` in headless Chromium.

GIVEN a serve holding a service whose requests (spans) interleave in the same windows, with the
same stacks and span name, one request crossing a window boundary, and a trace with a span in a
second service
WHEN a user opens ``/?span_id=<id>``, ``/?trace_id=<id>``, an unknown span, and goes back
THEN the page shows that request's flame graph and table alone (totals equal to its samples
filtered by hand), a header with the span id, its span name, service, pid, time and CPU samples,
a trace's spans as links, an empty answer for an unknown span, and the normal view of the
service again from the "back" link. Screenshots go to artifacts/ (gitignored).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from middleware.profile import Profile, Sample
from middleware.serve import ServeApp, ServeConfig
from support.browser import ARTIFACTS
from support.profiles import build, sample
from support.serve_http import ingest_pprof

pytestmark = pytest.mark.browser

T0 = 1_763_719_200
MS = 1_000_000
A, D, C = "a00000000000000a", "d00000000000000d", "c00000000000000c"
T1, T2 = "1" * 32, "2" * 32
TRACES = {A: T1, C: T1, D: T2}


def _s(stack: str, cpu_ms: int, span: str | None, name: str, pid: str) -> Sample:
    labels = {"pid": pid, "thread_name": "w1"}
    if span:
        labels |= {"span_id": span, "span_name": name}
    return sample(stack, cpu_ms * MS, cpu_ms * MS, labels)


# (service, window) -> samples; A in windows 0 and 1, D beside it in window 1, C in billing
SAMPLES: dict[tuple[str, int], list[Sample]] = {
    ("shop", 0): [_s("main;handle;calc1;calc2", 30, A, "GET /checkout", "101"),
                  _s("main;idle", 50, None, "", "101")],
    ("shop", 1): [_s("main;handle;calc1;calc2", 40, A, "GET /checkout", "101"),
                  _s("main;handle;calc3", 20, A, "GET /checkout", "101"),
                  _s("main;handle;calc1;calc2", 70, D, "GET /checkout", "101"),
                  _s("main;handle;calc3", 90, D, "GET /checkout", "101"),
                  _s("main;idle", 50, None, "", "101")],
    ("billing", 1): [_s("main;charge", 60, C, "charge", "303")],
}


def cpu_of(spans: set[str]) -> int:
    return sum(s.values[1] for items in SAMPLES.values() for s in items if s.label("span_id") in spans)


def count_of(spans: set[str]) -> int:
    return sum(s.values[0] for items in SAMPLES.values() for s in items if s.label("span_id") in spans)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    app = ServeApp(ServeConfig(port=0, data_dir=str(tmp_path_factory.mktemp("serve-spans-browser")))).start()
    try:
        for (service, window), items in SAMPLES.items():
            p: Profile = build(items, time_nanos=(T0 + 10 * window) * 10**9)
            p.span_traces = {k: v for k, v in TRACES.items() if any(s.label("span_id") == k for s in items)}
            ingest_pprof(app, service, p, T0 + 10 * window)
        yield app
    finally:
        app.stop()


class Page:
    def __init__(self, drv: Any, app: ServeApp) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.app, self.By, self.Wait = drv, app, By, WebDriverWait

    def open(self, query: str, state: str = "ready") -> None:
        self.d.get(self.app.url + "/" + query)
        self.wait(state)

    def wait(self, wanted: str) -> None:
        def done(d: Any) -> bool:
            state = d.execute_script("return document.body.getAttribute('data-state')")
            assert state != "error" or wanted == "error", self.el("status").text
            return bool(state == wanted)

        self.Wait(self.d, 15).until(done)

    def el(self, id_: str) -> Any:
        return self.d.find_element(self.By.ID, id_)

    def css(self, selector: str) -> list[Any]:
        return self.d.find_elements(self.By.CSS_SELECTOR, selector)

    def wait_page(self, search: str) -> None:
        """Wait for the page at ``location.search == search`` to be ready (not the one before)."""
        script = "return [location.search, document.body.getAttribute('data-state')]"
        self.Wait(self.d, 15).until(lambda d: d.execute_script(script) == [search, "ready"])

    def shown_total(self) -> int:
        return int(self.d.execute_script("return window.mwViewer.data.total"))

    def table_functions(self) -> set[str]:
        return {tr.get_attribute("data-function") for tr in self.css("#mw-table tbody tr[data-fid]")}

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.d.get_log("browser") if e["level"] == "SEVERE"]


def test_a_span_link_shows_that_request_alone(driver: Any, server: ServeApp) -> None:
    page = Page(driver, server)
    page.open(f"?span_id={A}")
    header = page.el("span-header")
    assert header.is_displayed()
    # the flame graph and table are A's samples only (D ran beside it with the same stacks)
    assert page.shown_total() == cpu_of({A}) == 90 * MS
    assert page.table_functions() == {"main", "handle", "calc1", "calc2", "calc3"}
    bars = page.css("#timeline rect.tl-bar")
    assert sum(int(b.get_attribute("data-value")) for b in bars) == cpu_of({A})
    # the header says which request: span, trace, name, service, pid, time, samples
    assert header.get_attribute("data-span-id") == A
    assert int(header.get_attribute("data-cpu-samples")) == count_of({A}) == 9
    assert int(header.get_attribute("data-cpu-ns")) == cpu_of({A})
    title, facts = page.el("span-title").text, page.el("span-facts").text
    assert A in title and T1 in title
    assert "GET /checkout" in facts and "service shop (pid 101)" in facts and "CPU: 9 samples" in facts, facts
    assert page.el("service").get_attribute("value") == "shop"
    driver.save_screenshot(str(ARTIFACTS / "serve-span.png"))
    # the way back: the service's normal view over the span's windows
    page.el("span-back").click()
    page.wait_page("")
    assert not page.el("span-header").is_displayed()
    assert page.shown_total() == sum(s.values[1] for (svc, _), items in SAMPLES.items() if svc == "shop"
                                     for s in items)
    assert page.console_errors() == []


def test_a_trace_link_lists_its_spans_and_shows_their_union(driver: Any, server: ServeApp) -> None:
    page = Page(driver, server)
    page.open(f"?trace_id={T1}")
    # two services: the page starts on all of them
    assert page.el("service").get_attribute("value") == ""
    assert page.shown_total() == cpu_of({A, C})
    rows = page.css("#span-table tbody tr")
    assert [r.get_attribute("data-span-id") for r in rows] == [A, C]  # by first window
    assert "billing" in rows[1].text and "charge" in rows[1].text
    driver.save_screenshot(str(ARTIFACTS / "serve-trace.png"))
    # a span of the list opens that span
    rows[1].find_element(page.By.CSS_SELECTOR, "a").click()
    page.wait_page(f"?span_id={C}")
    assert page.el("span-header").get_attribute("data-span-id") == C
    assert page.shown_total() == cpu_of({C})
    assert page.console_errors() == []


def test_an_unknown_span_says_so(driver: Any, server: ServeApp) -> None:
    page = Page(driver, server)
    page.open("?span_id=0123456789abcdef", state="empty")
    assert "No samples of this span" in page.el("empty").text
    page.open("?span_id=NOT-A-SPAN", state="error")
    assert "16 lowercase hex digits" in page.el("status").text
