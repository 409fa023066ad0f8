"""SQLite persistence: billing keys, every payment ever accepted, and tokens.

One connection behind a re-entrant lock; every write is its own ``BEGIN IMMEDIATE`` transaction
committed (``synchronous=FULL``) before the HTTP answer, so a test can audit the file and a
dropped response never hides a charge. Holding the lock across "check merchant_uid, insert" is
what serialises concurrent charges; a partial unique index makes two paid payments for one
merchant_uid impossible even if that logic were wrong.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from iamport_billing.emulator.config import card_behavior, card_digits

DEFAULT_PG_PROVIDER = "nice"
DEFAULT_PG_ID = "nictest04m"

CUSTOMER_COLUMNS = (
    "customer_uid", "pg_provider", "pg_id", "customer_id", "card_name", "card_code",
    "card_number", "card_type", "card_behavior", "customer_name", "customer_tel",
    "customer_email", "customer_addr", "customer_postcode", "channel_key", "inserted", "updated",
)  # fmt: skip

PAYMENT_COLUMNS = (
    "imp_uid", "merchant_uid", "customer_uid", "status", "amount", "cancel_amount", "currency",
    "name", "pay_method", "channel", "pg_provider", "pg_id", "pg_tid", "apply_num", "card_code",
    "card_name", "card_number", "card_type", "card_quota", "buyer_name", "buyer_email",
    "buyer_tel", "buyer_addr", "buyer_postcode", "custom_data", "customer_uid_usage",
    "started_at", "paid_at", "failed_at", "cancelled_at", "updated_at", "fail_reason",
    "cancel_reason", "receipt_url", "cancel_history", "request",
)  # fmt: skip
_JSON_COLUMNS = ("cancel_history", "request")

SCHEMA = """
CREATE TABLE IF NOT EXISTS customers (
    customer_uid TEXT PRIMARY KEY, pg_provider TEXT NOT NULL, pg_id TEXT NOT NULL,
    customer_id TEXT, card_name TEXT NOT NULL, card_code TEXT, card_number TEXT NOT NULL,
    card_type INTEGER, card_behavior TEXT NOT NULL, customer_name TEXT, customer_tel TEXT,
    customer_email TEXT, customer_addr TEXT, customer_postcode TEXT, channel_key TEXT,
    inserted INTEGER NOT NULL, updated INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS payments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    imp_uid TEXT NOT NULL UNIQUE, merchant_uid TEXT NOT NULL, customer_uid TEXT,
    status TEXT NOT NULL, amount NUMERIC NOT NULL, cancel_amount NUMERIC NOT NULL DEFAULT 0,
    currency TEXT NOT NULL, name TEXT, pay_method TEXT, channel TEXT, pg_provider TEXT,
    pg_id TEXT, pg_tid TEXT, apply_num TEXT, card_code TEXT, card_name TEXT, card_number TEXT,
    card_type INTEGER, card_quota INTEGER NOT NULL DEFAULT 0, buyer_name TEXT,
    buyer_email TEXT, buyer_tel TEXT, buyer_addr TEXT, buyer_postcode TEXT, custom_data TEXT,
    customer_uid_usage TEXT, started_at INTEGER NOT NULL, paid_at INTEGER NOT NULL DEFAULT 0,
    failed_at INTEGER NOT NULL DEFAULT 0, cancelled_at INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL, fail_reason TEXT, cancel_reason TEXT, receipt_url TEXT,
    cancel_history TEXT NOT NULL DEFAULT '[]', request TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS payments_merchant ON payments (merchant_uid, seq);
CREATE UNIQUE INDEX IF NOT EXISTS payments_one_settled_per_merchant_uid
    ON payments (merchant_uid) WHERE status IN ('paid', 'cancelled');
CREATE INDEX IF NOT EXISTS payments_started ON payments (started_at);
CREATE INDEX IF NOT EXISTS payments_status_paid ON payments (status, paid_at);
CREATE INDEX IF NOT EXISTS payments_status_failed ON payments (status, failed_at);
CREATE INDEX IF NOT EXISTS payments_status_cancelled ON payments (status, cancelled_at);
CREATE TABLE IF NOT EXISTS tokens (
    token TEXT PRIMARY KEY, imp_key TEXT NOT NULL, issued_at INTEGER NOT NULL,
    expired_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tokens_key ON tokens (imp_key, expired_at);
CREATE TABLE IF NOT EXISTS deleted_billing_keys (
    billing_key TEXT PRIMARY KEY, customer TEXT NOT NULL, deleted_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, created_at REAL NOT NULL,
    status INTEGER, content_type TEXT, body BLOB
);
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, type TEXT NOT NULL, payment_id TEXT NOT NULL,
    body TEXT NOT NULL, created_at INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER, delivered_at INTEGER
);
"""

# sorting query values of the find/findAll/status endpoints -> ORDER BY
SORTINGS = {
    "-started": "started_at DESC, seq DESC",
    "started": "started_at ASC, seq ASC",
    "-paid": "paid_at DESC, seq DESC",
    "paid": "paid_at ASC, seq ASC",
    "-updated": "updated_at DESC, seq DESC",
    "updated": "updated_at ASC, seq ASC",
}
# /payments/status/{status}: which timestamp the from/to window applies to
STATUS_TIME_COLUMN = {
    "all": "started_at",
    "ready": "started_at",
    "paid": "paid_at",
    "cancelled": "cancelled_at",
    "failed": "failed_at",
}

# (card_code, card_name) by the first digit, KFTC standard codes.
_CARD_BRANDS = {"3": ("365", "삼성카드"), "4": ("366", "신한카드"), "5": ("367", "현대카드")}
_DEFAULT_BRAND = ("361", "BC카드")


class CancelRefused(Exception):
    """A cancel the API refuses; ``kind`` says why (V1 answers code 1 for all, V2 a type each)."""

    NOT_FOUND = "not_found"
    NOT_PAID = "not_paid"
    ALREADY_CANCELLED = "already_cancelled"
    CHECKSUM = "checksum"
    EXCEEDS = "exceeds"

    def __init__(self, message: str, kind: str = NOT_FOUND) -> None:
        super().__init__(message)
        self.kind = kind


def mask_card_number(card_number: str) -> str:
    """Iamport-style mask: first 6 and last 4 digits visible, grouped by 4 (4242-42**-****-4242)."""
    digits = card_digits(card_number)
    masked = digits[:6] + "*" * max(0, len(digits) - 10) + digits[-4:]
    return "-".join(masked[i : i + 4] for i in range(0, len(masked), 4))


def customer_row(customer_uid: str, card_number: str, now: int, **fields: Any) -> dict[str, Any]:
    """A customers row for a card; only the masked number and the outcome class are kept."""
    digits = card_digits(card_number)
    code, name = _CARD_BRANDS.get(digits[:1], _DEFAULT_BRAND)
    pg = fields.pop("pg", None) or DEFAULT_PG_PROVIDER
    pg_provider, _, pg_id = pg.partition(".")
    row = {c: None for c in CUSTOMER_COLUMNS}
    row.update(
        customer_uid=customer_uid,
        pg_provider=pg_provider,
        pg_id=pg_id or DEFAULT_PG_ID,
        card_name=name,
        card_code=code,
        card_number=mask_card_number(digits),
        card_type=0,
        card_behavior=card_behavior(digits),
        inserted=now,
        updated=now,
    )
    row.update({k: v for k, v in fields.items() if k in CUSTOMER_COLUMNS and v is not None})
    return row


def new_imp_uid() -> str:
    return f"imp_{secrets.randbelow(10**12):012d}"


class Store:
    """The emulator's database; thread-safe, usable from a threadpool."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.executescript(SCHEMA)
        # token -> expired_at; auth is checked on every call, so it stays in memory.
        self._token_expiry: dict[str, int] = {
            r["token"]: r["expired_at"]
            for r in self._conn.execute(
                "SELECT token, expired_at FROM tokens WHERE expired_at > ?", (int(time.time()),)
            )
        }

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._conn.execute(sql, tuple(params))]

    # -- tokens -------------------------------------------------------------------------------

    def issue_token(
        self, imp_key: str, now: int, ttl_s: int, extend_window_s: int, extend_by_s: int
    ) -> tuple[str, int, str]:
        """getToken semantics: reuse the live token, extend it in its last window, else issue.

        Returns (token, expired_at, action) with action ``issued``/``reused``/``extended``.
        """
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT token, expired_at FROM tokens WHERE imp_key = ? AND expired_at > ? "
                "ORDER BY expired_at DESC LIMIT 1",
                (imp_key, now),
            ).fetchone()
            if row is None:
                token, expired_at, action = secrets.token_hex(20), now + ttl_s, "issued"
                conn.execute(
                    "INSERT INTO tokens (token, imp_key, issued_at, expired_at) VALUES (?,?,?,?)",
                    (token, imp_key, now, expired_at),
                )
            elif row["expired_at"] - now <= extend_window_s and extend_by_s > 0:
                token, expired_at, action = (
                    row["token"],
                    row["expired_at"] + extend_by_s,
                    "extended",
                )
                conn.execute(
                    "UPDATE tokens SET expired_at = ? WHERE token = ?", (expired_at, token)
                )
            else:
                token, expired_at, action = row["token"], row["expired_at"], "reused"
            self._token_expiry[token] = expired_at
        return token, expired_at, action

    def token_valid(self, token: str, now: float) -> bool:
        expired_at = self._token_expiry.get(token)
        return expired_at is not None and now < expired_at

    # -- customers ----------------------------------------------------------------------------

    def save_customers(self, rows: Iterable[dict[str, Any]]) -> None:
        """Insert or replace billing keys (a re-issue replaces the card, keeps ``inserted``)."""
        cols = ", ".join(CUSTOMER_COLUMNS)
        marks = ", ".join("?" for _ in CUSTOMER_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in CUSTOMER_COLUMNS if c != "inserted")
        with self._transaction() as conn:
            conn.executemany(
                f"INSERT INTO customers ({cols}) VALUES ({marks}) "
                f"ON CONFLICT (customer_uid) DO UPDATE SET {updates}",
                ([row[c] for c in CUSTOMER_COLUMNS] for row in rows),
            )

    def get_customer(self, customer_uid: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM customers WHERE customer_uid = ?", (customer_uid,))
        return rows[0] if rows else None

    def get_customers(self, customer_uids: list[str]) -> list[dict[str, Any]]:
        marks = ", ".join("?" for _ in customer_uids)
        found = {
            r["customer_uid"]: r
            for r in self._query(
                f"SELECT * FROM customers WHERE customer_uid IN ({marks})", customer_uids
            )
        }
        return [found[c] for c in dict.fromkeys(customer_uids) if c in found]

    def delete_customer(self, customer_uid: str) -> dict[str, Any] | None:
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT * FROM customers WHERE customer_uid = ?", (customer_uid,)
            ).fetchone()
            if row is not None:
                conn.execute("DELETE FROM customers WHERE customer_uid = ?", (customer_uid,))
        return dict(row) if row is not None else None

    # -- payments -----------------------------------------------------------------------------

    def charge(
        self,
        customer_uid: str,
        merchant_uid: str,
        build: Callable[[dict[str, Any], str], dict[str, Any]],
        max_attempts: int | None = None,
        imp_uid: str | None = None,
    ) -> tuple[str, dict[str, Any] | None]:
        """Atomically: find the billing key, refuse a settled merchant_uid, insert the payment.

        ``build(customer, imp_uid)`` returns the payment row. Returns (``unknown_customer`` |
        ``duplicate`` | ``max_attempts`` | ``committed``, payment or None); ``max_attempts``
        when the merchant_uid already has that many payments (V2's attempt limit). ``imp_uid``:
        the one to use if still free (V2 shows it while the request is in flight).
        """
        with self._transaction() as conn:
            customer = conn.execute(
                "SELECT * FROM customers WHERE customer_uid = ?", (customer_uid,)
            ).fetchone()
            if customer is None:
                return "unknown_customer", None
            settled = conn.execute(
                "SELECT 1 FROM payments WHERE merchant_uid = ? AND status IN ('paid', 'cancelled')",
                (merchant_uid,),
            ).fetchone()
            if settled is not None:
                return "duplicate", None
            if max_attempts is not None:
                (attempts,) = conn.execute(
                    "SELECT COUNT(*) FROM payments WHERE merchant_uid = ?", (merchant_uid,)
                ).fetchone()
                if attempts >= max_attempts:
                    return "max_attempts", None
            imp_uid = imp_uid or new_imp_uid()
            while conn.execute("SELECT 1 FROM payments WHERE imp_uid = ?", (imp_uid,)).fetchone():
                imp_uid = new_imp_uid()
            payment = build(dict(customer), imp_uid)
            self._insert_payment(conn, payment)
        return "committed", payment

    def _insert_payment(self, conn: sqlite3.Connection, payment: dict[str, Any]) -> None:
        values = [
            json.dumps(payment[c], ensure_ascii=False) if c in _JSON_COLUMNS else payment[c]
            for c in PAYMENT_COLUMNS
        ]
        conn.execute(
            f"INSERT INTO payments ({', '.join(PAYMENT_COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in PAYMENT_COLUMNS)})",
            values,
        )

    @staticmethod
    def _payment(row: sqlite3.Row | dict[str, Any]) -> dict[str, Any]:
        payment = dict(row)
        for c in _JSON_COLUMNS:
            payment[c] = json.loads(payment[c])
        return payment

    def get_payment(self, imp_uid: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM payments WHERE imp_uid = ?", (imp_uid,))
        return self._payment(rows[0]) if rows else None

    def find_payment(
        self, merchant_uid: str, status: str | None, sorting: str
    ) -> dict[str, Any] | None:
        _, rows = self.page_by_merchant(merchant_uid, status, sorting, 1, 1)
        return rows[0] if rows else None

    def page_by_merchant(
        self, merchant_uid: str, status: str | None, sorting: str, page: int, limit: int
    ) -> tuple[int, list[dict[str, Any]]]:
        where, params = "merchant_uid = ?", [merchant_uid]
        if status:
            where += " AND status = ?"
            params.append(status)
        return self._page(where, params, sorting, page, limit)

    def page_by_status(
        self, status: str, since: int, until: int, sorting: str, page: int, limit: int
    ) -> tuple[int, list[dict[str, Any]]]:
        column = STATUS_TIME_COLUMN[status]
        where, params = f"{column} BETWEEN ? AND ?", [since, until]
        if status != "all":
            where += " AND status = ?"
            params.append(status)
        return self._page(where, params, sorting, page, limit)

    def _page(
        self, where: str, params: list[Any], sorting: str, page: int, limit: int
    ) -> tuple[int, list[dict[str, Any]]]:
        with self._lock:
            total = self._conn.execute(
                f"SELECT COUNT(*) FROM payments WHERE {where}", params
            ).fetchone()[0]
            rows = self._conn.execute(
                f"SELECT * FROM payments WHERE {where} ORDER BY {SORTINGS[sorting]} "
                "LIMIT ? OFFSET ?",
                [*params, limit, (page - 1) * limit],
            ).fetchall()
        return total, [self._payment(r) for r in rows]

    def cancel(
        self,
        imp_uid: str | None,
        merchant_uid: str | None,
        apply: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> dict[str, Any]:
        """Atomically load the cancellable payment, let ``apply`` change it, write it back.

        imp_uid wins over merchant_uid; ``apply`` raises CancelRefused to refuse.
        """
        with self._transaction() as conn:
            if imp_uid:
                row = conn.execute(
                    "SELECT * FROM payments WHERE imp_uid = ?", (imp_uid,)
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT * FROM payments WHERE merchant_uid = ? "
                    "AND status IN ('paid', 'cancelled') ORDER BY seq DESC LIMIT 1",
                    (merchant_uid,),
                ).fetchone()
            if row is None:
                raise CancelRefused("취소할 결제건이 존재하지 않습니다.")
            payment = apply(self._payment(row))
            sets = ", ".join(f"{c} = ?" for c in PAYMENT_COLUMNS if c != "imp_uid")
            conn.execute(
                f"UPDATE payments SET {sets} WHERE imp_uid = ?",
                [
                    json.dumps(payment[c], ensure_ascii=False) if c in _JSON_COLUMNS else payment[c]
                    for c in PAYMENT_COLUMNS
                    if c != "imp_uid"
                ]
                + [payment["imp_uid"]],
            )
        return payment

    def payments_by_cursor(
        self, since: int, until: int, after_seq: int, size: int
    ) -> list[tuple[int, dict[str, Any]]]:
        """Payments started in [since, until), in insertion order after ``after_seq``."""
        rows = self._query(
            "SELECT * FROM payments WHERE started_at >= ? AND started_at < ? AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (since, until, after_seq, size),
        )
        return [(r["seq"], self._payment(r)) for r in rows]

    def payment_counts(self) -> dict[str, int]:
        rows = self._query("SELECT status, COUNT(*) AS n FROM payments GROUP BY status")
        return {r["status"]: r["n"] for r in rows}

    def all_payments(self) -> list[dict[str, Any]]:
        """Every payment ever accepted, oldest first (for audits)."""
        return [self._payment(r) for r in self._query("SELECT * FROM payments ORDER BY seq")]

    # -- V2: deleted billing keys --------------------------------------------------------------

    def delete_billing_key(self, billing_key: str, now: int) -> dict[str, Any] | None:
        """Move a billing key out of ``customers`` (no charge finds it) into the deleted list."""
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT * FROM customers WHERE customer_uid = ?", (billing_key,)
            ).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM customers WHERE customer_uid = ?", (billing_key,))
            conn.execute(
                "INSERT OR REPLACE INTO deleted_billing_keys VALUES (?, ?, ?)",
                (billing_key, json.dumps(dict(row), ensure_ascii=False), now),
            )
        return {**dict(row), "deleted_at": now}

    def get_deleted_billing_key(self, billing_key: str) -> dict[str, Any] | None:
        rows = self._query(
            "SELECT * FROM deleted_billing_keys WHERE billing_key = ?", (billing_key,)
        )
        if not rows:
            return None
        return {**json.loads(rows[0]["customer"]), "deleted_at": rows[0]["deleted_at"]}

    # -- V2: Idempotency-Key ----------------------------------------------------------------------

    def claim_idempotency_key(
        self, key: str, fingerprint: str, now: float, window_s: float
    ) -> tuple[str, dict[str, Any] | None]:
        """``claimed`` (go on), ``outstanding`` (its first request is in flight), ``replay``
        (with the recorded answer) or ``mismatch`` (the key was used for another request).
        A key older than ``window_s`` is forgotten and claimed anew."""
        with self._transaction() as conn:
            row = conn.execute("SELECT * FROM idempotency_keys WHERE key = ?", (key,)).fetchone()
            if row is not None and now - row["created_at"] < window_s:
                if row["fingerprint"] != fingerprint:
                    return "mismatch", None
                if row["status"] is None:
                    return "outstanding", None
                return "replay", dict(row)
            conn.execute(
                "INSERT OR REPLACE INTO idempotency_keys (key, fingerprint, created_at) "
                "VALUES (?, ?, ?)",
                (key, fingerprint, now),
            )
        return "claimed", None

    def record_idempotent_answer(
        self, key: str, status: int, content_type: str, body: bytes
    ) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE idempotency_keys SET status = ?, content_type = ?, body = ? WHERE key = ?",
                (status, content_type, body, key),
            )

    def release_idempotency_key(self, key: str) -> None:
        """Forget a claim whose request was not answered by the API (nothing ran)."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM idempotency_keys WHERE key = ? AND status IS NULL", (key,))

    def forget_unfinished_idempotency_keys(self) -> None:
        """At start: claims left by a process that died mid-request answer nothing."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM idempotency_keys WHERE status IS NULL")

    # -- V2: webhooks ---------------------------------------------------------------------------

    def add_webhook(
        self, webhook_id: str, type_: str, payment_id: str, body: str, now: int
    ) -> None:
        with self._transaction() as conn:
            (seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM webhooks").fetchone()
            conn.execute(
                "INSERT INTO webhooks (id, seq, type, payment_id, body, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (webhook_id, seq, type_, payment_id, body, now),
            )

    def webhook_attempted(self, webhook_id: str, status: int | None, now: int) -> None:
        """One delivery try: ``status`` is the receiver's HTTP status (None: no answer)."""
        delivered = now if status is not None and 200 <= status < 300 else None
        with self._transaction() as conn:
            conn.execute(
                "UPDATE webhooks SET attempts = attempts + 1, last_status = ?, "
                "delivered_at = COALESCE(?, delivered_at) WHERE id = ?",
                (status, delivered, webhook_id),
            )

    def webhooks(self) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM webhooks ORDER BY seq")

    def get_webhook(self, webhook_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM webhooks WHERE id = ?", (webhook_id,))
        return rows[0] if rows else None


def seed_customers(db_path: str | Path, cards: Iterable[tuple[str, str]], **fields: Any) -> int:
    """Register billing keys straight into the emulator DB (fast seeding of thousands).

    Safe while an emulator runs on the same file (WAL). Returns how many were written.
    """
    now = int(time.time())
    rows = [customer_row(uid, number, now, **fields) for uid, number in cards]
    store = Store(db_path)
    try:
        store.save_customers(rows)
    finally:
        store.close()
    return len(rows)
