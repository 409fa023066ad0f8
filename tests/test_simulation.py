"""``iamport-billing simulate``: the real DAGs over a simulated quarter, and scenario checks.

The quarter runs through the CLI (a child process with its own Airflow home), so this is what
a user runs; the 12-month scenario runs in .ci/run on PostgreSQL. A month on PortOne V2
(scenarios/four-weeks-v2.yaml) runs the same DAGs through a portone connection.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from iamport_billing.cli import main as cli

REPO = Path(__file__).resolve().parent.parent
SIMULATE = [sys.executable, "-m", "iamport_billing.cli", "simulate"]


@pytest.fixture(scope="module")
def quarter(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, str]:
    work = tmp_path_factory.mktemp("simulate")
    out = work / "report.json"
    done = subprocess.run(
        [*SIMULATE, str(REPO / "scenarios" / "three-months.yaml"), "--workdir", str(work),
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO, check=False,
    )  # fmt: skip
    return done.returncode, json.loads(out.read_text()) if out.exists() else {}, done.stdout


@pytest.fixture(scope="module")
def month_on_v2(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, str]:
    work = tmp_path_factory.mktemp("simulate-v2")
    out = work / "report.json"
    done = subprocess.run(
        [*SIMULATE, str(REPO / "scenarios" / "four-weeks-v2.yaml"), "--workdir", str(work),
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO, check=False,
    )  # fmt: skip
    return done.returncode, json.loads(out.read_text()) if out.exists() else {}, done.stdout


def test_a_month_on_portone_v2_violates_no_invariant(month_on_v2: tuple[int, dict, str]) -> None:
    """The zombie try is checked as it runs: had it not happened, the simulation would stop."""
    code, report, stdout = month_on_v2
    assert report, stdout
    assert report["gateway"] == "v2"
    assert report["invariants"] == dict.fromkeys(report["invariants"], 0), report["violations"]
    assert len(report["invariants"]) == 14
    assert code == 0


def test_one_token_per_task_is_reported_not_applicable_on_v2(
    month_on_v2: tuple[int, dict, str],
) -> None:
    code, report, stdout = month_on_v2
    assert "one_token_per_task" not in report["invariants"]
    assert "no access token" in report["not_applicable"]["invariants"]["one_token_per_task"]
    assert "N/A  one_token_per_task" in stdout
    assert "gateway PortOne V2" in stdout


def test_a_month_on_v2_sees_every_outcome_and_incident(month_on_v2: tuple[int, dict, str]) -> None:
    report = month_on_v2[1]
    figures, runs = report["figures"], report["runs"]
    assert figures["revenue_krw"] > 0  # paid
    assert figures["soft_declined_periods"] > figures["recovered_periods"] > 0
    assert figures["past_due"] > 0 and figures["payment_method_required"] > 0  # hard declines
    assert figures["amount_mismatch_periods"] > 0
    assert figures["refunds_asked"] > 0 and figures["refunded_krw"] > 0
    faults = runs["gateway_faults"]
    assert faults["drop_after_commit"] > 0 and faults["error"] > 0 and faults["foreign_404"] > 0
    failed_days = {r["at"][:10] for r in runs["failed"] if r["dag_id"] == "iamport_billing_daily"}
    assert "2027-01-19" in failed_days  # the outage
    assert runs["seconds_by_dag"]["iamport_billing_backfill"]["runs"] == 1


def test_v1_only_incidents_are_named_on_v2() -> None:
    from iamport_billing.simulation.scenario import load_scenario

    quarter = load_scenario(REPO / "scenarios" / "three-months.yaml")
    assert quarter.api == "v1" and quarter.not_on_this_gateway() == []
    assert quarter.with_api("v2").not_on_this_gateway() == ["2027-03-16..2027-03-16: token_status"]


def test_a_simulated_quarter_violates_no_invariant(quarter: tuple[int, dict, str]) -> None:
    code, report, stdout = quarter
    assert report, stdout
    assert report["invariants"] == dict.fromkeys(report["invariants"], 0), report["violations"]
    assert len(report["invariants"]) == 15
    assert code == 0


def test_a_simulated_quarter_sees_every_behaviour_it_was_given(
    quarter: tuple[int, dict, str],
) -> None:
    figures = quarter[1]["figures"]
    assert figures["subscriptions"] == 300 + 3 * 15
    assert figures["recovered_periods"] > 0  # soft declines paid by dunning
    assert figures["soft_declined_periods"] > figures["recovered_periods"]  # k > 7: past_due
    assert figures["past_due"] > 0 and figures["payment_method_required"] > 0
    assert figures["amount_mismatch_periods"] > 0
    assert figures["cancelled"] > 0
    assert 0.8 < figures["first_attempt_success"] < 1
    assert figures["revenue_krw"] > 300 * 9900 * 3 * 0.8
    assert figures["refunds_asked"] > 0 and figures["refunded_krw"] > 0


def test_the_outage_day_fails_its_runs_and_the_backfill_charges_them(
    quarter: tuple[int, dict, str],
) -> None:
    runs = quarter[1]["runs"]
    failed_days = {r["at"][:10] for r in runs["failed"] if r["dag_id"] == "iamport_billing_daily"}
    assert "2027-01-28" in failed_days
    assert "2027-03-10" in failed_days  # every amount broken: the plan stops
    assert runs["seconds_by_dag"]["iamport_billing_backfill"]["runs"] == 1


def test_the_report_prints_invariants_and_figures(quarter: tuple[int, dict, str]) -> None:
    stdout = quarter[2]
    assert "OK   at_most_one_charge_per_period" in stdout
    assert "recovery_rate_krw" in stdout
    assert "day 90/90" in stdout  # progress while it runs


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ("population: {subscriptons: 10}", "population: unknown key(s) ['subscriptons']"),
        ("population: {plans: [{amount: 9900, share: 0.5}]}", "shares add up to 0.5, not 1"),
        ("cards: {soft_decline: {share: 0.7}, hard_decline: {share: 0.4}}", "over 1"),
        ("incidents: [{on: 2031-01-01, outage: true}]", "outside the calendar"),
        ("incidents: [{on: 2027-01-05}]", "names no trouble"),
        ("incidents: [{on: 2027-01-05, token_status: 99}]", "token_status"),
        ("settings: {retry_schedule_days: [3, 1]}", "must rise"),
        ("calendar: {months: 0}", "calendar.months: 0 is out of range"),
        ("backfills: [{on: 2027-01-03, from: 2027-01-05}]", "from <= to < on"),
        ("population: [1, 2]", "population: expected a mapping"),
        ("api: v3", "api: expected one of ['v1', 'v2'], got 'v3'"),
        ("refunds: {share: 1.5}", "refunds.share"),
        ("incidents: [{on: 2027-01-05, broken_amount_share: 2}]", "broken_amount_share"),
        ("incidents: [{on: 2027-01-05, stalled_charge_try: 1}]", "stalled_charge_try"),
        ("settings: {clear_failed_charge_tasks: yes}", "settings.clear_failed_charge_tasks"),
        (
            "incidents: [{on: 2027-01-05, stalled_charge_try: true}]\n"
            "settings: {pending_lease_seconds: 30}",
            "stalled_charge_try needs settings.pending_lease_seconds up to 6",
        ),
    ],
)
def test_a_wrong_scenario_is_refused_with_the_key_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], scenario: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(scenario + "\n")
    assert cli(["simulate", str(path), "--workdir", str(tmp_path / "w")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # refused before anything ran


def test_a_toml_scenario_reads_like_the_yaml_one(tmp_path: Path) -> None:
    from iamport_billing.simulation.scenario import load_scenario

    toml = tmp_path / "s.toml"
    toml.write_text(
        'name = "s"\n[calendar]\nstart = 2027-03-01\nmonths = 2\n'
        "[[incidents]]\non = 2027-03-02\noutage = true\n"
    )
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text(
        "name: s\ncalendar: {start: 2027-03-01, months: 2}\n"
        "incidents: [{on: 2027-03-02, outage: true}]\n"
    )
    assert load_scenario(toml) == load_scenario(yaml_file)
    assert load_scenario(toml).calendar.end.isoformat() == "2027-04-30"


def test_compare_puts_two_retry_schedules_side_by_side(tmp_path: Path) -> None:
    """Relative paths, from another directory, as a user types them."""
    body = (
        "calendar: {{start: 2027-03-01, months: 1}}\n"
        "population: {{subscriptions: 12}}\n"
        "cards: {{soft_decline: {{share: 0.5, days: [2, 3]}}}}\n"
        "settings: {{retry_schedule_days: {days}}}\n"
    )
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("name: retry-1-3-5-7\n" + body.format(days="[1, 3, 5, 7]"))
    b.write_text("name: retry-2-4-8\n" + body.format(days="[2, 4, 8]"))
    out = tmp_path / "both.json"
    done = subprocess.run(
        [*SIMULATE, "--compare", "a.yaml", "b.yaml", "--workdir", "w", "--out", "both.json"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = json.loads(out.read_text())
    assert sorted(reports) == ["retry-1-3-5-7", "retry-2-4-8"]
    header = next(line for line in done.stdout.splitlines() if "retry-1-3-5-7" in line
                  and "retry-2-4-8" in line)  # fmt: skip
    assert header.split() == ["retry-1-3-5-7", "retry-2-4-8"]
    recovered = reports["retry-2-4-8"]["figures"]["recovered_by_retry_day"]
    assert recovered and set(recovered) <= {"day 2", "day 4", "day 8"}  # its own days only
