"""The real scaleout==1.0.0 client against one replica started with `combiner serve`.

Everything goes through real processes: the client runs in its own venv (docs/protocol.md §0,
§14 b), the replica is the CLI's, and the test drives the system only with the CLI
(`model put/get`, `task push/show`). Each test has its own key prefix, replica and client.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.e2e.harness import save_npz

pytestmark = pytest.mark.e2e

VERSION_OK = "Successfully initialized GRPC connection"  # logged only after VersionCheck passed


def seed_arrays() -> list[np.ndarray]:
    return [
        (np.arange(10, dtype=np.float32) / 4).astype(np.float32),
        np.array([[1.5, -2.0, 3.25], [0.0, 7.5, -0.125]], dtype=np.float32),
    ]


def put_seed(e2e) -> tuple[str, list[np.ndarray]]:
    arrays = seed_arrays()
    return e2e.cli.model_put(save_npz(e2e.tmp / "seed.npz", arrays)), arrays


def completed(view: dict) -> bool:
    return view["state"] == "completed"


def test_polling_model_update_after_version_check(e2e):
    """§13: VersionCheck, poll, Download, train, Upload, SendModelUpdate, report COMPLETED."""
    e2e.start_server()
    seed_id, seed = put_seed(e2e)
    client = e2e.start_client(delta=1.5, num_examples=17)
    e2e.wait_log(client.proc, VERSION_OK)

    corr = e2e.cli.task_push(
        client.client_id, "Fedn_ModelUpdate", model=seed_id, session="s-e2e", round="3"
    )
    view = e2e.wait_task(corr, lambda v: completed(v) and v["model_update_id"])
    assert view["client_id"] == client.client_id and view["type"] == "Fedn_ModelUpdate"
    assert view["delivered_via"] == "poll" and view["attempts"] == 1
    assert view["report"]["status"] == "COMPLETED"
    assert (view["model_id"], view["session_id"], view["round_id"]) == (seed_id, "s-e2e", "3")

    update = e2e.cli.model_get(view["model_update_id"], e2e.tmp / "update.npz")
    assert len(update) == len(seed)
    for got, base in zip(update, seed, strict=True):
        assert got.dtype == base.dtype and got.shape == base.shape
        assert np.array_equal(got, base + np.float32(client.delta))

    # SIGTERM: a clean exit that announces Disconnect (§2.5); the replica stays up.
    assert client.proc.stop() == 0, client.proc.describe()
    assert "Disconnecting client from combiner." in client.proc.read_log()
    assert e2e.server.alive()


def test_validation_result_is_the_callback_dict(e2e):
    e2e.start_server()
    seed_id, seed = put_seed(e2e)
    client = e2e.start_client(delta=0.5)
    corr = e2e.cli.task_push(client.client_id, "Fedn_Validation", model=seed_id, session="v1")
    view = e2e.wait_task(corr, lambda v: completed(v) and v["result"] is not None)
    assert view["report"]["status"] == "COMPLETED" and view["session_id"] == "v1"
    assert view["result"] == {
        "client_id": client.client_id,
        "num_arrays": 2,
        "shapes": [[10], [2, 3]],
        "sums": pytest.approx([float(a.sum()) for a in seed]),
    }


def test_prediction_result_is_the_callback_dict(e2e):
    e2e.start_server()
    seed_id, seed = put_seed(e2e)
    client = e2e.start_client(delta=0.5)
    corr = e2e.cli.task_push(client.client_id, "Fedn_Prediction", model=seed_id)
    view = e2e.wait_task(corr, lambda v: completed(v) and v["result"] is not None)
    assert view["report"]["status"] == "COMPLETED"
    assert view["result"] == {
        "client_id": client.client_id,
        "prediction": [float(a.max()) for a in seed],
    }


def test_custom_task_response_is_the_callback_json(e2e):
    e2e.start_server()
    client = e2e.start_client(delta=2.25)
    params = {"x": [1, 2, 3], "s": "hello", "nested": {"ok": True}}
    corr = e2e.cli.task_push(client.client_id, "Custom_echo", data=json.dumps(params))
    view = e2e.wait_task(corr, completed)
    assert view["report"]["status"] == "COMPLETED"
    expected = {"client_id": client.client_id, "echo": params, "delta": 2.25}
    assert json.loads(view["report"]["response"]) == expected
    assert view["result"] == expected


def test_streaming_client_gets_tasks_over_taskstream(e2e):
    """run(with_heartbeat=True, with_polling=False): tasks arrive on the open TaskStream."""
    e2e.start_server()
    seed_id, seed = put_seed(e2e)
    client = e2e.start_client(delta=-0.75, num_examples=5, mode="stream")
    e2e.wait_log(client.proc, VERSION_OK)
    e2e.wait_log(e2e.server, f"client {client.client_id} opened a task stream")

    train = e2e.cli.task_push(client.client_id, "Fedn_ModelUpdate", model=seed_id, round="1")
    check = e2e.cli.task_push(client.client_id, "Fedn_Validation", model=seed_id)
    view = e2e.wait_task(train, lambda v: completed(v) and v["model_update_id"])
    assert view["delivered_via"] == "stream" and view["report"]["status"] == ""
    update = e2e.cli.model_get(view["model_update_id"], e2e.tmp / "update.npz")
    for got, base in zip(update, seed, strict=True):
        assert got.dtype == base.dtype
        assert np.array_equal(got, base + np.float32(client.delta))

    view = e2e.wait_task(check, lambda v: completed(v) and v["result"] is not None)
    assert view["delivered_via"] == "stream"
    assert view["result"]["client_id"] == client.client_id
    assert view["result"]["sums"] == pytest.approx([float(a.sum()) for a in seed])
    assert "Listening to task stream." in client.proc.read_log()
