"""Payment gateways behind one interface (``base.Gateway``); ``gateway_for`` picks one by the
connection's type."""

from __future__ import annotations

from iamport_billing.gateways.base import Gateway


def gateway_for(conn_id: str, *, pool_maxsize: int = 16) -> Gateway:
    """The gateway of an Airflow connection: type ``portone`` is PortOne V2, anything else
    (``iamport``) Iamport V1."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn_type = BaseHook.get_connection(conn_id).conn_type
    except AirflowNotFoundException:
        conn_type = None  # the hook says so when it is first used, as before
    if conn_type == "portone":
        from iamport_billing.gateways.portone_v2 import PortOneV2Gateway

        return PortOneV2Gateway.from_conn_id(conn_id, pool_maxsize=pool_maxsize)
    from iamport_billing.gateways.iamport_v1 import IamportV1Gateway

    return IamportV1Gateway.from_conn_id(conn_id, pool_maxsize=pool_maxsize)
