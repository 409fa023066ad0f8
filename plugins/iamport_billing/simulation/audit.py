"""After a simulation: the invariants (each a count of violations, all must be 0) and the
business figures, from the ledger, the subscriptions table and the gateway's own records.

The gateway's payments are the truth for money; the world (who cancelled when, which anchor
day) is the truth for what should have been charged.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import date, datetime, timedelta
from statistics import mean, median
from typing import Any

from iamport_billing.policy import SEOUL, parse_merchant_uid
from iamport_billing.simulation.scenario import Scenario
from iamport_billing.simulation.world import World, expected_billing_dates
from iamport_billing.states import (
    ACTIVE,
    AMOUNT_MISMATCH,
    CANCELLED,
    FAILED,
    HARD,
    MISSING_BILLING_KEY,
    MONEY_MOVED,
    PAID,
    PAST_DUE,
    PAYMENT_METHOD_REQUIRED,
    SOFT,
    SUB_CANCELLED,
    UNSETTLED,
)
from iamport_billing.warehouse.ledger import Attempt, Ledger

EXAMPLES = 20
# A period due this many days before its subscription was cancelled may go uncharged when its
# run was delayed (an outage day): cancelled subscriptions are never charged.
CANCEL_GRACE_DAYS = 2
GATEWAY_MONEY_MOVED = ("paid", "cancelled")
# The gateway's status -> the ledger states that agree with it.
AGREES = {
    "paid": (PAID, AMOUNT_MISMATCH),
    "cancelled": (CANCELLED,),
    "failed": (FAILED,),
    "ready": UNSETTLED,
}
# Payments the gateway itself has not finished: only it, or a person, can settle their rows.
GATEWAY_UNFINISHED = ("ready",)


class Violations:
    """Counts and a few examples per invariant."""

    def __init__(self) -> None:
        self.lost_to_cancellation = 0
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add(self, name: str, example: str, n: int = 1) -> None:
        self.counts[name] += n
        if len(self.examples[name]) < EXAMPLES:
            self.examples[name].append(example)


INVARIANTS = (
    "at_most_one_charge_per_period",
    "every_period_ends_paid_past_due_or_cancelled",
    "no_unsettled_rows",
    "ledger_equals_gateway",
    "billing_dates_follow_anchor_rules",
    "no_charge_after_cancellation",
    "nothing_charged_outside_a_plan",
    "no_resend_of_a_charge_the_gateway_has",
    "no_refund_beyond_the_request",
    # Watched by the runner as each DAG run ends (an end state cannot show them):
    "every_unsettled_charge_fails_its_task",
    "no_unknown_without_a_charge_request",
    "one_token_per_task",
    "nothing_charged_from_mostly_broken_rows",
    "no_task_crashes",
    "paid_periods_move_their_subscription_on",
)
# Invariants with nothing to check on a gateway, and why: the report lists them apart (never
# as a silent 0).
NOT_APPLICABLE = {
    "v1": {},
    "v2": {
        "one_token_per_task": "PortOne V2 has no access token: every request carries the API "
        "secret, so there is no token to fetch once per task",
    },
}


def audit(
    scenario: Scenario,
    world: World,
    ledger: Ledger,
    store: Any,
    *,
    resends: int = 0,
    watched: Violations | None = None,
    refunds_asked: dict[str, int] | None = None,
) -> dict[str, Any]:
    """``resends``: charges the gateway refused because it already had the merchant_uid;
    ``watched``: what the runner saw DAG runs do as they ended; ``refunds_asked``: KRW the
    world asked to refund, by merchant_uid."""
    members = world.members
    every_payment = store.all_payments()
    payments = [p for p in every_payment if parse_merchant_uid(p["merchant_uid"])]
    periods = ledger.attempts_for(members)
    rows = {a.merchant_uid: a for attempts in periods.values() for a in attempts}
    states = ledger.subscription_states(list(members))
    v = watched or Violations()

    _one_charge_per_period(payments, v)
    _periods_end(scenario, world, periods, states, v)
    waiting = _unsettled(ledger, every_payment, v)
    _compare_money(payments, rows, v)
    refunded = _refunds(payments, rows, refunds_asked or {}, v)
    _check_dates(world, periods, states, scenario.calendar.end, v)
    _charged_as_planned(world, every_payment, rows, periods, ledger.planned_periods(), v)
    if resends:
        # Only a lookup's word that a charge is absent may lead to a resend; Iamport refusing
        # the uid as already used means a charge it had was sent again.
        v.add("no_resend_of_a_charge_the_gateway_has",
              f"{resends} charges refused as an already used merchant_uid", resends)  # fmt: skip
    skipped = NOT_APPLICABLE[scenario.api]
    return {
        "gateway": scenario.api,
        "invariants": {name: v.counts.get(name, 0) for name in INVARIANTS if name not in skipped},
        "not_applicable": {
            "invariants": skipped,
            "incident_switches": scenario.not_on_this_gateway(),
        },
        "violations": {k: ex for k, ex in v.examples.items() if ex},
        "figures": {
            **figures_of(world, periods, states, payments),
            "periods_lost_to_cancellation": v.lost_to_cancellation,
            "waiting_on_the_gateway": waiting,
            "refunds_asked": len(refunds_asked or {}),
            "refunded_krw": refunded,
        },
    }


def _unsettled(ledger: Ledger, every_payment: list[dict[str, Any]], v: Violations) -> int:
    """Rows left pending/unknown. One the gateway itself holds unfinished ('ready') cannot be
    settled by anyone but the gateway or a person: counted apart, not as a violation."""
    unfinished = {p["merchant_uid"] for p in every_payment if p["status"] in GATEWAY_UNFINISHED}
    waiting = 0
    for a in ledger.unsettled_attempts():
        if a.merchant_uid in unfinished:
            waiting += 1
        else:
            v.add("no_unsettled_rows", f"{a.merchant_uid}: {a.status} ({a.dag_id})")
    return waiting


def _refunds(
    payments: list[dict[str, Any]], rows: dict[str, Attempt], asked: dict[str, int],
    v: Violations,
) -> int:  # fmt: skip
    """Refunded at the gateway: never more than was asked, and as the ledger says."""
    total = 0
    for p in payments:
        uid, cancelled = p["merchant_uid"], int(p.get("cancel_amount") or 0)
        total += cancelled
        if cancelled > asked.get(uid, 0):
            v.add("no_refund_beyond_the_request",
                  f"{uid}: {cancelled} KRW refunded, {asked.get(uid, 0)} asked")  # fmt: skip
        row = rows.get(uid)
        if row is not None and int(row.cancel_amount or 0) != cancelled:
            example = f"{uid}: {cancelled} KRW refunded at the gateway, ledger {row.cancel_amount}"
            v.add("ledger_equals_gateway", example)
    return total


def _one_charge_per_period(payments: list[dict[str, Any]], v: Violations) -> None:
    by_period: dict[tuple[str, date], list[dict[str, Any]]] = defaultdict(list)
    for p in payments:
        sub, day, _ = parse_merchant_uid(p["merchant_uid"])  # type: ignore[misc]
        by_period[(sub, day)].append(p)
    for (sub, day), ps in by_period.items():
        moved = [p for p in ps if p["status"] in GATEWAY_MONEY_MOVED]
        if len(moved) > 1:
            v.add("at_most_one_charge_per_period",
                  f"{sub} {day}: {[p['merchant_uid'] for p in moved]}", len(moved) - 1)  # fmt: skip


def _periods_end(
    scenario: Scenario,
    world: World, periods: dict[tuple[str, date], list[Attempt]],
    states: dict[str, tuple[str, date | None]], v: Violations,
) -> None:  # fmt: skip
    """Only a subscription's latest period may be unpaid, and then its status must be earned:
    past_due after the last soft retry, payment_method_required after a hard decline (or a
    missing billing key), cancelled, or dunning still running when the calendar ends."""
    s = scenario.settings
    max_attempts = s.max_attempts or len(s.retry_schedule_days) + 1
    last_retry = max(s.retry_schedule_days or (0,))
    latest = _latest_periods(periods)
    for (sub, day), attempts in periods.items():
        if any(a.status in MONEY_MOVED for a in attempts):
            continue
        status = states.get(sub, ("", None))[0]
        last = attempts[-1]
        # The world says why a card stopped paying; a status nothing in it explains is a bug.
        behaviour = world.members[sub].behaviour if sub in world.members else None
        earned = {
            PAST_DUE: last.decline_kind == SOFT
            and last.attempt_no >= max_attempts
            and behaviour == "soft_decline",
            PAYMENT_METHOD_REQUIRED: last.decline_kind == HARD
            and behaviour in ("hard_decline", "card_replaced", "billing_key_deleted"),
            SUB_CANCELLED: True,
            ACTIVE: day + timedelta(days=last_retry + 1) >= scenario.calendar.end,
        }.get(status, False)
        if latest[sub] == day and earned:
            continue
        v.add("every_period_ends_paid_past_due_or_cancelled",
              f"{sub} {day}: {[(a.attempt_no, a.status, a.decline_kind) for a in attempts]}, "
              f"subscription {status}")  # fmt: skip


def _charged_as_planned(
    world: World, every_payment: list[dict[str, Any]], rows: dict[str, Attempt],
    periods: dict[tuple[str, date], list[Attempt]],
    planned: dict[tuple[str, date], set[int]], v: Violations,
) -> None:  # fmt: skip
    """Every charge was ours, for its member's customer, after its billing date and before a
    cancellation, and its first attempt for an amount a plan approved."""
    name = "nothing_charged_outside_a_plan"
    for p in every_payment:
        uid = p["merchant_uid"]
        parsed = parse_merchant_uid(uid)
        member = world.members.get(parsed[0]) if parsed else None
        if parsed is None or member is None:
            v.add(name, f"{uid}: not a merchant_uid of a simulated subscription")
            continue
        sub, day, attempt_no = parsed
        sent = _seoul(p["started_at"])
        moved = p["status"] in GATEWAY_MONEY_MOVED
        if p["customer_uid"] != member.customer_uid:
            v.add(name, f"{uid}: charged billing key {p['customer_uid']}")
        if sent is not None and sent.date() < day:
            v.add("billing_dates_follow_anchor_rules", f"{uid}: sent on {sent.date()}")
        if moved and member.cancelled_on and sent and sent >= _midnight(member.cancelled_on):
            v.add("no_charge_after_cancellation",
                  f"{uid} at {sent} (cancelled {member.cancelled_on})")  # fmt: skip
        row = rows.get(uid)
        first = periods.get((sub, day), [row])[0]
        if attempt_no == 1 and (sub, day) not in planned:
            v.add(name, f"{uid}: no plan approved it")
        elif first is not None and first.amount not in planned.get((sub, day), {first.amount}):
            v.add(name, f"{uid}: asked {first.amount}, plans said {planned[(sub, day)]}")
        elif row is not None and first is not None and row.amount != first.amount:
            v.add(name, f"{uid}: asked {row.amount}, the period's first attempt {first.amount}")
        elif row is not None and row.error_code == "found_by_reconciliation":
            v.add(name, f"{uid}: the ledger learned of it only by reconciliation")


def _compare_money(payments: list[dict[str, Any]], rows: dict[str, Attempt], v: Violations) -> None:
    at_gateway = {p["merchant_uid"]: p for p in payments}
    for uid, p in at_gateway.items():
        row = rows.get(uid)
        agrees = AGREES.get(p["status"], ())
        if row is None:
            v.add("ledger_equals_gateway", f"{uid}: {p['status']} at the gateway, no ledger row")
        elif row.status not in agrees:
            v.add("ledger_equals_gateway", f"{uid}: gateway {p['status']}, ledger {row.status}")
        elif p["status"] in GATEWAY_MONEY_MOVED and _paid(row) != int(p["amount"]):
            v.add(
                "ledger_equals_gateway",
                f"{uid}: gateway {int(p['amount'])} KRW, ledger {row.status} {_paid(row)} KRW",
            )
        elif row.status == CANCELLED and int(row.cancel_amount or 0) != int(p["cancel_amount"]):
            v.add("ledger_equals_gateway", f"{uid}: refunds differ")
    for uid, row in rows.items():
        if row.status in MONEY_MOVED and uid not in at_gateway:
            v.add("ledger_equals_gateway", f"{uid}: ledger {row.status}, unknown to the gateway")


def _check_dates(
    world: World,
    periods: dict[tuple[str, date], list[Attempt]],
    states: dict[str, tuple[str, date | None]],
    end: date,
    v: Violations,
) -> None:
    """Billed on exactly the anchor schedule's dates up to a cancellation; fewer only when the
    subscription stopped on an unpaid period, a mismatch, or a missing billing key."""
    billed: dict[str, list[date]] = defaultdict(list)
    for sub, day in periods:
        billed[sub].append(day)
    for sub, member in world.members.items():
        if member.start > end:
            continue
        dates = sorted(billed.get(sub, []))
        until = min(end, member.cancelled_on - timedelta(days=1)) if member.cancelled_on else end
        expected = [d for d in expected_billing_dates(member, end) if d <= until]
        if dates != expected[: len(dates)]:
            v.add("billing_dates_follow_anchor_rules",
                  f"{sub} (anchor {member.anchor_day}, cancelled {member.cancelled_on}): "
                  f"billed {dates[:4]}..., the rules give {expected[:4]}...")  # fmt: skip
            continue
        if len(dates) == len(expected):
            continue
        status, next_date = states.get(sub, ("", None))
        latest = periods[(sub, dates[-1])] if dates else []
        if latest and not any(a.status in MONEY_MOVED for a in latest):
            continue  # stopped on an unpaid period: _periods_end judges it
        if _held_for_a_person(latest):
            continue
        owed = expected[len(dates)]
        if (
            status in (PAYMENT_METHOD_REQUIRED, SUB_CANCELLED)
            and next_date == owed
            and member.behaviour == "billing_key_deleted"
        ):
            continue  # the pre-check found the deleted key before this date (then maybe a cancel)
        if (
            status == SUB_CANCELLED
            and next_date == owed
            and len(expected) - len(dates) == 1
            and member.cancelled_on is not None
            and (member.cancelled_on - owed).days <= CANCEL_GRACE_DAYS
        ):
            # Due, delayed (an outage day), then cancelled before the catch-up run: a cancelled
            # subscription is never charged, by design. Counted, not a violation.
            v.lost_to_cancellation += 1
            continue
        v.add("billing_dates_follow_anchor_rules",
              f"{sub} ({status}): {expected[len(dates) :][:3]} never billed")  # fmt: skip


def _latest_periods(periods: dict[tuple[str, date], list[Attempt]]) -> dict[str, date]:
    """Each subscription's latest billed date."""
    latest: dict[str, date] = {}
    for sub, day in periods:
        latest[sub] = max(day, latest.get(sub, day))
    return latest


def _held_for_a_person(attempts: list[Attempt]) -> bool:
    """Paid with another amount: by design the subscription waits on its billing date until a
    person settles the row (docs/operations.md), so later dates are not billed meanwhile."""
    return any(a.status == AMOUNT_MISMATCH for a in attempts)


def figures_of(
    world: World,
    periods: dict[tuple[str, date], list[Attempt]],
    states: dict[str, tuple[str, date | None]],
    payments: list[dict[str, Any]],
) -> dict[str, Any]:
    paid_at = {p["merchant_uid"]: _seoul(p["paid_at"]) for p in payments if p["paid_at"]}
    collected = sum(
        int(p["amount"]) - int(p["cancel_amount"] or 0)
        for p in payments
        if p["status"] in GATEWAY_MONEY_MOVED
    )
    first_tries = first_paid = 0
    soft = recovered = 0
    soft_krw = recovered_krw = 0
    days_to_recover: list[int] = []
    by_reason: dict[str, Counter[str]] = defaultdict(Counter)
    by_retry_day: Counter[int] = Counter()
    no_key = mismatched = 0
    for (_, day), attempts in periods.items():
        first = attempts[0]
        if first.attempt_no == 1 and first.imp_uid:
            first_tries += 1
            first_paid += first.status in MONEY_MOVED
        mismatched += _held_for_a_person(attempts)
        no_key += any(a.error_code == MISSING_BILLING_KEY for a in attempts)
        if not (first.status == FAILED and first.decline_kind == SOFT):
            continue
        reason = first.fail_reason or "unknown"
        soft += 1
        soft_krw += int(first.amount or 0)
        by_reason[reason]["declined"] += 1
        paid = [a for a in attempts if a.status in MONEY_MOVED]
        if paid:
            recovered += 1
            recovered_krw += _paid(paid[0])
            by_reason[reason]["recovered"] += 1
            when = paid_at.get(paid[0].merchant_uid)
            if when is not None:
                days = (when.date() - day).days
                days_to_recover.append(days)
                by_retry_day[days] += 1
    statuses = Counter(status for status, _ in states.values())
    held = sum(
        1 for sub, day in _latest_periods(periods).items()
        if states.get(sub, ("",))[0] == ACTIVE and _held_for_a_person(periods[(sub, day)])
    )  # fmt: skip
    members = len(world.members)
    churned = statuses[PAST_DUE] + statuses[PAYMENT_METHOD_REQUIRED]
    return {
        "subscriptions": members,
        "signed_up": sum(m.signed_up for m in world.members.values()),
        "cancelled": statuses[SUB_CANCELLED],
        "periods": len(periods),
        "charges_sent": len(payments),
        "revenue_krw": collected,
        "first_attempt_success": _ratio(first_paid, first_tries),
        "soft_declined_periods": soft,
        "recovered_periods": recovered,
        "recovery_rate_count": _ratio(recovered, soft),
        "recovery_rate_krw": _ratio(recovered_krw, soft_krw),
        "days_to_recover_mean": round(mean(days_to_recover), 2) if days_to_recover else None,
        "days_to_recover_median": median(days_to_recover) if days_to_recover else None,
        "involuntary_churn": churned,
        "involuntary_churn_rate": _ratio(churned, members),
        "past_due": statuses[PAST_DUE],
        "payment_method_required": statuses[PAYMENT_METHOD_REQUIRED],
        "no_billing_key_attempts": no_key,
        "amount_mismatch_periods": mismatched,
        "held_for_a_person": held,
        "by_decline_reason": {r: dict(c) for r, c in sorted(by_reason.items())},
        "recovered_by_retry_day": {f"day {d}": n for d, n in sorted(by_retry_day.items())},
    }


def _paid(row: Attempt) -> int:
    """What the ledger says the gateway took: a paid row, the amount asked; a mismatch (or a
    refunded row), the amount the gateway reported."""
    if row.status == PAID or row.paid_amount is None:
        return int(row.amount or 0)
    return int(row.paid_amount)


def _midnight(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time(), SEOUL)


def _seoul(epoch: Any) -> datetime | None:
    return datetime.fromtimestamp(int(epoch), SEOUL) if epoch else None


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None
