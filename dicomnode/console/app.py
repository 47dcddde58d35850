"""The console's ASGI application (Starlette): pages, API, thumbnails, metrics and health.

:func:`create_app` wires the routes of :mod:`dicomnode.console.pages` and
:mod:`dicomnode.console.api` behind the session and authentication middleware.
"""

from __future__ import annotations

import logging
import secrets
from importlib import resources

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dicomnode.console import api, pages, queries
from dicomnode.console.auth import AuthMiddleware
from dicomnode.console.health import readiness
from dicomnode.console.state import ConsoleContext
from dicomnode.console.thumbnails import DEFAULT_SIZE, thumbnail
from dicomnode.errors import NodeError

logger = logging.getLogger(__name__)


def create_app(ctx: ConsoleContext, session_secret: str | None = None) -> Starlette:
    """The console for ``ctx``; sessions are signed with ``session_secret`` (random per process if None)."""

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        checks = await run_in_threadpool(
            readiness, ctx.settings, ctx.sessions, ctx.store, ctx.scp_listening, ctx.model_problem
        )
        ready = all(c.ok for c in checks)
        body = {
            "ready": ready,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
            "reasons": [f"{c.name}: {c.detail}" for c in checks if not c.ok],
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        if ctx.registry is None:
            raise HTTPException(404, "metrics are not enabled")
        body = await run_in_threadpool(generate_latest, ctx.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def thumb(request: Request) -> Response:
        instance_id = int(request.path_params["instance_id"])
        try:
            size = int(request.query_params.get("size", DEFAULT_SIZE))
        except ValueError as e:
            raise HTTPException(400, "size: expected an integer") from e
        with ctx.sessions() as session:
            found = queries.instance_file(session, instance_id)
        if found is None:
            raise HTTPException(404, f"instance {instance_id} does not exist")
        try:
            png = await run_in_threadpool(thumbnail, ctx.store, ctx.thumbnail_dir, found[0], found[1], size)
        except (NodeError, OSError, ValueError) as e:
            logger.warning("thumbnail of instance %d: %s", instance_id, e)
            raise HTTPException(422, f"instance {instance_id} has no displayable image") from e
        return FileResponse(png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    static = resources.files("dicomnode.console") / "static"
    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/thumbnails/{instance_id:int}.png", thumb),
        Route(f"{api.PREFIX}/instances/{{instance_id:int}}/thumbnail.png", thumb),
        *api.routes(ctx),
        *pages.routes(ctx),
        Mount("/static", StaticFiles(directory=str(static)), name="static"),
    ]
    http = ctx.settings.http
    middleware = [
        Middleware(
            SessionMiddleware,
            secret_key=session_secret or secrets.token_urlsafe(32),
            session_cookie="dicomnode_session",
            same_site="strict",
            https_only=http.tls,
        ),
        Middleware(AuthMiddleware, http=http),
    ]

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if request.url.path.startswith(api.PREFIX):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
        return PlainTextResponse(f"{exc.status_code}: {exc.detail}\n", status_code=exc.status_code)

    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: api_error})
