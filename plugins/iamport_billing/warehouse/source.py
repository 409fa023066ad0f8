"""The due query: which subscriptions to charge, read by keyset from any SQL connection.

By default it runs on the ledger's own connection. It may instead read a separate, read-only
warehouse (any common.sql connection: BigQuery, Snowflake, another database): then keys are
compared in the source's own type and the ledger is where results are read from.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from datetime import date
from typing import Any

from iamport_billing.warehouse.dialects import DIALECTS, SourceDialect
from iamport_billing.warehouse.session import SqlSession


class DueSource(SqlSession):
    """Pages of due rows in subscription_id order."""

    read_only = True

    def __init__(self, hook: Any):
        name = str(getattr(hook, "dialect_name", "") or "").lower()
        dialect = DIALECTS[name]() if name in DIALECTS else SourceDialect(hook)
        super().__init__(hook, dialect)

    @classmethod
    def sharing(cls, session: SqlSession) -> DueSource:
        """A source on another session's connection (the ledger's, by default)."""
        source = cls.__new__(cls)
        SqlSession.__init__(source, session.hook, session.dialect)
        source._conn = session.conn
        source.close = lambda: None  # type: ignore[method-assign]  # the owner closes it
        return source

    def iter_due(
        self,
        due_query: str,
        billing_date: date,
        *,
        after: str | None = None,
        until: str | None = None,
        page_size: int = 1000,
    ) -> Iterator[dict[str, Any]]:
        """Due rows in subscription_id order, page by page (keyset), never all at once.

        Rows without a subscription_id come first (so they can be rejected) and only on the
        first page (``after is None``). Duplicated subscription_ids come out adjacent.
        """
        inner, n = due_sql(due_query)
        base_params: list[Any] = [billing_date.isoformat()] * n
        if after is None:
            yield from self._fetch_dicts(
                f"SELECT * FROM ({inner}) due WHERE due.subscription_id IS NULL", base_params
            )
        key = self._keyset_column(inner, base_params)
        cursor_key = after
        while True:
            where = ["due.subscription_id IS NOT NULL"]
            params = list(base_params)
            if cursor_key is not None:
                where.append(f"{key} > %s")
                params.append(cursor_key)
            if until is not None:
                where.append(f"{key} <= %s")
                params.append(until)
            # Fetch whole subscription_id groups: LIMIT on distinct keys, so duplicates of the
            # page's last key are not split across pages.
            keys_sql = (
                f"SELECT DISTINCT {key} AS k FROM ({inner}) due "
                f"WHERE {' AND '.join(where)} ORDER BY k LIMIT {int(page_size)}"
            )
            keys = [r[0] for r in self.query(keys_sql, params)]
            if not keys:
                return
            last_page_key = keys[-1]
            page_where = [*where, f"{key} <= %s"]
            yield from self._fetch_dicts(
                f"SELECT * FROM ({inner}) due WHERE {' AND '.join(page_where)} ORDER BY {key}",
                [*params, last_page_key],
            )
            if len(keys) < page_size:
                return
            cursor_key = last_page_key

    def _keyset_column(self, inner: str, params: Sequence[Any]) -> str:
        """Keys compare as text. SQLite uses no index through a CAST, which made every page a
        full scan and sort (quadratic in N): when every key is already text, use the column."""
        if self.dialect.name != "sqlite":
            return self.dialect.as_text("due.subscription_id")
        other_types = self.query(
            f"SELECT 1 FROM ({inner}) due WHERE typeof(due.subscription_id) "
            "NOT IN ('text', 'null') LIMIT 1",
            params,
        )
        return "CAST(due.subscription_id AS TEXT)" if other_types else "due.subscription_id"


def due_sql(due_query: str) -> tuple[str, int]:
    """The user's due query with ``:billing_date`` bound as a parameter."""
    query = due_query.strip().rstrip(";")
    n = len(re.findall(r":billing_date\b", query))
    return re.sub(r":billing_date\b", "%s", query), n
