"""Adaptive throttling: a charge run against an emulator process capped at CAP requests per
wall-clock second (429 beyond), through a connection configured far above it, with the shared
limiter on Redis. What it reaches is read from the emulator's own per-second log.

``python -m bench.run --adaptive CAP:CONFIGURED:N`` runs it alone and prints the figures.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import requests
from iamport_billing.charging import ChargeEngine, ChargeSettings
from iamport_billing.emulator.config import CARD_ALWAYS_PAID, EmulatorConfig
from iamport_billing.emulator.server import start_emulator_process
from iamport_billing.emulator.store import Store, seed_customers
from iamport_billing.gateways.iamport_v1 import IamportV1Gateway
from iamport_billing.hooks.iamport import IamportHook
from iamport_billing.policy import ChargeCandidate
from iamport_billing.rate_limit import KEY_PREFIX
from iamport_billing.states import PAID
from iamport_billing.warehouse.ledger import Ledger

DAY = date(2026, 11, 26)
# Seconds left out at the start (the first back-off from the configured rate) and the end.
WARM_UP_S = 5


def measure(
    work: Path,
    connection: Callable[[str, EmulatorConfig, dict[str, Any]], str],
    warehouse_conn_id: str,
    *,
    cap: float,
    configured: float,
    n: int,
    concurrency: int = 16,
) -> dict[str, Any]:
    """Charge ``n`` customers; ``connection(url, config, extras)`` returns the id of a gateway
    connection on that emulator with those extras. The reached rate is the accepted requests
    of the steady part (whole seconds after WARM_UP_S, without the last) over its length, so
    a stalled second on a loaded machine weighs one second, not a whole average."""
    config = EmulatorConfig(db_path=str(work / f"capped-{uuid.uuid4().hex[:6]}.db"), rate_cap=cap)
    seed_customers(config.db_path, ((f"cust-{i:06d}", CARD_ALWAYS_PAID) for i in range(n)))
    candidates = [
        ChargeCandidate(f"s{i:06d}", f"cust-{i:06d}", 1000, DAY, name="plan") for i in range(n)
    ]
    settings = ChargeSettings(max_concurrency=concurrency, unknown_settle_seconds=0.1)
    run = {"dag_id": "bench", "run_id": "adaptive", "task_id": "charge", "try_number": 1}
    with start_emulator_process(config) as proc:
        conn_id = connection(proc.url, config, {"requests_per_second": configured})
        hook = IamportHook(conn_id, pool_maxsize=concurrency)
        started = time.monotonic()
        with Ledger.from_conn_id(warehouse_conn_id) as ledger:
            ledger.init_schema()
            ChargeEngine(IamportV1Gateway(hook), ledger, settings, run).charge_batch(candidates)
            attempts = [
                a for found in ledger.attempts_for(c.subscription_id for c in candidates).values()
                for a in found
            ]  # fmt: skip
        wall_s = time.monotonic() - started
        hook.close()
        log = requests.get(f"{proc.url}/__emulator__/rate-log", timeout=30).json()
    store = Store(config.db_path)
    try:
        paid = [p["merchant_uid"] for p in store.all_payments() if p["status"] == PAID]
    finally:
        store.close()
    counts = [log[s] for s in sorted(log, key=int)]
    steady = counts[WARM_UP_S:-1]
    requests_total = sum(c["accepted"] + c["refused"] for c in counts)
    refused = sum(c["refused"] for c in counts)
    return {
        "cap": cap,
        "configured": configured,
        "charges": n,
        "concurrency": concurrency,
        "wall_s": round(wall_s, 1),
        "reached_per_s": round(sum(c["accepted"] for c in steady) / len(steady), 2),
        "requests": requests_total,
        "refused": refused,
        "refused_share": refused / requests_total,
        "paid_once": len(paid) == len(set(paid)) == n,
        "ledger_paid": sum(1 for a in attempts if a.status == PAID),
        "sends_per_charge": max(a.send_count or 0 for a in attempts),
        # From the lease's last renewal (just before the send) to the recorded outcome.
        "longest_charge_s": round(
            max((a.completed_at - a.requested_at).total_seconds() for a in attempts), 1
        ),
        "lease_s": settings.pending_lease_seconds,
    }


def run_alone(work: Path, spec: str, redis_url: str, concurrency: int = 16) -> dict[str, Any]:
    """The bench's --adaptive CAP:CONFIGURED:N, with an SQLite ledger and connections in the
    environment (AIRFLOW_CONN_...)."""
    import os

    cap, configured, n = (float(x) for x in spec.split(":"))
    work.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    os.environ[f"AIRFLOW_CONN_BENCH_REDIS_{tag.upper()}"] = redis_url
    warehouse = work / f"adaptive-{tag}.db"
    os.environ["AIRFLOW_CONN_BENCH_ADAPTIVE_WAREHOUSE"] = json.dumps(
        {"conn_type": "sqlite", "host": str(warehouse)}
    )

    def connection(url: str, config: EmulatorConfig, extras: dict[str, Any]) -> str:
        from iamport_billing.devserver import gateway_conn

        conn = gateway_conn(url, config)
        extra = {**conn["extra"], **extras, "rate_limit_redis_conn_id": f"bench_redis_{tag}"}
        os.environ[f"AIRFLOW_CONN_BENCH_GW_{tag.upper()}"] = json.dumps({**conn, "extra": extra})
        return f"bench_gw_{tag}"

    try:
        return measure(
            work, connection, "bench_adaptive_warehouse", cap=cap, configured=configured,
            n=int(n), concurrency=concurrency,
        )  # fmt: skip
    finally:
        import redis

        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(f"{KEY_PREFIX}bench_gw_{tag}:*"):
            client.delete(key)
        client.close()
