"""Alert delivery: the alert model and Airflow notifiers for Slack, email and HTTP webhooks.

Each notifier is configured by one connection id, so the webhook URL, SMTP password or bearer
token stays in the connection (and out of DAG files, logs and the alert itself). A notifier
works as a task/DAG callback (``notify``), in the triggerer for deadline alerts
(``async_notify``), and with an explicit ``Alert`` from a task (``deliver``).
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import ssl
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from email.message import EmailMessage
from typing import Any
from urllib.parse import quote

import requests
from airflow.sdk import BaseHook, BaseNotifier

from iamport_billing.policy import billing_date_of_run

CRITICAL, WARNING = "critical", "warning"
DEFAULT_BASE_URL = "http://localhost:8080"
SLACK_DEFAULT_HOST = "https://hooks.slack.com/services"
TIMEOUT_S = 10.0


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
        """Triggerer path (deadline alerts): fetch the connection async, send in a thread."""
        if not deadline_applies(context or {}):
            self.log.info("deadline passed for a backfill run: no alert")
            return
        conn = await BaseHook.aget_connection(self.conn_id)
        await asyncio.to_thread(self.send, self._alert(context), conn)

    def deliver(self, alert: Alert) -> None:
        self.send(alert, BaseHook.get_connection(self.conn_id))

    def send(self, alert: Alert, conn: Any) -> None:
        raise NotImplementedError

    def _post(self, url: str, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        """POST JSON; errors name the connection, never the URL (it may hold a token)."""
        try:
            resp = requests.post(url, json=payload, headers=dict(headers or {}), timeout=TIMEOUT_S)
        except requests.RequestException as e:
            raise AlertDeliveryError(
                f"{type(e).__name__} posting an alert via connection {self.conn_id!r}"
            ) from None
        if resp.status_code >= 300:
            raise AlertDeliveryError(
                f"connection {self.conn_id!r} answered HTTP {resp.status_code} to an alert"
            )


class AlertDeliveryError(RuntimeError):
    """A channel did not take the alert; the message names the connection, not its secrets."""


def _mask(value: str | None) -> None:
    if value:
        try:
            from airflow.sdk.log import mask_secret

            mask_secret(value)
        except Exception:  # pragma: no cover
            pass


def _http_url(conn: Any) -> str:
    """A URL from host (a full URL, or a host name with schema/port)."""
    host = (conn.host or "").strip()
    if "://" in host:
        return host
    scheme = conn.schema or "https"
    return f"{scheme}://{host}" + (f":{conn.port}" if conn.port else "")


class SlackWebhookNotifier(AlertNotifier):
    """Slack incoming webhook. Connection: password = the webhook URL, or host = the webhook
    base (default ``https://hooks.slack.com/services``) and password = the ``T../B../..`` path,
    as in Airflow's Slack provider."""

    def send(self, alert: Alert, conn: Any) -> None:
        secret = conn.password or ""
        _mask(secret)
        if secret.startswith(("http://", "https://")):
            url = secret
        else:
            base = _http_url(conn) if conn.host else SLACK_DEFAULT_HOST
            url = f"{base.rstrip('/')}/{secret.lstrip('/')}" if secret else base
        self._post(url, {"text": alert.text()})


class WebhookNotifier(AlertNotifier):
    """Generic HTTP webhook: POSTs the alert as JSON. Connection: host = URL (or host name with
    schema/port), password = optional bearer token, extra ``headers`` = extra headers."""

    def send(self, alert: Alert, conn: Any) -> None:
        _mask(conn.password)
        headers = dict((conn.extra_dejson or {}).get("headers") or {})
        if conn.password:
            headers["Authorization"] = f"Bearer {conn.password}"
        self._post(_http_url(conn), alert.as_dict(), headers)


class EmailNotifier(AlertNotifier):
    """SMTP email. Connection: host, port, login/password (optional); extra ``to`` (list or
    comma-separated), ``from_email``, ``ssl`` (SMTPS) or ``starttls`` (both default false)."""

    def send(self, alert: Alert, conn: Any) -> None:
        extra = conn.extra_dejson or {}
        to = extra.get("to") or []
        recipients = [a.strip() for a in (to.split(",") if isinstance(to, str) else to) if a]
        if not recipients:
            raise AlertDeliveryError(f"connection {self.conn_id!r} has no 'to' in its extra")
        _mask(conn.password)
        msg = EmailMessage()
        msg["Subject"] = f"[billing {alert.severity}] {alert.title}"
        msg["From"] = extra.get("from_email") or conn.login or "airflow-billing@localhost"
        msg["To"] = ", ".join(recipients)
        msg.set_content(alert.text())
        port = int(conn.port or (465 if extra.get("ssl") else 25))
        try:
            if _flag(extra.get("ssl")):
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    conn.host, port, timeout=TIMEOUT_S, context=ssl.create_default_context()
                )
            else:
                smtp = smtplib.SMTP(conn.host, port, timeout=TIMEOUT_S)
            with smtp:
                if _flag(extra.get("starttls")):
                    smtp.starttls(context=ssl.create_default_context())
                if conn.login and conn.password:
                    smtp.login(conn.login, conn.password)
                smtp.send_message(msg)
        except (OSError, smtplib.SMTPException) as e:
            raise AlertDeliveryError(
                f"{type(e).__name__} sending an alert via connection {self.conn_id!r}"
            ) from None


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


CHANNELS: dict[str, type[AlertNotifier]] = {
    "slack": SlackWebhookNotifier,
    "email": EmailNotifier,
    "webhook": WebhookNotifier,
}
