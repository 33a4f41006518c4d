"""Publish a model bundle file to the whole fleet over MQTT, as retained chunks plus a manifest.

One publish serves every device, now or later: chunks are retained on
``edge/v1/bundles/<bundle_id>/c/<index>`` (raw bytes) and the manifest on
``edge/v1/bundles/<bundle_id>/manifest``, published last so that a device that sees it finds every chunk.
The file is read twice, a chunk at a time (hashes first: the bundle id and the manifest need them;
then the chunks, re-hashed so that a file changed in between is refused), so memory stays at
``window`` chunks however big the file.

QoS 1 completion is tracked per message with :class:`PublishWindow`, which bounds how many publishes are
in flight: paho would otherwise queue the whole file in memory, refuse past its ``max_queued``, and
Mosquitto would not be any faster for it. Its ``on_result`` must be the transport's
``on_publish_result`` callback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge_runtime.core import protocol as p
from edge_runtime.core.chunks import choose_chunk_size, chunk_count
from edge_runtime.errors import EdgeRuntimeError

log = logging.getLogger(__name__)

__all__ = ["PublishError", "PublishWindow", "Publisher", "publish_bundle", "withdraw_bundle"]


class Publisher(Protocol):
    """What publishing needs of a transport (MqttTransport has it)."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None: ...

    def wait_connected(self, timeout: float) -> bool: ...


class PublishError(EdgeRuntimeError):
    """Publishing a bundle failed. ``reason``: ``timeout`` (no broker acknowledgement for too long),
    ``refused`` (the broker said no, e.g. not authorised), ``changed`` (the file changed while being
    published), ``bad_bundle`` (no name/version, too big, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass
class WindowStats:
    published: int = 0
    completed: int = 0
    refused: int = 0
    retries: int = 0   # publishes retried because the transport was disconnected
    max_in_flight: int = 0


class PublishWindow:
    """At most ``size`` QoS 1 publishes in flight on one transport; :meth:`publish` waits for room.

    Pass :meth:`on_result` as the transport's ``on_publish_result``. Results for message ids this
    window did not send (other publishers on the same transport) are ignored; a result that arrives
    before ``publish`` has returned its id is kept for a few seconds and matched then.
    """

    _EARLY_KEEP_S = 5.0
    _EARLY_MAX = 4096

    def __init__(self, size: int = 16, *, clock: Callable[[], float] = time.monotonic) -> None:
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self.size = size
        self.stats = WindowStats()
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: dict[int, str] = {}                 # mid -> topic
        self._early: OrderedDict[int, tuple[str | None, float]] = OrderedDict()
        self._refusals: list[tuple[str, str]] = []          # (topic, reason)

    def on_result(self, mid: int, refused: str | None) -> None:
        """The transport's publish-result callback (network thread)."""
        with self._cond:
            topic = self._pending.pop(mid, None)
            if topic is None:
                self._early[mid] = (refused, self._clock())
                self._early.move_to_end(mid)
                while len(self._early) > self._EARLY_MAX:
                    self._early.popitem(last=False)
                return
            self._settle(topic, refused)
            self._cond.notify_all()

    def _settle(self, topic: str, refused: str | None) -> None:
        if refused is None:
            self.stats.completed += 1
        else:
            self.stats.refused += 1
            self._refusals.append((topic, refused))

    def _raise_refused(self) -> None:
        if self._refusals:
            topic, why = self._refusals[0]
            raise PublishError("refused", f"the broker refused {topic}: {why}"
                               + (f" (and {len(self._refusals) - 1} more)" if len(self._refusals) > 1 else ""))

    def publish(self, transport: Publisher, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                timeout_s: float = 30.0) -> None:
        """Publish once there is room; raises PublishError on a refusal so far or after ``timeout_s``
        without room (no acknowledgement) or without a connection."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._pending) < self.size or self._refusals, timeout_s):
                raise PublishError("timeout", f"no broker acknowledgement for {timeout_s:g} s "
                                   f"({len(self._pending)} publishes in flight)")
            self._raise_refused()
        deadline = self._clock() + timeout_s
        while True:
            mid = transport.publish(topic, payload, qos=qos, retain=retain)
            if mid is not None:
                break
            self.stats.retries += 1
            left = deadline - self._clock()
            if left <= 0:
                raise PublishError("timeout", f"not connected to the broker for {timeout_s:g} s (publishing {topic})")
            transport.wait_connected(min(left, 1.0))
        with self._cond:
            self.stats.published += 1
            early = self._early.pop(mid, None)
            if early is not None and self._clock() - early[1] <= self._EARLY_KEEP_S:
                self._settle(topic, early[0])
            elif qos > 0:
                self._pending[mid] = topic
                self.stats.max_in_flight = max(self.stats.max_in_flight, len(self._pending))
            else:
                self.stats.completed += 1
            self._raise_refused()

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until every publish is acknowledged; PublishError after ``timeout_s`` without progress."""
        with self._cond:
            while self._pending:
                before = len(self._pending)
                self._cond.wait_for(lambda n=before: len(self._pending) < n or bool(self._refusals), timeout_s)
                self._raise_refused()
                if len(self._pending) >= before:
                    raise PublishError("timeout", f"{len(self._pending)} publishes not acknowledged after "
                                       f"{timeout_s:g} s, e.g. {next(iter(self._pending.values()))}")
            self._raise_refused()


def _bundle_name_version(tar_path: Path) -> tuple[str, str]:
    """Name and version from the bundle's manifest.json, read from the tar without extracting it."""
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                if member.name in ("manifest.json", "./manifest.json") and member.isfile():
                    if member.size > 1 << 20:
                        break
                    f = tar.extractfile(member)
                    if f is None:
                        break
                    m = json.loads(f.read())
                    return str(m["name"]), str(m["version"])
    except (tarfile.TarError, OSError, ValueError, KeyError, TypeError) as e:
        raise PublishError("bad_bundle", f"{tar_path}: cannot read name and version from its manifest.json "
                           f"({e}); pass name= and version=") from e
    raise PublishError("bad_bundle", f"{tar_path} holds no manifest.json; pass name= and version=")


def _read_chunks(path: Path, chunk_size: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        while block := f.read(chunk_size):
            yield block


def build_manifest(tar_path: str | Path, *, chunk_size: int | None = None, name: str | None = None,
                   version: str | None = None) -> p.BundleManifest:
    """The manifest of ``tar_path`` (one streaming pass). ``chunk_size`` None: 64 KiB, or larger when
    the file would need more than MAX_BUNDLE_CHUNKS chunks."""
    path = Path(tar_path)
    size = path.stat().st_size
    if size == 0 or size > p.MAX_BUNDLE_BYTES:
        raise PublishError("bad_bundle", f"{path} is {size} bytes, expected 1..{p.MAX_BUNDLE_BYTES}")
    if chunk_size is None:
        chunk_size = choose_chunk_size(size)
    if name is None or version is None:
        found_name, found_version = _bundle_name_version(path)
        name = found_name if name is None else name
        version = found_version if version is None else version
    whole = hashlib.sha256()
    digests = []
    for block in _read_chunks(path, chunk_size):
        whole.update(block)
        digests.append(hashlib.sha256(block).hexdigest())
    sha = whole.hexdigest()
    if len(digests) != chunk_count(size, chunk_size):
        raise PublishError("changed", f"{path} changed size while being read")
    try:
        return p.BundleManifest(p.bundle_id_for(name, version, sha), name, version, size, sha, chunk_size,
                                tuple(digests))
    except p.ProtocolError as e:
        raise PublishError("bad_bundle", f"{path}: {e}") from e


def publish_bundle(transport: Publisher, tar_path: str | Path, *, window: PublishWindow,
                   chunk_size: int | None = None, name: str | None = None, version: str | None = None,
                   timeout_s: float = 30.0) -> p.BundleManifest:
    """Publish ``tar_path`` retained, chunks first and the manifest last, each acknowledged (QoS 1) with at
    most ``window.size`` in flight; the manifest. Publishing the same file again is harmless (same id,
    same retained messages). ``name``/``version`` default to the bundle's own manifest.json.
    ``timeout_s`` bounds each wait for the broker, not the whole transfer.
    """
    path = Path(tar_path)
    t0 = time.monotonic()
    manifest = build_manifest(path, chunk_size=chunk_size, name=name, version=version)
    log.info("publishing bundle %s: %d bytes in %d chunks of %d", manifest.bundle_id, manifest.size,
             manifest.count, manifest.chunk_size)
    for i, block in enumerate(_read_chunks(path, manifest.chunk_size)):
        if i >= manifest.count or hashlib.sha256(block).hexdigest() != manifest.chunks[i]:
            raise PublishError("changed", f"{path} changed while being published (chunk {i})")
        window.publish(transport, manifest.chunk_topic(i), block, qos=1, retain=True, timeout_s=timeout_s)
    window.drain(timeout_s)
    window.publish(transport, manifest.topic, manifest.to_wire(), qos=1, retain=True, timeout_s=timeout_s)
    window.drain(timeout_s)
    log.info("bundle %s published in %.2f s", manifest.bundle_id, time.monotonic() - t0)
    return manifest


def withdraw_bundle(transport: Publisher, manifest: p.BundleManifest, *, window: PublishWindow,
                    timeout_s: float = 30.0) -> None:
    """Clear the bundle's retained messages (empty retained publishes): the manifest first, so that no
    device starts on a bundle whose chunks are going away; devices downloading it fail with ``withdrawn``."""
    window.publish(transport, manifest.topic, b"", qos=1, retain=True, timeout_s=timeout_s)
    for i in range(manifest.count):
        window.publish(transport, manifest.chunk_topic(i), b"", qos=1, retain=True, timeout_s=timeout_s)
    window.drain(timeout_s)
    log.info("bundle %s withdrawn", manifest.bundle_id)
