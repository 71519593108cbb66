"""The webhook pages: the account's endpoints with their delivery stats and log; adding,
enabling, disabling, deleting one and rotating its secret, each a CSRF-checked form."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tracker.store import webhooks
from tracker.store.queries import QUERIES
from tracker.web.dashboard.inputs import object_id
from tracker.web.dashboard.pages import Redirect
from tracker.web.dashboard.signing_in import SignedInPages
from tracker.web.http import HttpError


class WebhookPages(SignedInPages):
    async def _webhooks(self, request: Request, secret: tuple[str, str] | None = None,
                        error: str | None = None) -> Response:
        """The account's endpoints with their delivery stats and log; `secret`: (endpoint
        id, secret) just made, shown this once."""
        visit = await self._signed_in(request)
        pool = self._runtime.pool
        rows = await pool.fetch(QUERIES.list_webhooks, visit.account_id)
        stats = {r["id"]: r for r in await pool.fetch(QUERIES.webhook_stats, visit.account_id)}
        hooks = [{**webhooks.webhook_json(r), "stats": stats.get(r["id"]), "attempts":
                  await pool.fetch(QUERIES.webhook_attempts, visit.account_id, r["id"], 10)}
                 for r in rows]
        return self._render("webhooks.html", visit, status=422 if error else 200,
                            hooks=hooks, secret=secret, error=error)

    async def _add_webhook(self, request: Request) -> Response:
        visit, form = await self._checked_form(request)
        body: dict[str, Any] = {"url": form.get("url", ""), "machine": "humans_only" not in form,
                                "events": [t for t in webhooks.EVENT_TYPES
                                           if f"event_{t}" in form]}
        try:
            fields = webhooks.NEW.updated(body)
        except webhooks.InvalidWebhook as exc:
            return await self._webhooks(request, error=str(exc))
        row = await webhooks.create(self._runtime.pool, visit.account_id, fields)
        return await self._webhooks(request, secret=(str(row["id"]), row["secret"]))

    async def _change_webhook(self, request: Request) -> Response:
        visit, form = await self._checked_form(request)
        pool, account_id, endpoint_id = self._runtime.pool, visit.account_id, object_id(request)
        row = await webhooks.get(pool, account_id, endpoint_id)
        if row is None:
            raise HttpError(404, "There is no such webhook.")
        action = form.get("action")
        if action in ("enable", "disable"):
            fields = webhooks.fields_of(row).updated({"enabled": action == "enable"})
            await webhooks.update(pool, account_id, endpoint_id, fields)
        elif action == "delete":
            await pool.execute(QUERIES.delete_webhook, account_id, endpoint_id)
        elif action == "rotate":
            rotated = await webhooks.rotate_secret(pool, account_id, endpoint_id)
            if rotated is not None:
                return await self._webhooks(request, secret=(str(endpoint_id),
                                                             rotated["secret"]))
        else:
            raise HttpError(400, "Unknown action.")
        raise Redirect("/dashboard/webhooks")

