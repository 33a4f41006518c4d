"""A rollout to a real agent (a subprocess) through a real Mosquitto: the bundle delivered in chunks,
verified, swapped in without stopping the stream, reported to the cloud store; the agent killed with
SIGKILL in the middle of a download resumes it; after a restart it comes back on the rolled-out
version."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_sync.distribute import PublishWindow, publish_bundle
from cloud_sync.service import IngestService
from edge_runtime.adapters import ed25519
from edge_runtime.adapters.mqtt_transport import BrokerConfig, MqttTransport
from edge_runtime.bundle import CreateOptions, create_bundle
from edge_runtime.core import protocol as p
from tests.test_sync_e2e import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def release(models_dir: Path, tmp_path_factory: pytest.TempPathFactory, profile) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("release")
    ed25519.write_keypair(ed25519.generate(), d / "k")
    v1 = create_bundle(models_dir / "digits_mlp.onnx", "1", d / "k", d / "v1", CreateOptions(name="digits_mlp"),
                       profile)
    v2 = create_bundle(models_dir / "digits_mlp.onnx", "2", d / "k", d / "v2.tar",
                       CreateOptions(name="digits_mlp", archive=True), profile)
    # A 4 MB version: the same MLP carrying an unused initializer, so that a download takes a while.
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(models_dir / "digits_mlp.onnx")
    model.graph.initializer.append(numpy_helper.from_array(
        np.random.default_rng(0).normal(size=1_000_000).astype(np.float32), "padding"))
    onnx.save(model, d / "big.onnx")
    big = create_bundle(d / "big.onnx", "2", d / "k", d / "big.tar", CreateOptions(name="digits_mlp", archive=True),
                        profile)
    return {"v1": Path(v1), "v2": Path(v2), "big": Path(big), "pub": d / "k.pub"}


class Cloud:
    def __init__(self, broker, db: Path) -> None:
        self.svc = IngestService(broker.url, str(db))
        self.svc.start()
        self.window = PublishWindow(16)
        self.tx = MqttTransport(BrokerConfig.from_url(broker.url, "releaser"), on_publish_result=self.window.on_result)
        self.tx.start()
        wait_until(lambda: self.tx.connected, 10, "the releaser to connect")

    def release(self, tar: Path, device: str, role: str = "candidate", **kw) -> p.BundleManifest:
        m = publish_bundle(self.tx, tar, window=self.window, **kw)
        cmd = p.Command(device, "rollout", f"ro-1.{role}", int(time.time() * 1000), {
            "rollout_id": "ro-1", "model": "digits_mlp", "role": role, "previous_version": "1", "level": 5,
            "bundle": {"bundle_id": m.bundle_id, "name": m.name, "version": m.version, "sha256": m.sha256,
                       "size": m.size}})
        self.tx.publish(cmd.topic, cmd.to_wire(), qos=1, retain=True)
        return m

    def records(self, device: str, kind: str) -> list[dict]:
        return [r[5] for r in self.svc.store.records(device) if r[3] == kind]

    def close(self) -> None:
        self.tx.stop()
        self.svc.stop()


def agent(release: dict[str, Path], broker, tmp_path: Path, report: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "run", "--model", str(release["v1"]),
                             "--key", str(release["pub"]), "--source", "synthetic:200", "--broker", broker.url,
                             "--device-id", "dev-1", "--buffer", str(tmp_path / "outbox.db"), "--state-dir",
                             str(tmp_path / "state"), "--metrics-interval", "1", "--status-interval", "0",
                             "--tag", "site:lab", "--tag", "hw:x86",
                             "--report-json", str(report)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-5000:]
    return err


def test_rollout_to_a_running_agent_and_back_after_a_restart(release, broker_factory, tmp_path: Path) -> None:
    broker = broker_factory()
    cloud = Cloud(broker, tmp_path / "cloud.db")
    report = tmp_path / "r.json"
    a = agent(release, broker, tmp_path, report)
    try:
        wait_until(lambda: any(m.get("model_version") == "1" for m in cloud.records("dev-1", "m")), 30,
                   "metrics from version 1")
        cloud.release(release["v2"], "dev-1")
        wait_until(lambda: "rollout_active" in [e.get("name") for e in cloud.records("dev-1", "e")], 60,
                   "the agent to activate version 2")
        wait_until(lambda: any(m.get("model_version") == "2" and m["rollout"]["role"] == "candidate"
                               for m in cloud.records("dev-1", "m")), 30, "metrics from version 2")
        names = [e["name"] for e in cloud.records("dev-1", "e") if e["name"].startswith("rollout_")]
        assert names == ["rollout_downloading", "rollout_verifying", "rollout_active"]
        status = cloud.svc.store.devices()["dev-1"]["status"]
        assert status["models"] == [{"name": "digits_mlp", "version": "2", "state": "active"}]
        assert status["tags"] == ["hw:x86", "site:lab"]
        stop(a)
        r = json.loads(report.read_text())["pipelines"][0]
        assert r["swaps"] == 1 and r["errors"]["total"] == 0 and r["inputs"] == r["predictions"]
        # Restarted with the same configuration (version 1): it comes back on version 2.
        first_boot = {r[1] for r in cloud.svc.store.records("dev-1")}
        a = agent(release, broker, tmp_path, report)
        wait_until(lambda: [r for r in cloud.svc.store.records("dev-1") if r[1] not in first_boot and r[3] == "m"],
                   40, "metrics after the restart")
        later = [r[5] for r in cloud.svc.store.records("dev-1") if r[1] not in first_boot and r[3] == "m"]
        assert later[-1]["model_version"] == "2" and later[-1]["rollout"]["state"] == "active"
        stop(a)
        assert json.loads(report.read_text())["pipelines"][0]["errors"]["total"] == 0
    finally:
        a.kill()
        cloud.close()


def test_an_agent_killed_mid_download_resumes_and_an_older_version_is_refused(release, broker_factory,
                                                                              tmp_path: Path) -> None:
    broker = broker_factory()
    cloud = Cloud(broker, tmp_path / "cloud.db")
    report = tmp_path / "r.json"
    a = agent(release, broker, tmp_path, report)
    try:
        wait_until(lambda: cloud.records("dev-1", "m"), 30, "the agent's first metrics")
        # Small chunks so that the download takes a while; the agent is killed once a part is on disk.
        m = cloud.release(release["big"], "dev-1", chunk_size=4096)
        progress = tmp_path / "state" / "bundles" / "downloads" / f"{m.bundle_id}.progress.json"
        wait_until(progress.exists, 30, "a partial download on disk")
        a.kill()
        a.wait(10)
        a = agent(release, broker, tmp_path, report)
        wait_until(lambda: "rollout_active" in [e.get("name") for e in cloud.records("dev-1", "e")], 60,
                   "the resumed download to be activated")
        tar_sha = hashlib.sha256(release["big"].read_bytes()).hexdigest()
        assert m.sha256 == tar_sha
        # Version 1 again under a new rollout id: older than 2, which this device has run.
        cmd = p.Command("dev-1", "rollout", "ro-2.candidate", int(time.time() * 1000), {
            "rollout_id": "ro-2", "model": "digits_mlp", "role": "candidate", "previous_version": "2",
            "bundle": {"bundle_id": "digits_mlp-1-000000000000", "name": "digits_mlp", "version": "1",
                       "sha256": "0" * 64, "size": 10}})
        cloud.tx.publish(cmd.topic, cmd.to_wire(), qos=1, retain=True)
        wait_until(lambda: "rollout_refused" in [e.get("name") for e in cloud.records("dev-1", "e")], 30,
                   "the refusal of version 1")
        err = stop(a)
        assert f"bundle {m.bundle_id}: resuming with" in err  # from the chunks already on disk
        assert json.loads(report.read_text())["pipelines"][0]["errors"]["total"] == 0
    finally:
        a.kill()
        cloud.close()
