"""Typed errors for the Iamport V1 API: each says what happened, none carries a secret.

Two families matter for money:

* "Iamport has no record" is only ever :class:`IamportNotFound` (or an empty result), and the
  hook raises it only on Iamport's own ``{code, message, response}`` envelope saying so.
* "I could not ask" is :class:`IamportTransportError` and its subclasses (unreachable server,
  5xx, a proxy's page, a reply of the wrong shape). It never means absent: a caller that treats
  it as "no record" and charges again may charge twice.
"""

from __future__ import annotations


class IamportError(Exception):
    """Base class. ``http_status`` and ``body_excerpt`` help debugging; never secrets.

    ``summary`` is the message without the status and excerpt (to re-raise as another type).
    """

    def __init__(
        self, message: str, *, http_status: int | None = None, body_excerpt: str | None = None
    ):
        detail = message
        if http_status is not None:
            detail += f" (HTTP {http_status})"
        if body_excerpt:
            detail += f": {body_excerpt}"
        super().__init__(detail)
        self.summary = message
        self.http_status = http_status
        self.body_excerpt = body_excerpt


class IamportAuthError(IamportError):
    """imp_key/imp_secret refused by getToken (401/403), or a fresh token still got 401."""


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
    """Iamport itself says the record does not exist: its envelope (code != 0) with HTTP 404
    on an endpoint whose spec answers 404 for "not found", or, for billing keys, code 1 with
    the "not registered" message. Never raised for a reply that is not Iamport's envelope."""


class IamportRateLimited(IamportError):
    """HTTP 429. ``retry_after`` is the server's hint in seconds, when it gave one."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class IamportTransportError(IamportError):
    """Could not ask: the server could not be reached or answered something unusable on a
    safe call. Says nothing about whether a record exists."""


class IamportUnexpectedReply(IamportTransportError):
    """Could not ask: a reply that is not Iamport's answer to this call.

    Either not the ``{code, message, response}`` envelope at all (an HTML page, a proxy's
    ``{"error": ...}``, an empty body, a bare list, non-JSON), whatever the HTTP status, 404
    included; or the envelope with a ``response`` of the wrong shape (missing fields, a list
    where the spec gives an object). ``http_status`` and a clean, short ``body_excerpt`` say
    what came back.
    """


class IamportTokenUnavailable(IamportTransportError):
    """No token, so nothing was sent: getToken failed without refusing the credentials
    (unreachable, 5xx, a proxy's page, a reply without a usable token)."""


class IamportOutcomeUnknown(IamportError):
    """A charge may or may not have happened (timeout, reset after sending, 5xx, garbled reply).

    Resolve it by looking the merchant_uid up before touching the subscription again.
    """

    def __init__(self, message: str, *, merchant_uid: str, **kw):
        super().__init__(f"outcome unknown for merchant_uid {merchant_uid}: {message}", **kw)
        self.merchant_uid = merchant_uid


class IamportCancelOutcomeUnknown(IamportOutcomeUnknown):
    """A cancel (refund) may or may not have happened: it was sent and no usable answer came
    back (timeout, reset, 5xx, garbled reply). The hook never resends it; look the payment up
    (``get_payment``: ``cancel_amount``, ``cancel_history``) before cancelling again.

    ``imp_uid`` and ``merchant_uid`` are what the cancel named (either may be None).
    """

    def __init__(
        self, message: str, *, imp_uid: str | None = None, merchant_uid: str | None = None, **kw
    ):
        target = " / ".join(
            f"{name} {value}"
            for name, value in (("imp_uid", imp_uid), ("merchant_uid", merchant_uid))
            if value
        )
        IamportError.__init__(self, f"cancel outcome unknown for {target}: {message}", **kw)
        self.imp_uid = imp_uid
        self.merchant_uid = merchant_uid  # type: ignore[assignment]
