"""Who is calling: access-token verification, cached per token, and the revocations every
replica follows (docs/security.md).

A token is verified once (signature, issuer, audience, times, the signing key looked up in
Redis on first sight of its key id) and then served from a bounded cache until it expires.
Revocation is followed by polling one counter (``P:auth:revocations``) every 0.25 s, and
re-reading the revoked ids when it moved, so a revocation reaches every replica within
about half a second; a replica that could not read the counter for ``stale_after`` seconds
refuses with FAILED_PRECONDITION rather than let a revoked token through.

Status mapping (docs/protocol.md §15: the 1.0.0 client retries neither UNAUTHENTICATED nor
PERMISSION_DENIED, and dies on UNAVAILABLE): a token that cannot be good is
Unauthenticated; a good token used for another client is PermissionDenied; trouble asking
Redis is AuthUnavailable, which the guard answers with FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import jwt

from broker import BrokerError
from broker.records import Role
from combiner.signing import ALGORITHM, DEFAULT_AUDIENCE, ISSUER, load_public

log = logging.getLogger("combiner")

MAX_TOKEN_CHARS = 4096  # an access token is ~400 characters; a 64 KiB header is refused
LEEWAY = 5  # seconds of clock difference between the replica that minted and this one


class AuthError(Exception):
    """Base for the errors of this module (not a BrokerError: the guard maps them itself)."""


class Unauthenticated(AuthError):
    """No token, or one that cannot be good: missing, malformed, expired, revoked, forged."""


class PermissionDenied(AuthError):
    """A good token, used for something its client may not do."""


class AuthUnavailable(AuthError):
    """Redis could not be asked (a new signing key, the revocations): try again."""


@dataclass(frozen=True, slots=True)
class Caller:
    client_id: str
    role: str
    token_id: str
    expires_at: float
    key_id: str


# The caller of the RPC being served, set by the guard (combiner/errors.py) for the handler.
current_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "current_caller", default=None
)


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token in the ``authorization`` metadata: "<scheme> <token>" (the 1.0.0 client
    sends "Bearer", or $SCALEOUT_AUTH_SCHEME). Over TLS it sends the header twice,
    identical; two different values are refused."""
    values = {v for k, v in (metadata or ()) if k == "authorization"}
    if not values:
        raise Unauthenticated("missing authorization metadata: run the client with a token")
    if len(values) > 1:
        raise Unauthenticated("several different authorization values")
    value = values.pop()
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if not scheme or not token or " " in token:
        raise Unauthenticated("authorization must be '<scheme> <access token>'")
    return token


class Authenticator:
    def __init__(
        self,
        credentials,
        audience: str = DEFAULT_AUDIENCE,
        cache_size: int = 100_000,
        poll_every: float = 0.25,
        stale_after: float = 2.0,
    ) -> None:
        self._credentials = credentials
        self._audience = audience
        self._cache: dict[str, Caller] = {}
        self._cache_size = cache_size
        self._verifying_keys: dict[str, object] = {}  # key id -> public key
        self._unknown_keys: dict[str, float] = {}  # key id -> when Redis said it has none
        self._poll_every = poll_every
        self._stale_after = stale_after
        self._epoch: int | None = None
        self._revoked: set[str] = set()
        self._fresh_at = float("-inf")
        self._listeners: list[Callable[[set[str]], None]] = []
        self._task: asyncio.Task | None = None

    # --- revocations ---------------------------------------------------------------------

    def on_revoke(self, listener: Callable[[set[str]], None]) -> None:
        """Call listener with the newly revoked token ids (e.g. to end their TaskStreams)."""
        self._listeners.append(listener)

    async def refresh_revocations(self) -> None:
        epoch, revoked = await self._credentials.revocations(self._epoch)
        self._fresh_at = time.monotonic()
        if revoked is None:
            return
        new = revoked - self._revoked
        self._epoch, self._revoked = epoch, revoked
        if self._verifying_keys:  # a key may have been retired (the counter moves for that too)
            known = await self._credentials.public_keys()
            retired = {kid for kid in self._verifying_keys if kid not in known}
            for kid in retired:
                del self._verifying_keys[kid]
        else:
            retired = set()
        if new or retired:
            for token, caller in list(self._cache.items()):
                if caller.token_id in new or caller.key_id in retired:
                    del self._cache[token]
            for listener in self._listeners:
                listener(new)

    async def _follow(self) -> None:
        failing = False
        while True:
            try:
                await self.refresh_revocations()
                if failing:
                    log.info("auth: revocations readable again")
                failing = False
            except BrokerError as exc:
                if not failing:
                    log.warning("auth: cannot read revocations: %s", exc)
                failing = True
            await asyncio.sleep(self._poll_every)

    async def start(self) -> None:
        """Read the revocations once (raises BrokerUnavailable if Redis is down), then follow
        them in the background."""
        await self.refresh_revocations()
        self._task = asyncio.create_task(self._follow(), name="auth-revocations")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def is_revoked(self, token_id: str) -> bool:
        return token_id in self._revoked

    # --- verification --------------------------------------------------------------------

    async def authenticate(self, metadata) -> Caller:
        return await self.verify(bearer(metadata))

    async def verify(self, token: str) -> Caller:
        caller = self._cache.get(token)
        if caller is None:
            caller = await self._decode(token)
        if caller.expires_at + LEEWAY <= time.time():
            self._cache.pop(token, None)
            raise Unauthenticated("access token expired: refresh it")
        if time.monotonic() - self._fresh_at > self._stale_after:
            raise AuthUnavailable("cannot check revocations now, try again")
        if caller.token_id in self._revoked:
            raise Unauthenticated("token revoked")
        if token not in self._cache:
            if len(self._cache) >= self._cache_size:
                self._evict()
            self._cache[token] = caller
        return caller

    def _evict(self) -> None:
        now = time.time()
        for token, caller in list(self._cache.items()):
            if caller.expires_at + LEEWAY <= now:
                del self._cache[token]
        while len(self._cache) >= self._cache_size:  # oldest entries first
            del self._cache[next(iter(self._cache))]

    async def _decode(self, token: str) -> Caller:
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated("access token too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"malformed access token: {exc}") from None
        kid = header.get("kid")
        if header.get("alg") != ALGORITHM or not isinstance(kid, str) or not kid:
            raise Unauthenticated(f"access token must be {ALGORITHM}-signed with a key id")
        key = await self._public_key(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=ISSUER,
                leeway=LEEWAY,
                options={"require": ["exp", "nbf", "iat", "iss", "aud", "sub", "tid"]},
            )
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"access token refused: {exc}") from None
        sub, tid, role = claims.get("sub"), claims.get("tid"), claims.get("role", Role.CLIENT)
        if not isinstance(sub, str) or not sub or not isinstance(tid, str) or not tid:
            raise Unauthenticated("access token lacks a client id or token id")
        if role not in tuple(Role):
            raise Unauthenticated("access token has an unknown role")
        return Caller(sub, role, tid, float(claims["exp"]), kid)

    async def _public_key(self, kid: str):
        key = self._verifying_keys.get(kid)
        if key is not None:
            return key
        refused = self._unknown_keys.get(kid)
        if refused is not None and time.monotonic() - refused < 5.0:
            raise Unauthenticated("access token signed with an unknown key")
        if len(kid) > 64:
            raise Unauthenticated("access token signed with an unknown key")
        try:
            pem = await self._credentials.public_key(kid)
        except BrokerError as exc:
            raise AuthUnavailable(f"cannot look up the signing key now, try again: {exc}") from None
        if pem is None:
            if len(self._unknown_keys) > 1000:
                self._unknown_keys.clear()
            self._unknown_keys[kid] = time.monotonic()
            raise Unauthenticated("access token signed with an unknown key")
        key = load_public(pem)
        self._verifying_keys[kid] = key
        return key


def bind(caller: Caller, **client_ids: str) -> None:
    """Every client id a call names (metadata, body fields) must be the caller's own."""
    for field, value in client_ids.items():
        if value and value != caller.client_id:
            raise PermissionDenied(
                f"{field} {value[:80]!r} is not the token's client {caller.client_id[:80]!r}"
            )
