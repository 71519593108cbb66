"""Reader or machine, and which rule said so: real-world user agents, Apple MPP, timing,
bursts, the honeypot link, user rules files, `tracker classify`, and the verdicts a real
server stores in PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from crawlerdetect import CrawlerDetect

from tests.geodb import build_test_city_db
from tracker import cli
from tracker.ingest.classify import REASONS, Classifier
from tracker.ingest.geo import Location
from tracker.ingest.pipeline import DropReason, Pipeline
from tracker.ingest.policy import DEFAULT, PolicyBook
from tracker.ingest.rules import PACKAGED, RulesError, load_rules
from tracker.ingest.tokens import FLAG_HONEYPOT, ClickToken, OpenToken, Signer
from tracker.ingest.useragent import parse_agent
from tracker.settings import SettingsError
from tracker.settings import load as load_settings

from .support import SECRET, Server, campaign, db_fetch, new_account, register, wait_for

APPLE_MAIL = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
              "(KHTML, like Gecko)")
IOS_MAIL = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15 "
            "(KHTML, like Gecko) Mobile/15E148")
IPAD_MAIL = ("Mozilla/5.0 (iPad; CPU OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15 "
             "(KHTML, like Gecko) Mobile/15E148")
GMAIL_PROXY = ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
               "(via ggpht.com GoogleImageProxy)")
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
OUTLOOK = "Microsoft Outlook 16.0.17531; Pro"
OUTLOOK_MSOFFICE = "Mozilla/4.0 (compatible; ms-office; MSOffice 16)"
OFFICE_FETCH = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17531; Pro)"
MAC_OUTLOOK = "MacOutlook/16.84.0.240414 (Intelx64 Mac OS X 14.4.1 (Build 23E224))"
THUNDERBIRD = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:115.0) Gecko/20100101 "
               "Thunderbird/115.10.1")
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/124.0.0.0 Safari/537.36")
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0"
SAFARI = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
          "(KHTML, like Gecko) Version/17.4.1 Safari/605.1.15")
CHROME_ANDROID = ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 "
                  "(KHTML, like Gecko) Chrome/124.0.6367.82 Mobile Safari/537.36")
SAFARI_IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15 "
                 "(KHTML, like Gecko) Version/17.4.1 Mobile/15E148 Safari/604.1")
FIREFOX_ANDROID = "Mozilla/5.0 (Android 14; Mobile; rv:125.0) Gecko/125.0 Firefox/125.0"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
CURL = "curl/8.5.0"
PYTHON_REQUESTS = "python-requests/2.31.0"
MICROSOFT_PREVIEW = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
                     "(KHTML, like Gecko) Chrome/122.0.0.0 Safari/537.36 Edg/122.0.0.0 "
                     "MicrosoftPreview/2.0 +https://aka.ms/MicrosoftPreview")
OFFICE_DISCOVERY = "Microsoft Office Existence Discovery"
MIMECAST = "Mozilla/5.0 (compatible; Mimecast URL Protect)"
PROOFPOINT = "Mozilla/5.0 (compatible; Proofpoint URL Defense)"
BARRACUDA = "Barracuda Sentinel (EE)"
# Only crawlerdetect knows this one: not in the rules, not a bot to ua-parser.
DATAPROVIDER = "Mozilla/5.0 (compatible; Dataprovider.com)"

FRANKFURT = "81.2.69.142"  # in the test geo database: DE, Hesse
APPLE_PROXY = "17.58.101.9"
APPLE_PROXY_V6 = "2620:149:a0c:f000::11"
NOW_US = 1_763_800_000 * 1_000_000
HOUR_AGO = NOW_US // 1_000_000 - 3600
SECOND = 1_000_000

# (user agent, verdict of an open, verdict of a click); a verdict is (machine, reason).
READER = (False, None)
REAL_WORLD = {
    "apple_mail_macos": (APPLE_MAIL, READER, READER),
    "ios_mail": (IOS_MAIL, READER, READER),
    "ipados_mail": (IPAD_MAIL, READER, READER),
    "gmail_image_proxy": (GMAIL_PROXY, (False, "image_proxy"), (False, "image_proxy")),
    "yahoo_mail_proxy": (YAHOO_PROXY, (False, "image_proxy"), (False, "image_proxy")),
    "outlook_desktop": (OUTLOOK, READER, READER),
    "outlook_desktop_ms_office": (OUTLOOK_MSOFFICE, READER, READER),
    "outlook_office_fetcher": (OFFICE_FETCH, READER, (True, "scanner_ua")),
    "outlook_mac": (MAC_OUTLOOK, READER, READER),
    "thunderbird": (THUNDERBIRD, READER, READER),
    "chrome_desktop": (CHROME, READER, READER),
    "firefox_desktop": (FIREFOX, READER, READER),
    "safari_desktop": (SAFARI, READER, READER),
    "chrome_android": (CHROME_ANDROID, READER, READER),
    "safari_iphone": (SAFARI_IPHONE, READER, READER),
    "firefox_android": (FIREFOX_ANDROID, READER, READER),
    "googlebot": (GOOGLEBOT, (True, "bot_ua"), (True, "bot_ua")),
    "curl": (CURL, (True, "bot_ua"), (True, "bot_ua")),
    "python_requests": (PYTHON_REQUESTS, (True, "bot_ua"), (True, "bot_ua")),
    "crawlerdetect_only": (DATAPROVIDER, (True, "bot_ua"), (True, "bot_ua")),
    "microsoft_preview": (MICROSOFT_PREVIEW, (True, "scanner_ua"), (True, "scanner_ua")),
    "office_existence_discovery": (OFFICE_DISCOVERY, (True, "scanner_ua"), (True, "scanner_ua")),
    "mimecast": (MIMECAST, (True, "scanner_ua"), (True, "scanner_ua")),
    "proofpoint": (PROOFPOINT, (True, "scanner_ua"), (True, "scanner_ua")),
    "barracuda": (BARRACUDA, (True, "scanner_ua"), (True, "scanner_ua")),
    "no_user_agent": ("", (True, "empty_ua"), (True, "empty_ua")),
}


@pytest.fixture(autouse=True)
def _no_tracker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets reaches settings and commands."""
    for name in list(os.environ):
        if name.startswith("TRACKER_"):
            monkeypatch.delenv(name)


def pipeline(classifier: Classifier | None = None) -> Pipeline:
    book = PolicyBook()
    book.put(1, 1, DEFAULT, recording=True)
    book.put(2, 1, DEFAULT, recording=True)
    here = Location("DE", "Hesse", None)
    return Pipeline(book, parse_agent, lambda ip: here if ip == FRANKFURT else None, classifier)


def opened(message: int = 1, sent_at: int = HOUR_AGO) -> OpenToken:
    return OpenToken(1, 1, message, sent_at)


def link(position: int = 0, message: int = 1, sent_at: int = HOUR_AGO, flags: int = 0,
         account: int = 1) -> ClickToken:
    return ClickToken(account, 1, message, sent_at, flags, position, 100 + position,
                      b"https://example.com/")


def stored(outcome: Any) -> dict[str, str | None]:
    """The fields of the COPY line a hit became."""
    assert not isinstance(outcome, DropReason), outcome
    line, _, machine, message_id = outcome
    values = line.rstrip("\n").split("\t")
    assert int(values[4]) == message_id
    fields = {name: None if value == "\\N" else value for name, value in zip(
        ("machine", "reason", "country", "region", "city", "browser", "os", "device", "client"),
        values[8:17], strict=True)}
    assert (fields["machine"] == "t") is machine
    return fields


def verdict(outcome: Any) -> tuple[bool, str | None]:
    fields = stored(outcome)
    return fields["machine"] == "t", fields["reason"]


def open_(p: Pipeline, agent: str, ip: str | None = FRANKFURT, at_us: int = NOW_US,
          token: OpenToken | None = None) -> tuple[bool, str | None]:
    return verdict(p.open(token or opened(), "GET", agent, ip, at_us))


def click(p: Pipeline, agent: str = CHROME, at_us: int = NOW_US, token: ClickToken | None = None,
          method: str = "GET") -> tuple[bool, str | None]:
    return verdict(p.click(token or link(), method, agent, FRANKFURT, at_us))


def write_rules(tmp_path: Path, text: str, name: str = "rules.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- user agents ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(REAL_WORLD))
def test_real_world_user_agent_gets_its_verdict_for_opens_and_clicks(name: str) -> None:
    agent, on_open, on_click = REAL_WORLD[name]
    p = pipeline()
    assert open_(p, agent) == on_open
    assert click(p, agent) == on_click


def test_crawlerdetect_flags_proxies_and_outlook_so_the_allow_list_must_come_first() -> None:
    detector = CrawlerDetect()
    for agent in (GMAIL_PROXY, YAHOO_PROXY, OUTLOOK, MAC_OUTLOOK):
        assert detector.is_crawler(agent), agent
    p = pipeline()
    assert open_(p, OUTLOOK) == READER
    assert open_(p, GMAIL_PROXY) == (False, "image_proxy")


def test_image_proxy_open_is_human_with_no_location() -> None:
    p = pipeline()
    proxied = stored(p.open(opened(), "GET", GMAIL_PROXY, FRANKFURT, NOW_US))
    direct = stored(p.open(opened(), "GET", CHROME, FRANKFURT, NOW_US))
    assert (proxied["machine"], proxied["country"], proxied["region"]) == ("f", None, None)
    assert (direct["country"], direct["region"]) == ("DE", "Hesse")


def test_crawlerdetect_runs_once_per_distinct_user_agent() -> None:
    classifier = Classifier(load_rules())
    detector = classifier._crawlers
    assert detector is not None
    calls: list[str] = []
    real = detector.is_crawler

    def counted(agent: str | None = None) -> bool:
        calls.append(agent or "")
        return bool(real(agent))

    detector.is_crawler = counted
    p = pipeline(classifier)
    for _ in range(3):
        for agent in (CHROME, DATAPROVIDER, FIREFOX):
            open_(p, agent)
            click(p, agent)
    # A second pipeline on the same classifier (another policy cache) asks nobody again.
    open_(pipeline(classifier), CHROME)
    assert sorted(calls) == sorted([CHROME, DATAPROVIDER, FIREFOX])


def test_every_reason_is_a_short_stable_slug() -> None:
    assert set(REASONS) == {"image_proxy", "head", "honeypot", "apple_mpp", "too_soon", "burst",
                            "scanner_ua", "bot_ua", "empty_ua", "scanner_network"}
    for _, on_open, on_click in REAL_WORLD.values():
        assert on_open[1] in (*REASONS, None) and on_click[1] in (*REASONS, None)


# --- Apple Mail Privacy Protection ------------------------------------------------------


@pytest.mark.parametrize("agent", [APPLE_MAIL, IOS_MAIL, IPAD_MAIL])
@pytest.mark.parametrize("address", [APPLE_PROXY, APPLE_PROXY_V6, "::ffff:17.58.101.9",
                                     "172.225.10.20", "104.28.40.1"])
def test_apple_mail_agent_from_an_apple_proxy_address_is_apple_mpp(
        agent: str, address: str) -> None:
    assert open_(pipeline(), agent, ip=address) == (True, "apple_mpp")


def test_apple_mail_agent_soon_after_sending_is_apple_mpp_from_any_address() -> None:
    p = pipeline()
    sent = NOW_US // SECOND
    assert open_(p, APPLE_MAIL, token=opened(sent_at=sent), at_us=NOW_US + 59 * SECOND) == (
        True, "apple_mpp")
    assert open_(p, APPLE_MAIL, ip=None, token=opened(sent_at=sent), at_us=NOW_US) == (
        True, "apple_mpp")
    assert open_(p, APPLE_MAIL, token=opened(sent_at=sent), at_us=NOW_US + 61 * SECOND) == READER


def test_apple_mpp_needs_apple_mails_own_agent_and_an_open() -> None:
    p = pipeline()
    assert open_(p, SAFARI, ip=APPLE_PROXY) == READER  # a browser token: not Mail's prefetch
    assert open_(p, SAFARI_IPHONE, ip=APPLE_PROXY) == READER
    assert open_(p, CHROME, ip=APPLE_PROXY) == READER
    assert open_(p, APPLE_MAIL, ip=FRANKFURT) == READER  # Mail without MPP, an hour later
    assert click(p, APPLE_MAIL) == READER


def test_packaged_ranges_contain_apples_network_and_nothing_private() -> None:
    classifier = Classifier(load_rules())
    for inside in (APPLE_PROXY, "17.0.0.0", "17.255.255.255", APPLE_PROXY_V6):
        assert classifier.is_apple_proxy(inside), inside
    for outside in ("16.255.255.255", "18.0.0.0", "10.0.0.1", "127.0.0.1", "192.168.1.1",
                    FRANKFURT, "::1", "2001:db8::1", "not an address"):
        assert not classifier.is_apple_proxy(outside), outside


# --- real third-party traffic ------------------------------------------------------------

BARE_MOZILLA = "Mozilla/5.0"  # MPP's prefetch (uap-core issue 509)
MICROSOFT_EOP = "40.107.22.9"  # Exchange Online Protection, in the packaged microsoft list


def test_the_bare_mozilla_agent_is_mpps_prefetch_from_any_address() -> None:
    p = pipeline()
    for address in (FRANKFURT, APPLE_PROXY, "203.0.113.9", None):
        assert open_(p, BARE_MOZILLA, ip=address) == (True, "apple_mpp"), address
    assert click(p, BARE_MOZILLA) == (True, "empty_ua")  # no browser clicks with it
    assert stored(p.open(opened(), "GET", BARE_MOZILLA, FRANKFURT, NOW_US))["client"] == (
        "Apple Mail")


@pytest.mark.parametrize("agent", [
    "Mozilla/5.0 (Windows NT 10.0; rv:115.0) Gecko/20100101 Thunderbird/115.0 WebCrawler/1.0",
    "Google-Safety", "Viber", "Amazon CloudFront", "l9explore/1.2.2",
    "Mozilla/5.0 (Exchange check)", "Mozilla/5.0 (compatible; Detectify)",
    "ExampleFetcher/2.0 (+https://fetcher.example/about)", "feedbot ops@fetcher.example",
    "Mozilla/4.0", "-",
])
def test_self_declared_and_near_empty_agents_are_machines_whatever_client_they_name(
        agent: str) -> None:
    p = pipeline()
    assert open_(p, agent)[0] is True and click(p, agent)[0] is True
    line = stored(p.open(opened(), "GET", agent, FRANKFURT, NOW_US))
    assert line["client"] is None  # a bot naming a mail client is not that client


@pytest.mark.parametrize(("agent", "client"), [
    ("Outlook-Express/7.0 (MSIE 7.0; Windows NT 6.1; WOW64; Trident/7.0; TmstmpExt)", "other"),
    (OUTLOOK, "Outlook"), (MAC_OUTLOOK, "Outlook"), (THUNDERBIRD, "Thunderbird"),
    (APPLE_MAIL, "Apple Mail"), (IOS_MAIL, "Apple Mail"), (CHROME, "webmail"),
    (GMAIL_PROXY, "Gmail"), (YAHOO_PROXY, "Yahoo Mail"),
])
def test_mail_clients_are_readers_and_name_their_client(agent: str, client: str) -> None:
    p = pipeline()
    assert open_(p, agent)[0] is False
    assert stored(p.open(opened(), "GET", agent, FRANKFURT, NOW_US))["client"] == client


def test_an_image_proxy_lends_the_reader_no_device() -> None:
    p = pipeline()
    for agent, client in ((GMAIL_PROXY, "Gmail"), (YAHOO_PROXY, "Yahoo Mail")):
        line = stored(p.open(opened(), "GET", agent, FRANKFURT, NOW_US))
        assert (line["browser"], line["os"], line["device"], line["client"]) == (
            None, None, None, client)


def test_a_browser_from_a_scanner_network_is_a_scanner_on_delivery_and_a_reader_later() -> None:
    p = pipeline()
    sent = NOW_US // SECOND
    for seconds in (5, 60, 299):
        at = NOW_US + seconds * SECOND
        assert open_(p, CHROME, ip=MICROSOFT_EOP, token=opened(sent_at=sent), at_us=at) == (
            True, "scanner_network"), seconds
        # Clicks within too_soon_seconds are that, whatever the address.
        assert verdict(p.click(link(message=seconds, sent_at=sent), "GET", CHROME,
                               MICROSOFT_EOP, at)) == (
            True, "too_soon" if seconds <= 10 else "scanner_network"), seconds
    later = NOW_US + 3 * 3600 * SECOND  # a reader behind a corporate gateway that afternoon
    assert open_(p, CHROME, ip=MICROSOFT_EOP, token=opened(sent_at=sent), at_us=later) == READER
    # A mail client's own agent from there is a reader even on delivery, as is a browser
    # elsewhere.
    assert open_(p, OUTLOOK, ip=MICROSOFT_EOP, token=opened(sent_at=sent),
                 at_us=NOW_US + 5 * SECOND) == READER
    assert open_(p, CHROME, ip=FRANKFURT, token=opened(sent_at=sent),
                 at_us=NOW_US + 5 * SECOND) == READER


def test_classify_explains_which_list_decided() -> None:
    classifier = Classifier(load_rules())
    result = classifier.explain("click", "GET", CHROME, parse_agent(CHROME), MICROSOFT_EOP, 20.0)
    assert (result.reason, result.address_list) == ("scanner_network", "microsoft")
    listed = classifier.rules.address_lists.get("microsoft")
    assert listed is not None and result.address_list_date == listed.as_of
    assert "scanner network" in (result.rule or "")


# --- timing, HEAD and honeypot ----------------------------------------------------------


def test_click_within_seconds_of_sent_at_is_too_soon_either_side() -> None:
    p = pipeline()
    sent = NOW_US // SECOND
    token = link(sent_at=sent)
    assert click(p, token=token, at_us=NOW_US + 3 * SECOND) == (True, "too_soon")
    assert click(p, token=token, at_us=NOW_US - 3 * SECOND) == (True, "too_soon")  # clock skew
    assert click(p, token=token, at_us=NOW_US + 11 * SECOND) == READER
    # Opens are not subject to it (an image may be fetched on delivery by a real client).
    assert open_(p, CHROME, token=opened(sent_at=sent), at_us=NOW_US + SECOND) == READER


def test_head_click_is_machine_and_head_open_records_nothing() -> None:
    p = pipeline()
    assert click(p, method="HEAD") == (True, "head")
    assert p.open(opened(), "HEAD", CHROME, FRANKFURT, NOW_US) is DropReason.HEAD_OPEN


def test_honeypot_hit_is_machine_and_labels_the_messages_next_clicks() -> None:
    p = pipeline()
    trap = link(position=9, flags=FLAG_HONEYPOT)
    assert click(p, CHROME, token=trap) == (True, "honeypot")
    assert click(p, CHROME, token=trap, method="HEAD") == (True, "honeypot")
    assert click(p, token=link(0), at_us=NOW_US + 29 * SECOND) == (True, "honeypot")
    assert click(p, token=link(0, message=2), at_us=NOW_US + 5 * SECOND) == READER
    assert click(p, token=link(1), at_us=NOW_US + 31 * SECOND) == READER


# --- bursts -----------------------------------------------------------------------------


def test_three_links_of_one_message_within_two_seconds_are_a_burst() -> None:
    p = pipeline()
    at = NOW_US
    assert click(p, token=link(0), at_us=at) == READER
    assert click(p, token=link(1), at_us=at + 700_000) == READER
    # The completing click is the burst's (the two before it are re-labelled where they
    # are stored: tests/test_reports.py).
    assert click(p, token=link(2), at_us=at + 1_400_000) == (True, "burst")
    # The burst goes on while clicks keep coming within the window, whatever the link.
    assert click(p, token=link(0), at_us=at + 3_000_000) == (True, "burst")
    assert click(p, token=link(3), at_us=at + 4_500_000) == (True, "burst")
    # After a quiet window the message is a reader's again.
    assert click(p, token=link(0), at_us=at + 9_000_000) == READER


def test_no_burst_for_one_link_many_times_slow_clicks_or_other_messages() -> None:
    p = pipeline()
    at = NOW_US
    for i in range(5):  # a reader double-clicking one link
        assert click(p, token=link(0), at_us=at + i * 100_000) == READER
    slow = [link(0, message=2), link(1, message=2), link(2, message=2)]
    for i, token in enumerate(slow):  # 1.5 s apart: never 3 within 2 s
        assert click(p, token=token, at_us=at + i * 1_500_000) == READER
    for message in (3, 4, 5):  # three messages, one link each
        assert click(p, token=link(message, message=message), at_us=at) == READER
    # The same message id in another account is another message.
    assert click(p, token=link(0, message=6), at_us=at) == READER
    assert click(p, token=link(1, message=6, account=2), at_us=at) == READER
    assert click(p, token=link(2, message=6), at_us=at) == READER


def test_machine_clicks_do_not_make_a_burst_of_a_readers_click() -> None:
    p = pipeline()
    assert click(p, MIMECAST, token=link(0)) == (True, "scanner_ua")
    assert click(p, MIMECAST, token=link(1)) == (True, "scanner_ua")
    assert click(p, CHROME, token=link(2)) == READER


def test_recent_clicks_are_bounded_and_the_oldest_messages_forgotten(tmp_path: Path) -> None:
    rules = load_rules(write_rules(tmp_path, "[timing]\nrecent_messages = 4\n"))
    classifier = Classifier(rules)
    p = pipeline(classifier)
    at = NOW_US
    click(p, token=link(0, message=1), at_us=at)
    click(p, token=link(1, message=1), at_us=at)
    for message in range(100, 1100):
        click(p, token=link(0, message=message), at_us=at)
    remembered = len(classifier._recent) + len(classifier._recent_old)
    assert 0 < remembered <= 4
    # Message 1 was forgotten: its third link alone is no burst.
    assert click(p, token=link(2, message=1), at_us=at + 100_000) == READER


# --- rules files ------------------------------------------------------------------------


def test_packaged_rules_have_a_version_and_every_default() -> None:
    rules = load_rules()
    assert rules.version and rules.sources == (str(PACKAGED),)
    timing = rules.timing
    assert (timing.too_soon_seconds, timing.burst_links, timing.burst_seconds) == (10, 3, 2)
    assert rules.crawlerdetect


def test_user_rules_override_a_threshold_and_add_patterns_and_ranges(tmp_path: Path) -> None:
    (tmp_path / "egress-ip-ranges.csv").write_text(
        "203.0.113.0/25,GB,GB-EN,London,\n2001:db8:100::/40,DE,DE-BE,Berlin,\n")
    path = write_rules(tmp_path, """
version = "acme.3"
[timing]
too_soon_seconds = 60
[scanner]
patterns = { add = ['AcmeMailGuard'] }
[apple_mpp]
range_files = { add = ["egress-ip-ranges.csv"] }
ranges = { add = ["198.51.100.0/24"] }
""")
    rules = load_rules(path)
    assert rules.version == load_rules().version + "+acme.3"
    assert rules.timing.too_soon_seconds == 60
    assert rules.timing.burst_links == 3  # untouched keys keep the packaged value
    p = pipeline(Classifier(rules))
    sent = NOW_US // SECOND
    assert click(p, token=link(sent_at=sent), at_us=NOW_US + 30 * SECOND) == (True, "too_soon")
    assert click(p, "Mozilla/5.0 (AcmeMailGuard 2.1)") == (True, "scanner_ua")
    assert click(p, MIMECAST) == (True, "scanner_ua")  # the packaged patterns stay
    for address in ("203.0.113.7", "2001:db8:1ff::1", "198.51.100.200", APPLE_PROXY):
        assert open_(p, APPLE_MAIL, ip=address) == (True, "apple_mpp"), address
    assert open_(p, APPLE_MAIL, ip="203.0.113.200") == READER
    # The packaged rules are unchanged for everyone else.
    assert click(pipeline(), token=link(sent_at=sent), at_us=NOW_US + 30 * SECOND) == READER


def test_user_rules_remove_and_replace_lists(tmp_path: Path) -> None:
    path = write_rules(tmp_path, """
[image_proxy]
patterns = { remove = ['YahooMailProxy'] }
[apple_mpp]
lists = []
""")
    p = pipeline(Classifier(load_rules(path)))
    # Without its allow-list entry crawlerdetect calls Yahoo's proxy a crawler.
    assert open_(p, YAHOO_PROXY) == (True, "bot_ua")
    assert open_(p, GMAIL_PROXY) == (False, "image_proxy")
    assert open_(p, APPLE_MAIL, ip=APPLE_PROXY) == READER  # no ranges left
    assert load_rules(path).version.startswith(load_rules().version + "+local.")
    no_crawlerdetect = write_rules(tmp_path, "[bot]\ncrawlerdetect = false\n", "off.toml")
    without = Classifier(load_rules(no_crawlerdetect))
    # Without crawlerdetect it is still a machine, by the last rule: it names no browser,
    # system or device.
    assert without.explain("open", "GET", DATAPROVIDER, parse_agent(DATAPROVIDER), None,
                           None).rule == "names no mail client, browser, system or device"
    assert open_(p, GOOGLEBOT) == (True, "bot_ua")  # ua-parser still knows this one


@pytest.mark.parametrize(("text", "message"), [
    ("[timing\n", "not a valid TOML file"),
    ("[scanners]\npatterns = []\n", "unknown section [scanners]"),
    ("[timing]\ntoo_soon = 5\n", "unknown key timing.too_soon"),
    ("[timing]\ntoo_soon_seconds = -1\n", "timing.too_soon_seconds: must be a whole number"),
    ("[timing]\ntoo_soon_seconds = '5'\n", "timing.too_soon_seconds: must be a whole number"),
    ("[timing]\nburst_links = 1\n", "timing.burst_links: must be 0 (off) or 2 or more"),
    ("[bot]\ncrawlerdetect = 1\n", "bot.crawlerdetect: must be true or false"),
    ("[scanner]\npatterns = { add = ['Acme(Guard'] }\n",
     "scanner.patterns.add: 'Acme(Guard' is not a valid regular expression"),
    ("[scanner]\npatterns = { remove = ['Mimecst'] }\n",
     "scanner.patterns.remove: 'Mimecst' is not in the rules"),
    ("[scanner]\npatterns = 'Acme'\n", "scanner.patterns: must be a list, or {add"),
    ("[apple_mpp]\nranges = ['17.0.0.0/33']\n", "'17.0.0.0/33' is not an IP network"),
    ("[apple_mpp]\nrange_files = { add = ['missing.txt'] }\n", "'missing.txt' is not a file"),
    ("version = 3\n", "version: must be a short non-empty string"),
])
def test_bad_rules_file_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = write_rules(tmp_path, text)
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_bad_line_in_a_ranges_file_is_named_with_its_number(tmp_path: Path) -> None:
    (tmp_path / "ranges.txt").write_text("# Apple\n17.0.0.0/8\n17.0.0.0.0/8\n")
    path = write_rules(tmp_path, "[apple_mpp]\nrange_files = { add = ['ranges.txt'] }\n")
    with pytest.raises(RulesError, match=r"ranges\.txt:3: '17\.0\.0\.0\.0/8' is not an IP"):
        load_rules(path)


def test_bad_rules_file_stops_a_command_naming_the_setting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_rules(tmp_path, "[timing]\nburst_links = 1\n")
    code, out, err = classify(capsys, "--user-agent", CHROME, "--rules", str(path))
    assert (code, out) == (2, "")  # a settings error, as every bad setting
    assert re.match(r"^tracker: error: --rules: .*rules\.toml: timing\.burst_links", err), err
    with pytest.raises(SettingsError, match=r"^TRACKER_RULES: .*nowhere\.toml: not a file"):
        load_settings({"TRACKER_RULES": str(tmp_path / "nowhere.toml")})
    assert load_settings({}).rules is None


def test_serve_with_a_bad_rules_file_exits_with_one_line(tmp_path: Path) -> None:
    path = write_rules(tmp_path, "[scanner]\npatterns = ['(']\n")
    result = subprocess.run([sys.executable, "-m", "tracker", "serve"], capture_output=True,
                            text=True, timeout=60, env={
                                **os.environ, "TRACKER_RULES": str(path),
                                "TRACKER_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 2
    assert result.stderr.startswith("tracker: error: TRACKER_RULES: ")
    assert "scanner.patterns" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()  # nothing started


# --- tracker classify -------------------------------------------------------------------


def classify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["classify", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_classify_command_explains_an_apple_mpp_open_as_json(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = classify(capsys, "--user-agent", APPLE_MAIL, "--ip", APPLE_PROXY, "--json")
    assert code == 0
    got = json.loads(out)
    assert got == {"kind": "open", "machine": True, "reason": "apple_mpp",
                   "rule": f"Apple Mail's agent from an Apple proxy address ({APPLE_PROXY})",
                   "recorded": True, "location_recorded": True,
                   "rules_version": load_rules().version, "browser": "Apple Mail",
                   "os": "Mac OS X", "device": "desktop", "client": "Apple Mail",
                   "list": "apple_mpp", "list_date": load_rules().address_lists.get(
                       "apple_mpp").as_of}  # type: ignore[union-attr]


@pytest.mark.parametrize(("args", "lines"), [
    (["--user-agent", CHROME, "--kind", "click"],
     ["click: human", "rule: no rule matched: a reader"]),
    (["--user-agent", CHROME, "--kind", "click", "--seconds-after-send", "4"],
     ["click: machine (too_soon)", "rule: clicked 4 s from sent_at (within 10 s)"]),
    (["--user-agent", MIMECAST, "--kind", "click"],
     ["click: machine (scanner_ua)", "rule: Mimecast"]),
    (["--user-agent", GMAIL_PROXY],
     ["open: human (image_proxy)", "rule: GoogleImageProxy", "location: none"]),
    (["--user-agent", DATAPROVIDER], ["open: machine (bot_ua)", "rule: crawlerdetect: "]),
    (["--user-agent", CHROME, "--method", "HEAD"],
     ["open: machine (head)", "recorded: no (a HEAD on the pixel records nothing)"]),
    (["--user-agent", OFFICE_FETCH, "--kind", "click"], ["click: machine (scanner_ua)"]),
    (["--user-agent", OFFICE_FETCH],
     ["open: human", "mail client: Outlook; browser: Outlook; os: Windows"]),
])
def test_classify_command_prints_the_verdict_and_the_rule(
        capsys: pytest.CaptureFixture[str], args: list[str], lines: list[str]) -> None:
    code, out, _ = classify(capsys, *args)
    assert code == 0
    printed = out.splitlines()
    for expected in lines:
        assert any(line.startswith(expected) for line in printed), (expected, out)
    assert printed[-1] == f"rules: {load_rules().version}"


def test_classify_command_uses_the_rules_flag(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write_rules(tmp_path, "version = 'acme.1'\n[scanner]\n"
                                 "patterns = { add = ['AcmeMailGuard'] }\n")
    code, out, _ = classify(capsys, "--user-agent", "AcmeMailGuard/1.0", "--kind", "click",
                            "--rules", str(path), "--json")
    assert code == 0
    got = json.loads(out)
    assert (got["reason"], got["rule"]) == ("scanner_ua", "AcmeMailGuard")
    assert got["rules_version"].endswith("+acme.1")


def test_classify_command_refuses_a_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = classify(capsys, "--user-agent", CHROME, "--ip", "17.0.0")
    assert code == 1 and out == ""
    assert err.strip() == "tracker: error: --ip: '17.0.0' is not an IP address"


@pytest.mark.slow
def test_classify_runs_as_a_command_without_a_database(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tracker", "classify", "--user-agent", IOS_MAIL, "--ip",
         "2620:149::1", "--json"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "TRACKER_DATA_DIR": str(tmp_path / "data")}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert (got["machine"], got["reason"], got["device"]) == (True, "apple_mpp", "mobile")
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_classify_jsonl_answers_every_line_in_order_and_flags_bad_ones(tmp_path: Path) -> None:
    lines = [
        {"user_agent": IOS_MAIL, "ip": "2620:149::1", "method": "GET", "kind": "open",
         "seconds_after_send": None},
        "not json",
        {"user_agent": "curl/8.5.0", "ip": None, "method": "GET", "kind": "click",
         "seconds_after_send": 3600},
        {"user_agent": CHROME, "ip": "17.0.0", "kind": "open"},
        {"user_agent": CHROME, "ip": "203.0.113.9", "method": "HEAD", "kind": "click",
         "seconds_after_send": 3600.0},
    ]
    stdin = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                    for line in lines)
    result = subprocess.run(
        [sys.executable, "-m", "tracker", "classify", "--jsonl"], input=stdin,
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "TRACKER_DATA_DIR": str(tmp_path / "data")}, cwd=tmp_path)
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(got) == len(lines)
    assert (got[0]["machine"], got[0]["reason"]) == (True, "apple_mpp")
    assert got[1] == {"error": got[1]["error"]} and got[1]["error"].startswith("line 2: ")
    assert (got[2]["machine"], got[2]["reason"], got[2]["kind"]) == (True, "bot_ua", "click")
    assert got[3]["error"] == "line 4: ip: '17.0.0' is not an IP address"
    assert (got[4]["machine"], got[4]["reason"]) == (True, "head")
    assert result.returncode == 1
    assert "line 2:" in result.stderr and "line 4:" in result.stderr


# --- against a real server --------------------------------------------------------------


@pytest.fixture(scope="module")
def rules_server(module_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real server with the test geo database and a user rules file adding a scanner."""
    tmp = tmp_path_factory.mktemp("classify-server")
    rules = tmp / "rules.toml"
    rules.write_text("[scanner]\npatterns = { add = ['AcmeMailGuard'] }\n")
    env = {"TRACKER_GEOIP_DB": str(build_test_city_db(tmp / "city.mmdb")),
           "TRACKER_RULES": str(rules), "TRACKER_FLUSH_INTERVAL_MS": "50"}
    # Server copies os.environ, which the autouse fixture has not cleaned at module scope.
    saved = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith("TRACKER_")}
    try:
        srv = Server(module_dsn, tmp, env=env).start()
    finally:
        os.environ.update(saved)
    yield srv
    srv.stop()


def stored_events(dsn: str, message_ids: list[int], count: int) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]]:
        rows = [dict(r) for r in db_fetch(
            dsn, "select message_id, type, link_position, machine, reason, country,"
                 " occurred_at from events_decoded"
                 " where message_id = any($1::bigint[]) order by occurred_at",
            message_ids)]
        return rows if len(rows) >= count else []
    return wait_for(enough, 20, message=f"{count} events in PostgreSQL")


@pytest.mark.slow
def test_a_real_server_stores_each_hits_verdict(
        rules_server: Server, module_dsn: str) -> None:
    key = new_account(module_dsn, "classify")
    links = [f"https://example.com/{i}" for i in range(4)]
    with rules_server.client(key) as api, httpx.Client(
            base_url=rules_server.url, timeout=10, follow_redirects=False) as public:
        cid = campaign(api, {"location": "region"}, name="classification")
        # (agent, address, kind, method, expected machine, reason, country)
        plan: list[tuple[str, str, str, str, bool, str | None, str | None]] = [
            (APPLE_MAIL, APPLE_PROXY, "open", "GET", True, "apple_mpp", None),
            (IOS_MAIL, APPLE_PROXY_V6, "open", "GET", True, "apple_mpp", None),
            (GMAIL_PROXY, FRANKFURT, "open", "GET", False, "image_proxy", None),
            (YAHOO_PROXY, FRANKFURT, "open", "GET", False, "image_proxy", None),
            (OUTLOOK, FRANKFURT, "open", "GET", False, None, "DE"),
            (OUTLOOK_MSOFFICE, FRANKFURT, "open", "GET", False, None, "DE"),
            (THUNDERBIRD, FRANKFURT, "open", "GET", False, None, "DE"),
            (SAFARI_IPHONE, FRANKFURT, "click", "GET", False, None, "DE"),
            (CHROME_ANDROID, FRANKFURT, "click", "GET", False, None, "DE"),
            (OFFICE_FETCH, FRANKFURT, "click", "GET", True, "scanner_ua", "DE"),
            (GOOGLEBOT, FRANKFURT, "open", "GET", True, "bot_ua", "DE"),
            (PYTHON_REQUESTS, FRANKFURT, "click", "GET", True, "bot_ua", "DE"),
            (MICROSOFT_PREVIEW, FRANKFURT, "click", "GET", True, "scanner_ua", "DE"),
            (BARRACUDA, FRANKFURT, "click", "GET", True, "scanner_ua", "DE"),
            ("AcmeMailGuard/2.0", FRANKFURT, "click", "GET", True, "scanner_ua", "DE"),
            (FIREFOX, FRANKFURT, "click", "HEAD", True, "head", "DE"),
        ]
        messages = [register(api, cid, links, recipient=f"r{i}@example.com")
                    for i in range(len(plan))]
        for message, (agent, address, kind, method, *_) in zip(messages, plan, strict=True):
            url = message["pixel_url"] if kind == "open" else message["links"][0]["tracked_url"]
            response = public.request(method, url.removeprefix(rules_server.url), headers={
                "user-agent": agent, "x-forwarded-for": address})
            assert response.status_code == (200 if kind == "open" else 302)
        ids = [int(m["id"]) for m in messages]
        rows = stored_events(module_dsn, ids, len(plan))
        got = {row["message_id"]: (row["type"], row["machine"], row["reason"], row["country"])
               for row in rows}
        assert got == {mid: (kind, machine, reason, country) for mid, (
            _, _, kind, _, machine, reason, country) in zip(ids, plan, strict=True)}


def test_a_real_server_stores_too_soon_burst_and_honeypot(
        rules_server: Server, module_dsn: str) -> None:
    key = new_account(module_dsn, "scanned")
    links = [f"https://example.com/{i}" for i in range(4)]
    with rules_server.client(key) as api, httpx.Client(
            base_url=rules_server.url, timeout=10, follow_redirects=False) as public:
        cid = campaign(api, name="scanned")
        just_sent = register(api, cid, links, recipient="new@example.com", sent_at=None)
        walked = register(api, cid, links, recipient="walked@example.com")
        trapped = register(api, cid, links, recipient="trapped@example.com")

        def get(url: str) -> None:
            response = public.get(url.removeprefix(rules_server.url),
                                  headers={"user-agent": CHROME, "x-forwarded-for": FRANKFURT})
            assert response.status_code == 302

        get(just_sent["links"][0]["tracked_url"])
        for tracked in walked["links"][:3]:  # a scanner with a browser's agent walks the links
            get(tracked["tracked_url"])
        # The honeypot link, as instrumentation would add it: signed with the server's key.
        token = Signer([SECRET]).verify_click(
            trapped["links"][0]["tracked_url"].rsplit("/", 1)[1])
        assert token is not None
        trap = Signer([SECRET]).click_token(token.account_id, token.campaign_id,
                                            token.message_id, token.sent_at, 7, token.url_id,
                                            "https://example.com/trap", flags=FLAG_HONEYPOT)
        get(f"/c/{trap}")
        get(trapped["links"][1]["tracked_url"])
        rows = stored_events(module_dsn, [int(m["id"]) for m in (just_sent, walked, trapped)], 6)
    by_message: dict[int, list[tuple[bool, str | None]]] = {}
    for row in rows:
        by_message.setdefault(row["message_id"], []).append((row["machine"], row["reason"]))
    assert by_message[int(just_sent["id"])] == [(True, "too_soon")]
    walk = by_message[int(walked["id"])]
    # The third click completes the burst; the two before it are the writer's to re-label.
    assert walk[2] == (True, "burst")
    assert all(v in ((False, None), (True, "burst")) for v in walk[:2]), walk
    assert by_message[int(trapped["id"])] == [(True, "honeypot"), (True, "honeypot")]
