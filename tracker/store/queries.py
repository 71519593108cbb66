"""Every SQL statement tracker runs, from the named blocks of sql/, as listmonk keeps them.

A query file is any `sql/*.sql` but the numbered migrations (`NNNN_name.sql`, run by
store/migrations.py); sql/citus/ is for the operator, not for tracker. A block starts at a
`-- name: some-name` line and runs to the next one. `QUERIES` has one field per name (with
`_` for `-`), and loading it, when this module is first imported, checks that the files
define exactly those names, each once: a typo is a start-up error, never a runtime one.

The one thing a parameter cannot carry is an identifier: a block that works on one event
partition has a `{table}` placeholder, filled by `for_table` with the quoted name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any line that looks like it means to name a block; the name itself is checked after.
_NAME_LINE = re.compile(r"^--\s*name\s*:(.*)$", re.MULTILINE)
_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_COMMENT = re.compile(r"--[^\n]*")
_TABLE = "{table}"


class QueryFileError(RuntimeError):
    """The query files and the code disagree; the message names the file and the queries."""


@dataclass(frozen=True)
class Queries:
    # sql/queries.sql: accounts, campaigns, registration, reports, exports, the dashboard
    create_account: str
    create_campaign: str
    list_campaigns: str
    get_campaign: str
    update_campaign: str
    delete_campaign: str
    campaign_policies_since: str
    reserve_message_ids: str
    add_urls: str
    find_urls: str
    get_message: str
    message_events: str
    report_totals: str
    report_links: str
    report_timeline: str
    report_breakdown: str
    export_campaign_events: str
    campaign_messages: str
    ping: str
    advisory_lock: str
    try_advisory_lock: str
    advisory_unlock: str
    # sql/privacy.sql: the privacy lifecycle (docs/privacy.md)
    registration_context: str
    account_secret: str
    account_settings: str
    update_account_settings: str
    delete_account: str
    restore_account: str
    restore_campaign: str
    campaign_privacy: str
    account_exceptions: str
    suppressions_since: str
    opt_out: str
    opt_in: str
    mark_erased: str
    suppression_state: str
    recipient_messages: str
    erase_events: str
    erase_message_rollups: str
    erase_message_link_rollups: str
    erase_relabel_triggers: str
    destinations_like: str
    redact_destination: str
    merge_destination: str
    delete_destination: str
    count_links: str
    erase_messages: str
    keep_message_counts: str
    record_erasure: str
    mark_swept: str
    recent_erasures: str
    forget_old_erasures: str
    export_recipient_messages: str
    export_recipient_links: str
    export_recipient_events: str
    campaign_retention: str
    event_partitions: str
    partition_campaigns: str
    delete_partition_batch: str
    drop_event_partition: str
    forget_partition_relabel_triggers: str
    expired_relabel_triggers: str
    campaigns_to_purge: str
    claim_campaign_purge: str
    accounts_to_purge: str
    deleted_in_grace: str
    claim_account_purge: str
    claim_account_campaigns: str
    purge_campaign_data: str
    finish_campaign_purge: str
    purge_account_data: str
    sign_out_session: str
    forget_expired_sign_outs: str
    finish_account_purge: str
    # sql/keys.sql: named API keys with scopes, accounts listed
    create_key: str
    key_to_check: str
    note_key_use: str
    list_keys: str
    get_key: str
    revoke_key: str
    other_full_keys: str
    lock_account_keys: str
    session_key: str
    list_accounts: str
    # sql/consent.sql: consent to tracking, per recipient (privacy/consent.py)
    save_wording: str
    save_consent: str
    record_consent_history: str
    refuse_consent: str
    clear_consent_refusal: str
    consent_record: str
    consent_history: str
    consent_refusals: str
    registration_consents: str
    erase_consent: str
    account_consent_default: str
    set_account_consent_default: str
    # sql/results.sql: recipient results and reports over a selection of messages
    list_messages: str
    selection_totals: str
    selection_links: str
    selection_timeline: str
    selection_breakdown: str
    # sql/writer.sql: the batch writer's move into events and the rollups
    create_writer_tables: str
    ensure_event_partition: str
    add_event_terms: str
    move_staged: str
    roll_up_messages: str
    roll_up_message_links: str
    relabel_near_triggers: str
    roll_up_campaigns: str
    # sql/webhooks.sql: events out (webhooks, their delivery, the pull stream)
    create_webhook: str
    list_webhooks: str
    get_webhook: str
    update_webhook: str
    rotate_webhook_secret: str
    delete_webhook: str
    replay_webhook: str
    webhook_stats: str
    webhook_attempts: str
    lease_webhook_queues: str
    stream_events: str
    replay_events: str
    advance_webhook_queue: str
    fail_webhook_queue: str
    release_webhook_queue: str
    finish_webhook_replay: str
    disable_webhook: str
    record_webhook_attempt: str
    forget_old_webhook_attempts: str
    erase_event_log: str
    forget_event_log: str
    # sql/operations.sql: the read replica's lag, backup and restore
    wal_position: str
    replayed_position: str
    tables_in_database: str
    # sql/setup.sql: the migrator's bookkeeping, the embedded server's database check
    create_schema_migrations: str
    applied_migrations: str
    record_migration: str
    database_exists: str


def sql_dir() -> Path:
    """sql/ inside the installed package (wheel), else the repository's sql/ (editable)."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "sql"
    return packaged if packaged.is_dir() else package.parent / "sql"


def query_files(directory: Path) -> list[Path]:
    return [p for p in sorted(directory.glob("*.sql")) if not MIGRATION_FILE.match(p.name)]


def load(directory: Path | None = None) -> Queries:
    """The named blocks of every query file in `directory` (sql/ by default), checked
    against `Queries`; every disagreement is reported at once, each with its file."""
    directory = directory or sql_dir()
    files = query_files(directory)
    expected = {f.name for f in fields(Queries)}
    found: dict[str, str] = {}
    defined_in: dict[str, Path] = {}
    problems: list[str] = []
    for path in files:
        blocks, file_problems = _blocks(path)
        problems += file_problems
        for name, sql in blocks:
            key = name.replace("-", "_")
            if key in defined_in:
                problems.append(f"{path}: query {name!r} is also defined in "
                                f"{defined_in[key].name}")
            elif key not in expected:
                problems.append(f"{path}: unknown query {name!r} (the code has no "
                                f"QUERIES.{key})")
            else:
                defined_in[key] = path
                found[key] = sql
    missing = sorted(expected - set(found))
    if missing:
        looked = ", ".join(p.name for p in files) or "no query files"
        names = ", ".join(repr(key.replace("_", "-")) for key in missing)
        problems.append(f"{directory}: missing {names} (looked in {looked})")
    if problems:
        raise QueryFileError("\n".join(problems))
    return Queries(**found)


def _blocks(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    text = path.read_text()
    parts = _NAME_LINE.split(text)
    problems = []
    if _COMMENT.sub("", parts[0]).strip():
        problems.append(f"{path}: SQL before the first '-- name:' line")
    if len(parts) == 1:
        problems.append(f"{path}: no '-- name:' blocks (a migration must be named "
                        "NNNN_name.sql)")
    blocks = []
    for raw, sql in zip(parts[1::2], parts[2::2], strict=True):
        name = raw.strip()
        if not _NAME.match(name):
            problems.append(f"{path}: bad query name {name!r} (lower case, digits and dashes)")
        elif not _COMMENT.sub("", sql).strip():
            problems.append(f"{path}: query {name!r} is empty")
        else:
            blocks.append((name, _without_trailing_comments(sql)))
    return blocks, problems


def _without_trailing_comments(sql: str) -> str:
    """The block without the comment lines after its last statement: those introduce
    what follows in the file (a heading over the next blocks), not this query."""
    lines = sql.strip().splitlines()
    while lines and (not lines[-1].strip() or lines[-1].lstrip().startswith("--")):
        lines.pop()
    return "\n".join(lines)


def quote_identifier(name: str) -> str:
    """`name` as a PostgreSQL quoted identifier: in double quotes, its own doubled."""
    if not name or "\x00" in name:
        raise ValueError(f"not an identifier: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def for_table(block: str, table: str) -> str:
    """A block with its `{table}` placeholder filled by `table`, quoted."""
    if _TABLE not in block:
        raise ValueError("the block has no {table} placeholder")
    return block.replace(_TABLE, quote_identifier(table))


QUERIES = load()
