"""Which front-end replicas are alive: each keeps a lease in ``P:replicas`` and a record in
``P:replica:R`` that its upkeep rewrites (docs/redis.md)."""

from __future__ import annotations

import os
import time

from broker.context import Context
from broker.leases import Leases
from broker.presence import Presence
from broker.records import ReplicaRecord


class Replicas:
    def __init__(self, ctx: Context, replica_id: str, presence: Presence) -> None:
        self._leases = Leases(ctx, ctx.keys.replicas, ctx.keys.replica, ReplicaRecord)
        self._id = replica_id
        self._presence = presence

    async def register(self, address: str, started: float, streams: int, lease: float) -> None:
        """Announce (or renew) this replica for ``lease`` seconds, with its open streams and
        the clients it served recently (counted locally by presence, no Redis work per call)."""
        record = ReplicaRecord(
            id=self._id,
            address=address,
            pid=str(os.getpid()),
            started=f"{started:.3f}",
            streams=str(streams),
            clients=str(self._presence.served_count()),
            seen=f"{time.time():.3f}",
        )
        await self._leases.renew(self._id, record, lease)

    async def deregister(self) -> None:
        await self._leases.drop(self._id)

    async def alive(self) -> list[ReplicaRecord]:
        """Replicas whose lease has not expired, in id order."""
        return await self._leases.alive()
