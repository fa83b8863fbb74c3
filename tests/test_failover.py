"""Faults with real processes: replicas behind HAProxy, workers, Redis with AOF
(tests/cluster.py). In each, nothing a client was told OK about is lost:

- a rolling restart (SIGTERM, drain) of every replica during a session;
- kill -9 of a replica holding TaskStreams while polling clients are between polls;
- kill -9 of a replica in the middle of an Upload;
- Redis SIGKILLed and restarted (AOF, appendfsync always) during a session;
- 1,000 streaming clients, one replica killed halfway through a wave of tasks.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections import Counter

import grpc
import numpy as np
import pytest
from google.protobuf import wrappers_pb2

from broker import BrokerError, connect
from broker.context import Settings
from combiner.pb import scaleout_pb2 as pb
from combiner.pb import scaleout_pb2_grpc as pb_grpc
from combiner.refclient import ReferenceClient
from combiner.views import session_view
from tests.cluster import Cluster
from tests.conftest import meta, next_task
from tests.services import eventually, inbound_entries, wait_for
from tests.test_session import SEED, expected_after, trainer
from workers.fedavg import load_npz, save_npz

pytestmark = pytest.mark.skipif(
    __import__("shutil").which("haproxy") is None, reason="haproxy not installed"
)

CLIENTS = {"p1": (1.0, 10), "p2": (2.0, 20), "s1": (3.0, 30), "s2": (-1.0, 40)}


@pytest.fixture
def cluster(tmp_path, prefix, request):
    c = Cluster(tmp_path, prefix, replicas=3, workers=1)
    try:
        c.start()
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        if request.node.rep_call_failed if hasattr(request.node, "rep_call_failed") else False:
            print(c.logs())
        c.stop()


async def run_clients(cluster, stop, specs=CLIENTS):
    """Reference clients through HAProxy: ids starting with 's' stream, the others poll."""
    clients = [
        ReferenceClient(
            cluster.target,
            cid,
            mode="stream" if cid.startswith("s") else "poll",
            poll_interval=0.3,
            train=trainer(*specs[cid]),
        )
        for cid in specs
    ]
    return clients, [asyncio.create_task(c.run(stop)) for c in clients]


async def wait_view(broker, session_id, predicate, within):
    async def matching():
        view = await session_view(broker, session_id)
        return view if predicate(view) else None

    return await eventually(matching, within, f"session {session_id} to reach a state", every=0.2)


async def test_rolling_restart_of_all_replicas_during_a_session(cluster, prefix):
    broker = await connect(cluster.redis.url, settings=Settings(prefix=prefix))
    stop = asyncio.Event()
    clients, tasks = await run_clients(cluster, stop)
    try:
        await eventually(lambda: _online(broker, len(CLIENTS)), 30, "clients online")
        seed_id = await broker.models.put(save_npz(SEED))
        config = {"rounds": 4, "min_clients": 4, "max_clients": 4, "round_timeout": 60}
        session_id = await broker.sessions.create(config, seed_id)
        await wait_view(broker, session_id, lambda v: len(v["rounds"]) >= 1, 30)
        for i in range(3):  # one replica at a time, while training goes on
            await asyncio.to_thread(cluster.restart_replica, i)
        view = await wait_view(
            broker, session_id, lambda v: v["status"] in ("completed", "failed"), 120
        )
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=10)
    assert view["status"] == "completed", (view, cluster.logs())
    assert all(r["updates"] == 4 for r in view["rounds"]), view["rounds"]
    final = load_npz(await broker.models.get(view["model_id"]))
    for got, want in zip(final, expected_after(4, CLIENTS), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    for client, task in zip(clients, tasks, strict=True):
        assert task.done() and task.exception() is None, client.client_id
        assert client.counters.failed == 0, client.client_id
    assert sum(c.counters.streams_opened for c in clients if c.mode == "stream") > 2
    await broker.close()


async def _online(broker, n):
    return len(await broker.presence.online()) >= n


# --- shared helpers ---------------------------------------------------------------------------

MiB = 1024 * 1024


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def stream_holders(broker, client_ids) -> dict[str, str]:
    """client id -> replica id that accepted its latest TaskStream (every TaskStream open
    records a 'connect' presence event with the serving replica)."""
    holders = {}
    for _, fields in await inbound_entries(broker, "presence"):
        f = {text(k): text(v) for k, v in fields.items()}
        if f.get("event") == "connect" and f.get("client_id") in client_ids:
            holders[f["client_id"]] = f["replica"]
    return holders


async def round_task_ids(broker, session_id: str, rounds: int) -> dict[str, str]:
    """Every task the coordinator pushed in the session: correlation id -> client id."""
    out = {}
    for r in range(1, rounds + 1):
        for kind in ("tasks", "validations"):
            out.update(await broker.sessions.round_tasks(session_id, str(r), kind))
    return out


async def assert_final_model(broker, view, rounds: int, clients: dict) -> None:
    final = load_npz(await broker.models.get(view["model_id"]))
    for got, want in zip(final, expected_after(rounds, clients), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def assert_each_task_received_once(clients, tasks: dict[str, str]) -> None:
    """Each of the session's tasks reached its own client, once; nothing else arrived.
    (A polling client records every task a poll hands it, so a repeated hand-out would
    show here; a streaming client skips a correlation id it has seen, like the server's
    de-duplication, so for streams the tests also check attempts in the task records.)"""
    for c in clients:
        assert len(c.counters.received) == len(set(c.counters.received)), c.client_id
        assert c.counters.failed == 0, c.client_id
    for corr, client_id in tasks.items():
        holders = [c.client_id for c in clients if corr in c.counters.received]
        assert holders == [client_id], (corr, client_id, holders)
    got = {corr for c in clients for corr in c.counters.received}
    assert got == set(tasks), got ^ set(tasks)


# --- 1. kill -9 of a replica holding streams, mid-session --------------------------------------

KILL_CLIENTS = {
    "p1": (1.0, 10),
    "p2": (2.0, 20),
    "s1": (3.0, 30),
    "s2": (-1.0, 40),
    "s3": (0.5, 25),
    "s4": (1.5, 15),
}


async def test_kill_9_of_a_replica_mid_session_loses_and_repeats_nothing(cluster, prefix):
    broker = await connect(cluster.redis.url, settings=Settings(prefix=prefix))
    stop = asyncio.Event()
    clients, tasks = await run_clients(cluster, stop, KILL_CLIENTS)
    streamers = {c.client_id for c in clients if c.mode == "stream"}
    rounds = 3
    try:
        await eventually(lambda: _online(broker, len(clients)), 30, "clients online")
        # HAProxy spreads the 4 streams round robin: some replica holds two of them. Kill
        # replica 1 if it holds one (it usually does), else the replica holding the most.
        holders = await eventually(
            lambda: _all_holders(broker, streamers), 30, "every stream to be open"
        )
        counts = {rid: list(holders.values()).count(rid) for rid in set(holders.values())}
        victim_id = "replica1" if "replica1" in counts else max(counts, key=counts.get)
        victim = int(victim_id.removeprefix("replica")) - 1
        on_victim = sorted(c for c, r in holders.items() if r == victim_id)

        seed_id = await broker.models.put(save_npz(SEED))
        config = {"rounds": rounds, "min_clients": 6, "max_clients": 6, "round_timeout": 60}
        session_id = await broker.sessions.create(config, seed_id)
        # mid-session: round 2's training tasks are out (clients are busy with them or
        # between polls) when the replica dies without a chance to drain
        await wait_view(broker, session_id, lambda v: len(v["rounds"]) >= 2, 60)
        await asyncio.to_thread(cluster.kill_replica, victim)
        assert not cluster.replicas[victim].alive
        # the streams the victim held are re-opened through HAProxy on the other replicas
        moved = await eventually(
            lambda: _moved(broker, on_victim, victim_id), 30, "the victim's streams to move"
        )
        # and the replica comes back later, while the session goes on
        await wait_view(broker, session_id, lambda v: len(v["rounds"]) >= 3, 60)
        await asyncio.to_thread(cluster.start_replica, victim)
        await asyncio.to_thread(
            wait_for, lambda: cluster.replica_serving(victim), 15, 0.05, "the restarted replica"
        )
        view = await wait_view(
            broker, session_id, lambda v: v["status"] in ("completed", "failed"), 120
        )
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=10)
    assert view["status"] == "completed", (view, cluster.logs())
    assert all(r["updates"] == 6 and r["validations"] == 6 for r in view["rounds"]), view
    await assert_final_model(broker, view, rounds, KILL_CLIENTS)
    for client, task in zip(clients, tasks, strict=True):
        assert task.done() and task.exception() is None, client.client_id
    assert all(moved[c] != victim_id for c in on_victim), moved

    session_tasks = await round_task_ids(broker, session_id, rounds)
    assert len(session_tasks) == rounds * 2 * len(clients)
    assert_each_task_received_once(clients, session_tasks)
    records = await broker.tasks.records(session_tasks)
    # Each take from a queue is atomic, so a task is handed out twice only if the victim
    # took it and died before its client saw it:
    # - a poll whose reply died with the victim (the task is marked delivered, the client
    #   never saw it) is answered again on the client's next idle poll;
    # - a stream task the victim took but never got to its client is queued again when the
    #   client opens its next stream (on another replica).
    # Either way it is attempt 2 and still received once (checked above); and since the
    # coordinator gives a client one task at a time, that is at most one task per client
    # that could have had one in flight on the victim.
    exposed = {c.client_id for c in clients if c.mode == "poll"} | set(on_victim)
    again = Counter()
    for corr, rec in records.items():
        assert rec.get("result_at"), (corr, rec)  # its result arrived (and was kept)
        assert rec["attempts"] in ("1", "2"), (corr, rec)
        if rec["attempts"] == "2":
            again[session_tasks[corr]] += 1
    assert set(again) <= exposed and all(n == 1 for n in again.values()), again
    redelivered = sum(again.values())
    print(f"killed {victim_id} holding streams of {on_victim}; {redelivered} re-deliveries")
    await broker.close()


async def _all_holders(broker, streamers):
    holders = await stream_holders(broker, streamers)
    return holders if set(holders) == streamers else None


async def _moved(broker, client_ids, victim_id):
    holders = await stream_holders(broker, set(client_ids))
    return holders if all(holders.get(c) != victim_id for c in client_ids) else None


# --- 2. kill -9 in the middle of an Upload ----------------------------------------------------

UPLOAD_CHUNKS = 30  # 1 MiB each


async def test_kill_9_mid_upload_exposes_nothing_and_the_retry_elsewhere_succeeds(cluster, prefix):
    broker = await connect(cluster.redis.url, settings=Settings(prefix=prefix))
    data = os.urandom(UPLOAD_CHUNKS * MiB)
    checksum = hashlib.sha256(data).hexdigest()
    model_id = f"big-{uuid.uuid4().hex}"
    metadata = (*meta("up1"), ("model-id", model_id), ("checksum", checksum))
    sent_before_block = 8
    gate = asyncio.Event()  # never set: the client stalls mid-upload until the replica dies

    async def chunks():
        for i in range(UPLOAD_CHUNKS):
            if i == sent_before_block:
                await gate.wait()
            yield pb.FileChunk(data=data[i * MiB : (i + 1) * MiB])

    async def staged() -> int:
        """Chunks the replica has staged in Redis for this upload (not visible yet)."""
        n = 0
        async for key in broker._redis.scan_iter(match=f"{broker._keys.model(model_id)}:upload:*"):
            n = max(n, await broker._redis.llen(key))
        return n

    async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.replicas[0].port}") as direct:
        call = pb_grpc.ModelServiceStub(direct).Upload(chunks(), metadata=metadata)
        upload = asyncio.ensure_future(call)
        await eventually(
            lambda: _at_least(staged, sent_before_block), 30, "the first chunks to be staged"
        )
        assert (await broker.models.meta(model_id))["state"] == "uploading"
        await asyncio.to_thread(cluster.kill_replica, 0)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(upload, 30)
        assert err.value.code() != grpc.StatusCode.OK
    gate.set()

    # nothing partial is visible: the meta still says 'uploading' (it expires with the
    # staged chunks), and a Download through HAProxy answers "not ready", no bytes
    meta_after = await broker.models.meta(model_id)
    assert meta_after.get("state", "uploading") == "uploading", meta_after
    assert "sha256" not in meta_after and "size" not in meta_after
    async for key in broker._redis.scan_iter(match=f"{broker._keys.model(model_id)}:upload:*"):
        assert await broker._redis.ttl(key) > 0  # the orphan goes away by itself
    assert not await broker._redis.exists(broker._keys.model_chunks(model_id))
    async with grpc.aio.insecure_channel(cluster.target) as channel:
        models = pb_grpc.ModelServiceStub(channel)
        got, code = await _download(models, model_id)
        assert got == b"" and code in (
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.NOT_FOUND,
        ), code

        # the client's retry goes through HAProxy; replica 1 is dead, so it lands elsewhere
        client = ReferenceClient(cluster.target, "up1", channel=channel)
        client.models = models
        reply = await asyncio.wait_for(client.upload(model_id, data), 120)
        assert reply.status == pb.ModelStatus.OK, reply

        got, code = await _download(models, model_id)
        assert code == grpc.StatusCode.OK
        assert len(got) == len(data) and got == data
    stored = await broker.models.meta(model_id)
    assert (stored["state"], stored["sha256"], int(stored["size"])) == ("ok", checksum, len(data))
    await broker.close()


async def _at_least(fn, n):
    return await fn() >= n


async def _download(models, model_id: str) -> tuple[bytes, grpc.StatusCode]:
    """Download through the stub: (bytes received, final status); checks the checksum."""
    call = models.Download(pb.ModelRequest(model_id=model_id), metadata=meta("up1"))
    got = bytearray()
    try:
        async for chunk in call:
            got += chunk.data
    except grpc.aio.AioRpcError as exc:
        return bytes(got), exc.code()
    trailer = dict(tuple(await call.trailing_metadata() or ()))
    assert trailer["checksum"] == hashlib.sha256(got).hexdigest()
    return bytes(got), await call.code()


# --- 3. Redis restarted (AOF, appendfsync always) during a session -----------------------------


@pytest.mark.parametrize("outage", ["instant", "until-refused"])
async def test_redis_restart_mid_session_loses_nothing_acknowledged(cluster, prefix, outage):
    """'instant': Cluster.restart_redis (SIGKILL, start again at once; the replicas' own
    bounded retries usually hide it). 'until-refused': Redis stays down until a client has
    been refused (FAILED_PRECONDITION after the replica's retry budget), then comes back."""
    broker = await connect(cluster.redis.url, settings=Settings(prefix=prefix))
    stop = asyncio.Event()
    clients, tasks = await run_clients(cluster, stop)
    acked: dict[str, list[int]] = {cid: [] for cid in CLIENTS}
    refused: dict[str, int] = dict.fromkeys(CLIENTS, 0)
    sent: dict[str, int] = dict.fromkeys(CLIENTS, 0)  # highest sequence number sent
    metrics_stop = asyncio.Event()

    async def send_metrics(channel, client_id: str) -> None:
        """One message at a time, each with its own sequence number, never retried here:
        record which ones the replica acknowledged with OK."""
        stub = pb_grpc.CombinerClientStub(channel)
        seq = 0
        while not metrics_stop.is_set():
            seq += 1
            sent[client_id] = seq
            msg = pb.ModelMetric(
                client_id=client_id,
                metrics=[pb.MetricElem(key="seq", value=float(seq))],
                step=wrappers_pb2.UInt32Value(value=seq),
            )
            try:
                await stub.SendModelMetric(msg, metadata=meta(client_id), timeout=30)
                acked[client_id].append(seq)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() != grpc.StatusCode.UNAVAILABLE, exc  # kills 1.0.0 (§3.2)
                refused[client_id] += 1
            await asyncio.sleep(0.02)

    channel = grpc.aio.insecure_channel(cluster.target)
    senders = [asyncio.create_task(send_metrics(channel, cid)) for cid in CLIENTS]
    rounds = 4
    try:
        await eventually(lambda: _online(broker, len(CLIENTS)), 30, "clients online")
        seed_id = await broker.models.put(save_npz(SEED))
        config = {"rounds": rounds, "min_clients": 4, "max_clients": 4, "round_timeout": 60}
        session_id = await broker.sessions.create(config, seed_id)
        await wait_view(broker, session_id, lambda v: len(v["rounds"]) >= 2, 60)
        before = {cid: len(a) for cid, a in acked.items()}
        if outage == "instant":
            await asyncio.to_thread(cluster.restart_redis)  # SIGKILL, then the same AOF
        else:
            await asyncio.to_thread(cluster.redis.kill)
            await eventually(lambda: _any_refused(refused), 30, "a client to be refused")
            await asyncio.to_thread(cluster.redis.start)  # same port, same AOF
        # every replica subscribes again by itself (the new Redis process has none)
        await eventually(lambda: _pubsub_clients(broker, 3), 15, "3 wake-up subscriptions")
        view = await _wait_view_across_restart(broker, session_id, 120)
        # the side loop keeps going until every sender got OKs after the restart
        after_restart = {cid: len(a) for cid, a in acked.items()}
        await eventually(
            lambda: _grew(acked, after_restart), 30, "metrics acknowledged after the restart"
        )
    finally:
        metrics_stop.set()
        await asyncio.gather(*senders, return_exceptions=True)
        await channel.close()
        stop.set()
        await asyncio.wait(tasks, timeout=10)
    for s in senders:
        assert s.exception() is None, s.exception()
    assert all(before[c] > 0 for c in CLIENTS), before
    if outage == "until-refused":
        assert sum(refused.values()) > 0
    assert view["status"] == "completed", (view, cluster.logs())
    assert all(r["updates"] == 4 for r in view["rounds"]), view["rounds"]
    await assert_final_model(broker, view, rounds, CLIENTS)
    for client, task in zip(clients, tasks, strict=True):
        assert task.done() and task.exception() is None, client.client_id
    session_tasks = await round_task_ids(broker, session_id, rounds)
    assert_each_task_received_once(clients, session_tasks)

    # Every metric acknowledged with OK is in P:in:metrics after the restart.
    stored: dict[str, Counter] = {cid: Counter() for cid in CLIENTS}
    for _, fields in await inbound_entries(broker, "metrics"):
        stored[text(fields[b"client_id"])][int(fields[b"step"])] += 1
    for cid in CLIENTS:
        missing = [s for s in acked[cid] if stored[cid][s] == 0]
        assert not missing, (cid, missing[:20], len(acked[cid]))
        # Nothing else is there either: only messages this client sent (acknowledged, or
        # refused while Redis was away, which may or may not have been written).
        assert set(stored[cid]) <= set(range(1, sent[cid] + 1)), cid
        # At-least-once, not exactly-once: a replica retries a MULTI/EXEC whose reply was
        # lost when Redis died, and with appendfsync always that EXEC may already be on
        # disk; the retry then writes the message a second time. Each sender has one RPC
        # in flight and Redis died once, so at most one of its messages can be repeated,
        # at most once. (HAProxy re-sends a request only on a connection failure or an
        # empty response from a replica; all replicas stay up here.)
        assert all(n <= 2 for n in stored[cid].values()), cid
        repeated = sum(n - 1 for n in stored[cid].values())
        assert repeated <= 1, (cid, repeated)
        print(f"{cid}: {len(acked[cid])} acknowledged, {refused[cid]} refused, {repeated} twice")
    await broker.close()


async def _wait_view_across_restart(broker, session_id, within):
    """wait_view, but the test's own reads may hit the restarting Redis: retry those."""

    async def finished():
        try:
            view = await session_view(broker, session_id)
        except BrokerError:
            return None
        return view if view["status"] in ("completed", "failed") else None

    return await eventually(finished, within, "the session to finish", every=0.2)


async def _any_refused(refused):
    return any(refused.values())


async def _pubsub_clients(broker, n):
    try:
        return len(await broker._redis.client_list(_type="pubsub")) == n
    except Exception:  # the test's own connection may hit the restart too
        return False


async def _grew(acked, since):
    return all(len(acked[c]) > since[c] for c in acked)


# --- 4. 1,000 streaming clients over 3 replicas, a replica killed mid-wave ---------------------

N_STREAMING = 1000  # streaming clients (one load generator process, shared channels)
PER_CHANNEL = 50  # streams per HTTP/2 connection: HAProxy allows 100 concurrent streams
# per client connection, and each client's downloads and results need room beside them


async def test_1000_streams_get_every_task_once_across_a_replica_kill(cluster, prefix):
    broker = await connect(cluster.redis.url, settings=Settings(prefix=prefix))
    model_id = await broker.models.put(save_npz(SEED))
    # One TCP connection per channel: the local subchannel pool stops gRPC from sharing
    # one connection between channels with equal arguments.
    options = [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", 8 * MiB),
    ]
    channels = [
        grpc.aio.insecure_channel(cluster.target, options=options)
        for _ in range(-(-N_STREAMING // PER_CHANNEL))
    ]
    clients = [
        ReferenceClient(
            cluster.target,
            f"L{i:04d}",
            mode="stream",
            heartbeat_interval=60,  # the open stream keeps it online; spare the CPU
            channel=channels[i // PER_CHANNEL],
        )
        for i in range(N_STREAMING)
    ]
    by_id = {c.client_id: c for c in clients}
    stop = asyncio.Event()
    runs = [asyncio.create_task(c.run(stop)) for c in clients]

    async def push_wave(ids, on_half=None):
        pushed = {}
        half = len(ids) // 2
        for start in range(0, len(ids), 100):
            if on_half is not None and start == half:
                await on_half()
            batch = ids[start : start + 100]
            corrs = await asyncio.gather(
                *(broker.tasks.push(c, "Fedn_Validation", model_id=model_id) for c in batch)
            )
            pushed.update(zip(corrs, batch, strict=True))
        return pushed

    async def delivered(pushed):
        return all(corr in by_id[c].counters.received for corr, c in pushed.items())

    async def on_timeout():
        """What the undelivered tasks look like in Redis (for the failure message)."""
        missing = {
            corr: c
            for wave in (wave1, wave2)
            for corr, c in wave.items()
            if corr not in by_id[c].counters.received
        }
        records = await broker.tasks.records(missing)
        return Counter((r.get("state"), r.get("via"), r.get("replica")) for r in records.values())

    ids = [c.client_id for c in clients]
    wave1: dict[str, str] = {}
    wave2: dict[str, str] = {}
    try:
        await eventually(lambda: _streams_open(broker, N_STREAMING), 60, "all streams open")
        wave1 = await push_wave(ids)
        await eventually(lambda: delivered(wave1), 60, "wave 1 to be delivered", on_timeout)
        on_victim: set[str] = set()

        async def kill():
            holders = await stream_holders(broker, set(ids))
            on_victim.update(c for c, r in holders.items() if r == "replica1")
            await asyncio.to_thread(cluster.kill_replica, 0)

        wave2 = await push_wave(ids, on_half=kill)
        await eventually(lambda: delivered(wave2), 90, "wave 2 to be delivered", on_timeout)
        # results too: each validation reached Redis through a live replica
        await eventually(lambda: _completed(broker, {**wave1, **wave2}), 60, "every result")
    finally:
        stop.set()
        await asyncio.wait(runs, timeout=20)
        for ch in channels:
            await ch.close()
    assert not cluster.replicas[0].alive
    for c in clients:
        w1 = [k for k, v in wave1.items() if v == c.client_id]
        w2 = [k for k, v in wave2.items() if v == c.client_id]
        assert c.counters.received == w1 + w2, (c.client_id, c.counters.received)
        assert c.counters.failed == 0 and c.counters.validations == 2, c.client_id
    records = await broker.tasks.records({**wave1, **wave2})
    # Each take from a queue is atomic, so a task is handed out twice only when the killed
    # replica had taken it for a stream and died before the client read it: the client's
    # next stream (on another replica) gets it again (attempt 2). The client still received
    # and ran it once (above).
    again = {corr for corr, r in records.items() if r["attempts"] != "1"}
    assert all(records[corr]["attempts"] == "2" for corr in again)
    assert again <= {corr for corr, c in wave2.items() if c in on_victim}, again
    assert 0 < len(on_victim) < N_STREAMING
    print(f"{len(on_victim)} streams on the killed replica, {len(again)} tasks handed out again")
    assert sum(c.counters.streams_opened for c in clients) > N_STREAMING  # some moved
    await broker.close()


async def _streams_open(broker, n):
    live = await broker._redis.zcount(broker._keys.streams(), time.time(), "+inf")
    return live >= n


async def _completed(broker, tasks):
    records = await broker.tasks.records(tasks)
    return all(r.get("state") == "completed" for r in records.values())


# --- the recovery behind tests 1 and 4, deterministically (in-process replica) -----------------


async def test_stream_tasks_a_dead_replica_took_are_handed_to_the_next_stream(broker, make_replica):
    lost, answered, timed_out = [
        await broker.tasks.push("c1", "Fedn_Validation", model_id="m") for _ in range(3)
    ]
    # A replica takes all three for c1's stream, then dies before c1 reads them (what
    # kill -9 does to the tasks in flight). One is answered anyway (c1 did read it and sent
    # its result through another replica); the coordinator times out another.
    taken, more = await broker.tasks.take_for_stream("c1")
    assert [t.correlation_id for t in taken] == [lost, answered, timed_out]
    assert not more
    kept = await broker.inbound.add_result(
        "validations", "c1", answered, {"result": "{}"}, {"correlation_id": answered}
    )
    assert kept
    assert await broker.tasks.flag(timed_out, "timeout") == "delivered"

    replica = await make_replica()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
        stub = pb_grpc.CombinerClientStub(channel)
        call = stub.TaskStream(pb.ClientAvailableMessage(client_id="c1"), metadata=meta("c1"))
        first = await next_task(call)
        assert first.correlation_id == lost
        later = await broker.tasks.push("c1", "Fedn_Validation", model_id="m")
        assert (await next_task(call)).correlation_id == later  # nothing else came back
        call.cancel()
    records = await broker.tasks.records({c: "c1" for c in (lost, answered, timed_out, later)})
    assert (records[lost]["state"], records[lost]["attempts"]) == ("delivered", "2")
    assert records[answered]["attempts"] == "1" and records[answered]["result_at"]
    assert (records[timed_out]["attempts"], records[timed_out]["flag"]) == ("1", "timeout")
    assert records[later]["attempts"] == "1"
