"""Request limits of the web app: body size and a bounded per-key rate limit."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

MAX_BODY = 8192
"""The largest request body accepted, in bytes."""
MAX_TOKEN_CHARS = 128
"""The longest bearer token read; longer ones are refused unread."""


class RateLimit:
    """A token bucket per key: ``burst`` requests at once, refilled at ``per_second``.

    The bucket is the classic token bucket (as in RFC 2697's committed-rate bucket: capacity
    ``burst``, filled at a constant rate, one token per request). Buckets are kept in
    least-recently-used order and never more than ``max_keys`` of them: a bucket left alone for
    ``burst / per_second`` seconds has refilled, which is the same as having no bucket, so it is
    dropped; and when more than ``max_keys`` keys are active at once the least recently used is
    dropped (its key starts again with a full bucket). Memory is thus bounded by ``max_keys``
    whatever the number of clients or tokens tried.
    """

    def __init__(
        self,
        per_second: float = 5.0,
        burst: int = 30,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_second <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("a rate limit needs per_second > 0, burst >= 1 and max_keys >= 1")
        self.per_second, self.burst, self.max_keys, self.clock = per_second, burst, max_keys, clock
        self._refilled_after = burst / per_second
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        """key → (tokens, time of last use), least recently used first."""

    def allow(self, key: Hashable) -> bool:
        """Take one token from ``key``'s bucket; False (and nothing taken) when it is empty."""
        now = self.clock()
        while self._buckets:  # the oldest buckets first: drop those that have refilled
            oldest, (_, last) = next(iter(self._buckets.items()))
            if now - last < self._refilled_after:
                break
            del self._buckets[oldest]
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.per_second)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        """The number of buckets held (at most ``max_keys``)."""
        return len(self._buckets)
