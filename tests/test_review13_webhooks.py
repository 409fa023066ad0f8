# ruff: noqa: F811 - pytest fixtures imported from the suites they come from
"""Review 13: the unsigned V1 webhook endpoint as an attacker's lever."""

from __future__ import annotations

from support import faults

from tests.test_webhooks import (  # noqa: F401 - fixtures
    client,
    lookups,
    rows,
    secrets,
    unknown_charge,
)

WAREHOUSES = ["sqlite"]


def test_sequential_unsigned_v1_posts_cannot_buy_a_gateway_lookup_each(client, ledger, emulator):
    """The V1 endpoint is unauthenticated and its event key is released after each lookup, so
    anyone who knows (or guesses: merchant_uids are derived from data) one unsettled merchant_uid
    turns each POST into one authenticated GET at the gateway under the merchant's API secret:
    an amplifier against the merchant's own rate limit, which the charge path shares. A signed
    V2 event replayed 100 times costs one lookup; 100 unsigned V1 posts cost 100."""
    faults(emulator, charge_status_ready=True)  # the gateway keeps it 'ready': never settles
    uid = unknown_charge(ledger, emulator)
    before = lookups(emulator)
    answers = [client.post("/iamport", json={"merchant_uid": uid}).json() for _ in range(100)]
    made = lookups(emulator) - before
    assert rows(ledger)[uid][0] == "unknown"
    assert made <= 5, f"100 unsigned posts made {made} gateway lookups ({answers[-1]})"
