"""Billing policy: pure functions with no I/O, so every rule is unit tested on its own.

merchant_uid scheme, input validation, outcome classification (hard/soft declines), the
dunning schedule, month-anchored billing dates, guardrails and the billing date of a run.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import pendulum

from iamport_billing.states import HARD, SOFT

SEOUL = pendulum.timezone("Asia/Seoul")
MERCHANT_UID_MAX = 40
CUSTOMER_UID_MAX = 80
NAME_MAX = 40
# Field limits of POST /subscribe/payments/again (shared/iamport/v1.openapi.json).
SPEC_LIMITS = {
    "buyer_name": 16, "buyer_email": 64, "buyer_tel": 16, "buyer_addr": 128,
    "buyer_postcode": 8, "channel_key": 55,
}  # fmt: skip
# Display fields: cut to fit, with a note. Contact fields over the limit are left out.
TRIMMED_FIELDS = ("buyer_name", "buyer_addr")
SUBSCRIPTION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
MERCHANT_UID_RE = re.compile(
    r"^(?P<sub>[A-Za-z0-9][A-Za-z0-9_-]*)-(?P<date>\d{8})-(?P<attempt>\d{2})$"
)
CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]")


# -- merchant_uid ------------------------------------------------------------------------------


def merchant_uid_for(subscription_id: str, billing_date: date, attempt_no: int) -> str:
    """``{subscription_id}-{YYYYMMDD}-{NN}``: one per (subscription, billing date, attempt).

    Derived from data only, so every run, retry or backfill computes the same value and
    Iamport's duplicate refusal backs up our own ledger check.
    """
    if not 1 <= attempt_no <= 99:
        raise ValueError(f"attempt_no must be 1..99, got {attempt_no}")
    uid = f"{subscription_id}-{billing_date:%Y%m%d}-{attempt_no:02d}"
    if len(uid) > MERCHANT_UID_MAX:
        raise ValueError(
            f"merchant_uid would be {len(uid)} characters (max {MERCHANT_UID_MAX}): "
            f"subscription_id is {len(subscription_id)} long, at most "
            f"{MERCHANT_UID_MAX - 12} fit"
        )
    return uid


def parse_merchant_uid(merchant_uid: str) -> tuple[str, date, int] | None:
    """Inverse of merchant_uid_for; None for merchant_uids this product did not make."""
    m = MERCHANT_UID_RE.match(merchant_uid or "")
    if not m:
        return None
    try:
        day = datetime.strptime(m["date"], "%Y%m%d").date()
    except ValueError:
        return None
    return m["sub"], day, int(m["attempt"])


def rejected_key(billing_date: date, subscription_id: Any, reason_code: str) -> str:
    """Ledger key for a rejected row: can never equal a real merchant_uid (no -NN suffix)."""
    import hashlib

    digest = hashlib.sha1(f"{subscription_id!r}|{reason_code}".encode()).hexdigest()[:16]
    return f"rej-{billing_date:%Y%m%d}-{digest}"


# -- input validation --------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationLimits:
    max_amount: int = 10_000_000
    currencies: tuple[str, ...] = ("KRW",)
    max_overdue_days: int = 45
    default_name: str = "정기결제"


@dataclass(frozen=True)
class ChargeCandidate:
    """A due row that passed validation: safe to send to the API."""

    subscription_id: str
    customer_uid: str
    amount: int
    billing_date: date
    currency: str = "KRW"
    name: str = ""
    buyer_name: str | None = None
    buyer_email: str | None = None
    buyer_tel: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    # What validation changed to fit the gateway's limits (logged by the plan).
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RejectedRow:
    """A due row that must not reach the API, with a machine code and a human reason."""

    subscription_id: str | None
    customer_uid: str | None
    amount: int | None
    billing_date: date
    code: str
    reason: str
    currency: str | None = None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def to_date(value: Any) -> date | None:
    """Accept date, datetime or ISO text (SQLite stores dates as text)."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def to_timestamp(value: Any) -> datetime | None:
    """A timestamp column as an aware datetime (naive values are UTC); None if unreadable."""
    if value is None or value == "":
        return None
    try:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_amount(value: Any) -> int:
    """Integer KRW or ValueError: rejects bools, fractions, text and non-finite numbers."""
    if isinstance(value, bool) or value is None:
        raise ValueError("amount is missing" if value is None else "amount is not a number")
    if isinstance(value, int):
        return value
    try:
        dec = Decimal(str(value).strip()) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise ValueError(f"amount {str(value)[:20]!r} is not a number") from None
    if not dec.is_finite():
        raise ValueError("amount is not a finite number")
    if dec != dec.to_integral_value():
        raise ValueError(f"amount {dec} is not a whole number of KRW")
    return int(dec)


def validate_row(
    row: Mapping[str, Any],
    *,
    run_date: date,
    limits: ValidationLimits,
    merchant_uid: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> ChargeCandidate | RejectedRow:
    """Decide whether a due row may be charged; never raises on bad data.

    ``merchant_uid`` is for single charges that bring their own id instead of the scheme.
    """
    sub = _text(row.get("subscription_id"))
    customer_uid = _text(row.get("customer_uid"))
    currency = (_text(row.get("currency")) or "KRW").strip().upper()
    try:
        given_date = to_date(row.get("billing_date"))
    except ValueError:
        given_date, bad_date = None, True
    else:
        bad_date = False
    # The period comes from the data, never from the run: a row without one cannot have a
    # deterministic merchant_uid (it would be charged again under every later run's date).
    billing_date = given_date or run_date
    try:
        amount: int | None = parse_amount(row.get("amount"))
        amount_error = None
    except ValueError as e:
        amount, amount_error = None, str(e)

    def reject(code: str, reason: str) -> RejectedRow:
        return RejectedRow(sub, customer_uid, amount, billing_date, code, reason, currency)

    if not sub or not sub.strip():
        return reject("missing_subscription_id", "subscription_id is missing")
    if bad_date:
        return reject(
            "invalid_billing_date", f"billing date {row.get('billing_date')!r} is not a date"
        )
    if given_date is None:
        return reject(
            "missing_billing_date", "billing_date is missing: the due query must return it"
        )
    if merchant_uid is not None:
        if not merchant_uid or CONTROL_CHARS_RE.search(merchant_uid):
            return reject("invalid_merchant_uid", "merchant_uid is empty or has control characters")
        if len(merchant_uid) > MERCHANT_UID_MAX:
            return reject(
                "merchant_uid_too_long",
                f"merchant_uid is {len(merchant_uid)} characters (max {MERCHANT_UID_MAX})",
            )
    else:
        if not SUBSCRIPTION_ID_RE.match(sub):
            return reject(
                "invalid_subscription_id",
                "subscription_id may hold only letters, digits, '_' and '-' "
                "(and must start with a letter or digit)",
            )
        try:
            merchant_uid_for(sub, billing_date, 1)
        except ValueError as e:
            return reject("merchant_uid_too_long", str(e))
    if not customer_uid or not customer_uid.strip():
        return reject("missing_customer_uid", "customer_uid is missing or empty")
    if len(customer_uid) > CUSTOMER_UID_MAX:
        return reject(
            "customer_uid_too_long",
            f"customer_uid is {len(customer_uid)} characters (max {CUSTOMER_UID_MAX})",
        )
    if CONTROL_CHARS_RE.search(customer_uid) or customer_uid != customer_uid.strip():
        return reject("invalid_customer_uid", "customer_uid has control characters or padding")
    if amount_error is not None:
        return reject("invalid_amount", amount_error)
    assert amount is not None
    if amount <= 0:
        return reject("non_positive_amount", f"amount {amount} is not positive")
    if amount > limits.max_amount:
        return reject("amount_over_cap", f"amount {amount} is over the cap {limits.max_amount}")
    if currency not in limits.currencies:
        return reject("unsupported_currency", f"currency {currency!r} is not supported")
    if billing_date > run_date:
        return reject(
            "billing_date_in_future", f"billing date {billing_date} is after the run's {run_date}"
        )
    if (run_date - billing_date).days > limits.max_overdue_days:
        return reject(
            "billing_date_too_old",
            f"billing date {billing_date} is more than {limits.max_overdue_days} days overdue",
        )
    name = _text(row.get("name")) or limits.default_name
    if CONTROL_CHARS_RE.search(name):
        return reject("invalid_name", "name has control characters")
    if len(name) > NAME_MAX:
        return reject("name_too_long", f"name is {len(name)} characters (max {NAME_MAX})")
    buyer = {k: _text(row.get(k)) for k in ("buyer_name", "buyer_email", "buyer_tel")}
    for key, value in buyer.items():
        if value is not None and CONTROL_CHARS_RE.search(value):
            return reject("invalid_buyer", f"{key} has control characters")
    extra = dict(options or {})
    channel_key = _text(extra.get("channel_key"))
    if channel_key is not None and len(channel_key) > SPEC_LIMITS["channel_key"]:
        return reject(
            "channel_key_too_long",
            f"channel_key is {len(channel_key)} characters (max {SPEC_LIMITS['channel_key']})",
        )
    notes: list[str] = []
    fields = {**buyer, **{k: _text(extra.get(k)) for k in ("buyer_addr", "buyer_postcode")}}
    for key, value in fields.items():
        limit = SPEC_LIMITS[key]
        if value is None or len(value) <= limit:
            continue
        if key in TRIMMED_FIELDS:
            fields[key] = value[:limit]
            notes.append(f"{key} trimmed to the gateway's {limit} characters")
        else:  # a cut e-mail or phone number would be wrong: leave it out
            fields[key] = None
            notes.append(f"{key} left out: {len(value)} characters, the gateway takes {limit}")
    extra.update({k: fields[k] for k in ("buyer_addr", "buyer_postcode") if k in extra})
    return ChargeCandidate(
        subscription_id=sub,
        customer_uid=customer_uid,
        amount=amount,
        billing_date=billing_date,
        currency=currency,
        name=name,
        options={k: v for k, v in extra.items() if v is not None},
        notes=tuple(notes),
        buyer_name=fields["buyer_name"],
        buyer_email=fields["buyer_email"],
        buyer_tel=fields["buyer_tel"],
    )


# -- outcome classification --------------------------------------------------------------------


@dataclass(frozen=True)
class DeclineTable:
    """Which declines are hard (need a new card) vs soft (retry later). Configuration, not code.

    A decline is hard when its fail_reason contains any ``hard_patterns`` entry (case-folded)
    or its API code is in ``hard_codes``; everything else is soft.
    """

    hard_patterns: tuple[str, ...] = (
        "분실", "도난", "lost", "stolen", "pickup", "pick up", "정지된 카드", "거래정지",
        "해지", "closed", "유효기간", "expired", "유효하지 않은 카드", "invalid card",
        "incorrect number", "카드번호 오류", "do not retry", "revocation", "fraud",
        "등록되지 않은 구매자", "등록되지 않은 사용자",
    )  # fmt: skip
    hard_codes: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> DeclineTable:
        if not config:
            return cls()
        return cls(
            hard_patterns=tuple(config.get("hard_patterns", cls().hard_patterns)),
            hard_codes=tuple(str(c) for c in config.get("hard_codes", ())),
        )

    def classify(self, fail_reason: str | None, code: Any = None) -> str:
        if code is not None and str(code) in self.hard_codes:
            return HARD
        text = (fail_reason or "").casefold()
        return HARD if any(p.casefold() in text for p in self.hard_patterns) else SOFT


# -- dunning -----------------------------------------------------------------------------------

DEFAULT_RETRY_SCHEDULE_DAYS: tuple[int, ...] = (1, 3, 5, 7)


def next_retry_date(
    first_decline_date: date, attempt_no: int, schedule: Sequence[int] = DEFAULT_RETRY_SCHEDULE_DAYS
) -> date | None:
    """When attempt ``attempt_no`` (1 = the first charge) failed softly, the next try's date.

    The schedule counts days after the first decline; None when retries are exhausted.
    """
    if attempt_no < 1:
        raise ValueError("attempt_no starts at 1")
    if attempt_no > len(schedule):
        return None
    return first_decline_date + timedelta(days=int(schedule[attempt_no - 1]))


# -- billing dates -----------------------------------------------------------------------------


def add_month_anchored(day: date, anchor_day: int | None) -> date:
    """Next month's billing date keeping the anchor: Jan 31 -> Feb 28/29 -> Mar 31."""
    anchor = int(anchor_day) if anchor_day else day.day
    anchor = min(max(anchor, 1), 31)
    year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
    return date(year, month, min(anchor, calendar.monthrange(year, month)[1]))


def billing_date_of_run(logical_date: datetime | None, run_after: datetime | None) -> date:
    """The run's billing date in Asia/Seoul: logical date, else run_after (manual runs)."""
    moment = logical_date or run_after
    if moment is None:
        raise ValueError("a run needs a logical_date or run_after to have a billing date")
    return pendulum.instance(moment).in_timezone(SEOUL).date()


# -- guardrails --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Guardrails:
    """Limits a run must stay within before any money moves. None disables a limit."""

    max_count: int | None = None
    max_total_amount: int | None = None
    max_total_multiple_of_previous: float | None = 3.0
    min_previous_total_for_multiple: int = 1_000_000
    # Above this share of rejected due rows the data is broken, not the customers.
    max_rejected_share: float | None = 0.2
    min_rows_for_rejected_share: int = 20


@dataclass
class PlanTotals:
    count: int = 0
    total_amount: int = 0
    rejected: int = 0
    by_billing_date: dict[str, int] = field(default_factory=dict)


def guardrail_violations(
    totals: PlanTotals, guardrails: Guardrails, previous_total: int | None
) -> list[str]:
    """Every limit the plan breaks, as sentences for the alert; [] means go."""
    problems = []
    if guardrails.max_count is not None and totals.count > guardrails.max_count:
        problems.append(f"{totals.count} charges planned, over max_count {guardrails.max_count}")
    if (
        guardrails.max_total_amount is not None
        and totals.total_amount > guardrails.max_total_amount
    ):
        problems.append(
            f"total {totals.total_amount:,} KRW planned, over max_total_amount "
            f"{guardrails.max_total_amount:,} KRW"
        )
    seen = totals.count + totals.rejected
    share = guardrails.max_rejected_share
    # A handful of rows says little: then only "nothing at all is chargeable" trips it.
    if (
        share is not None
        and totals.rejected
        and totals.rejected / seen > share
        and (seen >= guardrails.min_rows_for_rejected_share or totals.count == 0)
    ):
        problems.append(
            f"{totals.rejected} of {seen} due rows rejected ({totals.rejected / seen:.0%}), "
            f"over max_rejected_share {share:.0%}"
        )
    multiple = guardrails.max_total_multiple_of_previous
    if (
        multiple is not None
        and previous_total is not None
        and previous_total >= guardrails.min_previous_total_for_multiple
        and totals.total_amount > multiple * previous_total
    ):
        problems.append(
            f"total {totals.total_amount:,} KRW is over {multiple:g} x the previous run's "
            f"{previous_total:,} KRW"
        )
    return problems
