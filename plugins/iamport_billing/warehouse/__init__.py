"""All SQL of the product: schema, ledger transitions, due-query paging, write-back, reports.

One ``Dialect`` per database (SQLite, PostgreSQL, MySQL/MariaDB), chosen from the connection's
hook. Callers use the named methods of ``Ledger`` and ``BillingQueries``, never SQL fragments.
"""

from iamport_billing.warehouse.ledger import (
    DEFAULT_DUE_QUERY,
    Attempt,
    Ledger,
    Outcome,
    Refused,
    checked_identifier,
    new_claim_token,
)
from iamport_billing.warehouse.schema import ATTEMPTS, PLAN_ITEMS, RUNS, SUBSCRIPTIONS

__all__ = [
    "ATTEMPTS", "DEFAULT_DUE_QUERY", "PLAN_ITEMS", "RUNS", "SUBSCRIPTIONS", "Attempt", "Ledger",
    "Outcome", "Refused", "checked_identifier", "new_claim_token",
]  # fmt: skip
