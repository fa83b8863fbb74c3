"""Lifecycles: a Broker, a Replica and a command's embedded Redis are opened and closed as one
`async with`, and nothing outlives the block or the command, also when it fails."""

from __future__ import annotations

import os
import re
import socket

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker import Broker, connect
from broker.context import Settings
from combiner.cli import Config, open_broker
from combiner.server import Replica, ServeOptions
from tests.services import wait_for
from tests.test_cli import run

pytestmark = pytest.mark.topologies


async def test_connect_is_awaitable_and_an_async_context_manager(redis_url, prefix):
    async with connect(redis_url, settings=Settings(prefix=prefix)) as broker:
        assert isinstance(broker, Broker) and await broker.ping()
    assert broker._closed
    broker = await connect(redis_url, settings=Settings(prefix=prefix))
    try:
        assert await broker.ping()
    finally:
        await broker.close()
        await broker.close()  # a second close (owner and borrower) is harmless


async def health_of(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=3)
        return reply.status


async def test_replica_serves_inside_its_block_only(broker):
    async with Replica(broker, ServeOptions(port=0, drain_timeout=0, insecure=True)) as replica:
        port = replica.port
        assert await health_of(port) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError):
        await health_of(port)
    assert await broker.ping()  # the broker is its owner's to close, not the replica's


async def test_replica_stops_when_its_block_fails(broker):
    with pytest.raises(LookupError):
        async with Replica(broker, ServeOptions(port=0, insecure=True)) as replica:
            port = replica.port
            raise LookupError("the block failed")
    with pytest.raises(grpc.aio.AioRpcError):
        await health_of(port)


# --- the embedded Redis of a command ---------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path):
    state = tmp_path / "state"
    yield state
    url_file = state / "redis" / "redis.url"
    if url_file.exists():  # a failed test must not leave a server behind
        try:
            redis.Redis.from_url(url_file.read_text().strip(), socket_timeout=2).shutdown(
                nosave=True
            )
        except redis.RedisError:
            pass


def embedded_pids(state_dir) -> list[int]:
    """The pids of every redis-server started under state_dir (from its log)."""
    log = (state_dir / "redis" / "redis.log").read_text()
    return [int(p) for p in re.findall(r"pid=(\d+)", log)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_no_embedded_redis_left(state_dir) -> None:
    pids = embedded_pids(state_dir)
    assert pids, "the command did not start an embedded redis-server"
    assert not (state_dir / "redis" / "redis.url").exists()
    wait_for(lambda: not any(alive(p) for p in pids), 10, 0.05, "the redis-server to exit")


def test_a_failing_command_stops_its_embedded_redis(state_dir, tmp_path):
    proc = run("model", "get", "unknown", "-o", str(tmp_path / "x"), "--state-dir", str(state_dir))
    assert proc.returncode == 1 and "unknown" in proc.stderr, proc.stderr
    assert_no_embedded_redis_left(state_dir)


def test_serve_that_cannot_listen_stops_its_embedded_redis(state_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run("serve", "--port", str(port), "--state-dir", str(state_dir))
    assert proc.returncode != 0 and "listening on" not in proc.stdout, proc.stdout
    assert f"bind to address 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert_no_embedded_redis_left(state_dir)


async def test_open_broker_stops_the_embedded_redis_it_started_when_its_block_fails(state_dir):
    # In-process, so the process' atexit backstop of the embedded Redis plays no part.
    cfg = Config(redis_url=None, state_dir=str(state_dir), broker=Settings(prefix="t"))
    with pytest.raises(LookupError):
        async with open_broker(cfg) as broker:
            assert await broker.ping()
            assert (state_dir / "redis" / "redis.url").exists()
            raise LookupError("the command failed")
    assert_no_embedded_redis_left(state_dir)
