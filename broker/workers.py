"""Which workers are alive, and how their roles are doing: each keeps a lease in
``P:workers`` and a record in ``P:worker:W`` that it rewrites every few seconds, as the
replicas do (broker/leases.py, docs/redis.md)."""

from __future__ import annotations

import json
import os
import time

from broker.context import Context
from broker.leases import Leases
from broker.records import WorkerRecord


class Workers:
    def __init__(self, ctx: Context) -> None:
        self._leases = Leases(ctx, ctx.keys.workers, ctx.keys.worker, WorkerRecord)

    async def register(
        self, worker_id: str, started: float, roles: dict[str, str], lease: float
    ) -> None:
        """Announce (or renew) a worker for ``lease`` seconds with its roles' health."""
        record = WorkerRecord(
            id=worker_id,
            pid=str(os.getpid()),
            started=f"{started:.3f}",
            seen=f"{time.time():.3f}",
            roles=json.dumps(roles, sort_keys=True),
        )
        await self._leases.renew(worker_id, record, lease)

    async def deregister(self, worker_id: str) -> None:
        await self._leases.drop(worker_id)

    async def alive(self) -> list[WorkerRecord]:
        """Workers whose lease has not expired, in id order."""
        return await self._leases.alive()
