"""The benchmark scripts run end to end (short settings), so they cannot rot. Figures are not judged:
performance is measured in benchmarks, not asserted in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_loop_overhead_quick(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lo.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loop_overhead.py"), "--quick",
                           "--seconds", "0.3", "--idle-seconds", "1", "--models-dir", str(models_dir),
                           "--out", str(out)], capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert not r["errors"]
    assert {c["case"] for c in r["cases"]} == {"digits_mlp b1", "digits_mlp b32", "cnn b1"}
    for c in r["cases"]:
        s = c["summary"]
        assert s["bare_us"]["median"] > 0 and s["agent_us"]["median"] > 0
    assert r["idle"]["report_written"] and r["idle"]["exit_code"] == 0
    assert "Targets" in proc.stdout


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bundle_verify_quick(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bv.json"
    run_script("bundle_verify.py", "--repeats", "2", "--models-dir", str(models_dir), "--out", str(out))
    r = json.loads(out.read_text())
    assert r["bundle_bytes"] > 4_000_000 and r["verify_ms"] > 0 and r["baseline_bare_load_ms"] > 0
    assert set(r["checks_ms"]) == {"signature", "files", "constraints", "onnx_checker", "smoke"}


def test_quantize_all_quick(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.json"
    run_script("quantize_all.py", "--seconds", "0.2", "--models-dir", str(models_dir), "--out", str(out))
    r = json.loads(out.read_text())
    assert set(r["reports"]) == {"digits_mlp", "tabular", "cnn"} and not r["failed"]
    for rep in r["reports"].values():
        fp32 = next(v for v in rep["variants"] if v["name"] == "fp32")
        chosen = next(v for v in rep["variants"] if v["name"] == rep["chosen"]["name"])
        assert chosen["median_us"] <= fp32["median_us"]


def test_drift_in_agent_quick(models_dir: Path) -> None:
    proc = run_script("drift_in_agent.py", "--repeats", "1", "--rows", "600", "--frames", "12", "--models-dir",
                      str(models_dir), "--json")
    rows = json.loads(proc.stdout)
    assert {(r["data"], r["monitor"]) for r in rows} == {(d, m) for d in ("rows", "frames")
                                                         for m in ("none", "inline", "thread")}
    assert all(r["per_s"] > 0 and r["p99_us"] > 0 for r in rows)
    assert all(r["throughput_ratio"] == 1.0 for r in rows if r["monitor"] == "none")


def test_hot_swap_quick(models_dir: Path) -> None:
    proc = run_script("hot_swap.py", "--swaps", "2", "--hz", "400", "--models-dir", str(models_dir), "--json")
    out = json.loads(proc.stdout)
    assert [o["model"] for o in out] == ["digits_mlp.onnx", "cnn.onnx"]
    for o in out:
        assert o["swaps"] == 2 and o["outputs"] == o["unique"] == o["inputs"]
        assert o["swap_gap_ms"]["max"] > 0 and o["normal_gap_ms"]["median"] > 0


def test_bundle_delivery_quick(tmp_path: Path) -> None:
    out = tmp_path / "bd.json"
    run_script("bundle_delivery.py", "--quick", "--devices", "3", "--size-mb", "1", "--out", str(out))
    r = json.loads(out.read_text())
    assert not r["errors"] and r["devices"] == 3
    assert r["bundle"]["bytes"] == 1_000_000 and r["bundle"]["chunks"] == 16
    assert r["publish_only"]["seconds"] > 0 and r["publish_only"]["max_in_flight"] <= r["window"]
    for step, n in (("one_device", 1), ("fleet", 3)):
        s = r[step]
        assert s["devices"] == n and s["delivered"] == n and s["identical"] == n and s["bad_chunks"] == 0
        assert s["seconds_to_last_verified"] > 0 and s["total_mb_per_s"] > 0
