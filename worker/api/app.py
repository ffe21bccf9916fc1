"""The aiohttp application: the JSON API under ``/v1``, the pages, and their guards.

Every data route is under one workspace and runs the same checks, in this order:

1. a token (``Authorization: Bearer``; pages also take the session cookie) that exists,
   matches and is not revoked, else **401** and no data;
2. the workspace of the path is one the token is bound to, else **404**, the same
   answer as for a run that does not exist, whatever the path, query or run ID says;
3. the scope: ``runs:read`` for everything, ``prompts:read`` on top of it to ask for
   prompts and raw outputs (``include=prompts``), else **403**.

Responses carry ``Cache-Control: no-store``, ``X-Content-Type-Options: nosniff``,
same-origin referrers and a restrictive Content-Security-Policy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from ..errors import ConfigError, StoreError, StoreUnavailable
from ..logs import get_logger
from . import openapi, pages
from .guards import (
    CONFIG,
    INSIGHTS_PARAMS,
    READER,
    RUNS_PARAMS,
    NotFound,
    ServerConfig,
    api_principal,
    error,
    include_prompts,
    insights_options,
    json_response,
    need,
    options,
    path_id,
    positive,
    runs_query,
    workspace_of,
)
from .reads import ALL, Reader
from .tokens import RUNS_READ

log = get_logger()

__all__ = ["ServerConfig", "build_app"]

SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:;"
                               " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors as JSON (or the page's error page), and the security headers everywhere."""
    response: web.StreamResponse
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = web.Response(status=exc.status, reason=exc.reason, body=exc.body,
                                headers=exc.headers)
    except NotFound:
        response = await _error_page(request, 404, "not found")
    except ConfigError as exc:
        response = await _error_page(request, 400, str(exc))
    except (StoreUnavailable, StoreError) as exc:
        log.warning("api_store_error", error=type(exc).__name__)
        response = await _error_page(request, 503, "the store is unavailable; try again")
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    return response


async def _error_page(request: web.Request, status: int, message: str) -> web.StreamResponse:
    if request.path.startswith("/v1/"):
        return error(status, message)
    return pages.error_page(request, status, message)



async def get_openapi(request: web.Request) -> web.Response:
    return json_response(openapi.document())


async def get_workspaces(request: web.Request) -> web.Response:
    who = await api_principal(request)
    need(who, RUNS_READ)
    return json_response({"workspaces": list(who.token.workspaces),
                          "scopes": list(who.token.scopes), "tokenId": who.token_id})


async def get_runs(request: web.Request) -> web.Response:
    who = await api_principal(request)
    ws = workspace_of(request, who)
    need(who, RUNS_READ)
    query = runs_query(options(request, RUNS_PARAMS))
    return json_response(await request.app[READER].runs(ws, query))


async def _explanation(request: web.Request, *, archived: bool) -> web.Response:
    who = await api_principal(request)
    ws = workspace_of(request, who)
    need(who, RUNS_READ)
    prompts = include_prompts(who, options(request, {"include"}))
    doc = await request.app[READER].explanation(
        who, ws, path_id(request, "run_id"), reveal=ALL if prompts else None,
        archived=archived)
    if doc is None:
        raise NotFound
    return json_response(doc)


async def get_run(request: web.Request) -> web.Response:
    return await _explanation(request, archived=False)


async def get_archived_run(request: web.Request) -> web.Response:
    return await _explanation(request, archived=True)


async def get_node(request: web.Request) -> web.Response:
    who = await api_principal(request)
    ws = workspace_of(request, who)
    need(who, RUNS_READ)
    query = options(request, {"include", "attempt"})
    prompts = include_prompts(who, query)
    attempt = positive(query.get("attempt"), "attempt", 0, 1_000_000) \
        if "attempt" in query else None
    doc = await request.app[READER].node(who, ws, path_id(request, "run_id"),
                                         path_id(request, "node_id"), attempt,
                                         prompts=prompts)
    if doc is None:
        raise NotFound
    return json_response(doc)


async def get_insights(request: web.Request) -> web.Response:
    who = await api_principal(request)
    ws = workspace_of(request, who)
    need(who, RUNS_READ)
    opts = insights_options(options(request, INSIGHTS_PARAMS))
    return json_response(await request.app[READER].insights(ws, **opts))


async def api_not_found(request: web.Request) -> web.Response:
    raise NotFound


def build_app(reader: Reader, config: ServerConfig | None = None) -> web.Application:
    """The whole server: JSON API, pages, static CSS."""
    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    app[READER] = reader
    app[CONFIG] = config or ServerConfig()
    base = "/v1/workspaces/{ws}"
    app.router.add_get("/v1/openapi.json", get_openapi)
    app.router.add_get("/v1/workspaces", get_workspaces)
    app.router.add_get(f"{base}/runs", get_runs)
    app.router.add_get(f"{base}/runs/{{run_id}}", get_run)
    app.router.add_get(f"{base}/runs/{{run_id}}/nodes/{{node_id}}", get_node)
    app.router.add_get(f"{base}/insights", get_insights)
    app.router.add_get(f"{base}/archive/runs/{{run_id}}", get_archived_run)
    app.router.add_route("*", "/v1/{tail:.*}", api_not_found)
    pages.add_routes(app)
    return app
