# ruff: noqa: F811 - pytest fixtures imported from the suites they come from
"""Review 13: the PortOne V2 gateway where PortOne misbehaves (a PG error whose record cannot be
read, cursors that come back)."""

from __future__ import annotations

import itertools

import pytest
from iamport_billing.gateways.base import DECLINED, PAID, UNKNOWN, GatewayUnavailable

from tests.test_portone_gateway import (  # noqa: F401 - fixtures
    UID,
    Act,
    charge_path,
    error,
    gateway,
    request,
    server,
    v2_payment,
)

WAREHOUSES = ["sqlite"]


def test_a_pg_error_whose_record_cannot_be_read_is_not_a_decline(server, gateway):
    """A PG timeout also comes back as 502 PG_PROVIDER (the gateway's own docstring). When the
    lookup that should decide cannot be answered, the charge may have gone through: calling it a
    decline puts the subscription on the dunning schedule, and the retry a day later is a new
    merchant_uid, i.e. a second charge."""
    server.on("POST", charge_path(), error(502, "PG_PROVIDER", pgCode="TIMEOUT", pgMessage="지연"))
    server.on("GET", f"/payments/{UID}", Act(503, "<html>Service Unavailable</html>", "text/html"))
    result = gateway.charge(request())
    assert result.kind != DECLINED, (result.kind, result.code, result.reason)
    assert result.kind == UNKNOWN


def test_payments_between_stops_on_a_cursor_that_comes_back(server, gateway):
    """The loop only checks that the cursor differs from the previous one: a server whose
    cursors cycle (c1 -> c2 -> c1 -> ...) is read forever (a reconcile that never ends), each
    payment yielded again and again. Here the cycle is bounded (200 pages, then empty)."""
    page = {
        "c1": Act(200, {"items": [{"payment": v2_payment("a-20261201-01"), "cursor": "c1"}]}),
        "c2": Act(200, {"items": [{"payment": v2_payment("b-20261201-01"), "cursor": "c2"}]}),
    }
    cycle = [page["c1"], page["c2"]] * 100
    server.on("GET", "/payments-by-cursor", *cycle, Act(200, {"items": []}))
    seen: list[str] = []
    raised = False
    try:
        for p in itertools.islice(gateway.payments_between(1796083200, 1796169600), 1000):
            seen.append(p.merchant_uid)
    except GatewayUnavailable:
        raised = True
    assert len(seen) <= 2, f"{len(seen)} payments yielded, {len(set(seen))} distinct"
    assert raised


@pytest.mark.parametrize(
    "status, type_",
    [
        (400, "MAX_TRANSACTION_COUNT_REACHED"),
        (409, "BILLING_KEY_ALREADY_DELETED"),
        (404, "BILLING_KEY_NOT_FOUND"),
    ],
)
def test_a_refusal_of_a_resend_whose_first_send_was_paid_is_not_a_failure(
    server, gateway, status, type_
):
    """The first send was processed (paid) and its reply dropped; the resend is refused (the
    key's window ran out, or PortOne did not replay). The adapter reads INVALID_REQUEST on a
    resend as unknown and lets the record decide, but these types are taken at face value with
    no lookup: the charge is recorded as failed (or 'needs a new card') while PortOne says
    PAID."""
    server.on("POST", charge_path(), Act(drop=True), error(status, type_))
    server.on("GET", f"/payments/{UID}", Act(200, v2_payment(status="PAID")))
    result = gateway.charge(request())
    assert result.kind in (PAID, UNKNOWN), (result.kind, result.code, result.reason)
