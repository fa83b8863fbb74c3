"""--durability replicated on a real Redis Cluster (broker/durability.py, ConfirmingClusterNode;
docs/redis.md "Durability"): every node's share of a pipeline, and every direct write, is
followed by its own WAIT, so a call is answered only once the replica of each primary it wrote
to has the write.

* what a call wrote is on its primary's replica when the call returns (read there);
* a paused replica fails the writes to its primary's slots alone ("not confirmed"), the
  other primaries' callers in the same batches are answered;
* a Cluster without replicas: each primary is named in a warning, reads work, writes fail;
* kill -9 of a primary under writers (tests/test_cluster_failover.py, replicated): every
  write answered OK is in the cluster afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

import pytest
import redis

from broker import BrokerUnavailable, connect
from broker.context import Settings
from broker.durability import ConfirmingClusterNode
from combiner.views import status_view
from tests.redis_cluster import ClusterTopology
from tests.services import eventually

CLIENTS = [f"c{i}" for i in range(48)]  # every partition, so every primary, gets some


@pytest.fixture(scope="module")
def topology():
    with ClusterTopology(primaries=3, replicas=1) as cluster:
        yield cluster


def replicated(prefix: str, **kw) -> Settings:
    return Settings(prefix=prefix, durability="replicated", **kw)


def replica_of(topology: ClusterTopology, primary) -> redis.Redis:
    """A READONLY connection to the primary's replica (reads its own copy, no MOVED)."""
    client = topology.replicas_of(primary)[0].client(decode_responses=False)
    client.execute_command("READONLY")
    return client


def owner(topology: ClusterTopology, key: str):
    return topology.primary_for_slot(topology.slot_of(key))


def wait_calls(topology: ClusterTopology) -> dict[int, int]:
    """WAIT commands each primary has answered."""
    calls = {}
    for node in topology.primaries():
        with node.client() as client:
            stats = client.info("commandstats")
        calls[node.port] = stats.get("cmdstat_wait", {}).get("calls", 0)
    return calls


@contextlib.contextmanager
def paused(node):
    os.kill(node.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(node.pid, signal.SIGCONT)


async def test_replicated_writes_are_on_the_replicas_when_answered(topology, prefix):
    async with connect(topology.url, settings=replicated(prefix)) as broker:
        keys = broker._keys
        assert broker._ctx.cluster
        before = wait_calls(topology)
        # batched writes over every partition: one pipeline per node, each with its WAIT
        ids = await asyncio.gather(
            *(broker.inbound.add("metrics", c, {"step": "1"}) for c in CLIENTS)
        )
        nodes = [n for n in broker._redis.get_nodes() if n.server_type == "primary"]
        assert nodes and all(isinstance(n, ConfirmingClusterNode) for n in nodes)
        for p in keys.all_partitions:
            stream = keys.inbound("metrics", p)
            mine = {i for c, i in zip(CLIENTS, ids, strict=True) if keys.partition_of(c) == p}
            if not mine:
                continue
            copy = replica_of(topology, owner(topology, stream))
            try:
                assert {e for e, _ in copy.xrange(stream)} == mine, p
            finally:
                copy.close()
        # a task (Lua through the batcher), a model (a direct EVALSHA commit), a direct HSET
        corr = await broker.tasks.push("alice", "Fedn_ModelUpdate", data='{"x": 1}')
        model_id = await broker.models.put(b"model bytes" * 1000)
        await broker.credentials.publish_key("k1", "PEM")
        for key, read in (
            (keys.task("alice", corr), lambda c, k: c.exists(k)),
            (keys.model(model_id), lambda c, k: c.hget(k, "state") == b"ok"),
            (keys.signing_keys, lambda c, k: c.hget(k, "k1") == b"PEM"),
        ):
            copy = replica_of(topology, owner(topology, key))
            try:
                assert read(copy, key), key
            finally:
                copy.close()
        after = wait_calls(topology)
        assert all(after[port] > before.get(port, 0) for port in after), (before, after)


async def test_a_paused_replica_fails_only_its_primarys_writes(topology, prefix):
    async with connect(topology.url, settings=replicated(prefix, durability_timeout=0.3)) as b:
        keys = b._keys
        victim = owner(topology, keys.client(CLIENTS[0]))
        on_victim = {c for c in CLIENTS if owner(topology, keys.client(c)) is victim}
        assert on_victim and len(on_victim) < len(CLIENTS)
        (its_replica,) = topology.replicas_of(victim)
        await asyncio.gather(*(b.inbound.add("metrics", c, {"step": "0"}) for c in CLIENTS))
        with paused(its_replica):
            results = await asyncio.gather(
                *(b.inbound.add("metrics", c, {"step": "1"}) for c in CLIENTS),
                return_exceptions=True,
            )
            failed = {c for c, r in zip(CLIENTS, results, strict=True) if isinstance(r, Exception)}
            assert failed == on_victim
            for c in failed:
                r = results[CLIENTS.index(c)]
                assert isinstance(r, BrokerUnavailable), r
                assert "not confirmed by a Redis replica within 300 ms" in str(r)
            # a direct command to the victim fails the same way; reads wait for nothing
            with pytest.raises(BrokerUnavailable, match="not confirmed"):
                await b._redis.set(keys.client(CLIENTS[0]) + ":probe", "1")
            assert await b.ping()
        # after SIGCONT it confirms again
        await eventually(lambda: _adds(b, next(iter(on_victim))), 20, "writes confirmed again")
    await asyncio.to_thread(topology.wait_ok, 30)  # the next test starts from a sound cluster


async def _adds(broker, client_id: str) -> bool:
    try:
        await broker.inbound.add("metrics", client_id, {"step": "2"})
        return True
    except BrokerUnavailable:
        return False


async def test_a_cluster_without_replicas_warns_for_each_primary(cluster_url, prefix, caplog):
    with caplog.at_level(logging.WARNING, logger="broker"):
        async with connect(cluster_url, settings=replicated(prefix, durability_timeout=0.05)) as b:
            warned = [
                r.getMessage() for r in caplog.records if "0 connected replica" in r.getMessage()
            ]
            assert len(warned) == 3, warned  # one per primary, each named
            assert len({w.split("(")[0] for w in warned}) == 3
            assert await b.ping()  # reads need no replica
            with pytest.raises(BrokerUnavailable, match="not confirmed"):
                await b.inbound.add("metrics", "c1", {"step": "0"})


async def test_writes_across_a_reshard_are_confirmed_and_kept(topology, prefix):
    """MOVED and ASK during a reshard re-send a command on its own to its new node, which
    confirms it too (an ASKING must not be followed by a WAIT: it admits one command)."""
    async with connect(topology.url, settings=replicated(prefix)) as broker:
        keys = broker._keys
        acked: dict[str, set[int]] = {c: set() for c in CLIENTS}
        stop = asyncio.Event()

        async def send(client_id: str) -> None:
            step = 0
            while not stop.is_set():
                step += 1
                await broker.inbound.add("metrics", client_id, {"step": step})
                acked[client_id].add(step)

        source = owner(topology, keys.clients(0))
        target = next(p for p in topology.primaries() if p is not source)
        senders = [asyncio.create_task(send(c)) for c in CLIENTS]
        try:
            await eventually(lambda: _each_sent(acked, senders, 3), 30, "calls before")
            await asyncio.to_thread(topology.reshard, source, target, 1000)
            now = min(map(len, acked.values()))
            await eventually(lambda: _each_sent(acked, senders, now + 3), 30, "calls after")
        finally:
            stop.set()
            await asyncio.gather(*senders)  # a failed call fails the test here
        assert owner(topology, keys.clients(0)) is target  # partition 0 moved
        stored: dict[str, set[int]] = {c: set() for c in CLIENTS}
        for p in keys.all_partitions:
            for _, fields in await broker._redis.xrange(keys.inbound("metrics", p)):
                stored[fields[b"client_id"].decode()].add(int(fields[b"step"]))
        assert all(acked[c] <= stored[c] for c in CLIENTS)


async def _each_sent(acked: dict[str, set[int]], senders, n: int) -> bool:
    assert not any(t.done() for t in senders), [t.exception() for t in senders if t.done()]
    return min(map(len, acked.values())) >= n


async def test_a_write_asked_to_another_node_is_confirmed_there(topology, prefix):
    """A slot half-migrated (MIGRATING on its owner, IMPORTING on another): a write of a
    new key there is answered ASK, so redis-py sends ASKING, then the write, to the other
    node. ASKING admits the next command only: a WAIT after it would turn the write away."""
    async with connect(topology.url, settings=replicated(prefix)) as broker:
        key = f"{prefix}:asked"
        slot = topology.slot_of(key)
        source = owner(topology, key)
        target = next(p for p in topology.primaries() if p is not source)
        ids = {n.port: topology.node_id(n) for n in (source, target)}
        target.call("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source.port])
        source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target.port])
        try:
            assert await broker._redis.set(key, "v")
            with target.client() as on_target:
                on_target.execute_command("ASKING")
                assert on_target.get(key) == "v"
        finally:
            for node in topology.primaries():  # the slot is the target's now
                node.call("CLUSTER", "SETSLOT", slot, "NODE", ids[target.port])
        await asyncio.to_thread(topology.wait_ok, 30)
        assert await broker._redis.get(key) == b"v"
        copy = replica_of(topology, target)
        try:
            assert copy.get(key) == b"v"
        finally:
            copy.close()


async def test_status_names_each_primary_and_its_replicas(topology, prefix):
    """The status view's redis section (combiner/views.py) on a Cluster: every primary with
    its connected replica, the prefix's partitions and the durability written with."""
    async with connect(topology.url, settings=replicated(prefix)) as broker:
        view = await status_view(broker)
    redis_view = view["redis"]
    assert (redis_view["topology"], redis_view["partitions"]) == ("cluster", 16)
    assert redis_view["durability"] == "replicated"
    primaries = {f"127.0.0.1:{n.port}" for n in topology.primaries()}
    assert {m["address"] for m in redis_view["masters"]} == primaries
    assert all(m["role"] == "master" and m["replicas"] == 1 for m in redis_view["masters"])
