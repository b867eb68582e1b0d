"""One retry helper for every remote backend: exponential backoff with full jitter."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    """Tries in all, the first included."""
    base_delay: float = 0.5
    max_delay: float = 20.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max_delay, base·2^attempt)]."""
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


async def with_retries(
    call: Callable[[], Awaitable[T]],
    retryable: Callable[[BaseException], bool],
    policy: RetryPolicy,
    rng: random.Random,
    what: str = "request",
) -> T:
    """``await call()``, retrying errors that ``retryable`` accepts; the last error propagates."""
    for attempt in range(policy.attempts):
        try:
            return await call()
        except Exception as exc:
            if attempt == policy.attempts - 1 or not retryable(exc):
                raise
            wait = policy.delay(attempt, rng)
            log.debug("%s failed (%s); retry %d in %.2fs", what, exc, attempt + 1, wait)
            await asyncio.sleep(wait)
    raise AssertionError("unreachable")
