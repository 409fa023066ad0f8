"""Deadline alerts for real: the scheduler finds the daily run past its deadline and a real
triggerer sends the alert through the Slack, HTTP and SMTP providers' async clients to receivers
on loopback (PostgreSQL metadata DB, api-server, scheduler, dag-processor and triggerer)."""

from __future__ import annotations

import html
import json
import time

import pendulum
import pytest
from alert_receivers import http_receiver, smtp_receiver
from iamport_billing.devserver import DAG_ID, AirflowApi, AirflowStack
from iamport_billing.policy import SEOUL

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(600)]

USER, PASSWORD = "ops", "deadline-ops-password"
SLACK_TOKEN = "T0000/B0000/deadline-slack-secret"
WEBHOOK_TOKEN = "deadline-webhook-secret"
SMTP_PASSWORD = "deadline-smtp-secret"


def test_a_run_past_its_deadline_is_alerted_from_the_triggerer_on_every_channel(
    tmp_path, postgres_database
):
    with http_receiver() as slack, http_receiver() as hook, smtp_receiver() as mailbox:
        stack = AirflowStack(
            home=tmp_path / "airflow",
            sql_alchemy_conn=f"postgresql+psycopg2://postgres@127.0.0.1:5432/{postgres_database}",
            users={USER: ("admin", PASSWORD)},
            extra_env={
                "AIRFLOW_CONN_ALERT_SLACK": json.dumps({
                    "conn_type": "slackwebhook", "host": slack.url + "/services",
                    "password": SLACK_TOKEN}),
                "AIRFLOW_CONN_ALERT_HOOK": json.dumps({
                    "conn_type": "http", "host": hook.url + "/alerts",
                    "password": WEBHOOK_TOKEN}),
                "AIRFLOW_CONN_ALERT_MAIL": json.dumps({
                    "conn_type": "smtp", "host": "127.0.0.1", "port": mailbox.port,
                    "login": "ops", "password": SMTP_PASSWORD,
                    "extra": {"to": "ops@example.com", "from_email": "airflow@example.com",
                              "disable_ssl": True, "disable_tls": True}}),
                "IAMPORT_BILLING_ALERT_SLACK_CONN_ID": "alert_slack",
                "IAMPORT_BILLING_ALERT_WEBHOOK_CONN_ID": "alert_hook",
                "IAMPORT_BILLING_ALERT_EMAIL_CONN_ID": "alert_mail",
                "IAMPORT_BILLING_DAILY_DEADLINE": "12:00",
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            },
        )  # fmt: skip
        try:
            stack.migrate()
            stack.start()
            stack.wait_ready(180)
            api = AirflowApi(stack.url, USER, PASSWORD)
            api.wait_for_dag(DAG_ID, 180, stack)
            # Yesterday's 10:00 KST run: its 12:00 deadline is long past. The DAG stays paused,
            # so the run waits queued and charges nothing; only the deadline fires.
            logical = pendulum.now(SEOUL).subtract(days=1).replace(hour=10, minute=0, second=0)
            run_id = api.ok(
                "POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                json={"logical_date": logical.isoformat(), "conf": {}},
            )["dag_run_id"]  # fmt: skip
            until = time.monotonic() + 240
            while not (slack.requests and hook.requests and mailbox.messages):
                stack.check_alive()
                assert time.monotonic() < until, (
                    f"no deadline alert on some channel\n{stack.tail()}"
                )
                time.sleep(2)
        finally:
            stack.stop()

    (body,) = hook.bodies()
    assert (body["kind"], body["severity"]) == ("deadline_missed", "critical")
    assert (body["run_id"], body["billing_date"]) == (run_id, logical.date().isoformat())
    assert body["run_url"].startswith(f"{stack.url}/dags/{DAG_ID}/runs/")
    assert hook.requests[0]["headers"]["Authorization"] == f"Bearer {WEBHOOK_TOKEN}"
    (req,) = slack.requests
    assert req["path"] == f"/services/{SLACK_TOKEN}"
    (msg,) = mailbox.messages
    assert mailbox.logins == [("ops", SMTP_PASSWORD)]
    (part,) = [p for p in msg.walk() if p.get_content_type() == "text/html"]
    for text in (req["json"]["text"], html.unescape(part.get_payload(decode=True).decode())):
        assert f"{DAG_ID} run is not done by its deadline" in text
        assert f"billing date: {logical.date().isoformat()}" in text
        assert f"link: {stack.url}/dags/{DAG_ID}/runs/" in text
    triggerer_log = (stack.home / "logs" / "triggerer.log").read_text(errors="replace")
    for secret in (SLACK_TOKEN, WEBHOOK_TOKEN, SMTP_PASSWORD):
        assert secret not in triggerer_log
