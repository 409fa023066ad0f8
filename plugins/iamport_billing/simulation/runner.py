"""The simulation loop: the real DAGs, day by day, against the emulator on a moved clock.

Run by ``iamport-billing simulate`` in a child process whose environment (Airflow home, the
warehouse connection, the settings under test) is set before Airflow is imported. Each
simulated day: the world's morning events, then ``iamport_billing_precheck`` at 09:00,
``iamport_billing_daily`` at 10:00, a backfill at 12:00 when the scenario asks,
``iamport_billing_retry`` at 14:00 and ``iamport_billing_reconcile`` at 23:25 (KST), each
through ``dag.test()`` with the emulator's clock set to that moment. Nothing of the billing
system is replaced; only time and the gateway are simulated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import pluggy
import requests

from iamport_billing.devserver import gateway_conn
from iamport_billing.emulator.config import CARD_ALWAYS_PAID, SWITCH_FIELDS, EmulatorConfig
from iamport_billing.emulator.server import EmulatorProcess, start_emulator_process
from iamport_billing.emulator.store import Store, customer_row
from iamport_billing.policy import SEOUL, Guardrails
from iamport_billing.simulation.airflow_runs import FreshSecretsMasker, clear_and_run_again
from iamport_billing.simulation.audit import NOT_APPLICABLE, Violations, audit
from iamport_billing.simulation.scenario import READ_TIMEOUT_S, Scenario, load_scenario
from iamport_billing.simulation.world import Event, World, build_world
from iamport_billing.simulation.zombie import NextTryWhileTheFirstHangs
from iamport_billing.states import PAID, REJECTED, SUB_CANCELLED, SUBSCRIPTION_STATUSES, UNKNOWN
from iamport_billing.warehouse.ledger import Ledger

WAREHOUSE_CONN_ID = "billing_warehouse"
DAILY = "iamport_billing_daily"
hookimpl = pluggy.HookimplMarker("airflow")  # Airflow's listener hooks
# Programming errors: a task that fails with one of these crashed instead of deciding.
CRASHES = (AttributeError, TypeError, KeyError, IndexError, NameError, AssertionError)
RATES = ("error_rate", "drop_after_commit_rate", "rate_limit_rate", "latency_ms")
TOKENS_GIVEN = "tokens given"  # V1's getToken answered with a token (V2 has none)
# Charges the emulator handled, plus requests of any kind answered by an injected 5xx: the
# most charges whose outcome a client could not know (a refused token or auth moves nothing).
MAY_HAVE_CHARGED = "may have charged"
RAN = ("success", "failed")
# The daily run's first charge task: where a stalled charge try hangs its first request.
FIRST_CHARGE = (DAILY, "charge", 0)
# A charge summary's counts of rows a lookup found in flight (READY) and left unsettled.
IN_FLIGHT_AT_THE_GATEWAY = ("unresolved", "resolved_" + UNKNOWN)
# The DAGs that charge, and so write their paid periods back to the subscriptions table.
CHARGING = (DAILY, "iamport_billing_retry", "iamport_billing_backfill")
FAULTS_OFF = {k: v for k, v in EmulatorConfig().faults().items() if k in (*RATES, *SWITCH_FIELDS)}


@dataclass
class EmulatorUnderTest:
    """The emulator process, its database and its clock; down on outage days."""

    config: EmulatorConfig
    log_path: Path
    process: EmulatorProcess | None = None
    store: Store | None = None
    resends: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    http: requests.Session = field(default_factory=requests.Session)

    def up(self) -> None:
        if self.process is None:
            self.process = start_emulator_process(self.config, log_path=self.log_path)
            self.config.port = int(self.process.url.rsplit(":", 1)[1])

    def down(self) -> None:
        if self.process is not None:
            self.add_up_resends()
            self.process.stop()
            self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.port}"

    def control(self, **faults: Any) -> None:
        if self.process is not None:
            self.http.post(
                f"{self.url}/__emulator__/faults", json=faults, timeout=10
            ).raise_for_status()

    def received(self) -> Counter[str]:
        """Requests received by endpoint, and tokens given, in this process's lifetime."""
        if self.process is None:
            return Counter()
        stats = self.http.get(f"{self.url}/__emulator__/stats", timeout=10).json()
        received = Counter(stats.get("requests") or {})
        received[TOKENS_GIVEN] = sum((stats.get("tokens") or {}).values())
        received[MAY_HAVE_CHARGED] = sum((stats.get("charges") or {}).values()) + int(
            (stats.get("faults") or {}).get("error", 0)
        )
        return received

    def add_up_resends(self) -> None:
        """Charges the gateway refused as a merchant_uid it already had, and the faults it
        injected, over its lifetimes."""
        stats = self.http.get(f"{self.url}/__emulator__/stats", timeout=10).json()
        self.resends += int((stats.get("charges") or {}).get("duplicate", 0))
        self.faults.update(stats.get("faults") or {})

    def hold(self, charges: int) -> None:
        self.http.post(f"{self.url}/__emulator__/hold", json={"charges": charges}, timeout=10)

    def held(self) -> dict[str, str]:
        return self.http.get(f"{self.url}/__emulator__/stats", timeout=10).json()["held"]

    def release(self) -> None:
        if self.process is not None:
            self.http.post(f"{self.url}/__emulator__/release", timeout=10).raise_for_status()

    def at(self, moment: datetime) -> None:
        """Move the emulator's clock to ``moment`` (it then runs on at the machine's pace)."""
        self.control(clock_offset_s=moment.timestamp() - time.time())

    def billing_keys(self) -> Store:
        if self.store is None:
            self.store = Store(self.config.db_path)
        return self.store


@dataclass
class Simulation:
    scenario: Scenario
    world: World
    gateway: EmulatorUnderTest
    dags: Any
    progress: TextIO
    failed_runs: list[dict[str, Any]] = field(default_factory=list)
    put_backs_refused: list[str] = field(default_factory=list)
    seconds_by_dag: dict[str, list[Any]] = field(default_factory=dict)
    approvals: list[str] = field(default_factory=list)
    watched: Violations = field(default_factory=Violations)
    broken: list[str] = field(default_factory=list)
    refunds_today: list[Event] = field(default_factory=list)
    refunds_asked: dict[str, int] = field(default_factory=dict)  # merchant_uid -> KRW
    to_clear: Any = None  # yesterday's daily run, when charge tasks of it failed
    left_behind: set[tuple[str, date]] = field(default_factory=set)
    listener: AirflowListener = field(init=False)
    secrets: FreshSecretsMasker = field(init=False)
    ledger: Ledger | None = None

    def __post_init__(self) -> None:
        from airflow.sdk.listener import get_listener_manager

        self.listener = AirflowListener(self)
        get_listener_manager().add_listener(self.listener)
        self.secrets = FreshSecretsMasker()

    def run(self) -> dict[str, Any]:
        cal = self.scenario.calendar
        started = time.monotonic()
        self.seed()
        days = (cal.end - cal.start).days + 1
        for n in range(days):
            day = cal.start + timedelta(days=n)
            self.morning(day)
            self.day(day)
            self.report_progress(n + 1, days, day, started)
        # The last unknowns: once the (wall-clock) lease has passed, one more reconcile.
        time.sleep(self.scenario.settings.pending_lease_seconds)
        self.gateway.up()
        self.run_dag("iamport_billing_reconcile", _at(cal.end + timedelta(days=1), "00:25"))
        self.gateway.down()
        with self.warehouse() as ledger:
            result = audit(
                self.scenario, self.world, ledger, self.gateway.billing_keys(),
                resends=self.gateway.resends, watched=self.watched,
                refunds_asked=self.refunds_asked,
            )  # fmt: skip
        result["runs"] = {
            "dag_runs": sum(n for n, _ in self.seconds_by_dag.values()),
            "seconds_by_dag": {
                d: {"runs": n, "seconds": round(t, 1), "mean": round(t / n, 3)}
                for d, (n, t) in self.seconds_by_dag.items()
            },
            "failed": self.failed_runs[:200],
            "failed_count": len(self.failed_runs),
            "put_backs_refused": self.put_backs_refused[:200],
            "guardrail_approvals": self.approvals,
            "gateway_faults": dict(sorted(self.gateway.faults.items())),
        }
        result["wall_seconds"] = round(time.monotonic() - started, 1)
        if self.ledger is not None:
            self.ledger.close()
        return result

    def warehouse(self) -> AbstractContextManager[Ledger]:
        """The ledger on one connection for the whole simulation (each statement commits):
        a new connection per DAG run cost more than the reads it served."""
        if self.ledger is None:
            self.ledger = Ledger.from_conn_id(WAREHOUSE_CONN_ID)
        return nullcontext(self.ledger)

    def seed(self) -> None:
        members = self.world.initial
        with self.warehouse() as ledger:
            ledger.init_schema()
            if ledger.has_attempts():
                raise SystemExit("the warehouse already holds a ledger: simulate on an empty one")
            ledger.add_subscriptions([m.row() for m in members])
        now = int(time.time())
        self.gateway.billing_keys().save_customers(
            customer_row(m.customer_uid, CARD_ALWAYS_PAID, now) for m in members
        )

    def morning(self, day: date) -> None:
        """08:00: what customers, card companies and ops did since yesterday."""
        events = self.world.on(day)
        if events:
            with self.warehouse() as ledger:
                for event in events:
                    self.apply(event, ledger)
        incidents = [i for i in self.scenario.incidents if i.covers(day)]
        self.break_amounts(day, max((i.broken_amount_share for i in incidents), default=0.0))
        self.listener.arm(
            day,
            reprice_share=max((i.reprice_during_run_share for i in incidents), default=0.0),
            stall_a_charge=any(i.stalled_charge_try for i in incidents),
        )
        if any(i.outage for i in incidents):
            self.gateway.down()
            return
        self.gateway.up()
        faults = dict(FAULTS_OFF)
        for i in incidents:
            for name in RATES:
                faults[name] = max(faults[name], getattr(i, name))
            faults.update(i.switches)
        self.gateway.control(**faults)

    def reprice(self, day: date, share: float) -> None:
        """A price change for ``share`` of the live subscriptions: +10% from now on."""
        rng = random.Random(f"{self.scenario.seed}-reprice-{day}")
        changed = [m for _, m in sorted(self.world.members.items()) if rng.random() < share]
        for m in changed:
            m.amount = m.amount * 11 // 10
        with self.warehouse() as ledger:
            ledger.set_subscription_amounts([(m.subscription_id, m.amount) for m in changed])

    def break_amounts(self, day: date, share: float) -> None:
        """An upstream job zeroes ``share`` of the amounts this morning; yesterday's are mended."""
        if not (share or self.broken):
            return
        members = self.world.members
        with self.warehouse() as ledger:
            if self.broken:
                ledger.set_subscription_amounts([(s, members[s].amount) for s in self.broken])
            rng = random.Random(f"{self.scenario.seed}-{day}")
            self.broken = [s for s in sorted(members) if share and rng.random() < share]
            if self.broken:
                ledger.set_subscription_amounts([(s, 0) for s in self.broken])

    def apply(self, event: Event, ledger: Ledger) -> None:
        keys = self.gateway.billing_keys()
        now = int(time.time())
        if event.kind == "signup":
            member = self.world.members[event.subscription_id]
            ledger.add_subscriptions([member.row()])
            keys.save_customers([customer_row(member.customer_uid, CARD_ALWAYS_PAID, now)])
        elif event.kind == "cancel":
            ledger.set_subscription_status(
                [event.subscription_id], SUB_CANCELLED, only_from=SUBSCRIPTION_STATUSES
            )
        elif event.kind == "reprice":
            changed = [m for m in self.world.members.values() if m.amount == event.amount]
            for m in changed:
                m.amount = event.new_amount
            ledger.set_subscription_amounts([(m.subscription_id, m.amount) for m in changed])
        elif event.kind == "card":
            keys.save_customers([customer_row(event.customer_uid, event.card, now)])
        elif event.kind == "delete_key":
            keys.delete_customer(event.customer_uid)
        elif event.kind == "refund":
            self.refunds_today.append(event)
        elif event.kind == "put_back":
            why_not = ledger.put_back(event.subscription_id)
            if why_not:
                self.put_backs_refused.append(f"{event.subscription_id}: {why_not}")

    def day(self, day: date) -> None:
        s = self.scenario.settings
        charge = {"max_concurrency": s.max_concurrency}
        if self.to_clear is not None:
            self.clear_failed_charges(_at(day, "08:30"))
        self.run_dag("iamport_billing_precheck", _at(day, "09:00"))
        daily = {"batch_size": s.batch_size, "max_count": s.max_count,
                 "max_total_amount": s.max_total_amount, **charge}  # fmt: skip
        run = self.run_dag("iamport_billing_daily", _at(day, "10:00"), **daily)
        if s.approve_tripped_multiple and self.tripped_multiple(run):
            # 11:00: a person checked the plan (a month end, a catch-up day) and triggers the
            # run again with the multiple off for it, as the runbook says.
            self.approvals.append(day.isoformat())
            run = self.run_dag("iamport_billing_daily", _at(day, "10:00"), **daily,
                               max_total_multiple_of_previous=0)  # fmt: skip
        if s.clear_failed_charge_tasks and _failed_charge_tasks(run):
            self.to_clear = run
        self.refund(day)
        for b in (b for b in self.scenario.backfills if b.on == day):
            self.run_dag(
                "iamport_billing_backfill",
                _at(day, "12:00"),
                dry_run=False,
                from_date=b.start.isoformat(),
                to_date=b.end.isoformat(),
                **charge,
            )
        self.run_dag("iamport_billing_retry", _at(day, "14:00"), **charge)
        self.run_dag("iamport_billing_reconcile", _at(day, "23:25"))

    def refund(self, day: date) -> None:
        """11:00: ops refund what customers asked for, one refund DAG run each. A failed run is
        triggered again once with the same request_id: it settles from the cancel history."""
        asked, self.refunds_today = self.refunds_today, []
        with self.warehouse() as ledger:
            periods = ledger.attempts_for([e.subscription_id for e in asked])
        for i, event in enumerate(asked):
            paid = [
                a for (sub, _), attempts in sorted(periods.items()) if sub == event.subscription_id
                for a in attempts if a.status == PAID
            ]  # fmt: skip
            if not paid:
                continue  # nothing paid yet to refund
            row = paid[-1]
            amount = _paid_amount(row) // 2 if event.partial else None
            self.refunds_asked[row.merchant_uid] = amount or _paid_amount(row)
            conf = {"merchant_uid": row.merchant_uid, "amount": amount, "reason": "고객 요청",
                    "request_id": f"sim-{row.merchant_uid}"}  # fmt: skip
            moment = _at(day, "11:00") + timedelta(minutes=i)
            for _ in range(2):
                if self.run_dag("iamport_billing_refund", moment, **conf).state == "success":
                    break

    def tripped_multiple(self, dag_run: Any) -> bool:
        """The run's plan stopped at the multiple-of-the-previous-run guardrail."""
        with self.warehouse() as ledger:
            record = ledger.run_record({"dag_id": dag_run.dag_id, "run_id": dag_run.run_id})
        return bool(record and record.guardrail and "x the previous run" in record.guardrail)

    def run_dag(self, dag_id: str, moment: datetime, **conf: Any) -> Any:
        dag, run_conf = self.dags.get_dag(dag_id), conf or None
        return self.timed(dag_id, moment, lambda: dag.test(logical_date=moment, run_conf=run_conf))

    def clear_failed_charges(self, moment: datetime) -> None:
        """08:30: a person clears the failed charge tasks of yesterday's daily run, alone."""
        dag_run, self.to_clear = self.to_clear, None
        dag = self.dags.get_dag(DAILY)
        failed = _failed_charge_tasks(dag_run)
        self.timed(
            f"{DAILY} (failed charge tasks cleared)",
            moment,
            lambda: clear_and_run_again(dag, dag_run.run_id, failed),
            tasks_run=len(failed),
        )

    def timed(self, name: str, moment: datetime, run: Any, tasks_run: int | None = None) -> Any:
        """``tasks_run``: how many tasks ``run`` runs, when not all of the run's tasks."""
        if self.gateway.process is not None:
            self.gateway.at(moment)
        started = time.monotonic()
        before = self.gateway.received()
        dag_run = run()
        self.listener.run_over()
        self.secrets.restore()
        self.watch(dag_run, self.gateway.received() - before, moment, tasks_run)
        runs, seconds = self.seconds_by_dag.get(name, (0, 0.0))
        self.seconds_by_dag[name] = [runs + 1, seconds + time.monotonic() - started]
        if dag_run.state != "success":
            failed = sorted(
                ti.task_id for ti in dag_run.get_task_instances() if ti.state == "failed"
            )
            self.failed_runs.append(
                {"dag_id": name, "at": moment.isoformat(), "failed_tasks": failed}
            )
        return dag_run

    def watch(
        self, dag_run: Any, received: Counter[str], moment: datetime, tasks_run: int | None
    ) -> None:
        """What a run must never do, checked as it ends: its end state may not show it."""
        tis = dag_run.get_task_instances()
        failed = {_task_id(ti) for ti in tis if ti.state == "failed"}
        at = f"{dag_run.dag_id} at {moment.astimezone(SEOUL):%Y-%m-%d %H:%M}"
        run = {"dag_id": dag_run.dag_id, "run_id": dag_run.run_id}
        with self.warehouse() as ledger:
            left = ledger.unsettled_for_run(run)
            by_status = ledger.run_summary(run)
            behind = ledger.paid_not_advanced() if dag_run.dag_id in CHARGING else []
        for sub, day, _ in behind:
            if (sub, day) not in self.left_behind:
                self.left_behind.add((sub, day))
                self.watched.add(
                    "paid_periods_move_their_subscription_on",
                    f"{at}: {sub} paid for {day} still bills on {day}",
                )
        rejected = by_status.get(REJECTED, {}).get("count", 0)
        sent = sum(v.get("count", 0) for k, v in by_status.items() if k != REJECTED)
        seen, guard = rejected + sent, Guardrails()
        if (
            sent
            and rejected > guard.max_rejected_share * seen
            and seen >= guard.min_rows_for_rejected_share
        ):
            # Most due rows broken means the data is, not the customers: charge nobody.
            example = f"{at}: {sent} charged, {rejected} of {seen} rejected"
            self.watched.add("nothing_charged_from_mostly_broken_rows", example, sent)
        for a in left:
            if a.task_id not in failed:
                self.watched.add(
                    "every_unsettled_charge_fails_its_task",
                    f"{at}: {a.merchant_uid} {a.status}, task {a.task_id} succeeded",
                )
        unknown = sum(a.status == UNKNOWN for a in left)
        charges = received[MAY_HAVE_CHARGED]
        if unknown > charges:
            self.watched.add("no_unknown_without_a_charge_request",
                            f"{at}: {unknown} unknown, {charges} charges handled or lost to a 5xx",
                            unknown - charges)  # fmt: skip
        if "one_token_per_task" in NOT_APPLICABLE[self.scenario.api]:
            return
        ran = sum(ti.state in RAN for ti in tis) if tasks_run is None else tasks_run
        tokens = received[TOKENS_GIVEN]
        if tokens > ran:
            self.watched.add(
                "one_token_per_task", f"{at}: {tokens} tokens fetched by {ran} tasks", tokens - ran
            )

    def check_next_try(self, next_try: NextTryWhileTheFirstHangs) -> None:
        """A stalled charge try the scenario asked for happened, or the simulation stops: a
        zombie that never ran would pass every invariant and prove nothing."""
        uid, error = next_try.held_merchant_uid, next_try.error
        if isinstance(error, CRASHES):
            self.watched.add("no_task_crashes", f"the next try of the daily's charge[0]: {error!r}")
        if uid is None:
            raise RuntimeError(
                "stalled_charge_try: the daily's first charge task sent no charge to hold"
            )
        with self.warehouse() as ledger:
            row = ledger.attempts_by_merchant_uid([uid]).get(uid)
        # V1: the gateway had not seen it, so the next try took the row over. V2: the gateway
        # showed it READY, so the next try left it unknown, to the first try's answer.
        took_over = row is not None and row.try_number == 2
        counts = next_try.summary.get("counts", {})
        # Left unknown, the next try fails for it (the task names what is still unknown).
        left_in_flight = any(counts.get(k) for k in IN_FLIGHT_AT_THE_GATEWAY) or (
            error is not None and "still unknown" in str(error) and uid in str(error)
        )
        if not (took_over or left_in_flight):
            raise RuntimeError(
                f"stalled_charge_try: the next try neither took {uid} over nor found it in "
                f"flight while it hung (row: {row}; the next try returned {next_try.summary}, "
                f"raised {error!r})"
            )

    def report_progress(self, done: int, days: int, day: date, started: float) -> None:
        if done % 7 and done != days:
            return
        elapsed = time.monotonic() - started
        eta = elapsed / done * (days - done)
        print(
            f"day {done}/{days} ({day}): {elapsed:.0f} s elapsed, about {eta:.0f} s to go, "
            f"{len(self.failed_runs)} failed DAG runs so far",
            file=self.progress,
            flush=True,
        )


class AirflowListener:
    """What the simulation hears from Airflow's task runner (a listener, like any plugin's).

    On the plan task's success, an upstream job armed by the scenario for the day lands
    between the daily run's plan and its charge tasks. As the daily's first charge task starts,
    a stalled charge armed for the day makes its next try run while its request hangs. On a
    task's failure, the error must be a decision (an Airflow or billing error that says why),
    never a programming error.
    """

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.day: date | None = None
        self.share = 0.0
        self.stall_a_charge = False
        self.next_try: NextTryWhileTheFirstHangs | None = None

    def arm(self, day: date, *, reprice_share: float, stall_a_charge: bool) -> None:
        self.day, self.share, self.stall_a_charge = day, reprice_share, stall_a_charge

    def run_over(self) -> None:
        if self.next_try is not None:
            self.next_try.finish()
            self.sim.check_next_try(self.next_try)
            self.next_try = None

    @hookimpl
    def on_task_instance_running(self, previous_state: Any, task_instance: Any) -> None:
        ti = task_instance
        if self.stall_a_charge and _is_first_charge(ti) and ti.try_number == 1:
            self.stall_a_charge = False
            self.next_try = NextTryWhileTheFirstHangs(
                ti, self.sim.gateway, self.sim.scenario.settings.pending_lease_seconds
            )

    def _first_try_ended(self, task_instance: Any) -> None:
        if self.next_try is not None and _is_first_charge(task_instance):
            self.next_try.first_try_ended()

    @hookimpl
    def on_task_instance_success(self, previous_state: Any, task_instance: Any) -> None:
        self._first_try_ended(task_instance)
        if self.share and (task_instance.dag_id, task_instance.task_id) == (DAILY, "plan"):
            assert self.day is not None
            self.sim.reprice(self.day, self.share)
            self.share = 0.0

    @hookimpl
    def on_task_instance_failed(
        self, previous_state: Any, task_instance: Any, error: BaseException | str | None
    ) -> None:
        self._first_try_ended(task_instance)
        if isinstance(error, CRASHES):
            self.sim.watched.add(
                "no_task_crashes",
                f"{task_instance.dag_id}.{task_instance.task_id}: {type(error).__name__}: {error}",
            )


def _is_first_charge(ti: Any) -> bool:
    return (ti.dag_id, ti.task_id, ti.map_index) == FIRST_CHARGE


def _failed_charge_tasks(dag_run: Any) -> list[tuple[str, int]]:
    return [
        (ti.task_id, ti.map_index)
        for ti in dag_run.get_task_instances()
        if ti.task_id == "charge" and ti.state == "failed"
    ]


def _paid_amount(row: Any) -> int:
    return int(row.paid_amount if row.paid_amount is not None else row.amount)


def _task_id(ti: Any) -> str:
    """As the ledger writes it (``run_info``): mapped tasks with their index."""
    return (
        ti.task_id if ti.map_index is None or ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
    )


def _at(day: date, hhmm: str) -> datetime:
    hour, minute = (int(x) for x in hhmm.split(":"))
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=SEOUL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iamport_billing.simulation.runner")
    parser.add_argument("scenario")
    parser.add_argument("--months", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--api")
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    scenario = load_scenario(args.scenario)
    if args.months:
        scenario = scenario.with_months(args.months)
    if args.seed is not None:
        scenario = scenario.with_seed(args.seed)
    if args.api:
        scenario = scenario.with_api(args.api)

    # Airflow's and the tasks' logs go to a file; the terminal gets the progress lines.
    progress = os.fdopen(os.dup(1), "w")
    log = open(args.workdir / "simulation.log", "a")  # noqa: SIM115 - lives as long as the run
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)

    gateway = EmulatorUnderTest(
        EmulatorConfig(
            db_path=str(args.workdir / "emulator.db"), seed=scenario.seed, api=scenario.api
        ),
        args.workdir / "emulator.log",
    )
    gateway.up()
    conn = gateway_conn(gateway.url, gateway.config)
    conn["extra"] = {**conn["extra"], "read_timeout": READ_TIMEOUT_S, "connect_timeout": 2}
    os.environ["AIRFLOW_CONN_IAMPORT_DEFAULT"] = json.dumps(conn)
    from iamport_billing.simulation.airflow_runs import load_dags

    try:
        sim = Simulation(scenario, build_world(scenario), gateway, load_dags(), progress)
        result = sim.run()
    finally:
        gateway.down()
    result["scenario"] = scenario.as_dict()
    args.out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
