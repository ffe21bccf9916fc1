"""The ``audit-fleet`` command: every subcommand lives in a module of this package.

A command module parses its arguments, calls the business modules (which never print
or parse arguments) and prints the result; ``register(subparsers)`` adds it here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence

import anyio

from .. import __version__
from ..errors import AuditFleetError, ConfigError
from ..logs import get_logger
from . import archive, demo, dlq, explain, health, insights, retention, run, runs, status, trim

Handler = Callable[[argparse.Namespace], Awaitable[int]]

#: The command modules, in the order ``audit-fleet --help`` lists them.
COMMANDS = (run, demo, status, dlq, health, trim, explain, runs, insights, retention, archive)


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
    except ConfigError as exc:
        print(f"audit-fleet: configuration error: {exc}", file=sys.stderr)
        return 2
    except AuditFleetError as exc:
        print(f"audit-fleet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception:
        get_logger().exception("command_failed", command=args.command)
        return 1


if __name__ == "__main__":
    sys.exit(main())
