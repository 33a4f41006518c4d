"""Model rollouts, the cloud's side (cloud_sync.rollouts), over a real Mosquitto: a hub on SQLite with a
real MQTT transport publishes the bundle and the retained per-device orders; a small simulator stands in
for ten agents (it obeys its cmd/rollout orders and answers with real protocol status and metric records
carrying the ``rollout`` object); the planner moves the rollout on every tick of a test clock.

Also: approvals through the JSON API and the page, persistence across a hub restart, the CLI against a
running server, and what a start refuses."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloud_sync import planner as pl
from cloud_sync.cli import main as cli_main
from cloud_sync.distribute import PublishWindow
from cloud_sync.hub import Hub
from cloud_sync.rollouts import RolloutConflict
from edge_runtime.adapters.mqtt_transport import BrokerConfig, MqttTransport
from edge_runtime.core import protocol as p
from edge_runtime.errors import BundleError

pytestmark = pytest.mark.integration

T0 = 1_764_167_000_000
MODEL = "digits_mlp"
DEVICES = [f"dev-{i:02d}" for i in range(10)]
TOKEN = "r0llout-token"
SINKS = """
[sinks.bus]
type = "mqtt"
topic = "alerts/fleet"
"""


def plan_text(level: int = 5, *, tags: str = "", model: str = MODEL) -> str:
    return f"""name = "digits-v4"
model = "{model}"
automation_level = {level}

[target]
tags = [{tags}]

[defaults]
min_samples = 100
min_time_s = 0

[shadow]
percent = 30

[[step]]
percent = 10

[[step]]
percent = 50

[[step]]
percent = 100

[gates]
shadow_agreement_min = 0.9
p99_latency_ms_max = 50.0
error_rate_max = 0.05
"""


def make_bundle(root: Path, version: str = "4", name: str = MODEL) -> Path:
    """A bundle directory as far as the cloud reads one (manifest name and version, its files)."""
    d = root / f"bundle-{name}-{version}"
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(bytes(range(256)) * 40)
    (d / "manifest.json").write_text(json.dumps({"schema": "edge-runtime.bundle/1", "name": name, "version": version,
                                                 "metrics": {"test": {"accuracy": 0.97}},
                                                 "files": {"model.onnx": {"size": 10240}}}))
    return d


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


def transport(host: str, port: int, client_id: str, **kw: Any) -> MqttTransport:
    t = MqttTransport(BrokerConfig(host, port, client_id=client_id), **kw)
    return t


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Cloud:
    """The hub's MQTT side, driven by the test: messages queue up and are handled on :meth:`pump`."""

    def __init__(self, host: str, port: int) -> None:
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.window = PublishWindow()
        self.t = transport(host, port, "cloud", on_message=lambda tp, pl_: self.inbox.put((tp, pl_)),
                           on_publish_result=self.window.on_result)
        for kind in ("records", "status"):  # records first: a retained status then proves both are live
            self.t.subscribe(p.fleet_subscription(kind), qos=1)
        self.orders = 0
        self.hub: Hub | None = None
        self.t.start()
        assert self.t.wait_connected(5)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        if topic.endswith("/cmd/rollout"):
            self.orders += 1
        return self.t.publish(topic, payload, qos=qos, retain=retain) is not None

    def make_hub(self, db: Path, clock: Clock, tmp: Path, rules: str | None = SINKS) -> Hub:
        self.hub = Hub.for_tests(db, rules, publish=self.publish, clock=clock, bundle_transport=self.t,
                                 bundle_window=self.window, bundles_dir=tmp / "bundles")
        return self.hub

    def pump(self, until: Callable[[], bool], timeout: float = 5.0) -> None:
        assert self.hub is not None
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError("the cloud did not receive what the devices sent")
            try:
                topic, payload = self.inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            for t, body, qos, retain in self.hub.handle(topic, payload, int(self.hub.clock() * 1000)):
                self.t.publish(t, body, qos=qos, retain=retain)

    def stop(self) -> None:
        self.t.stop()


class Agents:
    """Ten devices running digits_mlp 3, in one MQTT client: they obey rollout orders as agents would
    (role, state, samples since the role began, shadow statistics) and report metric snapshots."""

    def __init__(self, host: str, port: int, clock: Clock) -> None:
        self.clock = clock
        self.orders: queue.Queue[p.Command] = queue.Queue()
        self.received = 0
        self.probe = threading.Event()
        self.t = transport(host, port, "agents", on_message=self._on)
        self.t.subscribe("edge/v1/+/cmd/rollout", qos=1)
        self.agreement = 0.99
        self.dev = {d: {"version": "3", "previous": "3", "rollout_id": None, "state": "idle", "role": "baseline",
                        "candidate": None, "since_ms": clock.ms, "samples": 0, "seq": 0, "inputs": 0,
                        "command_id": None, "reported_version": None} for d in DEVICES}
        self.last_order: dict[str, dict[str, Any]] = {}
        self.t.start()
        assert self.t.wait_connected(5)
        wait_for(self._probed, what="the agents' subscription")

    def _probed(self) -> bool:
        self.t.publish("edge/v1/probe/cmd/rollout", b"probe", qos=1)
        return self.probe.wait(0.2)

    def _on(self, topic: str, payload: bytes) -> None:
        try:
            cmd = p.decode(topic, payload)
        except p.ProtocolError:
            self.probe.set()
            return
        self.received += 1
        self.orders.put(cmd)  # type: ignore[arg-type]

    def wait_orders(self, n: int) -> None:
        wait_for(lambda: self.received >= n, what=f"{n} orders")

    def apply(self) -> None:
        while True:
            try:
                cmd = self.orders.get_nowait()
            except queue.Empty:
                return
            d = self.dev[cmd.device_id]
            prm = cmd.params
            self.last_order[cmd.device_id] = prm
            if d["command_id"] == cmd.command_id:
                continue
            d["command_id"] = cmd.command_id
            role = prm["role"]
            before = d["role"]
            if role == "shadow":
                d.update(rollout_id=prm["rollout_id"], state="shadow", candidate=prm["bundle"]["version"])
            elif role == "candidate":
                d.update(rollout_id=prm["rollout_id"], state="active", candidate=prm["bundle"]["version"],
                         version=prm["bundle"]["version"])
            elif d["state"] in ("shadow", "active") and d["rollout_id"] == prm["rollout_id"]:
                d.update(state="rolled_back", version=d["previous"])
            d["role"] = role
            if role != before:
                d.update(since_ms=self.clock.ms, samples=0)

    def report(self) -> int:
        """One metric snapshot per device (and a status where the served version changed); how many
        record batches were sent."""
        now = self.clock.ms
        for device_id, d in self.dev.items():
            if d["reported_version"] != d["version"]:
                st = p.Status(device_id, True, "b1", now, "0.1.0", (p.ModelStatus(MODEL, d["version"], "active"),))
                self.t.publish(st.topic, st.to_wire(), qos=1, retain=True)
                d["reported_version"] = d["version"]
            d["samples"] += 150
            d["inputs"] += 150
            d["seq"] += 1
            shadow = None
            if d["role"] == "shadow":
                shadow = {"n": d["samples"], "agreement_rate": self.agreement, "delta_mean": 0.01,
                          "latency_p50_ms": 2.0, "latency_p99_ms": 6.0, "errors": 0, "error_rate": 0.0}
            rollout = {"rollout_id": d["rollout_id"], "state": d["state"], "role": d["role"],
                       "candidate_version": d["candidate"], "since_ms": d["since_ms"], "samples": d["samples"],
                       "shadow": shadow, "reason": ""}
            payload = {"pipeline": MODEL, "model_version": d["version"], "window_s": 1.0, "inputs": d["inputs"],
                       "predictions": d["inputs"], "errors": {}, "low_confidence": 0, "null_outputs": 0,
                       "throughput_per_s": 150.0, "latency_us": {"p50": 2000.0, "p99": 5000.0}, "rollout": rollout}
            seq = d["seq"]
            batch = p.RecordBatch(device_id, "b1", f"b1:{seq}-{seq}", (p.Record(seq, "m", now, payload),))
            self.t.publish(batch.topic, batch.to_wire(), qos=1)
        return len(self.dev)

    def stop(self) -> None:
        self.t.stop()


def retained(host: str, port: int, pattern: str, n: int | None, timeout: float = 3.0) -> dict[str, bytes]:
    """The retained messages on ``pattern`` as a fresh subscriber sees them (``n``: how many to wait for;
    None: whatever arrives within half a second)."""
    got: dict[str, bytes] = {}
    t = transport(host, port, f"peek-{time.monotonic_ns()}", on_message=got.__setitem__)
    t.subscribe(pattern, qos=1)
    t.start()
    try:
        assert t.wait_connected(5)
        if n is None:
            time.sleep(0.5)
        else:
            wait_for(lambda: len(got) >= n, timeout, f"{n} retained messages on {pattern}")
    finally:
        t.stop()
    return {k: v for k, v in got.items() if v}


def retained_roles(host: str, port: int) -> dict[str, str]:
    msgs = retained(host, port, "edge/v1/+/cmd/rollout", len(DEVICES))
    return {p.parse_topic(t).device_id: p.decode(t, b).params["role"] for t, b in msgs.items()}  # type: ignore[union-attr]


@pytest.fixture
def env(mosquitto: tuple[str, int], tmp_path: Path):
    host, port = mosquitto
    clock = Clock(T0)
    cloud = Cloud(host, port)
    agents = Agents(host, port, clock)
    hub = cloud.make_hub(tmp_path / "cloud.db", clock, tmp_path)
    agents.report()
    cloud.pump(lambda: len(hub.devices()) == len(DEVICES) and hub.ingest.stats.batches >= len(DEVICES))
    batches = [len(DEVICES)]

    def step(until: Callable[[], bool], steps: int = 12) -> None:
        """Agents obey and report, the cloud ingests and ticks, until ``until()``."""
        for _ in range(steps):
            agents.apply()
            batches[0] += agents.report()
            h = cloud.hub
            assert h is not None
            cloud.pump(lambda h=h: h.ingest.stats.batches >= batches[0])
            clock.ms += 1000
            h.tick(clock.ms)
            agents.wait_orders(cloud.orders)
            if until():
                agents.apply()
                return
        raise AssertionError(f"not reached in {steps} steps: {[r['state'] + '@' + r['stage'] for r in h.rollouts()]}")

    env = {"host": host, "port": port, "clock": clock, "cloud": cloud, "agents": agents, "hub": hub, "step": step,
           "tmp": tmp_path, "batches": batches}
    try:
        yield env
    finally:
        agents.stop()
        cloud.stop()
        if cloud.hub is not None:
            cloud.hub.close()


def start(env: dict[str, Any], level: int = 5) -> str:
    hub: Hub = env["cloud"].hub
    detail = hub.rollouts_service.start(plan_text(level), make_bundle(env["tmp"]), by="ana")
    env["agents"].wait_orders(env["cloud"].orders)
    return str(detail["id"])


def state(hub: Hub, rid: str) -> tuple[str, str]:
    r = hub.rollouts_service.get(rid)
    return r.state, r.stage


# -- the happy path, stage by stage --------------------------------------------------------------------

def test_a_level_5_rollout_moves_every_stage_through_retained_orders(env: dict[str, Any]) -> None:
    hub: Hub = env["hub"]
    host, port = env["host"], env["port"]
    rid = start(env)
    assert rid == "digits-v4-r1"
    detail = hub.rollouts_service.detail(rid)
    assert detail["previous_version"] == "3" and detail["candidate_version"] == "4"
    bundle_id = detail["bundle"]["bundle_id"]
    assert bundle_id.startswith("digits_mlp-4-")
    # The bundle is retained for every device; its manifest names the archive the orders name.
    (manifest_topic, body), = retained(host, port, p.bundle_subscription(), 1).items()
    manifest = p.BundleManifest.from_wire(body, manifest_topic)
    assert (manifest.bundle_id, manifest.name, manifest.version) == (bundle_id, MODEL, "4")

    plan = pl.parse_plan(plan_text(5))
    devs = [pl.Device(d, frozenset(), frozenset({MODEL})) for d in DEVICES]
    seen: dict[str, dict[str, str]] = {}
    for stage in ("shadow", "step-0", "step-1", "step-2"):
        if stage != "shadow":
            env["step"](lambda s=stage: state(hub, rid) == ("running", s))
        roles = retained_roles(host, port)
        assert roles == pl.assign(devs, plan, stage, rid), stage
        seen[stage] = roles
    orders = {d: env["agents"].last_order[d] for d in DEVICES}
    assert {o["rollout_id"] for o in orders.values()} == {rid}
    assert orders["dev-00"]["bundle"] == {"bundle_id": bundle_id, "name": MODEL, "version": "4",
                                          "sha256": manifest.sha256, "size": manifest.size}
    assert orders["dev-00"]["previous_version"] == "3" and orders["dev-00"]["level"] == 5
    assert "review" not in orders["dev-00"]
    counts = {s: Counter(r.values()) for s, r in seen.items()}
    assert counts["shadow"]["shadow"] >= 1 and "candidate" not in counts["shadow"]
    assert 1 <= counts["step-0"]["candidate"] <= counts["step-1"]["candidate"] < 10
    assert counts["step-2"] == {"candidate": 10}
    cand = [{d for d, r in seen[s].items() if r == "candidate"} for s in ("step-0", "step-1", "step-2")]
    assert cand[0] <= cand[1] <= cand[2]
    env["step"](lambda: state(hub, rid) == ("done", "done"))
    # Done: the last orders stay retained as the desired state, and so does the bundle.
    assert set(retained_roles(host, port).values()) == {"candidate"}
    assert retained(host, port, p.bundle_subscription(), 1)
    summary, = hub.rollouts()
    assert summary["cohorts"] == {"shadow": 0, "candidate": 10, "baseline": 0}
    assert [g["name"] for g in summary["gates"]] == ["install", "p99_latency_ms", "error_rate"]
    assert all(g["status"] == "pass" for g in summary["gates"])
    whats = [e["what"] for e in hub.rollouts_service.detail(rid)["events"]]
    assert whats == ["create", "advance", "advance", "advance", "finish"]
    # Every device row shows what its agent reports about the rollout.
    row = hub.device("dev-03")
    assert row is not None
    rep = row["pipelines"][MODEL]["rollout"]
    assert rep["rollout_id"] == rid and rep["role"] == "candidate" and rep["state"] == "active"


# -- gates that fail -----------------------------------------------------------------------------------

def test_low_shadow_agreement_rolls_back_by_itself_at_level_5(env: dict[str, Any]) -> None:
    hub: Hub = env["hub"]
    env["agents"].agreement = 0.5
    rid = start(env)
    env["step"](lambda: state(hub, rid)[0] == "rolled_back")
    detail = hub.rollouts_service.detail(rid)
    assert [e["what"] for e in detail["events"]] == ["create", "gate_failed", "rolled_back"]
    gate = next(g for g in detail["gates"] if g["name"] == "shadow_agreement")
    assert gate["status"] == "fail" and gate["value"] == 0.5
    assert set(retained_roles(env["host"], env["port"]).values()) == {"baseline"}
    assert {d["state"] for d in env["agents"].dev.values()} <= {"idle", "rolled_back"}
    # The bundle is withdrawn (in the background).
    wait_for(lambda: not retained(env["host"], env["port"], p.bundle_subscription(), None), 5, "the withdrawal")
    assert detail["bundle"]["withdrawn"] is True


def test_low_shadow_agreement_waits_for_a_person_at_level_3(env: dict[str, Any], caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    pytest.importorskip("starlette", reason="the web extra is not installed")
    pytest.importorskip("httpx2", reason="Starlette's TestClient needs httpx2 (dev extra)")
    from starlette.testclient import TestClient

    from cloud_sync.web import create_app

    hub: Hub = env["hub"]
    notes: list[dict[str, Any]] = []
    listener = transport(env["host"], env["port"], "ops", on_message=lambda t, b: notes.append(json.loads(b)))
    listener.subscribe("alerts/fleet", qos=1)
    listener.start()
    try:
        assert listener.wait_connected(5)
        time.sleep(0.2)
        env["agents"].agreement = 0.5
        rid = start(env, level=3)
        with caplog.at_level("WARNING", logger="cloud_sync.hub"):
            env["step"](lambda: state(hub, rid)[0] == "waiting_approval")
        wait_for(lambda: bool(notes), what="the notification on the MQTT sink")
    finally:
        listener.stop()
    assert notes[0]["type"] == "rollout" and notes[0]["decision"] == "request_approval"
    assert notes[0]["pending_approval"]["to_stage"] == "step-0"
    assert any("waits for approval" in r.getMessage() for r in caplog.records)
    pending = hub.rollouts_service.detail(rid)["pending_approval"]
    assert pending["why"] == "gate_failed" and pending["to_stage"] == "step-0"

    web = TestClient(create_app(hub, token=TOKEN), base_url="http://127.0.0.1", client=("127.0.0.1", 50123))
    page = web.get("/rollouts").text
    from tests.test_web import assert_only_our_markup

    assert_only_our_markup(page)
    assert f'data-action="approve" data-id="{rid}"' in page and f'data-action="reject" data-id="{rid}"' in page
    assert "shadow_agreement 0.5 &gt;= 0.9: fail" in page and "waiting_approval" in page
    assert web.post(f"/api/v1/rollouts/{rid}/approve", json={"by": "ana"}).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = web.post(f"/api/v1/rollouts/{rid}/approve", json={"by": "ana"}, headers=auth)
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["stage"]) == ("running", "step-0")
    again = web.post(f"/api/v1/rollouts/{rid}/approve", json={"by": "ana"}, headers=auth)
    assert again.status_code == 409 and "cannot approve" in again.json()["message"]
    assert web.post("/api/v1/rollouts/nope/approve", json={"by": "ana"}, headers=auth).status_code == 404
    assert web.post(f"/api/v1/rollouts/{rid}/bogus", json={"by": "ana"}, headers=auth).status_code == 404
    env["agents"].wait_orders(env["cloud"].orders)
    roles = retained_roles(env["host"], env["port"])
    plan = pl.parse_plan(plan_text(3))
    assert roles == pl.assign([pl.Device(d, frozenset(), frozenset({MODEL})) for d in DEVICES], plan, "step-0", rid)
    events = hub.rollouts_service.detail(rid)["events"]
    assert [(e["actor"], e["what"]) for e in events] == [("planner", "create"), ("planner", "ask"),
                                                         ("ana", "approve")]
    body = web.get(f"/api/v1/rollouts/{rid}").json()
    assert {a["device_id"] for a in body["assignment"]} == set(DEVICES)
    assert body["plan"]["automation_level"] == 3 and body["last_evaluation"] is not None


# -- persistence -------------------------------------------------------------------------------------

def test_a_hub_restart_mid_rollout_picks_it_up_where_it_was(env: dict[str, Any]) -> None:
    hub: Hub = env["hub"]
    rid = start(env)
    env["step"](lambda: state(hub, rid) == ("running", "step-0"))
    before = hub.rollouts_service.detail(rid)
    reports = {d: hub.device(d)["pipelines"][MODEL]["rollout"] for d in DEVICES}  # type: ignore[index]
    orders = env["cloud"].orders
    hub.close()
    again = env["cloud"].make_hub(env["tmp"] / "cloud.db", env["clock"], env["tmp"])
    env["batches"][0] = 0   # the new hub counts its own batches
    assert state(again, rid) == ("running", "step-0")
    after = again.rollouts_service.detail(rid)
    for key in ("assignment", "events", "bundle", "stage_started_ms", "cohorts"):
        strip = (lambda v: [{k: x for k, x in a.items() if k not in ("reported", "device_state", "serving_version")}
                            for a in v]) if key == "assignment" else (lambda v: v)
        assert strip(after[key]) == strip(before[key]), key
    # The fleet view came back from the store, the devices' reports included; nothing is ordered twice.
    assert {d: again.device(d)["pipelines"][MODEL]["rollout"] for d in DEVICES} == reports  # type: ignore[index]
    assert any(r["rollout_id"] == rid and r["role"] == "shadow" for r in reports.values())
    again.tick(env["clock"].ms)
    assert env["cloud"].orders == orders
    env["step"](lambda: state(again, rid) == ("done", "done"))
    assert set(retained_roles(env["host"], env["port"]).values()) == {"candidate"}


# -- the CLI against a running server ----------------------------------------------------------------

def status_only(hub: Hub, devices: list[str], version: str = "3", tags: tuple[str, ...] = ()) -> None:
    for d in devices:
        st = p.Status(d, True, "b1", T0, "0.1.0", (p.ModelStatus(MODEL, version, "active"),), tags)
        hub.handle(st.topic, st.to_wire(), T0)


def test_cli_rollout_commands_against_a_running_server(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("uvicorn", reason="the web extra is not installed")
    from cloud_sync.web import WebServer, create_app

    sent: list[tuple[str, bytes]] = []
    hub = Hub.for_tests(tmp_path / "c.db", publish=lambda t, b, q, r: sent.append((t, b)), clock=Clock(T0),
                        bundles_dir=tmp_path / "share")
    status_only(hub, DEVICES[:4])
    web = WebServer(create_app(hub, token=TOKEN), port=0).start()
    try:
        plan_file = tmp_path / "plan.toml"
        plan_file.write_text(plan_text(1))
        tar = hub.rollouts_service._tar_of(make_bundle(tmp_path))
        common = ["--url", web.url, "--token", TOKEN, "--by", "ana"]

        def run(*args: str) -> tuple[int, str, str]:
            caplog.clear()
            code = cli_main(["rollout", *args, *common])
            out, _ = capsys.readouterr()
            return code, out, caplog.text

        code, out, _ = run("start", str(plan_file), "--bundle", str(tar))
        assert code == 0 and out.startswith("started digits-v4-r1: digits_mlp 3 -> 4, level 1, running at shadow")
        assert "on 4 device(s)" in out
        # Without a bundle transport the archive waits in the shared directory under its bundle id.
        bundle_id = hub.rollouts_service.detail("digits-v4-r1")["bundle"]["bundle_id"]
        assert (tmp_path / "share" / f"{bundle_id}.tar").read_bytes() == tar.read_bytes()
        assert len([t for t, _ in sent if t.endswith("/cmd/rollout")]) == 4
        code, out, _ = run("status")
        assert code == 0 and "digits-v4-r1" in out and "running" in out and "shadow" in out
        code, out, _ = run("status", "digits-v4-r1")
        assert code == 0 and "stages: shadow -> step-0 -> step-1 -> step-2" in out and "dev-00" in out
        code, out, _ = run("pause", "digits-v4-r1", "--reason", "lunch")
        assert code == 0 and "pause: digits-v4-r1" in out and "paused at shadow" in out
        code, out, err = run("approve", "digits-v4-r1")
        assert code == 1 and "HTTP 409" in err and "cannot approve while paused by ana" in err
        code, out, _ = run("resume", "digits-v4-r1")
        assert code == 0 and "running at shadow" in out
        code, out, _ = run("reject", "digits-v4-r1")
        assert code == 1
        code, out, _ = run("status", "digits-v4-r1", "--json")
        assert json.loads(out)["state"] == "running"
        code, out, _ = run("rollback", "digits-v4-r1", "--reason", "not today")
        assert code == 0 and "rolling_back" in out
        roles = {p.parse_topic(t).device_id: json.loads(b)["params"]["role"] for t, b in sent
                 if t.endswith("/cmd/rollout")}
        assert set(roles.values()) == {"baseline"}
        events = hub.rollouts_service.detail("digits-v4-r1")["events"]
        assert [(e["actor"], e["what"]) for e in events] == [("planner", "create"), ("ana", "pause"),
                                                             ("ana", "resume"), ("ana", "rollback")]
        assert "ana: not today" in events[-1]["why"]
        code, _, err = run("status", "nope")
        assert code == 1 and "HTTP 404" in err
    finally:
        web.stop()
        hub.close()


# -- what a start refuses ------------------------------------------------------------------------------

def test_a_start_checks_plan_bundle_and_fleet(tmp_path: Path) -> None:
    hub = Hub.for_tests(tmp_path / "c.db", clock=Clock(T0), bundles_dir=tmp_path / "share")
    try:
        svc = hub.rollouts_service
        bundle = make_bundle(tmp_path)
        with pytest.raises(pl.RolloutError, match="no device runs digits_mlp"):
            svc.start(plan_text(5), bundle, by="ana")
        status_only(hub, DEVICES[:3])
        status_only(hub, ["dev-09"], version="5")
        with pytest.raises(pl.RolloutError, match="candidate digits_mlp 4 is not newer than version 5"):
            svc.start(plan_text(5), bundle, by="ana")
        status_only(hub, ["dev-09"], version="3")
        with pytest.raises(pl.RolloutError, match=r"no device running digits_mlp has them all"):
            svc.start(plan_text(5, tags='"site:lab"'), bundle, by="ana")
        with pytest.raises(pl.RolloutError, match="is model 'digits_mlp', the plan 'digits-v4' rolls out 'other'"):
            svc.start(plan_text(5, model="other"), bundle, by="ana")
        with pytest.raises(pl.PlanError, match="automation_level"):
            svc.start(plan_text(7), bundle, by="ana")
        with pytest.raises(BundleError, match="not_a_bundle"):
            svc.start(plan_text(5), tmp_path / "missing.tar", by="ana")
        with pytest.raises(pl.RolloutError, match="'by' must name"):
            svc.start(plan_text(5), bundle, by="planner")
        first = svc.start(plan_text(5), bundle, by="ana")
        assert first["devices"] == 4 and first["state"] == "running"
        with pytest.raises(RolloutConflict, match="digits-v4-r1 \\(running\\) still moves"):
            svc.start(plan_text(5), make_bundle(tmp_path, "5"), by="ana")
        with pytest.raises(KeyError):
            svc.approve("nope", "ana")
        with pytest.raises(pl.IllegalAction, match="cannot approve"):
            svc.approve(first["id"], "ana")
    finally:
        hub.close()


def test_the_api_starts_a_rollout_and_says_why_not(tmp_path: Path) -> None:
    pytest.importorskip("starlette", reason="the web extra is not installed")
    pytest.importorskip("httpx2", reason="Starlette's TestClient needs httpx2 (dev extra)")
    from starlette.testclient import TestClient

    from cloud_sync.web import create_app

    hub = Hub.for_tests(tmp_path / "c.db", clock=Clock(T0), bundles_dir=tmp_path / "share")
    try:
        web = TestClient(create_app(hub, token=None), base_url="http://127.0.0.1", client=("127.0.0.1", 50123))
        assert "No rollouts yet." in web.get("/rollouts").text
        bundle = str(make_bundle(tmp_path))
        r = web.post("/api/v1/rollouts", json={"plan": plan_text(4), "bundle": bundle, "by": "ana"})
        assert r.status_code == 400 and "no device runs digits_mlp" in r.json()["message"]
        status_only(hub, DEVICES)
        bad = web.post("/api/v1/rollouts", json={"plan": "name = 1", "bundle": bundle})
        assert bad.status_code == 400 and "key 'name'" in bad.json()["message"]
        assert web.post("/api/v1/rollouts", json={"plan": plan_text(4)}).status_code == 400
        r = web.post("/api/v1/rollouts", json={"plan": plan_text(4), "bundle": bundle, "by": "ana"})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        assert r.json()["cohorts"]["shadow"] >= 1 and r.json()["devices"] == 10
        again = web.post("/api/v1/rollouts", json={"plan": plan_text(4), "bundle": bundle, "by": "ana"})
        assert again.status_code == 409
        listed = web.get("/api/v1/rollouts").json()
        assert [x["id"] for x in listed] == [rid] and listed[0]["level"] == 4
        assert web.post(f"/api/v1/rollouts/{rid}/rollback", json={"by": "ana"}).status_code == 400
        page = web.get("/rollouts").text
        assert rid in page and "digits_mlp" in page and "3 -&gt; 4" in page
        assert web.get("/api/v1/rollouts/nope").status_code == 404
    finally:
        hub.close()


def test_orders_the_transport_did_not_take_go_out_on_a_later_tick(tmp_path: Path) -> None:
    up = [False]
    sent: list[tuple[str, str, bool]] = []

    def publish(topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        if topic.endswith("/cmd/rollout"):
            assert qos == 1 and retain
            sent.append((p.parse_topic(topic).device_id, json.loads(payload)["command_id"], up[0]))
        return up[0]

    hub = Hub.for_tests(tmp_path / "c.db", publish=publish, clock=Clock(T0), bundles_dir=tmp_path / "share")
    try:
        svc = hub.rollouts_service
        status_only(hub, DEVICES[:3])
        detail = svc.start(plan_text(5), make_bundle(tmp_path), by="ana")
        assert [a["sent"] for a in detail["assignment"]] == [False] * 3 and svc.counters["orders_unsent"] == 3
        up[0] = True
        hub.tick(T0 + 1000)
        delivered = [(d, c) for d, c, ok in sent if ok]
        assert delivered == [(d, f"{detail['id']}.1") for d in DEVICES[:3]]
        hub.tick(T0 + 2000)
        assert len([s for s in sent if s[2]]) == 3          # nothing new to send
        svc.resend()                                         # after a reconnect: everything again, same ids
        hub.tick(T0 + 3000)
        assert [(d, c) for d, c, ok in sent if ok][3:] == delivered
    finally:
        hub.close()


def test_fleet_rows_keep_the_reported_rollout_object_typed() -> None:
    from cloud_sync.fleet import FleetState

    fleet = FleetState()

    def snapshot(seq: int, boot: str = "b1", **extra: Any) -> None:
        payload = {"pipeline": MODEL, "model_version": "3", "inputs": 10 * seq, **extra}
        fleet.observe_records("dev-1", [p.Record(seq, "m", T0 + seq, payload)], T0 + seq, boot_id=boot)

    snapshot(1, rollout={"rollout_id": "r1", "state": "shadow", "role": 5, "samples": -1, "since_ms": T0,
                         "candidate_version": "4", "reason": "x" * 1000, "extra": True,
                         "shadow": {"n": 3, "agreement_rate": "high", "latency_p99_ms": 6.5}})
    rep = fleet.device("dev-1", T0)["pipelines"][MODEL]["rollout"]  # type: ignore[index]
    assert rep == {"rollout_id": "r1", "state": "shadow", "role": None, "candidate_version": "4", "since_ms": T0,
                   "samples": None, "reason": "x" * 256,
                   "shadow": {"n": 3, "errors": None, "agreement_rate": None, "delta_mean": None, "delta_std": None,
                              "latency_p50_ms": None, "latency_p99_ms": 6.5, "error_rate": None}}
    assert fleet.bad_payload == {"m": 1}
    snapshot(2)                                      # says nothing: the boot's last report stands
    assert fleet.devices(T0)[0]["pipelines"][MODEL]["rollout"]["rollout_id"] == "r1"
    snapshot(3, rollout=None)
    assert fleet.devices(T0)[0]["pipelines"][MODEL]["rollout"] is None
    snapshot(4, rollout={"rollout_id": "r1", "role": "candidate"})
    snapshot(5, boot="b2")                           # a new boot forgets it
    assert fleet.devices(T0)[0]["pipelines"][MODEL]["rollout"] is None


def test_a_device_that_refuses_the_candidate_fails_the_install_gate(tmp_path: Path) -> None:
    clock = Clock(T0)
    hub = Hub.for_tests(tmp_path / "c.db", clock=clock, bundles_dir=tmp_path / "share")
    try:
        devices = DEVICES[:5]
        status_only(hub, devices)
        rid = hub.rollouts_service.start(plan_text(5), make_bundle(tmp_path), by="ana")["id"]
        orders = {d: hub.rollouts_service.command(d) for d in devices}
        shadows = [d for d, o in orders.items() if o is not None and o.params["role"] == "shadow"]
        others = [d for d in devices if d not in shadows]
        clock.ms += 1000
        obey_and_report(hub, others, clock.ms, 1)
        for d in shadows:   # as an agent does when anti-rollback refuses: an event naming the rollout
            ev = p.Event("rollout_refused", "warning", "version 4 is not newer than 4", ref=rid).to_payload()
            metric = {"pipeline": MODEL, "model_version": "3", "inputs": 10,
                      "rollout": {"rollout_id": None, "state": "idle", "role": "baseline", "samples": 10}}
            records = (p.Record(1, "e", clock.ms, ev), p.Record(2, "m", clock.ms, metric))
            batch = p.RecordBatch(d, "b1", "b1:1-2", records)
            hub.handle(batch.topic, batch.to_wire(), clock.ms)
        hub.tick(clock.ms)
        detail = hub.rollouts_service.detail(rid)
        assert (detail["state"], [e["what"] for e in detail["events"]]) == ("rolling_back", ["create", "gate_failed"])
        install = detail["gates"][0]
        assert install["name"] == "install" and install["status"] == "fail" and shadows[0] in install["detail"]
        assert {a["role"] for a in detail["assignment"]} == {"baseline"}
    finally:
        hub.close()


# -- the page in a browser -----------------------------------------------------------------------------

def obey_and_report(hub: Hub, devices: list[str], now: int, seq: int) -> None:
    """Every device takes the role its order names and reports a metric snapshot (no broker)."""
    svc = hub.rollouts_service
    for d in devices:
        cmd = svc.command(d)
        role = cmd.params["role"] if cmd is not None else "baseline"
        rid = cmd.params["rollout_id"] if cmd is not None and role != "baseline" else None
        version = "4" if role == "candidate" else "3"
        shadow = {"n": 500, "agreement_rate": 0.99, "latency_p99_ms": 6.0, "error_rate": 0.0} if role == "shadow" \
            else None
        payload = {"pipeline": MODEL, "model_version": version, "inputs": 500 * seq, "predictions": 500 * seq,
                   "errors": {}, "latency_us": {"p50": 2000.0, "p99": 5000.0},
                   "rollout": {"rollout_id": rid, "state": "shadow" if role == "shadow" else "idle", "role": role,
                               "since_ms": T0, "samples": 500 * seq, "shadow": shadow}}
        batch = p.RecordBatch(d, "b1", f"b1:{seq}-{seq}", (p.Record(seq, "m", now, payload),))
        hub.handle(batch.topic, batch.to_wire(), now)


def test_approve_button_on_the_rollouts_page(tmp_path: Path) -> None:
    pytest.importorskip("selenium", reason="selenium is not installed (dev extra)")
    pytest.importorskip("uvicorn", reason="the web extra is not installed")
    chromium, chromedriver = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    if not (chromium.exists() and chromedriver.exists()):
        pytest.skip("chromium not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from cloud_sync.web import WebServer, create_app

    clock = Clock(T0)
    hub = Hub.for_tests(tmp_path / "c.db", clock=clock, bundles_dir=tmp_path / "share")
    status_only(hub, DEVICES[:5])
    rid = hub.rollouts_service.start(plan_text(1), make_bundle(tmp_path), by="ana")["id"]
    clock.ms += 1000
    obey_and_report(hub, DEVICES[:5], clock.ms, 1)
    hub.tick(clock.ms)
    assert state(hub, rid) == ("waiting_approval", "shadow")      # level 1: a person approves every stage
    srv = WebServer(create_app(hub, token=TOKEN, poll_ms=300), port=0).start()
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(chromium)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(str(chromedriver)))
    try:
        driver.get(srv.url + "/rollouts")
        driver.execute_script(f"localStorage.setItem('cloud-sync.token', '{TOKEN}');"
                              "localStorage.setItem('cloud-sync.by', 'bo')")
        driver.refresh()

        def shows(*parts: str) -> Callable[[], bool]:
            def check() -> bool:  # polling replaces the rows: read them afresh, and again if they went stale
                try:
                    text = driver.find_element(By.CSS_SELECTOR, "#rollouts tbody").text
                except Exception:
                    return False
                return all(x in text for x in parts)
            return check

        def click(css: str) -> bool:
            try:
                driver.find_element(By.CSS_SELECTOR, css).click()
            except Exception:
                return False
            return True

        wait_for(lambda: "updated" in driver.find_element(By.ID, "refreshed").text, what="a refresh by polling")
        wait_for(shows("shadow_agreement 0.99 >= 0.9: pass", "waiting_approval", "baseline", "step-0"),
                 what="the rollout as the script renders it")
        wait_for(lambda: click(f"button[data-action='approve'][data-id='{rid}']"), what="a click on Approve")
        wait_for(lambda: "approved" in driver.find_element(By.ID, "flash").text, what="the approval")
        assert f"approved {rid}: now running at step-0" in driver.find_element(By.ID, "flash").text
        assert state(hub, rid) == ("running", "step-0")
        assert hub.rollouts_service.get(rid).events[-1].actor == "bo"
        wait_for(lambda: not driver.find_elements(By.CSS_SELECTOR, "button[data-action='approve']"),
                 what="the buttons to go")
        assert driver.execute_script("return window.cloudSyncCspViolations") == []
    finally:
        driver.quit()
        srv.stop()
        hub.close()


# -- the service's wiring ----------------------------------------------------------------------------

def test_the_service_publishes_through_its_connection_and_again_after_a_broker_restart(broker_factory: Any,
                                                                                        tmp_path: Path) -> None:
    from cloud_sync.service import IngestService

    broker = broker_factory()
    svc = IngestService(f"mqtt://{broker.host}:{broker.port}", str(tmp_path / "cloud.db"),
                        bundles_dir=tmp_path / "bundles")
    devices = transport(broker.host, broker.port, "devices")
    svc.start()
    devices.start()
    try:
        assert svc.transport.wait_connected(5) and devices.wait_connected(5)
        for d in DEVICES[:3]:
            st = p.Status(d, True, "b1", int(time.time() * 1000), "0.1.0", (p.ModelStatus(MODEL, "3", "active"),))
            devices.publish(st.topic, st.to_wire(), qos=1, retain=True)
        wait_for(lambda: len(svc.hub.devices()) == 3, what="the devices' status")
        rid = svc.hub.rollouts_service.start(plan_text(5), make_bundle(tmp_path), by="ana")["id"]
        orders = retained(broker.host, broker.port, "edge/v1/+/cmd/rollout", 3)
        assert {json.loads(b)["params"]["rollout_id"] for b in orders.values()} == {rid}
        assert len(retained(broker.host, broker.port, p.bundle_subscription(), 1)) == 1
        broker.restart()                                   # persistence off: every retained message is gone
        wait_for(lambda: len(retained(broker.host, broker.port, "edge/v1/+/cmd/rollout", None)) == 3, 15,
                 "the orders again")
        assert retained(broker.host, broker.port, "edge/v1/+/cmd/rollout", 3) == orders
        wait_for(lambda: len(retained(broker.host, broker.port, p.bundle_subscription(), None)) == 1, 10,
                 "the bundle again")
    finally:
        devices.stop()
        svc.stop()


def test_a_started_bundle_is_kept_in_the_services_own_directory(tmp_path: Path) -> None:
    """Republishing after a restart must not depend on the file the operator pointed at."""
    import shutil

    from edge_runtime.bundle import _write_tar

    hub = Hub.for_tests(tmp_path / "c.db", clock=Clock(T0), bundles_dir=tmp_path / "share")
    try:
        svc = hub.rollouts_service
        src = tmp_path / "upload" / "digits_mlp-4.tar"
        src.parent.mkdir()
        _write_tar(make_bundle(tmp_path), src)
        status_only(hub, DEVICES[:3])
        detail = svc.start(plan_text(5), src, by="ana")
        kept = tmp_path / "share" / "digits_mlp-4.tar"
        assert kept.read_bytes() == src.read_bytes()
        shutil.rmtree(src.parent)
        assert svc.get(str(detail["id"])).state == "running" and kept.is_file()
    finally:
        hub.close()


def test_a_plan_with_target_tags_reaches_only_the_devices_reporting_them(tmp_path: Path) -> None:
    hub = Hub.for_tests(tmp_path / "c.db", clock=Clock(T0), bundles_dir=tmp_path / "share")
    try:
        status_only(hub, DEVICES[:4], tags=("site:lab", "hw:pi5"))
        status_only(hub, DEVICES[4:7], tags=("site:lab",))
        status_only(hub, DEVICES[7:])
        detail = hub.rollouts_service.start(plan_text(5, tags='"site:lab", "hw:pi5"'), make_bundle(tmp_path), by="ana")
        assert sorted(a["device_id"] for a in detail["assignment"]) == DEVICES[:4]
        assert {r["id"]: r["tags"] for r in hub.devices()}["dev-05"] == ["site:lab"]
    finally:
        hub.close()


def test_a_bundle_is_uploaded_so_a_rollout_can_start_from_another_machine(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`rollout start --bundle DIR` archives and uploads a local bundle; the server keeps it under its
    sha256 and starts from its own copy. Not a tar, no manifest, too large: refused, nothing kept."""
    pytest.importorskip("uvicorn", reason="the web extra is not installed")
    from starlette.testclient import TestClient

    from cloud_sync.web import WebServer, create_app

    hub = Hub.for_tests(tmp_path / "c.db", publish=lambda t, b, q, r: True, clock=Clock(T0),
                        bundles_dir=tmp_path / "share")
    status_only(hub, DEVICES[:4])
    web = WebServer(create_app(hub, token=TOKEN), port=0).start()
    try:
        (tmp_path / "plan.toml").write_text(plan_text(1))
        bundle_dir = make_bundle(tmp_path / "here")
        code = cli_main(["rollout", "start", str(tmp_path / "plan.toml"), "--bundle", str(bundle_dir), "--url", web.url,
                         "--token", TOKEN, "--by", "ana"])
        out, _ = capsys.readouterr()
        assert code == 0 and "started digits-v4-r1" in out, out
        uploads = list((tmp_path / "share" / "uploads").glob("upload-*.tar"))
        assert len(uploads) == 1 and hub.rollouts_service.get("digits-v4-r1").candidate.version == "4"
        assert not list((tmp_path / "share" / "uploads").glob(".upload-*"))
    finally:
        web.stop()
    small = TestClient(create_app(hub, token=TOKEN, max_upload_mb=0.001), base_url="http://127.0.0.1")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert small.post("/api/v1/bundles", content=b"x" * 2000).status_code == 401  # a change needs the token
    r = small.post("/api/v1/bundles", content=b"x" * 2000, headers=auth)
    assert r.status_code == 413 and "--max-upload-mb" in r.json()["message"]
    client = TestClient(create_app(hub, token=TOKEN), base_url="http://127.0.0.1")
    r = client.post("/api/v1/bundles", content=b"not a tar at all" * 100, headers=auth)
    assert r.status_code == 400 and "not a tar archive" in r.json()["message"]
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("model.onnx")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    r = client.post("/api/v1/bundles", content=buf.getvalue(), headers=auth)
    assert r.status_code == 400 and "no manifest.json" in r.json()["message"]
    assert len(list((tmp_path / "share" / "uploads").iterdir())) == 1
    hub.close()
