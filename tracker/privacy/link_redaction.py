"""Link destinations that name their recipient, stored without the address.

Senders personalise links: `https://shop.example/unsubscribe?email=jane@example.com`.
The redirect needs that URL byte for byte, and has it: a click token carries its own
destination (ingest/tokens.py). What tracker stores (the `urls` row the report's `links` and
the exports show) is the destination with the recipient's address replaced by
`PLACEHOLDER`, whatever the campaign's `recipient` mode: a pseudonymous campaign must
not keep the address in clear, and in any campaign every recipient's unsubscribe link
is then one destination of the report, `...?email={recipient}`, with its clicks.

The address is found as written and in the encodings URLs give it: any mix of literal
and percent-encoded characters (`%40`, `%2B`, either case of hex), encoded twice
(`%2540`), in any letter case. Erasure (privacy/data_subjects.py) redacts with the same function the
destinations of the account that still name the address (stored before this was done,
or another recipient's link that names it).
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from tracker.privacy.recipients import normalize

PLACEHOLDER = "{recipient}"
_ALNUM_RUN = re.compile(r"[0-9a-z]+")


class Redactor:
    """Finds one recipient's address in destinations; built once per address."""

    def __init__(self, address: str) -> None:
        self.address = normalize(address)
        # Made when a destination needs them (most name no address).
        self._spellings: list[str] | None = None
        self._pattern: re.Pattern[str] | None = None

    def names(self, url: str) -> bool:
        """Whether the destination holds the address, in any of its encodings. Cheap when
        it does not (most links): no '%', no decoding."""
        if "%" in url:
            url = unquote(unquote(url))
        return self.address in url.lower()

    def redact(self, url: str) -> str:
        """The destination with every occurrence of the address replaced by PLACEHOLDER;
        unchanged when it names no address."""
        if not self.address or not self.names(url):
            return url
        if url.isascii():
            # The usual spellings first, without a pattern to build.
            lowered = url.lower()
            if self._spellings is None:
                self._spellings = _spellings(self.address)
            for form in self._spellings:
                start = lowered.find(form)
                while start >= 0:
                    url = url[:start] + PLACEHOLDER + url[start + len(form):]
                    lowered = url.lower()
                    start = lowered.find(form, start + len(PLACEHOLDER))
            if not self.names(url):
                return url
        if self._pattern is None:
            self._pattern = re.compile("".join(_character(c) for c in self.address),
                                       re.IGNORECASE)
        redacted = self._pattern.sub(PLACEHOLDER, url)
        if redacted == url:
            # Decoded, the URL names the address, but in a form the pattern does not
            # follow (say a '%' split from its hex by another encoding): keep only the
            # host, which is what a report can show without the address.
            parts = urlsplit(url)
            return urlunsplit((parts.scheme, parts.netloc, "/" + PLACEHOLDER, "", ""))
        return redacted

    def like_pattern(self) -> str:
        """A LIKE pattern (case-insensitive with ILIKE) that every destination naming the
        address matches: its longest run of letters and digits, which no encoder
        escapes. A first filter in SQL; `names` decides."""
        runs = _ALNUM_RUN.findall(self.address)
        longest = max(runs, key=len, default="")
        return f"%{longest}%"


def _spellings(address: str) -> list[str]:
    """The address as written and as URL encoders write it, in lower case (compared with
    the URL in lower case)."""
    once = quote(address, safe="")
    return list(dict.fromkeys(form.lower() for form in (
        quote(once, safe=""), once, quote(address, safe="+"), quote(address, safe="@+"),
        quote(address, safe="@"), address)))


def _character(char: str) -> str:
    """A character of the address as a URL may hold it: itself, percent-encoded, or
    percent-encoded twice (`@`, `%40`, `%2540`)."""
    encoded = "".join(f"%{byte:02X}" for byte in char.encode())
    return "(?:" + "|".join((re.escape(char), re.escape(encoded),
                             re.escape(encoded.replace("%", "%25")))) + ")"
