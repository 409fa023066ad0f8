"""``iamport-emulator`` console script: a local Iamport V1 or PortOne V2 server with faults."""

from __future__ import annotations

import argparse
import os

from iamport_billing.emulator.config import (
    API_MODES,
    DEFAULT_API_SECRET,
    DEFAULT_IMP_KEY,
    DEFAULT_IMP_SECRET,
    DEFAULT_STORE_ID,
    DEFAULT_TOKEN_TTL_S,
    EmulatorConfig,
)
from iamport_billing.emulator.server import (
    API_SECRET_ENV,
    SECRET_ENV,
    WEBHOOK_SECRET_ENV,
    serve,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iamport-emulator",
        description="Emulated Iamport (PortOne V1) or PortOne V2 billing API backed by SQLite. The "
        "/__emulator__ admin endpoints (faults, stats) need no token and are only served on "
        "loopback binds.",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=8099, help="0 picks a free port")
    p.add_argument("--db", default="iamport-emulator.db", help="SQLite file (created if missing)")
    p.add_argument("--api", choices=API_MODES, default="v1", help="API spoken (default v1)")
    p.add_argument("--imp-key", default=DEFAULT_IMP_KEY)
    p.add_argument(
        "--imp-secret",
        default=os.environ.get(SECRET_ENV, DEFAULT_IMP_SECRET),
        help=f"default from ${SECRET_ENV}, else {DEFAULT_IMP_SECRET!r}",
    )
    v2 = p.add_argument_group("PortOne V2 (--api v2)")
    v2.add_argument(
        "--api-secret",
        default=os.environ.get(API_SECRET_ENV, DEFAULT_API_SECRET),
        help=f"'Authorization: PortOne <secret>'; default from ${API_SECRET_ENV}, "
        f"else {DEFAULT_API_SECRET!r}",
    )
    v2.add_argument("--store-id", default=DEFAULT_STORE_ID, help="storeId in answers, webhooks")
    v2.add_argument("--webhook-url", default=None, help="POST signed webhooks here (default: none)")
    v2.add_argument(
        "--webhook-secret",
        default=os.environ.get(WEBHOOK_SECRET_ENV),
        help=f"Standard Webhooks secret, whsec_ + base64; default from ${WEBHOOK_SECRET_ENV}",
    )
    p.add_argument("--latency-ms", type=float, default=0.0, help="mean added latency")
    p.add_argument("--latency-jitter-ms", type=float, default=0.0, help="latency std deviation")
    p.add_argument("--error-rate", type=float, default=0.0, help="P(HTTP 500/502/503 up front)")
    p.add_argument("--rate-limit-rate", type=float, default=0.0, help="P(HTTP 429 up front)")
    p.add_argument(
        "--rate-cap",
        type=float,
        default=None,
        help="answer 429 beyond this many API requests in one wall-clock second (default: none)",
    )
    p.add_argument(
        "--drop-after-commit-rate",
        type=float,
        default=0.0,
        help="P(again commits the payment, then the connection is reset without an answer)",
    )
    p.add_argument("--token-ttl-s", type=int, default=DEFAULT_TOKEN_TTL_S)
    p.add_argument(
        "--token-extend-window-s",
        type=int,
        default=None,
        help="getToken this close to expiry extends the token (default 60 s scaled by TTL/1800)",
    )
    p.add_argument(
        "--token-extend-s",
        type=int,
        default=None,
        help="extension length (default 300 s scaled by TTL/1800)",
    )
    hostile = p.add_argument_group(
        "foreign and hostile switches", "also settable at runtime: POST /__emulator__/faults"
    )
    hostile.add_argument(
        "--foreign-404-json", action="store_true",
        help='GET lookups answer 404 with a proxy\'s JSON {"error": "not found"}',
    )  # fmt: skip
    hostile.add_argument(
        "--foreign-404-html", action="store_true",
        help="GET lookups answer 404 with an nginx HTML page",
    )  # fmt: skip
    hostile.add_argument(
        "--foreign-404-payment-lookups", action="store_true",
        help="only GET /payments/... lookups answer the proxy's JSON 404 (billing keys do not)",
    )  # fmt: skip
    hostile.add_argument(
        "--charge-foreign-404", action="store_true",
        help="charges answer 404 with an nginx HTML page, before anything is charged",
    )  # fmt: skip
    hostile.add_argument(
        "--findall-bare-list", action="store_true",
        help="findAll answers a bare list of payments instead of the paged object",
    )  # fmt: skip
    hostile.add_argument(
        "--drop-cancel-reply", action="store_true",
        help="a cancel commits, then the connection is reset without an answer",
    )  # fmt: skip
    hostile.add_argument(
        "--token-status", type=int, default=None,
        help="getToken answers this HTTP status (5xx: nginx HTML page; 4xx: envelope)",
    )  # fmt: skip
    hostile.add_argument(
        "--bearer-refused", action="store_true",
        help="refuse 'Authorization: Bearer <token>'; accept only the raw token",
    )  # fmt: skip
    hostile.add_argument(
        "--token-already-expired", action="store_true",
        help="getToken answers expired_at = now (the token still works)",
    )  # fmt: skip
    hostile.add_argument(
        "--charge-status-ready", action="store_true",
        help="charges end in status 'ready' and stay so",
    )  # fmt: skip
    hostile.add_argument(
        "--paid-amount-multiplier", type=float, default=1.0,
        help="a paid charge records amount * N (default 1)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=None, help="seed of the fault randomness")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        config = EmulatorConfig(
            host=args.host,
            port=args.port,
            db_path=args.db,
            imp_key=args.imp_key,
            imp_secret=args.imp_secret,
            api=args.api,
            api_secret=args.api_secret,
            store_id=args.store_id,
            webhook_url=args.webhook_url,
            webhook_secret=args.webhook_secret,
            latency_ms=args.latency_ms,
            latency_jitter_ms=args.latency_jitter_ms,
            error_rate=args.error_rate,
            rate_limit_rate=args.rate_limit_rate,
            rate_cap=args.rate_cap,
            drop_after_commit_rate=args.drop_after_commit_rate,
            token_ttl_s=args.token_ttl_s,
            token_extend_window_s=args.token_extend_window_s,
            token_extend_s=args.token_extend_s,
            foreign_404_json=args.foreign_404_json,
            foreign_404_html=args.foreign_404_html,
            foreign_404_payment_lookups=args.foreign_404_payment_lookups,
            charge_foreign_404=args.charge_foreign_404,
            findall_bare_list=args.findall_bare_list,
            drop_cancel_reply=args.drop_cancel_reply,
            token_status=args.token_status or None,
            bearer_refused=args.bearer_refused,
            token_already_expired=args.token_already_expired,
            charge_status_ready=args.charge_status_ready,
            paid_amount_multiplier=args.paid_amount_multiplier,
            seed=args.seed,
            log_level=args.log_level,
        )
    except ValueError as e:
        build_parser().error(str(e))
    serve(config)


if __name__ == "__main__":
    main()
