"""The ledger: schema, the due query read by keyset, the attempt log and write-back.

All SQL is parameterized, runs through the connection of an Airflow common.sql ``DbApiHook``
and differs between databases only through its ``Dialect``. Every status change goes through
``record_outcomes``, which enforces ``states.ATTEMPT_MOVES`` in SQL (compare-and-set) and
returns, never drops, what it refused.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from iamport_billing.policy import RejectedRow, rejected_key, to_date, to_timestamp
from iamport_billing.states import (
    ACTIVE,
    APPROVAL_APPROVED,
    APPROVAL_AWAITING,
    APPROVAL_REJECTED,
    ATTEMPT_MOVES,
    CANCELLED,
    FAILED,
    MISSING_BILLING_KEY,
    MONEY_MOVED,
    PAID,
    PAST_DUE,
    PAYMENT_METHOD_REQUIRED,
    PENDING,
    REACTIVATED_BY_PAYMENT,
    REFUSED,
    REJECTED,
    SOFT,
    UNSETTLED,
)
from iamport_billing.warehouse.dialects import dialect_for
from iamport_billing.warehouse.schema import (
    ATTEMPT_COLUMNS,
    ATTEMPTS,
    PLAN_ITEMS,
    PUT_BACKS,
    RUNS,
    SUBSCRIPTIONS,
    ddl,
    expected_columns,
)
from iamport_billing.warehouse.session import SqlSession
from iamport_billing.warehouse.source import DueSource

log = logging.getLogger(__name__)
IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
CHUNK = 500

DEFAULT_DUE_QUERY = f"""
SELECT subscription_id, customer_uid, amount, currency, name,
       next_billing_date AS billing_date, buyer_name, buyer_email, buyer_tel
FROM {SUBSCRIPTIONS}
WHERE status = '{ACTIVE}' AND next_billing_date <= :billing_date
"""


def now() -> datetime:
    return datetime.now(UTC)


def _iso(value: date | None) -> str | None:
    return value.isoformat() if value is not None else None


def _chunks(values: Sequence[Any], size: int = CHUNK) -> Iterator[list[Any]]:
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


def _marks(n: int) -> str:
    return ", ".join(["%s"] * n)


@dataclass(frozen=True)
class Attempt:
    """One ledger row, as read back. ``amount`` is what we asked; ``paid_amount`` what the
    gateway says it took."""

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
    paid_amount: int | None = None
    name: str | None = None
    send_count: int | None = None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Attempt:
        values = dict(zip(ATTEMPT_COLUMNS, row, strict=True))
        values["billing_date"] = to_date(values["billing_date"])
        values["next_retry_date"] = to_date(values["next_retry_date"])
        for key in ("requested_at", "completed_at", "updated_at"):
            values[key] = to_timestamp(values[key])
        return cls(**values)


@dataclass(frozen=True)
class RunRecord:
    """What a run's plan step recorded (billing_runs)."""

    guardrail: str | None
    dry_run: bool
    approval: str | None
    approved_by: str | None
    plan_digest: str | None

    @property
    def held(self) -> bool:
        """Over its guardrails and not approved: nothing of the plan may be charged."""
        return bool(self.guardrail) and self.approval != APPROVAL_APPROVED


@dataclass(frozen=True)
class Outcome:
    """A move of one attempt to ``status``, with what the gateway said."""

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
    paid_amount: int | None = None


@dataclass(frozen=True)
class Refused:
    """A move the state table or the claim did not allow, and the row's state at that time."""

    outcome: Outcome
    current_status: str | None
    current_claim: str | None


class Ledger(SqlSession):
    """The ledger and warehouse tables behind one DbApiHook connection.

    One DB connection is kept for the object's life: a batch task writes hundreds of rows a
    second, and reconnecting per statement would dominate its CPU.
    """

    def __init__(self, hook: Any):
        super().__init__(hook, dialect_for(hook))

    def due_source(self) -> DueSource:
        """The due query read on this ledger's own connection (the default deployment)."""
        return DueSource.sharing(self)

    def stamp(self, moment: datetime | None = None) -> Any:
        """A timestamp parameter in the form this database stores."""
        return self.dialect.timestamp(moment or now())

    def sub_key(self, alias: str) -> str:
        """A subscriptions table's key as text, comparable with the ledger's subscription_id."""
        return self.dialect.as_text(f"{alias}.subscription_id")

    def sub_date(self, alias: str) -> str:
        """A subscriptions table's next_billing_date as a date (custom tables may hold text)."""
        return self.dialect.as_date(f"{alias}.next_billing_date")

    # -- schema ---------------------------------------------------------------------------------

    def init_schema(self) -> None:
        """Create the tables and indexes if missing, and add columns newer versions use."""
        for statement in ddl(self.dialect):
            try:
                self.execute(statement)
            except Exception as e:
                if not self.dialect.is_duplicate_index(e):
                    raise
        for table in (ATTEMPTS, RUNS):
            have = set(self._column_names(f"SELECT * FROM {table} WHERE 1 = 0"))
            for column, kind in expected_columns(table, self.dialect).items():
                if column not in have:
                    self.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

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
        for chunk in _chunks(ids):
            for a in self._select_attempts(
                f"subscription_id IN ({_marks(len(chunk))}) AND status <> %s", [*chunk, REJECTED]
            ):
                found.setdefault((a.subscription_id or "", a.billing_date), []).append(a)
        for attempts in found.values():
            attempts.sort(key=lambda a: a.attempt_no)
        return found

    def first_attempts(
        self, periods: Iterable[tuple[str, date]]
    ) -> dict[tuple[str, date], Attempt]:
        """The first non-rejected attempt of each (subscription, billing date) that has one;
        only those billing dates are read, not the subscriptions' whole history."""
        wanted = set(periods)
        ids = sorted({sub for sub, _ in wanted})
        days = sorted({_iso(day) for _, day in wanted})
        found: dict[tuple[str, date], Attempt] = {}
        for chunk in _chunks(ids):
            for a in self._select_attempts(
                f"subscription_id IN ({_marks(len(chunk))}) "
                f"AND billing_date IN ({_marks(len(days))}) AND status <> %s",
                [*chunk, *days, REJECTED],
                "ORDER BY attempt_no",
            ):
                key = (a.subscription_id or "", a.billing_date)
                if key in wanted:
                    found.setdefault(key, a)
        return found

    def get_attempt(self, merchant_uid: str) -> Attempt | None:
        rows = self._select_attempts("merchant_uid = %s", [merchant_uid])
        return rows[0] if rows else None

    def attempts_by_merchant_uid(self, merchant_uids: Iterable[str]) -> dict[str, Attempt]:
        uids = list(dict.fromkeys(merchant_uids))
        found: dict[str, Attempt] = {}
        for chunk in _chunks(uids):
            for a in self._select_attempts(f"merchant_uid IN ({_marks(len(chunk))})", chunk):
                found[a.merchant_uid] = a
        return found

    def unsettled_attempts(
        self, *, requested_before: datetime | None = None, limit: int = 10000
    ) -> list[Attempt]:
        """pending/unknown rows of any DAG, oldest first; ``requested_before`` skips rows
        still in flight."""
        where = f"status IN ({_marks(len(UNSETTLED))})"
        params: list[Any] = list(UNSETTLED)
        if requested_before is not None:
            where += " AND (requested_at IS NULL OR requested_at < %s)"
            params.append(self.stamp(requested_before))
        return self._select_attempts(where, params, f"ORDER BY requested_at LIMIT {int(limit)}")

    def unsettled_for_claim(self, claim_token: str) -> list[Attempt]:
        """Rows a claim left pending/unknown (a charge task fails on any)."""
        return self._select_attempts(
            f"claim_token = %s AND status IN ({_marks(len(UNSETTLED))})",
            [claim_token, *UNSETTLED],
        )

    def unsettled_for_run(self, run: Mapping[str, Any]) -> list[Attempt]:
        """Rows a DAG run (any of its tries) left pending/unknown."""
        return self._select_attempts(
            f"dag_id = %s AND run_id = %s AND status IN ({_marks(len(UNSETTLED))})",
            [run["dag_id"], run["run_id"], *UNSETTLED],
        )

    def claim(self, rows: Sequence[Mapping[str, Any]], claim_token: str) -> set[str]:
        """Write-ahead: commit ``pending`` rows, return the merchant_uids this claim now owns.

        Insert-unless-exists makes two runs racing for one merchant_uid safe: exactly one
        insert wins, and only the winner sends the charge.
        """
        if not rows:
            return set()
        stamp = self.stamp()
        cols = (
            "merchant_uid", "subscription_id", "billing_date", "attempt_no", "customer_uid",
            "amount", "currency", "status", "requested_at", "dag_id", "run_id", "task_id",
            "try_number", "claim_token", "updated_at", "name", "send_count",
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
                r.get("name"),
                0,
            )  # fmt: skip
            for r in rows
        ]
        self.executemany(self.dialect.insert_ignore(ATTEMPTS, cols, ["merchant_uid"]), values)
        return self.claimed_by(claim_token, list(dict.fromkeys(r["merchant_uid"] for r in rows)))

    def claimed_by(self, claim_token: str, merchant_uids: Sequence[str]) -> set[str]:
        owned: set[str] = set()
        for chunk in _chunks(merchant_uids):
            owned.update(
                r[0]
                for r in self.query(
                    f"SELECT merchant_uid FROM {ATTEMPTS} WHERE claim_token = %s "
                    f"AND merchant_uid IN ({_marks(len(chunk))})",
                    [claim_token, *chunk],
                )
            )
        return owned

    def reclaim(
        self,
        attempt: Attempt,
        claim_token: str,
        run: Mapping[str, Any],
        *,
        idle_since: datetime | None = None,
    ) -> bool:
        """Take over an unsettled row left by an earlier run: compare-and-set on the claim and
        on the sends seen when it was read (an owner that confirmed a send since keeps it),
        and with ``idle_since``, only if its lease has run out."""
        stamp = self.stamp()
        if attempt.claim_token is None:
            same_claim, claim_params = "claim_token IS NULL", []
        else:
            same_claim, claim_params = "claim_token = %s", [attempt.claim_token]
        same_claim += " AND COALESCE(send_count, 0) = %s"
        claim_params.append(int(attempt.send_count or 0))
        if idle_since is not None:
            same_claim += " AND (requested_at IS NULL OR requested_at < %s)"
            claim_params.append(self.stamp(idle_since))
        count = self.execute(
            f"UPDATE {ATTEMPTS} SET claim_token = %s, status = %s, requested_at = %s, "
            "dag_id = %s, run_id = %s, task_id = %s, try_number = %s, updated_at = %s "
            f"WHERE merchant_uid = %s AND status IN (%s, %s) AND {same_claim}",
            [
                claim_token, PENDING, stamp, run.get("dag_id"), run.get("run_id"),
                run.get("task_id"), run.get("try_number"), stamp, attempt.merchant_uid,
                *UNSETTLED, *claim_params,
            ],
        )  # fmt: skip
        return count == 1

    def confirm_send(self, merchant_uid: str, claim_token: str) -> bool:
        """Just before a POST: the row is still ours and pending, in one compare-and-set.

        Counts the send and renews the lease; False means another try took the row over and
        this one must not send.
        """
        stamp = self.stamp()
        return (
            self.execute(
                f"UPDATE {ATTEMPTS} SET send_count = COALESCE(send_count, 0) + 1, "
                "requested_at = %s, updated_at = %s "
                "WHERE merchant_uid = %s AND claim_token = %s AND status = %s",
                [stamp, stamp, merchant_uid, claim_token, PENDING],
            )
            == 1
        )

    def withdraw(self, merchant_uids: Sequence[str], claim_token: str) -> None:
        """Take back the send ``confirm_send`` counted for requests that provably never left
        (no token, connection refused): the row is as it was before this send."""
        self.executemany(
            f"UPDATE {ATTEMPTS} SET send_count = send_count - 1 WHERE merchant_uid = %s "
            "AND claim_token = %s AND status = %s AND send_count > 0",
            [(m, claim_token, PENDING) for m in merchant_uids],
        )

    def release(self, merchant_uids: Sequence[str], claim_token: str) -> None:
        """Drop pending rows this claim provably never sent (e.g. the batch stopped early)."""
        self.executemany(
            f"DELETE FROM {ATTEMPTS} WHERE merchant_uid = %s AND claim_token = %s AND status = %s "
            "AND COALESCE(send_count, 0) = 0",
            [(m, claim_token, PENDING) for m in merchant_uids],
        )

    def record_outcomes(
        self, outcomes: Sequence[Outcome], claim_token: str | None = None
    ) -> list[Refused]:
        """Move attempts to their outcomes as ``states.ATTEMPT_MOVES`` allows, in one commit.

        A gateway's word that money moved (paid, amount mismatch, cancelled) is applied
        whoever brings it. Any other move needs the row unsettled and, with a claim token,
        still owned by that claim; an unsettled outcome then renews the lease. Returns what
        was refused (and logs it): a caller decides whether that is an alarm.
        """
        if not outcomes:
            return []
        stamp = self.stamp()
        by_guard: dict[tuple[str, bool], list[tuple]] = {}
        for o in outcomes:
            guarded = claim_token is not None and o.status not in MONEY_MOVED
            row = (
                o.status, o.imp_uid, o.fail_reason, o.error_code, o.error_message,
                o.decline_kind, _iso(o.next_retry_date), o.receipt_url, o.latency_ms,
                o.paid_amount, None if o.status in UNSETTLED else stamp,
                stamp if guarded and o.status in UNSETTLED else None, stamp, o.merchant_uid,
                *ATTEMPT_MOVES[o.status], *((claim_token,) if guarded else ()),
            )  # fmt: skip
            by_guard.setdefault((o.status, guarded), []).append(row)
        for (status, guarded), rows in by_guard.items():
            sources = _marks(len(ATTEMPT_MOVES[status]))
            self.executemany(
                f"UPDATE {ATTEMPTS} SET status = %s, imp_uid = COALESCE(%s, imp_uid), "
                "fail_reason = %s, error_code = %s, error_message = %s, decline_kind = %s, "
                "next_retry_date = %s, receipt_url = COALESCE(%s, receipt_url), "
                "latency_ms = COALESCE(%s, latency_ms), "
                "paid_amount = COALESCE(%s, paid_amount), "
                "completed_at = %s, requested_at = COALESCE(%s, requested_at), updated_at = %s "
                f"WHERE merchant_uid = %s AND status IN ({sources})"
                + (" AND claim_token = %s" if guarded else ""),
                rows,
            )
        return self._refused(outcomes, claim_token)

    def _refused(self, outcomes: Sequence[Outcome], claim_token: str | None) -> list[Refused]:
        now_rows = self.attempts_by_merchant_uid(o.merchant_uid for o in outcomes)
        refused = []
        for o in outcomes:
            row = now_rows.get(o.merchant_uid)
            owned = (
                claim_token is None
                or o.status in MONEY_MOVED
                or (row is not None and row.claim_token == claim_token)
            )
            if row is None or row.status != o.status or not owned:
                refused.append(
                    Refused(o, row.status if row else None, row.claim_token if row else None)
                )
        for r in refused:
            level = logging.ERROR if r.outcome.status in MONEY_MOVED else logging.WARNING
            log.log(
                level,
                "ledger refused %s -> %s for %s (claim %s, row claim %s)",
                r.current_status, r.outcome.status, r.outcome.merchant_uid,
                (claim_token or "-")[:8], (r.current_claim or "-")[:8],
            )  # fmt: skip
        return refused

    def record_rejected(self, rows: Sequence[RejectedRow], run: Mapping[str, Any]) -> None:
        """Upsert rejected input rows: one per (billing date, subscription, reason), rerun-safe."""
        stamp = self.stamp()
        values = [
            (
                rejected_key(r.billing_date, r.subscription_id, r.code),
                None if r.subscription_id is None else str(r.subscription_id)[:64],
                _iso(r.billing_date),
                0,
                (r.customer_uid or "")[:200] or None,
                r.amount if r.amount is not None and abs(r.amount) < 2**63 else None,
                (r.currency or "")[:10] or None,
                REJECTED,
                r.code[:100],
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
        self.executemany(
            self.dialect.upsert(
                ATTEMPTS, cols, ["merchant_uid"], ["error_message", "run_id", "updated_at"]
            ),
            values,
        )

    def insert_attempt(self, attempt: Mapping[str, Any]) -> bool:
        """Insert a fully formed row (reconciliation found a payment we had no row for)."""
        cols = [c for c in ATTEMPT_COLUMNS if c in attempt]
        values = []
        for c in cols:
            value = attempt[c]
            if isinstance(value, datetime):
                value = self.stamp(value)
            elif isinstance(value, date):
                value = _iso(value)
            values.append(value)
        before = self.get_attempt(str(attempt["merchant_uid"]))
        self.execute(self.dialect.insert_ignore(ATTEMPTS, cols, ["merchant_uid"]), values)
        return before is None and self.get_attempt(str(attempt["merchant_uid"])) is not None

    def record_cancellation(
        self, merchant_uid: str, *, imp_uid: str | None, cancel_amount: int
    ) -> bool:
        """Mark a charge ``cancelled`` with the total refunded so far (the gateway's figure).
        Refunds only add up: a figure read before a later refund never lowers the total."""
        stamp = self.stamp()
        sources = ATTEMPT_MOVES[CANCELLED]
        count = self.execute(
            f"UPDATE {ATTEMPTS} SET status = %s, cancel_amount = %s, "
            "imp_uid = COALESCE(%s, imp_uid), completed_at = COALESCE(completed_at, %s), "
            f"updated_at = %s WHERE merchant_uid = %s AND status IN ({_marks(len(sources))}) "
            "AND COALESCE(cancel_amount, 0) <= %s",
            [
                CANCELLED, int(cancel_amount), imp_uid, stamp, stamp, merchant_uid, *sources,
                int(cancel_amount),
            ],
        )  # fmt: skip
        if count != 1:
            log.error("ledger refused the cancellation of %s", merchant_uid)
        return count == 1

    # -- plans and runs -------------------------------------------------------------------------

    def record_run(
        self, run: Mapping[str, Any], billing_date: date, count: int, total: int, rejected: int,
        dry_run: bool, guardrail: str | None, *, plan_digest: str | None = None,
    ) -> None:  # fmt: skip
        """Record a run's plan; a real plan over its guardrails awaits a person's approval (a
        re-planned run awaits it afresh: an approval is of the plan it was shown)."""
        awaiting = APPROVAL_AWAITING if guardrail and not dry_run else None
        cols = (
            "dag_id", "run_id", "billing_date", "planned_count", "planned_total",
            "rejected_count", "dry_run", "guardrail", "approval", "approved_by", "approved_at",
            "plan_digest", "created_at",
        )  # fmt: skip
        self.execute(
            self.dialect.upsert(RUNS, cols, ["dag_id", "run_id"], cols[3:12]),
            [
                run.get("dag_id"), run.get("run_id"), billing_date.isoformat(), count, total,
                rejected, int(dry_run), guardrail, awaiting, None, None, plan_digest,
                self.stamp(),
            ],
        )  # fmt: skip

    def run_record(self, run: Mapping[str, Any]) -> RunRecord | None:
        """What a run's plan recorded, or None."""
        rows = self.query(
            f"SELECT guardrail, dry_run, approval, approved_by, plan_digest FROM {RUNS} "
            "WHERE dag_id = %s AND run_id = %s",
            [run["dag_id"], run["run_id"]],
        )
        if not rows:
            return None
        guardrail, dry_run, approval, approved_by, digest = rows[0]
        return RunRecord(guardrail, bool(dry_run), approval, approved_by, digest)

    def decide_plan(
        self, run: Mapping[str, Any], *, approve: bool, by: str, plan_digest: str
    ) -> bool:
        """A person's answer to a plan awaiting approval: True when it applied, i.e. the run
        still awaits one for exactly this plan (a re-planned run needs a new answer)."""
        count = self.execute(
            f"UPDATE {RUNS} SET approval = %s, approved_by = %s, approved_at = %s "
            "WHERE dag_id = %s AND run_id = %s AND approval = %s AND plan_digest = %s",
            [
                APPROVAL_APPROVED if approve else APPROVAL_REJECTED, by[:250], self.stamp(),
                run["dag_id"], run["run_id"], APPROVAL_AWAITING, plan_digest,
            ],
        )  # fmt: skip
        return count == 1

    def previous_run_total(self, dag_id: str, billing_date: date) -> int | None:
        """Planned total of the latest real run for an earlier billing date (guardrail base):
        within its guardrails, or approved over them by a person."""
        rows = self.query(
            f"SELECT planned_total FROM {RUNS} WHERE dag_id = %s AND billing_date < %s "
            "AND dry_run = 0 AND (guardrail IS NULL OR approval = %s) AND planned_count > 0 "
            "ORDER BY billing_date DESC, created_at DESC LIMIT 1",
            [dag_id, billing_date.isoformat(), APPROVAL_APPROVED],
        )
        return int(rows[0][0]) if rows else None

    def freeze_plan(self, run: Mapping[str, Any], items: Sequence[tuple[str, date, int]]) -> None:
        """Record (subscription, billing date, amount) a plan approved, replacing an earlier
        plan of the same run (a re-run plan step plans afresh)."""
        self.execute(
            f"DELETE FROM {PLAN_ITEMS} WHERE dag_id = %s AND run_id = %s",
            [run.get("dag_id"), run.get("run_id")],
        )
        for chunk in _chunks(items, 2000):
            self.executemany(
                f"INSERT INTO {PLAN_ITEMS} (dag_id, run_id, subscription_id, billing_date, "
                "amount) VALUES (%s, %s, %s, %s, %s)",
                [(run.get("dag_id"), run.get("run_id"), s, _iso(d), a) for s, d, a in chunk],
            )

    def planned_without_attempt(self, run: Mapping[str, Any]) -> int:
        """How many of a run's approved charges have no attempt at all (skipped while another
        run had them in flight and then withdrew them, or never reached)."""
        rows = self.query(
            f"SELECT COUNT(*) FROM {PLAN_ITEMS} p WHERE p.dag_id = %s AND p.run_id = %s "
            f"AND NOT EXISTS (SELECT 1 FROM {ATTEMPTS} a WHERE a.subscription_id = "
            "p.subscription_id AND a.billing_date = p.billing_date AND a.status <> %s)",
            [run["dag_id"], run["run_id"], REJECTED],
        )
        return int(rows[0][0])

    def planned_items(
        self, run: Mapping[str, Any], subscription_ids: Sequence[str]
    ) -> dict[str, tuple[date, int]]:
        """What the run's plan approved for these subscriptions: id -> (billing date, amount).
        Nothing while the plan is over its guardrails and no person has approved it."""
        found: dict[str, tuple[date, int]] = {}
        for chunk in _chunks(list(dict.fromkeys(subscription_ids))):
            for sub, day, amount in self.query(
                f"SELECT p.subscription_id, p.billing_date, p.amount FROM {PLAN_ITEMS} p "
                f"JOIN {RUNS} r ON r.dag_id = p.dag_id AND r.run_id = p.run_id "
                "WHERE p.dag_id = %s AND p.run_id = %s AND (r.guardrail IS NULL OR "
                f"r.approval = %s) AND p.subscription_id IN ({_marks(len(chunk))})",
                [run.get("dag_id"), run.get("run_id"), APPROVAL_APPROVED, *chunk],
            ):
                found[str(sub)] = (to_date(day), int(amount))  # type: ignore[assignment]
        return found

    def has_attempts(self) -> bool:
        """Whether any attempt (of any status) was ever recorded."""
        return bool(self.query(f"SELECT 1 FROM {ATTEMPTS} LIMIT 1"))

    def planned_periods(self) -> dict[tuple[str, date], set[int]]:
        """(subscription, billing date) -> every amount any run's plan approved for it (a plan
        over its guardrails only once a person approved it)."""
        found: dict[tuple[str, date], set[int]] = {}
        for sub, day, amount in self.query(
            f"SELECT p.subscription_id, p.billing_date, p.amount FROM {PLAN_ITEMS} p "
            f"JOIN {RUNS} r ON r.dag_id = p.dag_id AND r.run_id = p.run_id "
            "WHERE r.guardrail IS NULL OR r.approval = %s",
            [APPROVAL_APPROVED],
        ):
            found.setdefault((str(sub), to_date(day)), set()).add(int(amount))  # type: ignore[arg-type]
        return found

    # -- write-back -----------------------------------------------------------------------------

    def paid_not_advanced(
        self,
        subscriptions_table: str = SUBSCRIPTIONS,
        *,
        since: date | None = None,
        subscription_ids: Sequence[str] | None = None,
        statuses: Sequence[str] = (PAID, CANCELLED),
    ) -> list[tuple[str, date, int | None]]:
        """Paid attempts (by default refunded ones too: the period was paid) whose subscription
        still sits on that billing date; ``since`` bounds the scan to recent billing dates."""
        table = checked_identifier(subscriptions_table)
        params: list[Any] = list(statuses)
        recent = ""
        if since is not None:
            recent = " AND a.billing_date >= %s"
            params.append(since.isoformat())
        sql = (
            f"SELECT a.subscription_id, a.billing_date, s.billing_anchor_day FROM {ATTEMPTS} a "
            f"JOIN {table} s ON {self.sub_key('s')} = a.subscription_id "
            f"WHERE a.status IN ({_marks(len(statuses))}) "
            f"AND {self.sub_date('s')} = a.billing_date{recent}"
        )
        rows = self._for_ids(sql, params, "a.subscription_id", subscription_ids)
        return [(r[0], to_date(r[1]), r[2]) for r in rows]  # type: ignore[misc]

    def _for_ids(
        self, sql: str, params: Sequence[Any], column: str, ids: Sequence[str] | None
    ) -> list[tuple]:
        """Run ``sql`` (a WHERE clause at its end) for all rows, or chunk by chunk of ids."""
        if ids is None:
            return self.query(sql, params)
        rows: list[tuple] = []
        for chunk in _chunks(list(dict.fromkeys(ids))):
            rows += self.query(f"{sql} AND {column} IN ({_marks(len(chunk))})", [*params, *chunk])
        return rows

    def advance_subscriptions(
        self,
        moves: Sequence[tuple[str, date, date]],
        subscriptions_table: str = SUBSCRIPTIONS,
        *,
        reactivate: Collection[str] = (),
    ) -> None:
        """Move (subscription, from_date, to_date) only if it is still on from_date; an empty
        anchor day is taken from the date it leaves, so month ends do not drift. Those in
        ``reactivate`` (their stuck period is paid, not refunded) become active again if they
        were ``past_due`` or ``payment_method_required``."""
        table = checked_identifier(subscriptions_table)
        stamp = self.stamp()
        stopped = _marks(len(REACTIVATED_BY_PAYMENT))
        revived = f"status = CASE WHEN status IN ({stopped}) THEN %s ELSE status END, "
        for again in (False, True):
            chosen = [m for m in moves if (m[0] in reactivate) == again]
            if not chosen:
                continue
            self.executemany(
                f"UPDATE {table} SET next_billing_date = %s, updated_at = %s, "
                f"{revived if again else ''}"
                "billing_anchor_day = COALESCE(billing_anchor_day, %s) "
                "WHERE subscription_id = %s AND next_billing_date = %s",
                [
                    (
                        _iso(new), stamp, *((*REACTIVATED_BY_PAYMENT, ACTIVE) if again else ()),
                        old.day, sub, _iso(old),
                    )
                    for sub, old, new in chosen
                ],
            )  # fmt: skip

    def set_subscription_status(
        self,
        subscription_ids: Sequence[str],
        status: str,
        *,
        only_from: Sequence[str] = (ACTIVE,),
        subscriptions_table: str = SUBSCRIPTIONS,
    ) -> None:
        table = checked_identifier(subscriptions_table)
        stamp = self.stamp()
        self.executemany(
            f"UPDATE {table} SET status = %s, updated_at = %s "
            f"WHERE subscription_id = %s AND status IN ({_marks(len(only_from))})",
            [(status, stamp, sub, *only_from) for sub in subscription_ids],
        )

    def set_subscription_amounts(
        self, amounts: Sequence[tuple[str, int]], subscriptions_table: str = SUBSCRIPTIONS
    ) -> None:
        """A price change: (subscription, new amount), from the next plan on."""
        table = checked_identifier(subscriptions_table)
        stamp = self.stamp()
        self.executemany(
            f"UPDATE {table} SET amount = %s, updated_at = %s WHERE subscription_id = %s",
            [(amount, stamp, sub) for sub, amount in amounts],
        )

    def add_subscriptions(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert subscriptions unless their id exists (sample data, tests, simulations)."""
        cols = (
            "subscription_id", "customer_uid", "amount", "currency", "name", "status",
            "next_billing_date", "billing_anchor_day", "buyer_name", "buyer_email", "buyer_tel",
            "updated_at",
        )  # fmt: skip
        stamp = self.stamp()
        values = [
            (
                r["subscription_id"],
                r.get("customer_uid"),
                r.get("amount"),
                r.get("currency", "KRW"),
                r.get("name"),
                r.get("status", ACTIVE),
                _iso(r.get("next_billing_date")),
                r.get("billing_anchor_day"),
                r.get("buyer_name"),
                r.get("buyer_email"),
                r.get("buyer_tel"),
                stamp,
            )  # fmt: skip
            for r in rows
        ]
        self.executemany(
            self.dialect.insert_ignore(SUBSCRIPTIONS, cols, ["subscription_id"]), values
        )

    def subscription_state(
        self, subscription_id: str, subscriptions_table: str = SUBSCRIPTIONS
    ) -> dict[str, Any] | None:
        """status, next_billing_date, billing_anchor_day and updated_at of one subscription."""
        table = checked_identifier(subscriptions_table)
        rows = self._fetch_dicts(
            f"SELECT status, next_billing_date, billing_anchor_day, updated_at FROM {table} "
            "WHERE subscription_id = %s",
            [subscription_id],
        )
        if not rows:
            return None
        row = rows[0]
        row["next_billing_date"] = to_date(row["next_billing_date"])
        row["updated_at"] = to_timestamp(row["updated_at"])
        return row

    def put_back(
        self, subscription_id: str, subscriptions_table: str | None = SUBSCRIPTIONS
    ) -> str | None:
        """What ops do after a customer registers a new card: the latest attempt failed for
        good, and the next daily run may make one more, once. Records that word in the ledger
        and, with a subscriptions table, makes the subscription active again.
        Returns None when done, else why not."""
        latest = self._select_attempts(
            "subscription_id = %s AND status <> %s", [subscription_id, REJECTED],
            "ORDER BY billing_date DESC, attempt_no DESC LIMIT 1",
        )  # fmt: skip
        if not latest:
            return "it has no attempt to follow"
        a = latest[0]
        if a.status != FAILED:
            return f"its latest attempt {a.merchant_uid} is {a.status}, not failed"
        self.execute(
            self.dialect.insert_ignore(
                PUT_BACKS, ("subscription_id", "billing_date", "after_attempt_no", "created_at"),
                ("subscription_id", "billing_date", "after_attempt_no"),
            ),
            [subscription_id, _iso(a.billing_date), a.attempt_no, self.stamp()],
        )  # fmt: skip
        if subscriptions_table is not None:
            self.set_subscription_status(
                [subscription_id], ACTIVE, only_from=(PAYMENT_METHOD_REQUIRED, PAST_DUE, ACTIVE),
                subscriptions_table=subscriptions_table,
            )  # fmt: skip
        return None

    def subscription_states(
        self, subscription_ids: Sequence[str], subscriptions_table: str = SUBSCRIPTIONS
    ) -> dict[str, tuple[str, date | None]]:
        """id -> (status, next_billing_date) of these subscriptions."""
        table = checked_identifier(subscriptions_table)
        found: dict[str, tuple[str, date | None]] = {}
        for chunk in _chunks(list(dict.fromkeys(subscription_ids))):
            for sub, status, day in self.query(
                f"SELECT {self.sub_key('s')}, s.status, s.next_billing_date FROM {table} s "
                f"WHERE {self.sub_key('s')} IN ({_marks(len(chunk))})",
                chunk,
            ):
                found[str(sub)] = (str(status), to_date(day))
        return found

    def put_backs_for(self, subscription_ids: Iterable[str]) -> set[tuple[str, date, int]]:
        """(subscription, billing date, attempt) a person allowed one more attempt after."""
        found: set[tuple[str, date, int]] = set()
        for chunk in _chunks(list(dict.fromkeys(subscription_ids))):
            for sub, day, after in self.query(
                f"SELECT subscription_id, billing_date, after_attempt_no FROM {PUT_BACKS} "
                f"WHERE subscription_id IN ({_marks(len(chunk))})",
                chunk,
            ):
                found.add((str(sub), to_date(day), int(after)))  # type: ignore[arg-type]
        return found

    def latest_failed_subscriptions(
        self,
        subscriptions_table: str,
        kind: str,
        *,
        exhausted: bool = False,
        subscription_ids: Sequence[str] | None = None,
    ) -> list[str]:
        """Active subscriptions whose latest attempt on their current billing date failed
        ``kind`` (``exhausted``: with no retry date left)."""
        table = checked_identifier(subscriptions_table)
        extra = " AND a.next_retry_date IS NULL" if exhausted else ""
        rows = self._for_ids(
            f"SELECT DISTINCT a.subscription_id FROM {ATTEMPTS} a "
            f"JOIN {table} s ON {self.sub_key('s')} = a.subscription_id "
            "WHERE a.status = %s AND a.decline_kind = %s AND s.status = %s "
            f"AND {self.sub_date('s')} = a.billing_date{extra} "
            f"AND a.attempt_no = (SELECT MAX(b.attempt_no) FROM {ATTEMPTS} b "
            "WHERE b.subscription_id = a.subscription_id AND b.billing_date = a.billing_date "
            "AND b.status <> %s) "
            # A subscription a person put back after that attempt is theirs, not write-back's.
            f"AND NOT EXISTS (SELECT 1 FROM {PUT_BACKS} pb WHERE pb.subscription_id = "
            "a.subscription_id AND pb.billing_date = a.billing_date "
            "AND pb.after_attempt_no = a.attempt_no)",
            [FAILED, kind, ACTIVE, REJECTED],
            "a.subscription_id",
            subscription_ids,
        )
        return sorted({r[0] for r in rows})

    # -- reports --------------------------------------------------------------------------------

    def summary(self, where: str, params: Sequence[Any] = ()) -> dict[str, dict[str, int]]:
        """Counts and requested amounts by status for the attempts matching ``where``."""
        rows = self.query(
            f"SELECT status, COUNT(*), COALESCE(SUM(amount), 0) FROM {ATTEMPTS} "
            f"WHERE {where} GROUP BY status",
            params,
        )
        return {r[0]: {"count": int(r[1]), "amount": int(r[2] or 0)} for r in rows}

    def run_summary(self, run: Mapping[str, Any]) -> dict[str, dict[str, int]]:
        return self.summary("dag_id = %s AND run_id = %s", [run["dag_id"], run["run_id"]])

    def date_summary(self, billing_date: date) -> dict[str, dict[str, int]]:
        return self.summary("billing_date = %s", [billing_date.isoformat()])

    def unsettled_summary(self, up_to: date | None = None) -> dict[str, dict[str, int]]:
        where, params = f"status IN ({_marks(len(UNSETTLED))})", list(UNSETTLED)
        if up_to is not None:
            where += " AND billing_date <= %s"
            params.append(up_to.isoformat())
        return self.summary(where, params)

    def exhausted_summary(self, subscription_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """Soft declines with no retry left for these subscriptions (the past-due alert)."""
        totals: dict[str, dict[str, int]] = {}
        for chunk in _chunks(list(subscription_ids)):
            part = self.summary(
                f"subscription_id IN ({_marks(len(chunk))}) AND status = %s "
                "AND next_retry_date IS NULL AND decline_kind = %s",
                [*chunk, FAILED, SOFT],
            )
            for status, v in part.items():
                t = totals.setdefault(status, {"count": 0, "amount": 0})
                t["count"] += v["count"]
                t["amount"] += v["amount"]
        return totals

    def top_reasons(
        self, *, run: Mapping[str, Any] | None = None, billing_date: date | None = None,
        limit: int = 10,
    ) -> list[tuple[str, int]]:  # fmt: skip
        """Decline and rejection reasons, most frequent first, for a run or a billing date."""
        where, params = self._scope(run, billing_date)
        rows = self.query(
            f"SELECT COALESCE(fail_reason, error_message, error_code), COUNT(*) FROM {ATTEMPTS} "
            f"WHERE {where} AND status IN (%s, %s) "
            "GROUP BY COALESCE(fail_reason, error_message, error_code) "
            f"ORDER BY COUNT(*) DESC LIMIT {int(limit)}",
            [*params, FAILED, REJECTED],
        )
        return [(str(r[0]), int(r[1])) for r in rows]

    def rejected_rows(
        self, *, run: Mapping[str, Any] | None = None, billing_date: date | None = None,
        limit: int = 50,
    ) -> list[tuple[str, str, str]]:  # fmt: skip
        """(subscription_id, code, reason) of rejected rows, for a run or a billing date."""
        where, params = self._scope(run, billing_date)
        rows = self.query(
            f"SELECT subscription_id, error_code, error_message FROM {ATTEMPTS} "
            f"WHERE {where} AND status = %s ORDER BY subscription_id LIMIT {int(limit)}",
            [*params, REJECTED],
        )
        return [(r[0], r[1], r[2]) for r in rows]

    def exhausted_in_run(self, run: Mapping[str, Any]) -> list[str]:
        """Subscriptions whose soft decline with no retry left was recorded by this run."""
        rows = self.query(
            f"SELECT DISTINCT subscription_id FROM {ATTEMPTS} WHERE dag_id = %s AND run_id = %s "
            "AND status = %s AND decline_kind = %s AND next_retry_date IS NULL",
            [run["dag_id"], run["run_id"], FAILED, SOFT],
        )
        return sorted(str(r[0]) for r in rows)

    def refused_requests(
        self, run: Mapping[str, Any], limit: int = 50
    ) -> list[tuple[str, str | None, str | None]]:
        """(subscription_id, code, reason) of a run's requests the gateway refused."""
        rows = self.query(
            f"SELECT subscription_id, error_code, error_message FROM {ATTEMPTS} "
            "WHERE dag_id = %s AND run_id = %s AND status = %s AND decline_kind = %s "
            f"ORDER BY subscription_id LIMIT {int(limit)}",
            [run["dag_id"], run["run_id"], FAILED, REFUSED],
        )
        return [(r[0], r[1], r[2]) for r in rows]

    def outcome_kinds(self, billing_date: date) -> list[tuple[str, int, int]]:
        """(kind, count, amount) for a billing date, declines split hard/soft/no key."""
        counts: dict[str, list[int]] = {}
        for a in self._select_attempts("billing_date = %s", [billing_date.isoformat()]):
            if a.status == FAILED and a.error_code == MISSING_BILLING_KEY:
                kind = "no billing key"
            elif a.status == FAILED:
                kind = f"declined ({a.decline_kind})"
            else:
                kind = a.status
            entry = counts.setdefault(kind, [0, 0])
            entry[0] += 1
            entry[1] += int(a.amount or 0)
        return sorted((k, v[0], v[1]) for k, v in counts.items())

    @staticmethod
    def _scope(run: Mapping[str, Any] | None, billing_date: date | None) -> tuple[str, list]:
        if run is not None:
            return "dag_id = %s AND run_id = %s", [run["dag_id"], run["run_id"]]
        if billing_date is not None:
            return "billing_date = %s", [billing_date.isoformat()]
        return "1 = 1", []

    # -- dunning, backfills, reconciliation -----------------------------------------------------

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
        not_by_run: Mapping[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Failed attempts that may get a next attempt, with the subscription's current data.

        Only the latest attempt of a (subscription, billing date), only when nothing for that
        pair moved money or is pending/unknown, and only while the subscription still sits
        on that billing date: the ledger side of "never charge a period twice". With
        ``not_by_run``, not an attempt that run made: a cleared or retried task of a retry or
        backfill run does not try a card its first try just tried.
        """
        table = checked_identifier(subscriptions_table)
        blocking = (*MONEY_MOVED, *UNSETTLED)
        where = [
            "a.status = %s",
            f"a.decline_kind IN ({_marks(len(decline_kinds))})",
            f"s.status IN ({_marks(len(subscription_statuses))})",
            f"{self.sub_date('s')} = a.billing_date",
            "a.attempt_no < %s",
            f"a.attempt_no = (SELECT MAX(b.attempt_no) FROM {ATTEMPTS} b "
            "WHERE b.subscription_id = a.subscription_id AND b.billing_date = a.billing_date "
            "AND b.status <> %s)",
            f"NOT EXISTS (SELECT 1 FROM {ATTEMPTS} c WHERE c.subscription_id = a.subscription_id "
            f"AND c.billing_date = a.billing_date AND c.status IN ({_marks(len(blocking))}))",
        ]
        params: list[Any] = [
            FAILED, *decline_kinds, *subscription_statuses, max_attempt_no, REJECTED, *blocking,
        ]  # fmt: skip
        if not_by_run is not None:
            where.append("NOT (COALESCE(a.dag_id, '') = %s AND COALESCE(a.run_id, '') = %s)")
            params += [not_by_run["dag_id"], not_by_run["run_id"]]
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
        rows: list[dict[str, Any]] = []
        for chunk in _chunks(list(dict.fromkeys(subscription_ids))):
            rows += self._fetch_dicts(
                f"{sql} AND a.subscription_id IN ({_marks(len(chunk))}){order}",
                [*params, *chunk],
            )
        return rows

    def double_paid(self, billing_from: date) -> list[tuple[str, date, int]]:
        """(subscription, billing date, paid attempts) with more than one paid attempt."""
        rows = self.query(
            f"SELECT subscription_id, billing_date, COUNT(*) FROM {ATTEMPTS} "
            f"WHERE status IN ({_marks(len(MONEY_MOVED))}) AND billing_date >= %s "
            "GROUP BY subscription_id, billing_date HAVING COUNT(*) > 1",
            [*MONEY_MOVED, billing_from.isoformat()],
        )
        return [(r[0], to_date(r[1]), int(r[2])) for r in rows]  # type: ignore[misc]


def checked_identifier(name: str) -> str:
    """Table names cannot be bound as parameters: allow plain identifiers only."""
    if not IDENT_RE.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


def new_claim_token() -> str:
    return uuid.uuid4().hex


def lease_cutoff(seconds: float) -> datetime:
    return now() - timedelta(seconds=seconds)
