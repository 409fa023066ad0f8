"""The charge stage: ChargeAgainOperator over every batch of a plan, in a process of its own.

A separate process so that its CPU time and peak RSS are the charge task's alone (the emulator
and the harness are elsewhere). The batches run one after another, as dag.test runs mapped
tasks; concurrency is within a batch. ``python -m bench.stage SPEC.json OUT.json``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.env import BILLING_DATE, IAMPORT_CONN, WAREHOUSE_CONN


def plan_batches(warehouse: Path, tag: str, batch_size: int) -> list[dict[str, Any]]:
    """The daily DAG's plan step (plan_run) on this warehouse: the map input of the charges."""
    from iamport_billing.billing_run import plan_run
    from iamport_billing.policy import Guardrails, ValidationLimits
    from iamport_billing.warehouse.ledger import DEFAULT_DUE_QUERY, Ledger

    from bench.workload import SqliteFile

    with Ledger(SqliteFile(warehouse)) as ledger:
        plan = plan_run(
            ledger, due_query=DEFAULT_DUE_QUERY, billing_date=BILLING_DATE,
            batch_size=batch_size, limits=ValidationLimits(), guardrails=Guardrails(),
            dry_run=False, run={"dag_id": "bench", "run_id": tag, "task_id": "plan"},
        )  # fmt: skip
    return plan.batches


def ledger_summary(warehouse: Path, tag: str) -> dict[str, dict[str, int]]:
    from iamport_billing.warehouse.ledger import Ledger

    from bench.workload import SqliteFile

    with Ledger(SqliteFile(warehouse)) as ledger:
        return ledger.summary("run_id = %s", [tag])


def mean_latency_ms(warehouse: Path, tag: str) -> float | None:
    """Mean charge latency as the client saw it (the ledger's latency_ms): nominal latency plus
    the emulator's service time plus any wait for a CPU on a busy machine."""
    from iamport_billing.warehouse.ledger import ATTEMPTS, Ledger

    from bench.workload import SqliteFile

    with Ledger(SqliteFile(warehouse)) as ledger:
        (row,) = ledger.query(f"SELECT AVG(latency_ms) FROM {ATTEMPTS} WHERE run_id = %s", [tag])
    return round(float(row[0]), 1) if row[0] is not None else None


def run_stage(
    spec: dict[str, Any], env: dict[str, str], log_path: Path, profile_to: Path | None = None
) -> dict[str, Any]:
    """Run the child and return what it measured; with ``profile_to``, under py-spy."""
    spec_path = log_path.with_suffix(".spec.json")
    out_path = log_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "bench.stage", str(spec_path), str(out_path)]
    if profile_to is not None:
        py_spy = str(Path(sys.executable).parent / "py-spy")
        fmt = "speedscope" if profile_to.suffix == ".json" else "raw"
        record = [py_spy, "record", "--gil", "-r", "200", "-f", fmt, "-o", str(profile_to)]
        command = [*record, "--", *command]
    with open(log_path, "wb") as log:
        subprocess.run(
            command,
            env=env, stdout=log, stderr=subprocess.STDOUT, check=True,
        )  # fmt: skip
    return json.loads(out_path.read_text())


def _child(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from iamport_billing.operators.charge import ChargeAgainOperator

    before = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.perf_counter()
    totals: dict[str, int] = {}
    for index, batch in enumerate(spec["batches"]):
        op = ChargeAgainOperator(
            task_id="charge",
            iamport_conn_id=IAMPORT_CONN,
            warehouse_conn_id=WAREHOUSE_CONN,
            batch=batch,
            max_concurrency=spec["max_concurrency"],
        )
        ti = SimpleNamespace(
            dag_id="bench", run_id=spec["tag"], task_id="charge", map_index=index, try_number=1
        )
        summary = op.execute({"ti": ti})
        for outcome, count in summary["counts"].items():
            totals[outcome] = totals.get(outcome, 0) + count
    wall = time.perf_counter() - wall0
    after = resource.getrusage(resource.RUSAGE_SELF)
    Path(out_path).write_text(
        json.dumps(
            {
                "wall_s": wall,
                "cpu_user_s": after.ru_utime - before.ru_utime,
                "cpu_sys_s": after.ru_stime - before.ru_stime,
                "context_switches": (after.ru_nvcsw + after.ru_nivcsw)
                - (before.ru_nvcsw + before.ru_nivcsw),
                "peak_rss_mb": after.ru_maxrss / 1024,
                "rss_after_import_mb": before.ru_maxrss / 1024,
                "outcomes": totals,
                "pid": os.getpid(),
            }
        )
    )


if __name__ == "__main__":
    _child(*sys.argv[1:3])
