"""The Prometheus exporter: a real pipeline over the digits model, run by an agent, scraped over HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("prometheus_client", reason="prometheus-client not installed (the 'prometheus' extra)")

from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.adapters.onnx_engine import OnnxEngine
from edge_runtime.core.histogram import LatencyHistogram
from edge_runtime.errors import ConfigError, MissingExtraError
from edge_runtime.pipeline import Pipeline
from edge_runtime.prom import LE_SECONDS, cumulative_buckets, start_metrics_server
from edge_runtime.runtime import Agent
from edge_runtime.sources import ArraySource
from tests.conftest import free_port

pytestmark = pytest.mark.integration

ROWS = 1500
BAD_ROWS = (5, 700)  # NaN rows: counted as ``nonfinite`` input errors


@pytest.fixture(scope="module")
def ran(models_dir: Path, profile, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An agent that ran dimmed digits (a data drift) through a drift-monitored pipeline, with a
    rollout deployer and an (unconnected) uplink beside it."""
    import onnxruntime as ort

    from edge_runtime.core.drift import DriftMonitor, build_reference
    from edge_runtime.deploy import Deployer
    from edge_runtime.uplink import Uplink, UplinkConfig

    d = tmp_path_factory.mktemp("prom")
    train = np.load(models_dir / "digits_mlp.train_x.npy").astype(np.float32)
    top1 = ort.InferenceSession(str(models_dir / "digits_mlp.onnx"), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"input": train})[0].argmax(axis=1)
    monitor = DriftMonitor(build_reference(train, top1))  # calibrated for its default window
    test = np.load(models_dir / "digits_mlp.test_x.npy")
    x = (np.resize(test, (ROWS, test.shape[1])) * 0.6).astype(np.float32)
    x[list(BAD_ROWS)] = np.nan
    np.save(d / "x.npy", x)
    p = Pipeline("digits", OnnxEngine(models_dir / "digits_mlp.onnx", profile), ArraySource(str(d / "x.npy")),
                 drift=monitor, version="3", low_confidence=0.9)
    agent = Agent([p], status_interval_s=0)
    report = agent.run()
    deployer = Deployer(p, state_dir=d / "state", keys=[], profile=profile, fetch=lambda *a: None)
    uplink = Uplink(UplinkConfig(f"mqtt://127.0.0.1:{free_port()}", "dev-1", str(d / "outbox.db")))
    uplink.prediction("digits", 3, 0.9, 1.0, "p1")
    uplink.buffer.flush()
    server = start_metrics_server(agent, free_port(), uplink=uplink, deployers={"digits": deployer})
    try:
        yield {"agent": agent, "pipeline": p, "report": report, "server": server, "uplink": uplink}
    finally:
        server.shutdown()
        uplink.buffer.close()


def scrape(server: Any) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    hits = [s.value for f in families.values() for s in f.samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, f"{sample}{labels}: {hits}"
    return hits[0]


def test_counters_equal_the_pipelines_metrics(ran) -> None:
    fams = scrape(ran["server"])
    m = ran["pipeline"].metrics
    assert m.inputs == ROWS and m.predictions == ROWS - len(BAD_ROWS)
    assert value(fams, "edge_runtime_inputs_total", pipeline="digits") == m.inputs
    assert value(fams, "edge_runtime_predictions_total", pipeline="digits") == m.predictions
    assert value(fams, "edge_runtime_errors_total", pipeline="digits", reason="nonfinite") == len(BAD_ROWS)
    assert 0 < m.low_confidence < m.predictions
    assert value(fams, "edge_runtime_low_confidence_total", pipeline="digits") == m.low_confidence
    assert value(fams, "edge_runtime_null_outputs_total", pipeline="digits") == 0
    assert value(fams, "edge_runtime_throughput_per_second", pipeline="digits") > 0
    assert value(fams, "edge_runtime_model_info", pipeline="digits", model_version="3") == 1
    assert value(fams, "edge_runtime_process_rss_bytes") > 10 * 2**20
    assert value(fams, "edge_runtime_cpu_seconds_total") > 0


def test_stage_latency_is_a_cumulative_histogram(ran) -> None:
    fams = scrape(ran["server"])
    m = ran["pipeline"].metrics
    fam = fams["edge_runtime_stage_latency_seconds"]
    assert fam.type == "histogram"
    for stage, h in m.stages.items():
        mine = [s for s in fam.samples if s.labels.get("stage") == stage and s.labels["pipeline"] == "digits"]
        buckets = [(s.labels["le"], s.value) for s in mine if s.name.endswith("_bucket")]
        assert [le for le, _ in buckets] == [*(repr(float(b)) for b in LE_SECONDS), "+Inf"]
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), (stage, counts)
        (count,) = [s.value for s in mine if s.name.endswith("_count")]
        (total,) = [s.value for s in mine if s.name.endswith("_sum")]
        assert count == counts[-1] == m.predictions  # batch 1: one observation per prediction
        assert total == pytest.approx(h.total / 1e9)
    # Digits MLP latency on a CPU: well under a second, so everything sits below le=1.
    lat = {s.labels["le"]: s.value for s in fam.samples
           if s.name.endswith("_bucket") and s.labels["stage"] == "latency"}
    assert lat["1.0"] == m.predictions


def test_drift_alarm_and_window_score_are_exported(ran) -> None:
    drift = ran["pipeline"].drift
    assert drift.alarms_total >= 1 and {a.kind for a in drift.open_alarms} == {"data"}
    fams = scrape(ran["server"])
    labels = {"pipeline": "digits", "model_version": "3"}
    assert value(fams, "edge_runtime_drift_alarm_open", kind="data", **labels) == 1
    assert value(fams, "edge_runtime_drift_alarm_open", kind="prediction", **labels) == 0
    assert value(fams, "edge_runtime_drift_alarms_total", **labels) == drift.alarms_total
    assert value(fams, "edge_runtime_drift_window_score", **labels) == pytest.approx(drift.last_window["score"])
    assert drift.last_window["score"] > 1.0


def test_rollout_state_and_uplink(ran) -> None:
    fams = scrape(ran["server"])
    states = {s.labels["state"]: s.value for s in fams["edge_runtime_rollout_state"].samples}
    assert states["idle"] == 1 and sum(states.values()) == 1 and "active" in states
    assert value(fams, "edge_runtime_outbox_pending_records") == ran["uplink"].buffer.pending_count() == 1
    assert value(fams, "edge_runtime_sync_connected") == 0
    assert value(fams, "edge_runtime_sync_batches_sent_total") == 0
    assert value(fams, "edge_runtime_sync_acked_records_total") == 0
    assert value(fams, "edge_runtime_outbox_dropped_total", reason="full", kind="prediction") == 0


def test_a_closed_outbox_leaves_the_rest_of_the_scrape(ran, models_dir: Path, profile, tmp_path: Path) -> None:
    from edge_runtime.uplink import Uplink, UplinkConfig

    uplink = Uplink(UplinkConfig(f"mqtt://127.0.0.1:{free_port()}", "dev-2", str(tmp_path / "outbox.db")))
    uplink.buffer.close()
    server = start_metrics_server(ran["agent"], 0, uplink=uplink)
    try:
        fams = scrape(server)
    finally:
        server.shutdown()
    assert "edge_runtime_outbox_pending_records" not in fams
    assert value(fams, "edge_runtime_predictions_total", pipeline="digits") == ran["pipeline"].metrics.predictions
    with pytest.raises(urllib.error.URLError):
        scrape(server)


def test_fine_buckets_fold_into_the_le_boundaries() -> None:
    """Away from a boundary the cumulative count is exact; at one, off by at most one fine bucket."""
    rng = np.random.default_rng(0)
    values = np.exp(rng.uniform(np.log(1e3), np.log(3e10), 5000)).astype(np.int64)
    h = LatencyHistogram()
    for v in values.tolist():
        h.record(v)
    cum = cumulative_buckets(h.counts)
    assert len(cum) == len(LE_SECONDS) + 1 and cum[-1] == h.count == len(values)
    for le, c in zip(LE_SECONDS, cum, strict=False):
        b = le * 1e9
        assert (values <= b * (1 - 1 / 64)).sum() <= c <= (values <= b).sum()


def test_missing_extra_is_a_clear_error(ran, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # fault: the extra is not installed
    with pytest.raises(MissingExtraError, match=r"--metrics-port needs the 'prometheus' extra.*prometheus-client"):
        start_metrics_server(ran["agent"], 0)


def test_a_busy_port_is_a_config_error(ran) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match="cannot serve metrics"):
            start_metrics_server(ran["agent"], s.getsockname()[1])


def test_importing_the_module_loads_no_prometheus_client() -> None:
    code = "import sys, edge_runtime.prom; assert 'prometheus_client' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_run_metrics_port_serves_the_agent(models_dir: Path, tmp_path: Path) -> None:
    """`edge-runtime run --metrics-port` as a user starts it: scraped while it serves stdin."""
    import json
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.conftest import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "run", "--model",
                             str(models_dir / "digits_mlp.onnx"), "--source", "stdin", "--metrics-port", str(port),
                             "--status-interval", "0"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None
        proc.stdin.write("\n".join(json.dumps([0.5] * 64) for _ in range(7)) + "\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        body = ""
        while time.monotonic() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                if 'edge_runtime_predictions_total{pipeline="digits_mlp"} 7.0' in body:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert 'edge_runtime_predictions_total{pipeline="digits_mlp"} 7.0' in body, body[-2000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
