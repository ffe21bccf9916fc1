"""Cancelling a PostgreSQL connect mid-handshake leaves nothing for the event loop to report.

The fault tests cancel workers in the middle of a write, which can cancel a pool
connect. anyio's test runner fails a test with any exception the loop's handler sees,
so a connect that leaves an unretrieved future behind fails that test at random
(``ConnectionError: unexpected connection_lost() call``, seen in CI).
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import anyio
import asyncpg
import pytest

pytestmark = pytest.mark.anyio


async def test_cancelled_connects_leave_no_unretrieved_exception(pg_url: str) -> None:
    """Connects cancelled at every point of the handshake: the loop's handler sees nothing."""
    loop = asyncio.get_running_loop()
    seen: list[Any] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx.get("exception")))
    try:
        for i in range(60):
            task = asyncio.ensure_future(asyncpg.connect(pg_url))
            await anyio.sleep((i % 30) * 0.0001)
            task.cancel()
            try:
                conn = await task
            except asyncio.CancelledError:
                pass
            else:
                await conn.close()
            gc.collect()
        await anyio.sleep(0.05)
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert seen == []
