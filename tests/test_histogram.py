"""The latency histogram: bounded relative error, exact merge, lossless serialisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.core.histogram import N_BUCKETS, QUANTILES, LatencyHistogram, bucket_bounds, bucket_index

values = st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, max_size=400)


def hist_of(xs: list[int]) -> LatencyHistogram:
    h = LatencyHistogram()
    for x in xs:
        h.record(x)
    return h


@given(st.integers(min_value=0, max_value=(1 << 43) - 1))
def test_every_value_falls_inside_its_bucket(v: int) -> None:
    i = bucket_index(v)
    lo, width = bucket_bounds(i)
    assert 0 <= i < N_BUCKETS
    assert lo <= v < lo + width
    assert width <= max(1, v / 128)


@settings(max_examples=200)
@given(values, st.sampled_from(sorted(QUANTILES.values())))
def test_quantile_is_within_half_a_bucket_of_the_exact_order_statistic(xs: list[int], q: float) -> None:
    h = hist_of(xs)
    exact = sorted(xs)[max(1, math.ceil(q * len(xs))) - 1]
    got = h.quantile(q)
    assert abs(got - exact) <= max(1.0, exact / 256 + 0.5), (got, exact)


@given(values, values, values)
def test_merge_equals_recording_the_concatenation_and_is_associative(a: list[int], b: list[int],
                                                                     c: list[int]) -> None:
    whole = hist_of(a + b + c)
    left = hist_of(a).merge(hist_of(b)).merge(hist_of(c))
    right = hist_of(a).merge(hist_of(b).merge(hist_of(c)))
    for h in (left, right):
        assert h.to_dict() == whole.to_dict()


@given(values)
def test_dict_round_trip(xs: list[int]) -> None:
    h = hist_of(xs)
    assert LatencyHistogram.from_dict(h.to_dict()).to_dict() == h.to_dict()


def test_summary_in_microseconds_and_exact_extremes() -> None:
    rng = np.random.default_rng(0)
    xs = rng.integers(1_000, 2_000_000, size=5000).tolist()
    s = hist_of(xs).summary_us()
    assert s["count"] == 5000
    assert s["min"] == round(min(xs) / 1000, 1)
    assert s["max"] == round(max(xs) / 1000, 1)
    assert s["p50"] == pytest.approx(np.percentile(xs, 50) / 1000, rel=0.01)
    assert s["p99"] == pytest.approx(np.percentile(xs, 99) / 1000, rel=0.01)


def test_empty_histogram_and_bad_input() -> None:
    h = LatencyHistogram()
    assert math.isnan(h.quantile(0.5))
    assert h.summary_us() == {"count": 0}
    with pytest.raises(ValueError, match="quantile"):
        h.quantile(1.5)
    bad = hist_of([5, 6]).to_dict()
    bad["count"] = 3
    with pytest.raises(ValueError, match="add up"):
        LatencyHistogram.from_dict(bad)
