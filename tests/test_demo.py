"""`edge-runtime demo --headless`, as CI runs it: the whole story (three devices, drift on one, an alert
that asks for retraining, the new version rolled out through shadow and canary, nothing lost) in one
command, in well under two minutes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_headless_demo_tells_the_whole_story(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "demo", "--headless", "--duration", "100",
                           "--json", "--workdir", str(tmp_path / "demo")], capture_output=True, text=True,
                          timeout=170, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads(proc.stdout)
    assert s["ok"] and s["rollout"]["state"] == "done"
    assert s["rollout"]["stages"][0] == "shadow" and s["rollout"]["stages"][-1] == "done"
    assert {d["version"] for d in s["devices"].values()} == {"2"}
    assert s["drift_alarms"]["demo-3"] >= 1 and s["drift_alarms"]["demo-1"] == 0
    assert any(a["rule"] == "drift-alarm" for a in s["alerts"])
    assert s["records"]["lost"] == 0 and all(n > 100 for n in s["records"]["stored_in_cloud"].values())
    assert "demo-3: its inputs dim to 60%" in proc.stderr and "rolling it out" in proc.stderr
