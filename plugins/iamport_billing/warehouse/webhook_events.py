"""Webhook deliveries being handled or done (``billing_webhook_events``).

One row per event key: a PortOne V2 ``webhook-id`` (kept ``done`` once handled, so a replay
costs nothing) or a merchant_uid looked up for an unsigned V1 webhook (``done`` for a cool-down
after its lookup, then open again: anyone can post one, so a flood buys one lookup per
merchant_uid per cool-down, not one per post). A handler first takes the row's claim (insert
unless it exists, or take over a claim older than the lease); only the claim holder may mark
it done or release it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from iamport_billing.states import WEBHOOK_DONE, WEBHOOK_PROCESSING
from iamport_billing.warehouse.schema import WEBHOOK_EVENTS
from iamport_billing.warehouse.session import SqlSession

# What ``claim`` found.
CLAIMED = "claimed"  # this handler holds the event now
DONE = "done"  # handled before: nothing to do
BUSY = "busy"  # another handler holds it and its lease has not run out


class WebhookEvents:
    """Named statements over the webhook event table, on the ledger's connection."""

    def __init__(self, session: SqlSession):
        self.session = session

    def _stamp(self, moment: datetime | None = None) -> Any:
        return self.session.dialect.timestamp(moment or datetime.now(UTC))

    def claim(
        self, event_key: str, claim_token: str, *, stale_before: datetime,
        reopen_before: datetime | None = None,
    ) -> str:  # fmt: skip
        """Take the event for this handler: CLAIMED, DONE or BUSY (compare-and-set). With
        ``reopen_before``, an event done before then is open again (a V1 cool-down)."""
        s = self.session
        if reopen_before is not None:
            s.execute(
                f"UPDATE {WEBHOOK_EVENTS} SET status = %s, claim_token = %s, claimed_at = %s "
                "WHERE event_key = %s AND status = %s AND claimed_at < %s",
                [WEBHOOK_PROCESSING, claim_token, self._stamp(), event_key, WEBHOOK_DONE,
                 self._stamp(reopen_before)],
            )  # fmt: skip
        s.execute(
            s.dialect.insert_ignore(
                WEBHOOK_EVENTS, ("event_key", "status", "claim_token", "claimed_at"),
                ["event_key"],
            ),
            [event_key, WEBHOOK_PROCESSING, claim_token, self._stamp()],
        )  # fmt: skip
        # A handler that died mid-lookup leaves its claim: taken over once the lease ran out.
        s.execute(
            f"UPDATE {WEBHOOK_EVENTS} SET claim_token = %s, claimed_at = %s "
            "WHERE event_key = %s AND status = %s AND claimed_at < %s",
            [claim_token, self._stamp(), event_key, WEBHOOK_PROCESSING, self._stamp(stale_before)],
        )
        rows = s.query(
            f"SELECT status, claim_token FROM {WEBHOOK_EVENTS} WHERE event_key = %s", [event_key]
        )
        if not rows:  # released between the statements: the next delivery tries again
            return BUSY
        status, holder = rows[0]
        if status == WEBHOOK_DONE:
            return DONE
        return CLAIMED if holder == claim_token else BUSY

    def finish(self, event_key: str, claim_token: str, result: str) -> None:
        """Mark a claimed event handled: redeliveries of it do nothing."""
        self.session.execute(
            f"UPDATE {WEBHOOK_EVENTS} SET status = %s, result = %s "
            "WHERE event_key = %s AND claim_token = %s AND status = %s",
            [WEBHOOK_DONE, result[:32], event_key, claim_token, WEBHOOK_PROCESSING],
        )

    def release(self, event_key: str, claim_token: str) -> None:
        """Give a claimed event back, not handled: the next delivery handles it."""
        self.session.execute(
            f"DELETE FROM {WEBHOOK_EVENTS} WHERE event_key = %s AND claim_token = %s "
            "AND status = %s",
            [event_key, claim_token, WEBHOOK_PROCESSING],
        )
