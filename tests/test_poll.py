"""PollAndReport against a real replica and Redis: docs/protocol.md §4.2, step by step."""

from __future__ import annotations

import json

import grpc
import pytest

from broker import InvalidInput
from combiner.pb import scaleout_pb2 as pb
from tests.conftest import meta
from tests.services import data_keys

pytestmark = pytest.mark.topologies

IDLE = pb.ActivityReport(node_id="c1", status="")


async def poll(stubs, **report) -> pb.TaskRequest:
    report.setdefault("node_id", "c1")
    return await stubs.combiner.PollAndReport(pb.ActivityReport(**report), metadata=meta())


async def test_idle_poll_without_tasks_is_empty_and_marks_client_online(stubs, broker):
    reply = await poll(stubs, status="")
    assert reply == pb.TaskRequest()
    assert await broker.presence.online() == ["c1"]
    record = await broker.presence.client("c1")
    assert record["status"] == "online" and record["name"] == "c1"


async def test_task_is_handed_out_once_then_reported_done(stubs, broker):
    corr = await broker.tasks.push(
        "c1", "Fedn_ModelUpdate", model_id="m1", session_id="s1", round_id="1"
    )
    task = await poll(stubs, status="")
    assert task.correlation_id == corr
    assert task.type == "Fedn_ModelUpdate" and task.model_id == "m1"
    assert task.session_id == "s1" and task.round_id == "1" and task.client_id == "c1"
    data = json.loads(task.data)
    assert data["client_settings"] == {} and data["round_id"] == "1"

    # busy: progress reports never get a new task, and nothing is re-delivered
    await broker.tasks.push("c1", "Fedn_Validation", model_id="m1")
    for status in ("PENDING", "RUNNING"):
        reply = await poll(stubs, status=status, correlation_id=corr)
        assert reply.correlation_id == corr and reply.status == "" and reply.type == ""
        assert (await broker.tasks.show(corr))["state"] == status.lower()

    # done: the finished id is never echoed; the next queued task comes in the same reply
    reply = await poll(stubs, status="COMPLETED", correlation_id=corr, done=True)
    assert reply.correlation_id not in ("", corr) and reply.type == "Fedn_Validation"
    record = await broker.tasks.show(corr)
    assert record["state"] == "completed" and record["attempts"] == "1"
    assert record["report_status"] == "COMPLETED"


async def test_busy_poll_echoes_abort_and_timeout_flags(stubs, broker):
    a = await broker.tasks.push("c1", "Custom_echo", data="{}")
    assert (await poll(stubs, status="")).correlation_id == a
    assert await broker.tasks.flag(a, "abort") == "delivered"
    reply = await poll(stubs, status="RUNNING", correlation_id=a)
    assert (reply.correlation_id, reply.status) == (a, "INTERRUPTED")
    await poll(stubs, status="COMPLETED", correlation_id=a, done=True, response='{"x": 1}')

    b = await broker.tasks.push("c1", "Custom_echo", data="{}")
    assert (await poll(stubs, status="")).correlation_id == b
    await broker.tasks.flag(b, "timeout")
    reply = await poll(stubs, status="RUNNING", correlation_id=b)
    assert (reply.correlation_id, reply.status) == (b, "TIMEOUT")


async def test_flagged_queued_task_is_never_handed_out(stubs, broker):
    a = await broker.tasks.push("c1", "Fedn_Validation", model_id="m")
    b = await broker.tasks.push("c1", "Fedn_Validation", model_id="m")
    assert await broker.tasks.flag(a, "abort") == "queued"
    assert (await poll(stubs, status="")).correlation_id == b
    assert (await broker.tasks.show(a))["state"] == "cancelled"


async def test_report_for_unknown_task_gets_empty_reply(stubs, broker):
    await broker.tasks.push("c1", "Fedn_Validation", model_id="m")
    reply = await poll(stubs, status="RUNNING", correlation_id="never-issued")
    assert reply == pb.TaskRequest()
    # a done report for an unknown task is ignored, and the next task is handed out
    reply = await poll(stubs, status="COMPLETED", correlation_id="never-issued", done=True)
    assert reply.type == "Fedn_Validation"


async def test_idle_report_after_lost_reply_redelivers_the_same_task(stubs, broker):
    corr = await broker.tasks.push("c1", "Fedn_Validation", model_id="m")
    assert (await poll(stubs, status="")).correlation_id == corr
    # The client never saw that reply (it reports idle again): it gets the task again.
    again = await poll(stubs, status="")
    assert again.correlation_id == corr
    assert (await broker.tasks.show(corr))["attempts"] == "2"


async def test_idle_report_while_running_marks_the_task_lost(stubs, broker):
    corr = await broker.tasks.push("c1", "Fedn_Validation", model_id="m")
    await poll(stubs, status="")
    await poll(stubs, status="RUNNING", correlation_id=corr)
    assert await poll(stubs, status="") == pb.TaskRequest()
    assert (await broker.tasks.show(corr))["state"] == "lost"


async def test_two_tasks_to_two_clients_stay_apart(stubs, broker):
    a = await broker.tasks.push("c1", "Fedn_Validation", model_id="m")
    b = await broker.tasks.push("c2", "Fedn_Validation", model_id="m")
    r2 = await stubs.combiner.PollAndReport(pb.ActivityReport(node_id="c2"), metadata=meta("c2"))
    r1 = await poll(stubs, status="")
    assert (r1.correlation_id, r2.correlation_id) == (a, b)


async def test_push_many_queues_one_task_per_client_in_few_round_trips(stubs, broker):
    clients = [f"c{i}" for i in range(2500)]
    trips = broker._batcher.round_trips
    corrs = await broker.tasks.push_many(
        clients, "Fedn_ModelUpdate", model_id="m", session_id="s", round_id="2"
    )
    assert broker._batcher.round_trips - trips <= 3  # 1000 script calls per pipeline
    assert len(set(corrs)) == len(clients) and None not in corrs
    for client in ("c0", "c1234", "c2499"):
        task = await stubs.combiner.PollAndReport(
            pb.ActivityReport(node_id=client), metadata=meta(client)
        )
        assert task.correlation_id == corrs[clients.index(client)]
        assert task.client_id == client and task.model_id == "m" and task.round_id == "2"
        assert json.loads(task.data)["session_id"] == "s"


async def test_push_many_again_with_the_same_ids_pushes_nothing_twice(stubs, broker):
    first = await broker.tasks.push_many(
        ["c1", "c2"], "Fedn_Validation", correlation_ids=["a", "b"]
    )
    assert first == ["a", "b"]
    again = await broker.tasks.push_many(
        ["c1", "c2", "c3"], "Fedn_Validation", correlation_ids=["a", "b", "c"]
    )
    assert again == [None, None, "c"]
    assert (await poll(stubs, status="")).correlation_id == "a"
    assert await poll(stubs, status="COMPLETED", correlation_id="a", done=True) == pb.TaskRequest()


@pytest.mark.parametrize(
    "clients, kind, data",
    [(["c1", ""], "Custom_x", "{}"), (["c1"], "Custom_x", "[1]"), (["c1"], "Nope", "")],
    ids=["empty-client-id", "data-not-an-object", "unknown-type"],
)
async def test_push_many_bad_input_writes_nothing(broker, clients, kind, data):
    with pytest.raises(InvalidInput):
        await broker.tasks.push_many(clients, kind, data=data)
    assert await data_keys(broker) == set()


async def test_client_id_from_metadata_when_body_is_empty(stubs, broker):
    corr = await broker.tasks.push("c1", "Fedn_Validation", model_id="m")
    reply = await stubs.combiner.PollAndReport(pb.ActivityReport(), metadata=meta("c1"))
    assert reply.correlation_id == corr


async def test_empty_client_id_everywhere_is_invalid_argument(stubs, broker):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.combiner.PollAndReport(pb.ActivityReport())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "client id" in err.value.details()
    assert await broker.presence.online() == []


async def test_poll_survives_redis_losing_its_script_cache(stubs, broker):
    """After a Redis restart without persistence EVALSHA answers NOSCRIPT: reload, retry."""
    corr = await broker.tasks.push("c1", "Fedn_Validation", model_id="m")
    await broker._redis.script_flush()
    assert (await poll(stubs, status="")).correlation_id == corr
    await broker._redis.script_flush()
    assert await broker.tasks.flag(corr, "abort") == "delivered"
