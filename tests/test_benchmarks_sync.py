"""benchmarks/sync_bench.py runs end to end on a short setting (real Mosquitto processes), so it cannot rot.
Speed is not judged; what the sync promises is: nothing lost, nothing stored twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, mosquitto_binary

pytestmark = pytest.mark.integration


def test_sync_bench_quick(tmp_path: Path) -> None:
    mosquitto_binary()  # a clear message when Mosquitto is missing
    out = tmp_path / "sync.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sync_bench.py"), "--quick", "--records", "2000",
                           "--out", str(out)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["records"] == 2000 and not r["errors"]
    assert {"append", "sync", "naive", "summary", "targets", "machine", "command", "started_utc"} <= set(r)

    a = r["append"]
    for mode in ("append_many_256", "append_flush_64"):
        assert a[mode]["records_per_s"] > 0 and a[mode]["pending_after"] == 2000
        assert a[mode]["bytes_per_record"] > a["payload_bytes_mean"]

    s = r["sync"]
    assert s["drained"] and s["records_per_s"] > 0
    assert s["lost"] == 0 and s["seq_gaps"] == 0 and s["stored"] == 2000 and s["outbox_pending_after"] == 0
    assert s["duplicates_stored"] == 0  # resends, if any, are deduplicated by the store
    assert s["duplicates_received"] >= 0 and s["batches_resent"] >= 0

    n = r["naive"]
    assert n["records_per_s"] > 0 and n["deleted_on_puback"] == 2000
    assert n["lost"] == 2000 - n["stored"] and n["lost"] >= 0
    assert r["summary"]["naive_lost"] == n["lost"] and r["summary"]["sync_lost"] == 0
    assert "Targets" in proc.stdout
