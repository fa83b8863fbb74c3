"""Map broker errors to gRPC statuses the published 1.0.0 client survives (protocol.md §3).

The client dies on UNAVAILABLE, so nothing here ever answers it: Redis trouble after the
bounded retries, and unexpected errors, become FAILED_PRECONDITION ("try again later"),
which the client retries. Bad input gets a status it does not retry, with a clear message.
"""

from __future__ import annotations

import functools
import logging
import time

import grpc

from broker.errors import (
    BrokerUnavailable,
    Conflict,
    InvalidInput,
    NotFound,
    NotReady,
    TooLarge,
)
from combiner.metrics import RPC_SECONDS, RPCS

log = logging.getLogger("combiner")

STATUS_OF = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (NotReady, grpc.StatusCode.FAILED_PRECONDITION),
    (Conflict, grpc.StatusCode.ALREADY_EXISTS),
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BrokerUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            if isinstance(exc, BrokerUnavailable):
                return code, f"storage temporarily unavailable, try again: {exc}"
            return code, str(exc)
    return grpc.StatusCode.FAILED_PRECONDITION, f"internal error, try again: {type(exc).__name__}"


async def _abort(method: str, context, exc: Exception):
    code, message = status_for(exc)
    if code == grpc.StatusCode.FAILED_PRECONDITION and not isinstance(exc, NotReady):
        log.error("%s failed: %s", method, exc, exc_info=not isinstance(exc, BrokerUnavailable))
    await context.abort(code, message)


def _record(method: str, context, started: float, failed: bool) -> None:
    code = context.code() if hasattr(context, "code") else None
    if code is None:  # no status set: finished normally, or cancelled by the client
        name = "CANCELLED" if failed else "OK"
    else:
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    RPCS.labels(method, name).inc()
    RPC_SECONDS.labels(method).observe(time.perf_counter() - started)


def unary(fn):
    """Wrap a unary handler (or stream-in/unary-out): status mapping and metrics."""
    method = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        started, failed = time.perf_counter(), True
        try:
            reply = await fn(self, request, context)
            failed = False
            return reply
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(method, context, exc)
        finally:
            _record(method, context, started, failed)

    return wrapper


def streaming(fn):
    """Wrap a server-streaming handler (an async generator): status mapping and metrics."""
    method = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        started, failed = time.perf_counter(), True
        try:
            async for item in fn(self, request, context):
                yield item
            failed = False
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(method, context, exc)
        finally:
            _record(method, context, started, failed)

    return wrapper
