"""Sync: drains the outbox to the cloud in order and deletes only what the cloud acknowledged.

Records go out in batches (many per message, size-capped), at most ``window`` batches in flight. A
batch leaves the outbox only when the cloud's :class:`~edge_runtime.core.protocol.Ack` names its
keys, which the cloud sends after its store commit; a broker PUBACK proves nothing (brokers drop
QoS 1 messages for slow or absent subscribers). A batch without an ack after ``resend_after_s`` is
sent again, and on every reconnect everything unacked is sent again from the oldest: the cloud
dedupes on ``(device_id, boot_id, seq)``, so at-least-once delivery gives exactly-once storage.

``tick(now)`` does one round of work and owns no thread; the runtime calls it from its sync thread.
Acks arrive on the MQTT thread and are only queued here (``on_message``).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.core import protocol as p

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    batch_id: str
    topic: str
    payload: bytes
    keys: list[Any]
    sent_at: float


@dataclass
class SyncStats:
    batches_sent: int = 0
    batches_resent: int = 0
    records_acked: int = 0
    acks: int = 0
    batches_rejected: int = 0
    records_set_aside: int = 0
    bad_messages: dict[str, int] = field(default_factory=dict)
    labels_received: int = 0
    commands_received: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "bad_messages": dict(self.bad_messages)}


class Sync:
    def __init__(self, buffer: Any, publish: Callable[[str, bytes, int, bool], int | None], device_id: str, *,
                 window: int = 4, max_batch_bytes: int = 64 * 1024, max_records: int = 1000,
                 resend_after_s: float = 10.0, on_labels: Callable[[p.LabelFeedback], None] | None = None,
                 on_command: Callable[[p.Command], None] | None = None) -> None:
        self.buffer = buffer
        self.publish = publish
        self.device_id = p.validate_device_id(device_id)
        self.window = window
        self.max_batch_bytes = max_batch_bytes
        self.max_records = max_records
        self.resend_after_s = resend_after_s
        self.on_labels = on_labels
        self.on_command = on_command  # rollout and config orders (retained: may repeat on every reconnect)
        self.stats = SyncStats()
        self._inflight: collections.OrderedDict[str, _InFlight] = collections.OrderedDict()
        self._inbox: collections.deque[bytes | tuple[str, bytes]] = collections.deque(maxlen=10000)
        self._connected = False
        self._reconnected = threading.Event()
        self._ack_topic = p.build_topic(self.device_id, p.Ack.KIND)
        self._labels_topic = p.build_topic(self.device_id, p.LabelFeedback.KIND)

    # -- called from the MQTT thread: hand off only ------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> None:
        self._inbox.append((topic, payload))

    def on_connection(self, up: bool) -> None:
        self._connected = up
        if up:
            self._reconnected.set()

    # -- the sync thread ------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Apply received acks, then fill the in-flight window (resending what timed out)."""
        self._drain_inbox()
        if self._reconnected.is_set():
            # The broker may have no session for us: what was in flight is sent again from the oldest.
            self._reconnected.clear()
            self._inflight.clear()
        if not self._connected:
            return
        for f in self._inflight.values():
            if now - f.sent_at >= self.resend_after_s:
                if self.publish(f.topic, f.payload, p.RecordBatch.QOS, False) is None:
                    return
                f.sent_at = now
                self.stats.batches_resent += 1
        while len(self._inflight) < self.window:
            if not self._send_next(now):
                break

    def _send_next(self, now: float) -> bool:
        after = self._inflight[next(reversed(self._inflight))].keys[-1] if self._inflight else None
        rows = self.buffer.peek(self.max_records, self.max_batch_bytes, after=after)
        if not rows:
            return False
        boot = rows[0].key.boot_id
        end = next((i for i, r in enumerate(rows) if r.key.boot_id != boot), len(rows))
        same_boot = rows[:end]
        records = []
        for r in same_boot:
            try:
                payload = json.loads(r.payload)
            except ValueError:
                payload = {"undecodable": r.payload[:200].decode("utf-8", "replace")}
            records.append(p.Record(r.key.seq, p.RECORD_KIND_CODES.get(r.kind, r.kind[:1]),
                                    round(r.created * 1000), payload))
        try:
            packed = p.pack_batches(records, self.max_batch_bytes + 4096, device_id=self.device_id, boot_id=boot)
        except p.ProtocolError as e:
            # A record that can never travel would block the outbox forever: set it aside, counted.
            bad = [r.key for r in same_boot if r.key.seq == e.seq] or [same_boot[0].key]
            self.buffer.ack(bad)
            self.stats.records_set_aside += len(bad)
            log.error("record %s cannot be sent (%s); removed from the outbox", bad[0], e)
            return True
        first = packed[0]
        keys = [r.key for r in same_boot[first.start:first.stop]]
        if self.publish(first.topic, first.payload, p.RecordBatch.QOS, False) is None:
            return False
        self._inflight[first.batch_id] = _InFlight(first.batch_id, first.topic, first.payload, keys, now)
        self.stats.batches_sent += 1
        return True

    def _drain_inbox(self) -> None:
        while self._inbox:
            topic, payload = self._inbox.popleft()  # type: ignore[misc]
            try:
                msg = p.decode(topic, payload)
            except p.ProtocolError as e:
                self.stats.bad_messages[e.reason] = self.stats.bad_messages.get(e.reason, 0) + 1
                if self.stats.bad_messages[e.reason] <= 5:
                    log.warning("dropped a message on %s: %s", topic, e)
                continue
            if isinstance(msg, p.Ack) and msg.device_id == self.device_id:
                self._apply_ack(msg)
            elif isinstance(msg, p.LabelFeedback) and msg.device_id == self.device_id:
                self.stats.labels_received += len(msg.labels)
                if self.on_labels is not None:
                    self.on_labels(msg)
            elif isinstance(msg, p.Command) and msg.device_id == self.device_id:
                self.stats.commands_received += 1
                if self.on_command is not None:
                    try:
                        self.on_command(msg)
                    except Exception:  # an order's handler must not stop the sync loop
                        log.exception("handling command %s failed", msg.command_id)

    def _apply_ack(self, ack: p.Ack) -> None:
        self.stats.acks += 1
        if ack.rejected:
            f = self._inflight.pop(ack.batch_id, None)
            if f is not None:
                self.buffer.ack(f.keys)
                self.stats.batches_rejected += 1
                log.error("the cloud rejected batch %s (%s): its %d records are dropped", ack.batch_id,
                          ack.rejected, len(f.keys))
            return
        from edge_runtime.adapters.sqlite_buffer import Key

        keys = [Key(self.device_id, br.boot_id, seq) for br in ack.acked
                for seq in p.ranges_to_seqs(br.ranges)]
        self.stats.records_acked += self.buffer.ack(keys)
        self._inflight.pop(ack.batch_id, None)
