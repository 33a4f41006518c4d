"""benchmarks/soak.py on its shortest sensible setting (real agent, Mosquitto and cloud-sync processes), so
it cannot rot. Speed and trends are not judged here; what is: the faults were injected, the samples and
latency windows were taken, and every record the agent committed is in the cloud store exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, mosquitto_binary

pytestmark = pytest.mark.integration

sys.path.insert(0, str(ROOT / "benchmarks"))
import soak  # noqa: E402 - benchmarks/ holds scripts, not a package


def test_fault_schedule_keeps_a_quiet_tail() -> None:
    faults = soak.fault_schedule(84, broker_every=30, broker_down_s=1, cloud_every=45, outage_s=8, quiet_tail_s=22)
    assert [(f.kind, f.start, f.end) for f in faults] == [
        ("broker_restart", 30, 31), ("cloud_outage", 45, 53), ("broker_restart", 60, 61)]
    assert soak.fault_schedule(60, broker_every=0, broker_down_s=1, cloud_every=0, outage_s=8, quiet_tail_s=10) == []


def test_slope_per_hour_is_the_least_squares_slope() -> None:
    ts = [0.0, 10.0, 20.0, 30.0]
    slope, se = soak.slope_per_hour(ts, [100.0 + t / 3600 for t in ts])  # 1 MB per hour exactly
    assert slope == pytest.approx(1.0) and se == pytest.approx(0.0, abs=1e-9)
    assert soak.slope_per_hour([0.0, 1.0], [1.0, 2.0]) == (None, None)  # too few points to judge


def test_parse_prometheus_sums_label_sets_under_the_bare_name() -> None:
    text = ("# HELP edge_runtime_outbox_pending_records x\nedge_runtime_outbox_pending_records 12.0\n"
            'edge_runtime_predictions_total{pipeline="a"} 3.0\nedge_runtime_predictions_total{pipeline="b"} 4.0\n')
    got = soak.parse_prometheus(text)
    assert got["edge_runtime_outbox_pending_records"] == 12.0
    assert got["edge_runtime_predictions_total"] == 7.0
    assert got['edge_runtime_predictions_total{pipeline="a"}'] == 3.0


def test_soak_quick_injects_faults_samples_and_loses_nothing(tmp_path: Path) -> None:
    mosquitto_binary()  # a clear message when Mosquitto is missing
    out = tmp_path / "soak.json"
    # 48 s: broker restarts at 15 and 30 s, a cloud outage at 20-25 s, 5 s windows; about 55 s in all.
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--quick", "--minutes", "0.8",
                           "--sample-seconds", "1", "--window-seconds", "5", "--warmup-seconds", "5",
                           "--broker-restart-every", "15", "--cloud-outage-every", "20", "--outage-seconds", "5",
                           "--drain-seconds", "15", "--timeout", "150", "--workdir", str(tmp_path / "work"),
                           "--out", str(out)], capture_output=True, text=True, timeout=200, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert not r["errors"] and not r["interrupted"]
    assert {"command", "started_utc", "finished_utc", "machine", "config", "method", "agent_command", "cloud_command",
            "faults", "series", "windows", "summary", "targets", "accounting"} <= set(r)

    injected = [f for f in r["faults"] if f["actual_start"] is not None and f["actual_end"] is not None]
    assert sorted(f["kind"] for f in injected) == ["broker_restart", "broker_restart", "cloud_outage"]
    (outage,) = [f for f in injected if f["kind"] == "cloud_outage"]
    assert outage["actual_end"] - outage["actual_start"] >= 4.5
    assert outage["peak_pending"] > 100  # the outbox filled while the cloud was away: the fault bit

    series = r["series"]
    assert len(series) >= 30
    for s in series:
        assert {"t", "rss_mb", "fds", "threads", "cpu_pct", "buffer_pending", "outbox_mb", "p50_us", "p99_us",
                "broker_up", "cloud_up"} <= set(s)
        assert s["rss_mb"] > 10 and s["fds"] > 2 and s["threads"] >= 2 and s["buffer_pending"] is not None
    assert [s["t"] for s in series] == sorted(s["t"] for s in series)
    assert any(not s["cloud_up"] for s in series) and any(not s["broker_up"] for s in series)
    assert any(s["p99_us"] for s in series)

    full = [w for w in r["windows"] if not w["partial"]]
    assert len(full) >= 6
    assert all(w["count"] > 0 and 0 < w["p50_us"] <= w["p99_us"] for w in full)

    fig = r["summary"]["figures"]
    for key in ("rss_mb", "fds", "threads", "cpu_pct", "buffer_pending", "p50_us", "p99_us"):
        assert fig[key]["baseline"] is not None and fig[key]["end"] is not None, key
    assert fig["rss_mb"]["slope_per_hour"] is not None
    assert r["summary"]["p99"]["windows"] == len([w for w in full if w["t_start"] >= 5 - 1])

    acc = r["accounting"]
    assert acc["agent_exit_status"] == 0
    assert acc["committed"] > 3000 and acc["stored"] == acc["committed"] == acc["stored_rows"]
    assert acc["lost"] == 0 and acc["duplicated_stored"] == 0 and acc["left_in_outbox"] == 0
    assert acc["unexpected_stored"] == 0 and acc["predictions_match"] is True
    assert acc["cloud_starts"] == 2
    assert {t["target"].split(":")[0] for t in r["targets"] if t["met"] is not None} >= {"records"}
    assert "Targets (information only)" in proc.stdout and "reproduce: " in proc.stdout
