"""CancelPaymentOperator: full or partial refund of a charge, recorded in the ledger."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from iamport_billing.api_types import Payment
from iamport_billing.errors import IamportRequestRejected
from iamport_billing.hooks.iamport import IamportHook
from iamport_billing.policy import parse_amount
from iamport_billing.warehouse.ledger import Ledger


class CancelPaymentOperator(BaseOperator):
    """Cancel (refund) a charge by ``imp_uid`` or ``merchant_uid``, in full or in part.

    Every request carries ``checksum``: the refundable balance before this cancel. It comes
    from the ledger (amount - cancel_amount), which changes only after a cancel succeeded, so
    a retried task whose first try did refund is refused by Iamport instead of refunding twice;
    the operator then finds that earlier refund and records it. The ledger row becomes
    ``cancelled`` with Iamport's total ``cancel_amount``.

    :param imp_uid: Iamport's payment id (wins over merchant_uid).
    :param merchant_uid: our id of the charge, e.g. ``sub-20261126-01``.
    :param amount: KRW to refund; None refunds the whole remaining balance.
    :param reason: shown to the customer and in Iamport's records.
    :param checksum: the refundable balance you expect; None takes it from the ledger.
    """

    template_fields: Sequence[str] = ("imp_uid", "merchant_uid", "amount", "reason", "checksum")
    ui_color = "#ffe8e8"

    def __init__(
        self,
        *,
        reason: str,
        imp_uid: str | None = None,
        merchant_uid: str | None = None,
        amount: int | str | None = None,
        checksum: int | str | None = None,
        iamport_conn_id: str = "iamport_default",
        warehouse_conn_id: str = "billing_warehouse",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.imp_uid = imp_uid
        self.merchant_uid = merchant_uid
        self.amount = amount
        self.reason = reason
        self.checksum = checksum
        self.iamport_conn_id = iamport_conn_id
        self.warehouse_conn_id = warehouse_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        if not (self.imp_uid or self.merchant_uid):
            raise AirflowFailException("CancelPaymentOperator needs imp_uid or merchant_uid")
        amount = _opt_amount(self.amount)
        hook = IamportHook(self.iamport_conn_id)
        try:
            with Ledger.from_conn_id(self.warehouse_conn_id) as ledger:
                ledger.init_schema()
                before = self._current(hook)
                checksum = self._checksum(ledger, before)
                try:
                    payment = hook.cancel_payment(
                        imp_uid=before.imp_uid, amount=amount, reason=self.reason,
                        checksum=checksum,
                    )  # fmt: skip
                except IamportRequestRejected as e:
                    payment = self._done_by_earlier_try(hook, before, checksum, amount, e)
                recorded = ledger.record_cancellation(
                    payment.merchant_uid,
                    imp_uid=payment.imp_uid,
                    cancel_amount=int(payment.cancel_amount),
                )
        finally:
            hook.close()
        if not recorded:
            self.log.warning(
                "%s is not in the ledger: refund done, nothing recorded", payment.merchant_uid
            )
        summary = {
            "imp_uid": payment.imp_uid,
            "merchant_uid": payment.merchant_uid,
            "amount": int(payment.amount),
            "cancel_amount": int(payment.cancel_amount),
            "remaining": int(payment.amount - payment.cancel_amount),
            "status": payment.status,
            "ledger_updated": recorded,
        }
        self.log.info("cancelled: %s", summary)
        return summary

    def _current(self, hook: IamportHook) -> Payment:
        """The payment to cancel, as Iamport has it now (imp_uid wins, as in the API)."""
        if self.imp_uid:
            payments = [hook.get_payment(str(self.imp_uid))]
        else:
            payments = hook.find_all_payments(str(self.merchant_uid))
        settled = [p for p in payments if p.is_paid or p.status == "cancelled"]
        if not settled:
            raise AirflowFailException(
                f"no paid payment for {self.imp_uid or self.merchant_uid}: nothing to cancel"
            )
        return settled[0]

    def _checksum(self, ledger: Ledger, current: Payment) -> int:
        if self.checksum not in (None, ""):
            return parse_amount(self.checksum)
        row = ledger.get_attempt(current.merchant_uid)
        if row is not None and row.amount is not None and row.imp_uid in (None, current.imp_uid):
            return int(row.amount) - int(row.cancel_amount or 0)
        self.log.warning("no ledger row for %s: checksum from Iamport", current.merchant_uid)
        return int(current.amount - current.cancel_amount)

    def _done_by_earlier_try(
        self, hook: IamportHook, before: Payment, checksum: int, amount: int | None,
        error: IamportRequestRejected,
    ) -> Payment:  # fmt: skip
        """A refused cancel may mean an earlier try of this task already refunded: check."""
        now = hook.get_payment(before.imp_uid)
        expected = int(now.amount) - checksum + (amount if amount is not None else checksum)
        if now.status == "cancelled" and int(now.cancel_amount) == expected:
            self.log.info("an earlier try already refunded %s: recording it", now.imp_uid)
            return now
        raise AirflowFailException(f"Iamport refused the cancel: {error.api_message}") from None


def _opt_amount(value: Any) -> int | None:
    if value in (None, "", "None"):
        return None
    amount = parse_amount(value)
    if amount <= 0:
        raise AirflowFailException(f"cancel amount must be positive, got {amount}")
    return amount
