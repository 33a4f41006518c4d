"""Escalation core: the policy, the per-batch decision, the budget, the payload codec, the answers awaited
and the tuning maths. Pure: no clock, model or broker needed."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_runtime.core import escalation as esc
from edge_runtime.core.escalation import (
    DRIFT,
    LOW_MARGIN,
    LOW_SCORE,
    REFUSALS,
    Budget,
    EscalationError,
    EscalationPolicy,
    PendingAnswers,
    choose,
    decide,
    decode_input,
    decode_payload,
    encode_input,
    encode_payload,
    manifest_entry,
    parse_rate,
    read_document,
    top1_and_margin,
    tuning_curve,
    tuning_document,
)
from edge_runtime.errors import ConfigError, EdgeRuntimeError

EPS = 1e-6


def softmax_rows(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


score_rows = st.builds(
    lambda n, c, seed, temp: softmax_rows(np.random.default_rng(seed).normal(size=(n, c)) * temp),
    st.integers(1, 120), st.integers(2, 12), st.integers(0, 2**32 - 1), st.floats(0.1, 8.0))


# -- the public surface ------------------------------------------------------------------------------

def test_public_surface_is_pinned() -> None:
    assert sorted(esc.__all__) == sorted([
        "DRIFT", "ESCALATION_FILE", "ESCALATION_SCHEMA", "LOW_MARGIN", "LOW_SCORE", "OUTCOMES", "REASON_NAMES",
        "REFUSALS", "RULES", "SHARES", "Budget", "Curve", "CurvePoint", "Decision", "Decoded", "Encoded",
        "EscalationError", "EscalationPolicy", "PendingAnswers", "Settled", "choose", "decide", "decode_input",
        "decode_payload", "encode_input", "encode_payload", "manifest_entry", "parse_rate", "read_document",
        "top1_and_margin", "tuning_curve", "tuning_document"])
    for name in esc.__all__:
        assert hasattr(esc, name), name


def test_importing_the_core_loads_no_onnxruntime() -> None:
    code = "import sys, json, edge_runtime.core.escalation; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    mods = {m.split(".")[0] for m in json.loads(out)}
    assert not mods & {"onnxruntime", "cv2", "onnx", "sklearn", "nacl"}


# -- policy ------------------------------------------------------------------------------------------

def test_defaults_share_nothing_and_say_so() -> None:
    p = EscalationPolicy()
    assert p.share == "none" and not p.active and not p.publishes
    assert "no condition" in p.describe()
    tuned = p.with_threshold("score", 0.7)
    assert tuned.active and not tuned.publishes
    text = tuned.describe()
    assert "never leave" in text and "nothing is escalated" in text and "share = features" in text
    sharing = EscalationPolicy(score_below=0.7, share="features")
    assert sharing.publishes and "share features" in sharing.describe()


@pytest.mark.parametrize(("d", "key", "expected"), [
    ({"score_below": 1.5}, "score_below", "(0, 1]"),
    ({"score_below": 0}, "score_below", "(0, 1]"),
    ({"margin_below": "0.2"}, "margin_below", "(0, 1]"),
    ({"on_drift": 1}, "on_drift", "true or false"),
    ({"max_per_minute": True}, "max_per_minute", "a number"),
    ({"max_per_minute": 0}, "max_per_minute", "a number"),
    ({"max_bytes_per_hour": 10.5}, "max_bytes_per_hour", "an integer"),
    ({"share": "everything"}, "share", "none, features, downscaled, raw"),
    ({"max_payload_bytes": 10}, "max_payload_bytes", "an integer in"),
    ({"max_payload_bytes": 100_000, "max_bytes_per_hour": 50_000}, "max_payload_bytes", "at most max_bytes_per_hour"),
    ({"deadline_s": -1}, "deadline_s", "seconds"),
    ({"downscale_max_side": 2}, "downscale_max_side", "[4, 4096]"),
])
def test_bad_values_name_the_key_and_what_was_expected(d: dict, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as ei:
        EscalationPolicy.from_dict(d, origin="agent.toml [escalation]")
    e = ei.value
    assert e.key == key and expected in str(e) and "got" in str(e) and str(e).startswith("agent.toml [escalation]")


def test_unknown_keys_are_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown escalation key 'score_blow'.*score_below"):
        EscalationPolicy.from_dict({"score_blow": 0.5})
    with pytest.raises(ConfigError, match="a table"):
        EscalationPolicy.from_dict([("score_below", 0.5)])


policies = st.builds(
    EscalationPolicy,
    score_below=st.none() | st.floats(0.001, 1.0), margin_below=st.none() | st.floats(0.001, 1.0),
    on_drift=st.booleans(), max_per_minute=st.floats(0.01, 1000), max_bytes_per_hour=st.integers(20_000, 10**9),
    share=st.sampled_from(esc.SHARES), max_payload_bytes=st.integers(64, 20_000), deadline_s=st.floats(0.01, 3600),
    downscale_max_side=st.integers(4, 4096))


@given(policies)
def test_policy_dict_round_trip(p: EscalationPolicy) -> None:
    d = p.to_dict()
    assert EscalationPolicy.from_dict(json.loads(json.dumps(d))) == p


def test_with_threshold_keeps_one_rule() -> None:
    p = EscalationPolicy(score_below=0.5, margin_below=0.2, share="features")
    assert p.with_threshold("margin", 0.3) == EscalationPolicy(margin_below=0.3, share="features")
    assert p.with_threshold("score", 0.6) == EscalationPolicy(score_below=0.6, share="features")
    assert not p.with_threshold(None, None).active
    with pytest.raises(ConfigError):
        p.with_threshold("entropy", 0.3)


# -- the decision ------------------------------------------------------------------------------------

def test_decision_reasons_and_drift() -> None:
    s = np.array([[0.9, 0.05, 0.05], [0.5, 0.45, 0.05], [0.45, 0.25, 0.3], [0.96, 0.02, 0.02]], np.float32)
    d = decide(EscalationPolicy(score_below=0.6, margin_below=0.1), s)
    assert d.escalate.tolist() == [False, True, True, False]
    assert d.reasons.tolist() == [0, LOW_SCORE | LOW_MARGIN, LOW_SCORE, 0]
    assert d.names(1) == ("low_score", "low_margin") and d.count == 2 and d.indices() == [1, 2] and d.any
    off = EscalationPolicy(score_below=0.6)
    assert decide(off, s, drift_active=True).reasons.tolist() == [0, LOW_SCORE, LOW_SCORE, 0]  # on_drift off
    on = EscalationPolicy(score_below=0.6, on_drift=True)
    d = decide(on, s, drift_active=True)
    assert d.escalate.all() and d.names(0) == ("drift",) and d.reasons[1] == LOW_SCORE | DRIFT
    assert decide(EscalationPolicy(on_drift=True), s).count == 0
    assert decide(EscalationPolicy(), s).count == 0


def test_decision_edge_shapes() -> None:
    p = EscalationPolicy(score_below=0.6, margin_below=0.2)
    assert decide(p, np.array([0.5, 0.5], np.float32)).escalate.tolist() == [True]  # one row, 1-D
    assert decide(p, np.array([[np.nan, 0.1]], np.float32)).escalate.tolist() == [True]  # NaN is unsure
    assert decide(p, np.zeros((0, 10), np.float32)).count == 0
    binary = np.array([[0.55], [0.95], [0.05]], np.float32)  # one probability column: margin |2p - 1|
    _, margin = top1_and_margin(binary)
    assert np.allclose(margin, [0.1, 0.9, 0.9])
    assert decide(EscalationPolicy(margin_below=0.2), binary).escalate.tolist() == [True, False, False]
    with pytest.raises(EscalationError, match=r"expected numbers, one row per input"):
        decide(p, np.zeros((2, 3, 4)))


@given(score_rows, st.floats(0.05, 1.0), st.floats(0.05, 1.0))
def test_decision_matches_its_definition_and_is_monotone(s: np.ndarray, t: float, m: float) -> None:
    top1, margin = top1_and_margin(s)
    srt = np.sort(s, axis=1)
    assert np.array_equal(top1, srt[:, -1]) and np.array_equal(margin, srt[:, -1] - srt[:, -2])
    d = decide(EscalationPolicy(score_below=t, margin_below=m), s)
    assert np.array_equal(d.escalate, (top1 < np.float32(t)) | (margin < np.float32(m)))
    assert np.array_equal(d.escalate, d.reasons != 0)
    assert np.array_equal((d.reasons & LOW_SCORE) != 0, top1 < np.float32(t))
    # raising a threshold never takes a row off the escalated set
    lo = decide(EscalationPolicy(score_below=t / 2), s).escalate
    hi = decide(EscalationPolicy(score_below=t), s).escalate
    assert not (lo & ~hi).any()


# -- the budget --------------------------------------------------------------------------------------

takes = st.lists(st.tuples(st.floats(0, 30), st.integers(0, 5000)), min_size=1, max_size=80)


@settings(max_examples=200, deadline=None)
@given(takes, st.floats(0.5, 120), st.integers(1000, 200_000))
def test_budget_never_exceeds_its_limits(seq: list[tuple[float, int]], per_min: float, per_hour: int) -> None:
    b = Budget(per_min, per_hour)
    now, taken = 0.0, []
    for dt, nbytes in seq:
        now += dt
        if b.try_take(nbytes, now):
            taken.append((now, nbytes))
    # Over any interval [t_i, t_j]: at most burst + rate * length, for counts and for bytes.
    for i in range(len(taken)):
        nb = 0
        for n, j in enumerate(range(i, len(taken)), start=1):
            nb += taken[j][1]
            span = taken[j][0] - taken[i][0]
            assert n <= b.count_capacity + span * per_min / 60 + EPS
            assert nb <= b.byte_capacity + span * per_hour / 3600 + EPS * per_hour
    assert b.taken == len(taken) and b.taken_bytes == sum(x[1] for x in taken)
    assert b.taken + sum(b.refused.values()) == len(seq)


@given(takes)
def test_budget_is_deterministic_and_a_refusal_changes_nothing(seq: list[tuple[float, int]]) -> None:
    a, b = Budget(3, 8000), Budget(3, 8000)
    now = 0.0
    for dt, nbytes in seq:
        now += dt
        before = a.available(now)
        ok = a.try_take(nbytes, now)
        assert ok == b.try_take(nbytes, now)
        if not ok:
            assert a.available(now) == before
    assert a.to_dict() == b.to_dict()


def test_budget_refusal_reasons_and_refill() -> None:
    b = Budget(2, 1000)  # 2 per minute, 1000 bytes per hour
    assert b.try_take(1001, 0.0) is False and b.refused["too_large"] == 1
    assert b.try_take(600, 0.0) and not b.try_take(600, 0.0) and b.refused["bytes"] == 1
    assert b.try_take(100, 0.0) and not b.try_take(0, 0.0) and b.refused["count"] == 1
    assert b.try_take(0, 30.0)  # one escalation refilled after 30 s
    assert not b.try_take(0, 20.0)  # a clock going backwards adds nothing
    with pytest.raises(EscalationError):
        Budget(0, 1000)
    with pytest.raises(EscalationError):
        b.try_take(-1, 40.0)


# -- the payload codec -------------------------------------------------------------------------------

def test_share_none_sends_nothing() -> None:
    e = encode_payload(np.ones(4, np.float32), "none", 4096)
    assert e.data is None and e.reason == "share_none" and "never leave" in e.detail
    assert encode_input(np.ones(4, np.float32), "none", 4096) is None


float_features = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=12),
                            elements=st.floats(-1e4, 1e4, width=32))


@given(float_features)
def test_features_round_trip_in_float16(x: np.ndarray) -> None:
    e = encode_payload(x, "features", 1 << 20)
    assert e.codec == "f16" and len(e.data) <= 1 << 20
    y = decode_input(e.data)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert np.all(np.abs(y - x) <= np.abs(x) * 2.0**-11 + 2.0**-24)


@given(float_features, st.integers(64, 2000))
def test_features_fit_the_cap_or_say_why(x: np.ndarray, cap: int) -> None:
    e = encode_payload(x, "features", cap)
    if e.data is None:
        assert e.reason == "over_cap" and str(cap) in e.detail
        return
    assert len(e.data) <= cap
    d = decode_payload(e.data)
    assert d.array.shape == x.shape
    if e.codec == "q8":  # 8 bits with an offset and scale: within half a step
        step = (float(x.max()) - float(x.min())) / 255
        assert np.all(np.abs(d.array.astype(np.float64) - x) <= step / 2 + 1e-3 * max(1.0, float(np.abs(x).max())))


@given(hnp.arrays(st.sampled_from([np.uint8, np.int16, np.int32, np.float64, np.bool_]),
                  hnp.array_shapes(min_dims=0, max_dims=4, max_side=6)))
def test_raw_round_trip_is_exact(x: np.ndarray) -> None:
    e = encode_payload(x, "raw", 1 << 20)
    if x.size == 0:
        assert e.reason == "empty"
        return
    y = decode_input(e.data)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert np.array_equal(y, x, equal_nan=True)


def test_raw_over_the_cap_is_refused_not_shrunk() -> None:
    frame = np.zeros((480, 640, 3), np.uint8)
    e = encode_payload(frame, "raw", 16384)
    assert e.data is None and e.reason == "over_cap" and "921" in e.detail


def box_mean(img: np.ndarray, k: int) -> np.ndarray:
    h, w = img.shape[:2]
    oh, ow = max(1, h // k), max(1, w // k)
    bh, bw = h // oh, w // ow
    return img[: oh * bh, : ow * bw].astype(np.float64).reshape(oh, bh, ow, bw, -1).mean(axis=(1, 3))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.sampled_from([1, 3]), st.integers(0, 2**32 - 1))
def test_downscaled_images_are_small_8_bit_block_means(h: int, w: int, c: int, seed: int) -> None:
    img = np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)
    e = encode_payload(img, "downscaled", 64 * 64 * 3 + 64, max_side=64)
    d = decode_payload(e.data)
    assert d.layout == "HWC" and d.array.dtype == np.uint8 and max(d.array.shape[:2]) <= 64
    assert np.all(np.abs(d.array.astype(np.float64) - box_mean(img, d.factor)) <= 0.5 + 1e-6)


def test_downscaled_layouts_float_images_and_the_cap() -> None:
    frame = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    d = decode_payload(encode_input(frame, "downscaled", 16384))
    assert d.array.shape == (48, 64, 3) and d.factor == 10
    small = decode_payload(encode_input(frame, "downscaled", 3000))  # halved until it fits: 24x32x3
    assert small.array.shape == (24, 32, 3) and small.factor == 20
    nchw = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    d = decode_payload(encode_input(nchw, "downscaled", 16384))
    assert d.layout == "CHW" and d.codec == "image_q8" and d.array.shape == (3, 56, 56)
    ref = nchw[0].reshape(3, 56, 4, 56, 4).mean(axis=(2, 4))
    assert np.abs(d.array - ref).max() <= 0.5 / 255 + 1e-4
    assert encode_payload(np.ones(10, np.float32), "downscaled", 4096).reason == "not_image"
    assert decode_payload(encode_input(frame, "downscaled", 64)).array.shape == (3, 4, 3)  # longest side 4
    assert encode_payload(frame, "downscaled", 50).reason == "over_cap"


def test_refusals_have_known_reasons() -> None:
    cases = [(encode_payload({"a": 1}, "raw", 4096), "not_numeric"),
             (encode_payload(np.array(["x"]), "features", 4096), "not_numeric"),
             (encode_payload(np.zeros((0, 3)), "features", 4096), "empty"),
             (encode_payload(np.array([np.nan, 1e6], np.float32), "features", 4096), "nonfinite"),
             (encode_payload(np.zeros(10_000, np.float32), "features", 4096), "over_cap")]
    for e, reason in cases:
        assert e.data is None and e.reason == reason and reason in REFUSALS
    with pytest.raises(EscalationError):
        encode_payload(np.ones(3), "everything", 4096)


def test_features_of_8_bit_and_integer_inputs() -> None:
    u8 = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert decode_payload(encode_input(u8, "features", 4096)).codec == "raw"
    big = np.arange(64, dtype=np.float32) * 2000  # past float16's range: 8 bits with a scale
    d = decode_payload(encode_input(big, "features", 4096))
    assert d.codec == "q8" and np.abs(d.array - big).max() <= (big.max() - big.min()) / 255 / 2 + 1e-2
    i64 = np.arange(1000, dtype=np.int64)
    assert decode_payload(encode_input(i64, "features", 1 << 16)).codec == "raw"
    assert decode_payload(encode_input(i64, "features", 2048)).codec == "q8"


@given(st.binary(max_size=200))
def test_decoding_garbage_raises_a_value_error_only(data: bytes) -> None:
    try:
        decode_input(data)
    except EscalationError as e:
        assert isinstance(e, ValueError) and isinstance(e, EdgeRuntimeError)


def test_truncated_and_oversize_payloads_are_refused() -> None:
    data = encode_input(np.ones((4, 4), np.float32), "features", 4096)
    for bad in (data[:-1], data + b"\0", data[:5], b"XX" + data[2:]):
        with pytest.raises(EscalationError):
            decode_input(bad)
    with pytest.raises(EscalationError, match="at most 10 bytes"):
        decode_input(data, max_bytes=10)


# -- answers awaited ---------------------------------------------------------------------------------

def test_pending_answers_on_time_late_unknown_expired() -> None:
    p = PendingAnswers(deadline_s=2.0, max_pending=10)
    p.add("a", 3, now=0.0)
    p.add("b", 4, now=0.5)
    p.add("c", 5, now=1.0)
    r = p.resolve("a", 8, now=1.5)
    assert (r.outcome, r.final, r.local, r.cloud, r.waited_s) == ("on_time", 8, 3, 8, 1.5)
    assert p.next_deadline() == 2.5
    r = p.resolve("b", 9, now=2.6)  # past its deadline, not yet expired: late, the local answer stands
    assert (r.outcome, r.final) == ("late", 4)
    assert p.expire(2.9) == []
    (e,) = p.expire(3.1)
    assert (e.id, e.outcome, e.final) == ("c", "expired", 5) and len(p) == 0
    r = p.resolve("c", 1, now=4.0)
    assert (r.outcome, r.final, r.waited_s) == ("late", 5, 3.0)
    assert p.resolve("c", 1, now=4.0).outcome == "unknown"
    assert p.resolve("zzz", 1, now=4.0).outcome == "unknown"
    assert p.stats() == {"pending": 0, "max_pending": 10, "added": 3, "on_time": 1, "late": 2, "unknown": 2,
                         "expired": 1, "dropped": 0}
    with pytest.raises(EscalationError):
        p.add("d", 1, 5.0) or p.add("d", 1, 5.0)


ops = st.lists(st.tuples(st.sampled_from(["add", "resolve", "expire"]), st.integers(0, 15), st.floats(0, 1.5)),
               max_size=120)


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(1, 6))
def test_pending_answers_stay_bounded_and_every_id_ends_once(seq: list, bound: int) -> None:
    p = PendingAnswers(deadline_s=2.0, max_pending=bound)
    now, adds, ends, waiting = 0.0, 0, 0, set()
    for op, i, dt in seq:
        now += dt
        id_ = f"id{i}"
        if op == "add" and id_ not in waiting:
            dropped = p.add(id_, i, now)
            adds += 1
            waiting.add(id_)
            if dropped is not None:
                assert dropped.outcome == "dropped" and dropped.final == dropped.local
                waiting.discard(dropped.id)
                ends += 1
        elif op == "resolve":
            r = p.resolve(id_, -1, now)
            if id_ in waiting:  # an answer for an awaited id settles it: the cloud's if on time, else the local
                assert r.outcome in ("on_time", "late")
                assert r.final == (-1 if r.outcome == "on_time" else i)
                waiting.discard(id_)
                ends += 1
            else:
                assert r.outcome in ("late", "unknown") and r.final in (i, None)
        elif op == "expire":
            for s in p.expire(now):
                assert s.id in waiting and s.outcome == "expired" and s.final == s.local
                waiting.discard(s.id)
                ends += 1
        assert len(p) <= bound and len(p) == len(waiting)
    # every id added ends exactly once (on time, late, expired or dropped) or is still awaited
    assert p.counts["added"] == adds == ends + len(p)


# -- tuning ------------------------------------------------------------------------------------------

def pair(seed: int, n: int = 400, c: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores of a device that is right mostly when confident, labels, and a cloud right 97 % of the time."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    conf = rng.uniform(0, 6, n)
    z = rng.normal(size=(n, c))
    right = rng.random(n) < 0.5 + conf / 12
    target = np.where(right, y, (y + 1) % c)
    z[np.arange(n), target] += conf
    cloud = np.where(rng.random(n) < 0.97, y, (y + 2) % c)
    return softmax_rows(z), y, cloud


@pytest.mark.parametrize("rule", ["score", "margin"])
def test_curve_shape_and_the_choice(rule: str) -> None:
    s, y, cloud = pair(0)
    curve = tuning_curve(s, y, cloud, rule=rule)
    assert len(curve.points) == 61 and curve.points[-1].target_rate == pytest.approx(0.30)
    assert curve.device_accuracy == pytest.approx(float((s.argmax(1) == y).mean()))
    assert curve.cloud_accuracy == pytest.approx(float((cloud == y).mean())) and not curve.cloud_assumed_correct
    assert curve.points[0].rate == 0 and curve.points[0].accuracy == curve.device_accuracy
    best = choose(curve, 0.05)
    assert best.rate <= 0.05 and best.accuracy > curve.device_accuracy
    assert best.accuracy == max(p.accuracy for p in curve.points if p.rate <= 0.05)
    assert choose(curve, 0.0) == curve.points[0]
    assert esc.Curve.from_dict(json.loads(json.dumps(curve.to_dict()))).points[5].n_escalated == \
        curve.points[5].n_escalated


@settings(max_examples=100, deadline=None)
@given(score_rows, st.integers(0, 2**32 - 1), st.sampled_from(esc.RULES), st.floats(0, 0.4))
def test_curve_properties(s: np.ndarray, seed: int, rule: str, budget: float) -> None:
    rng = np.random.default_rng(seed)
    n, c = s.shape
    y = rng.integers(0, c, n)
    cloud = rng.integers(0, c, n)
    curve = tuning_curve(s, y, cloud, rule=rule)
    pts = curve.points
    # every point escalates at most its target rate, and the curve at rate 0 is the device alone
    assert all(p.rate <= p.target_rate + 1e-12 and p.n_escalated == round(p.rate * n) for p in pts)
    assert pts[0].n_escalated == 0 and pts[0].accuracy == pytest.approx(float((s.argmax(1) == y).mean()))
    # more target rate never escalates fewer rows, and thresholds never go down
    assert all(a.n_escalated <= b.n_escalated and a.threshold <= b.threshold for a, b in itertools.pairwise(pts))
    chosen = choose(curve, budget)
    assert chosen.rate <= budget + 1e-12 and chosen.accuracy >= curve.device_accuracy - 1e-12
    # the device, running decide() with a point's threshold, escalates exactly the rows the curve counted
    top1, margin = top1_and_margin(s)
    stat = top1 if rule == "score" else margin
    for p in pts[1:]:
        assert int(np.count_nonzero(stat < np.float32(p.threshold))) == p.n_escalated
        if 0 < p.threshold <= 1:
            policy = EscalationPolicy().with_threshold(rule, p.threshold)
            assert decide(policy, s).count == p.n_escalated
    # a cloud that always answers right (or no cloud predictions: the upper bound) makes the curve monotone
    for upper in (tuning_curve(s, y, None, rule=rule), tuning_curve(s, y, y, rule=rule)):
        accs = [p.accuracy for p in upper.points]
        assert all(a <= b + 1e-12 for a, b in itertools.pairwise(accs))
    assert tuning_curve(s, y, None, rule=rule).cloud_assumed_correct
    # a cloud that agrees with the device changes nothing
    same = tuning_curve(s, y, s.argmax(1), rule=rule)
    assert all(p.accuracy == pytest.approx(same.device_accuracy) for p in same.points)


def test_curve_input_errors() -> None:
    s, y, cloud = pair(1, n=50)
    with pytest.raises(EscalationError, match="50 integer classes"):
        tuning_curve(s, y[:-1])
    with pytest.raises(EscalationError, match="cloud predictions"):
        tuning_curve(s, y, cloud[:10])
    with pytest.raises(EscalationError, match="rule"):
        tuning_curve(s, y, rule="entropy")
    with pytest.raises(EscalationError, match="step"):
        tuning_curve(s, y, step=0)
    with pytest.raises(EscalationError, match="budget rate"):
        choose(tuning_curve(s, y), 1.5)


@pytest.mark.parametrize(("text", "value"), [("5%", 0.05), ("0.05", 0.05), (" 12.5% ", 0.125), ("0", 0.0),
                                             ("100%", 1.0), (0.3, 0.3)])
def test_parse_rate(text: str, value: float) -> None:
    assert parse_rate(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["5", "150%", "-1%", "abc", "", "nan"])
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(EscalationError, match="expected"):
        parse_rate(text)


def test_document_and_manifest_entry() -> None:
    s, y, cloud = pair(2)
    curve = tuning_curve(s, y, cloud)
    point = choose(curve, 0.05)
    policy = EscalationPolicy(share="features").with_threshold("score", point.threshold)
    doc = json.loads(json.dumps(tuning_document(policy, curve, point, 0.05, {"data": "val_x.npy"})))
    got, _ = read_document(doc)
    assert got == policy and doc["tuned"]["rate"] <= 0.05 and doc["tuned"]["data"] == "val_x.npy"
    entry = manifest_entry(doc)
    assert entry["file"] == esc.ESCALATION_FILE and entry["schema"] == esc.ESCALATION_SCHEMA
    assert "curve" not in entry and EscalationPolicy.from_dict(entry["policy"]) == policy
    assert read_document(entry)[0] == policy  # the manifest entry reads back the same way
    with pytest.raises(ConfigError, match="schema"):
        read_document({**doc, "schema": "other/1"})
    with pytest.raises(ConfigError, match="score_below"):
        read_document({**doc, "policy": {**doc["policy"], "score_below": 2}})
    assert math.isfinite(doc["tuned"]["threshold"])
