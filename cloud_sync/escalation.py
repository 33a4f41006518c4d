"""The cloud's half of escalation: larger ONNX models answer the inputs devices were unsure of.

Devices publish :class:`~edge_runtime.core.protocol.Escalation` messages (QoS 0) on
``edge/v1/<device>/escalate``; :class:`EscalationServer` decodes the input, runs the cloud model named
for the device's model (or the default one), and publishes an
:class:`~edge_runtime.core.protocol.EscalationAnswer` to ``edge/v1/<device>/cmd/answer`` at once. It
has its own bounded queue and thread, so a busy ingest (commits, acks) never delays an answer, and an
answer never waits for a commit. Both answers go into the review queue (per-device hourly quota, as
for low-confidence predictions), where a person's decision becomes a label for retraining.

A malformed escalation, an input the model cannot take, or one for a model not served here is
counted by reason and answered with nothing: the device's own answer stands after its deadline.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.core import protocol as p
from edge_runtime.errors import EdgeRuntimeError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "*"


class EscalationModel:
    """One cloud model: an onnxruntime session through the agent's engine, batch 1."""

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        from edge_runtime.adapters.onnx_engine import OnnxEngine
        from edge_runtime.pipeline import Postprocessor
        from edge_runtime.profiles import detect_profile

        self.path = Path(path)
        self.engine = OnnxEngine(self.path, detect_profile(), name=name or self.path.stem)
        self.name = self.engine.name
        if len(self.engine.spec.inputs) != 1:
            raise EdgeRuntimeError(f"escalation model {self.path}: one input expected, it has "
                                   f"{len(self.engine.spec.inputs)}")
        self.input = self.engine.spec.inputs[0]
        self.post = Postprocessor(self.engine.spec)
        if self.post.labels_index is None and self.post.scores_index is None:
            raise EdgeRuntimeError(f"escalation model {self.path}: no label or score output")
        self._run = self.engine.runner(1)
        self._lock = threading.Lock()

    def answer(self, x: np.ndarray) -> tuple[Any, float | None]:
        """(label, score) for one input, as a batch of one of the model's input shape."""
        shape = self.input.shape
        if shape is None or len(shape) < 1:
            raise ValueError(f"{self.name}'s input {self.input.name} has no batch axis")
        rest = list(shape[1:])
        if all(isinstance(d, int) and d > 0 for d in rest):
            if x.size != int(np.prod(rest, dtype=np.int64)):
                raise ValueError(f"input of {x.size} values (shape {list(x.shape)}) does not fit "
                                 f"{self.name}'s input {self.input.describe()}")
            want = [1, *rest]
        elif x.ndim == len(rest):
            want = [1, *x.shape]
        else:
            raise ValueError(f"input of shape {list(x.shape)} does not fit {self.name}'s input "
                             f"{self.input.describe()}")
        feeds = {self.input.name: np.ascontiguousarray(x.reshape(want), dtype=self.input.dtype)}
        with self._lock:  # one session, one caller at a time
            out = self._run(feeds)
        labels = self.post.labels(out)
        label = labels.reshape(-1)[0].item() if labels is not None else None
        score = None
        if self.post.scores_index is not None and label is not None:
            row = np.asarray(out[self.post.scores_index]).reshape(-1)
            if isinstance(label, int) and 0 <= label < len(row) and np.isfinite(row[label]):
                score = float(row[label])
        return label, score


def parse_model_args(items: list[str]) -> dict[str, Path]:
    """``--escalation-model [DEVICE_MODEL=]PATH`` (repeatable): which cloud model answers which device
    model; without ``DEVICE_MODEL=`` it answers every model without its own."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = DEFAULT_MODEL, item
        if not name or not path:
            raise EdgeRuntimeError(f"--escalation-model {item!r}: expected [DEVICE_MODEL=]PATH.onnx")
        if name in out:
            raise EdgeRuntimeError(f"--escalation-model: {name if name != DEFAULT_MODEL else 'the default'} "
                                   "is given twice")
        if not Path(path).is_file():
            raise EdgeRuntimeError(f"--escalation-model {item!r}: {path} is not a file")
        out[name] = Path(path)
    return out


class EscalationServer:
    """Answers escalations. ``publish(topic, payload, qos, retain)`` sends the answer; ``review(...)``
    (the hub's) queues both answers for a person. :meth:`offer` is the MQTT callback (it only
    enqueues); one thread answers in arrival order."""

    def __init__(self, models: dict[str, Path], publish: Callable[[str, bytes, int, bool], bool], *,
                 review: Callable[..., bool] | None = None, queue_size: int = 1024,
                 clock: Callable[[], float] = time.time) -> None:
        if not models:
            raise EdgeRuntimeError("no escalation model given")
        self.models = {name: EscalationModel(path, None if name == DEFAULT_MODEL else f"{name}-cloud")
                       for name, path in models.items()}
        self.publish = publish
        self.review = review
        self.clock = clock
        self.queue: queue.Queue[tuple[str, bytes, float]] = queue.Queue(maxsize=queue_size)
        self.counts = {"received": 0, "answered": 0, "queue_full": 0, "reviews": 0, "publish_failed": 0}
        self.refused: dict[str, int] = {}
        self.latency_ms: list[float] = []   # receive -> answer published, the latest 1000
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="escalation", daemon=True)

    @staticmethod
    def subscription() -> str:
        return p.fleet_subscription(p.Escalation.KIND)

    @staticmethod
    def wants(topic: str) -> bool:
        return topic.endswith(f"/{p.Escalation.KIND}")

    def offer(self, topic: str, payload: bytes) -> None:
        """MQTT thread: enqueue (bounded); a full queue drops, the device's own answer stands."""
        try:
            self.queue.put_nowait((topic, payload, time.perf_counter()))
        except queue.Full:
            self.counts["queue_full"] += 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                topic, payload, t0 = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.handle(topic, payload, t0)
            except Exception:  # one bad input must not stop the answering
                log.exception("escalation on %s failed", topic)
                self._refuse("internal")

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def handle(self, topic: str, payload: bytes, t0: float | None = None) -> p.EscalationAnswer | None:
        """Answer one escalation (returns the answer sent, or None when refused)."""
        from edge_runtime.core.escalation import EscalationError, decode_input

        self.counts["received"] += 1
        try:
            msg = p.decode(topic, payload)
            if not isinstance(msg, p.Escalation):
                raise p.ProtocolError("unknown_kind", f"expected an escalation, got {type(msg).__name__}")
        except p.ProtocolError as e:
            self._refuse(e.reason)
            log.warning("escalation refused: %s", e)
            return None
        model = self.models.get(msg.model) or self.models.get(DEFAULT_MODEL)
        if model is None:
            self._refuse("no_model")
            log.warning("escalation from %s for %s refused: no cloud model serves it", msg.device_id, msg.model)
            return None
        try:
            x = decode_input(msg.data)
            if not np.all(np.isfinite(x)):
                raise ValueError("the input has NaN or infinite values")
            label, score = model.answer(x)
        except (EscalationError, ValueError, EdgeRuntimeError) as e:
            self._refuse("bad_input")
            log.warning("escalation %s from %s refused: %s", msg.id, msg.device_id, e)
            return None
        now_ms = int(self.clock() * 1000)
        ans = p.EscalationAnswer(msg.device_id, msg.id, msg.model, label, score, model.name, msg.sent_ms, now_ms)
        if self.publish(ans.topic, ans.to_wire(), ans.QOS, ans.RETAIN):
            self.counts["answered"] += 1
        else:
            self.counts["publish_failed"] += 1
        if t0 is not None:
            self.latency_ms.append((time.perf_counter() - t0) * 1000)
            del self.latency_ms[:-1000]
        if self.review is not None and self.review(msg, ans, now_ms):
            self.counts["reviews"] += 1
        return ans

    def stats(self) -> dict[str, Any]:
        lat = sorted(self.latency_ms)
        return {**self.counts, "refused": dict(self.refused), "queued": self.queue.qsize(),
                "models": {k: str(m.path) for k, m in self.models.items()},
                "answer_ms_p50": round(lat[len(lat) // 2], 3) if lat else None,
                "answer_ms_p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3) if lat else None}
