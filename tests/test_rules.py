"""Alert rules: the TOML format and its errors, every metric against a real FleetState, and the alert
lifecycle (for_s hysteresis, ack, resolve, re-fire, persistence)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.fleet import FleetState
from cloud_sync.rules import (
    METRICS,
    AlertError,
    AlertManager,
    RulesError,
    load_rules,
    measure,
    parse_rules,
)
from edge_runtime.core import protocol as p
from edge_runtime.core.drift import CalibrationSettings, DriftMonitor, Reference, build_reference, load_reference
from edge_runtime.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "cloud_sync" / "rules.example.toml"
T0 = 1_764_167_513_000
MIN = 60_000
S = 1_000


def rule(metric: str, op: str = ">", threshold: float = 0, **extra: Any) -> str:
    lines = ["[[rule]]", f'name = "{extra.pop("name", "r")}"', f'metric = "{metric}"', f'op = "{op}"',
             f"threshold = {threshold}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


# -- the rules file --------------------------------------------------------------------------------

def test_the_example_file_loads_and_covers_every_metric_once() -> None:
    rs = load_rules(EXAMPLE)
    assert sorted(r.metric for r in rs) == sorted(METRICS)
    assert rs.source == str(EXAMPLE)
    assert {n: s.type for n, s in rs.sinks.items()} == {"ops-bus": "mqtt", "pager": "webhook", "log": "log"}
    assert rs.sinks["pager"].timeout_s == 5.0 and rs.sinks["ops-bus"].topic == "alerts/edge-fleet"
    acc = rs.rule("accuracy-drop")
    assert (acc.baseline, acc.min_samples, acc.retrain, acc.scope) == (0.92, 200, True, "model")
    assert rs.rule("slow-inference").scope == "device"
    assert load_rules(str(EXAMPLE)).rules == rs.rules


def test_defaults_and_text_sources() -> None:
    rs = load_rules(rule("cpu_percent", ">=", 90))
    (r,) = rs.rules
    assert (r.name, r.metric, r.op, r.threshold, r.for_s, r.model, r.severity, r.retrain, r.sinks) == (
        "r", "cpu_percent", ">=", 90.0, 0.0, None, "warning", False, ("log",))
    assert r.line == 2 and r.holds(90.0) and not r.holds(89.9)
    assert len(load_rules("")) == 0 and list(parse_rules("# nothing yet\n")) == []


@pytest.mark.parametrize(("text", "key", "line", "match"), [
    (rule("cpu_percent", threshold='"90"'), "threshold", 5, "key 'threshold': expected a number, got str '90'"),
    (rule("cpu_percent", bogus=1), "bogus", 6, "unknown key 'bogus'"),
    (rule("cpu", threshold=1), "metric", 3, "expected one of drift_alarm_devices, p99_latency_ms"),
    (rule("cpu_percent", op="=>", threshold=1), "op", 4, "key 'op': expected one of >, >=, <, <=, got str '=>'"),
    (rule("error_rate", threshold=5), "threshold", 5, r"expected a number in \[0, 1\], got int 5"),
    (rule("cpu_percent", threshold=1, for_s=-1), "for_s", 6, "expected seconds >= 0"),
    (rule("cpu_percent", threshold=1, severity="loud"), "severity", 6, "expected one of info, warning, critical"),
    (rule("cpu_percent", threshold=1, retrain="yes"), "retrain", 6, "expected a boolean, got str 'yes'"),
    (rule("cpu_percent", threshold=1, sinks=["log", "pager"]), "sinks", 6, "names of sinks .*got str 'pager'"),
    (rule("cpu_percent", threshold=1, sinks="log"), "sinks", 6, "expected an array"),
    (rule("cpu_percent", threshold=1, baseline=0.9), "baseline", 6, "applies to metric accuracy_drop only"),
    (rule("accuracy_drop", threshold=1, baseline=91), "baseline", 6, r"expected an accuracy in \[0, 1\]"),
    (rule("accuracy_drop", threshold=1, min_samples=0), "min_samples", 6, "expected an integer >= 1"),
    (rule("cpu_percent", threshold=1, name="has space"), "name", 2, "key 'name': expected 1-64 of"),
    ("[[rule]]\nname = 'x'\nmetric = 'cpu_percent'\nop = '>'\n", "threshold", 1, "missing required key 'threshold'"),
    (rule("cpu_percent", threshold=1) + "\n" + rule("p99_latency_ms", threshold=1), "name", 8,
     r"\[\[rule\]\] #2 \('r'\): rule name 'r' is already used by \[\[rule\]\] #1"),
    ("threshold = 3\n", "threshold", 1, "unknown top-level key 'threshold'"),
    ("rule = 1\n", "rule", 1, r"expected an array of tables \(\[\[rule\]\]\)"),
    ("[sinks.bus]\ntype = 'mqtt'\n", "topic", 1, "missing required key 'topic' for an mqtt sink"),
    ("[sinks.bus]\ntype = 'mqtt'\ntopic = 'alerts/#'\n", "topic", 3, "no \\+ or # wildcards"),
    ("[sinks.hook]\ntype = 'webhook'\nurl = 'ftp://x'\n", "url", 3, "expected an http:// or https:// URL"),
    ("[sinks.hook]\ntype = 'webhook'\nurl = 'https://x'\ntimeout_s = 0\n", "timeout_s", 4, r"seconds in \(0, 300\]"),
    ("[sinks.hook]\ntype = 'log'\nurl = 'https://x'\n", "url", 3, "key 'url' does not apply to a log sink"),
    ("[sinks.hook]\ntype = 'email'\n", "type", 2, "expected one of log, mqtt, webhook, got str 'email'"),
    ("[[rule]]\nname = 'x'\nmetric = \n", None, 3, "not valid TOML"),
])
def test_errors_name_the_file_line_key_expected_and_got(text: str, key: str | None, line: int, match: str) -> None:
    with pytest.raises(RulesError, match=match) as info:
        parse_rules(text, "fleet-rules.toml")
    err = info.value
    assert isinstance(err, ConfigError)
    assert (err.path, err.key, err.line) == ("fleet-rules.toml", key, line)
    assert str(err).startswith(f"fleet-rules.toml:{line}: ")


def test_a_rule_further_down_is_located_by_its_own_entry(tmp_path: Path) -> None:
    text = rule("cpu_percent", threshold=1, name="a") + rule("temperature_c", threshold=1, name="b", for_s="x")
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(RulesError, match=r"\[\[rule\]\] #2 \('b'\): key 'for_s': expected a number") as info:
        load_rules(path)
    assert (info.value.line, info.value.expected, info.value.got) == (11, "a number", "str 'x'")
    with pytest.raises(RulesError, match="cannot read"):
        load_rules(tmp_path / "missing.toml")


# -- a fleet to measure ----------------------------------------------------------------------------

def status(dev: str, t: int, boot: str = "boot-a", version: str = "3") -> p.Status:
    return p.Status(dev, True, boot, t, "0.1.0", (p.ModelStatus("digits", version, "active"),))


def telemetry(dev: str, t: int, *, cpu: float = 20.0, temp: float | None = 50.0, p99_ms: float = 2.0,
              inputs: int = 1000, errors: int = 0, predictions: int = 1000, low: int = 0,
              model: str = "digits") -> p.Telemetry:
    pipe = {"model_version": "3", "window_s": 60.0, "inputs": inputs, "predictions": predictions,
            "throughput_per_s": 10.0, "latency_us": {"count": 10, "p50": 500.0, "p99": p99_ms * 1000},
            "errors": {"shape": errors}, "low_confidence": low}
    return p.Telemetry(dev, "boot-a", t, {"cpu_percent": cpu, "rss_mb": 80.0, "temperature_c": temp,
                                          "pipelines": {model: pipe}})


def fleet_of_two(t: int = T0) -> FleetState:
    fleet = FleetState()
    for dev in ("dev-1", "dev-2"):
        fleet.observe_status(status(dev, t), t)
        fleet.observe_telemetry(telemetry(dev, t), t)
    return fleet


def records(fleet: FleetState, dev: str, t: int, *recs: tuple[str, dict[str, Any]], seq: int = 1) -> None:
    fleet.observe_records(dev, [p.Record(seq + i, k, t, d) for i, (k, d) in enumerate(recs)], t, boot_id="boot-a")


@functools.cache
def reference() -> Reference:
    x = np.random.default_rng(0).normal(size=(2_000, 3))
    return load_reference(build_reference(x, None, calibration=CalibrationSettings(window=50, n_simulations=2_000,
                                                                                    universes=4)))


def drifted(fleet: FleetState, t: int) -> None:
    mon = DriftMonitor(reference(), model="digits")
    mon.update(np.random.default_rng(1).normal(size=(200, 3)) + 2.0)
    env = p.DriftSummary("digits", "3", t - MIN, t, mon.take_summary().to_dict())
    records(fleet, "dev-2", t, ("d", env.to_payload()))


def _p99(f: FleetState, t: int) -> None:
    f.observe_telemetry(telemetry("dev-1", t, p99_ms=80.0), t)


def _errors(f: FleetState, t: int) -> None:
    f.observe_telemetry(telemetry("dev-1", t, inputs=2000, errors=100), t)           # 100 of the last 1000


def _offline(f: FleetState, t: int) -> int:
    f.observe_status(p.last_will("dev-2", "boot-a", time_ms=T0), t)       # last heard from at t - MIN
    f.observe_telemetry(telemetry("dev-1", t + 19 * MIN), t + 19 * MIN)
    return t + 19 * MIN


def _low_confidence(f: FleetState, t: int) -> None:
    f.observe_telemetry(telemetry("dev-2", t, predictions=2000, low=400), t)


def _cpu(f: FleetState, t: int) -> None:
    f.observe_telemetry(telemetry("dev-1", t, cpu=97.0), t)


def _temperature(f: FleetState, t: int) -> None:
    f.observe_telemetry(telemetry("dev-1", t, temp=None), t)                       # no sensor: not measured
    f.observe_telemetry(telemetry("dev-2", t, temp=86.0), t)


def _drift_alarms(f: FleetState, t: int) -> None:
    for dev in ("dev-1", "dev-2"):
        records(f, dev, t, ("e", p.Event("drift_alarm", "warning", ref="digits", detail={"kind": "data"}).to_payload()))


def _accuracy(f: FleetState, t: int) -> None:
    f.register_model("digits", "3", reference_accuracy=0.9)
    for i in range(100):
        f.observe_label("dev-1" if i % 2 else "dev-2", "digits", "3", i < 80, t)


def _fleet_drift(f: FleetState, t: int) -> None:
    drifted(f, t)


SCENARIOS: dict[str, tuple[Callable[[FleetState, int], int | None], str, float, str, float]] = {
    # metric: (make it happen, and maybe say when to look; op, threshold, subject, value)
    "p99_latency_ms": (_p99, ">", 50, "dev-1", 80.0),
    "error_rate": (_errors, ">", 0.05, "dev-1", 0.1),
    "offline_minutes": (_offline, ">=", 15, "dev-2", 20.0),
    "low_confidence_rate": (_low_confidence, ">", 0.3, "dev-2", 0.4),
    "cpu_percent": (_cpu, ">", 90, "dev-1", 97.0),
    "temperature_c": (_temperature, ">=", 80, "dev-2", 86.0),
    "drift_alarm_devices": (_drift_alarms, ">=", 2, "digits@3", 2.0),
    "accuracy_drop": (_accuracy, ">", 5, "digits@3", 10.0),
    "fleet_drift_score": (_fleet_drift, ">", 1.0, "digits@3", -1.0),   # -1: whatever the monitor scored
}


@pytest.mark.parametrize("metric", METRICS)
def test_each_metric_fires_for_its_subject(metric: str) -> None:
    make, op, threshold, subject, value = SCENARIOS[metric]
    t = T0 + 20 * MIN
    mgr = AlertManager(parse_rules(rule(metric, op, threshold, name="the-rule", severity="critical", retrain=True)))
    fleet = fleet_of_two()
    for dev in ("dev-1", "dev-2"):
        fleet.observe_telemetry(telemetry(dev, t - MIN), t - MIN)
    assert mgr.evaluate(fleet, t - MIN) == []                              # a healthy fleet: nothing fires
    t = make(fleet, t) or t
    (tr,) = mgr.evaluate(fleet, t)
    assert (tr.rule, tr.subject, tr.before, tr.after, tr.severity, tr.retrain) == (
        "the-rule", subject, None, "firing", "critical", True)
    assert tr.alert_id == f"the-rule:{subject}:{t}" and tr.threshold == threshold
    if value >= 0:
        assert tr.value == pytest.approx(value)
    else:
        assert tr.value is not None and tr.value > threshold
    assert subject in tr.message
    (alert,) = mgr.alerts("firing")
    assert alert["id"] == tr.alert_id and alert["started_ms"] == t and alert["acked_by"] is None


def test_model_filter_and_per_pipeline_values() -> None:
    fleet = fleet_of_two()
    fleet.observe_telemetry(telemetry("dev-1", T0 + MIN, p99_ms=80.0, model="other"), T0 + MIN)
    fleet.observe_telemetry(telemetry("dev-2", T0 + MIN, p99_ms=70.0), T0 + MIN)
    rs = parse_rules(rule("p99_latency_ms", ">", 50, name="slow-digits", model="digits")
                     + rule("p99_latency_ms", ">", 50, name="slow-any"))
    assert measure(rs.rule("slow-digits"), fleet, T0 + MIN) == {"dev-2": 70.0}
    assert measure(rs.rule("slow-any"), fleet, T0 + MIN) == {"dev-1": 80.0, "dev-2": 70.0}
    acc = parse_rules(rule("accuracy_drop", ">", 1, model="digits", baseline=0.95, min_samples=20)).rules[0]
    for i in range(19):
        fleet.observe_label("dev-1", "digits", "3", i < 17, T0)
    assert measure(acc, fleet, T0 + MIN) == {}                             # 19 labels: not yet
    fleet.observe_label("dev-1", "digits", "3", True, T0)
    assert measure(acc, fleet, T0 + MIN) == {"digits@3": pytest.approx(5.0)}


def test_gauges_of_silent_devices_are_not_measured() -> None:
    fleet = fleet_of_two()
    fleet.observe_telemetry(telemetry("dev-1", T0 + MIN, cpu=99.0), T0 + MIN)
    mgr = AlertManager(parse_rules(rule("cpu_percent", ">", 90)))
    assert [t.after for t in mgr.evaluate(fleet, T0 + MIN)] == ["firing"]
    (tr,) = mgr.evaluate(fleet, T0 + 10 * MIN)                             # dev-1 went quiet: stale
    assert (tr.after, tr.subject, tr.value) == ("resolved", "dev-1", 99.0)


# -- the lifecycle ---------------------------------------------------------------------------------

def cpu_at(fleet: FleetState, t: int, cpu: float) -> None:
    fleet.observe_telemetry(telemetry("dev-1", t, cpu=cpu), t)


def test_for_s_must_hold_before_firing() -> None:
    fleet = fleet_of_two()
    mgr = AlertManager(parse_rules(rule("cpu_percent", ">", 90, for_s=60)))
    cpu_at(fleet, T0, 95.0)
    assert mgr.evaluate(fleet, T0) == [] and mgr.alerts() == []            # pending is not an alert
    cpu_at(fleet, T0 + 30 * S, 96.0)
    assert mgr.evaluate(fleet, T0 + 30 * S) == []
    cpu_at(fleet, T0 + 45 * S, 50.0)                                       # dipped: the clock restarts
    assert mgr.evaluate(fleet, T0 + 45 * S) == []
    cpu_at(fleet, T0 + 50 * S, 95.0)
    assert mgr.evaluate(fleet, T0 + 50 * S) == []
    cpu_at(fleet, T0 + 109 * S, 95.0)
    assert mgr.evaluate(fleet, T0 + 109 * S) == []
    cpu_at(fleet, T0 + 110 * S, 95.0)
    (tr,) = mgr.evaluate(fleet, T0 + 110 * S)
    assert (tr.after, tr.alert_id) == ("firing", f"r:dev-1:{T0 + 110 * S}")
    assert mgr.alerts()[0]["since_ms"] == T0 + 50 * S


def test_ack_resolve_and_refire_with_a_new_id() -> None:
    fleet = fleet_of_two()
    mgr = AlertManager(parse_rules(rule("cpu_percent", ">", 90)))
    cpu_at(fleet, T0, 95.0)
    (fired,) = mgr.evaluate(fleet, T0)
    ack = mgr.ack(fired.alert_id, "alice", T0 + S)
    assert (ack.before, ack.after) == ("firing", "acknowledged")
    with pytest.raises(AlertError, match="already acknowledged by alice"):
        mgr.ack(fired.alert_id, "bob", T0 + 2 * S)
    with pytest.raises(AlertError, match="no alert nope"):
        mgr.ack("nope", "bob", T0)
    with pytest.raises(AlertError, match="must name who"):
        mgr.ack(fired.alert_id, " ", T0)
    cpu_at(fleet, T0 + MIN, 97.0)
    assert mgr.evaluate(fleet, T0 + MIN) == []                             # still acknowledged
    (alert,) = mgr.alerts("acknowledged")
    assert (alert["acked_by"], alert["acked_ms"], alert["value"]) == ("alice", T0 + S, 97.0)
    cpu_at(fleet, T0 + 2 * MIN, 40.0)
    (resolved,) = mgr.evaluate(fleet, T0 + 2 * MIN)
    assert (resolved.before, resolved.after, resolved.alert_id) == ("acknowledged", "resolved", fired.alert_id)
    with pytest.raises(AlertError, match="is resolved"):
        mgr.ack(fired.alert_id, "bob", T0 + 3 * MIN)
    cpu_at(fleet, T0 + 3 * MIN, 99.0)
    (again,) = mgr.evaluate(fleet, T0 + 3 * MIN)
    assert again.after == "firing" and again.alert_id == f"r:dev-1:{T0 + 3 * MIN}" != fired.alert_id
    cpu_at(fleet, T0 + 4 * MIN, 10.0)
    (gone,) = mgr.evaluate(fleet, T0 + 4 * MIN)
    assert (gone.before, gone.after) == ("firing", "resolved")             # resolves from firing too
    states = [(a["id"], a["state"]) for a in mgr.alerts()]
    assert states == [(fired.alert_id, "resolved"), (again.alert_id, "resolved")]
    assert mgr.alerts("resolved")[0]["resolved_ms"] == T0 + 2 * MIN
    with pytest.raises(ValueError, match="state must be"):
        mgr.alerts("pending")


def test_state_survives_a_restart_and_removed_rules_resolve() -> None:
    rules = rule("cpu_percent", ">", 90, name="cpu", for_s=120) + rule("temperature_c", ">", 70, name="hot")
    fleet = fleet_of_two()
    mgr = AlertManager(parse_rules(rules))
    fleet.observe_telemetry(telemetry("dev-1", T0, cpu=95.0, temp=75.0), T0)
    (hot,) = mgr.evaluate(fleet, T0)                                       # cpu is pending
    mgr.ack(hot.alert_id, "ops", T0 + S)
    saved = json.loads(json.dumps(mgr.to_dict(), allow_nan=False))
    again = AlertManager.from_dict(saved, parse_rules(rules))
    assert again.alerts() == mgr.alerts()
    fleet.observe_telemetry(telemetry("dev-1", T0 + 2 * MIN, cpu=95.0, temp=75.0), T0 + 2 * MIN)
    (cpu,) = again.evaluate(fleet, T0 + 2 * MIN)                           # for_s kept counting across the reload
    assert (cpu.rule, cpu.after) == ("cpu", "firing")
    only_cpu = AlertManager.from_dict(again.to_dict(), parse_rules(rule("cpu_percent", ">", 90, name="cpu")))
    (removed,) = only_cpu.evaluate(fleet, T0 + 3 * MIN)
    assert (removed.rule, removed.before, removed.after) == ("hot", "acknowledged", "resolved")
    assert "rule removed" in removed.message
    with pytest.raises(AlertError, match="expected schema"):
        AlertManager.from_dict({"schema": "x"}, parse_rules(rules))
    broken = json.loads(json.dumps(mgr.to_dict()))
    broken["live"][0]["since_ms"] = "yesterday"
    with pytest.raises(AlertError, match="malformed"):
        AlertManager.from_dict(broken, parse_rules(rules))


def test_resolved_alerts_are_bounded() -> None:
    fleet = fleet_of_two()
    mgr = AlertManager(parse_rules(rule("cpu_percent", ">", 90)), max_resolved=2)
    for i in range(5):
        cpu_at(fleet, T0 + 2 * i * MIN, 95.0)
        mgr.evaluate(fleet, T0 + 2 * i * MIN)
        cpu_at(fleet, T0 + (2 * i + 1) * MIN, 10.0)
        mgr.evaluate(fleet, T0 + (2 * i + 1) * MIN)
    assert [a["started_ms"] for a in mgr.alerts()] == [T0 + 6 * MIN, T0 + 8 * MIN]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([0, 30, 90]), st.lists(st.tuples(st.integers(1, 60), st.booleans(), st.booleans()),
                                               min_size=1, max_size=25))
def test_alerts_fire_exactly_when_the_condition_held_for_for_s(for_s: int,
                                                                 steps: list[tuple[int, bool, bool]]) -> None:
    fleet = fleet_of_two()
    mgr = AlertManager(parse_rules(rule("cpu_percent", ">", 90, for_s=for_s)))
    t = T0
    since: int | None = None
    live: str | None = None            # the expected state of the one alert
    ids: set[str] = set()
    for dt, high, ack in steps:
        t += dt * S
        cpu_at(fleet, t, 95.0 if high else 20.0)
        got = [(tr.before, tr.after) for tr in mgr.evaluate(fleet, t)]
        expect: list[tuple[str | None, str]] = []
        if high:
            since = t if since is None else since
            if live is None and t - since >= for_s * S:
                live = "firing"
                expect = [(None, "firing")]
        else:
            since = None
            if live is not None:
                expect = [(live, "resolved")]
                live = None
        assert got == expect
        if ack and live == "firing":
            (alert,) = mgr.alerts("firing")
            mgr.ack(alert["id"], "ops", t)
            live = "acknowledged"
        ids |= {a["id"] for a in mgr.alerts()}
        assert len([a for a in mgr.alerts() if a["state"] != "resolved"]) == (live is not None)
    assert len(ids) == len(mgr.alerts())                                    # every alert its own id
