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

app.py assembles the routes; pages.py is what every page shares (templates, error pages,
static files, security headers); inputs.py checks what a request brings; signing_in.py
is the session cookie, sign-in and sign-out; campaign_pages.py and webhook_pages.py are
the pages themselves. Templates and static files live in tracker/web/.
"""

from tracker.web.dashboard.app import Dashboard, routes
from tracker.web.dashboard.campaign_pages import (
    FILTERS,
    MAIL_CLIENTS,
    MESSAGES_PER_PAGE,
    RECENT_MESSAGES,
    STATUS_LABELS,
)
from tracker.web.dashboard.pages import CSP, SECURITY_HEADERS
from tracker.web.dashboard.signing_in import COOKIE, SECURE_COOKIE

__all__ = [
    "COOKIE", "CSP", "FILTERS", "MAIL_CLIENTS", "MESSAGES_PER_PAGE", "RECENT_MESSAGES",
    "SECURE_COOKIE", "SECURITY_HEADERS", "STATUS_LABELS", "Dashboard", "routes",
]
