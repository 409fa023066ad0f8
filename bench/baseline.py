"""The naive baseline's virtualenv and its run.

iamport-rest-client 0.9.0 pins requests==2.26.0, which Airflow 3.3 cannot share, so it lives in
its own virtualenv (by default bench/.work/baseline-venv), made on first use.
"""

from __future__ import annotations

import json
import os
import subprocess
import venv
from pathlib import Path
from typing import Any

from bench.env import BENCH

CLIENT = "iamport-rest-client==0.9.0"


def ensure_venv(root: Path) -> Path:
    """The baseline interpreter; created (with the official client) when missing."""
    python = root / "bin" / "python"
    marker = root / ".installed"
    if marker.exists() and marker.read_text() == CLIENT:
        return python
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", CLIENT],
        check=True,
    )
    marker.write_text(CLIENT)
    return python


def run_baseline(
    venv_dir: Path, work: Path, warehouse: Path, billing_date: str, sample: int, url: str,
    imp_key: str, imp_secret: str,
) -> dict[str, Any]:  # fmt: skip
    """Charge ``sample`` due rows the naive way; returns its wall and CPU time."""
    python = ensure_venv(venv_dir)
    out = work / "baseline.out.json"
    subprocess.run(
        [
            str(python), str(BENCH / "naive.py"), str(warehouse), billing_date, str(sample),
            url + "/", imp_key, str(out),
        ],
        env={**os.environ, "IAMPORT_BENCH_IMP_SECRET": imp_secret, "PYTHONPATH": ""},
        check=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    version = subprocess.run(
        [str(python), "-c", "import requests, sys; print(requests.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    result["client"] = CLIENT
    result["requests_version"] = version
    return result
