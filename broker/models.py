"""The model store: meta in Redis, bytes either in Redis (chunk lists) or on a shared disk.

An upload is staged under a private name (a temp chunk list, or a temp file) and made
visible in one step by ``model_commit.lua``, so a half-uploaded model is never served.
While it is staged, the meta says 'uploading' and Download answers "not ready".

Concurrent uploads of one id: the commit script alone picks the winner. In the disk store
each upload's file keeps a name of its own (``<model id>/<upload id>``) and the winner's meta
names it, so the bytes behind a meta are always the ones its checksum was taken of; a loser
removes only its own file. (A file moved to the model's name before the commit could be
overwritten by the other upload while the meta kept the first one's checksum.)
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import re
import shutil
import uuid
from collections.abc import AsyncIterator

from broker.context import Context, now_str, text, text_map
from broker.errors import Conflict, Forbidden, InvalidInput, NotFound, NotReady, TooLarge

CHUNK = 1024 * 1024  # stored and served chunk size (the client sends 1 MiB chunks)
# 255: the longest file name (NAME_MAX) the disk store can create.
_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}\Z")  # \Z: not "$" (trailing newline)


def valid_model_id(model_id: str) -> bool:
    return bool(_SAFE_ID.match(model_id)) and ".." not in model_id


def check_model_id(model_id: str) -> None:
    """A model id becomes a file name in the disk store: no separators, no '..', <= 255."""
    if not model_id:
        raise InvalidInput("model id must not be empty")
    if not valid_model_id(model_id):
        raise InvalidInput(
            "model id must be 1-255 characters of letters, digits, '.', '_' or '-', "
            f"not start with '.', and not contain '..'; got {model_id[:80]!r}"
        )


class Upload:
    """One upload in progress: feed it chunks, then commit (or abort)."""

    def __init__(
        self,
        store: ModelStore,
        model_id: str,
        max_bytes: int,
        uploader: str = "",
        strict: bool = False,
    ) -> None:
        self.store = store
        self.model_id = model_id
        self.uploader = uploader  # the client id the meta names (SendModelUpdate checks it)
        self.strict = strict  # an authenticated uploader: another's id is Forbidden
        self.upload_id = uuid.uuid4().hex
        self.max_bytes = max_bytes
        self.size = 0
        self.chunks = 0
        self._sha = hashlib.sha256()
        # What is held between writes: at most one partial chunk, in a buffer of fixed
        # size; whole chunks of a message go to the store without being copied into it.
        self._buffer: bytearray | None = None
        self._filled = 0
        self._file = None
        self._placed: pathlib.Path | None = None  # disk: the file under its final name
        self._tried: set[int] = set()

    async def begin(self) -> None:
        ctx = self.store.ctx
        got = await ctx.call(
            ctx.scripts.run,
            ctx.redis,
            "model_begin",
            [ctx.keys.model(self.model_id)],
            [
                ctx.settings.upload_ttl,
                self.upload_id,
                now_str(),
                self.uploader,
                "1" if self.strict else "0",
            ],
        )
        if text(got) == "denied":
            raise Forbidden(
                f"model id {self.model_id[:80]!r} belongs to another uploader; use a new id"
            )
        if self.store.directory is not None:
            self._file = await asyncio.to_thread(open, self._staged_path, "wb")

    @property
    def _staged_path(self) -> pathlib.Path:
        return self.store.directory / f".upload-{self.upload_id}"

    @property
    def file_name(self) -> str:
        """Disk store: this upload's file, relative to the model dir (the meta's 'file')."""
        return f"{self.model_id}/{self.upload_id}"

    @property
    def held_bytes(self) -> int:
        """Memory this upload holds between writes (its chunk buffer)."""
        return 0 if self._buffer is None else self._buffer.__sizeof__()

    async def write(self, data: bytes) -> None:
        """Stage data: every full chunk goes to the store at once, only a partial one stays."""
        self.size += len(data)
        if self.size > self.max_bytes:
            raise TooLarge(f"model exceeds the limit of {self.max_bytes} bytes")
        self._sha.update(data)
        view = memoryview(data)
        while view:
            if self._filled == 0 and len(view) >= CHUNK:  # a whole chunk: no copy
                await self._flush(view[:CHUNK])
                view = view[CHUNK:]
                continue
            if self._buffer is None:
                self._buffer = bytearray(CHUNK)
            n = min(CHUNK - self._filled, len(view))
            self._buffer[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == CHUNK:
                await self._flush(memoryview(self._buffer))
                self._filled = 0

    async def _flush(self, chunk: memoryview) -> None:
        if self._file is not None:
            await asyncio.to_thread(self._file.write, chunk)
        else:
            await self.store.ctx.call(self._append, chunk, self.chunks)
        self.chunks += 1

    async def _append(self, chunk: bytes, index: int) -> None:
        # Idempotent under retries: a chunk whose RPUSH reply was lost is not pushed twice.
        ctx = self.store.ctx
        key = ctx.keys.model_upload(self.model_id, self.upload_id)
        if index in self._tried and await ctx.redis.llen(key) == index + 1:
            return
        self._tried.add(index)
        pipe = ctx.pipeline()
        pipe.rpush(key, chunk)
        pipe.expire(key, ctx.settings.upload_ttl)
        length, _ = await pipe.execute()
        if length != index + 1:
            raise RuntimeError(f"upload {self.upload_id} out of order at chunk {index}")

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    async def commit(self) -> str:
        """Make the model visible; returns 'ok' or 'same' (identical model already there)."""
        if self._filled:
            await self._flush(memoryview(self._buffer)[: self._filled])
            self._filled = 0
        self._buffer = None
        ctx, store = self.store.ctx, self.store
        if self._file is not None:
            meta = await store.meta(self.model_id)
            if meta.get("state") == "ok":  # decided already: no need to place the file
                await self.abort()
                if meta.get("sha256") == self.sha256:
                    return "same"
                raise Conflict(f"a different model is already stored as {self.model_id!r}")
            await asyncio.to_thread(self._place)
        keys = ctx.keys
        result = text(
            await ctx.call(
                ctx.scripts.run,
                ctx.redis,
                "model_commit",
                [
                    keys.model(self.model_id),
                    keys.model_chunks(self.model_id),
                    keys.model_upload(self.model_id, self.upload_id),
                ],
                [
                    self.sha256,
                    self.size,
                    self.chunks,
                    store.kind,
                    now_str(),
                    self.upload_id,
                    self.file_name if self._placed is not None else "",
                    self.uploader,
                ],
            )
        )
        if result != "ok" and self._placed is not None:  # lost: the winner's file stays
            await asyncio.to_thread(self._placed.unlink, True)
        self._placed = None  # decided: abort() must not touch the file any more
        if result == "conflict":
            raise Conflict(f"a different model is already stored as {self.model_id!r}")
        return result

    def _place(self) -> None:
        """Close the staged file and move it under this upload's own final name."""
        f, self._file = self._file, None
        final = self.store.directory / self.file_name
        try:
            with f:
                f.flush()
                os.fsync(f.fileno())
            final.parent.mkdir(exist_ok=True)
            os.replace(self._staged_path, final)
        except BaseException:
            self._staged_path.unlink(missing_ok=True)
            raise
        self._placed = final

    def _discard_file(self) -> None:
        f, self._file = self._file, None
        f.close()
        self._staged_path.unlink(missing_ok=True)

    async def abort(self) -> None:
        ctx = self.store.ctx
        self._buffer = None
        if self._file is not None:
            await asyncio.to_thread(self._discard_file)
        # A placed file whose commit failed stays: the commit may have been applied (its
        # reply lost), and then the meta names this file.
        await ctx.call(
            ctx.scripts.run,
            ctx.redis,
            "model_abort",
            [ctx.keys.model(self.model_id), ctx.keys.model_upload(self.model_id, self.upload_id)],
            [self.upload_id],
        )


class ModelStore:
    def __init__(self, ctx: Context, directory: str | os.PathLike | None = None) -> None:
        self.ctx = ctx
        self.directory = pathlib.Path(directory).resolve() if directory else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.kind = "disk" if self.directory is not None else "redis"

    def upload(
        self, model_id: str, max_bytes: int, uploader: str = "", strict: bool = False
    ) -> Upload:
        """An upload of model_id by uploader (a client id; '' for operators and workers).
        strict: refuse (Forbidden, at begin) an id another uploader holds."""
        check_model_id(model_id)
        return Upload(self, model_id, max_bytes, uploader, strict)

    async def meta(self, model_id: str) -> dict[str, str]:
        raw = await self.ctx.call(self.ctx.redis.hgetall, self.ctx.keys.model(model_id))
        return text_map(raw)

    async def ready_meta(self, model_id: str) -> dict[str, str]:
        """Meta of a stored model; NotFound / NotReady otherwise."""
        check_model_id(model_id)
        meta = await self.meta(model_id)
        if not meta:
            raise NotFound(f"no model {model_id!r}")
        if meta.get("state") != "ok":
            raise NotReady(f"model {model_id!r} is still {meta.get('state', 'unknown')}")
        return meta

    async def read(self, model_id: str) -> tuple[dict[str, str], AsyncIterator[bytes]]:
        """The meta and an iterator over the bytes in chunks of at most 1 MiB."""
        meta = await self.ready_meta(model_id)
        return meta, self.chunks(model_id, meta)

    def chunks(self, model_id: str, meta: dict[str, str]) -> AsyncIterator[bytes]:
        """The bytes of a model whose meta ``ready_meta`` returned, in chunks of <= 1 MiB."""
        if meta.get("store") == "disk":
            if self.directory is None:
                raise NotReady(f"model {model_id!r} is on disk; this process has no --model-dir")
            return self._read_file(self.file_path(model_id, meta))
        return self._read_chunks(model_id, int(meta.get("chunks", 0)))

    def file_path(self, model_id: str, meta: dict[str, str]) -> pathlib.Path:
        """Disk store: the file the meta names (models stored before the meta named their
        file are at <model dir>/<model id>)."""
        return self.directory / (meta.get("file") or model_id)

    async def _read_chunks(self, model_id: str, count: int) -> AsyncIterator[bytes]:
        key = self.ctx.keys.model_chunks(model_id)
        nxt = None
        for i in range(count):
            # Fetch the next chunk while the caller sends this one.
            cur = nxt if nxt is not None else asyncio.ensure_future(self._chunk(key, i))
            nxt = asyncio.ensure_future(self._chunk(key, i + 1)) if i + 1 < count else None
            try:
                yield await cur
            except BaseException:
                if nxt is not None:
                    nxt.cancel()
                raise

    async def _chunk(self, key: str, index: int) -> bytes:
        got = await self.ctx.call(self.ctx.redis.lindex, key, index)
        if got is None:
            raise NotFound("model chunks vanished while reading")
        return got

    async def _read_file(self, path: pathlib.Path) -> AsyncIterator[bytes]:
        f = await asyncio.to_thread(open, path, "rb")
        try:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                yield chunk
        finally:
            f.close()

    async def get(self, model_id: str) -> bytearray:
        """The model's bytes, copied chunk by chunk into one buffer of the stored size, so
        at most one chunk exists beside it (no list of chunks plus a joined copy)."""
        meta, chunks = await self.read(model_id)
        buf = bytearray(int(meta.get("size", "0") or 0))
        pos = 0
        async for chunk in chunks:
            end = pos + len(chunk)
            if end > len(buf):  # the stored size was wrong: grow rather than fail
                buf.extend(b"\0" * (end - len(buf)))
            buf[pos:end] = chunk
            pos = end
        del buf[pos:]
        return buf

    async def put(self, data: bytes, model_id: str = "", max_bytes: int = 1 << 62) -> str:
        """Store bytes under a new id (uuid4) or the given one; returns the id."""
        model_id = model_id or str(uuid.uuid4())
        upload = self.upload(model_id, max_bytes)
        await upload.begin()
        try:
            for i in range(0, len(data), CHUNK):
                await upload.write(data[i : i + CHUNK])
            await upload.commit()
        except BaseException:
            await upload.abort()
            raise
        return model_id

    async def delete(self, model_id: str) -> None:
        keys = self.ctx.keys
        await self.ctx.call(
            self.ctx.redis.delete, keys.model(model_id), keys.model_chunks(model_id)
        )
        if self.directory is not None:
            await asyncio.to_thread(self._delete_files, self.directory / model_id)

    @staticmethod
    def _delete_files(path: pathlib.Path) -> None:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
