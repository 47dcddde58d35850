"""Who is asking: bearer token, logged-in user, or (on loopback without authentication) ``local``.

Rules (issue #9, "Security"):

* with no ``api_token`` and no ``username`` configured (allowed on loopback only, see
  :class:`dicomnode.config.HttpSettings`) every request is served, as actor ``local``;
* otherwise a request must carry ``Authorization: Bearer <api_token>`` (actor ``token``) or a
  session cookie from the login page (actor: the user name); pages redirect to ``/login``, the API
  and ``/metrics`` answer 401. ``/healthz``, ``/readyz``, ``/login`` and ``/static`` are open;
* every POST needs a CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``) equal to the
  one in the signed session cookie, except requests authenticated by the bearer header, which a
  browser never adds by itself.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

from starlette.exceptions import HTTPException
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from dicomnode.config import HttpSettings
from dicomnode.console.passwords import verify_password

OPEN_PATHS = ("/healthz", "/readyz", "/login", "/static/")
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def check_login(http: HttpSettings, username: str, password: str) -> str | None:
    """The actor name for a login form's credentials, or None. The token also logs in."""
    if http.username and hmac.compare_digest(username, http.username) and verify_password(password, http.password_hash):
        return http.username
    if http.api_token and hmac.compare_digest(password, http.api_token):
        return "token"
    return None


class AuthMiddleware(BaseHTTPMiddleware):
    """Sets ``request.state.actor`` and ``request.state.by_bearer`` or refuses the request."""

    def __init__(self, app: Any, http: HttpSettings) -> None:
        super().__init__(app)
        self.http = http

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        actor, by_bearer = self._identify(request)
        request.state.actor = actor or "anonymous"
        request.state.by_bearer = by_bearer
        path = request.url.path
        if actor is None and not any(path == p or path.startswith(p) for p in OPEN_PATHS):
            if path.startswith("/api/") or path == "/metrics":
                return JSONResponse(
                    {"error": "authentication required"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
            return RedirectResponse("/login", status_code=303)
        return await call_next(request)

    def _identify(self, request: Request) -> tuple[str | None, bool]:
        token = bearer_token(request)
        if token is not None:
            ok = bool(self.http.api_token) and hmac.compare_digest(token, self.http.api_token)
            return ("token" if ok else None), ok
        user = request.session.get("user")
        if user:
            return str(user), False
        if not self.http.authentication:
            return "local", False
        return None, False


def csrf_token(request: Request) -> str:
    """This session's CSRF token (made on first use)."""
    token = request.session.get("csrf")
    if not token:
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return str(token)


def check_csrf(request: Request, submitted: str | None) -> None:
    """403 unless the request came with the bearer header or the session's CSRF token."""
    if getattr(request.state, "by_bearer", False):
        return
    submitted = submitted or request.headers.get(CSRF_HEADER)
    expected = request.session.get("csrf")
    if not submitted or not expected or not hmac.compare_digest(str(submitted), str(expected)):
        raise HTTPException(status_code=403, detail="missing or wrong CSRF token")


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None
