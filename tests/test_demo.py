"""`make demo` end to end: seeds, charges through Airflow, summarises; a rerun charges nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.airflow


def run_demo(root: Path, api: str = "v1") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "IAMPORT"))}
    env["IAMPORT_DEMO_ROOT"] = str(root)
    env["IAMPORT_EMULATOR_API"] = api
    return subprocess.run(
        [sys.executable, "-m", "iamport_billing.demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_demo_charges_once_then_charges_nothing_new_after_a_switch_to_portone_v2(tmp_path):
    """The second run goes through a `portone` connection to the same gateway's V2 API (the
    migration): the ledger and the gateway's history carry over, nothing is charged twice."""
    first = run_demo(tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "paid                 1,856" in first.stdout
    assert "recorded 1,962 new payments" in first.stdout
    assert "bad-zero-amount    amount 0 is not positive" in first.stdout
    second = run_demo(tmp_path, api="v2")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Nothing new was charged" in second.stdout
    assert "paid                 1,856" in second.stdout
