"""Escalation in the agent: one :class:`Escalator` per pipeline sends the inputs its model is unsure of
to a larger model in the cloud, and takes the cloud's answer when it comes back in time.

The pipeline thread calls :meth:`Escalator.consider` once per batch, after the local answers were
delivered: the decision, the budget and the encoding are pure (``core.escalation``) and cost a few
microseconds; a publish is a QoS 0 hand-off to the MQTT client (never a wait on the network; while
the link is down nothing is sent and the local answer stands). Answers arrive on the MQTT thread
(:meth:`answer`); deadlines pass on the sync thread (:meth:`tick`). One lock guards the table of
answers awaited, held only for dictionary work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_runtime.core import protocol as p
from edge_runtime.core.escalation import Budget, EscalationPolicy, PendingAnswers, Settled, decide, encode_payload

log = logging.getLogger("edge_runtime.escalate")

ANSWER_TOPIC_SUFFIX = "/cmd/answer"


class Escalator:
    """Escalations of one pipeline.

    ``publish(msg)`` sends one :class:`~edge_runtime.core.protocol.Escalation` and returns whether it
    went out. ``on_final(settled, model)`` is called (MQTT thread) for each cloud answer that arrived
    within the deadline: the caller records it as the final answer.
    """

    def __init__(self, name: str, device_id: str, policy: EscalationPolicy,
                 publish: Callable[[p.Escalation], bool], *,
                 on_final: Callable[[Settled], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, max_pending: int = 1024) -> None:
        if not policy.publishes:
            raise ValueError(f"{name}: {policy.describe()}")
        self.name = name
        self.device_id = device_id
        self.policy = policy
        self.publish = publish
        self.on_final = on_final
        self.clock = clock
        self.budget = Budget.from_policy(policy)
        self.pending = PendingAnswers(policy.deadline_s, max_pending)
        self.scores_index: int | None = None        # set by bind(): which output holds the class scores
        self.drift_active: Callable[[], bool] = lambda: False
        self.version: Callable[[], str] = lambda: ""
        self.input_name = ""                         # a record that is a dict (stdin, MQTT) holds it under this
        self.counts = {"marked": 0, "sent": 0, "over_budget": 0, "not_encoded": 0, "offline": 0, "on_time": 0,
                       "late": 0, "expired": 0, "unknown": 0, "malformed": 0, "agreed": 0, "changed": 0}
        self._lock = threading.Lock()

    def bind(self, pipeline: Any) -> None:
        """Read the score output, the version and the drift state from ``pipeline`` (after it is built)."""
        self.scores_index = pipeline.postprocess.scores_index
        if self.scores_index is None:
            raise ValueError(f"{self.name}: escalation needs a model with a score output, "
                             f"{pipeline.engine.name} has none")
        self.version = lambda: pipeline.version or ""
        self.input_name = pipeline.first_input
        if self.policy.on_drift:
            def drift_open() -> bool:
                mon = pipeline.drift
                return mon is not None and any(a.is_open for a in mon.alarms)
            self.drift_active = drift_open

    # -- pipeline thread ------------------------------------------------------------------------------

    def consider(self, ids: list[str], records: list[Any], labels: list[Any], outputs: list[Any]) -> int:
        """Send the unsure inputs of one batch; returns how many went out."""
        if self.scores_index is None:
            return 0
        scores = outputs[self.scores_index]
        d = decide(self.policy, scores, self.drift_active() if self.policy.on_drift else False)
        if not d.any:
            return 0
        now = self.clock()
        sent = 0
        version = self.version()
        pol = self.policy
        for i in d.indices():
            self.counts["marked"] += 1
            rec = records[i]
            if isinstance(rec, dict):
                rec = rec.get(self.input_name, rec.get("input"))
            enc = encode_payload(np.asarray(rec, dtype=np.float32) if isinstance(rec, list) else rec, pol.share,
                                 pol.max_payload_bytes, max_side=pol.downscale_max_side)
            if not enc.ok:
                self.counts["not_encoded"] += 1
                if self.counts["not_encoded"] <= 3:
                    log.warning("%s: input %s not escalated: %s (%s)", self.name, ids[i], enc.reason, enc.detail)
                continue
            if not self.budget.try_take(len(enc.data), now):
                self.counts["over_budget"] += 1
                continue
            row = scores[i]
            label = labels[i]
            score = float(row[label]) if isinstance(label, int) and 0 <= label < len(row) else None
            msg = p.Escalation(self.device_id, ids[i], self.name, version, label,
                               score if score is not None and np.isfinite(score) else None,
                               d.names(i), enc.data, int(time.time() * 1000))
            with self._lock:
                self.pending.add(ids[i], label, now)
            if not self.publish(msg):
                with self._lock:
                    self.pending.discard(ids[i])
                self.counts["offline"] += 1
                continue
            sent += 1
        self.counts["sent"] += sent
        return sent

    # -- MQTT thread ----------------------------------------------------------------------------------

    def answer(self, msg: p.EscalationAnswer) -> Settled:
        now = self.clock()
        with self._lock:
            settled = self.pending.resolve(msg.id, msg.label, now)
        self.counts[settled.outcome] += 1
        if settled.outcome == "on_time":
            self.counts["agreed" if _same(settled.local, settled.cloud) else "changed"] += 1
            if self.on_final is not None:
                self.on_final(settled)
        return settled

    # -- sync thread ----------------------------------------------------------------------------------

    def tick(self) -> list[Settled]:
        with self._lock:
            gone = self.pending.expire(self.clock())
        self.counts["expired"] += len(gone)
        return gone

    def report(self) -> dict[str, Any]:
        with self._lock:
            waiting = len(self.pending)
        answered = self.counts["on_time"]
        return {"policy": self.policy.to_dict(), **self.counts, "waiting": waiting,
                "agreement": round(self.counts["agreed"] / answered, 4) if answered else None,
                "budget": self.budget.to_dict()}


def _same(a: Any, b: Any) -> bool:
    return a == b or str(a) == str(b)


def answer_route(device_id: str, escalators: dict[str, Escalator],
                 on_malformed: Callable[[str], None] | None = None) -> Callable[[str, bytes], bool]:
    """An uplink message route for ``edge/v1/<device>/cmd/answer``: a malformed answer, or one for a
    model this agent does not escalate, is counted and ignored."""
    topic = p.build_topic(device_id, "answer")

    def route(t: str, payload: bytes) -> bool:
        if t != topic:
            return False
        try:
            msg = p.decode(t, payload)
            if not isinstance(msg, p.EscalationAnswer):
                raise p.ProtocolError("unknown_kind", f"expected an answer, got {type(msg).__name__}")
            esc = escalators.get(msg.model)
            if esc is None:
                raise p.ProtocolError("bad_value", f"model {msg.model!r} is not escalated here "
                                      f"({', '.join(sorted(escalators)) or 'none'})")
        except p.ProtocolError as e:
            if escalators:  # counted once, under the first escalated model (an answer names no other)
                next(iter(escalators.values())).counts["malformed"] += 1
            if on_malformed is not None:
                on_malformed(str(e))
            log.warning("escalation answer ignored: %s", e)
            return True
        esc.answer(msg)
        return True
    return route
