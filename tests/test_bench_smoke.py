"""The benchmark harness end to end on a tiny workload (N=50): figures exist and agree.

Timings are not asserted (speed is what the benchmark itself reports); consistency is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.airflow

N, C, SAMPLE = 50, 8, 5


@pytest.fixture(scope="module")
def bench_run(airflow_db, tmp_path_factory):
    """One tiny run of ``python -m bench.run`` into a temporary results dir."""
    out = tmp_path_factory.mktemp("bench")
    subprocess.run(
        [
            sys.executable, "-m", "bench.run", "--scenario", f"{N}:{C}", "--dag", f"{N}:{C}",
            "--baseline-sample", str(SAMPLE), "--capacity-requests", "200",
            "--map-check-n", "3000", "--latency-ms", "5", "--jitter-ms", "1",
            "--work-dir", str(out / "work"), "--airflow-home", str(airflow_db),
            "--results-dir", str(out / "results"), "--markdown", str(out / "BENCHMARKS.md"),
        ],
        cwd=REPO, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def results(bench_run):
    return json.loads((bench_run / "results" / "latest.json").read_text())


def test_latest_and_dated_results_are_the_same_run(bench_run, results):
    dated = bench_run / "results" / f"{results['generated_at'][:10]}.json"
    assert json.loads(dated.read_text()) == results


def test_charge_stage_pays_every_due_subscription_once(results):
    (stage,) = results["charge_stage"]
    assert stage["outcomes"] == {"paid": N}
    assert stage["ledger"] == {"paid": {"count": N, "amount": N * 9_900}}
    assert stage["charge_requests"] == N


def test_charging_processes_ask_for_one_token(results):
    (stage,) = results["charge_stage"]
    (dag,) = results["dag_runs"]
    assert (stage["token_requests"], dag["token_requests"]) == (1, 1)


def test_dag_run_succeeds_and_pays_every_due_subscription(results):
    (dag,) = results["dag_runs"]
    assert dag["state"] == "success"
    assert dag["charge_tasks"] == 1
    assert dag["ledger"]["paid"]["count"] == N
    assert dag["charge_requests"] == N


def test_baseline_charges_its_sample_with_a_token_per_charge(results):
    baseline = results["baseline"]
    assert (baseline["charges"], baseline["paid"]) == (SAMPLE, SAMPLE)
    assert baseline["token_requests"] == SAMPLE
    assert baseline["requests_version"] == "2.26.0"


def test_derived_figures_agree_with_the_measurements(results):
    (stage,) = results["charge_stage"]
    assert stage["ideal_s"] == pytest.approx(N * 0.005 / C, abs=1e-3)
    assert stage["efficiency"] == pytest.approx(stage["ideal_s"] / stage["wall_s"], rel=0.02)
    assert stage["cpu_ms_per_charge"] == pytest.approx(stage["cpu_s"] / N * 1000, rel=0.01)
    assert results["map_length"]["batches"] == 60


def test_every_target_is_reported(results):
    names = [t["target"] for t in results["targets"]]
    assert len(names) == 7 + len(results["dag_runs"])
    assert all(t["met"] in (True, False, None) for t in results["targets"])


def test_markdown_holds_the_generated_tables(bench_run, results):
    text = (bench_run / "BENCHMARKS.md").read_text()
    assert "<!-- bench:generated:begin -->" in text and "<!-- bench:generated:end -->" in text
    assert f"| {N} | {C} | 800 x 1 |" in text
    assert results["generated_at"] in text
