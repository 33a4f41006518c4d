"""Rollout core: the state table, persistence and resume, anti-rollback, versions, output status, shadow
statistics and the device's self-check. Pure: no clock, broker or model needed."""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.core import rollout
from edge_runtime.core.rollout import (
    DELTA_EDGES,
    EVENTS,
    MAX_HISTORY,
    RESUME_ACTIONS,
    ROLLOUT_ERROR_REASONS,
    SETTLED_STATES,
    STATES,
    TRANSITIONS,
    Candidate,
    IllegalTransition,
    ModelRef,
    ReviewRule,
    RolloutError,
    RolloutMachine,
    SelfCheck,
    ShadowStats,
    is_newer,
    legal_events,
    output_status,
    parse_version,
)

SHA = "0123456789abcdef" * 4
NAME = "digits_mlp"

# A way into every state from a fresh machine serving NAME version 3.
PATHS: dict[str, list[str]] = {
    "idle": [],
    "downloading": ["start_download"],
    "verifying": ["start_download", "download_done"],
    "shadow": ["start_download", "download_done", "verified_shadow"],
    "active": ["start_download", "download_done", "verified_activate"],
    "failed": ["start_download", "download_failed"],
    "rolled_back": ["start_download", "download_done", "verified_shadow", "rollback"],
}


def next_version(m: RolloutMachine, name: str = NAME) -> str:
    return str(parse_version(m.highest_run.get(name, "0"))[0] + 1)


def step(m: RolloutMachine, event: str, now_ms: int = 1000, **details: Any) -> rollout.Transition:
    if event == "start_download":
        details = {"rollout_id": f"ro-{now_ms}", "name": NAME, "version": next_version(m), "sha256": SHA,
                   **details}
    return m.apply(event, reason=f"test {event}", now_ms=now_ms, **details)


def machine_in(state: str) -> RolloutMachine:
    m = RolloutMachine(ModelRef(NAME, "3"))
    for i, event in enumerate(PATHS[state]):
        step(m, event, now_ms=1000 + i)
    assert m.state == state
    return m


# -- the table ------------------------------------------------------------------------------------------


def test_table_is_closed_over_states_and_events_and_every_state_is_reachable() -> None:
    for (state, event), target in TRANSITIONS.items():
        assert state in STATES and event in EVENTS and target in STATES
    assert set(PATHS) == set(STATES)
    for state in STATES:
        machine_in(state)
    assert set(rollout.ROLLOUT_ERROR_REASONS) >= {"illegal_transition", "not_newer", "bad_state"}
    assert set(RESUME_ACTIONS) == set(STATES)


def test_module_docstring_table_is_the_table() -> None:
    doc = rollout.__doc__ or ""
    rows = re.findall(r"^\| ([a-z_, ]+) \| `([a-z_]+)` \| ([a-z_]+) \|", doc, flags=re.MULTILINE)
    documented = {(s.strip(), event): target for states, event, target in rows for s in states.split(",")}
    assert documented == dict(TRANSITIONS)


@pytest.mark.parametrize(("state", "event"), list(itertools.product(STATES, EVENTS)))
def test_every_state_event_pair_is_legal_by_the_table_or_raises(state: str, event: str) -> None:
    m = machine_in(state)
    before = m.to_dict()
    if (state, event) in TRANSITIONS:
        t = step(m, event, now_ms=5000)
        assert (t.from_state, t.to_state, t.event, t.time_ms) == (state, TRANSITIONS[state, event], event, 5000)
        assert m.state == TRANSITIONS[state, event]
        assert m.history[-1] == t
        assert m.reason == f"test {event}"
        assert m.since_ms == 5000
    else:
        with pytest.raises(IllegalTransition) as ei:
            step(m, event, now_ms=5000)
        e = ei.value
        assert (e.reason, e.state, e.event) == ("illegal_transition", state, event)
        assert e.legal == legal_events(state) == m.legal_events
        assert f"'{event}' is not legal in state '{state}'" in str(e)
        assert m.to_dict() == before  # an illegal event changes nothing
        assert not m.can(event)


def test_legal_events_per_state() -> None:
    assert legal_events("idle") == ("start_download",)
    assert legal_events("downloading") == ("download_done", "download_failed", "abort", "resume")
    assert legal_events("verifying") == ("verify_failed", "verified_shadow", "verified_activate", "abort", "resume")
    assert legal_events("shadow") == ("promote", "rollback", "abort", "resume")
    assert legal_events("active") == ("start_download", "rollback", "resume")
    for settled in SETTLED_STATES:
        assert "start_download" in legal_events(settled)


def test_unknown_event_is_refused_with_the_legal_ones() -> None:
    m = machine_in("shadow")
    with pytest.raises(IllegalTransition) as ei:
        m.apply("explode", reason="x", now_ms=1)
    assert ei.value.reason == "unknown_event"
    assert ei.value.legal == ("promote", "rollback", "abort", "resume")
    assert "unknown event 'explode'" in str(ei.value)


def test_effects_of_a_shadow_rollout_promote_and_rollback() -> None:
    m = RolloutMachine(ModelRef(NAME, "3"))
    assert m.highest_run == {NAME: "3"} and m.previous is None and m.candidate is None
    step(m, "start_download", rollout_id="ro-12")
    assert (m.rollout_id, m.candidate) == ("ro-12", Candidate(NAME, "4", SHA))
    assert m.previous == m.active == ModelRef(NAME, "3")
    assert m.highest_run == {NAME: "3"}            # downloading is not running
    step(m, "download_done")
    step(m, "verified_shadow")
    assert m.shadow_model == ModelRef(NAME, "4") and m.active == ModelRef(NAME, "3")
    assert m.highest_run == {NAME: "3"}            # a shadow served no answer: not counted yet
    step(m, "promote")
    assert m.highest_run == {NAME: "4"}            # promoted: it serves
    assert m.active == ModelRef(NAME, "4") and m.previous == ModelRef(NAME, "3") and m.shadow_model is None
    step(m, "rollback")
    assert m.state == "rolled_back" and m.active == ModelRef(NAME, "3")   # back to what served before
    assert m.highest_run == {NAME: "4"}
    # a new rollout from rolled_back needs a version above 4, and remembers 3 as its previous
    step(m, "start_download")
    assert m.candidate is not None and m.candidate.version == "5" and m.previous == ModelRef(NAME, "3")


def test_rollback_from_shadow_keeps_the_serving_model_and_abort_goes_idle() -> None:
    m = machine_in("shadow")
    step(m, "rollback")
    assert m.active == ModelRef(NAME, "3") and m.state == "rolled_back"
    for state in ("downloading", "verifying", "shadow"):
        m = machine_in(state)
        cand = m.candidate
        step(m, "abort")
        assert m.state == "idle" and m.active == ModelRef(NAME, "3") and m.candidate == cand
        step(m, "start_download")     # idle is settled: a new rollout may start
        assert m.state == "downloading"


def test_direct_activation_and_a_rollout_from_active() -> None:
    m = machine_in("active")
    assert m.active == ModelRef(NAME, "4") and m.previous == ModelRef(NAME, "3") and m.highest_run[NAME] == "4"
    step(m, "start_download")
    assert m.previous == ModelRef(NAME, "4") and m.candidate is not None and m.candidate.version == "5"
    step(m, "download_failed")
    assert m.state == "failed" and m.active == ModelRef(NAME, "4")


def test_first_model_by_rollout_then_rollback_leaves_none() -> None:
    m = RolloutMachine()
    m.apply("start_download", reason="provision", now_ms=1, rollout_id="ro-1", name="det", version="1.0.0",
            sha256=SHA)
    for event in ("download_done", "verified_activate", "rollback"):
        m.apply(event, reason="r", now_ms=2)
    assert m.active is None and m.previous is None and m.highest_run == {"det": "1.0.0"}


@pytest.mark.parametrize(("details", "reason"), [
    ({}, "bad_value"),                                                                  # missing details
    ({"rollout_id": "ro-1", "name": NAME, "version": "9", "sha256": SHA, "x": 1}, "bad_value"),  # unknown one
    ({"rollout_id": "ro 1", "name": NAME, "version": "9", "sha256": SHA}, "bad_value"),
    ({"rollout_id": "ro-1", "name": "", "version": "9", "sha256": SHA}, "bad_value"),
    ({"rollout_id": "ro-1", "name": NAME, "version": "9.1", "sha256": SHA}, "bad_version"),
    ({"rollout_id": "ro-1", "name": NAME, "version": 9.0, "sha256": SHA}, "bad_type"),
    ({"rollout_id": "ro-1", "name": NAME, "version": "9", "sha256": SHA.upper()}, "bad_value"),
    ({"rollout_id": "ro-1", "name": NAME, "version": "9", "sha256": None}, "bad_type"),
    ({"rollout_id": "ro-1", "name": NAME, "version": "2", "sha256": SHA}, "not_newer"),
])
def test_bad_start_download_changes_nothing(details: dict[str, Any], reason: str) -> None:
    m = machine_in("idle")
    before = m.to_dict()
    with pytest.raises(RolloutError) as ei:
        m.apply("start_download", reason="cmd", now_ms=1, **details)
    assert ei.value.reason == reason
    assert ei.value.reason in ROLLOUT_ERROR_REASONS
    assert m.to_dict() == before


def test_reason_time_and_details_of_other_events_are_checked() -> None:
    m = machine_in("downloading")
    before = m.to_dict()
    for kwargs, reason in [({"reason": 3, "now_ms": 1}, "bad_type"), ({"reason": "x" * 300, "now_ms": 1}, "bad_value"),
                           ({"reason": "x", "now_ms": True}, "bad_type"), ({"reason": "x", "now_ms": -1}, "bad_value"),
                           ({"reason": "x", "now_ms": 1, "bytes": 10}, "bad_value")]:
        with pytest.raises(RolloutError) as ei:
            m.apply("download_done", **kwargs)
        assert ei.value.reason == reason, kwargs
    assert m.to_dict() == before


def test_history_is_bounded() -> None:
    m = machine_in("downloading")
    for i in range(3 * MAX_HISTORY):
        m.resume(now_ms=10_000 + i)
    assert len(m.history) == MAX_HISTORY
    assert m.history[-1].time_ms == 10_000 + 3 * MAX_HISTORY - 1
    assert RolloutMachine.from_dict(json.loads(json.dumps(m.to_dict()))).to_dict() == m.to_dict()


# -- persistence and resume -------------------------------------------------------------------------------


@pytest.mark.parametrize("state", STATES)
def test_persistence_round_trip_and_resume(state: str) -> None:
    m = machine_in(state)
    d = json.loads(json.dumps(m.to_dict()))
    assert d["schema"] == rollout.SCHEMA
    loaded = RolloutMachine.from_dict(d)
    assert loaded.to_dict() == m.to_dict()
    loaded2, problem = RolloutMachine.from_dict_or_reset(d)
    assert problem is None and loaded2.to_dict() == m.to_dict()

    action = loaded.resume(now_ms=9_000)
    assert action == RESUME_ACTIONS[state]
    assert loaded.state == state                       # everything comes back as it was
    assert (loaded.candidate, loaded.active, loaded.previous, loaded.highest_run) == (
        m.candidate, m.active, m.previous, m.highest_run)
    if state in ("downloading", "verifying", "shadow", "active"):
        assert loaded.history[-1].event == "resume" and loaded.history[-1].time_ms == 9_000
    else:
        assert loaded.to_dict()["history"] == m.to_dict()["history"]


def test_resume_actions() -> None:
    assert {s: machine_in(s).resume(now_ms=1) for s in STATES} == {
        "idle": "serve", "downloading": "download", "verifying": "verify", "shadow": "shadow", "active": "serve",
        "rolled_back": "serve", "failed": "serve"}
    m = machine_in("verifying")
    m.resume(now_ms=2)
    step(m, "verified_shadow")            # a re-verified candidate goes on as before
    m = machine_in("downloading")
    m.resume(now_ms=2)
    step(m, "download_done")
    assert m.state == "verifying"


def test_loaded_machine_keeps_working() -> None:
    m = RolloutMachine.from_dict(json.loads(json.dumps(machine_in("shadow").to_dict())))
    step(m, "promote")
    assert m.active == ModelRef(NAME, "4")
    step(m, "rollback")
    assert m.active == ModelRef(NAME, "3")


def _corrupt(mutate: Any) -> dict[str, Any]:
    d = copy.deepcopy(machine_in("shadow").to_dict())
    mutate(d)
    return d


CORRUPTIONS = {
    "not_a_dict": lambda: [1, 2],
    "none": lambda: None,
    "wrong_schema": lambda: _corrupt(lambda d: d.update(schema="edge-runtime.rollout/9")),
    "unknown_state": lambda: _corrupt(lambda d: d.update(state="exploded")),
    "unhashable_state": lambda: _corrupt(lambda d: d.update(state=["shadow"])),
    "missing_history": lambda: _corrupt(lambda d: d.pop("history")),
    "unknown_key": lambda: _corrupt(lambda d: d.update(extra=1)),
    "bad_sha": lambda: _corrupt(lambda d: d["candidate"].update(sha256="xyz")),
    "bad_version": lambda: _corrupt(lambda d: d["active"].update(version="three")),
    "highest_not_object": lambda: _corrupt(lambda d: d.update(highest_run=[["digits_mlp", "4"]])),
    "history_illegal_step": lambda: _corrupt(lambda d: d["history"].append(["idle", "active", "promote", "r", 1])),
    "history_unhashable_event": lambda: _corrupt(lambda d: d["history"].append(["shadow", "active", {}, "r", 1])),
    "history_short_entry": lambda: _corrupt(lambda d: d["history"].append(["shadow", "active"])),
    "history_bool_time": lambda: _corrupt(lambda d: d["history"][0].__setitem__(4, True)),
    "state_differs_from_history": lambda: _corrupt(lambda d: d.update(state="active")),
    "no_candidate": lambda: _corrupt(lambda d: d.update(candidate=None)),
    "shadow_not_newer_than_highest": lambda: _corrupt(lambda d: d["highest_run"].update(digits_mlp="5")),
    "history_too_long": lambda: _corrupt(lambda d: d.update(history=d["history"] * MAX_HISTORY)),
    "reason_mismatch": lambda: _corrupt(lambda d: d.update(reason="something else")),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_persisted_state_is_reported_never_raised_past_reset(name: str) -> None:
    d = CORRUPTIONS[name]()
    with pytest.raises(RolloutError) as ei:
        RolloutMachine.from_dict(d)
    assert ei.value.reason == "bad_state"
    assert str(ei.value).startswith("bad_state: persisted rollout state: ")
    m, problem = RolloutMachine.from_dict_or_reset(d)
    assert problem is not None and problem.startswith("persisted rollout state")
    assert m.state == "idle" and m.candidate is None and m.history == type(m.history)()


def test_reset_keeps_what_still_validates_of_anti_rollback_and_the_serving_model() -> None:
    d = _corrupt(lambda d: d.update(state="exploded"))
    d["highest_run"]["other_model"] = "not a version"
    d["highest_run"]["third"] = "2.0.0"
    m, problem = RolloutMachine.from_dict_or_reset(d)
    assert problem is not None and "exploded" in problem
    assert m.highest_run == {NAME: "3", "third": "2.0.0"}
    assert m.active == ModelRef(NAME, "3")
    with pytest.raises(RolloutError, match="not_newer"):
        step(m, "start_download", version="3")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                    max_size=4),
                           max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_from_dict_or_reset_never_raises_on_garbage(d: Any) -> None:
    m, problem = RolloutMachine.from_dict_or_reset(d)
    assert problem is not None and m.state == "idle"


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(list(STATES)), st.data())
def test_from_dict_or_reset_never_raises_on_mutated_state(state: str, data: st.DataObject) -> None:
    d = machine_in(state).to_dict()
    key = data.draw(st.sampled_from(sorted(d)))
    d[key] = data.draw(json_values)
    m, problem = RolloutMachine.from_dict_or_reset(d)
    if problem is None:
        assert m.to_dict() == d
    else:
        assert m.state == "idle" and not m.history


# -- anti-rollback ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "accepted"), [("2", False), ("3", False), ("3.0.0", False), ("4", True),
                                                   ("3.0.1", True), ("3.0.1-rc.1", True), ("4.0.0-alpha", True),
                                                   ("3.0.0-rc.1", False), ("3.0.0+build.7", False)])
def test_anti_rollback_older_equal_newer(version: str, accepted: bool) -> None:
    m = machine_in("idle")                           # has run NAME 3
    if accepted:
        step(m, "start_download", version=version)
        assert m.state == "downloading"
    else:
        with pytest.raises(RolloutError) as ei:
            step(m, "start_download", version=version)
        assert (ei.value.reason, ei.value.model, ei.value.version) == ("not_newer", NAME, version)
        assert "anti-rollback" in str(ei.value)
        assert m.state == "idle"


def test_anti_rollback_is_per_model_and_persisted() -> None:
    m = machine_in("active")                        # NAME 4 served
    step(m, "rollback")
    with pytest.raises(RolloutError, match="not_newer"):
        step(m, "start_download", version="4")     # a version rolled back after it served is never taken again
    step(m, "start_download", name="other_model", version="1")  # another model has its own history
    for event in ("download_done", "verified_activate"):
        step(m, event)
    assert m.highest_run == {NAME: "4", "other_model": "1"}
    loaded = RolloutMachine.from_dict(json.loads(json.dumps(m.to_dict())))
    assert loaded.highest_run == {NAME: "4", "other_model": "1"}
    for name, version in ((NAME, "4"), (NAME, "1"), ("other_model", "1"), ("other_model", "0.9.0")):
        with pytest.raises(RolloutError, match="not_newer"):
            step(loaded, "start_download", name=name, version=version)
    step(loaded, "start_download", name=NAME, version="5")
    loaded.check_candidate("never_seen", "0")      # nothing run: anything goes


def test_neither_an_aborted_download_nor_a_shadow_run_burns_a_version_but_serving_does() -> None:
    m = machine_in("verifying")
    step(m, "abort")
    step(m, "start_download", version="4")        # never ran: may be offered again
    for event in ("download_done", "verified_shadow", "rollback"):
        step(m, event)
    step(m, "start_download", version="4")        # only shadowed (a ramp's later stage): may come as candidate
    for event in ("download_done", "verified_activate", "rollback"):
        step(m, event)
    with pytest.raises(RolloutError, match="not_newer"):
        step(m, "start_download", version="4")


# -- versions -------------------------------------------------------------------------------------------


def test_semver_precedence_examples_from_semver_org() -> None:
    chain = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11",
             "1.0.0-rc.1", "1.0.0", "2.0.0", "2.1.0", "2.1.1"]
    keys = [parse_version(v) for v in chain]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for lo, hi in itertools.combinations(chain, 2):
        assert is_newer(hi, lo) and not is_newer(lo, hi)
    assert parse_version("1.9.0") < parse_version("1.10.0") < parse_version("1.11.0")


def test_integer_versions_and_mixing() -> None:
    assert parse_version("7") == parse_version(7) == parse_version("7.0.0") == parse_version("007")
    assert is_newer("8", "7") and is_newer("10", "9") and not is_newer("7", "7")
    assert is_newer("7.0.1", "7") and is_newer("8", "7.5.0") and not is_newer("7", "7.0.0")
    assert not is_newer("7.0.0-rc.1", "7")
    assert parse_version("1.0.0+a") == parse_version("1.0.0+b")
    assert is_newer("0", None)


@pytest.mark.parametrize("bad", ["", "1.2", "v1.2.3", "1.2.3.4", "01.2.3", "1.02.3", "1.2.3-", "1.2.3-01",
                                 "1.2.3-a..b", "1.2.3+", "-1", " 7", "7 ", "\uff11", "1" * 65, None, 1.0, True, -3,
                                 [1]])
def test_bad_versions(bad: Any) -> None:
    with pytest.raises(RolloutError) as ei:
        parse_version(bad)
    assert ei.value.reason == "bad_version"


# -- output status --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("level", "needs_review", "expected"), [
    (1, False, "shadow"), (1, True, "shadow"),
    (2, False, "suggestion"), (2, True, "suggestion"),
    (3, False, "final"), (3, True, "final"),
    (4, False, "final"), (4, True, "pending_review"),
    (5, False, "final"), (5, True, "final"),
])
def test_output_status_table(level: int, needs_review: bool, expected: str) -> None:
    assert output_status(level, shadow=False, needs_review=needs_review) == expected
    assert output_status(level, shadow=True, needs_review=needs_review) == "shadow"
    assert expected in rollout.OUTPUT_STATUSES and level in rollout.AUTOMATION_LEVELS


@pytest.mark.parametrize(("level", "shadow", "needs_review"), [(0, False, False), (6, False, False),
                                                               (True, False, False), ("3", False, False),
                                                               (3, 1, False), (4, False, None)])
def test_output_status_refuses_bad_arguments(level: Any, shadow: Any, needs_review: Any) -> None:
    with pytest.raises(RolloutError):
        output_status(level, shadow=shadow, needs_review=needs_review)


def test_review_rule() -> None:
    r = ReviewRule.from_dict({"min_score": 0.6, "classes": [3, "cat"]})
    assert r.matches(1, 0.5) and not r.matches(1, 0.6) and not r.matches(1, 0.99)
    assert r.matches(3, 0.99) and r.matches("cat", 0.99) and not r.matches("3", 0.99)
    assert r.matches(np.int64(3), np.float32(0.9))
    assert r.matches(1, None) and r.matches(1, math.nan)            # no usable score: review
    assert ReviewRule.from_dict(r.to_dict()) == r
    assert not ReviewRule.from_dict({}).matches(3, 0.0)             # {} reviews nothing
    only_classes = ReviewRule.from_dict({"classes": [7]})
    assert only_classes.matches(7, None) and not only_classes.matches(1, None)

    labels = np.array([1, 3, 2, 2, 5])
    scores = np.array([0.9, 0.9, 0.1, np.nan, 0.7])
    assert r.mask(labels, scores).tolist() == [r.matches(int(a), float(b)) for a, b in zip(labels, scores,
                                                                                          strict=True)]
    assert r.mask(np.array(["cat", "dog"]), [0.9, 0.9]).tolist() == [True, False]
    assert r.mask(np.array([3, "dog"], dtype=object), [0.9, 0.9]).tolist() == [True, False]
    assert r.mask([], []).tolist() == []
    with pytest.raises(RolloutError):
        r.mask([1, 2], [0.5])


@pytest.mark.parametrize("bad", [[], {"min_score": "0.5"}, {"min_score": math.inf}, {"min_score": True},
                                 {"classes": 3}, {"classes": [1.5]}, {"classes": [True]}, {"classes": [[1]]},
                                 {"threshold": 0.5}, {"classes": list(range(300))}])
def test_review_rule_validation(bad: Any) -> None:
    with pytest.raises(RolloutError):
        ReviewRule.from_dict(bad)


# -- shadow statistics ------------------------------------------------------------------------------------

Batch = tuple[list[Any], list[float], list[Any], list[float], list[int]]

labels_st = st.integers(min_value=0, max_value=6)
scores_st = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def batches(draw: st.DrawFn, label_st: st.SearchStrategy[Any] = labels_st) -> Batch:
    n = draw(st.integers(min_value=0, max_value=30))
    return (draw(st.lists(label_st, min_size=n, max_size=n)), draw(st.lists(scores_st, min_size=n, max_size=n)),
            draw(st.lists(label_st, min_size=n, max_size=n)), draw(st.lists(scores_st, min_size=n, max_size=n)),
            draw(st.lists(st.integers(min_value=0, max_value=10**10), max_size=3)))


def stats_of(bs: list[Batch], max_classes: int = 64) -> ShadowStats:
    s = ShadowStats(max_classes)
    for al, a_s, cl, c_s, lat in bs:
        s.update_batch(np.array(al, dtype=np.int64), np.array(a_s), np.array(cl, dtype=np.int64), np.array(c_s),
                       np.array(lat, dtype=np.int64))
    return s


def assert_same(a: ShadowStats, b: ShadowStats) -> None:
    da, db = a.to_dict(), b.to_dict()
    for d in (da, db):
        d["delta"] = dict(d["delta"])
        ma, m2 = d["delta"].pop("mean"), d["delta"].pop("m2")
        d["_moments"] = (ma, m2)
    (ma, m2a), (mb, m2b) = da.pop("_moments"), db.pop("_moments")
    assert da == db
    assert ma == pytest.approx(mb, abs=1e-12) and m2a == pytest.approx(m2b, rel=1e-9, abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(st.lists(batches(), max_size=5), st.lists(batches(), max_size=5), st.lists(batches(), max_size=3))
def test_merge_equals_the_concatenated_stream(a: list[Batch], b: list[Batch], c: list[Batch]) -> None:
    whole = stats_of(a + b + c)
    sa, sb, sc = stats_of(a), stats_of(b), stats_of(c)
    left = sa.merge(sb).merge(sc)
    right = sa.merge(sb.merge(sc))
    assert_same(left, whole)
    assert_same(right, whole)
    assert sa.to_dict() == stats_of(a).to_dict()      # merge changes neither side
    inplace = stats_of(a)
    inplace += sb
    assert_same(inplace, stats_of(a + b))


@settings(max_examples=100, deadline=None)
@given(st.lists(batches(st.sampled_from(["cat", "dog", "bird", "a", "ü"])), max_size=4),
       st.lists(batches(st.sampled_from(["dog", "fish", "cat"])), max_size=4))
def test_merge_with_string_labels_and_a_small_cap(a: list[Batch], b: list[Batch]) -> None:
    def of(bs: list[Batch]) -> ShadowStats:
        s = ShadowStats(max_classes=8)
        for al, a_s, cl, c_s, lat in bs:
            s.update_batch(np.array(al, dtype=str), a_s, np.array(cl, dtype=str), c_s, lat)
        return s

    assert_same(of(a).merge(of(b)), of(a + b))


@settings(max_examples=100, deadline=None)
@given(st.lists(batches(), min_size=1, max_size=6))
def test_batch_boundaries_do_not_matter_and_dict_round_trips(bs: list[Batch]) -> None:
    one: Batch = ([], [], [], [], [])
    for b in bs:
        for whole, part in zip(one, b, strict=True):
            whole.extend(part)
    assert_same(stats_of(bs), stats_of([one]))
    s = stats_of(bs)
    assert ShadowStats.from_dict(json.loads(json.dumps(s.to_dict()))).to_dict() == s.to_dict()


def test_equals_a_direct_computation() -> None:
    rng = np.random.default_rng(7)
    n = 5000
    al = rng.integers(0, 10, n)
    cl = np.where(rng.random(n) < 0.85, al, rng.integers(0, 10, n))
    a_s, c_s = rng.random(n), rng.random(n)
    c_s[:7] = np.nan
    lat = rng.lognormal(14, 0.5, 400).astype(np.int64)
    s = ShadowStats()
    for i in range(0, n, 64):
        s.update_batch(al[i:i + 64], a_s[i:i + 64], cl[i:i + 64], c_s[i:i + 64], lat[i // 64 * 5: i // 64 * 5 + 5])
    s.add_errors(50)

    assert s.n == n and s.errors == 50 and s.nonfinite == 7
    assert s.agree == int((al == cl).sum())
    assert s.agreement_rate == pytest.approx((al == cl).mean())
    assert s.error_rate == pytest.approx(50 / (n + 50))
    expected: dict[tuple[int, int], int] = {}
    for x, y in zip(al.tolist(), cl.tolist(), strict=True):
        expected[x, y] = expected.get((x, y), 0) + 1
    assert s.confusion() == expected
    order: list[int] = []
    for v in np.column_stack([al, cl]).reshape(-1).tolist():
        if v not in order:
            order.append(v)
    assert s.classes == order                      # first appearance, serving label first
    d = (c_s - a_s)[7:]
    assert s.delta_mean == pytest.approx(d.mean(), rel=1e-12)
    assert s.delta_std == pytest.approx(d.std(), rel=1e-9)
    edges = [-np.inf, *DELTA_EDGES, np.inf]
    assert list(s.delta_hist) == [int(((d >= lo) & (d < hi)).sum()) for lo, hi in itertools.pairwise(edges)]
    used = lat[: (n + 63) // 64 * 5]
    for q in (0.5, 0.99):
        exact = np.sort(used)[max(1, math.ceil(q * used.size)) - 1]
        assert s.latency_quantile_ns(q) == pytest.approx(exact, rel=0.07)
    summary = s.summary()
    assert summary["n"] == n and summary["latency_p99_ms"] == pytest.approx(s.latency_quantile_ns(0.99) / 1e6,
                                                                           abs=1e-3)


@given(st.integers(min_value=0, max_value=(1 << 43) - 1))
def test_latency_buckets_hold_their_values(v: int) -> None:
    i = int(rollout._lat_index(np.array([v], dtype=np.int64))[0])
    lo, width = rollout._lat_bounds(i)
    assert 0 <= i < rollout._LAT_N
    assert lo <= v < lo + width
    assert width <= max(1, v / 8)


def test_class_cap_puts_the_rest_in_other_and_keeps_totals_exact() -> None:
    s = ShadowStats(max_classes=3)
    s.update_batch([0, 1, 2, 3, 4, 4], [0.5] * 6, [0, 1, 5, 3, 4, 6], [0.5] * 6)
    assert s.classes == [0, 1, 2]
    assert s.n == 6 and s.agree == 4
    assert s.confusion() == {(0, 0): 1, (1, 1): 1, (2, None): 1, (None, None): 3}
    assert ShadowStats.from_dict(s.to_dict()).to_dict() == s.to_dict()


def test_wire_form_is_compact_for_ten_classes() -> None:
    rng = np.random.default_rng(1)
    s = ShadowStats()
    for _ in range(20):
        n = 5000
        al = rng.integers(0, 10, n)
        cl = rng.integers(0, 10, n)   # every cell of the confusion in use
        s.update_batch(al, rng.random(n), cl, rng.random(n), rng.lognormal(13, 1.0, 200).astype(np.int64))
    wire = json.dumps(s.to_dict(), separators=(",", ":"))
    assert len(wire) < 2048, len(wire)


def test_shadow_inputs_are_checked() -> None:
    s = ShadowStats()
    with pytest.raises(RolloutError, match="differ in length"):
        s.update_batch([1, 2], [0.1, 0.2], [1], [0.3])
    with pytest.raises(RolloutError, match="one kind"):
        s.update_batch([1], [0.1], ["1"], [0.3])
    with pytest.raises(RolloutError, match="integer class ids or strings"):
        s.update_batch([1.5], [0.1], [1.5], [0.3])
    with pytest.raises(RolloutError):
        s.update_batch([1], [0.1], [1], [0.3], latency_ns=[math.nan])
    with pytest.raises(RolloutError):
        s.add_errors(-1)
    assert s.n == 0 and s.to_dict() == ShadowStats().to_dict()
    with pytest.raises(RolloutError, match="capped"):
        ShadowStats(4).merge(ShadowStats(5))
    empty = ShadowStats()
    empty.update_batch([], [], [], [])
    assert math.isnan(empty.agreement_rate) and math.isnan(empty.latency_quantile_ns(0.99))
    assert empty.summary()["latency_p99_ms"] is None


def _shadow_dict() -> dict[str, Any]:
    s = ShadowStats()
    s.update_batch([0, 1, 1], [0.5, 0.6, 0.7], [0, 1, 2], [0.5, 0.7, 0.1], [1000, 2000])
    return s.to_dict()


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(schema="edge-runtime.shadow/2"),
    lambda d: d.pop("latency"),
    lambda d: d.update(n=4),
    lambda d: d.update(agree=3),
    lambda d: d.update(agree=0),
    lambda d: d.update(classes=[0, 0, 1]),
    lambda d: d.update(classes=[0, [1], 2]),
    lambda d: d.update(confusion=d["confusion"][:-1]),
    lambda d: d.update(confusion=[*d["confusion"][:-3], 9, 9, 1]),
    lambda d: d["delta"].update(hist=d["delta"]["hist"][:-1]),
    lambda d: d["delta"].update(m2=-1.0),
    lambda d: d["delta"].update(mean=None),
    lambda d: d["latency"].update(n=5),
    lambda d: d["latency"].update(lo=10**6),
    lambda d: d["latency"].update(counts=[True]),
    lambda d: d.update(max_classes=0),
    lambda d: d.update(extra=1),
])
def test_shadow_dict_validation(mutate: Any) -> None:
    d = _shadow_dict()
    ShadowStats.from_dict(copy.deepcopy(d))
    mutate(d)
    with pytest.raises(RolloutError) as ei:
        ShadowStats.from_dict(d)
    assert ei.value.reason == "bad_state"


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_shadow_from_dict_only_raises_rollout_errors(d: Any) -> None:
    with pytest.raises(RolloutError):
        ShadowStats.from_dict(d)


# -- self-check -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("inputs", "errors", "p99", "action", "reason"), [
    (50, 50, 999.0, "ok", "too_few_samples"),
    (100, 0, 10.0, "ok", "healthy"),
    (100, 2, 50.0, "ok", "healthy"),            # at the limits: still ok
    (100, 3, 10.0, "rollback", "error_rate"),
    (100, 0, 50.1, "rollback", "latency_p99"),
    (100, 30, 500.0, "rollback", "error_rate"),  # errors judged first
    (100, 0, None, "ok", "healthy"),
    (100, 0, math.nan, "ok", "healthy"),
])
def test_self_check(inputs: int, errors: int, p99: float | None, action: str, reason: str) -> None:
    check = SelfCheck(max_error_rate=0.02, max_p99_ms=50.0, min_samples=100)
    v = check.decide(inputs, errors, p99)
    assert (v.action, v.reason, v.rollback) == (action, reason, action == "rollback")
    assert v.detail


def test_self_check_without_latency_limit_and_validation() -> None:
    check = SelfCheck.from_dict({"max_error_rate": 0.0, "min_samples": 1})
    assert check.decide(1, 0, 1e9).action == "ok"
    assert check.decide(1, 1, None).reason == "error_rate"
    assert SelfCheck.from_dict(check.to_dict()) == check
    for bad in ({"max_error_rate": 1.5, "min_samples": 1}, {"max_error_rate": 0.1, "min_samples": 0},
                {"max_error_rate": 0.1, "min_samples": 1, "max_p99_ms": -1}, {"max_error_rate": "x", "min_samples": 1},
                {"max_error_rate": 0.1}, {"max_error_rate": 0.1, "min_samples": 1, "window": 3}):
        with pytest.raises(RolloutError):
            SelfCheck.from_dict(bad)
    for args in ((10, 11, None), (-1, 0, None), (10, 0, "5")):
        with pytest.raises(RolloutError):
            check.decide(*args)


# -- purity -----------------------------------------------------------------------------------------------


def test_importing_the_module_loads_no_outside_library() -> None:
    code = "import sys, json, edge_runtime.core.rollout\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {m.split(".")[0] for m in json.loads(out.stdout)}
    assert not loaded & {"onnxruntime", "paho", "sqlite3", "cv2"}


def test_public_surface() -> None:
    assert sorted(rollout.__all__) == sorted(set(rollout.__all__))
    for name in rollout.__all__:
        assert hasattr(rollout, name), name
