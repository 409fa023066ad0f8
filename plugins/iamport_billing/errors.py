"""Typed errors for the Iamport V1 API: each says what happened, none carries a secret."""

from __future__ import annotations


class IamportError(Exception):
    """Base class. ``http_status`` and ``body_excerpt`` help debugging; never secrets."""

    def __init__(
        self, message: str, *, http_status: int | None = None, body_excerpt: str | None = None
    ):
        detail = message
        if http_status is not None:
            detail += f" (HTTP {http_status})"
        if body_excerpt:
            detail += f": {body_excerpt}"
        super().__init__(detail)
        self.http_status = http_status
        self.body_excerpt = body_excerpt


class IamportAuthError(IamportError):
    """imp_key/imp_secret rejected, or a fresh token still got 401."""


class IamportRequestRejected(IamportError):
    """The API answered with a non-zero ``code`` and ``response: null``."""

    def __init__(self, code: int, api_message: str | None, *, http_status: int | None = None):
        super().__init__(
            f"Iamport rejected the request: code {code}: {api_message or '(no message)'}",
            http_status=http_status,
        )
        self.code = code
        self.api_message = api_message or ""


class IamportBillingKeyMissing(IamportRequestRejected):
    """The customer_uid has no billing key (code 1 '등록되지 않은 구매자' or HTTP 404)."""


class IamportNotFound(IamportError):
    """A lookup found nothing (HTTP 404, or code 1 where the API uses it for 'not found')."""


class IamportRateLimited(IamportError):
    """HTTP 429. ``retry_after`` is the server's hint in seconds, when it gave one."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class IamportTransportError(IamportError):
    """The server could not be reached or answered something unusable on a safe call."""


class IamportOutcomeUnknown(IamportError):
    """A charge may or may not have happened (timeout, reset after sending, 5xx, garbled reply).

    Resolve it by looking the merchant_uid up before touching the subscription again.
    """

    def __init__(self, message: str, *, merchant_uid: str, **kw):
        super().__init__(f"outcome unknown for merchant_uid {merchant_uid}: {message}", **kw)
        self.merchant_uid = merchant_uid
