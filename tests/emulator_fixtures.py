"""Helpers for emulator tests: a spec validator for V1 responses and a thin HTTP client.

The validator reads the official Swagger 2.0 spec. Swagger 2.0 has no ``null``; the real API
sends ``message: null`` and ``response: null`` and nulls for fields a PG does not report, so a
property that is *not* required (or is ``x-nullable``) may be null. Required ones must be present
and typed. Numeric keywords the spec writes as strings (``maxLength: "40"``) are read as numbers.
Swagger 2.0 is JSON Schema draft 4, so draft 4 rules apply (``1.0`` is not an ``integer``).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jsonschema
import requests

# PortOne's official spec, in the shared/ folder beside the checkout (CI lays it there too).
_BESIDE = Path(__file__).resolve().parents[2] / "shared" / "iamport" / "v1.openapi.json"
SPEC_PATH = _BESIDE if _BESIDE.exists() else Path("/work/shared/iamport/v1.openapi.json")
NUMERIC_KEYWORDS = ("maxLength", "minLength", "maximum", "minimum", "maxItems", "minItems")


def _normalize(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    required = set(schema.get("required", []))
    for key, value in schema.items():
        if key in NUMERIC_KEYWORDS and isinstance(value, str):
            out[key] = float(value) if "." in value else int(value)
        elif key == "properties":
            out[key] = {}
            for name, prop in value.items():
                prop = _normalize(prop)
                if name not in required or prop.get("x-nullable"):
                    prop = {"anyOf": [prop, {"type": "null"}]}
                out[key][name] = prop
        elif key in ("items", "additionalProperties"):
            out[key] = _normalize(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_normalize(s) for s in value]
        else:
            out[key] = value
    return out


@cache
def spec() -> dict[str, Any]:
    return json.loads(SPEC_PATH.read_text())


@cache
def _definitions() -> dict[str, Any]:
    return {name: _normalize(s) for name, s in spec()["definitions"].items()}


def _ref_of(schema: dict[str, Any]) -> str:
    """The definition a response schema names.

    Customer endpoints declare ``{properties: {CustomerResponse: $ref, SuperBillingKeyResponse:
    $ref}}``, meaning "one of these"; the emulator issues ordinary billing keys, so it is
    CustomerResponse.
    """
    if "$ref" in schema:
        return schema["$ref"]
    return schema["properties"]["CustomerResponse"]["$ref"]


def response_ref(method: str, template: str, status: int) -> str:
    """The ``#/definitions/...`` the spec gives for this answer (envelope only for errors)."""
    paths = spec()["paths"]
    if template not in paths:
        template += "/{payment_status}"  # the spec folds the optional segment into one path
    responses = paths[template][method.lower()]["responses"]
    declared = responses.get(str(status), {})
    if "schema" in declared:
        return _ref_of(declared["schema"])
    if 200 <= status < 300:
        raise AssertionError(f"{method} {template}: HTTP {status} is not in the spec")
    return "#/definitions/ResponseAnnotation"


def validate_response(method: str, template: str, status: int, body: Any) -> None:
    """Raise jsonschema.ValidationError unless ``body`` matches the spec for this answer."""
    ref = response_ref(method, template, status)
    schema = {"$ref": ref, "definitions": _definitions()}
    jsonschema.Draft4Validator(schema).validate(body)
    if status >= 400:
        assert body["code"] != 0 and body["response"] is None and body["message"], body


class Api:
    """Calls the emulator by path template and validates every JSON answer against the spec."""

    def __init__(self, url: str, imp_key: str = "imp_test_key", secret: str = "imp_test_secret"):
        self.url = url
        self.imp_key = imp_key
        self.secret = secret
        self.session = requests.Session()
        self._token: str | None = None

    def get_token(self) -> dict[str, Any]:
        r = self.call(
            "POST", "/users/getToken", auth=False,
            json={"imp_key": self.imp_key, "imp_secret": self.secret},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()["response"]

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = self.get_token()["access_token"]
        return self._token

    def call(
        self,
        method: str,
        template: str,
        *,
        auth: bool | str = True,
        validate: bool = True,
        **kwargs: Any,
    ) -> requests.Response:
        """``auth``: True = Bearer token, False = none, a string = that Authorization header."""
        path_params = {k: kwargs.pop(k) for k in list(kwargs) if "{" + k + "}" in template}
        path = template.format(**{k: quote(str(v), safe="") for k, v in path_params.items()})
        headers = kwargs.pop("headers", {})
        if auth is True:
            headers["Authorization"] = f"Bearer {self.token}"
        elif isinstance(auth, str):
            headers["Authorization"] = auth
        r = self.session.request(method, self.url + path, headers=headers, timeout=30, **kwargs)
        if validate:
            validate_response(method, template, r.status_code, r.json())
        return r

    def register(self, customer_uid: str, card_number: str, **fields: Any) -> dict[str, Any]:
        r = self.call(
            "POST", "/subscribe/customers/{customer_uid}", customer_uid=customer_uid,
            json={"card_number": card_number, "expiry": "2030-12", "birth": "900101", **fields},
        )  # fmt: skip
        assert r.json()["code"] == 0, r.text
        return r.json()["response"]

    def charge(
        self, customer_uid: str, merchant_uid: str, amount: int | float = 10_000, **fields: Any
    ) -> dict[str, Any]:
        """POST again; returns the whole envelope."""
        body = {"customer_uid": customer_uid, "merchant_uid": merchant_uid, "amount": amount}
        body.setdefault("name", "monthly plan")
        body.update(fields)
        r = self.call("POST", "/subscribe/payments/again", json=body)
        assert r.status_code == 200, r.text
        return r.json()
