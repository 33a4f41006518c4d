"""The cloud's state in one place: ingest into the store, the fleet view, alerts, the review queue and
retraining requests. The MQTT service feeds it; the dashboard and the CLI read it.

``Hub.handle`` takes one MQTT message (what the broker delivered), commits it (:class:`Ingest`), updates
the fleet view and, at most once per ``evaluate_every_ms``, evaluates the alert rules; every alert
transition is persisted and sent to the rule's sinks (log, an MQTT topic, a webhook). A rule marked
``retrain`` that fires records a retraining request and runs the configured command (or publishes the
request on a topic). Low-confidence predictions enter the review queue (size-capped per device and
hour, and only the prediction record, never raw inputs); a person's verdict goes back to the device as
label feedback and into the fleet's accuracy. Model rollouts (:class:`~cloud_sync.rollouts.RolloutService`,
``rollouts_service``) are judged on every tick.

One re-entrant lock guards it all: the ingest worker and the web server's threads share it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shlex
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_sync.fleet import FleetState
from cloud_sync.ingest import Ingest
from cloud_sync.rollouts import RolloutService
from cloud_sync.rules import ALERTS_SCHEMA, AlertError, AlertManager, AlertTransition, RuleSet, load_rules
from cloud_sync.store import open_store
from edge_runtime.core import protocol as p

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, int, bool], Any]

REVIEW_STATES = ("pending", "confirmed", "corrected")


class Hub:
    def __init__(self, store: Any, *, rules: RuleSet | None = None, publish: Publish | None = None,
                 clock: Callable[[], float] = time.time, evaluate_every_ms: int = 1000,
                 review_below: float | None = 0.5, review_per_device_hour: int = 20,
                 retrain_command: str | None = None, retrain_topic: str | None = None,
                 retrain_dir: str | Path | None = None, replay_s: float = 3600.0, bundle_transport: Any = None,
                 bundle_window: Any = None, bundles_dir: str | Path | None = None,
                 chunk_size: int | None = None) -> None:
        self.store = store
        self.rules = rules
        self.publish = publish
        self.clock = clock
        self.lock = threading.RLock()
        self.fleet = FleetState(low_confidence=review_below if review_below is not None else 0.5)
        self.ingest = Ingest(store, observe=self._observe)
        self.alerts = self._restore_alerts(rules) if rules is not None else None
        self.evaluate_every_ms = evaluate_every_ms
        self._next_eval = 0
        self.review_below = review_below
        self.review_per_device_hour = review_per_device_hour
        self._review_quota: dict[tuple[str, int], int] = {}
        self.retrain_command = retrain_command
        self.retrain_topic = retrain_topic
        self.retrain_dir = Path(retrain_dir) if retrain_dir else Path(tempfile.gettempdir()) / "cloud-sync-retrain"
        self.counters = {"alert_transitions": 0, "sink_failures": 0, "reviews_added": 0, "retrain_requests": 0}
        self._webhooks: queue.Queue[tuple[str, float, bytes]] = queue.Queue(maxsize=1000)
        self._webhook_thread: threading.Thread | None = None
        self.rollouts_service = RolloutService(self, publish, transport=bundle_transport, window=bundle_window,
                                               bundles_dir=bundles_dir, clock=clock, chunk_size=chunk_size)
        if replay_s > 0:
            self.replay(self.now_ms() - int(replay_s * 1000))

    def replay(self, since_ms: int) -> dict[str, int]:
        """Rebuild the fleet view after a restart: every device's last status, then the metric, drift and
        event records created since ``since_ms``, from the store (alerts come back from their table)."""
        now = self.now_ms()
        n = {"devices": 0, "records": 0}
        with self.lock:
            for device_id, d in self.store.devices().items():
                st = d.get("status") or {}
                try:
                    msg = p.Status(device_id, bool(d["online"]), d.get("boot_id") or "unknown",
                                   int(st.get("time_ms") or 0), str(st.get("agent_version") or "?"),
                                   tuple(p.ModelStatus(str(m["name"]), str(m["version"]), str(m["state"]))
                                         for m in st.get("models", [])), tuple(st.get("tags") or ()))
                except (p.ProtocolError, KeyError, TypeError, ValueError) as e:
                    log.warning("replay: stored status of %s not usable: %s", device_id, e)
                    continue
                self.fleet.observe_status(msg, int(d["last_seen_ms"]))
                n["devices"] += 1
            for row in self.store.export(since_ms, kinds=(p.METRIC, p.DRIFT, p.EVENT)):
                rec = p.Record(row["seq"], row["kind"], row["created_ms"], row["payload"])
                self.fleet.observe_records(row["device_id"], (rec,), now, boot_id=row["boot_id"])
                n["records"] += 1
        if n["devices"] or n["records"]:
            log.info("fleet view rebuilt from the store: %d devices, %d records since %d", n["devices"],
                     n["records"], since_ms)
        return n

    def register_bundle(self, bundle_dir: str | Path) -> tuple[str, str]:
        """Tell the fleet view about a model version from its bundle: the reference profile (fleet drift
        distances) and the accuracy measured at build (the baseline of accuracy-drop rules)."""
        d = Path(bundle_dir)
        try:
            manifest = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
            name, version = str(manifest["name"]), str(manifest["version"])
            ref_file = d / "reference_profile.json"
            reference = json.loads(ref_file.read_text(encoding="utf-8")) if ref_file.is_file() else None
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{d}: not a readable model bundle ({e})") from e
        metrics = manifest.get("metrics") or {}
        acc = (metrics.get("test") or metrics.get("reference") or {}).get("accuracy")
        with self.lock:
            self.fleet.register_model(name, version, reference=reference,
                                      reference_accuracy=float(acc) if acc is not None else None)
        return name, version

    @classmethod
    def for_tests(cls, db_path: str | Path, rules_text: str | None = None, **kw: Any) -> Hub:
        """A hub on a real SQLite store, without MQTT (publishes are dropped unless ``publish`` is given)."""
        return cls(open_store(db_path), rules=load_rules(rules_text) if rules_text else None, **kw)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- ingest ----------------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, now_ms: int | None = None) -> list[tuple[str, bytes, int, bool]]:
        now = self.now_ms() if now_ms is None else now_ms
        with self.lock:
            replies = self.ingest.handle(topic, payload, now)
            if now >= self._next_eval:
                self.evaluate(now)
        return replies

    def _observe(self, msg: Any, now_ms: int) -> None:
        f = self.fleet
        if isinstance(msg, p.RecordBatch):
            f.observe_batch(msg, now_ms)
            self._queue_reviews(msg, now_ms)
        elif isinstance(msg, p.Status):
            f.observe_status(msg, now_ms)
        elif isinstance(msg, p.Telemetry):
            f.observe_telemetry(msg, now_ms)

    def tick(self, now_ms: int | None = None) -> list[AlertTransition]:
        """Evaluate rules without a message (devices that went silent) and move rollouts on; the service
        calls it every second."""
        with self.lock:
            now = self.now_ms() if now_ms is None else now_ms
            try:
                self.rollouts_service.tick(now)
            except Exception:  # rollouts never stop the alerts
                log.exception("rollout evaluation failed")
            return self.evaluate(now)

    # -- alerts ----------------------------------------------------------------------------------------

    def _restore_alerts(self, rules: RuleSet) -> AlertManager:
        """Alerts as the store last saw them, so a restart neither forgets nor re-fires them."""
        rows = self.store.alerts(["firing", "acknowledged"]) + self.store.alerts("resolved", limit=500)[::-1]
        live = [r["payload"] for r in rows if r["state"] != "resolved" and isinstance(r["payload"], dict)]
        done = [r["payload"] for r in rows if r["state"] == "resolved" and isinstance(r["payload"], dict)]
        try:
            return AlertManager.from_dict({"schema": ALERTS_SCHEMA, "live": live, "resolved": done}, rules)
        except AlertError as e:
            log.error("stored alert state not usable (%s); starting with no alerts", e)
            return AlertManager(rules)

    def evaluate(self, now_ms: int) -> list[AlertTransition]:
        if self.alerts is None:
            return []
        self._next_eval = now_ms + self.evaluate_every_ms
        transitions = self.alerts.evaluate(self.fleet, now_ms)
        for t in transitions:
            self._after_transition(t, now_ms)
        return transitions

    def _after_transition(self, t: AlertTransition, now_ms: int) -> None:
        self.counters["alert_transitions"] += 1
        alert = self.alerts.get(t.alert_id) if self.alerts is not None else None
        if alert is not None:
            self.store.upsert_alert(t.alert_id, rule=t.rule, subject=t.subject, state=t.after, severity=t.severity,
                                    payload=alert, updated_ms=now_ms)
        self._send(t)
        if t.retrain and t.after == "firing" and t.before is None:
            self._retrain(t, now_ms)

    def _send(self, t: AlertTransition) -> None:
        body = json.dumps(t.to_dict(), separators=(",", ":")).encode()
        sinks = self.rules.sinks if self.rules is not None else {}
        for name in t.sinks:
            sink = sinks.get(name)
            kind = sink.type if sink is not None else "log"
            try:
                if kind == "log":
                    level = logging.WARNING if t.after == "firing" else logging.INFO
                    log.log(level, "alert %s %s -> %s: %s", t.alert_id, t.before or "-", t.after, t.message)
                elif kind == "mqtt" and sink is not None and sink.topic:
                    if self.publish is not None:
                        self.publish(sink.topic, body, 1, False)
                elif kind == "webhook" and sink is not None and sink.url:
                    self._webhook(sink.url, sink.timeout_s or 5.0, body)
            except Exception as e:  # a sink's failure never stops ingest
                self.counters["sink_failures"] += 1
                log.warning("alert sink %s failed: %s", name, e)

    def notify(self, body: dict[str, Any], message: str) -> None:
        """Something people should know that is not an alert (a rollout waiting for approval): the log,
        and every MQTT and webhook sink of the rules file."""
        log.warning("%s", message)
        data = json.dumps(body, separators=(",", ":")).encode()
        for name, sink in (self.rules.sinks if self.rules is not None else {}).items():
            try:
                if sink.type == "mqtt" and sink.topic and self.publish is not None:
                    self.publish(sink.topic, data, 1, False)
                elif sink.type == "webhook" and sink.url:
                    self._webhook(sink.url, sink.timeout_s or 5.0, data)
            except Exception as e:  # a sink's failure never stops the caller
                self.counters["sink_failures"] += 1
                log.warning("sink %s failed: %s", name, e)

    def _webhook(self, url: str, timeout_s: float, body: bytes) -> None:
        """Queue a POST; one background thread sends them, so a slow endpoint never blocks ingest."""
        if self._webhook_thread is None:
            self._webhook_thread = threading.Thread(target=self._post_loop, name="webhooks", daemon=True)
            self._webhook_thread.start()
        try:
            self._webhooks.put_nowait((url, timeout_s, body))
        except queue.Full:
            self.counters["sink_failures"] += 1

    def _post_loop(self) -> None:
        while True:
            url, timeout_s, body = self._webhooks.get()
            req = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                    resp.read(1024)
            except Exception as e:
                with self.lock:
                    self.counters["sink_failures"] += 1
                log.warning("webhook %s failed: %s", url, e)

    def alert_list(self, state: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return self.alerts.alerts(state) if self.alerts is not None else []

    def ack_alert(self, alert_id: str, by: str) -> dict[str, Any]:
        """Acknowledge a firing alert: KeyError for an unknown id, ValueError when it is not firing."""
        with self.lock:
            if self.alerts is None or self.alerts.get(alert_id) is None:
                raise KeyError(alert_id)
            now = self.now_ms()
            try:
                t = self.alerts.ack(alert_id, by, now)
            except AlertError as e:
                raise ValueError(str(e)) from e
            self._after_transition(t, now)
            return self.alerts.get(alert_id) or {}

    # -- retraining ------------------------------------------------------------------------------------

    def _retrain(self, t: AlertTransition, now_ms: int) -> None:
        rule = self.rules.rule(t.rule) if self.rules is not None else None
        model = t.subject.split("@", 1)[0] if "@" in t.subject else (rule.model if rule and rule.model else "*")
        window_ms = 24 * 3600 * 1000
        request = {"id": f"rt-{t.alert_id}", "model": model, "reason": t.message, "alert": t.to_dict(),
                   "data_window": {"since_ms": now_ms - window_ms, "until_ms": now_ms},
                   "metrics": {"value": t.value, "threshold": t.threshold, "subject": t.subject},
                   "created_ms": now_ms}
        if not self.store.add_retrain_request(request["id"], model=model, reason=t.message, payload=request,
                                              created_ms=now_ms):
            return
        self.counters["retrain_requests"] += 1
        log.warning("retraining requested for %s: %s", model, t.message)
        if self.retrain_topic and self.publish is not None:
            self.publish(self.retrain_topic, json.dumps(request, separators=(",", ":")).encode(), 1, False)
            self.store.update_retrain_request(request["id"], state="published", updated_ms=now_ms)
        if self.retrain_command:
            threading.Thread(target=self._run_retrain, args=(request,), name="retrain", daemon=True).start()

    def _run_retrain(self, request: dict[str, Any]) -> None:
        """Run the configured command with the request as a JSON file (its path is the last argument and
        ``$RETRAIN_REQUEST``); record the outcome. A hung command is stopped after an hour."""
        self.retrain_dir.mkdir(parents=True, exist_ok=True)
        req_file = self.retrain_dir / f"{request['id']}.json"
        req_file.write_text(json.dumps(request, indent=2), encoding="utf-8")
        argv = [*shlex.split(self.retrain_command or ""), str(req_file)]
        start = time.monotonic()
        self.store.update_retrain_request(request["id"], state="running", updated_ms=self.now_ms())
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False,
                                  env={**os.environ, "RETRAIN_REQUEST": str(req_file)})
            outcome = {"exit_code": proc.returncode, "seconds": round(time.monotonic() - start, 1),
                       "stdout_tail": proc.stdout[-2000:], "stderr_tail": proc.stderr[-2000:]}
            state = "succeeded" if proc.returncode == 0 else "failed"
        except (OSError, subprocess.TimeoutExpired) as e:
            outcome, state = {"error": str(e)}, "failed"
        self.store.update_retrain_request(request["id"], state=state, updated_ms=self.now_ms(), outcome=outcome)
        log.log(logging.INFO if state == "succeeded" else logging.ERROR, "retraining %s %s: %s", request["id"], state,
                outcome)

    def retrain_requests(self, state: str | None = None) -> list[dict[str, Any]]:
        return self.store.retrain_requests(state)

    # -- review queue ----------------------------------------------------------------------------------

    def _queue_reviews(self, batch: p.RecordBatch, now_ms: int) -> None:
        """Review items: the samples devices chose to send (``s`` records: low confidence, inputs after a
        drift alarm, maybe with the input), then low-confidence predictions the cloud picks itself from
        ``p`` records; one item per prediction, within the per-device hourly cap."""
        hour = now_ms // 3_600_000
        samples = [r for r in batch.records if r.kind == p.SAMPLE]
        predictions = [r for r in batch.records if r.kind == p.PREDICTION
                       and (self.review_below is not None or r.payload.get("st") == "pending_review")]
        for r in (*samples, *predictions):
            pl = r.payload
            score, pid = pl.get("p"), pl.get("i")
            if not isinstance(pid, str) or (score is not None and not isinstance(score, int | float)):
                continue
            if r.kind == p.SAMPLE:
                reason = pl.get("reason") if pl.get("reason") in ("low_confidence", "drift") else "device"
            elif pl.get("st") == "pending_review":  # level 4: the device holds it back until a person decides
                reason = "review_rule"
            elif score is None or score >= (self.review_below or 0):
                continue
            else:
                reason = "low_confidence"
            model = pl.get("m") if isinstance(pl.get("m"), str) else "?"
            item = {"prediction_id": pid, "label": pl.get("y"), "score": score, "model": model,
                    "boot_id": batch.boot_id, "seq": r.seq, "created_ms": r.created_ms, "reason": reason}
            if isinstance(pl.get("input"), dict):
                item["input"] = pl["input"]
            self._add_review(batch.device_id, pid, model, item, now_ms)
        if len(self._review_quota) > 10_000:  # old hours
            self._review_quota = {k: v for k, v in self._review_quota.items() if k[1] >= hour}

    def _add_review(self, device_id: str, pid: str, model: str, item: dict[str, Any], now_ms: int) -> bool:
        """One review item per prediction (``<device>:<prediction id>``), within the device's hourly cap;
        False when over the cap or already queued. Call with the lock held."""
        key = (device_id, now_ms // 3_600_000)
        if self._review_quota.get(key, 0) >= self.review_per_device_hour:
            return False
        if not self.store.add_review(f"{device_id}:{pid}", device_id=device_id, model=model, payload=item,
                                     created_ms=now_ms):
            return False
        self._review_quota[key] = self._review_quota.get(key, 0) + 1
        self.counters["reviews_added"] += 1
        return True

    def review_escalation(self, msg: p.Escalation, answer: p.EscalationAnswer, now_ms: int) -> bool:
        """Both answers to an escalated input, as one review item (the prediction's id, so a
        low-confidence pick of the same prediction does not queue it twice), within the hourly cap."""
        item = {"prediction_id": msg.id, "label": msg.local_label, "score": msg.local_score, "model": msg.model,
                "model_version": msg.version, "created_ms": msg.sent_ms, "reason": "escalation",
                "escalation_reasons": list(msg.reasons),
                "cloud": {"label": answer.label, "score": answer.score, "model": answer.cloud_model}}
        with self.lock:
            return self._add_review(msg.device_id, msg.id, msg.model, item, now_ms)

    def review_items(self, state: str = "pending", limit: int = 100) -> list[dict[str, Any]]:
        if state not in REVIEW_STATES:
            raise ValueError(f"state must be one of {REVIEW_STATES}, got {state!r}")
        return self.store.reviews(state, limit=limit)

    def review_resolve(self, item_id: str, label: Any, by: str) -> dict[str, Any]:
        """A person's verdict: ``label`` equal to the predicted one confirms it, else corrects it. The true
        label goes to the device (``cmd/labels``, concept drift there) and into the fleet's accuracy."""
        if not isinstance(by, str) or not by.strip():
            raise ValueError("'by' must name the reviewer")
        if not isinstance(label, int | str) or isinstance(label, bool):
            raise ValueError(f"label must be an integer or a string, got {type(label).__name__}")  # noqa: TRY004 - a 400
        with self.lock:
            item = self.store.review(item_id)
            if item is None:
                raise KeyError(item_id)
            if item["state"] != "pending":
                raise ValueError(f"review {item_id} is already {item['state']}")
            pred = item["payload"]
            correct = str(label) == str(pred.get("label"))
            now = self.now_ms()
            self.store.resolve_review(item_id, state="confirmed" if correct else "corrected", label=label,
                                      reviewed_by=by, reviewed_ms=now)
            version = self._version_of(item["device_id"], item["model"])
            self.fleet.observe_label(item["device_id"], item["model"], version, correct, now)
            if self.publish is not None:
                fb = p.LabelFeedback(item["device_id"], f"rv-{now}", (p.Label(pred["prediction_id"], label),))
                self.publish(fb.topic, fb.to_wire(), fb.QOS, fb.RETAIN)
            return self.store.review(item_id) or {}

    def _version_of(self, device_id: str, model: str) -> str:
        dev = self.fleet.device(device_id, self.now_ms()) or {}
        for m in dev.get("models", []):
            if m.get("name") == model and m.get("version"):
                return str(m["version"])
        return "unknown"

    # -- views -------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            snap = self.fleet.snapshot(self.now_ms())
            alerts = self.alerts.alerts() if self.alerts is not None else []
            snap["alerts"] = {s: sum(1 for a in alerts if a["state"] == s)
                              for s in ("firing", "acknowledged", "resolved")}
            s = self.ingest.stats
            snap["ingest"] = {"messages": s.messages, "batches": s.batches, "records_new": s.records_new,
                              "records_duplicate": s.records_duplicate, "rejected": dict(s.rejected),
                              **self.counters}
            return snap

    def devices(self) -> list[dict[str, Any]]:
        with self.lock:
            return self.fleet.devices(self.now_ms())

    def device(self, device_id: str) -> dict[str, Any] | None:
        with self.lock:
            return self.fleet.device(device_id, self.now_ms())

    def models(self) -> list[dict[str, Any]]:
        with self.lock:
            return self.fleet.models(self.now_ms())

    def drift(self) -> list[dict[str, Any]]:
        with self.lock:
            return self.fleet.drift(self.now_ms())

    def rollouts(self) -> list[dict[str, Any]]:
        """Every rollout's summary, the newest first (details: ``rollouts_service.detail``)."""
        return self.rollouts_service.list()

    def close(self) -> None:
        self.store.close()
