"""`make up` (iamport_billing.devserver): the local Airflow with the Billing page, stopped by
SIGTERM as by Ctrl-C, leaving no component running."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # ended, or a zombie its parent has not reaped yet
        return ""


def test_make_up_stops_everything_it_started_on_sigterm(tmp_path):
    env = {**os.environ, "IAMPORT_UP_ROOT": str(tmp_path), "IAMPORT_UP_PORT": str(_free_port())}
    up = subprocess.Popen(
        [sys.executable, "-m", "iamport_billing.devserver"], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    output: list[str] = []
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and up.stdout is not None:
            line = up.stdout.readline()
            output.append(line)
            if "Airflow is up" in line or not line:
                break
        assert "Airflow is up" in "".join(output), "".join(output)[-3000:]
        started = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(_cmdline(p) for p in started)
        assert all(c in names for c in ("scheduler", "api", "emulator")), names

        up.send_signal(signal.SIGTERM)
        assert up.wait(120) == 0
        _, alive = psutil.wait_procs(started, timeout=30)
        assert alive == []
    finally:  # nothing outlives the test, whatever failed
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                up.wait(120)
        for process in [*started, up]:
            with contextlib.suppress(psutil.Error, OSError):
                process.kill()
