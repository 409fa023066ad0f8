"""Shared fixtures: an Airflow home with a migrated SQLite metadata DB, ledgers on a real SQLite
file, the real PostgreSQL server and the real MariaDB server, and the emulator over real HTTP
on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"

# Airflow reads its configuration at import time: set it before anything imports airflow.
_AIRFLOW_HOME = Path(
    os.environ.get("IAMPORT_TEST_AIRFLOW_HOME", REPO / ".pytest_cache" / "airflow-home")
)
os.environ.update(
    {
        "AIRFLOW_HOME": str(_AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME}/airflow.db",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        # dag.test() waits for ever on an unanswered approval: a tripped guardrail fails the
        # plan here, as with approvals off; tests/test_approvals.py turns them on and answers.
        "IAMPORT_BILLING_APPROVAL_TIMEOUT_MINUTES": "0",
    }
)
sys.path.insert(0, str(REPO / "tests"))

F = TypeVar("F", bound=Callable[..., Any])

MY_HOST = os.environ.get("IAMPORT_TEST_MYSQL_HOST", "127.0.0.1")
MY_PORT = int(os.environ.get("IAMPORT_TEST_MYSQL_PORT", "3306"))
PG_DSN = os.environ.get("IAMPORT_TEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Migrate the metadata DB once per checkout (cached in .pytest_cache)."""
    _AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
    marker = _AIRFLOW_HOME / ".migrated"
    if not marker.exists():
        subprocess.run(
            [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
            check=True,
            env=os.environ.copy(),
            capture_output=True,
        )
        marker.touch()
    return _AIRFLOW_HOME


def conn_env(conn_id: str) -> str:
    return f"AIRFLOW_CONN_{conn_id.upper()}"


@pytest.fixture
def sqlite_warehouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real SQLite file as the ``billing_warehouse`` connection."""
    path = tmp_path / "warehouse.db"
    monkeypatch.setenv(
        conn_env("billing_warehouse"), json.dumps({"conn_type": "sqlite", "host": str(path)})
    )
    return path


@contextmanager
def scratch_database(prefix: str = "iamport_test") -> Iterator[str]:
    """A fresh database on the real PostgreSQL server, dropped (forcibly) afterwards."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(PG_DSN)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture
def postgres_database() -> Iterator[str]:
    with scratch_database() as name:
        yield name


@pytest.fixture
def postgres_warehouse(postgres_database: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The ``billing_warehouse`` connection on a fresh PostgreSQL database."""
    name = postgres_database
    monkeypatch.setenv(
        conn_env("billing_warehouse"),
        json.dumps(
            {
                "conn_type": "postgres",
                "host": "127.0.0.1",
                "port": 5432,
                "login": "postgres",
                "schema": name,
            }
        ),
    )
    return name


@contextmanager
def scratch_mariadb(prefix: str = "iamport_test") -> Iterator[str]:
    """A fresh database on the real MariaDB/MySQL server, dropped afterwards."""
    import mysql.connector

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = mysql.connector.connect(host=MY_HOST, port=MY_PORT, user="root", password="")
    admin.autocommit = True
    cur = admin.cursor()
    cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
    try:
        yield name
    finally:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


@pytest.fixture
def mariadb_warehouse(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The ``billing_warehouse`` connection on a fresh MariaDB database (MySQL provider)."""
    with scratch_mariadb() as name:
        monkeypatch.setenv(
            conn_env("billing_warehouse"),
            json.dumps(
                {
                    "conn_type": "mysql",
                    "host": MY_HOST,
                    "port": MY_PORT,
                    "login": "root",
                    "schema": name,
                    "extra": {"client": "mysql-connector-python"},
                }
            ),
        )
        yield name


WAREHOUSES = ["sqlite", "postgres", "mariadb"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Money tests run on every ledger database; a module that tests screens or messages
    narrows this with its own ``WAREHOUSES`` list."""
    chosen = any(
        m.args and "warehouse" in _argnames(m.args[0])
        for m in metafunc.definition.iter_markers("parametrize")
    )
    if "warehouse" in metafunc.fixturenames and not chosen:
        metafunc.parametrize(
            "warehouse", getattr(metafunc.module, "WAREHOUSES", WAREHOUSES), indirect=True
        )


def _argnames(names: str | tuple[str, ...] | list[str]) -> list[str]:
    return [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)


def on_both_gateways(v2_warehouses: tuple[str, ...] = ("sqlite",)) -> Callable[[F], F]:
    """V1 on every ledger database, V2 on ``v2_warehouses`` only: what the V2 cases exercise
    is the gateway, and the ledger's databases are the same code on either (CI time)."""
    cases = [pytest.param(w, "v1") for w in WAREHOUSES]
    cases += [pytest.param(w, "v2") for w in v2_warehouses]
    both = pytest.mark.parametrize(("warehouse", "gateway_api"), cases, indirect=True)

    def mark(test: F) -> F:
        return both(pytest.mark.usefixtures("gateway_api")(test))

    return mark


@pytest.fixture
def warehouse(request: pytest.FixtureRequest) -> str:
    """The ``billing_warehouse`` connection on the database named by the parameter."""
    request.getfixturevalue(f"{request.param}_warehouse")
    return request.param


@pytest.fixture
def ledger(warehouse: str):
    """The ledger on each supported database in turn (SQLite, PostgreSQL, MariaDB)."""
    from iamport_billing.warehouse.ledger import Ledger

    with Ledger.from_conn_id("billing_warehouse") as led:
        led.init_schema()
        yield led


@pytest.fixture
def dag_world(airflow_db, ledger, emulator, monkeypatch: pytest.MonkeyPatch):
    """What a DAG-level money test needs: the ledger (on each database), the emulator and a
    webhook receiver for alerts; DAGs parse this environment (no task retries, short waits)."""
    from chaos_support import AlertReceiver

    receiver = AlertReceiver()
    monkeypatch.setenv(conn_env("alert_webhook"), json.dumps(receiver.conn))
    monkeypatch.setenv("IAMPORT_BILLING_ALERT_WEBHOOK_CONN_ID", "alert_webhook")
    monkeypatch.setenv("IAMPORT_BILLING_UNKNOWN_SETTLE_SECONDS", "0.1")
    monkeypatch.setenv("IAMPORT_BILLING_TASK_RETRIES", "0")
    # dag.test() cannot finish a run with deadline alerts (see RELIABILITY.md).
    monkeypatch.setattr("iamport_billing.alerts.deadline_alerts", lambda cfg, *, starts_at: [])
    yield ledger, emulator, receiver
    receiver.close()


GATEWAY_APIS = ["v1", "v2"]
# Timeouts of the test connections: a test waits 5 s at most for an answer, on either API.
TEST_TIMEOUTS = {"read_timeout": 5, "connect_timeout": 2}


@pytest.fixture(params=GATEWAY_APIS)
def gateway_api(request: pytest.FixtureRequest) -> str:
    """The API a money test runs against, Iamport V1 or PortOne V2: a test (or fixture) that
    asks for it runs once per API, with the emulator in that mode and the ``iamport_default``
    connection of that type (``iamport`` or ``portone``, picked up by ``gateway_for``)."""
    return request.param


@pytest.fixture
def emulator_config(tmp_path: Path, request: pytest.FixtureRequest):
    """Emulator settings; tests tweak them before the ``emulator`` fixture starts it. V1 unless
    the test asks for ``gateway_api``."""
    from iamport_billing.emulator.config import EmulatorConfig

    return EmulatorConfig(db_path=str(tmp_path / "emulator.db"), seed=7, api=requested_api(request))


def requested_api(request: pytest.FixtureRequest) -> str:
    """``gateway_api`` when the test asks for it, else V1."""
    return request.getfixturevalue("gateway_api") if "gateway_api" in request.fixturenames else "v1"


def emulator_conn(url: str, emulator_config) -> dict:
    """The emulator's gateway connection (devserver.gateway_conn) with the tests' timeouts."""
    from iamport_billing.devserver import gateway_conn

    conn = gateway_conn(url, emulator_config)
    return {**conn, "extra": {**conn["extra"], **TEST_TIMEOUTS}}


@pytest.fixture
def emulator(emulator_config, monkeypatch: pytest.MonkeyPatch):
    """The emulator over real HTTP on loopback, wired up as the ``iamport_default`` connection."""
    from iamport_billing.emulator.server import run_emulator_in_thread
    from iamport_billing.hooks.iamport import TOKEN_CACHE

    with run_emulator_in_thread(emulator_config) as handle:
        monkeypatch.setenv(
            conn_env("iamport_default"), json.dumps(emulator_conn(handle.url, emulator_config))
        )
        TOKEN_CACHE.clear()
        yield handle
    TOKEN_CACHE.clear()


@pytest.fixture
def hook(emulator):
    """An IamportHook on the emulator connection, closed afterwards."""
    from iamport_billing.hooks.iamport import IamportHook

    h = IamportHook(pool_maxsize=8)
    yield h
    h.close()


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through chromedriver, 1280 px wide; installed from Debian's packages
    when missing."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        _install_chromium()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="iamport-e2e-chromium-")
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--window-size=1280,1000",
        f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _install_chromium() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and cannot be (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    packages = ["chromium", "chromium-driver", "fonts-nanum"]
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode:
            pytest.skip(f"Chromium could not be installed: {done.stderr[-500:]}")
