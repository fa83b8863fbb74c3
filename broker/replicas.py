"""Which front-end replicas are alive: each keeps a lease in ``P:replicas`` and a record in
``P:replica:R`` that its upkeep rewrites (docs/redis.md)."""

from __future__ import annotations

import os
import time

from broker.context import Context, text, text_map
from broker.presence import Presence
from broker.records import ReplicaRecord


class Replicas:
    def __init__(self, ctx: Context, replica_id: str, presence: Presence) -> None:
        self._ctx = ctx
        self._id = replica_id
        self._presence = presence

    async def register(self, address: str, started: float, streams: int, lease: float) -> None:
        """Announce (or renew) this replica for ``lease`` seconds, with its open streams and
        the clients it served recently (counted locally by presence, no Redis work per call)."""
        keys, rid = self._ctx.keys, self._id
        record = ReplicaRecord(
            id=rid,
            address=address,
            pid=str(os.getpid()),
            started=f"{started:.3f}",
            streams=str(streams),
            clients=str(self._presence.served_count()),
            seen=f"{time.time():.3f}",
        )

        async def write():
            pipe = self._ctx.redis.pipeline(transaction=True)
            pipe.zadd(keys.replicas, {rid: time.time() + lease})
            pipe.hset(keys.replica(rid), mapping=record.to_hash())
            pipe.expire(keys.replica(rid), int(lease) + 1)
            await pipe.execute()

        await self._ctx.call(write)

    async def deregister(self) -> None:
        keys, rid = self._ctx.keys, self._id

        async def delete():
            pipe = self._ctx.redis.pipeline(transaction=True)
            pipe.zrem(keys.replicas, rid)
            pipe.delete(keys.replica(rid))
            await pipe.execute()

        await self._ctx.call(delete)

    async def alive(self) -> list[ReplicaRecord]:
        """Replicas whose lease has not expired, in id order."""
        keys, now = self._ctx.keys, time.time()
        listed = await self._ctx.call(self._ctx.redis.zrange, keys.replicas, 0, -1, withscores=True)
        ids = [text(rid) for rid, expiry in listed if expiry >= now]
        if not ids:
            return []

        async def read():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for rid in ids:
                pipe.hgetall(keys.replica(rid))
            return await pipe.execute()

        out = []
        for rid, raw in zip(ids, await self._ctx.call(read), strict=True):
            record = ReplicaRecord.from_hash(text_map(raw))
            record.id = rid
            out.append(record)
        return out
