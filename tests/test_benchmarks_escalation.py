"""benchmarks/escalation_curve.py runs end to end with short settings, so it cannot rot. Figures are not
judged: performance is measured in benchmarks, not asserted in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_escalation_curve_quick(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ec.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "escalation_curve.py"), "--quick", "--seconds",
                           "0.05", "--models-dir", str(models_dir), "--out", str(out)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert not r["errors"]
    for rule in ("score", "margin"):
        points = r["curves"][rule]["points"]
        assert len(points) == 61 and points[0]["accuracy"] == pytest.approx(r["accuracy"]["device_test"], abs=1e-6)
        assert all(p["rate"] <= p["target_rate"] + 1e-9 for p in points)
        assert 0 <= r["held_out"][rule]["test_rate"] <= 1
    assert r["accuracy"]["cloud_test"] > r["accuracy"]["device_test"]
    assert {"device_run_b1", "cloud_run_b1", "decide_score_b1", "decide_score_b32", "escalated_input"} <= \
        set(r["timing_us"])
    assert all(t["median"] > 0 for t in r["timing_us"].values())
    assert "Targets (information only)" in proc.stdout and "device only" in proc.stdout
