"""What the running agent reports beside its predictions: output health (low-confidence and null
outputs), periodic metric snapshots and telemetry, frame health, label feedback by id, temperature."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.service import IngestService
from edge_runtime.adapters import ed25519
from edge_runtime.adapters.onnx_engine import OnnxEngine
from edge_runtime.bundle import CreateOptions, create_bundle
from edge_runtime.core.histogram import LatencyHistogram
from edge_runtime.pipeline import Pipeline
from edge_runtime.sources import ArraySource
from edge_runtime.sysinfo import temperature_c, temperatures_c
from tests.conftest import cli

pytestmark = pytest.mark.integration


def drain(p: Pipeline) -> None:
    while p.step():
        pass


@pytest.fixture(scope="module")
def bundle(models_dir: Path, tmp_path_factory: pytest.TempPathFactory, profile) -> tuple[Path, Path]:
    """The digits model with a reference profile and the accuracy measured on its test set."""
    d = tmp_path_factory.mktemp("outputs")
    ed25519.write_keypair(ed25519.generate(), d / "k")
    b = create_bundle(models_dir / "digits_mlp.onnx", "7", d / "k", d / "b", CreateOptions(
        reference=str(models_dir / "digits_mlp.train_x.npy"), test_data=str(models_dir / "digits_mlp.test_x.npy"),
        test_labels=str(models_dir / "digits_mlp.test_y.npy")), profile)
    return b, d / "k.pub"


@pytest.mark.parametrize("batch", [1, 8])
def test_low_confidence_outputs_are_counted_as_the_model_scores_them(models_dir: Path, profile, batch: int,
                                                                    tmp_path: Path) -> None:
    import onnxruntime as ort

    x = np.load(models_dir / "digits_mlp.test_x.npy")[:400]
    probs = ort.InferenceSession(str(models_dir / "digits_mlp.onnx"), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"input": x})[0]
    expected = int((probs.max(axis=1) < 0.9).sum())
    assert 0 < expected < len(x)  # the threshold splits this data, so the count means something
    np.save(tmp_path / "x.npy", x)
    p = Pipeline("d", OnnxEngine(models_dir / "digits_mlp.onnx", profile), ArraySource(tmp_path / "x.npy"), batch=batch,
                 low_confidence=0.9)
    drain(p)
    out = p.report()["outputs"]
    assert out["low_confidence"] == expected and out["null"] == 0
    assert out["low_confidence_rate"] == pytest.approx(expected / len(x), abs=1e-6)


def test_nan_scores_count_as_null_outputs(tmp_path: Path, profile) -> None:
    """A model whose scores are NaN for some finite inputs (log of a negative number)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["probabilities"])], "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "log.onnx")
    x = np.array([[2.0, 3.0, 4.0], [-1.0, -2.0, -3.0], [1.5, 1.2, 1.1], [-5.0, 1.0, 2.0]], dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    for batch in (1, 4):
        p = Pipeline("log", OnnxEngine(tmp_path / "log.onnx", profile), ArraySource(tmp_path / "x.npy"), batch=batch,
                     low_confidence=0.5)
        drain(p)
        out = p.report()["outputs"]
        # Row 0: log 4 = 1.39 (confident); row 1: all NaN (null); row 2: log 1.5 = 0.41 (low);
        # row 3: NaN first, argmax stops there (null).
        assert (out["null"], out["low_confidence"]) == (2, 1), (batch, out)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10**9), max_size=200), st.lists(st.integers(0, 10**9), min_size=1, max_size=200))
def test_histogram_minus_gives_the_later_samples(before: list[int], after: list[int]) -> None:
    h, later = LatencyHistogram(), LatencyHistogram()
    for v in before:
        h.record(v)
    earlier = LatencyHistogram().merge(h)
    for v in after:
        h.record(v)
        later.record(v)
    diff = h.minus(earlier)
    assert diff.counts == later.counts and diff.count == later.count and diff.total == later.total
    for q in (0.5, 0.9, 0.99):
        assert diff.quantile(q) == pytest.approx(later.quantile(q), rel=0.07)
    assert diff.min <= later.min and diff.max >= later.max  # bounded by the buckets that hold samples
    with pytest.raises(ValueError, match="holds samples"):
        earlier.minus(h)


def test_temperatures_from_thermal_zones(tmp_path: Path) -> None:
    for i, (kind, milli) in enumerate([("cpu-thermal", "48312"), ("gpu-thermal", "51000"), ("cpu-thermal", "40000")]):
        z = tmp_path / f"thermal_zone{i}"
        z.mkdir()
        (z / "type").write_text(kind + "\n")
        (z / "temp").write_text(milli + "\n")
    broken = tmp_path / "thermal_zone9"
    broken.mkdir()
    (broken / "temp").write_text("not a number\n")
    assert temperatures_c(tmp_path) == {"cpu-thermal": 48.3, "gpu-thermal": 51.0, "cpu-thermal-2": 40.0}
    assert temperature_c(tmp_path) == 51.0
    assert temperature_c(tmp_path / "missing") is None


def test_label_feedback_on_stdin_by_input_id_and_prediction_id(bundle, models_dir: Path, tmp_path: Path) -> None:
    """Inputs with their own ids, then (as a labelling system would, later) one wrong label for each:
    the concept tracker raises its alarm. Predictions without an input id get one from the agent,
    written to --predictions, and a label by that id also arrives. Unknown ids are counted."""
    x = np.load(models_dir / "digits_mlp.test_x.npy")[:300]
    lines = [json.dumps({"id": f"in-{i}", "input": x[i].tolist()}) for i in range(300)]
    lines.append(json.dumps(x[0].tolist()))  # no id of its own
    preds_file = tmp_path / "preds.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "run", "--model", str(bundle[0]), "--key",
                             str(bundle[1]), "--source", "stdin", "--predictions", str(preds_file), "--json"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write("\n".join(lines) + "\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 30
    while (not preds_file.exists() or preds_file.read_text().count("\n") < 301) and time.monotonic() < deadline:
        time.sleep(0.1)
    preds = [json.loads(line) for line in preds_file.read_text().splitlines()]
    assert [p["id"] for p in preds[:300]] == [f"in-{i}" for i in range(300)]
    own = preds[300]["id"]
    assert own and not own.startswith("in-")
    wrong = [[p["id"], (p["label"] + 1) % 10] for p in preds[:300]]
    feedback = [json.dumps({"feedback": wrong[:150]}), json.dumps({"feedback": wrong[150:]}),
                json.dumps({"feedback": {"id": own, "label": str(preds[300]["label"])}}),
                json.dumps({"feedback": [["never-seen", 3]]}), json.dumps({"feedback": "nonsense"})]
    out, err = proc.communicate("\n".join(feedback) + "\n", timeout=60)
    assert proc.returncode == 0, err
    r = json.loads(out)
    pipe = r["pipelines"][0]
    assert r["feedback"] == {"received": 302, "resolved": 301, "unresolved": 1}
    assert pipe["concept"]["labels"] == 301 and pipe["concept"]["alarmed"]
    assert pipe["errors"]["by_reason"] == {"feedback": 1}  # the malformed feedback line, counted
    shift = pipe["prediction_shift"]
    assert shift["available"] and shift["classes"] == [str(c) for c in range(10)]
    assert sum(shift["live"].values()) == pytest.approx(1.0, abs=1e-3)
    assert set(shift["distances"]) >= {"psi", "js"}


def test_video_of_a_covered_lens_raises_a_frame_health_event(models_dir: Path, tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2", reason="the vision extra (opencv-python-headless) is part of .[dev]")
    clip = tmp_path / "covered.avi"
    w = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    rng = np.random.default_rng(0)
    for i in range(120):  # 40 ordinary frames, then a covered lens: near-uniform dark frames
        frame = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) if i < 40 else np.full((48, 64, 3), 3, np.uint8)
        w.write(frame)
    w.release()
    r = json.loads(cli("run", "--model", str(models_dir / "cnn.onnx"), "--source", f"video:{clip}", "--json").stdout)
    health = r["pipelines"][0]["frame_health"]
    assert health["frames"] == 120 and health["active"]["uniform"]
    assert health["flagged_frames"]["uniform"] >= 70 and health["flagged_frames"]["frozen"] == 0
    off = json.loads(cli("run", "--model", str(models_dir / "cnn.onnx"), "--source", f"video:{clip}", "--json",
                         "--no-frame-health").stdout)
    assert "frame_health" not in off["pipelines"][0]


def test_metric_snapshots_telemetry_and_drift_with_concept_reach_the_cloud(bundle, broker_factory,
                                                                          tmp_path: Path) -> None:
    import paho.mqtt.client as mqtt

    broker = broker_factory()
    svc = IngestService(broker.url, str(tmp_path / "cloud.db"))
    svc.start()
    telemetry: list[dict] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watcher", protocol=mqtt.MQTTv5)
    sub.on_message = lambda _c, _u, m: telemetry.append(json.loads(m.payload))
    sub.connect(broker.host, broker.port)
    sub.subscribe("edge/v1/+/telemetry", qos=0)
    sub.loop_start()
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "run", "--model", str(bundle[0]), "--key",
                             str(bundle[1]), "--source", "synthetic:300", "--broker", broker.url, "--device-id",
                             "dev-m", "--buffer", str(tmp_path / "outbox.db"), "--metrics-interval", "1",
                             "--telemetry-interval", "1", "--status-interval", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            kinds = [r[3] for r in svc.store.records("dev-m")]
            if kinds.count("m") >= 3 and len(telemetry) >= 2:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
        sub.loop_stop()
        svc.stop()
    from cloud_sync.store import Store

    store = Store(tmp_path / "cloud.db")
    rows = store.records("dev-m")
    store.close()
    metrics = [r[5] for r in rows if r[3] == "m"]
    assert len(metrics) >= 4  # three periodic ones and the last, at stop
    m = metrics[1]
    assert m["pipeline"] == "digits_mlp" and m["model_version"] == "7"
    assert set(m) >= {"window_s", "inputs", "predictions", "throughput_per_s", "latency_us", "errors",
                      "low_confidence", "null_outputs", "labels", "drift_alarm", "accuracy", "labelled",
                      "cpu_percent", "rss_mb", "temperature_c"}
    assert 0.5 < m["window_s"] < 3 and m["throughput_per_s"] > 0 and m["latency_us"]["count"] > 0
    # The latency percentiles are over the window: the windows' counts add up to the predictions.
    assert sum(x["latency_us"]["count"] for x in metrics) == metrics[-1]["predictions"]
    t = telemetry[-1]["metrics"]
    assert set(t) >= {"cpu_percent", "rss_mb", "uptime_s", "pending", "pipelines"}
    assert t["pipelines"]["digits_mlp"]["predictions"] > 0
    drift = [r[5] for r in rows if r[3] == "d"]
    assert drift and drift[-1]["concept"]["reference_accuracy"] > 0.9
    assert "distances" not in drift[-1]["summary"] and "max_distances" in drift[-1]["summary"]


def test_drift_thread_sees_what_the_inline_monitor_sees_and_drops_rather_than_block(bundle, models_dir: Path,
                                                                                   profile, tmp_path: Path) -> None:
    from edge_runtime.core.drift import DriftMonitor, load_reference

    x = np.tile(np.load(models_dir / "digits_mlp.test_x.npy") * 0.6, (5, 1)).astype(np.float32)  # 2250 rows
    np.save(tmp_path / "x.npy", x)
    ref = load_reference(json.loads((bundle[0] / "reference_profile.json").read_text()))
    engine = OnnxEngine(models_dir / "digits_mlp.onnx", profile)
    alarms = []
    for threaded in (False, True):
        p = Pipeline("d", engine, ArraySource(tmp_path / "x.npy"), drift=DriftMonitor(ref), drift_thread=threaded)
        drain(p)
        r = p.report()
        assert r["drift"]["samples"] == len(x)
        alarms.append(r["drift"]["alarms"])
    assert alarms[0] == alarms[1] and alarms[0]

    class SlowMonitor(DriftMonitor):  # a fault: a monitor far slower than inference
        def update(self, *a, **kw):
            time.sleep(0.2)
            return super().update(*a, **kw)

    p = Pipeline("d", engine, ArraySource(tmp_path / "x.npy"), drift=SlowMonitor(ref), drift_every=16,
                 drift_thread=True)
    p._drift_jobs = queue.Queue(maxsize=2)
    t0 = time.monotonic()
    drain(p)
    served = time.monotonic() - t0
    r = p.report()
    dropped = r["errors"]["by_reason"].get("drift_dropped", 0)
    assert r["predictions"] == len(x) and dropped > 0 and dropped % 16 == 0
    assert served < 0.2 * len(x) / 16 / 2  # inference did not wait for the monitor


def test_a_histogram_snapshot_is_a_consistent_copy() -> None:
    h = LatencyHistogram()
    for v in (10, 2_000, 3_000_000):
        h.record(v)
    s = h.snapshot()
    h.record(5)
    assert (s.count, sum(s.counts), s.total, s.min, s.max) == (3, 3, 3_002_010, 10, 3_000_000)
    assert h.count == 4 and h.minus(s).count == 1
