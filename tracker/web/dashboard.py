"""The web dashboard: server-rendered pages over store/reports.py for the people who read reports.

Signing in takes an API key once; the answer is a session cookie holding a signed,
expiring token (web/sessions.py), never the key itself. Every page checks that the key
still exists, so revoking a key ends its sessions. POST forms carry a per-session
CSRF token, and a POST the browser marks as cross-site is refused before the token is
even looked at (which also stops login CSRF, where no session exists yet). Failed
sign-ins are throttled per address together with the API's failed authentications. Pages are
Jinja2 templates with autoescaping; charts are drawn by the vendored Chart.js from a
JSON block (web/charts.py makes it), so the CSP allows no inline script or style at all.
Another account's campaign or message is a 404, as in the API.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit
from zoneinfo import ZoneInfo

import asyncpg
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from tracker.ingest.addresses import ClientAddress
from tracker.lifespan import Runtime
from tracker.store import accounts, campaigns, reports
from tracker.store.queries import QUERIES
from tracker.web import export, filters, sessions
from tracker.web.campaigns_api import message_filter
from tracker.web.charts import campaign_view, short_url, when
from tracker.web.http import UNAVAILABLE, HttpError
from tracker.web.sessions import SESSION_LIFETIME_S, Session, SessionKeys
from tracker.web.throttle import client_of

log = logging.getLogger("tracker.web.dashboard")

_HERE = Path(__file__).resolve().parent
_MAX_FORM_BYTES = 16 * 1024
RECENT_MESSAGES = 20
MESSAGES_PER_PAGE = 100
# The message list's filters, as the API names them (GET /api/campaigns/{id}/messages).
FILTERS = ("search", "status", "link", "tag", "from", "to", "client", "country")
STATUS_LABELS = {"opened": "Opened", "clicked": "Clicked",
                 "not_opened": "Not opened",
                 "machine_only": "Machine activity only", "untracked": "Sent without a pixel"}
MAIL_CLIENTS = ("Apple Mail", "Gmail", "Outlook", "Yahoo Mail", "Thunderbird", "webmail",
                "other")
_MAX_ID = 2**63 - 1

COOKIE = "tracker_session"
# Over HTTPS the __Host- prefix makes the browser refuse the cookie unless it is Secure,
# host-only and Path=/, so a sibling subdomain cannot plant or shadow it.
SECURE_COOKIE = "__Host-tracker_session"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    # same-origin, not no-referrer: with no-referrer browsers send `Origin: null` on
    # same-origin form posts, which the cross-site check below would then refuse.
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}



class _Redirect(Exception):
    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


class _Continue(_Redirect):
    """Go on to `location` from a page of our own (a same-site navigation)."""


@dataclass(frozen=True)
class _Visit:
    """A signed-in request."""

    account_id: int
    account_name: str
    csrf: str
    session: Session
    key_name: str
    scope: str  # of the key it signed in with: "read", "register" or "full"


_LOCAL_NEXT = re.compile(r"/dashboard/[A-Za-z0-9/_\-.?=&%+]*")


def _local_next(value: str | None) -> str:
    """Where to go after signing in: only a dashboard path, so it is never an open redirect."""
    if value and _LOCAL_NEXT.fullmatch(value) and "//" not in value:
        return value
    return "/dashboard/campaigns"


class Dashboard:
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._sessions = SessionKeys(runtime.settings.secret_key)
        self._addresses = ClientAddress(runtime.settings.trusted_proxies)
        self._static = _load_static(_HERE / "static")
        self._env = Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=True,
                                undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self._env.globals["static"] = self._static_url
        self._env.filters["count"] = lambda n: f"{n:,}"
        self._env.filters["percent"] = lambda x: f"{x * 100:.1f}%"
        self._env.filters["short_url"] = short_url
        self._env.filters["when"] = when

    def routes(self) -> list[Route]:
        page = self._page
        return [
            Route("/dashboard", self._root, methods=["GET"]),
            Route("/dashboard/", self._root, methods=["GET"]),
            Route("/dashboard/sign-in", page(self._sign_in_form), methods=["GET"]),
            Route("/dashboard/sign-in", page(self._sign_in), methods=["POST"]),
            Route("/dashboard/sign-out", page(self._sign_out), methods=["POST"]),
            Route("/dashboard/campaigns", page(self._campaigns), methods=["GET"]),
            Route("/dashboard/campaigns/{id}", page(self._campaign), methods=["GET"]),
            Route("/dashboard/campaigns/{id}/messages", page(self._messages), methods=["GET"]),
            Route("/dashboard/campaigns/{id}/messages/export", page(self._export_messages),
                  methods=["GET"]),
            Route("/dashboard/messages/{id}", page(self._message), methods=["GET"]),
            Route("/dashboard/static/{path:path}", self._serve_static, methods=["GET", "HEAD"]),
        ]

    # -- plumbing --

    def _page(self, handler: Callable[[Request], Awaitable[Response]]
              ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                response = await handler(request)
            except _Continue as exc:
                response = self._render("continue.html", None, location=exc.location)
            except _Redirect as exc:
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
            return _secured(response)
        return endpoint

    def _render(self, template: str, visit: _Visit | None, status: int = 200,
                headers: dict[str, str] | None = None, **context: Any) -> HTMLResponse:
        html = self._env.get_template(template).render(visit=visit, **context)
        return HTMLResponse(html, status_code=status, headers=headers)

    def _https(self, request: Request) -> bool:
        if request.url.scheme == "https":
            return True
        peer = request.client.host if request.client else None
        if peer is None or not self._addresses.is_trusted(peer):
            return False
        proto = request.headers.get("x-forwarded-proto", "")
        return proto.split(",")[0].strip().lower() == "https"

    def _cookie_name(self, request: Request) -> str:
        return SECURE_COOKIE if self._https(request) else COOKIE

    def _set_cookie(self, request: Request, response: Response, value: str, max_age: int) -> None:
        secure = self._https(request)
        response.headers.append("set-cookie", (
            f"{SECURE_COOKIE if secure else COOKIE}={value}; Max-Age={max_age}; Path=/; "
            f"HttpOnly; SameSite=Strict{'; Secure' if secure else ''}"))

    async def _visit(self, request: Request) -> _Visit | None:
        token = request.cookies.get(self._cookie_name(request))
        session = self._sessions.verify(token, time.time()) if token else None
        if session is None:
            return None
        key = await sessions.session_key(self._runtime.pool, session)
        if key is None:  # the key was revoked, the account deleted, or it signed out
            return None
        return _Visit(session.account_id, key.account_name, self._sessions.csrf(session),
                      session, key.key_name, key.scope)

    async def _signed_in(self, request: Request) -> _Visit:
        visit = await self._visit(request)
        if visit is not None:
            return visit
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if (request.headers.get("sec-fetch-site") == "cross-site"
                and request.headers.get("sec-fetch-mode") == "navigate"):
            # A link followed from mail or chat: the browser held back the SameSite=Strict
            # cookie. Going on from our own page makes the navigation same-site, and sends it.
            raise _Continue(quote(here, safe="/?=&%"))
        raise _Redirect("/dashboard/sign-in?next=" + quote(here, safe="/"))

    def _static_url(self, path: str) -> str:
        return f"/dashboard/static/{path}?v={self._static[path][2]}"

    async def _serve_static(self, request: Request) -> Response:
        # A lookup in what was loaded at start, never a path on disk: nothing to traverse.
        found = self._static.get(request.path_params["path"])
        if found is None:
            return _secured(Response("not found\n", status_code=404, media_type="text/plain"))
        body, media_type, digest = found
        etag = f'"{digest}"'
        immutable = request.query_params.get("v") == digest
        headers = {"etag": etag, "cache-control": "public, max-age=31536000, immutable"
                   if immutable else "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return _secured(Response(status_code=304, headers=headers))
        return _secured(Response(body, media_type=media_type, headers=headers))

    # -- handlers --

    async def _root(self, request: Request) -> Response:
        return _secured(RedirectResponse("/dashboard/campaigns", status_code=303))

    async def _sign_in_form(self, request: Request, error: str | None = None,
                            status: int = 200, headers: dict[str, str] | None = None
                            ) -> Response:
        if error is None and await self._visit(request) is not None:
            raise _Redirect(_local_next(request.query_params.get("next")))
        return self._render("sign_in.html", None, status=status, headers=headers, error=error,
                            signed_out="signed-out" in request.query_params,
                            form_token=self._sessions.sign_in_form(time.time()),
                            next=_local_next(request.query_params.get("next")))

    async def _sign_in(self, request: Request) -> Response:
        # The API's throttle, checked before the form is read: a key guessed here costs
        # the same bucket as one guessed at the API, and a flood of guesses no query.
        client = client_of(request, self._addresses)
        wait = self._runtime.auth_throttle.retry_after(client)
        if wait is not None:
            self._runtime.metrics.auth_throttled += 1
            return await self._sign_in_form(
                request, "Too many failed sign-ins from your address; try again in "
                         f"{wait} second{'s' if wait != 1 else ''}.", 429,
                {"retry-after": str(wait)})
        form = await _form(request)
        if not _same_origin(request) or not self._sessions.check_sign_in_form(
                form.get("form_token", ""), time.time()):
            return await self._sign_in_form(
                request, "The sign-in form expired or came from another site; try again.", 403)
        api_key = form.get("api_key", "").strip()
        key = await accounts.authenticate(self._runtime.pool, api_key) if api_key else None
        if key is None:
            self._runtime.auth_throttle.failed(client)
            self._runtime.metrics.auth_failures += 1
            return await self._sign_in_form(request, "That API key is not valid.", 401)
        log.info("dashboard sign-in for account %d with a %s key", key.account_id, key.scope)
        await accounts.note_use(self._runtime.pool, key)
        token = self._sessions.issue(key.account_id, key.key_id, time.time())
        response = RedirectResponse(_local_next(form.get("next")), status_code=303)
        self._set_cookie(request, response, token, SESSION_LIFETIME_S)
        return response

    async def _sign_out(self, request: Request) -> Response:
        form = await _form(request)
        visit = await self._visit(request)
        if visit is not None and not (_same_origin(request) and self._sessions.check_csrf(
                visit.session, form.get("csrf_token", ""))):
            raise HttpError(403, "This form is missing its security token; reload the page "
                                  "and try again.")
        if visit is not None:
            await sessions.sign_out(self._runtime.pool, visit.session)
        response = RedirectResponse("/dashboard/sign-in?signed-out", status_code=303)
        self._set_cookie(request, response, "", 0)
        return response

    async def _campaigns(self, request: Request) -> Response:
        visit = await self._signed_in(request)
        rows = await campaigns.find(self._runtime.read_pool, visit.account_id)
        return self._render("campaigns.html", visit, campaigns=[
            {"id": r["id"], "name": r["name"], "created_at": r["created_at"],
             "policy": campaigns.policy_of(r)} for r in rows])

    async def _campaign(self, request: Request) -> Response:
        visit = await self._signed_in(request)
        campaign_id = _object_id(request)
        tz, zone = _zone(request)
        async with self._runtime.read_pool.acquire() as conn:
            row = await _own_campaign(conn, visit.account_id, campaign_id)
            report = await reports.campaign_report(conn, visit.account_id, campaign_id, tz)
            recent = await conn.fetch(QUERIES.campaign_messages, visit.account_id, campaign_id,
                                      None, RECENT_MESSAGES)
        policy = campaigns.policy_of(row)
        return self._render("campaign.html", visit, campaign=row, policy=policy, report=report,
                            view=campaign_view(report, policy, zone), messages=recent,
                            tz=tz, zone=zone)

    async def _messages(self, request: Request) -> Response:
        """Who opened, who clicked, who did not: the API's message list with its filters, a
        page at a time, in the order the messages were registered."""
        visit = await self._signed_in(request)
        campaign_id = _object_id(request)
        tz, zone = _zone(request)
        chosen = _chosen_filters(request, zone)
        error, rows, next_cursor = None, [], None
        async with self._runtime.read_pool.acquire() as conn:
            row = await _own_campaign(conn, visit.account_id, campaign_id)
            links = [r["url"] for r in await conn.fetch(QUERIES.report_links, visit.account_id,
                                                        campaign_id)]
            try:
                found = await message_filter(conn, visit.account_id, row, QueryParams(chosen))
                after = filters.read_cursor(request.query_params, found)
            except HttpError as exc:
                if exc.status != 422:
                    raise
                error = exc.message
            else:
                rows = await conn.fetch(QUERIES.list_messages, *found.args(
                    visit.account_id, campaign_id, after, MESSAGES_PER_PAGE + 1))
                if len(rows) > MESSAGES_PER_PAGE:
                    rows = rows[:MESSAGES_PER_PAGE]
                    next_cursor = filters.make_cursor(rows[-1]["id"], found)
        kept = {**chosen, **({"tz": tz} if tz != "UTC" else {})}
        return self._render(
            "messages.html", visit, status=422 if error else 200, campaign=row,
            messages=rows, tz=tz, zone=zone, error=error, links=links,
            shown={name: request.query_params.get(name, "") for name in FILTERS},
            statuses=STATUS_LABELS, clients=MAIL_CLIENTS, filtered=bool(chosen),
            next=f"?{urlencode({**kept, 'cursor': next_cursor})}" if next_cursor else None,
            export={fmt: f"messages/export?{urlencode({**chosen, 'format': fmt})}"
                    for fmt in export.MESSAGE_FORMATS})

    async def _export_messages(self, request: Request) -> Response:
        """The list's matching messages, every one, as CSV or JSON Lines (the API's rows)."""
        visit = await self._signed_in(request)
        campaign_id = _object_id(request)
        _, zone = _zone(request)
        fmt = export.MESSAGE_FORMATS.get(request.query_params.get("format", "csv"))
        if fmt is None:
            raise HttpError(404, "There is no such export.")
        async with self._runtime.read_pool.acquire() as conn:
            row = await _own_campaign(conn, visit.account_id, campaign_id)
            found = await message_filter(conn, visit.account_id, row,
                                         QueryParams(_chosen_filters(request, zone)))
        return await export.open_rows(
            self._runtime.read_pool, fmt, f"campaign-{campaign_id}-messages", QUERIES.list_messages,
            *found.args(visit.account_id, campaign_id, None, None))

    async def _message(self, request: Request) -> Response:
        visit = await self._signed_in(request)
        tz, zone = _zone(request)
        activity = await reports.message_activity(self._runtime.read_pool, visit.account_id,
                                                  _object_id(request))
        if activity is None:
            raise HttpError(404, "There is no such message.")
        events = [{**e, "at": datetime.fromisoformat(e["at"])} for e in activity["events"]]
        human = [e["type"] for e in events if not e["machine"]]
        return self._render("message.html", visit, message=activity, events=events,
                            sent_at=datetime.fromisoformat(activity["sent_at"]),
                            opens=human.count("open"), clicks=human.count("click"),
                            machine=len(events) - len(human), tz=tz, zone=zone)


def _secured(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


def _same_origin(request: Request) -> bool:
    """False when the browser says the POST comes from another site.

    Sec-Fetch-Site is set by every current browser and cannot be forged by a page; an
    older browser still sends Origin on a form POST. A client that sends neither is not
    a browser, so it has no ambient cookie to abuse."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (the only kind these pages send), first value per field."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            raise HttpError(413, "That form is too large.")
    if media_type != "application/x-www-form-urlencoded":
        return {}
    try:
        fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True,
                          max_num_fields=16)
    except ValueError:
        raise HttpError(400, "That form has too many fields.") from None
    return {name: values[0] for name, values in fields.items()}


def _chosen_filters(request: Request, zone: ZoneInfo) -> dict[str, str]:
    """The message list's filters the form filled in (an empty field is no filter). A time
    without a zone, as a datetime-local field sends it, is in the page's time zone."""
    chosen = {}
    for name in FILTERS:
        value = request.query_params.get(name, "").strip()
        if not value:
            continue
        if name in ("from", "to"):
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                pass  # the filter says what is wrong with it
            else:
                value = (moment if moment.tzinfo else moment.replace(tzinfo=zone)).isoformat()
        chosen[name] = value
    return chosen


def _parse_id(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > _MAX_ID:
        raise HttpError(404, "There is no such page.")
    return int(raw)


def _object_id(request: Request) -> int:
    return _parse_id(request.path_params["id"])


def _zone(request: Request) -> tuple[str, ZoneInfo]:
    tz = request.query_params.get("tz") or "UTC"
    try:
        return tz, reports.zone(tz)
    except reports.UnknownTimeZone:
        raise HttpError(400, f"Unknown time zone {tz!r}.") from None


async def _own_campaign(conn: asyncpg.Connection, account_id: int,
                        campaign_id: int) -> asyncpg.Record:
    row = await campaigns.get(conn, account_id, campaign_id)
    if row is None:  # someone else's or deleted: the same answer, so nothing is revealed
        raise HttpError(404, "There is no such campaign.")
    return row


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


def routes(runtime: Runtime) -> list[Route]:
    return Dashboard(runtime).routes()
