"""A faithful Iamport (PortOne V1) and PortOne V2 emulator for tests, demos and benchmarks.

Test cards decide outcomes: ``CARD_ALWAYS_PAID`` (and any other number) is approved,
``CARD_SOFT_DECLINE`` fails with ``SOFT_DECLINE_REASON``, ``CARD_HARD_DECLINE`` with
``HARD_DECLINE_REASON``.
"""

from iamport_billing.emulator.config import (
    CARD_ALWAYS_PAID,
    CARD_HARD_DECLINE,
    CARD_SOFT_DECLINE,
    DEFAULT_IMP_KEY,
    DEFAULT_IMP_SECRET,
    HARD_DECLINE_REASON,
    SOFT_DECLINE_REASON,
    EmulatorConfig,
)
from iamport_billing.emulator.server import (
    EmulatorHandle,
    EmulatorProcess,
    create_app,
    issue_billing_key,
    register_card,
    run_emulator_in_thread,
    start_emulator_process,
)
from iamport_billing.emulator.store import Store, mask_card_number, seed_customers

__all__ = [
    "CARD_ALWAYS_PAID",
    "CARD_HARD_DECLINE",
    "CARD_SOFT_DECLINE",
    "DEFAULT_IMP_KEY",
    "DEFAULT_IMP_SECRET",
    "HARD_DECLINE_REASON",
    "SOFT_DECLINE_REASON",
    "EmulatorConfig",
    "EmulatorHandle",
    "EmulatorProcess",
    "Store",
    "create_app",
    "mask_card_number",
    "issue_billing_key",
    "register_card",
    "run_emulator_in_thread",
    "seed_customers",
    "start_emulator_process",
]
