"""V2 webhooks: signed (Standard Webhooks), sent after the change commits, off the request path.

Every webhook is a row of the store's ``webhooks`` table before it is sent, so a redelivery (a
retry or ``POST /__emulator__/webhooks/{id}/redeliver``) sends the same body under the same
``webhook-id``. Each try is signed anew with the machine's time, as receivers check the
timestamp against their own clock; the body's ``timestamp`` is the emulator's clock.
"""

from __future__ import annotations

import heapq
import itertools
import json
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import requests
from standardwebhooks import Webhook

from iamport_billing.emulator.store import Store

# Seconds before each retry of a failed delivery (the real schedule is minutes to hours).
RETRY_DELAYS_S = (0.2, 1.0, 3.0)
TIMEOUT_S = 10.0

PAID = "Transaction.Paid"
FAILED = "Transaction.Failed"
CANCELLED = "Transaction.Cancelled"
PARTIAL_CANCELLED = "Transaction.PartialCancelled"


def iso(ts: float) -> str:
    """ISO 8601 in UTC with a Z, as PortOne writes date-times."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def webhook_body(
    type_: str, now: float, payment_id: str, store_id: str, transaction_id: str, **extra: str
) -> str:
    """The JSON of a webhook, version 2024-04-25."""
    data = {"paymentId": payment_id, "storeId": store_id, "transactionId": transaction_id, **extra}
    return json.dumps({"type": type_, "timestamp": iso(now), "data": data}, ensure_ascii=False)


class WebhookSender:
    """A daemon thread delivering queued webhooks, with ``RETRY_DELAYS_S`` retries."""

    def __init__(
        self,
        store: Store,
        url: str,
        secret: str,
        count: Callable[[str, str], None],
        retry_delays: tuple[float, ...] = RETRY_DELAYS_S,
    ) -> None:
        self._store = store
        self._url = url
        self._signer = Webhook(secret)
        self._count = count
        self._retry_delays = retry_delays
        self._due: list[tuple[float, int, str, int]] = []  # (when, tie, webhook id, try number)
        self._tie = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._session = requests.Session()
        self._thread = threading.Thread(target=self._run, name="portone-webhooks", daemon=True)
        self._thread.start()

    def publish(self, type_: str, payment_id: str, body: str, now: int) -> str:
        """Record a webhook (after the change it reports has committed) and queue it."""
        webhook_id = f"msg_{secrets.token_hex(12)}"
        self._store.add_webhook(webhook_id, type_, payment_id, body, now)
        self._schedule(webhook_id, 0, 0.0)
        return webhook_id

    def redeliver(self, webhook_id: str) -> None:
        self._schedule(webhook_id, 0, 0.0)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout)
        self._session.close()

    def _schedule(self, webhook_id: str, attempt: int, delay: float) -> None:
        with self._cond:
            heapq.heappush(
                self._due, (time.monotonic() + delay, next(self._tie), webhook_id, attempt)
            )
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._due or self._due[0][0] > time.monotonic()):
                    self._cond.wait(self._due[0][0] - time.monotonic() if self._due else None)
                if self._stopped:
                    return
                _, _, webhook_id, attempt = heapq.heappop(self._due)
            if not self._deliver(webhook_id) and attempt < len(self._retry_delays):
                self._schedule(webhook_id, attempt + 1, self._retry_delays[attempt])

    def _deliver(self, webhook_id: str) -> bool:
        webhook = self._store.get_webhook(webhook_id)
        if webhook is None:
            return True
        sent_at = datetime.now(UTC)
        headers = {
            "Content-Type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": self._signer.sign(webhook_id, sent_at, webhook["body"]),
        }
        try:
            reply = self._session.post(
                self._url, data=webhook["body"].encode(), headers=headers, timeout=TIMEOUT_S
            )
            status: int | None = reply.status_code
        except requests.RequestException:
            status = None
        self._store.webhook_attempted(webhook_id, status, int(time.time()))
        delivered = status is not None and 200 <= status < 300
        self._count("webhooks", "delivered" if delivered else "failed")
        return delivered
