"""Model input/output specs and the per-sample input check that runs before every inference.

A *sample* is what one source record becomes: a mapping of input name to array. For a model whose
every input has a leading batch axis (dynamic, or fixed at 1) a sample has no batch axis: the agent
adds it, or stacks samples into a micro-batch. Otherwise a sample is the model's full input.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.errors import InputValidationError

# The fast finiteness check overflows or meets NaN on purpose; numpy's warnings about it are noise.
warnings.filterwarnings("ignore", category=RuntimeWarning, module=__name__)

Dim = int | str | None  # a fixed size, a symbolic name, or unknown


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output. ``dtype`` is None for non-tensor types (sequences, maps)."""

    name: str
    dtype: np.dtype[Any] | None
    shape: tuple[Dim, ...] | None  # None when the rank itself is unknown
    onnx_type: str = ""

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def dynamic_dims(self) -> list[tuple[int, Dim]]:
        return [(i, d) for i, d in enumerate(self.shape or ()) if not isinstance(d, int) or d < 0]

    def describe(self) -> str:
        t = self.dtype.name if self.dtype is not None else (self.onnx_type or "?")
        if self.shape is None:
            return f"{t}[?]"
        return f"{t}[{','.join(_dim_str(d) for d in self.shape)}]"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.onnx_type,
                "dtype": self.dtype.name if self.dtype is not None else None,
                "shape": None if self.shape is None else [d if isinstance(d, int) else (d or None)
                                                          for d in self.shape]}


def _dim_str(d: Dim) -> str:
    if isinstance(d, int) and d >= 0:
        return str(d)
    return str(d) if d else "?"


def _is_fixed(d: Dim) -> bool:
    return isinstance(d, int) and d >= 0


@dataclass(frozen=True)
class ModelSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def batchable(self) -> bool:
        """Every input has a leading axis that is dynamic or 1: samples can be stacked along it."""
        return bool(self.inputs) and all(
            t.shape is not None and len(t.shape) >= 1 and (not _is_fixed(t.shape[0]) or t.shape[0] == 1)
            for t in self.inputs
        )

    @property
    def max_batch(self) -> int | None:
        """Largest micro-batch the model takes: None (any) unless some input fixes its batch axis at 1."""
        if not self.batchable:
            return 1
        return 1 if any(_is_fixed(t.shape[0]) for t in self.inputs if t.shape) else None

    def sample_shape(self, t: TensorSpec) -> tuple[Dim, ...] | None:
        if t.shape is None:
            return None
        return t.shape[1:] if self.batchable else t.shape

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "batchable": self.batchable}


class SampleValidator:
    """Checks one sample against the spec and converts dtypes that keep their kind (float64 -> float32).

    Raises :class:`InputValidationError` with the input name, what was expected and what arrived.
    Precomputes everything it can, because it runs before every inference.
    """

    def __init__(self, spec: ModelSpec, batched: bool = False) -> None:
        """``batched``: check whole micro-batches (batch axis included) instead of single samples."""
        self.spec = spec
        self.batched = batched and spec.batchable
        self._checks: list[tuple[str, np.dtype[Any] | None, tuple[Dim, ...] | None,
                                 tuple[int, ...] | None, bool, str]] = []
        for t in spec.inputs:
            shape = t.shape if self.batched else spec.sample_shape(t)
            fixed = tuple(shape) if shape is not None and all(_is_fixed(d) for d in shape) else None
            is_float = t.dtype is not None and t.dtype.kind == "f"
            self._checks.append((t.name, t.dtype, shape, fixed, is_float,  # type: ignore[arg-type]
                                 self._describe_expected(t, shape)))
        self._names = frozenset(spec.input_names)
        self._ones: dict[tuple[int, Any], np.ndarray] = {}

    def _describe_expected(self, t: TensorSpec, shape: tuple[Dim, ...] | None) -> str:
        if shape is None:
            return t.describe()
        per = f"[{','.join(_dim_str(d) for d in shape)}]"
        if self.spec.batchable and not self.batched:
            return f"{per} per sample (model input {t.describe()}, the agent adds the batch axis)"
        return per

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if len(sample) != len(self._names) or not self._names.issuperset(sample):
            self._name_error(sample)
        out: dict[str, np.ndarray] = {}
        for name, dtype, shape, fixed, is_float, expected in self._checks:
            x = sample[name]
            if type(x) is not np.ndarray:
                x = np.asarray(x)
            if dtype is not None and x.dtype is not dtype and x.dtype != dtype:
                if x.dtype.kind in "OUSV" or not np.can_cast(x.dtype, dtype, casting="same_kind"):
                    raise InputValidationError("dtype", name, dtype.name, x.dtype.name,
                                               "only conversions that keep the kind are applied")
                x = x.astype(dtype)
            if x.shape != fixed and shape is not None:
                self._check_shape(name, shape, x.shape, expected)
            if is_float and not self._finite_fast(x):
                bad = ~np.isfinite(x)
                if bad.any():
                    n_nan = int(np.isnan(x).sum())
                    raise InputValidationError("nonfinite", name, "finite values",
                                               f"{n_nan} NaN and {int(bad.sum()) - n_nan} Inf of {x.size}")
            out[name] = x
        return out

    def _finite_fast(self, x: np.ndarray) -> bool:
        """True proves every element finite: NaN and Inf propagate through a dot product with ones.
        False may also mean an overflowing sum, so the caller checks element-wise (rare, cold path).
        A dot product is the cheapest whole-array reduction numpy has (one BLAS call)."""
        if x.ndim != 1:
            x = x.reshape(-1)
        key = (x.size, x.dtype)
        ones = self._ones.get(key)
        if ones is None:
            if len(self._ones) > 64:  # inputs with dynamic dims come in many sizes: keep this bounded
                self._ones.clear()
            ones = self._ones[key] = np.ones(x.size, dtype=x.dtype)
        return math.isfinite(x.dot(ones))

    @staticmethod
    def _check_shape(name: str, shape: tuple[Dim, ...], xs: tuple[int, ...], expected: str) -> None:
        if len(xs) != len(shape):
            raise InputValidationError("rank", name, f"{len(shape)} dims {expected}",
                                       f"{len(xs)} dims {list(xs)}")
        for want, got in zip(shape, xs, strict=True):
            if (_is_fixed(want) and want != got) or got == 0:
                raise InputValidationError("shape", name, expected, list(xs))

    def _name_error(self, sample: Mapping[str, Any]) -> None:
        missing = [n for n in self.spec.input_names if n not in sample]
        if missing:
            raise InputValidationError("missing_input", missing[0], list(self.spec.input_names),
                                       sorted(sample))
        extra = sorted(set(sample) - self._names)
        raise InputValidationError("unknown_input", extra[0], list(self.spec.input_names), sorted(sample))
