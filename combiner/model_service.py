"""ModelService: Upload and Download of model bytes (docs/protocol.md §4.4, §4.5)."""

from __future__ import annotations

import logging

import grpc

from broker import Broker, InvalidInput
from broker.errors import BrokerError
from combiner.model_cache import ModelCache
from combiner.pb import scaleout_pb2 as pb
from combiner.pb import scaleout_pb2_grpc as pb_grpc

log = logging.getLogger("combiner")

_HEX = frozenset("0123456789abcdef")


class ModelServicer(pb_grpc.ModelServiceServicer):
    def __init__(self, broker: Broker, max_model_bytes: int, cache_bytes: int) -> None:
        self.broker = broker
        self.max_model_bytes = max_model_bytes
        self.cache = ModelCache(cache_bytes)

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
        upload = self.broker.models.upload(model_id, self.max_model_bytes)
        await upload.begin()
        try:
            async for chunk in request_iterator:
                if chunk.data:
                    await upload.write(chunk.data)
            if expected != upload.sha256:
                await upload.abort()
                log.warning("upload %s: checksum mismatch, discarded", model_id)
                return pb.ModelResponse(
                    status=pb.ModelStatus.FAILED,
                    message=f"checksum mismatch: got {upload.sha256}, expected {expected}",
                )
            result = await upload.commit()
        except BaseException:
            # Too large, Redis gone, client cancelled: nothing becomes visible.
            try:
                await upload.abort()
            except BrokerError as exc:  # the staged upload expires by itself
                log.warning("upload %s: cleanup failed: %s", model_id, exc)
            raise
        log.info("model %s stored (%d bytes, %s)", model_id, upload.size, result)
        return pb.ModelResponse(status=pb.ModelStatus.OK, message=f"stored {upload.size} bytes")

    async def Download(self, request: pb.ModelRequest, context):
        """Yields encoded FileChunk messages (bytes): see add_to_server."""
        model_id = request.model_id
        if not model_id:
            raise InvalidInput("model_id is empty")
        models = self.broker.models
        meta = await models.ready_meta(model_id)
        async for frame in self.cache.stream(model_id, meta, lambda: models.chunks(model_id, meta)):
            yield frame
        # The client verifies this trailer; it must be right or absent (§3.2).
        context.set_trailing_metadata((("checksum", meta["sha256"]),))


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
