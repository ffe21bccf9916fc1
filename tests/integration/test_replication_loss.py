"""AUDIT_EMIT_WAIT_REPLICAS across a failover, on a private primary and replica.

The replica is paused (SIGSTOP: still connected, acknowledging nothing), the primary is
SIGKILLed and the replica promoted by hand. An emit the SDK confirmed with ``WAIT`` is on
the promoted replica; an emit made while the replica lagged is refused
(``NotReplicated``), never confirmed. The size of the loss window without ``WAIT`` is
measured by ``benchmarks/failover_loss.py``, not here.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from tests.redis_servers import ReplicaPair
from worker.emitter import AuditEmitter, make_event
from worker.errors import NotReplicated

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

STREAM = "audit:events"


class RoundRobinPool(aioredis.ConnectionPool):
    """Hands out the connection idle longest: two commands in a row go on two different
    connections (any pool may do that under concurrency; this one always does)."""

    def get_available_connection(self) -> Any:
        if len(self._available_connections) > 1:
            connection = self._available_connections.pop(0)
            self._in_use_connections.add(connection)
            return connection
        return super().get_available_connection()  # type: ignore[no-untyped-call]


def event(i: int) -> dict[str, Any]:
    return make_event("run.started", "ws_a", "wf", f"run_{i}", eventId=f"e{i}",
                      trigger={"type": "webhook", "source": "gmail"})


async def test_a_confirmed_emit_survives_the_failover(replica_pair: ReplicaPair) -> None:
    """With AUDIT_EMIT_WAIT_REPLICAS=1 every emit the SDK confirmed is on the promoted
    replica after the primary's SIGKILL; while the replica lags, emits raise
    NotReplicated (they are appended, not confirmed), even when the pool sends the WAIT
    on another connection than the XADD; without WAIT the same emit is acknowledged."""
    client = aioredis.Redis(connection_pool=RoundRobinPool.from_url(replica_pair.url("primary")))
    emitter = AuditEmitter(client, [STREAM], wait_replicas=1, wait_timeout_ms=300)
    plain = AuditEmitter(client, [STREAM])
    try:
        async with anyio.create_task_group() as tg:  # two connections in the pool
            for _ in range(2):
                tg.start_soon(client.execute_command, "PING")
        confirmed = [await emitter.emit(event(i)) for i in range(20)]
        confirmed += await emitter.emit_many([event(i) for i in range(20, 40)])
        # Every connection's writes acknowledged: a WAIT on a connection other than the
        # XADD's would now confirm at once.
        replica_pair.wait_acknowledged()
        replica_pair.pause_replica()
        for i in range(40, 43):
            with pytest.raises(NotReplicated, match="0 of 1 replicas"):
                await emitter.emit(event(i))
        with pytest.raises(NotReplicated):
            await emitter.emit_many([event(43), event(44)])
        unconfirmed = await plain.emit(event(45))  # acknowledged by the primary alone
        assert unconfirmed > confirmed[-1]
    finally:
        await client.aclose()
    replica_pair.kill_primary()
    replica_pair.resume_replica()
    replica_pair.promote()
    promoted = aioredis.Redis.from_url(replica_pair.url("replica"))
    try:
        rows: Any = await promoted.xrange(STREAM)
        held = {entry_id.decode() for entry_id, _ in rows}
        role = await promoted.execute_command("ROLE")  # type: ignore[no-untyped-call]
    finally:
        await promoted.aclose()
    assert role[0] == b"master"
    assert [i for i in confirmed if i not in held] == []
