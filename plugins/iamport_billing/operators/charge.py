"""ChargeAgainOperator: charge stored billing keys through ``POST /subscribe/payments/again``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from iamport_billing.billing_run import candidates_in_batch, run_info, write_back
from iamport_billing.charging import BatchResult, ChargeEngine, ChargeSettings
from iamport_billing.gateways import gateway_for
from iamport_billing.gateways.base import CredentialsRefused, Gateway, GatewayUnavailable
from iamport_billing.policy import (
    ChargeCandidate,
    DeclineTable,
    RejectedRow,
    ValidationLimits,
    billing_date_of_run,
    to_date,
    validate_row,
)
from iamport_billing.ui.links import BillingPageLink
from iamport_billing.warehouse.ledger import DEFAULT_DUE_QUERY, Ledger
from iamport_billing.warehouse.source import DueSource


class ChargeAgainOperator(BaseOperator):
    """Charge one customer, or one keyset batch of due subscriptions, exactly once each.

    Every charge is written ahead to the ledger as ``pending`` before the API call and its
    outcome committed after; a retried or re-run task looks unsettled rows up at Iamport
    before charging anything. Returns counts and amounts by outcome (no customer data).

    One charge (the classic server call): pass ``customer_uid``, ``merchant_uid``, ``amount``
    and ``name`` (plus ``optional`` fields of the API). A batch: pass ``batch`` as produced by
    the daily run's plan step (``{"billing_date", "after", "until"}``).

    :param iamport_conn_id: ``iamport`` connection.
    :param warehouse_conn_id: SQL connection holding the ledger (and the due query's tables).
    :param max_concurrency: charges in flight at once within this task.
    :param requests_per_second: cap on charge requests started per second (None: no cap).
    :param due_query: SQL returning due rows; ``:billing_date`` is bound as a parameter.
    :param fail_on_unknown: fail the task (so Airflow retries and the retry looks them up)
        when outcomes are still unknown at the end.
    :param source_conn_id: connection the due query runs on (None: the warehouse's).
    :param subscriptions_table: with a batch, write this batch's outcomes back to that table
        when the charges are done, so a cleared or retried charge task leaves its
        subscriptions right without the DAG's write-back step (None: leave it to the DAG).
    """

    template_fields: Sequence[str] = (
        "customer_uid", "merchant_uid", "amount", "name", "optional", "batch", "due_query",
        "max_concurrency", "requests_per_second", "subscription_id", "billing_date",
    )  # fmt: skip
    template_fields_renderers = {"due_query": "sql", "optional": "json", "batch": "json"}
    ui_color = "#f3e8ff"
    operator_extra_links = (BillingPageLink(),)

    def __init__(
        self,
        *,
        iamport_conn_id: str = "iamport_default",
        warehouse_conn_id: str = "billing_warehouse",
        customer_uid: str | None = None,
        merchant_uid: str | None = None,
        amount: int | str | None = None,
        name: str | None = None,
        optional: Mapping[str, Any] | None = None,
        subscription_id: str | None = None,
        billing_date: str | None = None,
        batch: Mapping[str, Any] | None = None,
        due_query: str = DEFAULT_DUE_QUERY,
        max_concurrency: int | str = 8,
        requests_per_second: float | str | None = None,
        validation: Mapping[str, Any] | None = None,
        decline_table: Mapping[str, Any] | None = None,
        retry_schedule_days: Sequence[int] = (1, 3, 5, 7),
        pending_lease_seconds: float = 300.0,
        unknown_settle_seconds: float = 2.0,
        fail_on_unknown: bool = True,
        subscriptions_table: str | None = None,
        source_conn_id: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.iamport_conn_id = iamport_conn_id
        self.warehouse_conn_id = warehouse_conn_id
        self.customer_uid = customer_uid
        self.merchant_uid = merchant_uid
        self.amount = amount
        self.name = name
        self.optional = dict(optional or {})
        self.subscription_id = subscription_id
        self.billing_date = billing_date
        self.batch = batch
        self.due_query = due_query
        self.max_concurrency = max_concurrency
        self.requests_per_second = requests_per_second
        self.validation = dict(validation or {})
        self.decline_table = dict(decline_table or {})
        self.retry_schedule_days = tuple(retry_schedule_days)
        self.pending_lease_seconds = pending_lease_seconds
        self.unknown_settle_seconds = unknown_settle_seconds
        self.fail_on_unknown = fail_on_unknown
        self.subscriptions_table = subscriptions_table
        self.source_conn_id = source_conn_id

    def _settings(self) -> ChargeSettings:
        rps = self.requests_per_second
        return ChargeSettings(
            max_concurrency=int(self.max_concurrency),
            requests_per_second=float(rps) if rps not in (None, "", "None", 0) else None,
            retry_schedule_days=self.retry_schedule_days,
            decline_table=DeclineTable.from_config(self.decline_table),
            pending_lease_seconds=float(self.pending_lease_seconds),
            unknown_settle_seconds=float(self.unknown_settle_seconds),
        )

    def execute(self, context: Any) -> dict[str, Any]:
        gateway = gateway_for(self.iamport_conn_id, pool_maxsize=int(self.max_concurrency))
        try:
            result, unsettled = self._charge(gateway, context)
        except CredentialsRefused as e:
            # Retrying cannot help and nothing was sent: fail now, saying so.
            raise AirflowFailException(
                f"the gateway refused the credentials of connection {self.iamport_conn_id!r} "
                f"(imp_key/imp_secret): nothing was sent. Fix the connection, then clear this "
                f"task. {e}"
            ) from None
        except GatewayUnavailable as e:
            raise AirflowException(f"{e}; a retry sends them") from None
        finally:
            gateway.close()
        summary = result.as_dict()
        self.log.info("charge summary: %s", summary)
        if unsettled and self.fail_on_unknown:
            raise AirflowException(
                f"{len(unsettled)} charge outcomes still unknown (e.g. {unsettled[:5]}); "
                "a retry or the reconcile DAG looks them up first"
            )
        return summary

    def _charge(self, gateway: Gateway, context: Any) -> tuple[BatchResult, list[str]]:
        settings = self._settings()
        limits = ValidationLimits(**self.validation)
        with Ledger.from_conn_id(self.warehouse_conn_id) as ledger:
            ledger.init_schema()
            engine = ChargeEngine(gateway, ledger, settings, run_info(context), logger=self.log)
            if self.batch is not None:
                candidates = self._batch_candidates(ledger, limits, engine.run)
                self.log.info("batch %s: %d charges to consider", dict(self.batch), len(candidates))
                try:
                    result = engine.charge_batch(candidates)
                finally:
                    if self.subscriptions_table:
                        write_back(
                            ledger, subscriptions_table=self.subscriptions_table,
                            subscription_ids=[c.subscription_id for c in candidates],
                            logger=self.log,
                        )  # fmt: skip
            else:
                candidate = self._single_candidate(context, limits)
                result = engine.charge_batch(
                    [candidate], merchant_uids={candidate.subscription_id: str(self.merchant_uid)}
                )
            # Whatever the engine counted, the ledger decides: any row this task left
            # pending/unknown (a 'ready' payment, an unresolved 5xx) fails it.
            unsettled = [a.merchant_uid for a in ledger.unsettled_for_claim(engine.claim_token)]
        return result, sorted({*unsettled, *result.unknown_merchant_uids})

    def _batch_candidates(
        self, ledger: Ledger, limits: ValidationLimits, run: Mapping[str, Any]
    ) -> list[ChargeCandidate]:
        source = (
            DueSource.from_conn_id(self.source_conn_id)
            if self.source_conn_id not in (None, self.warehouse_conn_id)
            else ledger.due_source()
        )
        with source:
            return candidates_in_batch(
                ledger, source=source, due_query=self.due_query, batch=self.batch or {},
                limits=limits, run=run, logger=self.log,
            )  # fmt: skip

    def _single_candidate(self, context: Any, limits: ValidationLimits) -> ChargeCandidate:
        if not (self.customer_uid and self.merchant_uid and self.amount is not None):
            raise AirflowFailException(
                "ChargeAgainOperator needs either batch, or customer_uid, merchant_uid and amount"
            )
        dag_run = context.get("dag_run")
        billing_date = to_date(self.billing_date) or billing_date_of_run(
            context.get("logical_date"), getattr(dag_run, "run_after", None)
        )
        row = {
            "subscription_id": self.subscription_id or self.merchant_uid,
            "customer_uid": self.customer_uid,
            "amount": self.amount,
            "name": self.name,
            "billing_date": billing_date,
            "currency": self.optional.get("currency"),
            **{k: self.optional.get(k) for k in ("buyer_name", "buyer_email", "buyer_tel")},
        }
        passthrough = {
            k: v for k, v in self.optional.items()
            if k not in ("currency", "buyer_name", "buyer_email", "buyer_tel")
        }  # fmt: skip
        checked = validate_row(
            row, run_date=billing_date, limits=limits, merchant_uid=str(self.merchant_uid),
            options=passthrough,
        )  # fmt: skip
        if isinstance(checked, RejectedRow):
            raise AirflowFailException(f"charge rejected before any call: {checked.reason}")
        return checked
