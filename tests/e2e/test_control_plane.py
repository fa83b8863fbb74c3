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


def start_tier(e2e, replicas: int, *worker_flags: str) -> tuple[list[str], str, list, str]:
    """Replicas with tokens on (each assigning clients to its own gRPC port), one worker, the
    operator's seed model and compute package uploaded through the APIClient, and one CLI
    client per SPEC entry joined through the replicas in turn. Returns (the replicas' API
    URLs, the admin refresh token, the clients, the seed model's id)."""
    side = ApiSide(public_host=HOST, public_port=0, signing_key=e2e.tmp / "signing-key.pem")
    for _ in range(replicas):
        e2e.start_server(api=side)
    e2e.start_worker(extra=worker_flags)
    urls = [f"http://{HOST}:{port}" for port in e2e.http_ports]
    admin = e2e.cli("token", "create", "--client", "operator", "--role", "admin")
    admin = admin.strip().splitlines()[-1]
    package = compute_package(e2e.tmp / "e2e-package.tgz")
    up = api_call(e2e, urls[0], admin, "upload", 60,
                  seed=str(save_npz(e2e.tmp / "seed.npz", seed_arrays())),
                  package=str(package), package_name="e2e")  # fmt: skip
    assert up["model"]["success"] and up["package"]["success"], up
    assert up["active_package"]["file_name"] == package.name, up
    clients = []
    for i, (delta, n, local) in enumerate(SPEC):
        client_id = f"api-{i}-{e2e.prefix}"
        client = e2e.start_api_client(
            urls[i % len(urls)], e2e.cli.token_create(client_id), client_id,
            delta=delta, num_examples=n, local_package=local,
        )  # fmt: skip
        clients.append(client)
    e2e.wait_online(clients, timeout=60)
    return urls, admin, clients, up["model"]["model_id"]


def test_api_client_uploads_starts_a_session_and_reads_the_exact_result(e2e):
    urls, admin, clients, seed_id = start_tier(e2e, 2)
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
    assert trail == [seed_id, *round_models], out["trail"]

    # the downloaded bytes are the exact weighted mean after three rounds
    assert out["download"]["success"], out
    assert_model(load_npz(download), plus(seed_arrays(), ROUNDS * shift(clients)), "final model")


def test_api_client_session_with_server_functions_on_an_opted_in_worker(e2e):
    """api_driver.py's server_functions(): every client but the last by id trains, and the
    round's model is the coordinate-wise maximum of their updates."""
    urls, admin, clients, _ = start_tier(e2e, 1, "--allow-server-functions")
    download = e2e.tmp / "final.npz"
    out = api_call(e2e, urls[0], admin, "train", 300, rounds=2, min_clients=len(SPEC),
                   round_timeout=60, deadline=240, download=str(download),
                   server_functions=True)  # fmt: skip
    e2e.ensure_alive()
    assert out["status"] == "Finished", out
    chosen = sorted(c.client_id for c in clients)[:-1]
    view = e2e.cli.session_show(out["started"]["session_id"])
    assert [r["clients"] for r in view["rounds"]] == [chosen, chosen], view
    assert out["validations_count"] == 2 * len(chosen)
    top = max(c.delta for c in clients if c.client_id in chosen)
    assert_model(load_npz(download), plus(seed_arrays(), 2 * top), "final model")
