"""Model rollouts, the cloud's side: a plan and a bundle in, one order per device out, and the fleet's
reports judged by the planner (:mod:`cloud_sync.planner`) every second.

:class:`RolloutService` belongs to the :class:`~cloud_sync.hub.Hub`, whose lock guards it. ``start``
checks a plan and a bundle against the fleet, publishes the bundle (:mod:`cloud_sync.distribute`) and
orders every targeted device into its first role; ``tick`` reads the fleet view, asks each running
:class:`~cloud_sync.planner.Rollout` what to do and turns its decisions into orders; people approve,
reject, pause, resume and roll back. Every rollout is stored (the store's ``rollouts`` table, the
planner's ``to_dict`` with what this service adds) after every change, and reloaded at start.

Orders. One retained :class:`~edge_runtime.core.protocol.Command` (action ``rollout``) per device on
``edge/v1/<device_id>/cmd/rollout``, with ``params`` ``rollout_id``, ``model``, ``role`` (``shadow``,
``candidate`` or ``baseline``), ``bundle`` (``bundle_id``, ``name``, ``version``, ``sha256``, ``size``),
``previous_version``, ``level`` and ``review`` (when the plan has a [review]). A device gets a new order,
``command_id`` ``<rollout_id>.<seq>``, only when its role changes. A rollout that ends leaves its last
orders retained: the fleet's desired state. An order the transport did not take (its publish returned
False: no connection) is sent on the next tick; :meth:`RolloutService.resend` (the service calls it on
every connect) sends every device's newest order again and publishes again the bundles of rollouts not
over or done, because a broker without persistence forgets retained messages when it restarts. Devices
apply orders idempotently by ``command_id``; the same file gives the same bundle messages.

Targeting. A device is targeted when it runs the plan's model (its status or its metric snapshots
say so) and its status carries every tag of the plan's ``target.tags`` (``edge-runtime run --tag``). The
planner observes online devices only: their roles come from its
assignment over them; a known device that is offline or stale gets the role its rank gives over every
targeted device, and is reassigned when it is back.

Reports. Every metric snapshot carries the pipeline's ``rollout`` object (FleetState rows:
``pipelines.<model>.rollout``). What the planner is told a device's role is:

- the reported role, when the report names this rollout;
- ``failed`` when the device reported a ``rollout_refused`` or ``rollout_failed`` event for this rollout
  (it would not or could not take the candidate, and stayed on the version it had);
- ``baseline`` when it serves the previous version and is not shadowing or fetching for another
  rollout (a device without a rollout already does what a baseline order asks);
- otherwise ``pending``.

Samples are the reported ones (predictions since the device took its role), less what the device had
counted when the stage began where its role carried over into the stage (a candidate of the 10 % step
is still one at 50 %). Gate metrics are those of the version the role runs: a shadow device's shadow
statistics (agreement, its p99 and error rate), a candidate's or baseline device's pipeline p99 and
error rate when the pipeline reports that version; drift scores and label accuracy per version come from
the fleet view (a shadow device's drift is its inputs', shared with the active model), and each
version's fleet KPIs from :meth:`~cloud_sync.planner.VersionStats.from_fleet_row`.

Notifications. A decision the planner flags (a request for approval always; advances and rollbacks at
the levels that notify) goes to the hub's log and to the MQTT and webhook sinks of its rules file.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cloud_sync import planner as pl
from edge_runtime.core import protocol as p
from edge_runtime.errors import BundleError

if TYPE_CHECKING:
    from cloud_sync.hub import Hub

__all__ = [
    "ACTIVE_STATES",
    "SERVICE_SCHEMA",
    "TERMINAL_STATES",
    "BundlePublishError",
    "RolloutConflict",
    "RolloutService",
]

log = logging.getLogger(__name__)

SERVICE_SCHEMA: Final = "cloud-sync.rollout-service/1"
# Planner states in which a rollout still moves devices; the others leave their last orders in place.
ACTIVE_STATES: Final = ("running", "waiting_approval", "paused", "rolling_back")
TERMINAL_STATES: Final = ("done", "rolled_back", "failed")
_FAILED_EVENTS: Final = ("rollout_refused", "rollout_failed")
_MAX_LOG: Final = 200
_MAX_MANIFEST_BYTES: Final = 1 << 20
_MAX_REFERENCE_BYTES: Final = 32 << 20
_SLUG_RE: Final = re.compile(r"[^A-Za-z0-9_.-]+")
_MAX_SLUG: Final = 40       # rollout ids stay short enough for "<rollout_id>.<seq>" command ids (64)

Publish = Callable[[str, bytes, int, bool], Any]


class RolloutConflict(pl.RolloutError):
    """Another rollout is moving the same devices (one ``cmd/rollout`` topic per device), or a
    rollout of the same model is starting."""


class BundlePublishError(pl.RolloutError):
    """The bundle could not be published to the broker; nothing was ordered."""


# --------------------------------------------------------------------------------------------------
# Reading bundles and fleet rows.

def _tar_member(tar_path: Path, name: str, max_bytes: int) -> bytes | None:
    """One regular file of a tar (``name`` or ``./name``), without extracting anything; None if absent."""
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for m in tar:
                if m.name in (name, f"./{name}") and m.isfile():
                    if m.size > max_bytes:
                        raise BundleError("bad_manifest", f"{name} is {m.size} bytes, at most {max_bytes}",
                                          bundle=str(tar_path))
                    f = tar.extractfile(m)
                    return None if f is None else f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BundleError("truncated_archive", f"not a readable tar archive: {e}", bundle=str(tar_path)) from e
    return None


def _bundle_manifest(tar_path: Path) -> dict[str, Any]:
    raw = _tar_member(tar_path, "manifest.json", _MAX_MANIFEST_BYTES)
    if raw is None:
        raise BundleError("not_a_bundle", "the archive holds no manifest.json", bundle=str(tar_path))
    try:
        manifest = json.loads(raw)
        name, version = manifest["name"], manifest["version"]
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError("bad_manifest", f"manifest.json has no usable name and version ({e})",
                          bundle=str(tar_path)) from e
    if not isinstance(name, str) or not name or not isinstance(version, str | int) or isinstance(version, bool):
        raise BundleError("bad_manifest", f"manifest.json name {name!r} and version {version!r}: expected strings",
                          bundle=str(tar_path))
    return dict(manifest, version=str(version))


def _tags_of(row: Mapping[str, Any]) -> frozenset[str]:
    tags = row.get("tags")
    return frozenset(str(t) for t in tags) if isinstance(tags, list | tuple) else frozenset()


def _models_of(row: Mapping[str, Any]) -> set[str]:
    return {str(m.get("name")) for m in row.get("models") or ()} | {str(r.get("model"))
                                                                    for r in row.get("running") or ()}


def _serving(row: Mapping[str, Any], model: str) -> str | None:
    """The version of ``model`` the device serves: its newest snapshot's, else its status's active one."""
    pipe = (row.get("pipelines") or {}).get(model) or {}
    if isinstance(pipe.get("model_version"), str):
        return str(pipe["model_version"])
    for m in row.get("models") or ():
        if m.get("name") == model and m.get("state") == "active":
            return str(m.get("version"))
    return None


def _unit(v: object) -> float | None:
    """A fraction in [0, 1] as reported, else None (the planner refuses anything else)."""
    if type(v) in (int, float) and 0.0 <= v <= 1.0:  # type: ignore[operator]
        return float(v)  # type: ignore[arg-type]
    return None


def _nonneg(v: object) -> float | None:
    if type(v) in (int, float) and 0.0 <= v < float("inf"):  # type: ignore[operator]
        return float(v)  # type: ignore[arg-type]
    return None


def _count(v: object) -> int:
    return v if type(v) is int and v >= 0 else 0


def _version_key(v: str) -> tuple[Any, ...] | None:
    from edge_runtime.core.rollout import RolloutError as VersionError
    from edge_runtime.core.rollout import parse_version

    try:
        return parse_version(v)
    except VersionError:
        return None


# --------------------------------------------------------------------------------------------------
# One rollout as this service keeps it.

@dataclass(eq=False)
class _Entry:
    rollout: pl.Rollout
    manifest: p.BundleManifest
    started_by: str
    tar_path: str
    seq: int = 0
    commands: dict[str, dict[str, Any]] = field(default_factory=dict)   # device -> command_id, role, issued_ms
    marks: dict[str, list[int]] = field(default_factory=dict)           # device -> [since_ms, samples] at stage start
    log: list[dict[str, Any]] = field(default_factory=list)
    gates: list[dict[str, Any]] = field(default_factory=list)           # gate results of the latest judgement
    last: dict[str, Any] | None = None                                  # the latest evaluation's decisions
    withdrawn: bool = False
    # The previous version's KPIs as last seen while devices still served it: at a 100 % step none does,
    # and the fleet no longer scores it (kept in memory; a restarted cloud learns them anew).
    previous_kpis: pl.VersionStats | None = None

    @property
    def id(self) -> str:
        return self.rollout.rollout_id

    def note(self, now_ms: int, text: str) -> None:
        self.log.append({"time_ms": now_ms, "message": text})
        del self.log[:-_MAX_LOG]

    def to_payload(self) -> dict[str, Any]:
        return {"schema": SERVICE_SCHEMA, "rollout": self.rollout.to_dict(),
                "manifest": self.manifest.to_wire().decode(), "started_by": self.started_by,
                "tar_path": self.tar_path, "seq": self.seq, "commands": self.commands, "marks": self.marks,
                "log": self.log, "gates": self.gates, "last": self.last, "withdrawn": self.withdrawn}

    @classmethod
    def from_payload(cls, d: Any) -> _Entry:
        if not isinstance(d, dict) or d.get("schema") != SERVICE_SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise pl.RolloutError(f"stored rollout: expected schema {SERVICE_SCHEMA!r}, got {got!r}")
        try:
            e = cls(pl.Rollout.from_dict(d["rollout"]), p.BundleManifest.from_wire(d["manifest"].encode()),
                    str(d["started_by"]), str(d["tar_path"]), int(d["seq"]),
                    {str(k): dict(v) for k, v in d["commands"].items()},
                    {str(k): [int(x) for x in v] for k, v in d["marks"].items()},
                    list(d["log"]), list(d["gates"]), d["last"], bool(d["withdrawn"]))
        except (KeyError, TypeError, ValueError, AttributeError, p.ProtocolError) as err:
            stored = d.get("rollout")
            rid = stored.get("rollout_id") if isinstance(stored, dict) else None
            raise pl.RolloutError(f"stored rollout: missing or malformed field ({err})",
                                  rollout_id=rid if isinstance(rid, str) else None) from err
        if e.manifest.name != e.rollout.candidate.name or e.manifest.sha256 != e.rollout.candidate.sha256:
            raise pl.RolloutError("stored rollout: its bundle manifest is not its candidate's", rollout_id=e.id)
        return e


# --------------------------------------------------------------------------------------------------

class RolloutService:
    """The rollouts of one hub (see the module docstring).

    ``publish(topic, payload, qos, retain)`` sends orders (a result of False means not sent: tried again
    on the next tick). ``transport`` and ``window`` (a :class:`cloud_sync.distribute.PublishWindow` wired
    as the transport's ``on_publish_result``) publish bundles; without a transport the bundle's manifest
    is computed and the file is left in ``bundles_dir`` as ``<bundle_id>.tar`` for devices that fetch
    bundles from a shared directory. ``bundles_dir`` also holds the archives made from bundle
    directories. ``clock`` returns seconds, like :func:`time.time`."""

    def __init__(self, hub: Hub, publish: Publish | None, *, transport: Any = None, window: Any = None,
                 bundles_dir: str | Path | None = None, clock: Callable[[], float] = time.time,
                 chunk_size: int | None = None, publish_timeout_s: float = 30.0) -> None:
        if transport is not None and window is None:
            raise ValueError("a bundle transport needs its PublishWindow (wired as its on_publish_result)")
        self.hub = hub
        self.publish = publish
        self.transport = transport
        self.window = window
        self.clock = clock
        self.chunk_size = chunk_size
        self.publish_timeout_s = publish_timeout_s
        self.bundles_dir = Path(bundles_dir) if bundles_dir else Path(tempfile.gettempdir()) / "cloud-sync-bundles"
        self.counters = {"orders_sent": 0, "orders_unsent": 0, "notifications": 0, "evaluation_failures": 0}
        self._entries: dict[str, _Entry] = {}
        self._latest: dict[str, str] = {}          # device -> the rollout whose order it holds (the newest)
        self._unsent: set[str] = set()              # devices whose newest order still has to go out
        self._reserved: dict[str, set[str]] = {}    # rollout id -> devices, while its bundle is being published
        self._bundle_lock = threading.Lock()        # one bundle publish or withdrawal at a time
        self._resend_all = False
        self._republishing = False
        self._load()

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- persistence -----------------------------------------------------------------------------------

    def _load(self) -> None:
        for row in self.hub.store.rollouts():
            try:
                e = _Entry.from_payload(row["payload"])
            except pl.RolloutError as err:
                log.error("stored rollout %s not usable, left as it is: %s", row["id"], err)
                continue
            self._entries[e.id] = e
            if e.rollout.state in (*ACTIVE_STATES, "done"):
                self._register_candidate(e, quiet=True)
        newest: dict[str, tuple[int, str]] = {}
        for e in self._entries.values():
            for device, c in e.commands.items():
                key = (int(c["issued_ms"]), e.id)
                if device not in newest or key > newest[device]:
                    newest[device] = key
        self._latest = {d: rid for d, (_, rid) in newest.items()}
        active = [e.id for e in self._entries.values() if e.rollout.state in ACTIVE_STATES]
        if self._entries:
            log.info("rollouts reloaded: %d (%d active: %s)", len(self._entries), len(active), ", ".join(active) or "-")

    def _save(self, e: _Entry, now_ms: int) -> None:
        self.hub.store.upsert_rollout(e.id, state=e.rollout.state, payload=e.to_payload(), updated_ms=now_ms)

    # -- starting ----------------------------------------------------------------------------------------

    def start(self, plan_path_or_text: pl.Plan | str | Path, bundle_path: str | Path, *, by: str) -> dict[str, Any]:
        """Start a rollout of ``bundle_path`` (a bundle ``.tar``, or a bundle directory, archived into
        ``bundles_dir``) under the plan (a :class:`~cloud_sync.planner.Plan`, a file or TOML text); its view
        (:meth:`detail`). Raises :class:`~cloud_sync.planner.PlanError`
        for the plan, :class:`~edge_runtime.errors.BundleError` for the bundle,
        :class:`~cloud_sync.planner.RolloutError` when the fleet does not fit (no device targeted, a version
        not newer than the fleet's), :class:`RolloutConflict` and :class:`BundlePublishError`."""
        if not isinstance(by, str) or not by.strip() or by == pl.PLANNER:
            raise pl.RolloutError(f"'by' must name the person starting the rollout, got {by!r}")
        plan = plan_path_or_text if isinstance(plan_path_or_text, pl.Plan) else pl.load_plan(plan_path_or_text)
        tar = self._tar_of(Path(bundle_path))
        bundle = _bundle_manifest(tar)
        if bundle["name"] != plan.model:
            raise pl.RolloutError(f"bundle {tar} is model {bundle['name']!r}, the plan {plan.name!r} rolls out "
                                  f"{plan.model!r}")
        if _version_key(bundle["version"]) is None:
            raise pl.RolloutError(f"bundle version {bundle['version']!r} is neither an integer nor a semantic version")
        with self.hub.lock:
            now = self.now_ms()
            rows = self.hub.fleet.devices(now)
            targeted = self._targeted(plan, rows)
            if not targeted:
                if plan.target_tags:
                    raise pl.RolloutError(f"plan {plan.name!r} targets tags {list(plan.target_tags)}: no device "
                                          f"running {plan.model} has them all (devices report tags with "
                                          "`edge-runtime run --tag`)")
                raise pl.RolloutError(f"no device runs {plan.model}: nothing to roll out to")
            ids = {r["id"] for r in targeted}
            self._check_free(plan.model, ids)
            previous = self._previous_version(plan.model, bundle["version"], targeted)
            rollout_id = self._new_id(plan)
            self._reserved[rollout_id] = ids | {f"model:{plan.model}"}
        try:
            manifest = self._publish_bundle(tar, bundle)
            with self.hub.lock:
                now = max(self.now_ms(), now)
                rollout = pl.Rollout(plan, rollout_id, pl.Bundle(manifest.name, manifest.version, manifest.sha256,
                                                                 manifest.size), previous, now_ms=now)
                e = _Entry(rollout, manifest, by.strip(), str(tar))
                e.note(now, f"started by {e.started_by}: {plan.model} {previous} -> {manifest.version} on "
                            f"{len(ids)} device(s), bundle {manifest.bundle_id} ({manifest.size} bytes)"
                            + ("" if self.transport is not None else f", not published: devices fetch "
                               f"{manifest.bundle_id}.tar from {self.bundles_dir}"))
                self._entries[rollout_id] = e
                self._register_candidate(e)
                self._after(e, [], now, force_save=True)
                for old in list(self._entries.values()):
                    if old is not e and old.rollout.plan.model == plan.model and old.rollout.state == "done":
                        self._withdraw(old, now, f"superseded by {rollout_id}")
                log.info("rollout %s started by %s: %s %s -> %s", rollout_id, e.started_by, plan.model, previous,
                         manifest.version)
                return self.detail(rollout_id)
        finally:
            with self.hub.lock:
                self._reserved.pop(rollout_id, None)

    def _tar_of(self, path: Path) -> Path:
        if path.is_dir():
            raw = (path / "manifest.json").read_bytes() if (path / "manifest.json").is_file() else None
            if raw is None:
                raise BundleError("not_a_bundle", "no manifest.json in the directory", bundle=str(path))
            import hashlib

            from edge_runtime import bundle as bundles

            try:
                m = json.loads(raw)
                stem = _SLUG_RE.sub("_", f"{m['name']}-{m['version']}")[:80]
            except (ValueError, KeyError, TypeError) as e:
                raise BundleError("bad_manifest", f"manifest.json has no usable name and version ({e})",
                                  bundle=str(path)) from e
            self.bundles_dir.mkdir(parents=True, exist_ok=True)
            out = self.bundles_dir / f"{stem}-{hashlib.sha256(raw).hexdigest()[:12]}.tar"
            if not out.is_file():  # the same manifest makes the same (deterministic) archive
                bundles._write_tar(path, out)
            return out
        if not path.is_file():
            raise BundleError("not_a_bundle", "no such file or directory", bundle=str(path))
        if not tarfile.is_tarfile(path):
            raise BundleError("truncated_archive", "not a tar archive", bundle=str(path))
        # A copy the service owns: republishing after a restart must not depend on where the file came from.
        self.bundles_dir.mkdir(parents=True, exist_ok=True)
        from edge_runtime.bundle import sha256_file

        own = self.bundles_dir / path.name
        if own.resolve() != path.resolve() and (not own.is_file() or sha256_file(own) != sha256_file(path)):
            tmp = own.with_name(own.name + ".tmp")
            shutil.copyfile(path, tmp)
            tmp.replace(own)
        return own

    def _publish_bundle(self, tar: Path, bundle: Mapping[str, Any]) -> p.BundleManifest:
        from cloud_sync import distribute

        try:
            with self._bundle_lock:
                if self.transport is None:
                    manifest = distribute.build_manifest(tar, chunk_size=self.chunk_size, name=bundle["name"],
                                                         version=bundle["version"])
                    self.bundles_dir.mkdir(parents=True, exist_ok=True)
                    shared = self.bundles_dir / f"{manifest.bundle_id}.tar"
                    if not shared.exists():
                        shutil.copyfile(tar, shared)
                    return manifest
                return distribute.publish_bundle(self.transport, tar, window=self.window, chunk_size=self.chunk_size,
                                                 name=bundle["name"], version=bundle["version"],
                                                 timeout_s=self.publish_timeout_s)
        except distribute.PublishError as e:
            raise BundlePublishError(f"bundle {tar} not published, nothing ordered: {e}") from e
        except OSError as e:
            raise BundlePublishError(f"bundle {tar} not published, nothing ordered: {e}") from e

    def _register_candidate(self, e: _Entry, *, quiet: bool = False) -> None:
        """The candidate's reference profile and build accuracy, for fleet drift and accuracy baselines."""
        tar = Path(e.tar_path)
        try:
            manifest = _bundle_manifest(tar)
            ref = _tar_member(tar, "reference_profile.json", _MAX_REFERENCE_BYTES)
            metrics = manifest.get("metrics") or {}
            acc = (metrics.get("test") or metrics.get("reference") or {}).get("accuracy")
            with self.hub.lock:
                self.hub.fleet.register_model(manifest["name"], manifest["version"],
                                              reference=json.loads(ref) if ref else None,
                                              reference_accuracy=float(acc) if acc is not None else None)
        except (BundleError, OSError, ValueError, TypeError, AttributeError) as err:
            if not quiet:
                log.warning("rollout %s: the candidate's reference profile is not used: %s", e.id, err)

    def _check_free(self, model: str, devices: set[str], *, besides: str | None = None) -> None:
        for rid, held in self._reserved.items():
            if rid != besides and (f"model:{model}" in held or held & devices):
                raise RolloutConflict(f"rollout {rid} is starting on the same devices or model", rollout_id=rid)
        for e in self._entries.values():
            if e.id == besides or e.rollout.state not in ACTIVE_STATES:
                continue
            shared = devices & set(e.commands)
            if e.rollout.plan.model == model or shared:
                what = f"{len(shared)} of the same devices ({', '.join(sorted(shared)[:3])})" if shared else \
                    f"model {model}"
                raise RolloutConflict(f"rollout {e.id} ({e.rollout.state}) still moves {what}; let it end, or "
                                      "roll it back first", rollout_id=e.id)

    def _previous_version(self, model: str, candidate: str, targeted: list[dict[str, Any]]) -> str:
        """The version most targeted devices serve (the newest among equals); the candidate must be newer
        than every version of the model a device serves or reports."""
        serving = Counter(v for r in targeted if (v := _serving(r, model)) and v != "unknown")
        if not serving:
            raise pl.RolloutError(f"no targeted device says which version of {model} it serves")
        cand = _version_key(candidate)
        seen = serving.keys() | {str(m.get("version")) for r in targeted for m in r.get("models") or ()
                                  if m.get("name") == model}
        for v in sorted(seen):
            key = _version_key(v)
            if key is not None and cand is not None and not cand > key:
                runs = sum(1 for r in targeted if _serving(r, model) == v or any(
                    m.get("name") == model and str(m.get("version")) == v for m in r.get("models") or ()))
                raise pl.RolloutError(f"candidate {model} {candidate} is not newer than version {v}, which {runs} "
                                      "device(s) run or hold")
        return max(serving, key=lambda v: (serving[v], _version_key(v) or ()))

    def _new_id(self, plan: pl.Plan) -> str:
        slug = _SLUG_RE.sub("-", plan.name)[:_MAX_SLUG].strip("-._") or "rollout"
        if not slug[0].isalnum():
            slug = f"r{slug}"
        n = 1 + sum(1 for rid in (*self._entries, *self._reserved) if re.fullmatch(rf"{re.escape(slug)}-r\d+", rid))
        while f"{slug}-r{n}" in self._entries or f"{slug}-r{n}" in self._reserved:
            n += 1
        return f"{slug}-r{n}"

    # -- the planner's turn ------------------------------------------------------------------------------

    def tick(self, now_ms: int | None = None) -> None:
        """Evaluate every active rollout against the fleet and send what changed; the service calls it
        every second. A rollout whose evaluation fails is logged and tried again next time."""
        with self.hub.lock:
            now = self.now_ms() if now_ms is None else now_ms
            if self._resend_all:
                self._resend_all = False
                self._unsent.update(self._latest)
                self._republish_bundles()
            active = [e for e in self._entries.values() if e.rollout.state in ACTIVE_STATES]
            if active:
                rows = self.hub.fleet.devices(now)
                kpis = self.hub.fleet.models(now)
                for e in active:
                    try:
                        self._evaluate(e, rows, kpis, now)
                    except Exception:
                        self.counters["evaluation_failures"] += 1
                        log.exception("rollout %s: evaluation failed; trying again", e.id)
            self._flush()

    def _targeted(self, plan: pl.Plan, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [dict(r) for r in rows if plan.model in _models_of(r)
                and pl.targets(plan, pl.Device(str(r["id"]), _tags_of(r), frozenset({plan.model})))]

    def _evaluate(self, e: _Entry, rows: list[dict[str, Any]], kpis: list[dict[str, Any]], now: int) -> None:
        plan = e.rollout.plan
        targeted = self._targeted(plan, rows)
        online = [r for r in targeted if r.get("state") == "online"]
        versions: dict[str, pl.VersionStats] = {}
        for k in kpis:
            if k.get("model") == plan.model:
                try:
                    versions[str(k["version"])] = pl.VersionStats.from_fleet_row(k)
                except (pl.ObservationError, KeyError, TypeError, ValueError) as err:
                    log.debug("rollout %s: KPIs of %s@%s not usable: %s", e.id, plan.model, k.get("version"), err)
        prev = e.rollout.previous_version
        if prev in versions or e.previous_kpis is not None:
            versions[prev] = e.previous_kpis = _remembered(versions.get(prev), e.previous_kpis)
        obs = pl.Observations(tuple(self._observe(e, online)), versions)
        decisions = e.rollout.evaluate(obs, now)
        e.last = {"time_ms": now, "decisions": [d.to_dict() for d in decisions]}
        self._after(e, decisions, now, rows=rows)

    def _observe(self, e: _Entry, online: list[dict[str, Any]]) -> list[pl.DeviceObservation]:
        r = e.rollout
        plan = r.plan
        assigned = r.assignment([pl.Device(str(d["id"]), _tags_of(d), frozenset({plan.model})) for d in online])
        g = plan.gates
        out = []
        for row in online:
            device_id = str(row["id"])
            pipe = (row.get("pipelines") or {}).get(plan.model) or {}
            rep = pipe.get("rollout") if isinstance(pipe.get("rollout"), dict) else None
            ours = rep is not None and rep.get("rollout_id") == r.rollout_id
            role = self._role(e, row, rep, ours, assigned.get(device_id))
            samples = 0
            if ours and rep is not None:
                samples = _count(rep.get("samples"))
                mark = e.marks.get(device_id)
                if mark is not None and mark[0] == rep.get("since_ms"):
                    samples = max(0, samples - mark[1])
            m: dict[str, Any] = {}
            version = r.candidate.version if role in ("shadow", "candidate") else r.previous_version
            if role == "shadow" and rep is not None:
                sh = rep.get("shadow") or {}
                m = {"shadow_agreement": _unit(sh.get("agreement_rate")), "p99_ms": _nonneg(sh.get("latency_p99_ms")),
                     "error_rate": _unit(sh.get("error_rate"))}
            elif pipe.get("model_version") == version:
                m = {"p99_ms": _nonneg(pipe.get("p99_ms")), "error_rate": _unit(pipe.get("error_rate"))}
            if g.drift_not_worse or g.accuracy_not_worse:
                m.update(self._version_metrics(device_id, row, pipe, plan.model, version, role, g))
            out.append(pl.DeviceObservation(device_id=device_id, models=frozenset({plan.model}), role=role,
                                            samples=samples, **m))
        return out

    def _role(self, e: _Entry, row: Mapping[str, Any], rep: Mapping[str, Any] | None, ours: bool,
              assigned: str | None) -> str:
        if ours and rep is not None and rep.get("role") in pl.REPORTED_ROLES:
            return str(rep["role"])
        if assigned in ("shadow", "candidate") and self._refused(e, str(row["id"])):
            return "failed"
        other = rep.get("role") if rep is not None else None
        if other not in ("shadow", "pending") and _serving(row, e.rollout.plan.model) == e.rollout.previous_version:
            return "baseline"
        return "pending"

    def _refused(self, e: _Entry, device_id: str) -> bool:
        """Whether the device said it refused or failed this rollout's candidate (an event naming it)."""
        return any(ev.get("name") in _FAILED_EVENTS and ev.get("ref") == e.id
                   for ev in self.hub.fleet.device_events(device_id))

    def _version_metrics(self, device_id: str, row: Mapping[str, Any], pipe: Mapping[str, Any], model: str,
                         version: str, role: str, g: pl.Gates) -> dict[str, Any]:
        entry = next((v for v in self.hub.fleet.device_versions(device_id)
                      if v.get("model") == model and v.get("version") == version), {})
        out: dict[str, Any] = {}
        if g.drift_not_worse:
            d = entry.get("drift") or {}
            out["drift_score"] = _nonneg(row.get("drift_score") if role == "shadow" else d.get("score"))
        if g.accuracy_not_worse and role != "shadow":
            labels = entry.get("labels") or {}
            n, acc = _count(labels.get("n")), _unit(labels.get("accuracy"))
            if (n == 0 or acc is None) and pipe.get("model_version") == version:
                n, acc = _count(pipe.get("labelled")), _unit(pipe.get("accuracy"))
            if n and acc is not None:
                out["accuracy_n"], out["accuracy"] = n, acc
        return out

    # -- decisions into orders ---------------------------------------------------------------------------

    def _after(self, e: _Entry, decisions: list[pl.Decision], now: int, *, rows: list[dict[str, Any]] | None = None,
               force_save: bool = False) -> None:
        """Orders, stage marks, notifications and storage after the planner decided (or a person acted)."""
        if rows is None:
            rows = self.hub.fleet.devices(now)
        plan = e.rollout.plan
        targeted = self._targeted(plan, rows)
        online = [r for r in targeted if r.get("state") == "online"]
        changed = force_save
        for d in decisions:
            if d.gate_results:
                e.gates = [gr.to_dict() for gr in d.gate_results]
            if d.kind != "wait":
                changed = True
                e.note(now, f"{d.kind} {d.stage}: {d.reason}")
            if d.kind == "advance":
                self._mark_stage(e, online)
            if d.notify:
                self._notify(e, d, now)
        if e.rollout.pending_approval is not None:
            e.gates = list(e.rollout.pending_approval["gate_results"]) or e.gates
        changed |= self._order(e, targeted, online, now)
        if e.rollout.state == "rolled_back" and not e.withdrawn:
            self._withdraw(e, now, "rolled back")
        if changed:
            self._save(e, now)
        self._flush()

    def _mark_stage(self, e: _Entry, online: list[dict[str, Any]]) -> None:
        """At a new stage, what each device whose role carries over has counted already."""
        r = e.rollout
        assigned = r.assignment([pl.Device(str(d["id"]), _tags_of(d), frozenset({r.plan.model})) for d in online])
        e.marks = {}
        for row in online:
            rep = ((row.get("pipelines") or {}).get(r.plan.model) or {}).get("rollout")
            if isinstance(rep, dict) and rep.get("rollout_id") == r.rollout_id and \
                    rep.get("role") == assigned.get(str(row["id"])) and isinstance(rep.get("since_ms"), int):
                e.marks[str(row["id"])] = [int(rep["since_ms"]), _count(rep.get("samples"))]

    def _order(self, e: _Entry, targeted: list[dict[str, Any]], online: list[dict[str, Any]], now: int) -> bool:
        """New orders for the devices whose role changed; whether there were any."""
        r = e.rollout
        model = r.plan.model

        def devices(rows: list[dict[str, Any]]) -> list[pl.Device]:
            return [pl.Device(str(d["id"]), _tags_of(d), frozenset({model})) for d in rows]

        want = r.assignment(devices(online))
        for device_id, role in r.assignment(devices(targeted)).items():
            want.setdefault(device_id, role)
        changed = {d: role for d, role in want.items() if e.commands.get(d, {}).get("role") != role}
        if not changed:
            return False
        e.seq += 1
        command_id = f"{e.id}.{e.seq}"
        for device_id, role in changed.items():
            e.commands[device_id] = {"command_id": command_id, "role": role, "issued_ms": now}
            self._latest[device_id] = e.id
            self._unsent.add(device_id)
        counts = Counter(changed.values())
        e.note(now, f"orders {command_id}: " + ", ".join(f"{n} {role}" for role, n in sorted(counts.items())))
        return True

    def params(self, e: _Entry, role: str) -> dict[str, Any]:
        """A device's order for ``role`` in rollout ``e``."""
        r, m = e.rollout, e.manifest
        out: dict[str, Any] = {
            "rollout_id": r.rollout_id, "model": r.plan.model, "role": role,
            "bundle": {"bundle_id": m.bundle_id, "name": m.name, "version": m.version, "sha256": m.sha256,
                       "size": m.size},
            "previous_version": r.previous_version, "level": r.plan.automation_level}
        rv = r.plan.review
        if rv is not None:
            out["review"] = {"classes": list(rv.classes)}
            if rv.below_score is not None:
                out["review"]["below_score"] = rv.below_score
        return out

    def command(self, device_id: str) -> p.Command | None:
        """The newest order a device holds from any rollout, or None."""
        rid = self._latest.get(device_id)
        e = self._entries.get(rid) if rid is not None else None
        if e is None or device_id not in e.commands:
            return None
        c = e.commands[device_id]
        return p.Command(device_id, "rollout", str(c["command_id"]), int(c["issued_ms"]), self.params(e, c["role"]))

    def _flush(self) -> None:
        for device_id in sorted(self._unsent):
            cmd = self.command(device_id)
            if cmd is None:
                self._unsent.discard(device_id)
                continue
            ok: Any = None
            if self.publish is not None:
                try:
                    ok = self.publish(cmd.topic, cmd.to_wire(), cmd.QOS, cmd.RETAIN)
                except Exception as err:  # the transport's failure: the order goes out next time
                    log.warning("rollout order %s to %s not sent: %s", cmd.command_id, device_id, err)
                    ok = False
            if ok is False:
                self.counters["orders_unsent"] += 1
                continue
            self.counters["orders_sent"] += 1
            self._unsent.discard(device_id)

    def resend(self) -> None:
        """Send every device's newest order again on the next tick (after a reconnect), and publish again
        the bundles that orders still name. Takes no lock: the transport's network thread calls it."""
        self._resend_all = True

    def _republish_bundles(self) -> None:
        """The bundles of rollouts that are not over or ended done, again (the same retained messages), in
        the background; one such run at a time."""
        if self.transport is None or self._republishing:
            return
        todo = [(e.id, Path(e.tar_path), e.manifest) for e in self._entries.values()
                if not e.withdrawn and e.rollout.state in (*ACTIVE_STATES, "done")]
        if not todo:
            return
        self._republishing = True
        from cloud_sync import distribute

        def run() -> None:
            try:
                for rid, tar, m in todo:
                    try:
                        with self._bundle_lock:
                            again = distribute.publish_bundle(self.transport, tar, window=self.window,
                                                              chunk_size=m.chunk_size, name=m.name, version=m.version,
                                                              timeout_s=self.publish_timeout_s)
                        if again != m:
                            log.error("rollout %s: %s changed since it was published (now %s); its devices cannot "
                                      "use it", rid, tar, again.bundle_id)
                    except (distribute.PublishError, OSError) as err:
                        log.error("rollout %s: bundle %s not published again: %s", rid, m.bundle_id, err)
            finally:
                self._republishing = False

        threading.Thread(target=run, name="bundles-again", daemon=True).start()

    def _notify(self, e: _Entry, d: pl.Decision, now: int) -> None:
        self.counters["notifications"] += 1
        body = {"type": "rollout", "rollout_id": e.id, "model": e.rollout.plan.model, "decision": d.kind,
                "stage": d.stage, "state": e.rollout.state, "reason": d.reason,
                "pending_approval": e.rollout.pending_approval, "gate_results": [g.to_dict() for g in d.gate_results],
                "time_ms": now}
        what = "waits for approval" if d.kind == "request_approval" else d.kind
        self.hub.notify(body, f"rollout {e.id} {what} ({d.stage}): {d.reason}")

    def _withdraw(self, e: _Entry, now: int, why: str) -> None:
        """Clear the bundle's retained messages (in the background: it waits for the broker), unless
        another rollout still uses the same bundle."""
        if e.withdrawn:
            return
        e.withdrawn = True
        if any(o is not e and not o.withdrawn and o.manifest.bundle_id == e.manifest.bundle_id
               for o in self._entries.values()):
            e.note(now, f"bundle {e.manifest.bundle_id} kept: another rollout uses it")
            self._save(e, now)
            return
        e.note(now, f"bundle {e.manifest.bundle_id} withdrawn: {why}")
        self._save(e, now)
        if self.transport is None:
            return
        from cloud_sync import distribute

        def run() -> None:
            try:
                with self._bundle_lock:
                    distribute.withdraw_bundle(self.transport, e.manifest, window=self.window,
                                               timeout_s=self.publish_timeout_s)
            except (distribute.PublishError, OSError) as err:
                log.warning("rollout %s: bundle %s not withdrawn: %s", e.id, e.manifest.bundle_id, err)

        threading.Thread(target=run, name=f"withdraw-{e.manifest.bundle_id}", daemon=True).start()

    # -- people ------------------------------------------------------------------------------------------

    def approve(self, rollout_id: str, by: str) -> dict[str, Any]:
        """Approve the open request (enter the stage it names). KeyError: no such rollout;
        :class:`~cloud_sync.planner.IllegalAction`: nothing waits for approval."""
        return self._act(rollout_id, lambda r, now: r.approve(by, now))

    def reject(self, rollout_id: str, by: str, reason: str = "") -> dict[str, Any]:
        """Refuse the open request: roll back."""
        return self._act(rollout_id, lambda r, now: r.reject(by, now, reason))

    def pause(self, rollout_id: str, by: str, reason: str = "") -> dict[str, Any]:
        """Stop advancing; devices keep their roles."""
        return self._act(rollout_id, lambda r, now: r.pause(by, now, reason))

    def resume(self, rollout_id: str, by: str) -> dict[str, Any]:
        return self._act(rollout_id, lambda r, now: r.resume(by, now))

    def rollback(self, rollout_id: str, by: str, reason: str) -> dict[str, Any]:
        """Every targeted device back to the previous version (also after done; after failed, again)."""
        return self._act(rollout_id, lambda r, now: r.rollback(by, reason, now), rollback=True)

    def _act(self, rollout_id: str, action: Callable[[pl.Rollout, int], list[pl.Decision]], *,
             rollback: bool = False) -> dict[str, Any]:
        with self.hub.lock:
            e = self._entries.get(rollout_id)
            if e is None:
                raise KeyError(rollout_id)
            if rollback and e.rollout.state in TERMINAL_STATES:
                newer = sorted({rid for d in e.commands if (rid := self._latest.get(d)) not in (None, e.id)})
                if newer:
                    raise RolloutConflict(f"its devices have orders of a newer rollout ({', '.join(newer)}): roll "
                                          "that one back instead", rollout_id=e.id)
                self._check_free(e.rollout.plan.model, set(e.commands), besides=e.id)
            now = self.now_ms()
            decisions = action(e.rollout, now)
            self._after(e, decisions, now, force_save=True)
            return self.detail(rollout_id)

    # -- views -------------------------------------------------------------------------------------------

    def _summary(self, e: _Entry) -> dict[str, Any]:
        r = e.rollout
        roles = Counter(c["role"] for c in e.commands.values())
        events = r.events
        return {
            "id": e.id, "name": r.plan.name, "model": r.plan.model, "state": r.state, "stage": r.stage,
            "stages": list(r.plan.stages), "level": r.plan.automation_level, "level_name": r.plan.level.name,
            "previous_version": r.previous_version, "candidate_version": r.candidate.version,
            "versions": f"{r.previous_version} -> {r.candidate.version}", "bundle_id": e.manifest.bundle_id,
            "devices": len(e.commands),
            "cohorts": {role: roles.get(role, 0) for role in pl.ROLES},
            "gates": list(e.gates), "pending_approval": r.pending_approval,
            "reason": decisions[-1].get("reason") if (decisions := (e.last or {}).get("decisions")) else None,
            "started_by": e.started_by, "created_ms": r.created_ms, "stage_started_ms": r.stage_started_ms,
            "updated_ms": events[-1].time_ms if events else r.created_ms,
        }

    def list(self) -> list[dict[str, Any]]:
        """Every rollout's summary, the newest first."""
        with self.hub.lock:
            entries = sorted(self._entries.values(), key=lambda e: (e.rollout.created_ms, e.id), reverse=True)
            return [self._summary(e) for e in entries]

    def detail(self, rollout_id: str) -> dict[str, Any]:
        """One rollout in full: plan, stage, every device's order and report, gate results, the pending
        approval, the planner's event log and this service's log. KeyError for an unknown id."""
        with self.hub.lock:
            e = self._entries.get(rollout_id)
            if e is None:
                raise KeyError(rollout_id)
            r = e.rollout
            rows = {str(row["id"]): row for row in self.hub.fleet.devices(self.now_ms())}
            assignment = []
            for device_id, c in sorted(e.commands.items()):
                row = rows.get(device_id) or {}
                pipe = (row.get("pipelines") or {}).get(r.plan.model) or {}
                assignment.append({
                    "device_id": device_id, "role": c["role"], "command_id": c["command_id"],
                    "issued_ms": c["issued_ms"],
                    "sent": not (self._latest.get(device_id) == e.id and device_id in self._unsent),
                    "current": self._latest.get(device_id) == e.id, "device_state": row.get("state"),
                    "serving_version": _serving(row, r.plan.model) if row else None,
                    "reported": pipe.get("rollout")})
            plan = r.plan
            return {
                **self._summary(e),
                "plan": {"name": plan.name, "model": plan.model, "automation_level": plan.automation_level,
                         "level": plan.level.name, "target_tags": list(plan.target_tags), "stages": list(plan.stages),
                         "source": plan.source, "text": plan.text},
                "bundle": {"bundle_id": e.manifest.bundle_id, "name": e.manifest.name,
                           "version": e.manifest.version, "sha256": e.manifest.sha256, "size": e.manifest.size,
                           "chunks": e.manifest.count, "chunk_size": e.manifest.chunk_size, "path": e.tar_path,
                           "withdrawn": e.withdrawn},
                "assignment": assignment, "last_evaluation": e.last,
                "events": [ev.to_dict() for ev in r.events], "log": list(e.log),
            }

    def get(self, rollout_id: str) -> pl.Rollout:
        """The planner's rollout (for tests and tools)."""
        with self.hub.lock:
            e = self._entries.get(rollout_id)
            if e is None:
                raise KeyError(rollout_id)
            return e.rollout


def _remembered(now: pl.VersionStats | None, before: pl.VersionStats | None) -> pl.VersionStats:
    """``now``'s KPIs, each missing one (no device serves the version any more) taken from ``before``."""
    if now is None:
        assert before is not None
        return before
    if before is None:
        return now
    kw: dict[str, Any] = {name: getattr(before, name) for name in ("p99_ms", "error_rate", "drift_score")
                          if getattr(now, name) is None}
    if now.accuracy is None or not now.accuracy_n:
        kw |= {"accuracy_n": before.accuracy_n, "accuracy": before.accuracy}
    return replace(now, **kw) if kw else now
