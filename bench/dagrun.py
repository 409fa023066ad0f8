"""The whole daily DAG through Airflow (``dag.test()``), in a process of its own.

``python -m bench.dagrun SPEC.json OUT.json``. dag.test runs the mapped charge tasks one after
another in this process, so the process's CPU time covers every task of the run.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.env import BILLING_DATE

DAG_ID = "iamport_billing_daily"


def run_dag(spec: dict[str, Any], env: dict[str, str], log_path: Path) -> dict[str, Any]:
    """Run the child and return what it measured."""
    spec_path = log_path.with_suffix(".spec.json")
    out_path = log_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps(spec))
    with open(log_path, "wb") as log:
        subprocess.run(
            [sys.executable, "-m", "bench.dagrun", str(spec_path), str(out_path)],
            env=env, stdout=log, stderr=subprocess.STDOUT, check=True,
        )  # fmt: skip
    return json.loads(out_path.read_text())


def _child(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import pendulum
    from airflow.dag_processing.dagbag import DagBag

    started = time.perf_counter()
    bag = DagBag()
    if bag.import_errors:
        raise SystemExit(f"DAG import errors: {bag.import_errors}")
    dag = bag.get_dag(DAG_ID)
    parse_s = time.perf_counter() - started
    logical = pendulum.datetime(
        BILLING_DATE.year, BILLING_DATE.month, BILLING_DATE.day, 10, tz="Asia/Seoul"
    )
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.perf_counter()
    dag_run = dag.test(
        logical_date=logical,
        run_conf={"batch_size": spec["batch_size"], "max_concurrency": spec["max_concurrency"]},
    )
    wall = time.perf_counter() - wall0
    after = resource.getrusage(resource.RUSAGE_SELF)
    states: dict[str, int] = {}
    mapped = 0
    for ti in dag_run.get_task_instances():
        key = f"{ti.task_id}:{ti.state}"
        states[key] = states.get(key, 0) + 1
        mapped += ti.task_id == "charge"
    Path(out_path).write_text(
        json.dumps(
            {
                "wall_s": wall,
                "dag_parse_s": parse_s,
                "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
                "peak_rss_mb": after.ru_maxrss / 1024,
                "state": str(dag_run.state),
                "task_states": states,
                "charge_tasks": mapped,
                "run_id": dag_run.run_id,
            }
        )
    )


if __name__ == "__main__":
    _child(*sys.argv[1:3])
