"""Provider metadata read by Airflow's ProvidersManager (entry point ``apache_airflow_provider``).

The connection form is declared here (``conn-fields`` / ``ui-field-behaviour``), which is how
Airflow 3.2+ builds connection forms; plugins cannot register connection types.
"""

from __future__ import annotations

from typing import Any

from iamport_billing import __version__

CONN_TYPE = "iamport"

CONNECTION_EXTRA_FIELDS: dict[str, dict[str, Any]] = {
    "tier_code": {
        "label": "Tier code",
        "description": "Sub-merchant (agency) Tier code, sent as the `Tier` header. Leave empty.",
        "schema": {"type": ["string", "null"], "maxLength": 3},
    },
    "header_style": {
        "label": "Authorization header style",
        "description": "`bearer` (Authorization: Bearer <token>, per the docs) or `raw` "
        "(Authorization: <token>, as the old official clients send).",
        # Not named auth_header_*: Airflow masks extras whose names look sensitive.
        "schema": {
            "type": ["string", "null"],
            "enum": ["bearer", "raw", None],
            "default": "bearer",
        },
    },
    "connect_timeout": {
        "label": "Connect timeout (s)",
        "description": "Seconds to establish a TCP/TLS connection.",
        "schema": {"type": ["number", "null"], "minimum": 0.1, "default": 10},
    },
    "read_timeout": {
        "label": "Read timeout (s)",
        "description": "Seconds to wait for a response. A charge that times out is 'unknown' "
        "and is looked up, never resent blindly.",
        "schema": {"type": ["number", "null"], "minimum": 0.1, "default": 30},
    },
    "max_retries": {
        "label": "Max retries for reads",
        "description": "Retries for GET lookups on 5xx, 429 and connection errors.",
        "schema": {"type": ["integer", "null"], "minimum": 0, "maximum": 10, "default": 3},
    },
    "verify_tls": {
        "label": "Verify TLS certificates",
        "description": "Keep on. Turning it off is for local test servers only.",
        "schema": {"type": ["boolean", "null"], "default": True},
    },
    "allow_insecure_http": {
        "label": "Allow plain http to non-loopback hosts",
        "description": "Plain http is always allowed to 127.0.0.1/localhost (the emulator); "
        "anything else needs this switch.",
        "schema": {"type": ["boolean", "null"], "default": False},
    },
    "include_sandbox": {
        "label": "Include sandbox payments in lookups",
        "description": "Send include_sandbox=true on payment lookups (test channels).",
        "schema": {"type": ["boolean", "null"], "default": False},
    },
}

# The connection's request limit (rate_limit.py), the same on both connection types.
RATE_LIMIT_EXTRA_FIELDS: dict[str, dict[str, Any]] = {
    "requests_per_second": {
        "label": "Requests per second",
        "description": "Rate limit of every request of this connection; shared by all tasks "
        "and workers when a Redis connection is set below. Empty: no limit.",
        "schema": {"type": ["number", "null"], "exclusiveMinimum": 0},
    },
    "max_in_flight": {
        "label": "Max requests in flight",
        "description": "Most requests of this connection at the gateway at once. Empty: no limit.",
        "schema": {"type": ["integer", "null"], "minimum": 1},
    },
    "rate_limit_redis_conn_id": {
        "label": "Rate limit Redis connection",
        "description": "An Airflow redis connection (the Celery broker's Redis) sharing the "
        "limit across workers. Empty: per process only, NOT shared. Unreachable: nothing sent.",
        "schema": {"type": ["string", "null"]},
    },
    "adaptive": {
        "label": "Adaptive rate",
        "description": "Back off on 429, 5xx and slow replies, then recover up to the limit.",
        "schema": {"type": ["boolean", "null"], "default": True},
    },
}
CONNECTION_EXTRA_FIELDS.update(RATE_LIMIT_EXTRA_FIELDS)


PORTONE_CONN_TYPE = "portone"

# The shared transport extras keep the iamport form's wording; the read timeout's default is
# PortOne's recommended minimum (a charge waits on the card company).
PORTONE_CONNECTION_EXTRA_FIELDS: dict[str, dict[str, Any]] = {
    "store_id": {
        "label": "Store ID",
        "description": "storeId sent with every call (multi-store accounts). Leave empty to "
        "use the secret's own store.",
        "schema": {"type": ["string", "null"]},
    },
    "channel_key": {
        "label": "Channel key",
        "description": "channelKey of billing-key charges. Leave empty for the key's channel.",
        "schema": {"type": ["string", "null"]},
    },
    "connect_timeout": CONNECTION_EXTRA_FIELDS["connect_timeout"],
    "read_timeout": {
        "label": "Read timeout (s)",
        "description": "Seconds to wait for a response; PortOne recommends at least 60. A "
        "charge that times out is sent again with the same Idempotency-Key (PortOne replays "
        "its first answer) and is 'unknown' when no answer comes.",
        "schema": {"type": ["number", "null"], "minimum": 0.1, "default": 60},
    },
    "max_retries": {
        "label": "Max retries",
        "description": "Retries of a read (5xx, 429, connection errors), and of a charge or "
        "cancel whose reply was lost (same Idempotency-Key).",
        "schema": {"type": ["integer", "null"], "minimum": 0, "maximum": 10, "default": 3},
    },
    "exchange_budget_s": {
        "label": "Time budget of one call (s)",
        "description": "No new send or read of one call after this long, so a charge and its "
        "lookup end well inside the ledger's pending lease (300 s).",
        "schema": {"type": ["number", "null"], "minimum": 1, "default": 60},
    },
    "verify_tls": CONNECTION_EXTRA_FIELDS["verify_tls"],
    "allow_insecure_http": CONNECTION_EXTRA_FIELDS["allow_insecure_http"],
    **RATE_LIMIT_EXTRA_FIELDS,
}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-iamport-billing",
        "name": "Iamport Billing",
        "description": "Recurring card billing through Iamport (PortOne V1) or PortOne V2.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Iamport",
                "external-doc-url": "https://developers.portone.io/api/rest-v1",
                "tags": ["service"],
            },
            {
                "integration-name": "PortOne",
                "external-doc-url": "https://developers.portone.io/api/rest-v2",
                "tags": ["service"],
            },
        ],
        "hooks": [
            {"integration-name": "Iamport", "python-modules": ["iamport_billing.hooks.iamport"]},
            {"integration-name": "PortOne", "python-modules": ["iamport_billing.hooks.portone"]},
        ],
        "operators": [
            {
                "integration-name": "Iamport",
                "python-modules": [
                    "iamport_billing.operators.charge",
                ],
            }
        ],
        "connection-types": [
            {
                "connection-type": CONN_TYPE,
                "hook-class-name": "iamport_billing.hooks.iamport.IamportHook",
                "hook-name": "Iamport (PortOne V1)",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port"],
                    "relabeling": {
                        "host": "API base URL",
                        "login": "imp_key (REST API key)",
                        "password": "imp_secret (REST API secret)",
                    },
                    "placeholders": {
                        "host": "https://api.iamport.kr",
                        "login": "imp_key from the PortOne console (V1 API)",
                        "password": "imp_secret",
                        "tier_code": "e.g. A01 (sub-merchants only)",
                        "header_style": "bearer",
                        "connect_timeout": "10",
                        "read_timeout": "30",
                    },
                },
                "conn-fields": CONNECTION_EXTRA_FIELDS,
            },
            {
                "connection-type": PORTONE_CONN_TYPE,
                "hook-class-name": "iamport_billing.hooks.portone.PortOneHook",
                "hook-name": "PortOne V2",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"host": "API base URL", "password": "V2 API secret"},
                    "placeholders": {
                        "host": "https://api.portone.io",
                        "password": "V2 API secret from the PortOne console",
                        "store_id": "store-... (multi-store accounts only)",
                        "channel_key": "channel-key-... (optional)",
                        "connect_timeout": "10",
                        "read_timeout": "60",
                    },
                },
                "conn-fields": PORTONE_CONNECTION_EXTRA_FIELDS,
            },
        ],
    }
