"""--durability (broker/durability.py, docs/redis.md "Durability") against real redis-server
processes: a master with one replica (broker/redis_process.py, ``replicaof``), and for the
failover a Sentinel topology (tests/sentinel.py). Every process is stopped by its PID; waits
have deadlines, no fixed sleeps.

* replicated: what a call wrote is on the replica when the call returns (read there);
* replicated with the only replica paused (SIGSTOP): the call fails with BrokerUnavailable
  within the timeout, and the gRPC status is FAILED_PRECONDITION, never UNAVAILABLE;
* kill -9 of the Sentinel master under concurrent writers: every entry acknowledged in
  replicated mode is in the new master's stream (local mode's losses are only reported);
* local: no WAIT is ever sent, and the client is redis-py's plain one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid

import grpc
import pytest
import redis
import redis.asyncio as aioredis

from broker import BrokerUnavailable, connect
from broker.context import Settings
from broker.durability import Confirmation, ConfirmingRedis, confirmation
from broker.redis_process import RedisProcess, free_port
from combiner.pb import scaleout_pb2 as pb
from combiner.server import Replica, ServeOptions
from tests.conftest import Stubs, meta
from tests.sentinel import SentinelTopology
from tests.services import eventually, wait_for

# Redis waits 5 s by default before a full sync, in case more replicas come: none will here.
FAST_SYNC = {"repl-diskless-sync-delay": "0"}


def replica_of(master: RedisProcess) -> RedisProcess:
    return RedisProcess(options={"replicaof": f"127.0.0.1 {master.port}", **FAST_SYNC})


def synced(replica: RedisProcess, master: RedisProcess, timeout: float = 20.0) -> None:
    """The replica is in sync and acknowledges writes. Right after a full sync the master
    may list it online and still get its first ACK only with the replica's next 1 s tick, so
    a first WAIT could wait ~1 s: one write and a WAIT for it here, with a deadline."""
    mine, its = (redis.Redis(port=p.port, socket_timeout=timeout) for p in (replica, master))
    try:
        wait_for(
            lambda: mine.info("replication").get("master_link_status") == "up",
            timeout,
            what=f"replica {replica.port} in sync",
        )
        its.set("synced", "1")
        assert its.wait(1, int(timeout * 1000)) == 1, f"replica {replica.port} never acked"
    finally:
        mine.close()
        its.close()


@contextlib.contextmanager
def master_and_replica():
    """A master and one replica of it, in sync; both stopped at the end."""
    master = RedisProcess(options=FAST_SYNC)
    replica = replica_of(master)
    try:
        master.start()
        replica.start()
        synced(replica, master)
        yield master, replica
    finally:
        replica.close()
        master.close()


@pytest.fixture(scope="module")
def pair():
    with master_and_replica() as both:
        yield both


def settings(mode: str = "replicated", **kw) -> Settings:
    return Settings(prefix=f"t{uuid.uuid4().hex[:10]}", durability=mode, **kw)


@contextlib.contextmanager
def paused(proc: RedisProcess):
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def wait_calls(port: int) -> int:
    client = redis.Redis(port=port, socket_timeout=2)
    try:
        stats = client.info("commandstats")
        return sum(stats.get(k, {}).get("calls", 0) for k in ("cmdstat_wait", "cmdstat_waitaof"))
    finally:
        client.close()


def test_settings_pick_the_confirmation():
    assert confirmation(Settings()) is None
    confirm = confirmation(Settings(durability="replicated", durability_timeout=0.25))
    assert confirm == Confirmation(replicas=1, timeout_ms=250)
    assert confirm.command() == ("WAIT", 1, 250)
    with pytest.raises(ValueError):
        confirmation(Settings(durability="sync"))
    aof = Confirmation(replicas=2, timeout_ms=10, waitaof=True)
    assert aof.command() == ("WAITAOF", 0, 2, 10)
    aof.check([0, 2])  # WAITAOF answers [local fsyncs, replica fsyncs]
    with pytest.raises(BrokerUnavailable, match="not confirmed by 2 Redis replicas within 10"):
        aof.check([1, 1])
    with pytest.raises(BrokerUnavailable, match="not confirmed by a Redis replica"):
        Confirmation().check(0)


async def test_replicated_writes_are_on_the_replica_when_answered(pair):
    master, replica = pair
    s = settings()
    on_replica = redis.Redis(port=replica.port, socket_timeout=2)
    try:
        async with connect(master.url, settings=s) as broker:
            assert isinstance(broker._redis, ConfirmingRedis)
            before = wait_calls(master.port)
            # batched writes (one shared pipeline) ...
            ids = await asyncio.gather(
                *(broker.inbound.add("metrics", f"c{i}", {"step": str(i)}) for i in range(50))
            )
            stream = broker._keys.inbound("metrics")
            assert on_replica.xlen(stream) == 50
            assert {e for e, _ in on_replica.xrange(stream)} == set(ids)
            # ... a task (Lua through the batcher), a model (chunks, then a direct EVALSHA
            # commit) and a direct HSET, each read on the replica as soon as it returns
            corr = await broker.tasks.push("alice", "Fedn_ModelUpdate", data='{"x": 1}')
            assert on_replica.exists(broker._keys.task("alice", corr))
            model_id = await broker.models.put(b"model bytes" * 1000)
            assert on_replica.hget(broker._keys.model(model_id), "state") == b"ok"
            await broker.credentials.publish_key("k1", "PEM")
            assert on_replica.hget(broker._keys.signing_keys, "k1") == b"PEM"
            assert wait_calls(master.port) > before
    finally:
        on_replica.close()


async def test_a_paused_replica_fails_the_call_within_the_timeout(pair):
    master, replica = pair
    s = settings(durability_timeout=0.3)
    async with connect(master.url, settings=s) as broker:
        await broker.inbound.add("metrics", "c1", {"step": "0"})  # fine while it answers
        with paused(replica):
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable) as failed:
                await broker.inbound.add("metrics", "c1", {"step": "1"})
            took = time.monotonic() - started
        assert 0.25 <= took < 2.0, took
        assert "not confirmed by a Redis replica within 300 ms" in str(failed.value)
        assert "UNAVAILABLE" not in str(failed.value)
        with paused(replica):  # the other write paths: a plain pipeline, a direct command
            with pytest.raises(BrokerUnavailable, match="not confirmed"):
                await broker.credentials.create("c1")
            with pytest.raises(BrokerUnavailable, match="not confirmed"):
                await broker.credentials.publish_key("k2", "PEM")
            assert await broker.ping()  # reads wait for nothing
        # after SIGCONT it confirms again
        await eventually(lambda: _adds(broker), 10, "writes confirmed again")


async def _adds(broker) -> bool:
    try:
        await broker.inbound.add("metrics", "c1", {"step": "2"})
        return True
    except BrokerUnavailable:
        return False


async def test_grpc_answers_failed_precondition_not_unavailable(pair):
    master, replica = pair
    async with connect(master.url, settings=settings(durability_timeout=0.3)) as broker:
        server = Replica(broker, ServeOptions(port=0, insecure=True))
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stubs = Stubs(channel)
                metric = pb.ModelMetric(metrics=[pb.MetricElem(key="loss", value=0.5)])
                await stubs.combiner.SendModelMetric(metric, metadata=meta("c1"))  # OK
                with paused(replica):
                    with pytest.raises(grpc.aio.AioRpcError) as failed:
                        await stubs.combiner.SendModelMetric(metric, metadata=meta("c1"))
        finally:
            await server.stop(grace=0)
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "UNAVAILABLE" not in failed.value.details()
    assert "not confirmed" in failed.value.details()


async def test_replicated_starts_without_a_replica_and_warns(caplog):
    with RedisProcess() as alone:
        with caplog.at_level(logging.WARNING, logger="broker"):
            async with connect(alone.url, settings=settings(durability_timeout=0.05)) as b:
                assert any("0 connected replica" in r.getMessage() for r in caplog.records)
                assert await b.ping()  # reads need no replica
                with pytest.raises(BrokerUnavailable, match="not confirmed"):
                    await b.inbound.add("metrics", "c1", {"step": "0"})


async def test_local_sends_no_wait(pair):
    master, _ = pair
    admin = redis.Redis(port=master.port, socket_timeout=2)
    try:
        admin.config_resetstat()
        async with connect(master.url, settings=settings("local")) as broker:
            assert type(broker._redis) is aioredis.Redis  # redis-py's own: nothing added
            await asyncio.gather(
                *(broker.inbound.add("metrics", f"c{i}", {"step": str(i)}) for i in range(20))
            )
            await broker.tasks.push("alice", "Fedn_ModelUpdate")
            await broker.models.put(b"local model")
        stats = admin.info("commandstats")
        assert "cmdstat_xadd" in stats or "cmdstat_evalsha" in stats  # it did write
        assert "cmdstat_wait" not in stats and "cmdstat_waitaof" not in stats
    finally:
        admin.close()


# --- kill -9 of the master under writers ----------------------------------------------------

LOSSES: dict[str, dict] = {}


@pytest.mark.parametrize("mode", ["local", "replicated"])
async def test_acknowledged_writes_survive_a_master_killed_with_sigkill(mode):
    """8 writers add metrics entries through the Sentinels; the master is killed -9 while
    they run; after the failover the new master's stream is read back. Every entry that was
    answered OK must be there in replicated mode; local mode's losses are printed."""
    topo = SentinelTopology()
    try:
        await asyncio.to_thread(topo.start)
        s = settings(mode)
        async with connect(topo.url, settings=s) as broker:
            stream = broker._keys.inbound("metrics")
            acked: set[str] = set()
            failed: list[str] = []
            stop = asyncio.Event()

            async def writer(n: int) -> None:
                i = 0
                while not stop.is_set():
                    seq = f"{n}-{i}"
                    try:
                        await broker.inbound.add("metrics", f"w{n}", {"step": seq})
                        acked.add(seq)
                    except BrokerUnavailable as exc:  # the client would retry: a new entry
                        failed.append(str(exc))
                    i += 1

            writers = [asyncio.create_task(writer(n)) for n in range(8)]
            try:
                await eventually(lambda: _more(acked, 500), 20, "writes before the kill")
                old = topo.master_port()
                topo.node_at(old).kill()
                at_kill = len(acked)

                async def promoted():
                    return topo.master_port() != old

                await eventually(promoted, 30, "a replica promoted")
                after = len(acked)
                await eventually(lambda: _more(acked, after + 200), 30, "writes on the new master")
            finally:
                stop.set()
                await asyncio.gather(*writers)
            new = topo.master_port()
        client = redis.Redis(port=new, socket_timeout=5)
        try:
            stored = [f[b"step"].decode() for _, f in client.xrange(stream)]
        finally:
            client.close()
        lost = acked - set(stored)
        LOSSES[mode] = {
            "acked": len(acked),
            "acked_before_kill": at_kill,
            "lost": len(lost),
            "duplicates": len(stored) - len(set(stored)),
            "failed_calls": len(failed),
        }
        print(f"durability {mode}: {LOSSES[mode]}")
        assert not [f for f in failed if "UNAVAILABLE" in f]
        if mode == "replicated":
            assert lost == set(), f"{len(lost)} acknowledged entries lost: {sorted(lost)[:10]}"
    finally:
        await asyncio.to_thread(topo.close)


async def _more(items, n: int) -> bool:
    return len(items) > n


@pytest.mark.parametrize("mode", ["local", "replicated"])
async def test_a_cut_off_replica_promoted_after_a_kill(mode):
    """What local mode loses, made certain: the replica is cut off from the master (pointed
    at a dead port, as a network partition would) while calls are answered, the master is
    killed -9, the replica is promoted (REPLICAOF NO ONE, as Sentinel would). Local: every
    entry answered OK meanwhile is gone. Replicated: none of them was answered OK. (A paused
    replica would not do: what the master sent waits in its socket's kernel buffer.)"""
    with master_and_replica() as (master, replica):
        acked, failed = [], 0
        async with connect(master.url, settings=settings(mode, durability_timeout=0.1)) as b:
            stream = b._keys.inbound("metrics")
            await b.inbound.add("metrics", "c1", {"step": "before"})
            cut = redis.Redis(port=replica.port, socket_timeout=5)
            try:
                wait_for(lambda: cut.xlen(stream) == 1, 10, what="'before' on the replica")
                cut.replicaof("127.0.0.1", free_port())  # nobody there: the link is down
                wait_for(lambda: cut.info("replication").get("master_link_status") == "down", 10)
            finally:
                cut.close()
            for i in range(20):
                try:
                    await b.inbound.add("metrics", "c1", {"step": str(i)})
                    acked.append(str(i))
                except BrokerUnavailable:
                    failed += 1
            master.kill()
        promoted = redis.Redis(port=replica.port, socket_timeout=5)
        try:
            wait_for(lambda: _promote(promoted), 10, what="replica promoted")
            stored = {f[b"step"].decode() for _, f in promoted.xrange(stream)}
        finally:
            promoted.close()
        lost = [s for s in acked if s not in stored]
        print(f"durability {mode}, cut-off replica: acked {len(acked)}, lost {len(lost)}")
        assert "before" in stored
        if mode == "local":
            assert len(acked) == 20 and len(lost) == 20
        else:
            assert acked == [] and failed == 20


def _promote(client: redis.Redis) -> bool:
    try:
        client.replicaof("NO", "ONE")
        return client.info("replication").get("role") == "master"
    except redis.RedisError:
        return False
