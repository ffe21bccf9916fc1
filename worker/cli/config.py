"""``audit-fleet config show|check``: the effective settings, and a check without starting."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import Any

from .. import constants as c
from ..settings import Settings, describe_unknown, env_name, mask_url, unknown_env
from ..stores import store_from
from .common import add_worker_flags, settings_from_args
from .output import escape_text, print_json, table

#: Settings whose values may carry credentials: shown with the password masked.
_URLS = {"redis_url", "store_url"}


def effective(settings: Settings, env: dict[str, str]) -> list[dict[str, Any]]:
    """Every setting: its variable, effective value (secrets masked) and where it came from."""
    defaults = Settings(consumer=settings.consumer)
    rows = []
    for f in fields(Settings):
        if f.name == "keyring":
            continue
        name = env_name(f.name)
        value = getattr(settings, f.name)
        if f.name in _URLS:
            value = mask_url(str(value))
        elif isinstance(value, tuple):
            value = ",".join(value)
        if env.get(name):
            source = "environment"
        elif getattr(settings, f.name) != getattr(defaults, f.name):
            source = "flag"
        else:
            source = "default"
        rows.append({"variable": name, "value": value, "source": source})
    for name in c.OTHER_ENV_NAMES:
        if env.get(name):
            value = mask_url(env[name]) if "://" in env[name] else env[name]
            rows.append({"variable": name, "value": value, "source": "environment"})
    return rows


async def cmd_show(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    rows = effective(settings_from_args(args), env)
    unknown = unknown_env(env)
    if args.json:
        print_json({"settings": rows,
                    "unknown": [{"variable": n, "suggestion": s} for n, s in unknown]})
    else:
        print(table(["VARIABLE", "VALUE", "SOURCE"],
                    [[r["variable"], r["value"], r["source"]] for r in rows]))
        for name, suggestion in unknown:
            print(escape_text(f"warning: {describe_unknown(name, suggestion)}"),
                  file=sys.stderr)
    return 0


async def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 when the settings are valid and every ``AUDIT_*`` name is known; 1 when some
    name is unknown; 2 (a ConfigError) when a setting is invalid."""
    settings = settings_from_args(args)
    # Building the store (it is not opened: nothing connects, nothing is created) checks
    # the options in AUDIT_STORE_URL's query string, which each store reads itself.
    store_from(settings)
    unknown = unknown_env()
    for name, suggestion in unknown:
        print(escape_text(f"audit-fleet: {describe_unknown(name, suggestion)}"), file=sys.stderr)
    if unknown:
        return 1
    print(f"configuration is valid: streams {','.join(settings.streams)}, group "
          f"{settings.group}, store {settings.store_scheme}, Redis {mask_url(settings.redis_url)}")
    return 0


def register(sub: Any) -> None:
    """Add ``config show`` and ``config check`` to the ``audit-fleet`` command."""
    p = sub.add_parser("config", help="show the effective settings, or check them",
                       description="The settings a worker started here would use.")
    actions = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="effective settings (secrets masked) and sources")
    add_worker_flags(show)
    show.add_argument("--json", action="store_true", help="stable JSON")
    show.set_defaults(func=cmd_show)
    check = actions.add_parser(
        "check", help="validate without starting; unknown AUDIT_* names fail (exit 1)")
    add_worker_flags(check)
    check.set_defaults(func=cmd_check)
