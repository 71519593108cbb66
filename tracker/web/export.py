"""Rows streamed as CSV or JSON Lines: constant memory whatever the size. A campaign's
events (`/api/campaigns/{id}/export`), and its messages with their counts
(`/api/campaigns/{id}/messages?format=csv`).

The rows come from a server-side cursor inside a read-only, repeatable-read
transaction (one consistent snapshot even while the writer adds events), a chunk of
`CHUNK_ROWS` at a time, each chunk encoded and sent before the next is fetched.
`open_export` opens the cursor and fetches the first chunk *before* the status line
goes out, so a database that is down is still a clean 503; after that, a failure can
only cut the body short (the connection is closed without the final empty chunk, which
an HTTP client reports as an incomplete body).

Only stored fields are exported: for events, the same ones GET /api/messages/{id} shows
plus the event and message ids, the recipient and the link position, and the address
where the policy kept one (with its prefix when truncated). There is no user-agent
column to leak.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tracker.store import results
from tracker.store.queries import QUERIES

log = logging.getLogger("tracker.web.export")

CHUNK_ROWS = 2000
COLUMNS = ("id", "type", "at", "message_id", "recipient", "url", "link_position", "machine",
           "reason", "country", "region", "city", "browser", "os", "device", "ip", "client")


@dataclass(frozen=True)
class Format:
    media_type: str
    extension: str
    header: bytes
    encode: Callable[[list[asyncpg.Record]], bytes]


def _event_values(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": str(row["id"]), "type": row["type"], "at": row["occurred_at"].isoformat(),
        "message_id": str(row["message_id"]), "recipient": row["recipient"], "url": row["url"],
        "link_position": row["link_position"], "machine": row["machine"],
        "reason": row["reason"], "country": row["country"], "region": row["region"],
        "city": row["city"], "browser": row["browser"], "os": row["os"],
        "device": row["device"], "ip": row["ip"], "client": row["client"]}


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def formats(columns: Sequence[str],
            values: Callable[[asyncpg.Record], dict[str, Any]]) -> dict[str, Format]:
    """CSV (RFC 4180, with a header) and JSON Lines of rows that `values` turns into
    `columns`."""
    def jsonl(rows: list[asyncpg.Record]) -> bytes:
        return b"".join(orjson.dumps(values(row)) + b"\n" for row in rows)

    def as_csv(rows: list[asyncpg.Record]) -> bytes:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        for row in rows:
            writer.writerow([_csv_cell(v) for v in values(row).values()])
        return out.getvalue().encode()

    return {
        "csv": Format("text/csv; charset=utf-8", "csv", (",".join(columns) + "\r\n").encode(),
                      as_csv),
        "jsonl": Format("application/jsonl", "jsonl", b"", jsonl),
    }


FORMATS = formats(COLUMNS, _event_values)
MESSAGE_FORMATS = formats(results.COLUMNS, results.message_json)


async def open_export(pool: asyncpg.Pool, account_id: int, campaign_id: int,
                      fmt: Format) -> ExportResponse:
    """A campaign's stored events."""
    return await open_rows(pool, fmt, f"campaign-{campaign_id}-events",
                           QUERIES.export_campaign_events, account_id, campaign_id)


async def open_rows(pool: asyncpg.Pool, fmt: Format, filename: str, query: str,
                    *args: Any, headers: dict[str, str] | None = None) -> ExportResponse:
    """Take a connection, open the cursor and fetch the first chunk: anything that fails
    here (the database is down) fails before a status line has gone out."""
    conn: asyncpg.Connection = await pool.acquire()
    transaction = conn.transaction(isolation="repeatable_read", readonly=True)
    try:
        await transaction.start()
        cursor = await conn.cursor(query, *args)
        first = await cursor.fetch(CHUNK_ROWS)
    except BaseException:
        await _give_back(pool, conn, transaction)
        raise
    return ExportResponse(pool, conn, transaction, cursor, first, filename, fmt, headers)


async def _give_back(pool: asyncpg.Pool, conn: asyncpg.Connection,
                     transaction: Any) -> None:
    """End the read-only transaction (closing the cursor with it), then release the
    connection. Released inside a transaction, the pool would reset the connection and
    log a warning for it, at every export."""
    try:
        await transaction.rollback()
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        pass  # never started, or the connection is broken: the pool deals with it
    finally:
        await pool.release(conn)


class ExportResponse(Response):
    """Streams the rows of an open cursor; gives the connection back however it ends
    (done, client gone, cancelled)."""

    def __init__(self, pool: asyncpg.Pool, conn: asyncpg.Connection, transaction: Any,
                 cursor: Any, first: list[asyncpg.Record], filename: str,
                 fmt: Format, headers: dict[str, str] | None = None) -> None:
        self._pool = pool
        self._conn = conn
        self._transaction = transaction
        self._cursor = cursor
        self._first = first
        self._format = fmt
        self.status_code = 200
        self.background = None
        self.init_headers({
            "content-type": fmt.media_type,
            "content-disposition": f'attachment; filename="{filename}.{fmt.extension}"',
            "cache-control": "no-store",
            **(headers or {}),
        })

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            if scope.get("method") == "HEAD":  # the headers say all a HEAD asks for
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            async for chunk in self._chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception:
            log.warning("export cut short", exc_info=True)
            raise
        finally:
            await _give_back(self._pool, self._conn, self._transaction)

    async def _chunks(self) -> AsyncIterator[bytes]:
        fmt, rows = self._format, self._first
        if fmt.header:
            yield fmt.header
        while rows:
            yield fmt.encode(rows)
            if len(rows) < CHUNK_ROWS:
                return
            rows = await self._cursor.fetch(CHUNK_ROWS)
