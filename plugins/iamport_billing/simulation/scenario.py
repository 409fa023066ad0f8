"""A simulation scenario: calendar, population, card behaviour, incidents, settings under test.

Read from YAML or TOML into typed, frozen dataclasses. Unknown keys, wrong types and values
out of range are refused with the path of the mistake (``cards.soft_decline.share: ...``), so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from iamport_billing.emulator.config import API_MODES, SWITCH_FIELDS, EmulatorConfig
from iamport_billing.policy import add_month_anchored


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so ``on:`` (a day) stays a key, not True."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


# The gateway connection's read timeout in a simulation. A stalled charge try waits out the
# lease (+0.5 s) and the next try while the first one's request hangs, all within it.
READ_TIMEOUT_S = 10
STALL_LEASE_LIMIT_S = 6.0
# Emulator switches only Iamport V1 has words for (its getToken and findAll): on PortOne V2
# an incident made only of these changes nothing, and the report says so.
V1_ONLY_SWITCHES = frozenset(
    {"token_status", "bearer_refused", "token_already_expired", "findall_bare_list"}
)


class ScenarioError(ValueError):
    """The scenario file is wrong; the message names the key."""


@dataclass(frozen=True)
class Calendar:
    start: date = date(2027, 1, 1)
    months: int = 12

    @property
    def end(self) -> date:
        """The last simulated day (inclusive)."""
        last = self.start
        for _ in range(self.months):
            last = add_month_anchored(last, self.start.day)
        return last - timedelta(days=1)


@dataclass(frozen=True)
class Plan:
    amount: int
    share: float


@dataclass(frozen=True)
class PriceChange:
    on: date
    plan_amount: int
    new_amount: int


@dataclass(frozen=True)
class Population:
    subscriptions: int = 1000
    plans: tuple[Plan, ...] = (Plan(9900, 0.6), Plan(29000, 0.3), Plan(99000, 0.1))
    # Share of subscriptions anchored on 29, 30 and 31 (each); the rest spread over 1..28.
    month_end_anchor_share: float = 0.05
    # Share of subscription rows without billing_anchor_day (a table that never filled it):
    # their anchor is the day of their first billing date, and must hold all the same.
    anchorless_share: float = 0.0
    # Share of rows whose buyer_name is over the API's 16 characters (it must be trimmed).
    long_buyer_name_share: float = 0.0
    signups_per_month: int = 0
    cancellations_per_month: int = 0
    price_changes: tuple[PriceChange, ...] = ()


@dataclass(frozen=True)
class Behaviour:
    """Share of subscriptions (and of sign-ups) whose card does this once, in a random month;
    ``days`` is the inclusive range of k (recovery, replacement) drawn per subscription."""

    share: float = 0.0
    days: tuple[int, int] = (1, 1)


@dataclass(frozen=True)
class Cards:
    soft_decline: Behaviour = Behaviour(0.05, (1, 6))  # declines, recovers after k days
    hard_decline: Behaviour = Behaviour(0.01)  # declines for good
    card_replaced: Behaviour = Behaviour(0.01, (1, 10))  # hard decline, new card after d days
    billing_key_deleted: Behaviour = Behaviour(0.005)  # the customer deletes the card
    amount_mismatch: Behaviour = Behaviour(0.0)  # paid with another amount, once


@dataclass(frozen=True)
class Refunds:
    """Share of subscriptions whose customer asks, once, for a refund of a paid charge 1-5
    days after it; ``partial_share`` of those asks for half, the rest for all of it."""

    share: float = 0.0
    partial_share: float = 0.5


@dataclass(frozen=True)
class Incident:
    """Trouble from ``start`` to ``end`` (inclusive): an outage (the gateway unreachable all
    day), any of the emulator's fault rates and latency, or broken rows in the warehouse."""

    start: date
    end: date
    outage: bool = False
    error_rate: float = 0.0
    drop_after_commit_rate: float = 0.0
    rate_limit_rate: float = 0.0
    latency_ms: float = 0.0
    # This share of the subscriptions table's amounts is broken (0) by an upstream job on these
    # mornings and mended the morning after.
    broken_amount_share: float = 0.0
    # A price change for this share of the subscriptions lands while the daily run is between
    # its plan and its charge tasks (+10%, for good).
    reprice_during_run_share: float = 0.0
    # A zombie try: the daily run's first charge request hangs in the network past the task's
    # lease; the task's next try runs meanwhile and that card declines; then the hung request
    # reaches Iamport, where the card pays.
    stalled_charge_try: bool = False
    # The emulator's foreign/hostile switches for these days, e.g. foreign_404_json: true.
    switches: tuple[tuple[str, Any], ...] = ()

    def covers(self, day: date) -> bool:
        return self.start <= day <= self.end


@dataclass(frozen=True)
class Backfill:
    """On day ``on`` ops run the backfill DAG for billing dates ``start``..``end``."""

    on: date
    start: date
    end: date


@dataclass(frozen=True)
class Settings:
    retry_schedule_days: tuple[int, ...] = (1, 3, 5, 7)
    max_attempts: int | None = None  # default: len(retry_schedule_days) + 1
    max_concurrency: int = 8
    batch_size: int = 500
    max_count: int | None = None
    max_total_amount: int | None = None
    max_total_multiple_of_previous: float | None = 3.0
    # A person approves a plan stopped by the multiple-of-previous guardrail the same day
    # (re-run with the multiple off); false: nobody does, and the backlog grows.
    approve_tripped_multiple: bool = True
    # A person clears a failed daily run's failed charge tasks, and only those (the UI's Clear
    # without Downstream), the next morning at 08:30; false: nobody does.
    clear_failed_charge_tasks: bool = False
    # Wall-clock leases: a simulated day takes about a second, so leases shrink to match.
    pending_lease_seconds: float = 3.0
    unknown_settle_seconds: float = 0.2


@dataclass(frozen=True)
class Scenario:
    name: str = "scenario"
    seed: int = 7
    # The gateway the DAGs charge through: Iamport V1 or PortOne V2 (the emulator in that mode).
    api: str = "v1"
    calendar: Calendar = field(default_factory=Calendar)
    population: Population = field(default_factory=Population)
    cards: Cards = field(default_factory=Cards)
    incidents: tuple[Incident, ...] = ()
    backfills: tuple[Backfill, ...] = ()
    refunds: Refunds = field(default_factory=Refunds)
    settings: Settings = field(default_factory=Settings)

    def with_months(self, months: int) -> Scenario:
        from dataclasses import replace

        return replace(self, calendar=replace(self.calendar, months=_months(months, "--months")))

    def with_seed(self, seed: int) -> Scenario:
        from dataclasses import replace

        return replace(self, seed=seed)

    def with_api(self, api: str) -> Scenario:
        from dataclasses import replace

        return replace(self, api=_api(api, "--api"))

    def not_on_this_gateway(self) -> list[str]:
        """The incidents' switches that change nothing on this scenario's gateway."""
        if self.api == "v1":
            return []
        return [
            f"{i.start}..{i.end}: {k}"
            for i in self.incidents
            for k, _ in i.switches
            if k in V1_ONLY_SWITCHES
        ]

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return _plain(asdict(self))


# -- loading ------------------------------------------------------------------------------------


def load_scenario(path: str | Path) -> Scenario:
    """Parse and check a .yaml/.yml/.toml scenario file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ScenarioError(f"cannot read scenario {path}: {e.strerror}") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader
        else:
            raise ScenarioError(f"{path}: a scenario is a .yaml, .yml or .toml file")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ScenarioError(f"{path}: not valid {path.suffix[1:].upper()}: {e}") from None
    return parse_scenario(data if data is not None else {}, name=path.stem)


def parse_scenario(data: Any, *, name: str = "scenario") -> Scenario:
    d = _mapping(data, "scenario")
    _only(d, "scenario", {f.name for f in fields(Scenario)})
    calendar = _calendar(d.get("calendar", {}))
    scenario = Scenario(
        name=_str(d.get("name", name), "name"),
        seed=_int(d.get("seed", 7), "seed"),
        api=_api(d.get("api", "v1"), "api"),
        calendar=calendar,
        population=_population(d.get("population", {}), calendar),
        cards=_cards(d.get("cards", {})),
        incidents=tuple(
            _incident(x, f"incidents[{i}]", calendar)
            for i, x in enumerate(_list(d.get("incidents", []), "incidents"))
        ),
        backfills=tuple(
            _backfill(x, f"backfills[{i}]", calendar)
            for i, x in enumerate(_list(d.get("backfills", []), "backfills"))
        ),
        refunds=_refunds(d.get("refunds", {})),
        settings=_settings(d.get("settings", {})),
    )
    lease = scenario.settings.pending_lease_seconds
    if any(i.stalled_charge_try for i in scenario.incidents) and lease > STALL_LEASE_LIMIT_S:
        raise ScenarioError(
            f"incidents: stalled_charge_try needs settings.pending_lease_seconds up to "
            f"{STALL_LEASE_LIMIT_S:g} (got {lease:g}): the hung request must outlast the lease "
            f"and still be answered within the simulation's {READ_TIMEOUT_S} s read timeout"
        )
    shares = sum(getattr(scenario.cards, f.name).share for f in fields(Cards))
    if shares > 1:
        raise ScenarioError(f"cards: the behaviour shares add up to {shares:g}, over 1")
    return scenario


def _refunds(data: Any) -> Refunds:
    d = _mapping(data, "refunds")
    _only(d, "refunds", {"share", "partial_share"})
    return Refunds(
        share=_share(d.get("share", 0), "refunds.share"),
        partial_share=_share(d.get("partial_share", 0.5), "refunds.partial_share"),
    )


def _calendar(data: Any) -> Calendar:
    d = _mapping(data, "calendar")
    _only(d, "calendar", {"start", "months"})
    return Calendar(
        start=_date(d.get("start", Calendar.start), "calendar.start"),
        months=_months(d.get("months", 12), "calendar.months"),
    )


def _population(data: Any, calendar: Calendar) -> Population:
    d = _mapping(data, "population")
    _only(d, "population", {f.name for f in fields(Population)})
    plans = tuple(
        _plan(x, f"population.plans[{i}]")
        for i, x in enumerate(_list(d.get("plans", [{"amount": 9900, "share": 1}]), "plans"))
    )
    if not plans:
        raise ScenarioError("population.plans: at least one plan")
    total = sum(p.share for p in plans)
    if abs(total - 1) > 1e-6:
        raise ScenarioError(f"population.plans: the shares add up to {total:g}, not 1")
    changes = []
    for i, x in enumerate(_list(d.get("price_changes", []), "population.price_changes")):
        where = f"population.price_changes[{i}]"
        c = _mapping(x, where)
        _only(c, where, {"on", "plan_amount", "new_amount"})
        change = PriceChange(
            on=_day_in(c.get("on"), f"{where}.on", calendar),
            plan_amount=_int(c.get("plan_amount"), f"{where}.plan_amount", minimum=1),
            new_amount=_int(c.get("new_amount"), f"{where}.new_amount", minimum=1),
        )
        if change.plan_amount not in {p.amount for p in plans}:
            raise ScenarioError(f"{where}.plan_amount: no plan costs {change.plan_amount}")
        changes.append(change)
    return Population(
        subscriptions=_int(
            d.get("subscriptions", 1000), "population.subscriptions", minimum=1, maximum=1_000_000
        ),
        plans=plans,
        month_end_anchor_share=_share(
            d.get("month_end_anchor_share", 0.05),
            "population.month_end_anchor_share",
            maximum=1 / 3,
        ),
        anchorless_share=_share(d.get("anchorless_share", 0), "population.anchorless_share"),
        long_buyer_name_share=_share(
            d.get("long_buyer_name_share", 0), "population.long_buyer_name_share"
        ),
        signups_per_month=_int(d.get("signups_per_month", 0), "population.signups_per_month"),
        cancellations_per_month=_int(
            d.get("cancellations_per_month", 0), "population.cancellations_per_month"
        ),
        price_changes=tuple(changes),
    )


def _plan(data: Any, where: str) -> Plan:
    d = _mapping(data, where)
    _only(d, where, {"amount", "share"})
    return Plan(
        amount=_int(d.get("amount"), f"{where}.amount", minimum=1, maximum=100_000_000),
        share=_share(d.get("share"), f"{where}.share"),
    )


def _cards(data: Any) -> Cards:
    d = _mapping(data, "cards")
    names = {f.name for f in fields(Cards)}
    _only(d, "cards", names)
    made = {}
    for name in names:
        if name not in d:
            continue
        where = f"cards.{name}"
        b = _mapping(d[name], where)
        _only(b, where, {"share", "days"})
        days = _list(b.get("days", [1, 1]), f"{where}.days")
        if len(days) != 2:
            raise ScenarioError(f"{where}.days: [lowest, highest], got {days!r}")
        low, high = (_int(x, f"{where}.days", minimum=0, maximum=365) for x in days)
        if low > high:
            raise ScenarioError(f"{where}.days: {low} is above {high}")
        made[name] = Behaviour(share=_share(b.get("share", 0), f"{where}.share"), days=(low, high))
    return Cards(**made)


def _incident(data: Any, where: str, calendar: Calendar) -> Incident:
    d = _mapping(data, where)
    named = {f.name for f in fields(Incident)[2:-1]}
    _only(d, where, {"on", "from", "to", *named, *SWITCH_FIELDS})
    start, end = _span(d, where, calendar)
    switches = {k: d[k] for k in SWITCH_FIELDS if k in d}
    try:
        EmulatorConfig().update_faults(switches)
    except (TypeError, ValueError) as e:
        raise ScenarioError(f"{where}: {e}") from None
    incident = Incident(
        start=start,
        end=end,
        outage=_bool(d.get("outage", False), f"{where}.outage"),
        error_rate=_share(d.get("error_rate", 0), f"{where}.error_rate"),
        drop_after_commit_rate=_share(
            d.get("drop_after_commit_rate", 0), f"{where}.drop_after_commit_rate"
        ),
        rate_limit_rate=_share(d.get("rate_limit_rate", 0), f"{where}.rate_limit_rate"),
        latency_ms=_number(d.get("latency_ms", 0), f"{where}.latency_ms", maximum=60_000),
        broken_amount_share=_share(d.get("broken_amount_share", 0), f"{where}.broken_amount_share"),
        reprice_during_run_share=_share(
            d.get("reprice_during_run_share", 0), f"{where}.reprice_during_run_share"
        ),
        stalled_charge_try=_bool(d.get("stalled_charge_try", False), f"{where}.stalled_charge_try"),
        switches=tuple(sorted(switches.items())),
    )
    if incident == Incident(start, end):
        raise ScenarioError(
            f"{where}: names no trouble (outage, a rate, latency_ms, a share, a switch, "
            "stalled_charge_try)"
        )
    return incident


def _backfill(data: Any, where: str, calendar: Calendar) -> Backfill:
    d = _mapping(data, where)
    _only(d, where, {"on", "from", "to"})
    on = _day_in(d.get("on"), f"{where}.on", calendar)
    start = _date(d.get("from"), f"{where}.from")
    end = _date(d.get("to", d.get("from")), f"{where}.to")
    if not start <= end < on:
        raise ScenarioError(f"{where}: needs from <= to < on, got {start}, {end}, {on}")
    return Backfill(on=on, start=start, end=end)


def _settings(data: Any) -> Settings:
    d = _mapping(data, "settings")
    _only(d, "settings", {f.name for f in fields(Settings)})
    days = tuple(
        _int(x, "settings.retry_schedule_days", minimum=1, maximum=60)
        for x in _list(d.get("retry_schedule_days", [1, 3, 5, 7]), "settings.retry_schedule_days")
    )
    if list(days) != sorted(set(days)):
        raise ScenarioError(f"settings.retry_schedule_days: must rise, got {list(days)}")
    optional = {
        "max_attempts": lambda v, w: _int(v, w, minimum=1, maximum=99),
        "max_count": lambda v, w: _int(v, w),
        "max_total_amount": lambda v, w: _int(v, w),
        "max_total_multiple_of_previous": lambda v, w: _number(v, w, minimum=1),
    }
    values = {
        name: None
        if d.get(name, getattr(Settings, name)) is None
        else check(d.get(name, getattr(Settings, name)), f"settings.{name}")
        for name, check in optional.items()
    }
    return Settings(
        retry_schedule_days=days,
        max_concurrency=_int(
            d.get("max_concurrency", 8), "settings.max_concurrency", minimum=1, maximum=256
        ),
        batch_size=_int(d.get("batch_size", 500), "settings.batch_size", minimum=1, maximum=5000),
        approve_tripped_multiple=_bool(
            d.get("approve_tripped_multiple", True), "settings.approve_tripped_multiple"
        ),
        clear_failed_charge_tasks=_bool(
            d.get("clear_failed_charge_tasks", False), "settings.clear_failed_charge_tasks"
        ),
        pending_lease_seconds=_number(
            d.get("pending_lease_seconds", 3.0), "settings.pending_lease_seconds", minimum=1
        ),
        unknown_settle_seconds=_number(
            d.get("unknown_settle_seconds", 0.2), "settings.unknown_settle_seconds", maximum=60
        ),
        **values,
    )


# -- field checks -------------------------------------------------------------------------------


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ScenarioError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _only(d: dict[str, Any], where: str, allowed: set[str]) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ScenarioError(f"{where}: expected text, got {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ScenarioError(f"{where}: expected true or false, got {value!r}")
    return value


def _int(value: Any, where: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(f"{where}: expected a whole number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        top = f"..{maximum}" if maximum is not None else " or more"
        raise ScenarioError(f"{where}: {value} is out of range ({minimum}{top})")
    return value


def _number(value: Any, where: str, *, minimum: float = 0, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{where}: expected a number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ScenarioError(f"{where}: {value} is out of range")
    return float(value)


def _share(value: Any, where: str, *, maximum: float = 1.0) -> float:
    return _number(value, where, minimum=0, maximum=maximum)


def _api(value: Any, where: str) -> str:
    if value not in API_MODES:
        raise ScenarioError(f"{where}: expected one of {list(API_MODES)}, got {value!r}")
    return value


def _months(value: Any, where: str) -> int:
    return _int(value, where, minimum=1, maximum=60)


def _date(value: Any, where: str) -> date:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise ScenarioError(f"{where}: expected a date YYYY-MM-DD, got {value!r}")


def _day_in(value: Any, where: str, calendar: Calendar) -> date:
    day = _date(value, where)
    if not calendar.start <= day <= calendar.end:
        raise ScenarioError(
            f"{where}: {day} is outside the calendar {calendar.start}..{calendar.end}"
        )
    return day


def _span(d: dict[str, Any], where: str, calendar: Calendar) -> tuple[date, date]:
    if "on" in d and ("from" in d or "to" in d):
        raise ScenarioError(f"{where}: give either on, or from and to")
    if "on" in d:
        day = _day_in(d["on"], f"{where}.on", calendar)
        return day, day
    start = _day_in(d.get("from"), f"{where}.from", calendar)
    end = _day_in(d.get("to", d.get("from")), f"{where}.to", calendar)
    if end < start:
        raise ScenarioError(f"{where}: to {end} is before from {start}")
    return start, end


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, date):
        return value.isoformat()
    return value
