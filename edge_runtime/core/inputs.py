"""Inputs made up from a model's spec: for `bench`, the synthetic source and smoke runs.

Works for third-party models: several inputs, integer/bool/scalar inputs, recurrent state inputs
(zeros of the right shape) and dynamic dimensions filled from the user's overrides.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from edge_runtime.core.spec import ModelSpec, TensorSpec
from edge_runtime.errors import EdgeRuntimeError

# Names that usually mean a recurrent state or a cache: fed as zeros, as a first step would be.
# Symbolic dims that mean "batch" even where the model is not batched on axis 0 of every input.
BATCH_DIM_NAMES = frozenset({"batch", "batch_size", "batchsize", "n", "b", "bs", "num_samples"})

_STATE_NAME = re.compile(r"(^|[_./])(h|c|h0|c0|state|states|hidden|cell|past|cache|memory)([_./]|\d|$)",
                         re.IGNORECASE)


class ShapeError(EdgeRuntimeError):
    """A dynamic dimension has no value; names the input, the axis and the symbolic dim."""


def parse_shape_overrides(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    """``NAME=1x3x224x224`` (``x`` or ``,`` between dims; ``NAME=`` for a scalar) -> {name: shape}."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items or []:
        name, sep, dims = item.partition("=")
        if not sep or not name:
            raise ShapeError(f"--input-shape wants NAME=DxDxD, got {item!r}")
        try:
            shape = tuple(int(d) for d in re.split(r"[x,]", dims) if d.strip()) if dims.strip() else ()
        except ValueError:
            raise ShapeError(f"--input-shape {item!r}: dims must be integers such as 1x3x224x224") from None
        if any(d <= 0 for d in shape):
            raise ShapeError(f"--input-shape {item!r}: dims must be positive")
        out[name] = shape
    return out


def resolve_shape(t: TensorSpec, overrides: Mapping[str, tuple[int, ...]], batch: int,
                  dims: Mapping[str, int] | None = None, batch_axis: bool = True) -> tuple[int, ...]:
    """Concrete shape of input ``t``: an override wins; else the dynamic batch axis gets ``batch`` and
    named dims come from ``dims``; anything still unknown is an error that names it."""
    if t.name in overrides:
        shape = overrides[t.name]
        if t.shape is not None and len(shape) != len(t.shape):
            raise ShapeError(f"--input-shape {t.name}: model input is {t.describe()} ({len(t.shape)} dims), "
                             f"got {len(shape)} dims {list(shape)}")
        for i, (want, got) in enumerate(zip(t.shape or (), shape, strict=False)):
            if isinstance(want, int) and want >= 0 and want != got:
                raise ShapeError(f"--input-shape {t.name}: axis {i} is fixed at {want} in the model, "
                                 f"got {got}")
        return shape
    if t.shape is None:
        raise ShapeError(f"input '{t.name}' has unknown rank; give its shape with --input-shape {t.name}=DxD")
    shape = []
    for i, d in enumerate(t.shape):
        if isinstance(d, int) and d >= 0:
            shape.append(d)
        elif dims and isinstance(d, str) and d in dims:
            shape.append(dims[d])
        elif (i == 0 and batch_axis) or (isinstance(d, str) and d.lower() in BATCH_DIM_NAMES):
            shape.append(batch)
        else:
            label = f"'{d}'" if d else "unnamed"
            raise ShapeError(
                f"input '{t.name}' ({t.describe()}): dynamic dim {label} at axis {i} has no size; "
                f"pass --input-shape {t.name}=" + "x".join(str(x) if isinstance(x, int) and x >= 0 else "N"
                                                          for x in t.shape)
                + (f" or --dim {d}=N" if d else ""))
    return tuple(shape)


def is_state_input(name: str) -> bool:
    return bool(_STATE_NAME.search(name))


def make_tensor(t: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if t.dtype is None:
        raise ShapeError(f"input '{t.name}' has type {t.onnx_type}, which cannot be made up")
    kind = t.dtype.kind
    if kind == "O":
        return np.full(shape, "a", dtype=object)
    if is_state_input(t.name):
        return np.zeros(shape, dtype=t.dtype)
    if kind == "b":
        return rng.random(shape) < 0.5
    if kind in "iu":
        # Small non-negative ints are valid token ids, indices and class ids for nearly any model.
        return rng.integers(0, 10, size=shape).astype(t.dtype)
    return rng.standard_normal(shape).astype(t.dtype)


def make_feeds(spec: ModelSpec, overrides: Mapping[str, tuple[int, ...]] | None = None, batch: int = 1,
               dims: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A full feed dict (batch axis included) for one ``session.run``."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(spec.input_names))
    if unknown:
        raise ShapeError(f"--input-shape names '{unknown[0]}', which is not an input of the model "
                         f"(inputs: {', '.join(spec.input_names)})")
    rng = np.random.default_rng(seed)
    return {t.name: make_tensor(t, resolve_shape(t, overrides, batch, dims, spec.batchable), rng)
            for t in spec.inputs}
