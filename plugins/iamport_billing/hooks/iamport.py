"""IamportHook: owns an ``iamport`` connection, the access token and typed calls to the V1 API.

It owns a urllib3 pool rather than subclassing HttpHook: HttpHook would send login and password
as Basic auth and every unknown extra as a header, and has no timeout by default. urllib3 rather
than requests because the charge path is CPU-bound on our side: requests' session machinery
(settings merging, cookies, hooks) cost about a third of our CPU per charge.
"""

from __future__ import annotations

import json as jsonlib
import os
import random
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import certifi
import urllib3
from airflow.sdk import BaseHook
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError

from iamport_billing.api_types import (
    AccessToken,
    BillingKey,
    BillingKeyLookup,
    Payment,
    PaymentPage,
)
from iamport_billing.errors import (
    IamportAuthError,
    IamportBillingKeyMissing,
    IamportError,
    IamportNotFound,
    IamportOutcomeUnknown,
    IamportRateLimited,
    IamportRequestRejected,
    IamportTransportError,
)
from iamport_billing.net import is_loopback_host

DEFAULT_BASE_URL = "https://api.iamport.kr"
TOKEN_REFRESH_MARGIN_S = 60.0
BODY_EXCERPT_CHARS = 200

# Messages Iamport uses when a customer_uid has no billing key (again, and GET/DELETE customers).
BILLING_KEY_MISSING_MARKERS = (
    "등록되지 않은 구매자",
    "등록되지 않은 사용자",
    "등록된 정보를 찾을 수 없",
)

CHARGE_OPTIONAL_FIELDS = frozenset(
    {
        "currency", "tax_free", "vat_amount", "vat", "buyer_name", "buyer_email", "buyer_tel",
        "buyer_addr", "buyer_postcode", "card_quota", "interest_free_by_merchant",
        "use_card_point", "custom_data", "notice_url", "browser_ip", "product_type",
        "product_count", "cash_receipt_type", "bypass", "extra", "promotion_id", "channel_key",
    }
)  # fmt: skip
PAYMENT_STATUSES = frozenset({"all", "ready", "paid", "cancelled", "failed"})


def _mask(value: str, name: str) -> None:
    """Register a secret with Airflow's masker (task process and supervisor)."""
    try:
        from airflow.sdk.log import mask_secret

        mask_secret(value, name)
    except Exception:  # pragma: no cover - masking must never break a call
        pass


@dataclass(frozen=True)
class IamportSettings:
    """What the hook reads from the connection; the secret stays out of repr."""

    base_url: str
    imp_key: str
    imp_secret: str
    tier_code: str | None = None
    header_style: str = "bearer"
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    max_retries: int = 3
    verify_tls: bool = True
    include_sandbox: bool = False

    def __repr__(self) -> str:
        return f"IamportSettings(base_url={self.base_url!r}, imp_key={self.imp_key!r}, ...)"


def settings_from_connection(conn: Any) -> IamportSettings:
    """Build settings from an Airflow connection; refuse plain http to a remote host."""
    extra = conn.extra_dejson or {}
    host = (conn.host or "").strip()
    if not host:
        base_url = DEFAULT_BASE_URL
    elif "://" in host:
        base_url = host
    else:
        scheme = conn.schema or "https"
        base_url = f"{scheme}://{host}"
    if conn.port and "://" in base_url and not urlsplit(base_url).port:
        base_url = f"{base_url.rstrip('/')}:{conn.port}"
    base_url = base_url.rstrip("/")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"Iamport base URL must be http(s), got {parts.scheme!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
        if not _bool(extra.get("allow_insecure_http"), False):
            raise ValueError(
                f"Refusing plain http to non-loopback host {parts.hostname!r}: set the "
                "connection extra allow_insecure_http=true if you really mean it"
            )
    if not conn.login or not conn.password:
        raise ValueError("The iamport connection needs imp_key (login) and imp_secret (password)")
    style = (extra.get("header_style") or "bearer").lower()
    if style not in ("bearer", "raw"):
        raise ValueError(f"header_style must be 'bearer' or 'raw', got {style!r}")
    tier = extra.get("tier_code") or None
    return IamportSettings(
        base_url=base_url,
        imp_key=conn.login,
        imp_secret=conn.password,
        tier_code=str(tier) if tier else None,
        header_style=style,
        connect_timeout=float(extra.get("connect_timeout") or 10.0),
        read_timeout=float(extra.get("read_timeout") or 30.0),
        max_retries=int(extra.get("max_retries") if extra.get("max_retries") is not None else 3),
        verify_tls=_bool(extra.get("verify_tls"), True),
        include_sandbox=_bool(extra.get("include_sandbox"), False),
    )


def _bool(value: Any, default: bool) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class _TokenCache:
    """One token per (base_url, imp_key, tier) per process, shared by every hook and thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str | None], tuple[AccessToken, float]] = {}

    def get(self, key: tuple[str, str, str | None]) -> AccessToken | None:
        entry = self._tokens.get(key)
        if entry and time.monotonic() < entry[1]:
            return entry[0]
        return None

    def fetch(
        self,
        key: tuple[str, str, str | None],
        issue: Callable[[], AccessToken],
        stale: object = None,
    ) -> AccessToken:
        """Issue a token unless another thread just did (or the cached one is still fresh)."""
        with self._lock:
            entry = self._tokens.get(key)
            if entry and entry[0] is not stale and time.monotonic() < entry[1]:
                return entry[0]
            token = issue()
            # Local deadline from the server's own clock (immune to skew between the clocks),
            # refreshed a minute early, or a sixth of the lifetime for short-lived tokens.
            lifetime = max(0, token.expired_at - token.server_now)
            margin = min(TOKEN_REFRESH_MARGIN_S, lifetime / 6)
            self._tokens[key] = (token, time.monotonic() + lifetime - margin)
            return token

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()


TOKEN_CACHE = _TokenCache()


class IamportHook(BaseHook):
    """Typed client for the Iamport (PortOne V1) REST API.

    :param iamport_conn_id: connection of type ``iamport`` (host = API base URL, login =
        imp_key, password = imp_secret, extras per the connection form).
    :param pool_maxsize: HTTP connections kept open; set it to the charge concurrency.
    """

    conn_name_attr = "iamport_conn_id"
    default_conn_name = "iamport_default"
    conn_type = "iamport"
    hook_name = "Iamport (PortOne V1)"

    def __init__(self, iamport_conn_id: str = default_conn_name, *, pool_maxsize: int = 16):
        super().__init__()
        self.iamport_conn_id = iamport_conn_id
        self.pool_maxsize = pool_maxsize
        self._settings: IamportSettings | None = None
        self._pool: urllib3.PoolManager | None = None
        self._pool_lock = threading.Lock()
        self.token_requests = 0

    # -- connection and session ---------------------------------------------------------------

    @property
    def settings(self) -> IamportSettings:
        if self._settings is None:
            conn = self.get_connection(self.iamport_conn_id)
            if conn.password:
                _mask(conn.password, "imp_secret")
            self._settings = settings_from_connection(conn)
        return self._settings

    def get_conn(self) -> urllib3.PoolManager:
        """A thread-safe connection pool sized to the charge concurrency; proxies and the CA
        bundle come from the environment once (HTTPS_PROXY/NO_PROXY, REQUESTS_CA_BUNDLE)."""
        with self._pool_lock:
            if self._pool is None:
                s = self.settings
                options: dict[str, Any] = {
                    "num_pools": 2,
                    "maxsize": max(1, self.pool_maxsize),
                    "retries": False,
                }
                if s.verify_tls:
                    options["cert_reqs"] = "CERT_REQUIRED"
                    options["ca_certs"] = (
                        os.environ.get("REQUESTS_CA_BUNDLE")
                        or os.environ.get("SSL_CERT_FILE")
                        or certifi.where()
                    )
                else:
                    options["cert_reqs"] = "CERT_NONE"
                host = urlsplit(s.base_url).hostname or ""
                proxy = urllib.request.getproxies().get(urlsplit(s.base_url).scheme)
                if proxy and not urllib.request.proxy_bypass(host):
                    self._pool = urllib3.ProxyManager(proxy, **options)
                else:
                    self._pool = urllib3.PoolManager(**options)
            return self._pool

    def _default_headers(self) -> dict[str, str]:
        headers = {"User-Agent": "airflow-iamport-billing", "Accept": "application/json"}
        if self.settings.tier_code:
            headers["Tier"] = self.settings.tier_code
        return headers

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.clear()
                self._pool = None

    # -- token --------------------------------------------------------------------------------

    def _token_key(self) -> tuple[str, str, str | None]:
        s = self.settings
        return (s.base_url, s.imp_key, s.tier_code)

    def get_token(self) -> AccessToken:
        """The cached token, or a fresh one when it is within a minute of expiry."""
        return TOKEN_CACHE.get(self._token_key()) or TOKEN_CACHE.fetch(
            self._token_key(), self._issue_token
        )

    def _issue_token(self) -> AccessToken:
        s = self.settings
        self.token_requests += 1
        status, body = self._send(
            "POST",
            "/users/getToken",
            json={"imp_key": s.imp_key, "imp_secret": s.imp_secret},
            headers={},
            retry=True,
        )
        if status == 401:
            raise IamportAuthError(
                "Iamport refused imp_key/imp_secret: " + (_message(body) or "unauthorized"),
                http_status=401,
            )
        resp = self._payload(status, body)
        try:
            token = AccessToken(
                token=str(resp["access_token"]),
                expired_at=int(float(resp["expired_at"])),
                server_now=int(float(resp.get("now") or time.time())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise IamportTransportError(
                f"getToken answered without a usable token ({type(e).__name__})",
                http_status=status,
            ) from None
        _mask(token.token, "iamport_access_token")
        return token

    def _auth_headers(self, token: AccessToken) -> dict[str, str]:
        if self.settings.header_style == "raw":
            return {"Authorization": token.token}
        return {"Authorization": f"Bearer {token.token}"}

    # -- transport ----------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        json: Any = None,
        headers: dict[str, str],
        retry: bool,
        merchant_uid: str | None = None,
    ) -> tuple[int, Any]:
        """One HTTP exchange with retries for safe calls.

        ``retry=False`` (the charge POST) resends only when the connection was never
        established; anything after the request may have left raises IamportOutcomeUnknown.
        """
        s = self.settings
        url = s.base_url + path
        if params:
            url += "?" + urlencode(params, doseq=True)
        body_bytes = None
        headers = {**self._default_headers(), **headers}
        if json is not None:
            body_bytes = jsonlib.dumps(json, ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json"
        timeout = urllib3.Timeout(connect=s.connect_timeout, read=s.read_timeout)
        attempts = 1 + (s.max_retries if retry else 0)
        connect_attempts = 1 + s.max_retries
        attempt = 0
        connect_failures = 0
        while True:
            attempt += 1
            try:
                resp = self.get_conn().request(
                    method, url, body=body_bytes, headers=headers, timeout=timeout,
                    redirect=False,
                )  # fmt: skip
            except HTTPError as e:
                # ConnectTimeoutError covers NewConnectionError and name resolution: the
                # request provably never left. A read timeout or a reset may follow a charge.
                never_sent = isinstance(e, (NewConnectionError, ConnectTimeoutError))
                if never_sent:
                    connect_failures += 1
                if (
                    retry
                    and attempt < attempts
                    or (never_sent and connect_failures < connect_attempts)
                ):
                    self._sleep_backoff(attempt, None)
                    continue
                reason = f"{type(e).__name__} talking to {method} {path}"
                raise _failure(reason, None if never_sent else merchant_uid) from None
            status = resp.status
            body = _parse_body(resp)
            if status == 429 or status >= 500:
                retry_after = _retry_after(resp)
                if retry and attempt < attempts:
                    self._sleep_backoff(attempt, retry_after)
                    continue
                if status == 429:
                    raise IamportRateLimited(
                        f"rate limited on {method} {path}",
                        retry_after=retry_after,
                        http_status=429,
                        body_excerpt=_excerpt(resp),
                    )
                raise _failure(
                    f"server error on {method} {path}", merchant_uid,
                    http_status=status, body_excerpt=_excerpt(resp),
                )  # fmt: skip
            if body is _UNPARSEABLE:
                raise _failure(
                    f"non-JSON reply to {method} {path}", merchant_uid,
                    http_status=status, body_excerpt=_excerpt(resp),
                )  # fmt: skip
            return status, body

    def _sleep_backoff(self, attempt: int, retry_after: float | None) -> None:
        if retry_after is not None:
            delay = min(retry_after, 60.0)
        else:
            delay = min(8.0, 0.2 * 2 ** (attempt - 1))
            delay = delay / 2 + random.uniform(0, delay / 2)
        time.sleep(delay)

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        json: Any = None,
        merchant_uid: str | None = None,
    ) -> tuple[int, Any]:
        """Authenticated call: a 401 refreshes the token once and resends (nothing was done)."""
        token = self.get_token()
        retry = merchant_uid is None
        status, body = self._send(
            method, path, params=params, json=json, headers=self._auth_headers(token),
            retry=retry, merchant_uid=merchant_uid,
        )  # fmt: skip
        if status == 401:
            token = TOKEN_CACHE.fetch(self._token_key(), self._issue_token, stale=token)
            status, body = self._send(
                method, path, params=params, json=json, headers=self._auth_headers(token),
                retry=retry, merchant_uid=merchant_uid,
            )  # fmt: skip
            if status == 401:
                raise IamportAuthError(
                    f"{method} {path} still unauthorized after a token refresh: "
                    + (_message(body) or "unauthorized"),
                    http_status=401,
                )
        return status, body

    def _payload(self, status: int, body: Any, *, not_found_code_1: bool = False) -> Any:
        """Unwrap the {code, message, response} envelope into the response or a typed error."""
        if not isinstance(body, dict) or "code" not in body:
            if status == 404:
                raise IamportNotFound("not found", http_status=404, body_excerpt=_short(body))
            raise IamportTransportError(
                "reply is not the {code, message, response} envelope",
                http_status=status,
                body_excerpt=_short(body),
            )
        try:
            code = int(body.get("code"))
        except (TypeError, ValueError):
            raise IamportTransportError(
                "reply has a non-integer code", http_status=status, body_excerpt=_short(body)
            ) from None
        message = _message(body)
        if status == 404 or (not_found_code_1 and code == 1):
            raise IamportNotFound(message or "not found", http_status=status)
        if code != 0:
            raise IamportRequestRejected(code, message, http_status=status)
        if status >= 400:
            raise IamportTransportError(
                f"HTTP error with code 0: {message}", http_status=status, body_excerpt=_short(body)
            )
        return body.get("response")

    # -- charges ------------------------------------------------------------------------------

    def charge_again(
        self, customer_uid: str, merchant_uid: str, amount: int, name: str, **optional: Any
    ) -> Payment:
        """POST /subscribe/payments/again. A card decline is a Payment with status 'failed'.

        Raises IamportBillingKeyMissing (no billing key), IamportRequestRejected (other non-zero
        code), IamportOutcomeUnknown (timeout, reset after sending, 5xx, garbled reply) or
        IamportRateLimited (429: not processed, safe to send again later).
        """
        unknown = set(optional) - CHARGE_OPTIONAL_FIELDS
        if unknown:
            raise ValueError(f"unknown charge_again fields: {sorted(unknown)}")
        body = {
            "customer_uid": customer_uid,
            "merchant_uid": merchant_uid,
            "amount": amount,
            "name": name,
            **{k: v for k, v in optional.items() if v is not None},
        }
        status, reply = self._call(
            "POST", "/subscribe/payments/again", json=body, merchant_uid=merchant_uid
        )
        if status == 404 and isinstance(reply, dict) and "code" in reply:
            # Iamport's own 404 for an unknown customer_uid (the spec's reading of code 1).
            raise IamportBillingKeyMissing(
                1, _message(reply) or "customer_uid not found", http_status=404
            )
        try:
            response = self._payload(status, reply)
        except IamportRequestRejected as e:
            if any(m in e.api_message for m in BILLING_KEY_MISSING_MARKERS):
                raise IamportBillingKeyMissing(e.code, e.api_message, http_status=status) from None
            raise
        except (IamportTransportError, IamportNotFound) as e:
            # Not Iamport's envelope (a proxy's page, a gateway's 404): nothing says no charge.
            raise IamportOutcomeUnknown(
                str(e), merchant_uid=merchant_uid, http_status=status
            ) from None
        if not isinstance(response, dict) or not response.get("imp_uid"):
            raise IamportOutcomeUnknown(
                "code 0 without a payment", merchant_uid=merchant_uid, http_status=status,
                body_excerpt=_short(reply),
            )  # fmt: skip
        return Payment.from_api(response)

    # -- payment lookups ----------------------------------------------------------------------

    def _sandbox_params(self) -> dict[str, str]:
        return {"include_sandbox": "true"} if self.settings.include_sandbox else {}

    def get_payment(self, imp_uid: str) -> Payment:
        status, body = self._call(
            "GET", f"/payments/{quote(imp_uid, safe='')}", params=self._sandbox_params()
        )
        return Payment.from_api(self._payload(status, body))

    def find_payment(self, merchant_uid: str, status: str | None = None) -> Payment:
        """Latest payment of a merchant_uid (optionally with ``status``); else IamportNotFound."""
        path = f"/payments/find/{quote(merchant_uid, safe='')}"
        if status:
            _check_status(status, allow_all=False)
            path += f"/{status}"
        http_status, body = self._call("GET", path)
        return Payment.from_api(self._payload(http_status, body))

    def find_all_payments(self, merchant_uid: str, status: str | None = None) -> list[Payment]:
        """Every payment record of a merchant_uid (all pages); [] when there is none."""
        base = f"/payments/findAll/{quote(merchant_uid, safe='')}"
        if status:
            _check_status(status, allow_all=False)
            base += f"/{status}"
        payments: list[Payment] = []
        page = 1
        while page:
            http_status, body = self._call("GET", base, params={"page": page, "limit": 1000})
            try:
                result = PaymentPage.from_api(self._payload(http_status, body) or {})
            except IamportNotFound:
                return payments
            payments.extend(result.payments)
            page = result.next if result.next and result.next != page else 0
        return payments

    def list_payments(
        self,
        status: str = "all",
        since: int | None = None,
        until: int | None = None,
        *,
        limit: int = 1000,
    ) -> Iterable[Payment]:
        """All payments with ``status`` in [since, until] (UNIX seconds), page by page."""
        _check_status(status, allow_all=True)
        page = 1
        while page:
            params: dict[str, Any] = {"page": page, "limit": limit}
            if since is not None:
                params["from"] = int(since)
            if until is not None:
                params["to"] = int(until)
            http_status, body = self._call("GET", f"/payments/status/{status}", params=params)
            try:
                result = PaymentPage.from_api(self._payload(http_status, body) or {})
            except IamportNotFound:
                return
            yield from result.payments
            page = result.next if result.next and result.next != page else 0

    def cancel_payment(
        self,
        *,
        imp_uid: str | None = None,
        merchant_uid: str | None = None,
        amount: int | None = None,
        reason: str,
        checksum: int | None = None,
        **optional: Any,
    ) -> Payment:
        """Full (amount None) or partial cancel; ``checksum`` guards against double refunds."""
        if not imp_uid and not merchant_uid:
            raise ValueError("cancel_payment needs imp_uid or merchant_uid")
        body: dict[str, Any] = {"reason": reason, **optional}
        if imp_uid:
            body["imp_uid"] = imp_uid
        if merchant_uid:
            body["merchant_uid"] = merchant_uid
        if amount is not None:
            body["amount"] = amount
        if checksum is not None:
            body["checksum"] = checksum
        status, reply = self._call("POST", "/payments/cancel", json=body)
        return Payment.from_api(self._payload(status, reply))

    # -- billing keys -------------------------------------------------------------------------

    def get_billing_key(self, customer_uid: str) -> BillingKey:
        status, body = self._call("GET", f"/subscribe/customers/{quote(customer_uid, safe='')}")
        return BillingKey.from_api(self._payload(status, body, not_found_code_1=True))

    def get_billing_keys(self, customer_uids: list[str]) -> BillingKeyLookup:
        """Bulk lookup (HTTP 207 = some found); chunks of 100 customer_uids per request."""
        found: list[BillingKey] = []
        wanted = list(dict.fromkeys(customer_uids))
        for start in range(0, len(wanted), 100):
            chunk = wanted[start : start + 100]
            status, body = self._call(
                "GET", "/subscribe/customers", params=[("customer_uid[]", c) for c in chunk]
            )
            if status == 404:
                continue
            if status == 207 and isinstance(body, dict):
                body = {**body, "code": 0}
            try:
                items = self._payload(status, body, not_found_code_1=True) or []
            except IamportNotFound:
                continue
            found.extend(BillingKey.from_api(item) for item in items if isinstance(item, dict))
        have = {b.customer_uid for b in found}
        return BillingKeyLookup(found=found, missing=[c for c in wanted if c not in have])

    def delete_billing_key(self, customer_uid: str, reason: str | None = None) -> BillingKey:
        params = {"reason": reason} if reason else None
        status, body = self._call(
            "DELETE", f"/subscribe/customers/{quote(customer_uid, safe='')}", params=params
        )
        return BillingKey.from_api(self._payload(status, body, not_found_code_1=True))

    # -- UI -----------------------------------------------------------------------------------

    def test_connection(self) -> tuple[bool, str]:
        """Issue a token: proves the URL, TLS and credentials without touching payments."""
        try:
            # Always a fresh getToken: a cached token would pass a wrong imp_secret.
            token = self._issue_token()
        except (IamportError, ValueError) as e:
            return False, str(e)
        return True, f"Connected to {self.settings.base_url}; token valid until {token.expired_at}"


_UNPARSEABLE = object()


def _parse_body(resp: urllib3.BaseHTTPResponse) -> Any:
    if not resp.data:
        return None
    try:
        return jsonlib.loads(resp.data)
    except ValueError:
        return _UNPARSEABLE


def _failure(reason: str, merchant_uid: str | None, **details: Any) -> IamportError:
    """After a charge POST may have left, any failure is an unknown outcome (the money may
    have moved); on every other call it is a transport error."""
    if merchant_uid is not None:
        return IamportOutcomeUnknown(reason, merchant_uid=merchant_uid, **details)
    return IamportTransportError(reason, **details)


def _message(body: Any) -> str:
    if isinstance(body, dict):
        return str(body.get("message") or "")
    return ""


def _excerpt(resp: urllib3.BaseHTTPResponse) -> str:
    text = (resp.data or b"")[: BODY_EXCERPT_CHARS * 4].decode("utf-8", "replace")
    return " ".join(text[:BODY_EXCERPT_CHARS].split())


def _short(body: Any) -> str:
    return " ".join(repr(body)[:BODY_EXCERPT_CHARS].split())


def _retry_after(resp: urllib3.BaseHTTPResponse) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _check_status(status: str, *, allow_all: bool) -> None:
    allowed = PAYMENT_STATUSES if allow_all else PAYMENT_STATUSES - {"all"}
    if status not in allowed:
        raise ValueError(f"payment status must be one of {sorted(allowed)}, got {status!r}")
