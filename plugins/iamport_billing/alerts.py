"""Which alerts fire, and when: run results in, ``Alert`` objects out, sent to every channel.

The rules: a task failing after its retries; a guardrail tripping; a decline rate over the
threshold; outcomes still unknown after reconciliation (and mismatches that need a person);
rejected input rows; subscriptions going ``past_due``; billing keys missing before charge day;
and the daily run not done by its deadline (Airflow ``DeadlineAlert``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import date, datetime, time, timedelta
from typing import Any

from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

from iamport_billing.config import BillingConfig
from iamport_billing.notifiers import (
    CHANNELS,
    CRITICAL,
    WARNING,
    Alert,
    AlertNotifier,
    alert_from_context,
    run_url,
)
from iamport_billing.states import AMOUNT_MISMATCH, FAILED, PAID, REJECTED
from iamport_billing.warehouse.ledger import Ledger

log = logging.getLogger(__name__)


def channels(cfg: BillingConfig) -> list[AlertNotifier]:
    """One notifier per configured connection id."""
    conn_ids = {
        "slack": cfg.alert_slack_conn_id,
        "email": cfg.alert_email_conn_id,
        "webhook": cfg.alert_webhook_conn_id,
    }
    return [
        CHANNELS[kind](conn_id, base_url=cfg.airflow_base_url)
        for kind, conn_id in conn_ids.items()
        if conn_id
    ]


def send(alerts: Iterable[Alert], cfg: BillingConfig, logger: logging.Logger | None = None) -> int:
    """Log every alert and deliver it to every channel; a broken channel never stops the rest.

    Returns how many deliveries succeeded.
    """
    lg = logger or log
    notifiers = channels(cfg)
    delivered = 0
    for alert in alerts:
        lg.warning("ALERT %s\n%s", alert.kind, alert.text())
        for notifier in notifiers:
            try:
                notifier.deliver(alert)
                delivered += 1
            except Exception as e:  # noqa: BLE001 - one channel down must not hide the alert
                lg.error("alert %s not delivered via %s: %s", alert.kind, notifier.conn_id, e)
    return delivered


def alert_fields(
    cfg: BillingConfig, run: Mapping[str, Any], billing_date: date | str | None
) -> dict:
    dag_id, run_id = run.get("dag_id"), run.get("run_id")
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "billing_date": str(billing_date) if billing_date else None,
        "run_url": run_url(cfg.airflow_base_url, dag_id, run_id),
    }


def _split(by_status: Mapping[str, Mapping[str, int]], keys: Sequence[str]) -> tuple[dict, dict]:
    counts = {k: by_status[k]["count"] for k in keys if k in by_status}
    amounts = {k: by_status[k]["amount"] for k in keys if k in by_status}
    return counts, amounts


def run_alerts(
    report: Mapping[str, Any], *, cfg: BillingConfig, run: Mapping[str, Any]
) -> list[Alert]:
    """Alerts from a charge run's report (``billing_run.run_report``)."""
    base = alert_fields(cfg, run, report.get("billing_date"))
    by_status = report.get("by_status") or {}
    reasons = tuple(f"{r['count']} x {r['reason']}" for r in report.get("top_reasons") or [])
    found: list[Alert] = []
    if report.get("guardrail"):
        counts, amounts = _split(by_status, [REJECTED])
        alert = guardrail_alert(report["guardrail"], cfg=cfg, run=run,
                                billing_date=report.get("billing_date"))  # fmt: skip
        decided = report.get("approval") and report.get("approved_by")
        found.append(replace(
            alert, counts=counts, amounts=amounts,
            details=alert.details + ((f"{report['approval']} by {decided}",) if decided else ()),
        ))  # fmt: skip
    counts, amounts = _split(by_status, [PAID, FAILED])
    tried = counts.get(PAID, 0) + counts.get(FAILED, 0)
    failed = counts.get(FAILED, 0)
    if tried >= cfg.alert_decline_min_attempts and failed / max(tried, 1) > cfg.alert_decline_rate:
        found.append(Alert(
            kind="decline_rate", severity=WARNING, counts=counts, amounts=amounts,
            title=f"decline rate {failed / tried:.0%} is over {cfg.alert_decline_rate:.0%}",
            details=reasons, **base,
        ))  # fmt: skip
    if report.get("refused"):
        refused = report["refused"]
        found.append(Alert(
            kind="refused_requests", severity=WARNING,
            counts={"refused": len(refused)},
            title=f"the gateway refused {len(refused)} charge requests (not card declines; "
            "never retried): fix the data or the request",
            details=tuple(f"{r['subscription_id']}: {r['reason']} (code {r['code']})"
                          for r in refused),
            **base,
        ))  # fmt: skip
    if AMOUNT_MISMATCH in by_status:
        counts, amounts = _split(by_status, [AMOUNT_MISMATCH])
        found.append(Alert(
            kind="amount_mismatch", severity=CRITICAL, counts=counts, amounts=amounts,
            title=f"{counts[AMOUNT_MISMATCH]} charges were paid with another amount than asked: "
            "a person must check them (the subscriptions were not advanced)",
            details=reasons, **base,
        ))  # fmt: skip
    if REJECTED in by_status:
        counts, amounts = _split(by_status, [REJECTED])
        named = tuple(
            f"{r['subscription_id'] or '(no subscription_id)'}: {r['reason']} ({r['code']})"
            for r in report.get("rejected") or []
        )
        more = counts[REJECTED] - len(named)
        found.append(Alert(
            kind="rejected_rows", severity=WARNING, counts=counts, amounts=amounts,
            title=f"{counts[REJECTED]} due rows rejected before any charge (bad input)",
            details=named + ((f"... and {more} more in the ledger",) if more > 0 else ()),
            **base,
        ))  # fmt: skip
    return found


def guardrail_alert(
    violations: str, *, cfg: BillingConfig, run: Mapping[str, Any], billing_date: Any
) -> Alert:
    """A plan broke a limit (count, total, multiple of the last run): nothing was charged."""
    return Alert(
        kind="guardrail", severity=CRITICAL, title="guardrail tripped: nothing was charged",
        details=(violations,), **alert_fields(cfg, run, billing_date),
    )  # fmt: skip


def past_due_alert(
    ledger: Ledger, subscription_ids: Sequence[str], *, cfg: BillingConfig,
    run: Mapping[str, Any], billing_date: date | None,
) -> list[Alert]:  # fmt: skip
    """Subscriptions that just went ``past_due``: retries are over, the money is still owed."""
    if not subscription_ids:
        return []
    owed = ledger.exhausted_summary(subscription_ids).get(FAILED, {"count": 0, "amount": 0})
    shown = ", ".join(subscription_ids[:20]) + (" ..." if len(subscription_ids) > 20 else "")
    return [Alert(
        kind="past_due", severity=WARNING,
        title=f"{len(subscription_ids)} subscriptions went past_due after their last retry",
        counts={"past_due": len(subscription_ids)}, amounts={"past_due": owed["amount"]},
        details=(f"subscriptions: {shown}",), **alert_fields(cfg, run, billing_date),
    )]  # fmt: skip


def reconcile_alerts(report: Any, *, cfg: BillingConfig, run: Mapping[str, Any]) -> list[Alert]:
    """Unknown outcomes left after reconciliation, and mismatches only a person can settle."""
    base = alert_fields(cfg, run, None)
    found: list[Alert] = []
    if report.unsettled_count:
        counts, amounts = _split(report.still_unsettled, list(report.still_unsettled))
        found.append(Alert(
            kind="unknown_outcomes", severity=CRITICAL, counts=counts, amounts=amounts,
            title=f"{report.unsettled_count} charge outcomes still unknown after reconciliation",
            details=("Iamport could not be asked, or has no record yet: see the runbook",),
            **base,
        ))  # fmt: skip
    if report.needs_person:
        found.append(Alert(
            kind="needs_person", severity=CRITICAL,
            title=f"{len(report.needs_person)} ledger/Iamport mismatches need a person",
            counts={"needs_person": len(report.needs_person), "fixed": len(report.fixed)},
            amounts={"needs_person": sum(int(i.get("iamport_amount") or 0)
                                         for i in report.needs_person)},
            details=tuple(_describe(i) for i in report.needs_person[:20]), **base,
        ))  # fmt: skip
    return found


def _describe(item: Mapping[str, Any]) -> str:
    who = item.get("merchant_uid") or f"{item.get('subscription_id')} {item.get('billing_date')}"
    extra = ""
    if "ledger_status" in item:
        extra = (
            f" (ledger {item['ledger_status']} {item['ledger_amount']}, "
            f"Iamport {item['iamport_status']} {item['iamport_amount']})"
        )
    return f"{who}: {item['problem']}{extra}"


def precheck_alert(
    report: Mapping[str, Any], *, cfg: BillingConfig, run: Mapping[str, Any]
) -> list[Alert]:
    """Customers without a billing key the day before their billing date."""
    if not report.get("missing"):
        return []
    subs = report.get("missing_subscriptions") or []
    return [Alert(
        kind="billing_keys_missing", severity=WARNING,
        title=f"{report['missing']} subscriptions have no billing key before charge day",
        counts={"checked": report["checked"], "payment_method_required": report["missing"]},
        details=("marked payment_method_required: " + ", ".join(subs[:20]),),
        **alert_fields(cfg, run, report.get("billing_date")),
    )]  # fmt: skip


class TaskFailureAlert:
    """``on_failure_callback``: a task failed after its last retry. Adds the run's ledger
    counts and amounts when the warehouse answers."""

    def __init__(self, cfg: BillingConfig):
        self.cfg = cfg

    def __call__(self, context: Mapping[str, Any]) -> None:
        alert = alert_from_context(context, self.cfg.airflow_base_url)
        try:
            with Ledger.from_conn_id(self.cfg.warehouse_conn_id) as ledger:
                by_status = ledger.run_summary({"dag_id": alert.dag_id, "run_id": alert.run_id})
            counts, amounts = _split(by_status, list(by_status))
            alert = replace(alert, counts={**alert.counts, **counts}, amounts=amounts)
        except Exception as e:  # noqa: BLE001 - the alert matters more than its numbers
            log.warning("no ledger numbers for the failure alert: %s", e)
        send([alert], self.cfg)


def deadline_alerts(cfg: BillingConfig, *, starts_at: time) -> list[DeadlineAlert]:
    """One DeadlineAlert per channel: the run must be done by ``cfg.daily_deadline`` (KST).

    Measured from the run's logical date (the 10:00 KST tick), so the deadline is a time of
    day. Backfill runs of old dates pass it at once; the notifiers skip those
    (``notifiers.deadline_applies``). ``none`` as ``daily_deadline`` turns it off.
    (DAGRUN_QUEUED_AT would suit backfills better, but Airflow 3.3.2 crashes clearing a run
    that has one: ``_recalculate_dagrun_queued_at_deadlines`` reads the interval as seconds.)
    """
    if cfg.daily_deadline.lower() == "none":
        return []
    hour, minute = (int(x) for x in cfg.daily_deadline.split(":"))
    span = datetime.combine(date.min, time(hour, minute)) - datetime.combine(date.min, starts_at)
    if span <= timedelta(0):
        span += timedelta(days=1)
    return [
        DeadlineAlert(
            reference=DeadlineReference.DAGRUN_LOGICAL_DATE,
            interval=span,
            callback=AsyncCallback(
                f"{type(n).__module__}.{type(n).__qualname__}",
                kwargs={"conn_id": n.conn_id, "base_url": cfg.airflow_base_url},
            ),
        )
        for n in channels(cfg)
    ]
