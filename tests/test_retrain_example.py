"""models/retrain_tabular.py: a retraining request in, the next signed tabular bundle out; every refusal has
its own exit status and writes nothing. The last test runs it as the hub's retrain command, end to end."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from cloud_sync.hub import Hub
from edge_runtime.adapters import ed25519
from edge_runtime.bundle import CreateOptions, create_bundle, verify_bundle
from edge_runtime.core import protocol as p
from tests.conftest import MODELS_DIR

pytestmark = pytest.mark.integration

SCRIPT = MODELS_DIR / "retrain_tabular.py"
T0 = 1_764_167_000_000

REQUEST = {"id": "rt-test-1", "model": "tabular", "reason": "low_confidence_rate 0.9 > 0.5 on dev-1",
           "alert": {"alert_id": "a-1"}, "data_window": {"since_ms": T0 - 86_400_000, "until_ms": T0},
           "metrics": {"value": 0.9, "threshold": 0.5, "subject": "dev-1"}, "created_ms": T0}


@pytest.fixture(scope="module")
def base(models_dir: Path, tmp_path_factory: pytest.TempPathFactory, profile) -> dict[str, Path]:
    """A keypair and a version "1" bundle of the sample tabular model, signed with it."""
    d = tmp_path_factory.mktemp("retrain-base")
    priv, pub = ed25519.write_keypair(ed25519.generate(), d / "release")
    bundle = create_bundle(models_dir / "tabular.onnx", "1", priv, d / "tabular-1",
                           CreateOptions(reference=str(models_dir / "tabular.train_x.npy")), profile)
    return {"bundle": bundle, "priv": priv, "pub": pub}


class Run(NamedTuple):
    out: Path
    proc: subprocess.CompletedProcess[str]


def write_request(path: Path, **changes: object) -> Path:
    path.write_text(json.dumps({**REQUEST, **changes}), encoding="utf-8")
    return path


def retrain(base: dict[str, Path], out_dir: Path, request: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Options first and the request last, as ``cloud-sync serve --retrain-command`` calls it."""
    return subprocess.run([sys.executable, str(SCRIPT), "--base", str(base["bundle"]), "--key", str(base["priv"]),
                           "--out-dir", str(out_dir), *extra, str(request)],
                          capture_output=True, text=True, timeout=120, check=False)


def summary(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def verified_manifest(bundle: str | Path, pub: Path) -> dict:
    return verify_bundle(bundle, [ed25519.read_public(pub)]).manifest


@pytest.fixture(scope="module")
def runs(base: dict[str, Path], models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """The three runs that train, started together (each is mostly imports: about 3 s alone): a plain
    request, one with 40 labelled feedback rows, and one whose accuracy bar cannot be met."""
    d = tmp_path_factory.mktemp("retrain-runs")
    fx, fy = d / "fx.npy", d / "fy.npy"
    np.save(fx, np.load(models_dir / "tabular.test_x.npy")[:40])
    np.save(fy, np.load(models_dir / "tabular.test_y.npy")[:40])
    plans = {"plain": (write_request(d / "plain.json"), ()),
             "feedback": (write_request(d / "feedback.json", model="*"),
                          ("--feedback-x", str(fx), "--feedback-y", str(fy))),
             "strict": (write_request(d / "strict.json"), ("--min-accuracy", "1.01"))}
    with ThreadPoolExecutor(len(plans)) as pool:
        futures = {name: pool.submit(retrain, base, d / name, req, *extra) for name, (req, extra) in plans.items()}
        return {name: Run(d / name, f.result()) for name, f in futures.items()}


def test_a_request_gives_the_next_version_signed_and_accurate(base: dict[str, Path], runs: dict[str, Run]) -> None:
    out, got = runs["plain"].out, summary(runs["plain"].proc)
    assert got["version"] == "2" and got["base_version"] == "1" and got["request"] == REQUEST["id"]
    assert got["rows"] == {"train": 426, "feedback": 0}
    assert Path(got["bundle"]) == (out / "tabular-2").resolve()
    manifest = verified_manifest(got["bundle"], base["pub"])
    assert manifest["name"] == "tabular" and manifest["version"] == "2"
    assert manifest["metrics"]["test"]["accuracy"] >= 0.9
    assert manifest["metrics"]["test"]["accuracy"] == pytest.approx(got["accuracy"])
    assert manifest["reference_profile"]["n_samples"] == 426
    record = json.loads((out / "tabular-2.retrain_request.json").read_text())
    assert record["request"]["id"] == REQUEST["id"] and record["request"]["reason"] == REQUEST["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["tabular-2", "tabular-2.retrain_request.json"]


def test_feedback_rows_join_the_training_rows(base: dict[str, Path], runs: dict[str, Run]) -> None:
    got = summary(runs["feedback"].proc)
    assert got["rows"] == {"train": 426, "feedback": 40}
    manifest = verified_manifest(got["bundle"], base["pub"])
    assert manifest["reference_profile"]["n_samples"] == 466 and manifest["metrics"]["test"]["accuracy"] >= 0.9


def test_a_model_below_min_accuracy_exits_4_and_writes_nothing(runs: dict[str, Run]) -> None:
    out, proc = runs["strict"]
    assert proc.returncode == 4, proc.stderr
    assert "below --min-accuracy 1.01" in proc.stderr and proc.stdout == ""
    assert not out.exists()


@pytest.mark.parametrize(("request_text", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({**REQUEST, "id": ""}), "'id' must be a non-empty string"),
    (json.dumps({k: v for k, v in REQUEST.items() if k != "data_window"}), "'data_window' must be an object"),
    (json.dumps({**REQUEST, "created_ms": "yesterday"}), "'created_ms' must be a non-negative integer"),
])
def test_a_malformed_request_exits_2(base: dict[str, Path], tmp_path: Path, request_text: str, message: str) -> None:
    req = tmp_path / "req.json"
    req.write_text(request_text, encoding="utf-8")
    proc = retrain(base, tmp_path / "out", req)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and not (tmp_path / "out").exists()


def test_a_request_for_another_model_exits_3(base: dict[str, Path], tmp_path: Path) -> None:
    proc = retrain(base, tmp_path / "out", write_request(tmp_path / "req.json", model="digits_mlp"))
    assert proc.returncode == 3
    assert "'digits_mlp'" in proc.stderr and "retrains 'tabular'" in proc.stderr


@pytest.mark.parametrize(("x_shape", "labels", "message"), [
    ((40, 29), [0, 1] * 20, "expected shape [N, 30]"),
    ((40, 30), [0, 2] * 20, "labels must be 0 or 1, got [2]"),
    ((40, 30), [0, 1] * 10, "has 20 labels for the 40 rows"),
])
def test_bad_feedback_is_refused_clearly(base: dict[str, Path], tmp_path: Path, x_shape: tuple[int, int],
                                         labels: list[int], message: str) -> None:
    fx, fy = tmp_path / "fx.npy", tmp_path / "fy.npy"
    np.save(fx, np.ones(x_shape, np.float32))
    np.save(fy, np.array(labels, np.int64))
    proc = retrain(base, tmp_path / "out", write_request(tmp_path / "req.json"),
                   "--feedback-x", str(fx), "--feedback-y", str(fy))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("version", "expected"), [("1", "2"), ("41", "42"), ("1.4.2", "1.4.3"),
                                                   ("2.0.0-rc.1", "2.0.1"), ("1.0.0+build.5", "1.0.1")])
def test_the_new_version_is_the_base_plus_one(version: str, expected: str) -> None:
    import retrain_tabular  # models/ is on sys.path (conftest); by path, its dataclasses would not build

    assert retrain_tabular.next_version(version) == expected


def _status(dev: str) -> p.Status:
    return p.Status(dev, True, "b1", T0, "0.1.0", (p.ModelStatus("tabular", "1", "active"),))


def _metrics(dev: str, seq: int, t: int, low: int, predictions: int) -> p.RecordBatch:
    """Cumulative counters, as the agent sends them: the hub rates the difference between windows."""
    rec = p.Record(seq, "m", t, {
        "pipeline": "tabular", "model_version": "1", "window_s": 60.0, "inputs": predictions,
        "predictions": predictions, "throughput_per_s": 10.0,
        "latency_us": {"count": 100, "mean": 500.0, "p50": 500.0, "p90": 900.0, "p99": 1000.0, "max": 1000.0},
        "errors": {}, "low_confidence": low, "null_outputs": 0, "labels": {"1": predictions},
        "drift_alarm": False, "accuracy": None, "labelled": 0, "cpu_percent": 20.0, "rss_mb": 80.0,
        "temperature_c": None})
    return p.RecordBatch(dev, "b1", f"b1:{seq}-{seq}", (rec,))


def test_the_hub_runs_it_when_a_retrain_rule_fires(base: dict[str, Path], tmp_path: Path) -> None:
    rules = ('[[rule]]\nname = "unsure"\nmetric = "low_confidence_rate"\nop = ">"\nthreshold = 0.5\n'
             'retrain = true\nmodel = "tabular"\n')
    out = tmp_path / "bundles"
    command = shlex.join([sys.executable, str(SCRIPT), "--base", str(base["bundle"]), "--key", str(base["priv"]),
                          "--out-dir", str(out)])
    hub = Hub.for_tests(tmp_path / "c.db", rules, retrain_command=command, retrain_dir=tmp_path / "requests")
    try:
        for msg, now in [(_status("dev-1"), T0), (_metrics("dev-1", 1, T0, 0, 100), T0),
                         (_metrics("dev-1", 2, T0 + 60_000, 90, 200), T0 + 60_000)]:  # 90 of 100 unsure
            hub.handle(msg.topic, msg.to_wire(), now)
        (alert,) = hub.alert_list("firing")
        assert alert["rule"] == "unsure" and alert["retrain"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and hub.retrain_requests()[0]["state"] not in ("succeeded", "failed"):
            time.sleep(0.1)
        (req,) = hub.retrain_requests()
        assert req["state"] == "succeeded", req
        assert req["model"] == "tabular" and req["outcome"]["exit_code"] == 0
        got = json.loads(req["outcome"]["stdout_tail"].strip().splitlines()[-1])
        assert got["request"] == req["id"] and got["version"] == "2" and got["rows"]["feedback"] == 0
        assert Path(got["bundle"]) == (out / "tabular-2").resolve()
        manifest = verified_manifest(out / "tabular-2", base["pub"])
        assert manifest["version"] == "2" and manifest["metrics"]["test"]["accuracy"] >= 0.9
        record = json.loads((out / "tabular-2.retrain_request.json").read_text())
        assert record["request"]["id"] == req["id"] and record["request"]["alert"]["alert_id"] == alert["id"]
    finally:
        hub.close()
