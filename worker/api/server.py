"""Running the read server: bind checks, TLS, and the aiohttp runner on anyio's loop."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from aiohttp import web

from ..errors import ConfigError
from .app import ServerConfig, build_app
from .reads import Reader


@dataclass(frozen=True, slots=True)
class Bind:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Bind:
        """``HOST:PORT`` or ``[IPv6]:PORT``."""
        host, sep, port = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"--bind takes HOST:PORT, got {text!r}")
        return cls(host, int(port))

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True, slots=True)
class Listen:
    """Where and how to listen: TLS with a certificate, or plain HTTP on loopback only."""

    bind: Bind
    tls: ssl.SSLContext | None

    @classmethod
    def make(cls, bind: str, *, cert: str | None, key: str | None,
             insecure_localhost: bool) -> Listen:
        where = Bind.parse(bind)
        if cert or key:
            if not (cert and key):
                raise ConfigError("TLS needs both --tls-cert and --tls-key")
            if insecure_localhost:
                raise ConfigError("choose TLS (--tls-cert/--tls-key) or --insecure-localhost")
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(Path(cert), Path(key))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load the TLS certificate/key: {exc}") from None
            return cls(where, context)
        if not insecure_localhost:
            raise ConfigError("the server serves audit data: give --tls-cert and --tls-key, or "
                              "--insecure-localhost to serve plain HTTP on a loopback address")
        if not where.loopback:
            raise ConfigError(f"--insecure-localhost binds only a loopback address "
                              f"(127.0.0.1, ::1, localhost), not {where.host!r}")
        return cls(where, None)

    def url(self, port: int) -> str:
        host = f"[{self.bind.host}]" if ":" in self.bind.host else self.bind.host
        return f"{'https' if self.tls else 'http'}://{host}:{port}"


async def serve(reader: Reader, listen: Listen, *,
                ready: Callable[[str], None] | None = None) -> None:
    """Serve until cancelled (SIGINT/SIGTERM end the command's task group)."""
    app = build_app(reader, ServerConfig(secure_cookies=listen.tls is not None))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, listen.bind.host, listen.bind.port,
                           ssl_context=listen.tls, shutdown_timeout=5)
        await site.start()
        addresses = runner.addresses
        port = int(addresses[0][1]) if addresses else listen.bind.port
        if ready is not None:
            ready(listen.url(port))
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
