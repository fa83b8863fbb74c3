"""Chunked file uploads over HTTP (the APIClient's ``file-upload/init|chunk|complete``):
seed models and compute packages arrive in chunks of up to ~900 KiB, possibly each at
another replica behind the load balancer, so the chunks are staged in Redis, not in a
replica's memory. A completed upload is a *file token* that ``POST models/`` or
``POST packages/`` turns into a model or a package; staged files expire after the upload
TTL whether or not anything used them.
"""

from __future__ import annotations

import uuid

from broker.context import Context, now_str, text_map
from broker.errors import InvalidInput, NotFound, TooLarge


class FileUploads:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    async def init(self, file_name: str, file_size: int, max_bytes: int) -> str:
        if file_size > max_bytes:
            raise TooLarge(f"file_size {file_size} is over the limit of {max_bytes} bytes")
        upload_id = uuid.uuid4().hex
        keys, ttl = self._ctx.keys, self._ctx.settings.upload_ttl
        info = {"file_name": file_name, "file_size": str(file_size), "state": "open",
                "created": now_str()}  # fmt: skip

        async def write():
            pipe = self._ctx.pipeline()
            pipe.hset(keys.file(upload_id), mapping=info)
            pipe.expire(keys.file(upload_id), ttl)
            await pipe.execute()

        await self._ctx.call(write)
        return upload_id

    async def info(self, upload_id: str) -> dict[str, str]:
        if not upload_id.isalnum() or len(upload_id) > 64:
            raise NotFound("no such upload")
        raw = await self._ctx.call(self._ctx.redis.hgetall, self._ctx.keys.file(upload_id))
        if not raw:
            raise NotFound("no such upload (unknown, or expired)")
        return text_map(raw)

    async def chunk(self, upload_id: str, index: int, data: bytes) -> None:
        """Chunk `index` (0, 1, ...). Sending the last chunk again is harmless (a retry
        after a lost answer); a gap, or bytes past the announced size, is refused."""
        info = await self.info(upload_id)
        if info["state"] != "open":
            raise InvalidInput("this upload is complete already")
        keys, ttl = self._ctx.keys, self._ctx.settings.upload_ttl
        chunks = keys.file_chunks(upload_id)
        have = int(await self._ctx.call(self._ctx.redis.llen, chunks))
        if index == have - 1:
            return
        if index != have:
            raise InvalidInput(f"chunk {index} out of order: expected chunk {have}")
        received = int(info.get("received", 0)) + len(data)
        if received > int(info["file_size"]):
            raise TooLarge(f"more bytes than the announced file_size {info['file_size']}")

        async def write():
            pipe = self._ctx.pipeline()
            pipe.rpush(chunks, data)
            pipe.hincrby(keys.file(upload_id), "received", len(data))
            pipe.expire(chunks, ttl)
            await pipe.execute()

        await self._ctx.call(write)

    async def complete(self, upload_id: str) -> str:
        """The file token (the upload id) once every announced byte arrived."""
        info = await self.info(upload_id)
        if int(info.get("received", 0)) != int(info["file_size"]):
            raise InvalidInput(
                f"received {info.get('received', 0)} of {info['file_size']} bytes: "
                "send the remaining chunks first"
            )
        await self._ctx.call(self._ctx.redis.hset, self._ctx.keys.file(upload_id), "state", "done")
        return upload_id

    async def read(self, file_token: str) -> tuple[str, bytes]:
        """The file name and bytes of a completed upload."""
        info = await self.info(file_token)
        if info["state"] != "done":
            raise InvalidInput("this upload is not complete")
        chunks = await self._ctx.call(
            self._ctx.redis.lrange, self._ctx.keys.file_chunks(file_token), 0, -1
        )
        return info["file_name"], b"".join(chunks)

    async def discard(self, upload_id: str) -> None:
        keys = self._ctx.keys
        await self._ctx.call(
            self._ctx.redis.delete, keys.file(upload_id), keys.file_chunks(upload_id)
        )
