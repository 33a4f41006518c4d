"""Rollouts to real agents (subprocesses) through a real Mosquitto and the real cloud service: a good
candidate goes shadow -> 10% -> 50% -> 100% on gates computed from the agents' own metrics; a degraded
candidate (its answers unrelated to the inputs) is stopped at the shadow gate and rolled back by
itself at level 5, the agents never serving it. At the human levels the same rollouts wait for a person:
level 2 asks before every step (with drift and label-accuracy gates fed by real digits and their true
labels arriving as delayed feedback), level 3 asks when a gate fails and a person rolls back."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cloud_sync.service import IngestService
from edge_runtime.adapters import ed25519
from edge_runtime.bundle import CreateOptions, create_bundle
from tests.test_sync_e2e import wait_until

pytestmark = pytest.mark.integration

MODEL = "digits_mlp"


def plan(level: int = 5, gates: str = "") -> str:
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
{gates}"""


def make_release(models_dir: Path, d: Path, profile, *, watched: bool) -> dict[str, Path]:
    """Versions 1 and 2 of the digits model and a degraded version 3 (answers unrelated to the input).
    ``watched`` bundles carry the reference profile and test-set accuracy (drift and label tracking)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    ed25519.write_keypair(ed25519.generate(), d / "k")
    extra = {"reference": str(models_dir / "digits_mlp.train_x.npy"),
             "test_data": str(models_dir / "digits_mlp.test_x.npy"),
             "test_labels": str(models_dir / "digits_mlp.test_y.npy")} if watched else {}
    out = {"pub": d / "k.pub"}
    out["v1"] = Path(create_bundle(models_dir / "digits_mlp.onnx", "1", d / "k", d / "v1",
                                   CreateOptions(name=MODEL, **extra), profile))
    out["v2"] = Path(create_bundle(models_dir / "digits_mlp.onnx", "2", d / "k", d / "v2.tar",
                                   CreateOptions(name=MODEL, archive=True, **extra), profile))
    w = np.random.default_rng(5).normal(size=(64, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["z"]), helper.make_node("Softmax", ["z"], ["probabilities"])],
        "degraded", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, d / "degraded.onnx")
    bad_extra = {k: v for k, v in extra.items() if k == "reference"}
    out["bad"] = Path(create_bundle(d / "degraded.onnx", "3", d / "k", d / "bad.tar",
                                    CreateOptions(name=MODEL, archive=True, **bad_extra), profile))
    return out


@pytest.fixture(scope="module")
def release(models_dir: Path, tmp_path_factory: pytest.TempPathFactory, profile) -> dict[str, Path]:
    return make_release(models_dir, tmp_path_factory.mktemp("fleet-release"), profile, watched=False)


@pytest.fixture(scope="module")
def watched_release(models_dir: Path, tmp_path_factory: pytest.TempPathFactory, profile) -> dict[str, Path]:
    return make_release(models_dir, tmp_path_factory.mktemp("fleet-watched"), profile, watched=True)


class Fleet:
    """``n`` agents on version 1. With ``digits`` (the model's test set and labels) each agent reads
    real digits on stdin, each with an id, and gets their true labels back 20 inputs later, as a
    labelling system would; else each generates synthetic inputs."""

    def __init__(self, n: int, release: dict[str, Path], broker, tmp: Path,
                 digits: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.svc = IngestService(broker.url, str(tmp / "cloud.db"), bundles_dir=tmp / "cloud-bundles")
        self.svc.start()
        self.ids = [f"dev-{i:02d}" for i in range(n)]
        self.reports = {d: tmp / f"{d}.json" for d in self.ids}
        self._stop = threading.Event()
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.cli", "run", "--model", str(release["v1"]), "--key",
             str(release["pub"]), "--source", "stdin" if digits is not None else f"synthetic:{40 + i}",
             "--broker", broker.url, "--device-id", d,
             "--buffer", str(tmp / f"{d}.db"), "--state-dir", str(tmp / f"state-{d}"), "--metrics-interval", "1",
             "--drift-summary-interval", "2", "--telemetry-interval", "1", "--status-interval", "0",
             "--report-json", str(self.reports[d])],
            stdin=subprocess.PIPE if digits is not None else None,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i, d in enumerate(self.ids)]
        self.feeders = [] if digits is None else [
            threading.Thread(target=self._feed, args=(proc, digits, i), daemon=True)
            for i, proc in enumerate(self.procs)]
        for t in self.feeders:
            t.start()
        hub = self.svc.hub
        wait_until(lambda: len([r for r in hub.devices() if r["state"] == "online" and r.get("p99_ms") is not None])
                   == n, 90, f"{n} agents online with metrics")

    def _feed(self, proc: subprocess.Popen, digits: tuple[np.ndarray, np.ndarray], k: int) -> None:
        """About 100 digits a second, cycling the test set; the labels of each 20 follow them."""
        x, y = digits
        rows = [json.dumps(r) for r in x.round(4).tolist()]
        n = 0
        try:
            while not self._stop.is_set():
                first = n
                lines = []
                for _ in range(20):
                    j = (n * 7 + k) % len(rows)
                    lines.append(f'{{"id": "{k}-{n}", "input": {rows[j]}}}')
                    n += 1
                lines.append(json.dumps({"feedback": [[f"{k}-{m}", int(y[(m * 7 + k) % len(rows)])]
                                                      for m in range(first, n)]}))
                proc.stdin.write("\n".join(lines) + "\n")
                proc.stdin.flush()
                time.sleep(0.2)
        except (BrokenPipeError, ValueError, OSError):
            return  # the agent stopped

    def wait_rollout(self, rid: str, cond, timeout: float, what: str, seen: str = "") -> None:
        """wait_until; on a timeout the message also has the rollout's state, gates, events and devices."""
        try:
            wait_until(cond, timeout, what)
        except AssertionError:
            d = self.svc.hub.rollouts_service.detail(rid)
            raise AssertionError(f"timed out waiting for {what}; {seen}; state {d.get('state')} {d.get('stage')}; "
                                 f"gates {d.get('gates')}; events {d.get('events')}; devices "
                                 f"{json.dumps(d.get('devices'))[:3000]}") from None

    def versions(self) -> dict[str, str]:
        out = {}
        for row in self.svc.hub.devices():
            models = row.get("models") or []
            out[row["id"]] = models[0]["version"] if models else "?"
        return out

    def stop(self) -> list[dict]:
        self._stop.set()
        for t in self.feeders:
            t.join(5)
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        reports = []
        for d, proc in zip(self.ids, self.procs, strict=True):
            _out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"{d}: {err[-3000:]}"
            reports.append(json.loads(self.reports[d].read_text()))
        return reports

    def close(self) -> None:
        self._stop.set()
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

        fleet.wait_rollout(rid, progressed, 150, "the rollout of version 2 to finish", f"stages {stages}")
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


def test_at_the_human_levels_rollouts_wait_for_a_person(watched_release, models_dir: Path, broker_factory,
                                                       tmp_path: Path) -> None:
    """Level 2: each step waits for approval, then the drift and accuracy gates pass on the agents'
    real figures (true labels as feedback). Level 3: the degraded candidate fails its shadow gate and
    waits; nothing reaches the agents until a person rolls it back."""
    digits = (np.load(models_dir / "digits_mlp.test_x.npy"), np.load(models_dir / "digits_mlp.test_y.npy"))
    release = watched_release
    fleet = Fleet(4, release, broker_factory(), tmp_path, digits=digits)
    try:
        svc = fleet.svc.hub.rollouts_service
        gates = "drift_not_worse = true\ndrift_margin = 0.5\naccuracy_not_worse = true\naccuracy_margin = 0.05\n" \
                "accuracy_min_labels = 40\n"
        rid = svc.start(plan(2, gates), release["v2"], by="release-bot")["id"]
        approved: list[str] = []

        def approve_each_step() -> bool:
            r = svc.get(rid)
            if r.state == "waiting_approval":
                pending = r.pending_approval
                assert pending is not None and pending["why"] != "gate_failed", pending
                # Nothing moves on by itself: the devices stay where the last approval put them.
                approved.append(pending["to_stage"])
                svc.approve(rid, by="alice")
            return r.state == "done"

        fleet.wait_rollout(rid, approve_each_step, 180, "the level-2 rollout of version 2 to finish with approvals",
                           f"approved {approved}")
        assert approved[:3] == ["step-0", "step-1", "step-2"], approved
        events = svc.detail(rid)["events"]
        advances = [e for e in events if e["what"] == "advance"]
        assert advances == [] or all(e["actor"] != "planner" for e in advances), advances
        assert [e["actor"] for e in events if e["what"] == "approve"] == ["alice"] * len(approved)
        final = {g["name"]: g for g in svc.detail(rid)["gates"]}
        assert {"drift", "accuracy"} <= set(final), final
        assert final["accuracy"]["status"] == "pass" and final["accuracy"]["value"] > 0.8, final["accuracy"]
        assert final["drift"]["status"] == "pass" and final["drift"]["value"] is not None, final["drift"]
        wait_until(lambda: set(fleet.versions().values()) == {"2"}, 30, "every agent on version 2")

        bad = svc.start(plan(3), release["bad"], by="release-bot")["id"]
        wait_until(lambda: svc.get(bad).state == "waiting_approval", 150, "the failed gate to wait for a person")
        pending = svc.get(bad).pending_approval
        assert pending is not None and pending["why"] == "gate_failed", pending
        failed = [g["name"] for g in pending["gate_results"] if g["status"] == "fail"]
        assert failed == ["shadow_agreement"], pending["gate_results"]
        time.sleep(3)  # a person is slow; the rollout must still be waiting, the agents untouched
        assert svc.get(bad).state == "waiting_approval"
        assert set(fleet.versions().values()) == {"2"}
        svc.rollback(bad, by="alice", reason="the candidate disagrees with version 2 in shadow")
        wait_until(lambda: svc.get(bad).state == "rolled_back", 60, "the person's rollback to finish")
        wait_until(lambda: set(fleet.versions().values()) == {"2"}, 30, "every agent still on version 2")
        reports = fleet.stop()
        for r in reports:
            pipe = r["pipelines"][0]
            assert pipe["errors"]["total"] == 0 and pipe["inputs"] == pipe["predictions"], pipe["errors"]
            assert r["feedback"]["resolved"] > 100, r["feedback"]
    finally:
        fleet.close()
