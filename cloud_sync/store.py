"""The cloud's store: device records deduplicated on their key, the tables the dashboard and the
workflows read (metrics, drift summaries, events, alerts, retrain requests, the review queue, model
rollouts), and retention.

SQLite by default (:class:`Store`: WAL, one writer); PostgreSQL (:mod:`cloud_sync.store_postgres`)
for fleets that outgrow one box. :func:`open_store` picks one from a path or URL. Every query lives
in :class:`BaseStore`, written once in SQL that both engines accept (``?`` placeholders, which the
PostgreSQL driver translates); the subclasses hold only the driver: connecting, transactions, how to
lock the schema, and which exceptions to translate into :class:`StoreError`.

``INSERT ... ON CONFLICT DO NOTHING`` on the primary key ``(device_id, boot_id, seq)`` turns
at-least-once delivery into exactly-once storage: a resent batch changes nothing. Metric, drift and
event records are also written to their own tables, in the same transaction and only when the record
itself was new, so a resent batch adds no rows there either. The ack is sent only after the commit
returns, so an acknowledged record is on disk here.

The schema is :data:`MIGRATIONS`: numbered steps applied in order when a store is opened, each in
one transaction together with the new ``meta.schema_version``. A store written by a newer cloud-sync
is refused, never guessed at. Payloads are stored as JSON text in both engines, so that reads decode
them the same way.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Final

from edge_runtime.core import protocol as p
from edge_runtime.errors import EdgeRuntimeError

__all__ = [
    "MIGRATIONS",
    "PRUNE_CHUNK",
    "REVIEW_STATES",
    "SCHEMA_VERSION",
    "BaseStore",
    "Migration",
    "SchemaVersionError",
    "SqliteStore",
    "StateError",
    "Store",
    "StoreError",
    "open_store",
]

log = logging.getLogger(__name__)


class StoreError(EdgeRuntimeError):
    """The store could not do what was asked; ``where`` names the store (a path or a URL without its
    password). Driver errors (sqlite3, psycopg) arrive as this, with the original as ``__cause__``."""

    def __init__(self, message: str, *, where: str | None = None) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


class SchemaVersionError(StoreError):
    """The store's schema is newer than the newest migration this cloud-sync knows."""

    def __init__(self, where: str, found: int, supported: int) -> None:
        super().__init__(f"store schema version {found} is newer than this cloud-sync supports ({supported}); "
                         "upgrade cloud-sync, or open a store written by this version", where=where)
        self.found = found
        self.supported = supported


class StateError(StoreError):
    """An item is not in a state that allows the change (a review resolved twice, an unknown id)."""


# -- schema ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Migration:
    """One schema step. ``sql`` runs on every engine, then the engine's own statements (``sqlite`` or
    ``postgres``), then ``backfill`` (given the open transaction's executor) where old rows need
    copying into new tables. Statements are separate strings: one execute each."""

    version: int
    name: str
    sql: tuple[str, ...] = ()
    sqlite: tuple[str, ...] = ()
    postgres: tuple[str, ...] = ()
    backfill: Callable[[Any], None] | None = None

    def statements(self, dialect: str) -> tuple[str, ...]:
        return self.sql + getattr(self, dialect)


def _backfill_v2(ex: Any) -> None:
    """Metric, drift and event records stored before their tables existed get their rows."""
    after: tuple[Any, ...] | None = None
    while True:
        q = ("SELECT device_id, boot_id, seq, kind, created_ms, payload FROM records "
             "WHERE kind IN ('m', 'd', 'e')")
        args: tuple[Any, ...] = ()
        if after is not None:
            q += " AND (device_id, boot_id, seq) > (?, ?, ?)"
            args = after
        rows = ex.execute(q + " ORDER BY device_id, boot_id, seq LIMIT 1000", args).fetchall()
        if not rows:
            return
        by_batch: dict[tuple[str, str], list[p.Record]] = {}
        for d, b, s, k, c, pl in rows:
            by_batch.setdefault((d, b), []).append(p.Record(s, k, c, json.loads(pl)))
        for (d, b), recs in by_batch.items():
            _fan_out(ex, d, b, recs)
        after = tuple(rows[-1][:3])


# The tables as cloud-sync 0.1 created them (SQLite only); PostgreSQL starts at the same version.
_V1_SQLITE = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS records (
    device_id TEXT NOT NULL, boot_id TEXT NOT NULL, seq INTEGER NOT NULL,
    kind TEXT NOT NULL, created_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (device_id, boot_id, seq)
) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS records_by_time ON records (created_ms)",
    """CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, online INTEGER NOT NULL, boot_id TEXT, last_seen_ms INTEGER NOT NULL,
    status TEXT NOT NULL
)""",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)

_V1_POSTGRES = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS records (
    device_id TEXT NOT NULL, boot_id TEXT NOT NULL, seq BIGINT NOT NULL,
    kind TEXT NOT NULL, created_ms BIGINT NOT NULL, received_ms BIGINT NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (device_id, boot_id, seq)
)""",
    # SQLite appends the primary key to every index of a WITHOUT ROWID table; PostgreSQL is told, so
    # that export's keyset pages (created_ms, device_id, boot_id, seq) are index range scans.
    "CREATE INDEX IF NOT EXISTS records_by_time ON records (created_ms, device_id, boot_id, seq)",
    """CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, online INTEGER NOT NULL, boot_id TEXT, last_seen_ms BIGINT NOT NULL,
    status TEXT NOT NULL
)""",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
)

MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "records, devices, counters", sqlite=_V1_SQLITE, postgres=_V1_POSTGRES),
    Migration(2, "metrics, drift and events from their records", sql=(
        """CREATE TABLE metrics (
    device_id TEXT NOT NULL, boot_id TEXT NOT NULL, seq BIGINT NOT NULL,
    pipeline TEXT NOT NULL, time_ms BIGINT NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (device_id, boot_id, seq)
)""",
        "CREATE INDEX metrics_by_device_time ON metrics (device_id, time_ms)",
        "CREATE INDEX metrics_by_time ON metrics (time_ms)",
        """CREATE TABLE drift (
    device_id TEXT NOT NULL, boot_id TEXT NOT NULL, seq BIGINT NOT NULL,
    model TEXT NOT NULL, model_version TEXT NOT NULL, start_ms BIGINT NOT NULL, end_ms BIGINT NOT NULL,
    summary TEXT NOT NULL,
    PRIMARY KEY (device_id, boot_id, seq)
)""",
        "CREATE INDEX drift_by_model_end ON drift (model, end_ms)",
        "CREATE INDEX drift_by_end ON drift (end_ms)",
        """CREATE TABLE events (
    device_id TEXT NOT NULL, boot_id TEXT NOT NULL, seq BIGINT NOT NULL,
    time_ms BIGINT NOT NULL, name TEXT NOT NULL, severity TEXT NOT NULL, ref TEXT NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (device_id, boot_id, seq)
)""",
        "CREATE INDEX events_by_device_time ON events (device_id, time_ms)",
        "CREATE INDEX events_by_time ON events (time_ms)",
    ),
        # Retention deletes by kind and age, oldest first; export reads one kind in key order. SQLite
        # appends the primary key to the index by itself.
        sqlite=("CREATE INDEX records_by_kind_time ON records (kind, created_ms)",),
        postgres=("CREATE INDEX records_by_kind_time ON records (kind, created_ms, device_id, boot_id, seq)",),
        backfill=_backfill_v2),
    Migration(3, "alerts, retrain requests, review queue", sql=(
        """CREATE TABLE alerts (
    id TEXT PRIMARY KEY, rule TEXT NOT NULL, subject TEXT NOT NULL, state TEXT NOT NULL,
    severity TEXT NOT NULL, payload TEXT NOT NULL, updated_ms BIGINT NOT NULL
)""",
        "CREATE INDEX alerts_by_state ON alerts (state, updated_ms)",
        """CREATE TABLE retrain_requests (
    id TEXT PRIMARY KEY, created_ms BIGINT NOT NULL, model TEXT NOT NULL, reason TEXT NOT NULL,
    payload TEXT NOT NULL, state TEXT NOT NULL, outcome TEXT, updated_ms BIGINT NOT NULL
)""",
        "CREATE INDEX retrain_requests_by_state ON retrain_requests (state, created_ms)",
        """CREATE TABLE review_queue (
    id TEXT PRIMARY KEY, device_id TEXT NOT NULL, model TEXT NOT NULL, created_ms BIGINT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'confirmed', 'corrected')),
    label TEXT, reviewed_by TEXT, reviewed_ms BIGINT
)""",
        "CREATE INDEX review_queue_by_state ON review_queue (state, created_ms)",
    )),
    Migration(4, "model rollouts", sql=(
        """CREATE TABLE rollouts (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, payload TEXT NOT NULL, updated_ms BIGINT NOT NULL
)""",
        "CREATE INDEX rollouts_by_state ON rollouts (state, updated_ms)",
    )),
)

SCHEMA_VERSION: Final = MIGRATIONS[-1].version

REVIEW_STATES: Final = ("pending", "confirmed", "corrected")

# Rows per multi-row INSERT: 7 columns x 128 stays under SQLite's oldest bound-parameter limit (999).
_INSERT_CHUNK: Final = 128
# Rows per retention transaction: long enough to be efficient, short enough not to hold up the ingest.
PRUNE_CHUNK: Final = 5000

_RECORD_COLUMNS: Final = "device_id, boot_id, seq, kind, created_ms, received_ms, payload"


def _check_migrations(migrations: Sequence[Migration]) -> None:
    versions = [m.version for m in migrations]
    if not versions or versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1, 2, 3, ... in order; got {versions}")


def _dumps(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"))


def _loads(v: str | None) -> Any:
    return None if v is None else json.loads(v)


@lru_cache(maxsize=8)
def _insert_records_sql(n: int) -> str:
    values = ",".join(["(?,?,?,?,?,?,?)"] * n)
    return f"INSERT INTO records ({_RECORD_COLUMNS}) VALUES {values} ON CONFLICT DO NOTHING RETURNING seq"


# -- fan-out of records to their tables ----------------------------------------------------------------

def _metric_row(device_id: str, boot_id: str, r: Any) -> tuple[Any, ...]:
    pipeline = r.payload.get("pipeline")
    return (device_id, boot_id, r.seq, pipeline if isinstance(pipeline, str) else "", r.created_ms,
            _dumps(r.payload))


def _drift_row(device_id: str, boot_id: str, r: Any) -> tuple[Any, ...] | None:
    try:
        d = p.DriftSummary.from_payload(r.payload)
    except p.ProtocolError as e:
        log.debug("drift record %s/%s/%s not tabulated: %s", device_id, boot_id, r.seq, e)
        return None
    return (device_id, boot_id, r.seq, d.model, d.model_version, d.start_ms, d.end_ms, _dumps(d.summary))


def _event_row(device_id: str, boot_id: str, r: Any) -> tuple[Any, ...] | None:
    try:
        e = p.Event.from_payload(r.payload)
    except p.ProtocolError as err:
        log.debug("event record %s/%s/%s not tabulated: %s", device_id, boot_id, r.seq, err)
        return None
    return (device_id, boot_id, r.seq, r.created_ms, e.name, e.severity, e.ref, _dumps(r.payload))


# kind -> (row builder, INSERT). A record whose payload does not fit its kind's envelope stays in
# ``records`` only; it never fails the batch.
_FAN_OUT: Final[dict[str, tuple[Callable[[str, str, Any], tuple[Any, ...] | None], str]]] = {
    p.METRIC: (_metric_row, "INSERT INTO metrics (device_id, boot_id, seq, pipeline, time_ms, payload) "
                            "VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING"),
    p.DRIFT: (_drift_row, "INSERT INTO drift (device_id, boot_id, seq, model, model_version, start_ms, end_ms, "
                          "summary) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"),
    p.EVENT: (_event_row, "INSERT INTO events (device_id, boot_id, seq, time_ms, name, severity, ref, payload) "
                          "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"),
}


def _fan_out(ex: Any, device_id: str, boot_id: str, records: Iterable[Any], kinds: Iterable[str] = _FAN_OUT
             ) -> int:
    """Rows for the metric/drift/event records among ``records``; how many were inserted."""
    wanted = set(kinds)
    rows: dict[str, list[tuple[Any, ...]]] = {}
    for r in records:
        if r.kind in wanted:
            row = _FAN_OUT[r.kind][0](device_id, boot_id, r)
            if row is not None:
                rows.setdefault(r.kind, []).append(row)
    inserted = 0
    for kind, kind_rows in rows.items():
        inserted += max(ex.executemany(_FAN_OUT[kind][1], kind_rows).rowcount, 0)
    return inserted


# -- the store -----------------------------------------------------------------------------------------

class BaseStore:
    """Every query, written once. Thread-safe: one lock around one connection.

    Subclasses provide the driver hooks below and call :meth:`_open` once connected.
    """

    dialect: ClassVar[str] = ""
    _driver_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(self, where: str, migrations: Sequence[Migration] | None = None) -> None:
        self.where = where
        self.migrations = tuple(MIGRATIONS if migrations is None else migrations)
        _check_migrations(self.migrations)
        self.schema_version = 0
        self._lock = threading.Lock()
        self._closed = False

    # -- driver hooks -------------------------------------------------------------------------------

    def _executor(self) -> Any:
        """An object with ``execute(sql, args) -> cursor`` and ``executemany(sql, rows)``, taking ``?``."""
        raise NotImplementedError

    def _transaction(self, ex: Any) -> contextlib.AbstractContextManager[None]:
        """Begin a write transaction on ``ex``; commit when the block ends, roll back if it raises."""
        raise NotImplementedError

    def _table_exists(self, ex: Any, name: str) -> bool:
        raise NotImplementedError

    def _lock_schema(self, ex: Any) -> None:
        """Inside the migration transaction: keep other processes from migrating at the same time."""

    def _close_driver(self) -> None:
        raise NotImplementedError

    # -- plumbing -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _session(self, write: bool = False) -> Iterator[Any]:
        with self._lock:
            if self._closed:
                raise StoreError("the store is closed", where=self.where)
            try:
                ex = self._executor()
                if write:
                    with self._transaction(ex):
                        yield ex
                else:
                    yield ex
            except self._driver_errors as e:
                raise StoreError(f"{type(e).__name__}: {e}".strip(), where=self.where) from e

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._session() as ex:
            return list(ex.execute(sql, tuple(args)).fetchall())

    def _open(self) -> None:
        try:
            self.schema_version = self._migrate()
        except BaseException:
            self._closed = True
            with contextlib.suppress(Exception):
                self._close_driver()
            raise

    def _read_version(self, ex: Any) -> int:
        if not self._table_exists(ex, "meta"):
            return 0
        row = ex.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            return 0
        try:
            return int(row[0])
        except ValueError:
            raise StoreError(f"meta.schema_version is {row[0]!r}, expected an integer", where=self.where) from None

    def _migrate(self) -> int:
        latest = self.migrations[-1].version
        while True:
            with self._session(write=True) as ex:
                self._lock_schema(ex)
                current = self._read_version(ex)
                if current > latest:
                    raise SchemaVersionError(self.where, current, latest)
                step = next((m for m in self.migrations if m.version > current), None)
                if step is None:
                    return current
                try:
                    for stmt in step.statements(self.dialect):
                        ex.execute(stmt)
                    if step.backfill is not None:
                        step.backfill(ex)
                    ex.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                               "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(step.version),))
                except self._driver_errors as e:
                    raise StoreError(f"migration {step.version} ({step.name}) failed, schema stays at version "
                                     f"{current}: {type(e).__name__}: {e}", where=self.where) from e
            log.info("%s: schema migrated to version %d (%s)", self.where, step.version, step.name)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close_driver()

    def __enter__(self) -> BaseStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- ingest -------------------------------------------------------------------------------------

    def insert_batch(self, device_id: str, boot_id: str, records: Iterable[Any], received_ms: int, *,
                     fan_out: bool = True) -> tuple[int, int]:
        """Insert one batch in one transaction; (new, duplicate) counts. Returns after the commit.

        ``records`` have ``seq, kind, created_ms, payload`` (:class:`edge_runtime.core.protocol.Record`).
        With ``fan_out``, the new metric, drift and event records also get their rows in ``metrics``,
        ``drift`` and ``events``, in the same transaction; duplicates add nothing anywhere.
        """
        recs = list(records)
        rows = [(device_id, boot_id, r.seq, r.kind, r.created_ms, received_ms, _dumps(r.payload)) for r in recs]
        new: set[int] = set()
        with self._session(write=True) as ex:
            for i in range(0, len(rows), _INSERT_CHUNK):
                chunk = rows[i:i + _INSERT_CHUNK]
                args = [v for row in chunk for v in row]
                new.update(s for (s,) in ex.execute(_insert_records_sql(len(chunk)), args).fetchall())
            if fan_out and new:
                fresh: dict[int, Any] = {}
                for r in recs:  # a seq repeated within the batch: the first one is what was stored
                    if r.seq in new and r.seq not in fresh:
                        fresh[r.seq] = r
                _fan_out(ex, device_id, boot_id, fresh.values())
        return len(new), len(rows) - len(new)

    def insert_records(self, device_id: str, boot_id: str, records: Iterable[Any], received_ms: int
                       ) -> tuple[int, int]:
        """:meth:`insert_batch` with fan-out: what the ingest calls for every record batch."""
        return self.insert_batch(device_id, boot_id, records, received_ms)

    def _insert_kind(self, kind: str, device_id: str, boot_id: str, records: Iterable[Any]) -> int:
        with self._session(write=True) as ex:
            return _fan_out(ex, device_id, boot_id, records, (kind,))

    def insert_metrics(self, device_id: str, boot_id: str, records: Iterable[Any]) -> int:
        """Metric rows for the ``"m"`` records among ``records``; how many were new (rows are keyed
        like their records, so repeats are ignored). The ingest does this through :meth:`insert_batch`."""
        return self._insert_kind(p.METRIC, device_id, boot_id, records)

    def insert_drift(self, device_id: str, boot_id: str, records: Iterable[Any]) -> int:
        """Drift rows for the ``"d"`` records whose payload is a valid :class:`DriftSummary`."""
        return self._insert_kind(p.DRIFT, device_id, boot_id, records)

    def insert_events(self, device_id: str, boot_id: str, records: Iterable[Any]) -> int:
        """Event rows for the ``"e"`` records whose payload is a valid :class:`Event`."""
        return self._insert_kind(p.EVENT, device_id, boot_id, records)

    def upsert_status(self, device_id: str, online: bool, boot_id: str | None, seen_ms: int,
                      status: dict[str, Any]) -> None:
        with self._session(write=True) as ex:
            ex.execute(
                "INSERT INTO devices (device_id, online, boot_id, last_seen_ms, status) VALUES (?,?,?,?,?) "
                "ON CONFLICT (device_id) DO UPDATE SET online = excluded.online, boot_id = excluded.boot_id, "
                "last_seen_ms = excluded.last_seen_ms, status = excluded.status",
                (device_id, int(online), boot_id, seen_ms, _dumps(status)))

    def bump(self, counts: dict[str, int]) -> None:
        with self._session(write=True) as ex:
            ex.executemany("INSERT INTO counters (name, value) VALUES (?, ?) "
                           "ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value",
                           list(counts.items()))

    # -- workflow tables ------------------------------------------------------------------------------

    def upsert_alert(self, alert_id: str, *, rule: str, subject: str, state: str, severity: str,
                     payload: dict[str, Any], updated_ms: int) -> None:
        """Create the alert or replace its state, severity and payload (one row per alert id)."""
        with self._session(write=True) as ex:
            ex.execute(
                "INSERT INTO alerts (id, rule, subject, state, severity, payload, updated_ms) VALUES (?,?,?,?,?,?,?) "
                "ON CONFLICT (id) DO UPDATE SET rule = excluded.rule, subject = excluded.subject, "
                "state = excluded.state, severity = excluded.severity, payload = excluded.payload, "
                "updated_ms = excluded.updated_ms",
                (alert_id, rule, subject, state, severity, _dumps(payload), updated_ms))

    def alerts(self, state: str | Sequence[str] | None = None, *, limit: int = 1000) -> list[dict[str, Any]]:
        """Alerts in ``state`` (one or several; all when None), the most recently updated first."""
        q = "SELECT id, rule, subject, state, severity, payload, updated_ms FROM alerts"
        states = [state] if isinstance(state, str) else list(state or ())
        if states:
            q += f" WHERE state IN ({','.join('?' * len(states))})"
        rows = self._query(q + " ORDER BY updated_ms DESC, id LIMIT ?", [*states, limit])
        return [{"id": i, "rule": r, "subject": s, "state": st, "severity": sv, "payload": _loads(pl),
                 "updated_ms": u} for i, r, s, st, sv, pl, u in rows]

    def add_retrain_request(self, request_id: str, *, model: str, reason: str, payload: dict[str, Any],
                            created_ms: int, state: str = "requested") -> bool:
        """Record a request to retrain ``model``; False (and no change) if the id exists already."""
        with self._session(write=True) as ex:
            cur = ex.execute(
                "INSERT INTO retrain_requests (id, created_ms, model, reason, payload, state, outcome, updated_ms) "
                "VALUES (?,?,?,?,?,?,NULL,?) ON CONFLICT (id) DO NOTHING",
                (request_id, created_ms, model, reason, _dumps(payload), state, created_ms))
            return bool(cur.rowcount == 1)

    def update_retrain_request(self, request_id: str, *, state: str, updated_ms: int,
                               outcome: dict[str, Any] | None = None) -> None:
        """Move a request to ``state``, with what came of it; an unknown id is a :class:`StateError`."""
        with self._session(write=True) as ex:
            cur = ex.execute("UPDATE retrain_requests SET state = ?, outcome = ?, updated_ms = ? WHERE id = ?",
                             (state, None if outcome is None else _dumps(outcome), updated_ms, request_id))
            if cur.rowcount != 1:
                raise StateError(f"no retrain request {request_id!r}", where=self.where)

    def retrain_requests(self, state: str | None = None, model: str | None = None, *, limit: int = 1000
                         ) -> list[dict[str, Any]]:
        """Retrain requests, the newest first."""
        where, args = _filters(("state", state), ("model", model))
        rows = self._query("SELECT id, created_ms, model, reason, payload, state, outcome, updated_ms "
                           f"FROM retrain_requests{where} ORDER BY created_ms DESC, id LIMIT ?", [*args, limit])
        return [{"id": i, "created_ms": c, "model": m, "reason": r, "payload": _loads(pl), "state": st,
                 "outcome": _loads(o), "updated_ms": u} for i, c, m, r, pl, st, o, u in rows]

    def add_review(self, review_id: str, *, device_id: str, model: str, payload: dict[str, Any],
                   created_ms: int) -> bool:
        """Queue an item for a person to confirm or correct; False (and no change) if the id exists."""
        with self._session(write=True) as ex:
            cur = ex.execute("INSERT INTO review_queue (id, device_id, model, created_ms, payload, state) "
                             "VALUES (?,?,?,?,?,'pending') ON CONFLICT (id) DO NOTHING",
                             (review_id, device_id, model, created_ms, _dumps(payload)))
            return bool(cur.rowcount == 1)

    def reviews(self, state: str | None = "pending", *, model: str | None = None, device_id: str | None = None,
                limit: int = 100) -> list[dict[str, Any]]:
        """Review items in ``state`` (all when None), the oldest first: the queue's order."""
        if state is not None and state not in REVIEW_STATES:
            raise ValueError(f"review state is {state!r}, expected one of {REVIEW_STATES}")
        where, args = _filters(("state", state), ("model", model), ("device_id", device_id))
        rows = self._query("SELECT id, device_id, model, created_ms, payload, state, label, reviewed_by, reviewed_ms "
                           f"FROM review_queue{where} ORDER BY created_ms, id LIMIT ?", [*args, limit])
        return [{"id": i, "device_id": d, "model": m, "created_ms": c, "payload": _loads(pl), "state": st,
                 "label": _loads(lb), "reviewed_by": by, "reviewed_ms": t}
                for i, d, m, c, pl, st, lb, by, t in rows]

    def review(self, review_id: str) -> dict[str, Any] | None:
        """One review item by id, in any state."""
        rows = self._query("SELECT id, device_id, model, created_ms, payload, state, label, reviewed_by, reviewed_ms "
                           "FROM review_queue WHERE id = ?", [review_id])
        if not rows:
            return None
        i, d, m, c, pl, st, lb, by, t = rows[0]
        return {"id": i, "device_id": d, "model": m, "created_ms": c, "payload": _loads(pl), "state": st,
                "label": _loads(lb), "reviewed_by": by, "reviewed_ms": t}

    def resolve_review(self, review_id: str, *, state: str, label: Any, reviewed_by: str, reviewed_ms: int) -> None:
        """``pending -> confirmed | corrected``, the only transitions there are. ``label`` is the
        confirmed or corrected ground truth (any JSON value). Anything else is a :class:`StateError`."""
        if state not in ("confirmed", "corrected"):
            raise StateError(f"review {review_id!r}: cannot resolve to {state!r}, expected 'confirmed' or "
                             "'corrected'", where=self.where)
        with self._session(write=True) as ex:
            cur = ex.execute("UPDATE review_queue SET state = ?, label = ?, reviewed_by = ?, reviewed_ms = ? "
                             "WHERE id = ? AND state = 'pending'",
                             (state, _dumps(label), reviewed_by, reviewed_ms, review_id))
            if cur.rowcount == 1:
                return
            row = ex.execute("SELECT state, reviewed_by FROM review_queue WHERE id = ?", (review_id,)).fetchone()
        if row is None:
            raise StateError(f"no review {review_id!r}", where=self.where)
        raise StateError(f"review {review_id!r} is already {row[0]} (by {row[1]}), expected pending",
                         where=self.where)

    def upsert_rollout(self, rollout_id: str, *, state: str, payload: dict[str, Any], updated_ms: int) -> None:
        """Create the rollout or replace its state and payload (one row per rollout id)."""
        with self._session(write=True) as ex:
            ex.execute("INSERT INTO rollouts (id, state, payload, updated_ms) VALUES (?,?,?,?) "
                       "ON CONFLICT (id) DO UPDATE SET state = excluded.state, payload = excluded.payload, "
                       "updated_ms = excluded.updated_ms", (rollout_id, state, _dumps(payload), updated_ms))

    def rollouts(self, state: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Rollouts in ``state`` (one or several; all when None), the oldest first."""
        q = "SELECT id, state, payload, updated_ms FROM rollouts"
        states = [state] if isinstance(state, str) else list(state or ())
        if states:
            q += f" WHERE state IN ({','.join('?' * len(states))})"
        rows = self._query(q + " ORDER BY updated_ms, id", states)
        return [{"id": i, "state": st, "payload": _loads(pl), "updated_ms": u} for i, st, pl, u in rows]

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        """One rollout by id, or None."""
        rows = self._query("SELECT id, state, payload, updated_ms FROM rollouts WHERE id = ?", [rollout_id])
        if not rows:
            return None
        i, st, pl, u = rows[0]
        return {"id": i, "state": st, "payload": _loads(pl), "updated_ms": u}

    # -- reads (dashboard, export, tests) -----------------------------------------------------------

    def records(self, device_id: str | None = None) -> list[tuple[str, str, int, str, int, Any]]:
        q = "SELECT device_id, boot_id, seq, kind, created_ms, payload FROM records"
        args: tuple[Any, ...] = ()
        if device_id is not None:
            q += " WHERE device_id = ?"
            args = (device_id,)
        rows = self._query(q + " ORDER BY device_id, created_ms, boot_id, seq", args)
        return [(d, b, s, k, c, json.loads(pl)) for d, b, s, k, c, pl in rows]

    def count(self) -> int:
        return int(self._query("SELECT count(*) FROM records")[0][0])

    def devices(self) -> dict[str, dict[str, Any]]:
        rows = self._query("SELECT device_id, online, boot_id, last_seen_ms, status FROM devices")
        return {d: {"online": bool(o), "boot_id": b, "last_seen_ms": t, "status": json.loads(st)}
                for d, o, b, t, st in rows}

    def counters(self) -> dict[str, int]:
        return {n: int(v) for n, v in self._query("SELECT name, value FROM counters")}

    def metric_series(self, device_id: str, since_ms: int | None = None, *, pipeline: str | None = None,
                      limit: int = 1000) -> list[dict[str, Any]]:
        """A device's metric snapshots, oldest first: the latest ``limit`` at or after ``since_ms``."""
        where, args = _filters(("device_id", device_id), ("pipeline", pipeline), ("time_ms >=", since_ms))
        rows = self._query("SELECT time_ms, pipeline, boot_id, seq, payload FROM metrics"
                           f"{where} ORDER BY time_ms DESC, boot_id DESC, seq DESC LIMIT ?", [*args, limit])
        return [{"time_ms": t, "pipeline": pl, "boot_id": b, "seq": s, "payload": json.loads(pay)}
                for t, pl, b, s, pay in reversed(rows)]

    def drift_summaries(self, model: str | None = None, since_ms: int | None = None, *,
                        device_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Drift summaries whose window ends at or after ``since_ms``, oldest first (the latest ``limit``)."""
        where, args = _filters(("model", model), ("device_id", device_id), ("end_ms >=", since_ms))
        rows = self._query("SELECT device_id, boot_id, seq, model, model_version, start_ms, end_ms, summary FROM drift"
                           f"{where} ORDER BY end_ms DESC, device_id DESC, boot_id DESC, seq DESC LIMIT ?",
                           [*args, limit])
        return [{"device_id": d, "boot_id": b, "seq": s, "model": m, "model_version": v, "start_ms": t0,
                 "end_ms": t1, "summary": json.loads(sm)} for d, b, s, m, v, t0, t1, sm in reversed(rows)]

    def events(self, device_id: str | None = None, since_ms: int | None = None, *, severity: str | None = None,
               limit: int = 100) -> list[dict[str, Any]]:
        """Device events at or after ``since_ms``, the newest first."""
        where, args = _filters(("device_id", device_id), ("severity", severity), ("time_ms >=", since_ms))
        rows = self._query("SELECT device_id, boot_id, seq, time_ms, name, severity, ref, payload FROM events"
                           f"{where} ORDER BY time_ms DESC, device_id, boot_id, seq DESC LIMIT ?", [*args, limit])
        return [{"device_id": d, "boot_id": b, "seq": s, "time_ms": t, "name": n, "severity": sv, "ref": r,
                 "payload": json.loads(pl)} for d, b, s, t, n, sv, r, pl in rows]

    def export(self, since_ms: int, kinds: Iterable[str] | None = None, *, until_ms: int | None = None,
               decode: bool = True, page_rows: int = 1000) -> Iterator[dict[str, Any]]:
        """Records created at or after ``since_ms`` (and before ``until_ms``), of ``kinds`` (all when
        None), in (created_ms, device_id, boot_id, seq) order, as dicts with the record columns.

        Reads ``page_rows`` at a time by key, holding the lock only while one page is read: the ingest
        goes on between pages, and the caller may use the store while it iterates. With ``decode``
        False, ``payload`` is the stored JSON text.
        """
        if page_rows < 1:
            raise ValueError(f"page_rows is {page_rows}, expected at least 1")
        if kinds is None:
            yield from self._export_pages(since_ms, until_ms, None, decode, page_rows)
            return
        # One keyset stream per kind (each an index range scan), merged: a filter on several kinds in
        # one query would have to sort what is left of the range for every page.
        streams = [self._export_pages(since_ms, until_ms, k, decode, page_rows) for k in sorted(set(kinds))]
        yield from heapq.merge(*streams, key=_export_key)

    def _export_pages(self, since_ms: int, until_ms: int | None, kind: str | None, decode: bool, page_rows: int
                      ) -> Iterator[dict[str, Any]]:
        base = f"SELECT {_RECORD_COLUMNS} FROM records WHERE created_ms >= ?"
        args: list[Any] = [since_ms]
        if until_ms is not None:
            base += " AND created_ms < ?"
            args.append(until_ms)
        if kind is not None:
            base += " AND kind = ?"
            args.append(kind)
        after: list[Any] = []
        while True:
            q = base + (" AND (created_ms, device_id, boot_id, seq) > (?, ?, ?, ?)" if after else "")
            rows = self._query(q + " ORDER BY created_ms, device_id, boot_id, seq LIMIT ?", [*args, *after, page_rows])
            for d, b, s, k, c, r, pl in rows:
                yield {"device_id": d, "boot_id": b, "seq": s, "kind": k, "created_ms": c, "received_ms": r,
                       "payload": json.loads(pl) if decode else pl}
            if len(rows) < page_rows:
                return
            d, b, s, _k, c, _r, _pl = rows[-1]
            after = [c, d, b, s]

    # -- retention ----------------------------------------------------------------------------------

    def _delete_chunks(self, table: str, where: str, args: Sequence[Any], order: str, chunk_rows: int,
                       limit: int | None = None) -> int:
        """Delete the rows of ``table`` matching ``where`` (oldest first by ``order``), at most
        ``chunk_rows`` per transaction and ``limit`` in all; how many went."""
        done = 0
        while limit is None or done < limit:
            n = chunk_rows if limit is None else min(chunk_rows, limit - done)
            with self._session(write=True) as ex:
                cur = ex.execute(f"DELETE FROM {table} WHERE (device_id, boot_id, seq) IN (SELECT device_id, "
                                 f"boot_id, seq FROM {table} WHERE {where} ORDER BY {order} LIMIT ?)", (*args, n))
                deleted = max(cur.rowcount, 0)
            done += deleted
            if deleted < n:
                break
            time.sleep(0)  # let a waiting ingest thread take the lock between chunks
        return done

    def prune(self, now_ms: int, predictions_max_age_s: float | None, keep_max_rows: int | None = None, *,
              history_max_age_s: float | None = None, chunk_rows: int = PRUNE_CHUNK) -> int:
        """Retention; how many rows were deleted in all. Ages are by the device's ``created_ms``.

        - prediction records (kind ``"p"``) older than ``predictions_max_age_s``;
        - then the oldest prediction records beyond ``keep_max_rows`` of them;
        - with ``history_max_age_s`` (meant to be longer): metrics, drift summaries and events older
          than that, with their records (every kind but ``"p"``).

        At most ``chunk_rows`` rows go per transaction, so the ingest waits for one chunk at most.
        """
        for name, v in (("predictions_max_age_s", predictions_max_age_s), ("history_max_age_s", history_max_age_s),
                        ("keep_max_rows", keep_max_rows)):
            if v is not None and v < 0:
                raise ValueError(f"{name} is {v}, expected >= 0")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows is {chunk_rows}, expected at least 1")
        order = "created_ms, device_id, boot_id, seq"
        deleted = 0
        if predictions_max_age_s is not None:
            cutoff = now_ms - int(predictions_max_age_s * 1000)
            deleted += self._delete_chunks("records", "kind = ? AND created_ms < ?", (p.PREDICTION, cutoff), order,
                                           chunk_rows)
        if keep_max_rows is not None:
            n = int(self._query("SELECT count(*) FROM records WHERE kind = ?", (p.PREDICTION,))[0][0])
            if n > keep_max_rows:
                deleted += self._delete_chunks("records", "kind = ?", (p.PREDICTION,), order, chunk_rows,
                                               n - keep_max_rows)
        if history_max_age_s is not None:
            cutoff = now_ms - int(history_max_age_s * 1000)
            deleted += self._delete_chunks("metrics", "time_ms < ?", (cutoff,), "time_ms", chunk_rows)
            deleted += self._delete_chunks("drift", "end_ms < ?", (cutoff,), "end_ms", chunk_rows)
            deleted += self._delete_chunks("events", "time_ms < ?", (cutoff,), "time_ms", chunk_rows)
            deleted += self._delete_chunks("records", "kind <> ? AND created_ms < ?", (p.PREDICTION, cutoff), order,
                                           chunk_rows)
        return deleted


def _export_key(row: dict[str, Any]) -> tuple[int, str, str, int]:
    return row["created_ms"], row["device_id"], row["boot_id"], row["seq"]


def _filters(*conds: tuple[str, Any]) -> tuple[str, list[Any]]:
    """`` WHERE a = ? AND b >= ?`` for the conditions whose value is not None. A name ending in an
    operator (``"time_ms >="``) uses it; otherwise ``=``."""
    parts, args = [], []
    for name, value in conds:
        if value is not None:
            parts.append(f"{name} ?" if name.endswith(("=", "<", ">")) else f"{name} = ?")
            args.append(value)
    return (" WHERE " + " AND ".join(parts) if parts else ""), args


class Store(BaseStore):
    """The SQLite store: one file, WAL, ``synchronous=FULL``; the ingest worker is its only writer.

    ``create=False`` refuses a path where no store exists instead of creating an empty one.
    """

    dialect: ClassVar[str] = "sqlite"
    _driver_errors: ClassVar[tuple[type[BaseException], ...]] = (sqlite3.Error,)

    def __init__(self, path: str | Path, migrations: Sequence[Migration] | None = None, *,
                 create: bool = True) -> None:
        super().__init__(str(path), migrations)
        self.path = str(path)
        if sqlite3.sqlite_version_info < (3, 35):
            self._closed = True
            raise StoreError(f"SQLite {sqlite3.sqlite_version} is too old: the store needs 3.35 or newer "
                             "(INSERT ... RETURNING)", where=self.path)
        try:
            if create:
                self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            else:
                uri = Path(self.path).resolve().as_uri() + "?mode=rw"
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as e:
            self._closed = True
            what = "no SQLite store here" if not create and not Path(self.path).exists() else str(e)
            raise StoreError(what, where=self.path) from e
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: an acknowledged record must survive a power cut here, or the device would delete the
            # only other copy.
            self._db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as e:
            self._closed = True
            self._db.close()
            raise StoreError(f"not a usable SQLite database: {e}", where=self.path) from e
        self._open()

    def _executor(self) -> Any:
        return self._db

    @contextlib.contextmanager
    def _transaction(self, ex: Any) -> Iterator[None]:
        ex.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if ex.in_transaction:  # SQLite rolls back by itself after some errors (disk full, I/O)
                ex.execute("ROLLBACK")
            raise
        ex.execute("COMMIT")

    def _table_exists(self, ex: Any, name: str) -> bool:
        return ex.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() \
            is not None

    def _close_driver(self) -> None:
        self._db.close()


SqliteStore = Store


def open_store(where: str | Path, migrations: Sequence[Migration] | None = None, *, create: bool = True
               ) -> BaseStore:
    """The store at ``where``: a file path or ``sqlite:///relative/path`` (``sqlite:////abs/path``)
    for SQLite, ``postgresql://...`` (or ``postgres://``) for PostgreSQL (the ``postgres`` extra).

    ``create=False``: a SQLite path must name an existing store (PostgreSQL databases are never
    created here; their tables are, by the migrations).
    """
    text = str(where)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return Store(text, migrations, create=create)
    scheme = scheme.lower()
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise StoreError(f"a SQLite URL is sqlite:///PATH, got {text!r}")
        return Store(rest[1:], migrations, create=create)
    if scheme in ("postgresql", "postgres"):
        try:
            from cloud_sync.store_postgres import PostgresStore
        except ImportError as e:
            from edge_runtime.errors import MissingExtraError

            raise MissingExtraError("a PostgreSQL store", "postgres", "psycopg") from e
        return PostgresStore(text, migrations)
    raise StoreError(f"unknown store URL scheme {scheme!r}: expected a path, sqlite:///PATH or postgresql://...")
