"""Per-sample input checks (pure core): every kind of bad input gets its own typed, readable error."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_runtime.core.inputs import ShapeError, make_feeds, parse_shape_overrides, resolve_shape
from edge_runtime.core.spec import ModelSpec, SampleValidator, TensorSpec
from edge_runtime.errors import INPUT_ERROR_REASONS, InputValidationError

F32 = np.dtype(np.float32)
I64 = np.dtype(np.int64)


def spec(*inputs: TensorSpec) -> ModelSpec:
    return ModelSpec(inputs, (TensorSpec("y", F32, (None, 10)),))


BATCHED = spec(TensorSpec("x", F32, ("batch", 4)))
TWO = spec(TensorSpec("x", F32, (None, 3, 2)), TensorSpec("ids", I64, (None, "seq")))


def error(validator: SampleValidator, sample: dict) -> InputValidationError:
    with pytest.raises(InputValidationError) as ei:
        validator(sample)
    assert ei.value.reason in INPUT_ERROR_REASONS
    return ei.value


def test_good_sample_passes_and_float64_is_converted_to_float32() -> None:
    v = SampleValidator(BATCHED)
    out = v({"x": np.arange(4, dtype=np.float64)})
    assert out["x"].dtype == np.float32
    assert out["x"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(("sample", "reason", "words"), [
    ({"x": np.zeros((2, 4), np.float32)}, "rank", ["1 dims", "2 dims", "per sample"]),
    ({"x": np.zeros(5, np.float32)}, "shape", ["[4]", "[5]"]),
    ({"x": np.array(["a", "b", "c", "d"])}, "dtype", ["float32", "str32"]),
    ({"x": np.array([1.0, np.nan, 2.0, 3.0], np.float32)}, "nonfinite", ["1 NaN", "0 Inf"]),
    ({"x": np.array([1.0, np.inf, -np.inf, 3.0], np.float32)}, "nonfinite", ["0 NaN", "2 Inf"]),
    ({}, "missing_input", ["'x'"]),
    ({"x": np.zeros(4, np.float32), "z": np.zeros(1)}, "unknown_input", ["'z'"]),
])
def test_each_bad_input_has_its_reason_and_says_expected_and_got(sample: dict, reason: str,
                                                                 words: list[str]) -> None:
    e = error(SampleValidator(BATCHED), sample)
    assert e.reason == reason
    for w in words:
        assert w in str(e), (w, str(e))
    assert "expected" in str(e) and "got" in str(e)


def test_float_to_int_is_a_dtype_error_but_int_to_float_is_converted() -> None:
    v = SampleValidator(TWO)
    x = np.zeros((3, 2), np.float32)
    e = error(v, {"x": x, "ids": np.array([1.5, 2.5])})
    assert e.reason == "dtype" and e.input_name == "ids"
    out = v({"x": np.ones((3, 2), np.int32), "ids": np.array([1, 2, 3])})
    assert out["x"].dtype == np.float32 and out["ids"].shape == (3,)


def test_dynamic_dims_accept_any_positive_size_but_not_zero() -> None:
    v = SampleValidator(TWO)
    x = np.zeros((3, 2), np.float32)
    for n in (1, 7, 300):
        v({"x": x, "ids": np.zeros(n, np.int64)})
    assert error(v, {"x": x, "ids": np.zeros(0, np.int64)}).reason == "shape"


def test_huge_but_finite_values_are_not_mistaken_for_inf() -> None:
    v = SampleValidator(BATCHED)
    big = np.full(4, 3e38, np.float32)  # the fast check's sum overflows; the exact check must run
    assert v({"x": big})["x"] is not None


@given(hnp.arrays(np.float32, 4, elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_nonfinite_check_agrees_with_numpy(x: np.ndarray) -> None:
    v = SampleValidator(BATCHED)
    if np.isfinite(x).all():
        v({"x": x})
    else:
        assert error(v, {"x": x}).reason == "nonfinite"


def test_model_without_batch_axis_takes_full_tensors() -> None:
    s = spec(TensorSpec("x", F32, (8,)))
    assert not s.batchable and s.max_batch == 1
    SampleValidator(s)({"x": np.zeros(8, np.float32)})
    scalar = spec(TensorSpec("t", F32, ()))
    SampleValidator(scalar)({"t": np.float32(0.5)})
    assert error(SampleValidator(scalar), {"t": np.zeros(1, np.float32)}).reason == "rank"


def test_fixed_batch_of_one_is_batchable_with_max_batch_one() -> None:
    s = spec(TensorSpec("x", F32, (1, 8)))
    assert s.batchable and s.max_batch == 1


def test_shape_overrides_and_dynamic_dim_errors_name_the_dim() -> None:
    assert parse_shape_overrides(["tokens=2x16", "t="]) == {"tokens": (2, 16), "t": ()}
    with pytest.raises(ShapeError, match="NAME=DxDxD"):
        parse_shape_overrides(["2x16"])
    t = TensorSpec("ids", I64, ("batch", "seq"))
    with pytest.raises(ShapeError, match="'seq' at axis 1") as ei:
        resolve_shape(t, {}, batch=1)
    assert "--input-shape ids=" in str(ei.value) and "--dim seq=N" in str(ei.value)
    assert resolve_shape(t, {}, batch=4, dims={"seq": 9}) == (4, 9)
    with pytest.raises(ShapeError, match="fixed at 4"):
        resolve_shape(TensorSpec("x", F32, (None, 4)), {"x": (1, 5)}, batch=1)


def test_make_feeds_covers_ints_bools_scalars_and_state_inputs() -> None:
    s = ModelSpec((TensorSpec("tokens", I64, ("b", "s")), TensorSpec("mask", np.dtype(bool), ("b", "s")),
                   TensorSpec("temperature", F32, ()), TensorSpec("h0", F32, (1, "b", 16))), ())
    with pytest.raises(ShapeError):
        make_feeds(s)
    feeds = make_feeds(s, {"tokens": (2, 5), "mask": (2, 5), "h0": (1, 2, 16)})
    assert feeds["tokens"].dtype == np.int64 and feeds["tokens"].shape == (2, 5)
    assert feeds["mask"].dtype == np.bool_
    assert feeds["temperature"].shape == ()
    assert not feeds["h0"].any()  # recurrent state starts at zeros
    with pytest.raises(ShapeError, match="not an input"):
        make_feeds(s, {"nope": (1,)})
