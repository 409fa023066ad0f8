"""One database connection of a common.sql hook, and the statements run on it.

Shared by the ledger and the due-query source: statements are written with ``%s`` and the
dialect adapts them; every statement commits (or rolls back) on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import closing
from typing import Any, Self

from iamport_billing.warehouse.dialects import Dialect


class SqlSession:
    """A lazily opened connection kept for the object's life (reconnecting per statement
    would dominate a batch task's CPU)."""

    read_only = False  # a session that must not change the database it reads

    def __init__(self, hook: Any, dialect: Dialect):
        self.hook = hook
        self.dialect = dialect
        self._conn: Any = None

    @classmethod
    def from_conn_id(cls, conn_id: str) -> Self:
        from airflow.sdk import BaseHook

        return cls(BaseHook.get_connection(conn_id).get_hook())

    @property
    def conn(self) -> Any:
        if self._conn is None:
            conn = self.hook.get_conn()
            self.dialect.prepare(conn, read_only=self.read_only)
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, sql: str, params: Sequence[Any], *, fetch: bool, many: bool = False) -> Any:
        try:
            with closing(self.conn.cursor()) as cur:
                if many:
                    cur.executemany(self.dialect.sql(sql), [tuple(r) for r in params])
                else:
                    cur.execute(self.dialect.sql(sql), tuple(params))
                result = (
                    (cur.fetchall(), [d[0].lower() for d in cur.description])
                    if fetch
                    else cur.rowcount
                )
            self.conn.commit()
        except Exception:
            self.conn.rollback()
            raise
        return result

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._run(sql, params, fetch=False)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._run(sql, rows, fetch=False, many=True)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return [tuple(r) for r in self._run(sql, params, fetch=True)[0]]

    def _fetch_dicts(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        rows, names = self._run(sql, params, fetch=True)
        return [dict(zip(names, r, strict=True)) for r in rows]

    def _column_names(self, sql: str) -> list[str]:
        return self._run(sql, (), fetch=True)[1]
