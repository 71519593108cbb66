"""Failed authentications, throttled per client address (a token bucket each).

Each failure takes a token from the client's bucket; the bucket refills at a steady
rate up to its size. With the bucket empty, the API answers 429 with `Retry-After`
before it looks at the key, so a flood of guesses costs no database query. A
successful authentication gives nothing back: an attacker holding a valid key of
their own must not be able to refill their bucket between guesses at other keys.

IPv6 clients are keyed by their /64 (one subscriber usually holds a whole /64, and
could otherwise take a fresh bucket for every guess). Loopback clients are never
throttled: they are the machine itself (the CLI, a local script), and a reverse
proxy on the same host that forgot `X-Forwarded-For` would otherwise put every
client in one bucket and lock everybody out. A client whose address is unknown (what a
trusted proxy wrote in `X-Forwarded-For` is malformed: ClientAddress) is throttled, all
such clients in one bucket: a broken proxy chain then costs its clients a shared burst,
rather than letting anyone behind it guess without limit as the proxy's own address.

The API and the dashboard's sign-in form share one throttle (the runtime's), so a
client cannot double its guesses by alternating between them.

Memory is bounded: past `max_clients` buckets the least recently failed one is
forgotten (which only ever gives a client more tries, never fewer). Each worker
process has its own buckets, so with `--workers N` a client gets up to N times the
burst before every worker refuses it.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.requests import Request

if TYPE_CHECKING:
    from tracker.ingest.addresses import ClientAddress

BURST = 10  # failures allowed at once
REFILL_PER_S = 1 / 6  # then one more every 6 s: 10 a minute
MAX_CLIENTS = 16384  # ~2 MB of buckets at most


class AuthThrottle:
    def __init__(self, burst: int = BURST, refill_per_s: float = REFILL_PER_S,
                 max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.refill_per_s = refill_per_s
        self.max_clients = max_clients
        self._clock = clock
        # key -> (tokens, when they were counted); insertion order is recency of failure.
        self._buckets: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def retry_after(self, client: str | None) -> int | None:
        """Seconds the client must wait before its next attempt, or None if it may try now."""
        key = _key(client)
        if key is None or key not in self._buckets:
            return None
        tokens = self._tokens(key, self._clock())
        if tokens >= 1:
            return None
        return max(1, math.ceil((1 - tokens) / self.refill_per_s))

    def failed(self, client: str | None) -> None:
        key = _key(client)
        if key is None:
            return
        now = self._clock()
        tokens = self._tokens(key, now) - 1
        self._buckets.pop(key, None)
        if len(self._buckets) >= self.max_clients:
            del self._buckets[next(iter(self._buckets))]
        self._buckets[key] = (max(tokens, 0.0), now)

    def _tokens(self, key: str, now: float) -> float:
        found = self._buckets.get(key)
        if found is None:
            return float(self.burst)
        tokens, since = found
        tokens = min(float(self.burst), tokens + max(0.0, now - since) * self.refill_per_s)
        if tokens >= self.burst:
            del self._buckets[key]  # full again: nothing left to remember
        return tokens


def client_of(request: Request, addresses: ClientAddress) -> str | None:
    """The request's client address, resolved as the tracking endpoints resolve it (through
    trusted proxies' X-Forwarded-For): what its bucket is keyed by."""
    forwarded = request.headers.getlist("x-forwarded-for")
    return addresses.resolve(request.client.host if request.client else None,
                             ",".join(forwarded).encode("latin-1") if forwarded else None)


def _key(client: str | None) -> str | None:
    """The bucket of an address, or None for one that is never throttled."""
    if client is None:
        return "unknown"
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if address.is_loopback:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
