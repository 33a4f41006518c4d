"""benchmarks/drift_bench.py runs end to end with a small budget, so it cannot rot. Figures are not judged
(no speed or quality assertions): they are measured by the benchmark, not asserted here. river is a
benchmark-only dependency (not installed by `make test`): the run is checked as installed, and where river
is installed it is also checked with river hidden, so the no-river path is always covered once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

SCRIPT = ROOT / "benchmarks" / "drift_bench.py"
SCENARIOS = {
    "digits/mean_shift", "digits/variance", "digits/brightness",
    "tabular/mean_shift", "tabular/mean_shift_small", "tabular/variance",
    "frames/brightness", "frames/blur",
    "predictions/class_prior",
    "labels/flip_5_classes", "labels/flip_1_class",
}
SMALL = ("--quick", "--seeds", "1", "--kswin-seeds", "1", "--null-samples", "20000", "--river-null-samples", "3000")


def run_bench(models_dir: Path, out: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(SCRIPT), *SMALL, "--models-dir", str(models_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=240, check=False,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def check_ours(r: dict[str, Any]) -> None:
    assert set(r["scenarios"]) == SCENARIOS
    for name, sc in r["scenarios"].items():
        ours = {k: v for k, v in sc["detectors"].items() if k.startswith("edge_runtime")}
        assert ours, name
        first = next(iter(ours.values()))
        assert first["runs"] == 1 and first["undrifted_samples"] >= 20_000
        for key in ("false_alarms_per_100k", "false_alarms_per_100k_upper95", "miss_rate", "us_per_sample"):
            assert isinstance(first[key], float | int), (name, key, first[key])
        assert "mean_delay" in first and "median_delay" in first
        if first["detected"]:
            assert first["median_delay"] > 0
    assert r["cost"]["monitor_10_features_batch32_us_per_sample"] > 0
    assert r["machine"]["cores"] and r["command"] and r["timestamp_utc"]
    assert not r["errors"]


def test_drift_bench_quick(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "drift.json"
    proc = run_bench(models_dir, out)
    r = json.loads(out.read_text())
    check_ours(r)
    assert "NOTE: --quick" in proc.stdout
    if r["river"]["available"]:
        for name, sc in r["scenarios"].items():
            river = [k for k in sc["detectors"] if k.startswith("river")]
            assert {sc["detectors"][k]["detector"] for k in river} == {"ADWIN", "PageHinkley", "KSWIN"}, name
            assert sc["river_skipped"] is None
        check_without_river(models_dir, tmp_path)
    else:
        check_no_river_report(r, proc)


def check_without_river(models_dir: Path, tmp_path: Path) -> None:
    """With river unimportable the river columns are skipped with a note, and the run still exits 0."""
    fake = tmp_path / "hide" / "river"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('river hidden by the test')\n")
    out = tmp_path / "drift.json"
    path = os.pathsep.join(p for p in (str(fake.parent), os.environ.get("PYTHONPATH")) if p)
    proc = run_bench(models_dir, out, {"PYTHONPATH": path})
    r = json.loads(out.read_text())
    check_ours(r)
    check_no_river_report(r, proc)


def check_no_river_report(r: dict[str, Any], proc: subprocess.CompletedProcess[str]) -> None:
    assert r["river"] == {"available": False, "skipped": True, "note": r["river"]["note"]}
    assert "river" in r["river"]["note"] and "skipped" in proc.stdout
    for sc in r["scenarios"].values():
        assert sc["river_skipped"] == r["river"]["note"]
        assert not [k for k in sc["detectors"] if k.startswith("river")]
