"""The cloud's store: records deduplicated on their key, and the last status of every device.

SQLite by default (WAL, one writer). ``INSERT OR IGNORE`` on the primary key ``(device_id, boot_id,
seq)`` turns at-least-once delivery into exactly-once storage: a resent batch changes nothing. The
ack is sent only after ``commit`` returns, so an acknowledged record is on disk here.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    device_id TEXT NOT NULL, boot_id TEXT NOT NULL, seq INTEGER NOT NULL,
    kind TEXT NOT NULL, created_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (device_id, boot_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_by_time ON records (created_ms);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, online INTEGER NOT NULL, boot_id TEXT, last_seen_ms INTEGER NOT NULL,
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Store:
    """Thread-safe (one lock around one connection); the ingest worker is its only writer."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: an acknowledged record must survive a power cut here, or the device would delete the
        # only other copy.
        self._db.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise RuntimeError(f"{path}: store schema {row[0]} is newer than this cloud-sync ({SCHEMA_VERSION})")

    def insert_records(self, device_id: str, boot_id: str, records: Iterable[Any], received_ms: int) -> tuple[int, int]:
        """Insert one batch in one transaction; (new, duplicate) counts. Returns after the commit."""
        rows = [(device_id, boot_id, r.seq, r.kind, r.created_ms, received_ms,
                 json.dumps(r.payload, separators=(",", ":"))) for r in records]
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR IGNORE INTO records VALUES (?,?,?,?,?,?,?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            new = self._db.total_changes - before
        return new, len(rows) - new

    def upsert_status(self, device_id: str, online: bool, boot_id: str | None, seen_ms: int,
                      status: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO devices VALUES (?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET online=excluded.online, "
                "boot_id=excluded.boot_id, last_seen_ms=excluded.last_seen_ms, status=excluded.status",
                (device_id, int(online), boot_id, seen_ms, json.dumps(status, separators=(",", ":"))))

    def bump(self, counts: dict[str, int]) -> None:
        with self._lock:
            self._db.executemany("INSERT INTO counters VALUES (?, ?) "
                                 "ON CONFLICT(name) DO UPDATE SET value=value+excluded.value", list(counts.items()))

    # -- reads (dashboard, tests) ---------------------------------------------------------------

    def records(self, device_id: str | None = None) -> list[tuple[str, str, int, str, int, Any]]:
        q = "SELECT device_id, boot_id, seq, kind, created_ms, payload FROM records"
        args: tuple[Any, ...] = ()
        if device_id is not None:
            q += " WHERE device_id=?"
            args = (device_id,)
        with self._lock:
            rows = self._db.execute(q + " ORDER BY device_id, created_ms, boot_id, seq", args).fetchall()
        return [(d, b, s, k, c, json.loads(p)) for d, b, s, k, c, p in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM records").fetchone()[0])

    def devices(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT device_id, online, boot_id, last_seen_ms, status FROM devices").fetchall()
        return {d: {"online": bool(o), "boot_id": b, "last_seen_ms": t, "status": json.loads(st)}
                for d, o, b, t, st in rows}

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT name, value FROM counters").fetchall())

    def close(self) -> None:
        with self._lock:
            self._db.close()
