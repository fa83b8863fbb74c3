"""Credentials in Redis: refresh tokens (kept only as a hash), the public halves of the
signing keys, and the revocations every replica follows (docs/security.md, keys in
docs/redis.md).

Each command touches one key, so this works the same on one Redis, Sentinel or Cluster.
A refresh token is ``sct_`` + 32 random bytes (urlsafe base64); Redis keeps its SHA-256,
under the id made of the hash's first 16 hex digits, so neither Redis nor `token list`
can give a token back.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from broker.context import Context, text, text_map
from broker.errors import InvalidInput, NotFound
from broker.limits import check_ids
from broker.records import Role, TokenRecord, TokenStatus

TOKEN_PREFIX = "sct_"
TOKEN_ID_HEX = 16
MAX_TOKEN_CHARS = 256  # what a refresh token can be; longer input is not looked up


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class Credentials:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    # --- refresh tokens ------------------------------------------------------------------

    async def create(
        self, client_id: str, role: str = Role.CLIENT, expires_days: float | None = None
    ) -> tuple[str, TokenRecord]:
        """A new refresh token for client_id: its text (shown once) and its record."""
        if not client_id:
            raise InvalidInput("a token needs a client id")
        check_ids(client_id=client_id)
        if role not in tuple(Role):
            raise InvalidInput(f"role must be one of {', '.join(Role)}, got {role!r}")
        if expires_days is not None and expires_days <= 0:
            raise InvalidInput("expires-days must be positive")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = token_hash(token)
        now = time.time()
        record = TokenRecord(
            id=digest[:TOKEN_ID_HEX],
            hash=digest,
            client_id=client_id,
            role=role,
            created=f"{now:.3f}",
            expires=f"{now + expires_days * 86400:.3f}" if expires_days else "",
        )
        keys = self._ctx.keys

        async def write():
            pipe = self._ctx.redis.pipeline(transaction=False)
            pipe.hset(keys.token(record.id), mapping=record.to_hash())
            pipe.zadd(keys.tokens, {record.id: now})
            await pipe.execute()

        await self._ctx.call(write)
        return token, record

    async def lookup(self, token: str) -> TokenRecord | None:
        """The record of a refresh token's text, or None for one never issued (revoked and
        expired ones are returned: the caller says why it refuses them)."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_CHARS:
            return None
        digest = token_hash(token)
        key = self._ctx.keys.token(digest[:TOKEN_ID_HEX])
        raw = await self._ctx.call(self._ctx.redis.hgetall, key)
        if not raw:
            return None
        record = TokenRecord.from_hash(text_map(raw))
        return record if hmac.compare_digest(record.hash, digest) else None

    async def get(self, token_id: str) -> TokenRecord | None:
        raw = await self._ctx.call(self._ctx.redis.hgetall, self._ctx.keys.token(token_id))
        return TokenRecord.from_hash(text_map(raw)) if raw else None

    async def list(self) -> list[TokenRecord]:
        """Every token record, oldest first."""
        keys = self._ctx.keys
        ids = [text(i) for i in await self._ctx.call(self._ctx.redis.zrange, keys.tokens, 0, -1)]
        if not ids:
            return []

        async def read():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for token_id in ids:
                pipe.hgetall(keys.token(token_id))
            return await pipe.execute()

        return [TokenRecord.from_hash(text_map(raw)) for raw in await self._ctx.call(read) if raw]

    async def revoke(
        self, token: str = "", client_id: str = "", remember: float = 86400.0
    ) -> list[str]:
        """Revoke one token (its text or its id) or every token of client_id; returns the
        ids revoked. Replicas refuse access tokens made from a revoked id for ``remember``
        seconds after the revocation (longer than any access token lives)."""
        if bool(token) == bool(client_id):
            raise InvalidInput("revoke takes a token (or token id) or a client id")
        if token:
            record = await self.lookup(token) if token.startswith(TOKEN_PREFIX) else None
            record = record or await self.get(token)
            if record is None:
                raise NotFound("no such token")
            records = [record]
        else:
            records = [r for r in await self.list() if r.client_id == client_id]
            if not records:
                raise NotFound(f"no tokens for client {client_id[:80]!r}")
        keys = self._ctx.keys
        now = time.time()
        ids = [r.id for r in records]

        async def write():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for token_id in ids:
                pipe.hset(
                    keys.token(token_id),
                    mapping=TokenRecord.partial_hash(
                        status=TokenStatus.REVOKED, revoked_at=f"{now:.3f}"
                    ),
                )
            pipe.zadd(keys.revoked, {token_id: now + remember for token_id in ids})
            pipe.zremrangebyscore(keys.revoked, "-inf", now)
            pipe.incr(keys.revocations)
            await pipe.execute()

        await self._ctx.call(write)
        return ids

    async def revocations(self, seen: int | None = None) -> tuple[int, set[str] | None]:
        """The revocation counter, and the revoked token ids (None when the counter is still
        ``seen``: nothing changed, nothing more was read)."""
        keys = self._ctx.keys
        epoch = int(text(await self._ctx.call(self._ctx.redis.get, keys.revocations)) or 0)
        if seen is not None and epoch == seen:
            return epoch, None
        raw = await self._ctx.call(self._ctx.redis.zrangebyscore, keys.revoked, time.time(), "+inf")
        return epoch, {text(i) for i in raw}

    # --- signing keys (only the public halves are here) ----------------------------------

    async def publish_key(self, key_id: str, public_pem: str) -> None:
        await self._ctx.call(self._ctx.redis.hset, self._ctx.keys.signing_keys, key_id, public_pem)

    async def public_key(self, key_id: str) -> str | None:
        raw = await self._ctx.call(self._ctx.redis.hget, self._ctx.keys.signing_keys, key_id)
        return text(raw) if raw is not None else None

    async def public_keys(self) -> dict[str, str]:
        return text_map(await self._ctx.call(self._ctx.redis.hgetall, self._ctx.keys.signing_keys))

    async def retire_key(self, key_id: str) -> bool:
        """Stop accepting access tokens signed with key_id (after a rotation). The replicas
        notice through the revocation counter."""
        keys = self._ctx.keys

        async def write():
            pipe = self._ctx.redis.pipeline(transaction=False)
            pipe.hdel(keys.signing_keys, key_id)
            pipe.incr(keys.revocations)
            return (await pipe.execute())[0]

        return bool(await self._ctx.call(write))
