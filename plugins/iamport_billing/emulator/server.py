"""Running the emulator: blocking (the CLI), in a thread (tests), as a process (demo, bench)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
import uvicorn

from iamport_billing.emulator.app import create_v1_app
from iamport_billing.emulator.config import (
    DEFAULT_API_SECRET,
    DEFAULT_IMP_KEY,
    DEFAULT_IMP_SECRET,
    SWITCH_FIELDS,
    EmulatorConfig,
)
from iamport_billing.emulator.core import EmulatorApp
from iamport_billing.emulator.store import Store
from iamport_billing.emulator.v2 import create_v2_app

SECRET_ENV = "IAMPORT_EMULATOR_IMP_SECRET"
API_SECRET_ENV = "PORTONE_EMULATOR_API_SECRET"
WEBHOOK_SECRET_ENV = "PORTONE_EMULATOR_WEBHOOK_SECRET"


def create_app(config: EmulatorConfig, store: Store | None = None) -> EmulatorApp:
    """The app for ``config.api``: Iamport V1 or PortOne V2 (same store, faults and admin)."""
    if config.api == "v2":
        return create_v2_app(config, store)
    return create_v1_app(config, store)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn so port 0 resolves to a known free port."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_for(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_server(app: EmulatorApp, config: EmulatorConfig) -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(
            app, log_level=config.log_level, access_log=False, lifespan="off", http="h11"
        )
    )


def serve(config: EmulatorConfig) -> None:
    """Run until SIGINT/SIGTERM; logs one line with the URL (never the secret)."""
    sock = bind_socket(config.host, config.port)
    app = create_app(config)
    url = url_for(config.host, sock.getsockname()[1])
    admin = "on" if config.admin_enabled else "off (non-loopback bind)"
    who = f"imp_key={config.imp_key}" if config.api == "v1" else f"storeId={config.store_id}"
    print(
        f"iamport-emulator ({config.api}) listening on {url} (db={config.db_path}, {who}, "
        f"admin={admin})",
        file=sys.stderr,
        flush=True,
    )
    try:
        _uvicorn_server(app, config).run(sockets=[sock])
    finally:
        app.emulator.close()


@dataclass
class EmulatorHandle:
    """An emulator served by a daemon thread of this process."""

    url: str
    app: EmulatorApp
    server: uvicorn.Server = field(repr=False)
    thread: threading.Thread = field(repr=False)

    @property
    def config(self) -> EmulatorConfig:
        return self.app.emulator.config

    @property
    def store(self) -> Store:
        return self.app.emulator.store

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.app.emulator.close()

    def __enter__(self) -> EmulatorHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_emulator_in_thread(config: EmulatorConfig, timeout: float = 10.0) -> EmulatorHandle:
    """Start uvicorn in a daemon thread (port 0 = a free port) and wait until it serves."""
    sock = bind_socket(config.host, config.port)
    app = create_app(config)
    server = _uvicorn_server(app, config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="iamport-emulator", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            app.emulator.close()
            raise RuntimeError("the emulator thread did not start")
        time.sleep(0.01)
    return EmulatorHandle(url_for(config.host, sock.getsockname()[1]), app, server, thread)


@dataclass
class EmulatorProcess:
    """An emulator running as a separate process (``python -m iamport_billing.emulator``)."""

    url: str
    process: subprocess.Popen[bytes] = field(repr=False)
    log_path: Path
    remove_log: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.remove_log:
            self.log_path.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL: a crash, for tests of what survives in the database."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cli_args(config: EmulatorConfig, port: int) -> list[str]:
    """The command-line equivalent of ``config`` (without the secrets, which go by env)."""
    args = [
        "--api", config.api, "--store-id", config.store_id,
        "--host", config.host, "--port", str(port), "--db", str(config.db_path),
        "--imp-key", config.imp_key, "--latency-ms", str(config.latency_ms),
        "--latency-jitter-ms", str(config.latency_jitter_ms), "--error-rate",
        str(config.error_rate), "--rate-limit-rate", str(config.rate_limit_rate),
        "--drop-after-commit-rate", str(config.drop_after_commit_rate), "--token-ttl-s",
        str(config.token_ttl_s), "--log-level", config.log_level,
    ]  # fmt: skip
    optional = {
        "--token-extend-window-s": config.token_extend_window_s,
        "--token-extend-s": config.token_extend_s,
        "--seed": config.seed,
        "--rate-cap": config.rate_cap,
        "--webhook-url": config.webhook_url,
    }
    for flag, value in optional.items():
        if value is not None:
            args += [flag, str(value)]
    for name in SWITCH_FIELDS:
        value = getattr(config, name)
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif name == "token_status" and value is not None:
            args += [flag, str(value)]
        elif name == "paid_amount_multiplier" and value != 1:
            args += [flag, str(value)]
    return args


def wait_until_answering(
    url: str, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll until any HTTP answer comes back (a 404 counts: the server is up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/__emulator__/ping", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the emulator exited with code {process.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"the emulator at {url} did not answer in {timeout} s") from None
            time.sleep(0.05)


def start_emulator_process(
    config: EmulatorConfig, timeout: float = 30.0, log_path: str | Path | None = None
) -> EmulatorProcess:
    """Start the emulator as a subprocess and wait until it answers.

    With port 0 a free port is picked first (tiny race, fine on a test machine). Its stderr goes
    to ``log_path`` (by default a temporary file, removed by ``stop()``).
    """
    port = config.port
    if port == 0:
        probe = bind_socket(config.host, 0)
        port = probe.getsockname()[1]
        probe.close()
    remove_log = log_path is None
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="iamport-emulator-", suffix=".log")
        os.close(fd)
        log_path = name
    log_path = Path(log_path)
    env = {**os.environ, SECRET_ENV: config.imp_secret, API_SECRET_ENV: config.api_secret}
    if config.webhook_secret is not None:
        env[WEBHOOK_SECRET_ENV] = config.webhook_secret
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "iamport_billing.emulator", *cli_args(config, port)],
            stdout=log,
            stderr=log,
            env=env,
        )
    handle = EmulatorProcess(url_for(config.host, port), process, log_path, remove_log)
    try:
        wait_until_answering(handle.url, timeout, process)
    except (RuntimeError, TimeoutError) as e:
        tail = log_path.read_text(errors="replace")[-2000:]
        handle.stop()
        raise RuntimeError(f"{e}; log tail:\n{tail}") from None
    return handle


def register_card(
    url: str,
    customer_uid: str,
    card_number: str,
    imp_key: str = DEFAULT_IMP_KEY,
    imp_secret: str = DEFAULT_IMP_SECRET,
    expiry: str = "2030-12",
    **fields: Any,
) -> dict[str, Any]:
    """Issue a billing key through the API (what a real onboarding does); returns the Customer."""
    with requests.Session() as session:
        token = session.post(
            f"{url}/users/getToken", json={"imp_key": imp_key, "imp_secret": imp_secret}, timeout=10
        ).json()["response"]["access_token"]
        reply = session.post(
            f"{url}/subscribe/customers/{quote(customer_uid, safe='')}",
            json={"card_number": card_number, "expiry": expiry, **fields},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        ).json()
    if reply["code"] != 0:
        raise RuntimeError(f"billing key registration failed: {reply['message']}")
    return reply["response"]


def issue_billing_key(
    url: str, card_number: str, api_secret: str = DEFAULT_API_SECRET, **fields: Any
) -> str:
    """V2's onboarding through the API: ``POST /billing-keys`` for a card; returns the key."""
    digits = "".join(ch for ch in card_number if ch.isdigit())
    credential = {"number": digits, "expiryYear": "30", "expiryMonth": "12"}
    reply = requests.post(
        f"{url}/billing-keys",
        json={"method": {"card": {"credential": credential}}, **fields},
        headers={"Authorization": f"PortOne {api_secret}"},
        timeout=10,
    )
    if reply.status_code != 200:
        raise RuntimeError(f"billing key issue failed: HTTP {reply.status_code} {reply.text[:200]}")
    return reply.json()["billingKeyInfo"]["billingKey"]
