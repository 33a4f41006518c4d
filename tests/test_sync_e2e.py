"""Agent -> real Mosquitto -> cloud ingest, with the durable outbox: nothing acknowledged is lost.

The fault tests kill the agent with SIGKILL mid-stream and restart the broker; afterwards every record
the agent committed to its outbox is in the cloud store exactly once. What was committed is read from
the outbox itself: each boot's ``next_seq`` is persisted with every commit, and seqs are contiguous.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_sync.service import IngestService
from cloud_sync.store import Store

pytestmark = pytest.mark.integration


def agent(models_dir: Path, broker_url: str, outbox: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "run", "--model",
                             str(models_dir / "digits_mlp.onnx"), "--source", "synthetic:400", "--broker", broker_url,
                             "--device-id", "dev-1", "--buffer", str(outbox), "--status-interval", "0", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def committed(outbox: Path) -> dict[str, int]:
    """Per boot, how many records the agent committed to its outbox (seqs 0..n-1)."""
    with sqlite3.connect(outbox) as db:
        return dict(db.execute("SELECT boot_id, next_seq FROM boots WHERE device_id='dev-1'"))


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def check_exactly_once(store_path: Path, outbox: Path) -> int:
    store = Store(store_path)
    try:
        rows = store.records("dev-1")
    finally:
        store.close()
    by_boot: dict[str, list[int]] = {}
    for _dev, boot, seq, kind, _created, payload in rows:
        by_boot.setdefault(boot, []).append(seq)
        assert kind in ("p", "m")
        if kind == "p":
            assert 0 <= payload["y"] <= 9
    want = committed(outbox)
    for boot, n in want.items():
        got = sorted(by_boot.get(boot, []))
        assert got == list(range(n)), f"boot {boot}: {n} committed, cloud has {len(got)} (lost or reordered)"
    assert set(by_boot) <= set(want)
    return sum(want.values())


def test_agent_syncs_every_prediction_through_mosquitto(models_dir: Path, broker_factory, tmp_path: Path) -> None:
    broker = broker_factory()
    svc = IngestService(broker.url, str(tmp_path / "cloud.db"))
    svc.start()
    try:
        outbox = tmp_path / "outbox.db"
        proc = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "run", "--model",
                               str(models_dir / "digits_mlp.onnx"), "--source",
                               f"npy:{models_dir / 'digits_mlp.test_x.npy'}", "--broker", broker.url, "--device-id",
                               "dev-1", "--buffer", str(outbox), "--json"], capture_output=True, text=True, timeout=60,
                              check=True)
        report = json.loads(proc.stdout)
        assert report["sync"] == "mqtt" and report["uplink"]["pending"] == 0
        wait_until(lambda: svc.store.count() >= 451, 10, "the cloud to store 450 predictions and 1 metric")
        total = check_exactly_once(tmp_path / "cloud.db", outbox)
        assert total == 451
        assert svc.store.devices()["dev-1"]["online"] is False  # said goodbye at exit
    finally:
        svc.stop()


def test_no_sync_keeps_everything_local(models_dir: Path, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.db"
    proc = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "run", "--model",
                           str(models_dir / "digits_mlp.onnx"), "--max-inputs", "10", "--broker", "mqtt://127.0.0.1:9",
                           "--no-sync", "--buffer", str(outbox), "--json"], capture_output=True, text=True,
                          timeout=60, check=True)
    assert json.loads(proc.stdout)["sync"] == "disabled" and not outbox.exists()


def test_kill_9_twenty_times_and_broker_restarts_lose_nothing(models_dir: Path, broker_factory,
                                                              tmp_path: Path) -> None:
    broker = broker_factory()
    store_path = tmp_path / "cloud.db"
    outbox = tmp_path / "outbox.db"
    svc = IngestService(broker.url, str(store_path))
    svc.start()
    rng = random.Random(7)
    try:
        for i in range(20):
            proc = agent(models_dir, broker.url, outbox)
            time.sleep(rng.uniform(0.8, 1.6))  # load the model, stream, sync: killed anywhere in that
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            if i in (2, 6, 9, 13, 17):
                broker.restart()  # five times: the broker forgets every session and queued message
            if i == 15:
                svc.stop()  # the cloud is down while the device keeps running and buffering
                proc = agent(models_dir, broker.url, outbox)
                time.sleep(1.5)
                svc = IngestService(broker.url, str(store_path))
                svc.start()
                time.sleep(1.0)
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        # A last clean run drains whatever the killed ones left in the outbox.
        proc = agent(models_dir, broker.url, outbox, "--max-inputs", "50", "--drain-timeout", "20")
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
        with sqlite3.connect(outbox) as db:
            left = db.execute("SELECT count(*) FROM records").fetchone()[0]
        assert left == 0, f"{left} records still in the outbox"
        total = check_exactly_once(store_path, outbox)
        assert total > 1000
        stats = svc.stats()
    finally:
        svc.stop()
    # Resends happened (kills between send and ack) and were deduplicated, not stored twice.
    assert stats["rejected"] == {}


def test_embedded_broker_demo_path(models_dir: Path, tmp_path: Path) -> None:
    """`cloud-sync serve --embedded-broker` needs nothing installed; the agent speaks MQTT 3.1.1 to it."""
    from tests.conftest import free_port

    port, http = free_port(), free_port()
    db = tmp_path / "cloud.db"
    cloud = subprocess.Popen([sys.executable, "-m", "cloud_sync.cli", "serve", "--embedded-broker", "--port", str(port),
                              "--db", str(db), "--stats-interval", "0", "--http", f"127.0.0.1:{http}"],
                             stderr=subprocess.PIPE, text=True)
    try:
        assert cloud.stderr is not None
        deadline = time.monotonic() + 30
        for line in cloud.stderr:
            if "ingesting from" in line or time.monotonic() > deadline:
                break
        time.sleep(0.5)
        outbox = tmp_path / "outbox.db"
        subprocess.run([sys.executable, "-m", "edge_runtime.cli", "run", "--model", str(models_dir / "digits_mlp.onnx"),
                        "--source", f"npy:{models_dir / 'digits_mlp.test_x.npy'}", "--max-inputs", "100", "--broker",
                        f"mqtt311://127.0.0.1:{port}", "--device-id", "dev-1", "--buffer", str(outbox),
                        "--drain-timeout", "15"], check=True, capture_output=True, timeout=90)
        wait_until(lambda: Store(db).count() >= 101, 15, "the embedded-broker cloud to store 101 records")
        assert check_exactly_once(db, outbox) == 101
        # The fleet view of the same server, through its API, as an operator reads it.
        url = f"http://127.0.0.1:{http}"
        out = subprocess.run([sys.executable, "-m", "cloud_sync.cli", "devices", "--url", url, "--json"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        (dev,) = json.loads(out)
        assert dev["id"] == "dev-1" and dev["models"][0]["name"] == "digits_mlp"
        table = subprocess.run([sys.executable, "-m", "cloud_sync.cli", "status", "--url", url],
                               capture_output=True, text=True, timeout=30, check=True).stdout
        assert "devices: 1 (" in table and "digits_mlp" in table
    finally:
        cloud.send_signal(signal.SIGTERM)
        assert cloud.wait(15) == 0


def test_malformed_payloads_on_every_topic_are_counted_and_dropped(models_dir: Path, broker_factory,
                                                                   tmp_path: Path) -> None:
    """Garbage on every topic each side subscribes to, both directions: counted, dropped, no crash,
    and the good records still arrive exactly once."""
    import paho.mqtt.client as mqtt

    broker = broker_factory()
    svc = IngestService(broker.url, str(tmp_path / "cloud.db"))
    svc.start()
    outbox = tmp_path / "outbox.db"
    report = tmp_path / "report.json"
    proc = agent(models_dir, broker.url, outbox, "--max-inputs", "2000", "--drain-timeout", "20", "--report-json",
                 str(report))
    bad = [b"", b"\xff\xfe garbage", b"{", b"[]", b'{"v":2}', b'{"v":1}', b'{"v":1,"records":"x","boot_id":1}',
           b'{"v":1,"batch_id":"a:1-2","boot_id":"a","records":[[1,"p","now",{}]]}', b"x" * 300_000]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="attacker", protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        time.sleep(1.0)
        for topic in ("edge/v1/dev-1/records", "edge/v1/dev-1/status", "edge/v1/dev-1/telemetry",
                      "edge/v1/dev-1/cmd/ack", "edge/v1/dev-1/cmd/labels", "edge/v1/dev-1/cmd/rollout"):
            for payload in bad:
                c.publish(topic, payload, qos=1).wait_for_publish(5)
        assert proc.wait(90) == 0, proc.stderr.read() if proc.stderr else ""
        wait_until(lambda: svc.store.count() >= 2001, 20, "every record in the cloud")
        stats = svc.stats()
    finally:
        c.loop_stop()
        svc.stop()
    assert sum(stats["rejected"].values()) >= 3 * len(bad) - 3  # records, status, telemetry garbage
    assert check_exactly_once(tmp_path / "cloud.db", outbox) == 2001
    # The agent got the garbage sent to its command topics and counted it by reason.
    assert sum(json.loads(report.read_text())["uplink"]["sync"]["bad_messages"].values()) >= 2 * len(bad)


def test_label_feedback_from_the_cloud_reaches_the_concept_drift_tracker(models_dir: Path, broker_factory,
                                                                          tmp_path: Path) -> None:
    """The cloud answers with true labels for stored predictions (by their id); every one contradicts the
    model, so the agent's tracker, calibrated on the bundle's test accuracy, raises concept drift."""
    import paho.mqtt.client as mqtt

    from edge_runtime.adapters import ed25519
    from edge_runtime.bundle import CreateOptions, create_bundle
    from edge_runtime.core import protocol as p
    from edge_runtime.profiles import load_profile

    ed25519.write_keypair(ed25519.generate(), tmp_path / "k")
    bundle = create_bundle(models_dir / "digits_mlp.onnx", "1", tmp_path / "k", tmp_path / "b", CreateOptions(
        test_data=str(models_dir / "digits_mlp.test_x.npy"), test_labels=str(models_dir / "digits_mlp.test_y.npy")),
        load_profile("generic"))
    broker = broker_factory()
    svc = IngestService(broker.url, str(tmp_path / "cloud.db"))
    svc.start()
    report = tmp_path / "report.json"
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "run", "--model", str(bundle), "--key",
                             str(tmp_path / "k.pub"), "--source", "synthetic:300", "--broker", broker.url,
                             "--device-id", "dev-1", "--buffer", str(tmp_path / "outbox.db"), "--report-json",
                             str(report), "--status-interval", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: svc.store.count() >= 150, 30, "150 predictions in the cloud")
        preds = [(r[5]["i"], r[5]["y"]) for r in svc.store.records("dev-1") if r[3] == "p"][:150]
        fb = p.LabelFeedback("dev-1", "fb-1", tuple(p.Label(i, (y + 1) % 10) for i, y in preds))
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="reviewer", protocol=mqtt.MQTTv5)
        c.connect(broker.host, broker.port)
        c.loop_start()
        c.publish(fb.topic, fb.to_wire(), qos=1).wait_for_publish(5)
        c.loop_stop()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
        svc.stop()
    r = json.loads(report.read_text())
    concept = r["pipelines"][0]["concept"]
    assert concept["labels"] == 150 and concept["alarmed"]
    assert r["uplink"]["labels_unresolved"] == 0 and r["uplink"]["sync"]["labels_received"] == 150
