from __future__ import annotations

import asyncio
import contextlib
import uuid

import grpc
import pytest
import redis
import redis.cluster

from broker import connect
from broker.context import Settings
from combiner.pb import scaleout_pb2_grpc as pb_grpc
from combiner.server import Replica, ServeOptions
from tests import tokens
from tests.redis_cluster import ClusterTopology
from tests.services import forget_prefix, redis_for_tests
from workers.runner import Worker

# Test modules marked `pytest.mark.topologies` run once on a standalone Redis and once on a
# real 3-primary Redis Cluster (tests/redis_cluster.py); every other test on standalone.
TOPOLOGIES = ("standalone", "cluster")


def pytest_generate_tests(metafunc):
    if "topology" in metafunc.fixturenames and metafunc.definition.get_closest_marker("topologies"):
        metafunc.parametrize("topology", TOPOLOGIES, indirect=True, scope="session")


@pytest.fixture(scope="session")
def topology(request) -> str:
    return getattr(request, "param", "standalone")


@pytest.fixture(scope="session")
def standalone_url():
    with redis_for_tests() as url:
        yield url


@pytest.fixture(scope="session")
def cluster_url():
    """A real Redis Cluster of 3 primaries on loopback, for the whole session."""
    with ClusterTopology(primaries=3) as cluster:  # started by the with
        yield cluster.url


@pytest.fixture(scope="session")
def redis_url(request, topology):
    return request.getfixturevalue(f"{topology}_url")


@pytest.fixture
def prefix(request) -> str:
    """A fresh key prefix per test: no test sees another's keys. Its keys on the session's
    Redis are unlinked when the test ends (tests/services.py, forget_prefix)."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    if "redis_url" in request.fixturenames:
        topology = request.getfixturevalue("topology")
        forget_prefix(request.getfixturevalue("redis_url"), topology == "cluster", name)


@pytest.fixture
def at(redis_url, prefix):
    """The flags that point a command at this test's Redis and prefix."""
    return ["--redis-url", redis_url, "--prefix", prefix]


@pytest.fixture
def rdb(redis_url, topology):
    """A plain (sync) client of the test Redis, to look at what commands wrote."""
    if topology == "cluster":
        client = redis.cluster.RedisCluster.from_url(redis_url)
    else:
        client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def broker(redis_url, prefix):
    b = await connect(redis_url, settings=Settings(prefix=prefix))
    yield b
    await b.close()


@pytest.fixture
async def make_replica(redis_url, prefix):
    """Start in-process replicas (real gRPC over loopback) sharing this test's prefix."""
    started = []

    async def start(model_dir=None, **opts):
        # Tests of the data plane run without tokens; the auth tests pass insecure=False.
        opts.setdefault("insecure", True)
        b = await connect(redis_url, settings=Settings(prefix=prefix), model_dir=model_dir)
        replica = Replica(b, ServeOptions(port=0, **opts))
        await replica.start()
        started.append(replica)
        return replica

    yield start
    for replica in started:
        await replica.stop(grace=0)
        await replica.broker.close()


@pytest.fixture
async def replica(make_replica):
    return await make_replica()


# --- tokens on (insecure=False): the auth tests -------------------------------------------


@pytest.fixture
async def signing_key(broker):
    """A signing key whose public half is published to this test's Redis (tests/tokens.py)."""
    return await tokens.publish(broker)


@pytest.fixture
def issue(broker, signing_key):
    """issue(client_id, role="client", lifetime=600) -> tokens.Issued: a refresh token in
    this test's Redis and an access token minted from it."""

    async def make(client_id: str, role: str = "client", lifetime: int = 600):
        return await tokens.issue(broker, signing_key, client_id, role, lifetime)

    return make


@pytest.fixture
async def secure_replica(make_replica, signing_key):
    """A replica that requires tokens (the key is published before it starts)."""
    return await make_replica(insecure=False)


@pytest.fixture
async def secure_stubs(secure_replica):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secure_replica.port}") as channel:
        yield Stubs(channel)


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.combiner = pb_grpc.CombinerClientStub(channel)
        self.models = pb_grpc.ModelServiceStub(channel)


@pytest.fixture
async def stubs(replica):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
        yield Stubs(channel)


def meta(client_id: str = "c1", name: str = "") -> tuple:
    """The metadata the 1.0.0 client sends on every RPC (docs/protocol.md §1)."""
    return (("client", client_id), ("client-id", client_id), ("name", name or client_id))


@contextlib.asynccontextmanager
async def replica_at(url: str, prefix: str = "", pool_size: int = 16, **opts):
    """A replica (real gRPC over loopback) on the Redis at url, and stubs to it; for tests
    that need a Redis of their own (faults, connection counts)."""
    prefix = prefix or f"t{uuid.uuid4().hex[:10]}"
    opts.setdefault("insecure", True)
    async with connect(url, settings=Settings(prefix=prefix), pool_size=pool_size) as b:
        replica = Replica(b, ServeOptions(port=0, **opts))
        await replica.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
                yield replica, Stubs(channel)
        finally:
            await replica.stop(grace=0)


async def next_task(call, within: float = 10.0):
    """The next real task on a TaskStream (keepalives skipped), or fail after within s."""

    async def read():
        while True:
            msg = await call.read()
            assert msg is not grpc.aio.EOF, "the stream ended"
            if msg.correlation_id:
                return msg

    try:
        return await asyncio.wait_for(read(), within)
    except TimeoutError:
        raise AssertionError(f"no task on the stream within {within}s") from None


@pytest.fixture
async def make_worker(redis_url, prefix):
    workers = []

    async def start(**kw):
        b = await connect(redis_url, settings=Settings(prefix=prefix, offline_after=3.0))
        w = Worker(b, poll_every=0.1, **kw)
        task = asyncio.create_task(w.run())
        workers.append((w, task, b))
        return w, task

    yield start
    for w, task, b in workers:
        w.stop_event.set()
        with contextlib.suppress(TimeoutError):  # a test may have cancelled it already
            async with asyncio.timeout(5):
                await asyncio.gather(task, return_exceptions=True)
        await b.close()
