"""Drift monitoring in the running agent: a bundle's reference profile, real inputs, the run report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.adapters import ed25519
from edge_runtime.bundle import CreateOptions, create_bundle
from tests.conftest import cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bundle(models_dir: Path, tmp_path_factory: pytest.TempPathFactory, profile) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("drift")
    ed25519.write_keypair(ed25519.generate(), d / "k")
    b = create_bundle(models_dir / "digits_mlp.onnx", "1", d / "k", d / "b",
                      CreateOptions(reference=str(models_dir / "digits_mlp.train_x.npy")), profile)
    return b, d / "k.pub"


def run_drift(bundle: tuple[Path, Path], data: np.ndarray, tmp_path: Path, n: int) -> dict:
    f = tmp_path / "x.npy"
    np.save(f, data.astype(np.float32))
    out = cli("run", "--model", str(bundle[0]), "--key", str(bundle[1]), "--source", f"npy:{f}", "--loop",
              "--max-inputs", str(n), "--json").stdout
    return json.loads(out)["pipelines"][0]["drift"]


def test_dimmed_digits_raise_one_data_drift_alarm(bundle, models_dir: Path, tmp_path: Path) -> None:
    dimmed = np.load(models_dir / "digits_mlp.test_x.npy") * 0.6
    d = run_drift(bundle, dimmed, tmp_path, 2000)
    assert d["samples"] == 2000 and d["alarmed"]
    (alarm,) = d["alarms"]  # one alarm with a start, not one per window
    assert alarm["kind"] == "data" and alarm["start"] == 0 and alarm["detected"] <= 1000


def test_shuffled_passes_of_the_reference_raise_none(bundle, models_dir: Path, tmp_path: Path) -> None:
    train = np.load(models_dir / "digits_mlp.train_x.npy")
    rng = np.random.default_rng(3)
    passes = np.concatenate([train[rng.permutation(len(train))] for _ in range(4)])
    d = run_drift(bundle, passes, tmp_path, len(passes))
    assert d["samples"] == len(passes) and not d["alarmed"] and d["alarms"] == []


def test_no_drift_flag_and_plain_models_without_reference(bundle, models_dir: Path) -> None:
    r = json.loads(cli("run", "--model", str(bundle[0]), "--key", str(bundle[1]), "--max-inputs", "10",
                       "--no-drift", "--json").stdout)
    assert "drift" not in r["pipelines"][0]
    r = json.loads(cli("run", "--model", str(models_dir / "digits_mlp.onnx"), "--max-inputs", "10",
                       "--drift-reference", str(bundle[0] / "reference_profile.json"), "--json").stdout)
    assert r["pipelines"][0]["drift"]["samples"] == 10


def test_drift_alarms_and_summaries_reach_the_cloud(bundle, models_dir: Path, broker_factory,
                                                     tmp_path: Path) -> None:
    """With --broker the alarm goes out as an event record and the window statistics as drift summary
    records, which merge back into the statistics of the whole stream."""
    from cloud_sync.service import IngestService
    from edge_runtime.core.drift import load_reference, merge_summaries

    broker = broker_factory()
    svc = IngestService(broker.url, str(tmp_path / "cloud.db"))
    svc.start()
    try:
        f = tmp_path / "dim.npy"
        np.save(f, (np.load(models_dir / "digits_mlp.test_x.npy") * 0.6).astype(np.float32))
        cli("run", "--model", str(bundle[0]), "--key", str(bundle[1]), "--source", f"npy:{f}", "--loop",
            "--max-inputs", "1500", "--broker", broker.url, "--device-id", "dev-1", "--buffer",
            str(tmp_path / "outbox.db"), "--drain-timeout", "15")
        rows = svc.store.records("dev-1")
    finally:
        svc.stop()
    events = [r[5] for r in rows if r[3] == "e"]
    summaries = [r[5] for r in rows if r[3] == "d"]
    assert [e["name"] for e in events] == ["drift_alarm"]
    assert summaries and all(s["model"] == "digits_mlp" for s in summaries)
    reference = load_reference(json.loads((bundle[0] / "reference_profile.json").read_text()))
    merged = summaries[0]["summary"]
    for s in summaries[1:]:
        merged = merge_summaries(merged, s["summary"], reference)
    assert merged["n"] == 1500 and merged["windows"] == 3
