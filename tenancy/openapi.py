"""The operator API described as OpenAPI 3.1, built from the endpoint declarations.

The same declarations route requests and decide access (tenancy.access), and
the same pydantic models validate bodies, so the document cannot drift from
what the server does. Served at ``GET /api/v1/openapi.json``.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from pydantic import TypeAdapter

from tenancy.access import ENDPOINTS, Endpoint, endpoint
from tenancy.problems import MEDIA_TYPE

_REF = "#/components/schemas/{model}"
_PARAM = re.compile(r"{(\w+)}")
_PROBLEM = {
    "type": "object",
    "description": "An RFC 9457 problem document.",
    "properties": {
        "type": {"type": "string", "format": "uri"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "field": {"type": ["string", "null"]},
    },
    "required": ["type", "title", "status"],
}
_ERRORS = {
    "401": "No valid bearer key",
    "403": "The key may not do this",
    "404": "No such resource, or one another workspace owns",
    "409": "Conflicts with the current state",
    "422": "The input is invalid; `field` names what",
    "502": "Twilio's API failed or refused",
    "503": "The store is unavailable",
}


def _schema_of(model: type[Any], schemas: dict[str, Any]) -> dict[str, Any]:
    schema = TypeAdapter(model).json_schema(ref_template=_REF)
    for name, definition in schema.pop("$defs", {}).items():
        schemas[name] = definition
    schemas[model.__name__] = schema
    return {"$ref": _REF.format(model=model.__name__)}


def _operation(declared: Endpoint, schemas: dict[str, Any]) -> dict[str, Any]:
    problem = {
        "content": {MEDIA_TYPE: {"schema": {"$ref": _REF.format(model="Problem")}}}
    }
    success: dict[str, Any] = {"description": "Success"}
    if declared.media != "application/json":
        binary = {"type": "string", "contentMediaType": declared.media}
        success["content"] = {declared.media: {"schema": binary}}
    elif not declared.empty:
        shape: dict[str, Any] = {"type": "object"}
        if declared.response is not None:
            shape = _schema_of(declared.response, schemas)
        success["content"] = {"application/json": {"schema": shape}}
    operation: dict[str, Any] = {
        "operationId": declared.handler.__name__,
        "summary": declared.summary,
        "description": f"Access: {declared.access}.",
        "parameters": [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PARAM.findall(declared.path)
        ]
        + [
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": text,
                "schema": {"type": "string"},
            }
            for name, text in declared.query
        ],
        "responses": {
            str(declared.success): success,
            **{
                code: {"description": text, **problem} for code, text in _ERRORS.items()
            },
        },
    }
    if declared.access != "public":
        operation["security"] = [{"bearer": []}]
    if declared.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": _schema_of(declared.body, schemas)}
            },
        }
    return operation


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every declared endpoint."""
    schemas: dict[str, Any] = {"Problem": _PROBLEM}
    paths: dict[str, dict[str, Any]] = {}
    for declared in ENDPOINTS:
        item = paths.setdefault(declared.path, {})
        item[declared.method.lower()] = _operation(declared, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Callgate operator API",
            "version": "1",
            "description": "Workspaces, their agents, numbers, keys, plans, usage "
            "and calls. Errors are RFC 9457 problem documents.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


@endpoint("GET", "/openapi.json", "public", "This document")
async def openapi(request: web.Request) -> web.Response:
    """``GET /api/v1/openapi.json``: public, it holds no secret."""
    return web.json_response(document())
