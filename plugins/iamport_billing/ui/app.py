"""The Billing page: a FastAPI app that Airflow mounts under ``/billing`` (see plugin.py).

Server-rendered HTML (Jinja2, inline CSS and SVG, nothing fetched from elsewhere) so it works
inside the Airflow UI's iframe and behind a proxy without extra routes. Airflow does not
authenticate plugin apps: every route depends on Airflow's own auth manager
(``requires_access_view(AccessView.PLUGINS)``), so anonymous requests get 401 and users
without the permission 403.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates

from iamport_billing.config import BillingConfig
from iamport_billing.policy import to_date
from iamport_billing.states import ATTEMPT_STATES, FAILED, PAID, REJECTED
from iamport_billing.ui import links
from iamport_billing.ui.chart import ChartPoint, build_chart
from iamport_billing.ui.csv_export import attempts_csv
from iamport_billing.ui.glossary import glossed
from iamport_billing.warehouse.ledger import Ledger
from iamport_billing.warehouse.reports import (
    AttemptFilter,
    BillingQueries,
    CustomerFigures,
    decline_rate,
)

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
STATUSES = ATTEMPT_STATES
PAGE_SIZE = 50
EXPORT_LIMIT = 200_000  # rows in one CSV export; more must be narrowed by the filters

LedgerFactory = Callable[[], Ledger]


def _krw(value: Any) -> str:
    return f"{int(value or 0):,}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _days(value: float | None) -> str:
    return "–" if value is None else f"{value:g} d"


TEMPLATES.env.filters["krw"] = _krw
TEMPLATES.env.filters["pct"] = _pct
TEMPLATES.env.filters["days"] = _days
TEMPLATES.env.filters["glossed"] = glossed


def default_ledger() -> Ledger:
    """The warehouse the DAGs write to (``IAMPORT_BILLING_WAREHOUSE_CONN_ID``)."""
    return Ledger.from_conn_id(BillingConfig.from_env().warehouse_conn_id)


def _require_airflow_user() -> Any:
    """Airflow's auth dependency, imported lazily: it pulls in the API server's modules."""
    from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
    from airflow.api_fastapi.core_api.security import requires_access_view

    return Depends(requires_access_view(AccessView.PLUGINS))


def _auth_error(request: Request, exc: HTTPException) -> Response:
    """Browsers get a page with a login link (same status code); API clients get JSON."""
    if exc.status_code in (401, 403) and "text/html" in request.headers.get("accept", ""):
        login = "/auth/login?" + urlencode({"next": str(request.url.path)})
        return TEMPLATES.TemplateResponse(
            request,
            "denied.html",
            {"status": exc.status_code, "detail": exc.detail, "login_url": login},
            status_code=exc.status_code,
        )
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


def queries(request: Request) -> Iterator[BillingQueries]:
    """One ledger connection per request, closed when the response is done."""
    state = request.app.state
    with state.ledger_factory() as ledger:
        ledger.init_schema()
        yield BillingQueries(ledger, state.subscriptions_table)


Queries = Annotated[BillingQueries, Depends(queries)]


def create_app(ledger_factory: LedgerFactory = default_ledger) -> FastAPI:
    config = BillingConfig.from_env()
    app = FastAPI(
        title="Iamport billing",
        dependencies=[_require_airflow_user()],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_exception_handler(HTTPException, _auth_error)  # type: ignore[arg-type]

    app.state.ledger_factory = ledger_factory
    app.state.subscriptions_table = config.subscriptions_table

    def render(request: Request, template: str, **context: Any) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        base = links.airflow_base_url()

        def here(path: str = "/", **params: Any) -> str:
            query = {k: v for k, v in params.items() if v not in (None, "")}
            return f"{root}{path}" + (f"?{urlencode(query)}" if query else "")

        return TEMPLATES.TemplateResponse(
            request,
            template,
            {
                "here": here,
                "dag_run_url": lambda dag_id, run_id: links.dag_run_url(dag_id, run_id, base),
                "task_log_url": lambda d, r, t: links.task_log_url(d, r, t, base),
                "statuses": STATUSES,
                **context,
            },
        )

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request, q: Queries) -> HTMLResponse:
        rows = q.date_rows(30)
        chart = build_chart(
            [
                ChartPoint(
                    r.billing_date,
                    r.outcomes.amount(PAID),
                    decline_rate(r.outcomes.count(PAID), r.outcomes.count(FAILED)),
                )
                for r in reversed(rows)
            ]
        )
        window = sum((r.customers for r in rows), CustomerFigures())
        return render(
            request, "overview.html", rows=rows, chart=chart, unsettled=q.unsettled(),
            window=window, PAID=PAID, FAILED=FAILED, REJECTED=REJECTED,
        )  # fmt: skip

    @app.get("/dates/{billing_date}", response_class=HTMLResponse)
    def billing_date_page(request: Request, billing_date: str, q: Queries) -> HTMLResponse:
        day = _parse_date(billing_date)
        outcomes = q.outcomes_by_date([day])[day]
        return render(
            request, "date.html", day=day, outcomes=outcomes,
            customers=q.customer_figures([day])[day], runs=q.runs_for([day])[day],
            reasons=q.ledger.top_reasons(billing_date=day, limit=10),
            PAID=PAID, FAILED=FAILED, REJECTED=REJECTED,
        )  # fmt: skip

    @app.get("/attempts", response_class=HTMLResponse)
    def attempts(
        request: Request,
        q: Queries,
        filters: Annotated[AttemptFilter, Depends(_attempt_filter)],
        page: Annotated[int, Query(ge=1)] = 1,
    ) -> HTMLResponse:
        return render(
            request, "attempts.html", filters=filters, result=q.attempts(filters, page, PAGE_SIZE)
        )

    @app.get("/attempts.csv")
    def attempts_export(
        q: Queries, filters: Annotated[AttemptFilter, Depends(_attempt_filter)]
    ) -> Response:
        """Every attempt the filters match, newest first, as the attempts view lists them."""
        result = q.attempts(filters, 1, EXPORT_LIMIT)
        if result.total > EXPORT_LIMIT:
            raise HTTPException(
                413,
                f"{result.total:,} attempts match; one export holds up to {EXPORT_LIMIT:,}: "
                "narrow it with the filters (a billing date, a status, a run)",
            )
        name = "_".join(["attempts", *filters.as_params().values()])
        return Response(
            attempts_csv(result.attempts),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{_filename(name)}.csv"'},
        )

    @app.get("/subscriptions/{subscription_id}", response_class=HTMLResponse)
    def subscription(request: Request, subscription_id: str, q: Queries) -> HTMLResponse:
        row, history = q.subscription(subscription_id)
        if row is None and not history:
            raise HTTPException(404, f"no subscription {subscription_id!r} in the ledger")
        return render(
            request, "subscription.html", subscription_id=subscription_id, row=row,
            history=history,
        )  # fmt: skip

    return app


def _attempt_filter(
    status: str | None = None,
    billing_date: str | None = None,
    customer_uid: str | None = None,
    merchant_uid: str | None = None,
    dag_id: str | None = None,
    run_id: str | None = None,
) -> AttemptFilter:
    """The attempts view's filters, from the query string (the page and its CSV share them)."""
    if billing_date:
        billing_date = _parse_date(billing_date).isoformat()
    return AttemptFilter(status, billing_date, customer_uid, merchant_uid, dag_id, run_id)


def _filename(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:120]


def _parse_date(value: str) -> date:
    try:
        day = to_date(value)
    except ValueError:
        day = None
    if day is None:
        raise HTTPException(422, f"not a date (YYYY-MM-DD): {value!r}")
    return day
