"""Sessions with the aggregators of workers/aggregators.py and the session settings the
APIClient sends (buffer_size, delete_models_storage, requested_clients), through a real
replica, real workers, reference clients and Redis; plus the model trail they leave."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from combiner.refclient import ReferenceClient
from tests.services import eventually
from tests.test_session import (
    SEED,
    _finished,
    _online,
    running,
    trainer,
)
from workers.fedavg import load_npz, save_npz

pytestmark = pytest.mark.topologies

CLIENTS = {"alice": (1.0, 10), "bob": (2.0, 30), "carol": (4.0, 60)}
SHIFT = sum(c * n for c, n in CLIENTS.values()) / sum(n for _, n in CLIENTS.values())


def clients_for(replica, spec):
    return [
        ReferenceClient(
            f"127.0.0.1:{replica.port}", cid, poll_interval=0.2, train=trainer(*spec[cid])
        )
        for cid in spec
    ]


async def create(broker, rounds, **cfg):
    seed_id = await broker.models.put(save_npz(SEED))
    await broker.catalog.add_model(seed_id, name="seed")
    config = {"rounds": rounds, "min_clients": 3, "max_clients": 10, "round_timeout": 30,
              "validate": False, **cfg}  # fmt: skip
    return seed_id, await broker.sessions.create(config, seed_id)


def fedopt_reference(opt, lr, b1, b2, tau, inputs):
    """The ancestor's rules with d = SHIFT everywhere (every client adds a constant), each
    round starting from the float32 model the previous round stored; m and v are scalars
    because d is the same in every coordinate."""
    rule = {"adam": lambda v, d: b2 * v + (1 - b2) * d**2,
            "yogi": lambda v, d: v - (1 - b2) * np.sign(v - d**2) * d**2,
            "adagrad": lambda v, d: v + d**2}[opt]  # fmt: skip
    m, v, out = 0.0, tau**2, []
    for model_in in inputs:
        m = b1 * m + (1 - b1) * SHIFT
        v = rule(v, SHIFT)
        out.append([a.astype(np.float64) + lr * m / (np.sqrt(v) + tau) for a in model_in])
    return out


@pytest.mark.parametrize("opt", ["adam", "yogi", "adagrad"])
async def test_fedopt_continues_exactly_when_the_worker_dies_between_rounds(
    broker, make_replica, make_worker, opt
):
    kwargs = {"serveropt": opt, "learning_rate": 0.5, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    replica = await make_replica()
    stop = asyncio.Event()
    async with running(*(c.run(stop) for c in clients_for(replica, CLIENTS)), stop=stop):
        await eventually(lambda: _online(broker, 3), 30)
        seed_id, session_id = await create(broker, 2, aggregator="fedopt", aggregator_kwargs=kwargs)
        _, task = await make_worker()

        async def round_one_done():
            rnd = await broker.sessions.round(session_id, "1")
            return rnd is not None and rnd.status == "done"

        await eventually(round_one_done, 30)
        task.cancel()  # the driver dies: its lease expires and another worker takes over
        await asyncio.gather(task, return_exceptions=True)
        await make_worker()
        view = await eventually(lambda: _finished(broker, session_id), 60)
    assert view["status"] == "completed", view
    assert len({d.split()[0] for d in await broker.sessions.drivers(session_id)}) == 2
    models = [load_npz(await broker.models.get(r["model_id"])) for r in view["rounds"]]
    inputs = [SEED, models[0]]
    lr, b1, b2, tau = (kwargs[k] for k in ("learning_rate", "beta1", "beta2", "tau"))
    want = fedopt_reference(opt, lr, b1, b2, tau, inputs)
    for r, (got_model, want_model) in enumerate(zip(models, want, strict=True)):
        for got, w in zip(got_model, want_model, strict=True):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, w, rtol=1e-6, err_msg=f"round {r + 1}")
    # the trail: round 2's model -> round 1's -> the seed
    trail = await broker.catalog.ancestors(view["model_id"], None)
    assert [m["model_id"] for m in trail] == [
        view["rounds"][1]["model_id"], view["rounds"][0]["model_id"], seed_id
    ]  # fmt: skip
    assert (await broker.catalog.active_model())["model_id"] == view["model_id"]


@pytest.mark.parametrize(
    ("aggregator", "kwargs"), [("fedmedian", {}), ("fedtrimmedavg", {"beta": 0.34})]
)
async def test_robust_aggregators_ignore_a_poisoned_client(
    broker, make_replica, make_worker, aggregator, kwargs
):
    """mallory adds 1e6 and claims 10,000 examples: FedAvg would follow it; the median and
    the trimmed mean (one cut at each end of three) take bob's +2."""
    spec = {"alice": (1.0, 10), "bob": (2.0, 30), "mallory": (1e6, 10_000)}
    replica = await make_replica()
    stop = asyncio.Event()
    async with running(*(c.run(stop) for c in clients_for(replica, spec)), stop=stop):
        await eventually(lambda: _online(broker, 3), 30)
        _, session_id = await create(broker, 2, aggregator=aggregator, aggregator_kwargs=kwargs)
        await make_worker()
        view = await eventually(lambda: _finished(broker, session_id), 60)
    assert view["status"] == "completed", view
    final = load_npz(await broker.models.get(view["model_id"]))
    for got, seed in zip(final, SEED, strict=True):
        np.testing.assert_allclose(got, seed + 2 * 2.0, rtol=1e-6)


async def test_buffer_size_requested_clients_and_delete_models_storage(
    broker, make_replica, make_worker
):
    """max_clients (the APIClient's requested_clients) 2 of 3 online: two selected;
    buffer_size 1: the round ends at the first update and averages only it;
    delete_models_storage: the round's client updates are gone once aggregated."""
    replica = await make_replica()
    stop = asyncio.Event()
    async with running(*(c.run(stop) for c in clients_for(replica, CLIENTS)), stop=stop):
        await eventually(lambda: _online(broker, 3), 30)
        _, session_id = await create(
            broker, 1, max_clients=2, buffer_size=1, delete_models_storage=True
        )
        await make_worker()
        view = await eventually(lambda: _finished(broker, session_id), 60)
    assert view["status"] == "completed", view
    [rnd] = view["rounds"]
    assert len(rnd["clients"]) == 2 and rnd["updates"] == 1
    [used] = rnd["aggregated"]
    constant = CLIENTS[used][0]
    final = load_npz(await broker.models.get(view["model_id"]))
    for got, seed in zip(final, SEED, strict=True):
        np.testing.assert_allclose(got, seed + constant, rtol=1e-6)
    tasks = await broker.sessions.round_tasks(session_id, "1", "tasks")
    records = await broker.tasks.records(tasks)
    [update_id] = [r["model_update_id"] for c, r in records.items() if tasks[c] == used]
    assert await broker.models.meta(update_id) == {}  # deleted once aggregated
