"""The Airflow plugin: the Billing page (a FastAPI app) and its "Billing" nav entry, and the
gateway webhook receiver (a second FastAPI app, not behind Airflow's login).

Registered through the ``airflow.plugins`` entry point in pyproject.toml (the plugins folder is
ignored by ``plugins/.airflowignore``), so it loads wherever the distribution is installed.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from iamport_billing.ui.app import create_app
from iamport_billing.ui.links import URL_PREFIX, billing_url
from iamport_billing.webhooks import app as webhooks

# A card icon, inline so nothing is fetched from outside.
ICON = (
    "data:image/svg+xml;utf8,<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 24 24' "
    "fill='none' stroke='%23888' stroke-width='2'><rect x='2' y='5' width='20' height='14' "
    "rx='2'/><line x1='2' y1='10' x2='22' y2='10'/></svg>"
)


class IamportBillingPlugin(AirflowPlugin):
    name = "iamport_billing"
    fastapi_apps = [
        {"app": create_app(), "url_prefix": URL_PREFIX, "name": "Billing"},
        {
            "app": webhooks.create_app(),
            "url_prefix": webhooks.URL_PREFIX,
            "name": "Billing webhooks",
        },
    ]
    external_views = [
        {
            "name": "Billing",
            "href": billing_url("/"),
            "icon": ICON,
            "url_route": "billing",
            "destination": "nav",
        }
    ]
