"""Consumer groups as an operator sees them: list every group, rewind one (re-ingest).

:func:`list_groups` finds every stream (``SCAN … TYPE stream``, dead-letter streams left
out) and its groups, like ``kafka-consumer-groups --list``. :func:`plan_rewind` and
:func:`rewind` move a group's last-delivered ID back to a time or an ID with ``XGROUP
SETID``, so the entries after it are delivered again: after restoring the store from a
backup, rewind to the backup's time and the fleet writes everything since then again
(idempotent: what the backup already held is merged, not duplicated).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from . import constants as c
from .errors import AuditFleetError
from .fleet import parse_id, text

#: A dry run counts the entries to deliver again up to this many.
COUNT_LIMIT = 100_000


@dataclass(frozen=True, slots=True)
class GroupRow:
    stream: str
    group: str
    consumers: int
    pending: int
    lag: int | None
    last_delivered_id: str


async def list_groups(redis: aioredis.Redis, match: str = "*") -> list[GroupRow]:
    """Every consumer group of every stream whose name matches ``match`` (dead letters out)."""
    streams = sorted({
        text(k) async for k in redis.scan_iter(match=match, count=1000, _type="stream")
        if not text(k).endswith(c.DLQ_SUFFIX)
    })
    rows = []
    for stream in streams:
        for g in await redis.xinfo_groups(stream):
            lag = g.get("lag")
            rows.append(GroupRow(stream, text(g["name"]), int(g["consumers"]),
                                 int(g["pending"]), int(lag) if lag is not None else None,
                                 text(g["last-delivered-id"])))
    return rows


@dataclass(frozen=True, slots=True)
class RewindPlan:
    stream: str
    group: str
    current_id: str
    new_id: str
    pending: int
    #: Entries after ``new_id`` up to the current position (capped at COUNT_LIMIT).
    redelivered: int


def id_before_ms(ms: int) -> str:
    """The greatest entry ID before millisecond ``ms``: entries from ``ms`` on come after it."""
    return "0-0" if ms <= 0 else f"{ms - 1}-{2**64 - 1}"


async def plan_rewind(
    redis: aioredis.Redis, stream: str, group: str, new_id: str
) -> RewindPlan:
    """What :func:`rewind` would do: refuses a stream or group that does not exist and a
    position after the group's current one (that would skip entries, not re-ingest)."""
    try:
        groups = await redis.xinfo_groups(stream)
    except Exception as exc:
        raise AuditFleetError(f"stream {stream!r} does not exist") from exc
    info = next((g for g in groups if text(g["name"]) == group), None)
    if info is None:
        raise AuditFleetError(f"group {group!r} does not exist on stream {stream!r}")
    current = text(info["last-delivered-id"])
    if parse_id(new_id) > parse_id(current):
        raise AuditFleetError(f"{new_id} is after the group's position {current}: a rewind only "
                              "moves back (to skip entries, use XGROUP SETID yourself)")
    later = await redis.xrange(stream, min=f"({new_id}", max=current, count=COUNT_LIMIT)
    return RewindPlan(stream, group, current, new_id, int(info["pending"]), len(later or []))


async def rewind(redis: aioredis.Redis, plan: RewindPlan, *, force: bool = False) -> None:
    """Move the group back. With entries pending (held by consumers) it refuses unless
    ``force``: those stay pending and are delivered again by reclaim as well."""
    if plan.pending and not force:
        raise AuditFleetError(
            f"group {plan.group!r} has {plan.pending} pending entries held by consumers: stop "
            "the workers (or wait until they are acknowledged), or pass --force")
    await redis.xgroup_setid(plan.stream, plan.group, plan.new_id)
