"""Samples for human review: what the device keeps (low confidence, after a drift alarm, within an hourly
cap), how an input travels when allowed, and the review queue in the cloud that receives them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cloud_sync.service import IngestService
from edge_runtime.adapters import ed25519
from edge_runtime.bundle import CreateOptions, create_bundle
from edge_runtime.core.samples import SamplePolicy, SampleSelector, decode_input, encode_input


def test_selector_keeps_low_confidence_and_post_drift_inputs_within_the_hourly_cap() -> None:
    sel = SampleSelector(SamplePolicy(per_hour=3, after_drift=2), low_confidence=0.5)
    assert [sel.reason(s, 10.0) for s in (0.9, 0.4, float("nan"), None)] == [None, "low_confidence",
                                                                            "low_confidence", None]
    sel.drift_opened()
    assert [sel.reason(0.99, 20.0), sel.reason(0.99, 21.0)] == ["drift", None]  # quota of 3 spent
    assert sel.capped == 1 and sel.kept == {"low_confidence": 2, "drift": 1}
    assert sel.reason(0.1, 3600.0) == "low_confidence"  # a new hour
    only_drift = SampleSelector(SamplePolicy(when=("drift",)), 0.5)
    assert only_drift.reason(0.1, 0.0) is None
    with pytest.raises(ValueError, match="reasons"):
        SamplePolicy(when=("sometimes",))
    with pytest.raises(ValueError, match="inputs"):
        SamplePolicy(inputs="jpeg")


def test_inputs_are_encoded_exactly_or_halved_to_fit() -> None:
    row = np.arange(64, dtype=np.float32)
    enc = encode_input(row, 1024)
    assert enc is not None and "step" not in enc
    np.testing.assert_array_equal(decode_input(json.loads(json.dumps(enc))), row)
    frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    enc = encode_input(frame, 64 * 1024)
    assert enc is not None and enc["step"] == 8 and enc["shape"] == [60, 80, 3]
    assert len(enc["b64"]) <= 64 * 1024
    np.testing.assert_array_equal(decode_input(enc), frame[::8, ::8])
    assert encode_input(np.zeros(100_000, np.float32), 1024) is None  # 1-D: cannot be downscaled
    assert encode_input(np.array(["a", "b"]), 1024) is None
    with pytest.raises(ValueError, match="do not hold"):
        decode_input({**encode_input(row, 1024), "shape": [65]})
    with pytest.raises(ValueError, match="malformed"):
        decode_input({"dtype": "<f4", "shape": [1], "b64": "***"})


@pytest.mark.integration
def test_drifted_inputs_reach_the_review_queue_with_their_input(models_dir: Path, broker_factory,
                                                               tmp_path: Path, profile) -> None:
    ed25519.write_keypair(ed25519.generate(), tmp_path / "k")
    bundle = create_bundle(models_dir / "digits_mlp.onnx", "2", tmp_path / "k", tmp_path / "b",
                           CreateOptions(reference=str(models_dir / "digits_mlp.train_x.npy")), profile)
    dimmed = tmp_path / "dim.npy"
    x = (np.load(models_dir / "digits_mlp.test_x.npy") * 0.6).astype(np.float32)
    np.save(dimmed, x)
    broker = broker_factory()
    svc = IngestService(broker.url, str(tmp_path / "cloud.db"), review_below=None)
    svc.start()
    report = tmp_path / "r.json"
    try:
        subprocess.run([sys.executable, "-m", "edge_runtime.cli", "run", "--model", str(bundle), "--key",
                        str(tmp_path / "k.pub"), "--source", f"npy:{dimmed}", "--loop", "--max-inputs", "1500",
                        "--broker", broker.url, "--device-id", "dev-r", "--buffer", str(tmp_path / "o.db"),
                        "--review-samples", "drift", "--review-inputs", "raw", "--review-per-hour", "15",
                        "--report-json", str(report), "--drain-timeout", "15"],
                       check=True, capture_output=True, timeout=120)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(svc.hub.review_items(limit=100)) < 15:
            time.sleep(0.1)
        items = svc.hub.review_items(limit=100)
    finally:
        svc.stop()
    r = json.loads(report.read_text())
    assert r["pipelines"][0]["drift"]["alarmed"]
    assert r["review_samples"]["digits_mlp"] == {"kept": {"low_confidence": 0, "drift": 15}, "over_hourly_cap": 5}
    assert len(items) == 15 and {i["payload"]["reason"] for i in items} == {"drift"}
    # The inputs are the ones the model saw, bit for bit: the first after the alarm's window.
    first = decode_input(items[0]["payload"]["input"])
    assert first.shape == (64,) and any(np.array_equal(first, row) for row in x)
