"""Confidence-based escalation to a larger cloud model: the policy, the per-batch decision, the budget,
the payload codec, the table of answers awaited, and the tuning maths. Pure: numpy only, no I/O, and
every function that depends on time takes ``now`` (seconds on a monotonic clock) from its caller.

Theory of operation. The device answers every input at once with its small model. :func:`decide` marks
the rows of a batch the model is unsure about (top-1 score below ``score_below``, top-1 minus top-2
below ``margin_below``, or any row while a drift alarm is open when ``on_drift``). For each marked row
the agent asks :class:`Budget` (two token buckets: escalations per minute and bytes per hour) and
encodes the input with :func:`encode_payload` as ``share`` allows: ``none`` (the default) sends
nothing at all, ``features`` the model's input tensor in float16 or 8 bits with an offset and scale,
``downscaled`` an image reduced to ``downscale_max_side`` pixels on its longest side in 8 bits, ``raw``
the exact array (an explicit opt-in). Escalated ids wait in :class:`PendingAnswers`; a cloud answer
that arrives before ``deadline_s`` becomes the final answer, otherwise the local one stands. Nothing
here blocks: the hot path never waits for the cloud.

Tuning (:func:`tuning_curve`, :func:`choose`): from the device's scores on labelled held-out data and the
cloud model's predictions on the same rows, the combined accuracy for each escalation rate from 0 to
30 % and the threshold that gives it; :func:`choose` keeps the most accurate point within a budget rate.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np

from edge_runtime.errors import ConfigError, EdgeRuntimeError

__all__ = [
    "DRIFT",
    "ESCALATION_FILE",
    "ESCALATION_SCHEMA",
    "LOW_MARGIN",
    "LOW_SCORE",
    "OUTCOMES",
    "REASON_NAMES",
    "REFUSALS",
    "RULES",
    "SHARES",
    "Budget",
    "Curve",
    "CurvePoint",
    "Decision",
    "Decoded",
    "Encoded",
    "EscalationError",
    "EscalationPolicy",
    "PendingAnswers",
    "Settled",
    "choose",
    "decide",
    "decode_input",
    "decode_payload",
    "encode_input",
    "encode_payload",
    "manifest_entry",
    "parse_rate",
    "read_document",
    "top1_and_margin",
    "tuning_curve",
    "tuning_document",
]

SHARES: Final = ("none", "features", "downscaled", "raw")
RULES: Final = ("score", "margin")
ESCALATION_SCHEMA: Final = "edge-runtime.escalation/1"
ESCALATION_FILE: Final = "escalation.json"

# Reason codes: bits of Decision.reasons (a row can have several).
LOW_SCORE: Final = 1
LOW_MARGIN: Final = 2
DRIFT: Final = 4
REASON_NAMES: Final = {LOW_SCORE: "low_score", LOW_MARGIN: "low_margin", DRIFT: "drift"}

# Why encode_payload refused an input.
REFUSALS: Final = ("share_none", "not_numeric", "empty", "not_image", "nonfinite", "over_cap")

# How an awaited answer ended.
OUTCOMES: Final = ("on_time", "late", "unknown", "expired", "dropped")

MIN_PAYLOAD_BYTES: Final = 64
MAX_PAYLOAD_BYTES: Final = 16 * 1024 * 1024


class EscalationError(EdgeRuntimeError, ValueError):
    """Data handed to the escalation core is wrong (shapes, lengths, a malformed payload): says what was
    expected and what arrived."""

    def __init__(self, what: str, expected: Any, got: Any) -> None:
        self.what = what
        self.expected = expected
        self.got = got
        super().__init__(f"{what}: expected {expected}, got {got}")


# -- policy -----------------------------------------------------------------------------------------

def _kind(v: Any) -> str:
    return f"{v!r} ({type(v).__name__})"


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass(frozen=True)
class EscalationPolicy:
    """When to escalate, how much, what leaves the device and how long to wait for the cloud.

    An input escalates when any configured condition holds; with neither threshold set and ``on_drift``
    off nothing escalates. ``share = "none"`` (the default) means raw inputs never leave the device, so
    escalation publishes nothing: :attr:`publishes` is False and :meth:`describe` says so.
    """

    score_below: float | None = None      # escalate when the top-1 score < this (0, 1]
    margin_below: float | None = None     # escalate when top-1 minus top-2 score < this (0, 1]
    on_drift: bool = False                # escalate every input while a drift alarm is open
    max_per_minute: float = 30.0          # escalations per minute (token bucket, bursts up to one minute's worth)
    max_bytes_per_hour: int = 8 * 1024 * 1024  # encoded input bytes per hour (token bucket)
    share: str = "none"                   # none | features | downscaled | raw
    max_payload_bytes: int = 16 * 1024    # cap on one encoded input
    deadline_s: float = 2.0               # a cloud answer later than this is ignored: the local one stands
    downscale_max_side: int = 64          # share = "downscaled": longest image side in pixels

    def __post_init__(self) -> None:
        for key in ("score_below", "margin_below"):
            v = getattr(self, key)
            if v is not None and not (_is_number(v) and 0.0 < v <= 1.0):
                raise ConfigError(f"escalation key '{key}'", key=key, expected="a number in (0, 1] or unset",
                                  got=_kind(v))
        if not isinstance(self.on_drift, bool):
            raise ConfigError("escalation key 'on_drift'", key="on_drift", expected="true or false",
                              got=_kind(self.on_drift))
        if not (_is_number(self.max_per_minute) and 0 < self.max_per_minute <= 1e6
                and math.isfinite(self.max_per_minute)):
            raise ConfigError("escalation key 'max_per_minute'", key="max_per_minute",
                              expected="a number in (0, 1000000]", got=_kind(self.max_per_minute))
        if not (isinstance(self.max_bytes_per_hour, int) and not isinstance(self.max_bytes_per_hour, bool)
                and self.max_bytes_per_hour >= MIN_PAYLOAD_BYTES):
            raise ConfigError("escalation key 'max_bytes_per_hour'", key="max_bytes_per_hour",
                              expected=f"an integer >= {MIN_PAYLOAD_BYTES}", got=_kind(self.max_bytes_per_hour))
        if self.share not in SHARES:
            raise ConfigError("escalation key 'share'", key="share", expected=f"one of {', '.join(SHARES)}",
                              got=_kind(self.share))
        if not (isinstance(self.max_payload_bytes, int) and not isinstance(self.max_payload_bytes, bool)
                and MIN_PAYLOAD_BYTES <= self.max_payload_bytes <= MAX_PAYLOAD_BYTES):
            raise ConfigError("escalation key 'max_payload_bytes'", key="max_payload_bytes",
                              expected=f"an integer in [{MIN_PAYLOAD_BYTES}, {MAX_PAYLOAD_BYTES}]",
                              got=_kind(self.max_payload_bytes))
        if self.max_payload_bytes > self.max_bytes_per_hour:
            raise ConfigError("escalation key 'max_payload_bytes'", key="max_payload_bytes",
                              expected=f"at most max_bytes_per_hour ({self.max_bytes_per_hour})",
                              got=_kind(self.max_payload_bytes))
        if not (_is_number(self.deadline_s) and 0 < self.deadline_s <= 3600):
            raise ConfigError("escalation key 'deadline_s'", key="deadline_s", expected="seconds in (0, 3600]",
                              got=_kind(self.deadline_s))
        if not (isinstance(self.downscale_max_side, int) and not isinstance(self.downscale_max_side, bool)
                and 4 <= self.downscale_max_side <= 4096):
            raise ConfigError("escalation key 'downscale_max_side'", key="downscale_max_side",
                              expected="an integer in [4, 4096]", got=_kind(self.downscale_max_side))

    @property
    def active(self) -> bool:
        """Some condition is configured, so some inputs may be marked for escalation."""
        return self.score_below is not None or self.margin_below is not None or self.on_drift

    @property
    def publishes(self) -> bool:
        """Escalated inputs actually leave the device (False with ``share = "none"``)."""
        return self.active and self.share != "none"

    def with_threshold(self, rule: str | None, threshold: float | None) -> EscalationPolicy:
        """This policy with one tuned rule in place of both thresholds (``rule=None``: no threshold)."""
        if rule is None or threshold is None:
            return replace(self, score_below=None, margin_below=None)
        if rule not in RULES:
            raise ConfigError("escalation rule", key="rule", expected=f"one of {', '.join(RULES)}", got=_kind(rule))
        return replace(self, score_below=threshold if rule == "score" else None,
                       margin_below=threshold if rule == "margin" else None)

    def describe(self) -> str:
        """One line for logs and the CLI."""
        conds = []
        if self.score_below is not None:
            conds.append(f"top-1 score < {self.score_below:.4g}")
        if self.margin_below is not None:
            conds.append(f"top-1 margin < {self.margin_below:.4g}")
        if self.on_drift:
            conds.append("a drift alarm is open")
        if not conds:
            return "escalation off: no condition configured (score_below, margin_below, on_drift)"
        when = " or ".join(conds)
        if self.share == "none":
            return (f"share = none: inputs never leave this device, so nothing is escalated (would escalate when "
                    f"{when}); set share = features, downscaled or raw to send inputs to the cloud model")
        return (f"escalate when {when}: share {self.share}, at most {self.max_per_minute:g}/min and "
                f"{_bytes(self.max_bytes_per_hour)}/h, {_bytes(self.max_payload_bytes)} per input; the cloud "
                f"answer counts within {self.deadline_s:g} s, else the local one stands")

    def to_dict(self) -> dict[str, Any]:
        return {"score_below": self.score_below, "margin_below": self.margin_below, "on_drift": self.on_drift,
                "max_per_minute": self.max_per_minute, "max_bytes_per_hour": self.max_bytes_per_hour,
                "share": self.share, "max_payload_bytes": self.max_payload_bytes, "deadline_s": self.deadline_s,
                "downscale_max_side": self.downscale_max_side}

    @classmethod
    def from_dict(cls, d: Any, origin: str = "escalation") -> EscalationPolicy:
        """From a config TOML table or a bundle manifest's ``escalation.policy``; unknown keys are refused.
        A missing or null threshold means that rule is off; other missing keys take their defaults."""
        if not isinstance(d, dict):
            raise ConfigError("escalation policy", path=origin, expected="a table of keys", got=_kind(d))
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown escalation key '{unknown[0]}' (known: {', '.join(sorted(known))})",
                              path=origin, key=unknown[0])
        kw = {k: v for k, v in d.items() if v is not None or k in ("score_below", "margin_below")}
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"escalation key '{e.key}'", path=origin, key=e.key, expected=e.expected,
                              got=e.got) from None


# -- the decision -------------------------------------------------------------------------------------

def top1_and_margin(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the top-1 score, and top-1 minus top-2 (``|2p - 1|`` for a single-column binary score).
    Computed in the scores' own dtype, exactly as :func:`decide` does, so a tuned threshold means on the
    device what it meant on the tuning data."""
    s = _rows(scores)
    c = s.shape[1]
    if c == 1:
        p = s[:, 0]
        return p, np.abs(p + p - 1)
    part = np.partition(s, c - 2, axis=1)
    top1 = part[:, c - 1]
    return top1, top1 - part[:, c - 2]


def _rows(scores: Any) -> np.ndarray:
    s = scores if type(scores) is np.ndarray else np.asarray(scores)
    if s.ndim == 1:
        s = s.reshape(1, -1)
    if s.ndim != 2 or s.shape[1] == 0 or s.dtype.kind not in "fiu":
        raise EscalationError("scores", "numbers, one row per input [N, C] with C >= 1",
                              f"{s.dtype}{list(s.shape)}")
    return s


class Decision:
    """Which rows of a batch escalate (``escalate``, bool [N]) and why (``reasons``, uint8 [N] of bits
    LOW_SCORE, LOW_MARGIN, DRIFT; built on first use, since most batches escalate nothing). The decision
    ignores the budget: the caller asks :class:`Budget` per escalated row. Read-only."""

    __slots__ = ("_drift", "_low_margin", "_low_score", "_reasons", "escalate")

    def __init__(self, escalate: np.ndarray, low_score: np.ndarray | None = None,
                 low_margin: np.ndarray | None = None, drift: bool = False) -> None:
        self.escalate = escalate
        self._low_score = low_score
        self._low_margin = low_margin
        self._drift = drift
        self._reasons: np.ndarray | None = None

    @property
    def count(self) -> int:
        return int(np.count_nonzero(self.escalate))

    @property
    def any(self) -> bool:
        return bool(self.escalate.any())

    @property
    def reasons(self) -> np.ndarray:
        if self._reasons is None:
            r = np.zeros(len(self.escalate), np.uint8)
            if self._low_score is not None:
                r[self._low_score] |= LOW_SCORE
            if self._low_margin is not None:
                r[self._low_margin] |= LOW_MARGIN
            if self._drift:
                r |= DRIFT
            self._reasons = r
        return self._reasons

    def indices(self) -> list[int]:
        return np.flatnonzero(self.escalate).tolist()

    def names(self, i: int) -> tuple[str, ...]:
        """Reason names of row ``i``, e.g. ``("low_score", "drift")``."""
        r = int(self.reasons[i])
        return tuple(name for bit, name in REASON_NAMES.items() if r & bit)

    def __repr__(self) -> str:
        return f"Decision(escalate={self.escalate.tolist()}, reasons={self.reasons.tolist()})"


def decide(policy: EscalationPolicy, scores: Any, drift_active: bool = False) -> Decision:
    """Rows of ``scores`` ([N, C] probabilities, or one row [C]) that escalate, with their reasons. A row
    whose statistic is NaN counts as unsure (it escalates). A few microseconds per batch
    (benchmarks/escalation_curve.py measures it on the sample pair)."""
    s = _rows(scores)
    t, m = policy.score_below, policy.margin_below
    low_score = low_margin = None
    if m is None:
        if t is not None:
            low_score = ~(s.max(axis=1) >= t)
    else:
        top1, margin = top1_and_margin(s)
        low_margin = ~(margin >= m)
        if t is not None:
            low_score = ~(top1 >= t)
    drift = drift_active and policy.on_drift
    if drift:
        escalate = np.ones(s.shape[0], bool)
    elif low_score is None:
        escalate = low_margin if low_margin is not None else np.zeros(s.shape[0], bool)
    else:
        escalate = low_score if low_margin is None else low_score | low_margin
    return Decision(escalate, low_score, low_margin, drift)


# -- the budget ---------------------------------------------------------------------------------------

class Budget:
    """Two token buckets: escalations per minute and encoded bytes per hour. Each starts full (bursts of
    up to ``burst_count`` escalations and ``burst_bytes`` bytes: by default one period's worth, and at
    least one escalation) and refills continuously. Guarantee: over any interval of length T at most
    ``burst_count + T * max_per_minute / 60`` escalations and ``burst_bytes + T * max_bytes_per_hour /
    3600`` bytes are taken, so the long-run rates never exceed the limits; one minute after an idle spell
    can see up to twice ``max_per_minute``. A take needs both buckets; a refused take changes neither.
    Deterministic for a given sequence of ``(nbytes, now)``; ``now`` going backwards adds nothing."""

    REASONS: Final = ("count", "bytes", "too_large")

    def __init__(self, max_per_minute: float, max_bytes_per_hour: float, *, burst_count: float | None = None,
                 burst_bytes: float | None = None) -> None:
        if not (_is_number(max_per_minute) and max_per_minute > 0 and math.isfinite(max_per_minute)):
            raise EscalationError("Budget max_per_minute", "a positive number", _kind(max_per_minute))
        if not (_is_number(max_bytes_per_hour) and max_bytes_per_hour > 0 and math.isfinite(max_bytes_per_hour)):
            raise EscalationError("Budget max_bytes_per_hour", "a positive number", _kind(max_bytes_per_hour))
        self.count_rate = float(max_per_minute) / 60.0
        self.byte_rate = float(max_bytes_per_hour) / 3600.0
        self.count_capacity = float(max(1.0, max_per_minute) if burst_count is None else burst_count)
        self.byte_capacity = float(max_bytes_per_hour if burst_bytes is None else burst_bytes)
        if self.count_capacity < 1 or self.byte_capacity <= 0:
            raise EscalationError("Budget bursts", "burst_count >= 1 and burst_bytes > 0",
                                  f"{self.count_capacity}, {self.byte_capacity}")
        self._count = self.count_capacity
        self._bytes = self.byte_capacity
        self._last: float | None = None
        self.taken = 0
        self.taken_bytes = 0
        self.refused = dict.fromkeys(self.REASONS, 0)

    @classmethod
    def from_policy(cls, policy: EscalationPolicy) -> Budget:
        return cls(policy.max_per_minute, policy.max_bytes_per_hour)

    def _refill(self, now: float) -> None:
        if self._last is None:
            self._last = now
            return
        dt = now - self._last
        if dt > 0:
            self._count = min(self.count_capacity, self._count + dt * self.count_rate)
            self._bytes = min(self.byte_capacity, self._bytes + dt * self.byte_rate)
            self._last = now

    def try_take(self, nbytes: int, now: float) -> bool:
        """Take one escalation of ``nbytes`` encoded bytes at ``now`` if both buckets allow it."""
        if nbytes < 0:
            raise EscalationError("Budget.try_take nbytes", "bytes >= 0", nbytes)
        self._refill(now)
        if nbytes > self.byte_capacity:
            self.refused["too_large"] += 1
            return False
        if self._count < 1.0:
            self.refused["count"] += 1
            return False
        if self._bytes < nbytes:
            self.refused["bytes"] += 1
            return False
        self._count -= 1.0
        self._bytes -= nbytes
        self.taken += 1
        self.taken_bytes += nbytes
        return True

    def available(self, now: float) -> tuple[float, float]:
        """(escalations, bytes) that could be taken at ``now``; advances the clock like a take would."""
        self._refill(now)
        return self._count, self._bytes

    def to_dict(self) -> dict[str, Any]:
        return {"taken": self.taken, "taken_bytes": self.taken_bytes, "refused": dict(self.refused),
                "max_per_minute": self.count_rate * 60.0, "max_bytes_per_hour": self.byte_rate * 3600.0}


# -- the payload codec --------------------------------------------------------------------------------
#
# One encoded input: a 12-byte header, the carried array's shape, codec parameters, the data.
#   magic "EI" | version u8 | codec u8 | original dtype u8 | layout u8 | ndim u8 | pad u8 | factor u32
#   shape: ndim x u32 | q8 codecs: lo f32, scale f32 (x ~= lo + q * scale) | data
# Little-endian throughout. ``factor`` is the spatial reduction of a downscaled image (1 otherwise).

_MAGIC = b"EI"
_VERSION = 1
_HEADER = struct.Struct("<2sBBBBBxI")
_Q8_PARAMS = struct.Struct("<ff")
_CODECS: Final = ("raw", "f16", "q8", "image_u8", "image_q8")
_LAYOUTS: Final = ("tensor", "HW", "HWC", "CHW")
_DTYPES: Final = tuple(np.dtype(t) for t in ("float32", "float64", "float16", "uint8", "int8", "uint16", "int16",
                                             "int32", "int64", "uint32", "uint64", "bool"))
_DTYPE_CODE: Final = {d: i for i, d in enumerate(_DTYPES)}
_F16_MAX = 65504.0
_MAX_NDIM = 8


@dataclass(frozen=True)
class Encoded:
    """An encoded input (``data``), or why there is none (``reason``, one of :data:`REFUSALS`)."""

    data: bytes | None
    reason: str = "ok"
    detail: str = ""
    codec: str | None = None

    @property
    def ok(self) -> bool:
        return self.data is not None


@dataclass(frozen=True)
class Decoded:
    array: np.ndarray
    codec: str
    layout: str          # "tensor", or the image layout of a downscaled input: HW, HWC or CHW
    factor: int          # spatial reduction of a downscaled image (1: none)
    original_dtype: np.dtype[Any]


def _header(codec: str, dtype: np.dtype[Any], layout: str, shape: tuple[int, ...], factor: int = 1) -> bytes:
    return (_HEADER.pack(_MAGIC, _VERSION, _CODECS.index(codec), _DTYPE_CODE[dtype], _LAYOUTS.index(layout),
                         len(shape), factor)
            + struct.pack(f"<{len(shape)}I", *shape))


def _q8(x: np.ndarray) -> tuple[bytes, np.ndarray] | None:
    """8-bit affine codes of a finite array: (lo, scale as float32 parameters, uint8 codes); None when
    the range does not fit float32."""
    xf = x.astype(np.float64, copy=False)
    lo64, hi64 = float(xf.min()), float(xf.max())
    lo = np.float32(lo64)
    scale = np.float32((hi64 - float(lo)) / 255.0) if hi64 > float(lo) else np.float32(1.0)
    if not (np.isfinite(lo) and np.isfinite(scale)) or scale == 0:
        return None
    q = np.rint((xf - float(lo)) / float(scale))
    np.clip(q, 0, 255, out=q)
    return _Q8_PARAMS.pack(float(lo), float(scale)), q.astype(np.uint8)


def _size(shape_len: int, extra: int, nbytes: int) -> int:
    return _HEADER.size + 4 * shape_len + extra + nbytes


def _image_view(a: np.ndarray) -> tuple[np.ndarray, str] | None:
    """The array as an image (HW, HWC or CHW; a leading batch axis of 1 dropped), or None."""
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 2:
        return a, "HW"
    if a.ndim == 3:
        if a.shape[-1] in (1, 3, 4):
            return a, "HWC"
        if a.shape[0] in (1, 3, 4):
            return a, "CHW"
    return None


def _box_reduce(img: np.ndarray, layout: str, k: int) -> np.ndarray:
    """Mean over about k x k pixel blocks (rows/columns past the last whole block are dropped), float32.
    Rows of a block are added one slice at a time in a small integer (uint8 images) or float64 accumulator:
    about ten times faster than one reduction over a 5-D view on a 640x480 frame."""
    x = np.moveaxis(img, 0, -1) if layout == "CHW" else img[..., None] if layout == "HW" else img
    h, w, c = x.shape
    oh, ow = max(1, h // k), max(1, w // k)
    bh, bw = h // oh, w // ow
    blocks = x[: oh * bh, : ow * bw].reshape(oh, bh, ow, bw, c)
    acc_type = (np.uint16 if bh <= 257 else np.uint32) if x.dtype == np.uint8 else np.float64
    acc = blocks[:, 0].astype(acc_type)
    for i in range(1, bh):
        acc += blocks[:, i]
    total = acc.sum(axis=2, dtype=np.uint32 if x.dtype == np.uint8 else np.float64)
    y = (total / (bh * bw)).astype(np.float32)
    if layout == "CHW":
        return np.ascontiguousarray(np.moveaxis(y, -1, 0))
    return y[..., 0] if layout == "HW" else y


def _encode_downscaled(a: np.ndarray, cap: int, max_side: int) -> Encoded:
    view = _image_view(a)
    if view is None:
        return Encoded(None, "not_image", f"share downscaled needs an image (HW, HWC or CHW), got "
                                          f"{a.dtype}{list(a.shape)}")
    img, layout = view
    hw = img.shape[1:] if layout == "CHW" else img.shape[:2]
    side = max_side
    while side >= 4:
        k = max(1, math.ceil(max(hw) / side))
        small = _box_reduce(img, layout, k) if k > 1 else img
        if img.dtype == np.uint8:
            codes = small if k == 1 else np.clip(np.rint(small), 0, 255).astype(np.uint8)
            extra, codec = b"", "image_u8"
        else:
            q = _q8(np.asarray(small))
            if q is None:
                return Encoded(None, "nonfinite", "the image's range does not fit float32")
            extra, codes = q
            codec = "image_q8"
        if _size(codes.ndim, len(extra), codes.size) <= cap:
            data = _header(codec, img.dtype, layout, codes.shape, k) + extra + np.ascontiguousarray(codes).tobytes()
            return Encoded(data, codec=codec)
        side //= 2
    return Encoded(None, "over_cap", f"even a {side * 2}-pixel version of {list(img.shape)} is over {cap} bytes")


def encode_payload(x: Any, share: str, cap: int, *, max_side: int = 64) -> Encoded:
    """Encode one input as ``share`` allows within ``cap`` bytes (header included), or say why not.

    ``features``: float inputs in float16 (values beyond its range, or a float16 copy over the cap:
    8 bits with an offset and scale); integer inputs as they are (8 bits with a scale when over the cap).
    ``downscaled``: an image reduced by block means until its longest side is <= ``max_side`` (halved
    again while over the cap), in 8 bits. ``raw``: the exact bytes, refused when over the cap.
    """
    if share == "none":
        return Encoded(None, "share_none", "share = none: inputs never leave this device")
    if share not in SHARES:
        raise EscalationError("share", f"one of {', '.join(SHARES)}", _kind(share))
    a = None if isinstance(x, dict | str | bytes) else x if type(x) is np.ndarray else np.asarray(x)
    if a is not None and a.dtype.byteorder not in "=|":
        a = a.astype(a.dtype.newbyteorder("="))
    if a is None or a.dtype not in _DTYPE_CODE:
        got = type(x).__name__ if a is None else str(a.dtype)
        return Encoded(None, "not_numeric", f"an array of numbers or booleans is needed, got {got}")
    if a.size == 0:
        return Encoded(None, "empty", f"the array has no elements ({list(a.shape)})")
    if a.ndim > _MAX_NDIM or any(n > 0xFFFFFFFF for n in a.shape):
        return Encoded(None, "not_numeric", f"at most {_MAX_NDIM} dimensions, got {list(a.shape)}")
    if share == "downscaled":
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return Encoded(None, "nonfinite", "the image has NaN or Inf values")
        return _encode_downscaled(a, cap, max_side)
    raw_size = _size(a.ndim, 0, a.nbytes)
    if share == "raw" or a.dtype.itemsize == 1:  # raw, or features that are 8-bit already
        if raw_size > cap:
            return Encoded(None, "over_cap", f"the {share} input needs {raw_size} bytes, cap {cap}")
        return Encoded(_header("raw", a.dtype, "tensor", a.shape) + _le_bytes(a), codec="raw")
    if a.dtype.kind == "f":
        finite = bool(np.isfinite(a).all())
        if finite and float(np.abs(a).max()) <= _F16_MAX and _size(a.ndim, 0, 2 * a.size) <= cap:
            return Encoded(_header("f16", a.dtype, "tensor", a.shape) + a.astype("<f2").tobytes(), codec="f16")
        if not finite:
            return Encoded(None, "nonfinite", "the features have NaN or Inf values")
    elif raw_size <= cap:  # wider integers travel exactly when they fit
        return Encoded(_header("raw", a.dtype, "tensor", a.shape) + _le_bytes(a), codec="raw")
    size = _size(a.ndim, _Q8_PARAMS.size, a.size)
    if size > cap:
        return Encoded(None, "over_cap", f"{a.size} values need at least {size} bytes in 8 bits, cap {cap}")
    q = _q8(a)
    if q is None:
        return Encoded(None, "nonfinite", "the features' range does not fit float32")
    params, codes = q
    return Encoded(_header("q8", a.dtype, "tensor", a.shape) + params + codes.tobytes(), codec="q8")


def _le_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()


def encode_input(x: Any, share: str, cap: int, *, max_side: int = 64) -> bytes | None:
    """The bytes of :func:`encode_payload`, or None when it refused (see its ``reason``)."""
    return encode_payload(x, share, cap, max_side=max_side).data


def decode_payload(data: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> Decoded:
    """Parse one encoded input; :class:`EscalationError` (a ValueError) when it is malformed. Lossy codecs
    come back in the original float dtype (``q8``, ``f16``) or float32 (``image_q8``)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EscalationError("escalation payload", "bytes", type(data).__name__)
    buf = memoryview(data)
    if len(buf) > max_bytes:
        raise EscalationError("escalation payload", f"at most {max_bytes} bytes", len(buf))
    if len(buf) < _HEADER.size:
        raise EscalationError("escalation payload", f"a {_HEADER.size}-byte header", f"{len(buf)} bytes")
    magic, version, codec_i, dtype_i, layout_i, ndim, factor = _HEADER.unpack_from(buf)
    if magic != _MAGIC or version != _VERSION:
        raise EscalationError("escalation payload", f"magic {_MAGIC!r} version {_VERSION}", f"{magic!r} {version}")
    if codec_i >= len(_CODECS) or dtype_i >= len(_DTYPES) or layout_i >= len(_LAYOUTS) or ndim > _MAX_NDIM:
        raise EscalationError("escalation payload header", "known codec, dtype, layout and <= 8 dims",
                              f"codec {codec_i}, dtype {dtype_i}, layout {layout_i}, {ndim} dims")
    codec, dtype, layout = _CODECS[codec_i], _DTYPES[dtype_i], _LAYOUTS[layout_i]
    off = _HEADER.size
    if len(buf) < off + 4 * ndim:
        raise EscalationError("escalation payload", f"{ndim} dims in the header", f"{len(buf)} bytes")
    shape = struct.unpack_from(f"<{ndim}I", buf, off)
    off += 4 * ndim
    count = math.prod(shape)
    lo = scale = 0.0
    if codec in ("q8", "image_q8"):
        if len(buf) < off + _Q8_PARAMS.size:
            raise EscalationError("escalation payload", "offset and scale", f"{len(buf)} bytes")
        lo, scale = _Q8_PARAMS.unpack_from(buf, off)
        off += _Q8_PARAMS.size
    item = {"raw": dtype.itemsize, "f16": 2}.get(codec, 1)
    if len(buf) - off != count * item:
        raise EscalationError("escalation payload", f"{count * item} data bytes for {codec} {list(shape)}",
                              len(buf) - off)
    body = buf[off:]
    if codec == "raw":
        arr = np.frombuffer(body, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    elif codec == "f16":
        arr = np.frombuffer(body, dtype="<f2").astype(dtype).reshape(shape)
    elif codec == "image_u8":
        arr = np.frombuffer(body, dtype=np.uint8).reshape(shape).copy()
    else:
        q = np.frombuffer(body, dtype=np.uint8).reshape(shape).astype(np.float32)
        out = np.float32(lo) + q * np.float32(scale)
        arr = out.astype(dtype) if codec == "q8" and dtype.kind == "f" else out
    return Decoded(arr, codec, layout, int(factor), dtype)


def decode_input(data: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> np.ndarray:
    """The array of :func:`encode_input` (for the cloud and for tests)."""
    return decode_payload(data, max_bytes).array


# -- answers awaited ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settled:
    """How an escalated input ended. ``final`` is the answer that stands: the cloud's when ``on_time``,
    else the local one (None for an ``unknown`` id)."""

    id: str
    outcome: str              # one of OUTCOMES
    final: Any
    local: Any
    cloud: Any = None
    waited_s: float | None = None


class PendingAnswers:
    """Escalated ids awaiting a cloud answer, each with a deadline; at most ``max_pending`` (adding one
    more drops the oldest, whose local answer stands, counted as ``dropped``). Ids that expired are
    remembered (at most ``max_pending`` of them) so that their answers, if they come, count as ``late``
    rather than ``unknown``. ``now`` must not go backwards between calls for deadlines to keep their
    order (a monotonic clock)."""

    def __init__(self, deadline_s: float, max_pending: int = 1024) -> None:
        if not (_is_number(deadline_s) and deadline_s > 0):
            raise EscalationError("PendingAnswers deadline_s", "seconds > 0", _kind(deadline_s))
        if not (isinstance(max_pending, int) and max_pending >= 1):
            raise EscalationError("PendingAnswers max_pending", "an integer >= 1", _kind(max_pending))
        self.deadline_s = float(deadline_s)
        self.max_pending = max_pending
        self._pending: OrderedDict[str, tuple[float, float, Any]] = OrderedDict()  # id -> (added, deadline, local)
        self._expired: OrderedDict[str, tuple[float, Any]] = OrderedDict()  # id -> (added, local answer)
        self.counts = dict.fromkeys(("added", *OUTCOMES), 0)

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._pending

    def add(self, id_: str, local_answer: Any, now: float) -> Settled | None:
        """Await an answer for ``id_`` until ``now + deadline_s``. Returns the entry dropped to make room,
        if any. An id already awaited is an error (ids are unique per prediction)."""
        if id_ in self._pending:
            raise EscalationError("PendingAnswers.add", "an id not already awaited", repr(id_))
        dropped = None
        if len(self._pending) >= self.max_pending:
            old_id, (added, _deadline, local) = self._pending.popitem(last=False)
            self.counts["dropped"] += 1
            dropped = Settled(old_id, "dropped", local, local, None, now - added)
        self._pending[id_] = (now, now + self.deadline_s, local_answer)
        self.counts["added"] += 1
        return dropped

    def resolve(self, id_: str, answer: Any, now: float) -> Settled:
        """The cloud answered ``id_``: ``on_time`` (its answer is final), ``late`` (past the deadline: the
        local answer stands) or ``unknown`` (never escalated, dropped, or forgotten)."""
        entry = self._pending.pop(id_, None)
        if entry is not None:
            added, deadline, local = entry
            if now <= deadline:
                self.counts["on_time"] += 1
                return Settled(id_, "on_time", answer, local, answer, now - added)
            self.counts["late"] += 1
            return Settled(id_, "late", local, local, answer, now - added)
        if id_ in self._expired:
            added, local = self._expired.pop(id_)
            self.counts["late"] += 1
            return Settled(id_, "late", local, local, answer, now - added)
        self.counts["unknown"] += 1
        return Settled(id_, "unknown", None, None, answer, None)

    def discard(self, id_: str) -> bool:
        """Take back an entry that was never sent after all (the link was down): no outcome is counted."""
        if self._pending.pop(id_, None) is None:
            return False
        self.counts["added"] -= 1
        return True

    def expire(self, now: float) -> list[Settled]:
        """Entries whose deadline has passed by ``now``: their local answers stand."""
        out: list[Settled] = []
        pending = self._pending
        while pending:
            id_, (added, deadline, local) = next(iter(pending.items()))
            if deadline >= now:
                break
            pending.popitem(last=False)
            self._remember(id_, added, local)
            self.counts["expired"] += 1
            out.append(Settled(id_, "expired", local, local, None, now - added))
        return out

    def next_deadline(self) -> float | None:
        """When the oldest entry expires (for the caller's timer), None when nothing is awaited."""
        if not self._pending:
            return None
        return next(iter(self._pending.values()))[1]

    def _remember(self, id_: str, added: float, local: Any) -> None:
        self._expired[id_] = (added, local)
        while len(self._expired) > self.max_pending:
            self._expired.popitem(last=False)

    def stats(self) -> dict[str, int]:
        return {"pending": len(self._pending), "max_pending": self.max_pending, **self.counts}


# -- tuning -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CurvePoint:
    target_rate: float    # the escalation rate asked for
    rate: float           # the rate the threshold gives on the tuning data (<= target_rate)
    n_escalated: int
    threshold: float      # escalate when the rule's statistic < threshold
    accuracy: float       # combined accuracy: the cloud's answer on escalated rows, the device's elsewhere

    def to_dict(self) -> dict[str, Any]:
        return {"target_rate": round(self.target_rate, 6), "rate": round(self.rate, 6),
                "n_escalated": self.n_escalated, "threshold": self.threshold, "accuracy": round(self.accuracy, 6)}


@dataclass(frozen=True)
class Curve:
    """Combined accuracy against escalation rate for one rule on one labelled data set."""

    rule: str
    n: int
    device_accuracy: float
    cloud_accuracy: float | None          # None when no cloud predictions were given
    cloud_assumed_correct: bool           # True: an upper bound, the cloud is taken to answer every row right
    points: tuple[CurvePoint, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "n": self.n, "device_accuracy": round(self.device_accuracy, 6),
                "cloud_accuracy": None if self.cloud_accuracy is None else round(self.cloud_accuracy, 6),
                "cloud_assumed_correct": self.cloud_assumed_correct,
                "points": [p.to_dict() for p in self.points]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Curve:
        try:
            return cls(str(d["rule"]), int(d["n"]), float(d["device_accuracy"]),
                       None if d.get("cloud_accuracy") is None else float(d["cloud_accuracy"]),
                       bool(d["cloud_assumed_correct"]),
                       tuple(CurvePoint(float(p["target_rate"]), float(p["rate"]), int(p["n_escalated"]),
                                        float(p["threshold"]), float(p["accuracy"])) for p in d["points"]))
        except (KeyError, TypeError, ValueError) as e:
            raise EscalationError("escalation curve", "rule, n, accuracies and points", f"{e!r}") from None


def _labels(y: Any, n: int, what: str) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1 or len(a) != n or a.dtype.kind not in "iub":
        raise EscalationError(what, f"{n} integer classes, one per row", f"{a.dtype}{list(a.shape)}")
    return a


def tuning_curve(scores: Any, labels: Any, cloud_pred: Any = None, *, rule: str = "score",
                 max_rate: float = 0.30, step: float = 0.005) -> Curve:
    """Combined accuracy at escalation rates 0, step, ..., max_rate when the rows with the lowest rule
    statistic (top-1 score, or top-1 margin) go to the cloud. Each point's threshold sits halfway between
    the last escalated and the first kept statistic, so it escalates at most ``target_rate`` of these
    rows (ties at the boundary stay on the device). Without ``cloud_pred`` the cloud is assumed to answer
    every escalated row correctly: an upper bound. At rate 0 the combined accuracy is the device's."""
    if rule not in RULES:
        raise EscalationError("rule", f"one of {', '.join(RULES)}", _kind(rule))
    if not (0 < step <= max_rate <= 1):
        raise EscalationError("rates", "0 < step <= max_rate <= 1", f"step {step}, max_rate {max_rate}")
    s = _rows(scores)
    n = s.shape[0]
    y = _labels(labels, n, "labels")
    device_ok = s.argmax(axis=1) == y
    if cloud_pred is None:
        cloud_ok = np.ones(n, bool)
        cloud_acc = None
    else:
        cloud_ok = _labels(cloud_pred, n, "cloud predictions") == y
        cloud_acc = float(cloud_ok.mean())
    top1, margin = top1_and_margin(s)
    stat = top1 if rule == "score" else margin
    order = np.argsort(stat, kind="stable")
    st = stat[order]
    gain = np.concatenate([[0], np.cumsum(cloud_ok[order].astype(np.int64) - device_ok[order])])
    steps = math.floor(max_rate / step + 1e-9)
    targets = np.arange(steps + 1) * step
    ks = np.minimum(np.floor(targets * n + 1e-9).astype(np.int64), n)
    # thresholds in the statistic's dtype: the device compares in that dtype too
    thresholds = np.empty(len(ks), dtype=st.dtype)
    for i, k in enumerate(ks.tolist()):
        if k == 0:
            thresholds[i] = st[0]
        elif k >= n:
            thresholds[i] = np.nextafter(st[-1], np.inf)
        else:
            thresholds[i] = (st[k - 1] + st[k]) / st.dtype.type(2) if st.dtype.kind == "f" else st[k]
    counts = np.searchsorted(st, thresholds, side="left")
    device_acc = float(device_ok.mean())
    points = tuple(CurvePoint(float(targets[i]), int(c) / n, int(c), float(thresholds[i]),
                              device_acc + int(gain[c]) / n) for i, c in enumerate(counts.tolist()))
    return Curve(rule, n, device_acc, cloud_acc, cloud_pred is None, points)


def choose(curve: Curve, budget_rate: float) -> CurvePoint:
    """The most accurate point whose rate on the tuning data is <= ``budget_rate``; among equals the one
    escalating least. The rate-0 point (escalate nothing) is always eligible."""
    if not (_is_number(budget_rate) and 0 <= budget_rate <= 1):
        raise EscalationError("budget rate", "a fraction in [0, 1]", _kind(budget_rate))
    eligible = [p for p in curve.points if p.rate <= budget_rate + 1e-12]
    if not eligible:
        raise EscalationError("escalation curve", "a point at rate 0", "none")
    return min(eligible, key=lambda p: (-p.accuracy, p.rate, p.threshold))


def parse_rate(text: str | float, what: str = "rate") -> float:
    """``"5%"`` or ``"0.05"`` (or 0.05) as the fraction 0.05; ``what`` names it in errors."""
    s = str(text).strip()
    try:
        v = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise EscalationError(what, "a fraction like 0.05 or a percentage like 5%", repr(text)) from None
    if not (0 <= v <= 1):
        raise EscalationError(what, "a fraction between 0 and 1, or a percentage between 0% and 100%", repr(text))
    return v


# -- the document a bundle carries --------------------------------------------------------------------

def tuning_document(policy: EscalationPolicy, curve: Curve, chosen: CurvePoint, budget_rate: float,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``escalation tune`` writes (escalation.json): the policy, how it was chosen, the curve."""
    tuned = {"rule": curve.rule, "budget_rate": budget_rate, "rate": round(chosen.rate, 6),
             "threshold": chosen.threshold, "accuracy": round(chosen.accuracy, 6),
             "device_accuracy": round(curve.device_accuracy, 6),
             "cloud_accuracy": None if curve.cloud_accuracy is None else round(curve.cloud_accuracy, 6),
             "cloud_assumed_correct": curve.cloud_assumed_correct, "n": curve.n, **(extra or {})}
    return {"schema": ESCALATION_SCHEMA, "policy": policy.to_dict(), "tuned": tuned, "curve": curve.to_dict()}


def read_document(d: Any, origin: str = ESCALATION_FILE) -> tuple[EscalationPolicy, dict[str, Any]]:
    """Check an escalation document (or a manifest's ``escalation`` entry): its schema and its policy."""
    if not isinstance(d, dict):
        raise ConfigError("escalation document", path=origin, expected="a JSON object", got=_kind(d))
    if d.get("schema") != ESCALATION_SCHEMA:
        raise ConfigError("escalation document 'schema'", path=origin, key="schema",
                          expected=repr(ESCALATION_SCHEMA), got=_kind(d.get("schema")))
    policy = EscalationPolicy.from_dict(d.get("policy"), origin=f"{origin} policy")
    if d.get("tuned") is not None and not isinstance(d["tuned"], dict):
        raise ConfigError("escalation document 'tuned'", path=origin, key="tuned", expected="an object",
                          got=_kind(d["tuned"]))
    return policy, d


def manifest_entry(doc: dict[str, Any], origin: str = ESCALATION_FILE) -> dict[str, Any]:
    """The bundle manifest's ``escalation`` value: the file, its schema, the policy and the tuning
    summary (the curve stays in the file, which the manifest hashes)."""
    policy, _ = read_document(doc, origin)
    return {"file": ESCALATION_FILE, "schema": ESCALATION_SCHEMA, "policy": policy.to_dict(),
            "tuned": doc.get("tuned")}
