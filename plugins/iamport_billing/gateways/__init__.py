"""Payment gateways behind one interface (``base.Gateway``); ``gateway_for`` picks one by the
connection's type."""

from __future__ import annotations

from iamport_billing.gateways.base import Gateway


def gateway_for(conn_id: str, *, pool_maxsize: int = 16) -> Gateway:
    """The gateway of an Airflow connection (type ``iamport``: Iamport V1)."""
    from iamport_billing.gateways.iamport_v1 import IamportV1Gateway

    return IamportV1Gateway.from_conn_id(conn_id, pool_maxsize=pool_maxsize)
