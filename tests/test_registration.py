"""Registering messages with their HTML, one at a time and in batches."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tracker.mail.instrument import extract
from tracker.mail.registration import parse_batch
from tracker.store.embedded_db import POSTGRES_BIN_PATH

from .support import Server, campaign, db_value, new_account, wait_for

CORPUS = Path(__file__).parent / "corpus"
MARKER = "body-marker-7f3a9c"  # text only the HTML body holds


def _html(name: str = "receipt.html") -> str:
    return (CORPUS / name).read_text().replace("</body>", f"<p>{MARKER}</p></body>", 1)


@pytest.fixture(scope="module")
def api(server: Server, module_dsn: str) -> httpx.Client:
    return server.client(new_account(module_dsn))


def test_html_answer_has_every_link_tracked_and_each_redirects_to_its_original(
        server: Server, api: httpx.Client) -> None:
    html = _html()
    originals = [spot.url for spot in extract(html).links]
    assert len(originals) >= 5
    response = api.post(f"/api/campaigns/{campaign(api)}/messages",
                        json={"recipient": "ada@example.com", "html": html})
    assert response.status_code == 201, response.text
    answer = response.json()
    assert [link["url"] for link in answer["links"]] == originals
    instrumented = answer["html"]
    assert answer["pixel_url"] in instrumented
    for link in answer["links"]:
        assert link["tracked_url"] in instrumented
        redirect = httpx.get(link["tracked_url"], follow_redirects=False)
        assert redirect.status_code == 302
        assert redirect.headers["location"] == link["url"]
    # Re-extracting the output finds only tracked URLs where the originals were.
    assert all(spot.url.startswith(server.url + "/c/") for spot in extract(instrumented).links)


def test_html_and_explicit_links_are_both_registered_in_that_order(api: httpx.Client) -> None:
    html = '<a href="https://example.com/in-html">x</a>'
    answer = api.post(f"/api/campaigns/{campaign(api)}/messages", json={
        "recipient": "ada@example.com", "html": html,
        "links": ["https://example.com/extra"]}).json()
    assert [link["url"] for link in answer["links"]] == [
        "https://example.com/in-html", "https://example.com/extra"]


def test_the_html_body_is_never_stored(server: Server, api: httpx.Client,
                                       module_dsn: str) -> None:
    api.post(f"/api/campaigns/{campaign(api)}/messages",
             json={"recipient": "ada@example.com", "html": _html("newsletter.html")})
    dump = subprocess.run([str(POSTGRES_BIN_PATH / "pg_dump"), "--data-only", module_dsn],
                          capture_output=True, text=True, check=True).stdout
    assert "ada@example.com" in dump  # the dump does hold what is stored
    assert MARKER not in dump
    assert MARKER not in server.log()


def _batch(n: int, html: str | None = None) -> dict[str, Any]:
    return {"messages": [{"recipient": f"reader{i}@example.com", "subject": f"Hello {i}",
                          **({"html": html} if html else {"links": [
                              f"https://example.com/{i}/{j}" for j in range(5)]})}
                         for i in range(n)]}


@pytest.mark.slow
def test_a_batch_of_a_thousand_messages_is_registered_in_one_call(
        api: httpx.Client, module_dsn: str) -> None:
    campaign_id = campaign(api)
    response = api.post(f"/api/campaigns/{campaign_id}/messages/batch",
                        json=_batch(1000, _html()), timeout=60)
    assert response.status_code == 201, response.text[:500]
    messages = response.json()["messages"]
    assert len(messages) == 1000
    assert len({m["id"] for m in messages}) == 1000
    assert all(m["pixel_url"] in m["html"] for m in messages)
    assert db_value(module_dsn, "select count(*) from messages where campaign_id = $1",
                    int(campaign_id)) == 1000
    assert db_value(module_dsn, "select count(l) from messages m, unnest(m.url_ids) l "
                    "where m.campaign_id = $1", int(campaign_id)) == 1000 * len(
                        messages[0]["links"])


def test_a_batch_with_bad_messages_registers_nothing_and_names_each_one(
        api: httpx.Client, module_dsn: str) -> None:
    campaign_id = campaign(api)
    body = _batch(10)
    body["messages"][3]["links"] = ["ftp://example.com/file"]
    body["messages"][7]["recipient"] = ""
    response = api.post(f"/api/campaigns/{campaign_id}/messages/batch", json=body)
    assert response.status_code == 422
    answer = response.json()
    assert "2 of 10" in answer["error"]
    assert [e["index"] for e in answer["errors"]] == [3, 7]
    assert "messages[3].links[0]" in answer["errors"][0]["error"]
    assert db_value(module_dsn, "select count(*) from messages where campaign_id = $1",
                    int(campaign_id)) == 0


@pytest.mark.parametrize("body", [{}, {"messages": []}, {"messages": "x"},
                                  {"messages": [{}], "extra": 1},
                                  {"messages": [{"recipient": "a@b.c"}] * 5001}])
def test_malformed_batches_are_422(api: httpx.Client, body: dict[str, Any]) -> None:
    response = api.post(f"/api/campaigns/{campaign(api)}/messages/batch", json=body)
    assert response.status_code == 422
    assert isinstance(response.json()["error"], str)


def test_a_batch_for_another_accounts_campaign_is_404(
        server: Server, api: httpx.Client, module_dsn: str) -> None:
    campaign_id = campaign(api)
    with server.client(new_account(module_dsn, "other")) as other:
        response = other.post(f"/api/campaigns/{campaign_id}/messages/batch", json=_batch(1))
    assert response.status_code == 404


def test_clicks_from_html_links_are_told_apart_by_position(
        server: Server, api: httpx.Client, module_dsn: str) -> None:
    html = ('<a href="https://example.com/same">logo</a> ... '
            '<a href="https://example.com/same">button</a>')
    answer = api.post(f"/api/campaigns/{campaign(api)}/messages",
                      json={"recipient": "ada@example.com", "html": html}).json()
    httpx.get(answer["links"][1]["tracked_url"])

    def position() -> object:
        return db_value(module_dsn, "select link_position from events where message_id = $1",
                        int(answer["id"]))

    wait_for(lambda: position() is not None, message="the click to land")
    assert position() == 1


def test_concurrent_batches_sharing_destinations_all_register(
        server: Server, module_dsn: str) -> None:
    import asyncio

    key = new_account(module_dsn)
    with server.client(key) as api:
        campaign_id = campaign(api)

    async def post_all() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     headers={"authorization": f"Bearer {key}"}) as client:
            # Fresh destinations every round, so each round races on inserting them.
            responses = []
            for round_ in range(5):
                shared = {"messages": [{"recipient": f"r{i}@example.com", "links": [
                    f"https://example.com/shared/{round_}/{j}" for j in range(5)]}
                    for i in range(50)]}
                responses += await asyncio.gather(*(
                    client.post(f"/api/campaigns/{campaign_id}/messages/batch", json=shared)
                    for _ in range(4)))
            return [r.status_code for r in responses]

    assert set(asyncio.run(post_all())) == {201}
    assert db_value(module_dsn, "select count(*) from urls where campaign_id = $1",
                    int(campaign_id)) == 25


def test_instrumented_html_carries_one_hidden_honeypot_link_outside_the_links_list(
        server: Server, api: httpx.Client) -> None:
    answer = api.post(f"/api/campaigns/{campaign(api)}/messages",
                      json={"recipient": "ada@example.com", "html": _html()}).json()
    tracked = [spot.url for spot in extract(answer["html"]).links]
    listed = [link["tracked_url"] for link in answer["links"]]
    (honeypot,) = [url for url in tracked if url not in listed]
    assert len(tracked) == len(listed) + 1
    markup = answer["html"]
    hidden = markup[markup.rindex("<div", 0, markup.index(honeypot)):markup.index(honeypot)]
    assert "display:none" in hidden and 'aria-hidden="true"' in hidden
    assert 'tabindex="-1"' in markup[markup.index(honeypot) - 200:markup.index(honeypot) + 300]
    redirect = httpx.get(honeypot, follow_redirects=False)
    assert redirect.status_code == 302
    assert redirect.headers["location"] == server.url + "/"


async def test_a_big_batch_hands_the_event_loop_back_while_it_is_parsed() -> None:
    # The loop that parses a batch also answers tracking hits: a batch of 500 messages
    # must let other tasks run between its slices, not only after it.
    body = {"messages": [{"recipient": f"reader{i}@example.com",
                          "links": [f"https://example.com/{i}"]} for i in range(500)]}
    turns: list[int] = []
    parsed: list[object] = []

    async def other_work() -> None:
        while not parsed:
            turns.append(1)
            await asyncio.sleep(0)  # not a wait: one turn of the loop, what is counted

    async def parse() -> None:
        parsed.append(await parse_batch(body))

    await asyncio.gather(other_work(), parse())
    assert len(parsed[0]) == 500  # type: ignore[arg-type]
    assert len(turns) >= 500 // 50 - 1
