"""The OpenAPI 3.1 description the server publishes at ``/v1/openapi.json``."""

from __future__ import annotations

from typing import Any

from .. import __version__


def _param(name: str, where: str, text: str, *, required: bool = False,
           schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path",
            "description": text, "schema": schema or {"type": "string"}}


_WS = _param("ws", "path", "workspace ID (1-48 of A-Z a-z 0-9 _ -)",
             schema={"type": "string", "pattern": "^[A-Za-z0-9_-]{1,48}$"})
_RUN = _param("run_id", "path", "run ID (percent-encode '/' and other reserved characters)")
_INCLUDE = _param("include", "query", "'prompts' to receive prompts and raw outputs "
                  "(needs prompts:read; every such response writes access records)",
                  schema={"type": "string", "enum": ["prompts"]})
_WHEN = ("a duration back from now (90s, 15m, 12h, 7d, 2w) or an ISO 8601 time "
         "(no offset means UTC)")


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "bad parameter", 401: "no valid token (missing, unknown, revoked)",
            403: "the token lacks the scope", 404: "not found, or not this token's workspace",
            503: "the store is unavailable"}
    return {str(c): {"description": text[c], "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for c in codes}


def _ok(text: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"200": {"description": text, "content": {"application/json": {
        "schema": schema or {"type": "object"}}}}}


def document() -> dict[str, Any]:
    """The description (paths, parameters, security, error shape)."""
    data = _errors(400, 401, 403, 404, 503)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Audit Fleet read API", "version": __version__,
                 "description": "Read-only access to one workspace's audit trail. See "
                                "docs/api.md."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "a token from `audit-fleet "
                                                          "tokens create`"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "status"],
                          "properties": {"error": {"type": "string"},
                                         "status": {"type": "integer"}}},
                "RunsPage": {"type": "object", "required": ["workspace", "runs", "nextCursor"],
                             "properties": {
                                 "workspace": {"type": "string"},
                                 "runs": {"type": "array", "items": {"type": "object"}},
                                 "nextCursor": {"type": ["string", "null"]}}},
                "Explanation": {"type": "object",
                                "description": "the document of `audit-fleet explain --json` "
                                               "(explainVersion 1), plus `withheld`",
                                "required": ["explainVersion", "run", "nodes", "withheld"]},
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/openapi.json": {"get": {"summary": "this description", "security": [],
                                         "responses": _ok("the OpenAPI document")}},
            "/v1/workspaces": {"get": {
                "summary": "the workspaces and scopes of the presented token",
                "responses": _ok("workspaces") | _errors(401, 403)}},
            "/v1/workspaces/{ws}/runs": {"get": {
                "summary": "runs, newest first, filtered, one page (keyset cursor)",
                "parameters": [
                    _WS,
                    _param("workflow", "query", "only this workflow ID"),
                    _param("status", "query", "only this status"),
                    _param("triggerSource", "query", "only runs triggered from this source"),
                    _param("since", "query", f"started at or after: {_WHEN}"),
                    _param("until", "query", f"started before: {_WHEN}"),
                    _param("limit", "query", "page size, 1..500 (default 50)",
                           schema={"type": "integer", "minimum": 1, "maximum": 500}),
                    _param("cursor", "query", "the nextCursor of the previous page"),
                ],
                "responses": _ok("one page", {"$ref": "#/components/schemas/RunsPage"}) | data}},
            "/v1/workspaces/{ws}/runs/{run_id}": {"get": {
                "summary": "why the run did what it did (explain --json)",
                "parameters": [_WS, _RUN, _INCLUDE],
                "responses": _ok("the explanation",
                                 {"$ref": "#/components/schemas/Explanation"}) | data}},
            "/v1/workspaces/{ws}/runs/{run_id}/nodes/{node_id}": {"get": {
                "summary": "one node execution as stored (the latest attempt unless named)",
                "parameters": [_WS, _RUN, _param("node_id", "path", "node ID"),
                               _param("attempt", "query", "attempt number",
                                      schema={"type": "integer", "minimum": 1}),
                               _INCLUDE],
                "responses": _ok("{node, withheld}") | data}},
            "/v1/workspaces/{ws}/insights": {"get": {
                "summary": "low confidence, slowest nodes, error groups, default branches, "
                           "tokens (insights --json)",
                "parameters": [
                    _WS,
                    _param("since", "query", f"nodes started at or after (default 30d): {_WHEN}"),
                    _param("until", "query", f"nodes started before: {_WHEN}"),
                    _param("confidenceThreshold", "query", "0..1 (default 0.7)",
                           schema={"type": "number", "minimum": 0, "maximum": 1}),
                    _param("limit", "query", "low-confidence items listed (default 100)",
                           schema={"type": "integer", "minimum": 1}),
                ],
                "responses": _ok("insightsVersion 1") | data}},
            "/v1/workspaces/{ws}/archive/runs/{run_id}": {"get": {
                "summary": "an archived run's explanation (explain --archive --json)",
                "parameters": [_WS, _RUN, _INCLUDE],
                "responses": _ok("the explanation",
                                 {"$ref": "#/components/schemas/Explanation"}) | data}},
        },
    }
