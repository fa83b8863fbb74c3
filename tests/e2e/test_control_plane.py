"""The published tools only (issue 13): an operator drives training with the published
control-plane client (api_driver.py, run in the client venv) and three unmodified
`scaleout client start --api-url` CLIs join with their own tokens: two with --local-package,
one with the remote compute package the operator uploaded.

Two replicas with tokens on and their HTTP sides, no public address: each assigns a client to
its own gRPC port. The operator's calls go to one replica or the other (any replica answers
any call, the state is in Redis); the clients join through both.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.harness import (
    CLIENT_PACKAGE,
    HOST,
    ApiSide,
    clean_env,
    load_npz,
    save_npz,
)
from tests.e2e.test_training import assert_model, plus, seed_arrays, shift

pytestmark = pytest.mark.e2e

DRIVER = Path(__file__).with_name("api_driver.py")
# (delta, num_examples, local package?)
SPEC = [(0.5, 10, True), (1.25, 30, True), (2.0, 60, False)]
ROUNDS = 3


def api_call(e2e, url: str, token: str, step: str, timeout: float, **args) -> dict:
    """One api_driver.py step in the client venv; its JSON answer."""
    env = clean_env(
        python_vars=False,
        SCALEOUT_AUTH_TOKEN=token,
        SCALEOUT_TOKEN_CACHE_DIR=str(e2e.tmp / "operator-tokens"),
        HOME=str(e2e.tmp),
    )
    done = subprocess.run(
        [str(e2e.client_python), "-I", str(DRIVER), url, step, json.dumps(args)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=e2e.tmp,
    )  # fmt: skip
    assert done.returncode == 0, f"api_driver {step}: rc {done.returncode}\n{done.stderr}"
    assert token not in done.stdout + done.stderr, "the token reached the driver's output"
    return json.loads(done.stdout.strip().splitlines()[-1])


def compute_package(path: Path) -> Path:
    """client_package/ as the tarball an operator uploads (client/scaleout.yaml inside)."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(CLIENT_PACKAGE, arcname="client")
    return path


def test_api_client_uploads_starts_a_session_and_reads_the_exact_result(e2e):
    key = e2e.tmp / "signing-key.pem"
    side = ApiSide(public_host=HOST, public_port=0, signing_key=key)
    e2e.start_server(api=side)
    e2e.start_server(api=side)
    e2e.start_worker()
    urls = [f"http://{HOST}:{port}" for port in e2e.http_ports]
    admin = e2e.cli("token", "create", "--client", "operator", "--role", "admin")
    admin = admin.strip().splitlines()[-1]

    seed = seed_arrays()
    package = compute_package(e2e.tmp / "e2e-package.tgz")
    up = api_call(e2e, urls[0], admin, "upload", 60,
                  seed=str(save_npz(e2e.tmp / "seed.npz", seed)),
                  package=str(package), package_name="e2e")  # fmt: skip
    assert up["model"]["success"], up
    assert up["package"]["success"], up
    assert up["active_package"]["file_name"] == package.name, up

    clients = []
    for i, (delta, n, local) in enumerate(SPEC):
        client_id = f"api-{i}-{e2e.prefix}"
        client = e2e.start_api_client(
            urls[i % 2], e2e.cli.token_create(client_id), client_id,
            delta=delta, num_examples=n, local_package=local,
        )  # fmt: skip
        clients.append(client)
    e2e.wait_online(clients, timeout=60)
    remote = clients[-1]
    assert "Package validated" in remote.proc.read_log(tail=10_000), remote.proc.describe()

    download = e2e.tmp / "final.npz"
    out = api_call(e2e, urls[1], admin, "train", 300,
                   name=f"api-session-{e2e.prefix}", rounds=ROUNDS, min_clients=len(SPEC),
                   round_timeout=60, deadline=240, download=str(download))  # fmt: skip
    e2e.ensure_alive()
    assert "timeout" not in out, out
    assert out["status"] == "Finished", out
    session_id = out["started"]["session_id"]
    assert out["by_name"]["session_id"] == session_id

    # our CLI reads the same state and agrees
    view = e2e.cli.session_show(session_id)
    assert view["status"] == "completed" and len(view["rounds"]) == ROUNDS, view
    round_models = [r["model_id"] for r in view["rounds"]]
    assert out["session"]["model_id"] == view["model_id"] == round_models[-1]
    assert out["rounds"]["count"] == ROUNDS
    assert [r["model_id"] for r in out["rounds"]["result"]] == round_models

    # three validations per round, each of that round's model
    assert out["validations_count"] == len(SPEC) * ROUNDS
    per_model = Counter(v["model_id"] for v in out["validations"]["result"])
    assert per_model == {m: len(SPEC) for m in round_models}, out["validations"]
    senders = {v["sender"]["client_id"] for v in out["validations"]["result"]}
    assert senders == {c.client_id for c in clients}

    # the active model is the session's final one; its trail walks back to the seed
    assert out["active_model"]["model_id"] == round_models[-1]
    trail = [m["model_id"] for m in out["trail"]]
    assert trail == [up["model"]["model_id"], *round_models], out["trail"]

    # the downloaded bytes are the exact weighted mean after three rounds
    assert out["download"]["success"], out
    assert_model(load_npz(download), plus(seed, ROUNDS * shift(clients)), "final model")
