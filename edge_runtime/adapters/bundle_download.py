"""The device's side of bundle delivery on disk: chunks in, one verified file out, in constant memory.

:class:`BundleDownload` writes each chunk at its offset in ``<dest>/<bundle_id>.part`` (preallocated,
``os.pwrite``), counts it only after its sha256 matched the manifest, and persists which chunks it has
in ``<dest>/<bundle_id>.progress.json`` (atomic replace). Progress is written only after the ``.part``
was fsynced, so it never claims data that a power cut could take back; a crash costs at most the
chunks since the last persist (``persist_every_bytes``). A new instance for the same manifest resumes
from that file; a ``.part`` that is missing or the wrong size, or progress for another manifest, starts
over. When every chunk is in, :meth:`finish` hashes the whole file (streaming) and renames it to
``<dest>/<bundle_id>.tar``.

Thread-safe: the MQTT network thread feeds chunks while another thread may flush or close.
Standard library only (hashlib, os): MQTT stays in the transport, the topic logic in the fetcher.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.core.chunks import ChunkProgress
from edge_runtime.core.protocol import BundleManifest
from edge_runtime.errors import EdgeRuntimeError

log = logging.getLogger(__name__)

__all__ = ["BAD", "DOWNLOAD_ERROR_REASONS", "DUPLICATE", "STORED", "BundleDownload", "DownloadError",
           "DownloadStats", "free_bytes"]

STORED = "stored"
DUPLICATE = "duplicate"
BAD = "bad"

DOWNLOAD_ERROR_REASONS = (
    "no_space",            # not enough free disk for the file (needed vs available in the message)
    "io_error",            # the .part or the progress file could not be written or read
    "bad_chunks",          # every chunk was seen and some never matched their sha256 (tampered/corrupt)
    "corrupt_chunks",      # the finished file failed its hash and these chunks no longer match on disk
    "file_hash_mismatch",  # every chunk matches, the whole file does not: the manifest contradicts itself
    "withdrawn",           # the cloud withdrew the bundle (empty retained manifest)
    "manifest_changed",    # the manifest under this bundle id kept changing
    "stalled",             # chunks stopped arriving and asking again did not help
)

_READ_BYTES = 1 << 20
_PROGRESS_VERSION = 1


class DownloadError(EdgeRuntimeError):
    """A bundle download failed; ``reason`` is one of :data:`DOWNLOAD_ERROR_REASONS`, ``chunks`` the
    indices concerned (bad or corrupt chunks), ``detail`` what was expected and what was found."""

    def __init__(self, reason: str, detail: str, *, bundle_id: str | None = None,
                 chunks: tuple[int, ...] = ()) -> None:
        self.reason = reason
        self.detail = detail
        self.bundle_id = bundle_id
        self.chunks = chunks
        super().__init__(f"bundle {bundle_id}: {reason}: {detail}" if bundle_id else f"{reason}: {detail}")


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged process may still write on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass
class DownloadStats:
    resumed: int = 0        # verified chunks found on disk when opened
    stored: int = 0         # chunks written and verified by this instance
    duplicates: int = 0     # chunks that arrived again after being stored
    bad_chunks: int = 0     # arrivals whose length or sha256 did not match the manifest
    persists: int = 0       # progress files written
    restarted: str = ""     # why an earlier .part was thrown away, if one was
    bad: dict[int, str] = field(default_factory=dict)  # chunk index -> why its last arrival was refused


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once its directory is synced; some file systems refuse (EINVAL): best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class BundleDownload:
    """One bundle file being assembled from verified chunks in ``dest_dir``; see the module docstring.

    ``free_bytes`` is the probe used before preallocating (a parameter so that tests can fake a full
    disk); ``reserve_bytes`` is left free for everything else on the device (its outbox, logs).
    """

    def __init__(self, manifest: BundleManifest, dest_dir: str | os.PathLike[str], *,
                 free_bytes: Callable[[Path], int] = free_bytes, reserve_bytes: int = 0,
                 persist_every_bytes: int = 2 << 20) -> None:
        self.manifest = manifest
        self.dest = Path(dest_dir)
        bid = manifest.bundle_id
        self.part_path = self.dest / f"{bid}.part"
        self.progress_path = self.dest / f"{bid}.progress.json"
        self.final_path = self.dest / f"{bid}.tar"
        self.stats = DownloadStats()
        self._free_bytes = free_bytes
        self._reserve = reserve_bytes
        self._persist_every = max(1, persist_every_bytes)
        self._unpersisted = 0
        self._lock = threading.RLock()
        self._fd: int | None = None
        self.finished: Path | None = None
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
            self._open()
        except OSError as e:
            self._close_fd()
            raise self._error("io_error", f"cannot prepare {self.dest}: {e}") from e

    # -- opening: finished, resumable, or fresh -------------------------------------------------------

    def _error(self, reason: str, detail: str, chunks: tuple[int, ...] = ()) -> DownloadError:
        return DownloadError(reason, detail, bundle_id=self.manifest.bundle_id, chunks=chunks)

    def _open(self) -> None:
        m = self.manifest
        self.progress = ChunkProgress(m.count)
        if self.final_path.is_file():
            if self.final_path.stat().st_size == m.size and self._hash_file(self.final_path) == m.sha256:
                self.progress = self._all_present()
                self.finished = self.final_path
                self._remove(self.part_path, self.progress_path)
                log.info("bundle %s is already here: %s", m.bundle_id, self.final_path)
                return
            log.warning("bundle %s: %s does not match the manifest; fetching it again", m.bundle_id,
                        self.final_path)
            self._remove(self.final_path)
        why = self._load_progress()
        if why is None:
            self._fd = os.open(self.part_path, os.O_RDWR)
            self.stats.resumed = self.progress.done
            log.info("bundle %s: resuming with %d of %d chunks on disk", m.bundle_id, self.progress.done, m.count)
            return
        if why != "no earlier download":
            self.stats.restarted = why
            log.warning("bundle %s: starting over (%s)", m.bundle_id, why)
        self._remove(self.part_path, self.progress_path)
        self._start_fresh()

    def _all_present(self) -> ChunkProgress:
        p = ChunkProgress(self.manifest.count)
        for i in range(p.count):
            p.add(i)
        return p

    def _load_progress(self) -> str | None:
        """None when the persisted state is usable (``self.progress`` loaded), else why it is not."""
        m = self.manifest
        try:
            raw = self.progress_path.read_bytes()
        except FileNotFoundError:
            return "no earlier download" if not self.part_path.exists() else "the progress file is missing"
        try:
            d = json.loads(raw)
            ident = (d["v"], d["bundle_id"], d["sha256"], d["size"], d["chunk_size"])
            progress = ChunkProgress.from_dict(d["progress"])
        except (ValueError, KeyError, TypeError) as e:
            return f"the progress file is unreadable: {e}"
        if ident != (_PROGRESS_VERSION, m.bundle_id, m.sha256, m.size, m.chunk_size) or progress.count != m.count:
            return "the progress file belongs to another manifest"
        try:
            size = self.part_path.stat().st_size
        except FileNotFoundError:
            return f"{self.part_path.name} is missing"
        if size != m.size:
            return f"{self.part_path.name} is {size} bytes, expected {m.size}"
        self.progress = progress
        return None

    def _start_fresh(self) -> None:
        m = self.manifest
        need = m.size + self._reserve
        available = self._free_bytes(self.dest)
        if available < need:
            raise self._error("no_space", f"need {need} bytes in {self.dest} ({m.size} for the bundle"
                              f"{f' + {self._reserve} reserve' if self._reserve else ''}), {available} available")
        fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._fd = fd
        try:
            os.posix_fallocate(fd, 0, m.size)  # reserves the blocks: no ENOSPC halfway through
        except OSError as e:
            if e.errno == errno.ENOSPC:
                self._close_fd()
                self._remove(self.part_path)
                raise self._error("no_space", f"need {m.size} bytes in {self.dest}: preallocation failed "
                                  f"(ENOSPC; {self._free_bytes(self.dest)} available)") from e
            os.ftruncate(fd, m.size)  # file systems without fallocate: a sparse file of the right size
        self._persist()

    # -- chunks -------------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        with self._lock:
            return self.progress.complete

    def has(self, index: int) -> bool:
        with self._lock:
            return self.progress.has(index)

    def missing(self) -> list[int]:
        with self._lock:
            return self.progress.missing()

    def add_chunk(self, index: int, data: bytes | bytearray | memoryview) -> str:
        """Store chunk ``index`` if it matches the manifest: :data:`STORED`, :data:`DUPLICATE` (already
        had it) or :data:`BAD` (wrong length or sha256: counted, recorded in ``stats.bad``, ignored).

        Raises ValueError for an index outside the manifest and DownloadError(``io_error``) when the
        disk fails.
        """
        m = self.manifest
        if type(index) is not int or not 0 <= index < m.count:
            raise ValueError(f"chunk index {index!r} is outside 0..{m.count - 1}")
        with self._lock:
            if self.finished is not None or self.progress.has(index):
                self.stats.duplicates += 1
                return DUPLICATE
        offset, length = m.chunk_span(index)
        why = ""
        if len(data) != length:
            why = f"{len(data)} bytes, expected {length}"
        else:
            digest = hashlib.sha256(data).hexdigest()  # outside the lock: the slow part
            if digest != m.chunks[index]:
                why = f"sha256 {digest[:16]}..., expected {m.chunks[index][:16]}..."
        with self._lock:
            if why:
                self.stats.bad_chunks += 1
                self.stats.bad[index] = why
                return BAD
            if self.progress.has(index):  # stored by another thread meanwhile
                self.stats.duplicates += 1
                return DUPLICATE
            if self._fd is None:
                raise self._error("io_error", "the download is closed")
            try:
                view = memoryview(data)
                written = 0
                while written < length:
                    written += os.pwrite(self._fd, view[written:], offset + written)
            except OSError as e:
                raise self._error("io_error", f"writing chunk {index} to {self.part_path}: {e}") from e
            self.progress.add(index)
            self.stats.bad.pop(index, None)
            self.stats.stored += 1
            self._unpersisted += length
            if self._unpersisted >= self._persist_every or self.progress.complete:
                self._flush_locked()
            return STORED

    # -- persistence ----------------------------------------------------------------------------------

    def flush(self) -> None:
        """fsync the .part, then persist progress: after this, a restart resumes from here."""
        with self._lock:
            if self._fd is not None and self.finished is None:
                self._flush_locked()

    def _flush_locked(self) -> None:
        try:
            if self._fd is not None:
                os.fsync(self._fd)
            self._persist()
        except OSError as e:
            raise self._error("io_error", f"persisting progress to {self.progress_path}: {e}") from e
        self._unpersisted = 0

    def _persist(self) -> None:
        m = self.manifest
        body = json.dumps({"v": _PROGRESS_VERSION, "bundle_id": m.bundle_id, "sha256": m.sha256, "size": m.size,
                           "chunk_size": m.chunk_size, "progress": self.progress.to_dict()},
                          separators=(",", ":")).encode()
        tmp = self.progress_path.with_name(self.progress_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(self.progress_path)
        _fsync_dir(self.dest)
        self.stats.persists += 1

    # -- completion -----------------------------------------------------------------------------------

    def _hash_file(self, path: Path) -> str:
        h = hashlib.sha256()
        with path.open("rb", buffering=0) as f:
            while block := f.read(_READ_BYTES):
                h.update(block)
        return h.hexdigest()

    def _corrupt_chunks(self) -> list[int]:
        """Chunks whose bytes on disk no longer match their digest (one streaming pass)."""
        m = self.manifest
        bad = []
        with self.part_path.open("rb", buffering=0) as f:
            for i in range(m.count):
                _, length = m.chunk_span(i)
                if hashlib.sha256(f.read(length)).hexdigest() != m.chunks[i]:
                    bad.append(i)
        return bad

    def finish(self) -> Path:
        """Check the whole file's sha256 and move it to ``<bundle_id>.tar``; its path.

        ``corrupt_chunks``: the file failed and these chunks no longer match on disk; they are marked
        missing again (fetch them, then call finish again). ``file_hash_mismatch``: every chunk matches
        and the file still does not: the manifest contradicts itself, the .part is deleted.
        """
        m = self.manifest
        with self._lock:
            if self.finished is not None:
                return self.finished
            if not self.progress.complete:
                raise ValueError(f"{len(self.progress.missing())} of {m.count} chunks are still missing")
            try:
                self._flush_locked()
                digest = self._hash_file(self.part_path)
                if digest == m.sha256:
                    self._close_fd()
                    self.part_path.replace(self.final_path)
                    _fsync_dir(self.dest)
                    self._remove(self.progress_path)
                    self.finished = self.final_path
                    return self.final_path
                corrupt = self._corrupt_chunks()
            except OSError as e:
                raise self._error("io_error", f"verifying {self.part_path}: {e}") from e
            if corrupt:
                for i in corrupt:
                    self.progress.discard(i)
                self._flush_locked()
                raise self._error("corrupt_chunks", f"the file has sha256 {digest[:16]}..., expected "
                                  f"{m.sha256[:16]}...; chunks {_names(corrupt)} changed on disk",
                                  tuple(corrupt))
            self.discard()
            raise self._error("file_hash_mismatch", f"every chunk matches its digest but the file has sha256 "
                              f"{digest[:16]}..., the manifest says {m.sha256[:16]}...")

    # -- lifecycle ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Persist progress and close the file; a new instance resumes from here."""
        with self._lock:
            if self._fd is not None and self.finished is None:
                with contextlib.suppress(DownloadError):
                    self._flush_locked()
            self._close_fd()

    def discard(self) -> None:
        """Close and delete the .part and the progress file (not a finished .tar)."""
        with self._lock:
            self._close_fd()
            self._remove(self.part_path, self.progress_path)

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    @staticmethod
    def _remove(*paths: Path) -> None:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"bundle_id": self.manifest.bundle_id, "chunks": self.manifest.count, "have": self.progress.done,
                    "size": self.manifest.size, "finished": str(self.finished) if self.finished else None,
                    "bad": dict(self.stats.bad)}


def _names(indices: list[int] | tuple[int, ...], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")
