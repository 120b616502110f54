"""Schemathesis fuzzes every operation of the OpenAPI document, with a valid key and without one: no answer
may be a 5xx, and every answer must match the document (status code, content type, body schema)."""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.security.conftest import make_key

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MAX_EXAMPLES = 60


def fuzz(app: Any, headers: dict[str, str], max_examples: int) -> dict[str, Any]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    totals: dict[str, Any] = {"operations": 0, "cases": 0, "server_errors": 0, "failures": []}
    for result in schema.get_all_operations():
        totals["operations"] += 1
        run = _fuzzer(result.ok(), headers, max_examples, totals)
        try:
            run()
        except Exception as exc:  # collect every operation's failure, then report them all at once
            totals["failures"].append(f"{run.label}: {_describe(exc)}"[:3000])
    return totals


def _describe(exc: BaseException) -> str:
    """The failure with its sub-exceptions (Hypothesis groups distinct failures), to read in the report."""
    parts = [str(exc)]
    for sub in getattr(exc, "exceptions", ()):
        parts.append(f"- {type(sub).__name__}: {sub}")
    return "\n".join(parts)


def _fuzzer(operation: Any, headers: dict[str, str], max_examples: int, totals: dict[str, Any]) -> Any:
    path = operation.path

    @given(case=operation.as_strategy())
    @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: Any) -> None:
        # Long polls (`Prefer: wait=N`, `?wait=N`) legitimately hold a request open with no worker running;
        # the fuzzer is after errors and schema breaks, not after waiting out each one.
        for params in (case.headers, case.query):
            for name in [k for k in params or {} if k.lower() in ("prefer", "wait")]:
                del params[name]
        response = case.call(headers=headers)
        totals["cases"] += 1
        totals["server_errors"] += response.status_code >= 500
        if path.startswith("/v1/") and not headers:
            assert response.status_code in (401, 404, 405, 413, 422), (path, response.status_code)
        case.validate_response(response, checks=CHECKS)

    run.label = f"{operation.method.upper()} {path}"  # type: ignore[attr-defined]
    return run


def test_fuzz_every_operation_with_and_without_a_key(app: Any) -> None:
    with_key = fuzz(app, make_key("fuzzer"), MAX_EXAMPLES)
    without = fuzz(app, {}, MAX_EXAMPLES // 2)
    summary = {
        "operations": with_key["operations"],
        "cases_with_key": with_key["cases"],
        "cases_without_key": without["cases"],
        "server_errors": with_key["server_errors"] + without["server_errors"],
        "schema_violations": len(with_key["failures"]) + len(without["failures"]),
    }
    print(f"\nFUZZ REPORT {json.dumps(summary)}")
    if path := os.environ.get("DARKROOM_FAULT_REPORT"):
        with open(path, "a") as f:
            f.write(json.dumps({"fault": "schemathesis fuzzing", **summary}) + "\n")
    assert not with_key["failures"] and not without["failures"], "\n\n".join(with_key["failures"] + without["failures"])
    assert summary["server_errors"] == 0
