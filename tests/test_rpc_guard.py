"""Every scaleout RPC gets the status mapping, error logging and metrics of combiner/errors.py
without code of its own: each method of both services, walked from the protobuf descriptor
(so a method added later is walked too), called over real gRPC on a replica with real Redis.

The 1.0.0 client dies on UNAVAILABLE and does not retry UNKNOWN or INTERNAL, so an
exception no one expected must still answer FAILED_PRECONDITION (docs/protocol.md §3)."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.protobuf.message_factory import GetMessageClass
from prometheus_client import REGISTRY

from broker.errors import BrokerUnavailable, Conflict, InvalidInput, NotFound, NotReady, TooLarge
from combiner import server
from combiner.errors import GuardedServer
from combiner.pb import scaleout_pb2 as pb
from tests.conftest import meta
from tests.services import eventually

RPC_DEADLINE = 30  # seconds; only so a hang fails the test
SERVICES = tuple(pb.DESCRIPTOR.services_by_name.values())
METHODS = [(service, method) for service in SERVICES for method in service.methods]

# Enough for each method to get past its input checks to the broker.
IDS = ("client_id", "node_id", "model_id")
EXTRA_FIELDS = {"Announce": {"type": "Connect"}}  # other types answer without the broker (§4.1)
GOOD_METADATA = (*meta("g1"), ("model-id", "g1"), ("checksum", "0" * 64))


def request_for(method) -> object:
    fields = {name: "g1" for name in IDS if name in method.input_type.fields_by_name}
    return GetMessageClass(method.input_type)(**fields, **EXTRA_FIELDS.get(method.name, {}))


async def outcome(
    channel, service, method, request, metadata=(), *, raw: bool = False
) -> tuple[grpc.StatusCode, str]:
    """Call service/method by its descriptor (any of the four kinds) and return its status.
    raw: request is bytes (a list of bytes for a client stream), sent with no serializer."""
    kind = "stream" if method.client_streaming else "unary"
    kind += "_stream" if method.server_streaming else "_unary"
    path = f"/{service.full_name}/{method.name}"
    if raw:
        rpc = getattr(channel, kind)(path)
    else:
        rpc = getattr(channel, kind)(
            path,
            request_serializer=GetMessageClass(method.input_type).SerializeToString,
            response_deserializer=GetMessageClass(method.output_type).FromString,
        )
        request = iter([request]) if method.client_streaming else request
    call = rpc(request, metadata=metadata, timeout=RPC_DEADLINE)
    try:
        if method.server_streaming:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def counted(method: str, code: str) -> float:
    return REGISTRY.get_sample_value("combiner_rpcs_total", {"method": method, "code": code}) or 0


def timed(method: str) -> float:
    return REGISTRY.get_sample_value("combiner_rpc_seconds_count", {"method": method}) or 0


class BrokenBroker:
    """Stands in for the servicers' broker: any use of it raises `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.used: list[str] = []

    def __getattr__(self, name: str):
        self.used.append(name)
        raise self.error


def break_broker(mp: pytest.MonkeyPatch, replica, error: Exception) -> BrokenBroker:
    broken = BrokenBroker(error)
    mp.setattr(replica.combiner, "broker", broken)
    mp.setattr(replica.models, "broker", broken)
    return broken


async def expect_counted(method: str, code: str, before: float, seconds_before: float) -> None:
    # the handler records after the status went out: the client may see it first
    async def recorded():
        return counted(method, code) == before + 1 and timed(method) == seconds_before + 1

    await eventually(recorded, what=f"{method} counted once with {code}")


def test_the_walk_covers_every_service_the_replica_serves():
    assert {s.full_name for s in SERVICES} == set(server.SERVICES)
    assert len(METHODS) >= 13


async def test_an_unexpected_error_in_any_rpc_answers_failed_precondition(
    replica, stubs, monkeypatch, caplog
):
    wrong = {}
    with monkeypatch.context() as mp, caplog.at_level(logging.ERROR, logger="combiner"):
        broken = break_broker(mp, replica, RuntimeError("broker blew up"))
        for service, method in METHODS:
            name = f"{service.name}.{method.name}"
            before = counted(method.name, "FAILED_PRECONDITION")
            seconds_before = timed(method.name)
            broken.used.clear()
            caplog.clear()
            code, details = await outcome(
                stubs.channel, service, method, request_for(method), GOOD_METADATA
            )
            if not broken.used:
                wrong[name] = "never reached the broker: give it a request that does"
            elif (code, details) != (
                grpc.StatusCode.FAILED_PRECONDITION,
                "internal error, try again: RuntimeError",
            ):
                wrong[name] = (code, details)
            elif not any(
                r.getMessage().startswith(f"{method.name} failed: broker blew up") and r.exc_info
                for r in caplog.records
            ):
                wrong[name] = "not logged with its traceback"
            else:
                await expect_counted(method.name, "FAILED_PRECONDITION", before, seconds_before)
    assert wrong == {}


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInput("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("no such thing"), grpc.StatusCode.NOT_FOUND),
        (NotReady("not yet"), grpc.StatusCode.FAILED_PRECONDITION),
        (Conflict("differs"), grpc.StatusCode.ALREADY_EXISTS),
        (TooLarge("too big"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (BrokerUnavailable("redis gone"), grpc.StatusCode.FAILED_PRECONDITION),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else v.name,
)
async def test_every_rpc_maps_each_broker_error_the_same_way(
    replica, stubs, monkeypatch, error, code
):
    wrong = {}
    with monkeypatch.context() as mp:
        break_broker(mp, replica, error)
        for service, method in METHODS:
            before, seconds_before = counted(method.name, code.name), timed(method.name)
            got, _ = await outcome(
                stubs.channel, service, method, request_for(method), GOOD_METADATA
            )
            if got != code:
                wrong[f"{service.name}.{method.name}"] = got
            else:
                await expect_counted(method.name, code.name, before, seconds_before)
    assert wrong == {}


async def test_every_rpc_answers_invalid_argument_to_a_request_without_identity(replica, stubs):
    """No client id (body or metadata), no model id: the real broker is never asked."""
    wrong = {}
    for service, method in METHODS:
        before, seconds_before = counted(method.name, "INVALID_ARGUMENT"), timed(method.name)
        request = GetMessageClass(method.input_type)()
        code, details = await outcome(stubs.channel, service, method, request)
        if code != grpc.StatusCode.INVALID_ARGUMENT or not details:
            wrong[f"{service.name}.{method.name}"] = (code, details)
        else:
            await expect_counted(method.name, "INVALID_ARGUMENT", before, seconds_before)
    assert wrong == {}


async def test_a_handler_added_only_as_a_generic_handler_is_guarded_too():
    """grpc asks generic handlers for methods not registered by name (older generated code)."""

    async def explode(request, context):
        raise RuntimeError("boom")

    plain = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        explode,
        request_deserializer=pb.Heartbeat.FromString,
        response_serializer=pb.Response.SerializeToString,
    )
    GuardedServer(plain).add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("scaleout.Test", {"Explode": handler}),)
    )
    port = plain.add_insecure_port("127.0.0.1:0")
    await plain.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                "/scaleout.Test/Explode",
                request_serializer=pb.Heartbeat.SerializeToString,
                response_deserializer=pb.Response.FromString,
            )
            for _ in range(2):  # the second call takes the handler guarded the first time
                before = counted("Explode", "FAILED_PRECONDITION")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(pb.Heartbeat(client_id="x"), timeout=RPC_DEADLINE)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

                async def recorded(before=before):
                    return counted("Explode", "FAILED_PRECONDITION") == before + 1

                await eventually(recorded, what="the generic-path call counted")
    finally:
        await plain.stop(0)
