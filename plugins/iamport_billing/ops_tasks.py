"""Task bodies of the operations DAGs (retry, backfill, reconcile, pre-check).

Like ``tasks``: read the Airflow context, call the logic in its module, send the alerts.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from iamport_billing import alerts
from iamport_billing.backfill import BackfillRefused, BackfillRequest, run_backfill
from iamport_billing.billing_run import billing_date_from_context, run_info
from iamport_billing.config import BillingConfig
from iamport_billing.dunning import describe, due_retries, send_retries
from iamport_billing.gateways import gateway_for
from iamport_billing.precheck import check_billing_keys
from iamport_billing.reconciliation import reconcile
from iamport_billing.tasks import charge_settings, due_source
from iamport_billing.warehouse.ledger import Ledger

log = logging.getLogger(__name__)


def retry_step(cfg: BillingConfig, context: dict[str, Any]) -> dict[str, Any]:
    """Send the soft-declined attempts whose retry date has come (the dunning run)."""
    params = context.get("params") or {}
    run_date = billing_date_from_context(context)
    with Ledger.from_conn_id(cfg.warehouse_conn_id) as ledger:
        ledger.init_schema()
        plan = due_retries(
            ledger, run_date=run_date, max_attempts=cfg.max_attempts, limits=cfg.limits,
            subscriptions_table=cfg.subscriptions_table, run=run_info(context),
        )  # fmt: skip
        log.info("\n%s", describe(plan, heading=f"retries due by {run_date}"))
        if params.get("dry_run"):
            return {"dry_run": True, "count": len(plan.planned), "total_amount": plan.total_amount}
        settings = charge_settings(cfg, params)
        gateway = gateway_for(cfg.iamport_conn_id, pool_maxsize=settings.max_concurrency)
        try:
            result = send_retries(gateway, ledger, plan, settings, run_info(context))
        finally:
            gateway.close()
    return fail_on_unsettled(result)


def backfill_step(cfg: BillingConfig, context: dict[str, Any]) -> dict[str, Any]:
    """Re-charge failed charges of the requested billing dates (dry run by default)."""
    run = run_info(context)
    today = billing_date_from_context(context)
    try:
        request = BackfillRequest.from_params(context.get("params") or {}, today=today)
    except BackfillRefused as e:
        raise AirflowFailException(str(e)) from None
    settings = charge_settings(cfg, context.get("params"))
    gateway = gateway_for(cfg.iamport_conn_id, pool_maxsize=settings.max_concurrency)
    try:
        with Ledger.from_conn_id(cfg.warehouse_conn_id) as ledger:
            ledger.init_schema()
            result = run_backfill(
                gateway, ledger, request, run_date=today, limits=cfg.limits, settings=settings,
                subscriptions_table=cfg.subscriptions_table, run=run,
            )  # fmt: skip
    except BackfillRefused as e:
        alert = alerts.guardrail_alert(str(e), cfg=cfg, run=run, billing_date=request.from_date)
        alerts.send([alert], cfg)
        raise AirflowFailException(str(e)) from None
    finally:
        gateway.close()
    return fail_on_unsettled(result)


def fail_on_unsettled(result: dict[str, Any]) -> dict[str, Any]:
    """A charging task that left outcomes unsettled fails (and alerts), as the daily's does."""
    unsettled = result.get("unsettled") or {}
    if unsettled.get("count"):
        raise AirflowException(
            f"{unsettled['count']} charge outcomes still unknown (e.g. {unsettled['sample']}); "
            "the reconcile DAG or the next run looks them up first"
        )
    return result


def reconcile_step(cfg: BillingConfig, context: dict[str, Any]) -> dict[str, Any]:
    """Hourly: settle unknowns, record missing payments, fix or flag mismatches; alert."""
    run = run_info(context)
    dag_run = context.get("dag_run")
    until = context.get("logical_date") or dag_run.run_after  # type: ignore[union-attr]
    gateway = gateway_for(cfg.iamport_conn_id)
    try:
        with Ledger.from_conn_id(cfg.warehouse_conn_id) as ledger:
            ledger.init_schema()
            report = reconcile(
                gateway, ledger, charge_settings(cfg, context.get("params")), until=until,
                window=timedelta(hours=cfg.reconcile_window_hours), run=run,
                subscriptions_table=cfg.subscriptions_table if cfg.write_back else None,
                max_overdue_days=cfg.limits.max_overdue_days,
            )  # fmt: skip
    finally:
        gateway.close()
    alerts.send(alerts.reconcile_alerts(report, cfg=cfg, run=run), cfg)
    return report.as_dict()


def precheck_step(cfg: BillingConfig, context: dict[str, Any]) -> dict[str, Any]:
    """The day before charge day: customers without a billing key need a new card now."""
    run = run_info(context)
    billing_date = billing_date_from_context(context) + timedelta(days=cfg.precheck_days_ahead)
    gateway = gateway_for(cfg.iamport_conn_id)
    try:
        with Ledger.from_conn_id(cfg.warehouse_conn_id) as ledger:
            ledger.init_schema()
            with due_source(cfg, ledger) as source:
                report = check_billing_keys(
                    gateway, ledger, source=source, due_query=cfg.due_query,
                    billing_date=billing_date, limits=cfg.limits,
                    subscriptions_table=cfg.subscriptions_table if cfg.write_back else None,
                )  # fmt: skip
    finally:
        gateway.close()
    alerts.send(alerts.precheck_alert(report, cfg=cfg, run=run), cfg)
    return report
