"""The control-plane routes (combiner/control_api.py) over real HTTP against a real replica
and Redis, called the way the published APIClient calls them (its client.py)."""

from __future__ import annotations

import io

import aiohttp
import numpy as np
import pytest

from tests.tokens import issue
from workers.fedavg import load_npz, save_npz

pytestmark = pytest.mark.topologies

V1 = "/api/v1"


@pytest.fixture
async def api(make_replica, broker, tmp_path):
    replica = await make_replica(
        insecure=False, http_port=0, signing_key=str(tmp_path / "signing-key.pem")
    )
    key = replica.http.signing_key
    admin = await issue(broker, key, "operator", role="admin")
    client = await issue(broker, key, "c1")
    async with aiohttp.ClientSession(f"http://127.0.0.1:{replica.http_port}") as session:
        session.admin = {"Authorization": f"Bearer {admin.access_token}"}
        session.client = {"Authorization": f"Bearer {client.access_token}"}
        session.replica = replica
        yield session


async def call(api, method, path, headers=None, **kw):
    headers = api.admin if headers is None else headers
    async with api.request(method, path, headers=headers, **kw) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.read()


async def upload(api, data: bytes, name: str, chunk: int = 300) -> str:
    """file-upload/init, chunks, complete: the APIClient's _do_chunked_upload."""
    status, body = await call(api, "POST", f"{V1}/file-upload/init",
                              json={"file_name": name, "file_size": len(data),
                                    "chunk_size": chunk})  # fmt: skip
    assert status == 200, body
    upload_id = body["upload_id"]
    for i in range(0, len(data), chunk):
        headers = {**api.admin, "X-Chunk-Index": str(i // chunk)}
        status, body = await call(api, "POST", f"{V1}/file-upload/{upload_id}/chunk",
                                  headers=headers, data=data[i : i + chunk])  # fmt: skip
        assert status == 200, body
    status, body = await call(api, "POST", f"{V1}/file-upload/{upload_id}/complete")
    assert status == 200, body
    return body["file_token"]


SEED = [np.arange(6, dtype=np.float32), np.ones((2, 2), dtype=np.float32)]


async def test_seed_model_upload_list_get_download_and_trail(api):
    data = save_npz(SEED)
    token = await upload(api, data, "seed.npz")
    status, body = await call(api, "POST", f"{V1}/models/",
                              data={"helper": "numpyhelper", "file_token": token})  # fmt: skip
    assert status == 200 and body["success"], body
    model_id = body["model_id"]
    headers = {**api.admin, "X-Limit": "1", "X-Sort-Key": "committed_at", "X-Sort-Order": "desc"}
    status, body = await call(api, "GET", f"{V1}/models/", headers=headers)
    assert status == 200 and body["count"] == 1 and body["result"][0]["model_id"] == model_id
    assert (await call(api, "GET", f"{V1}/models/count")) == (200, 1)
    status, body = await call(api, "GET", f"{V1}/models/{model_id}")
    assert status == 200 and body["parent_model"] is None
    status, raw = await call(api, "GET", f"{V1}/models/{model_id}/download")
    assert status == 200
    for got, want in zip(load_npz(raw), SEED, strict=True):
        assert np.array_equal(got, want)
    status, trail = await call(api, "GET", f"{V1}/models/{model_id}/ancestors?include_self=true")
    assert status == 200 and [m["model_id"] for m in trail] == [model_id]
    # the file token was used up: a second model from it is refused
    status, body = await call(api, "POST", f"{V1}/models/", data={"file_token": token})
    assert status == 404 and body["message"]


async def test_a_package_is_served_to_clients_with_its_checksum(api):
    import hashlib
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        yaml = b"entry_points:\n  startup: startup.py\n"
        info = tarfile.TarInfo("client/scaleout.yaml")
        info.size = len(yaml)
        tar.addfile(info, io.BytesIO(yaml))
    data = buf.getvalue()
    token = await upload(api, data, "package.tgz")
    status, body = await call(
        api,
        "POST",
        f"{V1}/packages/",
        data={
            "helper": "numpyhelper",
            "name": "p",
            "file_token": token,
            "file_name": "package.tgz",
        },
    )
    assert status == 200 and body["active"], body
    status, body = await call(api, "GET", f"{V1}/packages/checksum?name=package.tgz",
                              headers=api.client)  # fmt: skip
    assert status == 200 and body["checksum"] == hashlib.sha256(data).hexdigest()
    async with api.get(f"{V1}/packages/download", headers=api.client) as resp:
        assert resp.status == 200 and await resp.read() == data
        assert 'filename="package.tgz"' in resp.headers["Content-Disposition"]
    # not a package: no scaleout.yaml
    token = await upload(api, save_npz(SEED), "model.tgz")
    status, body = await call(
        api, "POST", f"{V1}/packages/", data={"file_token": token, "file_name": "model.tgz"}
    )
    assert status == 400 and "tar" in body["message"]
    assert (await call(api, "GET", f"{V1}/packages/count")) == (200, 1)


async def test_sessions_are_created_checked_and_started(api, broker):
    token = await upload(api, save_npz(SEED), "seed.npz")
    _, body = await call(api, "POST", f"{V1}/models/", data={"file_token": token})
    seed_id = body["model_id"]
    config = {"aggregator": "fedavg", "rounds": 2, "round_timeout": 30, "clients_required": 2,
              "requested_clients": 4, "validate": True, "helper_type": "numpyhelper",
              "buffer_size": -1, "delete_models_storage": True, "server_functions": None,
              "model_id": seed_id, "aggregator_kwargs": None}  # fmt: skip
    bad_configs = (
        {"aggregator": "krum"},
        {"server_functions": "class X: pass"},
        {"helper_type": "kerashelper"},
        {"aggregator": "fedopt", "aggregator_kwargs": {"serveropt": "sgd"}},
        {"rounds": 0},
        {"oops": 1},
    )
    for bad in bad_configs:
        status, body = await call(api, "POST", f"{V1}/sessions/",
                                  json={"name": "s", "seed_model_id": seed_id,
                                        "session_config": {**config, **bad}})  # fmt: skip
        assert status == 400 and body["message"], (bad, body)
    assert await broker.sessions.count() == 0  # nothing written
    status, body = await call(
        api,
        "POST",
        f"{V1}/sessions/",
        json={"name": "s", "seed_model_id": seed_id, "session_config": config},
    )
    assert status == 201 and body["status"] == "Created", body
    session_id = body["session_id"]
    record = await broker.sessions.get(session_id)
    assert (record.config["min_clients"], record.config["max_clients"]) == (2, 4)
    status, body = await call(api, "GET", f"{V1}/sessions?name=s")
    assert status == 200 and body["result"][0]["session_id"] == session_id
    status, body = await call(api, "POST", f"{V1}/sessions/start",
                              json={"session_id": session_id, "rounds": 3,
                                    "round_timeout": 30})  # fmt: skip
    assert status == 200 and body["success"], body
    status, body = await call(api, "GET", f"{V1}/sessions/{session_id}")
    assert body["status"] == "Started" and body["session_config"]["rounds"] == 3
    status, body = await call(api, "POST", f"{V1}/sessions/start", json={"session_id": session_id})
    assert status == 400 and "already" in body["message"]
    # a failed session is not continued (its failed round would fail it again)
    await broker.sessions.update(session_id, status="failed", error="round 1: no clients")
    status, body = await call(api, "POST", f"{V1}/sessions/start", json={"session_id": session_id})
    assert status == 409 and "new session" in body["message"], body
    # a round is found by <session id>:<round>, whatever the session id holds
    status, body = await call(api, "POST", f"{V1}/sessions/",
                              json={"session_id": "a&b #c", "session_config": {}})  # fmt: skip
    assert status == 201, body
    await broker.sessions.update_round("a&b #c", "1", status="collecting", model_in=seed_id)
    status, body = await call(api, "GET", f"{V1}/rounds/a%26b%20%23c:1")
    assert status == 200 and body["session_id"] == "a&b #c", body


async def test_admin_routes_refuse_client_tokens_and_no_token(api):
    for path in ("models/", "sessions/", "clients/", "combiners/", "validations/count"):
        status, body = await call(api, "GET", f"{V1}/{path}", headers=api.client)
        assert status == 403 and "admin" in body["message"], path
        status, body = await call(api, "GET", f"{V1}/{path}", headers={})
        assert status == 401 and body["message"], path
    status, body = await call(api, "GET", "/get_controller_status")
    assert status == 200 and body["state"] == "idle"
    status, body = await call(api, "GET", f"{V1}/combiners/")
    assert status == 200 and body["count"] == 1
    assert (await call(api, "GET", f"{V1}/rounds/nope"))[0] == 400
    status, body = await call(api, "GET", f"{V1}/models/", headers={**api.admin, "X-Limit": "x"})
    assert status == 400 and "X-Limit" in body["message"]
    # get_model_trail sends the model count as X-Limit: a large one is capped, not refused
    status, body = await call(
        api, "GET", f"{V1}/models/", headers={**api.admin, "X-Limit": "20000"}
    )
    assert status == 200, body


async def test_predictions_are_started_and_found_by_their_prediction_id(api, broker, make_worker):
    import asyncio
    import json

    from combiner.refclient import ReferenceClient
    from tests.services import eventually

    token = await upload(api, save_npz(SEED), "seed.npz")
    _, body = await call(api, "POST", f"{V1}/models/", data={"file_token": token})
    model_id = body["model_id"]
    refresh, _ = await broker.credentials.create("alice")
    client = ReferenceClient(
        "", "alice", api_url=f"http://127.0.0.1:{api.replica.http_port}", token=refresh,
        poll_interval=0.05, predict=lambda arrays: {"max": float(max(a.max() for a in arrays))},
    )  # fmt: skip
    await make_worker()  # its records role files each client's predictions
    stop = asyncio.Event()
    run = asyncio.create_task(client.run(stop))
    try:
        await eventually(lambda: _online(broker), what="alice online")
        status, body = await call(api, "POST", f"{V1}/predictions/start",
                                  json={"prediction_id": "p-1", "model_id": model_id})  # fmt: skip
        assert status == 200 and list(body["correlation_ids"]) == ["alice"], body

        async def found():
            _, listed = await call(api, "GET", f"{V1}/predictions/?prediction_id=p-1")
            return listed if listed["count"] else None

        listed = await eventually(found, what="alice's prediction")
        _, clients = await call(api, "GET", f"{V1}/clients/?status=online")
        [alice] = clients["result"]
        assert (alice["client_id"], alice["status"]) == ("alice", "online"), alice
        assert alice["combiner"] == api.replica.broker.replica_id and alice["name"]
        assert (await call(api, "GET", f"{V1}/clients/count?status=offline")) == (200, 0)
    finally:
        stop.set()
        await asyncio.wait_for(run, 10)
    [pred] = listed["result"]
    assert pred["prediction_id"] == "p-1" and pred["model_id"] == model_id
    assert pred["correlation_id"] == body["correlation_ids"]["alice"]
    assert json.loads(pred["data"]) == {"max": 5.0} and pred["sender"]["client_id"] == "alice"
    _, other = await call(api, "GET", f"{V1}/predictions/?prediction_id=p-2")
    assert other == {"count": 0, "result": []}
    assert (await call(api, "GET", f"{V1}/predictions/count?prediction_id=p-2")) == (200, 0)
    assert (await call(api, "GET", f"{V1}/predictions/count")) == (200, 1)


async def _online(broker) -> bool:
    return "alice" in await broker.presence.online()
