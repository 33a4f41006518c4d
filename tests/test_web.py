"""The dashboard and JSON API (cloud_sync.web) against a real Hub on SQLite, fed with real protocol
messages: pages, API routes, errors, who may change state, and escaping of what devices send."""

from __future__ import annotations

import functools
import json
import re
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the web extra is not installed: pip install -e '.[dev]'")
pytest.importorskip("httpx2", reason="Starlette's TestClient needs httpx2 (dev extra)")

from starlette.testclient import TestClient

from cloud_sync.hub import Hub
from cloud_sync.web import (
    ALERT_COLUMNS,
    DEVICE_COLUMNS,
    STATIC_DIR,
    WebServer,
    create_app,
    format_value,
    is_loopback,
)
from edge_runtime.core import protocol as p
from edge_runtime.core.drift import CalibrationSettings, DriftMonitor, build_reference, load_reference
from edge_runtime.errors import EdgeRuntimeError

T0 = 1_764_167_000_000
MIN = 60_000
TOKEN = "s3cret-token"
SCRIPT = "<script>alert('pwned')</script>"
IMG = '<img src=x onerror="alert(1)">'
RULES = """
[[rule]]
name = "slow"
metric = "p99_latency_ms"
op = ">"
threshold = 50
severity = "critical"
"""


class Clock:
    """The hub's clock, in seconds like time.time; tests set ``ms``."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


def feed(hub: Hub, msg: Any, now: int) -> None:
    hub.handle(msg.topic, msg.to_wire(), now)


def status(dev: str, online: bool = True) -> p.Status:
    if not online:
        return p.last_will(dev, "b1", time_ms=T0)
    return p.Status(dev, True, "b1", T0, "0.1.0", (p.ModelStatus("digits_mlp", "3", "active"),))


def metric(seq: int, t: int, p99_ms: float, *, inputs: int, errors: int = 0, pipeline: str = "digits_mlp",
           temp: float | None = 48.5) -> p.Record:
    return p.Record(seq, "m", t, {
        "pipeline": pipeline, "model_version": "3", "window_s": 60.0, "inputs": inputs, "predictions": inputs - errors,
        "throughput_per_s": 12.5, "latency_us": {"p50": p99_ms * 400, "p99": p99_ms * 1000},
        "errors": {"shape": errors}, "low_confidence": 0, "null_outputs": 0, "drift_alarm": False,
        "accuracy": 0.93, "labelled": 40, "cpu_percent": 37.5, "rss_mb": 81.0, "temperature_c": temp})


@functools.cache
def drift_payload(shift: float) -> dict[str, Any]:
    """A real DriftMonitor's summary over data shifted by ``shift`` (2.0 opens an alarm)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 3))

    def classify(v: np.ndarray) -> np.ndarray:
        return (v[:, 0] > 0).astype(np.int64)

    ref = load_reference(build_reference(x, classify(x), calibration=CalibrationSettings(
        window=50, n_simulations=1000, universes=2)))
    mon = DriftMonitor(ref, model="digits_mlp")
    y = rng.normal(size=(200, 3)) + shift
    mon.update(y, classify(y))
    return p.DriftSummary("digits_mlp", "3", T0, T0 + MIN, mon.take_summary().to_dict()).to_payload()


def populate(hub: Hub, clock: Clock) -> None:
    """dev-1: slow (the alert fires), drifting, an event with markup, low-confidence predictions;
    dev-2: healthy; dev-3: gone offline."""
    for dev in ("dev-1", "dev-2", "dev-3"):
        feed(hub, status(dev), T0)
    feed(hub, p.RecordBatch("dev-1", "b1", "b1:1-2", (metric(1, T0, 20.0, inputs=500),
                                                     metric(2, T0 + MIN, 80.0, inputs=1000, errors=10))), T0 + MIN)
    predictions = tuple(p.Record(10 + i, "p", T0 + MIN, {"i": f"b1-{i}", "m": "digits_mlp", "y": y, "p": 0.3})
                        for i, y in enumerate((3, 7, IMG)))
    feed(hub, p.RecordBatch("dev-1", "b1", "b1:3-13", (
        p.Record(3, "d", T0 + MIN, drift_payload(2.0)),
        p.Record(4, "e", T0 + MIN, p.Event("source_failed", "error", f"camera said {SCRIPT}").to_payload()),
        *predictions)), T0 + MIN + 10)
    feed(hub, p.RecordBatch("dev-2", "b1", "b1:1-2", (
        metric(1, T0 + MIN, 4.0, inputs=900, temp=None),
        p.Record(2, "m", T0 + MIN, {"pipeline": "<b>side</b>", "model_version": "1", "inputs": 1}))), T0 + MIN)
    feed(hub, status("dev-3", online=False), T0 + MIN)
    clock.ms = T0 + MIN + 1000


@pytest.fixture
def hub(tmp_path: Path):
    clock = Clock(T0)
    h = Hub.for_tests(tmp_path / "c.db", RULES, clock=clock)
    populate(h, clock)
    yield h
    h.close()


def client(app: Any, host: str = "127.0.0.1", *, server: str = "127.0.0.1", **headers: str) -> TestClient:
    """A TestClient whose requests come from ``host`` to the server named ``server`` (the Host header)."""
    return TestClient(app, base_url=f"http://{server}", client=(host, 50123), headers=headers)


@pytest.fixture
def web(hub: Hub) -> TestClient:
    return client(create_app(hub, token=None))


def firing_id(hub: Hub) -> str:
    (alert,) = hub.alert_list("firing")
    return str(alert["id"])


class Elements(HTMLParser):
    """Every start tag of a page with its attributes, as a browser would parse them."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def assert_only_our_markup(html: str) -> Elements:
    """No element or attribute that device text could have smuggled in: no inline script, no event
    handler attribute, no tag the templates do not write."""
    page = Elements(html)
    ours = {"html", "head", "meta", "title", "link", "body", "header", "a", "nav", "div", "label", "input", "button",
            "span", "main", "p", "footer", "script", "h1", "h2", "section", "dl", "dt", "dd", "table", "thead", "tr",
            "th", "tbody", "td", "noscript"}
    for tag, attrs in page.tags:
        assert tag in ours, (tag, attrs)
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        if tag == "script":
            assert set(attrs) == {"src"} and str(attrs["src"]).startswith("/static/"), attrs
    return page


# -- pages -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/devices/dev-1", "/devices/dev-2", "/alerts", "/review", "/review?state=all",
                                  "/rollouts", "/devices/nope"])
def test_pages_hold_only_the_templates_markup(web: TestClient, path: str) -> None:
    assert_only_our_markup(web.get(path).text)


def test_fleet_page_shows_counts_devices_models_and_drift(web: TestClient, hub: Hub) -> None:
    r = web.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"

    def field(key: str) -> str:
        m = re.search(rf'data-source="fleet" data-key="{re.escape(key)}" data-fmt="int">([^<]*)<', html)
        assert m, key
        return m.group(1)

    assert (field("devices.online"), field("devices.offline"), field("devices.total")) == ("2", "1", "3")
    assert field("alerts.firing") == "1"
    rows = re.findall(r"<tr><td><a href=\"/devices/([^\"]+)\">", html)
    assert rows == ["dev-1", "dev-2", "dev-3"]
    dev1 = html[html.index('href="/devices/dev-1"'):html.index('href="/devices/dev-2"')]
    for text in ("badge-online", "digits_mlp@3", "80.00", "12.5", "10", "2.0%", "37.5", "81.0", "48.5", "ALARM"):
        assert text in dev1, text
    dev3 = html[html.index('href="/devices/dev-3"'):]
    assert "badge-offline" in dev3
    for column in DEVICE_COLUMNS:
        assert f'data-key="{column.key}" data-fmt="{column.fmt}"' in html
    models = html[html.index('id="models"'):html.index('id="drift"')]
    assert "digits_mlp" in models and "93.0%" in models           # reported accuracy
    drift = html[html.index('id="drift"'):]
    (entry,) = hub.drift()
    assert entry["alarm_devices"] == ["dev-1"] and entry["score"] > 1
    assert f"{entry['score']:.2f}" in drift and "dev-1" in drift


def test_device_page_shows_facts_events_and_chart_hooks_escaped(web: TestClient) -> None:
    r = web.get("/devices/dev-1")
    assert r.status_code == 200
    html = r.text
    assert 'data-series="devices/dev-1/series"' in html
    assert '/static/vendor/uplot/uPlot.iife.min.js' in html and '/static/vendor/uplot/uPlot.min.css' in html
    assert '/static/device.js' in html
    for text in ("digits_mlp@3", "0.1.0", "b1", "source_failed", "badge-online", "ALARM"):
        assert text in html, text
    # What devices send is text, never markup.
    assert SCRIPT not in html
    assert "camera said &lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in html
    assert "<script" not in html.replace('<script src="/static/', "")   # no inline script at all
    other = web.get("/devices/dev-2").text
    assert "<b>side</b>" not in other and "&lt;b&gt;side&lt;/b&gt;" in other


def test_alerts_page_offers_ack_for_firing_alerts_only(web: TestClient, hub: Hub) -> None:
    alert_id = firing_id(hub)
    html = web.get("/alerts").text
    assert f'data-action="ack" data-id="{alert_id}"' in html
    assert "slow: p99_latency_ms of dev-1 is 80" in html and "badge-critical" in html
    assert html.count('data-action="ack"') == 1
    for column in ALERT_COLUMNS:
        assert f'data-key="{column.key}"' in html
    hub.ack_alert(alert_id, "ops")
    html = web.get("/alerts?state=acknowledged").text
    assert 'data-action="ack"' not in html and "ops" in html and 'data-source="alerts?state=acknowledged"' in html
    assert "no alerts" in web.get("/alerts?state=resolved").text
    bad = web.get("/alerts?state=bogus")
    assert bad.status_code == 400 and "state must be one of" in bad.text and bad.headers["content-type"].startswith(
        "text/html")


def test_review_page_lists_pending_items_with_escaped_labels(web: TestClient, hub: Hub) -> None:
    items = hub.review_items()
    assert len(items) == 3
    html = web.get("/review").text
    for item in items:
        assert f'data-action="confirm" data-id="{item["id"]}"' in html
    assert IMG not in html and "&lt;img src=x onerror=" in html
    # The predicted label travels as JSON in an attribute, quoted for HTML.
    labels = [json.loads(str(a["data-label"])) for tag, a in assert_only_our_markup(html).tags
              if a.get("data-action") == "confirm"]
    assert labels == [3, 7, IMG]
    assert "nothing to review" in web.get("/review?state=confirmed").text
    assert web.get("/review?state=all").text.count('data-action="confirm"') == 3


def test_rollouts_page_says_none_yet(web: TestClient) -> None:
    r = web.get("/rollouts")
    assert r.status_code == 200 and "No rollouts yet." in r.text


def test_unknown_pages_are_html_404s(web: TestClient) -> None:
    for path in ("/devices/nope", "/no/such/page"):
        r = web.get(path)
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html"), path
    assert "no device &#39;nope&#39;" in web.get("/devices/nope").text


# -- API -------------------------------------------------------------------------------------------

def test_api_routes_return_the_hubs_views(web: TestClient, hub: Hub) -> None:
    assert web.get("/api/v1/fleet").json() == json.loads(json.dumps(hub.snapshot()))
    assert web.get("/api/v1/devices").json() == json.loads(json.dumps(hub.devices()))
    assert web.get("/api/v1/devices/dev-1").json() == json.loads(json.dumps(hub.device("dev-1")))
    assert web.get("/api/v1/models").json() == json.loads(json.dumps(hub.models()))
    assert web.get("/api/v1/drift").json() == json.loads(json.dumps(hub.drift()))
    assert web.get("/api/v1/rollouts").json() == []
    series = web.get("/api/v1/devices/dev-1/series").json()
    assert series["device_id"] == "dev-1"
    assert series["series"]["latency_p99_ms"] == [[T0, 20.0], [T0 + MIN, 80.0]]
    assert series["series"]["drift_score"][0][1] > 1
    later = web.get(f"/api/v1/devices/dev-1/series?since={T0 + 1}").json()["series"]
    assert later["latency_p99_ms"] == [[T0 + MIN, 80.0]]
    alerts = web.get("/api/v1/alerts").json()
    assert [a["id"] for a in alerts] == [firing_id(hub)]
    assert web.get("/api/v1/alerts?state=firing").json() == alerts
    assert web.get("/api/v1/alerts?state=resolved").json() == []
    pending = web.get("/api/v1/review").json()
    assert [i["payload"]["label"] for i in pending] == [3, 7, IMG]
    assert web.get("/api/v1/review?state=pending&limit=2").json() == pending[:2]
    assert web.get("/api/v1/review?state=confirmed").json() == []
    health = web.get("/healthz")
    assert health.json() == {"status": "ok", "time_ms": T0 + MIN + 1000, "version": health.json()["version"]}
    assert web.get("/api/v1/devices").headers["content-type"] == "application/json"


def test_api_errors_are_json(web: TestClient) -> None:
    def error(method: str, path: str, status: int, **kw: Any) -> str:
        r = web.request(method, path, **kw)
        assert r.status_code == status, (path, r.text)
        body = r.json()
        assert body["status"] == status and body["error"] and body["message"]
        return str(body["message"])

    assert error("GET", "/api/v1/devices/nope", 404) == "no device 'nope'"
    assert error("GET", "/api/v1/devices/nope/series", 404) == "no device 'nope'"
    assert "/api/v1/nothing" in error("GET", "/api/v1/nothing", 404)
    assert "state must be one of firing" in error("GET", "/api/v1/alerts?state=open", 400)
    assert "state must be one of pending" in error("GET", "/api/v1/review?state=open", 400)
    assert "limit must be an integer" in error("GET", "/api/v1/review?limit=0", 400)
    assert "since" in error("GET", "/api/v1/devices/dev-1/series?since=yesterday", 400)
    error("GET", "/api/v1/alerts/x/ack", 405)
    assert error("POST", "/api/v1/alerts/nope/ack", 404) == "no alert 'nope'"
    assert error("POST", "/api/v1/review/nope", 404, json={"label": 1}) == "no review item 'nope'"


def test_ack_flows_through_to_the_hub(web: TestClient, hub: Hub) -> None:
    alert_id = firing_id(hub)
    r = web.post(f"/api/v1/alerts/{alert_id}/ack", json={"by": "ops@example.com"})
    assert r.status_code == 200 and r.json()["state"] == "acknowledged"
    (acked,) = hub.alert_list("acknowledged")
    assert acked["id"] == alert_id and acked["acked_by"] == "ops@example.com"
    again = web.post(f"/api/v1/alerts/{alert_id}/ack", json={"by": "ops@example.com"})
    assert again.status_code == 409 and "already acknowledged" in again.json()["message"]
    assert web.get("/api/v1/fleet").json()["alerts"] == {"firing": 0, "acknowledged": 1, "resolved": 0}


def test_ack_without_a_body_names_nobody_in_particular(web: TestClient, hub: Hub) -> None:
    r = web.post(f"/api/v1/alerts/{firing_id(hub)}/ack")
    assert r.status_code == 200 and r.json()["acked_by"] == "anonymous"


def test_review_verdicts_flow_through_to_the_hub(web: TestClient, hub: Hub) -> None:
    first, second, _third = hub.review_items()
    r = web.post(f"/api/v1/review/{first['id']}", json={"label": 3, "by": "reviewer"})
    assert r.status_code == 200 and r.json()["state"] == "confirmed"
    r = web.post(f"/api/v1/review/{second['id']}", json={"label": "1", "by": "reviewer"})
    assert r.status_code == 200 and r.json()["state"] == "corrected" and r.json()["label"] == "1"
    assert [i["id"] for i in hub.review_items("confirmed")] == [first["id"]]
    again = web.post(f"/api/v1/review/{first['id']}", json={"label": 3, "by": "reviewer"})
    assert again.status_code == 409 and "already confirmed" in again.json()["message"]
    (kpi,) = [m for m in hub.models() if m["model"] == "digits_mlp" and m["version"] == "3"]
    assert kpi["accuracy"]["n"] == 2


@pytest.mark.parametrize(("kwargs", "status", "message"), [
    ({}, 400, "empty body"),
    ({"content": b"{", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ({"json": [1]}, 400, "expected a JSON object"),
    ({"json": {"by": "x"}}, 400, "missing 'label'"),
    ({"json": {"label": True}}, 400, "'label' must be"),
    ({"json": {"label": {"a": 1}}}, 400, "'label' must be"),
    ({"json": {"label": 3, "by": " "}}, 400, "'by' must name"),
    ({"json": {"label": 3, "by": 7}}, 400, "'by' must name"),
    ({"content": b"label=3", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415,
     "application/json"),
    ({"json": {"label": "x" * 20_000}}, 413, "at most"),
])
def test_bad_bodies_are_refused_clearly(web: TestClient, hub: Hub, kwargs: dict[str, Any], status: int,
                                        message: str) -> None:
    item = hub.review_items()[0]
    r = web.post(f"/api/v1/review/{item['id']}", **kwargs)
    assert r.status_code == status and message in r.json()["message"], r.text
    assert hub.review_items()[0]["state"] == "pending"


# -- who may change state --------------------------------------------------------------------------

def test_with_a_token_every_post_needs_it(hub: Hub) -> None:
    app = create_app(hub, token=TOKEN)
    alert_id = firing_id(hub)
    path = f"/api/v1/alerts/{alert_id}/ack"
    local = client(app)
    missing = local.post(path, json={"by": "x"})
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in missing.json()["message"]
    assert local.post(path, headers={"Authorization": "Basic abc"}).status_code == 401
    wrong = local.post(path, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and wrong.json()["error"] == "forbidden"
    assert local.post("/api/v1/no/such/route", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert hub.alert_list("firing")                                    # nothing changed
    # Reading needs no token, from anywhere.
    remote = client(app, "203.0.113.9", server="dash.example.net")
    assert remote.get("/api/v1/alerts").status_code == 200 and remote.get("/").status_code == 200
    ok = remote.post(path, json={"by": "remote"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and hub.alert_list("acknowledged")[0]["acked_by"] == "remote"


def test_without_a_token_only_loopback_may_post(hub: Hub) -> None:
    app = create_app(hub, token=None)
    path = f"/api/v1/alerts/{firing_id(hub)}/ack"
    remote = client(app, "203.0.113.9", server="dash.example.net")
    r = remote.post(path, json={"by": "x"})
    assert r.status_code == 403
    assert "--token" in r.json()["message"] and "CLOUD_SYNC_TOKEN" in r.json()["message"]
    assert remote.get("/api/v1/alerts").status_code == 200
    # A loopback peer that names another host is a proxy or DNS rebinding: refused too.
    assert client(app, "127.0.0.1", server="evil.example").post(path).status_code == 403
    # Another web site's page in a local browser: refused.
    cross = client(app, "127.0.0.1", server="127.0.0.1:8080").post(path, headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403 and "origin" in cross.json()["message"]
    assert hub.alert_list("firing")
    same = client(app, "::1", server="localhost:8080").post(path, headers={"Origin": "http://localhost:8080"})
    assert same.status_code == 200 and hub.alert_list("acknowledged")


def test_loopback_and_tokens_are_told_apart() -> None:
    for host in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost", "app.localhost", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("", None, "10.0.0.1", "203.0.113.9", "testclient", "localhost.example.com", "::ffff:10.0.0.1"):
        assert not is_loopback(host), host
    with pytest.raises(EdgeRuntimeError, match="empty"):
        create_app(object(), token="  ")


# -- formatting and assets ---------------------------------------------------------------------------

def test_cells_format_like_the_script_does() -> None:
    assert format_value("num2", 1.23456) == "1.23" and format_value("num1", 12.0) == "12.0"
    assert format_value("int", 1234567) == "1,234,567" and format_value("pct", 0.0125) == "1.2%"
    assert format_value("time", T0) == "2025-11-26 14:23:20"
    assert format_value("num2", None) == "\u2013" and format_value("text", "") == "\u2013"
    assert format_value("alarm", True) == "ALARM" and format_value("alarm", False) == "no"
    assert format_value("list", ["a", "b"]) == "a, b" and format_value("list", []) == "\u2013"
    assert format_value("json", {"k": [1, "é"]}) == '{"k":[1,"é"]}'
    row = {"running": [], "models": [{"name": "m", "version": "2", "state": "shadow"}]}
    assert format_value("models", [], row) == "m@2"
    assert format_value("models", [{"model": "a", "version": "1"}], row) == "a@1"


def test_static_files_and_the_vendored_uplot(web: TestClient) -> None:
    vendor = STATIC_DIR / "vendor" / "uplot"
    version = (vendor / "VERSION").read_text().strip()
    banner = (vendor / "uPlot.iife.min.js").read_text()[:200]
    assert f"(v{version})" in banner
    assert "MIT License" in (vendor / "LICENSE").read_text()
    js = web.get("/static/vendor/uplot/uPlot.iife.min.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert web.get("/static/app.js").status_code == 200 and web.get("/static/app.css").status_code == 200
    assert web.get("/static/nothing.js").status_code == 404
    # The script writes device text with textContent only.
    for name in ("app.js", "device.js"):
        source = (STATIC_DIR / name).read_text()
        assert "innerHTML" not in source and "insertAdjacentHTML" not in source and "eval(" not in source


def test_web_server_serves_on_a_free_loopback_port(hub: Hub) -> None:
    server = WebServer(create_app(hub, token=None), host="127.0.0.1", port=0).start()
    try:
        assert server.port > 0
        with urllib.request.urlopen(f"{server.url}/healthz", timeout=5) as r:
            assert json.load(r)["status"] == "ok"
        with urllib.request.urlopen(f"{server.url}/api/v1/devices", timeout=5) as r:
            assert [d["id"] for d in json.load(r)] == ["dev-1", "dev-2", "dev-3"]
        with pytest.raises(EdgeRuntimeError, match="could not listen"):
            WebServer(create_app(hub, token=None), host="127.0.0.1", port=server.port, log_level="critical").start()
    finally:
        server.stop()
    assert not server._thread or not server._thread.is_alive()


def test_cloud_sync_alerts_status_and_devices_commands_against_a_running_server(hub: Hub) -> None:
    """The CLI client commands, in a fresh interpreter, against the dashboard server over HTTP."""
    import subprocess
    import sys

    from cloud_sync.web import WebServer

    web = WebServer(create_app(hub, token="s3cret"), port=0).start()
    try:
        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "cloud_sync.cli", *args, "--url", web.url],
                                  capture_output=True, text=True, timeout=60, check=False)

        alert_id = firing_id(hub)
        listed = run("alerts")
        assert listed.returncode == 0 and alert_id in listed.stdout and "firing" in listed.stdout
        refused = run("alerts", "--ack", alert_id, "--token", "wrong")
        assert refused.returncode == 1 and "HTTP 403" in refused.stderr
        ok = run("alerts", "--ack", alert_id, "--by", "oncall", "--token", "s3cret")
        assert ok.returncode == 0, ok.stderr
        assert hub.alert_list("acknowledged")[0]["acked_by"] == "oncall"
        devices = run("devices")
        assert devices.returncode == 0 and "dev-1" in devices.stdout and "offline" in devices.stdout
        assert "devices: 3 (" in run("status").stdout
    finally:
        web.stop()
    gone = subprocess.run([sys.executable, "-m", "cloud_sync.cli", "status", "--url", web.url],
                          capture_output=True, text=True, timeout=60, check=False)
    assert gone.returncode == 1 and "cannot reach cloud-sync" in gone.stderr
