"""Processes that announce themselves with a lease: each keeps its id in a sorted set (score:
when the lease ends) and its record in a hash that expires with it. Replicas and workers
register this way (broker/replicas.py, broker/workers.py; keys in docs/redis.md)."""

from __future__ import annotations

import time
from collections.abc import Callable

from broker.context import Context, text, text_map


class Leases:
    def __init__(self, ctx: Context, index: str, record_key: Callable[[str], str], record_type):
        self._ctx = ctx
        self._index = index
        self._record_key = record_key
        self._type = record_type

    async def renew(self, member: str, record, lease: float) -> None:
        """Announce (or renew) ``member`` for ``lease`` seconds with its record."""
        key = self._record_key(member)

        async def write():
            pipe = self._ctx.pipeline()
            pipe.zadd(self._index, {member: time.time() + lease})
            pipe.hset(key, mapping=record.to_hash())
            pipe.expire(key, int(lease) + 1)
            await pipe.execute()

        await self._ctx.call(write)

    async def drop(self, member: str) -> None:
        async def delete():
            pipe = self._ctx.pipeline()
            pipe.zrem(self._index, member)
            pipe.delete(self._record_key(member))
            await pipe.execute()

        await self._ctx.call(delete)

    async def alive(self) -> list:
        """The records of members whose lease has not ended, in id order."""
        now = time.time()
        listed = await self._ctx.call(self._ctx.redis.zrange, self._index, 0, -1, withscores=True)
        ids = [text(member) for member, ends in listed if ends >= now]
        if not ids:
            return []

        async def read():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for member in ids:
                pipe.hgetall(self._record_key(member))
            return await pipe.execute()

        out = []
        for member, raw in zip(ids, await self._ctx.call(read), strict=True):
            if not raw:
                continue  # its record expired between the two reads
            record = self._type.from_hash(text_map(raw))
            record.id = member
            out.append(record)
        return out
