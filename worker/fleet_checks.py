"""Judgements over fleet snapshots (:class:`worker.fleet.FleetStatus`): what is missing,
which thresholds are exceeded (``status --max-lag/--max-oldest-pending``), and rates between
two snapshots (``status --watch``). Pure functions, no I/O."""

from __future__ import annotations

from typing import Any

from .fleet import FleetStatus, StreamStatus


def status_problems(status: FleetStatus) -> list[str]:
    """What is missing: a stream that does not exist (or could not be read), a group asked
    for that does not."""
    problems = []
    for s in status.streams:
        if s.error is not None:
            problems.append(f"stream {s.name!r} could not be read: {s.error}")
        elif not s.exists:
            problems.append(f"stream {s.name!r} does not exist")
        for g in s.groups:
            if not g.exists:
                problems.append(f"group {g.name!r} does not exist on stream {s.name!r}")
    return problems


def rates(before: FleetStatus, after: FleetStatus) -> list[dict[str, Any]]:
    """Per stream and group between two snapshots: entries appended, delivered to the group
    and dead-lettered per second, and the lag's change per second (None where unknown)."""
    dt = (after.taken_at_ms - before.taken_at_ms) / 1000
    if dt <= 0:
        return []
    old = {s.name: s for s in before.streams}
    out = []
    for s in after.streams:
        prev = old.get(s.name)
        if prev is None:
            continue
        prev_groups = {g.name: g for g in prev.groups}
        appended = _per_s(_entries_added(prev, s), dt)
        for g in s.groups:
            pg = prev_groups.get(g.name)
            if pg is None or not g.exists or not pg.exists:
                continue
            delivered = (None if g.entries_read is None or pg.entries_read is None
                         else _per_s(g.entries_read - pg.entries_read, dt))
            lag = None if g.lag is None or pg.lag is None else _per_s(g.lag - pg.lag, dt)
            out.append({"stream": s.name, "group": g.name, "appended_per_s": appended,
                        "delivered_per_s": delivered, "lag_change_per_s": lag,
                        "dead_lettered_per_s": _per_s(s.dlq_length - prev.dlq_length, dt)})
    return out


def _entries_added(before: StreamStatus, after: StreamStatus) -> int | None:
    if before.last_id == after.last_id:
        return 0
    if not before.exists or not after.exists:
        return None
    return None if after.length < before.length else after.length - before.length


def _per_s(delta: int | None, dt: float) -> float | None:
    return None if delta is None else round(delta / dt, 1)


def threshold_breaches(
    status: FleetStatus, *, max_lag: int | None = None,
    max_oldest_pending_s: float | None = None,
) -> list[str]:
    """Groups past ``max_lag`` entries of lag or whose oldest pending entry is older than
    ``max_oldest_pending_s`` (since it was appended). A lag Redis cannot compute counts as
    past any ``max_lag``: it cannot be shown to be within it."""
    out = []
    for s in status.streams:
        for g in s.groups:
            if not g.exists:
                continue
            if max_lag is not None and (g.lag is None or g.lag > max_lag):
                lag = "unknown" if g.lag is None else str(g.lag)
                out.append(f"lag of {g.name!r} on {s.name!r} is {lag} (> {max_lag})")
            age = g.oldest_pending_age_s
            if max_oldest_pending_s is not None and age is not None \
                    and age > max_oldest_pending_s:
                out.append(f"oldest pending entry of {g.name!r} on {s.name!r} is {age:.1f} s "
                           f"old (> {max_oldest_pending_s:g} s)")
    return out
