"""Property-based fuzzing (hypothesis) of every RPC of both scaleout services, against a real
replica and a real Redis, with tokens checked and without them.

Each method is walked from the protobuf descriptor (a method added later is fuzzed too); its
request is built field by field from the descriptor: strings with ``{ } : * %``, newlines,
NUL, unicode and oversized values, integers at their extremes, nested and repeated fields,
and garbage bytes as the whole body. Whatever comes in:

- the answer is one of ALLOWED, never UNAVAILABLE, UNKNOWN or INTERNAL (the 1.0.0 client
  dies on UNAVAILABLE and does not retry the others: docs/protocol.md §3);
- the replica still answers its health check with SERVING;
- an answer other than OK leaves the test's keys in Redis exactly as they were.

The replica runs on an event loop of its own in a thread, so hypothesis drives plain
synchronous calls (grpc's sync channel) and shrinks failures as usual.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

import grpc
import pytest
import redis
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import Settings, connect
from combiner.pb import scaleout_pb2 as pb
from combiner.server import Replica, ServeOptions
from tests import tokens
from tests.services import SCAN_COUNT, wait_for

SERVICES = tuple(pb.DESCRIPTOR.services_by_name.values())
METHODS = [(s, m) for s in SERVICES for m in s.methods]
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}
CLIENT = "fz"
FUZZ = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- request strategies from the descriptor --------------------------------------------------

HOSTILE = st.sampled_from(
    ["", CLIENT, "{c:x}", "a:b*c%", "line\nbreak", "nul\x00x", "ünï💥", "%41", "*", "x" * 70_000]
)
TEXT = st.one_of(HOSTILE, st.text(max_size=40))
INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}


def scalar(field) -> st.SearchStrategy:
    if field.type == FD.TYPE_STRING:
        return TEXT
    if field.type == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return st.floats(allow_nan=True, width=32 if field.type == FD.TYPE_FLOAT else 64)
    if field.type == FD.TYPE_ENUM:
        return st.integers(-3, 20)  # unknown values included (proto3 enums are open)
    lo, hi = INT_RANGES[field.type]
    return st.one_of(st.sampled_from([lo, hi, 0, 1, -1 if lo else 0]), st.integers(lo, hi))


def message(descriptor, depth: int = 0) -> st.SearchStrategy:
    def one(field):
        if field.type == FD.TYPE_MESSAGE:
            if depth >= 2 or field.message_type.GetOptions().map_entry:
                return None
            value = message(field.message_type, depth + 1)
        else:
            value = scalar(field)
        return st.lists(value, max_size=3) if field.is_repeated else value

    parts = {f.name: s for f in descriptor.fields if (s := one(f)) is not None}
    cls = GetMessageClass(descriptor)

    @st.composite
    def build(draw):
        chosen = draw(st.sets(st.sampled_from(sorted(parts)), max_size=len(parts))) if parts else ()
        msg = cls()
        for name in chosen:
            value = draw(parts[name])
            field = descriptor.fields_by_name[name]
            if field.type == FD.TYPE_MESSAGE:
                target = getattr(msg, name)
                if field.is_repeated:
                    for item in value:
                        target.add().CopyFrom(item)
                else:
                    target.CopyFrom(value)
            elif field.is_repeated:
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
        return msg

    return build()


# --- a replica on its own loop -----------------------------------------------------------


class Tier:
    """A replica (tokens checked, or --insecure) on the session's Redis, served from a
    thread's event loop; a refresh-token-backed access token for CLIENT."""

    def __init__(self, redis_url: str, insecure: bool) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.redis = redis.Redis.from_url(redis_url)
        self.metadata = self._run(self._start(redis_url, insecure))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.replica.port}")
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def _run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self, redis_url: str, insecure: bool) -> tuple:
        self.broker = await connect(redis_url, settings=Settings(prefix=self.prefix))
        key = await tokens.publish(self.broker)
        issued = await tokens.issue(self.broker, key, CLIENT)
        self.replica = Replica(self.broker, ServeOptions(port=0, insecure=insecure))
        await self.replica.start()
        return issued.metadata()

    async def _stop(self) -> None:
        await self.replica.stop(grace=0)
        await self.broker.close()

    def close(self) -> None:
        self.channel.close()
        self._run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        for key in self.redis.scan_iter(f"{self.prefix}:*", count=SCAN_COUNT):
            self.redis.delete(key)
        self.redis.close()

    def keys(self) -> dict[bytes, bytes]:
        """Every key of this tier with a dump of its value, but the replica's own record,
        which its upkeep rewrites on a timer of its own."""
        own = (f"{self.prefix}:replica".encode(),)
        return {
            k: self.redis.dump(k)
            for k in sorted(self.redis.scan_iter(f"{self.prefix}:*", count=SCAN_COUNT))
            if not k.startswith(own)
        }

    def settled(self) -> None:
        """Wait until a stream the client let go of is closed on the replica too: it ends
        the stream's lease (P:streams) after the call has ended for the client."""
        streams = f"{self.prefix}:streams"
        wait_for(
            lambda: not self.replica.combiner.open_streams and not self.redis.zcard(streams),
            10,
            0.02,
            "the TaskStream closed on the replica",
        )

    def call(self, service, method, request, metadata, raw: bool = False) -> grpc.StatusCode:
        path = f"/{service.full_name}/{method.name}"
        kind = ("stream" if method.client_streaming else "unary") + (
            "_stream" if method.server_streaming else "_unary"
        )
        if raw:
            rpc = getattr(self.channel, kind)(path)
        else:
            rpc = getattr(self.channel, kind)(
                path,
                request_serializer=GetMessageClass(method.input_type).SerializeToString,
                response_deserializer=GetMessageClass(method.output_type).FromString,
            )
        if method.client_streaming:
            request = iter(request)
        # A TaskStream that is let in waits for tasks: the test's own deadline ends it.
        timeout = 1.0 if method.server_streaming else 30.0
        try:
            answer = rpc(request, metadata=metadata, timeout=timeout)
            if method.server_streaming:
                for _ in answer:
                    pass
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and method.server_streaming:
                return grpc.StatusCode.OK  # it was serving the stream
            return code
        return grpc.StatusCode.OK

    def check(self, service, method, request, metadata, raw: bool = False) -> grpc.StatusCode:
        before = self.keys()
        code = self.call(service, method, request, metadata, raw)
        if method.server_streaming and code == grpc.StatusCode.OK:
            self.settled()
        assert code in ALLOWED, f"{method.name} answered {code.name}"
        serving = self.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert serving == health_pb2.HealthCheckResponse.SERVING
        if code != grpc.StatusCode.OK:
            after = self.keys()
            written = after.keys() - before.keys() or "changed values"
            assert after == before, f"{method.name} answered {code.name} but wrote {written}"
        return code


@pytest.fixture(scope="module")
def secure(redis_url):
    tier = Tier(redis_url, insecure=False)
    yield tier
    tier.close()


@pytest.fixture(scope="module")
def insecure(redis_url):
    tier = Tier(redis_url, insecure=True)
    yield tier
    tier.close()


def requests(method) -> st.SearchStrategy:
    body = message(method.input_type)
    return st.lists(body, min_size=0, max_size=3) if method.client_streaming else body


BAD_AUTH = st.one_of(
    st.just(()),
    st.sampled_from(["Bearer", "Bearer x", "Basic Zm9vOmJhcg==", "Bearer a.b.c", "x" * 70_000]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
)


@pytest.mark.parametrize(("service", "method"), METHODS, ids=lambda x: getattr(x, "name", x))
def test_without_a_valid_token_every_rpc_is_unauthenticated_and_writes_nothing(
    secure, service, method
):
    @FUZZ
    @given(request=requests(method), auth=BAD_AUTH)
    def run(request, auth):
        metadata = [("client-id", CLIENT)]
        if auth != ():
            metadata.append(("authorization", auth))
        code = secure.check(service, method, request, metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED, code.name

    run()


@pytest.mark.parametrize(("service", "method"), METHODS, ids=lambda x: getattr(x, "name", x))
def test_random_bodies_with_a_token(secure, service, method):
    @FUZZ
    @given(request=requests(method))
    def run(request):
        secure.check(service, method, request, secure.metadata)

    run()


@pytest.mark.parametrize(("service", "method"), METHODS, ids=lambda x: getattr(x, "name", x))
def test_random_bodies_without_tokens(insecure, service, method):
    @FUZZ
    @given(request=requests(method))
    def run(request):
        insecure.check(service, method, request, insecure.metadata)

    run()


@pytest.mark.parametrize(("service", "method"), METHODS, ids=lambda x: getattr(x, "name", x))
def test_garbage_bodies(secure, service, method):
    body = st.binary(min_size=1, max_size=200)

    @FUZZ
    @given(data=st.lists(body, max_size=3) if method.client_streaming else body)
    def run(data):
        secure.check(service, method, data, secure.metadata, raw=True)
        code = secure.check(service, method, data, (), raw=True)
        assert code == grpc.StatusCode.UNAUTHENTICATED, code.name

    run()
