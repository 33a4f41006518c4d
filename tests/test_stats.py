"""Streaming feature statistics: merge = concatenation, chunking does not matter, lossless round trip."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_runtime.core.stats import STATS_SCHEMA, FeatureStats

N_FEATURES = 3
value = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=64),
    st.sampled_from([0.0, 1.0, 2.5, np.nan, np.inf, -np.inf]),   # ties, edges and non-finite values
)
rows = hnp.arrays(np.float64, st.tuples(st.integers(0, 40), st.just(N_FEATURES)), elements=value)
edge_lists = st.lists(
    st.lists(st.floats(min_value=-100, max_value=100, allow_nan=False, width=32), max_size=9, unique=True)
    .map(sorted),
    min_size=N_FEATURES, max_size=N_FEATURES)


def exact(x: np.ndarray, edges: list[list[float]]) -> dict[str, np.ndarray]:
    """The statistics computed directly on the whole array with numpy (the specification)."""
    out: dict[str, list[float]] = {k: [] for k in ("count", "nan", "mean", "var", "min", "max")}
    hists = []
    for j in range(x.shape[1]):
        c = x[:, j]
        fin = c[np.isfinite(c)]
        out["count"].append(fin.size)
        out["nan"].append(c.size - fin.size)
        out["mean"].append(fin.mean() if fin.size else np.nan)
        out["var"].append(fin.var() if fin.size else np.nan)
        out["min"].append(fin.min() if fin.size else np.nan)
        out["max"].append(fin.max() if fin.size else np.nan)
        e = np.asarray(edges[j], dtype=np.float64)
        hists.append(np.bincount(np.searchsorted(e, fin, side="right"), minlength=e.size + 1))
    res = {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
    res["hist"] = hists  # type: ignore[assignment]
    return res


def assert_matches(s: FeatureStats, x: np.ndarray, edges: list[list[float]]) -> None:
    want = exact(x, edges)
    np.testing.assert_array_equal(s.count, want["count"])
    np.testing.assert_array_equal(s.nan_count, want["nan"])
    np.testing.assert_array_equal(s.min, want["min"])
    np.testing.assert_array_equal(s.max, want["max"])
    scale = np.nanmax(np.abs(np.where(np.isfinite(x), x, np.nan)), axis=0, initial=1.0) if x.size else 1.0
    np.testing.assert_allclose(s.mean, want["mean"], rtol=1e-9, atol=1e-9 * np.max(scale))
    np.testing.assert_allclose(s.var, want["var"], rtol=1e-7, atol=1e-9 * np.max(scale) ** 2)
    for j in range(x.shape[1]):
        np.testing.assert_array_equal(s.histogram(j), want["hist"][j])


@settings(max_examples=150, deadline=None)
@given(rows, edge_lists)
def test_one_batch_matches_numpy(x: np.ndarray, edges: list[list[float]]) -> None:
    assert_matches(FeatureStats.of(x, edges), x, edges)


@settings(max_examples=150, deadline=None)
@given(rows, rows, rows, edge_lists)
def test_merge_equals_the_concatenated_stream_and_is_associative(a: np.ndarray, b: np.ndarray, c: np.ndarray,
                                                                 edges: list[list[float]]) -> None:
    sa, sb, sc = (FeatureStats.of(v, edges) for v in (a, b, c))
    whole = np.concatenate([a, b, c])
    left = sa.merge(sb).merge(sc)
    right = sa.merge(sb.merge(sc))
    assert_matches(left, whole, edges)
    assert_matches(right, whole, edges)
    assert_matches(sc + sa + sb, whole, edges)   # order of streams does not matter
    # merge builds a new object: the operands are untouched
    assert_matches(sa, a, edges)


@settings(max_examples=100, deadline=None)
@given(rows, st.lists(st.integers(0, 40), max_size=5), edge_lists)
def test_update_in_chunks_equals_one_batch(x: np.ndarray, cuts: list[int], edges: list[list[float]]) -> None:
    s = FeatureStats.zero(N_FEATURES, edges)
    bounds = sorted({0, x.shape[0], *(min(c, x.shape[0]) for c in cuts)})
    for lo, hi in itertools.pairwise(bounds):
        s.update_batch(x[lo:hi])
    assert_matches(s, x, edges)


@settings(max_examples=100, deadline=None)
@given(rows, edge_lists)
def test_to_dict_round_trips_through_json(x: np.ndarray, edges: list[list[float]]) -> None:
    s = FeatureStats.of(x, edges)
    d = json.loads(json.dumps(s.to_dict(), allow_nan=False))
    assert d["schema"] == STATS_SCHEMA
    back = FeatureStats.from_dict(d)
    assert back.to_dict() == s.to_dict()
    assert_matches(back, x, edges)


@settings(max_examples=100, deadline=None)
@given(rows, edge_lists, st.floats(0.0, 1.0))
def test_histogram_quantile_stays_in_range_and_is_monotone(x: np.ndarray, edges: list[list[float]],
                                                            q: float) -> None:
    s = FeatureStats.of(x, edges)
    v = s.quantile(q)
    have = s.count > 0
    assert np.all(np.isnan(v[~have]))
    assert np.all(v[have] >= s.min[have]) and np.all(v[have] <= s.max[have])
    assert np.all(s.quantile(min(1.0, q + 0.1))[have] >= v[have])


def test_constant_and_nan_heavy_features() -> None:
    rng = np.random.default_rng(0)
    x = np.empty((1000, 3))
    x[:, 0] = 0.1                                  # constant, not exactly representable
    x[:, 1] = np.where(rng.random(1000) < 0.9, np.nan, rng.normal(size=1000))
    x[:, 2] = np.nan                               # never observed
    x[5, 0] = np.inf
    s = FeatureStats.zero(3, [[0.1], [0.0], []])
    for i in range(0, 1000, 7):
        s.update_batch(x[i:i + 7])
    assert s.count.tolist() == [999, int(np.isfinite(x[:, 1]).sum()), 0]
    assert s.nan_count.tolist() == [1, 1000 - int(np.isfinite(x[:, 1]).sum()), 1000]
    assert s.mean[0] == pytest.approx(0.1, rel=1e-12)
    assert 0.0 <= s.var[0] < 1e-25
    assert s.histogram(0).tolist() == [0, 999]     # a value on an edge goes to the bin on its right
    assert np.isnan(s.mean[2]) and np.isnan(s.var[2]) and np.isnan(s.min[2])
    assert s.histogram(2).tolist() == [0]
    assert s.nan_rate.tolist() == pytest.approx([0.001, 1 - np.isfinite(x[:, 1]).mean(), 1.0])
    json.dumps(s.to_dict(), allow_nan=False)       # empty features serialise without NaN or Inf


def test_large_offset_keeps_the_variance() -> None:
    """Sums of squares would lose a spread of 1 on a mean of 1e9; the parallel formula does not."""
    rng = np.random.default_rng(1)
    x = 1e9 + rng.normal(size=(20_000, 1))
    s = FeatureStats.zero(1)
    for i in range(0, len(x), 64):
        s.update_batch(x[i:i + 64])
    assert s.var[0] == pytest.approx(x.var(), rel=1e-6)


def test_errors_say_what_was_expected() -> None:
    s = FeatureStats.zero(2, [[0.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match=r"expected rows of 2 features \[n, 2\], got shape \[4, 3\]"):
        s.update_batch(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="strictly increasing"):
        FeatureStats.zero(1, [[2.0, 1.0]])
    with pytest.raises(ValueError, match="different features or histogram edges"):
        s.merge(FeatureStats.zero(2, [[0.0], [1.0, 3.0]]))
    d = s.to_dict()
    d["hist"][1] = [1, 0, 0]
    with pytest.raises(ValueError, match="sums to 1, count says 0"):
        FeatureStats.from_dict(d)
    with pytest.raises(ValueError, match="expected schema"):
        FeatureStats.from_dict({"schema": "other"})
