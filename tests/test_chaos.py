"""Chaos runs through the real DAGs against an emulator process with faults on (5% 5xx, 3%
commit-then-drop, 2% 429, latency jitter, 3 s tokens): nothing lost, nobody charged twice.

After every scenario: reconciliation (the reconcile DAG), then the audit: at most one paid
payment per (subscription, billing date) at the emulator, the ledger equal to the emulator's
payments amount for amount, nothing pending/unknown, and every unknown alerted. The figures go
to test-artifacts/chaos-figures.json and to the terminal (RELIABILITY.md quotes them).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pendulum
import pytest
from chaos_support import (
    CHAOS_FAULTS,
    REPO,
    AlertReceiver,
    Audit,
    ChaosEmulator,
    airflow_env,
    audit,
    faults_injected,
    figures_line,
    load_dags,
    logical,
    migrated_home,
    record_figures,
    run_dag,
    seed_population,
    unknowns_named_in,
)
from conftest import conn_env, on_both_gateways, requested_api
from iamport_billing.policy import SEOUL
from iamport_billing.states import ABANDONED, REJECTED, UNSETTLED
from iamport_billing.warehouse.ledger import Ledger

pytestmark = [pytest.mark.chaos, pytest.mark.airflow, pytest.mark.timeout(600)]

DAY = date(2027, 2, 10)


@dataclass
class Chaos:
    """One scenario's world: emulator process, ledger database, alert receiver, DAGs."""

    emulator: ChaosEmulator
    receiver: AlertReceiver
    warehouse: str
    env: dict[str, str]
    tmp: Path
    capsys: Any = None
    dags: Any = None
    notes: dict[str, Any] = field(default_factory=dict)

    def ledger(self) -> Ledger:
        return Ledger.from_conn_id("billing_warehouse")

    def dag(self, dag_id: str) -> Any:
        if self.dags is None:
            self.dags = load_dags()
        return self.dags.get_dag(dag_id)

    def daily(self, day: date, hhmm: str = "10:00", **params: Any) -> dict[str, str]:
        _, states = run_dag(self.dag("iamport_billing_daily"), logical(day, hhmm), **params)
        return states

    def audit(self) -> Audit:
        with self.ledger() as led:
            return audit(led, self.emulator.db_path, self.emulator.config.api)

    def unsettled(self) -> int:
        return len(self.audit().unsettled)

    def reconcile(self) -> dict[str, str]:
        time.sleep(float(self.env["IAMPORT_BILLING_PENDING_LEASE_SECONDS"]) + 0.5)
        _, states = run_dag(self.dag("iamport_billing_reconcile"), pendulum.now("UTC"))
        return states

    def settle(self, days: list[date]) -> None:
        """Reconcile; what Iamport never saw goes out again with the next daily run of its
        date (same merchant_uid), then reconcile once more."""
        self.notes["unsettled_before_reconciliation"] = self.unsettled()
        self.reconcile()
        if self.unsettled():
            for day in days:
                self.daily(day, "10:00")
            self.reconcile()

    def check(self, scenario: str, **extra: Any) -> dict[str, Any]:
        """The audit every scenario ends with; records and prints the figures."""
        result = self.audit()
        stats = self.emulator.stats()
        figures = {
            "charges_attempted": stats.get("requests", {}).get(self.emulator.charge_endpoint, 0),
            "faults_injected": faults_injected(stats),
            "tokens": stats.get("tokens", {}),
            "idempotency_keys": stats.get("idempotency", {}),
            "alerts": sorted({a.get("kind", "?") for a in self.receiver.alerts}),
            **self.notes,
            **result.figures(),
            **extra,
        }
        scenario = f"{scenario}[{self.warehouse}-{self.emulator.config.api}]"
        record_figures(scenario, figures)
        with self.capsys.disabled():
            print("\n" + figures_line(scenario, figures), flush=True)
        assert result.duplicates == [], result.duplicates
        assert result.lost == [], result.lost
        assert result.unsettled == [], result.unsettled
        assert self.receiver.of_kind("needs_person") == []
        return figures


@pytest.fixture
def chaos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, airflow_db,
    warehouse: str, request: pytest.FixtureRequest,
) -> Iterator[Chaos]:  # fmt: skip
    from iamport_billing.hooks.iamport import TOKEN_CACHE

    api = requested_api(request)
    emulator = ChaosEmulator(tmp_path / "emulator.db", faults=CHAOS_FAULTS, api=api).start()
    receiver = AlertReceiver()
    env = {
        conn_env("iamport_default"): json.dumps(emulator.conn()),
        conn_env("billing_warehouse"): os.environ[conn_env("billing_warehouse")],
        conn_env("alert_webhook"): json.dumps(receiver.conn),
        "IAMPORT_BILLING_ALERT_WEBHOOK_CONN_ID": "alert_webhook",
        "IAMPORT_BILLING_UNKNOWN_SETTLE_SECONDS": "0.3",
        "IAMPORT_BILLING_PENDING_LEASE_SECONDS": "3",
        "IAMPORT_BILLING_TASK_RETRIES": "2",
        "IAMPORT_BILLING_TASK_RETRY_DELAY_SECONDS": "1",
        "IAMPORT_BILLING_MAX_TOTAL_MULTIPLE_OF_PREVIOUS": "none",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("iamport_billing.alerts.deadline_alerts", lambda cfg, *, starts_at: [])
    TOKEN_CACHE.clear()
    world = Chaos(emulator, receiver, warehouse, env, tmp_path, capsys)
    with world.ledger() as led:
        led.init_schema()
    try:
        yield world
    finally:
        emulator.stop()
        receiver.close()
        TOKEN_CACHE.clear()


def assert_unknowns_alerted(chaos: Chaos, states: dict[str, str], unsettled: int) -> None:
    """Unknowns left by a run fail its report task, whose failure alert states how many."""
    if unsettled:
        assert states["report"] == "failed"
        assert unknowns_named_in(chaos.receiver.of_kind("task_failed")) == unsettled
    else:
        assert states["report"] == "success", states


@on_both_gateways()
def test_daily_run_of_2000_under_faults_then_reconciliation(chaos: Chaos) -> None:
    with chaos.ledger() as led:
        mix = seed_population(led, chaos.emulator.db_path, DAY, 2000)
    started = time.monotonic()
    states = chaos.daily(DAY, batch_size=500, max_concurrency=8)
    run_seconds = round(time.monotonic() - started, 1)
    unsettled = chaos.unsettled()
    assert_unknowns_alerted(chaos, states, unsettled)
    chaos.settle([DAY])
    figures = chaos.check(
        "1_daily_2000_under_faults", subscriptions=2000, card_mix=mix, run_seconds=run_seconds,
        unsettled_after_run=unsettled,
    )  # fmt: skip
    assert figures["payments_at_emulator"]["paid"] == mix["paying"]
    assert sum(figures["faults_injected"].values()) > 0
    if chaos.emulator.config.api == "v2":  # dropped replies were resent and replayed
        assert figures["idempotency_keys"].get("replay", 0) > 0, figures["idempotency_keys"]


def _subprocess_daily(chaos: Chaos, name: str, day: date, hhmm: str, conf: dict) -> Any:
    """A daily run with dag.test() in a process of its own, with its own metadata DB."""
    home = migrated_home(chaos.tmp / name)
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "chaos_support.py"), "daily", day.isoformat(),
         hhmm, json.dumps(conf)],
        env=airflow_env(home, chaos.env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def _result(proc: Any) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=400)
    lines = [x for x in out.splitlines() if x.startswith("CHAOS-RESULT ")]
    assert lines, out[-3000:]
    return json.loads(lines[-1].removeprefix("CHAOS-RESULT "))


@on_both_gateways()
def test_two_runs_of_one_billing_date_at_once_charge_each_subscription_once(chaos: Chaos) -> None:
    day = DAY + timedelta(days=2)
    with chaos.ledger() as led:
        mix = seed_population(led, chaos.emulator.db_path, day, 600, prefix="t")
    conf = {"batch_size": 150, "max_concurrency": 6}
    # 10:00 and 10:05 KST: two runs (distinct run ids) of the same billing date.
    procs = [_subprocess_daily(chaos, f"home{i}", day, hhmm, conf)
             for i, hhmm in enumerate(("10:00", "10:05"))]  # fmt: skip
    results = [_result(p) for p in procs]
    assert results[0]["run_id"] != results[1]["run_id"]
    with chaos.ledger() as led:
        per_run = dict(led.query(
            "SELECT run_id, COUNT(*) FROM billing_charge_attempts WHERE status <> 'rejected' "
            "GROUP BY run_id"
        ))  # fmt: skip
    unsettled = chaos.unsettled()
    if unsettled:
        assert unknowns_named_in(chaos.receiver.of_kind("task_failed")) >= 1
    chaos.settle([day])
    figures = chaos.check(
        "3_two_runs_same_date", subscriptions=600, card_mix=mix, unsettled_after_run=unsettled,
        attempts_written_per_run=per_run,
        task_states={r["run_id"]: r["states"] for r in results},
    )  # fmt: skip
    assert figures["payments_at_emulator"]["paid"] == mix["paying"]


@on_both_gateways()
def test_emulator_down_mid_run_then_back_on_the_same_port_and_db(chaos: Chaos) -> None:
    day = DAY + timedelta(days=3)
    n = 800
    with chaos.ledger() as led:
        mix = seed_population(led, chaos.emulator.db_path, day, n, prefix="o")
    outage: dict[str, Any] = {}

    def pull_the_plug() -> None:
        with chaos.ledger() as led:
            while True:
                settled = sum(
                    v["count"]
                    for s, v in led.date_summary(day).items()
                    if s not in (*UNSETTLED, REJECTED)
                )
                if settled >= n // 4:
                    break
                time.sleep(0.1)
        outage["settled_at_kill"] = settled
        chaos.emulator.kill()
        time.sleep(6)
        chaos.emulator.start()
        outage["down_seconds"] = 6

    saboteur = threading.Thread(target=pull_the_plug, daemon=True)
    saboteur.start()
    states = chaos.daily(day, batch_size=400, max_concurrency=4)
    saboteur.join(60)
    assert outage.get("down_seconds"), "the run finished before the outage"
    unsettled = chaos.unsettled()
    assert_unknowns_alerted(chaos, states, unsettled)
    chaos.settle([day])
    figures = chaos.check(
        "4_emulator_down_mid_run", subscriptions=n, card_mix=mix, unsettled_after_run=unsettled,
        outage=outage, task_states=states,
    )  # fmt: skip
    assert figures["payments_at_emulator"]["paid"] == mix["paying"]


def test_backfill_over_days_already_charged_charges_nobody_twice(chaos: Chaos) -> None:
    # V1 only (CI time): who is charged again is the ledger's decision, the same on either API.
    from iamport_billing.emulator.store import seed_customers

    days = [DAY + timedelta(days=10 + i) for i in range(3)]
    mixes = {}
    with chaos.ledger() as led:
        for i, day in enumerate(days):
            mixes[day.isoformat()] = seed_population(
                led, chaos.emulator.db_path, day, 80, prefix=f"b{i}", seed=20 + i
            )
    for day in days:
        chaos.daily(day, max_concurrency=6)
    chaos.reconcile()
    with chaos.ledger() as led:
        paid_before = chaos.audit().payments.get("paid", 0)
        soft = [r[0] for r in led.query(
            "SELECT customer_uid FROM billing_charge_attempts WHERE decline_kind = 'soft' "
            "AND status = 'failed'"
        )]  # fmt: skip
    # Some soft-declined customers fixed their card: the backfill charges them, once.
    fixed = soft[: len(soft) // 2]
    seed_customers(chaos.emulator.db_path, [(c, "4242-4242-4242-4242") for c in fixed])
    for day in days:  # the daily DAG again for the same dates (what a backfill of it does)
        chaos.daily(day, "10:00", max_concurrency=6)
    backfill = chaos.dag("iamport_billing_backfill")
    params = {
        "from_date": days[0].isoformat(), "to_date": days[-1].isoformat(),
        "include_hard_declines": True, "dry_run": False, "max_concurrency": 6,
    }  # fmt: skip
    when = logical(days[-1] + timedelta(days=1), "11:00")
    for _ in range(2):  # and the backfill DAG, twice
        _, states = run_dag(backfill, when, **params)
        assert states["backfill"] == "success", states
    chaos.settle(days)
    figures = chaos.check(
        "5_backfill_over_charged_days", days=[d.isoformat() for d in days], card_mix=mixes,
        paid_before_backfill=paid_before, cards_fixed_before_backfill=len(fixed),
    )  # fmt: skip
    assert figures["payments_at_emulator"]["paid"] == paid_before + len(fixed)


def _worker_pid(ti_id: str) -> int | None:
    """The task runner process of a task instance: Airflow titles it ``airflow worker -- <id>``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if cmdline == f"airflow worker -- {ti_id}":
            return int(proc.name)
    return None


def _last_scheduled_billing_date() -> date:
    """The billing date of the run the scheduler creates on unpause (catchup off, 10:00 KST)."""
    now = pendulum.now(SEOUL)
    return now.date() if now.hour >= 10 else now.subtract(days=1).date()


def test_charge_task_killed_mid_batch_is_retried_by_the_scheduler(
    chaos: Chaos, tmp_path: Path
) -> None:
    # V1 only: its leak checks are of V1 tokens, and a whole Airflow stack per API is too slow
    # for CI; V2's crash mid-charge is the emulator kill above (Idempotency-Key resends).
    from iamport_billing.devserver import AirflowApi, AirflowStack

    day = _last_scheduled_billing_date()
    n = 500  # one batch (the scheduled run's default batch_size)
    with chaos.ledger() as led:
        mix = seed_population(led, chaos.emulator.db_path, day, n, prefix="k")
    # Slower answers, so the kill lands inside the batch.
    chaos.emulator.set_faults(latency_ms=60, latency_jitter_ms=20)
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "iamport_billing_daily.py").symlink_to(REPO / "dags" / "iamport_billing_daily.py")
    password = "chaos-" + os.urandom(6).hex()
    stack = AirflowStack(
        home=migrated_home(tmp_path / "airflow"),
        sql_alchemy_conn=f"sqlite:///{tmp_path / 'airflow' / 'airflow.db'}",
        users={"chaos": ("admin", password)},
        extra_env={
            **chaos.env,
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "15",
            "IAMPORT_BILLING_POOL": "default_pool",
            "IAMPORT_BILLING_TASK_RETRY_DELAY_SECONDS": "2",
        },
    )
    kill: dict[str, Any] = {}
    try:
        stack.start(("api-server", "scheduler", "dag-processor"))
        stack.wait_ready(240)
        api = AirflowApi(stack.url, "chaos", password)
        deadline = time.monotonic() + 240
        run_id = None
        while run_id is None:
            runs = api.ok("GET", "/api/v2/dags/iamport_billing_daily/dagRuns")["dag_runs"]
            run_id = runs[0]["dag_run_id"] if runs else None
            assert time.monotonic() < deadline, stack.tail()
            stack.check_alive()
            time.sleep(1)
        path = f"/api/v2/dags/iamport_billing_daily/dagRuns/{run_id}/taskInstances"
        with chaos.ledger() as led:
            while "pid" not in kill:
                tis = {
                    (t["task_id"], t["map_index"]): t for t in api.ok("GET", path)["task_instances"]
                }
                charge = tis.get(("charge", 0))
                (settled,) = led.query(
                    "SELECT COUNT(*) FROM billing_charge_attempts WHERE status NOT IN "
                    "('pending', 'rejected')"
                )[0]
                if charge and charge["state"] == "running" and n // 5 <= settled < n * 3 // 5:
                    pid = _worker_pid(charge["id"])
                    if pid:
                        os.kill(pid, signal.SIGKILL)
                        kill.update(pid=pid, settled_at_kill=settled, ti_id=charge["id"])
                        (kill["pending_at_kill"],) = led.query(
                            "SELECT COUNT(*) FROM billing_charge_attempts WHERE status = 'pending'"
                        )[0]
                assert settled < n * 3 // 5 or "pid" in kill, "the batch outran the kill"
                assert time.monotonic() < deadline + 120, stack.tail()
                time.sleep(0.1)
        state = api.wait_for_run("iamport_billing_daily", run_id, 300, stack)
        tis = {(t["task_id"], t["map_index"]): t for t in api.ok("GET", path)["task_instances"]}
        charge = tis[("charge", 0)]
        kill["charge_tries"] = charge["try_number"]
        kill["run_state"] = state
        assert charge["try_number"] >= 2 and charge["state"] == "success", charge
        task_logs = "".join(
            p.read_text(errors="replace") for p in (stack.home / "logs").rglob("*") if p.is_file()
        )
    finally:
        stack.stop()
    chaos.emulator.set_faults(latency_ms=CHAOS_FAULTS["latency_ms"],
                              latency_jitter_ms=CHAOS_FAULTS["latency_jitter_ms"])  # fmt: skip
    tokens = [
        r[0] for r in sqlite3.connect(chaos.emulator.db_path).execute("SELECT token FROM tokens")
    ]
    assert tokens and not [t for t in tokens if t in task_logs]
    assert chaos.emulator.config.imp_secret not in task_logs
    assert "resolved" in task_logs  # the retry looked the dead try's rows up first
    unsettled = chaos.unsettled()
    chaos.settle([day])
    figures = chaos.check(
        "2_charge_task_sigkilled_mid_batch", subscriptions=n, card_mix=mix, kill=kill,
        unsettled_after_run=unsettled,
    )  # fmt: skip
    assert figures["payments_at_emulator"]["paid"] == mix["paying"]


@on_both_gateways()
def test_outcomes_still_unknown_after_a_run_are_alerted_then_reconciled(
    chaos: Chaos, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway answers every call with a 5xx from mid-run on: the charges may have gone
    through and cannot be looked up. The run must say so loudly, and settle them later."""
    from iamport_billing.hooks.iamport import IamportHook

    day = DAY + timedelta(days=20)
    monkeypatch.setenv("IAMPORT_BILLING_TASK_RETRIES", "0")
    with chaos.ledger() as led:
        mix = seed_population(led, chaos.emulator.db_path, day, 12, prefix="u", seed=3)
    if chaos.emulator.config.api == "v1":
        chaos.emulator.set_faults(token_ttl_s=1800, error_rate=0.0)
        IamportHook().get_token()  # the token is cached; from now on every answer is a 5xx
    chaos.emulator.set_faults(error_rate=1.0)
    states = chaos.daily(day, max_concurrency=12)
    unsettled = chaos.unsettled()
    assert unsettled == sum(n for k, n in mix.items() if k != "nokey")
    assert states["charge[0]"] == "failed"
    assert_unknowns_alerted(chaos, states, unsettled)
    chaos.emulator.set_faults(**CHAOS_FAULTS)
    chaos.settle([day])
    figures = chaos.check(
        "6_unknowns_left_by_a_run", subscriptions=12, card_mix=mix, unsettled_after_run=unsettled,
        task_states=states,
    )  # fmt: skip
    assert figures["payments_at_emulator"]["paid"] == mix["paying"]


@on_both_gateways()
def test_lookups_behind_a_foreign_proxy_never_resend_then_settle(chaos: Chaos) -> None:
    """The bad day, and every lookup answered by a proxy's HTML 404: dropped replies stay
    unknown (nothing is resent on "could not ask"); once lookups work, reconciliation settles
    them. Nothing is charged twice and nothing is taken for absent on a foreign reply."""
    day = DAY + timedelta(days=24)
    n = 400
    with chaos.ledger() as led:
        mix = seed_population(led, chaos.emulator.db_path, day, n, prefix="x", seed=5)
    chaos.emulator.set_faults(foreign_404_html=True, drop_after_commit_rate=0.08)
    states = chaos.daily(day, batch_size=200, max_concurrency=8)
    unsettled = chaos.unsettled()
    with chaos.ledger() as led:
        taken_for_absent = ABANDONED in led.date_summary(day) or led.query(
            "SELECT COUNT(*) FROM billing_charge_attempts WHERE error_code = %s",
            ["foreign_reply"],
        ) != [(0,)]
    assert unsettled > 0 and not taken_for_absent
    chaos.emulator.set_faults(foreign_404_html=False, **CHAOS_FAULTS)
    chaos.settle([day])
    figures = chaos.check(
        "7_lookups_behind_a_foreign_proxy", subscriptions=n, card_mix=mix,
        unsettled_after_run=unsettled, task_states=states,
    )  # fmt: skip
    assert figures["payments_at_emulator"]["paid"] == mix["paying"]


@on_both_gateways()
def test_refunds_with_dropped_cancel_replies_refund_each_once(chaos: Chaos) -> None:
    """Every cancel reply dropped after Iamport applied it (and the bad day's 5xx/429): each
    refund task is tried until it settles from the cancel history. 0 double refunds."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowException
    from iamport_billing.operators.cancel import CancelPaymentOperator

    day = DAY + timedelta(days=26)
    with chaos.ledger() as led:
        seed_population(led, chaos.emulator.db_path, day, 60, prefix="r", seed=9)
    chaos.daily(day, max_concurrency=8)
    chaos.settle([day])
    with chaos.ledger() as led:
        paid = sorted(led.attempts_by_merchant_uid(
            uid for uid, _ in emulator_paid_uids(chaos.emulator.db_path)
        ).values(), key=lambda a: a.merchant_uid)[:20]  # fmt: skip
    chaos.emulator.set_faults(drop_cancel_reply=True)
    tries = 0
    for i, attempt in enumerate(paid):
        # The emulator answers in time or never: a try may resend at once what never applied.
        op = CancelPaymentOperator(
            task_id="cancel",
            merchant_uid=attempt.merchant_uid,
            amount=1000,
            reason="chaos",
            resend_after_seconds=0,
        )
        for try_number in range(1, 8):
            ti = SimpleNamespace(dag_id="chaos_refund", run_id=f"r{i}", task_id="cancel",
                                 map_index=-1, try_number=try_number)  # fmt: skip
            tries += 1
            try:
                op.execute({"ti": ti})
                break
            except AirflowException:
                chaos.emulator.set_faults(drop_cancel_reply=try_number % 2 == 0)
        chaos.emulator.set_faults(drop_cancel_reply=True)
    chaos.emulator.set_faults(drop_cancel_reply=False)
    refunded = dict(emulator_paid_uids(chaos.emulator.db_path, field="cancel_amount"))
    doubles = [a.merchant_uid for a in paid if refunded.get(a.merchant_uid, 0) > 1000]
    missing = [a.merchant_uid for a in paid if refunded.get(a.merchant_uid, 0) < 1000]
    with chaos.ledger() as led:
        ledger_refunds = {led.get_attempt(a.merchant_uid).cancel_amount for a in paid}
    figures = chaos.check(
        "8_refunds_with_dropped_cancel_replies", refunds=len(paid), refund_tries=tries,
        double_refunds=len(doubles),
    )  # fmt: skip
    assert doubles == [] and figures["double_refunds"] == 0
    assert missing == [], f"not refunded after {tries} tries: {missing}"
    assert ledger_refunds == {1000}


def emulator_paid_uids(db_path: str | Path, field: str = "imp_uid") -> list[tuple[str, Any]]:
    """(merchant_uid, field) of every payment the emulator holds that took money."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return [
            (r[0], r[1])
            for r in conn.execute(
                f"SELECT merchant_uid, {field} FROM payments WHERE status IN ('paid', 'cancelled')"
            )
        ]
    finally:
        conn.close()
