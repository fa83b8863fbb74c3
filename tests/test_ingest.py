"""The ingest RPCs against a real replica and Redis (docs/protocol.md §4.6-§4.11, §10): each
answers OK only once its message is in ``P:in:<kind>``, counts as contact, and records
task results on the task they answer."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import UInt32Value

from broker import connect
from broker.codec import pack, unpack
from broker.context import Settings
from broker.keys import INBOUND_KINDS
from combiner.pb import scaleout_pb2 as pb
from tests.conftest import meta
from tests.services import data_keys, inbound_entries, inbound_length

pytestmark = pytest.mark.topologies

PACKED = ("metrics", "attributes", "telemetries")
TS = Timestamp(seconds=1_700_000_000, nanos=250_000_000)
TS_TEXT = datetime.fromtimestamp(1_700_000_000.25, UTC).replace(tzinfo=None).isoformat() + "Z"


async def entries(broker, kind: str) -> list[dict]:
    """The whole inbound stream of one kind, read back with XRANGE: scalar fields must be
    UTF-8 text, the nested ones (metrics, attributes, telemetries) msgpack."""
    out = []
    for _, raw in await inbound_entries(broker, kind):
        fields = {}
        for k, v in raw.items():
            key = k.decode()
            fields[key] = unpack(v) if key in PACKED else v.decode()
        out.append(fields)
    return out


async def assert_online_as(broker, client_id: str, name: str) -> None:
    assert client_id in await broker.presence.online()
    record = await broker.presence.client(client_id)
    assert record["status"] == "online" and record["name"] == name and record["id"] == client_id


# --- each RPC lands in its stream --------------------------------------------------------


async def test_model_update_is_in_the_stream_and_on_the_task(stubs, broker):
    corr = await broker.tasks.push("c1", "Fedn_ModelUpdate", model_id="g1", session_id="s")
    await broker.tasks.poll("c1")  # handed out, then trained on
    await broker.models.put(b"update bytes", "u1")  # Upload always comes first (§4.5)
    update = pb.ModelUpdate(
        client_id="c1",
        model_id="g1",
        model_update_id="u1",
        correlation_id=corr,
        timestamp=TS,
        meta=json.dumps({"training_metadata": {"num_examples": 7}}),
        config="",
        round_id="3",
        session_id="s",
    )
    reply = await stubs.combiner.SendModelUpdate(update, metadata=meta("c1", "Alice"))
    assert reply.response  # a plain OK Response

    [fields] = await entries(broker, "updates")
    assert fields["client_id"] == "c1" and fields["correlation_id"] == corr
    assert fields["model_id"] == "g1" and fields["model_update_id"] == "u1"
    assert fields["round_id"] == "3" and fields["session_id"] == "s"
    assert json.loads(fields["meta"]) == {"training_metadata": {"num_examples": 7}}
    assert fields["config"] == "" and fields["timestamp"] == TS_TEXT
    assert float(fields["received_at"]) > 0

    record = await broker.tasks.show(corr)
    assert record["model_update_id"] == "u1" and record["result_at"]
    await assert_online_as(broker, "c1", "Alice")

    # a duplicate update (same correlation id) is kept in the stream; the task keeps the first
    update.model_update_id = "u2"
    await stubs.combiner.SendModelUpdate(update, metadata=meta("c1", "Alice"))
    assert [e["model_update_id"] for e in await entries(broker, "updates")] == ["u1", "u2"]
    assert (await broker.tasks.show(corr))["model_update_id"] == "u1"


@pytest.mark.parametrize(
    ("rpc", "message", "kind"),
    [
        ("SendModelValidation", pb.ModelValidation, "validations"),
        ("SendModelPrediction", pb.ModelPrediction, "predictions"),
    ],
)
async def test_validation_and_prediction_are_in_the_stream_and_on_the_task(
    stubs, broker, rpc, message, kind
):
    corr = await broker.tasks.push("c1", "Fedn_Validation", model_id="g1")
    data = json.dumps({"accuracy": 0.5})
    request = message(
        client_id="c1", model_id="g1", data=data, correlation_id=corr, timestamp=TS, session_id="s"
    )
    await getattr(stubs.combiner, rpc)(request, metadata=meta("c1", "Bob"))

    [fields] = await entries(broker, kind)
    assert fields["client_id"] == "c1" and fields["correlation_id"] == corr
    assert fields["model_id"] == "g1" and fields["session_id"] == "s"
    assert fields["data"] == data and fields["timestamp"] == TS_TEXT
    assert (await broker.tasks.show(corr))["result"] == data
    await assert_online_as(broker, "c1", "Bob")


@pytest.mark.parametrize("rpc", ["SendModelValidation", "SendModelPrediction"])
async def test_bad_json_result_data_is_stored_as_is(stubs, broker, rpc):
    corr = await broker.tasks.push("c1", "Fedn_Validation", model_id="g1")
    data = '{"accuracy": 0.5,, not json'
    message = pb.ModelValidation if rpc == "SendModelValidation" else pb.ModelPrediction
    request = message(client_id="c1", model_id="g1", data=data, correlation_id=corr)
    await getattr(stubs.combiner, rpc)(request, metadata=meta())
    kind = "validations" if rpc == "SendModelValidation" else "predictions"
    [entry] = await entries(broker, kind)
    assert entry["data"] == data
    assert (await broker.tasks.show(corr))["result"] == data


async def test_result_for_someone_elses_task_leaves_the_task_alone(stubs, broker):
    corr = await broker.tasks.push("c1", "Fedn_ModelUpdate", model_id="g1")
    before = await broker.tasks.show(corr)
    update = pb.ModelUpdate(client_id="intruder", model_update_id="u-x", correlation_id=corr)
    await stubs.combiner.SendModelUpdate(update, metadata=meta("intruder"))
    validation = pb.ModelValidation(client_id="intruder", data="{}", correlation_id=corr)
    await stubs.combiner.SendModelValidation(validation, metadata=meta("intruder"))

    assert await broker.tasks.show(corr) == before
    # nothing was created in the intruder's slot under that correlation id either
    assert not await broker._redis.exists(broker._keys.task("intruder", corr))
    # the messages themselves are kept (a worker decides what they are worth)
    assert (await entries(broker, "updates"))[0]["client_id"] == "intruder"
    assert len(await entries(broker, "validations")) == 1


async def test_update_whose_model_was_never_uploaded_is_not_counted(stubs, broker):
    corr = await broker.tasks.push("c1", "Fedn_ModelUpdate", model_id="g1")
    update = pb.ModelUpdate(client_id="c1", model_update_id="not-uploaded", correlation_id=corr)
    await stubs.combiner.SendModelUpdate(update, metadata=meta())  # still OK (§10)
    assert "model_update_id" not in await broker.tasks.show(corr)
    assert (await entries(broker, "updates"))[0]["model_update_id"] == "not-uploaded"


async def test_update_for_a_task_never_handed_out_is_not_counted(stubs, broker):
    """Naming a verified model (here the seed) for a task still queued counts for nothing."""
    await broker.models.put(b"seed bytes", "seed")
    corr = await broker.tasks.push("c1", "Fedn_ModelUpdate", model_id="seed")
    update = pb.ModelUpdate(client_id="c1", model_update_id="seed", correlation_id=corr)
    await stubs.combiner.SendModelUpdate(update, metadata=meta("c1"))
    record = await broker.tasks.show(corr)
    assert record["state"] == "queued"
    assert "model_update_id" not in record and "result_at" not in record
    assert (await entries(broker, "updates"))[0]["model_update_id"] == "seed"  # still recorded


async def test_update_naming_a_model_uploaded_before_the_hand_out_is_not_counted(stubs, broker):
    await broker.models.put(b"old bytes", "old")
    corr = await broker.tasks.push("c1", "Fedn_ModelUpdate", model_id="g1")
    await broker.tasks.poll("c1")
    assert (await broker.tasks.show(corr))["state"] == "delivered"
    update = pb.ModelUpdate(client_id="c1", model_update_id="old", correlation_id=corr)
    await stubs.combiner.SendModelUpdate(update, metadata=meta("c1"))
    assert "model_update_id" not in await broker.tasks.show(corr)

    # an update uploaded after the hand-out still counts
    await broker.models.put(b"new bytes", "new")
    update.model_update_id = "new"
    await stubs.combiner.SendModelUpdate(update, metadata=meta("c1"))
    assert (await broker.tasks.show(corr))["model_update_id"] == "new"


async def test_result_for_unknown_task_is_ok_and_recorded(stubs, broker):
    update = pb.ModelUpdate(client_id="c1", model_update_id="u1", correlation_id="never-issued")
    await stubs.combiner.SendModelUpdate(update, metadata=meta())
    assert await broker.tasks.show("never-issued") == {}
    assert (await entries(broker, "updates"))[0]["correlation_id"] == "never-issued"


async def test_metric_keeps_step_zero_and_packs_the_metrics(stubs, broker):
    def metric(step):
        return pb.ModelMetric(
            client_id="c1",
            metrics=[pb.MetricElem(key="loss", value=0.5), pb.MetricElem(key="acc", value=0.25)],
            timestamp=TS,
            step=step,
            model_id="g1",
            round_id="2",
            session_id="s",
        )

    await stubs.combiner.SendModelMetric(metric(UInt32Value(value=0)), metadata=meta("c1", "Eve"))
    await stubs.combiner.SendModelMetric(metric(UInt32Value(value=1)), metadata=meta("c1", "Eve"))
    await stubs.combiner.SendModelMetric(metric(None), metadata=meta("c1", "Eve"))

    fields, second, third = await entries(broker, "metrics")
    assert fields["metrics"] == {"loss": 0.5, "acc": 0.25}
    assert fields["step"] == "0"  # present even when 0 (§4.9)
    assert fields["client_id"] == "c1" and fields["model_id"] == "g1"
    assert fields["round_id"] == "2" and fields["session_id"] == "s"
    assert fields["timestamp"] == TS_TEXT
    assert second["step"] == "1"
    assert third["step"] == ""  # no step at all
    await assert_online_as(broker, "c1", "Eve")


async def test_attribute_message(stubs, broker):
    request = pb.AttributeMessage(
        client_id="c1",
        attributes=[
            pb.AttributeElem(key="os", value="linux"),
            pb.AttributeElem(key="gpu", value=""),
        ],
        timestamp=TS,
    )
    await stubs.combiner.SendAttributeMessage(request, metadata=meta("c1", "Ann"))
    [entry] = await entries(broker, "attributes")
    assert entry["attributes"] == {"os": "linux", "gpu": ""}
    assert entry["client_id"] == "c1" and entry["timestamp"] == TS_TEXT
    await assert_online_as(broker, "c1", "Ann")


async def test_telemetry_message(stubs, broker):
    request = pb.TelemetryMessage(
        client_id="c1",
        telemetries=[
            pb.TelemetryElem(key="memory_usage", value=12.5),
            pb.TelemetryElem(key="cpu_usage", value=3.0),
        ],
        timestamp=TS,
    )
    await stubs.combiner.SendTelemetryMessage(request, metadata=meta("c1", "Tim"))
    [entry] = await entries(broker, "telemetry")
    assert entry["telemetries"] == {"memory_usage": 12.5, "cpu_usage": 3.0}
    assert entry["client_id"] == "c1" and entry["timestamp"] == TS_TEXT
    await assert_online_as(broker, "c1", "Tim")


async def test_status(stubs, broker):
    request = pb.Status(
        client_id="c1",
        status="Model update completed.",
        log_level=pb.LogLevel.AUDIT,
        timestamp=TS,
        type="MODEL_UPDATE",
    )
    reply = await stubs.combiner.SendStatus(request, metadata=meta("c1", "Sam"))
    assert reply.response == "Status received."
    [fields] = await entries(broker, "statuses")
    assert fields["status"] == "Model update completed." and fields["log_level"] == "AUDIT"
    assert fields["type"] == "MODEL_UPDATE" and fields["client_id"] == "c1"
    assert fields["timestamp"] == TS_TEXT
    await assert_online_as(broker, "c1", "Sam")


async def test_heartbeat_marks_the_client_online(stubs, broker):
    await stubs.combiner.SendHeartbeat(pb.Heartbeat(client_id="hb"), metadata=meta("hb", "Hal"))
    await assert_online_as(broker, "hb", "Hal")


async def test_client_id_falls_back_to_metadata(stubs, broker):
    await stubs.combiner.SendModelMetric(pb.ModelMetric(), metadata=meta("from-meta", "M"))
    [entry] = await entries(broker, "metrics")
    assert entry["client_id"] == "from-meta"
    await assert_online_as(broker, "from-meta", "M")


# --- empty client id: INVALID_ARGUMENT, nothing written ----------------------------------

EMPTY_ID_CALLS = [
    ("SendModelUpdate", pb.ModelUpdate(model_update_id="u", correlation_id="x")),
    ("SendModelValidation", pb.ModelValidation(data="{}", correlation_id="x")),
    ("SendModelPrediction", pb.ModelPrediction(data="{}", correlation_id="x")),
    ("SendModelMetric", pb.ModelMetric(metrics=[pb.MetricElem(key="a", value=1)])),
    ("SendAttributeMessage", pb.AttributeMessage(attributes=[pb.AttributeElem(key="a")])),
    ("SendTelemetryMessage", pb.TelemetryMessage(telemetries=[pb.TelemetryElem(key="a")])),
    ("SendStatus", pb.Status(status="hello")),
    ("SendHeartbeat", pb.Heartbeat()),
    ("Announce", pb.ClientAnnounceRequest(type="Connect")),
    ("PollAndReport", pb.ActivityReport(status="")),
]


@pytest.mark.parametrize(("rpc", "request_"), EMPTY_ID_CALLS, ids=[c[0] for c in EMPTY_ID_CALLS])
@pytest.mark.parametrize(
    "metadata",
    [(), (("client", ""), ("client-id", ""), ("name", "nobody"))],
    ids=["no-metadata", "empty-metadata"],
)
async def test_empty_client_id_is_invalid_argument_and_writes_nothing(
    stubs, broker, rpc, request_, metadata
):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(stubs.combiner, rpc)(request_, metadata=metadata)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "client id" in err.value.details()

    for kind in INBOUND_KINDS:
        assert await inbound_length(broker, kind) == 0
    # only the replica's own registration (and the schema version) may exist under the prefix
    keys = [k.decode() for k in await data_keys(broker)]
    replica_keys = (broker._keys.replicas, f"{broker._keys.prefix}:replica:")
    assert [k for k in keys if not k.startswith(replica_keys)] == []


# --- batching: one caller going away must not fail the others ----------------------------


async def test_caller_cancelled_mid_batch_does_not_fail_the_rest_of_its_batch(broker):
    # Concurrent RPCs share one MULTI/EXEC. A gRPC call the client cancels cancels its
    # future while the batch is in flight; the other callers must still get their replies.
    first = asyncio.ensure_future(
        broker.inbound.add("metrics", "gone", {"metrics": pack({"a": 1.0})})
    )

    def build_second(pipe):
        first.cancel()  # the first caller goes away after its commands were queued
        stream = broker._keys.inbound("metrics", broker._keys.partition_of("stays"))
        pipe.xadd(stream, {"client_id": "stays"})
        return lambda replies: replies[0]

    second = asyncio.ensure_future(broker._batcher.submit(build_second))
    entry_id = await asyncio.wait_for(second, 10)
    assert entry_id
    with pytest.raises(asyncio.CancelledError):
        await first
    clients = [e["client_id"] for e in await entries(broker, "metrics")]
    assert clients == ["gone", "stays"]  # both were written in the one transaction


async def test_the_batch_window_is_skipped_by_a_lone_caller_and_kept_under_load(redis_url, prefix):
    # The window (here a minute) makes the first caller of a batch wait for company. A
    # caller after a lone one goes at once (an idle replica adds no latency); one after a
    # batch that had company waits for the window, or for a flush.
    b = await connect(redis_url, settings=Settings(prefix=prefix, batch_window=60.0))
    try:
        batcher = b._batcher
        await asyncio.wait_for(b.presence.touch("alone"), 10)  # no window: nothing before it
        await asyncio.wait_for(b.presence.touch("alone-again"), 10)
        pair = [b.presence.touch("p1"), b.presence.touch("p2")]  # in one loop turn
        await asyncio.wait_for(asyncio.gather(*pair), 10)
        trips = batcher.round_trips
        third = asyncio.ensure_future(b.presence.touch("after-company"))
        for _ in range(20):  # many loop turns: it waits for the window, not for its turn
            await asyncio.sleep(0)
        assert not third.done() and batcher.round_trips == trips
        await asyncio.wait_for(batcher.flush(), 10)
        await asyncio.wait_for(third, 10)
        assert batcher.round_trips == trips + 1
    finally:
        await b.close()


async def test_lag_sums_each_kinds_partitions(broker):
    """Inbound.lag (the status view's): per kind, the length over every partition's
    stream, and the group's pending count and lag; unknown (None) until the group
    exists on each of them."""
    clients = [f"lag{i}" for i in range(12)]  # several partitions on a Cluster
    for c in clients:
        await broker.inbound.add("metrics", c, {"step": "1"})
    assert (await broker.inbound.lag("g"))["metrics"] == {"length": 12, "pending": 0, "lag": None}
    await broker.inbound.ensure_group("g")
    view = await broker.inbound.lag("g")
    assert view["metrics"] == {"length": 12, "pending": 0, "lag": 12}
    assert view["statuses"] == {"length": 0, "pending": 0, "lag": 0}
    got = []
    while not got:  # read, not acked (count is per partition's stream)
        got = await broker.inbound.read("g", "w1", count=1, block_ms=10)
    assert 0 < len(got) <= 12
    n = len(got)
    assert (await broker.inbound.lag("g"))["metrics"] == {"length": 12, "pending": n, "lag": 12 - n}
