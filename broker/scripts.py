"""Lua scripts: loaded once per connection target, called by SHA (EVALSHA).

Scripts are cached by Redis; after a Redis restart without persistence the cache is empty
and EVALSHA answers NOSCRIPT, so callers reload and retry (see batching.Batcher).
"""

from __future__ import annotations

import hashlib
from importlib import resources

import redis.exceptions as rex

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
        pipe = redis.pipeline(transaction=False)
        for text in self.source.values():
            pipe.script_load(text)
        await pipe.execute()

    def call(self, pipe, name: str, keys: list, args: list) -> None:
        """Queue one EVALSHA on a pipeline (the Batcher reloads on NOSCRIPT)."""
        return pipe.evalsha(self.sha[name], len(keys), *keys, *args)

    async def run(self, redis, name: str, keys: list, args: list):
        """Run one script directly, loading it first if Redis lost its script cache."""
        try:
            return await redis.evalsha(self.sha[name], len(keys), *keys, *args)
        except rex.NoScriptError:
            await redis.script_load(self.source[name])
            return await redis.evalsha(self.sha[name], len(keys), *keys, *args)
