"""Faults with real processes: replicas behind HAProxy, workers, Redis with AOF."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest

from broker import connect
from broker.context import Settings
from combiner.refclient import ReferenceClient
from combiner.views import session_view
from tests.cluster import Cluster
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


async def run_clients(cluster, stop):
    clients = [
        ReferenceClient(
            cluster.target,
            cid,
            mode="stream" if cid.startswith("s") else "poll",
            poll_interval=0.3,
            train=trainer(*CLIENTS[cid]),
        )
        for cid in CLIENTS
    ]
    return clients, [asyncio.create_task(c.run(stop)) for c in clients]


async def wait_view(broker, session_id, predicate, timeout):
    async def loop():
        while True:
            view = await session_view(broker, session_id)
            if predicate(view):
                return view
            await asyncio.sleep(0.2)

    return await asyncio.wait_for(loop(), timeout)


async def test_rolling_restart_of_all_replicas_during_a_session(cluster, prefix):
    broker = await connect(cluster.redis.url, settings=Settings(prefix=prefix))
    stop = asyncio.Event()
    clients, tasks = await run_clients(cluster, stop)
    try:
        await asyncio.wait_for(_online(broker, len(CLIENTS)), 30)
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
    while len(await broker.presence.online()) < n:
        await asyncio.sleep(0.1)


