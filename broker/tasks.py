"""Durable per-client task queues and task records (docs/protocol.md §4.2, §6).

A task is a hash in the client's slot; the queue holds encoded correlation ids. Handing
out, reporting, aborting and timing out are Lua scripts, so a task is handed out once per
attempt even when several replicas serve the same client.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field

from broker.batching import Build
from broker.context import Context, now_str, text, text_map
from broker.errors import Conflict, Forbidden, InvalidInput
from broker.keys import encode_id
from broker.limits import DATA_BYTES, LABEL_BYTES, check, check_ids
from broker.presence import Presence
from broker.records import WIRE_FIELDS, Task

TASK_TYPES = ("Fedn_ModelUpdate", "Fedn_Validation", "Fedn_Prediction")
PUSH_PER_CALL = 200  # tasks per push.lua call
# Task data an operator may push (bytes of UTF-8, as stored). Real task data is a small JSON
# config; the cap bounds what one task costs a TaskStream, and stays below the 128 KiB a
# single command-line argument may have (`combiner task push --data`). See
# docs/operations.md, "Slow TaskStream readers and inbound sizes".
MAX_TASK_DATA = 64 << 10
# About how many bytes of task data one stream_take.lua call hands to a TaskStream.
STREAM_TAKE_BYTES = 1 << 20


@dataclass
class PollReply:
    task: Task | None = None  # a new task to start
    echo: str = ""  # correlation id of the client's current task
    status: str = ""  # '', 'INTERRUPTED' or 'TIMEOUT' with echo
    extra: dict = field(default_factory=dict)


def validate_task_type(task_type: str) -> None:
    if task_type in TASK_TYPES or (task_type.startswith("Custom_") and len(task_type) > 7):
        return
    raise InvalidInput(
        f"task type must be one of {', '.join(TASK_TYPES)} or Custom_<name>, got {task_type!r}"
    )


def _task_data(task_type: str, data: str, session_id: str, round_id: str) -> str:
    """The task's data as the client needs it; raises InvalidInput for what it would fail."""
    validate_task_type(task_type)
    if len(data.encode()) > MAX_TASK_DATA:
        raise InvalidInput(
            f"task data is {len(data.encode())} bytes; at most {MAX_TASK_DATA} are allowed"
        )
    if task_type == "Fedn_ModelUpdate" or task_type.startswith("Custom_"):
        # The client fails a training task whose data is not a JSON object (§4.3).
        try:
            parsed = json.loads(data) if data else {}
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise InvalidInput(f"task data must be a JSON object: {exc}") from exc
        if not isinstance(parsed, dict):
            raise InvalidInput("task data must be a JSON object")
        if task_type == "Fedn_ModelUpdate":
            parsed.setdefault("client_settings", {})
            if session_id:
                parsed.setdefault("session_id", session_id)
            if round_id:
                parsed.setdefault("round_id", round_id)
            data = json.dumps(parsed)
    return data


def _task_from(values: list, client_id: str) -> Task:
    return Task.from_wire([text(v) for v in values], client_id)


class TaskQueues:
    def __init__(self, ctx: Context, replica_id: str, presence: Presence) -> None:
        self._ctx = ctx
        self._replica = replica_id
        self._presence = presence  # poll and stream_take write presence in Lua: count them

    async def push(
        self,
        client_id: str,
        task_type: str,
        *,
        model_id: str = "",
        data: str = "",
        session_id: str = "",
        round_id: str = "",
        correlation_id: str = "",
    ) -> str:
        """Queue one task for one client and wake its TaskStream; returns the correlation id."""
        correlation_id = correlation_id or str(uuid.uuid4())
        [build], _ = self._push_calls(
            [client_id], [correlation_id], task_type, model_id, data, session_id, round_id
        )
        ok = await self._ctx.batcher.submit(build)
        if not ok[0][0]:
            raise Conflict(f"correlation id {correlation_id!r} is already in use")
        return correlation_id

    async def push_many(
        self,
        client_ids: list[str],
        task_type: str,
        *,
        model_id: str = "",
        data: str = "",
        session_id: str = "",
        round_id: str = "",
        correlation_ids: list[str] | None = None,
    ) -> list[str | None]:
        """The same task for many clients (a round's fan-out) in few round trips. Returns
        each task's correlation id, None where that id was already in use (pushed before).
        Bad input raises before anything is written."""
        corrs = correlation_ids or [str(uuid.uuid4()) for _ in client_ids]
        if len(corrs) != len(client_ids):
            raise InvalidInput("one correlation id per client")
        builds, order = self._push_calls(
            client_ids, corrs, task_type, model_id, data, session_id, round_id
        )
        replies = await asyncio.gather(
            *self._ctx.batcher.submit_many(builds), return_exceptions=True
        )
        queued = []
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
            queued += reply[0]
        out: list[str | None] = [None] * len(corrs)
        for i, ok in zip(order, queued, strict=True):
            out[i] = corrs[i] if ok else None
        return out

    def _push_calls(
        self, client_ids, corrs, task_type, model_id, data, session_id, round_id
    ) -> tuple[list[Build], list[int]]:
        """push.lua calls of up to PUSH_PER_CALL tasks each (a script blocks Redis while
        it runs: a few ms at most), and the index in client_ids of each task, in the order
        of the calls' replies."""
        data = _task_data(task_type, data, session_id, round_id)
        if not all(client_ids):
            raise InvalidInput("client id must not be empty")
        check_ids(model_id=model_id, session_id=session_id, round_id=round_id)
        for client, corr in zip(client_ids, corrs, strict=True):
            check_ids(client_id=client, correlation_id=corr)
        keys, now = self._ctx.keys, now_str()
        shared = {
            "type": task_type,
            "model_id": model_id,
            "data": data,
            "session_id": session_id,
            "round_id": round_id,
            "timestamp": now,
            "created_at": now,
        }
        publish = "SPUBLISH" if self._ctx.cluster else "PUBLISH"
        shared_args = [2 * len(shared)]
        for k, v in shared.items():
            shared_args += [k, v]
        # one script call touches one partition (one Cluster slot)
        by_partition: dict[int, list[tuple[int, str, str]]] = {}
        for i, (client, corr) in enumerate(zip(client_ids, corrs, strict=True)):
            by_partition.setdefault(keys.partition_of(client), []).append((i, client, corr))
        builds, order = [], []
        for p, pairs in by_partition.items():
            head = [self._ctx.settings.task_ttl, keys.wake(p), publish, *shared_args]
            for start in range(0, len(pairs), PUSH_PER_CALL):
                task_keys, args = [], list(head)
                for i, client, corr in pairs[start : start + PUSH_PER_CALL]:
                    task_keys += [
                        keys.task(client, corr),
                        keys.queue(client),
                        keys.taskref(corr, p),
                        keys.given_models(client),
                    ]
                    args += [encode_id(corr), encode_id(client), corr, client]
                    order.append(i)
                builds.append(
                    lambda pipe, k=task_keys, a=args: self._ctx.scripts.call(pipe, "push", k, a)
                )
        return builds, order

    async def poll(
        self,
        client_id: str,
        *,
        name: str = "",
        correlation_id: str = "",
        status: str = "",
        done: bool = False,
        response: str = "",
        strict: bool = False,
    ) -> PollReply:
        """One PollAndReport, as one script call shared with concurrent RPCs' pipelines.

        strict (an authenticated caller): a report naming another client's task raises
        Forbidden and writes nothing. One naming a task nobody has (it expired) is
        answered as before: the 1.0.0 client dies on PERMISSION_DENIED, and a task that
        outlived its record is no one else's."""
        check_ids(client_id=client_id, name=name, correlation_id=correlation_id)
        check("report status", status, LABEL_BYTES)
        check("report response", response, DATA_BYTES)
        reply = await self._poll(client_id, name, correlation_id, status, done, response, strict)
        if reply is None:  # strict, and not a task of this client
            owner = await self.owner(correlation_id)
            if owner and owner != client_id:
                raise Forbidden(
                    f"task {correlation_id[:80]!r} is not a task of client {client_id[:80]!r}"
                )
            reply = await self._poll(client_id, name, correlation_id, status, done, response)
        return reply

    async def _poll(
        self, client_id, name, correlation_id, status, done, response, strict=False
    ) -> PollReply | None:
        self._presence.served(client_id)
        keys, s = self._ctx.keys, self._ctx.settings
        script_keys = [
            keys.client(client_id),
            keys.queue(client_id),
            keys.clients(keys.partition_of(client_id)),
            keys.inbound("reports", keys.partition_of(client_id)),
        ]
        args = [
            now_str(),
            client_id,
            name,
            self._replica,
            correlation_id,
            encode_id(correlation_id),
            status,
            "1" if done else "0",
            response,
            keys.task_prefix(client_id),
            s.stream_maxlen,
            "1" if strict else "0",
        ]
        reply = await self._ctx.batcher.submit(
            lambda pipe: self._ctx.scripts.call(pipe, "poll", script_keys, args)
        )
        reply = reply[0]
        kind = text(reply[0])
        if kind == "task":
            return PollReply(task=_task_from(reply[1:], client_id))
        if kind == "echo":
            return PollReply(echo=text(reply[1]), status=text(reply[2]))
        if kind == "unknown":
            return None
        return PollReply()

    async def take_for_stream(
        self, client_id: str, limit: int = 100, max_bytes: int = STREAM_TAKE_BYTES
    ) -> tuple[list[Task], bool]:
        """Queued tasks of a client for its TaskStream (each taken exactly once): at most
        `limit` tasks and about `max_bytes` of task data (at least one task). Returns them and
        whether more are queued (take again once these are written)."""
        check_ids(client_id=client_id)
        self._presence.served(client_id)
        keys = self._ctx.keys
        script_keys = [
            keys.client(client_id),
            keys.queue(client_id),
            keys.clients(keys.partition_of(client_id)),
            keys.streamed(client_id),
        ]
        args = [
            now_str(),
            client_id,
            self._replica,
            keys.task_prefix(client_id),
            limit,
            self._ctx.settings.task_ttl,
            max_bytes,
        ]
        n = len(WIRE_FIELDS)
        flat = await self._ctx.batcher.submit(
            lambda pipe: self._ctx.scripts.call(pipe, "stream_take", script_keys, args)
        )
        more, flat = bool(int(flat[0][0])), flat[0][1:]
        return [_task_from(flat[i : i + n], client_id) for i in range(0, len(flat), n)], more

    async def recover_for_stream(self, client_id: str) -> int:
        """A new TaskStream opens: queue again the tasks earlier streams of this client took
        but never got an answer for (their replica died before the client read them).
        Returns how many were put back."""
        check_ids(client_id=client_id)
        keys = self._ctx.keys
        script_keys = [keys.streamed(client_id), keys.queue(client_id)]
        args = [keys.task_prefix(client_id), now_str()]
        out = await self._ctx.batcher.submit(
            lambda pipe: self._ctx.scripts.call(pipe, "stream_recover", script_keys, args)
        )
        return int(out[0])

    async def flag(self, correlation_id: str, flag: str) -> str:
        """Abort ('abort') or time out ('timeout') a task; returns its previous state."""
        if flag not in ("abort", "timeout"):
            raise InvalidInput("flag must be 'abort' or 'timeout'")
        client_id = await self.owner(correlation_id)
        if not client_id:
            return ""
        keys = self._ctx.keys
        script_keys = [keys.task(client_id, correlation_id), keys.queue(client_id)]
        args = [flag, now_str(), encode_id(correlation_id)]
        out = await self._ctx.call(
            self._ctx.scripts.run, self._ctx.redis, "flag", script_keys, args
        )
        return text(out)

    async def was_given(self, client_id: str, model_id: str) -> bool:
        """Whether a task pushed to client_id (within the task TTL) named model_id."""
        return bool(
            await self._ctx.call(
                self._ctx.redis.sismember, self._ctx.keys.given_models(client_id), model_id
            )
        )

    async def owner(self, correlation_id: str) -> str:
        """The client whose task this is ('' if none): the reference is in the owner's
        partition, so by id alone every partition is asked (one round trip per node)."""
        keys = self._ctx.keys

        async def read():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for p in keys.all_partitions:
                pipe.get(keys.taskref(correlation_id, p))
            return await pipe.execute()

        return next((text(c) for c in await self._ctx.call(read) if c), "")

    async def show(self, correlation_id: str) -> dict[str, str]:
        """The whole task record ({} if unknown)."""
        client_id = await self.owner(correlation_id)
        if not client_id:
            return {}
        raw = await self._ctx.call(
            self._ctx.redis.hgetall, self._ctx.keys.task(client_id, correlation_id)
        )
        return text_map(raw)

    async def queued(self, client_id: str) -> int:
        return await self._ctx.call(self._ctx.redis.llen, self._ctx.keys.queue(client_id))

    async def records(self, tasks: dict[str, str]) -> dict[str, dict[str, str]]:
        """Task records by correlation id, for a map correlation id -> client id."""
        if not tasks:
            return {}
        items = list(tasks.items())
        keys = self._ctx.keys

        async def read():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for corr, client in items:
                pipe.hgetall(keys.task(client, corr))
            return await pipe.execute()

        raw = await self._ctx.call(read)
        return {corr: text_map(r) for (corr, _), r in zip(items, raw, strict=True)}
