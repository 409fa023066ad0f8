"""The emulator as the benchmark sees it: a separate process whose CPU and counters we read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests
from iamport_billing.emulator import EmulatorConfig, EmulatorProcess, start_emulator_process

TOKEN_ENDPOINT = "POST /users/getToken"
CHARGE_ENDPOINTS = ("POST /subscribe/payments/again", "POST /payments/{payment_id}/billing-key")


@dataclass
class Snapshot:
    """Emulator counters and CPU seconds at one moment; subtract two to get a stage's share."""

    requests: Counter[str]
    cpu_s: float

    def since(self, before: Snapshot) -> dict[str, Any]:
        delta = self.requests - before.requests
        return {
            "token_requests": delta.get(TOKEN_ENDPOINT, 0),
            "charge_requests": sum(delta.get(e, 0) for e in CHARGE_ENDPOINTS),
            "requests": sum(delta.values()),
            "emulator_cpu_s": round(self.cpu_s - before.cpu_s, 3),
        }


class Gateway:
    """Owns the emulator process for the whole run."""

    def __init__(
        self, db_path: Path, latency_ms: float, jitter_ms: float, log_path: Path, api: str = "v1"
    ):
        self.config = EmulatorConfig(
            db_path=str(db_path), latency_ms=latency_ms, latency_jitter_ms=jitter_ms, seed=7,
            api=api,
        )  # fmt: skip
        self.proc: EmulatorProcess = start_emulator_process(self.config, log_path=log_path)
        self.ps = psutil.Process(self.proc.pid)
        self.http = requests.Session()

    @property
    def url(self) -> str:
        return self.proc.url

    def snapshot(self) -> Snapshot:
        stats = self.http.get(f"{self.url}/__emulator__/stats", timeout=30).json()
        times = self.ps.cpu_times()
        return Snapshot(Counter(stats["requests"]), times.user + times.system)

    def set_latency(self, latency_ms: float, jitter_ms: float) -> None:
        self.http.post(
            f"{self.url}/__emulator__/faults",
            json={"latency_ms": latency_ms, "latency_jitter_ms": jitter_ms},
            timeout=30,
        ).raise_for_status()

    def stop(self) -> None:
        self.http.close()
        self.proc.stop()
