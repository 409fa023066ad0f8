"""The charge engine against the emulator (real HTTP) and a real SQLite ledger."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
import requests
from iamport_billing.charging import ChargeEngine, ChargeSettings, RateLimiter, resolve_unsettled
from iamport_billing.gateways.iamport_v1 import IamportV1Gateway
from iamport_billing.hooks.iamport import IamportHook
from iamport_billing.policy import ChargeCandidate, merchant_uid_for
from iamport_billing.warehouse.ledger import Ledger
from support import (
    HARD_DECLINE_CARD,
    PAYING_CARD,
    SOFT_DECLINE_CARD,
    emulator_payments,
    register_cards,
)

DAY = date(2026, 11, 26)
RUN = {"dag_id": "test", "run_id": "run-1", "task_id": "charge[0]", "try_number": 1}
SETTINGS = ChargeSettings(max_concurrency=8, unknown_settle_seconds=0.1)


def cand(sub: str, customer: str | None = None, amount: int = 1000) -> ChargeCandidate:
    return ChargeCandidate(sub, customer or f"cust-{sub}", amount, DAY, name="plan")


def engine(hook, ledger, settings=SETTINGS, run=RUN) -> ChargeEngine:
    return ChargeEngine(IamportV1Gateway(hook), ledger, settings, run)


def set_faults(emulator, **faults) -> None:
    requests.post(f"{emulator.url}/__emulator__/faults", json=faults, timeout=5).raise_for_status()


def paid_by_merchant_uid(emulator) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in emulator_payments(emulator.config.db_path):
        if p["status"] == "paid":
            counts[p["merchant_uid"]] = counts.get(p["merchant_uid"], 0) + 1
    return counts


def ledger_rows(ledger) -> dict[str, tuple]:
    rows = ledger.query(
        "SELECT merchant_uid, status, imp_uid, amount, decline_kind, next_retry_date, error_code "
        "FROM billing_charge_attempts"
    )
    return {r[0]: r[1:] for r in rows}


def test_every_candidate_is_charged_once_and_the_ledger_matches(hook, ledger, emulator):
    subs = [f"s{i:03d}" for i in range(60)]
    register_cards(emulator, [(f"cust-{s}", PAYING_CARD) for s in subs])
    result = engine(hook, ledger).charge_batch([cand(s) for s in subs])
    assert result.counts == {"paid": 60}
    assert result.amounts == {"paid": 60_000}
    paid = paid_by_merchant_uid(emulator)
    assert paid == {merchant_uid_for(s, DAY, 1): 1 for s in subs}
    imp_uids = {p["merchant_uid"]: p["imp_uid"] for p in emulator_payments(emulator.config.db_path)}
    for uid, (status, imp_uid, amount, *_rest) in ledger_rows(ledger).items():
        assert (status, imp_uid, amount) == ("paid", imp_uids[uid], 1000)


def test_running_the_batch_again_charges_nobody(hook, ledger, emulator):
    register_cards(emulator, [("cust-a", PAYING_CARD), ("cust-b", PAYING_CARD)])
    engine(hook, ledger).charge_batch([cand("a"), cand("b")])
    again = engine(hook, ledger, run={**RUN, "run_id": "run-2"}).charge_batch(
        [cand("a"), cand("b")]
    )
    assert again.counts == {"already_paid": 2}
    assert again.charges_sent == 0
    assert len(emulator_payments(emulator.config.db_path)) == 2


def test_declines_are_classified_and_soft_ones_scheduled(hook, ledger, emulator):
    register_cards(emulator, [("cust-soft", SOFT_DECLINE_CARD), ("cust-hard", HARD_DECLINE_CARD)])
    result = engine(hook, ledger).charge_batch([cand("soft"), cand("hard")])
    assert result.counts == {"declined_soft": 1, "declined_hard": 1}
    rows = ledger_rows(ledger)
    soft = rows[merchant_uid_for("soft", DAY, 1)]
    hard = rows[merchant_uid_for("hard", DAY, 1)]
    assert (soft[0], soft[3], str(soft[4])[:10]) == ("failed", "soft", str(DAY + timedelta(1)))
    assert (hard[0], hard[3], hard[4]) == ("failed", "hard", None)


def test_a_declined_subscription_is_not_recharged_by_a_rerun(hook, ledger, emulator):
    register_cards(emulator, [("cust-soft", SOFT_DECLINE_CARD)])
    engine(hook, ledger).charge_batch([cand("soft")])
    again = engine(hook, ledger).charge_batch([cand("soft")])
    assert again.counts == {"already_settled": 1}
    assert len(emulator_payments(emulator.config.db_path)) == 1


def test_missing_billing_key_is_a_hard_failure_without_a_payment(hook, ledger, emulator):
    result = engine(hook, ledger).charge_batch([cand("ghost")])
    assert result.counts == {"missing_billing_key": 1}
    (row,) = ledger_rows(ledger).values()
    assert (row[0], row[3], row[5]) == ("failed", "hard", "missing_billing_key")
    assert emulator_payments(emulator.config.db_path) == []


def test_dropped_responses_are_resolved_by_lookup_without_a_second_charge(hook, ledger, emulator):
    subs = [f"d{i}" for i in range(10)]
    register_cards(emulator, [(f"cust-{s}", PAYING_CARD) for s in subs])
    hook.get_token()
    set_faults(emulator, drop_after_commit_rate=1.0)
    eng = engine(hook, ledger, ChargeSettings(max_concurrency=4, unknown_settle_seconds=0.1))
    # Lookups must work while charges keep being dropped: only the POST is affected.
    result = eng.charge_batch([cand(s) for s in subs])
    assert result.counts == {"paid": 10}
    assert paid_by_merchant_uid(emulator) == {merchant_uid_for(s, DAY, 1): 1 for s in subs}
    assert {r[0] for r in ledger_rows(ledger).values()} == {"paid"}


def test_server_errors_before_processing_are_resent_with_the_same_merchant_uid(
    hook, ledger, emulator
):
    register_cards(emulator, [("cust-x", PAYING_CARD)])
    hook.get_token()
    set_faults(emulator, error_rate=1.0)
    eng = engine(hook, ledger, ChargeSettings(max_concurrency=1, unknown_settle_seconds=0.1))
    original = eng._settle_unknown

    def heal_then_settle(unknown):
        set_faults(emulator, error_rate=0.0)
        return original(unknown)

    eng._settle_unknown = heal_then_settle
    result = eng.charge_batch([cand("x")])
    assert result.counts == {"paid": 1}
    assert paid_by_merchant_uid(emulator) == {merchant_uid_for("x", DAY, 1): 1}


def test_outcomes_that_stay_unknown_are_reported_not_lost(hook, ledger, emulator):
    register_cards(emulator, [("cust-x", PAYING_CARD)])
    hook.get_token()
    set_faults(emulator, error_rate=1.0)
    settings = ChargeSettings(max_concurrency=1, unknown_settle_seconds=0.0, max_resend_rounds=0)
    result = engine(hook, ledger, settings).charge_batch([cand("x")])
    assert result.unknown_merchant_uids == [merchant_uid_for("x", DAY, 1)]
    assert ledger_rows(ledger)[merchant_uid_for("x", DAY, 1)][0] == "unknown"


def test_pending_row_left_by_a_crash_is_looked_up_before_anything_else(hook, ledger, emulator):
    """A crash after the charge reached Iamport: the retry finds it paid, charges nothing."""
    register_cards(emulator, [("cust-a", PAYING_CARD), ("cust-b", PAYING_CARD)])
    uid_a, uid_b = merchant_uid_for("a", DAY, 1), merchant_uid_for("b", DAY, 1)
    crashed = engine(hook, ledger)
    crashed.claim(crashed.plan([cand("a"), cand("b")])[0])  # both rows pending, then "crash"
    hook.charge_again("cust-a", uid_a, 1000, "plan")  # only a's request had reached Iamport
    retry = engine(hook, ledger, run={**RUN, "try_number": 2})
    result = retry.charge_batch([cand("a"), cand("b")])
    assert result.counts == {"resolved_paid": 1, "paid": 1}
    assert paid_by_merchant_uid(emulator) == {uid_a: 1, uid_b: 1}
    assert {v[0] for v in ledger_rows(ledger).values()} == {"paid"}


def test_a_fresh_pending_row_of_another_run_is_left_alone(hook, ledger, emulator):
    register_cards(emulator, [("cust-a", PAYING_CARD)])
    other = engine(hook, ledger, run={**RUN, "run_id": "other"})
    other.claim(other.plan([cand("a")])[0])
    result = engine(hook, ledger).charge_batch([cand("a")])
    assert result.counts == {"in_flight_elsewhere": 1}
    assert emulator_payments(emulator.config.db_path) == []


def test_two_engines_racing_for_one_batch_charge_each_subscription_once(hook, ledger, emulator):
    import threading

    subs = [f"r{i:02d}" for i in range(40)]
    register_cards(emulator, [(f"cust-{s}", PAYING_CARD) for s in subs])
    results = []

    def run(run_id):
        with Ledger.from_conn_id("billing_warehouse") as own:
            results.append(
                engine(IamportHook(), own, run={**RUN, "run_id": run_id}).charge_batch(
                    [cand(s) for s in subs]
                )
            )

    threads = [threading.Thread(target=run, args=(f"race-{i}",)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert paid_by_merchant_uid(emulator) == {merchant_uid_for(s, DAY, 1): 1 for s in subs}
    assert sum(r.counts.get("paid", 0) for r in results) == 40


def test_reconcile_settles_stale_rows_and_resends_the_ones_never_seen(hook, ledger, emulator):
    register_cards(emulator, [("cust-a", PAYING_CARD), ("cust-b", PAYING_CARD)])
    old = engine(hook, ledger, run={**RUN, "run_id": "old"})
    old.claim(old.plan([cand("a"), cand("b")])[0])
    hook.charge_again("cust-a", merchant_uid_for("a", DAY, 1), 1000, "plan")
    counts = resolve_unsettled(
        IamportV1Gateway(hook),
        ledger,
        ChargeSettings(pending_lease_seconds=0),
        {**RUN, "run_id": "reconcile"},
    )
    assert counts == {"resolved_paid": 1, "paid": 1}
    rows = ledger_rows(ledger)
    assert rows[merchant_uid_for("a", DAY, 1)][0] == "paid"
    assert rows[merchant_uid_for("b", DAY, 1)][0] == "paid"
    paid = [p["merchant_uid"] for p in emulator_payments(emulator.config.db_path)]
    assert sorted(paid) == [merchant_uid_for("a", DAY, 1), merchant_uid_for("b", DAY, 1)]


def test_rate_limiter_spaces_request_starts():
    import time

    limiter = RateLimiter(50)
    start = time.monotonic()
    for _ in range(26):
        limiter.acquire()
    assert time.monotonic() - start >= 0.45


def test_pending_row_is_committed_before_the_charge_is_sent(hook, ledger, emulator):
    """Write-ahead: another connection already sees the pending row when the POST leaves."""
    register_cards(emulator, [("cust-a", PAYING_CARD), ("cust-b", PAYING_CARD)])
    seen: dict[str, str | None] = {}
    send = hook.charge_again

    def observed_charge(customer_uid, merchant_uid, amount, name, **optional):
        with Ledger.from_conn_id("billing_warehouse") as other:
            row = other.get_attempt(merchant_uid)
            seen[merchant_uid] = row.status if row else None
        return send(customer_uid, merchant_uid, amount, name, **optional)

    hook.charge_again = observed_charge
    engine(hook, ledger).charge_batch([cand("a"), cand("b")])
    assert seen == {
        merchant_uid_for("a", DAY, 1): "pending",
        merchant_uid_for("b", DAY, 1): "pending",
    }
    assert {v[0] for v in ledger_rows(ledger).values()} == {"paid"}


def _refusing(hook, code: int, message: str):
    """The hook, but every charge is refused with a non-zero code (what the emulator never
    sends: code -1, or a duplicate refusal while the first request is still being processed)."""
    from iamport_billing.errors import IamportRequestRejected

    def refuse(customer_uid, merchant_uid, amount, name, **optional):
        raise IamportRequestRejected(code, message)

    hook.charge_again = refuse
    return hook


@pytest.mark.parametrize(
    "code, message",
    [(-1, "PG사 통신 오류"), (1, "이미 주문이 이루어진 건입니다. (동일한 merchant_uid로 ...)")],
)
def test_an_unclear_refusal_is_unknown_not_a_decline(hook, ledger, emulator, code, message):
    result = engine(_refusing(hook, code, message), ledger).charge_batch([cand("a")])
    assert result.unknown_merchant_uids == [merchant_uid_for("a", DAY, 1)]
    assert ledger_rows(ledger)[merchant_uid_for("a", DAY, 1)][0] == "unknown"


def test_a_plain_refusal_of_a_first_send_is_a_refused_request_never_dunned(hook, ledger, emulator):
    result = engine(_refusing(hook, 1, "한도초과"), ledger).charge_batch([cand("a")])
    assert result.counts == {"declined_refused": 1}
    row = ledger_rows(ledger)[merchant_uid_for("a", DAY, 1)]
    assert (row[0], row[3], row[4]) == ("failed", "refused", None)


def test_a_refusal_of_a_resend_is_unknown(hook, ledger, emulator):
    old = engine(hook, ledger, run={**RUN, "try_number": 1})
    old.claim(old.plan([cand("a")])[0])
    retry = engine(_refusing(hook, 1, "한도초과"), ledger, run={**RUN, "try_number": 2})
    result = retry.charge_batch([cand("a")])
    assert result.unknown_merchant_uids == [merchant_uid_for("a", DAY, 1)]


def test_rows_are_claimed_in_chunks_just_before_they_are_sent(hook, ledger, emulator):
    subs = [f"c{i:03d}" for i in range(200)]
    register_cards(emulator, [(f"cust-{s}", PAYING_CARD) for s in subs])
    rows_when_sent: list[int] = []
    send = hook.charge_again

    def observed(customer_uid, merchant_uid, amount, name, **optional):
        with Ledger.from_conn_id("billing_warehouse") as other:
            rows_when_sent.append(other.query("SELECT COUNT(*) FROM billing_charge_attempts")[0][0])
        return send(customer_uid, merchant_uid, amount, name, **optional)

    hook.charge_again = observed
    settings = ChargeSettings(max_concurrency=1, unknown_settle_seconds=0.1)
    assert engine(hook, ledger, settings).charge_batch([cand(s) for s in subs]).counts == {
        "paid": 200
    }
    assert rows_when_sent[0] == 50
    assert max(rows_when_sent) == 200
