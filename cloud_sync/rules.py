"""Alert rules: a TOML file of conditions on fleet metrics, and the alerts they raise. Pure: the fleet
and the time come in, alert transitions go out; sending them to sinks happens elsewhere.

A rules file holds ``[[rule]]`` entries and ``[sinks.NAME]`` tables (``rules.example.toml`` shows every
metric). It is checked completely when loaded: an unknown key, a wrong type or a bad value is a
:class:`RulesError` naming the file, the line, the key, what was expected and what arrived.

Each rule measures one metric per subject: a device (``p99_latency_ms``, ``error_rate``,
``low_confidence_rate``, ``cpu_percent``, ``temperature_c``, ``offline_minutes``) or a model version
(``drift_alarm_devices``, ``accuracy_drop``, ``fleet_drift_score``; subject ``"<model>@<version>"``).
Device gauges are only taken from devices heard from recently (state ``online``): an offline device's
last CPU reading is not news, and ``offline_minutes`` covers its silence. A subject without a value
counts as the condition being false.

:class:`AlertManager` keeps one alert per (rule, subject) at a time; see ``_LIFECYCLE`` for its states.
"""

from __future__ import annotations

import math
import operator
import re
import tomllib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from edge_runtime.config import TomlDoc, TomlLines
from edge_runtime.errors import ConfigError, EdgeRuntimeError

if TYPE_CHECKING:
    from cloud_sync.fleet import FleetState

__all__ = [
    "ALERTS_SCHEMA",
    "ALERT_STATES",
    "DEVICE_METRICS",
    "METRICS",
    "MODEL_METRICS",
    "OPS",
    "SEVERITIES",
    "SINK_TYPES",
    "AlertError",
    "AlertManager",
    "AlertTransition",
    "Rule",
    "RuleSet",
    "RulesError",
    "Sink",
    "load_rules",
    "measure",
    "parse_rules",
]

DEVICE_METRICS: Final = ("p99_latency_ms", "error_rate", "offline_minutes", "low_confidence_rate", "cpu_percent",
                         "temperature_c")
MODEL_METRICS: Final = ("drift_alarm_devices", "accuracy_drop", "fleet_drift_score")
METRICS: Final = ("drift_alarm_devices", "p99_latency_ms", "error_rate", "accuracy_drop", "offline_minutes",
                  "low_confidence_rate", "cpu_percent", "temperature_c", "fleet_drift_score")
OPS: Final[Mapping[str, Callable[[float, float], bool]]] = {">": operator.gt, ">=": operator.ge, "<": operator.lt,
                                                           "<=": operator.le}
SEVERITIES: Final = ("info", "warning", "critical")
SINK_TYPES: Final = ("log", "mqtt", "webhook")
ALERT_STATES: Final = ("firing", "acknowledged", "resolved")
ALERTS_SCHEMA: Final = "cloud-sync.alerts/1"

# Allowed threshold ranges per metric (inclusive); a threshold outside can never be meant.
_THRESHOLD_RANGES: Final[Mapping[str, tuple[float, float]]] = {
    "drift_alarm_devices": (0.0, math.inf), "p99_latency_ms": (0.0, math.inf), "error_rate": (0.0, 1.0),
    "accuracy_drop": (-100.0, 100.0), "offline_minutes": (0.0, math.inf), "low_confidence_rate": (0.0, 1.0),
    "cpu_percent": (0.0, math.inf), "temperature_c": (-273.15, math.inf), "fleet_drift_score": (0.0, math.inf),
}
# Device metrics as the fleet's device rows (and their pipeline rows) name them.
_ROW_KEYS: Final[Mapping[str, str]] = {"p99_latency_ms": "p99_ms", "error_rate": "error_rate",
                                       "low_confidence_rate": "low_confidence_rate", "cpu_percent": "cpu_percent",
                                       "temperature_c": "temperature_c"}
_PIPELINE_METRICS: Final = ("p99_latency_ms", "error_rate", "low_confidence_rate")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DEFAULT_SINK: Final = "log"
_MAX_RESOLVED: Final = 1000


# --------------------------------------------------------------------------------------------------
# Errors.

class RulesError(ConfigError):
    """A rules file is wrong: ``path``, ``line`` (where found), ``key``, ``expected`` and ``got``."""


class AlertError(EdgeRuntimeError):
    """An alert operation that the lifecycle does not allow, or alert state that cannot be loaded."""

    def __init__(self, message: str, *, alert_id: str | None = None) -> None:
        super().__init__(message)
        self.alert_id = alert_id


# --------------------------------------------------------------------------------------------------
# Rules and sinks.

@dataclass(frozen=True)
class Sink:
    """Where alert transitions go: ``log``, an MQTT ``topic`` or a webhook ``url`` (sent elsewhere)."""

    name: str
    type: str
    topic: str | None = None
    url: str | None = None
    timeout_s: float | None = None


@dataclass(frozen=True)
class Rule:
    """One alert condition: ``metric op threshold``, held for ``for_s`` seconds before it fires.

    ``baseline`` and ``min_samples`` apply to ``accuracy_drop`` only: the accuracy to compare with (else
    the version's reference accuracy) and how many labels are needed before accuracy counts."""

    name: str
    metric: str
    op: str
    threshold: float
    for_s: float = 0.0
    model: str | None = None
    severity: str = "warning"
    retrain: bool = False
    sinks: tuple[str, ...] = (_DEFAULT_SINK,)
    baseline: float | None = None
    min_samples: int = 1
    line: int | None = field(default=None, compare=False)

    @property
    def scope(self) -> str:
        """``"device"`` or ``"model"``: what the rule's subjects are."""
        return "model" if self.metric in MODEL_METRICS else "device"

    def holds(self, value: float) -> bool:
        return OPS[self.op](value, self.threshold)

    def describe(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


@dataclass(frozen=True)
class RuleSet:
    """The validated contents of one rules file."""

    rules: tuple[Rule, ...]
    sinks: Mapping[str, Sink]
    source: str = "<rules>"

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def rule(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rules)


# --------------------------------------------------------------------------------------------------
# Loading.

_TOML_LINE_RE = re.compile(r"at line (\d+)")
_TYPE_NAMES: Final[Mapping[type, str]] = {bool: "a boolean", int: "an integer", float: "a number",
                                          str: "a string", list: "an array", dict: "a table"}


def _got(v: object) -> str:
    return f"{type(v).__name__} {v!r}"


class _Doc(TomlLines):
    """The rules text with the line of every key (``[[rule]]`` entries by index); errors as :class:`RulesError`."""

    def error(self, where: str, table: tuple[Any, ...], key: str | None, message: str, *,
              expected: str | None = None, got: object = None) -> RulesError:
        text = f"{where}: {message}" if where else message
        return RulesError(text, path=self.path, key=key, line=self.line(table, key), expected=expected,
                          got=None if expected is None else _got(got))


def _check_type(doc: _Doc, where: str, table: tuple[Any, ...], key: str, value: object,
                want: type | tuple[type, ...]) -> None:
    wants = want if isinstance(want, tuple) else (want,)
    ok = any(type(value) is w for w in wants) or (float in wants and type(value) is int)
    if not ok:
        raise doc.error(where, table, key, f"key '{key}'", expected=" or ".join(_TYPE_NAMES[w] for w in wants),
                        got=value)


def _check_keys(doc: _Doc, where: str, table: tuple[Any, ...], obj: Mapping[str, Any],
                schema: Mapping[str, type | tuple[type, ...]], required: tuple[str, ...]) -> None:
    for key, value in obj.items():
        if key not in schema:
            raise doc.error(where, table, key, f"unknown key '{key}' (known keys: {', '.join(sorted(schema))})")
        _check_type(doc, where, table, key, value, schema[key])
    for key in required:
        if key not in obj:
            raise doc.error(where, table, key, f"missing required key '{key}'")


_SINK_KEYS: Final[Mapping[str, type | tuple[type, ...]]] = {"type": str, "topic": str, "url": str, "timeout_s": float}
_SINK_TYPE_KEYS: Final[Mapping[str, tuple[str, ...]]] = {"log": (), "mqtt": ("topic",), "webhook": ("url", "timeout_s")}
_RULE_KEYS: Final[Mapping[str, type | tuple[type, ...]]] = {
    "name": str, "metric": str, "op": str, "threshold": float, "for_s": float, "model": str, "severity": str,
    "retrain": bool, "sinks": list, "baseline": float, "min_samples": int}
_ACCURACY_ONLY: Final = ("baseline", "min_samples")


def _parse_sink(doc: _Doc, name: str, obj: object) -> Sink:
    table = ("sinks", name)
    where = f"[sinks.{name}]"
    if type(obj) is not dict:
        raise doc.error("", ("sinks",), name, f"sink '{name}'", expected="a table", got=obj)
    if not _NAME_RE.fullmatch(name):
        raise doc.error(where, table, None, f"sink name {name!r} is not a name", expected=_NAME_RE.pattern,
                        got=name)
    _check_keys(doc, where, table, obj, _SINK_KEYS, ("type",))
    kind = obj["type"]
    if kind not in SINK_TYPES:
        raise doc.error(where, table, "type", "key 'type'", expected=f"one of {', '.join(SINK_TYPES)}", got=kind)
    allowed = _SINK_TYPE_KEYS[kind]
    for key in obj:
        if key != "type" and key not in allowed:
            raise doc.error(where, table, key, f"key '{key}' does not apply to a {kind} sink"
                            + (f" (its keys: type, {', '.join(allowed)})" if allowed else " (its keys: type)"))
    topic = url = timeout = None
    if kind == "mqtt":
        if "topic" not in obj:
            raise doc.error(where, table, "topic", "missing required key 'topic' for an mqtt sink")
        topic = obj["topic"]
        if not topic or len(topic.encode()) > 65535 or any(c in topic for c in "+#\0") or topic.startswith("$"):
            raise doc.error(where, table, "topic", "key 'topic'",
                            expected="a topic to publish to (no + or # wildcards, no leading $)", got=topic)
    elif kind == "webhook":
        if "url" not in obj:
            raise doc.error(where, table, "url", "missing required key 'url' for a webhook sink")
        url = obj["url"]
        if not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", url):
            raise doc.error(where, table, "url", "key 'url'", expected="an http:// or https:// URL", got=url)
        if "timeout_s" in obj:
            timeout = float(obj["timeout_s"])
            if not 0.0 < timeout <= 300.0:
                raise doc.error(where, table, "timeout_s", "key 'timeout_s'", expected="seconds in (0, 300]",
                                got=obj["timeout_s"])
    return Sink(name, kind, topic, url, timeout)


def _parse_rule(doc: _Doc, i: int, obj: object, sinks: Mapping[str, Sink]) -> Rule:
    table = ("rule", i)
    name = obj.get("name") if type(obj) is dict else None
    where = f"[[rule]] #{i + 1}" + (f" ({name!r})" if type(name) is str else "")
    if type(obj) is not dict:
        raise doc.error(where, ("rule",), None, "a rule", expected="a table", got=obj)
    _check_keys(doc, where, table, obj, _RULE_KEYS, ("name", "metric", "op", "threshold"))
    if not _NAME_RE.fullmatch(name):  # type: ignore[arg-type]
        raise doc.error(where, table, "name", "key 'name'",
                        expected="1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit", got=name)
    metric = obj["metric"]
    if metric not in METRICS:
        raise doc.error(where, table, "metric", "key 'metric'", expected=f"one of {', '.join(METRICS)}", got=metric)
    op = obj["op"]
    if op not in OPS:
        raise doc.error(where, table, "op", "key 'op'", expected=f"one of {', '.join(OPS)}", got=op)
    threshold = float(obj["threshold"])
    lo, hi = _THRESHOLD_RANGES[metric]
    if not (math.isfinite(threshold) and lo <= threshold <= hi):
        raise doc.error(where, table, "threshold", f"key 'threshold' for {metric}",
                        expected=f"a number in [{lo:g}, {hi:g}]", got=obj["threshold"])
    for_s = float(obj.get("for_s", 0.0))
    if not (math.isfinite(for_s) and for_s >= 0.0):
        raise doc.error(where, table, "for_s", "key 'for_s'", expected="seconds >= 0", got=obj["for_s"])
    model = obj.get("model")
    if model is not None and not model.strip():
        raise doc.error(where, table, "model", "key 'model'", expected="a model name", got=model)
    severity = obj.get("severity", "warning")
    if severity not in SEVERITIES:
        raise doc.error(where, table, "severity", "key 'severity'", expected=f"one of {', '.join(SEVERITIES)}",
                        got=severity)
    rule_sinks = obj.get("sinks", [_DEFAULT_SINK])
    for s in rule_sinks:
        if type(s) is not str or s not in sinks:
            raise doc.error(where, table, "sinks", "key 'sinks'",
                            expected=f"names of sinks ({', '.join(sorted(sinks))})", got=s)
    if len(set(rule_sinks)) != len(rule_sinks):
        raise doc.error(where, table, "sinks", "key 'sinks'", expected="each sink once", got=rule_sinks)
    for key in _ACCURACY_ONLY:
        if key in obj and metric != "accuracy_drop":
            raise doc.error(where, table, key, f"key '{key}' applies to metric accuracy_drop only, not {metric}")
    baseline = None
    if "baseline" in obj:
        baseline = float(obj["baseline"])
        if not 0.0 <= baseline <= 1.0:
            raise doc.error(where, table, "baseline", "key 'baseline'", expected="an accuracy in [0, 1]",
                            got=obj["baseline"])
    min_samples = obj.get("min_samples", 1)
    if min_samples < 1:
        raise doc.error(where, table, "min_samples", "key 'min_samples'", expected="an integer >= 1",
                        got=min_samples)
    return Rule(name, metric, op, threshold, for_s, model, severity, obj.get("retrain", False), tuple(rule_sinks),
                baseline, min_samples, doc.line(table, "name"))


def _parse(doc: _Doc) -> RuleSet:
    data = doc.data
    for key, value in data.items():
        if key not in ("rule", "sinks"):
            raise doc.error("", (), key, f"unknown top-level key '{key}' (known: [[rule]], [sinks.NAME])")
        if key == "rule" and (type(value) is not list or not all(type(r) is dict for r in value)):
            raise doc.error("", (), key, "key 'rule'", expected="an array of tables ([[rule]])", got=value)
        if key == "sinks" and type(value) is not dict:
            raise doc.error("", (), key, "key 'sinks'", expected="a table of sinks ([sinks.NAME])", got=value)
    sinks = {name: _parse_sink(doc, name, obj) for name, obj in data.get("sinks", {}).items()}
    if _DEFAULT_SINK not in sinks:
        sinks[_DEFAULT_SINK] = Sink(_DEFAULT_SINK, "log")
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for i, obj in enumerate(data.get("rule", [])):
        rule = _parse_rule(doc, i, obj, sinks)
        if rule.name in seen:
            raise doc.error(f"[[rule]] #{i + 1} ({rule.name!r})", ("rule", i), "name",
                            f"rule name {rule.name!r} is already used by [[rule]] #{seen[rule.name] + 1}")
        seen[rule.name] = i
        rules.append(rule)
    return RuleSet(tuple(rules), MappingProxyType(sinks), doc.path)


def parse_rules(text: str, path: str = "<rules>") -> RuleSet:
    """Rules from TOML text; ``path`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = _TOML_LINE_RE.search(str(e))
        raise RulesError(f"not valid TOML: {e}", path=path, line=int(m.group(1)) if m else None) from e
    return _parse(_Doc(TomlDoc(path, text, data)))


def load_rules(path_or_text: str | Path) -> RuleSet:
    """Rules from a file (a :class:`~pathlib.Path`, or a string without ``=`` or newline) or from TOML text
    (a string with either)."""
    if isinstance(path_or_text, str) and ("\n" in path_or_text or "=" in path_or_text or not path_or_text):
        return parse_rules(path_or_text)
    path = Path(path_or_text)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RulesError(f"cannot read: {getattr(e, 'strerror', None) or e}", path=str(path)) from e
    return parse_rules(text, str(path))


# --------------------------------------------------------------------------------------------------
# Measuring.

def _device_models(row: Mapping[str, Any]) -> set[str]:
    return {r["model"] for r in row.get("running", ())} | set(row.get("pipelines", {}))


def measure(rule: Rule, fleet: FleetState, now_ms: int, cache: dict[str, Any] | None = None) -> dict[str, float]:
    """The rule's metric for every subject that has a value now: device id or ``"<model>@<version>"``."""
    cache = {} if cache is None else cache
    out: dict[str, float] = {}
    if rule.scope == "device":
        if "devices" not in cache:
            cache["devices"] = fleet.devices(now_ms)
        for row in cache["devices"]:
            if rule.model is not None and rule.model not in _device_models(row):
                continue
            if rule.metric == "offline_minutes":
                out[row["id"]] = float(row["offline_minutes"])
                continue
            if row["state"] != "online":
                continue
            src = row
            if rule.model is not None and rule.metric in _PIPELINE_METRICS:
                src = row["pipelines"].get(rule.model) or {}
            v = src.get(_ROW_KEYS[rule.metric])
            if v is not None:
                out[row["id"]] = float(v)
        return out
    if "models" not in cache:
        cache["models"] = fleet.models(now_ms)
    for kpi in cache["models"]:
        if rule.model is not None and kpi["model"] != rule.model:
            continue
        subject = f"{kpi['model']}@{kpi['version']}"
        if rule.metric == "drift_alarm_devices":
            out[subject] = float(kpi["drift_alarms"])
        elif rule.metric == "fleet_drift_score":
            if kpi["drift_score"] is not None:
                out[subject] = float(kpi["drift_score"])
        else:  # accuracy_drop, in percentage points
            acc = kpi["accuracy"]
            base = rule.baseline if rule.baseline is not None else kpi["reference_accuracy"]
            if base is not None and acc["accuracy"] is not None and acc["n"] >= rule.min_samples:
                out[subject] = round((base - acc["accuracy"]) * 100.0, 3)
    return out


# --------------------------------------------------------------------------------------------------
# Alerts.

# Alert lifecycle, one table: (state, event) -> next state.
#   waiting: the condition is true, but not yet for the rule's for_s
#   holds:   the condition is true and has been for for_s (at once when for_s is 0)
#   clear:   the condition is false, the subject has no value any more, or the rule was removed
#   ack:     a person acknowledged the alert
# "inactive" and "pending" are internal: no alert exists yet, nothing is reported. An alert is born
# "firing" (with its id), may be "acknowledged", and ends "resolved"; when the condition holds again
# later, a new alert with a new id starts from "inactive". A pair missing here is illegal.
_LIFECYCLE: Final[Mapping[tuple[str, str], str]] = {
    ("inactive", "waiting"): "pending",
    ("inactive", "holds"): "firing",
    ("inactive", "clear"): "inactive",
    ("pending", "waiting"): "pending",
    ("pending", "holds"): "firing",
    ("pending", "clear"): "inactive",
    ("firing", "waiting"): "firing",          # for_s raised by a rules reload: already firing
    ("firing", "holds"): "firing",
    ("firing", "clear"): "resolved",
    ("firing", "ack"): "acknowledged",
    ("acknowledged", "waiting"): "acknowledged",
    ("acknowledged", "holds"): "acknowledged",
    ("acknowledged", "clear"): "resolved",
}
_INTERNAL_STATES: Final = ("pending",)


def _fmt(v: float | None) -> str:
    return "no value" if v is None else f"{v:.4g}"


@dataclass(frozen=True)
class AlertTransition:
    """An alert changed state: ``before`` is None for a new alert. What sinks are told."""

    alert_id: str
    rule: str
    subject: str
    before: str | None
    after: str
    time_ms: int
    severity: str
    value: float | None
    threshold: float
    retrain: bool
    sinks: tuple[str, ...]
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"alert_id": self.alert_id, "rule": self.rule, "subject": self.subject, "before": self.before,
                "after": self.after, "time_ms": self.time_ms, "severity": self.severity, "value": self.value,
                "threshold": self.threshold, "retrain": self.retrain, "sinks": list(self.sinks),
                "message": self.message}


@dataclass(eq=False)
class _Alert:
    rule: str
    subject: str
    state: str
    since_ms: int                       # when the condition began to hold
    metric: str
    op: str
    threshold: float
    severity: str
    retrain: bool
    sinks: tuple[str, ...]
    value: float | None = None          # the last value for which the condition held
    started_ms: int | None = None       # when it fired
    id: str = ""
    acked_by: str | None = None
    acked_ms: int | None = None
    resolved_ms: int | None = None
    message: str = ""

    _FIELDS = ("id", "rule", "subject", "state", "severity", "value", "threshold", "started_ms", "acked_by",
               "acked_ms", "resolved_ms", "retrain", "message", "metric", "op", "since_ms", "sinks")

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self._FIELDS}
        d["sinks"] = list(self.sinks)
        return d

    @classmethod
    def from_dict(cls, d: object) -> _Alert:
        if not isinstance(d, dict):
            raise AlertError(f"alert state: expected an object, got {type(d).__name__}")
        try:
            a = cls(rule=_s(d["rule"]), subject=_s(d["subject"]), state=_s(d["state"]), since_ms=_i(d["since_ms"]),
                    metric=_s(d["metric"]), op=_s(d["op"]), threshold=_f(d["threshold"]), severity=_s(d["severity"]),
                    retrain=_b(d["retrain"]), sinks=tuple(_s(s) for s in d["sinks"]), value=_opt(_f, d.get("value")),
                    started_ms=_opt(_i, d.get("started_ms")), id=_s(d.get("id", "")),
                    acked_by=_opt(_s, d.get("acked_by")), acked_ms=_opt(_i, d.get("acked_ms")),
                    resolved_ms=_opt(_i, d.get("resolved_ms")), message=_s(d.get("message", "")))
        except (KeyError, TypeError) as e:
            raise AlertError(f"alert state: missing or malformed field ({e})", alert_id=str(d.get("id"))) from e
        if a.state not in (*ALERT_STATES, *_INTERNAL_STATES) or (a.state != "pending" and (not a.id or
                                                                                          a.started_ms is None)):
            raise AlertError(f"alert state: {a.state!r} alert {a.id!r} is not a stored state", alert_id=a.id)
        return a

    def transition(self, before: str | None, time_ms: int) -> AlertTransition:
        return AlertTransition(self.id, self.rule, self.subject, before, self.state, time_ms, self.severity, self.value,
                               self.threshold, self.retrain, self.sinks, self.message)


def _s(v: object) -> str:
    if type(v) is not str:
        raise TypeError(f"expected str, got {type(v).__name__}")
    return v


def _i(v: object) -> int:
    if type(v) is not int:
        raise TypeError(f"expected int, got {type(v).__name__}")
    return v


def _f(v: object) -> float:
    if type(v) not in (int, float):
        raise TypeError(f"expected a number, got {type(v).__name__}")
    return float(v)  # type: ignore[arg-type]


def _b(v: object) -> bool:
    if type(v) is not bool:
        raise TypeError(f"expected bool, got {type(v).__name__}")
    return v


def _opt(conv: Callable[[object], Any], v: object) -> Any:
    return None if v is None else conv(v)


class AlertManager:
    """Alerts of one rule set, keyed by (rule name, subject); at most one live alert per key.

    :meth:`evaluate` measures every rule against a fleet and moves alerts through ``_LIFECYCLE``;
    :meth:`ack` acknowledges one; :meth:`to_dict`/:meth:`from_dict` persist and reload the state (pending
    conditions included, so ``for_s`` keeps counting across a restart). Resolved alerts are kept for
    :meth:`alerts`, the oldest dropped past ``max_resolved``."""

    def __init__(self, ruleset: RuleSet, *, max_resolved: int = _MAX_RESOLVED) -> None:
        if max_resolved < 0:
            raise ValueError(f"max_resolved must be >= 0, got {max_resolved}")
        self.ruleset = ruleset
        self._live: dict[tuple[str, str], _Alert] = {}
        self._resolved: deque[_Alert] = deque(maxlen=max_resolved)
        self._ids: set[str] = set()

    # -- the lifecycle ---------------------------------------------------------------------------------

    def _move(self, alert: _Alert, event: str) -> str:
        nxt = _LIFECYCLE.get((alert.state, event))
        if nxt is None:
            raise AlertError(f"alert {alert.id or alert.rule + ':' + alert.subject} is {alert.state}: "
                             f"'{event}' is not allowed there", alert_id=alert.id or None)
        return nxt

    def _new_id(self, rule: str, subject: str, started_ms: int) -> str:
        base = f"{rule}:{subject}:{started_ms}"
        alert_id, n = base, 1
        while alert_id in self._ids:
            alert_id = f"{base}.{n}"
            n += 1
        return alert_id

    def _step(self, rule: Rule, subject: str, value: float | None, now_ms: int) -> AlertTransition | None:
        key = (rule.name, subject)
        alert = self._live.get(key)
        true = value is not None and rule.holds(value)
        if alert is None:
            if not true:
                return None
            alert = _Alert(rule.name, subject, "inactive", now_ms, rule.metric, rule.op, rule.threshold,
                           rule.severity, rule.retrain, rule.sinks)
        if not true:
            event = "clear"
        else:
            held_ms = now_ms - alert.since_ms
            event = "holds" if held_ms >= rule.for_s * 1000.0 else "waiting"
        before = alert.state
        alert.state = self._move(alert, event)
        if true:
            alert.value = value
        if alert.state == "inactive":
            self._live.pop(key, None)
            return None
        if alert.state == "pending":
            self._live[key] = alert
            return None
        if before in ("inactive", "pending") and alert.state == "firing":
            alert.started_ms = now_ms
            alert.id = self._new_id(rule.name, subject, now_ms)
            self._ids.add(alert.id)
            # What the rule said when it fired stays with the alert, even if the rules are reloaded.
            alert.threshold, alert.severity, alert.retrain, alert.sinks = (rule.threshold, rule.severity,
                                                                           rule.retrain, rule.sinks)
            alert.message = f"{rule.name}: {rule.metric} of {subject} is {_fmt(value)} ({rule.op} {rule.threshold:g})"
            self._live[key] = alert
            return alert.transition(None, now_ms)
        if alert.state == "resolved":
            alert.resolved_ms = now_ms
            alert.message = (f"{rule.name}: {rule.metric} of {subject} is {_fmt(value)}, no longer "
                             f"{rule.op} {rule.threshold:g}")
            self._retire(key, alert)
            return alert.transition(before, now_ms)
        return None

    def _retire(self, key: tuple[str, str], alert: _Alert) -> None:
        del self._live[key]
        self._keep(alert)

    def _keep(self, alert: _Alert) -> None:
        """Keep a resolved alert; past ``max_resolved`` the oldest is forgotten."""
        if len(self._resolved) == self._resolved.maxlen:
            self._ids.discard((self._resolved[0] if self._resolved else alert).id)
        self._resolved.append(alert)

    def evaluate(self, fleet: FleetState, now_ms: int) -> list[AlertTransition]:
        """Measure every rule now; the alerts that fired, or resolved, as transitions (rules in file order,
        subjects sorted)."""
        out: list[AlertTransition] = []
        cache: dict[str, Any] = {}
        live_by_rule: dict[str, set[str]] = {}
        for rule_name, subject in self._live:
            live_by_rule.setdefault(rule_name, set()).add(subject)
        for rule in self.ruleset.rules:
            values = measure(rule, fleet, now_ms, cache)
            for subject in sorted(set(values) | live_by_rule.pop(rule.name, set())):
                t = self._step(rule, subject, values.get(subject), now_ms)
                if t is not None:
                    out.append(t)
        for rule_name, subjects in sorted(live_by_rule.items()):   # rules no longer in the set
            for subject in sorted(subjects):
                alert = self._live[(rule_name, subject)]
                before = alert.state
                alert.state = self._move(alert, "clear")
                if alert.state == "inactive":
                    del self._live[(rule_name, subject)]
                    continue
                alert.resolved_ms = now_ms
                alert.message = f"{rule_name}: rule removed"
                self._retire((rule_name, subject), alert)
                out.append(alert.transition(before, now_ms))
        return out

    def ack(self, alert_id: str, by: str, now_ms: int) -> AlertTransition:
        """Acknowledge a firing alert; an unknown id, or an alert not firing, is an :class:`AlertError`."""
        if not isinstance(by, str) or not by.strip():
            raise AlertError(f"ack of {alert_id}: 'by' must name who acknowledges, got {by!r}", alert_id=alert_id)
        for alert in self._live.values():
            if alert.id == alert_id and alert.state != "pending":
                before = alert.state
                if before == "acknowledged":
                    raise AlertError(f"alert {alert_id} is already acknowledged by {alert.acked_by}",
                                     alert_id=alert_id)
                alert.state = self._move(alert, "ack")
                alert.acked_by = by
                alert.acked_ms = now_ms
                return alert.transition(before, now_ms)
        if any(a.id == alert_id for a in self._resolved):
            raise AlertError(f"alert {alert_id} is resolved: 'ack' is not allowed there", alert_id=alert_id)
        raise AlertError(f"no alert {alert_id}", alert_id=alert_id)

    # -- reading and persistence ---------------------------------------------------------------------

    def alerts(self, state: str | None = None) -> list[dict[str, Any]]:
        """Alerts (firing, acknowledged, then the kept resolved ones), oldest first, optionally of one state."""
        if state is not None and state not in ALERT_STATES:
            raise ValueError(f"state must be one of {ALERT_STATES} or None, got {state!r}")
        every = [a for a in self._live.values() if a.state != "pending"] + list(self._resolved)
        every.sort(key=lambda a: (a.started_ms or 0, a.id))
        return [a.to_dict() for a in every if state is None or a.state == state]

    def get(self, alert_id: str) -> dict[str, Any] | None:
        for a in (*self._live.values(), *self._resolved):
            if a.id == alert_id and a.state != "pending":
                return a.to_dict()
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"schema": ALERTS_SCHEMA, "live": [a.to_dict() for a in self._live.values()],
                "resolved": [a.to_dict() for a in self._resolved]}

    @classmethod
    def from_dict(cls, d: object, ruleset: RuleSet, *, max_resolved: int = _MAX_RESOLVED) -> AlertManager:
        """Reload :meth:`to_dict` output, with a rule set that may have changed since: alerts of rules that
        are gone resolve at the next :meth:`evaluate`."""
        if not isinstance(d, dict) or d.get("schema") != ALERTS_SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise AlertError(f"alert state: expected schema {ALERTS_SCHEMA!r}, got {got!r}")
        mgr = cls(ruleset, max_resolved=max_resolved)
        live, resolved = d.get("live", []), d.get("resolved", [])
        if not isinstance(live, list) or not isinstance(resolved, list):
            raise AlertError("alert state: 'live' and 'resolved' must be lists")
        for raw in live:
            a = _Alert.from_dict(raw)
            if a.state == "resolved":
                raise AlertError(f"alert state: live alert {a.id} is resolved", alert_id=a.id)
            key = (a.rule, a.subject)
            if key in mgr._live:
                raise AlertError(f"alert state: two live alerts for rule {a.rule!r} and {a.subject!r}", alert_id=a.id)
            mgr._live[key] = a
            if a.id:
                mgr._ids.add(a.id)
        for raw in resolved:
            a = _Alert.from_dict(raw)
            if a.state != "resolved":
                raise AlertError(f"alert state: resolved alert {a.id} is {a.state}", alert_id=a.id)
            mgr._ids.add(a.id)
            mgr._keep(a)
        return mgr
