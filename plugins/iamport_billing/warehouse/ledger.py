"""The warehouse side: schema, the due query read by keyset, the attempt log and write-back.

All SQL is parameterized and runs through the connection of an Airflow common.sql
``DbApiHook`` (SqliteHook or PostgresHook), so one code path serves both databases.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from iamport_billing.policy import (
    CANCELLED,
    FAILED,
    PAID,
    PENDING,
    REJECTED,
    UNSETTLED,
    RejectedRow,
    rejected_key,
    to_date,
)

SUBSCRIPTIONS = "billing_subscriptions"
ATTEMPTS = "billing_charge_attempts"
RUNS = "billing_runs"
IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")

DEFAULT_DUE_QUERY = f"""
SELECT subscription_id, customer_uid, amount, currency, name,
       next_billing_date AS billing_date, buyer_name, buyer_email, buyer_tel
FROM {SUBSCRIPTIONS}
WHERE status = 'active' AND next_billing_date <= :billing_date
"""

ATTEMPT_COLUMNS = (
    "merchant_uid", "subscription_id", "billing_date", "attempt_no", "customer_uid", "amount",
    "currency", "status", "imp_uid", "fail_reason", "error_code", "error_message",
    "decline_kind", "next_retry_date", "requested_at", "completed_at", "dag_id", "run_id",
    "task_id", "try_number", "claim_token", "cancel_amount", "receipt_url", "latency_ms",
    "updated_at",
)  # fmt: skip


def _ddl(dialect: str) -> list[str]:
    date_t = "DATE" if dialect == "postgres" else "TEXT"
    ts_t = "TIMESTAMPTZ" if dialect == "postgres" else "TEXT"
    return [
        f"""CREATE TABLE IF NOT EXISTS {SUBSCRIPTIONS} (
            subscription_id TEXT PRIMARY KEY,
            customer_uid TEXT,
            amount BIGINT,
            currency TEXT DEFAULT 'KRW',
            name TEXT,
            status TEXT NOT NULL DEFAULT 'active',
            next_billing_date {date_t},
            billing_anchor_day INTEGER,
            buyer_name TEXT,
            buyer_email TEXT,
            buyer_tel TEXT,
            updated_at {ts_t}
        )""",
        f"""CREATE INDEX IF NOT EXISTS ix_{SUBSCRIPTIONS}_due
            ON {SUBSCRIPTIONS} (status, next_billing_date)""",
        # The keyset pages of the default due query walk this in subscription_id order.
        f"""CREATE INDEX IF NOT EXISTS ix_{SUBSCRIPTIONS}_keyset
            ON {SUBSCRIPTIONS} (status, subscription_id, next_billing_date)""",
        f"""CREATE TABLE IF NOT EXISTS {ATTEMPTS} (
            merchant_uid TEXT PRIMARY KEY,
            subscription_id TEXT,
            billing_date {date_t} NOT NULL,
            attempt_no INTEGER NOT NULL,
            customer_uid TEXT,
            amount BIGINT,
            currency TEXT,
            status TEXT NOT NULL,
            imp_uid TEXT,
            fail_reason TEXT,
            error_code TEXT,
            error_message TEXT,
            decline_kind TEXT,
            next_retry_date {date_t},
            requested_at {ts_t},
            completed_at {ts_t},
            dag_id TEXT,
            run_id TEXT,
            task_id TEXT,
            try_number INTEGER,
            claim_token TEXT,
            cancel_amount BIGINT DEFAULT 0,
            receipt_url TEXT,
            latency_ms INTEGER,
            updated_at {ts_t}
        )""",
        f"CREATE INDEX IF NOT EXISTS ix_{ATTEMPTS}_sub "
        f"ON {ATTEMPTS} (subscription_id, billing_date)",
        f"CREATE INDEX IF NOT EXISTS ix_{ATTEMPTS}_status ON {ATTEMPTS} (status)",
        f"CREATE INDEX IF NOT EXISTS ix_{ATTEMPTS}_run ON {ATTEMPTS} (run_id)",
        f"CREATE INDEX IF NOT EXISTS ix_{ATTEMPTS}_date ON {ATTEMPTS} (billing_date)",
        f"""CREATE TABLE IF NOT EXISTS {RUNS} (
            dag_id TEXT NOT NULL,
            run_id TEXT NOT NULL,
            billing_date {date_t} NOT NULL,
            planned_count INTEGER NOT NULL,
            planned_total BIGINT NOT NULL,
            rejected_count INTEGER NOT NULL,
            dry_run INTEGER NOT NULL,
            guardrail TEXT,
            created_at {ts_t},
            PRIMARY KEY (dag_id, run_id)
        )""",
    ]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def to_datetime(value: Any) -> datetime | None:
    """Timestamps come back as datetimes (PostgreSQL) or ISO text (SQLite): one type out."""
    if value is None or value == "":
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _iso(value: date | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class Attempt:
    """One ledger row, as read back."""

    merchant_uid: str
    subscription_id: str | None
    billing_date: date
    attempt_no: int
    customer_uid: str | None
    amount: int | None
    currency: str | None
    status: str
    imp_uid: str | None
    fail_reason: str | None
    error_code: str | None
    error_message: str | None
    decline_kind: str | None
    next_retry_date: date | None
    requested_at: datetime | None
    completed_at: datetime | None
    dag_id: str | None
    run_id: str | None
    task_id: str | None
    try_number: int | None
    claim_token: str | None
    cancel_amount: int | None
    receipt_url: str | None
    latency_ms: int | None
    updated_at: datetime | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Attempt:
        values = dict(zip(ATTEMPT_COLUMNS, row, strict=True))
        values["billing_date"] = to_date(values["billing_date"])
        values["next_retry_date"] = to_date(values["next_retry_date"])
        for key in ("requested_at", "completed_at", "updated_at"):
            values[key] = to_datetime(values[key])
        return cls(**values)


@dataclass(frozen=True)
class Outcome:
    """What one charge ended as; written over the attempt's pending row."""

    merchant_uid: str
    status: str
    imp_uid: str | None = None
    fail_reason: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    decline_kind: str | None = None
    next_retry_date: date | None = None
    receipt_url: str | None = None
    latency_ms: int | None = None
    amount: int | None = None


class Ledger:
    """The ledger and warehouse tables behind one DbApiHook connection.

    One DB connection is kept for the object's life: a batch task writes hundreds of rows a
    second, and reconnecting per statement would dominate its CPU.
    """

    def __init__(self, hook: Any):
        self.hook = hook
        conn_type = getattr(getattr(hook, "connection", None), "conn_type", None) or ""
        name = type(hook).__name__.lower()
        self.dialect = "postgres" if "postgres" in (conn_type + name) else "sqlite"
        self._conn: Any = None

    @classmethod
    def from_conn_id(cls, conn_id: str) -> Ledger:
        from airflow.sdk import BaseHook

        return cls(BaseHook.get_connection(conn_id).get_hook())

    # -- connection -----------------------------------------------------------------------------

    @property
    def conn(self) -> Any:
        if self._conn is None:
            conn = self.hook.get_conn()
            if self.dialect == "sqlite":
                conn.execute("PRAGMA busy_timeout = 60000")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sub_key(self, alias: str) -> str:
        """A subscriptions table's key as text, comparable with the ledger's subscription_id
        (PostgreSQL refuses integer = text; SQLite keeps its index without a cast)."""
        col = f"{alias}.subscription_id"
        return f"CAST({col} AS TEXT)" if self.dialect == "postgres" else col

    def sub_date(self, alias: str) -> str:
        """A subscriptions table's next_billing_date as a date (custom tables may hold text)."""
        col = f"{alias}.next_billing_date"
        return f"CAST({col} AS DATE)" if self.dialect == "postgres" else col

    def _sql(self, sql: str) -> str:
        return sql.replace("%s", "?") if self.dialect == "sqlite" else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with closing(self.conn.cursor()) as cur:
            cur.execute(self._sql(sql), tuple(params))
            count = cur.rowcount
        self.conn.commit()
        return count

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        with closing(self.conn.cursor()) as cur:
            cur.executemany(self._sql(sql), [tuple(r) for r in rows])
        self.conn.commit()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with closing(self.conn.cursor()) as cur:
            cur.execute(self._sql(sql), tuple(params))
            rows = cur.fetchall()
        self.conn.commit()
        return rows

    # -- schema ---------------------------------------------------------------------------------

    def init_schema(self) -> None:
        """Create the tables and indexes if missing (idempotent)."""
        for statement in _ddl(self.dialect):
            self.execute(statement)

    # -- due query ------------------------------------------------------------------------------

    def due_sql(self, due_query: str) -> tuple[str, int]:
        """The user's due query with ``:billing_date`` bound as a parameter, ordered by key."""
        query = due_query.strip().rstrip(";")
        n = len(re.findall(r":billing_date\b", query))
        return re.sub(r":billing_date\b", "%s", query), n

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
        inner, n = self.due_sql(due_query)
        base_params: list[Any] = [billing_date.isoformat()] * n
        if after is None:
            yield from self._fetch_dicts(
                f"SELECT * FROM ({inner}) due WHERE due.subscription_id IS NULL", base_params
            )
        key = self._keyset_column(inner, base_params)
        cursor_key = after
        last_page_key: str | None = None
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
            rows = self._fetch_dicts(
                f"SELECT * FROM ({inner}) due WHERE {' AND '.join(page_where)} ORDER BY {key}",
                [*params, last_page_key],
            )
            yield from rows
            if len(keys) < page_size:
                return
            cursor_key = last_page_key

    def _keyset_column(self, inner: str, params: Sequence[Any]) -> str:
        """Keys compare as text. SQLite uses no index through a CAST, which made every page a
        full scan and sort (quadratic in N): when every key is already text, use the column."""
        cast = "CAST(due.subscription_id AS TEXT)"
        if self.dialect != "sqlite":
            return cast  # PostgreSQL drops a text-to-text cast and keeps its index
        other_types = self.query(
            f"SELECT 1 FROM ({inner}) due WHERE typeof(due.subscription_id) "
            "NOT IN ('text', 'null') LIMIT 1",
            params,
        )
        return cast if other_types else "due.subscription_id"

    def _fetch_dicts(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        with closing(self.conn.cursor()) as cur:
            cur.execute(self._sql(sql), tuple(params))
            names = [d[0].lower() for d in cur.description]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        self.conn.commit()
        return rows

    # -- attempts -------------------------------------------------------------------------------

    def _select_attempts(
        self, where: str, params: Sequence[Any] = (), tail: str = ""
    ) -> list[Attempt]:
        cols = ", ".join(ATTEMPT_COLUMNS)
        rows = self.query(f"SELECT {cols} FROM {ATTEMPTS} WHERE {where} {tail}", params)
        return [Attempt.from_row(r) for r in rows]

    def attempts_for(
        self, subscription_ids: Iterable[str]
    ) -> dict[tuple[str, date], list[Attempt]]:
        """Every non-rejected attempt of these subscriptions, keyed by (subscription, date)."""
        ids = list(dict.fromkeys(subscription_ids))
        found: dict[tuple[str, date], list[Attempt]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join(["%s"] * len(chunk))
            for a in self._select_attempts(
                f"subscription_id IN ({marks}) AND status <> %s", [*chunk, REJECTED]
            ):
                found.setdefault((a.subscription_id or "", a.billing_date), []).append(a)
        for attempts in found.values():
            attempts.sort(key=lambda a: a.attempt_no)
        return found

    def get_attempt(self, merchant_uid: str) -> Attempt | None:
        rows = self._select_attempts("merchant_uid = %s", [merchant_uid])
        return rows[0] if rows else None

    def unsettled_attempts(
        self, *, requested_before: str | None = None, limit: int = 10000
    ) -> list[Attempt]:
        """pending/unknown rows, oldest first; ``requested_before`` skips rows still in flight."""
        where = f"status IN ('{UNSETTLED[0]}', '{UNSETTLED[1]}')"
        params: list[Any] = []
        if requested_before is not None:
            where += " AND (requested_at IS NULL OR requested_at < %s)"
            params.append(requested_before)
        return self._select_attempts(where, params, f"ORDER BY requested_at LIMIT {int(limit)}")

    def claim(self, rows: Sequence[Mapping[str, Any]], claim_token: str) -> set[str]:
        """Write-ahead: commit ``pending`` rows, return the merchant_uids this claim now owns.

        ON CONFLICT DO NOTHING makes two runs racing for one merchant_uid safe: exactly one
        insert wins, and only the winner sends the charge.
        """
        if not rows:
            return set()
        stamp = now_iso()
        cols = (
            "merchant_uid", "subscription_id", "billing_date", "attempt_no", "customer_uid",
            "amount", "currency", "status", "requested_at", "dag_id", "run_id", "task_id",
            "try_number", "claim_token", "updated_at",
        )  # fmt: skip
        values = [
            (
                r["merchant_uid"],
                r["subscription_id"],
                _iso(r["billing_date"]),
                r["attempt_no"],
                r["customer_uid"],
                r["amount"],
                r["currency"],
                PENDING,
                stamp,
                r.get("dag_id"),
                r.get("run_id"),
                r.get("task_id"),
                r.get("try_number"),
                claim_token,
                stamp,
            )  # fmt: skip
            for r in rows
        ]
        marks = ", ".join(["%s"] * len(cols))
        self.executemany(
            f"INSERT INTO {ATTEMPTS} ({', '.join(cols)}) VALUES ({marks}) "
            "ON CONFLICT (merchant_uid) DO NOTHING",
            values,
        )
        return self.claimed_by(claim_token, list(dict.fromkeys(r["merchant_uid"] for r in rows)))

    def claimed_by(self, claim_token: str, merchant_uids: Sequence[str]) -> set[str]:
        owned: set[str] = set()
        for start in range(0, len(merchant_uids), 500):
            chunk = list(merchant_uids[start : start + 500])
            marks = ", ".join(["%s"] * len(chunk))
            owned.update(
                r[0]
                for r in self.query(
                    f"SELECT merchant_uid FROM {ATTEMPTS} WHERE claim_token = %s "
                    f"AND merchant_uid IN ({marks})",
                    [claim_token, *chunk],
                )
            )
        return owned

    def reclaim(self, attempt: Attempt, claim_token: str, run: Mapping[str, Any]) -> bool:
        """Take over an unsettled row left by an earlier run (compare-and-set on its claim)."""
        stamp = now_iso()
        count = self.execute(
            f"UPDATE {ATTEMPTS} SET claim_token = %s, status = %s, requested_at = %s, "
            "dag_id = %s, run_id = %s, task_id = %s, try_number = %s, updated_at = %s "
            "WHERE merchant_uid = %s AND status IN (%s, %s) "
            "AND (claim_token = %s OR (claim_token IS NULL AND %s IS NULL))",
            [
                claim_token, PENDING, stamp, run.get("dag_id"), run.get("run_id"),
                run.get("task_id"), run.get("try_number"), stamp, attempt.merchant_uid, *UNSETTLED,
                attempt.claim_token, attempt.claim_token,
            ],
        )  # fmt: skip
        return count == 1

    def release(self, merchant_uids: Sequence[str], claim_token: str) -> None:
        """Drop pending rows this claim provably never sent (e.g. the batch stopped early)."""
        self.executemany(
            f"DELETE FROM {ATTEMPTS} WHERE merchant_uid = %s AND claim_token = %s AND status = %s",
            [(m, claim_token, PENDING) for m in merchant_uids],
        )

    def record_outcomes(
        self,
        outcomes: Sequence[Outcome],
        claim_token: str | None = None,
        *,
        only_unsettled: bool = False,
    ) -> None:
        """Commit outcomes in one transaction.

        With a claim token, only rows the claim still owns, and an unsettled outcome renews
        the row's lease (requested_at): its owner is alive and still on it. Without one (a
        lookup by another run), ``only_unsettled`` keeps a late answer from overwriting a row
        that its owner has settled meanwhile.
        """
        stamp = now_iso()
        renew = claim_token is not None
        rows = [
            (
                o.status,
                o.imp_uid,
                o.fail_reason,
                o.error_code,
                o.error_message,
                o.decline_kind,
                _iso(o.next_retry_date),
                o.receipt_url,
                o.latency_ms,
                o.amount,
                None if o.status in UNSETTLED else stamp,
                stamp if renew and o.status in UNSETTLED else None,
                stamp,
                o.merchant_uid,
            )  # fmt: skip
            for o in outcomes
        ]
        guard = ""
        if claim_token is not None:
            guard = " AND claim_token = %s"
            rows = [(*r, claim_token) for r in rows]
        if only_unsettled:
            guard += f" AND status IN ('{UNSETTLED[0]}', '{UNSETTLED[1]}')"
        self.executemany(
            f"UPDATE {ATTEMPTS} SET status = %s, imp_uid = COALESCE(%s, imp_uid), "
            "fail_reason = %s, error_code = %s, error_message = %s, decline_kind = %s, "
            "next_retry_date = %s, receipt_url = COALESCE(%s, receipt_url), "
            "latency_ms = COALESCE(%s, latency_ms), amount = COALESCE(%s, amount), "
            "completed_at = %s, requested_at = COALESCE(%s, requested_at), updated_at = %s "
            "WHERE merchant_uid = %s" + guard,
            rows,
        )

    def record_rejected(self, rows: Sequence[RejectedRow], run: Mapping[str, Any]) -> None:
        """Upsert rejected input rows: one per (billing date, subscription, reason), rerun-safe."""
        stamp = now_iso()
        values = [
            (
                rejected_key(r.billing_date, r.subscription_id, r.code),
                r.subscription_id,
                _iso(r.billing_date),
                0,
                (r.customer_uid or "")[:200] or None,
                r.amount if r.amount is not None and abs(r.amount) < 2**63 else None,
                (r.currency or "")[:10] or None,
                REJECTED,
                r.code,
                r.reason,
                stamp,
                stamp,
                run.get("dag_id"),
                run.get("run_id"),
                run.get("task_id"),
                run.get("try_number"),
                stamp,
            )  # fmt: skip
            for r in rows
        ]
        cols = (
            "merchant_uid", "subscription_id", "billing_date", "attempt_no", "customer_uid",
            "amount", "currency", "status", "error_code", "error_message", "requested_at",
            "completed_at", "dag_id", "run_id", "task_id", "try_number", "updated_at",
        )  # fmt: skip
        marks = ", ".join(["%s"] * len(cols))
        updates = ", ".join(
            f"{c} = excluded.{c}" for c in ("error_message", "run_id", "updated_at")
        )
        self.executemany(
            f"INSERT INTO {ATTEMPTS} ({', '.join(cols)}) VALUES ({marks}) "
            f"ON CONFLICT (merchant_uid) DO UPDATE SET {updates}",
            values,
        )

    def insert_attempt(self, attempt: Mapping[str, Any]) -> bool:
        """Insert a fully formed row (reconciliation found a payment we had no row for)."""
        cols = [c for c in ATTEMPT_COLUMNS if c in attempt]
        values = [_iso(attempt[c]) if isinstance(attempt[c], date) else attempt[c] for c in cols]
        marks = ", ".join(["%s"] * len(cols))
        return (
            self.execute(
                f"INSERT INTO {ATTEMPTS} ({', '.join(cols)}) VALUES ({marks}) "
                "ON CONFLICT (merchant_uid) DO NOTHING",
                values,
            )
            == 1
        )

    # -- runs -----------------------------------------------------------------------------------

    def record_run(
        self, run: Mapping[str, Any], billing_date: date, count: int, total: int, rejected: int,
        dry_run: bool, guardrail: str | None,
    ) -> None:  # fmt: skip
        self.execute(
            f"INSERT INTO {RUNS} (dag_id, run_id, billing_date, planned_count, planned_total, "
            "rejected_count, dry_run, guardrail, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, "
            "%s, %s) ON CONFLICT (dag_id, run_id) DO UPDATE SET planned_count = excluded."
            "planned_count, planned_total = excluded.planned_total, rejected_count = excluded."
            "rejected_count, dry_run = excluded.dry_run, guardrail = excluded.guardrail",
            [
                run.get("dag_id"), run.get("run_id"), billing_date.isoformat(), count, total,
                rejected, int(dry_run), guardrail, now_iso(),
            ],
        )  # fmt: skip

    def previous_run_total(self, dag_id: str, billing_date: date) -> int | None:
        """Planned total of the latest real run for an earlier billing date (guardrail base)."""
        rows = self.query(
            f"SELECT planned_total FROM {RUNS} WHERE dag_id = %s AND billing_date < %s "
            "AND dry_run = 0 AND guardrail IS NULL AND planned_count > 0 "
            "ORDER BY billing_date DESC, created_at DESC LIMIT 1",
            [dag_id, billing_date.isoformat()],
        )
        return int(rows[0][0]) if rows else None

    # -- write-back -----------------------------------------------------------------------------

    def paid_not_advanced(
        self, subscriptions_table: str = SUBSCRIPTIONS, *, since: date | None = None
    ) -> list[tuple[str, date, int | None]]:
        """Paid attempts (refunded ones too: the period was paid) whose subscription still
        sits on that billing date; ``since`` bounds the scan to recent billing dates."""
        table = checked_identifier(subscriptions_table)
        params: list[Any] = [PAID, CANCELLED]
        recent = ""
        if since is not None:
            recent = " AND a.billing_date >= %s"
            params.append(since.isoformat())
        rows = self.query(
            f"SELECT a.subscription_id, a.billing_date, s.billing_anchor_day FROM {ATTEMPTS} a "
            f"JOIN {table} s ON {self.sub_key('s')} = a.subscription_id "
            f"WHERE a.status IN (%s, %s) AND {self.sub_date('s')} = a.billing_date{recent}",
            params,
        )
        return [(r[0], to_date(r[1]), r[2]) for r in rows]  # type: ignore[misc]

    def advance_subscriptions(
        self, moves: Sequence[tuple[str, date, date]], subscriptions_table: str = SUBSCRIPTIONS
    ) -> None:
        """Move (subscription, from_date, to_date); only if it is still on from_date."""
        table = checked_identifier(subscriptions_table)
        stamp = now_iso()
        self.executemany(
            f"UPDATE {table} SET next_billing_date = %s, updated_at = %s "
            "WHERE subscription_id = %s AND next_billing_date = %s",
            [(_iso(new), stamp, sub, _iso(old)) for sub, old, new in moves],
        )

    def set_subscription_status(
        self,
        subscription_ids: Sequence[str],
        status: str,
        *,
        only_from: Sequence[str] = ("active",),
        subscriptions_table: str = SUBSCRIPTIONS,
    ) -> None:
        table = checked_identifier(subscriptions_table)
        marks = ", ".join(["%s"] * len(only_from))
        stamp = now_iso()
        self.executemany(
            f"UPDATE {table} SET status = %s, updated_at = %s "
            f"WHERE subscription_id = %s AND status IN ({marks})",
            [(status, stamp, sub, *only_from) for sub in subscription_ids],
        )

    def summary(self, where: str, params: Sequence[Any] = ()) -> dict[str, dict[str, int]]:
        """Counts and amounts by status for the attempts matching ``where``."""
        rows = self.query(
            f"SELECT status, COUNT(*), COALESCE(SUM(amount), 0) FROM {ATTEMPTS} "
            f"WHERE {where} GROUP BY status",
            params,
        )
        return {r[0]: {"count": int(r[1]), "amount": int(r[2] or 0)} for r in rows}

    # -- dunning, backfills, reconciliation, refunds ---------------------------------------------

    def retryable_failures(
        self,
        *,
        decline_kinds: Sequence[str],
        subscription_statuses: Sequence[str],
        subscriptions_table: str = SUBSCRIPTIONS,
        retry_due_by: date | None = None,
        billing_from: date | None = None,
        billing_to: date | None = None,
        subscription_ids: Sequence[str] | None = None,
        max_attempt_no: int = 99,
    ) -> list[dict[str, Any]]:
        """Failed attempts that may get a next attempt, with the subscription's current data.

        Only the latest attempt of a (subscription, billing date), only when nothing for that
        pair is paid, cancelled, pending or unknown, and only while the subscription still sits
        on that billing date: the ledger side of "never charge a period twice".
        """
        table = checked_identifier(subscriptions_table)
        where = [
            "a.status = %s",
            f"a.decline_kind IN ({', '.join(['%s'] * len(decline_kinds))})",
            f"s.status IN ({', '.join(['%s'] * len(subscription_statuses))})",
            f"{self.sub_date('s')} = a.billing_date",
            "a.attempt_no < %s",
            f"a.attempt_no = (SELECT MAX(b.attempt_no) FROM {ATTEMPTS} b "
            "WHERE b.subscription_id = a.subscription_id AND b.billing_date = a.billing_date "
            "AND b.status <> %s)",
            f"NOT EXISTS (SELECT 1 FROM {ATTEMPTS} c WHERE c.subscription_id = a.subscription_id "
            "AND c.billing_date = a.billing_date AND c.status IN (%s, %s, %s, %s))",
        ]
        params: list[Any] = [
            FAILED, *decline_kinds, *subscription_statuses, max_attempt_no, REJECTED,
            PAID, CANCELLED, *UNSETTLED,
        ]  # fmt: skip
        if retry_due_by is not None:
            where.append("a.next_retry_date <= %s")
            params.append(retry_due_by.isoformat())
        if billing_from is not None:
            where.append("a.billing_date >= %s")
            params.append(billing_from.isoformat())
        if billing_to is not None:
            where.append("a.billing_date <= %s")
            params.append(billing_to.isoformat())
        sql = (
            "SELECT a.subscription_id, a.billing_date, a.attempt_no, a.merchant_uid, "
            "COALESCE(s.customer_uid, a.customer_uid) AS customer_uid, a.amount, a.currency, "
            "a.decline_kind, a.next_retry_date, a.fail_reason, s.name, s.buyer_name, "
            "s.buyer_email, s.buyer_tel, s.status AS subscription_status "
            f"FROM {ATTEMPTS} a JOIN {table} s ON {self.sub_key('s')} = a.subscription_id "
            "WHERE " + " AND ".join(where)
        )
        order = " ORDER BY a.subscription_id, a.billing_date"
        if subscription_ids is None:
            return self._fetch_dicts(sql + order, params)
        ids = list(dict.fromkeys(subscription_ids))
        rows: list[dict[str, Any]] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join(["%s"] * len(chunk))
            rows += self._fetch_dicts(
                f"{sql} AND a.subscription_id IN ({marks}){order}", [*params, *chunk]
            )
        return rows

    def attempts_by_merchant_uid(self, merchant_uids: Iterable[str]) -> dict[str, Attempt]:
        """Ledger rows for these merchant_uids (reconciliation compares them with Iamport)."""
        uids = list(dict.fromkeys(merchant_uids))
        found: dict[str, Attempt] = {}
        for start in range(0, len(uids), 500):
            chunk = uids[start : start + 500]
            marks = ", ".join(["%s"] * len(chunk))
            for a in self._select_attempts(f"merchant_uid IN ({marks})", chunk):
                found[a.merchant_uid] = a
        return found

    def double_paid(self, billing_from: date) -> list[tuple[str, date, int]]:
        """(subscription, billing date, paid attempts) with more than one paid attempt."""
        rows = self.query(
            f"SELECT subscription_id, billing_date, COUNT(*) FROM {ATTEMPTS} "
            "WHERE status = %s AND billing_date >= %s "
            "GROUP BY subscription_id, billing_date HAVING COUNT(*) > 1",
            [PAID, billing_from.isoformat()],
        )
        return [(r[0], to_date(r[1]), int(r[2])) for r in rows]  # type: ignore[misc]

    def record_cancellation(
        self, merchant_uid: str, *, imp_uid: str | None, cancel_amount: int
    ) -> bool:
        """Mark a charge ``cancelled`` with the total refunded so far (Iamport's cancel_amount)."""
        stamp = now_iso()
        return (
            self.execute(
                f"UPDATE {ATTEMPTS} SET status = %s, cancel_amount = %s, "
                "imp_uid = COALESCE(%s, imp_uid), completed_at = COALESCE(completed_at, %s), "
                "updated_at = %s WHERE merchant_uid = %s",
                [CANCELLED, int(cancel_amount), imp_uid, stamp, stamp, merchant_uid],
            )
            == 1
        )


def checked_identifier(name: str) -> str:
    """Table names cannot be bound as parameters: allow plain identifiers only."""
    if not IDENT_RE.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


def new_claim_token() -> str:
    return uuid.uuid4().hex
