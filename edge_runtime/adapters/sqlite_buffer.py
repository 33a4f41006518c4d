"""The device's durable outbox: the one module that imports sqlite3 on the device side.

Every record the device will send (predictions, metrics, drift summaries, events) is written here
first and deleted only when the cloud acknowledges that it stored it, so the outbox survives the
process, the broker and the network (paho-mqtt's session is in memory only; see DESIGN.md).

Records are keyed ``(device_id, boot_id, seq)``. ``seq`` counts from 0 per boot and is persisted
with every commit, so reopening the same ``boot_id`` continues the sequence and a new ``boot_id``
(one per process start: the default is a fresh uuid4) starts a fresh one while the unacked records
of older boots keep their keys. The cloud dedupes on the key, turning at-least-once into
exactly-once storage.

Storage. One table ``records`` (``WITHOUT ROWID``, primary key ``(boot_ref, seq)``) holds kind (a
small integer), created (the caller's unix time), size and the opaque payload; ``boots`` maps the
increasing ``boot_ref`` to ``(device_id, boot_id)`` and holds each boot's next seq. Ordering by the
primary key is the order of commits, across boots, whatever the wall clock did; the key columns
are not repeated per record, which keeps a 120-byte prediction at ~160 bytes on disk. The view
``outbox`` shows the records with ``device_id, boot_id, seq, kind, created, payload, size``.

Durability (``synchronous``, configurable). The database runs in WAL mode.

* ``NORMAL`` (default): a commit appends to the WAL without fsync; the WAL is synced at checkpoints.
  kill -9 of the process loses nothing that was committed (the WAL is in the OS page cache) and
  never corrupts. A power cut or kernel crash may roll back the commits since the last checkpoint
  (at most ``wal_autocheckpoint`` pages, ~4 MiB by default), never corrupting the file. Records lost
  that way are from a boot that is over, so no key is ever reused (``boot_id`` is new per start).
* ``FULL``: the WAL is also synced at every commit, so a committed record survives a power cut as
  far as the storage honours flushes (many SD cards do not). Costs one fsync per commit, i.e. per
  batch: cheap in records/s because commits are batched, but several ms each on SD cards.
* In-memory records queued by :meth:`Buffer.append` and not yet flushed are lost by any crash; so
  are the sampled-out and queue-full counts gathered since the last commit.

Threads. The buffer owns no thread and no clock (times are parameters). :meth:`Buffer.append` is the
hot-path call: it takes a short in-memory lock and never touches SQLite, never blocks on I/O and
never raises for storage reasons. Every other method uses the single writer connection under one
lock and may be called from any thread: the runtime calls :meth:`~Buffer.flush`,
:meth:`~Buffer.append_many` and :meth:`~Buffer.trim` from its inference or flusher thread; the sync
calls :meth:`~Buffer.peek`, :meth:`~Buffer.ack`, :meth:`~Buffer.pending_count` and
:meth:`~Buffer.stats` from its own thread and waits at most for one commit. :meth:`~Buffer.close`
is called once, after the other threads have stopped using the buffer.

Bounds and drops. Every drop is counted by reason and kind in the ``counters`` table (so counts
survive restarts) and reported by :meth:`Buffer.stats`:

* ``bound``: over ``max_mb`` (measured as payload bytes + :data:`RECORD_OVERHEAD` per record, which
  tracks the b-tree's size), a commit drops the oldest records of the lowest-priority kind first
  (``drop_priority``, default prediction < metric < drift < event), including records of the batch
  being committed, which are then not written at all.
* ``age``: :meth:`Buffer.trim` (the runtime calls it every few seconds with its ``now``) drops
  records created more than ``max_age_s`` before ``now``. Age is judged on the caller's ``created``:
  a device without a real-time clock writes records before NTP sets the time with a wrong clock
  (1970, or fake-hwclock's last shutdown time), and they expire at the first trim after the clock
  jumps if that looks older than ``max_age_s``.
* ``full``: the disk, or the hard cap ``hard_limit_mb`` (SQLite's ``max_page_count``, by default
  twice ``max_mb`` plus 1 MiB) is full. The commit evicts as for ``bound`` and retries; when nothing
  is left to evict the batch is dropped and counted. A full disk never raises into the caller:
  losing the newest records with a counter is better than stopping inference, and the runtime would
  have nothing better to do with an exception.
* ``queue_full``: ``append`` found ``max_queued`` records waiting for a flush (the flusher is stuck);
  the new record is dropped rather than blocking the hot path.
* ``oversize``: a payload larger than ``max_record_bytes`` could never be sent in one message and
  would block the outbox forever.

Predictions may be sampled (``sample_every`` keeps 1 of N; ``sample_probability`` keeps each with a
``random.Random(sample_seed)`` draw, deterministic given the seed and the order of appends since
open); sampled-out predictions are counted, not dropped.

Space. New databases use ``auto_vacuum=INCREMENTAL``. Pages freed by acks and drops are reused by
the next appends; when the free pages exceed a quarter of the file (and 1 MiB) after an ack or a
trim, ``PRAGMA incremental_vacuum`` returns the excess to the filesystem, so a device that drained a
long backlog shrinks. A full ``VACUUM`` is never run: it rewrites the whole file, needs twice the
space (not there when the disk is full) and holds the write lock for seconds on an SD card.

Corruption. At open the file is checked (``PRAGMA quick_check`` by default: it verifies the
b-trees, which are all our tables have; ``integrity_check`` also compares indexes and is slower).
A file that is not a database or fails the check is renamed to ``<name>.corrupt-<UTC time>`` with
its ``-wal``/``-shm`` files, logged, reported as :attr:`Buffer.recovered_from`, and a fresh
database starts. Nothing is ever deleted. Corruption found while running raises
:class:`BufferStoreError`; the next open moves the file aside.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple, Self

from edge_runtime.errors import ConfigError, EdgeRuntimeError

__all__ = [
    "DROP_REASONS",
    "KINDS",
    "RECORD_OVERHEAD",
    "Buffer",
    "BufferConfig",
    "BufferStats",
    "BufferStoreError",
    "Key",
    "Record",
]

log = logging.getLogger(__name__)

KINDS: Final = ("prediction", "metric", "drift", "event", "sample")
DEFAULT_DROP_PRIORITY: Final = ("sample", "prediction", "metric", "drift", "event")
DROP_REASONS: Final = ("bound", "age", "full", "queue_full", "oversize")
# Bytes a record costs on disk beyond its payload: key, kind, created and size columns, the cell
# header and pointer, and the b-tree's unused space: measured at ~38 bytes for 120-byte payloads appended in
# order; 48 leaves room for pages that acks and drops left partly empty
# (tests/test_sqlite_buffer.py::test_measure_throughput_and_bytes_per_record prints it).
RECORD_OVERHEAD: Final = 48

_KIND_CODE: Final = {k: i for i, k in enumerate(KINDS)}
_APPLICATION_ID: Final = 0x45524231  # "ERB1": tells our file from any other SQLite database
_SCHEMA_VERSION: Final = 1
_KEEP_BOOTS: Final = 1024  # newest boot rows kept even when their records are gone
_RESERVE_FREE_PAGES: Final = 256  # free pages kept for reuse instead of shrinking the file
_SQLITE_CORRUPT: Final = 11
_SQLITE_FULL: Final = 13
_SQLITE_NOTADB: Final = 26
_MIB: Final = 1024 * 1024

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS boots (
    boot_ref  INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    boot_id   TEXT NOT NULL,
    next_seq  INTEGER NOT NULL,
    UNIQUE (device_id, boot_id)
);
CREATE TABLE IF NOT EXISTS records (
    boot_ref INTEGER NOT NULL,
    seq      INTEGER NOT NULL,
    kind     INTEGER NOT NULL,
    created  REAL NOT NULL,
    size     INTEGER NOT NULL,
    payload  BLOB NOT NULL,
    PRIMARY KEY (boot_ref, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    n    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE VIEW IF NOT EXISTS outbox AS
    SELECT b.device_id, b.boot_id, r.seq,
           CASE r.kind WHEN 0 THEN 'prediction' WHEN 1 THEN 'metric' WHEN 2 THEN 'drift' ELSE 'event' END AS kind,
           r.created, r.payload, r.size
    FROM records AS r JOIN boots AS b USING (boot_ref)
    ORDER BY r.boot_ref, r.seq;
"""


class BufferStoreError(EdgeRuntimeError):
    """The outbox database cannot be opened or written (not for a full disk, which drops and counts).

    ``path`` is the database file and ``sqlite_error`` SQLite's error name (``SQLITE_IOERR``, ...)
    when SQLite gave one, so a journal line says which file failed and how.
    """

    def __init__(self, message: str, *, path: str, sqlite_error: str | None = None) -> None:
        suffix = f" [{sqlite_error}]" if sqlite_error else ""
        super().__init__(f"outbox {path}: {message}{suffix}")
        self.path = path
        self.sqlite_error = sqlite_error


class Key(NamedTuple):
    """A record's identity, stable across restarts and used by the cloud to dedupe."""

    device_id: str
    boot_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class Record:
    """One buffered record as :meth:`Buffer.peek` returns it."""

    key: Key
    kind: str
    created: float
    payload: bytes

    @property
    def size(self) -> int:
        return len(self.payload)


@dataclass(frozen=True)
class BufferConfig:
    """How the outbox is stored and bounded; validated when built.

    ``max_mb``/``max_age_s``: the bounds (None: unbounded). ``hard_limit_mb``: the file may never
    grow past this (SQLite's ``max_page_count``); None means ``2 * max_mb + 1`` when ``max_mb`` is
    set, else no cap. ``drop_priority`` lists kinds, the first dropped first; kinds it leaves out are
    dropped before any it lists.
    """

    path: str | Path
    device_id: str
    max_mb: float | None = None
    max_age_s: float | None = None
    hard_limit_mb: float | None = None
    synchronous: str = "NORMAL"
    drop_priority: tuple[str, ...] = DEFAULT_DROP_PRIORITY
    sample_every: int = 1
    sample_probability: float = 1.0
    sample_seed: int = 0
    max_queued: int = 32768
    max_record_bytes: int = 256 * 1024
    integrity_check: str = "quick"
    busy_timeout_ms: int = 5000
    wal_autocheckpoint_pages: int = 1000

    def __post_init__(self) -> None:
        def bad(key: str, message: str) -> ConfigError:
            return ConfigError(f"buffer.{key}: {message}", key=key)

        if not self.device_id:
            raise bad("device_id", "must be a non-empty string")
        for key in ("max_mb", "max_age_s", "hard_limit_mb"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise bad(key, f"must be > 0 or unset, got {value!r}")
        if self.synchronous.upper() not in ("NORMAL", "FULL"):
            raise bad("synchronous", f"must be 'NORMAL' or 'FULL', got {self.synchronous!r}")
        unknown = [k for k in self.drop_priority if k not in KINDS]
        if unknown or len(set(self.drop_priority)) != len(self.drop_priority) or not self.drop_priority:
            raise bad("drop_priority", f"must list kinds of {list(KINDS)}, each at most once, got "
                                       f"{list(self.drop_priority)}")
        missing = tuple(k for k in DEFAULT_DROP_PRIORITY if k not in self.drop_priority)
        object.__setattr__(self, "drop_priority", missing + tuple(self.drop_priority))
        if self.sample_every < 1:
            raise bad("sample_every", f"must be >= 1, got {self.sample_every!r}")
        if not 0.0 < self.sample_probability <= 1.0:
            raise bad("sample_probability", f"must be in (0, 1], got {self.sample_probability!r}")
        if self.sample_every > 1 and self.sample_probability < 1.0:
            raise bad("sample_every", "set sample_every or sample_probability, not both")
        for key in ("max_queued", "max_record_bytes", "busy_timeout_ms", "wal_autocheckpoint_pages"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)!r}")
        if self.integrity_check not in ("quick", "full", "none"):
            raise bad("integrity_check", f"must be 'quick', 'full' or 'none', got {self.integrity_check!r}")

    @property
    def max_bytes(self) -> int | None:
        return None if self.max_mb is None else int(self.max_mb * _MIB)

    @property
    def hard_limit_bytes(self) -> int | None:
        if self.hard_limit_mb is not None:
            return int(self.hard_limit_mb * _MIB)
        return None if self.max_mb is None else int((2 * self.max_mb + 1) * _MIB)


@dataclass(frozen=True)
class BufferStats:
    """A snapshot for heartbeats and the journal. ``pending_bytes`` counts payloads; ``stored_bytes``
    is what the ``max_mb`` bound measures; ``db_bytes``/``wal_bytes`` are the files' sizes."""

    device_id: str
    boot_id: str
    next_seq: int
    pending: dict[str, int]
    pending_bytes: int
    stored_bytes: int
    queued: int
    dropped: dict[str, int]
    dropped_by_reason: dict[str, dict[str, int]]
    sampled_out: int
    db_bytes: int
    wal_bytes: int
    recovered_from: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id, "boot_id": self.boot_id, "next_seq": self.next_seq,
            "pending": dict(self.pending), "pending_bytes": self.pending_bytes,
            "stored_bytes": self.stored_bytes, "queued": self.queued, "dropped": dict(self.dropped),
            "dropped_by_reason": {r: dict(k) for r, k in self.dropped_by_reason.items()},
            "sampled_out": self.sampled_out, "db_bytes": self.db_bytes, "wal_bytes": self.wal_bytes,
            "recovered_from": self.recovered_from,
        }


# A queued record: (kind code, created, payload).
_Item = tuple[int, float, bytes]


@dataclass
class _Counts:
    """Pending records per kind code, kept in memory so pending_count() and the bound need no query."""

    n: list[int] = field(default_factory=lambda: [0] * len(KINDS))
    size: list[int] = field(default_factory=lambda: [0] * len(KINDS))

    def stored_bytes(self) -> int:
        return sum(self.size) + RECORD_OVERHEAD * sum(self.n)


class _Corrupt(Exception):
    """Internal: the file at open is not a usable database."""


def _error_code(e: sqlite3.Error) -> int:
    return (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF


def _error_name(e: sqlite3.Error) -> str | None:
    return getattr(e, "sqlite_errorname", None)


class Buffer:
    """The durable outbox. Open with :meth:`open`; see the module docstring for threads and bounds."""

    def __init__(self, config: BufferConfig, conn: sqlite3.Connection, *, boot_id: str,
                 recovered_from: str | None) -> None:
        """Use :meth:`open`; this wires an already prepared connection."""
        self.config = config
        self.path = str(config.path)
        self.boot_id = boot_id
        self.recovered_from = recovered_from
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()          # the connection and everything persisted
        self._qlock = threading.Lock()         # the in-memory queue and the sampling state
        self._queue: list[_Item] = []
        self._sample_n = 0
        self._rng = random.Random(config.sample_seed)
        self._priority = [_KIND_CODE[k] for k in config.drop_priority]
        self._counts = _Counts()
        self._counters: dict[str, int] = {}
        self._unsaved: dict[str, int] = {}     # counter deltas not yet committed (guarded by _qlock)
        self._boots: dict[int, tuple[str, str]] = {}
        self._refs: dict[tuple[str, str], int] = {}
        self._boot_ref: int | None = None      # registered lazily at the first commit
        self._next_seq = 0
        self._log_counts: dict[str, int] = {}

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(cls, config: BufferConfig, *, now: float, boot_id: str | None = None) -> Buffer:
        """Open (or create) the outbox at ``config.path`` for a new process start.

        ``now`` names a corrupt file moved aside and applies ``max_age_s``. ``boot_id`` defaults to a
        fresh uuid4; pass a stable one only if it is new per start or the last one used on this file.
        """
        path = Path(config.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BufferStoreError(f"cannot create the directory: {e.strerror or e}", path=str(path)) from e
        recovered_from = None
        corrupt: _Corrupt | None = None
        try:
            conn = _connect_checked(path, config)
        except _Corrupt as e:
            corrupt = e
        if corrupt is not None:
            recovered_from = _move_aside(path, now)
            log.error("outbox %s is corrupt (%s): moved aside to %s, starting a fresh outbox",
                      path, corrupt, recovered_from)
            conn = _connect_checked(path, config)
        buf = cls(config, conn, boot_id=boot_id or uuid.uuid4().hex, recovered_from=recovered_from)
        try:
            buf._load()
            buf._enforce_bound()
            if config.max_age_s is not None:
                buf.trim(now)
        except BaseException:
            conn.close()
            raise
        return buf

    def _load(self) -> None:
        conn = self._db()
        with self._sql("load the outbox"):
            for ref, device_id, boot_id, next_seq in conn.execute(
                    "SELECT boot_ref, device_id, boot_id, next_seq FROM boots ORDER BY boot_ref"):
                self._boots[ref] = (device_id, boot_id)
                self._refs[(device_id, boot_id)] = ref
                if (device_id, boot_id) == (self.config.device_id, self.boot_id):
                    self._next_seq = next_seq
            mine = self._refs.get((self.config.device_id, self.boot_id))
            if mine is not None:
                if mine != max(self._boots):
                    raise BufferStoreError(
                        f"boot_id {self.boot_id!r} was used before boot {self._boots[max(self._boots)][1]!r}; "
                        "a boot_id must be new at each start (or the last one used)", path=self.path)
                self._boot_ref = mine
            for kind, n, size in conn.execute("SELECT kind, count(*), sum(size) FROM records GROUP BY kind"):
                self._counts.n[kind] = n
                self._counts.size[kind] = size
            self._counters = dict(conn.execute("SELECT name, n FROM counters"))
            # Boots whose records are all gone only cost a row each; keep the newest so that their
            # next_seq survives a reuse of their boot_id, and prune the rest.
            if len(self._boots) > _KEEP_BOOTS:
                cutoff = sorted(self._boots)[-_KEEP_BOOTS]
                conn.execute("BEGIN IMMEDIATE")
                gone = [r for (r,) in conn.execute(
                    "SELECT boot_ref FROM boots AS b WHERE boot_ref < ? AND NOT EXISTS "
                    "(SELECT 1 FROM records AS r WHERE r.boot_ref = b.boot_ref)", (cutoff,))]
                conn.executemany("DELETE FROM boots WHERE boot_ref = ?", [(r,) for r in gone])
                conn.execute("COMMIT")
                for r in gone:
                    del self._refs[self._boots.pop(r)]

    # ---------------------------------------------------------------- appending

    def append(self, kind: str, payload: bytes, created: float) -> None:
        """Queue one record in memory (hot path: no I/O, no storage exception); :meth:`flush` commits it.

        Raises ValueError for a kind that is not one of :data:`KINDS` and BufferStoreError after
        :meth:`close` (programming errors, not storage ones).
        """
        code = _KIND_CODE.get(kind)
        if code is None:
            raise ValueError(f"record kind must be one of {list(KINDS)}, got {kind!r}")
        with self._qlock:
            if self._conn is None:
                raise BufferStoreError("append() after close()", path=self.path)
            if code == 0 and not self._keep_prediction():
                return
            if len(payload) > self.config.max_record_bytes:
                self._count_unsaved("dropped/oversize/" + kind, 1)
                return
            if len(self._queue) >= self.config.max_queued:
                self._count_unsaved("dropped/queue_full/" + kind, 1)
                return
            self._queue.append((code, created, payload))

    def append_many(self, kind: str, payloads: Sequence[bytes], created: float) -> range:
        """Commit ``payloads`` (after anything queued by :meth:`append`) in one transaction.

        Returns the seqs written for this boot (a range: contiguous, possibly empty when everything
        was sampled out or dropped). Raises :class:`BufferStoreError` when SQLite fails other than by
        a full disk; then nothing of this call is stored and the queued records stay queued.
        """
        code = _KIND_CODE.get(kind)
        if code is None:
            raise ValueError(f"record kind must be one of {list(KINDS)}, got {kind!r}")
        limit = self.config.max_record_bytes
        with self._lock:
            self._db()
            with self._qlock:
                queued, self._queue = self._queue, []
                items = []
                for payload in payloads:
                    if code == 0 and not self._keep_prediction():
                        continue
                    if len(payload) > limit:
                        self._count_unsaved("dropped/oversize/" + kind, 1)
                        continue
                    items.append((code, created, payload))
            try:
                return self._commit(queued + items)
            except BufferStoreError:
                self._requeue(queued)
                raise

    def flush(self) -> range:
        """Commit every queued record in one transaction; returns the seqs written (see append_many).

        On :class:`BufferStoreError` the records go back to the front of the queue (up to its bound).
        """
        with self._lock:
            self._db()
            with self._qlock:
                queued, self._queue = self._queue, []
            if not queued and not self._unsaved:
                return range(self._next_seq, self._next_seq)
            try:
                return self._commit(queued)
            except BufferStoreError:
                self._requeue(queued)
                raise

    def _keep_prediction(self) -> bool:
        """Sampling decision for one prediction (caller holds _qlock)."""
        cfg = self.config
        if cfg.sample_every > 1:
            keep = self._sample_n % cfg.sample_every == 0
            self._sample_n += 1
        elif cfg.sample_probability < 1.0:
            keep = self._rng.random() < cfg.sample_probability
        else:
            return True
        if not keep:
            self._count_unsaved("sampled_out/prediction", 1)
        return keep

    def _count_unsaved(self, name: str, n: int) -> None:
        self._unsaved[name] = self._unsaved.get(name, 0) + n
        if name.startswith("dropped/"):
            self._log_drop(name, n)

    def _requeue(self, items: list[_Item]) -> None:
        with self._qlock:
            merged = items + self._queue
            overflow = merged[self.config.max_queued:]
            self._queue = merged[:self.config.max_queued]
            for code, _, _ in overflow:
                self._count_unsaved("dropped/queue_full/" + KINDS[code], 1)

    def _commit(self, items: list[_Item]) -> range:
        """Write ``items`` in one transaction, making room first; retry after evictions on SQLITE_FULL."""
        attempt = 0
        while True:
            try:
                return self._commit_once(items)
            except sqlite3.Error as e:
                self._rollback()
                if _error_code(e) != _SQLITE_FULL:
                    raise self._store_error("commit", e) from e
                need = max(sum(len(p) + RECORD_OVERHEAD for _, _, p in items), 64 * 1024) << attempt
                attempt += 1
                if attempt > 8 or not self._evict_for_full(need):
                    with self._qlock:
                        for code, _, _ in items:
                            self._count_unsaved("dropped/full/" + KINDS[code], 1)
                    log.warning("outbox %s is full (%s) and nothing is left to evict: %d records dropped",
                                self.path, e, len(items))
                    # Persist the counts if the disk allows; if not, they wait for the next commit.
                    with contextlib.suppress(sqlite3.Error):
                        self._commit_once([])
                    self._rollback()
                    return range(self._next_seq, self._next_seq)

    def _commit_once(self, items: list[_Item]) -> range:
        conn = self._db()
        with self._qlock:
            unsaved, self._unsaved = self._unsaved, {}
        try:
            conn.execute("BEGIN IMMEDIATE")
            drops: dict[str, int] = {}
            victims: list[tuple[int, int, int, int]] = []
            max_bytes = self.config.max_bytes
            if max_bytes is not None and items:
                excess = (self._counts.stored_bytes() + sum(len(p) + RECORD_OVERHEAD for _, _, p in items)
                          - max_bytes)
                if excess > 0:
                    victims, items = self._plan_evictions(excess, items, drops, "bound")
                    self._delete(victims)
            ref = self._ensure_boot(conn) if items else self._boot_ref
            first = self._next_seq
            if items:
                seqs = itertools.count(first)
                conn.executemany(
                    "INSERT INTO records (boot_ref, seq, kind, created, size, payload) VALUES (?, ?, ?, ?, ?, ?)",
                    [(ref, next(seqs), code, created, len(p), p) for code, created, p in items])
                conn.execute("UPDATE boots SET next_seq = ? WHERE boot_ref = ?", (first + len(items), ref))
            saved = dict(unsaved)
            for name, n in drops.items():
                saved[name] = saved.get(name, 0) + n
            self._save_counters(conn, saved)
            conn.execute("COMMIT")
        except BaseException:
            with self._qlock:  # the rolled-back drops did not happen; the earlier counts wait for a commit
                for name, n in unsaved.items():
                    self._unsaved[name] = self._unsaved.get(name, 0) + n
            raise
        self._next_seq = first + len(items)
        self._forget(victims)
        for code, _, p in items:
            self._counts.n[code] += 1
            self._counts.size[code] += len(p)
        self._fold(saved)
        return range(first, self._next_seq)

    def _ensure_boot(self, conn: sqlite3.Connection) -> int:
        """Register this boot at its first commit, so that read-only opens leave no trace."""
        if self._boot_ref is None:
            ref = max(self._boots, default=0) + 1
            conn.execute("INSERT INTO boots (boot_ref, device_id, boot_id, next_seq) VALUES (?, ?, ?, ?)",
                         (ref, self.config.device_id, self.boot_id, self._next_seq))
            self._boot_ref = ref
            self._boots[ref] = (self.config.device_id, self.boot_id)
            self._refs[self._boots[ref]] = ref
        return self._boot_ref

    # ---------------------------------------------------------------- bounds

    def _plan_evictions(self, excess: int, items: list[_Item], drops: dict[str, int],
                        reason: str) -> tuple[list[tuple[int, int, int, int]], list[_Item]]:
        """Choose what to drop to free ``excess`` bytes: per kind in priority order, the oldest stored
        records, then the oldest of the batch. Returns (stored victims, batch items kept)."""
        conn = self._db()
        victims: list[tuple[int, int, int, int]] = []
        dropped_items: set[int] = set()
        for code in self._priority:
            if excess <= 0:
                break
            if self._counts.n[code]:
                after = (-1, -1)
                while excess > 0:
                    rows = conn.execute(
                        "SELECT boot_ref, seq, size FROM records WHERE kind = ? AND (boot_ref, seq) > (?, ?) "
                        "ORDER BY boot_ref, seq LIMIT ?", (code, *after, 512)).fetchall()
                    for ref, seq, size in rows:
                        victims.append((ref, seq, code, size))
                        excess -= size + RECORD_OVERHEAD
                        if excess <= 0:
                            break
                    if len(rows) < 512:
                        break
                    after = (rows[-1][0], rows[-1][1])
            for i, (c, _, p) in enumerate(items):
                if excess <= 0:
                    break
                if c == code:
                    dropped_items.add(i)
                    excess -= len(p) + RECORD_OVERHEAD
        for _, _, code, _ in victims:
            name = f"dropped/{reason}/{KINDS[code]}"
            drops[name] = drops.get(name, 0) + 1
        for i in dropped_items:
            name = f"dropped/{reason}/{KINDS[items[i][0]]}"
            drops[name] = drops.get(name, 0) + 1
        kept = [it for i, it in enumerate(items) if i not in dropped_items] if dropped_items else items
        for name, n in drops.items():
            self._log_drop(name, n)
        return victims, kept

    def _delete(self, victims: list[tuple[int, int, int, int]]) -> None:
        if victims:
            self._db().executemany("DELETE FROM records WHERE boot_ref = ? AND seq = ?",
                                   [(ref, seq) for ref, seq, _, _ in victims])

    def _forget(self, victims: list[tuple[int, int, int, int]]) -> None:
        for _, _, code, size in victims:
            self._counts.n[code] -= 1
            self._counts.size[code] -= size

    def _evict_for_full(self, need: int) -> bool:
        """After SQLITE_FULL: drop ``need`` bytes of stored records by priority. False if none left."""
        if not sum(self._counts.n):
            return False
        conn = self._db()
        drops: dict[str, int] = {}
        try:
            conn.execute("BEGIN IMMEDIATE")
            victims, _ = self._plan_evictions(need, [], drops, "full")
            self._delete(victims)  # deleting grows the WAL only, not the database: allowed when full
            self._save_counters(conn, drops)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._rollback()
            log.warning("outbox %s: evicting to make room failed: %s", self.path, e)
            return False
        self._forget(victims)
        self._fold(drops)
        return bool(victims)

    def _enforce_bound(self) -> None:
        """Apply ``max_mb`` to what is stored (after open, when the bound may have been lowered)."""
        max_bytes = self.config.max_bytes
        if max_bytes is None or self._counts.stored_bytes() <= max_bytes:
            return
        conn = self._db()
        drops: dict[str, int] = {}
        with self._sql("apply the size bound"):
            try:
                conn.execute("BEGIN IMMEDIATE")
                victims, _ = self._plan_evictions(self._counts.stored_bytes() - max_bytes, [], drops, "bound")
                self._delete(victims)
                self._save_counters(conn, drops)
                conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        self._forget(victims)
        self._fold(drops)

    def trim(self, now: float) -> dict[str, int]:
        """Drop records older than ``max_age_s`` before ``now``, then give surplus free pages back.

        Call every few seconds from the runtime's thread. Returns the records dropped per kind.
        """
        dropped: dict[str, int] = {}
        with self._lock:
            conn = self._db()
            if self.config.max_age_s is not None:
                cutoff = now - self.config.max_age_s
                with self._sql("drop expired records"):
                    try:
                        conn.execute("BEGIN IMMEDIATE")
                        rows = conn.execute("SELECT kind, count(*), sum(size) FROM records WHERE created < ? "
                                            "GROUP BY kind", (cutoff,)).fetchall()
                        if rows:
                            conn.execute("DELETE FROM records WHERE created < ?", (cutoff,))
                            counts = {f"dropped/age/{KINDS[k]}": n for k, n, _ in rows}
                            self._save_counters(conn, counts)
                        conn.execute("COMMIT")
                    except BaseException:
                        self._rollback()
                        raise
                for kind, n, size in rows:
                    self._counts.n[kind] -= n
                    self._counts.size[kind] -= size
                    dropped[KINDS[kind]] = n
                    self._log_drop(f"dropped/age/{KINDS[kind]}", n)
                self._fold({f"dropped/age/{k}": n for k, n in dropped.items()})
            self._reclaim()
            with self._sql("checkpoint"):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        return dropped

    def _reclaim(self) -> None:
        """Shrink the file when over a quarter of it is free pages (see the module docstring)."""
        conn = self._db()
        with self._sql("reclaim free pages"):
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            total = conn.execute("PRAGMA page_count").fetchone()[0]
            if free > _RESERVE_FREE_PAGES and free * 4 > total:
                # Through execute() this pragma frees ONE page (the module steps it once, and it yields
                # no row to fetch); executescript() steps it to the end. We are in autocommit here.
                conn.executescript(f"PRAGMA incremental_vacuum({free - _RESERVE_FREE_PAGES})")

    # ---------------------------------------------------------------- reading and acking

    def peek(self, limit: int, max_bytes: int, *, after: Key | None = None) -> list[Record]:
        """The oldest unacked records in commit order, at most ``limit`` and ``max_bytes`` of payload
        (at least one record when any is pending, so a large one cannot block the outbox).

        ``after`` continues past the last record of an earlier peek still in flight (a key this
        buffer does not know, e.g. from before a restart, means from the start).
        """
        if limit <= 0:
            return []
        with self._lock:
            conn = self._db()
            pos = (-1, -1)
            if after is not None:
                ref = self._refs.get((after.device_id, after.boot_id))
                if ref is not None:
                    pos = (ref, after.seq)
            out: list[Record] = []
            total = 0
            with self._sql("read pending records"):
                cur = conn.execute("SELECT boot_ref, seq, kind, created, payload FROM records "
                                   "WHERE (boot_ref, seq) > (?, ?) ORDER BY boot_ref, seq LIMIT ?", (*pos, limit))
                for ref, seq, kind, created, payload in cur:
                    total += len(payload)
                    if out and total > max_bytes:
                        break
                    device_id, boot_id = self._boots[ref]
                    out.append(Record(Key(device_id, boot_id, seq), KINDS[kind], created, payload))
                cur.close()
            return out

    def ack(self, keys: Iterable[Key]) -> int:
        """Delete the records the cloud has acknowledged storing; returns how many were still here.

        Unknown and already acked keys are ignored (acks may repeat). Only the cloud's end-to-end
        acknowledgement may call this: a broker PUBACK does not mean the record was stored.
        """
        by_ref: dict[int, list[int]] = {}
        with self._lock:
            for key in keys:
                ref = self._refs.get((key.device_id, key.boot_id))
                if ref is not None:
                    by_ref.setdefault(ref, []).append(key.seq)
        if not by_ref:
            return 0
        runs: list[tuple[int, int, int]] = []
        for ref, seqs in by_ref.items():
            seqs.sort()
            start = prev = seqs[0]
            for s in seqs[1:]:
                if s > prev + 1:
                    runs.append((ref, start, prev))
                    start = s
                prev = s
            runs.append((ref, start, prev))
        deleted = [0] * len(KINDS)
        freed = [0] * len(KINDS)
        with self._lock:
            conn = self._db()
            with self._sql("delete acknowledged records"):
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    for run in runs:
                        for kind, n, size in conn.execute(
                                "SELECT kind, count(*), sum(size) FROM records WHERE boot_ref = ? AND seq BETWEEN ? "
                                "AND ? GROUP BY kind", run):
                            deleted[kind] += n
                            freed[kind] += size
                    conn.executemany("DELETE FROM records WHERE boot_ref = ? AND seq BETWEEN ? AND ?", runs)
                    conn.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            for code in range(len(KINDS)):
                self._counts.n[code] -= deleted[code]
                self._counts.size[code] -= freed[code]
            if sum(deleted):
                self._reclaim()
        return sum(deleted)

    def pending_count(self, kind: str | None = None) -> int:
        """Committed, unacked records (of one kind, or all); queued ones are not counted."""
        with self._lock:
            return sum(self._counts.n) if kind is None else self._counts.n[_KIND_CODE[kind]]

    def pending_bytes(self) -> int:
        """Payload bytes of the committed, unacked records."""
        with self._lock:
            return sum(self._counts.size)

    def stats(self) -> BufferStats:
        with self._lock:
            self._db()
            with self._qlock:
                queued = len(self._queue)
                unsaved = dict(self._unsaved)
            counters = dict(self._counters)
            for name, n in unsaved.items():
                counters[name] = counters.get(name, 0) + n
            by_reason = {r: {k: counters.get(f"dropped/{r}/{k}", 0) for k in KINDS} for r in DROP_REASONS}
            return BufferStats(
                device_id=self.config.device_id, boot_id=self.boot_id, next_seq=self._next_seq,
                pending=dict(zip(KINDS, self._counts.n, strict=True)), pending_bytes=sum(self._counts.size),
                stored_bytes=self._counts.stored_bytes(), queued=queued,
                dropped={k: sum(by_reason[r][k] for r in DROP_REASONS) for k in KINDS},
                dropped_by_reason=by_reason, sampled_out=counters.get("sampled_out/prediction", 0),
                db_bytes=_file_size(Path(self.path)), wal_bytes=_file_size(Path(self.path + "-wal")),
                recovered_from=self.recovered_from)

    # ---------------------------------------------------------------- lifecycle

    def close(self, *, flush: bool = True) -> None:
        """Commit what is queued (unless ``flush=False``) and close; a second close does nothing."""
        with self._lock:
            if self._conn is None:
                return
        try:
            if flush:
                self.flush()
        finally:
            with self._lock, self._qlock:
                conn, self._conn = self._conn, None
                self._queue = []
            if conn is not None:
                conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
            return
        failed: BufferStoreError | None = None
        try:
            self.close()
        except BufferStoreError as e:  # do not hide the exception that is already propagating
            failed = e
        if failed is not None:
            log.error("outbox %s: flush at close failed: %s", self.path, failed)

    # ---------------------------------------------------------------- helpers

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BufferStoreError("the outbox is closed", path=self.path)
        return self._conn

    def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def _save_counters(self, conn: sqlite3.Connection, deltas: dict[str, int]) -> None:
        if deltas:
            conn.executemany("INSERT INTO counters (name, n) VALUES (?, ?) "
                             "ON CONFLICT (name) DO UPDATE SET n = n + excluded.n", list(deltas.items()))

    def _fold(self, deltas: dict[str, int]) -> None:
        for name, n in deltas.items():
            self._counters[name] = self._counters.get(name, 0) + n

    def _store_error(self, action: str, e: sqlite3.Error) -> BufferStoreError:
        return BufferStoreError(f"cannot {action}: {e}", path=self.path, sqlite_error=_error_name(e))

    @contextlib.contextmanager
    def _sql(self, action: str) -> Iterator[None]:
        """Translate sqlite3 errors into BufferStoreError naming what we were doing."""
        try:
            yield
        except sqlite3.Error as e:
            raise self._store_error(action, e) from e

    def _log_drop(self, name: str, n: int) -> None:
        """Log the first five drop events of each reason and kind, then every 1000th."""
        seen = self._log_counts.get(name, 0) + 1
        self._log_counts[name] = seen
        if seen <= 5 or seen % 1000 == 0:
            _, reason, kind = name.split("/")
            log.warning("outbox %s: dropped %d %s record(s): %s [event #%d]", self.path, n, kind, reason, seen)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _connect_checked(path: Path, config: BufferConfig) -> sqlite3.Connection:
    """Open, check and configure the database; raise _Corrupt for a file that is not a usable one."""
    p = str(path)
    try:
        conn = sqlite3.connect(p, isolation_level=None, check_same_thread=False,
                               timeout=config.busy_timeout_ms / 1000)
    except sqlite3.Error as e:
        raise BufferStoreError(f"cannot open: {e}", path=p, sqlite_error=_error_name(e)) from e
    try:
        # The first read parses the header: a file that is not a database fails here.
        tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
        if tables and config.integrity_check != "none":
            pragma = "quick_check" if config.integrity_check == "quick" else "integrity_check"
            result = [r[0] for r in conn.execute(f"PRAGMA {pragma}")]
            if result != ["ok"]:
                raise _Corrupt(f"{pragma}: {'; '.join(result[:3])}")
        app_id, version = (conn.execute(f"PRAGMA {name}").fetchone()[0] for name in ("application_id", "user_version"))
        if tables and app_id != _APPLICATION_ID:
            raise BufferStoreError(f"is an SQLite database but not an edge-runtime outbox (application_id {app_id})",
                                   path=p)
        if version > _SCHEMA_VERSION:
            raise BufferStoreError(f"was written by a newer edge-runtime (schema {version}, this one reads "
                                   f"{_SCHEMA_VERSION})", path=p)
        if not tables:
            # Must precede the first table: a database without it can only switch by a full VACUUM.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise BufferStoreError(f"cannot use WAL mode on this filesystem (journal_mode is {mode})", path=p)
        conn.execute(f"PRAGMA synchronous = {config.synchronous.upper()}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {config.wal_autocheckpoint_pages}")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA journal_size_limit = {config.wal_autocheckpoint_pages * page_size}")
        if config.hard_limit_bytes is not None:
            conn.execute(f"PRAGMA max_page_count = {max(8, config.hard_limit_bytes // page_size)}")
        conn.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except _Corrupt:
        conn.close()
        raise
    except sqlite3.DatabaseError as e:
        conn.close()
        if _error_code(e) in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            raise _Corrupt(str(e)) from e
        raise BufferStoreError(f"cannot open: {e}", path=p, sqlite_error=_error_name(e)) from e
    except BaseException:
        conn.close()
        raise
    return conn


def _move_aside(path: Path, now: float) -> str:
    """Rename a corrupt database (and its -wal/-shm) to ``<name>.corrupt-<UTC time>``; never delete."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    try:
        path.rename(target)
        for suffix in ("-wal", "-shm"):
            side = Path(str(path) + suffix)
            if side.exists():
                side.rename(str(target) + suffix)
    except OSError as e:
        raise BufferStoreError(f"is corrupt and cannot be moved aside to {target}: {e.strerror or e}",
                               path=str(path)) from e
    return str(target)
