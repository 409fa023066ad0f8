"""A zombie try: a charge task's next try runs while its first try's request hangs.

In a deployment, a worker whose charge request hangs in the network stops heartbeating; the
scheduler gives up on that try and runs the next, while the first one's request is still on
its way. ``dag.test()`` runs one task at a time in one process, so the simulation makes the
next try itself: the same charge operator, rendered by Airflow for the first try, run with
the next try number in a thread while the first try waits on its hung request. Only the
scheduler's part (deciding to start the next try) is played by the simulation.

Airflow's in-process task comms are one per process: the next try starts only after the lease
has passed, when the first try's other requests are long answered and it only waits on the
hung one, so the two never talk to Airflow at once.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from types import SimpleNamespace
from typing import Any, Protocol

from iamport_billing.emulator.config import CARD_SOFT_DECLINE
from iamport_billing.emulator.store import Store, customer_row

log = logging.getLogger(__name__)


class HoldingGateway(Protocol):
    def hold(self, charges: int) -> None: ...
    def held(self) -> dict[str, str]: ...
    def release(self) -> None: ...
    def billing_keys(self) -> Store: ...


class NextTryWhileTheFirstHangs:
    """Started as try 1 of a charge task starts: its first charge request will hang at the
    gateway. Once it does, that card declines, the lease passes and the next try runs the same
    batch; then the card is as it was and the hung request reaches the gateway. Iamport V1
    knows nothing of it meanwhile (the next try takes the row over and is declined); PortOne V2
    shows it READY (the next try leaves it to the first)."""

    def __init__(self, task_instance: Any, gateway: HoldingGateway, lease_seconds: float) -> None:
        self.gateway, self.lease_seconds = gateway, lease_seconds
        self.task = copy.copy(task_instance.task)
        self.context = dict(task_instance.get_template_context())
        self.context["ti"] = SimpleNamespace(
            dag_id=task_instance.dag_id, run_id=task_instance.run_id,
            task_id=task_instance.task_id, map_index=task_instance.map_index,
            try_number=task_instance.try_number + 1,
        )  # fmt: skip
        self.first_try_over = threading.Event()
        self.held_merchant_uid: str | None = None
        self.error: BaseException | None = None  # what the next try raised
        self.summary: dict[str, Any] = {}  # what it returned (the charge summary)
        self.thread = threading.Thread(target=self._next_try, name="next-try", daemon=True)
        gateway.hold(1)
        self.thread.start()

    def first_try_ended(self) -> None:
        """No later charge task's request may be held in its place."""
        self.first_try_over.set()
        self.gateway.release()

    def finish(self) -> None:
        """After the run: nothing stays held, and the next try is over."""
        self.first_try_ended()
        self.thread.join()

    def _next_try(self) -> None:
        held = self._held()
        if not held:
            return  # try 1 sent nothing
        keys = self.gateway.billing_keys()
        self.held_merchant_uid, customer_uid = next(iter(held.items()))
        card = keys.get_customer(customer_uid)
        keys.save_customers([customer_row(customer_uid, CARD_SOFT_DECLINE, int(time.time()))])
        try:
            time.sleep(self.lease_seconds + 0.5)  # the scheduler waits out the try's lease
            self.summary = self.task.execute(self.context) or {}
        except Exception as e:
            self.error = e
            log.exception("the next try of %s failed", self.context["ti"].task_id)
        finally:
            if card is not None:
                keys.save_customers([card])
            self.gateway.release()

    def _held(self) -> dict[str, str]:
        while not self.first_try_over.is_set():
            if found := self.gateway.held():
                return found
            time.sleep(0.02)
        return {}
