"""The device side of a model rollout, for one pipeline: the cloud's ``cmd/rollout`` orders in, the
model changed safely out.

An order names the pipeline's model, the rollout, this device's role (``shadow``, ``candidate`` or
``baseline``) and the bundle (its id, name, version, size and sha256). The deployer works on its own
thread, so that downloads and checks never touch the inference thread or the sync thread:

- ``shadow`` / ``candidate``: refuse a version not newer than any this device has run (anti-rollback,
  persisted), fetch the bundle (chunks over MQTT, resumable), verify it (signature, every hash,
  expiry and profile constraints, onnx checker, smoke run on the bundle's own inputs, the profile's
  latency budget), then run it beside the active model (shadow: compared, never acted on) or switch to
  it between two inputs (hot swap). A shadow that becomes a candidate is promoted without a new
  download.
- ``baseline``: stop a shadow, or switch back to the previous version, which stays on disk.
- After an activation the deployer watches the new model (:class:`~edge_runtime.core.rollout.SelfCheck`:
  error rate and p99 latency since the switch) and rolls back on its own when it breaks them.

Every transition of :class:`~edge_runtime.core.rollout.RolloutMachine` is persisted (atomic replace)
under ``state_dir`` and reported as a ``rollout_<state>`` event with its reason; a reboot resumes
where it was (a download goes on, a verification starts again, a shadow or an activated candidate
comes back). Any failure leaves the active model serving, with the exact reason reported.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_runtime.core import protocol as p
from edge_runtime.core.histogram import LatencyHistogram
from edge_runtime.core.rollout import (
    ModelRef,
    ReviewRule,
    RolloutError,
    RolloutMachine,
    SelfCheck,
    output_status,
)
from edge_runtime.errors import EdgeRuntimeError

log = logging.getLogger(__name__)

ROLES = ("shadow", "candidate", "baseline")
STATE_FILE = "rollout-{name}.json"

# fetch(bundle, dest_dir, on_done(path), on_failed(reason)) -> a handle with .cancel() or .close()
Fetch = Callable[[dict[str, Any], Path, Callable[[Path], None], Callable[[str], None]], Any]


def mqtt_fetch(uplink: Any, **options: Any) -> Fetch:
    """Bundles over MQTT (:class:`edge_runtime.download.BundleFetcher`): the uplink routes the bundle's
    messages to the fetcher and polls it from its sync thread (stalled chunks are asked for again)."""
    from edge_runtime.download import BundleFetcher

    active: list[Any] = []
    lock = threading.Lock()

    def route(topic: str, payload: bytes) -> bool:
        with lock:
            fetchers = list(active)
        return any(f.on_message(topic, payload) for f in fetchers)

    def poll() -> None:
        with lock:
            for f in [f for f in active if f.finished]:
                active.remove(f)
            fetchers = list(active)
        for f in fetchers:
            f.poll()

    uplink.message_routes.append(route)
    uplink.tick_hooks.append(poll)

    def fetch(bundle: dict[str, Any], dest: Path, on_done: Callable[[Path], None],
              on_failed: Callable[[str], None]) -> Any:
        f = BundleFetcher(uplink.transport, bundle["bundle_id"], dest, on_done=on_done,
                          on_failed=lambda e: on_failed(f"{getattr(e, 'reason', 'download')}: {e}"), **options)
        with lock:
            active.append(f)
        f.start()
        return f
    return fetch


def local_fetch(source_dir: str | Path) -> Fetch:
    """Bundles from a directory (``<bundle_id>.tar``, e.g. a mounted share or a USB stick) instead of
    MQTT: copied into the download directory and checked against the order's size and sha256."""
    src = Path(source_dir)

    class _Done:
        def close(self) -> None:
            pass

    def fetch(bundle: dict[str, Any], dest: Path, on_done: Callable[[Path], None],
              on_failed: Callable[[str], None]) -> Any:
        import hashlib

        path = src / f"{bundle['bundle_id']}.tar"
        out = dest / path.name
        try:
            h = hashlib.sha256()
            with path.open("rb") as f, out.open("wb") as g:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                    g.write(block)
        except OSError as e:
            on_failed(f"cannot read {path}: {e}")
            return _Done()
        if out.stat().st_size != bundle["size"] or h.hexdigest() != bundle["sha256"]:
            out.unlink(missing_ok=True)
            on_failed(f"{path.name}: size or sha256 differs from the order's")
        else:
            on_done(out)
        return _Done()
    return fetch


def _cancel(handle: Any) -> None:
    (getattr(handle, "cancel", None) or handle.close)()


class OrderError(EdgeRuntimeError):
    """A rollout order that cannot be followed as given (malformed params)."""


def parse_order(cmd: p.Command) -> dict[str, Any]:
    """The params of a rollout order, checked: what the deployer relies on is there and typed."""
    prm = cmd.params
    try:
        role = prm["role"]
        if role not in ROLES:
            raise OrderError(f"role is {role!r}, expected one of {ROLES}")
        b = prm["bundle"]
        bundle = {"bundle_id": p.validate_device_id(b["bundle_id"]), "name": str(b["name"]),
                  "version": str(b["version"]), "sha256": str(b["sha256"]), "size": int(b["size"])}
        if len(bundle["sha256"]) != 64:
            raise OrderError(f"bundle sha256 is {bundle['sha256'][:80]!r}, expected 64 hex digits")
        level = int(prm.get("level", 5))
        if not 1 <= level <= 5:
            raise OrderError(f"level is {level}, expected 1-5")
        review = prm.get("review")
        if review is not None:
            if not isinstance(review, dict):
                raise OrderError(f"review is {type(review).__name__}, expected an object")
            ReviewRule.from_dict({"min_score": review.get("below_score", review.get("min_score")),
                                  "classes": review.get("classes", [])})
        return {"rollout_id": p.validate_device_id(prm["rollout_id"]), "model": str(prm["model"]), "role": role,
                "bundle": bundle, "previous_version": str(prm.get("previous_version") or ""),
                "level": level, "review": review, "command_id": cmd.command_id}
    except (KeyError, TypeError, ValueError, p.ProtocolError, RolloutError) as e:
        if isinstance(e, OrderError):
            raise
        raise OrderError(f"rollout order {cmd.command_id}: missing or malformed field ({e})") from e


class Deployer:
    def __init__(self, pipeline: Any, *, state_dir: str | Path, keys: list[Any], profile: Any,
                 fetch: Fetch, report: Callable[[str, dict[str, Any]], None] | None = None,
                 on_state: Callable[[], None] | None = None, self_check: SelfCheck | None = None,
                 latency_budget_ms: float | None = None, clock: Callable[[], float] = time.time,
                 monitors: Callable[[Path], dict[str, Any]] | None = None) -> None:
        self.pipeline = pipeline
        # A version's own drift monitor and label tracker, from its unpacked bundle (``drift=``,
        # ``concept=`` for Pipeline.swap): so that drift scores and label accuracy count for the version
        # that answered, not the one before.
        self.monitors = monitors
        self.name = pipeline.name
        self.state_dir = Path(state_dir)
        self.bundles_dir = self.state_dir / "bundles"
        self.bundles_dir.mkdir(parents=True, exist_ok=True)
        self.keys = keys
        self.profile = profile
        self.fetch = fetch
        self.report = report or (lambda _kind, _payload: None)
        self.on_state = on_state
        self.self_check = self_check or SelfCheck(max_error_rate=0.05, max_p99_ms=None, min_samples=200)
        self.latency_budget_ms = latency_budget_ms
        self.clock = clock
        self.path = self.state_dir / STATE_FILE.format(name=self.name)
        self.order: dict[str, Any] | None = None
        self._rule: ReviewRule | None = None  # the order's review rule (level 4), built on first use
        self.role = "baseline"
        self.since_ms = self._now()
        self._role_predictions0 = 0     # predictions when the role began (the "samples" the cloud gates on)
        self._watch_inputs0 = 0         # inputs and errors at the last activation (the self-check)
        self._watch_errors0 = 0
        self._watch_latency0 = LatencyHistogram()
        # version -> engine: the model the agent was started with, and verified candidates
        self._engines: dict[str, Any] = {pipeline.version or "0": pipeline.engine}
        self._download: Any = None
        self._jobs: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self.machine, problem = self._load()
        if problem:
            log.error("%s: rollout state in %s was not usable (%s); starting afresh", self.name, self.path, problem)
        self._thread = threading.Thread(target=self._run, name=f"deploy-{self.name}", daemon=True)

    # -- persistence -----------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock() * 1000)

    def _load(self) -> tuple[RolloutMachine, str | None]:
        if not self.path.is_file():
            return RolloutMachine(ModelRef(self.name, self.pipeline.version or "0")), None
        try:
            d = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return RolloutMachine(ModelRef(self.name, self.pipeline.version or "0")), str(e)
        self.order = d.get("order") if isinstance(d.get("order"), dict) else None
        self.role = d.get("role") if d.get("role") in ROLES else "baseline"
        return RolloutMachine.from_dict_or_reset(d.get("machine"))

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        body = json.dumps({"machine": self.machine.to_dict(), "order": self.order, "role": self.role})
        with tmp.open("w", encoding="utf-8") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def _apply(self, event: str, reason: str, **details: Any) -> None:
        t = self.machine.apply(event, reason=reason, now_ms=self._now(), **details)
        self._save()
        level = logging.WARNING if t.to_state in ("failed", "rolled_back") else logging.INFO
        log.log(level, "%s: rollout %s: %s -> %s (%s)", self.name, self.machine.rollout_id, t.from_state,
                t.to_state, reason)
        cand = self.machine.candidate
        self.report("event", {"name": f"rollout_{t.to_state}", "ref": self.machine.rollout_id or self.name,
                              "severity": "warning" if t.to_state in ("failed", "rolled_back") else "info",
                              "message": f"{self.name}: {t.from_state} -> {t.to_state}: {reason}",
                              "detail": {"pipeline": self.name, "event": event, "from": t.from_state,
                                         "to": t.to_state, "reason": reason,
                                         "candidate": cand.to_dict() if cand is not None else None}})
        if self.on_state is not None:
            self.on_state()

    # -- orders ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._jobs.put(("resume", None))

    def stop(self) -> None:
        self._stop.set()
        self._jobs.put(("stop", None))
        if self._download is not None:
            _cancel(self._download)
        if self._thread.is_alive():
            self._thread.join(10)

    def on_command(self, cmd: p.Command) -> None:
        """From the sync thread: queue an order meant for this pipeline's model (others are ignored)."""
        if cmd.action != "rollout":
            return
        try:
            order = parse_order(cmd)
        except OrderError as e:
            log.warning("%s: %s", self.name, e)
            self.report("event", {"name": "rollout_order_refused", "severity": "warning", "ref": cmd.command_id,
                                  "message": str(e)})
            return
        if order["model"] != self.name:
            return
        if cmd.expired(self._now()):
            log.info("%s: rollout order %s expired; ignored", self.name, cmd.command_id)
            return
        self._jobs.put(("order", order))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                kind, arg = self._jobs.get(timeout=1.0)
            except queue.Empty:
                self._watch()
                continue
            if kind == "stop":
                return
            try:
                if kind == "order":
                    self._order(arg)
                elif kind == "downloaded":
                    self._verify(arg)
                elif kind == "download_failed":
                    if self.machine.state == "downloading":
                        self._apply("download_failed", arg)
                elif kind == "resume":
                    self._resume()
            except RolloutError as e:
                log.warning("%s: rollout: %s", self.name, e)
            except Exception:
                log.exception("%s: rollout step %s failed; the active model keeps serving", self.name, kind)

    def _order(self, order: dict[str, Any]) -> None:
        if self.order is not None and order["command_id"] == self.order.get("command_id") and \
                self.machine.state not in ("idle",):
            return  # the same retained order again (a reconnect): already being followed
        prev_order, self.order = self.order, order
        self._rule = None
        b = order["bundle"]
        self._set_role(order["role"] if order["role"] == "baseline" else self.role)
        self._save()
        st = self.machine.state
        cand = self.machine.candidate
        same = cand is not None and cand.version == b["version"] and cand.sha256 == b["sha256"] and \
            self.machine.rollout_id == order["rollout_id"]
        if order["role"] == "baseline":
            if st == "active" and (self.machine.rollout_id != order["rollout_id"]
                                   or self.pipeline.version == order["previous_version"]):
                # What runs came from an earlier rollout (or the configuration): that is this rollout's
                # baseline. Only this rollout's own candidate is rolled back.
                self._set_role("baseline")
                return
            self._to_baseline(f"cloud: role baseline in rollout {order['rollout_id']}")
            return
        if same and st == "shadow" and order["role"] == "candidate":
            self._activate(cand.version, promote=True)
            return
        if same and st in ("downloading", "verifying", "shadow", "active"):
            return  # already on its way or there
        if st not in ("idle", "active", "failed", "rolled_back"):
            self._to_baseline("a newer rollout order replaces this one")
        try:
            self.machine.check_candidate(b["name"], b["version"])
        except RolloutError as e:
            self.report("event", {"name": "rollout_refused", "severity": "warning", "ref": order["rollout_id"],
                                  "message": f"{self.name}: {e}"})
            log.warning("%s: rollout %s refused: %s", self.name, order["rollout_id"], e)
            self.order = prev_order if prev_order is not None else order
            self._set_role("failed" if self.machine.state == "failed" else "baseline")
            return
        self._apply("start_download", f"rollout {order['rollout_id']}: role {order['role']}",
                    rollout_id=order["rollout_id"], name=b["name"], version=b["version"], sha256=b["sha256"])
        self._set_role("pending")
        self._start_download(b)

    def _start_download(self, b: dict[str, Any]) -> None:
        dest = self.bundles_dir / "downloads"
        dest.mkdir(parents=True, exist_ok=True)
        self._download = self.fetch(b, dest, lambda path: self._jobs.put(("downloaded", path)),
                                    lambda reason: self._jobs.put(("download_failed", reason)))

    def _verify(self, tar: Path) -> None:
        if self.machine.state != "downloading" or self.order is None:
            return
        self._apply("download_done", f"{tar.name} complete, sha256 checked")
        self._check(tar)

    def _check(self, tar: Path) -> None:
        from edge_runtime.bundle import BundleError, verify_bundle

        assert self.order is not None
        cand = self.machine.candidate
        assert cand is not None
        target = self.bundles_dir / f"{cand.name}-{cand.version}"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        try:
            v = verify_bundle(tar, self.keys, profile=self.profile, smoke=True, workdir=target)
            m = v.manifest
            if str(m.get("name")) != cand.name or str(m.get("version")) != cand.version:
                raise BundleError("wrong_bundle", f"the bundle is {m.get('name')} {m.get('version')}, the order "
                                  f"named {cand.name} {cand.version}", bundle=str(tar))
            self.machine.check_candidate(cand.name, cand.version)
            self._budget(v.engine)
        except (BundleError, RolloutError) as e:
            self._set_role("failed")
            self._apply("verify_failed", f"{getattr(e, 'code', getattr(e, 'reason', 'refused'))}: {e}")
            shutil.rmtree(target, ignore_errors=True)
            return
        finally:
            tar.unlink(missing_ok=True)
        self._engines[cand.version] = v.engine
        if self.order["role"] == "shadow":
            self.pipeline.set_shadow(v.engine, cand.version)
            self._set_role("shadow")
            self._apply("verified_shadow", "verified; running beside the active model")
        else:
            self._activate(cand.version, promote=False)

    def _budget(self, engine: Any) -> None:
        """The candidate must answer one input within the device's latency budget (median of 20 runs)."""
        if self.latency_budget_ms is None:
            return
        from edge_runtime.bundle import BundleError
        from edge_runtime.core.inputs import make_feeds

        run = engine.runner(1)
        feeds = make_feeds(engine.spec, None, 1)
        times = []
        for _ in range(21):
            t = time.perf_counter()
            run(feeds)
            times.append((time.perf_counter() - t) * 1000)
        median = sorted(times[1:])[10]
        if median > self.latency_budget_ms:
            raise BundleError("over_budget", f"median latency {median:.2f} ms on this device, the budget is "
                              f"{self.latency_budget_ms:g} ms", bundle=engine.name)

    def _activate(self, version: str, *, promote: bool) -> None:
        engine = self._engines.get(version) or self._load_engine(version)
        self.pipeline.set_shadow(None)
        if not self.pipeline.swap(engine, version, timeout_s=30, **self._monitors_of(version)):
            log.warning("%s: the swap to %s waits for the next input", self.name, version)
        self._mark_start()
        self._set_role("candidate")
        if promote:
            self._apply("promote", "cloud: role candidate; shadow promoted")
        else:
            self._apply("verified_activate", "verified; switched between two inputs")

    def _monitors_of(self, version: str) -> dict[str, Any]:
        if self.monitors is None:
            return {}
        d = self.bundles_dir / f"{self.name}-{version}"
        try:
            return self.monitors(d)
        except (OSError, ValueError, EdgeRuntimeError) as e:
            log.warning("%s: version %s keeps the previous monitors: %s", self.name, version, e)
            return {}

    def _load_engine(self, version: str) -> Any:
        from edge_runtime.adapters.onnx_engine import OnnxEngine

        d = self.bundles_dir / f"{self.name}-{version}"
        if not (d / "model.onnx").is_file():
            raise RolloutError("bad_state", f"version {version} of {self.name} is not on disk in {d}")
        return OnnxEngine(d / "model.onnx", self.profile, name=self.name)

    def _to_baseline(self, reason: str) -> None:
        st = self.machine.state
        if st == "shadow":
            self.pipeline.set_shadow(None)
            self._set_role("baseline")
            self._apply("rollback", reason)
        elif st == "active" and self.machine.previous is not None and \
                self.machine.active.version != self.machine.previous.version:
            prev = self.machine.previous.version
            engine = self._engines.get(prev)
            if engine is None and prev != self.pipeline.version:
                engine = self._load_engine(prev)
            if engine is not None and prev != self.pipeline.version:
                self.pipeline.swap(engine, prev, timeout_s=30, **self._monitors_of(prev))
            self._set_role("baseline")
            self._apply("rollback", reason)
        elif st in ("downloading", "verifying"):
            if self._download is not None:
                _cancel(self._download)
            self._set_role("baseline")
            self._apply("abort", reason)
        else:
            self._set_role("baseline")

    def _resume(self) -> None:
        """After a start: bring back what the persisted state says (a download, a check, a shadow, an
        activated candidate)."""
        action = self.machine.resume(now_ms=self._now())
        cand = self.machine.candidate
        if action == "download" and self.order is not None:
            self._set_role("pending")
            self._start_download(self.order["bundle"])
        elif action == "verify" and self.order is not None:
            tar = self.bundles_dir / "downloads" / f"{self.order['bundle']['bundle_id']}.tar"
            if tar.is_file():
                self._check(tar)
                return
            self._apply("verify_failed", "restarted while verifying and the download is gone: fetching again")
            b = self.order["bundle"]
            self._apply("start_download", "fetching again after a restart", rollout_id=self.order["rollout_id"],
                        name=b["name"], version=b["version"], sha256=b["sha256"])
            self._set_role("pending")
            self._start_download(b)
        elif action == "shadow" and cand is not None:
            try:
                self.pipeline.set_shadow(self._load_engine(cand.version), cand.version)
                self._set_role("shadow")
            except (RolloutError, EdgeRuntimeError) as e:
                self._apply("rollback", f"the shadow model could not be loaded after a restart: {e}")
        elif action == "serve" and self.machine.state == "active" and self.machine.active is not None:
            version = self.machine.active.version
            if version != self.pipeline.version:
                try:
                    self.pipeline.swap(self._load_engine(version), version, timeout_s=None,
                                       **self._monitors_of(version))
                    self._mark_start()
                    self._set_role("candidate")
                except (RolloutError, EdgeRuntimeError) as e:
                    self._apply("rollback", f"version {version} could not be loaded after a restart: {e}")

    # -- watching the new model ---------------------------------------------------------------------

    def _mark_start(self) -> None:
        m = self.pipeline.metrics
        self._watch_inputs0, self._watch_errors0 = m.inputs, m.error_total
        self._watch_latency0 = m.stages["latency"].snapshot()

    def _set_role(self, role: str) -> None:
        if role != self.role:
            self.role = role
            self.since_ms = self._now()
            self._role_predictions0 = self.pipeline.metrics.predictions

    def _watch(self) -> None:
        """Self-rollback: the activated candidate broke the error-rate or latency limits."""
        if self.machine.state != "active" or self.role != "candidate":
            return
        m = self.pipeline.metrics
        inputs, errors = m.inputs - self._watch_inputs0, m.error_total - self._watch_errors0
        lat = m.stages["latency"].snapshot().minus(self._watch_latency0)  # since the activation
        p99 = lat.quantile(0.99) / 1e6 if lat.count else None
        verdict = self.self_check.decide(inputs, errors, p99)
        if verdict.rollback:
            self._to_baseline(f"self-check: {verdict.reason}: {verdict.detail}")
            self._set_role("failed")

    # -- reporting -----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The ``rollout`` object of metric snapshots and telemetry."""
        cand = self.machine.candidate
        sh = self.pipeline._shadow
        return {"rollout_id": self.machine.rollout_id, "state": self.machine.state, "role": self.role,
                "candidate_version": cand.version if cand is not None else None, "since_ms": self.since_ms,
                "samples": max(0, self.pipeline.metrics.predictions - self._role_predictions0),
                "shadow": sh.stats.summary() if sh is not None else None, "reason": self.machine.reason}

    def output_status(self, label: Any, score: float | None) -> str:
        """What the active model's output is under the rollout's automation level: ``final`` for the
        configured model and after levels 3 and 5; ``shadow`` (level 1: recorded, a person decides),
        ``suggestion`` (level 2) or, at level 4, ``pending_review`` when the order's review rule matches
        (low score, listed class)."""
        order = self.order
        if order is None or self.role != "candidate" or self.machine.state != "active":
            return "final"
        level = order.get("level", 5)
        rule = self._rule
        if rule is None and order.get("review"):
            r = order["review"]
            rule = self._rule = ReviewRule.from_dict({"min_score": r.get("below_score", r.get("min_score")),
                                                       "classes": r.get("classes", [])})
        return output_status(level, shadow=False,
                             needs_review=level == 4 and rule is not None and rule.matches(label, score))

    def model_state(self) -> str:
        """The model's state in the device's retained status."""
        return {"shadow": "shadow", "downloading": "downloading", "verifying": "verifying",
                "failed": "active"}.get(self.machine.state, "active")
