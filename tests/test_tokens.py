"""tracker.tokens.Signer on its own: what verifies, what does not, and what a token holds."""

from __future__ import annotations

import hashlib
import inspect
import itertools
import struct
from base64 import urlsafe_b64decode, urlsafe_b64encode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker import tokens
from tracker.tokens import (
    MAX_TOKEN_CHARS,
    MAX_URL_BYTES,
    MIN_KEY_CHARS,
    ClickToken,
    OpenToken,
    Signer,
    SigningKeyError,
)

KEY = "primary-signing-key-0123456789"
OLD_KEY = "previous-signing-key-987654321"
OTHER_KEY = "someone-elses-key-0123456789"
URL = "https://example.com/path?a=1&b=two#frag"

# The layout the module docstring promises: header byte, key id byte, three u64 ids,
# (click only) u16 position + u64 url id + the URL, then a 16-byte MAC.
_IDS = struct.Struct(">BBQQQ")
_LINK = struct.Struct(">HQ")
_MAC = 16

ids = st.integers(min_value=0, max_value=2**64 - 1)
positions = st.integers(min_value=0, max_value=65535)
# Arbitrary text, so non-ASCII, query strings, fragments and '%' all appear; bounded in bytes.
urls = st.text(max_size=300).map(lambda s: "https://example.com/" + s).filter(
    lambda u: len(u.encode()) <= MAX_URL_BYTES)


def decode(token: str) -> bytes:
    return urlsafe_b64decode(token + "=" * (-len(token) % 4))


def encode(raw: bytes) -> str:
    return urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer([KEY])


def test_open_token_round_trips(signer: Signer) -> None:
    token = signer.open_token(1, 22, 333)
    assert signer.verify_open(token) == OpenToken(1, 22, 333)


def test_click_token_round_trips(signer: Signer) -> None:
    token = signer.click_token(1, 22, 333, 4, 55, URL)
    assert signer.verify_click(token) == ClickToken(1, 22, 333, 4, 55, URL.encode())


def test_tokens_are_url_safe_without_padding(signer: Signer) -> None:
    for token in (signer.open_token(2**64 - 1, 0, 7),
                  signer.click_token(2**64 - 1, 0, 7, 65535, 2**64 - 1, URL + "é" * 50)):
        assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                 "0123456789-_")


@given(account=ids, campaign=ids, message=ids)
def test_open_round_trip_over_arbitrary_ids(account: int, campaign: int, message: int) -> None:
    signer = Signer([KEY])
    assert signer.verify_open(signer.open_token(account, campaign, message)) == (
        OpenToken(account, campaign, message))


@given(account=ids, campaign=ids, message=ids, position=positions, url_id=ids, url=urls)
@settings(max_examples=300)
def test_click_round_trip_over_arbitrary_ids_positions_and_urls(
        account: int, campaign: int, message: int, position: int, url_id: int, url: str) -> None:
    signer = Signer([KEY])
    token = signer.click_token(account, campaign, message, position, url_id, url)
    assert signer.verify_click(token) == ClickToken(account, campaign, message, position, url_id,
                                                    url.encode())


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
    verified = signer.verify_click(signer.click_token(1, 2, 3, 0, 9, destination))
    assert verified is not None
    assert verified.destination == destination.encode("utf-8")


def test_every_single_byte_flip_of_an_open_token_is_rejected(signer: Signer) -> None:
    raw = decode(signer.open_token(5, 6, 7))
    for index, mask in itertools.product(range(len(raw)), (0x01, 0x80, 0xFF)):
        flipped = bytearray(raw)
        flipped[index] ^= mask
        assert signer.verify_open(encode(bytes(flipped))) is None, (index, mask)


def test_every_single_byte_flip_of_a_click_token_is_rejected(signer: Signer) -> None:
    raw = decode(signer.click_token(5, 6, 7, 8, 9, URL))
    for index, mask in itertools.product(range(len(raw)), (0x01, 0x80, 0xFF)):
        flipped = bytearray(raw)
        flipped[index] ^= mask
        assert signer.verify_click(encode(bytes(flipped))) is None, (index, mask)


def test_every_truncation_is_rejected(signer: Signer) -> None:
    open_token = signer.open_token(5, 6, 7)
    click_token = signer.click_token(5, 6, 7, 8, 9, URL)
    for cut in range(len(open_token)):
        assert signer.verify_open(open_token[:cut]) is None, cut
    for cut in range(len(click_token)):
        assert signer.verify_click(click_token[:cut]) is None, cut
    # Dropping bytes of the decoded token (not just characters) is refused too.
    open_raw, click_raw = decode(open_token), decode(click_token)
    for cut in range(len(open_raw)):
        assert signer.verify_open(encode(open_raw[:cut])) is None, cut
    for cut in range(len(click_raw)):
        assert signer.verify_click(encode(click_raw[:cut])) is None, cut


def test_appended_bytes_are_rejected(signer: Signer) -> None:
    open_raw = decode(signer.open_token(5, 6, 7))
    click_raw = decode(signer.click_token(5, 6, 7, 8, 9, URL))
    for extra in (b"\0", b"A", b"\0" * 16):
        assert signer.verify_open(encode(open_raw + extra)) is None
        assert signer.verify_click(encode(click_raw + extra)) is None


def test_token_from_another_key_is_rejected(signer: Signer) -> None:
    foreign = Signer([OTHER_KEY])
    assert signer.verify_open(foreign.open_token(1, 2, 3)) is None
    assert signer.verify_click(foreign.click_token(1, 2, 3, 0, 4, URL)) is None


def test_token_from_another_key_with_the_same_key_id_is_rejected() -> None:
    # The key id is one byte, so unrelated keys share it 1 time in 256: the MAC must decide.
    twin = next(k for k in (f"{OTHER_KEY}-{i}" for i in itertools.count())
                if hashlib.sha256(k.encode()).digest()[0]
                == hashlib.sha256(KEY.encode()).digest()[0])
    signer = Signer([KEY])
    assert decode(Signer([twin]).open_token(1, 2, 3))[1] == decode(signer.open_token(1, 2, 3))[1]
    assert signer.verify_open(Signer([twin]).open_token(1, 2, 3)) is None
    assert signer.verify_click(Signer([twin]).click_token(1, 2, 3, 0, 4, URL)) is None


def test_keys_sharing_a_key_id_both_verify() -> None:
    twin = next(k for k in (f"{OLD_KEY}-{i}" for i in itertools.count())
                if hashlib.sha256(k.encode()).digest()[0]
                == hashlib.sha256(KEY.encode()).digest()[0])
    both = Signer([KEY, twin])
    assert both.verify_open(Signer([twin]).open_token(1, 2, 3)) == OpenToken(1, 2, 3)
    assert both.verify_open(Signer([KEY]).open_token(1, 2, 3)) == OpenToken(1, 2, 3)


def test_key_rotation_keeps_old_tokens_and_signs_with_the_new_key() -> None:
    old_signer = Signer([OLD_KEY])
    old_open = old_signer.open_token(1, 2, 3)
    old_click = old_signer.click_token(1, 2, 3, 0, 4, URL)

    rotated = Signer([KEY, OLD_KEY])
    assert rotated.verify_open(old_open) == OpenToken(1, 2, 3)
    assert rotated.verify_click(old_click) == ClickToken(1, 2, 3, 0, 4, URL.encode())

    new_open = rotated.open_token(1, 2, 3)
    new_click = rotated.click_token(1, 2, 3, 0, 4, URL)
    assert Signer([KEY]).verify_open(new_open) == OpenToken(1, 2, 3)
    assert Signer([KEY]).verify_click(new_click) is not None
    assert old_signer.verify_open(new_open) is None
    assert old_signer.verify_click(new_click) is None

    # Once the old key is removed, what it signed no longer verifies.
    retired = Signer([KEY])
    assert retired.verify_open(old_open) is None
    assert retired.verify_click(old_click) is None


def test_from_setting_reads_comma_separated_keys_first_signs() -> None:
    signer = Signer.from_setting(f" {KEY} , {OLD_KEY} ,")
    assert Signer([KEY]).verify_open(signer.open_token(1, 2, 3)) == OpenToken(1, 2, 3)
    assert signer.verify_open(Signer([OLD_KEY]).open_token(1, 2, 3)) == OpenToken(1, 2, 3)


def test_open_and_click_tokens_are_not_interchangeable(signer: Signer) -> None:
    open_token = signer.open_token(1, 2, 3)
    click_token = signer.click_token(1, 2, 3, 0, 4, URL)
    assert signer.verify_click(open_token) is None
    assert signer.verify_open(click_token) is None
    # Re-labelling the kind byte without the key does not help either.
    open_raw, click_raw = bytearray(decode(open_token)), bytearray(decode(click_token))
    open_raw[0], click_raw[0] = click_raw[0], open_raw[0]
    assert signer.verify_click(encode(bytes(open_raw))) is None
    assert signer.verify_open(encode(bytes(click_raw))) is None


def test_open_token_holds_only_the_three_ids(signer: Signer) -> None:
    raw = decode(signer.open_token(11, 22, 33))
    assert len(raw) == _IDS.size + _MAC
    _, _, account, campaign, message = _IDS.unpack_from(raw)
    assert (account, campaign, message) == (11, 22, 33)


def test_click_token_holds_only_ids_position_url_id_and_destination(signer: Signer) -> None:
    raw = decode(signer.click_token(11, 22, 33, 4, 55, URL))
    assert len(raw) == _IDS.size + _LINK.size + len(URL.encode()) + _MAC
    _, _, account, campaign, message = _IDS.unpack_from(raw)
    position, url_id = _LINK.unpack_from(raw, _IDS.size)
    assert (account, campaign, message, position, url_id) == (11, 22, 33, 4, 55)
    assert raw[_IDS.size + _LINK.size:-_MAC] == URL.encode()


def test_recipient_and_subject_are_not_inputs_of_a_token() -> None:
    # Nothing personal can get into a token if the signer never receives it.
    assert list(inspect.signature(Signer.open_token).parameters) == [
        "self", "account_id", "campaign_id", "message_id"]
    assert list(inspect.signature(Signer.click_token).parameters) == [
        "self", "account_id", "campaign_id", "message_id", "link_position", "url_id",
        "destination"]


def test_overlong_destination_is_refused_when_signing(signer: Signer) -> None:
    with pytest.raises(ValueError):
        signer.click_token(1, 2, 3, 0, 4, "https://example.com/" + "x" * MAX_URL_BYTES)
    # The bound is in bytes: 1025 two-byte characters are over it.
    with pytest.raises(ValueError):
        signer.click_token(1, 2, 3, 0, 4, "https://example.com/" + "é" * 1020)


@pytest.mark.parametrize("length", [MAX_TOKEN_CHARS + 1, 100_000, 10_000_000])
def test_overlong_tokens_are_rejected_before_decoding(
        signer: Signer, monkeypatch: pytest.MonkeyPatch, length: int) -> None:
    def no_decoding(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("an overlong token reached the base64 decoder")

    monkeypatch.setattr(tokens, "b64decode", no_decoding)
    assert signer.verify_open("A" * length) is None
    assert signer.verify_click("A" * length) is None


def test_longest_valid_click_token_is_within_the_bound(signer: Signer) -> None:
    destination = "https://example.com/" + "x" * (MAX_URL_BYTES - len("https://example.com/"))
    token = signer.click_token(2**64 - 1, 2**64 - 1, 2**64 - 1, 65535, 2**64 - 1, destination)
    assert len(token) <= MAX_TOKEN_CHARS
    assert signer.verify_click(token) is not None


@pytest.mark.parametrize("garbage", ["", "A", "AAA", "====", "not a token", "ab+/cd", "é" * 40,
                                     "\x00" * 64, "A" * 57, "_" * 200])
def test_garbage_is_rejected_without_raising(signer: Signer, garbage: str) -> None:
    assert signer.verify_open(garbage) is None
    assert signer.verify_click(garbage) is None


def test_keys_shorter_than_the_minimum_are_refused() -> None:
    with pytest.raises(SigningKeyError):
        Signer(["k" * (MIN_KEY_CHARS - 1)])
    with pytest.raises(SigningKeyError):
        Signer([KEY, "short"])
    with pytest.raises(SigningKeyError):
        Signer([])
    with pytest.raises(SigningKeyError):
        Signer.from_setting(" , ")
    assert MIN_KEY_CHARS >= 16
    Signer(["k" * MIN_KEY_CHARS])
