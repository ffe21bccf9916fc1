"""Inline SVG charts and the run timeline, drawn on the server (no script, prints cleanly).

Every label is event data: it goes through :func:`markupsafe.escape` (and the pages'
control-character filter) before it is placed in the markup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from markupsafe import Markup, escape

from .text import clean

WIDTH: Final = 720
ROW: Final = 22
LABEL: Final = 220
#: Fill per status / series (colour-blind-safe palette).
COLOURS: Final = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00",
                  "#f0e442", "#999999")
STATUS: Final = {"completed": "#009e73", "failed": "#d55e00", "running": "#56b4e9"}


def _t(value: Any) -> Markup:
    return escape(clean(value))


def _svg(height: int, title: str, body: list[str]) -> Markup:
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" class="chart" '
        f'viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}">'
        f"<title>{_t(title)}</title>{''.join(body)}</svg>")


def _ms(value: float) -> str:
    return f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def timeline(nodes: Sequence[Mapping[str, Any]], run_start: datetime | None) -> Markup:
    """One bar per node execution, placed at its start and as long as its duration."""
    starts = [_when(n.get("startedAt")) for n in nodes]
    known = [s for s in starts if s is not None]
    origin = run_start or (min(known) if known else None)
    ends: list[float] = []
    for node, start in zip(nodes, starts, strict=True):
        offset = (start - origin).total_seconds() * 1000 if start and origin else 0.0
        ends.append(offset + float(node.get("durationMs") or 0))
    span = max([*ends, 1.0])
    scale = (WIDTH - LABEL - 90) / span
    body: list[str] = []
    for i, (node, start) in enumerate(zip(nodes, starts, strict=True)):
        y = 6 + i * ROW
        offset = (start - origin).total_seconds() * 1000 if start and origin else 0.0
        duration = float(node.get("durationMs") or 0)
        attempt = int(node.get("attempt") or 1)
        label = f"{node.get('nodeId')}" + (f" (attempt {attempt})" if attempt > 1 else "")
        colour = STATUS.get(str(node.get("status")), "#999999")
        x = LABEL + offset * scale
        w = max(2.0, duration * scale)
        body.append(f'<text x="{LABEL - 8}" y="{y + 14}" text-anchor="end">{_t(label)}</text>'
                    f'<rect class="bar" x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="14" '
                    f'fill="{colour}"><title>{_t(label)}: {_t(node.get("status"))}, '
                    f'{_ms(duration)}</title></rect>'
                    f'<text x="{x + w + 6:.1f}" y="{y + 14}">{_ms(duration)}</text>')
    return _svg(12 + ROW * len(nodes), "Timeline of node executions", body)


def _when(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def bars(rows: Sequence[tuple[str, float, str]], title: str, *, top: int = 12) -> Markup:
    """Horizontal bars: (label, value, value text), largest first."""
    rows = list(rows)[:top]
    most = max([r[1] for r in rows] + [1e-9])
    scale = (WIDTH - LABEL - 230) / most  # room for the value text after the longest bar
    body = []
    for i, (label, value, text) in enumerate(rows):
        y = 6 + i * ROW
        w = max(2.0, value * scale)
        body.append(f'<text x="{LABEL - 8}" y="{y + 14}" text-anchor="end">{_t(label)}</text>'
                    f'<rect x="{LABEL}" y="{y + 2}" width="{w:.1f}" height="14" '
                    f'fill="{COLOURS[0]}"/><text x="{LABEL + w + 6:.1f}" y="{y + 14}">'
                    f"{_t(text)}</text>")
    if not rows:
        body.append(f'<text x="{LABEL}" y="20">no data</text>')
    return _svg(12 + ROW * max(1, len(rows)), title, body)


def histogram(bins: Sequence[Mapping[str, Any]], title: str) -> Markup:
    """Vertical bars over the bins (``from``, ``to``, ``count``)."""
    height, base, left = 200, 170, 40
    most = max([int(b["count"]) for b in bins] + [1])
    width = min(60.0, (WIDTH - left - 20) / max(1, len(bins)))
    body = [f'<line x1="{left}" y1="{base}" x2="{WIDTH - 20}" y2="{base}" stroke="#444"/>']
    for i, b in enumerate(bins):
        h = int(b["count"]) / most * (base - 20)
        x = left + i * width
        body.append(f'<rect x="{x + 2:.1f}" y="{base - h:.1f}" width="{width - 4:.1f}" '
                    f'height="{h:.1f}" fill="{COLOURS[0]}"><title>{b["from"]:.1f}–'
                    f'{b["to"]:.1f}: {int(b["count"])}</title></rect>'
                    f'<text x="{x + width / 2:.1f}" y="{base + 16}" text-anchor="middle">'
                    f'{b["from"]:.1f}</text>'
                    f'<text x="{x + width / 2:.1f}" y="{base - h - 4:.1f}" '
                    f'text-anchor="middle">{int(b["count"])}</text>')
    return _svg(height, title, body)


def stacked_days(rows: Sequence[Mapping[str, Any]], title: str) -> Markup:
    """Errors per day, one stacked segment per error type (the five commonest named)."""
    days = sorted({str(r["day"]) for r in rows})
    totals: dict[str, int] = {}
    for r in rows:
        totals[str(r["type"])] = totals.get(str(r["type"]), 0) + int(r["count"])
    types = [t for t, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))]
    named = types[:5]
    height, base, left = 230, 170, 40
    per_day: dict[str, dict[str, int]] = {d: {} for d in days}
    for r in rows:
        kind = str(r["type"]) if str(r["type"]) in named else "other"
        per_day[str(r["day"])][kind] = per_day[str(r["day"])].get(kind, 0) + int(r["count"])
    most = max([sum(v.values()) for v in per_day.values()] + [1])
    width = min(60.0, (WIDTH - left - 20) / max(1, len(days)))
    series = [*named, *(["other"] if len(types) > 5 else [])]
    body = [f'<line x1="{left}" y1="{base}" x2="{WIDTH - 20}" y2="{base}" stroke="#444"/>']
    for i, day in enumerate(days):
        x = left + i * width
        y = float(base)
        for j, kind in enumerate(series):
            count = per_day[day].get(kind, 0)
            if not count:
                continue
            h = count / most * (base - 20)
            y -= h
            body.append(f'<rect x="{x + 2:.1f}" y="{y:.1f}" width="{max(1.0, width - 4):.1f}" '
                        f'height="{h:.1f}" fill="{COLOURS[j % len(COLOURS)]}"><title>'
                        f"{_t(day)} {_t(kind)}: {count}</title></rect>")
        if len(days) <= 16 or i % max(1, len(days) // 8) == 0:
            body.append(f'<text x="{x + width / 2:.1f}" y="{base + 16}" '
                        f'text-anchor="middle">{_t(day[5:])}</text>')
    for j, kind in enumerate(series):
        x = left + j * 130
        body.append(f'<rect x="{x}" y="{base + 30}" width="12" height="12" '
                    f'fill="{COLOURS[j % len(COLOURS)]}"/><text x="{x + 16}" y="{base + 41}">'
                    f"{_t(kind[:16])}</text>")
    if not days:
        body.append(f'<text x="{left}" y="40">no errors in the window</text>')
    return _svg(height, title, body)
