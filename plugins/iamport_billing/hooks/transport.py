"""What the gateway hooks share: the base-URL and plain-http rule, the urllib3 pool, secret
masking, and clean excerpts of replies for error messages.

Both the Iamport V1 and the PortOne V2 hook own a urllib3 pool rather than an HttpHook (see
``hooks.iamport``); everything here is about talking HTTP safely, nothing about either API.
"""

from __future__ import annotations

import html
import json as jsonlib
import math
import os
import random
import re
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import certifi
import urllib3

from iamport_billing.net import is_loopback_host
from iamport_billing.rate_limit import (
    LEASE_MARGIN_S,
    TROUBLE,
    Limiter,
    RateLimitSettings,
    limiter_for,
)

EXCERPT_CHARS = 120
# A reply body that is there but not JSON (an HTML error page, plain text).
UNPARSEABLE = object()


def mask(value: str, name: str) -> None:
    """Register a secret with Airflow's masker (task process and supervisor)."""
    try:
        from airflow.sdk.log import mask_secret

        mask_secret(value, name)
    except Exception:  # pragma: no cover - masking must never break a call
        pass


def bool_extra(value: Any, default: bool) -> bool:
    """A connection extra as a boolean (forms and JSON give strings, booleans or nothing)."""
    if value is None or value == "":
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def base_url_of(conn: Any, default: str, api: str) -> str:
    """The API base URL of a connection (host, or scheme + host + port; ``default`` when empty);
    plain http only to a loopback host unless the extra ``allow_insecure_http`` says so."""
    extra = conn.extra_dejson or {}
    host = (conn.host or "").strip()
    if not host:
        base_url = default
    elif "://" in host:
        base_url = host
    else:
        base_url = f"{conn.schema or 'https'}://{host}"
    if conn.port and "://" in base_url and not urlsplit(base_url).port:
        base_url = f"{base_url.rstrip('/')}:{conn.port}"
    base_url = base_url.rstrip("/")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{api} base URL must be http(s), got {parts.scheme!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
        if not bool_extra(extra.get("allow_insecure_http"), False):
            raise ValueError(
                f"Refusing plain http to non-loopback host {parts.hostname!r}: set the "
                "connection extra allow_insecure_http=true if you really mean it"
            )
    return base_url


def rate_limit_of(conn: Any) -> RateLimitSettings:
    """The connection's shared limit: extras ``requests_per_second``, ``max_in_flight``,
    ``rate_limit_redis_conn_id`` and ``adaptive`` (default true); empty means no limit."""
    extra = conn.extra_dejson or {}
    rps = extra.get("requests_per_second")
    flight = extra.get("max_in_flight")
    settings = RateLimitSettings(
        requests_per_second=float(rps) if rps not in (None, "") else None,
        max_in_flight=int(flight) if flight not in (None, "") else None,
        redis_conn_id=str(extra.get("rate_limit_redis_conn_id") or "") or None,
        adaptive=bool_extra(extra.get("adaptive"), True),
    )
    rate = settings.requests_per_second
    if rate is not None and not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"requests_per_second must be a number > 0, got {rps!r}")
    if settings.max_in_flight is not None and settings.max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {flight!r}")
    return settings


def connection_limiter(
    conn_id: str, settings: RateLimitSettings, connect_timeout: float, read_timeout: float
) -> Limiter | None:
    """The process's limiter of a connection; an in-flight slot is leased for the request's
    own timeouts plus a margin, so a killed worker's slot frees itself."""
    return limiter_for(conn_id, settings, connect_timeout + read_timeout + LEASE_MARGIN_S)


def limited_request(
    limiter: Limiter | None,
    pool: urllib3.PoolManager,
    method: str,
    url: str,
    verdict: Callable[[urllib3.BaseHTTPResponse], int],
    **options: Any,
) -> urllib3.BaseHTTPResponse:
    """``pool.request`` under the connection's limit: wait for the turn (raises
    rate_limit.NotAdmitted, nothing sent), send, then report ``verdict(reply)`` (an exception
    is trouble)."""
    if limiter is None:
        return pool.request(method, url, **options)
    permit = limiter.acquire()
    try:
        resp = pool.request(method, url, **options)
    except BaseException:
        limiter.release(permit, TROUBLE)
        raise
    limiter.release(permit, verdict(resp))
    return resp


def build_pool(base_url: str, *, verify_tls: bool, maxsize: int) -> urllib3.PoolManager:
    """A thread-safe pool without urllib3's own retries; proxies and the CA bundle come from
    the environment once (HTTPS_PROXY/NO_PROXY, REQUESTS_CA_BUNDLE, SSL_CERT_FILE)."""
    options: dict[str, Any] = {"num_pools": 2, "maxsize": max(1, maxsize), "retries": False}
    if verify_tls:
        options["cert_reqs"] = "CERT_REQUIRED"
        env = os.environ
        options["ca_certs"] = (
            env.get("REQUESTS_CA_BUNDLE") or env.get("SSL_CERT_FILE") or certifi.where()
        )
    else:
        options["cert_reqs"] = "CERT_NONE"
    parts = urlsplit(base_url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        return urllib3.ProxyManager(proxy, **options)
    return urllib3.PoolManager(**options)


def parse_body(resp: urllib3.BaseHTTPResponse) -> Any:
    """The JSON of a reply, None for an empty body, UNPARSEABLE for anything else."""
    if not resp.data:
        return None
    try:
        return jsonlib.loads(resp.data)
    except ValueError:
        return UNPARSEABLE


def retry_after(resp: urllib3.BaseHTTPResponse) -> float | None:
    """The server's Retry-After hint in seconds, when it gave one in seconds."""
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def backoff_delay(attempt: int, hint: float | None) -> float:
    """Seconds before try ``attempt + 1``: the server's hint (at most a minute), else jittered
    exponential backoff from 0.2 s up to 8 s."""
    if hint is not None:
        return min(hint, 60.0)
    delay = min(8.0, 0.2 * 2 ** (attempt - 1))
    return delay / 2 + random.uniform(0, delay / 2)


def scrub(text: str | None, secrets: tuple[str, ...]) -> str | None:
    """``text`` with every secret replaced (a server may echo the request in its error)."""
    if not text:
        return text
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


_BLOCKS = re.compile(r"<(script|style)\b.*?</\1\s*>", re.S | re.I)
_TAGS = re.compile(r"<!--.*?-->|<[^>]*>|<[^>]*$", re.S)


def clean_excerpt(body: Any, limit: int = EXCERPT_CHARS) -> str:
    """A short, clean text of any reply body for error messages and logs.

    Bytes, text or parsed JSON; markup is stripped (an nginx error page becomes
    "502 Bad Gateway nginx"), entities decoded, whitespace and control characters collapsed,
    no angle brackets left, at most ``limit`` characters.
    """
    if body is None or body is UNPARSEABLE:
        return ""
    if isinstance(body, (bytes, bytearray)):
        text = bytes(body[: limit * 50]).decode("utf-8", "replace")
    elif isinstance(body, str):
        text = body
    else:
        try:
            text = jsonlib.dumps(body, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = repr(body)
    text = _BLOCKS.sub(" ", text[: limit * 50])
    if "<" in text:
        lower = text.lower()
        at = lower.find("<body")
        if at >= 0 and _TAGS.sub(" ", text[at:]).strip():
            text = text[at:]
        text = html.unescape(_TAGS.sub(" ", text))
        text = _TAGS.sub(" ", text)
    text = "".join(" " if not ch.isprintable() else ch for ch in text)
    text = " ".join(text.replace("<", " ").replace(">", " ").split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text
