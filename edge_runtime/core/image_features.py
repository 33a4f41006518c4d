"""Image-level features of camera frames, and frame-health checks that need no reference.

Drift on raw pixels is hopeless to summarise (a 64x64x3 frame has 12,288 correlated values), so image
models are monitored on four numbers per frame that move when the scene or the camera changes:
brightness (mean luma), contrast (luma standard deviation), blur (variance of a 3x3 Laplacian of the
luma, the usual focus measure: sharp edges give large second derivatives) and saturation (mean HSV
saturation). These become the "features" of :class:`edge_runtime.core.drift.DriftMonitor`.

Frames are BGR ``uint8`` (OpenCV's layout), ``[H, W, 3]`` or batched ``[N, H, W, 3]``; floats are read on
the same 0-255 scale. Luma uses the BT.601 weights that ``cv2.cvtColor(..., COLOR_BGR2GRAY)`` uses, and
the Laplacian is OpenCV's default ``ksize=1`` kernel on the frame's interior, so thresholds tuned with
OpenCV carry over (up to OpenCV's border handling).

:class:`ImageHealth` flags frames that are useless whatever the model: a uniform frame (lens covered or
obscured), a frozen feed (identical consecutive frames) and an out-of-focus camera. Each condition must
hold for a few frames before an event starts and be absent for a few frames before it ends, so a
covered lens gives one event, not one per frame. Pure: no I/O, no clock; frame indices are parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "FEATURE_NAMES",
    "HealthEvent",
    "HealthSettings",
    "ImageHealth",
    "as_frames",
    "frame_features",
    "luma",
]

FEATURE_NAMES = ("brightness", "contrast", "blur", "saturation")
# BT.601 luma weights in BGR order, as OpenCV's BGR2GRAY.
_LUMA_BGR = np.array([0.114, 0.587, 0.299], dtype=np.float32)
REASONS = ("uniform", "frozen", "blurry")


def as_frames(frames: Any) -> np.ndarray:
    """``frames`` as ``[N, H, W, 3]`` (a single ``[H, W, 3]`` frame becomes a batch of one)."""
    a = np.asarray(frames)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected BGR frames [H, W, 3] or [N, H, W, 3], got shape {list(a.shape)}")
    if a.shape[1] < 3 or a.shape[2] < 3:
        raise ValueError(f"frames must be at least 3x3 pixels for the blur measure, got {a.shape[1]}x{a.shape[2]}")
    return a


def luma(frames: Any) -> np.ndarray:
    """BT.601 luma of each frame, ``[N, H, W]`` float32 on the 0-255 scale."""
    a = as_frames(frames)
    return _luma(a)


def _luma(a: np.ndarray) -> np.ndarray:
    # One matrix-vector product over the channel axis beats three strided channel slices.
    return (a.reshape(-1, 3).astype(np.float32) @ _LUMA_BGR).reshape(a.shape[:3])


def frame_features(frames: Any, *, step: int = 1) -> np.ndarray:
    """``[N, 4]`` float64: brightness, contrast, blur, saturation (see :data:`FEATURE_NAMES`).

    ``step`` > 1 measures every ``step``-th pixel in each direction, for large frames on small devices;
    brightness, contrast and saturation barely change, but blur is then measured at the coarser scale,
    so a reference must be built with the same ``step``."""
    a = as_frames(frames)
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if step > 1:
        a = a[:, ::step, ::step]
        if a.shape[1] < 3 or a.shape[2] < 3:
            raise ValueError(f"step {step} leaves frames smaller than 3x3")
    n = a.shape[0]
    y = _luma(a)
    # float32 reductions: numpy sums contiguous float32 pairwise, accurate to ~1e-6 relative here.
    flat = y.reshape(n, -1)
    brightness = flat.mean(axis=1)
    contrast = flat.std(axis=1)
    c = y[:, 1:-1, 1:-1]
    lap = y[:, :-2, 1:-1] + y[:, 2:, 1:-1] + y[:, 1:-1, :-2] + y[:, 1:-1, 2:] - 4.0 * c
    blur = lap.reshape(n, -1).var(axis=1)
    # Channel max/min by slices: numpy's reduction over a length-3 last axis is ~40x slower.
    b, g, r = a[..., 0], a[..., 1], a[..., 2]
    hi = np.maximum(np.maximum(b, g), r).astype(np.float32)
    lo = np.minimum(np.minimum(b, g), r)
    # HSV saturation (max - min) / max, 0 for black pixels; on 0..1.
    sat = (hi - lo) / np.maximum(hi, 1.0)
    saturation = sat.reshape(n, -1).mean(axis=1)
    return np.stack([brightness, contrast, blur, saturation], axis=1).astype(np.float64)


# -- health ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HealthSettings:
    """Thresholds of the frame-health checks (luma on 0-255).

    ``blur_min`` is scene- and resolution-dependent (a blank wall is "blurry" in focus); set it from a
    known-good stream, e.g. a fraction of the reference's lowest blur decile."""

    uniform_std: float = 4.0   # luma std below this: covered or obscured lens
    blur_min: float = 5.0      # Laplacian variance below this (and not uniform): out of focus
    frozen_frames: int = 10    # this many identical consecutive frames: frozen feed
    on_frames: int = 3         # frames a condition must hold before its event starts
    off_frames: int = 10       # frames it must be absent before its event ends
    max_side: int = 160        # larger frames are checked on every k-th pixel, k = ceil(longest side / this)

    def __post_init__(self) -> None:
        if self.uniform_std < 0 or self.blur_min < 0:
            raise ValueError("uniform_std and blur_min must be >= 0")
        if self.frozen_frames < 2:
            raise ValueError(f"frozen_frames must be >= 2 (a frame is compared with the previous), "
                             f"got {self.frozen_frames}")
        if self.on_frames < 1 or self.off_frames < 1:
            raise ValueError(f"on_frames and off_frames must be >= 1, got {self.on_frames}, {self.off_frames}")
        if self.max_side < 3:
            raise ValueError(f"max_side must be >= 3, got {self.max_side}")


@dataclass(frozen=True)
class HealthEvent:
    """A health condition started or ended. ``index`` is the frame index where the condition began
    (``start``) or the first frame of the clear run that ended it (``end``); ``value`` is the measure
    that decided (luma std, Laplacian variance, or the number of identical frames)."""

    reason: str
    action: str
    index: int
    value: float

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "action": self.action, "index": self.index, "value": round(self.value, 3)}


class _Debounce:
    """One condition's hysteresis: ``on`` consecutive true frames start it, ``off`` false ones end it."""

    __slots__ = ("active", "off", "off_count", "off_start", "on", "on_count", "on_start")

    def __init__(self, on: int, off: int) -> None:
        self.on, self.off = on, off
        self.active = False
        self.on_count = self.off_count = 0
        self.on_start = self.off_start = 0

    def step(self, reason: str, flags: np.ndarray, index: np.ndarray, values: np.ndarray,
             origins: np.ndarray | None = None) -> list[HealthEvent]:
        """``origins``: where each frame's condition really began (a frozen run starts at its first
        repeated frame, before it was long enough to count); default the frame itself."""
        # Fast paths: nothing happening, or a condition that simply continues.
        if not self.active and not flags.any():
            self.on_count = 0
            return []
        if self.active and flags.all():
            self.off_count = 0
            return []
        out: list[HealthEvent] = []
        starts = (index if origins is None else origins).tolist()
        for f, i, v, o in zip(flags.tolist(), index.tolist(), values.tolist(), starts, strict=True):
            if not self.active:
                if f:
                    if self.on_count == 0:
                        self.on_start = o
                    self.on_count += 1
                    if self.on_count >= self.on:
                        self.active, self.off_count = True, 0
                        out.append(HealthEvent(reason, "start", self.on_start, float(v)))
                else:
                    self.on_count = 0
            elif f:
                self.off_count = 0
            else:
                if self.off_count == 0:
                    self.off_start = i
                self.off_count += 1
                if self.off_count >= self.off:
                    self.active, self.on_count = False, 0
                    out.append(HealthEvent(reason, "end", self.off_start, float(v)))
        return out


class ImageHealth:
    """Uniform-frame, frozen-feed and out-of-focus checks over a stream of frames, with hysteresis.

    ``update`` returns the events that started or ended within the batch; ``active`` says which
    conditions hold now. Memory: one previous frame (for the frozen check) and a few counters."""

    def __init__(self, settings: HealthSettings | None = None) -> None:
        self.settings = settings or HealthSettings()
        s = self.settings
        self._uniform = _Debounce(s.on_frames, s.off_frames)
        # The frozen condition already needs frozen_frames identical frames; no extra on-delay.
        self._frozen = _Debounce(1, s.off_frames)
        self._blurry = _Debounce(s.on_frames, s.off_frames)
        self._prev: np.ndarray | None = None
        self._same_run = 0          # identical consecutive frames ending at the last frame seen
        self._next_index = 0
        self.frames = 0
        self.counts = dict.fromkeys(REASONS, 0)   # frames flagged per reason (before hysteresis)

    @property
    def active(self) -> dict[str, bool]:
        return {"uniform": self._uniform.active, "frozen": self._frozen.active, "blurry": self._blurry.active}

    def update(self, frames: Any, sample_index: int | None = None,
               features: np.ndarray | None = None) -> list[HealthEvent]:
        """Check a batch of frames; ``features`` may pass :func:`frame_features` already computed (used
        only for frames small enough to be checked whole). Frames with a side over ``max_side`` are
        checked on a regular subsample of their pixels: a 640x480 frame costs about as much as 160x120
        (the blur threshold then applies at that scale)."""
        a = as_frames(frames)
        n = a.shape[0]
        if n == 0:
            return []
        step = -(-max(a.shape[1], a.shape[2]) // self.settings.max_side)
        if step > 1:
            a = a[:, ::step, ::step]
            features = None
        start = self._next_index if sample_index is None else int(sample_index)
        self._next_index = start + n
        self.frames += n
        feats = frame_features(a) if features is None else np.asarray(features, dtype=np.float64)
        if feats.shape != (n, len(FEATURE_NAMES)):
            raise ValueError(f"features must be [{n}, {len(FEATURE_NAMES)}], got {list(feats.shape)}")
        s = self.settings
        index = np.arange(start, start + n)
        uniform = feats[:, 1] < s.uniform_std
        blurry = (feats[:, 2] < s.blur_min) & ~uniform
        # Identical to the previous frame: exact comparison (live sensors always add some noise,
        # so equality means a repeated buffer).
        first_same = self._prev is not None and self._prev.shape == a.shape[1:] and np.array_equal(self._prev, a[0])
        same = np.concatenate([[first_same], ~(a[1:] != a[:-1]).reshape(n - 1, a[0].size).any(axis=1)])
        runs = np.empty(n, dtype=np.int64)
        run = self._same_run
        for i, sm in enumerate(same.tolist()):   # n is a batch (a few dozen frames at most)
            run = run + 1 if sm else 0
            runs[i] = run
        self._same_run = run
        # A covered lens repeats one uniform frame: that is "uniform", not a frozen feed.
        frozen = (runs + 1 >= s.frozen_frames) & ~uniform
        self._prev = a[-1].copy()
        for reason, flags in (("uniform", uniform), ("frozen", frozen), ("blurry", blurry)):
            self.counts[reason] += int(flags.sum())
        events = self._uniform.step("uniform", uniform, index, feats[:, 1])
        events += self._frozen.step("frozen", frozen, index, (runs + 1).astype(np.float64), index - runs)
        events += self._blurry.step("blurry", blurry, index, feats[:, 2])
        return events

    def state(self) -> dict[str, Any]:
        return {"frames": self.frames, "active": self.active, "flagged_frames": dict(self.counts)}
