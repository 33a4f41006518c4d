"""Escalation end to end: a real agent (subprocess) on the small device model, a real Mosquitto, and the
cloud service answering with the larger model. Unsure inputs get the cloud's answer as their final one;
the budget holds under a burst; a malformed answer is counted and ignored; with the cloud gone the
agent answers everything locally and nothing waits."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from cloud_sync.service import IngestService
from tests.test_sync_e2e import wait_until

pytestmark = pytest.mark.integration

THRESHOLD = 0.6


def top1(model: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    probs = next(o for o in s.run(None, {s.get_inputs()[0].name: x}) if np.asarray(o).ndim == 2)
    return np.argmax(probs, axis=1), np.max(probs, axis=1)


class Agent:
    def __init__(self, pair: Path, tmp: Path, broker_url: str, policy: dict, name: str = "dev-1") -> None:
        (tmp / "policy.json").write_text(json.dumps(policy))
        self.report = tmp / f"{name}.json"
        self.preds = tmp / f"{name}.preds.jsonl"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.cli", "run", "--model", f"digits_small={pair / 'device.onnx'}",
             "--source", "stdin", "--broker", broker_url, "--device-id", name, "--buffer", str(tmp / f"{name}.db"),
             "--escalate-share", "features", "--escalation-policy", str(tmp / "policy.json"),
             "--predictions", str(self.preds), "--report-json", str(self.report), "--status-interval", "0",
             "--drain-timeout", "3"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def feed(self, x: np.ndarray, first: int = 0) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(json.dumps({"id": f"in-{first + i}", "input": row})
                                      + "\n" for i, row in enumerate(x.round(5).tolist())))
        self.proc.stdin.flush()

    def lines(self) -> int:
        return self.preds.read_text().count("\n") if self.preds.exists() else 0

    def finish(self) -> dict:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the source ends: the agent finishes and writes its report
            self.proc.stdin = None
        _out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err[-3000:]
        return json.loads(self.report.read_text())


def test_unsure_inputs_get_the_cloud_models_answer(models_dir: Path, broker_factory, tmp_path: Path) -> None:
    pair = models_dir / "escalation"
    x, y = np.load(pair / "test_x.npy").astype(np.float32), np.load(pair / "test_y.npy")
    local, score = top1(pair / "device.onnx", x)
    cloud, _ = top1(pair / "cloud.onnx", x)
    unsure = np.flatnonzero(score < THRESHOLD)
    assert 5 <= len(unsure) < len(x) // 2, len(unsure)

    broker = broker_factory()
    svc = IngestService(broker.url, str(tmp_path / "cloud.db"), escalation_models={"*": pair / "cloud.onnx"},
                        review_per_device_hour=1000)
    svc.start()
    try:
        agent = Agent(pair, tmp_path, broker.url, {"score_below": THRESHOLD, "max_per_minute": 6000,
                                                   "deadline_s": 10})
        wait_until(lambda: svc.transport.connected, 20, "the cloud to connect")
        time.sleep(1.0)  # the agent's link comes up
        agent.feed(x)
        wait_until(lambda: agent.lines() >= len(x), 60, "every local answer")
        wait_until(lambda: svc.escalation.counts["answered"] >= len(unsure), 60, "the cloud's answers")
        # A malformed answer and one for a model the agent does not escalate: counted, ignored.
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        c.connect(broker.host, broker.port)
        c.loop_start()
        c.publish("edge/v1/dev-1/cmd/answer", b'{"v":1,"id":"in-0"', qos=1).wait_for_publish(5)
        c.publish("edge/v1/dev-1/cmd/answer", json.dumps(
            {"v": 1, "id": "in-1", "model": "other", "label": 1, "score": 0.9, "cloud_model": "x", "sent_ms": 1,
             "answered_ms": 2}).encode(), qos=1).wait_for_publish(5)
        time.sleep(1.0)
        agent.feed(x[:20], first=len(x))  # still serving after the bad answers
        wait_until(lambda: agent.lines() >= len(x) + 20, 30, "answers after the malformed ones")
        c.loop_stop()
        c.disconnect()
        report = agent.finish()
    finally:
        svc.stop()

    esc = report["escalation"]["digits_small"]
    pipe = report["pipelines"][0]
    assert pipe["inputs"] == pipe["predictions"] == len(x) + 20 and pipe["errors"]["total"] == 0
    expected = len(unsure) + int(np.count_nonzero(score[:20] < THRESHOLD))
    assert esc["marked"] == esc["sent"] == expected, esc
    assert esc["on_time"] == expected and esc["malformed"] == 2 and esc["waiting"] == 0, esc
    # The cloud answered with its own model's labels, and the agent recorded them as final answers.
    stats = svc.stats()["escalation"]
    assert stats["answered"] == expected and not stats["refused"], stats
    import sqlite3

    db = sqlite3.connect(tmp_path / "cloud.db")
    finals = {}
    for (payload,) in db.execute("SELECT payload FROM records WHERE kind = 'p'"):
        pl = json.loads(payload)
        if pl.get("by") == "cloud":
            finals[pl["i"]] = pl["y"]
    first_pass = {k: v for k, v in finals.items() if int(k.split("-")[1]) < len(x)}
    assert first_pass == {f"in-{i}": int(cloud[i]) for i in unsure}
    assert esc["changed"] == int(np.count_nonzero(local[unsure] != cloud[unsure])) + \
        int(np.count_nonzero((local[:20] != cloud[:20]) & (score[:20] < THRESHOLD)))
    # Combined answers beat the device alone on this set (the point of escalating).
    combined = local.copy()
    combined[unsure] = cloud[unsure]
    assert np.mean(combined == y) > np.mean(local == y)
    reviews = [json.loads(p) for (p,) in db.execute("SELECT payload FROM review_queue")]
    # Each escalated prediction is in the review queue once: with both answers, unless the cloud had
    # already queued it as a low-confidence prediction (same item id).
    escalated = {f"in-{i}" for i in unsure} | {f"in-{len(x) + i}" for i in range(20) if score[i] < THRESHOLD}
    by_id = {r["prediction_id"]: r for r in reviews}
    assert escalated <= set(by_id)
    esc_reviews = [r for r in reviews if r["reason"] == "escalation"]
    assert len(esc_reviews) > expected // 2 and all(r["cloud"]["model"] for r in esc_reviews)


def test_the_budget_holds_under_a_burst_and_without_a_cloud_nothing_waits(models_dir: Path, broker_factory,
                                                                          tmp_path: Path) -> None:
    """A broker but no cloud service: escalations go out within the budget, none is answered, each
    expires after its deadline and the local answer stands; every input is answered at once."""
    pair = models_dir / "escalation"
    x = np.load(pair / "test_x.npy").astype(np.float32)
    _, score = top1(pair / "device.onnx", x)
    unsure = int(np.count_nonzero(score < THRESHOLD))
    assert unsure > 8
    broker = broker_factory()
    agent = Agent(pair, tmp_path, broker.url, {"score_below": THRESHOLD, "max_per_minute": 4, "deadline_s": 0.5})
    time.sleep(1.5)
    t0 = time.monotonic()
    agent.feed(x)
    wait_until(lambda: agent.lines() >= len(x), 60, "every local answer")
    answered_in = time.monotonic() - t0
    time.sleep(1.5)  # past the deadline
    report = agent.finish()
    esc = report["escalation"]["digits_small"]
    assert esc["marked"] == unsure and esc["sent"] <= 8 and esc["sent"] >= 1, esc  # burst: at most 2 x 4
    assert esc["over_budget"] == unsure - esc["sent"], esc
    assert esc["on_time"] == 0 and esc["expired"] == esc["sent"] and esc["waiting"] == 0, esc
    assert answered_in < 30
    pipe = report["pipelines"][0]
    assert pipe["inputs"] == pipe["predictions"] == len(x)


def test_with_the_link_down_escalations_are_not_sent_and_local_answers_stand(models_dir: Path,
                                                                           tmp_path: Path) -> None:
    from tests.conftest import free_port

    pair = models_dir / "escalation"
    x = np.load(pair / "test_x.npy").astype(np.float32)[:100]
    _, score = top1(pair / "device.onnx", x)
    agent = Agent(pair, tmp_path, f"mqtt://127.0.0.1:{free_port()}", {"score_below": THRESHOLD,
                                                                        "max_per_minute": 6000})
    agent.feed(x)
    wait_until(lambda: agent.lines() >= len(x), 60, "every local answer with no broker")
    report = agent.finish()
    esc = report["escalation"]["digits_small"]
    assert esc["marked"] == int(np.count_nonzero(score < THRESHOLD)) == esc["offline"] and esc["sent"] == 0, esc
    assert report["pipelines"][0]["predictions"] == len(x)
