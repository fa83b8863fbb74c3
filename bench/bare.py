"""The baseline server: a bare grpc.aio process serving the same services with empty
handlers (no Redis, no parsing, no bookkeeping), and the same server options as a replica.

* CombinerClient: every unary RPC answers an empty message at once; TaskStream holds the
  stream until ``/bench.Control/Release`` releases one TaskRequest to every open stream.
* ModelService: Download streams ``size`` bytes (the model id is ``bare-<size>``) from
  memory in 1 MiB chunks (distinct bytes, made on first use, so they are no more cache-hot
  than a replica's); Upload reads and discards the chunks.
* ``/bench.Control/Count`` answers the number of open TaskStreams (readiness for fanout).

``python -m bench.bare [--port 0]`` prints ``listening on HOST:PORT`` like ``combiner serve``.

It also runs on another grpcio than ours (bench/grpc_versions.py): that venv's Python runs
this file isolated (``python -I bench/bare.py --stubs DIR --options JSON``) with the stubs
that venv's grpcio-tools made from proto/scaleout.proto, and the replica's server options
handed over as JSON, so it imports nothing of this repository.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys

import grpc

if __name__ == "__main__" and "--stubs" in sys.argv:  # another venv's stubs (see above)
    sys.path.insert(0, sys.argv[sys.argv.index("--stubs") + 1])

from combiner.pb import scaleout_pb2 as pb
from combiner.pb import scaleout_pb2_grpc as pb_grpc

CHUNK = 1024 * 1024


class BareCombiner(pb_grpc.CombinerClientServicer):
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.generation = 0
        self.open_streams = 0

    async def SendModelUpdate(self, request, context):
        return pb.Response()

    async def SendModelValidation(self, request, context):
        return pb.Response()

    async def SendModelPrediction(self, request, context):
        return pb.Response()

    async def SendModelMetric(self, request, context):
        return pb.Response()

    async def SendAttributeMessage(self, request, context):
        return pb.Response()

    async def SendTelemetryMessage(self, request, context):
        return pb.Response()

    async def SendStatus(self, request, context):
        return pb.Response()

    async def SendHeartbeat(self, request, context):
        return pb.Response()

    async def Announce(self, request, context):
        return pb.Response()

    async def PollAndReport(self, request, context):
        return pb.TaskRequest()

    async def TaskStream(self, request, context):
        self.open_streams += 1
        try:
            while True:
                event = self.release
                await event.wait()
                yield pb.TaskRequest(
                    correlation_id=f"bare-{self.generation}-{request.client_id}",
                    type="Custom_bench",
                    data="{}",
                    client_id=request.client_id,
                )
        finally:
            self.open_streams -= 1

    def fire(self) -> int:
        """Release one message to every open stream; returns how many were open."""
        self.generation += 1
        event, self.release = self.release, asyncio.Event()
        event.set()
        return self.open_streams


class BareModels(pb_grpc.ModelServiceServicer):
    def __init__(self) -> None:
        self.models: dict[int, list[bytes]] = {}  # size -> its chunks

    def chunks(self, size: int) -> list[bytes]:
        if size not in self.models:
            data = random.randbytes(size)
            self.models[size] = [data[i : i + CHUNK] for i in range(0, size, CHUNK)]
        return self.models[size]

    async def Upload(self, request_iterator, context):
        size = 0
        async for chunk in request_iterator:
            size += len(chunk.data)
        return pb.ModelResponse(status=pb.ModelStatus.OK, message=f"stored {size} bytes")

    async def Download(self, request, context):
        for chunk in self.chunks(int(request.model_id.rsplit("-", 1)[-1])):
            yield pb.FileChunk(data=chunk)


def control_handler(combiner: BareCombiner) -> grpc.GenericRpcHandler:
    async def release(request: bytes, context) -> bytes:
        return str(combiner.fire()).encode()

    async def count(request: bytes, context) -> bytes:
        return str(combiner.open_streams).encode()

    return grpc.method_handlers_generic_handler(
        "bench.Control",
        {
            "Release": grpc.unary_unary_rpc_method_handler(release),
            "Count": grpc.unary_unary_rpc_method_handler(count),
        },
    )


def replica_options() -> list[tuple[str, int]]:
    from combiner.server import ServeOptions, grpc_options

    return grpc_options(ServeOptions())


async def serve(host: str, port: int, options: list[tuple[str, int]]) -> None:
    server = grpc.aio.server(options=options)
    combiner = BareCombiner()
    pb_grpc.add_CombinerClientServicer_to_server(combiner, server)
    pb_grpc.add_ModelServiceServicer_to_server(BareModels(), server)
    server.add_generic_rpc_handlers((control_handler(combiner),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--stubs", help="import combiner.pb from this folder")
    parser.add_argument("--options", help="server options as JSON (default: a replica's)")
    args = parser.parse_args()
    options = [tuple(o) for o in json.loads(args.options)] if args.options else replica_options()
    print(f"grpcio {grpc.__version__}", flush=True)
    asyncio.run(serve(args.host, args.port, options))


if __name__ == "__main__":
    main()
