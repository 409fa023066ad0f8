"""PortOne V2 webhook signatures (Standard Webhooks, through the ``standardwebhooks`` package).

The secrets live in an Airflow connection (``IAMPORT_BILLING_PORTONE_WEBHOOK_CONN_ID``,
default ``portone_webhook``): password = the current secret, extra ``previous_secret`` = the
one being rotated out. A delivery signed with either verifies. The package checks the
timestamp is within 5 minutes of now. Secrets are never logged or put in an answer.
"""

from __future__ import annotations

import binascii
import logging
from collections.abc import Mapping, Sequence

from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook, WebhookVerificationError

log = logging.getLogger(__name__)


def webhook_secrets(conn_id: str) -> list[str]:
    """The current and the previous secret of the connection (empty: not configured)."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return []
    previous = conn.extra_dejson.get("previous_secret")
    return [s for s in (conn.password, previous) if isinstance(s, str) and s]


def verified(body: bytes, headers: Mapping[str, str], secrets: Sequence[str]) -> bool:
    """True when ``headers`` carry a fresh signature of ``body`` by one of ``secrets``."""
    wanted = {k: headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")
              if k in headers}  # fmt: skip
    for n, secret in enumerate(secrets):
        try:
            verifier = Webhook(secret)
        except (EmptyWebhookSecretError, binascii.Error, ValueError):
            log.error("webhook secret #%d of the connection is not a whsec_ secret", n + 1)
            continue
        try:
            verifier.verify(body, wanted, json_parse=False)
        except (WebhookVerificationError, ValueError, binascii.Error):
            continue  # malformed headers, stale timestamp or another secret's signature
        return True
    return False
