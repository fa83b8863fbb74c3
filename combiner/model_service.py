"""ModelService: Upload and Download of model bytes (docs/protocol.md §4.4, §4.5).

Uploads are bounded (docs/operations.md, "Upload limits"): an upload that sends no chunk for
the idle timeout is abandoned, a replica and each client have a cap on uploads at once, and
an upload holds at most one chunk of memory between chunks (the rest is in the store).
With tokens on, "each client" is the token's client, the meta records it as the uploader
(SendModelUpdate then accepts only that client's models), and Download serves a client only
the models it was given (docs/protocol.md §15).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

import grpc

from broker import Broker, InvalidInput
from broker.errors import BrokerError, NotReady, TooLarge
from broker.records import Role
from combiner.auth import PermissionDenied, bind, current_caller
from combiner.model_cache import ModelCache
from combiner.pb import scaleout_pb2 as pb
from combiner.pb import scaleout_pb2_grpc as pb_grpc

log = logging.getLogger("combiner")

_HEX = frozenset("0123456789abcdef")


class UploadIdle(NotReady):
    """No chunk arrived for the idle timeout. FAILED_PRECONDITION: the 1.0.0 client sends
    the whole model again later (docs/protocol.md §3.2), which is right for a stalled one."""


class TooManyUploads(TooLarge):
    """A cap on uploads at once is reached (RESOURCE_EXHAUSTED: not retried by the client)."""


class UploadSlots:
    """The uploads in progress on this replica, capped in all and per client."""

    def __init__(self, per_replica: int, per_client: int) -> None:
        self.per_replica = per_replica
        self.per_client = per_client
        self.active: set = set()  # the broker's Upload objects in progress
        self._by_client: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def hold(self, client_id: str, upload):
        if len(self.active) >= self.per_replica:
            raise TooManyUploads(
                f"this replica has {len(self.active)} uploads in progress, the most it takes"
            )
        if self._by_client[client_id] >= self.per_client:
            raise TooManyUploads(
                f"client {client_id[:80]!r} has {self.per_client} uploads in progress already"
            )
        self.active.add(upload)
        self._by_client[client_id] += 1
        try:
            yield
        finally:
            self.active.discard(upload)
            self._by_client[client_id] -= 1
            if not self._by_client[client_id]:
                del self._by_client[client_id]


class ModelServicer(pb_grpc.ModelServiceServicer):
    def __init__(
        self,
        broker: Broker,
        max_model_bytes: int,
        cache_bytes: int,
        upload_idle_timeout: float = 120.0,
        max_uploads: int = 256,
        max_uploads_per_client: int = 2,
    ) -> None:
        self.broker = broker
        self.max_model_bytes = max_model_bytes
        self.cache = ModelCache(cache_bytes)
        self.upload_idle_timeout = upload_idle_timeout
        self.uploads = UploadSlots(max_uploads, max_uploads_per_client)

    async def Upload(self, request_iterator, context) -> pb.ModelResponse:
        meta = {k: v for k, v in (context.invocation_metadata() or ())}
        model_id = meta.get("model-id", "")
        if not model_id:
            raise InvalidInput("Upload needs the model-id metadata")
        expected = meta.get("checksum", "").lower()
        if not expected:
            # grpc.aio ends the request stream of a cancelled call just like a finished one;
            # only the checksum tells a truncated upload from a whole one. (1.0.0 sends it.)
            raise InvalidInput("Upload needs the checksum metadata (SHA-256 hex of the model)")
        if len(expected) != 64 or not _HEX.issuperset(expected):
            # checked before the upload begins: a wrong one could only fail at the end
            raise InvalidInput("the checksum metadata must be 64 hex digits (SHA-256)")
        caller = current_caller.get()
        if caller is not None:  # the token's client uploads, whatever the metadata claims
            bind(caller, metadata_client_id=meta.get("client-id", ""),
                 metadata_client=meta.get("client", ""))  # fmt: skip
            client_id = caller.client_id
        else:
            client_id = meta.get("client-id", "") or meta.get("client", "")
        # strict: an id another client holds is refused at begin, before a chunk is read
        upload = self.broker.models.upload(
            model_id, self.max_model_bytes, uploader=client_id, strict=caller is not None
        )
        with self.uploads.hold(client_id, upload):
            # context.read(), not request_iterator: grpc's iterator keeps the last message
            # in its frame while it waits for the next one.
            return await self._upload(upload, expected, context)

    async def _next_data(self, context) -> bytes | None:
        """The next chunk's bytes (None at the end); UploadIdle if none comes in time."""
        try:
            async with asyncio.timeout(self.upload_idle_timeout):
                chunk = await context.read()
        except TimeoutError:
            raise UploadIdle(
                f"no chunk for {self.upload_idle_timeout:g}s: upload abandoned, send it again"
            ) from None
        if chunk is grpc.aio.EOF:
            return None
        return chunk.data  # the message itself is dropped here, only its bytes go on

    async def _upload(self, upload, expected: str, context) -> pb.ModelResponse:
        model_id = upload.model_id
        await upload.begin()
        try:
            while (data := await self._next_data(context)) is not None:
                if data:
                    await upload.write(data)
                del data  # not held while waiting for the next chunk
            if expected != upload.sha256:
                await upload.abort()
                log.warning("upload %s: checksum mismatch, discarded", model_id)
                return pb.ModelResponse(
                    status=pb.ModelStatus.FAILED,
                    message=f"checksum mismatch: got {upload.sha256}, expected {expected}",
                )
            result = await upload.commit()
        except BaseException as exc:
            # Too large, idle, Redis gone, client cancelled: nothing becomes visible.
            if isinstance(exc, UploadIdle):
                log.warning("upload %s: %s", model_id, exc)
            try:
                await upload.abort()
            except BrokerError as err:  # the staged upload expires by itself
                log.warning("upload %s: cleanup failed: %s", model_id, err)
            raise
        log.info("model %s stored (%d bytes, %s)", model_id, upload.size, result)
        return pb.ModelResponse(status=pb.ModelStatus.OK, message=f"stored {upload.size} bytes")

    async def Download(self, request: pb.ModelRequest, context):
        """Yields encoded FileChunk messages (bytes): see add_to_server."""
        model_id = request.model_id
        if not model_id:
            raise InvalidInput("model_id is empty")
        caller = current_caller.get()
        if caller is not None:  # the metadata may name only the token's client
            meta = {k: v for k, v in (context.invocation_metadata() or ())}
            bind(caller, metadata_client_id=meta.get("client-id", ""),
                 metadata_client=meta.get("client", ""))  # fmt: skip
        models = self.broker.models
        meta = await models.ready_meta(model_id)
        if caller is not None and caller.role != Role.ADMIN:
            await self._may_download(caller.client_id, model_id, meta)
        async for frame in self.cache.stream(model_id, meta, lambda: models.chunks(model_id, meta)):
            yield frame
        # The client verifies this trailer; it must be right or absent (§3.2).
        context.set_trailing_metadata((("checksum", meta["sha256"]),))

    async def _may_download(self, client_id: str, model_id: str, meta: dict) -> None:
        """A client downloads only models it was given: the model of one of its tasks, one
        it uploaded itself, or a current global model (broker.sessions.current_models).
        Cheapest check first: a task's model is what the 1.0.0 client asks for."""
        if meta.get("uploader") == client_id:
            return
        if await self.broker.tasks.was_given(client_id, model_id):
            return
        if model_id in await self.broker.sessions.current_models():
            return
        raise PermissionDenied(
            f"model {model_id[:80]!r} was not given to client {client_id[:80]!r}"
        )


def add_to_server(servicer: ModelServicer, server: grpc.aio.Server) -> None:
    """The generated registration, except that Download sends the cache's pre-encoded
    FileChunk bytes as they are (no serializer): no message object, no copy per chunk."""
    handlers = {
        "Upload": grpc.stream_unary_rpc_method_handler(
            servicer.Upload,
            request_deserializer=pb.FileChunk.FromString,
            response_serializer=pb.ModelResponse.SerializeToString,
        ),
        "Download": grpc.unary_stream_rpc_method_handler(
            servicer.Download, request_deserializer=pb.ModelRequest.FromString
        ),
    }
    name = pb.DESCRIPTOR.services_by_name["ModelService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
