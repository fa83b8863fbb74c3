"""deploy/redis-users.acl: a whole session runs with the replica, the worker and the operator
CLI each under its own restricted Redis user (default user off), Redis denies none of their
commands, and each user is refused what its role does not need. The session also runs on a
Redis Cluster (3 primaries, a replica each) whose nodes all load the file, there under
--durability replicated (WAIT after writes, INFO of every primary at connect)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import uuid

import numpy as np
import pytest
import redis

from broker import connect
from broker.context import Settings
from broker.keys import Keys
from combiner.processes import Child
from combiner.refclient import ReferenceClient
from tests import tokens
from tests.cluster import ROOT
from tests.redis_cluster import ClusterTopology
from tests.services import RedisServer, eventually
from workers.fedavg import load_npz, save_npz

TEMPLATE = ROOT / "deploy" / "redis-users.acl"
ROLES = ("replica", "worker", "operator")
CLIENTS = {"alice": 1.0, "bob": 2.0, "carol": 4.0}  # constant each client adds


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_redis_acl", ROOT / "deploy/make-redis-acl.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class AclRedis:
    """A redis-server on the generated ACL file (random passwords made now), plus an admin
    user of the test's own (readiness check, ACL LOG), which the shipped template has not."""

    def __init__(self, tmp_path, prefix: str) -> None:
        text, self.passwords = _generator().render(TEMPLATE.read_text(), prefix)
        assert set(self.passwords) == set(ROLES)
        assert "CHANGE_ME" not in text and "user default off" in text
        for password in self.passwords.values():
            assert password not in text  # only hashes in the file
        self.admin_password = secrets.token_urlsafe(24)
        acl = tmp_path / "users.acl"
        acl.write_text(text + f"user admin on >{self.admin_password} ~* &* +@all\n")
        self.server = RedisServer(
            options={"aclfile": str(acl)}, username="admin", password=self.admin_password
        )

    def url(self, role: str) -> str:
        return self.server.url_for(role, self.passwords[role])

    def admin(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url, decode_responses=True)

    def denials(self) -> list[dict]:
        with self.admin() as client:
            return client.acl_log()


class AclCluster(AclRedis):
    """A Redis Cluster (3 primaries, a replica each) whose nodes run on the generated ACL
    file. It is made with the default user on (redis-cli --cluster create), then every node
    loads the real file (ACL LOAD, as the admin user, whose connection survives the
    reload); replicas sync as the admin user."""

    def __init__(self, tmp_path, prefix: str) -> None:
        text, self.passwords = _generator().render(TEMPLATE.read_text(), prefix)
        self.admin_password = secrets.token_urlsafe(24)
        admin = f"user admin on >{self.admin_password} ~* &* +@all\n"
        self.acl = tmp_path / "users.acl"
        self.acl.write_text("user default on nopass ~* &* +@all\n" + admin)
        self.text = text + admin
        options = {
            "aclfile": str(self.acl),
            "masteruser": "admin",
            "masterauth": self.admin_password,
        }
        self.topology = ClusterTopology(primaries=3, replicas=1, options=options)

    def start(self) -> None:
        self.topology.start()
        self.acl.write_text(self.text)
        for node in self.topology.nodes:
            with node.client(username="admin", password=self.admin_password) as admin:
                assert admin.execute_command("ACL", "LOAD") in (b"OK", "OK", True)
            with pytest.raises(redis.exceptions.AuthenticationError):
                node.client().ping()  # the default user is off now

    def url(self, role: str) -> str:
        return f"redis://{role}:{self.passwords[role]}@127.0.0.1:{self.topology.nodes[0].port}"

    def denials(self) -> list[dict]:
        found = []
        for node in self.topology.nodes:
            with node.client(username="admin", password=self.admin_password) as admin:
                found += admin.acl_log()
        return found

    def close(self) -> None:
        self.topology.close()


@pytest.fixture
def acl_redis(tmp_path, prefix):
    acl = AclRedis(tmp_path, prefix)
    acl.server.start()
    yield acl
    acl.server.close()


@pytest.fixture(params=["standalone", "cluster"])
def acl_topology(request, tmp_path, prefix):
    """The ACL file on a standalone Redis, or on every node of a Redis Cluster."""
    if request.param == "standalone":
        yield request.getfixturevalue("acl_redis")
        return
    acl = AclCluster(tmp_path, prefix)
    try:
        acl.start()
        yield acl
    finally:
        acl.close()


def as_role(acl: AclRedis, role: str) -> dict[str, str]:
    """The environment of a process of role: its URL in COMBINER_REDIS_URL (not in argv,
    where `ps` would show the password)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMBINER_")}
    env["COMBINER_REDIS_URL"] = acl.url(role)
    return env


def test_the_template_cannot_be_loaded_as_is(tmp_path):
    """Placeholders and comments: Redis refuses the template itself (no weak passwords)."""
    from broker.redis_process import RedisStartError

    server = RedisServer(options={"aclfile": str(TEMPLATE)})
    with pytest.raises(RedisStartError, match="ACL"):
        server.start(timeout=5)
    server.close()


async def test_a_session_runs_under_the_restricted_users(acl_topology, prefix, tmp_path):
    acl_redis = acl_topology
    durability = "replicated" if isinstance(acl_redis, AclCluster) else "local"
    common = ["--prefix", prefix, "--log-level", "info", "--durability", durability]
    replica = Child(
        ["serve", "--port", "0", "--stream-keepalive", "2", "--drain-delay", "0", *common],
        str(tmp_path / "replica.log"),
        env=as_role(acl_redis, "replica"),
    )
    worker = Child(
        ["worker", "--poll-every", "0.2", "--offline-after", "6", "--lease-ttl", "3", *common],
        str(tmp_path / "worker.log"),
        env=as_role(acl_redis, "worker"),
    )

    def logs() -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in tmp_path.glob("*.log")
        )

    stop = asyncio.Event()
    runs: list[asyncio.Task] = []
    try:
        await asyncio.to_thread(replica.start, True)
        worker.start()
        # The operator issues the clients' tokens (the replica runs with tokens checked).
        async with connect(acl_redis.url("operator"), settings=Settings(prefix=prefix)) as op:
            key = await tokens.publish(op)
            issued = {c: await tokens.issue(op, key, c) for c in CLIENTS}
        for cid, constant in CLIENTS.items():
            client = ReferenceClient(
                f"127.0.0.1:{replica.port}",
                cid,
                mode="stream" if cid == "carol" else "poll",
                poll_interval=0.2,
                train=lambda arrays, settings, c=constant: ([a + c for a in arrays], 10),
            )
            client.metadata = issued[cid].metadata()
            runs.append(asyncio.create_task(client.run(stop)))

        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "combiner", *args, "--prefix", prefix],
                capture_output=True, text=True, timeout=120, env=as_role(acl_redis, "operator"),
            )  # fmt: skip

        async def all_online():
            done = await asyncio.to_thread(cli, "status", "--json")
            assert done.returncode == 0, done.stderr + logs()
            return len(json.loads(done.stdout)["clients"]["online"]) == len(CLIENTS)

        await eventually(all_online, 30, "three clients online", every=0.2)
        seed = tmp_path / "seed.npz"
        seed.write_bytes(save_npz([np.zeros(4, dtype=np.float32)]))
        done = await asyncio.to_thread(
            cli, "session", "start", "--seed-model", str(seed), "--rounds", "2",
            "--min-clients", "3", "--round-timeout", "60", "--wait", "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr + logs()
        session = json.loads(done.stdout)
        assert session["status"] == "completed", session
        assert [r["status"] for r in session["rounds"]] == ["done", "done"]
        assert all(r["updates"] == 3 for r in session["rounds"])

        out = tmp_path / "final.npz"
        got = await asyncio.to_thread(cli, "model", "get", session["model_id"], "-o", str(out))
        assert got.returncode == 0, got.stderr
        mean = sum(CLIENTS.values()) / len(CLIENTS)
        np.testing.assert_allclose(load_npz(out.read_bytes())[0], np.full(4, 2 * mean), rtol=1e-6)
        status = await asyncio.to_thread(cli, "status", "--json")
        assert status.returncode == 0, status.stderr
    finally:
        stop.set()
        for run in runs:
            try:
                await asyncio.wait_for(run, 5)
            except (Exception, asyncio.CancelledError):
                run.cancel()
        await asyncio.to_thread(worker.stop, 10)
        await asyncio.to_thread(replica.stop, 10)
    assert acl_redis.denials() == [], logs()


def test_each_user_is_refused_what_its_role_does_not_need(acl_redis, prefix):
    def client(role: str) -> redis.Redis:
        return redis.Redis.from_url(acl_redis.url(role), decode_responses=True)

    def refused(call) -> None:
        with pytest.raises(redis.exceptions.NoPermissionError):
            call()

    outside = f"x{uuid.uuid4().hex[:8]}:secret"
    for role in ROLES:  # every role checks the schema version at connect (broker/schema.py)
        with client(role) as c:
            c.set(f"{prefix}:schema", "1", nx=True)
            assert c.get(f"{prefix}:schema") == "1"
            # --durability replicated: WAIT after writes, INFO once at connect
            assert c.execute_command("WAIT", 0, 10) >= 0
            assert "role" in c.info("replication")
    with client("replica") as r:
        assert r.ping()
        r.hset(Keys(prefix).client("a"), "status", "online")  # its own keys: fine
        r.hset(f"{prefix}:auth:keys", "kid", "pem")  # publishing its signing key: fine
        assert r.hgetall(f"{prefix}:auth:token:0123") == {}  # reading tokens: fine
        refused(r.flushall)
        refused(lambda: r.config_get("*"))
        refused(lambda: r.keys("*"))
        refused(lambda: r.get(outside))
        refused(lambda: r.set(f"{prefix}x", "1"))  # a prefix lookalike, not the prefix
        refused(lambda: r.hset(f"{prefix}:auth:token:0123", "status", "active"))
        refused(lambda: r.zrem(f"{prefix}:auth:revoked", "0123"))
        refused(lambda: r.eval("return 1", 0))
        refused(lambda: r.publish("elsewhere", "x"))
        refused(lambda: r.execute_command("SCRIPT", "FLUSH"))
        # A script runs with its caller's rights: loading one does not widen them.
        sha = r.script_load(f"return redis.call('HSET', '{outside}', 'f', '1')")
        with pytest.raises(redis.exceptions.ResponseError, match="can't access"):
            r.evalsha(sha, 0)
    with client("worker") as w:
        refused(lambda: w.hgetall(f"{prefix}:auth:token:0123"))
        refused(lambda: w.get(f"{prefix}:auth:revocations"))
        refused(w.flushdb)
        refused(lambda: w.execute_command("SUBSCRIBE", Keys(prefix).wake()))
    with client("operator") as o:
        o.hset(f"{prefix}:auth:token:0123", "status", "revoked")  # token admin: fine
        refused(o.flushall)
        refused(lambda: o.config_set("appendonly", "no"))
        refused(lambda: o.get(outside))
        refused(lambda: o.execute_command("ACL", "LIST"))
        refused(lambda: o.xreadgroup("g", "c", {Keys(prefix).inbound("updates"): ">"}))
    wrong = acl_redis.server.url_for("replica", "not-the-password")
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(wrong).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=acl_redis.server.port).ping()  # default: off


async def test_the_control_plane_runs_under_the_replica_user(acl_redis, prefix, tmp_path):
    """Every kind of control-plane route (combiner/control_api.py) on a replica whose Redis
    user is the template's `replica`: Redis denies none of its commands."""
    import io
    import tarfile

    import aiohttp

    from broker.embedded import free_port

    http_port = free_port()
    replica = Child(
        ["serve", "--port", "0", "--http-port", str(http_port), "--signing-key",
         str(tmp_path / "signing-key.pem"), "--drain-delay", "0", "--prefix", prefix],
        str(tmp_path / "replica.log"),
        env=as_role(acl_redis, "replica"),
    )  # fmt: skip
    worker = Child(
        ["worker", "--poll-every", "0.2", "--prefix", prefix],
        str(tmp_path / "worker.log"),
        env=as_role(acl_redis, "worker"),
    )
    url = f"http://127.0.0.1:{http_port}"
    stop = asyncio.Event()
    run = None
    failures = []
    try:
        await asyncio.to_thread(replica.start, True)
        worker.start()
        async with connect(acl_redis.url("operator"), settings=Settings(prefix=prefix)) as op:
            admin_refresh, _ = await op.credentials.create("operator", "admin")
            client_refresh, _ = await op.credentials.create("alice")
        client = ReferenceClient("", "alice", api_url=url, token=client_refresh,
                                 poll_interval=0.1)  # fmt: skip
        run = asyncio.create_task(client.run(stop))
        async with aiohttp.ClientSession(url) as http:

            async def call(method, path, **kw):
                async with http.request(method, path, headers=headers, **kw) as resp:
                    body = await resp.read()
                    if resp.status >= 500:
                        failures.append((method, path, resp.status, body))
                    return resp.status, (json.loads(body) if resp.content_type ==
                                         "application/json" else body)  # fmt: skip

            headers = {}
            _, got = await call("POST", "/api/auth/refresh",
                                json={"refresh_token": admin_refresh, "role": "admin"})  # fmt: skip
            headers = {"Authorization": f"Bearer {got['access_token']}"}

            async def upload(data: bytes, name: str) -> str:
                _, got = await call("POST", "/api/v1/file-upload/init",
                                    json={"file_name": name, "file_size": len(data)})  # fmt: skip
                upload_id = got["upload_id"]
                headers["X-Chunk-Index"] = "0"
                await call("POST", f"/api/v1/file-upload/{upload_id}/chunk", data=data)
                del headers["X-Chunk-Index"]
                status, got = await call("POST", f"/api/v1/file-upload/{upload_id}/complete")
                assert status == 200, got
                return got["file_token"]

            token = await upload(save_npz([np.zeros(4, dtype=np.float32)]), "seed.npz")
            status, model = await call("POST", "/api/v1/models/", data={"file_token": token})
            assert status == 200, model
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                info = tarfile.TarInfo("client/scaleout.yaml")
                tar.addfile(info, io.BytesIO(b""))
            token = await upload(buf.getvalue(), "p.tgz")
            status, got = await call("POST", "/api/v1/packages/",
                                     data={"file_token": token, "file_name": "p.tgz"})  # fmt: skip
            assert status == 200, got
            for path in (
                "models/",
                "models/count",
                f"models/{model['model_id']}/ancestors",
                f"models/{model['model_id']}/download",
                "packages/",
                "packages/active",
                "packages/checksum",
                "packages/download",
                "clients/",
                "combiners/",
                "sessions/",
                "rounds/",
                "validations/",
                "statuses/",
                "predictions/",
            ):
                await call("GET", f"/api/v1/{path}")  # fmt: skip
            await call("GET", "/get_controller_status")

            async def online():
                return "alice" in await client_ids(call)

            await eventually(online, 30, "alice online")
            status, got = await call("POST", "/api/v1/control/run_command",
                                     json={"command_type": "Custom_echo"})  # fmt: skip
            assert status == 200, got
            status, got = await call("POST", "/api/v1/predictions/start", json={})
            assert status == 200, got
            config = {"rounds": 1, "clients_required": 1, "round_timeout": 30, "validate": False}
            status, got = await call("POST", "/api/v1/sessions/",
                                     json={"name": "acl", "session_config": config})  # fmt: skip
            assert status == 201, got
            status, got = await call("POST", "/api/v1/sessions/start",
                                     json={"session_id": got["session_id"]})  # fmt: skip
            assert status == 200, got
            await call("POST", "/api/v1/attributes/current", json={"node_ids": ["alice"]})
            await call("POST", "/api/v1/control/stop")
    finally:
        stop.set()
        if run is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(run, 5)
        await asyncio.to_thread(worker.stop, 10)
        await asyncio.to_thread(replica.stop, 10)
    denied = sorted({(d["reason"], d["object"]) for d in acl_redis.denials()})
    assert (denied, failures) == ([], [])


async def client_ids(call) -> list[str]:
    _, got = await call("GET", "/api/v1/clients/?status=online")
    return [c["client_id"] for c in got["result"]]
