"""The commands as a user runs them: fresh interpreters, real models, real files and pipes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cli

pytestmark = pytest.mark.integration


HELP_WORDS = {
    "": ["run", "bench", "profiles", "quantize", "keygen", "bundle"],
    "run": ["--model", "--source", "--report-json", "--no-sync", "--max-inputs", "--profile", "--batch",
            "--max-wait-ms", "--key"],
    "bench": ["--model", "--input-shape", "--batch", "--seconds", "--profile", "--json"],
    "profiles": ["--json"],
    "quantize": ["--model", "--calibration", "--out", "--profile", "--input-shape", "--max-accuracy-drop",
                 "--labels", "--json"],
    "keygen": ["--out"],
    "bundle": ["create", "verify", "inspect"],
    "bundle create": ["--model", "--version", "--key", "--out", "--reference", "--labels", "--preprocess",
                      "--name", "--archive"],
    "bundle verify": ["--key", "--json"],
    "bundle inspect": ["--json"],
}


@pytest.mark.parametrize("command", sorted(HELP_WORDS))
def test_help_of_every_command(command: str) -> None:
    out = cli(*command.split(), "--help").stdout
    assert "usage: edge-runtime" in out
    for word in HELP_WORDS[command]:
        assert word in out, word


def test_cloud_sync_help() -> None:
    out = subprocess.run([sys.executable, "-m", "cloud_sync.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "usage: cloud-sync" in out


def test_console_scripts_are_installed() -> None:
    bindir = Path(sys.executable).parent
    for name in ("edge-runtime", "cloud-sync"):
        out = subprocess.run([bindir / name, "--version"], capture_output=True, text=True, check=True)
        assert out.stdout.startswith(name)


def test_run_over_npy_writes_the_report(models_dir: Path, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    proc = cli("run", "--model", str(models_dir / "digits_mlp.onnx"), "--source",
               f"npy:{models_dir / 'digits_mlp.test_x.npy'}", "--report-json", str(report), "--no-sync",
               "--max-inputs", "100", "--profile", "x86-generic")
    r = json.loads(report.read_text())
    assert r["stopped_by"] == "max_inputs"
    assert r["profile"]["name"] == "x86-generic"
    (p,) = r["pipelines"]
    assert p["inputs"] == 100 and p["predictions"] == 100 and p["errors"]["total"] == 0
    assert p["model"]["providers"] == ["CPUExecutionProvider"]
    assert sum(p["labels"].values()) == 100
    for stage in ("read", "preprocess", "infer", "postprocess", "latency"):
        assert set(p["latency_us"][stage]) >= {"p50", "p90", "p99", "p99.9", "max", "count"}
    assert p["throughput_per_s"] > 0 and r["rss_mb"] > 0
    assert "100 predictions of 100 inputs" in proc.stderr  # the human summary


def test_run_from_stdin_counts_bad_lines_and_serves_good_ones(models_dir: Path, tmp_path: Path) -> None:
    x = np.load(models_dir / "digits_mlp.test_x.npy")
    good = json.dumps(x[0].tolist())
    lines = [good, "{oops", json.dumps(x[0][:3].tolist()), json.dumps(["a"] * 64), good,
             json.dumps({"input": x[1].tolist()}), json.dumps([None] * 64), good]
    report = tmp_path / "r.json"
    proc = cli("run", "--model", str(models_dir / "digits_mlp.onnx"), "--source", "stdin",
               "--report-json", str(report), "--predictions", "-", stdin="\n".join(lines) + "\n")
    (p,) = json.loads(report.read_text())["pipelines"]
    assert p["predictions"] == 4
    assert p["errors"]["by_reason"] == {"decode": 1, "shape": 1, "dtype": 2}
    preds = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(preds) == 4 and all(0 <= q["label"] <= 9 and 0 < q["score"] <= 1 for q in preds)
    assert "expected" in proc.stderr and "got" in proc.stderr  # the errors say what was wrong


def test_sigterm_stops_an_idle_agent_cleanly_with_a_report(models_dir: Path, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "run", "--model",
                             str(models_dir / "digits_mlp.onnx"), "--source", "stdin", "--report-json",
                             str(report)], stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        for line in proc.stderr:  # wait until the model is loaded
            if "loaded" in line or time.monotonic() > deadline:
                break
        assert proc.stdin is not None
        proc.stdin.write(json.dumps([0.0] * 64) + "\n")
        proc.stdin.flush()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    r = json.loads(report.read_text())
    assert r["stopped_by"] == "signal:SIGTERM"
    assert r["pipelines"][0]["predictions"] == 1


def test_two_models_in_one_agent_each_with_its_metrics(models_dir: Path) -> None:
    proc = cli("run", "--model", f"a={models_dir / 'digits_mlp.onnx'}", "--model",
               f"b={models_dir / 'cnn.onnx'}", "--source", "synthetic", "--max-inputs", "20", "--json")
    r = json.loads(proc.stdout)
    assert [p["name"] for p in r["pipelines"]] == ["a", "b"]
    assert all(p["predictions"] == 20 for p in r["pipelines"])


def test_video_source_through_the_cnn_preprocessing(models_dir: Path, tmp_path: Path) -> None:
    import cv2

    video = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    for i in range(12):
        w.write(np.full((120, 160, 3), i * 20, np.uint8))
    w.release()
    r = json.loads(cli("run", "--model", str(models_dir / "cnn.onnx"), "--source", f"video:{video}",
                       "--json").stdout)
    (p,) = r["pipelines"]
    assert p["predictions"] == 12 and p["errors"]["total"] == 0 and p["stopped_by"] == "end_of_source"


def test_video_source_without_the_vision_extra_says_what_to_install(models_dir: Path) -> None:
    code = ("import sys; sys.modules['cv2'] = None\n"
            "from edge_runtime.cli import main\n"
            f"sys.exit(main(['run', '--model', r'{models_dir / 'cnn.onnx'}', '--source', 'camera:0']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "pip install 'edge-runtime[vision]'" in proc.stderr


def test_run_errors_are_one_clear_line(models_dir: Path, tmp_path: Path) -> None:
    proc = cli("run", "--model", str(tmp_path / "nope.onnx"), check=False)
    assert proc.returncode == 1 and "model not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("run", "--model", str(models_dir / "digits_mlp.onnx"), "--source", "tape:1", check=False)
    assert proc.returncode == 1 and "unknown source 'tape:1'" in proc.stderr
    proc = cli("run", "--model", str(models_dir / "digits_mlp.onnx"), "--profile", "pi9", check=False)
    assert proc.returncode == 1 and "unknown device profile 'pi9'" in proc.stderr


BENCH_KEYS = {"bare_us", "agent_us", "overhead_us", "ratio", "bare", "agent", "rss_mb", "providers"}


def test_bench_json(models_dir: Path) -> None:
    r = json.loads(cli("bench", "--model", str(models_dir / "digits_mlp.onnx"), "--seconds", "0.5",
                       "--warmup", "0.1", "--json").stdout)
    assert set(r) >= BENCH_KEYS
    assert r["overhead_us"] == pytest.approx(r["agent_us"] - r["bare_us"], abs=0.02)
    assert r["ratio"] == pytest.approx(r["agent_us"] / r["bare_us"], rel=1e-3)
    for side in ("bare", "agent"):
        assert r[side]["p50_us"] <= r[side]["p99_us"] and r[side]["iterations"] > 10
    assert r["agent_errors"] == 0
    assert r["providers"] == ["CPUExecutionProvider"]


def test_bench_table_and_batches(models_dir: Path) -> None:
    out = cli("bench", "--model", str(models_dir / "digits_mlp.onnx"), "--seconds", "0.3", "--warmup", "0.1",
              "--batch", "8").stdout
    assert "bare run" in out and "agent loop" in out and "overhead" in out and "[8, 64]" in out


def test_bench_third_party_shapes(models_dir: Path) -> None:
    model = str(models_dir / "multi_input.onnx")
    proc = cli("bench", "--model", model, "--seconds", "0.3", check=False)
    assert proc.returncode == 1
    assert "dynamic dim 'seq'" in proc.stderr and "--input-shape tokens=" in proc.stderr
    r = json.loads(cli("bench", "--model", model, "--seconds", "0.3", "--warmup", "0.1", "--dim", "seq=7",
                       "--dim", "batch=2", "--json").stdout)
    assert r["inputs"]["tokens"] == {"shape": [2, 7], "dtype": "int64"}
    assert r["inputs"]["mask"]["dtype"] == "bool" and r["inputs"]["temperature"]["shape"] == []
    assert r["inputs"]["h0"]["shape"] == [1, 2, 16]
    r = json.loads(cli("bench", "--model", model, "--seconds", "0.3", "--warmup", "0.1", "--input-shape",
                       "tokens=1x4", "--input-shape", "mask=1x4", "--input-shape", "h0=1x1x16",
                       "--json").stdout)
    assert r["inputs"]["tokens"]["shape"] == [1, 4] and r["agent_errors"] == 0
    r = json.loads(cli("bench", "--model", str(models_dir / "no_batch.onnx"), "--seconds", "0.3",
                       "--warmup", "0.1", "--json").stdout)
    assert r["inputs"]["x"]["shape"] == [8]


def test_profiles_command_marks_the_detected_profile() -> None:
    r = json.loads(cli("profiles", "--json").stdout)
    names = {p["name"] for p in r["profiles"]}
    assert {"x86-generic", "rpi4", "rpi5", "jetson-orin-nano"} <= names
    assert r["detected"] in names
    assert "CPUExecutionProvider" in r["available_providers"]


def test_a_bad_device_tag_is_refused_before_anything_starts(models_dir: Path, tmp_path: Path) -> None:
    proc = cli("run", "--model", str(models_dir / "digits_mlp.onnx"), "--broker", "mqtt://127.0.0.1:1",
               "--buffer", str(tmp_path / "o.db"), "--tag", "no spaces please", "--max-inputs", "1", check=False)
    assert proc.returncode == 1 and "--tag" in proc.stderr and "no spaces please" in proc.stderr
