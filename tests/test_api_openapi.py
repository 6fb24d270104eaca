"""The committed OpenAPI document is exactly what the code generates, and covers every route."""

from __future__ import annotations

import json

from jsonschema import Draft202012Validator

from peerd.api import models
from peerd.api.openapi import build, committed, render
from peerd.api.routes import HANDLERS
from peerd.api.spec import ENDPOINTS, PREFIX
from tests.support.process import run_cli


def test_committed_document_matches_the_code() -> None:
    # On failure: run `peerd api-schema` (or python -m peerd.api.cli) and commit the diff.
    assert committed() == render()


def test_cli_check_agrees() -> None:
    assert run_cli("api-schema", "--check").returncode == 0


def test_every_endpoint_has_a_handler_and_a_path() -> None:
    assert set(HANDLERS) == {ep.operation_id for ep in ENDPOINTS}
    doc = build()
    for ep in ENDPOINTS:
        op = doc["paths"][PREFIX + ep.path][ep.method.lower()]
        assert op["operationId"] == ep.operation_id
        assert str(ep.status) in op["responses"]
        for code in (400, 401, 403):
            assert str(code) in op["responses"]
    assert doc["openapi"] == "3.1.0"
    assert set(doc["webhooks"]) == {"register", "heartbeat", "drain"}


def test_component_schemas_are_valid_json_schema() -> None:
    doc = json.loads(committed())
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


def test_models_and_document_agree_on_examples() -> None:
    # A body built from the models validates against the document's schema, and the schema
    # refuses what the models refuse.
    from tests.support.openapi import OpenApiDocument, SchemaViolation

    doc = OpenApiDocument()
    cid = "bafkreibnoelefnzgwbcacyt4vh52ymxvzbjq7mmqhtcnwarfq4lzegsiqe"
    good = models.EvictRequest(cids=[cid]).model_dump(mode="json", exclude_none=True)
    doc.validate_component("EvictRequest", good)
    for bad in ({}, {"media_id": cid, "cids": [cid]}, {"media_id": None}):
        try:
            doc.validate_component("EvictRequest", bad)
        except SchemaViolation:
            continue
        raise AssertionError(f"schema accepted {bad}")
    doc.validate_component("PrefetchRequest", {"media_id": cid, "source": "r2"})
    try:
        doc.validate_component("PrefetchRequest", {"media_id": cid, "source": "peer"})
    except SchemaViolation:
        pass
    else:
        raise AssertionError("schema accepted source=peer without peer_id")


def test_document_is_valid_openapi_3_1() -> None:
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation import OpenAPIV31SpecValidator

    validate(json.loads(committed()), cls=OpenAPIV31SpecValidator)
