"""The broker on Redis Sentinel (broker/topology.py) against a real topology (tests/sentinel.py:
one master, two replicas, three Sentinels): URL parsing, the broker's calls through the
Sentinels, and a kill -9 of the master while calls go on: they keep succeeding on the new
master, none is answered with BrokerUnavailable, and the replica in front keeps serving."""

from __future__ import annotations

import asyncio
import itertools
import time

import numpy as np
import pytest

from broker import BrokerUnavailable, connect
from broker.context import Settings
from broker.topology import is_sentinel, parse_sentinel
from tests.sentinel import SentinelTopology
from tests.services import eventually
from workers.fedavg import load_npz, save_npz


def test_sentinel_urls_are_parsed_and_bad_ones_refused():
    target = parse_sentinel("redis+sentinel://u:p%40ss@10.0.0.1:26379,[::1]:26380/main/3")
    assert target.sentinels == [("10.0.0.1", 26379), ("::1", 26380)]
    assert (target.master, target.db, target.tls) == ("main", 3, False)
    assert target.login == {"username": "u", "password": "p@ss"}
    tls = parse_sentinel("rediss+sentinel://h:1/m?ssl_ca_certs=/ca.pem&sentinel_password=s")
    assert tls.tls and tls.options == {"ssl_ca_certs": "/ca.pem"} and tls.sentinel_password == "s"
    assert is_sentinel("redis+sentinel://h:1/m") and not is_sentinel("redis://h:1/0")
    for bad in ("redis+sentinel://h/m", "redis+sentinel://h:1/", "redis+sentinel://h:1/m/x",
                "redis+sentinel://h:1/m/0/9", "redis+sentinel://h:x/m"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_sentinel(bad)


@pytest.fixture(scope="module")
def topology():
    topo = SentinelTopology()
    try:
        topo.start()
        yield topo
    finally:
        topo.close()


@pytest.fixture
async def sentinel_broker(topology, prefix):
    async with connect(topology.url, settings=Settings(prefix=prefix)) as broker:
        yield broker


async def test_the_broker_works_through_the_sentinels(topology, sentinel_broker):
    broker = sentinel_broker
    model_id = await broker.models.put(save_npz([np.arange(4, dtype=np.float32)]))
    assert load_npz(await broker.models.get(model_id))[0].tolist() == [0, 1, 2, 3]
    corr = await broker.tasks.push("alice", "Fedn_ModelUpdate", model_id=model_id)
    reply = await broker.tasks.poll("alice")
    assert reply.task is not None and reply.task.correlation_id == corr
    assert await broker.ping()
    view = await broker.redis_view()  # the status view's: the master Sentinel names
    (master,) = view["masters"]
    assert view["topology"] == "sentinel"
    assert master["address"] == f"127.0.0.1:{topology.master_port()}"
    assert (master["role"], master["replicas"]) == ("master", len(topology.nodes) - 1)


async def test_calls_go_on_across_a_master_killed_with_sigkill(topology, prefix):
    """Calls every 20 ms from 'before' to 'after': the master is killed -9; a replica is
    promoted; every call returns (within the broker's retry budget), none fails."""
    async with connect(topology.url, settings=Settings(prefix=prefix)) as broker:
        old = topology.master_port()
        done, failed, stop = [], [], asyncio.Event()

        async def caller(n: int):
            i = 0
            while not stop.is_set():
                try:
                    await broker.tasks.push(f"c{n}", "Fedn_ModelUpdate", data=f'{{"i": {i}}}')
                    done.append(time.monotonic())
                except BrokerUnavailable as exc:
                    failed.append(str(exc))
                i += 1
                await asyncio.sleep(0.02)

        callers = [asyncio.create_task(caller(n)) for n in range(4)]
        await eventually(lambda: _more_than(done, 20), 10)
        killed_at = time.monotonic()
        topology.node_at(old).kill()

        async def promoted():
            return topology.master_port() != old

        await eventually(promoted, 30, "a replica promoted")
        since = len(done)
        await eventually(lambda: _more_than(done, since + 40), 20, "calls on the new master")
        stop.set()
        await asyncio.gather(*callers)
        gap = max(b - a for a, b in itertools.pairwise(done) if a >= killed_at - 1)
    assert failed == []
    print(f"sentinel failover: longest gap between answered calls {gap:.2f} s")
    topology.node_at(old).start()  # back as a replica of the new master (Sentinel says so)


async def _more_than(items: list, n: int) -> bool:
    return len(items) > n
