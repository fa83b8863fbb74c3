"""Inbound streams: every message a client sends lands in ``P:{T}:in:<kind>`` before the RPC
answers OK. Workers consume them with consumer groups."""

from __future__ import annotations

from broker.codec import encode_entry
from broker.consumers import Entry, StreamGroup
from broker.context import Context, now_str, text
from broker.errors import Forbidden, InvalidInput, NotFound
from broker.keys import INBOUND_KINDS
from broker.limits import DATA_BYTES, TEXT_BYTES, check_fields, check_ids
from broker.presence import Presence

# Bytes one client message may take in its stream: the whole entry, field names and values
# as stored (packed maps packed). What the 1.0.0 client sends is a few hundred bytes to a few
# KiB. Each cap leaves room for one field at its own limit (broker/limits.py) plus the
# others, so it bounds what many fields together add; results' data and an update's meta are
# stored twice (stream entry and task), hence counted so (docs/operations.md, "Slow
# TaskStream readers and inbound sizes"). A message over its cap is refused before anything
# is written.
_SMALL = TEXT_BYTES + (16 << 10)
_RESULT = 2 * DATA_BYTES + TEXT_BYTES
ENTRY_LIMITS = {
    "statuses": _SMALL,
    "metrics": _SMALL,
    "telemetry": _SMALL,
    "attributes": _SMALL,
    "updates": _RESULT,
    "validations": _RESULT,
    "predictions": _RESULT,
}


def _size(value) -> int:
    if isinstance(value, bytes):
        return len(value)
    return len(str(value).encode())


def check_size(kind: str, items) -> None:
    """Raise InvalidInput when the (name, value) pairs of one message exceed its kind's cap."""
    limit = ENTRY_LIMITS.get(kind)
    if limit is None:
        return
    size = sum(_size(k) + _size(v) for k, v in items)
    if size > limit:
        raise InvalidInput(f"{kind} message of {size} bytes is too large: at most {limit}")


def _refuse(why: str, client_id: str, correlation_id: str, model_id: str) -> None:
    """What ingest_result.lua's strict refusal means. NotFound for a task that is not the
    client's, whoever's it is: no answer tells one client about another's tasks."""
    if why == "task":
        raise NotFound(f"no task {correlation_id[:80]!r} of client {client_id[:80]!r}")
    if why == "nomodel":
        raise NotFound(f"no uploaded model {model_id[:80]!r}: upload it before the update")
    raise Forbidden(f"model {model_id[:80]!r} was not uploaded by client {client_id[:80]!r}")


class Inbound:
    def __init__(self, ctx: Context, presence: Presence) -> None:
        self._ctx = ctx
        self._presence = presence
        self._groups: dict[tuple[str, str], StreamGroup] = {}

    async def add(self, kind: str, client_id: str, fields: dict, name: str = "") -> str:
        """Append one message and count it as contact; returns the stream entry id.
        Nested values (metrics, attributes, telemetries: plain dicts) are packed here.
        Raises InvalidInput, before writing, for a value over its limit (broker/limits.py)."""
        check_ids(client_id=client_id, name=name)
        check_fields(fields)
        keys = self._ctx.keys
        stream = keys.inbound(kind, keys.partition_of(client_id))
        entry = {"client_id": client_id, "received_at": now_str(), **encode_entry(fields)}
        check_size(kind, entry.items())
        maxlen = self._ctx.settings.stream_maxlen

        def build(pipe):
            pipe.xadd(stream, entry, maxlen=maxlen, approximate=True)
            self._presence.touch_commands(pipe, client_id, name)
            return lambda replies: replies[0]

        return await self._presence.submit(client_id, build)

    async def add_result(
        self,
        kind: str,
        client_id: str,
        correlation_id: str,
        result: dict,
        fields: dict,
        name: str = "",
        require_model: str | None = None,
        strict: bool = False,
    ) -> bool:
        """Append a task result; keep the first one on the task it answers (for an update,
        only if the task was handed out to this client and the model ``require_model`` was
        uploaded and verified after the hand-out). Returns whether it was kept. Raises
        InvalidInput, before writing, for a value over its limit.

        strict (an authenticated sender): the task must be one of client_id's and the
        update's model one client_id uploaded; otherwise NotFound / Forbidden, and nothing
        is written (no stream entry, no presence)."""
        check_ids(client_id=client_id, correlation_id=correlation_id, name=name)
        check_ids(model_update_id=require_model or "")
        check_fields(result)
        check_fields(fields)
        keys = self._ctx.keys
        t = now_str()
        model = await self._model_meta(require_model) if require_model is not None else []
        args = [self._ctx.settings.stream_maxlen, client_id, t, "1" if strict else "0", len(result)]
        args += model or ["", "", "", ""]
        for k, v in result.items():
            args += [k, v]
        for k, v in {"client_id": client_id, "received_at": t, **fields}.items():
            args += [k, v]
        check_size(kind, zip(args[9::2], args[10::2], strict=True))
        stream = keys.inbound(kind, keys.partition_of(client_id))
        script_keys = [stream, keys.task(client_id, correlation_id)]

        if strict:
            # the presence write must wait for the script's verdict: a refused result
            # writes nothing
            reply = await self._ctx.batcher.submit(
                lambda pipe: self._ctx.scripts.call(pipe, "ingest_result", script_keys, args)
            )
            reply = reply[0]
            if not reply[0]:
                _refuse(text(reply[2]), client_id, correlation_id, require_model or "")
            await self._presence.touch(client_id, name)
            return bool(reply[1])

        def build(pipe):
            self._ctx.scripts.call(pipe, "ingest_result", script_keys, args)
            self._presence.touch_commands(pipe, client_id, name)
            return lambda replies: bool(replies[0][1])

        return await self._presence.submit(client_id, build)

    async def _model_meta(self, model_id: str) -> list[str]:
        """What ingest_result.lua needs of an update's model (ARGV 6-9). Read before the
        script, since the model's keys are in another slot; its uploader never changes
        once recorded (model_begin.lua), and state and committed_at only matter as they
        are now: a model committed after this read is newer than the task anyway."""
        uploader, state, committed, exists = await self._ctx.call(self._read_meta, model_id)
        if not exists:
            return ["none", "", "", ""]
        known = "meta" if uploader is not None else "anonymous"
        return [known, *map(text, (uploader, state, committed))]

    async def _read_meta(self, model_id: str):
        pipe = self._ctx.redis.pipeline(transaction=False)
        pipe.hmget(self._ctx.keys.model(model_id), "uploader", "state", "committed_at")
        pipe.exists(self._ctx.keys.model(model_id))
        (uploader, state, committed), exists = await pipe.execute()
        return uploader, state, committed, exists

    # --- consumer groups over every inbound stream (the workers' side) ---------------------

    def _group(self, group: str, consumer: str = "") -> StreamGroup:
        key = (group, consumer)
        if key not in self._groups:
            self._groups[key] = StreamGroup(self._ctx, group, consumer, INBOUND_KINDS)
        return self._groups[key]

    async def ensure_group(self, group: str) -> None:
        """Create the consumer group on every inbound stream (from the start), if missing."""
        await self._group(group).ensure()

    async def read(
        self, group: str, consumer: str, count: int = 200, block_ms: int = 1000
    ) -> list[Entry]:
        """New entries for this consumer: (kind, entry id, fields), msgpack fields unpacked."""
        return await self._group(group, consumer).read(count, block_ms)

    async def claim(
        self, group: str, consumer: str, min_idle: float, count: int = 200
    ) -> list[Entry]:
        """Entries other consumers left pending for longer than min_idle seconds."""
        return await self._group(group, consumer).claim(min_idle, count)

    async def ack(self, group: str, entries: list[Entry]) -> None:
        await self._group(group).ack(entries)

    async def lag(self, group: str) -> dict[str, dict]:
        """Per inbound stream: its length, and the group's pending count and lag."""
        return await self._group(group).lag()
