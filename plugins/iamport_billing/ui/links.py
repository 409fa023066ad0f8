"""URLs between the Billing page and the Airflow UI, and the operator extra link.

Kept free of FastAPI imports: workers import this module (through ChargeAgainOperator) to
compute the extra link at task end.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, urlencode

from airflow.sdk import BaseOperatorLink

URL_PREFIX = "/billing"
MAPPED_TASK_RE = re.compile(r"^(?P<task_id>.+)\[(?P<map_index>-?\d+)\]$")


def airflow_base_url() -> str:
    """``[api] base_url`` without a trailing slash ("" when unset: links stay site-relative)."""
    from airflow.configuration import conf

    return (conf.get("api", "base_url", fallback="") or "").rstrip("/")


def split_task_id(ledger_task_id: str) -> tuple[str, int | None]:
    """The ledger writes mapped tasks as ``charge[3]``: -> ("charge", 3); ``plan`` -> (.., None)."""
    match = MAPPED_TASK_RE.match(ledger_task_id)
    if match:
        return match["task_id"], int(match["map_index"])
    return ledger_task_id, None


def dag_run_url(dag_id: str, run_id: str, base: str = "") -> str:
    return f"{base}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def task_log_url(dag_id: str, run_id: str, ledger_task_id: str, base: str = "") -> str:
    """The task instance page (its log) in the Airflow 3 UI; mapped tasks carry map_index."""
    task_id, map_index = split_task_id(ledger_task_id)
    url = f"{dag_run_url(dag_id, run_id, base)}/tasks/{quote(task_id, safe='')}"
    return url if map_index is None else f"{url}?map_index={map_index}"


def billing_url(path: str = "/", base: str = "", **params: Any) -> str:
    """A Billing page URL; parameters that are None or "" are left out."""
    query = {k: v for k, v in params.items() if v not in (None, "")}
    url = f"{base}{URL_PREFIX}{path}"
    return f"{url}?{urlencode(query)}" if query else url


class BillingPageLink(BaseOperatorLink):
    """ "Billing" button on a charge task: the attempts that task's run wrote to the ledger."""

    name = "Billing"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return billing_url(
            "/attempts", airflow_base_url(), dag_id=ti_key.dag_id, run_id=ti_key.run_id
        )
