"""The shared gateway rate limit (rate_limit.py) over real HTTP against the emulator, with the
state on the real Redis (127.0.0.1:6379) under a connection id unique to each test."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable
from datetime import date
from functools import partial
from pathlib import Path

import pendulum
import pytest
import requests
from conftest import conn_env, emulator_conn
from iamport_billing.emulator.config import EmulatorConfig
from iamport_billing.errors import IamportTransportError
from iamport_billing.hooks.iamport import TOKEN_CACHE, IamportHook
from iamport_billing.rate_limit import KEY_PREFIX, LocalLimiter, RateLimitSettings

REDIS_URL = "redis://127.0.0.1:6379/0"
# The limit is the hooks' and Redis's, not the ledger's: the ledger fixture on SQLite only (the
# adaptive run also has a PostgreSQL variant).
WAREHOUSES = ["sqlite"]
DAY = date(2026, 11, 26)


def _redis():
    import redis

    return redis.Redis.from_url(REDIS_URL)


@pytest.fixture
def limited_conn(monkeypatch: pytest.MonkeyPatch):
    """Returns ``configure(url, config, **extras) -> conn_id``: a gateway connection with a
    unique id (so its Redis keys are this test's), the Redis connection beside it; the keys
    are deleted afterwards."""
    redis_id = f"rl_redis_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(conn_env(redis_id), REDIS_URL)
    made: list[str] = []

    def configure(url: str, config: EmulatorConfig, **extras) -> str:
        conn_id = f"rl_gw_{uuid.uuid4().hex[:8]}"
        conn = emulator_conn(url, config)
        extras = {"rate_limit_redis_conn_id": redis_id, **extras}
        conn["extra"] = {**conn["extra"], **{k: v for k, v in extras.items() if v is not None}}
        monkeypatch.setenv(conn_env(conn_id), json.dumps(conn))
        made.append(conn_id)
        return conn_id

    yield configure
    client = _redis()
    for conn_id in made:
        for key in client.scan_iter(f"{KEY_PREFIX}{conn_id}:*"):
            client.delete(key)
    client.close()


def rate_log(url: str) -> dict[int, dict[str, int]]:
    log = requests.get(f"{url}/__emulator__/rate-log", timeout=10).json()
    return {int(second): counts for second, counts in log.items()}


def _lookups(conn_id: str, threads: int, seconds: float, ready) -> None:
    """One OS process: ``threads`` threads, each with its own hook, looking payments up for
    ``seconds`` once every process is ready (a 404 envelope is an answer: one request each)."""
    from iamport_billing.errors import IamportNotFound

    hooks = [IamportHook(conn_id, pool_maxsize=1) for _ in range(threads)]
    for hook in hooks:
        assert hook.settings.rate_limit is not None  # Airflow imported, connection read
    ready.wait(180)
    until = time.monotonic() + seconds

    def work(hook: IamportHook) -> None:
        while time.monotonic() < until:
            try:
                hook.find_payment("no-such-merchant-uid")
            except IamportNotFound:
                pass
        hook.close()

    in_threads([partial(work, hook) for hook in hooks])


def in_threads(targets: list[Callable[[], None]]) -> None:
    """Run each target in a thread of its own; return when all are done."""
    workers = [threading.Thread(target=t) for t in targets]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def run_processes(conn_id: str, seconds: float, processes: int = 4, threads: int = 8) -> None:
    """Start the processes; they begin together once all have imported Airflow."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(processes + 1)
    procs = [
        ctx.Process(target=_lookups, args=(conn_id, threads, seconds, ready))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    ready.wait(180)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


def busy_seconds(log: dict[int, dict[str, int]]) -> list[int]:
    """Accepted counts of the full seconds of a run (its first and last are partial)."""
    seconds = sorted(log)
    return [log[s]["accepted"] for s in seconds[1:-1]]


@pytest.mark.timeout(300)
def test_one_limit_holds_across_processes_and_threads(emulator, emulator_config, limited_conn):
    conn_id = limited_conn(emulator.url, emulator_config, requests_per_second=60, adaptive=False)
    run_processes(conn_id, seconds=8)
    counts = busy_seconds(rate_log(emulator.url))
    assert max(counts) <= 63, counts
    assert sum(counts) / len(counts) >= 50, counts  # the limit binds: 32 threads want more


@pytest.mark.timeout(300)
def test_without_the_limit_the_same_load_goes_far_over_it(emulator, emulator_config, limited_conn):
    conn_id = limited_conn(emulator.url, emulator_config)
    run_processes(conn_id, seconds=3)
    assert max(busy_seconds(rate_log(emulator.url))) > 120


@pytest.mark.timeout(300)
def test_max_in_flight_holds_across_processes(emulator, emulator_config, limited_conn):
    emulator_config.latency_ms = 30
    conn_id = limited_conn(emulator.url, emulator_config, max_in_flight=5)
    run_processes(conn_id, seconds=3, processes=4, threads=4)
    stats = requests.get(f"{emulator.url}/__emulator__/stats", timeout=10).json()
    assert stats["in_flight_peak"] <= 5
    assert sum(busy_seconds(rate_log(emulator.url))) > 0


@pytest.mark.timeout(300)
def test_without_max_in_flight_the_server_sees_more(emulator, emulator_config, limited_conn):
    emulator_config.latency_ms = 30
    conn_id = limited_conn(emulator.url, emulator_config)
    run_processes(conn_id, seconds=2, processes=4, threads=4)
    stats = requests.get(f"{emulator.url}/__emulator__/stats", timeout=10).json()
    assert stats["in_flight_peak"] > 5


def test_an_unreachable_redis_refuses_before_sending(emulator, emulator_config, monkeypatch):
    monkeypatch.setenv(conn_env("rl_dead_redis"), "redis://127.0.0.1:1/0")
    conn = emulator_conn(emulator.url, emulator_config)
    conn["extra"] = {
        **conn["extra"], "requests_per_second": 10, "rate_limit_redis_conn_id": "rl_dead_redis"
    }  # fmt: skip
    conn_id = f"rl_gw_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(conn_env(conn_id), json.dumps(conn))
    hook = IamportHook(conn_id)
    with pytest.raises(IamportTransportError, match="Redis .* cannot be reached"):
        hook.find_payment("anything")
    assert rate_log(emulator.url) == {}


def test_an_unreachable_redis_sends_no_charge(emulator, emulator_config, monkeypatch):
    from iamport_billing.gateways.base import NOT_SENT, ChargeRequest
    from iamport_billing.gateways.iamport_v1 import IamportV1Gateway

    monkeypatch.setenv(conn_env("rl_dead_redis"), "redis://127.0.0.1:1/0")
    conn = emulator_conn(emulator.url, emulator_config)
    conn["extra"] = {
        **conn["extra"],
        "max_in_flight": 2,
        "rate_limit_redis_conn_id": "rl_dead_redis",
    }
    conn_id = f"rl_gw_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(conn_env(conn_id), json.dumps(conn))
    request = ChargeRequest(merchant_uid="m-1", customer_uid="cust-1", amount=1000, name="plan")
    result = IamportV1Gateway(IamportHook(conn_id)).charge(request)
    assert result.kind == NOT_SENT
    assert rate_log(emulator.url) == {}


def test_the_local_limiter_spaces_starts_within_one_process():
    limiter = LocalLimiter(RateLimitSettings(requests_per_second=40), lease_s=10, max_wait_s=30)
    starts: list[float] = []

    def work() -> None:
        for _ in range(20):
            limiter.release(limiter.acquire(), 0)
            starts.append(time.monotonic())

    in_threads([work] * 6)
    starts.sort()
    assert max(sum(1 for t in starts if s <= t < s + 1) for s in starts) <= 41


def test_the_local_limiter_backs_off_on_429_and_recovers():
    limiter = LocalLimiter(RateLimitSettings(requests_per_second=100), lease_s=10, max_wait_s=30)
    for _ in range(30):
        limiter.release(limiter.acquire(), 0)
    limiter.release(limiter.acquire(), 1)
    cut = limiter._rate
    assert cut < 100
    time.sleep(1.5)
    limiter.release(limiter.acquire(), 0)
    assert limiter._rate > cut


# -- adaptive: the emulator capped at 25/s, the connection configured at 200/s --------------

CAP = 25
CHARGES = 800


def adaptive_run(tmp_path: Path, limited_conn) -> dict:
    """bench/adaptive.py's run: CHARGES against an emulator process capped at CAP/s, the
    connection configured at 200/s, the ledger on ``billing_warehouse``."""
    from bench.adaptive import measure

    def connection(url: str, config: EmulatorConfig, extras: dict) -> str:
        return limited_conn(url, config, **extras)

    return measure(tmp_path, connection, "billing_warehouse", cap=CAP, configured=200, n=CHARGES)


def assert_adaptive(figures: dict[str, float]) -> None:
    print(f"adaptive: {figures}")
    assert figures["reached_per_s"] >= 0.9 * CAP, figures
    assert figures["refused_share"] <= 0.01, figures
    assert figures["paid_once"], figures
    assert figures["ledger_paid"] == CHARGES, figures  # none unknown, declined or pending
    assert figures["longest_charge_s"] < figures["lease_s"] / 2, figures  # no wait past it


@pytest.mark.timeout(600)
def test_adaptive_rate_reaches_the_gateway_cap_with_few_refusals(
    tmp_path, limited_conn, sqlite_warehouse
):
    assert_adaptive(adaptive_run(tmp_path, limited_conn))


@pytest.mark.postgres
@pytest.mark.timeout(600)
def test_adaptive_rate_on_postgres(tmp_path, limited_conn, postgres_warehouse):
    assert_adaptive(adaptive_run(tmp_path, limited_conn))


# -- every DAG is covered by construction: the backfill DAG through Airflow --------------------


@pytest.mark.airflow
@pytest.mark.timeout(300)
def test_the_backfill_dag_goes_through_the_shared_limit(
    airflow_db, sqlite_warehouse, emulator, emulator_config, limited_conn, monkeypatch
):
    from airflow.dag_processing.dagbag import DagBag
    from iamport_billing.charging import ChargeEngine
    from iamport_billing.gateways.iamport_v1 import IamportV1Gateway
    from iamport_billing.policy import ChargeCandidate
    from iamport_billing.warehouse.ledger import Ledger
    from ops_support import RUN, SETTINGS, subscribe
    from support import PAYING_CARD, SOFT_DECLINE_CARD, emulator_payments, register_cards

    monkeypatch.setenv("IAMPORT_BILLING_UNKNOWN_SETTLE_SECONDS", "0.1")
    with Ledger.from_conn_id("billing_warehouse") as led:
        led.init_schema()
        subscribe(led, emulator, "soft1", SOFT_DECLINE_CARD, DAY)
        hook = IamportHook()
        ChargeEngine(IamportV1Gateway(hook), led, SETTINGS, RUN).charge_batch(
            [ChargeCandidate("soft1", "cust-soft1", 9900, DAY, name="plan")]
        )
        hook.close()
    register_cards(emulator, [("cust-soft1", PAYING_CARD)])
    conn_id = limited_conn(emulator.url, emulator_config, requests_per_second=1, adaptive=False)
    TOKEN_CACHE.clear()
    monkeypatch.setenv("IAMPORT_BILLING_IAMPORT_CONN_ID", conn_id)
    before = rate_log(emulator.url)
    dag = DagBag().get_dag("iamport_billing_backfill")
    when = pendulum.datetime(2026, 11, 28, 15, tz="Asia/Seoul")
    conf = {"from_date": "2026-11-26", "to_date": "2026-11-26", "dry_run": False}
    dr = dag.test(logical_date=when, run_conf=conf)
    assert {ti.task_id: ti.state for ti in dr.get_task_instances()}["backfill"] == "success"
    paid = [p["merchant_uid"] for p in emulator_payments(emulator.config.db_path)]
    assert paid.count("soft1-20261126-02") == 1
    # The run's own requests per second (a second may hold the setup's last ones too).
    log = {
        s: c["accepted"] - before.get(s, {}).get("accepted", 0)
        for s, c in rate_log(emulator.url).items()
    }
    log = {s: n for s, n in log.items() if n}
    assert sum(log.values()) >= 2, log  # a lookup and the charge (a token unless cached)
    assert max(log.values()) == 1, log
    assert _redis().hget(f"{KEY_PREFIX}{conn_id}:state", "limit") is not None


def test_both_connection_forms_show_the_rate_limit_extras():
    from iamport_billing.provider_info import get_provider_info

    for conn_type in get_provider_info()["connection-types"]:
        fields = conn_type["conn-fields"]
        wanted = {"requests_per_second", "max_in_flight", "rate_limit_redis_conn_id", "adaptive"}
        assert wanted <= fields.keys(), conn_type["connection-type"]


# -- PortOne V2 goes through the same limit ------------------------------------------------------


@pytest.mark.parametrize("gateway_api", ["v2"], indirect=True)
def test_portone_charges_and_their_lookups_keep_to_the_shared_limit(
    gateway_api, emulator, emulator_config, limited_conn, ledger
):
    from iamport_billing.charging import ChargeEngine, ChargeSettings
    from iamport_billing.gateways import gateway_for
    from iamport_billing.policy import ChargeCandidate
    from support import PAYING_CARD, paid_at_gateway, register_cards

    limit, n = 8, 40
    conn_id = limited_conn(emulator.url, emulator_config, requests_per_second=limit)
    register_cards(emulator, [(f"cust-v{i}", PAYING_CARD) for i in range(n)])
    candidates = [ChargeCandidate(f"v{i}", f"cust-v{i}", 1000, DAY, name="plan") for i in range(n)]
    run = {"dag_id": "t", "run_id": "v2-limit", "task_id": "charge", "try_number": 1}
    gateway = gateway_for(conn_id, pool_maxsize=16)
    try:
        ChargeEngine(gateway, ledger, ChargeSettings(max_concurrency=16), run).charge_batch(
            candidates
        )
    finally:
        gateway.close()
    per_second = [c["accepted"] + c["refused"] for c in rate_log(emulator.url).values()]
    assert sum(per_second) >= 2 * n  # each V2 charge is read back: the limit binds
    assert max(per_second) <= limit, per_second
    assert len(paid_at_gateway(emulator)) == n
