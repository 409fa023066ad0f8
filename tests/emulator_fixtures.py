"""Helpers for emulator tests: spec validators for V1 and V2 responses and thin HTTP clients.

The validator reads the official Swagger 2.0 spec. Swagger 2.0 has no ``null``; the real API
sends ``message: null`` and ``response: null`` and nulls for fields a PG does not report, so a
property that is *not* required (or is ``x-nullable``) may be null. Required ones must be present
and typed. Numeric keywords the spec writes as strings (``maxLength: "40"``) are read as numbers.
Swagger 2.0 is JSON Schema draft 4, so draft 4 rules apply (``1.0`` is not an ``integer``).
"""

from __future__ import annotations

import json
from datetime import datetime
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


# -- PortOne V2 ------------------------------------------------------------------------------------
#
# The V2 spec is OpenAPI 3.0.3: schemas under components/schemas, responses by content type,
# tagged unions as ``oneOf`` + ``discriminator``. A member of a union declares its tag as a plain
# string, so several members match any body and JSON Schema's ``oneOf`` cannot tell them apart:
# each discriminated union becomes "the tag is one of the mapping's keys, and the member that key
# names validates the body". Objects are closed (no property the spec does not name), so a
# misspelt field fails; OpenAPI 3.0 has no null unless ``nullable``. An error member's
# ``x-portone-status-code`` must be the HTTP status it came with; date-times must be RFC 3339.

_V2_BESIDE = Path(__file__).resolve().parents[2] / "shared" / "portone" / "v2.openapi.json"
V2_SPEC_PATH = _V2_BESIDE if _V2_BESIDE.exists() else Path("/work/shared/portone/v2.openapi.json")
V2_REF = "#/components/schemas/"
# Documented on the REST V2 overview page, absent from the spec: checked as the common error shape.
V2_UNSPECIFIED_ERRORS = {"IDEMPOTENCY_OUTSTANDING_REQUEST": 409}
V2_ERROR_SHAPE = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
    "additionalProperties": False,
}


V2_FORMATS = jsonschema.FormatChecker(formats=())


@V2_FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    """RFC 3339 with a zone (``...Z`` or ``+09:00``), as the spec's ``format: date-time``."""
    if not isinstance(value, str):
        return True
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return "T" in value and moment.tzinfo is not None


def _v2_normalize(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_v2_normalize(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: _v2_normalize(v)
        for k, v in schema.items()
        if k not in ("discriminator", "nullable") and not k.startswith("x-")
    }
    if "$ref" in out:
        out["$ref"] = out["$ref"].replace(V2_REF, "#/definitions/")
    if "properties" in out and out.get("type") == "object":
        out["properties"] = {k: _v2_normalize(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    if "discriminator" in schema:
        tag = schema["discriminator"]["propertyName"]
        mapping = schema["discriminator"]["mapping"]
        del out["oneOf"]
        out["required"] = [tag]
        out["properties"] = {tag: {"enum": sorted(mapping)}}
        out["allOf"] = [
            {
                "if": {"properties": {tag: {"const": key}}},
                "then": {"$ref": ref.replace(V2_REF, "#/definitions/")},
            }
            for key, ref in mapping.items()
        ]
    if schema.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def v2_spec() -> dict[str, Any]:
    return json.loads(V2_SPEC_PATH.read_text())


@cache
def _v2_definitions() -> dict[str, Any]:
    return {name: _v2_normalize(s) for name, s in v2_spec()["components"]["schemas"].items()}


def v2_response_ref(method: str, template: str, status: int) -> str:
    """The schema the spec gives for this answer, e.g. ``#/definitions/PayWithBillingKeyError``."""
    responses = v2_spec()["paths"][template][method.lower()]["responses"]
    declared = responses.get(str(status))
    if declared is None:
        raise AssertionError(f"{method} {template}: HTTP {status} is not in the spec")
    ref = declared["content"]["application/json"]["schema"]["$ref"]
    return ref.replace(V2_REF, "#/definitions/")


def _v2_error_status(body: dict[str, Any], union: str) -> int | None:
    """The ``x-portone-status-code`` of the union member the body's type names."""
    schema = v2_spec()["components"]["schemas"][union]
    member = schema["discriminator"]["mapping"].get(body.get("type"))
    if member is None:
        return None
    return v2_spec()["components"]["schemas"][member.removeprefix(V2_REF)].get(
        "x-portone-status-code"
    )


def validate_v2_response(method: str, template: str, status: int, body: Any) -> None:
    """Raise jsonschema.ValidationError (or AssertionError) unless ``body`` is what the spec
    says this endpoint answers with this status."""
    if status >= 400 and isinstance(body, dict) and body.get("type") in V2_UNSPECIFIED_ERRORS:
        assert status == V2_UNSPECIFIED_ERRORS[body["type"]], (status, body)
        jsonschema.Draft7Validator(V2_ERROR_SHAPE).validate(body)
        return
    ref = v2_response_ref(method, template, status)
    schema = {"$ref": ref, "definitions": _v2_definitions()}
    jsonschema.Draft7Validator(schema, format_checker=V2_FORMATS).validate(body)
    if status >= 400:
        expected = _v2_error_status(body, ref.removeprefix("#/definitions/"))
        assert expected == status, f"{body['type']} is HTTP {expected} in the spec, got {status}"


class ApiV2:
    """Calls the V2 emulator by path template and validates every JSON answer against the spec."""

    def __init__(self, url: str, secret: str = "portone_test_api_secret") -> None:
        self.url = url
        self.secret = secret
        self.session = requests.Session()

    def call(
        self,
        method: str,
        template: str,
        *,
        auth: bool | str = True,
        validate: bool = True,
        idempotency_key: str | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        """``auth``: True = ``PortOne <secret>``, False = none, a string = that header;
        ``idempotency_key`` is sent as an RFC 8941 string (quoted)."""
        path_params = {k: kwargs.pop(k) for k in list(kwargs) if "{" + k + "}" in template}
        path = template.format(**{k: quote(str(v), safe="") for k, v in path_params.items()})
        headers = kwargs.pop("headers", {})
        if auth is True:
            headers["Authorization"] = f"PortOne {self.secret}"
        elif isinstance(auth, str):
            headers["Authorization"] = auth
        if idempotency_key is not None:
            headers["Idempotency-Key"] = f'"{idempotency_key}"'
        r = self.session.request(method, self.url + path, headers=headers, timeout=30, **kwargs)
        if validate:
            validate_v2_response(method, template, r.status_code, r.json())
        return r

    def issue(self, card_number: str, **fields: Any) -> str:
        """POST /billing-keys with card credentials; returns the billing key."""
        card = {"number": card_number.replace("-", ""), "expiryYear": "30", "expiryMonth": "12"}
        body = {"method": {"card": {"credential": card}}, **fields}
        r = self.call("POST", "/billing-keys", json=body)
        assert r.status_code == 200, r.text
        return r.json()["billingKeyInfo"]["billingKey"]

    def pay(
        self,
        payment_id: str,
        billing_key: str,
        total: int = 10_000,
        idempotency_key: str | None = None,
        validate: bool = True,
        **fields: Any,
    ) -> requests.Response:
        """POST payWithBillingKey; ``fields`` go into the body."""
        body = {
            "billingKey": billing_key,
            "orderName": "monthly plan",
            "amount": {"total": total},
            "currency": "KRW",
            **fields,
        }
        return self.call(
            "POST", "/payments/{paymentId}/billing-key", paymentId=payment_id, json=body,
            idempotency_key=idempotency_key, validate=validate,
        )  # fmt: skip
