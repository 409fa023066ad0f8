"""CancelPaymentOperator: a refund written ahead, sent once, settled from Iamport's record.

Every refund request has a ``refund_id``: by default derived from the task instance (dag_id,
run_id, task_id, map_index), so every try of the same task finds the row its earlier tries
wrote; outside Airflow the caller names it (``request_id``). The cancel ``reason`` carries a
marker with that id, so Iamport's ``cancel_history`` says which cancels are ours.

A new request: look the payment up, write the intent (amount, checksum = refundable balance
before) to ``billing_refunds`` and commit, send once. A request that already has a row is
never resent blindly; it is settled from the payment's cancel history:

* an entry carrying our marker: it was refunded: ``done`` (recorded in the ledger);
* no such entry and the balance still equals the intent's checksum: it never applied: sent
  again with the same checksum (Iamport refuses it if anything moved the balance meanwhile);
* anything else: someone else moved the balance (e.g. a console refund): ``refused``, the task
  fails for a person to decide. It never reports another refund as its own.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from iamport_billing import api_types as api
from iamport_billing.api_types import CancelEntry, Payment
from iamport_billing.gateways import gateway_for
from iamport_billing.gateways.base import (
    ABSENT,
    UNREACHABLE,
    CredentialsRefused,
    Gateway,
    GatewayUnavailable,
    PaymentAbsent,
    RefundOutcomeUnknown,
    RefundRefused,
)
from iamport_billing.policy import parse_amount
from iamport_billing.refunding import applied_total, refund_marker
from iamport_billing.states import (
    MONEY_MOVED,
    REFUND_DONE,
    REFUND_REFUSED,
    REFUND_UNKNOWN,
)
from iamport_billing.warehouse.ledger import Ledger
from iamport_billing.warehouse.refunds import Refund, Refunds

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,40}")


@dataclass(frozen=True)
class RefundIdentity:
    """Who asks for a refund: its key, and the task instance (None outside Airflow)."""

    refund_id: str
    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    map_index: int | None = None
    try_number: int | None = None


def refund_identity(context: Any, request_id: Any = None) -> RefundIdentity:
    """The refund's key: ``request_id`` when given, else a hash of the task instance's
    (dag_id, run_id, task_id, map_index), the same for every try of that instance."""
    ti = (context or {}).get("ti")
    meta: dict[str, Any] = {}
    if ti is not None:
        map_index = getattr(ti, "map_index", None)
        meta = {
            "dag_id": ti.dag_id,
            "run_id": ti.run_id,
            "task_id": ti.task_id,
            "map_index": -1 if map_index is None else int(map_index),
            "try_number": getattr(ti, "try_number", None),
        }
    if request_id not in (None, "", "None"):
        if not REQUEST_ID_RE.fullmatch(str(request_id)):
            raise AirflowFailException(
                f"request_id must be 1-40 characters of A-Z a-z 0-9 . _ : -, got {request_id!r}"
            )
        return RefundIdentity(str(request_id), **meta)
    if ti is None:
        raise AirflowFailException(
            "outside Airflow a refund needs request_id: the key that lets a re-run find it"
        )
    key = "\x1f".join(str(meta[k]) for k in ("dag_id", "run_id", "task_id", "map_index"))
    return RefundIdentity("af-" + hashlib.sha256(key.encode()).hexdigest()[:24], **meta)


class CancelPaymentOperator(BaseOperator):
    """Cancel (refund) a charge by ``imp_uid`` or ``merchant_uid``, in full or in part.

    Safe to retry, clear and re-run: the refund is written ahead to ``billing_refunds`` with
    the amount and ``checksum`` (the refundable balance before it), sent at most once per
    proof that it never applied, and settled from the payment's cancel history (see the
    module docstring). The charge's ledger row becomes ``cancelled`` with Iamport's total
    ``cancel_amount``.

    :param imp_uid: Iamport's payment id (wins over merchant_uid).
    :param merchant_uid: our id of the charge, e.g. ``sub-20261126-01``.
    :param amount: KRW to refund; None refunds the whole remaining balance (resolved to a
        number when the refund is written, and sent as that number).
    :param reason: shown to the customer and in Iamport's records (prefixed with the refund's
        marker ``[refund:<refund_id>]``).
    :param checksum: the refundable balance you expect; None takes Iamport's, after checking
        it against the ledger (a mismatch means a refund outside this operator: the task
        fails; pass the balance as ``checksum`` to refund anyway).
    :param request_id: the refund's key (1-40 of ``A-Za-z0-9._:-``); None derives it from the
        task instance. Needed outside Airflow.
    :param resend_after_seconds: an open refund whose last send is younger than this is not
        sent again even if the balance says it never applied: its answer may still be on its
        way (longer than the connection's read timeout plus Iamport's processing).
    """

    template_fields: Sequence[str] = (
        "imp_uid", "merchant_uid", "amount", "reason", "checksum", "request_id",
    )  # fmt: skip
    ui_color = "#ffe8e8"

    def __init__(
        self,
        *,
        reason: str,
        imp_uid: str | None = None,
        merchant_uid: str | None = None,
        amount: int | str | None = None,
        checksum: int | str | None = None,
        request_id: str | None = None,
        resend_after_seconds: float = 120.0,
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
        self.request_id = request_id
        self.resend_after_seconds = resend_after_seconds
        self.iamport_conn_id = iamport_conn_id
        self.warehouse_conn_id = warehouse_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        if not (_given(self.imp_uid) or _given(self.merchant_uid)):
            raise AirflowFailException("CancelPaymentOperator needs imp_uid or merchant_uid")
        amount = _opt_positive(self.amount, "cancel amount")
        checksum = _opt_positive(self.checksum, "checksum")
        who = refund_identity(context, self.request_id)
        gateway = gateway_for(self.iamport_conn_id)
        try:
            with Ledger.from_conn_id(self.warehouse_conn_id) as ledger:
                ledger.init_schema()
                refunds = Refunds(ledger)
                known = refunds.get(who.refund_id)
                if known is None:
                    summary = self._new(gateway, ledger, refunds, who, amount, checksum)
                else:
                    self._same_request(known, amount)
                    summary = self._settle(gateway, ledger, refunds, known, who)
        except CredentialsRefused as e:
            raise AirflowFailException(
                f"the gateway refused the credentials of connection {self.iamport_conn_id!r}: "
                f"nothing sent. {e}"
            ) from None
        finally:
            gateway.close()
        self.log.info("refund %s: %s", who.refund_id, summary)
        return summary

    # -- a new request: look up, write ahead, send once -----------------------------------------

    def _new(
        self, gateway: Gateway, ledger: Ledger, refunds: Refunds, who: RefundIdentity,
        amount: int | None, checksum: int | None,
    ) -> dict[str, Any]:  # fmt: skip
        before = self._current(gateway)
        balance = int(before.net_amount)
        if balance <= 0:
            raise AirflowFailException(f"{before.imp_uid} has nothing left to refund")
        if checksum is None:
            checksum = self._ledger_agrees(ledger, before, balance)
        to_refund = amount if amount is not None else checksum
        if to_refund > checksum:
            raise AirflowFailException(
                f"cannot refund {to_refund} KRW of {before.imp_uid}: {checksum} KRW is refundable"
            )
        token = uuid.uuid4().hex
        written = refunds.write_intent(
            {
                "refund_id": who.refund_id,
                "merchant_uid": before.merchant_uid,
                "imp_uid": before.imp_uid,
                "amount_requested": amount,
                "amount": to_refund,
                "checksum": checksum,
                "reason": f"{refund_marker(who.refund_id)} {self.reason}",
                "claim_token": token,
                "dag_id": who.dag_id,
                "run_id": who.run_id,
                "task_id": who.task_id,
                "map_index": who.map_index,
                "try_number": who.try_number,
            }
        )
        if not written:
            raise AirflowException(
                f"refund {who.refund_id} was written by another try at the same moment: "
                "nothing sent by this one; re-run to settle it"
            )
        return self._send(gateway, ledger, refunds, refunds.get(who.refund_id))

    def _send(
        self, gateway: Gateway, ledger: Ledger, refunds: Refunds, row: Refund | None
    ) -> dict[str, Any]:
        assert row is not None  # written and committed just before
        self.log.info(
            "sending refund %s: %s KRW of %s (checksum %s)",
            row.refund_id, row.amount, row.imp_uid, row.checksum,
        )  # fmt: skip
        try:
            payment = gateway.cancel(
                row.imp_uid, amount=row.amount, reason=row.reason or "", checksum=row.checksum
            )
        except GatewayUnavailable as e:
            raise AirflowException(
                f"refund {row.refund_id}: {e}. It stays open; a retry settles it"
            ) from None
        except RefundOutcomeUnknown as e:
            refunds.move(row.refund_id, REFUND_UNKNOWN, error_message=str(e))
            raise AirflowException(
                f"refund {row.refund_id}: the cancel was sent and no usable answer came back "
                f"({e}). It is never resent blindly: a re-run of this task (or Airflow's "
                "retry) settles it from Iamport's cancel history"
            ) from None
        except RefundRefused as e:
            message = f"Iamport refused refund {row.refund_id}: {e}"
            if (row.send_count or 0) > 1:
                # A resend refused (e.g. checksum): the first send may have landed late.
                return self._settle_refused_resend(gateway, ledger, refunds, row, message)
            refunds.move(row.refund_id, REFUND_REFUSED, error_message=message)
            raise AirflowFailException(message) from None
        after = int(payment.cancel_amount)
        refunds.move(row.refund_id, REFUND_DONE, cancel_amount_after=after)
        return self._done(ledger, row, payment, sent=True)

    def _settle_refused_resend(
        self, gateway: Gateway, ledger: Ledger, refunds: Refunds, row: Refund, message: str
    ) -> dict[str, Any]:
        """Iamport's cancel history decides: our marker there means done; otherwise the
        refund stays open (unknown) for the next try, never recorded as refused."""
        payment, history = self._lookup(gateway, row.imp_uid)
        after = applied_total(history, row.refund_id)
        if after is not None:
            refunds.move(row.refund_id, REFUND_DONE, cancel_amount_after=after)
            return self._done(ledger, row, payment, sent=True)
        refunds.move(row.refund_id, REFUND_UNKNOWN, error_message=message)
        raise AirflowException(
            f"{message}; an earlier send of it may still land: a retry settles it from "
            "Iamport's cancel history"
        )

    # -- a request seen before: settle it from the cancel history -------------------------------

    def _settle(
        self, gateway: Gateway, ledger: Ledger, refunds: Refunds, row: Refund,
        who: RefundIdentity,
    ) -> dict[str, Any]:  # fmt: skip
        payment, history = self._lookup(gateway, row.imp_uid)
        if row.status == REFUND_DONE:
            self.log.info("refund %s is already done: nothing sent", row.refund_id)
            return self._done(ledger, row, payment, sent=False)
        after = applied_total(history, row.refund_id)
        if after is not None:
            self.log.info(
                "refund %s is in Iamport's cancel history (an earlier try's answer was lost): "
                "recording it, nothing sent", row.refund_id,
            )  # fmt: skip
            refunds.move(row.refund_id, REFUND_DONE, cancel_amount_after=after)
            return self._done(ledger, row, payment, sent=False)
        if row.status == REFUND_REFUSED:
            raise AirflowFailException(
                f"refund {row.refund_id} was refused: {row.error_message}. Nothing sent; "
                "trigger a new refund if one is still due"
            )
        balance = int(payment.net_amount)
        last_send = row.updated_at or row.requested_at
        idle = (datetime.now(UTC) - last_send).total_seconds() if last_send else None
        if balance == row.checksum and idle is not None and idle < self.resend_after_seconds:
            raise AirflowException(
                f"refund {row.refund_id} was sent {idle:.0f} s ago and is not in Iamport's "
                "cancel history yet: its answer may still come. Nothing sent; a retry after "
                f"{self.resend_after_seconds:.0f} s settles it"
            )
        if balance == row.checksum:
            self.log.warning(
                "refund %s never applied (no cancel carries its marker; the balance is still "
                "%s): sending it again with the same checksum", row.refund_id, balance,
            )  # fmt: skip
            if not refunds.claim_resend(row, uuid.uuid4().hex, try_number=who.try_number):
                raise AirflowException(
                    f"refund {row.refund_id} was taken by another try meanwhile: nothing "
                    "sent by this one; re-run to settle it"
                )
            return self._send(gateway, ledger, refunds, refunds.get(row.refund_id))
        message = (
            f"refund {row.refund_id} ({row.amount} KRW of {row.imp_uid}) is not in Iamport's "
            f"cancel history, and the refundable balance is {balance} KRW, not the "
            f"{row.checksum} KRW it was written against: someone else refunded "
            f"{row.checksum - balance} KRW meanwhile (e.g. in Iamport's console). Not sent, "
            "not reported as done: a person decides (if a refund is still due, trigger a new "
            f"one with checksum={balance})"
        )
        refunds.move(row.refund_id, REFUND_REFUSED, error_message=message)
        raise AirflowFailException(message)

    def _same_request(self, row: Refund, amount: int | None) -> None:
        """A re-run must ask what the written refund asked; anything else is another request."""
        target = _given(self.imp_uid) or _given(self.merchant_uid)
        if target not in (row.imp_uid, row.merchant_uid) or amount != row.amount_requested:
            asked = f"{row.amount_requested} KRW" if row.amount_requested else "the balance"
            raise AirflowFailException(
                f"refund {row.refund_id} was written for {asked} of {row.imp_uid}; this task "
                f"asks {amount or 'the balance'} of {target}. Nothing sent: use another "
                "request_id (or run) for another refund"
            )

    # -- lookups and results --------------------------------------------------------------------

    def _current(self, gateway: Gateway) -> Payment:
        """The payment to cancel, as the gateway has it now (imp_uid wins, as in the API)."""
        target = _given(self.imp_uid) or _given(self.merchant_uid)
        if _given(self.imp_uid):
            try:
                payments = [gateway.payment(str(self.imp_uid))[0]]
            except PaymentAbsent:
                payments = []
            except GatewayUnavailable as e:
                raise AirflowException(f"{e}; nothing sent") from None
        else:
            found = gateway.look_up(str(self.merchant_uid))
            if found.kind == UNREACHABLE:
                raise AirflowException(
                    f"could not look {target} up at the gateway: {found.reason}; nothing sent"
                )
            payments = [] if found.kind == ABSENT else list(found.payments)
        settled = [p for p in payments if p.is_paid or p.status == api.CANCELLED]
        if not settled:
            raise AirflowFailException(f"no paid payment for {target}: nothing to cancel")
        return settled[0]

    def _lookup(self, gateway: Gateway, imp_uid: str) -> tuple[Payment, list[CancelEntry]]:
        try:
            return gateway.payment(imp_uid)
        except PaymentAbsent:
            raise AirflowFailException(f"Iamport has no payment {imp_uid}: nothing sent") from None
        except GatewayUnavailable as e:
            raise AirflowException(f"{e}; nothing sent") from None

    def _ledger_agrees(self, ledger: Ledger, payment: Payment, balance: int) -> int:
        """Iamport's refundable balance, unless the ledger expects another one (a refund made
        outside this operator, or not recorded yet): then nothing is written or sent."""
        row = ledger.get_attempt(payment.merchant_uid)
        if (
            row is None
            or row.status not in MONEY_MOVED
            or row.amount is None
            or row.imp_uid not in (None, payment.imp_uid)
        ):
            return balance
        taken = row.paid_amount if row.paid_amount is not None else row.amount
        expected = int(taken) - int(row.cancel_amount or 0)
        if expected != balance:
            raise AirflowFailException(
                f"{payment.merchant_uid}: Iamport's refundable balance is {balance} KRW, the "
                f"ledger expects {expected} KRW: a refund outside this DAG (e.g. in the "
                "console) or one not recorded yet. Nothing sent; if a refund is still due, "
                f"trigger it with checksum={balance}"
            )
        return balance

    def _done(self, ledger: Ledger, row: Refund, payment: Payment, *, sent: bool) -> dict[str, Any]:
        recorded = ledger.record_cancellation(
            payment.merchant_uid, imp_uid=payment.imp_uid, cancel_amount=int(payment.cancel_amount)
        )
        if not recorded:
            self.log.warning(
                "%s is not in the ledger: refund done, nothing recorded", payment.merchant_uid
            )
        return {
            "refund_id": row.refund_id,
            "refund_status": REFUND_DONE,
            "sent": sent,
            "refunded": int(row.amount),
            "imp_uid": payment.imp_uid,
            "merchant_uid": payment.merchant_uid,
            "amount": int(payment.amount),
            "cancel_amount": int(payment.cancel_amount),
            "remaining": int(payment.amount - payment.cancel_amount),
            "status": payment.status,
            "ledger_updated": recorded,
        }


def _given(value: Any) -> str | None:
    """A templated parameter's value, None for what renders as nothing."""
    return None if value in (None, "", "None") else str(value)


def _opt_positive(value: Any, what: str) -> int | None:
    if _given(value) is None:
        return None
    try:
        number = parse_amount(value)
    except ValueError as e:
        raise AirflowFailException(f"{what}: {e}") from None
    if number <= 0:
        raise AirflowFailException(f"{what} must be positive, got {number}")
    return number
