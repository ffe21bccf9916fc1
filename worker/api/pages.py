"""The web viewer: server-rendered pages (jinja2, autoescape on, no script).

Pages take the session cookie set by ``POST /login`` (the token itself, HttpOnly,
SameSite=Strict, Secure unless the server runs with ``--insecure-localhost``) or a
bearer token, and apply the API's guards. The login form is CSRF-safe: a double-submit
token (a random value in a cookie and in the form, compared in constant time) and a
same-origin check of ``Origin`` / ``Sec-Fetch-Site``.

A run page never holds a prompt or raw output until it is asked for: each node with one
has a "show" link (``?show=<nodeId>:<attempt>``, only with ``prompts:read``), and the
page that answers it writes the access record before it is rendered.
"""

from __future__ import annotations

import hmac
import secrets
from importlib.resources import files
from typing import Any, Final
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from ..cli.output import format_ms
from ..errors import ConfigError
from . import charts
from .guards import (
    CONFIG,
    INSIGHTS_PARAMS,
    READER,
    RUNS_PARAMS,
    SESSION_COOKIE,
    NotFound,
    insights_options,
    options,
    path_id,
    principal,
    redirect,
    runs_query,
    workspace_of,
)
from .reads import ALL
from .text import clean
from .tokens import PROMPTS_READ, RUNS_READ, Principal, authenticate

CSRF_COOKIE: Final = "af_csrf"
_ENV: Final = jinja2.Environment(
    loader=jinja2.PackageLoader("worker.api", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters["clean"] = clean
_ENV.filters["ms"] = format_ms
_ENV.globals["urlencode"] = urlencode


def render(request: web.Request, template: str, code: int = 200,
           **context: Any) -> web.Response:
    html = _ENV.get_template(template).render(request_path=request.path, **context)
    return web.Response(text=html, status=code, content_type="text/html", charset="utf-8")


def error_page(request: web.Request, status: int, message: str) -> web.Response:
    return render(request, "error.html", status, status=status, message=message, who=None)


async def page_principal(request: web.Request) -> Principal:
    who = await principal(request, cookie=True)
    if who is None:
        raise web.HTTPSeeOther("/login")
    if not who.may(RUNS_READ):
        raise web.HTTPForbidden(text="this token has no runs:read scope")
    return who


def _same_origin(request: web.Request) -> bool:
    """Whether a POST comes from this server's own pages: by ``Sec-Fetch-Site`` where the
    browser sends it, else by ``Origin``."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{request.scheme}://{request.host}"


def _set_cookie(request: web.Request, response: web.StreamResponse, name: str,
                value: str) -> None:
    response.set_cookie(name, value, httponly=True, samesite="Strict", path="/",
                        secure=request.app[CONFIG].secure_cookies)


# -- routes ----------------------------------------------------------------------------------

async def index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/workspaces")


async def login_form(request: web.Request, *, message: str | None = None,
                     status: int = 200) -> web.Response:
    csrf = secrets.token_urlsafe(24)
    response = render(request, "login.html", status, csrf=csrf, message=message, who=None)
    _set_cookie(request, response, CSRF_COOKIE, csrf)
    return response


async def login_page(request: web.Request) -> web.Response:
    return await login_form(request)


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    sent = str(form.get("csrf", ""))
    kept = request.cookies.get(CSRF_COOKIE, "")
    if not _same_origin(request) or not kept or not hmac.compare_digest(sent, kept):
        return await login_form(request, message="the form expired; please try again",
                                status=403)
    token = str(form.get("token", "")).strip()
    who = await authenticate(request.app[READER].access, token)
    if who is None:
        return await login_form(request, message="that token is not valid", status=401)
    response = redirect("/workspaces")
    _set_cookie(request, response, SESSION_COOKIE, token)
    response.del_cookie(CSRF_COOKIE, path="/")
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    if not _same_origin(request):
        raise web.HTTPForbidden(text="cross-site request refused")
    response = redirect("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


async def workspaces(request: web.Request) -> web.Response:
    who = await page_principal(request)
    return render(request, "workspaces.html", who=who, workspaces=who.token.workspaces)


async def runs(request: web.Request) -> web.Response:
    who = await page_principal(request)
    ws = workspace_of(request, who)
    raw = options(request, RUNS_PARAMS)
    query = {k: v for k, v in raw.items() if v != ""}
    try:
        page = await request.app[READER].runs(ws, runs_query(query))
        problem = None
    except ConfigError as exc:
        page, problem = {"runs": [], "nextCursor": None}, str(exc)
    more = None
    if page["nextCursor"]:
        more = "?" + urlencode({**{k: v for k, v in query.items() if k != "cursor"},
                               "cursor": page["nextCursor"]})
    return render(request, "runs.html", who=who, ws=ws, page=page, filters=query, more=more,
                  problem=problem)


def _reveal(request: web.Request, who: Principal) -> Any:
    """The nodes whose prompts the page was asked to show (``show=node:attempt`` or all)."""
    wanted = request.rel_url.query.getall("show", [])
    if not wanted:
        return None
    if not who.may(PROMPTS_READ):
        raise web.HTTPForbidden(text=f"showing prompts needs the {PROMPTS_READ} scope")
    if "all" in wanted:
        return ALL
    out = set()
    for item in wanted[:100]:
        node, sep, attempt = item.rpartition(":")
        if not sep or not attempt.isdigit():
            raise ConfigError("show takes <nodeId>:<attempt>")
        out.add((node, int(attempt)))
    return out


async def _run_page(request: web.Request, *, archived: bool) -> web.Response:
    who = await page_principal(request)
    ws = workspace_of(request, who)
    extra = set(request.rel_url.query) - {"show"}
    if extra:
        raise ConfigError(f"unknown query parameter(s): {', '.join(sorted(extra))}")
    reveal = _reveal(request, who)
    run_id = path_id(request, "run_id")
    doc = await request.app[READER].explanation(who, ws, run_id, reveal=reveal,
                                                archived=archived)
    if doc is None:
        raise NotFound
    run = doc["run"]
    timeline = charts.timeline(doc["nodes"], charts._when(run.get("startedAt")))
    revealed = {(n["nodeId"], n["attempt"]) for n in doc["nodes"]
                if n.get("input") is not None or n.get("output") is not None}
    return render(request, "run.html", who=who, ws=ws, doc=doc, run=run, timeline=timeline,
                  revealed=revealed, archived=archived,
                  can_prompts=who.may(PROMPTS_READ))


async def run_page(request: web.Request) -> web.Response:
    return await _run_page(request, archived=False)


async def archived_run_page(request: web.Request) -> web.Response:
    return await _run_page(request, archived=True)


async def insights_page(request: web.Request) -> web.Response:
    who = await page_principal(request)
    ws = workspace_of(request, who)
    query = {k: v for k, v in options(request, INSIGHTS_PARAMS).items() if v != ""}
    result, dist = await request.app[READER].insights_with_charts(ws, **insights_options(query))
    slow = charts.bars([(f"{s['workflowId']} / {s['nodeId']}", s["p95Ms"],
                         f"p95 {format_ms(s['p95Ms'])} · p50 "
                         f"{format_ms(s['p50Ms'])} · n={s['count']}")
                        for s in result["slowestNodes"]], "Slowest nodes (p95)")
    confidence = charts.histogram(dist["confidenceBins"], "AI confidence distribution")
    errors = charts.stacked_days(dist["errorsByDay"], "Errors per day by type")
    return render(request, "insights.html", who=who, ws=ws, result=result, filters=query,
                  slow=slow, confidence=confidence, errors=errors)


async def stylesheet(request: web.Request) -> web.Response:
    css = (files("worker.api") / "templates" / "app.css").read_text("utf-8")
    return web.Response(text=css, content_type="text/css",
                        headers={"Cache-Control": "max-age=300"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/static/app.css", stylesheet)
    app.router.add_get("/workspaces", workspaces)
    app.router.add_get("/workspaces/{ws}/runs", runs)
    app.router.add_get("/workspaces/{ws}/runs/{run_id}", run_page)
    app.router.add_get("/workspaces/{ws}/archive/runs/{run_id}", archived_run_page)
    app.router.add_get("/workspaces/{ws}/insights", insights_page)
