"""``python -m bench.run [--full]``: the whole benchmark in one bounded, unattended run.

One emulator process serves everything (capacity probe, baseline, charge stages, DAG runs);
each measured stage runs in a process of its own so its CPU time and RSS are its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.env import (
    BILLING_DATE,
    DEFAULT_WORK,
    REPO,
    RESULTS,
    airflow_env,
    connection_env,
    machine_info,
    migrate_airflow_db,
)


@dataclass(frozen=True)
class Scenario:
    n: int
    concurrency: int

    @property
    def tag(self) -> str:
        return f"n{self.n}c{self.concurrency}"

    @property
    def batch_size(self) -> int:
        """100 x C rows per batch (500..5000, the DAG param's range): the ramp-down at the end
        of a batch costs about one latency, under 1 % of a batch this size."""
        return min(5000, max(500, 100 * self.concurrency))


QUICK = {
    "stage": [Scenario(200, 1), Scenario(1000, 8), Scenario(10_000, 32), Scenario(10_000, 64)],
    "dag": [Scenario(10_000, 32)],
}
FULL = {
    "stage": [
        Scenario(1000, 1), Scenario(1000, 8), Scenario(10_000, 8), Scenario(1000, 32),
        Scenario(10_000, 32), Scenario(100_000, 32), Scenario(1000, 64), Scenario(10_000, 64),
        Scenario(100_000, 64),
    ],
    "dag": [Scenario(10_000, 32), Scenario(100_000, 64)],
}  # fmt: skip
MAP_CHECK = Scenario(100_000, 1)
MAP_CHECK_BATCH_SIZE = 50


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--full", action="store_true", help="N up to 100,000, C in 1, 8, 32, 64")
    p.add_argument(
        "--api", choices=("v1", "v2"), default="v1",
        help="the gateway: Iamport V1 or PortOne V2 (v2: no naive baseline and no capacity "
        "probe, both speak V1)",
    )  # fmt: skip
    p.add_argument("--latency-ms", type=float, default=100.0, help="emulator latency mean")
    p.add_argument("--jitter-ms", type=float, default=20.0, help="emulator latency sd")
    p.add_argument("--baseline-sample", type=int, default=200, help="naive charges to time")
    p.add_argument("--capacity-requests", type=int, default=3000)
    p.add_argument("--capacity-concurrency", type=int, default=64)
    p.add_argument(
        "--scenario", action="append", default=[], metavar="N:C",
        help="charge-stage scenario instead of the profile's (repeatable)",
    )  # fmt: skip
    p.add_argument("--dag", action="append", default=[], metavar="N:C", help="DAG-run scenario")
    p.add_argument("--map-check-n", type=int, default=MAP_CHECK.n, help="0 skips the check")
    p.add_argument("--profile-stage", metavar="N:C", help="py-spy record that stage (GIL samples)")
    p.add_argument(
        "--adaptive", metavar="CAP:CONFIGURED:N",
        help="only the adaptive-throttling run: emulator capped at CAP/s, the connection "
        "configured at CONFIGURED/s, N charges (see bench/adaptive.py); prints its figures",
    )  # fmt: skip
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="for --adaptive")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    p.add_argument(
        "--baseline-venv", type=Path, default=DEFAULT_WORK / "baseline-venv",
        help="virtualenv of the official client (made on first use)",
    )  # fmt: skip
    p.add_argument("--airflow-home", type=Path, help="default: WORK/airflow-home")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    return p.parse_args(argv)


def _scenarios(specs: list[str]) -> list[Scenario]:
    return [Scenario(*(int(x) for x in s.split(":"))) for s in specs]


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work: Path = args.work_dir / "run"
        self.latency_s = args.latency_ms / 1000
        profile = FULL if args.full else QUICK
        self.stages = _scenarios(args.scenario) or profile["stage"]
        self.dags = _scenarios(args.dag) if (args.scenario or args.dag) else profile["dag"]
        self.airflow_home: Path = args.airflow_home or args.work_dir / "airflow-home"
        self.env_base = {**os.environ, **airflow_env(self.airflow_home)}
        os.environ.update(self.env_base)

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from bench.gateway import Gateway
        from bench.workload import seed_billing_keys

        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        machine = machine_info()
        if self.dags:
            self.log("migrating the benchmark's Airflow metadata DB (first run only)")
            migrate_airflow_db(self.airflow_home)
        largest = max(s.n for s in [*self.stages, *self.dags, Scenario(1, 1)])
        emulator_db = self.work / "emulator.db"
        seed_billing_keys(emulator_db, max(largest, self.args.baseline_sample))
        self.gateway = Gateway(
            emulator_db, self.args.latency_ms, self.args.jitter_ms, self.work / "emulator.log",
            api=self.args.api,
        )  # fmt: skip
        v1 = self.args.api == "v1"
        profile = "custom" if self.args.scenario else "full" if self.args.full else "quick"
        try:
            results: dict[str, Any] = {
                "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "profile": profile,
                "machine": machine,
                "parameters": {
                    "latency_ms": self.args.latency_ms,
                    "jitter_ms": self.args.jitter_ms,
                    "billing_date": BILLING_DATE.isoformat(),
                    "baseline_sample": self.args.baseline_sample,
                    "warehouse": "sqlite",
                    "api": self.args.api,
                    "cards": "all paying (4242-4242-4242-4242)",
                },
                "baseline": self.baseline() if v1 and self.args.baseline_sample else None,
                "charge_stage": [self.charge_stage(s) for s in self.stages],
                "dag_runs": [self.dag_run(s) for s in self.dags],
                "map_length": self.map_length() if self.args.map_check_n else None,
            }
            results["emulator_capacity"] = self.capacity(results) if v1 else None
        finally:
            self.gateway.stop()
        from bench.report import speedup, targets

        results["speedup"] = speedup(results)
        results["targets"] = targets(results)
        return results

    def _warehouse(self, s: Scenario, tag: str) -> tuple[Path, dict[str, str]]:
        from bench.workload import make_warehouse

        path = self.work / f"warehouse-{tag}.db"
        make_warehouse(path, tag, s.n, BILLING_DATE)
        conns = connection_env(self.gateway.url, self.gateway.config, path)
        return path, {**self.env_base, **conns}

    def _ideal(self, s: Scenario) -> float:
        return s.n * self.latency_s / s.concurrency

    def charge_stage(self, s: Scenario) -> dict[str, Any]:
        from bench.stage import ledger_summary, mean_latency_ms, plan_batches, run_stage

        tag = f"stage-{s.tag}"
        warehouse, env = self._warehouse(s, tag)
        batches = plan_batches(warehouse, tag, s.batch_size)
        self.log(f"charge stage N={s.n:,} C={s.concurrency}: {len(batches)} batches")
        profile = None
        if self.args.profile_stage and _scenarios([self.args.profile_stage])[0] == s:
            profile = self.args.results_dir / f"profile-{s.tag}.txt"
        before = self.gateway.snapshot()
        m = run_stage(
            {"tag": tag, "batches": batches, "max_concurrency": s.concurrency},
            env, self.work / f"{tag}.log", profile,
        )  # fmt: skip
        em = self.gateway.snapshot().since(before)
        cpu = m["cpu_user_s"] + m["cpu_sys_s"]
        seen = mean_latency_ms(warehouse, tag)
        row = {
            "n": s.n,
            "concurrency": s.concurrency,
            "batch_size": s.batch_size,
            "batches": len(batches),
            "wall_s": round(m["wall_s"], 3),
            "ideal_s": round(self._ideal(s), 3),
            "efficiency": round(self._ideal(s) / m["wall_s"], 3),
            "charges_per_s": round(s.n / m["wall_s"], 1),
            "client_latency_ms_mean": seen,
            # Efficiency against the latency the client actually saw: what is left is ours.
            "efficiency_at_seen_latency": (
                round(s.n * seen / 1000 / s.concurrency / m["wall_s"], 3) if seen else None
            ),
            "cpu_s": round(cpu, 3),
            "cpu_user_s": round(m["cpu_user_s"], 3),
            "cpu_sys_s": round(m["cpu_sys_s"], 3),
            "cpu_ms_per_charge": round(cpu / s.n * 1000, 3),
            "cpu_s_per_1000_charges": round(cpu / s.n * 1000, 3),
            "context_switches": m["context_switches"],
            "emulator_cpu_s": em["emulator_cpu_s"],
            "emulator_cpu_ms_per_charge": round(em["emulator_cpu_s"] / s.n * 1000, 3),
            "peak_rss_mb": round(m["peak_rss_mb"], 1),
            "rss_after_import_mb": round(m["rss_after_import_mb"], 1),
            "token_requests": em["token_requests"],
            "charge_requests": em["charge_requests"],
            "outcomes": m["outcomes"],
            "ledger": ledger_summary(warehouse, tag),
            "profile": str(profile) if profile else None,
        }
        self.log(
            f"  {row['wall_s']:.1f} s (ideal {row['ideal_s']:.1f}), efficiency "
            f"{row['efficiency']:.3f} (at the seen {seen} ms: "
            f"{row['efficiency_at_seen_latency']}), {row['cpu_ms_per_charge']:.3f} ms CPU/charge, "
            f"RSS {row['peak_rss_mb']:.0f} MB, getToken {row['token_requests']}"
        )
        warehouse.unlink(missing_ok=True)
        return row

    def dag_run(self, s: Scenario) -> dict[str, Any]:
        from bench.dagrun import run_dag
        from bench.stage import ledger_summary

        tag = f"dag-{s.tag}"
        warehouse, env = self._warehouse(s, tag)
        self.log(f"DAG run N={s.n:,} C={s.concurrency} batch_size={s.batch_size}")
        before = self.gateway.snapshot()
        m = run_dag(
            {"batch_size": s.batch_size, "max_concurrency": s.concurrency},
            env, self.work / f"{tag}.log",
        )  # fmt: skip
        em = self.gateway.snapshot().since(before)
        row = {
            "n": s.n,
            "concurrency": s.concurrency,
            "batch_size": s.batch_size,
            "charge_tasks": m["charge_tasks"],
            "wall_s": round(m["wall_s"], 3),
            "ideal_s": round(self._ideal(s), 3),
            "dag_parse_s": round(m["dag_parse_s"], 3),
            "cpu_s": round(m["cpu_s"], 3),
            "cpu_ms_per_charge": round(m["cpu_s"] / s.n * 1000, 3),
            "emulator_cpu_s": em["emulator_cpu_s"],
            "peak_rss_mb": round(m["peak_rss_mb"], 1),
            "state": m["state"].rsplit(".", 1)[-1].lower(),
            "task_states": m["task_states"],
            "token_requests": em["token_requests"],
            "charge_requests": em["charge_requests"],
            "ledger": ledger_summary(warehouse, m["run_id"]),
        }
        self.log(
            f"  {row['wall_s']:.1f} s (ideal {row['ideal_s']:.1f}), {row['charge_tasks']} "
            f"charge tasks, state {row['state']}, getToken {row['token_requests']}"
        )
        warehouse.unlink(missing_ok=True)
        return row

    def baseline(self) -> dict[str, Any]:
        from bench.baseline import run_baseline

        sample = self.args.baseline_sample
        warehouse, _ = self._warehouse(Scenario(sample, 1), "naive")
        self.log(f"naive baseline: {sample} charges with iamport-rest-client")
        before = self.gateway.snapshot()
        cfg = self.gateway.config
        m = run_baseline(
            self.args.baseline_venv, self.work, warehouse, BILLING_DATE.isoformat(), sample,
            self.gateway.url, cfg.imp_key, cfg.imp_secret,
        )  # fmt: skip
        em = self.gateway.snapshot().since(before)
        rate = m["charges"] / m["wall_s"]
        m.update(
            charges_per_s=round(rate, 3),
            cpu_ms_per_charge=round(m["cpu_s"] / m["charges"] * 1000, 3),
            extrapolated_100k_h=round(100_000 / rate / 3600, 2),
            extrapolated=True,
            token_requests=em["token_requests"],
            charge_requests=em["charge_requests"],
        )
        self.log(f"  {rate:.2f} charges/s, getToken {em['token_requests']}")
        warehouse.unlink(missing_ok=True)
        return m

    def map_length(self) -> dict[str, Any]:
        from bench.stage import plan_batches

        s = Scenario(self.args.map_check_n, 1)
        warehouse, _ = self._warehouse(s, "map")
        started = time.perf_counter()
        batches = plan_batches(warehouse, "map", MAP_CHECK_BATCH_SIZE)
        warehouse.unlink(missing_ok=True)
        return {
            "n": s.n,
            "batch_size": MAP_CHECK_BATCH_SIZE,
            "batches": len(batches),
            "largest_batch": max(b["count"] for b in batches),
            "plan_s": round(time.perf_counter() - started, 2),
        }

    def capacity(self, results: dict[str, Any]) -> dict[str, Any]:
        from bench.capacity import measure_capacity
        from bench.workload import customer_uid

        self.log("emulator capacity with no added latency")
        self.gateway.set_latency(0, 0)
        before = self.gateway.snapshot()
        cfg = self.gateway.config
        m = measure_capacity(
            self.gateway.url, cfg.imp_key, cfg.imp_secret, customer_uid(0),
            total=self.args.capacity_requests, concurrency=self.args.capacity_concurrency,
        )  # fmt: skip
        em = self.gateway.snapshot().since(before)
        self.gateway.set_latency(self.args.latency_ms, self.args.jitter_ms)
        stages = results["charge_stage"]
        top = max(stages, key=lambda r: r["charges_per_s"], default=None)
        offered = max((s.concurrency for s in self.stages), default=0) / self.latency_s
        m.update(
            emulator_cpu_ms_per_charge=round(em["emulator_cpu_s"] / m["requests"] * 1000, 3),
            highest_offered_rate=round(offered, 1),
            headroom_over_offered=round(m["requests_per_s"] / offered, 2) if offered else None,
            highest_tested_rate=top["charges_per_s"] if top else None,
            # Client and emulator share the machine's cores: what both burn at that rate.
            cores_used_at_highest_rate=(
                round(
                    (top["cpu_ms_per_charge"] + top["emulator_cpu_ms_per_charge"])
                    * top["charges_per_s"] / 1000, 2,
                )
                if top else None
            ),
        )  # fmt: skip
        self.log(
            f"  {m['requests_per_s']:.0f} charges/s, {m['headroom_over_offered']}x the highest "
            f"offered rate ({offered:.0f}/s)"
        )
        return m


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bench = Bench(args)
    if args.adaptive:
        from bench.adaptive import run_alone

        figures = run_alone(args.work_dir / "adaptive", args.adaptive, args.redis_url)
        print(json.dumps(figures, indent=2))
        return
    started = time.perf_counter()
    results = bench.run()
    results["bench_wall_s"] = round(time.perf_counter() - started, 1)
    from bench.report import update_markdown, write_results

    dated = write_results(results, args.results_dir)
    update_markdown(args.markdown, results)
    bench.log(f"done in {results['bench_wall_s']:.0f} s: {dated} and {args.markdown}")
    for t in results["targets"]:
        met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        bench.log(f"  {met:6} {t['target']}: {t['measured']} (wanted {t['wanted']})")


if __name__ == "__main__":
    main()
