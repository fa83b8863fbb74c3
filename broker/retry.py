"""Bounded retries on Redis trouble (tenacity), then BrokerUnavailable.

The 1.0.0 client dies on UNAVAILABLE (docs/protocol.md §3.2), so a replica absorbs short Redis
hiccups itself (a reconnect, a failover, a restart with AOF loading) and only then tells
the client to try again later.
"""

from __future__ import annotations

import logging

import redis.exceptions as rex
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from broker.errors import BrokerUnavailable

log = logging.getLogger("broker")

# Errors that a later attempt may not see. Everything else is a bug or bad input.
TRANSIENT = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.BusyLoadingError,
    rex.TryAgainError,
    rex.ReadOnlyError,
    rex.ClusterDownError,
    OSError,
)


class RetryPolicy:
    def __init__(self, attempts: int = 5, max_seconds: float = 4.0) -> None:
        self.attempts = attempts
        self.max_seconds = max_seconds

    def retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception_type(TRANSIENT),
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.max_seconds),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            before_sleep=lambda rs: log.warning(
                "redis trouble (%s), retry %d", rs.outcome.exception(), rs.attempt_number
            ),
            reraise=False,
        )

    async def run(self, fn, *args, **kwargs):
        """Await fn(*args) with retries; BrokerUnavailable once they are used up."""
        try:  # the first attempt without tenacity's bookkeeping: this is the hot path
            return await fn(*args, **kwargs)
        except TRANSIENT as exc:
            log.warning("redis trouble (%s), retrying", exc)
        try:
            async for attempt in self.retrying():
                with attempt:
                    return await fn(*args, **kwargs)
        except RetryError as exc:
            raise BrokerUnavailable(f"redis unavailable: {exc.last_attempt.exception()}") from exc
