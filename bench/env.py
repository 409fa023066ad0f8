"""Where the benchmark works and the environment its processes share.

Airflow reads its configuration at import time, so ``airflow_env`` must be applied (to
``os.environ`` or a child's env) before anything imports airflow.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
DEFAULT_WORK = BENCH / ".work"
BILLING_DATE = date(2026, 12, 1)  # the first of the month, when everyone is due
WAREHOUSE_CONN = "bench_warehouse"
IAMPORT_CONN = "bench_iamport"


def conn_var(conn_id: str) -> str:
    return f"AIRFLOW_CONN_{conn_id.upper()}"


def airflow_env(home: Path) -> dict[str, str]:
    """A private AIRFLOW_HOME (metadata DB in it) with the repo's DAGs and plugins."""
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "IAMPORT_BILLING_IAMPORT_CONN_ID": IAMPORT_CONN,
        "IAMPORT_BILLING_WAREHOUSE_CONN_ID": WAREHOUSE_CONN,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
    }


def connection_env(emulator_url: str, emulator: Any, warehouse: Path) -> dict:
    """The two connections as AIRFLOW_CONN_* variables (no metadata DB rows needed): the
    gateway's is ``iamport`` or ``portone`` as the emulator speaks V1 or V2."""
    from iamport_billing.devserver import gateway_conn

    gateway = gateway_conn(emulator_url, emulator)
    gateway["extra"] = {**gateway["extra"], "read_timeout": 30, "connect_timeout": 5}
    return {
        conn_var(IAMPORT_CONN): json.dumps(gateway),
        conn_var(WAREHOUSE_CONN): json.dumps({"conn_type": "sqlite", "host": str(warehouse)}),
    }


def migrate_airflow_db(home: Path) -> None:
    """Migrate the benchmark's metadata DB once (a marker file remembers it)."""
    env = {**os.environ, **airflow_env(home)}
    home.mkdir(parents=True, exist_ok=True)
    marker = home / ".migrated"
    if marker.exists():
        return
    subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        check=True,
        env=env,
        capture_output=True,
    )
    marker.touch()


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    import psutil

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in load],
        "packages": _versions("apache-airflow", "requests", "urllib3", "fastapi", "uvicorn"),
        "git_commit": _git_commit(),
    }


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
