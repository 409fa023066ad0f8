"""Review of issue 14's shared rate limit: the bounds it promises (every wait bounded, fail
closed on a Redis that does not answer, the configured rate held) under adversarial conditions,
against the emulator over real HTTP and the real Redis."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import pytest
import requests
from conftest import conn_env, emulator_conn
from iamport_billing.rate_limit import (
    KEY_PREFIX,
    OK,
    LocalLimiter,
    NotAdmitted,
    RateLimitSettings,
    RedisLimiter,
)

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def hung_redis():
    """A Redis address that accepts connections and never answers (a paused or wedged
    server, a half-open link): ``host:port``."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server.getsockname()
    server.close()


@pytest.mark.timeout(180)
def test_a_redis_that_never_answers_refuses_the_charge_within_a_bound(
    emulator, emulator_config, hung_redis, monkeypatch
):
    from iamport_billing.gateways.base import NOT_SENT, ChargeRequest
    from iamport_billing.gateways.iamport_v1 import IamportV1Gateway
    from iamport_billing.hooks.iamport import IamportHook

    host, port = hung_redis
    redis_id = f"rl_hung_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(conn_env(redis_id), f"redis://{host}:{port}/0")
    conn = emulator_conn(emulator.url, emulator_config)
    conn["extra"] = {
        **conn["extra"], "requests_per_second": 10, "rate_limit_redis_conn_id": redis_id
    }  # fmt: skip
    conn_id = f"rl_gw_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(conn_env(conn_id), json.dumps(conn))
    request = ChargeRequest(merchant_uid="m-hung-1", customer_uid="cust-1", amount=1000, name="p")
    results = []
    charge = threading.Thread(
        target=lambda: results.append(IamportV1Gateway(IamportHook(conn_id)).charge(request)),
        daemon=True,
    )
    charge.start()
    charge.join(90)  # far above the 2-s socket timeouts the limiter promises, and its retries
    assert not charge.is_alive(), "the charge still waits on a Redis that never answers"
    assert [r.kind for r in results] == [NOT_SENT]
    log = requests.get(f"{emulator.url}/__emulator__/rate-log", timeout=10).json()
    assert log == {}


def test_a_request_never_waits_longer_than_the_limiters_bound_in_all():
    """An in-flight wait followed by a far reservation: together past max_wait_s, so the
    request must be refused, not admitted late."""
    max_wait = 5.0
    settings = RateLimitSettings(requests_per_second=0.25, max_in_flight=2, adaptive=False)
    limiter = LocalLimiter(settings, lease_s=60, max_wait_s=max_wait)
    held = limiter.acquire()  # slot 1 of 2, held for the whole test; next start in 4 s
    ahead = threading.Thread(target=lambda: limiter.release(limiter.acquire(), OK))
    ahead.start()  # slot 2: waits its 4-s turn holding the slot, then gives it back
    time.sleep(0.5)
    outcome: list[object] = []
    started = time.monotonic()
    try:
        limiter.release(limiter.acquire(), OK)  # waits ~3.5 s for slot 2, then a 4-s turn
        outcome.append(time.monotonic() - started)
    except NotAdmitted:
        outcome.append("refused")
    ahead.join()
    limiter.release(held, OK)
    assert outcome == ["refused"] or outcome[0] <= max_wait + 1.0, outcome


@pytest.fixture
def redis_limiter():
    """``make(settings) -> RedisLimiter`` on the real Redis under a connection id of this
    test's own; its keys are deleted afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    conn_id = f"rl_review_{uuid.uuid4().hex[:8]}"

    def make(settings: RateLimitSettings) -> RedisLimiter:
        return RedisLimiter(conn_id, settings, lease_s=30, max_wait_s=30, client=client)

    yield make
    for key in client.scan_iter(f"{KEY_PREFIX}{conn_id}:*"):
        client.delete(key)
    client.close()


def test_the_shared_limit_holds_a_rate_given_with_many_decimals(redis_limiter):
    """0.4999999/s: one start every ~2 s, so three starts span at least ~4 s."""
    limiter = redis_limiter(RateLimitSettings(requests_per_second=0.4999999, redis_conn_id="r"))
    starts = []
    for _ in range(3):
        limiter.release(limiter.acquire(), OK)
        starts.append(time.monotonic())
    assert starts[-1] - starts[0] >= 3.5, [round(s - starts[0], 2) for s in starts]
