"""The agent's link to the cloud: the durable outbox, the MQTT transport and the sync thread.

Pipelines hand predictions to :meth:`Uplink.prediction` (an in-memory append, no I/O); the sync
thread commits them to SQLite every ``flush_interval_s`` in one transaction, sends them in batches
and deletes them when the cloud acknowledges its commit. The device's retained ``status`` says
online; its Last Will says offline.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_runtime import __version__
from edge_runtime.core import protocol as p

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UplinkConfig:
    broker_url: str
    device_id: str
    buffer_path: str
    buffer_max_mb: float | None = 256.0
    buffer_max_age_s: float | None = 7 * 24 * 3600.0
    synchronous: str = "NORMAL"
    sample_every: int = 1
    flush_interval_s: float = 0.05
    window: int = 4
    resend_after_s: float = 10.0
    tags: tuple[str, ...] = ()  # reported in the retained status (rollout targeting)
    broker_options: dict[str, Any] = field(default_factory=dict)  # username, password, ca/cert/key files


class Uplink:
    def __init__(self, cfg: UplinkConfig, *, models: list[tuple[str, str]] | None = None) -> None:
        from edge_runtime.adapters.mqtt_transport import BrokerConfig, MqttTransport
        from edge_runtime.adapters.sqlite_buffer import Buffer, BufferConfig
        from edge_runtime.sync import Sync

        self.cfg = cfg
        self.device_id = p.validate_device_id(cfg.device_id)
        self.boot_id = uuid.uuid4().hex[:16]
        self.models = models or []
        self.buffer = Buffer.open(BufferConfig(path=cfg.buffer_path, device_id=self.device_id,
                                               max_mb=cfg.buffer_max_mb, max_age_s=cfg.buffer_max_age_s,
                                               synchronous=cfg.synchronous, sample_every=cfg.sample_every),
                                  now=time.time(), boot_id=self.boot_id)
        if self.buffer.recovered_from:
            log.error("outbox was corrupt; moved aside to %s", self.buffer.recovered_from)
        self.sync = Sync(self.buffer, self._publish, self.device_id, window=cfg.window,
                         resend_after_s=cfg.resend_after_s, on_labels=self._labels, on_command=self._command)
        self.command_sinks: list[Callable[[p.Command], None]] = []  # rollout deployers, config
        # (name, version, state) of each model for the retained status; None: self.models, all active
        self.models_fn: Callable[[], list[tuple[str, str, str]]] | None = None
        # Label feedback names a prediction by the id in its record ("i"); ``label_sink`` resolves it
        # (a FeedbackRouter) and says whether the id was known.
        self._model_json: dict[str, str] = {}
        self.label_sink: Callable[[Any, Any], bool] | None = None
        self.labels_unresolved = 0
        self._conn = 0  # connections of this boot: the will and the online status carry the number
        # Messages a component claims first (bundle chunks for a rollout's download), then the sync loop.
        self.message_routes: list[Callable[[str, bytes], bool]] = []
        self.tick_hooks: list[Callable[[], None]] = []  # run on the sync thread every round
        broker = BrokerConfig.from_url(cfg.broker_url, self.device_id)
        if cfg.broker_options:
            broker = BrokerConfig(**{**broker.__dict__, **cfg.broker_options,
                                     "tls": broker.tls or bool(cfg.broker_options.get("ca_file"))})
        self.transport = MqttTransport(broker,
                                       on_message=self._on_message, on_connection_change=self._on_connection,
                                       will=self._next_will)
        self.transport.subscribe(p.device_subscription(self.device_id), qos=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sync", daemon=True)
        self._status_due = False

    # -- the hot path: in-memory appends only -----------------------------------------------------

    def prediction(self, model: str, label: Any, score: float | None, created: float, pid: str,
                   status: str = "final") -> None:
        """Queue one prediction record under its id ``pid`` (what label feedback refers to). ``status``
        (``shadow``, ``suggestion``, ``pending_review``) is written as ``"st"``; absent means final."""
        m = self._model_json.get(model)
        if m is None:
            m = self._model_json[model] = json.dumps(model)
        y = label if type(label) is int else json.dumps(label)
        i = json.dumps(pid)
        st = "" if status == "final" else f',"st":"{status}"'
        if score is None or not math.isfinite(score):  # NaN is not JSON: leave the score out
            body = f'{{"i":{i},"m":{m},"y":{y}{st}}}'
        else:
            body = f'{{"i":{i},"m":{m},"y":{y},"p":{score:.6g}{st}}}'
        self.buffer.append("prediction", body.encode(), created)

    def _labels(self, msg: p.LabelFeedback) -> None:
        """Sync thread: hand each label to ``label_sink``, which routes it by prediction id."""
        for item in msg.labels:
            if self.label_sink is None or not self.label_sink(item.ref, item.label):
                self.labels_unresolved += 1

    def _next_will(self) -> tuple[str, bytes, int, bool]:
        """The Last Will of the next connection (the transport asks before every connect)."""
        self._conn += 1
        will = p.last_will(self.device_id, self.boot_id, time_ms=int(time.time() * 1000), agent_version=__version__,
                           conn=self._conn)
        return will.topic, will.to_wire(), will.QOS, will.RETAIN

    def _on_message(self, topic: str, payload: bytes) -> None:
        for route in self.message_routes:
            if route(topic, payload):
                return
        self.sync.on_message(topic, payload)

    def _command(self, cmd: p.Command) -> None:
        for sink in self.command_sinks:
            sink(cmd)

    def status_changed(self) -> None:
        """A model's version or state changed: publish the retained status again (from the sync thread)."""
        self._status_due = True

    def record(self, kind: str, payload: dict[str, Any], created: float) -> None:
        self.buffer.append(kind, json.dumps(payload, separators=(",", ":")).encode(), created)

    def telemetry(self, metrics: dict[str, Any]) -> None:
        """Publish a live snapshot (QoS 0, not buffered: the next one replaces a lost one)."""
        if not self.transport.connected:
            return
        metrics = {**metrics, "pending": self.buffer.pending_count()}
        try:
            msg = p.Telemetry(self.device_id, self.boot_id, int(time.time() * 1000), metrics)
            self.transport.publish(msg.topic, msg.to_wire(), qos=msg.QOS, retain=msg.RETAIN)
        except p.ProtocolError as e:  # e.g. a snapshot over the size cap: log, the durable metrics still go
            log.warning("telemetry not sent: %s", e)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self.transport.start()
        self._thread.start()

    def _on_connection(self, up: bool) -> None:
        self.sync.on_connection(up)
        if up:
            self._status_due = True

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> int | None:
        return self.transport.publish(topic, payload, qos=qos, retain=retain)

    def _status(self, online: bool) -> None:
        models = self.models_fn() if self.models_fn is not None else [(n, v, "active") for n, v in self.models]
        st = p.Status(self.device_id, online, self.boot_id, int(time.time() * 1000), __version__,
                      tuple(p.ModelStatus(n, v, s) for n, v, s in models), self.cfg.tags, self._conn)
        self.transport.publish(st.topic, st.to_wire(), qos=st.QOS, retain=st.RETAIN)

    def _run(self) -> None:
        next_trim = time.monotonic() + 10
        while not self._stop.is_set():
            self._tick()
            if time.monotonic() >= next_trim:
                next_trim += 10
                self.buffer.trim(time.time())
            self._stop.wait(self.cfg.flush_interval_s)

    def _tick(self) -> None:
        try:
            self.buffer.flush()
            if self._status_due and self.transport.connected:
                self._status_due = False
                self._status(True)
            self.sync.tick(time.monotonic())
            for hook in self.tick_hooks:
                hook()
        except Exception:  # the outbox or the link failed this round: log, keep serving, try again
            log.exception("sync round failed")

    def stop(self, drain_timeout_s: float = 5.0) -> dict[str, Any]:
        """Flush, try to drain for up to ``drain_timeout_s``, say offline, close. Records not acked stay
        in the outbox for the next start."""
        self._stop.set()
        self._thread.join(5)
        deadline = time.monotonic() + drain_timeout_s
        self._tick()
        while self.buffer.pending_count() and self.transport.connected and time.monotonic() < deadline:
            time.sleep(0.05)
            self._tick()
        if self.transport.connected:
            self._status(False)
            time.sleep(0.1)
        self.transport.stop()
        report = self.report()
        self.buffer.close()
        return report

    def report(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "boot_id": self.boot_id, "broker": self.cfg.broker_url,
                "connected": self.transport.connected, "pending": self.buffer.pending_count(),
                "buffer": self.buffer.stats().to_dict(), "sync": self.sync.stats.to_dict(),
                "labels_unresolved": self.labels_unresolved}
