"""The cloud hub on a real SQLite store: ingest -> fleet view -> alerts (persisted, sent to sinks),
retraining requests that run a command, and the review queue that sends labels back to devices."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from cloud_sync.hub import Hub
from edge_runtime.core import protocol as p

T0 = 1_764_167_000_000

RULES = """
[sinks.bus]
type = "mqtt"
topic = "alerts/fleet"

[sinks.hook]
type = "webhook"
url = "{hook}"
timeout_s = 2

[[rule]]
name = "slow"
metric = "p99_latency_ms"
op = ">"
threshold = 50
sinks = ["log", "bus", "hook"]

[[rule]]
name = "unsure"
metric = "low_confidence_rate"
op = ">"
threshold = 0.5
retrain = true
model = "digits_mlp"
"""


class Published(list):
    """What the hub published, as (topic, payload, qos, retain)."""

    def __call__(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.append((topic, payload, qos, retain))


@pytest.fixture
def webhook():
    got: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    srv = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}/hook", got
    finally:
        srv.shutdown()


def status(dev: str, boot: str = "b1") -> p.Status:
    return p.Status(dev, True, boot, T0, "0.1.0", (p.ModelStatus("digits_mlp", "3", "active"),))


def metric(seq: int, t: int, p99_us: float, low: int, predictions: int) -> p.Record:
    return p.Record(seq, "m", t, {
        "pipeline": "digits_mlp", "model_version": "3", "window_s": 60.0, "inputs": predictions,
        "predictions": predictions, "throughput_per_s": 10.0,
        "latency_us": {"count": 600, "mean": p99_us / 2, "p50": p99_us / 2, "p90": p99_us, "p99": p99_us,
                       "max": p99_us},
        "errors": {}, "low_confidence": low, "null_outputs": 0, "labels": {"3": predictions},
        "drift_alarm": False, "accuracy": None, "labelled": 0, "cpu_percent": 20.0, "rss_mb": 80.0,
        "temperature_c": None})


def batch(dev: str, records: list[p.Record], boot: str = "b1") -> p.RecordBatch:
    return p.RecordBatch(dev, boot, f"{boot}:{records[0].seq}-{records[-1].seq}", tuple(records))


def feed(hub: Hub, msg, now: int) -> list:
    return hub.handle(msg.topic, msg.to_wire(), now)


def test_alert_fires_goes_to_every_sink_survives_a_restart_and_resolves(tmp_path: Path, webhook) -> None:
    url, hooked = webhook
    pub = Published()
    hub = Hub.for_tests(tmp_path / "c.db", RULES.format(hook=url), publish=pub)
    feed(hub, status("dev-1"), T0)
    acks = feed(hub, batch("dev-1", [metric(1, T0, 20_000, 0, 600)]), T0 + 10)
    assert acks and acks[0][0] == "edge/v1/dev-1/cmd/ack"
    assert hub.alert_list() == []
    feed(hub, batch("dev-1", [metric(2, T0 + 60_000, 80_000, 0, 1200)]), T0 + 60_010)
    (alert,) = hub.alert_list("firing")
    assert alert["rule"] == "slow" and alert["subject"] == "dev-1" and alert["value"] == pytest.approx(80.0)
    bus = [json.loads(m[1]) for m in pub if m[0] == "alerts/fleet"]
    assert bus[-1]["after"] == "firing" and bus[-1]["alert_id"] == alert["id"]
    deadline = time.monotonic() + 5
    while not hooked and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hooked and hooked[0]["alert_id"] == alert["id"]
    assert hub.snapshot()["alerts"]["firing"] == 1
    hub.ack_alert(alert["id"], "ops@example.com")
    hub.close()

    # A restart: the alert is remembered (acknowledged, same id), not fired again.
    pub2 = Published()
    hub2 = Hub.for_tests(tmp_path / "c.db", RULES.format(hook=url), publish=pub2)
    (again,) = hub2.alert_list()
    assert again["id"] == alert["id"] and again["state"] == "acknowledged" and again["acked_by"] == "ops@example.com"
    feed(hub2, status("dev-1"), T0 + 120_000)
    feed(hub2, batch("dev-1", [metric(3, T0 + 120_000, 10_000, 0, 1800)]), T0 + 120_010)
    assert [a["state"] for a in hub2.alert_list()] == ["resolved"]
    assert not [m for m in pub2 if m[0] == "alerts/fleet" and json.loads(m[1])["after"] == "firing"]
    with pytest.raises(KeyError):
        hub2.ack_alert("no-such-alert", "ops")
    with pytest.raises(ValueError, match="resolved"):
        hub2.ack_alert(alert["id"], "ops")
    hub2.close()


def test_a_retrain_rule_records_a_request_and_runs_the_command(tmp_path: Path) -> None:
    script = tmp_path / "retrain.py"
    script.write_text("import json, os, sys\n"
                      "req = json.load(open(sys.argv[-1]))\n"
                      "assert os.environ['RETRAIN_REQUEST'] == sys.argv[-1]\n"
                      "open(sys.argv[-2], 'w').write(req['model'])\n"
                      "print('new bundle: digits_mlp-4')\n")
    done = tmp_path / "done.txt"
    pub = Published()
    hub = Hub.for_tests(tmp_path / "c.db", RULES.format(hook="http://127.0.0.1:9/none"), publish=pub,
                        retrain_command=f"{sys.executable} {script} {done}", retrain_topic="retrain/requests",
                        retrain_dir=tmp_path / "requests")
    feed(hub, status("dev-2"), T0)
    feed(hub, batch("dev-2", [metric(1, T0, 1000, 0, 100)]), T0)
    feed(hub, batch("dev-2", [metric(2, T0 + 60_000, 1000, 90, 200)]), T0 + 60_000)  # 90 of 100 unsure
    (alert,) = hub.alert_list("firing")
    assert alert["rule"] == "unsure" and alert["retrain"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and hub.retrain_requests()[0]["state"] not in ("succeeded", "failed"):
        time.sleep(0.1)
    (req,) = hub.retrain_requests()
    assert req["state"] == "succeeded", req
    assert req["model"] == "digits_mlp" and "new bundle" in req["outcome"]["stdout_tail"]
    assert req["payload"]["alert"]["alert_id"] == alert["id"] and req["payload"]["data_window"]["until_ms"]
    assert done.read_text() == "digits_mlp"
    assert [json.loads(m[1])["id"] for m in pub if m[0] == "retrain/requests"] == [req["id"]]
    hub.close()


def test_low_confidence_predictions_enter_the_review_queue_and_verdicts_go_back(tmp_path: Path) -> None:
    pub = Published()
    hub = Hub.for_tests(tmp_path / "c.db", publish=pub, review_below=0.6, review_per_device_hour=3)
    feed(hub, status("dev-3"), T0)
    preds = [p.Record(i, "p", T0 + i, {"i": f"b1-{i}", "m": "digits_mlp", "y": i % 10, "p": 0.4 if i % 2 else 0.9})
             for i in range(1, 13)]
    feed(hub, batch("dev-3", preds), T0 + 100)
    feed(hub, batch("dev-3", preds), T0 + 200)   # a resend changes nothing
    items = hub.review_items()
    assert [i["payload"]["prediction_id"] for i in items] == ["b1-1", "b1-3", "b1-5"]  # capped at 3 per hour
    assert all(i["payload"]["score"] == 0.4 for i in items)
    confirmed = hub.review_resolve(items[0]["id"], items[0]["payload"]["label"], "reviewer")
    corrected = hub.review_resolve(items[1]["id"], 8, "reviewer")
    assert confirmed["state"] == "confirmed" and corrected["state"] == "corrected" and corrected["label"] == 8
    sent = [p.decode(t, b) for t, b, _q, _r in pub if t.endswith("/cmd/labels")]
    assert [(s.device_id, s.labels[0].ref, s.labels[0].label) for s in sent] == [
        ("dev-3", "b1-1", 1), ("dev-3", "b1-3", 8)]
    (kpi,) = [m for m in hub.models() if m["model"] == "digits_mlp"]
    assert kpi["accuracy"]["n"] == 2 and kpi["accuracy"]["accuracy"] == pytest.approx(0.5)
    assert [i["id"] for i in hub.review_items()] == [items[2]["id"]]
    with pytest.raises(ValueError, match="already confirmed"):
        hub.review_resolve(items[0]["id"], 1, "reviewer")
    with pytest.raises(KeyError):
        hub.review_resolve("nope", 1, "reviewer")
    with pytest.raises(ValueError, match="reviewer"):
        hub.review_resolve(items[2]["id"], 1, " ")
    hub.close()


def test_garbage_never_breaks_the_hub(tmp_path: Path) -> None:
    hub = Hub.for_tests(tmp_path / "c.db", RULES.format(hook="http://127.0.0.1:9/x"))
    for topic, payload in [("edge/v1/dev-4/records", b"{"), ("edge/v1/dev-4/status", b"[]"),
                           ("edge/v1/dev-4/telemetry", b'{"v":1,"boot_id":"b","time_ms":1,"metrics":[]}'),
                           ("edge/v1/dev-4/cmd/ack", b"{}"), ("not/ours", b"x")]:
        assert hub.handle(topic, payload, T0) == []
    odd = p.Record(1, "m", T0, {"pipeline": 5, "latency_us": "fast", "predictions": -3})
    assert feed(hub, batch("dev-4", [odd]), T0)  # stored and acked
    snap = hub.snapshot()
    assert snap["ingest"]["messages"] == 6 and sum(snap["ingest"]["rejected"].values()) >= 4
    hub.close()


def test_a_restarted_hub_rebuilds_the_fleet_view_from_the_store(tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    hub = Hub.for_tests(tmp_path / "c.db")
    feed(hub, status("dev-5"), now)
    feed(hub, batch("dev-5", [metric(1, now - 120_000, 20_000, 0, 600), metric(2, now - 60_000, 30_000, 6, 1200)]),
         now)
    before = {r["id"]: r for r in hub.devices()}["dev-5"]
    hub.close()
    hub2 = Hub.for_tests(tmp_path / "c.db")
    after = {r["id"]: r for r in hub2.devices()}["dev-5"]
    assert after["p99_ms"] == before["p99_ms"] == pytest.approx(30.0)
    assert after["models"] == before["models"] and after["state"] == "online"
    series = hub2.device("dev-5")["series"]["latency_p99_ms"]
    assert series == hub.fleet.device("dev-5", now)["series"]["latency_p99_ms"]
    hub2.close()
    # Records older than the replay window are left out.
    hub3 = Hub.for_tests(tmp_path / "c.db", replay_s=30)
    assert {r["id"]: r for r in hub3.devices()}["dev-5"]["p99_ms"] is None
    hub3.close()


def test_a_registered_bundle_gives_the_accuracy_baseline(models_dir: Path, tmp_path: Path, profile) -> None:
    from edge_runtime.adapters import ed25519
    from edge_runtime.bundle import CreateOptions, create_bundle

    ed25519.write_keypair(ed25519.generate(), tmp_path / "k")
    b = create_bundle(models_dir / "digits_mlp.onnx", "3", tmp_path / "k", tmp_path / "b", CreateOptions(
        reference=str(models_dir / "digits_mlp.train_x.npy"), test_data=str(models_dir / "digits_mlp.test_x.npy"),
        test_labels=str(models_dir / "digits_mlp.test_y.npy")), profile)
    hub = Hub.for_tests(tmp_path / "c.db")
    assert hub.register_bundle(b) == ("digits_mlp", "3")
    feed(hub, status("dev-6"), T0)
    feed(hub, batch("dev-6", [metric(1, T0, 1000, 0, 10)]), T0)
    (kpi,) = [m for m in hub.models() if m["model"] == "digits_mlp"]
    assert kpi["reference_accuracy"] == pytest.approx(0.97, abs=0.02)
    with pytest.raises(ValueError, match="not a readable model bundle"):
        hub.register_bundle(tmp_path)
    hub.close()


def test_outputs_held_for_review_at_level_4_enter_the_queue_whatever_the_threshold(tmp_path: Path) -> None:
    hub = Hub.for_tests(tmp_path / "c.db", review_below=None)
    feed(hub, status("dev-7"), T0)
    recs = [p.Record(1, "p", T0, {"i": "b1-1", "m": "digits_mlp", "y": 3, "p": 0.97, "st": "pending_review"}),
            p.Record(2, "p", T0, {"i": "b1-2", "m": "digits_mlp", "y": 4, "p": 0.2})]
    feed(hub, batch("dev-7", recs), T0)
    (item,) = hub.review_items()
    assert item["payload"]["prediction_id"] == "b1-1" and item["payload"]["reason"] == "review_rule"
    hub.close()
