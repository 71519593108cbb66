"""What a campaign may store about a hit, and the in-memory book of every campaign's policy.

The hit pipeline asks the book for a policy; it never waits on the database. The
book is loaded at start, refreshed when a campaign changes (here at once, in the
server's other workers before the API answers: privacy/sync.py; on other nodes within a
second), and kept as it is while the database is down. A campaign
the book does not know yet gets the strictest policy: storing too little is a
recoverable mistake, storing too much is not.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from tracker.ingest.addresses import packed, text_of, truncated

LOCATIONS = ("none", "country", "region", "city")
IP_MODES = ("none", "truncated", "full")
# "pseudonym": the recipient is stored only as a keyed hash (privacy/recipients.py), never
# the address.
RECIPIENT_MODES = ("address", "pseudonym")
_FIELDS = ("location", "device", "ip", "retention_days", "recipient", "consent")
_CONSENT_KINDS = ("opens", "clicks")
MAX_RETENTION_DAYS = 36500


class PolicyError(ValueError):
    """A policy object from the API is malformed; the message says how."""


@dataclass(frozen=True, slots=True)
class Policy:
    location: str = "region"
    device: bool = True
    ip: str = "none"
    retention_days: int | None = None
    recipient: str = "address"
    # Whether a hit is recorded only for a recipient who gave consent to that kind of
    # tracking (privacy/consent.py); False: no consent needed (a refusal still holds).
    consent_opens: bool = False
    consent_clicks: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"location": self.location, "device": self.device, "ip": self.ip,
                "retention_days": self.retention_days, "recipient": self.recipient,
                "consent": {"opens": self.consent_opens, "clicks": self.consent_clicks}}

    def updated(self, changes: object) -> Policy:
        """This policy with the fields given in an API object changed, validated. `consent`
        changes the kinds it names (`{"opens": true}` leaves clicks as they are)."""
        if not isinstance(changes, dict):
            raise PolicyError("policy must be an object")
        unknown = set(changes) - set(_FIELDS)
        if unknown:
            raise PolicyError(f"policy has unknown field(s): {', '.join(sorted(unknown))}")
        changes = dict(changes)
        if "consent" in changes:
            changes.update(consent_fields(changes.pop("consent"), "policy.consent"))
        policy = replace(self, **changes)
        if policy.location not in LOCATIONS:
            raise PolicyError(f"policy.location must be one of {', '.join(LOCATIONS)}")
        if not isinstance(policy.device, bool):
            raise PolicyError("policy.device must be true or false")
        if policy.ip not in IP_MODES:
            raise PolicyError(f"policy.ip must be one of {', '.join(IP_MODES)}")
        days = policy.retention_days
        if days is not None and (isinstance(days, bool) or not isinstance(days, int)
                                 or not 1 <= days <= MAX_RETENTION_DAYS):
            raise PolicyError(f"policy.retention_days must be null or 1 to {MAX_RETENTION_DAYS}")
        if policy.recipient not in RECIPIENT_MODES:
            raise PolicyError(f"policy.recipient must be one of {', '.join(RECIPIENT_MODES)}")
        return policy


def consent_fields(value: object, where: str) -> dict[str, bool]:
    """A consent requirement from the API (`{"opens": bool, "clicks": bool}`, either may be
    left out) as Policy fields."""
    if not isinstance(value, dict):
        raise PolicyError(f"{where} must be an object like {{\"opens\": true, \"clicks\": true}}")
    unknown = set(value) - set(_CONSENT_KINDS)
    if unknown:
        raise PolicyError(f"{where} has unknown field(s): {', '.join(sorted(unknown))}")
    for kind, required in value.items():
        if not isinstance(required, bool):
            raise PolicyError(f"{where}.{kind} must be true or false")
    return {f"consent_{kind}": required for kind, required in value.items()}


DEFAULT = Policy()
STRICTEST = Policy(location="none", device=False, ip="none")


def stored_ip(mode: str, address: str | None) -> str | None:
    """The form of the client address that policy.ip `mode` lets us keep, if any."""
    if mode == "none" or not address:
        return None
    raw = packed(address)
    if raw is None:
        return None
    return text_of(raw) if mode == "full" else truncated(raw)


@dataclass(frozen=True, slots=True)
class CampaignState:
    policy: Policy
    # A deleted campaign's links still redirect, but nothing about the hit is kept.
    recording: bool


class PolicyBook:
    def __init__(self) -> None:
        self._campaigns: dict[tuple[int, int], CampaignState] = {}
        self.loaded_until: datetime | None = None

    def get(self, account_id: int, campaign_id: int) -> CampaignState | None:
        return self._campaigns.get((account_id, campaign_id))

    def policy_for(self, account_id: int, campaign_id: int) -> tuple[Policy, bool]:
        state = self._campaigns.get((account_id, campaign_id))
        if state is None:
            return STRICTEST, True
        return state.policy, state.recording

    def put(self, account_id: int, campaign_id: int, policy: Policy, recording: bool) -> None:
        self._campaigns[(account_id, campaign_id)] = CampaignState(policy, recording)

    def __len__(self) -> int:
        return len(self._campaigns)
