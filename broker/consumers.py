"""Consumer groups over the inbound streams (XREADGROUP / XACK / XAUTOCLAIM).

Each worker is one consumer in a group; an entry a dead consumer left pending is claimed
by another after ``min_idle`` seconds, so nothing read is lost when a worker dies.

With N partitions (broker/partitions.py) every partition has its own streams and the group
exists on each. One XREADGROUP may only name streams of one Cluster slot, so a read asks
every partition without blocking, in one pipeline (one round trip per node), and waits a
little before asking again when all were empty; with one partition it blocks as before.
Entry ids are then qualified by their partition (``p:id``), since two partitions' streams
may hand out the same id.
"""

from __future__ import annotations

import asyncio
import time

import redis.exceptions as rex

from broker.codec import decode_entry
from broker.context import Context, text
from broker.retry import transient

Entry = tuple[str, str, dict]  # (stream kind, entry id, decoded fields)

# Between two rounds of non-blocking reads over the partitions, when all were empty.
IDLE_WAIT = 0.05


class StreamGroup:
    def __init__(self, ctx: Context, group: str, consumer: str, kinds: tuple[str, ...]) -> None:
        self._ctx = ctx
        self.group = group
        self.consumer = consumer
        self.kinds = kinds
        keys = ctx.keys
        self._partitioned = keys.partitions > 1
        # stream key -> (kind, partition); per partition, its streams
        self._streams = {keys.inbound(k, p): (k, p) for p in keys.all_partitions for k in kinds}
        self._by_partition = [[keys.inbound(k, p) for k in kinds] for p in keys.all_partitions]

    async def ensure(self) -> None:
        """Create the group on every stream (from the start), if missing."""

        async def create():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for stream in self._streams:
                pipe.xgroup_create(stream, self.group, id="0", mkstream=True)
            for reply in await pipe.execute(raise_on_error=False):
                if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                    raise reply

        await self._ctx.call(create)

    def _qualified(self, stream: str, entry_id: str) -> tuple[str, str]:
        kind, p = self._streams[stream]
        return kind, f"{p}:{entry_id}" if self._partitioned else entry_id

    def _stream_of(self, kind: str, entry_id: str) -> tuple[str, str]:
        """The stream key and bare id of one of our (qualified) entry ids."""
        if not self._partitioned:
            return self._ctx.keys.inbound(kind), entry_id
        p, _, bare = entry_id.partition(":")
        return self._ctx.keys.inbound(kind, int(p)), bare

    def _entries(self, reply) -> list[Entry]:
        out = []
        for stream, entries in reply or ():
            for entry_id, fields in entries:
                if fields is None:  # trimmed away while pending
                    continue
                kind, qualified = self._qualified(text(stream), text(entry_id))
                out.append((kind, qualified, decode_entry(fields)))
        return out

    async def read(self, count: int = 200, block_ms: int = 1000) -> list[Entry]:
        """New entries for this consumer: (kind, entry id, fields)."""
        try:
            if not self._partitioned:
                reply = await self._ctx.call(
                    self._ctx.redis.xreadgroup,
                    self.group,
                    self.consumer,
                    {s: ">" for s in self._streams},
                    count=count,
                    block=block_ms,
                )
                return self._entries(reply)
            deadline = time.monotonic() + block_ms / 1000
            while True:
                found = await self._ctx.call(self._read_partitions, count)
                if found or time.monotonic() >= deadline:
                    return found
                await asyncio.sleep(IDLE_WAIT)
        except rex.ResponseError as exc:
            # NOGROUP: the stream or group is gone (Redis lost its data); UNBLOCKED: a stream
            # we were blocked on was deleted meanwhile (FLUSHDB, DEL). Recreate and go on.
            if not any(why in str(exc) for why in ("NOGROUP", "UNBLOCKED")):
                raise
            await self.ensure()
            return []

    async def _read_partitions(self, count: int) -> list[Entry]:
        pipe = self._ctx.redis.pipeline(transaction=False)
        for streams in self._by_partition:
            pipe.xreadgroup(self.group, self.consumer, {s: ">" for s in streams}, count=count)
        replies = await pipe.execute(raise_on_error=False)
        error = next((r for r in replies if isinstance(r, Exception)), None)
        read = [r for r in replies if not isinstance(r, Exception)]
        out = [e for reply in read for e in self._entries(reply)]
        if error is not None and not out:
            raise error
        return out

    async def claim(self, min_idle: float, count: int = 200) -> list[Entry]:
        """Entries other consumers left pending for longer than min_idle seconds."""
        streams = list(self._streams)

        async def claim_all():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for stream in streams:
                pipe.xautoclaim(
                    stream, self.group, self.consumer, int(min_idle * 1000), "0-0", count
                )
            return await pipe.execute(raise_on_error=False)

        out = []
        for stream, reply in zip(streams, await self._ctx.call(claim_all), strict=True):
            if isinstance(reply, Exception):
                if "NOGROUP" in str(reply):
                    continue
                raise reply
            out += self._entries([(stream, reply[1])])
        return out

    async def ack(self, entries: list[Entry]) -> None:
        by_stream: dict[str, list[str]] = {}
        for kind, entry_id, _ in entries:
            stream, bare = self._stream_of(kind, entry_id)
            by_stream.setdefault(stream, []).append(bare)

        async def ack_all():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                pipe.xack(stream, self.group, *ids)
            await pipe.execute()

        if by_stream:
            await self._ctx.call(ack_all)

    async def lag(self) -> dict[str, dict]:
        """Per kind (summed over the partitions): length, and this group's pending count
        and lag (None if any partition's is unknown). One pipeline for every stream (on a
        Cluster, one round trip per node instead of two calls per stream)."""

        async def read() -> list:
            pipe = self._ctx.redis.pipeline(transaction=False)
            for stream in self._streams:
                pipe.xlen(stream)
                pipe.xinfo_groups(stream)
            replies = await pipe.execute(raise_on_error=False)
            trouble = next((r for r in replies if isinstance(r, Exception) and transient(r)), None)
            if trouble is not None:
                raise trouble  # retried with the others
            return replies

        replies = await self._ctx.call(read)
        out = {k: {"length": 0, "pending": 0, "lag": 0} for k in self.kinds}
        for i, (kind, _) in enumerate(self._streams.values()):
            info = out[kind]
            length, groups = replies[2 * i], replies[2 * i + 1]
            if not isinstance(length, Exception):
                info["length"] += length
            lag = None
            if not isinstance(groups, Exception):  # no such stream yet: its lag is unknown
                for g in groups:
                    g = {text(k): v for k, v in g.items()}
                    if text(g.get("name")) == self.group:
                        info["pending"] += g.get("pending", 0)
                        lag = g.get("lag")
            info["lag"] = None if lag is None or info["lag"] is None else info["lag"] + lag
        return out
