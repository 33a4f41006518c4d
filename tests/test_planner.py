"""Rollout planner: the plan file and its errors, cohorts, gates, the five automation levels, people's
commands, and persistence. Everything runs on made-up observations and times: no broker, no clock."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync import planner
from cloud_sync.planner import (
    DECISIONS,
    DONE,
    LEVELS,
    PLANNER,
    STATES,
    Bundle,
    Decision,
    Device,
    DeviceObservation,
    IllegalAction,
    ObservationError,
    Observations,
    PlanError,
    Rollout,
    RolloutError,
    VersionStats,
    assign,
    cohort_rank,
    load_plan,
    needs_review,
    parse_plan,
    targets,
)
from edge_runtime.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "cloud_sync" / "plan.example.toml"
T0 = 1_764_167_513_000
MIN = 60_000
CANDIDATE = Bundle("digits_mlp", "4", "ab" * 32, 123_456)
PREVIOUS = "3"
GATES = """shadow_agreement_min = 0.95
p99_latency_ms_max = 20.0
error_rate_max = 0.01
drift_not_worse = true
drift_margin = 0.5
accuracy_not_worse = true
accuracy_margin = 0.02
accuracy_min_labels = 50"""
GOOD: dict[str, Any] = {"shadow_agreement": 0.99, "p99_ms": 10.0, "error_rate": 0.001, "drift_score": 0.2,
                        "accuracy_n": 100, "accuracy": 0.95}
VERSIONS = {PREVIOUS: VersionStats(PREVIOUS, p99_ms=9.0, error_rate=0.001, drift_score=0.2, accuracy_n=5000,
                                   accuracy=0.95)}


def plan_text(level: int = 5, *, shadow: int | None = 20, steps: Iterable[float] = (10, 50, 100),
              gates: str = GATES, extra: str = "") -> str:
    lines = ['name = "digits-v4"', 'model = "digits_mlp"', f"automation_level = {level}", "",
             "[target]", 'tags = ["site:lab"]', "", "[defaults]", "min_samples = 100", "min_time_s = 600"]
    if shadow is not None:
        lines += ["", "[shadow]", f"percent = {shadow}"]
    for p in steps:
        lines += ["", "[[step]]", f"percent = {p}"]
    lines += ["", "[gates]", gates, "", extra]
    return "\n".join(lines) + "\n"


def fleet(n: int = 40) -> list[Device]:
    lab = [Device(f"pi-{i:03d}", {"site:lab", "hw:pi5"}, {"digits_mlp"}) for i in range(n)]
    other = [Device(f"far-{i}", {"site:far"}, {"digits_mlp"}) for i in range(3)]
    other.append(Device("lab-no-model", {"site:lab"}, {"keyword_spotter"}))
    return lab + other


def observe(r: Rollout, devices: list[Device], *, samples: int = 1000, versions: Any = VERSIONS,
            roles: dict[str, str] | None = None, **cand: Any) -> Observations:
    """Every device in the role the rollout gives it (or ``roles``), with good metrics; ``cand`` overrides
    the metrics of shadow and candidate devices."""
    assigned = r.assignment(devices)
    out = []
    for d in devices:
        role = (roles or {}).get(d.device_id, assigned.get(d.device_id, "baseline"))
        metrics = {**GOOD, **cand} if role in ("shadow", "candidate") else dict(GOOD)
        out.append(DeviceObservation(device_id=d.device_id, tags=d.tags, models=d.models, role=role,
                                     samples=samples, **metrics))
    return Observations(tuple(out), versions)


def new(level: int = 5, **kw: Any) -> Rollout:
    return Rollout(parse_plan(plan_text(level, **kw)), "digits-v4-r1", CANDIDATE, PREVIOUS, now_ms=T0)


def drive(r: Rollout, devices: list[Device], now: int, limit: int = 50, **kw: Any) -> tuple[list[Decision], int]:
    """Evaluate every 10 minutes until the rollout stops running on its own."""
    out: list[Decision] = []
    for _ in range(limit):
        now += 10 * MIN
        out += r.evaluate(observe(r, devices, **kw), now)
        if r.state not in ("running", "rolling_back"):
            break
    return out, now


def acts(decisions: list[Decision]) -> list[tuple[str, str]]:
    return [(d.kind, d.stage) for d in decisions if d.kind != "wait"]


def gate(d: Decision, name: str) -> planner.GateResult:
    return next(g for g in d.gate_results if g.name == name)


# -- the plan file -----------------------------------------------------------------------------------

def test_the_example_plan_loads() -> None:
    plan = load_plan(EXAMPLE)
    assert (plan.name, plan.model, plan.automation_level, plan.target_tags) == (
        "digits-v4", "digits_mlp", 3, ("site:lab", "hw:pi5"))
    assert plan.stages == ("shadow", "step-0", "step-1", "step-2")
    assert plan.shadow is not None and (plan.shadow.percent, plan.shadow.min_samples, plan.shadow.min_time_s) == (
        20, 500, 600)
    assert [(s.percent, s.min_samples, s.min_time_s) for s in plan.steps] == [
        (10, 1000, 900), (50, 1000, 900), (100, 1000, 1800)]
    g = plan.gates
    assert (g.shadow_agreement_min, g.p99_latency_ms_max, g.error_rate_max, g.drift_margin, g.accuracy_margin,
            g.accuracy_min_labels) == (0.95, 20.0, 0.01, 0.5, 0.02, 200)
    assert plan.review is not None and plan.review.classes == (3, 8) and plan.review.below_score == 0.6
    assert plan.source == str(EXAMPLE) and load_plan(str(EXAMPLE)) == plan
    assert plan.next_stage("step-1") == "step-2" and plan.next_stage("step-2") == DONE


def test_defaults_and_no_shadow() -> None:
    text = 'name = "r"\nmodel = "m"\nautomation_level = 5\n[shadow]\npercent = 0\n[[step]]\npercent = 100\n'
    plan = load_plan(text)
    assert plan.shadow is None and plan.stages == ("step-0",) and plan.target_tags == ()
    assert (plan.steps[0].min_samples, plan.steps[0].min_time_s) == (planner.DEFAULT_MIN_SAMPLES,
                                                                      planner.DEFAULT_MIN_TIME_S)
    assert plan.gates == planner.Gates() and plan.review is None
    assert plan.rollback_timeout_s == planner.DEFAULT_ROLLBACK_TIMEOUT_S
    plan = load_plan(plan_text(steps=(0.5, 100)))
    assert [(s.percent, s.min_samples, s.min_time_s) for s in plan.steps] == [(0.5, 100, 600), (100, 100, 600)]


def _lines_with(text: str, needle: str) -> int:
    lines = text.splitlines()
    exact = [n for n, line in enumerate(lines, start=1) if line.strip() == needle.strip()]
    return exact[0] if exact else next(n for n, line in enumerate(lines, start=1) if needle in line)


@pytest.mark.parametrize(("mutate", "key", "needle", "message"), [
    (lambda t: t.replace("error_rate_max", "eror_rate_max"), "eror_rate_max", "eror_rate_max",
     "unknown key 'eror_rate_max'"),
    (lambda t: t.replace("percent = 50", "percent = 5"), "percent", "percent = 5\n",
     "must grow from step to step: expected more than 10"),
    (lambda t: t.replace("percent = 100", "percent = 90"), "percent", "percent = 90",
     "the last step must reach every device: expected 100, got int 90"),
    (lambda t: t.replace("percent = 10\n", "percent = 0\n"), "percent", "percent = 0\n",
     "expected a percentage in (0, 100], got int 0"),
    (lambda t: t.replace("automation_level = 5", "automation_level = 6"), "automation_level", "automation_level",
     "expected an automation level 1..5, got int 6"),
    (lambda t: t.replace("automation_level = 5", 'automation_level = "5"'), "automation_level", "automation_level",
     "expected an integer, got str '5'"),
    (lambda t: t.replace("p99_latency_ms_max = 20.0", 'p99_latency_ms_max = "20"'), "p99_latency_ms_max",
     "p99_latency_ms_max", "expected a number, got str '20'"),
    (lambda t: t.replace("error_rate_max = 0.01", "error_rate_max = 1.5"), "error_rate_max", "error_rate_max",
     "expected a fraction in [0, 1], got float 1.5"),
    (lambda t: t.replace("drift_not_worse = true", "drift_not_worse = false"), "drift_margin", "drift_margin",
     "key 'drift_margin' applies only with drift_not_worse = true"),
    (lambda t: t.replace("percent = 20", "percent = 120"), "percent", "percent = 120",
     "expected a percentage in [0, 100] (0: no shadow stage), got int 120"),
    (lambda t: t.replace("min_samples = 100", "min_samples = -1"), "min_samples", "min_samples",
     "expected an integer >= 0, got int -1"),
    (lambda t: t.replace('tags = ["site:lab"]', 'tags = ["site:lab", "site:lab"]'), "tags", "tags",
     "expected each tag once"),
    (lambda t: t + "[review]\n", None, "[review]", "an empty [review] matches nothing"),
    (lambda t: t + "[review]\nclasses = [1.5]\n", "classes", "classes", "expected class indices or labels"),
    (lambda t: t.replace('model = "digits_mlp"\n', ""), "model", None, "missing required key 'model'"),
    (lambda t: t.replace('name = "digits-v4"', 'name = "bad name"'), "name", "name =",
     "expected 1-128 of A-Z"),
])
def test_plan_errors_name_key_line_expected_and_got(mutate: Any, key: str | None, needle: str | None,
                                                    message: str) -> None:
    text = mutate(plan_text())
    with pytest.raises(PlanError) as info:
        parse_plan(text, "plans/digits.toml")
    e = info.value
    assert isinstance(e, ConfigError)
    assert e.key == key
    assert message in str(e)
    assert str(e).startswith("plans/digits.toml:")
    if needle is not None:
        assert e.line == _lines_with(text, needle), (e.line, str(e))


def test_step_errors_name_the_step_and_its_line() -> None:
    text = plan_text(steps=(10, 50, 100)).replace("[[step]]\npercent = 50", "[[step]]\npercent = 50\nmin_time = 3")
    with pytest.raises(PlanError, match=r"\[\[step\]\] #2: unknown key 'min_time'") as info:
        parse_plan(text)
    assert info.value.line == _lines_with(text, "min_time = 3")


def test_structural_and_syntax_errors() -> None:
    steps_as_table = r"expected ramp steps as an array of tables \(\[\[step\]\]\), got dict"
    with pytest.raises(PlanError, match=steps_as_table) as info:
        parse_plan('name = "r"\nmodel = "m"\nautomation_level = 1\n\n[step]\npercent = 100\n')
    assert info.value.line == 5
    with pytest.raises(PlanError, match="not valid TOML") as info:
        parse_plan('name = "r"\nmodel = "m"\nautomation_level = = 1\n')
    assert info.value.line == 3
    with pytest.raises(PlanError, match=r"expected one or more ramp steps"):
        parse_plan('name = "r"\nmodel = "m"\nautomation_level = 1\nstep = []\n')
    with pytest.raises(PlanError, match="expected milliseconds > 0, got float nan"):
        parse_plan(plan_text().replace("p99_latency_ms_max = 20.0", "p99_latency_ms_max = nan"))


def test_load_plan_from_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(plan_text().replace("percent = 100", "percent = 99"))
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert info.value.path == str(path) and info.value.line is not None
    with pytest.raises(PlanError, match="cannot read"):
        load_plan(tmp_path / "absent.toml")


# -- cohorts -----------------------------------------------------------------------------------------

def test_cohort_rank_is_sha256_and_deterministic() -> None:
    want = int.from_bytes(hashlib.sha256(b"ramp\0r1\0dev-1").digest()[:8], "big") / 2.0**64
    assert cohort_rank("dev-1", "r1") == want == cohort_rank("dev-1", "r1")
    assert cohort_rank("dev-1", "r1", "shadow") != want
    assert cohort_rank("dev-1", "r2") != want
    assert all(0.0 <= cohort_rank(f"d{i}", "r") < 1.0 for i in range(1000))


def test_cohort_sizes_match_the_requested_percent_over_10000_ids() -> None:
    n = 10_000
    devices = [Device(f"dev-{i}", {"site:lab"}, {"digits_mlp"}) for i in range(n)]
    plan = parse_plan(plan_text(shadow=20, steps=(1, 10, 50, 100)))
    by_stage = {s: assign(devices, plan, s, "rollout-7") for s in plan.stages}
    for stage, want_role in (("shadow", "shadow"), ("step-0", "candidate"), ("step-1", "candidate"),
                             ("step-2", "candidate"), ("step-3", "candidate")):
        p = plan.stage(stage).percent / 100.0
        got = sum(role == want_role for role in by_stage[stage].values())
        tolerance = 5 * math.sqrt(n * p * (1 - p))        # five binomial standard deviations
        assert abs(got - n * p) <= max(tolerance, 0.5), (stage, got)
    # The shadow cohort is drawn independently of the ramp: their overlap is about the product.
    both = sum(by_stage["shadow"][d] == "shadow" and by_stage["step-1"][d] == "candidate" for d in by_stage["shadow"])
    p = 0.2 * 0.1
    assert abs(both - n * p) <= 5 * math.sqrt(n * p * (1 - p))


@settings(max_examples=60, deadline=None)
@given(ids=st.sets(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=10),
                   max_size=40),
       cuts=st.lists(st.integers(1, 99), max_size=4, unique=True), rollout_id=st.from_regex(r"[a-z][a-z0-9]{0,8}",
                                                                                             fullmatch=True))
def test_the_ramp_is_monotone(ids: set[str], cuts: list[int], rollout_id: str) -> None:
    plan = parse_plan(plan_text(shadow=None, steps=(*sorted(cuts), 100), gates=""))
    devices = [Device(i, {"site:lab"}, {"digits_mlp"}) for i in ids]
    previous: set[str] = set()
    for stage in plan.stages:
        roles = assign(devices, plan, stage, rollout_id)
        now = {d for d, r in roles.items() if r == "candidate"}
        assert previous <= now
        assert set(roles.values()) <= {"candidate", "baseline"} and set(roles) == ids
        assert not ids or now, "a non-empty fleet gets at least one candidate"
        previous = now
    assert previous == ids


def test_targeting_needs_every_tag_and_the_model() -> None:
    plan = parse_plan(plan_text())
    devices = fleet(10)
    roles = assign(devices, plan, "step-2", "r")
    assert set(roles) == {f"pi-{i:03d}" for i in range(10)}
    assert not targets(plan, Device("x", {"site:lab"}, {"other"}))
    everyone = parse_plan(plan_text().replace('tags = ["site:lab"]', "tags = []"))
    assert set(assign(devices, everyone, DONE)) == {d.device_id for d in devices if "digits_mlp" in d.models}
    with pytest.raises(KeyError, match="no stage 'step-9'"):
        assign(devices, plan, "step-9")


# -- rollouts, level by level ------------------------------------------------------------------------

def test_level_5_runs_from_shadow_to_100_percent_on_its_own() -> None:
    devices = fleet()
    r = new(5)
    assert (r.state, r.stage) == ("running", "shadow")
    shadow = {d for d, role in r.assignment(devices).items() if role == "shadow"}
    assert 0 < len(shadow) < 40
    decisions, now = drive(r, devices, T0)
    assert acts(decisions) == [("advance", "step-0"), ("advance", "step-1"), ("advance", "step-2"), ("done", DONE)]
    assert (r.state, r.stage) == ("done", DONE)
    assert set(r.assignment(devices).values()) == {"candidate"} and len(r.assignment(devices)) == 40
    assert all(not d.notify for d in decisions)
    advance = next(d for d in decisions if d.kind == "advance")
    # Labels come back for the answers a device gave: in the shadow stage, the previous version's.
    assert {g.name for g in advance.gate_results} == {"install", "shadow_agreement", "p99_latency_ms", "error_rate",
                                                       "drift"}
    assert all(g.status == "pass" for g in advance.gate_results)
    step = [d for d in decisions if d.kind == "advance"][1]
    assert {g.name for g in step.gate_results} == {"install", "p99_latency_ms", "error_rate", "drift", "accuracy"}
    assert all(g.status == "pass" for g in step.gate_results)
    # At 100 % no baseline devices are left: drift and accuracy compare with the previous version's KPIs.
    last = decisions[-1]
    assert "version 3" in gate(last, "drift").detail and "version 3" in gate(last, "accuracy").detail
    assert [(e.actor, e.what) for e in r.events] == [(PLANNER, "create"), (PLANNER, "advance"), (PLANNER, "advance"),
                                                     (PLANNER, "advance"), (PLANNER, "finish")]
    assert r.evaluate(observe(r, devices), now + MIN) == []


def test_a_stage_waits_for_devices_samples_and_time() -> None:
    devices = fleet()
    r = new(5)
    (d,) = r.evaluate(observe(r, devices, samples=40), T0 + 2 * MIN)
    assert d.kind == "wait" and d.stage == "shadow"
    assert dict(d.missing or {}) == {"devices": 0, "samples": 60, "time_s": 480.0}
    (d,) = r.evaluate(observe(r, devices, roles={"pi-000": "pending", "pi-001": "candidate"}), T0 + 20 * MIN)
    assert d.kind == "wait" and dict(d.missing or {})["devices"] >= 1 and "not yet in their role" in d.reason
    (d,) = r.evaluate(observe(r, devices), T0 + 20 * MIN)
    assert (d.kind, d.stage) == ("advance", "step-0")
    assert r.stage_started_ms == T0 + 20 * MIN


def test_level_5_rolls_back_on_a_failed_gate() -> None:
    devices = fleet()
    r = new(5)
    decisions, _ = drive(r, devices, T0, p99_ms=35.0)
    assert acts(decisions) == [("rollback", "shadow"), ("done", "rolled_back")]
    rollback = next(d for d in decisions if d.kind == "rollback")
    p99 = gate(rollback, "p99_latency_ms")
    assert (p99.status, p99.value, p99.limit, p99.op) == ("fail", 35.0, 20.0, "<=")
    assert "p99_latency_ms 35" in rollback.reason
    assert r.state == "rolled_back" and set(r.assignment(devices).values()) == {"baseline"}


def test_rollback_waits_for_devices_then_times_out_into_failed() -> None:
    devices = fleet()
    r = new(5, extra="")
    now = T0 + 20 * MIN
    r.evaluate(observe(r, devices, p99_ms=35.0), now)
    assert r.state == "rolling_back"
    stuck = {"pi-000": "shadow"}
    (d,) = r.evaluate(observe(r, devices, roles=stuck), now + MIN)
    assert d.kind == "wait" and dict(d.missing or {})["devices"] == 1
    (d,) = r.evaluate(observe(r, devices, roles=stuck), now + 31 * MIN)
    assert (d.kind, d.stage, r.state) == ("done", "failed", "failed") and d.notify and "pi-000" in d.reason
    (d,) = r.rollback("alice", "retry after fixing pi-000", now + 40 * MIN)
    assert (d.kind, r.state) == ("rollback", "rolling_back")
    (d,) = r.evaluate(observe(r, devices), now + 41 * MIN)
    assert (d.kind, d.stage, r.state) == ("done", "rolled_back", "rolled_back")


@pytest.mark.parametrize("level", [1, 2])
def test_levels_1_and_2_wait_for_approval_at_every_step(level: int) -> None:
    devices = fleet()
    r = new(level)
    now = T0
    entered = []
    for to in ("step-0", "step-1", "step-2", DONE):
        decisions, now = drive(r, devices, now)
        assert acts(decisions) == [("request_approval", to)]
        req = decisions[-1]
        assert req.notify and r.state == "waiting_approval" and r.pending_approval is not None
        assert all(g.status == "pass" for g in req.gate_results)
        # Nothing moves without a person, however long it waits.
        assert [d.kind for d in r.evaluate(observe(r, devices), now + 600 * MIN)] == ["wait"]
        now += 600 * MIN
        (d,) = r.approve("alice", now)
        assert (d.kind, d.stage) == ("advance" if to != DONE else "done", to)
        entered.append(r.stage)
    assert entered == ["step-0", "step-1", "step-2", DONE] and r.state == "done"
    assert [e.actor for e in r.events if e.what == "approve"] == ["alice"] * 4
    assert LEVELS[level].outputs == ("shadow" if level == 1 else "suggest")


def test_level_2_shows_a_failed_gate_to_the_person_who_decides() -> None:
    devices = fleet()
    r = new(2, shadow=None)
    decisions, now = drive(r, devices, T0, error_rate=0.05)
    assert acts(decisions) == [("request_approval", "step-1")]
    assert gate(decisions[-1], "error_rate").status == "fail" and "reject to roll back" in decisions[-1].reason
    (d,) = r.reject("bob", now + MIN, "error rate")
    assert (d.kind, r.state) == ("rollback", "rolling_back") and "bob rejected: error rate" in d.reason


def test_level_3_waits_for_a_person_on_a_failed_gate() -> None:
    devices = fleet()
    r = new(3, shadow=None)
    decisions, now = drive(r, devices, T0, p99_ms=25.0)
    assert acts(decisions) == [("request_approval", "step-1")]
    assert "approve to continue to step-1 anyway" in decisions[-1].reason
    (d,) = r.approve("alice", now + MIN)
    assert (d.kind, d.stage, r.state) == ("advance", "step-1", "running")
    decisions, now = drive(r, devices, now + MIN, p99_ms=25.0)
    assert acts(decisions) == [("request_approval", "step-2")]
    (d,) = r.reject("alice", now + MIN)
    assert d.kind == "rollback" and r.state == "rolling_back"
    decisions, _ = drive(r, devices, now + MIN)
    assert acts(decisions) == [("done", "rolled_back")]
    whats = [(e.actor, e.what) for e in r.events]
    assert whats == [(PLANNER, "create"), (PLANNER, "ask"), ("alice", "approve"), (PLANNER, "ask"),
                     ("alice", "reject"), (PLANNER, "rolled_back")]


def test_level_3_advances_alone_when_gates_pass() -> None:
    devices = fleet()
    r = new(3)
    decisions, _ = drive(r, devices, T0)
    assert acts(decisions)[-1] == ("done", DONE) and all(d.notify for d in decisions if d.kind != "wait")


def test_level_4_rolls_back_alone_and_notifies() -> None:
    devices = fleet()
    r = new(4, shadow=None, extra="[review]\nbelow_score = 0.6\nclasses = [3, 8]\n")
    (d,) = Rollout.from_dict(r.to_dict()).evaluate(observe(r, devices), T0 + 20 * MIN)
    assert (d.kind, d.stage, d.notify) == ("advance", "step-1", True)
    decisions, _ = drive(r, devices, T0, accuracy=0.80)
    assert acts(decisions) == [("rollback", "step-0"), ("done", "rolled_back")]
    assert all(d.notify for d in decisions if d.kind != "wait")
    acc = gate(decisions[0], "accuracy")
    assert (acc.status, acc.value, acc.limit, acc.op) == ("fail", 0.8, 0.93, ">=")
    # Outputs matching [review] wait for a person at level 4 only.
    assert needs_review(r.plan, 3, 0.99) and needs_review(r.plan, 1, 0.5) and not needs_review(r.plan, 1, 0.9)
    level5 = parse_plan(plan_text(5, extra="[review]\nbelow_score = 0.6\n"))
    assert not needs_review(level5, 1, 0.1)


def test_install_failures_fail_at_once() -> None:
    devices = fleet()
    r = new(5, shadow=None)
    first = next(d for d, role in r.assignment(devices).items() if role == "candidate")
    (d,) = r.evaluate(observe(r, devices, samples=0, roles={first: "failed"}), T0 + MIN)
    assert d.kind == "rollback" and gate(d, "install").status == "fail" and first in gate(d, "install").detail


# -- unknown data never passes -----------------------------------------------------------------------

def test_a_missing_metric_never_passes() -> None:
    devices = fleet()
    r = new(5)
    (d,) = r.evaluate(observe(r, devices, p99_ms=None), T0 + 600 * MIN)
    assert d.kind == "wait" and r.stage == "shadow" and "p99_latency_ms" in d.reason
    p99 = gate(d, "p99_latency_ms")
    assert (p99.status, p99.value, p99.limit) == ("unknown", None, 20.0)
    (d,) = r.evaluate(observe(r, devices, shadow_agreement=None), T0 + 601 * MIN)
    assert d.kind == "wait" and gate(d, "shadow_agreement").status == "unknown"
    (d,) = r.evaluate(observe(r, devices), T0 + 603 * MIN)
    assert (d.kind, d.stage) == ("advance", "step-0")
    (d,) = r.evaluate(observe(r, devices, accuracy_n=1), T0 + 1200 * MIN)
    assert d.kind == "wait" and gate(d, "accuracy").status == "unknown" and "need 50" in gate(d, "accuracy").detail
    (d,) = r.evaluate(observe(r, devices), T0 + 1201 * MIN)
    assert (d.kind, d.stage) == ("advance", "step-1")


def test_one_device_without_data_is_enough_to_wait() -> None:
    devices = fleet()
    r = new(5, shadow=None)
    obs = observe(r, devices)
    cand = next(d for d in obs.devices if d.role == "candidate")
    blind = Observations(tuple(replace(o, error_rate=None) if o is cand else o for o in obs.devices), VERSIONS)
    (d,) = r.evaluate(blind, T0 + 20 * MIN)
    assert d.kind == "wait" and gate(d, "error_rate").status == "unknown" and cand.device_id in \
        gate(d, "error_rate").detail


def test_at_100_percent_drift_needs_the_previous_versions_kpis() -> None:
    devices = fleet()
    r = new(5, shadow=None, steps=(100,))
    (d,) = r.evaluate(observe(r, devices, versions={}), T0 + 20 * MIN)
    assert d.kind == "wait" and gate(d, "drift").status == "unknown" and gate(d, "accuracy").status == "unknown"
    (d,) = r.evaluate(observe(r, devices, drift_score=0.6), T0 + 21 * MIN)
    drift = gate(d, "drift")
    assert (d.kind, drift.status, drift.value, drift.limit) == ("done", "pass", 0.6, 0.7)
    assert "version 3" in drift.detail


def test_drift_worse_than_the_baseline_fails() -> None:
    devices = fleet()
    r = new(5, shadow=None)
    (d,) = r.evaluate(observe(r, devices, drift_score=0.9), T0 + 20 * MIN)
    drift = gate(d, "drift")
    assert d.kind == "rollback" and (drift.status, drift.value, drift.limit) == ("fail", 0.9, 0.7)
    assert "baseline device(s)" in drift.detail


def test_no_targeted_device_waits() -> None:
    r = new(5)
    (d,) = r.evaluate(Observations(), T0 + 600 * MIN)
    assert d.kind == "wait" and "no device targeted" in d.reason and r.state == "running"


# -- people's commands -------------------------------------------------------------------------------

def test_pause_and_resume() -> None:
    devices = fleet()
    r = new(5)
    assert r.pause("carol", T0 + MIN, "checking dashboards") == []
    assert r.state == "paused"
    (d,) = r.evaluate(observe(r, devices), T0 + 600 * MIN)
    assert d.kind == "wait" and "paused by carol: checking dashboards" in d.reason and r.stage == "shadow"
    with pytest.raises(IllegalAction, match="cannot approve while paused by carol"):
        r.approve("dave", T0 + 601 * MIN)
    assert r.resume("carol", T0 + 602 * MIN) == []
    (d,) = r.evaluate(observe(r, devices), T0 + 603 * MIN)
    assert (d.kind, d.stage) == ("advance", "step-0")
    assert [e.what for e in r.events] == ["create", "pause", "resume", "advance"]
    assert r.events[1].actor == "carol" and r.events[1].time_ms == T0 + MIN


def test_a_pause_while_waiting_drops_the_request_and_resume_asks_again() -> None:
    devices = fleet()
    r = new(1)
    drive(r, devices, T0)
    assert r.state == "waiting_approval"
    r.pause("carol")
    assert r.pending_approval is None
    r.resume("carol")
    (d,) = r.evaluate(observe(r, devices), T0 + 100 * MIN)
    assert (d.kind, d.stage) == ("request_approval", "step-0")


def test_waiting_for_approval_reports_changed_gate_results() -> None:
    devices = fleet()
    r = new(2)
    _, now = drive(r, devices, T0)
    (d,) = r.evaluate(observe(r, devices, error_rate=0.2), now + MIN)
    assert d.kind == "request_approval" and gate(d, "error_rate").status == "fail" and r.state == "waiting_approval"
    assert r.pending_approval is not None and "fail" in json.dumps(r.pending_approval)


@pytest.mark.parametrize(("setup", "action", "message"), [
    ([], lambda r: r.approve("a", T0 + 1), "cannot approve while running stage shadow (nothing waits for approval)"
                                           "; approve is allowed only while waiting_approval"),
    ([], lambda r: r.reject("a"), "cannot reject while running"),
    ([], lambda r: r.resume("a"), "cannot resume while running"),
    (["pause"], lambda r: r.pause("a"), "cannot pause while paused by a"),
    (["rollback"], lambda r: r.rollback("a", "again"), "cannot rollback while rolling_back"),
    (["rollback"], lambda r: r.pause("a"), "pause is allowed only while running or waiting_approval"),
    (["rollback", "back"], lambda r: r.resume("a"), "cannot resume while rolled_back"),
    (["rollback", "back"], lambda r: r.rollback("a", "x"), "cannot rollback while rolled_back"),
])
def test_illegal_actions_say_why(setup: list[str], action: Any, message: str) -> None:
    devices = fleet()
    r = new(5)
    for step in setup:
        if step == "pause":
            r.pause("a")
        elif step == "rollback":
            r.rollback("a", "testing")
        else:
            r.evaluate(observe(r, devices), T0 + MIN)
    before = r.to_dict()
    with pytest.raises(IllegalAction) as info:
        action(r)
    assert message in str(info.value) and str(info.value).startswith("rollout digits-v4-r1: ")
    assert info.value.state == r.state and info.value.action in str(info.value)
    assert r.to_dict() == before


def test_commands_check_who_acts_and_why() -> None:
    r = new(5)
    for by in ("", "  ", PLANNER, None):
        with pytest.raises(RolloutError, match="'by' must name the person"):
            r.pause(by)  # type: ignore[arg-type]
    with pytest.raises(RolloutError, match="needs a reason"):
        r.rollback("a", "")
    with pytest.raises(RolloutError, match="now_ms must be"):
        r.pause("a", -5)


def test_a_finished_rollout_can_still_be_rolled_back() -> None:
    devices = fleet()
    r = new(5)
    _, now = drive(r, devices, T0)
    (d,) = r.rollback("alice", "customer complaints", now + MIN)
    assert (d.kind, d.stage, r.state) == ("rollback", DONE, "rolling_back")
    assert set(r.assignment(devices).values()) == {"baseline"}


# -- inputs ------------------------------------------------------------------------------------------

def test_observations_from_plain_dicts() -> None:
    devices = fleet(5)
    r = new(5, shadow=None, steps=(100,))
    raw = {"devices": [{"device_id": d.device_id, "tags": sorted(d.tags), "models": sorted(d.models),
                        "role": "candidate", "samples": 500, **GOOD} for d in devices],
           "versions": {PREVIOUS: {"drift_score": 0.2, "accuracy_n": 500, "accuracy": 0.95}}}
    (d,) = r.evaluate(raw, T0 + 20 * MIN)
    assert (d.kind, d.stage) == ("done", DONE)
    row = {"model": "digits_mlp", "version": "3", "p99_ms": {"worst": 12.5, "median": 9.0, "devices": 4},
           "error_rate": 0.002, "drift_score": 0.3, "accuracy": {"n": 40, "accuracy": 0.9}}
    assert VersionStats.from_fleet_row(row) == VersionStats("3", 12.5, 0.002, 0.3, 40, 0.9)


@pytest.mark.parametrize(("raw", "message"), [
    ({"devices": [{"device_id": "a", "role": "active"}]}, "role must be one of"),
    ({"devices": [{"device_id": "a", "role": "baseline", "samples": -1}]}, "samples must be an integer >= 0"),
    ({"devices": [{"device_id": "a", "role": "baseline", "error_rate": 2.0}]}, "error_rate must be a number in [0, 1]"),
    ({"devices": [{"device_id": "a", "role": "baseline", "p99": 1}]}, "unknown fields ['p99']"),
    ({"devices": [{"device_id": "a", "role": "baseline"}] * 2}, "observed twice"),
    ({"devices": [{"device_id": "a", "role": "baseline", "tags": "site:lab"}]}, "tags must be a collection"),
    ({"versions": {"3": {"accuracy": float("nan")}}}, "version '3': accuracy must be a number"),
    ({"device": []}, "observations must be an object with devices and versions"),
])
def test_bad_observations_are_refused(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ObservationError) as info:
        new(5).evaluate(raw, T0)
    assert message in str(info.value)


def test_a_rollout_checks_what_it_is_built_from() -> None:
    plan = parse_plan(plan_text())
    with pytest.raises(RolloutError, match="not the plan's model"):
        Rollout(plan, "r1", Bundle("other", "4", "ab" * 32, 1), "3", now_ms=T0)
    with pytest.raises(RolloutError, match="already running"):
        Rollout(plan, "r1", CANDIDATE, "4", now_ms=T0)
    with pytest.raises(RolloutError, match="rollout id"):
        Rollout(plan, "bad id", CANDIDATE, "3", now_ms=T0)
    with pytest.raises(RolloutError, match="sha256"):
        Bundle("digits_mlp", "4", "XYZ", 1)


def test_the_levels_table() -> None:
    assert sorted(LEVELS) == [1, 2, 3, 4, 5]
    assert [LEVELS[n].advance for n in range(1, 6)] == ["approval", "approval", "auto", "auto", "auto"]
    assert [LEVELS[n].on_gate_failure for n in range(1, 6)] == ["ask", "ask", "ask", "rollback", "rollback"]
    assert [n for n in LEVELS if LEVELS[n].review] == [4]
    assert set(planner.__all__) <= set(dir(planner))


# -- persistence -------------------------------------------------------------------------------------

def roundtrip(r: Rollout) -> Rollout:
    return Rollout.from_dict(json.loads(json.dumps(r.to_dict())))


def test_persistence_round_trip_mid_rollout_behaves_the_same() -> None:
    devices = fleet()
    r = new(2)
    _, now = drive(r, devices, T0)
    r.approve("alice", now + MIN)
    _, now = drive(r, devices, now + MIN)
    assert (r.state, r.stage) == ("waiting_approval", "step-0")
    copy = roundtrip(r)
    assert copy.to_dict() == r.to_dict() and copy.events == r.events and copy.plan == r.plan
    assert copy.assignment(devices) == r.assignment(devices)
    for x in (r, copy):
        x.approve("bob", now + MIN)
    a, _ = drive(r, devices, now + MIN)
    b, _ = drive(copy, devices, now + MIN)
    assert a == b and r.to_dict() == copy.to_dict()
    r.pause("carol")
    assert roundtrip(r).to_dict() == r.to_dict()


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda d: d.update(schema="cloud-sync.rollout/0"), "expected schema 'cloud-sync.rollout/1'"),
    (lambda d: d.update(state="flying"), "state 'flying' is not one of"),
    (lambda d: d.update(stage="step-7"), "stage 'step-7' is not one of"),
    (lambda d: d.update(pending=None), "a pending approval goes with waiting_approval"),
    (lambda d: d.update(stage_started_ms="soon"), "missing or malformed field"),
    (lambda d: d.pop("events"), "missing or malformed field"),
    (lambda d: d["plan"].update(text=d["plan"]["text"].replace("percent = 100", "percent = 99")),
     "its plan no longer loads"),
])
def test_a_bad_stored_rollout_is_refused(tamper: Any, message: str) -> None:
    r = new(1)
    drive(r, fleet(), T0)
    d = r.to_dict()
    tamper(d)
    with pytest.raises(RolloutError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Rollout.from_dict(d)


_ACTIONS = st.sampled_from(["good", "bad", "blind", "failed", "approve", "reject", "pause", "resume", "rollback"])


@settings(max_examples=60, deadline=None)
@given(level=st.integers(1, 5), actions=st.lists(_ACTIONS, max_size=25))
def test_any_sequence_keeps_the_rollout_consistent(level: int, actions: list[str]) -> None:
    devices = fleet(12)
    r = new(level, steps=(25, 100))
    now = T0
    for action in actions:
        now += 10 * MIN
        before = r.to_dict()
        try:
            if action in ("good", "bad", "blind", "failed"):
                cand: dict[str, Any] = {"good": {}, "bad": {"p99_ms": 99.0}, "blind": {"p99_ms": None}}.get(action, {})
                roles = None
                if action == "failed":
                    roles = {d: "failed" for d, role in r.assignment(devices).items() if role != "baseline"}
                decisions = r.evaluate(observe(r, devices, roles=roles, **cand), now)
                assert all(d.kind in DECISIONS for d in decisions) and len(decisions) <= 1
                if action == "blind" and r.state in ("running", "waiting_approval"):
                    assert before["stage"] == r.stage
            elif action == "approve":
                r.approve("alice", now)
            elif action == "rollback":
                r.rollback("alice", "test", now)
            else:
                getattr(r, action)("alice", now)
        except IllegalAction:
            assert r.to_dict() == before
        assert r.state in STATES
        assert (r.state == "waiting_approval") == (r.pending_approval is not None)
        assert r.events[-1].state == r.state
        assert roundtrip(r).to_dict() == r.to_dict()
