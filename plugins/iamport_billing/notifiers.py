"""Alert delivery: the alert model, and notifiers that hand it to Airflow's providers.

Slack goes through the Slack provider's ``SlackWebhookHook`` (a ``slackwebhook`` connection),
email through the SMTP provider's ``SmtpHook`` (an ``smtp`` connection), HTTP webhooks through
the HTTP provider's ``HttpHook`` / ``HttpAsyncHook`` (an ``http`` connection). Each notifier is
configured by one connection id, so the webhook URL, SMTP password or bearer token stays in the
connection (and out of DAG files, logs and the alert itself). A notifier works as a task/DAG
callback (``notify``), in the triggerer for deadline alerts (``async_notify``, through the
providers' async clients), and with an explicit ``Alert`` from a task (``deliver``).
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

import aiohttp
from airflow.providers.http.hooks.http import HttpAsyncHook, HttpHook
from airflow.providers.slack.hooks.slack_webhook import SlackWebhookHook
from airflow.providers.smtp.hooks.smtp import SmtpHook
from airflow.sdk import BaseHook, BaseNotifier

from iamport_billing.policy import billing_date_of_run

CRITICAL, WARNING = "critical", "warning"
DEFAULT_BASE_URL = "http://localhost:8080"
DEFAULT_FROM_EMAIL = "airflow-billing@localhost"
WEBHOOK_TIMEOUT_S = 10.0

# slack_sdk's webhook client logs the webhook URL, its token included, at INFO when it retries
# and at DEBUG on every send: it gets a logger that keeps its warnings and errors only.
SLACK_CLIENT_LOG = logging.getLogger(f"{__name__}.slack_sdk")
SLACK_CLIENT_LOG.setLevel(logging.WARNING)


def _redact(text: str) -> str:
    """Apply Airflow's secrets masker (imp_secret, tokens, connection passwords)."""
    try:
        from airflow.sdk.log import redact

        return str(redact(text))
    except Exception:  # pragma: no cover - masking must never stop an alert
        return text


@dataclass(frozen=True)
class Alert:
    """What ops need to act: what happened, how many, how much, for which date, and where.

    Only ids, counts and amounts: never card data, tokens or secrets.
    """

    kind: str
    title: str
    severity: str = WARNING
    dag_id: str | None = None
    run_id: str | None = None
    billing_date: str | None = None
    counts: Mapping[str, int] = field(default_factory=dict)
    amounts: Mapping[str, int] = field(default_factory=dict)
    details: tuple[str, ...] = ()
    run_url: str | None = None

    def text(self) -> str:
        lines = [f"[{self.severity.upper()}] {self.title}"]
        if self.billing_date:
            lines.append(f"billing date: {self.billing_date}")
        if self.dag_id:
            lines.append(f"run: {self.dag_id} / {self.run_id}")
        for key, count in sorted(self.counts.items()):
            amount = self.amounts.get(key)
            lines.append(f"  {key}: {count:,}" + (f" ({amount:,} KRW)" if amount else ""))
        lines += [f"  {d}" for d in self.details]
        if self.run_url:
            lines.append(f"link: {self.run_url}")
        return _redact("\n".join(lines))

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["details"] = list(self.details)
        return json.loads(_redact(json.dumps(data, ensure_ascii=False, default=str)))


def run_url(base_url: str | None, dag_id: str | None, run_id: str | None) -> str | None:
    """The Airflow UI page of a DAG run."""
    if not dag_id or not run_id:
        return None
    base = (base_url or _configured_base_url()).rstrip("/")
    return f"{base}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def _configured_base_url() -> str:
    try:
        from airflow.sdk import conf

        return conf.get("api", "base_url", fallback=None) or DEFAULT_BASE_URL
    except Exception:  # pragma: no cover - config unavailable (e.g. a bare script)
        return DEFAULT_BASE_URL


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _moment(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def alert_from_context(context: Mapping[str, Any], base_url: str | None = None) -> Alert:
    """An alert from a callback context: a failed task, a failed DAG run or a missed deadline.

    Deadline callbacks get a small context (``dag_run`` as a dict and ``deadline``); task and
    DAG callbacks get the full one. The exception text is kept short and masked.
    """
    dag_run = context.get("dag_run")
    ti = context.get("ti") or context.get("task_instance")
    dag_id = _get(ti, "dag_id") or _get(dag_run, "dag_id")
    run_id = _get(ti, "run_id") or _get(dag_run, "run_id") or _get(dag_run, "dag_run_id")
    try:
        day = billing_date_of_run(
            _moment(context.get("logical_date") or _get(dag_run, "logical_date")),
            _moment(_get(dag_run, "run_after")),
        ).isoformat()
    except (ValueError, TypeError):
        day = None
    deadline = context.get("deadline")
    if deadline is not None:
        when = _get(deadline, "deadline_time")
        return Alert(
            kind="deadline_missed",
            title=f"{dag_id} run is not done by its deadline ({when})",
            severity=CRITICAL,
            dag_id=dag_id, run_id=run_id, billing_date=day,
            details=("the run is still going or stuck: check the run and the iamport_api pool",),
            run_url=run_url(base_url, dag_id, run_id),
        )  # fmt: skip
    error = context.get("exception")
    details = [f"error: {type(error).__name__}: {str(error)[:300]}"] if error else []
    if ti is not None:
        task = _get(ti, "task_id")
        index = _get(ti, "map_index")
        task = f"{task}[{index}]" if isinstance(index, int) and index >= 0 else task
        tries = int(_get(ti, "try_number") or 1)
        title = f"{dag_id}: task {task} failed after {tries} tr{'y' if tries == 1 else 'ies'}"
        counts = {"tries": tries}
    else:
        title = f"{dag_id}: run failed" + (
            f" ({context['reason']})" if context.get("reason") else ""
        )
        counts = {}
    return Alert(
        kind="task_failed" if ti is not None else "run_failed",
        title=title, severity=CRITICAL, dag_id=dag_id, run_id=run_id, billing_date=day,
        counts=counts, details=tuple(details), run_url=run_url(base_url, dag_id, run_id),
    )  # fmt: skip


def deadline_applies(context: Mapping[str, Any]) -> bool:
    """Backfill runs of past dates are born past their deadline: only other runs alert."""
    return _get(context.get("dag_run"), "run_type") != "backfill"


class AlertNotifier(BaseNotifier):
    """Base of the channels: builds the alert from the context unless given one, delivers it.

    :param conn_id: the channel's Airflow connection.
    :param alert: a prepared alert (or its dict); None builds one from the callback context.
    :param base_url: Airflow UI base URL for run links (default: ``[api] base_url``).
    """

    template_fields = ()

    def __init__(
        self,
        conn_id: str,
        *,
        alert: Alert | Mapping[str, Any] | None = None,
        base_url: str | None = None,
        context: Any = None,
    ):
        super().__init__(context=context)
        self.conn_id = conn_id
        self.alert = Alert(**alert) if isinstance(alert, Mapping) else alert
        self.base_url = base_url

    def _alert(self, context: Mapping[str, Any]) -> Alert:
        return self.alert or alert_from_context(context or {}, self.base_url)

    def notify(self, context: Any) -> None:
        self.deliver(self._alert(context))

    async def async_notify(self, context: Any) -> None:
        """Triggerer path (deadline alerts): the provider's async client, no thread."""
        if not deadline_applies(context or {}):
            self.log.info("deadline passed for a backfill run: no alert")
            return
        alert = self._alert(context)
        with self._named_errors():
            await self.asend(alert)

    def deliver(self, alert: Alert) -> None:
        with self._named_errors():
            self.send(alert)

    def send(self, alert: Alert) -> None:
        raise NotImplementedError

    async def asend(self, alert: Alert) -> None:
        raise NotImplementedError

    @contextmanager
    def _named_errors(self) -> Iterator[None]:
        """Provider errors may quote the request URL (a webhook token) or the server's answer:
        re-raise as the error's type and the connection id, without the original chained."""
        try:
            yield
        except AlertDeliveryError:
            raise
        except Exception as e:
            raise AlertDeliveryError(
                f"{type(e).__name__} sending an alert via connection {self.conn_id!r}"
            ) from None


class AlertDeliveryError(RuntimeError):
    """A channel did not take the alert; the message names the connection, not its secrets."""


class SlackWebhookNotifier(AlertNotifier):
    """Slack incoming webhook through the Slack provider's ``SlackWebhookHook``: a
    ``slackwebhook`` connection with the webhook URL as password, or host =
    ``https://hooks.slack.com/services`` and password = the ``T../B../..`` token."""

    def _hook(self) -> SlackWebhookHook:
        return SlackWebhookHook(slack_webhook_conn_id=self.conn_id, logger=SLACK_CLIENT_LOG)

    def send(self, alert: Alert) -> None:
        self._hook().send_text(alert.text())

    async def asend(self, alert: Alert) -> None:
        await self._hook().async_send(text=alert.text())


class WebhookNotifier(AlertNotifier):
    """Generic HTTP webhook through the HTTP provider's ``HttpHook``: POSTs the alert as JSON.

    An ``http`` connection, read as ``HttpHook`` reads it: host = URL (or host name with
    schema/port), login/password = basic auth, extra = headers (plus ``timeout``). A password
    without a login is sent as a bearer token.
    """

    def send(self, alert: Alert) -> None:
        conn = BaseHook.get_connection(self.conn_id)
        HttpHook(method="POST", http_conn_id=self.conn_id).run(
            json=alert.as_dict(),
            headers=_bearer(conn),
            extra_options={"timeout": conn.extra_dejson.get("timeout", WEBHOOK_TIMEOUT_S)},
        )

    async def asend(self, alert: Alert) -> None:
        conn = await BaseHook.aget_connection(self.conn_id)
        timeout = float(conn.extra_dejson.get("timeout", WEBHOOK_TIMEOUT_S))
        await HttpAsyncHook(method="POST", http_conn_id=self.conn_id).run(
            json=alert.as_dict(),
            headers=_bearer(conn),
            extra_options={"timeout": aiohttp.ClientTimeout(total=timeout)},
        )


def _bearer(conn: Any) -> dict[str, str]:
    """``HttpHook`` sends login/password as basic auth; a lone password is a bearer token."""
    if conn.password and not conn.login:
        return {"Authorization": f"Bearer {conn.password}"}
    return {}


class EmailNotifier(AlertNotifier):
    """Email through the SMTP provider's ``SmtpHook``: an ``smtp`` connection read as the hook
    reads it (host, port, login/password; extra ``from_email``, ``timeout``, ``disable_ssl``,
    ``disable_tls``: SSL and STARTTLS are on unless disabled), plus extra ``to``: the
    recipients (a list, or comma-separated)."""

    def send(self, alert: Alert) -> None:
        with SmtpHook(smtp_conn_id=self.conn_id) as smtp:
            smtp.send_email_smtp(**self._email(alert, smtp))

    async def asend(self, alert: Alert) -> None:
        async with SmtpHook(smtp_conn_id=self.conn_id) as smtp:
            await smtp.asend_email_smtp(**self._email(alert, smtp))

    def _email(self, alert: Alert, smtp: SmtpHook) -> dict[str, Any]:
        to = smtp.conn.extra_dejson.get("to")
        if not to:
            raise AlertDeliveryError(f"connection {self.conn_id!r} has no 'to' in its extra")
        return {
            "to": to,
            "from_email": smtp.from_email or smtp.smtp_user or DEFAULT_FROM_EMAIL,
            "subject": _redact(f"[billing {alert.severity}] {alert.title}"),
            "html_content": f"<pre>{html.escape(alert.text())}</pre>",
        }


CHANNELS: dict[str, type[AlertNotifier]] = {
    "slack": SlackWebhookNotifier,
    "email": EmailNotifier,
    "webhook": WebhookNotifier,
}
