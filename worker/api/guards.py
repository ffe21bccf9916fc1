"""What every route checks and parses: the token, the workspace, the scopes, the
query parameters (the rules are in :mod:`worker.api.app`'s docstring)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from .. import queries
from ..cli.output import parse_when
from ..errors import ConfigError
from ..stores import RunQuery
from .reads import Reader
from .tokens import PROMPTS_READ, Principal, authenticate


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How the server runs: whether its cookies may travel over plain HTTP."""

    secure_cookies: bool = True


READER: Final = web.AppKey("reader", Reader)
CONFIG: Final = web.AppKey("config", ServerConfig)
PRINCIPAL: Final = "principal"
#: The session cookie pages accept (its value is the token; HttpOnly, SameSite=Strict).
SESSION_COOKIE: Final = "af_session"
MAX_PAGE: Final = 500
#: What no identifier holds (the event contract's rule): C0, DEL and C1 controls.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")
class NotFound(Exception):
    """Nothing to show (or nothing this token may know exists)."""


def json_response(body: Any, status: int = 200, **headers: str) -> web.Response:
    return web.Response(text=queries.dumps(body, indent=None), status=status,
                        content_type="application/json", headers=headers)


def redirect(location: str) -> web.Response:
    """A 303 See Other (a response, so that cookies can be set on it)."""
    return web.Response(status=303, headers={"Location": location})


def error(status: int, message: str, **headers: str) -> web.Response:
    return json_response({"error": message, "status": status}, status, **headers)


async def principal(request: web.Request, *, cookie: bool) -> Principal | None:
    """The principal of a request's bearer token (or, for pages, its session cookie)."""
    header = request.headers.get("Authorization", "")
    token: str | None = None
    if header[:7].lower() == "bearer ":
        token = header[7:].strip()
    elif cookie:
        token = request.cookies.get(SESSION_COOKIE)
    return await authenticate(request.app[READER].access, token)


def workspace_of(request: web.Request, who: Principal) -> str:
    """The path's workspace if the principal is bound to it; else it does not exist."""
    name = request.match_info.get("ws", "")
    try:
        queries.check_workspace(name)
    except ConfigError:
        raise NotFound from None
    if not who.sees(name):
        raise NotFound
    return name


async def api_principal(request: web.Request) -> Principal:
    who = await principal(request, cookie=False)
    if who is None:
        raise web.HTTPUnauthorized(
            text=queries.dumps({"error": "a valid bearer token is required", "status": 401},
                               indent=None),
            content_type="application/json", headers={"WWW-Authenticate": "Bearer"})
    return who


def need(who: Principal, scope: str) -> None:
    if not who.may(scope):
        raise web.HTTPForbidden(
            text=queries.dumps({"error": f"this token has no {scope} scope", "status": 403},
                               indent=None), content_type="application/json")


def options(request: web.Request, allowed: set[str]) -> Mapping[str, str]:
    """The query parameters, each at most once and all known."""
    query = request.rel_url.query
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise ConfigError(f"unknown query parameter(s): {', '.join(unknown)}")
    repeated = sorted(k for k in set(query) if len(query.getall(k)) > 1)
    if repeated:
        raise ConfigError(f"query parameter(s) given more than once: {', '.join(repeated)}")
    return {k: query[k] for k in query}


def include_prompts(who: Principal, query: Mapping[str, str]) -> bool:
    value = query.get("include")
    if value is None or value == "":
        return False
    if value != "prompts":
        raise ConfigError("include must be 'prompts'")
    need(who, PROMPTS_READ)
    return True


def positive(value: str | None, name: str, default: int, most: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= most:
        raise ConfigError(f"{name} must be a whole number 1..{most}")
    return int(value)


def _no_controls(values: Mapping[str, str]) -> None:
    for name, value in values.items():
        if _CONTROL.search(value):
            raise ConfigError(f"{name} holds a control character")


def path_id(request: web.Request, name: str) -> str:
    """An identifier from the path: one no event can have does not exist."""
    value = request.match_info[name]
    if not 1 <= len(value) <= 200 or _CONTROL.search(value):
        raise NotFound
    return value


def runs_query(query: Mapping[str, str]) -> RunQuery:
    """The ``runs`` filters from query parameters (the same forms as the command's)."""
    _no_controls(query)
    now = queries.utcnow()
    cursor = query.get("cursor")
    return RunQuery(
        workflow_id=query.get("workflow") or None,
        status=query.get("status") or None,
        trigger_source=query.get("triggerSource") or None,
        since=parse_when(query.get("since"), now),
        until=parse_when(query.get("until"), now),
        limit=positive(query.get("limit"), "limit", 50, MAX_PAGE),
        after=queries.decode_cursor(cursor) if cursor else None,
    )


RUNS_PARAMS: Final = {"workflow", "status", "triggerSource", "since", "until", "limit",
                      "cursor"}
INSIGHTS_PARAMS: Final = {"since", "until", "confidenceThreshold", "limit"}


def insights_options(query: Mapping[str, str]) -> dict[str, Any]:
    from ..insights import DEFAULT_LIMIT, DEFAULT_THRESHOLD

    now = queries.utcnow()
    raw = query.get("confidenceThreshold")
    try:
        threshold = DEFAULT_THRESHOLD if raw is None else float(raw)
    except ValueError:
        raise ConfigError("confidenceThreshold must be a number") from None
    if not 0 <= threshold <= 1:
        raise ConfigError("confidenceThreshold must be within 0..1")
    return {"since": parse_when(query.get("since", "30d"), now),
            "until": parse_when(query.get("until"), now),
            "threshold": threshold,
            "limit": positive(query.get("limit"), "limit", DEFAULT_LIMIT, 100_000)}


# -- JSON routes -----------------------------------------------------------------------------
