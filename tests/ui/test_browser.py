"""The runs page in a real browser: Debian's headless Chromium, driven by Selenium through
Debian's chromedriver (nothing downloaded), against a real Hub running tasks on stdio and
process workers in two environments.

One scenario, in the order a user meets the page: the token wall, the list newest first,
filters, a failed run's detail with its remote traceback, a run turning from running to
succeeded without a reload, cancel, and markup in a task id shown as text. A screenshot
is kept in tests/ui/artifacts/runs.png (and written to docs/ui.png when
WOVE_UI_SCREENSHOT_DOCS=1, to refresh the docs' picture).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wove_adapters import Hub, ui
from wove_adapters.core.ledger import RUNNING, RunRecord, open_ledger

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from remote_errors import raise_line
from ui_runs import WAIT, hold, state_of, until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "browser-test-token-0123456789"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
DOCS_PICTURE = Path(__file__).resolve().parents[2] / "docs" / "ui.png"


def double(x: int) -> int:
    return x * 2


def parse_report(name: str) -> dict[str, int]:
    raise ValueError(f"report {name!r} has no header row")


def _install_browser() -> None:
    """A fresh Debian machine run by root gets the browser from apt, as the Slurm suite gets
    slurm-wlm: the README's test command must work there without a manual step."""
    if all(os.path.exists(path) for path in (CHROMIUM, CHROMEDRIVER)):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return  # the check below says what to install
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
        subprocess.run(command, env=env, capture_output=True, timeout=900, check=False)


@pytest.fixture
def browser() -> Iterator[Any]:
    _install_browser()
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.path.exists(path):
            pytest.fail(f"{path} is missing: apt-get install chromium chromium-driver "
                        f"(Debian's {package}; .ci/run installs both)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1600,820"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Two environments (stdio, process), finished runs of each kind, two held runs,
    and the token-protected page serving them from the Hub's process."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    hub = Hub(ledger=url, environments={"ingest": {"executor": "stdio"},
                                        "reports": {"executor": "process"}})
    markers = {name: str(tmp_path / name) for name in ("finish", "never")}
    ids: dict[str, str] = {}
    futures: dict[str, Any] = {}
    try:
        for name, env, fn, arg in (("ok-ingest", "ingest", double, 1),
                                   ("ok-reports", "reports", double, 2),
                                   ("failed", "reports", parse_report, "q3.csv"),
                                   ("ok-ingest-2", "ingest", double, 3),
                                   ("long", "ingest", hold, markers["finish"]),
                                   ("to-cancel", "reports", hold, markers["never"])):
            futures[name] = hub.submit(fn, arg, environment=env)
            ids[name] = futures[name].run_id
            if fn is not hold:
                with pytest.raises(ValueError) if fn is parse_report else contextlib.nullcontext():
                    futures[name].result(timeout=WAIT)
        for name in ("long", "to-cancel"):
            until(lambda n=name: state_of(url, ids[n]) == RUNNING, f"{name} running")
        # Markup in a task id must show as text.
        asyncio.run(open_ledger(url).claim(RunRecord(
            run_id="markup", environment="ingest", task_id="<img src=x id=injected>",
            state="succeeded", created_at=time.time() - 3600)))
        server = ui.serve(hub=hub, listen="127.0.0.1:0", token=TOKEN, poll_seconds=0.3)
        try:
            yield {"hub": hub, "url": url, "ids": ids, "futures": futures,
                   "markers": markers, "page": server.url}
        finally:
            server.close()
    finally:
        for marker in markers.values():
            Path(marker).touch()
        hub.close()


def rows(driver: Any) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#rows tr")


def row_ids(driver: Any) -> list[str]:
    return [tr.get_attribute("data-run-id") for tr in rows(driver)]


def row(driver: Any, run_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'#rows tr[data-run-id="{run_id}"]')


def test_the_runs_page_in_chromium(browser: Any, scene: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    ids, page = scene["ids"], scene["page"]
    find = browser.find_element

    # Without the token the server refuses, page and API alike.
    browser.get(page)
    assert "needs its token" in find(By.TAG_NAME, "body").text
    # The first visit with ?token= sets the cookie and drops the token from the address.
    browser.get(f"{page}?token={TOKEN}")
    until(lambda: len(rows(browser)) == 7, "seven rows")
    assert "token" not in browser.current_url
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly

    # Newest first.
    newest_first = [ids[n] for n in ("to-cancel", "long", "ok-ingest-2", "failed",
                                     "ok-reports", "ok-ingest")] + ["markup"]
    assert row_ids(browser) == newest_first
    created = [float(tr.get_attribute("data-created-at")) for tr in rows(browser)]
    assert created == sorted(created, reverse=True)

    # Markup in run data is text, never elements.
    cell = row(browser, "markup").find_element(By.CSS_SELECTOR, "td.task")
    assert cell.text == "<img src=x id=injected>"
    assert browser.find_elements(By.ID, "injected") == []

    # Filters narrow the rows: environment, state, task; Clear brings them all back.
    Select(find(By.ID, "f-environment")).select_by_value("reports")
    until(lambda: row_ids(browser) == [ids["to-cancel"], ids["failed"], ids["ok-reports"]],
          "the reports runs")
    Select(find(By.ID, "f-state")).select_by_value("failed")
    until(lambda: row_ids(browser) == [ids["failed"]], "the failed run")
    find(By.ID, "f-clear").click()
    until(lambda: len(rows(browser)) == 7, "every run again")
    find(By.ID, "f-task").send_keys("double")
    find(By.ID, "f-apply").click()
    until(lambda: row_ids(browser) == [ids["ok-ingest-2"], ids["ok-reports"], ids["ok-ingest"]],
          "the runs of task double")
    find(By.ID, "f-clear").click()
    until(lambda: len(rows(browser)) == 7, "every run again")

    # A failed run's detail: where it ran, and the worker's traceback.
    row(browser, ids["failed"]).click()
    trace = until(lambda: find(By.ID, "detail-traceback").text, "the remote traceback")
    assert f"line {raise_line(parse_report)}, in parse_report" in trace
    assert "ValueError: report 'q3.csv' has no header row" in trace
    assert find(By.ID, "detail-error").text == "ValueError: report 'q3.csv' has no header row"
    fields = {dd.get_attribute("data-field"): dd.text
              for dd in browser.find_elements(By.CSS_SELECTOR, "#detail-fields dd")}
    assert fields["environment"] == "reports" and fields["executor"] == "process"
    assert fields["backend handle"].isdigit()  # the worker process's pid
    assert fields["state"] == "failed"
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "runs.png"))
    if os.environ.get("WOVE_UI_SCREENSHOT_DOCS") == "1":
        shutil.copyfile(ARTIFACTS / "runs.png", DOCS_PICTURE)

    # A running run turns succeeded live: no reload (the marker on window survives).
    browser.execute_script("window.notReloaded = true")
    long_row = row(browser, ids["long"])
    assert long_row.get_attribute("data-state") == "running"
    row(browser, ids["long"]).click()  # its detail follows it live too
    until(lambda: find(By.ID, "detail").get_attribute("data-state") == "running",
          "the long run's detail")
    Path(scene["markers"]["finish"]).touch()
    until(lambda: row(browser, ids["long"]).get_attribute("data-state") == "succeeded",
          "the long run's row to turn succeeded")
    until(lambda: find(By.ID, "detail").get_attribute("data-state") == "succeeded",
          "the long run's detail to turn succeeded")
    assert browser.execute_script("return window.notReloaded") is True
    assert scene["futures"]["long"].result(timeout=WAIT) == scene["markers"]["finish"]

    # Cancel: only a run in flight here has an enabled button; the row turns cancelled.
    finished = row(browser, ids["ok-ingest"]).find_element(By.CSS_SELECTOR, "button.cancel")
    assert not finished.is_enabled() and "ended" in finished.get_attribute("title")
    button = row(browser, ids["to-cancel"]).find_element(By.CSS_SELECTOR, "button.cancel")
    assert button.is_enabled()
    button.click()
    until(lambda: row(browser, ids["to-cancel"]).get_attribute("data-state") == "cancelled",
          "the cancelled run's row")
    with pytest.raises(Exception):  # noqa: B017 (the caller sees a cancellation)
        scene["futures"]["to-cancel"].result(timeout=WAIT)
    assert state_of(scene["url"], ids["to-cancel"]) == "cancelled"
    assert find(By.ID, "message").text == ""
    assert browser.execute_script("return window.notReloaded") is True
