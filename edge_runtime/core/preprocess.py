"""Preprocessing spec: what turns a raw record (a camera frame, a file row) into a model sample.

The spec travels with the model (ONNX metadata key ``edge_runtime.preprocess``, a
``<model>.preprocess.json`` beside it, or a bundle's ``manifest.json``). It is applied to the model's
first input. Resizing is injected (OpenCV when the vision extra is present, nearest-neighbour numpy
otherwise) so this module stays pure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.errors import ConfigError, InputValidationError

METADATA_KEY = "edge_runtime.preprocess"

ResizeFn = Callable[[np.ndarray, int, int], np.ndarray]
_KEYS = {"resize", "color", "layout", "scale", "mean", "std", "dtype", "source_color"}


@dataclass(frozen=True)
class PreprocessSpec:
    """``resize`` [H, W]; ``color`` the model wants (RGB, BGR, GRAY) from frames in ``source_color``
    (OpenCV gives BGR); ``layout`` NCHW or NHWC of the model input; then ``(x * scale - mean) / std``
    per channel, cast to ``dtype``."""

    resize: tuple[int, int] | None = None
    color: str | None = None
    source_color: str = "BGR"
    layout: str = "NHWC"
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dtype: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "preprocess spec") -> PreprocessSpec:
        unknown = sorted(set(d) - _KEYS)
        if unknown:
            raise ConfigError(f"unknown preprocess key '{unknown[0]}' (known: {', '.join(sorted(_KEYS))})",
                              path=origin, key=unknown[0])
        try:
            resize = d.get("resize")
            if resize is not None:
                h, w = (int(v) for v in resize)
                if h <= 0 or w <= 0:
                    raise ValueError(f"resize must be positive, got {resize}")
                resize = (h, w)
            layout = str(d.get("layout", "NHWC")).upper()
            if layout not in ("NCHW", "NHWC"):
                raise ValueError(f"layout must be NCHW or NHWC, got {layout}")
            colors = ("RGB", "BGR", "GRAY")
            color = d.get("color")
            if color is not None and str(color).upper() not in colors:
                raise ValueError(f"color must be one of {colors}, got {color}")
            source_color = str(d.get("source_color", "BGR")).upper()
            if source_color not in colors:
                raise ValueError(f"source_color must be one of {colors}, got {source_color}")
            dtype = d.get("dtype")
            if dtype is not None:
                np.dtype(dtype)
            return cls(
                resize=resize,
                color=str(color).upper() if color is not None else None,
                source_color=source_color,
                layout=layout,
                scale=float(d["scale"]) if d.get("scale") is not None else None,
                mean=tuple(float(v) for v in d["mean"]) if d.get("mean") is not None else None,
                std=tuple(float(v) for v in d["std"]) if d.get("std") is not None else None,
                dtype=str(dtype) if dtype is not None else None,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad preprocess spec: {e}", path=origin) from e

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layout": self.layout, "source_color": self.source_color}
        for k in ("resize", "color", "scale", "mean", "std", "dtype"):
            v = getattr(self, k)
            if v is not None:
                d[k] = list(v) if isinstance(v, tuple) else v
        return d

    @property
    def is_identity(self) -> bool:
        return (self.resize is None and self.color is None and self.scale is None and self.mean is None
                and self.std is None and self.dtype is None and self.layout == "NHWC")


def resize_nearest(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of an HxW[xC] array, used when OpenCV is not installed."""
    ys = (np.arange(h) * (img.shape[0] / h)).astype(np.intp)
    xs = (np.arange(w) * (img.shape[1] / w)).astype(np.intp)
    return img[ys[:, None], xs[None, :]]


class Preprocessor:
    """Applies a :class:`PreprocessSpec` to one image (HxW or HxWxC) and returns the model sample."""

    def __init__(self, spec: PreprocessSpec, input_name: str, resize_fn: ResizeFn = resize_nearest) -> None:
        self.spec = spec
        self.input_name = input_name
        self._resize = resize_fn
        n = len(spec.mean or spec.std or ())
        self._mean = np.asarray(spec.mean, dtype=np.float32) if spec.mean else None
        self._std = np.asarray(spec.std, dtype=np.float32) if spec.std else None
        self._channels = n

    def __call__(self, img: np.ndarray) -> np.ndarray:
        s = self.spec
        x = np.asarray(img)
        if x.ndim not in (2, 3):
            raise InputValidationError("preprocess", self.input_name, "an image HxW or HxWxC",
                                       f"{x.ndim} dims {list(x.shape)}")
        if s.resize is not None and x.shape[:2] != s.resize:
            x = self._resize(x, s.resize[0], s.resize[1])
        x = self._convert_color(x)
        if s.scale is not None or self._mean is not None or self._std is not None:
            x = x.astype(np.float32)
            if s.scale is not None:
                x *= np.float32(s.scale)
            if self._mean is not None:
                x -= self._mean
            if self._std is not None:
                x /= self._std
        if s.layout == "NCHW":
            x = np.ascontiguousarray(x.transpose(2, 0, 1))
        if s.dtype is not None:
            x = x.astype(s.dtype, copy=False)
        return x

    def _convert_color(self, x: np.ndarray) -> np.ndarray:
        s = self.spec
        if x.ndim == 2:
            x = x[:, :, None]
        c = x.shape[2]
        want = s.color
        if want is None or want == s.source_color:
            return x
        if want == "GRAY":
            if c == 1:
                return x
            w = (0.299, 0.587, 0.114) if s.source_color == "RGB" else (0.114, 0.587, 0.299)
            g = x[:, :, 0] * w[0] + x[:, :, 1] * w[1] + x[:, :, 2] * w[2]
            return g[:, :, None].astype(x.dtype, copy=False)
        if c == 1:
            return np.repeat(x, 3, axis=2)
        if c not in (3, 4):
            raise InputValidationError("preprocess", self.input_name, "1, 3 or 4 channels", f"{c} channels")
        return x[:, :, 2::-1]  # RGB <-> BGR, dropping alpha
