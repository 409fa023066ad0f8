"""``make up``: a real local Airflow (api-server, scheduler, dag-processor, triggerer) with the
billing DAGs, the Billing page and the emulator, seeded with sample data, to click around in.

The same launcher (``AirflowStack``) and REST client (``AirflowApi``) start and drive the
services in the end-to-end test, there on a PostgreSQL metadata database.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pendulum
import psutil
import requests

from iamport_billing.config import BillingConfig
from iamport_billing.emulator import EmulatorConfig, EmulatorProcess, start_emulator_process
from iamport_billing.emulator.server import bind_socket
from iamport_billing.policy import SEOUL
from iamport_billing.sample_data import seed_sample
from iamport_billing.warehouse.ledger import Ledger

REPO = Path(__file__).resolve().parents[2]
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
DAG_ID = "iamport_billing_daily"
SIMPLE_AUTH_MANAGER = (
    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
)


def free_port(host: str = "127.0.0.1") -> int:
    sock = bind_socket(host, 0)
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def airflow_exe() -> str:
    return str(Path(sys.executable).parent / "airflow")


def gateway_conn(url: str, emulator: EmulatorConfig) -> dict[str, Any]:
    """The gateway connection of a local emulator: ``iamport`` (V1) or ``portone`` (V2)."""
    if emulator.api == "v2":
        return {
            "conn_type": "portone",
            "host": url,
            "password": emulator.api_secret,
            "extra": {"read_timeout": 60, "connect_timeout": 3},
        }
    return {
        "conn_type": "iamport",
        "host": url,
        "login": emulator.imp_key,
        "password": emulator.imp_secret,
        "extra": {"read_timeout": 10, "connect_timeout": 3},
    }


def emulator_api() -> str:
    """Which API the local emulator speaks: ``IAMPORT_EMULATOR_API`` (``make demo API=v2``)."""
    return os.environ.get("IAMPORT_EMULATOR_API") or "v1"


def sqlite_conn(path: Path) -> dict[str, Any]:
    return {"conn_type": "sqlite", "host": str(path)}


@dataclass
class AirflowStack:
    """Airflow's services as child processes of this one, each in its own process group."""

    home: Path
    sql_alchemy_conn: str
    users: Mapping[str, tuple[str, str]]  # name -> (role, password)
    port: int = 0
    extra_env: Mapping[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        (self.home / "logs").mkdir(exist_ok=True)
        self.passwords_file.write_text(
            json.dumps({name: pw for name, (_, pw) in self.users.items()})
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def passwords_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json"

    def env(self) -> dict[str, str]:
        """The whole configuration, as environment variables (no airflow.cfg edits)."""
        secret_file = self.home / ".jwt_secret"
        if not secret_file.exists():
            secret_file.write_text(secrets.token_urlsafe(48))
        env = dict(os.environ)
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(
                    f"{name}:{role}" for name, (role, _) in self.users.items()
                ),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
                "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__BASE_URL": self.url,
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API_AUTH__JWT_SECRET": secret_file.read_text(),
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
                "AIRFLOW__CORE__PARALLELISM": "8",
            }
        )
        env.update(self.extra_env)
        return env

    def airflow(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """One CLI command with this stack's configuration."""
        done = subprocess.run(
            [airflow_exe(), *args], env=self.env(), capture_output=True, text=True, check=False
        )
        if check and done.returncode:
            raise RuntimeError(
                f"airflow {' '.join(args[:2])} failed ({done.returncode}):\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def migrate(self) -> None:
        self.airflow("db", "migrate")

    def start(self, components: tuple[str, ...] = COMPONENTS) -> None:
        for name in components:
            self._spawn(name, [name])

    def start_worker(self, name: str, log_server_port: int | None = None) -> None:
        """One Celery worker (``airflow celery worker``) called ``name``; workers on one host
        each need their own log server port."""
        port = log_server_port or free_port()
        self._spawn(
            name,
            ["celery", "worker", "--celery-hostname", f"{name}@%h"],
            {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(port)},
        )

    def _spawn(self, name: str, args: list[str], env: Mapping[str, str] | None = None) -> None:
        log = (self.home / "logs" / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [airflow_exe(), *args],
            env={**self.env(), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def kill(self, name: str) -> None:
        """SIGKILL a component and every process under it, as a machine dying would."""
        proc = self.processes.pop(name)
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        _signal_group(proc, signal.SIGKILL)
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until the API server answers its health check (and no component has died)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                if requests.get(f"{self.url}/api/v2/monitor/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the api-server did not answer in {timeout} s\n{self.tail()}")
            time.sleep(1)

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"airflow components exited: {dead}\n{self.tail()}")

    def tail(self, chars: int = 2500) -> str:
        return "\n".join(
            f"--- {name}.log ---\n"
            + (self.home / "logs" / f"{name}.log").read_text(errors="replace")[-chars:]
            for name in self.processes
        )

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM each component's process group (it forks workers), SIGKILL what lingers."""
        for proc in self.processes.values():
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        self.processes.clear()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


class AirflowApi:
    """The public REST API (``/api/v2``) with a JWT from ``/auth/token``."""

    def __init__(self, url: str, username: str, password: str):
        self.url = url
        self.session = requests.Session()
        r = self.session.post(
            f"{url}/auth/token", json={"username": username, "password": password}, timeout=30
        )
        r.raise_for_status()
        self.token = r.json()["access_token"]
        self.session.headers["Authorization"] = f"Bearer {self.token}"

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(method, f"{self.url}{path}", timeout=60, **kwargs)

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.call(method, path, **kwargs)
        if not r.ok:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r.json() if r.content else None

    def set_pool(self, name: str, slots: int, description: str = "") -> None:
        body = {"name": name, "slots": slots, "description": description}
        if self.call("GET", f"/api/v2/pools/{name}").ok:
            self.ok("PATCH", f"/api/v2/pools/{name}", json=body)
        else:
            self.ok("POST", "/api/v2/pools", json=body)

    def wait_for_dag(self, dag_id: str, timeout: float, stack: AirflowStack | None = None) -> None:
        """Until the dag-processor has parsed and stored the DAG."""
        deadline = time.monotonic() + timeout
        while not self.call("GET", f"/api/v2/dags/{dag_id}").ok:
            if stack is not None:
                stack.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"DAG {dag_id} was not parsed within {timeout} s")
            time.sleep(2)

    def unpause(self, dag_id: str) -> None:
        self.ok("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None = None) -> str:
        body = {"logical_date": None, "conf": dict(conf or {})}
        return self.ok("POST", f"/api/v2/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def wait_for_run(
        self, dag_id: str, run_id: str, timeout: float, stack: AirflowStack | None = None
    ) -> str:
        """Until the run is finished; returns its state."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.ok("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in ("success", "failed"):
                return state
            if stack is not None:
                stack.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {state} after {timeout} s")
            time.sleep(2)

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        tis = self.ok(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 500}
        )["task_instances"]
        return {
            t["task_id"] + (f"[{t['map_index']}]" if t["map_index"] >= 0 else ""): t["state"]
            for t in tis
        }


def add_connection(stack: AirflowStack, conn_id: str, conn: Mapping[str, Any]) -> None:
    """Store a connection in the metadata DB (so it shows in the UI), replacing an older one."""
    stack.airflow("connections", "delete", conn_id, check=False)
    stack.airflow("connections", "add", conn_id, "--conn-json", json.dumps(conn))


def _stop_as_on_ctrl_c(signum: int, frame: Any) -> None:
    """SIGTERM (``kill``, a terminal closing, make passing it on) stops everything as Ctrl-C
    does: the components run in process groups of their own and would outlive us."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop is enough
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _stop_as_on_ctrl_c)
    root = Path(os.environ.get("IAMPORT_UP_ROOT") or REPO / ".demo" / "up")
    port = int(os.environ.get("IAMPORT_UP_PORT", "8080"))
    user, password = "ops", os.environ.get("IAMPORT_UP_PASSWORD", "ops")
    root.mkdir(parents=True, exist_ok=True)
    warehouse, emulator_db = root / "warehouse.db", root / "emulator.db"
    billing_date = pendulum.now(SEOUL).date()
    cfg = BillingConfig.from_env()

    fresh = not warehouse.exists()
    os.environ[f"AIRFLOW_CONN_{cfg.warehouse_conn_id.upper()}"] = json.dumps(sqlite_conn(warehouse))
    if fresh:
        with Ledger.from_conn_id(cfg.warehouse_conn_id) as ledger:
            counts = seed_sample(ledger, emulator_db, billing_date, n=2000)
        print(f"seeded 2,000 subscriptions due {billing_date}: {counts}")

    stack = AirflowStack(
        home=root / "airflow",
        sql_alchemy_conn=f"sqlite:///{root / 'airflow' / 'airflow.db'}",
        users={user: ("admin", password)},
        port=port,
    )
    emulator_cfg = EmulatorConfig(
        db_path=str(emulator_db), latency_ms=20, latency_jitter_ms=5, api=emulator_api()
    )
    emulator: EmulatorProcess | None = None
    try:
        emulator = start_emulator_process(emulator_cfg, log_path=root / "emulator.log")
        print("migrating the Airflow metadata database ...")
        stack.migrate()
        add_connection(stack, cfg.iamport_conn_id, gateway_conn(emulator.url, emulator_cfg))
        add_connection(stack, cfg.warehouse_conn_id, sqlite_conn(warehouse))
        stack.airflow("pools", "set", cfg.pool, "4", "Iamport charge batches in flight")
        stack.start()
        stack.wait_ready()
        api = AirflowApi(stack.url, user, password)
        api.wait_for_dag(DAG_ID, 180, stack)
        api.unpause(DAG_ID)
        if fresh:
            run_id = api.trigger(DAG_ID, {"max_concurrency": 16})
            print(f"triggered {DAG_ID} run {run_id}")
        print(
            f"\nAirflow is up: {stack.url}  (login {user} / {password})\n"
            f"Billing page:  {stack.url}/billing/  (also under 'Billing' in the nav)\n"
            f"Emulator:      {emulator.url}\n"
            f"Logs:          {stack.home / 'logs'}\nCtrl-C stops everything."
        )
        while True:
            stack.check_alive()
            time.sleep(2)
    except KeyboardInterrupt:
        print("\nstopping ...")
    finally:
        stack.stop()
        if emulator is not None:
            emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
