"""Sign and verify tracking tokens.

A token is `base64url(header | ids | [link] | mac)` with no padding:

    byte 0      format version (high nibble) and kind (low nibble: open or click)
    byte 1      key id: first byte of SHA-256 of the signing key, so keys can rotate
    8+8+8       account, campaign and message id (big-endian unsigned)
    click only: 2-byte link position, 8-byte url id, then the destination URL as UTF-8
    16          HMAC-SHA256 over everything before it, truncated to 128 bits

The click token carries its destination so the redirect needs no database read
and keeps working through an outage or on a node that has never seen the
message. Nothing personal is inside: no address, no subject, only numeric ids and
the destination the recipient is about to visit anyway.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import secrets
import struct
from base64 import b64decode, urlsafe_b64encode
from typing import NamedTuple

_VERSION = 1
_KIND_OPEN = 1
_KIND_CLICK = 2
_OPEN_HEADER = (_VERSION << 4) | _KIND_OPEN
_CLICK_HEADER = (_VERSION << 4) | _KIND_CLICK

_MAC_LEN = 16
_IDS = struct.Struct(">BBQQQ")
_LINK = struct.Struct(">HQ")
_OPEN_LEN = _IDS.size + _MAC_LEN
_CLICK_MIN_LEN = _IDS.size + _LINK.size + _MAC_LEN

# A destination is at most MAX_URL_BYTES (validated at registration); anything
# longer than its token is refused before it costs a base64 decode or a MAC.
MAX_URL_BYTES = 2048
MAX_TOKEN_CHARS = (_CLICK_MIN_LEN + MAX_URL_BYTES) * 4 // 3 + 4
MAX_LINK_POSITION = 0xFFFF
MIN_KEY_CHARS = 16


class OpenToken(NamedTuple):
    account_id: int
    campaign_id: int
    message_id: int


class ClickToken(NamedTuple):
    account_id: int
    campaign_id: int
    message_id: int
    link_position: int
    url_id: int
    destination: bytes  # UTF-8, exactly as registered: it goes into Location as is


class SigningKeyError(ValueError):
    """The signing keys are unusable (too short, empty)."""


def generate_key() -> str:
    return secrets.token_urlsafe(32)


class Signer:
    """Signs with the first key; verifies with any key whose id matches."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise SigningKeyError("at least one signing key is needed")
        for key in keys:
            if len(key) < MIN_KEY_CHARS:
                raise SigningKeyError(f"each key must be at least {MIN_KEY_CHARS} characters")
        self._by_id: dict[int, list[bytes]] = {}
        for key in keys:
            raw = key.encode()
            self._by_id.setdefault(_key_id(raw), []).append(raw)
        self._signing_key = keys[0].encode()
        self._signing_id = _key_id(self._signing_key)

    @classmethod
    def from_setting(cls, value: str) -> Signer:
        return cls([k.strip() for k in value.split(",") if k.strip()])

    def open_token(self, account_id: int, campaign_id: int, message_id: int) -> str:
        body = _IDS.pack(_OPEN_HEADER, self._signing_id, account_id, campaign_id, message_id)
        return self._seal(body)

    def click_token(self, account_id: int, campaign_id: int, message_id: int,
                    link_position: int, url_id: int, destination: str) -> str:
        url = destination.encode()
        if len(url) > MAX_URL_BYTES:
            raise ValueError(f"destination longer than {MAX_URL_BYTES} bytes")
        body = (_IDS.pack(_CLICK_HEADER, self._signing_id, account_id, campaign_id, message_id)
                + _LINK.pack(link_position, url_id) + url)
        return self._seal(body)

    def verify_open(self, token: str) -> OpenToken | None:
        raw = self._authentic(token, _OPEN_HEADER)
        if raw is None or len(raw) != _OPEN_LEN:
            return None
        _, _, account_id, campaign_id, message_id = _IDS.unpack_from(raw)
        return OpenToken(account_id, campaign_id, message_id)

    def verify_click(self, token: str) -> ClickToken | None:
        raw = self._authentic(token, _CLICK_HEADER)
        if raw is None or len(raw) < _CLICK_MIN_LEN:
            return None
        _, _, account_id, campaign_id, message_id = _IDS.unpack_from(raw)
        position, url_id = _LINK.unpack_from(raw, _IDS.size)
        destination = raw[_IDS.size + _LINK.size:-_MAC_LEN]
        return ClickToken(account_id, campaign_id, message_id, position, url_id, destination)

    def _seal(self, body: bytes) -> str:
        mac = hmac.digest(self._signing_key, body, "sha256")[:_MAC_LEN]
        return urlsafe_b64encode(body + mac).rstrip(b"=").decode("ascii")

    def _authentic(self, token: str, header: int) -> bytes | None:
        """The decoded token if its MAC is good under one of our keys, else None."""
        if len(token) > MAX_TOKEN_CHARS or len(token) < 4:
            return None
        try:
            raw = b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(raw) < _OPEN_LEN or raw[0] != header:
            return None
        body, mac = raw[:-_MAC_LEN], raw[-_MAC_LEN:]
        for key in self._by_id.get(raw[1], ()):
            if hmac.compare_digest(hmac.digest(key, body, "sha256")[:_MAC_LEN], mac):
                return raw
        return None


def _key_id(key: bytes) -> int:
    return hashlib.sha256(key).digest()[0]
