"""TaskStream against real replicas and Redis (docs/protocol.md §4.11, docs/architecture.md
contract 3): queued tasks reach an open stream once, whichever replica holds it, also across a lost
pub/sub connection."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from combiner.pb import scaleout_pb2 as pb
from tests.conftest import Stubs, meta, next_task
from tests.services import eventually, inbound_length

pytestmark = pytest.mark.topologies


def open_stream(stubs, client_id: str = "c1"):
    return stubs.combiner.TaskStream(
        pb.ClientAvailableMessage(client_id=client_id), metadata=meta(client_id)
    )


async def stream_ready(replica, client_id: str = "c1") -> None:
    """Wait until the replica holds the stream and listens for wake-ups."""

    async def ready():
        return (
            replica.combiner.open_streams.get(client_id, 0) >= 1
            and replica.broker.wakeups.connected.is_set()
        )

    await eventually(ready, what="the stream to be open")


@contextlib.asynccontextmanager
async def channel_to(replica):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
        yield Stubs(channel)


async def test_tasks_before_and_after_opening_are_delivered_once(stubs, broker, replica):
    before = [await broker.tasks.push("c1", "Fedn_Validation", model_id="m") for _ in range(2)]
    call = open_stream(stubs)
    got = [(await next_task(call)).correlation_id for _ in range(2)]
    assert got == before  # FIFO

    await stream_ready(replica)
    after = [await broker.tasks.push("c1", "Fedn_Prediction", model_id="m") for _ in range(3)]
    got += [(await next_task(call)).correlation_id for _ in range(3)]
    # a sentinel: anything delivered twice would have come before it
    sentinel = await broker.tasks.push("c1", "Fedn_Validation", model_id="m")
    got.append((await next_task(call)).correlation_id)
    assert got == [*before, *after, sentinel]

    for corr in got:
        record = await broker.tasks.show(corr)
        assert (record["state"], record["attempts"], record["via"]) == ("delivered", "1", "stream")
    assert await broker.tasks.queued("c1") == 0
    call.cancel()


async def test_streamed_task_carries_the_task_fields(stubs, broker):
    corr = await broker.tasks.push(
        "c1", "Fedn_ModelUpdate", model_id="g", session_id="s", round_id="4", data="{}"
    )
    task = await next_task(open_stream(stubs))
    assert (task.correlation_id, task.type, task.model_id) == (corr, "Fedn_ModelUpdate", "g")
    assert (task.session_id, task.round_id, task.client_id) == ("s", "4", "c1")
    assert '"client_settings"' in task.data


async def test_more_queued_tasks_than_one_take_are_all_delivered(stubs, broker):
    # one read of the queue takes at most 100 tasks; the rest must follow without a new push
    pushed = [await broker.tasks.push("c1", "Fedn_Validation", model_id="m") for _ in range(130)]
    call = open_stream(stubs)
    got = [(await next_task(call)).correlation_id for _ in range(130)]
    assert got == pushed
    call.cancel()


async def test_two_streams_of_one_client_on_two_replicas_share_tasks_once(make_replica, broker):
    r1, r2 = await make_replica(), await make_replica()
    async with channel_to(r1) as s1, channel_to(r2) as s2:
        calls = [open_stream(s1), open_stream(s2)]
        await stream_ready(r1)
        await stream_ready(r2)
        received: list[list[str]] = [[], []]

        async def collect(call, out):
            async for msg in call:
                if msg.correlation_id:
                    out.append(msg.correlation_id)

        readers = [
            asyncio.ensure_future(collect(c, o)) for c, o in zip(calls, received, strict=True)
        ]
        pushed = await asyncio.gather(
            *(broker.tasks.push("c1", "Fedn_Validation", model_id="m") for _ in range(40))
        )

        async def all_arrived():
            return len(set(received[0]) | set(received[1])) == len(pushed)

        await eventually(all_arrived, what="every task on one of the two streams")
        both = received[0] + received[1]
        assert sorted(both) == sorted(pushed)  # each task on exactly one stream, once
        for corr in pushed:
            record = await broker.tasks.show(corr)
            assert (record["state"], record["attempts"]) == ("delivered", "1")
        assert await broker.tasks.queued("c1") == 0
        for call in calls:
            call.cancel()
        for reader in readers:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader


async def kill_shard_subscribers(cluster) -> int:
    """Drop every shard-channel subscriber's connection on every primary (Redis 7.0's
    CLIENT KILL TYPE pubsub does not count them), as a failover would."""
    killed = 0
    for node in cluster.get_primaries():
        for client in await cluster.execute_command("CLIENT LIST", target_nodes=node):
            if int(client.get("ssub", 0)) > 0:
                cmd = ("CLIENT KILL", "ID", client["id"])
                killed += await cluster.execute_command(*cmd, target_nodes=node)
    return killed


async def test_task_pushed_while_pubsub_is_down_is_delivered_after_recovery(stubs, broker, replica):
    call = open_stream(stubs)
    first = await broker.tasks.push("c1", "Fedn_Validation", model_id="m")
    assert (await next_task(call)).correlation_id == first
    await stream_ready(replica)
    subscribed = replica.broker.wakeups.resubscribes

    # Kill the replica's pub/sub connection and push in the same MULTI/EXEC (the test's
    # broker batches concurrent calls), so the push's wake-up is certainly published while
    # nobody listens: only the recovery after the resubscribe can deliver the task.
    def kill(pipe):
        pipe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        return lambda replies: replies[0]

    if broker.cluster:  # no MULTI across nodes: kill on every primary, push right after
        killed = await kill_shard_subscribers(broker._redis)
        corr = await broker.tasks.push("c1", "Fedn_Validation", model_id="m")
    else:
        killed, corr = await asyncio.gather(
            broker._batcher.submit(kill),
            broker.tasks.push("c1", "Fedn_Validation", model_id="m"),
        )
    assert killed >= 1
    assert (await next_task(call, within=15)).correlation_id == corr

    async def resubscribed():
        return replica.broker.wakeups.resubscribes > subscribed

    await eventually(resubscribed, what="the wake-up subscription to come back")

    # and wake-ups work again on the new connection
    later = await broker.tasks.push("c1", "Fedn_Validation", model_id="m")
    assert (await next_task(call)).correlation_id == later
    call.cancel()


async def test_idle_stream_gets_keepalives(make_replica):
    replica = await make_replica(stream_keepalive=0.2)
    async with channel_to(replica) as stubs:
        call = open_stream(stubs)
        for _ in range(2):
            msg = await asyncio.wait_for(call.read(), 10)
            assert msg == pb.TaskRequest()  # empty: the client ignores it
        call.cancel()


@pytest.mark.parametrize(
    ("task_type", "rpc", "message", "field"),
    [
        ("Fedn_ModelUpdate", "SendModelUpdate", pb.ModelUpdate, "model_update_id"),
        ("Fedn_Validation", "SendModelValidation", pb.ModelValidation, "result"),
        ("Fedn_Prediction", "SendModelPrediction", pb.ModelPrediction, "result"),
    ],
)
async def test_streamed_task_completes_with_its_result(
    stubs, broker, task_type, rpc, message, field
):
    corr = await broker.tasks.push("c1", task_type, model_id="g")
    task = await next_task(open_stream(stubs))
    assert task.correlation_id == corr
    if message is pb.ModelUpdate:
        await broker.models.put(b"trained", "upd-1")
        request = message(client_id="c1", correlation_id=corr, model_update_id="upd-1")
        expected = "upd-1"
    else:
        request = message(client_id="c1", correlation_id=corr, data='{"acc": 1}')
        expected = '{"acc": 1}'
    await getattr(stubs.combiner, rpc)(request, metadata=meta())
    record = await broker.tasks.show(corr)
    assert record["state"] == "completed" and record[field] == expected


async def test_open_stream_keeps_the_client_online_and_closing_ends_the_lease(
    stubs, broker, replica
):
    call = open_stream(stubs)
    await stream_ready(replica)

    async def lease():
        return await broker._redis.zscore(
            broker._keys.streams(broker._keys.partition_of("c1")), "c1"
        )

    assert await eventually(lease, what="a stream lease")
    assert "c1" in await broker.presence.online()
    call.cancel()

    async def lease_gone():
        return await lease() is None and "c1" not in replica.combiner.open_streams

    await eventually(lease_gone, what="the stream lease to end")


async def test_draining_replica_ends_the_stream_without_unavailable(make_replica, broker):
    replica = await make_replica()
    async with channel_to(replica) as stubs:
        call = open_stream(stubs)
        await stream_ready(replica)
        await replica.stop(grace=5)
        with contextlib.suppress(grpc.aio.AioRpcError):
            assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
        # the stream ends, with a status the 1.0.0 client survives (§3.2)
        assert await asyncio.wait_for(call.code(), 10) != grpc.StatusCode.UNAVAILABLE


async def test_empty_client_id_is_invalid_argument(stubs, broker):
    call = stubs.combiner.TaskStream(pb.ClientAvailableMessage())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await broker.presence.online() == []
    assert await inbound_length(broker, "presence") == 0
