"""Geometry of the 30-day chart: amount paid as bars, decline rate as a line, in plain SVG.

Pure arithmetic (no markup) so it is testable alone; the template draws the shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date

WIDTH, HEIGHT = 760, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 48, 12, 28


@dataclass(frozen=True)
class ChartPoint:
    billing_date: date
    amount_paid: int
    decline_rate: float | None


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str


@dataclass
class Chart:
    width: int = WIDTH
    height: int = HEIGHT
    bars: list[Bar] = field(default_factory=list)
    # The decline-rate line, one polyline per run of consecutive days with a rate: a day
    # without data is a gap, never a segment drawn across it.
    lines: list[str] = field(default_factory=list)
    dots: list[tuple[float, float, str]] = field(default_factory=list)
    x_labels: list[tuple[float, str]] = field(default_factory=list)
    amount_ticks: list[tuple[float, str]] = field(default_factory=list)
    rate_ticks: list[tuple[float, str]] = field(default_factory=list)
    plot: tuple[float, float, float, float] = (LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM)


def nice_ceiling(value: float) -> float:
    """The next 1/2/5 x 10^n at or above ``value`` (axis maximum)."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** (len(str(int(value))) - 1)
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return float(step * magnitude)
    return float(10 * magnitude)


def short_amount(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:g}M"
    if value >= 1_000:
        return f"{value / 1_000:g}k"
    return f"{value:g}"


def build_chart(points: Sequence[ChartPoint]) -> Chart:
    """Oldest date on the left, one slot per calendar day (a day without data stays empty).
    Amounts share the left axis, decline rate (0-100%) the right."""
    chart = Chart()
    x0, y0, x1, y1 = chart.plot
    if not points:
        return chart
    top_amount = nice_ceiling(max(p.amount_paid for p in points))
    top_rate = max(0.1, nice_ceiling(max((p.decline_rate or 0.0) * 100 for p in points)) / 100)
    first = min(p.billing_date for p in points)
    days = (max(p.billing_date for p in points) - first).days + 1
    slot = (x1 - x0) / days
    line: list[str] = []
    previous: date | None = None
    every = max(1, len(points) // 8)
    bar_width = min(slot * 0.7, 36.0)
    for i, p in enumerate(points):
        cx = x0 + slot * ((p.billing_date - first).days + 0.5)
        height = (y1 - y0) * p.amount_paid / top_amount
        chart.bars.append(
            Bar(
                x=round(cx - bar_width / 2, 1),
                y=round(y1 - height, 1),
                width=round(bar_width, 1),
                height=round(height, 1),
                label=f"{p.billing_date.isoformat()}: {p.amount_paid:,} KRW paid",
            )
        )
        gap = previous is not None and (p.billing_date - previous).days > 1
        if p.decline_rate is None or gap:
            _end_line(chart, line)
        previous = p.billing_date
        if p.decline_rate is not None:
            cy = round(y1 - (y1 - y0) * min(p.decline_rate / top_rate, 1.0), 1)
            line.append(f"{round(cx, 1)},{cy}")
            chart.dots.append(
                (round(cx, 1), cy, f"{p.billing_date.isoformat()}: {p.decline_rate:.1%} declined")
            )
        if i % every == 0 or i == len(points) - 1:
            chart.x_labels.append((round(cx, 1), p.billing_date.strftime("%m-%d")))
    _end_line(chart, line)
    for k in range(5):
        y = round(y1 - (y1 - y0) * k / 4, 1)
        chart.amount_ticks.append((y, short_amount(top_amount * k / 4)))
        chart.rate_ticks.append((y, f"{top_rate * k / 4 * 100:g}%"))
    return chart


def _end_line(chart: Chart, line: list[str]) -> None:
    if line:
        chart.lines.append(" ".join(line))
        line.clear()
