"""Ingest: what the cloud does with one message from a device. No MQTT and no threads here.

``handle(topic, payload, now_ms)`` validates the message, commits records to the store (deduplicated
on their key) and returns the replies to publish, which include the :class:`Ack` that lets the device
delete what was committed. A bad message is counted by reason and dropped; nothing raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.core import protocol as p

log = logging.getLogger(__name__)


@dataclass
class IngestStats:
    messages: int = 0
    records_new: int = 0
    records_duplicate: int = 0
    batches: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # ProtocolError reason -> count

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


class Ingest:
    def __init__(self, store: Any, max_bytes: int = p.DEFAULT_MAX_BYTES, *,
                 observe: Callable[[Any, int], None] | None = None) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.stats = IngestStats()
        # Sees every valid message after its commit (the fleet view); its failure never blocks an ack.
        self.observe = observe

    def handle(self, topic: str, payload: bytes, now_ms: int) -> list[tuple[str, bytes, int, bool]]:
        """Replies as (topic, payload, qos, retain)."""
        self.stats.messages += 1
        try:
            msg = p.decode(topic, payload, max_bytes=self.max_bytes)
        except p.ProtocolError as e:
            self.stats.reject(e.reason)
            if self.stats.rejected[e.reason] <= 5:
                log.warning("dropped a message on %s: %s", topic, e)
            if e.batch_id is not None:
                # A batch that can never validate: tell the device, or it would resend it forever.
                try:
                    info = p.parse_topic(topic)
                    ack = p.Ack(info.device_id, e.batch_id, (), rejected=e.reason)
                    return [(ack.topic, ack.to_wire(), ack.QOS, ack.RETAIN)]
                except p.ProtocolError:
                    return []
            return []
        replies = self._apply(msg, now_ms)
        if self.observe is not None and replies is not None:
            try:
                self.observe(msg, now_ms)
            except Exception:
                self.stats.reject("observer_failed")
                log.exception("the fleet view failed on a message on %s", topic)
        return replies or []

    def _apply(self, msg: Any, now_ms: int) -> list[tuple[str, bytes, int, bool]] | None:
        """Commit one valid message; its replies, or None for a message of an unexpected direction."""
        if isinstance(msg, p.RecordBatch):
            new, dup = self.store.insert_records(msg.device_id, msg.boot_id, msg.records, now_ms)
            self.stats.batches += 1
            self.stats.records_new += new
            self.stats.records_duplicate += dup
            ack = p.Ack(msg.device_id, msg.batch_id, (p.BootRanges(msg.boot_id, msg.ranges),))
            return [(ack.topic, ack.to_wire(), ack.QOS, ack.RETAIN)]
        if isinstance(msg, p.Status):
            self.store.upsert_status(msg.device_id, msg.online, msg.boot_id, now_ms,
                                     {"agent_version": msg.agent_version, "time_ms": msg.time_ms,
                                      "models": [{"name": m.name, "version": m.version, "state": m.state}
                                                 for m in msg.models], "tags": list(msg.tags)})
            return []
        if isinstance(msg, p.Telemetry):
            return []  # the live view only (the fleet state keeps the latest per device)
        self.stats.reject("unexpected_direction")
        return None
