"""The refund log (``billing_refunds``): every refund is written ahead of its cancel POST.

One row per refund request, keyed by ``refund_id`` (every try of the same task instance finds
its own row). A row is inserted ``pending`` and committed before the POST; each later move is
a compare-and-set on ``states.REFUND_MOVES``, and a resend must first take the row's claim, so
two tries can never both send it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from iamport_billing.policy import to_timestamp
from iamport_billing.states import REFUND_DONE, REFUND_MOVES, REFUND_OPEN, REFUND_PENDING
from iamport_billing.warehouse.schema import ATTEMPTS, REFUND_COLUMNS, REFUNDS
from iamport_billing.warehouse.session import SqlSession


@dataclass(frozen=True)
class Refund:
    """One row of the refund log, as read back."""

    refund_id: str
    merchant_uid: str | None
    imp_uid: str
    amount_requested: int | None
    amount: int
    checksum: int
    reason: str | None
    status: str
    cancel_amount_after: int | None
    requested_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime | None
    dag_id: str | None
    run_id: str | None
    task_id: str | None
    map_index: int | None
    try_number: int | None
    send_count: int | None
    claim_token: str | None
    error_message: str | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Refund:
        values = dict(zip(REFUND_COLUMNS, row, strict=True))
        for key in ("requested_at", "completed_at", "updated_at"):
            values[key] = to_timestamp(values[key])
        return cls(**values)


def _marks(n: int) -> str:
    return ", ".join(["%s"] * n)


class Refunds:
    """Named statements over the refund log, on the ledger's connection."""

    def __init__(self, session: SqlSession):
        self.session = session

    def _stamp(self) -> Any:
        return self.session.dialect.timestamp(datetime.now(UTC))

    def get(self, refund_id: str) -> Refund | None:
        rows = self.session.query(
            f"SELECT {', '.join(REFUND_COLUMNS)} FROM {REFUNDS} WHERE refund_id = %s", [refund_id]
        )
        return Refund.from_row(rows[0]) if rows else None

    def open_refunds(self, *, idle_since: datetime, limit: int = 200) -> list[Refund]:
        """Pending/unknown refunds not touched since ``idle_since``, newest first (the likeliest
        to settle; old ones left open are a person's, and must not starve them)."""
        rows = self.session.query(
            f"SELECT {', '.join(REFUND_COLUMNS)} FROM {REFUNDS} "
            f"WHERE status IN ({_marks(len(REFUND_OPEN))}) AND updated_at < %s "
            f"ORDER BY updated_at DESC LIMIT {int(limit)}",
            [*REFUND_OPEN, self.session.dialect.timestamp(idle_since)],
        )
        return [Refund.from_row(r) for r in rows]

    def done_not_in_ledger(self, limit: int = 1000) -> list[Refund]:
        """``done`` refunds whose charge's ledger row has a smaller refunded total than the
        refund left at the gateway."""
        cols = ", ".join(f"r.{c}" for c in REFUND_COLUMNS)
        rows = self.session.query(
            f"SELECT {cols} FROM {REFUNDS} r JOIN {ATTEMPTS} a ON a.merchant_uid = r.merchant_uid "
            "WHERE r.status = %s AND r.cancel_amount_after IS NOT NULL "
            f"AND COALESCE(a.cancel_amount, 0) < r.cancel_amount_after LIMIT {int(limit)}",
            [REFUND_DONE],
        )
        return [Refund.from_row(r) for r in rows]

    def write_intent(self, intent: Mapping[str, Any]) -> bool:
        """Insert the refund ``pending``, counted as sent once, claimed by
        ``intent["claim_token"]``. True only when this call wrote it: a False caller must not
        send (another try holds it)."""
        stamp = self._stamp()
        row = {
            **intent,
            "status": REFUND_PENDING,
            "send_count": 1,
            "requested_at": stamp,
            "updated_at": stamp,
        }
        cols = [c for c in REFUND_COLUMNS if c in row]
        self.session.execute(
            self.session.dialect.insert_ignore(REFUNDS, cols, ["refund_id"]), [row[c] for c in cols]
        )
        written = self.get(str(intent["refund_id"]))
        return written is not None and written.claim_token == intent["claim_token"]

    def claim_resend(
        self, refund: Refund, claim_token: str, *, try_number: int | None = None
    ) -> bool:
        """Take an open refund for one more send (Iamport's record showed it never applied).
        Fails when another try moved or claimed it since ``refund`` was read."""
        stamp = self._stamp()
        count = self.session.execute(
            f"UPDATE {REFUNDS} SET status = %s, claim_token = %s, send_count = send_count + 1, "
            "try_number = COALESCE(%s, try_number), error_message = NULL, updated_at = %s "
            f"WHERE refund_id = %s AND claim_token = %s AND status IN ({_marks(len(REFUND_OPEN))})",
            [
                REFUND_PENDING, claim_token, try_number, stamp, refund.refund_id,
                refund.claim_token, *REFUND_OPEN,
            ],
        )  # fmt: skip
        return count == 1

    def move(
        self,
        refund_id: str,
        status: str,
        *,
        cancel_amount_after: int | None = None,
        error_message: str | None = None,
    ) -> bool:
        """Compare-and-set ``status`` where ``states.REFUND_MOVES`` allows it; False if not."""
        sources = REFUND_MOVES[status]
        stamp = self._stamp()
        done = stamp if status == REFUND_DONE else None
        count = self.session.execute(
            f"UPDATE {REFUNDS} SET status = %s, "
            "cancel_amount_after = COALESCE(%s, cancel_amount_after), "
            "completed_at = COALESCE(%s, completed_at), error_message = %s, updated_at = %s "
            f"WHERE refund_id = %s AND status IN ({_marks(len(sources))})",
            [status, cancel_amount_after, done, error_message, stamp, refund_id, *sources],
        )
        return count == 1
