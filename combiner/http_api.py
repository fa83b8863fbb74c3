"""The HTTP side of a replica: token exchange and client assignment, the two endpoints the
published scaleout 1.0.0 client calls in API mode (docs/protocol.md §15, docs/operations.md
"The HTTP side").

Why aiohttp on the replica's own event loop (web.AppRunner + TCPSite), not a process of its
own: it shares the replica's broker pool and its Authenticator (one verification cache, one
revocation follower), and its traffic is tiny next to gRPC's: one refresh per access-token
lifetime and one assignment per client start. A second process would need its own Redis
pool and revocation poller for a few requests an hour per client.

Routes and answers (every answer is JSON, errors are ``{"message": ...}``):

``POST /api/auth/refresh`` ``{"refresh_token", "role"}``
    200 ``{"access_token", "expires_in", "token_type": "Bearer"}``; the refresh token is never
    rotated (the 1.0.0 CLI re-uses its ``--token`` after restarts). The record is read from
    Redis on every refresh, so a revoked or expired refresh token is refused at once.
    401 unknown, revoked or expired refresh token; 403 a role above the token's (a client
    token asking for "admin"; an admin token may ask for "client" and gets a client-role
    access token); 400 bad input, or --insecure (tokens are off); 429 + Retry-After after
    repeated failures from one address; 503 + Retry-After when Redis cannot be asked or this
    replica has no signing key.
``POST /api/v1/clients/add`` with ``Authorization: Bearer <access token>``
    200 ``{"client_id": <the token's subject, whatever the body says>, "public_hostname",
    "internal_hostname", "port", "package", "helper_type": "numpyhelper", "name"}``;
    ``package`` is what the client asked: "remote" (no --local-package) fetches the active
    compute package from ``/api/v1/packages/download`` (combiner/control_api.py).
    401 no or a bad access token; 400 bad input; 203 for "remote" while no package was
    uploaded yet, and when the token cannot be checked now (Redis): the 1.0.0 client reads
    203 as "package missing" and retries every 3 s, the only answer it retries (any other
    status, 5xx included, makes it stop, and an unknown one crashes it).
The control-plane routes of the published APIClient: combiner/control_api.py.
Anything else: 404, or 405 for a known path with another method; bodies over
``MAX_BODY`` bytes: 413. What does not even parse as HTTP (a header over
``MAX_HEADER_BYTES``, a broken request line) gets aiohttp's own plain-text 400 before any of
this code runs. Client input never gets a 5xx; an unexpected error is a 500 with a JSON
message (and a logged traceback, never a request body or header).

Nothing here logs a token: aiohttp's access log writes the request line, status and size
only (no body, no headers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING

from aiohttp import web

from broker import BrokerError
from broker.records import Role, TokenStatus
from combiner import __version__
from combiner.auth import AuthUnavailable, Unauthenticated, bearer
from combiner.openapi import SPEC_PATH, STR, Doc, describe, documented, obj
from combiner.signing import SigningKey

if TYPE_CHECKING:
    from combiner.server import Replica

log = logging.getLogger("combiner.http")

MAX_BODY = 64 * 1024  # the 1.0.0 client's requests are ~200 bytes
# A header line may be this long, so a 64 KiB Authorization still reaches the middleware
# (a JSON 401); longer ones get aiohttp's own plain-text 400 before any handler runs.
MAX_HEADER_BYTES = 72 * 1024
MAX_FIELD_CHARS = 1024  # a string field longer than this is refused (ids are capped lower)
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'  # request line only: no headers, no body
ADD_RETRY_STATUS = 203  # what the 1.0.0 client retries (every 3 s), see the docstring


def error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"message": message}, status=status, headers=headers)


@web.middleware
async def json_errors(request: web.Request, handler):
    """Every answer JSON, whatever went wrong: the router's 404/405, aiohttp's 413, and
    exceptions nobody expected (500, logged without the request's body or headers)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {
            404: f"no such endpoint: {request.path[:200]}",
            405: f"method {request.method} not allowed here",
            413: f"request body over {MAX_BODY} bytes",
        }.get(exc.status, exc.reason)
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return error(exc.status, message, headers)
    except Exception:
        log.exception("http: %s %s failed", request.method, request.path[:200])
        return error(500, "internal error")


class BadRequest(Exception):
    """Input that cannot be a request of the 1.0.0 client: answered 400 with the message."""


async def read_json(request: web.Request) -> dict:
    if request.content_type != "application/json":
        raise BadRequest("Content-Type must be application/json")
    body = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge (413)
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    return value


def text_field(body: dict, name: str, required: bool = False) -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"{name} is required")
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    if len(value) > MAX_FIELD_CHARS:
        raise BadRequest(f"{name} is longer than {MAX_FIELD_CHARS} characters")
    if required and not value:
        raise BadRequest(f"{name} is required")
    return value


class FailureLimiter:
    """Failed refreshes per remote address: the first ``free`` answer as usual, then the
    address is refused (429) for 1, 2, 4 ... up to ``max_block`` seconds after each further
    failure. Memory is bounded: at most ``max_entries`` addresses, the oldest dropped first.
    Refused requests do not count (a blocked address cannot extend its own block)."""

    def __init__(self, free: int = 5, max_block: float = 300.0, max_entries: int = 10_000):
        self.free = free
        self.max_block = max_block
        self.max_entries = max_entries
        self._failures: dict[str, tuple[int, float]] = {}  # address -> (count, last, monotonic)

    def _block(self, count: int) -> float:
        if count < self.free:
            return 0.0
        return min(self.max_block, 2.0 ** (count - self.free))

    def retry_after(self, address: str) -> float:
        """Seconds this address must wait (0: it may try now)."""
        entry = self._failures.get(address)
        if entry is None:
            return 0.0
        count, last = entry
        return max(0.0, last + self._block(count) - time.monotonic())

    def failed(self, address: str) -> None:
        now = time.monotonic()
        count, _ = self._failures.pop(address, (0, now))
        if len(self._failures) >= self.max_entries:
            self._forget(now)
        self._failures[address] = (count + 1, now)  # re-inserted: newest last

    def _forget(self, now: float) -> None:
        # An address idle for its block plus 10 minutes starts afresh.
        for address, (count, last) in list(self._failures.items()):
            if now - last > self._block(count) + 600:
                del self._failures[address]
        while len(self._failures) >= self.max_entries:
            del self._failures[next(iter(self._failures))]

    def __len__(self) -> int:
        return len(self._failures)


def load_key(path: str, audience: str) -> SigningKey:
    """The key file, created if missing. Replicas sharing one file (a volume) may start at
    once: the one that loses the race to create it reads the winner's."""
    for _ in range(50):
        try:
            return SigningKey.load_or_create(path, audience)
        except FileExistsError:
            pass
        except ValueError:  # the winner has not finished writing it
            pass
        time.sleep(0.05)
    return SigningKey.load_or_create(path, audience)


# What the 1.0.0 client posts to /api/v1/clients/add (docs/protocol.md §15).
ADD_BODY = obj(name=STR, client_id=STR, preferred_combiner=STR, package=STR, client_version=STR)


class HttpApi:
    """The HTTP side of one replica, started and stopped with it (combiner/server.py)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.opts = replica.opts
        self.credentials = replica.broker.credentials
        self.signing_key: SigningKey | None = None
        self.limiter = FailureLimiter()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors])
        self.app.router.add_post("/api/auth/refresh", self.refresh)
        self.app.router.add_post("/api/v1/clients/add", self.add_client)
        from combiner.control_api import ControlApi  # the APIClient's routes (docs/api.md)

        ControlApi(self).add_routes(self.app.router)
        self.app.router.add_get(SPEC_PATH, self.openapi_json)

    def openapi(self) -> dict:
        """The OpenAPI description of every route above (combiner/openapi.py)."""
        return describe(self.app, __version__)

    async def openapi_json(self, request: web.Request) -> web.Response:
        return web.json_response(self.openapi())

    async def start(self) -> int:
        opts = self.opts
        if opts.signing_key and not opts.insecure:
            self.signing_key = await asyncio.to_thread(load_key, opts.signing_key, opts.audience)
            # Every replica verifies with the public keys in Redis, whoever minted.
            await self.credentials.publish_key(self.signing_key.kid, self.signing_key.public_pem)
            log.info("http: signing access tokens with key %s", self.signing_key.kid)
        elif not opts.insecure:
            log.warning("http: no --signing-key: POST /api/auth/refresh is refused here")
        # The replica's certificate files (combiner/tls.py): renewed files are re-loaded
        # into this context by the replica's TLS watch, without a restart.
        tls = self.replica.tls
        context = tls.ssl_context() if tls is not None else None
        # lingering_time: how long a request answered before its body was read (413) may
        # keep sending it, read and dropped, so that its client can read the answer.
        # aiohttp's 10 s held a replica's stop that long when a client stopped sending
        # (measured in tests/test_http_api.py's 4 MiB case); 2 s is plenty on a live link.
        self._runner = web.AppRunner(
            self.app, access_log=logging.getLogger("combiner.http.access"),
            access_log_format=ACCESS_LOG_FORMAT, handle_signals=False,
            max_field_size=MAX_HEADER_BYTES, max_line_size=8190, lingering_time=2.0,
        )  # fmt: skip
        await self._runner.setup()
        site = web.TCPSite(self._runner, opts.host, opts.http_port, ssl_context=context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("http: serving on %s:%d%s", opts.host, self.port, " (TLS)" if context else "")
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def remote(self, request: web.Request) -> str:
        """Whom to blame for failures: the peer, or with --trust-forwarded-for the last
        address the proxy appended to X-Forwarded-For (earlier ones are the client's word)."""
        if self.opts.trust_forwarded_for:
            forwarded = request.headers.get("X-Forwarded-For", "")
            last = forwarded.rsplit(",", 1)[-1].strip()
            if last:
                return last[:64]
        return request.remote or "?"

    # --- POST /api/auth/refresh ----------------------------------------------------------

    @documented(
        Doc(
            summary="Trade a refresh token for a short-lived access token (a JWT)",
            auth="refresh",
            body=obj("refresh_token", refresh_token=STR, role={"enum": ["client", "admin"]}),
        )
    )
    async def refresh(self, request: web.Request) -> web.Response:
        address = self.remote(request)
        wait = self.limiter.retry_after(address)
        if wait > 0:
            return error(
                429, "too many failed refreshes from this address, try later",
                {"Retry-After": str(max(1, round(wait)))},
            )  # fmt: skip
        try:
            body = await read_json(request)
            token = text_field(body, "refresh_token", required=True)
            role = text_field(body, "role")
        except BadRequest as exc:
            self.limiter.failed(address)
            return error(400, str(exc))
        if role and role not in tuple(Role):
            self.limiter.failed(address)
            return error(400, f"role must be one of {', '.join(Role)}")
        if self.opts.insecure:
            return error(400, "this tier runs with --insecure: tokens are off, start without one")
        if self.signing_key is None:
            return error(
                503, "this replica has no signing key (--signing-key)", {"Retry-After": "5"}
            )
        try:
            record = await self.credentials.lookup(token)
        except BrokerError as exc:
            log.warning("http: refresh: cannot read the token store: %s", exc)
            return error(503, "token store unavailable, try again", {"Retry-After": "1"})
        if record is None or not record.usable(time.time()):
            self.limiter.failed(address)
            if record is None:
                reason = "unknown refresh token"
            elif record.status == TokenStatus.REVOKED:
                reason = "refresh token revoked"
            else:
                reason = "refresh token expired"
            log.info(
                "http: refresh refused from %s: %s%s", address, reason,
                f" (token {record.id}, client {record.client_id[:80]!r})" if record else "",
            )  # fmt: skip
            return error(401, reason)
        granted = role or record.role
        if granted != record.role and not (record.role == Role.ADMIN and granted == Role.CLIENT):
            self.limiter.failed(address)
            return error(403, f"this token's role is {record.role}, not {granted}")
        access = self.signing_key.mint(record.client_id, granted, record.id, self.opts.access_ttl)
        log.debug("http: access token for client %r (token %s)", record.client_id, record.id)
        return web.json_response(
            {"access_token": access.token, "expires_in": access.expires_in, "token_type": "Bearer"},
            headers={"Cache-Control": "no-store"},
        )

    # --- POST /api/v1/clients/add --------------------------------------------------------

    @documented(
        Doc(
            summary="Assign the calling client to a replica address; 203 while a client "
            "asking for the remote package must wait for one",
            auth="token",
            body=ADD_BODY,
            ok=(200, 203),
        )
    )
    async def add_client(self, request: web.Request) -> web.Response:
        auth = self.replica.auth
        caller = None
        if auth is not None:  # checked before the body is read: no token, no parsing
            try:
                values = request.headers.getall("Authorization", ())
                caller = await auth.verify(bearer([("authorization", v) for v in values]))
            except Unauthenticated as exc:
                return error(401, str(exc), {"WWW-Authenticate": "Bearer"})
            except AuthUnavailable as exc:
                return error(ADD_RETRY_STATUS, f"{exc} (retrying)")
        try:
            body = await read_json(request)
            fields = {
                name: text_field(body, name)
                for name in ("name", "client_id", "preferred_combiner", "package", "client_version")
            }
        except BadRequest as exc:
            return error(400, str(exc))
        if fields["package"] == "remote":
            try:
                remote = bool(await self.replica.broker.catalog.active_package())
            except BrokerError as exc:
                return error(ADD_RETRY_STATUS, f"{exc} (retrying)")
            if not remote:  # the client retries every 3 s until an operator uploads one
                return error(ADD_RETRY_STATUS, "no compute package yet: upload one (docs/api.md)")
        if fields["package"] not in ("", "local", "remote"):
            return error(400, "package must be 'local' or 'remote'")
        if caller is not None:
            client_id = caller.client_id  # the token says who this is, not the body
        else:  # --insecure: the client's word
            client_id = fields["client_id"] or str(uuid.uuid4())
        host = self.opts.public_host or self.opts.host
        log.info("http: client %r assigned to %s", client_id[:80], host)
        return web.json_response(
            {
                "client_id": client_id,
                "name": fields["name"] or client_id,
                "public_hostname": host,
                "internal_hostname": host,
                "port": self.opts.public_port or self.replica.port,
                "package": fields["package"] or "local",
                "helper_type": "numpyhelper",
            }
        )
