"""The unmodified published scaleout==1.0.0 CLI in API mode, through a real HAProxy that
terminates TLS in front of three replicas (docs/protocol.md §15, issue 12 items 6 and 8).

The tier (one per module, shared by the tests; every test has its own client ids and
tokens, so no test depends on another's state):

* three `combiner serve` replicas with tokens on and the HTTP side
  (`--http-port 0 --signing-key F`, one key file for all: the first creates it, so any
  replica mints access tokens every replica accepts), each assigning clients to
  `--public-host H --public-port 443`;
* HAProxy with deploy/haproxy-tls.cfg bound to H:443, H the first of 127.0.0.2,
  127.0.0.3, ... where port 443 binds (skipped only if none does): the 1.0.0 client speaks
  TLS only when the assigned port is the integer 443. Its certificate comes from a test CA
  made at test time (tests/certs.py). gRPC (content-type application/grpc) goes to the
  replicas' gRPC ports, /api to their HTTP sides, so the client's --api-url is the very
  same https://H:443 (REQUESTS_CA_BUNDLE = the test CA for the token exchange and the
  assignment, which the CLI makes with requests and verify=True).

Each client is `<venv>/bin/scaleout client start --api-url https://H:443 --token T
--client-id ID --name N --local-package`, no driver, run from a folder holding client/
(client_package/: scaleout.yaml with `entry_points: {startup: e2e_scaleout_startup.py}`).
That is all --local-package needs: ImporterClient loads ./client (no --init YAML, no helper
flag: the assignment answers helper_type numpyhelper). T is `combiner token create --client
ID`; the assignment answers the token's subject as the client id, so ID is only the key of
the client's token cache (SCALEOUT_TOKEN_CACHE_DIR, its own folder). Training adds the
client's delta to every array, so an update is checked exactly (as test_training.py does).

The two ways the client trusts the CA: SCALEOUT_GRPC_ROOT_CERT_PATH (its own roots, no call
credentials) or grpc's GRPC_DEFAULT_SSL_ROOTS_FILE_PATH (default roots plus call
credentials: every RPC then carries the authorization header twice, identical).
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from combiner.pb import scaleout_pb2 as pb
from combiner.pb import scaleout_pb2_grpc as pb_grpc
from tests.certs import ServerFiles, TestCA
from tests.cluster import free_tls_host
from tests.e2e.harness import E2E, PROCS, ApiSide, api_post, release, save_npz, stop_all
from tests.e2e.test_real_client import VERSION_OK, seed_arrays
from tests.services import wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed"),
]

REPLICAS = 3
# What the client logs on each of its two TLS paths (grpc_handler._init_secure_channel).
OWN_ROOTS_LOG = "Using root certificate from environment variable for GRPC channel."
CALL_CREDENTIALS_LOG = "Using TokenManager for dynamic token refresh in secure channel"


@dataclass
class Tier:
    e2e: E2E
    host: str
    certs: ServerFiles
    seed_id: str
    seed: list[np.ndarray]

    @property
    def url(self) -> str:
        return f"https://{self.host}:443"

    def roots(self, how: str) -> dict[str, str]:
        """The client's environment for trusting the test CA: "scaleout" or "grpc-default"."""
        ca = str(self.certs.ca)
        grpc_roots = {
            "scaleout": "SCALEOUT_GRPC_ROOT_CERT_PATH",
            "grpc-default": "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
        }[how]
        return {"REQUESTS_CA_BUNDLE": ca, grpc_roots: ca}

    def new_client_id(self, label: str) -> str:
        return f"api-{label}-{uuid.uuid4().hex[:8]}"

    def start_client(self, label: str, delta: float, roots: str = "scaleout", **opts):
        """A new client id, its own refresh token, and the real CLI started with it."""
        client_id = self.new_client_id(label)
        token = self.e2e.cli.token_create(client_id)
        client = self.e2e.start_api_client(
            self.url, token, client_id, delta=delta, env=self.roots(roots), **opts
        )
        client.token = token
        return client

    def access_token(self, refresh_token: str) -> str:
        """Exchanged through HAProxy, as the client does it."""
        status, body = api_post(
            f"{self.url}/api/auth/refresh",
            {"refresh_token": refresh_token, "role": "client"},
            self.certs.ca,
        )
        assert status == 200 and body.get("access_token"), (status, body)
        return body["access_token"]

    def check_update(self, view: dict, client) -> None:
        update = self.e2e.cli.model_get(
            view["model_update_id"], self.e2e.tmp / f"{view['model_update_id']}.npz"
        )
        assert len(update) == len(self.seed)
        for got, base in zip(update, self.seed, strict=True):
            assert got.dtype == base.dtype and got.shape == base.shape
            assert np.array_equal(got, base + np.float32(client.delta))


@pytest.fixture(scope="module")
def api_tier(request, redis_url, tmp_path_factory, client_python):
    host = free_tls_host()
    if host is None:
        pytest.skip("port 443 binds on none of 127.0.0.2..127.0.0.9 (needs root)")
    tmp: Path = tmp_path_factory.mktemp("api-tier")
    certs = TestCA().write_server(tmp / "certs", sans=("localhost", host))
    e2e = E2E(request, redis_url, f"t{uuid.uuid4().hex[:10]}", tmp, client_python)
    try:
        side = ApiSide(public_host=host, public_port=443, signing_key=tmp / "signing-key.pem")
        for _ in range(REPLICAS):
            e2e.start_server(api=side)
        e2e.start_tls_proxy(host, certs)
        seed = seed_arrays()
        seed_id = e2e.cli.model_put(save_npz(tmp / "seed.npz", seed))
        yield Tier(e2e, host, certs, seed_id, seed)
    finally:
        e2e.stop()


@pytest.fixture
def tier(request, api_tier):
    """The shared tier for one test: the processes it starts are this test's (their logs,
    and the tier's, go into its report on failure) and are stopped after it."""
    e2e = api_tier.e2e
    e2e.request = request
    request.node.stash.setdefault(PROCS, []).extend([*e2e.servers, *e2e.others])
    try:
        yield api_tier
    finally:
        stop_all([c.proc for c in e2e.clients])
        e2e.clients.clear()


def completed_update(view: dict) -> bool:
    return view["state"] == "completed" and bool(view["model_update_id"])


@pytest.mark.parametrize("roots", ["scaleout", "grpc-default"])
def test_training_through_haproxy_tls(tier, roots):
    """Token exchange, assignment and every gRPC call over TLS through HAProxy; a pushed
    training task comes back as the exact update. With grpc-default roots every RPC carries
    the authorization header twice, and that must work too."""
    e2e = tier.e2e
    client = tier.start_client(roots, delta=1.5, num_examples=17, roots=roots)
    e2e.wait_log(client.proc, VERSION_OK, timeout=60)
    log = client.proc.read_log()
    assert f"Connecting (GRPC) to {tier.host}:443" in log  # the assignment: HAProxy, TLS
    if roots == "scaleout":
        assert OWN_ROOTS_LOG in log and CALL_CREDENTIALS_LOG not in log
    else:
        assert CALL_CREDENTIALS_LOG in log and OWN_ROOTS_LOG not in log

    corr = e2e.cli.task_push(
        client.client_id, "Fedn_ModelUpdate", model=tier.seed_id, session="s-api", round="1"
    )
    view = e2e.wait_task(corr, completed_update, timeout=60)
    assert view["client_id"] == client.client_id and view["attempts"] == 1
    assert view["report"]["status"] == "COMPLETED"
    assert (view["model_id"], view["session_id"], view["round_id"]) == (tier.seed_id, "s-api", "1")
    tier.check_update(view, client)

    assert client.proc.stop() == 0, client.proc.describe()
    assert "Traceback" not in client.proc.read_log()


def test_revoked_token_stops_the_client(tier):
    e2e = tier.e2e
    client = tier.start_client("revoked", delta=0.25)
    e2e.wait_log(client.proc, VERSION_OK, timeout=60)
    e2e.wait_online([client])

    client.proc.killed = True  # from now on it is expected to end
    assert len(e2e.cli.token_revoke(client.client_id)) == 1
    wait_for(
        lambda: not client.proc.alive(), 30, 0.1, f"{client.proc.name} to exit after revocation"
    )
    # its poll was refused (the 1.0.0 client does not retry that, §15), which ended it
    log = client.proc.read_log(tail=10_000)
    assert "TaskReceiver: Error in task polling" in log, client.proc.describe()
    assert "StatusCode.UNAUTHENTICATED" in log and "token revoked" in log
    # and the refresh token itself is refused from now on
    status, _ = api_post(
        f"{tier.url}/api/auth/refresh",
        {"refresh_token": client.token, "role": "client"},
        tier.certs.ca,
    )
    assert status == 401


def stable(view: dict) -> dict:
    """A task view without the time of the last report (A's polls move it)."""
    return {**view, "report": {k: v for k, v in view["report"].items() if k != "at"}}


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, timeout=10, **kwargs)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_another_clients_token_cannot_take_or_complete_a_task(tier, tmp_path):
    e2e = tier.e2e
    bob = tier.start_client("bob", delta=-0.5, num_examples=3)
    e2e.wait_log(bob.proc, VERSION_OK, timeout=60)
    alice_id = tier.new_client_id("alice")
    alice_token = e2e.cli.token_create(alice_id)

    # Alice's task is queued before Bob's: Bob polls past it to get his own.
    for_alice = e2e.cli.task_push(alice_id, "Fedn_ModelUpdate", model=tier.seed_id, round="7")
    for_bob = e2e.cli.task_push(bob.client_id, "Fedn_ModelUpdate", model=tier.seed_id)
    tier.check_update(e2e.wait_task(for_bob, completed_update, timeout=60), bob)
    queued = e2e.cli.task_show(for_alice)
    assert (queued["state"], queued["client_id"], queued["attempts"]) == ("queued", alice_id, 0)
    bob_log = bob.proc.read_log(tail=10_000)
    assert f"Got task {for_bob}" in bob_log and for_alice not in bob_log

    # Alice takes it; her training waits until the test releases it.
    alice = e2e.start_api_client(
        tier.url,
        alice_token,
        alice_id,
        delta=2.0,
        env=tier.roots("scaleout"),
        hold_dir=tmp_path,
        hold_calls="1",
    )
    e2e.wait_log(alice.proc, "e2e: training call 1 waits for", timeout=60)
    held = e2e.wait_task(for_alice, lambda v: v["state"] == "running")
    assert held["client_id"] == alice_id

    # Bob's own access token, straight to the replicas through HAProxy TLS.
    bob_access = tier.access_token(bob.token)

    def md(claimed: str) -> tuple:
        return (
            ("client", claimed),
            ("client-id", claimed),
            ("name", claimed),
            ("authorization", f"Bearer {bob_access}"),
        )

    def update(sender: str) -> pb.ModelUpdate:
        return pb.ModelUpdate(
            client_id=sender,
            model_id=tier.seed_id,
            model_update_id=tier.seed_id,
            correlation_id=for_alice,
            round_id="7",
            meta=json.dumps({"training_metadata": {"num_examples": 1}}),
        )

    def done(sender: str) -> pb.ActivityReport:
        return pb.ActivityReport(
            node_id=sender, correlation_id=for_alice, status="COMPLETED", done=True
        )

    credentials = grpc.ssl_channel_credentials(tier.certs.ca.read_bytes())
    with grpc.secure_channel(f"{tier.host}:443", credentials) as channel:
        stub = pb_grpc.CombinerClientStub(channel)
        outcomes = {
            "bob reports alice's task done": code_of(
                stub.PollAndReport, done(bob.client_id), metadata=md(bob.client_id)
            ),
            "bob sends alice's update": code_of(
                stub.SendModelUpdate, update(bob.client_id), metadata=md(bob.client_id)
            ),
            "bob claims alice's id to report": code_of(
                stub.PollAndReport, done(alice_id), metadata=md(alice_id)
            ),
            "bob claims alice's id to update": code_of(
                stub.SendModelUpdate, update(alice_id), metadata=md(alice_id)
            ),
        }
    assert outcomes == {
        "bob reports alice's task done": grpc.StatusCode.PERMISSION_DENIED,
        # an update is looked up as the sender's task: Bob has no such task
        "bob sends alice's update": grpc.StatusCode.NOT_FOUND,
        "bob claims alice's id to report": grpc.StatusCode.PERMISSION_DENIED,
        "bob claims alice's id to update": grpc.StatusCode.PERMISSION_DENIED,
    }
    assert stable(e2e.cli.task_show(for_alice)) == stable(held)

    release(tmp_path, 1)
    view = e2e.wait_task(for_alice, completed_update, timeout=60)
    assert view["client_id"] == alice_id and view["attempts"] == 1
    tier.check_update(view, alice)
    assert for_alice not in bob.proc.read_log(tail=10_000)
    e2e.ensure_alive()  # Bob and Alice both still running
