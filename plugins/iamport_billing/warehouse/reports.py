"""Read-side queries of the Billing page, over the same Ledger the DAGs write.

Everything is aggregated in SQL (GROUP BY, LIMIT/OFFSET) so a page costs a few small queries
however many attempts the ledger holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import date
from statistics import median
from typing import Any

from iamport_billing.policy import SEOUL, to_date, to_timestamp
from iamport_billing.states import (
    AMOUNT_MISMATCH,
    CANCELLED,
    FAILED,
    HARD,
    MISSING_BILLING_KEY,
    MONEY_MOVED,
    PAID,
    REJECTED,
    SOFT,
    UNSETTLED,
)
from iamport_billing.warehouse.ledger import (
    ATTEMPT_COLUMNS,
    ATTEMPTS,
    RUNS,
    SUBSCRIPTIONS,
    Attempt,
    Ledger,
    checked_identifier,
)

NOT_MISSING_KEY = "(error_code IS NULL OR error_code <> %s)"
# CustomerFigures' counts in the order customer_figures selects them.
FIGURE_COLUMNS = (
    "customers", "paid_first", "failed_first", "failed_first_krw", "recovered", "recovered_krw",
    "in_dunning", "lost", "lost_krw", "no_billing_key", "no_billing_key_krw", "unsettled",
)  # fmt: skip
FILTER_FIELDS = ("status", "billing_date", "customer_uid", "merchant_uid", "dag_id", "run_id")
# The columns write-back relies on, so they exist in a custom subscriptions table too.
SUBSCRIPTION_COLUMNS = ("subscription_id", "status", "next_billing_date", "billing_anchor_day")


def decline_rate(paid: int, failed: int) -> float | None:
    """Declined share of the charges that reached a decision (rejected rows never did)."""
    decided = paid + failed
    return failed / decided if decided else None


@dataclass
class Outcomes:
    """Counts and amounts by ledger status."""

    by_status: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, *statuses: str) -> int:
        return sum(self.by_status.get(s, {}).get("count", 0) for s in statuses)

    def amount(self, *statuses: str) -> int:
        return sum(self.by_status.get(s, {}).get("amount", 0) for s in statuses)

    @property
    def collected(self) -> int:
        """KRW the gateway took: paid periods, refunded ones too (before the refund), and
        those paid with another amount (what was taken, not what was asked)."""
        return sum(
            self.by_status.get(s, {}).get("taken", 0) for s in (PAID, CANCELLED, AMOUNT_MISMATCH)
        )

    @property
    def refunded(self) -> int:
        """KRW given back, in full or in part."""
        return sum(v.get("refunded", 0) for v in self.by_status.values())

    @property
    def net(self) -> int:
        return self.collected - self.refunded

    @property
    def decline_rate(self) -> float | None:
        return decline_rate(self.count(PAID), self.count(FAILED))

    @property
    def unsettled(self) -> int:
        return self.count(*UNSETTLED)


@dataclass
class CustomerFigures:
    """A billing date counted per customer (a subscription's period), not per attempt.

    Every period charged at all (rejected rows aside) lands in exactly one of: paid on the
    first attempt, recovered (paid on a later one), in dunning (a retry is scheduled), lost
    (declined with no retry left: involuntary churn), no billing key, unknown/pending, or
    other (refused requests and closed periods, for a person to read on the attempts view).
    """

    customers: int = 0
    paid_first: int = 0
    failed_first: int = 0  # the first attempt failed, for any reason: recovery's base
    failed_first_krw: int = 0
    recovered: int = 0
    recovered_krw: int = 0
    in_dunning: int = 0
    lost: int = 0
    lost_krw: int = 0
    no_billing_key: int = 0
    no_billing_key_krw: int = 0
    unsettled: int = 0
    days_to_recover: list[int] = field(default_factory=list)

    @property
    def other(self) -> int:
        placed = (
            self.paid_first + self.recovered + self.in_dunning + self.lost
            + self.no_billing_key + self.unsettled
        )  # fmt: skip
        return self.customers - placed

    @property
    def first_attempt_success(self) -> float | None:
        return self.paid_first / self.customers if self.customers else None

    @property
    def recovery_rate(self) -> float | None:
        return self.recovered / self.failed_first if self.failed_first else None

    @property
    def recovery_rate_krw(self) -> float | None:
        return self.recovered_krw / self.failed_first_krw if self.failed_first_krw else None

    @property
    def median_days_to_recover(self) -> float | None:
        return median(self.days_to_recover) if self.days_to_recover else None

    @property
    def churned(self) -> int:
        """Involuntary churn: periods that ended unpaid, declined or without a card."""
        return self.lost + self.no_billing_key

    @property
    def churn_rate(self) -> float | None:
        return self.churned / self.customers if self.customers else None

    def __add__(self, other: CustomerFigures) -> CustomerFigures:
        summed = {
            f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)
        }  # fmt: skip
        return CustomerFigures(**summed)


@dataclass(frozen=True)
class RunPlan:
    """What a run's plan step recorded (billing_runs)."""

    billing_date: date
    planned_count: int
    planned_total: int
    rejected_count: int
    dry_run: bool
    guardrail: str | None


@dataclass
class RunRow:
    """One DAG run: its plan (None if it planned nothing, e.g. a reconcile run) and outcomes."""

    dag_id: str
    run_id: str
    plan: RunPlan | None
    outcomes: Outcomes


@dataclass
class DateRow:
    """One billing date: outcomes of every attempt for it, and the runs that worked on it."""

    billing_date: date
    outcomes: Outcomes
    customers: CustomerFigures
    runs: list[RunRow]
    top_reasons: list[tuple[str, int]]


@dataclass(frozen=True)
class AttemptFilter:
    status: str | None = None
    billing_date: str | None = None
    customer_uid: str | None = None
    merchant_uid: str | None = None
    dag_id: str | None = None
    run_id: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses, params = ["1 = 1"], []
        for name in FILTER_FIELDS:
            value = getattr(self, name)
            if value:
                clauses.append(f"{name} = %s")
                params.append(value)
        return " AND ".join(clauses), params

    def as_params(self) -> dict[str, str]:
        return {k: v for k in FILTER_FIELDS if (v := getattr(self, k))}


@dataclass
class AttemptPage:
    attempts: list[Attempt]
    total: int
    page: int
    page_size: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))


def _in(values: Sequence[str]) -> str:
    return "(" + ", ".join(["%s"] * len(values)) + ")"


def _chunks(values: Sequence[str], size: int = 500) -> list[list[str]]:
    return [list(values[i : i + size]) for i in range(0, len(values), size)]


class BillingQueries:
    def __init__(self, ledger: Ledger, subscriptions_table: str = SUBSCRIPTIONS):
        self.ledger = ledger
        self.subscriptions_table = checked_identifier(subscriptions_table)

    def _outcomes(self, where: str, params: Sequence[Any]) -> Outcomes:
        return Outcomes(self.ledger.summary(where, params))

    def billing_dates(self, limit: int = 30) -> list[date]:
        """The latest billing dates that have attempts, newest first."""
        rows = self.ledger.query(
            f"SELECT DISTINCT billing_date FROM {ATTEMPTS} ORDER BY billing_date DESC "
            f"LIMIT {int(limit)}"
        )
        return [d for r in rows if (d := to_date(r[0])) is not None]

    def outcomes_by_date(self, dates: Sequence[date]) -> dict[date, Outcomes]:
        if not dates:
            return {}
        marks = ", ".join(["%s"] * len(dates))
        rows = self.ledger.query(
            f"SELECT billing_date, status, COUNT(*), COALESCE(SUM(amount), 0), "
            "COALESCE(SUM(COALESCE(paid_amount, amount)), 0), "
            f"COALESCE(SUM(cancel_amount), 0) FROM {ATTEMPTS} "
            f"WHERE billing_date IN ({marks}) GROUP BY billing_date, status",
            [d.isoformat() for d in dates],
        )
        found: dict[date, Outcomes] = {d: Outcomes() for d in dates}
        for day, status, count, amount, taken, refunded in rows:
            found[to_date(day)].by_status[status] = {
                "count": int(count), "amount": int(amount), "taken": int(taken),
                "refunded": int(refunded),
            }  # fmt: skip
        return found

    def customer_figures(self, dates: Sequence[date]) -> dict[date, CustomerFigures]:
        """Per billing date, its periods by how they ended (see CustomerFigures).

        The inner query folds each period's attempts into flags; a period's end is read from
        its latest attempt (the highest attempt_no) through the attempt_no each flag saw last.
        """
        if not dates:
            return {}
        iso = [d.isoformat() for d in dates]
        marks = ", ".join(["%s"] * len(iso))
        moved, open_ = _in(MONEY_MOVED), _in(UNSETTLED)
        declined = "status = %s AND decline_kind IN (%s, %s) AND " + NOT_MISSING_KEY
        period = (
            "SELECT billing_date, MAX(attempt_no) AS last_no, "
            f"MAX(CASE WHEN status IN {moved} THEN 1 ELSE 0 END) AS moved, "
            f"MAX(CASE WHEN status IN {moved} THEN COALESCE(paid_amount, amount) ELSE 0 END) "
            "AS taken, MAX(amount) AS asked, "
            f"MAX(CASE WHEN attempt_no = 1 AND status IN {moved} THEN 1 ELSE 0 END) "
            "AS first_paid, "
            "MAX(CASE WHEN attempt_no = 1 AND status = %s THEN 1 ELSE 0 END) AS first_failed, "
            f"MAX(CASE WHEN status IN {open_} THEN 1 ELSE 0 END) AS unsettled, "
            "MAX(CASE WHEN status = %s AND next_retry_date IS NOT NULL THEN attempt_no "
            "ELSE 0 END) AS retry_no, "
            f"MAX(CASE WHEN {declined} AND next_retry_date IS NULL THEN attempt_no ELSE 0 END) "
            "AS lost_no, "
            "MAX(CASE WHEN status = %s AND error_code = %s THEN attempt_no ELSE 0 END) "
            f"AS no_key_no FROM {ATTEMPTS} WHERE billing_date IN ({marks}) AND status <> %s "
            "GROUP BY billing_date, subscription_id"
        )
        params = [
            *MONEY_MOVED, *MONEY_MOVED, *MONEY_MOVED, FAILED, *UNSETTLED, FAILED,
            FAILED, HARD, SOFT, MISSING_BILLING_KEY, FAILED, MISSING_BILLING_KEY, *iso, REJECTED,
        ]  # fmt: skip
        unpaid = "p.moved = 0 AND p.unsettled = 0"
        rows = self.ledger.query(
            "SELECT p.billing_date, COUNT(*), SUM(p.first_paid), SUM(p.first_failed), "
            "SUM(CASE WHEN p.first_failed = 1 THEN p.asked ELSE 0 END), "
            "SUM(CASE WHEN p.moved = 1 AND p.first_paid = 0 THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN p.moved = 1 AND p.first_paid = 0 THEN p.taken ELSE 0 END), "
            f"SUM(CASE WHEN {unpaid} AND p.retry_no = p.last_no THEN 1 ELSE 0 END), "
            f"SUM(CASE WHEN {unpaid} AND p.lost_no = p.last_no THEN 1 ELSE 0 END), "
            f"SUM(CASE WHEN {unpaid} AND p.lost_no = p.last_no THEN p.asked ELSE 0 END), "
            f"SUM(CASE WHEN {unpaid} AND p.no_key_no = p.last_no THEN 1 ELSE 0 END), "
            f"SUM(CASE WHEN {unpaid} AND p.no_key_no = p.last_no THEN p.asked ELSE 0 END), "
            f"SUM(p.unsettled) FROM ({period}) p GROUP BY p.billing_date",
            params,
        )
        found = {d: CustomerFigures() for d in dates}
        for day, *counts in rows:
            found[to_date(day)] = CustomerFigures(
                **{n: int(v or 0) for n, v in zip(FIGURE_COLUMNS, counts, strict=True)}
            )
        for day, completed_at in self._recoveries(iso):
            paid_on = to_timestamp(completed_at)
            if paid_on is not None:
                billing_date = to_date(day)
                days = (paid_on.astimezone(SEOUL).date() - billing_date).days
                found[billing_date].days_to_recover.append(days)
        return found

    def _recoveries(self, iso_dates: Sequence[str]) -> list[tuple[Any, Any]]:
        """(billing date, when paid) of each period paid after its first attempt failed."""
        marks = ", ".join(["%s"] * len(iso_dates))
        return self.ledger.query(
            f"SELECT a.billing_date, a.completed_at FROM {ATTEMPTS} a "
            f"WHERE a.billing_date IN ({marks}) AND a.attempt_no > 1 "
            f"AND a.status IN {_in(MONEY_MOVED)} AND EXISTS (SELECT 1 FROM {ATTEMPTS} f "
            "WHERE f.subscription_id = a.subscription_id AND f.billing_date = a.billing_date "
            "AND f.attempt_no = 1 AND f.status = %s)",
            [*iso_dates, *MONEY_MOVED, FAILED],
        )

    def runs_for(self, dates: Sequence[date]) -> dict[date, list[RunRow]]:
        """Per billing date: the runs that planned it or wrote attempts for it.

        A run's own billing date (billing_runs) can differ from its attempts' dates: a row due
        earlier is charged under its own date's merchant_uid. Both kinds are listed.
        """
        if not dates:
            return {}
        iso = [d.isoformat() for d in dates]
        marks = ", ".join(["%s"] * len(iso))
        pairs = self.ledger.query(
            f"SELECT DISTINCT billing_date, dag_id, run_id FROM {ATTEMPTS} "
            f"WHERE billing_date IN ({marks}) AND run_id IS NOT NULL "
            f"UNION SELECT billing_date, dag_id, run_id FROM {RUNS} "
            f"WHERE billing_date IN ({marks})",
            [*iso, *iso],
        )
        run_ids = sorted({r[2] for r in pairs})
        plans, outcomes = self._plans(run_ids), self._outcomes_by_run(run_ids)
        found: dict[date, list[RunRow]] = {d: [] for d in dates}
        for day, dag_id, run_id in sorted(pairs, key=lambda r: str(r[2]), reverse=True):
            plan = plans.get((dag_id, run_id))
            found[to_date(day)].append(
                RunRow(dag_id, run_id, plan, outcomes.get((dag_id, run_id), Outcomes()))
            )
        return found

    def _plans(self, run_ids: Sequence[str]) -> dict[tuple[str, str], RunPlan]:
        found: dict[tuple[str, str], RunPlan] = {}
        for chunk in _chunks(run_ids):
            for r in self.ledger.query(
                f"SELECT dag_id, run_id, billing_date, planned_count, planned_total, "
                f"rejected_count, dry_run, guardrail FROM {RUNS} "
                f"WHERE run_id IN ({', '.join(['%s'] * len(chunk))})",
                chunk,
            ):
                found[(r[0], r[1])] = RunPlan(
                    to_date(r[2]), int(r[3]), int(r[4]), int(r[5]), bool(r[6]), r[7]
                )
        return found

    def _outcomes_by_run(self, run_ids: Sequence[str]) -> dict[tuple[str, str], Outcomes]:
        found: dict[tuple[str, str], Outcomes] = {}
        for chunk in _chunks(run_ids):
            for dag_id, run_id, status, count, amount in self.ledger.query(
                f"SELECT dag_id, run_id, status, COUNT(*), COALESCE(SUM(amount), 0) "
                f"FROM {ATTEMPTS} WHERE run_id IN ({', '.join(['%s'] * len(chunk))}) "
                "GROUP BY dag_id, run_id, status",
                chunk,
            ):
                entry = found.setdefault((dag_id, run_id), Outcomes())
                entry.by_status[status] = {"count": int(count), "amount": int(amount)}
        return found

    def date_rows(self, limit: int = 30) -> list[DateRow]:
        """The overview table: the latest billing dates, newest first."""
        dates = self.billing_dates(limit)
        outcomes = self.outcomes_by_date(dates)
        customers = self.customer_figures(dates)
        runs = self.runs_for(dates)
        return [
            DateRow(
                billing_date=d,
                outcomes=outcomes[d],
                customers=customers[d],
                runs=runs[d],
                top_reasons=self.ledger.top_reasons(billing_date=d, limit=3),
            )
            for d in dates
        ]

    def unsettled(self) -> Outcomes:
        """Attempts still pending/unknown, of any date: each needs a lookup before anything else."""
        return self._outcomes(f"status IN ({', '.join(['%s'] * len(UNSETTLED))})", UNSETTLED)

    def attempts(self, filters: AttemptFilter, page: int = 1, page_size: int = 50) -> AttemptPage:
        where, params = filters.where()
        (total,) = self.ledger.query(f"SELECT COUNT(*) FROM {ATTEMPTS} WHERE {where}", params)[0]
        page = max(1, page)
        rows = self.ledger.query(
            f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM {ATTEMPTS} WHERE {where} "
            "ORDER BY billing_date DESC, requested_at DESC, merchant_uid "
            f"LIMIT {int(page_size)} OFFSET {int((page - 1) * page_size)}",
            params,
        )
        return AttemptPage([Attempt.from_row(r) for r in rows], int(total), page, page_size)

    def subscription(self, subscription_id: str) -> tuple[dict[str, Any] | None, list[Attempt]]:
        """The subscription row (None if the warehouse has none) and every attempt, newest first."""
        found = self.ledger.query(
            f"SELECT {', '.join(SUBSCRIPTION_COLUMNS)} FROM {self.subscriptions_table} "
            "WHERE subscription_id = %s",
            [subscription_id],
        )
        row = dict(zip(SUBSCRIPTION_COLUMNS, found[0], strict=True)) if found else None
        attempts = self.ledger.query(
            f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM {ATTEMPTS} WHERE subscription_id = %s "
            "ORDER BY billing_date DESC, attempt_no DESC",
            [subscription_id],
        )
        return row, [Attempt.from_row(r) for r in attempts]
