"""The Billing page, mounted by Airflow's own API server app (plugin loaded by entry point),
behind SimpleAuthManager, reading a real SQLite ledger."""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, timedelta

import pytest
from iamport_billing.ui.chart import ChartPoint, build_chart, nice_ceiling
from iamport_billing.ui.links import BillingPageLink, split_task_id, task_log_url
from iamport_billing.warehouse.ledger import Ledger
from support import add_subscriptions, airflow_api, attempt_row, bearer

# Screens and messages, not money: SQLite is enough.
WAREHOUSES = ["sqlite"]

pytestmark = pytest.mark.airflow

USER, PASSWORD = "ops", "ops-password"
DAG = "iamport_billing_daily"
DAY = date(2026, 11, 26)
RUN = "scheduled__2026-11-26T01:00:00+00:00"
CUSTOMER_DAY = DAY - timedelta(days=2)


def attempt(merchant_uid, status, **fields):
    return attempt_row(
        merchant_uid, status, **{"billing_date": DAY, "dag_id": DAG, "run_id": RUN,
                                 "task_id": "charge[3]", **fields}
    )  # fmt: skip


def seed_ledger(ledger: Ledger) -> None:
    """Day DAY: 3 paid, 1 soft decline, 1 unknown, 1 rejected; 31 older days of two paid each;
    the day before DAY also a 30,000 KRW charge refunded in part (10,000)."""
    run = {"dag_id": DAG, "run_id": RUN}
    rows = [
        attempt(f"s{i}-20261126-01", "paid", imp_uid=f"imp_{i}",
                receipt_url=f"http://127.0.0.1:1/receipts/imp_{i}")
        for i in range(3)
    ] + [
        attempt("s7-20261126-01", "failed", fail_reason="[잔액부족] insufficient funds",
                decline_kind="soft", next_retry_date=DAY + timedelta(days=1)),
        attempt("s8-20261126-01", "unknown", error_message="read timeout"),
        attempt("s9-rejected", "rejected", attempt_no=0, error_code="non_positive_amount",
                error_message="amount must be > 0", amount=0),
    ]  # fmt: skip
    for i in range(1, 32):
        day = DAY - timedelta(days=i)
        rows += [
            attempt(f"old{i}{x}-{day:%Y%m%d}-01", "paid", billing_date=day, run_id=f"run-{day}",
                    amount=1_000 * i)
            for x in "ab"
        ]  # fmt: skip
    # Two days before DAY, three customers besides the two paid: one declined and recovered by
    # the retry two days later, one lost (hard decline, Korean reason only), one without a card.
    rows += [
        attempt("s4-20261124-01", "failed", billing_date=CUSTOMER_DAY, decline_kind="soft",
                fail_reason="[잔액부족] insufficient funds",
                next_retry_date=CUSTOMER_DAY + timedelta(days=2)),
        attempt("s4-20261124-02", "paid", billing_date=CUSTOMER_DAY, attempt_no=2,
                completed_at=datetime(2026, 11, 26, 1, 0, 9, tzinfo=UTC)),
        attempt("s5-20261124-01", "failed", billing_date=CUSTOMER_DAY, decline_kind="hard",
                fail_reason="분실신고된 카드입니다", amount=5_000),
        attempt("s6-20261124-01", "failed", billing_date=CUSTOMER_DAY, decline_kind="hard",
                error_code="missing_billing_key", fail_reason="등록되지 않은 구매자입니다.",
                amount=7_000),
    ]  # fmt: skip
    before = DAY - timedelta(days=1)
    rows.append(
        attempt(f"r1-{before:%Y%m%d}-01", "cancelled", billing_date=before,
                run_id=f"run-{before}", amount=30_000, paid_amount=30_000, cancel_amount=10_000)
    )  # fmt: skip
    for row in rows:
        assert ledger.insert_attempt(row)
    ledger.record_run(run, DAY, 5, 49_500, 1, False, None)
    add_subscriptions(ledger, [("s7", "cust-s7", 9_900)], DAY)


@pytest.fixture(scope="module")
def client(airflow_db, tmp_path_factory):
    """Airflow's API server app in-process, with SimpleAuthManager and one known user."""
    home = tmp_path_factory.mktemp("ui")
    warehouse = home / "warehouse.db"
    mp = pytest.MonkeyPatch()
    mp.setenv(
        "AIRFLOW_CONN_BILLING_WAREHOUSE",
        json.dumps({"conn_type": "sqlite", "host": str(warehouse)}),
    )
    with Ledger.from_conn_id("billing_warehouse") as ledger:
        ledger.init_schema()
        seed_ledger(ledger)
    with airflow_api(home, {USER: ("viewer", PASSWORD)}) as c:
        yield c
    mp.undo()


@pytest.fixture(scope="module")
def auth(client) -> dict[str, str]:
    return bearer(client, USER, PASSWORD)


def page(client, auth, path: str, **params) -> str:
    r = client.get("/billing" + path, headers=auth, params=params)
    assert r.status_code == 200, r.text
    return r.text


def cells(html: str) -> list[str]:
    """Text of every table cell, tags stripped."""
    found = re.findall(r"<td[^>]*>(.*?)</td>", html, re.S)
    return [re.sub(r"<[^>]+>|\s+", " ", c).strip() for c in found]


def test_anonymous_request_is_refused_with_401(client):
    assert client.get("/billing/").status_code == 401
    assert client.get("/billing/attempts").status_code == 401


def test_invalid_token_is_refused_with_403(client):
    r = client.get("/billing/", headers={"Authorization": "Bearer not-a-jwt"})
    assert r.status_code == 403


def test_browser_without_login_gets_a_link_to_airflow_login(client):
    r = client.get("/billing/", headers={"Accept": "text/html"})
    assert r.status_code == 401
    assert "/auth/login?next=%2Fbilling%2F" in r.text


def test_overview_counts_customers_by_how_their_period_ended(client, auth):
    html = page(client, auth, "/")
    row = next(c for c in _rows(html) if c[0] == DAY.isoformat())
    # customers, paid 1st try, recovered, in dunning, lost, no billing key, rejected rows,
    # unknown/pending, net KRW: the rejected row is counted apart, not as a customer
    assert row[1:10] == ["5", "3", "0", "1", "0", "0", "1", "1", "29,700"]
    assert "insufficient funds" in row[10]
    assert RUN in row[11]


def test_a_recovered_customer_is_not_a_first_attempt_success_and_no_card_is_not_a_decline(
    client, auth
):
    html = page(client, auth, "/")
    row = next(c for c in _rows(html) if c[0] == CUSTOMER_DAY.isoformat())
    assert row[1:8] == ["5", "2", "1", "0", "1", "1", "0"]


def test_overview_cards_show_recovery_and_involuntary_churn_over_the_window(client, auth):
    html = re.sub(r"\s+", " ", page(client, auth, "/"))
    # failed first: s7 (in dunning), s4 (recovered), s5 (lost), s6 (no key)
    assert '25.0%</div><div class="k">recovered after a failed first attempt (1 of 4;' in html
    assert '2 d</div><div class="k">median days from billing date to recovery' in html
    assert "involuntary churn (1 declined, 1 no billing key; 12,000 KRW)" in html


def test_korean_reasons_carry_an_english_gloss(client, auth):
    html = page(client, auth, f"/dates/{CUSTOMER_DAY.isoformat()}")
    assert "분실신고된 카드입니다 (card reported lost)" in html
    assert "등록되지 않은 구매자입니다. (no billing key registered for this customer)" in html
    # a reason that already says it in English is left as written
    assert "[잔액부족] insufficient funds (" not in html


def test_overview_lists_runs_by_the_dates_of_the_attempts_they_wrote(client, auth):
    yesterday = DAY - timedelta(days=1)
    row = next(c for c in _rows(page(client, auth, "/")) if c[0] == yesterday.isoformat())
    assert f"run-{yesterday}" in row[11] and RUN not in row[11]


def test_overview_counts_unknowns_outstanding(client, auth):
    html = page(client, auth, "/")
    assert "unknowns / pending outstanding (9,900 KRW)" in html
    assert re.search(r'status=unknown">1</a> / <a [^>]*status=pending">0</a>', html)


def test_overview_charts_the_last_30_billing_dates(client, auth):
    html = page(client, auth, "/")
    assert html.count('<rect class="bar"') == 30
    assert f"{DAY.isoformat()}: 29,700 KRW paid" in html
    assert f"{DAY.isoformat()}: 25.0% declined" in html
    oldest_shown = DAY - timedelta(days=29)
    assert f"{oldest_shown.isoformat()}: 58,000 KRW paid" in html
    assert f"{(oldest_shown - timedelta(days=1)).isoformat()}: " not in html


def test_a_partial_refund_shows_its_amount_and_the_net_collected(client, auth):
    before = (DAY - timedelta(days=1)).isoformat()
    overview_row = next(r for r in _rows(page(client, auth, "/")) if r[0] == before)
    # paid 2 x 1,000 and 30,000 taken, 10,000 of it given back
    assert overview_row[9].split() == ["22,000", "10,000", "refunded"]
    date_page = page(client, auth, f"/dates/{before}")
    assert '10,000</div><div class="k">refunded (KRW)' in date_page
    assert '22,000</div><div class="k">net collected (KRW)' in date_page


def test_billing_date_page_lists_its_runs_and_reasons(client, auth):
    html = page(client, auth, f"/dates/{DAY.isoformat()}")
    assert f'href="/dags/{DAG}/runs/scheduled__2026-11-26T01%3A00%3A00%2B00%3A00"' in html
    assert "amount must be &gt; 0" in html
    assert "[잔액부족] insufficient funds" in html


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            {"status": "paid", "billing_date": DAY.isoformat()},
            {"s0-20261126-01", "s1-20261126-01", "s2-20261126-01"},
        ),  # fmt: skip
        ({"customer_uid": "cust-s7"}, {"s7-20261126-01"}),
        ({"merchant_uid": "s8-20261126-01"}, {"s8-20261126-01"}),
        ({"status": "unknown"}, {"s8-20261126-01"}),
    ],
)
def test_attempts_filter(client, auth, params, expected):
    html = page(client, auth, "/attempts", **params)
    shown = {r[0] for r in _rows(html) if len(r) > 1}
    assert shown == expected


def test_attempts_are_paged_50_at_a_time(client, auth):
    first = page(client, auth, "/attempts", status="paid")
    second = page(client, auth, "/attempts", status="paid", page=2)
    assert "66 attempts" in first and "page 1 of 2" in first
    assert len(_rows(first)) == 50 and len(_rows(second)) == 16
    assert not {r[0] for r in _rows(first)} & {r[0] for r in _rows(second)}


def test_paging_links_keep_the_filters(client, auth):
    first = page(client, auth, "/attempts", status="paid")
    second = page(client, auth, "/attempts", status="paid", page=2)
    assert 'href="/billing/attempts?page=2&amp;status=paid">next' in first
    assert 'href="/billing/attempts?page=1&amp;status=paid">← previous' in second
    assert "next →" not in second


def test_attempt_links_to_dag_run_task_log_and_receipt(client, auth):
    html = page(client, auth, "/attempts", merchant_uid="s0-20261126-01")
    run_url = f"/dags/{DAG}/runs/scheduled__2026-11-26T01%3A00%3A00%2B00%3A00"
    assert f'href="{run_url}" target="_top"' in html
    assert f'href="{run_url}/tasks/charge?map_index=3" target="_top"' in html
    assert 'href="http://127.0.0.1:1/receipts/imp_0"' in html


def test_declined_attempt_has_no_receipt_link(client, auth):
    html = page(client, auth, "/attempts", merchant_uid="s7-20261126-01")
    assert "receipt</a>" not in html


def test_subscription_page_shows_its_row_and_history(client, auth):
    html = page(client, auth, "/subscriptions/s7")
    assert "payment_method_required" not in html and ">active<" in html
    assert [r[0] for r in _rows(html)] == ["s7-20261126-01"]


def test_unknown_subscription_is_404(client, auth):
    assert client.get("/billing/subscriptions/nope", headers=auth).status_code == 404


def test_pages_load_nothing_from_outside(client, auth):
    for path in ("/", "/attempts", f"/dates/{DAY.isoformat()}", "/subscriptions/s7"):
        html = page(client, auth, path)
        assert "<script" not in html and "<link" not in html
        assert not re.search(r'src="https?://', html)


def test_plugin_is_loaded_from_the_entry_point_with_a_nav_entry(client):
    from airflow import plugins_manager

    apps, _ = plugins_manager.get_fastapi_plugins()
    assert {"name": "Billing", "url_prefix": "/billing"}.items() <= next(
        a for a in apps if a["name"] == "Billing"
    ).items()
    views, _ = plugins_manager._get_ui_plugins()
    assert any(v["name"] == "Billing" and v["href"] == "/billing/" for v in views)


def test_attempts_export_as_csv_with_the_views_filters(client, auth):
    import csv
    import io

    r = client.get("/billing/attempts.csv", headers=auth, params={"billing_date": DAY.isoformat()})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    assert r.content.startswith("\ufeff".encode())  # Excel reads it as UTF-8
    rows = list(csv.DictReader(io.StringIO(r.content.decode("utf-8-sig"))))
    assert sorted(row["merchant_uid"] for row in rows) == [
        "s0-20261126-01", "s1-20261126-01", "s2-20261126-01", "s7-20261126-01",
        "s8-20261126-01", "s9-rejected",
    ]  # fmt: skip
    declined = next(row for row in rows if row["merchant_uid"] == "s7-20261126-01")
    assert declined["fail_reason"] == "[잔액부족] insufficient funds"
    assert "claim_token" not in rows[0]
    page_html = page(client, auth, "/attempts", billing_date=DAY.isoformat())
    assert f"/billing/attempts.csv?billing_date={DAY.isoformat()}" in page_html
    assert client.get("/billing/attempts.csv").status_code == 401  # behind Airflow's login


def test_an_export_larger_than_its_limit_is_refused_with_what_to_narrow(client, auth, monkeypatch):
    monkeypatch.setattr("iamport_billing.ui.app.EXPORT_LIMIT", 5)
    r = client.get("/billing/attempts.csv", headers=auth, params={"billing_date": DAY.isoformat()})
    assert r.status_code == 413
    assert "6 attempts match" in r.text and "narrow it with the filters" in r.text


def test_a_csv_cell_a_spreadsheet_would_run_as_a_formula_is_written_as_text():
    from dataclasses import fields

    from iamport_billing.ui.csv_export import attempts_csv
    from iamport_billing.warehouse.ledger import Attempt

    row = dict.fromkeys((f.name for f in fields(Attempt)), None)
    row.update(
        merchant_uid="x1-20261126-01", billing_date=DAY, attempt_no=1, status="failed",
        amount=-5, fail_reason='=HYPERLINK("http://evil")', error_message="@SUM(1)",
    )  # fmt: skip
    (line,) = attempts_csv([Attempt(**row)]).splitlines()[1:]
    assert "'=HYPERLINK" in line and "'@SUM(1)" in line
    assert ",-5," in line  # a number stays a number


def test_the_plugin_registers_once_without_an_import_error():
    from airflow import plugins_manager

    names = [p["name"] for p in plugins_manager.get_plugin_info()]
    assert names.count("iamport_billing") == 1
    assert plugins_manager.get_import_errors() == {}


def test_charge_operator_links_to_its_runs_attempts():
    from airflow.models.taskinstancekey import TaskInstanceKey
    from iamport_billing.operators.charge import ChargeAgainOperator

    (link,) = ChargeAgainOperator.operator_extra_links
    assert isinstance(link, BillingPageLink)
    url = link.get_link(None, ti_key=TaskInstanceKey(DAG, "charge", RUN, 1, 2))
    assert url.endswith(
        "/billing/attempts?dag_id=iamport_billing_daily&run_id="
        "scheduled__2026-11-26T01%3A00%3A00%2B00%3A00"
    )


def test_mapped_ledger_task_id_becomes_task_page_with_map_index():
    assert split_task_id("charge[12]") == ("charge", 12)
    assert split_task_id("plan") == ("plan", None)
    assert task_log_url("d", "r", "plan") == "/dags/d/runs/r/tasks/plan"


def test_chart_scales_bars_to_a_round_maximum():
    chart = build_chart([ChartPoint(DAY, 7_000, 0.5), ChartPoint(DAY, 3_500, None)])
    assert nice_ceiling(7_000) == 10_000
    assert chart.bars[0].height == pytest.approx((chart.plot[3] - chart.plot[1]) * 0.7, abs=0.2)
    assert len(chart.dots) == 1


def test_the_chart_leaves_a_day_without_data_empty_and_does_not_draw_across_it():
    points = [ChartPoint(DAY - timedelta(days=n), 1_000, rate)
              for n, rate in ((5, 0.1), (4, 0.2), (2, 0.3), (1, None), (0, 0.1))]  # fmt: skip
    chart = build_chart(points)
    slot = (chart.plot[2] - chart.plot[0]) / 6
    xs = [b.x + b.width / 2 for b in chart.bars]
    assert [round((x - xs[0]) / slot, 3) for x in xs] == [0, 1, 3, 4, 5]  # day -3 left empty
    # Joined only where consecutive days both have a rate: -5 to -4; -2 and 0 stand alone.
    assert [len(line.split()) for line in chart.lines] == [2, 1, 1]


def _rows(html: str) -> list[list[str]]:
    body = html.split("<tbody>")[-1]
    return [cells(tr) for tr in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def test_every_korean_term_the_product_knows_has_an_english_gloss():
    from iamport_billing.emulator import app as emulator_app
    from iamport_billing.emulator.config import HARD_DECLINE_REASON, SOFT_DECLINE_REASON
    from iamport_billing.gateways.iamport_v1 import DUPLICATE_MARKERS
    from iamport_billing.hooks.iamport import BILLING_KEY_MISSING_MARKERS
    from iamport_billing.policy import DeclineTable
    from iamport_billing.ui.glossary import HANGUL, english_for

    emulator_messages = [v for k, v in vars(emulator_app).items() if k.startswith("MSG_")]
    known = [
        *DeclineTable().hard_patterns, *DUPLICATE_MARKERS, *BILLING_KEY_MISSING_MARKERS,
        SOFT_DECLINE_REASON, HARD_DECLINE_REASON, *emulator_messages,
    ]  # fmt: skip
    korean = [term for term in known if HANGUL.search(term)]
    assert len(korean) > 20
    assert [term for term in korean if english_for(term) is None] == []
