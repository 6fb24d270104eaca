"""Validate API responses and signed reports against the committed OpenAPI document."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

from peerd.api.openapi import committed


class SchemaViolation(AssertionError):
    """A response that the OpenAPI document does not allow."""


@cache
def _document() -> str:
    return committed()


class OpenApiDocument:
    """The committed document, with lookups of response and component schemas."""

    def __init__(self, doc: dict[str, Any] | None = None) -> None:
        self.doc = doc if doc is not None else json.loads(_document())
        self._validators: dict[str, Draft202012Validator] = {}

    def _validator(self, key: str, schema: dict[str, Any]) -> Draft202012Validator:
        v = self._validators.get(key)
        if v is None:
            # Refs are "#/components/schemas/X": put the components next to the schema.
            v = Draft202012Validator({**schema, "components": self.doc["components"]})
            self._validators[key] = v
        return v

    def response_schema(self, method: str, template: str, status: int) -> dict[str, Any]:
        """The JSON schema of a documented response; SchemaViolation if undocumented."""
        op = self.doc["paths"].get(template, {}).get(method.lower())
        if op is None:
            raise SchemaViolation(f"{method} {template} is not in the document")
        resp = op["responses"].get(str(status))
        if resp is None:
            raise SchemaViolation(f"{method} {template} answered undocumented status {status}")
        schema: dict[str, Any] = resp["content"]["application/json"]["schema"]
        return schema

    def validate_response(self, method: str, template: str, status: int, body: Any) -> None:
        """Raise :class:`SchemaViolation` unless ``body`` fits the documented response."""
        schema = self.response_schema(method, template, status)
        errors = list(self._validator(f"{method} {template} {status}", schema).iter_errors(body))
        if errors:
            first = errors[0]
            where = "/".join(str(p) for p in first.absolute_path) or "(body)"
            raise SchemaViolation(
                f"{method} {template} {status}: {where}: {first.message} ({len(errors)} errors)"
            )

    def validate_component(self, name: str, instance: Any) -> None:
        """Raise :class:`SchemaViolation` unless ``instance`` fits ``components/schemas/name``."""
        ref = {"$ref": f"#/components/schemas/{name}"}
        errors = list(self._validator(name, ref).iter_errors(instance))
        if errors:
            raise SchemaViolation(f"{name}: {errors[0].message}")
