"""Bounded TaskStreams and inbound entries against a real replica and Redis (docs/operations.md,
"Slow TaskStream readers and inbound sizes"): a client that does not read its TaskStream
makes the replica take no more of its tasks than one take, its stream ends with
FAILED_PRECONDITION and its tasks reach its next stream; oversized task data and inbound
messages are refused with nothing written; records never create a session that does not
exist."""

from __future__ import annotations

import asyncio
import contextlib
import json

import grpc
from prometheus_client import REGISTRY

from broker.tasks import STREAM_TAKE_BYTES
from combiner.pb import scaleout_pb2 as pb
from tests.conftest import Stubs, meta, next_task
from tests.services import eventually

BIG = 256 * 1024  # bytes of task data per task
TASKS = 80  # 20 MiB queued: far more than a client's flow-control window


def stalled_streams() -> float:
    return REGISTRY.get_sample_value("combiner_stalled_task_streams_total") or 0.0


async def test_a_stream_that_is_not_read_takes_one_batch_and_ends(make_replica, broker):
    replica = await make_replica(stream_write_timeout=0.5)
    data = json.dumps({"blob": "x" * BIG})
    pushed = [await broker.tasks.push("c1", "Custom_big", data=data) for _ in range(TASKS)]
    before = stalled_streams()

    async def taken() -> list[str]:
        return [c for c in pushed if (await broker.tasks.show(c))["state"] == "delivered"]

    async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
        stubs = Stubs(channel)
        call = stubs.combiner.TaskStream(
            pb.ClientAvailableMessage(client_id="c1"), metadata=meta("c1")
        )
        await call.wait_for_connection()
        # the client reads nothing: the replica flags the stream as stalled
        await eventually(
            lambda: asyncio.sleep(0, stalled_streams() > before), within=30, what="a stall"
        )
        held = await taken()
        assert len(held) < TASKS  # the rest never left Redis's queue
        assert await broker.tasks.queued("c1") == TASKS - len(held)

        # now it reads: what reached its transport, then FAILED_PRECONDITION
        got = []
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (msg := await call.read()) is not grpc.aio.EOF:
                if msg.correlation_id:
                    got.append(msg.correlation_id)
        assert await call.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert got == held[: len(got)]
        # taken from Redis but never sent: at most one take (the replica's in-flight bound)
        assert len(held) - len(got) <= STREAM_TAKE_BYTES // BIG + 1
        assert await taken() == held  # nothing taken after the stall

        # the next stream gets every task: the unanswered ones again, then the queued ones
        call = stubs.combiner.TaskStream(
            pb.ClientAvailableMessage(client_id="c1"), metadata=meta("c1")
        )
        again = [(await next_task(call)).correlation_id for _ in range(TASKS)]
        assert sorted(again) == sorted(pushed)  # each once (same-take order may differ)
        call.cancel()
