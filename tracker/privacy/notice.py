"""A campaign's policy in plain language, for the sender's own privacy notice.

The paragraph is generated from what the campaign actually does (its policy, its
effective retention, whether its account honours Sec-GPC / DNT), so it cannot drift
from the behaviour it describes; tests/test_privacy.py holds each sentence to the
setting it comes from.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from tracker.ingest.policy import Policy
from tracker.store.campaigns import policy_of

_PLACE = {
    "none": None,
    "country": "the country",
    "region": "the country and region (such as a state or province)",
    "city": "the country, region and city",
}


def describe(policy: Policy, retention_days: int | None, honours_signals: bool) -> str:
    sentences = [
        "Our emails contain a tracking image and tracked links, served by a self-hosted "
        "server we operate. When you open one of our emails with images shown, or click "
        "one of its links, we record that it happened and when, and which link you "
        "clicked; the link takes you to its destination either way."]
    sentences.append(_consent(policy))
    place = _PLACE[policy.location]
    if place is None:
        sentences.append("We do not record where you are.")
    else:
        sentences.append(f"We derive {place} from your IP address at that moment and record "
                         "only that; when your email provider fetches images for you (as "
                         "Gmail does), we record no location.")
    if policy.device:
        sentences.append("We record the browser or email program, the operating system and "
                         "the kind of device (desktop, mobile or tablet), read from the "
                         "request, but never the full user-agent text.")
    else:
        sentences.append("We do not record your browser, operating system or device.")
    sentences.append({
        "none": "We do not store your IP address.",
        "truncated": "We store your IP address only shortened to its network (the last "
                     "part of an IPv4 address, most of an IPv6 address removed), which does "
                     "not identify your connection.",
        "full": "We store your full IP address with each open and click.",
    }[policy.ip])
    if policy.recipient == "pseudonym":
        sentences.append("Your email address is not stored with this data: it is replaced "
                         "by a keyed pseudonym that only we can match to your address. We "
                         "store the subject of each email and when we sent it.")
        yours = "its pseudonym"
    else:
        sentences.append("We store your email address, the subject of each email and when "
                         "we sent it with this data.")
        yours = "your email address"
    sentences.append("We never store the content of our emails, and we set no cookies. A "
                     "link that contains your email address is stored with the address "
                     "taken out.")
    # What stays of each message once its events are gone: the messages row, its links,
    # and the per-message rollups (sql/0002_rollups.sql). tests/test_privacy.py holds this
    # list to the columns that are left and to the recipient's export.
    kept = (f"for each email: {yours}, its subject and when we sent it, the labels and "
            "reference data we attached to it (such as an order number), whether it carried a "
            "tracking image and tracked links, which links it had, how many times it was "
            "opened and each of its links clicked, how many times "
            "Apple Mail Privacy Protection fetched its images, how many times machines "
            "(such as link scanners) opened or clicked it, the quarter-hour of "
            "its first open and of its first click, and the hour of the first click on each "
            f"link; and totals for the whole campaign (opens and clicks by {_totals(policy)})")
    if retention_days is None:
        sentences.append("Individual opens and clicks (their time, place and device) are "
                         f"kept until you ask us to delete them or we delete the campaign, "
                         f"and so is the rest: {kept}.")
    else:
        span = "1 day" if retention_days == 1 else f"{retention_days} days"
        sentences.append(f"Individual opens and clicks (their time, place and device) are "
                         f"deleted automatically after {span}. What we keep after that, until "
                         f"you ask us to delete it or we delete the campaign: {kept}.")
    if honours_signals:
        sentences.append("If your browser or email program sends a Global Privacy Control "
                         "(Sec-GPC) or Do Not Track signal, we record nothing about your "
                         "opens and clicks.")
    sentences.append("You can ask us for a copy of everything we store about you, to delete "
                     "it, or to stop recording your opens and clicks altogether; when we delete a "
                     "campaign, its data is purged 30 days later.")
    return " ".join(sentences)


def _consent(policy: Policy) -> str:
    """How consent works for this campaign (privacy/consent.py): what is recorded only with
    it, and that a refusal or withdrawal holds at once, for mail already sent too."""
    withdraw = ("You can withdraw your agreement at any time, as easily as you gave it: from "
                "then on we record none of them, also for emails we sent before.")
    if policy.consent_opens and policy.consent_clicks:
        return ("We record your opens and clicks only if you have agreed to it; without your "
                "agreement our emails to you carry no tracking image and their links lead "
                f"straight to their destination. {withdraw}")
    if policy.consent_opens:
        return ("We record that you opened an email only if you have agreed to it; without "
                "your agreement our emails to you carry no tracking image. You can refuse the "
                "recording of your clicks as well. " + withdraw)
    if policy.consent_clicks:
        return ("We record your clicks only if you have agreed to it; without your agreement "
                "the links in our emails to you lead straight to their destination. You can "
                "refuse the recording of your opens as well. " + withdraw)
    return ("You can refuse the recording of your opens, of your clicks or of both: from then "
            "on we record none of them, also for emails we sent before.")


def _totals(policy: Policy) -> str:
    """What the campaign's report totals are broken down by (rollup_dimension holds only
    what the policy let the events store)."""
    parts = ["time"]
    if policy.location != "none":
        parts.append("place")
    if policy.device:
        parts.append("browser, system and kind of device")
    return " and ".join(parts) if len(parts) < 3 else f"{parts[0]}, {parts[1]} and {parts[2]}"


def campaign_summary(row: asyncpg.Record) -> dict[str, Any]:
    """A campaign's privacy summary from a campaign-privacy row (sql/privacy.sql): what the
    API's /privacy and `tracker policy describe` answer."""
    policy = policy_of(row)
    days = row["retention_days"] if row["retention_days"] is not None else (
        row["account_retention_days"])
    return {"campaign_id": str(row["id"]), "policy": policy.as_json(), "retention_days": days,
            "honours_privacy_signals": row["honour_privacy_signals"],
            "text": describe(policy, days, row["honour_privacy_signals"])}
