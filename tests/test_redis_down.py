"""Redis goes away under a running replica (docs/architecture.md contracts 1 and 6, docs/protocol.md
§3.2): RPCs get FAILED_PRECONDITION after bounded internal retries (never UNAVAILABLE, which
kills the 1.0.0 client), the replica recovers by itself when Redis is back, and with
``appendfsync always`` nothing acknowledged is lost across a SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from combiner.pb import scaleout_pb2 as pb
from tests.conftest import meta, replica_at
from tests.services import RedisServer

RPC_DEADLINE = 60  # seconds; far above the retry budget, only so a hang fails the test
# A paused Redis accepts connections and never answers, so only the per-call deadline
# (docs/operations.md "Redis time per call", 4 s) ends a call; this one, well above it but
# below the old socket timeout plus a retry, fails the test if a call waits for Redis.
PAUSED_RPC_DEADLINE = 15


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def aof_server():
    server = RedisServer(appendonly=True, fsync="always").start()
    yield server
    server.close()


def metric(value: float = 1.0) -> pb.ModelMetric:
    return pb.ModelMetric(client_id="c1", metrics=[pb.MetricElem(key="loss", value=value)])


async def poll(stubs):
    return await stubs.combiner.PollAndReport(
        pb.ActivityReport(node_id="c1"), metadata=meta(), timeout=RPC_DEADLINE
    )


async def send_metric(stubs, value: float = 1.0):
    return await stubs.combiner.SendModelMetric(
        metric(value), metadata=meta(), timeout=RPC_DEADLINE
    )


async def code_of(coro) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    return err.value.code()


async def until_ok(call, within: float = 30.0):
    """Retry like the 1.0.0 client: FAILED_PRECONDITION means 'try again later'."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
            if time.monotonic() > deadline:
                raise AssertionError(f"still failing after {within}s: {exc.details()}") from exc
            await asyncio.sleep(0.05)


async def test_redis_down_gives_failed_precondition_then_recovers(redis_server):
    async with replica_at(redis_server.url) as (replica, stubs):
        corr = await replica.broker.tasks.push("c1", "Fedn_Validation", model_id="m")
        assert (await poll(stubs)).correlation_id == corr
        await send_metric(stubs)

        redis_server.kill()
        assert await code_of(poll(stubs)) == grpc.StatusCode.FAILED_PRECONDITION
        assert await code_of(send_metric(stubs)) == grpc.StatusCode.FAILED_PRECONDITION
        # (one fresh client each: a heartbeat within a second of an earlier write of that
        # client's last_seen is answered from the replica's presence throttle, by design)
        for rpc, request in (
            ("SendStatus", pb.Status(client_id="c2", status="x")),
            ("SendHeartbeat", pb.Heartbeat(client_id="c3")),
            ("Announce", pb.ClientAnnounceRequest(client_id="c4", type="Connect")),
        ):
            call = getattr(stubs.combiner, rpc)(request, timeout=RPC_DEADLINE)
            assert await code_of(call) == grpc.StatusCode.FAILED_PRECONDITION, rpc
        download = stubs.models.Download(pb.ModelRequest(model_id="m"), timeout=RPC_DEADLINE)
        assert await code_of(download.read()) == grpc.StatusCode.FAILED_PRECONDITION

        # Same port, empty data (no persistence) and an empty script cache: the replica
        # must reconnect and reload its scripts by itself.
        redis_server.start()
        await until_ok(lambda: poll(stubs))
        await until_ok(lambda: send_metric(stubs, 2.0))

        entries = await replica.broker._redis.xrange(replica.broker._keys.inbound("metrics"))
        assert entries and entries[-1][1][b"client_id"] == b"c1"
        # and the rest works again too: a new task is handed out and a model round-trips
        corr = await replica.broker.tasks.push("c1", "Fedn_Validation", model_id="m")
        assert (await poll(stubs)).correlation_id == corr
        await replica.broker.models.put(b"after the restart", "m2")
        call = stubs.models.Download(pb.ModelRequest(model_id="m2"), metadata=meta())
        assert b"".join([c.data async for c in call]) == b"after the restart"


async def test_paused_redis_gives_failed_precondition_before_it_resumes(redis_server):
    """SIGSTOP: Redis keeps its port and never answers. Calls give up within their budget
    with FAILED_PRECONDITION while the pause lasts; after SIGCONT the next RPC succeeds."""
    async with replica_at(redis_server.url) as (replica, stubs):
        corr = await replica.broker.tasks.push("c1", "Fedn_Validation", model_id="m")
        assert (await poll(stubs)).correlation_id == corr
        await send_metric(stubs)
        await replica.broker.models.put(b"model bytes", "m")

        pid = redis_server.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            for rpc, request in (
                ("SendModelMetric", metric()),
                ("PollAndReport", pb.ActivityReport(node_id="c1")),
                ("SendStatus", pb.Status(client_id="c2", status="x")),
            ):
                call = getattr(stubs.combiner, rpc)(
                    request, metadata=meta(), timeout=PAUSED_RPC_DEADLINE
                )
                assert await code_of(call) == grpc.StatusCode.FAILED_PRECONDITION, rpc
            download = stubs.models.Download(
                pb.ModelRequest(model_id="m"), metadata=meta(), timeout=PAUSED_RPC_DEADLINE
            )
            assert await code_of(download.read()) == grpc.StatusCode.FAILED_PRECONDITION
            assert redis_server.process.poll() is None  # still paused, not gone
        finally:
            os.kill(pid, signal.SIGCONT)

        # the connections the deadline cut were dropped, not left with a reply half-read
        await send_metric(stubs, 3.0)
        entries = await replica.broker._redis.xrange(replica.broker._keys.inbound("metrics"))
        assert len(entries) >= 2
        call = stubs.models.Download(pb.ModelRequest(model_id="m"), metadata=meta())
        assert b"".join([c.data async for c in call]) == b"model bytes"


async def test_streams_and_pubsub_come_back_after_a_restart(redis_server):
    async with replica_at(redis_server.url) as (replica, stubs):
        subscribed = replica.broker.wakeups.resubscribes
        redis_server.kill()
        redis_server.start()

        async def task_via_stream():
            corr = await replica.broker.tasks.push("c1", "Fedn_Validation", model_id="m")
            call = stubs.combiner.TaskStream(pb.ClientAvailableMessage(client_id="c1"))
            try:
                msg = await asyncio.wait_for(call.read(), 15)
                while msg is not grpc.aio.EOF and not msg.correlation_id:
                    msg = await asyncio.wait_for(call.read(), 15)
                return msg, corr
            finally:
                call.cancel()

        msg, corr = await until_ok(task_via_stream)
        assert msg.correlation_id == corr
        deadline = time.monotonic() + 15
        while replica.broker.wakeups.resubscribes <= subscribed:
            assert time.monotonic() < deadline, "the wake-up subscription never came back"
            await asyncio.sleep(0.02)


async def test_acknowledged_metric_survives_sigkill_with_appendfsync_always(aof_server):
    async with replica_at(aof_server.url) as (replica, stubs):
        await send_metric(stubs, 0.5)  # OK: it is in Redis and, with fsync always, on disk
        aof_server.kill()  # SIGKILL right after the OK
        aof_server.start()  # same port and data folder: the AOF is replayed

        async def read_back():
            return await replica.broker._redis.xrange(replica.broker._keys.inbound("metrics"))

        entries = await until_redis(read_back)
        assert len(entries) == 1
        fields = entries[0][1]
        assert fields[b"client_id"] == b"c1"
        # the replica itself keeps working against the restarted server
        await until_ok(lambda: send_metric(stubs, 0.25))
        assert len(await read_back()) == 2


async def until_redis(fn, within: float = 15.0):
    """Call fn until the test's own Redis reads stop failing (connections are being reset)."""
    import redis.exceptions as rex

    deadline = time.monotonic() + within
    while True:
        try:
            return await fn()
        except (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
