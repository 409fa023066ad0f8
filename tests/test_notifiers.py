"""Alerts: content (counts, amounts, billing date, run link, no secrets) and delivery through
Airflow's Slack, HTTP and SMTP providers to receivers on loopback, from a task and from the
triggerer; and which alerts fire."""

from __future__ import annotations

import asyncio
import base64
import copy
import html
import json
import logging
import socket
import traceback
from datetime import date, datetime
from types import SimpleNamespace

import pendulum
import pytest
from alert_receivers import http_receiver, smtp_receiver
from iamport_billing import alerts, tasks
from iamport_billing.charging import ChargeEngine, ChargeSettings
from iamport_billing.config import BillingConfig
from iamport_billing.gateways.iamport_v1 import IamportV1Gateway
from iamport_billing.hooks.iamport import IamportHook
from iamport_billing.notifiers import (
    Alert,
    EmailNotifier,
    SlackWebhookNotifier,
    WebhookNotifier,
)
from iamport_billing.policy import ChargeCandidate
from iamport_billing.warehouse.ledger import Ledger
from ops_support import RUN, subscribe
from support import (
    HARD_DECLINE_CARD,
    PAYING_CARD,
    SOFT_DECLINE_CARD,
    add_subscriptions,
    register_cards,
)

# Screens and messages, not money: SQLite is enough.
WAREHOUSES = ["sqlite"]
SLACK_TOKEN = "T0000/B0000/slack-webhook-secret-xyz"
WEBHOOK_TOKEN = "webhook-bearer-secret-abc"
SMTP_PASSWORD = "smtp-password-secret-123"
IMP_SECRET = "imp_test_secret"
SECRETS = (SLACK_TOKEN, WEBHOOK_TOKEN, SMTP_PASSWORD, IMP_SECRET)
ALERT = Alert(
    kind="decline_rate", title="decline rate 40% is over 20%", dag_id="iamport_billing_daily",
    run_id="scheduled__2026-11-26T01:00:00+00:00", billing_date="2026-11-26",
    counts={"paid": 3, "failed": 2}, amounts={"paid": 30_000, "failed": 12_000},
    details=("1 x [잔액부족] insufficient funds",),
    run_url="http://airflow.example/dags/iamport_billing_daily/runs/x",
)  # fmt: skip


def conn(monkeypatch, conn_id: str, **fields) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))


@pytest.fixture
def slack(monkeypatch):
    with http_receiver() as rx:
        conn(monkeypatch, "alert_slack", conn_type="slackwebhook", host=rx.url + "/services",
             password=SLACK_TOKEN)  # fmt: skip
        yield rx


@pytest.fixture
def webhook(monkeypatch):
    with http_receiver() as rx:
        conn(monkeypatch, "alert_hook", conn_type="http", host=rx.url + "/alerts",
             password=WEBHOOK_TOKEN)  # fmt: skip
        yield rx


@pytest.fixture
def mailbox(monkeypatch):
    with smtp_receiver() as box:
        conn(monkeypatch, "alert_mail", conn_type="smtp", host="127.0.0.1", port=box.port,
             login="ops", password=SMTP_PASSWORD,
             extra={"to": "ops@example.com, billing@example.com",
                    "from_email": "airflow@example.com", "disable_ssl": True,
                    "disable_tls": True})  # fmt: skip
        yield box


@pytest.fixture
def all_channels(slack, webhook, mailbox, monkeypatch):
    monkeypatch.setenv("IAMPORT_BILLING_ALERT_SLACK_CONN_ID", "alert_slack")
    monkeypatch.setenv("IAMPORT_BILLING_ALERT_WEBHOOK_CONN_ID", "alert_hook")
    monkeypatch.setenv("IAMPORT_BILLING_ALERT_EMAIL_CONN_ID", "alert_mail")
    monkeypatch.setenv("IAMPORT_BILLING_AIRFLOW_BASE_URL", "http://airflow.example")
    # dag.test() in Airflow 3.3.2 cannot finish a run of a DAG with deadline alerts (it looks
    # the alerts up by id and gets dicts); the scheduler test covers deadlines for real.
    monkeypatch.setenv("IAMPORT_BILLING_DAILY_DEADLINE", "none")
    return SimpleNamespace(slack=slack, webhook=webhook, mailbox=mailbox)


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def email_text(msg) -> str:
    """The alert text of an email: the provider sends it as HTML (``<pre>``, escaped)."""
    (part,) = [p for p in msg.walk() if p.get_content_type() == "text/html"]
    return html.unescape(part.get_payload(decode=True).decode())


def slack_text(req) -> str:
    return req["json"]["text"]


# -- delivery ----------------------------------------------------------------------------------


def test_slack_webhook_gets_the_alert_text(slack):
    SlackWebhookNotifier("alert_slack").deliver(ALERT)
    (req,) = slack.requests
    assert req["path"] == f"/services/{SLACK_TOKEN}"
    text = slack_text(req)
    for expected in ("decline rate 40%", "billing date: 2026-11-26", "paid: 3 (30,000 KRW)",
                     "failed: 2 (12,000 KRW)", "link: http://airflow.example/dags/"):  # fmt: skip
        assert expected in text
    assert_no_secret(text)


def test_webhook_gets_the_alert_as_json_with_a_bearer_token(webhook):
    WebhookNotifier("alert_hook").deliver(ALERT)
    (req,) = webhook.requests
    assert req["path"] == "/alerts"
    assert req["headers"]["Authorization"] == f"Bearer {WEBHOOK_TOKEN}"
    assert req["headers"]["Content-Type"] == "application/json"
    body = req["json"]
    assert (body["kind"], body["billing_date"], body["counts"], body["amounts"]) == (
        "decline_rate", "2026-11-26", {"paid": 3, "failed": 2}, {"paid": 30_000, "failed": 12_000}
    )  # fmt: skip
    assert body["run_url"] == ALERT.run_url
    assert_no_secret(req["raw"])


def test_webhook_connection_headers_and_basic_auth_are_sent(monkeypatch):
    """HttpHook's own connection semantics: extra = headers, login/password = basic auth."""
    with http_receiver() as rx:
        conn(monkeypatch, "alert_hook", conn_type="http", host=rx.url + "/alerts",
             login="billing", password=WEBHOOK_TOKEN,
             extra={"X-Team": "payments"})  # fmt: skip
        WebhookNotifier("alert_hook").deliver(ALERT)
    (req,) = rx.requests
    assert req["headers"]["X-Team"] == "payments"
    basic = base64.b64encode(f"billing:{WEBHOOK_TOKEN}".encode()).decode()
    assert req["headers"]["Authorization"] == f"Basic {basic}"


def test_email_goes_to_every_recipient(mailbox):
    EmailNotifier("alert_mail").deliver(ALERT)
    (msg,) = mailbox.messages
    assert mailbox.logins == [("ops", SMTP_PASSWORD)]
    assert msg["To"] == "ops@example.com, billing@example.com"
    assert msg["From"] == "airflow@example.com"
    assert msg["Subject"] == "[billing warning] decline rate 40% is over 20%"
    body = email_text(msg)
    assert "paid: 3 (30,000 KRW)" in body and "link: http://airflow.example" in body
    assert "1 x [잔액부족] insufficient funds" in body
    assert_no_secret(msg.as_string())


def test_a_channel_that_is_down_does_not_stop_the_others(webhook, monkeypatch, caplog, capfd):
    """Slack and SMTP refuse connections; the webhook still gets the alert, and the log says
    which connections failed without any token, password or URL path."""
    conn(monkeypatch, "alert_slack", conn_type="slackwebhook",
         host=f"http://127.0.0.1:{closed_port()}/services", password=SLACK_TOKEN)  # fmt: skip
    conn(monkeypatch, "alert_mail", conn_type="smtp", host="127.0.0.1", port=closed_port(),
         login="ops", password=SMTP_PASSWORD,
         extra={"to": "ops@example.com", "disable_ssl": True, "disable_tls": True})  # fmt: skip
    cfg = BillingConfig(alert_slack_conn_id="alert_slack", alert_email_conn_id="alert_mail",
                        alert_webhook_conn_id="alert_hook")  # fmt: skip
    caplog.set_level(logging.DEBUG)
    assert alerts.send([ALERT], cfg) == 1
    assert len(webhook.requests) == 1
    errors = [r.getMessage() for r in caplog.records if r.name == alerts.log.name and
              r.levelno >= logging.ERROR]  # fmt: skip
    assert sorted(errors) == [
        "alert decline_rate not delivered via alert_mail: ConnectionRefusedError sending an "
        "alert via connection 'alert_mail'",
        "alert decline_rate not delivered via alert_slack: URLError sending an alert via "
        "connection 'alert_slack'",
    ]
    assert_no_secret(caplog.text + "".join(capfd.readouterr()))


@pytest.mark.parametrize("channel", ["slack", "webhook", "email"])
def test_delivery_errors_never_show_a_secret(channel, monkeypatch):
    """A receiver that answers 500 (or a mail server that is gone): the error names the
    connection; no token, password or URL in it or in its traceback."""
    with http_receiver(status=500) as rx:
        conn(monkeypatch, "alert_slack", conn_type="slackwebhook", host=rx.url + "/services",
             password=SLACK_TOKEN)  # fmt: skip
        conn(monkeypatch, "alert_hook", conn_type="http",
             host=f"{rx.url}/alerts/{WEBHOOK_TOKEN}", password=WEBHOOK_TOKEN)  # fmt: skip
        conn(monkeypatch, "alert_mail", conn_type="smtp", host="127.0.0.1", port=closed_port(),
             login="ops", password=SMTP_PASSWORD, extra={"to": "ops@example.com"})  # fmt: skip
        notifier = {"slack": SlackWebhookNotifier("alert_slack"),
                    "webhook": WebhookNotifier("alert_hook"),
                    "email": EmailNotifier("alert_mail")}[channel]  # fmt: skip
        with pytest.raises(Exception) as err:  # noqa: B017 - which type is not the point
            notifier.deliver(ALERT)
    assert_no_secret("".join(traceback.format_exception(err.value)))
    assert notifier.conn_id in str(err.value)
    assert channel == "email" or len(rx.requests) == 1


# -- the triggerer path (deadline alerts) ------------------------------------------------------

DEADLINE_CONTEXT = {
    "dag_run": {"dag_id": "iamport_billing_daily", "run_id": "scheduled__2026-11-26",
                "logical_date": "2026-11-26T01:00:00Z", "run_after": "2026-11-26T01:00:00Z"},
    "deadline": {"id": "d1", "deadline_time": "2026-11-26T03:00:00Z"},
}  # fmt: skip


def run_in_triggerer(notifier: type, conn_id: str, context: dict) -> list[dict]:
    """What the triggerer runs for an ``AsyncCallback`` deadline: its ``CallbackTrigger``."""
    from airflow.triggers.callback import CallbackTrigger

    trigger = CallbackTrigger(
        f"{notifier.__module__}.{notifier.__qualname__}",
        {"conn_id": conn_id, "base_url": "http://airflow.example", "context": context},
    )

    async def events() -> list[dict]:
        return [e.payload async for e in trigger.run()]

    return asyncio.run(events())


def test_missed_deadline_reaches_every_channel_from_the_triggerer(all_channels):
    channels = ((SlackWebhookNotifier, "alert_slack"), (WebhookNotifier, "alert_hook"),
                (EmailNotifier, "alert_mail"))  # fmt: skip
    for notifier, conn_id in channels:
        events = run_in_triggerer(notifier, conn_id, copy.deepcopy(DEADLINE_CONTEXT))
        assert events[-1]["state"] == "success", events
    (body,) = all_channels.webhook.bodies()
    assert (body["kind"], body["billing_date"]) == ("deadline_missed", "2026-11-26")
    assert "2026-11-26T03:00:00Z" in body["title"]
    assert body["run_url"].startswith("http://airflow.example/dags/iamport_billing_daily/runs/")
    assert all_channels.webhook.requests[0]["headers"]["Authorization"] == f"Bearer {WEBHOOK_TOKEN}"
    (req,) = all_channels.slack.requests
    (msg,) = all_channels.mailbox.messages
    for text in (slack_text(req), email_text(msg)):
        assert "[CRITICAL] iamport_billing_daily run is not done by its deadline" in text
        assert "billing date: 2026-11-26" in text
        assert "link: http://airflow.example/dags/iamport_billing_daily/runs/" in text


def test_a_channel_down_in_the_triggerer_fails_its_callback_cleanly(monkeypatch, caplog, capfd):
    conn(monkeypatch, "alert_slack", conn_type="slackwebhook",
         host=f"http://127.0.0.1:{closed_port()}/services", password=SLACK_TOKEN)  # fmt: skip
    caplog.set_level(logging.DEBUG)
    (*_, event) = run_in_triggerer(SlackWebhookNotifier, "alert_slack", DEADLINE_CONTEXT)
    assert event["state"] == "failed"
    assert "alert_slack" in event["body"]
    assert_no_secret(event["body"] + caplog.text + "".join(capfd.readouterr()))


def test_missed_deadline_of_a_backfill_run_is_not_sent(webhook):
    context = {
        "dag_run": {"dag_id": "iamport_billing_daily", "run_id": "backfill__2026-11-20",
                    "run_type": "backfill", "logical_date": "2026-11-20T01:00:00Z"},
        "deadline": {"id": "d1", "deadline_time": "2026-11-20T03:00:00Z"},
    }  # fmt: skip
    (*_, event) = run_in_triggerer(WebhookNotifier, "alert_hook", context)
    assert event["state"] == "success"
    assert webhook.requests == []


def test_daily_dag_has_a_deadline_per_channel(all_channels, airflow_db, monkeypatch):
    monkeypatch.setenv("IAMPORT_BILLING_DAILY_DEADLINE", "12:30")
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag().get_dag("iamport_billing_daily")
    assert [str(d.interval) for d in dag.deadline] == ["2:30:00"] * 3  # 10:00 -> 12:30 KST
    assert {type(d.reference).__name__ for d in dag.deadline} == {"DagRunLogicalDateDeadline"}
    assert {d.callback.kwargs["conn_id"] for d in dag.deadline} == {
        "alert_slack", "alert_hook", "alert_mail"
    }  # fmt: skip


# -- which alerts fire -------------------------------------------------------------------------


def report(**by_status):
    by_status = {k: {"count": c, "amount": c * 1000} for k, c in by_status.items()}
    return {"billing_date": "2026-11-26", "guardrail": None, "top_reasons": [],
            "by_status": by_status}  # fmt: skip


@pytest.mark.parametrize(
    "statuses, kinds",
    [
        ({"paid": 80, "failed": 20}, []),
        ({"paid": 70, "failed": 30}, ["decline_rate"]),
        ({"paid": 5, "failed": 5}, []),  # too few attempts to judge a rate
        ({"paid": 10, "rejected": 2}, ["rejected_rows"]),
    ],
)
def test_run_alert_rules(statuses, kinds):
    cfg = BillingConfig(alert_decline_rate=0.2, alert_decline_min_attempts=20)
    found = alerts.run_alerts(report(**statuses), cfg=cfg, run=RUN)
    assert [a.kind for a in found] == kinds


def test_subscriptions_going_past_due_are_alerted_with_the_amount_owed(
    sqlite_warehouse, emulator, webhook, monkeypatch
):
    monkeypatch.setenv("IAMPORT_BILLING_ALERT_WEBHOOK_CONN_ID", "alert_hook")
    day = date(2026, 11, 26)
    with Ledger.from_conn_id("billing_warehouse") as ledger:
        ledger.init_schema()
        subscribe(ledger, emulator, "soft1", SOFT_DECLINE_CARD, day, amount=7700)
        hook = IamportHook()
        # The retry run that records the last soft decline is the one whose write-back alerts.
        retry_run = {"dag_id": "iamport_billing_retry", "run_id": "r1", "task_id": "retry"}
        ChargeEngine(
            IamportV1Gateway(hook), ledger, ChargeSettings(retry_schedule_days=()), retry_run
        ).charge_batch(
            [ChargeCandidate("soft1", "cust-soft1", 7700, day, name="plan")]
        )  # no retries configured: the first soft decline is the last
        hook.close()
    ti = SimpleNamespace(dag_id="iamport_billing_retry", run_id="r1", task_id="write_back",
                         map_index=-1, try_number=1)  # fmt: skip
    context = {"ti": ti, "logical_date": pendulum.datetime(2026, 11, 26, 14, tz="Asia/Seoul"),
               "dag_run": SimpleNamespace(run_after=None)}  # fmt: skip
    counts = tasks.write_back_step(BillingConfig.from_env(), context)
    assert counts["past_due"] == 1
    (body,) = webhook.bodies()
    assert (body["kind"], body["counts"], body["amounts"]) == (
        "past_due", {"past_due": 1}, {"past_due": 7700}
    )  # fmt: skip
    assert "soft1" in body["details"][0]


# -- end to end through Airflow ----------------------------------------------------------------


def run_daily(day: date, **params):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag().get_dag("iamport_billing_daily")
    when = pendulum.datetime(day.year, day.month, day.day, 10, tz="Asia/Seoul")
    return dag.test(logical_date=when, run_conf=params or None)


@pytest.mark.airflow
def test_daily_run_alerts_on_declines_and_rejected_rows(
    airflow_db, sqlite_warehouse, emulator, all_channels, monkeypatch
):
    monkeypatch.setenv("IAMPORT_BILLING_ALERT_DECLINE_MIN_ATTEMPTS", "1")
    monkeypatch.setenv("IAMPORT_BILLING_UNKNOWN_SETTLE_SECONDS", "0.1")
    day = date(2026, 11, 26)
    with Ledger.from_conn_id("billing_warehouse") as ledger:
        ledger.init_schema()
        add_subscriptions(ledger, [(f"p{i}", f"cust-p{i}", 10_000) for i in range(3)], day)
        add_subscriptions(ledger, [("soft1", "cust-soft1", 5000), ("hard1", "cust-hard1", 7000),
                                   ("zero1", "cust-zero1", 0)], day)  # fmt: skip
    register_cards(emulator, [(f"cust-p{i}", PAYING_CARD) for i in range(3)])
    register_cards(emulator, [("cust-soft1", SOFT_DECLINE_CARD), ("cust-hard1", HARD_DECLINE_CARD)])
    dr = run_daily(day)
    by_kind = {b["kind"]: b for b in all_channels.webhook.bodies()}
    assert set(by_kind) == {"decline_rate", "rejected_rows"}
    rate = by_kind["decline_rate"]
    assert (rate["counts"], rate["amounts"]) == (
        {"paid": 3, "failed": 2}, {"paid": 30_000, "failed": 12_000}
    )  # fmt: skip
    assert rate["billing_date"] == "2026-11-26"
    assert rate["run_url"].endswith(f"/runs/{dr.run_id}".replace(":", "%3A").replace("+", "%2B"))
    assert by_kind["rejected_rows"]["counts"] == {"rejected": 1}
    assert len(all_channels.slack.requests) == 2 and len(all_channels.mailbox.messages) == 2
    for req in all_channels.slack.requests + all_channels.webhook.requests:
        assert_no_secret(req["raw"])


@pytest.mark.airflow
def test_guardrail_trip_alerts_and_the_failed_task_alerts(
    airflow_db, sqlite_warehouse, emulator, all_channels
):
    day = date(2026, 11, 26)
    with Ledger.from_conn_id("billing_warehouse") as ledger:
        ledger.init_schema()
        add_subscriptions(ledger, [(f"p{i}", f"cust-p{i}", 10_000) for i in range(5)], day)
    run_daily(day, max_count=3)
    bodies = all_channels.webhook.bodies()
    guard = [b for b in bodies if b["kind"] == "guardrail"]
    assert len(guard) == 1 and "5 charges planned, over max_count 3" in guard[0]["details"][0]
    failed = [b for b in bodies if b["kind"] == "task_failed"]
    assert {b["title"].split(": task ")[1].split()[0] for b in failed} >= {"plan"}
    assert all(b["billing_date"] == "2026-11-26" and b["run_url"] for b in failed)


@pytest.mark.airflow
def test_reconcile_dag_alerts_what_needs_a_person(airflow_db, warehouse, emulator, webhook,
                                                  monkeypatch):  # fmt: skip
    monkeypatch.setenv("IAMPORT_BILLING_ALERT_WEBHOOK_CONN_ID", "alert_hook")
    day = date(2026, 11, 26)
    hook = IamportHook()
    with Ledger.from_conn_id("billing_warehouse") as ledger:
        ledger.init_schema()
        subscribe(ledger, emulator, "a1", PAYING_CARD, day)
        ChargeEngine(IamportV1Gateway(hook), ledger, ChargeSettings(), RUN).charge_batch(
            [ChargeCandidate("a1", "cust-a1", 9900, day, name="plan")]
        )
        ledger.execute("UPDATE billing_charge_attempts SET amount = 1000")
    hook.close()
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag().get_dag("iamport_billing_reconcile")
    dr = dag.test(logical_date=pendulum.instance(datetime.now()).add(minutes=1))
    assert [ti.state for ti in dr.get_task_instances()] == ["success"]
    (body,) = webhook.bodies()
    assert (body["kind"], body["counts"]) == ("needs_person", {"needs_person": 1, "fixed": 0})
    assert body["details"] == [
        "a1-20261126-01: amount differs from the ledger (ledger paid 1000, Iamport paid 9900)"
    ]
