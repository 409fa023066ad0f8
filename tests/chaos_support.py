"""Helpers of the chaos, hostile-input and security suites: an emulator process that can be
stopped and started on the same port and database, a loopback alert receiver, seeding,
the money audit (duplicates, ledger vs emulator) and the figures written for CI.

Run as a script it executes one ``iamport_billing_daily`` run with ``dag.test()`` in its own
Airflow home: ``python tests/chaos_support.py daily 2026-11-26 10:00 '{"batch_size": 100}'``
(two of these at once are two runs of one billing date in two processes).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import sqlite3
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pendulum
import requests

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
FIGURES_FILE = ARTIFACTS / "chaos-figures.json"
TEMPLATE_DIR = REPO / ".pytest_cache" / "chaos-airflow-template"
# The charge request of each API, as the emulator's stats name it.
CHARGE_ENDPOINTS = {
    "v1": "POST /subscribe/payments/again",
    "v2": "POST /payments/{payment_id}/billing-key",
}

# The bad day of issue 7: 5% 5xx, 3% commit-then-drop, 2% 429, jittery latency, 3 s tokens.
CHAOS_FAULTS: dict[str, Any] = {
    "error_rate": 0.05,
    "drop_after_commit_rate": 0.03,
    "rate_limit_rate": 0.02,
    "latency_ms": 6.0,
    "latency_jitter_ms": 6.0,
    "token_ttl_s": 3,
}


# -- the emulator as a process ----------------------------------------------------------------


class ChaosEmulator:
    """An emulator process on a fixed port; ``stop``/``start`` keep the port and the database.

    Counters live in the process, so the stats of every lifetime are added up.
    """

    def __init__(
        self, db_path: Path, *, seed: int = 7, faults: Mapping[str, Any] | None = None,
        api: str = "v1",
    ):  # fmt: skip
        from iamport_billing.emulator.config import EmulatorConfig

        self.config = EmulatorConfig(db_path=str(db_path), seed=seed, api=api, **dict(faults or {}))
        self.process: Any = None
        self._earlier: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def db_path(self) -> str:
        return self.config.db_path

    def start(self) -> ChaosEmulator:
        from iamport_billing.emulator.server import start_emulator_process

        self.process = start_emulator_process(self.config)
        self.config.port = int(self.url.rsplit(":", 1)[1])
        return self

    def kill(self) -> None:
        """SIGKILL, like a crashed gateway: what it committed stays in its database."""
        self._earlier.append(self._live_stats())
        self.process.kill()

    def stop(self) -> None:
        if self.process is not None and self.process.process.poll() is None:
            self._earlier.append(self._live_stats())
        if self.process is not None:
            self.process.stop()

    def set_faults(self, **faults: Any) -> None:
        r = requests.post(f"{self.url}/__emulator__/faults", json=faults, timeout=10)
        r.raise_for_status()

    def _live_stats(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/__emulator__/stats", timeout=10).json()

    def stats(self) -> dict[str, dict[str, int]]:
        """Requests, tokens, faults, charges and (V2) Idempotency-Key outcomes summed over
        every lifetime of the process."""
        total: dict[str, Counter[str]] = {}
        live = [self._live_stats()] if self.process.process.poll() is None else []
        for snapshot in [*self._earlier, *live]:
            for group in ("requests", "tokens", "faults", "charges", "idempotency"):
                total.setdefault(group, Counter()).update(snapshot.get(group) or {})
        return {k: dict(v) for k, v in total.items()}

    @property
    def charge_endpoint(self) -> str:
        return CHARGE_ENDPOINTS[self.config.api]

    def conn(self) -> dict[str, Any]:
        """The gateway connection pointing at this emulator (``iamport`` or ``portone``)."""
        from conftest import emulator_conn

        return emulator_conn(self.url, self.config)


# -- alerts -----------------------------------------------------------------------------------


class AlertReceiver:
    """A webhook endpoint on loopback that keeps every alert it is sent."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        received = self.alerts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(json.loads(body or b"{}"))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def conn(self) -> dict[str, Any]:
        return {"conn_type": "http", "host": f"http://127.0.0.1:{self.server.server_port}/alerts"}

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [a for a in self.alerts if a.get("kind") == kind]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- seeding ----------------------------------------------------------------------------------

PAYING, SOFT, HARD = "4242-4242-4242-4242", "4000-0000-0000-0002", "4000-0000-0000-0069"


def seed_population(
    ledger: Any, emulator_db: str | Path, billing_date: date, n: int, *, prefix: str = "s",
    seed: int = 11,
) -> dict[str, int]:  # fmt: skip
    """``n`` subscriptions due on ``billing_date``: 90% paying cards, 4% soft declines, 3% hard
    declines, 3% without a billing key. Returns how many of each."""
    from iamport_billing.emulator.store import seed_customers
    from support import add_subscriptions

    rng = random.Random(seed)
    rows, cards, mix = [], [], Counter()
    for i in range(n):
        sub = f"{prefix}{i:05d}"
        customer = f"cust-{sub}"
        rows.append((sub, customer, rng.randrange(1, 50) * 1000))
        roll = rng.random()
        kind = (
            "paying"
            if roll < 0.90
            else "soft"
            if roll < 0.94
            else "hard"
            if roll < 0.97
            else "nokey"
        )
        mix[kind] += 1
        if kind != "nokey":
            cards.append((customer, {"paying": PAYING, "soft": SOFT, "hard": HARD}[kind]))
    add_subscriptions(ledger, rows, billing_date)
    seed_customers(emulator_db, cards)
    return dict(mix)


# -- the money audit --------------------------------------------------------------------------


@dataclass
class Audit:
    """Emulator payments against the ledger; ``duplicates`` and ``lost`` must both be 0."""

    payments: dict[str, int] = field(default_factory=dict)
    paid_amount: int = 0
    duplicates: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        return {
            "payments_at_emulator": self.payments,
            "paid_amount_krw": self.paid_amount,
            "duplicates": len(self.duplicates),
            "lost": len(self.lost),
            "unsettled_after_reconciliation": len(self.unsettled),
        }


def emulator_paid(db_path: str | Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM payments ORDER BY seq")]
    finally:
        conn.close()


def gateway_payment_id(payment: Mapping[str, Any], api: str) -> str:
    """The id the gateway reports for an emulator payment row, the one the ledger stores as
    imp_uid: V1's imp_uid, V2's paymentId (our merchant_uid)."""
    return payment["merchant_uid"] if api == "v2" else payment["imp_uid"]


def audit(ledger: Any, emulator_db: str | Path, api: str = "v1") -> Audit:
    """At most one paid payment per (subscription, billing date); every paid payment has a
    ``paid`` ledger row with the same gateway id and amount, and every ``paid`` row a
    payment."""
    from iamport_billing.policy import parse_merchant_uid

    payments = emulator_paid(emulator_db)
    result = Audit(payments=dict(Counter(p["status"] for p in payments)))
    per_period: Counter[tuple[str, str]] = Counter()
    at_emulator: dict[str, tuple[str, int]] = {}
    for p in payments:
        if p["status"] != "paid":
            continue
        parsed = parse_merchant_uid(p["merchant_uid"])
        key = (parsed[0], parsed[1].isoformat()) if parsed else (p["merchant_uid"], "")
        per_period[key] += 1
        at_emulator[p["merchant_uid"]] = (gateway_payment_id(p, api), int(p["amount"]))
        result.paid_amount += int(p["amount"])
    result.duplicates = [f"{s} {d}" for (s, d), n in per_period.items() if n > 1]
    in_ledger = {
        r[0]: (r[1], int(r[2]))
        for r in ledger.query(
            "SELECT merchant_uid, imp_uid, amount FROM billing_charge_attempts WHERE status = %s",
            ["paid"],
        )
    }
    result.lost = sorted(
        f"{uid}: emulator {at_emulator.get(uid)} ledger {in_ledger.get(uid)}"
        for uid in set(at_emulator) | set(in_ledger)
        if at_emulator.get(uid) != in_ledger.get(uid)
    )
    result.unsettled = [
        r[0]
        for r in ledger.query(
            "SELECT merchant_uid FROM billing_charge_attempts WHERE status IN (%s, %s)",
            ["pending", "unknown"],
        )
    ]
    return result


def unknowns_named_in(alerts: Iterable[Mapping[str, Any]]) -> int:
    """The unsettled count the report task's failure alert states (0 when none was sent)."""
    import re

    found = 0
    for a in alerts:
        for d in a.get("details") or []:
            m = re.search(r"(\d+) charge outcomes are still pending/unknown", d)
            if m:
                found = max(found, int(m.group(1)))
    return found


def faults_injected(stats: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    return {k: v for k, v in (stats.get("faults") or {}).items() if k != "latency"}


def record_figures(scenario: str, figures: Mapping[str, Any]) -> None:
    """Merge one scenario's figures into test-artifacts/chaos-figures.json."""
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / ".chaos-figures.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(FIGURES_FILE.read_text()) if FIGURES_FILE.exists() else {}
        data[scenario] = dict(figures)
        FIGURES_FILE.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def figures_line(scenario: str, figures: Mapping[str, Any]) -> str:
    faults = figures.get("faults_injected") or {}
    keys = figures.get("idempotency_keys") or {}
    return (
        f"[chaos] {scenario}: charges attempted {figures.get('charges_attempted')}, "
        f"faults injected {sum(faults.values())} {dict(sorted(faults.items()))}, "
        f"paid {figures.get('payments_at_emulator', {}).get('paid', 0)}, "
        f"duplicates {figures.get('duplicates')}, lost {figures.get('lost')}"
        + (f", Idempotency-Keys {dict(sorted(keys.items()))}" if keys else "")
    )


# -- Airflow homes and DAG runs ---------------------------------------------------------------


def migrated_home(home: Path) -> Path:
    """An Airflow home with an empty migrated SQLite metadata DB (migrated once, then copied)."""
    from iamport_billing.simulation.launch import migrated_airflow_db

    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated_airflow_db(TEMPLATE_DIR), home / "airflow.db")
    return home


def airflow_env(home: Path, extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            **extra,
        }
    )
    return env


def logical(day: date, hhmm: str = "10:00") -> pendulum.DateTime:
    hour, minute = (int(x) for x in hhmm.split(":"))
    return pendulum.datetime(day.year, day.month, day.day, hour, minute, tz="Asia/Seoul")


def run_dag(dag: Any, when: Any, **params: Any) -> tuple[Any, dict[str, str]]:
    """One dag.test() run; returns the run and its task states (``charge[2]`` for mapped)."""
    dr = dag.test(logical_date=when, run_conf=params or None)
    return dr, {
        ti.task_id + (f"[{ti.map_index}]" if ti.map_index >= 0 else ""): ti.state
        for ti in dr.get_task_instances()
    }


def without_dag_deadlines() -> None:
    """dag.test() cannot finish a successful run of a DAG with deadline alerts (it looks the
    alerts up by ids only the dag-processor assigns); the scheduler can. Alert channels stay on."""
    from iamport_billing import alerts

    alerts.deadline_alerts = lambda cfg, *, starts_at: []  # type: ignore[assignment]


def load_dags() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(REPO / "dags"))
    assert bag.import_errors == {}, bag.import_errors
    return bag


def _main(argv: list[str]) -> int:
    """``daily DAY HH:MM CONF_JSON``: one daily run in this process's Airflow home."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _, day, hhmm, conf = argv
    without_dag_deadlines()
    dag = load_dags().get_dag("iamport_billing_daily")
    dr, states = run_dag(dag, logical(date.fromisoformat(day), hhmm), **json.loads(conf))
    print("CHAOS-RESULT " + json.dumps({"run_id": dr.run_id, "states": states}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
