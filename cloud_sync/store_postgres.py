"""The PostgreSQL store: :class:`cloud_sync.store.BaseStore` over one psycopg 3 connection.

For fleets that outgrow one box: several ingest workers can write one database (``ON CONFLICT DO
NOTHING`` makes their races on a resent batch harmless), and migrations take an advisory lock so
that workers starting together migrate once. The queries are the base class's; this module only
connects (again, after the server went away), runs transactions, turns ``?`` placeholders into
psycopg's ``%s`` and translates psycopg's errors. psycopg is imported here only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any, ClassVar
from urllib.parse import urlsplit

import psycopg

from cloud_sync.store import BaseStore, Migration

__all__ = ["PostgresStore"]

# pg_advisory_xact_lock key held while migrating ("cloud_sync" in ASCII, as an int).
_MIGRATION_LOCK = 0x636C6F75645F73


@lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    # psycopg reads % as its own placeholder marker when parameters are given.
    return sql.replace("%", "%%").replace("?", "%s")


class _Executor:
    """``execute``/``executemany`` with ``?`` placeholders, as sqlite3's connection has them."""

    __slots__ = ("conn",)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        args = tuple(args)
        return self.conn.execute(_pg_sql(sql), args) if args else self.conn.execute(sql)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> psycopg.Cursor[Any]:
        cur = self.conn.cursor()
        cur.executemany(_pg_sql(sql), rows)
        return cur  # rowcount: the rows changed by all of them (closing would reset it)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


class PostgresStore(BaseStore):
    """``postgresql://user:password@host:port/dbname`` (anything libpq accepts). The database must
    exist; the tables are created and migrated here."""

    dialect: ClassVar[str] = "postgres"
    _driver_errors: ClassVar[tuple[type[BaseException], ...]] = (psycopg.Error,)

    def __init__(self, url: str, migrations: Sequence[Migration] | None = None, *,
                 connect_timeout: float = 10.0) -> None:
        super().__init__(redact(url), migrations)
        self.url = url
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._open()

    def _executor(self) -> _Executor:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
            # autocommit: a read is one statement; writes open an explicit transaction.
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout)))
        return _Executor(self._conn)

    def _transaction(self, ex: _Executor) -> contextlib.AbstractContextManager[Any]:
        return ex.conn.transaction()

    def _table_exists(self, ex: _Executor, name: str) -> bool:
        return ex.execute("SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() "
                          "AND table_name = ?", (name,)).fetchone() is not None

    def _lock_schema(self, ex: _Executor) -> None:
        ex.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))

    def _close_driver(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
