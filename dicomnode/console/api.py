"""The REST API under ``/api/v1/``: JSON for everything the pages show and do.

State-changing calls are POSTs; with a bearer token they need nothing else, from a browser session
they need the CSRF token (``GET /api/v1/csrf``, then header ``X-CSRF-Token``). The description of
every path is served at ``/api/v1/openapi.json`` (OpenAPI 3.1).
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dicomnode.console import actions, audit, queries
from dicomnode.console.auth import check_csrf, client_address, csrf_token
from dicomnode.console.ruletester import RuleTestError, explain
from dicomnode.console.state import ConsoleContext, effective_config, overview

PREFIX = "/api/v1"
MAX_UPLOAD_BYTES = 256 * 2**20


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


class ApiResponse(JSONResponse):
    """JSON with datetimes as ISO 8601 strings."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=_default, ensure_ascii=False).encode()


def who(request: Request) -> tuple[str, str | None]:
    return request.state.actor, client_address(request)


def parse_day(text: str | None, name: str) -> datetime | None:
    """``YYYY-MM-DD`` as midnight UTC; 400 if malformed."""
    if not text:
        return None
    try:
        return datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=UTC)
    except ValueError as e:
        raise HTTPException(400, f"{name}: expected YYYY-MM-DD, got {text!r}") from e


def study_filters(request: Request) -> dict[str, Any]:
    q = request.query_params
    until = parse_day(q.get("until"), "until")
    try:
        limit = min(int(q.get("limit", 50)), 500)
    except ValueError as e:
        raise HTTPException(400, "limit: expected an integer") from e
    return {
        "state": q.get("state") or None,
        "since": parse_day(q.get("since"), "since"),
        "until": until + timedelta(days=1) if until else None,
        "limit": limit,
    }


async def read_upload(request: Request) -> bytes:
    """The DICOM file of a rule test: multipart field ``file``, or the raw body (application/dicom)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_part_size=MAX_UPLOAD_BYTES)
        check_csrf(request, form.get("csrf_token"))  # type: ignore[arg-type]
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "no file uploaded (form field 'file')")
        return await upload.read()
    check_csrf(request, None)
    return await request.body()


def routes(ctx: ConsoleContext) -> list[Route]:
    def ok(content: Any, status: int = 200) -> ApiResponse:
        return ApiResponse(content, status_code=status)

    async def get_overview(request: Request) -> Response:
        return ok(overview(ctx))

    async def get_studies(request: Request) -> Response:
        filters = study_filters(request)
        with ctx.sessions() as session:
            rows = queries.studies(session, **filters)
        for row in rows:
            row["input"]["patient"] = queries.patient_header(ctx.store, _path(row["input"]["id"]))
        return ok({"studies": rows})

    def _path(instance_id: int) -> str:
        with ctx.sessions() as session:
            found = queries.instance_file(session, instance_id)
        if found is None:
            raise HTTPException(404, f"instance {instance_id} does not exist")
        return found[0]

    async def get_job(request: Request) -> Response:
        with ctx.sessions() as session:
            detail = queries.job_detail(session, int(request.path_params["job_id"]))
        if detail is None:
            raise HTTPException(404, "no such job")
        return ok(detail)

    async def post_retry(request: Request) -> Response:
        check_csrf(request, None)
        try:
            return ok(actions.retry(ctx, who(request), int(request.path_params["job_id"])))
        except actions.ActionError as e:
            return ok({"error": str(e)}, e.status)

    async def get_deliveries(request: Request) -> Response:
        q = request.query_params
        with ctx.sessions() as session:
            rows = queries.deliveries(session, state=q.get("state") or None, peer=q.get("peer") or None)
        return ok({"deliveries": rows})

    async def post_resend(request: Request) -> Response:
        check_csrf(request, None)
        try:
            return ok(actions.resend_delivery(ctx, who(request), int(request.path_params["delivery_id"])))
        except actions.ActionError as e:
            return ok({"error": str(e)}, e.status)

    async def post_resend_failed(request: Request) -> Response:
        check_csrf(request, None)
        return ok(actions.resend_all_failed(ctx, who(request)))

    async def get_peers(request: Request) -> Response:
        peers = [
            {"name": p.name, "ae_title": p.ae_title, "host": p.host, "port": p.port, "tls": p.tls}
            for p in ctx.settings.peers
        ]
        return ok({"peers": peers})

    async def post_echo(request: Request) -> Response:
        check_csrf(request, None)
        try:
            return ok(await run_in_threadpool(actions.echo_peer, ctx, who(request), request.path_params["name"]))
        except actions.ActionError as e:
            return ok({"error": str(e)}, e.status)

    async def get_rules(request: Request) -> Response:
        config = effective_config(ctx.settings)
        return ok({"rules": config["rules"], "loop_prevention": config["loop_prevention"]})

    async def post_rule_test(request: Request) -> Response:
        data = await read_upload(request)
        try:
            return ok(explain(ctx.settings, data))
        except RuleTestError as e:
            return ok({"error": str(e)}, 400)

    async def get_associations(request: Request) -> Response:
        accepted = {"true": True, "false": False}.get(request.query_params.get("accepted", ""))
        with ctx.sessions() as session:
            return ok({"associations": queries.associations(session, accepted=accepted)})

    async def get_config(request: Request) -> Response:
        return ok(effective_config(ctx.settings))

    async def get_audit(request: Request) -> Response:
        with ctx.sessions() as session:
            return ok({"audit": audit.recent(session)})

    async def get_csrf(request: Request) -> Response:
        return ok({"csrf_token": csrf_token(request)})

    async def get_openapi(request: Request) -> Response:
        return ok(openapi())

    return [
        Route(f"{PREFIX}/overview", get_overview),
        Route(f"{PREFIX}/studies", get_studies),
        Route(f"{PREFIX}/jobs/{{job_id:int}}", get_job),
        Route(f"{PREFIX}/jobs/{{job_id:int}}/retry", post_retry, methods=["POST"]),
        Route(f"{PREFIX}/deliveries", get_deliveries),
        Route(f"{PREFIX}/deliveries/resend-failed", post_resend_failed, methods=["POST"]),
        Route(f"{PREFIX}/deliveries/{{delivery_id:int}}/resend", post_resend, methods=["POST"]),
        Route(f"{PREFIX}/peers", get_peers),
        Route(f"{PREFIX}/peers/{{name}}/echo", post_echo, methods=["POST"]),
        Route(f"{PREFIX}/rules", get_rules),
        Route(f"{PREFIX}/rules/test", post_rule_test, methods=["POST"]),
        Route(f"{PREFIX}/associations", get_associations),
        Route(f"{PREFIX}/config", get_config),
        Route(f"{PREFIX}/audit", get_audit),
        Route(f"{PREFIX}/csrf", get_csrf),
        Route(f"{PREFIX}/openapi.json", get_openapi),
    ]


_PATHS: tuple[tuple[str, str, str], ...] = (
    ("get", "/overview", "Node, workers, model, queue depth by state, last 24 h, storage, recent errors"),
    ("get", "/studies", "Jobs newest first with input, rule, state, score and views; ?state=&since=&until=&limit="),
    ("get", "/jobs/{job_id}", "One job's provenance chain: association, input, job, outputs, deliveries, timings"),
    ("post", "/jobs/{job_id}/retry", "Queue a failed job again (audited)"),
    ("get", "/deliveries", "Deliveries newest first; ?state=&peer="),
    ("post", "/deliveries/{delivery_id}/resend", "Send one failed or sent delivery again (audited)"),
    ("post", "/deliveries/resend-failed", "Send every failed delivery again (audited)"),
    ("get", "/peers", "The configured peers"),
    ("post", "/peers/{name}/echo", "C-ECHO a peer: status and round-trip time in ms (audited)"),
    ("get", "/rules", "The rules and loop-prevention settings"),
    ("post", "/rules/test", "Which rule a DICOM file (multipart 'file' or a raw body) matches, and why not"),
    ("get", "/associations", "Associations newest first, with rejection reasons; ?accepted=true|false"),
    ("get", "/config", "Effective settings, secrets redacted"),
    ("get", "/audit", "Operator actions, newest first"),
    ("get", "/csrf", "This browser session's CSRF token (for X-CSRF-Token)"),
    ("get", "/instances/{instance_id}/thumbnail.png", "PNG thumbnail of a stored instance; ?size= (16..1024)"),
)


def openapi() -> dict[str, Any]:
    """An OpenAPI 3.1 description of the API (paths, methods, summaries, auth)."""
    paths: dict[str, Any] = {}
    for method, path, summary in _PATHS:
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in ("job_id", "delivery_id", "name", "instance_id")
            if f"{{{name}}}" in path
        ]
        paths.setdefault(f"{PREFIX}{path}", {})[method] = {
            "summary": summary,
            "parameters": params,
            "responses": {"200": {"description": "OK (JSON)"}, "401": {"description": "authentication required"}},
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "dicomnode console API", "version": "1"},
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],
    }
