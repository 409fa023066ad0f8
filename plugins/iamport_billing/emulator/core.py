"""What the V1 and V2 emulators share: state, the fault layer and the /__emulator__ admin.

Faults live in ``EmulatorApp.__call__``, the outermost ASGI layer, because only there is ``send``
still uvicorn's own bound method: that gives access to the TCP transport, which the
drop-after-commit fault aborts so the client gets no response at all (not a 500).

Each API mode describes its wire words in a ``Dialect`` (the body of an emulated error, which
paths are lookups, which route charges) and may admit requests first (V2's Idempotency-Key,
which must see a request before its latency so a retry can meet it in flight).
"""

from __future__ import annotations

import asyncio
import html
import http
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match
from starlette.types import Message, Receive, Scope, Send

from iamport_billing.emulator.config import EmulatorConfig
from iamport_billing.emulator.rules import RECEIPT_PREFIX
from iamport_billing.emulator.store import Store
from iamport_billing.emulator.webhooks import WebhookSender

ADMIN_PREFIX = "/__emulator__"
# A held charge request goes on by itself after this long, released or not.
HOLD_LIMIT_S = 60.0
DROP = "iamport_emulator_drop_connection"
HTML_ERROR = (
    "<html><head><title>{code} {reason}</title></head><body><center><h1>{code} {reason}</h1>"
    "</center><hr><center>nginx</center></body></html>"
)
# Seconds of per-second request counts kept for GET /__emulator__/rate-log.
RATE_LOG_SECONDS = 3600
REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
FOREIGN_404_JSON = {"error": "not found"}


def phrase(status: int) -> str:
    try:
        return REASONS.get(status) or http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def html_error_page(status: int) -> str:
    """The page nginx serves for an error status."""
    return HTML_ERROR.format(code=status, reason=phrase(status))


@dataclass(frozen=True)
class Dialect:
    """The wire words of one API mode that the fault layer needs."""

    # JSON body of an emulated error (429, 5xx) for a status and a message.
    error_body: Callable[[int, str], dict[str, Any]]
    # GET paths a proxy's foreign 404 applies to (lookups, never charges or cancels).
    lookup_prefixes: tuple[str, ...]
    # The subset ``foreign_404_payment_lookups`` applies to.
    payment_lookup_prefixes: tuple[str, ...]
    # Route template of the charge (``charge_foreign_404``), e.g. ``POST /subscribe/...``.
    charge_route: str
    # Paths served without any fault (admin, receipts).
    unfaulted_prefixes: tuple[str, ...] = (ADMIN_PREFIX, RECEIPT_PREFIX)


class EmulatorState:
    """Config, database, seeded randomness and counters shared by every request."""

    def __init__(self, config: EmulatorConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.rng = random.Random(config.seed)
        self.counters: dict[str, Counter[str]] = {
            "requests": Counter(),
            "tokens": Counter(),
            "faults": Counter(),
            "charges": Counter(),
        }
        self._lock = threading.Lock()
        self.holds = 0  # how many of the next charge requests to hold
        self.held: dict[str, str] = {}  # merchant_uid (paymentId) -> customer_uid (billing key)
        self.webhooks: WebhookSender | None = None
        # epoch second -> [accepted, refused] API requests; requests being served now and the
        # most at once so far.
        self.rate_log: dict[int, list[int]] = {}
        self.in_flight = 0
        self.in_flight_peak = 0

    def close(self) -> None:
        """Stop background work (V2's webhook sender), then the database."""
        if self.webhooks is not None:
            self.webhooks.stop()
        self.store.close()

    def count(self, group: str, key: str) -> None:
        with self._lock:
            self.counters.setdefault(group, Counter())[key] += 1

    def admit_rate(self) -> bool:
        """Count an API request in its wall-clock second; False when ``rate_cap`` refuses it."""
        cap = self.config.rate_cap
        second = int(time.time())
        with self._lock:
            counts = self.rate_log.get(second)
            if counts is None:
                counts = self.rate_log[second] = [0, 0]
                for old in [s for s in self.rate_log if s <= second - RATE_LOG_SECONDS]:
                    del self.rate_log[old]
            refused = cap is not None and counts[0] >= cap
            counts[1 if refused else 0] += 1
        return not refused

    def rate_counts(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {
                str(s): {"accepted": a, "refused": r} for s, (a, r) in sorted(self.rate_log.items())
            }

    def serving(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta
            self.in_flight_peak = max(self.in_flight_peak, self.in_flight)

    def reseed(self, seed: int | None) -> None:
        self.rng = random.Random(seed)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            data: dict[str, Any] = {k: dict(v) for k, v in self.counters.items()}
            data["held"] = dict(self.held)
            data["in_flight_peak"] = self.in_flight_peak
        data["payments"] = self.store.payment_counts()
        return data

    async def held_in_the_network(self, merchant_uid: str, customer_uid: str) -> None:
        """A charge request stuck on its way, when a test asked for one: the gateway sees it
        only once it is released (``POST /__emulator__/release``) or after ``HOLD_LIMIT_S``."""
        with self._lock:
            if not self.holds:
                return
            self.holds -= 1
            self.held[merchant_uid] = customer_uid
        deadline = time.monotonic() + HOLD_LIMIT_S
        while merchant_uid in self.held and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        with self._lock:
            self.held.pop(merchant_uid, None)

    def hold(self, count: int) -> None:
        with self._lock:
            self.holds = count

    def release(self) -> list[str]:
        with self._lock:
            released, self.held, self.holds = list(self.held), {}, 0
        return released


class Admission:
    """A request let through to the faults and the routes; V2's idempotency records answers."""

    def wrap(self, send: Send) -> Send:
        return send

    async def close(self) -> None:
        """The request is over (answered by a route, by a fault, or not at all)."""


class EmulatorApp(FastAPI):
    """FastAPI plus fault injection at the outermost ASGI layer."""

    emulator: EmulatorState
    dialect: Dialect

    async def admit(self, scope: Scope, body: bytes, send: Send) -> Admission | None:
        """Before latency and faults; None when the request was answered here."""
        return Admission()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.dialect.unfaulted_prefixes):
            await super().__call__(scope, receive, send)
            return
        em = self.emulator
        em.count("requests", self._endpoint(scope))
        em.serving(+1)
        serving = True

        async def answered(message: Message) -> None:
            # Served once the last of the reply goes out: the client cannot have it before.
            nonlocal serving
            if serving and message["type"] == "http.response.body" and not message.get("more_body"):
                serving = False
                em.serving(-1)
            await send(message)

        answered.__wrapped__ = send  # type: ignore[attr-defined]  # for _abort_connection
        try:
            # A real server has the whole request before its (PG) latency: a client that
            # times out during the latency has still been charged.
            receive, body = await _buffered(receive)
            if not em.admit_rate():
                em.count("faults", "rate_cap")
                refusal = self.dialect.error_body(429, "Too Many Requests")
                await JSONResponse(refusal, 429, headers={"Retry-After": "1"})(scope, receive, send)
                return
            admission = await self.admit(scope, body, send)
            if admission is None:
                return
            try:
                await self._faulted(scope, receive, answered, admission)
            finally:
                await admission.close()
        finally:
            if serving:
                em.serving(-1)

    async def _faulted(
        self, scope: Scope, receive: Receive, send: Send, admission: Admission
    ) -> None:
        em, cfg, dialect = self.emulator, self.emulator.config, self.dialect
        path: str = scope["path"]
        if cfg.latency_ms > 0 or cfg.latency_jitter_ms > 0:
            delay_ms = max(0.0, em.rng.gauss(cfg.latency_ms, cfg.latency_jitter_ms))
            em.count("faults", "latency")
            await asyncio.sleep(delay_ms / 1000)
        if cfg.rate_limit_rate and em.rng.random() < cfg.rate_limit_rate:
            em.count("faults", "rate_limit")
            body = dialect.error_body(429, "Too Many Requests")
            await JSONResponse(body, 429, headers={"Retry-After": "1"})(scope, receive, send)
            return
        if cfg.error_rate and em.rng.random() < cfg.error_rate:
            em.count("faults", "error")
            await self._server_error(em.rng)(scope, receive, send)
            return
        is_lookup = scope["method"] == "GET" and path.startswith(dialect.lookup_prefixes)
        payments_only = cfg.foreign_404_payment_lookups and path.startswith(
            dialect.payment_lookup_prefixes
        )
        if is_lookup and (cfg.foreign_404_json or cfg.foreign_404_html or payments_only):
            # A proxy (or a misrouted gateway) answering for the gateway: nothing reached it.
            em.count("faults", "foreign_404")
            if cfg.foreign_404_html:
                reply: Response = HTMLResponse(html_error_page(404), 404)
            else:
                reply = JSONResponse(FOREIGN_404_JSON, 404)
            await reply(scope, receive, send)
            return
        if cfg.charge_foreign_404 and self._endpoint(scope) == dialect.charge_route:
            em.count("faults", "charge_foreign_404")
            await HTMLResponse(html_error_page(404), 404)(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        dropped = False

        async def guarded_send(message: Message) -> None:
            nonlocal dropped
            if not state.get(DROP):
                await send(message)
            elif not dropped:
                dropped = True
                _abort_connection(send)

        await super().__call__(scope, receive, admission.wrap(guarded_send))
        if dropped:
            # Let uvicorn run connection_lost first so it does not answer the closed socket.
            await asyncio.sleep(0)

    def _endpoint(self, scope: Scope) -> str:
        """Route template for the stats, e.g. ``GET /payments/{imp_uid}``."""
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return f"{scope['method']} {getattr(route, 'path', '?')}"
        return f"{scope['method']} (no route)"

    def _server_error(self, rng: random.Random) -> Response:
        """A 5xx before doing anything; half the time an HTML page, as from a proxy."""
        status = rng.choice((500, 502, 503))
        if rng.random() < 0.5:
            return HTMLResponse(html_error_page(status), status)
        body = self.dialect.error_body(status, "일시적인 서버 오류입니다. (emulated)")
        return JSONResponse(body, status)


async def _buffered(receive: Receive) -> tuple[Receive, bytes]:
    """Read the request body now; replay it to the app, then pass through (disconnects)."""
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body"):
            break
    replay = iter(messages)

    async def replayed() -> Message:
        message = next(replay, None)
        return message if message is not None else await receive()

    return replayed, b"".join(m.get("body", b"") for m in messages)


def _abort_connection(send: Send) -> None:
    """Close the client's TCP connection with a reset, sending nothing.

    uvicorn passes ``RequestResponseCycle.send`` (h11 and httptools alike), whose ``transport``
    is the connection's asyncio transport.
    """
    send = getattr(send, "__wrapped__", send)
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError("drop-after-commit needs uvicorn's transport; none found on send()")
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _admin_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    return data


def add_admin_routes(app: EmulatorApp) -> None:
    """The /__emulator__ endpoints (no token, so only on loopback binds), same in V1 and V2."""
    em = app.emulator
    config = em.config
    if not config.admin_enabled:
        return

    @app.get(ADMIN_PREFIX + "/stats")
    async def stats() -> dict[str, Any]:
        return await run_in_threadpool(em.stats)

    @app.get(ADMIN_PREFIX + "/faults")
    async def get_faults() -> dict[str, Any]:
        return config.faults()

    @app.post(ADMIN_PREFIX + "/faults")
    async def set_faults(request: Request) -> Response:
        try:
            body = await _admin_body(request)
            config.update_faults(body)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, 400)
        if "seed" in body:
            em.reseed(config.seed)
        return JSONResponse(config.faults())

    @app.get(ADMIN_PREFIX + "/rate-log")
    async def rate_log() -> dict[str, Any]:
        """API requests per wall-clock second: {epoch_second: {accepted, refused}}."""
        return em.rate_counts()

    @app.post(ADMIN_PREFIX + "/hold")
    async def hold(request: Request) -> Response:
        """Hold the next ``charges`` charge requests in the network (stats list them)."""
        try:
            count = (await _admin_body(request)).get("charges", 1)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, 400)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return JSONResponse({"error": "charges must be a whole number >= 0"}, 400)
        em.hold(count)
        return JSONResponse({"holds": count})

    @app.post(ADMIN_PREFIX + "/release")
    async def release() -> dict[str, Any]:
        """Let the held charge requests reach the gateway; hold no more."""
        return {"released": em.release()}


def add_receipt_route(app: EmulatorApp) -> None:
    """The HTML slip behind a payment's receipt URL (V1 ``receipt_url``, V2 ``receiptUrl``)."""
    db = app.emulator.store

    @app.get(RECEIPT_PREFIX + "{imp_uid}", response_class=HTMLResponse)
    async def receipt(imp_uid: str) -> Response:
        p = await run_in_threadpool(db.get_payment, imp_uid)
        if p is None:
            return HTMLResponse("<h1>영수증을 찾을 수 없습니다</h1>", 404)
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(p[k]))}</td></tr>"
            for k in ("imp_uid", "merchant_uid", "name", "amount", "cancel_amount", "status",
                      "card_name", "card_number", "apply_num", "paid_at")
        )  # fmt: skip
        return HTMLResponse(
            f"<!doctype html><meta charset=utf-8><title>매출전표 {html.escape(imp_uid)}</title>"
            f"<h1>매출전표 (emulator)</h1><table>{rows}</table>"
        )
