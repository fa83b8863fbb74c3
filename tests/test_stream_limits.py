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
import uuid

import grpc
import pytest
from prometheus_client import REGISTRY

from broker import InvalidInput
from broker.inbound import ENTRY_LIMITS
from broker.tasks import MAX_TASK_DATA, STREAM_TAKE_BYTES
from combiner.pb import scaleout_pb2 as pb
from tests.conftest import Stubs, meta, next_task
from tests.services import data_keys, eventually, inbound_length
from workers.records import GROUP, Records

pytestmark = pytest.mark.topologies

BIG = 60 * 1024  # bytes of task data per task (MAX_TASK_DATA is 64 KiB)
TASKS = 300  # 18 MiB queued: far more than a client's flow-control window


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


# --- task data an operator pushes ---------------------------------------------------------


async def test_task_data_past_the_limit_is_refused_and_nothing_is_written(broker):
    data = json.dumps({"blob": "x" * MAX_TASK_DATA})
    with pytest.raises(InvalidInput, match="at most"):
        await broker.tasks.push("c1", "Custom_big", data=data)
    with pytest.raises(InvalidInput, match="at most"):
        await broker.tasks.push_many(["c1", "c2"], "Custom_big", data=data)
    assert await prefixed_keys(broker) == []
    # at the limit it is queued
    fits = json.dumps({"b": "x" * (MAX_TASK_DATA - 9)})
    assert len(fits) == MAX_TASK_DATA
    await broker.tasks.push("c1", "Custom_big", data=fits)
    assert await broker.tasks.queued("c1") == 1


def test_cli_task_push_refuses_oversized_data(redis_url, prefix):
    import redis

    from tests.test_cli import assert_clean_failure, keys_under, run

    data = json.dumps({"blob": "x" * MAX_TASK_DATA})  # below the 128 KiB an argument may have
    proc = run("task", "push", "--client", "c1", "--type", "Custom_x", "--data", data,
               "--redis-url", redis_url, "--prefix", prefix)  # fmt: skip
    assert_clean_failure(proc, "at most")
    assert keys_under(redis.Redis.from_url(redis_url), prefix) == []


# --- inbound message sizes ----------------------------------------------------------------


async def prefixed_keys(broker) -> list[bytes]:
    """The prefix's keys but the schema marks connect() wrote (broker/schema.py)."""
    return sorted(await data_keys(broker))


async def test_oversized_status_and_metric_are_refused_and_nothing_is_written(stubs, broker):
    # the status text alone is over its own limit (broker/limits.py); the metric's and the
    # telemetry's fields are each within theirs, the entry as a whole over its kind's cap
    status = pb.Status(client_id="c1", status="x" * ENTRY_LIMITS["statuses"])
    metric = pb.ModelMetric(client_id="c1", session_id="s")
    for i in range(ENTRY_LIMITS["metrics"] // 200 + 1):
        metric.metrics.add(key=f"{i:05}" + "k" * 200, value=0.5)
    telemetry = pb.TelemetryMessage(client_id="c1")
    telemetry.telemetries.add(key="cpu", value=1.0)
    for _ in range(ENTRY_LIMITS["telemetry"] // 10):
        telemetry.telemetries.add(key=uuid.uuid4().hex[:10], value=1.0)
    before = await prefixed_keys(broker)  # the replica's own registration
    for rpc, message in [
        (stubs.combiner.SendStatus, status),
        (stubs.combiner.SendModelMetric, metric),
        (stubs.combiner.SendTelemetryMessage, telemetry),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rpc(message, metadata=meta("c1"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "too large" in err.value.details() or "longer than" in err.value.details()
    assert await prefixed_keys(broker) == before  # not even the client's presence

    # a real client's status still lands
    await stubs.combiner.SendStatus(pb.Status(client_id="c1", status="ok"), metadata=meta("c1"))
    assert await inbound_length(broker, "statuses") == 1


async def test_oversized_validation_is_refused(stubs, broker):
    corr = await broker.tasks.push("c1", "Fedn_Validation", model_id="m")
    big = pb.ModelValidation(
        client_id="c1", correlation_id=corr, data="x" * ENTRY_LIMITS["validations"]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.combiner.SendModelValidation(big, metadata=meta("c1"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await inbound_length(broker, "validations") == 0
    assert "result_at" not in await broker.tasks.show(corr)


# --- records of unknown sessions ----------------------------------------------------------


async def test_a_metric_naming_an_unknown_session_creates_no_session_key(stubs, broker):
    session_id = await broker.sessions.create({"rounds": 1}, "seed")
    for sid in ("no-such-session", session_id):
        metric = pb.ModelMetric(client_id="c1", session_id=sid)
        metric.metrics.add(key="loss", value=0.5)
        await stubs.combiner.SendModelMetric(metric, metadata=meta("c1"))
    records = Records(broker, "w1")
    await broker.inbound.ensure_group(GROUP)
    await records.handle(await broker.inbound.read(GROUP, "w1", block_ms=100))
    assert records.processed == 2

    keys = broker._keys
    assert await broker._redis.exists(keys.session_records(session_id, "metrics")) == 1
    assert await broker._redis.exists(keys.session_records("no-such-session", "metrics")) == 0
    assert await broker._redis.exists(keys.session("no-such-session")) == 0
    # it is kept for the client
    assert await broker._redis.llen(keys.client_records("c1", "metrics")) == 2
