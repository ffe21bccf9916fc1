"""The one TCP fault proxy (tests/helpers.py TcpProxy), which the benchmarks' outage
scenario also runs (benchmarks/proxy.py): bytes pass; a cut closes or, as a vanished
host, resets and refuses; a restore listens again on the same port."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest

from tests.helpers import TcpProxy

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    """A local echo server: its port."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)

    async def handle(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            with contextlib.suppress(anyio.BrokenResourceError):  # reset by a vanish cut
                async for chunk in conn:
                    await conn.send(chunk)

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield int(listener.extra(anyio.abc.SocketAttribute.local_port))
        tg.cancel_scope.cancel()


async def _round_trip(port: int) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(b"ping")
        with anyio.fail_after(5):
            return await conn.receive()


async def test_a_cut_closes_and_a_restore_lets_bytes_pass() -> None:
    """The tests' cut: open connections are closed, new ones closed at once."""
    async with echo_server() as echo, TcpProxy("127.0.0.1", echo) as proxy:
        assert await _round_trip(proxy.port) == b"ping"
        conn = await anyio.connect_tcp("127.0.0.1", proxy.port)
        await conn.send(b"x")
        assert await conn.receive() == b"x"
        await proxy.set_cut(True)
        with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError,
                                                  ConnectionError)):
            await conn.receive()
        await conn.aclose()
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError)):
            await _round_trip(proxy.port)
        await proxy.set_cut(False)
        assert await _round_trip(proxy.port) == b"ping"


async def test_a_vanished_host_resets_refuses_then_listens_on_the_same_port() -> None:
    """The benchmarks' cut (``vanish``): open connections are reset, new ones refused
    (nothing listens); a restore listens again on the same port."""
    async with echo_server() as echo, TcpProxy("127.0.0.1", echo, vanish=True) as proxy:
        port = proxy.port
        conn = await anyio.connect_tcp("127.0.0.1", port)
        await conn.send(b"x")
        assert await conn.receive() == b"x"
        await proxy.set_cut(True)
        with anyio.fail_after(5), pytest.raises((anyio.BrokenResourceError,
                                                  ConnectionResetError)):
            await conn.receive()
        await conn.aclose()
        with pytest.raises(OSError, match="connection attempts failed"):
            await anyio.connect_tcp("127.0.0.1", port)
        await proxy.set_cut(False)
        assert proxy.port == port
        assert await _round_trip(port) == b"ping"
