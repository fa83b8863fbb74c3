"""Consumer groups over the inbound streams (XREADGROUP / XACK / XAUTOCLAIM).

Each worker is one consumer in a group; an entry a dead consumer left pending is claimed
by another after ``min_idle`` seconds, so nothing read is lost when a worker dies.
"""

from __future__ import annotations

import redis.exceptions as rex

from broker.codec import decode_entry
from broker.context import Context, text

Entry = tuple[str, str, dict]  # (stream kind, entry id, decoded fields)


class StreamGroup:
    def __init__(self, ctx: Context, group: str, consumer: str, kinds: tuple[str, ...]) -> None:
        self._ctx = ctx
        self.group = group
        self.consumer = consumer
        self.kinds = kinds
        self._streams = {ctx.keys.inbound(k): k for k in kinds}

    async def ensure(self) -> None:
        """Create the group on every stream (from the start), if missing."""
        for stream in self._streams:
            try:
                await self._ctx.call(
                    self._ctx.redis.xgroup_create, stream, self.group, id="0", mkstream=True
                )
            except rex.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _entries(self, reply) -> list[Entry]:
        out = []
        for stream, entries in reply or ():
            kind = self._streams[text(stream)]
            for entry_id, fields in entries:
                if fields is None:  # trimmed away while pending
                    continue
                out.append((kind, text(entry_id), decode_entry(fields)))
        return out

    async def read(self, count: int = 200, block_ms: int = 1000) -> list[Entry]:
        """New entries for this consumer: (kind, entry id, fields)."""
        try:
            reply = await self._ctx.call(
                self._ctx.redis.xreadgroup,
                self.group,
                self.consumer,
                {s: ">" for s in self._streams},
                count=count,
                block=block_ms,
            )
        except rex.ResponseError as exc:
            # NOGROUP: the stream or group is gone (Redis lost its data); UNBLOCKED: a stream
            # we were blocked on was deleted meanwhile (FLUSHDB, DEL). Recreate and go on.
            if not any(why in str(exc) for why in ("NOGROUP", "UNBLOCKED")):
                raise
            await self.ensure()
            return []
        return self._entries(reply)

    async def claim(self, min_idle: float, count: int = 200) -> list[Entry]:
        """Entries other consumers left pending for longer than min_idle seconds."""
        out = []
        for stream, _kind in self._streams.items():
            try:
                reply = await self._ctx.call(
                    self._ctx.redis.xautoclaim,
                    stream,
                    self.group,
                    self.consumer,
                    int(min_idle * 1000),
                    start_id="0-0",
                    count=count,
                )
            except rex.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                continue
            out += self._entries([(stream, reply[1])])
        return out

    async def ack(self, entries: list[Entry]) -> None:
        by_stream: dict[str, list[str]] = {}
        for kind, entry_id, _ in entries:
            by_stream.setdefault(self._ctx.keys.inbound(kind), []).append(entry_id)

        async def ack_all():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                pipe.xack(stream, self.group, *ids)
            await pipe.execute()

        if by_stream:
            await self._ctx.call(ack_all)

    async def lag(self) -> dict[str, dict]:
        """Per stream: length, and this group's pending count and lag."""
        out = {}
        for stream, kind in self._streams.items():
            info = {"length": 0, "pending": 0, "lag": None}
            try:
                info["length"] = await self._ctx.call(self._ctx.redis.xlen, stream)
                for g in await self._ctx.call(self._ctx.redis.xinfo_groups, stream):
                    g = {text(k): v for k, v in g.items()}
                    if text(g.get("name")) == self.group:
                        info["pending"] = g.get("pending", 0)
                        info["lag"] = g.get("lag")
            except rex.ResponseError:
                pass
            out[kind] = info
        return out
