"""`edge-runtime demo`: the whole story on one machine, from a checkout after `make demo`.

It starts `cloud-sync serve` with its embedded broker and dashboard, and three agents that the demo
feeds the digits test set through their stdin at a steady rate. Midway, device 3's inputs dim to 60%
(a camera meeting dusk): its drift monitor raises an alarm, the cloud's rule fires and asks for
retraining; the retraining command here re-signs the sample model as version 2 (a stand-in for real
training, which the tabular example `models/retrain_tabular.py` shows); the demo then rolls version 2
out through a shadow cohort and a canary to the fleet. At the end the agents stop (draining their
outboxes) and a summary is printed: latencies, alarms, the rollout's stages, and records written on the
devices against records stored in the cloud (nothing lost).

Everything runs as real processes talking MQTT; the demo only feeds inputs and reads the cloud's API.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import EdgeRuntimeError

REPO = Path(__file__).resolve().parent.parent
DEVICES = ("demo-1", "demo-2", "demo-3")
RULES = """
[[rule]]
name = "drift-alarm"
metric = "drift_alarm_devices"
op = ">="
threshold = 1
model = "digits_mlp"
severity = "warning"
retrain = true
"""
PLAN = """
name = "digits-v2"
model = "digits_mlp"
automation_level = 5

[defaults]
min_samples = 100
min_time_s = 2

[shadow]
percent = 34

[[step]]
percent = 34

[[step]]
percent = 100

[gates]
shadow_agreement_min = 0.95
p99_latency_ms_max = 250.0
error_rate_max = 0.01
"""


def add_parser(sub: Any) -> None:
    d = sub.add_parser("demo", help="the whole story on one machine: fleet, drift, retraining, rollout",
                       description=(__doc__ or "").split("\n\n")[1].replace("\n", " "))
    d.add_argument("--duration", type=float, default=120.0, metavar="S", help="stop after S seconds (default 120)")
    d.add_argument("--rate", type=float, default=60.0, metavar="HZ", help="inputs per second per device (default 60)")
    d.add_argument("--headless", action="store_true", help="no dashboard left running at the end (CI)")
    d.add_argument("--workdir", metavar="DIR", help="keep everything here (default: a temporary directory)")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api(url: str, path: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class _Feeder(threading.Thread):
    """Writes one JSON line per input to an agent's stdin at ``rate`` per second; ``dim`` scales the
    inputs from the moment it is set."""

    def __init__(self, proc: subprocess.Popen, rows: np.ndarray, rate: float) -> None:
        super().__init__(daemon=True)
        self.proc, self.rows, self.period = proc, rows, 1.0 / rate
        self.dim = 1.0
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        t = time.monotonic()
        assert self.proc.stdin is not None
        while not self.stop.is_set():
            row = self.rows[self.sent % len(self.rows)] * self.dim
            try:
                self.proc.stdin.write(json.dumps([round(float(v), 3) for v in row]) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                return
            self.sent += 1
            t += self.period
            self.stop.wait(max(0.0, t - time.monotonic()))


def cmd_demo(args: argparse.Namespace) -> int:
    if not (REPO / "models" / "build_all.py").is_file():
        raise EdgeRuntimeError("the demo runs from a checkout of edge-runtime (it builds the sample models "
                               "with models/build_all.py): `make demo`")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="edge-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t_start = time.monotonic()
    models = work / "models"
    if not (models / "digits_mlp.onnx").is_file():
        _say("building the sample digits model")
        subprocess.run([py, str(REPO / "models" / "build_digits_mlp.py"), "--out", str(models)], check=True,
                       capture_output=True)
    cli = [py, "-m", "edge_runtime.cli"]
    _say("signing release 1 of digits_mlp (with its drift reference and test accuracy)")
    subprocess.run([*cli, "keygen", "--out", str(work / "release"), "--force"], check=True, capture_output=True)
    v1 = work / "digits_mlp-1"
    if not v1.exists():
        subprocess.run([*cli, "bundle", "create", "--model", str(models / "digits_mlp.onnx"), "--name", "digits_mlp",
                        "--version", "1", "--key", str(work / "release"), "--out", str(v1), "--reference",
                        str(models / "digits_mlp.train_x.npy"), "--test-data", str(models / "digits_mlp.test_x.npy"),
                        "--test-labels", str(models / "digits_mlp.test_y.npy")], check=True, capture_output=True)
    v2 = work / "digits_mlp-2.tar"
    v2.unlink(missing_ok=True)
    # The cloud runs the retraining command with the request file as its last argument; this stand-in
    # reads nothing from it and signs the sample model as version 2.
    script = work / "retrain.sh"
    script.write_text("#!/bin/sh\n# demo retraining: the request is in $1\nexec " + " ".join(shlex.quote(a) for a in [
        py, "-m", "edge_runtime.cli", "bundle", "create", "--model", str(models / "digits_mlp.onnx"), "--name",
        "digits_mlp", "--version", "2", "--key", str(work / "release"), "--archive", "--out", str(v2), "--reference",
        str(models / "digits_mlp.train_x.npy"), "--test-data", str(models / "digits_mlp.test_x.npy"),
        "--test-labels", str(models / "digits_mlp.test_y.npy")]) + "\n")
    script.chmod(0o755)
    retrain = str(script)
    (work / "rules.toml").write_text(RULES)
    mqtt_port, http_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{http_port}"
    procs: list[subprocess.Popen] = []
    feeders: list[_Feeder] = []
    summary: dict[str, Any] = {"dashboard": url, "workdir": str(work)}
    try:
        _say(f"cloud: embedded MQTT broker on 127.0.0.1:{mqtt_port}, dashboard on {url}/")
        cloud = subprocess.Popen([py, "-m", "cloud_sync.cli", "serve", "--embedded-broker", "--port", str(mqtt_port),
                                  "--db", str(work / "cloud.db"), "--http", f"127.0.0.1:{http_port}", "--rules",
                                  str(work / "rules.toml"), "--bundle", str(v1), "--retrain-command", retrain,
                                  "--bundles-dir", str(work / "cloud-bundles"), "--stats-interval", "0",
                                  "--log-level", "warning"], stdout=subprocess.DEVNULL,
                                 stderr=(work / "cloud.log").open("w"))
        procs.append(cloud)
        _wait(lambda: _try(lambda: _api(url, "/healthz")), 30, "the cloud to start")
        rows = np.load(models / "digits_mlp.test_x.npy")
        for dev in DEVICES:
            p = subprocess.Popen(
                [*cli, "run", "--model", str(v1), "--key", str(work / "release.pub"), "--source", "stdin",
                 "--broker", f"mqtt311://127.0.0.1:{mqtt_port}", "--device-id", dev, "--buffer",
                 str(work / f"{dev}.outbox.db"), "--state-dir", str(work / f"{dev}-state"), "--metrics-interval", "2",
                 "--telemetry-interval", "1", "--status-interval", "0", "--report-json", str(work / f"{dev}.json"),
                 "--drain-timeout", "20", "--log-level", "warning"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=(work / f"{dev}.log").open("w"), text=True)
            procs.append(p)
            f = _Feeder(p, rows, args.rate)
            feeders.append(f)
            f.start()
        _wait(lambda: len([d for d in _try(lambda: _api(url, "/api/v1/devices")) or [] if d["state"] == "online"])
              == len(DEVICES), 60, "three devices online")
        _say(f"{len(DEVICES)} devices online, streaming {args.rate:g} inputs/s each")
        deadline = t_start + args.duration
        dim_at = time.monotonic() + min(10.0, args.duration / 6)
        rollout_id = None
        stages: list[str] = []
        last_line = 0.0
        while time.monotonic() < deadline:
            now = time.monotonic()
            if feeders[-1].dim == 1.0 and now >= dim_at:
                feeders[-1].dim = 0.6
                _say(f"{DEVICES[-1]}: its inputs dim to 60% (night falls on one camera)")
                summary["dimmed_at_s"] = round(now - t_start, 1)
            if rollout_id is None and v2.is_file():  # bundle create writes it whole (a rename)
                _say("retraining produced digits_mlp 2: rolling it out (shadow, canary, everyone)")
                r = _api(url, "/api/v1/rollouts", {"plan": PLAN, "bundle": str(v2), "by": "demo"}, timeout=120)
                rollout_id = r["id"]
                summary["rollout_started_s"] = round(now - t_start, 1)
            if rollout_id is not None:
                r = _api(url, f"/api/v1/rollouts/{rollout_id}")
                if not stages or stages[-1] != r["stage"]:
                    stages.append(r["stage"])
                    _say(f"rollout {rollout_id}: {r['state']} at {r['stage']}")
                if r["state"] in ("done", "rolled_back", "failed"):
                    summary["rollout"] = {"id": rollout_id, "state": r["state"], "stages": stages,
                                          "finished_s": round(now - t_start, 1)}
                    break
            if now - last_line >= 5:
                last_line = now
                fleet = _api(url, "/api/v1/fleet")
                alerts = _api(url, "/api/v1/alerts")
                _say(f"fleet: {fleet['devices']['online']} online, "
                     f"{sum(f.sent for f in feeders)} inputs sent, "
                     f"{sum(1 for a in alerts if a['state'] == 'firing')} alert(s) firing")
            time.sleep(0.5)
        summary.setdefault("rollout", {"id": rollout_id, "state": "not finished", "stages": stages})
        summary["alerts"] = [{"rule": a["rule"], "subject": a["subject"], "state": a["state"]}
                             for a in _api(url, "/api/v1/alerts")]
        summary["devices"] = {d["id"]: {"version": (d.get("models") or [{}])[0].get("version"),
                                        "p99_ms": d.get("p99_ms"), "drift_alarm": bool(d.get("alarm"))}
                              for d in _api(url, "/api/v1/devices")}
        _say("stopping the devices (their outboxes drain to the cloud)")
        for f in feeders:
            f.stop.set()
        for p in procs[1:]:
            p.send_signal(signal.SIGTERM)
        for p in procs[1:]:
            p.wait(60)
        reports = {dev: json.loads((work / f"{dev}.json").read_text()) for dev in DEVICES}
        summary["records"] = _records(work, reports)
        summary["latency_us"] = {dev: r["pipelines"][0]["latency_us"]["latency"] for dev, r in reports.items()}
        summary["drift_alarms"] = {dev: len(r["pipelines"][0].get("drift", {}).get("alarms", []))
                                   + len(r["pipelines"][0].get("drift", {}).get("earlier_versions_alarms", []))
                                   for dev, r in reports.items()}
    except BaseException:
        for p in procs[:1]:  # the demo failed: the cloud goes too (the agents go below)
            p.terminate()
        raise
    finally:
        for f in feeders:
            f.stop.set()
        for p in procs[1:]:
            if p.poll() is None:
                p.kill()
    ok = summary["records"]["lost"] == 0 and summary["rollout"]["state"] == "done"
    summary["ok"] = ok
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    if args.headless:
        procs[0].send_signal(signal.SIGTERM)
        procs[0].wait(30)
    else:
        _say(f"the dashboard stays up at {url}/ (Ctrl-C to stop)")
        try:
            procs[0].wait()
        except KeyboardInterrupt:
            procs[0].send_signal(signal.SIGTERM)
            procs[0].wait(30)
    if args.workdir is None and args.headless:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def _records(work: Path, reports: dict[str, Any]) -> dict[str, Any]:
    """Records each device committed to its outbox, against those the cloud stored, per device."""
    from cloud_sync.store import open_store

    store = open_store(work / "cloud.db", create=False)
    try:
        stored = {dev: len(store.records(dev)) for dev in DEVICES}
    finally:
        store.close()
    pending = {dev: r["uplink"]["pending"] for dev, r in reports.items()}
    written = {dev: r["uplink"]["buffer"].get("committed", r["uplink"]["buffer"].get("written"))
               for dev, r in reports.items()}
    return {"stored_in_cloud": stored, "left_in_outboxes": pending, "written_on_devices": written,
            "lost": sum(pending.values())}


def _print_summary(s: dict[str, Any]) -> None:
    out = sys.stdout
    print("\nedge-runtime demo: summary", file=out)
    for dev, lat in s["latency_us"].items():
        d = s["devices"].get(dev, {})
        print(f"  {dev}: version {d.get('version')}, latency p50 {lat.get('p50')} us, p99 {lat.get('p99')} us, "
              f"drift alarms {s['drift_alarms'][dev]}", file=out)
    r = s["rollout"]
    print(f"  rollout {r.get('id')}: {r['state']} via {' -> '.join(r.get('stages') or [])}", file=out)
    alerts = ", ".join(f"{a['rule']} on {a['subject']} ({a['state']})" for a in s["alerts"]) or "none"
    print(f"  alerts: {alerts}", file=out)
    rec = s["records"]
    print(f"  records stored in the cloud {rec['stored_in_cloud']}, left in outboxes {rec['left_in_outboxes']}: "
          f"{rec['lost']} lost", file=out)
    print(f"  dashboard: {s['dashboard']}/   files: {s['workdir']}", file=out)


def _try(fn: Any) -> Any:
    try:
        return fn()
    except (OSError, ValueError):
        return None


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise EdgeRuntimeError(f"demo: timed out waiting for {what}")
        time.sleep(0.3)


if os.name != "posix":  # pragma: no cover - the demo's processes use POSIX signals
    raise ImportError("the demo needs a POSIX system")
