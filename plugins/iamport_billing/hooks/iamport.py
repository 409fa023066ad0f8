"""IamportHook: owns an ``iamport`` connection, the access token and typed calls to the V1 API.

It owns a urllib3 pool rather than subclassing HttpHook: HttpHook would send login and password
as Basic auth and every unknown extra as a header, and has no timeout by default. urllib3 rather
than requests because the charge path is CPU-bound on our side: requests' session machinery
(settings merging, cookies, hooks) cost about a third of our CPU per charge.
"""

from __future__ import annotations

import hashlib
import json as jsonlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import urllib3
from airflow.sdk import BaseHook
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError

from iamport_billing.api_types import (
    AccessToken,
    BillingKey,
    BillingKeyLookup,
    CancelEntry,
    Payment,
    PaymentPage,
    ShapeError,
)
from iamport_billing.errors import (
    IamportAuthError,
    IamportBillingKeyMissing,
    IamportCancelOutcomeUnknown,
    IamportError,
    IamportNotFound,
    IamportOutcomeUnknown,
    IamportRateLimited,
    IamportRequestRejected,
    IamportTokenUnavailable,
    IamportTransportError,
    IamportUnexpectedReply,
)
from iamport_billing.hooks.transport import (
    EXCERPT_CHARS,
    UNPARSEABLE,
    backoff_delay,
    base_url_of,
    bool_extra,
    build_pool,
    clean_excerpt,
    connection_limiter,
    limited_request,
    mask,
    parse_body,
    rate_limit_of,
    retry_after,
    scrub,
)
from iamport_billing.rate_limit import OK, REFUSED, TROUBLE, Limiter, NotAdmitted, RateLimitSettings

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.iamport.kr"
TOKEN_REFRESH_MARGIN_S = 60.0
# A token Iamport issues already expired (expired_at <= its own now) is used for this long,
# measured on the local monotonic clock, before getToken is asked again (see get_token).
EXPIRED_TOKEN_GRACE_S = 60.0
BODY_EXCERPT_CHARS = EXCERPT_CHARS  # kept for importers of the old name

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
    rate_limit: RateLimitSettings = RateLimitSettings()

    def __repr__(self) -> str:
        return f"IamportSettings(base_url={self.base_url!r}, imp_key={self.imp_key!r}, ...)"


def settings_from_connection(conn: Any) -> IamportSettings:
    """Build settings from an Airflow connection; refuse plain http to a remote host."""
    extra = conn.extra_dejson or {}
    base_url = base_url_of(conn, DEFAULT_BASE_URL, "Iamport")
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
        verify_tls=bool_extra(extra.get("verify_tls"), True),
        include_sandbox=bool_extra(extra.get("include_sandbox"), False),
        rate_limit=rate_limit_of(conn),
    )


class _TokenCache:
    """One token per (base_url, imp_key, tier) per process, shared by every hook and thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str | None], tuple[AccessToken, float]] = {}
        self._warned: set[str] = set()

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
            self._tokens[key] = (token, self._deadline(token))
            return token

    def _deadline(self, token: AccessToken) -> float:
        """Local deadline from the server's own clock (immune to skew between the clocks),
        refreshed a minute early, or a sixth of the lifetime for short-lived tokens. A token
        already expired by the server's clock gets EXPIRED_TOKEN_GRACE_S, with one warning."""
        lifetime = token.expired_at - token.server_now
        if lifetime <= 0:
            self._warn_expired(token)
            return time.monotonic() + EXPIRED_TOKEN_GRACE_S
        margin = min(TOKEN_REFRESH_MARGIN_S, lifetime / 6)
        return time.monotonic() + lifetime - margin

    def _warn_expired(self, token: AccessToken) -> None:
        fingerprint = hashlib.sha256(token.token.encode()).hexdigest()
        if fingerprint in self._warned:
            return
        if len(self._warned) > 1000:
            self._warned.clear()
        self._warned.add(fingerprint)
        log.warning(
            "Iamport getToken answered a token that is already expired by its own clock "
            "(expired_at %s is not after now %s): using it for at most %d s before asking "
            "again; check the gateway's clock or a proxy caching getToken",
            token.expired_at, token.server_now, EXPIRED_TOKEN_GRACE_S,
        )  # fmt: skip

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()
            self._warned.clear()


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
                mask(conn.password, "imp_secret")
            self._settings = settings_from_connection(conn)
        return self._settings

    def get_conn(self) -> urllib3.PoolManager:
        """A thread-safe connection pool sized to the charge concurrency; proxies and the CA
        bundle come from the environment once (HTTPS_PROXY/NO_PROXY, REQUESTS_CA_BUNDLE)."""
        with self._pool_lock:
            if self._pool is None:
                s = self.settings
                self._pool = build_pool(
                    s.base_url, verify_tls=s.verify_tls, maxsize=self.pool_maxsize
                )
            return self._pool

    @property
    def limiter(self) -> Limiter | None:
        """The connection's request limit (shared through Redis when configured so)."""
        s = self.settings
        return connection_limiter(
            self.iamport_conn_id, s.rate_limit, s.connect_timeout, s.read_timeout
        )

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
        """The cached token, or a fresh one when it is within a minute of expiry.

        A token that getToken hands out already expired (``expired_at`` not after the
        server's ``now``) is not fetched again on every call: it is logged once (a warning per
        token) and used for EXPIRED_TOKEN_GRACE_S (60 s, local monotonic clock) before
        getToken is asked again. If the gateway really refuses it, the call gets a 401, which
        refreshes the token once and otherwise raises IamportAuthError, so nothing is lost;
        if the expiry was only misreported, billing goes on. ``test_connection`` reports such
        a token as a failure.
        """
        return TOKEN_CACHE.get(self._token_key()) or TOKEN_CACHE.fetch(
            self._token_key(), self._issue_token
        )

    def _issue_token(self) -> AccessToken:
        """POST /users/getToken. 401/403: IamportAuthError (credentials refused). Any other
        failure: IamportTokenUnavailable (no token, so nothing else was sent), or
        IamportRateLimited."""
        s = self.settings
        self.token_requests += 1
        scrub_ = partial(scrub, secrets=(s.imp_secret,))
        try:
            status, body = self._send(
                "POST",
                "/users/getToken",
                json={"imp_key": s.imp_key, "imp_secret": s.imp_secret},
                headers={},
            )
        except (IamportRateLimited, IamportTokenUnavailable):
            raise
        except IamportTransportError as e:
            if e.http_status in (401, 403):  # refused, with a body that is not even JSON
                raise _credentials_refused(e.http_status, "", scrub_(e.body_excerpt)) from None
            raise IamportTokenUnavailable(
                f"no token, nothing was sent: {e.summary}",
                http_status=e.http_status,
                body_excerpt=scrub_(e.body_excerpt),
            ) from None
        if status in (401, 403):
            if _is_envelope(body):
                raise _credentials_refused(status, scrub_(_message(body)), None)
            raise _credentials_refused(status, "", scrub_(clean_excerpt(body)))
        try:
            resp = self._payload(status, body, what="POST /users/getToken")
        except IamportError as e:
            raise IamportTokenUnavailable(
                f"no token, nothing was sent: {scrub_(e.summary)}",
                http_status=status,
                body_excerpt=scrub_(e.body_excerpt),
            ) from None
        token = _access_token(resp)
        if token is None:
            raise IamportTokenUnavailable(
                "no token, nothing was sent: getToken answered without a usable "
                "{access_token, now, expired_at}",
                http_status=status,
            )
        mask(token.token, "iamport_access_token")
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
        unknown: Callable[..., IamportError] | None = None,
    ) -> tuple[int, Any]:
        """One HTTP exchange; safe calls are retried on connection errors, 429 and 5xx.

        ``unknown`` marks a call that must never be repeated (the charge and the cancel POST):
        it is resent only when the connection was provably never established, and any
        failure after the request may have left raises ``unknown(reason, **details)`` (an
        outcome-unknown error). Other calls raise IamportTransportError ("could not ask"),
        IamportUnexpectedReply for a body that is not JSON.
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
        retry = unknown is None
        attempts = 1 + (s.max_retries if retry else 0)
        connect_attempts = 1 + s.max_retries
        attempt = 0
        connect_failures = 0

        def failure(reason: str, sent: bool = True, **details: Any) -> IamportError:
            if unknown is not None and sent:
                return unknown(reason, **details)
            return IamportTransportError(reason, **details)

        while True:
            attempt += 1
            try:
                resp = limited_request(
                    self.limiter, self.get_conn(), method, url, _verdict, body=body_bytes,
                    headers=headers, timeout=timeout, redirect=False,
                )  # fmt: skip
            except NotAdmitted as e:
                raise failure(f"{method} {path} not sent: {e}", sent=False) from None
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
                raise failure(reason, not never_sent) from None
            status = resp.status
            body = parse_body(resp)
            if status == 429 or status >= 500:
                hint = retry_after(resp)
                if retry and attempt < attempts:
                    self._sleep_backoff(attempt, hint)
                    continue
                if status == 429:
                    raise IamportRateLimited(
                        f"rate limited on {method} {path}",
                        retry_after=hint,
                        http_status=429,
                        body_excerpt=clean_excerpt(resp.data),
                    )
                raise failure(
                    f"server error on {method} {path}",
                    http_status=status, body_excerpt=clean_excerpt(resp.data),
                )  # fmt: skip
            if body is UNPARSEABLE:
                reason = f"non-JSON reply to {method} {path}"
                excerpt = clean_excerpt(resp.data)
                if unknown is not None:
                    raise unknown(reason, http_status=status, body_excerpt=excerpt)
                raise IamportUnexpectedReply(reason, http_status=status, body_excerpt=excerpt)
            return status, body

    def _sleep_backoff(self, attempt: int, retry_after: float | None) -> None:
        time.sleep(backoff_delay(attempt, retry_after))

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        json: Any = None,
        unknown: Callable[..., IamportError] | None = None,
    ) -> tuple[int, Any]:
        """Authenticated call: a 401 refreshes the token once and resends (nothing was done)."""
        token = self.get_token()
        status, body = self._send(
            method, path, params=params, json=json, headers=self._auth_headers(token),
            unknown=unknown,
        )  # fmt: skip
        if status == 401:
            token = TOKEN_CACHE.fetch(self._token_key(), self._issue_token, stale=token)
            status, body = self._send(
                method, path, params=params, json=json, headers=self._auth_headers(token),
                unknown=unknown,
            )  # fmt: skip
            if status == 401:
                raise IamportAuthError(
                    f"{method} {path} still unauthorized after a token refresh: "
                    + (_message(body) or "unauthorized"),
                    http_status=401,
                )
        return status, body

    def _payload(
        self,
        status: int,
        body: Any,
        *,
        what: str,
        absent_on_404: bool = False,
        absent_markers: tuple[str, ...] = (),
    ) -> Any:
        """Unwrap Iamport's ``{code, message, response}`` envelope into the response.

        Only the envelope can say "absent": IamportNotFound is raised for a non-zero code with
        HTTP 404 where the endpoint's spec answers 404 for "not found" (``absent_on_404``), or
        with a message naming the absence (``absent_markers``). Anything that is not the
        envelope, whatever the status (404 included), is IamportUnexpectedReply; any other
        non-zero code is IamportRequestRejected.
        """
        if not _is_envelope(body):
            raise IamportUnexpectedReply(
                f"{what}: the reply is not Iamport's {{code, message, response}} envelope",
                http_status=status,
                body_excerpt=clean_excerpt(body),
            )
        code = _code(body)
        message = _message(body)
        if code != 0:
            if (status == 404 and absent_on_404) or any(m in message for m in absent_markers):
                raise IamportNotFound(message or "not found", http_status=status)
            raise IamportRequestRejected(code, message, http_status=status)
        if not 200 <= status < 300:
            raise IamportUnexpectedReply(
                f"{what}: a non-2xx reply with code 0",
                http_status=status,
                body_excerpt=clean_excerpt(body),
            )
        return body.get("response")

    def _parsed(
        self,
        parse: Callable[[Any], _T],
        data: Any,
        *,
        what: str,
        status: int,
        body: Any,
        unknown: Callable[..., IamportError] | None = None,
    ) -> _T:
        """``parse(data)``, a reply of the wrong shape raised as a typed error."""
        try:
            return parse(data)
        except ShapeError as e:
            reason = f"{what}: the response has the wrong shape ({e})"
            details = {"http_status": status, "body_excerpt": clean_excerpt(body)}
            if unknown is not None:
                raise unknown(reason, **details) from None
            raise IamportUnexpectedReply(reason, **details) from None

    # -- charges ------------------------------------------------------------------------------

    def charge_again(
        self, customer_uid: str, merchant_uid: str, amount: int, name: str, **optional: Any
    ) -> Payment:
        """POST /subscribe/payments/again. A card decline is a Payment with status 'failed'.

        Raises IamportBillingKeyMissing (no billing key), IamportRequestRejected (other non-zero
        code), IamportOutcomeUnknown (timeout, reset after sending, 5xx, a reply that is not
        Iamport's envelope or has no usable payment) or IamportRateLimited (429: not
        processed, safe to send again later).
        """
        unknown_fields = set(optional) - CHARGE_OPTIONAL_FIELDS
        if unknown_fields:
            raise ValueError(f"unknown charge_again fields: {sorted(unknown_fields)}")
        body = {
            "customer_uid": customer_uid,
            "merchant_uid": merchant_uid,
            "amount": amount,
            "name": name,
            **{k: v for k, v in optional.items() if v is not None},
        }
        unknown = partial(IamportOutcomeUnknown, merchant_uid=merchant_uid)
        what = "POST /subscribe/payments/again"
        status, reply = self._call("POST", "/subscribe/payments/again", json=body, unknown=unknown)
        if status == 404 and _is_envelope(reply) and _code(reply) != 0:
            # Iamport's own 404 for an unknown customer_uid (the spec's reading of code 1).
            raise IamportBillingKeyMissing(
                _code(reply), _message(reply) or "customer_uid not found", http_status=404
            )
        try:
            response = self._payload(status, reply, what=what)
        except IamportRequestRejected as e:
            if any(m in e.api_message for m in BILLING_KEY_MISSING_MARKERS):
                raise IamportBillingKeyMissing(e.code, e.api_message, http_status=status) from None
            raise
        except (IamportTransportError, IamportNotFound) as e:
            # Not Iamport's envelope (a proxy's page, a gateway's 404): nothing says no charge.
            raise unknown(e.summary, http_status=status, body_excerpt=e.body_excerpt) from None
        return self._parsed(
            Payment.parse, response, what=what, status=status, body=reply, unknown=unknown
        )

    # -- payment lookups ----------------------------------------------------------------------

    def _sandbox_params(self) -> dict[str, str]:
        return {"include_sandbox": "true"} if self.settings.include_sandbox else {}

    def get_payment(self, imp_uid: str) -> Payment:
        """GET /payments/{imp_uid}. IamportNotFound only on Iamport's own 404 envelope;
        IamportUnexpectedReply (could not ask) for anything else that is not a payment."""
        what = "GET /payments/{imp_uid}"
        status, body = self._call(
            "GET", f"/payments/{quote(imp_uid, safe='')}", params=self._sandbox_params()
        )
        data = self._payload(status, body, what=what, absent_on_404=True)
        return self._parsed(Payment.parse, data, what=what, status=status, body=body)

    def get_payment_with_history(self, imp_uid: str) -> tuple[Payment, list[CancelEntry]]:
        """GET /payments/{imp_uid} with its ``cancel_history`` (what refunds settle from).
        Raises as ``get_payment`` does, and IamportUnexpectedReply on a malformed history."""
        what = "GET /payments/{imp_uid}"
        status, body = self._call(
            "GET", f"/payments/{quote(imp_uid, safe='')}", params=self._sandbox_params()
        )
        data = self._payload(status, body, what=what, absent_on_404=True)
        payment = self._parsed(Payment.parse, data, what=what, status=status, body=body)
        history = self._parsed(CancelEntry.parse_history, data, what=what, status=status, body=body)
        return payment, history

    def find_payment(self, merchant_uid: str, status: str | None = None) -> Payment:
        """Latest payment of a merchant_uid (optionally with ``status``).

        IamportNotFound only on Iamport's own 404 envelope; IamportUnexpectedReply (could not
        ask) for a foreign 404, a proxy's page or a reply that is not a payment.
        """
        path = f"/payments/find/{quote(merchant_uid, safe='')}"
        if status:
            _check_status(status, allow_all=False)
            path += f"/{status}"
        what = "GET /payments/find/{merchant_uid}"
        http_status, body = self._call("GET", path)
        data = self._payload(http_status, body, what=what, absent_on_404=True)
        return self._parsed(Payment.parse, data, what=what, status=http_status, body=body)

    def find_all_payments(self, merchant_uid: str, status: str | None = None) -> list[Payment]:
        """Every payment record of a merchant_uid (all pages).

        [] only when Iamport's own envelope answers 404 for it (the spec's "no such
        merchant_uid"). A 404 that is not the envelope, a proxy's page or a reply that is not
        the paged object {total, previous, next, list} raises IamportUnexpectedReply: it says
        nothing about whether the merchant_uid was charged.
        """
        base = f"/payments/findAll/{quote(merchant_uid, safe='')}"
        if status:
            _check_status(status, allow_all=False)
            base += f"/{status}"
        what = "GET /payments/findAll/{merchant_uid}"
        payments: list[Payment] = []
        page = 1
        while page:
            http_status, body = self._call("GET", base, params={"page": page, "limit": 1000})
            try:
                data = self._payload(http_status, body, what=what, absent_on_404=True)
            except IamportNotFound:
                if page == 1:
                    return []
                raise IamportUnexpectedReply(
                    f"{what}: page {page} answered 404 after earlier pages listed payments",
                    http_status=http_status,
                ) from None
            result = self._parsed(PaymentPage.parse, data, what=what, status=http_status, body=body)
            payments.extend(result.payments)
            page = result.next if result.next > page else 0
        return payments

    def list_payments(
        self,
        status: str = "all",
        since: int | None = None,
        until: int | None = None,
        *,
        limit: int = 1000,
    ) -> Iterable[Payment]:
        """All payments with ``status`` in [since, until] (UNIX seconds), page by page.

        The spec gives no 404 for this endpoint (none found is an empty page), so any 404 or
        reply that is not a paged object raises instead of ending the listing early.
        """
        _check_status(status, allow_all=True)
        what = "GET /payments/status/{payment_status}"
        page = 1
        while page:
            params: dict[str, Any] = {"page": page, "limit": limit}
            if since is not None:
                params["from"] = int(since)
            if until is not None:
                params["to"] = int(until)
            http_status, body = self._call("GET", f"/payments/status/{status}", params=params)
            data = self._payload(http_status, body, what=what)
            result = self._parsed(PaymentPage.parse, data, what=what, status=http_status, body=body)
            yield from result.payments
            page = result.next if result.next > page else 0

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
        """Full (amount None) or partial cancel; ``checksum`` guards against double refunds.

        Never resent by the hook, except when the connection was provably never established:
        a timeout, a reset, a 5xx or a reply that is not Iamport's envelope after sending
        raises IamportCancelOutcomeUnknown (the refund may have happened; look the payment up
        before cancelling again). IamportRequestRejected means Iamport refused it.
        """
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
        unknown = partial(IamportCancelOutcomeUnknown, imp_uid=imp_uid, merchant_uid=merchant_uid)
        what = "POST /payments/cancel"
        status, reply = self._call("POST", "/payments/cancel", json=body, unknown=unknown)
        try:
            response = self._payload(status, reply, what=what)
        except IamportTransportError as e:
            raise unknown(e.summary, http_status=status, body_excerpt=e.body_excerpt) from None
        return self._parsed(
            Payment.parse, response, what=what, status=status, body=reply, unknown=unknown
        )

    # -- billing keys -------------------------------------------------------------------------

    def get_billing_key(self, customer_uid: str) -> BillingKey:
        """IamportNotFound only on Iamport's envelope saying so (404, or code 1 with its
        "not registered" message); IamportUnexpectedReply for anything else."""
        what = "GET /subscribe/customers/{customer_uid}"
        status, body = self._call("GET", f"/subscribe/customers/{quote(customer_uid, safe='')}")
        data = self._payload(
            status, body, what=what, absent_on_404=True,
            absent_markers=BILLING_KEY_MISSING_MARKERS,
        )  # fmt: skip
        return self._parsed(BillingKey.parse, data, what=what, status=status, body=body)

    def get_billing_keys(self, customer_uids: list[str]) -> BillingKeyLookup:
        """Bulk lookup (HTTP 207 = some found); chunks of 100 customer_uids per request.

        A customer_uid is reported missing only on Iamport's own envelope (200/207 without
        it, or the envelope's 404 for the chunk); a foreign 404, a proxy's page or a reply of
        the wrong shape raises IamportUnexpectedReply instead.
        """
        found: list[BillingKey] = []
        wanted = list(dict.fromkeys(customer_uids))
        what = "GET /subscribe/customers"
        for start in range(0, len(wanted), 100):
            chunk = wanted[start : start + 100]
            status, body = self._call(
                "GET", "/subscribe/customers", params=[("customer_uid[]", c) for c in chunk]
            )
            if status == 207 and _is_envelope(body):
                body = {**body, "code": 0}
            try:
                items = self._payload(
                    status, body, what=what, absent_on_404=True,
                    absent_markers=BILLING_KEY_MISSING_MARKERS,
                )  # fmt: skip
            except IamportNotFound:
                continue
            found.extend(self._parsed(_billing_keys, items, what=what, status=status, body=body))
        have = {b.customer_uid for b in found}
        return BillingKeyLookup(found=found, missing=[c for c in wanted if c not in have])

    def delete_billing_key(self, customer_uid: str, reason: str | None = None) -> BillingKey:
        what = "DELETE /subscribe/customers/{customer_uid}"
        params = {"reason": reason} if reason else None
        status, body = self._call(
            "DELETE", f"/subscribe/customers/{quote(customer_uid, safe='')}", params=params
        )
        data = self._payload(
            status, body, what=what, absent_on_404=True,
            absent_markers=BILLING_KEY_MISSING_MARKERS,
        )  # fmt: skip
        return self._parsed(BillingKey.parse, data, what=what, status=status, body=body)

    # -- UI -----------------------------------------------------------------------------------

    def test_connection(self) -> tuple[bool, str]:
        """Issue a token: proves the URL, TLS and credentials without touching payments.

        A token that comes back already expired (``expired_at`` not after the server's
        ``now``) is a failure: billing would run on a token the gateway may refuse.
        """
        try:
            # Always a fresh getToken: a cached token would pass a wrong imp_secret.
            token = self._issue_token()
        except (IamportError, ValueError) as e:
            return False, str(e)
        if token.already_expired:
            return False, (
                f"{self.settings.base_url} issued a token that is already expired: expired_at "
                f"{token.expired_at} is not after the server's now {token.server_now}; check "
                "the gateway's clock or a proxy caching getToken"
            )
        return True, f"Connected to {self.settings.base_url}; token valid until {token.expired_at}"


_T = TypeVar("_T")


def _verdict(resp: urllib3.BaseHTTPResponse) -> int:
    """What a reply tells the rate limiter: 429 is over the rate, a 5xx is trouble."""
    if resp.status == 429:
        return REFUSED
    return TROUBLE if resp.status >= 500 else OK


def _is_envelope(body: Any) -> bool:
    """Iamport's ``{code, message, response}``: an object with all three and an integer code."""
    return (
        isinstance(body, dict)
        and {"code", "message", "response"} <= body.keys()
        and _code(body) is not None
    )


def _code(body: dict[str, Any]) -> int | None:
    code = body.get("code")
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code
    if isinstance(code, str) and re.fullmatch(r"-?\d{1,9}", code.strip()):
        return int(code)
    return None


def _message(body: Any) -> str:
    if isinstance(body, dict):
        return str(body.get("message") or "")
    return ""


def _credentials_refused(status: int, message: str | None, excerpt: str | None) -> IamportAuthError:
    """getToken's 401/403. Without Iamport's envelope, a proxy or firewall may be the refuser."""
    reason = message or "unauthorized"
    if excerpt is not None:
        reason += " (not Iamport's envelope: a proxy or firewall may have refused it)"
    return IamportAuthError(
        f"credentials refused: Iamport refused imp_key/imp_secret: {reason}",
        http_status=status,
        body_excerpt=excerpt,
    )


def _access_token(resp: Any) -> AccessToken | None:
    """The AuthAnnotation, or None when it is not usable (``now`` defaults to local time)."""
    if not isinstance(resp, dict):
        return None
    token, expired_at, now = resp.get("access_token"), resp.get("expired_at"), resp.get("now")
    if not isinstance(token, str) or not token.strip():
        return None
    try:
        expired = int(float(expired_at))  # type: ignore[arg-type]
        server_now = int(float(now)) if now is not None else int(time.time())
    except (TypeError, ValueError, OverflowError):
        return None
    if isinstance(expired_at, bool) or isinstance(now, bool):
        return None
    return AccessToken(token=token, expired_at=expired, server_now=server_now)


def _billing_keys(items: Any) -> list[BillingKey]:
    if not isinstance(items, list):
        raise ShapeError(f"billing keys are {type(items).__name__}, not a list")
    return [BillingKey.parse(item) for item in items]


def _check_status(status: str, *, allow_all: bool) -> None:
    allowed = PAYMENT_STATUSES if allow_all else PAYMENT_STATUSES - {"all"}
    if status not in allowed:
        raise ValueError(f"payment status must be one of {sorted(allowed)}, got {status!r}")
