"""Emulator settings and the test-card table that decides charge outcomes."""

from __future__ import annotations

import base64
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from iamport_billing.net import is_loopback_host

DEFAULT_IMP_KEY = "imp_test_key"
DEFAULT_IMP_SECRET = "imp_test_secret"
DEFAULT_TOKEN_TTL_S = 1800
API_MODES = ("v1", "v2")
DEFAULT_API_SECRET = "portone_test_api_secret"
DEFAULT_STORE_ID = "store-00000000-0000-0000-0000-000000000000"
# Real Iamport: a getToken in the last 60 s of a 30-minute token extends it by 300 s.
REAL_TOKEN_TTL_S = 1800
REAL_EXTEND_WINDOW_S = 60
REAL_EXTEND_BY_S = 300

# Test cards, like a card network's: the registered number decides every later charge.
CARD_ALWAYS_PAID = "4242-4242-4242-4242"
CARD_SOFT_DECLINE = "4000-0000-0000-0002"
CARD_HARD_DECLINE = "4000-0000-0000-0069"
# Approved, but recorded paid with 90% of the amount asked (a PG's partial approval): the
# "paid with another amount" case, on one card instead of every charge.
CARD_SHORT_PAID = "4000-0000-0000-0036"
SHORT_PAID_SHARE = 0.9
SOFT_DECLINE_REASON = "[잔액부족] 카드 잔액이 부족합니다 (insufficient funds)"
HARD_DECLINE_REASON = "[분실도난] 분실 또는 도난 카드입니다 (lost or stolen card)"
# V2 answers a decline with 502 PG_PROVIDER: V1's reason is its pgMessage, with the card
# network's response code (ISO 8583: 51 insufficient funds, 41 lost card) as pgCode.
DECLINE_PG_CODES = {SOFT_DECLINE_REASON: "51", HARD_DECLINE_REASON: "41"}

# Outcome classes stored with each billing key (the full card number is never stored).
BEHAVIOR_PAID = "paid"
BEHAVIOR_SOFT_DECLINE = "soft_decline"
BEHAVIOR_HARD_DECLINE = "hard_decline"
BEHAVIOR_SHORT_PAID = "short_paid"


def card_digits(card_number: str) -> str:
    return "".join(ch for ch in card_number if ch.isdigit())


def card_behavior(card_number: str) -> str:
    """What charges on this card do; unknown numbers are approved."""
    digits = card_digits(card_number)
    if digits == card_digits(CARD_SOFT_DECLINE):
        return BEHAVIOR_SOFT_DECLINE
    if digits == card_digits(CARD_HARD_DECLINE):
        return BEHAVIOR_HARD_DECLINE
    if digits == card_digits(CARD_SHORT_PAID):
        return BEHAVIOR_SHORT_PAID
    return BEHAVIOR_PAID


# Foreign and hostile behaviours: what a proxy in front of Iamport, or a misbehaving gateway,
# does. All off by default; each is scoped to the endpoints named.
SWITCH_FIELDS = (
    # GET lookups (payments by imp_uid/merchant_uid, findAll, status, customers) answer 404
    # with a proxy's JSON {"error": "not found"} / an nginx HTML page, before auth or the DB.
    "foreign_404_json",
    "foreign_404_html",
    # Only the payment lookups (GET /payments/...) answer the proxy's JSON 404; billing keys
    # (GET /subscribe/customers...) still reach Iamport: a proxy misrouting one path prefix.
    "foreign_404_payment_lookups",
    # POST /subscribe/payments/again answers 404 with an nginx HTML page before anything is
    # charged (a wrong base path, a proxy in front of an unknown route).
    "charge_foreign_404",
    # GET /payments/findAll answers the envelope with a bare list of payments as `response`
    # instead of the paged object {total, previous, next, list}.
    "findall_bare_list",
    # POST /payments/cancel commits the cancel, then the TCP connection is reset (no answer).
    "drop_cancel_reply",
    # POST /users/getToken answers this HTTP status (5xx: an nginx HTML page; 4xx: the
    # envelope with code -1). None: normal.
    "token_status",
    # `Authorization: Bearer <token>` is refused with 401; only the raw token is accepted.
    "bearer_refused",
    # getToken's reply says expired_at = now (the token itself stays valid for its TTL).
    "token_already_expired",
    # Charges end in status 'ready' (neither paid nor failed) and stay so.
    "charge_status_ready",
    # A paid charge records amount * N ("paid with a different amount"). 1 = normal.
    "paid_amount_multiplier",
)
_BOOL_SWITCHES = frozenset(SWITCH_FIELDS) - {"token_status", "paid_amount_multiplier"}

FAULT_FIELDS = (
    "latency_ms",
    "latency_jitter_ms",
    "error_rate",
    "rate_limit_rate",
    "drop_after_commit_rate",
    "token_ttl_s",
    "token_extend_window_s",
    "token_extend_s",
    # Seconds the emulator's clock runs ahead of the machine's: a simulation moves it to the
    # simulated day (paid_at, getToken's now, token expiry, the status listing's default `to`).
    "clock_offset_s",
    # At most this many API requests are answered in one wall-clock second; the rest get 429
    # (a gateway's per-second rate limit). None: no cap.
    "rate_cap",
    *SWITCH_FIELDS,
)


@dataclass
class EmulatorConfig:
    """Every CLI option. Fault fields can also be changed at runtime (POST /__emulator__/faults).

    ``token_extend_window_s``/``token_extend_s`` default to the real 60 s/300 s scaled by
    ``token_ttl_s``/1800, so a short TTL still expires instead of being extended forever.
    """

    host: str = "127.0.0.1"
    port: int = 0
    db_path: str = "iamport-emulator.db"
    imp_key: str = DEFAULT_IMP_KEY
    imp_secret: str = field(default=DEFAULT_IMP_SECRET, repr=False)
    # Which API the emulator speaks: Iamport V1 or PortOne V2 (``Authorization: PortOne ...``).
    api: str = "v1"
    api_secret: str = field(default=DEFAULT_API_SECRET, repr=False)
    store_id: str = DEFAULT_STORE_ID
    # V2 webhooks: POSTed to this URL, signed with this Standard Webhooks secret (whsec_...).
    webhook_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    drop_after_commit_rate: float = 0.0
    token_ttl_s: int = DEFAULT_TOKEN_TTL_S
    token_extend_window_s: int | None = None
    token_extend_s: int | None = None
    foreign_404_json: bool = False
    foreign_404_html: bool = False
    foreign_404_payment_lookups: bool = False
    charge_foreign_404: bool = False
    findall_bare_list: bool = False
    drop_cancel_reply: bool = False
    token_status: int | None = None
    bearer_refused: bool = False
    token_already_expired: bool = False
    charge_status_ready: bool = False
    paid_amount_multiplier: float = 1.0
    clock_offset_s: float = 0.0
    rate_cap: float | None = None
    seed: int | None = None
    log_level: str = "warning"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.api not in API_MODES:
            raise ValueError(f"api must be one of {API_MODES}, got {self.api!r}")
        if self.webhook_url and not self.webhook_secret:
            raise ValueError("webhook_url needs webhook_secret (whsec_ + base64)")
        if self.webhook_secret is not None:
            _check_webhook_secret(self.webhook_secret)
        for name in ("error_rate", "rate_limit_rate", "drop_after_commit_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if self.latency_ms < 0 or self.latency_jitter_ms < 0:
            raise ValueError("latency_ms and latency_jitter_ms must be >= 0")
        if self.rate_cap is not None and not (self.rate_cap > 0 and math.isfinite(self.rate_cap)):
            raise ValueError(f"rate_cap must be > 0 requests per second, got {self.rate_cap}")
        if self.token_ttl_s < 1:
            raise ValueError("token_ttl_s must be >= 1")
        for name in ("token_extend_window_s", "token_extend_s"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.foreign_404_json and self.foreign_404_html:
            raise ValueError("foreign_404_json and foreign_404_html are mutually exclusive")
        if self.token_status is not None and not 400 <= self.token_status <= 599:
            raise ValueError(f"token_status must be an HTTP error status, got {self.token_status}")
        if not (
            0 < self.paid_amount_multiplier < 1e6 and math.isfinite(self.paid_amount_multiplier)
        ):
            raise ValueError("paid_amount_multiplier must be > 0")

    def now(self) -> float:
        """The emulator's clock: the machine's, moved by ``clock_offset_s``."""
        return time.time() + self.clock_offset_s

    @property
    def extend_window_s(self) -> int:
        if self.token_extend_window_s is not None:
            return self.token_extend_window_s
        return self.token_ttl_s * REAL_EXTEND_WINDOW_S // REAL_TOKEN_TTL_S

    @property
    def extend_by_s(self) -> int:
        if self.token_extend_s is not None:
            return self.token_extend_s
        return self.token_ttl_s * REAL_EXTEND_BY_S // REAL_TOKEN_TTL_S

    @property
    def admin_enabled(self) -> bool:
        """The /__emulator__ endpoints need no token, so they exist only on loopback binds."""
        return is_loopback_host(self.host)

    def faults(self) -> dict[str, Any]:
        data = asdict(self)
        return {name: data[name] for name in FAULT_FIELDS}

    def update_faults(self, changes: dict[str, Any]) -> None:
        """Apply runtime fault changes atomically: all valid or none applied.

        Switches take true/false (or 1/0, "true"/"false"); ``token_status`` an HTTP status or
        null/0 for normal; ``paid_amount_multiplier`` a number (1 = normal).
        """
        unknown = set(changes) - set(FAULT_FIELDS) - {"seed"}
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        coerced = {name: _coerce(name, value) for name, value in changes.items()}
        candidate = EmulatorConfig(**{**asdict(self), **coerced})
        for name in (*FAULT_FIELDS, "seed"):
            setattr(self, name, getattr(candidate, name))


def _check_webhook_secret(secret: str) -> None:
    """``whsec_`` + base64 of at least 24 bytes, as Standard Webhooks secrets are."""
    if not secret.startswith("whsec_"):
        raise ValueError("webhook_secret must start with whsec_")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except ValueError:
        raise ValueError("webhook_secret must be whsec_ followed by base64") from None
    if len(key) < 24:
        raise ValueError("webhook_secret must hold at least 24 bytes")


_INT_FIELDS = {"token_ttl_s", "token_extend_window_s", "token_extend_s", "seed", "token_status"}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _coerce(name: str, value: Any) -> Any:
    if name in _BOOL_SWITCHES:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if name == "token_status" and value in (None, 0, "", "0"):
        return None
    if value is None and name in ("token_extend_window_s", "token_extend_s", "seed", "rate_cap"):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number")
    try:
        return int(value) if name in _INT_FIELDS else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
