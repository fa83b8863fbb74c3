"""The catalog: the global models (seeds and each round's aggregate, with their trail) and
the compute packages, as the control-plane API lists them (combiner/control_api.py).

The model store (broker/models.py) holds every model's bytes, client updates included;
the catalog names only the models an operator cares about. Each entry records its parent,
so the trail of a session walks from its final model back to the seed. The newest entry
is the active model: the one a session started without a model id begins from.
"""

from __future__ import annotations

import time

from broker.context import Context, text, text_map
from broker.errors import InvalidInput


def _page(limit: int | None) -> int:
    return -1 if not limit else max(0, limit - 1)


class Catalog:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    # --- global models -------------------------------------------------------------------

    async def add_model(
        self, model_id: str, parent: str = "", session_id: str = "", round_id: str = "",
        name: str = "",
    ) -> dict[str, str]:  # fmt: skip
        """Name a stored model as a global one. Adding it again changes nothing (a worker
        that redoes a round's aggregation registers its model once)."""
        keys, now = self._ctx.keys, time.time()
        entry = {
            "model_id": model_id,
            "parent_model": parent,
            "session_id": session_id,
            "round_id": round_id,
            "name": name or model_id,
            "committed_at": f"{now:.6f}",
        }

        async def write():
            pipe = self._ctx.pipeline()
            pipe.hsetnx(keys.catalog_model(model_id), "model_id", model_id)
            pipe.hgetall(keys.catalog_model(model_id))
            created, raw = await pipe.execute()
            if not created and len(raw) > 1:
                return text_map(raw)
            pipe = self._ctx.pipeline()
            pipe.hset(keys.catalog_model(model_id), mapping=entry)
            pipe.zadd(keys.catalog_models, {model_id: now}, nx=True)
            await pipe.execute()
            return entry

        return await self._ctx.call(write)

    async def model(self, model_id: str) -> dict[str, str]:
        raw = await self._ctx.call(self._ctx.redis.hgetall, self._ctx.keys.catalog_model(model_id))
        return text_map(raw)

    async def models(
        self, limit: int | None = None, newest_first: bool = True, session_id: str = ""
    ) -> list[dict[str, str]]:
        keys = self._ctx.keys
        if session_id:  # few models per session: filter the whole index
            ids = await self._ids(keys.catalog_models, None, newest_first)
            found = [m for m in await self._entries(ids) if m.get("session_id") == session_id]
            return found[:limit] if limit else found
        return await self._entries(await self._ids(keys.catalog_models, limit, newest_first))

    async def model_count(self) -> int:
        return int(await self._ctx.call(self._ctx.redis.zcard, self._ctx.keys.catalog_models))

    async def active_model(self) -> dict[str, str]:
        newest = await self.models(limit=1)
        return newest[0] if newest else {}

    async def ancestors(
        self, model_id: str, limit: int | None, include_self: bool = True
    ) -> list[dict[str, str]]:
        """The model's trail, newest first: itself (if asked), its parent, ... the seed."""
        trail, seen = [], set()
        current = await self.model(model_id)
        if current and include_self:
            trail.append(current)
        while current.get("parent_model") and (not limit or len(trail) < limit):
            parent = current["parent_model"]
            if parent in seen:  # cannot happen through add_model; never loop on bad data
                break
            seen.add(parent)
            current = await self.model(parent)
            if not current:
                break
            trail.append(current)
        return trail[:limit] if limit else trail

    # --- compute packages ----------------------------------------------------------------

    async def add_package(self, entry: dict[str, str], activate: bool = True) -> None:
        keys = self._ctx.keys
        package_id = entry["package_id"]

        async def write():
            pipe = self._ctx.pipeline()
            pipe.hset(keys.package(package_id), mapping=entry)
            pipe.zadd(keys.packages, {package_id: float(entry["committed_at"])})
            if activate:
                pipe.set(keys.active_package, package_id)
            await pipe.execute()

        await self._ctx.call(write)

    async def package(self, package_id: str) -> dict[str, str]:
        raw = await self._ctx.call(self._ctx.redis.hgetall, self._ctx.keys.package(package_id))
        return text_map(raw)

    async def packages(self, limit: int | None = None) -> list[dict[str, str]]:
        keys = self._ctx.keys
        ids = await self._ids(keys.packages, limit, newest_first=True)
        return await self._entries(ids, keys.package)

    async def package_count(self) -> int:
        return int(await self._ctx.call(self._ctx.redis.zcard, self._ctx.keys.packages))

    async def active_package(self) -> dict[str, str]:
        package_id = text(await self._ctx.call(self._ctx.redis.get, self._ctx.keys.active_package))
        return await self.package(package_id) if package_id else {}

    async def package_named(self, file_name: str) -> dict[str, str]:
        """The newest package with this file name (what the 1.0.0 client asks by)."""
        for entry in await self.packages():
            if entry.get("file_name") == file_name:
                return entry
        return {}

    # --- shared --------------------------------------------------------------------------

    async def _ids(self, key: str, limit: int | None, newest_first: bool) -> list[str]:
        if limit is not None and limit < 0:
            raise InvalidInput("limit must be >= 0")
        read = self._ctx.redis.zrevrange if newest_first else self._ctx.redis.zrange
        return [text(i) for i in await self._ctx.call(read, key, 0, _page(limit))]

    async def _entries(self, ids: list[str], key_of=None) -> list[dict[str, str]]:
        if not ids:
            return []
        key_of = key_of or self._ctx.keys.catalog_model

        async def read():
            pipe = self._ctx.redis.pipeline(transaction=False)
            for i in ids:
                pipe.hgetall(key_of(i))
            return await pipe.execute()

        return [text_map(raw) for raw in await self._ctx.call(read) if raw]
