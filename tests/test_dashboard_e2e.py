"""The dashboard in a real browser: uvicorn on a free loopback port serving a Hub fed with protocol
messages, driven by Debian's headless Chromium through chromedriver (selenium). Checks what only a
browser shows: the scripts run under the Content-Security-Policy, tables refresh from the API without
a reload, uPlot draws, device text stays text, and the Acknowledge and review buttons act with the
token the user typed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("selenium", reason="selenium is not installed (dev extra)")
pytest.importorskip("starlette", reason="the web extra is not installed")

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from cloud_sync.hub import Hub
from cloud_sync.web import WebServer, create_app
from edge_runtime.core import protocol as p

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="chromium not installed (apt-get install chromium chromium-driver)"),
]

TOKEN = "e2e-token"
SCRIPT = "<script>window.pwned = 1</script>"
IMG = '<img src=x onerror="window.pwned = 2">'
RULES = """
[[rule]]
name = "slow"
metric = "p99_latency_ms"
op = ">"
threshold = 50
"""


def feed(hub: Hub, msg: Any, now: int) -> None:
    hub.handle(msg.topic, msg.to_wire(), now)


def status(dev: str, now: int) -> p.Status:
    return p.Status(dev, True, "b1", now, "0.1.0", (p.ModelStatus("digits_mlp", "3", "active"),))


def metric(seq: int, t: int, p99_ms: float, inputs: int) -> p.Record:
    return p.Record(seq, "m", t, {
        "pipeline": "digits_mlp", "model_version": "3", "window_s": 10.0, "inputs": inputs, "predictions": inputs,
        "throughput_per_s": 20.0 + seq, "latency_us": {"p50": p99_ms * 300, "p99": p99_ms * 1000}, "errors": {},
        "low_confidence": seq, "null_outputs": 0, "cpu_percent": 30.0 + seq, "rss_mb": 80.0 + seq,
        "temperature_c": 45.0 + seq})


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub.for_tests(tmp_path_factory.mktemp("e2e") / "c.db", RULES)
    now = h.now_ms()
    feed(h, status("dev-1", now - 2000), now - 2000)   # rules are evaluated at most once a second
    records = [metric(i, now - (12 - i) * 10_000, 20.0 + 6 * i, 100 * i) for i in range(1, 12)]
    records.append(p.Record(12, "e", now, p.Event("source_failed", "error", f"camera said {SCRIPT}").to_payload()))
    # Low-confidence predictions enter the review queue; one label is markup.
    records += [p.Record(13 + i, "p", now, {"i": f"b1-{i}", "m": "digits_mlp", "y": y, "p": 0.2})
                for i, y in enumerate((3, IMG))]
    feed(h, p.RecordBatch("dev-1", "b1", "b1:1-14", tuple(records)), now)
    assert h.alert_list("firing"), "the slow rule should fire on dev-1"
    yield h
    h.close()


@pytest.fixture(scope="module")
def server(hub: Hub) -> Iterator[WebServer]:
    srv = WebServer(create_app(hub, token=TOKEN, poll_ms=400), host="127.0.0.1", port=0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def wait(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # the element may not exist yet, or be replaced under us
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def table_text(driver: webdriver.Chrome, table_id: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, f"#{table_id} tbody").text)


def click(driver: webdriver.Chrome, css: str) -> None:
    """Click the element: found afresh on each try, since polling replaces table rows under us."""
    wait(f"a click on {css}", lambda: driver.find_element(By.CSS_SELECTOR, css).click() or True)


def test_fleet_page_lists_devices_and_refreshes_without_reload(browser: webdriver.Chrome, server: WebServer,
                                                               hub: Hub) -> None:
    browser.get(server.url + "/")
    wait("dev-1 in the devices table", lambda: "dev-1" in table_text(browser, "devices"))
    assert "digits_mlp@3" in table_text(browser, "devices")
    wait("the device link", lambda: browser.find_element(By.CSS_SELECTOR, "#devices a[href='/devices/dev-1']").text
         == "dev-1")
    browser.execute_script("window.sameDocument = true")
    now = hub.now_ms()
    feed(hub, status("dev-2", now), now)                        # a new device, after the page loaded
    wait("dev-2 to appear by polling", lambda: "dev-2" in table_text(browser, "devices"))
    wait("the online count to follow", lambda: browser.find_element(
        By.CSS_SELECTOR, "[data-key='devices.online']").text == "2")
    assert browser.execute_script("return window.sameDocument") is True   # no reload
    assert browser.execute_script("return window.cloudSyncCspViolations") == []


def test_device_page_draws_charts_and_shows_device_text_as_text(browser: webdriver.Chrome,
                                                                server: WebServer) -> None:
    browser.get(server.url + "/devices/dev-1")
    canvases = wait("uPlot canvases", lambda: browser.find_elements(By.CSS_SELECTOR, "#charts .uplot canvas"))
    assert len(canvases) >= 7
    latency = browser.find_element(By.CSS_SELECTOR, "#chart-latency")
    assert "Latency" in latency.text and latency.size["width"] > 200
    assert browser.find_element(By.CSS_SELECTOR, "#chart-latency .chart-note").is_displayed() is False
    # The 11 metric snapshots, p50 and p99 each, as uPlot holds them (times in seconds).
    data = wait("the series", lambda: browser.execute_script(
        "var d = window.cloudSync.charts.latency.data; return d[0].length ? d : null"))
    assert len(data[0]) == 11 and len(data) == 3
    assert data[2][-1] == 20.0 + 6 * 11 and all(x is not None for x in data[1])
    events = table_text(browser, "events")
    assert f"camera said {SCRIPT}" in events
    assert browser.execute_script("return window.pwned === undefined") is True
    assert browser.execute_script("return window.cloudSyncCspViolations") == []


def test_acknowledge_button_needs_the_token_and_then_acks(browser: webdriver.Chrome, server: WebServer,
                                                          hub: Hub) -> None:
    (alert,) = hub.alert_list("firing")
    browser.get(server.url + "/alerts")
    browser.execute_script("localStorage.clear()")
    ack = f"button[data-action='ack'][data-id='{alert['id']}']"
    click(browser, ack)
    flash = wait("a refusal", lambda: browser.find_element(By.ID, "flash").text)
    assert "Authorization: Bearer" in flash
    assert hub.alert_list("firing")
    browser.find_element(By.ID, "auth-token").send_keys(TOKEN)
    browser.find_element(By.ID, "auth-by").send_keys("e2e-operator")
    browser.find_element(By.ID, "auth-save").click()
    assert browser.find_element(By.ID, "auth-state").text == "token saved"
    click(browser, ack)
    wait("the acknowledgement", lambda: "acknowledged" in browser.find_element(By.ID, "flash").text)
    (acked,) = hub.alert_list("acknowledged")
    assert acked["id"] == alert["id"] and acked["acked_by"] == "e2e-operator"
    wait("the button to go", lambda: not browser.find_elements(By.CSS_SELECTOR, "button[data-action='ack']"))
    assert "acknowledged" in table_text(browser, "alerts")
    assert browser.execute_script("return window.cloudSyncCspViolations") == []


def test_review_buttons_confirm_and_correct_labels(browser: webdriver.Chrome, server: WebServer, hub: Hub) -> None:
    first, second = hub.review_items()
    browser.get(server.url + "/review")
    browser.execute_script(f"localStorage.setItem('cloud-sync.token', '{TOKEN}')")
    wait("the queue", lambda: IMG in table_text(browser, "review"))
    assert browser.execute_script("return window.pwned === undefined") is True
    click(browser, f"button[data-action='confirm'][data-id='{first['id']}']")
    wait("the confirmation", lambda: "confirmed" in browser.find_element(By.ID, "flash").text)
    # A label being typed stops the table's refresh, so the row stays put from here on.
    wait("the label typed", lambda: browser.find_element(
        By.XPATH, f"//button[@data-action='correct'][@data-id='{second['id']}']/../input").send_keys("8") or True)
    click(browser, f"button[data-action='correct'][data-id='{second['id']}']")
    wait("the correction", lambda: "corrected" in browser.find_element(By.ID, "flash").text)
    done = {i["id"]: i for s in ("confirmed", "corrected") for i in hub.review_items(s)}
    assert (done[first["id"]]["state"], done[first["id"]]["label"]) == ("confirmed", 3)
    assert (done[second["id"]]["state"], done[second["id"]]["label"]) == ("corrected", "8")
    wait("the queue to empty", lambda: "nothing to review" in table_text(browser, "review"))
    assert browser.execute_script("return window.cloudSyncCspViolations") == []
