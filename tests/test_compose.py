"""docker-compose.yaml and the Dockerfile, checked statically (there is no Docker engine here):
every command is a real Airflow CLI command or one of this package's console scripts, every
environment variable is read by Airflow, by the package or by the image's entrypoint, every
mounted path and COPY source exists, and the connections created at init are usable."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from functools import cache
from typing import Any

import pytest
import yaml
from conftest import REPO
from support import CELERY_ENV_FILE, celery_env

OFFICIAL_SERVICES = {
    "postgres", "redis", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
    "airflow-worker", "airflow-triggerer", "airflow-init",
}  # fmt: skip
# Read by the official image's entrypoint (docker-stack docs), not by Airflow's config.
IMAGE_ENTRYPOINT_VARS = {"DUMB_INIT_SETSID"}
# The Redis connection the gateway connection's shared rate limit lives on.
RATE_REDIS = "billing_rate_limit"
POSTGRES_IMAGE_VARS = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def airflow_image_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services().items() if "build" in s}


def console_scripts() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def argv_of(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def init_script_lines() -> list[list[str]]:
    init = services()["airflow-init"]
    assert argv_of(init["entrypoint"]) == ["/bin/bash"]
    flag, script = argv_of(init["command"])
    assert flag == "-c"
    return [tokens for line in script.splitlines() for tokens in shell_commands(line)]


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at ``||``, ``&&`` and ``;``)."""
    return [shlex.split(part) for part in re.split(r"\|\||&&|;", line) if part.strip()]


def airflow_invocations() -> list[list[str]]:
    """Every ``airflow ...`` the containers run: service commands, init script, health checks.

    The image's entrypoint runs ``airflow <command>`` for a command that is not a program.
    """
    found: list[list[str]] = []
    scripts = console_scripts()
    for service in airflow_image_services().values():
        if "entrypoint" in service:
            continue
        found.append(["airflow", *argv_of(service["command"])])
    for tokens in init_script_lines():
        if "airflow" in tokens:
            found.append(tokens[tokens.index("airflow") :])
    for service in services().values():
        test = service.get("healthcheck", {}).get("test", [])
        shell = test[1] if test[:1] == ["CMD-SHELL"] else ""
        for tokens in shell_commands(shell):
            if tokens[:1] == ["airflow"]:
                found.append(tokens)
    assert all(argv[1] not in scripts for argv in found)
    return found


def command_path(argv: list[str]) -> list[str]:
    """``airflow connections add ID --conn-json ...`` -> ["connections", "add", "ID"]."""
    path = []
    for token in argv[1:]:
        if token.startswith("-"):
            break
        path.append(token)
    return path


@cache
def airflow_facts() -> dict[str, Any]:
    """Ask Airflow, configured like the containers (CeleryExecutor), in one subprocess."""
    env_vars = sorted(
        {k for s in airflow_image_services().values() for k in (s.get("environment") or {})}
        | set(celery_env())
    )
    probe = f"""
import json, os, sys
os.environ["AIRFLOW__CORE__EXECUTOR"] = "CeleryExecutor"
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
from airflow.configuration import conf
conf.load_providers_configuration()
from airflow.cli import cli_parser
parser = cli_parser.get_parser()
commands = {{}}
for path in {[command_path(a) for a in airflow_invocations()]!r}:
    try:
        parser.parse_args([*path, "--help"])
        code = 0
    except SystemExit as e:
        code = e.code
    commands[" ".join(path)] = code
options = {{}}
for name in {env_vars!r}:
    if name.startswith("AIRFLOW__"):
        section, key = name[len("AIRFLOW__"):].lower().split("__", 1)
        described = conf.configuration_description.get(section, {{}}).get("options", {{}})
        options[name] = key in described
sys.stdout.flush()
print("\\n@@" + json.dumps({{"commands": commands, "options": options}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.rsplit("\n@@", 1)[1])


def package_env_vars() -> set[str]:
    """IAMPORT_BILLING_<NAME> for every ``_env("NAME")`` in config.py, and the emulator's."""
    from iamport_billing.emulator.server import SECRET_ENV

    source = (REPO / "plugins" / "iamport_billing" / "config.py").read_text()
    names = re.findall(r'_env\("([A-Z_]+)"', source)
    return {f"IAMPORT_BILLING_{n}" for n in names} | {SECRET_ENV}


def test_compose_file_has_the_official_services_plus_emulator_and_warehouse():
    names = set(services())
    assert OFFICIAL_SERVICES <= names
    assert {"iamport-emulator", "warehouse-db"} <= names
    assert services()["airflow-worker"]["command"] == "celery worker"


def test_every_airflow_command_exists_in_the_airflow_cli():
    codes = airflow_facts()["commands"]
    assert {"api-server", "scheduler", "dag-processor", "triggerer", "celery worker"} <= set(codes)
    assert {cmd: code for cmd, code in codes.items() if code != 0} == {}


def test_other_commands_are_this_packages_console_scripts():
    scripts = console_scripts()
    for name, service in airflow_image_services().items():
        if "entrypoint" in service and name != "airflow-init":
            program = argv_of(service["command"])[0]
            assert program in scripts, f"{name}: {program} is not a console script"


def test_every_airflow_setting_is_one_airflow_reads():
    options = airflow_facts()["options"]
    assert options and {name: ok for name, ok in options.items() if not ok} == {}


def test_every_other_environment_variable_is_read_by_the_package_or_the_image():
    allowed = package_env_vars() | IMAGE_ENTRYPOINT_VARS
    for name, service in services().items():
        env = set(service.get("environment") or {})
        if "build" not in service:
            assert env <= POSTGRES_IMAGE_VARS, name
            continue
        prefixes = ("AIRFLOW__", "AIRFLOW_CONN_", "_AIRFLOW_")
        unknown = {var for var in env if not var.startswith(prefixes) and var not in allowed}
        assert unknown == set(), f"{name} sets variables nothing reads: {unknown}"


def test_every_bind_mount_exists_and_named_volumes_are_declared():
    declared = set(compose().get("volumes") or {})
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: {source} is not in the repository"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_dockerfile_builds_on_airflow_3_3_and_copies_existing_paths():
    lines = (REPO / "Dockerfile").read_text().splitlines()
    assert "FROM apache/airflow:3.3.2" in lines
    copies = [shlex.split(line)[1:-1] for line in lines if line.startswith("COPY ")]
    sources = [s for args in copies for s in args if not s.startswith("--")]
    assert sources and all((REPO / s).exists() for s in sources), sources
    assert any("pip install" in line and "/opt/iamport-billing" in line for line in lines)


def init_connections() -> dict[str, dict[str, Any]]:
    found = {}
    for tokens in init_script_lines():
        if tokens[1:3] == ["connections", "add"]:
            found[tokens[3]] = json.loads(tokens[tokens.index("--conn-json") + 1])
    return found


def test_init_creates_the_connections_and_pool_the_dags_use():
    from iamport_billing.config import BillingConfig

    cfg = BillingConfig()
    assert set(init_connections()) == {cfg.iamport_conn_id, cfg.warehouse_conn_id, RATE_REDIS}
    pools = [t for t in init_script_lines() if t[1:3] == ["pools", "set"]]
    assert [p[3] for p in pools] == [cfg.pool]


@pytest.mark.parametrize("conn_id", ["iamport_default", "billing_warehouse", RATE_REDIS])
def test_init_connections_are_usable(conn_id):
    from airflow.sdk import Connection
    from iamport_billing.hooks.iamport import settings_from_connection

    spec = init_connections()[conn_id]
    conn = Connection(conn_id=conn_id, **{**spec, "extra": json.dumps(spec.get("extra", {}))})
    if conn.conn_type == "iamport":
        assert settings_from_connection(conn).base_url == "http://iamport-emulator:8099"
    elif conn.conn_type == "redis":
        assert (conn.host, conn.port) == ("redis", 6379)  # the Celery broker's service
    else:
        assert conn.conn_type == "postgres" and conn.host == "warehouse-db"


def test_emulator_service_command_parses_with_the_emulator_cli():
    from iamport_billing.emulator.__main__ import build_parser

    argv = argv_of(services()["iamport-emulator"]["command"])
    args = build_parser().parse_args(argv[1:])
    assert (args.host, args.port) == ("0.0.0.0", 8099)


def test_celery_settings_are_the_file_the_celery_end_to_end_test_runs_with():
    assert celery_env()["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    for name, service in airflow_image_services().items():
        assert service.get("env_file") == CELERY_ENV_FILE, name
        overridden = set(service.get("environment") or {}) & set(celery_env())
        assert overridden == set(), f"{name} overrides the shared Celery settings: {overridden}"


def test_the_gateway_connection_shares_its_limit_through_the_brokers_redis():
    from airflow.sdk import Connection
    from iamport_billing.hooks.transport import rate_limit_of

    spec = init_connections()["iamport_default"]
    conn = Connection(conn_id="iamport_default", **{**spec, "extra": json.dumps(spec["extra"])})
    limit = rate_limit_of(conn)
    assert limit.active and limit.redis_conn_id == RATE_REDIS
