"""Lua scripts: loaded once per connection target, called by SHA (EVALSHA).

Scripts are cached by Redis; after a Redis restart without persistence the cache is empty
and EVALSHA answers NOSCRIPT, so callers reload and retry (see batching.Batcher). The cache
is not replicated either: after a Sentinel or Cluster failover the new master answers
NOSCRIPT the same way. On a Cluster, SCRIPT LOAD goes to every primary, and EVALSHA is sent
as a plain command (redis-py blocks its evalsha() in cluster pipelines; the command itself is
routed by its keys, which every script keeps in one slot).
"""

from __future__ import annotations

import hashlib
from importlib import resources

import redis.exceptions as rex
from redis.asyncio.cluster import RedisCluster

NAMES = (
    "poll",
    "stream_take",
    "stream_recover",
    "push",
    "flag",
    "ingest_result",
    "model_begin",
    "model_commit",
    "model_abort",
    "lease",
)


class Scripts:
    def __init__(self) -> None:
        self.source: dict[str, str] = {}
        self.sha: dict[str, str] = {}
        folder = resources.files("broker") / "lua"
        for name in NAMES:
            text = (folder / f"{name}.lua").read_text()
            self.source[name] = text
            self.sha[name] = hashlib.sha1(text.encode()).hexdigest()

    async def load(self, redis) -> None:
        if isinstance(redis, RedisCluster):
            for text in self.source.values():
                await redis.script_load(text)  # to every primary
            return
        pipe = redis.pipeline(transaction=False)
        for text in self.source.values():
            pipe.script_load(text)
        await pipe.execute()

    def call(self, pipe, name: str, keys: list, args: list) -> None:
        """Queue one EVALSHA on a pipeline (the Batcher reloads on NOSCRIPT)."""
        return pipe.execute_command("EVALSHA", self.sha[name], len(keys), *keys, *args)

    async def run(self, redis, name: str, keys: list, args: list):
        """Run one script directly, loading it first if Redis lost its script cache."""
        try:
            return await redis.evalsha(self.sha[name], len(keys), *keys, *args)
        except rex.NoScriptError:
            await redis.script_load(self.source[name])
            return await redis.evalsha(self.sha[name], len(keys), *keys, *args)
