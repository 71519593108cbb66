"""What every dashboard page shares: templates, the error pages, static files, headers.

`Pages` turns a handler into an endpoint: an exception it raises becomes a redirect, the
"continue" page or an error page, and every answer gets the security headers and
`cache-control: no-store`. Static files are read once at start and served from memory.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from tracker.ingest.addresses import ClientAddress
from tracker.lifespan import Runtime
from tracker.web.charts import short_url, when
from tracker.web.http import UNAVAILABLE, HttpError
from tracker.web.sessions import Session, SessionKeys

log = logging.getLogger("tracker.web.dashboard")

# templates/ and static/ sit beside the package, in tracker/web/.
_WEB = Path(__file__).resolve().parent.parent

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    # same-origin, not no-referrer: with no-referrer browsers send `Origin: null` on
    # same-origin form posts, which the cross-site check (inputs.same_origin) would then refuse.
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


class Redirect(Exception):
    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


class Continue(Redirect):
    """Go on to `location` from a page of our own (a same-site navigation)."""


@dataclass(frozen=True)
class Visit:
    """A signed-in request."""

    account_id: int
    account_name: str
    csrf: str
    session: Session
    key_name: str
    scope: str  # of the key it signed in with: "read", "register" or "full"


class Pages:
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._sessions = SessionKeys(runtime.settings.secret_key)
        self._addresses = ClientAddress(runtime.settings.trusted_proxies)
        self._static = _load_static(_WEB / "static")
        self._env = Environment(loader=FileSystemLoader(_WEB / "templates"), autoescape=True,
                                undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self._env.globals["static"] = self._static_url
        self._env.filters["count"] = lambda n: f"{n:,}"
        self._env.filters["percent"] = lambda x: f"{x * 100:.1f}%"
        self._env.filters["short_url"] = short_url
        self._env.filters["when"] = when

    def _page(self, handler: Callable[[Request], Awaitable[Response]]
              ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                response = await handler(request)
            except Continue as exc:
                response = self._render("continue.html", None, location=exc.location)
            except Redirect as exc:
                response = RedirectResponse(exc.location, status_code=303)
            except HttpError as exc:  # the API's error, as a page
                response = self._render("error.html", None, status=exc.status,
                                        headers=exc.headers, message=exc.message)
            except UNAVAILABLE as exc:
                log.warning("database unavailable for %s %s: %s", request.method,
                            request.url.path, type(exc).__name__)
                response = self._render("error.html", None, status=503, headers={
                    "retry-after": "5"}, message="The database is unavailable; try again shortly.")
            except Exception:
                log.exception("unexpected error in %s %s", request.method, request.url.path)
                response = self._render("error.html", None, status=500,
                                        message="Something went wrong on our side.")
            response.headers["cache-control"] = "no-store"
            return secured(response)
        return endpoint

    def _render(self, template: str, visit: Visit | None, status: int = 200,
                headers: dict[str, str] | None = None, **context: Any) -> HTMLResponse:
        html = self._env.get_template(template).render(visit=visit, **context)
        return HTMLResponse(html, status_code=status, headers=headers)

    def _static_url(self, path: str) -> str:
        return f"/dashboard/static/{path}?v={self._static[path][2]}"

    async def _serve_static(self, request: Request) -> Response:
        # A lookup in what was loaded at start, never a path on disk: nothing to traverse.
        found = self._static.get(request.path_params["path"])
        if found is None:
            return secured(Response("not found\n", status_code=404, media_type="text/plain"))
        body, media_type, digest = found
        etag = f'"{digest}"'
        immutable = request.query_params.get("v") == digest
        headers = {"etag": etag, "cache-control": "public, max-age=31536000, immutable"
                   if immutable else "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return secured(Response(status_code=304, headers=headers))
        return secured(Response(body, media_type=media_type, headers=headers))


def secured(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


_MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".svg": "image/svg+xml"}


def _load_static(root: Path) -> dict[str, tuple[bytes, str, str]]:
    """Every servable file under static/: path -> (bytes, media type, content hash)."""
    files = {}
    for path in sorted(root.rglob("*")):
        media_type = _MEDIA_TYPES.get(path.suffix)
        if media_type is not None and path.is_file():
            body = path.read_bytes()
            files[path.relative_to(root).as_posix()] = (
                body, media_type, hashlib.sha256(body).hexdigest()[:16])
    return files
