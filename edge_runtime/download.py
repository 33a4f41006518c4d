"""Fetch one model bundle over MQTT: the retained manifest, then the chunks, into a BundleDownload.

:class:`BundleFetcher` subscribes to ``edge/v1/bundles/<bundle_id>/manifest``; once a valid manifest
arrives it opens (or resumes) the download and asks for the missing chunks by their exact topics, a
``window`` at a time: each subscription makes the broker send that chunk's retained copy, and a chunk
that arrived is unsubscribed and replaced by the next missing one. Never ``c/+`` for the whole bundle:
a broker queues every retained match of a new subscription at once and drops what exceeds its queue
(Mosquitto: ``max_queued_messages``, 1000 by default, silently), and a resumed download would be sent
every chunk again. The transport renews the open subscriptions after a reconnect, which re-sends the
retained chunks still outstanding; duplicates are recognised and skipped.

A chunk that fails its sha256 is counted and asked for ``bad_chunk_retries`` more times (a bad live
publish may hide a good retained copy), then no more: a retained copy does not change unless the cloud
publishes again. Once every chunk was seen and some stayed bad, the fetch fails with ``bad_chunks``
naming them, so a tampered bundle fails instead of looping. :meth:`poll`, called
now and then by its owner, asks again for chunks that stopped arriving and fails with ``stalled``
after ``max_stalls`` tries.

``on_message`` runs on the MQTT network thread: the owner routes ``edge/v1/bundles/...`` messages to
it (it returns False for topics that are not its bundle's). Chunks are written and hashed right there
(a 64 KiB ``pwrite`` and sha256: well under a millisecond), so nothing is held in memory and TCP, not a
queue, slows the broker down when the disk is slow. ``on_done(path)`` and ``on_failed(error)`` run on
that thread too and must hand off and return.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edge_runtime.adapters.bundle_download import BAD, STORED, BundleDownload, DownloadError
from edge_runtime.core import protocol as p

log = logging.getLogger(__name__)

__all__ = ["BundleFetcher", "FetchStats", "Subscriber"]

WAITING = "waiting_manifest"
DOWNLOADING = "downloading"
DONE = "done"
FAILED = "failed"
CLOSED = "closed"


class Subscriber(Protocol):
    """What the fetcher needs of a transport (MqttTransport has it)."""

    def subscribe(self, topic: str, qos: int = 1) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...


@dataclass
class FetchStats:
    manifests: int = 0          # valid manifests received (a repeat after a reconnect counts too)
    chunk_messages: int = 0     # chunk messages received for this bundle, any outcome
    stored: int = 0             # chunks written and verified
    duplicates: int = 0         # chunks that were already on disk
    bad_chunks: int = 0         # chunks whose length or sha256 did not match
    bad_messages: dict[str, int] = field(default_factory=dict)  # reason -> count (bad topic, bad manifest, ...)
    resubscribes: int = 0       # chunk topics asked for again by poll()
    received_indices: list[int] = field(default_factory=list)   # every chunk index that arrived, in order


def _unsubscribe(transport: Any, topic: str) -> None:
    """Drop a subscription, so that it is neither renewed on reconnect nor delivers again."""
    try:
        transport.unsubscribe(topic)
    except (OSError, RuntimeError, ValueError) as e:  # the connection is going away: nothing to end
        log.debug("unsubscribe %s: %s", topic, e)


class BundleFetcher:
    """Fetch bundle ``bundle_id`` into ``dest_dir`` through ``transport``; see the module docstring.

    ``download_options`` go to :class:`BundleDownload` (``free_bytes``, ``reserve_bytes``,
    ``persist_every_bytes``). ``clock`` gives seconds for :meth:`poll`'s stall detection.
    """

    def __init__(self, transport: Subscriber, bundle_id: str, dest_dir: str | Path, *,
                 on_done: Callable[[Path], None] | None = None,
                 on_failed: Callable[[DownloadError], None] | None = None,
                 window: int = 16, stall_s: float = 30.0, max_stalls: int = 3, max_manifest_changes: int = 3,
                 bad_chunk_retries: int = 1,
                 download_options: dict[str, Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.transport = transport
        self.bundle_id = p.validate_bundle_id(bundle_id)
        self.dest = Path(dest_dir)
        self.window = window
        self.stall_s = stall_s
        self.max_stalls = max_stalls
        self.max_manifest_changes = max_manifest_changes
        self.bad_chunk_retries = bad_chunk_retries
        self._on_done = on_done
        self._on_failed = on_failed
        self._download_options = download_options or {}
        self._clock = clock
        self._prefix = f"{p.BUNDLE_TOPIC_PREFIX}/{self.bundle_id}/"
        self._manifest_topic = p.bundle_manifest_topic(self.bundle_id)
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self.state = WAITING
        self.stats = FetchStats()
        self.manifest: p.BundleManifest | None = None
        self.download: BundleDownload | None = None
        self.result: Path | None = None
        self.error: DownloadError | None = None
        self._queue: deque[int] = deque()
        self._outstanding: set[int] = set()
        self._repaired = False
        self._bad_tries: dict[int, int] = {}
        self._manifest_changes = 0
        self._last_progress = clock()
        self._stalls = 0
        self._decile = -1

    # -- owner's API ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to the manifest (retained: it arrives at once if the bundle is published)."""
        self.transport.subscribe(self._manifest_topic, qos=1)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the fetch is done or failed; False on timeout."""
        return self._finished.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def close(self) -> None:
        """Stop fetching: unsubscribe, persist progress; a new fetcher resumes. No callback runs."""
        with self._lock:
            if self.state in (DONE, FAILED, CLOSED):
                return
            self.state = CLOSED
            topics = self._release_locked()
        self._unsubscribe_all(topics)
        self._finished.set()

    def poll(self, now: float | None = None) -> None:
        """Call every few seconds: asks again for chunks that stopped arriving, fails when that does not help."""
        now = self._clock() if now is None else now
        actions: list[tuple[str, Any]] = []
        with self._lock:
            if self.state != DOWNLOADING or now - self._last_progress < self.stall_s:
                return
            self._stalls += 1
            self._last_progress = now
            if self._stalls > self.max_stalls:
                waiting = sorted(self._outstanding)
                self._fail_locked(DownloadError("stalled", f"chunks {_names(waiting)} did not arrive in "
                                                f"{self.max_stalls + 1} x {self.stall_s:g} s (not published? "
                                                "withdrawn? dropped by the broker?)", bundle_id=self.bundle_id,
                                                chunks=tuple(waiting)), actions)
            else:
                log.warning("bundle %s: no chunk for %g s, asking again for %d", self.bundle_id, self.stall_s,
                            len(self._outstanding))
                for i in sorted(self._outstanding):
                    self.stats.resubscribes += 1
                    actions.append(("sub", p.bundle_chunk_topic(self.bundle_id, i)))
                self._fill_locked(actions)
        self._run(actions)

    # -- network thread ------------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> bool:
        """Handle one message; False when ``topic`` is not one of this bundle's (route it elsewhere)."""
        if not topic.startswith(self._prefix):
            return False
        actions: list[tuple[str, Any]] = []
        try:
            info = p.parse_bundle_topic(topic)
        except p.ProtocolError as e:
            self._count_bad(e.reason)
            log.warning("bundle %s: ignored a message: %s", self.bundle_id, e)
            return True
        with self._lock:
            if self.state in (DONE, FAILED, CLOSED):
                return True
            if info.part == "manifest":
                self._on_manifest_locked(topic, payload, actions)
            else:
                assert isinstance(info.part, int)
                self._on_chunk_locked(info.part, payload, actions)
        self._run(actions)
        return True

    def _count_bad(self, reason: str) -> None:
        self.stats.bad_messages[reason] = self.stats.bad_messages.get(reason, 0) + 1

    def _on_manifest_locked(self, topic: str, payload: bytes, actions: list[tuple[str, Any]]) -> None:
        if not payload:
            self._fail_locked(DownloadError("withdrawn", "the cloud withdrew the bundle (empty manifest)",
                                            bundle_id=self.bundle_id), actions)
            return
        try:
            manifest = p.BundleManifest.from_wire(payload, topic)
        except p.ProtocolError as e:
            self._count_bad(f"manifest_{e.reason}")
            log.warning("bundle %s: ignored a manifest: %s", self.bundle_id, e)
            return
        self.stats.manifests += 1
        if manifest == self.manifest:
            return  # the retained copy again, after a reconnect
        if self.manifest is not None:
            self._manifest_changes += 1
            if self._manifest_changes > self.max_manifest_changes:
                self._fail_locked(DownloadError("manifest_changed", f"the manifest changed {self._manifest_changes} "
                                                "times during the download", bundle_id=self.bundle_id), actions)
                return
            log.warning("bundle %s: the manifest changed (sha256 %s..., chunk_size %d); starting over",
                        self.bundle_id, manifest.sha256[:12], manifest.chunk_size)
            for i in self._outstanding:
                actions.append(("unsub", p.bundle_chunk_topic(self.bundle_id, i)))
            self._outstanding.clear()
            if self.download is not None:
                self.download.discard()
        self.manifest = manifest
        try:
            self.download = BundleDownload(manifest, self.dest, **self._download_options)
        except DownloadError as e:
            self._fail_locked(e, actions)
            return
        if self.download.finished is not None:
            self._done_locked(self.download.finished, actions)
            return
        self._queue = deque(self.download.missing())
        self._repaired = False
        self._bad_tries = {}
        self._decile = -1
        self._last_progress = self._clock()
        self.state = DOWNLOADING
        have = manifest.count - len(self._queue)
        log.info("bundle %s: %d bytes in %d chunks of %d; %d on disk, fetching %d", self.bundle_id, manifest.size,
                 manifest.count, manifest.chunk_size, have, len(self._queue))
        self._fill_locked(actions)

    def _on_chunk_locked(self, index: int, payload: bytes, actions: list[tuple[str, Any]]) -> None:
        m, d = self.manifest, self.download
        if m is None or d is None or self.state != DOWNLOADING:
            self._count_bad("chunk_before_manifest")  # left in the broker's session by an earlier run
            return
        if index >= m.count:
            self._count_bad("chunk_index")
            return
        self.stats.chunk_messages += 1
        if len(self.stats.received_indices) < 4 * p.MAX_BUNDLE_CHUNKS:  # bounded, even across many reconnects
            self.stats.received_indices.append(index)
        try:
            outcome = d.add_chunk(index, payload)
        except DownloadError as e:
            self._fail_locked(e, actions)
            return
        # Unsubscribed whether or not it was asked for: poll() may have asked again meanwhile.
        self._outstanding.discard(index)
        actions.append(("unsub", m.chunk_topic(index)))
        if outcome == STORED:
            self.stats.stored += 1
            self._last_progress = self._clock()
            self._stalls = 0
            self._log_progress(d.progress.done, m)
        elif outcome == BAD:
            self.stats.bad_chunks += 1
            tries = self._bad_tries[index] = self._bad_tries.get(index, 0) + 1
            log.warning("bundle %s: chunk %d refused: %s", self.bundle_id, index, d.stats.bad.get(index, "?"))
            if tries <= self.bad_chunk_retries:
                # A live publish may have been bad while the retained copy is good: ask for that once more.
                self._queue.appendleft(index)
        else:
            self.stats.duplicates += 1
        if d.progress.complete:
            self._complete_locked(actions)
            return
        self._fill_locked(actions)
        if not self._outstanding and not self._queue:
            bad = sorted(d.stats.bad)
            missing = d.missing()
            if bad:
                detail = "; ".join(f"chunk {i}: {d.stats.bad[i]}" for i in bad[:5])
                self._fail_locked(DownloadError("bad_chunks", f"{len(bad)} of {m.count} chunks failed their check "
                                                f"and no good copy arrived ({detail}{'; ...' if len(bad) > 5 else ''})",
                                                bundle_id=self.bundle_id, chunks=tuple(bad)), actions)
            elif missing:  # cannot happen: every missing chunk is queued; kept as a guard against a hang
                self._queue.extend(missing)
                self._fill_locked(actions)

    def _log_progress(self, done: int, m: p.BundleManifest) -> None:
        decile = done * 10 // m.count
        if decile > self._decile:
            self._decile = decile
            log.info("bundle %s: %d%% (%d of %d chunks)", self.bundle_id, decile * 10, done, m.count)

    def _fill_locked(self, actions: list[tuple[str, Any]]) -> None:
        d = self.download
        assert d is not None
        while len(self._outstanding) < self.window and self._queue:
            i = self._queue.popleft()
            if d.progress.has(i) or i in self._outstanding:
                continue
            self._outstanding.add(i)
            actions.append(("sub", p.bundle_chunk_topic(self.bundle_id, i)))

    def _complete_locked(self, actions: list[tuple[str, Any]]) -> None:
        d = self.download
        assert d is not None
        try:
            path = d.finish()
        except DownloadError as e:
            if e.reason == "corrupt_chunks" and not self._repaired:
                self._repaired = True  # once: the disk lost data; a second time would be a loop
                log.warning("%s; fetching them again", e)
                self._queue.extend(e.chunks)
                self._fill_locked(actions)
                return
            self._fail_locked(e, actions)
            return
        self._done_locked(path, actions)

    def _done_locked(self, path: Path, actions: list[tuple[str, Any]]) -> None:
        self.state = DONE
        self.result = path
        log.info("bundle %s: complete and verified: %s", self.bundle_id, path)
        actions.extend(("unsub", t) for t in self._release_locked())
        actions.append(("done", path))

    def _fail_locked(self, error: DownloadError, actions: list[tuple[str, Any]]) -> None:
        self.state = FAILED
        self.error = error
        log.error("%s", error)
        actions.extend(("unsub", t) for t in self._release_locked())
        actions.append(("failed", error))

    def _release_locked(self) -> list[str]:
        """Topics to unsubscribe; the file is closed (progress persisted) unless it is finished."""
        topics = [self._manifest_topic, *(p.bundle_chunk_topic(self.bundle_id, i) for i in sorted(self._outstanding))]
        self._outstanding.clear()
        self._queue.clear()
        if self.download is not None:
            self.download.close()
        return topics

    def _unsubscribe_all(self, topics: list[str]) -> None:
        for t in topics:
            _unsubscribe(self.transport, t)

    def _run(self, actions: list[tuple[str, Any]]) -> None:
        """Subscriptions and callbacks, outside the lock (paho takes its own locks)."""
        for kind, arg in actions:
            if kind == "sub":
                self.transport.subscribe(arg, qos=1)
            elif kind == "unsub":
                _unsubscribe(self.transport, arg)
            elif kind == "done":
                self._finished.set()
                if self._on_done is not None:
                    self._on_done(arg)
            elif kind == "failed":
                self._finished.set()
                if self._on_failed is not None:
                    self._on_failed(arg)


def _names(indices: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")
