"""The device side of rollouts on real bundles, sessions and files: orders in, the model changed safely
(verified, anti-rollback, shadow, promote, rollback, self-rollback, resume after a restart)."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.adapters import ed25519
from edge_runtime.adapters.onnx_engine import OnnxEngine
from edge_runtime.bundle import CreateOptions, create_bundle, load_public_keys
from edge_runtime.core import protocol as p
from edge_runtime.core.rollout import SelfCheck
from edge_runtime.deploy import Deployer, local_fetch
from edge_runtime.pipeline import Pipeline
from edge_runtime.sources import EndOfSource

pytestmark = pytest.mark.integration


class Stream:
    """Inputs at a steady pace until stopped (a live source)."""

    name = "stream"

    def __init__(self, rows: np.ndarray, hz: float = 2000.0) -> None:
        self.rows, self.i, self.period, self.stopped = rows, 0, 1.0 / hz, False

    def read(self, timeout: float | None = None):
        if self.stopped:
            raise EndOfSource
        time.sleep(self.period)
        self.i += 1
        return self.rows[self.i % len(self.rows)]

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def bundles(models_dir: Path, tmp_path_factory: pytest.TempPathFactory, profile) -> dict[str, object]:
    d = tmp_path_factory.mktemp("deploy")
    ed25519.write_keypair(ed25519.generate(), d / "k")
    ed25519.write_keypair(ed25519.generate(), d / "other")
    shelf = d / "shelf"
    shelf.mkdir()
    out: dict[str, object] = {"keys": load_public_keys([d / "k.pub"]), "shelf": shelf}
    watched = {"reference": str(models_dir / "digits_mlp.train_x.npy"),
               "test_data": str(models_dir / "digits_mlp.test_x.npy"),
               "test_labels": str(models_dir / "digits_mlp.test_y.npy")}
    for version, key in (("2", "k"), ("3", "k"), ("4", "other"), ("5", "k")):
        tar = create_bundle(models_dir / "digits_mlp.onnx", version, d / key, d / f"b{version}.tar",
                            CreateOptions(archive=True, name="digits_mlp", **(watched if version == "5" else {})),
                            profile)
        bid = f"digits_mlp-{version}"
        shutil.copy(tar, shelf / f"{bid}.tar")
        out[version] = {"bundle_id": bid, "name": "digits_mlp", "version": version,
                        "sha256": hashlib.sha256(Path(tar).read_bytes()).hexdigest(), "size": Path(tar).stat().st_size}
    return out


def order(bundle: dict, role: str, rollout: str = "ro-1", seq: int = 1) -> p.Command:
    return p.Command("dev-1", "rollout", f"{rollout}.{seq}", 1, {
        "rollout_id": rollout, "model": "digits_mlp", "role": role, "bundle": bundle, "previous_version": "1",
        "level": 5})


class Running:
    """A pipeline stepping on its own thread, with a deployer; events collected."""

    def __init__(self, models_dir: Path, profile, state_dir: Path, bundles: dict, **kw) -> None:
        rows = np.load(models_dir / "digits_mlp.test_x.npy")
        self.source = Stream(rows)
        self.pipe = Pipeline("digits_mlp", OnnxEngine(models_dir / "digits_mlp.onnx", profile), self.source,
                             version="1")
        self.events: list[dict] = []
        self.dep = Deployer(self.pipe, state_dir=state_dir, keys=bundles["keys"], profile=profile,
                            fetch=local_fetch(bundles["shelf"]), report=lambda kind, pl: self.events.append(pl),
                            **kw)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        self.dep.start()

    def _loop(self) -> None:
        while self.pipe.step():
            pass

    def wait(self, cond, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; state {self.dep.state()}; "
                                     f"events {[e['name'] for e in self.events]}")
            time.sleep(0.02)

    def close(self) -> None:
        self.dep.stop()
        self.source.stopped = True
        self.thread.join(10)


def names(events: list[dict]) -> list[str]:
    return [e["name"] for e in events]


def test_candidate_is_verified_swapped_in_rolled_back_and_an_older_one_refused(models_dir, profile, bundles,
                                                                              tmp_path) -> None:
    r = Running(models_dir, profile, tmp_path / "state", bundles)
    try:
        r.dep.on_command(order(bundles["3"], "candidate"))
        r.wait(lambda: r.pipe.version == "3" and "rollout_active" in names(r.events), "activation of 3")
        assert names(r.events) == ["rollout_downloading", "rollout_verifying", "rollout_active"]
        assert r.dep.role == "candidate"
        before = r.pipe.metrics.predictions
        r.wait(lambda: r.pipe.metrics.predictions > before + 50, "serving on 3")
        st = json.loads((tmp_path / "state" / "rollout-digits_mlp.json").read_text())
        assert st["machine"]["state"] == "active" and st["machine"]["highest_run"] == {"digits_mlp": "3"}
        r.dep.on_command(order(bundles["3"], "baseline", seq=2))
        r.wait(lambda: r.pipe.version == "1", "rollback to 1")
        assert r.dep.machine.state == "rolled_back" and r.dep.role == "baseline"
        # Anti-rollback: 2 is older than 3, which this device has run.
        r.dep.on_command(order(bundles["2"], "candidate", rollout="ro-2"))
        r.wait(lambda: "rollout_refused" in names(r.events), "the refusal of 2")
        refusal = next(e for e in r.events if e["name"] == "rollout_refused")
        assert "not newer than 3" in refusal["message"] and r.pipe.version == "1"
        assert r.pipe.metrics.error_total == 0
    finally:
        r.close()


def test_a_bundle_signed_with_an_unknown_key_fails_and_the_model_keeps_serving(models_dir, profile, bundles,
                                                                              tmp_path) -> None:
    r = Running(models_dir, profile, tmp_path / "state", bundles)
    try:
        r.dep.on_command(order(bundles["4"], "candidate"))
        r.wait(lambda: "rollout_failed" in names(r.events), "the verification failure")
        failed = next(e for e in r.events if e["name"] == "rollout_failed")
        r.wait(lambda: r.dep.role == "failed", "the failed role")
        assert "unknown_key" in failed["detail"]["reason"] and r.pipe.version == "1" and r.dep.role == "failed"
        assert not (tmp_path / "state" / "bundles" / "digits_mlp-4").exists()
        n = r.pipe.metrics.predictions
        r.wait(lambda: r.pipe.metrics.predictions > n + 20, "still serving")
    finally:
        r.close()


def test_shadow_then_promote_without_a_second_download_and_resume_after_a_restart(models_dir, profile, bundles,
                                                                                  tmp_path) -> None:
    r = Running(models_dir, profile, tmp_path / "state", bundles)
    try:
        r.dep.on_command(order(bundles["3"], "shadow"))
        r.wait(lambda: r.dep.role == "shadow" and (r.dep.state()["shadow"] or {}).get("n", 0) > 20, "shadow runs")
        assert r.pipe.version == "1" and r.dep.state()["shadow"]["agreement_rate"] == 1.0
        r.dep.on_command(order(bundles["3"], "candidate", seq=2))
        r.wait(lambda: r.pipe.version == "3", "promotion")
        assert names(r.events).count("rollout_downloading") == 1 and r.pipe._shadow is None
    finally:
        r.close()
    # A restart: a new process starts on the configured model (1); the deployer brings 3 back.
    r2 = Running(models_dir, profile, tmp_path / "state", bundles)
    try:
        r2.wait(lambda: r2.pipe.version == "3", "resume on 3")
        assert r2.dep.machine.state == "active" and r2.dep.role == "candidate"
    finally:
        r2.close()


def test_the_device_rolls_itself_back_when_the_new_model_breaks_its_latency_limit(models_dir, profile, bundles,
                                                                                 tmp_path) -> None:
    r = Running(models_dir, profile, tmp_path / "state", bundles,
                self_check=SelfCheck(max_error_rate=0.5, max_p99_ms=0.000001, min_samples=30))
    try:
        r.dep.on_command(order(bundles["3"], "candidate"))
        r.wait(lambda: r.dep.role == "failed" and r.pipe.version == "1", "the self-rollback", timeout=40)
        rb = next(e for e in r.events if e["name"] == "rollout_rolled_back")
        assert "latency_p99" in rb["detail"]["reason"]
    finally:
        r.close()


def test_malformed_and_foreign_orders_are_refused_or_ignored(models_dir, profile, bundles, tmp_path) -> None:
    r = Running(models_dir, profile, tmp_path / "state", bundles)
    try:
        bad = p.Command("dev-1", "rollout", "x.1", 1, {"rollout_id": "x", "model": "digits_mlp", "role": "boss",
                                                      "bundle": bundles["3"]})
        r.dep.on_command(bad)
        other = p.Command("dev-1", "rollout", "y.1", 1, {**order(bundles["3"], "candidate").params, "model": "cnn"})
        r.dep.on_command(other)
        time.sleep(0.5)
        assert names(r.events) == ["rollout_order_refused"] and r.dep.machine.state == "idle"
        assert r.pipe.version == "1"
    finally:
        r.close()


def test_a_baseline_order_of_a_later_rollout_keeps_what_an_earlier_one_activated(models_dir, profile, bundles,
                                                                                  tmp_path) -> None:
    r = Running(models_dir, profile, tmp_path / "state", bundles)
    try:
        r.dep.on_command(order(bundles["2"], "candidate", rollout="ro-1"))
        r.wait(lambda: r.pipe.version == "2", "rollout 1 done on this device")
        later = order(bundles["3"], "baseline", rollout="ro-2")
        later.params["previous_version"] = "2"
        r.dep.on_command(later)
        time.sleep(0.5)
        assert r.pipe.version == "2" and r.dep.role == "baseline" and r.dep.machine.state == "active"
        assert "rollout_rolled_back" not in names(r.events)
    finally:
        r.close()


@pytest.mark.parametrize(("level", "review", "expected"), [
    (1, None, ["shadow", "shadow"]), (2, None, ["suggestion", "suggestion"]), (3, None, ["final", "final"]),
    (4, {"below_score": 0.9, "classes": [7]}, ["pending_review", "final"]), (5, None, ["final", "final"])])
def test_outputs_of_a_rolled_out_model_carry_the_automation_levels_status(models_dir, profile, bundles, tmp_path,
                                                                          level, review, expected) -> None:
    r = Running(models_dir, profile, tmp_path / "state", bundles)
    try:
        assert r.dep.output_status(3, 0.5) == "final"  # the configured model: nothing rolled out
        o = order(bundles["3"], "candidate")
        o.params["level"] = level
        if review is not None:
            o.params["review"] = review
        r.dep.on_command(o)
        r.wait(lambda: r.pipe.version == "3", "activation")
        assert [r.dep.output_status(3, 0.5), r.dep.output_status(3, 0.95)] == expected
        if level == 4:
            assert r.dep.output_status(7, 0.99) == "pending_review"  # a listed class
    finally:
        r.close()


def test_an_order_with_a_bad_level_or_review_rule_is_refused(models_dir, profile, bundles, tmp_path) -> None:
    r = Running(models_dir, profile, tmp_path / "state", bundles)
    try:
        for params in ({"level": 9}, {"review": "low"}, {"review": {"below_score": "x"}}):
            o = order(bundles["3"], "candidate")
            o.params.update(params)
            r.dep.on_command(o)
        time.sleep(0.3)
        assert names(r.events) == ["rollout_order_refused"] * 3 and r.pipe.version == "1"
    finally:
        r.close()


def test_a_promoted_version_gets_its_own_drift_monitor_and_label_tracker(models_dir, profile, bundles,
                                                                        tmp_path) -> None:
    """Drift summaries and label accuracy count for the version that answered: the old monitor's last
    windows go out under the old version, the new one starts afresh from its bundle's reference."""
    from edge_runtime.bundle import reference_profile
    from edge_runtime.cli import _label_tracker, _version_monitors
    from edge_runtime.core.drift import DriftMonitor, load_reference

    r = Running(models_dir, profile, tmp_path / "state", bundles, monitors=_version_monitors("digits_mlp"))
    try:
        summaries: list[tuple[str, int]] = []
        r.pipe.summary_interval_s = 0.2
        r.pipe.on_summary = lambda s, _a, _b, _c, version: summaries.append((version, s.windows))
        x = np.load(models_dir / "digits_mlp.train_x.npy")
        first = DriftMonitor(load_reference(reference_profile(x, r.pipe.engine.spec.inputs[0].name)))
        old_tracker = _label_tracker({"test": {"accuracy": 0.97, "n": 450}})
        assert r.pipe.swap(r.pipe.engine, "1", drift=first, concept=old_tracker)  # version 1, now monitored
        r.pipe.feedback(1, 1)
        r.wait(lambda: any(v == "1" for v, _ in summaries), "a drift summary of version 1")
        r.dep.on_command(order(bundles["5"], "shadow"))
        r.wait(lambda: r.dep.role == "shadow", "shadow")
        r.dep.on_command(order(bundles["5"], "candidate", seq=2))
        r.wait(lambda: r.pipe.version == "5", "promotion")
        assert r.pipe.concept is not old_tracker and r.pipe.concept.labels == 0 and old_tracker.labels == 1
        assert r.pipe.drift is not None and r.pipe.drift.reference.n_features == 64
        assert r.pipe.drift is not first
        r.wait(lambda: any(v == "5" for v, _ in summaries), "a drift summary of version 5")
        versions = [v for v, _ in summaries]
        assert versions == sorted(versions) and set(versions) == {"1", "5"}, versions  # never 1 after 5
    finally:
        r.close()
