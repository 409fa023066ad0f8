"""Targets and the written record: ``results/<date>.json``, ``latest.json`` and BENCHMARKS.md.

BENCHMARKS.md keeps hand-written notes (profiling, before/after) outside the generated block;
a run replaces only what lies between the two markers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BEGIN = "<!-- bench:generated:begin -->"
END = "<!-- bench:generated:end -->"
FLAT_RSS_TOLERANCE = 0.10  # "flat": at most 10 % more peak RSS at 100,000 than at 10,000


def _find(rows: list[dict[str, Any]], n: int, c: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["n"] == n and r["concurrency"] == c), None)


def _largest(rows: list[dict[str, Any]], c: int) -> dict[str, Any] | None:
    at_c = [r for r in rows if r["concurrency"] == c]
    return max(at_c, key=lambda r: r["n"]) if at_c else None


def _target(name: str, wanted: str, measured: Any, met: bool | None) -> dict[str, Any]:
    return {"target": name, "wanted": wanted, "measured": measured, "met": met}


def speedup(results: dict[str, Any]) -> dict[str, Any] | None:
    """Our charge rate at C=32 (largest N run) over the baseline's extrapolated rate."""
    ours = _largest(results["charge_stage"], 32)
    base = results.get("baseline")
    if not ours or not base:
        return None
    return {
        "n": ours["n"],
        "ours_charges_per_s": ours["charges_per_s"],
        "baseline_charges_per_s": base["charges_per_s"],
        "speedup": round(ours["charges_per_s"] / base["charges_per_s"], 1),
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 6 with what was measured; met is None when this run cannot tell."""
    stage, dags = results["charge_stage"], results["dag_runs"]
    out = []
    ref = _find(stage, 10_000, 32)
    out.append(
        _target(
            "charge-stage efficiency at N=10,000, C=32",
            ">= 0.85",
            ref["efficiency"] if ref else None,
            ref["efficiency"] >= 0.85 if ref else None,
        )  # fmt: skip
    )
    for d in dags:
        limit = round(1.3 * d["ideal_s"] + 30, 1)
        out.append(
            _target(
                f"whole DAG run at N={d['n']:,}, C={d['concurrency']}",
                f"<= 1.3 x ideal + 30 s = {limit} s",
                round(d["wall_s"], 1),
                d["wall_s"] <= limit,
            )  # fmt: skip
        )
    sp = results.get("speedup")
    out.append(
        _target(
            "speedup over the naive baseline at C=32",
            ">= 25x",
            sp["speedup"] if sp else None,
            sp["speedup"] >= 25 if sp else None,
        )  # fmt: skip
    )
    big = [r for r in stage if r["n"] >= 10_000]
    worst_cpu = max((r["cpu_ms_per_charge"] for r in big), default=None)
    out.append(
        _target(
            "our CPU per charge (worst run with N >= 10,000)",
            "<= 1.5 ms",
            worst_cpu,
            worst_cpu <= 1.5 if worst_cpu is not None else None,
        )  # fmt: skip
    )
    peak = max((r["peak_rss_mb"] for r in stage), default=None)
    out.append(
        _target(
            "peak RSS of a charge task", "< 250 MB", peak, peak < 250 if peak is not None else None
        )
    )
    pairs = [(_find(stage, 10_000, r["concurrency"]), r) for r in stage if r["n"] == 100_000]
    pairs = [(a, b) for a, b in pairs if a]
    growth = max((b["peak_rss_mb"] / a["peak_rss_mb"] - 1 for a, b in pairs), default=None)
    out.append(
        _target(
            "peak RSS flat from N=10,000 to N=100,000",
            f"<= +{FLAT_RSS_TOLERANCE:.0%}",
            f"{growth:+.1%}" if growth is not None else "not run (use --full)",
            growth <= FLAT_RSS_TOLERANCE if growth is not None else None,
        )  # fmt: skip
    )
    ml = results.get("map_length")
    out.append(
        _target(
            f"N={ml['n']:,} fits Airflow's map length (batch_size={ml['batch_size']})"
            if ml
            else "map length",
            "<= 1024 mapped charge tasks",
            ml["batches"] if ml else None,
            ml["batches"] <= 1024 if ml else None,
        )  # fmt: skip
    )
    tokens = [r["token_requests"] for r in stage] + [d["token_requests"] for d in dags]
    out.append(
        _target(
            "getToken calls per charging process (each ran < 30 min)",
            "1",
            max(tokens, default=None),
            max(tokens, default=0) == 1 if tokens else None,
        )  # fmt: skip
    )
    return out


def write_results(results: dict[str, Any], out_dir: Path) -> Path:
    """``<date>.json`` (one per day, the latest run of the day) and ``latest.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    dated = out_dir / f"{results['generated_at'][:10]}.json"
    dated.write_text(text)
    (out_dir / "latest.json").write_text(text)
    return dated


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_markdown(results: dict[str, Any]) -> str:
    """The generated block of BENCHMARKS.md."""
    p, m = results["parameters"], results["machine"]
    lines = [
        BEGIN,
        f"## Latest run: {results['generated_at']} ({results['profile']} profile)",
        "",
        f"Machine: {m['cpu_model'] or 'unknown CPU'}, {m['logical_cpus']} logical CPUs, "
        f"{m['memory_gb']} GB, Python {m['python']}, load average at start "
        f"{m['load_average_at_start']}, commit {m['git_commit']}.",
        f"Emulator: separate process, latency mean {p['latency_ms']} ms, jitter (sd) "
        f"{p['jitter_ms']} ms; SQLite warehouse; every card pays. Ideal time = N x L / C with "
        f"L = {p['latency_ms']} ms.",
        "",
        "### Charge stage (ChargeAgainOperator over the plan's batches, one process)",
        "",
        "| N | C | batch size x batches | wall s | ideal s | efficiency | seen latency ms "
        "(efficiency at it) | charges/s | our CPU ms/charge (user+sys) | emulator CPU ms/charge "
        "| peak RSS MB | getToken |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["charge_stage"]:
        lines.append(
            f"| {r['n']:,} | {r['concurrency']} | {r['batch_size']:,} x {r['batches']} "
            f"| {r['wall_s']:.1f} | {r['ideal_s']:.1f} | {r['efficiency']:.3f} "
            f"| {_fmt(r['client_latency_ms_mean'])} ({_fmt(r['efficiency_at_seen_latency'])}) "
            f"| {r['charges_per_s']:.1f} | {r['cpu_ms_per_charge']:.3f} "
            f"| {r['emulator_cpu_ms_per_charge']:.3f} | {r['peak_rss_mb']:.0f} "
            f"| {r['token_requests']} |"
        )
    lines += [
        "",
        "### Whole DAG run (`dag.test()` of iamport_billing_daily)",
        "",
        "dag.test runs the mapped charge tasks one after another in one process, so the",
        "concurrency is within a batch; the batch size is chosen so each batch keeps C charges",
        "in flight for a long time (see the batch size column).",
        "",
        "| N | C | batch size | charge tasks | wall s | ideal s | wall / ideal | fixed overhead s "
        "| process CPU ms/charge | state |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for d in results["dag_runs"]:
        lines.append(
            f"| {d['n']:,} | {d['concurrency']} | {d['batch_size']:,} | {d['charge_tasks']} "
            f"| {d['wall_s']:.1f} | {d['ideal_s']:.1f} | {d['wall_s'] / d['ideal_s']:.2f} "
            f"| {d['wall_s'] - d['ideal_s']:.1f} | {d['cpu_ms_per_charge']:.3f} | {d['state']} |"
        )
    b = results.get("baseline")
    cap = results.get("emulator_capacity")
    sp = results.get("speedup")
    lines += ["", "### Naive baseline and the emulator's capacity", ""]
    if b:
        lines.append(
            f"- Baseline ({b['client']}, requests {b['requests_version']}, "
            f"`Iamport.pay_again` in a sequential loop, a getToken before every call): "
            f"{b['charges']} charges in {b['wall_s']:.1f} s = {b['charges_per_s']:.2f} charges/s "
            f"({b['cpu_ms_per_charge']:.2f} ms CPU each). Extrapolated (a sample, not a full "
            f"run): 100,000 charges would take {b['extrapolated_100k_h']:.1f} h; its getToken "
            f"calls: {b['token_requests']}."
        )
    if sp:
        lines.append(
            f"- Speedup at C=32 (N={sp['n']:,}): {sp['ours_charges_per_s']:.1f} / "
            f"{sp['baseline_charges_per_s']:.2f} charges/s = **{sp['speedup']}x**."
        )
    if cap:
        lines.append(
            f"- Emulator capacity (no added latency, C={cap['concurrency']}, "
            f"{cap['requests']:,} charges, its own CPU {cap['emulator_cpu_ms_per_charge']:.2f} ms "
            f"each): {cap['requests_per_s']:,.0f} charges/s, {cap['headroom_over_offered']}x "
            f"the highest rate offered (max C / L = {cap['highest_offered_rate']:,.0f}/s). It "
            f"shares the machine's {m['logical_cpus']} CPUs with our client: at the highest rate "
            f"reached ({cap['highest_tested_rate']:,.0f}/s) the two burn "
            f"{cap['cores_used_at_highest_rate']} CPUs together, so on a small machine the "
            "latency the client sees stretches (seen latency column) before the emulator's own "
            "capacity is reached."
        )
    ml = results.get("map_length")
    if ml:
        lines.append(
            f"- Map length: N={ml['n']:,} planned with batch_size={ml['batch_size']} gives "
            f"{ml['batches']} mapped charge tasks (plan_run merges neighbours to stay <= 1024)."
        )
    lines += ["", "### Targets", "", "| target | wanted | measured | met |", "|---|---|---|---|"]
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['wanted']} | {_fmt(t['measured'])} | {met} |")
    lines += ["", END]
    return "\n".join(lines)


PREAMBLE = """# Benchmarks

How close a billing run comes to the physical limit (N x latency / concurrency), beside the
naive loop a team would otherwise write. Reproduce:

    make bench        # quick profile, a few minutes
    make bench-full   # N up to 100,000 and C in 1, 8, 32, 64 (about 20 minutes)
    .venv/bin/python -m bench.run --help   # latency, jitter, baseline sample, work dir

Figures land in `bench/results/<date>.json` and `bench/results/latest.json`; the block below is
regenerated by every run. Run it on a quiet machine: other processes on the same cores show up
as lost efficiency and extra CPU.
"""


def update_markdown(path: Path, results: dict[str, Any]) -> None:
    """Replace the generated block; keep everything else (notes) as written."""
    block = render_markdown(results)
    text = path.read_text() if path.exists() else PREAMBLE + "\n" + BEGIN + "\n" + END + "\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(head + block + tail)
