"""Models this replica served recently, held in memory as encoded FileChunk messages.

At the start of a round every client downloads the same global model. Without a cache each
Download reads the whole model from the store again (N x size out of Redis or off disk) and
encodes every chunk again. Here the first Download of a model starts one fill from the store
and every Download of it, concurrent or later, streams the encoded chunks from memory,
following the fill while it is still running.

Entries are keyed by (model id, SHA-256), and each Download reads the model's meta from Redis
first, so a deleted or replaced model is never served from here. The cache is an LRU within a
byte budget; a model larger than half the budget is streamed from the store and not kept.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable

from combiner.metrics import MODEL_CACHE_BYTES, MODEL_CACHE_DOWNLOADS

log = logging.getLogger("combiner")

ChunkSource = Callable[[], AsyncIterator[bytes]]


def encode_chunk(data: bytes) -> bytes:
    """``FileChunk(data=data).SerializeToString()`` in one copy instead of two (field 1,
    wire type 2: tag 0x0a, varint length, bytes)."""
    n, head = len(data), bytearray(b"\n")
    while n > 0x7F:
        head.append(n & 0x7F | 0x80)
        n >>= 7
    head.append(n)
    return b"".join((head, data))


async def encoded(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield encode_chunk(chunk)


class _Entry:
    """One model's encoded chunks, complete or still being filled."""

    __slots__ = ("_more", "data_bytes", "done", "error", "frames", "size")

    def __init__(self, size: int) -> None:
        self.size = size  # what the meta says: the bytes this entry counts against the budget
        self.frames: list[bytes] = []
        self.data_bytes = 0
        self.done = False
        self.error: BaseException | None = None
        self._more = asyncio.Event()

    def add(self, chunk: bytes) -> None:
        self.frames.append(encode_chunk(chunk))
        self.data_bytes += len(chunk)
        self._wake()

    def finish(self, error: BaseException | None = None) -> None:
        self.done, self.error = True, error
        self._wake()

    def _wake(self) -> None:
        more, self._more = self._more, asyncio.Event()
        more.set()

    async def follow(self) -> AsyncIterator[bytes]:
        """Every frame in order, waiting for the fill where it has not got yet."""
        i = 0
        while True:
            while i < len(self.frames):
                yield self.frames[i]
                i += 1
            if self.error is not None:
                raise self.error
            if self.done:
                return
            await self._more.wait()


class ModelCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[tuple[str, str], _Entry] = collections.OrderedDict()
        self._bytes = 0
        self._fills: set[asyncio.Task] = set()
        MODEL_CACHE_BYTES.set_function(lambda: self._bytes)

    def stream(
        self, model_id: str, meta: dict[str, str], read: ChunkSource
    ) -> AsyncIterator[bytes]:
        """The model's encoded FileChunk messages; ``read()`` opens the store's chunks."""
        size = int(meta.get("size") or 0)
        if size > self.max_bytes // 2:
            MODEL_CACHE_DOWNLOADS.labels("bypass").inc()
            return encoded(read())
        key = (model_id, meta.get("sha256", ""))
        entry = self._entries.get(key)
        if entry is not None:
            MODEL_CACHE_DOWNLOADS.labels("hit").inc()
            self._entries.move_to_end(key)
            return entry.follow()
        MODEL_CACHE_DOWNLOADS.labels("miss").inc()
        chunks = read()  # raises here (before anything is cached) if the store cannot serve it
        self._make_room(size)
        entry = self._entries[key] = _Entry(size)
        self._bytes += size
        task = asyncio.create_task(self._fill(key, entry, chunks), name=f"fill {model_id}")
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)
        return entry.follow()

    async def _fill(self, key, entry: _Entry, chunks: AsyncIterator[bytes]) -> None:
        # Runs apart from any one Download, so a slow or cancelled client does not hold up
        # the others, and the model is read from the store once.
        try:
            async for chunk in chunks:
                entry.add(chunk)
            if entry.data_bytes != entry.size:
                raise RuntimeError(
                    f"model {key[0]!r}: read {entry.data_bytes} bytes, meta says {entry.size}"
                )
            entry.finish()
        except BaseException as exc:
            self._drop(key, entry)
            entry.finish(exc if isinstance(exc, Exception) else RuntimeError("replica stopping"))
            if not isinstance(exc, Exception):
                raise
            log.warning("model %s: reading from the store failed: %s", key[0], exc)

    def _make_room(self, size: int) -> None:
        """Evict least recently used complete models until ``size`` more bytes fit."""
        for key in list(self._entries):
            if self._bytes + size <= self.max_bytes:
                return
            if self._entries[key].done:
                self._drop(key, self._entries[key])

    def _drop(self, key, entry: _Entry) -> None:
        if self._entries.get(key) is entry:
            del self._entries[key]
            self._bytes -= entry.size

    async def close(self) -> None:
        for task in list(self._fills):
            task.cancel()
        await asyncio.gather(*self._fills, return_exceptions=True)
