"""server_functions (workers/server_functions.py): the user's class in a real child process
(what it may do, what it is refused, its time and memory limits, what it cannot see), and
sessions that use it through a real replica, real workers, reference clients and Redis;
only workers started with the opt-in drive them, and replicas refuse new ones without one."""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp
import numpy as np
import pytest

from combiner.refclient import ReferenceClient
from tests.services import eventually
from tests.test_session import SEED, _finished, _online, running
from tests.tokens import issue
from workers.fedavg import load_npz, save_npz
from workers.server_functions import Limits, Sandbox, ServerFunctionsError

pytestmark = pytest.mark.topologies

USER = """
class ServerFunctions(ServerFunctionsBase):
    def __init__(self):
        self.calls = 0

    def client_selection(self, client_ids, round_type):
        print("choosing among", client_ids, round_type.value)
        return [c for c in client_ids if c != "carol"]

    def client_settings(self, global_model):
        self.calls += 1
        return {"learning_rate": 0.5, "call": self.calls, "first": float(global_model[0][0])}

    def aggregate(self, previous_global, client_updates):
        # the coordinate-wise maximum of the updates, not a mean
        models = [params for params, _ in client_updates.values()]
        return [np.max(np.stack([m[i] for m in models]), axis=0)
                for i in range(len(previous_global))]
"""

ONE = [np.zeros(3, np.float32)]


@pytest.fixture
def sandboxes():
    made = []

    def make(source: str, **limits) -> Sandbox:
        sandbox = Sandbox(source, Limits(**limits))
        made.append(sandbox)
        return sandbox

    yield make
    for sandbox in made:
        sandbox.close()


def user_class(body: str) -> str:
    return "class ServerFunctions(ServerFunctionsBase):\n" + "".join(
        f"    {line}\n" for line in body.strip().splitlines()
    )


async def test_the_users_functions_run_and_keep_their_state(sandboxes, caplog):
    caplog.set_level("INFO", "workers.server_functions")
    sandbox = await asyncio.to_thread(sandboxes, USER)
    assert sandbox.implements == {"client_selection", "client_settings", "aggregate"}
    picked = await asyncio.to_thread(sandbox.client_selection, ["alice", "bob", "carol"])
    assert picked == ["alice", "bob"]
    first = await asyncio.to_thread(sandbox.client_settings, [np.full(2, 7, np.float32)])
    second = await asyncio.to_thread(sandbox.client_settings, ONE)
    assert (first["call"], second["call"], first["first"]) == (1, 2, 7.0)
    updates = {"a": (save_npz([np.array([1, 5, 0], np.float32)]), {"num_examples": 1}),
               "b": (save_npz([np.array([3, 2, 0], np.float32)]), {"num_examples": 9})}  # fmt: skip
    [got] = await asyncio.to_thread(sandbox.aggregate, ONE, updates)
    assert got.dtype == np.float32 and got.tolist() == [3, 5, 0]

    async def printed():  # the user's print() reaches the worker's log, not the protocol
        return any("choosing among" in r.getMessage() for r in caplog.records)

    await eventually(printed, 10)


async def test_it_sees_no_environment_and_runs_in_a_folder_of_its_own(sandboxes, monkeypatch):
    monkeypatch.setenv("COMBINER_REDIS_URL", "redis://secret@127.0.0.1:1")
    body = "def client_settings(self, m):\n    import os\n"
    body += "    return {'env': dict(os.environ), 'cwd': os.getcwd()}"
    sandbox = await asyncio.to_thread(sandboxes, user_class(body))
    seen = await asyncio.to_thread(sandbox.client_settings, ONE)
    assert not any("REDIS" in k or "COMBINER" in k for k in seen["env"]), seen["env"]
    assert seen["cwd"] != os.getcwd() and "server-functions-" in seen["cwd"]


@pytest.mark.parametrize(
    ("body", "method", "args", "message"),
    [
        ("def client_selection(self, ids, rt):\n    return ['mallory']", "client_selection",
         (["alice"],), "list of the client ids it was given"),
        ("def client_selection(self, ids, rt):\n    return []", "client_selection",
         (["alice"],), "non-empty list"),
        ("def client_settings(self, m):\n    return [1]", "client_settings", (ONE,), "a dict"),
        ("def client_settings(self, m):\n    return {'x': 'y' * 100000}", "client_settings",
         (ONE,), "over 65536 bytes"),
        ("def aggregate(self, p, u):\n    return [np.zeros(4)]", "aggregate", (ONE, {}),
         "shapes"),
        ("def aggregate(self, p, u):\n    return [np.full(3, np.nan)]", "aggregate", (ONE, {}),
         "finite"),
        ("def aggregate(self, p, u):\n    raise KeyError('boom')", "aggregate", (ONE, {}),
         "KeyError: 'boom'"),
    ],
)  # fmt: skip
async def test_what_it_answers_is_checked(sandboxes, body, method, args, message):
    sandbox = await asyncio.to_thread(sandboxes, user_class(body))
    with pytest.raises(ServerFunctionsError, match=message):
        await asyncio.to_thread(getattr(sandbox, method), *args)


async def test_a_call_over_its_time_limit_is_killed(sandboxes):
    body = "def client_selection(self, ids, rt):\n    while True:\n        pass"
    sandbox = await asyncio.to_thread(sandboxes, user_class(body), timeout=1.0)
    with pytest.raises(ServerFunctionsError, match="over its 1 s limit"):
        await asyncio.to_thread(sandbox.client_selection, ["alice"])
    assert sandbox._proc.poll() is not None  # the process is gone


async def test_memory_past_its_limit_fails_the_call_not_the_worker(sandboxes):
    body = "def client_settings(self, m):\n    return {'n': len(bytearray(1 << 30))}"
    sandbox = await asyncio.to_thread(sandboxes, user_class(body), memory_mb=256)
    with pytest.raises(ServerFunctionsError, match="256 MiB"):
        await asyncio.to_thread(sandbox.client_settings, ONE)


@pytest.mark.parametrize(
    ("source", "message"),
    [("x = 1 / 0", "ZeroDivisionError"), ("class A:\n    pass", "no subclass")],
)
async def test_source_that_fails_to_load_is_refused(sandboxes, source, message):
    with pytest.raises(ServerFunctionsError, match=message):
        await asyncio.to_thread(sandboxes, source)


# --- in sessions ---------------------------------------------------------------------------


def recording_trainer(constant: float, examples: int, seen: list):
    def train(arrays, settings):
        seen.append(settings)
        return [a + np.asarray(constant, dtype=a.dtype) for a in arrays], examples

    return train


async def start_session(broker, source: str, rounds: int = 2) -> str:
    seed_id = await broker.models.put(save_npz(SEED))
    config = {"rounds": rounds, "min_clients": 3, "max_clients": 10, "round_timeout": 30,
              "validate": False, "server_functions": source}  # fmt: skip
    return await broker.sessions.create(config, seed_id)


async def test_a_session_runs_the_users_selection_settings_and_aggregation(
    broker, make_replica, make_worker
):
    replica = await make_replica()
    settings_seen: dict[str, list] = {}
    spec = {"alice": (1.0, 10), "bob": (3.0, 30), "carol": (100.0, 60)}
    clients = []
    for cid, (c, n) in spec.items():
        settings_seen[cid] = []
        train = recording_trainer(c, n, settings_seen[cid])
        clients.append(ReferenceClient(f"127.0.0.1:{replica.port}", cid, poll_interval=0.2,
                                       train=train))  # fmt: skip
    stop = asyncio.Event()
    async with running(*(c.run(stop) for c in clients), stop=stop):
        await eventually(lambda: _online(broker, 3), 30)
        session_id = await start_session(broker, USER)
        await make_worker(allow_server_functions=True)
        view = await eventually(lambda: _finished(broker, session_id), 60)
    assert view["status"] == "completed", view
    for r in view["rounds"]:
        assert r["clients"] == ["alice", "bob"], r  # carol was never chosen
    assert settings_seen["carol"] == []
    # the user's settings reached every training task, its object kept count across rounds
    calls = [s["call"] for s in settings_seen["alice"]]
    assert calls == [1, 2] and settings_seen["alice"][0]["learning_rate"] == 0.5
    # its aggregate: the maximum (bob's +3 each round), not the mean of alice and bob
    final = load_npz(await broker.models.get(view["model_id"]))
    for got, seed in zip(final, SEED, strict=True):
        np.testing.assert_array_equal(got, seed + 6)


async def test_user_code_that_fails_fails_the_round_with_its_error(
    broker, make_replica, make_worker
):
    replica = await make_replica()
    clients = [ReferenceClient(f"127.0.0.1:{replica.port}", cid, poll_interval=0.2,
                               train=recording_trainer(1.0, 1, []))
               for cid in ("alice", "bob", "carol")]  # fmt: skip
    stop = asyncio.Event()
    body = "def aggregate(self, p, u):\n    raise RuntimeError('my bug')"
    async with running(*(c.run(stop) for c in clients), stop=stop):
        await eventually(lambda: _online(broker, 3), 30)
        session_id = await start_session(broker, user_class(body))
        await make_worker(allow_server_functions=True)
        view = await eventually(lambda: _finished(broker, session_id), 60)
    assert view["status"] == "failed" and "RuntimeError: my bug" in view["error"], view


async def test_only_opted_in_workers_drive_them_and_replicas_refuse_them_without_one(
    broker, make_replica, make_worker, tmp_path
):
    replica = await make_replica(
        insecure=False, http_port=0, signing_key=str(tmp_path / "signing-key.pem")
    )
    admin = await issue(broker, replica.http.signing_key, "operator", role="admin")
    seed_id = await broker.models.put(save_npz(SEED))
    await broker.catalog.add_model(seed_id, name="seed")
    body = {"seed_model_id": seed_id, "session_config": {"server_functions": USER}}
    headers = {"Authorization": f"Bearer {admin.access_token}"}
    url = f"http://127.0.0.1:{replica.http_port}/api/v1/sessions/"

    async def create(config_extra=None):
        payload = json.loads(json.dumps(body))
        payload["session_config"].update(config_extra or {})
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, json=payload, headers=headers) as resp,
        ):
            return resp.status, await resp.json()

    plain, _ = await make_worker()  # not opted in
    status, answer = await create()
    assert status == 400 and "--allow-server-functions" in answer["message"], answer
    assert await broker.sessions.count() == 0

    # a session that has them anyway (made while an opted-in worker was alive) is left alone
    session_id = await start_session(broker, USER, rounds=1)

    async def declined():
        return session_id in plain.coordinator._declined

    await eventually(declined, 10)
    assert (await broker.sessions.get(session_id)).status == "queued"
    await make_worker(allow_server_functions=True)

    async def opted_in_worker_registered():
        return any("server_functions" in w.role_health for w in await broker.workers.alive())

    await eventually(opted_in_worker_registered, 10)
    status, answer = await create({"rounds": 1})
    assert status == 201, answer
    status, answer = await create({"server_functions": "def broken(:"})
    assert status == 400 and "do not compile" in answer["message"], answer
