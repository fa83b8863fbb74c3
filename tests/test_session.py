"""Federated training through real replicas, a real worker and reference clients."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest

from combiner.pb import scaleout_pb2 as pb
from combiner.refclient import ReferenceClient
from combiner.views import session_view
from tests.conftest import meta
from tests.services import eventually
from workers.fedavg import load_npz, save_npz

pytestmark = pytest.mark.topologies

SEED = [np.arange(10, dtype=np.float32), np.ones((2, 3), dtype=np.float32)]
# client -> (constant added to every array, num_examples)
CLIENTS = {"alice": (1.0, 10), "bob": (2.0, 30), "carol": (4.0, 60)}


def trainer(constant: float, examples: int):
    def train(arrays, settings):
        return [a + np.asarray(constant, dtype=a.dtype) for a in arrays], examples

    return train


def expected_after(rounds: int, clients: dict) -> list[np.ndarray]:
    model = [a.astype(np.float64) for a in SEED]
    total = sum(n for _, n in clients.values())
    shift = sum(c * n for c, n in clients.values()) / total
    return [a + rounds * shift for a in model]


@contextlib.asynccontextmanager
async def running(*coros_or_clients, stop: asyncio.Event):
    tasks = [asyncio.create_task(c) for c in coros_or_clients]
    try:
        yield tasks
    finally:
        stop.set()
        for t in tasks:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(t, 5)
            if not t.done():
                t.cancel()


async def start_session(broker, rounds=2, **cfg):
    seed_id = await broker.models.put(save_npz(SEED))
    config = {"rounds": rounds, "min_clients": 3, "max_clients": 10, "round_timeout": 30}
    config.update(cfg)
    return await broker.sessions.create(config, seed_id)


async def test_three_clients_two_replicas_exact_weighted_mean(broker, make_replica, make_worker):
    r1, r2 = await make_replica(), await make_replica()
    stop = asyncio.Event()
    clients = [
        ReferenceClient(
            f"127.0.0.1:{(r1 if i % 2 else r2).port}",
            cid,
            mode="stream" if cid == "carol" else "poll",
            poll_interval=0.2,
            train=trainer(*CLIENTS[cid]),
        )
        for i, cid in enumerate(CLIENTS)
    ]
    async with running(*(c.run(stop) for c in clients), stop=stop):
        await eventually(lambda: _online(broker, 3), 30)
        session_id = await start_session(broker, rounds=3)
        await make_worker()
        view = await eventually(lambda: _finished(broker, session_id), 60)
    assert view["status"] == "completed", view
    assert [r["status"] for r in view["rounds"]] == ["done"] * 3
    for r in view["rounds"]:
        assert r["clients"] == sorted(CLIENTS) and r["updates"] == 3
        assert r["validations"] == 3
    final = load_npz(await broker.models.get(view["model_id"]))
    for got, want in zip(final, expected_after(3, CLIENTS), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6)


async def test_round_without_updates_fails_the_session_explicitly(
    broker, make_replica, make_worker
):
    replica = await make_replica()
    stop = asyncio.Event()

    def broken(arrays, settings):
        raise RuntimeError("training crashed")

    client = ReferenceClient(f"127.0.0.1:{replica.port}", "dave", poll_interval=0.2, train=broken)
    async with running(client.run(stop), stop=stop):
        await eventually(lambda: _online(broker, 1), 30)
        session_id = await start_session(broker, rounds=2, min_clients=1, round_timeout=20)
        await make_worker()
        view = await eventually(lambda: _finished(broker, session_id), 30)
    assert view["status"] == "failed"
    assert "no model updates" in view["error"]
    assert view["rounds"][0]["status"] == "failed" and len(view["rounds"]) == 1


async def test_not_enough_clients_fails_after_client_wait(broker, make_worker):
    session_id = await start_session(broker, rounds=1, min_clients=2, client_wait=0.5)
    await make_worker()
    view = await eventually(lambda: _finished(broker, session_id), 20)
    assert view["status"] == "failed" and "required clients" in view["error"]


async def test_two_workers_never_both_drive_a_session(broker, make_replica, make_worker):
    replica = await make_replica()
    stop = asyncio.Event()
    client = ReferenceClient(
        f"127.0.0.1:{replica.port}", "erin", poll_interval=0.2, train=trainer(1.0, 5)
    )
    async with running(client.run(stop), stop=stop):
        await eventually(lambda: _online(broker, 1), 30)
        session_id = await start_session(broker, rounds=2, min_clients=1, validate=False)
        await make_worker()
        await make_worker()
        view = await eventually(lambda: _finished(broker, session_id), 30)
    assert view["status"] == "completed"
    drivers = await broker.sessions.drivers(session_id)
    assert len(drivers) == 1, drivers


async def _online(broker, n):
    return len(await broker.presence.online()) >= n


async def _finished(broker, session_id):
    view = await session_view(broker, session_id)
    return view if view["status"] in ("completed", "failed") else None


async def test_bad_updates_are_rejected_with_a_reason_not_the_round(
    broker, make_replica, make_worker, stubs
):
    """Wrong shapes and a missing num_examples reject that update (recorded), not the round;
    metrics a client sent for the round show up in the session view."""
    replica = await make_replica()
    stop = asyncio.Event()

    def wrong_shape(arrays, settings):
        return [np.zeros(3, dtype=np.float32), arrays[1]], 5

    def no_weight(arrays, settings):
        return arrays, None

    clients = [
        ReferenceClient(f"127.0.0.1:{replica.port}", cid, poll_interval=0.2, train=train)
        for cid, train in (
            ("alice", trainer(*CLIENTS["alice"])),
            ("bob", trainer(*CLIENTS["bob"])),
            ("mallory", wrong_shape),
            ("nobody", no_weight),
        )
    ]
    async with running(*(c.run(stop) for c in clients), stop=stop):
        await eventually(lambda: _online(broker, 4), 30)
        session_id = await start_session(broker, rounds=1, min_clients=4, validate=False)
        metric = pb.ModelMetric(
            client_id="alice",
            metrics=[pb.MetricElem(key="loss", value=0.5)],
            session_id=session_id,
            round_id="1",
        )
        metric.step.value = 0
        await stubs.combiner.SendModelMetric(metric, metadata=meta("alice"))
        await make_worker()
        view = await eventually(lambda: _finished(broker, session_id), 30)

        async def metrics_recorded():
            v = await session_view(broker, session_id)
            return v if v["rounds"][0]["metrics"] else None

        view = await eventually(metrics_recorded, 15)
    assert view["status"] == "completed"
    rnd = view["rounds"][0]
    assert rnd["updates"] == 2 and rnd["aggregated"] == ["alice", "bob"]
    assert set(rnd["rejected"]) == {"mallory", "nobody"}
    assert "shape" in rnd["rejected"]["mallory"]
    assert "num_examples" in rnd["rejected"]["nobody"]
    assert rnd["metrics"] == [{"client_id": "alice", "step": "0", "metrics": {"loss": 0.5}}]
    assert view["records"]["metrics"] == 1 and view["records"]["updates"] == 4
    two = {k: CLIENTS[k] for k in ("alice", "bob")}
    final = load_npz(await broker.models.get(view["model_id"]))
    for got, want in zip(final, expected_after(1, two), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
