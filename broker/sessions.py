"""Sessions and rounds of federated training, and the lease that lets one worker drive a
session at a time. Workers keep all their progress here, so a worker that takes over a
session (after its driver died) resumes exactly where the last one stopped."""

from __future__ import annotations

import json
import time
import uuid

from broker.context import Context, now_str, text, text_map
from broker.errors import Conflict, InvalidInput, NotFound
from broker.limits import check_ids
from broker.records import ACTIVE_SESSION_STATES, RoundRecord, SessionRecord, SessionStatus


class Sessions:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    # --- sessions ------------------------------------------------------------------------

    async def create(
        self, config: dict, seed_model_id: str, session_id: str = "", name: str = "",
        status: SessionStatus = SessionStatus.QUEUED,
    ) -> str:  # fmt: skip
        """A new session (QUEUED: a worker drives it at once; CREATED: once started).
        Ids and names are unique: a taken one is refused and nothing is written."""
        session_id = session_id or str(uuid.uuid4())
        check_ids(session_id=session_id, seed_model_id=seed_model_id)
        keys = self._ctx.keys
        record = SessionRecord(
            id=session_id,
            name=name,
            status=status,
            config=config,
            seed_model_id=seed_model_id,
            model_id=seed_model_id,
            current_round="1",
            created_at=now_str(),
        ).to_hash()

        async def write():
            if await self._ctx.redis.exists(keys.session(session_id)):
                return "id"
            if name and not await self._ctx.redis.hsetnx(keys.session_names, name, session_id):
                return "name"
            pipe = self._ctx.pipeline()
            pipe.hsetnx(keys.session(session_id), "id", session_id)
            pipe.hset(keys.session(session_id), mapping=record)
            pipe.zadd(keys.sessions, {session_id: time.time()})
            created, *_ = await pipe.execute()
            return "ok" if created else "id"

        outcome = await self._ctx.call(write)
        if outcome == "id":
            raise InvalidInput(f"session {session_id!r} already exists")
        if outcome == "name":
            raise InvalidInput(f"a session named {name!r} exists already")
        return session_id

    async def by_name(self, name: str) -> str:
        return text(await self._ctx.call(self._ctx.redis.hget, self._ctx.keys.session_names, name))

    async def count(self) -> int:
        return int(await self._ctx.call(self._ctx.redis.zcard, self._ctx.keys.sessions))

    async def newest(self, limit: int | None = None) -> list[str]:
        end = -1 if not limit else limit - 1
        ids = await self._ctx.call(self._ctx.redis.zrevrange, self._ctx.keys.sessions, 0, end)
        return [text(i) for i in ids]

    async def start(self, session_id: str, rounds: int | None = None, **config) -> str:
        """Queue a CREATED session, or continue an ended one for `rounds` more rounds from
        its current model. Returns what happened: 'started' or 'continued'."""
        record = await self.get(session_id)
        if record is None:
            raise NotFound(f"no session {session_id!r}")
        if record.active:
            raise InvalidInput(f"session {session_id!r} is {record.status} already")
        if record.status == SessionStatus.FAILED:  # its failed round would fail it again
            raise Conflict(
                f"session {session_id!r} failed ({record.error or 'see its rounds'}): start a "
                f"new session from its model {record.model_id!r} instead"
            )
        merged = {**record.config, **config}
        fields: dict = {"status": SessionStatus.QUEUED}
        if record.status == SessionStatus.CREATED:
            outcome = "started"
            if rounds is not None:
                merged["rounds"] = rounds
        else:
            outcome = "continued"
            merged["rounds"] = record.round_number - 1 + (rounds or 1)
            fields.update(error="", finished_at="")
        fields["config"] = merged
        await self.update(session_id, **fields)
        return outcome

    async def get(self, session_id: str) -> SessionRecord | None:
        raw = await self._ctx.call(self._ctx.redis.hgetall, self._ctx.keys.session(session_id))
        return SessionRecord.from_hash(text_map(raw)) if raw else None

    async def update(self, session_id: str, **fields) -> None:
        await self._ctx.call(
            self._ctx.redis.hset,
            self._ctx.keys.session(session_id),
            mapping=SessionRecord.partial_hash(**fields),
        )

    async def all(self) -> list[str]:
        ids = await self._ctx.call(self._ctx.redis.zrange, self._ctx.keys.sessions, 0, -1)
        return [text(i) for i in ids]

    async def active(self) -> list[str]:
        """Sessions still to be driven, oldest first."""
        ids = await self.all()
        if not ids:
            return []

        async def statuses():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for sid in ids:
                pipe.hget(self._ctx.keys.session(sid), "status")
            return await pipe.execute()

        return [s for s, st in zip(ids, await self._ctx.call(statuses), strict=True)
                if text(st) in ACTIVE_SESSION_STATES]  # fmt: skip

    async def current_models(self, recent: int = 10) -> set[str]:
        """The current global models: the model of each active session among the `recent`
        newest, and the newest session's model (its final one once it is over). Any
        authenticated client may download these."""
        keys = self._ctx.keys
        ids = [
            text(i)
            for i in await self._ctx.call(self._ctx.redis.zrevrange, keys.sessions, 0, recent - 1)
        ]
        if not ids:
            return set()

        async def read():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for sid in ids:
                pipe.hmget(keys.session(sid), "status", "model_id")
            return await pipe.execute()

        models = set()
        for i, (status, model_id) in enumerate(await self._ctx.call(read)):
            if model_id and (i == 0 or text(status) in ACTIVE_SESSION_STATES):
                models.add(text(model_id))
        return models

    # --- the lease -----------------------------------------------------------------------

    async def lease(self, session_id: str, owner: str, op: str, ttl: float) -> bool:
        keys = self._ctx.keys
        got = await self._ctx.call(
            self._ctx.scripts.run,
            self._ctx.redis,
            "lease",
            [keys.session_lease(session_id)],
            [op, owner, int(ttl * 1000)],
        )
        return bool(got)

    async def log_driver(self, session_id: str, owner: str) -> None:
        await self._ctx.call(
            self._ctx.redis.rpush,
            self._ctx.keys.session_drivers(session_id),
            f"{owner} {now_str()}",
        )

    async def drivers(self, session_id: str) -> list[str]:
        got = await self._ctx.call(
            self._ctx.redis.lrange, self._ctx.keys.session_drivers(session_id), 0, -1
        )
        return [text(g) for g in got]

    async def holder(self, session_id: str) -> str:
        return text(
            await self._ctx.call(self._ctx.redis.get, self._ctx.keys.session_lease(session_id))
        )

    # --- rounds --------------------------------------------------------------------------

    async def round(self, session_id: str, round_id: str) -> RoundRecord | None:
        raw = await self._ctx.call(
            self._ctx.redis.hgetall, self._ctx.keys.round(session_id, round_id)
        )
        return RoundRecord.from_hash(text_map(raw)) if raw else None

    async def update_round(self, session_id: str, round_id: str, **fields) -> None:
        await self._ctx.call(
            self._ctx.redis.hset,
            self._ctx.keys.round(session_id, round_id),
            mapping=RoundRecord.partial_hash(**fields),
        )

    async def set_round_once(self, session_id: str, round_id: str, field: str, value) -> str:
        """Set a round field unless set already; returns the value now stored."""
        key = self._ctx.keys.round(session_id, round_id)

        async def once():
            pipe = self._ctx.pipeline()
            pipe.hsetnx(key, field, str(value))
            pipe.hget(key, field)
            _, stored = await pipe.execute()
            return text(stored)

        return await self._ctx.call(once)

    async def add_round_tasks(
        self, session_id: str, round_id: str, kind: str, tasks: dict[str, str]
    ) -> None:
        if tasks:
            await self._ctx.call(
                self._ctx.redis.hset,
                self._ctx.keys.round_tasks(session_id, round_id, kind),
                mapping=tasks,
            )

    async def round_tasks(self, session_id: str, round_id: str, kind: str) -> dict[str, str]:
        raw = await self._ctx.call(
            self._ctx.redis.hgetall, self._ctx.keys.round_tasks(session_id, round_id, kind)
        )
        return text_map(raw)

    async def expire_session(self, session_id: str, rounds: int, ttl: int | None = None) -> None:
        """Per-round keys expire once the session is over (records are kept as long:
        task_ttl unless ttl is given)."""
        keys = self._ctx.keys
        ttl = self._ctx.settings.task_ttl if ttl is None else ttl

        async def expire():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for r in range(1, rounds + 1):
                rid = str(r)
                for key in (
                    keys.round(session_id, rid),
                    keys.round_tasks(session_id, rid, "tasks"),
                    keys.round_tasks(session_id, rid, "validations"),
                ):
                    pipe.expire(key, ttl)
            await pipe.execute()

        await self._ctx.call(expire)

    # --- records -------------------------------------------------------------------------

    async def records(self, session_id: str, kind: str) -> list[dict]:
        raw = await self._ctx.call(
            self._ctx.redis.hgetall, self._ctx.keys.session_records(session_id, kind)
        )
        return [json.loads(v) for _, v in sorted(raw.items())]

    async def client_records(self, client_id: str, kind: str) -> list[dict]:
        """The client's latest records of a kind, newest first."""
        raw = await self._ctx.call(
            self._ctx.redis.lrange, self._ctx.keys.client_records(client_id, kind), 0, -1
        )
        return [json.loads(v) for v in raw]

    async def clients_records(self, client_ids: list[str], kind: str) -> list[dict]:
        """client_records of many clients in one round trip, concatenated."""
        if not client_ids:
            return []
        keys = self._ctx.keys

        async def read():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for c in client_ids:
                pipe.lrange(keys.client_records(c, kind), 0, -1)
            return await pipe.execute()

        return [json.loads(v) for raw in await self._ctx.call(read) for v in raw]

    async def add_records(
        self, items: list[tuple[str, str, str, str, dict]], ttl: int | None = None
    ) -> None:
        """Keep stream records: (session id, client id, kind, entry id, record). Keyed by
        entry id, so a record processed twice (after a worker died) is stored once. They
        expire after task_ttl unless ttl is given. A record naming a session that does not
        exist is kept per client only: a client cannot create session keys."""
        if not items:
            return
        keys = self._ctx.keys
        ttl = self._ctx.settings.task_ttl if ttl is None else ttl
        named = sorted({item[0] for item in items if item[0]})

        async def write():
            known: set[str] = set()
            if named:
                pipe = self._ctx.redis.pipeline(transaction=False)
                for session_id in named:
                    pipe.exists(keys.session(session_id))
                found = await pipe.execute()
                known = {s for s, n in zip(named, found, strict=True) if n}
            pipe = self._ctx.redis.pipeline(transaction=False)
            for session_id, client_id, kind, entry_id, record in items:
                doc = json.dumps(record)
                if session_id in known:
                    key = keys.session_records(session_id, kind)
                    pipe.hset(key, entry_id, doc)
                    pipe.expire(key, ttl)
                if client_id:
                    key = keys.client_records(client_id, kind)
                    pipe.lpush(key, doc)
                    pipe.ltrim(key, 0, 99)
                    pipe.expire(key, ttl)
            await pipe.execute()

        await self._ctx.call(write)
