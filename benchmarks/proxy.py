"""A TCP proxy the harness controls: ``python -m benchmarks proxy --target HOST:PORT``.

Workers reach the store through it. On SIGUSR1 it *cuts*: every open connection is
reset and new connections are refused, as when a database host goes away. On SIGUSR2
it *restores*: it listens again on the same port. It prints ``listening <port>`` once
ready. The proxy itself is the tests' :class:`tests.helpers.TcpProxy` (``vanish`` mode),
run in a process of its own.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

import anyio

from tests.helpers import TcpProxy


async def serve(listen: str, target: str) -> None:
    lhost, _, lport = listen.rpartition(":")
    thost, _, tport = target.rpartition(":")
    async with TcpProxy(thost or "127.0.0.1", int(tport), host=lhost or "127.0.0.1",
                        port=int(lport or 0), vanish=True) as proxy:
        print(f"listening {proxy.port}", flush=True)
        with anyio.open_signal_receiver(signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM,
                                        signal.SIGINT) as signals:
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    await proxy.set_cut(True)
                    print("cut", flush=True)
                elif signum == signal.SIGUSR2:
                    await proxy.set_cut(False)
                    print("restored", flush=True)
                else:
                    break
        await proxy.set_cut(True)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks proxy")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--target", required=True)
    args = p.parse_args(argv)
    try:
        anyio.run(serve, args.listen, args.target)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
