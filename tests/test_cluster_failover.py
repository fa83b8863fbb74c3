"""kill -9 of a Redis Cluster primary under batched writes (broker/batching.py, issue 14).

A batch on a Cluster is one plain pipeline per node: when a node dies, only its commands
fail, the others' were applied. The batcher must re-send those callers' commands alone
(after the replica takes over), so no call fails and no message on a surviving primary is
stored twice. What the killed primary had acknowledged but not yet replicated may be lost
under --durability local: that is counted, not asserted. Under --durability replicated (two
replicas per primary, so the promoted one still has a replica to confirm to) every write
answered OK must be there afterwards, on the killed primary's slots too; a write refused
meanwhile ("not confirmed") is one the client would send again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

import pytest

from broker import BrokerUnavailable, connect
from broker.context import Settings
from tests.redis_cluster import ClusterTopology
from tests.services import eventually

CLIENTS = [f"c{i}" for i in range(48)]  # every partition, so every primary, gets some


@pytest.fixture(params=["local", "replicated"])
def durability(request):
    return request.param


@pytest.fixture
def topology(durability):
    with ClusterTopology(primaries=3, replicas=2 if durability == "replicated" else 1) as c:
        yield c


async def test_batches_survive_a_killed_primary_without_duplicates(topology, prefix, durability):
    settings = Settings(prefix=prefix, durability=durability)
    async with connect(topology.url, settings=settings) as broker:
        keys = broker._keys
        victim = topology.primary_for_slot(topology.slot_of(keys.clients(0)))
        on_victim = {
            c for c in CLIENTS
            if topology.primary_for_slot(topology.slot_of(keys.client(c))) is victim
        }  # fmt: skip
        assert on_victim and len(on_victim) < len(CLIENTS)
        acked: dict[str, set[int]] = collections.defaultdict(set)
        refused: dict[str, set[int]] = collections.defaultdict(set)
        stop = asyncio.Event()

        async def send(client_id: str) -> None:
            step = 0
            while not stop.is_set():
                step += 1
                try:
                    await broker.inbound.add("metrics", client_id, {"step": step})
                except BrokerUnavailable as exc:
                    if durability == "local" or "not confirmed" not in str(exc):
                        raise
                    refused[client_id].add(step)
                    continue
                acked[client_id].add(step)

        senders = [asyncio.create_task(send(c)) for c in CLIENTS]
        try:

            async def sent(n: int):
                assert not any(t.done() for t in senders), [t.exception() for t in senders]
                return len(acked) == len(CLIENTS) and min(map(len, acked.values())) >= n

            await eventually(lambda: sent(5), 30, "every client's first calls")
            await asyncio.to_thread(topology.kill_primary, victim)
            now = min(map(len, acked.values()))
            await eventually(lambda: sent(now + 10), 60, "calls after the takeover")
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*senders)  # a failed call fails the test here

        steps: dict[str, list[int]] = collections.defaultdict(list)
        for p in keys.all_partitions:
            for _, fields in await broker._redis.xrange(keys.inbound("metrics", p)):
                steps[fields[b"client_id"].decode()].append(int(fields[b"step"]))
        lost = 0
        for c in CLIENTS:
            got = steps[c]
            if c not in on_victim:  # a surviving primary: each acknowledged step once
                assert len(got) == len(set(got)), c
                assert acked[c] <= set(got) <= acked[c] | refused[c], c
            else:
                lost += len(acked[c] - set(got))
        calls = sum(map(len, acked.values()))
        print(
            f"durability {durability}: {calls} calls acknowledged, {lost} lost on the killed "
            f"primary, {sum(map(len, refused.values()))} refused as not confirmed"
        )
        if durability == "replicated":
            assert lost == 0
