"""The device side of model rollouts: one state table, version order, output status, shadow statistics.

Pure (h11's shape): events and ``now_ms`` go in, transitions and decisions come out. The agent owns the
downloads, the bundle checks, the sessions, the clock and the persistence file; this module decides
what is legal, remembers what it needs across a reboot (:meth:`RolloutMachine.to_dict`) and refuses
anything else with a :class:`RolloutError` whose ``reason`` is a short code (one of
:data:`ROLLOUT_ERROR_REASONS`) and whose ``detail`` says what was expected and what arrived.

Theory of operation. One rollout at a time: a ``start_download`` from a settled state (``idle``,
``active``, ``failed``, ``rolled_back``) names the rollout and its candidate bundle; the candidate is
downloaded, verified (signature, hashes, onnx checker, smoke run: the agent's job), then either run in
``shadow`` beside the serving model (compared, never acted on) and promoted, or activated directly when
the plan skips shadow. ``rollback`` returns to the model that served before the rollout; ``abort``
cancels a rollout that has not gone live and leaves the serving model as it was. Every pair not in
the table raises :class:`IllegalTransition`; nothing is ever a silent no-op.

| from | event | to | effect on the machine |
|---|---|---|---|
| idle, active, failed, rolled_back | `start_download` | downloading | new `rollout_id`, `candidate` (*) |
| downloading | `download_done` | verifying | |
| downloading | `download_failed` | failed | serving model unchanged |
| downloading | `abort` | idle | serving model unchanged |
| downloading | `resume` | downloading | after a reboot: download again (or continue a partial file) |
| verifying | `verified_shadow` | shadow | the candidate runs beside `active` (not yet counted as run) |
| verifying | `verified_activate` | active | the plan skips shadow: `active` := candidate; its version counts as run |
| verifying | `verify_failed` | failed | serving model unchanged |
| verifying | `abort` | idle | serving model unchanged |
| verifying | `resume` | verifying | after a reboot: verify again from the start (a half-done check proves nothing) |
| shadow | `promote` | active | `active` := candidate |
| shadow | `rollback` | rolled_back | the candidate stops; `active` unchanged |
| shadow | `abort` | idle | the candidate stops; `active` unchanged |
| shadow | `resume` | shadow | after a reboot: load the candidate beside `active` again |
| active | `rollback` | rolled_back | `active` := `previous` (the model that served before the rollout) |
| active | `resume` | active | after a reboot: serve the candidate again |

(*) and ``previous`` := ``active``. Refused with ``not_newer``, changing nothing, unless the candidate's
version is newer than every version of that model this device has run (anti-rollback, below).

Decisions:

- ``abort`` goes to ``idle``, not ``failed``: it is an operator's cancellation, not a verdict on the
  candidate, and the fleet counts ``failed`` against a bundle. ``idle`` is settled, so a new rollout may
  start from it. After ``abort``, ``failed`` and ``rolled_back`` the machine still names the last
  rollout and candidate, for status reports; ``start_download`` replaces them.
- ``rollback`` is legal only where the candidate runs (``shadow``, ``active``). From ``active`` it
  restores ``previous``, which anti-rollback allows: it is the model that served before, not a new
  rollout. With no previous model (the first model came by rollout) the device has none afterwards.
- Anti-rollback (``highest_run``, per model name, persisted): a version counts as run once it enters
  ``active`` (it served answers); a candidate must be strictly newer than the highest run version of
  its model, so a version that was activated and rolled back is never taken again (ship a new
  version). A version that only ran in ``shadow`` does not count: a shadow device that goes back to
  baseline may be a candidate for the same version at a later stage of the ramp. A different model
  name starts its own history. The initial model given to :class:`RolloutMachine` counts as run.
- Versions are integers (``"7"``) or semantic versions (``"1.2.0-rc.1"``, semver.org precedence, build
  metadata ignored). An integer ``N`` is the semantic version ``N.0.0``, so a model may move from
  integer to semantic versions (``"7"`` -> ``"8.0.0"``); ``"7"`` and ``"7.0.0"`` are equal, and neither is
  newer than the other.
- After a reboot the agent loads :meth:`RolloutMachine.from_dict_or_reset` and calls
  :meth:`RolloutMachine.resume`, which records a ``resume`` self-transition where a candidate is in
  flight or running and says what to do (:data:`RESUME_ACTIONS`).
- A persisted state that fails validation is reported, never raised past
  :meth:`RolloutMachine.from_dict_or_reset`: it gives a fresh ``idle`` machine that keeps whatever part of
  the anti-rollback record and the serving model still validates, and the problem as text.

The rest of the module: :func:`output_status` maps the automation level (1-5) to what an output is
(``shadow``, ``suggestion``, ``final``, ``pending_review``) and :class:`ReviewRule` says which outputs need
a human at level 4; :class:`ShadowStats` compares a shadow candidate with the serving model per batch
(vectorised, mergeable, compact on the wire); :class:`SelfCheck` is the device's own rollback rule after
activation (it flags, the agent acts).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import numpy as np

from edge_runtime.errors import EdgeRuntimeError

__all__ = [
    "AUTOMATION_LEVELS",
    "DEFAULT_MAX_CLASSES",
    "DELTA_EDGES",
    "EVENTS",
    "MAX_HISTORY",
    "MAX_REVIEW_CLASSES",
    "OUTPUT_STATUSES",
    "RESUME_ACTIONS",
    "ROLLOUT_ERROR_REASONS",
    "SCHEMA",
    "SETTLED_STATES",
    "SHADOW_SCHEMA",
    "STATES",
    "TRANSITIONS",
    "Candidate",
    "IllegalTransition",
    "ModelRef",
    "ReviewRule",
    "RolloutError",
    "RolloutMachine",
    "SelfCheck",
    "ShadowStats",
    "Transition",
    "Verdict",
    "VersionKey",
    "is_newer",
    "legal_events",
    "output_status",
    "parse_version",
]

SCHEMA: Final = "edge-runtime.rollout/1"
SHADOW_SCHEMA: Final = "edge-runtime.shadow/1"
MAX_HISTORY: Final = 32          # transitions kept (oldest dropped first)
MAX_TEXT: Final = 256            # characters of a transition's reason
MAX_VERSION_LEN: Final = 64
MAX_INT: Final = 2**63 - 1

ROLLOUT_ERROR_REASONS: Final = (
    "illegal_transition",  # the event is not legal in the current state
    "unknown_event",       # no such event
    "not_newer",           # anti-rollback: the candidate is not newer than a version this device has run
    "bad_version",         # not an integer or semantic version
    "bad_type",            # an argument or field has the wrong type
    "bad_value",           # right type, wrong value: empty, out of range, unknown key, mismatched lengths
    "bad_state",           # a persisted machine or statistics dict fails validation
)

STATES: Final = ("idle", "downloading", "verifying", "shadow", "active", "rolled_back", "failed")
SETTLED_STATES: Final = ("idle", "active", "failed", "rolled_back")
EVENTS: Final = ("start_download", "download_done", "download_failed", "verify_failed", "verified_shadow",
                 "verified_activate", "promote", "rollback", "abort", "resume")

# The one table of legal transitions: (state, event) -> next state. See the module docstring.
TRANSITIONS: Final[Mapping[tuple[str, str], str]] = {
    **{(s, "start_download"): "downloading" for s in SETTLED_STATES},
    ("downloading", "download_done"): "verifying",
    ("downloading", "download_failed"): "failed",
    ("downloading", "abort"): "idle",
    ("downloading", "resume"): "downloading",
    ("verifying", "verified_shadow"): "shadow",
    ("verifying", "verified_activate"): "active",
    ("verifying", "verify_failed"): "failed",
    ("verifying", "abort"): "idle",
    ("verifying", "resume"): "verifying",
    ("shadow", "promote"): "active",
    ("shadow", "rollback"): "rolled_back",
    ("shadow", "abort"): "idle",
    ("shadow", "resume"): "shadow",
    ("active", "rollback"): "rolled_back",
    ("active", "resume"): "active",
}

# What the agent does after a reboot, by the persisted state: "download" the candidate (again),
# "verify" it from the start, "shadow" it beside the serving model, or just "serve" ``active``.
RESUME_ACTIONS: Final[Mapping[str, str]] = {
    "idle": "serve", "downloading": "download", "verifying": "verify", "shadow": "shadow",
    "active": "serve", "rolled_back": "serve", "failed": "serve",
}

_DETAILS: Final[Mapping[str, tuple[str, ...]]] = {"start_download": ("rollout_id", "name", "version", "sha256")}

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_INT_VERSION_RE = re.compile(r"[0-9]+")
# semver.org's regular expression, ASCII digits only.
_SEMVER_RE = re.compile(
    r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?")


def legal_events(state: str) -> tuple[str, ...]:
    """The events legal in ``state``, in :data:`EVENTS` order."""
    return tuple(e for e in EVENTS if (state, e) in TRANSITIONS)


# -- errors ----------------------------------------------------------------------------------------------

class RolloutError(EdgeRuntimeError):
    """A rollout input was refused. ``reason`` is one of :data:`ROLLOUT_ERROR_REASONS`; ``detail`` says
    what was expected and what arrived; ``model`` and ``version`` are filled in where one is concerned."""

    def __init__(self, reason: str, detail: str = "", *, model: str | None = None,
                 version: str | None = None) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
        self.model = model
        self.version = version

    def __str__(self) -> str:
        msg = f"{self.reason}: {self.detail}" if self.detail else self.reason
        if self.model is not None:
            msg += f" [model {self.model}" + (f" version {self.version}]" if self.version is not None else "]")
        return msg


class IllegalTransition(RolloutError):
    """``event`` is not legal in ``state``; ``legal`` lists the events that are."""

    def __init__(self, state: str, event: str) -> None:
        self.state = state
        self.event = event
        self.legal = legal_events(state)
        known = event in EVENTS
        detail = (f"event {event!r} is not legal in state {state!r}" if known
                  else f"unknown event {event!r} (events: {', '.join(EVENTS)})")
        super().__init__("illegal_transition" if known else "unknown_event",
                         f"{detail}; legal in {state!r}: {', '.join(self.legal) or 'nothing'}")


# -- value checks ----------------------------------------------------------------------------------------

# What a malformed dict can make validation code raise besides RolloutError (e.g. an unhashable value).
_MALFORMED: Final = (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError)


def _jtype(v: object) -> str:
    if v is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "object",
            tuple: "list"}.get(type(v), type(v).__name__)


def _clip(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[:n] + "..."


def _int(v: object, name: str, lo: int = 0, hi: int = MAX_INT) -> int:
    if isinstance(v, np.integer):
        v = int(v)
    if type(v) is not int:  # type(): True is not 1
        raise RolloutError("bad_type", f"{name} is {_jtype(v)}, expected int")
    if not lo <= v <= hi:
        raise RolloutError("bad_value", f"{name} is {v}, expected {lo}..{hi}")
    return v


def _float(v: object, name: str) -> float:
    if isinstance(v, np.floating | np.integer):
        v = v.item()
    if type(v) not in (int, float):
        raise RolloutError("bad_type", f"{name} is {_jtype(v)}, expected a number")
    f = float(v)  # type: ignore[arg-type]
    if not math.isfinite(f):
        raise RolloutError("bad_value", f"{name} is {f}, expected a finite number")
    return f


def _bool(v: object, name: str) -> bool:
    if type(v) is not bool:
        raise RolloutError("bad_type", f"{name} is {_jtype(v)}, expected bool")
    return v


def _text(v: object, name: str, max_len: int = MAX_TEXT) -> str:
    if type(v) is not str:
        raise RolloutError("bad_type", f"{name} is {_jtype(v)}, expected str")
    if len(v) > max_len:
        raise RolloutError("bad_value", f"{name} is {len(v)} characters, expected at most {max_len}")
    return v


def _ident(v: object, name: str) -> str:
    if type(v) is not str:
        raise RolloutError("bad_type", f"{name} is {_jtype(v)}, expected str")
    if _ID_RE.fullmatch(v) is None:
        raise RolloutError("bad_value", f"{name} {_clip(v)!r} is not an id ({_ID_RE.pattern})")
    return v


def _dict(v: object, name: str, keys: Iterable[str], required: Iterable[str] = ()) -> Mapping[str, Any]:
    if type(v) is not dict:
        raise RolloutError("bad_type", f"{name} is {_jtype(v)}, expected object")
    unknown = sorted(set(v) - set(keys), key=str)
    if unknown:
        raise RolloutError("bad_value", f"{name} has unknown key {unknown[0]!r} (expected {', '.join(keys)})")
    for k in required:
        if k not in v:
            raise RolloutError("bad_value", f"{name} lacks {k!r}")
    return v


def _list(v: object, name: str, max_len: int | None = None) -> list[Any]:
    if type(v) is not list:
        raise RolloutError("bad_type", f"{name} is {_jtype(v)}, expected list")
    if max_len is not None and len(v) > max_len:
        raise RolloutError("bad_value", f"{name} has {len(v)} entries, expected at most {max_len}")
    return v


# -- versions --------------------------------------------------------------------------------------------

# (major, minor, patch, pre): pre is (1,) for a release, else (0, *identifiers) with each identifier
# (0, number) or (1, text), so that tuple order is semver precedence.
VersionKey: TypeAlias = tuple[int, int, int, tuple[Any, ...]]


def parse_version(v: str | int) -> VersionKey:
    """A comparable key for an integer version (``7``, ``"7"``: the same as ``"7.0.0"``) or a semantic
    version (``"1.2.0"``, ``"1.2.0-rc.1"``; build metadata ``+...`` is ignored, as semver says).

    Raises :class:`RolloutError` ``bad_version`` for anything else (``"1.2"``, ``"v1.2.0"``, ``"01.2.3"``,
    negative or boolean numbers, more than 64 characters)."""
    if type(v) is int:
        if v < 0:
            raise RolloutError("bad_version", f"version {v} is negative, expected an integer >= 0")
        return (v, 0, 0, (1,))
    if type(v) is not str:
        raise RolloutError("bad_version", f"version is {_jtype(v)}, expected str or int")
    if len(v) > MAX_VERSION_LEN:
        raise RolloutError("bad_version", f"version is {len(v)} characters, expected at most {MAX_VERSION_LEN}")
    if _INT_VERSION_RE.fullmatch(v):
        return (int(v), 0, 0, (1,))
    m = _SEMVER_RE.fullmatch(v)
    if m is None:
        raise RolloutError("bad_version", f"version {v!r} is not an integer (\"7\") or a semantic version "
                                          "(\"1.2.0\", \"1.2.0-rc.1\")")
    major, minor, patch, pre, _build = m.groups()
    pre_key: tuple[Any, ...] = (1,) if pre is None else (0, *((0, int(p)) if p.isdigit() else (1, p)
                                                             for p in pre.split(".")))
    return (int(major), int(minor), int(patch), pre_key)


def is_newer(candidate: str | int, than: str | int | None) -> bool:
    """Whether ``candidate`` has higher precedence than ``than`` (``None``: nothing to be newer than)."""
    key = parse_version(candidate)
    return than is None or key > parse_version(than)


def _version(v: object, name: str) -> str:
    """A version as the string kept and sent (an int becomes its decimal digits), validated."""
    if type(v) is int:
        parse_version(v)
        return str(v)
    if type(v) is not str:
        raise RolloutError("bad_type", f"{name} is {_jtype(v)}, expected str or int")
    parse_version(v)
    return v


# -- models and transitions ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelRef:
    """A model by name and version (``version`` is kept as given: ``"7"``, ``"1.2.0"``)."""

    name: str
    version: str

    def __post_init__(self) -> None:
        _ident(self.name, "name")
        object.__setattr__(self, "version", _version(self.version, "version"))

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}

    @classmethod
    def from_dict(cls, d: object, name: str = "model") -> ModelRef:
        o = _dict(d, name, ("name", "version"), ("name", "version"))
        return cls(o["name"], o["version"])


@dataclass(frozen=True)
class Candidate:
    """The bundle a rollout brings: model name, version and the sha256 of its manifest (hex, lower case)."""

    name: str
    version: str
    sha256: str

    def __post_init__(self) -> None:
        _ident(self.name, "name")
        object.__setattr__(self, "version", _version(self.version, "version"))
        if type(self.sha256) is not str:
            raise RolloutError("bad_type", f"sha256 is {_jtype(self.sha256)}, expected str")
        if _SHA256_RE.fullmatch(self.sha256) is None:
            raise RolloutError("bad_value", f"sha256 {_clip(self.sha256)!r} is not 64 lower-case hex digits")

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.version)

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: object, name: str = "candidate") -> Candidate:
        o = _dict(d, name, ("name", "version", "sha256"), ("name", "version", "sha256"))
        return cls(o["name"], o["version"], o["sha256"])


@dataclass(frozen=True)
class Transition:
    """One step of the machine, as kept in its history."""

    from_state: str
    to_state: str
    event: str
    reason: str
    time_ms: int

    def to_list(self) -> list[Any]:
        return [self.from_state, self.to_state, self.event, self.reason, self.time_ms]

    @classmethod
    def from_list(cls, v: object, name: str = "transition") -> Transition:
        items = _list(v, name)
        if len(items) != 5:
            raise RolloutError("bad_value", f"{name} has {len(items)} items, expected 5 "
                                            "[from, to, event, reason, time_ms]")
        src, dst, event, reason, time_ms = items
        if src not in STATES or dst not in STATES:
            raise RolloutError("bad_value", f"{name} names unknown state {src if src not in STATES else dst!r}")
        if TRANSITIONS.get((src, event)) != dst:
            raise RolloutError("bad_value", f"{name} {src} --{event}--> {dst} is not in the table")
        return cls(src, dst, event, _text(reason, f"{name}.reason"), _int(time_ms, f"{name}.time_ms"))


# -- the machine -----------------------------------------------------------------------------------------

class RolloutMachine:
    """The device's rollout state (see the module docstring for the table and what each event does).

    ``active`` serves outputs; ``candidate`` is the bundle of the current (or last) rollout and runs beside
    ``active`` in ``shadow``; ``previous`` is what ``rollback`` returns to from ``active``; ``highest_run``
    maps each model name to the highest version this device has run (anti-rollback). Mutated only by
    :meth:`apply` (and :meth:`resume`), which changes nothing when it raises."""

    def __init__(self, active: ModelRef | None = None) -> None:
        if active is not None and not isinstance(active, ModelRef):
            raise RolloutError("bad_type", f"active is {_jtype(active)}, expected ModelRef or None")
        self.state = "idle"
        self.rollout_id: str | None = None
        self.candidate: Candidate | None = None
        self.active: ModelRef | None = active
        self.previous: ModelRef | None = None
        self.highest_run: dict[str, str] = {} if active is None else {active.name: active.version}
        self.reason = ""
        self.history: deque[Transition] = deque(maxlen=MAX_HISTORY)

    def __repr__(self) -> str:
        return (f"RolloutMachine(state={self.state!r}, rollout_id={self.rollout_id!r}, "
                f"candidate={self.candidate!r}, active={self.active!r})")

    # -- queries

    @property
    def legal_events(self) -> tuple[str, ...]:
        return legal_events(self.state)

    def can(self, event: str) -> bool:
        return (self.state, event) in TRANSITIONS

    @property
    def since_ms(self) -> int | None:
        """When the current state was entered (the last transition's time); ``None`` before any."""
        return self.history[-1].time_ms if self.history else None

    @property
    def shadow_model(self) -> ModelRef | None:
        """The model to run in shadow now, if any."""
        return self.candidate.ref if self.state == "shadow" and self.candidate is not None else None

    def check_candidate(self, name: str, version: str | int) -> None:
        """Raise ``not_newer`` unless ``version`` is newer than every version of ``name`` run here."""
        highest = self.highest_run.get(name)
        if not is_newer(version, highest):
            raise RolloutError("not_newer", f"version {version} is not newer than {highest}, the highest version "
                                            f"of {name} this device has run (anti-rollback)",
                               model=name, version=str(version))

    # -- transitions

    def apply(self, event: str, *, reason: str, now_ms: int, **details: Any) -> Transition:
        """Apply ``event``; return the transition (also appended to :attr:`history`).

        ``start_download`` takes ``rollout_id``, ``name``, ``version`` and ``sha256``; other events take no
        details. Raises :class:`IllegalTransition` when the table has no ``(state, event)``, and
        :class:`RolloutError` for bad arguments or an older candidate; the machine is then unchanged."""
        if type(event) is not str:
            raise RolloutError("bad_type", f"event is {_jtype(event)}, expected str")
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise IllegalTransition(self.state, event)
        reason = _text(reason, "reason")
        now_ms = _int(now_ms, "now_ms")
        allowed = _DETAILS.get(event, ())
        unknown = sorted(set(details) - set(allowed))
        if unknown:
            takes = f"details {', '.join(allowed)}" if allowed else "no details"
            raise RolloutError("bad_value", f"{event} takes {takes}, got {', '.join(unknown)}")
        missing = [k for k in allowed if k not in details]
        if missing:
            raise RolloutError("bad_value", f"{event} needs {', '.join(missing)}")

        rollout_id, candidate, active, previous = self.rollout_id, self.candidate, self.active, self.previous
        highest = self.highest_run
        if event == "start_download":
            rollout_id = _ident(details["rollout_id"], "rollout_id")
            candidate = Candidate(details["name"], details["version"], details["sha256"])
            self.check_candidate(candidate.name, candidate.version)
            previous = self.active
        elif event in ("verified_shadow", "verified_activate", "promote"):
            if candidate is None:  # every state past start_download has one (checked on load)
                raise RolloutError("bad_state", f"state {self.state!r} without a candidate")
            if nxt == "active":
                active = candidate.ref
                if is_newer(candidate.version, highest.get(candidate.name)):
                    highest = {**highest, candidate.name: candidate.version}
        elif event == "rollback" and self.state == "active":
            active = previous

        t = Transition(self.state, nxt, event, reason, now_ms)
        self.state, self.rollout_id, self.candidate = nxt, rollout_id, candidate
        self.active, self.previous, self.highest_run = active, previous, highest
        self.reason = reason
        self.history.append(t)
        return t

    def resume(self, *, now_ms: int, reason: str = "reboot") -> str:
        """After a reboot: record a ``resume`` self-transition where the state has one, and return what the
        agent must do now (:data:`RESUME_ACTIONS`: ``download``, ``verify``, ``shadow`` or ``serve``)."""
        if self.can("resume"):
            self.apply("resume", reason=reason, now_ms=now_ms)
        return RESUME_ACTIONS[self.state]

    # -- persistence

    def to_dict(self) -> dict[str, Any]:
        """The versioned, JSON-ready state (:data:`SCHEMA`)."""
        return {
            "schema": SCHEMA, "state": self.state, "rollout_id": self.rollout_id,
            "candidate": None if self.candidate is None else self.candidate.to_dict(),
            "active": None if self.active is None else self.active.to_dict(),
            "previous": None if self.previous is None else self.previous.to_dict(),
            "highest_run": dict(sorted(self.highest_run.items())),
            "reason": self.reason,
            "history": [t.to_list() for t in self.history],
        }

    @classmethod
    def from_dict(cls, d: object) -> RolloutMachine:
        """Validate a persisted state; raise :class:`RolloutError` ``bad_state`` naming the first problem."""
        try:
            return cls._from_dict(d)
        except RolloutError as e:
            raise RolloutError("bad_state", f"persisted rollout state: {e.detail or e.reason}") from None
        except _MALFORMED as e:
            raise RolloutError("bad_state", f"persisted rollout state: {type(e).__name__}: {_clip(str(e), 200)}"
                               ) from None

    @classmethod
    def from_dict_or_reset(cls, d: object) -> tuple[RolloutMachine, str | None]:
        """``(machine, None)`` for a valid state; else ``(fresh idle machine, problem)``. The fresh machine
        keeps the anti-rollback entries and the serving model that still validate on their own, so a
        corrupt file never reopens the door to an old version."""
        try:
            return cls._from_dict(d), None
        except RolloutError as e:
            problem = f"persisted rollout state: {e.detail or e.reason}"
        except _MALFORMED as e:
            problem = f"persisted rollout state: {type(e).__name__}: {_clip(str(e), 200)}"
        m = cls()
        if isinstance(d, dict):
            with contextlib.suppress(RolloutError, *_MALFORMED):
                m.active = ModelRef.from_dict(d.get("active"), "active")
            hr = d.get("highest_run")
            if isinstance(hr, dict):
                for name, version in hr.items():
                    try:
                        m.highest_run[_ident(name, "model name")] = _version(version, "version")
                    except (RolloutError, *_MALFORMED):
                        continue
            if m.active is not None and is_newer(m.active.version, m.highest_run.get(m.active.name)):
                m.highest_run[m.active.name] = m.active.version
        return m, problem

    @classmethod
    def _from_dict(cls, d: object) -> RolloutMachine:
        o = _dict(d, "state", ("schema", "state", "rollout_id", "candidate", "active", "previous", "highest_run",
                               "reason", "history"),
                  ("schema", "state", "highest_run", "history"))
        if o["schema"] != SCHEMA:
            raise RolloutError("bad_value", f"schema is {_clip(repr(o['schema']))}, expected {SCHEMA!r}")
        state = o["state"]
        if state not in STATES:
            raise RolloutError("bad_value", f"state {_clip(repr(state))} is not one of {', '.join(STATES)}")
        m = cls()
        m.state = state
        m.rollout_id = None if o.get("rollout_id") is None else _ident(o["rollout_id"], "rollout_id")
        m.candidate = None if o.get("candidate") is None else Candidate.from_dict(o["candidate"])
        m.active = None if o.get("active") is None else ModelRef.from_dict(o["active"], "active")
        m.previous = None if o.get("previous") is None else ModelRef.from_dict(o["previous"], "previous")
        hr = o["highest_run"]
        if type(hr) is not dict:
            raise RolloutError("bad_type", f"highest_run is {_jtype(hr)}, expected object")
        m.highest_run = {_ident(k, "highest_run key"): _version(v, f"highest_run[{k}]") for k, v in hr.items()}
        m.reason = _text(o.get("reason", ""), "reason")
        history = _list(o["history"], "history", MAX_HISTORY)
        m.history.extend(Transition.from_list(t, f"history[{i}]") for i, t in enumerate(history))

        # Invariants that apply() keeps; a state breaking one was not written by this machine.
        if m.history and m.history[-1].to_state != state:
            raise RolloutError("bad_value", f"state is {state!r} but the last transition went to "
                                            f"{m.history[-1].to_state!r}")
        if m.history and m.history[-1].reason != m.reason:
            raise RolloutError("bad_value", "reason differs from the last transition's")
        if state != "idle" and (m.candidate is None or m.rollout_id is None):
            raise RolloutError("bad_value", f"state {state!r} needs a rollout_id and a candidate")
        if (m.candidate is None) != (m.rollout_id is None):
            raise RolloutError("bad_value", "rollout_id and candidate come together")
        c = m.candidate
        if state == "active" and (c is None or m.active != c.ref):
            raise RolloutError("bad_value", f"state 'active' but active {m.active} is not the candidate {c}")
        if c is not None and state in ("downloading", "verifying", "shadow") and not is_newer(
                c.version, m.highest_run.get(c.name)):
            raise RolloutError("bad_value", f"candidate {c.name} {c.version} is not newer than "
                                            f"highest_run {m.highest_run.get(c.name)}")
        if c is not None and state == "active" and is_newer(c.version, m.highest_run.get(c.name)):
            raise RolloutError("bad_value", f"candidate {c.name} {c.version} runs but highest_run says "
                                            f"{m.highest_run.get(c.name)}")
        return m


# -- output status by automation level ---------------------------------------------------------------------

AUTOMATION_LEVELS: Final[Mapping[int, str]] = {
    1: "human-led", 2: "human-led, machine-supported", 3: "machine-led, human-supported",
    4: "machine-led, human-governed", 5: "machine-controlled",
}
OUTPUT_STATUSES: Final = ("shadow", "suggestion", "final", "pending_review")


def output_status(level: int, *, shadow: bool, needs_review: bool) -> str:
    """What one output is, given the automation level and whether it came from a shadow model.

    | level | output |
    |---|---|
    | any, from a shadow model | `shadow` |
    | 1 human-led | `shadow` (recorded, never final) |
    | 2 human-led, machine-supported | `suggestion` |
    | 3 machine-led, human-supported | `final` |
    | 4 machine-led, human-governed | `pending_review` when ``needs_review`` (see :class:`ReviewRule`), else `final` |
    | 5 machine-controlled | `final` |

    ``needs_review`` matters at level 4 only: at 1-2 a human decides anyway, at 3 and 5 nobody is asked."""
    level = _int(level, "level", 1, 5)
    shadow = _bool(shadow, "shadow")
    needs_review = _bool(needs_review, "needs_review")
    if shadow or level == 1:
        return "shadow"
    if level == 2:
        return "suggestion"
    if level == 4 and needs_review:
        return "pending_review"
    return "final"


MAX_REVIEW_CLASSES: Final = 256


@dataclass(frozen=True)
class ReviewRule:
    """Which outputs a human must review (level 4): a top score below ``min_score`` (low confidence), or a
    label in ``classes``. A missing or non-finite score counts as low confidence when ``min_score`` is set.
    Built from config by :meth:`from_dict` (``{"min_score": 0.6, "classes": [3, "cat"]}``, both optional;
    ``{}`` reviews nothing)."""

    min_score: float | None = None
    classes: frozenset[int | str] = frozenset()

    def __post_init__(self) -> None:
        if self.min_score is not None:
            object.__setattr__(self, "min_score", _float(self.min_score, "min_score"))
        object.__setattr__(self, "classes", _review_classes(self.classes))

    def matches(self, label: int | str | None, score: float | None) -> bool:
        """Whether this output needs review."""
        if self.min_score is not None and (score is None or not score >= self.min_score):  # NaN: review
            return True
        return label is not None and label in self.classes

    def mask(self, labels: Any, scores: Any) -> np.ndarray:
        """:meth:`matches` for a batch: a boolean array, one per output."""
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        lab = np.asarray(labels).reshape(-1)
        if lab.shape != s.shape:
            raise RolloutError("bad_value", f"{lab.size} labels for {s.size} scores")
        out = np.zeros(s.shape, dtype=bool)
        if self.min_score is not None:
            out |= ~(s >= self.min_score)  # NaN: review
        if self.classes and lab.size:
            if lab.dtype.kind in "iuU":
                kind = str if lab.dtype.kind == "U" else int
                listed = [c for c in self.classes if type(c) is kind]
                if listed:
                    out |= np.isin(lab, np.asarray(listed))
            else:
                out |= np.fromiter((v in self.classes for v in lab.tolist()), dtype=bool, count=lab.size)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"min_score": self.min_score,
                "classes": sorted(self.classes, key=lambda c: (isinstance(c, str), c))}

    @classmethod
    def from_dict(cls, d: object) -> ReviewRule:
        o = _dict(d, "review rule", ("min_score", "classes"))
        ms = o.get("min_score")
        classes = _list(o.get("classes", []), "classes", MAX_REVIEW_CLASSES)
        return cls(None if ms is None else _float(ms, "min_score"), _review_classes(classes))


def _review_classes(v: Iterable[Any]) -> frozenset[int | str]:
    classes = list(v)
    if len(classes) > MAX_REVIEW_CLASSES:
        raise RolloutError("bad_value", f"classes has {len(classes)} entries, expected at most {MAX_REVIEW_CLASSES}")
    for c in classes:
        if type(c) not in (int, str):
            raise RolloutError("bad_type", f"class {_clip(repr(c))} is {_jtype(c)}, expected int or str")
    return frozenset(classes)


# -- shadow comparison statistics ------------------------------------------------------------------------

DELTA_EDGES: Final = (-0.5, -0.2, -0.1, -0.05, -0.02, 0.02, 0.05, 0.1, 0.2, 0.5)
DEFAULT_MAX_CLASSES: Final = 64

# Latency buckets: HdrHistogram's log-linear layout (as edge_runtime.core.histogram) with 8 buckets per
# power of two instead of 128: a quantile is within about 6% of the sample, and a histogram spanning ten
# powers of two costs 80 counts on the wire instead of 1280.
_LAT_SUB_BITS: Final = 3
_LAT_SUB: Final = 1 << _LAT_SUB_BITS
_LAT_MAX_BITS: Final = 43
_LAT_N: Final = (_LAT_MAX_BITS - _LAT_SUB_BITS + 1) * _LAT_SUB
_LAT_MAX: Final = (1 << _LAT_MAX_BITS) - 1


def _lat_index(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0, _LAT_MAX)
    bits = np.frexp(v.astype(np.float64))[1]  # the bit length, exact below 2**53
    shift = np.maximum(bits - _LAT_SUB_BITS - 1, 0)
    return np.where(v < _LAT_SUB, v, (shift + 1) * _LAT_SUB + (v >> shift) - _LAT_SUB)


def _lat_bounds(i: int) -> tuple[int, int]:
    if i < 2 * _LAT_SUB:
        return i, 1
    shift = i // _LAT_SUB - 1
    return (_LAT_SUB + i % _LAT_SUB) << shift, 1 << shift


def _labels(x: Any, name: str) -> np.ndarray:
    """A 1-D label array of int64 or str."""
    a = np.asarray(x).reshape(-1)
    if a.size == 0:
        return a.astype(np.int64)
    if a.dtype.kind in "iu":
        return a.astype(np.int64, copy=False)
    if a.dtype.kind == "U":
        return a
    if a.dtype.kind == "O":
        kinds = {type(v) for v in a.tolist()}
        if kinds <= {int}:
            return a.astype(np.int64)
        if kinds <= {str}:
            return a.astype(str)
    raise RolloutError("bad_type", f"{name} are {a.dtype}, expected integer class ids or strings")


class ShadowStats:
    """The shadow candidate against the serving model, per batch: agreement of top-1 labels, confusion
    (serving label by candidate label, over the first ``max_classes`` labels seen, the rest as "other"),
    score delta (candidate minus serving top score: mean, standard deviation, histogram on
    :data:`DELTA_EDGES`), candidate latency (one value per candidate run; p50/p99 from fixed buckets) and
    candidate errors.

    ``a.merge(b)`` equals the statistics of a's samples followed by b's: counts, agreement, histograms and
    latency exactly; moments up to rounding; the class numbering and confusion exactly unless b, past its
    cap, put into "other" a label that a names (b's "other" cannot be split again). ``to_dict`` is
    versioned (:data:`SHADOW_SCHEMA`) and compact: under 2 KB for ten classes."""

    def __init__(self, max_classes: int = DEFAULT_MAX_CLASSES) -> None:
        self.max_classes = _int(max_classes, "max_classes", 1, 1024)
        self.n = 0            # samples compared
        self.agree = 0        # samples with the same top-1 label
        self.errors = 0       # samples the candidate failed on (not in n)
        self.nonfinite = 0    # compared samples whose score delta is NaN or infinite
        self.classes: list[int | str] = []
        self._index: dict[int | str, int] = {}
        k = self.max_classes + 1
        self._confusion = np.zeros((k, k), dtype=np.int64)
        self._mean = 0.0
        self._m2 = 0.0
        self._delta_hist = np.zeros(len(DELTA_EDGES) + 1, dtype=np.int64)
        self._lat = np.zeros(_LAT_N, dtype=np.int64)
        self.lat_n = 0
        self.lat_min = 0
        self.lat_max = 0

    # -- updates

    def update_batch(self, active_labels: Any, active_scores: Any, candidate_labels: Any, candidate_scores: Any,
                     latency_ns: Any = None) -> None:
        """Add one batch: four arrays of one entry per sample, and the candidate's latency (an int or an
        array of ints, one per candidate run; ``None``: not measured)."""
        al = _labels(active_labels, "active labels")
        cl = _labels(candidate_labels, "candidate labels")
        a_s = np.asarray(active_scores, dtype=np.float64).reshape(-1)
        c_s = np.asarray(candidate_scores, dtype=np.float64).reshape(-1)
        n = al.size
        if not cl.size == a_s.size == c_s.size == n:
            raise RolloutError("bad_value", f"batch arrays differ in length: {n} active labels, {a_s.size} "
                                            f"active scores, {cl.size} candidate labels, {c_s.size} candidate scores")
        if n and (al.dtype.kind == "U") != (cl.dtype.kind == "U"):
            raise RolloutError("bad_type", f"active labels are {al.dtype}, candidate labels {cl.dtype}: expected "
                                           "one kind")
        lat = None if latency_ns is None else self._latencies(latency_ns)
        if n:
            self._update_labels(al, cl)
            d = c_s - a_s
            ok = np.isfinite(d)
            d = d[ok]
            self.nonfinite += int(n - d.size)
            if d.size:
                self._add_moments(d.size, float(d.mean()), float(((d - d.mean()) ** 2).sum()))
                self._delta_hist += np.bincount(np.searchsorted(DELTA_EDGES, d, side="right"),
                                                minlength=len(DELTA_EDGES) + 1)
            self.n += n
        if lat is not None and lat.size:
            self._add_latency(np.bincount(_lat_index(lat), minlength=_LAT_N), lat.size, int(lat.min()),
                              int(lat.max()))

    def add_errors(self, n: int = 1) -> None:
        """Count ``n`` samples that the candidate failed on."""
        self.errors += _int(n, "n")

    @staticmethod
    def _latencies(x: Any) -> np.ndarray:
        a = np.asarray(x).reshape(-1)
        if a.dtype.kind == "f":
            if not np.isfinite(a).all():
                raise RolloutError("bad_value", "latency_ns has NaN or infinite values")
            a = np.rint(a)
        elif a.dtype.kind not in "iu":
            raise RolloutError("bad_type", f"latency_ns is {a.dtype}, expected integer nanoseconds")
        return np.clip(a, 0, _LAT_MAX).astype(np.int64)

    def _update_labels(self, al: np.ndarray, cl: np.ndarray) -> None:
        self.agree += int(np.count_nonzero(al == cl))
        # Classes are numbered in order of first appearance (sample by sample, serving label first), so
        # that batch boundaries and merges give the same numbering as one long stream.
        both = np.empty(2 * al.size, dtype=al.dtype if al.dtype.kind != "U" else np.result_type(al, cl))
        both[0::2], both[1::2] = al, cl
        uniq, first, inverse = np.unique(both, return_index=True, return_inverse=True)
        other = self.max_classes
        code = np.empty(uniq.size, dtype=np.int64)
        for u in np.argsort(first, kind="stable"):
            label: int | str = uniq[u].item()
            i = self._index.get(label)
            if i is None and len(self.classes) < self.max_classes:
                i = self._index[label] = len(self.classes)
                self.classes.append(label)
            code[u] = other if i is None else i
        codes = code[inverse.reshape(-1)]
        k = self.max_classes + 1
        self._confusion += np.bincount(codes[0::2] * k + codes[1::2], minlength=k * k).reshape(k, k)

    def _add_moments(self, n_b: int, mean_b: float, m2_b: float) -> None:
        """Fold in ``n_b`` finite deltas with mean ``mean_b`` and sum of squared deviations ``m2_b`` (Chan et
        al.: stable for partial sums of any size). Call before ``_delta_hist`` counts them."""
        n_a = int(self._delta_hist.sum())
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean += delta * n_b / n
        self._m2 += m2_b + delta * delta * n_a * n_b / n

    def _add_latency(self, counts: np.ndarray, n: int, lo: int, hi: int) -> None:
        self._lat += counts
        self.lat_min = lo if self.lat_n == 0 else min(self.lat_min, lo)
        self.lat_max = hi if self.lat_n == 0 else max(self.lat_max, hi)
        self.lat_n += n

    # -- results

    @property
    def delta_n(self) -> int:
        """Samples with a finite score delta."""
        return self.n - self.nonfinite

    @property
    def agreement_rate(self) -> float:
        return self.agree / self.n if self.n else math.nan

    @property
    def error_rate(self) -> float:
        """Failed samples over attempted ones (compared plus failed)."""
        tried = self.n + self.errors
        return self.errors / tried if tried else math.nan

    @property
    def delta_mean(self) -> float:
        return self._mean if self.delta_n else math.nan

    @property
    def delta_std(self) -> float:
        return math.sqrt(max(self._m2, 0.0) / self.delta_n) if self.delta_n else math.nan

    @property
    def delta_hist(self) -> tuple[int, ...]:
        """Counts of deltas below ``DELTA_EDGES[0]``, in each ``[edge, next edge)``, and from the last edge up."""
        return tuple(int(c) for c in self._delta_hist)

    def confusion(self) -> dict[tuple[int | str | None, int | str | None], int]:
        """Non-zero cells ``{(serving label, candidate label): count}``; ``None`` stands for "other" (labels
        past the first ``max_classes``)."""
        names: list[int | str | None] = [*self.classes, *[None] * (self.max_classes + 1 - len(self.classes))]
        rows, cols = np.nonzero(self._confusion)
        return {(names[i], names[j]): int(self._confusion[i, j])
                for i, j in zip(rows.tolist(), cols.tolist(), strict=True)}

    def latency_quantile_ns(self, q: float) -> float:
        """Candidate latency at quantile ``q``: the midpoint of the bucket holding that rank, clamped to the
        exact minimum and maximum (NaN before any latency)."""
        if not 0.0 <= q <= 1.0:
            raise RolloutError("bad_value", f"quantile is {q}, expected 0..1")
        if self.lat_n == 0:
            return math.nan
        rank = max(1, math.ceil(q * self.lat_n))
        i = int(np.searchsorted(np.cumsum(self._lat), rank))
        lo, width = _lat_bounds(i)
        return float(min(max(lo + (width - 1) / 2.0, self.lat_min), self.lat_max))

    def summary(self) -> dict[str, Any]:
        """The headline numbers, for logs and dashboards."""
        def r(v: float, nd: int) -> float | None:
            return None if math.isnan(v) else round(v, nd)

        return {"n": self.n, "agreement_rate": r(self.agreement_rate, 4), "delta_mean": r(self.delta_mean, 4),
                "delta_std": r(self.delta_std, 4), "latency_p50_ms": r(self.latency_quantile_ns(0.5) / 1e6, 3),
                "latency_p99_ms": r(self.latency_quantile_ns(0.99) / 1e6, 3), "errors": self.errors,
                "error_rate": r(self.error_rate, 4)}

    # -- merge

    def copy(self) -> ShadowStats:
        return ShadowStats.from_dict(self.to_dict())

    def merge(self, other: ShadowStats) -> ShadowStats:
        """A new :class:`ShadowStats` of this one's samples followed by ``other``'s (neither is changed)."""
        out = self.copy()
        out += other
        return out

    def __iadd__(self, other: ShadowStats) -> ShadowStats:
        if not isinstance(other, ShadowStats):
            return NotImplemented
        if other.max_classes != self.max_classes:
            raise RolloutError("bad_value", f"cannot merge statistics capped at {other.max_classes} classes into "
                                            f"ones capped at {self.max_classes}")
        other_cap = other.max_classes
        mapping = np.full(other_cap + 1, self.max_classes, dtype=np.int64)
        for j, label in enumerate(other.classes):
            i = self._index.get(label)
            if i is None and len(self.classes) < self.max_classes:
                i = self._index[label] = len(self.classes)
                self.classes.append(label)
            if i is not None:
                mapping[j] = i
        np.add.at(self._confusion, (mapping[:, None], mapping[None, :]), other._confusion)
        if other.delta_n:
            self._add_moments(other.delta_n, other._mean, other._m2)
        self._delta_hist += other._delta_hist
        self.n += other.n
        self.agree += other.agree
        self.errors += other.errors
        self.nonfinite += other.nonfinite
        if other.lat_n:
            self._add_latency(other._lat, other.lat_n, other.lat_min, other.lat_max)
        return self

    # -- serialisation

    def to_dict(self) -> dict[str, Any]:
        """Compact, versioned, JSON-ready. The confusion is a flat list of ``row, column, count`` triples
        over class indices (``max_classes`` is "other"); latency counts run from bucket ``lo``."""
        rows, cols = np.nonzero(self._confusion)
        cells = np.column_stack([rows, cols, self._confusion[rows, cols]]).reshape(-1).tolist()
        nz = np.flatnonzero(self._lat)
        lo = int(nz[0]) if nz.size else 0
        hi = int(nz[-1]) + 1 if nz.size else 0
        return {
            "schema": SHADOW_SCHEMA, "max_classes": self.max_classes, "n": self.n, "agree": self.agree,
            "errors": self.errors, "nonfinite": self.nonfinite, "classes": list(self.classes),
            "confusion": cells,
            "delta": {"mean": self._mean, "m2": self._m2, "hist": self._delta_hist.tolist()},
            "latency": {"n": self.lat_n, "min": self.lat_min, "max": self.lat_max, "lo": lo,
                        "counts": self._lat[lo:hi].tolist()},
        }

    @classmethod
    def from_dict(cls, d: object) -> ShadowStats:
        """Validate a statistics dict (as received: nothing trusted); raise :class:`RolloutError`
        ``bad_state`` naming the first problem."""
        try:
            return cls._from_dict(d)
        except RolloutError as e:
            raise RolloutError("bad_state", f"shadow statistics: {e.detail or e.reason}") from None
        except _MALFORMED as e:
            raise RolloutError("bad_state", f"shadow statistics: {type(e).__name__}: {_clip(str(e), 200)}") from None

    @classmethod
    def _from_dict(cls, d: object) -> ShadowStats:
        keys = ("schema", "max_classes", "n", "agree", "errors", "nonfinite", "classes", "confusion", "delta",
                "latency")
        o = _dict(d, "statistics", keys, keys)
        if o["schema"] != SHADOW_SCHEMA:
            raise RolloutError("bad_value", f"schema is {_clip(repr(o['schema']))}, expected {SHADOW_SCHEMA!r}")
        s = cls(_int(o["max_classes"], "max_classes", 1, 1024))
        s.n = _int(o["n"], "n")
        s.agree = _int(o["agree"], "agree", 0, s.n)
        s.errors = _int(o["errors"], "errors")
        s.nonfinite = _int(o["nonfinite"], "nonfinite", 0, s.n)
        classes = _list(o["classes"], "classes", s.max_classes)
        for c in classes:
            if type(c) not in (int, str):
                raise RolloutError("bad_type", f"class {_clip(repr(c))} is {_jtype(c)}, expected int or str")
        if len(set(classes)) != len(classes):
            raise RolloutError("bad_value", "classes has duplicates")
        s.classes = list(classes)
        s._index = {c: i for i, c in enumerate(classes)}
        cells = _list(o["confusion"], "confusion")
        if len(cells) % 3:
            raise RolloutError("bad_value", f"confusion has {len(cells)} numbers, expected triples")
        named = len(classes)
        for t in range(0, len(cells), 3):
            i = _int(cells[t], "confusion row", 0, s.max_classes)
            j = _int(cells[t + 1], "confusion column", 0, s.max_classes)
            if named <= i < s.max_classes or named <= j < s.max_classes:
                raise RolloutError("bad_value", f"confusion cell ({i}, {j}) names a class index past the "
                                                f"{named} classes")
            s._confusion[i, j] += _int(cells[t + 2], "confusion count")
        if int(s._confusion.sum()) != s.n:
            raise RolloutError("bad_value", f"confusion counts add up to {int(s._confusion.sum())}, n is {s.n}")
        diag = int(np.trace(s._confusion))
        other_cell = int(s._confusion[s.max_classes, s.max_classes])
        if not diag - other_cell <= s.agree <= diag:
            raise RolloutError("bad_value", f"agree is {s.agree}, the confusion's diagonal allows "
                                            f"{diag - other_cell}..{diag}")
        delta = _dict(o["delta"], "delta", ("mean", "m2", "hist"), ("mean", "m2", "hist"))
        s._mean = _float(delta["mean"], "delta.mean")
        s._m2 = _float(delta["m2"], "delta.m2")
        if s._m2 < 0:
            raise RolloutError("bad_value", f"delta.m2 is {s._m2}, expected >= 0")
        hist = _list(delta["hist"], "delta.hist")
        if len(hist) != len(DELTA_EDGES) + 1:
            raise RolloutError("bad_value", f"delta.hist has {len(hist)} bins, expected {len(DELTA_EDGES) + 1}")
        s._delta_hist = np.array([_int(c, "delta.hist count") for c in hist], dtype=np.int64)
        if int(s._delta_hist.sum()) != s.delta_n:
            raise RolloutError("bad_value", f"delta.hist adds up to {int(s._delta_hist.sum())}, expected "
                                            f"n - nonfinite = {s.delta_n}")
        lat = _dict(o["latency"], "latency", ("n", "min", "max", "lo", "counts"), ("n", "min", "max", "lo", "counts"))
        s.lat_n = _int(lat["n"], "latency.n")
        s.lat_min = _int(lat["min"], "latency.min", 0, _LAT_MAX)
        s.lat_max = _int(lat["max"], "latency.max", s.lat_min, _LAT_MAX)
        lo = _int(lat["lo"], "latency.lo", 0, _LAT_N)
        counts = _list(lat["counts"], "latency.counts", _LAT_N - lo)
        s._lat[lo:lo + len(counts)] = [_int(c, "latency count") for c in counts]
        if int(s._lat.sum()) != s.lat_n:
            raise RolloutError("bad_value", f"latency counts add up to {int(s._lat.sum())}, latency.n is {s.lat_n}")
        return s


# -- the device's own rollback rule ----------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """What :class:`SelfCheck` decided: ``action`` is ``ok`` or ``rollback``; ``reason`` is a short code
    (``healthy``, ``too_few_samples``, ``error_rate``, ``latency_p99``); ``detail`` gives the numbers."""

    action: str
    reason: str
    detail: str

    @property
    def rollback(self) -> bool:
        return self.action == "rollback"


@dataclass(frozen=True)
class SelfCheck:
    """After activation, the device rolls back by itself when the new model fails more than
    ``max_error_rate`` of its inputs or its p99 latency exceeds ``max_p99_ms`` (``None``: no latency
    limit), once it has seen ``min_samples`` inputs. It flags; the agent applies ``rollback``."""

    max_error_rate: float
    max_p99_ms: float | None
    min_samples: int

    def __post_init__(self) -> None:
        rate = _float(self.max_error_rate, "max_error_rate")
        if not 0.0 <= rate <= 1.0:
            raise RolloutError("bad_value", f"max_error_rate is {rate}, expected 0..1")
        object.__setattr__(self, "max_error_rate", rate)
        if self.max_p99_ms is not None:
            p99 = _float(self.max_p99_ms, "max_p99_ms")
            if p99 <= 0:
                raise RolloutError("bad_value", f"max_p99_ms is {p99}, expected > 0")
            object.__setattr__(self, "max_p99_ms", p99)
        _int(self.min_samples, "min_samples", 1)

    @classmethod
    def from_dict(cls, d: object) -> SelfCheck:
        keys = ("max_error_rate", "max_p99_ms", "min_samples")
        o = _dict(d, "self check", keys, ("max_error_rate", "min_samples"))
        return cls(o["max_error_rate"], o.get("max_p99_ms"), o["min_samples"])

    def to_dict(self) -> dict[str, Any]:
        return {"max_error_rate": self.max_error_rate, "max_p99_ms": self.max_p99_ms,
                "min_samples": self.min_samples}

    def decide(self, inputs: int, errors: int, p99_ms: float | None) -> Verdict:
        """Judge the counts since activation: ``inputs`` attempted, ``errors`` of them failed, candidate p99
        latency in ms (``None`` or NaN: not measured yet). Errors are judged before latency."""
        inputs = _int(inputs, "inputs")
        errors = _int(errors, "errors", 0, inputs)
        if p99_ms is not None:
            if isinstance(p99_ms, np.floating | np.integer):
                p99_ms = p99_ms.item()
            if type(p99_ms) not in (int, float):
                raise RolloutError("bad_type", f"p99_ms is {_jtype(p99_ms)}, expected a number or None")
        if inputs < self.min_samples:
            return Verdict("ok", "too_few_samples", f"{inputs} of {self.min_samples} inputs seen")
        rate = errors / inputs
        if rate > self.max_error_rate:
            return Verdict("rollback", "error_rate", f"{errors} errors in {inputs} inputs ({rate:.2%}) > "
                                                      f"{self.max_error_rate:.2%}")
        if (self.max_p99_ms is not None and p99_ms is not None and not math.isnan(p99_ms)
                and p99_ms > self.max_p99_ms):
            return Verdict("rollback", "latency_p99", f"p99 {p99_ms:.3g} ms > {self.max_p99_ms:.3g} ms")
        return Verdict("ok", "healthy", f"{errors} errors in {inputs} inputs; p99 "
                                        f"{'n/a' if p99_ms is None or math.isnan(p99_ms) else f'{p99_ms:.3g} ms'}")
