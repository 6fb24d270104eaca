"""Build the OpenAPI 3.1 document of ``/api/v1/`` from the models and the endpoint table.

``peerd api-schema`` (or ``python -m peerd.api.cli``) rewrites ``peerd/api/openapi.json``;
``--check`` exits 1 if the committed file differs from what the code generates. The document is
committed so that every change of the contract shows in review, and a test fails on any diff.

Node -> coordinator calls (register, heartbeat, drain) are described under ``webhooks``: they are
requests the node makes to the coordinator, with the signed ``NodeReport`` body.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from peerd import __version__
from peerd.api import models as m
from peerd.api.spec import ENDPOINTS, PREFIX, Endpoint
from peerd.core.signed import PEER_HEADER, SIGNATURE_HEADER

REF = "#/components/schemas/{model}"

_STATUS_TEXT = {
    200: "OK",
    202: "Accepted: the job is queued",
    400: "Malformed request",
    401: "Missing credentials",
    403: "Wrong credentials",
    404: "Not found",
    409: "Conflicts with the node's state or configuration",
    416: "Range not satisfiable",
    503: "The node is draining",
}

_SIG_HEADERS: dict[str, Any] = {
    PEER_HEADER: {
        "description": "Peer id of the node whose key signed the body.",
        "required": True,
        "schema": {"type": "string", "pattern": m.PEER_ID_PATTERN},
    },
    SIGNATURE_HEADER: {
        "description": "base64url (no padding) of the ed25519 signature of the exact body bytes.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{86}$"},
    },
}

_INFO_DESCRIPTION = """\
The API a peerd node offers its coordinator, and the signed reports it sends to it.

**Authentication.** `Authorization: Bearer <api_token>` on every operation (the token is a secret
shared by node and coordinator). When the node sets `api.require_access_jwt`, a Cloudflare Access
service-token JWT in `Cf-Access-Jwt-Assertion` is required too.

**Signed bodies (node -> coordinator, and challenge answers).** The signature is ed25519 over the
exact body bytes, sent in `X-Peerd-Signature` (base64url, no padding); `X-Peerd-Peer-Id` names the
signer. The public key is embedded in the peer id: base58btc-decode it to
`00 24 08 01 12 20 <32-byte key>`. A report's `timestamp` must be within 60 s of the receiver's
clock and its `nonce` (16 random bytes, hex) never reused within that window.

**Inventory sync.** Keep a digest of what you believe the node holds (sum mod 2^256 of
sha256(`blob:<cid>`) and sha256(`media:<id>`)); when it differs from the heartbeat's
`inventory.digest`, page `GET /inventory?since=<your cursor>` until `more` is false.
"""


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _schemas() -> dict[str, Any]:
    entries: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = []
    seen: set[type[BaseModel]] = set()
    for ep in ENDPOINTS:
        for model, mode in ((ep.body, "validation"), (ep.response, "serialization")):
            if model is not None and model not in seen:
                seen.add(model)
                entries.append((model, mode))  # type: ignore[arg-type]
    entries += [
        (m.ErrorBody, "serialization"),
        (m.NodeReport, "serialization"),
        (m.CoordinatorReply, "validation"),
    ]
    _, top = models_json_schema(entries, ref_template=REF)
    return dict(sorted(top.get("$defs", {}).items()))


def _query_params(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema()
    required = set(schema.get("required", []))
    out = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        desc = prop.pop("description", "")
        prop.pop("title", None)
        out.append(
            {
                "name": name,
                "in": "query",
                "required": name in required,
                "description": desc,
                "schema": prop,
            }
        )
    return out


def _operation(ep: Endpoint) -> dict[str, Any]:
    ok: dict[str, Any] = {
        "description": _STATUS_TEXT[ep.status],
        "content": {"application/json": {"schema": _ref(ep.response.__name__)}},
    }
    if ep.signed:
        ok["headers"] = _SIG_HEADERS
    if ep.status == 202:
        ok["headers"] = {
            "Location": {"description": "URL of the job.", "schema": {"type": "string"}}
        }
    responses: dict[str, Any] = {str(ep.status): ok}
    for code in ep.errors:
        responses[str(code)] = {
            "description": _STATUS_TEXT[code],
            "content": {"application/json": {"schema": _ref("ErrorBody")}},
        }
    op: dict[str, Any] = {
        "operationId": ep.operation_id,
        "summary": ep.summary,
        "description": ep.description,
        "tags": list(ep.tags),
        "security": [{"bearer": []}],
        "responses": responses,
    }
    params: list[dict[str, Any]] = []
    for name, pattern in ep.path_params:
        params.append({"name": name, "in": "path", "required": True, "schema": {"type": "string"}})
        params[-1]["schema"]["pattern"] = pattern
    if ep.query is not None:
        params += _query_params(ep.query)
    if params:
        op["parameters"] = params
    if ep.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(ep.body.__name__)}},
        }
    return op


def _webhook(kind: str, description: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": f"coordinator{kind.title()}",
            "summary": f"Node {kind} (sent by the node to `<coordinator.url>/v1/nodes/{kind}`)",
            "description": description,
            "parameters": [
                {"name": name, "in": "header", **spec} for name, spec in _SIG_HEADERS.items()
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("NodeReport")}},
            },
            "responses": {
                "200": {
                    "description": "Accepted.",
                    "content": {"application/json": {"schema": _ref("CoordinatorReply")}},
                },
                "401": {"description": "Bad signature, stale timestamp or replayed nonce."},
                "404": {"description": "Unknown node: the node registers again."},
            },
        }
    }


def build() -> dict[str, Any]:
    """The OpenAPI document as a dict."""
    paths: dict[str, Any] = {
        f"{PREFIX}/openapi.json": {
            "get": {
                "operationId": "getOpenapi",
                "summary": "This document",
                "description": "The OpenAPI document of this API; needs no authentication.",
                "tags": ["meta"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        }
    }
    for ep in ENDPOINTS:
        paths.setdefault(PREFIX + ep.path, {})[ep.method.lower()] = _operation(ep)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "peerd coordinator API",
            "version": f"1 (peerd {__version__.split('.')[0]})",
            "description": _INFO_DESCRIPTION,
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "security": [{"bearer": []}],
        "paths": paths,
        "webhooks": {
            "register": _webhook("register", "Sent at start and when the coordinator asks."),
            "heartbeat": _webhook("heartbeat", "Sent every coordinator.heartbeat_interval_s."),
            "drain": _webhook("drain", "Sent once on stop; the node exits within the deadline."),
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "api_token."},
                "access": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Cf-Access-Jwt-Assertion",
                    "description": "Cloudflare Access JWT (when api.require_access_jwt).",
                },
            },
        },
    }


def render() -> str:
    """The document as committed: sorted keys, two-space indent, final newline."""
    return json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def committed() -> str:
    """The document shipped in the package."""
    return resources.files("peerd.api").joinpath("openapi.json").read_text("utf-8")


def write(output: Path, *, check: bool = False) -> int:
    """Write the document to ``output``, or with ``check`` compare; returns an exit code."""
    text = render()
    if check:
        current = output.read_text("utf-8") if output.exists() else ""
        if current != text:
            print(f"{output} is out of date: run peerd api-schema", file=sys.stderr)
            return 1
        return 0
    output.write_text(text, "utf-8")
    print(f"wrote {output}")
    return 0
