"""The OpenAPI document matches the API, and a property-based run finds no 5xx."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tenancy.access import ENDPOINTS
from tests.harness import OPERATOR_KEY, Harness, callgate_process


async def test_document_describes_every_endpoint(callgate: Harness) -> None:
    """Every declared endpoint is in the served document, bodies with schemas."""
    async with callgate.http.get(f"{callgate.base_url}/api/v1/openapi.json") as reply:
        assert reply.status == 200
        document = await reply.json()
    assert document["openapi"] == "3.1.0"
    for declared in ENDPOINTS:
        operation = document["paths"][declared.path][declared.method.lower()]
        assert str(declared.success) in operation["responses"]
        if declared.body is not None:
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            name = schema["$ref"].rsplit("/", 1)[1]
            assert name in document["components"]["schemas"]
    create = document["components"]["schemas"]["CreateWorkspace"]
    assert create["properties"]["name"]["maxLength"] == 100


async def test_property_based_run_finds_no_server_error(tmp_path: Path) -> None:
    """Schemathesis against a real server: no 5xx, responses match the document."""
    async with callgate_process(tmp_path) as callgate:
        runner = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "st"),
            "run",
            f"{callgate.base_url}/api/v1/openapi.json",
            "--header",
            f"Authorization: Bearer {OPERATOR_KEY}",
            "--checks",
            "not_a_server_error,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "10",
            "--workers",
            "1",
            "--seed",
            "20261203",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(runner.communicate(), timeout=300)
    report = output.decode("utf-8", "replace")
    assert runner.returncode == 0, report[-3000:]
    assert " passed" in report
