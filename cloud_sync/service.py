"""`cloud-sync serve`: the ingest worker wired to MQTT and the store. Owns the thread and the clock.

MQTT callbacks only enqueue (bounded); one worker thread validates, commits and acks in order.
With MQTT 5 the records subscription is shared (``$share/<group>/...``) so several workers split the
load; the embedded broker speaks MQTT 3.1.1, where one plain subscription is used. The worker also
ticks the hub every second (alert rules about silence, rollouts); bundles for rollouts go out on the
same connection, their acknowledgements counted by a :class:`~cloud_sync.distribute.PublishWindow`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from cloud_sync.distribute import PublishWindow
from cloud_sync.hub import Hub
from cloud_sync.rules import RuleSet
from cloud_sync.store import open_store
from edge_runtime.adapters.mqtt_transport import BrokerConfig, MqttTransport
from edge_runtime.core import protocol as p

log = logging.getLogger(__name__)


class IngestService:
    def __init__(self, broker_url: str, db: str, *, client_id: str = "cloud-sync", group: str = "ingest",
                 queue_size: int = 10000, username: str | None = None, password: str | None = None,
                 rules: RuleSet | None = None, keep_predictions_s: float | None = None,
                 keep_history_s: float | None = None, escalation_models: dict[str, Any] | None = None,
                 **hub_options: Any) -> None:
        self.store = open_store(db)
        self.keep_predictions_s = keep_predictions_s
        self.keep_history_s = keep_history_s
        cfg = BrokerConfig.from_url(broker_url, client_id)
        if username:
            cfg = BrokerConfig(**{**cfg.__dict__, "username": username, "password": password})
        # Bundle publishes wait for their broker acknowledgements through the window.
        self.window = PublishWindow()
        self.transport = MqttTransport(cfg, on_message=self._enqueue, on_publish_result=self.window.on_result,
                                       on_connection_change=self._connection)
        self.hub = Hub(self.store, rules=rules, publish=self._publish, bundle_transport=self.transport,
                       bundle_window=self.window, **hub_options)
        self.ingest = self.hub.ingest
        self.queue: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=queue_size)
        self.dropped_full = 0
        records = (p.shared_subscription(group, p.RecordBatch.KIND) if cfg.protocol == 5
                   else p.fleet_subscription(p.RecordBatch.KIND))
        self.transport.subscribe(records, qos=1)
        self.transport.subscribe(p.fleet_subscription(p.Status.KIND), qos=1)
        self.transport.subscribe(p.fleet_subscription(p.Telemetry.KIND), qos=0)
        self.escalation = None
        if escalation_models:
            from cloud_sync.escalation import EscalationServer

            # Answers have a deadline of seconds on the device: their own queue and thread, not the ingest's.
            self.escalation = EscalationServer(escalation_models, self._publish, review=self.hub.review_escalation)
            self.transport.subscribe(self.escalation.subscription(), qos=0)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="ingest", daemon=True)

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        """False when the transport did not take the message (not connected)."""
        return self.transport.publish(topic, payload, qos=qos, retain=retain) is not None

    def _connection(self, up: bool) -> None:
        if up and hasattr(self, "hub"):  # a broker may have lost its retained messages: rollout orders again
            self.hub.rollouts_service.resend()

    def _enqueue(self, topic: str, payload: bytes) -> None:
        if self.escalation is not None and self.escalation.wants(topic):
            self.escalation.offer(topic, payload)
            return
        try:
            self.queue.put_nowait((topic, payload))
        except queue.Full:
            # Not lost: unacked records are resent by the devices.
            self.dropped_full += 1

    def _work(self) -> None:
        next_tick = time.monotonic() + 1.0
        next_prune = time.monotonic() + 60.0
        while not self._stop.is_set():
            if time.monotonic() >= next_tick:  # rules about silence (offline devices) need a clock
                next_tick = time.monotonic() + 1.0
                try:
                    self.hub.tick()
                except Exception:
                    log.exception("alert and rollout evaluation failed")
            if time.monotonic() >= next_prune and (self.keep_predictions_s or self.keep_history_s):
                next_prune = time.monotonic() + 600.0
                self.prune()
            try:
                topic, payload = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                replies = self.hub.handle(topic, payload, int(time.time() * 1000))
            except Exception:  # a store failure: no ack, the device resends
                log.exception("ingest failed for a message on %s", topic)
                continue
            for t, body, qos, retain in replies:
                self.transport.publish(t, body, qos=qos, retain=retain)

    def prune(self) -> int:
        """Retention (in chunks: the ingest waits for one chunk at most); returns the rows deleted."""
        try:
            with self.hub.lock:
                n = self.store.prune(int(time.time() * 1000), self.keep_predictions_s,
                                     history_max_age_s=self.keep_history_s)
        except Exception:
            log.exception("retention failed; trying again later")
            return 0
        if n:
            log.info("retention: %d old rows deleted", n)
        return n

    def start(self) -> None:
        if self.escalation is not None:
            self.escalation.start()
        self._worker.start()
        self.transport.start()

    def stop(self) -> None:
        self._stop.set()
        self.transport.stop()
        self._worker.join(5)
        if self.escalation is not None:
            self.escalation.stop()
        self.store.close()

    def stats(self) -> dict[str, Any]:
        s = self.ingest.stats
        return {"messages": s.messages, "batches": s.batches, "records_new": s.records_new,
                "records_duplicate": s.records_duplicate, "rejected": dict(s.rejected),
                "queue_full_drops": self.dropped_full, "connected": self.transport.connected,
                **({"escalation": self.escalation.stats()} if self.escalation is not None else {})}
