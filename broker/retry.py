"""Bounded retries on Redis trouble (tenacity), then BrokerUnavailable.

The 1.0.0 client dies on UNAVAILABLE (docs/protocol.md §3.2), so a replica absorbs short Redis
hiccups itself (a reconnect, a failover, a restart with AOF loading) and only then tells
the client to try again later.

Every call has one deadline over all its attempts (``max_seconds``, docs/operations.md
"Redis time per call"): a Redis that is paused (SIGSTOP, a stuck host) rather than gone
never answers, so neither an error to retry on nor the socket timeout would come in time.
A command cancelled by the deadline disconnects its connection (redis-py does so on any
exception while reading a reply), so no half-read reply is left on a pooled connection.
"""

from __future__ import annotations

import asyncio
import logging

import redis.exceptions as rex
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
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
# Error replies that a failover or a restart answers for a while (Sentinel: a master with
# min-replicas-to-write and no replica yet, a replica promoted and still loading).
TRANSIENT_REPLIES = ("NOREPLICAS", "MASTERDOWN", "LOADING")


def transient(exc: BaseException) -> bool:
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, rex.ResponseError) and str(exc).startswith(TRANSIENT_REPLIES)


class RetryPolicy:
    def __init__(self, attempts: int = 5, max_seconds: float = 4.0) -> None:
        self.attempts = attempts
        self.max_seconds = max_seconds

    def retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception(transient),
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.max_seconds),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            before_sleep=lambda rs: log.warning(
                "redis trouble (%s), retry %d", rs.outcome.exception(), rs.attempt_number
            ),
            reraise=False,
        )

    async def run(self, fn, *args, **kwargs):
        """Await fn(*args) with retries, all within max_seconds; BrokerUnavailable once
        they are used up or the deadline passes."""
        try:
            async with asyncio.timeout(self.max_seconds):
                return await self._attempts(fn, *args, **kwargs)
        except TimeoutError as exc:  # the deadline (redis-py's own timeouts are rex.*)
            raise BrokerUnavailable(f"redis did not answer within {self.max_seconds:g}s") from exc

    async def _attempts(self, fn, *args, **kwargs):
        try:  # the first attempt without tenacity's bookkeeping: this is the hot path
            return await fn(*args, **kwargs)
        except Exception as exc:
            if not transient(exc):
                raise
            log.warning("redis trouble (%s), retrying", exc)
        try:
            async for attempt in self.retrying():
                with attempt:
                    return await fn(*args, **kwargs)
        except RetryError as exc:
            raise BrokerUnavailable(f"redis unavailable: {exc.last_attempt.exception()}") from exc
