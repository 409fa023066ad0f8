"""One object per supported database: the only place SQL differs between them.

The dialect is chosen from the connection's hook (common.sql's ``dialect_name``), never from a
guess; an unsupported database fails at start with the list of supported ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any


class UnsupportedDatabase(ValueError):
    """The ledger connection is not SQLite, PostgreSQL or MySQL/MariaDB."""


class Dialect:
    """PostgreSQL-flavoured defaults; subclasses override what their database does differently."""

    name = "base"
    date_type = "DATE"
    timestamp_type = "TIMESTAMPTZ"

    def sql(self, statement: str) -> str:
        """Statements are written with ``%s`` placeholders."""
        return statement

    def key_type(self, length: int) -> str:
        """A text key compared byte for byte ('AB1' and 'ab1' are two subscriptions)."""
        return f"VARCHAR({length})"

    def timestamp(self, moment: datetime) -> Any:
        """A UTC moment as this driver stores it."""
        return moment

    def as_text(self, column: str) -> str:
        return f"CAST({column} AS TEXT)"

    def as_date(self, column: str) -> str:
        return f"CAST({column} AS DATE)"

    def insert_ignore(self, table: str, columns: Sequence[str], key: Sequence[str]) -> str:
        """Insert a row unless its key exists; never overwrites, never hides other errors."""
        marks = ", ".join(["%s"] * len(columns))
        return (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) "
            f"ON CONFLICT ({', '.join(key)}) DO NOTHING"
        )

    def upsert(
        self, table: str, columns: Sequence[str], key: Sequence[str], update: Sequence[str]
    ) -> str:
        marks = ", ".join(["%s"] * len(columns))
        sets = ", ".join(f"{c} = excluded.{c}" for c in update)
        return (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}"
        )

    def create_index(self, name: str, table: str, columns: str) -> list[str]:
        return [f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({columns})"]

    def prepare(self, conn: Any, *, read_only: bool = False) -> None:
        """Session settings applied once per connection (``read_only``: change no file)."""

    def is_duplicate_index(self, error: Exception) -> bool:
        return False


class SqliteDialect(Dialect):
    name = "sqlite"
    date_type = "TEXT"
    timestamp_type = "TEXT"

    def sql(self, statement: str) -> str:
        return statement.replace("%s", "?")

    def timestamp(self, moment: datetime) -> Any:
        return moment.astimezone(UTC).isoformat(timespec="milliseconds")

    def as_text(self, column: str) -> str:
        # SQLite uses no index through a CAST; its keys are compared as stored.
        return column

    def as_date(self, column: str) -> str:
        return column

    def prepare(self, conn: Any, *, read_only: bool = False) -> None:
        conn.execute("PRAGMA busy_timeout = 60000")
        if not read_only:  # WAL is a property of the file: a source is not ours to change
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")


class PostgresDialect(Dialect):
    name = "postgresql"


class MysqlDialect(Dialect):
    """MySQL 8 and MariaDB 10.6+: no ON CONFLICT, no TEXT keys, naive DATETIME in UTC."""

    name = "mysql"
    timestamp_type = "DATETIME(3)"

    def timestamp(self, moment: datetime) -> Any:
        return moment.astimezone(UTC).replace(tzinfo=None)

    def key_type(self, length: int) -> str:
        # MySQL's default collations fold case: 'AB1' would be the same key as 'ab1'.
        return f"VARCHAR({length}) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"

    def as_text(self, column: str) -> str:
        return f"CAST({column} AS CHAR) COLLATE utf8mb4_bin"

    def insert_ignore(self, table: str, columns: Sequence[str], key: Sequence[str]) -> str:
        # Not INSERT IGNORE: that would also turn truncation and bad values into warnings.
        marks = ", ".join(["%s"] * len(columns))
        return (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) "
            f"ON DUPLICATE KEY UPDATE {key[0]} = {key[0]}"
        )

    def upsert(
        self, table: str, columns: Sequence[str], key: Sequence[str], update: Sequence[str]
    ) -> str:
        marks = ", ".join(["%s"] * len(columns))
        sets = ", ".join(f"{c} = VALUES({c})" for c in update)
        return (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) "
            f"ON DUPLICATE KEY UPDATE {sets}"
        )

    def create_index(self, name: str, table: str, columns: str) -> list[str]:
        # MySQL 8 has no CREATE INDEX IF NOT EXISTS: a duplicate name is ignored by the caller.
        return [f"CREATE INDEX {name} ON {table} ({columns})"]

    def prepare(self, conn: Any, *, read_only: bool = False) -> None:
        cur = conn.cursor()
        try:
            # Strict values (no silent truncation), UTC, and reads that see other commits.
            cur.execute(
                "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ZERO_DATE,NO_ENGINE_SUBSTITUTION'"
            )
            cur.execute("SET SESSION time_zone = '+00:00'")
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        finally:
            cur.close()
        conn.commit()

    def is_duplicate_index(self, error: Exception) -> bool:
        return getattr(error, "errno", None) == 1061 or "Duplicate key name" in str(error)


DIALECTS: dict[str, type[Dialect]] = {
    "sqlite": SqliteDialect,
    "postgresql": PostgresDialect,
    "postgres": PostgresDialect,
    "mysql": MysqlDialect,
    "mariadb": MysqlDialect,
}


def dialect_for(hook: Any) -> Dialect:
    """The dialect of a common.sql hook's database; refuses what the ledger cannot run on."""
    name = str(getattr(hook, "dialect_name", "") or "").lower()
    if name not in DIALECTS:
        conn_id = getattr(hook, "get_conn_id", lambda: "?")()
        raise UnsupportedDatabase(
            f"the ledger connection {conn_id!r} is {name or 'an unknown database'!r}; "
            "the ledger runs on sqlite, postgresql or mysql/mariadb (a read-only warehouse "
            "can still be the due query's source connection)"
        )
    return DIALECTS[name]()


class SourceDialect(Dialect):
    """A read-only due-query source on a database the ledger does not run on: keys are
    compared as the source stores them, with the hook's own placeholder."""

    name = "source"

    def __init__(self, hook: Any):
        self.placeholder = getattr(hook, "placeholder", "%s") or "%s"

    def sql(self, statement: str) -> str:
        return statement.replace("%s", self.placeholder)

    def as_text(self, column: str) -> str:
        return column
