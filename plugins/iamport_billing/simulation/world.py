"""The simulated world around the billing system: customers, their cards, and what they do.

Everything is drawn up front from the scenario's seed, as a list of members (subscriptions) and
a calendar of morning events (08:00 KST, before any DAG runs): sign-ups, cancellations, price
changes, cards that start or stop declining, new cards with ops putting the subscription back,
billing keys deleted. Events act only where a real world would: the subscriptions table (the
merchant's app) and the gateway's billing keys (the card company, the customer).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from iamport_billing.emulator.config import (
    CARD_ALWAYS_PAID,
    CARD_HARD_DECLINE,
    CARD_SHORT_PAID,
    CARD_SOFT_DECLINE,
)
from iamport_billing.policy import add_month_anchored
from iamport_billing.simulation.scenario import Scenario

BEHAVIOURS = (
    "soft_decline",
    "hard_decline",
    "card_replaced",
    "billing_key_deleted",
    "amount_mismatch",
)


@dataclass
class Member:
    """One simulated subscription and what its customer will do."""

    subscription_id: str
    customer_uid: str
    amount: int
    anchor_day: int
    start: date  # the first billing date
    behaviour: str | None = None
    event_day: date | None = None  # the billing date the behaviour strikes
    days: int = 0  # k: recovery / replacement delay
    cancelled_on: date | None = None
    signed_up: bool = False  # joined during the calendar (a sign-up event adds it)
    anchor_recorded: bool = True  # False: the row's billing_anchor_day is NULL
    buyer_name: str = "홍길동"

    def row(self) -> dict[str, Any]:
        return {
            "subscription_id": self.subscription_id,
            "customer_uid": self.customer_uid,
            "amount": self.amount,
            "name": f"Plan {self.amount:,} KRW",
            "next_billing_date": self.start,
            "billing_anchor_day": self.anchor_day if self.anchor_recorded else None,
            "buyer_name": self.buyer_name,
        }


@dataclass(frozen=True)
class Event:
    """``kind`` is one of: signup, cancel, reprice, card, delete_key, put_back, refund (of
    the latest paid charge; ``partial``: half of it)."""

    kind: str
    subscription_id: str = ""
    customer_uid: str = ""
    card: str = ""
    amount: int = 0
    new_amount: int = 0
    partial: bool = False


@dataclass
class World:
    scenario: Scenario
    members: dict[str, Member] = field(default_factory=dict)
    events: dict[date, list[Event]] = field(default_factory=dict)

    @property
    def initial(self) -> list[Member]:
        return [m for m in self.members.values() if not m.signed_up]

    def on(self, day: date) -> list[Event]:
        return self.events.get(day, [])

    def add(self, day: date, event: Event) -> None:
        self.events.setdefault(day, []).append(event)


def build_world(scenario: Scenario) -> World:
    """The members and the calendar of events, reproducible from the scenario's seed."""
    rng = random.Random(scenario.seed)
    world = World(scenario)
    cal, pop = scenario.calendar, scenario.population
    for i in range(pop.subscriptions):
        anchor = _anchor(rng, pop.month_end_anchor_share)
        first = _first_on_or_after(cal.start, anchor)
        _join(world, rng, f"sub{i:06d}", anchor, first)
    month = cal.start
    while month <= cal.end:
        days = [d for d in _days(month, add_month_anchored(month, cal.start.day)) if d <= cal.end]
        for j in range(pop.signups_per_month):
            day = rng.choice(days)
            member = _join(world, rng, f"new{month:%Y%m}{j:05d}", day.day, day, signed_up=True)
            world.add(day, Event("signup", member.subscription_id))
        for _ in range(pop.cancellations_per_month):
            day = rng.choice(days)
            live = [m for m in world.members.values() if m.cancelled_on is None and m.start < day]
            if live:
                member = rng.choice(live)
                member.cancelled_on = day
                world.add(day, Event("cancel", member.subscription_id))
        month = add_month_anchored(month, cal.start.day)
    for change in pop.price_changes:
        world.add(
            change.on, Event("reprice", amount=change.plan_amount, new_amount=change.new_amount)
        )
    _ask_refunds(world)
    return world


def _ask_refunds(world: World) -> None:
    """Drawn apart from the rest, so a scenario without refunds keeps its world."""
    refunds, end = world.scenario.refunds, world.scenario.calendar.end
    rng = random.Random(f"{world.scenario.seed}-refunds")
    for m in list(world.members.values()):
        if not refunds.share or rng.random() >= refunds.share:
            continue
        days = [
            d + timedelta(days=rng.randint(1, 5))
            for d in _billing_dates(m.start, m.anchor_day, end)
        ]
        days = [d for d in days if d <= end]
        if days:
            partial = rng.random() < refunds.partial_share
            world.add(rng.choice(days), Event("refund", m.subscription_id, partial=partial))


def _join(
    world: World, rng: random.Random, sub: str, anchor: int, first: date, *,
    signed_up: bool = False,
) -> Member:  # fmt: skip
    pop, cal = world.scenario.population, world.scenario.calendar
    amount = rng.choices([p.amount for p in pop.plans], [p.share for p in pop.plans])[0]
    member = Member(sub, f"cust-{sub}", amount, anchor, first, signed_up=signed_up)
    member.anchor_recorded = rng.random() >= pop.anchorless_share
    if rng.random() < pop.long_buyer_name_share:
        member.buyer_name = "주식회사 한국정기결제서비스 대표이사 홍길동"  # 26 characters
    world.members[sub] = member
    roll, acc = rng.random(), 0.0
    for name in BEHAVIOURS:
        behaviour = getattr(world.scenario.cards, name)
        acc += behaviour.share
        if roll < acc:
            member.behaviour = name
            member.days = rng.randint(*behaviour.days)
            break
    if member.behaviour:
        dates = list(_billing_dates(first, anchor, cal.end))
        # Strike early enough that dunning (and a recovery) can finish inside the calendar.
        # Not a sign-up's first billing date (its card is registered that morning), and a
        # billing key deleted two days before must exist by then.
        room = [
            d for d in (dates[1:] if signed_up else dates)
            if d + timedelta(days=member.days + 10) <= cal.end
            and d - timedelta(days=2) >= cal.start
        ]  # fmt: skip
        if room:
            member.event_day = rng.choice(room)
            _schedule(world, member)
        else:
            member.behaviour = None
    return member


def _schedule(world: World, m: Member) -> None:
    day, k, uid = m.event_day, m.days, m.customer_uid
    assert day is not None
    if m.behaviour == "soft_decline":
        world.add(day, Event("card", m.subscription_id, uid, CARD_SOFT_DECLINE))
        world.add(
            day + timedelta(days=max(k, 1)), Event("card", m.subscription_id, uid, CARD_ALWAYS_PAID)
        )
    elif m.behaviour == "hard_decline":
        world.add(day, Event("card", m.subscription_id, uid, CARD_HARD_DECLINE))
    elif m.behaviour == "card_replaced":
        world.add(day, Event("card", m.subscription_id, uid, CARD_HARD_DECLINE))
        later = day + timedelta(days=max(k, 1))
        world.add(later, Event("card", m.subscription_id, uid, CARD_ALWAYS_PAID))
        # Ops put it back the day after the customer registered the new card.
        world.add(later + timedelta(days=1), Event("put_back", m.subscription_id))
    elif m.behaviour == "billing_key_deleted":
        world.add(day - timedelta(days=2), Event("delete_key", m.subscription_id, uid))
    elif m.behaviour == "amount_mismatch":
        world.add(day, Event("card", m.subscription_id, uid, CARD_SHORT_PAID))
        world.add(day + timedelta(days=1), Event("card", m.subscription_id, uid, CARD_ALWAYS_PAID))


def _anchor(rng: random.Random, month_end_share: float) -> int:
    roll = rng.random()
    for day in (29, 30, 31):
        if roll < month_end_share:
            return day
        roll -= month_end_share
    return rng.randint(1, 28)


def _first_on_or_after(start: date, anchor: int) -> date:
    """The first billing date on or after ``start`` for this anchor day."""
    candidate = add_month_anchored(_month_before(start), anchor)
    return candidate if candidate >= start else add_month_anchored(candidate, anchor)


def _month_before(day: date) -> date:
    return (day.replace(day=1) - timedelta(days=1)).replace(day=1)


def _days(start: date, end: date) -> list[date]:
    return [start + timedelta(days=i) for i in range((end - start).days)]


def _billing_dates(first: date, anchor: int, until: date) -> Iterator[date]:
    day = first
    while day <= until:
        yield day
        day = add_month_anchored(day, anchor)


def expected_billing_dates(member: Member, until: date) -> list[date]:
    """Every billing date the anchor rules give this member up to ``until`` (inclusive)."""
    return list(_billing_dates(member.start, member.anchor_day, until))
