"""`audit-fleet groups` and `audit-fleet rewind` against real Redis."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from tests.helpers import read_group
from worker import constants as c
from worker.errors import AuditFleetError
from worker.groups import id_before_ms, list_groups, plan_rewind, rewind

pytestmark = [pytest.mark.redis, pytest.mark.anyio]


async def test_list_groups_finds_every_stream_and_skips_dead_letters(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """Each stream's groups with consumers, pending and lag; `<stream>:dlq` is left out."""
    for i in range(3):
        await redis_client.xadd(stream, {c.EVENT_FIELD: b"{}"}, id=f"{i + 1}-0")
    await redis_client.xgroup_create(stream, "writers", id="0")
    await redis_client.xgroup_create(stream, "archiver", id="$")
    await redis_client.xreadgroup("writers", "w1", {stream: ">"}, count=2)
    await redis_client.xadd(c.dlq_key(stream), {"reason": "x"})
    await redis_client.xgroup_create(c.dlq_key(stream), "dlq-readers", id="0")
    try:
        rows = await list_groups(redis_client, stream + "*")
    finally:
        await redis_client.delete(c.dlq_key(stream))
    assert [(r.stream, r.group, r.consumers, r.pending, r.lag, r.last_delivered_id)
            for r in rows] == [(stream, "archiver", 0, 0, 0, "3-0"),
                               (stream, "writers", 1, 2, 1, "2-0")]


async def test_rewind_to_a_time_delivers_the_later_entries_again(
    redis_client: aioredis.Redis, stream: str
) -> None:
    """Re-ingest after a store restore: rewinding to a time makes every entry appended since
    then deliverable again; a dry run (the plan) changes nothing; pending entries refuse it
    unless forced; a position after the group's own is refused."""
    for ms in (1000, 2000, 3000, 4000):
        await redis_client.xadd(stream, {c.EVENT_FIELD: b"{}"}, id=f"{ms}-0")
    await redis_client.xgroup_create(stream, "writers", id="$")

    plan = await plan_rewind(redis_client, stream, "writers", id_before_ms(2000))
    assert (plan.current_id, plan.new_id, plan.redelivered, plan.pending) == (
        "4000-0", "1999-18446744073709551615", 3, 0)
    info = await redis_client.xinfo_groups(stream)
    assert info[0]["last-delivered-id"] == b"4000-0"  # planning changed nothing

    await rewind(redis_client, plan)
    got = await read_group(redis_client, "writers", "w1", stream, 10)
    assert [e[0] for e in got] == [b"2000-0", b"3000-0", b"4000-0"]

    held = await plan_rewind(redis_client, stream, "writers", "0-0")
    assert held.pending == 3
    with pytest.raises(AuditFleetError, match="3 pending entries"):
        await rewind(redis_client, held)
    await rewind(redis_client, held, force=True)
    assert (await redis_client.xinfo_groups(stream))[0]["last-delivered-id"] == b"0-0"

    with pytest.raises(AuditFleetError, match="only moves back"):
        await plan_rewind(redis_client, stream, "writers", "5000-0")
    with pytest.raises(AuditFleetError, match="does not exist"):
        await plan_rewind(redis_client, stream, "nobody", "0-0")
