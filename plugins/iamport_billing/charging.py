"""The charge engine: turns validated candidates into exactly-once charges.

Order of work for a batch, which is the whole safety argument:
1. read the ledger for these subscriptions; paid or settled ones are skipped;
2. pending/unknown rows left by earlier runs are looked up at the gateway before anything else;
3. new attempts are claimed by committing ``pending`` rows (write-ahead, insert-unless-exists);
4. just before each POST the ledger confirms the row is still this engine's and pending;
5. requests go out with bounded concurrency under a requests-per-second limit, and outcomes are
   committed in small bulk writes as they arrive, through the state table's compare-and-set;
6. outcomes that stayed unknown are looked up, and resent with the same merchant_uid only when
   the gateway's own word says it has no record of them (never on "could not ask").

The engine talks to one ``gateways.base.Gateway`` and sees only its neutral answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from itertools import chain
from queue import Empty, SimpleQueue
from typing import Any

from iamport_billing.api_types import Payment
from iamport_billing.gateways.base import (
    ABSENT,
    DECLINED,
    FOREIGN_REPLY,
    FOUND,
    NO_BILLING_KEY,
    NOT_SENT,
    RATE_LIMITED,
    UNREACHABLE,
    ChargeRequest,
    ChargeResult,
    CredentialsRefused,
    Gateway,
    GatewayUnavailable,
    Lookup,
)
from iamport_billing.gateways.base import (
    REFUSED as REFUSED_REQUEST,
)
from iamport_billing.policy import (
    SEOUL,
    ChargeCandidate,
    DeclineTable,
    merchant_uid_for,
    next_retry_date,
)
from iamport_billing.states import (
    ABANDONED,
    AMOUNT_MISMATCH,
    CANCELLED,
    FAILED,
    HARD,
    MISSING_BILLING_KEY,
    MONEY_MOVED,
    PAID,
    PENDING,
    REFUSED,
    SOFT,
    SUB_CANCELLED,
    UNKNOWN,
    UNSETTLED,
)
from iamport_billing.warehouse.ledger import (
    Attempt,
    Ledger,
    Outcome,
    Refused,
    lease_cutoff,
    new_claim_token,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChargeSettings:
    max_concurrency: int = 8
    requests_per_second: float | None = None
    retry_schedule_days: tuple[int, ...] = (1, 3, 5, 7)
    decline_table: DeclineTable = field(default_factory=DeclineTable)
    # An unsettled row younger than this may still be in flight in another process.
    pending_lease_seconds: float = 300.0
    # Wait this long after an unknown outcome before asking Iamport what happened.
    unknown_settle_seconds: float = 2.0
    # Rounds of "look up, resend if Iamport never saw it" for unknown outcomes in a batch.
    max_resend_rounds: int = 2
    rate_limit_retries: int = 5
    flush_every: int = 50
    flush_seconds: float = 0.5


class RateLimiter:
    """Spaces request starts evenly: at most ``per_second`` starts in any second."""

    def __init__(self, per_second: float | None):
        self.interval = 1.0 / per_second if per_second else 0.0
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        delay = start - now
        if delay > 0:
            time.sleep(delay)


@dataclass
class BatchResult:
    """Counts and amounts by outcome; the operator's XCom (no customer data)."""

    counts: dict[str, int] = field(default_factory=dict)
    amounts: dict[str, int] = field(default_factory=dict)
    charges_sent: int = 0
    unknown_merchant_uids: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def add(self, outcome: str, amount: int | None) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        self.amounts[outcome] = self.amounts.get(outcome, 0) + int(amount or 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(sorted(self.counts.items())),
            "amounts": dict(sorted(self.amounts.items())),
            "charges_sent": self.charges_sent,
            "unknown": len(self.unknown_merchant_uids),
        }


@dataclass(frozen=True)
class PlannedCharge:
    """A candidate bound to its attempt number and merchant_uid."""

    candidate: ChargeCandidate
    attempt_no: int
    merchant_uid: str
    # Sent before (by an earlier try, run or round): a refusal now may be Iamport still
    # working on the first request, so it can never be taken as a decline.
    resend: bool = False

    def ledger_row(self, run: Mapping[str, Any]) -> dict[str, Any]:
        c = self.candidate
        return {
            "merchant_uid": self.merchant_uid,
            "subscription_id": c.subscription_id,
            "billing_date": c.billing_date,
            "attempt_no": self.attempt_no,
            "customer_uid": c.customer_uid,
            "amount": c.amount,
            "currency": c.currency,
            "name": c.name,
            **run,
        }


def outcome_from_payment(
    payment: Payment, expected_amount: int | None, billing_date: date, attempt_no: int,
    settings: ChargeSettings, latency_ms: int | None = None, decline_code: str | None = None,
) -> Outcome:  # fmt: skip
    """Map a gateway's payment to a ledger outcome (paid / failed with decline kind); the
    decline table reads the reason and, when the gateway gave one (PortOne's pgCode), the code."""
    if payment.is_paid or payment.status == CANCELLED:
        status = PAID if payment.is_paid else CANCELLED
        error = None
        if expected_amount is not None and int(payment.amount) != int(expected_amount):
            error = f"paid amount {payment.amount} differs from requested {expected_amount}"
            if status == PAID:
                status = AMOUNT_MISMATCH
        return Outcome(
            merchant_uid=payment.merchant_uid,
            status=status,
            imp_uid=payment.imp_uid,
            receipt_url=payment.receipt_url,
            latency_ms=latency_ms,
            error_code=AMOUNT_MISMATCH if error else None,
            error_message=error,
            paid_amount=int(payment.amount),
        )
    if payment.is_failed:
        kind = settings.decline_table.classify(payment.fail_reason, decline_code)
        return Outcome(
            merchant_uid=payment.merchant_uid,
            status=FAILED,
            imp_uid=payment.imp_uid,
            fail_reason=payment.fail_reason,
            decline_kind=kind,
            next_retry_date=(
                next_retry_date(billing_date, attempt_no, settings.retry_schedule_days)
                if kind == SOFT
                else None
            ),
            latency_ms=latency_ms,
        )
    # 'ready' or something new: not money we can account for yet.
    return Outcome(
        merchant_uid=payment.merchant_uid,
        status=UNKNOWN,
        imp_uid=payment.imp_uid,
        error_code="status_" + (payment.status or "empty"),
        error_message=f"the gateway reports status {payment.status!r}",
        latency_ms=latency_ms,
    )


def settle_by_lookup(
    gateway: Gateway, merchant_uid: str, expected_amount: int | None, billing_date: date,
    attempt_no: int, settings: ChargeSettings,
) -> tuple[Lookup, Outcome | None]:  # fmt: skip
    """Ask the gateway what became of a merchant_uid: the lookup, and the outcome its records
    prove (None unless found). Only an ``absent`` lookup allows sending the uid again."""
    found = gateway.look_up(merchant_uid)
    if found.kind != FOUND or found.decisive is None:
        return found, None
    return found, outcome_from_payment(
        found.decisive, expected_amount, billing_date, attempt_no, settings
    )


def outcome_from_result(
    result: ChargeResult, p: PlannedCharge, settings: ChargeSettings, latency_ms: int
) -> Outcome:
    """A charge result in ledger terms (NOT_SENT and RATE_LIMITED never get here)."""
    c = p.candidate
    if result.payment is not None:
        code = result.code if result.kind == DECLINED else None
        return outcome_from_payment(
            result.payment, c.amount, c.billing_date, p.attempt_no, settings, latency_ms, code
        )
    if result.kind == NO_BILLING_KEY:
        return Outcome(
            p.merchant_uid, FAILED, error_code=MISSING_BILLING_KEY, error_message=result.reason,
            fail_reason=result.reason, decline_kind=HARD, latency_ms=latency_ms,
        )  # fmt: skip
    if result.kind == REFUSED_REQUEST:
        # The request, not the card: never dunned, always alerted.
        return Outcome(
            p.merchant_uid, FAILED, error_code=result.code, error_message=result.reason,
            fail_reason=result.reason, decline_kind=REFUSED, latency_ms=latency_ms,
        )  # fmt: skip
    return Outcome(
        p.merchant_uid, UNKNOWN, error_code=result.code, error_message=result.reason,
        latency_ms=latency_ms,
    )  # fmt: skip


class ChargeEngine:
    """Charges a batch of candidates exactly once each, recording everything in the ledger."""

    def __init__(
        self,
        gateway: Gateway,
        ledger: Ledger,
        settings: ChargeSettings,
        run: Mapping[str, Any],
        *,
        on_charge: Callable[[str], None] | None = None,
        logger: logging.Logger | None = None,
    ):
        self.gateway = gateway
        self.ledger = ledger
        self.settings = settings
        self.run = dict(run)
        self.claim_token = new_claim_token()
        self.limiter = RateLimiter(settings.requests_per_second)
        # merchant_uids this engine inserted as new pending rows, and those it ever sent:
        # only the first minus the second may be released (deleted) when a batch stops early.
        self._fresh: set[str] = set()
        self._sent: set[str] = set()
        self.log = logger or log
        self._on_charge = on_charge
        self.result = BatchResult()

    # -- planning -------------------------------------------------------------------------------

    def plan(
        self, candidates: Sequence[ChargeCandidate], *, new_attempts: bool = True,
        merchant_uids: Mapping[str, str] | None = None,
    ) -> tuple[list[PlannedCharge], list[tuple[Attempt, ChargeCandidate]]]:  # fmt: skip
        """Split candidates into new attempts to claim and stale unsettled rows to resolve.

        A (subscription, billing date) with a paid, failed or in-flight attempt gets no new
        attempt. ``merchant_uids`` overrides the scheme (single charges with a caller's id).
        """
        existing = self.ledger.attempts_for(c.subscription_id for c in candidates)
        put_back = self.ledger.put_backs_for(
            {
                c.subscription_id
                for c in candidates
                if (c.subscription_id, c.billing_date) in existing
            }
        )
        cutoff = lease_cutoff(self.settings.pending_lease_seconds)
        to_claim: list[PlannedCharge] = []
        to_resolve: list[tuple[Attempt, ChargeCandidate]] = []
        for c in candidates:
            attempts = existing.get((c.subscription_id, c.billing_date), [])
            statuses = {a.status for a in attempts}
            if statuses & set(MONEY_MOVED):
                self.result.add("already_paid", c.amount)
                continue
            unsettled = [a for a in attempts if a.status in UNSETTLED]
            if unsettled:
                for a in unsettled:
                    in_lease = a.requested_at is not None and a.requested_at >= cutoff
                    if in_lease and not self._left_by_dead_try(a):
                        self.result.add("in_flight_elsewhere", c.amount)
                    else:
                        to_resolve.append((a, c))
                continue
            attempt_no = 1
            latest = attempts[-1] if attempts else None
            put_back_now = (
                latest is not None
                and latest.status == FAILED
                and (c.subscription_id, c.billing_date, latest.attempt_no) in put_back
            )
            # An abandoned attempt never reached the gateway; a period owed again (it is due)
            # gets its next attempt rather than being skipped for ever.
            if (
                latest is not None
                and new_attempts
                and (put_back_now or latest.status == ABANDONED)
                and latest.attempt_no < 99
            ):
                attempt_no = latest.attempt_no + 1
            elif attempts or not new_attempts:
                self.result.add("already_settled", c.amount)
                continue
            uid = (merchant_uids or {}).get(c.subscription_id) or merchant_uid_for(
                c.subscription_id, c.billing_date, attempt_no
            )
            to_claim.append(PlannedCharge(c, attempt_no, uid))
        return to_claim, to_resolve

    def _left_by_dead_try(self, a: Attempt) -> bool:
        """An earlier try of this very task instance is over when this try runs: no lease."""
        return (
            a.dag_id == self.run.get("dag_id")
            and a.run_id == self.run.get("run_id")
            and a.task_id == self.run.get("task_id")
            and (a.try_number or 0) < (self.run.get("try_number") or 0)
        )

    # -- the batch ------------------------------------------------------------------------------

    def charge_batch(
        self,
        candidates: Sequence[ChargeCandidate],
        *,
        merchant_uids: Mapping[str, str] | None = None,
    ) -> BatchResult:
        to_claim, to_resolve = self.plan(candidates, merchant_uids=merchant_uids)
        resend = self.resolve_stale(to_resolve)
        # A put-back's attempt NN+1 asks about NN first, exactly as dunning does.
        later = self.previous_unpaid([p for p in to_claim if p.attempt_no > 1])
        first = [p for p in to_claim if p.attempt_no == 1]
        self.send_all(resend, [*first, *later])
        return self.result

    def charge_planned(self, planned: Sequence[PlannedCharge]) -> BatchResult:
        """Send already-numbered attempts (dunning retries) through the same claim/send path."""
        self.send_all([], planned)
        return self.result

    def claim(self, planned: Sequence[PlannedCharge]) -> list[PlannedCharge]:
        """Write-ahead pending rows; return the charges this engine now owns (once each)."""
        unique = list({p.merchant_uid: p for p in planned}.values())
        owned = self.ledger.claim([p.ledger_row(self.run) for p in unique], self.claim_token)
        self._fresh |= owned
        for p in planned:
            if p.merchant_uid not in owned:
                self.result.add("claimed_elsewhere", p.candidate.amount)
        return [p for p in unique if p.merchant_uid in owned]

    def _claimed_as_sent(self, planned: Sequence[PlannedCharge]) -> Iterator[PlannedCharge]:
        """Claim in small chunks just before sending: a row's lease (requested_at) starts
        when it is about to go out, not when a long batch began."""
        chunk = max(50, 4 * int(self.settings.max_concurrency))
        for part in iter_chunks(planned, chunk):
            yield from self.claim(part)

    def resolve_stale(
        self,
        stale: Sequence[tuple[Attempt, ChargeCandidate]],
        *,
        owed: Callable[[Attempt], bool] | None = None,
    ) -> list[PlannedCharge]:
        """Look up unsettled rows from earlier runs; return those Iamport never saw (resend)."""
        resend: list[PlannedCharge] = []
        outcomes: list[Outcome] = []
        for attempt, cand in stale:
            found, outcome = settle_by_lookup(
                self.gateway, attempt.merchant_uid, attempt.amount, attempt.billing_date,
                attempt.attempt_no, self.settings,
            )  # fmt: skip
            if found.kind != ABSENT and outcome is None:
                self.log.warning(
                    "could not look %s up, left unsettled: %s", attempt.merchant_uid, found.reason
                )
                self.result.add("unresolved", attempt.amount)
                self.result.unknown_merchant_uids.append(attempt.merchant_uid)
                continue
            if outcome is None and owed is not None and not owed(attempt):
                outcome = Outcome(
                    attempt.merchant_uid, ABANDONED, error_code="no_longer_owed",
                    error_message="the gateway never saw it and the subscription no longer owes "
                    "this period (cancelled, moved on or too old): closed without a charge",
                )  # fmt: skip
            if outcome is None:
                idle = (
                    None
                    if self._left_by_dead_try(attempt)
                    else lease_cutoff(self.settings.pending_lease_seconds)
                )
                if self.ledger.reclaim(attempt, self.claim_token, self.run, idle_since=idle):
                    # The same merchant_uid carries the same request: what the row recorded.
                    same = replace(
                        cand, customer_uid=attempt.customer_uid or cand.customer_uid,
                        amount=int(attempt.amount or cand.amount), name=attempt.name or cand.name,
                        currency=attempt.currency or cand.currency,
                    )  # fmt: skip
                    resend.append(
                        PlannedCharge(same, attempt.attempt_no, attempt.merchant_uid, resend=True)
                    )
                else:
                    self.result.add("claimed_elsewhere", cand.amount)
                continue
            outcomes.append(outcome)
            if outcome.status in UNSETTLED:
                # The gateway has it in progress ('ready'): recorded, still unknown, and this
                # task fails for it like for any outcome it could not settle.
                self.result.add("unresolved", attempt.amount)
                self.result.unknown_merchant_uids.append(attempt.merchant_uid)
                continue
            self.result.add("resolved_" + outcome.status, attempt.amount)
            self.log.info(
                "resolved %s (left %s by an earlier run): %s imp_uid=%s",
                attempt.merchant_uid, attempt.status, outcome.status, outcome.imp_uid,
            )  # fmt: skip
        self._note_refused(self.ledger.record_outcomes(outcomes))
        return resend

    def send_all(self, owned: Sequence[PlannedCharge], to_claim: Sequence[PlannedCharge]) -> None:
        """Send what this engine owns and what it can claim; then settle the unknowns by
        lookup and careful resends of the same merchant_uid."""
        pending: Iterable[PlannedCharge] = chain(owned, self._claimed_as_sent(to_claim))
        for round_no in range(self.settings.max_resend_rounds + 1):
            unknown = self._send_round(pending)
            if not unknown:
                return
            if round_no == self.settings.max_resend_rounds:
                pending = [p for p, _, _ in unknown]
                break
            pending = self._settle_unknown(unknown)
            if not pending:
                return
        for p in pending:
            self.result.unknown_merchant_uids.append(p.merchant_uid)
            self.result.add(UNKNOWN, p.candidate.amount)

    def _settle_unknown(
        self, unknown: Sequence[tuple[PlannedCharge, float, Outcome]]
    ) -> list[PlannedCharge]:
        """Look unknown outcomes up once they had time to settle; return those to resend."""
        latest = max(t for _, t, _ in unknown)
        delay = latest + self.settings.unknown_settle_seconds - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        resend: list[PlannedCharge] = []
        outcomes: list[Outcome] = []
        for p, _, first in unknown:
            found, outcome = settle_by_lookup(
                self.gateway, p.merchant_uid, p.candidate.amount, p.candidate.billing_date,
                p.attempt_no, self.settings,
            )  # fmt: skip
            if found.kind == ABSENT and first.error_code == FOREIGN_REPLY:
                outcome = Outcome(
                    p.merchant_uid, FAILED, error_code=FOREIGN_REPLY, decline_kind=REFUSED,
                    fail_reason=first.error_message,
                    error_message="the gateway has no such payment, and the charge was answered "
                    f"in a foreign format (check the connection): {first.error_message}",
                )  # fmt: skip
            elif found.kind == ABSENT:
                resend.append(replace(p, resend=True))
                continue
            if outcome is None:
                self.log.warning("could not look %s up: %s", p.merchant_uid, found.reason)
                self.result.unknown_merchant_uids.append(p.merchant_uid)
                self.result.add(UNKNOWN, p.candidate.amount)
                continue
            outcomes.append(outcome)
            self._count(outcome, p)
        self._note_refused(self.ledger.record_outcomes(outcomes, self.claim_token))
        # Resent rows go back to pending so a crash now leaves them for reconciliation.
        refused = self.ledger.record_outcomes(
            [Outcome(merchant_uid=p.merchant_uid, status=PENDING) for p in resend], self.claim_token
        )
        self._note_refused(refused)
        lost = {r.outcome.merchant_uid for r in refused}
        return [p for p in resend if p.merchant_uid not in lost]

    def _send_round(
        self, planned: Iterable[PlannedCharge]
    ) -> list[tuple[PlannedCharge, float, Outcome]]:
        """One pass over ``planned`` with bounded concurrency; returns the unknown outcomes.

        Long-lived worker threads take charges from a queue and post results back; the main
        thread alone feeds them (so claims happen just in time) and writes the ledger.
        """
        unknown: list[tuple[PlannedCharge, float, Outcome]] = []
        buffer: list[Outcome] = []
        last_flush = time.monotonic()
        fatal: list[BaseException] = []
        queue = iter(planned)
        workers = max(1, int(self.settings.max_concurrency))
        todo: SimpleQueue[PlannedCharge | None] = SimpleQueue()
        done: SimpleQueue[tuple[PlannedCharge, Any]] = SimpleQueue()

        def work() -> None:
            while (p := todo.get()) is not None:
                try:
                    done.put((p, self._charge_one(p)))
                except BaseException as e:  # noqa: BLE001 - handed to the main thread
                    done.put((p, e))

        threads = [
            threading.Thread(target=work, name=f"charge-{n}", daemon=True) for n in range(workers)
        ]
        for t in threads:
            t.start()

        def feed() -> bool:
            """Hand the next charge to a worker once the ledger confirms it is still ours."""
            while not fatal and (p := next(queue, None)) is not None:
                if self.ledger.confirm_send(p.merchant_uid, self.claim_token):
                    self._sent.add(p.merchant_uid)
                    todo.put(p)
                    return True
                self.log.warning("%s was taken over by another try: not sent", p.merchant_uid)
                self.result.add("taken_over", p.candidate.amount)
            return False

        in_flight = sum(feed() for _ in range(workers))
        not_sent: list[str] = []
        try:
            while in_flight:
                for p, result in _take_finished(done, self.settings.flush_seconds):
                    in_flight -= 1
                    if isinstance(result, BaseException):
                        if not isinstance(result, CredentialsRefused):
                            raise result
                        fatal.append(result)
                        not_sent.append(p.merchant_uid)
                        continue
                    outcome, finished_at = result
                    if outcome is None:
                        # No token or no connection: nobody else will get through either.
                        not_sent.append(p.merchant_uid)
                        if not fatal:
                            fatal.append(
                                GatewayUnavailable(
                                    f"the gateway could not be reached ({p.merchant_uid} and "
                                    "every charge after it were not sent)"
                                )
                            )
                        continue
                    buffer.append(outcome)
                    if outcome.status == UNKNOWN:
                        unknown.append((p, finished_at, outcome))
                    else:
                        self._count(outcome, p)
                    in_flight += feed()
                if len(buffer) >= self.settings.flush_every or (
                    buffer and time.monotonic() - last_flush >= self.settings.flush_seconds
                ):
                    self._note_refused(self.ledger.record_outcomes(buffer, self.claim_token))
                    buffer.clear()
                    last_flush = time.monotonic()
        finally:
            self._note_refused(self.ledger.record_outcomes(buffer, self.claim_token))
            for _ in threads:
                todo.put(None)
        if fatal:
            # What never left goes back: a fresh row is deleted, a resend stays as it was.
            self.ledger.withdraw(not_sent, self.claim_token)
            self.ledger.release(
                sorted(self._fresh - (self._sent - set(not_sent))), self.claim_token
            )
            raise fatal[0]
        return unknown

    def _charge_one(self, p: PlannedCharge) -> tuple[Outcome | None, float]:
        """Send one charge and classify what came back; None when it provably never left.
        Runs in a worker thread."""
        c = p.candidate
        request = ChargeRequest(
            merchant_uid=p.merchant_uid, customer_uid=c.customer_uid, amount=c.amount,
            name=c.name, currency=c.currency, resend=p.resend,
            buyer={"buyer_name": c.buyer_name, "buyer_email": c.buyer_email,
                   "buyer_tel": c.buyer_tel, **c.options},
        )  # fmt: skip
        # Waits after 429s stay well inside the lease confirm_send renewed, so nobody takes
        # the row over while this worker is about to send it again.
        budget = time.monotonic() + self.settings.pending_lease_seconds / 2
        for rate_try in range(self.settings.rate_limit_retries + 1):
            self.limiter.acquire()
            started = time.monotonic()
            result = self.gateway.charge(request)
            if result.kind != RATE_LIMITED or rate_try == self.settings.rate_limit_retries:
                break
            delay = result.retry_after if result.retry_after is not None else 0.5 * 2**rate_try
            if time.monotonic() + delay > budget:
                break
            time.sleep(delay)
        if result.kind == NOT_SENT:
            self.log.warning("%s not sent: %s", p.merchant_uid, result.reason)
            return None, time.monotonic()
        if result.kind == RATE_LIMITED:
            result = replace(result, kind=UNKNOWN, code="rate_limited")
        outcome = outcome_from_result(result, p, self.settings, _ms(started))
        self._log_charge(p, outcome)
        if self._on_charge is not None:
            self._on_charge(p.merchant_uid)
        return outcome, time.monotonic()

    def _note_refused(self, refused: Sequence[Refused]) -> None:
        """A refused move is never dropped: counted, and the row stays as the ledger has it."""
        for r in refused:
            self.result.add(f"refused_{r.outcome.status}", None)
            self.result.refused.append(r.outcome.merchant_uid)

    def previous_unpaid(self, planned: Sequence[PlannedCharge]) -> list[PlannedCharge]:
        """Of next attempts (NN+1), those whose attempt NN the gateway confirms moved no money.

        A payment found for NN is recorded (it wins over the ledger's failed) and NN+1 is not
        sent; a lookup that cannot ask keeps NN+1 back until the next run.
        """
        go: list[PlannedCharge] = []
        paid: list[Outcome] = []
        for p in planned:
            c = p.candidate
            previous = merchant_uid_for(c.subscription_id, c.billing_date, p.attempt_no - 1)
            lookup, outcome = settle_by_lookup(
                self.gateway, previous, c.amount, c.billing_date, p.attempt_no - 1, self.settings
            )
            if lookup.kind == UNREACHABLE:
                self.log.warning(
                    "could not look %s up, %s waits: %s", previous, p.merchant_uid, lookup.reason
                )
                self.result.add("previous_unverified", c.amount)
                continue
            if outcome is not None and outcome.status in MONEY_MOVED:
                self.log.error("%s is %s at the gateway: %s not sent", previous, outcome.status,
                               p.merchant_uid)  # fmt: skip
                paid.append(outcome)
                self.result.add("previous_paid", c.amount)
                continue
            if outcome is not None and outcome.status != FAILED:
                # Still in progress there ('ready' or new): NN+1 waits for NN to settle.
                self.log.warning("%s is %s at the gateway: %s waits", previous, outcome.status,
                                 p.merchant_uid)  # fmt: skip
                self.result.add("previous_unsettled", c.amount)
                continue
            go.append(p)
        self._note_refused(self.ledger.record_outcomes(paid))
        return go

    def _count(self, outcome: Outcome, p: PlannedCharge) -> None:
        self.result.charges_sent += 1
        label = outcome.status
        if outcome.status == FAILED:
            label = f"declined_{outcome.decline_kind or SOFT}"
            if outcome.error_code == MISSING_BILLING_KEY:
                label = MISSING_BILLING_KEY
        self.result.add(label, p.candidate.amount)

    def _log_charge(self, p: PlannedCharge, outcome: Outcome) -> None:
        self.log.info(
            "charge customer_uid=%s merchant_uid=%s amount=%s outcome=%s imp_uid=%s "
            "latency_ms=%s%s",
            p.candidate.customer_uid, p.merchant_uid, p.candidate.amount, outcome.status,
            outcome.imp_uid, outcome.latency_ms,
            f" reason={outcome.fail_reason or outcome.error_message}"
            if outcome.status != PAID else "",
        )  # fmt: skip


def _take_finished(finished: SimpleQueue[Any], timeout: float) -> list[Any]:
    """Results posted so far: wait up to ``timeout`` for the first, then take the rest."""
    try:
        done = [finished.get(timeout=timeout)]
    except Empty:
        return []
    while True:
        try:
            done.append(finished.get_nowait())
        except Empty:
            return done


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def resolve_unsettled(
    gateway: Gateway, ledger: Ledger, settings: ChargeSettings, run: Mapping[str, Any], *,
    logger: logging.Logger | None = None, limit: int = 10000, default_name: str = "정기결제",
    subscriptions_table: str | None = None, max_overdue_days: int = 45, today: date | None = None,
) -> dict[str, int]:  # fmt: skip
    """Drive every pending/unknown row older than the lease, whichever DAG left it, to a final
    state: record what the gateway says happened; resend under the same merchant_uid the rows
    it says it never saw while the period is still owed (subscription not cancelled, still on
    that billing date, not overdue past the limit), close the others as abandoned. Rows it
    cannot be asked about stay as they are."""
    stale = ledger.unsettled_attempts(
        requested_before=lease_cutoff(settings.pending_lease_seconds), limit=limit
    )
    states = (
        ledger.subscription_states([a.subscription_id or "" for a in stale], subscriptions_table)
        if subscriptions_table is not None
        else None
    )
    # The run's own date, never the wall clock: a simulated or backfilled day judges by its date.
    today = today or datetime.now(SEOUL).date()

    def owed(a: Attempt) -> bool:
        if (today - a.billing_date).days > max_overdue_days:
            return False
        if states is None:
            return True
        state = states.get(a.subscription_id or "")
        return state is not None and state[0] != SUB_CANCELLED and state[1] == a.billing_date

    engine = ChargeEngine(gateway, ledger, settings, run, logger=logger)
    resend = engine.resolve_stale(
        [(a, candidate_from_attempt(a, default_name)) for a in stale], owed=owed
    )
    engine.send_all(resend, [])
    return dict(engine.result.counts)


def candidate_from_attempt(a: Attempt, default_name: str) -> ChargeCandidate:
    """The request an attempt row was written for, to resend it unchanged."""
    return ChargeCandidate(
        subscription_id=a.subscription_id or a.merchant_uid,
        customer_uid=a.customer_uid or "",
        amount=int(a.amount or 0),
        billing_date=a.billing_date,
        currency=a.currency or "KRW",
        name=a.name or default_name,
    )


def iter_chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
