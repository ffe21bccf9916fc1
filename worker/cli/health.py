"""``audit-fleet health``: an exit code for supervisors."""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from ..settings import Settings


def check(url: str, *, ready: bool = False, timeout_s: float = 3.0) -> tuple[int, str]:
    """GET ``/healthz`` (and ``/readyz`` if ``ready``) under ``url``: (exit code, message).

    Exit code 0 when every endpoint answers 200, 1 otherwise (including no answer).
    """
    base = url.rstrip("/")
    paths = ["/healthz", "/readyz"] if ready else ["/healthz"]
    messages = []
    code = 0
    for path in paths:
        try:
            with urllib.request.urlopen(base + path, timeout=timeout_s) as response:
                body = response.read().decode("utf-8", "replace").strip()
                messages.append(f"{path} {response.status} {body}")
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", "replace").strip()
            messages.append(f"{path} {exc.code} {body}")
            code = 1
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            messages.append(f"{path} unreachable: {reason}")
            code = 1
    return code, "\n".join(messages)


def default_url(settings: Settings) -> str:
    host = settings.metrics_host
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.metrics_port}"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``audit-fleet health``: exit 0 if the local worker is healthy (and ready)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "health", help="check a running worker's /healthz (and /readyz): exit code 0 or 1",
        description="For systemd, Procfile platforms and container health checks.",
    )
    p.add_argument("--url", help="worker base URL (default http://127.0.0.1:$AUDIT_METRICS_PORT)")
    p.add_argument("--ready", action="store_true", help="also require /readyz")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="retry until healthy or this many seconds have passed")
    p.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                   help="per-request timeout")
    p.add_argument("--check", "-q", action="store_true", dest="quiet",
                   help="print nothing; only the exit code")
    p.set_defaults(func=run_health)
    return p


async def run_health(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..settings import Settings

    url = args.url
    if url is None:
        settings = Settings.from_env()
        if settings.metrics_port == 0:
            raise ConfigError("AUDIT_METRICS_PORT is 0: the worker serves no health endpoint")
        url = default_url(settings)
    deadline = time.monotonic() + max(0.0, args.wait)
    while True:
        code, message = await anyio.to_thread.run_sync(
            lambda: check(url, ready=args.ready, timeout_s=args.timeout)
        )
        if code == 0 or time.monotonic() >= deadline:
            break
        await anyio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    if not args.quiet:
        print(message, file=sys.stdout if code == 0 else sys.stderr)
    return code
