"""Rollouts to real agents (subprocesses) through a real Mosquitto and the real cloud service: a good
candidate goes shadow -> 10% -> 50% -> 100% on gates computed from the agents' own metrics; a degraded
candidate (its answers unrelated to the inputs) is stopped at the shadow gate and rolled back by
itself at level 5, the agents never serving it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cloud_sync.service import IngestService
from edge_runtime.adapters import ed25519
from edge_runtime.bundle import CreateOptions, create_bundle
from tests.test_sync_e2e import wait_until

pytestmark = pytest.mark.integration

MODEL = "digits_mlp"


def plan(level: int = 5) -> str:
    return f"""name = "digits-rollout"
model = "{MODEL}"
automation_level = {level}

[defaults]
min_samples = 60
min_time_s = 1

[shadow]
percent = 40

[[step]]
percent = 10

[[step]]
percent = 50

[[step]]
percent = 100

[gates]
shadow_agreement_min = 0.9
p99_latency_ms_max = 250.0
error_rate_max = 0.05
"""


@pytest.fixture(scope="module")
def release(models_dir: Path, tmp_path_factory: pytest.TempPathFactory, profile) -> dict[str, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d = tmp_path_factory.mktemp("fleet-release")
    ed25519.write_keypair(ed25519.generate(), d / "k")
    out = {"pub": d / "k.pub"}
    out["v1"] = Path(create_bundle(models_dir / "digits_mlp.onnx", "1", d / "k", d / "v1",
                                   CreateOptions(name=MODEL), profile))
    out["v2"] = Path(create_bundle(models_dir / "digits_mlp.onnx", "2", d / "k", d / "v2.tar",
                                   CreateOptions(name=MODEL, archive=True), profile))
    w = np.random.default_rng(5).normal(size=(64, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["z"]), helper.make_node("Softmax", ["z"], ["probabilities"])],
        "degraded", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, d / "degraded.onnx")
    out["bad"] = Path(create_bundle(d / "degraded.onnx", "3", d / "k", d / "bad.tar",
                                    CreateOptions(name=MODEL, archive=True), profile))
    return out


class Fleet:
    def __init__(self, n: int, release: dict[str, Path], broker, tmp: Path) -> None:
        self.svc = IngestService(broker.url, str(tmp / "cloud.db"), bundles_dir=tmp / "cloud-bundles")
        self.svc.start()
        self.ids = [f"dev-{i:02d}" for i in range(n)]
        self.reports = {d: tmp / f"{d}.json" for d in self.ids}
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.cli", "run", "--model", str(release["v1"]), "--key",
             str(release["pub"]), "--source", f"synthetic:{40 + i}", "--broker", broker.url, "--device-id", d,
             "--buffer", str(tmp / f"{d}.db"), "--state-dir", str(tmp / f"state-{d}"), "--metrics-interval", "1",
             "--telemetry-interval", "1", "--status-interval", "0", "--report-json", str(self.reports[d])],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i, d in enumerate(self.ids)]
        hub = self.svc.hub
        wait_until(lambda: len([r for r in hub.devices() if r["state"] == "online" and r.get("p99_ms") is not None])
                   == n, 90, f"{n} agents online with metrics")

    def versions(self) -> dict[str, str]:
        out = {}
        for row in self.svc.hub.devices():
            models = row.get("models") or []
            out[row["id"]] = models[0]["version"] if models else "?"
        return out

    def stop(self) -> list[dict]:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        reports = []
        for d, proc in zip(self.ids, self.procs, strict=True):
            _out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"{d}: {err[-3000:]}"
            reports.append(json.loads(self.reports[d].read_text()))
        return reports

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        self.svc.stop()


def test_a_good_candidate_reaches_every_agent_and_a_degraded_one_is_rolled_back(release, broker_factory,
                                                                                tmp_path: Path) -> None:
    fleet = Fleet(10, release, broker_factory(), tmp_path)
    try:
        svc = fleet.svc.hub.rollouts_service
        rid = svc.start(plan(5), release["v2"], by="release-bot")["id"]
        stages: list[str] = []

        def progressed() -> bool:
            r = svc.get(rid)
            if not stages or stages[-1] != r.stage:
                stages.append(r.stage)
            return r.state == "done"

        try:
            wait_until(progressed, 150, "the rollout of version 2 to finish")
        except AssertionError:
            d = svc.detail(rid)
            raise AssertionError(f"stages {stages}; state {d.get('state')} {d.get('stage')}; gates {d.get('gates')}; "
                                 f"evaluation {d.get('evaluation') or d.get('last_evaluation')}; devices "
                                 f"{json.dumps(d.get('devices'))[:3000]}") from None
        assert stages[0] == "shadow" and stages[-1] == "done" and "step-1" in stages
        wait_until(lambda: set(fleet.versions().values()) == {"2"}, 30, "every agent on version 2")
        detail = svc.detail(rid)
        gates = {g["name"]: g for g in detail["gates"]}
        assert all(g["status"] == "pass" for g in gates.values()), gates

        # A degraded version 3: the shadow cohort sees it disagree; level 5 rolls it back by itself.
        bad = svc.start(plan(5), release["bad"], by="release-bot")["id"]
        wait_until(lambda: svc.get(bad).state == "rolled_back", 150, "the degraded rollout to be rolled back")
        bad_detail = svc.detail(bad)
        whats = [e["what"] for e in bad_detail["events"]]
        assert bad_detail["stage"] in ("shadow", "rolled_back") and "advance" not in whats, whats
        failed = [g for g in bad_detail["gates"] if g["status"] == "fail"]
        assert [g["name"] for g in failed] == ["shadow_agreement"] and failed[0]["value"] < 0.5, bad_detail["gates"]
        wait_until(lambda: set(fleet.versions().values()) == {"2"}, 30, "every agent still on version 2")
        reports = fleet.stop()
        for r in reports:
            pipe = r["pipelines"][0]
            assert pipe["errors"]["total"] == 0 and pipe["inputs"] == pipe["predictions"], pipe["errors"]
    finally:
        fleet.close()
