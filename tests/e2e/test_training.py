"""Federated training end to end: real scaleout 1.0.0 clients, several `combiner serve`
replicas, `combiner worker` processes and `combiner session start --wait --json`, all as
separate processes sharing one Redis under the test's own key prefix.

Each client's train callback adds its own constant to every array and reports its own
num_examples (client_package/), so every round's model is a known weighted mean: the
tests compute it from the models the rounds actually used (fetched with `model get`).
Failures are real: workers and clients are killed with SIGKILL by PID.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.harness import save_npz
from tests.services import wait_for

pytestmark = pytest.mark.e2e

# (delta added by the client's training, num_examples it reports)
SPEC = [(0.5, 10), (1.25, 30), (2.0, 60)]
RUNNING = ("delivered", "pending", "running")  # a task its client holds


def seed_arrays() -> list[np.ndarray]:
    return [
        (np.arange(10, dtype=np.float32) / 4).astype(np.float32),
        np.array([[1.5, -2.0, 3.25], [0.0, 7.5, -0.125]], dtype=np.float32),
    ]


def shift(clients) -> float:
    """What one FedAvg round adds to every element: sum(delta_i n_i) / sum(n_i)."""
    return sum(c.delta * c.num_examples for c in clients) / sum(c.num_examples for c in clients)


def plus(model: list[np.ndarray], value: float) -> list[np.ndarray]:
    return [a.astype(np.float64) + value for a in model]


def assert_model(got: list[np.ndarray], want: list[np.ndarray], what: str) -> None:
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == np.float32 and g.shape == w.shape, f"{what}: array {i}"
        assert np.allclose(g, w, rtol=1e-6), f"{what}: array {i}\ngot  {g}\nwant {w}"


def ids(clients) -> list[str]:
    return sorted(c.client_id for c in clients)


def start_clients(e2e, ports, **opts):
    """One client per SPEC entry, spread over the replicas' ports in turn."""
    return [
        e2e.start_client(delta=d, num_examples=n, port=ports[i % len(ports)], **opts)
        for i, (d, n) in enumerate(SPEC)
    ]


def session_args(*, rounds: int, min_clients: int, max_clients: int, timeout: float):
    return [
        "--rounds", str(rounds), "--min-clients", str(min_clients),
        "--max-clients", str(max_clients), "--round-timeout", str(timeout),
    ]  # fmt: skip


def finished(session, e2e, timeout: float = 120.0) -> dict:
    view = session.result(timeout, check=e2e.ensure_alive)
    assert session.proc.popen.returncode == 0, session.proc.describe()
    assert view["status"] == "completed", view
    assert [r["status"] for r in view["rounds"]] == ["done"] * len(view["rounds"]), view
    return view


def model(e2e, model_id: str) -> list[np.ndarray]:
    return e2e.cli.model_get(model_id, e2e.tmp / f"{model_id}.npz")


def test_three_clients_on_two_replicas_train_the_exact_weighted_mean(e2e):
    ports = [e2e.start_server(), e2e.start_server()]
    e2e.start_worker()
    clients = start_clients(e2e, ports)
    assert {c.port for c in clients} == set(ports)
    e2e.wait_online(clients)
    seed = seed_arrays()
    session = e2e.start_session(
        save_npz(e2e.tmp / "seed.npz", seed),
        *session_args(rounds=3, min_clients=3, max_clients=3, timeout=60),
    )
    view = finished(session, e2e)

    assert len(view["rounds"]) == 3
    for r in view["rounds"]:
        assert r["clients"] == ids(clients), r
        assert r["updates"] == 3 and r["validations"] == 3, r
        # each client validated this round's new model
        sums = [pytest.approx(float(a.sum()), rel=1e-5) for a in model(e2e, r["model_id"])]
        assert sorted(v["client_id"] for v in r["validation_results"]) == ids(clients)
        for v in r["validation_results"]:
            assert v["data"]["sums"] == sums, (r["round_id"], v)
    assert view["model_id"] == view["rounds"][-1]["model_id"]
    final = model(e2e, view["model_id"])
    assert_model(final, plus(seed, 3 * shift(clients)), "final model")
    assert len(e2e.cli.status()["replicas"]) == 2


def test_worker_killed_mid_round_a_new_worker_finishes_the_session(e2e):
    """SIGKILL the driving worker while round 2 is collecting (its clients are still
    training), start another: it takes the lease over when it expires and the session ends
    with the same model, every update counted exactly once."""
    ports = [e2e.start_server(), e2e.start_server()]
    first = e2e.start_worker()
    # Round 2's training takes 4 s on every client: the round is collecting meanwhile.
    clients = start_clients(e2e, ports, train_seconds=4, slow_calls="2")
    e2e.wait_online(clients)
    seed = seed_arrays()
    session = e2e.start_session(
        save_npz(e2e.tmp / "seed.npz", seed),
        *session_args(rounds=3, min_clients=3, max_clients=3, timeout=60),
    )
    sid = session.session_id

    def round_2_collecting(view):
        return len(view["rounds"]) >= 2 and view["rounds"][1]["status"] == "collecting"

    view = e2e.wait_session(sid, round_2_collecting, timeout=60)
    assert view["driver"] == first.worker_id
    first.kill()
    # The kill landed mid-round: nothing moves the round on until another worker comes.
    view = e2e.cli.session_show(sid)
    assert view["status"] == "running" and round_2_collecting(view), view

    second = e2e.start_worker()
    e2e.wait_log(second, f"driving session {sid}", timeout=30)
    view = finished(session, e2e)

    drivers = [entry.split()[0] for entry in e2e.drivers(sid)]
    assert drivers == [first.worker_id, second.worker_id]
    for r in view["rounds"]:
        assert r["clients"] == ids(clients), r
        assert r["updates"] == 3 and r["validations"] == 3, r
        assert r["aggregated"] == ids(clients) and r["rejected"] == {}, r
    final = model(e2e, view["model_id"])
    assert_model(final, plus(seed, 3 * shift(clients)), "final model")


def test_client_killed_mid_round_the_round_ends_without_it(e2e):
    """SIGKILL a client while it trains in round 2: the round ends (its client goes
    offline, or the round times out) with the two other updates averaged, and round 3
    does not select the dead client."""
    ports = [e2e.start_server(), e2e.start_server()]
    e2e.start_worker()  # --offline-after 5
    alive = [
        e2e.start_client(delta=d, num_examples=n, port=ports[i])
        for i, (d, n) in enumerate(SPEC[:2])
    ]
    # Its second training (round 2) would take 10 minutes: it holds the task when killed.
    delta, n = SPEC[2]
    doomed = e2e.start_client(
        delta=delta, num_examples=n, port=ports[0], train_seconds=600, slow_calls="2"
    )
    everyone = [*alive, doomed]
    e2e.wait_online(everyone)
    seed = seed_arrays()
    session = e2e.start_session(
        save_npz(e2e.tmp / "seed.npz", seed),
        *session_args(rounds=3, min_clients=2, max_clients=3, timeout=10),
    )
    sid = session.session_id

    e2e.wait_log(doomed.proc, "e2e: training call 2 takes", timeout=60)
    tasks = e2e.round_tasks(sid, "2")
    corr = next(c for c, client in tasks.items() if client == doomed.client_id)
    held = e2e.cli.task_show(corr)
    assert held["round_id"] == "2" and held["state"] in RUNNING, held
    doomed.proc.kill()

    view = finished(session, e2e)
    r1, r2, r3 = view["rounds"]
    assert r1["clients"] == ids(everyone) and r1["updates"] == 3, r1
    assert r2["clients"] == ids(everyone), r2  # selected before the kill
    assert r2["updates"] == 2 and r2["aggregated"] == ids(alive), r2
    assert r2["validations"] == 2, r2
    assert r3["clients"] == ids(alive), r3  # the dead client is not selected again
    assert r3["updates"] == 2 and r3["validations"] == 2, r3

    dead = e2e.cli.task_show(corr)
    assert dead["flag"] == "timeout" and not dead["model_update_id"], dead

    # Every round's output is the weighted mean of its updates, applied to its input.
    assert r1["model_in"] == view["seed_model_id"]
    assert r2["model_in"] == r1["model_id"] and r3["model_in"] == r2["model_id"]
    assert_model(model(e2e, r1["model_id"]), plus(seed, shift(everyone)), "round 1")
    for r in (r2, r3):
        want = plus(model(e2e, r["model_in"]), shift(alive))
        assert_model(model(e2e, r["model_id"]), want, f"round {r['round_id']}")
    assert view["model_id"] == r3["model_id"]


def test_two_workers_never_both_drive_one_session(e2e):
    """Two workers wait for work; one session: exactly one of them drives it, and the lease
    holder seen while it runs is always that one."""
    port = e2e.start_server()
    workers = [e2e.start_worker(), e2e.start_worker()]
    clients = [e2e.start_client(delta=d, num_examples=n, port=port) for d, n in SPEC[:2]]
    e2e.wait_online(clients)
    session = e2e.start_session(
        save_npz(e2e.tmp / "seed.npz", seed_arrays()),
        *session_args(rounds=2, min_clients=2, max_clients=2, timeout=60),
    )
    sid = session.session_id

    holders: list[str] = []

    def sample():
        e2e.ensure_alive()
        view = e2e.cli.session_show(sid)
        if view["driver"]:
            holders.append(view["driver"])
        return view["status"] in ("completed", "failed")

    wait_for(sample, 120, 0.1, f"session {sid} to end")
    view = finished(session, e2e)
    assert all(r["updates"] == 2 for r in view["rounds"]), view

    drivers = [entry.split()[0] for entry in e2e.drivers(sid)]
    assert len(drivers) == 1, drivers
    assert drivers[0] in {w.worker_id for w in workers}
    assert holders and set(holders) == {drivers[0]}, holders
    idle = next(w for w in workers if w.worker_id != drivers[0])
    assert f"driving session {sid}" not in idle.read_log(tail=10_000)
    e2e.ensure_alive()  # both workers were up all along
