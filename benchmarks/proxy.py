"""A TCP proxy the harness controls: ``python -m benchmarks proxy --target HOST:PORT``.

Workers reach the store through it. On SIGUSR1 it *cuts*: every open connection is
aborted (the client sees a reset) and new connections are refused, as when a
database host goes away. On SIGUSR2 it *restores*: it listens again on the same port.
It prints ``listening <port>`` once ready.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from collections.abc import Sequence


class Proxy:
    def __init__(self, listen_host: str, listen_port: int, target_host: str,
                 target_port: int) -> None:
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target = (target_host, target_port)
        self.server: asyncio.Server | None = None
        self.transports: set[asyncio.StreamWriter] = set()
        self.cut_count = 0

    async def start(self) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.listen_host, self.listen_port))
        self.listen_port = sock.getsockname()[1]
        self.server = await asyncio.start_server(self._serve, sock=sock)
        return self.listen_port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.transports.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                if self.server is None:  # cut: reset, as a vanished host would
                    dst.transport.abort()
                else:
                    dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.transports.discard(writer)
            self.transports.discard(up_writer)

    def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        self.cut_count += 1
        if self.server is not None:
            self.server.close()
            self.server = None
        for w in list(self.transports):
            w.transport.abort()
        self.transports.clear()
        print("cut", flush=True)

    async def restore(self) -> None:
        if self.server is None:
            await self.start()
        print("restored", flush=True)


async def serve(listen: str, target: str) -> None:
    lhost, _, lport = listen.rpartition(":")
    thost, _, tport = target.rpartition(":")
    proxy = Proxy(lhost or "127.0.0.1", int(lport or 0), thost or "127.0.0.1", int(tport))
    port = await proxy.start()
    print(f"listening {port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, proxy.cut)
    loop.add_signal_handler(signal.SIGUSR2, lambda: loop.create_task(proxy.restore()))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    proxy.cut()


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks proxy")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--target", required=True)
    args = p.parse_args(argv)
    try:
        asyncio.run(serve(args.listen, args.target))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
