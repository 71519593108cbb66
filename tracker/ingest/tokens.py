"""Sign and verify tracking tokens.

A token is `base64url(header | ids | [link] | mac)` with no padding:

    byte 0      format version (high nibble: 2) and kind (low nibble: open or click)
    byte 1      key id: first byte of SHA-256 of the signing key, so keys can rotate
    8+8+8       account, campaign and message id (big-endian unsigned)
    4           the message's sent_at (Unix seconds): classification needs it on the hot path
    1           flags (bit 0: a honeypot link no reader can see; bit 1: the recipient had
                given consent for this kind of tracking when the message was registered)
    8           recipient key (signed): HMAC-SHA256 of the normalized address under the
                account's own random key, truncated (privacy/recipients.py); never the address
    click only: 2-byte link position, 8-byte url id, then the destination URL as UTF-8
    16          HMAC-SHA256 over everything before it, truncated to 128 bits

The click token carries its destination so the redirect needs no database read
and keeps working through an outage or on a node that has never seen the
message. The recipient key lets the hot path refuse to record hits of an opted-out
or erased recipient from memory (ingest/suppression.py). Nothing personal is inside: no
address, no subject, only numeric ids, a keyed hash that cannot be reversed without
the account's key, and the destination the recipient is about to visit anyway.

Version 1 tokens (the same without the recipient key) still verify, so links in mail
sent before version 2 keep working; their recipient key reads as 0 (unknown).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import secrets
import struct
from base64 import urlsafe_b64encode
from typing import NamedTuple

from tracker.ingest.recent import Recent

_VERSION = 2
_KIND_OPEN = 1
_KIND_CLICK = 2
_OPEN_HEADER = (_VERSION << 4) | _KIND_OPEN
_CLICK_HEADER = (_VERSION << 4) | _KIND_CLICK
_V1_OPEN_HEADER = (1 << 4) | _KIND_OPEN
_V1_CLICK_HEADER = (1 << 4) | _KIND_CLICK

_MAC_LEN = 16
_IDS = struct.Struct(">BBQQQIBq")
# _IDS without the header, key id and flags: an OpenToken's fields but its flags (last).
_OPEN_FIELDS = struct.Struct(">xxQQQIxq")
_new_tuple = tuple.__new__
_V1_IDS = struct.Struct(">BBQQQIB")
_LINK = struct.Struct(">HQ")
# _IDS and _LINK in one, without the header and key id: a ClickToken's numbers.
_CLICK_FIELDS = struct.Struct(">xxQQQIBqHQ")
_OPEN_LEN = _IDS.size + _MAC_LEN
_CLICK_MIN_LEN = _IDS.size + _LINK.size + _MAC_LEN
_V1_OPEN_LEN = _V1_IDS.size + _MAC_LEN
_V1_CLICK_MIN_LEN = _V1_IDS.size + _LINK.size + _MAC_LEN

# A destination is at most MAX_URL_BYTES (validated at registration); anything
# longer than its token is refused before it costs a base64 decode or a MAC.
MAX_URL_BYTES = 2048
MAX_TOKEN_CHARS = (_CLICK_MIN_LEN + MAX_URL_BYTES) * 4 // 3 + 4
MAX_LINK_POSITION = 0xFFFF
MIN_KEY_CHARS = 16
# Verified tokens kept per worker (each up to twice, ingest/recent.py). A token's
# authenticity depends on it and the keys alone, which are fixed for a Signer's life, so a
# kept one is the same answer; what may change (suppression, erasure, consent, policy)
# is checked per hit after it. Only tokens that verified are kept, so forged ones cannot
# fill it; click tokens longer than KEPT_CLICK_CHARS (long destinations) are verified
# each time, which bounds what it holds: ~10 MB at most, ~4 MB with common links.
_KEPT_OPENS = 16384
KEPT_CLICKS = 8192
KEPT_CLICK_CHARS = 512


FLAG_HONEYPOT = 1
# Consent for this token's kind (opens for a pixel, clicks for a link) was on record when the
# message was registered (privacy/consent.py). A campaign whose policy requires consent
# records only hits of tokens with it (ingest/pipeline.py); a consent withdrawn since is
# screened from memory (ingest/suppression.py).
FLAG_CONSENT = 2
_FLAGS_AT = _IDS.size - 8 - 1  # the flags byte's offset: before the 8-byte recipient key


class OpenToken(NamedTuple):
    account_id: int
    campaign_id: int
    message_id: int
    sent_at: int
    recipient_key: int = 0  # 0: unknown (a version 1 token)
    flags: int = 0


class ClickToken(NamedTuple):
    account_id: int
    campaign_id: int
    message_id: int
    sent_at: int
    flags: int
    link_position: int
    url_id: int
    destination: bytes  # UTF-8, exactly as registered: it goes into Location as is
    recipient_key: int = 0  # 0: unknown (a version 1 token)


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
        self._by_id: dict[int, list[_HmacSha256]] = {}
        for key in keys:
            raw = key.encode()
            self._by_id.setdefault(_key_id(raw), []).append(_HmacSha256(raw))
        self._signing_key = _HmacSha256(keys[0].encode())
        self._signing_id = _key_id(keys[0].encode())
        self._opens: Recent[str, OpenToken] = Recent(_KEPT_OPENS)
        self._clicks: Recent[str, ClickToken] = Recent(KEPT_CLICKS)

    @classmethod
    def from_setting(cls, value: str) -> Signer:
        return cls([k.strip() for k in value.split(",") if k.strip()])

    def open_token(self, account_id: int, campaign_id: int, message_id: int,
                   sent_at: int, recipient_key: int = 0, flags: int = 0) -> str:
        body = _IDS.pack(_OPEN_HEADER, self._signing_id, account_id, campaign_id, message_id,
                         _clamp_time(sent_at), flags, recipient_key)
        return self._seal(body)

    def click_token(self, account_id: int, campaign_id: int, message_id: int, sent_at: int,
                    link_position: int, url_id: int, destination: str, flags: int = 0,
                    recipient_key: int = 0) -> str:
        url = destination.encode()
        if len(url) > MAX_URL_BYTES:
            raise ValueError(f"destination longer than {MAX_URL_BYTES} bytes")
        body = (_IDS.pack(_CLICK_HEADER, self._signing_id, account_id, campaign_id, message_id,
                          _clamp_time(sent_at), flags, recipient_key)
                + _LINK.pack(link_position, url_id) + url)
        return self._seal(body)

    def verify_open(self, token: str) -> OpenToken | None:
        """The open token's fields if it is authentic, else None; a pixel hit verifies one,
        and a message's pixel is fetched several times (a proxy, a prefetch, each reading):
        what verified lately is kept (_KEPT_OPENS)."""
        known = self._opens.get(token)
        if known is None:
            known = self._verify_open(token)
            if known is not None:
                self._opens.put(token, known)
        return known

    def verify_click(self, token: str, keep: bool = True) -> ClickToken | None:
        """The click token's fields if it is authentic, else None; kept as verify_open's,
        unless the caller keeps what it needs itself (`keep=False`: the redirect's answers,
        ingest/endpoints.py)."""
        if not keep:
            return self._verify_click(token)
        known = self._clicks.get(token)
        if known is None:
            known = self._verify_click(token)
            if known is not None and len(token) <= KEPT_CLICK_CHARS:
                self._clicks.put(token, known)
        return known

    def _verify_open(self, token: str) -> OpenToken | None:
        raw = self._authentic(token, _OPEN_HEADER, _V1_OPEN_HEADER)
        if raw is None:
            return None
        if raw[0] == _OPEN_HEADER:
            if len(raw) != _OPEN_LEN:
                return None
            # Straight into the tuple (no per-field names, no NamedTuple.__new__): every
            # pixel hit verifies one. The flags byte comes last in the tuple, first in the token.
            return _new_tuple(OpenToken, (*_OPEN_FIELDS.unpack_from(raw), raw[_FLAGS_AT]))
        if len(raw) != _V1_OPEN_LEN:
            return None
        _, _, account_id, campaign_id, message_id, sent_at, _ = _V1_IDS.unpack_from(raw)
        return OpenToken(account_id, campaign_id, message_id, sent_at)

    def _verify_click(self, token: str) -> ClickToken | None:
        raw = self._authentic(token, _CLICK_HEADER, _V1_CLICK_HEADER)
        if raw is None:
            return None
        if raw[0] == _CLICK_HEADER:
            if len(raw) < _CLICK_MIN_LEN:
                return None
            # One unpack, straight into the tuple (as verify_open): every redirect verifies.
            account_id, campaign_id, message_id, sent_at, flags, key, position, url_id = (
                _CLICK_FIELDS.unpack_from(raw))
            return _new_tuple(ClickToken, (
                account_id, campaign_id, message_id, sent_at, flags, position, url_id,
                raw[_CLICK_FIELDS.size:-_MAC_LEN], key))
        if len(raw) < _V1_CLICK_MIN_LEN:
            return None
        _, _, account_id, campaign_id, message_id, sent_at, flags = _V1_IDS.unpack_from(raw)
        position, url_id = _LINK.unpack_from(raw, _V1_IDS.size)
        return ClickToken(account_id, campaign_id, message_id, sent_at, flags, position, url_id,
                          raw[_V1_IDS.size + _LINK.size:-_MAC_LEN])

    def _seal(self, body: bytes) -> str:
        mac = self._signing_key.digest(body)[:_MAC_LEN]
        return urlsafe_b64encode(body + mac).rstrip(b"=").decode("ascii")

    def _authentic(self, token: str, header: int, legacy_header: int) -> bytes | None:
        """The decoded token if it is in the one encoding we write and its MAC is good under
        one of our keys, else None."""
        if len(token) > MAX_TOKEN_CHARS or len(token) < 4:
            return None
        ends = _CANONICAL_ENDS[len(token) & 3]
        if ends is not None and token[-1] not in ends:
            return None
        try:
            raw = binascii.a2b_base64(
                token.encode("ascii").translate(_URLSAFE) + b"=" * (-len(token) % 4),
                strict_mode=True)
        except (binascii.Error, ValueError):  # ValueError: not ASCII
            return None
        if len(raw) < _V1_OPEN_LEN or (raw[0] != header and raw[0] != legacy_header):
            return None
        body, mac = raw[:-_MAC_LEN], raw[-_MAC_LEN:]
        for key in self._by_id.get(raw[1], ()):
            if hmac.compare_digest(key.digest(body)[:_MAC_LEN], mac):
                return raw
        return None


class _HmacSha256:
    """HMAC-SHA256 (RFC 2104) with the padded key's hash states computed once.

    hmac.digest() sets up OpenSSL's HMAC context on every call; copying two prepared
    SHA-256 states costs less than half of that, and the redirect path verifies on
    every hit.
    Tested against hmac.digest() for short, block-sized and long keys."""

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:  # the SHA-256 block size
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


# base64url -> standard alphabet; "+" and "/" are mapped away so they stay invalid, and so
# is "=": a token has no padding.
_URLSAFE = bytes.maketrans(b"-_+/=", b"+/!!!")
# The characters a token may end with, by its length mod 4. Unpadded, the last character
# of a token of length 2 (mod 4) holds 2 bits of the last byte and 4 unused bits, of one
# of length 3 (mod 4) 4 bits and 2 unused ones; the decoder ignores those, so unless they
# must be zero, 16 or 4 spellings of one token verify. (1 (mod 4) never decodes.)
_CANONICAL_ENDS: tuple[str | None, ...] = (None, "", "AQgw", "AEIMQUYcgkosw048")


def _clamp_time(seconds: int) -> int:
    return min(max(seconds, 0), 0xFFFFFFFF)


def _key_id(key: bytes) -> int:
    return hashlib.sha256(key).digest()[0]
