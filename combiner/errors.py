"""Every scaleout RPC's status mapping, error logging and metrics, set up in one place.

Why: the published 1.0.0 client decides what to do by the status code alone
(docs/protocol.md §3). It dies on UNAVAILABLE, does not retry UNAUTHENTICATED,
PERMISSION_DENIED, INVALID_ARGUMENT and the like, and retries FAILED_PRECONDITION. So no
RPC may ever answer UNAVAILABLE, nor grpc's own UNKNOWN for an exception that escaped:
Redis trouble after the bounded retries, and unexpected errors, become FAILED_PRECONDITION
("try again later"); bad input gets a status the client does not retry, with a clear message,
and so does a request body that does not even parse (INVALID_ARGUMENT, see _parse_or_mark).

How: `GuardedServer` stands in for the grpc.aio server while the servicers register their
handlers, and wraps each one once (`guard`). A new RPC on a servicer is covered with no
code of its own. This is done at registration rather than by a grpc.aio.ServerInterceptor,
because grpc runs interceptors on every call (a partial, an iterator and a coroutine each
time); the wrapper here costs one coroutine per call, as a decorator would. Health and
reflection are registered on the real server and stay as grpc serves them.
"""

from __future__ import annotations

import inspect
import logging
import time

import grpc

from broker.errors import (
    BrokerUnavailable,
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    NotReady,
    TooLarge,
)
from combiner.auth import AuthUnavailable, PermissionDenied, Unauthenticated, current_caller
from combiner.metrics import RPC_SECONDS, RPCS

log = logging.getLogger("combiner")

STATUS_OF = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (NotReady, grpc.StatusCode.FAILED_PRECONDITION),
    (Conflict, grpc.StatusCode.ALREADY_EXISTS),
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BrokerUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    # The 1.0.0 client retries neither of the next two: refuse only what must be refused.
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (AuthUnavailable, grpc.StatusCode.FAILED_PRECONDITION),  # Redis trouble: try again
)
_QUIET = (NotReady, AuthUnavailable)  # FAILED_PRECONDITION that is no error of ours


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            if isinstance(exc, BrokerUnavailable):
                return code, f"storage temporarily unavailable, try again: {exc}"
            return code, str(exc)
    return grpc.StatusCode.FAILED_PRECONDITION, f"internal error, try again: {type(exc).__name__}"


async def _abort(method: str, context, exc: Exception):
    code, message = status_for(exc)
    if isinstance(exc, AuthUnavailable):
        log.warning("%s: %s", method, exc)
    elif isinstance(exc, Unauthenticated | PermissionDenied | Forbidden):
        # the reason only (never the token: combiner/auth.py messages hold none)
        log.info("%s refused: %s", method, exc)
    elif code == grpc.StatusCode.FAILED_PRECONDITION and not isinstance(exc, _QUIET):
        log.error("%s failed: %s", method, exc, exc_info=not isinstance(exc, BrokerUnavailable))
    await context.abort(code, message)


class Malformed:
    """What a unary request body that does not parse becomes (see _parse_or_mark)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _parse_or_mark(method: str, deserialize, streaming: bool):
    """deserialize, made safe for bodies that fail to parse. grpc parses a unary request
    before the handler runs and answers an exception there with UNKNOWN (and a traceback
    of its own), so such a body becomes a Malformed marker the guarded behaviour answers
    with INVALID_ARGUMENT. A streamed request is parsed as the handler iterates it: there
    InvalidInput is raised at once, inside the guard."""

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError: corrupt wire format, bad UTF-8, ...
            error = f"malformed request: {exc}"
            log.warning("%s: %s", method, error)
            if streaming:
                raise InvalidInput(error) from None
            return Malformed(error)

    return parse


_COUNTERS: dict[tuple[str, str], object] = {}  # (method, code) -> its RPCS child
_TIMERS: dict[str, object] = {}  # method -> its RPC_SECONDS child


def _record(method: str, context, started: float, failed: bool) -> None:
    code = context.code() if hasattr(context, "code") else None
    if code is None:  # no status set: finished normally, or cancelled by the client
        name = "CANCELLED" if failed else "OK"
    else:
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    # the children looked up once: labels() validates and locks on every call
    counter = _COUNTERS.get((method, name))
    if counter is None:
        counter = _COUNTERS[(method, name)] = RPCS.labels(method, name)
    timer = _TIMERS.get(method)
    if timer is None:
        timer = _TIMERS[method] = RPC_SECONDS.labels(method)
    counter.inc()
    timer.observe(time.perf_counter() - started)


async def _authenticate(auth, context) -> None:
    """Set current_caller for this call: the token's Caller, or None without auth. Set on
    every call, so no handler can see an earlier call's caller."""
    current_caller.set(None)
    if auth is not None:
        current_caller.set(await auth.authenticate(context.invocation_metadata()))


def _guard_coroutine(method: str, fn, auth):
    async def guarded(request, context):
        started, failed = time.perf_counter(), True
        try:
            await _authenticate(auth, context)  # first: before the body is even looked at
            if request.__class__ is Malformed:
                raise InvalidInput(request.error)
            reply = await fn(request, context)
            failed = False
            return reply
        except grpc.aio.AbortError:  # the handler chose its status itself
            raise
        except Exception as exc:
            await _abort(method, context, exc)
        finally:
            _record(method, context, started, failed)

    return guarded


def _guard_async_generator(method: str, fn, auth):
    async def guarded(request, context):
        started, failed = time.perf_counter(), True
        try:
            await _authenticate(auth, context)
            if request.__class__ is Malformed:
                raise InvalidInput(request.error)
            async for item in fn(request, context):
                yield item
            failed = False
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(method, context, exc)
        finally:
            _record(method, context, started, failed)

    return guarded


def guard(method: str, fn, auth=None):
    """fn (a behaviour: `fn(request or request iterator, context)`) with authentication
    (auth: an Authenticator, None for --insecure), status mapping, error logging and
    metrics under `method`. The wrapper is of fn's own kind, coroutine or async generator,
    because grpc.aio decides by that how to run a streaming handler."""
    if inspect.isasyncgenfunction(fn):
        return _guard_async_generator(method, fn, auth)
    if inspect.iscoroutinefunction(fn):
        return _guard_coroutine(method, fn, auth)
    raise TypeError(f"{method}: only async handlers are served here, not {fn!r}")


# (request_streaming, response_streaming) -> the handler's behaviour field and its factory
_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def guard_handler(method: str, handler: grpc.RpcMethodHandler, auth=None) -> grpc.RpcMethodHandler:
    """The same handler (kind, serializer or none) with its behaviour guarded and its
    deserializer made to answer a body that does not parse with INVALID_ARGUMENT."""
    field, make = _KINDS[(handler.request_streaming, handler.response_streaming)]
    deserialize = handler.request_deserializer
    if deserialize is not None:
        deserialize = _parse_or_mark(method, deserialize, handler.request_streaming)
    return make(
        guard(method, getattr(handler, field), auth),
        request_deserializer=deserialize,
        response_serializer=handler.response_serializer,
    )


class _GuardedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler's answers, guarded once per method. grpc asks the generic handlers
    only for methods that were not registered, so this is the fallback path."""

    def __init__(self, inner: grpc.GenericRpcHandler, auth=None) -> None:
        self._inner = inner
        self._auth = auth
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details):
        path = handler_call_details.method
        guarded = self._guarded.get(path)
        if guarded is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:  # not ours; not kept, as any path a client sends lands here
                return None
            guarded = self._guarded[path] = guard_handler(
                path.rsplit("/", 1)[-1], handler, self._auth
            )
        return guarded


class GuardedServer:
    """The grpc.aio server as the servicers' `add_to_server` functions see it: every
    handler they add, registered or generic, reaches the real server guarded, and
    authenticated by auth (an Authenticator; None: --insecure, nothing is checked)."""

    def __init__(self, server: grpc.aio.Server, auth=None) -> None:
        self.server = server
        self.auth = auth

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        guarded = {method: guard_handler(method, h, self.auth) for method, h in handlers.items()}
        self.server.add_registered_method_handlers(service, guarded)

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        self.server.add_generic_rpc_handlers(
            tuple(_GuardedGenericHandler(h, self.auth) for h in generic_handlers)
        )
