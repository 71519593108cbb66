"""Dashboard sessions: signed, expiring tokens for the session cookie, CSRF and sign-in forms.

A session token is `base64url(version | account id | expiry | 16-byte nonce | key id | mac)`:
it names the API key it was made from (by its id, never its secret), so the dashboard can
end every session of a revoked key. Signing out ends the session on the server too: its
nonce is kept in `dashboard_signed_out` until the token would have expired, and a session
holds only while its key is live and its nonce is not there (`session_key`, one query per
page, the one that checks the key). Every worker and node reads the same table, so a
cookie copied before signing out gets nowhere afterwards, whichever one it reaches.

The MAC is a full HMAC-SHA256 under a key derived from TRACKER_SECRET_KEY for this
purpose alone, so no session token can pass for a tracking token or the other way round.
The CSRF token is an HMAC of the session's nonce: nothing to store, and it changes with
every sign-in.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import struct
from base64 import urlsafe_b64decode, urlsafe_b64encode
from dataclasses import dataclass

import asyncpg

from tracker.store.queries import QUERIES

log = logging.getLogger("tracker.web.sessions")

SESSION_LIFETIME_S = 12 * 3600
_SIGN_IN_FORM_LIFETIME_S = 3600


@dataclass(frozen=True)
class Session:
    account_id: int
    key_id: str
    expires_at: int
    nonce: bytes


_SESSION = struct.Struct(">BQI16sB")  # version, account, expiry, nonce, key id length
_SESSION_VERSION = 1
_MAC_LEN = 32


def _b64(raw: bytes) -> str:
    return urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes | None:
    if not text.isascii() or len(text) > 512:
        return None
    try:
        return urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        return None


class SessionKeys:
    """Signs session, CSRF and sign-in form tokens with keys derived from TRACKER_SECRET_KEY.

    The first secret signs, all verify, so rotating TRACKER_SECRET_KEY the documented
    way keeps people signed in. Without a secret (an app built by hand) the key is
    random and in memory: sessions then end with the process and hold in one worker only.
    """

    def __init__(self, secret_key: str | None) -> None:
        secrets_ = [k.strip() for k in (secret_key or "").split(",") if k.strip()]
        if not secrets_:
            log.warning("no TRACKER_SECRET_KEY: dashboard sessions use a random in-memory key")
            secrets_ = [secrets.token_urlsafe(32)]
        # A key of its own, so no dashboard token can ever pass for a tracking token.
        self._keys = [hmac.digest(s.encode(), b"tracker dashboard sessions v1", "sha256")
                      for s in secrets_]

    def _mac(self, key: bytes, purpose: bytes, body: bytes) -> bytes:
        return hmac.digest(key, purpose + b"\0" + body, "sha256")

    def _seal(self, purpose: bytes, body: bytes) -> str:
        return _b64(body + self._mac(self._keys[0], purpose, body))

    def _open(self, purpose: bytes, token: str) -> bytes | None:
        raw = _unb64(token)
        if raw is None or len(raw) <= _MAC_LEN:
            return None
        body, mac = raw[:-_MAC_LEN], raw[-_MAC_LEN:]
        if any(hmac.compare_digest(self._mac(k, purpose, body), mac) for k in self._keys):
            return body
        return None

    def issue(self, account_id: int, key_id: str, now: float) -> str:
        key = key_id.encode()
        body = _SESSION.pack(_SESSION_VERSION, account_id, int(now) + SESSION_LIFETIME_S,
                             secrets.token_bytes(16), len(key)) + key
        return self._seal(b"session", body)

    def verify(self, token: str, now: float) -> Session | None:
        body = self._open(b"session", token)
        if body is None or len(body) < _SESSION.size:
            return None
        version, account_id, expires_at, nonce, key_len = _SESSION.unpack_from(body)
        key = body[_SESSION.size:]
        if version != _SESSION_VERSION or len(key) != key_len or expires_at <= now:
            return None
        return Session(account_id, key.decode("ascii", "replace"), expires_at, nonce)

    def csrf(self, session: Session) -> str:
        return _b64(self._mac(self._keys[0], b"csrf", session.nonce))

    def check_csrf(self, session: Session, token: str) -> bool:
        raw = _unb64(token)
        return raw is not None and any(
            hmac.compare_digest(self._mac(k, b"csrf", session.nonce), raw) for k in self._keys)

    def sign_in_form(self, now: float) -> str:
        return self._seal(b"sign-in", struct.pack(">I16s", int(now), secrets.token_bytes(16)))

    def check_sign_in_form(self, token: str, now: float) -> bool:
        body = self._open(b"sign-in", token)
        if body is None or len(body) != 20:
            return False
        issued: int = struct.unpack_from(">I", body)[0]
        return 0 <= now - issued <= _SIGN_IN_FORM_LIFETIME_S


@dataclass(frozen=True)
class SessionKey:
    """What a page shows of the session: the account, and the key it signed in with."""
    account_name: str
    key_name: str
    scope: str


async def session_key(conn: asyncpg.Connection | asyncpg.Pool,
                      session: Session) -> SessionKey | None:
    """The session's account and key while the session holds (None: its key was revoked or
    rotated, its account deleted, or it was signed out)."""
    row = await conn.fetchrow(QUERIES.session_key, session.account_id, session.key_id,
                              session.nonce)
    return SessionKey(row["account_name"], row["key_name"], row["scope"]) if row else None


async def sign_out(conn: asyncpg.Connection | asyncpg.Pool, session: Session) -> None:
    """End the session for good, in every worker: the token no longer opens a page."""
    await conn.execute(QUERIES.sign_out_session, session.account_id, session.nonce,
                       session.expires_at)
