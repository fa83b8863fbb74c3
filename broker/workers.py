"""Which workers are alive, and how their roles are doing: each keeps a lease in
``P:workers`` and a record in ``P:worker:W`` that it rewrites every few seconds, like the
replicas do (broker/replicas.py, docs/redis.md)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from broker.context import Context, text, text_map
from broker.records import _HashRecord


@dataclass
class WorkerRecord(_HashRecord):
    """``P:worker:W``: what a live worker reports about itself."""

    id: str = ""
    pid: str = ""
    started: str = ""
    seen: str = ""
    roles: str = "{}"  # JSON: role -> "ok" | "stopped: <error>"

    @property
    def role_health(self) -> dict[str, str]:
        try:
            value = json.loads(self.roles or "{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


class Workers:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    async def register(
        self, worker_id: str, started: float, roles: dict[str, str], lease: float
    ) -> None:
        """Announce (or renew) a worker for ``lease`` seconds with its roles' health."""
        keys = self._ctx.keys
        record = WorkerRecord(
            id=worker_id,
            pid=str(os.getpid()),
            started=f"{started:.3f}",
            seen=f"{time.time():.3f}",
            roles=json.dumps(roles, sort_keys=True),
        )

        async def write():
            pipe = self._ctx.redis.pipeline(transaction=True)
            pipe.zadd(keys.workers, {worker_id: time.time() + lease})
            pipe.hset(keys.worker(worker_id), mapping=record.to_hash())
            pipe.expire(keys.worker(worker_id), int(lease) + 1)
            await pipe.execute()

        await self._ctx.call(write)

    async def deregister(self, worker_id: str) -> None:
        keys = self._ctx.keys

        async def delete():
            pipe = self._ctx.redis.pipeline(transaction=True)
            pipe.zrem(keys.workers, worker_id)
            pipe.delete(keys.worker(worker_id))
            await pipe.execute()

        await self._ctx.call(delete)

    async def alive(self) -> list[WorkerRecord]:
        """Workers whose lease has not expired, in id order."""
        keys, now = self._ctx.keys, time.time()
        listed = await self._ctx.call(self._ctx.redis.zrange, keys.workers, 0, -1, withscores=True)
        ids = [text(wid) for wid, expiry in listed if expiry >= now]
        if not ids:
            return []

        async def read():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for wid in ids:
                pipe.hgetall(keys.worker(wid))
            return await pipe.execute()

        out = []
        for wid, raw in zip(ids, await self._ctx.call(read), strict=True):
            if not raw:
                continue  # its record expired between the two reads
            record = WorkerRecord.from_hash(text_map(raw))
            record.id = wid
            out.append(record)
        return out
