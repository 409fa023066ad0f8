"""``iamport-billing``: warehouse set-up and ledger summaries from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import date

from iamport_billing.billing_run import format_report
from iamport_billing.emulator.config import API_MODES
from iamport_billing.warehouse.ledger import SUBSCRIPTIONS, Ledger


def _ledger(conn_id: str) -> Ledger:
    return Ledger.from_conn_id(conn_id)


def warehouse_init(args: argparse.Namespace) -> int:
    """Create the subscriptions, ledger and runs tables (idempotent)."""
    with _ledger(args.conn_id) as ledger:
        ledger.init_schema()
        print(f"warehouse tables ready on connection {args.conn_id!r} ({ledger.dialect.name})")
    return 0


def ledger_summary(args: argparse.Namespace) -> int:
    """Counts and amounts by status for one billing date, and what is unsettled."""
    day = date.fromisoformat(args.billing_date)
    with _ledger(args.conn_id) as ledger:
        by_status = ledger.date_summary(day)
        unsettled = ledger.unsettled_summary()
        reasons = ledger.top_reasons(billing_date=day)
    print(
        format_report(
            {
                "billing_date": day.isoformat(),
                "by_status": by_status,
                "unsettled": unsettled,
                "top_reasons": [{"reason": r, "count": n} for r, n in reasons],
            }
        )
    )
    return 0


def subscriptions_put_back(args: argparse.Namespace) -> int:
    """After a customer registered a new card: the next daily run makes one more attempt for
    the billing date of the subscription's latest failed attempt (then never again)."""
    refused = 0
    table = None if args.no_table else args.table
    with _ledger(args.conn_id) as ledger:
        for sub in args.subscription_id:
            why_not = ledger.put_back(sub, table)
            if why_not:
                refused += 1
                print(f"{sub}: not put back: {why_not}", file=sys.stderr)
    done = len(args.subscription_id) - refused
    print(f"{done} subscription(s) put back: the next daily run charges them once more")
    return 1 if refused else 0


def simulate(args: argparse.Namespace) -> int:
    """Run the real DAGs over a simulated calendar; non-zero when an invariant is violated."""
    from pathlib import Path

    from iamport_billing.simulation import launch
    from iamport_billing.simulation.scenario import ScenarioError, load_scenario

    paths = [Path(p) for p in (args.compare or [args.scenario])]
    try:
        scenarios = [load_scenario(p) for p in paths]
    except ScenarioError as e:
        print(f"scenario refused: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or launch.DEFAULT_WORKDIR)
    reports = []
    for i, (path, scenario) in enumerate(zip(paths, scenarios, strict=True)):
        run_dir = workdir / (f"{i + 1}-{scenario.name}" if args.compare else scenario.name)
        out = Path(args.out) if args.out and not args.compare else run_dir.with_suffix(".json")
        print(f"simulating {scenario.name} ({path}) in {run_dir} ...", flush=True)
        try:
            report = launch.run_simulation(
                path, scenario, workdir=run_dir, out=out, warehouse=args.warehouse,
                months=args.months, seed=args.seed, api=args.api,
            )  # fmt: skip
        except launch.SimulationFailed as e:
            print(str(e), file=sys.stderr)
            return 3
        print(launch.format_report(report, f"{scenario.name} (report: {out})"), flush=True)
        reports.append(report)
    if args.compare:
        names = (scenarios[0].name, scenarios[1].name)
        print(launch.format_comparison(reports[0], reports[1], names))
        if args.out:
            Path(args.out).write_text(json.dumps(dict(zip(names, reports, strict=True))))
    return 1 if any(any(r["invariants"].values()) for r in reports) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iamport-billing", description=__doc__)
    groups = parser.add_subparsers(dest="group", required=True)

    warehouse = groups.add_parser("warehouse", help="warehouse tables")
    wh = warehouse.add_subparsers(dest="command", required=True)
    init = wh.add_parser("init", help="create the tables if missing")
    init.add_argument("--conn-id", default="billing_warehouse")
    init.set_defaults(func=warehouse_init)

    ledger = groups.add_parser("ledger", help="read the charge ledger")
    lg = ledger.add_subparsers(dest="command", required=True)
    summary = lg.add_parser("summary", help="outcomes of one billing date")
    summary.add_argument("--conn-id", default="billing_warehouse")
    summary.add_argument("--billing-date", required=True, help="YYYY-MM-DD")
    summary.set_defaults(func=ledger_summary)

    subs = groups.add_parser("subscriptions", help="change subscriptions as ops do")
    sb = subs.add_subparsers(dest="command", required=True)
    put_back = sb.add_parser(
        "put-back", help="a customer has a new card: charge once more on the next daily run"
    )
    put_back.add_argument("subscription_id", nargs="+")
    put_back.add_argument("--conn-id", default="billing_warehouse")
    put_back.add_argument("--table", default=SUBSCRIPTIONS)
    put_back.add_argument(
        "--no-table", action="store_true",
        help="the subscriptions table is read-only elsewhere: record the put-back only",
    )  # fmt: skip
    put_back.set_defaults(func=subscriptions_put_back)

    sim = groups.add_parser(
        "simulate", help="run the real DAGs over a simulated calendar against the emulator"
    )
    sim.add_argument(
        "scenario",
        nargs="?",
        default="scenarios/default.yaml",
        help="a scenario file (.yaml or .toml); see scenarios/",
    )
    sim.add_argument("--months", type=int, help="override the scenario's calendar length")
    sim.add_argument("--seed", type=int, help="override the scenario's random seed")
    sim.add_argument(
        "--api",
        choices=API_MODES,
        help="override the scenario's gateway: v1 (Iamport) or v2 (PortOne V2)",
    )
    sim.add_argument("--out", help="write the JSON report here")
    sim.add_argument("--workdir", help="where runs live (default .simulate/)")
    sim.add_argument(
        "--warehouse",
        help="the ledger's database as an Airflow connection URI "
        "(default: SQLite in the run directory); it must hold no ledger yet",
    )
    sim.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="simulate two scenarios and put their figures side by side",
    )
    sim.set_defaults(func=simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
