"""The OpenAPI description of a replica's HTTP side, generated from aiohttp's own route table.

aiohttp has no generator of its own, so every handler carries a ``Doc`` (set by
``documented``, or by combiner/control_api.py's ``route``) and ``describe`` walks the
application's router: a route registered without a Doc is still listed, so the description
cannot miss a route. Served at ``GET /api/openapi.json``; docs/openapi.json is the same
document (tests/test_openapi.py keeps them equal: ``combiner openapi > docs/openapi.json``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from aiohttp import web

SPEC_PATH = "/api/openapi.json"

STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}
ANY: dict = {}


def obj(*required: str, **props: dict) -> dict:
    """A JSON object with these properties (any others allowed: the APIClient sends more)."""
    out: dict = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    return out


@dataclass(frozen=True)
class Doc:
    """What one handler takes and answers, for the description.

    query and headers name parameters (all optional strings unless the schema says
    otherwise); body is a JSON body's schema, form a form body's, octets a raw body;
    answers is "object", "list" ({"count", "result"}), "count" (an integer), "array",
    "file" (bytes); ok the success status; auth "admin", "token" (any valid access token),
    "refresh" (a refresh token in the body) or "none"."""

    summary: str = ""
    auth: str = "admin"
    query: dict[str, dict] = field(default_factory=dict)
    headers: dict[str, dict] = field(default_factory=dict)
    body: dict | None = None
    form: dict | None = None
    octets: bool = False
    answers: str = "object"
    ok: tuple[int, ...] = (200,)


def documented(doc: Doc):
    def mark(handler):
        handler.doc = doc
        return handler

    return mark


LIMIT = {"X-Limit": {"type": "string", "pattern": r"^[0-9]+$", "description": "at most this many"}}

ANSWERS = {
    "object": {"application/json": {"schema": {"type": "object"}}},
    "list": {"application/json": {"schema": {"$ref": "#/components/schemas/List"}}},
    "count": {"application/json": {"schema": INT}},
    "array": {"application/json": {"schema": {"type": "array"}}},
    "file": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}

COMPONENTS = {
    "schemas": {
        "Error": obj("message", message=STR),
        "List": obj("count", "result", count=INT, result={"type": "array"}),
    },
    "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
}

ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


def _operation_id(method: str, path: str) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", path.removeprefix("/api")).strip("_")
    return f"{method.lower()}_{words or 'root'}" + ("_slash" if path.endswith("/") else "")


def _operation(method: str, path: str, handler) -> dict:
    doc: Doc = getattr(handler, "doc", None) or Doc(summary="(undocumented)")
    summary = doc.summary or (handler.__doc__ or "").strip().split("\n\n")[0]
    params = [
        {"name": name, "in": "path", "required": True, "schema": STR}
        for name in re.findall(r"\{(\w+)\}", path)
    ]
    params += [{"name": n, "in": "query", "schema": s} for n, s in doc.query.items()]
    params += [{"name": n, "in": "header", "schema": s} for n, s in doc.headers.items()]
    op: dict = {
        "operationId": _operation_id(method, path),
        "summary": " ".join(summary.split()),
        "x-auth": doc.auth,
        "parameters": params,
        "responses": {
            **{str(ok): {"description": "done", "content": ANSWERS[doc.answers]} for ok in doc.ok},
            "4XX": {"description": "refused, with the reason", "content": ERROR},
            "503": {"description": "Redis not answering: retry", "content": ERROR},
        },
    }
    if doc.auth in ("admin", "token"):
        op["security"] = [{"bearer": []}]
        op["description"] = (
            "Needs an admin's access token: 401 without a token, 403 with a client's."
            if doc.auth == "admin"
            else "Needs any valid access token: 401 without one."
        )
    content = {}
    if doc.body is not None:
        content["application/json"] = {"schema": doc.body}
    if doc.form is not None:
        content["application/x-www-form-urlencoded"] = {"schema": doc.form}
    if doc.octets:
        content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    if content:
        op["requestBody"] = {"required": True, "content": content}
    return op


def describe(app: web.Application, version: str) -> dict:
    """The OpenAPI 3.0 document of every route in app's router (HEAD twins left out)."""
    paths: dict[str, dict] = {}
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if route.method in ("HEAD", "*") or not path or path == SPEC_PATH:
            continue
        paths.setdefault(path, {})[route.method.lower()] = _operation(
            route.method, path, route.handler
        )
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "redis-combiner HTTP side",
            "version": version,
            "description": "The token exchange, the client assignment and the control "
            "plane the published APIClient calls (docs/api.md). Every replica serves "
            "all of it from Redis.",
        },
        "paths": dict(sorted(paths.items())),
        "components": COMPONENTS,
    }
