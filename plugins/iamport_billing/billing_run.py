"""The steps of a billing run (plan, reconcile, write back, report) as plain functions.

DAG files wire these into tasks; each takes explicit arguments so it can be tested alone.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date
from typing import Any

from iamport_billing.policy import (
    ChargeCandidate,
    Guardrails,
    PlanTotals,
    RejectedRow,
    ValidationLimits,
    add_month_anchored,
    billing_date_of_run,
    guardrail_violations,
    to_date,
    validate_row,
)
from iamport_billing.states import (
    HARD,
    PAID,
    PAST_DUE,
    PAYMENT_METHOD_REQUIRED,
    SOFT,
)
from iamport_billing.warehouse.ledger import Ledger
from iamport_billing.warehouse.source import DueSource

log = logging.getLogger(__name__)
MAX_MAP_LENGTH = 1024
REJECTED_SHOWN = 50  # rejected rows named in a report/alert; the ledger has them all


def run_info(context: Mapping[str, Any]) -> dict[str, Any]:
    """Who is writing to the ledger: stored on every attempt row for the audit trail."""
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    task_id = ti.task_id if map_index is None or map_index < 0 else f"{ti.task_id}[{map_index}]"
    return {
        "dag_id": ti.dag_id,
        "run_id": ti.run_id,
        "task_id": task_id,
        "try_number": int(getattr(ti, "try_number", 1) or 1),
    }


def billing_date_from_context(context: Mapping[str, Any]) -> date:
    """Logical date in Asia/Seoul; ``run_after`` for manual runs that have no logical date."""
    dag_run = context.get("dag_run")
    return billing_date_of_run(context.get("logical_date"), getattr(dag_run, "run_after", None))


def validated(
    rows: Iterable[Mapping[str, Any]], *, run_date: date, limits: ValidationLimits
) -> Iterator[ChargeCandidate | RejectedRow]:
    """Validate rows in subscription_id order; a subscription listed twice is rejected whole."""
    group: list[Mapping[str, Any]] = []
    for row in rows:
        sub = row.get("subscription_id")
        # Compared as text, as the keyset orders them (SQLite may mix 1 and '1').
        if group and (sub is None or str(sub) != str(group[0].get("subscription_id"))):
            yield from _close_group(group, run_date, limits)
            group = []
        if sub is None:
            yield validate_row(row, run_date=run_date, limits=limits)
        else:
            group.append(row)
    if group:
        yield from _close_group(group, run_date, limits)


def at_period_amounts(
    ledger: Ledger, items: Iterable[ChargeCandidate | RejectedRow], chunk: int = 500
) -> Iterator[ChargeCandidate | RejectedRow]:
    """A period's amount is fixed by its first attempt: a due row for a billing date that was
    already attempted (a put-back after a new card, an abandoned attempt) is planned, totalled
    and charged at that amount and currency, whatever the subscription costs now."""
    buffer: list[ChargeCandidate | RejectedRow] = []

    def flush() -> Iterator[ChargeCandidate | RejectedRow]:
        candidates = [i for i in buffer if isinstance(i, ChargeCandidate)]
        firsts = (
            ledger.first_attempts((c.subscription_id, c.billing_date) for c in candidates)
            if candidates else {}
        )  # fmt: skip
        for item in buffer:
            first = (
                firsts.get((item.subscription_id, item.billing_date))
                if isinstance(item, ChargeCandidate) else None
            )  # fmt: skip
            if first is None or first.amount is None or (first.amount, first.currency) == (
                item.amount, item.currency,  # type: ignore[union-attr]
            ):  # fmt: skip
                yield item
                continue
            log.warning(
                "%s: billing date %s was first charged %s %s; asked again at that, not at "
                "today's %s", item.subscription_id, item.billing_date, f"{first.amount:,}",
                first.currency, f"{item.amount:,}",  # type: ignore[union-attr]
            )  # fmt: skip
            yield replace(item, amount=first.amount, currency=first.currency or item.currency)  # type: ignore[arg-type, union-attr]

    for item in items:
        buffer.append(item)
        if len(buffer) >= chunk:
            yield from flush()
            buffer.clear()
    yield from flush()


def _close_group(
    group: list[Mapping[str, Any]], run_date: date, limits: ValidationLimits
) -> Iterator[ChargeCandidate | RejectedRow]:
    if len(group) == 1:
        yield validate_row(group[0], run_date=run_date, limits=limits)
        return
    first = validate_row(group[0], run_date=run_date, limits=limits)
    sub = str(group[0].get("subscription_id"))
    yield RejectedRow(
        subscription_id=sub,
        customer_uid=getattr(first, "customer_uid", None),
        amount=getattr(first, "amount", None),
        billing_date=first.billing_date,
        code="duplicate_in_due_query",
        reason=f"subscription {sub!r} appears {len(group)} times in the due query",
        currency=getattr(first, "currency", None),
    )


@dataclass
class Plan:
    billing_date: str
    batches: list[dict[str, Any]]
    count: int
    total_amount: int
    rejected: list[dict[str, Any]]
    rejected_count: int
    dry_run: bool
    previous_total: int | None
    violations: list[str]
    plan_digest: str = ""

    def as_xcom(self) -> dict[str, Any]:
        """Small and free of customer data beyond ids: safe for XCom."""
        return {k: v for k, v in asdict(self).items() if k != "rejected"}


def plan_run(
    ledger: Ledger,
    *,
    due_query: str,
    billing_date: date,
    batch_size: int,
    limits: ValidationLimits,
    guardrails: Guardrails,
    dry_run: bool,
    run: Mapping[str, Any],
    source: DueSource | None = None,
    logger: logging.Logger | None = None,
) -> Plan:
    """Stream the due rows once: reject bad ones, total the rest, cut keyset batches."""
    lg = logger or log
    totals = PlanTotals()
    batches: list[dict[str, Any]] = []
    rejected_sample: list[dict[str, Any]] = []
    pending_rejects: list[RejectedRow] = []
    approved: list[tuple[str, date, int]] = []
    batch_count, batch_after, last_sub = 0, None, None

    due = (source or ledger.due_source()).iter_due(due_query, billing_date)
    for item in at_period_amounts(ledger, validated(due, run_date=billing_date, limits=limits)):
        if isinstance(item, RejectedRow):
            totals.rejected += 1
            pending_rejects.append(item)
            if len(rejected_sample) < 100:
                rejected_sample.append(
                    {
                        "subscription_id": item.subscription_id,
                        "code": item.code,
                        "reason": item.reason,
                    }
                )
            if not dry_run and len(pending_rejects) >= 500:
                ledger.record_rejected(pending_rejects, run)
                pending_rejects.clear()
            continue
        for note in item.notes:
            lg.warning("%s: %s", item.subscription_id, note)
        totals.count += 1
        totals.total_amount += item.amount
        approved.append((item.subscription_id, item.billing_date, item.amount))
        key = item.billing_date.isoformat()
        totals.by_billing_date[key] = totals.by_billing_date.get(key, 0) + 1
        last_sub = item.subscription_id
        batch_count += 1
        if batch_count >= batch_size:
            batches.append({"after": batch_after, "until": last_sub, "count": batch_count})
            batch_after, batch_count = last_sub, 0
    if batch_count:
        batches.append({"after": batch_after, "until": last_sub, "count": batch_count})
    if not dry_run and pending_rejects:
        ledger.record_rejected(pending_rejects, run)

    batches = _fit_map_length(batches)
    for b in batches:
        b["billing_date"] = billing_date.isoformat()
    previous = ledger.previous_run_total(str(run.get("dag_id")), billing_date)
    violations = guardrail_violations(totals, guardrails, previous)
    digest = plan_digest(approved)
    if not dry_run:
        # Over its guardrails too: the frozen plan is what a person approves (ledger-gated).
        ledger.freeze_plan(run, approved)
    ledger.record_run(
        run, billing_date, totals.count, totals.total_amount, totals.rejected, dry_run,
        "; ".join(violations) or None, plan_digest=digest,
    )  # fmt: skip
    plan = Plan(
        billing_date=billing_date.isoformat(),
        batches=[] if dry_run else batches,
        count=totals.count,
        total_amount=totals.total_amount,
        rejected=rejected_sample,
        rejected_count=totals.rejected,
        dry_run=dry_run,
        previous_total=previous,
        violations=violations,
        plan_digest=digest,
    )
    lg.info(
        "plan for %s: %d charges, %s KRW in %d batches; %d rejected%s",
        billing_date, totals.count, f"{totals.total_amount:,}", len(batches), totals.rejected,
        " (dry run: nothing will be charged)" if dry_run else "",
    )  # fmt: skip
    for r in rejected_sample:
        lg.warning("rejected %s: %s (%s)", r["subscription_id"], r["reason"], r["code"])
    if violations:
        lg.warning("guardrail tripped, nothing charged without a person: %s", violations)
    return plan


def plan_digest(items: Iterable[tuple[str, date, int]]) -> str:
    """sha256 of a plan's (subscription, billing date, amount) items, in a stable order."""
    lines = sorted(f"{sub}|{day.isoformat()}|{amount}" for sub, day, amount in items)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _fit_map_length(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge neighbouring keyset ranges until Airflow can map them (max_map_length)."""
    while len(batches) > MAX_MAP_LENGTH:
        merged = []
        for i in range(0, len(batches), 2):
            pair = batches[i : i + 2]
            merged.append(
                {
                    "after": pair[0]["after"],
                    "until": pair[-1]["until"],
                    "count": sum(b["count"] for b in pair),
                }
            )
        batches = merged
    return batches


def candidates_in_batch(
    ledger: Ledger,
    *,
    due_query: str,
    batch: Mapping[str, Any],
    limits: ValidationLimits,
    run: Mapping[str, Any],
    source: DueSource | None = None,
    logger: logging.Logger | None = None,
) -> list[ChargeCandidate]:
    """Re-read one keyset range and keep exactly what the run's plan approved.

    A row added since the plan, or whose amount or billing date changed, is left out (and
    logged): guardrails counted the plan, so nothing outside it may be charged.
    """
    lg = logger or log
    billing_date = to_date(batch["billing_date"])
    assert billing_date is not None
    rows = (source or ledger.due_source()).iter_due(
        due_query, billing_date, after=batch.get("after"), until=batch.get("until")
    )
    if batch.get("after") is None:
        rows = (r for r in rows if r.get("subscription_id") is not None)
    candidates = [
        c
        for c in at_period_amounts(ledger, validated(rows, run_date=billing_date, limits=limits))
        if isinstance(c, ChargeCandidate)
    ]
    approved = ledger.planned_items(run, [c.subscription_id for c in candidates])
    kept = [c for c in candidates if approved.get(c.subscription_id) == (c.billing_date, c.amount)]
    for c in candidates:
        if approved.get(c.subscription_id) != (c.billing_date, c.amount):
            lg.warning(
                "%s (%s KRW due %s) is not in this run's plan: not charged",
                c.subscription_id, f"{c.amount:,}", c.billing_date,
            )  # fmt: skip
    return kept


def write_back(
    ledger: Ledger,
    *,
    subscriptions_table: str,
    since: date | None = None,
    subscription_ids: Sequence[str] | None = None,
    logger: logging.Logger | None = None,
) -> dict[str, int]:
    """Apply settled outcomes to subscriptions; idempotent, and it catches up on older runs.

    Paid: next_billing_date moves one month on (anchor day kept). Hard declines and missing
    billing keys: ``payment_method_required``. Soft declines whose retries are exhausted:
    ``past_due``. Soft declines with a retry date stay active for the dunning run.
    """
    lg = logger or log
    moves = [
        (sub, day, add_month_anchored(day, anchor))
        for sub, day, anchor in ledger.paid_not_advanced(
            subscriptions_table, since=since, subscription_ids=subscription_ids
        )
    ]
    # A period refunded in full advances the date but does not make a stopped subscription
    # active again: only one paid (and kept) does.
    kept = ledger.paid_not_advanced(
        subscriptions_table, since=since, subscription_ids=subscription_ids, statuses=(PAID,)
    )
    ledger.advance_subscriptions(moves, subscriptions_table, reactivate={sub for sub, _, _ in kept})
    hard = ledger.latest_failed_subscriptions(
        subscriptions_table, HARD, subscription_ids=subscription_ids
    )
    ledger.set_subscription_status(
        hard, PAYMENT_METHOD_REQUIRED, subscriptions_table=subscriptions_table
    )
    exhausted = ledger.latest_failed_subscriptions(
        subscriptions_table, SOFT, exhausted=True, subscription_ids=subscription_ids
    )
    ledger.set_subscription_status(exhausted, PAST_DUE, subscriptions_table=subscriptions_table)
    counts = {
        "advanced": len(moves),
        "payment_method_required": len(hard),
        "past_due": len(exhausted),
    }
    lg.info("write-back: %s", counts)
    return counts


def run_report(ledger: Ledger, *, run: Mapping[str, Any], billing_date: date) -> dict[str, Any]:
    """Counts and amounts by status for this run, and what is still unsettled. ``guardrail``
    is set while the plan is held: over its guardrails and not approved by a person."""
    recorded = ledger.run_record(run)
    return {
        "billing_date": billing_date.isoformat(),
        "by_status": ledger.run_summary(run),
        "unsettled": ledger.unsettled_summary(billing_date),
        "top_reasons": [{"reason": r, "count": n} for r, n in ledger.top_reasons(run=run)],
        "rejected": [
            {"subscription_id": s, "code": c, "reason": r}
            for s, c, r in ledger.rejected_rows(run=run, limit=REJECTED_SHOWN)
        ],
        "refused": [
            {"subscription_id": s, "code": c, "reason": r}
            for s, c, r in ledger.refused_requests(run, limit=REJECTED_SHOWN)
        ],
        "not_charged": ledger.planned_without_attempt(run),
        "guardrail": recorded.guardrail if recorded and recorded.held else None,
        "approval": recorded.approval if recorded else None,
        "approved_by": recorded.approved_by if recorded else None,
        "dry_run": recorded.dry_run if recorded else False,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """A human summary for the task log and the demo."""
    lines = [f"Billing run for {report['billing_date']}"]
    if report.get("dry_run"):
        lines.append("  DRY RUN: nothing was charged")
    if report.get("guardrail"):
        held = "rejected" if report.get("approval") == "rejected" else "not approved"
        lines.append(f"  GUARDRAIL TRIPPED ({held}): {report['guardrail']}")
    elif report.get("approval"):
        lines.append(f"  over its guardrails, {report['approval']} by {report['approved_by']}")
    lines.append(f"  {'outcome':<12} {'count':>8} {'amount (KRW)':>16}")
    for status, v in sorted(report["by_status"].items()):
        lines.append(f"  {status:<12} {v['count']:>8,} {v['amount']:>16,}")
    if not report["by_status"]:
        lines.append("  (no attempts recorded by this run)")
    unsettled = sum(v["count"] for v in report["unsettled"].values())
    lines.append(f"  unsettled (pending/unknown) up to this date: {unsettled}")
    if report.get("not_charged"):
        lines.append(f"  approved by the plan but never attempted: {report['not_charged']}")
    if report["top_reasons"]:
        lines.append("  top decline / rejection reasons:")
        lines.extend(f"    {r['count']:>6}  {r['reason']}" for r in report["top_reasons"])
    return "\n".join(lines)
