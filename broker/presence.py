"""Who is online: last seen per client, Announce Connect/Disconnect, open TaskStreams.

Every RPC is a liveness signal (docs/protocol.md §5). A client is online while its last contact
is within ``offline_after`` seconds or it holds an open TaskStream (a lease the serving
replica keeps renewing). Writes are throttled per client per replica, since telemetry alone
arrives every 5 s per client and last_seen needs no finer grain than a second.
"""

from __future__ import annotations

from broker.context import Context, now, now_str, text, text_map
from broker.limits import check_ids


class Presence:
    def __init__(self, ctx: Context, replica_id: str) -> None:
        self._ctx = ctx
        self._replica = replica_id
        self._last_write: dict[str, float] = {}
        # client id -> last time this replica served it (local only: a replica's client
        # count in P:replica:R costs no Redis work per call)
        self._served: dict[str, float] = {}

    def served(self, client_id: str, at: float | None = None) -> None:
        """Count one call of this client on this replica."""
        self._served[client_id] = now() if at is None else at

    def served_count(self) -> int:
        """Distinct clients this replica served within offline_after (forgets older ones)."""
        cutoff = now() - self._ctx.settings.offline_after
        stale = [c for c, t in self._served.items() if t < cutoff]
        for c in stale:
            del self._served[c]
        return len(self._served)

    def touch_commands(self, pipe, client_id: str, name: str = "") -> None:
        """Queue the presence writes for one contact, unless written very recently."""
        t = now()
        self._served[client_id] = t
        if t - self._last_write.get(client_id, 0.0) < self._ctx.settings.presence_every:
            return
        if len(self._last_write) > 200_000:
            self._last_write.clear()
        self._last_write[client_id] = t
        keys = self._ctx.keys
        fields = {"id": client_id, "last_seen": f"{t:.6f}", "status": "online"}
        fields["replica"] = self._replica
        if name:
            fields["name"] = name
        pipe.hset(keys.client(client_id), mapping=fields)
        pipe.zadd(keys.clients(keys.partition_of(client_id)), {client_id: t})

    def forget_throttle(self, client_id: str) -> None:
        self._last_write.pop(client_id, None)

    async def submit(self, client_id: str, build):
        """Batch build's commands; if they fail, the presence write they may have carried
        did not happen, so the next contact must write it (no throttle)."""
        try:
            return await self._ctx.batcher.submit(build)
        except BaseException:
            self.forget_throttle(client_id)
            raise

    async def touch(self, client_id: str, name: str = "") -> None:
        check_ids(client_id=client_id, name=name)
        await self.submit(client_id, lambda pipe: self.touch_commands(pipe, client_id, name))

    async def connect(self, client_id: str, name: str = "") -> None:
        check_ids(client_id=client_id, name=name)
        keys, t = self._ctx.keys, now_str()
        self.forget_throttle(client_id)

        def build(pipe):
            self.touch_commands(pipe, client_id, name)
            pipe.hset(keys.client(client_id), "connected_at", t)
            self._event_commands(pipe, client_id, "connect")

        await self.submit(client_id, build)

    async def disconnect(self, client_id: str) -> None:
        """Announce Disconnect: offline at once; workers time out its tasks."""
        check_ids(client_id=client_id)
        keys = self._ctx.keys
        self.forget_throttle(client_id)
        self._served.pop(client_id, None)  # it said goodbye: no longer one of ours

        def build(pipe):
            pipe.hset(
                keys.client(client_id),
                mapping={"id": client_id, "status": "offline", "disconnected_at": now_str()},
            )
            # offline at once, still listed
            pipe.zadd(keys.clients(keys.partition_of(client_id)), {client_id: 0})
            self._event_commands(pipe, client_id, "disconnect")

        await self._ctx.batcher.submit(build)

    def _event_commands(self, pipe, client_id: str, event: str) -> None:
        keys = self._ctx.keys
        pipe.xadd(
            keys.inbound("presence", keys.partition_of(client_id)),
            {"client_id": client_id, "event": event, "replica": self._replica, "ts": now_str()},
            maxlen=self._ctx.settings.stream_maxlen,
            approximate=True,
        )

    async def renew_streams(self, client_ids: list[str], lease: float) -> None:
        """Keep the TaskStream leases (and last_seen) of this replica's open streams."""
        if not client_ids:
            return
        keys, t = self._ctx.keys, now()
        for c in client_ids:
            self.served(c, t)

        by_partition: dict[int, list[str]] = {}
        for c in client_ids:
            by_partition.setdefault(keys.partition_of(c), []).append(c)

        def build(pipe):
            for p, ids in by_partition.items():
                pipe.zadd(keys.streams(p), {c: t + lease for c in ids})
                pipe.zadd(keys.clients(p), {c: t for c in ids})

        await self._ctx.batcher.submit(build)

    async def end_stream(self, client_id: str) -> None:
        keys = self._ctx.keys
        await self._ctx.batcher.submit(
            lambda pipe: pipe.zrem(keys.streams(keys.partition_of(client_id)), client_id)
        )

    async def online(self) -> list[str]:
        """Ids of clients online now: recent contact or an open TaskStream."""
        keys, t = self._ctx.keys, now()
        seen_after = t - self._ctx.settings.offline_after

        async def read():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for p in keys.all_partitions:
                pipe.zrangebyscore(keys.clients(p), seen_after, "+inf")
                pipe.zrangebyscore(keys.streams(p), t, "+inf")
            return await pipe.execute()

        return sorted({text(c) for ids in await self._ctx.call(read) for c in ids})

    async def client(self, client_id: str) -> dict[str, str]:
        raw = await self._ctx.call(self._ctx.redis.hgetall, self._ctx.keys.client(client_id))
        return text_map(raw)

    async def client_map(self, client_ids: list[str]) -> dict[str, dict[str, str]]:
        """Many clients' records in one round trip (control-plane listings)."""
        if not client_ids:
            return {}
        keys = self._ctx.keys

        async def read():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for c in client_ids:
                pipe.hgetall(keys.client(c))
            return await pipe.execute()

        raws = await self._ctx.call(read)
        return {c: text_map(raw) for c, raw in zip(client_ids, raws, strict=True)}

    async def mark_offline(self) -> int:
        """Flip the status of clients silent for longer than offline_after; returns how many."""
        keys = self._ctx.keys
        cutoff = now() - self._ctx.settings.offline_after

        async def sweep():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for p in keys.all_partitions:
                pipe.zrangebyscore(keys.clients(p), "-inf", cutoff)
            stale = [c for ids in await pipe.execute() for c in ids]
            if not stale:
                return 0
            pipe = self._ctx.redis.pipeline(transaction=False)
            for c in stale:
                pipe.hget(keys.client(text(c)), "status")
            statuses = await pipe.execute()
            flip = [text(c) for c, s in zip(stale, statuses, strict=True) if text(s) == "online"]
            if flip:
                pipe = self._ctx.redis.pipeline(transaction=False)
                for c in flip:
                    pipe.hset(keys.client(c), "status", "offline")
                await pipe.execute()
            return len(flip)

        return await self._ctx.call(sweep)

    async def clients(self) -> dict[str, float]:
        """Every client ever seen (and not disconnected) -> last seen."""
        keys = self._ctx.keys

        async def read():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for p in keys.all_partitions:
                pipe.zrange(keys.clients(p), 0, -1, withscores=True)
            return await pipe.execute()

        return {text(c): float(s) for got in await self._ctx.call(read) for c, s in got}
