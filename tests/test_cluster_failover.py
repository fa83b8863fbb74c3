"""kill -9 of a Redis Cluster primary under batched writes (broker/batching.py, issue 14).

A batch on a Cluster is one plain pipeline per node: when a node dies, only its commands
fail, the others' were applied. The batcher must re-send those callers' commands alone
(after the replica takes over), so no call fails and no message on a surviving primary is
stored twice. What the killed primary had acknowledged but not yet replicated may be lost
(--durability local); that is counted, not asserted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

import pytest

from broker import connect
from broker.context import Settings
from tests.redis_cluster import ClusterTopology
from tests.services import eventually

CLIENTS = [f"c{i}" for i in range(48)]  # every partition, so every primary, gets some


@pytest.fixture
def topology():
    with ClusterTopology(primaries=3, replicas=1) as cluster:
        yield cluster


async def test_batches_survive_a_killed_primary_without_duplicates(topology, prefix):
    async with connect(topology.url, settings=Settings(prefix=prefix)) as broker:
        keys = broker._keys
        victim = topology.primary_for_slot(topology.slot_of(keys.clients(0)))
        on_victim = {
            c for c in CLIENTS
            if topology.primary_for_slot(topology.slot_of(keys.client(c))) is victim
        }  # fmt: skip
        assert on_victim and len(on_victim) < len(CLIENTS)
        acked: collections.Counter = collections.Counter()
        stop = asyncio.Event()

        async def send(client_id: str) -> None:
            step = 0
            while not stop.is_set():
                step += 1
                await broker.inbound.add("metrics", client_id, {"step": step})
                acked[client_id] = step

        senders = [asyncio.create_task(send(c)) for c in CLIENTS]
        try:

            async def sent(n: int):
                assert not any(t.done() for t in senders), [t.exception() for t in senders]
                return len(acked) == len(CLIENTS) and min(acked.values()) >= n

            await eventually(lambda: sent(5), 30, "every client's first calls")
            await asyncio.to_thread(topology.kill_primary, victim)
            now = min(acked.values())
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
                assert sorted(got) == list(range(1, acked[c] + 1)), c
            else:
                lost += len(set(range(1, acked[c] + 1)) - set(got))
        print(f"{sum(acked.values())} calls acknowledged, {lost} lost on the killed primary")
