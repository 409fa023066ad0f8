"""``iamport-billing simulate``: prepare a run directory and an Airflow home, run the
simulation in a child process configured by the scenario, print the report.

The child gets its whole configuration through the environment before Airflow is imported:
an Airflow home with SQLite metadata (migrated once into ``<workdir>/../airflow-template.db``
and copied), the shipped DAGs, the warehouse connection (SQLite in the run directory unless
``--warehouse`` names another database) and the settings under test as the ordinary
``IAMPORT_BILLING_*`` variables the DAGs read in production.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from iamport_billing.simulation.scenario import Scenario

REPO = Path(__file__).resolve().parents[3]
DEFAULT_WORKDIR = Path(".simulate")


def run_simulation(
    scenario_path: Path,
    scenario: Scenario,
    *,
    workdir: Path,
    out: Path,
    warehouse: str | None = None,
    months: int | None = None,
    seed: int | None = None,
    api: str | None = None,
    dags_folder: Path | None = None,
) -> dict[str, Any]:
    """Run one simulation to the end; returns the report (also written to ``out``)."""
    # Airflow refuses a relative SQLite path, and the child runs elsewhere: absolute paths.
    workdir, out, scenario_path = workdir.resolve(), out.resolve(), scenario_path.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    home = workdir / "airflow"
    home.mkdir()
    shutil.copyfile(migrated_airflow_db(workdir.parent), home / "airflow.db")
    env = _environment(scenario, home, workdir, warehouse, dags_folder or REPO / "dags")
    cmd = [
        sys.executable,
        "-m",
        "iamport_billing.simulation.runner",
        str(scenario_path),
        "--workdir",
        str(workdir),
        "--out",
        str(out),
    ]
    if months:
        cmd += ["--months", str(months)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    if api:
        cmd += ["--api", api]
    done = subprocess.run(cmd, env=env, check=False)
    if done.returncode or not out.exists():
        raise SimulationFailed(
            f"the simulation stopped (exit {done.returncode}); see {workdir / 'simulation.log'}"
        )
    return json.loads(out.read_text())


class SimulationFailed(RuntimeError):
    pass


def _environment(
    scenario: Scenario, home: Path, workdir: Path, warehouse: str | None, dags: Path
) -> dict[str, str]:
    s = scenario.settings
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW", "IAMPORT_BILLING_", "PYTEST"))
    }
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "AIRFLOW_CONN_BILLING_WAREHOUSE": warehouse
            or json.dumps({"conn_type": "sqlite", "host": str(workdir / "warehouse.db")}),
            "IAMPORT_BILLING_RETRY_SCHEDULE_DAYS": ",".join(map(str, s.retry_schedule_days)),
            "IAMPORT_BILLING_MAX_TOTAL_MULTIPLE_OF_PREVIOUS": str(
                s.max_total_multiple_of_previous or "none"
            ),
            "IAMPORT_BILLING_PENDING_LEASE_SECONDS": str(s.pending_lease_seconds),
            "IAMPORT_BILLING_UNKNOWN_SETTLE_SECONDS": str(s.unknown_settle_seconds),
            # A task retry waits in wall-clock time; the next simulated day is the retry.
            "IAMPORT_BILLING_TASK_RETRIES": "0",
            "IAMPORT_BILLING_DAILY_DEADLINE": "none",
            # No one answers Airflow's approval requests here: a tripped guardrail fails the
            # plan, and the scenario's person re-runs it (settings.approve_tripped_multiple).
            "IAMPORT_BILLING_APPROVAL_TIMEOUT_MINUTES": "0",
        }
    )
    if s.max_attempts is not None:
        env["IAMPORT_BILLING_MAX_ATTEMPTS"] = str(s.max_attempts)
    return env


def migrated_airflow_db(root: Path) -> Path:
    """An empty migrated Airflow metadata database, made once per ``root`` and copied."""
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    template = root / "airflow-template.db"
    with open(root / ".template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not template.exists():
            partial = root / "airflow-template.partial"
            partial.mkdir(exist_ok=True)
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
                "AIRFLOW_HOME": str(partial),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{partial / 'airflow.db'}",
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            }
            airflow = str(Path(sys.executable).parent / "airflow")
            done = subprocess.run(
                [airflow, "db", "migrate"], env=env, capture_output=True, text=True, check=False
            )
            if done.returncode:
                raise SimulationFailed(
                    f"airflow db migrate failed for {partial}: {done.stderr[-2000:]}"
                )
            shutil.move(partial / "airflow.db", template)
            shutil.rmtree(partial)
    return template


# -- the printed report -------------------------------------------------------------------------

GATEWAYS = {"v1": "Iamport V1", "v2": "PortOne V2"}

SHOWN_FIGURES = (
    "subscriptions",
    "signed_up",
    "cancelled",
    "periods",
    "charges_sent",
    "revenue_krw",
    "first_attempt_success",
    "soft_declined_periods",
    "recovered_periods",
    "recovery_rate_count",
    "recovery_rate_krw",
    "days_to_recover_mean",
    "days_to_recover_median",
    "involuntary_churn",
    "involuntary_churn_rate",
    "past_due",
    "payment_method_required",
    "no_billing_key_attempts",
    "amount_mismatch_periods",
    "held_for_a_person",
)


def format_report(report: dict[str, Any], title: str) -> str:
    lines = [
        f"== {title}: {report['wall_seconds']} s wall, "
        f"{report['runs']['dag_runs']} DAG runs ({report['runs']['failed_count']} failed), "
        f"{len(report['runs'].get('guardrail_approvals', []))} guardrail approvals, "
        f"gateway {GATEWAYS[report.get('gateway', 'v1')]}",
        "invariants (violations, must be 0):",
    ]
    for name, count in report["invariants"].items():
        lines.append(f"  {'OK  ' if not count else 'FAIL'} {name:<46} {count}")
        lines += [f"         {ex}" for ex in report.get("violations", {}).get(name, [])[:5]]
    not_applicable = report.get("not_applicable", {})
    for name, why in not_applicable.get("invariants", {}).items():
        lines.append(f"  N/A  {name:<46} ({why})")
    for switch in not_applicable.get("incident_switches", []):
        lines.append(f"  N/A  incident {switch}: a V1-only switch, nothing happened")
    lines.append("figures:")
    figures = report["figures"]
    lines += [f"  {name:<28} {_shown(figures.get(name))}" for name in SHOWN_FIGURES]
    lines.append("  recovered by retry day:     " + _pairs(figures["recovered_by_retry_day"]))
    for reason, c in figures["by_decline_reason"].items():
        lines.append(
            f"  {reason[:48]:<48} declined {c.get('declined', 0)}, "
            f"recovered {c.get('recovered', 0)}"
        )
    return "\n".join(lines)


def format_comparison(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str]) -> str:
    width = max(len(n) for n in names) + 2
    lines = [f"{'':<30}{names[0]:>{width}}{names[1]:>{width}}"]
    apis = (a.get("gateway", "v1"), b.get("gateway", "v1"))
    lines.append(f"{'gateway':<30}{apis[0]:>{width}}{apis[1]:>{width}}")
    for name in {**a["invariants"], **b["invariants"]}:
        lines.append(
            f"{name[:29]:<30}{a['invariants'].get(name, 'n/a'):>{width}}"
            f"{b['invariants'].get(name, 'n/a'):>{width}}"
        )
    for name in SHOWN_FIGURES:
        lines.append(
            f"{name:<30}{_shown(a['figures'].get(name)):>{width}}"
            f"{_shown(b['figures'].get(name)):>{width}}"
        )
    lines.append(f"{'wall_seconds':<30}{a['wall_seconds']:>{width}}{b['wall_seconds']:>{width}}")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {n}" for k, n in counts.items()) or "-"
