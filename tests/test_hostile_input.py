"""Hostile or broken input gets a status the 1.0.0 client does not retry (INVALID_ARGUMENT)
and writes nothing (issue 11 items 2-4; limits in broker/limits.py, docs/operations.md):

- bodies that do not parse as protobuf, on every method walked from the descriptor (a
  unary body is parsed by grpc before any handler runs; an Upload's chunks as it reads them);
- Timestamps outside the range a Timestamp may hold, and JSON nested too deeply to parse;
- ids and free-text fields over their documented sizes, on every field of every request.

Real replica, real Redis; "writes nothing" is the set of keys under the test's prefix."""

from __future__ import annotations

import hashlib
import json
import logging
import random

import grpc
import pytest
import redis
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from broker import InvalidInput, limits
from broker.keys import Keys
from combiner.pb import scaleout_pb2 as pb
from tests.conftest import meta, next_task
from tests.services import data_keys, eventually, inbound_entries
from tests.test_cli import assert_clean_failure, keys_under, run
from tests.test_rpc_guard import GOOD_METADATA, METHODS, counted, outcome

ID, LABEL, TEXT, DATA = limits.ID_BYTES, limits.LABEL_BYTES, limits.TEXT_BYTES, limits.DATA_BYTES
MODEL_ID = 255  # model ids are file names (broker/models.py)
COMBINER = [(s, m) for s, m in METHODS if s.name == "CombinerClient"]


async def keys(broker, prefix: str) -> set[bytes]:
    """Keys under the prefix but the schema marks, which every connect writes."""
    return await data_keys(broker, prefix)


@pytest.fixture
async def quiet(replica, broker, prefix):
    """The replica's own keys (its registration) exist: from here on, any new key under the
    prefix was written by a call."""
    await replica.register(lease=60)
    return await keys(broker, prefix)


# --- bodies that do not parse (item 2) ---------------------------------------------------


def garbage_for(message) -> dict[str, bytes]:
    """Bodies that fail to parse as `message`, each of a different kind."""
    bodies = {
        "random bytes": random.Random(11).randbytes(64),
        "truncated length": b"\x0a\x05ab",  # field 1 says 5 bytes follow, 2 do
        "open start-group tag": b"\x0b\x10\x01",  # group of field 1, never ended
    }
    strings = [f for f in message.fields if f.type == FieldDescriptor.TYPE_STRING]
    if strings:  # what a non-Python client can send: invalid UTF-8 in a string field
        bodies["bad UTF-8"] = bytes([strings[0].number << 3 | 2, 2, 0xFF, 0xFE])
    cls = GetMessageClass(message)
    for body in bodies.values():  # a precondition of the test: none of them parses
        with pytest.raises(DecodeError):
            cls.FromString(body)
    return bodies


async def test_a_body_that_does_not_parse_is_invalid_argument_on_every_rpc(
    replica, stubs, broker, prefix, quiet, caplog
):
    wrong, calls = {}, 0
    chunk = pb.FileChunk(data=b"model bytes").SerializeToString()
    for service, method in METHODS:
        for what, body in garbage_for(method.input_type).items():
            name = f"{method.name} ({what})"
            # an Upload's bad chunk comes mid-stream, after a good one
            sent = [chunk, body] if method.client_streaming else body
            before = counted(method.name, "INVALID_ARGUMENT")
            caplog.clear()
            with caplog.at_level(logging.INFO):
                code, details = await outcome(
                    stubs.channel, service, method, sent, GOOD_METADATA, raw=True
                )
            calls += 1
            logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
            if code != grpc.StatusCode.INVALID_ARGUMENT or "malformed request" not in details:
                wrong[name] = (code, details)
            elif "DecodeError" in details or "Unexpected" in details:
                wrong[name] = f"a Python exception in the details: {details}"
            elif any(r.exc_info for r in caplog.records):
                wrong[name] = "a traceback was logged"
            elif len(logged) != 1 or method.name not in logged[0].getMessage():
                wrong[name] = f"not one line naming the method: {[r.getMessage() for r in logged]}"
            elif await keys(broker, prefix) != quiet:
                wrong[name] = "wrote keys"
            else:

                async def recorded(m=method.name, before=before):
                    return counted(m, "INVALID_ARGUMENT") == before + 1

                await eventually(recorded, what=f"{name} counted as INVALID_ARGUMENT")
    assert wrong == {}
    assert calls >= 4 * len(METHODS) - 2  # FileChunk has no string field for bad UTF-8


# --- permanent input errors (item 3) -----------------------------------------------------

TIMESTAMPED = [
    (s, m, f.name)
    for s, m in METHODS
    for f in m.input_type.fields
    if f.message_type is not None and f.message_type.full_name == "google.protobuf.Timestamp"
]


def request_for(method, **extra):
    """A request with its id fields set (enough to be answered OK)."""
    ids = {n: "g1" for n in ("client_id", "node_id") if n in method.input_type.fields_by_name}
    if method.name == "Announce":
        ids["type"] = "Connect"
    return GetMessageClass(method.input_type)(**ids, **extra)


OUT_OF_RANGE = [
    (2**62, 0), (0, -5), (1, 10**9), (253_402_300_800, 0), (-62_135_596_801, 0), (-(2**62), 0),
]  # fmt: skip
AT_THE_ENDS = [
    (253_402_300_799, 999_999_999, "9999-12-31T23:59:59.999999Z"),
    (-62_135_596_800, 0, "0001-01-01T00:00:00Z"),
]


def stamped(method, field: str, seconds: int, nanos: int):
    request = request_for(method)
    getattr(request, field).seconds = seconds
    getattr(request, field).nanos = nanos
    return request


async def test_a_timestamp_out_of_range_is_invalid_argument_and_writes_nothing(
    stubs, broker, prefix, quiet
):
    assert {m.name for _, m, _ in TIMESTAMPED} == {  # the walk covers every timestamp
        "SendStatus", "SendModelUpdate", "SendModelValidation", "SendModelPrediction",
        "SendModelMetric", "SendAttributeMessage", "SendTelemetryMessage",
    }  # fmt: skip
    wrong = {}
    for seconds, nanos in OUT_OF_RANGE:
        for service, method, field in TIMESTAMPED:
            request = stamped(method, field, seconds, nanos)
            code, details = await outcome(stubs.channel, service, method, request, meta("g1"))
            name = f"{method.name} {seconds}s {nanos}ns"
            if code != grpc.StatusCode.INVALID_ARGUMENT or "timestamp out of range" not in details:
                wrong[name] = (code, details)
            elif await keys(broker, prefix) != quiet:
                wrong[name] = "wrote keys"
    assert wrong == {}

    # the ends of the range are good timestamps
    for seconds, nanos, _ in AT_THE_ENDS:
        for service, method, field in TIMESTAMPED:
            request = stamped(method, field, seconds, nanos)
            code, details = await outcome(stubs.channel, service, method, request, meta("g1"))
            assert code == grpc.StatusCode.OK, (method.name, details)
    entries = await inbound_entries(broker, "statuses")
    assert [e[b"timestamp"].decode() for _, e in entries] == [t for *_, t in AT_THE_ENDS]


@pytest.mark.parametrize(
    "parameters",
    ["[" * 100_000, "[" * 50_000, '{"client-version": ' * 3_000],
    ids=["over-the-limit", "deep-array", "deep-object"],
)
async def test_version_check_with_parameters_no_parser_can_take_is_invalid_argument(
    stubs, broker, prefix, quiet, parameters
):
    request = pb.ClientAnnounceRequest(client_id="v1", type="VersionCheck", parameters=parameters)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.combiner.Announce(request, metadata=meta("v1"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "Announce parameters" in err.value.details()
    assert await keys(broker, prefix) == quiet

    # what the client sends still works
    request.parameters = json.dumps({"client-version": "1.0.0"})
    reply = await stubs.combiner.Announce(request, metadata=meta("v1"))
    assert json.loads(reply.parameters)["success"] is True


# --- sizes (item 4) ----------------------------------------------------------------------

# The limit of every string field of every request, by field name; by (message, field)
# where it differs. None: never stored, so not limited (the 8 MiB message limit bounds it).
LIMIT_BY_NAME = {
    "client_id": ID, "node_id": ID, "correlation_id": ID, "model_id": ID,
    "model_update_id": ID, "session_id": ID, "round_id": ID,
    "meta": DATA, "config": DATA, "data": DATA, "response": DATA, "parameters": TEXT,
}  # fmt: skip
LIMIT_BY_FIELD = {
    ("Status", "status"): TEXT,
    ("Status", "type"): LABEL,
    ("ActivityReport", "status"): LABEL,
    ("MetricElem", "key"): LABEL,
    ("AttributeElem", "key"): LABEL,
    ("AttributeElem", "value"): TEXT,
    ("TelemetryElem", "key"): LABEL,
    ("ModelRequest", "model_id"): MODEL_ID,
    ("ClientAnnounceRequest", "type"): None,  # only compared with the known types
    ("ClientAvailableMessage", "data"): None,  # TaskStream reads only client_id
    ("ClientAvailableMessage", "timestamp"): None,
}


def string_fields(message) -> list[tuple[str, str, str, int | None]]:
    """(field, sub-field or '', message name, limit) of every string, also in repeated
    elements (metrics, attributes, telemetries)."""
    out = []
    for f in message.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            limit = LIMIT_BY_FIELD.get((message.name, f.name), LIMIT_BY_NAME.get(f.name))
            out.append((f.name, "", message.name, limit))
        elif f.message_type is not None and f.is_repeated:
            for sub in f.message_type.fields:
                if sub.type == FieldDescriptor.TYPE_STRING:
                    limit = LIMIT_BY_FIELD[(f.message_type.name, sub.name)]
                    out.append((f.name, sub.name, f.message_type.name, limit))
    return out


def sized(limit: int, over: bool) -> str:
    """limit bytes of UTF-8 (or 2 more) in 2-byte characters: fewer characters than bytes."""
    if limit % 2:
        return "a" + "é" * (limit // 2 + over)
    return "é" * (limit // 2 + over)


def with_value(method, field: str, sub: str, value: str):
    request = request_for(method)
    if sub:
        getattr(request, field).add(**{sub: value})
    else:
        setattr(request, field, value)
    return request


async def test_a_field_over_its_limit_is_invalid_argument_on_every_rpc_and_writes_nothing(
    stubs, broker, prefix, quiet
):
    # every string field is classified: a limit, or listed as never stored
    unclassified = [
        (m.name, f)
        for _, m in METHODS
        for f, sub, owner, limit in string_fields(m.input_type)
        if limit is None and (owner, sub or f) not in LIMIT_BY_FIELD
    ]
    assert unclassified == []
    wrong, checked = {}, 0
    for service, method in METHODS:
        for field, sub, _, limit in string_fields(method.input_type):
            if limit is None:
                continue
            name = f"{method.name}.{field}{'.' + sub if sub else ''}"
            request = with_value(method, field, sub, sized(limit, over=True))
            code, details = await outcome(stubs.channel, service, method, request, meta("g1"))
            checked += 1
            if code != grpc.StatusCode.INVALID_ARGUMENT or not details:
                wrong[name] = (code, details[:200])
            elif await keys(broker, prefix) != quiet:
                wrong[name] = "wrote keys"
    assert wrong == {}
    assert checked >= 40

    # at the limit, each is accepted (unary RPCs; TaskStream: the round trip below)
    for service, method in METHODS:
        if method.server_streaming or method.client_streaming:
            continue
        for field, sub, _, limit in string_fields(method.input_type):
            if limit is None:
                continue
            request = with_value(method, field, sub, sized(limit, over=False))
            code, details = await outcome(stubs.channel, service, method, request, meta("g1"))
            if code != grpc.StatusCode.OK:
                wrong[f"{method.name}.{field}{'.' + sub if sub else ''}"] = (code, details[:200])
    assert wrong == {}


@pytest.mark.parametrize(
    "metadata",
    [
        (("client-id", "n" * (ID + 1)),),  # the id from metadata (the body leaves it empty)
        (("client", "n" * (ID + 1)),),
        (("client-id", "g1"), ("name", "n" * (ID + 1))),
    ],
    ids=["client-id", "client", "name"],
)
async def test_metadata_ids_over_the_limit_are_invalid_argument(
    stubs, broker, prefix, quiet, metadata
):
    wrong = {}
    for service, method in COMBINER:
        request = GetMessageClass(method.input_type)(
            **({"type": "Connect"} if method.name == "Announce" else {})
        )
        code, details = await outcome(stubs.channel, service, method, request, metadata)
        if code != grpc.StatusCode.INVALID_ARGUMENT or "longer than" not in details:
            wrong[method.name] = (code, details)
        elif await keys(broker, prefix) != quiet:
            wrong[method.name] = "wrote keys"
    assert wrong == {}


@pytest.mark.parametrize(
    "checksum", ["0" * 65, "0" * 5_000, "z" * 64], ids=["65-digits", "5k-digits", "not-hex"]
)
async def test_an_upload_checksum_that_is_no_sha256_is_refused_before_the_upload(
    stubs, broker, prefix, quiet, checksum
):
    """(The model-id metadata had its limit already: broker/models.py.)"""
    metadata = (*meta("u1"), ("model-id", "m1"), ("checksum", checksum))
    call = stubs.models.Upload(iter([pb.FileChunk(data=b"x" * 1000)]), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert await keys(broker, prefix) == quiet


async def test_ids_at_the_limit_make_a_whole_round_trip(stubs, broker):
    """A task for a client whose ids are all at the limit: queued, polled, its model
    downloaded, the update's model uploaded and the update kept; then one over a stream."""
    client, name = "é" * (ID // 2), "n" * ID  # metadata is ASCII; the body is not
    corr, session, round_id = "c" * ID, "s" * ID, "r" * ID
    model, update_model = "m" * MODEL_ID, "u" * MODEL_ID
    await broker.models.put(b"global model", model)
    await broker.tasks.push(
        client, "Fedn_ModelUpdate", model_id=model, session_id=session, round_id=round_id,
        correlation_id=corr,
    )  # fmt: skip
    md = (("name", name),)
    task = await stubs.combiner.PollAndReport(pb.ActivityReport(node_id=client), metadata=md)
    assert (task.correlation_id, task.model_id, task.session_id, task.round_id) == (
        corr, model, session, round_id,
    )  # fmt: skip
    chunks = [c async for c in stubs.models.Download(pb.ModelRequest(model_id=model))]
    assert b"".join(c.data for c in chunks) == b"global model"

    data = b"local model"
    upload_md = (*md, ("model-id", update_model), ("checksum", hashlib.sha256(data).hexdigest()))
    reply = await stubs.models.Upload(iter([pb.FileChunk(data=data)]), metadata=upload_md)
    assert reply.status == pb.ModelStatus.OK, reply.message
    update = pb.ModelUpdate(
        client_id=client, model_id=model, model_update_id=update_model, correlation_id=corr,
        session_id=session, round_id=round_id,
        meta=json.dumps({"training_metadata": {"num_examples": 1}, "pad": "x" * 1000}),
    )  # fmt: skip
    await stubs.combiner.SendModelUpdate(update, metadata=md)
    record = await broker.tasks.show(corr)
    assert record["model_update_id"] == update_model and record["result_at"]
    assert (await broker.presence.client(client))["name"] == name

    corr2 = await broker.tasks.push(client, "Fedn_Validation", model_id=model)
    call = stubs.combiner.TaskStream(pb.ClientAvailableMessage(client_id=client), metadata=md)
    try:
        assert (await next_task(call)).correlation_id == corr2
    finally:
        call.cancel()

    # one byte more in any of them is refused
    for field, value in {
        "client_id": client + "a", "correlation_id": corr + "a", "session_id": session + "a",
        "round_id": round_id + "a", "model_update_id": "u" * (ID + 1),
    }.items():  # fmt: skip
        over = pb.ModelUpdate()
        over.CopyFrom(update)
        setattr(over, field, value)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stubs.combiner.SendModelUpdate(over, metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field


# --- the same limits for the operator and the workers (the broker checks them) -------------


@pytest.mark.parametrize(
    "push",
    [
        {"client_id": "x" * (ID + 1)},
        {"correlation_id": "x" * (ID + 1)},
        {"model_id": "x" * (ID + 1)},
        {"session_id": "x" * (ID + 1)},
        {"round_id": "x" * (ID + 1)},
        {"data": json.dumps({"pad": "x" * DATA})},
        {"data": "[" * 50_000, "task_type": "Custom_x"},
    ],
    ids=["client", "correlation", "model", "session", "round", "data", "data-nested"],
)
async def test_a_task_over_the_limits_is_refused_before_anything_is_written(broker, prefix, push):
    args = {"client_id": "c1", "task_type": "Fedn_ModelUpdate", **push}
    client_id, task_type = args.pop("client_id"), args.pop("task_type")
    before = await keys(broker, prefix)
    with pytest.raises(InvalidInput):
        await broker.tasks.push(client_id, task_type, **args)
    corr = args.pop("correlation_id", None)
    with pytest.raises(InvalidInput):
        await broker.tasks.push_many(
            ["c1", client_id], task_type, **args,
            correlation_ids=None if corr is None else ["ok", corr],
        )  # fmt: skip
    assert await keys(broker, prefix) == before


async def test_a_session_id_over_the_limit_is_refused(broker, prefix):
    with pytest.raises(InvalidInput):
        await broker.sessions.create({"rounds": 1}, "seed", session_id="s" * (ID + 1))
    assert await keys(broker, prefix) == set()


@pytest.mark.parametrize(
    "args",
    [
        ["--client", "x" * (ID + 1), "--type", "Fedn_Validation"],
        ["--client", "c1", "--type", "Fedn_Validation", "--session", "s" * (ID + 1)],
        ["--client", "c1", "--type", "Fedn_Validation", "--round", "r" * (ID + 1)],
        ["--client", "c1", "--type", "Fedn_ModelUpdate", "--data", "[" * 50_000],
    ],
    ids=["client", "session", "round", "data-nested"],
)
def test_task_push_over_the_limits_fails_clearly_and_queues_nothing(redis_url, prefix, args):
    at = ["--redis-url", redis_url, "--prefix", prefix]
    rdb = redis.Redis.from_url(redis_url)
    try:
        proc = run("task", "push", *args, *at)
        assert_clean_failure(proc)
        assert keys_under(rdb, prefix) == []
        if "--data" not in args:  # a byte less of the id is fine
            proc = run("task", "push", *[a[:ID] for a in args], *at)
            assert proc.returncode == 0, proc.stderr
            assert rdb.llen(Keys(prefix).queue(args[1][:ID])) == 1
    finally:
        rdb.close()
