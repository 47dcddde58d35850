"""The console's HTML pages: server-rendered Jinja2 templates, no JavaScript build.

Patient names are shown here to the authenticated operator, read from the stored files; URLs carry
only row ids, and nothing here logs patient data.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from dicomnode.console import actions, audit, queries
from dicomnode.console.api import study_filters, who
from dicomnode.console.auth import check_csrf, check_login, client_address, csrf_token
from dicomnode.console.ruletester import RuleTestError, explain
from dicomnode.console.state import ConsoleContext, effective_config, overview

NAV = (
    ("/", "Overview"),
    ("/studies", "Studies"),
    ("/deliveries", "Deliveries"),
    ("/peers", "Peers"),
    ("/rules", "Rules"),
    ("/associations", "Associations"),
    ("/config", "Config"),
    ("/audit", "Audit"),
)


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else ""


def _mib(value: int | None) -> str:
    return f"{value / 2**20:,.0f} MiB" if value is not None else ""


def _angle(value: float) -> str:
    return f"{value:+g}°"


def environment() -> Environment:
    folder = resources.files("dicomnode.console") / "templates"
    env = Environment(loader=FileSystemLoader(str(folder)), autoescape=select_autoescape(["html"]))
    env.filters.update(when=_when, mib=_mib, angle=_angle)
    return env


def routes(ctx: ConsoleContext) -> list[Route]:
    env = environment()

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        flash = request.session.pop("flash", None)
        html = env.get_template(name).render(
            request=request,
            nav=NAV,
            path=request.url.path,
            actor=getattr(request.state, "actor", "anonymous"),
            auth=ctx.settings.http.authentication,
            csrf=csrf_token(request),
            node=ctx.settings.node,
            flash=flash,
            **context,
        )
        return HTMLResponse(html, status_code=status)

    def back(request: Request, to: str, message: str) -> RedirectResponse:
        request.session["flash"] = message
        return RedirectResponse(to, status_code=303)

    async def form_checked(request: Request) -> Any:
        form = await request.form()
        check_csrf(request, form.get("csrf_token"))  # type: ignore[arg-type]
        return form

    def page_overview(request: Request) -> Response:
        return render(request, "overview.html", o=overview(ctx))

    def page_studies(request: Request) -> Response:
        filters = study_filters(request)
        with ctx.sessions() as session:
            rows = queries.studies(session, **filters)
            states = queries.job_states(session)
            for row in rows:
                found = queries.instance_file(session, row["input"]["id"])
                row["patient"] = queries.patient_header(ctx.store, found[0]) if found else {}
        q = request.query_params
        return render(
            request, "studies.html", rows=rows, states=states, state=q.get("state", ""),
            since=q.get("since", ""), until=q.get("until", ""),
        )

    def page_job(request: Request) -> Response:
        job_id = int(request.path_params["job_id"])
        with ctx.sessions() as session:
            detail = queries.job_detail(session, job_id)
        if detail is None:
            raise HTTPException(404, f"job {job_id} does not exist")
        patient = queries.patient_header(ctx.store, detail["input"]["path"])
        return render(request, "job.html", d=detail, patient=patient)

    async def post_retry(request: Request) -> Response:
        await form_checked(request)
        job_id = int(request.path_params["job_id"])
        try:
            actions.retry(ctx, who(request), job_id)
            message = f"job {job_id} queued again"
        except actions.ActionError as e:
            message = f"job {job_id} not retried: {e}"
        return back(request, f"/jobs/{job_id}", message)

    def page_deliveries(request: Request) -> Response:
        q = request.query_params
        with ctx.sessions() as session:
            rows = queries.deliveries(session, state=q.get("state") or None, peer=q.get("peer") or None)
            states, peers = queries.delivery_facets(session)
        return render(
            request, "deliveries.html", rows=rows, states=states, peers=peers,
            state=q.get("state", ""), peer=q.get("peer", ""),
        )

    async def post_resend(request: Request) -> Response:
        form = await form_checked(request)
        delivery_id = int(request.path_params["delivery_id"])
        try:
            actions.resend_delivery(ctx, who(request), delivery_id)
            message = f"delivery {delivery_id} queued again"
        except actions.ActionError as e:
            message = f"delivery {delivery_id} not resent: {e}"
        target = str(form.get("next") or "/deliveries")
        if not target.startswith("/") or target.startswith("//"):
            target = "/deliveries"  # only local pages: no open redirect
        return back(request, target, message)

    async def post_resend_failed(request: Request) -> Response:
        await form_checked(request)
        result = actions.resend_all_failed(ctx, who(request))
        return back(request, "/deliveries", f"{len(result['resent'])} failed deliveries queued again")

    def page_peers(request: Request, echo: dict[str, Any] | None = None) -> Response:
        return render(request, "peers.html", peers=ctx.settings.peers, echo=echo)

    async def post_echo(request: Request) -> Response:
        await form_checked(request)
        try:
            result = await run_in_threadpool(actions.echo_peer, ctx, who(request), request.path_params["name"])
        except actions.ActionError as e:
            raise HTTPException(e.status, str(e)) from e
        return page_peers(request, echo=result)

    def page_rules(request: Request, test: dict[str, Any] | None = None, error: str | None = None) -> Response:
        config = effective_config(ctx.settings)
        return render(
            request, "rules.html", rules=config["rules"], loop_flags=config["loop_prevention"], test=test, error=error,
            status=400 if error else 200,
        )

    async def post_rule_test(request: Request) -> Response:
        form = await request.form(max_part_size=256 * 2**20)
        check_csrf(request, form.get("csrf_token"))  # type: ignore[arg-type]
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return page_rules(request, error="choose a DICOM file to test")
        data = await upload.read()
        try:
            result = explain(ctx.settings, data)
        except RuleTestError as e:
            return page_rules(request, error=str(e))
        result["filename"] = upload.filename
        return page_rules(request, test=result)

    def page_associations(request: Request) -> Response:
        with ctx.sessions() as session:
            rows = queries.associations(session)
        return render(request, "associations.html", rows=rows)

    def page_config(request: Request) -> Response:
        return render(request, "config.html", config=effective_config(ctx.settings))

    def page_audit(request: Request) -> Response:
        with ctx.sessions() as session:
            rows = audit.recent(session)
        return render(request, "audit.html", rows=rows)

    def page_login(request: Request, error: str | None = None) -> Response:
        return render(request, "login.html", error=error, status=401 if error else 200)

    async def post_login(request: Request) -> Response:
        form = await form_checked(request)
        actor = check_login(ctx.settings.http, str(form.get("username", "")), str(form.get("password", "")))
        if actor is None:
            audit.record(
                ctx.sessions, actor=str(form.get("username", ""))[:64] or "?", remote_addr=client_address(request),
                action="login", target=None, outcome="refused",
            )
            return page_login(request, error="wrong user name or password")
        request.session["user"] = actor
        request.session["csrf"] = None
        audit.record(ctx.sessions, actor=actor, remote_addr=client_address(request), action="login", target=None,
                     outcome="ok")
        return RedirectResponse("/", status_code=303)

    async def post_logout(request: Request) -> Response:
        await form_checked(request)
        request.session.clear()
        return RedirectResponse("/login" if ctx.settings.http.authentication else "/", status_code=303)

    return [
        Route("/", page_overview),
        Route("/studies", page_studies),
        Route("/jobs/{job_id:int}", page_job),
        Route("/jobs/{job_id:int}/retry", post_retry, methods=["POST"]),
        Route("/deliveries", page_deliveries),
        Route("/deliveries/resend-failed", post_resend_failed, methods=["POST"]),
        Route("/deliveries/{delivery_id:int}/resend", post_resend, methods=["POST"]),
        Route("/peers", page_peers),
        Route("/peers/{name}/echo", post_echo, methods=["POST"]),
        Route("/rules", page_rules),
        Route("/rules/test", post_rule_test, methods=["POST"]),
        Route("/associations", page_associations),
        Route("/config", page_config),
        Route("/audit", page_audit),
        Route("/login", page_login),
        Route("/login", post_login, methods=["POST"]),
        Route("/logout", post_logout, methods=["POST"]),
    ]
