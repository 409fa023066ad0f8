"""PortOneHook: owns a ``portone`` connection and speaks the PortOne V2 REST API.

Our own urllib3 client, not the official ``portone-server-sdk`` (0.21.0, read in its source):
its clients build the headers of every call themselves (``Authorization`` and ``User-Agent``;
no per-call headers in its API), so it cannot send an ``Idempotency-Key``, the one thing that
makes a V2 charge safe to send again. It also has one 60 s timeout for connect and read alike,
calls ``response.json()`` on any non-200 (a proxy's HTML page becomes a JSONDecodeError, not a
typed "could not ask"), tries every error type's deserializer in turn (13 for a charge) on each
failed call, and would add httpx beside the urllib3 pool the V1 hook already tuned for the
charge path. What the two hooks share (base-URL rule, pool, masking, excerpts) is in
``hooks.transport``.

The hook answers every exchange as a :class:`Reply` (status and JSON body, PortOne's error
``type`` when it is PortOne's shape) and raises only when there is no answer to map: the
secret refused, never sent, rate limited, or no usable reply to a request that may have left.
"""

from __future__ import annotations

import json as jsonlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import urllib3
from airflow.sdk import BaseHook
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError

from iamport_billing.errors import IamportError
from iamport_billing.hooks.transport import (
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

DEFAULT_BASE_URL = "https://api.portone.io"
# PortOne recommends at least 60 s: a charge waits on the card company.
DEFAULT_READ_TIMEOUT_S = 60.0
# The replay of a request still being processed: wait and send the same key again.
OUTSTANDING = "IDEMPOTENCY_OUTSTANDING_REQUEST"
OUTSTANDING_WAIT_S = 2.0
# PortOne's error type for the card company's own refusal (a decline, answered 502).
PG_PROVIDER = "PG_PROVIDER"
DEFAULT_EXCHANGE_BUDGET_S = 60.0


class PortOneError(IamportError):
    """Base class of the V2 hook's errors (message, status, clean excerpt; never a secret)."""


class PortOneAuthError(PortOneError):
    """401/403: the V2 API secret (or the store) was refused; nothing was processed."""


class PortOneNotSent(PortOneError):
    """The request provably never left (no connection could be made)."""


class PortOneUnavailable(PortOneError):
    """A read could not be answered (unreachable, 5xx, not JSON) after its retries."""


class PortOneRateLimited(PortOneError):
    """429 on the first send: not processed. ``retry_after`` is the server's hint."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class PortOneOutcomeUnknown(PortOneError):
    """A POST may have been processed and no usable answer came back, even after resending
    it with the same Idempotency-Key: look it up before anything else."""


@dataclass(frozen=True)
class PortOneSettings:
    """What the hook reads from the connection; the secret stays out of repr."""

    base_url: str
    secret: str
    store_id: str | None = None
    channel_key: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = DEFAULT_READ_TIMEOUT_S
    max_retries: int = 3
    verify_tls: bool = True
    # No new send or read of one exchange after this long: a charge's send and its lookup end
    # well inside the ledger's pending lease (300 s by default).
    exchange_budget_s: float = DEFAULT_EXCHANGE_BUDGET_S
    rate_limit: RateLimitSettings = RateLimitSettings()

    def __repr__(self) -> str:
        return f"PortOneSettings(base_url={self.base_url!r}, store_id={self.store_id!r}, ...)"


def settings_from_connection(conn: Any) -> PortOneSettings:
    extra = conn.extra_dejson or {}
    base_url = base_url_of(conn, DEFAULT_BASE_URL, "PortOne")
    if not conn.password:
        raise ValueError("The portone connection needs the V2 API secret (password)")
    retries = extra.get("max_retries")
    return PortOneSettings(
        base_url=base_url,
        secret=conn.password,
        store_id=str(extra["store_id"]) if extra.get("store_id") else None,
        channel_key=str(extra["channel_key"]) if extra.get("channel_key") else None,
        connect_timeout=float(extra.get("connect_timeout") or 10.0),
        read_timeout=float(extra.get("read_timeout") or DEFAULT_READ_TIMEOUT_S),
        max_retries=int(retries) if retries not in (None, "") else 3,
        verify_tls=bool_extra(extra.get("verify_tls"), True),
        exchange_budget_s=float(extra.get("exchange_budget_s") or DEFAULT_EXCHANGE_BUDGET_S),
        rate_limit=rate_limit_of(conn),
    )


@dataclass(frozen=True)
class Reply:
    """One answer: HTTP status, parsed JSON body and a clean excerpt of it."""

    status: int
    body: Any
    excerpt: str
    # A write sent again after an earlier send may have been processed: PortOne replays the
    # first answer, but a refusal now may still be about the first send having applied.
    resent: bool = False

    @property
    def error_type(self) -> str | None:
        """PortOne's error ``type`` when the body is its error shape ({type, message?})."""
        body = self.body
        if self.status >= 400 and isinstance(body, dict) and isinstance(body.get("type"), str):
            message = body.get("message")
            if message is None or isinstance(message, str):
                return body["type"]
        return None

    @property
    def message(self) -> str:
        body = self.body
        return str(body.get("message") or "") if isinstance(body, dict) else ""


def _verdict(resp: urllib3.BaseHTTPResponse) -> int:
    """What a reply tells the rate limiter: 429 is over the rate, a 5xx is trouble unless it
    is the card company's answer (PG_PROVIDER: a decline)."""
    if resp.status == 429:
        return REFUSED
    if resp.status < 500:
        return OK
    body = parse_body(resp)
    return OK if isinstance(body, dict) and body.get("type") == PG_PROVIDER else TROUBLE


class PortOneHook(BaseHook):
    """Typed client for the PortOne V2 REST API.

    :param portone_conn_id: connection of type ``portone`` (host = API base URL, password = V2
        API secret, extras store_id, channel_key, timeouts, verify_tls).
    :param pool_maxsize: HTTP connections kept open; set it to the charge concurrency.
    """

    conn_name_attr = "portone_conn_id"
    default_conn_name = "portone_default"
    conn_type = "portone"
    hook_name = "PortOne V2"

    def __init__(self, portone_conn_id: str = default_conn_name, *, pool_maxsize: int = 16):
        super().__init__()
        self.portone_conn_id = portone_conn_id
        self.pool_maxsize = pool_maxsize
        self._settings: PortOneSettings | None = None
        self._pool: urllib3.PoolManager | None = None
        self._pool_lock = threading.Lock()

    @property
    def settings(self) -> PortOneSettings:
        if self._settings is None:
            conn = self.get_connection(self.portone_conn_id)
            if conn.password:
                mask(conn.password, "portone_api_secret")
            self._settings = settings_from_connection(conn)
        return self._settings

    @property
    def limiter(self) -> Limiter | None:
        """The connection's request limit (shared through Redis when configured so)."""
        s = self.settings
        return connection_limiter(
            self.portone_conn_id, s.rate_limit, s.connect_timeout, s.read_timeout
        )

    def get_conn(self) -> urllib3.PoolManager:
        with self._pool_lock:
            if self._pool is None:
                s = self.settings
                self._pool = build_pool(
                    s.base_url, verify_tls=s.verify_tls, maxsize=self.pool_maxsize
                )
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.clear()
                self._pool = None

    # -- calls --------------------------------------------------------------------------------

    def get(self, path: str, *, query_body: dict[str, Any] | None = None) -> Reply:
        """A read (retried on connection errors, 429 and 5xx). ``query_body`` is sent as the
        spec's ``requestBody`` query parameter (JSON), storeId inside it; otherwise storeId
        is a query parameter. Raises PortOneAuthError, PortOneRateLimited or
        PortOneUnavailable."""
        store = self.settings.store_id
        if query_body is not None:
            body = {**query_body, **({"storeId": store} if store else {})}
            params = {"requestBody": jsonlib.dumps(body, separators=(",", ":"))}
        else:
            params = {"storeId": store} if store else {}
        return self._exchange("GET", path + ("?" + urlencode(params) if params else ""))

    def post(self, path: str, body: dict[str, Any], *, idempotency_key: str) -> Reply:
        """A write under an Idempotency-Key (16-256 characters of ``[A-Za-z0-9_-]``).

        A dropped reply, a read timeout or a 5xx that is not PortOne's answer is sent again
        with the same key (PortOne answers a completed request as it first did), and 409
        IDEMPOTENCY_OUTSTANDING_REQUEST is waited out, both at most ``max_retries`` times.
        Raises PortOneAuthError, PortOneNotSent, PortOneRateLimited (429, nothing sent
        before) or PortOneOutcomeUnknown (it may have been processed).
        """
        if self.settings.store_id:
            body = {**body, "storeId": self.settings.store_id}
        return self._exchange("POST", path, body=body, idempotency_key=idempotency_key)

    def _exchange(
        self, method: str, path: str, *, body: Any = None, idempotency_key: str | None = None
    ) -> Reply:
        s = self.settings
        headers = {
            "Authorization": f"PortOne {s.secret}",
            "User-Agent": "airflow-iamport-billing",
            "Accept": "application/json",
        }
        data = None
        if body is not None:
            data = jsonlib.dumps(body, ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json"
        if idempotency_key is not None:
            headers["Idempotency-Key"] = f'"{idempotency_key}"'  # an RFC 8941 string
        write = method != "GET"
        timeout = urllib3.Timeout(connect=s.connect_timeout, read=s.read_timeout)
        what = f"{method} {path.split('?')[0]}"
        may_have_left = False
        tries = connect_failures = outstanding = 0
        started = time.monotonic()

        def give_up(reason: str, **details: Any) -> PortOneError:
            if write and may_have_left:
                return PortOneOutcomeUnknown(f"{what}: {reason}", **details)
            if write:
                return PortOneNotSent(f"{what}: {reason}", **details)
            return PortOneUnavailable(f"{what}: {reason}", **details)

        while True:
            if tries and time.monotonic() - started > s.exchange_budget_s:
                # No new send once the budget is spent: a charge (its send, resends and its
                # lookup) stays well inside the ledger's pending lease, so no other try takes
                # the row over while this one may still send.
                raise give_up(f"out of time after {tries} tries")
            tries += 1
            resent = write and may_have_left
            try:
                resp = limited_request(
                    self.limiter, self.get_conn(), method, s.base_url + path, _verdict,
                    body=data, headers=headers, timeout=timeout, redirect=False,
                )  # fmt: skip
            except NotAdmitted as e:
                # An earlier send of this write may have been processed: give_up says so.
                raise give_up(f"not sent: {e}") from None
            except HTTPError as e:
                # A connect error or timeout never sent the request; a read timeout or a reset
                # may follow a processed write.
                never_sent = isinstance(e, (NewConnectionError, ConnectTimeoutError))
                if never_sent:
                    connect_failures += 1
                else:
                    may_have_left = True
                if (never_sent and connect_failures <= s.max_retries) or tries <= s.max_retries:
                    self._pause(tries, None)
                    continue
                raise give_up(f"{type(e).__name__}, no reply after {tries} tries") from None
            may_have_left = True if write else may_have_left
            excerpt = scrub(clean_excerpt(resp.data), (s.secret,)) or ""
            reply = Reply(resp.status, parse_body(resp), excerpt, resent)
            if reply.status in (401, 403):
                if resent:  # refused now, and an earlier send may have been processed
                    raise give_up(f"HTTP {reply.status} on a resend", http_status=reply.status)
                shape = "" if reply.error_type else " (not PortOne's reply: a proxy may refuse it)"
                raise PortOneAuthError(
                    f"{what}: PortOne refused the V2 API secret{shape}",
                    http_status=reply.status, body_excerpt=reply.excerpt,
                )  # fmt: skip
            if reply.status == 409 and reply.error_type == OUTSTANDING:
                outstanding += 1
                if outstanding <= s.max_retries:
                    log.info("%s: the first request under this key is still running: waiting",
                             what)  # fmt: skip
                    time.sleep(OUTSTANDING_WAIT_S * outstanding)
                    continue
                raise give_up("still being processed under this Idempotency-Key", http_status=409)
            if reply.status == 429:
                hint = retry_after(resp)
                if not write and tries <= s.max_retries:
                    self._pause(tries, hint)
                    continue
                if resent:  # an earlier send of this write may have been processed
                    raise give_up("rate limited on a resend", http_status=429)
                raise PortOneRateLimited(
                    f"{what}: rate limited", retry_after=hint, http_status=429,
                    body_excerpt=reply.excerpt,
                )  # fmt: skip
            # A 5xx that is not PortOne's answer, or a success that is not JSON: ask again.
            # A 4xx in any shape is an answer (the caller reads a foreign one as such).
            unusable = (reply.status >= 500 and reply.error_type is None) or (
                reply.status < 400 and reply.body is UNPARSEABLE
            )
            if unusable:
                if tries <= s.max_retries:
                    self._pause(tries, retry_after(resp))
                    continue
                raise give_up(
                    "no usable reply", http_status=reply.status, body_excerpt=reply.excerpt
                )
            return reply

    def _pause(self, tries: int, hint: float | None) -> None:
        time.sleep(backoff_delay(tries, hint))

    # -- UI -----------------------------------------------------------------------------------

    def test_connection(self) -> tuple[bool, str]:
        """One authenticated read (the newest payment): proves the URL, TLS and the secret."""
        try:
            reply = self.get("/payments-by-cursor", query_body={"size": 1})
        except PortOneAuthError as e:
            return False, f"The V2 API secret was refused: {e}"
        except (PortOneError, ValueError) as e:
            return False, str(e)
        if reply.status != 200 or not isinstance(reply.body, dict):
            return False, (
                f"{self.settings.base_url} did not answer like PortOne V2 "
                f"(HTTP {reply.status}): {reply.excerpt}"
            )
        return True, f"Connected to {self.settings.base_url}; the V2 API secret was accepted"
