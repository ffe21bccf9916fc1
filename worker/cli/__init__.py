"""The ``audit-fleet`` command: every subcommand lives in a module of this package.

A command module parses its arguments, calls the business modules (which never print
or parse arguments) and prints the result; ``register(subparsers)`` adds it here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Sequence

import anyio
from redis.exceptions import RedisError

from .. import __version__
from ..errors import AuditFleetError, ConfigError
from ..logs import get_logger
from ..settings import mask_url, setting
from . import (
    archive,
    config,
    demo,
    dlq,
    erase,
    explain,
    groups,
    health,
    insights,
    retention,
    run,
    runs,
    serve,
    status,
    tokens,
    trim,
    validate,
)

Handler = Callable[[argparse.Namespace], Awaitable[int]]

#: The command modules, in the order ``audit-fleet --help`` lists them.
COMMANDS = (run, demo, status, dlq, health, trim, explain, runs, insights, retention, archive,
            erase, config, validate, groups, serve, tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audit-fleet",
        description="Audit trails for AI workflows: Redis Streams in, durable runs out.",
    )
    parser.add_argument("--version", action="version", version=f"audit-fleet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return anyio.run(func, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except (Exception, BaseExceptionGroup) as exc:  # the one place failures become exit codes
        code, message = describe_failure(exc, args)
        if message is None:
            get_logger().exception("command_failed", command=args.command)
        else:
            print(f"audit-fleet: {message}", file=sys.stderr)
        return code


def first_leaf(exc: BaseException) -> BaseException:
    """The exception an (anyio task group's) ExceptionGroup stands for: its first leaf,
    preferring one of ours."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        ours = [e for e in exc.exceptions if isinstance(e, AuditFleetError | BaseExceptionGroup)]
        exc = (ours or list(exc.exceptions))[0]
    return exc


def describe_failure(exc: BaseException, args: argparse.Namespace) -> tuple[int, str | None]:
    """(exit code, one line) for a failure; no line for a bug (logged with its traceback)."""
    exc = first_leaf(exc)
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(exc, ConfigError):
        return 2, f"configuration error: {exc}"
    if isinstance(exc, AuditFleetError):
        return 1, str(exc)
    if isinstance(exc, RedisError):
        url = setting("redis_url", getattr(args, "redis_url", None))
        detail = str(exc) or type(exc).__name__
        return 1, f"Redis at {mask_url(url)} (AUDIT_REDIS_URL / --redis-url): {detail}"
    if isinstance(exc, OSError):
        return 1, str(exc)
    return 1, None


if __name__ == "__main__":
    sys.exit(main())
