"""Delayed label feedback: prediction ids, and routing a true label back to the pipeline that predicted.

Every prediction that leaves the agent (to ``--predictions``, to the outbox) gets an id: the input's own
id when the input carried one (a stdin object with an ``"id"`` key), else ``<boot prefix>-<n>``.
:class:`PredictionBook` remembers the last ``capacity`` ids with their pipeline and predicted label, so
that feedback naming an id (over MQTT ``cmd/labels``, a stdin ``{"feedback": ...}`` line, or the
Python API :meth:`FeedbackRouter.label`) reaches that pipeline's concept-drift tracker. Older ids are
forgotten (counted as unresolved when their label arrives).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 20000  # about 2 MB of ids: a few minutes at 100 predictions/s


class PredictionBook:
    """Bounded id -> (pipeline, predicted label) map; ``assign`` runs on pipeline threads, ``resolve``
    on the sync or source thread, so both take one short lock."""

    def __init__(self, prefix: str, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.prefix = prefix
        self.capacity = capacity
        self._n = 0
        self._map: dict[str, tuple[str, Any]] = {}
        self._order: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()

    def assign(self, pipeline: str, records: Sequence[Any], labels: Sequence[Any]) -> list[str]:
        """Ids for one batch's predictions (``labels`` as a list), remembered with their labels."""
        ids = []
        with self._lock:
            for rec, lab in zip(records, labels, strict=True):
                own = rec.get("id") if type(rec) is dict else None
                if type(own) is str and own:
                    pid = own
                else:
                    self._n += 1
                    pid = f"{self.prefix}{self._n}"
                if pid not in self._map:
                    self._order.append(pid)
                self._map[pid] = (pipeline, lab)
                ids.append(pid)
            while len(self._order) > self.capacity:
                self._map.pop(self._order.popleft(), None)
        return ids

    def resolve(self, ref: Any) -> tuple[str, Any] | None:
        if type(ref) is not str:
            return None
        with self._lock:
            return self._map.get(ref)

    def __len__(self) -> int:
        return len(self._map)


class FeedbackRouter:
    """Hands each (id, true label) to the pipeline that made the prediction. Thread-safe."""

    def __init__(self, book: PredictionBook, pipelines: Iterable[Any]) -> None:
        self.book = book
        self.pipelines = {p.name: p for p in pipelines}
        self.received = 0
        self.resolved = 0
        self.unresolved = 0
        self._lock = threading.Lock()

    def label(self, ref: Any, label: Any) -> bool:
        """Apply one label; False when the id is unknown (never seen, or forgotten)."""
        hit = self.book.resolve(ref)
        with self._lock:
            self.received += 1
            if hit is None or hit[0] not in self.pipelines:
                self.unresolved += 1
                if self.unresolved <= 5 or self.unresolved % 1000 == 0:
                    log.warning("label feedback for unknown prediction id %r (%d unresolved): ids are kept for "
                                "the last %d predictions", ref, self.unresolved, self.book.capacity)
                return False
            self.resolved += 1
            pipeline = self.pipelines[hit[0]]
        pipeline.feedback(hit[1], label)
        return True

    def labels(self, items: Iterable[tuple[Any, Any]]) -> int:
        """Apply several ``(id, label)`` pairs; returns how many resolved."""
        return sum(self.label(ref, lab) for ref, lab in items)

    def report(self) -> dict[str, int]:
        return {"received": self.received, "resolved": self.resolved, "unresolved": self.unresolved}
