"""compose.yaml, the Dockerfile and deploy/haproxy.cfg are what the tests run."""

from __future__ import annotations

import os
import shutil
import subprocess

import click
import pytest
import yaml

from combiner.cli import main
from tests.cluster import HAPROXY_CFG, HAPROXY_TLS_CFG, ROOT
from tests.services import wait_for

COMPOSE = ROOT / "compose.yaml"
COMPOSE_TLS = ROOT / "compose.tls.yaml"


def parse(args: list[str]) -> click.Context:
    """Parse a `combiner ...` command line the way the CLI would, without running it."""
    cmd, ctx, name = main, None, "combiner"
    while True:
        ctx = cmd.make_context(name, list(args), parent=ctx)
        if not isinstance(cmd, click.Group):
            return ctx
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, cmd, args = cmd.resolve_command(ctx, rest)


def test_every_compose_command_is_a_valid_combiner_invocation():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    combiner = [s for s in services.values() if s.get("image") == "redis-combiner:latest"]
    assert len(combiner) == 5
    kinds = sorted(s["command"][0] for s in combiner)
    assert kinds == ["serve", "serve", "serve", "worker", "worker"]
    for service in combiner:
        ctx = parse(service["command"])
        assert ctx.command.name in ("serve", "worker")
    assert parse(["serve", "--port", "0"]).params["port"] == 0
    with pytest.raises(click.UsageError):
        parse(["serve", "--no-such-flag"])


def test_compose_haproxy_uses_the_tested_config():
    compose = yaml.safe_load(COMPOSE.read_text())
    haproxy = compose["services"]["haproxy"]
    volume = haproxy["volumes"][0].split(":")[0]
    assert (ROOT / volume).resolve() == HAPROXY_CFG
    assert set(haproxy["environment"]) == {"HAPROXY_BIND", "REPLICA1", "REPLICA2", "REPLICA3"}
    assert compose["services"]["redis"]["command"][1:3] == ["--appendonly", "yes"]


def test_dockerfile_runs_the_combiner_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["combiner"]' in text and "USER combiner" in text
    assert "HEALTHCHECK" in text


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
def test_haproxy_accepts_the_config():
    env = {
        **os.environ,
        "HAPROXY_BIND": "127.0.0.1:12080",
        "REPLICA1": "127.0.0.1:1",
        "REPLICA2": "127.0.0.1:2",
        "REPLICA3": "127.0.0.1:3",
    }
    done = subprocess.run(
        ["haproxy", "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def health_check_bytes() -> str:
    """HTTP/2 bytes of one grpc.health.v1.Health/Check call with an empty request."""

    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return (
            len(payload).to_bytes(3, "big")
            + bytes([kind, flags])
            + stream.to_bytes(4, "big")
            + payload
        )

    def literal(name_index: int, value: str) -> bytes:  # HPACK: literal, indexed name
        return bytes([0x40 | name_index, len(value)]) + value.encode()

    headers = (
        bytes([0x83, 0x86])  # :method POST, :scheme http
        + literal(4, "/grpc.health.v1.Health/Check")  # :path
        + literal(1, "localhost")  # :authority
        + literal(31, "application/grpc")  # content-type
        + b"\x00\x02te\x08trailers"
    )
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    body = b"\x00" + (0).to_bytes(4, "big")  # uncompressed, empty HealthCheckRequest
    return (preface + frame(4, 0, 0, b"") + frame(1, 4, 1, headers) + frame(0, 1, 1, body)).hex()


@pytest.mark.parametrize("cfg", [HAPROXY_CFG, HAPROXY_TLS_CFG], ids=lambda p: p.name)
def test_haproxy_health_check_bytes_are_a_grpc_health_call(cfg):
    line = next(ln for ln in cfg.read_text().splitlines() if "tcp-check send-binary" in ln)
    assert line.split()[-1] == health_check_bytes()
    checks = [ln.strip() for ln in cfg.read_text().splitlines() if "tcp-check" in ln]
    base = [ln.strip() for ln in HAPROXY_CFG.read_text().splitlines() if "tcp-check" in ln]
    assert checks == base  # the TLS config checks the replicas exactly as the other one


# --- TLS termination (deploy/haproxy-tls.cfg, compose.tls.yaml) ----------------------------


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
def test_haproxy_accepts_the_tls_config(tmp_path):
    from tests.certs import write_certs
    from tests.cluster import tls_haproxy_env

    files = write_certs(tmp_path)
    env = tls_haproxy_env(
        "127.0.0.1:12443", files.combined, ["127.0.0.1:1", "127.0.0.1:2"], ["127.0.0.1:3"]
    )
    done = subprocess.run(
        ["haproxy", "-c", "-f", str(HAPROXY_TLS_CFG)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = HAPROXY_TLS_CFG.read_text()
    assert "alpn h2,http/1.1" in text and 'ssl crt "${HAPROXY_CERT}"' in text


def compose_tls_services() -> dict:
    return yaml.safe_load(COMPOSE_TLS.read_text())["services"]


def test_compose_tls_variant_runs_valid_commands_behind_tls_haproxy():
    services = compose_tls_services()
    combiner = {n: s for n, s in services.items() if s.get("image") == "redis-combiner:latest"}
    kinds = sorted(s["command"][0] for s in combiner.values())
    assert kinds == ["serve", "serve", "serve", "status", "worker", "worker"]
    envs = {s["command"][0]: s["env_file"] for s in combiner.values()}
    assert envs == {
        "serve": ["secrets/replica.env"],
        "worker": ["secrets/worker.env"],
        "status": ["secrets/operator.env"],
    }
    for service in combiner.values():
        ctx = parse(service["command"])
        if ctx.command.name == "serve":
            # the HTTP side on, and assignment pointing clients at HAProxy's TLS port 443
            assert ctx.params["http_port"] and ctx.params["public_port"] == 443
            assert ctx.params["public_host"]
            assert not ctx.params["insecure"]
    haproxy = services["haproxy"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in haproxy["volumes"]}
    assert (ROOT / mounts["/usr/local/etc/haproxy/haproxy.cfg"]).resolve() == HAPROXY_TLS_CFG
    env = haproxy["environment"]
    assert env["HAPROXY_BIND"] == ":443"
    assert mounts["/certs"] == "./certs" and env["HAPROXY_CERT"].startswith("/certs/")
    assert {f"REPLICA{i}" for i in (1, 2, 3)} | {f"REPLICA{i}_HTTP" for i in (1, 2, 3)} <= set(env)
    assert "443:443" in haproxy["ports"]
    redis = services["redis"]
    assert "--aclfile" in redis["command"]


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
async def test_grpc_and_http_through_haproxy_tls(make_replica, tmp_path):
    """A real HAProxy terminating TLS (the test CA) in front of a TLS-less replica and an HTTP
    backend: gRPC reaches the replica, /api/* reaches the HTTP side."""
    import asyncio
    import ssl

    import aiohttp
    import grpc
    from aiohttp import web
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from broker.embedded import free_port
    from combiner.pb import scaleout_pb2 as pb
    from combiner.pb import scaleout_pb2_grpc as pb_grpc
    from tests.certs import peer_serial, write_certs
    from tests.cluster import start_haproxy, stop_haproxy, tls_haproxy_env
    from tests.conftest import meta
    from tests.services import eventually

    replica = await make_replica()

    async def api(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "path": request.path,
                "proto": request.headers.get("X-Forwarded-Proto", ""),
                "for": request.headers.get("X-Forwarded-For", ""),
            }
        )

    app = web.Application()
    app.router.add_route("*", "/api/{tail:.*}", api)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    http_port = site._server.sockets[0].getsockname()[1]

    files = write_certs(tmp_path)
    port = free_port()
    env = tls_haproxy_env(
        f"127.0.0.1:{port}",
        files.combined,
        [f"127.0.0.1:{replica.port}"],
        [f"127.0.0.1:{http_port}"],
    )
    haproxy = start_haproxy(HAPROXY_TLS_CFG, env, tmp_path / "haproxy.log")
    credentials = grpc.ssl_channel_credentials(files.ca.read_bytes())
    try:
        async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving():
                assert haproxy.poll() is None, (tmp_path / "haproxy.log").read_text()
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                except grpc.aio.AioRpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            await eventually(serving, 15, "a gRPC health check through HAProxy TLS", every=0.1)
            reply = await pb_grpc.CombinerClientStub(channel).SendHeartbeat(
                pb.Heartbeat(client_id="c1"), metadata=meta("c1"), timeout=5
            )
            assert isinstance(reply, pb.Response)
        presence = await replica.broker.presence.client("c1")
        assert presence  # the heartbeat reached the replica

        assert await asyncio.to_thread(peer_serial, "127.0.0.1", port, files.ca) == files.serial
        context = ssl.create_default_context(cafile=str(files.ca))

        async def http_up():
            async with aiohttp.ClientSession() as session:
                try:
                    async with session.post(
                        f"https://localhost:{port}/api/auth/refresh", ssl=context
                    ) as resp:
                        return resp.status == 200 and await resp.json()
                except aiohttp.ClientError:
                    return False

        body = await eventually(http_up, 15, "the HTTP side through HAProxy TLS", every=0.1)
        assert body["path"] == "/api/auth/refresh"
        assert body["proto"] == "https" and body["for"] == "127.0.0.1"
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):  # no plaintext on the TLS port
                async with session.get(f"http://127.0.0.1:{port}/api/x") as resp:
                    await resp.read()
    finally:
        await asyncio.to_thread(stop_haproxy, haproxy)
        await runner.cleanup()


# --- the Sentinel variant (compose.sentinel.yaml, deploy/sentinel.conf) ----------------------

COMPOSE_SENTINEL = ROOT / "compose.sentinel.yaml"
SENTINEL_CONF = ROOT / "deploy" / "sentinel.conf"


def test_compose_sentinel_variant_finds_the_master_through_its_sentinels():
    from broker.topology import parse_sentinel

    services = yaml.safe_load(COMPOSE_SENTINEL.read_text())["services"]
    combiner = [s for s in services.values() if s.get("image") == "redis-combiner:latest"]
    assert sorted(s["command"][0] for s in combiner) == ["serve"] * 3 + ["worker"] * 2
    for service in combiner:
        parse(service["command"])
        env = service["environment"]
        target = parse_sentinel(env["COMBINER_REDIS_URL"])
        parse([service["command"][0], "--durability", env["COMBINER_DURABILITY"]])
    sentinels = {n for n, s in services.items() if "--sentinel" in " ".join(s.get("command", []))}
    assert sentinels == {"sentinel1", "sentinel2", "sentinel3"}
    assert {h for h, _ in target.sentinels} == sentinels
    assert {p for _, p in target.sentinels} == {26379}
    # the Sentinels watch the compose master under the URL's name, and a majority decides
    monitor = next(
        line.split() for line in SENTINEL_CONF.read_text().splitlines()
        if line.startswith("sentinel monitor")
    )  # fmt: skip
    name, host, port, quorum = monitor[2:]
    assert (name, host, port) == (target.master, "redis", "6379")
    assert int(quorum) == len(sentinels) // 2 + 1
    assert services[host]["command"][0] == "redis-server"
    replicas = [s for s in services.values() if "--replicaof" in s.get("command", [])]
    assert len(replicas) == 2 and all(host in s["command"] for s in replicas)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server missing")
def test_the_sentinel_config_runs_on_a_real_sentinel(tmp_path):
    """deploy/sentinel.conf, pointed at a master on loopback, is accepted by redis-server
    --sentinel, which then names that master under the compose URL's master name."""
    import redis

    from broker.embedded import free_port
    from broker.redis_process import RedisProcess

    master = RedisProcess(tmp_path / "master", appendonly=False)
    master.start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        SENTINEL_CONF.read_text()
        .replace("port 26379", f"port {port}\nbind 127.0.0.1\ndir {tmp_path}")
        .replace("combiner redis 6379", f"combiner 127.0.0.1 {master.port}")
    )
    sentinel = subprocess.Popen(
        [shutil.which("redis-server"), str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = redis.Redis(port=port, socket_timeout=1, decode_responses=True)

    def master_addr():
        try:
            return client.sentinel_get_master_addr_by_name("combiner")
        except redis.ConnectionError:
            assert sentinel.poll() is None, "redis-server --sentinel refused the config"
            return None

    try:
        assert wait_for(master_addr, 20, what="the Sentinel") == ("127.0.0.1", master.port)
        assert client.sentinel_master("combiner")["quorum"] == 2
    finally:
        client.close()
        sentinel.terminate()
        sentinel.wait(10)
        master.close()


# --- the Cluster variant (compose.cluster.yaml, deploy/redis-cluster.conf) -------------------

COMPOSE_CLUSTER = ROOT / "compose.cluster.yaml"
REDIS_CLUSTER_CONF = ROOT / "deploy" / "redis-cluster.conf"
CLUSTER_NODES = {f"redis{i}" for i in range(1, 7)}


def cluster_services() -> dict:
    return yaml.safe_load(COMPOSE_CLUSTER.read_text())["services"]


def cluster_init_script() -> str:
    command = cluster_services()["cluster-init"]["command"]
    assert command[:2] == ["sh", "-ec"]
    return command[2]


def cluster_conf() -> dict[str, str]:
    lines = REDIS_CLUSTER_CONF.read_text().splitlines()
    return dict(ln.split(None, 1) for ln in lines if ln.strip() and not ln.startswith("#"))


def test_compose_cluster_variant_has_six_cluster_nodes_on_the_tested_config():
    services = cluster_services()
    nodes = {n for n, s in services.items() if s.get("command", [""])[0] == "redis-server"}
    assert nodes == CLUSTER_NODES
    conf = cluster_conf()
    assert conf["cluster-enabled"] == "yes" and conf["port"] == "6379"
    assert conf["cluster-config-file"] == "nodes.conf" and "dir" not in conf  # the image's /data
    assert conf["cluster-preferred-endpoint-type"] == "hostname"
    for name in nodes:
        node = services[name]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in node["volumes"]}
        config = node["command"][1]
        assert (ROOT / mounts[config]).resolve() == REDIS_CLUSTER_CONF
        assert mounts["/data"] == f"{name}-data"  # nodes.conf and the AOF survive a restart
        # clients are sent to the node's compose name, which is also its hostname
        flags = node["command"][2:]
        assert flags == ["--cluster-announce-hostname", name] and node["hostname"] == name
        assert node["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_compose_cluster_init_creates_one_cluster_over_exactly_those_nodes():
    import shlex

    services = cluster_services()
    init = services["cluster-init"]
    assert init["depends_on"] == {n: {"condition": "service_healthy"} for n in CLUSTER_NODES}
    assert init["restart"] == "no"
    script = cluster_init_script()
    assert "$" not in script  # compose would interpolate it
    words = shlex.split(script)
    start = words.index("create")
    assert words[start - 2 : start] == ["redis-cli", "--cluster"]
    end = next(i for i in range(start + 1, len(words)) if words[i].startswith("--"))
    hosts = words[start + 1 : end]
    assert sorted(hosts) == sorted(f"{n}:6379" for n in CLUSTER_NODES)
    assert words[end : end + 3] == ["--cluster-replicas", "1", "--cluster-yes"]
    assert words.count("create") == 1


def test_compose_cluster_replicas_and_workers_start_on_a_node_after_the_init():
    from urllib.parse import urlsplit

    from broker.topology import node_urls

    services = cluster_services()
    combiner = [s for s in services.values() if s.get("image") == "redis-combiner:latest"]
    assert sorted(s["command"][0] for s in combiner) == ["serve"] * 3 + ["worker"] * 2
    for service in combiner:
        parse(service["command"])
        env = service["environment"]
        nodes = [urlsplit(u) for u in node_urls(env["COMBINER_REDIS_URL"])]
        assert len(nodes) == 3  # a process starts while one of them is down
        for url in nodes:
            assert url.scheme == "redis" and url.hostname in CLUSTER_NODES and url.port == 6379
        assert env["COMBINER_REDIS_CLUSTER"] == "1"
        parse([service["command"][0], "--durability", env["COMBINER_DURABILITY"]])
        assert service["depends_on"] == {
            "cluster-init": {"condition": "service_completed_successfully"}
        }
    haproxy = services["haproxy"]
    assert (ROOT / haproxy["volumes"][0].split(":")[0]).resolve() == HAPROXY_CFG
    assert haproxy["depends_on"] == ["replica1", "replica2", "replica3"]


@pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="redis-server or redis-cli missing",
)
def test_the_cluster_config_and_init_script_make_a_real_cluster():
    """Six redis-server processes on deploy/redis-cluster.conf (loopback ports and folders
    instead of 6379 and /data), joined by the cluster-init script itself: three primaries
    with a replica each, cluster_state:ok, and clients sent to the announced hostname. A
    second run of the script (a second `docker compose up`) leaves the cluster as it is."""
    import re

    from tests.redis_cluster import ClusterTopology

    # "localhost" stands in for the compose hostnames: resolvable, and not the IP
    topology = ClusterTopology(
        primaries=3,
        replicas=1,
        appendonly=True,
        config_file=REDIS_CLUSTER_CONF,
        options={"cluster-announce-hostname": "localhost"},
    )
    try:
        topology.start_nodes()  # (a node may move to another port if its own was taken)
        port = {f"redis{i}": node.port for i, node in enumerate(topology.nodes, 1)}
        script = cluster_init_script()
        script = re.sub(r"\b(redis\d):6379\b", lambda m: f"127.0.0.1:{port[m[1]]}", script)
        script = re.sub(
            r"-h (redis\d) -p 6379\b", lambda m: f"-h 127.0.0.1 -p {port[m[1]]}", script
        )
        assert "redis1" not in script and "6379" not in script
        node = topology.nodes[0]
        client = node.client()
        try:
            config = client.config_get("cluster-*")
        finally:
            client.close()
        assert config["cluster-enabled"] == "yes" and config["cluster-node-timeout"] == "5000"
        done = subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "[OK] All 16384 slots covered." in done.stdout
        topology.wait_ok(30)
        assert "cluster_state:ok" in node.call("CLUSTER", "INFO")
        assert len(topology.primaries()) == 3
        assert sorted(n.call("ROLE")[0] for n in topology.nodes) == ["master"] * 3 + ["slave"] * 3
        shards = node.call("CLUSTER", "SLOTS")
        assert {r[2][0] for r in shards} == {"localhost"}  # the hostname, not the IP

        again = subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=90)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "Performing hash slots allocation" not in again.stdout
        assert node.call("CLUSTER", "SLOTS") == shards
    finally:
        topology.close()
