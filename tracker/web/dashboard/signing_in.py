"""Signing in and out, the session cookie, and the check every signed-in page makes.

The cookie holds a signed, expiring token (web/sessions.py), never the API key. Each
request looks the key up again, so revoking it ends its sessions. A POST carries the
session's CSRF token and must come from this site; the sign-in form carries a signed
form token instead, as no session exists yet.
"""

from __future__ import annotations

import logging
import re
import time
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from tracker.store import accounts
from tracker.web import sessions
from tracker.web.dashboard.inputs import read_form, same_origin
from tracker.web.dashboard.pages import Continue, Pages, Redirect, Visit
from tracker.web.http import HttpError
from tracker.web.sessions import SESSION_LIFETIME_S
from tracker.web.throttle import client_of

log = logging.getLogger("tracker.web.dashboard")

COOKIE = "tracker_session"
# Over HTTPS the __Host- prefix makes the browser refuse the cookie unless it is Secure,
# host-only and Path=/, so a sibling subdomain cannot plant or shadow it.
SECURE_COOKIE = "__Host-tracker_session"

_LOCAL_NEXT = re.compile(r"/dashboard/[A-Za-z0-9/_\-.?=&%+]*")


def _local_next(value: str | None) -> str:
    """Where to go after signing in: only a dashboard path, so it is never an open redirect."""
    if value and _LOCAL_NEXT.fullmatch(value) and "//" not in value:
        return value
    return "/dashboard/campaigns"


class SignedInPages(Pages):
    """The sign-in and sign-out pages, and what the other pages use to know who asks."""

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

    async def _visit(self, request: Request) -> Visit | None:
        token = request.cookies.get(self._cookie_name(request))
        session = self._sessions.verify(token, time.time()) if token else None
        if session is None:
            return None
        key = await sessions.session_key(self._runtime.pool, session)
        if key is None:  # the key was revoked, the account deleted, or it signed out
            return None
        return Visit(session.account_id, key.account_name, self._sessions.csrf(session),
                     session, key.key_name, key.scope)

    async def _signed_in(self, request: Request) -> Visit:
        visit = await self._visit(request)
        if visit is not None:
            return visit
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if (request.headers.get("sec-fetch-site") == "cross-site"
                and request.headers.get("sec-fetch-mode") == "navigate"):
            # A link followed from mail or chat: the browser held back the SameSite=Strict
            # cookie. Going on from our own page makes the navigation same-site, and sends it.
            raise Continue(quote(here, safe="/?=&%"))
        raise Redirect("/dashboard/sign-in?next=" + quote(here, safe="/"))

    async def _checked_form(self, request: Request) -> tuple[Visit, dict[str, str]]:
        visit = await self._signed_in(request)
        form = await read_form(request)
        if not (same_origin(request) and self._sessions.check_csrf(
                visit.session, form.get("csrf_token", ""))):
            raise HttpError(403, "This form is missing its security token; reload the page "
                                 "and try again.")
        return visit, form

    async def _sign_in_form(self, request: Request, error: str | None = None,
                            status: int = 200, headers: dict[str, str] | None = None
                            ) -> Response:
        if error is None and await self._visit(request) is not None:
            raise Redirect(_local_next(request.query_params.get("next")))
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
        form = await read_form(request)
        if not same_origin(request) or not self._sessions.check_sign_in_form(
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
        form = await read_form(request)
        visit = await self._visit(request)
        if visit is not None and not (same_origin(request) and self._sessions.check_csrf(
                visit.session, form.get("csrf_token", ""))):
            raise HttpError(403, "This form is missing its security token; reload the page "
                                  "and try again.")
        if visit is not None:
            await sessions.sign_out(self._runtime.pool, visit.session)
        response = RedirectResponse("/dashboard/sign-in?signed-out", status_code=303)
        self._set_cookie(request, response, "", 0)
        return response
