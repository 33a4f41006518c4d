"""Which inputs the agent sends for human review, and how an input travels: no I/O, no clock.

A prediction is *kept for review* when its top-1 score is below the low-confidence threshold, or
when it is one of the first ``after_drift`` inputs after a drift alarm opened (what the model saw as
the world changed), within ``per_hour`` samples per hour. Only the prediction's fields go by default
(``inputs="none"``): the device's raw inputs never leave it unless the configuration says
``inputs="raw"``; then the input array travels base64-encoded, halved in resolution (every other
row and column of an image) until it fits ``max_bytes``, or left out when it cannot fit.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

INPUT_MODES: Final = ("none", "raw")
REASONS: Final = ("low_confidence", "drift")


@dataclass(frozen=True)
class SamplePolicy:
    when: tuple[str, ...] = REASONS     # which reasons keep a sample
    inputs: str = "none"                # "none": the prediction only; "raw": the input too
    per_hour: int = 20                  # samples per hour at most (all reasons together)
    max_bytes: int = 64 * 1024          # the encoded input's size cap
    after_drift: int = 20               # inputs kept after a drift alarm opens

    def __post_init__(self) -> None:
        bad = [w for w in self.when if w not in REASONS]
        if bad:
            raise ValueError(f"sample reasons must be among {REASONS}, got {bad}")
        if self.inputs not in INPUT_MODES:
            raise ValueError(f"inputs must be one of {INPUT_MODES}, got {self.inputs!r}")
        if self.per_hour < 0 or self.max_bytes < 256 or self.after_drift < 0:
            raise ValueError(f"per_hour and after_drift must be >= 0 and max_bytes >= 256, got {self.per_hour}, "
                             f"{self.after_drift}, {self.max_bytes}")


class SampleSelector:
    """Decides, per prediction, whether it goes to review; counts what it kept and what the hourly cap
    turned away."""

    def __init__(self, policy: SamplePolicy, low_confidence: float) -> None:
        self.policy = policy
        self.low_confidence = low_confidence
        self._hour = -1
        self._used = 0
        self._drift_left = 0
        self.kept = dict.fromkeys(REASONS, 0)
        self.capped = 0

    def drift_opened(self) -> None:
        if "drift" in self.policy.when:
            self._drift_left = self.policy.after_drift

    def reason(self, score: float | None, now_s: float) -> str | None:
        """The reason to keep this prediction, or None (also None once the hour's quota is spent)."""
        why = None
        if self._drift_left > 0:
            self._drift_left -= 1
            why = "drift"
        elif "low_confidence" in self.policy.when and score is not None and not score >= self.low_confidence:
            why = "low_confidence"
        if why is None:
            return None
        hour = int(now_s // 3600)
        if hour != self._hour:
            self._hour, self._used = hour, 0
        if self._used >= self.policy.per_hour:
            self.capped += 1
            return None
        self._used += 1
        self.kept[why] += 1
        return why


def encode_input(x: Any, max_bytes: int) -> dict[str, Any] | None:
    """``{"dtype", "shape", "b64"}`` of an array, its image axes halved until it fits ``max_bytes``
    (``"step"`` says by how much), or None when even a 3-pixel-wide version does not fit or the
    record is not an array."""
    a = np.asarray(x) if not isinstance(x, dict) else None
    if a is None or a.dtype.kind not in "biuf" or a.size == 0:
        return None
    step = 1
    while True:
        v = a if step == 1 else a[::step, ::step] if a.ndim >= 2 else a
        raw = np.ascontiguousarray(v).tobytes()
        size = (len(raw) + 2) // 3 * 4
        if size <= max_bytes:
            out = {"dtype": v.dtype.str, "shape": list(v.shape), "b64": base64.b64encode(raw).decode("ascii")}
            if step > 1:
                out["step"] = step
            return out
        if a.ndim < 2 or min(v.shape[0], v.shape[1]) < 6:
            return None
        step *= 2


def decode_input(d: dict[str, Any]) -> np.ndarray:
    """The array of :func:`encode_input` (for the cloud and for tests); ValueError when malformed."""
    try:
        dtype = np.dtype(str(d["dtype"]))
        shape = tuple(int(n) for n in d["shape"])
        raw = base64.b64decode(str(d["b64"]), validate=True)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"sample input: malformed ({e})") from None
    if dtype.kind not in "biuf" or len(raw) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"sample input: {len(raw)} bytes do not hold {dtype} {list(shape)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)
