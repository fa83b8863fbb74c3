"""Tokens on every gRPC RPC (issue 12, docs/protocol.md §15): each method of both services,
walked from the protobuf descriptors, called over real gRPC on replicas that require tokens,
with real Redis. Whatever is refused writes nothing: every test that says so compares the
test prefix's keys and their contents before and after."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message_factory import GetMessageClass

from combiner.pb import scaleout_pb2 as pb
from combiner.signing import ALGORITHM, DEFAULT_AUDIENCE, ISSUER, SigningKey
from tests import tokens
from tests.conftest import Stubs, meta
from tests.services import eventually, inbound_entries
from tests.test_rpc_guard import METHODS, outcome, request_for

pytestmark = pytest.mark.topologies

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
BODY_ID_FIELDS = ("client_id", "node_id")


# --- what Redis holds --------------------------------------------------------------------


async def snapshot(broker, prefix: str, ignore: tuple[bytes, ...] = ()) -> dict[bytes, bytes]:
    """Every key of the test's prefix with its serialized value, except the replicas' own
    heartbeat (their upkeep loop renews it on its own schedule) and keys ending in one of
    `ignore`."""
    out = {}
    for key in await broker._redis.keys(prefix + "*"):
        if b":replica:" in key or key.endswith((b":replicas", *ignore)):
            continue
        out[key] = await broker._redis.dump(key)
    return out


async def assert_nothing_written(
    broker, prefix: str, before: dict, what: str, ignore: tuple[bytes, ...] = ()
) -> None:
    after = await snapshot(broker, prefix, ignore)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == [], f"{what} wrote {changed}"


# --- tokens that must not pass -----------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(client_id: str = "g1", **override) -> dict:
    now = int(time.time())
    base = {
        "iss": ISSUER,
        "aud": DEFAULT_AUDIENCE,
        "sub": client_id,
        "role": "client",
        "tid": "0123456789abcdef",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
    }
    base.update(override)
    return base


def signed(private: Ed25519PrivateKey, kid: str, body: dict) -> str:
    return jwt.encode(body, private, algorithm=ALGORITHM, headers={"kid": kid})


def bad_tokens(private: Ed25519PrivateKey, key: SigningKey) -> dict[str, str | None]:
    """authorization values (None: no header at all) that must each be UNAUTHENTICATED."""
    kid = key.kid
    now = int(time.time())
    good = signed(private, kid, claims())
    head, _, sig = good.split(".")
    forged_payload = b64(json.dumps(claims("someone-else")).encode())
    hs_header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    hs_body = b64(json.dumps(claims()).encode())
    hs_sig = b64(
        hmac.new(
            key.public_pem.encode(), f"{hs_header}.{hs_body}".encode(), hashlib.sha256
        ).digest()
    )
    none_header = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    other = SigningKey.generate()  # another deployment's key: never published here
    return {
        "missing": None,
        "empty": "",
        "scheme only": "Bearer",
        "no scheme": good,
        "malformed": "Bearer not-a-jwt",
        "garbage": "Bearer " + b64(uuid.uuid4().bytes * 8),
        "three garbage parts": "Bearer a.b.c",
        "expired": "Bearer " + signed(private, kid, claims(exp=now - 60, iat=now - 700)),
        "not yet valid": "Bearer " + signed(private, kid, claims(nbf=now + 120)),
        "wrong issuer": "Bearer " + signed(private, kid, claims(iss="someone")),
        "wrong audience": "Bearer " + signed(private, kid, claims(aud="another-deployment")),
        "no subject": "Bearer " + signed(private, kid, claims(sub="")),
        "unknown role": "Bearer " + signed(private, kid, claims(role="root")),
        "tampered payload": f"Bearer {head}.{forged_payload}.{sig}",
        "alg none": f"Bearer {none_header}.{hs_body}.",
        "HS256 with the public key as secret": f"Bearer {hs_header}.{hs_body}.{hs_sig}",
        "another deployment's key": "Bearer " + other.mint("g1", "client", "x" * 16, 600).token,
        "64 KiB": "Bearer " + "a" * (64 << 10),
    }


@pytest.fixture
async def own_key(broker):
    """A published key whose private half this test holds (to forge claims with it)."""
    private = Ed25519PrivateKey.generate()
    key = SigningKey(private)
    await tokens.publish(broker, key)
    return private, key


def with_auth(base: tuple, value: str | None) -> tuple:
    return base if value is None else (*base, ("authorization", value))


GOOD_METADATA = (*meta("g1"), ("model-id", "g1"), ("checksum", "0" * 64))


async def test_every_rpc_refuses_every_bad_token_and_writes_nothing(
    make_replica, broker, prefix, own_key
):
    replica = await make_replica(insecure=False)
    private, key = own_key
    wrong = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
        before = await snapshot(broker, prefix)
        for label, value in bad_tokens(private, key).items():
            for service, method in METHODS:
                code, details = await outcome(
                    channel, service, method, request_for(method), with_auth(GOOD_METADATA, value)
                )
                if code != UNAUTHENTICATED or not details:
                    wrong[f"{label}: {method.name}"] = (code, details)
        await assert_nothing_written(broker, prefix, before, "a refused call")
    assert wrong == {}
    # and no local state: no upload slot, no stream slot, no cached caller
    assert not replica.models.uploads.active
    assert not replica.combiner.open_streams
    assert not replica.combiner._stream_slots


async def test_a_good_token_reaches_every_rpc(secure_replica, secure_stubs, issue):
    """The control: the same walk with a valid token gets past the guard (the test above
    can fail), and without a client id in body or metadata the token's id is used."""
    issued = await issue("g1")
    wrong = {}
    for service, method in METHODS:
        if method.name == "TaskStream":
            continue  # never ends by itself: test_taskstream_with_a_token below
        auth = (("authorization", f"Bearer {issued.access_token}"),)
        extra = (("model-id", f"m-{uuid.uuid4().hex}"), ("checksum", "0" * 64))
        request = GetMessageClass(method.input_type)()
        if method.name == "Download":
            request = pb.ModelRequest(model_id="no-such-model")
        code, details = await outcome(secure_stubs.channel, service, method, request, auth + extra)
        if code in (UNAUTHENTICATED, PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT):
            wrong[method.name] = (code, details)
    assert wrong == {}
    client = await secure_replica.broker.presence.client("g1")
    assert client.get("id") == "g1"  # the token's id, named nowhere in the calls


async def test_two_identical_authorization_values_pass_two_different_ones_do_not(
    secure_stubs, issue, broker, prefix
):
    """Over TLS the 1.0.0 client sends the header twice, identical (protocol.md §15)."""
    a, b = await issue("dup"), await issue("dup")
    twice = (*meta("dup"), ("authorization", f"Bearer {a.access_token}"))
    twice += (("authorization", f"Bearer {a.access_token}"),)
    await secure_stubs.combiner.SendHeartbeat(pb.Heartbeat(client_id="dup"), metadata=twice)
    before = await snapshot(broker, prefix)
    differ = (*meta("dup"), ("authorization", f"Bearer {a.access_token}"))
    differ += (("authorization", f"Bearer {b.access_token}"),)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await secure_stubs.combiner.SendHeartbeat(pb.Heartbeat(client_id="dup"), metadata=differ)
    assert err.value.code() == UNAUTHENTICATED
    await assert_nothing_written(broker, prefix, before, "two different tokens")


# --- identity binding --------------------------------------------------------------------


async def test_another_client_id_in_metadata_or_body_is_permission_denied(
    secure_stubs, issue, broker, prefix
):
    alice = await issue("alice")
    auth = (("authorization", f"Bearer {alice.access_token}"),)
    upload_meta = (("model-id", "m-alice"), ("checksum", "0" * 64))
    before = await snapshot(broker, prefix)
    wrong = {}
    for service, method in METHODS:
        request = request_for(method)  # ids "g1" in the body
        for key in BODY_ID_FIELDS:
            if key in method.input_type.fields_by_name:
                setattr(request, key, "alice")
        for label, md in (
            ("client-id", (("client", "alice"), ("client-id", "mallory"))),
            ("client", (("client", "mallory"), ("client-id", "alice"))),
            ("both", meta("mallory")),
        ):
            code, _ = await outcome(
                secure_stubs.channel, service, method, request, md + auth + upload_meta
            )
            if code != PERMISSION_DENIED:
                wrong[f"{method.name} metadata {label}"] = code
        body_fields = [f for f in BODY_ID_FIELDS if f in method.input_type.fields_by_name]
        for field in body_fields:
            request = request_for(method)
            setattr(request, field, "mallory")
            code, _ = await outcome(
                secure_stubs.channel, service, method, request, meta("alice") + auth + upload_meta
            )
            if code != PERMISSION_DENIED:
                wrong[f"{method.name} body {field}"] = code
    await assert_nothing_written(broker, prefix, before, "a call naming another client")
    assert wrong == {}


# --- ownership -----------------------------------------------------------------------------


class Client:
    """One client's view: its token's metadata on every call (what the 1.0.0 client sends)."""

    def __init__(self, stubs: Stubs, issued: tokens.Issued) -> None:
        self.stubs = stubs
        self.issued = issued
        self.id = issued.client_id
        self.md = issued.metadata()

    async def poll(self, **fields) -> pb.TaskRequest:
        report = pb.ActivityReport(node_id=self.id, **fields)
        return await self.stubs.combiner.PollAndReport(report, metadata=self.md)

    async def upload(self, model_id: str, data: bytes) -> pb.ModelResponse:
        md = (*self.md, ("model-id", model_id), ("checksum", hashlib.sha256(data).hexdigest()))
        return await self.stubs.models.Upload(iter([pb.FileChunk(data=data)]), metadata=md)

    async def download(self, model_id: str) -> bytes:
        call = self.stubs.models.Download(pb.ModelRequest(model_id=model_id), metadata=self.md)
        return b"".join([chunk.data async for chunk in call])

    async def update(self, task: pb.TaskRequest, model_update_id: str) -> pb.Response:
        return await self.stubs.combiner.SendModelUpdate(
            pb.ModelUpdate(
                client_id=self.id,
                model_id=task.model_id,
                model_update_id=model_update_id,
                correlation_id=task.correlation_id,
                session_id=task.session_id,
                round_id=task.round_id,
                meta=json.dumps({"training_metadata": {"num_examples": 1}}),
            ),
            metadata=self.md,
        )


async def refused(coro) -> grpc.StatusCode:
    try:
        await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
async def alice_and_bob(secure_stubs, issue, broker):
    """Alice with a training task on model m-seed-a (pushed and polled), Bob with nothing."""
    alice = Client(secure_stubs, await issue("alice"))
    bob = Client(secure_stubs, await issue("bob"))
    await broker.models.put(b"seed of alice", "m-seed-a")
    corr = await broker.tasks.push("alice", "Fedn_ModelUpdate", model_id="m-seed-a")
    task = await alice.poll()
    assert task.correlation_id == corr
    return alice, bob, task


async def test_a_client_cannot_report_or_complete_another_clients_task(
    alice_and_bob, broker, prefix
):
    alice, bob, task = alice_and_bob
    corr = task.correlation_id
    before = await snapshot(broker, prefix)
    outcomes = {
        "progress": await refused(bob.poll(correlation_id=corr, status="RUNNING")),
        "done": await refused(bob.poll(correlation_id=corr, status="COMPLETED", done=True)),
        "failed": await refused(bob.poll(correlation_id=corr, status="FAILED", done=True)),
    }
    for kind, message in (
        ("validation", pb.ModelValidation),
        ("prediction", pb.ModelPrediction),
    ):
        request = message(client_id="bob", model_id="m-seed-a", correlation_id=corr, data="{}")
        send = getattr(bob.stubs.combiner, f"SendModel{kind.capitalize()}")
        outcomes[kind] = await refused(send(request, metadata=bob.md))
    outcomes["update"] = await refused(bob.update(task, "m-seed-a"))
    assert outcomes == {
        "progress": PERMISSION_DENIED,
        "done": PERMISSION_DENIED,
        "failed": PERMISSION_DENIED,
        "validation": grpc.StatusCode.NOT_FOUND,
        "prediction": grpc.StatusCode.NOT_FOUND,
        "update": grpc.StatusCode.NOT_FOUND,
    }
    await assert_nothing_written(broker, prefix, before, "Bob acting on Alice's task")
    # Alice's own task is still hers to report
    assert (await alice.poll(correlation_id=corr, status="RUNNING")).correlation_id == corr


async def test_a_client_cannot_take_another_clients_task_stream(alice_and_bob, broker, prefix):
    _, bob, _ = alice_and_bob
    await broker.tasks.push("alice", "Fedn_Validation", model_id="m-seed-a")
    before = await snapshot(broker, prefix)
    call = bob.stubs.combiner.TaskStream(
        pb.ClientAvailableMessage(client_id="alice"), metadata=bob.md
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == PERMISSION_DENIED
    await assert_nothing_written(broker, prefix, before, "Bob's stream for Alice")
    assert await broker.tasks.queued("alice") == 1


async def test_an_update_must_name_a_model_the_sender_uploaded(alice_and_bob, broker, prefix):
    alice, bob, task = alice_and_bob
    await alice.upload("m-update-a", b"alice's update")
    await broker.tasks.push("bob", "Fedn_ModelUpdate", model_id="m-seed-a")
    bob_task = await bob.poll()
    before = await snapshot(broker, prefix)
    assert await refused(bob.update(bob_task, "m-update-a")) == PERMISSION_DENIED
    assert await refused(bob.update(bob_task, "m-seed-a")) == PERMISSION_DENIED  # operator's
    assert await refused(bob.update(bob_task, "never-uploaded")) == grpc.StatusCode.NOT_FOUND
    # nor may Bob upload under Alice's model id (refused before a chunk is stored)
    assert await refused(bob.upload("m-update-a", b"poison")) == PERMISSION_DENIED
    await assert_nothing_written(broker, prefix, before, "Bob naming Alice's model")
    # Alice's own update of her own model counts
    await alice.update(task, "m-update-a")
    record = await broker.tasks.show(task.correlation_id)
    assert record.get("model_update_id") == "m-update-a" and record.get("result_at")


async def test_a_client_downloads_only_models_it_was_given(alice_and_bob, broker, prefix, issue):
    alice, bob, _ = alice_and_bob
    await alice.upload("m-update-a", b"alice's update")
    await broker.models.put(b"some other model", "m-other")
    before = await snapshot(broker, prefix)
    for model_id in ("m-seed-a", "m-update-a", "m-other"):
        assert await refused(bob.download(model_id)) == PERMISSION_DENIED, model_id
    await assert_nothing_written(broker, prefix, before, "Bob's downloads")
    assert await alice.download("m-seed-a") == b"seed of alice"  # her task's model
    assert await alice.download("m-update-a") == b"alice's update"  # her own upload
    assert await refused(alice.download("m-other")) == PERMISSION_DENIED
    # an admin token may download any model
    admin = Client(bob.stubs, await issue("operator", role="admin"))
    assert await admin.download("m-other") == b"some other model"


async def test_any_client_downloads_the_current_global_model(alice_and_bob, broker):
    _, bob, _ = alice_and_bob
    await broker.models.put(b"the global model", "m-global")
    assert await refused(bob.download("m-global")) == PERMISSION_DENIED
    await broker.sessions.create({"rounds": 1}, "m-global")
    assert await bob.download("m-global") == b"the global model"


async def test_a_report_of_a_task_nobody_has_is_answered_not_refused(alice_and_bob):
    """A task whose record expired is no one else's: the client is told nothing, not
    PERMISSION_DENIED (the 1.0.0 client would stop)."""
    _, bob, _ = alice_and_bob
    reply = await bob.poll(correlation_id="long-gone", status="RUNNING")
    assert reply.correlation_id == ""


# --- TaskStreams: revocation, expiry, the cap ------------------------------------------------


def holds(condition):
    """An async predicate for tests.services.eventually from a plain one."""

    async def check():
        return condition()

    return check


async def connects(broker, client_id: str, count: int) -> bool:
    """Whether count TaskStreams of client_id wrote their connect event."""
    entries = await inbound_entries(broker, "presence")
    seen = [f for _, f in entries if f.get(b"client_id") == client_id.encode()]
    return sum(f.get(b"event") == b"connect" for f in seen) == count


async def stream_status(call, within: float) -> grpc.StatusCode:
    """Read a TaskStream until it ends (keepalives and tasks skipped); its status."""

    async def drain():
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    return await asyncio.wait_for(drain(), within)


async def test_revocation_refuses_the_next_rpc_on_every_replica_within_a_second(
    make_replica, signing_key, issue, broker
):
    replicas = [await make_replica(insecure=False) for _ in range(2)]
    carol = await issue("carol")
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{r.port}") for r in replicas]
    try:
        clients = [Client(Stubs(ch), carol) for ch in channels]
        for client in clients:  # verified (and cached) on both before the revocation
            await client.poll()
        stream = clients[0].stubs.combiner.TaskStream(
            pb.ClientAvailableMessage(client_id="carol"), metadata=carol.metadata()
        )
        await eventually(
            holds(lambda: replicas[0].combiner.open_streams.get("carol")),
            what="carol's stream open",
        )
        await broker.credentials.revoke(carol.token_id)
        revoked_at = time.monotonic()

        async def refused_everywhere():
            codes = [await refused(c.poll()) for c in clients]
            return all(code == UNAUTHENTICATED for code in codes)

        await eventually(refused_everywhere, within=1.0, what="the revoked token refused")
        assert time.monotonic() - revoked_at <= 1.0 + 0.5  # the 1 s contract, plus the call
        assert await stream_status(stream, within=1.0) == UNAUTHENTICATED
    finally:
        for ch in channels:
            await ch.close()


async def test_a_task_stream_ends_when_its_token_expires(secure_replica, secure_stubs, issue):
    """FAILED_PRECONDITION, which the 1.0.0 client retries with its refreshed token;
    UNAUTHENTICATED would make it stop (docs/protocol.md §3.2, §15)."""
    dave = await issue("dave", lifetime=2)
    stream = secure_stubs.combiner.TaskStream(
        pb.ClientAvailableMessage(client_id="dave"), metadata=dave.metadata()
    )
    assert await stream_status(stream, within=15) == grpc.StatusCode.FAILED_PRECONDITION
    assert "expired" in (await stream.details())


async def test_task_streams_per_client_are_capped(make_replica, signing_key, issue, broker, prefix):
    replica = await make_replica(insecure=False, max_streams_per_client=2)
    erin, frank = await issue("erin"), await issue("frank")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
        stubs = Stubs(channel)

        def open_stream(who):
            return stubs.combiner.TaskStream(
                pb.ClientAvailableMessage(client_id=who.client_id), metadata=who.metadata()
            )

        held = [open_stream(erin), open_stream(erin)]
        await eventually(
            holds(lambda: replica.combiner.open_streams.get("erin") == 2),
            what="two streams open",
        )
        # The open streams keep writing last_seen (client hash, clients zset) and their
        # leases (streams zset) on their own schedule; what opening a stream writes besides
        # (its connect event in the presence stream, ...) is compared.
        renewed = (b":streams", b":clients", b":client")
        await eventually(lambda: connects(broker, "erin", 2), what="erin's streams connected")
        before = await snapshot(broker, prefix, renewed)
        third = open_stream(erin)
        assert await stream_status(third, within=10) == grpc.StatusCode.FAILED_PRECONDITION
        await assert_nothing_written(broker, prefix, before, "a stream over the cap", renewed)
        other = open_stream(frank)  # the cap is per client
        await eventually(
            holds(lambda: replica.combiner.open_streams.get("frank") == 1),
            what="frank's stream open",
        )
        held[0].cancel()  # a client whose old stream is gone gets in again
        await eventually(
            holds(lambda: replica.combiner._stream_slots.get("erin") == 1),
            what="the cancelled stream's slot free",
        )
        again = open_stream(erin)
        await eventually(
            holds(lambda: replica.combiner.open_streams.get("erin") == 2),
            what="erin's new stream open",
        )
        for call in (held[1], other, again):
            call.cancel()


async def test_taskstream_with_a_token_delivers_the_clients_own_tasks(secure_stubs, issue, broker):
    gina = await issue("gina")
    stream = secure_stubs.combiner.TaskStream(pb.ClientAvailableMessage(), metadata=gina.metadata())
    corr = await broker.tasks.push("gina", "Fedn_Validation", model_id="m")
    from tests.conftest import next_task

    assert (await next_task(stream)).correlation_id == corr
    stream.cancel()


# --- Redis down ------------------------------------------------------------------------------


@pytest.fixture
def redis_server():
    from tests.services import RedisServer

    server = RedisServer(appendonly=True, fsync="always").start()  # keys survive a kill
    yield server
    server.close()


async def test_redis_down_makes_auth_answer_failed_precondition_never_unavailable(redis_server):
    """A token whose key the replica has not seen needs Redis (the key lookup); one of a
    known key needs fresh revocations. Either way: "try again" (FAILED_PRECONDITION),
    which the 1.0.0 client survives, and then OK once Redis is back."""
    from tests.conftest import replica_at

    async with replica_at(redis_server.url, insecure=False) as (replica, stubs):
        known_key = await tokens.publish(replica.broker)
        known = await tokens.issue(replica.broker, known_key, "hank")
        ivan = Client(stubs, known)
        await ivan.poll()  # the key and this token are now cached
        new_key = await tokens.publish(replica.broker)
        fresh = Client(stubs, await tokens.issue(replica.broker, new_key, "hank"))
        again = Client(stubs, await tokens.issue(replica.broker, known_key, "hank"))
        redis_server.kill()
        assert await refused(fresh.poll()) == grpc.StatusCode.FAILED_PRECONDITION
        assert await refused(fresh.upload("m-h", b"x")) == grpc.StatusCode.FAILED_PRECONDITION

        async def stale():  # revocations unreadable for stale_after: refused before Redis
            try:
                await again.poll()
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
                return "revocations" in (exc.details() or "")
            raise AssertionError("answered OK with Redis down")

        await eventually(stale, within=30, what="the revocation check refusing")
        redis_server.start()
        await eventually(lambda: ok(fresh.poll()), within=30, what="a fresh token accepted again")


async def ok(coro) -> bool:
    code = await refused(coro)
    assert code == grpc.StatusCode.FAILED_PRECONDITION or code == grpc.StatusCode.OK, code
    return code == grpc.StatusCode.OK
