"""Task bodies of the billing DAGs: read the Airflow context, call the billing steps.

Kept out of the DAG files so that DAG files only wire, and kept thin so that the logic is
tested in ``billing_run`` and ``charging`` without Airflow.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from iamport_billing import alerts
from iamport_billing.billing_run import (
    billing_date_from_context,
    format_report,
    plan_run,
    run_info,
    run_report,
    write_back,
)
from iamport_billing.charging import ChargeSettings, resolve_unsettled
from iamport_billing.config import BillingConfig
from iamport_billing.gateways import gateway_for
from iamport_billing.policy import Guardrails
from iamport_billing.states import AMOUNT_MISMATCH
from iamport_billing.warehouse.ledger import Ledger
from iamport_billing.warehouse.source import DueSource

log = logging.getLogger(__name__)


def _opt_int(value: Any) -> int | None:
    return None if value in (None, "", "None") else int(value)


def _multiple(param: Any, default: float | None) -> float | None:
    """The run's param over the deployment's setting; 0 turns the check off for this run."""
    if param in (None, "", "None"):
        return default
    return float(param) or None


def charge_settings(cfg: BillingConfig, params: dict[str, Any] | None = None) -> ChargeSettings:
    params = params or {}
    rps = params.get("requests_per_second")
    return ChargeSettings(
        max_concurrency=int(params.get("max_concurrency") or 8),
        requests_per_second=float(rps) if rps not in (None, "", 0) else None,
        retry_schedule_days=cfg.retry_schedule_days,
        decline_table=cfg.declines,
        pending_lease_seconds=cfg.pending_lease_seconds,
        unknown_settle_seconds=cfg.unknown_settle_seconds,
    )


def reconcile_step(cfg: BillingConfig, context: dict[str, Any]) -> dict[str, int]:
    """Settle what earlier runs left pending/unknown before this run plans anything."""
    with Ledger.from_conn_id(cfg.warehouse_conn_id) as ledger:
        ledger.init_schema()
        gateway = gateway_for(cfg.iamport_conn_id)
        try:
            counts = resolve_unsettled(
                gateway, ledger, charge_settings(cfg, context.get("params")), run_info(context),
                default_name=cfg.limits.default_name,
                subscriptions_table=cfg.subscriptions_table if cfg.write_back else None,
                max_overdue_days=cfg.limits.max_overdue_days,
                today=billing_date_from_context(context),
            )  # fmt: skip
        finally:
            gateway.close()
    log.info("reconciled earlier unsettled attempts: %s", counts or "none")
    return counts


def plan_step(cfg: BillingConfig, context: dict[str, Any]) -> list[dict[str, Any]]:
    """Validate, total and batch the due rows; the batches are the charge task's map input."""
    params = context.get("params") or {}
    guardrails = Guardrails(
        max_count=_opt_int(params.get("max_count")),
        max_total_amount=_opt_int(params.get("max_total_amount")),
        max_total_multiple_of_previous=_multiple(
            params.get("max_total_multiple_of_previous"), cfg.max_total_multiple_of_previous
        ),
        max_rejected_share=(
            cfg.max_rejected_share
            if params.get("max_rejected_share") in (None, "", "None")
            else float(params["max_rejected_share"])
        ),
    )
    with Ledger.from_conn_id(cfg.warehouse_conn_id) as ledger, due_source(cfg, ledger) as source:
        ledger.init_schema()
        plan = plan_run(
            ledger,
            source=source,
            due_query=cfg.due_query,
            billing_date=billing_date_from_context(context),
            batch_size=int(params.get("batch_size") or 500),
            limits=cfg.limits,
            guardrails=guardrails,
            dry_run=bool(params.get("dry_run")),
            run=run_info(context),
        )
    context["ti"].xcom_push(key="plan", value=plan.as_xcom())
    if plan.violations and not plan.dry_run and cfg.approval_timeout_minutes == 0:
        raise AirflowFailException(
            "guardrail tripped, nothing charged (approvals are off): " + "; ".join(plan.violations)
        )
    return plan.batches


def due_source(cfg: BillingConfig, ledger: Ledger) -> DueSource:
    """The due query's connection: the ledger's own unless a separate source is set."""
    if cfg.source_conn_id in (None, cfg.warehouse_conn_id):
        return ledger.due_source()
    return DueSource.from_conn_id(cfg.source_conn_id)


def write_back_step(cfg: BillingConfig, context: dict[str, Any]) -> dict[str, int]:
    if not cfg.write_back:
        log.info("write-back is off: results are in the ledger (billing_charge_attempts)")
        return {}
    with Ledger.from_conn_id(cfg.warehouse_conn_id) as ledger:
        # Whoever moved them (this step, or a charge task writing its batch back), the
        # subscriptions whose last retry failed in this run are the ones that went past_due.
        going_past_due = ledger.exhausted_in_run(run_info(context))
        # Older periods are past the overdue limit: their rows are rejected, not charged.
        since = billing_date_from_context(context) - timedelta(days=cfg.limits.max_overdue_days + 7)
        counts = write_back(ledger, subscriptions_table=cfg.subscriptions_table, since=since)
        found = alerts.past_due_alert(
            ledger, going_past_due, cfg=cfg, run=run_info(context),
            billing_date=billing_date_from_context(context),
        )  # fmt: skip
    alerts.send(found, cfg)
    return counts


def report_step(cfg: BillingConfig, context: dict[str, Any]) -> dict[str, Any]:
    """Log the run's summary; fail (so alerts fire) on a tripped guardrail or open unknowns."""
    run = run_info(context)
    billing_date = billing_date_from_context(context)
    with Ledger.from_conn_id(cfg.warehouse_conn_id) as ledger:
        ledger.init_schema()
        report = run_report(ledger, run=run, billing_date=billing_date)
    log.info("\n%s", format_report(report))
    alerts.send(alerts.run_alerts(report, cfg=cfg, run=run), cfg)
    if report["guardrail"]:
        raise AirflowFailException(f"guardrail tripped: {report['guardrail']}")
    if AMOUNT_MISMATCH in report["by_status"]:
        raise AirflowFailException(
            f"{report['by_status'][AMOUNT_MISMATCH]['count']} charges paid with another amount "
            "than requested: see the runbook (amount mismatch)"
        )
    if report["not_charged"]:
        raise AirflowException(
            f"{report['not_charged']} charges this run's plan approved have no attempt (another "
            "run had them in flight and did not send them, or a charge task did not run): "
            "clear the charge tasks with Downstream, or let the next run charge them"
        )
    unsettled = sum(v["count"] for v in report["unsettled"].values())
    if unsettled:
        raise AirflowException(
            f"{unsettled} charge outcomes are still pending/unknown: the reconcile DAG or the "
            "next run looks them up; see the runbook"
        )
    ti = context["ti"]
    failed = ti.get_ti_count(
        dag_id=run["dag_id"],
        run_ids=[run["run_id"]],
        task_ids=sorted(ti.task.get_flat_relative_ids(upstream=True)),
        states=["failed", "upstream_failed"],
    )
    if failed:
        raise AirflowException(f"{failed} upstream task instance(s) failed in this run")
    return report
