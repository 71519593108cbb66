"""tracker.tokens.Signer on its own: what verifies, what does not, and what a token holds."""

from __future__ import annotations

import hashlib
import hmac
import inspect
import itertools
from base64 import urlsafe_b64decode, urlsafe_b64encode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker.ingest.tokens import (
    FLAG_HONEYPOT,
    MAX_TOKEN_CHARS,
    MAX_URL_BYTES,
    MIN_KEY_CHARS,
    ClickToken,
    OpenToken,
    Signer,
    SigningKeyError,
)

SENT = 1_714_550_400  # 2024-05-01T08:00:00Z
KEY = "primary-signing-key-0123456789"
OLD_KEY = "previous-signing-key-987654321"
OTHER_KEY = "someone-elses-key-0123456789"
URL = "https://example.com/path?a=1&b=two#frag"
MAC_BYTES = 16  # the token ends in HMAC-SHA256 truncated to 128 bits
U64 = 2**64 - 1

ids = st.integers(min_value=0, max_value=U64)
positions = st.integers(min_value=0, max_value=65535)
times = st.integers(min_value=0, max_value=2**32 - 1)
# Arbitrary text, so non-ASCII, query strings, fragments and '%' all appear; bounded in bytes.
urls = st.text(max_size=300).map(lambda s: "https://example.com/" + s).filter(
    lambda u: len(u.encode()) <= MAX_URL_BYTES)


# The only places that know the signer's argument order.
def open_token(signer: Signer, account: int, campaign: int, message: int,
               sent_at: int = SENT) -> str:
    return signer.open_token(account, campaign, message, sent_at=sent_at)


def click_token(signer: Signer, account: int, campaign: int, message: int, position: int,
                url_id: int, url: str, sent_at: int = SENT, flags: int = 0) -> str:
    return signer.click_token(account, campaign, message, sent_at=sent_at,
                              link_position=position, url_id=url_id, destination=url,
                              flags=flags)


def opened(account: int, campaign: int, message: int, sent_at: int = SENT) -> OpenToken:
    return OpenToken(account_id=account, campaign_id=campaign, message_id=message,
                     sent_at=sent_at)


def clicked(account: int, campaign: int, message: int, position: int, url_id: int, url: str,
            sent_at: int = SENT, flags: int = 0) -> ClickToken:
    return ClickToken(account_id=account, campaign_id=campaign, message_id=message,
                      sent_at=sent_at, flags=flags, link_position=position, url_id=url_id,
                      destination=url.encode())


def decode(token: str) -> bytes:
    return urlsafe_b64decode(token + "=" * (-len(token) % 4))


def encode(raw: bytes) -> str:
    return urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer([KEY])


def test_open_token_round_trips(signer: Signer) -> None:
    assert signer.verify_open(open_token(signer, 1, 22, 333)) == opened(1, 22, 333)


def test_click_token_round_trips(signer: Signer) -> None:
    token = click_token(signer, 1, 22, 333, 4, 55, URL)
    assert signer.verify_click(token) == clicked(1, 22, 333, 4, 55, URL)


def test_honeypot_flag_round_trips(signer: Signer) -> None:
    token = click_token(signer, 1, 2, 3, 0, 4, URL, flags=FLAG_HONEYPOT)
    verified = signer.verify_click(token)
    assert verified is not None and verified.flags == FLAG_HONEYPOT


def test_sent_at_outside_32_bits_is_clamped(signer: Signer) -> None:
    assert signer.verify_open(open_token(signer, 1, 2, 3, sent_at=-5)) == opened(1, 2, 3, 0)
    assert signer.verify_open(open_token(signer, 1, 2, 3, sent_at=2**40)) == (
        opened(1, 2, 3, 2**32 - 1))


def test_tokens_are_url_safe_without_padding(signer: Signer) -> None:
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    for token in (open_token(signer, U64, 0, 7),
                  click_token(signer, U64, 0, 7, 65535, U64, URL + "é" * 50)):
        assert set(token) <= alphabet


@given(account=ids, campaign=ids, message=ids, sent_at=times)
def test_open_round_trip_over_arbitrary_ids(account: int, campaign: int, message: int,
                                            sent_at: int) -> None:
    signer = Signer([KEY])
    token = open_token(signer, account, campaign, message, sent_at)
    assert signer.verify_open(token) == opened(account, campaign, message, sent_at)


@given(account=ids, campaign=ids, message=ids, position=positions, url_id=ids, url=urls,
       sent_at=times, flags=st.integers(0, 255))
@settings(max_examples=300)
@pytest.mark.slow
def test_click_round_trip_over_arbitrary_ids_positions_and_urls(
        account: int, campaign: int, message: int, position: int, url_id: int, url: str,
        sent_at: int, flags: int) -> None:
    signer = Signer([KEY])
    token = click_token(signer, account, campaign, message, position, url_id, url, sent_at,
                        flags)
    assert signer.verify_click(token) == clicked(account, campaign, message, position, url_id,
                                                 url, sent_at, flags)


@pytest.mark.parametrize("destination", [
    "https://bücher.example/straße?q=ä€&x=%E2%9C%93#frag?not=query",
    "https://example.com/a%2Fb/../c?x=%25&y=+plus+&z=a=b=c",
    "https://example.com/?",
    "https://example.com/#",
    "HTTPS://EXAMPLE.COM/UPPER?Q=1",
    "https://例え.テスト/パス?クエリ=値#断片",
    "https://example.com/emoji/😀?e=😀",
    "https://example.com/" + "x" * (MAX_URL_BYTES - len("https://example.com/")),
])
def test_destination_round_trips_byte_for_byte(signer: Signer, destination: str) -> None:
    verified = signer.verify_click(click_token(signer, 1, 2, 3, 0, 9, destination))
    assert verified is not None
    assert verified.destination == destination.encode("utf-8")


def test_every_single_byte_flip_of_an_open_token_is_rejected(signer: Signer) -> None:
    raw = decode(open_token(signer, 5, 6, 7))
    for index, mask in itertools.product(range(len(raw)), (0x01, 0x80, 0xFF)):
        flipped = bytearray(raw)
        flipped[index] ^= mask
        assert signer.verify_open(encode(bytes(flipped))) is None, (index, mask)


def test_every_single_byte_flip_of_a_click_token_is_rejected(signer: Signer) -> None:
    raw = decode(click_token(signer, 5, 6, 7, 8, 9, URL))
    for index, mask in itertools.product(range(len(raw)), (0x01, 0x80, 0xFF)):
        flipped = bytearray(raw)
        flipped[index] ^= mask
        assert signer.verify_click(encode(bytes(flipped))) is None, (index, mask)


def test_every_truncation_is_rejected(signer: Signer) -> None:
    opens = open_token(signer, 5, 6, 7)
    clicks = click_token(signer, 5, 6, 7, 8, 9, URL)
    for cut in range(len(opens)):
        assert signer.verify_open(opens[:cut]) is None, cut
    for cut in range(len(clicks)):
        assert signer.verify_click(clicks[:cut]) is None, cut
    # Dropping bytes of the decoded token (not just characters) is refused too.
    open_raw, click_raw = decode(opens), decode(clicks)
    for cut in range(len(open_raw)):
        assert signer.verify_open(encode(open_raw[:cut])) is None, cut
    for cut in range(len(click_raw)):
        assert signer.verify_click(encode(click_raw[:cut])) is None, cut


def test_appended_bytes_are_rejected(signer: Signer) -> None:
    open_raw = decode(open_token(signer, 5, 6, 7))
    click_raw = decode(click_token(signer, 5, 6, 7, 8, 9, URL))
    for extra in (b"\0", b"A", b"\0" * 16):
        assert signer.verify_open(encode(open_raw + extra)) is None
        assert signer.verify_click(encode(click_raw + extra)) is None


def test_only_the_url_safe_alphabet_is_accepted(signer: Signer) -> None:
    # Find tokens that hold '-' and '_', then spell them the standard-base64 way.
    opens = next(t for t in (open_token(signer, i, 6, 7) for i in range(10_000))
                 if "-" in t and "_" in t)
    assert signer.verify_open(opens) is not None
    for variant in (opens.replace("-", "+"), opens.replace("_", "/"), opens + "=",
                    opens + "==", opens + "\n", " " + opens, opens[:10] + "." + opens[10:]):
        assert signer.verify_open(variant) is None, variant


def test_token_from_another_key_is_rejected(signer: Signer) -> None:
    foreign = Signer([OTHER_KEY])
    assert signer.verify_open(open_token(foreign, 1, 2, 3)) is None
    assert signer.verify_click(click_token(foreign, 1, 2, 3, 0, 4, URL)) is None


def _twin_of(key: str, base: str) -> str:
    """A different key with the same one-byte key id (1 in 256 keys has it)."""
    wanted = hashlib.sha256(key.encode()).digest()[0]
    return next(k for k in (f"{base}-{i}" for i in itertools.count())
                if hashlib.sha256(k.encode()).digest()[0] == wanted)


def test_token_from_another_key_with_the_same_key_id_is_rejected() -> None:
    # The key id is one byte, so unrelated keys share it 1 time in 256: the MAC must decide.
    twin = Signer([_twin_of(KEY, OTHER_KEY)])
    signer = Signer([KEY])
    assert decode(open_token(twin, 1, 2, 3))[1] == decode(open_token(signer, 1, 2, 3))[1]
    assert signer.verify_open(open_token(twin, 1, 2, 3)) is None
    assert signer.verify_click(click_token(twin, 1, 2, 3, 0, 4, URL)) is None


def test_keys_sharing_a_key_id_both_verify() -> None:
    twin = _twin_of(KEY, OLD_KEY)
    both = Signer([KEY, twin])
    assert both.verify_open(open_token(Signer([twin]), 1, 2, 3)) == opened(1, 2, 3)
    assert both.verify_open(open_token(Signer([KEY]), 1, 2, 3)) == opened(1, 2, 3)


def test_key_rotation_keeps_old_tokens_and_signs_with_the_new_key() -> None:
    old_signer = Signer([OLD_KEY])
    old_open = open_token(old_signer, 1, 2, 3)
    old_click = click_token(old_signer, 1, 2, 3, 0, 4, URL)

    rotated = Signer([KEY, OLD_KEY])
    assert rotated.verify_open(old_open) == opened(1, 2, 3)
    assert rotated.verify_click(old_click) == clicked(1, 2, 3, 0, 4, URL)

    new_open = open_token(rotated, 1, 2, 3)
    new_click = click_token(rotated, 1, 2, 3, 0, 4, URL)
    assert Signer([KEY]).verify_open(new_open) == opened(1, 2, 3)
    assert Signer([KEY]).verify_click(new_click) == clicked(1, 2, 3, 0, 4, URL)
    assert old_signer.verify_open(new_open) is None
    assert old_signer.verify_click(new_click) is None

    # Once the old key is removed, what it signed no longer verifies.
    retired = Signer([KEY])
    assert retired.verify_open(old_open) is None
    assert retired.verify_click(old_click) is None


def test_from_setting_reads_comma_separated_keys_first_signs() -> None:
    signer = Signer.from_setting(f" {KEY} , {OLD_KEY} ,")
    assert Signer([KEY]).verify_open(open_token(signer, 1, 2, 3)) == opened(1, 2, 3)
    assert signer.verify_open(open_token(Signer([OLD_KEY]), 1, 2, 3)) == opened(1, 2, 3)


@pytest.mark.parametrize("key", [
    "k" * MIN_KEY_CHARS, "k" * 63, "k" * 64, "k" * 65, "k" * 500, "ключ-подписи-1234",
    "tab\tand space key ",
])
def test_the_mac_is_standard_hmac_sha256_truncated_to_128_bits(key: str) -> None:
    # The signer computes HMAC itself (prepared states); it must agree with RFC 2104
    # for short keys, keys of exactly one SHA-256 block, and keys longer than a block.
    signer = Signer([key])
    for token in (open_token(signer, 1, 2, 3), click_token(signer, 1, 2, 3, 4, 5, URL)):
        raw = decode(token)
        body, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
        assert mac == hmac.digest(key.encode(), body, "sha256")[:MAC_BYTES]
        # The key id byte is the first byte of SHA-256 of the key.
        assert raw[1] == hashlib.sha256(key.encode()).digest()[0]


def test_open_and_click_tokens_are_not_interchangeable(signer: Signer) -> None:
    opens = open_token(signer, 1, 2, 3)
    clicks = click_token(signer, 1, 2, 3, 0, 4, URL)
    assert signer.verify_click(opens) is None
    assert signer.verify_open(clicks) is None
    # Re-labelling the kind byte without the key does not help either.
    open_raw, click_raw = bytearray(decode(opens)), bytearray(decode(clicks))
    open_raw[0], click_raw[0] = click_raw[0], open_raw[0]
    assert signer.verify_click(encode(bytes(open_raw))) is None
    assert signer.verify_open(encode(bytes(click_raw))) is None


def test_open_token_holds_only_fixed_size_numbers(signer: Signer) -> None:
    # Same length whatever the values, so nothing of variable length (a name, an address)
    # is inside; and the ids are there, big-endian, as documented.
    lengths = {len(decode(open_token(signer, a, c, m, t)))
               for a, c, m, t in [(0, 0, 0, 0), (U64, U64, U64, 2**32 - 1), (11, 22, 33, SENT)]}
    assert len(lengths) == 1
    raw = decode(open_token(signer, 11, 22, 33))
    assert (11).to_bytes(8) + (22).to_bytes(8) + (33).to_bytes(8) in raw
    # Header, key id, three u64 ids, sent_at (u32), a flags byte and the 8-byte recipient
    # key: no room for anything else.
    assert lengths == {1 + 1 + 3 * 8 + 4 + 1 + 8 + MAC_BYTES}


def test_click_token_holds_only_fixed_size_numbers_and_the_destination(signer: Signer) -> None:
    short = decode(click_token(signer, 11, 22, 33, 4, 55, "https://e.example/"))
    long = decode(click_token(signer, U64, U64, U64, 65535, U64, URL))
    assert len(long) - len(short) == len(URL) - len("https://e.example/")
    assert long[-MAC_BYTES - len(URL):-MAC_BYTES] == URL.encode()
    assert (11).to_bytes(8) + (22).to_bytes(8) + (33).to_bytes(8) in short


def test_recipient_and_subject_are_not_inputs_of_a_token() -> None:
    # Nothing personal can get into a token if the signer never receives it.
    for method in (Signer.open_token, Signer.click_token):
        names = set(inspect.signature(method).parameters)
        assert not names & {"recipient", "subject", "email", "address", "html", "body"}
        assert names <= {"self", "account_id", "campaign_id", "message_id", "sent_at",
                         "link_position", "url_id", "destination", "flags", "recipient_key"}


def test_overlong_destination_is_refused_when_signing(signer: Signer) -> None:
    with pytest.raises(ValueError):
        click_token(signer, 1, 2, 3, 0, 4, "https://example.com/" + "x" * MAX_URL_BYTES)
    # The bound is in bytes: 1020 two-byte characters are over it.
    with pytest.raises(ValueError):
        click_token(signer, 1, 2, 3, 0, 4, "https://example.com/" + "é" * 1020)


class _OnlyLengthAllowed(str):
    """A token whose content must not be looked at: only len() works on it."""

    def __getattribute__(self, name: str) -> object:
        raise AssertionError(f"an overlong token was read ({name})")

    def _refuse(self, *args: object) -> object:
        raise AssertionError("an overlong token was read")

    __add__ = __radd__ = __getitem__ = __iter__ = __contains__ = __mod__ = _refuse


@pytest.mark.parametrize("length", [MAX_TOKEN_CHARS + 1, 100_000, 10_000_000])
def test_overlong_tokens_are_rejected_before_decoding(signer: Signer, length: int) -> None:
    assert signer.verify_open(_OnlyLengthAllowed("A" * length)) is None
    assert signer.verify_click(_OnlyLengthAllowed("A" * length)) is None
    assert signer.verify_click("A" * length) is None


def test_longest_valid_click_token_is_within_the_bound(signer: Signer) -> None:
    destination = "https://example.com/" + "x" * (MAX_URL_BYTES - len("https://example.com/"))
    token = click_token(signer, U64, U64, U64, 65535, U64, destination, 2**32 - 1, 255)
    assert len(token) <= MAX_TOKEN_CHARS
    assert signer.verify_click(token) is not None


@pytest.mark.parametrize("garbage", ["", "A", "AAA", "====", "not a token", "ab+/cd", "é" * 40,
                                     "\x00" * 64, "A" * 57, "_" * 200, "\ud800" * 60])
def test_garbage_is_rejected_without_raising(signer: Signer, garbage: str) -> None:
    assert signer.verify_open(garbage) is None
    assert signer.verify_click(garbage) is None


def test_keys_shorter_than_the_minimum_are_refused() -> None:
    assert MIN_KEY_CHARS >= 16
    with pytest.raises(SigningKeyError):
        Signer(["k" * (MIN_KEY_CHARS - 1)])
    with pytest.raises(SigningKeyError):
        Signer([KEY, "short"])
    with pytest.raises(SigningKeyError):
        Signer([])
    with pytest.raises(SigningKeyError):
        Signer.from_setting(" , ")
    Signer(["k" * MIN_KEY_CHARS])


# --- recipient keys and version 1 tokens --------------------------------------------------

I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(key=I64, sent_at=times)
def test_recipient_key_round_trips_in_open_and_click_tokens(key: int, sent_at: int) -> None:
    signer = Signer([KEY])
    opened_token = signer.verify_open(signer.open_token(1, 2, 3, sent_at, recipient_key=key))
    assert opened_token == OpenToken(1, 2, 3, sent_at, key)
    clicked_token = signer.verify_click(signer.click_token(1, 2, 3, sent_at, 4, 5, URL,
                                                           recipient_key=key))
    assert clicked_token == ClickToken(1, 2, 3, sent_at, 0, 4, 5, URL.encode(), key)


def test_recipient_key_sits_after_the_flags_as_eight_signed_bytes(signer: Signer) -> None:
    raw = decode(signer.open_token(11, 22, 33, SENT, recipient_key=-2))
    assert raw[0] >> 4 == 2  # format version 2
    assert raw[1 + 1 + 24 + 4 + 1:][:8] == (-2).to_bytes(8, signed=True)


def _version_1(key: str, body: bytes) -> str:
    """A token as version 1 made them: no recipient key."""
    return encode(body + hmac.digest(key.encode(), body, "sha256")[:MAC_BYTES])


def _v1_ids(kind: int, account: int, campaign: int, message: int, flags: int = 0) -> bytes:
    key_id = hashlib.sha256(KEY.encode()).digest()[0]
    return (bytes([(1 << 4) | kind, key_id]) + account.to_bytes(8) + campaign.to_bytes(8)
            + message.to_bytes(8) + SENT.to_bytes(4) + bytes([flags]))


def test_version_1_tokens_in_mail_already_sent_still_verify(signer: Signer) -> None:
    # Links in mail sent before recipient keys existed keep working: key 0, "unknown".
    open_v1 = _version_1(KEY, _v1_ids(1, 5, 6, 7))
    assert signer.verify_open(open_v1) == OpenToken(5, 6, 7, SENT, 0)
    click_v1 = _version_1(KEY, _v1_ids(2, 5, 6, 7) + (8).to_bytes(2) + (9).to_bytes(8)
                          + URL.encode())
    assert signer.verify_click(click_v1) == ClickToken(5, 6, 7, SENT, 0, 8, 9, URL.encode(), 0)
    # ... and are as tamper-proof as ever.
    raw = decode(click_v1)
    for index in range(len(raw)):
        flipped = bytearray(raw)
        flipped[index] ^= 0x01
        assert signer.verify_click(encode(bytes(flipped))) is None, index
    assert signer.verify_open(click_v1) is None and signer.verify_click(open_v1) is None
    assert Signer([OTHER_KEY]).verify_open(open_v1) is None


ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _other_spellings(token: str) -> list[str]:
    """The token with each other last character; where its last character carries unused
    bits, some of these decode to the very same bytes."""
    return [token[:-1] + c for c in ALPHABET if c != token[-1]]


def test_an_open_token_verifies_in_its_one_spelling_only(signer: Signer) -> None:
    # An open token is 74 characters (2 mod 4): its last one holds 4 unused bits.
    token = open_token(signer, 5, 6, 7)
    assert len(token) % 4 == 2
    assert [t for t in _other_spellings(token) if signer.verify_open(t)] == []
    v1 = _version_1(KEY, _v1_ids(1, 5, 6, 7))
    assert [t for t in _other_spellings(v1) if signer.verify_open(t)] == []


@pytest.mark.parametrize("extra", range(3))
def test_a_click_token_verifies_in_its_one_spelling_only_whatever_its_length(
        signer: Signer, extra: int) -> None:
    token = click_token(signer, 5, 6, 7, 8, 9, URL + "x" * extra)
    assert {len(click_token(signer, 5, 6, 7, 8, 9, URL + "x" * n)) % 4 for n in range(3)} == {
        0, 2, 3}
    assert signer.verify_click(token) is not None
    assert [t for t in _other_spellings(token) if signer.verify_click(t)] == []


@pytest.mark.parametrize("extra", range(3))
def test_padding_is_refused_on_tokens_of_every_length(signer: Signer, extra: int) -> None:
    token = click_token(signer, 5, 6, 7, 8, 9, URL + "x" * extra)
    for padded in (token + "=", token + "==", token + "===", token + "===="):
        assert signer.verify_click(padded) is None, padded
