"""The key schema (docs/architecture.md contract 8): client-supplied ids with key syntax in them
neither collide nor escape their namespace, per-client keys keep their partition's one intact
hash tag (so every script touches one Cluster slot), partitions spread evenly over the slots,
and end to end (real replica, real Redis) every key stays under the prefix."""

from __future__ import annotations

import asyncio
import itertools
import re
import time

import grpc
import pytest
from redis.crc import key_slot

from broker.keys import INBOUND_KINDS, Keys, decode_id, encode_id
from broker.partitions import SLOTS, partition_of, tags
from combiner.pb import scaleout_pb2 as pb

NASTY = [
    "a",
    "a:b",
    "a%3Ab",
    "a%3ab",
    "a}b",
    "a%7Db",
    "a{b",
    "{a}",
    "a*b",
    "a?b",
    "a[b]",
    "a\\b",
    "a b",
    "a+b",
    "a\nb",
    "a\r\nb",
    "a%b",
    "a%",
    "%",
    "ä",
    "日本",
    "a/b",
    "a:queue",
    "a:client",
    "a}:queue",
    "",
    " ",
    ":",
    "{",
    "}",
    "a:task:b",
]

PER_CLIENT = {
    "client": lambda k, i: k.client(i),
    "queue": lambda k, i: k.queue(i),
    "task(i, t)": lambda k, i: k.task(i, "t"),
    "task(c, i)": lambda k, i: k.task("c", i),
    "records": lambda k, i: k.client_records(i, "metrics"),
}
GLOBAL = {
    "taskref": lambda k, i: k.taskref(i, 0),
    "model": lambda k, i: k.model(i),
    "model_chunks": lambda k, i: k.model_chunks(i),
    "replica": lambda k, i: k.replica(i),
    "session": lambda k, i: k.session(i),
    "round(s, i)": lambda k, i: k.round("s", i),
    "round(i, r)": lambda k, i: k.round(i, "r"),
}
BUILDERS = {**PER_CLIENT, **GLOBAL}
KEY_CHARS = re.compile(r"^[A-Za-z0-9._~%:{}-]+$")  # printable, no spaces, no glob syntax


def test_encoding_is_injective_and_reversible():
    encoded = [encode_id(i) for i in NASTY]
    assert len(set(encoded)) == len(NASTY)
    assert [decode_id(e) for e in encoded] == NASTY
    for e in encoded:  # nothing with a meaning in a key, a hash tag or a SCAN pattern
        assert not set(e) & set(":{}*?[]\\ \n\r")


@pytest.mark.parametrize("builder", BUILDERS, ids=list(BUILDERS))
def test_each_builder_gives_distinct_keys_under_the_prefix(builder):
    keys = Keys("pfx")
    made = [BUILDERS[builder](keys, i) for i in NASTY]
    assert len(set(made)) == len(NASTY), builder
    for key in made:
        assert key.startswith("pfx:")
        assert KEY_CHARS.match(key), key


def test_no_key_of_one_kind_equals_a_key_of_another():
    keys = Keys("pfx")
    made = [fn(keys, i) for fn in BUILDERS.values() for i in NASTY]
    made += [keys.inbound(kind) for kind in INBOUND_KINDS]
    made += [keys.clients(), keys.streams(), keys.wake(), keys.replicas, keys.sessions]
    # task(i, "t") and task("c", i) may meet at task("c", "t"); everything else is unique
    overlap = {keys.task("c", "t")}
    dupes = [k for k in set(made) if made.count(k) > 1 and k not in overlap]
    assert dupes == []


def _tag(key: str) -> str:
    # Redis Cluster hashes what lies between the first '{' and the next '}'
    assert key.count("{") == 1 and key.count("}") == 1, key
    return key[key.index("{") + 1 : key.index("}")]


@pytest.mark.parametrize("client_id", NASTY)
def test_per_client_keys_carry_their_partitions_one_intact_hash_tag(client_id):
    keys = Keys("pfx", partitions=16)
    p = keys.partition_of(client_id)
    found = set()
    for name, fn in PER_CLIENT.items():
        if name == "task(c, i)":
            key = keys.task(client_id, "t:{x}")  # a nasty correlation id as well
        else:
            key = fn(keys, client_id)
        found.add(_tag(key))
    # what the poll, push and ingest scripts touch beside the client's own keys
    found |= {_tag(keys.clients(p)), _tag(keys.inbound("reports", p)), _tag(keys.wake(p))}
    found.add(_tag(keys.taskref("t:{x}", p)))
    assert found == {tags(16)[p]}  # one slot
    assert keys.task_prefix(client_id) + encode_id("t") == keys.task(client_id, "t")


@pytest.mark.parametrize("model_id", NASTY)
def test_a_models_keys_share_one_tag(model_id):
    keys = Keys("pfx", partitions=16)
    found = {_tag(keys.model(model_id)), _tag(keys.model_chunks(model_id))}
    found.add(_tag(keys.model_upload(model_id, "u1")))  # model_commit.lua renames it
    assert found == {encode_id(model_id)}


@pytest.mark.parametrize("n", [1, 3, 16, 17, 100, 1024])
def test_each_partition_lands_in_its_own_share_of_the_slots(n):
    for i, tag in enumerate(tags(n)):
        assert i * SLOTS // n <= key_slot(tag.encode()) < (i + 1) * SLOTS // n


def test_partitions_spread_evenly_over_a_fresh_clusters_primaries():
    # redis-cli --cluster create splits the slots into equal ranges, one per primary
    for primaries in (3, 4, 5, 8, 16):
        owners = [key_slot(t.encode()) * primaries // SLOTS for t in tags(16)]
        counts = [owners.count(i) for i in range(primaries)]
        assert max(counts) - min(counts) <= 1, (primaries, counts)


def test_clients_spread_over_the_partitions_and_stay_where_they_are():
    counts = [0] * 16
    for i in range(16_000):
        counts[partition_of(f"client-{i}", 16)] += 1
    assert min(counts) > 800 and max(counts) < 1200, counts
    assert partition_of("client-7", 16) == Keys("x", 16).partition_of("client-7")
    assert partition_of("anything", 1) == 0


def test_distinct_clients_get_distinct_hash_tags():
    keys = Keys("pfx")
    tags = {keys.client_tag(i) for i in NASTY}
    assert len(tags) == len(NASTY)


def test_a_wake_up_message_names_exactly_the_clients_it_was_built_for():
    # push.lua joins encoded client ids with newlines: no id, however nasty, can split one
    ids = [i for i in NASTY if i]  # push refuses an empty client id
    assert Keys.woken_clients("\n".join(encode_id(i) for i in ids).encode()) == ids
    assert Keys.woken_clients(b"") == []


@pytest.mark.parametrize("prefix", ["", "a:b", "a{b}", "a*", "a b", "ä", "x" * 65, "a\n"])
def test_prefix_with_key_syntax_is_refused(prefix):
    with pytest.raises(ValueError):
        Keys(prefix)


# --- end to end ----------------------------------------------------------------------------

E2E_CLIENTS = ["x", "x:queue", "x}", "x%7D", "x{", "x*", "x y", "x\nz", "ü", "x:client"]
E2E_CORRS = ["t:1", "t%3A1", "t}1", "t{1", "t*", "t 1", "t\n1", "t ü", "t:task:x", "%"]


async def all_keys(redis) -> set[bytes]:
    return {k async for k in redis.scan_iter(count=1000)}


async def poll(stubs, client_id: str, **report) -> pb.TaskRequest:
    # ids with newlines or non-ASCII cannot travel as gRPC metadata: body only
    return await stubs.combiner.PollAndReport(pb.ActivityReport(node_id=client_id, **report))


async def test_nasty_ids_end_to_end_stay_apart_and_under_the_prefix(stubs, broker, replica):
    before = await all_keys(broker._redis)
    prefix = broker._keys.prefix

    pushed = {}
    for client_id, corr in zip(E2E_CLIENTS, E2E_CORRS, strict=True):
        await broker.tasks.push(client_id, "Fedn_Validation", model_id="m", correlation_id=corr)
        pushed[client_id] = corr

    # each client gets only its own task, then reports it done and sends its result
    for client_id in reversed(E2E_CLIENTS):
        task = await poll(stubs, client_id, status="")
        assert (task.correlation_id, task.client_id) == (pushed[client_id], client_id)
        corr = task.correlation_id
        await poll(stubs, client_id, status="RUNNING", correlation_id=corr)
        result = pb.ModelValidation(client_id=client_id, correlation_id=corr, data=client_id)
        await stubs.combiner.SendModelValidation(result)
        reply = await poll(stubs, client_id, status="COMPLETED", correlation_id=corr, done=True)
        assert reply == pb.TaskRequest()
        metric = pb.ModelMetric(client_id=client_id, metrics=[pb.MetricElem(key="k", value=1)])
        await stubs.combiner.SendModelMetric(metric)

    for client_id, corr in pushed.items():
        record = await broker.tasks.show(corr)
        assert record["client_id"] == client_id and record["state"] == "completed"
        assert record["result"] == client_id
        assert (await broker.presence.client(client_id))["id"] == client_id
    assert sorted(await broker.presence.online()) == sorted(E2E_CLIENTS)

    # TaskStream wake-ups find the right client too (the channel carries the encoded id)
    for client_id in ("x*", "x}", "x y"):
        call = stubs.combiner.TaskStream(pb.ClientAvailableMessage(client_id=client_id))
        deadline = time.monotonic() + 10
        while replica.combiner.open_streams.get(client_id, 0) < 1:
            assert time.monotonic() < deadline, "stream did not open"
            await asyncio.sleep(0.01)
        corr = await broker.tasks.push(client_id, "Fedn_Prediction", model_id="m")
        msg = await asyncio.wait_for(call.read(), 10)
        while not msg.correlation_id:  # keepalives
            msg = await asyncio.wait_for(call.read(), 10)
        assert (msg.correlation_id, msg.client_id) == (corr, client_id)
        call.cancel()

    # models under ids with every allowed character
    for model_id in ("m.1", "m-1", "m_1", "M9"):
        await broker.models.put(model_id.encode(), model_id)
        assert await broker.models.get(model_id) == model_id.encode()

    new = {k.decode() for k in await all_keys(broker._redis) - before}
    assert new, "the test wrote nothing?"
    outside = [k for k in new if not k.startswith(f"{prefix}:")]
    assert outside == []
    assert [k for k in new if not KEY_CHARS.match(k)] == []
    for key in new:
        if "{" in key:
            assert key.count("{") == 1 and key.count("}") == 1
            # a partition's tag, or a model's (whose ids here hold no braces)
            tag = _tag(key)
            assert tag in tags(broker._keys.partitions) or key.startswith(
                f"{prefix}:model:{{{tag}}}"
            ), key


async def test_nasty_id_in_metadata_only_is_used_as_is(stubs, broker):
    # printable ids can travel as metadata; the body may be empty (docs/protocol.md §5)
    for client_id in ("x:queue", "x}", "{x}", "x*"):
        md = (("client", client_id), ("client-id", client_id), ("name", client_id))
        await stubs.combiner.SendHeartbeat(pb.Heartbeat(), metadata=md)
    assert sorted(await broker.presence.online()) == sorted(["x:queue", "x}", "{x}", "x*"])


def test_nasty_pairs_do_not_share_task_keys():
    keys = Keys("p")
    combos = list(itertools.product(NASTY[:12], NASTY[:12]))
    made = {keys.task(c, t) for c, t in combos}
    assert len(made) == len(combos)


async def test_unsafe_model_ids_are_refused_before_any_key(stubs, broker):
    for model_id in ("a:b", "a}b", "a b", "../x", "ok\n"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stubs.models.Download(pb.ModelRequest(model_id=model_id)).read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [k async for k in broker._redis.scan_iter(match=f"{broker._keys.prefix}:model:*")] == []
