"""The naive baseline: what a team writes today with the official client (iamport-rest-client).

Runs with the baseline virtualenv's interpreter (its own requests pin), so it imports nothing
from this project: ``naive.py WAREHOUSE BILLING_DATE LIMIT IMP_URL IMP_KEY OUT.json`` with the
secret in IAMPORT_BENCH_IMP_SECRET. A loop over due rows, one ``pay_again`` at a time; the
client issues a getToken before every call.
"""

import json
import os
import resource
import sqlite3
import sys
import time

from iamport import Iamport


def main(warehouse, billing_date, limit, imp_url, imp_key, out_path):
    conn = sqlite3.connect(warehouse)
    rows = conn.execute(
        "SELECT subscription_id, customer_uid, amount, name FROM billing_subscriptions "
        "WHERE status = 'active' AND next_billing_date <= ? ORDER BY subscription_id LIMIT ?",
        (billing_date, int(limit)),
    ).fetchall()
    conn.close()
    client = Iamport(imp_key, os.environ["IAMPORT_BENCH_IMP_SECRET"], imp_url=imp_url)
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    paid = failed = 0
    for sub, customer, amount, name in rows:
        merchant_uid = f"{sub}-{billing_date.replace('-', '')}-naive"
        try:
            payment = client.pay_again(
                customer_uid=customer, merchant_uid=merchant_uid, amount=amount, name=name
            )
            paid += payment.get("status") == "paid"
        except (Iamport.ResponseError, Iamport.HttpError):
            failed += 1
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    with open(out_path, "w") as out:
        json.dump(
            {
                "charges": len(rows),
                "paid": paid,
                "failed": failed,
                "wall_s": wall,
                "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            },
            out,
        )


if __name__ == "__main__":
    main(*sys.argv[1:7])
