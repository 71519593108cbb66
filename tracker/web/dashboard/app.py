"""The dashboard's routes: every page, wrapped so its errors become pages and its answers
carry the security headers, and the static files."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from tracker.lifespan import Runtime
from tracker.web.dashboard.campaign_pages import CampaignPages
from tracker.web.dashboard.pages import secured
from tracker.web.dashboard.webhook_pages import WebhookPages


class Dashboard(CampaignPages, WebhookPages):
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
            Route("/dashboard/webhooks", page(self._webhooks), methods=["GET"]),
            Route("/dashboard/webhooks", page(self._add_webhook), methods=["POST"]),
            Route("/dashboard/webhooks/{id}", page(self._change_webhook), methods=["POST"]),
            Route("/dashboard/static/{path:path}", self._serve_static, methods=["GET", "HEAD"]),
        ]

    async def _root(self, request: Request) -> Response:
        return secured(RedirectResponse("/dashboard/campaigns", status_code=303))


def routes(runtime: Runtime) -> list[Route]:
    return Dashboard(runtime).routes()
