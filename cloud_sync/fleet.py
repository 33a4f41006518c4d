"""The cloud's live view of a fleet, fed with decoded protocol messages; no I/O, no clock, no threads.

Status, telemetry, records and label feedback go in through ``observe_*`` (each takes ``now_ms``, when
the cloud received the message); JSON-ready views come out (:meth:`FleetState.snapshot`,
:meth:`~FleetState.device`, :meth:`~FleetState.devices`, :meth:`~FleetState.series`). What arrives is
counted, never trusted: odd payload content is counted in ``bad_payload`` by record kind and skipped
(a field of the wrong type is dropped, the rest of its record used); nothing here raises on it.

Times. ``now_ms`` dates presence: ``last_seen_ms``, stale and offline. The device's own times
(``Telemetry.time_ms``, a record's ``created_ms``, a drift summary's ``end_ms``) date what it measured:
series points, counter deltas and alarm state. Buffered records arrive late and out of order, so series
keep their points sorted by device time.

Counters. A metric snapshot's counters (inputs, predictions, errors, low_confidence, null_outputs) are
cumulative since the agent started. The change between consecutive snapshots of one pipeline is
attributed to the snapshot's model version; a new boot, or a counter that went down, restarts from zero.
A snapshot no newer than the last one of its pipeline adds gauge points to the series but no deltas:
its counts are already inside the newer cumulative values.

Resends. Records are delivered at least once. With ``boot_id`` given to
:meth:`FleetState.observe_records` (or through :meth:`~FleetState.observe_batch`), keys already seen are
skipped. Drift summaries are also deduplicated on their window, so that the fleet's merged summary never
counts a window twice.

Drift. Every drift record's summary is merged (:func:`edge_runtime.core.drift.merge_summaries`) into one
running summary per (model, model_version), with distances recomputed when the version's reference
profile is registered (:meth:`FleetState.register_model`). A version's current fleet score is the score
of the merge of its devices' latest summaries, which is the highest of their latest scores. A device's
drift alarm is open or closed as the newest of these says: its latest summary (an alarm still open),
``drift_alarm``/``drift_cleared`` events, the ``drift_alarm`` flag of its metric snapshots. A new boot
closes its alarms (the monitor starts afresh), and so does a move to another version of the model.

Rollouts. A pipeline's snapshot may carry a ``rollout`` object, the device's place in a model rollout
(:mod:`cloud_sync.rollouts`); rows keep the newest one per pipeline (known keys only, typed), and a
snapshot without one keeps what its boot said last.
"""

from __future__ import annotations

import math
import statistics
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from edge_runtime.core import drift as core_drift
from edge_runtime.core import protocol as p

__all__ = [
    "DEFAULT_LOW_CONFIDENCE",
    "DEFAULT_SERIES_POINTS",
    "DEFAULT_STALE_AFTER_MS",
    "DEVICE_STATES",
    "RUNNING_STATES",
    "SERIES",
    "UNKNOWN_VERSION",
    "FleetState",
    "Series",
]

DEFAULT_STALE_AFTER_MS: Final = 3 * 60_000
DEFAULT_SERIES_POINTS: Final = 720
DEFAULT_LOW_CONFIDENCE: Final = 0.5
DEVICE_STATES: Final = ("online", "offline", "stale")
SERIES: Final = ("throughput_per_s", "latency_p50_ms", "latency_p99_ms", "error_rate", "cpu_percent", "rss_mb",
                 "temperature_c", "drift_score", "low_confidence_rate")
# Rollout states in which a model serves (or shadows) traffic on a device.
RUNNING_STATES: Final = ("active", "shadow")
# The version that records are attributed to when neither they nor the device say which one ran.
UNKNOWN_VERSION: Final = "unknown"

_COUNTERS: Final = ("inputs", "predictions", "errors", "low_confidence", "null_outputs")
_GAUGES: Final = ("cpu_percent", "rss_mb", "temperature_c", "uptime_s", "pending")
_DRIFT_EVENTS: Final = ("drift_alarm", "drift_cleared")
# Bounds on what is kept per device.
_MAX_EVENTS: Final = 50
_MAX_BOOTS: Final = 8           # boots whose record keys are remembered for dedupe
_MAX_RANGES: Final = 128        # key ranges per boot; the lowest are forgotten first
_MAX_DRIFT_WINDOWS: Final = 64  # drift windows remembered per model version for dedupe
_ANY_KIND: Final = "*"          # an alarm state that covers every alarm kind (a snapshot's flag)

ModelKey: TypeAlias = tuple[str, str]


# --------------------------------------------------------------------------------------------------
# Values as they arrive: JSON numbers, maybe of the wrong type.

def _num(v: object) -> float | None:
    """A finite number (not a bool), else None."""
    if (type(v) is int or type(v) is float) and math.isfinite(v):
        return float(v)
    return None


class _Fields:
    """Reads typed fields from an untrusted object; a present field of the wrong type reads as None and
    is counted in ``odd``."""

    __slots__ = ("d", "odd")

    def __init__(self, d: Mapping[str, Any]) -> None:
        self.d = d
        self.odd = 0

    def _check(self, key: str, ok: bool) -> bool:
        if not ok and self.d.get(key) is not None:
            self.odd += 1
        return ok

    def num(self, key: str) -> float | None:
        v = _num(self.d.get(key))
        self._check(key, v is not None)
        return v

    def count(self, key: str) -> int | None:
        v = self.d.get(key)
        ok = type(v) is int and v >= 0
        return v if self._check(key, ok) else None  # type: ignore[return-value]

    def text(self, key: str) -> str | None:
        v = self.d.get(key)
        if type(v) is int:  # a version sent as a number
            return str(v)
        ok = type(v) is str and 0 < len(v) <= p.MAX_TEXT_LEN
        return v if self._check(key, ok) else None  # type: ignore[return-value]

    def flag(self, key: str) -> bool | None:
        v = self.d.get(key)
        return v if self._check(key, type(v) is bool) else None  # type: ignore[return-value]

    def obj(self, key: str) -> dict[str, Any] | None:
        v = self.d.get(key)
        return v if self._check(key, type(v) is dict) else None  # type: ignore[return-value]

    def counts(self, key: str) -> dict[str, int] | None:
        """An object of non-negative int counts; odd entries are dropped."""
        o = self.obj(key)
        if o is None:
            return None
        out = {k: v for k, v in o.items() if type(k) is str and type(v) is int and v >= 0}
        if len(out) != len(o):
            self.odd += 1
        return out


_ROLLOUT_TEXT: Final = ("rollout_id", "state", "role")
_SHADOW_NUMBERS: Final = ("agreement_rate", "delta_mean", "delta_std", "latency_p50_ms", "latency_p99_ms", "error_rate")
_MAX_REASON: Final = 256


def _rollout_report(f: _Fields) -> dict[str, Any] | None:
    """A pipeline's ``rollout`` object as the device reported it (see :mod:`cloud_sync.rollouts`), with
    only the known keys of the right types; None when the device reports none."""
    o = f.obj("rollout")
    if o is None:
        return None
    r = _Fields(o)
    out: dict[str, Any] = {}
    for k in _ROLLOUT_TEXT:  # names, not numbers
        v = o.get(k)
        out[k] = v if r._check(k, type(v) is str and 0 < len(v) <= p.MAX_TEXT_LEN) else None
    out["candidate_version"] = r.text("candidate_version")
    out["since_ms"] = r.count("since_ms")
    out["samples"] = r.count("samples")
    reason = o.get("reason")
    out["reason"] = reason[:_MAX_REASON] if type(reason) is str else None
    shadow = r.obj("shadow")
    if shadow is not None:
        s = _Fields(shadow)
        out["shadow"] = {"n": s.count("n"), "errors": s.count("errors"), **{k: s.num(k) for k in _SHADOW_NUMBERS}}
        r.odd += s.odd
    else:
        out["shadow"] = None
    f.odd += r.odd
    return out


def _copy_rollout(r: dict[str, Any] | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {**r, "shadow": None if r.get("shadow") is None else dict(r["shadow"])}


def _rate(part: int | None, whole: int | None) -> float | None:
    """``part / whole`` capped at 1; None when nothing was counted."""
    if part is None or whole is None:
        return None
    if whole > 0:
        return min(1.0, part / whole)
    return 1.0 if part > 0 else None


def _round(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(v, digits)


# --------------------------------------------------------------------------------------------------
# Bounded pieces.

class Series:
    """A bounded time series of ``(time_ms, value)`` points, sorted by time; when full, the oldest point
    goes. A point at a time already present replaces it (the same snapshot seen twice)."""

    __slots__ = ("_t", "_v", "maxlen")

    def __init__(self, maxlen: int = DEFAULT_SERIES_POINTS) -> None:
        if maxlen < 1:
            raise ValueError(f"series length must be >= 1, got {maxlen}")
        self.maxlen = maxlen
        self._t: list[int] = []
        self._v: list[float] = []

    def add(self, time_ms: int, value: float) -> None:
        t, v = self._t, self._v
        if not t or time_ms > t[-1]:
            t.append(time_ms)
            v.append(value)
        else:
            i = bisect_right(t, time_ms)
            if i and t[i - 1] == time_ms:
                v[i - 1] = value
                return
            if i == 0 and len(t) >= self.maxlen:
                return  # older than everything kept, and no room
            t.insert(i, time_ms)
            v.insert(i, value)
        if len(t) > self.maxlen:
            del t[0], v[0]

    def points(self) -> list[tuple[int, float]]:
        return list(zip(self._t, self._v, strict=True))

    def last(self) -> float | None:
        return self._v[-1] if self._v else None

    def __len__(self) -> int:
        return len(self._t)


class _SeenKeys:
    """Record keys ``(boot_id, seq)`` already observed, as sorted disjoint ranges per boot (bounded)."""

    __slots__ = ("_boots",)

    def __init__(self) -> None:
        self._boots: dict[str, list[list[int]]] = {}

    def add(self, boot_id: str, seq: int) -> bool:
        """Remember ``seq``; False when it was already known."""
        ranges = self._boots.get(boot_id)
        if ranges is None:
            if len(self._boots) >= _MAX_BOOTS:
                del self._boots[next(iter(self._boots))]
            ranges = self._boots[boot_id] = []
        i = bisect_right(ranges, seq, key=lambda r: r[0]) - 1
        if i >= 0 and ranges[i][1] >= seq:
            return False
        joins_left = i >= 0 and ranges[i][1] == seq - 1
        joins_right = i + 1 < len(ranges) and ranges[i + 1][0] == seq + 1
        if joins_left and joins_right:
            ranges[i][1] = ranges[i + 1][1]
            del ranges[i + 1]
        elif joins_left:
            ranges[i][1] = seq
        elif joins_right:
            ranges[i + 1][0] = seq
        else:
            ranges.insert(i + 1, [seq, seq])
            if len(ranges) > _MAX_RANGES:
                del ranges[0]
        return True


# --------------------------------------------------------------------------------------------------
# Per-device state.

@dataclass(eq=False)
class _Pipe:
    """The latest in-order metric snapshot of one pipeline (named after its model)."""

    boot_id: str | None
    time_ms: int
    model_version: str | None
    counters: dict[str, int]
    deltas: dict[str, int]
    throughput: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    window_s: float | None = None
    accuracy: float | None = None
    labelled: int | None = None
    drift_alarm: bool | None = None
    labels: dict[str, int] | None = None
    error_kinds: dict[str, int] | None = None
    rollout: dict[str, Any] | None = None

    @property
    def error_rate(self) -> float | None:
        return _rate(self.deltas.get("errors"), self.deltas.get("inputs"))

    @property
    def low_confidence_rate(self) -> float | None:
        return _rate(self.deltas.get("low_confidence"), self.deltas.get("predictions"))

    def row(self) -> dict[str, Any]:
        return {"model_version": self.model_version, "time_ms": self.time_ms, "boot_id": self.boot_id,
                "throughput_per_s": self.throughput, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
                "error_rate": _round(self.error_rate), "low_confidence_rate": _round(self.low_confidence_rate),
                "accuracy": self.accuracy, "labelled": self.labelled, "drift_alarm": self.drift_alarm,
                "window_s": self.window_s, "counters": dict(self.counters),
                "errors": dict(self.error_kinds or {}), "labels": dict(self.labels or {}),
                "rollout": _copy_rollout(self.rollout)}


@dataclass(eq=False)
class _DeviceDrift:
    """A device's latest drift summary of one model version."""

    score: float
    start_ms: int
    end_ms: int
    n: int
    windows: int
    summaries: int = 1
    current: bool = True     # False once the device moved to another version of the model


@dataclass(eq=False)
class _Device:
    id: str
    first_seen_ms: int
    last_seen_ms: int | None = None
    online: bool | None = None             # None: no status yet
    boot_id: str | None = None
    boot_time_ms: int | None = None        # newest device time seen from the current boot
    agent_version: str = ""
    models: tuple[p.ModelStatus, ...] = ()
    tags: tuple[str, ...] = ()
    conn: int = 0  # the connection number of the boot's latest online status
    status_ms: int | None = None           # when the last status was received
    status_time_ms: int | None = None      # its own time_ms
    offline_since_ms: int | None = None
    restarts: int = 0
    gauges: dict[str, float | None] = field(default_factory=dict)
    gauges_time_ms: int | None = None
    telemetry_ms: int | None = None
    pipes: dict[str, _Pipe] = field(default_factory=dict)
    totals: dict[ModelKey, dict[str, int]] = field(default_factory=dict)
    preds: dict[ModelKey, list[int]] = field(default_factory=dict)       # [records, scored, low confidence]
    drift: dict[ModelKey, _DeviceDrift] = field(default_factory=dict)
    drift_windows: dict[ModelKey, deque[tuple[int, int]]] = field(default_factory=dict)
    alarms: dict[ModelKey, dict[str, tuple[bool, int]]] = field(default_factory=dict)  # kind -> (open, time)
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=_MAX_EVENTS))
    event_counts: dict[str, int] = field(default_factory=dict)
    bad_payload: dict[str, int] = field(default_factory=dict)
    seen: _SeenKeys = field(default_factory=_SeenKeys)
    series: dict[str, Series] = field(default_factory=dict)

    def alarm_open(self, key: ModelKey) -> bool:
        return any(o for o, _ in self.alarms.get(key, {}).values())


@dataclass(eq=False)
class _FleetDrift:
    merged: dict[str, Any] | None = None
    summaries: int = 0
    rejected: int = 0


def _bump(d: dict[str, int], key: str, n: int = 1) -> None:
    d[key] = d.get(key, 0) + n


# --------------------------------------------------------------------------------------------------

class FleetState:
    """The fleet as the cloud sees it. Feed it every decoded message once (resent records are skipped
    when their boot id is given); read it with :meth:`snapshot`, :meth:`devices`, :meth:`device`,
    :meth:`series`.

    ``stale_after_ms``: a device not heard from for longer is ``"stale"``. ``series_points``: points kept
    per device series. ``low_confidence``: a prediction record whose score ``"p"`` is below counts as low
    confidence."""

    def __init__(self, *, stale_after_ms: int = DEFAULT_STALE_AFTER_MS, series_points: int = DEFAULT_SERIES_POINTS,
                 low_confidence: float = DEFAULT_LOW_CONFIDENCE) -> None:
        if stale_after_ms <= 0:
            raise ValueError(f"stale_after_ms must be > 0, got {stale_after_ms}")
        if series_points < 1:
            raise ValueError(f"series_points must be >= 1, got {series_points}")
        if not 0.0 <= low_confidence <= 1.0:
            raise ValueError(f"low_confidence must be in [0, 1], got {low_confidence}")
        self.stale_after_ms = stale_after_ms
        self.series_points = series_points
        self.low_confidence = low_confidence
        self._devices: dict[str, _Device] = {}
        self._drift: dict[ModelKey, _FleetDrift] = {}
        self._labels: dict[ModelKey, dict[str, list[int]]] = {}   # device -> [n, correct]
        self._references: dict[ModelKey, core_drift.Reference] = {}
        self._reference_accuracy: dict[ModelKey, float] = {}
        self._counters: dict[str, int] = {}
        self.bad_payload: dict[str, int] = {}
        self.unknown_kinds: dict[str, int] = {}

    # -- model registry ------------------------------------------------------------------------------

    def register_model(self, model: str, version: str, *,
                       reference: core_drift.Reference | dict[str, Any] | None = None,
                       reference_accuracy: float | None = None) -> None:
        """What the cloud knows of a model version from its bundle: the reference profile (fleet drift
        distances are then recomputed on every merge) and the accuracy measured at build (the baseline of
        accuracy drops)."""
        key = (model, version)
        if reference is not None:
            ref = core_drift.load_reference(reference) if isinstance(reference, dict) else reference
            self._references[key] = ref
            fd = self._drift.get(key)
            if fd is not None and fd.merged is not None:
                try:
                    fd.merged = core_drift.DriftSummary.from_dict(fd.merged).with_distances(ref).to_dict()
                except ValueError:
                    fd.rejected += 1
        if reference_accuracy is not None:
            if not 0.0 <= reference_accuracy <= 1.0:
                raise ValueError(f"reference_accuracy must be in [0, 1], got {reference_accuracy}")
            self._reference_accuracy[key] = float(reference_accuracy)

    def reference_accuracy(self, model: str, version: str) -> float | None:
        return self._reference_accuracy.get((model, version))

    # -- feeding -------------------------------------------------------------------------------------

    def observe_status(self, msg: p.Status, now_ms: int) -> None:
        """A retained status or the Last Will (``online=False``). A will from an older boot that arrives
        after the device came back (a newer boot already seen) is ignored."""
        _bump(self._counters, "status")
        dev = self._device_for(msg.device_id, now_ms)
        if not msg.online:
            if (dev.boot_id is not None and msg.boot_id != dev.boot_id and dev.boot_time_ms is not None
                    and msg.time_ms < dev.boot_time_ms):
                _bump(self._counters, "status_ignored")
                return
            if msg.boot_id == dev.boot_id and msg.conn and dev.conn and msg.conn < dev.conn:
                # The will of an earlier connection of this boot, delivered after the device reconnected.
                _bump(self._counters, "status_ignored")
                return
            if dev.online is not False:
                dev.offline_since_ms = now_ms
            dev.online = False
            dev.status_ms = now_ms
            dev.status_time_ms = msg.time_ms
            if dev.last_seen_ms is None:
                dev.last_seen_ms = now_ms
            return
        self._boot(dev, msg.boot_id, msg.time_ms)
        dev.online = True
        dev.offline_since_ms = None
        dev.agent_version = msg.agent_version
        dev.models = msg.models
        dev.tags = msg.tags
        dev.conn = msg.conn
        dev.status_ms = now_ms
        dev.status_time_ms = msg.time_ms
        self._seen(dev, now_ms)
        self._retire(dev)

    def observe_telemetry(self, msg: p.Telemetry, now_ms: int) -> None:
        """A live snapshot: device gauges and every pipeline's metrics (see the module docstring)."""
        _bump(self._counters, "telemetry")
        dev = self._device_for(msg.device_id, now_ms)
        self._seen(dev, now_ms)
        dev.telemetry_ms = now_ms
        self._boot(dev, msg.boot_id, msg.time_ms)
        f = _Fields(msg.metrics)
        self._gauges(dev, msg.time_ms, f)
        pipes = f.obj("pipelines")
        updated = False
        if pipes is not None:
            for name, pd in pipes.items():
                if not name or type(pd) is not dict:
                    f.odd += 1
                    continue
                pf = _Fields(pd)
                updated |= self._pipe(dev, name, pf, msg.time_ms, msg.boot_id)
                f.odd += pf.odd
            if updated:
                # A telemetry snapshot lists every pipeline: the others have gone.
                for name in [n for n, pipe in dev.pipes.items() if n not in pipes and pipe.time_ms < msg.time_ms]:
                    del dev.pipes[name]
                self._aggregate(dev, msg.time_ms)
        if f.odd:
            self._bad(dev, "telemetry")

    def observe_batch(self, batch: p.RecordBatch, now_ms: int) -> None:
        """:meth:`observe_records` for one decoded batch, deduplicated on its keys."""
        self.observe_records(batch.device_id, batch.records, now_ms, boot_id=batch.boot_id)

    def observe_records(self, device_id: str, records: Iterable[p.Record | Any], now_ms: int, *,
                        boot_id: str | None = None) -> None:
        """Records of one device: ``"m"`` metric snapshots, ``"d"`` drift summaries, ``"e"`` events,
        ``"p"`` predictions. Other kinds are counted in ``unknown_kinds``; odd content in ``bad_payload``.
        With ``boot_id`` (the batch's), records whose key was seen before are skipped."""
        _bump(self._counters, "records_messages")
        dev = self._device_for(device_id, now_ms)
        self._seen(dev, now_ms)
        for r in records:
            kind = "?"
            try:
                seq, kind, created_ms, payload = r
                if type(kind) is not str:
                    kind = "?"
                    raise TypeError("kind")
                if type(created_ms) is not int or type(payload) is not dict or type(seq) is not int:
                    raise TypeError("record")
                if boot_id is not None and not dev.seen.add(boot_id, seq):
                    _bump(self._counters, "duplicates")
                    continue
                _bump(self._counters, "records")
                self._record(dev, kind, created_ms, payload, boot_id or dev.boot_id)
            except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, p.ProtocolError):
                self._bad(dev, kind)

    def observe_label(self, device_id: str, model: str, version: str, correct: bool, now_ms: int) -> None:
        """One label from feedback, already compared with the prediction it names."""
        del now_ms  # labels date nothing on the device
        if type(correct) is not bool:
            raise TypeError(f"correct must be a bool, got {type(correct).__name__}")
        c = self._labels.setdefault((model, version), {}).setdefault(device_id, [0, 0])
        c[0] += 1
        c[1] += int(correct)

    # -- records -------------------------------------------------------------------------------------

    def _record(self, dev: _Device, kind: str, created_ms: int, payload: dict[str, Any], boot_id: str | None) -> None:
        if kind == p.METRIC:
            f = _Fields(payload)
            name = f.text("pipeline")
            if name is None:
                raise ValueError("pipeline")
            self._gauges(dev, created_ms, f)
            if self._pipe(dev, name, f, created_ms, boot_id):
                self._aggregate(dev, created_ms)
            if f.odd:
                self._bad(dev, kind)
        elif kind == p.DRIFT:
            self._drift_record(dev, created_ms, payload)
        elif kind == p.EVENT:
            self._event(dev, created_ms, payload)
        elif kind == p.PREDICTION:
            self._prediction(dev, payload)
        else:
            _bump(self.unknown_kinds, kind[:16])

    def _prediction(self, dev: _Device, payload: dict[str, Any]) -> None:
        f = _Fields(payload)
        model = f.text("m")
        if model is None:
            raise ValueError("m")
        version = f.text("mv") or self._current_version(dev, model)
        score = f.num("p")
        c = dev.preds.setdefault((model, version), [0, 0, 0])
        c[0] += 1
        if score is not None:
            c[1] += 1
            c[2] += int(score < self.low_confidence)
        if f.odd:
            self._bad(dev, p.PREDICTION)

    def _event(self, dev: _Device, created_ms: int, payload: dict[str, Any]) -> None:
        ev = p.Event.from_payload(payload)
        dev.events.append({"time_ms": created_ms, **ev.to_payload()})
        _bump(dev.event_counts, ev.name)
        if ev.name in _DRIFT_EVENTS:
            detail = _Fields(ev.detail or {})
            model = ev.ref or detail.text("model")
            if not model:
                raise ValueError("drift event names no model")
            version = detail.text("model_version") or self._current_version(dev, model)
            kind = detail.text("kind") or "data"
            self._alarm(dev, (model, version), {kind: ev.name == "drift_alarm"}, created_ms)

    def _drift_record(self, dev: _Device, created_ms: int, payload: dict[str, Any]) -> None:
        del created_ms  # the summary's own window dates it
        env = p.DriftSummary.from_payload(payload)
        summary = core_drift.DriftSummary.from_dict(env.summary)
        key = (env.model, env.model_version)
        windows = dev.drift_windows.setdefault(key, deque(maxlen=_MAX_DRIFT_WINDOWS))
        if (env.start_ms, env.end_ms) in windows:
            _bump(self._counters, "duplicates")
            return
        fd = self._drift.setdefault(key, _FleetDrift())
        ref = self._references.get(key)
        try:
            if fd.merged is None:
                fd.merged = summary.with_distances(ref).to_dict()
            else:
                fd.merged = core_drift.merge_summaries(fd.merged, env.summary, ref)
        except ValueError:
            fd.rejected += 1   # another reference, features or classes than the version's merged summary
            raise
        fd.summaries += 1
        windows.append((env.start_ms, env.end_ms))
        cur = dev.drift.get(key)
        if cur is None or env.end_ms >= cur.end_ms:
            dev.drift[key] = _DeviceDrift(summary.score, env.start_ms, env.end_ms, summary.n, summary.windows,
                                          1 if cur is None else cur.summaries + 1, self._runs(dev, key))
        else:
            cur.summaries += 1
        self._point(dev, "drift_score", env.end_ms, summary.score)
        # The summary tells the state at its end: these kinds open, every other one closed.
        open_kinds = {a.kind for a in summary.alarms if a.is_open}
        states = dict.fromkeys(dev.alarms.get(key, {}), False) | {_ANY_KIND: False} | dict.fromkeys(open_kinds, True)
        self._alarm(dev, key, states, env.end_ms)

    # -- device bookkeeping --------------------------------------------------------------------------

    def _device_for(self, device_id: str, now_ms: int) -> _Device:
        dev = self._devices.get(device_id)
        if dev is None:
            p.validate_device_id(device_id)
            dev = self._devices[device_id] = _Device(device_id, now_ms)
        return dev

    @staticmethod
    def _seen(dev: _Device, now_ms: int) -> None:
        if dev.last_seen_ms is None or now_ms > dev.last_seen_ms:
            dev.last_seen_ms = now_ms

    def _bad(self, dev: _Device, kind: str) -> None:
        kind = kind[:16]
        _bump(self.bad_payload, kind)
        _bump(dev.bad_payload, kind)

    def _boot(self, dev: _Device, boot_id: str, time_ms: int) -> None:
        """Follow the device's boot: a new one restarts its counters and closes its alarms."""
        if dev.boot_id == boot_id or dev.boot_id is None:
            dev.boot_id = boot_id
            dev.boot_time_ms = time_ms if dev.boot_time_ms is None else max(dev.boot_time_ms, time_ms)
            return
        if dev.boot_time_ms is not None and time_ms < dev.boot_time_ms:
            return  # a late message of an earlier boot
        dev.boot_id = boot_id
        dev.boot_time_ms = time_ms
        dev.restarts += 1
        dev.pipes.clear()
        dev.alarms.clear()

    def _running(self, dev: _Device) -> set[ModelKey]:
        """Model versions the device serves or shadows: its status, corrected by its fresher snapshots."""
        from_pipes = {(name, pipe.model_version) for name, pipe in dev.pipes.items() if pipe.model_version}
        piped = {name for name, _ in from_pipes}
        from_status = {(m.name, m.version) for m in dev.models if m.state in RUNNING_STATES
                       and (m.name not in piped or m.state != "active")}
        return from_pipes | from_status

    def _runs(self, dev: _Device, key: ModelKey) -> bool:
        running = self._running(dev)
        return key in running or not any(m == key[0] for m, _ in running)

    def _retire(self, dev: _Device) -> None:
        """Close alarms and mark drift scores as past for versions of a model the device moved away from."""
        running = self._running(dev)
        models = {m for m, _ in running}
        for key in list(dev.alarms):
            if key[0] in models and key not in running:
                del dev.alarms[key]
        for key, d in dev.drift.items():
            d.current = key in running or key[0] not in models

    def _current_version(self, dev: _Device, model: str) -> str:
        pipe = dev.pipes.get(model)
        if pipe is not None and pipe.model_version:
            return pipe.model_version
        listed = [m for m in dev.models if m.name == model]
        for m in listed:
            if m.state == "active":
                return m.version
        if listed:
            return listed[0].version
        latest = max(((d.end_ms, key[1]) for key, d in dev.drift.items() if key[0] == model), default=None)
        return latest[1] if latest else UNKNOWN_VERSION

    def _alarm(self, dev: _Device, key: ModelKey, states: Mapping[str, bool], time_ms: int) -> None:
        kinds = dev.alarms.setdefault(key, {})
        for kind, is_open in states.items():
            before = kinds.get(kind)
            if before is None or time_ms >= before[1]:
                kinds[kind] = (is_open, time_ms)

    def _point(self, dev: _Device, name: str, time_ms: int, value: float | None) -> None:
        if value is None:
            return
        s = dev.series.get(name)
        if s is None:
            s = dev.series[name] = Series(self.series_points)
        s.add(time_ms, value)

    def _gauges(self, dev: _Device, time_ms: int, f: _Fields) -> None:
        values = {k: f.num(k) for k in _GAUGES}
        for k in ("cpu_percent", "rss_mb", "temperature_c"):
            self._point(dev, k, time_ms, values[k])
        if dev.gauges_time_ms is None or time_ms >= dev.gauges_time_ms:
            dev.gauges_time_ms = time_ms
            # A null temperature means no sensor; a missing key means nothing new.
            dev.gauges.update({k: v for k, v in values.items() if v is not None or k in f.d})

    def _pipe(self, dev: _Device, name: str, f: _Fields, time_ms: int, boot_id: str | None) -> bool:
        """One pipeline's snapshot; True when it is the newest of its pipeline (deltas were taken)."""
        lat = _Fields(f.obj("latency_us") or {})
        p50, p99 = lat.num("p50"), lat.num("p99")
        f.odd += lat.odd
        p50_ms = None if p50 is None else p50 / 1000.0
        p99_ms = None if p99 is None else p99 / 1000.0
        throughput = f.num("throughput_per_s")
        prev = dev.pipes.get(name)
        if prev is not None and time_ms <= prev.time_ms:
            # Late: its counts are inside the newer snapshot. Its gauges still describe its time, and
            # stand for the device's when this is its only pipeline.
            if len(dev.pipes) == 1:
                self._point(dev, "throughput_per_s", time_ms, throughput)
                self._point(dev, "latency_p50_ms", time_ms, p50_ms)
                self._point(dev, "latency_p99_ms", time_ms, p99_ms)
            return False
        error_kinds = f.counts("errors")
        current: dict[str, int | None] = {k: f.count(k) for k in _COUNTERS if k != "errors"}
        current["errors"] = None if error_kinds is None else sum(error_kinds.values())
        same_boot = prev is not None and prev.boot_id == boot_id
        counters = dict(prev.counters) if same_boot and prev is not None else {}
        deltas: dict[str, int] = {}
        for k, cur in current.items():
            if cur is None:
                continue
            before = counters.get(k)
            deltas[k] = cur - before if before is not None and cur >= before else cur
            counters[k] = cur
        version = f.text("model_version") or (prev.model_version if prev is not None else None)
        if version is None:
            version = self._current_version(dev, name)
        totals = dev.totals.setdefault((name, version), dict.fromkeys(_COUNTERS, 0))
        for k, d in deltas.items():
            totals[k] += d
        if same_boot and prev is not None and not any(deltas.get(k) for k in ("inputs", "predictions", "errors")):
            # Two snapshots close together (a metric record and telemetry): an empty window says
            # nothing about rates; the last window's stand.
            deltas = prev.deltas
        drift_alarm = f.flag("drift_alarm")
        # A snapshot that does not say keeps what the boot said last.
        kept = prev.rollout if same_boot and prev is not None else None
        rollout = _rollout_report(f) if "rollout" in f.d else kept
        dev.pipes[name] = _Pipe(boot_id, time_ms, version, counters, deltas, throughput, p50_ms, p99_ms,
                                f.num("window_s"), f.num("accuracy"), f.count("labelled"), drift_alarm,
                                f.counts("labels"), error_kinds, rollout)
        if prev is None or prev.model_version != version:
            self._retire(dev)
        if drift_alarm is not None:
            states = dict.fromkeys(dev.alarms.get((name, version), {}), False) if not drift_alarm else {}
            self._alarm(dev, (name, version), {**states, _ANY_KIND: drift_alarm}, time_ms)
        return True

    def _aggregate(self, dev: _Device, time_ms: int) -> None:
        """A device-level point of every pipeline series from the pipelines' latest snapshots."""
        agg = self._device_values(dev)
        for series, key in (("throughput_per_s", "throughput_per_s"), ("latency_p50_ms", "p50_ms"),
                            ("latency_p99_ms", "p99_ms"), ("error_rate", "error_rate"),
                            ("low_confidence_rate", "low_confidence_rate")):
            self._point(dev, series, time_ms, agg[key])

    @staticmethod
    def _device_values(dev: _Device, model: str | None = None) -> dict[str, float | None]:
        pipes = [pipe for name, pipe in dev.pipes.items() if model is None or name == model]

        def total(key: str) -> int | None:
            vals = [pipe.deltas[key] for pipe in pipes if key in pipe.deltas]
            return sum(vals) if vals else None

        thr = [pipe.throughput for pipe in pipes if pipe.throughput is not None]
        p50 = [pipe.p50_ms for pipe in pipes if pipe.p50_ms is not None]
        p99 = [pipe.p99_ms for pipe in pipes if pipe.p99_ms is not None]
        return {"throughput_per_s": sum(thr) if thr else None, "p50_ms": max(p50, default=None),
                "p99_ms": max(p99, default=None), "error_rate": _rate(total("errors"), total("inputs")),
                "low_confidence_rate": _rate(total("low_confidence"), total("predictions"))}

    # -- reading -------------------------------------------------------------------------------------

    def state(self, device_id: str, now_ms: int) -> str | None:
        """``"online"``, ``"offline"`` (its status says so) or ``"stale"`` (not heard from for longer than
        ``stale_after_ms``); None for a device never seen."""
        dev = self._devices.get(device_id)
        return None if dev is None else self._state(dev, now_ms)

    def _state(self, dev: _Device, now_ms: int) -> str:
        if dev.online is False:
            return "offline"
        if dev.last_seen_ms is None or now_ms - dev.last_seen_ms > self.stale_after_ms:
            return "stale"
        return "online"

    def device_ids(self) -> list[str]:
        return sorted(self._devices)

    def devices(self, now_ms: int) -> list[dict[str, Any]]:
        """One summary row per device, sorted by id."""
        return [self._row(self._devices[d], now_ms) for d in sorted(self._devices)]

    def _row(self, dev: _Device, now_ms: int) -> dict[str, Any]:
        state = self._state(dev, now_ms)
        values = self._device_values(dev)
        if values["low_confidence_rate"] is None:
            scored = sum(c[1] for c in dev.preds.values())
            values["low_confidence_rate"] = _rate(sum(c[2] for c in dev.preds.values()), scored) if scored else None
        current = [(d.end_ms, d.score) for d in dev.drift.values() if d.current]
        alarms = sorted(f"{m}@{v}" for (m, v) in dev.alarms if dev.alarm_open((m, v)))
        offline_min = 0.0
        if state != "online" and dev.last_seen_ms is not None:
            offline_min = round(max(0, now_ms - dev.last_seen_ms) / 60_000.0, 3)
        return {
            "id": dev.id, "state": state, "online": dev.online, "last_seen_ms": dev.last_seen_ms,
            "offline_minutes": offline_min, "boot_id": dev.boot_id, "agent_version": dev.agent_version,
            "tags": list(dev.tags),
            "models": [{"name": m.name, "version": m.version, "state": m.state} for m in dev.models],
            "running": [{"model": m, "version": v} for m, v in sorted(self._running(dev))],
            "throughput_per_s": _round(values["throughput_per_s"]), "p50_ms": _round(values["p50_ms"]),
            "p99_ms": _round(values["p99_ms"]), "error_rate": _round(values["error_rate"]),
            "errors": sum(t["errors"] for t in dev.totals.values()),
            "low_confidence_rate": _round(values["low_confidence_rate"]),
            "cpu_percent": dev.gauges.get("cpu_percent"), "rss_mb": dev.gauges.get("rss_mb"),
            "temperature_c": dev.gauges.get("temperature_c"),
            "drift_score": max(current)[1] if current else None, "alarm": bool(alarms), "alarms": alarms,
            "pipelines": {name: pipe.row() for name, pipe in sorted(dev.pipes.items())},
        }

    def device(self, device_id: str, now_ms: int) -> dict[str, Any] | None:
        """Everything known about one device, its series included; None for a device never seen."""
        dev = self._devices.get(device_id)
        if dev is None:
            return None
        row = self._row(dev, now_ms)
        return {
            **row, "first_seen_ms": dev.first_seen_ms, "status_ms": dev.status_ms,
            "status_time_ms": dev.status_time_ms, "offline_since_ms": dev.offline_since_ms, "restarts": dev.restarts,
            "telemetry_ms": dev.telemetry_ms, "gauges": dict(dev.gauges), "gauges_time_ms": dev.gauges_time_ms,
            "versions": self._versions(dev), "events": list(dev.events), "event_counts": dict(dev.event_counts),
            "bad_payload": dict(dev.bad_payload),
            "series": {name: [[t, v] for t, v in s.points()] for name, s in sorted(dev.series.items())},
        }

    def device_versions(self, device_id: str) -> list[dict[str, Any]]:
        """:meth:`device`'s ``versions`` alone (counts, labels, drift per model version), without
        building the rest; empty for a device never seen."""
        dev = self._devices.get(device_id)
        return [] if dev is None else self._versions(dev)

    def device_events(self, device_id: str) -> list[dict[str, Any]]:
        """:meth:`device`'s ``events`` alone (the latest, oldest first); empty for a device never seen."""
        dev = self._devices.get(device_id)
        return [] if dev is None else list(dev.events)

    def _versions(self, dev: _Device) -> list[dict[str, Any]]:
        device_id = dev.id
        labelled = {k for k, v in self._labels.items() if device_id in v}
        keys = set(dev.totals) | set(dev.preds) | set(dev.drift) | labelled
        per_version = []
        for m, v in sorted(keys):
            preds = dev.preds.get((m, v), [0, 0, 0])
            labels = self._labels.get((m, v), {}).get(device_id, [0, 0])
            d = dev.drift.get((m, v))
            per_version.append({
                "model": m, "version": v, **dev.totals.get((m, v), dict.fromkeys(_COUNTERS, 0)),
                "prediction_records": preds[0], "scored_records": preds[1], "low_confidence_records": preds[2],
                "labels": {"n": labels[0], "correct": labels[1],
                           "accuracy": _round(labels[1] / labels[0]) if labels[0] else None},
                "drift": None if d is None else {"score": d.score, "start_ms": d.start_ms, "end_ms": d.end_ms,
                                                 "n": d.n, "windows": d.windows, "summaries": d.summaries,
                                                 "current": d.current},
                "alarm": dev.alarm_open((m, v)),
            })
        return per_version

    def series(self, device_id: str, name: str) -> list[tuple[int, float]]:
        """The points of one device series (one of :data:`SERIES`), oldest first."""
        if name not in SERIES:
            raise ValueError(f"unknown series {name!r}, expected one of {SERIES}")
        dev = self._devices.get(device_id)
        s = None if dev is None else dev.series.get(name)
        return [] if s is None else s.points()

    def models(self, now_ms: int) -> list[dict[str, Any]]:
        """KPIs per (model, version), sorted; p99 and reported accuracy over devices heard from recently."""
        keys: set[ModelKey] = set(self._labels) | set(self._drift) | set(self._reference_accuracy)
        running: dict[str, set[ModelKey]] = {}
        for dev in self._devices.values():
            running[dev.id] = self._running(dev)
            keys |= running[dev.id] | set(dev.totals) | set(dev.preds)
        out = []
        for key in sorted(keys):
            model, version = key
            devs = [d for d in self._devices.values() if key in running[d.id]]
            fresh = [d for d in devs if self._state(d, now_ms) == "online"]
            totals = dict.fromkeys(_COUNTERS, 0)
            preds = [0, 0, 0]
            for d in self._devices.values():
                for k, v in d.totals.get(key, {}).items():
                    totals[k] += v
                for i, v in enumerate(d.preds.get(key, ())):
                    preds[i] += v
            p99s = sorted(pipe.p99_ms for d in fresh if (pipe := d.pipes.get(model)) is not None
                          and pipe.model_version == version and pipe.p99_ms is not None)
            reported = [(pipe.accuracy, pipe.labelled) for d in fresh if (pipe := d.pipes.get(model)) is not None
                        and pipe.model_version == version and pipe.accuracy is not None and pipe.labelled]
            n_reported = sum(n for _, n in reported)
            labels = self._labels.get(key, {})
            n_labels = sum(c[0] for c in labels.values())
            correct = sum(c[1] for c in labels.values())
            low_rate = _rate(preds[2], preds[1]) if preds[1] else _rate(totals["low_confidence"], totals["predictions"])
            out.append({
                "model": model, "version": version, "devices": len(devs), "devices_online": len(fresh),
                **totals, "error_rate": _round(_rate(totals["errors"], totals["inputs"])),
                "prediction_records": preds[0], "low_confidence_records": preds[2],
                "low_confidence_rate": _round(low_rate),
                "p99_ms": {"worst": _round(p99s[-1]) if p99s else None,
                           "median": _round(statistics.median(p99s)) if p99s else None, "devices": len(p99s)},
                "accuracy": {"n": n_labels, "accuracy": _round(correct / n_labels) if n_labels else None},
                "reference_accuracy": self._reference_accuracy.get(key),
                "reported_accuracy": _round(sum(a * n for a, n in reported) / n_reported) if n_reported else None,
                "reported_labels": n_reported,
                "drift_alarms": len(self._alarm_devices(key)),
                "drift_score": self._fleet_score(key),
            })
        return out

    def _alarm_devices(self, key: ModelKey) -> list[str]:
        return sorted(d.id for d in self._devices.values() if d.alarm_open(key))

    def _fleet_score(self, key: ModelKey) -> float | None:
        scores = [d.drift[key].score for d in self._devices.values() if key in d.drift and d.drift[key].current]
        return max(scores) if scores else None

    def drift(self, now_ms: int) -> list[dict[str, Any]]:
        """Fleet drift per (model, version) with any drift information, sorted."""
        del now_ms  # drift state is dated by the devices' windows
        keys = set(self._drift)
        for dev in self._devices.values():
            keys |= {k for k in dev.alarms if dev.alarm_open(k)}
        out = []
        for key in sorted(keys):
            fd = self._drift.get(key, _FleetDrift())
            scores = {d.id: d.drift[key].score for d in self._devices.values()
                      if key in d.drift and d.drift[key].current}
            out.append({"model": key[0], "version": key[1], "devices": len(scores),
                        "score": max(scores.values()) if scores else None,
                        "device_scores": dict(sorted(scores.items())),
                        "alarm_devices": self._alarm_devices(key), "summaries": fd.summaries,
                        "rejected": fd.rejected, "merged": _digest(fd.merged)})
        return out

    def fleet_drift(self, model: str, version: str) -> dict[str, Any] | None:
        """The running merged drift summary of one model version (a ``DriftSummary.to_dict()``)."""
        fd = self._drift.get((model, version))
        return None if fd is None or fd.merged is None else dict(fd.merged)

    def counters(self) -> dict[str, Any]:
        return {**self._counters, "bad_payload": dict(self.bad_payload), "unknown_kinds": dict(self.unknown_kinds)}

    def snapshot(self, now_ms: int) -> dict[str, Any]:
        """The fleet at ``now_ms``, JSON-ready: device counts by state, KPIs per model version, drift."""
        counts = dict.fromkeys(DEVICE_STATES, 0)
        for dev in self._devices.values():
            counts[self._state(dev, now_ms)] += 1
        return {"time_ms": now_ms, "devices": {**counts, "total": len(self._devices)}, "models": self.models(now_ms),
                "drift": self.drift(now_ms), "counters": self.counters()}


def _digest(merged: dict[str, Any] | None) -> dict[str, Any] | None:
    """The headline of a merged summary: what a dashboard row shows."""
    if merged is None:
        return None
    out = {k: merged.get(k) for k in ("n", "windows", "start", "end", "score", "top", "cusum")}
    dist = merged.get("distances")
    if dist:
        out["psi_max"] = max(dist.get("psi") or [0.0])
        out["ks_max"] = max(dist.get("ks") or [0.0])
    out["alarms"] = len(merged.get("alarms", []))
    return out
