"""Who must not be recorded, in memory: the hot path's privacy check, no database read.

Before a hit reaches the pipeline, `SuppressionBook.screen` drops it when

- its account is deleted (`ACCOUNT_DISABLED`): the links keep redirecting;
- its recipient opted out (`OPTED_OUT`), or was erased and the hit is on a message
  of before the erasure (`ERASED`): the token's recipient key (ingest/tokens.py,
  privacy/recipients.py) is looked up in a dict;
- its recipient refused or withdrew consent to this kind of tracking, opens or clicks
  (`NO_CONSENT`; privacy/consent.py), whatever the campaign's policy requires;
- the request carries `Sec-GPC: 1` or `DNT: 1` and the account honours them, as it
  does unless it turned that off (`PRIVACY_SIGNAL`).

The book holds only exceptions: the accounts that are deleted or ignore the signals,
and the suppressed recipients. It is loaded at start, changed at once in the process
whose API made the change, read again from the rows changed since the last read by every
other worker of the server before the API answers (privacy/sync.py) and by every worker
each second (changes of other nodes), and kept as it is while the database is down. A
recipient key of 0 (a version 1 token, issued before keys existed) matches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from tracker.ingest.pipeline import DropReason
from tracker.ingest.tokens import ClickToken, OpenToken

# Every message id: an opt-out covers the recipient's future messages as well.
ALL_MESSAGES = 2**63 - 1
# Which kinds of hit a recipient refused consent to.
REFUSED_OPENS = 1
REFUSED_CLICKS = 2


@dataclass(frozen=True, slots=True)
class AccountState:
    disabled: bool
    honours_signals: bool


_DEFAULT_ACCOUNT = AccountState(disabled=False, honours_signals=True)


class SuppressionBook:
    def __init__(self) -> None:
        self._accounts: dict[int, AccountState] = {}
        # (account, recipient key) -> (highest message id not to record, why)
        self._recipients: dict[tuple[int, int], tuple[int, DropReason]] = {}
        # (account, recipient key) -> REFUSED_OPENS | REFUSED_CLICKS: only recipients who
        # refused something (a recipient who consented is known from the token's flag).
        self._refused: dict[tuple[int, int], int] = {}
        self.loaded_until: datetime | None = None

    def screen(self, token: OpenToken | ClickToken, signalled: bool) -> DropReason | None:
        """Why this hit must record nothing, or None; `signalled`: the request carries
        `Sec-GPC: 1` or `DNT: 1` (ingest/capture.py reads its headers once, for this and
        for the client). Runs on every hit: a dict lookup, and one more for each kind of
        exception the book holds."""
        account = self._accounts.get(token.account_id, _DEFAULT_ACCOUNT)
        if account.disabled:
            return DropReason.ACCOUNT_DISABLED
        if self._recipients:
            found = self._recipients.get((token.account_id, token.recipient_key))
            if found is not None and token.message_id <= found[0]:
                return found[1]
        if self._refused:
            refused = self._refused.get((token.account_id, token.recipient_key), 0)
            if refused and refused & (REFUSED_OPENS if isinstance(token, OpenToken)
                                      else REFUSED_CLICKS):
                return DropReason.NO_CONSENT
        if signalled and account.honours_signals:
            return DropReason.PRIVACY_SIGNAL
        return None

    def account(self, account_id: int) -> AccountState:
        return self._accounts.get(account_id, _DEFAULT_ACCOUNT)

    def put_account(self, account_id: int, disabled: bool, honours_signals: bool) -> None:
        state = AccountState(disabled, honours_signals)
        if state == _DEFAULT_ACCOUNT:
            self._accounts.pop(account_id, None)
        else:
            self._accounts[account_id] = state

    def put_recipient(self, account_id: int, recipient_key: int, opted_out: bool,
                      erased_through: int | None,
                      refused: tuple[bool, bool] | None = None) -> bool:
        """Record a recipient's state; True when that is an erasure the book did not know
        (an opted-out recipient's erasure changes nothing here: nothing of it is recorded
        either way). `refused`: whether consent to opens and to clicks is refused (None:
        as the book has it)."""
        key = (account_id, recipient_key)
        if refused is not None:
            mask = (REFUSED_OPENS if refused[0] else 0) | (REFUSED_CLICKS if refused[1] else 0)
            if mask:
                self._refused[key] = mask
            else:
                self._refused.pop(key, None)
        before = self._recipients.get(key)
        if opted_out:
            self._recipients[key] = (ALL_MESSAGES, DropReason.OPTED_OUT)
        elif erased_through is not None:
            self._recipients[key] = (erased_through, DropReason.ERASED)
        else:
            self._recipients.pop(key, None)
        after = self._recipients.get(key)
        return after is not None and after[1] is DropReason.ERASED and after != before

    def set_accounts(self, accounts: dict[int, AccountState]) -> None:
        """Every account that is not as the default (deleted, or ignoring the signals)."""
        self._accounts = accounts

    def __len__(self) -> int:
        return len(self._recipients) + len(self._refused)
