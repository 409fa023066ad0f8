"""``make demo``: the daily billing run end to end on embedded defaults.

An Airflow home with SQLite metadata in ``.demo/airflow``, a SQLite warehouse seeded with
about 2,000 subscriptions, the emulator as a local process, one run of
``iamport_billing_daily`` through ``airflow dags test``, then a summary read from the ledger.
Run again, it charges nothing new and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pendulum

from iamport_billing.devserver import emulator_api, gateway_conn
from iamport_billing.emulator import EmulatorConfig, start_emulator_process
from iamport_billing.policy import SEOUL
from iamport_billing.sample_data import seed_sample
from iamport_billing.warehouse.ledger import Ledger

DAG_ID = "iamport_billing_daily"
SUBSCRIPTIONS = 2000


def _paths(root: Path) -> dict[str, Path]:
    """Everything the demo makes lives in ``<root>/.demo`` (root: IAMPORT_DEMO_ROOT or cwd)."""
    demo = root / ".demo"
    return {
        "demo": demo,
        "airflow": demo / "airflow",
        "warehouse": demo / "warehouse.db",
        "emulator": demo / "emulator.db",
        "state": demo / "state.json",
        "log": demo / "dag-test.log",
    }


def _airflow_env(
    paths: dict[str, Path], repo: Path, emulator_url: str, cfg: EmulatorConfig
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(paths["airflow"]),
            "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(repo / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{paths['airflow']}/airflow.db",
            "AIRFLOW_CONN_BILLING_WAREHOUSE": json.dumps(
                {"conn_type": "sqlite", "host": str(paths["warehouse"])}
            ),
            "AIRFLOW_CONN_IAMPORT_DEFAULT": json.dumps(gateway_conn(emulator_url, cfg)),
        }
    )
    return env


def _airflow(
    env: dict[str, str], *args: str, log: Path | None = None
) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "airflow")
    if log is None:
        return subprocess.run([exe, *args], env=env, capture_output=True, text=True, check=False)
    with log.open("a") as out:
        return subprocess.run(
            [exe, *args], env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        )


def _billing_date(paths: dict[str, Path]) -> date:
    """Fixed at the first demo run (today in Seoul), so running again targets the same date."""
    if paths["state"].exists():
        return date.fromisoformat(json.loads(paths["state"].read_text())["billing_date"])
    day = pendulum.now(SEOUL).date()
    paths["state"].write_text(json.dumps({"billing_date": day.isoformat()}))
    return day


def _dag_run_state(env: dict[str, str], billing_date: date) -> str:
    out = _airflow(env, "dags", "list-runs", DAG_ID, "-o", "json")
    # The CLI prints log lines before the JSON document.
    runs = json.loads(out.stdout[out.stdout.index("[{") :]) if "[{" in out.stdout else []
    mine = [r for r in runs if str(r.get("logical_date", "")).startswith(billing_date.isoformat())]
    return mine[0]["state"] if mine else "unknown"


def _payments(emulator_db: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(f"file:{emulator_db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM payments").fetchone()[0]
    finally:
        conn.close()


def main() -> int:
    repo = Path(__file__).resolve().parents[2]
    paths = _paths(Path(os.environ.get("IAMPORT_DEMO_ROOT") or Path.cwd()))
    paths["airflow"].mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    billing_date = _billing_date(paths)
    cfg = EmulatorConfig(
        db_path=str(paths["emulator"]), latency_ms=20, latency_jitter_ms=5, api=emulator_api()
    )

    fresh = not paths["warehouse"].exists()
    os.environ["AIRFLOW_CONN_BILLING_WAREHOUSE"] = json.dumps(
        {"conn_type": "sqlite", "host": str(paths["warehouse"])}
    )
    if fresh:
        with Ledger.from_conn_id("billing_warehouse") as ledger:
            counts = seed_sample(ledger, paths["emulator"], billing_date, n=SUBSCRIPTIONS)
        print(
            f"seeded {SUBSCRIPTIONS + counts.invalid:,} subscriptions due {billing_date}: "
            f"{counts.paying:,} paying cards, {counts.soft_decline} soft declines, "
            f"{counts.hard_decline} hard declines, {counts.no_billing_key} without a billing key, "
            f"{counts.invalid} invalid rows"
        )

    with start_emulator_process(cfg, log_path=paths["demo"] / "emulator.log") as emulator:
        env = _airflow_env(paths, repo, emulator.url, cfg)
        if not (paths["airflow"] / "airflow.db").exists():
            print("creating the Airflow metadata database (first run only) ...")
            migrated = _airflow(env, "db", "migrate")
            if migrated.returncode:
                print(migrated.stdout[-2000:], migrated.stderr[-2000:], file=sys.stderr)
                return 1
        before = _payments(paths["emulator"])
        logical = pendulum.datetime(
            billing_date.year, billing_date.month, billing_date.day, 10, tz=SEOUL
        )
        print(f"running {DAG_ID} for billing date {billing_date} (log: {paths['log']}) ...")
        paths["log"].write_text("")
        result = _airflow(
            env, "dags", "test", DAG_ID, logical.isoformat(),
            "-c", json.dumps({"max_concurrency": 16, "batch_size": 500}), log=paths["log"],
        )  # fmt: skip
        state = _dag_run_state(env, billing_date)
        after = _payments(paths["emulator"])

    with Ledger.from_conn_id("billing_warehouse") as ledger:
        print()
        print(summary(ledger, billing_date))
    new = after - before
    print()
    if new:
        print(f"Iamport (the emulator) recorded {new:,} new payments, paid or declined.")
    else:
        print("Nothing new was charged: every due subscription was already settled.")
    print(f"Ledger: {paths['warehouse']} (table billing_charge_attempts)")
    print(f"Emulator payments: {paths['emulator']}   Airflow home: {paths['airflow']}")
    print(f"DAG run state: {state}; took {time.monotonic() - started:.1f} s")
    if result.returncode or state != "success":
        print(f"the DAG run did not succeed: see {paths['log']}", file=sys.stderr)
        return 1
    return 0


def summary(ledger: Ledger, billing_date: date) -> str:
    """Counts and amounts by outcome, and every rejected row with its reason."""
    rows = sorted(ledger.outcome_kinds(billing_date), key=lambda r: -r[1])
    lines = [f"Billing date {billing_date}", f"  {'outcome':<18} {'count':>7} {'amount (KRW)':>15}"]
    for status, count, amount in rows:
        shown = "(not charged)" if status == "rejected" else f"{int(amount):,}"
        lines.append(f"  {status:<18} {count:>7,} {shown:>15}")
    rejected = ledger.rejected_rows(billing_date=billing_date, limit=10_000)
    if rejected:
        lines.append("  rejected rows (never sent to Iamport):")
        lines += [f"    {r[0] or '(no id)':<18} {r[2]}" for r in rejected]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
