"""Rollups: what the writer runs, in its transaction, to keep the report tables exact.

The tables are in sql/0002_rollups.sql; store/reports.py reads nothing else. The statements
are the named blocks of sql/writer.sql. A batch arrives in the writer's staging table and
`move_staged` then runs, in the writer's transaction, one statement per step, in this order:

0. terms (`add-event-terms`), only when step 1 found a short text `event_terms` does not
   hold (it then raises, store/lanes.py adds the batch's new texts in a transaction of
   their own and writes the batch again): `events` stores their codes
   (sql/0018_event_terms.sql);
1. move (`move-staged`): the staged rows go into `events`, where a row whose id is there
   already is skipped, and the rows that statement added, and only those, go into a
   session-local delta table (signed rows, n = +1): a retried batch or a journal replay
   adds nothing. The batch's triggers (below) go into `relabel_triggers`;
2. messages (`roll-up-messages`, then `roll-up-message-links`): the per-message rollups
   (`rollup_message`, `rollup_message_link`) from the delta; each upsert returns the new
   counts, from which the statement sees whether a message just became, or just stopped
   being, opened or clicked, and notes that in a session-local marks table;
3. re-label (`relabel-near-triggers`): the same message's human clicks within the window
   around a trigger (a honeypot hit, a burst click; `relabel_windows`, from the
   classification rules' timing) become machine with its reason; each re-labelled row
   adds two rows to the delta (-1 human, +1 machine), and step 2 runs again on them;
4. campaign rollups (`roll-up-campaigns`): `rollup_campaign`, `rollup_link` and
   `rollup_dimension` from the whole delta and the marks, in one statement.

Unique counts are kept as per-message human counts (`rollup_message`,
`rollup_message_link`): a message is opened while it has a human open or click.
Re-labelling works from stored rows: a click before the trigger is found whichever
worker stored it, and so is one after it; a replay or a restart loses nothing. The
window is symmetric, and covers the signal's (a honeypot: `honeypot_seconds` before the
hit; a burst: its clicks, all within `burst_seconds`). The triggers: a hit on the
honeypot link itself, and every click labelled burst (so a burst that goes on extends
its window, as ingest/classify.py's rule does).

Nothing here reads raw events back except the re-label's look at one message's clicks
within seconds of a trigger, so retention can drop old event partitions and every total
stays. (A journal replay of events older than the retention period would count them
again: their ids are gone with the partition.)

Concurrency. Several transactions run these steps at once (the workers' writers, and
each writer's concurrent flushes), and they must neither miss a re-label nor deadlock.

- Re-labelling is exact because the `rollup_message` row of a message is the point where
  two transactions that could re-label each other's rows meet. A victim click and its
  trigger may be written at the same moment, each transaction unable to see the other's
  row; but both upsert the message's row in step 2 (a human click counts there; a
  trigger is upserted with +0 for this reason alone), so the second waits there until
  the first has committed, and its step 3, a new statement with a new snapshot, sees the
  first one's row. (Before, a per-campaign advisory lock taken at the start of the
  transaction did this, and it made every transaction of a campaign wait for the whole
  of the one before: writers could not overlap at all.)
- No deadlock: every transaction takes its row locks in the same order, table by table
  as the steps go, and in key order within a table (each statement sorts the rows it
  writes: two transactions writing the same events, a replay beside the original, would
  otherwise each wait for the other's rows). Step
  3 only re-labels messages with a click in the batch, whose `rollup_message` rows it
  already holds; and whoever holds a message's `rollup_message_link` row took the
  message's `rollup_message` row first. The campaign rollups' rows are the ones every
  transaction of a campaign shares; they come last, in one statement, so a transaction
  holds them only for that statement and its commit, and the steps before it (the bulk
  of the work) overlap freely.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import asyncpg

from tracker.ingest.rules import Timing, load_rules
from tracker.store.queries import QUERIES


def relabel_windows(timing: Timing | None = None) -> dict[str, timedelta]:
    """The clicks whose reason makes the same message's human clicks around them machine,
    and how far either side: a honeypot hit is a scanner, and so is whatever else was
    clicked in that message around it (`timing.honeypot_seconds`); so is everything in a
    burst (`timing.burst_seconds`). The packaged rules' timing unless given."""
    timing = timing or load_rules().timing
    return {"honeypot": timedelta(seconds=timing.honeypot_seconds),
            "burst": timedelta(seconds=timing.burst_seconds)}


# The honeypot link has no url row: its hits carry url id 0 (mail/registration.py). Only such a
# hit is a honeypot trigger; the clicks ingest/classify.py labels `honeypot` because they came
# soon after one are not (their window would extend the honeypot's).
HONEYPOT_URL_ID = 0


class Mover:
    """Runs the steps on a connection where sql/writer.sql's `create-writer-tables` ran,
    with the batch staged in `events_staging`."""

    def __init__(self, windows: Mapping[str, timedelta] | None = None) -> None:
        windows = relabel_windows() if windows is None else windows
        self._reasons = list(windows)
        self._spans = [windows[reason] for reason in self._reasons]

    async def add_terms(self, conn: asyncpg.Connection) -> None:
        """Add the staged batch's new short texts to event_terms, in a transaction of their
        own (committed at once, so no other writer waits on a new term for long)."""
        await conn.execute(QUERIES.add_event_terms)

    async def move_staged(self, conn: asyncpg.Connection) -> tuple[int, int]:
        """Move the staged batch into `events` and the rollups; call inside a transaction.
        Returns (rows new to the database, rows re-labelled machine)."""
        new = _rows(await conn.execute(QUERIES.move_staged, self._reasons, self._spans,
                                       HONEYPOT_URL_ID))
        if not new:
            return 0, 0
        await conn.execute(QUERIES.roll_up_messages, False)
        await conn.execute(QUERIES.roll_up_message_links, False)
        relabelled = _rows(await conn.execute(QUERIES.relabel_near_triggers)) // 2
        if relabelled:
            await conn.execute(QUERIES.roll_up_messages, True)
            await conn.execute(QUERIES.roll_up_message_links, True)
        await conn.execute(QUERIES.roll_up_campaigns)
        return new, relabelled


def _rows(status: str) -> int:
    """Rows a statement wrote, from the last number of its command tag."""
    return int(status.rsplit(" ", 1)[1])
