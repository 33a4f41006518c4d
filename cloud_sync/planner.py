"""Model rollout planner: the plan file, cohorts, gates and the rollout state machine. Pure: observations
and the time come in, decisions go out; publishing commands to devices and storing state happen elsewhere.

A plan (``plan.example.toml`` shows every key) names a model, an automation level (``LEVELS``), the
devices it targets, an optional shadow stage, ramp steps ending at 100 % and the gates that every stage
must pass. It is checked completely when loaded: an unknown key, a wrong type or a bad value is a
:class:`PlanError` naming the file, the line, the key, what was expected and what arrived.

Cohorts. A device's place in the ramp is ``cohort_rank(device_id, rollout_id)``, a number in [0, 1)
from sha256, so it is the same on every call and every machine. A step of p % puts the devices ranked
below p / 100 on the candidate: a larger step keeps every device of a smaller one. The shadow cohort uses
its own salt, so it is independent of the ramp. A cohort of a non-empty fleet is never empty: when no
device ranks low enough, the lowest-ranked one goes (this keeps the ramp monotone).

Observations. :class:`Observations` holds what the caller read from the fleet: one
:class:`DeviceObservation` per device that should count (typically the online ones; their tags and
models decide targeting) and per-version :class:`VersionStats` (the previous version's are the fallback
baseline). A stage is in place when every targeted device reports the role it was assigned (a baseline
device that reports ``failed`` counts: it is on the previous version); it is ready when, in addition,
``min_time_s`` has passed since the stage began and every device of the stage's cohort (shadow devices
in the shadow stage, candidate devices in a step) has ``min_samples`` samples since then. Gates are
judged on a ready stage; a cohort device that reports the candidate ``failed`` (it could not install or
run it and stayed on the previous version) fails the ``install`` gate at once.

Gates, per stage, over the cohort: ``shadow_agreement`` (shadow stage only; agreement pooled by samples),
``p99_latency_ms`` and ``error_rate`` (the worst device), ``drift`` (the highest drift score, as the
fleet scores a version, against the baseline devices' highest plus ``drift_margin``) and ``accuracy``
(label feedback pooled over the cohort against the baseline devices', both with at least
``accuracy_min_labels`` labels, minus ``accuracy_margin``; judged from the first step on, because
labels come back for the answers a device gave, and in the shadow stage those are the previous
version's: there ``shadow_agreement`` stands in for it). Per-device values must come from every
cohort device; drift and accuracy baselines fall back to the previous version's :class:`VersionStats`
when the baseline devices have none (at a 100 % step there are none). A gate without the data it needs
is ``unknown``: that never passes, the rollout waits.

What a passing or failing stage leads to is the automation level's business (``LEVELS``); the states a
rollout moves through are in ``_TRANSITIONS``.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Protocol

from edge_runtime.config import TomlDoc, TomlLines
from edge_runtime.errors import ConfigError, EdgeRuntimeError

__all__ = [
    "DECISIONS",
    "DEFAULT_ACCURACY_MIN_LABELS",
    "DEFAULT_MIN_SAMPLES",
    "DEFAULT_MIN_TIME_S",
    "DEFAULT_ROLLBACK_TIMEOUT_S",
    "DONE",
    "GATE_STATUSES",
    "LEVELS",
    "PLANNER",
    "REPORTED_ROLES",
    "ROLES",
    "ROLLOUT_SCHEMA",
    "SHADOW",
    "STATES",
    "AutomationLevel",
    "Bundle",
    "Decision",
    "Device",
    "DeviceObservation",
    "Event",
    "GateResult",
    "Gates",
    "IllegalAction",
    "ObservationError",
    "Observations",
    "Plan",
    "PlanError",
    "Review",
    "Rollout",
    "RolloutError",
    "Stage",
    "VersionStats",
    "assign",
    "cohort_rank",
    "load_plan",
    "needs_review",
    "parse_plan",
    "targets",
]

ROLLOUT_SCHEMA: Final = "cloud-sync.rollout/1"
SHADOW: Final = "shadow"
DONE: Final = "done"
PLANNER: Final = "planner"
# Roles the planner assigns: run the candidate in shadow, run it active, or stay on the previous version.
ROLES: Final = ("shadow", "candidate", "baseline")
# Roles a device may report: an assigned one, "pending" (moving there) or "failed" (the candidate could
# not be installed or run; the device stayed on the previous version).
REPORTED_ROLES: Final = (*ROLES, "pending", "failed")
STATES: Final = ("running", "waiting_approval", "paused", "rolling_back", "rolled_back", "failed", "done")
DECISIONS: Final = ("advance", "wait", "request_approval", "rollback", "done")
GATE_STATUSES: Final = ("pass", "fail", "unknown")
DEFAULT_MIN_SAMPLES: Final = 500
DEFAULT_MIN_TIME_S: Final = 600.0
DEFAULT_ROLLBACK_TIMEOUT_S: Final = 1800.0
DEFAULT_ACCURACY_MIN_LABELS: Final = 100

_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_RAMP_SALT: Final = "ramp"
_SHADOW_SALT: Final = "shadow"


# --------------------------------------------------------------------------------------------------
# Automation levels, one table.
#
#   level  name                            advance    failed gate  candidate outputs  review  notify
#   1      human-led                       approval   ask          shadow             -       -
#   2      human-led, machine-supported    approval   ask          suggest            -       -
#   3      machine-led, human-supported    auto       ask          act                -       yes
#   4      machine-led, human-governed     auto       rollback     act                yes     yes
#   5      machine-controlled              auto       rollback     act                -       -
#
# advance "approval": a stage whose gates pass waits for a person to approve the next one; "auto": it
# advances. Failed gate "ask": a person approves (continue to the next stage anyway) or rejects (roll
# back); "rollback": the planner rolls back. Outputs: what the candidate's outputs are for where it is
# active: "shadow" (shown to the people who decide, never acted on), "suggest" (offered to a person), "act".
# Review: outputs matching the plan's [review] wait for a person. Notify: the planner's own changes are
# flagged for people; a request for approval always is.

@dataclass(frozen=True)
class AutomationLevel:
    """One row of :data:`LEVELS`."""

    level: int
    name: str
    advance: str          # "approval" | "auto"
    on_gate_failure: str  # "ask" | "rollback"
    outputs: str          # "shadow" | "suggest" | "act"
    review: bool
    notify: bool


LEVELS: Final[Mapping[int, AutomationLevel]] = MappingProxyType({row.level: row for row in (
    AutomationLevel(1, "human-led", "approval", "ask", "shadow", review=False, notify=False),
    AutomationLevel(2, "human-led, machine-supported", "approval", "ask", "suggest", review=False, notify=False),
    AutomationLevel(3, "machine-led, human-supported", "auto", "ask", "act", review=False, notify=True),
    AutomationLevel(4, "machine-led, human-governed", "auto", "rollback", "act", review=True, notify=True),
    AutomationLevel(5, "machine-controlled", "auto", "rollback", "act", review=False, notify=False),
)})


# --------------------------------------------------------------------------------------------------
# Errors.

class PlanError(ConfigError):
    """A plan file is wrong: ``path``, ``line`` (where found), ``key``, ``expected`` and ``got``."""


class RolloutError(EdgeRuntimeError):
    """A rollout cannot be built or loaded as asked; ``rollout_id`` names it where known."""

    def __init__(self, message: str, *, rollout_id: str | None = None) -> None:
        super().__init__(f"rollout {rollout_id}: {message}" if rollout_id else message)
        self.rollout_id = rollout_id


class IllegalAction(RolloutError):
    """A command that the rollout's state does not allow: ``action``, ``state`` and the states that do."""

    def __init__(self, message: str, *, rollout_id: str, action: str, state: str, allowed: tuple[str, ...]) -> None:
        super().__init__(message, rollout_id=rollout_id)
        self.action = action
        self.state = state
        self.allowed = allowed


class ObservationError(RolloutError):
    """An observation handed to the planner is malformed; ``device_id`` names the device where known."""

    def __init__(self, message: str, *, device_id: str | None = None) -> None:
        super().__init__(f"device {device_id}: {message}" if device_id else message)
        self.device_id = device_id


# --------------------------------------------------------------------------------------------------
# The plan.

@dataclass(frozen=True)
class Stage:
    """One stage: ``percent`` of targeted devices in its cohort, held until each cohort device has
    ``min_samples`` samples and ``min_time_s`` have passed."""

    name: str
    percent: float
    min_samples: int
    min_time_s: float
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Gates:
    """What every stage must show before it advances; None or False: the gate is off."""

    shadow_agreement_min: float | None = None
    p99_latency_ms_max: float | None = None
    error_rate_max: float | None = None
    drift_not_worse: bool = False
    drift_margin: float = 0.0
    accuracy_not_worse: bool = False
    accuracy_margin: float = 0.0
    accuracy_min_labels: int = DEFAULT_ACCURACY_MIN_LABELS


@dataclass(frozen=True)
class Review:
    """Outputs that wait for a person where the level asks for review: a score below ``below_score`` or
    a label among ``classes``."""

    below_score: float | None = None
    classes: tuple[int | str, ...] = ()

    def matches(self, label: object, score: float | None) -> bool:
        if self.below_score is not None and score is not None and score < self.below_score:
            return True
        return str(label) in {str(c) for c in self.classes}


@dataclass(frozen=True)
class Plan:
    """The validated contents of one plan file; ``text`` keeps the TOML so that a stored rollout can
    re-validate its plan when loaded."""

    name: str
    model: str
    automation_level: int
    target_tags: tuple[str, ...]
    shadow: Stage | None
    steps: tuple[Stage, ...]
    gates: Gates
    review: Review | None = None
    rollback_timeout_s: float = DEFAULT_ROLLBACK_TIMEOUT_S
    source: str = field(default="<plan>", compare=False)
    text: str = field(default="", compare=False, repr=False)

    @property
    def level(self) -> AutomationLevel:
        return LEVELS[self.automation_level]

    @property
    def stages(self) -> tuple[str, ...]:
        """Stage names in order: ``"shadow"`` (when the plan has one), then ``"step-0"``, ``"step-1"`` ..."""
        return tuple(s.name for s in self._stages)

    @property
    def _stages(self) -> tuple[Stage, ...]:
        return ((self.shadow,) if self.shadow is not None else ()) + self.steps

    def stage(self, name: str) -> Stage:
        for s in self._stages:
            if s.name == name:
                return s
        raise KeyError(f"plan {self.name!r} has no stage {name!r} (stages: {', '.join(self.stages)})")

    def next_stage(self, name: str) -> str:
        """The stage after ``name``; :data:`DONE` after the last step."""
        names = self.stages
        i = names.index(self.stage(name).name)
        return names[i + 1] if i + 1 < len(names) else DONE


_TOML_LINE_RE: Final = re.compile(r"at line (\d+)")
_TYPE_NAMES: Final[Mapping[type, str]] = {bool: "a boolean", int: "an integer", float: "a number",
                                          str: "a string", list: "an array", dict: "a table"}
_MISSING: Final = object()


def _got(v: object) -> str:
    return f"{type(v).__name__} {v!r}"


class _Doc(TomlLines):
    """The plan text with the line of every key; errors as :class:`PlanError`."""

    def error(self, where: str, table: tuple[Any, ...], key: str | None, message: str, *,
              expected: str | None = None, got: object = _MISSING) -> PlanError:
        text = f"{where}: {message}" if where else message
        return PlanError(text, path=self.path, key=key, line=self.line(table, key), expected=expected,
                         got=None if got is _MISSING else _got(got))


def _check_keys(doc: _Doc, where: str, table: tuple[Any, ...], obj: Mapping[str, Any],
                schema: Mapping[str, type], required: tuple[str, ...] = ()) -> None:
    for key, value in obj.items():
        if key not in schema:
            raise doc.error(where, table, key, f"unknown key '{key}' (known keys: {', '.join(sorted(schema))})")
        want = schema[key]
        if not (type(value) is want or (want is float and type(value) is int)):
            raise doc.error(where, table, key, f"key '{key}'", expected=_TYPE_NAMES[want], got=value)
    for key in required:
        if key not in obj:
            raise doc.error(where, table, key, f"missing required key '{key}'")


def _in_range(doc: _Doc, where: str, table: tuple[Any, ...], obj: Mapping[str, Any], key: str, default: Any, *,
              ok: Any, expected: str) -> Any:
    """``obj[key]`` (or ``default``) after checking it with ``ok``; NaN and infinities never pass."""
    if key not in obj:
        return default
    value = obj[key]
    if (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
        raise doc.error(where, table, key, f"key '{key}'", expected=expected, got=value)
    return value


_TOP_KEYS: Final[Mapping[str, type]] = {
    "name": str, "model": str, "automation_level": int, "rollback_timeout_s": float, "target": dict,
    "defaults": dict, "shadow": dict, "step": list, "gates": dict, "review": dict}
_DEFAULTS_KEYS: Final[Mapping[str, type]] = {"min_samples": int, "min_time_s": float}
_STAGE_KEYS: Final[Mapping[str, type]] = {"percent": float, "min_samples": int, "min_time_s": float}
_TARGET_KEYS: Final[Mapping[str, type]] = {"tags": list}
_GATE_KEYS: Final[Mapping[str, type]] = {
    "shadow_agreement_min": float, "p99_latency_ms_max": float, "error_rate_max": float, "drift_not_worse": bool,
    "drift_margin": float, "accuracy_not_worse": bool, "accuracy_margin": float, "accuracy_min_labels": int}
_REVIEW_KEYS: Final[Mapping[str, type]] = {"below_score": float, "classes": list}


def _parse_stage(doc: _Doc, where: str, table: tuple[Any, ...], obj: Mapping[str, Any], name: str,
                 defaults: tuple[int, float], *, shadow: bool) -> Stage:
    _check_keys(doc, where, table, obj, _STAGE_KEYS, ("percent",))
    if shadow:
        percent = _in_range(doc, where, table, obj, "percent", None, ok=lambda v: 0 <= v <= 100,
                            expected="a percentage in [0, 100] (0: no shadow stage)")
    else:
        percent = _in_range(doc, where, table, obj, "percent", None, ok=lambda v: 0 < v <= 100,
                            expected="a percentage in (0, 100]")
    min_samples = _in_range(doc, where, table, obj, "min_samples", defaults[0], ok=lambda v: v >= 0,
                            expected="an integer >= 0")
    min_time_s = _in_range(doc, where, table, obj, "min_time_s", defaults[1], ok=lambda v: v >= 0,
                           expected="seconds >= 0")
    return Stage(name, float(percent), min_samples, float(min_time_s), doc.line(table, "percent"))


def _parse_gates(doc: _Doc, obj: Mapping[str, Any]) -> Gates:
    where, table = "[gates]", ("gates",)
    _check_keys(doc, where, table, obj, _GATE_KEYS)
    for flag, keys in (("drift_not_worse", ("drift_margin",)),
                       ("accuracy_not_worse", ("accuracy_margin", "accuracy_min_labels"))):
        for key in keys:
            if key in obj and obj.get(flag) is not True:
                raise doc.error(where, table, key, f"key '{key}' applies only with {flag} = true")
    unit = {"ok": lambda v: 0 <= v <= 1, "expected": "a fraction in [0, 1]"}
    return Gates(
        shadow_agreement_min=_opt(float, _in_range(doc, where, table, obj, "shadow_agreement_min", None, **unit)),
        p99_latency_ms_max=_opt(float, _in_range(doc, where, table, obj, "p99_latency_ms_max", None,
                                                 ok=lambda v: v > 0, expected="milliseconds > 0")),
        error_rate_max=_opt(float, _in_range(doc, where, table, obj, "error_rate_max", None, **unit)),
        drift_not_worse=obj.get("drift_not_worse", False),
        drift_margin=float(_in_range(doc, where, table, obj, "drift_margin", 0.0, ok=lambda v: v >= 0,
                                     expected="a drift score margin >= 0")),
        accuracy_not_worse=obj.get("accuracy_not_worse", False),
        accuracy_margin=float(_in_range(doc, where, table, obj, "accuracy_margin", 0.0, **unit)),
        accuracy_min_labels=_in_range(doc, where, table, obj, "accuracy_min_labels", DEFAULT_ACCURACY_MIN_LABELS,
                                      ok=lambda v: v >= 1, expected="an integer >= 1"))


def _parse_review(doc: _Doc, obj: Mapping[str, Any]) -> Review:
    where, table = "[review]", ("review",)
    _check_keys(doc, where, table, obj, _REVIEW_KEYS)
    if not obj:
        raise doc.error(where, table, None, "an empty [review] matches nothing",
                        expected="below_score, classes or both", got={})
    below = _in_range(doc, where, table, obj, "below_score", None, ok=lambda v: 0 <= v <= 1,
                      expected="a score in [0, 1]")
    classes = obj.get("classes", [])
    for c in classes:
        if type(c) not in (int, str) or (type(c) is str and not c):
            raise doc.error(where, table, "classes", "key 'classes'", expected="class indices or labels", got=c)
    if len({str(c) for c in classes}) != len(classes):
        raise doc.error(where, table, "classes", "key 'classes'", expected="each class once", got=classes)
    return Review(None if below is None else float(below), tuple(classes))


def _parse(doc: _Doc, text: str) -> Plan:
    data = doc.data
    if "step" in data and (type(data["step"]) is not list or not all(type(s) is dict for s in data["step"])):
        raise doc.error("", (), "step", "key 'step'", expected="ramp steps as an array of tables ([[step]])",
                        got=data["step"])
    _check_keys(doc, "", (), data, _TOP_KEYS, ("name", "model", "automation_level", "step"))
    name, model = data["name"], data["model"]
    if not _NAME_RE.fullmatch(name):
        raise doc.error("", (), "name", "key 'name'",
                        expected="1-128 of A-Z a-z 0-9 _ . : @ - starting with a letter or digit", got=name)
    if not model.strip():
        raise doc.error("", (), "model", "key 'model'", expected="a model name", got=model)
    level = _in_range(doc, "", (), data, "automation_level", None, ok=lambda v: v in LEVELS,
                      expected="an automation level 1..5")
    timeout = _in_range(doc, "", (), data, "rollback_timeout_s", DEFAULT_ROLLBACK_TIMEOUT_S, ok=lambda v: v > 0,
                        expected="seconds > 0")

    target = data.get("target", {})
    _check_keys(doc, "[target]", ("target",), target, _TARGET_KEYS)
    tags = target.get("tags", [])
    for t in tags:
        if type(t) is not str or not t.strip():
            raise doc.error("[target]", ("target",), "tags", "key 'tags'", expected="non-empty strings", got=t)
    if len(set(tags)) != len(tags):
        raise doc.error("[target]", ("target",), "tags", "key 'tags'", expected="each tag once", got=tags)

    dflt = data.get("defaults", {})
    _check_keys(doc, "[defaults]", ("defaults",), dflt, _DEFAULTS_KEYS)
    defaults = (_in_range(doc, "[defaults]", ("defaults",), dflt, "min_samples", DEFAULT_MIN_SAMPLES,
                          ok=lambda v: v >= 0, expected="an integer >= 0"),
                float(_in_range(doc, "[defaults]", ("defaults",), dflt, "min_time_s", DEFAULT_MIN_TIME_S,
                                ok=lambda v: v >= 0, expected="seconds >= 0")))

    shadow = None
    if "shadow" in data:
        shadow = _parse_stage(doc, "[shadow]", ("shadow",), data["shadow"], SHADOW, defaults, shadow=True)
        if shadow.percent == 0:
            shadow = None

    raw_steps = data["step"]
    if not raw_steps:
        raise doc.error("", (), "step", "key 'step'", expected="one or more ramp steps ([[step]] tables)",
                        got=raw_steps)
    steps: list[Stage] = []
    for i, obj in enumerate(raw_steps):
        where = f"[[step]] #{i + 1}"
        step = _parse_stage(doc, where, ("step", i), obj, f"step-{i}", defaults, shadow=False)
        if steps and step.percent <= steps[-1].percent:
            raise doc.error(where, ("step", i), "percent", "key 'percent' must grow from step to step",
                            expected=f"more than {steps[-1].percent:g} (step #{i})", got=obj["percent"])
        steps.append(step)
    if steps[-1].percent != 100:
        i = len(steps) - 1
        raise doc.error(f"[[step]] #{i + 1}", ("step", i), "percent", "the last step must reach every device",
                        expected="100", got=raw_steps[-1]["percent"])

    gates = _parse_gates(doc, data.get("gates", {}))
    review = _parse_review(doc, data["review"]) if "review" in data else None
    return Plan(name, model, level, tuple(tags), shadow, tuple(steps), gates, review, float(timeout), doc.path, text)


def parse_plan(text: str, path: str = "<plan>") -> Plan:
    """A plan from TOML text; ``path`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = _TOML_LINE_RE.search(str(e))
        raise PlanError(f"not valid TOML: {e}", path=path, line=int(m.group(1)) if m else None) from e
    return _parse(_Doc(TomlDoc(path, text, data)), text)


def load_plan(path_or_text: str | Path) -> Plan:
    """A plan from a file (a :class:`~pathlib.Path`, or a string without ``=`` or newline) or from TOML
    text (a string with either)."""
    if isinstance(path_or_text, str) and ("\n" in path_or_text or "=" in path_or_text or not path_or_text):
        return parse_plan(path_or_text)
    path = Path(path_or_text)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"cannot read: {getattr(e, 'strerror', None) or e}", path=str(path)) from e
    return parse_plan(text, str(path))


def needs_review(plan: Plan, label: object, score: float | None) -> bool:
    """Whether an output of the candidate waits for a person: the plan's level reviews outputs and the
    output matches its [review]."""
    return plan.level.review and plan.review is not None and plan.review.matches(label, score)


# --------------------------------------------------------------------------------------------------
# Devices, cohorts and observations.

class _Targetable(Protocol):
    @property
    def device_id(self) -> str: ...
    @property
    def tags(self) -> frozenset[str]: ...
    @property
    def models(self) -> frozenset[str]: ...


def _strings(owner: object, name: str, value: object, device_id: object) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ObservationError(f"{name} must be a collection of strings, got {_got(value)}",
                               device_id=str(device_id))
    items = list(value)
    if not all(type(v) is str for v in items):
        raise ObservationError(f"{name} must be strings, got {items!r}", device_id=str(device_id))
    object.__setattr__(owner, name, frozenset(items))
    return frozenset(items)


@dataclass(frozen=True)
class Device:
    """A device as targeting sees it: its tags and the models it runs."""

    device_id: str
    tags: frozenset[str] = frozenset()
    models: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if type(self.device_id) is not str or not self.device_id:
            raise ObservationError(f"device_id must be a non-empty string, got {_got(self.device_id)}")
        _strings(self, "tags", self.tags, self.device_id)
        _strings(self, "models", self.models, self.device_id)


def _check_number(name: str, v: object, lo: float, hi: float) -> str | None:
    """What is wrong with an optional metric, or None."""
    if v is None or (type(v) in (int, float) and math.isfinite(v) and lo <= v <= hi):  # type: ignore[arg-type]
        return None
    return f"{name} must be a number in [{lo:g}, {hi:g}] or None, got {_got(v)}"


@dataclass(frozen=True, kw_only=True)
class DeviceObservation(Device):
    """What the caller knows about one device now. ``role`` is what the device reports (one of
    :data:`REPORTED_ROLES`); ``samples`` are its samples since the stage began. The metrics are those of
    the version its role runs: the candidate for ``shadow`` and ``candidate``, the previous version for
    ``baseline``. None (or ``accuracy_n`` 0) means not known."""

    role: str
    samples: int = 0
    shadow_agreement: float | None = None
    p99_ms: float | None = None
    error_rate: float | None = None
    drift_score: float | None = None
    accuracy_n: int = 0
    accuracy: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        d = self.device_id
        if self.role not in REPORTED_ROLES:
            raise ObservationError(f"role must be one of {', '.join(REPORTED_ROLES)}, got {self.role!r}", device_id=d)
        for name in ("samples", "accuracy_n"):
            v = getattr(self, name)
            if type(v) is not int or v < 0:
                raise ObservationError(f"{name} must be an integer >= 0, got {_got(v)}", device_id=d)
        for name, hi in (("shadow_agreement", 1.0), ("error_rate", 1.0), ("accuracy", 1.0), ("p99_ms", math.inf),
                         ("drift_score", math.inf)):
            wrong = _check_number(name, getattr(self, name), 0.0, hi)
            if wrong:
                raise ObservationError(wrong, device_id=d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeviceObservation:
        if not isinstance(d, Mapping):
            raise ObservationError(f"a device observation must be an object, got {_got(d)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ObservationError(f"unknown fields {unknown} (known: {', '.join(sorted(known))})",
                                   device_id=str(d.get("device_id")))
        try:
            return cls(**d)
        except TypeError as e:
            raise ObservationError(str(e), device_id=str(d.get("device_id"))) from e


@dataclass(frozen=True)
class VersionStats:
    """Fleet-wide KPIs of one model version (from :meth:`cloud_sync.fleet.FleetState.models`)."""

    version: str
    p99_ms: float | None = None
    error_rate: float | None = None
    drift_score: float | None = None
    accuracy_n: int = 0
    accuracy: float | None = None

    def __post_init__(self) -> None:
        where = f"version {self.version!r}"
        if type(self.version) is not str or not self.version:
            raise ObservationError(f"version must be a non-empty string, got {_got(self.version)}")
        if type(self.accuracy_n) is not int or self.accuracy_n < 0:
            raise ObservationError(f"{where}: accuracy_n must be an integer >= 0, got {_got(self.accuracy_n)}")
        for name, hi in (("error_rate", 1.0), ("accuracy", 1.0), ("p99_ms", math.inf), ("drift_score", math.inf)):
            wrong = _check_number(name, getattr(self, name), 0.0, hi)
            if wrong:
                raise ObservationError(f"{where}: {wrong}")

    @classmethod
    def from_fleet_row(cls, row: Mapping[str, Any]) -> VersionStats:
        """From one row of ``FleetState.models()``: the worst p99, error rate, drift score and label accuracy
        (from labels the cloud saw, else from the accuracy the devices report on labels they got)."""
        acc = row.get("accuracy") or {}
        n, accuracy = int(acc.get("n") or 0), acc.get("accuracy")
        if not n and row.get("reported_labels"):  # labels that reached the devices, not the cloud
            n, accuracy = int(row["reported_labels"]), row.get("reported_accuracy")
        return cls(str(row["version"]), (row.get("p99_ms") or {}).get("worst"), row.get("error_rate"),
                   row.get("drift_score"), n, accuracy)


@dataclass(frozen=True)
class Observations:
    """The planner's input: the devices that count now, and per-version KPIs keyed by version."""

    devices: tuple[DeviceObservation, ...] = ()
    versions: Mapping[str, VersionStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        devices = tuple(self.devices)
        seen: set[str] = set()
        for d in devices:
            if not isinstance(d, DeviceObservation):
                raise ObservationError(f"devices must be DeviceObservation values, got {_got(d)}")
            if d.device_id in seen:
                raise ObservationError("observed twice", device_id=d.device_id)
            seen.add(d.device_id)
        for key, v in self.versions.items():
            if not isinstance(v, VersionStats) or v.version != key:
                raise ObservationError(f"versions[{key!r}] must be the VersionStats of version {key!r}, got {v!r}")
        object.__setattr__(self, "devices", devices)
        object.__setattr__(self, "versions", MappingProxyType(dict(self.versions)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Observations:
        """From ``{"devices": [{...}, ...], "versions": {"<version>": {...}}}``, keys as the dataclasses name
        their fields."""
        if not isinstance(d, Mapping) or set(d) - {"devices", "versions"}:
            raise ObservationError(f"observations must be an object with devices and versions, got {d!r:.200}")
        versions: dict[str, VersionStats] = {}
        for key, v in (d.get("versions") or {}).items():
            if not isinstance(v, Mapping):
                raise ObservationError(f"versions[{key!r}] must be an object, got {_got(v)}")
            try:
                versions[key] = VersionStats(**{"version": key, **v})
            except TypeError as e:
                raise ObservationError(f"versions[{key!r}]: {e}") from e
        return cls(tuple(DeviceObservation.from_dict(x) for x in d.get("devices") or ()), versions)


def cohort_rank(device_id: str, rollout_id: str, cohort: str = _RAMP_SALT) -> float:
    """The device's place in [0, 1) for one rollout: from sha256, stable across processes and machines.
    ``cohort`` salts it: ``"ramp"`` for the steps, ``"shadow"`` for the independent shadow cohort."""
    digest = hashlib.sha256(f"{cohort}\0{rollout_id}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def targets(plan: Plan, device: _Targetable) -> bool:
    """Whether the plan targets the device: it runs the plan's model and has every target tag."""
    return plan.model in device.models and set(plan.target_tags) <= device.tags


def _cohort(ids: list[str], rollout_id: str, percent: float, salt: str) -> set[str]:
    ranks = {d: cohort_rank(d, rollout_id, salt) for d in ids}
    chosen = {d for d, r in ranks.items() if r < percent / 100.0}
    if not chosen and ids and percent > 0:
        chosen = {min(ranks, key=lambda d: (ranks[d], d))}
    return chosen


def assign(devices: Iterable[_Targetable], plan: Plan, stage: str, rollout_id: str | None = None) -> dict[str, str]:
    """Roles of the targeted devices at ``stage`` (one of ``plan.stages`` or :data:`DONE`), keyed by id;
    devices the plan does not target are left out. ``rollout_id`` salts the cohorts (default: the
    plan's name), so a new rollout of the same plan draws new cohorts."""
    rid = plan.name if rollout_id is None else rollout_id
    ids = sorted({d.device_id for d in devices if targets(plan, d)})
    if stage == DONE:
        return dict.fromkeys(ids, "candidate")
    s = plan.stage(stage)
    if s.name == SHADOW:
        chosen, role = _cohort(ids, rid, s.percent, _SHADOW_SALT), "shadow"
    else:
        chosen, role = _cohort(ids, rid, s.percent, _RAMP_SALT), "candidate"
    return {d: role if d in chosen else "baseline" for d in ids}


# --------------------------------------------------------------------------------------------------
# Gates and decisions.

@dataclass(frozen=True)
class GateResult:
    """One gate at one evaluation: ``value`` ``op`` ``limit`` passes; ``unknown`` when data is missing."""

    name: str
    status: str
    value: float | None
    limit: float | None
    op: str
    detail: str = ""

    def describe(self) -> str:
        value = "no data" if self.value is None else f"{self.value:.4g}"
        limit = "?" if self.limit is None else f"{self.limit:.4g}"
        return f"{self.name} {value} (must be {self.op} {limit}): {self.status}" + (
            f" [{self.detail}]" if self.detail else "")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "value": self.value, "limit": self.limit, "op": self.op,
                "detail": self.detail}

    @classmethod
    def from_dict(cls, d: Any) -> GateResult:
        g = cls(_s(d["name"]), _s(d["status"]), _opt(_f, d["value"]), _opt(_f, d["limit"]), _s(d["op"]),
                _s(d["detail"]))
        if g.status not in GATE_STATUSES:
            raise TypeError(f"gate status {g.status!r} is not one of {GATE_STATUSES}")
        return g


@dataclass(frozen=True)
class Decision:
    """What the rollout does next.

    ``advance``: enter ``stage`` (move devices to :meth:`Rollout.assignment`). ``wait``: nothing yet,
    ``missing`` says what is lacking (``devices`` not in their role yet, the most ``samples`` one cohort
    device still needs, ``time_s`` left). ``request_approval``: a person approves to enter ``stage`` or
    rejects to roll back. ``rollback``: move every targeted device back to the previous version.
    ``done``: the rollout ended; ``stage`` is ``"done"``, ``"rolled_back"`` or ``"failed"``."""

    kind: str
    stage: str
    reason: str = ""
    missing: Mapping[str, float] | None = None
    gate_results: tuple[GateResult, ...] = ()
    notify: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "stage": self.stage, "reason": self.reason,
                "missing": None if self.missing is None else dict(self.missing),
                "gate_results": [g.to_dict() for g in self.gate_results], "notify": self.notify}


def _worst(cohort: list[DeviceObservation], attr: str) -> tuple[float | None, str]:
    missing = [d.device_id for d in cohort if getattr(d, attr) is None]
    if not cohort or missing:
        return None, (f"no value from {len(missing)} device(s): {', '.join(missing[:3])}" if missing
                      else "no cohort device")
    worst = max(cohort, key=lambda d: (getattr(d, attr), d.device_id))
    return float(getattr(worst, attr)), f"worst of {len(cohort)}: {worst.device_id}"


def _pooled_accuracy(devs: Iterable[DeviceObservation]) -> tuple[int, float | None]:
    pairs = [(d.accuracy_n, d.accuracy) for d in devs if d.accuracy_n > 0 and d.accuracy is not None]
    n = sum(k for k, _ in pairs)
    return n, (sum(k * a for k, a in pairs) / n if n else None)


def _gate(name: str, value: float | None, limit: float | None, op: str, detail: str) -> GateResult:
    if value is None or limit is None:
        status = "unknown"
    else:
        ok = value <= limit + 1e-12 if op == "<=" else value >= limit - 1e-12
        status = "pass" if ok else "fail"
    return GateResult(name, status, None if value is None else round(value, 6),
                      None if limit is None else round(limit, 6), op, detail)


def _gate_results(plan: Plan, stage: str, cohort: list[DeviceObservation], base: list[DeviceObservation],
                  previous: VersionStats | None) -> tuple[GateResult, ...]:
    g = plan.gates
    failed = sorted(d.device_id for d in cohort if d.role == "failed")
    out = [_gate("install", float(len(failed)), 0.0, "<=",
                 f"failed on {', '.join(failed[:3])}" + (" ..." if len(failed) > 3 else "") if failed else "")]
    if stage == SHADOW and g.shadow_agreement_min is not None:
        agree = [(d.shadow_agreement, d.samples) for d in cohort if d.shadow_agreement is not None]
        missing = [d.device_id for d in cohort if d.shadow_agreement is None]
        value, detail = None, f"no value from {', '.join(missing[:3])}" if missing else "no shadow device"
        if cohort and not missing:
            weight = sum(n for _, n in agree)
            value = (sum(a * n for a, n in agree) / weight if weight else sum(a for a, _ in agree) / len(agree))
            detail = f"pooled over {len(cohort)} shadow device(s) by samples"
        out.append(_gate("shadow_agreement", value, g.shadow_agreement_min, ">=", detail))
    if g.p99_latency_ms_max is not None:
        value, detail = _worst(cohort, "p99_ms")
        out.append(_gate("p99_latency_ms", value, g.p99_latency_ms_max, "<=", detail))
    if g.error_rate_max is not None:
        value, detail = _worst(cohort, "error_rate")
        out.append(_gate("error_rate", value, g.error_rate_max, "<=", detail))
    if g.drift_not_worse:
        value, detail = _worst(cohort, "drift_score")
        scores = [d.drift_score for d in base if d.drift_score is not None]
        baseline: float | None
        if scores:
            baseline, basis = max(scores), f"{len(scores)} baseline device(s)"
        elif previous is not None and previous.drift_score is not None:
            baseline, basis = previous.drift_score, f"version {previous.version}"
        else:
            baseline, basis = None, "no baseline drift score"
        out.append(_gate("drift", value, None if baseline is None else baseline + g.drift_margin, "<=",
                         f"candidate {detail}; baseline from {basis}"))
    if g.accuracy_not_worse and stage != SHADOW:
        n, acc = _pooled_accuracy(cohort)
        value = acc if n >= g.accuracy_min_labels else None
        bn, bacc = _pooled_accuracy(base)
        basis = f"{len(base)} baseline device(s), {bn} labels"
        if bn < g.accuracy_min_labels and previous is not None and previous.accuracy is not None:
            bn, bacc = previous.accuracy_n, previous.accuracy
            basis = f"version {previous.version}, {bn} labels"
        baseline = bacc if bn >= g.accuracy_min_labels else None
        out.append(_gate("accuracy", value, None if baseline is None else baseline - g.accuracy_margin, ">=",
                         f"candidate {n} labels (need {g.accuracy_min_labels}); baseline from {basis}"))
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# The rollout.

# Rollout states, one table: (state, event) -> next state. A rollout is "running" one stage of its plan
# (shadow, then the steps) and its stage changes only on "advance" or "approve". The planner's events
# come from evaluate(); people's events are the commands of the same name. A pair missing here is an
# IllegalAction for a person (and a bug for the planner).
#   ask:          gates passed where the level wants approval, or failed where it wants a person
#   advance:      gates passed and the level advances alone (stage -> next)
#   finish:       the last step passed (the stage becomes "done")
#   gate_failed:  a gate failed where the level rolls back alone
#   rolled_back:  every targeted device is back on the previous version
#   timeout:      the rollback was not confirmed within the plan's rollback_timeout_s
_TRANSITIONS: Final[Mapping[tuple[str, str], str]] = MappingProxyType({
    ("running", "advance"): "running",
    ("running", "finish"): "done",
    ("running", "ask"): "waiting_approval",
    ("waiting_approval", "ask"): "waiting_approval",    # the gate results changed while waiting
    ("running", "gate_failed"): "rolling_back",
    ("rolling_back", "rolled_back"): "rolled_back",
    ("rolling_back", "timeout"): "failed",
    ("waiting_approval", "approve"): "running",         # then "finish" when the approved stage is "done"
    ("waiting_approval", "reject"): "rolling_back",
    ("running", "pause"): "paused",
    ("waiting_approval", "pause"): "paused",            # the request lapses; resuming asks again
    ("paused", "resume"): "running",
    ("running", "rollback"): "rolling_back",
    ("waiting_approval", "rollback"): "rolling_back",
    ("paused", "rollback"): "rolling_back",
    ("done", "rollback"): "rolling_back",
    ("failed", "rollback"): "rolling_back",             # try again
})
_PERSON_ACTIONS: Final = ("approve", "reject", "pause", "resume", "rollback")
_BASELINE_ROLE_STATES: Final = ("rolling_back", "rolled_back", "failed")


@dataclass(frozen=True)
class Bundle:
    """The candidate model bundle: name (the plan's model), version, sha256 of its manifest, size in bytes."""

    name: str
    version: str
    sha256: str
    size: int

    def __post_init__(self) -> None:
        for key in ("name", "version"):
            v = getattr(self, key)
            if type(v) is not str or not v.strip():
                raise RolloutError(f"candidate {key} must be a non-empty string, got {_got(v)}")
        if type(self.sha256) is not str or not _SHA256_RE.fullmatch(self.sha256):
            raise RolloutError(f"candidate sha256 must be 64 lowercase hex digits, got {_got(self.sha256)}")
        if type(self.size) is not int or self.size <= 0:
            raise RolloutError(f"candidate size must be an integer > 0, got {_got(self.size)}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class Event:
    """One change of a rollout: when, who (:data:`PLANNER` or a person), what happened and why, and the
    state and stage it left the rollout in."""

    time_ms: int
    actor: str
    what: str
    why: str
    state: str
    stage: str

    def to_dict(self) -> dict[str, Any]:
        return {"time_ms": self.time_ms, "actor": self.actor, "what": self.what, "why": self.why,
                "state": self.state, "stage": self.stage}

    @classmethod
    def from_dict(cls, d: Any) -> Event:
        return cls(_i(d["time_ms"]), _s(d["actor"]), _s(d["what"]), _s(d["why"]), _s(d["state"]), _s(d["stage"]))


@dataclass(frozen=True)
class _Pending:
    """An open request for approval: what approving leads to, and why it was asked."""

    to_stage: str
    why: str            # "advance": gates passed; "gate_failed": a person decides
    gate_results: tuple[GateResult, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"to_stage": self.to_stage, "why": self.why, "gate_results": [g.to_dict() for g in self.gate_results]}

    @classmethod
    def from_dict(cls, d: Any) -> _Pending:
        return cls(_s(d["to_stage"]), _s(d["why"]), tuple(GateResult.from_dict(g) for g in d["gate_results"]))


def _s(v: object) -> str:
    if type(v) is not str:
        raise TypeError(f"expected str, got {type(v).__name__}")
    return v


def _i(v: object) -> int:
    if type(v) is not int:
        raise TypeError(f"expected int, got {type(v).__name__}")
    return v


def _f(v: object) -> float:
    if type(v) not in (int, float) or not math.isfinite(v):  # type: ignore[arg-type]
        raise TypeError(f"expected a finite number, got {type(v).__name__}")
    return float(v)  # type: ignore[arg-type]


def _opt(conv: Any, v: object) -> Any:
    return None if v is None else conv(v)


def _now(now_ms: object) -> int:
    if type(now_ms) is not int or now_ms < 0:
        raise RolloutError(f"now_ms must be an integer >= 0 (milliseconds), got {_got(now_ms)}")
    return now_ms


class Rollout:
    """One rollout of a candidate bundle under a plan; see ``_TRANSITIONS`` for its states.

    :meth:`evaluate` turns observations into decisions; :meth:`approve`, :meth:`reject`, :meth:`pause`,
    :meth:`resume` and :meth:`rollback` are people's commands; :meth:`assignment` gives the role every
    targeted device should have now. Every change is in :attr:`events`. :meth:`to_dict` and
    :meth:`from_dict` persist and reload it."""

    def __init__(self, plan: Plan, rollout_id: str, candidate: Bundle, previous_version: str, *,
                 now_ms: int) -> None:
        if type(rollout_id) is not str or not _NAME_RE.fullmatch(rollout_id):
            raise RolloutError(f"rollout id must be 1-128 of A-Z a-z 0-9 _ . : @ - starting with a letter or digit, "
                               f"got {_got(rollout_id)}")
        if not isinstance(plan, Plan) or not isinstance(candidate, Bundle):
            raise RolloutError("a rollout needs a Plan and a Bundle", rollout_id=rollout_id)
        if candidate.name != plan.model:
            raise RolloutError(f"candidate bundle {candidate.name!r} is not the plan's model {plan.model!r}",
                               rollout_id=rollout_id)
        if type(previous_version) is not str or not previous_version.strip():
            raise RolloutError(f"previous version must be a non-empty string, got {_got(previous_version)}",
                               rollout_id=rollout_id)
        if previous_version == candidate.version:
            raise RolloutError(f"candidate version {candidate.version!r} is the version already running",
                               rollout_id=rollout_id)
        now = _now(now_ms)
        self.plan = plan
        self.rollout_id = rollout_id
        self.candidate = candidate
        self.previous_version = previous_version
        self.created_ms = now
        self._state = "running"
        self._stage = plan.stages[0]
        self._stage_started_ms = now
        self._last_ms = now
        self._pending: _Pending | None = None
        self._paused: tuple[str, str] | None = None              # (by, reason)
        self._rollback: tuple[str, str, int] | None = None       # (by, reason, started_ms)
        self._events: list[Event] = []
        self._log(now, PLANNER, "create",
                  f"rollout of {plan.model} {previous_version} -> {candidate.version} at automation level "
                  f"{plan.automation_level} ({plan.level.name}); stages {' -> '.join(plan.stages)}")

    # -- reading ---------------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def stage(self) -> str:
        """The plan stage the rollout is at (or last was at), or :data:`DONE`."""
        return self._stage

    @property
    def stage_started_ms(self) -> int:
        return self._stage_started_ms

    @property
    def level(self) -> AutomationLevel:
        return self.plan.level

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(self._events)

    @property
    def pending_approval(self) -> dict[str, Any] | None:
        """The open request for approval, or None."""
        return None if self._pending is None else self._pending.to_dict()

    def assignment(self, devices: Iterable[_Targetable]) -> dict[str, str]:
        """The role each targeted device should have now: its stage's roles while running, waiting or
        paused; every one ``candidate`` when done; every one ``baseline`` once rolling back."""
        if self._state in _BASELINE_ROLE_STATES:
            return dict.fromkeys(assign(devices, self.plan, DONE, self.rollout_id), "baseline")
        return assign(devices, self.plan, self._stage, self.rollout_id)

    def __repr__(self) -> str:
        return f"<Rollout {self.rollout_id} {self._state} at {self._stage}>"

    # -- the machinery -------------------------------------------------------------------------------

    def _tick(self, now_ms: int | None) -> int:
        """The time of a call: ``now_ms``, or the latest time the rollout saw."""
        return self._last_ms if now_ms is None else _now(now_ms)

    def _log(self, now: int, actor: str, what: str, why: str) -> None:
        self._last_ms = max(self._last_ms, now)
        self._events.append(Event(now, actor, what, why, self._state, self._stage))

    def _move(self, event: str, actor: str, now: int, why: str) -> None:
        nxt = _TRANSITIONS.get((self._state, event))
        if nxt is None:
            allowed = tuple(s for (s, e) in _TRANSITIONS if e == event)
            if event not in _PERSON_ACTIONS:
                raise RolloutError(f"internal: planner event {event!r} in state {self._state}",
                                   rollout_id=self.rollout_id)
            raise IllegalAction(
                f"cannot {event} while {self._describe()}; {event} is allowed only while {' or '.join(allowed)}",
                rollout_id=self.rollout_id, action=event, state=self._state, allowed=allowed)
        self._state = nxt
        self._log(now, actor, event, why)

    def _describe(self) -> str:
        if self._state == "running":
            return f"running stage {self._stage} (nothing waits for approval)"
        if self._state == "paused" and self._paused is not None:
            return f"paused by {self._paused[0]} at {self._stage}"
        if self._state == "waiting_approval" and self._pending is not None:
            return f"waiting for approval of {self._pending.to_stage}"
        return self._state

    def _request(self) -> _Pending:
        if self._pending is None:
            raise RolloutError("internal: waiting for approval without a request", rollout_id=self.rollout_id)
        return self._pending

    def _person(self, by: object) -> str:
        if type(by) is not str or not by.strip() or by == PLANNER:
            raise RolloutError(f"'by' must name the person acting (not {PLANNER!r}), got {by!r}",
                               rollout_id=self.rollout_id)
        return by

    def _decision(self, kind: str, stage: str, reason: str, *, missing: Mapping[str, float] | None = None,
                  gates: tuple[GateResult, ...] = ()) -> Decision:
        notify = kind == "request_approval" or (kind != "wait" and self.level.notify)
        return Decision(kind, stage, reason, None if missing is None else MappingProxyType(dict(missing)),
                        gates, notify)

    def _wait(self, reason: str, missing: Mapping[str, float] | None = None,
              gates: tuple[GateResult, ...] = ()) -> list[Decision]:
        return [self._decision("wait", self._stage, reason, missing=missing, gates=gates)]

    def _enter(self, to: str, actor: str, now: int, why: str, gates: tuple[GateResult, ...]) -> list[Decision]:
        """Start stage ``to`` (the rollout is running); the last step's successor finishes the rollout."""
        self._stage = to
        self._stage_started_ms = max(now, self._stage_started_ms)   # a clock that steps back never reopens a stage
        if to == DONE:
            self._move("finish", actor, now, why)
            return [self._decision("done", DONE, why, gates=gates)]
        if actor == PLANNER:
            self._move("advance", actor, now, why)
        return [self._decision("advance", to, why, gates=gates)]

    def _start_rollback(self, event: str, actor: str, now: int, why: str,
                        gates: tuple[GateResult, ...] = ()) -> list[Decision]:
        self._move(event, actor, now, why)
        self._pending = None
        self._paused = None
        self._rollback = (actor, why, now)
        return [self._decision("rollback", self._stage, why, gates=gates)]

    def _measure(self, obs: Observations) -> tuple[list[DeviceObservation], dict[str, str], tuple[GateResult, ...]]:
        devices = [d for d in obs.devices if targets(self.plan, d)]
        roles = assign(devices, self.plan, self._stage, self.rollout_id)
        want = "shadow" if self._stage == SHADOW else "candidate"
        cohort = [d for d in devices if roles[d.device_id] == want]
        base = [d for d in devices if roles[d.device_id] == "baseline"]
        gates = _gate_results(self.plan, self._stage, cohort, base, obs.versions.get(self.previous_version))
        return devices, roles, gates

    # -- evaluation ----------------------------------------------------------------------------------

    def evaluate(self, observations: Observations | Mapping[str, Any], now_ms: int) -> list[Decision]:
        """What to do now, given what the fleet shows; moves the rollout where the level says so."""
        obs = observations if isinstance(observations, Observations) else Observations.from_dict(observations)
        now = self._tick(now_ms)
        self._last_ms = max(self._last_ms, now)
        if self._state == "running":
            return self._evaluate_running(obs, now)
        if self._state == "waiting_approval":
            return self._evaluate_waiting(obs, now)
        if self._state == "paused":
            by, reason = self._paused or ("?", "")
            return self._wait(f"paused by {by}" + (f": {reason}" if reason else "") + "; resume to go on")
        if self._state == "rolling_back":
            return self._evaluate_rollback(obs, now)
        return []

    def _evaluate_running(self, obs: Observations, now: int) -> list[Decision]:
        devices, roles, gates = self._measure(obs)
        stage = self.plan.stage(self._stage)
        if not devices:
            return self._wait(f"no device targeted by {self.plan.name} was observed",
                              {"devices": 0, "samples": stage.min_samples, "time_s": stage.min_time_s})
        if gates[0].status == "fail":
            return self._gate_failed(gates, now)
        not_in_place = sorted(d.device_id for d in devices if d.role != roles[d.device_id]
                              and not (roles[d.device_id] == "baseline" and d.role == "failed"))
        cohort = [d for d in devices if roles[d.device_id] != "baseline"]
        short = [stage.min_samples - d.samples for d in cohort if d.samples < stage.min_samples]
        time_left = max(0.0, stage.min_time_s - (now - self._stage_started_ms) / 1000.0)
        missing = {"devices": len(not_in_place), "samples": max(short, default=0), "time_s": round(time_left, 3)}
        if not_in_place:
            return self._wait(f"{len(not_in_place)} of {len(devices)} targeted devices not yet in their role at "
                              f"{stage.name} ({', '.join(not_in_place[:3])}{' ...' if len(not_in_place) > 3 else ''})",
                              missing, gates)
        if short or time_left > 0:
            return self._wait(f"{stage.name} needs {stage.min_samples} samples on each of {len(cohort)} cohort "
                              f"device(s) ({len(short)} short) and {stage.min_time_s:g} s", missing, gates)
        if any(g.status == "fail" for g in gates):
            return self._gate_failed(gates, now)
        unknown = [g.name for g in gates if g.status == "unknown"]
        if unknown:
            return self._wait(f"no data yet for gate(s) {', '.join(unknown)}; unknown never passes", missing, gates)
        return self._gates_passed(gates, now)

    def _gates_passed(self, gates: tuple[GateResult, ...], now: int) -> list[Decision]:
        to = self.plan.next_stage(self._stage)
        passed = ", ".join(g.name for g in gates)
        if self.level.advance == "auto":
            return self._enter(to, PLANNER, now, f"{self._stage} passed its gates ({passed})", gates)
        why = (f"{self._stage} passed its gates ({passed}); level {self.plan.automation_level} needs a person to "
               f"approve {to}")
        self._pending = _Pending(to, "advance", gates)
        self._move("ask", PLANNER, now, why)
        return [self._decision("request_approval", to, why, gates=gates)]

    def _gate_failed(self, gates: tuple[GateResult, ...], now: int) -> list[Decision]:
        failing = "; ".join(g.describe() for g in gates if g.status == "fail")
        if self.level.on_gate_failure == "rollback":
            return self._start_rollback("gate_failed", PLANNER, now, f"gate failed at {self._stage}: {failing}",
                                        gates)
        to = self.plan.next_stage(self._stage)
        why = (f"gate failed at {self._stage}: {failing}; approve to continue to {to} anyway, or reject to "
               f"roll back")
        self._pending = _Pending(to, "gate_failed", gates)
        self._move("ask", PLANNER, now, why)
        return [self._decision("request_approval", to, why, gates=gates)]

    def _evaluate_waiting(self, obs: Observations, now: int) -> list[Decision]:
        pending = self._request()
        _, _, gates = self._measure(obs)
        if [(g.name, g.status) for g in gates] != [(g.name, g.status) for g in pending.gate_results]:
            changed = "; ".join(g.describe() for g in gates)
            self._pending = _Pending(pending.to_stage, pending.why, gates)
            self._move("ask", PLANNER, now, f"gate results changed while waiting for approval: {changed}")
            return [self._decision("request_approval", pending.to_stage,
                                   f"gate results changed while waiting: {changed}; approve to enter "
                                   f"{pending.to_stage}, or reject to roll back", gates=gates)]
        return self._wait(f"waiting for a person to approve {pending.to_stage} or reject", None, gates)

    def _evaluate_rollback(self, obs: Observations, now: int) -> list[Decision]:
        devices = [d for d in obs.devices if targets(self.plan, d)]
        away = sorted(d.device_id for d in devices if d.role not in ("baseline", "failed"))
        _, reason, started = self._rollback or (PLANNER, "", now)
        if devices and not away:
            why = f"all {len(devices)} targeted devices are back on {self.previous_version}"
            self._move("rolled_back", PLANNER, now, why)
            return [self._decision("done", "rolled_back", why)]
        waited_s = (now - started) / 1000.0
        if waited_s >= self.plan.rollback_timeout_s:
            why = (f"rollback not confirmed after {waited_s:g} s: "
                   + (f"{len(away)} device(s) still off {self.previous_version} ({', '.join(away[:3])})"
                      if away else "no targeted device observed") + "; a person must look, then roll back again")
            self._move("timeout", PLANNER, now, why)
            return [Decision("done", "failed", why, notify=True)]
        return self._wait(f"rolling back ({reason}): {len(away)} device(s) not yet on {self.previous_version}"
                          if devices else "rolling back: no targeted device observed yet",
                          {"devices": len(away) if devices else 0, "samples": 0,
                           "time_s": round(self.plan.rollback_timeout_s - waited_s, 3)})

    # -- people's commands ---------------------------------------------------------------------------

    def approve(self, by: str, now_ms: int) -> list[Decision]:
        """Approve the open request: enter the stage it names (after a failed gate: continue anyway)."""
        who, now = self._person(by), self._tick(now_ms)
        if self._state != "waiting_approval":
            self._move("approve", who, now, "")            # raises IllegalAction
        pending = self._request()
        what = "after a failed gate, continuing anyway" if pending.why == "gate_failed" else "gates passed"
        why = f"{who} approved {pending.to_stage} ({what})"
        self._pending = None
        if pending.to_stage != DONE:
            self._stage = pending.to_stage              # so that the approval's event names the stage it opened
        self._move("approve", who, now, why)
        return self._enter(pending.to_stage, who, now, why, pending.gate_results)

    def reject(self, by: str, now_ms: int | None = None, reason: str = "") -> list[Decision]:
        """Refuse the open request: roll back. ``now_ms`` defaults to the latest time the rollout saw."""
        who, now = self._person(by), self._tick(now_ms)
        gates = self._pending.gate_results if self._pending is not None else ()
        return self._start_rollback("reject", who, now, f"{who} rejected" + (f": {reason}" if reason else ""), gates)

    def pause(self, by: str, now_ms: int | None = None, reason: str = "") -> list[Decision]:
        """Stop advancing; devices keep their roles and the stage's clock keeps running."""
        who, now = self._person(by), self._tick(now_ms)
        self._move("pause", who, now, f"{who} paused" + (f": {reason}" if reason else ""))
        self._pending = None
        self._paused = (who, reason)
        return []

    def resume(self, by: str, now_ms: int | None = None) -> list[Decision]:
        """Go on from a pause; the next :meth:`evaluate` judges the stage afresh."""
        who, now = self._person(by), self._tick(now_ms)
        self._move("resume", who, now, f"{who} resumed")
        self._paused = None
        return []

    def rollback(self, by: str, reason: str, now_ms: int | None = None) -> list[Decision]:
        """Roll every targeted device back to the previous version (also after done, or to retry after failed)."""
        who, now = self._person(by), self._tick(now_ms)
        if type(reason) is not str or not reason.strip():
            raise RolloutError(f"a rollback needs a reason, got {reason!r}", rollout_id=self.rollout_id)
        return self._start_rollback("rollback", who, now, f"{who}: {reason}")

    # -- persistence ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": ROLLOUT_SCHEMA, "rollout_id": self.rollout_id,
            "plan": {"source": self.plan.source, "text": self.plan.text},
            "candidate": self.candidate.to_dict(), "previous_version": self.previous_version,
            "created_ms": self.created_ms, "state": self._state, "stage": self._stage,
            "stage_started_ms": self._stage_started_ms, "last_ms": self._last_ms,
            "pending": None if self._pending is None else self._pending.to_dict(),
            "paused": None if self._paused is None else {"by": self._paused[0], "reason": self._paused[1]},
            "rollback": None if self._rollback is None else {"by": self._rollback[0], "reason": self._rollback[1],
                                                             "started_ms": self._rollback[2]},
            "events": [e.to_dict() for e in self._events],
        }

    @classmethod
    def from_dict(cls, d: object) -> Rollout:
        """Reload :meth:`to_dict` output; the plan is validated again from its stored text."""
        if not isinstance(d, dict) or d.get("schema") != ROLLOUT_SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise RolloutError(f"stored rollout: expected schema {ROLLOUT_SCHEMA!r}, got {got!r}")
        rid = d.get("rollout_id") if isinstance(d.get("rollout_id"), str) else None
        try:
            plan = parse_plan(_s(d["plan"]["text"]), _s(d["plan"]["source"]))
            cand = d["candidate"]
            candidate = Bundle(_s(cand["name"]), _s(cand["version"]), _s(cand["sha256"]), _i(cand["size"]))
            created = _i(d["created_ms"])
            r = cls(plan, _s(d["rollout_id"]), candidate, _s(d["previous_version"]), now_ms=created)
            r._state, r._stage = _s(d["state"]), _s(d["stage"])
            r._stage_started_ms, r._last_ms = _i(d["stage_started_ms"]), _i(d["last_ms"])
            r._pending = _opt(_Pending.from_dict, d["pending"])
            p, rb = d["paused"], d["rollback"]
            r._paused = None if p is None else (_s(p["by"]), _s(p["reason"]))
            r._rollback = None if rb is None else (_s(rb["by"]), _s(rb["reason"]), _i(rb["started_ms"]))
            r._events = [Event.from_dict(e) for e in d["events"]]
        except ConfigError as e:
            raise RolloutError(f"stored rollout: its plan no longer loads: {e}", rollout_id=rid) from e
        except (KeyError, TypeError) as e:
            raise RolloutError(f"stored rollout: missing or malformed field ({e})", rollout_id=rid) from e
        r._check()
        return r

    def _check(self) -> None:
        def bad(why: str) -> RolloutError:
            return RolloutError(f"stored rollout: {why}", rollout_id=self.rollout_id)

        if self._state not in STATES:
            raise bad(f"state {self._state!r} is not one of {', '.join(STATES)}")
        stages = (*self.plan.stages, DONE)
        if self._stage not in stages:
            raise bad(f"stage {self._stage!r} is not one of {', '.join(stages)}")
        if (self._state == "done" and self._stage != DONE) or (
                self._stage == DONE and self._state not in ("done", *_BASELINE_ROLE_STATES)):
            raise bad(f"stage {self._stage!r} does not fit state {self._state!r}")
        if (self._pending is not None) != (self._state == "waiting_approval"):
            raise bad(f"a pending approval goes with waiting_approval, not {self._state}")
        if self._pending is not None and (self._pending.to_stage not in stages or self._pending.why not in
                                          ("advance", "gate_failed")):
            raise bad(f"pending approval {self._pending.to_dict()} is not valid for this plan")
        if (self._paused is not None) != (self._state == "paused"):
            raise bad(f"pause details go with the paused state, not {self._state}")
        if (self._rollback is not None) != (self._state in _BASELINE_ROLE_STATES):
            raise bad(f"rollback details go with {', '.join(_BASELINE_ROLE_STATES)}, not {self._state}")
        if not self._events or any(e.state not in STATES for e in self._events):
            raise bad("the event log is empty or names unknown states")
        if not self.created_ms <= self._stage_started_ms <= self._last_ms:
            raise bad("times are out of order (created_ms <= stage_started_ms <= last_ms)")
