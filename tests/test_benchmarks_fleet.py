"""benchmarks/fleet_sim.py runs end to end on its --quick setting (a real Mosquitto, real `cloud-sync serve`
processes on one SQLite store, simulated devices in worker processes, a rollout through the API), so it
cannot rot. Speed is not judged; what the sync promises is: nothing lost, nothing stored twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, mosquitto_binary

pytestmark = pytest.mark.integration


def test_fleet_sim_quick(tmp_path: Path) -> None:
    mosquitto_binary()  # a clear message when Mosquitto is missing
    out = tmp_path / "fleet.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fleet_sim.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=170, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert not r["errors"], r["errors"]
    assert {"runs", "rollout", "targets", "latency_vs_devices", "settings", "measures", "machine", "command",
            "started_utc", "finished_utc"} <= set(r)
    assert "Targets (information only)" in proc.stdout and "Reproduce:" in proc.stdout

    runs = {run["case"]: run for run in r["runs"]}
    assert set(runs) == {"echo", "serve-x1-sqlite", "serve-x2-sqlite"}
    for run in runs.values():
        lat = run["latency_ms"]
        assert run["devices"] == 20 and run["drained"] and run["latency_unacked_at_end"] == 0
        assert lat["n"] > 0 and 0 < lat["p50"] <= lat["p99"] <= lat["max"]
        assert set(lat["quantiles"]) == {"0.5", "0.75", "0.9", "0.95", "0.99", "0.999"}
        assert run["batches_acked_per_s"] > 0 and run["records_acked_per_s"] > run["batches_acked_per_s"]
        procs = run["usage"]["processes"]
        assert procs["mosquitto"]["cpu_percent"] is not None and procs["mosquitto"]["rss_mb"] > 0
        assert run["cloud_rss_mb"] > 0 and run["devices_cpu_percent"] is not None
    assert runs["echo"]["lost"] is None and runs["echo"]["unacked_in_baseline"] == 0

    for case, workers in (("serve-x1-sqlite", 1), ("serve-x2-sqlite", 2)):
        run = runs[case]
        sc = run["store_check"]
        assert run["workers"] == workers and run["store"] == "sqlite"
        assert run["lost"] == 0 and run["duplicated"] == 0 and run["undelivered"] == 0
        assert sc["stored"] == sc["generated"] > 0
        assert sc["kinds_stored"] == sc["kinds_sent"] and {"p", "m", "d"} <= set(sc["kinds_sent"])
        assert all(t["rows"] == t["sent"] for t in sc["fan_out_tables"].values()), sc["fan_out_tables"]
        assert len(run["records_per_worker"]) == workers and all(n > 0 for n in run["records_per_worker"])
        assert sum(run["records_per_worker"]) >= sc["generated"]  # plus the readiness probe's records
        assert run["p99_ratio"] > 0 and run["records_committed_per_s"] > 0
        assert all(s["exit_code"] == 0 and s["errors_logged"] == 0 for s in run["responders"])

    ro = r["rollout"]
    assert ro["final_state"] == "done" and ro["devices_active"] == ro["devices_on_candidate"] == 20
    assert ro["lost"] == 0 and ro["duplicated"] == 0 and ro["fetch_failures"] == 0
    t = ro["seconds_to_active"]
    assert 0 < t["10%"] <= t["50%"] <= t["100%"] and ro["seconds_to_done"] >= ro["seconds_to_first_order"]
    assert [s["stage"] for s in ro["stages"]][-1] == "done" and ro["plan_floor_s"] > 0

    assert [c["devices"] for c in r["latency_vs_devices"]["serve-x2-sqlite"]] == [20]
    assert all(t["met"] for t in r["targets"] if "lost" in t["target"])
