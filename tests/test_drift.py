"""Drift: distances, detectors, calibrated false-alarm rates, the monitor's alarms, mergeable summaries.

Sample data come from the models built by ``models/`` (session fixture ``models_dir``): the digits MLP's
training and test inputs and its real predictions, the tabular model's features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_runtime.core import drift
from edge_runtime.core.drift import (
    Alarm,
    CalibrationSettings,
    Cusum,
    DriftMonitor,
    LabelTracker,
    PageHinkley,
    ReferenceProfileError,
    build_reference,
    load_reference,
    merge_summaries,
)

# -- data ------------------------------------------------------------------------------------------


def predict(models_dir: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(models_dir / "digits_mlp.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["label"], {"input": x.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def digits(models_dir: Path) -> dict[str, np.ndarray]:
    d = {k: np.load(models_dir / f"digits_mlp.{k}.npy") for k in ("train_x", "test_x", "test_y")}
    d["train_top1"] = predict(models_dir, d["train_x"])
    d["test_top1"] = predict(models_dir, d["test_x"])
    return d


@pytest.fixture(scope="module")
def digits_ref(digits: dict[str, np.ndarray]) -> drift.Reference:
    """The digits model's reference with its outputs, default calibration (1 per 100k, window 500)."""
    d = build_reference(digits["train_x"], digits["train_top1"], input_name="input")
    return load_reference(json.loads(json.dumps(d)))   # as a bundle would store it


@pytest.fixture(scope="module")
def tabular(models_dir: Path) -> np.ndarray:
    return np.load(models_dir / "tabular.train_x.npy").astype(np.float64)


@pytest.fixture(scope="module")
def tabular_ref(tabular: np.ndarray) -> drift.Reference:
    return load_reference(build_reference(tabular, None, calibration=CalibrationSettings(window=250,
                                                                                          n_simulations=15_000)))


def feed(monitor: DriftMonitor, x: np.ndarray, top1: np.ndarray | None = None, start: int | None = None,
         batch: int = 32) -> list[Alarm]:
    events: list[Alarm] = []
    first = monitor.samples if start is None else start
    for i in range(0, len(x), batch):
        events += monitor.update(x[i:i + batch], None if top1 is None else top1[i:i + batch], first + i)
    return events


def shuffled_passes(rng: np.random.Generator, n: int, passes: int) -> np.ndarray:
    return np.concatenate([rng.permutation(n) for _ in range(passes)])


# -- distances -------------------------------------------------------------------------------------

def test_distances_on_simple_histograms() -> None:
    ref = np.array([10, 20, 30, 40])
    assert drift.psi(ref, ref) == 0.0
    assert drift.js_divergence(ref, ref * 3) == pytest.approx(0.0, abs=1e-3)
    assert drift.ks_binned(ref, ref * 3) == 0.0
    assert drift.chi_square(ref, ref) == pytest.approx(0.0, abs=0.2)
    assert drift.ks_binned([100, 0], [0, 100]) == 1.0
    assert drift.js_divergence([1000, 0], [0, 1000]) > 0.99
    assert drift.psi([2500] * 4, [4000, 3000, 2000, 1000]) == pytest.approx(
        sum((o - e) * np.log(o / e) for o, e in zip((0.4, 0.3, 0.2, 0.1), (0.25,) * 4, strict=True)), rel=1e-3)
    assert drift.psi([1, 2], [0, 5]) < np.inf                   # an empty bin stays finite (smoothing)
    with pytest.raises(ValueError, match="same bins"):
        drift.psi([1, 2], [1, 2, 3])


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.int64, st.tuples(st.integers(1, 4), st.integers(2, 8)), elements=st.integers(0, 500)),
       st.randoms(use_true_random=False))
def test_distance_bounds_and_vectorisation(live: np.ndarray, rnd: Any) -> None:
    ref = np.array([rnd.randint(0, 300) for _ in range(live.shape[1])])
    for fn in (drift.psi, drift.js_divergence, drift.chi_square, drift.ks_binned):
        rows = fn(ref, live)
        assert rows.shape == (live.shape[0],)
        np.testing.assert_allclose(rows, [fn(ref, r) for r in live], rtol=1e-12, atol=1e-15)
        assert np.all(rows >= 0)
    assert np.all(drift.js_divergence(ref, live) <= 1.0)
    assert np.all(drift.ks_binned(ref, live) <= 1.0)


# -- reference profiles ----------------------------------------------------------------------------

def test_reference_v2_keeps_the_v1_fields_and_loads_v1(tabular: np.ndarray) -> None:
    v2 = build_reference(tabular, None, input_name="input",
                         calibration=CalibrationSettings(n_simulations=2000, universes=10))
    # A profile as bundles of schema /1 carried it: no calibration, no /2 fields.
    v1 = {k: v for k, v in json.loads(json.dumps(v2)).items() if k not in ("calibration", "n_bins", "feature_names")}
    v1["schema"] = drift.REFERENCE_SCHEMA_V1
    v1["features"] = [{k: v for k, v in f.items() if k not in ("nan_count", "std")} for f in v1["features"]]
    assert v2["schema"] == drift.REFERENCE_SCHEMA and v1["schema"] == drift.REFERENCE_SCHEMA_V1
    for f1, f2 in zip(v1["features"], v2["features"], strict=True):
        for key in ("index", "count", "nan_rate", "mean", "var", "min", "max", "quantiles", "histogram"):
            assert f2[key] == f1[key], key
    cal = v2["calibration"]
    assert cal["method"] == drift.CALIBRATION_METHOD and cal["window"] == 500
    assert set(cal["features"]["thresholds"]) == {"psi", "js", "ks"}
    assert len(cal["features"]["thresholds"]["psi"]) == tabular.shape[1]
    ref2 = load_reference(json.loads(json.dumps(v2)))
    ref1 = load_reference(v1)
    assert ref1.calibration is None and ref2.calibration is not None
    assert ref1.fingerprint == ref2.fingerprint          # same bins and counts: same profile
    monitor = DriftMonitor(v1, window=100, settings=CalibrationSettings(window=100, n_simulations=2000))
    assert monitor.calibration.window == 100             # a /1 profile is calibrated on start


def mutate(d: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    d = json.loads(json.dumps(d))
    node: Any = d
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return d


@pytest.mark.parametrize(("path", "value", "message"), [
    ("schema", "edge-runtime.reference/9", "schema must be"),
    ("kind", "audio", "kind must be one of"),
    ("features.0.histogram.edges", [2.0, 1.0], "strictly increasing"),
    ("features.0.histogram.counts", [1, 2], "needs len"),
    ("features.0.count", 3, "sum to"),
    ("features.0.mean", "x", "must be a finite number"),
    ("features", [], "non-empty list"),
    ("calibration.fingerprint", "0123", "another profile"),
    ("calibration.features.thresholds.psi", [0.1], "must have 30 entries"),
])
def test_load_reference_says_what_is_wrong(tabular_ref: drift.Reference, tabular: np.ndarray, path: str,
                                           value: Any, message: str) -> None:
    good = build_reference(tabular[:100], None, calibration=CalibrationSettings(n_simulations=1000, universes=4))
    load_reference(good)
    with pytest.raises(ReferenceProfileError, match=message):
        load_reference(mutate(good, path, value))


# -- (a) dimmed digits; the reference itself raises nothing ------------------------------------------

def test_dimmed_digits_raise_data_drift_and_reference_passes_do_not(digits: dict[str, np.ndarray],
                                                                   digits_ref: drift.Reference) -> None:
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(digits_ref, model="digits_mlp")
    order = shuffled_passes(rng, len(digits["train_x"]), 6)                # 8082 samples, 16 windows
    assert feed(monitor, digits["train_x"][order], digits["train_top1"][order]) == []
    assert monitor.windows == 16 and monitor.alarms == ()
    change = monitor.samples
    order = shuffled_passes(rng, len(digits["test_x"]), 3)
    dim = digits["test_x"][order] * 0.6
    events = feed(monitor, dim, digits["test_top1"][order])
    data = [a for a in events if a.kind == "data"]
    assert len(data) == 1 and data[0].is_open
    assert abs(data[0].start_index - change) < monitor.window     # the window where the change fell
    assert data[0].detected_index <= change + 2 * monitor.window
    assert monitor.state()["open"][0]["kind"] == "data"
    json.dumps(monitor.state(), allow_nan=False)


# -- (b) a mean shift in one tabular feature -----------------------------------------------------------

def test_mean_shift_gives_one_alarm_near_the_change_and_closes_after(tabular: np.ndarray,
                                                                    tabular_ref: drift.Reference) -> None:
    rng = np.random.default_rng(1)
    x = tabular[rng.integers(0, len(tabular), size=12_000)]
    change, back, j = 3_100, 9_000, 3
    x[change:back, j] += 0.75 * tabular[:, j].std()
    monitor = DriftMonitor(tabular_ref)
    events = feed(monitor, x, batch=64)
    opened = [a for a in events if a.is_open]
    closed = [a for a in events if not a.is_open]
    assert len(opened) == 1 and len(closed) == 1, events
    alarm = monitor.alarms[0]
    assert abs(alarm.start_index - change) <= monitor.window
    assert j in alarm.features
    assert alarm.end_index is not None and abs(alarm.end_index - back) <= 2 * monitor.window
    assert monitor.alarms_total == 1 and monitor.open_alarms == ()


def test_small_persistent_shift_is_caught_by_the_cusum() -> None:
    """A 0.1 sd shift is invisible in one 500-sample window but adds up; a large reference (so its own
    estimation error is small) lets the CUSUM's allowance be small enough to see it."""
    rng = np.random.default_rng(5)
    ref = build_reference(rng.normal(size=(20_000, 8)), None, calibration=CalibrationSettings(n_simulations=15_000))
    x = rng.normal(size=(20_000, 8))
    x[6_000:, 7] += 0.1
    monitor = DriftMonitor(ref)
    events = feed(monitor, x, batch=500)
    assert len(events) == 1 and events[0].is_open
    assert events[0].reason == "cusum" and events[0].features == (7,)
    assert 5_000 <= events[0].start_index <= 7_000 < events[0].detected_index <= 11_000


# -- (c) calibration ---------------------------------------------------------------------------------

def test_measured_false_alarm_rate_is_within_target(tabular: np.ndarray) -> None:
    """Undrifted streams resampled from the reference data, target 1 false alarm per 500 windows."""
    window, target_windows = 100, 300
    s = CalibrationSettings(window=window, false_alarms_per_sample=1.0 / (target_windows * window))
    monitor = DriftMonitor(build_reference(tabular, None, calibration=s))
    rng = np.random.default_rng(2)
    opened = 0
    for _ in range(30):
        x = tabular[rng.integers(0, len(tabular), size=100 * window)]
        opened += sum(a.is_open for a in monitor.update(x))
    assert monitor.windows == 3_000
    assert opened <= monitor.windows / target_windows      # at most 10 expected; typically 0 to 2


def test_thresholds_hit_the_simulated_rate_on_fresh_windows(tabular: np.ndarray) -> None:
    """Without reference uncertainty, windows drawn from the reference histogram exceed the distance
    thresholds at the calibrated rate: not far above it (valid), not far below (not wastefully strict)."""
    window = 200
    s = CalibrationSettings(window=window, false_alarms_per_sample=2e-5, reference_uncertainty=False)
    ref = load_reference(build_reference(tabular, None, calibration=s, rng_seed=11))
    cal = ref.calibration
    assert cal is not None
    full = [j for j, e in enumerate(ref.edges) if len(e) == ref.counts.shape[1] - 1]   # no padded bins
    assert len(full) == ref.n_features
    cats = ref.category_counts()
    p = cats / cats.sum(axis=1, keepdims=True)
    rng = np.random.default_rng(12)
    n = 20_000
    live = np.empty((n, *p.shape))
    rest, left = np.full((n, ref.n_features), window), np.ones(ref.n_features)
    for c in range(p.shape[1]):                  # multinomial rows by conditional binomials (fast)
        live[..., c] = rng.binomial(rest, np.clip(p[:, c] / np.maximum(left, 1e-12), 0, 1))
        rest = rest - live[..., c].astype(np.int64)
        left = left - p[:, c]
    over = np.zeros(n, dtype=bool)
    for name, fn in (("psi", drift.psi), ("js", drift.js_divergence)):
        over |= (fn(cats, live) > np.asarray(cal.thresholds[name])).any(axis=1)
    over |= (drift.ks_binned(ref.counts, live[..., :-1]) > np.asarray(cal.thresholds["ks"])).any(axis=1)
    alpha = cal.false_alarms_per_sample * window * cal.shares["distances"]
    assert alpha / 4 <= over.mean() <= alpha * 1.3, (over.mean(), alpha)


# -- (d) NaN-heavy and constant features ---------------------------------------------------------------

def test_nan_heavy_and_constant_features_neither_crash_nor_alarm(tabular: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    n = len(tabular)
    extra = np.empty((n, 4))
    extra[:, 0] = 7.0                                                   # constant
    extra[:, 1] = np.where(rng.random(n) < 0.8, np.nan, rng.normal(size=n))   # 80% missing
    extra[:, 2] = rng.integers(0, 3, size=n)                            # three values only
    extra[:, 3] = np.nan                                                # never observed
    data = np.concatenate([tabular[:, :6], extra], axis=1)
    monitor = DriftMonitor(build_reference(data, None, calibration=CalibrationSettings(window=200)))
    x = data[rng.integers(0, n, size=6_000)]
    assert feed(monitor, x) == []
    assert monitor.windows == 30
    odd = x[:50].copy()
    odd[:, 0] = np.inf
    odd[:, 8] = -np.inf
    monitor.update(odd)                                                 # counted, not a crash
    assert monitor.update(np.full((10, 10), np.nan)) == []              # window not complete yet
    s = monitor.summary().to_dict()
    json.dumps(s, allow_nan=False)
    assert s["features"]["std"][6] == 0.0 and s["features"]["mean"][9] is None


# -- (e) concept drift and prediction shift ------------------------------------------------------------

def test_label_flip_raises_concept_drift(digits: dict[str, np.ndarray]) -> None:
    top1, y = digits["test_top1"], digits["test_y"]
    acc = float((top1 == y).mean())
    tracker = LabelTracker(acc, reference_count=len(y))
    rng = np.random.default_rng(4)
    order = shuffled_passes(rng, len(y), 20)                            # 9000 labels at the reference accuracy
    for i in range(0, len(order), 50):
        tracker.update(top1[order[i:i + 50]], y[order[i:i + 50]], i)
    assert not tracker.drift_detected
    assert tracker.accuracy == pytest.approx(acc, abs=0.03)
    change = len(order)
    order = shuffled_passes(rng, len(y), 2)
    flipped = np.where(y[order] < 5, (y[order] + 1) % 5, y[order])     # classes 0-4 relabelled
    for i in range(0, len(order), 50):
        tracker.update(top1[order[i:i + 50]], flipped[i:i + 50], change + i)
    assert tracker.drift_detected
    assert change <= tracker.alarm_index <= change + 100
    assert change - 50 <= tracker.change_index <= tracker.alarm_index
    st_ = tracker.state()
    assert st_["accuracy"] < 0.7 and st_["drift_detected"]


def test_class_prior_shift_raises_a_prediction_alarm(digits: dict[str, np.ndarray],
                                                     digits_ref: drift.Reference) -> None:
    rng = np.random.default_rng(6)
    monitor = DriftMonitor(digits_ref)
    order = shuffled_passes(rng, len(digits["train_x"]), 3)
    assert feed(monitor, digits["train_x"][order], digits["train_top1"][order]) == []
    # Live traffic where half the inputs are 1s: the model still works, but what it sees has changed.
    y = digits["test_y"]
    weights = np.where(y == 1, 0.5 / (y == 1).sum(), 0.5 / (y != 1).sum())
    pick = rng.choice(len(y), size=3_000, p=weights)
    events = feed(monitor, digits["test_x"][pick], digits["test_top1"][pick])
    kinds = {a.kind for a in events if a.is_open}
    assert "prediction" in kinds
    pred = next(a for a in monitor.alarms if a.kind == "prediction")
    assert abs(pred.start_index - len(order)) < monitor.window


# -- sequential detectors ------------------------------------------------------------------------------

def test_cusum_finds_a_shift_and_where_it_began() -> None:
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.normal(size=2_000), rng.normal(1.0, 1.0, size=2_000)])
    c = Cusum(0.0, 1.0, k=0.5, h=8.0)
    assert c.update_batch(x[:2_000]) is False and not c.drift_detected
    assert c.update_batch(x[2_000:]) is True
    assert 2_000 < c.alarm_index <= 2_060                   # type: ignore[operator]
    assert 1_950 <= c.change_index <= 2_030                 # type: ignore[operator]
    c.reset()
    assert not c.drift_detected and c.statistic[0] == 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=10))
def test_cusum_and_page_hinkley_do_not_depend_on_batching(sizes: list[int]) -> None:
    rng = np.random.default_rng(9)
    x = np.concatenate([rng.normal(size=(600, 3)), rng.normal([0.0, 1.5, -1.5], 1.0, size=(600, 3))])
    x[100, 0] = np.nan
    one = Cusum([0, 0, 0], [1, 1, 1], k=0.5, h=6.0)
    one.update_batch(x)
    ph_one = PageHinkley(delta=0.05, threshold=25.0)
    ph_one.update_batch(x[:, 1])
    many = Cusum([0, 0, 0], [1, 1, 1], k=0.5, h=6.0)
    ph_many = PageHinkley(delta=0.05, threshold=25.0)
    i = 0
    while i < len(x):
        n = sizes[i % len(sizes)]
        many.update_batch(x[i:i + n], i)
        ph_many.update_batch(x[i:i + n, 1], i)
        i += n
    np.testing.assert_array_equal(many.alarm_indices, one.alarm_indices)
    np.testing.assert_array_equal(many.change_indices, one.change_indices)
    np.testing.assert_allclose(many.statistic, one.statistic)
    assert (ph_many.alarm_index, ph_many.change_index) == (ph_one.alarm_index, ph_one.change_index)
    assert one.detected.tolist() == [False, True, True]
    assert ph_one.drift_detected and 600 < ph_one.alarm_index < 700   # type: ignore[operator]
    assert 550 <= ph_one.change_index <= 620                          # type: ignore[operator]


def test_page_hinkley_stays_quiet_on_a_stationary_stream() -> None:
    ph = PageHinkley(delta=0.1, threshold=30.0)
    ph.update_batch(np.random.default_rng(10).normal(5.0, 1.0, size=20_000))
    assert not ph.drift_detected


# -- summaries ---------------------------------------------------------------------------------------

def test_merged_summaries_equal_the_summary_of_the_concatenated_stream(digits: dict[str, np.ndarray],
                                                                      digits_ref: drift.Reference) -> None:
    rng = np.random.default_rng(11)
    order = shuffled_passes(rng, len(digits["train_x"]), 3)[:3_000]
    x, top = digits["train_x"][order], digits["train_top1"][order]
    x[2_000:] *= 0.7                                                     # an alarm inside the second part
    whole, first, second = (DriftMonitor(digits_ref, model="digits_mlp") for _ in range(3))
    feed(whole, x, top)
    feed(first, x[:1_500], top[:1_500])
    feed(second, x[1_500:], top[1_500:], start=1_500)
    a, b, c = (m.summary().to_dict() for m in (first, second, whole))
    merged = merge_summaries(a, b, digits_ref)
    assert merged["n"] == c["n"] == 3_000 and merged["windows"] == c["windows"] == 6
    assert (merged["start"], merged["end"]) == (c["start"], c["end"]) == (0, 3_000)
    assert merged["features"]["hist"] == c["features"]["hist"]
    assert merged["features"]["nan"] == c["features"]["nan"]
    assert merged["predictions"]["counts"] == c["predictions"]["counts"]
    np.testing.assert_allclose(np.array(merged["features"]["std"], dtype=float),
                               np.array(c["features"]["std"], dtype=float), rtol=2e-3, atol=1e-6)
    # Means are sent to four digits of themselves or of their feature's spread, the coarser.
    spread = np.array(c["features"]["std"], dtype=float)
    whole_mean = np.array(c["features"]["mean"], dtype=float)
    assert (np.abs(np.array(merged["features"]["mean"], dtype=float) - whole_mean)
            <= 2e-3 * np.maximum(np.abs(whole_mean), spread) + 1e-6).all()
    for key in ("psi", "ks"):
        np.testing.assert_allclose(merged["distances"][key], c["distances"][key], atol=1.5e-3)
    for key in ("psi", "js", "chi2"):
        assert merged["predictions"][key] == pytest.approx(c["predictions"][key], rel=1e-3)
    assert merged["top"] == c["top"] and merged["score"] == c["score"] > 1
    assert [x_["start"] for x_ in merged["alarms"]] == [x_["start"] for x_ in c["alarms"]]
    assert "distances" not in merge_summaries(a, b)                  # no reference: distances dropped
    with pytest.raises(ValueError, match="expected schema"):
        merge_summaries(a, {"schema": "x"})


def test_summary_is_compact(digits: dict[str, np.ndarray], digits_ref: drift.Reference) -> None:
    rng = np.random.default_rng(12)
    monitor = DriftMonitor(digits_ref)
    feed(monitor, digits["train_x"][shuffled_passes(rng, 1347, 1)][:500], digits["train_top1"][:500])
    size = len(json.dumps(monitor.summary().to_dict(), separators=(",", ":"), allow_nan=False))
    assert size <= 4096, size
    # The worst case for size: 64 continuous features, every one with ten bins and nonzero moments.
    x = rng.lognormal(3.0, 1.0, size=(5_000, 64))
    ref = build_reference(x, None, calibration=CalibrationSettings(n_simulations=1000, universes=4))
    monitor = DriftMonitor(ref)
    monitor.update(rng.lognormal(3.0, 1.0, size=(500, 64)))
    one = monitor.take_summary().to_dict()
    assert len(json.dumps(one, separators=(",", ":"))) <= 4096, len(json.dumps(one, separators=(",", ":")))
    assert one["windows"] == 1 and monitor.summary().windows == 0


@pytest.mark.parametrize("shift", [0.0, 2.0])
def test_wire_summary_stays_under_4_kb_up_to_the_window_cap(shift: float) -> None:
    """The form devices send (no per-feature distances) for 64 continuous features and ten classes,
    for every number of windows an agent puts in one summary, on undrifted and drifted data; the
    receiver gets the distances back from the counts and the reference."""
    rng = np.random.default_rng(13)
    x = rng.normal(size=(20_000, 64))
    ref = build_reference(x, rng.integers(0, 10, 20_000), calibration=CalibrationSettings(
        n_simulations=1000, universes=4))
    monitor = DriftMonitor(ref)
    for w in range(1, drift.MAX_WIRE_WINDOWS + 1):
        n = monitor.window
        monitor.update(rng.normal(shift, 1.0, size=(n, 64)), rng.integers(0, 10, n))
        assert monitor.period_windows == w
        wire = monitor.summary().to_dict(distances=False)
        size = len(json.dumps(wire, separators=(",", ":"), allow_nan=False))
        assert size <= 4096, (w, size)
    assert "distances" not in wire and set(wire["max_distances"]) == {"psi", "ks"}
    full = monitor.summary()
    back = drift.DriftSummary.from_dict(wire).with_distances(ref)
    assert back.distances == full.distances


def test_summary_from_dict_refuses_inconsistent_counts(tabular: np.ndarray, tabular_ref: drift.Reference) -> None:
    monitor = DriftMonitor(tabular_ref)
    monitor.update(tabular[:250])
    good = monitor.summary().to_dict()
    assert drift.DriftSummary.from_dict(json.loads(json.dumps(good))).to_dict() == good
    bad = json.loads(json.dumps(good))
    bad["features"]["hist"][2][0] += 1
    with pytest.raises(ValueError, match="counts of feature 2 add up to 251, n says 250"):
        drift.DriftSummary.from_dict(bad)
    bad = json.loads(json.dumps(good))
    bad["features"]["nan"] = {"99": 1}
    with pytest.raises(ValueError, match="out of range"):
        drift.DriftSummary.from_dict(bad)


def test_tensor_inputs_are_summarised_per_sample(models_dir: Path) -> None:
    """Inputs that are neither rows nor BGR frames (here the CNN's preprocessed NCHW tensors) are
    monitored on each sample's mean and standard deviation."""
    x = np.load(models_dir / "cnn.calib_x.npy")
    ref = build_reference(x, None, calibration=CalibrationSettings(window=50))
    assert ref["kind"] == "tensor" and ref["feature_names"] == ["mean", "std"]
    monitor = DriftMonitor(ref)
    assert monitor.update(x[:100]) == []
    assert [a.kind for a in monitor.update(x[100:200] + 0.5)] == ["data"]


def test_a_partial_last_window_is_held_not_tested(tabular: np.ndarray, tabular_ref: drift.Reference) -> None:
    """Samples of an incomplete window wait for the rest: they are counted as pending, never tested
    (a short window would break the calibrated false-alarm rate), and never summarised twice."""
    monitor = DriftMonitor(tabular_ref)
    assert monitor.window == 250
    x = tabular[:400] * 3.0  # drifted, so a test of the partial window would alarm at once
    assert [a.kind for a in monitor.update(x[:250])] == ["data"]
    assert monitor.update(x[250:400]) == []
    st = monitor.state()
    assert st["samples"] == 400 and st["windows"] == 1 and st["pending"] == 150
    first = monitor.take_summary()
    assert (first.n, first.windows, first.end) == (250, 1, 250)
    monitor.update(x[:100])  # completes the second window; the alarm is already open
    assert monitor.state()["windows"] == 2 and monitor.state()["pending"] == 0
    second = monitor.take_summary()
    assert (second.n, second.windows, second.start, second.end) == (250, 1, 250, 500)
