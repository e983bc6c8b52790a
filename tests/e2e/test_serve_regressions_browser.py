"""The Regressions view of the serve page, in headless Chromium.

GIVEN a serve holding a service whose version v2 made calc2 (under /calculate2) 1.5x as costly as
in v1, and the regression detector's pass run
WHEN a user opens the Regressions tab and clicks the finding
THEN the list shows calc2 for v1 -> v2 (over the service and within /calculate2) with its shares
and interval, and the click opens the comparison of the two versions with calc2 on top, grown.
Screenshots go to artifacts/ (gitignored).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from middleware.profile import Profile
from middleware.serve import ServeApp, ServeConfig
from support.profiles import build, sample
from support.serve_http import ingest_pprof
from test_serve_browser import Page

pytestmark = pytest.mark.browser

T0 = 1_763_719_200
MS = 1_000_000


def window(version: str, i: int, calc2_ms: int) -> Profile:
    lab = {"version": version}
    return build([
        sample("main;handle;efficient;calc1", 2000 * MS, 2000 * MS, {**lab, "endpoint": "/calculate1"}),
        sample("main;handle;efficient;calc3", 4000 * MS, 4000 * MS, {**lab, "endpoint": "/calculate1"}),
        sample("main;handle;with_bottleneck;calc1", 1000 * MS, 1000 * MS, {**lab, "endpoint": "/calculate2"}),
        sample("main;handle;with_bottleneck;calc2", calc2_ms * MS, calc2_ms * MS, {**lab, "endpoint": "/calculate2"}),
    ], time_nanos=(T0 + 10 * i) * 10**9, duration_nanos=10 * 10**9)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    app = ServeApp(ServeConfig(port=0, data_dir=str(tmp_path_factory.mktemp("serve-regress")),
                               regress_interval=3600)).start()
    try:
        for i in range(40):
            version, calc2 = ("v1", 1500) if i < 20 else ("v2", 2250)
            ingest_pprof(app, "shop", window(version, i, calc2), T0 + 10 * i)
        app.regressions.run_once()
        yield app
    finally:
        app.stop()


def test_the_regressions_list_opens_the_comparison_of_the_two_versions(driver: Any, server: ServeApp) -> None:
    page = Page(driver, server)
    page.open()
    page.el("tab-regressions").click()
    assert page.el("view-regressions").is_displayed() and not page.el("view-profile").is_displayed()

    def read_rows() -> dict[tuple[str, str], list[str]]:  # (function, endpoint) -> its cells' text
        return {(tr.get_attribute("data-function"), tr.get_attribute("data-endpoint")):
                [td.text for td in tr.find_elements(page.By.TAG_NAME, "td")]
                for tr in page.css("#regress-table tbody tr")}

    found: dict[tuple[str, str], list[str]] = page.when_drawn(read_rows)  # the rows as drawn last
    assert set(found) == {("calc2", ""), ("calc2", "/calculate2")}, list(found)
    cells = found[("calc2", "")]
    assert cells[1] == "(all)" and cells[2] == "v1 → v2"
    assert cells[3] == f"{100 * 1500 / 8500:.2f}% → {100 * 2250 / 9250:.2f}%"
    assert cells[4].startswith("+38% (")  # (2250/9250) / (1500/8500) = 1.378
    assert "2 version" not in page.el("regress-summary").text and "1 version change" in page.el("regress-summary").text
    page.shot("regressions")
    page.click_first('#regress-table tbody tr[data-endpoint=""]')
    assert page.el("view-compare").is_displayed()
    page.Wait(driver, 10).until(lambda d: 'version="v2"' in page.el("cmp-summary").text)
    assert "(20 profiles" in page.el("cmp-summary").text  # each version's every profile
    top = page.css("#diff-table tbody tr")[0]
    assert top.get_attribute("data-function") == "calc2" and float(top.get_attribute("data-change")) > 0
    assert page.Select(page.el("cmp-value-a")).first_selected_option.get_attribute("value") == "v1"
    page.shot("regression-compare")
    # the finding within /calculate2 compares that endpoint only
    page.el("tab-regressions").click()
    page.click_first('#regress-table tbody tr[data-endpoint="/calculate2"]')
    page.Wait(driver, 10).until(lambda d: 'endpoint="/calculate2"' in page.el("cmp-summary").text)
    functions = {tr.get_attribute("data-function") for tr in page.css("#diff-table tbody tr")}
    assert functions == {"calc1", "calc2"}  # with_bottleneck's callees only
    assert page.console_errors() == []
